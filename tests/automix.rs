//! `--to gguf:auto`: the measured costs equal a direct computation, the budget holds, bad
//! budgets exit 2 with the feasible range, and the written recipe reproduces the file.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;
use minitron::automix::sensitivity::{measure, probe_type, ProbeOptions};
use minitron::format::gguf::GgufFile;
use minitron::model::names::{self, LinearRole};
use minitron::model::{Checkpoint, Dtype};
use minitron::quant::ggml::{dequantize, quantize_with, KSearch};

/// Calibration chunks of the tiny model from the built-in corpus.
fn chunks(ck: &Checkpoint, n: usize, t: usize) -> Vec<Vec<u32>> {
    let tok = minitron::model::Tokenizer::load(&ck.dir).unwrap();
    let src = minitron::calib::dataset::load_source(None).unwrap();
    minitron::calib::dataset::calibration_chunks(
        &tok,
        &src,
        &minitron::calib::CalibSpec {
            samples: n,
            seq_len: t,
            shuffle: None,
        },
    )
    .unwrap()
}

/// A copy of `ck` (bf16) with some tensors replaced by f32 values (stored rounded to bf16).
fn rewrite(ck: &Checkpoint, dir: &Path, replace: &BTreeMap<String, Vec<f32>>) {
    std::fs::create_dir_all(dir).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(ck.dir.join(f), dir.join(f)).unwrap();
    }
    let mut names: Vec<&String> = ck.index.keys().collect();
    names.sort();
    let plan: Vec<minitron::format::safetensors::PlannedTensor> = names
        .iter()
        .map(|n| minitron::format::safetensors::PlannedTensor {
            name: (*n).clone(),
            dtype: Dtype::BF16,
            shape: ck.info(n).unwrap().1.shape.clone(),
        })
        .collect();
    minitron::format::safetensors::write_streamed(
        &dir.join("model.safetensors"),
        &plan,
        &mut |i| {
            let n = names[i];
            let v = match replace.get(n) {
                Some(v) => v.clone(),
                None => ck.read_f32(n).unwrap(),
            };
            Ok(minitron::numerics::convert::f32_to_bf16_bytes(&v))
        },
    )
    .unwrap();
}

/// Mean KL-divergence of `cand` against `ck` on the scored positions of `chunks`.
fn direct_kld(ck: &Checkpoint, cand: &Path, chunks: &[Vec<u32>], first: usize) -> f64 {
    use minitron::runtime::load::safetensors::SafetensorsSource;
    use minitron::verify::ppl::{score_streamed, StatsOn, StreamPlan};
    let c = Checkpoint::open(cand).unwrap();
    let r = score_streamed(
        &SafetensorsSource::borrowed(&c),
        Default::default(),
        Some(&SafetensorsSource::borrowed(ck)),
        &candle_core::Device::Cpu,
        chunks,
        first,
        StreamPlan {
            dtype: candle_core::DType::BF16,
            batch: chunks.len(),
            pass_chunks: chunks.len(),
            on: StatsOn::Host,
        },
        &|_| (),
    )
    .unwrap();
    let k: Vec<f64> = r.iter().flat_map(|c| c.kld.iter().copied()).collect();
    k.iter().sum::<f64>() / k.len() as f64
}

