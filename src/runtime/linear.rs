//! The linear layer of every block. Loaders (`runtime::load`) describe what they read as
//! [`WeightData`] (bf16 bytes, FP8 codes and scales, INT8 codes and scales, ggml blocks, f32);
//! [`Linear::build`] picks the form that runs it, keeping weights in their stored precision:
//! on a CPU with bf16 compute, [`Linear::Packed`] panels for the bf16 GEMM (bf16 and FP8) and
//! [`Linear::Int8Packed`] for the exact INT8 GEMM; on a GPU, [`Linear::Device`] (weights in
//! their stored precision, `runtime::devform`); with `--dtype f32`, the exact
//! reference forms ([`Linear::Dense`], [`Linear::Fp8`], [`Linear::Int8`]); ggml blocks through
//! candle's quantized matmul. The forward pass only calls [`Linear::forward`] (and the fused CPU
//! block, `Linear::packed_rows`).

use candle_core::{DType, Device, Tensor};

use crate::error::Result;
pub use crate::scheme::{ActQuant, WeightData};

/// A linear map `y = x Wᵀ` without bias.
#[derive(Debug, Clone)]
pub enum Linear {
    /// Dense weight `[out, in]` in the compute dtype.
    Dense { weight: Tensor },
    /// FP8 E4M3 weight with per-channel scales, held dequantized (`code · scale` is exact in f32),
    /// with the runtime's activation quantization emulated. With f32 accumulation this is what
    /// `D = a_scale · w_scale · (A_fp8 · W_fp8)` computes on Hopper.
    Fp8 { weight: Tensor, act: ActQuant },
    /// INT8 W8A8 as vLLM runs it: per-token dynamic INT8 activations (`absmax/127`, round half
    /// to even, ±127) times INT8 weights; the integer products are summed exactly (in f64, whose
    /// 53-bit mantissa holds any such sum) and scaled by both scales.
    Int8 {
        q: Tensor,
        scale: Tensor,
        dequantized: Tensor,
        dynamic: bool,
    },
    /// bf16 panels multiplied by the runner's CPU GEMM (`runtime::gemm`): bf16 weights as
    /// stored, or FP8 E4M3 codes (exact in bf16) whose per-channel scale multiplies the f32 sum.
    /// Activations enter as bf16, or as E4M3 codes with their per-token or static scale: then
    /// every product is exact and the sum is what an FP8 tensor-core GEMM accumulates.
    Packed {
        w: std::sync::Arc<crate::runtime::gemm::PackedBf16>,
        col_scale: Option<Vec<f32>>,
        act: ActQuant,
        /// Whether the activations are FP8 codes (`act` then says which scale); otherwise bf16.
        fp8_act: bool,
    },
    /// The GPU form: weights in stored precision on the device, activations rounded there, one
    /// bf16 × bf16 → f32 GEMM (`runtime::devform`).
    Device(crate::runtime::devform::DeviceLinear),
    /// INT8 W8A8 on the runner's exact integer GEMM (`runtime::gemm_i8`): per-token INT8
    /// activation codes times the weight codes summed exactly in i32, then scaled as
    /// [`Linear::Int8`] scales (same numbers, i8 weights held as i8).
    Int8Packed {
        w: std::sync::Arc<crate::runtime::gemm_i8::PackedI8>,
        scale: Vec<f32>,
    },
    /// A ggml block-quantized weight run by candle's quantized matmul (what llama.cpp computes:
    /// activations quantized to the weight type's dot-product format, e.g. Q8_K / Q8_0).
    Ggml {
        w: std::sync::Arc<candle_core::quantized::QMatMul>,
    },
    /// bf16 weights `[out, in]` kept as stored and widened to f32 `slice_rows` rows at a time
    /// inside the product: f32 inputs and outputs, the numbers of the f32 dense form (bf16 →
    /// f32 is exact) from half its memory. A 128k-vocabulary head computing in f32 on a CPU
    /// without the bf16 GEMM takes this form (see [`WIDEN_ABOVE`]).
    Widened { weight: Tensor, slice_rows: usize },
}

/// f32 bytes above which a CPU f32 head is held as [`Linear::Widened`] instead of widened
/// whole: Llama-3's 128,256 × 4,096 head is 2.1 GB in f32 and 1.05 GB as stored.
pub const WIDEN_ABOVE: usize = 256 << 20;

/// Weight elements widened per slice of [`Linear::Widened`] (64 MiB of f32).
const WIDEN_SLICE_ELEMS: usize = 16 << 20;

use crate::numerics::fp8::FP8_MIN_TOKEN_SCALE;

/// Quantizes `x` to E4M3 with scale `s` (per row when `s` is `[.., 1]`) and back.
fn fp8_round_trip(x: &Tensor, s: &Tensor) -> Result<Tensor> {
    // In f32 whatever the compute dtype: dividing in bf16 would round once before the E4M3
    // rounding.
    let dt = x.dtype();
    let (x, s) = (&x.to_dtype(DType::F32)?, &s.to_dtype(DType::F32)?);
    let q = x
        .broadcast_div(s)?
        .clamp(
            -crate::numerics::fp8::E4M3_MAX,
            crate::numerics::fp8::E4M3_MAX,
        )?
        .to_dtype(DType::F8E4M3)?
        .to_dtype(DType::F32)?;
    Ok(q.broadcast_mul(s)?.to_dtype(dt)?)
}

/// Rounds f32 values of magnitude below 2^22 to the nearest integer, ties to even, with
/// tensor ops only (so on any device): adding and subtracting 1.5 · 2^23 leaves the f32 sum
/// with no fraction bits, and IEEE addition rounds half to even.
pub fn round_half_even(v: &Tensor) -> Result<Tensor> {
    const MAGIC: f64 = 12_582_912.0;
    Ok(((v + MAGIC)? - MAGIC)?)
}

/// NVFP4 activation rows `[rows, inp]` as `q · s` values (`quant::nvfp4`).
fn nvfp4_rows(x: &[f32], inp: usize, g: f32) -> Vec<f32> {
    use rayon::prelude::*;
    let mut q = vec![0f32; x.len()];
    q.par_chunks_mut(inp.max(1))
        .zip(x.par_chunks(inp.max(1)))
        .for_each(|(o, r)| crate::quant::nvfp4::quantize_activation_row(r, g, o));
    q
}

/// NVFP4 fake quantization of `x` (`[.., in]`) with global scale `g`: the dequantized
/// activations `q · s / g`, computed on the host.
pub fn nvfp4_activations(x: &Tensor, g: f32) -> Result<Tensor> {
    if !x.device().is_cpu() {
        // On a GPU the kernels round (`runtime::devform`); the arithmetic is the same.
        return crate::runtime::devform::nvfp4_round_trip(x, g);
    }
    let dims = x.dims().to_vec();
    let inp = *dims.last().expect("rank ≥ 1");
    let v: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let inv = if g == 0.0 { 0.0 } else { 1.0 / g };
    let q: Vec<f32> = nvfp4_rows(&v, inp, g)
        .into_iter()
        .map(|v| v * inv)
        .collect();
    Ok(Tensor::from_vec(q, dims, x.device())?.to_dtype(x.dtype())?)
}

