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
use crate::runtime::Llama;
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

/// Scores one chunk with the candidate and, optionally, the reference.
pub fn score_chunk(
    cand: &Llama,
    reference: Option<&Llama>,
    chunk: &[u32],
    first: usize,
) -> Result<ChunkResult> {
    let rows = |m: &Llama| -> Result<Vec<Vec<f32>>> {
        let ids = Tensor::from_slice(chunk, (1, chunk.len()), &m.device)?;
        let logits = m.forward_from(&ids, None, None, first)?;
        let n = chunk.len() - 1 - first;
        Ok(logits.squeeze(0)?.narrow(0, 0, n)?.to_vec2::<f32>()?)
    };
    let cand_rows = rows(cand)?;
    let ref_rows = reference.map(rows).transpose()?;
    let targets = &chunk[first + 1..];
    let per_pos: Vec<PositionScore> = cand_rows
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
        .collect();
    let mut out = ChunkResult::default();
    for (nll, cmp) in per_pos {
        out.nll.push(nll);
        if let Some((r, k, s)) = cmp {
            out.ref_nll.push(r);
            out.kld.push(k);
            out.same_top1.push(s);
        }
    }
    Ok(out)
}

/// Perplexity with llama-perplexity's uncertainty estimate.
#[derive(Debug, Clone, serde::Serialize)]
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
#[derive(Debug, Clone, serde::Serialize)]
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
