//! The block forward on a CPU with an f32 residual stream: norms, RoPE, causal attention and
//! SwiGLU in f32 on plain row buffers, with no intermediate tensors ([`eligible`] says when).
//! The products go to `runtime::gemm` (or a layer's own tensor form); attention is computed
//! here, only over the causal half of each chunk, and in packed rows only from the first key
//! tile a query tile's groups can see.
//!
//! Each function is written once as ordinary scalar code with fused multiply-adds
//! (`f32::mul_add`) and compiled twice, for AVX-512 and for any CPU: the operations and their
//! order are the same, so both give identical numbers. Work is split by rows, chunks and heads,
//! never inside a sum, so results do not depend on the thread count.

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::error::Result;
use crate::model::names::InputSite;
use crate::model::LlamaConfig;
use crate::runtime::block::{Block, Observer};
use crate::runtime::linear::Linear;

/// `e^x` in f32, within 2 ulp over the range softmax and SiLU use (`x ≤ 88`); 0 below −87.
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    const MAGIC: f32 = 12_582_912.0; // 1.5 · 2^23: adding it rounds to an integer
    let xc = x.clamp(-87.0, 88.0);
    let n = xc.mul_add(LOG2E, MAGIC) - MAGIC;
    let r = n.mul_add(-LN2_LO, n.mul_add(-LN2_HI, xc));
    // Taylor terms to r^7 on |r| ≤ ln2/2.
    let mut p = 1.0 / 5040.0f32;
    p = p.mul_add(r, 1.0 / 720.0);
    p = p.mul_add(r, 1.0 / 120.0);
    p = p.mul_add(r, 1.0 / 24.0);
    p = p.mul_add(r, 1.0 / 6.0);
    p = p.mul_add(r, 0.5);
    p = p.mul_add(r, 1.0);
    p = p.mul_add(r, 1.0);
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x < -87.0 {
        0.0
    } else {
        p * scale
    }
}

multiversion! {
    /// RMSNorm of one row into `out`.
    fn rms_row(x: &[f32], w: &[f32], eps: f32, out: &mut [f32]) {
        let ss = crate::simd::sum_sq_f32(x);
        let s = 1.0 / (ss / x.len() as f32 + eps).sqrt();
        for ((o, &v), &g) in out.iter_mut().zip(x).zip(w) {
            *o = v * s * g;
        }
    }
}

/// RMSNorm of `[rows, n]`.
pub fn rms_norm(x: &[f32], w: &[f32], eps: f32) -> Vec<f32> {
    let n = w.len();
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(n)
        .zip(x.par_chunks(n))
        .for_each(|(o, r)| rms_row(r, w, eps, o));
    out
}

multiversion! {
    /// RoPE on every head of one row (the two halves of each head are the rotated pairs).
    fn rope_row(row: &mut [f32], hd: usize, cos: &[f32], sin: &[f32]) {
        let half = hd / 2;
        for h in row.chunks_exact_mut(hd) {
            let (a, b) = h.split_at_mut(half);
            for i in 0..half {
                let (x1, x2) = (a[i], b[i]);
                a[i] = x1.mul_add(cos[i], -(x2 * sin[i]));
                b[i] = x2.mul_add(cos[i], x1 * sin[i]);
            }
        }
    }
}

multiversion! {
    /// `silu(g) · u`, in place in `g`.
    fn swiglu(g: &mut [f32], u: &[f32]) {
        for (a, &b) in g.iter_mut().zip(u) {
            *a = *a / (1.0 + exp(-*a)) * b;
        }
    }
}

/// RoPE on rows of `width` values (`b` chunks of `t` positions each, row `r` at position
/// `r % t`); `cos`/`sin` are `[t, hd/2]`.
/// RoPE on rows of `width` values: row `r` at position `r mod t`, or `pos[r]` when given
/// (packed rows, [`crate::runtime::Packing`]); `cos`/`sin` hold positions `0 .. t`.
fn rope_rows(
    x: &mut [f32],
    width: usize,
    hd: usize,
    t: usize,
    pos: Option<&[u32]>,
    cos: &[f32],
    sin: &[f32],
) {
    let half = hd / 2;
    x.par_chunks_mut(width).enumerate().for_each(|(r, row)| {
        let p = pos.map_or(r % t, |p| p[r] as usize);
        rope_row(
            row,
            hd,
            &cos[p * half..(p + 1) * half],
            &sin[p * half..(p + 1) * half],
        );
    });
}

