//! FP8 E4M3 (the `e4m3fn` variant: bias 7, no infinities, NaN = S.1111.111, max ±448).
//!
//! We define the maximum ourselves: the `float8` crate's `F8E4M3::MAX` constant is wrong (416).
//! Spec: formats/fp8.md#e4m3.

use half::bf16;
use rayon::prelude::*;

/// Largest finite E4M3 magnitude.
pub const E4M3_MAX: f32 = 448.0;

/// Smallest per-token scale vLLM uses for dynamic FP8 activations (1 / (448 · 512)).
pub const FP8_MIN_TOKEN_SCALE: f32 = 1.0 / (448.0 * 512.0);

/// Rounds `x` to the nearest E4M3 value (ties to even) and returns its code. Finite values
/// beyond ±448 and infinities saturate to ±448, which is what clamping to ±448 before a
/// non-saturating cast gives; NaN maps to the NaN code with the input's sign.
#[inline]
pub fn f32_to_e4m3(x: f32) -> u8 {
    let sign = if x.is_sign_negative() { 0x80 } else { 0 };
    if x.is_nan() {
        return sign | 0x7F;
    }
    let a = x.abs();
    if a >= E4M3_MAX {
        return sign | 0x7E;
    }
    if a < 2f32.powi(-6) {
        // Subnormal range: multiples of 2^-9; code 8 (= 2^-6, the smallest normal) follows on.
        return sign | (a * 512.0).round_ties_even() as u8;
    }
    // Normal: keep 3 of f32's 23 mantissa bits, rounding the other 20 to nearest even. A carry
    // into the exponent is the correct result; a < 448 cannot round past 448 (the tie to the
    // next binade, 464, is above it).
    let bits = a.to_bits();
    let rounded = (bits + 0x7_FFFF + ((bits >> 20) & 1)) >> 20;
    let exp = (rounded >> 3) as i32 - 127 + 7;
    let mant = rounded & 7;
    sign | ((exp as u32) << 3 | mant) as u8
}

/// The value of an E4M3 code.
pub fn e4m3_to_f32(c: u8) -> f32 {
    let sign = if c & 0x80 != 0 { -1.0 } else { 1.0 };
    let e = ((c >> 3) & 0xF) as i32;
    let m = (c & 7) as f32;
    if e == 15 && m == 7.0 {
        return f32::NAN;
    }
    if e == 0 {
        sign * m * 2f32.powi(-9)
    } else {
        sign * (1.0 + m / 8.0) * 2f32.powi(e - 7)
    }
}

/// Decoding table for all 256 codes.
pub fn e4m3_table() -> [f32; 256] {
    let mut t = [0f32; 256];
    for (c, v) in t.iter_mut().enumerate() {
        *v = e4m3_to_f32(c as u8);
    }
    t
}

/// Rounds to bf16 and back (nearest even), the precision torch keeps in bf16 arithmetic.
#[inline]
pub fn round_bf16(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

/// Per-row absmax of a row-major `[rows, cols]` matrix (rows in parallel).
pub fn row_absmax(w: &[f32], cols: usize) -> Vec<f32> {
    w.par_chunks(cols)
        .map(|r| r.iter().fold(0f32, |m, &v| m.max(v.abs())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Straightforward reference: the nearest of the 127 non-negative finite E4M3 values by
    /// exact f64 distance, ties to the even code, saturating at 448.
    fn reference(x: f32) -> u8 {
        let sign = if x.is_sign_negative() { 0x80 } else { 0 };
        if x.is_nan() {
            return sign | 0x7F;
        }
        let a = (x as f64).abs();
        let mut best = 0u8;
        for c in 1..=0x7Eu8 {
            let (dc, db) = (
                (e4m3_to_f32(c) as f64 - a).abs(),
                (e4m3_to_f32(best) as f64 - a).abs(),
            );
            if dc < db || (dc == db && c % 2 == 0) {
                best = c;
            }
        }
        if a >= 448.0 {
            best = 0x7E;
        }
        sign | best
    }

    #[test]
    fn every_bf16_value_converts_like_the_reference() {
        for b in 0..=u16::MAX {
            let x = bf16::from_bits(b).to_f32();
            assert_eq!(f32_to_e4m3(x), reference(x), "bf16 bits {b:#06x} = {x}");
        }
    }

    #[test]
    fn a_million_random_f32_values_convert_like_the_reference() {
        let mut rng = crate::numerics::rng::SplitMix64::new(42);
        for i in 0..1_000_000u32 {
            // Mix raw bit patterns (every exponent, NaN, inf, subnormals) with values near the
            // E4M3 range, where rounding decisions are made.
            let x = if i % 2 == 0 {
                f32::from_bits(rng.next_u64() as u32)
            } else {
                (rng.unit_f32() * 2.0 - 1.0) * 2f32.powi((rng.below(24) as i32) - 12)
            };
            assert_eq!(
                f32_to_e4m3(x),
                reference(x),
                "{x:e} ({:#010x})",
                x.to_bits()
            );
        }
    }

    #[test]
    fn edge_values() {
        // Ties: halfway between 1.0 (0x38) and 1.125 (0x39) goes to the even 1.0; halfway between
        // 1.125 and 1.25 goes to 1.25 (0x3A).
        assert_eq!(f32_to_e4m3(1.0625), 0x38);
        assert_eq!(f32_to_e4m3(1.1875), 0x3A);
        // Subnormals: 2^-9 is code 1; its half ties to 0; 1.5·2^-9 ties to 2·2^-9.
        assert_eq!(f32_to_e4m3(2f32.powi(-9)), 0x01);
        assert_eq!(f32_to_e4m3(2f32.powi(-10)), 0x00);
        assert_eq!(f32_to_e4m3(1.5 * 2f32.powi(-9)), 0x02);
        // Saturation and specials.
        assert_eq!(f32_to_e4m3(448.0), 0x7E);
        assert_eq!(f32_to_e4m3(-464.0), 0xFE);
        assert_eq!(f32_to_e4m3(1e9), 0x7E);
        assert_eq!(f32_to_e4m3(f32::NEG_INFINITY), 0xFE);
        assert_eq!(f32_to_e4m3(f32::NAN), 0x7F);
        assert_eq!(f32_to_e4m3(-0.0), 0x80);
        assert_eq!(e4m3_to_f32(0x7E), 448.0);
        assert!(e4m3_to_f32(0x7F).is_nan());
    }

    #[test]
    fn candle_cast_agrees_on_every_bf16_value_in_range() {
        // The runner quantizes activations with candle's F8E4M3 cast; it must be the same
        // rounding as ours for every value that can reach it (callers clamp to ±448 first).
        let xs: Vec<f32> = (0..=u16::MAX)
            .map(|b| bf16::from_bits(b).to_f32())
            .filter(|x| x.is_finite())
            .map(|x| x.clamp(-448.0, 448.0))
            .collect();
        let t =
            candle_core::Tensor::from_vec(xs.clone(), xs.len(), &candle_core::Device::Cpu).unwrap();
        let back: Vec<f32> = t
            .to_dtype(candle_core::DType::F8E4M3)
            .unwrap()
            .to_dtype(candle_core::DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap();
        for (x, y) in xs.iter().zip(&back) {
            assert_eq!(e4m3_to_f32(f32_to_e4m3(*x)).to_bits(), y.to_bits(), "{x}");
        }
    }
}
