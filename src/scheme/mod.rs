//! Checkpoint schemes: how each quantized checkpoint format stores one linear layer.
//!
//! A scheme owns everything about its format: the tensors one linear layer becomes (names,
//! dtypes, shapes) and those a block adds, the `quantization_config` entry (and ModelOpt's side
//! file), what its encoder needs from calibration, the encoder, the recognition and check of
//! its stored tensors in a checkpoint, and their decode into [`WeightData`] for the runner.
//! The export plan, the runner's loader and the checkpoint check look schemes up ([`of`],
//! [`stored`]) instead of matching on formats, so a new format is one file here, its entry in
//! [`SCHEMES`] and its names in the target list ([`Target`]). GGUF's types have their own one
//! table (`format::gguf::types`).

mod encode;
mod fp8;
mod int8;
mod nvfp4;
mod packed;
pub mod target;

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::format::safetensors::PlannedTensor;
use crate::model::names::{self, part, LinearRole, TensorRole};
use crate::model::Checkpoint;
use crate::numerics::Dtype;
use crate::quant::fp8::WeightMode;
use crate::quant::int8::Int4Method;
use crate::quant::smoothquant::SmoothPlan;

pub use encode::{GptqCache, LinearCtx, Out, PlanKind, Shared, Statistics};
pub use packed::{mixed_config, mixed_tensors, LayerQuant};
pub use target::Target;

/// What the targets of one export need from calibration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Needs {
    /// Per-channel statistics (FP8 static scales, SmoothQuant, clipping search, imatrices).
    pub stats: bool,
    /// Input second-moment matrices (GPTQ); they are too large to save, so `--load-calib`
    /// never provides them.
    pub hessians: bool,
}

impl Needs {
    /// Both needs together.
    pub fn or(self, o: Needs) -> Needs {
        Needs {
            stats: self.stats || o.stats,
            hessians: self.hessians || o.hessians,
        }
    }
}

/// The weight methods an export was asked for (`--fp8-weights`, `--int8-weights`,
/// `--int4-weights`, `--group-size`).
#[derive(Debug, Clone, Copy)]
pub struct Methods {
    pub fp8_weights: WeightMode,
    pub int8_weights: WeightMode,
    pub int4_weights: Int4Method,
    pub group_size: Option<usize>,
    /// `--smooth-alpha` (`None`: searched per input).
    pub smooth_alpha: Option<f64>,
}

/// How the runner is to run a stored layer.
#[derive(Debug, Clone, Copy)]
pub struct LoadRule {
    /// Activations stay unquantized whatever the config says.
    pub weight_only: bool,
    /// The config asks for dynamic activation quantization ([`dynamic_activations`]).
    pub dynamic: bool,
}

/// One checkpoint format.
pub trait Scheme: Sync {
    /// The `--to` targets written in this scheme.
    fn targets(&self) -> &'static [Target];

    /// The tensors linear weight `name` (`[out, in]`) becomes under `t`, in write order.
    fn tensors(
        &self,
        t: Target,
        name: &str,
        shape: &[usize],
        group: Option<usize>,
    ) -> Vec<PlannedTensor>;

    /// Tensors written after linear `role` of block `layer` besides its own (none by default).
    fn after_linear(&self, _t: Target, _layer: usize, _role: LinearRole) -> Vec<PlannedTensor> {
        Vec::new()
    }

    /// The `quantization_config` entry of config.json.
    fn config(&self, t: Target, m: &Methods) -> Value;

    /// Files besides config.json that runtimes read (name, text).
    fn side_files(&self, _t: Target) -> Vec<(&'static str, String)> {
        Vec::new()
    }

    /// What `t`'s encoder needs from calibration under methods `m` (nothing: not calibrated).
    fn needs(&self, t: Target, m: &Methods) -> Needs;

    /// How `t` smooths the block's inputs before its encoder runs (SmoothQuant's or AWQ's
    /// per-channel scales, folded into the norms before each input), if it does.
    fn smoothing(&self, _t: Target, _m: &Methods) -> Option<SmoothPlan> {
        None
    }

    /// Whether `t` calibrates better on the outputs of the blocks already quantized than on
    /// the original model's (`--calib-inputs` default, as measured per mode).
    fn prefers_quantized_inputs(&self, _t: Target, _m: &Methods) -> bool {
        false
    }