/// Query rows per attention tile.
const QR: usize = 8;
/// Key columns per score tile.
const KC: usize = 32;

/// Scores of a tile of query rows against keys `j0 .. j0 + KC`: `acc[r][c] = Σ_d q[r][d] ·
/// kt[d][j0 + c]`, `d` in order.
#[inline(always)]
fn score_tile(
    q: &[f32],
    qs: usize,
    kt: &[f32],
    tp: usize,
    hd: usize,
    j0: usize,
) -> [[f32; KC]; QR] {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::avx512() {
        assert!(q.len() >= (QR - 1) * qs + hd && kt.len() >= (hd - 1) * tp + j0 + KC);
        // SAFETY: the CPU has AVX-512F, and the bounds above cover every load.
        return unsafe { x86::score_tile(q, qs, kt, tp, hd, j0) };
    }
    score_tile_portable(q, qs, kt, tp, hd, j0)
}

/// [`score_tile`] in plain Rust.
#[inline(always)]
fn score_tile_portable(
    q: &[f32],
    qs: usize,
    kt: &[f32],
    tp: usize,
    hd: usize,
    j0: usize,
) -> [[f32; KC]; QR] {
    let mut acc = [[0f32; KC]; QR];
    for d in 0..hd {
        let kv: &[f32; KC] = kt[d * tp + j0..d * tp + j0 + KC]
            .try_into()
            .expect("KC keys");
        for (r, a) in acc.iter_mut().enumerate() {
            let qv = q[r * qs + d];
            for c in 0..KC {
                a[c] = qv.mul_add(kv[c], a[c]);
            }
        }
    }
    acc
}

/// `out[r] += Σ_j p[r][j] · v[j]` for `R` rows of `HD` values, `j` in order.
#[inline(always)]
fn pv_rows<const R: usize, const HD: usize>(
    p: &[f32],
    ps: usize,
    v: &[f32],
    n: usize,
    out: &mut [f32],
    os: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if crate::simd::avx512() && HD.is_multiple_of(16) {
        assert!(n == 0 || (p.len() >= (R - 1) * ps + n && v.len() >= n * HD));
        assert!(out.len() >= (R - 1) * os + HD);
        // SAFETY: the CPU has AVX-512F, and the bounds above cover every load and store.
        unsafe { x86::pv_rows::<R, HD>(p, ps, v, n, out, os) };
        return;
    }
    pv_rows_portable::<R, HD>(p, ps, v, n, out, os)
}

/// [`pv_rows`] in plain Rust.
#[inline(always)]
fn pv_rows_portable<const R: usize, const HD: usize>(
    p: &[f32],
    ps: usize,
    v: &[f32],
    n: usize,
    out: &mut [f32],
    os: usize,
) {
    let mut acc = [[0f32; HD]; R];
    for j in 0..n {
        let vr: &[f32; HD] = v[j * HD..(j + 1) * HD].try_into().expect("HD values");
        for (r, a) in acc.iter_mut().enumerate() {
            let pv = p[r * ps + j];
            for d in 0..HD {
                a[d] = pv.mul_add(vr[d], a[d]);
            }
        }
    }
    for (r, a) in acc.iter().enumerate() {
        out[r * os..r * os + HD].copy_from_slice(a);
    }
}

