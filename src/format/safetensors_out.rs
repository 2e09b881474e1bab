//! Writing small safetensors files in one go (calibration statistics); the streaming, sharded
//! writer for model artifacts builds on the same header rules (formats/hf-llama.md#safetensors).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::error::{Error, Result};
use crate::model::Dtype;

/// A tensor held in memory for writing.
pub struct OwnedTensor {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

/// `dir/.NAME.tmp` beside `dest`, the name outputs are written under before the final rename.
pub fn temp_path(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    dest.with_file_name(format!(".{name}.tmp"))
}

/// Writes `tensors` (name order) with `metadata` to `dest`, atomically.
pub fn write_file(
    dest: &Path,
    tensors: &BTreeMap<String, OwnedTensor>,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        header.insert("__metadata__".into(), json!(metadata));
    }
    let mut off = 0usize;
    for (name, t) in tensors {
        let want = t.shape.iter().product::<usize>() * t.dtype.size();
        if want != t.data.len() {
            return Err(Error::Invalid(format!(
                "tensor `{name}`: {} bytes for {} {:?} (expected {want})",
                t.data.len(),
                t.dtype,
                t.shape
            )));
        }
        header.insert(
            name.clone(),
            json!({"dtype": t.dtype.name(), "shape": t.shape, "data_offsets": [off, off + t.data.len()]}),
        );
        off += t.data.len();
    }
    let mut hb = serde_json::to_vec(&serde_json::Value::Object(header)).expect("header serialises");
    while hb.len() % 8 != 0 {
        hb.push(b' ');
    }
    let tmp = temp_path(dest);
    let io = |e| Error::io(&tmp, e);
    let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(io)?);
    f.write_all(&(hb.len() as u64).to_le_bytes()).map_err(io)?;
    f.write_all(&hb).map_err(io)?;
    for t in tensors.values() {
        f.write_all(&t.data).map_err(io)?;
    }
    f.flush().map_err(io)?;
    f.get_ref().sync_all().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, dest).map_err(|e| Error::io(dest, e))
}
