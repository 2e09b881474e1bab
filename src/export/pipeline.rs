//! The export as a block pipeline: the input tensors in checkpoint order, each read once and
//! handed to every sink; when the loop reaches a block, that block is calibrated (its
//! statistics and second moments, over every calibration chunk), its tensors are quantized for
//! every target and written, its state is dropped, and its outputs (bf16, or the quantized
//! block's) become the next block's calibration inputs.

use std::collections::BTreeMap;

use crate::calib::BlockCalibration;
use crate::error::{Error, Result};
use crate::export::gguf::GgufSink;
use crate::export::journal::{CkRecord, GgufRecord, Journal, Record};
use crate::export::linear::{bf16_bytes, write_linear, CkSink};
use crate::export::manifest::LayerAlpha;
use crate::export::options::ExportOptions;
use crate::export::plan::inputs;
use crate::model::names::{self, InputSite, LinearRole, TensorRole};
use crate::model::Checkpoint;
use crate::quant::smoothquant::LayerSmoothing;
use crate::runtime::Block;
use crate::scheme::Target;
use crate::scheme::{GptqCache, LinearCtx, Shared};

/// Every open artifact.
pub(crate) struct Sinks {
    pub ck: Vec<CkSink>,
    pub gguf: Vec<(Target, GgufSink)>,
}

/// The block being written, as the propagating target's codes stand for it.
#[derive(Default)]
struct Decoded {
    layer: usize,
    linears: BTreeMap<usize, Vec<f32>>,
    input_norm: Option<Vec<f32>>,
    post_norm: Option<Vec<f32>>,
}

/// State carried across the tensors of one block.
struct BlockState {
    layer: Option<usize>,
    smooth: Option<LayerSmoothing>,
    /// NVFP4: the largest weight magnitude among the layers reading one input (q/k/v,
    /// gate/up), which share one per-tensor scale as vLLM requires of fused projections.
    group_absmax: Option<((usize, usize), f32)>,
    gptq: GptqCache,
    decoded: Option<Decoded>,
    /// The target whose decoded block carries the calibration on (quantized inputs).
    propagate: Option<Target>,
}

/// Where the loop starts: at the beginning, or where a journal's record left off.
#[derive(Default)]
pub(crate) struct Start {
    pub next_item: usize,
    pub tensors_read: usize,
    pub bytes_read: u64,
}

/// Streams every input tensor once to every sink, calibrating block by block (from `start`
/// on, recording the journal between blocks when it is due); returns the tensors and bytes
/// read.
#[allow(clippy::too_many_arguments)]
pub(crate) fn export_loop(
    ck: &Checkpoint,
    o: &ExportOptions,
    bc: &mut BlockCalibration<'_>,
    propagate: Option<Target>,
    sinks: &mut Sinks,
    journal: &mut Journal,
    start: Start,
    progress: &dyn Fn(u64, u64),
) -> Result<(usize, u64)> {
    let items = inputs(ck);
    // Progress counts input bytes: what a user can compare with the checkpoint's size.
    let stored = |name: &str| {
        ck.info(name).map_or(0, |(_, t)| {
            (t.shape.iter().product::<usize>() * t.dtype.size()) as u64
        })
    };
    let total: u64 = items.iter().map(|s| stored(&s.name)).sum();
    let mut done: u64 = items
        .iter()
        .take(start.next_item)
        .map(|s| stored(&s.name))
        .sum();
    // The first block is calibrated before anything is written (the embedding does not need
    // it, but the calibration's first step is then the first thing on screen).
    if ck.config.num_hidden_layers > 0 && start.next_item == 0 {
        bc.prepare(0)?;
    }
    // The clock of the caller's rate and ETA starts here, not after the first tensor.
    progress(done, total);
    let mut bytes_read = start.bytes_read;
    let mut tensors_read = start.tensors_read;
    let mut st = BlockState {
        layer: None,
        smooth: None,
        group_absmax: None,
        gptq: GptqCache::default(),
        decoded: None,
        propagate,
    };
    for (i, spec) in items.iter().enumerate().skip(start.next_item) {
        let layer = spec.role.layer();
        if st.layer.is_some() && st.layer != layer {
            end_block(ck, bc, &mut st)?;
            if journal.due() {
                record(journal, sinks, bc, i, tensors_read, bytes_read)?;
            }
        }
        if let (Some(l), None) = (layer, st.layer) {
            begin_block(ck, o, bc, sinks, &mut st, l)?;
        }
        bytes_read += check_finite(ck, o, &spec.name)?;
        tensors_read += 1;
        match spec.role {
            TensorRole::Linear(l, r) => {
                write_linear_all(ck, o, bc, sinks, &mut st, &spec.name, &spec.shape, l, r)?
            }
            role => write_other(ck, o, sinks, &mut st, &spec.name, role)?,
        }
        ck.release(&spec.name);
        done += stored(&spec.name);
        progress(done, total);
    }
    if st.layer.is_some() {
        end_block(ck, bc, &mut st)?;
    }
    Ok((tensors_read, bytes_read))
}

