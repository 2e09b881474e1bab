//! Perplexity-evaluation throughput on SmolLM2-135M (CPU, 2 threads), printed next to
//! llama.cpp's `llama-perplexity` figure on the same text from known-answers.json.
//!
//!     cargo bench --bench ppl_throughput            # 40 chunks × 512, as llama.cpp was timed
//!     MINITRON_BENCH_CHUNKS=8 cargo bench --bench ppl_throughput
//!
//! Like llama.cpp's number, ours is whole-job wall time (load, tokenize, evaluate) divided into
//! the tokens evaluated (chunks × ctx). Needs ../shared/tools/real-assets.sh to have run.

use std::time::Instant;

mod common;

use candle_core::{DType, Device};
use minitron::model::{Checkpoint, Tokenizer};
use minitron::runtime::Llama;
use minitron::verify::ppl::{score_chunk, ChunkPlan, Perplexity};

fn main() {
    let threads = common::set_threads();
    let chunks = common::env_usize("MINITRON_BENCH_CHUNKS", 40);
    let Some((model_dir, shared)) = common::smollm2_and_shared("ppl_throughput") else {
        return;
    };
    let ka: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(shared.join("data/known-answers.json")).unwrap(),
    )
    .unwrap();

    let t0 = Instant::now();
    let ck = Checkpoint::open(&model_dir).unwrap();
    let tok = Tokenizer::load(&model_dir).unwrap();
    let model = Llama::load(&ck, DType::F32, &Device::Cpu).unwrap();
    let text = std::fs::read_to_string(shared.join("data/wikitext2-valid.txt")).unwrap();
    let ids = tok.encode(&text, true).unwrap();
    let plan = ChunkPlan {
        ctx: 512,
        max_chunks: Some(chunks),
        bos: if tok.adds_bos { tok.bos_id } else { None },
    };
    let cs = plan.chunks(&ids).unwrap();
    let t_eval = Instant::now();
    let mut nll = Vec::new();
    for c in &cs {
        nll.extend(
            score_chunk(&model, None, c, plan.first_scored())
                .unwrap()
                .nll,
        );
    }
    let eval = t_eval.elapsed().as_secs_f64();
    let total = t0.elapsed().as_secs_f64();
    let tokens = cs.len() * 512;
    let p = Perplexity::from_nll(&nll);
    let sp = &ka["llama_cpp_speed"];
    println!(
        "ppl_throughput: SmolLM2-135M, {} chunks × 512, {threads} threads, f32 compute",
        cs.len()
    );
    println!("  minitron        {:>8.1} tokens/s whole job ({total:.1} s), {:>8.1} tokens/s evaluation only (ppl {:.4})", tokens as f64 / total, tokens as f64 / eval, p.ppl);
    println!(
        "  llama.cpp bf16  {:>8.1} tokens/s whole job",
        sp["bf16_gguf"]["best_tokens_per_s"]
            .as_f64()
            .unwrap_or(f64::NAN)
    );
    println!(
        "  llama.cpp f32   {:>8.1} tokens/s whole job",
        sp["f32_gguf"]["best_tokens_per_s"]
            .as_f64()
            .unwrap_or(f64::NAN)
    );
}
