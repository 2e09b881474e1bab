//! Calibration throughput on SmolLM2-135M (CPU, 2 threads): tokens/s of one statistics pass
//! (forward through every block with the hooks recording, no head) on the runner's bf16 path,
//! next to the plain bf16 forward over the same chunks (the hooks' overhead) and the f32 candle
//! pass calibration used before.
//!
//!     cargo bench --bench calib_throughput
//!     MINITRON_BENCH_CHUNKS=20 cargo bench --bench calib_throughput
//!
//! Needs ../shared/tools/real-assets.sh to have run.

use std::time::Instant;

mod common;

use candle_core::{DType, Device, Tensor};
use minitron::calib::{calibration_chunks, load_source, CalibInfo, CalibSpec, CalibStats};
use minitron::model::{Checkpoint, Tokenizer};
use minitron::runtime::Llama;

fn main() {
    let threads = common::set_threads();
    let chunks = common::env_usize("MINITRON_BENCH_CHUNKS", 8);
    let Some((model_dir, shared)) = common::smollm2_and_shared("calib_throughput") else {
        return;
    };
    let ck = Checkpoint::open(&model_dir).unwrap();
    let tok = Tokenizer::load(&model_dir).unwrap();
    let model = Llama::load(&ck, DType::BF16, &Device::Cpu).unwrap();
    let src = load_source(Some(&shared.join("data/wikitext2-valid.txt"))).unwrap();
    let cs = calibration_chunks(
        &tok,
        &src,
        &CalibSpec {
            samples: chunks,
            seq_len: 512,
            shuffle: None,
        },
    )
    .unwrap();
    let tokens = (cs.len() * 512) as f64;

    let t = Instant::now();
    for c in &cs {
        let ids = Tensor::from_slice(c, (1, c.len()), &Device::Cpu).unwrap();
        model.forward_from(&ids, None, None, c.len() - 1).unwrap();
    }
    let plain = t.elapsed().as_secs_f64();
    let info = CalibInfo {
        source: "bench".into(),
        sha256: String::new(),
        samples: 0,
        seq_len: 512,
        tokens: 0,
        shuffle_seed: None,
        wall_s: 0.0,
        fingerprint: Vec::new(),
    };
    let dtype = minitron::calib::pass_dtype(&Device::Cpu);
    let t = Instant::now();
    CalibStats::collect(&ck, dtype, &Device::Cpu, &cs, info.clone(), &|_| ()).unwrap();
    let hooked = t.elapsed().as_secs_f64();
    let t = Instant::now();
    CalibStats::collect(&ck, DType::F32, &Device::Cpu, &cs, info, &|_| ()).unwrap();
    let f32_pass = t.elapsed().as_secs_f64();
    println!(
        "calib_throughput: SmolLM2-135M, {} chunks × 512, {threads} threads",
        cs.len()
    );
    println!(
        "  statistics (bf16) {:>8.1} tokens/s ({hooked:.1} s)",
        tokens / hooked
    );
    println!(
        "  forward, no hooks {:>8.1} tokens/s ({plain:.1} s)",
        tokens / plain
    );
    println!(
        "  f32 candle pass   {:>8.1} tokens/s ({f32_pass:.1} s)",
        tokens / f32_pass
    );
}
