//! FP8 E4M3 weights (formats/fp8.md): compressed-tensors `float-quantized` (`fp8`: bf16
//! per-channel scales, dynamic per-token activations; `fp8-static`: plus static per-tensor input
//! scales and an FP8 KV cache) and ModelOpt's FP8_PER_CHANNEL_PER_TOKEN (`fp8-modelopt`: f32
//! per-channel scales). The codes keep the weight's own name.

use serde_json::{json, Value};

use super::encode::{bf16_bytes, f32_bytes, PlanKind};
use super::{
    ct_args, ct_config, pt, scalar, stem, ActQuant, LinearCtx, LoadRule, Methods, Needs, Out,
    Scheme, Shared, Target, WeightData,
};
use crate::error::Result;
use crate::format::safetensors::PlannedTensor;
use crate::model::names::{part, LinearRole};
use crate::model::Checkpoint;
use crate::numerics::Dtype;
use crate::quant::fp8::{self, Fp8Matrix, ScaleStyle, WeightMode};

pub struct Fp8;

/// compressed-tensors' static observer: `bf16(absmax / 448)`.
fn static_scale(absmax: f32) -> f32 {
    let s = crate::numerics::fp8::round_bf16(absmax / crate::numerics::fp8::E4M3_MAX);
    if s == 0.0 {
        0.0078125
    } else {
        s
    }
}

