//! One linear weight quantized for one checkpoint target and written: the per-target encoders
//! the block pipeline calls, and the GPTQ factors the targets of one run share.

use std::collections::BTreeMap;

use crate::calib::hessian::BlockHessians;
use crate::calib::CalibStats;
use crate::error::{Error, Result};
use crate::export::options::ExportOptions;
use crate::export::target::Target;
use crate::format::safetensors::ShardedWriter;
use crate::model::names::{part, InputSite, LinearRole};
use crate::quant::fp8::{self, Fp8Matrix, ScaleStyle, WeightMode};
use crate::quant::gptq::GptqPlan;
use crate::quant::int8::{Int4Method, Int8Matrix};
use crate::quant::smoothquant::LayerSmoothing;

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

pub(crate) fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// compressed-tensors' static observer: `bf16(absmax / 448)`.
fn fp8_static_scale(absmax: f32) -> f32 {
    let s = crate::numerics::fp8::round_bf16(absmax / crate::numerics::fp8::E4M3_MAX);
    if s == 0.0 {
        0.0078125
    } else {
        s
    }
}

/// Which GPTQ factor a target rounds with.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PlanKind {
    /// FP8 weights: plain GPTQ.
    Fp8,
    /// W4A16: the off-diagonal shrunk (`W4A16_GPTQ_SHRINK`).
    W4,
    /// INT8 W8A8: the second moments of the smoothed input.
    Int8,
}

/// The second moments of the input site being written and the GPTQ factors made from them:
/// q/k/v (and gate/up) share one input, so one factor per kind serves the whole group, and
/// targets of one run share the mean.
#[derive(Default)]
pub(crate) struct GptqCache {
    key: Option<(usize, InputSite)>,
    /// `E[x xᵀ]` in f32 (0.82 GB at a 14336-wide input), beside the f64 factor made from it.
    mean: Vec<f32>,
    plans: Vec<(PlanKind, GptqPlan)>,
}

impl GptqCache {
    /// Moves to `site` of block `layer`: the mean is taken out of the block's sums once.
    pub fn load(&mut self, layer: usize, site: InputSite, h: &mut BlockHessians) {
        if self.key != Some((layer, site)) {
            // The previous site's matrices go first, so two are never held at once.
            self.plans.clear();
            self.mean = Vec::new();
            crate::runtime::release_free_memory();
            self.mean = h.take_mean(site);
            self.key = Some((layer, site));
        }
    }

    fn plan(
        &mut self,
        kind: PlanKind,
        cols: usize,
        smooth: Option<&[f32]>,
    ) -> Result<(&GptqPlan, &[f32])> {
        if self.mean.is_empty() {
            return Err(Error::Internal(
                "GPTQ factor asked for before its site".into(),
            ));
        }
        if !self.plans.iter().any(|(k, _)| *k == kind) {
            let p = match kind {
                PlanKind::Fp8 => GptqPlan::new(&self.mean, cols, 0.01)?,
                PlanKind::W4 => GptqPlan::with_shrink(
                    &self.mean,
                    cols,
                    0.01,
                    crate::quant::int8::W4A16_GPTQ_SHRINK,
                )?,
                PlanKind::Int8 => {
                    // Second moments of the smoothed input x/s.
                    let f = |j: usize| smooth.map_or(1.0, |s| s[j] as f64);
                    let mean = &self.mean;
                    GptqPlan::from_fn(cols, 0.01, 0.0, |i, j| {
                        mean[i * cols + j] as f64 / (f(i) * f(j))
                    })?
                }
            };
            self.plans.push((kind, p));
        }
        let p = &self.plans.iter().find(|(k, _)| *k == kind).expect("made").1;
        Ok((p, &self.mean))
    }
}

