//! How much each tensor's quantization moves the model's output distribution, measured with the
//! runner (formats/auto-mix.md#sensitivity).
//!
//! One block-streamed pass over the choice chunks:
//!
//! 1. The bf16 model runs every choice chunk (its linear inputs give the importance matrix).
//! 2. For each block `l`, a second stream starts from the reference's hidden states at `l` and
//!    runs block `l` with all seven linear layers quantized to a probe type, then the bf16
//!    blocks after it; a stream for the embedding starts at the bottom. At the top, each
//!    stream's KL-divergence against the bf16 logits (llama-perplexity's scored positions) is
//!    what quantizing that block (or the embedding) costs. The head's cost is measured on the
//!    bf16 hidden states with the head quantized.
//! 3. A block's cost is shared among its seven layers in proportion to how far each alone,
//!    quantized, moves the block's output (seven single-block runs on the same inputs): block
//!    `l` reaches the rest of the model only through its output.
//! 4. Every candidate type's importance-weighted squared error is computed on a sample of each
//!    tensor's rows; a tensor's predicted cost at type `T` is its measured cost at the probe
//!    times `error(T) / error(probe)`.
//!
//! Costs add across tensors: the prediction for a mix is the sum of its tensors' predictions.
//! Memory: one block (bf16 and its quantized copy), the reference's hidden states of the choice
//! chunks, one hidden state per started stream on the probe chunks, one chunk's logits.

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::calib::hessian::BlockHessians;
use crate::calib::imatrix::{Imatrix, ImatrixEntry};
use crate::error::{Error, Result};
use crate::format::gguf::GgmlType;
use crate::model::names::{self, InputSite, LinearRole};
use crate::model::Checkpoint;
use crate::quant::ggml::{dequantize, quantize_with, KSearch};
use crate::runtime::block::{Block, Observer};
use crate::runtime::linear::{Linear, WeightData};
use crate::runtime::load::safetensors::SafetensorsSource;
use crate::runtime::{LoadOptions, Streamed};

/// The types a tensor may get, smallest first; those whose block divides the row apply.
pub const CANDIDATES: [GgmlType; 11] = [
    GgmlType::Q2_K,
    GgmlType::Q3_K,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q4_K,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
    GgmlType::Q5_K,
    GgmlType::Q6_K,
    GgmlType::Q8_0,
    GgmlType::BF16,
];

/// The candidate types for rows of `ne0` values.
pub fn candidates(ne0: usize) -> Vec<GgmlType> {
    CANDIDATES
        .into_iter()
        .filter(|t| ne0.is_multiple_of(t.block_size()))
        .collect()
}

/// The type a tensor is measured at: Q3_K where rows allow k-quants, Q4_0 otherwise (both
/// coarse enough to be measured well above the runner's rounding, fine enough to stay where
/// costs add).
pub fn probe_type(ne0: usize) -> GgmlType {
    if ne0.is_multiple_of(GgmlType::Q3_K.block_size()) {
        GgmlType::Q3_K
    } else {
        GgmlType::Q4_0
    }
}

/// What the quantizer is given as importance for type `ty` (what the GGUF writer gives it).
fn quantizer_importance(ty: GgmlType, imp: Option<&[f32]>) -> Option<&[f32]> {
    match ty {
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::Q8_0 => None,
        _ => imp,
    }
}

/// One candidate type of one tensor.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Candidate {
    #[serde(serialize_with = "ser_type")]
    pub ty: GgmlType,
    pub bytes: u64,
    /// Importance-weighted squared error relative to the probe type's.
    pub rel_error: f64,
    /// Predicted contribution to the model's mean KL-divergence.
    pub kld: f64,
}

fn ser_type<S: serde::Serializer>(t: &GgmlType, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&t.name().to_ascii_lowercase())
}

/// What was measured for one GGUF tensor.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TensorSense {
    /// GGUF name.
    pub name: String,
    /// Dims, innermost first.
    pub dims: Vec<u64>,
    #[serde(serialize_with = "ser_type")]
    pub probe: GgmlType,
    /// Its share of the measured KL-divergence with it at the probe type.
    pub kld_at_probe: f64,
    pub candidates: Vec<Candidate>,
}

