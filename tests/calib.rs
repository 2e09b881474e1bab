//! Calibration: hook statistics against an f64 reference, thread-count invariance, importance
//! matrices against llama.cpp's, the `gguf` Python package as a format oracle, legacy `.dat`,
//! and bad input.

mod common;
use common::reference::Ref;
use common::*;

use candle_core::{DType, Device};
use minitron::calib::{CalibInfo, CalibStats, Imatrix};
use minitron::model::names::InputSite;
use minitron::model::{Checkpoint, Tokenizer};

fn info() -> CalibInfo {
    CalibInfo {
        source: "test".into(),
        sha256: String::new(),
        samples: 0,
        seq_len: 0,
        tokens: 0,
        shuffle_seed: None,
        wall_s: 0.0,
        fingerprint: Vec::new(),
    }
}

#[test]
fn hook_statistics_match_an_f64_forward() {
    // The runner runs in f64 here so the comparison isolates what this test is about: that the
    // hooks see the right tensors and the statistics are accumulated correctly. (In f32, single
    // SwiGLU activations carry ~1e-6 relative rounding from cancelling dot products; the f32
    // forward pass is checked against the same reference in tests/runner.rs.)
    let ck = Checkpoint::open(&tiny()).unwrap();
    let tok = Tokenizer::load(&tiny()).unwrap();
    let ids = tok.encode(minitron::calib::DEFAULT_CORPUS, true).unwrap();
    let chunks: Vec<Vec<u32>> = vec![ids[..48].to_vec(), ids[48..96].to_vec()];
    let stats =
        CalibStats::collect(&ck, DType::F64, &Device::Cpu, &chunks, info(), &|_| ()).unwrap();
    let r = Ref { ck };
    let caps: Vec<_> = chunks.iter().map(|c| r.run(c).1).collect();
    let rel = |a: f64, b: f64| (a - b).abs() / b.abs().max(1e-30);
    let mut worst = 0f64;
    for l in 0..2 {
        for site in InputSite::ALL {
            let rows: Vec<&Vec<f64>> = caps
                .iter()
                .flat_map(|c| match site {
                    InputSite::AttnIn => &c[l].attn_in,
                    InputSite::AttnOut => &c[l].attn_out,
                    InputSite::MlpIn => &c[l].mlp_in,
                    InputSite::MlpAct => &c[l].mlp_act,
                })
                .collect();
            let s = stats.site(l, site);
            assert_eq!(s.count, 96);
            for j in 0..s.sum_sq.len() {
                let ss: f64 = rows.iter().map(|r| r[j] * r[j]).sum();
                let am = rows.iter().map(|r| r[j].abs()).fold(0.0, f64::max);
                worst = worst
                    .max(rel(s.sum_sq[j], ss))
                    .max(rel(s.absmax[j] as f64, am));
            }
        }
        let km = caps
            .iter()
            .flat_map(|c| c[l].k.iter().flatten())
            .fold(0f64, |m, v| m.max(v.abs()));
        let vm = caps
            .iter()
            .flat_map(|c| c[l].v.iter().flatten())
            .fold(0f64, |m, v| m.max(v.abs()));
        worst = worst
            .max(rel(stats.layers[l].k_absmax as f64, km))
            .max(rel(stats.layers[l].v_absmax as f64, vm));
    }
    // The issue's bound. What remains is the hooks' rounding of activations to f32 (6e-8).
    eprintln!("worst relative difference of hook statistics vs f64: {worst:e}");
    assert!(worst < 1e-6, "worst relative difference {worst}");
}

#[test]
fn saved_statistics_load_back_exactly_and_threads_do_not_matter() {
    let t = tempdir();
    let text = root().join("src/model/default_corpus.txt");
    let mut files = Vec::new();
    for threads in ["1", "2"] {
        let calib = t.path().join(format!("s{threads}.calib"));
        let im = t.path().join(format!("i{threads}.imatrix"));
        run_ok(
            "minitron-convert",
            &[
                "imatrix",
                s(&tiny()),
                "--calib",
                s(&text),
                "--calib-samples",
                "4",
                "--calib-seq",
                "64",
                "--out",
                s(&im),
                "--save-calib",
                s(&calib),
                "--threads",
                threads,
            ],
        );
        files.push((calib, im));
    }
    assert_eq!(
        sha256(&files[0].1),
        sha256(&files[1].1),
        "imatrix differs between 1 and 2 threads"
    );
    let ck = Checkpoint::open(&tiny()).unwrap();
    let a = CalibStats::load(&files[0].0, &ck.config).unwrap();
    let b = CalibStats::load(&files[1].0, &ck.config).unwrap();
    assert_eq!(a.layers, b.layers);
    assert_eq!(a.info.tokens, 256);
    // --load-calib reproduces the imatrix without running the model.
    let im2 = t.path().join("again.imatrix");
    run_ok(
        "minitron-convert",
        &[
            "imatrix",
            s(&tiny()),
            "--load-calib",
            s(&files[0].0),
            "--out",
            s(&im2),
        ],
    );
    assert_eq!(sha256(&im2), sha256(&files[0].1));
}