/// What writing one linear weight needs to know.
pub(crate) struct LinearCtx<'a> {
    pub o: &'a ExportOptions,
    pub stats: Option<&'a CalibStats>,
    pub smooth: Option<&'a LayerSmoothing>,
    pub name: &'a str,
    pub shape: &'a [usize],
    pub layer: usize,
    pub role: LinearRole,
    /// The largest weight magnitude among the layers sharing this layer's input (NVFP4).
    pub group_absmax: Option<f32>,
}

/// What one linear layer's encoders share within a run: FP8 weights per scale layout, GPTQ
/// factors.
pub(crate) struct Shared<'a> {
    pub fp8: Vec<(ScaleStyle, Fp8Matrix, f64)>,
    pub gptq: &'a mut GptqCache,
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
    let cols = c.shape[1];
    match s.target {
        Target::Int8 => write_int8(c, s, w, sh, decoded),
        Target::Int8W8A16 => {
            let m = crate::quant::int8::quantize(w, cols, c.o.group_size);
            write_packed(s, c.name, c.shape, w, &m, 8)?;
            Ok(decoded.then(|| m.dequantize(cols)))
        }
        Target::W4A16 => write_w4a16(c, s, w, sh, decoded),
        Target::Fp8 | Target::Fp8Static | Target::Fp8ModelOpt => write_fp8(c, s, w, sh, decoded),
        Target::Nvfp4 | Target::Nvfp4A16 | Target::Nvfp4ModelOpt => write_nvfp4(c, s, w, decoded),
        Target::Gguf(_) => Err(Error::Internal("GGUF targets have their own sinks".into())),
    }
}

fn stem(name: &str) -> &str {
    name.strip_suffix(".weight").unwrap_or(name)
}

/// SmoothQuant W8A8: the smoothed weights rounded to INT8 per output channel (RTN or GPTQ under
/// the smoothed input's second moments).
fn write_int8(
    c: &LinearCtx<'_>,
    s: &mut CkSink,
    w: &[f32],
    sh: &mut Shared<'_>,
    decoded: bool,
) -> Result<Option<Vec<f32>>> {
    let (cols, r) = (c.shape[1], c.role);
    let sm = c
        .smooth
        .ok_or_else(|| Error::Internal("int8 without its block's smoothing".into()))?;
    let ws = sm.smooth_weight(r, w, cols);
    let m = if c.o.int8_weights == WeightMode::Gptq {
        let factors = sm.factors[r.site().index()].as_deref();
        let (u, _) = sh.gptq.plan(PlanKind::Int8, cols, factors)?;
        crate::quant::int8::quantize_gptq(&ws, cols, u)
    } else {
        crate::quant::int8::quantize(&ws, cols, None)
    };
    s.errors
        .insert(c.name.to_owned(), m.relative_rms(&ws, cols));
    let bytes: Vec<u8> = m.q.iter().map(|&v| v as u8).collect();
    s.writer.write(c.name, &bytes)?;
    s.writer.write(
        &part::of(stem(c.name), part::WEIGHT_SCALE),
        &bf16_bytes(&m.scales),
    )?;
    Ok(decoded.then(|| m.dequantize(cols)))
}

