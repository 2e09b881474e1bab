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

/// The built-in calibration corpus (what `--calib` defaults to): about 240 kB interleaving
/// English narrative and dialogue, speeches, the Universal Declaration of Human Rights in 16
/// languages, mathematics (prose, LaTeX, code), source code and this project's own prose, so
/// that any prefix of it mixes all of them. Sources and licences: formats/calibration.md;
/// rebuilt by `scripts/build-calib-corpus.py`.
pub const CALIB_CORPUS: &str = include_str!("corpus.txt");

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

/// What the targets of one export need from calibration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Needs {
    /// Per-channel statistics (FP8 static scales, SmoothQuant, clipping search, imatrices).
    pub stats: bool,
    /// Input second-moment matrices (GPTQ); they are too large to save, so `--load-calib`
    /// never provides them.
    pub hessians: bool,
}

/// What one calibration produced.
#[derive(Default)]
pub struct Calibration {
    pub stats: Option<CalibStats>,
    pub hessians: Option<hessian::Hessians>,
    /// Forward passes run over the calibration text (0 or 1).
    pub passes: usize,
    /// What the pass ran on and how long it took (also when it collected only GPTQ's second
    /// moments), or the loaded statistics' record.
    pub info: Option<CalibInfo>,
}

/// Calibrates once for everything `needs` asks: statistics are loaded (`--load-calib`) or
/// collected, and when a pass over the text is needed the text is tokenized once and one
/// forward pass of the bf16 model feeds every collector. Saves the statistics when asked.
///
/// On a CPU the pass is the runner's fused block: bf16 weights as stored, f32 activations
/// rounded to bf16 only as they enter each matmul (as a bf16 model computes in llm-compressor
/// and llama.cpp). Other devices compute in f32.
pub fn calibrate_for(
    ck: &Checkpoint,
    o: &CalibOptions,
    needs: Needs,
    device: &candle_core::Device,
) -> Result<Calibration> {
    let mut out = Calibration::default();
    if needs.stats {
        if let Some(p) = &o.load {
            out.stats = Some(CalibStats::load(p, &ck.config)?);
        }
    }
    let run_stats = needs.stats && out.stats.is_none();
    if run_stats || needs.hessians {
        let src = load_source(o.calib.as_deref())?;
        let tok = Tokenizer::load(&ck.dir)?;
        let chunks = calibration_chunks(&tok, &src, &o.spec)?;
        let mut hc = if needs.hessians {
            Some(hessian::Collector::new(&ck.config)?)
        } else {
            None
        };
        let layers = ck.config.num_hidden_layers as u64;
        let tokens: u64 = chunks.iter().map(|c| c.len() as u64).sum();
        let pb = crate::progress::bar(
            tokens * layers,
            "calibrate",
            crate::progress::Unit::Tokens { passes: layers },
        );
        if run_stats {
            let info = CalibInfo {
                source: src.label.clone(),
                sha256: src.sha256.clone(),
                samples: chunks.len(),
                seq_len: o.spec.seq_len,
                tokens: 0,
                shuffle_seed: o.spec.shuffle,
                wall_s: 0.0,
                fingerprint: dataset::fingerprint(&chunks),
            };
            let also = hc.as_mut().map(|h| h as &mut dyn crate::runtime::Observer);
            out.stats = Some(CalibStats::collect_with(
                ck,
                pass_dtype(device),
                device,
                &chunks,
                info,
                also,
                &|n| pb.inc(n),
            )?);
        } else if let Some(h) = hc.as_mut() {
            let t0 = std::time::Instant::now();
            crate::runtime::observe_streamed(ck, pass_dtype(device), device, &chunks, h, &|n| {
                pb.inc(n)
            })?;
            out.info = Some(CalibInfo {
                source: src.label.clone(),
                sha256: src.sha256.clone(),
                samples: chunks.len(),
                seq_len: o.spec.seq_len,
                tokens: chunks.iter().map(Vec::len).sum(),
                shuffle_seed: o.spec.shuffle,
                wall_s: t0.elapsed().as_secs_f64(),
                fingerprint: dataset::fingerprint(&chunks),
            });
        }
        pb.finish_and_clear();
        crate::runtime::release_free_memory();
        out.hessians = hc.map(|h| h.finish(&chunks));
        out.passes = 1;
    }
    if let (Some(p), Some(st)) = (&o.save, &out.stats) {
        st.save(p)?;
    }
    if let Some(st) = &out.stats {
        out.info = Some(st.info.clone());
    }
    Ok(out)
}

/// The matmul dtype of a calibration pass on `device` (see [`calibrate_for`]).
pub fn pass_dtype(device: &candle_core::Device) -> candle_core::DType {
    if device.is_cpu() {
        candle_core::DType::BF16
    } else {
        candle_core::DType::F32
    }
}

/// Produces calibration statistics for checkpoint `ck` ([`calibrate_for`] with statistics
/// only).
pub fn calibrate(
    ck: &Checkpoint,
    o: &CalibOptions,
    device: &candle_core::Device,
) -> Result<CalibStats> {
    let needs = Needs {
        stats: true,
        hessians: false,
    };
    Ok(calibrate_for(ck, o, needs, device)?
        .stats
        .expect("statistics were asked for"))
}
