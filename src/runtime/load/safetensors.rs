//! Hugging Face safetensors checkpoints and the artifacts we write from them: bf16/f16/f32,
//! compressed-tensors FP8 (`float-quantized`, per-channel or per-tensor weight scales, dynamic
//! or static activations, FP8 KV-cache scales), compressed-tensors INT8 W8A8 and W8A16
//! (`pack-quantized`), and ModelOpt FP8 (formats/fp8.md, formats/int8.md).

use candle_core::{DType, Device, Tensor};

use super::source::{stream_dtype, vector, LoadOptions, Source};
use crate::error::{Error, Result};
use crate::model::names::{self, part, LinearRole};
use crate::model::{Checkpoint, Dtype, LlamaConfig};
use crate::runtime::block::Block;
use crate::runtime::linear::{ActQuant, Linear, WeightData};

/// The checkpoint, owned or borrowed.
enum Held<'a> {
    Owned(std::sync::Arc<Checkpoint>),
    Borrowed(&'a Checkpoint),
}

/// A safetensors checkpoint as a runner [`Source`].
pub struct SafetensorsSource<'a> {
    ck: Held<'a>,
    /// `quantization_config` asks for dynamic activation quantization.
    dynamic: bool,
}

impl SafetensorsSource<'static> {
    pub fn new(ck: std::sync::Arc<Checkpoint>) -> Self {
        let dynamic = dynamic_activations(&ck.config_json);
        SafetensorsSource {
            ck: Held::Owned(ck),
            dynamic,
        }
    }
}

impl<'a> SafetensorsSource<'a> {
    pub fn borrowed(ck: &'a Checkpoint) -> Self {
        SafetensorsSource {
            dynamic: dynamic_activations(&ck.config_json),
            ck: Held::Borrowed(ck),
        }
    }

    fn ck(&self) -> &Checkpoint {
        match &self.ck {
            Held::Owned(c) => c,
            Held::Borrowed(c) => c,
        }
    }

    /// A tensor that must hold exactly one value, if present.
    fn scalar(&self, name: &str) -> Result<Option<f32>> {
        let ck = self.ck();
        if !ck.index.contains_key(name) {
            return Ok(None);
        }
        let v = ck.read_f32(name)?;
        match v.as_slice() {
            [x] => Ok(Some(*x)),
            _ => Err(Error::TensorMismatch {
                path: ck.dir.clone(),
                tensor: name.into(),
                expected: "one value".into(),
                found: format!("{} values", v.len()),
            }),
        }
    }