/// Per-token dynamic FP8 fake quantization of `x` (`[.., in]`).
pub fn fp8_dynamic_token(x: &Tensor) -> Result<Tensor> {
    if !x.device().is_cpu() {
        // candle's CUDA F8E4M3 casts are not in its kernel modules: our kernels round instead.
        return crate::runtime::devform::fp8_round_trip(x, None);
    }
    let amax = x.abs()?.max_keepdim(candle_core::D::Minus1)?;
    let s = (amax / crate::numerics::fp8::E4M3_MAX as f64)?.maximum(FP8_MIN_TOKEN_SCALE as f64)?;
    fp8_round_trip(x, &s)
}

/// Static per-tensor FP8 fake quantization of `x` with scale `scale`.
pub fn fp8_static(x: &Tensor, scale: f32) -> Result<Tensor> {
    if !x.device().is_cpu() {
        return crate::runtime::devform::fp8_round_trip(x, Some(scale));
    }
    let s = Tensor::new(&[scale], x.device())?.to_dtype(x.dtype())?;
    fp8_round_trip(x, &s)
}

/// Per-token INT8 codes of `x` computed on the host, as f64 `[rows, in]` with f64 scales
/// `[rows, 1]` (for the exact integer sum).
fn int8_host_codes(x: &Tensor) -> Result<(Tensor, Tensor)> {
    let dims = x.dims().to_vec();
    let inp = *dims.last().expect("rank ≥ 1");
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let xv = x
        .to_dtype(DType::F32)?
        .reshape((rows, inp))?
        .to_vec2::<f32>()?;
    let mut xq = Vec::with_capacity(rows * inp);
    let mut xs = Vec::with_capacity(rows);
    for r in &xv {
        let amax = r.iter().fold(0f32, |m, &v| m.max(v.abs()));
        let s = if amax > 0.0 { amax / 127.0 } else { 1.0 };
        xs.push(s as f64);
        xq.extend(
            r.iter()
                .map(|&v| (v / s).round_ties_even().clamp(-127.0, 127.0) as f64),
        );
    }
    Ok((
        Tensor::from_vec(xq, (rows, inp), x.device())?,
        Tensor::from_vec(xs, (rows, 1), x.device())?,
    ))
}

/// E4M3 codes of activation rows as bf16 bit patterns (exact: every E4M3 value is a bf16 value)
/// `[rows, lda]`, with each row's scale: per-token `max(absmax / 448, FP8_MIN_TOKEN_SCALE)`, or
/// the static scale. The codes are those of `fp8_dynamic_token` / `fp8_static`: `x / s` clamped
/// to ±448 and rounded to nearest even, all in f32.
fn fp8_code_rows(x: &[f32], inp: usize, lda: usize, act: ActQuant) -> (Vec<u16>, Vec<f32>) {
    use rayon::prelude::*;
    let rows = x.len() / inp.max(1);
    let mut codes = vec![0u16; rows * lda];
    let mut scales = vec![0f32; rows];
    let table = crate::numerics::fp8::e4m3_table();
    codes
        .par_chunks_mut(lda)
        .zip(scales.par_iter_mut())
        .zip(x.par_chunks(inp))
        .for_each(|((c, s), r)| {
            *s = match act {
                ActQuant::Static(v) => v,
                _ => {
                    let amax = r.iter().fold(0f32, |m, v| m.max(v.abs()));
                    (amax / crate::numerics::fp8::E4M3_MAX).max(FP8_MIN_TOKEN_SCALE)
                }
            };
            for (d, &v) in c.iter_mut().zip(r) {
                let q = (v / *s).clamp(
                    -crate::numerics::fp8::E4M3_MAX,
                    crate::numerics::fp8::E4M3_MAX,
                );
                let code = crate::numerics::fp8::f32_to_e4m3(q);
                *d = half::bf16::from_f32(table[code as usize]).to_bits();
            }
        });
    (codes, scales)
}

/// The exact INT8 sums scaled as [`Linear::Int8`] does: `f32((S · s_token) · s_channel)` in f64.
fn int8_apply(
    w: &crate::runtime::gemm_i8::PackedI8,
    scale: &[f32],
    a: &[u8],
    xs: &[f32],
    rows: usize,
) -> Vec<f32> {
    use rayon::prelude::*;
    let n = w.shape().0;
    let acc = crate::runtime::gemm_i8::gemm_i8(a, rows, w, crate::runtime::gemm_i8::vnni());
    let mut y = vec![0f32; acc.len()];
    y.par_chunks_mut(n.max(1))
        .zip(acc.par_chunks(n.max(1)))
        .zip(xs.par_iter())
        .for_each(|((o, r), &s)| {
            for ((v, &q), &c) in o.iter_mut().zip(r).zip(scale) {
                *v = ((q as f64 * s as f64) * c as f64) as f32;
            }
        });
    y
}

/// Prepares f32 host rows `x` (`[rows, inp]`) for the runner's own GEMMs: bf16 rows, FP8
/// codes with per-row scales, or INT8 codes with per-row scales.
fn prepare_rows(rule: InputRule, x: &[f32], inp: usize) -> Result<Prepared> {
    let rows = x.len() / inp.max(1);
    Ok(match rule {
        InputRule::Packed(lda, None) => {
            Prepared::Packed(crate::runtime::gemm::to_bf16_rows(x, inp, lda), None, rows)
        }
        InputRule::Packed(lda, Some(ActQuant::Nvfp4(g))) => {
            let q = nvfp4_rows(x, inp, g);
            let inv = if g == 0.0 { 0.0 } else { 1.0 / g };
            Prepared::Packed(
                crate::runtime::gemm::to_bf16_rows(&q, inp, lda),
                Some(vec![inv; rows]),
                rows,
            )
        }
        InputRule::Packed(lda, Some(act)) => {
            let (c, s) = fp8_code_rows(x, inp, lda, act);
            Prepared::Packed(c, Some(s), rows)
        }
        InputRule::PackedI8(lda) => {
            let (a, s) = crate::runtime::gemm_i8::quantize_rows(x, inp, lda);
            Prepared::PackedI8(a, s, rows)
        }
        _ => {
            return Err(crate::error::Error::Internal(
                "host-row preparation for a layer that is not on the CPU GEMM".into(),
            ))
        }
    })
}

impl WeightData<'_> {
    /// Packed integers dequantized to f32 (`q · scale`, as the CPU forms hold them).
    fn packed_int_values(
        words: &[u8],
        scales: &[f32],
        out: usize,
        inp: usize,
        bits: u32,
    ) -> Vec<f32> {
        let q = crate::quant::int8::unpack_bits(words, out, inp, bits);
        let groups = scales.len() / out.max(1);
        let g = inp / groups.max(1);
        q.iter()
            .enumerate()
            .map(|(i, &v)| v as f32 * scales[(i / inp) * groups + (i % inp) / g])
            .collect()
    }
}

