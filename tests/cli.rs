//! The command line as a practitioner meets it: help that lists every target and value, options
//! that do not apply refused by name, outputs and inputs checked before any work, honest
//! progress and timing lines, generation differences shown with both texts, and no backtrace
//! on a user's error whatever RUST_BACKTRACE says.

mod common;
use common::*;
use std::time::{Duration, Instant};

use minitron::export::Target;

/// Help text with its line wrapping undone (clap wraps at the terminal's width).
fn help(bin_name: &str, args: &[&str]) -> String {
    run_ok(bin_name, args)
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn help_lists_every_target_option_value_and_argument() {
    let h = help("minitron-convert", &["--help"]);
    for t in Target::ALL {
        assert!(h.contains(t.name()), "--help lacks target {t}:\n{h}");
    }
    for v in [
        "rtn",
        "search",
        "gptq",
        "reference",
        "best",
        "[default: 0.8]",
        "[default: 64]",
        "[default: 512]",
        "<model>-<TYPE>.gguf",
    ] {
        assert!(h.contains(v), "--help lacks `{v}`:\n{h}");
    }
    // minitron-verify describes itself, not the converter.
    let v = help("minitron-verify", &["--help"]);
    assert!(v.starts_with("Measure a checkpoint"), "{v}");
    assert!(v.contains("a checkpoint folder (bf16, FP8 or INT8 safetensors) or a GGUF file"));
    assert!(v.contains("--reference <DIR|FILE.gguf|REPORT.json>"), "{v}");
    // Every subcommand argument says what it is.
    for (sub, want) in [
        ("inspect", "Checkpoint folder"),
        ("dump", "GGUF file"),
        ("synth", "Output checkpoint folder"),
        ("synth", "[possible values: tiny, minitron-4b-depth]"),
        ("imatrix", "Output file"),
    ] {
        let h = help("minitron-convert", &[sub, "--help"]);
        assert!(h.contains(want), "{sub} --help lacks `{want}`:\n{h}");
    }
    // Target names are case-blind, GGUF ones included, and an unknown one lists them all.
    let e = run_err(
        "minitron-convert",
        &[s(&tiny()), "--to", "fp4", "--out", "/nonexistent/x"],
    );
    for t in Target::ALL {
        assert!(e.contains(t.name()), "{e}");
    }
    let t = tempdir();
    run_ok(
        "minitron-convert",
        &[s(&tiny()), "--to", "FP8", "--out", s(&t.path().join("a"))],
    );
    run_ok(
        "minitron-convert",
        &[
            s(&tiny()),
            "--to",
            "GGUF:Q8_0",
            "--out",
            s(&t.path().join("b.gguf")),
        ],
    );
}

#[test]
fn options_no_target_uses_are_refused_naming_their_target() {
    let t = tempdir();
    let out = t.path().join("out");
    let cases: &[(&str, &[&str], &str)] = &[
        ("fp8", &["--smooth-alpha", "0.5"], "--to int8"),
        ("fp8", &["--int8-weights", "gptq"], "--to int8"),
        (
            "gguf:q8_0",
            &["--group-size", "64"],
            "--to int8-w8a16 and w4a16",
        ),
        ("int8-w8a16", &["--int4-weights", "gptq"], "--to w4a16"),
        ("int8", &["--fp8-weights", "search"], "FP8 targets"),
        ("fp8", &["--imatrix", "x.gguf"], "quantized GGUF targets"),
        (
            "gguf:bf16",
            &["--gguf-search", "best"],
            "quantized GGUF targets",
        ),
        ("int8", &["--tensor-type", "attn=q8_0"], "GGUF targets"),
        ("fp8", &["--output-type", "q8_0"], "GGUF targets"),
        ("fp8", &["--embedding-type", "q8_0"], "GGUF targets"),
        ("int8-w8a16", &["--gguf-pre", "llama-bpe"], "GGUF targets"),
        ("fp8", &["--calib-samples", "8"], "targets that calibrate"),
        ("gguf:bf16", &["--calib", "x.txt"], "targets that calibrate"),
        (
            "int8-w8a16",
            &["--save-calib", "x.st"],
            "targets that calibrate",
        ),
    ];
    let model = tiny();
    for (target, extra, owner) in cases {
        let mut args = vec![s(&model), "--to", target, "--out", s(&out)];
        args.extend_from_slice(extra);
        let e = run_err("minitron-convert", &args);
        assert!(
            e.contains(extra[0]) && e.contains(owner) && e.contains(&format!("--to {target}")),
            "{target} {extra:?}: {e}"
        );
        assert!(!out.exists(), "{target} {extra:?} wrote something");
        eprintln!("{target} {extra:?}: {}", e.trim());
    }
    // The same options where they apply are accepted.
    run_ok(
        "minitron-convert",
        &[
            s(&tiny()),
            "--to",
            "int8,int8-w8a16",
            "--smooth-alpha",
            "0.5",
            "--group-size",
            "64",
            "--calib-samples",
            "2",
            "--calib-seq",
            "64",
            "--out",
            s(&out),
        ],
    );
}

#[test]
fn a_target_named_twice_is_refused_before_anything_is_written() {
    let t = tempdir();
    let out = t.path().join("out");
    for to in ["fp8,fp8", "fp8,FP8", "gguf:q8_0,int8,gguf:Q8_0"] {
        let e = run_err(
            "minitron-convert",
            &[s(&tiny()), "--to", to, "--out", s(&out)],
        );
        assert!(e.contains("twice"), "{to}: {e}");
        let left: Vec<_> = std::fs::read_dir(t.path()).unwrap().collect();
        assert!(left.is_empty(), "{to} left {left:?}");
    }
}

/// An existing output is refused before the checkpoint is calibrated or converted, so it costs
/// no time: on SmolLM2, where `int8` calibrates 64 × 512 tokens first (tens of seconds here),
/// every target's refusal must come back within a second.
#[test]
#[cfg_attr(
    not(minitron_assets),
    ignore = "needs the real assets: ../shared/tools/real-assets.sh"
)]
fn existing_outputs_are_refused_at_once_for_every_target() {
    let model = assets().join("smollm2-135m");
    let t = tempdir();
    for target in Target::ALL {
        let out = if target.mix().is_some() {
            t.path().join("x.gguf")
        } else {
            t.path().join("x")
        };
        std::fs::create_dir_all(t.path().join("x")).unwrap();
        std::fs::write(t.path().join("x.gguf"), b"not ours").unwrap();
        let t0 = Instant::now();
        let e = run_err(
            "minitron-convert",
            &[s(&model), "--to", target.name(), "--out", s(&out)],
        );
        let took = t0.elapsed();
        assert!(
            e.contains("already exists (pass --force to replace it)"),
            "{target}: {e}"
        );
        assert!(
            took < Duration::from_secs(1),
            "{target}: refused after {took:?}"
        );
    }
    assert_eq!(std::fs::read(t.path().join("x.gguf")).unwrap(), b"not ours");
}

