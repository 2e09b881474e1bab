//! Greedy-generation parity between a candidate and a reference.

use crate::error::{Error, Result};

/// One prompt's outcome.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct GenResult {
    pub prompt: String,
    pub prompt_ids: Vec<u32>,
    pub candidate: Vec<u32>,
    /// Per generated token, the candidate's top logit minus its runner-up (CPU runs only): a
    /// divergence at a step whose margin is within the logit error between two runners is a
    /// near-tie, not a difference in the model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candidate_margins: Option<Vec<f32>>,
    pub reference: Option<Vec<u32>>,
    /// Index of the first differing generated token (`None`: identical or no reference).
    pub first_diff: Option<usize>,
    pub candidate_text: String,
    /// The reference's generation, decoded (absent without a reference).
    #[serde(default)]
    pub reference_text: Option<String>,
}

/// Reads a prompts file: one prompt per line, `\n`, `\t` and `\\` escapes expanded, blank lines
/// skipped.
pub fn read_prompts(path: &std::path::Path) -> Result<Vec<String>> {
    let text = crate::format::text::read(path)?;
    let prompts: Vec<String> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(unescape)
        .collect();
    if prompts.is_empty() {
        return Err(Error::format(path, "no prompts (one per line expected)"));
    }
    Ok(prompts)
}

/// Expands `\n`, `\t` and `\\`; any other backslash is kept as written.
pub fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\\' {
            match it.peek() {
                Some('n') => {
                    out.push('\n');
                    it.next();
                }
                Some('t') => {
                    out.push('\t');
                    it.next();
                }
                Some('\\') => {
                    out.push('\\');
                    it.next();
                }
                _ => out.push('\\'),
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Index of the first position where `a` and `b` differ, `None` if equal.
pub fn first_difference(a: &[u32], b: &[u32]) -> Option<usize> {
    let n = a.len().min(b.len());
    (0..n)
        .find(|&i| a[i] != b[i])
        .or(if a.len() != b.len() { Some(n) } else { None })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_differences() {
        assert_eq!(unescape(r"def f(n):\n  x\\y \q"), "def f(n):\n  x\\y \\q");
        assert_eq!(first_difference(&[1, 2, 3], &[1, 2, 3]), None);
        assert_eq!(first_difference(&[1, 2, 3], &[1, 5, 3]), Some(1));
        assert_eq!(first_difference(&[1, 2], &[1, 2, 3]), Some(2));
    }
}