    /// Input columns per weight scale under `t` and whether the format fixes it (`None`: one
    /// scale per output channel or per tensor). Every linear input width must be a multiple.
    fn input_group(&self, _t: Target, _m: &Methods) -> Option<(usize, bool)> {
        None
    }

    /// Whether `t`'s encoder needs the largest weight magnitude among the layers that share
    /// the layer's input ([`LinearCtx::group_absmax`]).
    fn shares_tensor_scale(&self, _t: Target) -> bool {
        false
    }

    /// Block `layer`'s KV-cache scales (key, value) as stored in `ck`, if this scheme stores
    /// them.
    fn kv_scales(&self, _ck: &Checkpoint, _layer: usize) -> Result<Option<(f32, f32)>> {
        Ok(None)
    }

    /// Whether stored linear `stem` (its weight `name`) of `ck` is in this scheme.
    fn stores(&self, ck: &Checkpoint, stem: &str, name: &str) -> bool;

    /// Checks the stored tensors of a layer this scheme [`Scheme::stores`] against its shape.
    fn check(&self, ck: &Checkpoint, stem: &str, name: &str, shape: [usize; 2]) -> Result<()>;

    /// The stored layer, decoded for the runner.
    fn load<'a>(
        &self,
        ck: &'a Checkpoint,
        stem: &str,
        name: &str,
        shape: [usize; 2],
        rule: LoadRule,
    ) -> Result<WeightData<'a>>;

    /// Quantizes linear weight `w` for target `out.target` and writes its tensors; returns the
    /// weights the codes stand for when `decoded` (what the block pipeline propagates).
    fn encode(
        &self,
        c: &LinearCtx<'_>,
        out: &mut Out<'_>,
        w: &[f32],
        sh: &mut Shared<'_>,
        decoded: bool,
    ) -> Result<Option<Vec<f32>>>;
}

/// Every checkpoint scheme, in the order stored layers are recognized (NVFP4 and packed
/// integers by their extra tensors before INT8 and FP8 by the weight's dtype).
pub static SCHEMES: [&dyn Scheme; 4] = [&nvfp4::Nvfp4, &packed::Packed, &int8::Int8, &fp8::Fp8];

/// The scheme writing target `t` (`None` for GGUF targets, which have their own sink).
pub fn of(t: Target) -> Option<&'static dyn Scheme> {
    SCHEMES.iter().copied().find(|s| s.targets().contains(&t))
}

/// The scheme linear `stem` of `ck` is stored in (`None`: a float weight).
pub fn stored(ck: &Checkpoint, stem: &str) -> Option<&'static dyn Scheme> {
    ck.config_json.get("quantization_config")?;
    let name = format!("{stem}.weight");
    SCHEMES.iter().copied().find(|s| s.stores(ck, stem, &name))
}

/// Opens checkpoint folder `dir` and checks every linear layer's stored tensors with its
/// scheme (float layers are checked by [`Checkpoint::open`] itself).
pub fn open(dir: &Path) -> Result<Checkpoint> {
    let ck = Checkpoint::open(dir)?;
    for spec in ck.specs() {
        if !matches!(spec.role, TensorRole::Linear(..)) {
            continue;
        }
        let stem = spec
            .name
            .strip_suffix(".weight")
            .ok_or_else(|| Error::Internal(format!("linear {} without .weight", spec.name)))?;
        let shape = [spec.shape[0], spec.shape[1]];
        match stored(&ck, stem) {
            Some(s) => s.check(&ck, stem, &spec.name, shape)?,
            None => ck.check_float(&spec)?,
        }
    }
    Ok(ck)
}

/// Linear layer `role` of block `layer` as stored in `ck`, decoded for the runner.
pub fn load_linear(
    ck: &Checkpoint,
    layer: usize,
    role: LinearRole,
    rule: LoadRule,
) -> Result<WeightData<'_>> {
    let [out, inp] = role.shape(&ck.config);
    let name = names::hf_linear(layer, role);
    let stem = name
        .strip_suffix(".weight")
        .ok_or_else(|| Error::Internal(format!("linear {name} without .weight")))?;
    if let Some(s) = stored(ck, stem) {
        return s.load(ck, stem, &name, [out, inp], rule);
    }
    let (bytes, info) = raw_weight(ck, &name, [out, inp])?;
    Ok(match info.dtype {
        Dtype::BF16 => WeightData::Bf16Bytes(bytes),
        _ => WeightData::F32(ck.read_f32(&name)?),
    })
}

