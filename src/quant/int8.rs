//! Symmetric integer weights as compressed-tensors defines them (formats/int8.md#weights): INT8,
//! and the 4-bit form of `w4a16`; the `pack-quantized` layout; SmoothQuant's per-channel
//! migration.
//!
//! compressed-tensors' symmetric `b`-bit range is [−2^(b−1), 2^(b−1) − 1] with
//! `scale = absmax / ((2^b − 1) / 2)` (half the span: 127.5 for INT8, 7.5 for INT4), stored in
//! bf16; `q = clamp(round(bf16(w / scale)), lo, hi)` with round-half-even.

use rayon::prelude::*;

use crate::numerics::Real;

use crate::numerics::fp8::round_bf16;
use crate::numerics::round_even;

/// How `w4a16` weights are chosen (`--int4-weights`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Int4Method {
    /// Round to nearest under the group absmax scale.
    #[default]
    Rtn,
    /// GPTQ error feedback, group scales fixed first.
    Gptq,
    /// AWQ: activation-aware per-channel scaling folded into the producing norm or layer
    /// (quant::smoothquant), then round to nearest.
    Awq,
}

impl Int4Method {
    pub fn name(self) -> &'static str {
        match self {
            Int4Method::Rtn => "rtn",
            Int4Method::Gptq => "gptq",
            Int4Method::Awq => "awq",
        }
    }
}

/// A quantized `[rows, cols]` matrix with `groups` scales per row.
pub struct Int8Matrix {
    pub q: Vec<i8>,
    /// Row-major `[rows, groups]`.
    pub scales: Vec<f32>,
    pub groups: usize,
}

const BF16_EPS: f32 = 0.0078125;

multiversion! {
    /// Integer codes of one scale group: `round_half_even(bf16(x / s))`, clamped to
    /// `[lo, hi]`.
    fn group_codes(wg: &[f32], s: f32, lo: f32, hi: f32, qg: &mut [i8]) {
        for (o, &x) in qg.iter_mut().zip(wg) {
            *o = round_even(round_bf16(x / s)).clamp(lo, hi) as i8;
        }
    }
}

/// The symmetric `bits`-bit code range and the divisor of absmax that gives the scale.
pub fn int_range(bits: u32) -> (f32, f32, f32) {
    let half = (1i32 << (bits - 1)) as f32;
    (-half, half - 1.0, half - 0.5)
}

/// Quantizes `w` (`[rows, cols]`, values already bf16-representable) per output channel, or per
/// `group` input columns when given (which must divide `cols`).
pub fn quantize(w: &[f32], cols: usize, group: Option<usize>) -> Int8Matrix {
    quantize_bits(w, cols, group, 8)
}

/// [`quantize`] to symmetric `bits`-bit codes (2 ≤ bits ≤ 8), held one per `i8`.
pub fn quantize_bits(w: &[f32], cols: usize, group: Option<usize>, bits: u32) -> Int8Matrix {
    let (_, _, div) = int_range(bits);
    // Groups divide rows, so consecutive groups of `w` are the row-major `[rows, groups]`.
    let scales = w
        .par_chunks(group.unwrap_or(cols))
        .map(|wg| {
            let amax = wg.iter().fold(0f32, |m, &v| m.max(v.abs()));
            let s = round_bf16(amax / div);
            if s == 0.0 {
                BF16_EPS
            } else {
                s
            }
        })
        .collect();
    quantize_with_scales(w, cols, group, bits, scales)
}

/// Per-channel INT8 with GPTQ error feedback: the scales of [`quantize`] (per output channel),
/// the codes rounded column by column in `plan`'s order, each rounding error pushed onto the
/// columns not yet rounded through the factor of the input's second moments.
pub fn quantize_gptq(
    w: &[f32],
    cols: usize,
    plan: &crate::quant::gptq::Plan<impl crate::numerics::Real>,
) -> Int8Matrix {
    let scales = quantize(w, cols, None).scales;
    let codes = plan.quantize_rows(w, cols, |r, v| {
        let s = scales[r];
        let q = round_even(round_bf16((v as f32) / s)).clamp(-128.0, 127.0);
        ((q * s) as f64, q as i8 as u8)
    });
    Int8Matrix {
        q: codes.into_iter().map(|c| c as i8).collect(),
        scales,
        groups: 1,
    }
}

