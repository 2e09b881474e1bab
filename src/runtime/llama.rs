//! Llama-3.x forward pass (formats/hf-llama.md#forward).
//!
//! Matches transformers' `LlamaForCausalLM`: RMSNorm, RoPE in the `rotate_half` convention (the
//! two halves of each head are the rotated pairs) with llama3 frequency scaling, grouped-query
//! attention with a causal mask, SwiGLU MLP, tied or untied head. Returns logits for every
//! position, which perplexity and KL-divergence need.

use candle_core::{DType, Device, Tensor};

use crate::error::Result;
use crate::model::names::InputSite;
use crate::model::{Checkpoint, LlamaConfig};
use crate::runtime::block::Block;
use crate::runtime::linear::{fp8_static, Linear};
use crate::runtime::load::{safetensors::SafetensorsSource, Source};
pub use crate::runtime::load::{stream_dtype, LoadOptions};

pub use crate::runtime::block::Observer;

/// f32 host values of `x`, for an [`Observer`].
fn host(x: &Tensor) -> Result<Vec<f32>> {
    Ok(x.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
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
    /// Packed rows' positions, segments and the tables made from them.
    packing: Option<&'a PackedTables>,
}

/// Several token sequences packed into one row (llama.cpp's sequence ids in a batch): sequences
/// that share a prefix hold it once. Each token has a RoPE position and a segment `(group,
/// branch)`; a token sees an earlier token of its own group when that token is on its branch
/// or on branch 0, the group's shared prefix. Groups never see each other.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Packing {
    pub pos: Vec<u32>,
    pub seg: Vec<(u32, u32)>,
}

impl Packing {
    /// Whether a token of segment `me` sees an earlier token of segment `other`.
    #[inline(always)]
    pub fn sees(me: (u32, u32), other: (u32, u32)) -> bool {
        me.0 == other.0 && (other.1 == 0 || other.1 == me.1)
    }
}

/// One group of packed rows as a block pass wants them: positions and segments flattened over
/// its rows, and (for the tensor path) per-row RoPE tables and an additive mask.
#[derive(Debug, Clone)]
pub struct PackedTables {
    pos: Vec<u32>,
    seg: Vec<(u32, u32)>,
    cos: Tensor,
    sin: Tensor,
    mask: Tensor,
}

