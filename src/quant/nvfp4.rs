//! NVFP4 (formats/nvfp4.md): FP4 E2M1 values, two per byte (low nibble first), in groups of 16
//! that share an FP8 E4M3 scale, under one f32 scale per tensor. Two producers write it and
//! each does its arithmetic its own way; [`Flavor`] names whose numbers a function reproduces:
//!
//! - compressed-tensors (llm-compressor): the tensor scale is a multiplier,
//!   `g = bf16(2688 · bf16(1 / absmax))` (stored as `weight_global_scale`; torch divides a
//!   number by a bf16 tensor through the tensor's bf16 reciprocal); a group's scale is
//!   `e4m3(g · bf16(group_absmax / 6))` (0 becomes 0.125); a value is coded from
//!   `bf16(clamp(w / (s / g), ±6))`, the sign taken from that value's sign bit.
//! - ModelOpt: the tensor scale is a divisor, `s2 = absmax / 2688` (`weight_scale_2`); a
//!   group's scale is `e4m3(group_absmax / (6 · s2))` (0 becomes 1); a value is coded from the
//!   f32 `w / (s · s2)`, negative when it is below zero.
//!
//! Both round to the nearest E2M1 value with ties to the even code (0.25 → 0, 0.75 → 1,
//! 1.25 → 1, 1.75 → 2, 2.5 → 2, 3.5 → 4, 5 → 4) and saturate at ±6.

use rayon::prelude::*;

use crate::numerics::fp8::{e4m3_to_f32, f32_to_e4m3, round_bf16, E4M3_MAX};

/// Values per FP8 scale.
pub const GROUP: usize = 16;
/// Largest E2M1 magnitude.
pub const FP4_MAX: f32 = 6.0;
/// E4M3 max × E2M1 max: the tensor scale maps the tensor's absmax onto it, so the largest
/// group scale lands at the top of the E4M3 range.
pub const SCALE_SPAN: f32 = 448.0 * 6.0;
/// E2M1 magnitudes by code (bit 3 is the sign).
pub const E2M1: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
/// The E4M3 code of 0.125, what compressed-tensors puts in place of a zero group scale.
const E4M3_EIGHTH: u8 = 0x20;
/// The E4M3 code of 1.0, what ModelOpt puts in place of a zero group scale.
const E4M3_ONE: u8 = 0x38;

/// Whose arithmetic and layout a function follows (see the module documentation):
/// compressed-tensors' (`weight_global_scale`) or ModelOpt's (`weight_scale_2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    CompressedTensors,
    ModelOpt,
}

/// Midpoints between consecutive E2M1 magnitudes, and whether a value exactly on one goes up
/// (to the even code above) rather than down.
const MIDPOINTS: [(f32, bool); 7] = [
    (0.25, false),
    (0.75, true),
    (1.25, false),
    (1.75, true),
    (2.5, false),
    (3.5, true),
    (5.0, false),
];

/// The E2M1 magnitude code of `a` ≥ 0: nearest value, ties to even, saturating at 6; NaN
/// gives 0.
#[inline]
pub fn magnitude_code(a: f32) -> u8 {
    MIDPOINTS
        .iter()
        .filter(|&&(m, up)| a > m || (up && a == m))
        .count() as u8
}

/// The signed value of a 4-bit code.
#[inline]
pub fn e2m1_value(code: u8) -> f32 {
    let v = E2M1[(code & 7) as usize];
    if code & 8 != 0 {
        -v
    } else {
        v
    }
}

/// The 4-bit code of an already scaled value under `flavor`'s rounding.
#[inline]
pub fn code(v: f32, flavor: Flavor) -> u8 {
    match flavor {
        Flavor::CompressedTensors => {
            let b = v.clamp(-FP4_MAX, FP4_MAX);
            ((b.is_sign_negative() as u8) << 3) | magnitude_code(b.abs())
        }
        Flavor::ModelOpt => (((v < 0.0) as u8) << 3) | magnitude_code(v.abs()),
    }
}

/// The per-tensor scale `flavor` stores for a tensor (or fused group: q/k/v, gate/up) whose
/// absmax is `amax`: compressed-tensors' multiplier or ModelOpt's divisor. An all-zero tensor
/// is given the scale of absmax 1 (both producers would divide by zero).
pub fn tensor_scale(amax: f32, flavor: Flavor) -> f32 {
    let a = if amax > 0.0 && amax.is_finite() {
        amax
    } else {
        1.0
    };
    match flavor {
        // torch evaluates `2688 / bf16_tensor` as the bf16 reciprocal times 2688, rounded
        // to bf16 again.
        Flavor::CompressedTensors => round_bf16(SCALE_SPAN * round_bf16(1.0 / a)),
        Flavor::ModelOpt => a / SCALE_SPAN,
    }
}

/// The activation global scale as a multiplier (what the runtime's quantizer takes) from the
/// stored one.
pub fn act_multiplier(stored: f32, flavor: Flavor) -> f32 {
    match flavor {
        Flavor::CompressedTensors => stored,
        Flavor::ModelOpt => 1.0 / stored,
    }
}

