//! The GPU form of a linear layer ([`DeviceLinear`]): weights stay on the device in their
//! stored precision (bf16; E4M3 and INT8 codes, one byte each; packed INT4/INT8 words with
//! their group scales; NVFP4 nibbles with their E4M3 group scales), activations are rounded on
//! the device, and every product goes through one bf16 × bf16 → f32 GEMM:
//!
//! 1. activations: bf16 (weight-only), or FP8 / INT8 codes (exact in bf16) with per-row scales,
//!    or NVFP4 `q · s` values (exact in bf16) with `1 / g` per row;
//! 2. weights: widened to bf16 from their codes (exact for E4M3, INT8 and NVFP4; packed
//!    integer weights times their group scale rounded to bf16, as the CPU form rounds them);
//! 3. `y = A · Wᵀ` with f32 accumulation and f32 output (cuBLAS `GemmEx`, bf16 inputs, f32 C);
//! 4. `y · row_scale · col_scale` in f32, in that order (the CPU GEMM's epilogue).
//!
//! Every step is a candle custom op whose CUDA side launches a kernel of
//! `src/runtime/kernels.cu` (or cuBLAS) and whose CPU side is that kernel's *twin*: the same
//! arithmetic written plainly in Rust ([`twin`]). The tests compare the twins bit for bit with
//! the CPU runner's own code, and the whole form with the CPU's packed form; with
//! `minitron-verify --emulate-gpu-forms` a CPU run uses these forms throughout, which is how
//! `scripts/gpu-check.sh --rehearse` exercises the GPU arithmetic without a GPU.

use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Device, Layout, Shape, Tensor};
use half::bf16;

use crate::error::Result;

static EMULATE: AtomicBool = AtomicBool::new(false);

/// Makes CPU loads build the GPU forms too (for rehearsals and tests of the GPU arithmetic).
pub fn set_emulate(on: bool) {
    EMULATE.store(on, Ordering::Relaxed);
}

/// Whether a bf16 load on `device` builds [`DeviceLinear`]s: always on a GPU, on a CPU when
/// emulating.
pub fn wanted(device: &Device, dtype: DType) -> bool {
    dtype == DType::BF16 && (!device.is_cpu() || EMULATE.load(Ordering::Relaxed))
}

/// FP8 per-token scale floor (vLLM's `1 / (448 · 512)`).
const FP8_FLOOR: f32 = crate::numerics::fp8::FP8_MIN_TOKEN_SCALE;
const E4M3_MAX: f32 = crate::numerics::fp8::E4M3_MAX;

/// A weight as it is held on the device.
#[derive(Debug, Clone)]
pub enum DevWeight {
    /// bf16 `[out, in]`.
    Bf16(Tensor),
    /// E4M3 codes `[out, in]` (u8).
    E4m3(Tensor),
    /// INT8 codes `[out, in]` (u8 holding two's complement bytes).
    I8(Tensor),
    /// compressed-tensors packed integers: u8 bytes of little-endian u32 words `[out, words·4]`
    /// with `32 / bits` values each (offset `2^(bits-1)`), f32 group scales `[out, groups]`.
    Packed {
        words: Tensor,
        scales: Tensor,
        bits: u32,
        groups: usize,
    },
    /// NVFP4: E2M1 nibbles `[out, in/2]` (low nibble first) and E4M3 group scales
    /// `[out, in/16]`, both u8; the per-tensor factor is the layer's column scale.
    Nvfp4 { packed: Tensor, scales: Tensor },
}

/// How activations enter the GEMM.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum DevAct {
    /// bf16 (weight-only kernels).
    Bf16,
    /// E4M3 codes with a per-token scale `max(absmax / 448, 1 / (448·512))`.
    Fp8Token,
    /// E4M3 codes with one static scale.
    Fp8Static(f32),
    /// INT8 codes with a per-token scale `absmax / 127` (vLLM's W8A8).
    Int8Token,
    /// NVFP4 values `q · s` under this global scale multiplier; `1 / g` per row after the sum.
    Nvfp4(f32),
}

/// Prints `msg` to stderr the first time only.
fn warn_once(msg: &str) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| eprintln!("warning: {msg}"));
}

/// Inputs of at most this many rows (decode) are multiplied straight from the stored weights.
pub const GEMV_ROWS: usize = 4;

/// A linear layer in its GPU form (see the module documentation).
#[derive(Debug, Clone)]
pub struct DeviceLinear {
    pub w: DevWeight,
    /// Per-output-channel factors `[1, out]` (f32), applied after the row scales.
    pub col_scale: Option<Tensor>,
    pub act: DevAct,
    pub out: usize,
    pub inp: usize,
}

fn gpu_gemm_setting() -> &'static str {
    static SETTING: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SETTING.get_or_init(|| std::env::var("MINITRON_GPU_GEMM").unwrap_or_default())
}

/// Whether prefill may use cuBLAS's integer GEMM for W8A8 (exact i32 sums, as the CPU): yes
/// unless `MINITRON_GPU_GEMM=widen`, a diagnostic that sends every format through the widened
/// bf16 GEMM (exact products, f32 sums).
fn native_gemm() -> bool {
    gpu_gemm_setting() != "widen"
}

/// Whether prefill uses cuBLASLt's FP8 GEMM: only with `MINITRON_GPU_GEMM=native`. On an H200
/// its sums were not the f32 sums of the exact products: static FP8 on the tiny fixture moved
/// perplexity 0.139 % from the CPU (the widened GEMM: 0.0000 %), and at this runner's sizes it
/// was no faster than widening the codes to bf16 (README, CUDA section).
fn native_fp8_gemm() -> bool {
    gpu_gemm_setting() == "native"
}

impl DeviceLinear {
    /// `[out, in]`.
    pub fn shape(&self) -> (usize, usize) {
        (self.out, self.inp)
    }

    /// Bytes the weight takes on the device (codes, scales; not the per-call bf16 widening).
    pub fn weight_bytes(&self) -> usize {
        let b = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        match &self.w {
            DevWeight::Bf16(t) | DevWeight::E4m3(t) | DevWeight::I8(t) => b(t),
            DevWeight::Packed { words, scales, .. } => b(words) + b(scales),
            DevWeight::Nvfp4 { packed, scales } => b(packed) + b(scales),
        }
    }

    /// The activation preparation, keyed so layers reading the same input can share it.
    pub(crate) fn act_key(&self) -> DevAct {
        self.act
    }

    /// Prepares `x` (`[rows, in]`, any float dtype) as this layer's GEMM reads it: bf16 values
    /// and optional per-row scales `[rows, 1]` (f32).
    pub(crate) fn prepare(&self, x: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        let xf = x.to_dtype(DType::F32)?.contiguous()?;
        let rows = xf.dim(0)?;
        Ok(match self.act {
            DevAct::Bf16 => (xf.to_dtype(DType::BF16)?, None),
            DevAct::Fp8Token | DevAct::Int8Token => {
                let (mode, qmax, floor) = if self.act == DevAct::Fp8Token {
                    (0, E4M3_MAX, FP8_FLOOR)
                } else {
                    (1, 127.0, 0.0)
                };
                let s = xf.apply_op1_no_bwd(&RowScales { mode, qmax, floor })?;
                let a = xf.apply_op2_no_bwd(&s, &ActCodes { mode })?;
                (a, Some(s))
            }
            DevAct::Fp8Static(v) => {
                let s = Tensor::new(&[v], xf.device())?;
                let a = xf.apply_op2_no_bwd(&s, &ActCodes { mode: 0 })?;
                (a, Some(Tensor::full(v, (rows, 1), xf.device())?))
            }
            DevAct::Nvfp4(g) => {
                let inv = if g == 0.0 { 0.0 } else { 1.0 / g };
                let a = xf.apply_op1_no_bwd(&Nvfp4Act { g })?;
                (a, Some(Tensor::full(inv, (rows, 1), xf.device())?))
            }
        })
    }