/// Each block's measured cost is the KL-divergence of the model with exactly that block's seven
/// layers at their probe types (quantized with the measured importance matrix, as bf16): the
/// streams run the same arithmetic, so only rounding of the batched sums may differ (relative
/// 1e-3 allows it; the costs are ~1e-3 and the differences ~1e-7). The head's cost is the
/// model with the head at its probe type: the measurement keeps the dequantized head in f32,
/// the checkpoint rounds it to bf16, which moves the cost by far less than 2 %.
#[test]
fn measured_costs_equal_the_models_they_describe() {
    let ck = Checkpoint::open(&tiny()).unwrap();
    let ch = chunks(&ck, 3, 64);
    let first = 32;
    let m = measure(
        &ck,
        &ProbeOptions {
            chunks: &ch,
            probe: 2,
            first,
            sample_rows: 64,
            search: KSearch::Reference,
        },
        &candle_core::Device::Cpu,
        &|_, _| (),
    )
    .unwrap();
    let probe_chunks = &ch[..2];
    let dir = tempdir();
    let c = &ck.config;
    for l in 0..c.num_hidden_layers {
        let mut rep = BTreeMap::new();
        for role in LinearRole::ALL {
            let [_, cols] = role.shape(c);
            let w = ck.read_f32(&names::hf_linear(l, role)).unwrap();
            let ty = probe_type(cols);
            let imp = m.imatrix.entries[&names::gguf_linear(l, role)].mean();
            let q = quantize_with(&ty, &w, cols, Some(&imp), KSearch::Reference).unwrap();
            rep.insert(
                names::hf_linear(l, role),
                dequantize(&ty, &q, cols).unwrap(),
            );
        }
        let d = dir.path().join(format!("block{l}"));
        rewrite(&ck, &d, &rep);
        let want = direct_kld(&ck, &d, probe_chunks, first);
        let got = m.block_kld[l];
        assert!(
            (got - want).abs() <= 1e-3 * want,
            "block {l}: measured {got}, direct {want}"
        );
        assert!(got > 1e-6, "block {l}: a cost above the rounding floor");
    }
    // The head (the tiny model has its own lm_head).
    let w = ck.read_f32(names::LM_HEAD).unwrap();
    let hidden = c.hidden_size;
    let ty = probe_type(hidden);
    let q = quantize_with(&ty, &w, hidden, None, KSearch::Reference).unwrap();
    let mut rep = BTreeMap::new();
    rep.insert(
        names::LM_HEAD.to_string(),
        dequantize(&ty, &q, hidden).unwrap(),
    );
    let d = dir.path().join("head");
    rewrite(&ck, &d, &rep);
    let want = direct_kld(&ck, &d, probe_chunks, first);
    assert!(
        (m.head_kld - want).abs() <= 0.02 * want,
        "head: measured {}, direct {want}",
        m.head_kld
    );
    // Shares of a block add up to the block's cost; the probe's ratio is 1.
    for l in 0..c.num_hidden_layers {
        let s: f64 = m
            .tensors
            .iter()
            .filter(|t| t.name.starts_with(&format!("blk.{l}.")))
            .map(|t| t.kld_at_probe)
            .sum();
        assert!((s - m.block_kld[l]).abs() <= 1e-12 + 1e-9 * s);
    }
    for t in &m.tensors {
        let p = t.candidates.iter().find(|c| c.ty == t.probe).unwrap();
        assert!((p.rel_error - 1.0).abs() < 1e-12, "{}", t.name);
    }
}

/// The arguments of a small `gguf:auto` run on the tiny model.
fn auto_args(out: &str, extra: &[&str]) -> Vec<String> {
    let tiny = tiny().display().to_string();
    let mut v: Vec<String> = [
        tiny.as_str(),
        "--to",
        "gguf:auto",
        "--calib-samples",
        "8",
        "--calib-seq",
        "64",
        "--auto-probe",
        "2",
        "--auto-holdout",
        "2",
        "--auto-rows",
        "64",
        "--out",
        out,
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    v.extend(extra.iter().map(|x| x.to_string()));
    v
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// `--size` out of range exits 2 naming the range; a size inside it is met, the check table is
/// printed, the manifest records the choice, and `--recipe` with the written recipe gives the
/// same tensors.
#[test]
fn auto_meets_its_budget_and_its_recipe_reproduces_it() {
    let dir = tempdir();
    let a = dir.path().join("a.gguf");
    let a_s = a.display().to_string();
    let err = run_err_code(
        "minitron-convert",
        &strs(&auto_args(&a_s, &["--size", "1000"])),
        2,
    );
    assert!(err.contains("--size 1000 cannot be met"), "{err}");
    // "takes MIN to MAX bytes"
    let range = err.split("takes ").nth(1).expect("a range");
    let nums: Vec<u64> = range
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    let (min, max) = (nums[0], nums[1]);
    assert!(min < max, "{err}");
    let err = run_err_code(
        "minitron-convert",
        &strs(&auto_args(&a_s, &["--size", &(max + 1).to_string()])),
        2,
    );
    assert!(
        err.contains(&format!("takes {min} to {max} bytes")),
        "{err}"
    );
    let err = run_err_code(
        "minitron-convert",
        &strs(&auto_args(&a_s, &["--bpw", "40"])),
        2,
    );
    assert!(err.contains("--bpw 40 cannot be met"), "{err}");
    assert!(!a.exists());

    let budget = (min + (max - min) / 3).to_string();
    let out = run_ok(
        "minitron-convert",
        &strs(&auto_args(&a_s, &["--size", &budget])),
    );
    assert!(out.contains("held-back check: 2 chunks"), "{out}");
    assert!(out.lines().any(|l| l.starts_with("auto ")), "{out}");
    let size = std::fs::metadata(&a).unwrap().len();
    assert!(size <= budget.parse::<u64>().unwrap(), "{size} > {budget}");
    let recipe = dir.path().join("a.gguf.recipe.txt");
    let text = std::fs::read_to_string(&recipe).unwrap();
    let m: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("a.gguf.manifest.json")).unwrap(),
    )
    .unwrap();
    let tensors = m["auto_mix"]["tensors"].as_array().unwrap();
    let g = GgufFile::open(&a).unwrap();
    // Every measured tensor is in the recipe with the type the file holds.
    for t in tensors {
        let name = t["name"].as_str().unwrap();
        let ty = t["type"].as_str().unwrap();
        let line = format!("^{}$={ty}", regex::escape(name));
        assert!(text.lines().any(|l| l == line), "{line} missing");
        assert_eq!(g.tensor(name).unwrap().ty.name().to_ascii_lowercase(), ty);
        assert!(t["kld_at_probe"].as_f64().unwrap() >= 0.0);
    }
    assert!(
        m["auto_mix"]["report"]["scored"][0]["divergence"]["mean_kld"]
            .as_f64()
            .unwrap()
            > 0.0
    );

    let b = dir.path().join("b.gguf");
    let b_s = b.display().to_string();
    let r_s = recipe.display().to_string();
    run_ok(
        "minitron-convert",
        &strs(&auto_args(&b_s, &["--recipe", &r_s, "--compare", "none"])),
    );
    let h = GgufFile::open(&b).unwrap();
    assert_eq!(g.tensors.len(), h.tensors.len());
    for t in &g.tensors {
        let u = h.tensor(&t.name).unwrap();
        assert_eq!((t.ty, &t.dims), (u.ty, &u.dims), "{}", t.name);
        assert!(g.data(t) == h.data(u), "{}: bytes differ", t.name);
    }
}

