//! ggml block quantization for GGUF tensors (formats/gguf.md#quantization).
//!
//! Float types and the 32-wide legacy blocks (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) are encoded here;
//! without an importance vector they reproduce ggml's reference quantizers bit for bit. K-quants
//! use candle's block quantizers. With an importance vector `qw` (the imatrix: E[a_j²] per
//! input column) every type except Q8_0 and the floats minimises the weighted error
//! `Σ_j qw_j (w_j − ŵ_j)²`: the candidate llama.cpp's algorithm would choose is always among
//! those tried, others aim at the weighted error directly, and per block the smallest weighted
//! error after rounding the block scales to f16 wins, so the result is never worse than
//! llama.cpp's by that measure.
//!
//! Rows are independent (blocks never cross a row), so work is split into row chunks on rayon:
//! the bytes do not depend on the thread count.

use candle_core::quantized::k_quants::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K, BlockQ6K, GgmlType as CandleBlock,
};
use half::{bf16, f16};
use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::format::gguf::GgmlType;

/// ggml's `nearest_int`: round half to even (without a libm call, see
/// [`crate::numerics::round_even`]).
#[inline(always)]
fn nearest(x: f32) -> i32 {
    crate::numerics::round_even(x) as i32
}

const GROUP_MAX_EPS: f32 = 1e-15;

/// The largest magnitude of `x` and the (signed) value holding it, the first one on ties.
#[inline(always)]
fn signed_absmax(x: &[f32]) -> (f32, f32) {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    (amax, max)
}

/// The ggml type's candle type, which names its encoder here (the type table gives one to
/// exactly the types this tool writes).
type Kind = candle_core::quantized::GgmlDType;

fn kind(t: &GgmlType) -> Result<Kind> {
    t.ggml_dtype().ok_or_else(|| {
        Error::Unsupported(format!("quantizing to ggml type {t} is not implemented"))
    })
}

/// How the k-quant encoders (Q2_K … Q6_K) choose each super-block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum KSearch {
    /// One encoding per block: the k-quant reference rounding (ggml's, as candle ports it)
    /// without an importance matrix, llama.cpp's importance-weighted search with one.
    #[default]
    Reference,
    /// Also run the other encoder and searches aimed at the importance-weighted error
    /// directly, and keep, per block, the candidate with the smallest error: never worse than
    /// `reference` or llama.cpp's search by that measure, several times slower.
    Best,
}

/// Quantizes `x` (rows of `ne0` values) to `ty` with the best-of k-quant search
/// ([`KSearch::Best`]). `importance`: one weight per column (an imatrix entry), used by every
/// type that uses one in llama.cpp.
pub fn quantize(
    ty: &GgmlType,
    x: &[f32],
    ne0: usize,
    importance: Option<&[f32]>,
) -> Result<Vec<u8>> {
    quantize_with(ty, x, ne0, importance, KSearch::Best)
}

/// [`quantize`] with the k-quant search chosen.
pub fn quantize_with(
    ty: &GgmlType,
    x: &[f32],
    ne0: usize,
    importance: Option<&[f32]>,
    search: KSearch,
) -> Result<Vec<u8>> {
    let k = kind(ty)?;
    if ne0 == 0 || !x.len().is_multiple_of(ne0) || !ne0.is_multiple_of(ty.block_size()) {
        return Err(Error::Invalid(format!(
            "cannot quantize rows of {ne0} values to {} (block size {})",
            ty.name(),
            ty.block_size()
        )));
    }
    if let Some(q) = importance {
        if q.len() != ne0 {
            return Err(Error::Invalid(format!(
                "importance vector has {} values for rows of {ne0}",
                q.len()
            )));
        }
    }
    let row_bytes = ne0 / ty.block_size() * ty.type_size();
    let rows = x.len() / ne0;
    let mut out = vec![0u8; rows * row_bytes];
    // About 64k values per task keeps every core busy without tiny tasks.
    let per_task = (65536 / ne0).max(1);
    out.par_chunks_mut(per_task * row_bytes)
        .zip(x.par_chunks(per_task * ne0))
        .for_each(|(o, xs)| {
            for (orow, xrow) in o.chunks_mut(row_bytes).zip(xs.chunks(ne0)) {
                quantize_row(k, xrow, orow, importance, search);
            }
        });
    Ok(out)
}

