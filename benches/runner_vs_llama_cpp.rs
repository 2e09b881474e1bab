//! The runner side by side with llama.cpp's `llama-perplexity`, each measured as its own child
//! process (whole-job wall time and peak RSS from `wait4`), back to back in one run:
//!
//! 1. SmolLM2-135M, bf16, dev text, ctx 512, 40 chunks: our `minitron-verify` on the bf16
//!    checkpoint and `llama-perplexity` on our byte-identical bf16 GGUF of it (written by
//!    `minitron-convert --to gguf:bf16` into target/bench-data when missing).
//! 2. With `MINITRON_M4B` (a synthetic 4.5 B checkpoint, `minitron-convert synth --preset
//!    minitron-4b-depth`) the same at 8 chunks, and the KL-divergence of its `--to fp8` artifact
//!    (`MINITRON_M4B_FP8`) against it over `MINITRON_M4B_KLD_CHUNKS` chunks (default 8).
//!
//!     cargo build --release && MINITRON_LLAMA_CPP=$LLAMA_CPP_DIR/bin cargo bench --bench runner_vs_llama_cpp
//!
//! `MINITRON_LLAMA_CPP` is the folder holding `llama-perplexity` (for example from
//! ../shared/tools/llama-cpp.sh); without it llama.cpp's rows say "not measured".

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;

use common::{bin, measure, Measured};

/// Our bf16 GGUF of `model` in target/bench-data (written once).
fn gguf_of(model: &Path, name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-data");
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join(format!("{name}-bf16.gguf"));
    if !out.exists() {
        let s = Command::new(bin("minitron-convert"))
            .args([
                model.to_str().unwrap(),
                "--to",
                "gguf:bf16",
                "--out",
                out.to_str().unwrap(),
            ])
            .status()
            .unwrap();
        assert!(s.success(), "gguf conversion");
    }
    out
}

fn ours(args: &[&str], threads: usize) -> (Measured, serde_json::Value) {
    let m = measure(Command::new(bin("minitron-verify")).args(args).args([
        "--threads",
        &threads.to_string(),
        "--json",
    ]));
    let start = m.stdout.find('{').expect("json report");
    let v: serde_json::Value = serde_json::from_str(&m.stdout[start..]).expect("report");
    (m, v)
}

fn llama(
    dir: &Option<PathBuf>,
    gguf: &Path,
    text: &Path,
    chunks: usize,
    threads: usize,
) -> Option<(Measured, f64)> {
    let d = dir.as_ref()?;
    let lib = d.parent().map(|p| p.join("bin")).unwrap_or_default();
    let m = measure(
        Command::new(d.join("llama-perplexity"))
            .env(
                "LD_LIBRARY_PATH",
                format!("{}:{}", d.display(), lib.display()),
            )
            .args(["-m", gguf.to_str().unwrap(), "-f", text.to_str().unwrap()])
            .args([
                "-c",
                "512",
                "--chunks",
                &chunks.to_string(),
                "-t",
                &threads.to_string(),
            ]),
    );
    let ppl = m
        .stdout
        .lines()
        .find_map(|l| l.split("Final estimate: PPL = ").nth(1))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN);
    Some((m, ppl))
}

fn row(what: &str, tool: &str, tokens: usize, m: &Measured, ppl: f64) {
    println!(
        "| {what} | {tool} | {:.1} | {:.1} | {:.0} | {ppl:.4} |",
        m.wall_s,
        tokens as f64 / m.wall_s,
        m.peak_rss_mb
    );
}

fn main() {
    let threads = common::env_usize("MINITRON_BENCH_THREADS", 2);
    let Some((smol, shared)) = common::smollm2_and_shared("runner_vs_llama_cpp") else {
        return;
    };
    for b in ["minitron-verify", "minitron-convert"] {
        assert!(
            bin(b).exists(),
            "build first: cargo build --release ({b} missing)"
        );
    }
    let text = shared.join("data/wikitext2-valid.txt");
    let lc = std::env::var_os("MINITRON_LLAMA_CPP").map(PathBuf::from);
    println!("runner_vs_llama_cpp: {threads} threads, whole-job wall time per child process, tokens = chunks × 512 evaluated");
    println!("| model / job | tool | wall s | tokens/s | peak RSS MiB | ppl |");
    println!("|---|---|---|---|---|---|");
    let t = text.to_str().unwrap();
    let smol_gguf = gguf_of(&smol, "smollm2-135m");
    let (m, v) = ours(
        &[smol.to_str().unwrap(), "--ppl", t, "--chunks", "40"],
        threads,
    );
    row(
        "SmolLM2 bf16, 40 × 512",
        "minitron",
        40 * 512,
        &m,
        v["ppl"]["perplexity"]["ppl"].as_f64().unwrap(),
    );
    match llama(&lc, &smol_gguf, &text, 40, threads) {
        Some((m, p)) => row("SmolLM2 bf16, 40 × 512", "llama.cpp", 40 * 512, &m, p),
        None => println!(
            "| SmolLM2 bf16, 40 × 512 | llama.cpp | not measured (set MINITRON_LLAMA_CPP) | | | |"
        ),
    }
    let Some(m4b) = std::env::var_os("MINITRON_M4B").map(PathBuf::from) else {
        println!("| 4.5 B synthetic | | not measured (set MINITRON_M4B, MINITRON_M4B_FP8) | | | |");
        return;
    };
    let m4 = m4b.to_str().unwrap();
    let (m, v) = ours(&[m4, "--ppl", t, "--chunks", "8"], threads);
    row(
        "4.5 B bf16, 8 × 512",
        "minitron",
        8 * 512,
        &m,
        v["ppl"]["perplexity"]["ppl"].as_f64().unwrap(),
    );
    let m4_gguf = gguf_of(&m4b, "m4b");
    match llama(&lc, &m4_gguf, &text, 8, threads) {
        Some((m, p)) => row("4.5 B bf16, 8 × 512", "llama.cpp", 8 * 512, &m, p),
        None => println!(
            "| 4.5 B bf16, 8 × 512 | llama.cpp | not measured (set MINITRON_LLAMA_CPP) | | | |"
        ),
    }
    if let Some(fp8) = std::env::var_os("MINITRON_M4B_FP8") {
        let n = common::env_usize("MINITRON_M4B_KLD_CHUNKS", 8);
        let (m, v) = ours(
            &[
                fp8.to_str().unwrap(),
                "--reference",
                m4,
                "--kld",
                "--ppl",
                t,
                "--chunks",
                &n.to_string(),
            ],
            threads,
        );
        row(
            &format!("4.5 B fp8 KLD vs bf16, {n} × 512 (×2 models)"),
            "minitron",
            2 * n * 512,
            &m,
            v["ppl"]["perplexity"]["ppl"].as_f64().unwrap(),
        );
        println!(
            "\nfp8 KLD: mean {:.6}, top-1 {:.3} %",
            v["kld"]["divergence"]["mean_kld"].as_f64().unwrap(),
            v["kld"]["divergence"]["top1_agreement_pct"]
                .as_f64()
                .unwrap()
        );
    }
}
