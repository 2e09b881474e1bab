//! CPU matrix products for the runner: `C = A · Wᵀ` with bf16 inputs and f32 accumulation.
//!
//! The weight is packed once into panels of [`NR`] output channels, each panel holding, for every
//! pair of input positions, the 32 channels' two values side by side (`[k/2][32][2]`): the layout
//! that the AVX-512 BF16 pair dot product (`vdpbf16ps`) reads. A row of `A` contributes one
//! broadcast pair per step, so the microkernel keeps `MR × 2` accumulators in registers and
//! streams the panel from L1.
//!
//! Arithmetic (identical on both paths, so outputs never depend on the CPU or the thread count):
//! every output starts at +0 and, for each input pair `(k, k+1)` in order, becomes
//! `(acc + a[k+1]·w[k+1]) + a[k]·w[k]`. The products of two bf16 values are exact (no rounding,
//! no exponent limit); each addition rounds to nearest even in f32; subnormal inputs and sums are
//! flushed to zero.
//! That is what `vdpbf16ps` computes (checked against this module's portable path by the tests
//! on every CPU that has the instruction), and the portable path spells it out in scalar code.
//! Work is split over rayon by output tiles only, never along `k`, so every output is one
//! unbroken chain of the same operations whatever the number of threads. The AVX2 path drops
//! the flush steps on blocks where the inputs' exponents prove that no sum can be subnormal
//! ([`needs_no_flush`]), which changes no bit.

use rayon::prelude::*;

/// Output channels per packed panel.
pub const NR: usize = 32;
/// Rows per microkernel call.
const MR: usize = 12;
/// Input pairs per cache block (256 inputs: a panel slice of 16 KiB, half of L1).
const KC_PAIRS: usize = 128;
/// Panels per L2-resident group of a task (see [`tile`]).
const PANEL_GROUP: usize = 16;
/// Rows per task: more for long rows, whose panels are the larger share of memory traffic.
fn mc(k: usize) -> usize {
    if k >= 2048 {
        16 * MR
    } else {
        8 * MR
    }
}

/// Which code computes the products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX-512 F + BF16 (`vdpbf16ps`).
    Avx512Bf16,
    /// AVX2 + FMA: each step two fused multiply-adds in f32 (see [`avx2`]).
    Avx2Fma,
    /// Scalar code with the same arithmetic; any CPU.
    Portable,
}

impl Isa {
    /// The best kernel this CPU runs, unless `MINITRON_KERNEL=portable` asks for the fallback.
    pub fn detect() -> Isa {
        static ISA: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *ISA.get_or_init(|| {
            if std::env::var("MINITRON_KERNEL").is_ok_and(|v| v == "portable") {
                return Isa::Portable;
            }
            if Isa::Avx512Bf16.available() {
                Isa::Avx512Bf16
            } else if Isa::Avx2Fma.available() {
                Isa::Avx2Fma
            } else {
                Isa::Portable
            }
        })
    }

    /// Whether this CPU can run `self`.
    pub fn available(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512Bf16 => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bf16")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2Fma => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(not(target_arch = "x86_64"))]
            Isa::Avx512Bf16 | Isa::Avx2Fma => false,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Isa::Avx512Bf16 => "avx512-bf16",
            Isa::Avx2Fma => "avx2-fma",
            Isa::Portable => "portable",
        }
    }
}

/// A weight `[n, k]` as bf16 panels (see the module documentation).
#[derive(Debug, Clone)]
pub struct PackedBf16 {
    n: usize,
    k: usize,
    /// Input pairs: `ceil(k / 2)`.
    kp: usize,
    /// `ceil(n / NR)` panels of `kp × NR` pairs (two bf16 in one u32, the lower input first);
    /// channels past `n` and the input past `k` are zero.
    data: Vec<u32>,
    /// Per panel, the smallest exponent field among its nonzero values ([`pair_exponent`]).
    panel_exp: Vec<u8>,
}

impl PackedBf16 {
    /// Packs a weight whose row `r` (`k` bf16 bit patterns) `row(r, dst)` writes into `dst`.
    pub fn from_rows<F>(n: usize, k: usize, row: F) -> Self
    where
        F: Fn(usize, &mut [u16]) + Sync,
    {
        let kp = k.div_ceil(2);
        let panels = n.div_ceil(NR);
        let mut data = vec![0u32; panels * kp * NR];
        data.par_chunks_mut(kp * NR)
            .enumerate()
            .for_each(|(p, panel)| {
                let mut buf = vec![0u16; 2 * kp];
                for j in 0..NR {
                    let r = p * NR + j;
                    if r >= n {
                        break;
                    }
                    row(r, &mut buf[..k]);
                    for q in 0..kp {
                        panel[q * NR + j] = buf[2 * q] as u32 | (buf[2 * q + 1] as u32) << 16;
                    }
                }
            });
        Self::finish(n, k, kp, data)
    }

    /// The packed weight with its panels' exponent floors.
    fn finish(n: usize, k: usize, kp: usize, data: Vec<u32>) -> Self {
        let panel_exp = data
            .par_chunks(kp * NR)
            .map(|p| p.iter().fold(u8::MAX, |m, &v| m.min(pair_exponent(v))))
            .collect();
        PackedBf16 {
            n,
            k,
            kp,
            data,
            panel_exp,
        }
    }

    /// Packs bf16 values given as little-endian bytes `[n, k]` (a safetensors BF16 tensor).
    pub fn from_bf16_bytes(bytes: &[u8], n: usize, k: usize) -> Self {
        Self::from_bf16_bytes_releasing(bytes, n, k, &|_| {})
    }

