//! One export pipeline: checkpoint and GGUF targets in one run, one calibration shared by all.

mod common;

use std::path::Path;

use common::*;
use minitron::format::gguf::{keys, GgufFile, Value};

/// Every file under `dir` (recursively) but the manifests (they record times and command
/// lines), with its sha256.
fn tree(dir: &Path) -> Vec<(String, String)> {
    let mut v = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if p.is_dir() {
            v.extend(
                tree(&p)
                    .into_iter()
                    .map(|(n, h)| (format!("{name}/{n}"), h)),
            );
        } else if !name.ends_with("manifest.json") {
            v.push((name, sha256(&p)));
        }
    }
    v.sort();
    v
}

fn imatrix_chunks(path: &Path) -> Option<u64> {
    GgufFile::open(path)
        .unwrap()
        .get(keys::QUANTIZE_IMATRIX_CHUNKS)
        .and_then(Value::as_u64)
}

/// The bug: `--to fp8,gguf:q8_0 --out X` wrote the GGUF under X, then refused X for the FP8 folder
/// ("already exists"), and with --force deleted the GGUF it had just written.
#[test]
fn fp8_and_gguf_targets_under_one_out_keep_both_artifacts() {
    let t = tempdir();
    let x = t.path().join("X");
    let log = run_ok(
        "minitron-convert",
        &[s(&tiny()), "--to", "fp8,gguf:q8_0", "--out", s(&x)],
    );
    assert!(x.join("fp8/config.json").exists(), "{log}");
    assert!(x.join("tiny-llama3-Q8_0.gguf").exists(), "{log}");
    // Each artifact is the one a single-target run writes.
    let fp8 = t.path().join("fp8-alone");
    let q8 = t.path().join("q8_0-alone.gguf");
    run_ok(
        "minitron-convert",
        &[s(&tiny()), "--to", "fp8", "--out", s(&fp8)],
    );
    run_ok(
        "minitron-convert",
        &[s(&tiny()), "--to", "gguf:q8_0", "--out", s(&q8)],
    );
    assert_eq!(tree(&x.join("fp8")), tree(&fp8));
    assert_eq!(sha256(&x.join("tiny-llama3-Q8_0.gguf")), sha256(&q8));
    // Again without --force: refused before anything is touched; with --force: both replaced.
    let before = tree(&x);
    let err = run_err(
        "minitron-convert",
        &[s(&tiny()), "--to", "fp8,gguf:q8_0", "--out", s(&x)],
    );
    assert!(err.contains("already exists"), "{err}");
    assert_eq!(tree(&x), before);
    run_ok(
        "minitron-convert",
        &[
            s(&tiny()),
            "--to",
            "fp8,gguf:q8_0",
            "--out",
            s(&x),
            "--force",
        ],
    );
    assert_eq!(tree(&x), before);
}

#[test]
fn load_calib_and_calib_samples_reach_gguf_targets() {
    let t = tempdir();
    let text = root().join("src/model/default_corpus.txt");
    // --calib-samples alone (built-in corpus) gives the GGUF an importance matrix of 3 chunks.
    let a = t.path().join("a.gguf");
    let saved = t.path().join("stats.safetensors");
    run_ok(
        "minitron-convert",
        &[
            s(&tiny()),
            "--to",
            "gguf:q4_k_m",
            "--calib-samples",
            "3",
            "--calib-seq",
            "32",
            "--save-calib",
            s(&saved),
            "--out",
            s(&a),
        ],
    );
    assert_eq!(imatrix_chunks(&a), Some(3));
    // --load-calib of those statistics reproduces the same file without running the model.
    let b = t.path().join("b.gguf");
    run_ok(
        "minitron-convert",
        &[
            s(&tiny()),
            "--to",
            "gguf:q4_k_m",
            "--load-calib",
            s(&saved),
            "--out",
            s(&b),
        ],
    );
    assert_eq!(sha256(&a), sha256(&b));
    // Another sample count is another matrix.
    let c = t.path().join("c.gguf");
    run_ok(
        "minitron-convert",
        &[
            s(&tiny()),
            "--to",
            "gguf:q4_k_m",
            "--calib",
            s(&text),
            "--calib-samples",
            "5",
            "--calib-seq",
            "32",
            "--out",
            s(&c),
        ],
    );
    assert_eq!(imatrix_chunks(&c), Some(5));
    // Without any calibration option the GGUF is llama-quantize's plain mix.
    let d = t.path().join("d.gguf");
    run_ok(
        "minitron-convert",
        &[s(&tiny()), "--to", "gguf:q4_k_m", "--out", s(&d)],
    );
    assert_eq!(imatrix_chunks(&d), None);
}