/// The attention tiles with AVX-512 registers held explicitly: the key (or value) vectors are
/// loaded once per step and reused by every row, which the compiler's own schedule does not do
/// (it re-reads them per row and runs out of load ports). Each lane does the same
/// `fma(q, k, acc)` sequence as the portable loops, so the results are bit-identical.
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{KC, QR};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx512f")]
    pub unsafe fn score_tile(
        q: &[f32],
        qs: usize,
        kt: &[f32],
        tp: usize,
        hd: usize,
        j0: usize,
    ) -> [[f32; KC]; QR] {
        let mut acc = [[_mm512_setzero_ps(); 2]; QR];
        let (qp, kp) = (q.as_ptr(), kt.as_ptr());
        for d in 0..hd {
            let k0 = _mm512_loadu_ps(kp.add(d * tp + j0));
            let k1 = _mm512_loadu_ps(kp.add(d * tp + j0 + 16));
            for (r, a) in acc.iter_mut().enumerate() {
                let qv = _mm512_set1_ps(*qp.add(r * qs + d));
                a[0] = _mm512_fmadd_ps(qv, k0, a[0]);
                a[1] = _mm512_fmadd_ps(qv, k1, a[1]);
            }
        }
        let mut out = [[0f32; KC]; QR];
        for (o, a) in out.iter_mut().zip(&acc) {
            _mm512_storeu_ps(o.as_mut_ptr(), a[0]);
            _mm512_storeu_ps(o.as_mut_ptr().add(16), a[1]);
        }
        out
    }

    #[target_feature(enable = "avx512f")]
    pub unsafe fn pv_rows<const R: usize, const HD: usize>(
        p: &[f32],
        ps: usize,
        v: &[f32],
        n: usize,
        out: &mut [f32],
        os: usize,
    ) {
        const { assert!(HD.is_multiple_of(16) && HD <= 128) };
        let mut acc = [[_mm512_setzero_ps(); 8]; R];
        let (pp, vp) = (p.as_ptr(), v.as_ptr());
        let w = HD / 16;
        for j in 0..n {
            let mut vr = [_mm512_setzero_ps(); 8];
            for (x, vx) in vr.iter_mut().enumerate().take(w) {
                *vx = _mm512_loadu_ps(vp.add(j * HD + x * 16));
            }
            for (r, a) in acc.iter_mut().enumerate() {
                let pv = _mm512_set1_ps(*pp.add(r * ps + j));
                for x in 0..w {
                    a[x] = _mm512_fmadd_ps(pv, vr[x], a[x]);
                }
            }
        }
        for (r, a) in acc.iter().enumerate() {
            for (x, ax) in a.iter().enumerate().take(w) {
                _mm512_storeu_ps(out.as_mut_ptr().add(r * os + x * 16), *ax);
            }
        }
    }
}

/// [`pv_rows`] for any head size.
#[allow(clippy::too_many_arguments)]
fn pv_rows_dyn(
    p: &[f32],
    ps: usize,
    v: &[f32],
    n: usize,
    hd: usize,
    rows: usize,
    out: &mut [f32],
    os: usize,
) {
    for r in 0..rows {
        let o = &mut out[r * os..r * os + hd];
        o.iter_mut().for_each(|x| *x = 0.0);
        for j in 0..n {
            let pv = p[r * ps + j];
            for (x, &vv) in o.iter_mut().zip(&v[j * hd..(j + 1) * hd]) {
                *x = pv.mul_add(vv, *x);
            }
        }
    }
}

