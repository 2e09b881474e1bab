//! `minitron-convert MODEL --to TARGET[,TARGET…] --out PATH`: the streaming conversion loop.
//!
//! Every target is a plan (which output tensors, with which dtypes and shapes) applied by one
//! loop over the input's tensors: each input tensor is read once, quantized for every target that
//! needs it, and written to each target's sharded writer. Calibration, when a target needs it,
//! runs once before the loop. Each artifact folder is assembled under a temporary name and
//! renamed when complete, with `minitron-manifest.json` inside.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use serde_json::{json, Value};

use crate::calib::{calibrate, CalibOptions, CalibStats};
use crate::error::{Error, Result};
use crate::format::safetensors_out::{
    begin_dir, commit_dir, sha256_bytes, PlannedTensor, ShardedWriter, WrittenFile,
};
use crate::model::names::{self, InputSite, LinearRole};
use crate::model::synth::MAX_SHARD_BYTES;
use crate::model::{Checkpoint, Dtype};
use crate::quant::fp8::{self, Fp8Matrix, ScaleStyle, WeightMode};

/// An artifact kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// compressed-tensors FP8_DYNAMIC.
    Fp8,
    /// compressed-tensors FP8 with static per-tensor input scales and an FP8 KV cache.
    Fp8Static,
    /// ModelOpt unified HF checkpoint, FP8_PER_CHANNEL_PER_TOKEN.
    Fp8ModelOpt,
    /// compressed-tensors W8A8 INT8 (`int-quantized`) after SmoothQuant.
    Int8,
    /// compressed-tensors weight-only INT8 (`pack-quantized`).
    Int8W8A16,
}

impl Target {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "fp8" => Target::Fp8,
            "fp8-static" => Target::Fp8Static,
            "fp8-modelopt" => Target::Fp8ModelOpt,
            "int8" => Target::Int8,
            "int8-w8a16" => Target::Int8W8A16,
            other => {
                return Err(Error::Invalid(format!(
                    "unknown target `{other}` (available: fp8, fp8-static, fp8-modelopt, int8, int8-w8a16)"
                )))
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Target::Fp8 => "fp8",
            Target::Fp8Static => "fp8-static",
            Target::Fp8ModelOpt => "fp8-modelopt",
            Target::Int8 => "int8",
            Target::Int8W8A16 => "int8-w8a16",
        }
    }

    fn is_fp8(self) -> bool {
        matches!(self, Target::Fp8 | Target::Fp8Static | Target::Fp8ModelOpt)
    }

    fn style(self) -> ScaleStyle {
        match self {
            Target::Fp8ModelOpt => ScaleStyle::ModelOpt,
            _ => ScaleStyle::CompressedTensors,
        }
    }
}

/// Everything a conversion needs besides the input.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    pub targets: Vec<Target>,
    pub out: PathBuf,
    pub force: bool,
    pub fp8_weights: WeightMode,
    /// `rtn` or `gptq` (W8A8 weights, after smoothing).
    pub int8_weights: WeightMode,
    /// SmoothQuant migration strength for `int8` (`None`: choose per layer from a grid).
    pub smooth_alpha: Option<f64>,
    /// Group size for `int8-w8a16` (`None`: one scale per output channel).
    pub group_size: Option<usize>,
    pub calib: CalibOptions,
    pub command_line: String,
}

/// What one artifact holds, for the manifest.
struct Sink {
    target: Target,
    out: PathBuf,
    tmp: PathBuf,
    writer: ShardedWriter,
    errors: BTreeMap<String, f64>,
    /// SmoothQuant α per block (attention input, MLP input), for `int8`.
    alphas: Vec<Value>,
}

/// Output directory of `t`: `out` itself for a single target, `out/<target>` for several.
pub fn target_dir(o: &ConvertOptions, t: Target) -> PathBuf {
    if o.targets.len() == 1 {
        o.out.clone()
    } else {
        o.out.join(t.name())
    }
}