impl Linear {
    /// The form that runs `data` with matmul dtype `dtype` on `device`: on a CPU with bf16,
    /// float and FP8 weights become bf16 panels for the runner's GEMM (the stored bytes, never an
    /// f32 copy); otherwise candle tensors in `dtype` as before.
    pub fn build(
        data: WeightData<'_>,
        out: usize,
        inp: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        use crate::runtime::gemm::PackedBf16;
        use std::sync::Arc;
        if crate::runtime::devform::wanted(device, dtype) {
            return Self::build_device(data, out, inp, device);
        }
        let packed = device.is_cpu() && dtype == DType::BF16;
        let data = match data {
            WeightData::PackedInt {
                words,
                scales,
                bits,
                ..
            } => WeightData::F32(WeightData::packed_int_values(
                words, &scales, out, inp, bits,
            )),
            d => d,
        };
        Ok(match data {
            WeightData::Bf16Bytes(b) if packed => Linear::Packed {
                w: Arc::new(PackedBf16::from_bf16_bytes(b, out, inp)),
                col_scale: None,
                act: ActQuant::None,
                fp8_act: false,
            },
            WeightData::Bf16Bytes(b) => Linear::Dense {
                weight: Tensor::from_raw_buffer(b, DType::BF16, &[out, inp], device)?
                    .to_dtype(dtype)?,
            },
            WeightData::F32(v) if packed => Linear::Packed {
                w: Arc::new(PackedBf16::from_f32(&v, out, inp)),
                col_scale: None,
                act: ActQuant::None,
                fp8_act: false,
            },
            WeightData::F32(v) => Linear::dense(v, out, inp, dtype, device)?,
            WeightData::Fp8 { codes, scales, act } if packed => {
                let table = crate::numerics::fp8::e4m3_table();
                let bits: Vec<u16> = table
                    .iter()
                    .map(|&v| half::bf16::from_f32(v).to_bits())
                    .collect();
                let w = PackedBf16::from_rows(out, inp, |r, dst| {
                    for (d, &c) in dst.iter_mut().zip(&codes[r * inp..(r + 1) * inp]) {
                        *d = bits[c as usize];
                    }
                });
                let col_scale = if scales.len() == 1 {
                    vec![scales[0]; out]
                } else {
                    scales
                };
                Linear::Packed {
                    w: Arc::new(w),
                    col_scale: Some(col_scale),
                    act,
                    fp8_act: act != ActQuant::None,
                }
            }
            WeightData::Fp8 { codes, scales, act } => {
                let table = crate::numerics::fp8::e4m3_table();
                let per = if scales.len() == 1 { 0 } else { 1 };
                let w: Vec<f32> = codes
                    .iter()
                    .enumerate()
                    .map(|(i, &q)| table[q as usize] * scales[per * (i / inp)])
                    .collect();
                let weight = Tensor::from_vec(w, (out, inp), device)?.to_dtype(dtype)?;
                Linear::Fp8 { weight, act }
            }
            WeightData::Int8 {
                q,
                scales,
                dynamic: true,
            } if packed => Linear::Int8Packed {
                w: Arc::new(crate::runtime::gemm_i8::PackedI8::new(&q, out, inp)),
                scale: scales,
            },
            WeightData::Int8 {
                q,
                scales,
                dynamic: false,
            } if packed => {
                // Weight-only: codes are exact in bf16; the channel scale multiplies the sum.
                let w = PackedBf16::from_rows(out, inp, |r, dst| {
                    for (d, &c) in dst.iter_mut().zip(&q[r * inp..(r + 1) * inp]) {
                        *d = half::bf16::from_f32(c as f32).to_bits();
                    }
                });
                Linear::Packed {
                    w: Arc::new(w),
                    col_scale: Some(scales),
                    act: ActQuant::None,
                    fp8_act: false,
                }
            }
            WeightData::Nvfp4 {
                packed: nibbles,
                scales,
                multiplier,
                act,
            } if packed => Linear::Packed {
                // Every value is exact in bf16; the tensor factor multiplies the f32 sum, and
                // NVFP4 activations enter as `q · s` with `1 / g` per row: the products are
                // exact and the sum is what the FP4 tensor cores accumulate.
                w: Arc::new(PackedBf16::from_f32(
                    &crate::quant::nvfp4::decode_unscaled(nibbles, scales, inp),
                    out,
                    inp,
                )),
                col_scale: Some(vec![multiplier; out]),
                act,
                fp8_act: act != ActQuant::None,
            },
            WeightData::Nvfp4 {
                packed: nibbles,
                scales,
                multiplier,
                act,
            } => {
                let mut values = crate::quant::nvfp4::decode_unscaled(nibbles, scales, inp);
                values.iter_mut().for_each(|v| *v *= multiplier);
                let weight = Tensor::from_vec(values, (out, inp), device)?.to_dtype(dtype)?;
                Linear::Fp8 { weight, act }
            }
            WeightData::Int8 { q, scales, dynamic } => {
                Linear::int8(&q, scales, out, inp, dynamic, dtype, device)?
            }
            WeightData::PackedInt { .. } => unreachable!("dequantized above"),
        })
    }

    /// The GPU form of `data` ([`Linear::Device`]) on `device`; on a CPU it runs the kernels'
    /// twins (tests, `--emulate-gpu-forms`).
    pub fn build_device(
        data: WeightData<'_>,
        out: usize,
        inp: usize,
        device: &Device,
    ) -> Result<Self> {
        use crate::runtime::devform::{DevAct, DevWeight, DeviceLinear};
        let bytes = |b: &[u8], cols: usize| -> Result<Tensor> {
            Ok(Tensor::from_raw_buffer(b, DType::U8, &[out, cols], device)?)
        };
        let cols = |v: Vec<f32>| -> Result<Option<Tensor>> {
            let v = if v.len() == 1 { vec![v[0]; out] } else { v };
            Ok(Some(Tensor::from_vec(v, (1, out), device)?))
        };
        let act_of = |a: ActQuant| match a {
            ActQuant::None => DevAct::Bf16,
            ActQuant::DynamicToken => DevAct::Fp8Token,
            ActQuant::Static(s) => DevAct::Fp8Static(s),
            ActQuant::Nvfp4(g) => DevAct::Nvfp4(g),
        };
        let bf16_of = |v: &[f32]| -> Result<Tensor> {
            let h: Vec<half::bf16> = v.iter().map(|&x| half::bf16::from_f32(x)).collect();
            Ok(Tensor::from_vec(h, (out, inp), device)?)
        };
        let (w, col_scale, act) = match data {
            WeightData::Bf16Bytes(b) => (
                DevWeight::Bf16(Tensor::from_raw_buffer(
                    b,
                    DType::BF16,
                    &[out, inp],
                    device,
                )?),
                None,
                DevAct::Bf16,
            ),
            WeightData::F32(v) => (DevWeight::Bf16(bf16_of(&v)?), None, DevAct::Bf16),
            WeightData::Fp8 { codes, scales, act } => (
                DevWeight::E4m3(bytes(codes, inp)?),
                cols(scales)?,
                act_of(act),
            ),
            WeightData::Int8 { q, scales, dynamic } => {
                let b: Vec<u8> = q.iter().map(|&v| v as u8).collect();
                let act = if dynamic {
                    DevAct::Int8Token
                } else {
                    DevAct::Bf16
                };
                (DevWeight::I8(bytes(&b, inp)?), cols(scales)?, act)
            }
            WeightData::Nvfp4 {
                packed,
                scales,
                multiplier,
                act,
            } => (
                DevWeight::Nvfp4 {
                    packed: bytes(packed, inp / 2)?,
                    scales: bytes(scales, inp / crate::quant::nvfp4::GROUP)?,
                },
                cols(vec![multiplier])?,
                act_of(act),
            ),
            WeightData::PackedInt {
                words,
                scales,
                bits,
                groups,
            } => (
                DevWeight::Packed {
                    words: bytes(words, words.len() / out.max(1))?,
                    scales: Tensor::from_vec(scales, (out, groups), device)?,
                    bits,
                    groups,
                },
                None,
                DevAct::Bf16,
            ),
        };
        Ok(Linear::Device(DeviceLinear {
            w,
            col_scale,
            act,
            out,
            inp,
        }))
    }
}

