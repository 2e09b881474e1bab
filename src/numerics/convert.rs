//! Element conversions between the float formats of a checkpoint and f32.
//!
//! Row-chunked with rayon; each output element depends only on its input element, so results
//! are identical for any thread count.

use half::{bf16, f16};
use rayon::prelude::*;

use crate::numerics::dtype::Dtype;

const CHUNK: usize = 1 << 16;

/// Little-endian `bytes` of `dtype` widened to f32; `None` for non-float dtypes.
pub fn to_f32(bytes: &[u8], dtype: Dtype) -> Option<Vec<f32>> {
    let n = bytes.len() / dtype.size();
    let mut out = vec![0f32; n];
    let es = dtype.size();
    if !matches!(dtype, Dtype::BF16 | Dtype::F16 | Dtype::F32) {
        return None;
    }
    out.par_chunks_mut(CHUNK)
        .zip(bytes.par_chunks(CHUNK * es))
        .for_each(|(o, b)| match dtype {
            Dtype::BF16 => bf16_block(b, o),
            Dtype::F16 => {
                for (x, e) in o.iter_mut().zip(b.chunks_exact(2)) {
                    *x = f16::from_le_bytes([e[0], e[1]]).to_f32();
                }
            }
            _ => {
                for (x, e) in o.iter_mut().zip(b.chunks_exact(4)) {
                    *x = f32::from_le_bytes([e[0], e[1], e[2], e[3]]);
                }
            }
        });
    Some(out)
}

multiversion! {
    /// bf16 → f32 of a block: the bits shifted into the high half, NaNs quieted as `half`
    /// does (so the result equals `bf16::to_f32` for every input; tested exhaustively).
    fn bf16_block(b: &[u8], o: &mut [f32]) {
        for (x, e) in o.iter_mut().zip(b.chunks_exact(2)) {
            let h = u16::from_le_bytes([e[0], e[1]]) as u32;
            let nan = (h & 0x7FFF) > 0x7F80;
            *x = f32::from_bits((h << 16) | if nan { 0x0040_0000 } else { 0 });
        }
    }
}

/// f32 values rounded to bf16 (round to nearest even, as `half` does) as little-endian bytes.
/// The flat index of the first value of little-endian `bytes` (of `dtype`) that is NaN or
/// infinite; `None` when all are finite or the dtype has no such values (integers, FP8 E4M3's
/// NaN is checked too).
pub fn first_nonfinite(bytes: &[u8], dtype: Dtype) -> Option<usize> {
    // (bytes per value, exponent mask, value reader); a value is non-finite when its exponent
    // bits are all ones.
    fn scan(bytes: &[u8], size: usize, bad: impl Fn(&[u8]) -> bool + Sync) -> Option<usize> {
        const CHUNK: usize = 1 << 20;
        let chunk = bytes
            .par_chunks(CHUNK * size)
            .position_first(|c| c.chunks_exact(size).any(&bad))?;
        let c = &bytes[chunk * CHUNK * size..];
        let i = c.chunks_exact(size).position(&bad)?;
        Some(chunk * CHUNK + i)
    }
    match dtype {
        Dtype::BF16 => scan(bytes, 2, |b| {
            u16::from_le_bytes([b[0], b[1]]) & 0x7f80 == 0x7f80
        }),
        Dtype::F16 => scan(bytes, 2, |b| {
            u16::from_le_bytes([b[0], b[1]]) & 0x7c00 == 0x7c00
        }),
        Dtype::F32 => scan(bytes, 4, |b| {
            u32::from_le_bytes([b[0], b[1], b[2], b[3]]) & 0x7f80_0000 == 0x7f80_0000
        }),
        Dtype::F64 => scan(bytes, 8, |b| {
            u64::from_le_bytes(b.try_into().expect("8")) & 0x7ff0_0000_0000_0000
                == 0x7ff0_0000_0000_0000
        }),
        Dtype::F8E4M3 => scan(bytes, 1, |b| b[0] & 0x7f == 0x7f),
        _ => None,
    }
}

