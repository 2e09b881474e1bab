//! GGUF quantization throughput: millions of weights per second for each type, without and with
//! an importance vector, on a 4096 × 4096 matrix (all threads; the bytes do not depend on them).
use std::time::Instant;

use minitron::format::gguf::GgmlType;

fn main() {
    let (rows, cols) = (4096usize, 4096usize);
    let mut rng = minitron::numerics::rng::SplitMix64::new(1);
    let w: Vec<f32> = (0..rows * cols)
        .map(|_| ((rng.next_u64() >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.05)
        .collect();
    let qw: Vec<f32> = (0..cols).map(|j| 1.0 + (j % 17) as f32).collect();
    println!(
        "gguf_quantize: {rows} × {cols}, {} threads",
        rayon::current_num_threads()
    );
    for name in ["BF16", "Q8_0", "Q4_0", "Q5_0", "Q4_K", "Q5_K", "Q6_K"] {
        let ty = GgmlType::from_name(name).expect("type");
        for imp in [None, Some(&qw[..])] {
            if imp.is_some() && matches!(name, "BF16" | "Q8_0") {
                continue;
            }
            let t = Instant::now();
            let b = minitron::quant::ggml::quantize(&ty, &w, cols, imp).expect("quantize");
            let s = t.elapsed().as_secs_f64();
            println!(
                "  {name:<5} {:<9} {:>8.1} M weights/s ({s:.2} s, {} bytes)",
                if imp.is_some() { "imatrix" } else { "plain" },
                (rows * cols) as f64 / s / 1e6,
                b.len()
            );
        }
    }
}
