//! GGUF files written by us or by llama.cpp (formats/gguf.md). Q and K rows are put back into
//! the Hugging Face order (so the same RoPE code runs), `rope_freqs.weight` divides the
//! frequencies, block-quantized weights stay in their blocks and run through candle's quantized
//! matmul (or are dequantized with [`LoadOptions::gguf_dense`]), float weights run like a
//! safetensors checkpoint's.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::source::{stream_dtype, vector, LoadOptions, Source};
use crate::error::{Error, Result};
use crate::format::gguf::keys;
use crate::format::gguf::{GgmlType, GgufFile, TensorInfo, Value};
use crate::model::names::{self, LinearRole};
use crate::model::LlamaConfig;
use crate::runtime::block::Block;
use crate::runtime::linear::{Linear, WeightData};

/// A GGUF file as a runner [`Source`].
pub struct GgufSource {
    g: GgufFile,
    config: LlamaConfig,
}

impl GgufSource {
    pub fn open(path: &Path) -> Result<Self> {
        let g = GgufFile::open(path)?;
        let config = gguf_config(&g)?;
        Ok(GgufSource { g, config })
    }

    fn path(&self) -> PathBuf {
        self.g.path.clone()
    }

    fn tensor(&self, name: &str) -> Result<&TensorInfo> {
        self.g.tensor(name).ok_or_else(|| Error::MissingTensor {
            path: self.path(),
            tensor: name.into(),
            expected: "present".into(),
        })
    }

    fn vec1(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let t = self.tensor(name)?;
        let v = crate::quant::ggml::dequantize(&t.ty, self.g.data(t), t.dims[0] as usize)?;
        vector(v, dtype, device)
    }

    /// Weight `name` as a linear layer `[rows, cols]`; `heads`: undo llama.cpp's Q/K row order.
    #[allow(clippy::too_many_arguments)]
    fn linear(
        &self,
        name: &str,
        rows: usize,
        cols: usize,
        heads: Option<usize>,
        dtype: DType,
        device: &Device,
        opts: LoadOptions,
    ) -> Result<Linear> {
        let t = self.tensor(name)?;
        let found = (
            t.dims.len(),
            t.dims[0] as usize,
            t.dims.get(1).copied().unwrap_or(1) as usize,
        );
        if found != (2, cols, rows) {
            return Err(Error::TensorMismatch {
                path: self.path(),
                tensor: name.into(),
                expected: format!("dims [{cols}, {rows}]"),
                found: format!("dims {:?}", t.dims),
            });
        }
        let raw = self.g.data(t);
        let bytes = match heads {
            Some(h) => Cow::Owned(crate::format::gguf::llama::unpermute_row_bytes(
                raw, rows, h,
            )),
            None => Cow::Borrowed(raw),
        };
        if is_float(&t.ty) || opts.gguf_dense {
            let data = if t.ty == GgmlType::BF16 {
                WeightData::Bf16Bytes(&bytes)
            } else {
                WeightData::F32(crate::quant::ggml::dequantize(&t.ty, &bytes, cols)?)
            };
            return Linear::build(data, rows, cols, dtype, device);
        }
        ggml_linear(&t.ty, bytes, rows, cols, device)
    }
}

fn is_float(ty: &GgmlType) -> bool {
    matches!(ty, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16)
}

impl Source for GgufSource {
    fn config(&self) -> &LlamaConfig {
        &self.config
    }

    fn label(&self) -> String {
        self.g.path.display().to_string()
    }

    fn inv_freq(&self) -> Result<Vec<f64>> {
        let c = &self.config;
        let hd = c.head_dim;
        let mut inv_freq: Vec<f64> = (0..hd / 2)
            .map(|i| 1.0 / c.rope_theta.powf((2 * i) as f64 / hd as f64))
            .collect();
        if self.g.tensor("rope_freqs.weight").is_some() {
            let f = self.g.f32_values("rope_freqs.weight")?;
            if f.len() != inv_freq.len() {
                return Err(Error::TensorMismatch {
                    path: self.path(),
                    tensor: "rope_freqs.weight".into(),
                    expected: format!("{} values", inv_freq.len()),
                    found: format!("{} values", f.len()),
                });
            }
            for (v, d) in inv_freq.iter_mut().zip(f) {
                *v /= d as f64;
            }
        }
        Ok(inv_freq)
    }

