//! GPTQ-style rounding (Frantar et al. 2022) onto a fixed per-row grid: columns are rounded in
//! order and each rounding error is pushed onto the not-yet-rounded columns through the inverse
//! of the input second-moment matrix, so the layer's output error under the calibration inputs is
//! what gets minimised rather than each weight's own error.
//!
//! Rows are independent given the shared factor, so they run in parallel and the result does not
//! depend on the thread count.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::numerics::real::dot;
use crate::numerics::Real;

/// Upper Cholesky factor `U` of `(H + λ·mean(diag H)·I)⁻¹` (row-major `[n, n]`), as GPTQ uses it.
/// Columns never seen (zero diagonal) get a unit diagonal.
pub fn inverse_factor<T: Real>(h: &[T], n: usize, damp: f64) -> Result<Vec<T>> {
    let mut a = h.to_vec();
    damp_diagonal(&mut a, n, damp);
    inverse_factor_in_place(&mut a, n)?;
    Ok(a)
}

/// Gives columns never seen (zero diagonal) a unit diagonal, then adds `damp · mean(diag)` to
/// every diagonal entry.
fn damp_diagonal<T: Real>(a: &mut [T], n: usize, damp: f64) {
    for j in 0..n {
        if a[j * n + j] <= T::ZERO {
            a[j * n + j] = T::ONE;
        }
    }
    let mean_diag = (0..n).map(|j| a[j * n + j].to_f64()).sum::<f64>() / n as f64;
    let add = T::from_f64(damp * mean_diag);
    for j in 0..n {
        a[j * n + j] += add;
    }
}

/// Overwrites the positive-definite `a` with the upper triangular `U` (positive diagonal) for
/// which `a⁻¹ = Uᵀ U`, using no memory beyond `a` and one row block.
///
/// With `P` the order reversal, `P a P = L Lᵀ` (Cholesky) gives `a⁻¹ = P L⁻ᵀ L⁻¹ P = Uᵀ U`
/// for `U = P L⁻¹ P`, which is upper triangular with a positive diagonal, so it is the factor
/// (Cholesky factors are unique). Reversing rows and columns of a row-major matrix is reversing
/// its storage, so the whole computation is: reverse, factor, invert, reverse.
pub fn inverse_factor_in_place<T: Real>(a: &mut [T], n: usize) -> Result<()> {
    a.reverse();
    cholesky_in_place(a, n).map_err(|j| {
        Error::Invalid(format!(
            "GPTQ: second-moment matrix is not positive definite at column {}",
            n - 1 - j
        ))
    })?;
    invert_lower_in_place(a, n);
    a.reverse();
    Ok(())
}

/// Columns per block of the blocked factorizations: a block of rows of this many columns stays
/// in the core's L2 cache while the rows below stream past it.
const NB: usize = 64;

/// Columns per tile of the triangular inverse's updates (independent tiles, run in parallel).
const KT: usize = 256;

/// Rows per GEMM of the factorization's updates (fixed, so the sums do not depend on the thread
/// count).
const UPDATE_ROWS: usize = 256;

