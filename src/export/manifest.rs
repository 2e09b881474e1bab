//! `minitron-manifest.json`: what a checkpoint artifact holds and how it was made, as typed
//! records (a key that is missing when read back is an error, never a silent NaN).

use std::collections::BTreeMap;

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
    pub input: InputRecord,
    pub calibration: Option<CalibInfo>,
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

impl Manifest {
    /// Reads a manifest; a missing or mistyped key names the file and the key.
    pub fn read(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::format(path, e.to_string()))
    }
}
