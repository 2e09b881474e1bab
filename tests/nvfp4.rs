//! NVFP4 (`nvfp4`, `nvfp4-a16`, `nvfp4-modelopt`): E2M1 rounding checked on every bf16 value
//! against the nearest-value definition; packing; every code and scale of the tiny model equal
//! to a plain reimplementation of each producer's rule; SmolLM2 equal to llm-compressor's own
//! output byte for byte (fixtures/llm-compressor-smollm2.json, made by
//! scripts/llm-compressor-answers.py); the runner's W4A4 arithmetic against an f64 sum.

mod common;
use common::*;

use half::bf16;
use minitron::model::names::{hf_linear, LinearRole};
use minitron::model::Checkpoint;
use minitron::quant::nvfp4::{self, Flavor};
use proptest::prelude::*;

const GRID: [f64; 8] = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0];

/// The E2M1 magnitude index nearest to `a` (saturating at 6), ties to the even index: from
/// the definition (distances in f64), not from thresholds.
fn nearest_e2m1(a: f64) -> u8 {
    let a = a.min(6.0);
    let mut best = (0usize, f64::INFINITY);
    for (i, g) in GRID.iter().enumerate() {
        let d = (a - g).abs();
        if d < best.1 || (d == best.1 && i % 2 == 0) {
            best = (i, d);
        }
    }
    best.0 as u8
}

/// The E4M3 code nearest to `x` ≥ 0 (ties to the even code, saturating at 448), by search over
/// every finite code.
fn nearest_e4m3(x: f32) -> u8 {
    let value = |c: u8| {
        let e = (c >> 3) as i32;
        let m = (c & 7) as f64;
        if e == 0 {
            m * 2f64.powi(-9)
        } else {
            (1.0 + m / 8.0) * 2f64.powi(e - 7)
        }
    };
    let x = (x as f64).min(448.0);
    let mut best = (0u8, f64::INFINITY);
    for c in 0..=0x7Eu8 {
        let d = (x - value(c)).abs();
        if d < best.1 || (d == best.1 && c % 2 == 0) {
            best = (c, d);
        }
    }
    best.0
}

fn e4m3_value(c: u8) -> f32 {
    minitron::numerics::fp8::e4m3_to_f32(c)
}

fn rb(x: f32) -> f32 {
    bf16::from_f32(x).to_f32()
}

#[test]
fn e2m1_rounding_of_every_bf16_value() {
    let mut checked = 0;
    for bits in 0..=u16::MAX {
        let x = bf16::from_bits(bits);
        if !x.is_finite() {
            continue;
        }
        let v = x.to_f32();
        let m = nearest_e2m1(v.abs() as f64);
        assert_eq!(nvfp4::magnitude_code(v.abs()), m, "{v}");
        assert_eq!(
            nvfp4::code(v, Flavor::CompressedTensors),
            ((v.is_sign_negative() as u8) << 3) | m,
            "{v}"
        );
        assert_eq!(
            nvfp4::code(v, Flavor::ModelOpt),
            (((v < 0.0) as u8) << 3) | m,
            "{v}"
        );
        assert_eq!(nvfp4::e2m1_value(m), GRID[m as usize] as f32);
        checked += 1;
    }
    assert_eq!(checked, 65536 - 256);
    // f32 values one step either side of every midpoint and grid value.
    for g in GRID
        .windows(2)
        .flat_map(|w| [(w[0] + w[1]) / 2.0, w[0], w[1]])
    {
        let g = g as f32;
        for v in [
            g,
            f32::from_bits(g.to_bits() + 1),
            f32::from_bits(g.to_bits().max(1) - 1),
        ] {
            assert_eq!(nvfp4::magnitude_code(v), nearest_e2m1(v as f64), "{v}");
        }
    }
}

