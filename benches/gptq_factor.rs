//! GPTQ's factor of one input site (`GptqPlan::new`: act-order permutation, damping, the
//! upper Cholesky factor of the inverse, computed in place) at the widths of Llama-3.x inputs,
//! and the error-feedback rounding of one layer's rows with it. Synthetic second moments
//! (`B Bᵀ / k + I/10`, `k` = 256 rows); no model needed.
//!
//!     cargo bench --bench gptq_factor
//!     MINITRON_BENCH_WIDTHS=4096,14336 cargo bench --bench gptq_factor

use std::time::Instant;

mod common;

use minitron::numerics::rng::SplitMix64;
use minitron::quant::gptq::GptqPlan;

fn main() {
    let threads = common::set_threads();
    let widths: Vec<usize> = std::env::var("MINITRON_BENCH_WIDTHS")
        .unwrap_or_else(|_| "576,1536,4096".into())
        .split(',')
        .filter_map(|w| w.trim().parse().ok())
        .collect();
    println!("GPTQ factor, {threads} threads");
    println!("| width | factor s | GFLOP/s (n³/3 + n³/3) | rows rounded | rounding s |");
    println!("|---|---|---|---|---|");
    for n in widths {
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
        let plan = GptqPlan::new(&h, n, 0.01).expect("positive definite");
        let f = t0.elapsed().as_secs_f64();
        drop(h);
        let rows = 256;
        let w: Vec<f32> = (0..rows * n).map(|_| rng.unit_f32() - 0.5).collect();
        let t1 = Instant::now();
        let codes = plan.quantize_rows(&w, n, |_, v| ((v * 8.0).round() / 8.0, 0));
        let r = t1.elapsed().as_secs_f64();
        assert_eq!(codes.len(), w.len());
        let flops = 2.0 * (n as f64).powi(3) / 3.0;
        println!(
            "| {n} | {f:.2} | {:.1} | {rows} | {r:.2} |",
            flops / f / 1e9
        );
    }
}