/// Shrink factors of the group absmax tried by [`searched_scales`]: 1.00 down to 0.60.
const SHRINK_STEPS: usize = 41;

/// Group scales chosen by importance-weighted error: for each group, the candidates
/// `bf16(f · absmax / d)` for `f` = 1.00, 0.99, … 0.60 (`d` as [`quantize_bits`] divides), each
/// rounding the group to nearest; the one with the least `Σ imp_j (w_j − q_j s)²` wins, the
/// larger `f` on a tie. `importance` is per input column (`E[x_j²]` of the calibration inputs,
/// the diagonal GPTQ's second-moment matrix carries). Clipping the few largest weights of a
/// group buys a finer step for all the others; the importance says which columns' errors the
/// layer's outputs feel.
pub fn searched_scales(
    w: &[f32],
    cols: usize,
    group: Option<usize>,
    bits: u32,
    importance: &[f64],
) -> Vec<f32> {
    let (lo, hi, div) = int_range(bits);
    let g = group.unwrap_or(cols);
    w.par_chunks(cols)
        .flat_map_iter(|row| {
            row.chunks(g)
                .zip(importance.chunks(g))
                .map(|(wg, ig)| {
                    let amax = wg.iter().fold(0f32, |m, &v| m.max(v.abs()));
                    let mut best = (f64::INFINITY, BF16_EPS);
                    for k in 0..SHRINK_STEPS {
                        let f = 1.0 - k as f32 * 0.01;
                        let s = round_bf16(f * amax / div);
                        if s == 0.0 {
                            continue;
                        }
                        let err = weighted_error(wg, ig, s, lo, hi);
                        if err < best.0 {
                            best = (err, s);
                        }
                    }
                    best.1
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

/// One term of [`weighted_error`]: `i · (x − q s)²` with `q = round_even(bf16(x / s))`
/// clamped to `[lo, hi]`, computed without branches or calls so that the loop vectorizes. The
/// quotient is clamped to `[lo − 1, hi + 1]` before rounding, which changes no code (a value past
/// either end rounds to at least that end) and keeps it where adding and subtracting 1.5 · 2²³
/// rounds half to even; its bf16 rounding is the carry trick, exact for every finite value and
/// every quiet NaN (division only makes quiet ones).
#[inline(always)]
fn error_term(x: f32, i: f64, s: f32, lo: f32, hi: f32) -> f64 {
    let b = (x / s).to_bits();
    let r = f32::from_bits(b.wrapping_add(0x7fff + ((b >> 16) & 1)) & 0xffff_0000);
    let q = crate::numerics::round_even_small(r.clamp(lo - 1.0, hi + 1.0)).clamp(lo, hi);
    let e = (x - q * s) as f64;
    i * e * e
}

multiversion! {
    /// `Σ i_k (x_k − q_k s)²` over one group for scale `s` (see [`error_term`]), in eight
    /// interleaved partial sums combined in a fixed order.
    fn weighted_error(wg: &[f32], ig: &[f64], s: f32, lo: f32, hi: f32) -> f64 {
        let mut acc = [0f64; 8];
        let (wc, ic) = (wg.chunks_exact(8), ig.chunks_exact(8));
        let (wr, ir) = (wc.remainder(), ic.remainder());
        for (x, i) in wc.zip(ic) {
            for l in 0..8 {
                acc[l] += error_term(x[l], i[l], s, lo, hi);
            }
        }
        let mut t = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
        for (&x, &i) in wr.iter().zip(ir) {
            t += error_term(x, i, s, lo, hi);
        }
        t
    }
}

/// `bits`-bit codes of `w` rounded to nearest under the given group scales (`[rows, groups]`,
/// e.g. from [`searched_scales`]).
pub fn quantize_with_scales(
    w: &[f32],
    cols: usize,
    group: Option<usize>,
    bits: u32,
    scales: Vec<f32>,
) -> Int8Matrix {
    let (lo, hi, _) = int_range(bits);
    let g = group.unwrap_or(cols);
    let groups = cols / g;
    let mut q = vec![0i8; w.len()];
    q.par_chunks_mut(cols)
        .zip(w.par_chunks(cols))
        .zip(scales.par_chunks(groups))
        .for_each(|((qr, row), ss)| {
            for ((qg, wg), &s) in qr.chunks_mut(g).zip(row.chunks(g)).zip(ss) {
                group_codes(wg, s, lo, hi, qg);
            }
        });
    Int8Matrix { q, scales, groups }
}

/// How far W4A16's GPTQ shrinks the calibration second moments' off-diagonal entries toward
/// the diagonal ([`crate::quant::gptq::GptqPlan::with_shrink`]). Measured alone on SmolLM2
/// (built-in corpus → dev text, README): 0 gives mean KLD 0.149, 0.15 0.130, 0.25 0.134,
/// 0.5 0.142, 1 0.247; 0.2 sits in the middle of the flat part rather than on its best point.
pub const W4A16_GPTQ_SHRINK: f64 = 0.2;

/// `bits`-bit codes with GPTQ error feedback and static group scales: the scales are fixed
/// first (those of [`quantize_bits`], as llm-compressor's observer fixes them before its GPTQ
/// loop, or [`searched_scales`] given `importance`), then the codes are rounded in `plan`'s
/// column order, each rounding error pushed onto the columns not yet rounded. The column order
/// changes no scale, so the artifact needs no `g_idx`. Given `refit` (the second moments `H`,
/// original column order), each row's group scales are then refitted to its codes
/// ([`refit_scales`]).
pub fn quantize_gptq_bits(
    w: &[f32],
    cols: usize,
    group: Option<usize>,
    plan: &crate::quant::gptq::Plan<impl crate::numerics::Real>,
    bits: u32,
    importance: Option<&[f64]>,
    refit: Option<&[f32]>,
) -> Int8Matrix {
    let (lo, hi, _) = int_range(bits);
    let (scales, groups) = match importance {
        Some(imp) => {
            let s = searched_scales(w, cols, group, bits, imp);
            let groups = s.len() / (w.len() / cols.max(1)).max(1);
            (s, groups)
        }
        None => {
            let m = quantize_bits(w, cols, group, bits);
            (m.scales, m.groups)
        }
    };
    let g = cols / groups;
    let codes = plan.quantize_rows_at(w, cols, |r, c, v| {
        let s = scales[r * groups + c / g];
        let q = round_even(round_bf16((v as f32) / s)).clamp(lo, hi);
        ((q * s) as f64, q as i8 as u8)
    });
    let q: Vec<i8> = codes.into_iter().map(|c| c as i8).collect();
    let scales = match refit {
        Some(h) => refit_scales(w, cols, g, &q, scales, h),
        None => scales,
    };
    Int8Matrix { q, scales, groups }
}

/// Per row, the group scales that minimise the layer's output error `(w − Q s)ᵀ H (w − Q s)`
/// for the codes as rounded (`Q`: the codes of each group in its own column): the normal
/// equations `(Qᵀ H Q) s = Qᵀ H w`, one small system per row, solved in f64 and rounded to
/// bf16. A row keeps its old scales when the refitted ones (after rounding) do not lower the
/// error, or when the system is singular.
pub fn refit_scales(
    w: &[f32],
    cols: usize,
    g: usize,
    q: &[i8],
    scales: Vec<f32>,
    h: &[f32],
) -> Vec<f32> {
    let groups = cols / g;
    let mut out = scales;
    // Rows in tiles: each group's rows of H are read once per tile, not once per row.
    out.par_chunks_mut(groups * REFIT_ROWS)
        .enumerate()
        .for_each(|(t, so_tile)| {
            let r0 = t * REFIT_ROWS;
            let nr = so_tile.len() / groups;
            let qf: Vec<f32> = q[r0 * cols..(r0 + nr) * cols]
                .iter()
                .map(|&v| v as f32)
                .collect();
            let (m_all, b_all) = normal_equations(&qf, &w[r0 * cols..(r0 + nr) * cols], cols, g, h);
            for (r, so) in so_tile.chunks_mut(groups).enumerate() {
                let m = &m_all[r * groups * groups..(r + 1) * groups * groups];
                let b = &b_all[r * groups..(r + 1) * groups];
                refit_row(so, m, b, groups);
            }
        });
    out
}

/// Rows refitted together (see [`refit_scales`]): each product below is then a GEMM of this
/// many rows.
const REFIT_ROWS: usize = 128;

/// The normal equations of [`refit_scales`] for every row of a tile: `M = Qᵀ H Q`
/// (`[rows, groups, groups]`) and `b = Qᵀ H w` (`[rows, groups]`), with `Q` the row's codes of
/// each group in its own column. For each group `c`, one GEMM gives every row's `y = H q_c`
/// (H is symmetric, so the group's rows of H serve: `Y = Q_c · H[c rows]`); then
/// `M[a][c] = q_aᵀ y` and `b[c] = wᵀ y`, each summed in eight interleaved parts. The export
/// runs it in f32 (the codes are small integers, exact in f32; each sum's relative error is a
/// few 2⁻²⁴ · √length, far below the bf16 the scales are rounded to), the test in f64.
fn normal_equations<T: Real>(
    q: &[T],
    w: &[f32],
    cols: usize,
    g: usize,
    h: &[f32],
) -> (Vec<f64>, Vec<f64>) {
    use crate::numerics::real::dot;
    let groups = cols / g;
    let nr = q.len() / cols;
    let w = T::from_f32_slice(w);
    let mut m = vec![0f64; nr * groups * groups];
    let mut b = vec![0f64; nr * groups];
    let mut y = vec![T::ZERO; nr * cols];
    let mut qc = vec![T::ZERO; nr * g];
    for c in 0..groups {
        for (r, qr) in qc.chunks_mut(g).enumerate() {
            qr.copy_from_slice(&q[r * cols + c * g..r * cols + (c + 1) * g]);
        }
        let hc = T::from_f32_slice(&h[c * g * cols..(c + 1) * g * cols]);
        crate::numerics::dgemm::gemm_full(nr, cols, g, &qc, &hc, &mut y, false);
        for r in 0..nr {
            let yr = &y[r * cols..(r + 1) * cols];
            let qr = &q[r * cols..(r + 1) * cols];
            let wr = &w[r * cols..(r + 1) * cols];
            for a in 0..groups {
                let k = a * g..(a + 1) * g;
                m[(r * groups + a) * groups + c] = dot(&qr[k.clone()], &yr[k]).to_f64();
            }
            b[r * groups + c] = dot(yr, wr).to_f64();
        }
    }
    (m, b)
}

/// One row's refit from its normal equations `m s = b`: the solution rounded to bf16 where it
/// lowers `(w − Q s)ᵀ H (w − Q s)`; the row's scales `so` are kept otherwise.
fn refit_row(so: &mut [f32], m: &[f64], b: &[f64], groups: usize) {
    // The error up to the constant wᵀHw, from the normal equations' own terms:
    // (w − Q s)ᵀ H (w − Q s) = wᵀHw − 2 sᵀ b + sᵀ M s (O(groups²), not O(cols²)).
    let err = |s: &[f32]| -> f64 {
        let mut t = 0.0;
        for a in 0..groups {
            let sa = s[a] as f64;
            t -= 2.0 * sa * b[a];
            for c in 0..groups {
                t += sa * m[a * groups + c] * s[c] as f64;
            }
        }
        t
    };
    let (mut ms, mut bs) = (m.to_vec(), b.to_vec());
    if let Some(sol) = solve(&mut ms, &mut bs, groups) {
        let cand: Vec<f32> = sol
            .iter()
            .zip(so.iter())
            .map(|(&v, &old)| {
                let v = round_bf16(v as f32);
                if v > 0.0 && v.is_finite() {
                    v
                } else {
                    old
                }
            })
            .collect();
        if err(&cand) < err(so) {
            so.copy_from_slice(&cand);
        }
    }
}

/// Gaussian elimination with partial pivoting on `m x = b` (`n × n`); `None` if singular.
fn solve(m: &mut [f64], b: &mut [f64], n: usize) -> Option<Vec<f64>> {
    for c in 0..n {
        let p = (c..n).max_by(|&i, &j| m[i * n + c].abs().total_cmp(&m[j * n + c].abs()))?;
        if m[p * n + c].abs() < 1e-300 {
            return None;
        }
        if p != c {
            for k in 0..n {
                m.swap(c * n + k, p * n + k);
            }
            b.swap(c, p);
        }
        for i in c + 1..n {
            let f = m[i * n + c] / m[c * n + c];
            for k in c..n {
                m[i * n + k] -= f * m[c * n + k];
            }
            b[i] -= f * b[c];
        }
    }
    let mut x = vec![0f64; n];
    for c in (0..n).rev() {
        let s: f64 = (c + 1..n).map(|k| m[c * n + k] * x[k]).sum();
        x[c] = (b[c] - s) / m[c * n + c];
    }
    Some(x)
}

impl Int8Matrix {
    /// `q · scale` per element.
    /// Relative RMS error of these codes against `w` (rows of `cols`), without materialising
    /// the dequantized matrix.
    pub fn relative_rms(&self, w: &[f32], cols: usize) -> f64 {
        let g = cols / self.groups;
        crate::quant::fp8::relative_rms_rows(w, cols, |r, out| {
            let q = self.q[r * cols..(r + 1) * cols].chunks(g);
            let s = &self.scales[r * self.groups..(r + 1) * self.groups];
            for ((o, q), &s) in out.chunks_mut(g).zip(q).zip(s) {
                for (o, &q) in o.iter_mut().zip(q) {
                    *o = q as f32 * s;
                }
            }
        })
    }

    pub fn dequantize(&self, cols: usize) -> Vec<f32> {
        let g = cols / self.groups;
        let mut out = vec![0f32; self.q.len()];
        out.par_chunks_mut(cols).enumerate().for_each(|(r, o)| {
            for (j, v) in o.iter_mut().enumerate() {
                *v = self.q[r * cols + j] as f32 * self.scales[r * self.groups + j / g];
            }
        });
        out
    }
}

/// `pack-quantized` for 8 bits: each value offset by +128 to an unsigned byte, four per
/// little-endian int32 along the row (value `4k + j` in byte `j` of word `k`), rows padded with
/// zero bytes to a whole word. Returns the bytes of the I32 `[rows, ceil(cols/4)]` tensor.
pub fn pack(q: &[i8], cols: usize) -> Vec<u8> {
    let words = cols.div_ceil(4);
    let mut out = vec![0u8; q.len() / cols * words * 4];
    out.par_chunks_mut(words * 4)
        .zip(q.par_chunks(cols))
        .for_each(|(o, r)| {
            for (b, &v) in o.iter_mut().zip(r) {
                *b = (v as i16 + 128) as u8;
            }
        });
    out
}

/// `pack-quantized` for `bits` bits (a divisor of 32): each code offset by 2^(bits−1) to an
/// unsigned value, `32 / bits` of them per little-endian int32 along the row, code `i` of a row
/// at bit `(i mod n)·bits` of word `i / n`; rows padded with zero bits to a whole word. For 8
/// bits this is [`pack`].
pub fn pack_bits(q: &[i8], cols: usize, bits: u32) -> Vec<u8> {
    let per = (32 / bits) as usize;
    let words = cols.div_ceil(per);
    let off = 1i32 << (bits - 1);
    let mask = (1u32 << bits) - 1;
    let mut out = vec![0u8; q.len() / cols * words * 4];
    out.par_chunks_mut(words * 4)
        .zip(q.par_chunks(cols))
        .for_each(|(o, r)| {
            for (k, chunk) in r.chunks(per).enumerate() {
                let mut word = 0u32;
                for (i, &v) in chunk.iter().enumerate() {
                    word |= ((v as i32 + off) as u32 & mask) << (i as u32 * bits);
                }
                o[4 * k..4 * k + 4].copy_from_slice(&word.to_le_bytes());
            }
        });
    out
}

/// Inverse of [`pack_bits`].
pub fn unpack_bits(bytes: &[u8], rows: usize, cols: usize, bits: u32) -> Vec<i8> {
    let per = (32 / bits) as usize;
    let words = cols.div_ceil(per);
    let off = 1i32 << (bits - 1);
    let mask = (1u32 << bits) - 1;
    let mut q = vec![0i8; rows * cols];
    q.par_chunks_mut(cols)
        .zip(bytes.par_chunks(words * 4))
        .for_each(|(o, b)| {
            for (i, v) in o.iter_mut().enumerate() {
                let k = i / per;
                let word = u32::from_le_bytes([b[4 * k], b[4 * k + 1], b[4 * k + 2], b[4 * k + 3]]);
                *v = (((word >> ((i % per) as u32 * bits)) & mask) as i32 - off) as i8;
            }
        });
    q
}

/// Inverse of [`pack`].
pub fn unpack(bytes: &[u8], rows: usize, cols: usize) -> Vec<i8> {
    let words = cols.div_ceil(4);
    let mut q = vec![0i8; rows * cols];
    q.par_chunks_mut(cols)
        .zip(bytes.par_chunks(words * 4))
        .for_each(|(o, b)| {
            for (v, &x) in o.iter_mut().zip(b) {
                *v = (x as i16 - 128) as i8;
            }
        });
    q
}

/// SmoothQuant factors `s_j = max|X_j|^α / max|W_j|^(1−α)` for input channel `j`, with
/// `max|W_j|` over every weight reading that input. Channels never active (or all-zero weights)
/// get 1; factors are floored at 1e-5 as llm-compressor does.
pub fn smooth_factors(act_absmax: &[f32], w_colmax: &[f32], alpha: f64) -> Vec<f32> {
    act_absmax
        .iter()
        .zip(w_colmax)
        .map(|(&a, &w)| {
            if a <= 0.0 || w <= 0.0 {
                return 1.0;
            }
            let s = (a as f64).powf(alpha) / (w as f64).powf(1.0 - alpha);
            (s.max(1e-5)) as f32
        })
        .collect()
}

/// Per-column absmax over several `[rows, cols]` matrices.
pub fn column_absmax(ws: &[&[f32]], cols: usize) -> Vec<f32> {
    let mut m = vec![0f32; cols];
    for w in ws {
        for row in w.chunks(cols) {
            for (a, &v) in m.iter_mut().zip(row) {
                *a = a.max(v.abs());
            }
        }
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Codes in [-8, 6], weights in [-0.5, 0.5) and a symmetric, diagonally dominant `H`
    /// (`[rows, cols]`, `[rows, cols]`, `[cols, cols]`) from seed `seed`.
    fn refit_inputs(seed: u64, rows: usize, cols: usize) -> (Vec<f64>, Vec<f32>, Vec<f32>) {
        let mut rng = crate::numerics::rng::SplitMix64::new(seed);
        let q: Vec<f64> = (0..rows * cols)
            .map(|_| (rng.next_u64() % 15) as f64 - 8.0)
            .collect();
        let w: Vec<f32> = (0..rows * cols).map(|_| rng.unit_f32() - 0.5).collect();
        let mut h = vec![0f32; cols * cols];
        for i in 0..cols {
            for j in 0..=i {
                let v = rng.unit_f32() - 0.5 + if i == j { 2.0 } else { 0.0 };
                h[i * cols + j] = v;
                h[j * cols + i] = v;
            }
        }
        (q, w, h)
    }

    /// The GEMM-built normal equations equal the plain f64 sums `M[a][c] = Σ_{i∈a, j∈c} q_i
    /// H_ij q_j` and `b[c] = Σ_i w_i Σ_{j∈c} H_ij q_j`: relative 1e-12 (f64 sums of a few hundred
    /// terms in another order).
    #[test]
    fn normal_equations_match_plain_sums() {
        let (rows, cols, g) = (REFIT_ROWS + 3, 48, 16);
        let groups = cols / g;
        let (q, w, h) = refit_inputs(5, rows, cols);
        let (m, b) = normal_equations(&q, &w, cols, g, &h);
        let close = |x: f64, y: f64| (x - y).abs() <= 1e-12 * y.abs().max(1.0);
        for r in 0..rows {
            let qr = &q[r * cols..(r + 1) * cols];
            for a in 0..groups {
                for c in 0..groups {
                    let mut want = 0.0;
                    for i in a * g..(a + 1) * g {
                        for j in c * g..(c + 1) * g {
                            want += qr[i] * h[i * cols + j] as f64 * qr[j];
                        }
                    }
                    let got = m[(r * groups + a) * groups + c];
                    assert!(close(got, want), "M row {r} ({a}, {c}): {got} vs {want}");
                }
                let mut want = 0.0;
                for i in 0..cols {
                    for j in a * g..(a + 1) * g {
                        want += w[r * cols + i] as f64 * h[i * cols + j] as f64 * qr[j];
                    }
                }
                assert!(close(b[r * groups + a], want), "b row {r} group {a}");
            }
        }
    }

    /// The vectorizable error term equals the plain formula bit for bit on every code's
    /// neighbourhood: values on and around each rounding boundary of 4- and 8-bit grids,
    /// values far past the ends, signed zeros and infinities, under many scales; and the
    /// eight-part sum equals a plain f64 sum within 1e-12 relative (same terms, another order).
    #[test]
    fn search_error_terms_equal_the_plain_formula() {
        let mut rng = crate::numerics::rng::SplitMix64::new(31);
        for bits in [4, 8] {
            let (lo, hi, div) = int_range(bits);
            for _ in 0..2000 {
                let s = round_bf16(rng.unit_f32() * 0.1 + 1e-6);
                let mut xs: Vec<f32> = (0..64)
                    .map(|_| (rng.unit_f32() - 0.5) * 3.0 * div * s)
                    .collect();
                for k in (lo as i32 - 3)..=(hi as i32 + 3) {
                    let half = (k as f32 + 0.5) * s;
                    xs.extend([half, f32::from_bits(half.to_bits() + 1), k as f32 * s]);
                }
                xs.extend([0.0, -0.0, f32::INFINITY, f32::NEG_INFINITY, 1e30, -1e30]);
                let imp: Vec<f64> = xs.iter().map(|_| rng.unit_f32() as f64).collect();
                let plain = |x: f32, i: f64| {
                    let q = round_even(round_bf16(x / s)).clamp(lo, hi);
                    let e = (x - q * s) as f64;
                    i * e * e
                };
                let mut want = 0f64;
                for (&x, &i) in xs.iter().zip(&imp) {
                    let (a, b) = (error_term(x, i, s, lo, hi), plain(x, i));
                    assert_eq!(a.to_bits(), b.to_bits(), "x {x}, s {s}, {bits} bits");
                    want += b;
                }
                let got = weighted_error(&xs, &imp, s, lo, hi);
                assert!(
                    got == want || (got - want).abs() <= 1e-12 * want.abs(),
                    "{got} vs {want}"
                );
            }
        }
    }

    /// The f32 normal equations the export uses against the f64 ones: relative 1e-5 of each
    /// row's largest entry (f32 sums of up to 48 products of codes ≤ 8 and moments ≤ 2.5,
    /// 2⁻²⁴ each, grown by √48 at most and well inside 1e-5).
    #[test]
    fn f32_normal_equations_follow_the_f64_ones() {
        let (rows, cols, g) = (REFIT_ROWS + 3, 48, 16);
        let groups = cols / g;
        let (q, w, h) = refit_inputs(7, rows, cols);
        let q32: Vec<f32> = q.iter().map(|&v| v as f32).collect();
        let (m64, b64) = normal_equations(&q, &w, cols, g, &h);
        let (m32, b32) = normal_equations(&q32, &w, cols, g, &h);
        for r in 0..rows {
            let mr = &m64[r * groups * groups..(r + 1) * groups * groups];
            let top = mr.iter().fold(0f64, |a, v| a.max(v.abs()));
            for (i, (a, b)) in mr.iter().zip(&m32[r * groups * groups..]).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-5 * top,
                    "M row {r} entry {i}: {a} vs {b}"
                );
            }
            let br = &b64[r * groups..(r + 1) * groups];
            let top = br.iter().fold(0f64, |a, v| a.max(v.abs()));
            for (a, b) in br.iter().zip(&b32[r * groups..]) {
                assert!((a - b).abs() <= 1e-5 * top, "b row {r}: {a} vs {b}");
            }
        }
    }

    /// The refit lowers (never raises) the second-moment-weighted error of each row, and with
    /// `H = I` and one group it is the plain least-squares scale `Σ w q / Σ q²` (in bf16).
    #[test]
    fn refitted_scales_lower_the_weighted_error() {
        let mut rng = crate::numerics::rng::SplitMix64::new(11);
        let (rows, cols, g) = (6, 32, 8);
        let w: Vec<f32> = (0..rows * cols)
            .map(|_| round_bf16(rng.unit_f32() - 0.5))
            .collect();
        let m = quantize_bits(&w, cols, Some(g), 4);
        // A correlated positive definite H from random inputs.
        let xs: Vec<Vec<f64>> = (0..64)
            .map(|_| (0..cols).map(|_| rng.unit_f32() as f64 - 0.5).collect())
            .collect();
        let mut h = vec![0f64; cols * cols];
        for x in &xs {
            for i in 0..cols {
                for j in 0..cols {
                    h[i * cols + j] += x[i] * x[j] + if i == j { 0.01 } else { 0.0 };
                }
            }
        }
        let err = |s: &[f32]| -> f64 {
            (0..rows)
                .map(|r| {
                    let e: Vec<f64> = (0..cols)
                        .map(|j| {
                            w[r * cols + j] as f64
                                - m.q[r * cols + j] as f64 * s[r * (cols / g) + j / g] as f64
                        })
                        .collect();
                    (0..cols)
                        .map(|i| e[i] * (0..cols).map(|j| h[i * cols + j] * e[j]).sum::<f64>())
                        .sum::<f64>()
                })
                .sum()
        };
        // The refit reads the moments in f32 (as the export keeps them); the error is f64.
        let h32: Vec<f32> = h.iter().map(|&v| v as f32).collect();
        let refit = refit_scales(&w, cols, g, &m.q, m.scales.clone(), &h32);
        assert!(
            err(&refit) < err(&m.scales),
            "{} vs {}",
            err(&refit),
            err(&m.scales)
        );

        let one = quantize_bits(&w[..cols], cols, None, 4);
        let mut eye = vec![0f32; cols * cols];
        for j in 0..cols {
            eye[j * cols + j] = 1.0;
        }
        let s = refit_scales(&w[..cols], cols, cols, &one.q, one.scales.clone(), &eye);
        let (num, den) = (0..cols).fold((0f64, 0f64), |(a, b), j| {
            let q = one.q[j] as f64;
            (a + w[j] as f64 * q, b + q * q)
        });
        assert_eq!(s[0], round_bf16((num / den) as f32));
    }

    #[test]
    fn searched_scales_never_lose_to_the_absmax_scale() {
        let mut rng = crate::numerics::rng::SplitMix64::new(3);
        let (rows, cols, g) = (8, 128, 32);
        // Heavy-tailed weights (a few large values per group) and uneven column importance.
        let w: Vec<f32> = (0..rows * cols)
            .map(|i| {
                let v = rng.unit_f32() - 0.5;
                round_bf16(if i % 29 == 0 { v * 8.0 } else { v })
            })
            .collect();
        let imp: Vec<f64> = (0..cols).map(|j| 1.0 + (j % 7) as f64).collect();
        let err = |scales: &[f32]| -> f64 {
            let (lo, hi, _) = int_range(4);
            w.chunks(cols)
                .enumerate()
                .map(|(r, row)| {
                    row.iter()
                        .enumerate()
                        .map(|(j, &x)| {
                            let s = scales[r * (cols / g) + j / g];
                            let q = round_even(round_bf16(x / s)).clamp(lo, hi);
                            imp[j] * ((x - q * s) as f64).powi(2)
                        })
                        .sum::<f64>()
                })
                .sum()
        };
        let plain = quantize_bits(&w, cols, Some(g), 4).scales;
        let searched = searched_scales(&w, cols, Some(g), 4, &imp);
        assert_eq!(searched.len(), plain.len());
        // The absmax scale is the first candidate, so the search can only do better.
        assert!(
            err(&searched) < 0.9 * err(&plain),
            "{} vs {}",
            err(&searched),
            err(&plain)
        );
        assert_eq!(searched, searched_scales(&w, cols, Some(g), 4, &imp));
    }

    #[test]
    fn compressed_tensors_range_and_rounding() {
        // absmax 127.5 → scale 1: +absmax rounds to 128 and clamps to 127, −absmax to −128.
        let m = quantize(&[127.5, -127.5, 0.5, 1.5, -2.5, 0.0], 6, None);
        assert_eq!(m.scales, vec![1.0]);
        assert_eq!(m.q, vec![127, -128, 0, 2, -2, 0]);
    }

    #[test]
    fn packing_is_little_endian_offset_bytes() {
        let q: Vec<i8> = vec![-128, -1, 0, 127, 5];
        let p = pack(&q, 5);
        assert_eq!(p, vec![0, 127, 128, 255, 133, 0, 0, 0]);
        let word0 = i32::from_le_bytes([p[0], p[1], p[2], p[3]]);
        assert_eq!(word0, i32::from_le_bytes([0, 127, 128, 255]));
        assert_eq!(unpack(&p, 1, 5), q);
    }
}
