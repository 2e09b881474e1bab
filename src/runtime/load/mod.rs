//! Artifact decoding for the runner: one file per source format, each turning what it stores into
//! the runner's blocks, embedding and head. The forward pass (`runtime::llama`) never looks at
//! tensor names, dtypes or quantization layouts; a new format is one more [`Source`].
//!
//! Every source hands out one block at a time ([`Source::block`]) and can drop the pages it read
//! ([`Source::release_block`]), so the runner can hold a whole model (generation) or stream it
//! block by block over many chunks (perplexity, KL-divergence, calibration).

pub mod gguf;
pub mod safetensors;
pub mod source;

pub use source::{dense_block, stream_dtype, LoadOptions, Source};

use std::path::Path;

use crate::error::Result;

/// Opens a checkpoint folder (bf16, FP8 or INT8 safetensors) or a GGUF file.
pub fn open(path: &Path) -> Result<Box<dyn Source>> {
    if path.is_file() {
        Ok(Box::new(gguf::GgufSource::open(path)?))
    } else {
        Ok(Box::new(safetensors::SafetensorsSource::new(
            std::sync::Arc::new(crate::scheme::open(path)?),
        )))
    }
}
