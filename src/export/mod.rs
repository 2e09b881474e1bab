//! `minitron-convert MODEL --to TARGET[,TARGET…] --out PATH`: one export pipeline for every
//! artifact kind.
//!
//! The flow: [`target`] parses `--to` once and fixes where each artifact goes; the run
//! ([`run`]) decides what calibration every target needs and calibrates once
//! (`calib::calibrate_for`: one tokenization, one forward pass); it opens one sink per target
//! (a sharded safetensors folder planned by [`plan`], or a GGUF file planned by [`gguf`]) and
//! streams each input tensor once to every sink; artifacts are written under temporary names
//! and moved into place only when all of them are complete, each checkpoint folder with its
//! typed [`manifest`].

pub mod gguf;
pub mod manifest;
pub mod plan;
pub mod run;
pub mod target;

pub use run::{run, Artifact, ExportOptions, ExportReport, GgufSettings};
pub use target::Target;
