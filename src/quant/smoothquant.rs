//! SmoothQuant (Xiao et al. 2022): move activation outliers into the weights, per input channel,
//! before W8A8 quantization (formats/int8.md#smoothquant).
//!
//! For the inputs that follow an RMSNorm (q/k/v after input_layernorm, gate/up after
//! post_attention_layernorm): `s_j = max|X_j|^α / max|W_j|^(1−α)`, the norm weight is divided by
//! `s` and the weight columns multiplied by it, both rounded to bf16 as llm-compressor's in-place
//! bf16 updates do. Before quantization this is an exact identity up to that rounding.

use rayon::prelude::*;

use crate::calib::stats::CalibStats;
use crate::error::{Error, Result};
use crate::model::names::{hf_linear, InputSite};
use crate::model::Checkpoint;
use crate::numerics::fp8::round_bf16;
use crate::quant::int8::{column_absmax, quantize, smooth_factors};

/// The α grid searched by `--smooth-alpha auto`.
pub const ALPHA_GRID: [f64; 7] = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9];

/// Smoothing of one block.
#[derive(Debug, Clone)]
pub struct LayerSmoothing {
    pub layer: usize,
    /// Factors for the attention input (q/k/v) and the MLP input (gate/up).
    pub attn: Vec<f32>,
    pub mlp: Vec<f32>,
    pub alpha_attn: f64,
    pub alpha_mlp: f64,
}

impl LayerSmoothing {
    /// Factors for block `layer` with a fixed α, or (`None`) the α of [`ALPHA_GRID`] that
    /// minimises the relative output error of the W8A8-quantized layers on the calibration
    /// samples.
    pub fn compute(
        ck: &Checkpoint,
        stats: &CalibStats,
        layer: usize,
        alpha: Option<f64>,
    ) -> Result<Self> {
        let pick = |site: InputSite, slot: usize| -> Result<(Vec<f32>, f64)> {
            let cols = site.width(&ck.config);
            let ws: Vec<Vec<f32>> = site
                .roles()
                .iter()
                .map(|&r| ck.read_f32(&hf_linear(layer, r)))
                .collect::<Result<_>>()?;
            let refs: Vec<&[f32]> = ws.iter().map(Vec::as_slice).collect();
            let wmax = column_absmax(&refs, cols);
            let amax = &stats.site(layer, site).absmax;
            match alpha {
                Some(a) => Ok((smooth_factors(amax, &wmax, a), a)),
                None => {
                    let x = &stats.layers[layer].samples[slot];
                    if x.is_empty() {
                        return Err(Error::Invalid(
                            "--smooth-alpha auto needs activation samples, which saved statistics do not keep: calibrate again instead of --load-calib".into(),
                        ));
                    }
                    let mut best = (f64::INFINITY, 0.0, Vec::new());
                    for &a in &ALPHA_GRID {
                        let s = smooth_factors(amax, &wmax, a);
                        let e = output_error(x, &refs, cols, &s);
                        if e < best.0 {
                            best = (e, a, s);
                        }
                    }
                    Ok((best.2, best.1))
                }
            }
        };
        let (attn, alpha_attn) = pick(InputSite::AttnIn, 0)?;
        let (mlp, alpha_mlp) = pick(InputSite::MlpIn, 1)?;
        Ok(LayerSmoothing {
            layer,
            attn,
            mlp,
            alpha_attn,
            alpha_mlp,
        })
    }

    fn factors(&self, site: InputSite) -> Option<&[f32]> {
        match site {
            InputSite::AttnIn => Some(&self.attn),
            InputSite::MlpIn => Some(&self.mlp),
            _ => None,
        }
    }

    /// The norm weight feeding `site`, divided by the factors.
    pub fn smooth_norm(&self, site: InputSite, g: &[f32]) -> Vec<f32> {
        match self.factors(site) {
            Some(s) => g.iter().zip(s).map(|(&v, &f)| round_bf16(v / f)).collect(),
            None => g.to_vec(),
        }
    }

