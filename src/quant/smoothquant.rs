//! SmoothQuant (Xiao et al. 2022): move activation outliers into the weights, per input channel,
//! before W8A8 quantization (formats/int8.md#smoothquant).
//!
//! For the inputs that follow an RMSNorm (q/k/v after input_layernorm, gate/up after
//! post_attention_layernorm): `s_j = max|X_j|^α / max|W_j|^(1−α)`, the norm weight is divided by
//! `s` and the weight columns multiplied by it, both rounded to bf16 as llm-compressor's in-place
//! bf16 updates do. Before quantization this is an exact identity up to that rounding.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::model::names::{hf_linear, InputSite, LinearRole};
use crate::model::Checkpoint;
use crate::numerics::fp8::round_bf16;
use crate::quant::int8::{column_absmax, quantize, smooth_factors};

/// The α grid searched by `--smooth-alpha auto`.
pub const ALPHA_GRID: [f64; 7] = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9];

/// Which migrations to make and how to choose α.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SmoothPlan {
    /// A fixed α for every smoothed input; `None`: per layer and input, the α of
    /// [`ALPHA_GRID`] with the smallest quantized output error on the calibration samples.
    pub alpha: Option<f64>,
    /// Also smooth the inputs that follow a linear layer rather than a norm: `o_proj`'s input
    /// into `v_proj`'s rows (shared across the query heads of a KV group) and `down_proj`'s
    /// input into `up_proj`'s rows. Both are exact re-parametrisations too.
    pub extended: bool,
}

impl SmoothPlan {
    /// The command line's meaning: a fixed α smooths the two norm-fed inputs (llm-compressor's
    /// mappings); `auto` searches α per input and smooths all four.
    pub fn from_alpha(alpha: Option<f64>) -> Self {
        SmoothPlan {
            alpha,
            extended: alpha.is_none(),
        }
    }
}

/// Smoothing of one block: factors per input site (indexed by [`InputSite::index`]).
#[derive(Debug, Clone)]
pub struct LayerSmoothing {
    pub layer: usize,
    /// `s` over the columns of the layers reading each site; `None`: not smoothed.
    pub factors: [Option<Vec<f32>>; 4],
    /// The α chosen per site.
    pub alphas: [Option<f64>; 4],
    /// Factors over `v_proj`'s rows (one per KV channel) that produce the `attn_out` factors.
    v_rows: Option<Vec<f32>>,
}

/// What produces a smoothed site's input, and so absorbs `1/s`.
fn producer(site: InputSite) -> Option<LinearRole> {
    match site {
        InputSite::AttnOut => Some(LinearRole::V),
        InputSite::MlpAct => Some(LinearRole::Up),
        _ => None,
    }
}

/// What smoothing needs to know of one input site's activations: per-channel maxima of `|x|`,
/// and sampled rows (row-major, may be empty) for the α search.
#[derive(Debug, Clone, Copy)]
pub struct SiteActivations<'a> {
    pub absmax: &'a [f32],
    pub samples: &'a [f32],
}