/// How a layer prepares its input (see [`Linear::forward_shared`]).
#[derive(Debug, Clone, Copy, PartialEq)]
enum InputRule {
    /// Converted to this dtype.
    Cast(DType),
    /// FP8-rounded as the runtime does, then converted to the weight dtype.
    Fp8(ActQuant, DType),
    /// Per-token INT8 codes on the host (f64, for the exact sum).
    Int8Exact,
    /// bf16 rows for the CPU GEMM (lda, FP8 activation rule when the codes are FP8).
    Packed(usize, Option<ActQuant>),
    /// INT8 codes for the integer GEMM (lda).
    PackedI8(usize),
    /// The GPU form's activation rule.
    Device(crate::runtime::devform::DevAct),
}

/// A prepared input.
enum Prepared {
    Plain(Tensor),
    Int8Exact(Tensor, Tensor),
    /// bf16 bit patterns `[rows, lda]`, the per-row scales of FP8 codes, the row count.
    Packed(Vec<u16>, Option<Vec<f32>>, usize),
    /// `code + 128` bytes `[rows, lda]`, per-row scales, the row count.
    PackedI8(Vec<u8>, Vec<f32>, usize),
    /// The GPU form's bf16 GEMM input `[rows, in]` and per-row scales `[rows, 1]`.
    Device(Tensor, Option<Tensor>),
}

impl Linear {
    /// A dense layer from row-major f32 values of shape `[out, in]`.
    pub fn dense(
        values: Vec<f32>,
        out: usize,
        inp: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let w = Tensor::from_vec(values, (out, inp), device)?.to_dtype(dtype)?;
        Ok(Linear::Dense { weight: w })
    }

    /// An INT8 layer from values `q` (`[out, in]`) and per-channel scales. Without `dynamic`
    /// activations stay unquantized (weight-only).
    pub fn int8(
        q: &[i8],
        scales: Vec<f32>,
        out: usize,
        inp: usize,
        dynamic: bool,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let qf: Vec<f64> = q.iter().map(|&v| v as f64).collect();
        let deq: Vec<f32> = q
            .iter()
            .enumerate()
            .map(|(i, &v)| v as f32 * scales[i / inp])
            .collect();
        Ok(Linear::Int8 {
            q: Tensor::from_vec(qf, (out, inp), device)?,
            scale: Tensor::from_vec(
                scales.iter().map(|&s| s as f64).collect::<Vec<_>>(),
                (1, out),
                device,
            )?,
            dequantized: Tensor::from_vec(deq, (out, inp), device)?.to_dtype(dtype)?,
            dynamic,
        })
    }

    /// How this layer turns its input into what its matmul reads; layers with equal rules
    /// can share one preparation.
    fn input_rule(&self) -> InputRule {
        match self {
            Linear::Dense { weight }
            | Linear::Fp8 {
                weight,
                act: ActQuant::None,
            }
            | Linear::Int8 {
                dequantized: weight,
                dynamic: false,
                ..
            } => InputRule::Cast(weight.dtype()),
            Linear::Fp8 { weight, act } => InputRule::Fp8(*act, weight.dtype()),
            Linear::Int8 { dynamic: true, .. } => InputRule::Int8Exact,
            Linear::Ggml { .. } | Linear::Widened { .. } => InputRule::Cast(DType::F32),
            Linear::Packed {
                w, act, fp8_act, ..
            } => InputRule::Packed(w.lda(), fp8_act.then_some(*act)),
            Linear::Int8Packed { w, .. } => InputRule::PackedI8(w.lda()),
            Linear::Device(d) => InputRule::Device(d.act_key()),
        }
    }

    fn prepare(&self, x: &Tensor) -> Result<Prepared> {
        Ok(match self.input_rule() {
            InputRule::Cast(dt) => Prepared::Plain(x.to_dtype(dt)?),
            InputRule::Fp8(act, dt) => {
                let xq = match act {
                    ActQuant::DynamicToken => fp8_dynamic_token(x)?,
                    ActQuant::Static(s) => fp8_static(x, s)?,
                    ActQuant::Nvfp4(g) => nvfp4_activations(x, g)?,
                    ActQuant::None => x.clone(),
                };
                Prepared::Plain(xq.to_dtype(dt)?)
            }
            InputRule::Int8Exact => {
                let (xq, xs) = int8_host_codes(x)?;
                Prepared::Int8Exact(xq, xs)
            }
            rule @ (InputRule::Packed(..) | InputRule::PackedI8(_)) => {
                let inp = x.dim(candle_core::D::Minus1)?;
                let v: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
                prepare_rows(rule, &v, inp)?
            }
            InputRule::Device(_) => {
                let Linear::Device(d) = self else {
                    return Err(crate::error::Error::Internal(
                        "a device input rule on another layer".into(),
                    ));
                };
                let inp = x.dim(candle_core::D::Minus1)?;
                let (a, s) = d.prepare(&x.reshape(((), inp))?)?;
                Prepared::Device(a, s)
            }
        })
    }

    /// The layer applied to `p`, this layer's preparation of `x` (whose shape and dtype the
    /// INT8 and ggml outputs take; dense outputs are in the weight's dtype).
    fn apply(&self, x: &Tensor, p: &Prepared) -> Result<Tensor> {
        match (self, p) {
            (Linear::Dense { weight } | Linear::Fp8 { weight, .. }, Prepared::Plain(xp))
            | (
                Linear::Int8 {
                    dequantized: weight,
                    ..
                },
                Prepared::Plain(xp),
            ) => Self::matmul(xp, weight),
            (Linear::Widened { weight, slice_rows }, Prepared::Plain(xf)) => {
                Self::widened_matmul(xf, weight, *slice_rows)
            }
            (Linear::Ggml { w }, Prepared::Plain(xf)) => {
                Ok(candle_core::Module::forward(w.as_ref(), xf)?.to_dtype(x.dtype())?)
            }
            (Linear::Int8 { q, scale, .. }, Prepared::Int8Exact(xq, xs)) => {
                let y = xq
                    .matmul(&q.t()?)?
                    .broadcast_mul(xs)?
                    .broadcast_mul(scale)?;
                let mut out_dims = x.dims().to_vec();
                *out_dims.last_mut().expect("rank ≥ 1") = q.dim(0)?;
                Ok(y.to_dtype(x.dtype())?.reshape(out_dims)?)
            }
            (Linear::Packed { w, col_scale, .. }, Prepared::Packed(a, row_scale, rows)) => {
                let y = crate::runtime::gemm::gemm(
                    crate::runtime::gemm::Isa::detect(),
                    a,
                    *rows,
                    w,
                    row_scale.as_deref(),
                    col_scale.as_deref(),
                );
                let mut out_dims = x.dims().to_vec();
                *out_dims.last_mut().expect("rank ≥ 1") = w.shape().0;
                Ok(Tensor::from_vec(y, out_dims, x.device())?.to_dtype(x.dtype())?)
            }
            (Linear::Device(d), Prepared::Device(a, s)) => {
                let y = d.apply(a, s.as_ref())?;
                let mut out_dims = x.dims().to_vec();
                *out_dims.last_mut().expect("rank ≥ 1") = d.out;
                Ok(y.reshape(out_dims)?.to_dtype(x.dtype())?)
            }
            (Linear::Int8Packed { w, scale }, Prepared::PackedI8(a, xs, rows)) => {
                let y = int8_apply(w, scale, a, xs, *rows);
                let mut out_dims = x.dims().to_vec();
                *out_dims.last_mut().expect("rank ≥ 1") = w.shape().0;
                Ok(Tensor::from_vec(y, out_dims, x.device())?.to_dtype(x.dtype())?)
            }
            _ => Err(crate::error::Error::Internal(
                "a linear layer was given another layer's input preparation".into(),
            )),
        }
    }