/// Block `layer`'s KV-cache scales, from whichever scheme stores them (none when `rule` keeps
/// activations unquantized).
pub fn kv_scales(ck: &Checkpoint, layer: usize, rule: LoadRule) -> Result<Option<(f32, f32)>> {
    if rule.weight_only {
        return Ok(None);
    }
    for s in SCHEMES {
        if let Some(kv) = s.kv_scales(ck, layer)? {
            return Ok(Some(kv));
        }
    }
    Ok(None)
}

/// Every tensor name a stored linear layer may have (its weight and each suffix), so the
/// runner can let their pages go once the layer is built.
pub fn linear_tensor_names(stem: &str) -> Vec<String> {
    std::iter::once(format!("{stem}.weight"))
        .chain(part::ALL.iter().map(|p| part::of(stem, p)))
        .collect()
}

/// The bytes of weight `name`, which must have `shape`.
pub(crate) fn raw_weight<'a>(
    ck: &'a Checkpoint,
    name: &str,
    [out, inp]: [usize; 2],
) -> Result<(&'a [u8], &'a crate::format::safetensors::TensorInfo)> {
    let (bytes, info) = ck.raw(name)?;
    if info.shape != [out, inp] {
        return Err(mismatch(
            ck,
            name,
            format!("shape [{out}, {inp}]"),
            format!("shape {:?}", info.shape),
        ));
    }
    Ok((bytes, info))
}

/// Stored codes `name` must be `dtype` of shape `want` (`what` says how they are laid out).
pub(crate) fn check_codes(
    ck: &Checkpoint,
    name: String,
    dtype: Dtype,
    want: Vec<usize>,
    what: &str,
) -> Result<()> {
    let Some((f, t)) = ck.info(&name) else {
        return Err(Error::MissingTensor {
            path: ck.dir.clone(),
            tensor: name,
            expected: format!("{dtype} {want:?} ({what})"),
        });
    };
    if t.dtype != dtype || t.shape != want {
        return Err(Error::TensorMismatch {
            path: f.path.clone(),
            tensor: name,
            expected: format!("{dtype} {want:?} ({what})"),
            found: format!("{} {:?}", t.dtype, t.shape),
        });
    }
    Ok(())
}

/// Linear `stem`'s `weight_scale` values: `out` of them, or one when `per_tensor` allows it.
pub(crate) fn channel_scales(
    ck: &Checkpoint,
    stem: &str,
    out: usize,
    per_tensor: bool,
) -> Result<Vec<f32>> {
    let name = part::of(stem, part::WEIGHT_SCALE);
    let scales = ck.read_f32(&name)?;
    if scales.len() != out && !(per_tensor && scales.len() == 1) {
        let expected = if per_tensor {
            format!("{out} per-channel values or 1 per-tensor value")
        } else {
            format!("{out} per-channel values")
        };
        return Err(mismatch(
            ck,
            &name,
            expected,
            format!("{} values", scales.len()),
        ));
    }
    Ok(scales)
}

/// The one value of tensor `name`, if `ck` has it (scales stored as `[]` or `[1]`).
pub(crate) fn scalar(ck: &Checkpoint, name: &str) -> Result<Option<f32>> {
    if !ck.index.contains_key(name) {
        return Ok(None);
    }
    let v = ck.read_f32(name)?;
    match v.as_slice() {
        [x] => Ok(Some(*x)),
        _ => Err(mismatch(
            ck,
            name,
            "one value".into(),
            format!("{} values", v.len()),
        )),
    }
}

/// A stored tensor that is not what its scheme says.
pub(crate) fn mismatch(ck: &Checkpoint, tensor: &str, expected: String, found: String) -> Error {
    Error::TensorMismatch {
        path: ck.dir.clone(),
        tensor: tensor.into(),
        expected,
        found,
    }
}

