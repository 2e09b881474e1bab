//! File formats we write and read ourselves: GGUF v3 (imatrix files now, models later) and small
//! safetensors files.
pub mod gguf;
pub mod safetensors_out;
