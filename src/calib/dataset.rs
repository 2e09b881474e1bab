//! Calibration and evaluation text → token chunks (formats/calibration.md#data).

use std::path::Path;

use crate::error::{Error, Result};
use crate::model::Tokenizer;
use crate::numerics::rng::SplitMix64;

/// How the text is cut.
#[derive(Debug, Clone, Copy)]
pub struct ChunkPlan {
    pub ctx: usize,
    /// Upper bound on chunks (`None`: every full chunk of the text).
    pub max_chunks: Option<usize>,
    /// BOS id to put first in each chunk, when the tokenizer adds BOS.
    pub bos: Option<u32>,
}

impl ChunkPlan {
    /// First position whose logits are scored.
    pub fn first_scored(&self) -> usize {
        self.ctx / 2
    }

    /// Cuts `tokens` into chunks.
    pub fn chunks(&self, tokens: &[u32]) -> Result<Vec<Vec<u32>>> {
        if self.ctx < 4 {
            return Err(Error::Invalid(format!(
                "--ctx must be at least 4, found {}",
                self.ctx
            )));
        }
        let available = tokens.len() / self.ctx;
        let n = self.max_chunks.map_or(available, |m| m.min(available));
        if n == 0 {
            return Err(Error::Invalid(format!(
                "the text has {} tokens, fewer than one chunk of --ctx {}",
                tokens.len(),
                self.ctx
            )));
        }
        Ok((0..n)
            .map(|i| {
                let mut c = tokens[i * self.ctx..(i + 1) * self.ctx].to_vec();
                if let Some(b) = self.bos {
                    c[0] = b;
                }
                c
            })
            .collect())
    }
}

/// Tokens per window of a [`fingerprint`].
pub const FINGERPRINT_WINDOW: usize = 16;

/// FNV-1a of one window of token ids.
fn window_hash(w: &[u32]) -> u64 {
    w.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &t| {
        t.to_le_bytes()
            .iter()
            .fold(h, |h, &b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
    })
}

/// The sampled windows of `chunks`: the hash of every window of [`FINGERPRINT_WINDOW`] tokens
/// (after each chunk's first token, which may be a BOS put in its place), kept when it is 0
/// mod 16. The choice depends on the tokens alone, not on where chunks start, so two cuts of
/// the same text share their samples wherever their windows coincide. High 32 bits, in order.
fn sampled(chunks: &[Vec<u32>]) -> Vec<u32> {
    chunks
        .iter()
        .flat_map(|c| {
            c.get(1..)
                .unwrap_or(&[])
                .windows(FINGERPRINT_WINDOW)
                .map(window_hash)
                .filter(|h| h % 16 == 0)
                .map(|h| (h >> 32) as u32)
        })
        .collect()
}

/// Content fingerprint of calibration chunks (about one value per 16 tokens, sorted, without
/// repeats), stored in artifact manifests.
pub fn fingerprint(chunks: &[Vec<u32>]) -> Vec<u32> {
    let mut v = sampled(chunks);
    v.sort_unstable();
    v.dedup();
    v
}

/// Of `chunks`' sampled windows, how many there are and how many appear in `fingerprint`.
pub fn shared_windows(chunks: &[Vec<u32>], fingerprint: &[u32]) -> (usize, usize) {
    let s = sampled(chunks);
    let shared = s
        .iter()
        .filter(|h| fingerprint.binary_search(h).is_ok())
        .count();
    (s.len(), shared)
}

/// Where calibration text comes from.
#[derive(Debug, Clone)]
pub struct CalibSource {
    /// A label for reports: the file path, or `built-in`.
    pub label: String,
    pub text: String,
    /// sha256 of the bytes the text was read from.
    pub sha256: String,
}