    /// [`PackedBf16::from_bf16_bytes`] in slices of rows, calling `done(byte_range)` after each
    /// slice so that a mapped source can drop the pages already packed: a large head is then
    /// never resident twice.
    pub fn from_bf16_bytes_releasing(
        bytes: &[u8],
        n: usize,
        k: usize,
        done: &(dyn Fn(std::ops::Range<usize>) + Sync),
    ) -> Self {
        debug_assert_eq!(bytes.len(), n * k * 2);
        let kp = k.div_ceil(2);
        let panels = n.div_ceil(NR);
        let mut data = vec![0u32; panels * kp * NR];
        // 64 panels (2,048 rows) per slice, the panels of a slice packed in parallel.
        const SLICE: usize = 64;
        for (si, slice) in data.chunks_mut(SLICE * kp * NR).enumerate() {
            slice
                .par_chunks_mut(kp * NR)
                .enumerate()
                .for_each(|(pi, panel)| {
                    let p = si * SLICE + pi;
                    for j in 0..NR {
                        let r = p * NR + j;
                        if r >= n {
                            break;
                        }
                        let src = &bytes[r * k * 2..(r + 1) * k * 2];
                        let half = |t: usize| -> u32 {
                            if t < k {
                                u16::from_le_bytes([src[2 * t], src[2 * t + 1]]) as u32
                            } else {
                                0
                            }
                        };
                        for q in 0..kp {
                            panel[q * NR + j] = half(2 * q) | half(2 * q + 1) << 16;
                        }
                    }
                });
            let rows = (si * SLICE * NR).min(n)..((si + 1) * SLICE * NR).min(n);
            done(rows.start * k * 2..rows.end * k * 2);
        }
        Self::finish(n, k, kp, data)
    }

    /// Packs f32 values `[n, k]`, rounding each to bf16 (nearest, ties to even).
    pub fn from_f32(values: &[f32], n: usize, k: usize) -> Self {
        debug_assert_eq!(values.len(), n * k);
        Self::from_rows(n, k, |r, dst| {
            for (d, &v) in dst.iter_mut().zip(&values[r * k..(r + 1) * k]) {
                *d = half::bf16::from_f32(v).to_bits();
            }
        })
    }

    /// `[n, k]`.
    pub fn shape(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.data.len() * 4
    }

    /// Inputs per row of `A` as [`gemm`] reads it: `k` rounded up to even, plus one cache line
    /// when a row would span a multiple of 4 KiB (rows that far apart share L1 sets, and the
    /// microkernel reads twelve of them at once).
    pub fn lda(&self) -> usize {
        lda_for(self.k)
    }
}

/// [`PackedBf16::lda`] of a weight with `k` inputs.
pub fn lda_for(k: usize) -> usize {
    let v = 2 * k.div_ceil(2);
    if (2 * v).is_multiple_of(4096) {
        v + 32
    } else {
        v
    }
}

/// The smallest exponent field of a bf16 value, zero excluded (255 for ±0; 0 for a subnormal).
#[inline(always)]
fn bf16_exponent(b: u16) -> u8 {
    if b & 0x7fff == 0 {
        u8::MAX
    } else {
        (b >> 7) as u8
    }
}

/// [`bf16_exponent`] of both halves of a packed pair, the smaller.
#[inline(always)]
fn pair_exponent(v: u32) -> u8 {
    bf16_exponent(v as u16).min(bf16_exponent((v >> 16) as u16))
}

/// Per row of `a` (`lda` values each), the smallest exponent field of its nonzero values.
fn row_exponents(a: &[u16], lda: usize) -> Vec<u8> {
    a.par_chunks(lda.max(1))
        .map(|r| r.iter().fold(u8::MAX, |m, &b| m.min(bf16_exponent(b))))
        .collect()
}

/// Whether products of inputs whose exponent fields are at least `a` and `w` can be summed in
/// plain f32 arithmetic with the same result as the module's flushing one. Values of exponent
/// field `e` are multiples of 2^(e-134); so every product, when `a + w ≥ 142`, is a multiple of
/// 2^-126, and so is every exact partial sum. A nonzero multiple of 2^-126 rounds to f32 as a
/// nonzero multiple of 2^-126 (exactly, below 2^-102; onto a coarser grid above): no sum is
/// ever subnormal, and with no subnormal input (`a, w ≥ 1`) there is nothing to flush. A chain
/// that starts from a stored value needs that value to be such a multiple too ([`grid_ok`]).
#[inline(always)]
fn needs_no_flush(a: u8, w: u8) -> bool {
    a >= 1 && w >= 1 && a as u32 + w as u32 >= 142
}

/// Whether an accumulator's starting value is zero or a multiple of 2^-126 (exponent field of
/// at least 24): see [`needs_no_flush`].
#[inline(always)]
fn grid_ok(v: f32) -> bool {
    let b = v.to_bits() & 0x7fff_ffff;
    b == 0 || b >> 23 >= 24
}

/// Rounds f32 activations `[m, k]` to bf16 rows of [`PackedBf16::lda`] values (zero-padded).
pub fn to_bf16_rows(x: &[f32], k: usize, lda: usize) -> Vec<u16> {
    let m = x.len() / k.max(1);
    let mut out = vec![0u16; m * lda];
    out.par_chunks_mut(lda)
        .zip(x.par_chunks(k))
        .for_each(|(o, r)| {
            for (d, &v) in o.iter_mut().zip(r) {
                *d = half::bf16::from_f32(v).to_bits();
            }
        });
    out
}

