//! Conversion speed at full size: every target of `minitron-convert` on the synthetic 4.5 B
//! checkpoint, each as its own child process (whole-job wall time, peak RSS from `wait4`), next
//! to two floors measured in the same run: reading the input once, and writing (and syncing)
//! as many bytes as the artifact holds. With `LLAMA_CPP_DIR` (a llama.cpp build folder holding
//! `bin/llama-quantize`), the same run times `llama-quantize` from our bf16 GGUF (byte-identical
//! to llama.cpp's converter output) to Q4_K_M and Q8_0 with the same threads.
//!
//!     cargo build --release && cargo bench --bench convert
//!
//! Settings (environment):
//! - `MINITRON_CONVERT_MODEL`: a bf16 checkpoint folder; default `target/bench-data/m4b`,
//!   written once by `minitron-convert synth --preset minitron-4b-depth --seed 1` (9.08 GB).
//! - `MINITRON_CONVERT_JOBS`: job names to run, separated by `;` (default: all; see `JOBS`).
//! - `MINITRON_BENCH_THREADS`: threads for every tool (default 2).
//! - `MINITRON_CONVERT_CALIB`: calibration text for the jobs that calibrate (16 × 512 tokens);
//!   default `../shared/data/wikitext2-valid.txt` when present, else the built-in corpus (which
//!   holds only 10 such chunks under the Llama-3 tokenizer).

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

mod common;

use common::{bin, env_usize, measure, Measured};

/// (job name, `--to` value, extra arguments).
const JOBS: &[(&str, &str, &[&str])] = &[
    ("fp8", "fp8", &[]),
    ("fp8-static", "fp8-static", &["--calib-samples", "16"]),
    ("int8", "int8", &["--calib-samples", "16"]),
    ("int8-w8a16", "int8-w8a16", &[]),
    ("gguf:bf16", "gguf:bf16", &[]),
    ("gguf:q8_0", "gguf:q8_0", &[]),
    ("gguf:q6_k", "gguf:q6_k", &[]),
    ("gguf:q4_k_m", "gguf:q4_k_m", &[]),
    (
        "gguf:q4_k_m+imatrix",
        "gguf:q4_k_m",
        &["--calib-samples", "16"],
    ),
    (
        "fp8,int8,gguf:q4_k_m",
        "fp8,int8,gguf:q4_k_m",
        &["--calib-samples", "16"],
    ),
];

fn bench_dir() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench-data");
    std::fs::create_dir_all(&d).expect("bench-data folder");
    d
}

/// The input checkpoint, written once when absent.
fn model() -> PathBuf {
    if let Some(p) = std::env::var_os("MINITRON_CONVERT_MODEL") {
        return PathBuf::from(p);
    }
    let out = bench_dir().join("m4b");
    if !out.join("config.json").exists() {
        let s = Command::new(bin("minitron-convert"))
            .args(["synth", "--preset", "minitron-4b-depth", "--seed", "1"])
            .arg("--out")
            .arg(&out)
            .arg("--force")
            .status()
            .expect("synth");
        assert!(s.success(), "synth failed");
    }
    out
}

/// Bytes of every file under `p` (a file or a folder).
fn size_of(p: &Path) -> u64 {
    if p.is_file() {
        return std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    }
    std::fs::read_dir(p)
        .map(|d| d.flatten().map(|e| size_of(&e.path())).sum())
        .unwrap_or(0)
}

/// Reads every weight file once, 64 MiB at a time; returns (seconds, bytes).
/// The safetensors files of checkpoint folder `model`.
fn model_files(model: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(model)
        .expect("model folder")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    v.sort();
    v
}

/// Reads `files` once; returns seconds and bytes.
fn read_floor(files: &[PathBuf]) -> (f64, u64) {
    let t = Instant::now();
    let mut bytes = 0u64;
    let mut buf = vec![0u8; 1 << 26];
    for p in files {
        let mut f = std::fs::File::open(p).expect("open");
        loop {
            let n = f.read(&mut buf).expect("read");
            if n == 0 {
                break;
            }
            bytes += n as u64;
        }
    }
    (t.elapsed().as_secs_f64(), bytes)
}

/// Writes and syncs `bytes` bytes to a scratch file; returns seconds.
fn write_floor(bytes: u64) -> f64 {
    let p = bench_dir().join("write-floor.tmp");
    let buf = vec![0x5Au8; 1 << 26];
    let t = Instant::now();
    let mut f = std::fs::File::create(&p).expect("scratch file");
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        f.write_all(&buf[..n]).expect("write");
        left -= n as u64;
    }
    f.sync_all().expect("sync");
    let s = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&p);
    s
}