/// The measurement.
#[derive(Debug, Clone)]
pub struct Measured {
    pub tensors: Vec<TensorSense>,
    /// Made from the choice chunks; the GGUF is quantized with it.
    pub imatrix: Imatrix,
    /// Measured KL-divergence with block `l` at the probe types.
    pub block_kld: Vec<f64>,
    pub embed_kld: f64,
    pub head_kld: f64,
    /// Scored positions the KL-divergences average over.
    pub positions: usize,
    pub wall_s: f64,
}

/// How the measurement runs.
#[derive(Debug, Clone)]
pub struct ProbeOptions<'a> {
    /// The choice chunks, all equally long: the importance matrix is made from all of them.
    pub chunks: &'a [Vec<u32>],
    /// The first `probe` chunks are where KL-divergences are measured.
    pub probe: usize,
    /// First scored position of a chunk (llama-perplexity scores the second half).
    pub first: usize,
    /// Rows of each tensor quantized for the error tables (evenly spaced).
    pub sample_rows: usize,
    pub search: KSearch,
}

/// Σx² and rows per block and input site, as the importance matrix wants them.
struct SiteSums {
    sums: Vec<Vec<Vec<f64>>>,
    rows: Vec<Vec<u64>>,
}

impl SiteSums {
    fn new(c: &crate::model::LlamaConfig) -> Self {
        SiteSums {
            sums: (0..c.num_hidden_layers)
                .map(|_| {
                    InputSite::ALL
                        .iter()
                        .map(|s| vec![0.0; s.width(c)])
                        .collect()
                })
                .collect(),
            rows: vec![vec![0; InputSite::ALL.len()]; c.num_hidden_layers],
        }
    }

    /// Block `l`'s entries into `m`.
    fn add_to(&self, l: usize, m: &mut Imatrix) {
        for role in LinearRole::ALL {
            let i = role.site().index();
            m.entries.insert(
                names::gguf_linear(l, role),
                ImatrixEntry {
                    sum_sq: self.sums[l][i].iter().map(|&v| v as f32).collect(),
                    count: self.rows[l][i] as f32,
                },
            );
        }
    }
}

impl Observer for SiteSums {
    fn linear_input(&mut self, layer: usize, site: InputSite, x: &[f32]) -> Result<()> {
        let s = &mut self.sums[layer][site.index()];
        let w = s.len();
        for row in x.chunks_exact(w) {
            for (a, &v) in s.iter_mut().zip(row) {
                *a += (v as f64) * (v as f64);
            }
        }
        self.rows[layer][site.index()] += (x.len() / w) as u64;
        Ok(())
    }
}

/// The importance sums and, when asked for, the block's full second moments.
struct Both<'a> {
    sums: &'a mut SiteSums,
    moments: Option<&'a mut BlockHessians>,
}

impl Observer for Both<'_> {
    fn linear_input(&mut self, layer: usize, site: InputSite, x: &[f32]) -> Result<()> {
        self.sums.linear_input(layer, site, x)?;
        match self.moments.as_mut() {
            Some(h) => h.add(site, x),
            None => Ok(()),
        }
    }
}

fn empty_imatrix(chunks: &[Vec<u32>]) -> Imatrix {
    Imatrix {
        entries: Default::default(),
        datasets: vec![],
        chunk_count: chunks.len() as u32,
        chunk_size: chunks.first().map_or(0, Vec::len) as u32,
    }
}

/// The importance matrix of every block linear layer over `chunks`, in one streamed pass.
pub fn imatrix_of(ck: &Checkpoint, chunks: &[Vec<u32>], device: &Device) -> Result<Imatrix> {
    let mut sums = SiteSums::new(&ck.config);
    crate::runtime::observe_streamed(
        ck,
        crate::calib::pass_dtype(device),
        device,
        chunks,
        &mut sums,
        &|_| (),
    )?;
    let mut m = empty_imatrix(chunks);
    for l in 0..ck.config.num_hidden_layers {
        sums.add_to(l, &mut m);
    }
    Ok(m)
}