/// `C[m, n] = A[m, k] · Wᵀ` (bf16 `A` rows of `w.lda()` values), then each output multiplied by
/// `row_scale[i]` and by `col_scale[j]` when given (in that order, in f32).
pub fn gemm(
    isa: Isa,
    a: &[u16],
    m: usize,
    w: &PackedBf16,
    row_scale: Option<&[f32]>,
    col_scale: Option<&[f32]>,
) -> Vec<f32> {
    let (n, lda) = (w.n, w.lda());
    assert!(
        a.len() >= m * lda,
        "A holds {} values, {m} rows need {}",
        a.len(),
        m * lda
    );
    assert!(isa.available(), "{} kernel on a CPU without it", isa.name());
    let mut c = vec![0f32; m * n];
    let panels = n.div_ceil(NR);
    // Enough tasks for every thread even for one row (decode), few enough to keep panels hot.
    let threads = rayon::current_num_threads().max(1);
    let mc = mc(w.k);
    let row_blocks = m.div_ceil(mc);
    let want_col_blocks = (4 * threads).div_ceil(row_blocks).clamp(1, panels);
    let panels_per_task = panels.div_ceil(want_col_blocks);
    let col_blocks = panels.div_ceil(panels_per_task);
    let a_exp = if isa == Isa::Avx2Fma {
        row_exponents(&a[..m * lda], lda)
    } else {
        vec![]
    };
    let cp = SendPtr(c.as_mut_ptr());
    (0..row_blocks * col_blocks).into_par_iter().for_each(|t| {
        let (rb, cb) = (t / col_blocks, t % col_blocks);
        let rows = rb * mc..(rb * mc + mc).min(m);
        let pan = cb * panels_per_task..(cb * panels_per_task + panels_per_task).min(panels);
        let cp = &cp;
        // SAFETY: tasks write disjoint rectangles of `c` (rows × panel columns).
        unsafe { tile(isa, a, lda, &a_exp, w, cp.0, n, rows, pan, false) };
    });
    if row_scale.is_some() || col_scale.is_some() {
        c.par_chunks_mut(n.max(1)).enumerate().for_each(|(i, r)| {
            if let Some(rs) = row_scale {
                let s = rs[i];
                r.iter_mut().for_each(|v| *v *= s);
            }
            if let Some(cs) = col_scale {
                r.iter_mut().zip(cs).for_each(|(v, s)| *v *= s);
            }
        });
    }
    c
}

/// The operand of a Gram product `Xᵀ X` for [`syrk_lower_add`]: `X` (`[rows, n]`, f32) rounded
/// to bf16 and transposed, both as `A` rows (`n` rows of [`lda_for`]`(rows)` values) and as a
/// packed weight of `n` channels.
pub struct Gram {
    a: Vec<u16>,
    /// [`row_exponents`] of `a`.
    a_exp: Vec<u8>,
    w: PackedBf16,
}

impl Gram {
    pub fn new(x: &[f32], rows: usize, n: usize) -> Self {
        debug_assert_eq!(x.len(), rows * n);
        let lda = lda_for(rows);
        let mut a = vec![0u16; n * lda];
        // Strips of 64 input columns: each reads its slice of every row of `x` in order and
        // writes 64 rows of `A` that stay in cache.
        const STRIP: usize = 64;
        a.par_chunks_mut(lda * STRIP)
            .enumerate()
            .for_each(|(s, strip)| {
                let c0 = s * STRIP;
                for (t, xrow) in x.chunks_exact(n).enumerate() {
                    for (dst, &v) in strip.chunks_mut(lda).zip(&xrow[c0..]) {
                        dst[t] = half::bf16::from_f32(v).to_bits();
                    }
                }
            });
        let w = PackedBf16::from_rows(n, rows, |r, dst| {
            dst.copy_from_slice(&a[r * lda..r * lda + rows])
        });
        let a_exp = row_exponents(&a, lda);
        Gram { a, a_exp, w }
    }

    /// `n`.
    pub fn width(&self) -> usize {
        self.w.n
    }
}

/// Adds `Xᵀ X` to `c` (`[n, n]`, row-major) on and below the diagonal, in the module's
/// arithmetic: each entry's chain continues from the value in `c` over this `X`'s rows in order
/// (one rounding per pair of rows). Entries above the diagonal are left as they are, except
/// within the 32-column panels that the diagonal crosses, where they get the same sums as their
/// mirror images (the pair products commute). Half the work of the full product.
pub fn syrk_lower_add(isa: Isa, g: &Gram, c: &mut [f32]) {
    let n = g.w.n;
    assert_eq!(c.len(), n * n, "Gram sums of {n} columns");
    assert!(isa.available(), "{} kernel on a CPU without it", isa.name());
    let lda = g.w.lda();
    // Tasks of 96 rows × 16 panels up to the diagonal: balanced enough for any thread count,
    // and each entry is still written by one task, so the sums do not depend on it.
    const ROWS: usize = 8 * MR;
    let mut tasks = Vec::new();
    for r0 in (0..n).step_by(ROWS) {
        let r1 = (r0 + ROWS).min(n);
        let last = r1.div_ceil(NR);
        for p0 in (0..last).step_by(PANEL_GROUP) {
            tasks.push((r0..r1, p0..(p0 + PANEL_GROUP).min(last)));
        }
    }
    let cp = SendPtr(c.as_mut_ptr());
    tasks.into_par_iter().for_each(|(rows, pan)| {
        let cp = &cp;
        // SAFETY: tasks write disjoint rectangles of `c` (rows × panel columns), all inside it.
        unsafe { tile(isa, &g.a, lda, &g.a_exp, &g.w, cp.0, n, rows, pan, true) };
    });
}

struct SendPtr(*mut f32);
// SAFETY: used only to hand disjoint output tiles to rayon tasks.
unsafe impl Sync for SendPtr {}
unsafe impl Send for SendPtr {}

