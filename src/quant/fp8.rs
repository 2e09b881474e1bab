//! FP8 E4M3 weights with one scale per output channel (formats/fp8.md#weights).
//!
//! Two scale conventions, each reproducing its producer bit for bit:
//! - compressed-tensors (llm-compressor): `scale = bf16(absmax / 448)`; each weight is divided by
//!   the stored scale in bf16 arithmetic (`bf16(w / scale)`), clamped to ±448, then cast to E4M3
//!   (nearest even). A zero row gets bf16's epsilon as its scale.
//! - ModelOpt: `scale = absmax / 448` in f32, `e4m3(w / scale)` in f32.
//!
//! `search` keeps the layout and chooses each row's scale from a grid of clipping ratios to
//! minimise the importance-weighted error `Σ_j E[x_j²] (w_j − ŵ_j)²`, i.e. the expected squared
//! error of the layer's output for that channel under the calibration activations.

use rayon::prelude::*;

use crate::numerics::fp8::{e4m3_table, f32_to_e4m3, round_bf16, E4M3_MAX};

/// How scales are computed and stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScaleStyle {
    /// compressed-tensors: bf16 scales, bf16 division.
    CompressedTensors,
    /// ModelOpt: f32 scales, f32 division.
    ModelOpt,
}

/// How weights are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum WeightMode {
    /// Round to nearest under absmax scaling (what llm-compressor does).
    Rtn,
    /// Per-channel clipping search weighted by the calibration importance.
    Search,
    /// GPTQ error feedback through the calibration inputs' second-moment matrix, on the
    /// absmax grid of each row.
    Gptq,
}

