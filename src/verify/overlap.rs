//! Whether the text being evaluated is the text an artifact was calibrated on: a score measured
//! there is a training-set score, and flatters every calibrated mode.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::calib::CalibInfo;

/// Share of the evaluated text's sampled 16-token windows found in the calibration text from
/// which on the two count as overlapping (two unrelated texts share essentially none).
pub const WARN_SHARED: f64 = 0.01;

/// What `minitron-verify` found about the evaluated text and the candidate's calibration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibOverlap {
    /// The calibration text's label and sha256, from the candidate's manifest.
    pub calibration_source: String,
    pub calibration_sha256: String,
    /// The evaluated file is the calibration file (same sha256).
    pub same_text: bool,
    /// Sampled 16-token windows of the evaluated chunks, and how many the calibration shares.
    pub sampled_windows: usize,
    pub shared_windows: usize,
    pub shared_fraction: f64,
    pub warning: String,
}

/// The manifest beside or inside a candidate: `DIR/minitron-manifest.json` or
/// `FILE.gguf.manifest.json`.
fn manifest_path(candidate: &Path) -> PathBuf {
    if candidate.is_dir() {
        candidate.join(crate::export::manifest::MANIFEST_FILE)
    } else {
        crate::export::manifest::sidecar_path(candidate)
    }
}

/// Compares the evaluated text (its sha256 and its chunks) with the candidate's calibration,
/// when the candidate has a manifest that records one; `None` when there is nothing to say.
pub fn check(candidate: &Path, text_sha256: &str, chunks: &[Vec<u32>]) -> Option<CalibOverlap> {
    let text = std::fs::read_to_string(manifest_path(candidate)).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    let info: CalibInfo = serde_json::from_value(v.get("calibration")?.clone()).ok()?;
    compare(&info, text_sha256, chunks)
}

/// [`check`] on a calibration record already read.
pub fn compare(info: &CalibInfo, text_sha256: &str, chunks: &[Vec<u32>]) -> Option<CalibOverlap> {
    let same_text = info.sha256 == text_sha256;
    let (sampled, shared) = crate::calib::dataset::shared_windows(chunks, &info.fingerprint);
    let fraction = if sampled == 0 {
        0.0
    } else {
        shared as f64 / sampled as f64
    };
    if !same_text && fraction < WARN_SHARED {
        return None;
    }
    let what = if same_text {
        "is the artifact's calibration text".to_string()
    } else {
        format!(
            "shares {:.1} % of its sampled 16-token windows with the artifact's calibration text",
            100.0 * fraction
        )
    };
    let warning = format!(
        "the evaluated text {what} ({}): scores of calibrated modes measured on their own \
         calibration text flatter them, by about 1.8× in mean KLD for SmolLM2 W4A16 GPTQ (0.068 \
         scored on its calibration text, 0.125 calibrated on other text); evaluate on text the \
         calibration never saw",
        info.source
    );
    Some(CalibOverlap {
        calibration_source: info.source.clone(),
        calibration_sha256: info.sha256.clone(),
        same_text,
        sampled_windows: sampled,
        shared_windows: shared,
        shared_fraction: fraction,
        warning,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::calib::dataset::fingerprint;

    fn info(chunks: &[Vec<u32>], sha: &str) -> CalibInfo {
        CalibInfo {
            source: "calib.txt".into(),
            sha256: sha.into(),
            samples: chunks.len(),
            seq_len: 512,
            tokens: 0,
            shuffle_seed: None,
            wall_s: 0.0,
            fingerprint: fingerprint(chunks),
        }
    }

    /// Pseudo-random token text of `n` tokens from `seed`.
    fn text(n: usize, seed: u64) -> Vec<u32> {
        let mut r = crate::numerics::rng::SplitMix64::new(seed);
        (0..n).map(|_| (r.next_u64() % 50_000) as u32).collect()
    }

    fn cut(t: &[u32], ctx: usize, offset: usize) -> Vec<Vec<u32>> {
        t[offset..].chunks_exact(ctx).map(|c| c.to_vec()).collect()
    }

    #[test]
    fn the_same_file_warns_and_other_text_does_not() {
        let calib = text(64 * 512, 1);
        let ci = info(&cut(&calib, 512, 0), "aaaa");
        let same = compare(&ci, "aaaa", &cut(&calib, 512, 0)).expect("same file");
        assert!(same.same_text && same.shared_fraction > 0.99, "{same:?}");
        assert!(same.warning.contains("is the artifact's calibration text"));
        let other = text(40 * 512, 2);
        assert_eq!(compare(&ci, "bbbb", &cut(&other, 512, 0)), None);
    }

    /// The same text cut at other boundaries and another context still shows as shared; a
    /// quarter of it mixed into new text shows about a quarter.
    #[test]
    fn overlap_is_found_whatever_the_chunking() {
        let calib = text(64 * 512, 3);
        let ci = info(&cut(&calib, 512, 0), "aaaa");
        let o = compare(&ci, "cccc", &cut(&calib, 300, 77)).expect("overlap");
        assert!(!o.same_text);
        assert!(o.shared_fraction > 0.9, "{o:?}");
        let mut mixed = text(30 * 512, 4);
        mixed.extend_from_slice(&calib[..10 * 512]);
        let o = compare(&ci, "dddd", &cut(&mixed, 512, 0)).expect("partial overlap");
        assert!((o.shared_fraction - 0.25).abs() < 0.06, "{o:?}");
    }
}