/// The activation scale `flavor` stores for inputs whose calibrated absmax is `amax`
/// (compressed-tensors' `input_global_scale`, ModelOpt's `input_scale`).
pub fn input_scale(amax: f32, flavor: Flavor) -> f32 {
    tensor_scale(amax, flavor)
}

/// One quantized `[rows, cols]` weight.
#[derive(Debug, Clone)]
pub struct Nvfp4Matrix {
    /// Two codes per byte, `[rows, cols / 2]`, element `2k` in the low nibble.
    pub packed: Vec<u8>,
    /// E4M3 codes of the group scales, `[rows, cols / 16]`.
    pub scales: Vec<u8>,
    /// The stored per-tensor scale ([`tensor_scale`]).
    pub tensor: f32,
    pub flavor: Flavor,
}

/// The E4M3 group scale code and the f32 step a value is divided by.
#[inline]
fn group_scale(amax: f32, tensor: f32, flavor: Flavor) -> (u8, f32) {
    match flavor {
        Flavor::CompressedTensors => {
            let s = (tensor * round_bf16(amax / FP4_MAX)).min(E4M3_MAX);
            let mut c = f32_to_e4m3(s);
            if c == 0 {
                c = E4M3_EIGHTH;
            }
            (c, e4m3_to_f32(c) / tensor)
        }
        Flavor::ModelOpt => {
            let s = amax / (FP4_MAX * tensor);
            let c = if s == 0.0 { E4M3_ONE } else { f32_to_e4m3(s) };
            (c, e4m3_to_f32(c) * tensor)
        }
    }
}

/// Quantizes `w` (`[rows, cols]`, `cols` a multiple of 32 so rows pack into whole bytes and
/// groups; values bf16-representable) with per-tensor scale `tensor` ([`tensor_scale`] of the
/// fused group's absmax).
pub fn quantize(w: &[f32], cols: usize, tensor: f32, flavor: Flavor) -> Nvfp4Matrix {
    assert!(
        cols.is_multiple_of(GROUP) && cols.is_multiple_of(2),
        "NVFP4 rows hold whole groups"
    );
    let rows = w.len() / cols.max(1);
    let mut packed = vec![0u8; rows * cols / 2];
    let mut scales = vec![0u8; rows * cols / GROUP];
    packed
        .par_chunks_mut(cols / 2)
        .zip(scales.par_chunks_mut(cols / GROUP))
        .zip(w.par_chunks(cols))
        .for_each(|((p, s), row)| {
            for ((pg, sc), wg) in p
                .chunks_mut(GROUP / 2)
                .zip(s.iter_mut())
                .zip(row.chunks(GROUP))
            {
                let amax = wg.iter().fold(0f32, |m, &v| m.max(v.abs()));
                let (c, step) = group_scale(amax, tensor, flavor);
                *sc = c;
                for (b, pair) in pg.iter_mut().zip(wg.chunks(2)) {
                    *b = code(pair[0] / step, flavor) | (code(pair[1] / step, flavor) << 4);
                }
            }
        });
    Nvfp4Matrix {
        packed,
        scales,
        tensor,
        flavor,
    }
}

impl Nvfp4Matrix {
    /// The multiplier of the tensor scale in a decoded value: `value = e2m1 · e4m3 · m`.
    pub fn multiplier(&self) -> f32 {
        decode_multiplier(self.tensor, self.flavor)
    }

    /// Decoded weights `[rows, cols]`.
    pub fn dequantize(&self, cols: usize) -> Vec<f32> {
        let m = self.multiplier();
        let mut v = decode_unscaled(&self.packed, &self.scales, cols);
        v.par_iter_mut().for_each(|x| *x *= m);
        v
    }

    /// RMS of the weight error over RMS of the weights.
    pub fn relative_rms(&self, w: &[f32], cols: usize) -> f64 {
        let d = self.dequantize(cols);
        // Rows in parallel, summed in order: the same bits for any thread count.
        let rows: Vec<(f64, f64)> = w
            .par_chunks(cols.max(1))
            .zip(d.par_chunks(cols.max(1)))
            .map(|(wr, dr)| {
                wr.iter().zip(dr).fold((0.0, 0.0), |(e, n), (&a, &b)| {
                    let (a, b) = (a as f64, b as f64);
                    (e + (a - b) * (a - b), n + a * a)
                })
            })
            .collect();
        let (e, n) = rows
            .iter()
            .fold((0.0, 0.0), |(e, n), &(x, y)| (e + x, n + y));
        if n > 0.0 {
            (e / n).sqrt()
        } else {
            0.0
        }
    }
}

/// The factor of the per-tensor scale in a decoded value: `1 / g` for compressed-tensors'
/// multiplier, `s2` for ModelOpt's divisor.
pub fn decode_multiplier(tensor: f32, flavor: Flavor) -> f32 {
    match flavor {
        Flavor::CompressedTensors => 1.0 / tensor,
        Flavor::ModelOpt => tensor,
    }
}

