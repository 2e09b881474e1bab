//! Our own Llama-3.x forward pass on candle: every position's logits, a KV cache for generation,
//! and hooks through which calibration observes each linear layer's input.
pub mod device;
pub mod gemm;
pub mod linear;
pub mod llama;
pub mod load;

pub use device::pick_device;
pub use linear::Linear;
pub use llama::{observe_streamed, Block, KvCache, Llama, LoadOptions, Observer, Streamed};
pub use load::Source;
