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
use crate::numerics::round_even;
use crate::quant::int8::{column_absmax, quantize, smooth_factors};

/// The α grid searched by `--smooth-alpha auto`.
pub const ALPHA_GRID: [f64; 7] = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9];

/// Which quantizer the factors are chosen for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// W8A8 (SmoothQuant): `s = max|X|^α / max|W|^(1−α)`, error under INT8 weights and
    /// per-token INT8 activations.
    SmoothQuant,
    /// Weight-only INT4 in groups of `group` input columns (AWQ, Lin et al. 2023, as
    /// llm-compressor's AWQModifier scales with `duo_scaling`): `s = mean|X|^α / mean|Ŵ|^(1−α)`
    /// (Ŵ: each weight divided by its group's absmax, averaged over the output rows of every
    /// layer reading the input), normalised by `sqrt(max s · min s)`; α from 0, 0.05, …, 0.95
    /// by the error of the unquantized activations times the INT4 weights; an input no α
    /// improves on plain rounding for is left unscaled.
    Awq { group: usize },
}

/// AWQ's α grid (llm-compressor's `n_grid` 20).
pub const AWQ_GRID: usize = 20;

/// Which migrations to make and how to choose α.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SmoothPlan {
    pub method: Method,
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
            method: Method::SmoothQuant,
            alpha,
            extended: alpha.is_none(),
        }
    }

    /// AWQ for INT4 weights in groups of `group`: α searched per input, all four inputs.
    pub fn awq(group: usize) -> Self {
        SmoothPlan {
            method: Method::Awq { group },
            alpha: None,
            extended: true,
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
            let (s, a) = match (plan.method, plan.alpha) {
                (Method::Awq { group }, _) => {
                    let x = acts[site.index()].samples;
                    if x.is_empty() {
                        return Err(Error::Invalid(
                            "--int4-weights awq needs activation samples, which saved statistics do not keep: calibrate again instead of --load-calib".into(),
                        ));
                    }
                    let mut xmean = mean_abs_columns(x, cols);
                    let mut wmean = group_normalised_mean(&refs, cols, group);
                    if site == InputSite::AttnOut {
                        xmean = reduce_mean(&xmean, c.kv_dim(), &kv_of);
                        wmean = reduce_mean(&wmean, c.kv_dim(), &kv_of);
                    }
                    // No scaling is a candidate too: an input where no α beats plain rounding
                    // on the calibration rows stays as it is. The unquantized outputs are
                    // computed once for every candidate.
                    let ys = outputs(x, &refs, cols);
                    let plain = w4_output_error(x, &refs, &ys, cols, &vec![1.0; cols], group);
                    let mut best = (plain, f64::NAN, Vec::new());
                    for i in 0..AWQ_GRID {
                        let a = i as f64 / AWQ_GRID as f64;
                        let s = awq_factors(&xmean, &wmean, a);
                        let e = w4_output_error(x, &refs, &ys, cols, &expand(s.clone()), group);
                        if e < best.0 {
                            best = (e, a, s);
                        }
                    }
                    if best.2.is_empty() {
                        continue;
                    }
                    (best.2, best.1)
                }
                (Method::SmoothQuant, Some(a)) => (smooth_factors(&amax, &wmax, a), a),
                (Method::SmoothQuant, None) => {
                    let x = acts[site.index()].samples;
                    if x.is_empty() {
                        return Err(Error::Invalid(
                            "--smooth-alpha auto needs activation samples, which saved statistics do not keep: calibrate again instead of --load-calib".into(),
                        ));
                    }
                    let ys = outputs(x, &refs, cols);
                    let mut best = (f64::INFINITY, 0.0, Vec::new());
                    for &a in &ALPHA_GRID {
                        let s = smooth_factors(&amax, &wmax, a);
                        let e = output_error(x, &refs, &ys, cols, &expand(s.clone()));
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

/// Mean of `|x|` per column of row-major `x`.
fn mean_abs_columns(x: &[f32], cols: usize) -> Vec<f32> {
    let rows = (x.len() / cols).max(1) as f64;
    let mut m = vec![0f64; cols];
    for r in x.chunks(cols) {
        for (a, &v) in m.iter_mut().zip(r) {
            *a += v.abs() as f64;
        }
    }
    m.iter().map(|v| (v / rows) as f32).collect()
}

/// Per input column, the mean over every output row of every weight of `|w| / absmax(w's
/// group)`.
fn group_normalised_mean(ws: &[&[f32]], cols: usize, group: usize) -> Vec<f32> {
    let mut m = vec![0f64; cols];
    let mut rows = 0usize;
    for w in ws {
        for r in w.chunks(cols) {
            rows += 1;
            for (mg, g) in m.chunks_mut(group).zip(r.chunks(group)) {
                let amax = g.iter().fold(0f32, |a, &v| a.max(v.abs()));
                if amax > 0.0 {
                    for (a, &v) in mg.iter_mut().zip(g) {
                        *a += (v.abs() / amax) as f64;
                    }
                }
            }
        }
    }
    m.iter().map(|v| (v / rows.max(1) as f64) as f32).collect()
}

/// The mean over the attention-output columns that one KV channel feeds.
fn reduce_mean(v: &[f32], n: usize, kv_of: &dyn Fn(usize) -> usize) -> Vec<f32> {
    let mut sum = vec![0f64; n];
    let mut cnt = vec![0usize; n];
    for (col, &x) in v.iter().enumerate() {
        sum[kv_of(col)] += x as f64;
        cnt[kv_of(col)] += 1;
    }
    sum.iter()
        .zip(&cnt)
        .map(|(s, &c)| (s / c.max(1) as f64) as f32)
        .collect()
}

/// AWQ's factors for strength `a`: `mean|X|^a / (mean|Ŵ|^(1−a) + 1e-4)`, floored at 1e-4,
/// divided by `sqrt(max · min)` so they centre on 1.
fn awq_factors(xmean: &[f32], wmean: &[f32], a: f64) -> Vec<f32> {
    let s: Vec<f64> = xmean
        .iter()
        .zip(wmean)
        .map(|(&x, &w)| ((x as f64).powf(a) / ((w as f64).powf(1.0 - a) + 1e-4)).max(1e-4))
        .collect();
    let (lo, hi) = s
        .iter()
        .fold((f64::INFINITY, 0f64), |(l, h), &v| (l.min(v), h.max(v)));
    let norm = (lo * hi).sqrt();
    s.iter().map(|v| (v / norm) as f32).collect()
}

/// Σ‖X Wᵀ − (X/s) Q₄(W·s)ᵀ‖² / Σ‖X Wᵀ‖² over the weights sharing one input: the error of
/// AWQ-scaled INT4 weights (groups of `group`) under unquantized activations. `ys` holds each
/// weight's `X Wᵀ` ([`outputs`]).
fn w4_output_error(
    x: &[f32],
    ws: &[&[f32]],
    ys: &[Vec<f32>],
    cols: usize,
    s: &[f32],
    group: usize,
) -> f64 {
    scaled_error(&divided(x, cols, s), ws, ys, cols, s, |w| {
        crate::quant::int8::quantize_bits(w, cols, Some(group), 4).dequantize(cols)
    })
}

/// Each weight's unquantized output `X Wᵀ`, computed once per input for every candidate.
fn outputs(x: &[f32], ws: &[&[f32]], cols: usize) -> Vec<Vec<f32>> {
    ws.iter().map(|w| matmul_t(x, w, cols)).collect()
}

/// The rows of `x` with column `j` divided by `s_j`.
fn divided(x: &[f32], cols: usize, s: &[f32]) -> Vec<f32> {
    x.chunks(cols)
        .flat_map(|r| r.iter().zip(s).map(|(&v, &f)| v / f))
        .collect()
}

/// `Σ‖y − xq · Q(bf16(W·s))ᵀ‖² / Σ‖y‖²` over the weights `ws` and their outputs `ys` (f32
/// matmuls, f64 sums): the relative output error of one smoothing `s` under the weight
/// quantizer `q` (which returns dequantized values), with `xq` the activations as the
/// quantized layer sees them.
fn scaled_error(
    xq: &[f32],
    ws: &[&[f32]],
    ys: &[Vec<f32>],
    cols: usize,
    s: &[f32],
    q: impl Fn(&[f32]) -> Vec<f32>,
) -> f64 {
    let (mut num, mut den) = (0f64, 0f64);
    for (w, y) in ws.iter().zip(ys) {
        let scaled: Vec<f32> = w
            .chunks(cols)
            .flat_map(|r| r.iter().zip(s).map(|(&v, &f)| round_bf16(v * f)))
            .collect();
        let yq = matmul_t(xq, &q(&scaled), cols);
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

/// `a · bᵀ` for row-major `a` `[rows, cols]` and `b` `[out, cols]` (f32, candle's CPU matmul).
fn matmul_t(a: &[f32], b: &[f32], cols: usize) -> Vec<f32> {
    use candle_core::{Device, Tensor};
    let ta = Tensor::from_slice(a, (a.len() / cols, cols), &Device::Cpu).expect("shape");
    let tb = Tensor::from_slice(b, (b.len() / cols, cols), &Device::Cpu).expect("shape");
    ta.matmul(&tb.t().expect("t"))
        .expect("matmul")
        .flatten_all()
        .expect("flat")
        .to_vec1()
        .expect("vec")
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
            *v = round_even(*v / s).clamp(-127.0, 127.0) * s;
        }
    });
}

/// Σ‖X Wᵀ − Q(X/s) Q(W·s)ᵀ‖² / Σ‖X Wᵀ‖² over the weights sharing one input: W8A8 with
/// per-token INT8 activations. `ys` holds each weight's `X Wᵀ` ([`outputs`]).
fn output_error(x: &[f32], ws: &[&[f32]], ys: &[Vec<f32>], cols: usize, s: &[f32]) -> f64 {
    let mut xq = divided(x, cols, s);
    int8_token_round_trip(&mut xq, cols);
    scaled_error(&xq, ws, ys, cols, s, |w| {
        quantize(w, cols, None).dequantize(cols)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numerics::rng::SplitMix64;

    /// Inputs with a few channels far larger than the rest (what AWQ is for): the best AWQ
    /// scaling on the grid cuts the INT4 output error clearly below plain rounding's (measured
    /// 0.52 × with this draw; the bound 0.75 × leaves room for other draws while still
    /// failing a scaling that does not help), and its factors favour the loud channels.
    #[test]
    fn awq_scaling_protects_the_salient_channels() {
        let (rows, cols, out, group) = (64, 128, 48, 32);
        let mut rng = SplitMix64::new(7);
        let mut normal = || {
            // Sum of uniforms: close enough to a normal for this purpose.
            (0..12).map(|_| rng.unit_f32()).sum::<f32>() - 6.0
        };
        let loud = [3usize, 40, 77, 100];
        let x: Vec<f32> = (0..rows * cols)
            .map(|i| {
                let v = normal();
                if loud.contains(&(i % cols)) {
                    40.0 * v
                } else {
                    v
                }
            })
            .collect();
        let w: Vec<f32> = (0..out * cols)
            .map(|_| round_bf16(0.05 * normal()))
            .collect();
        let refs = [w.as_slice()];
        let ys = [matmul_t(&x, &w, cols)];
        let plain = w4_output_error(&x, &refs, &ys, cols, &vec![1.0; cols], group);
        let xmean = mean_abs_columns(&x, cols);
        let wmean = group_normalised_mean(&refs, cols, group);
        let (best, s) = (0..AWQ_GRID)
            .map(|i| {
                let s = awq_factors(&xmean, &wmean, i as f64 / AWQ_GRID as f64);
                (w4_output_error(&x, &refs, &ys, cols, &s, group), s)
            })
            .min_by(|a, b| a.0.total_cmp(&b.0))
            .unwrap();
        assert!(best < 0.75 * plain, "awq {best} vs plain {plain}");
        let quiet_max = (0..cols)
            .filter(|j| !loud.contains(j))
            .map(|j| s[j])
            .fold(0f32, f32::max);
        assert!(loud.iter().all(|&j| s[j] > quiet_max), "{s:?}");
    }
}
