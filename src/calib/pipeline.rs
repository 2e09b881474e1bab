//! Calibration one block at a time, for the export's block pipeline: the calibration chunks'
//! hidden states stay in memory, each block is run over all of them when the export reaches it,
//! and only that block's statistics and second moments are gathered. After the export has
//! quantized the block, its outputs become the next block's inputs: the bf16 block's
//! (`--calib-inputs original`) or the quantized block's (`quantized`, as GPTQ's paper and
//! llm-compressor's sequential pipeline calibrate).
//!
//! Memory is one block's weights and second moments plus the hidden states (`samples × seq_len
//! × hidden × 4` bytes: 268 MB for 32 × 512 tokens of a 4096-wide model), whatever the depth.

use std::time::Instant;

use candle_core::Device;

use super::dataset::{self, calibration_chunks, load_source};
use super::hessian::BlockHessians;
use super::stats::{CalibInfo, CalibStats, LayerStats};
use super::{pass_dtype, CalibOptions, Needs};
use crate::error::{Error, Result};
use crate::model::names::InputSite;
use crate::model::{Checkpoint, Tokenizer};
use crate::runtime::{Block, LoadOptions, Observer, Source, Streamed};

/// What each block is calibrated on (`--calib-inputs`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CalibInputs {
    /// The outputs of the bf16 blocks before it.
    Original,
    /// The outputs of the already-quantized blocks before it.
    Quantized,
}

impl CalibInputs {
    pub fn name(self) -> &'static str {
        match self {
            CalibInputs::Original => "original",
            CalibInputs::Quantized => "quantized",
        }
    }
}

/// What the calibration carries between blocks, as a journal records it (files in the
/// journal's folder).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct CalibCheckpoint {
    pub next_block: usize,
    /// The hidden states entering `next_block`.
    pub hidden: Option<String>,
    /// The statistics recorded so far (when this pass records them).
    pub stats: Option<String>,
    /// Seconds spent running blocks so far.
    pub wall_s: f64,
}

/// One block's observer: its statistics and second moments, nothing of other blocks.
struct BlockObserver<'s> {
    layer: usize,
    stats: Option<&'s mut LayerStats>,
    hessians: Option<&'s mut BlockHessians>,
}

impl Observer for BlockObserver<'_> {
    fn linear_input(&mut self, layer: usize, site: InputSite, x: &[f32]) -> Result<()> {
        if layer != self.layer {
            return Err(Error::Internal(format!(
                "block {layer} observed while calibrating block {}",
                self.layer
            )));
        }
        if let Some(h) = self.hessians.as_deref_mut() {
            h.add(site, x)?;
        }
        if let Some(s) = self.stats.as_deref_mut() {
            s.add_linear(site, x);
        }
        Ok(())
    }

    fn kv(&mut self, _layer: usize, k: &[f32], v: &[f32]) -> Result<()> {
        if let Some(s) = self.stats.as_deref_mut() {
            s.add_kv(k, v);
        }
        Ok(())
    }
}

/// Calibration advanced block by block as the export asks for it.
pub struct BlockCalibration<'a> {
    ck: &'a Checkpoint,
    /// The calibration chunks' hidden states; `None` when nothing needs a pass.
    stream: Option<Streamed<'a>>,
    stats: Option<CalibStats>,
    /// Statistics are recorded by this pass (not loaded).
    record_stats: bool,
    want_hessians: bool,
    hessians: Option<BlockHessians>,
    /// The block whose statistics are current.
    observed: Option<usize>,
    inputs: CalibInputs,
    /// Seconds spent running blocks.
    wall_s: f64,
    info: Option<CalibInfo>,
    save: Option<std::path::PathBuf>,
    /// Tokens × blocks observed, through the whole model.
    bar: indicatif::ProgressBar,
}