fn linear_plan(t: Target, name: &str, shape: &[usize], group: Option<usize>) -> Vec<PlannedTensor> {
    let stem = name
        .strip_suffix(".weight")
        .expect("linear weights end in .weight");
    let out = shape[0];
    let pt = |n: String, dtype, shape: Vec<usize>| PlannedTensor {
        name: n,
        dtype,
        shape,
    };
    match t {
        Target::Int8 => {
            return vec![
                pt(name.to_owned(), Dtype::I8, shape.to_vec()),
                pt(format!("{stem}.weight_scale"), Dtype::BF16, vec![out, 1]),
            ]
        }
        Target::Int8W8A16 => {
            let groups = group.map_or(1, |g| shape[1] / g);
            return vec![
                pt(
                    format!("{stem}.weight_packed"),
                    Dtype::I32,
                    vec![out, shape[1].div_ceil(4)],
                ),
                pt(
                    format!("{stem}.weight_scale"),
                    Dtype::BF16,
                    vec![out, groups],
                ),
                pt(format!("{stem}.weight_shape"), Dtype::I64, vec![2]),
            ];
        }
        _ => {}
    }
    let mut v = vec![PlannedTensor {
        name: name.to_owned(),
        dtype: Dtype::F8E4M3,
        shape: shape.to_vec(),
    }];
    match t {
        Target::Fp8 => v.push(PlannedTensor {
            name: format!("{stem}.weight_scale"),
            dtype: Dtype::BF16,
            shape: vec![out, 1],
        }),
        Target::Fp8Static => {
            v.push(PlannedTensor {
                name: format!("{stem}.weight_scale"),
                dtype: Dtype::BF16,
                shape: vec![out, 1],
            });
            v.push(PlannedTensor {
                name: format!("{stem}.input_scale"),
                dtype: Dtype::BF16,
                shape: vec![1],
            });
        }
        Target::Fp8ModelOpt => v.push(PlannedTensor {
            name: format!("{stem}.weight_scale"),
            dtype: Dtype::F32,
            shape: vec![out],
        }),
        Target::Int8 | Target::Int8W8A16 => unreachable!("handled above"),
    }
    v
}

fn kv_scale_names(layer: usize) -> [String; 2] {
    [
        format!("model.layers.{layer}.self_attn.k_scale"),
        format!("model.layers.{layer}.self_attn.v_scale"),
    ]
}

/// An input tensor: name, shape, and (layer, role) when it is a block linear weight.
type InputTensor = (String, Vec<usize>, Option<(usize, LinearRole)>);

/// The input tensors in canonical order with their role (None: copied as is).
fn inputs(ck: &Checkpoint) -> Vec<InputTensor> {
    let c = &ck.config;
    let mut v = Vec::new();
    for spec in ck.specs() {
        if !ck.index.contains_key(&spec.name) {
            continue; // a tied lm_head that is absent stays absent
        }
        let role = (0..c.num_hidden_layers)
            .flat_map(|l| LinearRole::ALL.into_iter().map(move |r| (l, r)))
            .find(|&(l, r)| names::hf_linear(l, r) == spec.name);
        v.push((spec.name, spec.shape, role));
    }
    v
}

fn plan(t: Target, ck: &Checkpoint, group: Option<usize>) -> Vec<PlannedTensor> {
    let mut v = Vec::new();
    for (name, shape, role) in inputs(ck) {
        match role {
            Some((l, r)) => {
                v.extend(linear_plan(t, &name, &shape, group));
                if t == Target::Fp8Static && r == LinearRole::V {
                    for n in kv_scale_names(l) {
                        v.push(PlannedTensor {
                            name: n,
                            dtype: Dtype::BF16,
                            shape: vec![1],
                        });
                    }
                }
            }
            None => {
                let (_, info) = ck.info(&name).expect("listed");
                v.push(PlannedTensor {
                    name,
                    dtype: info.dtype,
                    shape: shape.clone(),
                });
            }
        }
    }
    v
}