/// The arguments of a small `w4a16:auto` run on the tiny model.
fn w4_args(out: &str, extra: &[&str]) -> Vec<String> {
    let mut v = auto_args(out, extra);
    v[2] = "w4a16:auto".into();
    v
}

/// Bits per block linear weight of the tiny model's checkpoint at `dir`, from its stored
/// tensors.
fn linear_bits(ck: &Checkpoint, dir: &Path) -> f64 {
    let q = Checkpoint::open(dir).unwrap();
    let c = &ck.config;
    let (mut bytes, mut params) = (0u64, 0u64);
    for l in 0..c.num_hidden_layers {
        for r in LinearRole::ALL {
            let [rows, cols] = r.shape(c);
            params += (rows * cols) as u64;
            let stem = names::hf_linear(l, r).replace(".weight", "");
            for (n, (_, i)) in q.index.iter().map(|n| (n.0, q.info(n.0).unwrap())) {
                if n.starts_with(&format!("{stem}.")) {
                    bytes += (i.shape.iter().product::<usize>() * i.dtype.size()) as u64;
                }
            }
        }
    }
    8.0 * bytes as f64 / params as f64
}

/// `w4a16:auto`: budgets out of range exit 2 with the range; a budget inside it is met by a
/// checkpoint whose config groups name every quantized layer once (bf16 layers and the head
/// in `ignore`), with fused layers sharing a kind, each layer stored as its group says; the
/// runner and the manifest check read it; its recipe reproduces it byte for byte; a recipe
/// splitting fused layers exits 2 naming them.
#[test]
fn w4a16_auto_meets_its_budget_names_its_layers_and_reproduces() {
    let dir = tempdir();
    let a = dir.path().join("a");
    let a_s = a.display().to_string();
    let err = run_err_code(
        "minitron-convert",
        &strs(&w4_args(&a_s, &["--bpw", "3"])),
        2,
    );
    assert!(err.contains("--bpw 3 cannot be met"), "{err}");
    assert!(err.contains("bits per linear weight"), "{err}");
    let err = run_err_code(
        "minitron-convert",
        &strs(&w4_args(&a_s, &["--bpw", "17"])),
        2,
    );
    assert!(err.contains("--bpw 17 cannot be met"), "{err}");
    assert!(!a.exists());

    let out = run_ok(
        "minitron-convert",
        &strs(&w4_args(&a_s, &["--bpw", "6", "--compare", "w4g128"])),
    );
    assert!(out.contains("held-back check: 2 chunks"), "{out}");
    assert!(out.lines().any(|l| l.starts_with("auto ")), "{out}");
    assert!(out.lines().any(|l| l.starts_with("w4g128 ")), "{out}");
    let ck = Checkpoint::open(&tiny()).unwrap();
    let bits = linear_bits(&ck, &a);
    assert!(bits <= 6.0 && bits > 4.0, "{bits} bits per linear weight");

    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.join("config.json")).unwrap()).unwrap();
    let q = &cfg["quantization_config"];
    assert_eq!(q["format"], "pack-quantized");
    let ignore: Vec<String> = q["ignore"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    assert!(ignore.contains(&"lm_head".to_owned()));
    // Module → (bits, group) from the config.
    let mut kind: BTreeMap<String, (u64, Option<u64>)> = BTreeMap::new();
    for g in q["config_groups"].as_object().unwrap().values() {
        let w = &g["weights"];
        for t in g["targets"].as_array().unwrap() {
            let t = t.as_str().unwrap().to_owned();
            assert!(!t.starts_with("re:") && t != "Linear", "{t}");
            let k = (w["num_bits"].as_u64().unwrap(), w["group_size"].as_u64());
            assert!(kind.insert(t.clone(), k).is_none(), "{t} in two groups");
        }
    }
    let c = &ck.config;
    let qk = Checkpoint::open(&a).unwrap();
    for l in 0..c.num_hidden_layers {
        let of = |r: LinearRole| {
            let m = names::hf_linear(l, r).replace(".weight", "");
            (kind.get(&m).copied(), ignore.contains(&m))
        };
        assert_eq!(of(LinearRole::Q), of(LinearRole::K));
        assert_eq!(of(LinearRole::Q), of(LinearRole::V));
        assert_eq!(of(LinearRole::Gate), of(LinearRole::Up));
        for r in LinearRole::ALL {
            let m = names::hf_linear(l, r).replace(".weight", "");
            let [rows, cols] = r.shape(c);
            match (kind.get(&m), ignore.contains(&m)) {
                (Some(&(bits, group)), false) => {
                    let per = 32 / bits as usize;
                    let p = qk.info(&format!("{m}.weight_packed")).unwrap().1;
                    assert_eq!(p.shape, vec![rows, cols / per], "{m}");
                    let s = qk.info(&format!("{m}.weight_scale")).unwrap().1;
                    let groups = group.map_or(1, |g| cols / g as usize);
                    assert_eq!(s.shape, vec![rows, groups], "{m}");
                }
                (None, true) => {
                    let w = qk.info(&format!("{m}.weight")).unwrap().1;
                    assert_eq!((w.dtype, w.shape.clone()), (Dtype::BF16, vec![rows, cols]));
                }
                k => panic!("{m}: {k:?}"),
            }
        }
    }
    // The runner and the manifest check read it.
    let v = run_ok("minitron-verify", &["--manifest", &a_s]);
    assert!(!v.is_empty());
    minitron::scheme::open(&a).unwrap();
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(a.join("minitron-manifest.json")).unwrap())
            .unwrap();
    assert!(m["auto_mix"]["units"].as_array().unwrap().len() == 4 * c.num_hidden_layers);

    // The recipe reproduces the checkpoint.
    let recipe = dir.path().join("a.recipe.txt");
    let r_s = recipe.display().to_string();
    let b = dir.path().join("b");
    let b_s = b.display().to_string();
    run_ok(
        "minitron-convert",
        &strs(&w4_args(&b_s, &["--recipe", &r_s, "--compare", "none"])),
    );
    for f in std::fs::read_dir(&a).unwrap() {
        let f = f.unwrap().path();
        if f.extension().is_some_and(|x| x == "safetensors") {
            let g = b.join(f.file_name().unwrap());
            assert!(
                std::fs::read(&f).unwrap() == std::fs::read(&g).unwrap(),
                "{}",
                f.display()
            );
        }
    }

    // Fused layers split by a recipe.
    let bad = dir.path().join("bad.txt");
    std::fs::write(&bad, "self_attn.q_proj$=w8\n.*=w4g128\n").unwrap();
    let c_s = dir.path().join("c").display().to_string();
    let err = run_err_code(
        "minitron-convert",
        &strs(&w4_args(&c_s, &["--recipe", bad.to_str().unwrap()])),
        2,
    );
    assert!(
        err.contains("model.layers.0.self_attn.k_proj") && err.contains("fused"),
        "{err}"
    );
}
