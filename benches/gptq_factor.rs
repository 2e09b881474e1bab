//! GPTQ's factor of one input site (`Plan::new`: act-order permutation, damping, the
//! upper Cholesky factor of the inverse, computed in place) at the widths of Llama-3.x inputs,
//! the error-feedback rounding of one layer's rows with it, and W4A16's scale refit of those rows. Synthetic second moments
//! (`B Bᵀ / k + I/10`, `k` = 256 rows); no model needed.
//!
//!     cargo bench --bench gptq_factor                       (f32, as the export runs it)
//!     MINITRON_BENCH_F64=1 cargo bench --bench gptq_factor  (the f64 factor)
//!     MINITRON_BENCH_WIDTHS=4096,14336 cargo bench --bench gptq_factor
//!     MINITRON_BENCH_REFIT_ONLY=1 MINITRON_BENCH_WIDTHS=14336 cargo bench --bench gptq_factor

use std::time::Instant;

mod common;

use minitron::numerics::rng::SplitMix64;
use minitron::quant::gptq::Plan;

fn main() {
    let threads = common::set_threads();
    let widths: Vec<usize> = std::env::var("MINITRON_BENCH_WIDTHS")
        .unwrap_or_else(|_| "576,1536,4096".into())
        .split(',')
        .filter_map(|w| w.trim().parse().ok())
        .collect();
    // MINITRON_BENCH_REFIT_ONLY=1: the scale refit alone (the factor at 14336 takes minutes).
    let refit_only = std::env::var_os("MINITRON_BENCH_REFIT_ONLY").is_some();
    println!("GPTQ factor, {threads} threads");
    println!(
        "| width | factor s | GFLOP/s (n³/3 + n³/3) | rows rounded | rounding s | scale refit s |"
    );
    println!("|---|---|---|---|---|---|");
    for n in widths {
        let rows = 256;
        let (f, r, w) = if refit_only {
            let mut rng = SplitMix64::new(n as u64);
            let w: Vec<f32> = (0..rows * n).map(|_| rng.unit_f32() - 0.5).collect();
            (f64::NAN, f64::NAN, w)
        } else {
            factor_and_round(n, rows)
        };
        let flops = 2.0 * (n as f64).powi(3) / 3.0;
        // The W4A16 scale refit of the same rows (groups of 128) under the moments in f32.
        let g = 128.min(n);
        let h32: Vec<f32> = {
            let mut rng = SplitMix64::new(n as u64 + 1);
            let mut h = vec![0f32; n * n];
            for i in 0..n {
                for j in 0..=i {
                    let v = (rng.unit_f32() - 0.5) * 0.01 + if i == j { 1.0 } else { 0.0 };
                    h[i * n + j] = v;
                    h[j * n + i] = v;
                }
            }
            h
        };
        let m = minitron::quant::int8::quantize_bits(&w, n, Some(g), 4);
        let t2 = Instant::now();
        let s = minitron::quant::int8::refit_scales(&w, n, g, &m.q, m.scales.clone(), &h32);
        let rf = t2.elapsed().as_secs_f64();
        assert_eq!(s.len(), m.scales.len());
        println!(
            "| {n} | {f:.2} | {:.1} | {rows} | {r:.2} | {rf:.2} ({:.1} GMAC/s) |",
            flops / f / 1e9,
            rows as f64 * (n as f64).powi(2) / rf / 1e9
        );
    }
}

/// The factor of synthetic moments at width `n`, and `rows` rows rounded with it: (factor s,
/// rounding s, the rows).
fn factor_and_round(n: usize, rows: usize) -> (f64, f64, Vec<f32>) {
    let mut rng = SplitMix64::new(n as u64);
    // Moments of k random rows: rank k plus the ridge, formed blockwise as B Bᵀ.
    let k = 256;
    let b: Vec<f32> = (0..n * k).map(|_| rng.unit_f32() - 0.5).collect();
    let mut h = vec![0f64; n * n];
    for i in 0..n {
        for j in 0..=i {
            let s: f32 = (0..k).map(|t| b[i * k + t] * b[j * k + t]).sum();
            let v = s as f64 / k as f64 + if i == j { 0.1 } else { 0.0 };
            h[i * n + j] = v;
            h[j * n + i] = v;
        }
    }
    let t0 = Instant::now();
    // The export's precision (f32) unless MINITRON_BENCH_F64 asks for the f64 reference.
    let plan = if std::env::var_os("MINITRON_BENCH_F64").is_some() {
        Plan::<f64>::new(&h, n, 0.01)
            .expect("positive definite")
            .convert::<f32>()
    } else {
        Plan::<f32>::new(&h, n, 0.01).expect("positive definite")
    };
    let f = t0.elapsed().as_secs_f64();
    drop(h);
    let w: Vec<f32> = (0..rows * n).map(|_| rng.unit_f32() - 0.5).collect();
    let t1 = Instant::now();
    let codes = plan.quantize_rows(&w, n, |_, v| ((v * 8.0).round() / 8.0, 0));
    let r = t1.elapsed().as_secs_f64();
    assert_eq!(codes.len(), w.len());
    (f, r, w)
}
