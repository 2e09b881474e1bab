//! Writing small safetensors files in one go (calibration statistics); the streaming, sharded
//! writer for model artifacts builds on the same header rules (formats/hf-llama.md#safetensors).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde_json::json;

use crate::error::{Error, Result};
use crate::numerics::Dtype;

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
    while !hb.len().is_multiple_of(8) {
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

/// One tensor of a planned output.
#[derive(Debug, Clone)]
pub struct PlannedTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl PlannedTensor {
    pub fn nbytes(&self) -> u64 {
        self.shape.iter().product::<usize>() as u64 * self.dtype.size() as u64
    }
}

/// A written output file and its sha256.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct WrittenFile {
    pub file: String,
    pub bytes: u64,
    pub sha256: String,
}

/// Streams a sharded safetensors checkpoint into a folder, Hugging Face style: tensors in the
/// planned order, a new shard when the next tensor would pass `max_shard_bytes`, files named
/// `model-0000i-of-0000n.safetensors` (or `model.safetensors` when one suffices) with an index.
/// Every header is known up front, so each tensor is written once, as it is produced, and each
/// file is hashed while it is written.
pub struct ShardedWriter {
    dir: PathBuf,
    shards: Vec<(String, Vec<PlannedTensor>)>,
    shard: usize,
    pos: usize,
    file: Option<(std::io::BufWriter<std::fs::File>, sha2::Sha256, u64)>,
    written: Vec<WrittenFile>,
    total: u64,
}

impl ShardedWriter {
    pub fn create(dir: &Path, plan: Vec<PlannedTensor>, max_shard_bytes: u64) -> Result<Self> {
        let mut groups: Vec<Vec<PlannedTensor>> = vec![vec![]];
        let mut size = 0u64;
        let total = plan.iter().map(PlannedTensor::nbytes).sum();
        for t in plan {
            let b = t.nbytes();
            if size + b > max_shard_bytes && !groups.last().expect("one").is_empty() {
                groups.push(vec![]);
                size = 0;
            }
            size += b;
            groups.last_mut().expect("one").push(t);
        }
        let n = groups.len();
        let shards = groups
            .into_iter()
            .enumerate()
            .map(|(i, g)| {
                let name = if n == 1 {
                    "model.safetensors".to_owned()
                } else {
                    format!("model-{:05}-of-{:05}.safetensors", i + 1, n)
                };
                (name, g)
            })
            .collect();
        let mut w = ShardedWriter {
            dir: dir.to_owned(),
            shards,
            shard: 0,
            pos: 0,
            file: None,
            written: vec![],
            total,
        };
        w.open_shard()?;
        Ok(w)
    }

