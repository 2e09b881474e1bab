//! Leaf kernels and types shared by every format: element types, dtype conversion, FP8
//! rounding, the seeded generator.
pub mod convert;
pub mod dgemm;
pub mod dtype;
pub mod fp8;
pub mod rng;

pub use dtype::Dtype;

/// Lowercase hex of a byte string.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