/// Computes rows `rows` × panels `pan` of `C` (row stride `ldc`).
#[allow(clippy::too_many_arguments)]
unsafe fn tile(
    isa: Isa,
    a: &[u16],
    lda: usize,
    a_exp: &[u8],
    w: &PackedBf16,
    c: *mut f32,
    ldc: usize,
    rows: std::ops::Range<usize>,
    pan: std::ops::Range<usize>,
    accumulate: bool,
) {
    let kp = w.kp;
    // Panels in groups whose slice of `C` stays in L2 across the input blocks: a group's rows
    // are finished over all of `k` before the next group starts. Each output's sum still runs
    // over the input blocks in order, so the grouping does not change a bit.
    let groups = pan.clone().step_by(PANEL_GROUP);
    // The AVX2 kernel's f32 copies of a cache block of the tile's rows of `A` and of one panel.
    let (mut af, mut wf) = if isa == Isa::Avx2Fma {
        (vec![0f32; rows.len() * LDF], vec![0f32; 2 * KC_PAIRS * NR])
    } else {
        (vec![], vec![])
    };
    let a = ARows { a, lda, exp: a_exp };
    for g0 in groups {
        let group = g0..(g0 + PANEL_GROUP).min(pan.end);
        tile_group(
            isa,
            &a,
            &mut af,
            &mut wf,
            w,
            c,
            ldc,
            rows.clone(),
            group,
            kp,
            accumulate,
        );
    }
}

/// Rows of `A` as [`tile`] reads them.
struct ARows<'a> {
    a: &'a [u16],
    lda: usize,
    /// [`row_exponents`] (read by the AVX2 kernel only).
    exp: &'a [u8],
}

/// Fewest rows in a task for the AVX2 plain path: it widens each panel block once per task,
/// which a row or two would not repay (decode keeps the flushing kernel).
const PLAIN_MIN_ROWS: usize = 4;

/// Row stride of the AVX2 kernel's f32 copy of `A` (a cache block and one line, so that its
/// rows do not share L1 sets).
const LDF: usize = 2 * KC_PAIRS + 16;

/// [`tile`] for one group of panels.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn tile_group(
    isa: Isa,
    a: &ARows<'_>,
    af: &mut [f32],
    wf: &mut [f32],
    w: &PackedBf16,
    c: *mut f32,
    ldc: usize,
    rows: std::ops::Range<usize>,
    pan: std::ops::Range<usize>,
    kp: usize,
    accumulate: bool,
) {
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (af, wf);
    let lda = a.lda;
    let mut q0 = 0;
    while q0 < kp {
        let q1 = (q0 + KC_PAIRS).min(kp);
        if isa == Isa::Avx2Fma && rows.len() >= PLAIN_MIN_ROWS {
            // Widened once per cache block, read by every panel of the group.
            for (i, dst) in rows.clone().zip(af.chunks_exact_mut(LDF)) {
                let src = &a.a[i * lda + 2 * q0..i * lda + 2 * q1];
                for (d, &b) in dst.iter_mut().zip(src) {
                    *d = f32::from_bits((b as u32) << 16);
                }
            }
        }
        for p in pan.clone() {
            let cols = NR.min(w.n - p * NR);
            let wp = w.data.as_ptr().add(p * kp * NR + q0 * NR);
            #[cfg(target_arch = "x86_64")]
            let mut widened = false;
            let mut i = rows.start;
            while i < rows.end {
                let mr = MR.min(rows.end - i);
                let ap = a.a.as_ptr().add(i * lda + 2 * q0);
                let cp = c.add(i * ldc + p * NR);
                let first = q0 == 0 && !accumulate;
                match isa {
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx512Bf16 => {
                        avx512::micro(mr, q1 - q0, ap, lda, wp, cp, ldc, cols, first)
                    }
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2Fma => {
                        let ae = a.exp[i..i + mr].iter().copied().min().unwrap_or(u8::MAX);
                        let plain = rows.len() >= PLAIN_MIN_ROWS
                            && needs_no_flush(ae, w.panel_exp[p])
                            && (first
                                || (0..mr)
                                    .all(|r| (0..cols).all(|j| grid_ok(*cp.add(r * ldc + j)))));
                        if plain {
                            if !widened {
                                let src = &w.data[p * kp * NR + q0 * NR..p * kp * NR + q1 * NR];
                                avx2::widen_panel(src, q1 - q0, wf);
                                widened = true;
                            }
                            let afp = af.as_ptr().add((i - rows.start) * LDF);
                            avx2::plain(mr, q1 - q0, afp, wf.as_ptr(), cp, ldc, cols, first)
                        } else {
                            avx2::micro(mr, q1 - q0, ap, lda, wp, cp, ldc, cols, first)
                        }
                    }
                    _ => portable_micro(mr, q1 - q0, ap, lda, wp, cp, ldc, cols, first),
                }
                i += mr;
            }
        }
        q0 = q1;
    }
}

/// f32 value of bf16 bits, subnormals read as zero.
#[inline(always)]
fn bf16_daz(b: u16) -> f32 {
    let b = if b & 0x7f80 == 0 { b & 0x8000 } else { b };
    f32::from_bits((b as u32) << 16)
}

/// Flushes a subnormal result to zero of the same sign.
#[inline(always)]
fn ftz(x: f32) -> f32 {
    if x.to_bits() & 0x7f80_0000 == 0 {
        f32::from_bits(x.to_bits() & 0x8000_0000)
    } else {
        x
    }
}

/// One accumulation step of the module's arithmetic: `(acc + a1·w1) + a0·w0`, each product
/// exact (f64 holds it, including products below f32's normal range), each sum rounded once to
/// f32 and flushed to zero when subnormal.
#[inline(always)]
pub fn pair_step(acc: f32, a: u32, w: u32) -> f32 {
    let p1 = bf16_daz((a >> 16) as u16) as f64 * bf16_daz((w >> 16) as u16) as f64;
    let p0 = bf16_daz(a as u16) as f64 * bf16_daz(w as u16) as f64;
    let s = ftz((acc as f64 + p1) as f32);
    ftz((s as f64 + p0) as f32)
}