/// Packs 4-bit codes two per byte, element `2k` in the low nibble (an odd count pads with 0).
pub fn pack_codes(codes: &[u8]) -> Vec<u8> {
    codes
        .chunks(2)
        .map(|p| (p[0] & 0xF) | (p.get(1).copied().unwrap_or(0) & 0xF) << 4)
        .collect()
}

/// The 4-bit codes of packed bytes, low nibble first.
pub fn unpack_codes(bytes: &[u8]) -> Vec<u8> {
    bytes.iter().flat_map(|&b| [b & 0xF, b >> 4]).collect()
}

/// `e2m1(code) · e4m3(group scale)` for every value of packed rows (`[rows, cols / 2]` bytes,
/// `[rows, cols / 16]` scale codes): exact in bf16 (at most 6 significant bits).
pub fn decode_unscaled(packed: &[u8], scales: &[u8], cols: usize) -> Vec<f32> {
    let rows = packed.len() / (cols / 2).max(1);
    let mut out = vec![0f32; rows * cols];
    out.par_chunks_mut(cols)
        .zip(packed.par_chunks(cols / 2))
        .zip(scales.par_chunks(cols / GROUP))
        .for_each(|((o, p), s)| {
            for ((og, pg), &sc) in o.chunks_mut(GROUP).zip(p.chunks(GROUP / 2)).zip(s) {
                let f = e4m3_to_f32(sc);
                for (pair, &b) in og.chunks_mut(2).zip(pg) {
                    pair[0] = e2m1_value(b & 0xF) * f;
                    pair[1] = e2m1_value(b >> 4) * f;
                }
            }
        });
    out
}

/// One activation row quantized as the serving runtimes' NVFP4 activation quantizer does, given
/// the global scale `g` as a multiplier: per group of 16, `s = e4m3(min(g · (absmax · ⅙),
/// 448))`, the values `x · (1 / (s · (1 / g)))` clamped to ±6 and rounded to E2M1 (nearest,
/// ties to even), all in f32; a zero scale gives zeros. Writes `q · s` (exact in bf16); the
/// dequantized activation is that divided by `g`.
pub fn quantize_activation_row(x: &[f32], g: f32, out: &mut [f32]) {
    let sixth = 1.0f32 / FP4_MAX;
    let inv_g = if g == 0.0 { 0.0 } else { 1.0 / g };
    for (og, xg) in out.chunks_mut(GROUP).zip(x.chunks(GROUP)) {
        let amax = xg.iter().fold(0f32, |m, &v| m.max(v.abs()));
        let s = e4m3_to_f32(f32_to_e4m3((g * (amax * sixth)).min(E4M3_MAX)));
        let d = s * inv_g;
        let r = if d == 0.0 { 0.0 } else { 1.0 / d };
        for (o, &v) in og.iter_mut().zip(xg) {
            let q = (v * r).clamp(-FP4_MAX, FP4_MAX);
            *o = e2m1_value(((q < 0.0) as u8) << 3 | magnitude_code(q.abs())) * s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ties_go_to_the_even_code() {
        let cases = [
            (0.25, 0.0),
            (0.2500001, 0.5),
            (0.75, 1.0),
            (1.25, 1.0),
            (1.75, 2.0),
            (2.5, 2.0),
            (3.5, 4.0),
            (5.0, 4.0),
            (5.0001, 6.0),
            (100.0, 6.0),
        ];
        for (x, want) in cases {
            assert_eq!(E2M1[magnitude_code(x) as usize], want, "{x}");
        }
    }

    #[test]
    fn signs_of_zero_follow_each_producer() {
        assert_eq!(code(-0.0, Flavor::CompressedTensors), 8);
        assert_eq!(code(-0.1, Flavor::CompressedTensors), 8);
        assert_eq!(code(-0.0, Flavor::ModelOpt), 0);
        assert_eq!(code(-0.1, Flavor::ModelOpt), 8);
        assert_eq!(code(-7.0, Flavor::ModelOpt), 15);
    }

    #[test]
    fn round_trip_recovers_grid_values() {
        // A row whose groups hold exactly representable multiples of their scale.
        let cols = 32;
        let w: Vec<f32> = (0..cols)
            .map(|i| E2M1[i % 8] * if i % 3 == 0 { -1.0 } else { 1.0 })
            .collect();
        for flavor in [Flavor::CompressedTensors, Flavor::ModelOpt] {
            let t = tensor_scale(6.0, flavor);
            let m = quantize(&w, cols, t, flavor);
            let d = m.dequantize(cols);
            for (a, b) in w.iter().zip(&d) {
                assert!(
                    (a - b).abs() <= 1e-6 * a.abs().max(1.0),
                    "{flavor:?}: {a} vs {b}"
                );
            }
        }
    }
}