multiversion! {
    /// Causal attention of query rows `i0 .. i0 + rows` of one head: `q` `[QR, hd]` (row
    /// stride `qs`; rows past `rows` are read but unused), `kt` the head's keys transposed and
    /// zero-padded `[hd, tp]`, `v` its values `[t, hd]`; writes `[rows, hd]` into `out` (row
    /// stride `os`). `s` is scratch of `QR · tp` values. Row `r` sees keys `0 ..= i0 + r`;
    /// the probabilities of the keys it does not see are exactly zero, so a tile's rows share
    /// one loop. With `vis` (the chunk's [`crate::runtime::Packing`] segments), row `r` sees
    /// key `j` only where the segments allow it; the others get probability exactly zero.
    fn attend(
        q: &[f32],
        qs: usize,
        kt: &[f32],
        tp: usize,
        v: &[f32],
        hd: usize,
        i0: usize,
        rows: usize,
        j_lo: usize,
        scale: f32,
        vis: Option<&[(u32, u32)]>,
        s: &mut [f32],
        out: &mut [f32],
        os: usize,
    ) {
        let end = i0 + rows;
        let mut j0 = j_lo;
        while j0 < end {
            let acc = score_tile(q, qs, kt, tp, hd, j0);
            for (r, a) in acc.iter().enumerate() {
                for c in 0..KC {
                    s[r * tp + j0 + c] = a[c] * scale;
                }
            }
            j0 += KC;
        }
        for r in 0..rows {
            let n = i0 + r + 1;
            let sr = &mut s[r * tp + j_lo..r * tp + end];
            let n = n - j_lo;
            if let Some(seg) = vis {
                let me = seg[i0 + r];
                for (j, x) in sr[..n].iter_mut().enumerate() {
                    if !crate::runtime::Packing::sees(me, seg[j_lo + j]) {
                        *x = f32::NEG_INFINITY;
                    }
                }
            }
            let m = crate::simd::max_f32(&sr[..n]);
            for x in sr[..n].iter_mut() {
                *x = exp(*x - m);
            }
            let sum = crate::simd::sum_f32(&sr[..n]);
            let inv = 1.0 / sum;
            for x in sr[..n].iter_mut() {
                *x *= inv;
            }
            sr[n..].iter_mut().for_each(|x| *x = 0.0);
        }
        // Keys before `j_lo` are hidden from every row of the tile: their probabilities are
        // exactly zero, so the products start at `j_lo`.
        let (v, end) = (&v[j_lo * hd..], end - j_lo);
        let mut r0 = 0;
        while r0 < rows {
            let pr = &s[r0 * tp + j_lo..];
            let o = &mut out[r0 * os..];
            let step = match (hd, rows - r0) {
                (64, 4..) => {
                    pv_rows::<4, 64>(pr, tp, v, end, o, os);
                    4
                }
                (64, _) => {
                    pv_rows::<1, 64>(pr, tp, v, end, o, os);
                    1
                }
                (128, 2..) => {
                    pv_rows::<2, 128>(pr, tp, v, end, o, os);
                    2
                }
                (128, _) => {
                    pv_rows::<1, 128>(pr, tp, v, end, o, os);
                    1
                }
                _ => {
                    pv_rows_dyn(pr, tp, v, end, hd, 1, o, os);
                    1
                }
            };
            r0 += step;
        }
    }
}

/// Causal grouped-query attention over `b` chunks of `t` positions: `q` `[b·t, h·hd]`, `k` and
/// `v` `[b·t, kvh·hd]`; returns `[b·t, h·hd]`. With `seg` (`[b·t]`, packed rows), a position
/// sees only the earlier positions its segment shares ([`crate::runtime::Packing::sees`]).
#[allow(clippy::too_many_arguments)]
pub fn attention(
    q: &[f32],
    k: &[f32],
    v: &[f32],
    b: usize,
    t: usize,
    h: usize,
    kvh: usize,
    hd: usize,
    seg: Option<&[(u32, u32)]>,
) -> Vec<f32> {
    let g = h / kvh;
    let scale = 1.0 / (hd as f32).sqrt();
    let (qw, kw) = (h * hd, kvh * hd);
    // Per position, the first key it sees: 0 without segments; in packed rows the start of its
    // group's prefix, so a tile of queries skips the whole key tiles before its groups.
    let first: Vec<usize> = match seg {
        None => vec![0; b * t],
        Some(sg) => (0..b * t)
            .into_par_iter()
            .map(|i| {
                let (c, me) = (i / t, sg[i]);
                (c * t..=i)
                    .find(|&j| crate::runtime::Packing::sees(me, sg[j]))
                    .map_or(0, |j| j - c * t)
            })
            .collect(),
    };
    // One task per (chunk, KV head): its keys transposed and values gathered once, then the
    // group's query heads tile by tile. Outputs are written per task into its own buffer.
    let parts: Vec<(usize, usize, Vec<f32>)> = (0..b * kvh)
        .into_par_iter()
        .map(|task| {
            let (c, kh) = (task / kvh, task % kvh);
            let tp = t.div_ceil(KC) * KC;
            let mut kt = vec![0f32; hd * tp];
            let mut vv = vec![0f32; t * hd];
            for j in 0..t {
                let src = (c * t + j) * kw + kh * hd;
                for d in 0..hd {
                    kt[d * tp + j] = k[src + d];
                }
                vv[j * hd..(j + 1) * hd].copy_from_slice(&v[src..src + hd]);
            }
            let mut out = vec![0f32; g * t * hd];
            let mut s = vec![0f32; QR * tp];
            // The head's queries, QR-row padded, so every tile reads QR rows.
            let mut qh = vec![0f32; t.div_ceil(QR) * QR * hd];
            for gi in 0..g {
                let head = kh * g + gi;
                for i in 0..t {
                    let src = (c * t + i) * qw + head * hd;
                    qh[i * hd..(i + 1) * hd].copy_from_slice(&q[src..src + hd]);
                }
                let mut i0 = 0;
                while i0 < t {
                    let rows = QR.min(t - i0);
                    let lo = first[c * t + i0..c * t + i0 + rows]
                        .iter()
                        .min()
                        .copied()
                        .unwrap_or(0);
                    attend(
                        &qh[i0 * hd..],
                        hd,
                        &kt,
                        tp,
                        &vv,
                        hd,
                        i0,
                        rows,
                        lo / KC * KC,
                        scale,
                        seg.map(|sg| &sg[c * t..(c + 1) * t]),
                        &mut s,
                        &mut out[(gi * t + i0) * hd..],
                        hd,
                    );
                    i0 += QR;
                }
            }
            (c, kh, out)
        })
        .collect();
    let mut y = vec![0f32; b * t * qw];
    for (c, kh, out) in parts {
        for gi in 0..g {
            let head = kh * g + gi;
            for i in 0..t {
                let dst = (c * t + i) * qw + head * hd;
                y[dst..dst + hd].copy_from_slice(&out[(gi * t + i) * hd..(gi * t + i + 1) * hd]);
            }
        }
    }
    y
}