#[allow(clippy::too_many_arguments)]
unsafe fn portable_micro(
    mr: usize,
    kp: usize,
    a: *const u16,
    lda: usize,
    w: *const u32,
    c: *mut f32,
    ldc: usize,
    cols: usize,
    first: bool,
) {
    for r in 0..mr {
        let mut acc = [0f32; NR];
        if !first {
            for (j, v) in acc.iter_mut().enumerate().take(cols) {
                *v = ftz(*c.add(r * ldc + j));
            }
        }
        let ar = a.add(r * lda) as *const u32;
        for q in 0..kp {
            let av = std::ptr::read_unaligned(ar.add(q));
            let wq = std::slice::from_raw_parts(w.add(q * NR), NR);
            for (v, &wv) in acc.iter_mut().zip(wq) {
                *v = pair_step(*v, av, wv);
            }
        }
        for (j, v) in acc.iter().enumerate().take(cols) {
            *c.add(r * ldc + j) = *v;
        }
    }
}

/// The AVX2 + FMA kernel: the module's arithmetic with each pair step as two f32 fused
/// multiply-adds, `ftz(fma(a[k], w[k], ftz(fma(a[k+1], w[k+1], acc))))`, written as plain code
/// the compiler vectorizes over a panel's channels. A product of two bf16 values is exact in
/// the fused operation, so each sum is the exact `acc + a·w` rounded once to f32: what
/// [`pair_step`] computes through f64 (whose sum is exact whenever rounding it could matter:
/// when the two terms lie more than 29 binary orders apart the smaller one moves neither
/// rounding). The tests check it against the definition bit for bit, flush cases included.
///
/// Most blocks of real products cannot produce a subnormal anywhere (see
/// [`needs_no_flush`](super::needs_no_flush)); those run [`plain`]: the same fused multiply-adds without the
/// flush steps, hand-written over f32 copies of the block's operands, 3–4× the throughput of
/// [`micro`].
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{LDF, NR};

    /// Rows per register block of [`plain`]: 6 rows × 16 channels are twelve accumulators,
    /// and each one's chain (two dependent FMAs per pair) has the FMA units' full latency
    /// hidden behind the other eleven.
    const PR: usize = 6;

    /// Widens `kp` pairs of a panel (`[kp][NR]` packed pairs) to f32 in the order [`plain`]
    /// reads them: per half of the channels, per pair, the 16 upper (odd) inputs then the 16
    /// lower (even) ones.
    pub(super) fn widen_panel(w: &[u32], kp: usize, out: &mut [f32]) {
        for h in 0..2 {
            for q in 0..kp {
                let src = &w[q * NR + 16 * h..q * NR + 16 * h + 16];
                let dst = &mut out[(h * kp + q) * 32..(h * kp + q) * 32 + 32];
                for (j, &v) in src.iter().enumerate() {
                    dst[j] = f32::from_bits(v & 0xffff_0000);
                    dst[16 + j] = f32::from_bits(v << 16);
                }
            }
        }
    }

    /// The module's arithmetic as plain fused multiply-adds, for blocks where nothing can be
    /// subnormal ([`super::needs_no_flush`]): each output's chain is `fma(a[k], w[k],
    /// fma(a[k+1], w[k+1], acc))` pair by pair, as in [`micro`], without the flush steps
    /// (which would change nothing). `a` is the f32 copy of the rows (stride [`LDF`]), `w`
    /// the panel's block widened by [`widen_panel`].
    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn plain(
        mr: usize,
        kp: usize,
        a: *const f32,
        w: *const f32,
        c: *mut f32,
        ldc: usize,
        cols: usize,
        first: bool,
    ) {
        let mut r = 0;
        while r < mr {
            let (a, c) = (a.add(r * LDF), c.add(r * ldc));
            let n = (mr - r).min(PR);
            macro_rules! dispatch {
                ($($n:literal)*) => {
                    match n {
                        $($n => block::<$n>(kp, a, w, c, ldc, cols, first),)*
                        _ => unreachable!("at most PR rows"),
                    }
                };
            }
            dispatch!(1 2 3 4 5 6);
            r += n;
        }
    }

    /// [`plain`] for `R` rows, both halves of the panel.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn block<const R: usize>(
        kp: usize,
        a: *const f32,
        w: *const f32,
        c: *mut f32,
        ldc: usize,
        cols: usize,
        first: bool,
    ) {
        for h in 0..2 {
            let c0 = 16 * h;
            if cols <= c0 {
                break;
            }
            let n = (cols - c0).min(16);
            let mut acc = [[_mm256_setzero_ps(); 2]; R];
            if !first {
                for (r, ar) in acc.iter_mut().enumerate() {
                    let mut t = [0f32; 16];
                    std::ptr::copy_nonoverlapping(c.add(r * ldc + c0), t.as_mut_ptr(), n);
                    ar[0] = _mm256_loadu_ps(t.as_ptr());
                    ar[1] = _mm256_loadu_ps(t.as_ptr().add(8));
                }
            }
            let mut wp = w.add(h * kp * 32);
            for q in 0..kp {
                let (h0, h1) = (_mm256_loadu_ps(wp), _mm256_loadu_ps(wp.add(8)));
                for (r, ar) in acc.iter_mut().enumerate() {
                    let x = _mm256_broadcast_ss(&*a.add(r * LDF + 2 * q + 1));
                    ar[0] = _mm256_fmadd_ps(x, h0, ar[0]);
                    ar[1] = _mm256_fmadd_ps(x, h1, ar[1]);
                }
                let (l0, l1) = (_mm256_loadu_ps(wp.add(16)), _mm256_loadu_ps(wp.add(24)));
                for (r, ar) in acc.iter_mut().enumerate() {
                    let x = _mm256_broadcast_ss(&*a.add(r * LDF + 2 * q));
                    ar[0] = _mm256_fmadd_ps(x, l0, ar[0]);
                    ar[1] = _mm256_fmadd_ps(x, l1, ar[1]);
                }
                wp = wp.add(32);
            }
            for (r, ar) in acc.iter().enumerate() {
                let dst = c.add(r * ldc + c0);
                if n == 16 {
                    _mm256_storeu_ps(dst, ar[0]);
                    _mm256_storeu_ps(dst.add(8), ar[1]);
                } else {
                    let mut t = [0f32; 16];
                    _mm256_storeu_ps(t.as_mut_ptr(), ar[0]);
                    _mm256_storeu_ps(t.as_mut_ptr().add(8), ar[1]);
                    std::ptr::copy_nonoverlapping(t.as_ptr(), dst, n);
                }
            }
        }
    }

    /// f32 of bf16 bits already in the upper half, subnormals read as zero.
    #[inline(always)]
    fn daz(b: u32) -> f32 {
        f32::from_bits(if b & 0x7f80_0000 == 0 {
            b & 0x8000_0000
        } else {
            b
        })
    }

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn micro(
        mr: usize,
        kp: usize,
        a: *const u16,
        lda: usize,
        w: *const u32,
        c: *mut f32,
        ldc: usize,
        cols: usize,
        first: bool,
    ) {
        let mut r = 0;
        while r < mr {
            let (a, c) = (a.add(r * lda), c.add(r * ldc));
            if mr - r >= 4 {
                rows::<4>(kp, a, lda, w, c, ldc, cols, first);
                r += 4;
            } else {
                rows::<1>(kp, a, lda, w, c, ldc, cols, first);
                r += 1;
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    unsafe fn rows<const R: usize>(
        kp: usize,
        a: *const u16,
        lda: usize,
        w: *const u32,
        c: *mut f32,
        ldc: usize,
        cols: usize,
        first: bool,
    ) {
        let mut acc = [[0f32; NR]; R];
        if !first {
            for (r, ar) in acc.iter_mut().enumerate() {
                for (j, v) in ar.iter_mut().enumerate().take(cols) {
                    *v = super::ftz(*c.add(r * ldc + j));
                }
            }
        }
        let mut hi = [0f32; NR];
        let mut lo = [0f32; NR];
        for q in 0..kp {
            let wq = &*(w.add(q * NR) as *const [u32; NR]);
            for j in 0..NR {
                hi[j] = daz(wq[j] & 0xffff_0000);
                lo[j] = daz(wq[j] << 16);
            }
            for (r, ar) in acc.iter_mut().enumerate() {
                let p = std::ptr::read_unaligned(a.add(r * lda + 2 * q) as *const u32);
                let (ah, al) = (daz(p & 0xffff_0000), daz(p << 16));
                for j in 0..NR {
                    let s = super::ftz(ah.mul_add(hi[j], ar[j]));
                    ar[j] = super::ftz(al.mul_add(lo[j], s));
                }
            }
        }
        for (r, ar) in acc.iter().enumerate() {
            for (j, v) in ar.iter().enumerate().take(cols) {
                *c.add(r * ldc + j) = *v;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use super::NR;

    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    pub(super) unsafe fn micro(
        mr: usize,
        kp: usize,
        a: *const u16,
        lda: usize,
        w: *const u32,
        c: *mut f32,
        ldc: usize,
        cols: usize,
        first: bool,
    ) {
        macro_rules! dispatch {
            ($($n:literal)*) => {
                match mr {
                    $($n => kernel::<$n>(kp, a, lda, w, c, ldc, cols, first),)*
                    _ => unreachable!("MR is 12"),
                }
            };
        }
        dispatch!(1 2 3 4 5 6 7 8 9 10 11 12)
    }

    #[allow(clippy::too_many_arguments)]
    #[target_feature(enable = "avx512f,avx512bf16")]
    unsafe fn kernel<const R: usize>(
        kp: usize,
        a: *const u16,
        lda: usize,
        w: *const u32,
        c: *mut f32,
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
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        if !first {
            for (r, a2) in acc.iter_mut().enumerate() {
                let cr = c.add(r * ldc);
                a2[0] = _mm512_maskz_loadu_ps(m0, cr);
                a2[1] = _mm512_maskz_loadu_ps(m1, cr.add(16));
            }
        }
        for q in 0..kp {
            let wq = w.add(q * NR) as *const __m512i;
            let w0: __m512bh = std::mem::transmute(_mm512_loadu_si512(wq));
            let w1: __m512bh = std::mem::transmute(_mm512_loadu_si512(wq.add(1)));
            for (r, a2) in acc.iter_mut().enumerate() {
                let pair = std::ptr::read_unaligned(a.add(r * lda + 2 * q) as *const i32);
                let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
                a2[0] = _mm512_dpbf16_ps(a2[0], av, w0);
                a2[1] = _mm512_dpbf16_ps(a2[1], av, w1);
            }
        }
        for (r, a2) in acc.iter().enumerate() {
            let cr = c.add(r * ldc);
            _mm512_mask_storeu_ps(cr, m0, a2[0]);
            _mm512_mask_storeu_ps(cr.add(16), m1, a2[1]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numerics::rng::SplitMix64;

    fn bits(x: f32) -> u16 {
        half::bf16::from_f32(x).to_bits()
    }

    fn random(n: usize, seed: u64, spread: i32) -> Vec<f32> {
        let mut r = SplitMix64::new(seed);
        (0..n)
            .map(|_| {
                let u = (r.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                let e = (r.next_u64() % (2 * spread as u64 + 1)) as i32 - spread;
                u * 2f32.powi(e)
            })
            .collect()
    }

    /// The definition written out: f32 sums of exact bf16 products, pair by pair.
    fn reference(a: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut acc = 0f32;
                for q in 0..k.div_ceil(2) {
                    let pa = |t: usize| if t < k { bits(a[i * k + t]) as u32 } else { 0 };
                    let pw = |t: usize| if t < k { bits(w[j * k + t]) as u32 } else { 0 };
                    acc = pair_step(
                        acc,
                        pa(2 * q) | pa(2 * q + 1) << 16,
                        pw(2 * q) | pw(2 * q + 1) << 16,
                    );
                }
                c[i * n + j] = acc;
            }
        }
        c
    }

    #[test]
    fn both_paths_equal_the_definition_bit_for_bit() {
        // Shapes with every remainder: rows past MR/MC, channels past a panel, k odd and past
        // a cache block.
        for &(m, n, k) in &[(1, 1, 2), (13, 45, 7), (30, 64, 600), (97, 33, 1030)] {
            let a = random(m * k, 1 + m as u64, 6);
            let w = random(n * k, 2 + n as u64, 6);
            let want = reference(&a, &w, m, n, k);
            let pw = PackedBf16::from_f32(&w, n, k);
            let ab = to_bf16_rows(&a, k, pw.lda());
            for isa in [Isa::Portable, Isa::Avx2Fma, Isa::Avx512Bf16] {
                if !isa.available() {
                    eprintln!("SKIPPED {}: this CPU lacks it", isa.name());
                    continue;
                }
                let got = gemm(isa, &ab, m, &pw, None, None);
                for (g, e) in got.iter().zip(&want) {
                    assert_eq!(g.to_bits(), e.to_bits(), "{} {m}x{n}x{k}", isa.name());
                }
            }
        }
    }

    #[test]
    fn subnormal_and_extreme_values_follow_the_flush_rules() {
        // Values around the bottom of f32's normal range: products and sums that would be
        // subnormal, subnormal bf16 inputs, both signs.
        let (m, n, k) = (5, 40, 64);
        let mut r = SplitMix64::new(9);
        let mut pick = || {
            let e = (r.next_u64() % 60) as i32 - 100;
            let s = if r.next_u64() & 1 == 0 { 1.0 } else { -1.0 };
            let v = s * (1.0 + (r.next_u64() % 128) as f32 / 128.0) * 2f32.powi(e);
            if r.next_u64().is_multiple_of(7) {
                f32::from_bits(
                    (r.next_u64() as u32 & 0x007f_0000) | ((s < 0.0) as u32 * 0x8000_0000),
                )
            } else {
                v
            }
        };
        let a: Vec<f32> = (0..m * k).map(|_| pick()).collect();
        let w: Vec<f32> = (0..n * k).map(|_| pick()).collect();
        let want = reference(&a, &w, m, n, k);
        let pw = PackedBf16::from_f32(&w, n, k);
        let ab = to_bf16_rows(&a, k, pw.lda());
        for isa in [Isa::Portable, Isa::Avx2Fma, Isa::Avx512Bf16] {
            if !isa.available() {
                eprintln!("SKIPPED {}: this CPU lacks it", isa.name());
                continue;
            }
            let got = gemm(isa, &ab, m, &pw, None, None);
            for (g, e) in got.iter().zip(&want) {
                assert_eq!(g.to_bits(), e.to_bits(), "{}: {g:e} vs {e:e}", isa.name());
            }
        }
    }

    /// The AVX2 kernel's plain path is taken only where no sum can be subnormal: at the
    /// boundary (`a + w = 142`) plain sums equal the definition; one step below they need not,
    /// and the kernel falls back to the flushing path there.
    #[test]
    fn plain_sums_only_where_nothing_can_be_subnormal() {
        // 129·129 − 128·130 = 1: with the first factors' exponent field `ea` and the second's
        // 71, the two products' sum is 2^(ea − 197), the smallest multiple the grid allows.
        let plain = |a: &[f32], w: &[f32]| w[0].mul_add(a[0], w[1].mul_add(a[1], 0.0));
        for ea in [70u32, 71] {
            let m = |mant: u32, e: u32| f32::from_bits(e << 23 | (mant - 128) << 16);
            let a = [m(129, ea), m(128, ea)];
            let w = [m(129, 71), -m(130, 71)];
            let want = reference(&a, &w, 1, 1, 2)[0];
            let exact = 2f32.powi(ea as i32 - 197);
            let pw = PackedBf16::from_f32(&w, 1, 2);
            // The same row PLAIN_MIN_ROWS times, so that the plain path may take the task.
            let rows = PLAIN_MIN_ROWS;
            let ab = to_bf16_rows(&a.repeat(rows), 2, pw.lda());
            if ea == 70 {
                // 2^-127 is subnormal: flushed by the definition, kept by plain sums.
                assert_eq!((want, plain(&a, &w)), (0.0, exact));
            } else {
                assert_eq!((want, plain(&a, &w)), (exact, exact));
            }
            for isa in [Isa::Portable, Isa::Avx2Fma, Isa::Avx512Bf16] {
                if !isa.available() {
                    eprintln!("SKIPPED {}: this CPU lacks it", isa.name());
                    continue;
                }
                for got in gemm(isa, &ab, rows, &pw, None, None) {
                    assert_eq!(got.to_bits(), want.to_bits(), "{} field {ea}", isa.name());
                }
            }
        }
        // Random values at and just below the boundary, with cancellation (random signs):
        // every path equals the definition, whichever way each block goes.
        let mut r = SplitMix64::new(17);
        for low in [71i32, 70] {
            let (m, n, k) = (14, 40, 300);
            let mut pick = |lo: i32| {
                let s = if r.next_u64() & 1 == 0 { 1.0 } else { -1.0 };
                let e = lo + (r.next_u64() % 3) as i32 - 127;
                s * (1.0 + (r.next_u64() % 128) as f32 / 128.0) * 2f32.powi(e)
            };
            let a: Vec<f32> = (0..m * k).map(|_| pick(low)).collect();
            let w: Vec<f32> = (0..n * k).map(|_| pick(71)).collect();
            let want = reference(&a, &w, m, n, k);
            let pw = PackedBf16::from_f32(&w, n, k);
            let ab = to_bf16_rows(&a, k, pw.lda());
            for isa in [Isa::Avx2Fma, Isa::Avx512Bf16] {
                if !isa.available() {
                    eprintln!("SKIPPED {}: this CPU lacks it", isa.name());
                    continue;
                }
                let got = gemm(isa, &ab, m, &pw, None, None);
                for (g, e) in got.iter().zip(&want) {
                    assert_eq!(g.to_bits(), e.to_bits(), "{} low {low}", isa.name());
                }
            }
        }

        assert!(needs_no_flush(71, 71) && needs_no_flush(1, 141) && needs_no_flush(200, 255));
        assert!(!needs_no_flush(70, 71) && !needs_no_flush(0, 250) && !needs_no_flush(250, 0));
        assert!(grid_ok(0.0) && grid_ok(-0.0) && grid_ok(2f32.powi(-103)) && grid_ok(1.0));
        assert!(!grid_ok(2f32.powi(-104) * 1.5) && !grid_ok(f32::MIN_POSITIVE));
    }

    /// Gram sums continuing from stored values off the 2^-126 grid take the flushing path for
    /// those blocks: a stored −(2^-112 − 2^-136) plus the product 2^-56 · 2^-56 is 2^-136,
    /// subnormal, flushed by the definition although the inputs alone would allow plain sums.
    #[test]
    fn gram_sums_from_stored_values_off_the_grid_equal_the_definition() {
        let (rows, n) = (2, 3);
        let t = 2f32.powi(-56);
        let x = [0.0, 0.0, 0.0, t, t, 1.0];
        let g = Gram::new(&x, rows, n);
        let s = -(2f32.powi(-112) - 2f32.powi(-136));
        assert_eq!(t.mul_add(t, s), 2f32.powi(-136), "plain sums would keep it");
        let mut want = vec![s; n * n];
        syrk_lower_add(Isa::Portable, &g, &mut want);
        assert_eq!([want[0], want[3], want[4]], [0.0; 3]);
        for isa in [Isa::Avx2Fma, Isa::Avx512Bf16] {
            if !isa.available() {
                eprintln!("SKIPPED {}: this CPU lacks it", isa.name());
                continue;
            }
            let mut got = vec![s; n * n];
            syrk_lower_add(isa, &g, &mut got);
            for i in 0..n {
                for j in 0..=i {
                    assert_eq!(
                        got[i * n + j].to_bits(),
                        want[i * n + j].to_bits(),
                        "{i},{j}"
                    );
                }
            }
        }
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let (m, n, k) = (50, 130, 96);
        let a = random(m * k, 5, 3);
        let w = random(n * k, 6, 3);
        let pw = PackedBf16::from_f32(&w, n, k);
        let ab = to_bf16_rows(&a, k, pw.lda());
        let run = |t: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(t)
                .build()
                .unwrap()
                .install(|| gemm(Isa::detect(), &ab, m, &pw, None, None))
        };
        let one = run(1);
        for t in [2, 3, 7] {
            assert_eq!(run(t), one, "{t} threads");
        }
    }

    /// The lower triangle of Gram sums taken over two batches equals the full product over
    /// both batches' rows at once, bit for bit, on both paths and for any thread count (batches
    /// of even rows keep the pairs aligned, so the chains are the same operations).
    #[test]
    fn gram_sums_equal_the_full_product_bit_for_bit() {
        // 70 columns: three panels, the last partial; 12 + 18 rows.
        let n = 70;
        let x = random(30 * n, 9, 4);
        let xt: Vec<f32> = (0..n * 30).map(|i| x[(i % 30) * n + i / 30]).collect();
        let pw = PackedBf16::from_f32(&xt, n, 30);
        let ab = to_bf16_rows(&xt, 30, pw.lda());
        let want = gemm(Isa::Portable, &ab, n, &pw, None, None);
        for isa in [Isa::Portable, Isa::Avx2Fma, Isa::Avx512Bf16] {
            if !isa.available() {
                eprintln!("SKIPPED {}: this CPU lacks it", isa.name());
                continue;
            }
            for threads in [1, 3] {
                let got = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap()
                    .install(|| {
                        let mut c = vec![0f32; n * n];
                        for rows in [0..12, 12..30] {
                            let g = Gram::new(&x[rows.start * n..rows.end * n], rows.len(), n);
                            assert_eq!(g.width(), n);
                            syrk_lower_add(isa, &g, &mut c);
                        }
                        c
                    });
                for i in 0..n {
                    for j in 0..=i {
                        assert_eq!(
                            got[i * n + j].to_bits(),
                            want[i * n + j].to_bits(),
                            "{} {threads} threads ({i}, {j})",
                            isa.name()
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn close_to_the_f64_product() {
        // Against an f64 product of the bf16-rounded inputs: the f32 accumulation error bound
        // k · u · Σ|a·w| (u = 2^-24).
        let (m, n, k) = (7, 19, 300);
        let a = random(m * k, 11, 2);
        let w = random(n * k, 12, 2);
        let pw = PackedBf16::from_f32(&w, n, k);
        let ab = to_bf16_rows(&a, k, pw.lda());
        let got = gemm(Isa::detect(), &ab, m, &pw, Some(&[2.0; 7]), None);
        let r = |v: f32| half::bf16::from_f32(v).to_f64();
        for i in 0..m {
            for j in 0..n {
                let (mut s, mut abs) = (0f64, 0f64);
                for t in 0..k {
                    s += r(a[i * k + t]) * r(w[j * k + t]);
                    abs += (r(a[i * k + t]) * r(w[j * k + t])).abs();
                }
                let bound = 2.0 * k as f64 * 2f64.powi(-24) * abs;
                assert!((got[i * n + j] as f64 - 2.0 * s).abs() <= bound + 1e-30);
            }
        }
    }
}