impl LayerSmoothing {
    /// Factors for block `layer` under `plan`, from its input sites' activations (indexed by
    /// [`InputSite::index`]).
    pub fn compute(
        ck: &Checkpoint,
        acts: &[SiteActivations<'_>; 4],
        layer: usize,
        plan: SmoothPlan,
    ) -> Result<Self> {
        let c = &ck.config;
        let (hd, g) = (c.head_dim, c.num_attention_heads / c.num_key_value_heads);
        // `attn_out` column (head h, dim d) is fed by V channel (h / g, d).
        let kv_of = |col: usize| (col / hd / g) * hd + col % hd;
        let mut out = LayerSmoothing {
            layer,
            factors: [None, None, None, None],
            alphas: [None; 4],
            v_rows: None,
        };
        for site in InputSite::ALL {
            if producer(site).is_some() && !plan.extended {
                continue;
            }
            let cols = site.width(c);
            let ws: Vec<Vec<f32>> = site
                .roles()
                .iter()
                .map(|&r| ck.read_f32(&hf_linear(layer, r)))
                .collect::<Result<_>>()?;
            let refs: Vec<&[f32]> = ws.iter().map(Vec::as_slice).collect();
            let mut wmax = column_absmax(&refs, cols);
            let mut amax = acts[site.index()].absmax.to_vec();
            if site == InputSite::AttnOut {
                // One factor per KV channel: the maxima over the query heads sharing it.
                let reduce = |v: &[f32]| {
                    let mut m = vec![0f32; c.kv_dim()];
                    for (col, &x) in v.iter().enumerate() {
                        let k = kv_of(col);
                        m[k] = m[k].max(x);
                    }
                    m
                };
                wmax = reduce(&wmax);
                amax = reduce(&amax);
            }
            let expand = |s: Vec<f32>| -> Vec<f32> {
                if site == InputSite::AttnOut {
                    (0..cols).map(|col| s[kv_of(col)]).collect()
                } else {
                    s
                }
            };
            let (s, a) = match plan.alpha {
                Some(a) => (smooth_factors(&amax, &wmax, a), a),
                None => {
                    let x = acts[site.index()].samples;
                    if x.is_empty() {
                        return Err(Error::Invalid(
                            "--smooth-alpha auto needs activation samples, which saved statistics do not keep: calibrate again instead of --load-calib".into(),
                        ));
                    }
                    let mut best = (f64::INFINITY, 0.0, Vec::new());
                    for &a in &ALPHA_GRID {
                        let s = smooth_factors(&amax, &wmax, a);
                        let e = output_error(x, &refs, cols, &expand(s.clone()));
                        if e < best.0 {
                            best = (e, a, s);
                        }
                    }
                    (best.2, best.1)
                }
            };
            if site == InputSite::AttnOut {
                out.v_rows = Some(s.clone());
            }
            out.factors[site.index()] = Some(expand(s));
            out.alphas[site.index()] = Some(a);
        }
        Ok(out)
    }

    /// α chosen for `site`, if it is smoothed.
    pub fn alpha(&self, site: InputSite) -> Option<f64> {
        self.alphas[site.index()]
    }

    fn factors(&self, site: InputSite) -> Option<&[f32]> {
        self.factors[site.index()].as_deref()
    }

    /// Factors dividing the rows of `role`'s weight (it produces a smoothed input).
    fn row_factors(&self, role: LinearRole) -> Option<&[f32]> {
        match role {
            LinearRole::V => self.v_rows.as_deref(),
            LinearRole::Up => self.factors(InputSite::MlpAct),
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

    /// `role`'s weight (`[rows, cols]`) with its columns multiplied by the factors of the
    /// input it reads and its rows divided by those of the input it produces, rounded to bf16
    /// after each step as in-place bf16 updates are.
    pub fn smooth_weight(&self, role: LinearRole, w: &[f32], cols: usize) -> Vec<f32> {
        self.transform(role, w, cols, true)
    }

    /// The same without bf16 rounding: an exact re-parametrisation of the block (used to check
    /// that smoothing alone leaves the model's function unchanged).
    pub fn apply_exact(&self, role: LinearRole, w: &[f32], cols: usize) -> Vec<f32> {
        self.transform(role, w, cols, false)
    }

    /// Norm weight divided by the factors of `site`, without rounding.
    pub fn apply_exact_norm(&self, site: InputSite, g: &[f32]) -> Vec<f32> {
        match self.factors(site) {
            Some(s) => g.iter().zip(s).map(|(&v, &f)| v / f).collect(),
            None => g.to_vec(),
        }
    }

    fn transform(&self, role: LinearRole, w: &[f32], cols: usize, bf16: bool) -> Vec<f32> {
        let r = |v: f32| if bf16 { round_bf16(v) } else { v };
        let mut out = w.to_vec();
        if let Some(s) = self.factors(role.site()) {
            out.par_chunks_mut(cols).for_each(|row| {
                for (v, &f) in row.iter_mut().zip(s) {
                    *v = r(*v * f);
                }
            });
        }
        if let Some(s) = self.row_factors(role) {
            out.par_chunks_mut(cols).zip(s).for_each(|(row, &f)| {
                for v in row.iter_mut() {
                    *v = r(*v / f);
                }
            });
        }
        out
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