/// Inputs named on the command line are opened before a model is loaded: with a damaged
/// candidate, a missing text file is what gets reported.
#[test]
fn inputs_are_checked_before_the_model_is_loaded() {
    let t = tempdir();
    copy_dir(&tiny(), t.path());
    std::fs::write(t.path().join("config.json"), b"{").unwrap();
    let e = run_err("minitron-verify", &[s(t.path()), "--ppl", "/no/such.txt"]);
    assert!(
        e.contains("/no/such.txt") && !e.contains("config.json"),
        "{e}"
    );
    let e = run_err(
        "minitron-convert",
        &[
            s(&tiny()),
            "--to",
            "int8",
            "--calib",
            "/no/such.txt",
            "--out",
            s(&t.path().join("o")),
        ],
    );
    assert!(e.contains("/no/such.txt"), "{e}");
}

#[test]
fn fewer_calibration_chunks_than_asked_are_reported() {
    let t = tempdir();
    // The bundled 21 kB text: 20 chunks of 512 under the fixture's tokenizer.
    let text = root().join("src/model/default_corpus.txt");
    let o = run(
        "minitron-convert",
        &[
            s(&tiny()),
            "--to",
            "int8",
            "--calib",
            s(&text),
            "--calib-samples",
            "500",
            "--out",
            s(&t.path().join("o")),
        ],
    );
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        err.contains("warning: --calib-samples 500 asks for 500 chunks of 512 tokens")
            && err.contains("holds only 20: calibrating on 20"),
        "{err}"
    );
    assert!(
        out.contains("calibrated once: 20 chunks × 512 tokens"),
        "{out}"
    );
}