    /// The stored form of linear layer `role` of block `layer`.
    fn linear(
        &self,
        layer: usize,
        role: LinearRole,
        dtype: DType,
        device: &Device,
        opts: LoadOptions,
    ) -> Result<Linear> {
        let ck = self.ck();
        let [out, inp] = role.shape(&ck.config);
        let name = names::hf_linear(layer, role);
        let stem = name.strip_suffix(".weight").expect("weight");
        let scale_name = part::of(stem, part::WEIGHT_SCALE);
        let packed = part::of(stem, part::WEIGHT_PACKED);
        let mismatch = |tensor: &str, expected: String, found: String| Error::TensorMismatch {
            path: ck.dir.clone(),
            tensor: tensor.into(),
            expected,
            found,
        };
        let data = if let Some(flavor) = ck.nvfp4_layer(stem) {
            use crate::quant::nvfp4::{self, Flavor};
            // NVFP4: codes as E2M1 values times their E4M3 group scales; the tensor scale and
            // the activation rule as the runtimes apply them (formats/nvfp4.md).
            let codes_name = if flavor == Flavor::ModelOpt {
                &name
            } else {
                &packed
            };
            let (bytes, _) = ck.raw(codes_name)?;
            let (sbytes, sinfo) = ck.raw(&scale_name)?;
            let want = [out, inp / nvfp4::GROUP];
            if sinfo.dtype != Dtype::F8E4M3 || sinfo.shape != want {
                return Err(mismatch(
                    &scale_name,
                    format!("F8_E4M3 {want:?} (one scale per {} values)", nvfp4::GROUP),
                    format!("{} {:?}", sinfo.dtype, sinfo.shape),
                ));
            }
            let (tensor_name, input_name) = match flavor {
                Flavor::CompressedTensors => (part::WEIGHT_GLOBAL_SCALE, part::INPUT_GLOBAL_SCALE),
                Flavor::ModelOpt => (part::WEIGHT_SCALE_2, part::INPUT_SCALE),
            };
            let tensor = self
                .scalar(&format!("{stem}.{tensor_name}"))?
                .expect("nvfp4_layer found it");
            let act = match self.scalar(&format!("{stem}.{input_name}"))? {
                Some(v) if !opts.weight_only => ActQuant::Nvfp4(nvfp4::act_multiplier(v, flavor)),
                _ => ActQuant::None,
            };
            WeightData::Nvfp4 {
                packed: bytes,
                scales: sbytes,
                multiplier: nvfp4::decode_multiplier(tensor, flavor),
                act,
            }
        } else if ck.index.contains_key(&packed) {
            // W8A16 / W4A16: packed integers and group scales, activations untouched (what
            // Marlin computes); the CPU forms dequantize them, the GPU form keeps them packed.
            let (bytes, _) = ck.raw(&packed)?;
            let bits = ck.packed_bits()?;
            let words = inp.div_ceil((32 / bits) as usize);
            if bytes.len() != out * words * 4 {
                return Err(mismatch(
                    &packed,
                    format!("{} bytes ([{out}, {words}] i32 words)", out * words * 4),
                    format!("{} bytes", bytes.len()),
                ));
            }
            let scales = ck.read_f32(&scale_name)?;
            let groups = scales.len() / out;
            if groups == 0 || scales.len() % out != 0 || inp % groups != 0 {
                return Err(mismatch(
                    &scale_name,
                    format!("[{out}, groups] with groups dividing {inp}"),
                    format!("{} values", scales.len()),
                ));
            }
            WeightData::PackedInt {
                words: bytes,
                scales,
                bits,
                groups,
            }
        } else {
            let (bytes, info) = ck.raw(&name)?;
            if info.shape != [out, inp] {
                return Err(mismatch(
                    &name,
                    format!("shape [{out}, {inp}]"),
                    format!("shape {:?}", info.shape),
                ));
            }
            match info.dtype {
                Dtype::I8 => {
                    let scales = ck.read_f32(&scale_name)?;
                    if scales.len() != out {
                        return Err(mismatch(
                            &scale_name,
                            format!("{out} per-channel values"),
                            format!("{} values", scales.len()),
                        ));
                    }
                    WeightData::Int8 {
                        q: bytes.iter().map(|&b| b as i8).collect(),
                        scales,
                        dynamic: self.dynamic && !opts.weight_only,
                    }
                }
                Dtype::F8E4M3 => {
                    let scales = ck.read_f32(&scale_name)?;
                    if scales.len() != out && scales.len() != 1 {
                        return Err(mismatch(
                            &scale_name,
                            format!("{out} per-channel values or 1 per-tensor value"),
                            format!("{} values", scales.len()),
                        ));
                    }
                    let act = if opts.weight_only {
                        ActQuant::None
                    } else if let Some(s) = self.scalar(&part::of(stem, part::INPUT_SCALE))? {
                        ActQuant::Static(s)
                    } else if self.dynamic {
                        ActQuant::DynamicToken
                    } else {
                        ActQuant::None
                    };
                    WeightData::Fp8 {
                        codes: bytes,
                        scales,
                        act,
                    }
                }
                Dtype::BF16 => WeightData::Bf16Bytes(bytes),
                _ => WeightData::F32(ck.read_f32(&name)?),
            }
        };
        let lin = Linear::build(data, out, inp, dtype, device)?;
        // What was built owns its values: the mapped pages can go now rather than with the block.
        for n in [&name, &packed] {
            ck.release(n);
        }
        Ok(lin)
    }

    /// Every tensor name of block `l` (weights, scales, norms).
    fn block_tensors(&self, l: usize) -> Vec<String> {
        let prefix = format!("model.layers.{l}.");
        self.ck()
            .index
            .keys()
            .filter(|k| k.starts_with(&prefix))
            .cloned()
            .collect()
    }
}

