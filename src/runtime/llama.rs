//! Llama-3.x forward pass (formats/hf-llama.md#forward).
//!
//! Matches transformers' `LlamaForCausalLM`: RMSNorm, RoPE in the `rotate_half` convention (the
//! two halves of each head are the rotated pairs) with llama3 frequency scaling, grouped-query
//! attention with a causal mask, SwiGLU MLP, tied or untied head. Returns logits for every
//! position, which perplexity and KL-divergence need.

use candle_core::{DType, Device, Tensor};

use crate::error::Error;
use crate::error::Result;
use crate::model::names::{self, InputSite, LinearRole};
use crate::model::Dtype;
use crate::model::{Checkpoint, LlamaConfig};
use crate::runtime::linear::{fp8_static, ActQuant, Linear};

/// How an artifact is run.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadOptions {
    /// Run quantized weights with unquantized activations (and no KV-cache quantization): what
    /// weight-only kernels compute, and a way to split the loss between weights and activations.
    pub weight_only: bool,
}

/// Receives what calibration needs while the model runs. The model's numerics never depend on
/// what an observer does.
pub trait Observer {
    /// The input `x` (`[b, t, in]`) that is about to meet the linear layers reading `site` in
    /// block `layer` (once per site: q, k and v share one input, gate and up another).
    fn linear_input(&mut self, layer: usize, site: InputSite, x: &Tensor) -> Result<()>;
    /// K after RoPE and V (`[b, kv_heads, t, head_dim]`) of block `layer`.
    fn kv(&mut self, _layer: usize, _k: &Tensor, _v: &Tensor) -> Result<()> {
        Ok(())
    }
}