/// Rows `idx` of a 2-D checkpoint tensor, widened to f32.
pub(crate) fn rows_f32(ck: &Checkpoint, name: &str, idx: &[usize]) -> Result<Vec<f32>> {
    let (raw, info) = ck.raw(name)?;
    let cols = info.shape.last().copied().unwrap_or(1);
    let w = info.dtype.size() * cols;
    let mut out = Vec::with_capacity(idx.len() * cols);
    for &r in idx {
        let v = crate::numerics::convert::to_f32(&raw[r * w..(r + 1) * w], info.dtype).ok_or_else(
            || Error::TensorMismatch {
                path: ck.dir.clone(),
                tensor: name.into(),
                expected: "a float dtype".into(),
                found: info.dtype.to_string(),
            },
        )?;
        out.extend(v);
    }
    Ok(out)
}

/// Evenly spaced row indices, at most `n` of `rows`.
pub(crate) fn sample(rows: usize, n: usize) -> Vec<usize> {
    let stride = rows.div_ceil(n.max(1)).max(1);
    (0..rows).step_by(stride).collect()
}

/// Squared error per candidate, weighted by `weight` per column, of rows `x` (`ne0` wide)
/// quantized as the writer would (`imp` the quantizer's importance).
/// Rows `x` stored as `ty` (quantized with importance `imp` where the type takes one) and
/// read back.
pub(crate) fn round_trip(
    x: &[f32],
    ne0: usize,
    imp: Option<&[f32]>,
    ty: GgmlType,
    search: KSearch,
) -> Result<Vec<f32>> {
    let q = quantize_with(&ty, x, ne0, quantizer_importance(ty, imp), search)?;
    dequantize(&ty, &q, ne0)
}

pub(crate) fn errors(
    x: &[f32],
    ne0: usize,
    weight: Option<&[f32]>,
    imp: Option<&[f32]>,
    types: &[GgmlType],
    search: KSearch,
) -> Result<Vec<f64>> {
    types
        .iter()
        .map(|ty| {
            let q = quantize_with(ty, x, ne0, quantizer_importance(*ty, imp), search)?;
            let d = dequantize(ty, &q, ne0)?;
            // Rows in parallel, summed in order (a parallel sum's grouping varies by run).
            Ok(x.par_chunks(ne0)
                .zip(d.par_chunks(ne0))
                .map(|(a, b)| {
                    a.iter()
                        .zip(b)
                        .enumerate()
                        .map(|(j, (&u, &v))| {
                            let e = (u - v) as f64;
                            weight.map_or(1.0, |w| w[j] as f64) * e * e
                        })
                        .sum::<f64>()
                })
                .collect::<Vec<f64>>()
                .iter()
                .sum())
        })
        .collect()
}

/// A tensor's candidates with their bytes and error ratios (costs filled in later).
fn table(
    name: String,
    dims: Vec<u64>,
    rows: usize,
    errs: &[f64],
    types: &[GgmlType],
    probe: GgmlType,
) -> TensorSense {
    let ne0 = dims[0] as usize;
    let p = types
        .iter()
        .position(|&t| t == probe)
        .expect("probe is a candidate");
    let base = errs[p].max(f64::MIN_POSITIVE);
    TensorSense {
        name,
        dims,
        probe,
        kld_at_probe: 0.0,
        candidates: types
            .iter()
            .zip(errs)
            .map(|(&ty, &e)| Candidate {
                ty,
                bytes: ty.nbytes(ne0, rows).unwrap_or(usize::MAX) as u64,
                rel_error: e / base,
                kld: 0.0,
            })
            .collect(),
    }
}