/// Reads calibration text: plain text, or JSONL (a `.jsonl` name, or a first non-blank character
/// `{`) with a string field `text` on every non-blank line, the samples joined by blank lines.
/// `None` gives the built-in corpus.
pub fn load_source(path: Option<&Path>) -> Result<CalibSource> {
    use sha2::{Digest, Sha256};
    let Some(path) = path else {
        let text = crate::calib::CALIB_CORPUS.to_owned();
        return Ok(CalibSource {
            label: "built-in".into(),
            sha256: crate::numerics::hex(&Sha256::digest(text.as_bytes())),
            text,
        });
    };
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let sha256 = crate::numerics::hex(&Sha256::digest(&bytes));
    let raw = crate::format::text::decode(path, bytes)?;
    let is_jsonl =
        path.extension().is_some_and(|e| e == "jsonl") || raw.trim_start().starts_with('{');
    let text = if is_jsonl {
        let mut parts = Vec::new();
        for (i, line) in raw.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v: serde_json::Value = serde_json::from_str(line).map_err(|e| {
                Error::format(path, format!("line {}: not a JSON object: {e}", i + 1))
            })?;
            let t = v.get("text").and_then(|t| t.as_str()).ok_or_else(|| {
                Error::format(
                    path,
                    format!(
                        "line {}: no string field `text` (JSONL calibration needs one per line)",
                        i + 1
                    ),
                )
            })?;
            parts.push(t.to_owned());
        }
        parts.join("\n\n")
    } else {
        raw
    };
    if text.trim().is_empty() {
        return Err(Error::format(path, "calibration text is empty"));
    }
    Ok(CalibSource {
        label: path.display().to_string(),
        text,
        sha256,
    })
}

/// How calibration chunks are chosen.
#[derive(Debug, Clone, Copy)]
pub struct CalibSpec {
    pub samples: usize,
    pub seq_len: usize,
    /// Seeded random choice among all chunks instead of the first `samples` consecutive ones.
    pub shuffle: Option<u64>,
}

/// Tokenizes `src` once and cuts it into chunks the way llama-imatrix does: consecutive
/// `seq_len`-token chunks from the start (BOS first when the tokenizer adds BOS). With a shuffle
/// seed, `samples` chunks are drawn without replacement from all of them.
pub fn calibration_chunks(
    tok: &Tokenizer,
    src: &CalibSource,
    spec: &CalibSpec,
) -> Result<Vec<Vec<u32>>> {
    if spec.samples == 0 {
        return Err(Error::Invalid("--calib-samples must be at least 1".into()));
    }
    let tokens = tok.encode(&src.text, true)?;
    if tokens.len() < spec.seq_len {
        return Err(Error::Invalid(format!(
            "calibration text {} has {} tokens, fewer than one chunk of --calib-seq {}",
            src.label,
            tokens.len(),
            spec.seq_len
        )));
    }
    let plan = ChunkPlan {
        ctx: spec.seq_len,
        max_chunks: if spec.shuffle.is_some() {
            None
        } else {
            Some(spec.samples)
        },
        bos: if tok.adds_bos { tok.bos_id } else { None },
    };
    let mut chunks = plan.chunks(&tokens)?;
    if let Some(seed) = spec.shuffle {
        // Partial Fisher–Yates: the first `samples` slots become a uniform draw.
        let mut rng = SplitMix64::new(seed);
        let n = chunks.len();
        let k = spec.samples.min(n);
        for i in 0..k {
            let j = i + rng.below((n - i) as u64) as usize;
            chunks.swap(i, j);
        }
        chunks.truncate(k);
    }
    if chunks.len() < spec.samples {
        crate::progress::warn(&format!(
            "--calib-samples {} asks for {} chunks of {} tokens, but calibration text {} ({} tokens) holds only {}: calibrating on {}",
            spec.samples,
            spec.samples,
            spec.seq_len,
            if src.label == "built-in" { "(the built-in corpus)" } else { &src.label },
            tokens.len(),
            chunks.len(),
            chunks.len()
        ));
    }
    Ok(chunks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_follow_llama_perplexity() {
        let toks: Vec<u32> = (10..31).collect();
        let plan = ChunkPlan {
            ctx: 8,
            max_chunks: None,
            bos: Some(1),
        };
        let c = plan.chunks(&toks).unwrap();
        assert_eq!(c.len(), 2);
        assert_eq!(c[0], vec![1, 11, 12, 13, 14, 15, 16, 17]);
        assert_eq!(c[1], vec![1, 19, 20, 21, 22, 23, 24, 25]);
        let plan = ChunkPlan {
            ctx: 8,
            max_chunks: Some(1),
            bos: None,
        };
        assert_eq!(
            plan.chunks(&toks).unwrap(),
            vec![(10..18).collect::<Vec<u32>>()]
        );
        assert_eq!(plan.first_scored(), 4);
    }
}
