//! INT8: byte parity of W8A16 with llm-compressor, W8A8 layout, SmoothQuant as an exact identity
//! before quantization, pack/unpack round trips, and the runner's integer-exact W8A8 products.

mod common;
use common::*;

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use minitron::model::names::{hf_input_norm, hf_linear, hf_post_norm, InputSite, LinearRole};
use minitron::model::{Checkpoint, Dtype};
use proptest::prelude::*;

#[test]
#[cfg_attr(
    not(minitron_assets),
    ignore = "needs the real assets: ../shared/tools/real-assets.sh"
)]
fn smollm2_w8a16_equals_llm_compressor_and_w8a8_has_its_layout() {
    let a = assets();
    let ka = known_answers();
    let t = tempdir();
    let out = t.path().join("arts");
    run_ok(
        "minitron-convert",
        &[
            s(&a.join("smollm2-135m")),
            "--to",
            "int8,int8-w8a16",
            "--out",
            s(&out),
            "--calib-samples",
            "2",
        ],
    );
    for (key, dir) in [
        ("llm_compressor_w8a16", "int8-w8a16"),
        ("llm_compressor_w8a8", "int8"),
    ] {
        let want = &ka[key];
        let got = tensors(&out.join(dir));
        let wt = want["tensors"].as_object().unwrap();
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            wt.keys().collect::<Vec<_>>(),
            "{dir}: names"
        );
        let mut differing = Vec::new();
        for (n, w) in wt {
            assert_eq!(got[n].0, w["dtype"].as_str().unwrap(), "{n}");
            assert_eq!(serde_json::json!(got[n].1), w["shape"], "{n}");
            if let Some(h) = w.get("sha256") {
                if h.as_str().unwrap() != got[n].2 {
                    differing.push(n.clone());
                }
            }
        }
        assert!(
            differing.is_empty(),
            "{dir}: tensors differing from llm-compressor: {differing:?}"
        );
        assert_eq!(
            config(&out.join(dir))["quantization_config"],
            want["quantization_config"].clone(),
            "{dir}"
        );
    }
}