proptest! {
    #[test]
    fn packing_round_trips(codes in proptest::collection::vec(0u8..16, 0..200)) {
        let packed = nvfp4::pack_codes(&codes);
        prop_assert_eq!(packed.len(), codes.len().div_ceil(2));
        for (k, &b) in packed.iter().enumerate() {
            prop_assert_eq!(b & 0xF, codes[2 * k]);
            prop_assert_eq!(b >> 4, codes.get(2 * k + 1).copied().unwrap_or(0));
        }
        let back = nvfp4::unpack_codes(&packed);
        prop_assert_eq!(&back[..codes.len()], &codes[..]);
    }

    #[test]
    fn decoding_is_code_times_scale(
        codes in proptest::collection::vec(0u8..16, 32),
        scales in proptest::collection::vec(0u8..0x7F, 2),
    ) {
        let v = nvfp4::decode_unscaled(&nvfp4::pack_codes(&codes), &scales, 32);
        for (i, (&x, &c)) in v.iter().zip(&codes).enumerate() {
            let want = nvfp4::e2m1_value(c) * e4m3_value(scales[i / 16]);
            prop_assert_eq!(x.to_bits(), want.to_bits());
            // Exact in bf16, so the runner's bf16 panels hold it unrounded.
            prop_assert_eq!(rb(x).to_bits(), x.to_bits());
        }
    }
}

fn bf16_values(ck: &Checkpoint, name: &str) -> Vec<f32> {
    let (b, _) = ck.raw(name).unwrap();
    b.chunks(2)
        .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32())
        .collect()
}

/// Each producer's rule written out plainly for one layer: (packed codes, scale codes, tensor
/// scale), given the absmax of its fused group.
fn reference(w: &[f32], cols: usize, group_amax: f32, flavor: Flavor) -> (Vec<u8>, Vec<u8>, f32) {
    let tensor = match flavor {
        Flavor::CompressedTensors => rb(2688.0 * rb(1.0 / group_amax)),
        Flavor::ModelOpt => group_amax / 2688.0,
    };
    let mut codes = Vec::new();
    let mut scales = Vec::new();
    for row in w.chunks(cols) {
        for g in row.chunks(16) {
            let amax = g.iter().fold(0f32, |m, v| m.max(v.abs()));
            let (sc, step) = match flavor {
                Flavor::CompressedTensors => {
                    let mut c = nearest_e4m3(tensor * rb(amax / 6.0));
                    if c == 0 {
                        c = nearest_e4m3(0.125);
                    }
                    (c, e4m3_value(c) / tensor)
                }
                Flavor::ModelOpt => {
                    let s = amax / (6.0 * tensor);
                    let c = nearest_e4m3(if s == 0.0 { 1.0 } else { s });
                    (c, e4m3_value(c) * tensor)
                }
            };
            scales.push(sc);
            for &v in g {
                let x = v / step;
                let neg = match flavor {
                    Flavor::CompressedTensors => x.is_sign_negative(),
                    Flavor::ModelOpt => x < 0.0,
                };
                codes.push(((neg as u8) << 3) | nearest_e2m1(x.abs() as f64));
            }
        }
    }
    let packed = codes.chunks(2).map(|p| p[0] | p[1] << 4).collect();
    (packed, scales, tensor)
}

fn f32_value(ck: &Checkpoint, name: &str) -> f32 {
    let v = ck.read_f32(name).unwrap();
    assert_eq!(v.len(), 1, "{name}");
    v[0]
}