    /// The weight as bf16 `[out, in]`.
    fn widened(&self) -> Result<Tensor> {
        let (out, inp) = (self.out, self.inp);
        Ok(match &self.w {
            DevWeight::Bf16(t) => t.clone(),
            DevWeight::E4m3(t) => t.apply_op1_no_bwd(&Widen::E4m3)?,
            DevWeight::I8(t) => t.apply_op1_no_bwd(&Widen::I8)?,
            DevWeight::Packed {
                words,
                scales,
                bits,
                groups,
            } => words.apply_op2_no_bwd(
                scales,
                &WidenPacked {
                    rows: out,
                    cols: inp,
                    bits: *bits,
                    groups: *groups,
                },
            )?,
            DevWeight::Nvfp4 { packed, scales } => {
                packed.apply_op2_no_bwd(scales, &WidenNvfp4 { cols: inp })?
            }
        })
    }

    /// The decode-size product's operands: kind, weight bytes, auxiliary data, bits, groups
    /// (none for bf16 weights, which cuBLAS reads as they are).
    fn gemv_operands(&self) -> Option<(u32, &Tensor, Option<&Tensor>, u32, usize)> {
        match &self.w {
            DevWeight::Bf16(_) => None,
            DevWeight::E4m3(t) => Some((0, t, None, 0, 0)),
            DevWeight::I8(t) => Some((1, t, None, 0, 0)),
            DevWeight::Packed {
                words,
                scales,
                bits,
                groups,
            } => Some((2, words, Some(scales), *bits, *groups)),
            DevWeight::Nvfp4 { packed, scales } => Some((3, packed, Some(scales), 0, 0)),
        }
    }

    /// `y = prepared · Wᵀ`, scaled: f32 `[rows, out]`. Up to [`GEMV_ROWS`] rows (decode) are
    /// multiplied straight from the stored weight bytes (`mt_gemv`); more rows widen the
    /// weight to bf16 once for cuBLAS. W8A8's integer sums are exact either way only on the
    /// first path (i32); the second sums exact products in f32.
    pub(crate) fn apply(&self, a: &Tensor, row_scale: Option<&Tensor>) -> Result<Tensor> {
        let rows = a.dim(0)?;
        if let Some((kind, w, aux, bits, groups)) = self.gemv_operands() {
            if rows <= GEMV_ROWS && self.inp.is_multiple_of(8) {
                // Kinds without auxiliary data never read it: the weight stands in.
                let aux = aux.unwrap_or(w);
                let op = Gemv {
                    kind,
                    bits,
                    groups,
                    out: self.out,
                    exact: self.act == DevAct::Int8Token,
                    row_scale: row_scale.cloned(),
                    col_scale: self.col_scale.clone(),
                };
                // Scaled in the kernel, in the order `scale` and `Int8Epilogue` use: one launch
                // per decode product instead of three (decode is launch-bound).
                return Ok(a.apply_op3_no_bwd(w, aux, &op)?);
            }
        }
        let native = native_gemm();
        if let (true, DevAct::Int8Token, DevWeight::I8(w), Some(rs), Some(cs)) =
            (native, self.act, &self.w, row_scale, &self.col_scale)
        {
            // W8A8: INT8 × INT8 with exact i32 sums (vLLM's semantics, and the CPU's), then
            // the CPU's f64 scaling. A GPU whose cuBLAS refuses the integer GEMM for these
            // shapes falls back to the bf16 path below (exact products, f32 sums).
            let exact = a
                .apply_op1_no_bwd(&CodesToBytes::I8)
                .and_then(|ai| ai.apply_op2_no_bwd(w, &MatmulI32))
                .and_then(|acc| acc.apply_op3_no_bwd(rs, cs, &Int8Epilogue));
            match exact {
                Ok(y) => return Ok(y),
                Err(e) => warn_once(&format!(
                    "the INT8 GEMM is not available here ({e}); W8A8 falls back to bf16 products \
                     with f32 sums"
                )),
            }
        }
        if let (true, DevAct::Fp8Token | DevAct::Fp8Static(_), DevWeight::E4m3(w)) =
            (native_fp8_gemm(), self.act, &self.w)
        {
            // FP8 × FP8 on the tensor cores (cuBLASLt), f32 output, our scaling after.
            let fp8 = a
                .apply_op1_no_bwd(&CodesToBytes::E4m3)
                .and_then(|a8| a8.apply_op2_no_bwd(w, &MatmulE4m3));
            match fp8 {
                Ok(y) => return self.scale(y, row_scale),
                Err(e) => warn_once(&format!(
                    "the FP8 GEMM is not available here ({e}); FP8 falls back to bf16 products \
                     with f32 sums (the same exact products)"
                )),
            }
        }
        let w = self.widened()?;
        let y = a.apply_op2_no_bwd(&w, &MatmulF32)?;
        self.scale(y, row_scale)
    }

    /// `y · row_scale · col_scale` in f32, in that order.
    fn scale(&self, y: Tensor, row_scale: Option<&Tensor>) -> Result<Tensor> {
        let mut y = y;
        if let Some(s) = row_scale {
            y = y.broadcast_mul(s)?;
        }
        if let Some(c) = &self.col_scale {
            y = y.broadcast_mul(c)?;
        }
        Ok(y)
    }

    /// Applies the layer to `x` (`[.., in]`): f32 `[.., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let rows: usize = dims[..dims.len().saturating_sub(1)].iter().product();
        let (a, s) = self.prepare(&x.reshape((rows, self.inp))?)?;
        let y = self.apply(&a, s.as_ref())?;
        let mut out_dims = dims;
        if let Some(l) = out_dims.last_mut() {
            *l = self.out;
        }
        Ok(y.reshape(out_dims)?)
    }
}

/// The kernels' arithmetic, written plainly: what `src/runtime/kernels.cu` computes, element by
/// element, in the same f32 operations. bf16 values are returned as bit patterns.
pub mod twin {
    use crate::numerics::fp8::{e4m3_to_f32, f32_to_e4m3};
    use rayon::prelude::*;

