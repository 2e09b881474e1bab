//! One transformer block's weights, the unit every loader produces and every forward pass
//! (the candle path in `llama`, the fused CPU path in `cpu`) consumes.

use candle_core::Tensor;

use crate::runtime::linear::Linear;

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