impl Source for SafetensorsSource<'_> {
    fn config(&self) -> &LlamaConfig {
        &self.ck().config
    }

    fn label(&self) -> String {
        self.ck().dir.display().to_string()
    }

    fn inv_freq(&self) -> Result<Vec<f64>> {
        Ok(self.ck().config.rope_inv_freq())
    }

    fn block(&self, l: usize, dtype: DType, device: &Device, opts: LoadOptions) -> Result<Block> {
        let ck = self.ck();
        let sd = stream_dtype(dtype);
        let lin = |role| self.linear(l, role, dtype, device, opts);
        Ok(Block {
            input_norm: vector(ck.read_f32(&names::hf_input_norm(l))?, sd, device)?,
            post_norm: vector(ck.read_f32(&names::hf_post_norm(l))?, sd, device)?,
            q: lin(LinearRole::Q)?,
            k: lin(LinearRole::K)?,
            v: lin(LinearRole::V)?,
            o: lin(LinearRole::O)?,
            gate: lin(LinearRole::Gate)?,
            up: lin(LinearRole::Up)?,
            down: lin(LinearRole::Down)?,
            kv_scales: if opts.weight_only {
                None
            } else {
                match (
                    self.scalar(&part::kv_scales(l)[0])?,
                    self.scalar(&part::kv_scales(l)[1])?,
                ) {
                    (Some(k), Some(v)) => Some((k, v)),
                    _ => None,
                }
            },
        })
    }

    fn release_block(&self, l: usize) {
        for name in self.block_tensors(l) {
            self.ck().release(&name);
        }
    }

    fn embed_rows(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let ck = self.ck();
        let c = &ck.config;
        let (bytes, info) = ck.raw(names::EMBED)?;
        let row = c.hidden_size * info.dtype.size();
        let mut v = Vec::with_capacity(ids.len() * c.hidden_size);
        for &id in ids {
            let id = id as usize;
            let slice = bytes.get(id * row..(id + 1) * row).ok_or_else(|| {
                Error::Invalid(format!(
                    "token id {id} is outside the embedding table ({} rows)",
                    c.vocab_size
                ))
            })?;
            let r = crate::numerics::convert::to_f32(slice, info.dtype).ok_or_else(|| {
                Error::TensorMismatch {
                    path: ck.dir.clone(),
                    tensor: names::EMBED.into(),
                    expected: "a float dtype".into(),
                    found: info.dtype.to_string(),
                }
            })?;
            v.extend_from_slice(&r);
        }
        Ok(v)
    }

    fn embedding(&self, dtype: DType, device: &Device) -> Result<Tensor> {
        let ck = self.ck();
        let c = &ck.config;
        let (bytes, info) = ck.raw(names::EMBED)?;
        if info.shape != [c.vocab_size, c.hidden_size] {
            return Err(Error::TensorMismatch {
                path: ck.dir.clone(),
                tensor: names::EMBED.into(),
                expected: format!("shape [{}, {}]", c.vocab_size, c.hidden_size),
                found: format!("shape {:?}", info.shape),
            });
        }
        let shape = [c.vocab_size, c.hidden_size];
        Ok(match info.dtype {
            Dtype::BF16 => Tensor::from_raw_buffer(bytes, DType::BF16, &shape, device)?,
            _ => Tensor::from_vec(ck.read_f32(names::EMBED)?, &shape, device)?,
        }
        .to_dtype(dtype)?)
    }

    fn head(&self, dtype: DType, device: &Device, _opts: LoadOptions) -> Result<(Tensor, Linear)> {
        let ck = self.ck();
        let c = &ck.config;
        let norm = vector(ck.read_f32(names::FINAL_NORM)?, stream_dtype(dtype), device)?;
        let name = if ck.index.contains_key(names::LM_HEAD) {
            names::LM_HEAD
        } else {
            names::EMBED
        };
        let (bytes, info) = ck.raw(name)?;
        if info.shape != [c.vocab_size, c.hidden_size] {
            return Err(Error::TensorMismatch {
                path: ck.dir.clone(),
                tensor: name.into(),
                expected: format!("shape [{}, {}]", c.vocab_size, c.hidden_size),
                found: format!("shape {:?}", info.shape),
            });
        }
        // On a CPU with bf16 the head is a bf16 GEMM like every other layer (a 128k-token
        // vocabulary's head in f32 would be the largest tensor in memory); elsewhere it
        // multiplies in the stream dtype, so logits are never rounded to bf16. The GPU form
        // holds it in bf16 with f32 outputs (the CPU's arithmetic).
        let device_form = crate::runtime::devform::wanted(device, dtype);
        let packed = device.is_cpu() && dtype == DType::BF16 && !device_form;
        let head_dtype = if packed || device_form {
            dtype
        } else {
            stream_dtype(dtype)
        };
        let head = if packed && info.dtype == Dtype::BF16 {
            // Packed slice by slice, each slice's mapped pages dropped once packed.
            let w = crate::runtime::gemm::PackedBf16::from_bf16_bytes_releasing(
                bytes,
                c.vocab_size,
                c.hidden_size,
                &|r| ck.release_range(name, r),
            );
            Linear::Packed {
                w: std::sync::Arc::new(w),
                col_scale: None,
                act: crate::runtime::linear::ActQuant::None,
                fp8_act: false,
            }
        } else {
            let data = if info.dtype == Dtype::BF16 {
                WeightData::Bf16Bytes(bytes)
            } else {
                WeightData::F32(ck.read_f32(name)?)
            };
            Linear::build(data, c.vocab_size, c.hidden_size, head_dtype, device)?
        };
        ck.release(name);
        Ok((norm, head))
    }

    fn release_head(&self) {
        for n in [names::EMBED, names::LM_HEAD, names::FINAL_NORM] {
            self.ck().release(n);
        }
    }
}

/// Whether an artifact's config asks for dynamic activation quantization (compressed-tensors
/// `input_activations.dynamic`, or ModelOpt's per-token algorithm).
fn dynamic_activations(cfg: &serde_json::Value) -> bool {
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
