//! Throughput of the runner's bf16 GEMM (`runtime::gemm`) on the shapes of a perplexity pass,
//! per kernel this CPU runs, next to candle's f32 matmul on the same shapes.
//!
//!     cargo bench --bench gemm_bf16
//!     MINITRON_GEMM_SHAPES="4096x14336x4096;4096x4096x14336" cargo bench --bench gemm_bf16
//!
//! `MINITRON_GEMM_SHAPES` (rows×out×in, `;`-separated) replaces the default shapes and times
//! only the runner's kernels.

use std::time::Instant;

use candle_core::{Device, Tensor};
use minitron::runtime::gemm::{gemm, to_bf16_rows, Isa, PackedBf16};

fn main() {
    let threads = std::env::var("MINITRON_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global()
        .unwrap();
    // (rows, out, in): SmolLM2 gate/down and the 4.5 B model's q and down at 4,096 rows.
    let custom: Option<Vec<(usize, usize, usize)>> =
        std::env::var("MINITRON_GEMM_SHAPES").ok().map(|v| {
            v.split(';')
                .map(|s| {
                    let d: Vec<usize> = s
                        .split('x')
                        .map(|x| x.trim().parse().expect("rows x out x in"))
                        .collect();
                    (d[0], d[1], d[2])
                })
                .collect()
        });
    let shapes = custom.clone().unwrap_or_else(|| {
        vec![
            (4096usize, 1536usize, 576usize),
            (4096, 576, 1536),
            (512, 4096, 4096),
            (512, 4096, 14336),
            (1, 14336, 4096),
        ]
    });
    println!("gemm_bf16: {threads} threads");
    for &(m, n, k) in &shapes {
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5)
            .collect();
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 104729) % 997) as f32 / 997.0 - 0.5)
            .collect();
        let pw = PackedBf16::from_f32(&w, n, k);
        let ab = to_bf16_rows(&a, k, pw.lda());
        let flop = 2.0 * (m * n * k) as f64;
        for isa in [Isa::Avx512Bf16, Isa::Avx2Fma, Isa::Portable] {
            if !isa.available() {
                println!(
                    "  {m:>5}x{n:>5}x{k:>5} {:<12} not available on this CPU",
                    isa.name()
                );
                continue;
            }
            if isa == Isa::Portable && flop > 2e10 {
                println!(
                    "  {m:>5}x{n:>5}x{k:>5} {:<12} skipped (too slow to time here)",
                    isa.name()
                );
                continue;
            }
            let reps = ((2e10 / flop) as usize).clamp(1, 50);
            let _ = gemm(isa, &ab, m, &pw, None, None);
            let t = Instant::now();
            for _ in 0..reps {
                std::hint::black_box(gemm(isa, &ab, m, &pw, None, None));
            }
            let s = t.elapsed().as_secs_f64() / reps as f64;
            println!(
                "  {m:>5}x{n:>5}x{k:>5} {:<12} {:>8.1} GFLOP/s ({:.2} ms)",
                isa.name(),
                flop / s / 1e9,
                s * 1e3
            );
        }
        if custom.is_some() {
            continue;
        }
        let at = Tensor::from_vec(a, (m, k), &Device::Cpu).unwrap();
        let wt = Tensor::from_vec(w, (n, k), &Device::Cpu).unwrap();
        let reps = ((1e10 / flop) as usize).clamp(1, 20);
        let _ = at.matmul(&wt.t().unwrap()).unwrap();
        let t = Instant::now();
        for _ in 0..reps {
            std::hint::black_box(at.matmul(&wt.t().unwrap()).unwrap());
        }
        let s = t.elapsed().as_secs_f64() / reps as f64;
        println!(
            "  {m:>5}x{n:>5}x{k:>5} {:<12} {:>8.1} GFLOP/s ({:.2} ms)",
            "candle f32",
            flop / s / 1e9,
            s * 1e3
        );
    }
}
