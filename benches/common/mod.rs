//! Setup shared by the bench binaries: thread count, chunk count, asset paths.

use std::path::PathBuf;

/// Reads an unsigned setting from the environment.
pub fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

#[allow(dead_code)] // not every bench sets threads in-process
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
