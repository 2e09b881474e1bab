//! The runner against a straightforward f64 implementation written here from the published
//! Llama-3 equations, plus KV-cache consistency and self-comparison on the tiny fixture.

mod common;
use common::reference::Ref;
use common::*;

use candle_core::{DType, Device, Tensor};
use minitron::model::{Checkpoint, Tokenizer};
use minitron::runtime::Llama;

fn tiny_ids(n: usize) -> Vec<u32> {
    let tok = Tokenizer::load(&tiny()).unwrap();
    let ids = tok.encode(minitron::calib::DEFAULT_CORPUS, true).unwrap();
    ids[..n].to_vec()
}

#[test]
fn runner_matches_an_f64_reference() {
    let ck = Checkpoint::open(&tiny()).unwrap();
    let model = Llama::load(&ck, DType::F32, &Device::Cpu).unwrap();
    let ids = tiny_ids(40);
    let got = model.logits(&ids).unwrap();
    let want = Ref { ck }.run(&ids).0;
    // f32 compute against f64: per-element rounding of ~6e-8 relative accumulates over dot
    // products of at most 384 terms and 2 blocks; 1e-4 absolute on logits of magnitude ~1–10 is
    // two orders above that and far below any real bug (a wrong rope pair or GQA map moves
    // logits by O(0.1)).
    let mut worst = 0f64;
    for (g, w) in got.iter().zip(&want) {
        for (a, b) in g.iter().zip(w) {
            worst = worst.max((*a as f64 - b).abs());
        }
    }
    let scale = want.iter().flatten().fold(0f64, |m, v| m.max(v.abs()));
    assert!(
        scale > 1.0,
        "logits too flat to test anything: max |logit| {scale}"
    );
    assert!(worst < 1e-4, "max |Δlogit| {worst} vs f64 reference");
}

#[test]
fn kv_cache_decoding_equals_full_forward() {
    let ck = Checkpoint::open(&tiny()).unwrap();
    let model = Llama::load(&ck, DType::F32, &Device::Cpu).unwrap();
    let ids = tiny_ids(24);
    let full = model.logits(&ids).unwrap();
    let mut cache = model.new_cache();
    let prefill = Tensor::from_slice(&ids[..10], (1, 10), &Device::Cpu).unwrap();
    let first = model
        .forward(&prefill, Some(&mut cache), None)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .to_vec2::<f32>()
        .unwrap();
    let mut rows = first;
    for &id in &ids[10..] {
        let t = Tensor::from_slice(&[id], (1, 1), &Device::Cpu).unwrap();
        let r = model
            .forward(&t, Some(&mut cache), None)
            .unwrap()
            .squeeze(0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        rows.extend(r);
    }
    assert_eq!(cache.len, ids.len());
    // Same arithmetic in a different grouping (one row vs many); 1e-4 covers f32 reassociation.
    for (i, (a, b)) in rows.iter().zip(&full).enumerate() {
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-4, "position {i}: {x} vs {y}");
        }
    }
    // Greedy through the cache picks what the full forward would, and on a CPU reports each
    // step's margin: the top logit minus the runner-up (1e-4 as above: cache vs full forward).
    let g = model.greedy_timed(&ids[..10], 3).unwrap();
    let margins = g.margins.expect("a CPU run reports margins");
    assert_eq!(margins.len(), g.tokens.len());
    let mut seq = ids[..10].to_vec();
    for (&tok, &m) in g.tokens.iter().zip(&margins) {
        let l = model.logits(&seq).unwrap();
        let last = l.last().unwrap();
        assert_eq!(tok, minitron::runtime::llama::argmax(last));
        let mut sorted = last.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        assert!(
            m >= 0.0 && (m - (sorted[0] - sorted[1])).abs() < 1e-4,
            "{m} vs {sorted:?}"
        );
        seq.push(tok);
    }
}

#[test]
fn kld_of_a_model_against_itself_is_zero() {
    let text = root().join("src/model/default_corpus.txt");
    let out = run_ok(
        "minitron-verify",
        &[
            s(&tiny()),
            "--reference",
            s(&tiny()),
            "--ppl",
            s(&text),
            "--ctx",
            "64",
            "--kld",
            "--json",
        ],
    );
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    let d = &r["kld"]["divergence"];
    assert!(d["mean_kld"].as_f64().unwrap() < 1e-6, "{d}");
    assert_eq!(d["top1_agreement_pct"].as_f64().unwrap(), 100.0);
    assert_eq!(r["kld"]["delta_ppl_pct"].as_f64().unwrap(), 0.0);
}