multiversion! {
    /// One row of `k`: the AVX-512 build inlines the float conversions and roundings the
    /// baseline target calls out for (same arithmetic, same bytes).
    fn quantize_row(k: Kind, x: &[f32], out: &mut [u8], qw: Option<&[f32]>, search: KSearch) {
        match k {
            Kind::F32 => {
                for (o, v) in out.chunks_mut(4).zip(x) {
                    o.copy_from_slice(&v.to_le_bytes());
                }
            }
            Kind::F16 => {
                for (o, v) in out.chunks_mut(2).zip(x) {
                    o.copy_from_slice(&f16::from_f32(*v).to_le_bytes());
                }
            }
            Kind::BF16 => {
                for (o, v) in out.chunks_mut(2).zip(x) {
                    o.copy_from_slice(&bf16::from_f32(*v).to_le_bytes());
                }
            }
            Kind::Q8_0 => {
                for (o, b) in out.chunks_mut(34).zip(x.chunks(32)) {
                    q8_0_block(b, o);
                }
            }
            Kind::Q4_0 | Kind::Q5_0 | Kind::Q4_1 | Kind::Q5_1 => legacy_row(k, x, out, qw),
            Kind::Q2K => k_row::<BlockQ2K>(x, out, qw, Sigma::TwoOver256, search),
            Kind::Q3K => k_row::<BlockQ3K>(x, out, qw, Sigma::TwoOver256, search),
            Kind::Q4K => k_row::<BlockQ4K>(x, out, qw, Sigma::TwoOver256, search),
            Kind::Q5K => k_row::<BlockQ5K>(x, out, qw, Sigma::TwoOver256, search),
            Kind::Q6K => k_row::<BlockQ6K>(x, out, qw, Sigma::None, search),
            // The type table gives these no candle type, so `kind` never returns them.
            Kind::Q8_1 | Kind::Q8K => unreachable!("no encoder for {k:?}"),
        }
    }
}

/// Q8_0: `d = absmax/127` (stored f16), `q = round(x · (1/d))` half away from zero, `1/d` taken
/// from the f32 `d`, as ggml's reference does. No importance weighting.
#[inline(always)]
fn q8_0_block(x: &[f32], out: &mut [u8]) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    out[..2].copy_from_slice(&f16::from_f32(d).to_le_bytes());
    for (o, v) in out[2..].iter_mut().zip(x) {
        *o = (v * id).round() as i8 as u8;
    }
}

/// Symmetric (`Q4_0`, `Q5_0`: `x = d·(q − nmax)`) or offset (`Q4_1`, `Q5_1`: `x = d·q + m`)
/// 32-value blocks.
#[derive(Debug, Clone, Copy)]
struct Legacy {
    /// Quantized levels 0..=2·nmax−1 (symmetric) or 0..=nmax (offset).
    nmax: i32,
    offset: bool,
    bits: u32,
}

fn legacy(k: Kind) -> Legacy {
    match k {
        Kind::Q4_0 => Legacy {
            nmax: 8,
            offset: false,
            bits: 4,
        },
        Kind::Q5_0 => Legacy {
            nmax: 16,
            offset: false,
            bits: 5,
        },
        Kind::Q4_1 => Legacy {
            nmax: 15,
            offset: true,
            bits: 4,
        },
        _ => Legacy {
            nmax: 31,
            offset: true,
            bits: 5,
        },
    }
}

/// A block's parameters before packing: scale, offset (0 for symmetric) and levels.
struct BlockQ {
    d: f32,
    m: f32,
    l: [u8; 32],
}

#[inline(always)]
fn legacy_row(k: Kind, x: &[f32], out: &mut [u8], qw: Option<&[f32]>) {
    let lg = legacy(k);
    let bytes = out.len() / (x.len() / 32);
    let sigma2 = x.iter().map(|v| v * v).sum::<f32>() / x.len() as f32;
    for (bi, (o, xb)) in out.chunks_mut(bytes).zip(x.chunks(32)).enumerate() {
        let b = match qw {
            None => legacy_reference(lg, xb),
            Some(q) => legacy_weighted(lg, xb, &q[bi * 32..bi * 32 + 32], sigma2),
        };
        pack_legacy(lg, &b, o);
    }
}