impl Scheme for Fp8 {
    fn targets(&self) -> &'static [Target] {
        &[Target::Fp8, Target::Fp8Static, Target::Fp8ModelOpt]
    }

    fn tensors(
        &self,
        t: Target,
        name: &str,
        shape: &[usize],
        _: Option<usize>,
    ) -> Vec<PlannedTensor> {
        let stem = stem(name);
        let out = shape[0];
        let mut v = vec![pt(name.to_owned(), Dtype::F8E4M3, shape.to_vec())];
        match t {
            Target::Fp8ModelOpt => v.push(pt(
                part::of(stem, part::WEIGHT_SCALE),
                Dtype::F32,
                vec![out],
            )),
            _ => v.push(pt(
                part::of(stem, part::WEIGHT_SCALE),
                Dtype::BF16,
                vec![out, 1],
            )),
        }
        if t == Target::Fp8Static {
            v.push(pt(part::of(stem, part::INPUT_SCALE), Dtype::BF16, vec![1]));
        }
        v
    }

    fn after_linear(&self, t: Target, layer: usize, role: LinearRole) -> Vec<PlannedTensor> {
        if t == Target::Fp8Static && role == LinearRole::V {
            part::kv_scales(layer)
                .into_iter()
                .map(|n| pt(n, Dtype::BF16, vec![1]))
                .collect()
        } else {
            Vec::new()
        }
    }

    fn config(&self, t: Target, _: &Methods) -> Value {
        let weights = ct_args(
            "float",
            "channel",
            false,
            Some("memoryless_minmax"),
            None,
            8,
        );
        let static_fp8 = || ct_args("float", "tensor", false, Some("static_minmax"), None, 8);
        match t {
            Target::Fp8ModelOpt => json!({
                "quant_method": "modelopt",
                "quant_algo": "FP8_PER_CHANNEL_PER_TOKEN",
                "kv_cache_scheme": null,
                "ignore": ["lm_head"],
                "producer": {"name": "minitron", "version": crate::VERSION}
            }),
            Target::Fp8Static => ct_config("float-quantized", weights, static_fp8(), static_fp8()),
            _ => ct_config(
                "float-quantized",
                weights,
                ct_args("float", "token", true, None, None, 8),
                Value::Null,
            ),
        }
    }

    fn side_files(&self, t: Target) -> Vec<(&'static str, String)> {
        if t != Target::Fp8ModelOpt {
            return Vec::new();
        }
        super::modelopt_side_file(json!({
            "quant_algo": "FP8_PER_CHANNEL_PER_TOKEN", "kv_cache_quant_algo": null,
            "exclude_modules": ["lm_head"]}))
    }

    fn needs(&self, t: Target, m: &Methods) -> Needs {
        Needs {
            stats: t == Target::Fp8Static || m.fp8_weights != WeightMode::Rtn,
            hessians: m.fp8_weights == WeightMode::Gptq,
        }
    }

    /// `fp8-static`'s `k_scale` and `v_scale` (both, or none).
    fn kv_scales(&self, ck: &Checkpoint, layer: usize) -> Result<Option<(f32, f32)>> {
        let [k, v] = part::kv_scales(layer);
        Ok(match (scalar(ck, &k)?, scalar(ck, &v)?) {
            (Some(k), Some(v)) => Some((k, v)),
            _ => None,
        })
    }

    fn stores(&self, ck: &Checkpoint, _: &str, name: &str) -> bool {
        ck.info(name).is_some_and(|(_, t)| t.dtype == Dtype::F8E4M3)
    }

    fn check(&self, ck: &Checkpoint, _: &str, name: &str, shape: [usize; 2]) -> Result<()> {
        ck.check_shape(name, &shape)
    }

    fn load<'a>(
        &self,
        ck: &'a Checkpoint,
        stem: &str,
        name: &str,
        [out, inp]: [usize; 2],
        rule: LoadRule,
    ) -> Result<WeightData<'a>> {
        let (codes, _) = super::raw_weight(ck, name, [out, inp])?;
        let scales = super::channel_scales(ck, stem, out, true)?;
        let act = if rule.weight_only {
            ActQuant::None
        } else if let Some(s) = scalar(ck, &part::of(stem, part::INPUT_SCALE))? {
            ActQuant::Static(s)
        } else if rule.dynamic {
            ActQuant::DynamicToken
        } else {
            ActQuant::None
        };
        Ok(WeightData::Fp8 { codes, scales, act })
    }

    /// FP8 weights (shared by the FP8 targets of one scale layout) and, for `fp8-static`, the
    /// activation and KV-cache scales.
    fn encode(
        &self,
        c: &LinearCtx<'_>,
        s: &mut Out<'_>,
        w: &[f32],
        sh: &mut Shared<'_>,
        decoded: bool,
    ) -> Result<Option<Vec<f32>>> {
        let (cols, layer, r) = (c.shape[1], c.layer, c.role);
        let stem = stem(c.name);
        let t = s.target;
        let style = t.style();
        if !sh.fp8.iter().any(|(st, _, _)| *st == style) {
            let m = weights(c, style, w, sh)?;
            let err = m.relative_rms(w, cols);
            sh.fp8.push((style, m, err));
        }
        let (_, m, err) = sh
            .fp8
            .iter()
            .find(|(st, _, _)| *st == style)
            .expect("cached");
        s.error(c.name, *err);
        s.write(c.name, &m.codes)?;
        let scale = part::of(stem, part::WEIGHT_SCALE);
        match t {
            Target::Fp8ModelOpt => s.write(&scale, &f32_bytes(&m.scales))?,
            _ => s.write(&scale, &bf16_bytes(&m.scales))?,
        }
        if t == Target::Fp8Static {
            let st = c.stats(t)?;
            // q/k/v (and gate/up) share one input, so the per-tensor scale is already the max
            // over the fused group that runtimes take.
            let scale = static_scale(st.input_absmax(layer, r.site()));
            s.write(&part::of(stem, part::INPUT_SCALE), &bf16_bytes(&[scale]))?;
            if r == LinearRole::V {
                let (k, v) = st.kv_absmax(layer);
                let [kn, vn] = part::kv_scales(layer);
                s.write(&kn, &bf16_bytes(&[static_scale(k)]))?;
                s.write(&vn, &bf16_bytes(&[static_scale(v)]))?;
            }
        }
        Ok(decoded.then(|| m.dequantize(cols)))
    }
}

/// FP8 weights of one linear layer under `style` (RTN, clipping search or GPTQ).
fn weights(
    c: &LinearCtx<'_>,
    style: ScaleStyle,
    w: &[f32],
    sh: &mut Shared<'_>,
) -> Result<Fp8Matrix> {
    let cols = c.shape[1];
    Ok(match c.m.fp8_weights {
        WeightMode::Gptq => {
            let (u, mean) = sh.gptq.plan(PlanKind::Fp8, cols, None)?;
            fp8::quantize_gptq(w, cols, style, mean, u)
        }
        mode => {
            let importance = c.stats.map(|st| st.mean_sq(c.layer, c.role.site()));
            fp8::quantize(w, cols, style, mode, importance.as_deref())
        }
    })
}