    fn open_shard(&mut self) -> Result<()> {
        use sha2::Digest;
        let (name, tensors) = &self.shards[self.shard];
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), json!({"format": "pt"}));
        let mut off = 0u64;
        for t in tensors {
            header.insert(t.name.clone(), json!({"dtype": t.dtype.name(), "shape": t.shape, "data_offsets": [off, off + t.nbytes()]}));
            off += t.nbytes();
        }
        let mut hb =
            serde_json::to_vec(&serde_json::Value::Object(header)).expect("header serialises");
        while !hb.len().is_multiple_of(8) {
            hb.push(b' ');
        }
        let path = self.dir.join(name);
        let f = std::fs::File::create(&path).map_err(|e| Error::io(&path, e))?;
        let mut w = std::io::BufWriter::with_capacity(1 << 22, f);
        let mut h = sha2::Sha256::new();
        let len = (hb.len() as u64).to_le_bytes();
        for part in [&len[..], &hb[..]] {
            w.write_all(part).map_err(|e| Error::io(&path, e))?;
            h.update(part);
        }
        self.file = Some((w, h, 8 + hb.len() as u64));
        self.pos = 0;
        if tensors.is_empty() {
            self.close_shard()?;
        }
        Ok(())
    }

    fn close_shard(&mut self) -> Result<()> {
        use sha2::Digest;
        let (name, _) = &self.shards[self.shard];
        let path = self.dir.join(name);
        let (mut w, h, bytes) = self.file.take().expect("open shard");
        w.flush().map_err(|e| Error::io(&path, e))?;
        w.get_ref().sync_all().map_err(|e| Error::io(&path, e))?;
        self.written.push(WrittenFile {
            file: name.clone(),
            bytes,
            sha256: crate::numerics::hex(&h.finalize()),
        });
        self.shard += 1;
        if self.shard < self.shards.len() {
            self.open_shard()?;
        }
        Ok(())
    }

    /// Name of the next tensor the writer expects, if any.
    pub fn next_name(&self) -> Option<&str> {
        self.shards
            .get(self.shard)
            .and_then(|(_, t)| t.get(self.pos))
            .map(|t| t.name.as_str())
    }

    /// Writes the next planned tensor.
    pub fn write(&mut self, name: &str, data: &[u8]) -> Result<()> {
        use sha2::Digest;
        let (fname, tensors) = self.shards.get(self.shard).ok_or_else(|| {
            Error::Invalid(format!(
                "tensor `{name}` written after the last planned one"
            ))
        })?;
        let t = &tensors[self.pos];
        if t.name != name || t.nbytes() != data.len() as u64 {
            return Err(Error::Invalid(format!(
                "writer expected `{}` ({} bytes), got `{name}` ({} bytes)",
                t.name,
                t.nbytes(),
                data.len()
            )));
        }
        let path = self.dir.join(fname);
        let (w, h, bytes) = self.file.as_mut().expect("open shard");
        w.write_all(data).map_err(|e| Error::io(&path, e))?;
        h.update(data);
        *bytes += data.len() as u64;
        self.pos += 1;
        if self.pos == tensors.len() {
            self.close_shard()?;
        }
        Ok(())
    }

    /// Checks every tensor was written and writes the index when sharded.
    pub fn finish(self) -> Result<Vec<WrittenFile>> {
        if self.shard < self.shards.len() {
            return Err(Error::Invalid(format!(
                "output incomplete: next tensor would have been {:?}",
                self.next_name()
            )));
        }
        let mut written = self.written;
        if self.shards.len() > 1 {
            let mut map = BTreeMap::new();
            for (f, ts) in &self.shards {
                for t in ts {
                    map.insert(t.name.clone(), f.clone());
                }
            }
            let idx = self.dir.join("model.safetensors.index.json");
            let text = serde_json::to_string_pretty(
                &json!({"metadata": {"total_size": self.total}, "weight_map": map}),
            )
            .expect("json")
                + "\n";
            std::fs::write(&idx, &text).map_err(|e| Error::io(&idx, e))?;
            written.push(WrittenFile {
                file: "model.safetensors.index.json".into(),
                bytes: text.len() as u64,
                sha256: sha256_bytes(text.as_bytes()),
            });
        }
        Ok(written)
    }
}

/// sha256 of bytes as lowercase hex.
pub fn sha256_bytes(b: &[u8]) -> String {
    use sha2::Digest;
    crate::numerics::hex(&sha2::Sha256::digest(b))
}

/// Starts an output folder: returns the `.NAME.partial` folder to fill. `out` must not exist
/// unless `force`.
pub fn begin_dir(out: &Path, force: bool) -> Result<PathBuf> {
    if out.exists() && !force {
        return Err(Error::Invalid(format!(
            "{} already exists (pass --force to replace it)",
            out.display()
        )));
    }
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = out.with_file_name(format!(".{name}.partial"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    Ok(tmp)
}

/// Moves a finished partial folder into place (replacing `out` if it exists).
pub fn commit_dir(tmp: &Path, out: &Path) -> Result<()> {
    if out.exists() {
        std::fs::remove_dir_all(out).map_err(|e| Error::io(out, e))?;
    }
    std::fs::rename(tmp, out).map_err(|e| Error::io(out, e))
}

/// Builds an output folder atomically: `f` fills the partial folder, which becomes `out` only
/// when `f` succeeds; on failure it is removed.
pub fn build_dir<T>(out: &Path, force: bool, f: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
    let tmp = begin_dir(out, force)?;
    match f(&tmp) {
        Ok(v) => {
            commit_dir(&tmp, out)?;
            Ok(v)
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            Err(e)
        }
    }
}
