//! The linear layer of every block. One enum so that each artifact kind (dense now; FP8, INT8
//! and GGML kinds later) runs through the same model code.

use candle_core::{DType, Device, Tensor};

use crate::error::Result;

/// A linear map `y = x Wᵀ` without bias.
#[derive(Debug, Clone)]
pub enum Linear {
    /// Dense weight `[out, in]` in the compute dtype.
    Dense { weight: Tensor },
}

impl Linear {
    /// A dense layer from row-major f32 values of shape `[out, in]`.
    pub fn dense(
        values: Vec<f32>,
        out: usize,
        inp: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let w = Tensor::from_vec(values, (out, inp), device)?.to_dtype(dtype)?;
        Ok(Linear::Dense { weight: w })
    }

    /// Applies the layer to `x` of shape `[.., in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Linear::Dense { weight } => {
                let dims = x.dims().to_vec();
                let inp = *dims.last().expect("rank ≥ 1");
                let rows: usize = dims[..dims.len() - 1].iter().product();
                let y = x.reshape((rows, inp))?.matmul(&weight.t()?)?;
                let mut out_dims = dims;
                *out_dims.last_mut().expect("rank ≥ 1") = weight.dim(0)?;
                Ok(y.reshape(out_dims)?)
            }
        }
    }

    /// `[out, in]`.
    pub fn shape(&self) -> (usize, usize) {
        match self {
            Linear::Dense { weight } => {
                let d = weight.dims();
                (d[0], d[1])
            }
        }
    }
}