fn bf16_bytes(v: &[f32]) -> Vec<u8> {
    crate::numerics::convert::f32_to_bf16_bytes(v)
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
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

/// Runs the conversion; returns each artifact's manifest.
pub fn run(
    ck: &Checkpoint,
    o: &ConvertOptions,
    device: &candle_core::Device,
    progress: &dyn Fn(u64, u64),
) -> Result<Vec<Value>> {
    if o.targets.is_empty() {
        return Err(Error::Invalid("--to needs at least one target".into()));
    }
    if let Some(g) = o.group_size {
        let c = &ck.config;
        let widths = [c.hidden_size, c.q_dim(), c.intermediate_size];
        if g == 0 || widths.iter().any(|w| w % g != 0) {
            return Err(Error::Invalid(format!(
                "--group-size {g} must divide every linear layer's input width ({widths:?})"
            )));
        }
    }
    let t0 = Instant::now();
    let has_fp8 = o.targets.iter().any(|t| t.is_fp8());
    let needs_calib = o.targets.contains(&Target::Fp8Static)
        || o.targets.contains(&Target::Int8)
        || (has_fp8 && o.fp8_weights != WeightMode::Rtn);
    let stats = if needs_calib {
        Some(calibrate(ck, &o.calib, device)?)
    } else {
        None
    };
    let int8_gptq = o.targets.contains(&Target::Int8) && o.int8_weights == WeightMode::Gptq;
    let hessians = if (has_fp8 && o.fp8_weights == WeightMode::Gptq) || int8_gptq {
        Some(crate::calib::hessians(ck, &o.calib, device)?)
    } else {
        None
    };
    let input_hashes = ck.input_hashes()?;

    let mut sinks = Vec::new();
    for &t in &o.targets {
        let out = target_dir(o, t);
        if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        let tmp = begin_dir(&out, o.force)?;
        let writer = ShardedWriter::create(&tmp, plan(t, ck, o.group_size), MAX_SHARD_BYTES)?;
        sinks.push(Sink {
            target: t,
            out,
            tmp,
            writer,
            errors: BTreeMap::new(),
            alphas: Vec::new(),
        });
    }
    let dirs: Vec<(PathBuf, PathBuf)> = sinks
        .iter()
        .map(|s| (s.tmp.clone(), s.out.clone()))
        .collect();
    let result = convert_loop(
        ck,
        o,
        stats.as_ref(),
        hessians.as_ref(),
        &mut sinks,
        progress,
    );
    let result = result.and_then(|()| {
        let mut manifests = Vec::new();
        for s in sinks.drain(..) {
            manifests.push(finish_sink(ck, o, stats.as_ref(), s, &input_hashes, t0)?);
        }
        Ok(manifests)
    });
    if result.is_err() {
        for (tmp, _) in &dirs {
            let _ = std::fs::remove_dir_all(tmp);
        }
    }
    let manifests = result?;
    for (tmp, out) in &dirs {
        commit_dir(tmp, out)?;
    }
    Ok(manifests)
}

/// A GPTQ factor cached for one (layer, site): key, E[x xᵀ], inverse factor.
type GptqFactor = ((usize, usize), Vec<f64>, crate::quant::gptq::GptqPlan);

fn convert_loop(
    ck: &Checkpoint,
    o: &ConvertOptions,
    stats: Option<&CalibStats>,
    hessians: Option<&crate::calib::hessian::Hessians>,
    sinks: &mut [Sink],
    progress: &dyn Fn(u64, u64),
) -> Result<()> {
    let items = inputs(ck);
    // GPTQ factor of the last (layer, site): q/k/v and gate/up share one.
    let mut factor: Option<GptqFactor> = None;
    // The same for the smoothed inputs INT8 weights see.
    let mut int8_factor: Option<((usize, usize), crate::quant::gptq::GptqPlan)> = None;
    let total: u64 = items
        .iter()
        .map(|(_, s, _)| s.iter().product::<usize>() as u64)
        .sum();
    let mut done = 0u64;
    let want_smooth = sinks.iter().any(|s| s.target == Target::Int8);
    let mut smooth: Option<crate::quant::smoothquant::LayerSmoothing> = None;
    for (name, shape, role) in &items {
        let norm_of = (0..ck.config.num_hidden_layers).find_map(|l| {
            if *name == names::hf_input_norm(l) {
                Some((l, InputSite::AttnIn))
            } else if *name == names::hf_post_norm(l) {
                Some((l, InputSite::MlpIn))
            } else {
                None
            }
        });
        let layer_of = role.map(|(l, _)| l).or(norm_of.map(|(l, _)| l));
        if let (true, Some(l)) = (want_smooth, layer_of) {
            if smooth.as_ref().map(|s| s.layer) != Some(l) {
                let st = stats.ok_or_else(|| Error::Invalid("int8 needs calibration".into()))?;
                let plan = crate::quant::smoothquant::SmoothPlan::from_alpha(o.smooth_alpha);
                let sm = crate::quant::smoothquant::LayerSmoothing::compute(
                    ck,
                    &st.activations(l),
                    l,
                    plan,
                )?;
                let mut entry = serde_json::Map::new();
                entry.insert("layer".into(), json!(l));
                for site in InputSite::ALL {
                    if let Some(a) = sm.alpha(site) {
                        entry.insert(site.name().into(), json!(a));
                    }
                }
                for s in sinks.iter_mut().filter(|s| s.target == Target::Int8) {
                    s.alphas.push(Value::Object(entry.clone()));
                }
                smooth = Some(sm);
            }
        }
        match role {
            None => {
                let (f, _) = ck.info(name).expect("listed");
                let bytes = f.bytes(name).expect("listed");
                for s in sinks.iter_mut() {
                    match (s.target, norm_of, smooth.as_ref()) {
                        (Target::Int8, Some((_, site)), Some(sm)) => {
                            let g = ck.read_f32(name)?;
                            s.writer
                                .write(name, &bf16_bytes(&sm.smooth_norm(site, &g)))?;
                        }
                        _ => s.writer.write(name, bytes)?,
                    }
                }
            }
            Some((layer, r)) => {
                let w = ck.read_f32(name)?;
                let cols = shape[1];
                let site = stats.map(|st| st.site(*layer, r.site()));
                let importance: Option<Vec<f64>> = site.map(|s| s.mean_sq());
                // Quantize once per distinct (style, mode); targets share the result.
                let mut cache: Vec<(ScaleStyle, Fp8Matrix, Vec<f32>)> = Vec::new();
                for s in sinks.iter_mut() {
                    let stem = name.strip_suffix(".weight").expect("weight");
                    match s.target {
                        Target::Int8 => {
                            let sm = smooth.as_ref().expect("computed for this layer");
                            let ws = sm.smooth_weight(*r, &w, cols);
                            let m = match (o.int8_weights, hessians) {
                                (WeightMode::Gptq, Some(h)) => {
                                    let key = (*layer, r.site().index());
                                    if int8_factor.as_ref().map(|f| f.0) != Some(key) {
                                        // Second moments of the smoothed input x/s.
                                        let n = h.count.max(1) as f64;
                                        let s = sm.factors[key.1].as_deref();
                                        let f = |j: usize| s.map_or(1.0, |s| s[j] as f64);
                                        let mean: Vec<f64> = h.sums[key.0][key.1]
                                            .iter()
                                            .enumerate()
                                            .map(|(ij, v)| v / n / (f(ij / cols) * f(ij % cols)))
                                            .collect();
                                        let u =
                                            crate::quant::gptq::GptqPlan::new(&mean, cols, 0.01)?;
                                        int8_factor = Some((key, u));
                                    }
                                    let (_, u) = int8_factor.as_ref().expect("just set");
                                    crate::quant::int8::quantize_gptq(&ws, cols, u)
                                }
                                _ => crate::quant::int8::quantize(&ws, cols, None),
                            };
                            s.errors
                                .insert(name.clone(), fp8::relative_rms(&ws, &m.dequantize(cols)));
                            let bytes: Vec<u8> = m.q.iter().map(|&v| v as u8).collect();
                            s.writer.write(name, &bytes)?;
                            s.writer
                                .write(&format!("{stem}.weight_scale"), &bf16_bytes(&m.scales))?;
                            continue;
                        }
                        Target::Int8W8A16 => {
                            let m = crate::quant::int8::quantize(&w, cols, o.group_size);
                            s.errors
                                .insert(name.clone(), fp8::relative_rms(&w, &m.dequantize(cols)));
                            s.writer.write(
                                &format!("{stem}.weight_packed"),
                                &crate::quant::int8::pack(&m.q, cols),
                            )?;
                            s.writer
                                .write(&format!("{stem}.weight_scale"), &bf16_bytes(&m.scales))?;
                            let shape_bytes: Vec<u8> = [shape[0] as i64, cols as i64]
                                .iter()
                                .flat_map(|v| v.to_le_bytes())
                                .collect();
                            s.writer
                                .write(&format!("{stem}.weight_shape"), &shape_bytes)?;
                            continue;
                        }
                        _ => {}
                    }
                    let style = s.target.style();
                    if !cache.iter().any(|(st, _, _)| *st == style) {
                        let m = match hessians {
                            Some(h) => {
                                let key = (*layer, r.site().index());
                                if factor.as_ref().map(|f| f.0) != Some(key) {
                                    let n = h.count.max(1) as f64;
                                    let mean: Vec<f64> =
                                        h.sums[key.0][key.1].iter().map(|v| v / n).collect();
                                    let u = crate::quant::gptq::GptqPlan::new(&mean, cols, 0.01)?;
                                    factor = Some((key, mean, u));
                                }
                                let (_, mean, u) = factor.as_ref().expect("just set");
                                fp8::quantize_gptq(&w, cols, style, mean, u)
                            }
                            None => {
                                fp8::quantize(&w, cols, style, o.fp8_weights, importance.as_deref())
                            }
                        };
                        let deq = m.dequantize(cols);
                        cache.push((style, m, deq));
                    }
                    let (_, m, deq) = cache
                        .iter()
                        .find(|(st, _, _)| *st == style)
                        .expect("cached");
                    s.errors.insert(name.clone(), fp8::relative_rms(&w, deq));
                    s.writer.write(name, &m.codes)?;
                    match s.target {
                        Target::Fp8 => s
                            .writer
                            .write(&format!("{stem}.weight_scale"), &bf16_bytes(&m.scales))?,
                        Target::Fp8Static => {
                            s.writer
                                .write(&format!("{stem}.weight_scale"), &bf16_bytes(&m.scales))?;
                            let site = site.ok_or_else(|| {
                                Error::Invalid("fp8-static needs calibration".into())
                            })?;
                            // q/k/v (and gate/up) share one input, so the per-tensor scale is
                            // already the max over the fused group that runtimes take.
                            let scale = fp8_static_scale(site.tensor_absmax());
                            s.writer
                                .write(&format!("{stem}.input_scale"), &bf16_bytes(&[scale]))?;
                            if *r == LinearRole::V {
                                let ls = &stats.expect("calibrated").layers[*layer];
                                let [kn, vn] = kv_scale_names(*layer);
                                s.writer
                                    .write(&kn, &bf16_bytes(&[fp8_static_scale(ls.k_absmax)]))?;
                                s.writer
                                    .write(&vn, &bf16_bytes(&[fp8_static_scale(ls.v_absmax)]))?;
                            }
                        }
                        Target::Fp8ModelOpt => s
                            .writer
                            .write(&format!("{stem}.weight_scale"), &f32_bytes(&m.scales))?,
                        Target::Int8 | Target::Int8W8A16 => unreachable!("handled above"),
                    }
                }
            }
        }
        ck.release(name);
        done += shape.iter().product::<usize>() as u64;
        progress(done, total);
    }
    Ok(())
}

/// compressed-tensors QuantizationArgs with only the long-lived keys (formats/fp8.md#config).
fn ct_args(
    ty: &str,
    strategy: &str,
    dynamic: bool,
    observer: Option<&str>,
    group_size: Option<usize>,
) -> Value {
    json!({"actorder": null, "block_structure": null, "dynamic": dynamic, "group_size": group_size, "num_bits": 8,
           "observer": observer, "observer_kwargs": {}, "strategy": strategy, "symmetric": true, "type": ty})
}

/// A compressed-tensors `quantization_config` with one `Linear` group.
fn ct_config(format: &str, weights: Value, inputs: Value, kv: Value) -> Value {
    json!({
        "config_groups": {"group_0": {
            "format": format,
            "input_activations": inputs,
            "output_activations": null,
            "targets": ["Linear"],
            "weights": weights,
        }},
        "format": format,
        "global_compression_ratio": null,
        "ignore": ["lm_head"],
        "kv_cache_scheme": kv,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": "0.19.0"
    })
}

/// The `quantization_config` block of config.json (formats/fp8.md#config, formats/int8.md).
pub fn quantization_config(t: Target, group: Option<usize>) -> Value {
    let weights = |ty| ct_args(ty, "channel", false, Some("memoryless_minmax"), None);
    let static_fp8 = || ct_args("float", "tensor", false, Some("static_minmax"), None);
    match t {
        Target::Fp8 => ct_config(
            "float-quantized",
            weights("float"),
            ct_args("float", "token", true, None, None),
            Value::Null,
        ),
        Target::Fp8Static => ct_config(
            "float-quantized",
            weights("float"),
            static_fp8(),
            static_fp8(),
        ),
        Target::Int8 => ct_config(
            "int-quantized",
            weights("int"),
            ct_args("int", "token", true, None, None),
            Value::Null,
        ),
        Target::Int8W8A16 => {
            let strategy = if group.is_some() { "group" } else { "channel" };
            let w = ct_args("int", strategy, false, Some("memoryless_minmax"), group);
            ct_config("pack-quantized", w, Value::Null, Value::Null)
        }
        Target::Fp8ModelOpt => json!({
            "quant_method": "modelopt",
            "quant_algo": "FP8_PER_CHANNEL_PER_TOKEN",
            "kv_cache_scheme": null,
            "ignore": ["lm_head"],
            "producer": {"name": "minitron", "version": crate::VERSION}
        }),
    }
}

const COPIED_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

fn finish_sink(
    ck: &Checkpoint,
    o: &ConvertOptions,
    stats: Option<&CalibStats>,
    s: Sink,
    input_hashes: &[(String, String)],
    t0: Instant,
) -> Result<Value> {
    let mut files: Vec<WrittenFile> = s.writer.finish()?;
    let write = |name: &str, text: String, files: &mut Vec<WrittenFile>| -> Result<()> {
        let p = s.tmp.join(name);
        std::fs::write(&p, &text).map_err(|e| Error::io(&p, e))?;
        files.push(WrittenFile {
            file: name.into(),
            bytes: text.len() as u64,
            sha256: sha256_bytes(text.as_bytes()),
        });
        Ok(())
    };
    let mut cfg = ck.config_json.clone();
    cfg["quantization_config"] = quantization_config(s.target, o.group_size);
    write(
        "config.json",
        serde_json::to_string_pretty(&cfg).expect("json") + "\n",
        &mut files,
    )?;
    if s.target == Target::Fp8ModelOpt {
        let hq = json!({
            "producer": {"name": "minitron", "version": crate::VERSION},
            "quantization": {"quant_algo": "FP8_PER_CHANNEL_PER_TOKEN", "kv_cache_quant_algo": null, "exclude_modules": ["lm_head"]}
        });
        write(
            "hf_quant_config.json",
            serde_json::to_string_pretty(&hq).expect("json") + "\n",
            &mut files,
        )?;
    }
    for f in COPIED_FILES {
        let src = ck.dir.join(f);
        if src.exists() {
            let dst = s.tmp.join(f);
            std::fs::copy(&src, &dst).map_err(|e| Error::io(&dst, e))?;
            let sha = crate::model::checkpoint::sha256_file(&dst)?;
            files.push(WrittenFile {
                file: f.into(),
                bytes: std::fs::metadata(&dst).map(|m| m.len()).unwrap_or(0),
                sha256: sha,
            });
        }
    }
    let worst = s
        .errors
        .iter()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(k, v)| json!({"tensor": k, "relative_rms": v}));
    let manifest = json!({
        "tool": "minitron-convert",
        "version": crate::VERSION,
        "command_line": o.command_line,
        "target": s.target.name(),
        "fp8_weights": o.fp8_weights.name(),
        "int8_weights": o.int8_weights.name(),
        "input": {"dir": ck.dir.display().to_string(), "sha256": input_hashes.iter().cloned().collect::<BTreeMap<_, _>>()},
        "calibration": stats.map(|st| json!(st.info)),
        "quantization_config": quantization_config(s.target, o.group_size),
        "files": files,
        "total_bytes": files.iter().map(|f| f.bytes).sum::<u64>(),
        "smoothquant": if s.target == Target::Int8 {
            json!({"alpha": o.smooth_alpha.map_or(json!("auto"), |a| json!(a)), "per_layer": s.alphas})
        } else {
            Value::Null
        },
        "tensor_error": {"metric": "relative RMS of dequantized vs bf16 weights", "worst": worst, "per_tensor": s.errors},
        "wall_s": t0.elapsed().as_secs_f64(),
    });
    let text = serde_json::to_string_pretty(&manifest).expect("json") + "\n";
    let p = s.tmp.join("minitron-manifest.json");
    std::fs::write(&p, text).map_err(|e| Error::io(&p, e))?;
    Ok(manifest)
}
