//! Quantization recipes: which tensor becomes which type with which scales.
pub mod fp8;
pub mod ggml;
pub mod gptq;
pub mod int8;
mod kfast;
pub mod smoothquant;