struct Block {
    input_norm: Tensor,
    post_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    gate: Linear,
    up: Linear,
    down: Linear,
    /// Static FP8 KV-cache scales (k, v), when the artifact has them.
    kv_scales: Option<(f32, f32)>,
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

/// A float vector tensor `name` widened to `dtype` on `device`.
fn vec1(ck: &Checkpoint, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
    let v = ck.read_f32(name)?;
    let n = v.len();
    Ok(Tensor::from_vec(v, n, device)?.to_dtype(dtype)?)
}

impl Block {
    /// Loads block `l` of `ck` (bf16 or any artifact we read).
    fn load(
        ck: &Checkpoint,
        l: usize,
        dtype: DType,
        device: &Device,
        opts: LoadOptions,
    ) -> Result<Self> {
        let c = &ck.config;
        let dynamic_default = dynamic_activations(&ck.config_json);
        let scalar = |name: &str| -> Result<Option<f32>> {
            if !ck.index.contains_key(name) {
                return Ok(None);
            }
            let v = ck.read_f32(name)?;
            match v.as_slice() {
                [x] => Ok(Some(*x)),
                _ => Err(Error::TensorMismatch {
                    path: ck.dir.clone(),
                    tensor: name.into(),
                    expected: "one value".into(),
                    found: format!("{} values", v.len()),
                }),
            }
        };
        let lin = |layer: usize, role: LinearRole| -> Result<Linear> {
            let [out, inp] = role.shape(c);
            let name = names::hf_linear(layer, role);
            let stem = name.strip_suffix(".weight").expect("weight");
            let scale_name = format!("{stem}.weight_scale");
            let packed = format!("{stem}.weight_packed");
            if ck.index.contains_key(&packed) {
                // W8A16: dequantized weights, activations untouched (what Marlin computes).
                let (bytes, _) = ck.raw(&packed)?;
                let q = crate::quant::int8::unpack(bytes, out, inp);
                let scales = ck.read_f32(&scale_name)?;
                let groups = scales.len() / out;
                if groups == 0 || scales.len() % out != 0 || inp % groups != 0 {
                    return Err(Error::TensorMismatch {
                        path: ck.dir.clone(),
                        tensor: scale_name,
                        expected: format!("[{out}, groups] with groups dividing {inp}"),
                        found: format!("{} values", scales.len()),
                    });
                }
                let g = inp / groups;
                let w: Vec<f32> = q
                    .iter()
                    .enumerate()
                    .map(|(i, &v)| v as f32 * scales[(i / inp) * groups + (i % inp) / g])
                    .collect();
                return Linear::dense(w, out, inp, dtype, device);
            }
            let (bytes, info) = ck.raw(&name)?;
            if info.dtype == Dtype::I8 {
                let scales = ck.read_f32(&scale_name)?;
                if scales.len() != out {
                    return Err(Error::TensorMismatch {
                        path: ck.dir.clone(),
                        tensor: scale_name,
                        expected: format!("{out} per-channel values"),
                        found: format!("{} values", scales.len()),
                    });
                }
                let q: Vec<i8> = bytes.iter().map(|&b| b as i8).collect();
                let dynamic = dynamic_default && !opts.weight_only;
                if !device.is_cpu() {
                    return Linear::int8_bf16(&q, scales, out, inp, dynamic, device);
                }
                return Linear::int8(&q, scales, out, inp, dynamic, dtype, device);
            }
            if info.dtype != Dtype::F8E4M3 {
                return Linear::dense(ck.read_f32(&name)?, out, inp, dtype, device);
            }
            let scales = ck.read_f32(&scale_name)?;
            if scales.len() != out && scales.len() != 1 {
                return Err(Error::TensorMismatch {
                    path: ck.dir.clone(),
                    tensor: scale_name,
                    expected: format!("{out} per-channel values or 1 per-tensor value"),
                    found: format!("{} values", scales.len()),
                });
            }
            let table = crate::numerics::fp8::e4m3_table();
            let w: Vec<f32> = bytes
                .iter()
                .enumerate()
                .map(|(i, &q)| {
                    table[q as usize] * scales[if scales.len() == 1 { 0 } else { i / inp }]
                })
                .collect();
            let weight = Tensor::from_vec(w, (out, inp), device)?.to_dtype(dtype)?;
            let act = if opts.weight_only {
                ActQuant::None
            } else if let Some(s) = scalar(&format!("{stem}.input_scale"))? {
                ActQuant::Static(s)
            } else if dynamic_default {
                ActQuant::DynamicToken
            } else {
                ActQuant::None
            };
            Ok(Linear::Fp8 { weight, act })
        };
        Ok(Block {
            input_norm: vec1(ck, &names::hf_input_norm(l), stream_dtype(dtype), device)?,
            post_norm: vec1(ck, &names::hf_post_norm(l), stream_dtype(dtype), device)?,
            q: lin(l, LinearRole::Q)?,
            k: lin(l, LinearRole::K)?,
            v: lin(l, LinearRole::V)?,
            o: lin(l, LinearRole::O)?,
            gate: lin(l, LinearRole::Gate)?,
            up: lin(l, LinearRole::Up)?,
            down: lin(l, LinearRole::Down)?,
            kv_scales: if opts.weight_only {
                None
            } else {
                match (
                    scalar(&format!("model.layers.{l}.self_attn.k_scale"))?,
                    scalar(&format!("model.layers.{l}.self_attn.v_scale"))?,
                ) {
                    (Some(k), Some(v)) => Some((k, v)),
                    _ => None,
                }
            },
        })
    }
}

/// What every block of one forward pass shares.
struct Pass<'a> {
    cfg: &'a LlamaConfig,
    cos: &'a Tensor,
    sin: &'a Tensor,
    mask: Option<&'a Tensor>,
    b: usize,
    t: usize,
    /// Cached plus new positions.
    total: usize,
}

