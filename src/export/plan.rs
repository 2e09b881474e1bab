//! What each checkpoint target holds: its tensors (names, dtypes, shapes) in the input's order,
//! and the `quantization_config` runtimes read (formats/fp8.md#config, formats/int8.md).

use serde_json::{json, Value};

use crate::export::target::Target;
use crate::format::safetensors::PlannedTensor;
use crate::model::names::{part, LinearRole, TensorRole, TensorSpec};
use crate::model::Checkpoint;
use crate::numerics::Dtype;

/// The checkpoint's tensors in canonical order with their roles (a tied `lm_head` that is
/// absent stays absent).
pub fn inputs(ck: &Checkpoint) -> Vec<TensorSpec> {
    ck.specs()
        .into_iter()
        .filter(|s| ck.index.contains_key(&s.name))
        .collect()
}

pub fn linear_plan(
    t: Target,
    name: &str,
    shape: &[usize],
    group: Option<usize>,
) -> Vec<PlannedTensor> {
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
                pt(
                    part::of(stem, part::WEIGHT_SCALE),
                    Dtype::BF16,
                    vec![out, 1],
                ),
            ]
        }
        Target::Int8W8A16 | Target::W4A16 => {
            let per_word = 32 / t.packed_bits().expect("packed") as usize;
            let groups = t.group(group).map_or(1, |g| shape[1] / g);
            return vec![
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
            ];
        }
        Target::Nvfp4 | Target::Nvfp4A16 | Target::Nvfp4ModelOpt => {
            let packed = vec![out, shape[1] / 2];
            let scales = vec![out, shape[1] / crate::quant::nvfp4::GROUP];
            return if t == Target::Nvfp4ModelOpt {
                // ModelOpt's per-tensor scales are 0-dimensional.
                vec![
                    pt(name.to_owned(), Dtype::U8, packed),
                    pt(part::of(stem, part::WEIGHT_SCALE), Dtype::F8E4M3, scales),
                    pt(part::of(stem, part::WEIGHT_SCALE_2), Dtype::F32, vec![]),
                    pt(part::of(stem, part::INPUT_SCALE), Dtype::F32, vec![]),
                ]
            } else {
                let mut v = vec![
                    pt(part::of(stem, part::WEIGHT_PACKED), Dtype::U8, packed),
                    pt(part::of(stem, part::WEIGHT_SCALE), Dtype::F8E4M3, scales),
                    pt(
                        part::of(stem, part::WEIGHT_GLOBAL_SCALE),
                        Dtype::F32,
                        vec![1],
                    ),
                ];
                if t == Target::Nvfp4 {
                    v.push(pt(
                        part::of(stem, part::INPUT_GLOBAL_SCALE),
                        Dtype::F32,
                        vec![1],
                    ));
                }
                v
            };
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
            name: part::of(stem, part::WEIGHT_SCALE),
            dtype: Dtype::BF16,
            shape: vec![out, 1],
        }),
        Target::Fp8Static => {
            v.push(PlannedTensor {
                name: part::of(stem, part::WEIGHT_SCALE),
                dtype: Dtype::BF16,
                shape: vec![out, 1],
            });
            v.push(PlannedTensor {
                name: part::of(stem, part::INPUT_SCALE),
                dtype: Dtype::BF16,
                shape: vec![1],
            });
        }
        Target::Fp8ModelOpt => v.push(PlannedTensor {
            name: part::of(stem, part::WEIGHT_SCALE),
            dtype: Dtype::F32,
            shape: vec![out],
        }),
        Target::Int8
        | Target::Int8W8A16
        | Target::W4A16
        | Target::Nvfp4
        | Target::Nvfp4A16
        | Target::Nvfp4ModelOpt => unreachable!("handled above"),
        Target::Gguf(_) => unreachable!("GGUF targets are planned by export::gguf"),
    }
    v
}

/// Every tensor of target `t`'s checkpoint, in the input's order.
pub fn plan(t: Target, ck: &Checkpoint, group: Option<usize>) -> Vec<PlannedTensor> {
    let mut v = Vec::new();
    for spec in inputs(ck) {
        let (name, shape) = (spec.name, spec.shape);
        match spec.role {
            TensorRole::Linear(l, r) => {
                v.extend(linear_plan(t, &name, &shape, group));
                if t == Target::Fp8Static && r == LinearRole::V {
                    for n in part::kv_scales(l) {
                        v.push(PlannedTensor {
                            name: n,
                            dtype: Dtype::BF16,
                            shape: vec![1],
                        });
                    }
                }
            }
            _ => {
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

/// compressed-tensors QuantizationArgs with only the long-lived keys (formats/fp8.md#config).
fn ct_args(
    ty: &str,
    strategy: &str,
    dynamic: bool,
    observer: Option<&str>,
    group_size: Option<usize>,
) -> Value {
    ct_args_bits(ty, strategy, dynamic, observer, group_size, 8)
}

fn ct_args_bits(
    ty: &str,
    strategy: &str,
    dynamic: bool,
    observer: Option<&str>,
    group_size: Option<usize>,
    bits: u32,
) -> Value {
    json!({"actorder": null, "block_structure": null, "dynamic": dynamic, "group_size": group_size, "num_bits": bits,
           "observer": observer, "observer_kwargs": {}, "scale_dtype": null, "strategy": strategy, "symmetric": true,
           "type": ty, "zp_dtype": null})
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
/// `searched`: the weight scales were chosen by error search rather than the absmax (the
/// observer is then named `mse`).
pub fn quantization_config(t: Target, group: Option<usize>, searched: bool) -> Value {
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
        Target::Int8W8A16 | Target::W4A16 => {
            let group = t.group(group);
            let strategy = if group.is_some() { "group" } else { "channel" };
            let bits = t.packed_bits().expect("packed");
            let observer = if searched { "mse" } else { "memoryless_minmax" };
            let w = ct_args_bits("int", strategy, false, Some(observer), group, bits);
            ct_config("pack-quantized", w, Value::Null, Value::Null)
        }
        Target::Nvfp4 | Target::Nvfp4A16 => {
            let args = |dynamic: Value, observer: &str| {
                json!({"actorder": null, "block_structure": null, "dynamic": dynamic,
                       "group_size": crate::quant::nvfp4::GROUP, "num_bits": 4,
                       "observer": observer, "observer_kwargs": {},
                       "scale_dtype": "torch.float8_e4m3fn", "strategy": "tensor_group",
                       "symmetric": true, "type": "float", "zp_dtype": null})
            };
            let inputs = if t == Target::Nvfp4 {
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
        Target::Nvfp4ModelOpt => {
            let g = crate::quant::nvfp4::GROUP;
            let args = json!({"dynamic": false, "num_bits": 4, "type": "float", "group_size": g});
            json!({
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
            })
        }
        Target::Gguf(_) => Value::Null,
        Target::Fp8ModelOpt => json!({
            "quant_method": "modelopt",
            "quant_algo": "FP8_PER_CHANNEL_PER_TOKEN",
            "kv_cache_scheme": null,
            "ignore": ["lm_head"],
            "producer": {"name": "minitron", "version": crate::VERSION}
        }),
    }
}