impl PackedTables {
    /// Tables for rows `rows` (each `t` long) from the plain `[t, half]` RoPE tables.
    fn new(rows: &[&Packing], t: usize, cos: &Tensor, sin: &Tensor) -> Result<Self> {
        let b = rows.len();
        let pos: Vec<u32> = rows.iter().flat_map(|p| p.pos.iter().copied()).collect();
        let seg: Vec<(u32, u32)> = rows.iter().flat_map(|p| p.seg.iter().copied()).collect();
        if pos.len() != b * t || seg.len() != b * t || pos.iter().any(|&p| p as usize >= t) {
            return Err(crate::error::Error::Internal(format!(
                "packed rows of {t} tokens with {} positions, {} segments",
                pos.len(),
                seg.len()
            )));
        }
        let idx = Tensor::from_slice(&pos, b * t, cos.device())?;
        let half = cos.dim(1)?;
        let cos3 = cos.index_select(&idx, 0)?.reshape((b, t, half))?;
        let sin3 = sin.index_select(&idx, 0)?.reshape((b, t, half))?;
        let mut m = vec![0f32; b * t * t];
        for r in 0..b {
            let sg = &seg[r * t..(r + 1) * t];
            for i in 0..t {
                for j in 0..t {
                    if j > i || !Packing::sees(sg[i], sg[j]) {
                        m[(r * t + i) * t + j] = f32::NEG_INFINITY;
                    }
                }
            }
        }
        let mask = Tensor::from_vec(m, (b, 1, t, t), cos.device())?.to_dtype(cos.dtype())?;
        Ok(PackedTables {
            pos,
            seg,
            cos: cos3,
            sin: sin3,
            mask,
        })
    }
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
        if cache.is_none()
            && x.device().is_cpu()
            && x.dtype() == DType::F32
            && crate::runtime::cpu::eligible(self, obs.is_some())
        {
            // The fused CPU block: the same operations without tensors between them, and
            // attention that skips the keys a packed row's segments hide.
            let mut xv: Vec<f32> = x.flatten_all()?.to_vec1()?;
            let cos: Vec<f32> = p.cos.flatten_all()?.to_vec1()?;
            let sin: Vec<f32> = p.sin.flatten_all()?.to_vec1()?;
            let packing = p.packing.map(|k| (k.pos.as_slice(), k.seg.as_slice()));
            crate::runtime::cpu::block_forward(
                self, l, c, &mut xv, b, t, &cos, &sin, packing, obs,
            )?;
            return Ok(Tensor::from_vec(xv, (b, t, c.hidden_size), x.device())?);
        }
        let eps = c.rms_norm_eps as f32;
        let (h, kvh, hd) = (c.num_attention_heads, c.num_key_value_heads, c.head_dim);
        let scale = 1.0 / (hd as f64).sqrt();
        let (cos, sin) = match p.packing {
            Some(k) => (&k.cos, &k.sin),
            None => (p.cos, p.sin),
        };
        let mut x = x;
        let xn = rms_norm(&x, &self.input_norm, eps)?;
        if let Some(o) = obs.as_deref_mut() {
            o.linear_input(l, InputSite::AttnIn, &host(&xn)?)?;
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
            o.kv(l, &host(&k)?, &host(&v)?)?;
        }
        // An FP8 KV cache stores K and V as E4M3 with static scales; attention reads them back.
        let (k, v) = match self.kv_scales {
            Some((ks, vs)) => (fp8_static(&k, ks)?, fp8_static(&v, vs)?),
            None => (k, v),
        };
        let (k, v) = match cache {
            // Written in place into the block's preallocated cache (grown by its capacity when
            // full); attention reads the filled prefix.
            Some(cache) => cache.blocks[l].append(&k.contiguous()?, &v.contiguous()?)?,
            None => (k, v),
        };
        // Grouped-query attention: query heads g*i .. g*(i+1) share KV head i. Folding the
        // group into the query rows lets one batched matmul serve the whole group.
        let g = h / kvh;
        let q = q.reshape((b, kvh, g * t, hd))?;
        let att = (q.matmul(&k.t()?)? * scale)?.reshape((b, h, t, total))?;
        let att = match (p.packing, p.mask) {
            (Some(k), _) => att.broadcast_add(&k.mask)?,
            (None, Some(m)) => att.broadcast_add(m)?,
            (None, None) => att,
        };
        let att = candle_nn::ops::softmax_last_dim(&att)?;
        let y = att.reshape((b, kvh, g * t, total))?.matmul(&v)?;
        let y = y
            .reshape((b, h, t, hd))?
            .transpose(1, 2)?
            .reshape((b, t, h * hd))?;
        if let Some(o) = obs.as_deref_mut() {
            o.linear_input(l, InputSite::AttnOut, &host(&y)?)?;
        }
        x = (x + self.o.forward(&y)?.to_dtype(sd)?)?;

        let xn = rms_norm(&x, &self.post_norm, eps)?;
        if let Some(o) = obs.as_deref_mut() {
            o.linear_input(l, InputSite::MlpIn, &host(&xn)?)?;
        }
        let gu = Linear::forward_shared(&[&self.gate, &self.up], &xn)?;
        let (g_, u_) = (gu[0].to_dtype(sd)?, gu[1].to_dtype(sd)?);
        let act = (candle_nn::ops::silu(&g_)? * u_)?;
        if let Some(o) = obs.as_deref_mut() {
            o.linear_input(l, InputSite::MlpAct, &host(&act)?)?;
        }
        x = (x + self.down.forward(&act)?.to_dtype(sd)?)?;
        Ok(x)
    }
}

