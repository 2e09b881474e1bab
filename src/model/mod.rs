//! Reading Hugging Face Llama checkpoints: config, weights, tokenizer, tensor names; and writing
//! synthetic ones.
pub mod checkpoint;
pub mod config;
pub mod gguf_vocab;
pub mod names;
pub mod synth;
pub mod tokenizer;

pub use checkpoint::{Checkpoint, Dtype};
pub use config::{LlamaConfig, RopeScaling};
pub use tokenizer::Tokenizer;

/// The built-in calibration corpus: the project's own writing (prose, dialogue, code, lists,
/// arithmetic). It also trains the byte-level BPE of synthetic checkpoints.
pub const DEFAULT_CORPUS: &str = include_str!("default_corpus.txt");
