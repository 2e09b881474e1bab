//! What a scheme's encoder is given: the layer and the run's methods ([`LinearCtx`]), the
//! calibration it asked for ([`Statistics`], the block's smoothing, GPTQ factors), where its
//! tensors go ([`Out`]), and what the targets of one run share ([`Shared`]).

use std::collections::BTreeMap;

use super::{Methods, Target};
use crate::error::{Error, Result};
use crate::format::safetensors::ShardedWriter;
use crate::model::names::{InputSite, LinearRole};
use crate::quant::fp8::{Fp8Matrix, ScaleStyle};
use crate::quant::gptq::Plan;
use crate::quant::smoothquant::LayerSmoothing;

/// The calibration statistics an encoder reads, per block and input site.
pub trait Statistics: Sync {
    /// `E[x²]` per input column of `site` in block `layer`.
    fn mean_sq(&self, layer: usize, site: InputSite) -> Vec<f64>;
    /// The largest input magnitude seen at `site` of block `layer`.
    fn input_absmax(&self, layer: usize, site: InputSite) -> f32;
    /// The largest key and value magnitudes of block `layer` (after RoPE for keys).
    fn kv_absmax(&self, layer: usize) -> (f32, f32);
}

/// What writing one linear weight needs to know.
pub struct LinearCtx<'a> {
    pub m: &'a Methods,
    pub stats: Option<&'a dyn Statistics>,
    pub smooth: Option<&'a LayerSmoothing>,
    pub name: &'a str,
    pub shape: &'a [usize],
    pub layer: usize,
    pub role: LinearRole,
    /// The largest weight magnitude among the layers sharing this layer's input (NVFP4).
    pub group_absmax: Option<f32>,
}

impl LinearCtx<'_> {
    /// The statistics, which target `t` needs here.
    pub fn stats(&self, t: Target) -> Result<&dyn Statistics> {
        self.stats
            .ok_or_else(|| Error::Internal(format!("{t} without its calibration statistics")))
    }

    /// The block's smoothing, which target `t` needs here.
    pub fn smooth(&self, t: Target) -> Result<&LayerSmoothing> {
        self.smooth
            .ok_or_else(|| Error::Internal(format!("{t} without its block's smoothing")))
    }
}

/// Where one checkpoint target's tensors go.
pub struct Out<'a> {
    pub target: Target,
    pub writer: &'a mut ShardedWriter,
    /// Relative RMS error of each written weight.
    pub errors: &'a mut BTreeMap<String, f64>,
}

impl Out<'_> {
    pub fn write(&mut self, name: &str, bytes: &[u8]) -> Result<()> {
        self.writer.write(name, bytes)
    }

    pub fn error(&mut self, name: &str, e: f64) {
        self.errors.insert(name.to_owned(), e);
    }
}

/// What one linear layer's encoders share within a run: FP8 weights per scale layout, GPTQ
/// factors.
pub struct Shared<'a> {
    pub fp8: Vec<(ScaleStyle, Fp8Matrix, f64)>,
    pub gptq: &'a mut GptqCache,
}

/// Which GPTQ factor a target rounds with.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum PlanKind {
    /// FP8 weights: plain GPTQ.
    Fp8,
    /// W4A16: the off-diagonal shrunk (`W4A16_GPTQ_SHRINK`).
    W4,
    /// INT8 W8A8: the second moments of the smoothed input.
    Int8,
}

/// The second moments of the input site being written and the GPTQ factors made from them:
/// q/k/v (and gate/up) share one input, so one factor per kind serves the whole group, and
/// targets of one run share the mean.
#[derive(Default)]
pub struct GptqCache {
    key: Option<(usize, InputSite)>,
    /// `E[x xᵀ]` in f32 (0.82 GB at a 14336-wide input), beside the f32 factor made from it.
    mean: Vec<f32>,
    plans: Vec<(PlanKind, Plan<f32>)>,
}

impl GptqCache {
    /// Moves to `site` of block `layer`; `take` gives that site's mean second moments (asked
    /// once per site, after the previous site's matrices are dropped).
    pub fn load(&mut self, layer: usize, site: InputSite, take: impl FnOnce() -> Vec<f32>) {
        if self.key != Some((layer, site)) {
            // The previous site's matrices go first, so two are never held at once.
            self.plans.clear();
            self.mean = Vec::new();
            self.mean = take();
            self.key = Some((layer, site));
        }
    }

    pub(crate) fn plan(
        &mut self,
        kind: PlanKind,
        cols: usize,
        smooth: Option<&[f32]>,
    ) -> Result<(&Plan<f32>, &[f32])> {
        if self.mean.is_empty() {
            return Err(Error::Internal(
                "GPTQ factor asked for before its site".into(),
            ));
        }
        if !self.plans.iter().any(|(k, _)| *k == kind) {
            let (mean, f) = (&self.mean, |j: usize| smooth.map_or(1.0, |s| s[j] as f64));
            let (shrink, scaled) = match kind {
                PlanKind::Fp8 => (0.0, false),
                PlanKind::W4 => (crate::quant::int8::W4A16_GPTQ_SHRINK, false),
                // Second moments of the smoothed input x/s.
                PlanKind::Int8 => (0.0, true),
            };
            let h = |i: usize, j: usize| {
                let v = mean[i * cols + j] as f64;
                if scaled {
                    v / (f(i) * f(j))
                } else {
                    v
                }
            };
            // The factor in f32, as llm-compressor computes it; where rounding makes the
            // damped matrix look indefinite in f32, in f64 and then rounded to f32.
            let p = match Plan::<f32>::from_fn(cols, 0.01, shrink, h) {
                Ok(p) => p,
                Err(_) => Plan::<f64>::from_fn(cols, 0.01, shrink, h)?.convert(),
            };
            self.plans.push((kind, p));
        }
        let p = &self.plans.iter().find(|(k, _)| *k == kind).expect("made").1;
        Ok((p, &self.mean))
    }
}

pub(crate) fn bf16_bytes(v: &[f32]) -> Vec<u8> {
    crate::numerics::convert::f32_to_bf16_bytes(v)
}

pub(crate) fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}
