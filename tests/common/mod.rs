//! Helpers shared by the integration tests: paths, CLI runner, temp folders, real assets.
#![allow(dead_code)]

pub mod reference;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn tiny() -> PathBuf {
    root().join("fixtures/tiny-llama3")
}

pub fn shared() -> PathBuf {
    root().join("../shared")
}

/// Folder built by ../shared/tools/real-assets.sh. Tests that call this carry
/// `#[cfg_attr(not(minitron_assets), ignore = ...)]` (build.rs sets the cfg when the assets are
/// present), so without the assets they are reported as ignored; run anyway (`--ignored`), or
/// with the assets gone since the build, they fail here, saying what is missing.
pub fn assets() -> PathBuf {
    let dir = std::env::var_os("MINITRON_ASSETS")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/minitron-assets"))
        })
        .expect("MINITRON_ASSETS or HOME must be set to find the real assets");
    for p in [
        dir.join("smollm2-135m/model.safetensors"),
        shared().join("data/known-answers.json"),
    ] {
        assert!(
            p.exists(),
            "real asset missing: {} (run ../shared/tools/real-assets.sh, or set MINITRON_ASSETS)",
            p.display()
        );
    }
    dir
}

pub fn known_answers() -> serde_json::Value {
    let p = shared().join("data/known-answers.json");
    serde_json::from_str(&std::fs::read_to_string(p).expect("known-answers.json"))
        .expect("valid json")
}

pub fn bin(name: &str) -> PathBuf {
    match name {
        "minitron-convert" => PathBuf::from(env!("CARGO_BIN_EXE_minitron-convert")),
        "minitron-verify" => PathBuf::from(env!("CARGO_BIN_EXE_minitron-verify")),
        other => panic!("unknown binary {other}"),
    }
}

pub fn run(name: &str, args: &[&str]) -> Output {
    Command::new(bin(name))
        .args(args)
        .env_remove("RAYON_NUM_THREADS")
        .output()
        .expect("binary runs")
}

/// Runs and asserts success; returns stdout.
pub fn run_ok(name: &str, args: &[&str]) -> String {
    let o = run(name, args);
    assert!(
        o.status.success(),
        "{name} {args:?} failed:\nstdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).expect("utf-8 stdout")
}

/// Runs, asserts a clean bad-input failure (exit status 2, no panic, no backtrace) and returns
/// stderr.
pub fn run_err(name: &str, args: &[&str]) -> String {
    run_err_code(name, args, 2)
}

/// Runs, asserts a clean failure with exit status `code` (no panic, no backtrace) and returns
/// stderr.
///
/// It runs with `RUST_BACKTRACE=1` and `RUST_LIB_BACKTRACE=1`, as a developer's shell often
/// has them: a user's error must read the same there.
pub fn run_err_code(name: &str, args: &[&str], code: i32) -> String {
    let o = Command::new(bin(name))
        .args(args)
        .env_remove("RAYON_NUM_THREADS")
        .env("RUST_BACKTRACE", "1")
        .env("RUST_LIB_BACKTRACE", "1")
        .output()
        .expect("binary runs");
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        !o.status.success(),
        "{name} {args:?} unexpectedly succeeded"
    );
    assert_eq!(
        o.status.code(),
        Some(code),
        "expected exit status {code}, stderr:\n{err}"
    );
    let frame = |l: &str| {
        let t = l.trim_start();
        t.split_once(": ")
            .is_some_and(|(n, _)| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    };
    assert!(
        !err.contains("panicked")
            && !err.contains("stack backtrace")
            && !err.contains("Stack backtrace")
            && !err.lines().any(frame),
        "panic or backtrace instead of an error:\n{err}"
    );
    // `--nocapture` lists every refusal with its status.
    eprintln!("[exit {code}] {name}: {}", err.trim());
    err
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

/// Copies a checkpoint folder (flat) into `dst`.
pub fn copy_dir(src: &Path, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
}

pub fn sha256(path: &Path) -> String {
    minitron::model::checkpoint::sha256_file(path).unwrap()
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// name → (dtype, shape, sha256 of the data) of every tensor in a folder's safetensors files.
pub fn tensors(dir: &Path) -> std::collections::BTreeMap<String, (String, Vec<usize>, String)> {
    let mut out = std::collections::BTreeMap::new();
    for p in minitron::model::checkpoint::weight_files(dir).unwrap() {
        let f = minitron::model::checkpoint::SafetensorsFile::open(&p).unwrap();
        for (name, t) in &f.tensors {
            let sha = minitron::format::safetensors::sha256_bytes(f.bytes(name).unwrap());
            out.insert(
                name.clone(),
                (t.dtype.name().to_owned(), t.shape.clone(), sha),
            );
        }
    }
    out
}

/// A folder's config.json.
pub fn config(dir: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap()
}

/// The bundled corpus cut in two at a line break near its middle, written into `dir`:
/// `(calibration half, evaluation half)`, so that quality checks never evaluate on the text
/// they calibrated on.
#[allow(dead_code)]
pub fn split_corpus(dir: &Path) -> (PathBuf, PathBuf) {
    let corpus = std::fs::read_to_string(root().join("src/model/default_corpus.txt")).unwrap();
    let cut = corpus[..corpus.len() / 2]
        .rfind('\n')
        .expect("a line break");
    let (a, b) = (dir.join("calib-half.txt"), dir.join("eval-half.txt"));
    std::fs::write(&a, &corpus[..cut]).unwrap();
    std::fs::write(&b, &corpus[cut..]).unwrap();
    (a, b)
}