/// Whether an artifact's config asks for dynamic activation quantization (compressed-tensors
/// `input_activations.dynamic`, or ModelOpt's per-token algorithm).
pub fn dynamic_activations(cfg: &Value) -> bool {
    let Some(q) = cfg.get("quantization_config") else {
        return false;
    };
    if q.get("quant_algo").and_then(|a| a.as_str()) == Some("FP8_PER_CHANNEL_PER_TOKEN") {
        return true;
    }
    q.get("config_groups")
        .and_then(|g| g.as_object())
        .map(|g| {
            g.values().any(|grp| {
                grp.get("input_activations")
                    .and_then(|a| a.get("dynamic"))
                    .and_then(|d| d.as_bool())
                    == Some(true)
            })
        })
        .unwrap_or(false)
}

/// compressed-tensors QuantizationArgs with only the long-lived keys (formats/fp8.md#config).
pub(crate) fn ct_args(
    ty: &str,
    strategy: &str,
    dynamic: bool,
    observer: Option<&str>,
    group_size: Option<usize>,
    bits: u32,
) -> Value {
    serde_json::json!({"actorder": null, "block_structure": null, "dynamic": dynamic, "group_size": group_size, "num_bits": bits,
           "observer": observer, "observer_kwargs": {}, "scale_dtype": null, "strategy": strategy, "symmetric": true,
           "type": ty, "zp_dtype": null})
}

/// A compressed-tensors `quantization_config` with one `Linear` group.
pub(crate) fn ct_config(format: &str, weights: Value, inputs: Value, kv: Value) -> Value {
    serde_json::json!({
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

/// ModelOpt's `hf_quant_config.json` around `quantization`.
pub(crate) fn modelopt_side_file(quantization: Value) -> Vec<(&'static str, String)> {
    let hq = serde_json::json!({
        "producer": {"name": "minitron", "version": crate::VERSION},
        "quantization": quantization,
    });
    vec![(
        "hf_quant_config.json",
        serde_json::to_string_pretty(&hq).expect("json") + "\n",
    )]
}

/// A planned tensor.
pub(crate) fn pt(name: String, dtype: Dtype, shape: Vec<usize>) -> PlannedTensor {
    PlannedTensor { name, dtype, shape }
}

/// `name` without `.weight`.
pub(crate) fn stem(name: &str) -> &str {
    name.strip_suffix(".weight").unwrap_or(name)
}

/// How a runtime quantizes the activations entering an FP8 layer.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ActQuant {
    /// Activations stay in the compute dtype (weight-only kernels, e.g. FP8 Marlin on Ampere).
    None,
    /// Per-token dynamic E4M3: scale = absmax(row) / 448.
    DynamicToken,
    /// One static per-tensor scale from calibration.
    Static(f32),
    /// NVFP4: E2M1 values per 16 with E4M3 group scales under this global scale (a
    /// multiplier), as `quant::nvfp4::quantize_activation_row` rounds them.
    Nvfp4(f32),
}

/// What a loader read for one linear layer `[out, in]`, in its stored form.
pub enum WeightData<'a> {
    /// Little-endian bf16 values.
    Bf16Bytes(&'a [u8]),
    /// Float values (f32 or f16 checkpoints, dequantized W8A16 or ggml float types).
    F32(Vec<f32>),
    /// E4M3 codes with per-channel (`out`) or per-tensor (1) scales, and the runtime's
    /// activation rule.
    Fp8 {
        codes: &'a [u8],
        scales: Vec<f32>,
        act: ActQuant,
    },
    /// INT8 values with per-channel scales; `dynamic`: per-token INT8 activations (W8A8).
    Int8 {
        q: Vec<i8>,
        scales: Vec<f32>,
        dynamic: bool,
    },
    /// NVFP4: E2M1 nibbles `[out, in/2]` and E4M3 group scales `[out, in/16]` (their products,
    /// `e2m1 · e4m3`, are exact in bf16), the per-tensor factor that multiplies them, and the
    /// activation rule ([`ActQuant::Nvfp4`] or none).
    Nvfp4 {
        packed: &'a [u8],
        scales: &'a [u8],
        multiplier: f32,
        act: ActQuant,
    },
    /// compressed-tensors packed integers (W4A16, W8A16): little-endian u32 words of
    /// `32 / bits` values `[out, words · 4]` bytes, f32 group scales `[out, groups]`;
    /// activations untouched (what Marlin computes).
    PackedInt {
        words: &'a [u8],
        scales: Vec<f32>,
        bits: u32,
        groups: usize,
    },
}