/// Mean KL(p ‖ q) over rows of two `[n, vocab]` f32 logit tensors.
pub(crate) fn mean_kld(p: &Tensor, q: &Tensor) -> Result<f64> {
    use crate::verify::stats::{kl_divergence, log_softmax};
    let pr = p.to_vec2::<f32>()?;
    let qr = q.to_vec2::<f32>()?;
    // Rows in parallel, summed in order.
    let s: f64 = pr
        .par_iter()
        .zip(qr.par_iter())
        .map(|(a, b)| kl_divergence(&log_softmax(a), &log_softmax(b)))
        .collect::<Vec<f64>>()
        .iter()
        .sum();
    Ok(s / pr.len().max(1) as f64)
}

/// Block `blk` with some linear layers replaced.
fn with_linears(blk: &Block, q: &[Linear], only: Option<LinearRole>) -> Block {
    let pick = |r: LinearRole, own: &Linear| -> Linear {
        match only {
            Some(o) if o != r => own.clone(),
            _ => q[LinearRole::ALL.iter().position(|&x| x == r).expect("role")].clone(),
        }
    };
    Block {
        input_norm: blk.input_norm.clone(),
        post_norm: blk.post_norm.clone(),
        q: pick(LinearRole::Q, &blk.q),
        k: pick(LinearRole::K, &blk.k),
        v: pick(LinearRole::V, &blk.v),
        o: pick(LinearRole::O, &blk.o),
        gate: pick(LinearRole::Gate, &blk.gate),
        up: pick(LinearRole::Up, &blk.up),
        down: pick(LinearRole::Down, &blk.down),
        kv_scales: blk.kv_scales,
    }
}

/// Mean squared difference of two equally shaped tensors.
fn msd(a: &Tensor, b: &Tensor) -> Result<f64> {
    let d = (a - b)?.to_dtype(DType::F32)?;
    Ok(d.sqr()?.mean_all()?.to_scalar::<f32>()? as f64)
}

/// `[rows, vocab]` logits of `h` (`[rows, hidden]` f32, rounded to bf16 as the runner's
/// matmul inputs are) through head rows quantized to `ty` and dequantized, a slice of the
/// vocabulary at a time.
fn quantized_head_logits(
    ck: &Checkpoint,
    head: &str,
    h: &Tensor,
    ty: GgmlType,
    device: &Device,
) -> Result<Tensor> {
    let (_, info) = ck.raw(head)?;
    let (vocab, hidden) = (info.shape[0], info.shape[1]);
    let h = h.to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
    let slice = (1 << 24) / hidden;
    let mut parts = Vec::new();
    for start in (0..vocab).step_by(slice) {
        let idx: Vec<usize> = (start..(start + slice).min(vocab)).collect();
        let w = rows_f32(ck, head, &idx)?;
        let row = info.dtype.size() * hidden;
        ck.release_range(head, start * row..(start + idx.len()) * row);
        let q = quantize_with(&ty, &w, hidden, None, KSearch::Reference)?;
        let d = dequantize(&ty, &q, hidden)?;
        let wt = Tensor::from_vec(d, (idx.len(), hidden), device)?;
        parts.push(h.matmul(&wt.t()?)?);
    }
    Ok(Tensor::cat(&parts, 1)?)
}

/// Runs the measurement (see the module docs). `progress(done, total)` counts blocks.
pub fn measure(
    ck: &Checkpoint,
    o: &ProbeOptions<'_>,
    device: &Device,
    progress: &dyn Fn(u64, u64),
) -> Result<Measured> {
    measure_with(ck, o, device, progress, None)
}

/// What [`measure_with`] hands each block's second moments to: the block index, the
/// reference's `Σ x xᵀ` of the choice chunks at each input site, and the importance matrix
/// with that block's entries already in it.
pub type MomentsHook<'h> = &'h mut dyn FnMut(usize, &mut BlockHessians, &Imatrix) -> Result<()>;

