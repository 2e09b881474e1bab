//! Perplexity and reference comparison over llama-perplexity's chunks (formats/verify.md#ppl).
//!
//! The text is tokenized once (BOS first when the tokenizer adds one), cut into non-overlapping
//! `ctx`-token chunks, the first token of each chunk is replaced by BOS when the tokenizer adds
//! BOS, and only the second half of each chunk is scored: the logits at positions
//! `ctx/2 .. ctx-1` predict tokens `ctx/2+1 .. ctx`, i.e. `ctx/2 - 1` tokens per chunk.

use candle_core::Tensor;
use rayon::prelude::*;

pub use crate::calib::dataset::ChunkPlan;
use crate::error::Result;
use crate::runtime::{Llama, LoadOptions, Source, Streamed};
use crate::verify::stats::{argmax_f64, kl_divergence, log_softmax, mean_stderr, quantile};

/// Per-position results of one chunk.
#[derive(Debug, Default, Clone)]
pub struct ChunkResult {
    /// Candidate's negative log-likelihood of each scored token.
    pub nll: Vec<f64>,
    /// Reference's NLL of the same tokens (empty without a reference).
    pub ref_nll: Vec<f64>,
    /// KL(reference ‖ candidate) per scored position.
    pub kld: Vec<f64>,
    /// Whether both models' top token agree, per scored position.
    pub same_top1: Vec<bool>,
}

/// Candidate NLL and, with a reference, (reference NLL, KLD, same top-1) of one position.
type PositionScore = (f64, Option<(f64, f64, bool)>);

impl ChunkResult {
    /// Collects per-position scores into the per-chunk vectors.
    fn from_positions(per_pos: Vec<PositionScore>) -> Self {
        let mut r = ChunkResult::default();
        for (nll, cmp) in per_pos {
            r.nll.push(nll);
            if let Some((rn, k, s)) = cmp {
                r.ref_nll.push(rn);
                r.kld.push(k);
                r.same_top1.push(s);
            }
        }
        r
    }
}

/// Where the per-position statistics (log-softmax, NLL, KLD, top-1) are computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatsOn {
    /// Logits copied to the host and reduced in f64 (exact; the CPU default).
    Host,
    /// Reduced in f32 on the model's device, only per-position results copied back: on a GPU
    /// the `[positions, vocab]` logits never cross the bus.
    Device,
}

impl StatsOn {
    /// Host statistics on the CPU, device statistics elsewhere.
    pub fn for_device(d: &candle_core::Device) -> Self {
        if d.is_cpu() {
            StatsOn::Host
        } else {
            StatsOn::Device
        }
    }
}

/// Scores one chunk with the candidate and, optionally, the reference.
pub fn score_chunk(
    cand: &Llama,
    reference: Option<&Llama>,
    chunk: &[u32],
    first: usize,
) -> Result<ChunkResult> {
    let mut r = score_batch(cand, reference, &[chunk], first, StatsOn::Host)?;
    Ok(r.pop().unwrap_or_default())
}

/// Scores equally long chunks in one batched forward per model (`[chunks, ctx]` token ids).
pub fn score_batch(
    cand: &Llama,
    reference: Option<&Llama>,
    chunks: &[&[u32]],
    first: usize,
    on: StatsOn,
) -> Result<Vec<ChunkResult>> {
    let Some(len) = chunks.first().map(|c| c.len()) else {
        return Ok(Vec::new());
    };
    if chunks.iter().any(|c| c.len() != len) || len < first + 2 {
        return Err(crate::error::Error::Invalid(format!(
            "perplexity chunks must share one length above {} tokens",
            first + 1
        )));
    }
    let n = len - 1 - first;
    let flat: Vec<u32> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
    // Logits `[b, n, vocab]` of the scored positions.
    let logits = |m: &Llama| -> Result<Tensor> {
        let ids = Tensor::from_vec(flat.clone(), (chunks.len(), len), &m.device)?;
        Ok(m.forward_from(&ids, None, None, first)?.narrow(1, 0, n)?)
    };
    let cand_l = logits(cand)?;
    let ref_l = reference.map(logits).transpose()?;
    let mut out = Vec::with_capacity(chunks.len());
    for (i, chunk) in chunks.iter().enumerate() {
        let targets = &chunk[first + 1..];
        let q = cand_l.get(i)?.contiguous()?;
        let p = ref_l.as_ref().map(|r| r.get(i)?.contiguous()).transpose()?;
        let per_pos = match on {
            StatsOn::Host => host_stats(&q, p.as_ref(), targets)?,
            StatsOn::Device => device_stats(&q, p.as_ref(), targets)?,
        };
        out.push(ChunkResult::from_positions(per_pos));
    }
    Ok(out)
}