/// A checkpoint whose shards hold more blocks than its config.json names converts what the
/// config describes and says which tensors it left out.
#[test]
fn tensors_past_the_config_are_named_in_a_warning() {
    let t = tempdir();
    let m = t.path().join("m");
    copy_dir(&tiny(), &m);
    let cfg = m.join("config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&cfg).unwrap()).unwrap();
    c["num_hidden_layers"] = serde_json::json!(1);
    std::fs::write(&cfg, c.to_string()).unwrap();
    let o = run(
        "minitron-convert",
        &[s(&m), "--to", "fp8", "--out", s(&t.path().join("o"))],
    );
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("warning: ")
            && err.contains("are not part of the model config.json describes")
            && err.contains("model.layers.1."),
        "{err}"
    );
}

/// Not on a terminal (as here), nothing but the result lines and warnings reaches the streams:
/// no bar, no carriage returns.
#[test]
fn progress_is_silent_off_a_terminal_and_times_add_up() {
    let t = tempdir();
    let o = run(
        "minitron-convert",
        &[
            s(&tiny()),
            "--to",
            "fp8,gguf:q4_k_m",
            "--calib-samples",
            "4",
            "--calib-seq",
            "64",
            "--out",
            s(&t.path().join("o")),
        ],
    );
    assert!(o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.is_empty(), "stderr: {err:?}");
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(!out.contains('\r'), "{out:?}");
    // The whole run and its parts.
    let last = out.lines().last().unwrap();
    assert!(
        last.contains(" s (calibration ") && last.contains(" s, conversion and writing "),
        "{last}"
    );
    // The file count is the folder's, manifest included; the GGUF carries the model's name.
    let fp8 = t.path().join("o/fp8");
    let n = std::fs::read_dir(&fp8).unwrap().count();
    assert!(out.contains(&format!("in {n} files")), "{n}: {out}");
    assert!(t.path().join("o/tiny-llama3-Q4_K_M.gguf").exists());
    assert!(t
        .path()
        .join("o/tiny-llama3-Q4_K_M.gguf.manifest.json")
        .exists());
}

/// A generation that differs is printed beside the reference's, and both texts are in the
/// JSON report; the reference may be a GGUF file.
#[test]
fn differing_generations_show_both_texts_and_a_gguf_can_be_the_reference() {
    let t = tempdir();
    let other = t.path().join("other");
    run_ok(
        "minitron-convert",
        &[
            "synth",
            "--preset",
            "tiny",
            "--seed",
            "1",
            "--out",
            s(&other),
        ],
    );
    let prompts = t.path().join("prompts.txt");
    std::fs::write(&prompts, "The capital of France is\nOnce upon a time\n").unwrap();
    let report = t.path().join("r.json");
    let table = run_ok(
        "minitron-verify",
        &[
            s(&other),
            "--reference",
            s(&tiny()),
            "--gen",
            s(&prompts),
            "--tokens",
            "8",
            "--report",
            s(&report),
        ],
    );
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let ps = r["gen"]["prompts"].as_array().unwrap();
    let differing: Vec<_> = ps.iter().filter(|p| !p["first_diff"].is_null()).collect();
    assert!(
        !differing.is_empty(),
        "seed 1 and seed 0 generate alike?\n{table}"
    );
    for p in &differing {
        let rt = p["reference_text"].as_str().expect("reference_text");
        let ct = p["candidate_text"].as_str().unwrap();
        assert_ne!(rt, ct);
        assert!(
            table.contains(&format!(
                "  reference {:?} → {:?}",
                p["prompt"].as_str().unwrap(),
                rt
            )),
            "{table}"
        );
    }

    // The bf16 GGUF of the fixture as the reference of the fixture itself: same weights, so
    // the same greedy tokens and no divergence at all.
    let gguf = t.path().join("tiny-bf16.gguf");
    run_ok(
        "minitron-convert",
        &[s(&tiny()), "--to", "gguf:bf16", "--out", s(&gguf)],
    );
    let text = root().join("src/model/default_corpus.txt");
    let out = run_ok(
        "minitron-verify",
        &[
            s(&tiny()),
            "--reference",
            s(&gguf),
            "--ppl",
            s(&text),
            "--kld",
            "--ctx",
            "64",
            "--chunks",
            "4",
            "--gen",
            s(&prompts),
            "--tokens",
            "8",
            "--dtype",
            "bf16",
            "--json",
        ],
    );
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["gen"]["exact_match"], 2, "{out}");
    // The same bf16 values through the same kernels (bf16 compute asked for: on CPUs without
    // AVX2 the default is f32, whose GGUF and safetensors paths may sum in another order): the
    // logits agree to the bit.
    let d = &r["kld"]["divergence"];
    assert_eq!(d["max_kld"].as_f64(), Some(0.0), "{d}");
    assert_eq!(d["top1_agreement_pct"].as_f64(), Some(100.0), "{d}");
    assert!(r["inputs_sha256"]
        .as_object()
        .unwrap()
        .contains_key("reference/tiny-bf16.gguf"));
}