    fn release_block(&self, l: usize) {
        for r in LinearRole::ALL {
            self.g.release(&names::gguf_linear(l, r));
        }
        self.g.release(&names::gguf_attn_norm(l));
        self.g.release(&names::gguf_ffn_norm(l));
    }

    fn release_head(&self) {
        for n in [
            names::GGUF_EMBED,
            names::GGUF_OUTPUT,
            names::GGUF_OUTPUT_NORM,
        ] {
            self.g.release(n);
        }
    }

    fn block(&self, l: usize, dtype: DType, device: &Device, opts: LoadOptions) -> Result<Block> {
        let c = &self.config;
        let (h, kvh) = (c.num_attention_heads, c.num_key_value_heads);
        let lin = |r: LinearRole, heads| {
            let [rows, cols] = r.shape(c);
            self.linear(
                &names::gguf_linear(l, r),
                rows,
                cols,
                heads,
                dtype,
                device,
                opts,
            )
        };
        let sd = stream_dtype(dtype);
        Ok(Block {
            input_norm: self.vec1(&names::gguf_attn_norm(l), sd, device)?,
            post_norm: self.vec1(&names::gguf_ffn_norm(l), sd, device)?,
            q: lin(LinearRole::Q, Some(h))?,
            k: lin(LinearRole::K, Some(kvh))?,
            v: lin(LinearRole::V, None)?,
            o: lin(LinearRole::O, None)?,
            gate: lin(LinearRole::Gate, None)?,
            up: lin(LinearRole::Up, None)?,
            down: lin(LinearRole::Down, None)?,
            kv_scales: None,
        })
    }

    fn embed_rows(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let c = &self.config;
        let te = self.tensor(names::GGUF_EMBED)?;
        let data = self.g.data(te);
        let row = data.len() / c.vocab_size.max(1);
        let mut out = Vec::with_capacity(ids.len() * c.hidden_size);
        for &id in ids {
            let id = id as usize;
            let r = data.get(id * row..(id + 1) * row).ok_or_else(|| {
                Error::Invalid(format!(
                    "token id {id} is outside the embedding table ({} rows)",
                    c.vocab_size
                ))
            })?;
            out.extend(crate::quant::ggml::dequantize(&te.ty, r, c.hidden_size)?);
        }
        Ok(out)
    }

    fn embedding(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        let c = &self.config;
        let te = self.tensor(names::GGUF_EMBED)?;
        let emb = crate::quant::ggml::dequantize(&te.ty, self.g.data(te), te.dims[0] as usize)?;
        Ok(Tensor::from_vec(emb, (c.vocab_size, c.hidden_size), device)?.to_dtype(dtype)?)
    }

    fn head(&self, dtype: DType, device: &Device, opts: LoadOptions) -> Result<(Tensor, Linear)> {
        let c = &self.config;
        let name = if self.g.tensor(names::GGUF_OUTPUT).is_some() {
            names::GGUF_OUTPUT
        } else {
            names::GGUF_EMBED
        };
        let t = self.tensor(name)?;
        if t.dims.len() != 2
            || t.dims[0] as usize != c.hidden_size
            || t.dims[1] as usize != c.vocab_size
        {
            return Err(Error::TensorMismatch {
                path: self.path(),
                tensor: name.into(),
                expected: format!("dims [{}, {}]", c.hidden_size, c.vocab_size),
                found: format!("dims {:?}", t.dims),
            });
        }
        let norm = self.vec1(names::GGUF_OUTPUT_NORM, stream_dtype(dtype), device)?;
        // A float head multiplies like the safetensors head (bf16 GEMM on a CPU with bf16, the
        // stream dtype elsewhere); a block-quantized one runs through the quantized matmul.
        let packed = dtype == DType::BF16
            && (device.is_cpu() || crate::runtime::devform::wanted(device, dtype));
        let head_dtype = if packed { dtype } else { stream_dtype(dtype) };
        let head = self.linear(
            name,
            c.vocab_size,
            c.hidden_size,
            None,
            head_dtype,
            device,
            opts,
        )?;
        Ok((norm, head))
    }
}