impl Block {
    /// Runs the block on the residual stream `x` (`[b, t, hidden]`).
    fn forward(
        &self,
        l: usize,
        x: Tensor,
        p: &Pass,
        cache: Option<&mut KvCache>,
        obs: &mut Option<&mut dyn Observer>,
    ) -> Result<Tensor> {
        let (b, t, total) = (p.b, p.t, p.total);
        let c = p.cfg;
        let eps = c.rms_norm_eps as f32;
        let (h, kvh, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let scale = 1.0 / (hd as f64).sqrt();
        let (cos, sin) = (p.cos, p.sin);
        let mut x = x;
        let xn = rms_norm(&x, &self.input_norm, eps)?;
        if let Some(o) = obs.as_deref_mut() {
            o.linear_input(l, InputSite::AttnIn, &xn)?;
        }
        let sd = x.dtype();
        let mut qkv = Linear::forward_shared(&[&self.q, &self.k, &self.v], &xn)?.into_iter();
        let mut heads = |n: usize| -> Result<Tensor> {
            let t_ = qkv.next().expect("three projections").to_dtype(sd)?;
            Ok(t_.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let q = heads(h)?;
        let k = heads(kvh)?;
        let v = heads(kvh)?;
        let q = candle_nn::rotary_emb::rope(&q, cos, sin)?;
        let k = candle_nn::rotary_emb::rope(&k, cos, sin)?;
        if let Some(o) = obs.as_deref_mut() {
            o.kv(l, &k, &v)?;
        }
        // An FP8 KV cache stores K and V as E4M3 with static scales; attention reads them back.
        let (k, v) = match self.kv_scales {
            Some((ks, vs)) => (fp8_static(&k, ks)?, fp8_static(&v, vs)?),
            None => (k, v),
        };
        let (k, v) = match cache {
            Some(cache) => {
                let k = match &cache.k[l] {
                    Some(prev) => Tensor::cat(&[prev, &k], 2)?,
                    None => k,
                };
                let v = match &cache.v[l] {
                    Some(prev) => Tensor::cat(&[prev, &v], 2)?,
                    None => v,
                };
                cache.k[l] = Some(k.clone());
                cache.v[l] = Some(v.clone());
                (k, v)
            }
            None => (k, v),
        };
        // Grouped-query attention: query heads g*i .. g*(i+1) share KV head i. Folding the
        // group into the query rows lets one batched matmul serve the whole group.
        let g = h / kvh;
        let q = q.reshape((b, kvh, g * t, hd))?;
        let att = (q.matmul(&k.t()?)? * scale)?.reshape((b, h, t, total))?;
        let att = match p.mask {
            Some(m) => att.broadcast_add(m)?,
            None => att,
        };
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let y = att.reshape((b, kvh, g * t, total))?.matmul(&v)?;
        let y = y
            .reshape((b, h, t, hd))?
            .transpose(1, 2)?
            .reshape((b, t, h * hd))?;
        if let Some(o) = obs.as_deref_mut() {
            o.linear_input(l, InputSite::AttnOut, &y)?;
        }
        x = (x + self.o.forward(&y)?.to_dtype(sd)?)?;

        let xn = rms_norm(&x, &self.post_norm, eps)?;
        if let Some(o) = obs.as_deref_mut() {
            o.linear_input(l, InputSite::MlpIn, &xn)?;
        }
        let gu = Linear::forward_shared(&[&self.gate, &self.up], &xn)?;
        let (g_, u_) = (gu[0].to_dtype(sd)?, gu[1].to_dtype(sd)?);
        let act = (candle_nn::ops::silu(&g_)? * u_)?;
        if let Some(o) = obs.as_deref_mut() {
            o.linear_input(l, InputSite::MlpAct, &act)?;
        }
        x = (x + self.down.forward(&act)?.to_dtype(sd)?)?;
        Ok(x)
    }
}

/// A loaded model.
pub struct Llama {
    pub config: LlamaConfig,
    pub device: Device,
    pub dtype: DType,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: Tensor,
    lm_head: Linear,
    inv_freq: Vec<f64>,
}

/// Keys and values of the positions seen so far, per block.
pub struct KvCache {
    k: Vec<Option<Tensor>>,
    v: Vec<Option<Tensor>>,
    /// Number of positions already in the cache.
    pub len: usize,
}

impl KvCache {
    pub fn new(layers: usize) -> Self {
        KvCache {
            k: vec![None; layers],
            v: vec![None; layers],
            len: 0,
        }
    }
}

impl Llama {
    /// Loads a bf16/f16/f32 checkpoint, widening weights to `dtype` on `device`.
    pub fn load(ck: &Checkpoint, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_with(ck, dtype, device, LoadOptions::default())
    }

    /// Loads any checkpoint we read (bf16 or an FP8 artifact) with `opts`.
    pub fn load_with(
        ck: &Checkpoint,
        dtype: DType,
        device: &Device,
        opts: LoadOptions,
    ) -> Result<Self> {
        let c = &ck.config;
        let vec1 = |name: &str| vec1(ck, name, stream_dtype(dtype), device);
        let blocks = (0..c.num_hidden_layers)
            .map(|l| Block::load(ck, l, dtype, device, opts))
            .collect::<Result<Vec<_>>>()?;
        let embed_vals = ck.read_f32(names::EMBED)?;
        let embed =
            Tensor::from_vec(embed_vals, (c.vocab_size, c.hidden_size), device)?.to_dtype(dtype)?;
        // The head multiplies in the stream dtype, so logits are never rounded to bf16.
        let lm_head = if ck.index.contains_key(names::LM_HEAD) {
            Linear::dense(
                ck.read_f32(names::LM_HEAD)?,
                c.vocab_size,
                c.hidden_size,
                stream_dtype(dtype),
                device,
            )?
        } else {
            Linear::Dense {
                weight: embed.to_dtype(stream_dtype(dtype))?,
            }
        };
        Ok(Llama {
            config: c.clone(),
            device: device.clone(),
            dtype,
            embed,
            blocks,
            norm: vec1(names::FINAL_NORM)?,
            lm_head,
            inv_freq: c.rope_inv_freq(),
        })
    }

    /// Loads a GGUF file written by us or by llama.cpp. Q and K rows are put back into the
    /// Hugging Face order (so the same RoPE code runs), `rope_freqs.weight` divides the
    /// frequencies, quantized weights run through candle's quantized matmul and the token
    /// embedding is dequantized.
    pub fn load_gguf(path: &std::path::Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_gguf_with(path, dtype, device, false)
    }

    /// [`Llama::load_gguf`]; with `dense`, block-quantized weights are dequantized at load and
    /// run as dense matmuls (unquantized activations, as llama.cpp's dequantize-then-GEMM paths
    /// compute), which is much faster on a CPU than candle's quantized dot products.
    pub fn load_gguf_with(
        path: &std::path::Path,
        dtype: DType,
        device: &Device,
        dense: bool,
    ) -> Result<Self> {
        use crate::format::gguf::GgufFile;
        let g = GgufFile::open(path)?;
        let c = gguf_config(&g)?;
        let tensor = |name: &str| {
            g.tensor(name).ok_or_else(|| Error::MissingTensor {
                path: path.to_owned(),
                tensor: name.into(),
                expected: "present".into(),
            })
        };
        let vec1 = |name: &str| -> Result<Tensor> {
            let t = tensor(name)?;
            let v = crate::quant::ggml::dequantize(&t.ty, g.data(t), t.dims[0] as usize)?;
            let n = v.len();
            Ok(Tensor::from_vec(v, n, device)?.to_dtype(stream_dtype(dtype))?)
        };
        let lin = |name: &str, rows: usize, cols: usize, heads: Option<usize>| -> Result<Linear> {
            let t = tensor(name)?;
            let found = (
                t.dims.len(),
                t.dims[0] as usize,
                t.dims.get(1).copied().unwrap_or(1) as usize,
            );
            if found != (2, cols, rows) {
                return Err(Error::TensorMismatch {
                    path: path.to_owned(),
                    tensor: name.into(),
                    expected: format!("dims [{cols}, {rows}]"),
                    found: format!("dims {:?}", t.dims),
                });
            }
            let raw = g.data(t);
            let bytes = match heads {
                Some(h) => {
                    std::borrow::Cow::Owned(crate::gguf_export::unpermute_row_bytes(raw, rows, h))
                }
                None => std::borrow::Cow::Borrowed(raw),
            };
            if dense {
                let v = crate::quant::ggml::dequantize(&t.ty, &bytes, cols)?;
                return Linear::dense(v, rows, cols, dtype, device);
            }
            ggml_linear(&t.ty, bytes, rows, cols, dtype, device)
        };
        let (h, kvh, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let mut blocks = Vec::with_capacity(c.num_hidden_layers);
        for l in 0..c.num_hidden_layers {
            let n = |s: &str| format!("blk.{l}.{s}.weight");
            blocks.push(Block {
                input_norm: vec1(&n("attn_norm"))?,
                post_norm: vec1(&n("ffn_norm"))?,
                q: lin(&n("attn_q"), h * hd, c.hidden_size, Some(h))?,
                k: lin(&n("attn_k"), kvh * hd, c.hidden_size, Some(kvh))?,
                v: lin(&n("attn_v"), kvh * hd, c.hidden_size, None)?,
                o: lin(&n("attn_output"), c.hidden_size, h * hd, None)?,
                gate: lin(&n("ffn_gate"), c.intermediate_size, c.hidden_size, None)?,
                up: lin(&n("ffn_up"), c.intermediate_size, c.hidden_size, None)?,
                down: lin(&n("ffn_down"), c.hidden_size, c.intermediate_size, None)?,
                kv_scales: None,
            });
        }
        let te = tensor("token_embd.weight")?;
        let emb = crate::quant::ggml::dequantize(&te.ty, g.data(te), te.dims[0] as usize)?;
        let embed =
            Tensor::from_vec(emb, (c.vocab_size, c.hidden_size), device)?.to_dtype(dtype)?;
        let head = |name: &str| -> Result<Linear> {
            // A float or dequantized head multiplies in the stream dtype (f32 logits);
            // a block-quantized one runs through the quantized matmul with f32 output.
            let t = tensor(name)?;
            if t.dims.len() != 2
                || t.dims[0] as usize != c.hidden_size
                || t.dims[1] as usize != c.vocab_size
            {
                return Err(Error::TensorMismatch {
                    path: path.to_owned(),
                    tensor: name.into(),
                    expected: format!("dims [{}, {}]", c.hidden_size, c.vocab_size),
                    found: format!("dims {:?}", t.dims),
                });
            }
            if dense || matches!(t.ty.name, "F32" | "F16" | "BF16") {
                let v = crate::quant::ggml::dequantize(&t.ty, g.data(t), c.hidden_size)?;
                return Linear::dense(v, c.vocab_size, c.hidden_size, stream_dtype(dtype), device);
            }
            lin(name, c.vocab_size, c.hidden_size, None)
        };
        let lm_head = if g.tensor("output.weight").is_some() {
            head("output.weight")?
        } else {
            head("token_embd.weight")?
        };
        let mut inv_freq: Vec<f64> = (0..hd / 2)
            .map(|i| 1.0 / c.rope_theta.powf((2 * i) as f64 / hd as f64))
            .collect();
        if g.tensor("rope_freqs.weight").is_some() {
            let f = g.f32_values("rope_freqs.weight")?;
            if f.len() != inv_freq.len() {
                return Err(Error::TensorMismatch {
                    path: path.to_owned(),
                    tensor: "rope_freqs.weight".into(),
                    expected: format!("{} values", inv_freq.len()),
                    found: format!("{} values", f.len()),
                });
            }
            for (v, d) in inv_freq.iter_mut().zip(f) {
                *v /= d as f64;
            }
        }
        Ok(Llama {
            config: c,
            device: device.clone(),
            dtype,
            embed,
            blocks,
            norm: vec1("output_norm.weight")?,
            lm_head,
            inv_freq,
        })
    }

    /// A fresh KV cache for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.blocks.len())
    }

    /// Runs token ids `[b, t]` (positions continue from the cache, if any) and returns f32
    /// logits `[b, t, vocab]`.
    pub fn forward(
        &self,
        ids: &Tensor,
        cache: Option<&mut KvCache>,
        obs: Option<&mut dyn Observer>,
    ) -> Result<Tensor> {
        self.forward_from(ids, cache, obs, 0)
    }

    /// As [`Llama::forward`], but returns logits only for positions `logits_from..t`
    /// (`[b, t - logits_from, vocab]`): perplexity scores the second half of each chunk, and the
    /// head is the largest matmul of a small model.
    pub fn forward_from(
        &self,
        ids: &Tensor,
        mut cache: Option<&mut KvCache>,
        mut obs: Option<&mut dyn Observer>,
        logits_from: usize,
    ) -> Result<Tensor> {
        let c = &self.config;
        let (b, t) = ids.dims2()?;
        let start = cache.as_ref().map_or(0, |k| k.len);
        let sd = stream_dtype(self.dtype);
        let (cos, sin) = rope_tables(&self.inv_freq, start, t, sd, &self.device)?;
        let total = start + t;
        let mask = causal_mask(start, t, sd, &self.device)?;
        let eps = c.rms_norm_eps as f32;
        let ctx = Pass {
            cfg: c,
            cos: &cos,
            sin: &sin,
            mask: mask.as_ref(),
            b,
            t,
            total,
        };

        let mut x = self
            .embed
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, c.hidden_size))?
            .to_dtype(sd)?;
        for (l, blk) in self.blocks.iter().enumerate() {
            x = blk.forward(l, x, &ctx, cache.as_deref_mut(), &mut obs)?;
        }
        if let Some(cache) = cache {
            cache.len = total;
        }
        let x = if logits_from > 0 {
            x.narrow(1, logits_from, t - logits_from)?.contiguous()?
        } else {
            x
        };
        let x = rms_norm(&x, &self.norm, eps)?;
        Ok(self.lm_head.forward(&x)?.to_dtype(DType::F32)?)
    }

    /// Convenience: logits `[t, vocab]` of one sequence, as row-major f32.
    pub fn logits(&self, ids: &[u32]) -> Result<Vec<Vec<f32>>> {
        let t = Tensor::from_slice(ids, (1, ids.len()), &self.device)?;
        let l = self.forward(&t, None, None)?.squeeze(0)?;
        Ok(l.to_vec2()?)
    }

    /// Greedy continuation of `prompt` by `n` tokens using the KV cache.
    pub fn greedy(&self, prompt: &[u32], n: usize) -> Result<Vec<u32>> {
        Ok(self.greedy_timed(prompt, n)?.0)
    }

    /// [`Llama::greedy`] with its prefill (prompt forward and first token) and decode (the
    /// remaining tokens) wall times in seconds, each ended by a device synchronisation.
    pub fn greedy_timed(&self, prompt: &[u32], n: usize) -> Result<(Vec<u32>, f64, f64)> {
        let mut cache = self.new_cache();
        let mut out = Vec::with_capacity(n);
        let t0 = std::time::Instant::now();
        let ids = Tensor::from_slice(prompt, (1, prompt.len()), &self.device)?;
        let mut logits = self.forward(&ids, Some(&mut cache), None)?;
        let mut prefill_s = 0.0;
        let mut t1 = t0;
        for step in 0..n {
            let last = logits.squeeze(0)?.get(logits.dim(1)? - 1)?;
            let next = if self.device.is_cpu() {
                argmax(&last.to_vec1::<f32>()?)
            } else {
                // On a GPU only the index crosses to the host (first maximum, as on the CPU).
                last.argmax(0)?.to_scalar::<u32>()?
            };
            if step == 0 {
                self.device.synchronize()?;
                prefill_s = t0.elapsed().as_secs_f64();
                t1 = std::time::Instant::now();
            }
            out.push(next);
            if out.len() == n {
                break;
            }
            let ids = Tensor::from_slice(&[next], (1, 1), &self.device)?;
            logits = self.forward(&ids, Some(&mut cache), None)?;
        }
        self.device.synchronize()?;
        Ok((out, prefill_s, t1.elapsed().as_secs_f64()))
    }

    /// Number of blocks.
    pub fn layers(&self) -> usize {
        self.blocks.len()
    }
}

/// A GGUF weight `[rows, cols]` of type `ty` as a linear layer: float types dense, block types
/// through candle's quantized matmul.
fn ggml_linear(
    ty: &crate::format::gguf::GgmlType,
    bytes: std::borrow::Cow<'_, [u8]>,
    rows: usize,
    cols: usize,
    dtype: DType,
    device: &Device,
) -> Result<Linear> {
    if matches!(ty.name, "F32" | "F16" | "BF16") {
        let v = crate::quant::ggml::dequantize(ty, &bytes, cols)?;
        return Linear::dense(v, rows, cols, dtype, device);
    }
    use candle_core::quantized::{QMatMul, QStorage, QTensor};
    let dt = crate::quant::ggml::candle_dtype(ty)?;
    let storage = QStorage::from_data(bytes, device, dt)?;
    let q = QTensor::new(storage, (rows, cols))?;
    Ok(Linear::Ggml {
        w: std::sync::Arc::new(QMatMul::from_qtensor(q)?),
    })
}

/// A Llama configuration from a GGUF file's `llama.*` and `tokenizer.*` keys.
fn gguf_config(g: &crate::format::gguf::GgufFile) -> Result<LlamaConfig> {
    use crate::format::gguf::Value;
    let arch = g.get("general.architecture").and_then(Value::as_str);
    if arch != Some("llama") {
        return Err(Error::format(
            &g.path,
            format!("general.architecture is {arch:?}, expected \"llama\""),
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
    let hidden = need("llama.embedding_length")?;
    let heads = need("llama.attention.head_count")?;
    let head_dim = num("llama.attention.key_length")
        .or(num("llama.rope.dimension_count"))
        .map(|v| v as usize)
        .unwrap_or(hidden / heads.max(1));
    let vocab = match num("llama.vocab_size") {
        Some(v) => v as usize,
        None => g
            .tensor("token_embd.weight")
            .and_then(|t| t.dims.get(1).copied())
            .ok_or_else(|| Error::format(&g.path, "no llama.vocab_size and no token_embd.weight"))?
            as usize,
    };
    let eos: Vec<u32> = num("tokenizer.ggml.eos_token_id")
        .map(|v| v as u32)
        .into_iter()
        .collect();
    Ok(LlamaConfig {
        hidden_size: hidden,
        intermediate_size: need("llama.feed_forward_length")?,
        num_hidden_layers: need("llama.block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: num("llama.attention.head_count_kv").map_or(heads, |v| v as usize),
        head_dim,
        vocab_size: vocab,
        rms_norm_eps: float("llama.attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
        rope_theta: float("llama.rope.freq_base").unwrap_or(10000.0),
        rope_scaling: crate::model::config::RopeScaling::None,
        tie_word_embeddings: g.tensor("output.weight").is_none(),
        bos_token_id: num("tokenizer.ggml.bos_token_id").map(|v| v as u32),
        eos_token_ids: eos,
        max_position_embeddings: num("llama.context_length").map_or(2048, |v| v as usize),
        torch_dtype: None,
    })
}

/// cos and sin tables `[t, head_dim/2]` for positions `start..start+t`.
fn rope_tables(
    inv_freq: &[f64],
    start: usize,
    t: usize,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let half = inv_freq.len();
    let mut cos = Vec::with_capacity(t * half);
    let mut sin = Vec::with_capacity(t * half);
    for p in start..start + t {
        for &f in inv_freq {
            let a = p as f64 * f;
            cos.push(a.cos() as f32);
            sin.push(a.sin() as f32);
        }
    }
    let cos = Tensor::from_vec(cos, (t, half), device)?.to_dtype(dtype)?;
    let sin = Tensor::from_vec(sin, (t, half), device)?.to_dtype(dtype)?;
    Ok((cos, sin))
}

/// Additive causal mask `[t, start + t]` for `t > 1` new positions after `start` cached ones.
fn causal_mask(start: usize, t: usize, dtype: DType, device: &Device) -> Result<Option<Tensor>> {
    if t <= 1 {
        return Ok(None);
    }
    let total = start + t;
    let m: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..total).map(move |j| {
                if j > start + i {
                    f32::NEG_INFINITY
                } else {
                    0.0
                }
            })
        })
        .collect();
    Ok(Some(
        Tensor::from_vec(m, (t, total), device)?.to_dtype(dtype)?,
    ))
}

/// Runs the blocks of `ck` over `chunks` (no cache) one block at a time: every chunk's residual
/// stream is kept, each block is loaded, applied to all chunks and dropped, so memory holds
/// one block plus the hidden states instead of the model. `obs` sees exactly what
/// [`Llama::forward`] would show it, site by site in the same chunk order. `on_block` is called
/// after each block.
pub fn observe_streamed(
    ck: &Checkpoint,
    dtype: DType,
    device: &Device,
    chunks: &[Vec<u32>],
    obs: &mut dyn Observer,
    on_block: &dyn Fn(),
) -> Result<()> {
    let c = &ck.config;
    let (bytes, info) = ck.raw(names::EMBED)?;
    let es = info.dtype.size();
    let row = c.hidden_size * es;
    let mut xs = Vec::with_capacity(chunks.len());
    for ch in chunks {
        let mut v = Vec::with_capacity(ch.len() * c.hidden_size);
        for &id in ch {
            let id = id as usize;
            let slice = bytes.get(id * row..(id + 1) * row).ok_or_else(|| {
                Error::Invalid(format!(
                    "token id {id} is outside the embedding table ({} rows)",
                    c.vocab_size
                ))
            })?;
            let r = crate::numerics::convert::to_f32(slice, info.dtype).ok_or_else(|| {
                Error::TensorMismatch {
                    path: ck.dir.clone(),
                    tensor: names::EMBED.into(),
                    expected: "a float dtype".into(),
                    found: info.dtype.to_string(),
                }
            })?;
            v.extend_from_slice(&r);
        }
        let t = Tensor::from_vec(v, (1, ch.len(), c.hidden_size), device)?
            .to_dtype(stream_dtype(dtype))?;
        xs.push(t);
    }
    ck.release(names::EMBED);
    let inv_freq = c.rope_inv_freq();
    let mut tables: std::collections::BTreeMap<usize, (Tensor, Tensor, Option<Tensor>)> =
        Default::default();
    for ch in chunks {
        if let std::collections::btree_map::Entry::Vacant(e) = tables.entry(ch.len()) {
            let (cos, sin) = rope_tables(&inv_freq, 0, ch.len(), stream_dtype(dtype), device)?;
            let mask = causal_mask(0, ch.len(), stream_dtype(dtype), device)?;
            e.insert((cos, sin, mask));
        }
    }
    let mut obs = Some(obs);
    for l in 0..c.num_hidden_layers {
        let blk = Block::load(ck, l, dtype, device, LoadOptions::default())?;
        for x in xs.iter_mut() {
            let t = x.dim(1)?;
            let (cos, sin, mask) = &tables[&t];
            let p = Pass {
                cfg: c,
                cos,
                sin,
                mask: mask.as_ref(),
                b: 1,
                t,
                total: t,
            };
            *x = blk.forward(l, x.clone(), &p, None, &mut obs)?;
        }
        drop(blk);
        ck.release(&names::hf_input_norm(l));
        ck.release(&names::hf_post_norm(l));
        for role in LinearRole::ALL {
            ck.release(&names::hf_linear(l, role));
        }
        on_block();
    }
    Ok(())
}

/// Whether an artifact's config asks for dynamic activation quantization (compressed-tensors
/// `input_activations.dynamic`, or ModelOpt's per-token algorithm).
fn dynamic_activations(cfg: &serde_json::Value) -> bool {
    let Some(q) = cfg.get("quantization_config") else {
        return false;
    };
    if q.get("quant_algo").and_then(|a| a.as_str()) == Some("FP8_PER_CHANNEL_PER_TOKEN") {
        return true;
    }
    q.get("config_groups")
        .and_then(|g| g.as_object())
        .map(|g| {
            g.values().any(|grp| {
                grp.get("input_activations")
                    .and_then(|a| a.get("dynamic"))
                    .and_then(|d| d.as_bool())
                    == Some(true)
            })
        })
        .unwrap_or(false)
}

/// RMSNorm; candle's fused kernel has no f64 path, so f64 (used by tests against an f64
/// reference) takes the composed form.
fn rms_norm(x: &Tensor, w: &Tensor, eps: f32) -> candle_core::Result<Tensor> {
    if x.dtype() == DType::F64 {
        candle_nn::ops::rms_norm_slow(x, w, eps)
    } else {
        candle_nn::ops::rms_norm(x, w, eps)
    }
}

/// Index of the largest value; the first one on ties, as torch.argmax does.
pub fn argmax(v: &[f32]) -> u32 {
    let mut best = 0usize;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best as u32
}
