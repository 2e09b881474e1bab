//! FP8 artifacts: byte parity with llm-compressor, layouts of the three flavours, thread-count
//! invariance, one pass for several targets, and the runner loading each artifact.

mod common;
use common::*;

use std::collections::BTreeMap;

#[test]
#[cfg_attr(
    not(minitron_assets),
    ignore = "needs the real assets: ../shared/tools/real-assets.sh"
)]
fn smollm2_fp8_equals_llm_compressor_byte_for_byte() {
    let a = assets();
    let ka = known_answers();
    let want = &ka["llm_compressor_fp8_dynamic"];
    let t = tempdir();
    let out = t.path().join("fp8");
    run_ok(
        "minitron-convert",
        &[s(&a.join("smollm2-135m")), "--to", "fp8", "--out", s(&out)],
    );
    let got = tensors(&out);
    let want_t = want["tensors"].as_object().unwrap();
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want_t.keys().collect::<Vec<_>>(),
        "tensor names"
    );
    let mut hashed = 0;
    let mut differing = Vec::new();
    for (name, w) in want_t {
        let (dt, shape, sha) = &got[name];
        assert_eq!(dt, w["dtype"].as_str().unwrap(), "{name} dtype");
        assert_eq!(serde_json::json!(shape), w["shape"], "{name} shape");
        if let Some(h) = w.get("sha256") {
            hashed += 1;
            if h.as_str().unwrap() != sha {
                differing.push(name.clone());
            }
        }
    }
    assert_eq!(hashed, 420);
    assert!(
        differing.is_empty(),
        "tensors differing from llm-compressor: {differing:?}"
    );
    // quantization_config: llm-compressor's, key for key.
    let want_q = want["quantization_config"].clone();
    assert_eq!(config(&out)["quantization_config"], want_q);
    // The manifest knows every file it wrote.
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("minitron-manifest.json")).unwrap())
            .unwrap();
    for f in m["files"].as_array().unwrap() {
        assert_eq!(
            sha256(&out.join(f["file"].as_str().unwrap())),
            f["sha256"].as_str().unwrap()
        );
    }
    assert_eq!(
        m["tensor_error"]["per_tensor"].as_object().unwrap().len(),
        210
    );
}

#[test]
fn three_flavours_in_one_pass_have_their_layouts_and_run() {
    let t = tempdir();
    let out = t.path().join("arts");
    let text = root().join("src/model/default_corpus.txt");
    run_ok(
        "minitron-convert",
        &[
            s(&tiny()),
            "--to",
            "fp8,fp8-static,fp8-modelopt",
            "--out",
            s(&out),
            "--calib-seq",
            "64",
        ],
    );
    let dynamic = tensors(&out.join("fp8"));
    let stat = tensors(&out.join("fp8-static"));
    let mo = tensors(&out.join("fp8-modelopt"));
    let q = "model.layers.1.self_attn.q_proj";
    assert_eq!(dynamic[&format!("{q}.weight")].0, "F8_E4M3");
    assert_eq!(dynamic[&format!("{q}.weight_scale")].1, vec![128, 1]);
    assert!(!dynamic.contains_key(&format!("{q}.input_scale")));
    assert_eq!(stat[&format!("{q}.input_scale")].1, vec![1]);
    assert_eq!(stat["model.layers.1.self_attn.k_scale"].0, "BF16");
    assert_eq!(
        mo[&format!("{q}.weight_scale")],
        (
            "F32".to_owned(),
            vec![128],
            mo[&format!("{q}.weight_scale")].2.clone()
        )
    );
    // Same weights bytes for the two compressed-tensors flavours (one quantization, shared).
    assert_eq!(
        dynamic[&format!("{q}.weight")],
        stat[&format!("{q}.weight")]
    );
    // q, k and v read one input, so their static input scales are equal (the fused maximum).
    assert_eq!(
        stat[&format!("{q}.input_scale")].2,
        stat["model.layers.1.self_attn.v_proj.input_scale"].2
    );
    assert_eq!(
        config(&out.join("fp8-static"))["quantization_config"]["kv_cache_scheme"]["type"],
        "float"
    );
    let hq: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out.join("fp8-modelopt/hf_quant_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        hq["quantization"]["quant_algo"],
        "FP8_PER_CHANNEL_PER_TOKEN"
    );
    assert_eq!(
        config(&out.join("fp8-modelopt"))["quantization_config"]["quant_method"],
        "modelopt"
    );
    assert!(
        out.join("fp8/tokenizer.json").exists() && out.join("fp8/generation_config.json").exists()
    );
    // Every flavour runs in the verifier against the bf16 model; FP8 moves the logits only a little.
    let reference = tiny();
    for flavour in ["fp8", "fp8-static", "fp8-modelopt"] {
        for extra in [None, Some("--weight-only")] {
            let dir = out.join(flavour);
            let mut args = vec![
                s(&dir),
                "--reference",
                s(&reference),
                "--ppl",
                s(&text),
                "--ctx",
                "64",
                "--kld",
                "--json",
            ];
            args.extend(extra);
            let r: serde_json::Value =
                serde_json::from_str(&run_ok("minitron-verify", &args)).unwrap();
            let d = &r["kld"]["divergence"];
            let kld = d["mean_kld"].as_f64().unwrap();
            assert!(
                kld > 0.0 && kld < 0.05,
                "{flavour} {extra:?}: mean KLD {kld}"
            );
        }
    }
}

