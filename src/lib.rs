//! minitron: turns a bf16 Llama-3.x Hugging Face checkpoint into deployable quantized artifacts
//! and measures each one against the original.
//!
//! Data flows one way:
//! [`model`] reads a checkpoint (config, memory-mapped safetensors, tokenizer) →
//! [`runtime`] runs it (our own Llama-3.x forward pass, with calibration hooks) →
//! [`verify`] measures perplexity, KL-divergence, top-1 agreement and greedy parity.
//! The formats we read and write are specified in the repository's `formats/` folder.

#[macro_use]
pub mod simd;

pub mod calib;
pub mod error;
pub mod export;
pub mod format;
pub mod inspect;
pub mod model;
pub mod numerics;
pub mod progress;
pub mod quant;
pub mod runtime;
pub mod verify;

pub use error::{Error, Result};

/// Version string recorded in reports and manifests.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