/// ggml's `quantize_row_q{4,5}_{0,1}_ref`.
#[inline(always)]
fn legacy_reference(lg: Legacy, x: &[f32]) -> BlockQ {
    let mut l = [0u8; 32];
    if !lg.offset {
        let (_, max) = signed_absmax(x);
        let d = max / -(lg.nmax as f32);
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let top = (2 * lg.nmax - 1) as i8;
        for (o, &v) in l.iter_mut().zip(x) {
            *o = ((v * id + lg.nmax as f32 + 0.5) as i8).min(top) as u8;
        }
        BlockQ {
            d: f16r(d),
            m: 0.0,
            l,
        }
    } else {
        let min = x.iter().fold(f32::MAX, |a, &v| a.min(v));
        let max = x.iter().fold(-f32::MAX, |a, &v| a.max(v));
        let d = (max - min) / lg.nmax as f32;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        for (o, &v) in l.iter_mut().zip(x) {
            *o = (((v - min) * id + 0.5) as i8).min(lg.nmax as i8) as u8;
        }
        BlockQ {
            d: f16r(d),
            m: f16r(min),
            l,
        }
    }
}

fn f16r(v: f32) -> f32 {
    f16::from_f32(v).to_f32()
}

/// Importance-weighted legacy block: llama.cpp's choice (weights `qw·sqrt(σ² + x²)`, σ² the
/// row's mean square) and candidates aimed at `Σ qw (x − x̂)²` itself; the best after f16
/// rounding, its levels re-rounded for the stored scale.
#[inline(always)]
fn legacy_weighted(lg: Legacy, x: &[f32], qw: &[f32], sigma2: f32) -> BlockQ {
    let ggml_w: Vec<f32> = x
        .iter()
        .zip(qw)
        .map(|(v, q)| q * (sigma2 + v * v).sqrt())
        .collect();
    let mut cands: Vec<(f32, f32)> = Vec::new();
    if !lg.offset {
        cands.push((make_qx_quants(x, lg.nmax, &ggml_w).0, 0.0));
        cands.push((make_qx_quants(x, lg.nmax, qw).0, 0.0));
        cands.extend(scale_sweep(x, lg.nmax, qw).into_iter().map(|d| (d, 0.0)));
    } else {
        for w in [&ggml_w[..], qw] {
            let (d, min, _) = qkx3(x, lg.nmax, w, -0.9, 0.05, 36);
            cands.push((d, -min));
        }
    }
    let mut best: Option<(f64, BlockQ)> = None;
    for (d, m) in cands {
        let b = relevel(lg, x, f16r(d), f16r(m));
        let e = weighted_error(lg, &b, x, qw);
        if best.as_ref().is_none_or(|(be, _)| e < *be) {
            best = Some((e, b));
        }
    }
    // The ggml candidate with ggml's own levels (no re-rounding) is also a candidate, so the
    // result is never worse than llama.cpp's block.
    let g = if lg.offset {
        let (d, min, l) = qkx3(x, lg.nmax, &ggml_w, -0.9, 0.05, 36);
        BlockQ {
            d: f16r(d),
            m: f16r(-min),
            l,
        }
    } else {
        let (d, l) = make_qx_quants(x, lg.nmax, &ggml_w);
        BlockQ {
            d: f16r(d),
            m: 0.0,
            l,
        }
    };
    let ge = weighted_error(lg, &g, x, qw);
    match best {
        Some((e, b)) if e <= ge => b,
        _ => g,
    }
}

/// Scales from a finer sweep around `nmax/max` (81 steps of 0.025 instead of ggml's 19 of
/// 0.1), each refit by weighted least squares.
#[inline(always)]
fn scale_sweep(x: &[f32], nmax: i32, w: &[f32]) -> Vec<f32> {
    let (amax, max) = signed_absmax(x);
    if amax < GROUP_MAX_EPS {
        return vec![];
    }
    (-40..=40)
        .filter_map(|is| {
            let iscale = -(nmax as f32 + 0.025 * is as f32) / max;
            let (mut sumlx, mut suml2) = (0f32, 0f32);
            for (&v, &wi) in x.iter().zip(w) {
                let l = nearest(iscale * v).clamp(-nmax, nmax - 1) as f32;
                sumlx += wi * v * l;
                suml2 += wi * l * l;
            }
            (suml2 > 0.0).then(|| sumlx / suml2)
        })
        .collect()
}

