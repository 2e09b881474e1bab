//! Leaf kernels and types shared by every format: element types, dtype conversion, FP8
//! rounding, the seeded generator.
pub mod convert;
pub mod dgemm;
pub mod dtype;
pub mod fp8;
pub mod real;
pub mod rng;

pub use dtype::Dtype;
pub use real::Real;

/// `x.round_ties_even()`, bit for bit, without the libm call that baseline x86-64 makes for it:
/// below 2^22 in magnitude, adding and subtracting 1.5 · 2^23 rounds in the FPU (IEEE addition
/// rounds half to even) and the sign is put back (for results of zero); larger values, infinities
/// and NaN take the call. Checked against the call for every f32 by a test.
#[inline(always)]
pub fn round_even(x: f32) -> f32 {
    if x.abs() < 4_194_304.0 {
        round_even_small(x)
    } else {
        x.round_ties_even()
    }
}

/// [`round_even`] without the branch, for `|x| < 2^22` only (callers that bound `x` first, so
/// the loop around them vectorizes).
#[inline(always)]
pub fn round_even_small(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0;
    ((x + MAGIC) - MAGIC).copysign(x)
}

/// Lowercase hex of a byte string.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    /// Every f32 bit pattern, in parallel: the same bits as `round_ties_even` (NaN: any NaN).
    #[test]
    fn round_even_is_round_ties_even_for_every_f32() {
        use rayon::prelude::*;
        let bad = (0u32..=u16::MAX as u32)
            .into_par_iter()
            .map(|hi| {
                (0u32..=u16::MAX as u32)
                    .filter(|lo| {
                        let x = f32::from_bits(hi << 16 | lo);
                        let (a, b) = (super::round_even(x), x.round_ties_even());
                        !(a.to_bits() == b.to_bits() || (a.is_nan() && b.is_nan()))
                    })
                    .count()
            })
            .sum::<usize>();
        assert_eq!(bad, 0);
    }
}
