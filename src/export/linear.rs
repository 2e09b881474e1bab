//! A checkpoint artifact being written, and one linear weight handed to its target's scheme
//! (`scheme`), which quantizes and writes it.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::format::safetensors::ShardedWriter;
use crate::scheme::{LinearCtx, Out, Shared, Target};

/// A checkpoint artifact being written.
pub(crate) struct CkSink {
    pub target: Target,
    pub out: std::path::PathBuf,
    pub tmp: std::path::PathBuf,
    pub writer: ShardedWriter,
    pub errors: BTreeMap<String, f64>,
    /// SmoothQuant α per block, for `int8`.
    pub alphas: Vec<crate::export::manifest::LayerAlpha>,
}

pub(crate) fn bf16_bytes(v: &[f32]) -> Vec<u8> {
    crate::numerics::convert::f32_to_bf16_bytes(v)
}

/// Quantizes linear weight `w` for checkpoint sink `s` and writes its tensors; returns the
/// weights the codes stand for when `decoded` (what the block pipeline propagates through).
pub(crate) fn write_linear(
    c: &LinearCtx<'_>,
    s: &mut CkSink,
    w: &[f32],
    sh: &mut Shared<'_>,
    decoded: bool,
) -> Result<Option<Vec<f32>>> {
    let scheme = crate::scheme::of(s.target)
        .ok_or_else(|| Error::Internal(format!("{} has no checkpoint scheme", s.target)))?;
    let mut out = Out {
        target: s.target,
        writer: &mut s.writer,
        errors: &mut s.errors,
    };
    scheme.encode(c, &mut out, w, sh, decoded)
}