    /// f32 → bf16 bits, nearest even (`mt_bf16`).
    pub fn bf16_bits(v: f32) -> u16 {
        let b = v.to_bits();
        if v.is_nan() {
            return ((b >> 16) | 0x40) as u16;
        }
        (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16
    }

    /// bf16 bits of an E4M3 code's value (exact; NaN codes give `0x7FC0`).
    pub fn e4m3_bf16(c: u8) -> u16 {
        let v = e4m3_to_f32(c);
        if v.is_nan() {
            0x7FC0
        } else {
            (v.to_bits() >> 16) as u16
        }
    }

    /// E2M1 value of a 4-bit code (bit 3 the sign).
    pub fn e2m1(code: u8) -> f32 {
        const M: [f32; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];
        let v = M[(code & 7) as usize];
        if code & 8 != 0 {
            -v
        } else {
            v
        }
    }

    /// E2M1 magnitude code of `a ≥ 0`, ties to the even code (`mt_e2m1_magnitude`).
    pub fn e2m1_magnitude(a: f32) -> u8 {
        (a > 0.25) as u8
            + (a >= 0.75) as u8
            + (a > 1.25) as u8
            + (a >= 1.75) as u8
            + (a > 2.5) as u8
            + (a >= 3.5) as u8
            + (a > 5.0) as u8
    }

    /// `mt_widen_e4m3`.
    pub fn widen_e4m3(codes: &[u8]) -> Vec<u16> {
        codes.par_iter().map(|&c| e4m3_bf16(c)).collect()
    }

    /// `mt_widen_i8`.
    pub fn widen_i8(codes: &[u8]) -> Vec<u16> {
        codes
            .par_iter()
            .map(|&c| bf16_bits(c as i8 as f32))
            .collect()
    }

    /// `mt_widen_packed`.
    pub fn widen_packed(
        words: &[u8],
        scales: &[f32],
        rows: usize,
        cols: usize,
        bits: u32,
        groups: usize,
    ) -> Vec<u16> {
        let per = (32 / bits) as usize;
        let nwords = cols.div_ceil(per);
        let g = cols / groups.max(1);
        (0..rows * cols)
            .into_par_iter()
            .map(|i| {
                let (r, c) = (i / cols, i % cols);
                let w = &words[(r * nwords + c / per) * 4..][..4];
                let word = u32::from_le_bytes([w[0], w[1], w[2], w[3]]);
                let q = ((word >> ((c % per) as u32 * bits)) & ((1u32 << bits) - 1)) as i32
                    - (1i32 << (bits - 1));
                bf16_bits(q as f32 * scales[r * groups + c / g])
            })
            .collect()
    }

    /// `mt_widen_nvfp4`.
    pub fn widen_nvfp4(packed: &[u8], scales: &[u8]) -> Vec<u16> {
        (0..packed.len() * 2)
            .into_par_iter()
            .map(|i| {
                let b = packed[i / 2];
                let code = if i & 1 == 1 { b >> 4 } else { b & 0xF };
                bf16_bits(e2m1(code) * e4m3_to_f32(scales[i / 16]))
            })
            .collect()
    }

    /// `mt_row_scales`: mode 0 FP8 (`max(amax / qmax, floor)`), mode 1 INT8 (`amax / qmax`, 1
    /// for a zero row).
    pub fn row_scales(x: &[f32], cols: usize, mode: u32, qmax: f32, floor: f32) -> Vec<f32> {
        x.par_chunks(cols.max(1))
            .map(|r| {
                let amax = r.iter().fold(0f32, |m, v| m.max(v.abs()));
                if mode == 0 {
                    (amax / qmax).max(floor)
                } else if amax > 0.0 {
                    amax / qmax
                } else {
                    1.0
                }
            })
            .collect()
    }

    /// `mt_act_codes`: one scale per row, or one for all (`scales.len() == 1`).
    pub fn act_codes(x: &[f32], scales: &[f32], cols: usize, mode: u32) -> Vec<u16> {
        let per_row = scales.len() != 1;
        x.par_iter()
            .enumerate()
            .map(|(i, &v)| {
                let s = scales[if per_row { i / cols } else { 0 }];
                let q = v / s;
                if mode == 0 {
                    e4m3_bf16(f32_to_e4m3(q.clamp(-448.0, 448.0)))
                } else {
                    // `+ 0.0`: integer codes have no signed zero (-0 + 0 = +0).
                    bf16_bits(q.round_ties_even().clamp(-127.0, 127.0) + 0.0)
                }
            })
            .collect()
    }

    /// `mt_nvfp4_act`, groups of 16 along the flattened rows.
    pub fn nvfp4_act(x: &[f32], g: f32) -> Vec<u16> {
        let inv_g = if g == 0.0 { 0.0 } else { 1.0 / g };
        let sixth = 1.0f32 / 6.0;
        x.par_chunks(16)
            .flat_map_iter(|xg| {
                let amax = xg.iter().fold(0f32, |m, v| m.max(v.abs()));
                let s = e4m3_to_f32(f32_to_e4m3((g * (amax * sixth)).min(448.0)));
                let d = s * inv_g;
                let r = if d == 0.0 { 0.0 } else { 1.0 / d };
                xg.iter()
                    .map(move |&v| {
                        let q = (v * r).clamp(-6.0, 6.0);
                        let code = ((q < 0.0) as u8) << 3 | e2m1_magnitude(q.abs());
                        bf16_bits(e2m1(code) * s)
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Auxiliary weight data of [`gemv`]: packed group scales (f32) or NVFP4 group scales (u8).
    #[derive(Clone, Copy)]
    pub enum Aux<'a> {
        None,
        F32(&'a [f32]),
        U8(&'a [u8]),
    }

    /// `mt_weight`: weight `(o, j)` of a `[out, k]` weight in its stored form, as the f32 value
    /// of its bf16 form (kind 0 E4M3, 1 INT8, 2 packed, 3 NVFP4).
    #[allow(clippy::too_many_arguments)]
    pub fn weight(
        kind: u32,
        w: &[u8],
        aux: Aux,
        o: usize,
        j: usize,
        k: usize,
        bits: u32,
        groups: usize,
    ) -> f32 {
        let from_bits = |b: u16| f32::from_bits((b as u32) << 16);
        match (kind, aux) {
            (0, _) => from_bits(e4m3_bf16(w[o * k + j])),
            (1, _) => w[o * k + j] as i8 as f32,
            (2, Aux::F32(s)) => {
                let per = (32 / bits) as usize;
                let nwords = k.div_ceil(per);
                let p = &w[(o * nwords + j / per) * 4..][..4];
                let word = u32::from_le_bytes([p[0], p[1], p[2], p[3]]);
                let q = ((word >> ((j % per) as u32 * bits)) & ((1u32 << bits) - 1)) as i32
                    - (1i32 << (bits - 1));
                from_bits(bf16_bits(q as f32 * s[o * groups + j / (k / groups)]))
            }
            (3, Aux::U8(s)) => {
                let b = w[(o * k + j) / 2];
                let code = if j & 1 == 1 { b >> 4 } else { b & 0xF };
                e2m1(code) * e4m3_to_f32(s[(o * k + j) / 16])
            }
            _ => f32::NAN,
        }
    }

    /// The per-lane order of `mt_gemv`: lane `l` takes runs of 8 consecutive `j` from
    /// `8·l + 256·t`; then the xor butterfly over the 32 lane sums.
    fn butterfly<T: Copy + std::ops::Add<Output = T>>(mut v: [T; 32]) -> T {
        for off in [16usize, 8, 4, 2, 1] {
            let prev = v;
            for (l, x) in v.iter_mut().enumerate() {
                *x = prev[l] + prev[l ^ off];
            }
        }
        v[0]
    }

    /// `mt_gemv` (not exact): `y[r, o]` in f32, in the kernel's summation order.
    #[allow(clippy::too_many_arguments)]
    pub fn gemv(
        a: &[u16],
        w: &[u8],
        aux: Aux,
        rows: usize,
        k: usize,
        out: usize,
        kind: u32,
        bits: u32,
        groups: usize,
    ) -> Vec<f32> {
        let mut y = vec![0f32; rows * out];
        y.par_chunks_mut(rows.max(1))
            .enumerate()
            .for_each(|(o, ys)| {
                for (r, yv) in ys.iter_mut().enumerate() {
                    let mut lanes = [0f32; 32];
                    for (l, acc) in lanes.iter_mut().enumerate() {
                        for j0 in (8 * l..k).step_by(256) {
                            for j in j0..j0 + 8 {
                                let av = f32::from_bits((a[r * k + j] as u32) << 16);
                                *acc += av * weight(kind, w, aux, o, j, k, bits, groups);
                            }
                        }
                    }
                    *yv = butterfly(lanes);
                }
            });
        // Computed output-major above; the result is row-major [rows, out].
        let mut t = vec![0f32; rows * out];
        for o in 0..out {
            for r in 0..rows {
                t[r * out + o] = y[o * rows + r];
            }
        }
        t
    }

    /// `mt_gemv` with `exact`: INT8 codes (as bf16 values) times INT8 weights summed in i32.
    pub fn gemv_exact(a: &[u16], w: &[u8], rows: usize, k: usize, out: usize) -> Vec<i32> {
        let mut y = vec![0i32; rows * out];
        y.par_chunks_mut(out.max(1))
            .enumerate()
            .for_each(|(r, yr)| {
                for (o, yv) in yr.iter_mut().enumerate() {
                    let mut lanes = [0i32; 32];
                    for (l, acc) in lanes.iter_mut().enumerate() {
                        for j0 in (8 * l..k).step_by(256) {
                            for j in j0..j0 + 8 {
                                let av = f32::from_bits((a[r * k + j] as u32) << 16) as i32;
                                *acc += av * (w[o * k + j] as i8 as i32);
                            }
                        }
                    }
                    *yv = butterfly(lanes);
                }
            });
        y
    }

    /// `mt_codes_to_e4m3`.
    pub fn codes_to_e4m3(a: &[u16]) -> Vec<u8> {
        a.iter()
            .map(|&b| f32_to_e4m3(f32::from_bits((b as u32) << 16)))
            .collect()
    }

    /// The FP8 GEMM (cuBLASLt, E4M3 × E4M3, f32 accumulation and output): exact products
    /// summed in f32 in ascending `k` (cuBLASLt's order is its own).
    pub fn matmul_e4m3(a: &[u8], w: &[u8], rows: usize, k: usize, out: usize) -> Vec<f32> {
        let (ab, wb): (Vec<u16>, Vec<u16>) = (
            a.iter().map(|&c| e4m3_bf16(c)).collect(),
            w.iter().map(|&c| e4m3_bf16(c)).collect(),
        );
        matmul_f32(&ab, &wb, rows, k, out)
    }

    /// `mt_codes_to_i8`.
    pub fn codes_to_i8(a: &[u16]) -> Vec<u8> {
        a.iter()
            .map(|&b| f32::from_bits((b as u32) << 16) as i32 as i8 as u8)
            .collect()
    }

    /// The integer GEMM (cuBLAS IMMA): `C[rows, out] = Σ_j a[r, j] · w[o, j]` in i32, exact in
    /// any order.
    pub fn matmul_i32(a: &[u8], w: &[u8], rows: usize, k: usize, out: usize) -> Vec<i32> {
        let mut c = vec![0i32; rows * out];
        c.par_chunks_mut(out.max(1))
            .enumerate()
            .for_each(|(r, cr)| {
                let ar = &a[r * k..(r + 1) * k];
                for (o, v) in cr.iter_mut().enumerate() {
                    let wr = &w[o * k..(o + 1) * k];
                    *v = ar
                        .iter()
                        .zip(wr)
                        .map(|(&x, &y)| x as i8 as i32 * y as i8 as i32)
                        .sum();
                }
            });
        c
    }

    /// `mt_int8_epilogue`: `f32((S · s_row) · s_col)` in f64.
    pub fn int8_epilogue(acc: &[i32], rs: &[f32], cs: &[f32], out: usize) -> Vec<f32> {
        acc.par_iter()
            .enumerate()
            .map(|(i, &q)| ((q as f64 * rs[i / out] as f64) * cs[i % out] as f64) as f32)
            .collect()
    }

    /// `C = A · Wᵀ` for bf16 bits `A [rows, k]`, `W [out, k]`: exact products summed in f32 in
    /// ascending `k` (cuBLAS sums in another order; the results differ only by that).
    pub fn matmul_f32(a: &[u16], w: &[u16], rows: usize, k: usize, out: usize) -> Vec<f32> {
        let f = |b: u16| f32::from_bits((b as u32) << 16);
        let mut c = vec![0f32; rows * out];
        c.par_chunks_mut(out.max(1))
            .enumerate()
            .for_each(|(r, cr)| {
                let ar = &a[r * k..(r + 1) * k];
                for (o, v) in cr.iter_mut().enumerate() {
                    let wr = &w[o * k..(o + 1) * k];
                    *v = ar.iter().zip(wr).fold(0f32, |s, (&x, &y)| s + f(x) * f(y));
                }
            });
        c
    }
}

// ---- custom ops: the CPU side runs the twin, the CUDA side the kernel.

fn cpu_slice<'a, T: candle_core::WithDType>(
    s: &'a CpuStorage,
    l: &Layout,
) -> candle_core::Result<&'a [T]> {
    let (a, b) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("devform: input not contiguous".into()))?;
    Ok(&s.as_slice::<T>()?[a..b])
}

fn bf16_bits_of(v: &[bf16]) -> Vec<u16> {
    v.iter().map(|x| x.to_bits()).collect()
}

fn bf16_storage(bits: Vec<u16>) -> CpuStorage {
    CpuStorage::BF16(bits.into_iter().map(bf16::from_bits).collect())
}

fn op_err(msg: impl Into<String>) -> candle_core::Error {
    candle_core::Error::Msg(msg.into())
}

/// Widening of byte codes to bf16.
enum Widen {
    E4m3,
    I8,
}

impl CustomOp1 for Widen {
    fn name(&self) -> &'static str {
        match self {
            Widen::E4m3 => "mt_widen_e4m3",
            Widen::I8 => "mt_widen_i8",
        }
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let c = cpu_slice::<u8>(s, l)?;
        let bits = match self {
            Widen::E4m3 => twin::widen_e4m3(c),
            Widen::I8 => twin::widen_i8(c),
        };
        Ok((bf16_storage(bits), l.shape().clone()))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::widen_bytes(self.name(), s, l)
    }
}

/// Packed integer weights times group scales, to bf16.
struct WidenPacked {
    rows: usize,
    cols: usize,
    bits: u32,
    groups: usize,
}

impl CustomOp2 for WidenPacked {
    fn name(&self) -> &'static str {
        "mt_widen_packed"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let w = cpu_slice::<u8>(s1, l1)?;
        let sc = cpu_slice::<f32>(s2, l2)?;
        let per = (32 / self.bits) as usize;
        if w.len() != self.rows * self.cols.div_ceil(per) * 4 || sc.len() != self.rows * self.groups
        {
            return Err(op_err("mt_widen_packed: operand sizes"));
        }
        let bits = twin::widen_packed(w, sc, self.rows, self.cols, self.bits, self.groups);
        Ok((bf16_storage(bits), Shape::from((self.rows, self.cols))))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::widen_packed(self, s1, l1, s2, l2)
    }
}

/// NVFP4 nibbles times E4M3 group scales, to bf16.
struct WidenNvfp4 {
    cols: usize,
}

impl CustomOp2 for WidenNvfp4 {
    fn name(&self) -> &'static str {
        "mt_widen_nvfp4"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let p = cpu_slice::<u8>(s1, l1)?;
        let sc = cpu_slice::<u8>(s2, l2)?;
        if p.len() * 2 != sc.len() * 16 || self.cols == 0 {
            return Err(op_err("mt_widen_nvfp4: operand sizes"));
        }
        let rows = p.len() * 2 / self.cols;
        Ok((
            bf16_storage(twin::widen_nvfp4(p, sc)),
            Shape::from((rows, self.cols)),
        ))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::widen_nvfp4(self.cols, s1, l1, s2, l2)
    }
}

/// Per-row activation scales `[rows, 1]` of f32 `[rows, cols]`.
struct RowScales {
    mode: u32,
    qmax: f32,
    floor: f32,
}

impl CustomOp1 for RowScales {
    fn name(&self) -> &'static str {
        "mt_row_scales"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, cols) = l.shape().dims2()?;
        let x = cpu_slice::<f32>(s, l)?;
        let v = twin::row_scales(x, cols, self.mode, self.qmax, self.floor);
        Ok((CpuStorage::F32(v), Shape::from((rows, 1))))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::row_scales(self, s, l)
    }
}