#[test]
fn built_in_corpus_and_shuffle() {
    let t = tempdir();
    let a = t.path().join("a.imatrix");
    let b = t.path().join("b.imatrix");
    let c = t.path().join("c.imatrix");
    let out = run_ok(
        "minitron-convert",
        &["imatrix", s(&tiny()), "--calib-seq", "64", "--out", s(&a)],
    );
    assert!(out.contains("built-in"), "{out}");
    run_ok(
        "minitron-convert",
        &[
            "imatrix",
            s(&tiny()),
            "--calib-seq",
            "64",
            "--calib-samples",
            "3",
            "--calib-shuffle",
            "5",
            "--out",
            s(&b),
        ],
    );
    run_ok(
        "minitron-convert",
        &[
            "imatrix",
            s(&tiny()),
            "--calib-seq",
            "64",
            "--calib-samples",
            "3",
            "--calib-shuffle",
            "5",
            "--out",
            s(&c),
        ],
    );
    assert_eq!(sha256(&b), sha256(&c));
    let im = Imatrix::read(&b).unwrap();
    assert_eq!(im.chunk_count, 3);
    assert_eq!(im.entries["blk.0.attn_q.weight"].count, 192.0);
}

#[test]
fn bad_calibration_input() {
    let t = tempdir();
    let out = t.path().join("x.imatrix");
    let empty = t.path().join("empty.txt");
    std::fs::write(&empty, "  \n").unwrap();
    let e = run_err(
        "minitron-convert",
        &[
            "imatrix",
            s(&tiny()),
            "--calib",
            s(&empty),
            "--out",
            s(&out),
        ],
    );
    assert!(
        e.contains("empty.txt") && e.contains("calibration text is empty"),
        "{e}"
    );
    let short = t.path().join("short.txt");
    std::fs::write(&short, "just a few words").unwrap();
    let e = run_err(
        "minitron-convert",
        &[
            "imatrix",
            s(&tiny()),
            "--calib",
            s(&short),
            "--out",
            s(&out),
        ],
    );
    assert!(
        e.contains("short.txt") && e.contains("fewer than one chunk of --calib-seq 512"),
        "{e}"
    );
    let jsonl = t.path().join("data.jsonl");
    std::fs::write(
        &jsonl,
        "{\"text\": \"fine\"}\n{\"body\": \"no text here\"}\n",
    )
    .unwrap();
    let e = run_err(
        "minitron-convert",
        &[
            "imatrix",
            s(&tiny()),
            "--calib",
            s(&jsonl),
            "--out",
            s(&out),
        ],
    );
    assert!(
        e.contains("data.jsonl") && e.contains("line 2") && e.contains("`text`"),
        "{e}"
    );
    assert!(!out.exists(), "no output may be left behind");
    assert_eq!(
        std::fs::read_dir(t.path()).unwrap().count(),
        3,
        "no temporary files left behind"
    );
}

#[test]
fn jsonl_calibration_is_accepted() {
    let t = tempdir();
    let jsonl = t.path().join("data.jsonl");
    let lines: Vec<String> = minitron::calib::DEFAULT_CORPUS
        .split("\n\n")
        .map(|p| serde_json::json!({ "text": p }).to_string())
        .collect();
    std::fs::write(&jsonl, lines.join("\n")).unwrap();
    let out = t.path().join("x.imatrix");
    run_ok(
        "minitron-convert",
        &[
            "imatrix",
            s(&tiny()),
            "--calib",
            s(&jsonl),
            "--calib-seq",
            "64",
            "--out",
            s(&out),
        ],
    );
    assert!(Imatrix::read(&out).unwrap().entries.len() == 14);
}

#[test]
#[cfg_attr(
    not(minitron_assets),
    ignore = "needs the real assets: ../shared/tools/real-assets.sh"
)]
fn imatrix_for_another_model_is_refused() {
    let ck = Checkpoint::open(&tiny()).unwrap();
    let llama_cpp = shared().join("data/smollm2-135m-devtext.imatrix.gguf");
    let im = Imatrix::read(&llama_cpp).unwrap();
    let e = im
        .check_against(&ck.config, &llama_cpp)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("smollm2-135m-devtext.imatrix.gguf") && e.contains("another model"),
        "{e}"
    );
    // Same names, wrong lengths.
    let mut fake = im.clone();
    fake.entries
        .retain(|k, _| k.starts_with("blk.0.") || k.starts_with("blk.1."));
    let e = fake
        .check_against(&ck.config, &llama_cpp)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("expected 128 values") && e.contains("found 576"),
        "{e}"
    );
}

