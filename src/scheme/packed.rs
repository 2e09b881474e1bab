//! compressed-tensors `pack-quantized` integers (formats/int8.md#w8a16, #w4a16): weight-only
//! INT8 (`int8-w8a16`) and INT4 (`w4a16`), `bits`-bit codes packed `32 / bits` to a
//! little-endian int32 (`weight_packed`), bf16 scales per channel or per group
//! (`weight_scale`), the logical shape (`weight_shape`); activations untouched.

use serde_json::Value;

use super::encode::{bf16_bytes, PlanKind};
use super::{
    ct_args, ct_config, mismatch, pt, stem, LinearCtx, LoadRule, Methods, Needs, Out, Scheme,
    Shared, Target, WeightData,
};
use crate::error::{Error, Result};
use crate::format::safetensors::PlannedTensor;
use crate::model::names::part;
use crate::model::Checkpoint;
use crate::numerics::Dtype;
use crate::quant::int8::{Int4Method, Int8Matrix};
use crate::quant::smoothquant::SmoothPlan;

pub struct Packed;

/// Bits per code of a `pack-quantized` checkpoint: the `num_bits` of its
/// `quantization_config` weights (8 when the config does not say). Only 4 and 8 are read.
fn stored_bits(ck: &Checkpoint) -> Result<u32> {
    let groups = ck
        .config_json
        .pointer("/quantization_config/config_groups")
        .and_then(Value::as_object);
    let bits = groups
        .into_iter()
        .flat_map(|g| g.values())
        .filter_map(|g| g.pointer("/weights/num_bits").and_then(Value::as_u64))
        .next()
        .unwrap_or(8);
    match bits {
        4 | 8 => Ok(bits as u32),
        b => Err(Error::config(
            ck.dir.join("config.json"),
            "quantization_config.config_groups.*.weights.num_bits",
            format!("expected 4 or 8 for pack-quantized weights, found {b}"),
        )),
    }
}

