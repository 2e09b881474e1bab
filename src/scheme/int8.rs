//! SmoothQuant W8A8 INT8 (formats/int8.md#w8a8): compressed-tensors `int-quantized`, the
//! smoothed weights' INT8 codes under the weight's own name, bf16 per-channel scales, dynamic
//! per-token INT8 activations (the smoothing is folded into the preceding norms).

use serde_json::Value;

use super::encode::{bf16_bytes, PlanKind};
use super::{
    ct_args, ct_config, pt, stem, LinearCtx, LoadRule, Methods, Needs, Out, Scheme, Shared, Target,
    WeightData,
};
use crate::error::Result;
use crate::format::safetensors::PlannedTensor;
use crate::model::names::part;
use crate::model::Checkpoint;
use crate::numerics::Dtype;
use crate::quant::fp8::WeightMode;
use crate::quant::smoothquant::SmoothPlan;

pub struct Int8;

impl Scheme for Int8 {
    fn targets(&self) -> &'static [Target] {
        &[Target::Int8]
    }

    fn tensors(
        &self,
        _: Target,
        name: &str,
        shape: &[usize],
        _: Option<usize>,
    ) -> Vec<PlannedTensor> {
        vec![
            pt(name.to_owned(), Dtype::I8, shape.to_vec()),
            pt(
                part::of(stem(name), part::WEIGHT_SCALE),
                Dtype::BF16,
                vec![shape[0], 1],
            ),
        ]
    }

    fn config(&self, _: Target, _: &Methods) -> Value {
        ct_config(
            "int-quantized",
            ct_args("int", "channel", false, Some("memoryless_minmax"), None, 8),
            ct_args("int", "token", true, None, None, 8),
            Value::Null,
        )
    }

    fn needs(&self, _: Target, m: &Methods) -> Needs {
        Needs {
            stats: true,
            hessians: m.int8_weights == WeightMode::Gptq,
        }
    }

    fn smoothing(&self, _: Target, m: &Methods) -> Option<SmoothPlan> {
        Some(SmoothPlan::from_alpha(m.smooth_alpha))
    }

    /// Measured on SmolLM2 (README): 0.994× the mean KLD of original inputs with RTN weights.
    fn prefers_quantized_inputs(&self, _: Target, m: &Methods) -> bool {
        m.int8_weights == WeightMode::Rtn
    }

    fn stores(&self, ck: &Checkpoint, _: &str, name: &str) -> bool {
        ck.info(name).is_some_and(|(_, t)| t.dtype == Dtype::I8)
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
        let (bytes, _) = super::raw_weight(ck, name, [out, inp])?;
        let scales = super::channel_scales(ck, stem, out, false)?;
        Ok(WeightData::Int8 {
            q: bytes.iter().map(|&b| b as i8).collect(),
            scales,
            dynamic: rule.dynamic && !rule.weight_only,
        })
    }

    /// The smoothed weights rounded to INT8 per output channel (RTN or GPTQ under the smoothed
    /// input's second moments).
    fn encode(
        &self,
        c: &LinearCtx<'_>,
        s: &mut Out<'_>,
        w: &[f32],
        sh: &mut Shared<'_>,
        decoded: bool,
    ) -> Result<Option<Vec<f32>>> {
        let (cols, r) = (c.shape[1], c.role);
        let sm = c.smooth(s.target)?;
        let ws = sm.smooth_weight(r, w, cols);
        let m = if c.m.int8_weights == WeightMode::Gptq {
            let factors = sm.factors[r.site().index()].as_deref();
            let (u, _) = sh.gptq.plan(PlanKind::Int8, cols, factors)?;
            crate::quant::int8::quantize_gptq(&ws, cols, u)
        } else {
            crate::quant::int8::quantize(&ws, cols, None)
        };
        s.error(c.name, m.relative_rms(&ws, cols));
        let bytes: Vec<u8> = m.q.iter().map(|&v| v as u8).collect();
        s.write(c.name, &bytes)?;
        s.write(
            &part::of(stem(c.name), part::WEIGHT_SCALE),
            &bf16_bytes(&m.scales),
        )?;
        Ok(decoded.then(|| m.dequantize(cols)))
    }
}
