//! Exact INT8 × INT8 → i32 matrix products for W8A8 layers: `C = A · Wᵀ` with per-token INT8
//! activation codes and INT8 weight codes, every sum exact (as the integer tensor-core and
//! VNNI kernels of serving runtimes compute it).
//!
//! The weight is packed into panels of [`NR`] output channels holding, for every quad of input
//! positions, the 32 channels' four codes side by side (`[k/4][32][4]`), the layout that the
//! AVX-512 VNNI unsigned × signed quad dot product (`vpdpbusd`) reads. That instruction wants
//! unsigned activations, so rows of `A` enter as `code + 128` and each output subtracts
//! `128 · Σ_k w` afterwards. With `|code| ≤ 127` no sum can overflow i32 for `k < 2^16`
//! (`255 · 127 · 65536 < 2^31`). Integer arithmetic makes the portable path trivially identical.

use rayon::prelude::*;

/// Output channels per packed panel.
pub const NR: usize = 32;
const MR: usize = 12;
const KC_QUADS: usize = 256;
const MC: usize = 8 * MR;

/// Whether this CPU runs the VNNI kernel (and `MINITRON_KERNEL` is not `portable`).
pub fn vnni() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        if std::env::var("MINITRON_KERNEL").is_ok_and(|v| v == "portable") {
            return false;
        }
        #[cfg(target_arch = "x86_64")]
        {
            std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512vnni")
        }
        #[cfg(not(target_arch = "x86_64"))]
        false
    })
}

/// INT8 weight codes `[n, k]` as panels, with each channel's code sum.
#[derive(Debug, Clone)]
pub struct PackedI8 {
    n: usize,
    k: usize,
    kq: usize,
    data: Vec<u32>,
    col_sums: Vec<i32>,
}

impl PackedI8 {
    /// Packs row-major codes `q` (`[n, k]`).
    pub fn new(q: &[i8], n: usize, k: usize) -> Self {
        assert!(k < 1 << 16, "INT8 GEMM: k = {k} could overflow i32 sums");
        let kq = k.div_ceil(4);
        let panels = n.div_ceil(NR);
        let mut data = vec![0u32; panels * kq * NR];
        data.par_chunks_mut(kq * NR)
            .enumerate()
            .for_each(|(p, panel)| {
                for j in 0..NR {
                    let r = p * NR + j;
                    if r >= n {
                        break;
                    }
                    let row = &q[r * k..(r + 1) * k];
                    for t in 0..kq {
                        let mut b = [0u8; 4];
                        for (u, bb) in b.iter_mut().enumerate() {
                            if let Some(&v) = row.get(4 * t + u) {
                                *bb = v as u8;
                            }
                        }
                        panel[t * NR + j] = u32::from_le_bytes(b);
                    }
                }
            });
        let col_sums = (0..n)
            .map(|r| q[r * k..(r + 1) * k].iter().map(|&v| v as i32).sum())
            .collect();
        PackedI8 {
            n,
            k,
            kq,
            data,
            col_sums,
        }
    }