impl Scheme for Packed {
    fn targets(&self) -> &'static [Target] {
        &[Target::Int8W8A16, Target::W4A16]
    }

    fn tensors(
        &self,
        t: Target,
        name: &str,
        shape: &[usize],
        group: Option<usize>,
    ) -> Vec<PlannedTensor> {
        let stem = stem(name);
        let out = shape[0];
        let per_word = 32 / t.packed_bits().expect("packed") as usize;
        let groups = t.group(group).map_or(1, |g| shape[1] / g);
        vec![
            pt(
                part::of(stem, part::WEIGHT_PACKED),
                Dtype::I32,
                vec![out, shape[1].div_ceil(per_word)],
            ),
            pt(
                part::of(stem, part::WEIGHT_SCALE),
                Dtype::BF16,
                vec![out, groups],
            ),
            pt(part::of(stem, part::WEIGHT_SHAPE), Dtype::I64, vec![2]),
        ]
    }

    fn config(&self, t: Target, m: &Methods) -> Value {
        let group = t.group(m.group_size);
        let strategy = if group.is_some() { "group" } else { "channel" };
        let bits = t.packed_bits().expect("packed");
        // Scales chosen by error search rather than the absmax name the `mse` observer.
        let searched = t == Target::W4A16 && m.int4_weights != Int4Method::Rtn;
        let observer = if searched { "mse" } else { "memoryless_minmax" };
        let w = ct_args("int", strategy, false, Some(observer), group, bits);
        ct_config("pack-quantized", w, Value::Null, Value::Null)
    }

    fn needs(&self, t: Target, m: &Methods) -> Needs {
        let w4 = t == Target::W4A16;
        Needs {
            stats: w4 && m.int4_weights == Int4Method::Awq,
            hessians: w4 && m.int4_weights == Int4Method::Gptq,
        }
    }

    fn smoothing(&self, t: Target, m: &Methods) -> Option<SmoothPlan> {
        match (t.group(m.group_size), m.int4_weights) {
            (Some(g), Int4Method::Awq) if t == Target::W4A16 => Some(SmoothPlan::awq(g)),
            _ => None,
        }
    }

    /// Measured on SmolLM2 (README): AWQ 0.952× the mean KLD of original inputs; GPTQ's were
    /// 1.0–1.05× and unstable across builds.
    fn prefers_quantized_inputs(&self, t: Target, m: &Methods) -> bool {
        t == Target::W4A16 && m.int4_weights == Int4Method::Awq
    }

    fn input_group(&self, t: Target, m: &Methods) -> Option<(usize, bool)> {
        t.group(m.group_size).map(|g| (g, false))
    }

    fn stores(&self, ck: &Checkpoint, stem: &str, _: &str) -> bool {
        ck.index.contains_key(&part::of(stem, part::WEIGHT_PACKED))
    }

    fn check(&self, ck: &Checkpoint, stem: &str, _: &str, shape: [usize; 2]) -> Result<()> {
        let bits = stored_bits(ck)?;
        let per = 32 / bits as usize;
        super::check_codes(
            ck,
            part::of(stem, part::WEIGHT_PACKED),
            Dtype::I32,
            vec![shape[0], shape[1].div_ceil(per)],
            &format!("{bits}-bit values packed {per} per word"),
        )
    }

    /// Packed integers and group scales, activations untouched (what Marlin computes); the
    /// CPU forms dequantize them, the GPU form keeps them packed.
    fn load<'a>(
        &self,
        ck: &'a Checkpoint,
        stem: &str,
        _: &str,
        [out, inp]: [usize; 2],
        _: LoadRule,
    ) -> Result<WeightData<'a>> {
        let packed = part::of(stem, part::WEIGHT_PACKED);
        let scale_name = part::of(stem, part::WEIGHT_SCALE);
        let (bytes, _) = ck.raw(&packed)?;
        let bits = stored_bits(ck)?;
        let words = inp.div_ceil((32 / bits) as usize);
        if bytes.len() != out * words * 4 {
            return Err(mismatch(
                ck,
                &packed,
                format!("{} bytes ([{out}, {words}] i32 words)", out * words * 4),
                format!("{} bytes", bytes.len()),
            ));
        }
        let scales = ck.read_f32(&scale_name)?;
        let groups = scales.len() / out;
        if groups == 0 || scales.len() % out != 0 || inp % groups != 0 {
            return Err(mismatch(
                ck,
                &scale_name,
                format!("[{out}, groups] with groups dividing {inp}"),
                format!("{} values", scales.len()),
            ));
        }
        Ok(WeightData::PackedInt {
            words: bytes,
            scales,
            bits,
            groups,
        })
    }

    fn encode(
        &self,
        c: &LinearCtx<'_>,
        s: &mut Out<'_>,
        w: &[f32],
        sh: &mut Shared<'_>,
        decoded: bool,
    ) -> Result<Option<Vec<f32>>> {
        let cols = c.shape[1];
        let bits = s.target.packed_bits().expect("packed");
        let (m, ws) = if s.target == Target::W4A16 {
            w4a16(c, s.target, w, sh)?
        } else {
            (crate::quant::int8::quantize(w, cols, c.m.group_size), None)
        };
        // The error is against the (scaled) weights the codes stand for.
        let wr = ws.as_deref().unwrap_or(w);
        let stem = stem(c.name);
        s.error(c.name, m.relative_rms(wr, cols));
        s.write(
            &part::of(stem, part::WEIGHT_PACKED),
            &crate::quant::int8::pack_bits(&m.q, cols, bits),
        )?;
        s.write(&part::of(stem, part::WEIGHT_SCALE), &bf16_bytes(&m.scales))?;
        let dims: Vec<u8> = [c.shape[0] as i64, cols as i64]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        s.write(&part::of(stem, part::WEIGHT_SHAPE), &dims)?;
        Ok(decoded.then(|| m.dequantize(cols)))
    }
}

/// W4A16's codes: RTN, GPTQ (scales searched under the factor's error weights, then refitted)
/// or AWQ (scaled weights, clipping searched under the scaled inputs' importance); with AWQ
/// also the scaled weights the codes stand for.
fn w4a16(
    c: &LinearCtx<'_>,
    t: Target,
    w: &[f32],
    sh: &mut Shared<'_>,
) -> Result<(Int8Matrix, Option<Vec<f32>>)> {
    let (cols, layer, r) = (c.shape[1], c.layer, c.role);
    let group = t.group(c.m.group_size);
    Ok(match c.m.int4_weights {
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
            let sm = c.smooth(t)?;
            let ws = sm.smooth_weight(r, w, cols);
            // AWQ's clipping step: group scales searched under the importance of the scaled
            // inputs x / s, E[x²] / s².
            let mut imp = c.stats(t)?.mean_sq(layer, r.site());
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
    })
}