/// One greedy generation ([`Llama::greedy_timed`]).
pub struct Greedy {
    pub tokens: Vec<u32>,
    /// Per step, the top logit minus the runner-up (CPU runs only).
    pub margins: Option<Vec<f32>>,
    pub prefill_s: f64,
    pub decode_s: f64,
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

/// Keys and values of the positions seen so far, per block, in buffers allocated once for
/// `capacity` positions.
pub struct KvCache {
    blocks: Vec<candle_nn::kv_cache::KvCache>,
    /// Number of positions already in the cache.
    pub len: usize,
}

impl KvCache {
    pub fn new(layers: usize) -> Self {
        Self::with_capacity(layers, 512)
    }

    /// A cache for `capacity` positions before it has to grow.
    pub fn with_capacity(layers: usize, capacity: usize) -> Self {
        KvCache {
            blocks: (0..layers)
                .map(|_| candle_nn::kv_cache::KvCache::new(2, capacity.max(1)))
                .collect(),
            len: 0,
        }
    }
}

impl Llama {
    /// Loads every block of `src` (weights in their stored precision for `dtype`, see
    /// [`Linear::build`]).
    pub fn from_source(
        src: &dyn Source,
        dtype: DType,
        device: &Device,
        opts: LoadOptions,
    ) -> Result<Self> {
        let c = src.config();
        let blocks = (0..c.num_hidden_layers)
            .map(|l| src.block(l, dtype, device, opts))
            .collect::<Result<Vec<_>>>()?;
        let (norm, lm_head) = src.head(dtype, device, opts)?;
        Ok(Llama {
            config: c.clone(),
            device: device.clone(),
            dtype,
            embed: src.embedding(dtype, device)?,
            blocks,
            norm,
            lm_head,
            inv_freq: src.inv_freq()?,
        })
    }

    /// Loads a bf16/f16/f32 checkpoint, widening weights to `dtype` on `device`.
    pub fn load(ck: &Checkpoint, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_with(ck, dtype, device, LoadOptions::default())
    }

    /// Loads any checkpoint we read (bf16 or an FP8 / INT8 artifact) with `opts`.
    pub fn load_with(
        ck: &Checkpoint,
        dtype: DType,
        device: &Device,
        opts: LoadOptions,
    ) -> Result<Self> {
        Self::from_source(&SafetensorsSource::borrowed(ck), dtype, device, opts)
    }

    /// Loads a GGUF file written by us or by llama.cpp (see `runtime::load::gguf`).
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
        let src = crate::runtime::load::gguf::GgufSource::open(path)?;
        let opts = LoadOptions {
            weight_only: false,
            gguf_dense: dense,
            ..Default::default()
        };
        Self::from_source(&src, dtype, device, opts)
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
            packing: None,
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
        Ok(self.greedy_timed(prompt, n)?.tokens)
    }