/// [`measure`], also collecting each block's full second moments `E[x xᵀ]` during the
/// reference pass and handing them to `moments` before the next block starts (one block's
/// matrices are held at a time).
pub fn measure_with(
    ck: &Checkpoint,
    o: &ProbeOptions<'_>,
    device: &Device,
    progress: &dyn Fn(u64, u64),
    mut moments: Option<MomentsHook<'_>>,
) -> Result<Measured> {
    let t0 = std::time::Instant::now();
    let c = &ck.config;
    let layers = c.num_hidden_layers;
    let t = o.chunks.first().map_or(0, Vec::len);
    if o.probe == 0 || o.probe > o.chunks.len() || t < o.first + 2 {
        return Err(Error::Invalid(format!(
            "the sensitivity pass needs {} chunks longer than {} tokens, has {} of {t}",
            o.probe.max(1),
            o.first + 1,
            o.chunks.len()
        )));
    }
    let src = SafetensorsSource::borrowed(ck);
    let dtype = crate::calib::pass_dtype(device);
    let refs: Vec<&[u32]> = o.chunks.iter().map(Vec::as_slice).collect();
    // Groups of `probe` chunks: group 0 is the probe chunks.
    let mut reference = Streamed::new(&src, dtype, device, LoadOptions::default(), &refs, o.probe)?;
    let mut imatrix = empty_imatrix(o.chunks);
    let mut sums = SiteSums::new(c);
    let mut tensors: Vec<TensorSense> = Vec::new();

    // The embedding stream: probe chunks embedded through quantized rows.
    let hidden = c.hidden_size;
    let tied = !ck.index.contains_key(names::LM_HEAD);
    let vocab = ck
        .info(names::EMBED)
        .map(|(_, i)| i.shape[0])
        .ok_or_else(|| Error::MissingTensor {
            path: ck.dir.clone(),
            tensor: names::EMBED.into(),
            expected: "present".into(),
        })?;
    let eprobe = probe_type(hidden);
    let mut streams: Vec<Streamed> = Vec::new();
    {
        let toks: Vec<u32> = o.chunks[..o.probe].concat();
        let mut uniq = toks.clone();
        uniq.sort_unstable();
        uniq.dedup();
        let idx: Vec<usize> = uniq.iter().map(|&u| u as usize).collect();
        if idx.last().is_some_and(|&m| m >= vocab) {
            return Err(Error::Invalid(format!(
                "token id {} is outside the embedding's {vocab} rows",
                idx.last().copied().unwrap_or(0)
            )));
        }
        let w = rows_f32(ck, names::EMBED, &idx)?;
        let q = quantize_with(&eprobe, &w, hidden, None, o.search)?;
        let d = dequantize(&eprobe, &q, hidden)?;
        let mut x = Vec::with_capacity(toks.len() * hidden);
        for tok in &toks {
            let r = uniq.binary_search(tok).expect("present");
            x.extend_from_slice(&d[r * hidden..(r + 1) * hidden]);
        }
        let mut s = reference.fork(0)?;
        s.groups[0] = Tensor::from_vec(x, (o.probe, t, hidden), device)?
            .to_dtype(reference.groups[0].dtype())?;
        streams.push(s);
    }
    let mut block_kld = vec![0.0; layers];
    // Per block: the seven layers' output-change shares.
    let mut shares: Vec<[f64; 7]> = Vec::with_capacity(layers);
    for l in 0..layers {
        let base = reference.fork(0)?;
        let blk = reference.next_stored()?;
        let mut hs = moments.as_ref().map(|_| BlockHessians::new(c, l));
        reference.run(
            &blk,
            Some(&mut Both {
                sums: &mut sums,
                moments: hs.as_mut(),
            }),
            true,
            &|_| (),
        )?;
        let y = reference.groups[0].clone();
        sums.add_to(l, &mut imatrix);
        if let (Some(f), Some(h)) = (moments.as_mut(), hs.as_mut()) {
            f(l, h, &imatrix)?;
        }
        drop(hs);
        for s in streams.iter_mut() {
            s.run(&blk, None, true, &|_| ())?;
        }
        // Each layer at its probe type, and its error table.
        let mut q = Vec::with_capacity(7);
        for role in LinearRole::ALL {
            let hf = names::hf_linear(l, role);
            let gg = names::gguf_linear(l, role);
            let [rows, cols] = role.shape(c);
            let w = ck.read_f32(&hf)?;
            let imp = imatrix.entries[&gg].mean();
            let types = candidates(cols);
            let probe = probe_type(cols);
            let idx = sample(rows, o.sample_rows);
            let xs: Vec<f32> = idx
                .iter()
                .flat_map(|&r| w[r * cols..(r + 1) * cols].iter().copied())
                .collect();
            let errs = errors(&xs, cols, Some(&imp), Some(&imp), &types, o.search)?;
            tensors.push(table(
                gg,
                vec![cols as u64, rows as u64],
                rows,
                &errs,
                &types,
                probe,
            ));
            let qb = quantize_with(
                &probe,
                &w,
                cols,
                quantizer_importance(probe, Some(&imp)),
                o.search,
            )?;
            let d = dequantize(&probe, &qb, cols)?;
            drop(w);
            q.push(Linear::build(
                WeightData::F32(d),
                rows,
                cols,
                dtype,
                device,
            )?);
            ck.release(&hf);
        }
        // How far each layer alone moves the block's output.
        let mut d = [0.0; 7];
        for (i, role) in LinearRole::ALL.into_iter().enumerate() {
            let mut f = base.fork(0)?;
            f.run(&with_linears(&blk, &q, Some(role)), None, true, &|_| ())?;
            d[i] = msd(&f.groups[0], &y)?;
        }
        shares.push(d);
        let mut s = base;
        s.run(&with_linears(&blk, &q, None), None, true, &|_| ())?;
        streams.push(s);
        progress(l as u64 + 1, layers as u64);
    }

    // The top: head-input second moments over every choice chunk, then the KL-divergences.
    let (norm, head) = reference.head()?;
    let eps = c.rms_norm_eps as f32;
    let mut head_m = vec![0.0f64; hidden];
    let mut head_rows = 0u64;
    for g in &reference.groups {
        let (b, tt, _) = g.dims3()?;
        let x = candle_nn::ops::rms_norm(&g.reshape((b * tt, hidden))?, &norm, eps)?;
        for row in x.to_dtype(DType::F32)?.to_vec2::<f32>()? {
            for (a, v) in head_m.iter_mut().zip(row) {
                *a += (v as f64) * (v as f64);
            }
        }
        head_rows += (b * tt) as u64;
    }
    let head_w: Vec<f32> = head_m
        .iter()
        .map(|&v| (v / head_rows as f64) as f32)
        .collect();
    let n = t - 1 - o.first;
    // Only the scored positions go through the head.
    reference.keep_from(o.first)?;
    for s in streams.iter_mut() {
        s.keep_from(o.first)?;
    }
    let mut kld = vec![0.0; streams.len() + 1];
    let head_name = if tied { names::EMBED } else { names::LM_HEAD };
    let hprobe = probe_type(hidden);
    for j in 0..o.probe {
        let p = reference
            .logits(&(norm.clone(), head.clone()), 0, j)?
            .narrow(0, 0, n)?;
        for (k, s) in streams.iter().enumerate() {
            let qv = s
                .logits(&(norm.clone(), head.clone()), 0, j)?
                .narrow(0, 0, n)?;
            kld[k] += mean_kld(&p, &qv)? / o.probe as f64;
        }
        // The head alone quantized, on the reference's hidden states.
        let x = reference.groups[0].get(j)?.narrow(0, 0, n)?;
        let xn = candle_nn::ops::rms_norm(&x, &norm, eps)?.to_dtype(DType::F32)?;
        let qv = quantized_head_logits(ck, head_name, &xn, hprobe, device)?;
        kld[streams.len()] += mean_kld(&p, &qv)? / o.probe as f64;
    }
    let embed_kld = kld[0];
    let head_kld = kld[streams.len()];
    for l in 0..layers {
        block_kld[l] = kld[l + 1];
        let total: f64 = shares[l].iter().sum::<f64>().max(f64::MIN_POSITIVE);
        for (i, ts) in tensors[7 * l..7 * l + 7].iter_mut().enumerate() {
            ts.kld_at_probe = block_kld[l] * shares[l][i] / total;
        }
    }

    // Embedding and head tables (rows sampled evenly; the head's error weighted by its inputs'
    // second moments, the embedding's unweighted: unseen tokens count as much as seen ones).
    let idx = sample(vocab, o.sample_rows);
    let types = candidates(hidden);
    let xs = rows_f32(ck, names::EMBED, &idx)?;
    let e_err = errors(&xs, hidden, None, None, &types, o.search)?;
    let mut embed = table(
        names::GGUF_EMBED.into(),
        vec![hidden as u64, vocab as u64],
        vocab,
        &e_err,
        &types,
        eprobe,
    );
    embed.kld_at_probe = embed_kld;
    let hx = if tied {
        xs
    } else {
        rows_f32(ck, names::LM_HEAD, &idx)?
    };
    let h_err = errors(&hx, hidden, Some(&head_w), None, &types, o.search)?;
    let mut headt = table(
        if tied {
            names::GGUF_EMBED.into()
        } else {
            names::GGUF_OUTPUT.into()
        },
        vec![hidden as u64, vocab as u64],
        vocab,
        &h_err,
        &types,
        hprobe,
    );
    headt.kld_at_probe = head_kld;
    let mut out = Vec::with_capacity(tensors.len() + 2);
    for ts in tensors.iter_mut() {
        fill(ts);
    }
    fill(&mut embed);
    fill(&mut headt);
    if tied {
        // One tensor, two roles: their predicted costs add.
        for (a, b) in embed.candidates.iter_mut().zip(&headt.candidates) {
            a.kld += b.kld;
        }
        embed.kld_at_probe += headt.kld_at_probe;
        let base = embed.kld_at_probe.max(f64::MIN_POSITIVE);
        for a in embed.candidates.iter_mut() {
            a.rel_error = a.kld / base;
        }
        out.push(embed);
    } else {
        out.push(embed);
        out.push(headt);
    }
    out.extend(tensors);
    Ok(Measured {
        tensors: out,
        imatrix,
        block_kld,
        embed_kld,
        head_kld,
        positions: o.probe * n,
        wall_s: t0.elapsed().as_secs_f64(),
    })
}