#[test]
fn artifacts_do_not_depend_on_threads() {
    let t = tempdir();
    let mut sums = Vec::new();
    for threads in ["1", "2"] {
        let out = t.path().join(format!("o{threads}"));
        run_ok(
            "minitron-convert",
            &[
                s(&tiny()),
                "--to",
                "fp8,fp8-static",
                "--out",
                s(&out),
                "--calib-seq",
                "64",
                "--threads",
                threads,
            ],
        );
        let mut files = BTreeMap::new();
        for sub in ["fp8", "fp8-static"] {
            for e in std::fs::read_dir(out.join(sub)).unwrap() {
                let p = e.unwrap().path();
                // The manifest records the command line and wall time; everything else must match.
                if p.file_name().unwrap() != "minitron-manifest.json" {
                    files.insert(
                        format!("{sub}/{}", p.file_name().unwrap().to_string_lossy()),
                        sha256(&p),
                    );
                }
            }
        }
        sums.push(files);
    }
    assert_eq!(sums[0], sums[1]);
}

#[test]
fn failed_conversion_leaves_nothing() {
    let t = tempdir();
    let broken = t.path().join("broken");
    copy_dir(&tiny(), &broken);
    std::fs::write(broken.join("tokenizer.json"), "not json").unwrap();
    let out = t.path().join("out");
    // fp8-static calibrates, which needs the tokenizer: the error comes mid-way.
    let e = run_err(
        "minitron-convert",
        &[s(&broken), "--to", "fp8,fp8-static", "--out", s(&out)],
    );
    assert!(e.contains("tokenizer.json"), "{e}");
    let left: Vec<_> = std::fs::read_dir(t.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        left,
        vec![std::ffi::OsString::from("broken")],
        "left behind: {left:?}"
    );
    let e = run_err(
        "minitron-convert",
        &[s(&tiny()), "--to", "fp9", "--out", s(&out)],
    );
    assert!(e.contains("unknown target `fp9`"), "{e}");
}

#[test]
fn search_and_gptq_keep_the_layout_are_deterministic_and_lower_the_error() {
    let t = tempdir();
    // Calibrated on one half of the bundled corpus, evaluated on the other.
    let (calib, text) = split_corpus(t.path());
    let reference = tiny();
    let mut kld = BTreeMap::new();
    for mode in ["rtn", "search", "gptq"] {
        let mut hashes = Vec::new();
        for threads in ["1", "2"] {
            let out = t.path().join(format!("{mode}-{threads}"));
            let model = tiny();
            let mut args = vec![
                s(&model),
                "--to",
                "fp8",
                "--fp8-weights",
                mode,
                "--out",
                s(&out),
                "--threads",
                threads,
            ];
            // rtn does not calibrate, and calibration options are refused where unused.
            if mode != "rtn" {
                args.extend(["--calib", s(&calib), "--calib-seq", "64"]);
            }
            run_ok("minitron-convert", &args);
            hashes.push(sha256(&out.join("model.safetensors")));
        }
        assert_eq!(
            hashes[0], hashes[1],
            "{mode}: artifacts differ between 1 and 2 threads"
        );
        let out = t.path().join(format!("{mode}-1"));
        let names: Vec<_> = tensors(&out)
            .into_iter()
            .map(|(k, (d, s, _))| (k, d, s))
            .collect();
        let rtn_names: Vec<_> = tensors(&t.path().join("rtn-1"))
            .into_iter()
            .map(|(k, (d, s, _))| (k, d, s))
            .collect();
        assert_eq!(names, rtn_names, "{mode}: layout differs from rtn");
        let r: serde_json::Value = serde_json::from_str(&run_ok(
            "minitron-verify",
            &[
                s(&out),
                "--reference",
                s(&reference),
                "--ppl",
                s(&text),
                "--ctx",
                "64",
                "--kld",
                "--weight-only",
                "--json",
            ],
        ))
        .unwrap();
        kld.insert(mode, r["kld"]["divergence"]["mean_kld"].as_f64().unwrap());
    }
    eprintln!("tiny fixture, weight-only mean KLD: {kld:?}");
    assert!(
        kld["search"] < kld["rtn"] && kld["gptq"] < kld["search"],
        "{kld:?}"
    );
}
