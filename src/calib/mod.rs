//! Calibration: text → token chunks → activation statistics gathered through the runner's hooks
//! → importance matrices (llama.cpp's GGUF and legacy formats) and the scales FP8 and INT8 need.
pub mod dataset;
pub mod hessian;
pub mod imatrix;
pub mod stats;

pub use dataset::{calibration_chunks, load_source, CalibSource, CalibSpec, ChunkPlan};
pub use imatrix::Imatrix;
pub use stats::{CalibInfo, CalibStats};

pub use crate::model::DEFAULT_CORPUS;

use std::path::PathBuf;

use crate::error::Result;
use crate::model::{Checkpoint, Tokenizer};

/// Where statistics come from: a fresh pass over calibration text, or a saved file.
#[derive(Debug, Clone)]
pub struct CalibOptions {
    /// Calibration text (plain or JSONL); `None`: the built-in corpus.
    pub calib: Option<PathBuf>,
    pub spec: CalibSpec,
    /// Reuse statistics saved earlier instead of running the model.
    pub load: Option<PathBuf>,
    /// Save the statistics for later runs.
    pub save: Option<PathBuf>,
}

/// Input second-moment matrices of every linear layer over the calibration chunks (for GPTQ).
/// They are too large to save, so `--load-calib` does not apply; the text is read again.
pub fn hessians(
    ck: &Checkpoint,
    o: &CalibOptions,
    device: &candle_core::Device,
) -> Result<hessian::Hessians> {
    let src = load_source(o.calib.as_deref())?;
    let tok = Tokenizer::load(&ck.dir)?;
    let chunks = calibration_chunks(&tok, &src, &o.spec)?;
    let pb = crate::progress::bar(ck.config.num_hidden_layers as u64, "hessians", false);
    let h = hessian::Hessians::collect(ck, device, &chunks, &|| pb.inc(1))?;
    pb.finish_and_clear();
    Ok(h)
}

/// Produces calibration statistics for checkpoint `ck`: loads them, or runs the bf16 model (f32
/// compute on `device`) over the calibration chunks once. Saves them when asked.
pub fn calibrate(
    ck: &Checkpoint,
    o: &CalibOptions,
    device: &candle_core::Device,
) -> Result<CalibStats> {
    let stats = match &o.load {
        Some(p) => CalibStats::load(p, &ck.config)?,
        None => {
            let src = load_source(o.calib.as_deref())?;
            let tok = Tokenizer::load(&ck.dir)?;
            let chunks = calibration_chunks(&tok, &src, &o.spec)?;
            let pb = crate::progress::bar(ck.config.num_hidden_layers as u64, "calibrate", false);
            let info = CalibInfo {
                source: src.label.clone(),
                sha256: src.sha256.clone(),
                samples: chunks.len(),
                seq_len: o.spec.seq_len,
                tokens: 0,
                shuffle_seed: o.spec.shuffle,
                wall_s: 0.0,
            };
            let s =
                CalibStats::collect(ck, candle_core::DType::F32, device, &chunks, info, &|| {
                    pb.inc(1)
                })?;
            pb.finish_and_clear();
            s
        }
    };
    if let Some(p) = &o.save {
        stats.save(p)?;
    }
    Ok(stats)
}