impl<'a> BlockCalibration<'a> {
    /// Loads statistics (`--load-calib`) or prepares a pass over the calibration text for what
    /// `needs` asks; the text is tokenized and embedded here, the blocks run later.
    pub fn start(
        ck: &'a Checkpoint,
        src: &'a dyn Source,
        o: &CalibOptions,
        needs: Needs,
        inputs: CalibInputs,
        device: &Device,
    ) -> Result<Self> {
        let mut stats = None;
        if needs.stats {
            if let Some(p) = &o.load {
                stats = Some(CalibStats::load(p, &ck.config)?);
            }
        }
        let record_stats = needs.stats && stats.is_none();
        let mut info = stats.as_ref().map(|s: &CalibStats| s.info.clone());
        let mut stream = None;
        if record_stats || needs.hessians {
            let text = load_source(o.calib.as_deref())?;
            let tok = Tokenizer::load(&ck.dir)?;
            let chunks = calibration_chunks(&tok, &text, &o.spec)?;
            let run_info = CalibInfo {
                source: text.label.clone(),
                sha256: text.sha256.clone(),
                samples: chunks.len(),
                seq_len: o.spec.seq_len,
                tokens: chunks.iter().map(Vec::len).sum(),
                shuffle_seed: o.spec.shuffle,
                wall_s: 0.0,
                fingerprint: dataset::fingerprint(&chunks),
            };
            if record_stats {
                stats = Some(CalibStats::empty(&ck.config, run_info.clone()));
            }
            info = Some(run_info);
            let refs: Vec<&[u32]> = chunks.iter().map(Vec::as_slice).collect();
            let t = chunks.iter().map(Vec::len).max().unwrap_or(1).max(1);
            let batch = (crate::runtime::llama::OBSERVE_ROWS / t).max(1);
            let spill = crate::runtime::spill::SpillSpec {
                dir: o.spill_dir.clone(),
                budget_bytes: o.hidden_budget_bytes,
            };
            let s = Streamed::with_spill(
                src,
                pass_dtype(device),
                device,
                LoadOptions::default(),
                &refs,
                batch,
                Some(&spill),
            )?;
            if s.spilled_bytes() > 0 {
                crate::progress::note(&format!(
                    "calibration hidden states: {:.2} GB, more than the {} MiB budget (--calib-hidden-mib); kept in a temporary file in {} instead",
                    s.spilled_bytes() as f64 / 1e9,
                    o.hidden_budget_bytes >> 20,
                    o.spill_dir.display()
                ));
            }
            stream = Some(s);
        }
        let layers = ck.config.num_hidden_layers as u64;
        let tokens = info.as_ref().map_or(0, |i| i.tokens as u64);
        let bar = if stream.is_some() {
            crate::progress::bar(
                tokens * layers,
                "calibrate",
                crate::progress::Unit::Tokens { passes: layers },
            )
        } else {
            indicatif::ProgressBar::hidden()
        };
        Ok(BlockCalibration {
            bar,
            ck,
            stream,
            stats,
            record_stats,
            want_hessians: needs.hessians,
            hessians: None,
            observed: None,
            inputs,
            wall_s: 0.0,
            info,
            save: o.save.clone(),
        })
    }

    /// What the calibration is (its text, chunks and tokens), when there is one.
    pub fn info(&self) -> Option<&CalibInfo> {
        self.info.as_ref()
    }

    /// Whether a pass over calibration text runs.
    pub fn runs(&self) -> bool {
        self.stream.is_some()
    }

    /// Whether [`Self::finish_block`] wants the quantized block.
    pub fn wants_quantized_block(&self) -> bool {
        self.stream.is_some() && self.inputs == CalibInputs::Quantized
    }

    /// The matmul dtype and device a quantized block for [`Self::finish_block`] is built with.
    pub fn block_dtype_device(&self) -> Option<(candle_core::DType, &Device)> {
        self.stream.as_ref().map(|s| s.dtype_device())
    }

    /// Runs block `layer` over the calibration chunks (once), gathering its statistics and
    /// second moments. Blocks must be asked for in order.
    pub fn prepare(&mut self, layer: usize) -> Result<()> {
        let Some(stream) = self.stream.as_mut() else {
            return Ok(());
        };
        if self.observed == Some(layer) {
            return Ok(());
        }
        if stream.next_index() != layer {
            return Err(Error::Internal(format!(
                "calibration asked for block {layer} while block {} is next",
                stream.next_index()
            )));
        }
        let t0 = Instant::now();
        let blk = stream.next_stored()?;
        self.hessians = self
            .want_hessians
            .then(|| BlockHessians::new(&self.ck.config, layer));
        let mut obs = BlockObserver {
            layer,
            stats: match (self.record_stats, self.stats.as_mut()) {
                (true, Some(s)) => Some(&mut s.layers[layer]),
                _ => None,
            },
            hessians: self.hessians.as_mut(),
        };
        // With original inputs the bf16 block's outputs are the next block's inputs; with
        // quantized inputs they wait for the quantized block (`finish_block`).
        let commit = self.inputs == CalibInputs::Original;
        let bar = &self.bar;
        stream.run(&blk, Some(&mut obs), commit, &|n| bar.inc(n))?;
        drop(blk);
        // The block's weights and activations are free now: give them back before the export
        // quantizes (the runner keeps freed buffers in the heap otherwise).
        crate::runtime::release_free_memory();
        self.observed = Some(layer);
        self.wall_s += t0.elapsed().as_secs_f64();
        Ok(())
    }

