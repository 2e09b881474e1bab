//! `minitron-convert MODEL --to TARGET[,TARGET…] --out PATH`: one export pipeline for every
//! artifact kind.
//!
//! The flow: [`Target`] (in `scheme`) parses `--to` once and fixes where each artifact goes; the run
//! ([`run`]) decides what calibration every target needs; it opens one sink per target
//! (a sharded safetensors folder planned by [`plan`], or a GGUF file planned by [`gguf`]) and
//! streams each input tensor once to every sink as a block pipeline (`pipeline`): each block
//! is calibrated when the stream reaches it (`calib::BlockCalibration`: one tokenization, one
//! pass through the blocks), quantized for every target (`linear`) and written; artifacts are written under temporary names
//! and moved into place only when all of them are complete, each checkpoint folder with its
//! typed [`manifest`].

pub mod gguf;
pub(crate) mod journal;
mod linear;
pub mod manifest;
pub mod options;
mod pipeline;
pub mod plan;
pub mod run;

pub use crate::scheme::Target;
pub use run::{run, Artifact, ExportOptions, ExportReport, GgufSettings};