/// A user's error reads the same with RUST_BACKTRACE=1: `run_err` sets it for every bad-input
/// case in the suite; this one fails inside candle's GGUF tokenizer reader, which attaches a
/// backtrace to its errors (a GGUF whose `tokenizer.ggml.model` names no known model).
#[test]
fn no_backtrace_on_a_users_error() {
    let t = tempdir();
    let g = t.path().join("m.gguf");
    run_ok(
        "minitron-convert",
        &[s(&tiny()), "--to", "gguf:q8_0", "--out", s(&g)],
    );
    let mut b = std::fs::read(&g).unwrap();
    let key = b"tokenizer.ggml.model";
    let at = b.windows(key.len()).position(|w| w == key).unwrap() + key.len();
    // The value follows: type (u32 8 = string), length (u64 4), then the bytes `gpt2`.
    assert_eq!(&b[at + 12..at + 16], b"gpt2");
    b[at + 12..at + 16].copy_from_slice(b"zzz2");
    std::fs::write(&g, b).unwrap();
    let text = root().join("src/model/default_corpus.txt");
    let e = run_err("minitron-verify", &[s(&g), "--ppl", s(&text)]);
    assert!(e.contains("m.gguf"), "{e}");
    assert_eq!(e.trim().lines().count(), 1, "{e}");
    eprintln!("{}", e.trim());
}

/// On a terminal (a pseudo-terminal from util-linux's `script`), each phase draws its own bar in
/// human units: calibration in tokens/s, conversion in bytes of the checkpoint.
#[test]
#[cfg_attr(
    not(minitron_assets),
    ignore = "needs the real assets: ../shared/tools/real-assets.sh"
)]
fn progress_on_a_terminal_counts_tokens_and_bytes() {
    let model = assets().join("smollm2-135m");
    let t = tempdir();
    let cmd = format!(
        "{} {} --to int8 --calib-samples 4 --calib-seq 256 --out {}",
        bin("minitron-convert").display(),
        model.display(),
        t.path().join("o").display()
    );
    let o = std::process::Command::new("script")
        .args(["-qfec", &cmd, "/dev/null"])
        .env_remove("CI")
        .output()
        .expect("util-linux `script` runs (it provides the pseudo-terminal)");
    let screen = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{screen}");
    let lines: Vec<&str> = screen.split(['\r', '\n']).collect();
    let bar = |phase: &str, unit: &str| {
        lines
            .iter()
            .any(|l| l.contains(&format!("{phase} [")) && l.contains(unit))
    };
    assert!(bar("calibrate", " tokens/s "), "{screen:?}");
    assert!(bar("convert", "MiB/256.57 MiB"), "{screen:?}");
    // No bar for a phase that has not started: the first bar drawn is calibration's.
    let first = lines.iter().find(|l| l.contains(" [")).unwrap();
    assert!(first.contains("calibrate ["), "{first:?}");
}
