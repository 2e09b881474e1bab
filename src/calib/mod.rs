//! Calibration: text → token chunks → activation statistics gathered through the runner's hooks
//! → importance matrices (llama.cpp's GGUF and legacy formats) and the scales FP8 and INT8 need.
pub mod dataset;
pub mod hessian;
pub mod imatrix;
pub mod pipeline;
pub mod stats;

pub use dataset::{calibration_chunks, load_source, CalibSource, CalibSpec, ChunkPlan};
pub use imatrix::Imatrix;
pub use pipeline::{BlockCalibration, CalibInputs};
pub use stats::{CalibInfo, CalibStats};

pub use crate::model::DEFAULT_CORPUS;

/// The built-in calibration corpus (what `--calib` defaults to): about 240 kB interleaving
/// English narrative and dialogue, speeches, the Universal Declaration of Human Rights in 16
/// languages, mathematics (prose, LaTeX, code), source code and this project's own prose, so
/// that any prefix of it mixes all of them. Sources and licences: formats/calibration.md;
/// rebuilt by `scripts/build-calib-corpus.py`.
pub const CALIB_CORPUS: &str = include_str!("corpus.txt");

use std::path::PathBuf;

use crate::error::Result;
use crate::model::Checkpoint;

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
    /// Memory the calibration chunks' hidden states may take; beyond it they are kept in a
    /// temporary file in `spill_dir` (see [`crate::runtime::spill`]).
    pub hidden_budget_bytes: u64,
    pub spill_dir: PathBuf,
}

pub use crate::scheme::Needs;

/// What one statistics-only calibration produced.
#[derive(Default)]
pub struct Calibration {
    pub stats: Option<CalibStats>,
    /// Forward passes run over the calibration text (0 or 1).
    pub passes: usize,
    /// What the pass ran on and how long it took, or the loaded statistics' record.
    pub info: Option<CalibInfo>,
}

/// Gathers (or loads, `--load-calib`) the statistics of every block in one pass over the
/// calibration text, block by block ([`BlockCalibration`] with original inputs); saves them
/// when asked. Second moments are the export pipeline's to gather, a block at a time.
///
/// On a CPU the pass is the runner's fused block: bf16 weights as stored, f32 activations
/// rounded to bf16 only as they enter each matmul (as a bf16 model computes in llm-compressor
/// and llama.cpp). Other devices compute in f32.
pub fn calibrate_stats(
    ck: &Checkpoint,
    o: &CalibOptions,
    device: &candle_core::Device,
) -> Result<Calibration> {
    let src = crate::runtime::load::safetensors::SafetensorsSource::borrowed(ck);
    let needs = Needs {
        stats: true,
        hessians: false,
    };
    let mut bc = BlockCalibration::start(ck, &src, o, needs, CalibInputs::Original, device)?;
    let passes = usize::from(bc.runs());
    if bc.runs() {
        for l in 0..ck.config.num_hidden_layers {
            bc.prepare(l)?;
            bc.finish_block(l, None)?;
        }
    }
    crate::runtime::release_free_memory();
    let (stats, info) = bc.finish()?;
    Ok(Calibration {
        stats,
        passes,
        info,
    })
}

/// The matmul dtype of a calibration pass on `device` (see [`calibrate_stats`]).
pub fn pass_dtype(device: &candle_core::Device) -> candle_core::DType {
    if device.is_cpu() {
        candle_core::DType::BF16
    } else {
        candle_core::DType::F32
    }
}

/// Produces calibration statistics for checkpoint `ck` ([`calibrate_stats`]).
pub fn calibrate(
    ck: &Checkpoint,
    o: &CalibOptions,
    device: &candle_core::Device,
) -> Result<CalibStats> {
    calibrate_stats(ck, o, device)?
        .stats
        .ok_or_else(|| crate::error::Error::Internal("statistics were asked for".into()))
}
