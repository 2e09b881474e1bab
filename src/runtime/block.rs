//! One transformer block's weights, the unit every loader produces and every forward pass
//! (the candle path in `llama`, the fused CPU path in `cpu`) consumes.

use candle_core::Tensor;

use crate::error::Result;
use crate::model::names::InputSite;
use crate::runtime::linear::Linear;

/// Receives what calibration needs while the model runs, as f32 rows on the host. The model's
/// numerics never depend on what an observer does.
pub trait Observer {
    /// The rows (`[rows, width]`, row-major, chunks in order) that are about to meet the linear
    /// layers reading `site` in block `layer` (once per site: q, k and v share one input, gate
    /// and up another). `width` is [`InputSite::width`] of the model.
    fn linear_input(&mut self, layer: usize, site: InputSite, x: &[f32]) -> Result<()>;
    /// Every value of K after RoPE and of V in block `layer` (in no particular layout).
    fn kv(&mut self, _layer: usize, _k: &[f32], _v: &[f32]) -> Result<()> {
        Ok(())
    }
}

/// One transformer block's weights, as a loader (`runtime::load`) made them.
pub struct Block {
    pub(crate) input_norm: Tensor,
    pub(crate) post_norm: Tensor,
    pub(crate) q: Linear,
    pub(crate) k: Linear,
    pub(crate) v: Linear,
    pub(crate) o: Linear,
    pub(crate) gate: Linear,
    pub(crate) up: Linear,
    pub(crate) down: Linear,
    /// Static FP8 KV-cache scales (k, v), when the artifact has them.
    pub(crate) kv_scales: Option<(f32, f32)>,
}