    pub fn shape(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// Bytes per row of `A` as [`gemm_i8`] reads it (`k` rounded up to a multiple of 4).
    /// (Plus one cache line when a row would span a multiple of 4 KiB, see `gemm::PackedBf16::lda`.)
    pub fn lda(&self) -> usize {
        let v = 4 * self.kq;
        if v.is_multiple_of(4096) {
            v + 64
        } else {
            v
        }
    }
}

/// Per-token INT8 codes of f32 rows `[m, k]` as vLLM quantizes dynamic W8A8 activations
/// (`s = absmax / 127`, or 1 for an all-zero row; `round_half_even(x / s)` clamped to ±127),
/// stored as `code + 128` in rows of `lda` bytes (padding: code 0), with the scales.
pub fn quantize_rows(x: &[f32], k: usize, lda: usize) -> (Vec<u8>, Vec<f32>) {
    let m = x.len() / k.max(1);
    let mut a = vec![128u8; m * lda];
    let mut s = vec![0f32; m];
    a.par_chunks_mut(lda)
        .zip(s.par_iter_mut())
        .zip(x.par_chunks(k))
        .for_each(|((o, sc), r)| {
            let amax = r.iter().fold(0f32, |m, &v| m.max(v.abs()));
            *sc = if amax > 0.0 { amax / 127.0 } else { 1.0 };
            for (d, &v) in o.iter_mut().zip(r) {
                let c = (v / *sc).round_ties_even().clamp(-127.0, 127.0) as i32;
                *d = (c + 128) as u8;
            }
        });
    (a, s)
}

/// `C[m, n] = Σ_k code_a · code_w`, exact, for `A` from [`quantize_rows`].
pub fn gemm_i8(a: &[u8], m: usize, w: &PackedI8, fast: bool) -> Vec<i32> {
    let (n, lda) = (w.n, w.lda());
    assert!(a.len() >= m * lda);
    let mut c = vec![0i32; m * n];
    let panels = n.div_ceil(NR);
    let threads = rayon::current_num_threads().max(1);
    let row_blocks = m.div_ceil(MC);
    let want = (4 * threads).div_ceil(row_blocks).clamp(1, panels.max(1));
    let per = panels.div_ceil(want).max(1);
    let col_blocks = panels.div_ceil(per);
    let cp = SendPtr(c.as_mut_ptr());
    (0..row_blocks * col_blocks).into_par_iter().for_each(|t| {
        let (rb, cb) = (t / col_blocks, t % col_blocks);
        let rows = rb * MC..(rb * MC + MC).min(m);
        let pan = cb * per..(cb * per + per).min(panels);
        let cp = &cp;
        // SAFETY: disjoint output rectangles per task.
        unsafe { tile(fast, a, lda, w, cp.0, n, rows, pan) };
    });
    c.par_chunks_mut(n.max(1)).for_each(|r| {
        for (v, s) in r.iter_mut().zip(&w.col_sums) {
            *v -= 128 * s;
        }
    });
    c
}

struct SendPtr(*mut i32);
// SAFETY: used only to hand disjoint output tiles to rayon tasks.
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

#[allow(clippy::too_many_arguments)]
unsafe fn tile(
    fast: bool,
    a: &[u8],
    lda: usize,
    w: &PackedI8,
    c: *mut i32,
    ldc: usize,
    rows: std::ops::Range<usize>,
    pan: std::ops::Range<usize>,
) {
    let kq = w.kq;
    let mut q0 = 0;
    while q0 < kq {
        let q1 = (q0 + KC_QUADS).min(kq);
        for p in pan.clone() {
            let cols = NR.min(w.n - p * NR);
            let wp = w.data.as_ptr().add(p * kq * NR + q0 * NR);
            let mut i = rows.start;
            while i < rows.end {
                let mr = MR.min(rows.end - i);
                let ap = a.as_ptr().add(i * lda + 4 * q0);
                let cp = c.add(i * ldc + p * NR);
                #[cfg(target_arch = "x86_64")]
                if fast {
                    vnni::micro(mr, q1 - q0, ap, lda, wp, cp, ldc, cols, q0 == 0);
                    i += mr;
                    continue;
                }
                let _ = fast;
                portable_micro(mr, q1 - q0, ap, lda, wp, cp, ldc, cols, q0 == 0);
                i += mr;
            }
        }
        q0 = q1;
    }
}

#[allow(clippy::too_many_arguments)]
unsafe fn portable_micro(
    mr: usize,
    kq: usize,
    a: *const u8,
    lda: usize,
    w: *const u32,
    c: *mut i32,
    ldc: usize,
    cols: usize,
    first: bool,
) {
    for r in 0..mr {
        let mut acc = [0i32; NR];
        if !first {
            for (j, v) in acc.iter_mut().enumerate().take(cols) {
                *v = *c.add(r * ldc + j);
            }
        }
        for q in 0..kq {
            let av = std::ptr::read_unaligned(a.add(r * lda + 4 * q) as *const [u8; 4]);
            let wq = std::slice::from_raw_parts(w.add(q * NR), NR);
            for (v, &wv) in acc.iter_mut().zip(wq) {
                let wb = wv.to_le_bytes();
                for u in 0..4 {
                    *v += av[u] as i32 * wb[u] as i8 as i32;
                }
            }
        }
        for (j, v) in acc.iter().enumerate().take(cols) {
            *c.add(r * ldc + j) = *v;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod vnni {
    use std::arch::x86_64::*;

    use super::NR;

    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub(super) unsafe fn micro(
        mr: usize,
        kq: usize,
        a: *const u8,
        lda: usize,
        w: *const u32,
        c: *mut i32,
        ldc: usize,
        cols: usize,
        first: bool,
    ) {
        macro_rules! dispatch {
            ($($n:literal)*) => {
                match mr {
                    $($n => kernel::<$n>(kq, a, lda, w, c, ldc, cols, first),)*
                    _ => unreachable!("MR is 12"),
                }
            };
        }
        dispatch!(1 2 3 4 5 6 7 8 9 10 11 12)
    }

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512vnni")]
    unsafe fn kernel<const R: usize>(
        kq: usize,
        a: *const u8,
        lda: usize,
        w: *const u32,
        c: *mut i32,
        ldc: usize,
        cols: usize,
        first: bool,
    ) {
        let m0: __mmask16 = if cols >= 16 {
            0xffff
        } else {
            (1u32 << cols) as u16 - 1
        };
        let m1: __mmask16 = if cols >= 32 {
            0xffff
        } else if cols > 16 {
            (1u32 << (cols - 16)) as u16 - 1
        } else {
            0
        };
        let mut acc = [[_mm512_setzero_si512(); 2]; R];
        if !first {
            for (r, a2) in acc.iter_mut().enumerate() {
                let cr = c.add(r * ldc);
                a2[0] = _mm512_maskz_loadu_epi32(m0, cr);
                a2[1] = _mm512_maskz_loadu_epi32(m1, cr.add(16));
            }
        }
        for q in 0..kq {
            let wq = w.add(q * NR) as *const __m512i;
            let w0 = _mm512_loadu_si512(wq);
            let w1 = _mm512_loadu_si512(wq.add(1));
            for (r, a2) in acc.iter_mut().enumerate() {
                let quad = std::ptr::read_unaligned(a.add(r * lda + 4 * q) as *const i32);
                let av = _mm512_set1_epi32(quad);
                a2[0] = _mm512_dpbusd_epi32(a2[0], av, w0);
                a2[1] = _mm512_dpbusd_epi32(a2[1], av, w1);
            }
        }
        for (r, a2) in acc.iter().enumerate() {
            let cr = c.add(r * ldc);
            _mm512_mask_storeu_epi32(cr, m0, a2[0]);
            _mm512_mask_storeu_epi32(cr.add(16), m1, a2[1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numerics::rng::SplitMix64;

    #[test]
    fn both_paths_give_the_exact_integer_sums() {
        let mut r = SplitMix64::new(21);
        for &(m, n, k) in &[(1, 1, 1), (13, 45, 7), (30, 64, 1030), (97, 33, 300)] {
            let q: Vec<i8> = (0..n * k).map(|_| (r.next_u64() % 255) as i8).collect();
            let q: Vec<i8> = q.iter().map(|&v| v.max(-127)).collect();
            let x: Vec<f32> = (0..m * k)
                .map(|_| (r.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
                .collect();
            let w = PackedI8::new(&q, n, k);
            let (a, _) = quantize_rows(&x, k, w.lda());
            let want: Vec<i32> = (0..m * n)
                .map(|idx| {
                    let (i, j) = (idx / n, idx % n);
                    (0..k)
                        .map(|t| (a[i * w.lda() + t] as i32 - 128) * q[j * k + t] as i32)
                        .sum()
                })
                .collect();
            assert_eq!(gemm_i8(&a, m, &w, false), want, "portable {m}x{n}x{k}");
            if vnni() {
                assert_eq!(gemm_i8(&a, m, &w, true), want, "vnni {m}x{n}x{k}");
            } else {
                eprintln!("SKIPPED vnni path: this CPU lacks AVX-512 VNNI");
            }
        }
    }
}
