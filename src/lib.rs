//! minitron: turns a bf16 Llama-3.x Hugging Face checkpoint into deployable quantized artifacts
//! and measures each one against the original.
//!
//! Layers, each importing only those below it:
//! [`numerics`] (dtypes, conversion, FP8 rounding) → [`format`](mod@format) (safetensors and GGUF files) →
//! [`model`] (config, checkpoint, tensor names, tokenizer, synthetic checkpoints) → [`quant`]
//! (quantizers and llama-quantize's mixes, on plain statistics) → [`scheme`] (each checkpoint
//! format's tensors, config entry, checks, decode and encode, and the `--to` targets) →
//! [`runtime`] (our Llama-3.x
//! forward pass: loaders, kernels, calibration hooks) → [`calib`] (activation statistics,
//! second moments, importance matrices: one calibration) → [`export`](mod@export) (`minitron-convert`: every
//! target from one read) and [`verify`] (`minitron-verify`: perplexity, KL-divergence, top-1
//! agreement, greedy parity). [`inspect`] describes checkpoints and GGUF files.
//! The formats we read and write are specified in the repository's `formats/` folder.

#[macro_use]
pub mod simd;

pub mod automix;
pub mod calib;
pub mod error;
pub mod export;
pub mod format;
pub mod inspect;
pub mod model;
pub mod numerics;
pub mod plot;
pub mod progress;
pub mod quant;
pub mod runtime;
pub mod scheme;
pub mod verify;

pub use error::{Error, Result};

/// Version string recorded in reports and manifests.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
