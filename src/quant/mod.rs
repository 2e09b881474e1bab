//! Quantizers (FP8, INT8, NVFP4, SmoothQuant, GPTQ, ggml blocks) and llama-quantize's mix recipes:
//! which tensor becomes which type with which scales. They take plain statistics, never
//! calibration's own types.
pub mod fp8;
pub mod ggml;
pub mod gptq;
pub mod int8;
mod kfast;
pub mod nvfp4;
pub mod recipe;
pub mod smoothquant;