#[test]
fn fixture_is_regenerated_byte_for_byte() {
    // fixtures/tiny-llama3 was written by `minitron-convert synth --preset tiny --seed 0`; the
    // same command must give the same bytes, with any thread count.
    for threads in ["1", "2"] {
        let t = tempdir();
        let out = t.path().join("tiny");
        run_ok(
            "minitron-convert",
            &[
                "synth",
                "--preset",
                "tiny",
                "--seed",
                "0",
                "--out",
                s(&out),
                "--threads",
                threads,
            ],
        );
        for e in std::fs::read_dir(tiny()).unwrap() {
            let e = e.unwrap();
            assert_eq!(
                sha256(&e.path()),
                sha256(&out.join(e.file_name())),
                "{:?} differs",
                e.file_name()
            );
        }
        assert_eq!(
            std::fs::read_dir(&out).unwrap().count(),
            std::fs::read_dir(tiny()).unwrap().count()
        );
    }
}

#[test]
fn another_seed_gives_other_weights_and_existing_output_is_kept() {
    let t = tempdir();
    let out = t.path().join("tiny");
    run_ok(
        "minitron-convert",
        &["synth", "--preset", "tiny", "--seed", "7", "--out", s(&out)],
    );
    assert_ne!(
        sha256(&out.join("model.safetensors")),
        sha256(&tiny().join("model.safetensors"))
    );
    assert_eq!(
        sha256(&out.join("tokenizer.json")),
        sha256(&tiny().join("tokenizer.json"))
    );
    let e = run_err(
        "minitron-convert",
        &["synth", "--preset", "tiny", "--out", s(&out)],
    );
    assert!(e.contains("already exists"), "{e}");
}

#[test]
fn inspect_reports_the_fixture() {
    let out = run_ok(
        "minitron-convert",
        &["inspect", s(&tiny()), "--json", "--verbose"],
    );
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["parameters"], 524_928);
    assert_eq!(r["layers"], 2);
    assert_eq!(r["kv_heads"], 2);
    assert_eq!(r["lm_head"], "untied");
    assert_eq!(r["rope"]["scaling"]["rope_type"], "llama3");
    assert_eq!(r["tensors"].as_array().unwrap().len(), 21);
    assert_eq!(r["tokenizer"]["adds_bos"], true);
}

#[test]
fn batched_device_statistics_equal_chunk_by_chunk_host_statistics() {
    use minitron::verify::ppl::{score_batch, score_chunk, StatsOn};
    let ck = Checkpoint::open(&tiny()).unwrap();
    let cand = Llama::load(&ck, DType::BF16, &Device::Cpu).unwrap();
    let reference = Llama::load(&ck, DType::F32, &Device::Cpu).unwrap();
    let ids = tiny_ids(4 * 48);
    let chunks: Vec<&[u32]> = ids.chunks(48).collect();
    let first = 24;
    let batched = score_batch(&cand, Some(&reference), &chunks, first, StatsOn::Device).unwrap();
    assert_eq!(batched.len(), 4);
    let mut worst = (0f64, 0f64);
    let mut kld_sum = 0f64;
    for (c, b) in chunks.iter().zip(&batched) {
        let h = score_chunk(&cand, Some(&reference), c, first).unwrap();
        assert_eq!(h.nll.len(), 48 - 1 - first);
        assert_eq!(h.same_top1, b.same_top1);
        for i in 0..h.nll.len() {
            worst.0 = worst.0.max((h.nll[i] - b.nll[i]).abs());
            worst.1 = worst.1.max((h.kld[i] - b.kld[i]).abs());
            kld_sum += h.kld[i];
        }
    }
    // bf16 against f32 weights gives a real divergence to compare (not a trivial zero).
    assert!(kld_sum > 1e-5, "divergence too small to test: {kld_sum}");
    // The device path reduces in f32: a log-softmax of logits of magnitude ≤ ~10 carries
    // ~1e-6 absolute rounding, so NLL and KLD (a p-weighted mean of log-prob differences) agree
    // with the f64 host path to ~2e-6; 1e-5 leaves headroom yet catches a wrong row or target
    // (errors of order 0.1 or more).
    assert!(
        worst.0 < 1e-5 && worst.1 < 1e-5,
        "max |Δnll|, |Δkld| = {worst:?}"
    );
}