#[test]
fn smoothing_alone_is_an_identity() {
    // Smooth every block of the tiny fixture with factors from real calibration statistics, keep
    // everything in f32, and compare logits with the original model.
    let ck = Checkpoint::open(&tiny()).unwrap();
    let tok = minitron::model::Tokenizer::load(&tiny()).unwrap();
    let src = minitron::calib::load_source(None).unwrap();
    let chunks = minitron::calib::calibration_chunks(
        &tok,
        &src,
        &minitron::calib::CalibSpec {
            samples: 4,
            seq_len: 64,
            shuffle: None,
        },
    )
    .unwrap();
    let model = minitron::runtime::Llama::load(&ck, DType::F32, &Device::Cpu).unwrap();
    let info = minitron::calib::CalibInfo {
        source: "t".into(),
        sha256: String::new(),
        samples: 0,
        seq_len: 64,
        tokens: 0,
        shuffle_seed: None,
        wall_s: 0.0,
        fingerprint: Vec::new(),
    };
    let stats =
        minitron::calib::CalibStats::collect(&ck, DType::F32, &Device::Cpu, &chunks, info, &|_| ())
            .unwrap();
    let mut tensors = BTreeMap::new();
    let f32b = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    for spec in ck.specs() {
        tensors.insert(
            spec.name.clone(),
            (ck.read_f32(&spec.name).unwrap(), spec.shape.clone()),
        );
    }
    let plan = minitron::quant::smoothquant::SmoothPlan {
        method: minitron::quant::smoothquant::Method::SmoothQuant,
        alpha: Some(0.8),
        extended: true,
    };
    for l in 0..ck.config.num_hidden_layers {
        let sm = minitron::quant::smoothquant::LayerSmoothing::compute(
            &ck,
            &stats.activations(l),
            l,
            plan,
        )
        .unwrap();
        for site in InputSite::ALL {
            let f = sm.factors[site.index()].as_ref().unwrap();
            assert!(
                f.iter().any(|&f| (f - 1.0).abs() > 0.1),
                "{}: factors should be far from 1 to make this a real test",
                site.name()
            );
        }
        for (site, norm) in [
            (InputSite::AttnIn, hf_input_norm(l)),
            (InputSite::MlpIn, hf_post_norm(l)),
        ] {
            let g = sm.apply_exact_norm(site, &tensors[&norm].0);
            tensors.get_mut(&norm).unwrap().0 = g;
        }
        for r in LinearRole::ALL {
            let name = hf_linear(l, r);
            let cols = r.shape(&ck.config)[1];
            let w = sm.apply_exact(r, &tensors[&name].0, cols);
            tensors.get_mut(&name).unwrap().0 = w;
        }
    }
    let t = tempdir();
    let dir = t.path().join("smoothed");
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["config.json", "tokenizer.json"] {
        std::fs::copy(tiny().join(f), dir.join(f)).unwrap();
    }
    let owned = tensors
        .into_iter()
        .map(|(n, (v, shape))| {
            (
                n,
                minitron::format::safetensors::OwnedTensor {
                    dtype: Dtype::F32,
                    shape,
                    data: f32b(&v),
                },
            )
        })
        .collect();
    minitron::format::safetensors::write_file(
        &dir.join("model.safetensors"),
        &owned,
        &BTreeMap::new(),
    )
    .unwrap();
    let smoothed =
        minitron::runtime::Llama::load(&Checkpoint::open(&dir).unwrap(), DType::F32, &Device::Cpu)
            .unwrap();
    let ids = &chunks[0];
    let a = model.logits(ids).unwrap();
    let b = smoothed.logits(ids).unwrap();
    let scale = a.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
    let worst = a
        .iter()
        .flatten()
        .zip(b.iter().flatten())
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    eprintln!(
        "smoothing identity: max |Δlogit| / max |logit| = {:e}",
        worst / scale
    );
    // The bound: f32 reassociation only (s and 1/s cancel up to rounding).
    assert!(
        worst / scale < 1e-4,
        "relative logit difference {}",
        worst / scale
    );
}

#[test]
fn int8_layer_products_are_integer_exact() {
    let (out, inp) = (3, 5);
    let q: Vec<i8> = vec![127, -128, 5, 0, -7, 1, 2, 3, 4, 5, -1, -2, -3, -4, 100];
    let scales = vec![0.5f32, 0.25, 2.0];
    let lin = minitron::runtime::Linear::int8(
        &q,
        scales.clone(),
        out,
        inp,
        true,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let x = vec![1.0f32, -2.0, 0.5, 3.0, -0.25, 0.0, 0.0, 0.0, 0.0, 0.0];
    let y = lin
        .forward(&Tensor::from_vec(x.clone(), (2, inp), &Device::Cpu).unwrap())
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    for (r, xr) in x.chunks(inp).enumerate() {
        let amax = xr.iter().fold(0f32, |m, &v| m.max(v.abs()));
        let s = if amax > 0.0 { amax / 127.0 } else { 1.0 };
        let xq: Vec<i64> = xr
            .iter()
            .map(|&v| (v / s).round_ties_even().clamp(-127.0, 127.0) as i64)
            .collect();
        for o in 0..out {
            let acc: i64 = (0..inp).map(|j| xq[j] * q[o * inp + j] as i64).sum();
            let want = (acc as f64 * s as f64 * scales[o] as f64) as f32;
            assert_eq!(y[r][o], want, "row {r} col {o}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
    #[test]
    fn pack_unpack_round_trips(rows in 1usize..6, cols in 1usize..40, seed in any::<u64>()) {
        let mut rng = minitron::numerics::rng::SplitMix64::new(seed);
        let q: Vec<i8> = (0..rows * cols).map(|_| rng.next_u64() as i8).collect();
        let p = minitron::quant::int8::pack(&q, cols);
        prop_assert_eq!(p.len(), rows * cols.div_ceil(4) * 4);
        prop_assert_eq!(minitron::quant::int8::unpack(&p, rows, cols), q);
    }
}
