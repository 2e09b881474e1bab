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

/// How one linear layer of a mixed `pack-quantized` checkpoint (`w4a16:auto`) is stored.
/// Layers that runtimes fuse (q, k and v; gate and up) must share one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum LayerQuant {
    /// 4-bit codes, one bf16 scale per `group` input columns.
    Int4 { group: usize },
    /// 8-bit codes, one bf16 scale per output channel.
    Int8,
    /// Left in bf16 (listed in the config's `ignore`).
    Bf16,
}

impl LayerQuant {
    /// The candidates `w4a16:auto` chooses from for layers `cols` wide, smallest first.
    pub fn candidates(cols: usize) -> Vec<LayerQuant> {
        [128, 64, 32]
            .into_iter()
            .filter(|g| cols.is_multiple_of(*g))
            .map(|group| LayerQuant::Int4 { group })
            .chain([LayerQuant::Int8, LayerQuant::Bf16])
            .collect()
    }

    /// Its spelling in recipes and reports: `w4g128`, `w8`, `bf16`.
    pub fn name(self) -> String {
        match self {
            LayerQuant::Int4 { group } => format!("w4g{group}"),
            LayerQuant::Int8 => "w8".into(),
            LayerQuant::Bf16 => "bf16".into(),
        }
    }

    /// Parses [`LayerQuant::name`].
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        let s = s.trim().to_ascii_lowercase();
        match s.as_str() {
            "w8" => Ok(LayerQuant::Int8),
            "bf16" => Ok(LayerQuant::Bf16),
            _ => s
                .strip_prefix("w4g")
                .and_then(|g| g.parse().ok())
                .filter(|&g: &usize| g > 0)
                .map(|group| LayerQuant::Int4 { group })
                .ok_or_else(|| format!("unknown layer type `{s}` (expected w4gN, w8 or bf16)")),
        }
    }

    /// The packed target and its group size (`None` for bf16).
    pub fn target(self) -> Option<(Target, Option<usize>)> {
        match self {
            LayerQuant::Int4 { group } => Some((Target::W4A16, Some(group))),
            LayerQuant::Int8 => Some((Target::Int8W8A16, None)),
            LayerQuant::Bf16 => None,
        }
    }

    /// Bytes of a `[rows, cols]` layer stored this way (codes, scales and shape).
    pub fn bytes(self, rows: usize, cols: usize) -> u64 {
        let (rows, cols) = (rows as u64, cols as u64);
        match self.target() {
            None => rows * cols * 2,
            Some((t, g)) => {
                let per = 32 / t.packed_bits().expect("packed") as u64;
                let groups = g.map_or(1, |g| cols / g as u64);
                rows * cols.div_ceil(per) * 4 + rows * groups * 2 + 16
            }
        }
    }
}

/// The tensors of linear weight `name` stored as `q`.
pub fn mixed_tensors(q: LayerQuant, name: &str, shape: &[usize]) -> Vec<PlannedTensor> {
    match q.target() {
        Some((t, g)) => Packed.tensors(t, name, shape, g),
        None => vec![pt(name.to_owned(), Dtype::BF16, shape.to_vec())],
    }
}

/// The `quantization_config` of a mixed checkpoint: one config group per stored kind, each
/// naming its layers (module names, as compressed-tensors and vLLM match them), bf16 layers
/// and the head in `ignore`. `layers` maps every linear weight name to its kind.
pub fn mixed_config(layers: &std::collections::BTreeMap<String, LayerQuant>, m: &Methods) -> Value {
    use std::collections::BTreeMap;
    let mut kinds: BTreeMap<LayerQuant, Vec<String>> = BTreeMap::new();
    let mut ignore = vec![];
    for (name, q) in layers {
        let module = stem(name).to_owned();
        match q {
            LayerQuant::Bf16 => ignore.push(module),
            _ => kinds.entry(*q).or_default().push(module),
        }
    }
    ignore.push("lm_head".to_owned());
    let mut cfg = ct_config("pack-quantized", Value::Null, Value::Null, Value::Null);
    let mut groups = serde_json::Map::new();
    for (i, (q, modules)) in kinds.into_iter().enumerate() {
        let (t, g) = q.target().expect("quantized");
        let mm = Methods {
            group_size: g,
            ..*m
        };
        let mut grp = Packed.config(t, &mm)["config_groups"]["group_0"].clone();
        grp["targets"] = serde_json::json!(modules);
        groups.insert(format!("group_{i}"), grp);
    }
    cfg["config_groups"] = Value::Object(groups);
    cfg["ignore"] = serde_json::json!(ignore);
    cfg
}

/// Whether compressed-tensors target `t` names module `module` (exact name, `re:` pattern, or
/// the `Linear` class every layer here is).
fn targets_module(t: &str, module: &str) -> bool {
    match t.strip_prefix("re:") {
        Some(p) => regex::Regex::new(p).is_ok_and(|re| re.is_match(module)),
        None => t == module || t == "Linear",
    }
}

/// Bits per code of layer `stem`: the `num_bits` of the first config group whose targets
/// name it (exact names before the `Linear` class), else [`stored_bits`].
fn layer_bits(ck: &Checkpoint, stem: &str) -> Result<u32> {
    let groups = ck
        .config_json
        .pointer("/quantization_config/config_groups")
        .and_then(Value::as_object);
    let names = |g: &Value| -> Vec<String> {
        g.get("targets")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|t| t.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let all: Vec<&Value> = groups.into_iter().flat_map(|g| g.values()).collect();
    let hit = all
        .iter()
        .find(|g| {
            names(g)
                .iter()
                .any(|t| t != "Linear" && targets_module(t, stem))
        })
        .or_else(|| all.iter().find(|g| names(g).iter().any(|t| t == "Linear")));
    let Some(g) = hit else {
        return stored_bits(ck);
    };
    match g.pointer("/weights/num_bits").and_then(Value::as_u64) {
        Some(b @ (4 | 8)) => Ok(b as u32),
        Some(b) => Err(Error::config(
            ck.dir.join("config.json"),
            "quantization_config.config_groups.*.weights.num_bits",
            format!("expected 4 or 8 for pack-quantized weights of {stem}, found {b}"),
        )),
        None => stored_bits(ck),
    }
}

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
        let bits = layer_bits(ck, stem)?;
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
        let bits = layer_bits(ck, stem)?;
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