/// Activation codes (bf16) of f32 `[rows, cols]` under per-row scales or one scale.
struct ActCodes {
    mode: u32,
}

impl CustomOp2 for ActCodes {
    fn name(&self) -> &'static str {
        "mt_act_codes"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, cols) = l1.shape().dims2()?;
        let x = cpu_slice::<f32>(s1, l1)?;
        let sc = cpu_slice::<f32>(s2, l2)?;
        if sc.len() != 1 && sc.len() != rows {
            return Err(op_err("mt_act_codes: scale count"));
        }
        let v = twin::act_codes(x, sc, cols, self.mode);
        Ok((bf16_storage(v), l1.shape().clone()))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::act_codes(self.mode, s1, l1, s2, l2)
    }
}

/// NVFP4 activation values `q · s` (bf16) of f32 `[rows, cols]`, cols a multiple of 16.
struct Nvfp4Act {
    g: f32,
}

impl CustomOp1 for Nvfp4Act {
    fn name(&self) -> &'static str {
        "mt_nvfp4_act"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, cols) = l.shape().dims2()?;
        if cols % 16 != 0 {
            return Err(op_err("mt_nvfp4_act: columns not a multiple of 16"));
        }
        let x = cpu_slice::<f32>(s, l)?;
        Ok((bf16_storage(twin::nvfp4_act(x, self.g)), l.shape().clone()))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::nvfp4_act(self.g, s, l)
    }
}

/// `C[rows, out] = A[rows, k] · W[out, k]ᵀ`, bf16 inputs, f32 accumulation and output.
struct MatmulF32;

impl CustomOp2 for MatmulF32 {
    fn name(&self) -> &'static str {
        "mt_matmul_bf16_f32"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, k) = l1.shape().dims2()?;
        let (out, k2) = l2.shape().dims2()?;
        if k != k2 {
            return Err(op_err(format!("mt_matmul: inner sizes {k} vs {k2}")));
        }
        let a = cpu_slice::<bf16>(s1, l1)?;
        let w = cpu_slice::<bf16>(s2, l2)?;
        let ab = bf16_bits_of(a);
        let wb = bf16_bits_of(w);
        Ok((
            CpuStorage::F32(twin::matmul_f32(&ab, &wb, rows, k, out)),
            Shape::from((rows, out)),
        ))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::matmul_f32(s1, l1, s2, l2)
    }
}