/// A GGUF weight `[rows, cols]` of block type `ty` through candle's quantized matmul.
fn ggml_linear(
    ty: &GgmlType,
    bytes: Cow<'_, [u8]>,
    rows: usize,
    cols: usize,
    device: &Device,
) -> Result<Linear> {
    use candle_core::quantized::{QMatMul, QStorage, QTensor};
    let dt = crate::quant::ggml::candle_dtype(ty)?;
    let storage = QStorage::from_data(bytes, device, dt)?;
    let q = QTensor::new(storage, (rows, cols))?;
    Ok(Linear::Ggml {
        w: std::sync::Arc::new(QMatMul::from_qtensor(q)?),
    })
}

/// A Llama configuration from a GGUF file's `llama.*` and `tokenizer.*` keys.
fn gguf_config(g: &GgufFile) -> Result<LlamaConfig> {
    let arch = g.get(keys::GENERAL_ARCHITECTURE).and_then(Value::as_str);
    if arch != Some("llama") {
        return Err(Error::format(
            &g.path,
            format!(
                "{} is {arch:?}, expected \"llama\"",
                keys::GENERAL_ARCHITECTURE
            ),
        ));
    }
    let num = |k: &str| -> Option<u64> { g.get(k).and_then(Value::as_u64) };
    let need = |k: &str| -> Result<usize> {
        num(k)
            .map(|v| v as usize)
            .ok_or_else(|| Error::format(&g.path, format!("missing integer key {k}")))
    };
    let float = |k: &str| -> Option<f64> {
        match g.get(k)? {
            Value::F32(v) => Some(*v as f64),
            Value::F64(v) => Some(*v),
            _ => None,
        }
    };
    let hidden = need(keys::LLAMA_EMBEDDING_LENGTH)?;
    let heads = need(keys::LLAMA_HEAD_COUNT)?;
    let head_dim = num(keys::LLAMA_KEY_LENGTH)
        .or(num(keys::LLAMA_ROPE_DIMENSION_COUNT))
        .map(|v| v as usize)
        .unwrap_or(hidden / heads.max(1));
    let vocab = match num(keys::LLAMA_VOCAB_SIZE) {
        Some(v) => v as usize,
        None => g
            .tensor(names::GGUF_EMBED)
            .and_then(|t| t.dims.get(1).copied())
            .ok_or_else(|| Error::format(&g.path, "no llama.vocab_size and no token_embd.weight"))?
            as usize,
    };
    let eos: Vec<u32> = num(keys::TOKENIZER_EOS_ID)
        .map(|v| v as u32)
        .into_iter()
        .collect();
    Ok(LlamaConfig {
        hidden_size: hidden,
        intermediate_size: need(keys::LLAMA_FEED_FORWARD_LENGTH)?,
        num_hidden_layers: need(keys::LLAMA_BLOCK_COUNT)?,
        num_attention_heads: heads,
        num_key_value_heads: num(keys::LLAMA_HEAD_COUNT_KV).map_or(heads, |v| v as usize),
        head_dim,
        vocab_size: vocab,
        rms_norm_eps: float(keys::LLAMA_RMS_EPS).unwrap_or(1e-5),
        rope_theta: float(keys::LLAMA_ROPE_FREQ_BASE).unwrap_or(10000.0),
        rope_scaling: crate::model::config::RopeScaling::None,
        tie_word_embeddings: g.tensor(names::GGUF_OUTPUT).is_none(),
        bos_token_id: num(keys::TOKENIZER_BOS_ID).map(|v| v as u32),
        eos_token_ids: eos,
        max_position_embeddings: num(keys::LLAMA_CONTEXT_LENGTH).map_or(2048, |v| v as usize),
        torch_dtype: None,
    })
}
