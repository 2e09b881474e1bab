//! Second moments `Σ x xᵀ` of one batch of linear inputs (512 rows, random values), the work
//! GPTQ's calibration adds per chunk and input site: the lower-triangle bf16 rank-k update the
//! export uses (`BlockHessians::add`) next to a full f32 product on candle's GEMM (what
//! calibration computed before, less its lower-triangle tiling).
//!
//!     cargo bench --bench moments
//!     MINITRON_BENCH_WIDTHS=4096,14336 MINITRON_BENCH_ROWS=512 cargo bench --bench moments

use std::time::Instant;

mod common;

use candle_core::{Device, Tensor};
use minitron::calib::hessian::BlockHessians;
use minitron::model::names::InputSite;
use minitron::model::LlamaConfig;

fn main() {
    let threads = common::set_threads();
    let rows = common::env_usize("MINITRON_BENCH_ROWS", 512);
    let widths: Vec<usize> = std::env::var("MINITRON_BENCH_WIDTHS")
        .unwrap_or_else(|_| "4096,14336".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    println!("moments of {rows} rows, {threads} threads");
    println!(
        "| width | bf16 lower triangle s | GFLOP/s (n² · rows) | f32 full product s | ratio |"
    );
    println!("|---|---|---|---|---|");
    for n in widths {
        let mut j = minitron::model::synth::Preset::Minitron4bDepth.config_json();
        j["intermediate_size"] = serde_json::json!(n);
        let c = LlamaConfig::from_json_str(&j.to_string(), std::path::Path::new("config.json"))
            .unwrap();
        let mut rng = minitron::numerics::rng::SplitMix64::new(3);
        let x: Vec<f32> = (0..rows * n).map(|_| rng.unit_f32() - 0.5).collect();
        let mut h = BlockHessians::new(&c, 0);
        h.add(InputSite::MlpAct, &x).unwrap(); // warm-up: pages of the sums
        let reps = 3;
        let t = Instant::now();
        for _ in 0..reps {
            h.add(InputSite::MlpAct, &x).unwrap();
        }
        let ours = t.elapsed().as_secs_f64() / reps as f64;
        let xt = Tensor::from_slice(&x, (rows, n), &Device::Cpu).unwrap();
        let _ = xt.t().unwrap().matmul(&xt).unwrap();
        let t = Instant::now();
        for _ in 0..reps {
            let g = xt.t().unwrap().matmul(&xt).unwrap();
            std::hint::black_box(g);
        }
        let full = t.elapsed().as_secs_f64() / reps as f64;
        let flops = (n * n * rows) as f64; // the lower triangle's multiply-adds, × 2
        println!(
            "| {n} | {ours:.3} | {:.1} | {full:.3} | {:.2}× |",
            flops / ours / 1e9,
            full / ours
        );
    }
}