/// Levels for a fixed (stored) scale and offset: each value to its nearest level, which for a
/// fixed scale minimises every term of the weighted error separately.
#[inline(always)]
fn relevel(lg: Legacy, x: &[f32], d: f32, m: f32) -> BlockQ {
    let mut l = [0u8; 32];
    if d != 0.0 {
        for (o, &v) in l.iter_mut().zip(x) {
            *o = if lg.offset {
                nearest((v - m) / d).clamp(0, lg.nmax) as u8
            } else {
                (nearest(v / d).clamp(-lg.nmax, lg.nmax - 1) + lg.nmax) as u8
            };
        }
    } else if !lg.offset {
        l = [lg.nmax as u8; 32];
    }
    BlockQ { d, m, l }
}

#[inline(always)]
fn legacy_value(lg: Legacy, b: &BlockQ, j: usize) -> f32 {
    if lg.offset {
        b.d * b.l[j] as f32 + b.m
    } else {
        b.d * (b.l[j] as i32 - lg.nmax) as f32
    }
}

#[inline(always)]
fn weighted_error(lg: Legacy, b: &BlockQ, x: &[f32], qw: &[f32]) -> f64 {
    x.iter()
        .zip(qw)
        .enumerate()
        .map(|(j, (&v, &w))| w as f64 * ((v - legacy_value(lg, b, j)) as f64).powi(2))
        .sum()
}

#[inline(always)]
fn pack_legacy(lg: Legacy, b: &BlockQ, out: &mut [u8]) {
    out[..2].copy_from_slice(&f16::from_f32(b.d).to_le_bytes());
    let mut p = 2;
    if lg.offset {
        out[2..4].copy_from_slice(&f16::from_f32(b.m).to_le_bytes());
        p = 4;
    }
    if lg.bits == 5 {
        let mut qh = 0u32;
        for j in 0..32 {
            qh |= ((b.l[j] as u32 >> 4) & 1) << j;
        }
        out[p..p + 4].copy_from_slice(&qh.to_le_bytes());
        p += 4;
    }
    for j in 0..16 {
        out[p + j] = (b.l[j] & 0xF) | ((b.l[j + 16] & 0xF) << 4);
    }
}