    /// [`Llama::greedy`] with its prefill (prompt forward and first token) and decode (the
    /// remaining tokens) wall times in seconds, each ended by a device synchronisation, and on
    /// a CPU each step's margin (top logit minus the runner-up): a greedy path that another
    /// runner leaves at a step with a margin within its logit error left at a near-tie.
    pub fn greedy_timed(&self, prompt: &[u32], n: usize) -> Result<Greedy> {
        let mut cache = KvCache::with_capacity(self.blocks.len(), prompt.len() + n);
        let mut out = Vec::with_capacity(n);
        let mut margins = self.device.is_cpu().then(|| Vec::with_capacity(n));
        let t0 = std::time::Instant::now();
        let ids = Tensor::from_slice(prompt, (1, prompt.len()), &self.device)?;
        let mut logits = self.forward(&ids, Some(&mut cache), None)?;
        let mut prefill_s = 0.0;
        let mut t1 = t0;
        for step in 0..n {
            let last = logits.squeeze(0)?.get(logits.dim(1)? - 1)?;
            let next = if let Some(m) = margins.as_mut() {
                let v = last.to_vec1::<f32>()?;
                let i = argmax(&v);
                let second = v
                    .iter()
                    .enumerate()
                    .filter(|&(j, _)| j != i as usize)
                    .fold(f32::NEG_INFINITY, |a, (_, &x)| a.max(x));
                m.push(v[i as usize] - second);
                i
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
        Ok(Greedy {
            tokens: out,
            margins,
            prefill_s,
            decode_s: t1.elapsed().as_secs_f64(),
        })
    }

    /// Number of blocks.
    pub fn layers(&self) -> usize {
        self.blocks.len()
    }
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

/// Chunks run through a model block by block: every chunk's residual stream is kept, each
/// block is loaded from its [`Source`], applied to all chunks and dropped, so memory holds one
/// block plus the hidden states instead of the model. Chunks of equal length are run in groups
/// (one batched forward per group), which is what makes the matmuls large.
pub struct Streamed<'a> {
    src: &'a dyn Source,
    dtype: DType,
    device: Device,
    opts: LoadOptions,
    /// Residual streams `[g, t, hidden]`, one per group, in chunk order (empty when they
    /// are spilled).
    pub groups: Vec<Tensor>,
    /// The residual streams, when they are kept in a file instead.
    spill: Option<crate::runtime::spill::SpillFile>,
    /// (cos, sin, mask) per chunk length.
    tables: std::collections::BTreeMap<usize, (Tensor, Tensor, Option<Tensor>)>,
    /// Per group, its packed rows' tables ([`Streamed::packed`]); empty for plain chunks.
    packed: Vec<Option<std::sync::Arc<PackedTables>>>,
    next_block: usize,
}

impl<'a> Streamed<'a> {
    /// Embeds `chunks`, grouping runs of equally long chunks by up to `batch`.
    pub fn new(
        src: &'a dyn Source,
        dtype: DType,
        device: &Device,
        opts: LoadOptions,
        chunks: &[&[u32]],
        batch: usize,
    ) -> Result<Self> {
        Self::with_spill(src, dtype, device, opts, chunks, batch, None)
    }

    /// [`Streamed::new`], keeping the residual streams in a temporary file under `spill.dir`
    /// instead of memory when they would take more than `spill.budget_bytes`.
    pub fn with_spill(
        src: &'a dyn Source,
        dtype: DType,
        device: &Device,
        opts: LoadOptions,
        chunks: &[&[u32]],
        batch: usize,
        spill: Option<&crate::runtime::spill::SpillSpec>,
    ) -> Result<Self> {
        let c = src.config();
        let sd = stream_dtype(dtype);
        let inv_freq = src.inv_freq()?;
        // The groups: runs of equally long chunks, up to `batch` each.
        let mut spans = Vec::new();
        let mut i = 0;
        while i < chunks.len() {
            let t = chunks[i].len();
            let mut j = i + 1;
            while j < chunks.len() && j - i < batch.max(1) && chunks[j].len() == t {
                j += 1;
            }
            spans.push((i, j, t));
            i = j;
        }
        let dims: Vec<[usize; 3]> = spans
            .iter()
            .map(|&(i, j, t)| [j - i, t, c.hidden_size])
            .collect();
        let bytes: u64 = dims
            .iter()
            .map(|d| (d[0] * d[1] * d[2] * sd.size_in_bytes()) as u64)
            .sum();
        let spill = match spill {
            Some(sp) if bytes > sp.budget_bytes => {
                Some(crate::runtime::spill::SpillFile::create(&sp.dir, dims)?)
            }
            _ => None,
        };
        let mut groups = Vec::new();
        let mut tables: std::collections::BTreeMap<usize, (Tensor, Tensor, Option<Tensor>)> =
            Default::default();
        for (gi, &(i, j, t)) in spans.iter().enumerate() {
            let ids: Vec<u32> = chunks[i..j]
                .iter()
                .flat_map(|c| c.iter().copied())
                .collect();
            let v = src.embed_rows(&ids)?;
            let g = Tensor::from_vec(v, (j - i, t, c.hidden_size), device)?.to_dtype(sd)?;
            match &spill {
                Some(f) => f.write_current(gi, &g)?,
                None => groups.push(g),
            }
            if let std::collections::btree_map::Entry::Vacant(e) = tables.entry(t) {
                let (cos, sin) = rope_tables(&inv_freq, 0, t, sd, device)?;
                e.insert((cos, sin, causal_mask(0, t, sd, device)?));
            }
        }
        src.release_head();
        Ok(Streamed {
            src,
            dtype,
            device: device.clone(),
            opts,
            groups,
            spill,
            tables,
            packed: Vec::new(),
            next_block: 0,
        })
    }

    /// Packed rows ([`Packing`]): `rows[i]` holds the tokens `packings[i]` describes. Runs of
    /// equally long rows are grouped by up to `batch`, as [`Streamed::new`] groups chunks.
    pub fn packed(
        src: &'a dyn Source,
        dtype: DType,
        device: &Device,
        opts: LoadOptions,
        rows: &[&[u32]],
        packings: &[Packing],
        batch: usize,
    ) -> Result<Self> {
        if rows.len() != packings.len() {
            return Err(crate::error::Error::Internal(format!(
                "{} packed rows with {} layouts",
                rows.len(),
                packings.len()
            )));
        }
        let mut s = Self::with_spill(src, dtype, device, opts, rows, batch, None)?;
        let mut r0 = 0;
        for g in &s.groups {
            let (b, t, _) = g.dims3()?;
            let (cos, sin, _) = &s.tables[&t];
            let ps: Vec<&Packing> = packings[r0..r0 + b].iter().collect();
            s.packed.push(Some(std::sync::Arc::new(PackedTables::new(
                &ps, t, cos, sin,
            )?)));
            r0 += b;
        }
        Ok(s)
    }

    /// A copy of group `g`'s residual stream alone, at the same block (streams held in
    /// memory only): a second stream that runs on from here with other blocks.
    pub fn fork(&self, g: usize) -> Result<Self> {
        if self.spill.is_some() {
            return Err(crate::error::Error::Internal(
                "fork of spilled streams".into(),
            ));
        }
        let x = self
            .groups
            .get(g)
            .cloned()
            .ok_or_else(|| crate::error::Error::Internal(format!("no group {g} to fork")))?;
        Ok(Streamed {
            src: self.src,
            dtype: self.dtype,
            device: self.device.clone(),
            opts: self.opts,
            groups: vec![x],
            spill: None,
            tables: self.tables.clone(),
            packed: self.packed.get(g).cloned().into_iter().collect(),
            next_block: self.next_block,
        })
    }

    /// Whether every block has run.
    pub fn done(&self) -> bool {
        self.next_block >= self.src.config().num_hidden_layers
    }

    /// Loads the next block, applies it to every group (`obs` sees each group's sites in
    /// order) and drops it.
    pub fn step(&mut self, obs: Option<&mut dyn Observer>) -> Result<()> {
        self.step_counted(obs, &|_| ())
    }

    /// [`Streamed::step`], calling `on_tokens(n)` after each group of `n` tokens has run.
    pub fn step_counted(
        &mut self,
        obs: Option<&mut dyn Observer>,
        on_tokens: &dyn Fn(u64),
    ) -> Result<()> {
        let blk = self.next_stored()?;
        self.run(&blk, obs, true, on_tokens)
    }

    /// The next block as the source stores it (its mapped pages released once loaded).
    pub fn next_stored(&self) -> Result<Block> {
        let l = self.next_block;
        let blk = self.src.block(l, self.dtype, &self.device, self.opts)?;
        // The block owns what it runs on (packed panels or tensors): the mapped pages can go.
        self.src.release_block(l);
        Ok(blk)
    }

    /// Index of the next block to run.
    pub fn next_index(&self) -> usize {
        self.next_block
    }

    /// The matmul dtype and device blocks run with.
    pub fn dtype_device(&self) -> (DType, &Device) {
        (self.dtype, &self.device)
    }

    /// Runs `blk` as the next block over every group (`obs` sees each group's sites in order).
    /// With `commit` its outputs replace the residual streams and the next block comes up;
    /// without, the outputs are dropped (an observation-only pass) and the same block index
    /// runs again next.
    pub fn run(
        &mut self,
        blk: &Block,
        obs: Option<&mut dyn Observer>,
        commit: bool,
        on_tokens: &dyn Fn(u64),
    ) -> Result<()> {
        let l = self.next_block;
        let c = self.src.config();
        let mut obs = obs;
        // Each group from memory, or read back from the spill file (its output goes to the
        // file's other copy, which becomes current at the end).
        for i in 0..self.group_count() {
            let x = self.group(i)?;
            let (b, t, _) = x.dims3()?;
            let (cos, sin, mask) = &self.tables[&t];
            let p = Pass {
                cfg: c,
                cos,
                sin,
                mask: mask.as_ref(),
                b,
                t,
                total: t,
                packing: self.packed.get(i).and_then(Option::as_deref),
            };
            let y = blk.forward(l, x, &p, None, &mut obs)?;
            if commit {
                match &self.spill {
                    Some(f) => f.write_next(i, &y)?,
                    None => self.groups[i] = y,
                }
            }
            on_tokens((b * t) as u64);
        }
        if commit {
            if let Some(f) = self.spill.as_mut() {
                f.flip();
            }
        }
        if commit {
            self.next_block += 1;
        }
        Ok(())
    }

    /// Writes the residual streams to `dest` (f32 safetensors, one tensor per group, written
    /// group by group), for [`Streamed::restore`].
    pub fn save(&self, dest: &std::path::Path) -> Result<()> {
        use crate::format::safetensors::{write_streamed, PlannedTensor};
        let plan: Vec<PlannedTensor> = (0..self.group_count())
            .map(|i| PlannedTensor {
                name: format!("group.{i}"),
                dtype: crate::model::Dtype::F32,
                shape: self.group_dims(i).to_vec(),
            })
            .collect();
        write_streamed(dest, &plan, &mut |i| {
            let v = self
                .group(i)?
                .flatten_all()?
                .to_dtype(DType::F32)?
                .to_vec1::<f32>()?;
            Ok(v.iter().flat_map(|x| x.to_le_bytes()).collect())
        })
    }

    /// Replaces the residual streams with those [`Streamed::save`] wrote for the same chunks
    /// (exactly: the streams are f32 or narrower), block `next` coming up next.
    pub fn restore(&mut self, path: &std::path::Path, next: usize) -> Result<()> {
        let f = crate::format::safetensors::SafetensorsFile::open(path)?;
        let n = self.group_count();
        if f.tensors.len() != n {
            return Err(crate::error::Error::format(
                path,
                format!(
                    "{} saved groups, the calibration chunks make {n}",
                    f.tensors.len()
                ),
            ));
        }
        let mut restored = Vec::with_capacity(self.groups.len());
        for i in 0..n {
            let dims = self.group_dims(i);
            let name = format!("group.{i}");
            let info = f
                .tensors
                .get(&name)
                .ok_or_else(|| crate::error::Error::MissingTensor {
                    path: path.to_owned(),
                    tensor: name.clone(),
                    expected: format!("f32 {dims:?}"),
                })?;
            if info.dtype != crate::model::Dtype::F32 || info.shape != dims {
                return Err(crate::error::Error::TensorMismatch {
                    path: path.to_owned(),
                    tensor: name,
                    expected: format!("f32 {dims:?}"),
                    found: format!("{} {:?}", info.dtype, info.shape),
                });
            }
            let raw = f.bytes(&name).expect("indexed");
            let t = Tensor::from_raw_buffer(raw, DType::F32, &dims, &self.device)?
                .to_dtype(stream_dtype(self.dtype))?;
            match &self.spill {
                Some(sp) => sp.write_current(i, &t)?,
                None => restored.push(t),
            }
        }
        self.groups = restored;
        self.next_block = next;
        Ok(())
    }

    /// Number of groups.
    fn group_count(&self) -> usize {
        self.spill.as_ref().map_or(self.groups.len(), |f| f.len())
    }

    /// `[g, t, hidden]` of group `i`.
    fn group_dims(&self, i: usize) -> [usize; 3] {
        match &self.spill {
            Some(f) => f.dims(i),
            None => {
                let d = self.groups[i].dims();
                [d[0], d[1], d[2]]
            }
        }
    }

    /// Group `i`'s residual stream (read back when spilled).
    fn group(&self, i: usize) -> Result<Tensor> {
        match &self.spill {
            Some(f) => f.read(i, stream_dtype(self.dtype), &self.device),
            None => Ok(self.groups[i].clone()),
        }
    }

    /// Bytes of residual streams kept in a file instead of memory (0 when held).
    pub fn spilled_bytes(&self) -> u64 {
        self.spill.as_ref().map_or(0, |f| f.bytes())
    }

    /// Bytes the residual streams hold.
    pub fn state_bytes(&self) -> u64 {
        self.groups
            .iter()
            .map(|g| (g.elem_count() * g.dtype().size_in_bytes()) as u64)
            .sum()
    }

    /// Keeps positions `from..` of every group (what the head will read).
    pub fn keep_from(&mut self, from: usize) -> Result<()> {
        if self.spill.is_some() {
            return Err(crate::error::Error::Internal(
                "keep_from on spilled streams".into(),
            ));
        }
        for x in self.groups.iter_mut() {
            let t = x.dim(1)?;
            *x = x.narrow(1, from, t - from)?.contiguous()?;
        }
        Ok(())
    }

    /// The final norm and head, for [`Streamed::logits`].
    pub fn head(&self) -> Result<(Tensor, Linear)> {
        self.src.head(self.dtype, &self.device, self.opts)
    }

    /// f32 logits `[rows.len(), vocab]` of positions `rows` of chunk `j` of group `i` through
    /// `head` (from [`Streamed::head`]).
    pub fn logits_at(
        &self,
        head: &(Tensor, Linear),
        i: usize,
        j: usize,
        rows: &[u32],
    ) -> Result<Tensor> {
        let eps = self.src.config().rms_norm_eps as f32;
        let x = self.groups[i].get(j)?;
        let idx = Tensor::from_slice(rows, rows.len(), x.device())?;
        let x = x.index_select(&idx, 0)?;
        let x = rms_norm(&x, &head.0, eps)?;
        Ok(head.1.forward(&x)?.to_dtype(DType::F32)?)
    }

    /// f32 logits `[t, vocab]` of chunk `j` of group `i` through `head` (from
    /// [`Streamed::head`]); one chunk at a time, since a large vocabulary's logits dwarf the
    /// hidden states.
    pub fn logits(&self, head: &(Tensor, Linear), i: usize, j: usize) -> Result<Tensor> {
        let eps = self.src.config().rms_norm_eps as f32;
        let x = self.groups[i].get(j)?;
        let x = rms_norm(&x, &head.0, eps)?;
        Ok(head.1.forward(&x)?.to_dtype(DType::F32)?)
    }
}

/// Runs the blocks of `ck` over `chunks` (no cache) one block at a time (see [`Streamed`]):
/// `obs` sees, site by site, the rows [`Llama::forward`] would show it, chunks in order.
/// Equally long chunks run together, up to [`OBSERVE_ROWS`] rows per forward, which is what
/// keeps the GEMMs large. `on_tokens(n)` is called as each batch of `n` tokens leaves a block.
pub fn observe_streamed(
    ck: &Checkpoint,
    dtype: DType,
    device: &Device,
    chunks: &[Vec<u32>],
    obs: &mut dyn Observer,
    on_tokens: &dyn Fn(u64),
) -> Result<()> {
    let src = SafetensorsSource::borrowed(ck);
    let refs: Vec<&[u32]> = chunks.iter().map(Vec::as_slice).collect();
    let t = chunks.iter().map(Vec::len).max().unwrap_or(1).max(1);
    let batch = (OBSERVE_ROWS / t).max(1);
    let mut s = Streamed::new(&src, dtype, device, LoadOptions::default(), &refs, batch)?;
    while !s.done() {
        s.step_counted(Some(&mut *obs), on_tokens)?;
    }
    Ok(())
}

/// Rows (tokens) per batched forward of [`observe_streamed`]: large enough for the GEMM to
/// run near its peak, small enough that a 14336-wide MLP's activations stay near 0.25 GB.
pub const OBSERVE_ROWS: usize = 2048;

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