fn dev_text() -> std::path::PathBuf {
    shared().join("data/wikitext2-valid.txt")
}

#[test]
#[cfg_attr(
    not(minitron_assets),
    ignore = "needs the real assets: ../shared/tools/real-assets.sh"
)]
fn smollm2_imatrix_matches_llama_cpp() {
    let a = assets();
    let t = tempdir();
    let ours = t.path().join("ours.imatrix");
    run_ok(
        "minitron-convert",
        &[
            "imatrix",
            s(&a.join("smollm2-135m")),
            "--calib",
            s(&dev_text()),
            "--calib-samples",
            "20",
            "--calib-seq",
            "512",
            "--out",
            s(&ours),
        ],
    );
    let theirs_path = shared().join("data/smollm2-135m-devtext.imatrix.gguf");
    let ours = Imatrix::read(&ours).unwrap();
    let theirs = Imatrix::read(&theirs_path).unwrap();
    assert_eq!(theirs.entries.len(), 210);
    assert_eq!(
        ours.entries.keys().collect::<Vec<_>>(),
        theirs.entries.keys().collect::<Vec<_>>()
    );
    assert_eq!(
        (ours.chunk_count, ours.chunk_size),
        (theirs.chunk_count, theirs.chunk_size)
    );
    let (mut min_cos, mut worst_ratio) = (1f64, 1f64);
    for (name, e) in &theirs.entries {
        let o = &ours.entries[name];
        assert_eq!(o.count, e.count, "{name} counts");
        let (x, y) = (e.mean(), o.mean());
        let dot: f64 = x.iter().zip(&y).map(|(a, b)| *a as f64 * *b as f64).sum();
        let nx: f64 = x.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
        let ny: f64 = y.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
        let cos = dot / nx / ny;
        let ratio =
            y.iter().map(|&v| v as f64).sum::<f64>() / x.iter().map(|&v| v as f64).sum::<f64>();
        min_cos = min_cos.min(cos);
        if (ratio - 1.0).abs() > (worst_ratio - 1.0).abs() {
            worst_ratio = ratio;
        }
        // The issue's bounds (llama.cpp ran bf16 matmuls; we compute in f32).
        assert!(cos >= 0.999, "{name}: cosine {cos}");
        assert!((ratio - 1.0).abs() <= 0.01, "{name}: mean ratio {ratio}");
    }
    eprintln!("imatrix vs llama.cpp: min cosine {min_cos:.7}, worst mean ratio {worst_ratio:.5}");
}

#[test]
#[cfg_attr(
    not(minitron_assets),
    ignore = "needs the real assets: ../shared/tools/real-assets.sh"
)]
fn smollm2_statistics_do_not_depend_on_threads() {
    let a = assets();
    let t = tempdir();
    let ck = Checkpoint::open(&a.join("smollm2-135m")).unwrap();
    let mut results = Vec::new();
    for threads in ["1", "2"] {
        let calib = t.path().join(format!("s{threads}.calib"));
        run_ok(
            "minitron-convert",
            &[
                "imatrix",
                s(&a.join("smollm2-135m")),
                "--calib",
                s(&dev_text()),
                "--calib-samples",
                "2",
                "--out",
                s(&t.path().join(format!("{threads}.imatrix"))),
                "--save-calib",
                s(&calib),
                "--threads",
                threads,
            ],
        );
        // The saved file also records wall time, so compare the statistics themselves.
        results.push((
            CalibStats::load(&calib, &ck.config).unwrap().layers,
            sha256(&t.path().join(format!("{threads}.imatrix"))),
        ));
    }
    assert!(
        results[0] == results[1],
        "statistics differ between 1 and 2 threads"
    );
}

fn python() -> std::path::PathBuf {
    assets().join("venv/bin/python")
}