#[test]
fn four_targets_from_one_read_and_one_calibration() {
    let t = tempdir();
    let x = t.path().join("X");
    let log = run_ok(
        "minitron-convert",
        &[
            s(&tiny()),
            "--to",
            "fp8,int8,gguf:q8_0,gguf:q4_k_m",
            "--calib-samples",
            "4",
            "--calib-seq",
            "32",
            "--out",
            s(&x),
        ],
    );
    println!("{log}");
    assert_eq!(log.matches("calibrated once").count(), 1, "{log}");
    assert!(log.contains("1 forward pass"), "{log}");
    assert!(
        log.contains("used by int8, gguf:q8_0, gguf:q4_k_m"),
        "{log}"
    );
    assert_eq!(log.matches("wrote ").count(), 4, "{log}");
    assert!(log.contains("once:"), "{log}");
    for p in [
        "fp8/config.json",
        "int8/config.json",
        "tiny-llama3-Q8_0.gguf",
        "tiny-llama3-Q4_K_M.gguf",
    ] {
        assert!(x.join(p).exists(), "{p}");
    }
    // q8_0 takes no importance matrix (as llama-quantize); q4_k_m takes this run's.
    assert_eq!(imatrix_chunks(&x.join("tiny-llama3-Q8_0.gguf")), Some(4));
    assert_eq!(imatrix_chunks(&x.join("tiny-llama3-Q4_K_M.gguf")), Some(4));
}

/// Manifests and verify reports read back into their typed records; a missing key is an error
/// that names it, never a NaN.
#[test]
fn manifests_and_reports_read_back_typed() {
    let t = tempdir();
    let out = t.path().join("fp8");
    run_ok(
        "minitron-convert",
        &[s(&tiny()), "--to", "fp8", "--out", s(&out)],
    );
    let path = out.join("minitron-manifest.json");
    let m = minitron::export::manifest::Manifest::read(&path).unwrap();
    assert_eq!(m.target, "fp8");
    assert_eq!(m.tensor_error.per_tensor.len(), 7 * 2);
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    v.as_object_mut().unwrap().remove("total_bytes");
    let broken = t.path().join("broken.json");
    std::fs::write(&broken, v.to_string()).unwrap();
    let e = minitron::export::manifest::Manifest::read(&broken)
        .unwrap_err()
        .to_string();
    assert!(e.contains("total_bytes"), "{e}");

    let j = run_ok(
        "minitron-verify",
        &[
            s(&out),
            "--reference",
            s(&tiny()),
            "--kld",
            "--ppl",
            s(&root().join("src/model/default_corpus.txt")),
            "--ctx",
            "64",
            "--chunks",
            "2",
            "--json",
        ],
    );
    let r: minitron::verify::report::Report = serde_json::from_str(&j).unwrap();
    assert!(r.kld.unwrap().divergence.mean_kld > 0.0);
    let mut v: serde_json::Value = serde_json::from_str(&j).unwrap();
    v["kld"]["divergence"]
        .as_object_mut()
        .unwrap()
        .remove("mean_kld");
    let e = serde_json::from_value::<minitron::verify::report::Report>(v)
        .unwrap_err()
        .to_string();
    assert!(e.contains("mean_kld"), "{e}");
}

/// Every target kind in one run gives the same bytes with 1 and 3 threads (3 splits work
/// differently from 2 on any machine).
#[test]
fn every_target_is_the_same_for_any_thread_count() {
    let t = tempdir();
    let run = |threads: &str| {
        let out = t.path().join(format!("t{threads}"));
        run_ok(
            "minitron-convert",
            &[
                s(&tiny()),
                "--to",
                "fp8,fp8-static,fp8-modelopt,int8,int8-w8a16,w4a16,gguf:bf16,gguf:q8_0,gguf:q4_k_m,gguf:q6_k",
                "--calib-samples",
                "4",
                "--calib-seq",
                "32",
                "--threads",
                threads,
                "--out",
                s(&out),
            ],
        );
        tree(&out)
    };
    let one = run("1");
    let count = |suffix: &str| one.iter().filter(|(n, _)| n.ends_with(suffix)).count();
    assert_eq!(count("/model.safetensors"), 6, "{one:?}");
    assert_eq!(count(".gguf"), 4, "{one:?}");
    assert_eq!(one, run("3"));
}