/// Records the journal between two blocks: every writer synced and its place, what each
/// artifact gathered for its manifest, the calibration's state; `next_item` is the first
/// input tensor not yet handled.
fn record(
    journal: &mut Journal,
    sinks: &mut Sinks,
    bc: &BlockCalibration<'_>,
    next_item: usize,
    tensors_read: usize,
    bytes_read: u64,
) -> Result<()> {
    journal.prepare()?;
    let calib = bc.save_state(journal.dir())?;
    let mut ck = Vec::new();
    for s in sinks.ck.iter_mut() {
        let mark = s.writer.mark()?;
        ck.push(CkRecord::new(s.target.name(), mark, &s.errors, &s.alphas));
    }
    let mut gguf = Vec::new();
    for (t, g) in sinks.gguf.iter_mut() {
        gguf.push(GgufRecord {
            target: t.name().into(),
            written: g.mark()?,
        });
    }
    journal.write(Record {
        format: 0,
        fingerprint: String::new(),
        next_item,
        tensors_read,
        bytes_read,
        ck,
        gguf,
        calib,
    })
}

/// Refuses a tensor holding NaN or infinite values (unless allowed); returns its stored bytes.
fn check_finite(ck: &Checkpoint, o: &ExportOptions, name: &str) -> Result<u64> {
    let (f, info) = ck
        .info(name)
        .ok_or_else(|| Error::Internal(format!("planned tensor `{name}` is not indexed")))?;
    if !o.allow_nonfinite {
        let raw = f.bytes(name).expect("indexed");
        if let Some(i) = crate::numerics::convert::first_nonfinite(raw, info.dtype) {
            return Err(Error::format(
                &f.path,
                format!(
                    "tensor `{name}`: value {i} (flat index) is NaN or infinite; pass --allow-nonfinite to convert it anyway"
                ),
            ));
        }
    }
    Ok((info.shape.iter().product::<usize>() * info.dtype.size()) as u64)
}

/// Calibrates block `l` and computes what its tensors share: SmoothQuant or AWQ factors.
fn begin_block(
    ck: &Checkpoint,
    o: &ExportOptions,
    bc: &mut BlockCalibration<'_>,
    sinks: &mut Sinks,
    st: &mut BlockState,
    l: usize,
) -> Result<()> {
    bc.prepare(l)?;
    // GGUF importance matrices made by this run take the block's entries now, before any of
    // its tensors is quantized.
    if let Some(stats) = bc.stats() {
        for (_, g) in sinks.gguf.iter_mut() {
            g.block_calibrated(l, &stats.layers[l]);
        }
    }
    st.layer = Some(l);
    st.decoded = (st.propagate.is_some() && bc.wants_quantized_block()).then(|| Decoded {
        layer: l,
        ..Default::default()
    });
    // Targets that smooth the block's inputs (SmoothQuant, AWQ) rewrite the norms; two that do
    // it each their own way are refused together before any work (see `run`).
    let plan = sinks.ck.iter().find_map(|s| o.smoothing(s.target));
    st.smooth = None;
    if let Some(plan) = plan {
        let stats = bc.stats().ok_or_else(|| {
            Error::Internal("a smoothing target without calibration statistics".into())
        })?;
        let sm = LayerSmoothing::compute(ck, &stats.activations(l), l, plan)?;
        let sites: BTreeMap<String, f64> = InputSite::ALL
            .into_iter()
            .filter_map(|site| sm.alpha(site).map(|a| (site.name().to_owned(), a)))
            .collect();
        for s in sinks
            .ck
            .iter_mut()
            .filter(|s| o.smoothing(s.target).is_some())
        {
            s.alphas.push(LayerAlpha {
                layer: l,
                sites: sites.clone(),
            });
        }
        st.smooth = Some(sm);
    }
    Ok(())
}

/// Block `st.layer` is written: its state goes, and the calibration moves on (through the
/// quantized block when inputs propagate quantized).
fn end_block(ck: &Checkpoint, bc: &mut BlockCalibration<'_>, st: &mut BlockState) -> Result<()> {
    let l = st.layer.take().expect("a block is open");
    st.smooth = None;
    st.gptq = GptqCache::default();
    let blk = match st.decoded.take() {
        Some(d) => Some(decoded_block(ck, bc, d)?),
        None => None,
    };
    bc.finish_block(l, blk)
}

/// The runner's block from the propagating target's decoded weights and norms.
fn decoded_block(ck: &Checkpoint, bc: &BlockCalibration<'_>, mut d: Decoded) -> Result<Block> {
    let c = &ck.config;
    let (dtype, device) = bc
        .block_dtype_device()
        .ok_or_else(|| Error::Internal("no calibration pass to propagate through".into()))?;
    let mut linears = Vec::new();
    for (i, r) in LinearRole::ALL.into_iter().enumerate() {
        let w = d
            .linears
            .remove(&i)
            .ok_or_else(|| Error::Internal(format!("block {}: {r:?} was not decoded", d.layer)))?;
        linears.push(w);
    }
    let norm = |v: Option<Vec<f32>>, name: String| -> Result<Vec<f32>> {
        match v {
            Some(v) => Ok(v),
            None => ck.read_f32(&name),
        }
    };
    let input_norm = norm(d.input_norm.take(), names::hf_input_norm(d.layer))?;
    let post_norm = norm(d.post_norm.take(), names::hf_post_norm(d.layer))?;
    crate::runtime::load::dense_block(c, input_norm, post_norm, linears, dtype, device)
}

