//! A checkpoint artifact being written, and one linear weight handed to its target's scheme
//! (`scheme`), which quantizes and writes it.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::format::safetensors::ShardedWriter;
use crate::scheme::{LayerQuant, LinearCtx, Out, Shared, Target};

/// A checkpoint artifact being written.
pub(crate) struct CkSink {
    pub target: Target,
    pub out: std::path::PathBuf,
    pub tmp: std::path::PathBuf,
    pub writer: ShardedWriter,
    pub errors: BTreeMap<String, f64>,
    /// SmoothQuant α per block, for `int8`.
    pub alphas: Vec<crate::export::manifest::LayerAlpha>,
    /// Per-layer kinds of a mixed `w4a16` checkpoint (empty: every layer as `target`).
    pub layers: BTreeMap<String, LayerQuant>,
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
    let (target, methods) = match s.layers.get(c.name).map(|q| q.target()) {
        None => (s.target, *c.m),
        // A layer a mixed checkpoint keeps in bf16: written as its bf16 values.
        Some(None) => {
            let b = bf16_bytes(w);
            s.writer.write(c.name, &b)?;
            s.errors.insert(c.name.to_owned(), 0.0);
            return Ok(decoded.then(|| {
                crate::numerics::convert::to_f32(&b, crate::numerics::Dtype::BF16)
                    .unwrap_or_default()
            }));
        }
        Some(Some((t, g))) => (
            t,
            crate::scheme::Methods {
                group_size: g,
                ..*c.m
            },
        ),
    };
    let scheme = crate::scheme::of(target)
        .ok_or_else(|| Error::Internal(format!("{target} has no checkpoint scheme")))?;
    let ctx = LinearCtx { m: &methods, ..*c };
    let mut out = Out {
        target,
        writer: &mut s.writer,
        errors: &mut s.errors,
    };
    scheme.encode(&ctx, &mut out, w, sh, decoded)
}