/// How [`score_streamed`] runs.
#[derive(Debug, Clone, Copy)]
pub struct StreamPlan {
    /// Matmul dtype.
    pub dtype: candle_core::DType,
    /// Chunks per batched forward.
    pub batch: usize,
    /// Chunks whose hidden states are held at once (the weights are streamed once per pass).
    pub pass_chunks: usize,
    pub on: StatsOn,
}

/// Scores `chunks` (all `first + 2` or more tokens long) with the candidate and, optionally, the
/// reference, streaming both models block by block in lockstep (see [`Streamed`]): memory holds
/// one block of each model, the hidden states of one pass of chunks, and at the end both heads.
/// Results equal [`score_batch`]'s on a whole model with the same weights and dtype.
#[allow(clippy::too_many_arguments)]
pub fn score_streamed(
    cand: &dyn Source,
    cand_opts: LoadOptions,
    reference: Option<&dyn Source>,
    device: &candle_core::Device,
    chunks: &[Vec<u32>],
    first: usize,
    plan: StreamPlan,
    on_progress: &dyn Fn(u64),
) -> Result<Vec<ChunkResult>> {
    let Some(len) = chunks.first().map(|c| c.len()) else {
        return Ok(Vec::new());
    };
    if chunks.iter().any(|c| c.len() != len) || len < first + 2 {
        return Err(crate::error::Error::Invalid(format!(
            "perplexity chunks must share one length above {} tokens",
            first + 1
        )));
    }
    let n = len - 1 - first;
    let mut out = Vec::with_capacity(chunks.len());
    for pass in chunks.chunks(plan.pass_chunks.max(1)) {
        let refs: Vec<&[u32]> = pass.iter().map(Vec::as_slice).collect();
        let mut c = Streamed::new(cand, plan.dtype, device, cand_opts, &refs, plan.batch)?;
        let mut r = reference
            .map(|m| {
                Streamed::new(
                    m,
                    plan.dtype,
                    device,
                    LoadOptions::default(),
                    &refs,
                    plan.batch,
                )
            })
            .transpose()?;
        while !c.done() {
            c.step_counted(None, on_progress)?;
            if let Some(r) = r.as_mut() {
                r.step_counted(None, on_progress)?;
            }
        }
        c.keep_from(first)?;
        if let Some(r) = r.as_mut() {
            r.keep_from(first)?;
        }
        let ch = c.head()?;
        let rh = r.as_ref().map(|r| r.head()).transpose()?;
        let mut k = 0;
        for gi in 0..c.groups.len() {
            for j in 0..c.groups[gi].dim(0)? {
                let targets = &pass[k][first + 1..];
                k += 1;
                let q = c.logits(&ch, gi, j)?.narrow(0, 0, n)?.contiguous()?;
                let p = match (&r, &rh) {
                    (Some(r), Some(h)) => Some(r.logits(h, gi, j)?.narrow(0, 0, n)?.contiguous()?),
                    _ => None,
                };
                let per_pos = match plan.on {
                    StatsOn::Host => host_stats(&q, p.as_ref(), targets)?,
                    StatsOn::Device => device_stats(&q, p.as_ref(), targets)?,
                };
                out.push(ChunkResult::from_positions(per_pos));
            }
        }
    }
    Ok(out)
}

