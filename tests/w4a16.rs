//! W4A16 (compressed-tensors `pack-quantized`, INT4 symmetric per group): every packed code and
//! scale equal to a separate, deliberately plain reimplementation of compressed-tensors'
//! documented rule; the layout and `quantization_config` of the scheme; GPTQ's error feedback
//! lowering the divergence; the runner reading it back.
//!
//! No llm-compressor W4A16 output is available here (shared/data holds its FP8, W8A8 and W8A16
//! outputs, which tests/fp8.rs and tests/int8.rs match byte for byte). The 4-bit path shares its
//! scale and rounding code with the 8-bit path those tests pin down; this file pins the 4-bit
//! range and packing against the reimplementation below.

mod common;
use common::*;

use half::bf16;
use minitron::model::names::{hf_linear, LinearRole};
use minitron::model::Checkpoint;
use proptest::prelude::*;

/// compressed-tensors' symmetric INT4 rule written out on bf16 values, as a bf16 torch model
/// computes it: per group, `scale = bf16(absmax / 7.5)` (ε = 2⁻⁷ for an all-zero group),
/// `q = clamp(round_half_even(bf16(w / scale)), −8, 7)`. Packing, byte by byte: code `i` of a
/// row, offset by 8, is the low nibble of byte `i / 2` when `i` is even, the high nibble when
/// odd (eight codes per little-endian int32), rows padded to whole words.
fn reference(w: &[bf16], cols: usize, group: usize) -> (Vec<u8>, Vec<u8>) {
    let words = cols.div_ceil(8);
    let mut packed = Vec::new();
    let mut scales = Vec::new();
    for row in w.chunks(cols) {
        let mut bytes = vec![0u8; words * 4];
        for (gi, g) in row.chunks(group).enumerate() {
            let amax = g.iter().map(|v| v.to_f64().abs()).fold(0.0, f64::max);
            let mut s = bf16::from_f64(amax / 7.5);
            if s.to_f64() == 0.0 {
                s = bf16::from_f64(2f64.powi(-7));
            }
            scales.extend(s.to_le_bytes());
            for (k, v) in g.iter().enumerate() {
                let x = bf16::from_f32(v.to_f32() / s.to_f32()).to_f64();
                let r = x.round();
                let q = if (x - x.trunc()).abs() == 0.5 {
                    2.0 * (x / 2.0).round()
                } else {
                    r
                };
                let code = (q.clamp(-8.0, 7.0) as i32 + 8) as u8;
                let i = gi * group + k;
                bytes[i / 2] |= if i.is_multiple_of(2) { code } else { code << 4 };
            }
        }
        packed.extend(bytes);
    }
    (packed, scales)
}

fn bf16_rows(ck: &Checkpoint, name: &str) -> Vec<bf16> {
    let (b, _) = ck.raw(name).unwrap();
    b.chunks(2)
        .map(|c| bf16::from_le_bytes([c[0], c[1]]))
        .collect()
}

#[test]
fn w4a16_equals_a_plain_reimplementation_and_has_the_scheme_layout() {
    let t = tempdir();
    let src = Checkpoint::open(&tiny()).unwrap();
    for (group, extra) in [(128usize, &[][..]), (64, &["--group-size", "64"][..])] {
        let out = t.path().join(format!("w4-{group}"));
        let model = tiny();
        let mut args = vec![s(&model), "--to", "w4a16", "--out", s(&out)];
        args.extend_from_slice(extra);
        run_ok("minitron-convert", &args);
        let ck = Checkpoint::open(&out).unwrap();
        let ts = tensors(&out);
        for l in 0..src.config.num_hidden_layers {
            for role in LinearRole::ALL {
                let name = hf_linear(l, role);
                let stem = name.strip_suffix(".weight").unwrap();
                let [rows, cols] = role.shape(&src.config);
                let (want_packed, want_scales) = reference(&bf16_rows(&src, &name), cols, group);
                let packed = format!("{stem}.weight_packed");
                let scale = format!("{stem}.weight_scale");
                let shape = format!("{stem}.weight_shape");
                assert_eq!(ts[&packed].0, "I32");
                assert_eq!(ts[&packed].1, vec![rows, cols.div_ceil(8)], "{packed}");
                assert_eq!(ts[&scale].0, "BF16");
                assert_eq!(ts[&scale].1, vec![rows, cols / group], "{scale}");
                assert_eq!(ts[&shape].0, "I64");
                assert_eq!(ck.raw(&packed).unwrap().0, &want_packed[..], "{packed}");
                assert_eq!(ck.raw(&scale).unwrap().0, &want_scales[..], "{scale}");
                let dims: Vec<u8> = [rows as i64, cols as i64]
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect();
                assert_eq!(ck.raw(&shape).unwrap().0, &dims[..]);
                assert!(!ts.contains_key(&name), "{name} stays only packed");
            }
        }
        // Everything else is carried over unchanged.
        for n in [
            "model.embed_tokens.weight",
            "model.norm.weight",
            "lm_head.weight",
        ] {
            assert_eq!(ck.raw(n).unwrap().0, src.raw(n).unwrap().0, "{n}");
        }
        let q = &config(&out)["quantization_config"];
        let w = &q["config_groups"]["group_0"]["weights"];
        assert_eq!(q["format"], "pack-quantized");
        assert_eq!(q["quant_method"], "compressed-tensors");
        assert_eq!(q["ignore"], serde_json::json!(["lm_head"]));
        assert_eq!(
            q["config_groups"]["group_0"]["input_activations"],
            serde_json::Value::Null
        );
        assert_eq!(w["num_bits"], 4);
        assert_eq!(w["type"], "int");
        assert_eq!(w["symmetric"], true);
        assert_eq!(w["strategy"], "group");
        assert_eq!(w["group_size"], group);
        assert_eq!(w["dynamic"], false);
        assert_eq!(w["actorder"], serde_json::Value::Null);
    }
}