/// Products for decode-size inputs straight from the stored weight (`mt_gemv`): inputs
/// `(a bf16 [rows, k], w u8, aux)`, output f32 `[rows, out]` or, `exact`, i32 sums.
struct Gemv {
    kind: u32,
    bits: u32,
    groups: usize,
    out: usize,
    exact: bool,
    /// `[rows, 1]` f32, applied first.
    row_scale: Option<Tensor>,
    /// `[1, out]` f32, applied second.
    col_scale: Option<Tensor>,
}

impl Gemv {
    /// The scaling the kernel applies to row `r`, channel `o`: exact sums `(acc · rs) · cs` in
    /// f64 (`Int8Epilogue`), f32 sums `(acc · rs) · cs` in f32 (`DeviceLinear::scale`).
    fn scale_host(&self, acc: Vec<f64>, rows: usize) -> candle_core::Result<Vec<f32>> {
        let v = |t: &Option<Tensor>| {
            t.as_ref()
                .map(|t| t.flatten_all()?.to_vec1::<f32>())
                .transpose()
        };
        let (rs, cs) = (v(&self.row_scale)?, v(&self.col_scale)?);
        let out = self.out;
        let rs_at = |r: usize| rs.as_ref().map(|s| s[if s.len() == 1 { 0 } else { r }]);
        let cs_at = |o: usize| cs.as_ref().map(|s| s[if s.len() == 1 { 0 } else { o }]);
        Ok((0..rows * out)
            .map(|i| {
                let (r, o) = (i / out, i % out);
                if self.exact {
                    let mut y = acc[i];
                    if let Some(s) = rs_at(r) {
                        y *= s as f64;
                    }
                    if let Some(s) = cs_at(o) {
                        y *= s as f64;
                    }
                    y as f32
                } else {
                    let mut y = acc[i] as f32;
                    if let Some(s) = rs_at(r) {
                        y *= s;
                    }
                    if let Some(s) = cs_at(o) {
                        y *= s;
                    }
                    y
                }
            })
            .collect())
    }
}

impl candle_core::CustomOp3 for Gemv {
    fn name(&self) -> &'static str {
        "mt_gemv"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, k) = l1.shape().dims2()?;
        let a: Vec<u16> = bf16_bits_of(cpu_slice::<bf16>(s1, l1)?);
        let w = cpu_slice::<u8>(s2, l2)?;
        let shape = Shape::from((rows, self.out));
        if self.exact {
            let y = twin::gemv_exact(&a, w, rows, k, self.out);
            let y = self.scale_host(y.into_iter().map(f64::from).collect(), rows)?;
            return Ok((CpuStorage::F32(y), shape));
        }
        let aux = match (self.kind, s3) {
            (2, CpuStorage::F32(_)) => twin::Aux::F32(cpu_slice::<f32>(s3, l3)?),
            (3, CpuStorage::U8(_)) => twin::Aux::U8(cpu_slice::<u8>(s3, l3)?),
            (0 | 1, _) => twin::Aux::None,
            _ => return Err(op_err("mt_gemv: auxiliary data of the wrong type")),
        };
        let y = twin::gemv(
            &a,
            w,
            aux,
            rows,
            k,
            self.out,
            self.kind,
            self.bits,
            self.groups,
        );
        let y = self.scale_host(y.into_iter().map(f64::from).collect(), rows)?;
        Ok((CpuStorage::F32(y), shape))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::gemv(self, s1, l1, s2, l2, s3, l3)
    }
}

/// Bytes of bf16 activation codes for the FP8 and integer GEMMs: E4M3 codes of E4M3-valued
/// bf16, or INT8 bytes of integer-valued bf16.
#[derive(Clone, Copy)]
enum CodesToBytes {
    E4m3,
    I8,
}

impl CustomOp1 for CodesToBytes {
    fn name(&self) -> &'static str {
        match self {
            CodesToBytes::E4m3 => "mt_codes_to_e4m3",
            CodesToBytes::I8 => "mt_codes_to_i8",
        }
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let a = bf16_bits_of(cpu_slice::<bf16>(s, l)?);
        let b = match self {
            CodesToBytes::E4m3 => twin::codes_to_e4m3(&a),
            CodesToBytes::I8 => twin::codes_to_i8(&a),
        };
        Ok((CpuStorage::U8(b), l.shape().clone()))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::codes_to_bytes(self.name(), s, l)
    }
}

/// `C[rows, out] = A[rows, k] · W[out, k]ᵀ` on E4M3 bytes, f32 (cuBLASLt FP8 on a GPU).
struct MatmulE4m3;

impl CustomOp2 for MatmulE4m3 {
    fn name(&self) -> &'static str {
        "mt_matmul_e4m3_f32"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, k) = l1.shape().dims2()?;
        let (out, k2) = l2.shape().dims2()?;
        if k != k2 {
            return Err(op_err(format!("mt_matmul_e4m3: inner sizes {k} vs {k2}")));
        }
        let c = twin::matmul_e4m3(
            cpu_slice::<u8>(s1, l1)?,
            cpu_slice::<u8>(s2, l2)?,
            rows,
            k,
            out,
        );
        Ok((CpuStorage::F32(c), Shape::from((rows, out))))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::matmul_e4m3(s1, l1, s2, l2)
    }
}

/// `C[rows, out] = A[rows, k] · W[out, k]ᵀ` on INT8 bytes, exact i32 (cuBLAS IMMA on a GPU).
struct MatmulI32;

impl CustomOp2 for MatmulI32 {
    fn name(&self) -> &'static str {
        "mt_matmul_i8_i32"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (rows, k) = l1.shape().dims2()?;
        let (out, k2) = l2.shape().dims2()?;
        if k != k2 {
            return Err(op_err(format!("mt_matmul_i8: inner sizes {k} vs {k2}")));
        }
        let c = twin::matmul_i32(
            cpu_slice::<u8>(s1, l1)?,
            cpu_slice::<u8>(s2, l2)?,
            rows,
            k,
            out,
        );
        Ok((CpuStorage::I32(c), Shape::from((rows, out))))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::matmul_i32(s1, l1, s2, l2)
    }
}

/// W8A8's scaling of exact sums: `(acc i32 [rows, out], rs f32 [rows, 1], cs f32 [1, out])`.
struct Int8Epilogue;

impl candle_core::CustomOp3 for Int8Epilogue {
    fn name(&self) -> &'static str {
        "mt_int8_epilogue"
    }
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (_, out) = l1.shape().dims2()?;
        let acc = cpu_slice::<i32>(s1, l1)?;
        let y = twin::int8_epilogue(
            acc,
            cpu_slice::<f32>(s2, l2)?,
            cpu_slice::<f32>(s3, l3)?,
            out,
        );
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::int8_epilogue(s1, l1, s2, l2, s3, l3)
    }
}

/// Applies FP8 fake quantization on any device with the kernels' rounding: `codes · s` in f32,
/// per token (`scale` none) or with one static scale.
pub fn fp8_round_trip(x: &Tensor, scale: Option<f32>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let cols = *dims.last().unwrap_or(&1);
    let xf = x.to_dtype(DType::F32)?.contiguous()?.reshape(((), cols))?;
    let s = match scale {
        Some(v) => Tensor::new(&[v], xf.device())?,
        None => xf.apply_op1_no_bwd(&RowScales {
            mode: 0,
            qmax: E4M3_MAX,
            floor: FP8_FLOOR,
        })?,
    };
    let q = xf
        .apply_op2_no_bwd(&s, &ActCodes { mode: 0 })?
        .to_dtype(DType::F32)?
        .broadcast_mul(&s)?;
    Ok(q.reshape(dims)?.to_dtype(x.dtype())?)
}

/// NVFP4 fake quantization on any device: `(q · s) / g` as `(q · s) · (1 / g)` in f32.
pub fn nvfp4_round_trip(x: &Tensor, g: f32) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let cols = *dims.last().unwrap_or(&1);
    let xf = x.to_dtype(DType::F32)?.contiguous()?.reshape(((), cols))?;
    let inv = if g == 0.0 { 0.0 } else { 1.0 / g };
    let inv = Tensor::new(&[inv], xf.device())?;
    let q = xf
        .apply_op1_no_bwd(&Nvfp4Act { g })?
        .to_dtype(DType::F32)?
        .broadcast_mul(&inv)?;
    Ok(q.reshape(dims)?.to_dtype(x.dtype())?)
}