/// Lower Cholesky factor of `a` in place (the strict upper triangle is zeroed), left-looking by
/// blocks of [`NB`] columns; rows run in parallel. `Err(j)`: not positive definite at column j.
fn cholesky_in_place<T: Real>(a: &mut [T], n: usize) -> std::result::Result<(), usize> {
    for jb in (0..n).step_by(NB) {
        let je = (jb + NB).min(n);
        let w = je - jb;
        let rest = &mut a[jb * n..];
        // The block rows' finished prefixes, copied so every row below can read them.
        let heads: Vec<T> = rest[..w * n]
            .chunks(n)
            .flat_map(|r| r[..jb].iter().copied())
            .collect();
        // Rows jb.. of columns jb..je, minus the products of the finished columns 0..jb: one
        // GEMM per fixed group of rows (entries right of the diagonal come out as garbage and
        // are never read; the strict upper triangle is zeroed at the end).
        if jb > 0 {
            rest.par_chunks_mut(n * UPDATE_ROWS).for_each(|rows| {
                let count = rows.len() / n;
                let p = rows.as_mut_ptr();
                // SAFETY: the output is columns jb..jb + w of these `count` rows and the left
                // factor columns 0..jb of the same rows, so they do not overlap, and both lie
                // inside `rows`; the right factor (`heads`ᵀ, `jb × w`) is its own allocation.
                unsafe {
                    crate::numerics::dgemm::gemm_raw(
                        count,
                        w,
                        jb,
                        p.add(jb),
                        n,
                        p,
                        (n, 1),
                        heads.as_ptr(),
                        (1, jb),
                        -T::ONE,
                        true,
                    );
                }
            });
        }
        let (block, below) = rest.split_at_mut(w * n);
        // The diagonal block, column by column.
        for j in jb..je {
            let rj = (j - jb) * n;
            let d = block[rj + j] - dot(&block[rj + jb..rj + j], &block[rj + jb..rj + j]);
            if d <= T::ZERO || !d.is_finite() {
                return Err(j);
            }
            let d = d.sqrt();
            block[rj + j] = d;
            for i in j + 1..je {
                let ri = (i - jb) * n;
                let s = dot(&block[ri + jb..ri + j], &block[rj + jb..rj + j]);
                block[ri + j] = (block[ri + j] - s) / d;
            }
        }
        // The rows below, against the factored diagonal block.
        let diag: Vec<T> = block
            .chunks(n)
            .flat_map(|r| r[jb..je].iter().copied())
            .collect();
        below.par_chunks_mut(n).for_each(|row| {
            for j in 0..w {
                let s = dot(&row[jb..jb + j], &diag[j * w..j * w + j]);
                row[jb + j] = (row[jb + j] - s) / diag[j * w + j];
            }
        });
    }
    a.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
        row[i + 1..].iter_mut().for_each(|v| *v = T::ZERO);
    });
    Ok(())
}

/// Inverse of the lower triangular `l` in place, by blocks of [`NB`] rows: block `I` of the
/// inverse is `X_II (δ − Σ_K L_IK X_K·)` with `X_II = L_II⁻¹`, and only needs the blocks above
/// it, which are already the inverse's.
fn invert_lower_in_place<T: Real>(l: &mut [T], n: usize) {
    for ib in (0..n).step_by(NB) {
        let ie = (ib + NB).min(n);
        let w = ie - ib;
        let (above, rest) = l.split_at_mut(ib * n);
        let block = &mut rest[..w * n];
        // t = L_I,(0..ib) · X_(0..ib),(0..ib), in column tiles of KT (independent tiles).
        let tiles: Vec<(usize, usize)> =
            (0..ib).step_by(KT).map(|c| (c, (c + KT).min(ib))).collect();
        let parts: Vec<Vec<T>> = tiles
            .par_iter()
            .map(|&(c0, c1)| {
                let tw = c1 - c0;
                let mut t = vec![T::ZERO; w * tw];
                // X's rows c0..ib (zero right of its diagonal) are all that reach these columns.
                crate::numerics::dgemm::gemm_view(
                    w,
                    tw,
                    ib - c0,
                    &block[c0..],
                    (n, 1),
                    &above[c0 * n + c0..],
                    (n, 1),
                    &mut t,
                    tw,
                    T::ONE,
                    false,
                );
                t
            })
            .collect();
        // X_II = L_II⁻¹ (forward substitution, column by column).
        let mut xd = vec![T::ZERO; w * w];
        for j in 0..w {
            xd[j * w + j] = T::ONE / block[j * n + ib + j];
            for i in j + 1..w {
                let mut s = T::ZERO;
                for k in j..i {
                    s += block[i * n + ib + k] * xd[k * w + j];
                }
                xd[i * w + j] = -s / block[i * n + ib + i];
            }
        }
        // Row block I of the inverse: −X_II · t left of the diagonal block, X_II on it.
        block.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
            for v in row[..ib].iter_mut() {
                *v = T::ZERO;
            }
            for (&(c0, c1), t) in tiles.iter().zip(&parts) {
                let tw = c1 - c0;
                for k in 0..=i {
                    let c = xd[i * w + k];
                    for (v, &tv) in row[c0..c1].iter_mut().zip(&t[k * tw..(k + 1) * tw]) {
                        *v -= c * tv;
                    }
                }
            }
            row[ib..ie].copy_from_slice(&xd[i * w..(i + 1) * w]);
        });
    }
}

/// Rows rounded together (one task): the trailing updates are GEMMs of this many rows.
const ROW_BLOCK: usize = 64;
/// Columns rounded before their errors reach the columns after them ("lazy batch" updates, as
/// GPTQ's paper does): inside a batch each error updates the batch's later columns at once;
/// at the end of the batch all its errors update every later column in one GEMM.
const COL_BLOCK: usize = 128;

