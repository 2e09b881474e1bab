//! Second-moment matrices `H = E[x xᵀ]` of every linear-layer input, for GPTQ-style weight
//! rounding (formats/fp8.md#weights). One matrix per input site (q/k/v share one, gate/up another),
//! accumulated in f64 from f32 products of each chunk.

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};
use crate::model::names::InputSite;
use crate::model::{Checkpoint, LlamaConfig};
use crate::runtime::Observer;

/// Σ x xᵀ (row-major `[n, n]`) and the number of rows summed, per block and site.
pub struct Hessians {
    /// `[layer][site]`.
    pub sums: Vec<Vec<Vec<f64>>>,
    pub count: u64,
}

/// Bytes the matrices of a model need.
pub fn bytes_needed(c: &LlamaConfig) -> u64 {
    let per_layer: u64 = InputSite::ALL
        .iter()
        .map(|s| (s.width(c) as u64).pow(2))
        .sum();
    per_layer * c.num_hidden_layers as u64 * 8
}

/// The most memory we allow the matrices to take.
pub const MAX_BYTES: u64 = 6_000_000_000;

/// Accumulates the matrices as an [`Observer`] of a calibration pass.
pub struct Collector {
    sums: Vec<Vec<Vec<f64>>>,
    /// Input width per site.
    widths: [usize; 4],
}

impl Observer for Collector {
    fn linear_input(&mut self, layer: usize, site: InputSite, x: &[f32]) -> Result<()> {
        let n = self.widths[site.index()];
        let rows = x.len() / n;
        let x = Tensor::from_slice(x, (rows, n), &Device::Cpu)?;
        let g = x.t()?.matmul(&x)?.flatten_all()?.to_vec1::<f32>()?;
        for (acc, v) in self.sums[layer][site.index()].iter_mut().zip(g) {
            *acc += v as f64;
        }
        Ok(())
    }
}

impl Collector {
    /// Empty sums for `c`; refuses a model whose matrices would pass [`MAX_BYTES`].
    pub fn new(c: &LlamaConfig) -> Result<Self> {
        let need = bytes_needed(c);
        if need > MAX_BYTES {
            return Err(Error::Unsupported(format!(
                "GPTQ needs {:.1} GB of input second-moment matrices for this model (limit {:.1} GB); use --fp8-weights search or rtn",
                need as f64 / 1e9,
                MAX_BYTES as f64 / 1e9
            )));
        }
        Ok(Collector {
            widths: InputSite::ALL.map(|s| s.width(c)),
            sums: (0..c.num_hidden_layers)
                .map(|_| {
                    InputSite::ALL
                        .iter()
                        .map(|s| vec![0f64; s.width(c).pow(2)])
                        .collect()
                })
                .collect(),
        })
    }

    /// The matrices after a pass over `chunks`.
    pub fn finish(self, chunks: &[Vec<u32>]) -> Hessians {
        Hessians {
            sums: self.sums,
            count: chunks.iter().map(|c| c.len() as u64).sum(),
        }
    }
}

impl Hessians {
    /// Runs the checkpoint's blocks over `chunks` (f32 on `device`, one block in memory at a
    /// time) and accumulates the matrices.
    pub fn collect(
        ck: &Checkpoint,
        device: &Device,
        chunks: &[Vec<u32>],
        on_tokens: &dyn Fn(u64),
    ) -> Result<Self> {
        let mut col = Collector::new(&ck.config)?;
        crate::runtime::observe_streamed(
            ck,
            super::pass_dtype(device),
            device,
            chunks,
            &mut col,
            on_tokens,
        )?;
        Ok(col.finish(chunks))
    }
}