/// One linear weight to every sink (quantized per checkpoint target, or as GGUF wants it).
#[allow(clippy::too_many_arguments)]
fn write_linear_all(
    ck: &Checkpoint,
    o: &ExportOptions,
    bc: &mut BlockCalibration<'_>,
    sinks: &mut Sinks,
    st: &mut BlockState,
    name: &str,
    shape: &[usize],
    layer: usize,
    r: LinearRole,
) -> Result<()> {
    // GGUF files that keep the stored dtype take the bytes as they are; the f32 values are
    // made only when some target needs them.
    let mut f32_gguf = Vec::new();
    for (gi, (_, g)) in sinks.gguf.iter_mut().enumerate() {
        if !g.write_same_dtype(ck, name)? {
            f32_gguf.push(gi);
        }
    }
    if sinks.ck.is_empty() && f32_gguf.is_empty() {
        return Ok(());
    }
    let key = (layer, r.site().index());
    if sinks
        .ck
        .iter()
        .any(|s| crate::scheme::of(s.target).is_some_and(|sc| sc.shares_tensor_scale(s.target)))
        && st.group_absmax.map(|g| g.0) != Some(key)
    {
        st.group_absmax = Some((key, site_absmax(ck, layer, r)?));
    }
    if let Some(h) = bc.hessians() {
        st.gptq.load(layer, r.site(), || {
            crate::runtime::release_free_memory();
            h.take_mean(r.site())
        });
    }
    let w = ck.read_f32(name)?;
    let mut shared = Shared {
        fp8: Vec::new(),
        gptq: &mut st.gptq,
    };
    let methods = o.methods();
    let ctx = LinearCtx {
        m: &methods,
        stats: bc.stats().map(|s| s as &dyn crate::scheme::Statistics),
        smooth: st.smooth.as_ref(),
        name,
        shape,
        layer,
        role: r,
        group_absmax: st.group_absmax.map(|g| g.1),
    };
    for s in sinks.ck.iter_mut() {
        let want = st.decoded.is_some() && Some(s.target) == st.propagate;
        if let Some(v) = write_linear(&ctx, s, &w, &mut shared, want)? {
            let i = LinearRole::ALL
                .iter()
                .position(|&x| x == r)
                .expect("a role");
            if let Some(d) = st.decoded.as_mut() {
                d.linears.insert(i, v);
            }
        }
    }
    for gi in f32_gguf {
        sinks.gguf[gi].1.write_f32(name, &w)?;
    }
    Ok(())
}

/// The largest stored weight magnitude among the layers reading the input of `r` in `layer`.
fn site_absmax(ck: &Checkpoint, layer: usize, r: LinearRole) -> Result<f32> {
    let mut m = 0f32;
    for r2 in LinearRole::ALL
        .into_iter()
        .filter(|r2| r2.site() == r.site())
    {
        let n2 = names::hf_linear(layer, r2);
        let (raw, i2) = ck.raw(&n2)?;
        m = m.max(crate::numerics::convert::absmax(raw, i2.dtype).unwrap_or(0.0));
    }
    Ok(m)
}

/// A tensor that is not a linear weight: norms (smoothed for INT8 and AWQ targets), the
/// embedding and the head.
fn write_other(
    ck: &Checkpoint,
    o: &ExportOptions,
    sinks: &mut Sinks,
    st: &mut BlockState,
    name: &str,
    role: TensorRole,
) -> Result<()> {
    let bytes = ck.raw(name)?.0;
    let mut smoothed = None;
    for s in sinks.ck.iter_mut() {
        let rewrites = o.smoothing(s.target).is_some();
        match (role.norm_site(), st.smooth.as_ref()) {
            (Some((_, site)), Some(sm)) if rewrites => {
                let g = ck.read_f32(name)?;
                let v = sm.smooth_norm(site, &g);
                let b = bf16_bytes(&v);
                s.writer.write(name, &b)?;
                if Some(s.target) != st.propagate {
                    continue;
                }
                smoothed = Some(
                    crate::numerics::convert::to_f32(&b, crate::model::Dtype::BF16)
                        .ok_or_else(|| Error::Internal("bf16 bytes did not decode".into()))?,
                );
            }
            _ => s.writer.write(name, bytes)?,
        }
    }
    if let Some(d) = st.decoded.as_mut() {
        // The propagating target's norm: smoothed if it smooths, else as stored.
        if let Some(v) = smoothed {
            match role {
                TensorRole::InputNorm(_) => d.input_norm = Some(v),
                TensorRole::PostNorm(_) => d.post_norm = Some(v),
                _ => {}
            }
        }
    }
    for (_, g) in sinks.gguf.iter_mut() {
        if !g.write_same_dtype(ck, name)? {
            g.write_stored(ck, name)?;
        }
    }
    Ok(())
}
