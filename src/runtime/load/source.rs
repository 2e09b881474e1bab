//! What every loader provides: the [`Source`] trait, load options and the small helpers the
//! loaders share.

use candle_core::{DType, Device, Tensor};

use crate::error::Result;
use crate::model::LlamaConfig;
use crate::runtime::block::Block;
use crate::runtime::linear::Linear;

/// How an artifact is run.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    /// Run quantized weights with unquantized activations (and no KV-cache quantization): what
    /// weight-only kernels compute, and a way to split the loss between weights and activations.
    pub weight_only: bool,
    /// GGUF: dequantize block-quantized weights at load and run them as dense matmuls
    /// (unquantized activations, as llama.cpp's dequantize-then-GEMM paths compute).
    pub gguf_dense: bool,
    /// f32 bytes above which a bf16-stored head computing in f32 on a CPU stays bf16 and is
    /// widened slice by slice inside the product ([`crate::runtime::linear::Linear::Widened`]);
    /// `None`: [`crate::runtime::linear::WIDEN_ABOVE`].
    pub widen_head_above: Option<usize>,
}

/// A model's weights as the runner consumes them.
pub trait Source: Sync {
    /// The architecture.
    fn config(&self) -> &LlamaConfig;
    /// Where the weights come from (for messages).
    fn label(&self) -> String;
    /// RoPE inverse frequencies, `head_dim / 2` values.
    fn inv_freq(&self) -> Result<Vec<f64>>;
    /// Block `l` with weights in their stored precision for matmul dtype `dtype` on `device`.
    fn block(&self, l: usize, dtype: DType, device: &Device, opts: LoadOptions) -> Result<Block>;
    /// Drops this process's resident pages of block `l` (the file cache keeps them).
    fn release_block(&self, _l: usize) {}
    /// f32 embedding rows of `ids`, `[ids.len() · hidden]`.
    fn embed_rows(&self, ids: &[u32]) -> Result<Vec<f32>>;
    /// The whole embedding table `[vocab, hidden]` in `dtype` (generation's resident model).
    fn embedding(&self, dtype: DType, device: &Device) -> Result<Tensor>;
    /// The final norm (stream dtype) and the output head.
    fn head(&self, dtype: DType, device: &Device, opts: LoadOptions) -> Result<(Tensor, Linear)>;
    /// Drops the resident pages of the embedding, final norm and head.
    fn release_head(&self) {}
}

/// The dtype of everything but the linear layers' weights and inputs: with bf16 or f16 weights
/// the residual stream, norms, RoPE, attention, softmax and logits stay in f32 (as llama.cpp's
/// GPU backends keep activations), so only the matmul inputs are rounded to the weight dtype.
pub fn stream_dtype(weights: DType) -> DType {
    match weights {
        DType::BF16 | DType::F16 => DType::F32,
        d => d,
    }
}

/// A vector `[n]` in `dtype`.
pub(crate) fn vector(v: Vec<f32>, dtype: DType, device: &Device) -> Result<Tensor> {
    let n = v.len();
    Ok(Tensor::from_vec(v, n, device)?.to_dtype(dtype)?)
}

/// A block from f32 norms and linear weights (`[out, in]` row-major, in
/// [`crate::model::names::LinearRole::ALL`] order), each linear in the form the loaders give
/// float weights for matmul dtype `dtype` on `device`.
pub fn dense_block(
    c: &crate::model::LlamaConfig,
    input_norm: Vec<f32>,
    post_norm: Vec<f32>,
    linears: Vec<Vec<f32>>,
    dtype: candle_core::DType,
    device: &candle_core::Device,
) -> Result<Block> {
    use crate::model::names::LinearRole;
    use crate::runtime::linear::WeightData;
    let sd = stream_dtype(dtype);
    let mut it = LinearRole::ALL.into_iter().zip(linears);
    let mut next = || -> Result<Linear> {
        let (r, w) = it.next().ok_or_else(|| {
            crate::error::Error::Internal("a block needs seven linear layers".into())
        })?;
        let [out, inp] = r.shape(c);
        Linear::build(WeightData::F32(w), out, inp, dtype, device)
    };
    Ok(Block {
        input_norm: vector(input_norm, sd, device)?,
        post_norm: vector(post_norm, sd, device)?,
        q: next()?,
        k: next()?,
        v: next()?,
        o: next()?,
        gate: next()?,
        up: next()?,
        down: next()?,
        kv_scales: None,
    })
}