/// The largest magnitude among little-endian float `bytes` of `dtype` (NaNs skipped); `None`
/// for non-float dtypes. Order-free, so the same for any thread count.
pub fn absmax(bytes: &[u8], dtype: Dtype) -> Option<f32> {
    let es = dtype.size();
    if !matches!(dtype, Dtype::BF16 | Dtype::F16 | Dtype::F32) {
        return None;
    }
    Some(
        bytes
            .par_chunks(CHUNK * es)
            .map(|b| {
                b.chunks_exact(es).fold(0f32, |m, e| {
                    let v = match dtype {
                        Dtype::BF16 => bf16::from_le_bytes([e[0], e[1]]).to_f32(),
                        Dtype::F16 => f16::from_le_bytes([e[0], e[1]]).to_f32(),
                        _ => f32::from_le_bytes([e[0], e[1], e[2], e[3]]),
                    };
                    m.max(v.abs())
                })
            })
            .reduce(|| 0f32, f32::max),
    )
}

pub fn f32_to_bf16_bytes(src: &[f32]) -> Vec<u8> {
    let mut out = vec![0u8; src.len() * 2];
    out.par_chunks_mut(CHUNK * 2)
        .zip(src.par_chunks(CHUNK))
        .for_each(|(o, s)| {
            for (d, &x) in o.chunks_exact_mut(2).zip(s) {
                d.copy_from_slice(&bf16::from_f32(x).to_le_bytes());
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_widening_equals_half_for_every_bit_pattern() {
        let all: Vec<u8> = (0..=u16::MAX).flat_map(|b| b.to_le_bytes()).collect();
        let f = to_f32(&all, Dtype::BF16).unwrap();
        for (b, x) in (0..=u16::MAX).zip(&f) {
            assert_eq!(
                x.to_bits(),
                bf16::from_bits(b).to_f32().to_bits(),
                "{b:#06x}"
            );
        }
    }

    #[test]
    fn bf16_round_trip_is_exact_for_every_bf16_value() {
        // Every finite bf16 widened to f32 and narrowed back must be itself.
        let all: Vec<u8> = (0..=u16::MAX)
            .filter(|&b| bf16::from_bits(b).is_finite())
            .flat_map(|b| b.to_le_bytes())
            .collect();
        let f = to_f32(&all, Dtype::BF16).unwrap();
        assert_eq!(f32_to_bf16_bytes(&f), all);
    }
}

#[cfg(test)]
mod nonfinite_tests {
    use super::*;

    #[test]
    fn first_nonfinite_finds_nan_and_inf_in_every_float_dtype() {
        let n = (1 << 20) + 5;
        for (dtype, size, bad) in [
            (Dtype::BF16, 2, 0x7fc0u64),
            (Dtype::BF16, 2, 0xff80),
            (Dtype::F16, 2, 0x7c00),
            (Dtype::F32, 4, 0x7f80_0001),
            (Dtype::F64, 8, 0xfff0_0000_0000_0000),
        ] {
            let b = vec![0u8; n * size];
            assert_eq!(first_nonfinite(&b, dtype), None);
            for at in [0, 7, n - 1] {
                let mut c = b.clone();
                c[at * size..(at + 1) * size].copy_from_slice(&bad.to_le_bytes()[..size]);
                assert_eq!(first_nonfinite(&c, dtype), Some(at), "{dtype} at {at}");
            }
        }
        // The largest finite values are not flagged.
        assert_eq!(first_nonfinite(&0x7f7fu16.to_le_bytes(), Dtype::BF16), None);
        assert_eq!(first_nonfinite(&f32::MAX.to_le_bytes(), Dtype::F32), None);
        assert_eq!(first_nonfinite(&0x7bffu16.to_le_bytes(), Dtype::F16), None);
    }
}