#[test]
#[cfg_attr(
    not(minitron_assets),
    ignore = "needs the real assets: ../shared/tools/real-assets.sh"
)]
fn gguf_python_package_reads_our_imatrix_like_llama_cpps() {
    let py = python();
    let t = tempdir();
    let ours = t.path().join("ours.imatrix");
    run_ok(
        "minitron-convert",
        &[
            "imatrix",
            s(&tiny()),
            "--calib-seq",
            "64",
            "--out",
            s(&ours),
        ],
    );
    let script = r#"
import sys, json
from gguf import GGUFReader
def desc(p):
    r = GGUFReader(p)
    keys = {k: [int(t) for t in f.types] for k, f in r.fields.items() if not k.startswith('GGUF.')}
    return {'keys': keys, 'tensors': [[t.name, t.tensor_type.name, [int(d) for d in t.shape]] for t in r.tensors]}
print(json.dumps([desc(sys.argv[1]), desc(sys.argv[2])]))
"#;
    let theirs = shared().join("data/smollm2-135m-devtext.imatrix.gguf");
    let o = std::process::Command::new(py)
        .args(["-c", script, s(&ours), s(&theirs)])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let (ours, theirs) = (&v[0], &v[1]);
    assert_eq!(
        ours["keys"], theirs["keys"],
        "same keys with the same value types"
    );
    // Same naming scheme and shapes, per layer (the tiny model has 2 layers of width 128/384).
    let names = |d: &serde_json::Value| -> Vec<String> {
        d["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t[0].as_str().unwrap().to_owned())
            .filter(|n| n.starts_with("blk.0.") || n.starts_with("blk.1."))
            .collect()
    };
    assert_eq!(names(ours), names(theirs));
    for t in ours["tensors"].as_array().unwrap() {
        assert_eq!(t[1], "F32");
        let n = t[0].as_str().unwrap();
        let want = if n.ends_with(".counts") {
            1
        } else if n.contains("ffn_down") {
            384
        } else {
            128
        };
        assert_eq!(t[2], serde_json::json!([want]), "{n}");
    }
}

#[test]
#[cfg_attr(
    not(minitron_assets),
    ignore = "needs the real assets: ../shared/tools/real-assets.sh"
)]
fn legacy_dat_reads_like_candle_does() {
    let theirs_path = shared().join("data/smollm2-135m-devtext.imatrix.gguf");
    let theirs = Imatrix::read(&theirs_path).unwrap();
    // Write llama.cpp's legacy layout from its own GGUF values, as `--output-format dat` does:
    // values = mean · ncall, with ncall = chunks.
    let ncall = theirs.chunk_count as i32;
    let mut b = Vec::new();
    b.extend((theirs.entries.len() as i32).to_le_bytes());
    for (name, e) in &theirs.entries {
        b.extend((name.len() as i32).to_le_bytes());
        b.extend(name.as_bytes());
        b.extend(ncall.to_le_bytes());
        b.extend((e.sum_sq.len() as i32).to_le_bytes());
        for m in e.mean() {
            b.extend((m * ncall as f32).to_le_bytes());
        }
    }
    b.extend(ncall.to_le_bytes());
    let ds = b"wikitext2-valid.txt";
    b.extend((ds.len() as i32).to_le_bytes());
    b.extend(ds);
    let t = tempdir();
    let dat = t.path().join("legacy.dat");
    std::fs::write(&dat, &b).unwrap();
    let ours = Imatrix::read(&dat).unwrap();
    let candle = candle_core::quantized::imatrix_file::load_imatrix(&dat).unwrap();
    assert_eq!(ours.entries.len(), 210);
    assert_eq!(ours.chunk_count, theirs.chunk_count);
    assert_eq!(ours.datasets, vec!["wikitext2-valid.txt".to_owned()]);
    for (name, e) in &ours.entries {
        let m = e.mean();
        assert_eq!(
            &m, &candle[name],
            "{name}: our reading differs from candle's"
        );
        for (a, b) in m.iter().zip(theirs.entries[name].mean()) {
            assert!((a - b).abs() <= 1e-6 * b.abs(), "{name}: {a} vs {b}");
        }
    }
}

/// The built-in corpus fills the default `--calib-samples 64` × `--calib-seq 512` under the
/// Llama-3 tokenizer and SmolLM2's (so no "holds only" warning), with room to spare.
#[test]
#[cfg_attr(
    not(minitron_assets),
    ignore = "needs the real assets: ../shared/tools/real-assets.sh"
)]
fn built_in_corpus_fills_the_default_calibration() {
    let src = minitron::calib::load_source(None).unwrap();
    assert_eq!(src.label, "built-in");
    for dir in ["llama3-tokenizer", "smollm2-135m"] {
        let tok = Tokenizer::load(&assets().join(dir)).unwrap();
        let spec = minitron::calib::CalibSpec {
            samples: 64,
            seq_len: 512,
            shuffle: None,
        };
        let chunks = minitron::calib::calibration_chunks(&tok, &src, &spec).unwrap();
        assert_eq!(chunks.len(), 64, "{dir}");
        assert!(chunks.iter().all(|c| c.len() == 512), "{dir}");
        let all = tok.encode(&src.text, true).unwrap().len();
        assert!(all >= 96 * 512, "{dir}: {all} tokens");
    }
}