/// ggml's `make_qx_quants` with explicit weights (`rmse_type` 1): returns the scale and levels
/// offset by `nmax`.
#[inline(always)]
pub fn make_qx_quants(x: &[f32], nmax: i32, w: &[f32]) -> (f32, [u8; 32]) {
    let mut l = [0u8; 32];
    let (amax, max) = signed_absmax(x);
    if amax < GROUP_MAX_EPS {
        return (0.0, l);
    }
    let levels = |iscale: f32| -> (f32, f32) {
        let (mut sumlx, mut suml2) = (0f32, 0f32);
        for (&v, &wi) in x.iter().zip(w) {
            let q = nearest(iscale * v).clamp(-nmax, nmax - 1) as f32;
            sumlx += wi * v * q;
            suml2 += wi * q * q;
        }
        (sumlx, suml2)
    };
    let fill = |iscale: f32, l: &mut [u8; 32]| {
        for (o, &v) in l.iter_mut().zip(x) {
            *o = (nearest(iscale * v).clamp(-nmax, nmax - 1) + nmax) as u8;
        }
    };
    let iscale = -(nmax as f32) / max;
    fill(iscale, &mut l);
    let (sumlx, suml2) = levels(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        let iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        let (sumlx, suml2) = levels(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            fill(iscale, &mut l);
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    (scale, l)
}

/// ggml's `make_qkx3_quants` (squared error): returns the scale, the (positive) negated
/// minimum and the levels.
#[inline(always)]
fn qkx3(
    x: &[f32],
    nmax: i32,
    w: &[f32],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> (f32, f32, [u8; 32]) {
    let n = x.len();
    let mut l = [0u8; 32];
    let mut laux = [0u8; 32];
    let mut min = x[0];
    let mut max = x[0];
    let mut sum_w = w[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        min = min.min(x[i]);
        max = max.max(x[i]);
        sum_w += w[i];
        sum_x += w[i] * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max <= min {
        return (0.0, -min, l);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best = 0f32;
    for i in 0..n {
        let q = nearest(iscale * (x[i] - min)).clamp(0, nmax);
        l[i] = q as u8;
        let diff = scale * q as f32 + min - x[i];
        best += w[i] * diff * diff;
    }
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let q = nearest(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = q as u8;
            let q = q as f32;
            sum_l += w[i] * q;
            sum_l2 += w[i] * q * q;
            sum_xl += w[i] * q * x[i];
        }
        let dd = sum_w * sum_l2 - sum_l * sum_l;
        if dd > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / dd;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / dd;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur = 0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                cur += w[i] * diff * diff;
            }
            if cur < best {
                l[..n].copy_from_slice(&laux[..n]);
                best = cur;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min, l)
}

/// How a k-quant's importance weights include the values themselves in llama.cpp:
/// `qw_j · sqrt(σ² + x_j²)` with σ² = 2·Σx²/256 per super-block, or `qw_j` alone (Q6_K).
#[derive(Clone, Copy)]
enum Sigma {
    TwoOver256,
    None,
}

/// Reinterprets candle blocks as their ggml bytes.
fn block_bytes<T: CandleBlock>(b: &[T]) -> &[u8] {
    // SAFETY: candle's k-quant blocks are `#[repr(C)]` structs of f16/u8/i8 fields whose sizes
    // are asserted equal to ggml's block sizes (no padding), so their memory is exactly the
    // ggml encoding, and u8 has no alignment requirement.
    unsafe { std::slice::from_raw_parts(b.as_ptr() as *const u8, std::mem::size_of_val(b)) }
}

/// Mutable ggml bytes of candle blocks.
fn block_bytes_mut<T: CandleBlock>(b: &mut [T]) -> &mut [u8] {
    // SAFETY: as for `block_bytes`; in addition every bit pattern is a valid value of the
    // blocks' f16 and u8 fields, so any bytes written leave valid blocks.
    unsafe { std::slice::from_raw_parts_mut(b.as_mut_ptr() as *mut u8, std::mem::size_of_val(b)) }
}

/// candle's importance-weighted quantization of a row (`w` as long as `x`), through our
/// byte-identical faster port for Q4_K and Q5_K.
fn imatrix_blocks<T: CandleBlock>(x: &[f32], w: &[f32]) -> Vec<T> {
    use candle_core::quantized::GgmlDType;
    let mut b = vec![T::zeros(); x.len() / T::BLCK_SIZE];
    match T::DTYPE {
        GgmlDType::Q4K => super::kfast::q4k(x, w, block_bytes_mut(&mut b)),
        GgmlDType::Q5K => super::kfast::q5k(x, w, block_bytes_mut(&mut b)),
        _ => T::from_float_imatrix(x, &mut b, w, x.len()),
    }
    b
}

/// A k-quant row: per 256-value super-block, the best of candle's plain quantizer, llama.cpp's
/// importance-weighted algorithm (when `qw` is given) and the same algorithm with weights that
/// target `Σ qw (x − x̂)²` directly — by weighted error (plain squared error without `qw`).
fn k_row<T: CandleBlock>(
    x: &[f32],
    out: &mut [u8],
    qw: Option<&[f32]>,
    sigma: Sigma,
    search: KSearch,
) {
    let nb = x.len() / T::BLCK_SIZE;
    let bsz = out.len() / nb;
    if search == KSearch::Reference {
        // The reference rounding without an importance matrix, llama.cpp's weighted search
        // with one.
        let blocks = match qw {
            None => {
                let mut plain = vec![T::zeros(); nb];
                T::from_float(x, &mut plain);
                plain
            }
            Some(q) => imatrix_blocks::<T>(x, q),
        };
        for b in 0..nb {
            out[b * bsz..(b + 1) * bsz].copy_from_slice(block_bytes(&blocks[b..b + 1]));
        }
        return;
    }
    let ones;
    let target: &[f32] = match qw {
        Some(q) => q,
        None => {
            ones = vec![1f32; x.len()];
            &ones
        }
    };
    let mut cands: Vec<Vec<T>> = Vec::new();
    let mut plain = vec![T::zeros(); nb];
    T::from_float(x, &mut plain);
    cands.push(plain);
    // llama.cpp's imatrix algorithm (with a uniform vector when there is none).
    cands.push(imatrix_blocks::<T>(x, target));
    if let (Sigma::TwoOver256, Some(_)) = (sigma, qw) {
        let mut direct_w = vec![0f32; x.len()];
        for (b, (xs, ws)) in x.chunks(256).zip(target.chunks(256)).enumerate() {
            let s2 = 2.0 * xs.iter().map(|v| v * v).sum::<f32>() / 256.0;
            for (j, (&v, &q)) in xs.iter().zip(ws).enumerate() {
                direct_w[b * 256 + j] = q / (s2 + v * v).sqrt().max(1e-30);
            }
        }
        cands.push(imatrix_blocks::<T>(x, &direct_w));
    }
    let mut deq = vec![0f32; x.len()];
    let errs: Vec<Vec<f64>> = cands
        .iter()
        .map(|c| {
            T::to_float(c, &mut deq);
            deq.chunks(T::BLCK_SIZE)
                .zip(x.chunks(T::BLCK_SIZE))
                .zip(target.chunks(T::BLCK_SIZE))
                .map(|((d, xs), ws)| {
                    d.iter()
                        .zip(xs)
                        .zip(ws)
                        .map(|((a, b), w)| *w as f64 * ((a - b) as f64).powi(2))
                        .sum()
                })
                .collect()
        })
        .collect();
    for b in 0..nb {
        // Ties go to llama.cpp's candidate (index 1), then the plain one.
        let mut pick = 1;
        for (c, e) in errs.iter().enumerate() {
            if e[b] < errs[pick][b] {
                pick = c;
            }
        }
        out[b * bsz..(b + 1) * bsz].copy_from_slice(block_bytes(&cands[pick][b..b + 1]));
    }
}

/// candle's dtype for a ggml type we read and run.
pub fn candle_dtype(ty: &GgmlType) -> Result<candle_core::quantized::GgmlDType> {
    ty.ggml_dtype()
        .ok_or_else(|| Error::Unsupported(format!("ggml type {ty} is not implemented")))
}

/// Dequantizes `bytes` of type `ty` (rows of `ne0`) to f32.
pub fn dequantize(ty: &GgmlType, bytes: &[u8], ne0: usize) -> Result<Vec<f32>> {
    use candle_core::quantized::QTensor;
    let dt = candle_dtype(ty)?;
    let row = ty
        .nbytes(ne0, 1)
        .ok_or_else(|| Error::Invalid(format!("rows of {ne0} do not fit {}", ty.name())))?;
    let rows = bytes.len() / row;
    let dev = candle_core::Device::Cpu;
    let storage =
        candle_core::quantized::QStorage::from_data(std::borrow::Cow::Borrowed(bytes), &dev, dt)?;
    let q = QTensor::new(storage, (rows, ne0))?;
    Ok(q.dequantize(&dev)?.flatten_all()?.to_vec1::<f32>()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ty(name: &str) -> GgmlType {
        name.parse().unwrap()
    }

    #[test]
    fn legacy_reference_round_trips_through_candle() {
        let x: Vec<f32> = (0..64)
            .map(|i| ((i * 37 % 64) as f32 - 31.5) / 7.0)
            .collect();
        for name in ["Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0"] {
            let t = ty(name);
            let q = quantize(&t, &x, 64, None).unwrap();
            let d = dequantize(&t, &q, 64).unwrap();
            let worst = x
                .iter()
                .zip(&d)
                .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(worst < 0.7, "{name}: {worst}");
        }
    }

    #[test]
    fn nearest_is_round_half_even() {
        let mut v: Vec<f32> = (-2000..2000).map(|k| k as f32 * 0.25).collect();
        v.extend([
            0.49999997,
            -0.49999997,
            4194303.5,
            4194304.5,
            -4194305.5,
            8388609.0,
            1e10,
            -1e10,
            f32::NAN,
            3e-40,
        ]);
        for x in v {
            assert_eq!(nearest(x), x.round_ties_even() as i32, "{x}");
        }
    }

    #[test]
    fn threads_do_not_change_bytes() {
        let x: Vec<f32> = (0..256 * 300)
            .map(|i| ((i * 7919 % 1000) as f32 - 500.0) / 300.0)
            .collect();
        let qw: Vec<f32> = (0..256).map(|j| 1.0 + (j % 13) as f32).collect();
        for name in ["Q4_K", "Q5_0", "Q6_K"] {
            let t = ty(name);
            let a = quantize(&t, &x, 256, Some(&qw)).unwrap();
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .build()
                .unwrap();
            let b = pool.install(|| quantize(&t, &x, 256, Some(&qw)).unwrap());
            assert_eq!(a, b, "{name}");
        }
    }
}
