//! Tells the test suite what this machine can run, so that a test which cannot run here is
//! reported as ignored rather than passing without testing anything:
//!
//! - `minitron_assets`: the real assets are present (SmolLM2-135M and the Llama-3 tokenizer built
//!   by `../shared/tools/real-assets.sh` under `$MINITRON_ASSETS` or
//!   `~/.cache/minitron-assets`, and `../shared/data`). With `MINITRON_REQUIRE_ASSETS=1` (as
//!   `.ci/run` sets) their absence fails the build instead.
//! - `minitron_avx512bf16`: the building CPU has AVX-512 BF16.
//! - `minitron_fast_kernel`: the building CPU has AVX-512 BF16 or AVX2 + FMA, so the tests
//!   comparing the fast kernels with the portable ones have two paths to compare.
use std::path::{Path, PathBuf};

/// Asks cargo to run this script again when `p` appears or changes: watches `p` when it exists,
/// else its nearest existing ancestor (whose modification time changes when an entry is made).
fn watch(p: &Path) {
    let mut q = p;
    while !q.exists() {
        match q.parent() {
            Some(up) if !up.as_os_str().is_empty() => q = up,
            _ => return,
        }
    }
    println!("cargo:rerun-if-changed={}", q.display());
}

fn main() {
    println!("cargo::rustc-check-cfg=cfg(minitron_assets)");
    println!("cargo::rustc-check-cfg=cfg(minitron_avx512bf16)");
    println!("cargo::rustc-check-cfg=cfg(minitron_fast_kernel)");
    println!("cargo:rerun-if-changed=build.rs");
    for v in ["MINITRON_ASSETS", "MINITRON_REQUIRE_ASSETS", "HOME"] {
        println!("cargo:rerun-if-env-changed={v}");
    }
    let root = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let assets = std::env::var_os("MINITRON_ASSETS")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/minitron-assets"))
        });
    let needed: Vec<PathBuf> = assets
        .iter()
        .flat_map(|a| {
            [
                a.join("smollm2-135m/model.safetensors"),
                a.join("llama3-tokenizer/tokenizer.json"),
                a.join("venv/bin/python"),
            ]
        })
        .chain([root.join("../shared/data/known-answers.json")])
        .collect();
    for p in &needed {
        watch(p);
    }
    let missing: Vec<&PathBuf> = needed.iter().filter(|p| !p.exists()).collect();
    if assets.is_some() && missing.is_empty() {
        println!("cargo:rustc-cfg=minitron_assets");
    } else if std::env::var("MINITRON_REQUIRE_ASSETS").as_deref() == Ok("1") {
        eprintln!("MINITRON_REQUIRE_ASSETS=1, but the real assets are missing:");
        for p in &missing {
            eprintln!("  {}", p.display());
        }
        eprintln!("run ../shared/tools/real-assets.sh (or set MINITRON_ASSETS)");
        std::process::exit(1);
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512bf16")
        && std::arch::is_x86_feature_detected!("avx512f")
    {
        println!("cargo:rustc-cfg=minitron_avx512bf16");
        println!("cargo:rustc-cfg=minitron_fast_kernel");
    } else if std::arch::is_x86_feature_detected!("avx2")
        && std::arch::is_x86_feature_detected!("fma")
    {
        println!("cargo:rustc-cfg=minitron_fast_kernel");
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_some() {
        build_kernels(&root);
    }
}

/// With the `cuda` feature: compiles `src/runtime/kernels.cu` to PTX in `OUT_DIR` (embedded by
/// `runtime::devform`) with the `nvcc` that scripts/build-cuda.sh puts on PATH, for the compute
/// capability in `CUDA_COMPUTE_CAP` (default 80; the driver compiles PTX for newer chips).
/// `-fmad=false` keeps every multiply and add separately rounded, as the kernels' CPU twins
/// compute them.
fn build_kernels(root: &Path) {
    let src = root.join("src/runtime/kernels.cu");
    println!("cargo:rerun-if-changed={}", src.display());
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("set by cargo"))
        .join("minitron_kernels.ptx");
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| "nvcc".into());
    let status = std::process::Command::new(&nvcc)
        .args(["--ptx", "-O3", "-fmad=false", "-std=c++17"])
        .arg(format!("-arch=compute_{cap}"))
        .arg("-o")
        .arg(&out)
        .arg(&src)
        .status();
    match status {
        Ok(s) if s.success() => {}
        Ok(s) => {
            eprintln!("{nvcc} failed on {} ({s})", src.display());
            std::process::exit(1);
        }
        Err(e) => {
            eprintln!(
                "the cuda feature needs nvcc to compile {}: {e} (scripts/build-cuda.sh installs it)",
                src.display()
            );
            std::process::exit(1);
        }
    }
}