    /// The statistics (of every block prepared so far, or loaded).
    pub fn stats(&self) -> Option<&CalibStats> {
        self.stats.as_ref()
    }

    /// The current block's second moments.
    pub fn hessians(&mut self) -> Option<&mut BlockHessians> {
        self.hessians.as_mut()
    }

    /// Block `layer` is written: its second moments and activation samples go, and with
    /// quantized inputs `quantized` (the block as its codes stand) runs over the chunks to make
    /// the next block's inputs.
    pub fn finish_block(&mut self, layer: usize, quantized: Option<Block>) -> Result<()> {
        self.hessians = None;
        if layer + 1 >= self.ck.config.num_hidden_layers {
            self.bar.finish_and_clear();
        }
        if let Some(s) = self.stats.as_mut().filter(|_| self.record_stats) {
            s.layers[layer].samples = Default::default();
        }
        let Some(stream) = self.stream.as_mut() else {
            return Ok(());
        };
        if self.inputs == CalibInputs::Quantized && stream.next_index() == layer {
            let blk = quantized.ok_or_else(|| {
                Error::Internal(format!("block {layer}: no quantized block to propagate"))
            })?;
            let t0 = Instant::now();
            stream.run(&blk, None, true, &|_| ())?;
            self.wall_s += t0.elapsed().as_secs_f64();
        }
        crate::runtime::release_free_memory();
        Ok(())
    }

    /// Saves what the calibration carries from one block to the next (the hidden states
    /// entering the next block, the statistics recorded so far, the time spent) into folder
    /// `dir`, between two blocks, for [`Self::restore_state`].
    pub fn save_state(&self, dir: &std::path::Path) -> Result<CalibCheckpoint> {
        let Some(stream) = self.stream.as_ref() else {
            return Ok(CalibCheckpoint::default());
        };
        if self.hessians.is_some() {
            return Err(Error::Internal(
                "calibration state saved inside a block".into(),
            ));
        }
        let next = stream.next_index();
        let hidden = format!("hidden-{next}.safetensors");
        stream.save(&dir.join(&hidden))?;
        let stats = match (&self.stats, self.record_stats) {
            (Some(st), true) => {
                let name = format!("stats-{next}.safetensors");
                st.save(&dir.join(&name))?;
                Some(name)
            }
            _ => None,
        };
        Ok(CalibCheckpoint {
            next_block: next,
            hidden: Some(hidden),
            stats,
            wall_s: self.wall_s,
        })
    }

    /// Continues from what [`Self::save_state`] saved in `dir`: the pass goes on at the saved
    /// block with the saved hidden states and statistics.
    pub fn restore_state(&mut self, dir: &std::path::Path, c: &CalibCheckpoint) -> Result<()> {
        let Some(stream) = self.stream.as_mut() else {
            return Ok(());
        };
        let hidden = c.hidden.as_ref().ok_or_else(|| {
            Error::format(
                dir,
                "the journal holds no calibration hidden states, this run needs them",
            )
        })?;
        stream.restore(&dir.join(hidden), c.next_block)?;
        if let Some(name) = &c.stats {
            if self.record_stats {
                self.stats = Some(CalibStats::load(&dir.join(name), &self.ck.config)?);
            }
        }
        self.wall_s = c.wall_s;
        let tokens = self.info.as_ref().map_or(0, |i| i.tokens as u64);
        self.bar.set_position(tokens * c.next_block as u64);
        Ok(())
    }

    /// The statistics and the record of the pass (saved with `--save-calib`).
    pub fn finish(self) -> Result<(Option<CalibStats>, Option<CalibInfo>)> {
        self.bar.finish_and_clear();
        let mut info = self.info;
        let mut stats = self.stats;
        if self.stream.is_some() {
            if let Some(i) = info.as_mut() {
                i.wall_s = self.wall_s;
            }
            if let (Some(s), Some(i)) = (stats.as_mut().filter(|_| self.record_stats), &info) {
                s.info = i.clone();
            }
        }
        if let (Some(p), Some(st)) = (&self.save, &stats) {
            st.save(p)?;
        }
        Ok((stats, info))
    }
}
