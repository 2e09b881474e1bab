//! Second-moment matrices `H = E[x xᵀ]` of one block's linear-layer inputs, for GPTQ-style
//! weight rounding (formats/fp8.md#weights). One matrix per input site (q/k/v share one,
//! gate/up another): each batch's product is an f32 GEMM (sums of up to 2048 products), and the
//! batches' products are summed in f32 too. That adds at most one f32 rounding per batch to
//! each entry (relative 2⁻²⁴ each: below 2·10⁻⁶ for 32 batches, under what each batch's own
//! f32 sum carries), and halves the memory.
//!
//! The export's block pipeline holds one block's matrices at a time: for Llama-3.1-Minitron-4B
//! that is 3·4096² + 14336² values, 1.03 GB in f32, where every block at once would be 16 GB.

use candle_core::{Device, Tensor};

use crate::error::Result;
use crate::model::names::InputSite;
use crate::model::LlamaConfig;

/// Σ x xᵀ (row-major `[n, n]`) per input site of one block, and the rows summed per site.
pub struct BlockHessians {
    pub layer: usize,
    /// By [`InputSite::index`]; emptied by [`BlockHessians::take_mean`].
    sums: Vec<Vec<f32>>,
    counts: [u64; 4],
    widths: [usize; 4],
}

/// Columns of `xᵀ x` computed at once (inputs up to this wide take one product).
const TILE: usize = 2048;

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

    /// Adds rows `x` (`[rows, width]`) seen at `site`: `xᵀ x` in f32 on the GEMM, by tiles of
    /// [`TILE`] columns so that the f32 product in flight stays near `width × 2048 × 4` bytes
    /// (117 MB at 14336) instead of a second full matrix, then summed into the totals. The
    /// matrix is symmetric: each tile's product covers only the rows on or below its first
    /// column (the lower triangle and the tile's own square), the rest is mirrored when the
    /// mean is taken.
    pub fn add(&mut self, site: InputSite, x: &[f32]) -> Result<()> {
        let i = site.index();
        let n = self.widths[i];
        let rows = x.len() / n;
        let t = Tensor::from_slice(x, (rows, n), &Device::Cpu)?;
        let sums = &mut self.sums[i];
        for j0 in (0..n).step_by(TILE) {
            let w = TILE.min(n - j0);
            let (lhs, rhs) = if w == n {
                (t.clone(), t.clone())
            } else {
                (
                    t.narrow(1, j0, n - j0)?.contiguous()?,
                    t.narrow(1, j0, w)?.contiguous()?,
                )
            };
            // Rows j0.. of columns j0..j0 + w.
            let g = lhs.t()?.matmul(&rhs)?.flatten_all()?.to_vec1::<f32>()?;
            for (srow, grow) in sums[j0 * n..].chunks_mut(n).zip(g.chunks(w)) {
                for (acc, &v) in srow[j0..j0 + w].iter_mut().zip(grow) {
                    *acc += v;
                }
            }
        }
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
        // Above the diagonal, tiles right of the first hold nothing: mirror the lower triangle.
        for r in 0..n {
            for c in (r / TILE + 1) * TILE..n {
                m[r * n + c] = m[c * n + r];
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

    /// Wider than one tile (two tiles, the second narrower): the mean from the tiled, mirrored
    /// f32 products summed in f32 equals a plain f64 `Σ x xᵀ / rows` within f32 rounding
    /// (1e-6 absolute on entries up to 0.08: about ten f32 roundings), and is exactly symmetric.
    #[test]
    fn tiled_moments_match_a_plain_sum() {
        let mut j = crate::model::synth::Preset::Tiny.config_json();
        j["intermediate_size"] = serde_json::json!(TILE + 52);
        let c = LlamaConfig::from_json_str(&j.to_string(), std::path::Path::new("config.json"))
            .unwrap();
        let n = c.intermediate_size;
        let rows = 5;
        let mut rng = crate::numerics::rng::SplitMix64::new(11);
        let x: Vec<f32> = (0..rows * n).map(|_| rng.unit_f32() - 0.5).collect();
        let mut h = BlockHessians::new(&c, 0);
        h.add(InputSite::MlpAct, &x[..2 * n]).unwrap();
        h.add(InputSite::MlpAct, &x[2 * n..]).unwrap();
        let m = h.take_mean(InputSite::MlpAct);
        for i in (0..n).step_by(7) {
            for j in (0..n).step_by(5) {
                let want: f64 = (0..rows)
                    .map(|r| x[r * n + i] as f64 * x[r * n + j] as f64)
                    .sum::<f64>()
                    / rows as f64;
                let got = m[i * n + j] as f64;
                assert!((got - want).abs() < 1e-6, "({i}, {j}): {got} vs {want}");
                assert_eq!(m[i * n + j], m[j * n + i], "({i}, {j}) not symmetric");
            }
        }
    }
}