    /// A weight (`[rows, cols]`) reading `site`, its columns multiplied by the factors.
    pub fn smooth_weight(&self, site: InputSite, w: &[f32], cols: usize) -> Vec<f32> {
        match self.factors(site) {
            Some(s) => {
                let mut out = w.to_vec();
                out.par_chunks_mut(cols).for_each(|row| {
                    for (v, &f) in row.iter_mut().zip(s) {
                        *v = round_bf16(*v * f);
                    }
                });
                out
            }
            None => w.to_vec(),
        }
    }
}

impl LayerSmoothing {
    /// The smoothing applied in f32 without bf16 rounding: an exact re-parametrisation of the
    /// block (used to check that smoothing alone leaves the model's function unchanged).
    pub fn apply_exact(
        &self,
        site: InputSite,
        w: &[f32],
        cols: usize,
        norm: Option<&[f32]>,
    ) -> (Vec<f32>, Option<Vec<f32>>) {
        match self.factors(site) {
            Some(s) => {
                let w = w
                    .chunks(cols)
                    .flat_map(|r| r.iter().zip(s).map(|(&v, &f)| v * f))
                    .collect();
                (
                    w,
                    norm.map(|g| g.iter().zip(s).map(|(&v, &f)| v / f).collect()),
                )
            }
            None => (w.to_vec(), norm.map(<[f32]>::to_vec)),
        }
    }
}

/// Dynamic per-token INT8 fake quantization of activation rows as vLLM does it:
/// `scale = absmax/127`, `q = round_half_even(x/scale)` saturated to ±127.
pub fn int8_token_round_trip(x: &mut [f32], cols: usize) {
    x.par_chunks_mut(cols).for_each(|row| {
        let amax = row.iter().fold(0f32, |m, &v| m.max(v.abs()));
        if amax == 0.0 {
            return;
        }
        let s = amax / 127.0;
        for v in row.iter_mut() {
            *v = (*v / s).round_ties_even().clamp(-127.0, 127.0) * s;
        }
    });
}

/// Σ‖X Wᵀ − Q(X/s) Q(W·s)ᵀ‖² / Σ‖X Wᵀ‖² over the weights sharing one input (f32 matmuls,
/// f64 sums).
fn output_error(x: &[f32], ws: &[&[f32]], cols: usize, s: &[f32]) -> f64 {
    use candle_core::{Device, Tensor};
    let rows = x.len() / cols;
    let mut xq: Vec<f32> = x
        .chunks(cols)
        .flat_map(|r| r.iter().zip(s).map(|(&v, &f)| v / f))
        .collect();
    int8_token_round_trip(&mut xq, cols);
    let mm = |a: &[f32], b: &[f32]| -> Vec<f32> {
        let out = b.len() / cols;
        let ta = Tensor::from_slice(a, (rows, cols), &Device::Cpu).expect("shape");
        let tb = Tensor::from_slice(b, (out, cols), &Device::Cpu).expect("shape");
        ta.matmul(&tb.t().expect("t"))
            .expect("matmul")
            .flatten_all()
            .expect("flat")
            .to_vec1()
            .expect("vec")
    };
    let (mut num, mut den) = (0f64, 0f64);
    for w in ws {
        let smoothed: Vec<f32> = w
            .chunks(cols)
            .flat_map(|r| r.iter().zip(s).map(|(&v, &f)| round_bf16(v * f)))
            .collect();
        let wq = quantize(&smoothed, cols, None).dequantize(cols);
        let y = mm(x, w);
        let yq = mm(&xq, &wq);
        for (a, b) in y.iter().zip(&yq) {
            num += ((a - b) as f64).powi(2);
            den += (*a as f64).powi(2);
        }
    }
    if den == 0.0 {
        0.0
    } else {
        num / den
    }
}
