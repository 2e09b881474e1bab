//! Second-moment matrices `H = E[x xᵀ]` of one block's linear-layer inputs, for GPTQ-style
//! weight rounding (formats/fp8.md#weights). One matrix per input site (q/k/v share one,
//! gate/up another).
//!
//! The sums are a symmetric rank-k update on the runner's bf16 GEMM kernel
//! ([`syrk_lower_add`]): each batch's inputs are rounded to bf16, which is what the layer's own
//! product multiplies, and only the lower triangle is computed (half the product), then mirrored
//! when the mean is taken. Each entry is one f32 chain over every row seen (exact products, one
//! rounding per pair of rows): against an f64 sum of the same bf16 values its relative error is
//! below `rows/2 · 2⁻²⁴ · Σ|xᵢxⱼ| / |Σ xᵢxⱼ|`, in practice ~10⁻⁶ of the diagonal for 16,384
//! rows (the test below states the bound it checks). The sums stay in f32: for
//! Llama-3.1-Minitron-4B one block's matrices are 3·4096² + 14336² values, 1.03 GB, where every
//! block at once would be 16 GB.

use crate::error::Result;
use crate::model::names::InputSite;
use crate::model::LlamaConfig;
use crate::runtime::gemm::{syrk_lower_add, Gram, Isa};

/// Σ x xᵀ (row-major `[n, n]`) per input site of one block, and the rows summed per site.
pub struct BlockHessians {
    pub layer: usize,
    /// By [`InputSite::index`]; emptied by [`BlockHessians::take_mean`].
    sums: Vec<Vec<f32>>,
    counts: [u64; 4],
    widths: [usize; 4],
}

/// Bytes one block's matrices take.
pub fn block_bytes(c: &LlamaConfig) -> u64 {
    InputSite::ALL
        .iter()
        .map(|s| (s.width(c) as u64).pow(2) * 4)
        .sum()
}

impl BlockHessians {
    /// Empty sums for block `layer` of `c`.
    pub fn new(c: &LlamaConfig, layer: usize) -> Self {
        BlockHessians {
            layer,
            widths: InputSite::ALL.map(|s| s.width(c)),
            sums: InputSite::ALL
                .iter()
                .map(|s| vec![0f32; s.width(c).pow(2)])
                .collect(),
            counts: [0; 4],
        }
    }

    /// Adds rows `x` (`[rows, width]`) seen at `site`: their bf16 values' `xᵀ x`, lower
    /// triangle, into the site's f32 sums.
    pub fn add(&mut self, site: InputSite, x: &[f32]) -> Result<()> {
        let i = site.index();
        let n = self.widths[i];
        let rows = x.len() / n;
        if rows == 0 {
            return Ok(());
        }
        let g = Gram::new(&x[..rows * n], rows, n);
        syrk_lower_add(Isa::detect(), &g, &mut self.sums[i]);
        self.counts[i] += rows as u64;
        Ok(())
    }

    /// `E[x xᵀ]` at `site` (the sums divided by the rows seen), taken out of `self` so that the
    /// sums' memory is reused rather than copied. Panics if taken twice.
    pub fn take_mean(&mut self, site: InputSite) -> Vec<f32> {
        let i = site.index();
        let mut m = std::mem::take(&mut self.sums[i]);
        assert!(!m.is_empty(), "second moments of a site taken twice");
        let count = self.counts[i].max(1) as f64;
        let n = self.widths[i];
        // Mirror the lower triangle, in 64 × 64 tiles so that both sides stay in cache.
        const T: usize = 64;
        for r0 in (0..n).step_by(T) {
            for c0 in (r0..n).step_by(T) {
                for r in r0..(r0 + T).min(n) {
                    for c in c0.max(r + 1)..(c0 + T).min(n) {
                        m[r * n + c] = m[c * n + r];
                    }
                }
            }
        }
        for v in m.iter_mut() {
            *v = (*v as f64 / count) as f32;
        }
        m
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A width of 66 panels, the last partial, in two batches: the mean equals a plain f64
    /// `Σ x xᵀ / rows` of the bf16-rounded inputs within f32 rounding (1e-6 absolute on entries
    /// up to 0.08; the f32 chain of 5 rows carries at most a few 2⁻²⁴ relative), is exactly
    /// symmetric, and differs from the moments of the unrounded f32 inputs by at most what
    /// rounding both factors to bf16 can do (`2u + u²` relative to `Σ |xᵢ xⱼ|`, bf16's unit
    /// roundoff `u = 2⁻⁸`, plus the 1e-6).
    #[test]
    fn moments_match_a_plain_sum_of_the_bf16_inputs() {
        let mut j = crate::model::synth::Preset::Tiny.config_json();
        j["intermediate_size"] = serde_json::json!(2100);
        let c = LlamaConfig::from_json_str(&j.to_string(), std::path::Path::new("config.json"))
            .unwrap();
        let n = c.intermediate_size;
        let rows = 5;
        let mut rng = crate::numerics::rng::SplitMix64::new(11);
        let x: Vec<f32> = (0..rows * n).map(|_| rng.unit_f32() - 0.5).collect();
        let xb: Vec<f64> = x
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_f64())
            .collect();
        let mut h = BlockHessians::new(&c, 0);
        h.add(InputSite::MlpAct, &x[..2 * n]).unwrap();
        h.add(InputSite::MlpAct, &x[2 * n..]).unwrap();
        let m = h.take_mean(InputSite::MlpAct);
        for i in (0..n).step_by(7) {
            for j in (0..n).step_by(5) {
                let want: f64 = (0..rows)
                    .map(|r| xb[r * n + i] * xb[r * n + j])
                    .sum::<f64>()
                    / rows as f64;
                let got = m[i * n + j] as f64;
                assert!((got - want).abs() < 1e-6, "({i}, {j}): {got} vs {want}");
                assert_eq!(m[i * n + j], m[j * n + i], "({i}, {j}) not symmetric");
                let exact: f64 = (0..rows)
                    .map(|r| x[r * n + i] as f64 * x[r * n + j] as f64)
                    .sum::<f64>()
                    / rows as f64;
                let size: f64 = (0..rows)
                    .map(|r| (x[r * n + i] as f64 * x[r * n + j] as f64).abs())
                    .sum::<f64>()
                    / rows as f64;
                let u = 2f64.powi(-8);
                let bound = (2.0 * u + u * u) * size + 1e-6;
                assert!(
                    (got - exact).abs() <= bound,
                    "({i}, {j}): {got} vs f32 {exact}"
                );
            }
        }
    }
}