/// `--dtype bf16` (the GPU numerics: bf16 weights and matmul inputs, f32 residual stream,
/// attention and logits) against f32 on the tiny fixture. The perplexity bound is the CUDA
/// acceptance bound (0.2 %); bf16's unit roundoff (2^-8) on matmul inputs moves each logit by
/// well under 1 % and the errors average out over 10k scored tokens.
#[test]
fn bf16_compute_tracks_f32_perplexity() {
    let text = root().join("src/model/default_corpus.txt");
    let ppl = |dtype: &str| -> f64 {
        let out = run_ok(
            "minitron-verify",
            &[
                s(&tiny()),
                "--ppl",
                s(&text),
                "--ctx",
                "64",
                "--dtype",
                dtype,
                "--json",
            ],
        );
        let r: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(r["settings"]["compute_dtype"], dtype);
        r["ppl"]["perplexity"]["ppl"].as_f64().unwrap()
    };
    let (a, b) = (ppl("f32"), ppl("bf16"));
    assert!(a != b, "bf16 run identical to f32: dtype not applied");
    assert!((b / a - 1.0).abs() < 2e-3, "f32 {a} vs bf16 {b}");
}

/// Per-position results of `score_streamed` (both models streamed block by block) for `dtype`.
fn streamed(
    dtype: DType,
    chunks: &[Vec<u32>],
    first: usize,
) -> Vec<minitron::verify::ppl::ChunkResult> {
    use minitron::runtime::load::{safetensors::SafetensorsSource, Source};
    use minitron::verify::ppl::{score_streamed, StatsOn, StreamPlan};
    let ck = Checkpoint::open(&tiny()).unwrap();
    let src = SafetensorsSource::borrowed(&ck);
    let plan = StreamPlan {
        dtype,
        batch: 2,
        pass_chunks: 3,
        on: StatsOn::Host,
    };
    score_streamed(
        &src,
        Default::default(),
        Some(&src as &dyn Source),
        &Device::Cpu,
        chunks,
        first,
        plan,
        &|_| {},
    )
    .unwrap()
}

#[test]
fn streamed_evaluation_equals_the_whole_model_bit_for_bit() {
    use minitron::verify::ppl::{score_batch, StatsOn};
    let ck = Checkpoint::open(&tiny()).unwrap();
    let ids = tiny_ids(5 * 48);
    let chunks: Vec<Vec<u32>> = ids.chunks(48).map(|c| c.to_vec()).collect();
    let first = 24;
    for dtype in [DType::BF16, DType::F32] {
        let whole = Llama::load(&ck, dtype, &Device::Cpu).unwrap();
        let s = streamed(dtype, &chunks, first);
        assert_eq!(s.len(), 5);
        for (c, r) in chunks.iter().zip(&s) {
            let w = score_batch(&whole, Some(&whole), &[c.as_slice()], first, StatsOn::Host)
                .unwrap()
                .pop()
                .unwrap();
            // Same weights, same operations in the same order: identical bits.
            assert_eq!(w.nll, r.nll, "{dtype:?}");
            assert_eq!(w.kld, r.kld, "{dtype:?}");
            assert_eq!(w.same_top1, r.same_top1, "{dtype:?}");
        }
    }
}

