//! Setup shared by the bench binaries: thread count, chunk count, asset paths, and measuring a
//! child process. Each bench uses a part of it.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

/// Reads an unsigned setting from the environment.
pub fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Fixes rayon's and candle's thread count from MINITRON_BENCH_THREADS (default 2).
pub fn set_threads() -> usize {
    let threads = env_usize("MINITRON_BENCH_THREADS", 2);
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build_global();
    threads
}

/// (SmolLM2 checkpoint folder, ../shared folder) when both exist.
pub fn smollm2_and_shared(bench: &str) -> Option<(PathBuf, PathBuf)> {
    let shared = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared");
    let assets = std::env::var_os("MINITRON_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/minitron-assets")
        });
    let model = assets.join("smollm2-135m");
    if model.join("model.safetensors").exists() && shared.join("data").exists() {
        Some((model, shared))
    } else {
        eprintln!("{bench}: SKIPPED (run ../shared/tools/real-assets.sh first)");
        None
    }
}

/// A child process's whole-job wall time, peak RSS and output.
pub struct Measured {
    pub wall_s: f64,
    pub peak_rss_mb: f64,
    pub stdout: String,
}

/// Runs `cmd` as a child and returns its wall time, peak RSS and output.
pub fn measure(cmd: &mut Command) -> Measured {
    use std::os::unix::process::ExitStatusExt;
    let t = Instant::now();
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let pid = child.id() as libc::pid_t;
    // Read the pipes on threads so that a chatty child never blocks.
    let mut child = child;
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let o = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut out, &mut s).ok();
        s
    });
    let e = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut err, &mut s).ok();
        s
    });
    let mut status = 0;
    // SAFETY: plain wait4 on our own child; rusage is written by the kernel.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    let wall_s = t.elapsed().as_secs_f64();
    assert_eq!(r, pid, "wait4");
    let stdout = o.join().unwrap();
    let stderr = e.join().unwrap();
    let st = std::process::ExitStatus::from_raw(status);
    assert!(st.success(), "{cmd:?} failed: {stderr}");
    Measured {
        wall_s,
        peak_rss_mb: ru.ru_maxrss as f64 / 1024.0,
        stdout: stdout + &stderr,
    }
}

/// One of our release binaries.
pub fn bin(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("target/release")
        .join(name)
}