#[test]
fn tiny_model_equals_a_plain_reimplementation_of_both_producers() {
    let t = tempdir();
    let out = t.path().join("arts");
    run_ok(
        "minitron-convert",
        &[
            s(&tiny()),
            "--to",
            "nvfp4,nvfp4-a16,nvfp4-modelopt",
            "--calib-samples",
            "4",
            "--calib-seq",
            "64",
            "--out",
            s(&out),
        ],
    );
    let src = Checkpoint::open(&tiny()).unwrap();
    let c = &src.config;
    for (dir, flavor) in [
        ("nvfp4", Flavor::CompressedTensors),
        ("nvfp4-a16", Flavor::CompressedTensors),
        ("nvfp4-modelopt", Flavor::ModelOpt),
    ] {
        let ck = Checkpoint::open(&out.join(dir)).unwrap();
        let ts = tensors(&out.join(dir));
        for l in 0..c.num_hidden_layers {
            for role in LinearRole::ALL {
                let name = hf_linear(l, role);
                let stem = name.strip_suffix(".weight").unwrap();
                let [rows, cols] = role.shape(c);
                let group_amax = LinearRole::ALL
                    .into_iter()
                    .filter(|r| r.site() == role.site())
                    .flat_map(|r| bf16_values(&src, &hf_linear(l, r)))
                    .fold(0f32, |m, v| m.max(v.abs()));
                let (packed, scales, tensor) =
                    reference(&bf16_values(&src, &name), cols, group_amax, flavor);
                let (codes_name, tensor_name, input_name) = match flavor {
                    Flavor::CompressedTensors => (
                        format!("{stem}.weight_packed"),
                        format!("{stem}.weight_global_scale"),
                        format!("{stem}.input_global_scale"),
                    ),
                    Flavor::ModelOpt => (
                        name.clone(),
                        format!("{stem}.weight_scale_2"),
                        format!("{stem}.input_scale"),
                    ),
                };
                let scalar_shape = if flavor == Flavor::ModelOpt {
                    vec![]
                } else {
                    vec![1]
                };
                assert_eq!(ts[&codes_name].0, "U8");
                assert_eq!(ts[&codes_name].1, vec![rows, cols / 2]);
                assert_eq!(
                    ck.raw(&codes_name).unwrap().0,
                    &packed[..],
                    "{dir} {codes_name}"
                );
                let scale_name = format!("{stem}.weight_scale");
                assert_eq!(ts[&scale_name].0, "F8_E4M3");
                assert_eq!(ts[&scale_name].1, vec![rows, cols / 16]);
                assert_eq!(
                    ck.raw(&scale_name).unwrap().0,
                    &scales[..],
                    "{dir} {scale_name}"
                );
                assert_eq!(ts[&tensor_name].1, scalar_shape);
                assert_eq!(
                    f32_value(&ck, &tensor_name).to_bits(),
                    tensor.to_bits(),
                    "{dir} {tensor_name}"
                );
                if dir == "nvfp4-a16" {
                    assert!(!ts.contains_key(&input_name));
                } else {
                    assert_eq!(ts[&input_name].0, "F32");
                    assert_eq!(ts[&input_name].1, scalar_shape);
                    let v = f32_value(&ck, &input_name);
                    assert!(v.is_finite() && v > 0.0, "{input_name}: {v}");
                    // One input, one scale: the fused group's layers agree.
                    let first = LinearRole::ALL
                        .into_iter()
                        .find(|r| r.site() == role.site())
                        .unwrap();
                    let first_name = input_name.replace(role.hf_suffix(), first.hf_suffix());
                    assert_eq!(v.to_bits(), f32_value(&ck, &first_name).to_bits());
                }
            }
        }
        let q = config(&out.join(dir))["quantization_config"].clone();
        match flavor {
            Flavor::CompressedTensors => {
                assert_eq!(q["format"], "nvfp4-pack-quantized");
                let w = &q["config_groups"]["group_0"]["weights"];
                assert_eq!(w["strategy"], "tensor_group");
                assert_eq!(w["group_size"], 16);
                assert_eq!(w["type"], "float");
                let a = &q["config_groups"]["group_0"]["input_activations"];
                assert_eq!(a.is_null(), dir == "nvfp4-a16");
            }
            Flavor::ModelOpt => {
                assert_eq!(q["quant_method"], "modelopt");
                assert_eq!(q["quant_algo"], "NVFP4");
                let hq: serde_json::Value = serde_json::from_str(
                    &std::fs::read_to_string(out.join(dir).join("hf_quant_config.json")).unwrap(),
                )
                .unwrap();
                assert_eq!(hq["quantization"]["quant_algo"], "NVFP4");
                assert_eq!(hq["quantization"]["group_size"], 16);
            }
        }
    }
    // Every artifact runs, and quantizing the activations too costs more than the weights alone.
    let kld = |dir: &str, extra: &[&str]| -> f64 {
        let report = t.path().join(format!("{dir}.json"));
        let (art, reference) = (out.join(dir), tiny());
        let mut args = vec![
            s(&art),
            "--reference",
            s(&reference),
            "--kld",
            "--ppl",
            "fixtures/prompts.txt",
            "--ctx",
            "16",
            "--report",
            s(&report),
        ];
        args.extend_from_slice(extra);
        run_ok("minitron-verify", &args);
        let r: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
        r["kld"]["divergence"]["mean_kld"].as_f64().unwrap()
    };
    let a16 = kld("nvfp4-a16", &[]);
    let w4a4 = kld("nvfp4", &[]);
    let w4a4_weights = kld("nvfp4", &["--weight-only"]);
    let modelopt = kld("nvfp4-modelopt", &[]);
    for v in [a16, w4a4, w4a4_weights, modelopt] {
        assert!(
            v.is_finite() && v > 0.0,
            "{a16} {w4a4} {w4a4_weights} {modelopt}"
        );
    }
    assert_eq!(a16, w4a4_weights, "same weights, activations untouched");
    assert!(w4a4 > a16, "{w4a4} vs {a16}");
}

