//! NVFP4 (formats/nvfp4.md): E2M1 codes two to a byte, E4M3 scales per 16 values and a
//! per-tensor scale, in compressed-tensors' layout (`nvfp4`, `nvfp4-a16`: `weight_packed`,
//! `weight_global_scale`, `input_global_scale`) or ModelOpt's (`nvfp4-modelopt`: codes under
//! the weight's own name, `weight_scale_2`, `input_scale`, 0-dimensional scalars).

use serde_json::{json, Value};

use super::encode::f32_bytes;
use super::{
    ct_config, mismatch, pt, scalar, stem, ActQuant, LinearCtx, LoadRule, Methods, Needs, Out,
    Scheme, Shared, Target, WeightData,
};
use crate::error::{Error, Result};
use crate::format::safetensors::PlannedTensor;
use crate::model::names::part;
use crate::model::Checkpoint;
use crate::numerics::Dtype;
use crate::quant::nvfp4::{self, Flavor, GROUP};

pub struct Nvfp4;

/// The tensor names of `flavor`'s layout: (codes, tensor scale, activation scale).
fn names(stem: &str, name: &str, flavor: Flavor) -> (String, String, String) {
    match flavor {
        Flavor::ModelOpt => (
            name.to_owned(),
            part::of(stem, part::WEIGHT_SCALE_2),
            part::of(stem, part::INPUT_SCALE),
        ),
        Flavor::CompressedTensors => (
            part::of(stem, part::WEIGHT_PACKED),
            part::of(stem, part::WEIGHT_GLOBAL_SCALE),
            part::of(stem, part::INPUT_GLOBAL_SCALE),
        ),
    }
}

/// Whose NVFP4 layout stored linear `stem` is in, if NVFP4.
fn stored_flavor(ck: &Checkpoint, stem: &str) -> Option<Flavor> {
    if ck
        .index
        .contains_key(&part::of(stem, part::WEIGHT_GLOBAL_SCALE))
    {
        Some(Flavor::CompressedTensors)
    } else if ck.index.contains_key(&part::of(stem, part::WEIGHT_SCALE_2)) {
        Some(Flavor::ModelOpt)
    } else {
        None
    }
}