/// Rounds every row of `w` (`[rows, n]`) with `round(row, column, value) -> (dequantized value,
/// code)`, propagating errors through `u` (from [`inverse_factor`]). Returns the codes.
///
/// Column `j`'s scaled error `e = (x_j − q_j) / u_jj` is taken off every later column `k` as
/// `e · u_jk`. Within a batch of [`COL_BLOCK`] columns that happens column by column; the
/// batch's errors reach the columns after it together, as one product `E · U[batch, after]`
/// (f64 GEMM), which sums the same terms in another order. The rows are split into fixed
/// blocks, so the result does not depend on the thread count.
pub fn quantize_rows<T: Real>(
    w: &[f32],
    n: usize,
    u: &[T],
    round: impl Fn(usize, usize, f64) -> (f64, u8) + Sync,
) -> Vec<u8> {
    let mut out = vec![0u8; w.len()];
    out.par_chunks_mut(n * ROW_BLOCK)
        .zip(w.par_chunks(n * ROW_BLOCK))
        .enumerate()
        .for_each(|(b, (o, rows))| {
            let mut x: Vec<T> = rows.iter().map(|&v| T::from_f64(v as f64)).collect();
            let count = rows.len() / n;
            let mut errs = vec![T::ZERO; count];
            let mut e_batch = vec![T::ZERO; count * COL_BLOCK];
            let mut j0 = 0;
            while j0 < n {
                let j1 = (j0 + COL_BLOCK).min(n);
                let bw = j1 - j0;
                for j in j0..j1 {
                    for (i, e) in errs.iter_mut().enumerate() {
                        let (q, code) = round(b * ROW_BLOCK + i, j, x[i * n + j].to_f64());
                        o[i * n + j] = code;
                        *e = (x[i * n + j] - T::from_f64(q)) / u[j * n + j];
                        e_batch[i * bw + (j - j0)] = *e;
                    }
                    T::subtract_outer(&mut x, n, &errs, &u[j * n..(j + 1) * n], j + 1, j1);
                }
                if j1 < n {
                    crate::numerics::dgemm::gemm_sub(
                        count,
                        n - j1,
                        bw,
                        &e_batch[..count * bw],
                        bw,
                        &u[j0 * n + j1..],
                        n,
                        &mut x[j1..],
                        n,
                    );
                }
                j0 = j1;
            }
        });
    out
}

/// GPTQ's column order and factor for one input, in float type `R`: columns by decreasing
/// `E[x_j²]` ("act order": the most important columns are rounded first, while every other
/// column can still absorb their error), ties by index.
pub struct Plan<R: Real> {
    pub perm: Vec<usize>,
    pub u: Vec<R>,
}

/// The f64 plan (the reference arithmetic).
pub type GptqPlan = Plan<f64>;

impl<R: Real> Plan<R> {
    pub fn new<T: Copy + Into<f64> + Sync>(h: &[T], n: usize, damp: f64) -> Result<Self> {
        Self::with_shrink(h, n, damp, 0.0)
    }

    /// [`Plan::new`] on `H` with its off-diagonal entries scaled by `1 − shrink`: the
    /// second moments' correlations between input columns, measured on the calibration text,
    /// carry over to other text less well than its per-column energies, and the error feedback
    /// leans on them hardest. Shrinking them toward the diagonal (0: plain GPTQ, 1: no feedback
    /// at all) trades some in-domain fit for text the calibration never saw (README, W4A16).
    pub fn with_shrink<T: Copy + Into<f64> + Sync>(
        h: &[T],
        n: usize,
        damp: f64,
        shrink: f64,
    ) -> Result<Self> {
        Self::from_fn(n, damp, shrink, |i, j| h[i * n + j].into())
    }