/// Checks our tensors against a producer's record (`{name: {dtype, shape, sha256?}}`): every
/// recorded name present with its dtype and shape; returns how many hashes were compared and
/// the names whose bytes differ.
fn against_record(
    ours: &std::collections::BTreeMap<String, (String, Vec<usize>, String)>,
    theirs: &serde_json::Map<String, serde_json::Value>,
) -> (usize, Vec<String>) {
    let mut hashed = 0;
    let mut differing = Vec::new();
    for (name, v) in theirs {
        let (dtype, shape, sha) = &ours[name];
        assert_eq!(dtype, v["dtype"].as_str().unwrap(), "{name}");
        let shape_want: Vec<usize> = v["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(shape, &shape_want, "{name}");
        if let Some(h) = v["sha256"].as_str() {
            hashed += 1;
            if sha != h {
                differing.push(name.clone());
            }
        }
    }
    (hashed, differing)
}

/// SmolLM2 converted to `targets` with `extra` options, calibrated on the first 8 × 512 tokens
/// of the dev text as the producers were, and the producer's recorded output.
fn smollm2_against(
    fixture: &str,
    targets: &str,
    extra: &[&str],
) -> (tempfile::TempDir, std::path::PathBuf, serde_json::Value) {
    let want: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("fixtures").join(fixture)).unwrap(),
    )
    .unwrap();
    let (t, model, text) = (
        tempdir(),
        assets().join("smollm2-135m"),
        shared().join("data/wikitext2-valid.txt"),
    );
    let out = t.path().join("arts");
    let mut args = vec![
        s(&model),
        "--to",
        targets,
        "--calib",
        s(&text),
        "--calib-samples",
        "8",
        "--out",
        s(&out),
    ];
    args.extend_from_slice(extra);
    run_ok("minitron-convert", &args);
    (t, out, want)
}

#[test]
#[cfg_attr(
    not(minitron_assets),
    ignore = "needs the real assets: ../shared/tools/real-assets.sh"
)]
fn smollm2_equals_llm_compressor_byte_for_byte() {
    let (_t, out, want) = smollm2_against(
        "llm-compressor-smollm2.json",
        "nvfp4-a16,nvfp4,w4a16",
        &["--group-size", "64"],
    );
    for (scheme, dir) in [
        ("NVFP4A16", "nvfp4-a16"),
        ("NVFP4", "nvfp4"),
        ("W4A16_G64", "w4a16"),
    ] {
        let ours = tensors(&out.join(dir));
        let theirs = want[scheme]["tensors"].as_object().unwrap();
        assert_eq!(theirs.len(), 210 * 3);
        let (hashed, differing) = against_record(&ours, theirs);
        assert_eq!(hashed, 210 * 3);
        assert!(
            differing.is_empty(),
            "{scheme}: differing from llm-compressor: {differing:?}"
        );
        assert_eq!(
            config(&out.join(dir))["quantization_config"],
            want[scheme]["quantization_config"],
            "{scheme}"
        );
    }
}

#[test]
#[cfg_attr(
    not(minitron_assets),
    ignore = "needs the real assets: ../shared/tools/real-assets.sh"
)]
fn smollm2_modelopt_equals_modelopt_byte_for_byte() {
    let (_t, out, want) = smollm2_against("modelopt-smollm2.json", "nvfp4-modelopt", &[]);
    let ours = tensors(&out);
    let theirs = want["tensors"].as_object().unwrap();
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        theirs.keys().collect::<Vec<_>>()
    );
    let (hashed, differing) = against_record(&ours, theirs);
    assert!(
        differing.is_empty(),
        "differing from ModelOpt: {differing:?}"
    );
    // Every weight-side tensor: 210 layers × 3 plus the 62 bf16 tensors copied through.
    assert_eq!(hashed, 210 * 3 + 62);
    let mut q = config(&out)["quantization_config"].clone();
    q.as_object_mut().unwrap().remove("producer");
    assert_eq!(q, want["quantization_config"]);
    let mut hq: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("hf_quant_config.json")).unwrap())
            .unwrap();
    hq.as_object_mut().unwrap().remove("producer");
    assert_eq!(hq, want["hf_quant_config"]);
}