/// One table row; `floors` = (read s, write s).
fn row(job: &str, tool: &str, m: &Measured, in_bytes: u64, out_bytes: u64, floors: (f64, f64)) {
    println!(
        "| {job} | {tool} | {:.1} | {:.2} | {:.0} | {:.2} | {:.1} + {:.1} | {:.2} |",
        m.wall_s,
        in_bytes as f64 / 1e9 / m.wall_s,
        m.peak_rss_mb,
        out_bytes as f64 / 1e9,
        floors.0,
        floors.1,
        m.wall_s / (floors.0 + floors.1)
    );
}

fn main() {
    let threads = env_usize("MINITRON_BENCH_THREADS", 2);
    let model = model();
    let only: Option<Vec<String>> = std::env::var("MINITRON_CONVERT_JOBS")
        .ok()
        .map(|s| s.split(';').map(str::to_owned).collect());
    let wanted = |j: &str| only.as_ref().is_none_or(|o| o.iter().any(|x| x == j));
    let calib = std::env::var_os("MINITRON_CONVERT_CALIB")
        .map(PathBuf::from)
        .or_else(|| {
            let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../shared/data/wikitext2-valid.txt");
            p.exists().then_some(p)
        });
    let inputs = model_files(&model);
    let (read_s, in_bytes) = read_floor(&inputs);
    println!(
        "convert: {} ({:.2} GB), {threads} threads; first read {read_s:.1} s ({:.2} GB/s); each job's read floor is a second read just before it",
        model.display(),
        in_bytes as f64 / 1e9,
        in_bytes as f64 / 1e9 / read_s
    );
    println!(
        "calibration text: {}",
        calib
            .as_deref()
            .map_or("built-in corpus".into(), |p| p.display().to_string())
    );
    println!(
        "| job | tool | wall s | input GB/s | peak RSS MiB | output GB | floors s (read + write) | × floors |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let out_root = bench_dir().join("convert-out");
    let mut bf16_gguf: Option<PathBuf> = None;
    for &(job, to, extra) in JOBS {
        if !wanted(job) {
            continue;
        }
        let out = out_root.join(job.replace([':', ',', '+'], "_"));
        let mut cmd = Command::new(bin("minitron-convert"));
        cmd.arg(&model)
            .args(["--to", to, "--threads", &threads.to_string(), "--force"])
            .args(extra);
        if extra.contains(&"--calib-samples") {
            if let Some(c) = &calib {
                cmd.arg("--calib").arg(c);
            }
        }
        cmd.arg("--out").arg(&out);
        let (read_s, _) = read_floor(&inputs);
        let m = measure(&mut cmd);
        let out_bytes = size_of(&out);
        // The output goes before the write floor is measured, so that both fit on the disk.
        if job == "gguf:bf16" {
            bf16_gguf = Some(out);
        } else if out.exists() {
            let _ = if out.is_dir() {
                std::fs::remove_dir_all(&out)
            } else {
                std::fs::remove_file(&out)
            };
        }
        let floors = (read_s, write_floor(out_bytes));
        row(job, "minitron", &m, in_bytes, out_bytes, floors);
    }
    let Some(dir) = std::env::var_os("LLAMA_CPP_DIR").map(PathBuf::from) else {
        println!("| llama-quantize Q4_K_M, Q8_0 | llama.cpp | not measured (set LLAMA_CPP_DIR) | | | | | |");
        return;
    };
    let quantize = dir.join("bin/llama-quantize");
    let Some(src) = bf16_gguf.filter(|p| p.exists()) else {
        println!(
            "| llama-quantize | llama.cpp | not measured (the gguf:bf16 job did not run) | | | | | |"
        );
        return;
    };
    let src_bytes = size_of(&src);
    for ty in ["Q4_K_M", "Q8_0"] {
        let out = out_root.join(format!("llama-{ty}.gguf"));
        let mut cmd = Command::new(&quantize);
        cmd.env("LD_LIBRARY_PATH", dir.join("bin"))
            .arg(&src)
            .arg(&out)
            .args([ty, &threads.to_string()]);
        let (read_s, _) = read_floor(std::slice::from_ref(&src));
        let m = measure(&mut cmd);
        let out_bytes = size_of(&out);
        let _ = std::fs::remove_file(&out);
        let floors = (read_s, write_floor(out_bytes));
        row(
            &format!("bf16 GGUF → {ty}"),
            "llama-quantize",
            &m,
            src_bytes,
            out_bytes,
            floors,
        );
        let _ = std::fs::remove_file(&out);
    }
    let _ = std::fs::remove_file(&src);
}