    /// [`Plan::with_shrink`] on the matrix whose entry `(i, j)` is `h(i, j)`.
    pub fn from_fn(
        n: usize,
        damp: f64,
        shrink: f64,
        h: impl Fn(usize, usize) -> f64 + Sync,
    ) -> Result<Self> {
        let mut perm: Vec<usize> = (0..n).collect();
        perm.sort_by(|&a, &b| h(b, b).total_cmp(&h(a, a)).then(a.cmp(&b)));
        let keep = 1.0 - shrink;
        // The permuted, shrunk matrix is the only copy: it becomes the factor in place.
        let mut hp = vec![R::ZERO; n * n];
        hp.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
            let pi = perm[i];
            for (j, &pj) in perm.iter().enumerate() {
                let v = h(pi, pj);
                row[j] = R::from_f64(if i == j { v } else { v * keep });
            }
        });
        damp_diagonal(&mut hp, n, damp);
        inverse_factor_in_place(&mut hp, n)?;
        Ok(Plan { u: hp, perm })
    }

    /// The same plan in float type `S`.
    pub fn convert<S: Real>(self) -> Plan<S> {
        Plan {
            perm: self.perm,
            u: self
                .u
                .into_iter()
                .map(|v| S::from_f64(v.to_f64()))
                .collect(),
        }
    }

    /// What an error in each input column (original order) costs once the columns after it in
    /// this plan's order have absorbed what they can: `1 / U_jj²`, where `U_jj²` is the
    /// diagonal entry of the inverse of `H` restricted to the columns not yet rounded (OBS's
    /// saliency denominator). The rounding error of a column whose energy its successors can
    /// take over costs less than its `E[x²]` says; the last column's costs exactly `E[x²]`.
    pub fn error_weights(&self) -> Vec<f64> {
        let n = self.perm.len();
        let mut w = vec![0f64; n];
        for (i, &p) in self.perm.iter().enumerate() {
            let d = self.u[i * n + i].to_f64();
            w[p] = 1.0 / (d * d);
        }
        w
    }

    /// [`quantize_rows`] in this plan's column order; codes come back in the original order.
    pub fn quantize_rows(
        &self,
        w: &[f32],
        n: usize,
        round: impl Fn(usize, f64) -> (f64, u8) + Sync,
    ) -> Vec<u8> {
        self.quantize_rows_at(w, n, |r, _, v| round(r, v))
    }

    /// [`Plan::quantize_rows`] with `round(row, column, value)` told each value's column in
    /// the original order (for per-group scales).
    pub fn quantize_rows_at(
        &self,
        w: &[f32],
        n: usize,
        round: impl Fn(usize, usize, f64) -> (f64, u8) + Sync,
    ) -> Vec<u8> {
        let wp: Vec<f32> = w
            .chunks(n)
            .flat_map(|r| self.perm.iter().map(move |&p| r[p]))
            .collect();
        let cp = quantize_rows(&wp, n, &self.u, |r, j, v| round(r, self.perm[j], v));
        let mut codes = vec![0u8; cp.len()];
        for (row_out, row_in) in codes.chunks_mut(n).zip(cp.chunks(n)) {
            for (j, &p) in self.perm.iter().enumerate() {
                row_out[p] = row_in[j];
            }
        }
        codes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factor_inverts_a_small_matrix() {
        // H = [[4, 2], [2, 3]] (no damping): H⁻¹ = [[3, -2], [-2, 4]] / 8; check Uᵀ U = H⁻¹.
        let u = inverse_factor(&[4.0, 2.0, 2.0, 3.0], 2, 0.0).unwrap();
        let inv = [3.0 / 8.0, -2.0 / 8.0, -2.0 / 8.0, 4.0 / 8.0];
        for i in 0..2 {
            for j in 0..2 {
                let s: f64 = (0..2).map(|k| u[k * 2 + i] * u[k * 2 + j]).sum();
                assert!((s - inv[i * 2 + j]).abs() < 1e-12, "{i},{j}: {s}");
            }
        }
        assert_eq!(u[2], 0.0, "upper triangular");
    }

    /// Across several blocks of the blocked factorizations (n not a multiple of the block):
    /// `U` upper triangular with a positive diagonal and `Uᵀ U H = I`, checked in f64 with a
    /// plain triple loop.
    #[test]
    fn blocked_factor_inverts_across_blocks() {
        let mut rng = crate::numerics::rng::SplitMix64::new(5);
        for n in [1, 63, 64, 65, 150, 203] {
            // H = B Bᵀ / n + I/10: symmetric positive definite, conditioned like real moments.
            let b: Vec<f64> = (0..n * n).map(|_| rng.unit_f32() as f64 - 0.5).collect();
            let mut h = vec![0f64; n * n];
            for i in 0..n {
                for j in 0..n {
                    let s: f64 = (0..n).map(|k| b[i * n + k] * b[j * n + k]).sum();
                    h[i * n + j] = s / n as f64 + if i == j { 0.1 } else { 0.0 };
                }
            }
            let u = inverse_factor(&h, n, 0.0).unwrap();
            for i in 0..n {
                assert!(u[i * n + i] > 0.0);
                for j in 0..i {
                    assert_eq!(u[i * n + j], 0.0, "n {n}: U[{i}][{j}] below the diagonal");
                }
            }
            // (Uᵀ U) H = I.
            let mut inv = vec![0f64; n * n];
            for i in 0..n {
                for j in 0..n {
                    inv[i * n + j] = (0..=i.min(j)).map(|k| u[k * n + i] * u[k * n + j]).sum();
                }
            }
            for i in 0..n {
                for j in 0..n {
                    let s: f64 = (0..n).map(|k| inv[i * n + k] * h[k * n + j]).sum();
                    let want = if i == j { 1.0 } else { 0.0 };
                    assert!((s - want).abs() < 1e-9, "n {n}: (UᵀUH)[{i}][{j}] = {s}");
                }
            }
        }
    }

    /// The lazy-batch rounding equals plain GPTQ (every column's error taken off every later
    /// column at once, in f64) across row and column block edges: the same codes for random
    /// weights (a different code needs a value within ~1e-13 of a rounding boundary).
    #[test]
    fn lazy_batches_round_as_plain_gptq() {
        let mut rng = crate::numerics::rng::SplitMix64::new(17);
        let (rows, n) = (ROW_BLOCK + 6, 2 * COL_BLOCK + 44);
        let k = 64;
        let b: Vec<f64> = (0..n * k).map(|_| rng.unit_f32() as f64 - 0.5).collect();
        let mut h = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..n {
                h[i * n + j] = (0..k).map(|t| b[i * k + t] * b[j * k + t]).sum::<f64>() / k as f64
                    + if i == j { 0.05 } else { 0.0 };
            }
        }
        let u = inverse_factor(&h, n, 0.01).unwrap();
        let w: Vec<f32> = (0..rows * n).map(|_| rng.unit_f32() - 0.5).collect();
        let round = |v: f64| {
            let c = (v * 8.0).round().clamp(-8.0, 7.0);
            (c / 8.0, (c as i8) as u8)
        };
        let got = quantize_rows(&w, n, &u, |_, _, v| round(v));
        for r in 0..rows {
            let mut x: Vec<f64> = w[r * n..(r + 1) * n].iter().map(|&v| v as f64).collect();
            for j in 0..n {
                let (q, code) = round(x[j]);
                assert_eq!(got[r * n + j], code, "row {r}, column {j}");
                let e = (x[j] - q) / u[j * n + j];
                for kk in j + 1..n {
                    x[kk] -= e * u[j * n + kk];
                }
            }
        }
    }

    /// The f32 factor the export uses against the f64 one, across block edges: every entry
    /// within 1e-4 of the largest (f32's 2⁻²⁴ grown by the factorization's n-term sums and the
    /// matrix's condition, about 20 here), and the rounding's codes equal in at least 99 % of
    /// places (a code differs only where the two factors' accumulated errors, about 1e-5,
    /// straddle a rounding boundary of the 1/8 grid).
    #[test]
    fn f32_factor_and_rounding_follow_the_f64_reference() {
        let mut rng = crate::numerics::rng::SplitMix64::new(23);
        let n = 2 * COL_BLOCK + 44;
        let k = 2 * n;
        let b: Vec<f64> = (0..n * k).map(|_| rng.unit_f32() as f64 - 0.5).collect();
        let mut h = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..=i {
                let v = (0..k).map(|t| b[i * k + t] * b[j * k + t]).sum::<f64>() / k as f64;
                h[i * n + j] = v;
                h[j * n + i] = v;
            }
        }
        let p64 = Plan::<f64>::new(&h, n, 0.01).unwrap();
        let p32 = Plan::<f32>::new(&h, n, 0.01).unwrap();
        assert_eq!(p64.perm, p32.perm);
        let top = p64.u.iter().fold(0f64, |m, v| m.max(v.abs()));
        for (i, (&a, &b)) in p64.u.iter().zip(&p32.u).enumerate() {
            assert!((a - b as f64).abs() <= 1e-4 * top, "U[{i}]: {a} vs {b}");
        }
        let rows = ROW_BLOCK + 6;
        let w: Vec<f32> = (0..rows * n).map(|_| rng.unit_f32() - 0.5).collect();
        let round = |_: usize, v: f64| {
            let c = (v * 8.0).round().clamp(-8.0, 7.0);
            (c / 8.0, (c as i8) as u8)
        };
        let (c64, c32) = (
            p64.quantize_rows(&w, n, round),
            p32.quantize_rows(&w, n, round),
        );
        let same = c64.iter().zip(&c32).filter(|(a, b)| a == b).count();
        assert!(
            same * 100 >= 99 * c64.len(),
            "{same} of {} codes equal",
            c64.len()
        );
    }

    #[test]
    fn error_feedback_lowers_output_error_on_correlated_inputs() {
        let mut rng = crate::numerics::rng::SplitMix64::new(9);
        let (n, rows, samples) = (16, 8, 256);
        // Strongly correlated inputs: x = z·a + small noise.
        let a: Vec<f64> = (0..n).map(|_| rng.unit_f32() as f64 + 0.5).collect();
        let xs: Vec<Vec<f64>> = (0..samples)
            .map(|_| {
                let z = rng.unit_f32() as f64 * 2.0 - 1.0;
                a.iter()
                    .map(|ai| z * ai + 0.05 * (rng.unit_f32() as f64 - 0.5))
                    .collect()
            })
            .collect();
        let mut h = vec![0f64; n * n];
        for x in &xs {
            for i in 0..n {
                for j in 0..n {
                    h[i * n + j] += x[i] * x[j];
                }
            }
        }
        let w: Vec<f32> = (0..rows * n).map(|_| rng.unit_f32() - 0.5).collect();
        let grid = |v: f64| (v * 4.0).round() / 4.0; // coarse grid so rounding matters
        let u = inverse_factor(&h, n, 0.01).unwrap();
        let codes = quantize_rows(&w, n, &u, |_, _, v| {
            let q = grid(v);
            (q, (q * 4.0 + 128.0) as u8)
        });
        let g: Vec<f64> = codes.iter().map(|&c| (c as f64 - 128.0) / 4.0).collect();
        let out_err = |q: &dyn Fn(usize) -> f64| -> f64 {
            xs.iter()
                .map(|x| {
                    (0..rows)
                        .map(|r| {
                            (0..n)
                                .map(|j| (w[r * n + j] as f64 - q(r * n + j)) * x[j])
                                .sum::<f64>()
                                .powi(2)
                        })
                        .sum::<f64>()
                })
                .sum()
        };
        let rtn = out_err(&|i| grid(w[i] as f64));
        let gptq = out_err(&|i| g[i]);
        assert!(gptq < 0.7 * rtn, "gptq {gptq} vs rtn {rtn}");
    }

    /// Without correlations the feedback has nowhere to go: every `1 / U_jj²` is the column's
    /// own damped energy `h_jj + λ·mean(h)`; a full shrink gives that on any `H`.
    #[test]
    fn error_weights_are_the_damped_energies_without_correlations() {
        let n = 5;
        let mut h = vec![0f64; n * n];
        for j in 0..n {
            h[j * n + j] = 1.0 + j as f64;
            for k in 0..n {
                if k != j {
                    h[j * n + k] = 0.3; // positive definite: diagonal dominance
                }
            }
        }
        let mean = (0..n).map(|j| h[j * n + j]).sum::<f64>() / n as f64;
        let plan = GptqPlan::with_shrink(&h, n, 0.01, 1.0).unwrap();
        for (j, w) in plan.error_weights().iter().enumerate() {
            let want = h[j * n + j] + 0.01 * mean;
            assert!((w - want).abs() < 1e-9 * want, "column {j}: {w} vs {want}");
        }
        // With the correlations kept, a column whose successors can absorb its error costs
        // less than its energy; the last column in the plan's order costs exactly its energy.
        let plan = GptqPlan::new(&h, n, 0.01).unwrap();
        let w = plan.error_weights();
        let last = *plan.perm.last().unwrap();
        let first = plan.perm[0];
        let damped = |j: usize| h[j * n + j] + 0.01 * mean;
        assert!((w[last] - damped(last)).abs() < 1e-9 * damped(last));
        assert!(w[first] < damped(first));
    }
}