/// f64 statistics of `[n, vocab]` logits on the host.
fn host_stats(q: &Tensor, p: Option<&Tensor>, targets: &[u32]) -> Result<Vec<PositionScore>> {
    let cand_rows = q.to_vec2::<f32>()?;
    let ref_rows = p.map(|p| p.to_vec2::<f32>()).transpose()?;
    Ok(cand_rows
        .par_iter()
        .enumerate()
        .map(|(i, row)| {
            let lq = log_softmax(row);
            let nll = -lq[targets[i] as usize];
            let cmp = ref_rows.as_ref().map(|r| {
                let lp = log_softmax(&r[i]);
                (
                    -lp[targets[i] as usize],
                    kl_divergence(&lp, &lq),
                    argmax_f64(&lp) == argmax_f64(&lq),
                )
            });
            (nll, cmp)
        })
        .collect())
}

/// f32 statistics of `[n, vocab]` logits on their device; only `n`-long vectors come back.
fn device_stats(q: &Tensor, p: Option<&Tensor>, targets: &[u32]) -> Result<Vec<PositionScore>> {
    use candle_core::D;
    let idx = Tensor::from_slice(targets, (targets.len(), 1), q.device())?;
    let lq = candle_nn::ops::log_softmax(q, D::Minus1)?;
    let nll: Vec<f32> = lq.gather(&idx, 1)?.neg()?.flatten_all()?.to_vec1()?;
    let cmp = match p {
        Some(p) => {
            let lp = candle_nn::ops::log_softmax(p, D::Minus1)?;
            let ref_nll: Vec<f32> = lp.gather(&idx, 1)?.neg()?.flatten_all()?.to_vec1()?;
            let kld: Vec<f32> = (lp.exp()? * (&lp - &lq)?)?.sum(D::Minus1)?.to_vec1()?;
            let top_p: Vec<u32> = p.argmax(D::Minus1)?.to_vec1()?;
            let top_q: Vec<u32> = q.argmax(D::Minus1)?.to_vec1()?;
            Some((ref_nll, kld, top_p, top_q))
        }
        None => None,
    };
    Ok(nll
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let c = cmp
                .as_ref()
                .map(|(rn, k, tp, tq)| (rn[i] as f64, k[i] as f64, tp[i] == tq[i]));
            (v as f64, c)
        })
        .collect())
}

/// Perplexity with llama-perplexity's uncertainty estimate.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Perplexity {
    pub ppl: f64,
    /// Standard error of the perplexity (first-order propagation of the NLL's standard error).
    pub stderr: f64,
    pub mean_nll: f64,
    pub tokens: usize,
}

impl Perplexity {
    pub fn from_nll(nll: &[f64]) -> Self {
        let (mean, se) = mean_stderr(nll);
        let ppl = mean.exp();
        Perplexity {
            ppl,
            stderr: ppl * se,
            mean_nll: mean,
            tokens: nll.len(),
        }
    }
}

/// KL-divergence and top-1 agreement summary.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Divergence {
    pub mean_kld: f64,
    pub mean_kld_stderr: f64,
    pub median_kld: f64,
    pub p99_kld: f64,
    pub max_kld: f64,
    pub top1_agreement_pct: f64,
    pub top1_agreement_stderr_pct: f64,
    pub positions: usize,
}

impl Divergence {
    pub fn from_results(kld: &[f64], same: &[bool]) -> Self {
        let (mean, se) = mean_stderr(kld);
        let n = same.len() as f64;
        let p = same.iter().filter(|&&s| s).count() as f64 / n;
        Divergence {
            mean_kld: mean,
            mean_kld_stderr: se,
            median_kld: quantile(kld, 0.5),
            p99_kld: quantile(kld, 0.99),
            max_kld: kld.iter().copied().fold(0.0, f64::max),
            top1_agreement_pct: 100.0 * p,
            top1_agreement_stderr_pct: 100.0 * (p * (1.0 - p) / (n - 1.0).max(1.0)).sqrt(),
            positions: same.len(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perplexity_of_uniform_guessing_is_the_vocab_size() {
        let nll = vec![(50f64).ln(); 10];
        let p = Perplexity::from_nll(&nll);
        assert!((p.ppl - 50.0).abs() < 1e-9);
        assert!(p.stderr < 1e-12);
    }
}