/// GPTQ and a GGUF importance matrix from the same run: one pass through the blocks (each
/// block's imatrix entries are taken when the pipeline calibrates it), and the same bytes as
/// each target converted on its own.
#[test]
fn gptq_and_a_calibrated_gguf_share_one_block_pass() {
    let t = tempdir();
    let common = ["--calib-samples", "4", "--calib-seq", "32"];
    let model = tiny();
    let conv = |to: &str, out: &Path, extra: &[&str]| {
        let mut a = vec![s(&model), "--to", to, "--out", s(out)];
        a.extend_from_slice(&common);
        a.extend_from_slice(extra);
        run_ok("minitron-convert", &a)
    };
    let x = t.path().join("X");
    let log = conv("w4a16,gguf:q4_k_m", &x, &["--int4-weights", "gptq"]);
    assert!(log.contains("1 forward pass"), "{log}");
    let w = t.path().join("w");
    conv("w4a16", &w, &["--int4-weights", "gptq"]);
    let g = t.path().join("g.gguf");
    conv("gguf:q4_k_m", &g, &[]);
    assert_eq!(tree(&x.join("w4a16")), tree(&w));
    assert_eq!(sha256(&x.join("tiny-llama3-Q4_K_M.gguf")), sha256(&g));
}

/// The block pipeline's calibration inputs: `quantized` follows one artifact's quantized
/// blocks, so it changes what later blocks are calibrated on (and thus their codes) but not the
/// first block's; `original` is what a run without the option does for GPTQ; with two
/// calibrated targets `quantized` is refused before any work.
#[test]
fn calib_inputs_quantized_follows_one_artifacts_blocks() {
    let t = tempdir();
    let model = tiny();
    let conv = |dir: &Path, extra: &[&str]| {
        let mut a = vec![
            s(&model),
            "--to",
            "w4a16",
            "--int4-weights",
            "gptq",
            "--group-size",
            "32",
            "--calib-samples",
            "4",
            "--calib-seq",
            "32",
            "--out",
            s(dir),
        ];
        a.extend_from_slice(extra);
        run_ok("minitron-convert", &a)
    };
    let (d, o, q) = (t.path().join("d"), t.path().join("o"), t.path().join("q"));
    conv(&d, &[]);
    conv(&o, &["--calib-inputs", "original"]);
    let log = conv(&q, &["--calib-inputs", "quantized"]);
    assert!(log.contains("block by block on quantized inputs"), "{log}");
    assert_eq!(
        tree(&d),
        tree(&o),
        "the default for GPTQ W4A16 is original inputs"
    );
    let read = |dir: &Path, name: &str| {
        let st =
            minitron::format::safetensors::SafetensorsFile::open(&dir.join("model.safetensors"))
                .unwrap();
        st.bytes(name).unwrap().to_vec()
    };
    let first = "model.layers.0.mlp.down_proj.weight_packed";
    let last = "model.layers.1.mlp.down_proj.weight_packed";
    assert_eq!(
        read(&o, first),
        read(&q, first),
        "block 0 sees the same inputs"
    );
    assert_ne!(
        read(&o, last),
        read(&q, last),
        "block 1 sees block 0's quantized outputs"
    );
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(q.join("minitron-manifest.json")).unwrap())
            .unwrap();
    assert_eq!(m["calib_inputs"], "quantized");

    let e = run_err(
        "minitron-convert",
        &[
            s(&tiny()),
            "--to",
            "int8,fp8-static",
            "--calib-inputs",
            "quantized",
            "--calib-samples",
            "2",
            "--out",
            s(&t.path().join("two")),
        ],
    );
    assert!(
        e.contains("exactly one calibrated checkpoint target"),
        "{e}"
    );
    assert!(e.contains("int8, fp8-static"), "{e}");
    assert!(!t.path().join("two").exists());
}