/// A bf16-stored head computing in f32 held as bf16 and widened slice by slice inside the
/// product (the form a 128k-vocabulary head takes on a CPU computing in f32; forced here with
/// `widen_head_above: Some(0)`) gives the f32 head's numbers: the weights are the same exact
/// values, so only the f32 summation order of the head's dot products (128 terms) may differ,
/// ~1e-7 relative on the logits. Held to 1e-6 relative on each NLL and 1e-9 on each KLD against
/// the dense f32 head as reference, with every top-1 the same.
#[test]
fn widened_head_gives_the_f32_heads_numbers() {
    use minitron::runtime::load::{safetensors::SafetensorsSource, LoadOptions, Source};
    use minitron::verify::ppl::{score_streamed, StatsOn, StreamPlan};
    let ck = Checkpoint::open(&tiny()).unwrap();
    let src = SafetensorsSource::borrowed(&ck);
    let ids = tiny_ids(3 * 40);
    let chunks: Vec<Vec<u32>> = ids.chunks(40).map(|c| c.to_vec()).collect();
    let plan = StreamPlan {
        dtype: DType::F32,
        batch: 2,
        pass_chunks: 3,
        on: StatsOn::Host,
    };
    let widened = LoadOptions {
        widen_head_above: Some(0),
        ..Default::default()
    };
    let run = |opts: LoadOptions| {
        score_streamed(
            &src,
            opts,
            Some(&src as &dyn Source),
            &Device::Cpu,
            &chunks,
            10,
            plan,
            &|_| {},
        )
        .unwrap()
    };
    use minitron::runtime::linear::Linear;
    let form = |opts| src.head(DType::F32, &Device::Cpu, opts).unwrap().1;
    assert!(matches!(form(LoadOptions::default()), Linear::Dense { .. }));
    assert!(matches!(form(widened), Linear::Widened { .. }));
    let (dense, wide) = (run(LoadOptions::default()), run(widened));
    assert_eq!(dense.len(), 3);
    let mut moved = false;
    for (d, w) in dense.iter().zip(&wide) {
        assert_eq!(d.nll.len(), 29);
        assert!(d.kld.iter().all(|&k| k == 0.0), "dense head against itself");
        for (a, b) in d.nll.iter().zip(&w.nll) {
            assert!((a - b).abs() <= 1e-6 * a.abs(), "NLL {a} vs {b}");
            moved |= a != b;
        }
        assert!(w.kld.iter().all(|&k| k.abs() <= 1e-9), "KLD {:?}", w.kld);
        assert!(w.same_top1.iter().all(|&s| s));
    }
    eprintln!("widened head: NLL bits moved: {moved}");
}

#[test]
fn streamed_results_do_not_depend_on_the_thread_count() {
    let ids = tiny_ids(4 * 40);
    let chunks: Vec<Vec<u32>> = ids.chunks(40).map(|c| c.to_vec()).collect();
    let run = |threads: usize| {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(|| streamed(DType::BF16, &chunks, 20))
    };
    let one = run(1);
    for t in [2, 3] {
        let other = run(t);
        for (a, b) in one.iter().zip(&other) {
            assert_eq!(a.nll, b.nll, "{t} threads");
        }
    }
}

/// The fast kernels (bf16 GEMM, attention, norms, exp: AVX-512 BF16, else AVX2 + FMA) against
/// the portable build of the same functions, through the whole binary: identical perplexity and
/// KLD bits.
#[test]
#[cfg_attr(
    not(minitron_fast_kernel),
    ignore = "this CPU has neither AVX-512 BF16 nor AVX2 + FMA: only the portable path runs here"
)]
fn portable_kernels_give_the_same_numbers_as_the_avx512_ones() {
    let text = root().join("src/model/default_corpus.txt");
    let run_with = |kernel: Option<&str>| -> serde_json::Value {
        let mut cmd = std::process::Command::new(bin("minitron-verify"));
        cmd.args([
            s(&tiny()),
            "--reference",
            s(&tiny()),
            "--kld",
            "--ppl",
            s(&text),
            "--ctx",
            "64",
            "--chunks",
            "6",
            "--dtype",
            "bf16",
            "--json",
        ]);
        if let Some(k) = kernel {
            cmd.env("MINITRON_KERNEL", k);
        }
        let o = cmd.output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let (a, b) = (run_with(None), run_with(Some("portable")));
    let fast = if cfg!(minitron_avx512bf16) {
        "avx512-bf16"
    } else {
        "avx2-fma"
    };
    assert_eq!(a["settings"]["kernel"], fast);
    assert_eq!(b["settings"]["kernel"], "portable");
    assert_eq!(a["ppl"]["per_chunk_ppl"], b["ppl"]["per_chunk_ppl"]);
    assert_eq!(a["ppl"]["perplexity"], b["ppl"]["perplexity"]);
}
