//! `minitron-manifest.json`: what a checkpoint artifact holds and how it was made, as typed
//! records (a key that is missing when read back is an error, never a silent NaN).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::calib::CalibInfo;
use crate::error::{Error, Result};
use crate::format::safetensors::WrittenFile;

/// The manifest of one checkpoint artifact.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub tool: String,
    pub version: String,
    pub command_line: String,
    pub target: String,
    pub fp8_weights: String,
    pub int8_weights: String,
    /// Absent in manifests written before `w4a16` existed.
    #[serde(default)]
    pub int4_weights: Option<String>,
    pub input: InputRecord,
    pub calibration: Option<CalibInfo>,
    /// What each block was calibrated on (`original` or `quantized`); absent without a pass
    /// over calibration text, and in manifests written before the block pipeline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calib_inputs: Option<String>,
    pub quantization_config: serde_json::Value,
    pub files: Vec<WrittenFile>,
    pub total_bytes: u64,
    pub smoothquant: Option<SmoothQuantRecord>,
    pub tensor_error: TensorError,
    pub wall_s: f64,
}

/// The input checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InputRecord {
    pub dir: String,
    /// File name → sha256.
    pub sha256: BTreeMap<String, String>,
}

/// SmoothQuant settings of an `int8` artifact.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SmoothQuantRecord {
    /// A number, or `"auto"` (chosen per layer).
    pub alpha: serde_json::Value,
    pub per_layer: Vec<LayerAlpha>,
}

/// The α chosen for each smoothed input site of one block.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerAlpha {
    pub layer: usize,
    /// Input-site name → α.
    #[serde(flatten)]
    pub sites: BTreeMap<String, f64>,
}

/// How far the stored weights are from the bf16 ones.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TensorError {
    pub metric: String,
    pub worst: Option<WorstTensor>,
    /// Tensor name → relative RMS error.
    pub per_tensor: BTreeMap<String, f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorstTensor {
    pub tensor: String,
    pub relative_rms: f64,
}

impl TensorError {
    pub fn new(per_tensor: BTreeMap<String, f64>) -> Self {
        let worst = per_tensor
            .iter()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(k, v)| WorstTensor {
                tensor: k.clone(),
                relative_rms: *v,
            });
        TensorError {
            metric: "relative RMS of dequantized vs bf16 weights".into(),
            worst,
            per_tensor,
        }
    }
}

/// The sidecar manifest of a GGUF artifact, `FILE.gguf.manifest.json` beside the file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GgufManifest {
    pub tool: String,
    pub version: String,
    pub command_line: String,
    pub target: String,
    pub input: InputRecord,
    pub calibration: Option<CalibInfo>,
    pub imatrix: Option<String>,
    /// The GGUF file (one entry), named relative to the manifest's folder.
    pub files: Vec<WrittenFile>,
    pub total_bytes: u64,
    pub wall_s: f64,
}

/// The name of the manifest of checkpoint folders.
pub const MANIFEST_FILE: &str = "minitron-manifest.json";

/// Where the sidecar manifest of GGUF file `gguf` goes: `FILE.gguf.manifest.json`.
pub fn sidecar_path(gguf: &Path) -> PathBuf {
    let mut name = gguf.file_name().unwrap_or_default().to_os_string();
    name.push(".manifest.json");
    gguf.with_file_name(name)
}

/// One file whose bytes are not what the manifest recorded.
#[derive(Debug, Clone, Serialize)]
pub struct ChangedFile {
    pub file: String,
    pub expected_bytes: u64,
    pub found_bytes: u64,
    pub expected_sha256: String,
    pub found_sha256: String,
}

/// What [`check`] found.
#[derive(Debug, Clone, Serialize)]
pub struct ManifestCheck {
    pub manifest: PathBuf,
    /// Files whose size and sha256 match.
    pub ok: Vec<String>,
    pub changed: Vec<ChangedFile>,
    /// Listed but absent.
    pub missing: Vec<String>,
    /// Present in the artifact folder but not listed (checkpoint folders only).
    pub extra: Vec<String>,
}

impl ManifestCheck {
    /// Whether every listed file is present and unchanged and nothing else is there.
    pub fn passed(&self) -> bool {
        self.changed.is_empty() && self.missing.is_empty() && self.extra.is_empty()
    }
}

/// The `files` list every manifest has.
#[derive(Deserialize)]
struct FilesOnly {
    files: Vec<WrittenFile>,
}

/// Recomputes the sha256 of every file `path`'s manifest lists and compares: `path` is a
/// checkpoint folder (its `minitron-manifest.json`; files there that the manifest does not list
/// are reported as extra), a GGUF file (its sidecar) or a manifest file itself.
pub fn check(path: &Path) -> Result<ManifestCheck> {
    let (manifest, folder) = if path.is_dir() {
        (path.join(MANIFEST_FILE), true)
    } else if path
        .file_name()
        .is_some_and(|n| n.to_string_lossy().ends_with("manifest.json"))
    {
        (path.to_owned(), false)
    } else {
        (sidecar_path(path), false)
    };
    let base = manifest
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_owned();
    let text = std::fs::read_to_string(&manifest).map_err(|e| Error::io(&manifest, e))?;
    let listed: FilesOnly =
        serde_json::from_str(&text).map_err(|e| Error::format(&manifest, e.to_string()))?;
    for f in &listed.files {
        if !crate::format::safetensors::is_plain_file_name(&f.file) {
            return Err(Error::format(
                &manifest,
                format!(
                    "file name `{}` is not a plain name inside the artifact's folder",
                    f.file.escape_debug()
                ),
            ));
        }
    }
    use rayon::prelude::*;
    let found: Vec<Option<(u64, String)>> = listed
        .files
        .par_iter()
        .map(|f| {
            let p = base.join(&f.file);
            match std::fs::metadata(&p) {
                Ok(m) if m.is_file() => {
                    Ok(Some((m.len(), crate::model::checkpoint::sha256_file(&p)?)))
                }
                Ok(_) => Ok(None),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(Error::io(&p, e)),
            }
        })
        .collect::<Result<_>>()?;
    let mut out = ManifestCheck {
        manifest: manifest.clone(),
        ok: Vec::new(),
        changed: Vec::new(),
        missing: Vec::new(),
        extra: Vec::new(),
    };
    for (f, got) in listed.files.iter().zip(found) {
        match got {
            None => out.missing.push(f.file.clone()),
            Some((bytes, sha)) if bytes == f.bytes && sha == f.sha256 => {
                out.ok.push(f.file.clone())
            }
            Some((bytes, sha)) => out.changed.push(ChangedFile {
                file: f.file.clone(),
                expected_bytes: f.bytes,
                found_bytes: bytes,
                expected_sha256: f.sha256.clone(),
                found_sha256: sha,
            }),
        }
    }
    if folder {
        let listed: std::collections::BTreeSet<&str> =
            listed.files.iter().map(|f| f.file.as_str()).collect();
        let entries = std::fs::read_dir(&base).map_err(|e| Error::io(&base, e))?;
        for e in entries {
            let e = e.map_err(|e| Error::io(&base, e))?;
            let name = e.file_name().to_string_lossy().into_owned();
            if name != MANIFEST_FILE && !listed.contains(name.as_str()) {
                out.extra.push(name);
            }
        }
        out.extra.sort();
    }
    Ok(out)
}

impl Manifest {
    /// Reads a manifest; a missing or mistyped key names the file and the key.
    pub fn read(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::format(path, e.to_string()))
    }
}
