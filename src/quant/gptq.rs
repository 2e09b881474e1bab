//! GPTQ-style rounding (Frantar et al. 2022) onto a fixed per-row grid: columns are rounded in
//! order and each rounding error is pushed onto the not-yet-rounded columns through the inverse
//! of the input second-moment matrix, so the layer's output error under the calibration inputs is
//! what gets minimised rather than each weight's own error.
//!
//! Rows are independent given the shared factor, so they run in parallel and the result does not
//! depend on the thread count.

use rayon::prelude::*;

use crate::error::{Error, Result};

/// Upper Cholesky factor `U` of `(H + λ·mean(diag H)·I)⁻¹` (row-major `[n, n]`), as GPTQ uses it.
/// Columns never seen (zero diagonal) get a unit diagonal.
pub fn inverse_factor(h: &[f64], n: usize, damp: f64) -> Result<Vec<f64>> {
    let mut a = h.to_vec();
    for j in 0..n {
        if a[j * n + j] <= 0.0 {
            a[j * n + j] = 1.0;
        }
    }
    let mean_diag = (0..n).map(|j| a[j * n + j]).sum::<f64>() / n as f64;
    for j in 0..n {
        a[j * n + j] += damp * mean_diag;
    }
    // A = L Lᵀ.
    let l = cholesky_lower(&a, n)?;
    // A⁻¹ = L⁻ᵀ L⁻¹: invert L (lower triangular) one column at a time (the columns are
    // independent; `t` holds column j of L⁻¹ as its row j), then multiply.
    let mut t = vec![0f64; n * n];
    t.par_chunks_mut(n).enumerate().for_each(|(j, col)| {
        col[j] = 1.0 / l[j * n + j];
        for i in j + 1..n {
            let li = &l[i * n..(i + 1) * n];
            let mut s = 0.0;
            for k in j..i {
                s += li[k] * col[k];
            }
            col[i] = -s / li[i];
        }
    });
    let mut inv = vec![0f64; n * n];
    inv.par_chunks_mut(n).enumerate().for_each(|(i, row)| {
        let ti = &t[i * n..(i + 1) * n];
        for (j, v) in row.iter_mut().enumerate() {
            let tj = &t[j * n..(j + 1) * n];
            let mut s = 0.0;
            for k in i.max(j)..n {
                s += ti[k] * tj[k];
            }
            *v = s;
        }
    });
    // Upper factor of the inverse: inv = Uᵀ U, U = (lower factor)ᵀ.
    let li = cholesky_lower(&inv, n)?;
    let mut u = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            u[j * n + i] = li[i * n + j];
        }
    }
    Ok(u)
}

fn cholesky_lower(a: &[f64], n: usize) -> Result<Vec<f64>> {
    let mut l = vec![0f64; n * n];
    for j in 0..n {
        let mut d = a[j * n + j];
        for k in 0..j {
            d -= l[j * n + k] * l[j * n + k];
        }
        if d <= 0.0 || !d.is_finite() {
            return Err(Error::Invalid(format!(
                "GPTQ: second-moment matrix is not positive definite at column {j}"
            )));
        }
        let d = d.sqrt();
        l[j * n + j] = d;
        let (head, tail) = l.split_at_mut((j + 1) * n);
        let lj = &head[j * n..j * n + j];
        tail.par_chunks_mut(n).enumerate().for_each(|(r, row)| {
            let i = j + 1 + r;
            let mut s = a[i * n + j];
            for k in 0..j {
                s -= row[k] * lj[k];
            }
            row[j] = s / d;
        });
    }
    Ok(l)
}

/// Rows rounded together: each row of the factor, read once, updates all of them.
const ROW_BLOCK: usize = 8;

multiversion! {
    /// `x_r[k] −= e_r · u[k]` for `k` in `from..n` over the rows of one block (`xs` is
    /// `[rows, n]`): the same subtraction of the same product per element as one row at a time,
    /// so any row blocking and either build gives the same bits.
    fn subtract_outer(xs: &mut [f64], n: usize, errs: &[f64], u: &[f64], from: usize) {
        for (x, &e) in xs.chunks_mut(n).zip(errs) {
            for (xk, &uk) in x[from..].iter_mut().zip(&u[from..]) {
                *xk -= e * uk;
            }
        }
    }
}

/// Rounds every row of `w` (`[rows, n]`) with `round(row, column, value) -> (dequantized value,
/// code)`, propagating errors through `u` (from [`inverse_factor`]). Returns the codes.
pub fn quantize_rows(
    w: &[f32],
    n: usize,
    u: &[f64],
    round: impl Fn(usize, usize, f64) -> (f64, u8) + Sync,
) -> Vec<u8> {
    let mut out = vec![0u8; w.len()];
    out.par_chunks_mut(n * ROW_BLOCK)
        .zip(w.par_chunks(n * ROW_BLOCK))
        .enumerate()
        .for_each(|(b, (o, rows))| {
            let mut x: Vec<f64> = rows.iter().map(|&v| v as f64).collect();
            let count = rows.len() / n;
            let mut errs = [0f64; ROW_BLOCK];
            for j in 0..n {
                for (i, e) in errs.iter_mut().enumerate().take(count) {
                    let (q, code) = round(b * ROW_BLOCK + i, j, x[i * n + j]);
                    o[i * n + j] = code;
                    *e = (x[i * n + j] - q) / u[j * n + j];
                }
                subtract_outer(&mut x, n, &errs[..count], &u[j * n..(j + 1) * n], j + 1);
            }
        });
    out
}

/// GPTQ's column order and factor for one input: columns by decreasing `E[x_j²]` ("act order":
/// the most important columns are rounded first, while every other column can still absorb
/// their error), ties by index.
pub struct GptqPlan {
    pub perm: Vec<usize>,
    pub u: Vec<f64>,
}

impl GptqPlan {
    pub fn new(h: &[f64], n: usize, damp: f64) -> Result<Self> {
        Self::with_shrink(h, n, damp, 0.0)
    }

    /// [`GptqPlan::new`] on `H` with its off-diagonal entries scaled by `1 − shrink`: the
    /// second moments' correlations between input columns, measured on the calibration text,
    /// carry over to other text less well than its per-column energies, and the error feedback
    /// leans on them hardest. Shrinking them toward the diagonal (0: plain GPTQ, 1: no feedback
    /// at all) trades some in-domain fit for text the calibration never saw (README, W4A16).
    pub fn with_shrink(h: &[f64], n: usize, damp: f64, shrink: f64) -> Result<Self> {
        let mut perm: Vec<usize> = (0..n).collect();
        perm.sort_by(|&a, &b| h[b * n + b].total_cmp(&h[a * n + a]).then(a.cmp(&b)));
        let keep = 1.0 - shrink;
        let mut hp = vec![0f64; n * n];
        for (i, &pi) in perm.iter().enumerate() {
            for (j, &pj) in perm.iter().enumerate() {
                let v = h[pi * n + pj];
                hp[i * n + j] = if i == j { v } else { v * keep };
            }
        }
        Ok(GptqPlan {
            u: inverse_factor(&hp, n, damp)?,
            perm,
        })
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
            let d = self.u[i * n + i];
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

    /// [`GptqPlan::quantize_rows`] with `round(row, column, value)` told each value's column in
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