/// Whether [`block_forward`] can run `blk`: no FP8 KV cache and no GPU-form layer. Layers on
/// the runner's own GEMMs (bf16 panels, exact INT8) always can; other CPU layers (dense f32,
/// ggml, emulated FP8 / INT8) only when nothing observes the pass, so calibration statistics
/// stay those of the tensor path they were measured on.
pub fn eligible(blk: &Block, observed: bool) -> bool {
    let all = linears(blk);
    blk.kv_scales.is_none()
        && !all.iter().any(|l| matches!(l, Linear::Device(_)))
        && (!observed || all.iter().all(|l| l.is_packed()))
}

fn linears(blk: &Block) -> [&Linear; 7] {
    [
        &blk.q, &blk.k, &blk.v, &blk.o, &blk.gate, &blk.up, &blk.down,
    ]
}

/// Layers that read the same f32 rows `x` (`[rows, inp]`): the runner's own GEMMs when every
/// layer is on one, otherwise each layer's tensor form on the CPU; row-major f32 outputs.
fn rows_forward(layers: &[&Linear], x: &[f32], inp: usize) -> Result<Vec<Vec<f32>>> {
    if layers.iter().all(|l| l.is_packed()) {
        return Linear::packed_rows(layers, x, inp);
    }
    let xt = Tensor::from_slice(x, (x.len() / inp, inp), &Device::Cpu)?;
    Linear::forward_shared(layers, &xt)?
        .into_iter()
        .map(|y| Ok(y.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?))
        .collect()
}

/// Packed rows' positions and segments, `[b·t]` each ([`crate::runtime::Packing`]).
pub type PackedRows<'a> = (&'a [u32], &'a [(u32, u32)]);