impl WeightMode {
    pub fn parse(s: &str) -> crate::error::Result<Self> {
        match s {
            "rtn" => Ok(WeightMode::Rtn),
            "search" => Ok(WeightMode::Search),
            "gptq" => Ok(WeightMode::Gptq),
            other => Err(crate::error::Error::Invalid(format!(
                "unknown weight mode `{other}` (rtn, search, gptq)"
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            WeightMode::Rtn => "rtn",
            WeightMode::Search => "search",
            WeightMode::Gptq => "gptq",
        }
    }
}

/// GPTQ on a per-row grid. `h_mean` is `E[x xᵀ]` of the layer's input (`[cols, cols]`) and `plan`
/// the column order and factor made from it (shared by the layers that read the same input).
/// Each row's scale is chosen first by the importance-weighted clipping search (the diagonal of
/// `h_mean` is the importance), then columns are rounded with error feedback in act order.
pub fn quantize_gptq(
    w: &[f32],
    cols: usize,
    style: ScaleStyle,
    h_mean: &[f32],
    plan: &crate::quant::gptq::Plan<impl crate::numerics::Real>,
) -> Fp8Matrix {
    let importance: Vec<f64> = (0..cols).map(|j| h_mean[j * cols + j] as f64).collect();
    let scales = quantize(w, cols, style, WeightMode::Search, Some(&importance)).scales;
    let table = e4m3_table();
    let codes = plan.quantize_rows(w, cols, |r, v| {
        let s = scales[r];
        let mut c = [0u8];
        row_codes(&[v as f32], s, style, &mut c);
        ((table[c[0] as usize] * s) as f64, c[0])
    });
    Fp8Matrix { codes, scales }
}

/// A quantized `[rows, cols]` matrix.
pub struct Fp8Matrix {
    pub codes: Vec<u8>,
    /// One scale per row, exactly as stored (bf16-representable for compressed-tensors).
    pub scales: Vec<f32>,
}

/// bf16's machine epsilon, compressed-tensors' replacement for a zero scale.
const BF16_EPS: f32 = 0.0078125;

multiversion! {
    /// E4M3 codes of `row` under `scale` (the AVX-512 build inlines the rounding instructions
    /// the baseline target calls into libm for; the arithmetic is the same).
    fn row_codes(row: &[f32], scale: f32, style: ScaleStyle, out: &mut [u8]) {
        match style {
            ScaleStyle::CompressedTensors => {
                for (o, &w) in out.iter_mut().zip(row) {
                    *o = f32_to_e4m3(round_bf16(w / scale).clamp(-E4M3_MAX, E4M3_MAX));
                }
            }
            ScaleStyle::ModelOpt => {
                for (o, &w) in out.iter_mut().zip(row) {
                    *o = f32_to_e4m3(w / scale);
                }
            }
        }
    }
}

fn scale_for(amax: f32, style: ScaleStyle) -> f32 {
    match style {
        ScaleStyle::CompressedTensors => {
            let s = round_bf16(amax / E4M3_MAX);
            if s == 0.0 {
                BF16_EPS
            } else {
                s
            }
        }
        ScaleStyle::ModelOpt => {
            let s = amax / E4M3_MAX;
            if s == 0.0 {
                1.0
            } else {
                s
            }
        }
    }
}

/// Clipping ratios tried by `search` (1.0 = plain absmax).
pub const SEARCH_GRID: [f32; 21] = [
    1.0, 0.99, 0.98, 0.97, 0.96, 0.95, 0.94, 0.93, 0.92, 0.91, 0.90, 0.89, 0.88, 0.87, 0.86, 0.85,
    0.84, 0.83, 0.82, 0.81, 0.80,
];

/// Quantizes a row-major `[rows, cols]` matrix. `importance` (length `cols`, E[x²] per input
/// channel) is required for [`WeightMode::Search`]. Rows are independent and processed in
/// parallel, so the result does not depend on the thread count.
pub fn quantize(
    w: &[f32],
    cols: usize,
    style: ScaleStyle,
    mode: WeightMode,
    importance: Option<&[f64]>,
) -> Fp8Matrix {
    let rows = w.len() / cols;
    let mut codes = vec![0u8; w.len()];
    let table = e4m3_table();
    let scales: Vec<f32> = codes
        .par_chunks_mut(cols)
        .zip(w.par_chunks(cols))
        .map(|(out, row)| {
            let amax = row.iter().fold(0f32, |m, &v| m.max(v.abs()));
            match (mode, importance) {
                (WeightMode::Search, Some(imp)) if amax > 0.0 => {
                    let mut best = (f64::INFINITY, 0f32);
                    let mut tmp = vec![0u8; cols];
                    for &r in &SEARCH_GRID {
                        let s = scale_for(amax * r, style);
                        row_codes(row, s, style, &mut tmp);
                        let err: f64 = row
                            .iter()
                            .zip(&tmp)
                            .zip(imp)
                            .map(|((&x, &c), &h)| {
                                let d = x as f64 - table[c as usize] as f64 * s as f64;
                                h * d * d
                            })
                            .sum();
                        if err < best.0 {
                            best = (err, s);
                        }
                    }
                    row_codes(row, best.1, style, out);
                    best.1
                }
                _ => {
                    let s = scale_for(amax, style);
                    row_codes(row, s, style, out);
                    s
                }
            }
        })
        .collect();
    debug_assert_eq!(scales.len(), rows);
    Fp8Matrix { codes, scales }
}

impl Fp8Matrix {
    /// Dequantized values `code · scale` (f32), row-major.
    pub fn dequantize(&self, cols: usize) -> Vec<f32> {
        let table = e4m3_table();
        let mut out = vec![0f32; self.codes.len()];
        out.par_chunks_mut(cols)
            .zip(self.codes.par_chunks(cols))
            .zip(self.scales.par_iter())
            .for_each(|((o, c), &s)| {
                for (v, &q) in o.iter_mut().zip(c) {
                    *v = table[q as usize] * s;
                }
            });
        out
    }
}

/// [`relative_rms`] of rows of `cols` values against `deq_row(r, out)`, which writes row `r`
/// dequantized into `out`, without materialising the dequantized matrix. Each row's sums are
/// taken in a fixed lane order and the rows added in order, so the result does not depend on the
/// thread count.
pub fn relative_rms_rows(
    w: &[f32],
    cols: usize,
    deq_row: impl Fn(usize, &mut [f32]) + Sync,
) -> f64 {
    if cols == 0 {
        return 0.0;
    }
    let parts: Vec<(f64, f64)> = w
        .par_chunks(cols)
        .enumerate()
        .map_init(
            || vec![0f32; cols],
            |buf, (r, a)| {
                let d = &mut buf[..a.len()];
                deq_row(r, d);
                error_sums(a, d)
            },
        )
        .collect();
    let (num, den) = parts
        .iter()
        .fold((0f64, 0f64), |a, b| (a.0 + b.0, a.1 + b.1));
    if den == 0.0 {
        0.0
    } else {
        (num / den).sqrt()
    }
}

multiversion! {
    /// (Σ (w − d)², Σ w²) in f64, eight running lanes (element `i` into lane `i % 8`).
    fn error_sums(w: &[f32], d: &[f32]) -> (f64, f64) {
        let (mut n, mut s) = ([0f64; 8], [0f64; 8]);
        let (mut a, mut b) = (w.chunks_exact(8), d.chunks_exact(8));
        for (x, y) in (&mut a).zip(&mut b) {
            for i in 0..8 {
                let (xv, e) = (x[i] as f64, x[i] as f64 - y[i] as f64);
                n[i] = e.mul_add(e, n[i]);
                s[i] = xv.mul_add(xv, s[i]);
            }
        }
        for (i, (&x, &y)) in a.remainder().iter().zip(b.remainder()).enumerate() {
            let (xv, e) = (x as f64, x as f64 - y as f64);
            n[i] = e.mul_add(e, n[i]);
            s[i] = xv.mul_add(xv, s[i]);
        }
        (n.iter().sum(), s.iter().sum())
    }
}

impl Fp8Matrix {
    /// [`relative_rms`] of `w` against these codes and scales (rows of `cols`).
    pub fn relative_rms(&self, w: &[f32], cols: usize) -> f64 {
        let table = e4m3_table();
        let per_row = self.scales.len() != 1;
        relative_rms_rows(w, cols, |r, out| {
            let s = self.scales[if per_row { r } else { 0 }];
            for (o, &c) in out.iter_mut().zip(&self.codes[r * cols..(r + 1) * cols]) {
                *o = table[c as usize] * s;
            }
        })
    }
}

/// Relative RMS error ‖ŵ − w‖ / ‖w‖ of a dequantized matrix.
pub fn relative_rms(w: &[f32], deq: &[f32]) -> f64 {
    let cols = w.len().clamp(1, 1 << 16);
    relative_rms_rows(w, cols, |r, out| {
        let n = out.len();
        out.copy_from_slice(&deq[r * cols..r * cols + n]);
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compressed_tensors_rounds_twice() {
        // A row whose absmax gives scale bf16(1/448): values are divided in bf16 first.
        let row = [1.0f32, -0.5, 0.3, 0.0];
        let q = quantize(
            &row,
            4,
            ScaleStyle::CompressedTensors,
            WeightMode::Rtn,
            None,
        );
        let s = round_bf16(1.0 / 448.0);
        assert_eq!(q.scales, vec![s]);
        for (i, &w) in row.iter().enumerate() {
            let want = f32_to_e4m3(round_bf16(w / s).clamp(-448.0, 448.0));
            assert_eq!(q.codes[i], want);
        }
        let zero = quantize(
            &[0.0; 4],
            4,
            ScaleStyle::CompressedTensors,
            WeightMode::Rtn,
            None,
        );
        assert_eq!(zero.scales, vec![BF16_EPS]);
        assert!(zero.codes.iter().all(|&c| c == 0));
    }

    #[test]
    fn search_never_loses_to_rtn_on_its_own_objective() {
        let mut rng = crate::numerics::rng::SplitMix64::new(3);
        let cols = 64;
        let w: Vec<f32> = (0..cols * 16)
            .map(|_| (rng.unit_f32() - 0.5) * (1.0 + 10.0 * rng.unit_f32().powi(8)))
            .collect();
        let imp: Vec<f64> = (0..cols).map(|_| 0.1 + rng.unit_f32() as f64).collect();
        let err = |q: &Fp8Matrix| -> f64 {
            let d = q.dequantize(cols);
            w.chunks(cols)
                .zip(d.chunks(cols))
                .map(|(a, b)| {
                    a.iter()
                        .zip(b)
                        .zip(&imp)
                        .map(|((x, y), h)| h * ((x - y) as f64).powi(2))
                        .sum::<f64>()
                })
                .sum()
        };
        let rtn = quantize(
            &w,
            cols,
            ScaleStyle::CompressedTensors,
            WeightMode::Rtn,
            None,
        );
        let s = quantize(
            &w,
            cols,
            ScaleStyle::CompressedTensors,
            WeightMode::Search,
            Some(&imp),
        );
        assert!(err(&s) <= err(&rtn));
    }
}