/// GPTQ with the calibration's second moments lowers the KL-divergence from the bf16 model
/// well below round-to-nearest's: at most 0.7 ×, calibrated on one half of the bundled corpus
/// and evaluated on the other.
#[test]
fn gptq_lowers_the_w4a16_divergence_and_the_runner_reads_both() {
    let t = tempdir();
    let (calib, text) = split_corpus(t.path());
    let kld = |extra: &[&str]| {
        let out = t.path().join(format!("w4-{}", extra.len()));
        let model = tiny();
        let mut args = vec![s(&model), "--to", "w4a16", "--out", s(&out)];
        args.extend_from_slice(extra);
        run_ok("minitron-convert", &args);
        let r: serde_json::Value = serde_json::from_str(&run_ok(
            "minitron-verify",
            &[
                s(&out),
                "--reference",
                s(&tiny()),
                "--ppl",
                s(&text),
                "--ctx",
                "128",
                "--kld",
                "--json",
            ],
        ))
        .unwrap();
        assert!(r["ppl"]["perplexity"]["ppl"].as_f64().unwrap().is_finite());
        // GPTQ's group scales come from an error search, and the config says so.
        let observer = config(&out)["quantization_config"]["config_groups"]["group_0"]["weights"]
            ["observer"]
            .clone();
        let gptq = extra.contains(&"gptq");
        assert_eq!(observer, if gptq { "mse" } else { "memoryless_minmax" });
        r["kld"]["divergence"]["mean_kld"].as_f64().unwrap()
    };
    let rtn = kld(&[]);
    let gptq = kld(&[
        "--int4-weights",
        "gptq",
        "--calib",
        s(&calib),
        "--calib-seq",
        "64",
    ]);
    eprintln!(
        "w4a16 mean KLD: rtn {rtn:.6}, gptq {gptq:.6} ({:.2} ×)",
        gptq / rtn
    );
    assert!(rtn > 0.0 && gptq <= 0.7 * rtn, "rtn {rtn}, gptq {gptq}");
}

proptest! {
    #[test]
    fn four_bit_packing_round_trips(
        rows in 1usize..4,
        cols in 1usize..40,
        seed in any::<u64>(),
    ) {
        let mut x = seed;
        let q: Vec<i8> = (0..rows * cols)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((x >> 60) as i8) - 8
            })
            .collect();
        let p = minitron::quant::int8::pack_bits(&q, cols, 4);
        prop_assert_eq!(p.len(), rows * cols.div_ceil(8) * 4);
        prop_assert_eq!(minitron::quant::int8::unpack_bits(&p, rows, cols, 4), q.clone());
        // Eight bits through the general packer is the 8-bit packer.
        prop_assert_eq!(
            minitron::quant::int8::pack_bits(&q, cols, 8),
            minitron::quant::int8::pack(&q, cols)
        );
    }
}

/// AWQ keeps the W4A16 layout (its scaling lives in the norms, `v_proj` and `up_proj`), records
/// what it chose per block and input, runs, and is refused beside `int8`, whose SmoothQuant
/// would rewrite the same norms differently.
#[test]
fn awq_keeps_the_layout_records_its_choices_and_runs() {
    let t = tempdir();
    let model = tiny();
    let rtn = t.path().join("rtn");
    let awq = t.path().join("awq");
    run_ok(
        "minitron-convert",
        &[s(&model), "--to", "w4a16", "--out", s(&rtn)],
    );
    run_ok(
        "minitron-convert",
        &[
            s(&model),
            "--to",
            "w4a16",
            "--int4-weights",
            "awq",
            "--calib-seq",
            "64",
            "--out",
            s(&awq),
        ],
    );
    let layout = |d: &std::path::Path| -> Vec<(String, String, Vec<usize>)> {
        tensors(d)
            .into_iter()
            .map(|(n, (dt, sh, _))| (n, dt, sh))
            .collect()
    };
    assert_eq!(layout(&rtn), layout(&awq));
    // The same config but for the observer: AWQ's group scales come from an error search.
    let mut q = config(&awq)["quantization_config"].clone();
    let w = &mut q["config_groups"]["group_0"]["weights"];
    assert_eq!(w["observer"], "mse");
    w["observer"] = "memoryless_minmax".into();
    assert_eq!(config(&rtn)["quantization_config"], q);
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(awq.join("minitron-manifest.json")).unwrap())
            .unwrap();
    assert_eq!(m["int4_weights"], "awq");
    assert_eq!(m["smoothquant"]["alpha"], "awq");
    assert_eq!(m["smoothquant"]["per_layer"].as_array().unwrap().len(), 2);
    let text = root().join("src/model/default_corpus.txt");
    let r: serde_json::Value = serde_json::from_str(&run_ok(
        "minitron-verify",
        &[s(&awq), "--ppl", s(&text), "--ctx", "128", "--json"],
    ))
    .unwrap();
    assert!(r["ppl"]["perplexity"]["ppl"].as_f64().unwrap().is_finite());
    let e = run_err(
        "minitron-convert",
        &[
            s(&model),
            "--to",
            "int8,w4a16",
            "--int4-weights",
            "awq",
            "--out",
            s(&t.path().join("both")),
        ],
    );
    assert!(e.contains("convert them in two runs"), "{e}");
}