/// The block on `b` chunks of `t` positions with no cache, residual stream `x` `[b·t, hidden]`
/// updated in place. `cos`/`sin` are `[t, head_dim/2]`; `packing` gives packed rows' positions
/// and segments (`[b·t]` each).
#[allow(clippy::too_many_arguments)]
pub fn block_forward(
    blk: &Block,
    l: usize,
    c: &LlamaConfig,
    x: &mut [f32],
    b: usize,
    t: usize,
    cos: &[f32],
    sin: &[f32],
    packing: Option<PackedRows<'_>>,
    obs: &mut Option<&mut dyn Observer>,
) -> Result<()> {
    let (h, kvh, hd, hs) = (
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
        c.hidden_size,
    );
    let eps = c.rms_norm_eps as f32;
    let w_in: Vec<f32> = blk.input_norm.to_vec1()?;
    let w_post: Vec<f32> = blk.post_norm.to_vec1()?;
    let xn = rms_norm(x, &w_in, eps);
    if let Some(o) = obs.as_deref_mut() {
        o.linear_input(l, InputSite::AttnIn, &xn)?;
    }
    let mut qkv = rows_forward(&[&blk.q, &blk.k, &blk.v], &xn, hs)?.into_iter();
    let (mut q, mut k, v) = (
        qkv.next().expect("q"),
        qkv.next().expect("k"),
        qkv.next().expect("v"),
    );
    let (pos, seg) = (packing.map(|p| p.0), packing.map(|p| p.1));
    rope_rows(&mut q, h * hd, hd, t, pos, cos, sin);
    rope_rows(&mut k, kvh * hd, hd, t, pos, cos, sin);
    if let Some(o) = obs.as_deref_mut() {
        o.kv(l, &k, &v)?;
    }
    let y = attention(&q, &k, &v, b, t, h, kvh, hd, seg);
    drop((q, k, v));
    if let Some(o) = obs.as_deref_mut() {
        o.linear_input(l, InputSite::AttnOut, &y)?;
    }
    let o = rows_forward(&[&blk.o], &y, h * hd)?.pop().expect("o");
    add_into(x, &o);
    let xn = rms_norm(x, &w_post, eps);
    if let Some(o) = obs.as_deref_mut() {
        o.linear_input(l, InputSite::MlpIn, &xn)?;
    }
    let mut gu = rows_forward(&[&blk.gate, &blk.up], &xn, hs)?.into_iter();
    let (mut g, u) = (gu.next().expect("gate"), gu.next().expect("up"));
    let inter = c.intermediate_size;
    g.par_chunks_mut(inter)
        .zip(u.par_chunks(inter))
        .for_each(|(a, b)| swiglu(a, b));
    drop(u);
    if let Some(o) = obs.as_deref_mut() {
        o.linear_input(l, InputSite::MlpAct, &g)?;
    }
    let d = rows_forward(&[&blk.down], &g, inter)?.pop().expect("down");
    add_into(x, &d);
    Ok(())
}

