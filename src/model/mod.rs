//! Reading Hugging Face Llama checkpoints: config, weights, tokenizer, tensor names; and writing
//! synthetic ones.
pub mod checkpoint;
pub mod config;
pub mod names;
pub mod synth;
pub mod tokenizer;

pub use checkpoint::{Checkpoint, Dtype};
pub use config::{LlamaConfig, RopeScaling};
pub use tokenizer::Tokenizer;
