//! Second-moment matrices `H = E[x xᵀ]` of one block's linear-layer inputs, for GPTQ-style
//! weight rounding (formats/fp8.md#weights). One matrix per input site (q/k/v share one,
//! gate/up another), accumulated in f64 from the f32 products of each batch of rows.
//!
//! The export's block pipeline holds one block's matrices at a time: for Llama-3.1-Minitron-4B
//! that is 3·4096² + 14336² values, 2.05 GB in f64, where every block at once would be 32.7 GB.

use candle_core::{Device, Tensor};

use crate::error::Result;
use crate::model::names::InputSite;
use crate::model::LlamaConfig;

/// Σ x xᵀ (row-major `[n, n]`) per input site of one block, and the rows summed per site.
pub struct BlockHessians {
    pub layer: usize,
    /// By [`InputSite::index`]; emptied by [`BlockHessians::take_mean`].
    sums: Vec<Vec<f64>>,
    counts: [u64; 4],
    widths: [usize; 4],
}

/// Columns of `xᵀ x` computed at once (inputs up to this wide take one product).
const TILE: usize = 2048;

/// Bytes one block's matrices take.
pub fn block_bytes(c: &LlamaConfig) -> u64 {
    InputSite::ALL
        .iter()
        .map(|s| (s.width(c) as u64).pow(2) * 8)
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
                .map(|s| vec![0f64; s.width(c).pow(2)])
                .collect(),
            counts: [0; 4],
        }
    }

    /// Adds rows `x` (`[rows, width]`) seen at `site`: `xᵀ x` in f32 on the GEMM, by tiles of
    /// [`TILE`] columns so that the f32 product in flight stays near `width × 2048 × 4` bytes
    /// (117 MB at 14336) instead of a second full matrix, then summed into the f64 totals.
    pub fn add(&mut self, site: InputSite, x: &[f32]) -> Result<()> {
        let i = site.index();
        let n = self.widths[i];
        let rows = x.len() / n;
        let t = Tensor::from_slice(x, (rows, n), &Device::Cpu)?;
        let sums = &mut self.sums[i];
        for j0 in (0..n).step_by(TILE) {
            let w = TILE.min(n - j0);
            let rhs = if w == n {
                t.clone()
            } else {
                t.narrow(1, j0, w)?.contiguous()?
            };
            let g = t.t()?.matmul(&rhs)?.flatten_all()?.to_vec1::<f32>()?;
            for (srow, grow) in sums.chunks_mut(n).zip(g.chunks(w)) {
                for (acc, &v) in srow[j0..j0 + w].iter_mut().zip(grow) {
                    *acc += v as f64;
                }
            }
        }
        self.counts[i] += rows as u64;
        Ok(())
    }

    /// `E[x xᵀ]` at `site` (the sums divided by the rows seen), taken out of `self` so that the
    /// sums' memory is reused rather than copied. Panics if taken twice.
    pub fn take_mean(&mut self, site: InputSite) -> Vec<f64> {
        let i = site.index();
        let mut m = std::mem::take(&mut self.sums[i]);
        assert!(!m.is_empty(), "second moments of a site taken twice");
        let n = self.counts[i].max(1) as f64;
        for v in m.iter_mut() {
            *v /= n;
        }
        m
    }
}