/// W4A16: RTN, GPTQ (scales searched under the factor's error weights, then refitted) or AWQ
/// (scaled weights, clipping searched under the scaled inputs' importance).
fn write_w4a16(
    c: &LinearCtx<'_>,
    s: &mut CkSink,
    w: &[f32],
    sh: &mut Shared<'_>,
    decoded: bool,
) -> Result<Option<Vec<f32>>> {
    let (cols, layer, r) = (c.shape[1], c.layer, c.role);
    let group = s.target.group(c.o.group_size);
    let (m, ws) = match c.o.int4_weights {
        Int4Method::Gptq => {
            let (u, mean) = sh.gptq.plan(PlanKind::W4, cols, None)?;
            // Group scales searched under what each column's error costs after the feedback,
            // then refitted to the codes under the full second moments.
            let imp = u.error_weights();
            let m = crate::quant::int8::quantize_gptq_bits(
                w,
                cols,
                group,
                u,
                4,
                Some(&imp),
                Some(mean),
            );
            (m, None)
        }
        Int4Method::Awq => {
            let sm = c
                .smooth
                .ok_or_else(|| Error::Internal("AWQ without its block's scaling".into()))?;
            let ws = sm.smooth_weight(r, w, cols);
            // AWQ's clipping step: group scales searched under the importance of the scaled
            // inputs x / s, E[x²] / s².
            let st = c
                .stats
                .ok_or_else(|| Error::Internal("AWQ without statistics".into()))?;
            let mut imp = st.site(layer, r.site()).mean_sq();
            if let Some(f) = sm.factors[r.site().index()].as_deref() {
                for (i, &f) in imp.iter_mut().zip(f) {
                    *i /= (f as f64) * (f as f64);
                }
            }
            let scales = crate::quant::int8::searched_scales(&ws, cols, group, 4, &imp);
            let m = crate::quant::int8::quantize_with_scales(&ws, cols, group, 4, scales);
            (m, Some(ws))
        }
        Int4Method::Rtn => (crate::quant::int8::quantize_bits(w, cols, group, 4), None),
    };
    // The error is against the (scaled) weights the codes stand for.
    write_packed(s, c.name, c.shape, ws.as_deref().unwrap_or(w), &m, 4)?;
    Ok(decoded.then(|| m.dequantize(cols)))
}

/// Writes a `pack-quantized` layer (formats/int8.md#w8a16, #w4a16): `bits`-bit codes packed
/// into int32 words, the bf16 scales, the logical shape; records the layer's error.
fn write_packed(
    s: &mut CkSink,
    name: &str,
    shape: &[usize],
    w: &[f32],
    m: &Int8Matrix,
    bits: u32,
) -> Result<()> {
    let stem = stem(name);
    let cols = shape[1];
    s.errors.insert(name.to_owned(), m.relative_rms(w, cols));
    s.writer.write(
        &part::of(stem, part::WEIGHT_PACKED),
        &crate::quant::int8::pack_bits(&m.q, cols, bits),
    )?;
    s.writer
        .write(&part::of(stem, part::WEIGHT_SCALE), &bf16_bytes(&m.scales))?;
    let dims: Vec<u8> = [shape[0] as i64, cols as i64]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    s.writer.write(&part::of(stem, part::WEIGHT_SHAPE), &dims)
}

/// FP8 weights (shared by the FP8 targets of one scale layout) and, for `fp8-static`, the
/// activation and KV-cache scales.
fn write_fp8(
    c: &LinearCtx<'_>,
    s: &mut CkSink,
    w: &[f32],
    sh: &mut Shared<'_>,
    decoded: bool,
) -> Result<Option<Vec<f32>>> {
    let (cols, layer, r) = (c.shape[1], c.layer, c.role);
    let stem = stem(c.name);
    let style = s.target.style();
    if !sh.fp8.iter().any(|(st, _, _)| *st == style) {
        let m = fp8_weights(c, style, w, sh.gptq)?;
        let err = m.relative_rms(w, cols);
        sh.fp8.push((style, m, err));
    }
    let (_, m, err) = sh
        .fp8
        .iter()
        .find(|(st, _, _)| *st == style)
        .expect("cached");
    s.errors.insert(c.name.to_owned(), *err);
    s.writer.write(c.name, &m.codes)?;
    match s.target {
        Target::Fp8 => s
            .writer
            .write(&part::of(stem, part::WEIGHT_SCALE), &bf16_bytes(&m.scales))?,
        Target::Fp8Static => {
            s.writer
                .write(&part::of(stem, part::WEIGHT_SCALE), &bf16_bytes(&m.scales))?;
            let st = c
                .stats
                .ok_or_else(|| Error::Invalid("fp8-static needs calibration".into()))?;
            // q/k/v (and gate/up) share one input, so the per-tensor scale is already the max
            // over the fused group that runtimes take.
            let scale = fp8_static_scale(st.site(layer, r.site()).tensor_absmax());
            s.writer
                .write(&part::of(stem, part::INPUT_SCALE), &bf16_bytes(&[scale]))?;
            if r == LinearRole::V {
                let ls = &st.layers[layer];
                let [kn, vn] = part::kv_scales(layer);
                s.writer
                    .write(&kn, &bf16_bytes(&[fp8_static_scale(ls.k_absmax)]))?;
                s.writer
                    .write(&vn, &bf16_bytes(&[fp8_static_scale(ls.v_absmax)]))?;
            }
        }
        _ => s
            .writer
            .write(&part::of(stem, part::WEIGHT_SCALE), &f32_bytes(&m.scales))?,
    }
    Ok(decoded.then(|| m.dequantize(cols)))
}

