//! Calibration data. For now: the built-in default corpus, which also trains the byte-level BPE
//! of synthetic checkpoints.

/// A few kilobytes of the project's own writing: prose, dialogue, code, lists and arithmetic.
pub const DEFAULT_CORPUS: &str = include_str!("default_corpus.txt");