impl Scheme for Nvfp4 {
    fn targets(&self) -> &'static [Target] {
        &[Target::Nvfp4, Target::Nvfp4A16, Target::Nvfp4ModelOpt]
    }

    fn tensors(
        &self,
        t: Target,
        name: &str,
        shape: &[usize],
        _: Option<usize>,
    ) -> Vec<PlannedTensor> {
        let stem = stem(name);
        let flavor = t.nvfp4().expect("NVFP4 target");
        let (codes, tensor, input) = names(stem, name, flavor);
        let packed = vec![shape[0], shape[1] / 2];
        let scales = vec![shape[0], shape[1] / GROUP];
        // ModelOpt's per-tensor scales are 0-dimensional.
        let scalar = if flavor == Flavor::ModelOpt {
            vec![]
        } else {
            vec![1]
        };
        let mut v = vec![
            pt(codes, Dtype::U8, packed),
            pt(part::of(stem, part::WEIGHT_SCALE), Dtype::F8E4M3, scales),
            pt(tensor, Dtype::F32, scalar.clone()),
        ];
        if t.nvfp4_activations() {
            v.push(pt(input, Dtype::F32, scalar));
        }
        v
    }

    fn config(&self, t: Target, _: &Methods) -> Value {
        if t == Target::Nvfp4ModelOpt {
            let args =
                json!({"dynamic": false, "num_bits": 4, "type": "float", "group_size": GROUP});
            return json!({
                "config_groups": {"group_0": {
                    "input_activations": args,
                    "weights": args,
                    "targets": ["Linear"],
                }},
                // ModelOpt lists the embedding among the modules it leaves alone.
                "ignore": ["lm_head", "model.embed_tokens"],
                "quant_algo": "NVFP4",
                "producer": {"name": "minitron", "version": crate::VERSION},
                "quant_method": "modelopt"
            });
        }
        let args = |dynamic: Value, observer: &str| {
            json!({"actorder": null, "block_structure": null, "dynamic": dynamic,
                   "group_size": GROUP, "num_bits": 4,
                   "observer": observer, "observer_kwargs": {},
                   "scale_dtype": "torch.float8_e4m3fn", "strategy": "tensor_group",
                   "symmetric": true, "type": "float", "zp_dtype": null})
        };
        let inputs = if t.nvfp4_activations() {
            args(json!("local"), "static_minmax")
        } else {
            Value::Null
        };
        ct_config(
            "nvfp4-pack-quantized",
            args(json!(false), "memoryless_minmax"),
            inputs,
            Value::Null,
        )
    }

    fn side_files(&self, t: Target) -> Vec<(&'static str, String)> {
        if t != Target::Nvfp4ModelOpt {
            return Vec::new();
        }
        super::modelopt_side_file(json!({"quant_algo": "NVFP4", "kv_cache_quant_algo": null,
                                         "group_size": GROUP,
                                         "exclude_modules": ["lm_head", "model.embed_tokens"]}))
    }

    fn needs(&self, t: Target, _: &Methods) -> Needs {
        Needs {
            stats: t.nvfp4_activations(),
            hessians: false,
        }
    }

    fn input_group(&self, _: Target, _: &Methods) -> Option<(usize, bool)> {
        Some((GROUP, true))
    }

    fn shares_tensor_scale(&self, _: Target) -> bool {
        true
    }

    fn stores(&self, ck: &Checkpoint, stem: &str, _: &str) -> bool {
        stored_flavor(ck, stem).is_some()
    }

    /// Codes must be U8 `[out, in / 2]` for a layer of shape `[out, in]`.
    fn check(&self, ck: &Checkpoint, stem: &str, name: &str, shape: [usize; 2]) -> Result<()> {
        let flavor = stored_flavor(ck, stem).expect("stores() found it");
        let (codes, _, _) = names(stem, name, flavor);
        let what = "two FP4 codes per byte";
        if !shape[1].is_multiple_of(2) {
            return Err(Error::Invalid(format!(
                "{}: NVFP4 layer {stem} has an odd input width {}",
                ck.dir.display(),
                shape[1]
            )));
        }
        super::check_codes(ck, codes, Dtype::U8, vec![shape[0], shape[1] / 2], what)
    }

    /// Codes as E2M1 values times their E4M3 group scales; the tensor scale and the activation
    /// rule as the runtimes apply them.
    fn load<'a>(
        &self,
        ck: &'a Checkpoint,
        stem: &str,
        name: &str,
        [out, inp]: [usize; 2],
        rule: LoadRule,
    ) -> Result<WeightData<'a>> {
        let flavor = stored_flavor(ck, stem).expect("stores() found it");
        let (codes, tensor, input) = names(stem, name, flavor);
        let scale_name = part::of(stem, part::WEIGHT_SCALE);
        let (bytes, _) = ck.raw(&codes)?;
        let (sbytes, sinfo) = ck.raw(&scale_name)?;
        let want = [out, inp / GROUP];
        if sinfo.dtype != Dtype::F8E4M3 || sinfo.shape != want {
            return Err(mismatch(
                ck,
                &scale_name,
                format!("F8_E4M3 {want:?} (one scale per {GROUP} values)"),
                format!("{} {:?}", sinfo.dtype, sinfo.shape),
            ));
        }
        let tensor = scalar(ck, &tensor)?.expect("stores() found it");
        let act = match scalar(ck, &input)? {
            Some(v) if !rule.weight_only => ActQuant::Nvfp4(nvfp4::act_multiplier(v, flavor)),
            _ => ActQuant::None,
        };
        Ok(WeightData::Nvfp4 {
            packed: bytes,
            scales: sbytes,
            multiplier: nvfp4::decode_multiplier(tensor, flavor),
            act,
        })
    }

    /// Codes, group scales, the tensor scale shared by the layers of one input, and the
    /// activation scale when activations are quantized.
    fn encode(
        &self,
        c: &LinearCtx<'_>,
        s: &mut Out<'_>,
        w: &[f32],
        _: &mut Shared<'_>,
        decoded: bool,
    ) -> Result<Option<Vec<f32>>> {
        let t = s.target;
        let (cols, name) = (c.shape[1], c.name);
        let stem = stem(name);
        let flavor = t
            .nvfp4()
            .ok_or_else(|| Error::Internal(format!("{t} is not NVFP4")))?;
        let amax = c
            .group_absmax
            .ok_or_else(|| Error::Internal("NVFP4 without its group's largest weight".into()))?;
        let m = nvfp4::quantize(w, cols, nvfp4::tensor_scale(amax, flavor), flavor);
        s.error(name, m.relative_rms(w, cols));
        let (codes, tensor, input) = names(stem, name, flavor);
        s.write(&codes, &m.packed)?;
        s.write(&part::of(stem, part::WEIGHT_SCALE), &m.scales)?;
        s.write(&tensor, &f32_bytes(&[m.tensor]))?;
        if t.nvfp4_activations() {
            // q/k/v (and gate/up) read one input: one scale serves the fused group.
            let a = c.stats(t)?.input_absmax(c.layer, c.role.site());
            s.write(&input, &f32_bytes(&[nvfp4::input_scale(a, flavor)]))?;
        }
        Ok(decoded.then(|| m.dequantize(cols)))
    }
}
