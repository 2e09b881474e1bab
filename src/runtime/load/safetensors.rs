//! Hugging Face safetensors checkpoints and the artifacts we write from them: bf16/f16/f32,
//! compressed-tensors FP8 (`float-quantized`, per-channel or per-tensor weight scales, dynamic
//! or static activations, FP8 KV-cache scales), compressed-tensors INT8 W8A8 and W8A16
//! (`pack-quantized`), and ModelOpt FP8 (formats/fp8.md, formats/int8.md).

use candle_core::{DType, Device, Tensor};

use super::source::{stream_dtype, vector, LoadOptions, Source};
use crate::error::{Error, Result};
use crate::model::names::{self, LinearRole};
use crate::model::{Checkpoint, Dtype, LlamaConfig};
use crate::runtime::block::Block;
use crate::runtime::linear::{Linear, WeightData};

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
        let dynamic = crate::scheme::dynamic_activations(&ck.config_json);
        SafetensorsSource {
            ck: Held::Owned(ck),
            dynamic,
        }
    }
}

impl<'a> SafetensorsSource<'a> {
    pub fn borrowed(ck: &'a Checkpoint) -> Self {
        SafetensorsSource {
            dynamic: crate::scheme::dynamic_activations(&ck.config_json),
            ck: Held::Borrowed(ck),
        }
    }

    fn ck(&self) -> &Checkpoint {
        match &self.ck {
            Held::Owned(c) => c,
            Held::Borrowed(c) => c,
        }
    }

    /// How the schemes are to decode this checkpoint's layers under `opts`.
    fn rule(&self, opts: LoadOptions) -> crate::scheme::LoadRule {
        crate::scheme::LoadRule {
            weight_only: opts.weight_only,
            dynamic: self.dynamic,
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
        let data = crate::scheme::load_linear(ck, layer, role, self.rule(opts))?;
        let lin = Linear::build(data, out, inp, dtype, device)?;
        // What was built owns its values: the mapped pages can go now rather than with the block.
        let name = names::hf_linear(layer, role);
        for n in crate::scheme::linear_tensor_names(stem_of(&name)) {
            ck.release(&n);
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
            kv_scales: crate::scheme::kv_scales(ck, l, self.rule(opts))?,
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

    fn head(&self, dtype: DType, device: &Device, opts: LoadOptions) -> Result<(Tensor, Linear)> {
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
        } else if device.is_cpu()
            && !device_form
            && head_dtype == DType::F32
            && info.dtype == Dtype::BF16
            && c.vocab_size * c.hidden_size * 4
                > opts
                    .widen_head_above
                    .unwrap_or(crate::runtime::linear::WIDEN_ABOVE)
        {
            // A large head computing in f32 keeps its bf16 bytes and widens them slice by
            // slice inside the product: the same exact weights (logits equal to an f32 copy's
            // up to the order of f32 summation), half the memory.
            Linear::widened_from_bf16_bytes(bytes, c.vocab_size, c.hidden_size, &|r| {
                ck.release_range(name, r)
            })?
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

fn stem_of(name: &str) -> &str {
    name.strip_suffix(".weight").unwrap_or(name)
}
