//! HellaSwag scoring side by side with llama.cpp's `llama-perplexity --hellaswag`, each as its
//! own child process (whole-job wall time and peak RSS from `wait4`), back to back on the same
//! task file and thread count: our `minitron-verify --hellaswag` on SmolLM2-135M's bf16
//! checkpoint (default compute dtype of this CPU) and `llama-perplexity` on our bf16 GGUF of it
//! (written into target/bench-data when missing).
//!
//!     cargo build --release && MINITRON_LLAMA_CPP=$LLAMA_CPP_DIR/bin cargo bench --bench hellaswag
//!
//! `MINITRON_HELLASWAG_TASKS` (default 1000, the whole dev file) and `MINITRON_BENCH_THREADS`
//! (default 2) set the size; without `MINITRON_LLAMA_CPP` llama.cpp's row says "not measured".

use std::path::PathBuf;
use std::process::Command;

mod common;

use common::{bin, measure, Measured};

fn row(tool: &str, tasks: usize, m: &Measured, acc: f64) {
    println!(
        "| {tool} | {tasks} | {:.1} | {:.2} | {:.0} | {acc:.2} |",
        m.wall_s,
        tasks as f64 / m.wall_s,
        m.peak_rss_mb
    );
}

fn main() {
    let threads = common::env_usize("MINITRON_BENCH_THREADS", 2);
    let tasks = common::env_usize("MINITRON_HELLASWAG_TASKS", 1000);
    let Some((smol, shared)) = common::smollm2_and_shared("hellaswag") else {
        return;
    };
    for b in ["minitron-verify", "minitron-convert"] {
        assert!(
            bin(b).exists(),
            "build first: cargo build --release ({b} missing)"
        );
    }
    let file = shared.join("data/hellaswag-dev.txt");
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-data");
    std::fs::create_dir_all(&dir).unwrap();
    let gguf = dir.join("smollm2-135m-bf16.gguf");
    if !gguf.exists() {
        let s = Command::new(bin("minitron-convert"))
            .args([smol.to_str().unwrap(), "--to", "gguf:bf16", "--out"])
            .arg(&gguf)
            .status()
            .unwrap();
        assert!(s.success(), "gguf conversion");
    }
    println!(
        "hellaswag: {tasks} tasks of {}, {threads} threads, whole-job wall time per child process",
        file.display()
    );
    println!("| tool | tasks | wall s | tasks/s | peak RSS MiB | acc % |");
    println!("|---|---|---|---|---|---|");
    let m = measure(
        Command::new(bin("minitron-verify"))
            .arg(&smol)
            .arg("--hellaswag")
            .arg(&file)
            .args([
                "--tasks",
                &tasks.to_string(),
                "--threads",
                &threads.to_string(),
                "--json",
            ]),
    );
    let start = m.stdout.find('{').expect("json report");
    let v: serde_json::Value = serde_json::from_str(&m.stdout[start..]).expect("report");
    row(
        &format!(
            "minitron ({})",
            v["settings"]["compute_dtype"].as_str().unwrap_or("?")
        ),
        tasks,
        &m,
        v["tasks"]["candidate"]["acc"].as_f64().unwrap_or(f64::NAN),
    );
    let Some(d) = std::env::var_os("MINITRON_LLAMA_CPP").map(PathBuf::from) else {
        println!("| llama.cpp | {tasks} | not measured (set MINITRON_LLAMA_CPP) | | | |");
        return;
    };
    let lib = d.parent().map(|p| p.join("bin")).unwrap_or_default();
    let m = measure(
        Command::new(d.join("llama-perplexity"))
            .env(
                "LD_LIBRARY_PATH",
                format!("{}:{}", d.display(), lib.display()),
            )
            .arg("-m")
            .arg(&gguf)
            .arg("-f")
            .arg(&file)
            .args([
                "--hellaswag",
                "--hellaswag-tasks",
                &tasks.to_string(),
                "-c",
                "2048",
                "-t",
                &threads.to_string(),
            ]),
    );
    // The last progress line: `N<TAB>acc%<TAB>[lo%, hi%]`.
    let acc = m
        .stdout
        .lines()
        .rev()
        .find_map(|l| {
            let mut f = l.split('\t');
            let n: usize = f.next()?.trim().parse().ok()?;
            let a: f64 = f.next()?.trim().trim_end_matches('%').parse().ok()?;
            (n == tasks).then_some(a)
        })
        .unwrap_or(f64::NAN);
    row("llama.cpp (bf16 GGUF)", tasks, &m, acc);
}