/// `x += d`, in parallel over large slices (one rayon task per element costs more than the add).
fn add_into(x: &mut [f32], d: &[f32]) {
    x.par_chunks_mut(1 << 14)
        .zip(d.par_chunks(1 << 14))
        .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, &b)| *a += b));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_within_two_ulp_of_libm() {
        let mut worst = 0u32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (exp(x), x.exp());
            worst = worst.max((a.to_bits() as i64 - b.to_bits() as i64).unsigned_abs() as u32);
            x += 0.000_731;
        }
        assert!(worst <= 2, "worst {worst} ulp");
        assert_eq!(exp(-100.0), 0.0);
        assert_eq!(exp(0.0), 1.0);
    }

    /// Attention against a direct f64 evaluation of softmax(QKᵀ/√d + causal mask)·V.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn intrinsic_attention_tiles_equal_the_portable_loops() {
        if !crate::simd::avx512() {
            eprintln!("SKIPPED: this CPU has no AVX-512; only the portable tiles exist here");
            return;
        }
        let mut rng = crate::numerics::rng::SplitMix64::new(7);
        let mut r = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.unit_f32() * 2.0 - 1.0).collect() };
        let (hd, tp, qs) = (64, 96, 64);
        let (q, kt) = (r(QR * qs), r(hd * tp));
        for j0 in [0, 32, 64] {
            let a = score_tile_portable(&q, qs, &kt, tp, hd, j0);
            // SAFETY: AVX-512F is present (checked above); the slices cover every load.
            let b = unsafe { x86::score_tile(&q, qs, &kt, tp, hd, j0) };
            for (x, y) in a.iter().flatten().zip(b.iter().flatten()) {
                assert_eq!(x.to_bits(), y.to_bits());
            }
        }
        fn pv<const R: usize, const HD: usize>(p: &[f32], v: &[f32], n: usize) {
            let (mut a, mut b) = (vec![0f32; R * HD], vec![0f32; R * HD]);
            pv_rows_portable::<R, HD>(p, n, v, n, &mut a, HD);
            // SAFETY: AVX-512F is present; `p` has R rows of `n`, `v` n rows of HD.
            unsafe { x86::pv_rows::<R, HD>(p, n, v, n, &mut b, HD) };
            assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
        }
        for n in [1, 17, 95] {
            let (p, v) = (r(4 * n), r(n * 128));
            pv::<4, 64>(&p, &v, n);
            pv::<1, 64>(&p, &v, n);
            pv::<2, 128>(&p, &v, n);
            pv::<1, 128>(&p, &v, n);
        }
    }

    /// Checks [`attention`] against an f64 evaluation of the same visibility rule.
    #[allow(clippy::too_many_arguments)]
    fn check_attention(
        b: usize,
        t: usize,
        h: usize,
        kvh: usize,
        hd: usize,
        seg: Option<&[(u32, u32)]>,
        tol: f64,
    ) {
        let mut r = crate::numerics::rng::SplitMix64::new(4);
        let mut rnd = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| ((r.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 4.0)
                .collect()
        };
        let q = rnd(b * t * h * hd);
        let k = rnd(b * t * kvh * hd);
        let v = rnd(b * t * kvh * hd);
        let y = attention(&q, &k, &v, b, t, h, kvh, hd, seg);
        let g = h / kvh;
        let sees = |c: usize, i: usize, j: usize| {
            seg.is_none_or(|sg| crate::runtime::Packing::sees(sg[c * t + i], sg[c * t + j]))
        };
        for c in 0..b {
            for head in 0..h {
                let kh = head / g;
                for i in 0..t {
                    let qi = &q[(c * t + i) * h * hd + head * hd..][..hd];
                    let keys: Vec<usize> = (0..=i).filter(|&j| sees(c, i, j)).collect();
                    let s: Vec<f64> = keys
                        .iter()
                        .map(|&j| {
                            let kj = &k[(c * t + j) * kvh * hd + kh * hd..][..hd];
                            qi.iter()
                                .zip(kj)
                                .map(|(a, b)| *a as f64 * *b as f64)
                                .sum::<f64>()
                                / (hd as f64).sqrt()
                        })
                        .collect();
                    let m = s.iter().cloned().fold(f64::MIN, f64::max);
                    let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                    let z: f64 = e.iter().sum();
                    for d in 0..hd {
                        let want: f64 = keys
                            .iter()
                            .zip(&e)
                            .map(|(&j, ej)| ej / z * v[(c * t + j) * kvh * hd + kh * hd + d] as f64)
                            .sum();
                        let got = y[(c * t + i) * h * hd + head * hd + d] as f64;
                        assert!(
                            (got - want).abs() < tol,
                            "{c} {head} {i} {d}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn attention_matches_an_f64_reference() {
        // f32 sums of ≤ 37·16 terms of magnitude ≤ 4: a few 1e-6.
        check_attention(2, 37, 4, 2, 16, None, 2e-5);
    }

    #[test]
    fn packed_attention_skips_hidden_keys_and_matches_an_f64_reference() {
        // Rows of 150 positions holding groups of a prefix and branches, so later groups start
        // several 32-key tiles in and their query tiles skip the tiles before them; one group
        // starts inside a query tile (rows of two groups in one tile).
        let t = 150;
        let layout: [&[usize]; 2] = [&[20, 9, 11, 7], &[5, 30]];
        let mut seg = Vec::new();
        for c in 0..2 {
            let mut row = Vec::new();
            let mut group = 0u32;
            while row.len() < t {
                for (branch, &n) in layout[(c + group as usize) % 2].iter().enumerate() {
                    row.extend(std::iter::repeat_n((group, branch as u32), n));
                }
                group += 1;
            }
            row.truncate(t);
            seg.extend(row);
        }
        // Sums of ≤ 50 terms of 64 products, magnitude ≤ 4.
        check_attention(2, t, 6, 2, 64, Some(&seg), 2e-5);
        check_attention(2, t, 4, 4, 128, Some(&seg), 4e-5);
        check_attention(2, t, 2, 1, 24, Some(&seg), 2e-5);
    }
}