/// Every kernel name the GPU runner can ask for: ours (`kernels.cu`) and candle's, spelled as
/// candle spells them (`{op}_{DType::as_str()}`, `cast_{src}_{dst}`), for the operations and
/// dtypes the forward pass uses on a GPU. `scripts/build-cuda.sh` checks each against the
/// `.entry` names of the PTX built into the binary, so a name no module declares fails the
/// build here instead of the run on a GPU. Returns `(module, name)` pairs.
pub fn requested_kernels() -> Vec<(&'static str, String)> {
    let mut v: Vec<(&'static str, String)> = [
        "mt_widen_e4m3",
        "mt_widen_i8",
        "mt_widen_packed",
        "mt_widen_nvfp4",
        "mt_row_scales",
        "mt_act_codes",
        "mt_nvfp4_act",
        "mt_gemv",
        "mt_int8_epilogue",
        "mt_codes_to_i8",
        "mt_codes_to_e4m3",
    ]
    .iter()
    .map(|n| ("minitron", n.to_string()))
    .collect();
    let s = |d: DType| d.as_str();
    let (f32_, bf16_, u8_, u32_) = (DType::F32, DType::BF16, DType::U8, DType::U32);
    // Casts: the stream (f32) to the GEMM's inputs and back, token ids, masks.
    for (a, b) in [
        (f32_, bf16_),
        (bf16_, f32_),
        (u8_, f32_),
        (u32_, f32_),
        (f32_, u32_),
    ] {
        v.push(("cast", format!("cast_{}_{}", s(a), s(b))));
    }
    for d in [f32_, bf16_, u8_, u32_] {
        v.push(("unary", format!("ucopy_{}", s(d))));
        v.push(("fill", format!("fill_{}", s(d))));
        v.push(("fill", format!("const_set_{}", s(d))));
    }
    for d in [f32_, bf16_] {
        for op in ["badd", "bsub", "bmul", "bdiv", "bmaximum", "bminimum"] {
            v.push(("binary", format!("{op}_{}", s(d))));
        }
        for op in [
            "uexp", "ulog", "usilu", "usqrt", "uneg", "urecip", "uabs", "usqr",
        ] {
            v.push(("unary", format!("{op}_{}", s(d))));
        }
        v.push(("affine", format!("affine_{}", s(d))));
        v.push(("indexing", format!("is_u32_{}", s(d))));
        v.push(("fill", format!("copy2d_{}", s(d))));
        v.push(("reduce", format!("fast_max_{}", s(d))));
        v.push(("reduce", format!("fast_sum_{}", s(d))));
        v.push(("reduce", format!("fast_argmax_{}", s(d))));
        v.push(("reduce", format!("softmax_{}", s(d))));
        v.push(("reduce", format!("rope_{}", s(d))));
        v.push(("reduce", format!("rmsnorm_{}", s(d))));
    }
    v
}

#[cfg(feature = "cuda")]
mod cuda {
    //! Launches of `kernels.cu` (PTX built by build.rs) and the cuBLAS GEMM.
    use candle_core::cuda::cudarc::driver::{DevicePtr, DevicePtrMut, LaunchConfig, PushKernelArg};
    use candle_core::cuda::{CudaStorage, WrapErr};
    use candle_core::{Layout, Result, Shape};
    use half::bf16;

    const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/minitron_kernels.ptx"));
    const MODULE: &str = "minitron_kernels";