    /// Applies the layer to `x` of shape `[.., in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, &self.prepare(x)?)
    }

    /// Applies layers that read the same input `x` (q/k/v, gate/up), preparing it (dtype
    /// conversion, FP8 or INT8 activation quantization) once when their rules agree: what a
    /// runtime's fused projection does, and identical to applying each layer alone.
    pub fn forward_shared(layers: &[&Linear], x: &Tensor) -> Result<Vec<Tensor>> {
        let Some(first) = layers.first() else {
            return Ok(Vec::new());
        };
        let rule = first.input_rule();
        if layers.iter().all(|l| l.input_rule() == rule) {
            let p = first.prepare(x)?;
            layers.iter().map(|l| l.apply(x, &p)).collect()
        } else {
            layers.iter().map(|l| l.forward(x)).collect()
        }
    }

    /// Layers on the bf16 GEMM applied to the same f32 rows `x` (`[rows, inp]`), the input
    /// prepared once; row-major f32 outputs.
    pub(crate) fn packed_rows(layers: &[&Linear], x: &[f32], inp: usize) -> Result<Vec<Vec<f32>>> {
        let rule = layers.first().map(|l| l.input_rule());
        let same = layers.iter().all(|l| Some(l.input_rule()) == rule);
        let prepared = match rule {
            Some(r) if same => prepare_rows(r, x, inp)?,
            _ => {
                return Err(crate::error::Error::Internal(
                    "packed_rows on layers without one packed input rule".into(),
                ))
            }
        };
        layers
            .iter()
            .map(|l| match (l, &prepared) {
                (Linear::Packed { w, col_scale, .. }, Prepared::Packed(a, rs, rows)) => {
                    Ok(crate::runtime::gemm::gemm(
                        crate::runtime::gemm::Isa::detect(),
                        a,
                        *rows,
                        w,
                        rs.as_deref(),
                        col_scale.as_deref(),
                    ))
                }
                (Linear::Int8Packed { w, scale }, Prepared::PackedI8(a, xs, rows)) => {
                    Ok(int8_apply(w, scale, a, xs, *rows))
                }
                _ => Err(crate::error::Error::Internal(
                    "packed_rows layer and preparation disagree".into(),
                )),
            })
            .collect()
    }

    /// Whether this layer runs on one of the runner's own CPU GEMMs.
    pub(crate) fn is_packed(&self) -> bool {
        matches!(self, Linear::Packed { .. } | Linear::Int8Packed { .. })
    }

    /// `x Wᵀ` with `x` rounded to the weight's dtype first (bf16 weights take bf16 inputs; the
    /// product is in the weight's dtype).
    fn matmul(x: &Tensor, weight: &Tensor) -> Result<Tensor> {
        let x = &x.to_dtype(weight.dtype())?;
        {
            {
                let dims = x.dims().to_vec();
                let inp = *dims.last().expect("rank ≥ 1");
                let rows: usize = dims[..dims.len() - 1].iter().product();
                let y = x.reshape((rows, inp))?.matmul(&weight.t()?)?;
                let mut out_dims = dims;
                *out_dims.last_mut().expect("rank ≥ 1") = weight.dim(0)?;
                Ok(y.reshape(out_dims)?)
            }
        }
    }

    /// A [`Linear::Widened`] layer from little-endian bf16 bytes `[out, in]` on the CPU, copied
    /// in slices of rows with `done(byte_range)` called after each, so that a mapped source
    /// can drop the pages already copied (the weight is never resident twice).
    pub fn widened_from_bf16_bytes(
        bytes: &[u8],
        out: usize,
        inp: usize,
        done: &dyn Fn(std::ops::Range<usize>),
    ) -> Result<Self> {
        let mut v: Vec<half::bf16> = Vec::with_capacity(out * inp);
        let rows = (WIDEN_SLICE_ELEMS / inp.max(1)).max(1);
        for r0 in (0..out).step_by(rows) {
            let range = r0 * inp * 2..(r0 + rows).min(out) * inp * 2;
            v.extend(
                bytes[range.clone()]
                    .chunks_exact(2)
                    .map(|b| half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]]))),
            );
            done(range);
        }
        Ok(Linear::Widened {
            weight: Tensor::from_vec(v, (out, inp), &Device::Cpu)?,
            slice_rows: rows,
        })
    }

    /// `x Wᵀ` in f32 with `W` widened from bf16 `slice_rows` output rows at a time.
    fn widened_matmul(x: &Tensor, weight: &Tensor, slice_rows: usize) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let inp = *dims.last().expect("rank ≥ 1");
        let rows: usize = dims[..dims.len() - 1].iter().product();
        let x = x.to_dtype(DType::F32)?.reshape((rows, inp))?;
        let out = weight.dim(0)?;
        let step = slice_rows.max(1);
        let mut parts = Vec::with_capacity(out.div_ceil(step));
        for r0 in (0..out).step_by(step) {
            let w = weight
                .narrow(0, r0, step.min(out - r0))?
                .to_dtype(DType::F32)?;
            parts.push(x.matmul(&w.t()?)?);
        }
        let y = Tensor::cat(&parts, 1)?;
        let mut out_dims = dims;
        *out_dims.last_mut().expect("rank ≥ 1") = out;
        Ok(y.reshape(out_dims)?)
    }

    /// `[out, in]`.
    pub fn shape(&self) -> (usize, usize) {
        match self {
            Linear::Dense { weight }
            | Linear::Fp8 { weight, .. }
            | Linear::Int8 {
                dequantized: weight,
                ..
            } => {
                let d = weight.dims();
                (d[0], d[1])
            }
            Linear::Widened { weight, .. } => {
                let d = weight.dims();
                (d[0], d[1])
            }
            Linear::Packed { w, .. } => w.shape(),
            Linear::Int8Packed { w, .. } => w.shape(),
            Linear::Device(d) => d.shape(),
            Linear::Ggml { w } => match w.as_ref() {
                candle_core::quantized::QMatMul::QTensor(q) => {
                    let d = q.shape().dims();
                    (d[0], d[1])
                }
                candle_core::quantized::QMatMul::Tensor(t)
                | candle_core::quantized::QMatMul::TensorF16(t) => {
                    let d = t.dims();
                    (d[0], d[1])
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NVFP4 with NVFP4 activations, in both runner forms (bf16 panels on the CPU GEMM; f32
    /// dense with the activations rounded on the host), against an f64 sum of the dequantized
    /// values, the activation rounding written out from its definition: per 16, scale
    /// `e4m3(G · amax / 6)`, values to the nearest E2M1 magnitude (ties to even) of
    /// `x / (s / G)` clamped to ±6. The products are exact, so only the f32 accumulation differs.
    #[test]
    fn nvfp4_forms_match_an_f64_reference() {
        use crate::numerics::fp8::{e4m3_to_f32, f32_to_e4m3};
        let (out, inp, rows) = (24usize, 64usize, 5usize);
        let mut rng = crate::numerics::rng::SplitMix64::new(29);
        let packed: Vec<u8> = (0..out * inp / 2).map(|_| rng.next_u64() as u8).collect();
        let scales: Vec<u8> = (0..out * inp / 16)
            .map(|_| 0x30 + (rng.next_u64() % 32) as u8)
            .collect();
        let values = crate::quant::nvfp4::decode_unscaled(&packed, &scales, inp);
        let m = 1.0f32 / 300.0;
        let x: Vec<f32> = (0..rows * inp)
            .map(|i| {
                ((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * (1.0 + (i % 7) as f32)
            })
            .collect();
        let amax = x.iter().fold(0f32, |a, v| a.max(v.abs()));
        let g = 2688.0 / amax;
        let grid = [0.0f64, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
        let xq: Vec<f64> = x
            .chunks(16)
            .flat_map(|grp| {
                let a = grp.iter().fold(0f32, |m, v| m.max(v.abs()));
                let s = e4m3_to_f32(f32_to_e4m3((g * (a * (1.0 / 6.0))).min(448.0)));
                grp.iter()
                    .map(|&v| {
                        if s == 0.0 {
                            return 0.0;
                        }
                        let t = ((v * (1.0 / (s * (1.0 / g)))) as f64).clamp(-6.0, 6.0);
                        let mut best = (0usize, f64::INFINITY);
                        for (i, q) in grid.iter().enumerate() {
                            let d = (t.abs() - q).abs();
                            if d < best.1 || (d == best.1 && i % 2 == 0) {
                                best = (i, d);
                            }
                        }
                        grid[best.0].copysign(t) * s as f64 / g as f64
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        let xt = Tensor::from_vec(x, (1, rows, inp), &Device::Cpu).unwrap();
        for dtype in [DType::BF16, DType::F32] {
            let data = WeightData::Nvfp4 {
                packed: &packed,
                scales: &scales,
                multiplier: m,
                act: ActQuant::Nvfp4(g),
            };
            let l = Linear::build(data, out, inp, dtype, &Device::Cpu).unwrap();
            let y: Vec<f32> = l
                .forward(&xt)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            for r in 0..rows {
                for o in 0..out {
                    let terms =
                        (0..inp).map(|k| xq[r * inp + k] * values[o * inp + k] as f64 * m as f64);
                    let (sum, abs) = terms.fold((0.0, 0.0), |(s, a), t| (s + t, a + t.abs()));
                    let got = y[r * out + o] as f64;
                    // f32 accumulation and scaling: a few units of 2^-24 of Σ|terms|; the f32
                    // form's bf16-free weights differ from exact only by the f32 multiplier.
                    assert!(
                        (got - sum).abs() <= 1e-5 * abs + 1e-9,
                        "{dtype:?} [{r},{o}]: {got} vs {sum}"
                    );
                }
            }
        }
    }

    /// The widened head form against an f64 sum of the same bf16 weights (bf16 → f32 is exact,
    /// so only the f32 accumulation of `inp` products differs: a few units of 2^-24 of Σ|terms|
    /// per step, bounded by 1e-5 · Σ|terms| for inp = 300), with slices of every kind: one
    /// row, short last slices, one slice. The whole-f32 dense form is held to the same bound
    /// (candle's GEMM picks its kernel by the output width, so slices may sum in another order
    /// than the whole matrix: equal values are not promised bit for bit). The copy's `done`
    /// ranges cover the bytes once, in order.
    #[test]
    fn widened_head_matches_an_f64_reference_like_the_dense_f32_form() {
        let (out, inp, rows) = (451usize, 300usize, 9usize);
        let mut rng = crate::numerics::rng::SplitMix64::new(41);
        let mut uni = || (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
        let bytes: Vec<u8> = (0..out * inp)
            .flat_map(|_| half::bf16::from_f32(uni() * 0.2).to_bits().to_le_bytes())
            .collect();
        let w: Vec<f64> = bytes
            .chunks_exact(2)
            .map(|b| half::bf16::from_bits(u16::from_le_bytes([b[0], b[1]])).to_f64())
            .collect();
        let x: Vec<f32> = (0..rows * inp).map(|_| uni() * 4.0).collect();
        let xt = Tensor::from_vec(x.clone(), (1, rows, inp), &Device::Cpu).unwrap();
        let check = |l: &Linear, what: &str| {
            assert_eq!(l.shape(), (out, inp));
            let y = l.forward(&xt).unwrap();
            assert_eq!(y.dims(), &[1, rows, out], "{what}");
            assert_eq!(y.dtype(), DType::F32, "{what}");
            let got: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
            for r in 0..rows {
                for o in 0..out {
                    let terms = (0..inp).map(|k| x[r * inp + k] as f64 * w[o * inp + k]);
                    let (sum, abs) = terms.fold((0.0, 0.0), |(s, a), t| (s + t, a + t.abs()));
                    let g = got[r * out + o] as f64;
                    assert!(
                        (g - sum).abs() <= 1e-5 * abs,
                        "{what} [{r},{o}]: {g} vs {sum}"
                    );
                }
            }
        };
        let dense = Linear::build(
            WeightData::Bf16Bytes(&bytes),
            out,
            inp,
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        check(&dense, "dense f32");
        let seen = std::sync::Mutex::new(Vec::new());
        let built =
            Linear::widened_from_bf16_bytes(&bytes, out, inp, &|r| seen.lock().unwrap().push(r))
                .unwrap();
        let seen = seen.into_inner().unwrap();
        assert_eq!(seen.first().map(|r| r.start), Some(0));
        assert!(seen.windows(2).all(|w| w[0].end == w[1].start));
        assert_eq!(seen.last().map(|r| r.end), Some(bytes.len()));
        check(&built, "widened as built");
        let Linear::Widened { weight, .. } = built else {
            panic!("not the widened form")
        };
        assert_eq!(weight.dtype(), DType::BF16);
        for slice_rows in [1usize, 7, 64, 450, out] {
            let l = Linear::Widened {
                weight: weight.clone(),
                slice_rows,
            };
            check(&l, &format!("widened, slices of {slice_rows}"));
        }
    }

    #[test]
    fn shared_int8_activations_equal_separate_layers() {
        let (out, inp, rows) = (16usize, 64usize, 3usize);
        let mut rng = crate::numerics::rng::SplitMix64::new(3);
        let mut uni = || (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
        let x: Vec<f32> = (0..rows * inp).map(|_| uni() * 3.0).collect();
        let x = Tensor::from_vec(x, (1, rows, inp), &Device::Cpu).unwrap();
        for bf16 in [false, true] {
            let layers: Vec<Linear> = (0..3)
                .map(|_| {
                    let q: Vec<i8> = (0..out * inp).map(|_| (uni() * 254.0) as i8).collect();
                    let sc: Vec<f32> = (0..out).map(|i| 1e-2 / (1.0 + i as f32)).collect();
                    if bf16 {
                        let data = WeightData::Int8 {
                            q,
                            scales: sc,
                            dynamic: true,
                        };
                        Linear::build_device(data, out, inp, &Device::Cpu).unwrap()
                    } else {
                        Linear::int8(&q, sc, out, inp, true, DType::F32, &Device::Cpu).unwrap()
                    }
                })
                .collect();
            let refs: Vec<&Linear> = layers.iter().collect();
            let shared = Linear::forward_shared(&refs, &x).unwrap();
            for (l, y) in layers.iter().zip(&shared) {
                let a: Vec<f32> = l
                    .forward(&x)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let b: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
                assert_eq!(a, b, "bf16 form: {bf16}");
            }
        }
    }

    /// The integer GEMM form of W8A8 against the f64 exact form: identical bits (both sums are
    /// exact and the scaling is the same), per-token dynamic.
    #[test]
    fn packed_int8_equals_the_exact_f64_form() {
        let (out, inp, rows) = (40usize, 200usize, 9usize);
        let mut rng = crate::numerics::rng::SplitMix64::new(17);
        let mut uni = || (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
        let q: Vec<i8> = (0..out * inp).map(|_| (uni() * 254.0) as i8).collect();
        let sc: Vec<f32> = (0..out).map(|i| 1e-3 * (1.0 + i as f32)).collect();
        let x: Vec<f32> = (0..rows * inp).map(|_| uni() * 6.0).collect();
        let x = Tensor::from_vec(x, (1, rows, inp), &Device::Cpu).unwrap();
        let exact = Linear::int8(&q, sc.clone(), out, inp, true, DType::F32, &Device::Cpu).unwrap();
        let data = WeightData::Int8 {
            q: q.clone(),
            scales: sc,
            dynamic: true,
        };
        let packed = Linear::build(data, out, inp, DType::BF16, &Device::Cpu).unwrap();
        assert!(matches!(packed, Linear::Int8Packed { .. }));
        let a: Vec<f32> = exact
            .forward(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let b: Vec<f32> = packed
            .forward(&x)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn round_half_even_matches_the_host_rule_on_ties_and_neighbours() {
        let mut v: Vec<f32> = (-254..=254).map(|k| k as f32 * 0.5).collect();
        v.extend([0.49999997, -0.49999997, 126.50001, -126.49999, 3.0e6 + 0.5]);
        let t = Tensor::new(v.as_slice(), &Device::Cpu).unwrap();
        let got: Vec<f32> = round_half_even(&t).unwrap().to_vec1().unwrap();
        for (x, g) in v.iter().zip(&got) {
            assert_eq!(*g, x.round_ties_even(), "round({x})");
        }
    }

    /// Activation rows with the cases rounding rules disagree on: zeros, exact ties of the
    /// E4M3 / INT8 / E2M1 grids, saturation, tiny (subnormal E4M3) values, and noise.
    fn awkward_rows(rows: usize, inp: usize, seed: u64) -> Vec<f32> {
        let mut rng = crate::numerics::rng::SplitMix64::new(seed);
        let mut x: Vec<f32> = (0..rows * inp)
            .map(|i| {
                let u = (rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                match i % 11 {
                    0 => 0.0,
                    1 => 1.0625 * (1 + i % 5) as f32, // E4M3 ties at unit scale
                    2 => -2.5,
                    3 => 1e-4 * u,
                    4 => 3000.0 * u,
                    _ => 6.0 * u,
                }
            })
            .collect();
        x[..inp].iter_mut().for_each(|v| *v = 0.0); // an all-zero row
        x
    }

    /// Every device-form kernel's CPU twin against the CPU runner's own arithmetic, bit for
    /// bit: weight widening (E4M3, INT8, packed INT4/INT8, NVFP4) and activation rounding (FP8
    /// per token and static, INT8 per token, NVFP4).
    #[test]
    fn kernel_twins_equal_the_cpu_paths_bit_for_bit() {
        use crate::runtime::devform::twin;
        let b16 = |v: f32| half::bf16::from_f32(v).to_bits();
        // Weights: all 256 codes.
        let all: Vec<u8> = (0..=255).collect();
        let table = crate::numerics::fp8::e4m3_table();
        let want: Vec<u16> = all.iter().map(|&c| b16(table[c as usize])).collect();
        assert_eq!(twin::widen_e4m3(&all), want);
        let want: Vec<u16> = all.iter().map(|&c| b16(c as i8 as f32)).collect();
        assert_eq!(twin::widen_i8(&all), want);
        let mut rng = crate::numerics::rng::SplitMix64::new(41);
        for (bits, inp, groups) in [(4u32, 96usize, 3usize), (8, 64, 2), (4, 40, 1)] {
            let out = 7;
            let words = inp.div_ceil((32 / bits) as usize);
            let bytes: Vec<u8> = (0..out * words * 4).map(|_| rng.next_u64() as u8).collect();
            let scales: Vec<f32> = (0..out * groups)
                .map(|i| 1e-3 * (1.0 + i as f32) / 3.0)
                .collect();
            let cpu = WeightData::packed_int_values(&bytes, &scales, out, inp, bits);
            let want: Vec<u16> = cpu.iter().map(|&v| b16(v)).collect();
            let got = twin::widen_packed(&bytes, &scales, out, inp, bits, groups);
            assert_eq!(got, want, "packed {bits} bits");
        }
        let (out, inp) = (5usize, 64usize);
        let nib: Vec<u8> = (0..out * inp / 2).map(|_| rng.next_u64() as u8).collect();
        let sc: Vec<u8> = (0..out * inp / 16).map(|i| (i * 37 % 0x7E) as u8).collect();
        let cpu = crate::quant::nvfp4::decode_unscaled(&nib, &sc, inp);
        let want: Vec<u16> = cpu.iter().map(|&v| b16(v)).collect();
        assert_eq!(twin::widen_nvfp4(&nib, &sc), want);

        // Codes back to bytes for the FP8 and INT8 GEMMs: every non-NaN E4M3 code and every
        // INT8 code round-trips.
        let finite: Vec<u8> = all.iter().copied().filter(|c| c & 0x7F != 0x7F).collect();
        let bits: Vec<u16> = finite.iter().map(|&c| twin::e4m3_bf16(c)).collect();
        assert_eq!(twin::codes_to_e4m3(&bits), finite);
        let ints: Vec<u16> = (-127..=127).map(|v| b16(v as f32)).collect();
        let want: Vec<u8> = (-127i32..=127).map(|v| v as i8 as u8).collect();
        assert_eq!(twin::codes_to_i8(&ints), want);

        // Activations.
        let (rows, inp) = (6usize, 80usize);
        let x = awkward_rows(rows, inp, 5);
        for act in [ActQuant::DynamicToken, ActQuant::Static(0.037)] {
            let (codes, scales) = fp8_code_rows(&x, inp, inp, act);
            let s = match act {
                ActQuant::Static(v) => vec![v],
                _ => twin::row_scales(&x, inp, 0, 448.0, FP8_MIN_TOKEN_SCALE),
            };
            if let ActQuant::DynamicToken = act {
                assert_eq!(s, scales);
            }
            assert_eq!(twin::act_codes(&x, &s, inp, 0), codes, "{act:?}");
        }
        let (a, s) = crate::runtime::gemm_i8::quantize_rows(&x, inp, inp);
        assert_eq!(twin::row_scales(&x, inp, 1, 127.0, 0.0), s);
        let want: Vec<u16> = a.iter().map(|&c| b16(c as f32 - 128.0)).collect();
        assert_eq!(twin::act_codes(&x, &s, inp, 1), want);
        for g in [2688.0 / 3000.0, 1.0, 448.0] {
            let q = nvfp4_rows(&x, inp, g);
            let want: Vec<u16> = q.iter().map(|&v| b16(v)).collect();
            assert_eq!(twin::nvfp4_act(&x, g), want, "g {g}");
        }
    }

    /// f64 reference of a device form from its twins' exact operands: `Σ a·w` per output with
    /// `Σ |a·w|`, times the row and column scales.
    fn device_reference(l: &Linear, x: &Tensor) -> (Vec<f64>, Vec<f64>) {
        let Linear::Device(d) = l else {
            panic!("not a device form")
        };
        let (a, rs) = d.prepare(x).unwrap();
        let a: Vec<f32> = a
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let rs: Option<Vec<f32>> = rs.map(|t| t.flatten_all().unwrap().to_vec1().unwrap());
        let w = d
            .apply(
                &Tensor::eye(d.inp, DType::BF16, &Device::Cpu).unwrap(),
                None,
            )
            .unwrap();
        // `apply` on the identity gives Wᵀ times the column scales; undo those.
        let cs: Vec<f32> = match &d.col_scale {
            Some(c) => c.flatten_all().unwrap().to_vec1().unwrap(),
            None => vec![1.0; d.out],
        };
        let wt: Vec<f32> = w.flatten_all().unwrap().to_vec1().unwrap();
        let rows = a.len() / d.inp;
        let (mut y, mut abs) = (vec![0f64; rows * d.out], vec![0f64; rows * d.out]);
        for r in 0..rows {
            for o in 0..d.out {
                let (mut s, mut m) = (0f64, 0f64);
                for k in 0..d.inp {
                    let t = a[r * d.inp + k] as f64 * (wt[k * d.out + o] / cs[o]) as f64;
                    s += t;
                    m += t.abs();
                }
                let f = rs.as_ref().map_or(1.0, |v| v[r] as f64) * cs[o] as f64;
                y[r * d.out + o] = s * f;
                abs[r * d.out + o] = m * f.abs();
            }
        }
        (y, abs)
    }

    /// Each GPU form (run here by its twins) and the matching CPU form against the f64 sum of
    /// the same exact products: both within the f32 summation bound `k · 2^-24 · Σ|a·w|` plus
    /// the two f32 scalings (so CUDA and the CPU's `--dtype bf16` differ only in summation order).
    #[test]
    fn device_forms_match_the_cpu_forms_up_to_summation_order() {
        let (out, inp) = (24usize, 96usize);
        let mut rng = crate::numerics::rng::SplitMix64::new(29);
        let codes: Vec<u8> = (0..out * inp)
            .map(|_| (rng.next_u64() % 256) as u8)
            .map(|c| if c & 0x7f == 0x7f { 0 } else { c })
            .collect();
        let q: Vec<i8> = codes.iter().map(|&c| c as i8).collect();
        let sc: Vec<f32> = (0..out).map(|i| 1e-2 * (1.0 + i as f32)).collect();
        let bf: Vec<u8> = codes
            .iter()
            .flat_map(|&c| {
                half::bf16::from_f32(c as i8 as f32 / 37.0)
                    .to_bits()
                    .to_le_bytes()
            })
            .collect();
        let words: Vec<u8> = (0..out * inp / 8 * 4)
            .map(|_| rng.next_u64() as u8)
            .collect();
        let nib: Vec<u8> = codes[..out * inp / 2].to_vec();
        let nsc: Vec<u8> = (0..out * inp / 16).map(|i| 0x28 + (i % 24) as u8).collect();
        let make = |k: usize| -> WeightData<'_> {
            match k {
                0 => WeightData::Bf16Bytes(&bf),
                1 => WeightData::Fp8 {
                    codes: &codes,
                    scales: sc.clone(),
                    act: ActQuant::DynamicToken,
                },
                2 => WeightData::Fp8 {
                    codes: &codes,
                    scales: vec![0.5],
                    act: ActQuant::Static(0.02),
                },
                3 => WeightData::Fp8 {
                    codes: &codes,
                    scales: sc.clone(),
                    act: ActQuant::None,
                },
                4 => WeightData::Int8 {
                    q: q.clone(),
                    scales: sc.clone(),
                    dynamic: true,
                },
                5 => WeightData::Int8 {
                    q: q.clone(),
                    scales: sc.clone(),
                    dynamic: false,
                },
                6 => WeightData::PackedInt {
                    words: &words,
                    scales: vec![0.01; out * 3],
                    bits: 4,
                    groups: 3,
                },
                7 => WeightData::Nvfp4 {
                    packed: &nib,
                    scales: &nsc,
                    multiplier: 0.003,
                    act: ActQuant::Nvfp4(1.5),
                },
                _ => WeightData::Nvfp4 {
                    packed: &nib,
                    scales: &nsc,
                    multiplier: 0.003,
                    act: ActQuant::None,
                },
            }
        };
        for rows in [1usize, 3, 6] {
            // Up to `GEMV_ROWS` rows run `mt_gemv` on the stored bytes; more widen for cuBLAS.
            let x = Tensor::from_vec(
                awkward_rows(rows, inp, 9 + rows as u64),
                (rows, inp),
                &Device::Cpu,
            )
            .unwrap();
            for k in 0..9 {
                let cpu = Linear::build(make(k), out, inp, DType::BF16, &Device::Cpu).unwrap();
                let gpu = Linear::build_device(make(k), out, inp, &Device::Cpu).unwrap();
                assert_eq!(gpu.shape(), (out, inp));
                let (want, abs) = device_reference(&gpu, &x);
                let a: Vec<f32> = cpu
                    .forward(&x)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let b: Vec<f32> = gpu
                    .forward(&x)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                if k == 4 && rows <= crate::runtime::devform::GEMV_ROWS {
                    // W8A8 at decode size: exact i32 sums and the CPU's f64 scaling.
                    assert_eq!(
                        a, b,
                        "W8A8, {rows} rows: the GPU form equals the CPU bit for bit"
                    );
                }
                let u = 2f64.powi(-24);
                for i in 0..want.len() {
                    let tol = (inp as f64 + 2.0) * u * abs[i] + 3.0 * u * want[i].abs() + 1e-30;
                    let what = format!("case {k}, {rows} rows, [{i}]");
                    assert!(
                        (a[i] as f64 - want[i]).abs() <= tol,
                        "{what} CPU: {} vs {}",
                        a[i],
                        want[i]
                    );
                    assert!(
                        (b[i] as f64 - want[i]).abs() <= tol,
                        "{what} GPU: {} vs {}",
                        b[i],
                        want[i]
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod cast_tests {
    /// The CPU's FP8 round trip (`fp8_round_trip`, the KV cache's and FP8 activations' on a
    /// CPU) rounds through candle's f32 → E4M3 cast; the GPU's through `mt_act_codes`, whose
    /// twin is `numerics::fp8::f32_to_e4m3`. Both must give the same code for every value: a
    /// geometric sweep over the whole range (both signs, subnormals included) and every tie
    /// between neighbouring codes, where round-to-nearest-even decides.
    #[test]
    fn candle_cpu_e4m3_cast_equals_ours() {
        use crate::numerics::fp8::{e4m3_to_f32, f32_to_e4m3};
        use candle_core::{DType, Device, Tensor};
        let mut xs = Vec::new();
        let mut v = 1e-5f32;
        while v < 460.0 {
            xs.extend([v, -v]);
            v *= 1.0007;
        }
        for c in 0u8..126 {
            let mid = (e4m3_to_f32(c) + e4m3_to_f32(c + 1)) / 2.0;
            xs.extend([mid, -mid]);
        }
        let t = Tensor::new(xs.as_slice(), &Device::Cpu).unwrap();
        let got: Vec<f32> = t
            .to_dtype(DType::F8E4M3)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1()
            .unwrap();
        for (x, y) in xs.iter().zip(&got) {
            let ours = e4m3_to_f32(f32_to_e4m3(x.clamp(-448.0, 448.0)));
            assert_eq!(ours.to_bits(), y.to_bits(), "x = {x:e}");
        }
    }
}