/// FP8 weights of one linear layer under `style` (RTN, clipping search or GPTQ).
fn fp8_weights(
    c: &LinearCtx<'_>,
    style: ScaleStyle,
    w: &[f32],
    gptq: &mut GptqCache,
) -> Result<Fp8Matrix> {
    let cols = c.shape[1];
    Ok(match c.o.fp8_weights {
        WeightMode::Gptq => {
            let (u, mean) = gptq.plan(PlanKind::Fp8, cols, None)?;
            fp8::quantize_gptq(w, cols, style, mean, u)
        }
        mode => {
            let importance = c.stats.map(|st| st.site(c.layer, c.role.site()).mean_sq());
            fp8::quantize(w, cols, style, mode, importance.as_deref())
        }
    })
}

/// NVFP4 (compressed-tensors or ModelOpt): codes, group scales, the tensor scale shared by the
/// layers of one input, and the activation scale when activations are quantized.
fn write_nvfp4(
    c: &LinearCtx<'_>,
    s: &mut CkSink,
    w: &[f32],
    decoded: bool,
) -> Result<Option<Vec<f32>>> {
    use crate::quant::nvfp4;
    let (cols, layer, r, name) = (c.shape[1], c.layer, c.role, c.name);
    let stem = stem(name);
    let flavor = s
        .target
        .nvfp4()
        .ok_or_else(|| Error::Internal(format!("{} is not NVFP4", s.target)))?;
    let amax = c
        .group_absmax
        .ok_or_else(|| Error::Internal("NVFP4 without its group's largest weight".into()))?;
    let m = nvfp4::quantize(w, cols, nvfp4::tensor_scale(amax, flavor), flavor);
    s.errors.insert(name.to_owned(), m.relative_rms(w, cols));
    let modelopt = flavor == nvfp4::Flavor::ModelOpt;
    let packed = if modelopt {
        name.to_owned()
    } else {
        part::of(stem, part::WEIGHT_PACKED)
    };
    s.writer.write(&packed, &m.packed)?;
    s.writer
        .write(&part::of(stem, part::WEIGHT_SCALE), &m.scales)?;
    let tensor = if modelopt {
        part::WEIGHT_SCALE_2
    } else {
        part::WEIGHT_GLOBAL_SCALE
    };
    s.writer
        .write(&format!("{stem}.{tensor}"), &f32_bytes(&[m.tensor]))?;
    if s.target.nvfp4_activations() {
        let st = c
            .stats
            .ok_or_else(|| Error::Invalid(format!("{} needs calibration", s.target)))?;
        // q/k/v (and gate/up) read one input: one scale serves the fused group.
        let a = nvfp4::input_scale(st.site(layer, r.site()).tensor_absmax(), flavor);
        let input = if modelopt {
            part::INPUT_SCALE
        } else {
            part::INPUT_GLOBAL_SCALE
        };
        s.writer
            .write(&format!("{stem}.{input}"), &f32_bytes(&[a]))?;
    }
    Ok(decoded.then(|| m.dequantize(cols)))
}