/// Predicted costs from the measured one and the error ratios.
fn fill(ts: &mut TensorSense) {
    for cand in ts.candidates.iter_mut() {
        cand.kld = ts.kld_at_probe * cand.rel_error;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numerics::rng::SplitMix64;

    /// The error tables and the KL-divergence mean are sums over rows computed in parallel:
    /// their bits must not depend on the thread count or on how the work was split.
    #[test]
    fn row_sums_do_not_depend_on_the_threads() {
        let mut r = SplitMix64::new(3);
        let mut v = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|_| (r.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
                .collect()
        };
        let (rows, ne0, vocab) = (300, 256, 512);
        let x = v(rows * ne0);
        let imp: Vec<f32> = v(ne0).iter().map(|a| a.abs() + 0.1).collect();
        let (p, q) = (v(rows * vocab), v(rows * vocab));
        let types = [GgmlType::Q4_K, GgmlType::Q8_0];
        let run = |t: usize| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(t)
                .build()
                .unwrap()
                .install(|| {
                    let e = errors(&x, ne0, Some(&imp), Some(&imp), &types, KSearch::Reference)
                        .unwrap();
                    let pt = Tensor::from_slice(&p, (rows, vocab), &Device::Cpu).unwrap();
                    let qt = Tensor::from_slice(&q, (rows, vocab), &Device::Cpu).unwrap();
                    let k = mean_kld(&pt, &qt).unwrap();
                    (
                        e.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                        k.to_bits(),
                    )
                })
        };
        let one = run(1);
        for t in [2, 3, 5, 8, 2, 3] {
            assert_eq!(run(t), one, "{t} threads");
        }
    }
}
