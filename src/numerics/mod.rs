//! Slice kernels shared by every format: dtype conversion now, quantizers later.
pub mod convert;
pub mod rng;
