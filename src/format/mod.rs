//! The file formats we read and write ourselves, below the model layer (they know bytes,
//! dtypes and headers, not Llama): safetensors (reader, writers, shard planner) and GGUF v3
//! (reader, writer, key and type tables, the Llama row permutation).
pub mod gguf;
pub mod safetensors;
pub mod text;
