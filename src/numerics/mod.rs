//! Slice kernels shared by every format: dtype conversion now, quantizers later.
pub mod convert;
pub mod fp8;
pub mod rng;