    fn range(l: &Layout, what: &str) -> Result<(usize, usize)> {
        l.contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg(format!("{what}: input not contiguous")))
    }

    /// A scale tensor's CUDA storage as an f32 view, with its length.
    #[allow(clippy::type_complexity)]
    fn scale_view<'a, 'b: 'a>(
        g: &'a Option<(candle_core::StorageRef<'b>, &'b Layout)>,
    ) -> Result<Option<(candle_core::cuda::cudarc::driver::CudaView<'a, f32>, usize)>> {
        match g {
            None => Ok(None),
            Some((st, l)) => match &**st {
                candle_core::Storage::Cuda(c) => {
                    let (a, b) = range(l, "mt_gemv scales")?;
                    Ok(Some((c.as_cuda_slice::<f32>()?.slice(a..b), b - a)))
                }
                _ => Err(candle_core::Error::Msg(
                    "mt_gemv: scales are not on the GPU".into(),
                )),
            },
        }
    }

    fn grid(n: usize) -> LaunchConfig {
        LaunchConfig::for_num_elems(n as u32)
    }

    pub(super) fn widen_bytes(
        name: &str,
        s: &CudaStorage,
        l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = s.device.clone();
        let (a, b) = range(l, name)?;
        let src = s.as_cuda_slice::<u8>()?.slice(a..b);
        let n = b - a;
        let out = unsafe { dev.alloc::<bf16>(n)? };
        let f = dev.get_or_load_custom_func(name, MODULE, PTX)?;
        let mut lb = f.builder();
        let n64 = n as u64;
        lb.arg(&src);
        lb.arg(&out);
        lb.arg(&n64);
        unsafe { lb.launch(grid(n)).w()? };
        Ok((CudaStorage::wrap_cuda_slice(out, dev), l.shape().clone()))
    }

    pub(super) fn widen_packed(
        op: &super::WidenPacked,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = s1.device.clone();
        let (a1, b1) = range(l1, "mt_widen_packed")?;
        let (a2, b2) = range(l2, "mt_widen_packed")?;
        let words = s1.as_cuda_slice::<u8>()?.slice(a1..b1);
        let scales = s2.as_cuda_slice::<f32>()?.slice(a2..b2);
        let n = op.rows * op.cols;
        let out = unsafe { dev.alloc::<bf16>(n)? };
        let f = dev.get_or_load_custom_func("mt_widen_packed", MODULE, PTX)?;
        let (rows, cols, bits, groups) = (
            op.rows as i32,
            op.cols as i32,
            op.bits as i32,
            op.groups as i32,
        );
        let mut lb = f.builder();
        lb.arg(&words);
        lb.arg(&scales);
        lb.arg(&out);
        lb.arg(&rows);
        lb.arg(&cols);
        lb.arg(&bits);
        lb.arg(&groups);
        unsafe { lb.launch(grid(n)).w()? };
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from((op.rows, op.cols)),
        ))
    }

    pub(super) fn widen_nvfp4(
        cols: usize,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = s1.device.clone();
        let (a1, b1) = range(l1, "mt_widen_nvfp4")?;
        let (a2, b2) = range(l2, "mt_widen_nvfp4")?;
        let packed = s1.as_cuda_slice::<u8>()?.slice(a1..b1);
        let scales = s2.as_cuda_slice::<u8>()?.slice(a2..b2);
        let n = (b1 - a1) * 2;
        let out = unsafe { dev.alloc::<bf16>(n)? };
        let f = dev.get_or_load_custom_func("mt_widen_nvfp4", MODULE, PTX)?;
        let n64 = n as u64;
        let mut lb = f.builder();
        lb.arg(&packed);
        lb.arg(&scales);
        lb.arg(&out);
        lb.arg(&n64);
        unsafe { lb.launch(grid(n)).w()? };
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from((n / cols.max(1), cols)),
        ))
    }

    pub(super) fn row_scales(
        op: &super::RowScales,
        s: &CudaStorage,
        l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = s.device.clone();
        let (rows, cols) = l.shape().dims2()?;
        let (a, b) = range(l, "mt_row_scales")?;
        let x = s.as_cuda_slice::<f32>()?.slice(a..b);
        let out = unsafe { dev.alloc::<f32>(rows)? };
        let f = dev.get_or_load_custom_func("mt_row_scales", MODULE, PTX)?;
        let (cols_, mode) = (cols as i32, op.mode as i32);
        let mut lb = f.builder();
        lb.arg(&x);
        lb.arg(&out);
        lb.arg(&cols_);
        lb.arg(&mode);
        lb.arg(&op.qmax);
        lb.arg(&op.floor);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { lb.launch(cfg).w()? };
        Ok((
            CudaStorage::wrap_cuda_slice(out, dev),
            Shape::from((rows, 1)),
        ))
    }

    pub(super) fn act_codes(
        mode: u32,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = s1.device.clone();
        let (rows, cols) = l1.shape().dims2()?;
        let (a1, b1) = range(l1, "mt_act_codes")?;
        let (a2, b2) = range(l2, "mt_act_codes")?;
        let x = s1.as_cuda_slice::<f32>()?.slice(a1..b1);
        let sc = s2.as_cuda_slice::<f32>()?.slice(a2..b2);
        let per_row: i32 = if b2 - a2 == 1 { 0 } else { 1 };
        let n = rows * cols;
        let out = unsafe { dev.alloc::<bf16>(n)? };
        let f = dev.get_or_load_custom_func("mt_act_codes", MODULE, PTX)?;
        let (r, c, m) = (rows as i32, cols as i32, mode as i32);
        let mut lb = f.builder();
        lb.arg(&x);
        lb.arg(&sc);
        lb.arg(&out);
        lb.arg(&r);
        lb.arg(&c);
        lb.arg(&per_row);
        lb.arg(&m);
        unsafe { lb.launch(grid(n)).w()? };
        Ok((CudaStorage::wrap_cuda_slice(out, dev), l1.shape().clone()))
    }

    pub(super) fn nvfp4_act(g: f32, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, Shape)> {
        let dev = s.device.clone();
        let (a, b) = range(l, "mt_nvfp4_act")?;
        let x = s.as_cuda_slice::<f32>()?.slice(a..b);
        let n = b - a;
        let groups = (n / 16) as u64;
        let out = unsafe { dev.alloc::<bf16>(n)? };
        let f = dev.get_or_load_custom_func("mt_nvfp4_act", MODULE, PTX)?;
        let inv_g = if g == 0.0 { 0.0f32 } else { 1.0 / g };
        let sixth = 1.0f32 / 6.0;
        let mut lb = f.builder();
        lb.arg(&x);
        lb.arg(&out);
        lb.arg(&groups);
        lb.arg(&g);
        lb.arg(&inv_g);
        lb.arg(&sixth);
        unsafe { lb.launch(grid(n / 16)).w()? };
        Ok((CudaStorage::wrap_cuda_slice(out, dev), l.shape().clone()))
    }

    pub(super) fn gemv(
        op: &super::Gemv,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = s1.device.clone();
        let (rows, k) = l1.shape().dims2()?;
        let (a1, b1) = range(l1, "mt_gemv")?;
        let (a2, b2) = range(l2, "mt_gemv")?;
        let (a3, b3) = range(l3, "mt_gemv")?;
        let a = s1.as_cuda_slice::<bf16>()?.slice(a1..b1);
        let w = s2.as_cuda_slice::<u8>()?.slice(a2..b2);
        let n = rows * op.out;
        let y = unsafe { dev.alloc::<f32>(n)? };
        let f = dev.get_or_load_custom_func("mt_gemv", MODULE, PTX)?;
        // The scales, when given, as views of their CUDA storage (held for the launch).
        let rs_guard = op.row_scale.as_ref().map(|t| t.storage_and_layout());
        let cs_guard = op.col_scale.as_ref().map(|t| t.storage_and_layout());
        let rs = scale_view(&rs_guard)?;
        let cs = scale_view(&cs_guard)?;
        let null: u64 = 0;
        let aux_f32;
        let aux_u8;
        let (r, kk, o, kind, bits, groups, exact) = (
            rows as i32,
            k as i32,
            op.out as i32,
            op.kind as i32,
            op.bits as i32,
            op.groups as i32,
            op.exact as i32,
        );
        let rs_n1: i32 = matches!(&rs, Some((_, 1))) as i32;
        let mut lb = f.builder();
        lb.arg(&a);
        lb.arg(&w);
        if op.kind == 2 {
            aux_f32 = s3.as_cuda_slice::<f32>()?.slice(a3..b3);
            lb.arg(&aux_f32);
        } else {
            aux_u8 = s3.as_cuda_slice::<u8>()?.slice(a3..b3);
            lb.arg(&aux_u8);
        }
        lb.arg(&y);
        match &rs {
            Some((v, _)) => lb.arg(v),
            None => lb.arg(&null),
        };
        match &cs {
            Some((v, _)) => lb.arg(v),
            None => lb.arg(&null),
        };
        lb.arg(&r);
        lb.arg(&kk);
        lb.arg(&o);
        lb.arg(&kind);
        lb.arg(&bits);
        lb.arg(&groups);
        lb.arg(&exact);
        lb.arg(&rs_n1);
        // Four warps per block, one output channel per warp.
        let cfg = LaunchConfig {
            grid_dim: (op.out.div_ceil(4) as u32, 1, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        unsafe { lb.launch(cfg).w()? };
        Ok((
            CudaStorage::wrap_cuda_slice(y, dev),
            Shape::from((rows, op.out)),
        ))
    }

    pub(super) fn int8_epilogue(
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = s1.device.clone();
        let (rows, out) = l1.shape().dims2()?;
        let (a1, b1) = range(l1, "mt_int8_epilogue")?;
        let (a2, b2) = range(l2, "mt_int8_epilogue")?;
        let (a3, b3) = range(l3, "mt_int8_epilogue")?;
        let acc = s1.as_cuda_slice::<i32>()?.slice(a1..b1);
        let rs = s2.as_cuda_slice::<f32>()?.slice(a2..b2);
        let cs = s3.as_cuda_slice::<f32>()?.slice(a3..b3);
        let n = rows * out;
        let y = unsafe { dev.alloc::<f32>(n)? };
        let f = dev.get_or_load_custom_func("mt_int8_epilogue", MODULE, PTX)?;
        let (r, o) = (rows as i32, out as i32);
        let mut lb = f.builder();
        lb.arg(&acc);
        lb.arg(&rs);
        lb.arg(&cs);
        lb.arg(&y);
        lb.arg(&r);
        lb.arg(&o);
        unsafe { lb.launch(grid(n)).w()? };
        Ok((CudaStorage::wrap_cuda_slice(y, dev), l1.shape().clone()))
    }

    pub(super) fn codes_to_bytes(
        name: &str,
        s: &CudaStorage,
        l: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let dev = s.device.clone();
        let (a, b) = range(l, name)?;
        let src = s.as_cuda_slice::<bf16>()?.slice(a..b);
        let n = b - a;
        let out = unsafe { dev.alloc::<u8>(n)? };
        let f = dev.get_or_load_custom_func(name, MODULE, PTX)?;
        let n64 = n as u64;
        let mut lb = f.builder();
        lb.arg(&src);
        lb.arg(&out);
        lb.arg(&n64);
        unsafe { lb.launch(grid(n)).w()? };
        Ok((CudaStorage::wrap_cuda_slice(out, dev), l.shape().clone()))
    }

    /// cuBLAS GemmEx on INT8 (IMMA): A = W `[out, k]` transposed, B = activations `[rows, k]`,
    /// i32 C and compute: the exact integer sums.
    pub(super) fn matmul_i32(
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        use candle_core::cuda::cudarc::cublas::{result, sys};
        let dev = s1.device.clone();
        let (rows, k) = l1.shape().dims2()?;
        let (out, k2) = l2.shape().dims2()?;
        if k != k2 || k % 4 != 0 || out % 4 != 0 {
            return Err(candle_core::Error::Msg(format!(
                "mt_matmul_i8: shapes [{rows}, {k}] · [{out}, {k2}]ᵀ (IMMA needs k and out multiples of 4)"
            )));
        }
        let (a1, b1) = range(l1, "mt_matmul_i8")?;
        let (a2, b2) = range(l2, "mt_matmul_i8")?;
        let a = s1.as_cuda_slice::<u8>()?.slice(a1..b1);
        let w = s2.as_cuda_slice::<u8>()?.slice(a2..b2);
        let mut c = unsafe { dev.alloc::<i32>(rows * out)? };
        let stream = dev.cuda_stream();
        let blas = dev.cublas_handle();
        let (alpha, beta) = (1i32, 0i32);
        {
            let (ap, _ga) = a.device_ptr(&stream);
            let (wp, _gw) = w.device_ptr(&stream);
            let (cp, _gc) = c.device_ptr_mut(&stream);
            unsafe {
                result::gemm_ex(
                    *blas.handle(),
                    sys::cublasOperation_t::CUBLAS_OP_T,
                    sys::cublasOperation_t::CUBLAS_OP_N,
                    out as i32,
                    rows as i32,
                    k as i32,
                    &alpha as *const i32 as *const _,
                    wp as *const _,
                    sys::cudaDataType_t::CUDA_R_8I,
                    k as i32,
                    ap as *const _,
                    sys::cudaDataType_t::CUDA_R_8I,
                    k as i32,
                    &beta as *const i32 as *const _,
                    cp as *mut _,
                    sys::cudaDataType_t::CUDA_R_32I,
                    out as i32,
                    sys::cublasComputeType_t::CUBLAS_COMPUTE_32I,
                    sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
                )
                .w()?;
            }
        }
        Ok((
            CudaStorage::wrap_cuda_slice(c, dev),
            Shape::from((rows, out)),
        ))
    }

    /// One cuBLASLt handle and its workspace for the process (the runner uses one device).
    struct Lt {
        handle: usize,
        workspace: candle_core::cuda::cudarc::driver::CudaSlice<u8>,
    }

    static LT: std::sync::Mutex<Option<Lt>> = std::sync::Mutex::new(None);

    fn lt_err(e: impl std::fmt::Debug) -> candle_core::Error {
        candle_core::Error::Msg(format!("cuBLASLt: {e:?}"))
    }

    /// cuBLASLt FP8: A = W E4M3 `[out, k]` transposed, B = activation codes E4M3 `[rows, k]`
    /// (the TN layout FP8 requires), f32 C and D, f32 compute, unit scales (ours come after).
    pub(super) fn matmul_e4m3(
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        use candle_core::cuda::cudarc::cublaslt::{result as lt, sys};
        let dev = s1.device.clone();
        let (rows, k) = l1.shape().dims2()?;
        let (out, k2) = l2.shape().dims2()?;
        if k != k2 || k % 16 != 0 || out % 16 != 0 {
            return Err(candle_core::Error::Msg(format!(
                "mt_matmul_e4m3: shapes [{rows}, {k}] · [{out}, {k2}]ᵀ (FP8 needs k and out multiples of 16)"
            )));
        }
        let (a1, b1) = range(l1, "mt_matmul_e4m3")?;
        let (a2, b2) = range(l2, "mt_matmul_e4m3")?;
        let a = s1.as_cuda_slice::<u8>()?.slice(a1..b1);
        let w = s2.as_cuda_slice::<u8>()?.slice(a2..b2);
        let mut c = unsafe { dev.alloc::<f32>(rows * out)? };
        let stream = dev.cuda_stream();
        let mut guard = LT.lock().map_err(|_| lt_err("poisoned"))?;
        if guard.is_none() {
            let handle = lt::create_handle().map_err(lt_err)? as usize;
            let workspace = unsafe { dev.alloc::<u8>(32 << 20)? };
            *guard = Some(Lt { handle, workspace });
        }
        let st = guard.as_mut().expect("set above");
        let handle = st.handle as sys::cublasLtHandle_t;
        let ws_size = st.workspace.len();
        let (alpha, beta) = (1f32, 0f32);
        unsafe {
            let desc = lt::create_matmul_desc(
                sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                sys::cudaDataType::CUDA_R_32F,
            )
            .map_err(lt_err)?;
            // cublasOperation_t values (an int32 attribute).
            use candle_core::cuda::cudarc::cublas::sys::cublasOperation_t as Op;
            let ta = Op::CUBLAS_OP_T as i32;
            let tb = Op::CUBLAS_OP_N as i32;
            let attr = |a, v: &i32| {
                lt::set_matmul_desc_attribute(
                    desc,
                    a,
                    v as *const _ as *const _,
                    std::mem::size_of::<i32>(),
                )
            };
            let layouts = (|| {
                attr(
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
                    &ta,
                )?;
                attr(
                    sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSB,
                    &tb,
                )?;
                let la = lt::create_matrix_layout(
                    sys::cudaDataType::CUDA_R_8F_E4M3,
                    k as u64,
                    out as u64,
                    k as i64,
                )?;
                let lb = lt::create_matrix_layout(
                    sys::cudaDataType::CUDA_R_8F_E4M3,
                    k as u64,
                    rows as u64,
                    k as i64,
                )?;
                let lc = lt::create_matrix_layout(
                    sys::cudaDataType::CUDA_R_32F,
                    out as u64,
                    rows as u64,
                    out as i64,
                )?;
                Ok::<_, candle_core::cuda::cudarc::cublaslt::result::CublasError>((la, lb, lc))
            })();
            let run = layouts.and_then(|(la, lb, lc)| {
                let pref = lt::create_matmul_pref()?;
                let ws = ws_size as u64;
                lt::set_matmul_pref_attribute(
                    pref,
                    sys::cublasLtMatmulPreferenceAttributes_t::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    &ws as *const u64 as *const _,
                    std::mem::size_of::<u64>(),
                )?;
                let r = lt::get_matmul_algo_heuristic(handle, desc, la, lb, lc, lc, pref).and_then(|h| {
                    let (ap, _ga) = a.device_ptr(&stream);
                    let (wp, _gw) = w.device_ptr(&stream);
                    let (cp, _gc) = c.device_ptr_mut(&stream);
                    let (wsp, _gws) = st.workspace.device_ptr_mut(&stream);
                    lt::matmul(
                        handle,
                        desc,
                        &alpha as *const f32 as *const _,
                        &beta as *const f32 as *const _,
                        wp as *const _,
                        la,
                        ap as *const _,
                        lb,
                        cp as *const _,
                        lc,
                        cp as *mut _,
                        lc,
                        &h.algo,
                        wsp as *mut _,
                        ws_size,
                        stream.cu_stream() as sys::cudaStream_t,
                    )
                });
                let _ = lt::destroy_matmul_pref(pref);
                for l in [la, lb, lc] {
                    let _ = lt::destroy_matrix_layout(l);
                }
                r
            });
            let _ = lt::destroy_matmul_desc(desc);
            run.map_err(lt_err)?;
        }
        Ok((
            CudaStorage::wrap_cuda_slice(c, dev),
            Shape::from((rows, out)),
        ))
    }

    /// cuBLAS GemmEx: bf16 A and W, f32 C, f32 compute (tensor cores, f32 accumulation).
    pub(super) fn matmul_f32(
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        use candle_core::cuda::cudarc::cublas::{result, sys};
        let dev = s1.device.clone();
        let (rows, k) = l1.shape().dims2()?;
        let (out, k2) = l2.shape().dims2()?;
        if k != k2 {
            return Err(candle_core::Error::Msg(format!(
                "mt_matmul: inner sizes {k} vs {k2}"
            )));
        }
        let (a1, b1) = range(l1, "mt_matmul")?;
        let (a2, b2) = range(l2, "mt_matmul")?;
        let a = s1.as_cuda_slice::<bf16>()?.slice(a1..b1);
        let w = s2.as_cuda_slice::<bf16>()?.slice(a2..b2);
        let mut c = unsafe { dev.alloc::<f32>(rows * out)? };
        let stream = dev.cuda_stream();
        let blas = dev.cublas_handle();
        let (alpha, beta) = (1f32, 0f32);
        {
            let (ap, _ga) = a.device_ptr(&stream);
            let (wp, _gw) = w.device_ptr(&stream);
            let (cp, _gc) = c.device_ptr_mut(&stream);
            // Column-major view: C[out, rows] = W[k, out]ᵀ · A[k, rows].
            unsafe {
                result::gemm_ex(
                    *blas.handle(),
                    sys::cublasOperation_t::CUBLAS_OP_T,
                    sys::cublasOperation_t::CUBLAS_OP_N,
                    out as i32,
                    rows as i32,
                    k as i32,
                    &alpha as *const f32 as *const _,
                    wp as *const _,
                    sys::cudaDataType_t::CUDA_R_16BF,
                    k as i32,
                    ap as *const _,
                    sys::cudaDataType_t::CUDA_R_16BF,
                    k as i32,
                    &beta as *const f32 as *const _,
                    cp as *mut _,
                    sys::cudaDataType_t::CUDA_R_32F,
                    out as i32,
                    sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
                )
                .w()?;
            }
        }
        Ok((
            CudaStorage::wrap_cuda_slice(c, dev),
            Shape::from((rows, out)),
        ))
    }
}
