//! Multiple-choice task scoring: packed rows against an f64 evaluation of each choice alone,
//! a model against itself, malformed task files, and SmolLM2 on the HellaSwag dev tasks against
//! the transformers reference.

mod common;
use common::reference::Ref;
use common::*;

use candle_core::{DType, Device};
use minitron::model::{Checkpoint, Tokenizer};
use minitron::runtime::load::safetensors::SafetensorsSource;
use minitron::runtime::LoadOptions;
use minitron::verify::tasks::{self, RunPlan, Suite, TaskInputs};

fn tmpdir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("minitron-tasks-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Six HellaSwag-layout tasks cut from the built-in corpus: endings of different lengths, some
/// sharing their first word, and in every other task all four starting with the same two words
/// (so the common prefix reaches past the context).
fn tiny_tasks(dir: &std::path::Path) -> std::path::PathBuf {
    let words: Vec<&str> = minitron::calib::DEFAULT_CORPUS.split_whitespace().collect();
    let mut s = String::new();
    for t in 0..6 {
        let w = &words[t * 40..];
        s.push_str(&format!("Topic {t}: {}\n{}\n", w[..8 + t].join(" "), t % 4));
        for e in 0..4 {
            let a = 10 + 3 * e + t;
            let mut ending = if e % 2 == 0 {
                w[a..a + 2 + e + t % 3].join(" ")
            } else {
                // Shares its first word with ending e − 1.
                format!(
                    "{} {}",
                    w[10 + 3 * (e - 1) + t],
                    w[a + 5..a + 7 + e].join(" ")
                )
            };
            if t % 2 == 0 {
                // All four start alike: the common prefix runs past the context.
                ending = format!("and then {ending}");
            }
            s.push_str(&ending);
            s.push('\n');
        }
    }
    let p = dir.join("tasks.txt");
    std::fs::write(&p, s).unwrap();
    p
}

/// The tiny fixture's scores on `file` (HellaSwag layout) with rows of `row_tokens`, `batch`
/// rows per forward.
fn score_tiny(
    ck: &Checkpoint,
    tok: &Tokenizer,
    file: &std::path::Path,
    dtype: DType,
    row_tokens: usize,
    batch: usize,
) -> tasks::TaskReport {
    let src = SafetensorsSource::borrowed(ck);
    let mut plan = RunPlan::for_model(dtype, ck.config.hidden_size);
    plan.row_tokens = row_tokens;
    plan.batch = batch;
    tasks::run(&TaskInputs {
        suite: Suite::Hellaswag,
        path: file,
        limit: None,
        candidate: &src,
        candidate_opts: LoadOptions::default(),
        reference: None,
        reference_scores: None,
        tokenizer: tok,
        device: &Device::Cpu,
        plan,
    })
    .unwrap()
}

/// Converts the tiny fixture to `target` at `out`.
fn convert_tiny(target: &str, out: &std::path::Path) {
    run_ok(
        "minitron-convert",
        &[
            tiny().to_str().unwrap(),
            "--to",
            target,
            "--out",
            out.to_str().unwrap(),
        ],
    );
}

fn log_softmax(v: &[f64]) -> Vec<f64> {
    let m = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
    let z = v.iter().map(|x| (x - m).exp()).sum::<f64>().ln() + m;
    v.iter().map(|x| x - z).collect()
}

/// Tasks packed several to a row (rows short enough that the six tasks need several, so rows
/// are padded) give each choice the log-probs an f64 evaluation of that choice's sequence alone
/// gives. Tolerance 1e-4: f32 compute against f64 moves the tiny model's logits by < 1e-4
/// (runner.rs), a log-softmax by at most twice that, and a mean or sum of up to ~12 of them by
/// less than 12 × 2e-4 in the worst case — 1e-4 holds in practice with room (the largest seen is
/// printed); a packing mistake (a choice seeing another choice or another task, a wrong
/// position) moves them by O(0.1).
#[test]
fn packed_task_scores_match_an_f64_reference_of_each_choice() {
    let dir = tmpdir("f64");
    let file = tiny_tasks(&dir);
    let ck = Checkpoint::open(&tiny()).unwrap();
    let tok = Tokenizer::load(&tiny()).unwrap();
    let r = score_tiny(&ck, &tok, &file, DType::F32, 96, 2);
    assert_eq!(r.tasks, 6);
    let all = Suite::Hellaswag.read(&file).unwrap();
    let f64ref = Ref {
        ck: Checkpoint::open(&tiny()).unwrap(),
    };
    let mut worst = 0f64;
    let mut beyond_context = 0;
    for (t, rec) in all.iter().zip(&r.per_task) {
        let p = tasks::prepare(&tok, t, &file).unwrap();
        assert_eq!(rec.prefix, p.prefix);
        let ctx_len = match &t.kind {
            tasks::TaskKind::Endings { context, .. } => tok.encode(context, true).unwrap().len(),
            _ => unreachable!(),
        };
        beyond_context += usize::from(p.prefix > ctx_len);
        for (s, seq) in p.seqs.iter().enumerate() {
            let logits = f64ref.run(seq).0;
            let lp = |k: usize| log_softmax(&logits[k - 1])[seq[k] as usize];
            let mean = p.lcpp[s].clone().map(lp).sum::<f64>() / p.lcpp[s].len() as f64;
            let sum: f64 = p.lmeval[s].clone().map(lp).sum();
            worst = worst
                .max((mean - rec.candidate.mean_logprob[s]).abs())
                .max((sum - rec.candidate.sum_logprob[s]).abs());
        }
    }
    println!("largest |Δ| against f64: {worst:e}");
    assert!(
        beyond_context >= 1,
        "no task whose endings share a first word"
    );
    assert!(worst < 1e-4, "packed scores differ from f64 by {worst}");
}

/// A model against itself: same picks everywhere, recovery 100 %, McNemar p = 1; the report
/// lists the task file's hash.
#[test]
fn a_model_against_itself_recovers_everything() {
    let dir = tmpdir("self");
    let file = tiny_tasks(&dir);
    let t = tiny();
    let out = run_ok(
        "minitron-verify",
        &[
            t.to_str().unwrap(),
            "--reference",
            t.to_str().unwrap(),
            "--hellaswag",
            file.to_str().unwrap(),
            "--json",
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let tk = &v["tasks"];
    assert_eq!(tk["tasks"], 6);
    assert_eq!(tk["paired"]["same_choice"], 100.0);
    assert_eq!(tk["paired"]["mcnemar_p"], 1.0);
    assert_eq!(tk["candidate"], tk["reference"]);
    assert!(v["inputs_sha256"]["hellaswag_tasks"].is_string());
    // A subset draw is reported as such.
    let out = run_ok(
        "minitron-verify",
        &[
            t.to_str().unwrap(),
            "--hellaswag",
            file.to_str().unwrap(),
            "--tasks",
            "3",
            "--json",
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["tasks"]["tasks"], 3);
    assert!(v["tasks"]["subset"].as_str().unwrap().contains("mt19937"));
    let lines: Vec<u64> = v["tasks"]["per_task"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["line"].as_u64().unwrap())
        .collect();
    // llama_cpp_order(6, 3) = [2, 5, 3] (libstdc++'s draw) → lines 13, 31, 19.
    assert_eq!(lines, [13, 31, 19]);
}

/// `--reference REPORT.json` (an earlier `--report` of the reference model) gives the paired
/// comparison a reference run gives, to the bit (f64 scores survive the JSON round trip), and is
/// refused for other tasks and for --kld.
#[test]
fn saved_reference_scores_equal_a_reference_run() {
    let dir = tmpdir("saved");
    let file = tiny_tasks(&dir);
    let (t, f) = (tiny(), file.to_str().unwrap());
    let fp8 = dir.join("fp8");
    convert_tiny("fp8", &fp8);
    let saved = dir.join("bf16.json");
    run_ok(
        "minitron-verify",
        &[
            t.to_str().unwrap(),
            "--hellaswag",
            f,
            "--report",
            saved.to_str().unwrap(),
        ],
    );
    let cand = fp8.to_str().unwrap();
    let json = |reference: &str| -> serde_json::Value {
        let out = run_ok(
            "minitron-verify",
            &[cand, "--reference", reference, "--hellaswag", f, "--json"],
        );
        serde_json::from_str(&out).unwrap()
    };
    let (run, read) = (json(t.to_str().unwrap()), json(saved.to_str().unwrap()));
    for k in ["candidate", "reference", "paired"] {
        assert_eq!(run["tasks"][k], read["tasks"][k], "{k}");
    }
    let refs = |v: &serde_json::Value| -> Vec<serde_json::Value> {
        v["tasks"]["per_task"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["reference"].clone())
            .collect()
    };
    assert_eq!(refs(&run), refs(&read));
    assert!(read["inputs_sha256"]["reference_report"].is_string());
    assert_eq!(
        run["inputs_sha256"]["reference/model.safetensors"],
        read["inputs_sha256"]["reference/model.safetensors"]
    );
    let err = run_err(
        "minitron-verify",
        &[
            cand,
            "--reference",
            saved.to_str().unwrap(),
            "--hellaswag",
            f,
            "--tasks",
            "3",
        ],
    );
    assert!(
        err.contains(
            "saved reference scores are of other tasks (tasks: the report has 6, this run 3)"
        ),
        "{err}"
    );
    let err = run_err(
        "minitron-verify",
        &[
            cand,
            "--reference",
            saved.to_str().unwrap(),
            "--ppl",
            f,
            "--kld",
        ],
    );
    assert!(err.contains("holds task scores only"), "{err}");
}

/// Malformed task files exit 2 naming the file, the line and the field, before any model loads.
#[test]
fn malformed_task_files_exit_2_naming_file_line_and_field() {
    let dir = tmpdir("bad");
    let t = tiny();
    let good = "Ctx: a b\n1\nx\ny\nz\nw\n";
    let cases: Vec<(&str, &str, String, &str)> = vec![
        ("--hellaswag", "lines.txt", "Ctx: a\n1\nx\ny\n".into(), "lines.txt:0: layout: 4 lines"),
        ("--hellaswag", "gold.txt", good.replace("\n1\n", "\n7\n"), "gold.txt:2: gold: 7 is out of range"),
        ("--hellaswag", "empty.txt", good.replace("\nz\n", "\n\n"), "empty.txt:5: ending 2: empty"),
        ("--choices", "json.jsonl", "{\"query\": \"q\", \"choices\": [\"a\"".into(), "json.jsonl:1: json:"),
        (
            "--choices",
            "gold.jsonl",
            "{\"query\": \"q\", \"choices\": [\"a\", \"b\"], \"gold\": 0}\n{\"query\": \"q\", \"choices\": [\"a\", \"b\"], \"gold\": 5}\n".into(),
            "gold.jsonl:2: gold: 5 is out of range 0..2",
        ),
        ("--winogrande", "w.csv", "0,No blank.,A,B,1\n".into(), "w.csv:1: sentence"),
    ];
    for (flag, name, body, want) in cases {
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        let err = run_err(
            "minitron-verify",
            &[t.to_str().unwrap(), flag, p.to_str().unwrap()],
        );
        assert!(err.contains(want), "{flag} {name}: {err}");
    }
}

/// SmolLM2 in f32 on a draw of the HellaSwag dev tasks: each ending's mean log-prob (llama.cpp's
/// convention) and summed log-prob (lm-eval's) against transformers f32 on CPU
/// (shared/data/hellaswag-dev.reference.json). Both compute in f32 from the same bf16 weights
/// and differ only in summation order: the largest difference seen is ~1e-5 (printed), so
/// 1e-3 leaves two orders of margin while a scoring mistake (an off-by-one target, a choice
/// seeing another, a missing BOS) moves log-probs by 0.1 or more. Picks may differ only where
/// the reference's best two endings are within 2e-3.
#[test]
#[cfg_attr(not(minitron_assets), ignore = "needs ../shared/tools/real-assets.sh")]
fn smollm2_hellaswag_matches_the_transformers_reference() {
    let a = assets();
    let model = a.join("smollm2-135m");
    let data = shared().join("data");
    let out = run_ok(
        "minitron-verify",
        &[
            model.to_str().unwrap(),
            "--hellaswag",
            data.join("hellaswag-dev.txt").to_str().unwrap(),
            "--tasks",
            "40",
            "--dtype",
            "f32",
            "--json",
        ],
    );
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(data.join("hellaswag-dev.reference.json")).unwrap(),
    )
    .unwrap();
    let per = v["tasks"]["per_task"].as_array().unwrap();
    assert_eq!(per.len(), 40);
    let (mut worst_mean, mut worst_sum_tok) = (0f64, 0f64);
    for t in per {
        let idx = (t["line"].as_u64().unwrap() as usize - 1) / 6;
        let r = &reference["per_task"][idx];
        assert_eq!(t["gold"], r["gold"]);
        assert_eq!(t["prefix"], r["common_prefix"], "task {idx}");
        assert_eq!(t["tokens"], r["tokens"], "task {idx}");
        let c = &t["candidate"];
        let f = |x: &serde_json::Value| -> Vec<f64> {
            x.as_array()
                .unwrap()
                .iter()
                .map(|y| y.as_f64().unwrap())
                .collect()
        };
        let (ours, theirs) = (f(&c["mean_logprob"]), f(&r["lcpp_mean_logprob"]));
        for (a, b) in ours.iter().zip(&theirs) {
            worst_mean = worst_mean.max((a - b).abs());
        }
        let (os, ts) = (f(&c["sum_logprob"]), f(&r["lmeval_sum_logprob"]));
        let toks: Vec<u64> = r["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect();
        for ((a, b), n) in os.iter().zip(&ts).zip(&toks) {
            let n = (*n as f64 - r["common_prefix"].as_f64().unwrap()).max(1.0);
            worst_sum_tok = worst_sum_tok.max((a - b).abs() / n);
        }
        // A different pick only where the reference's best two endings are within tolerance.
        let pick = c["pick"].as_u64().unwrap() as usize;
        let rpick = r["lcpp_pick"].as_u64().unwrap() as usize;
        if pick != rpick {
            assert!(
                (theirs[pick] - theirs[rpick]).abs() < 2e-3,
                "task {idx}: {ours:?} vs {theirs:?}"
            );
        }
    }
    println!("worst |Δ mean log-prob| {worst_mean:.5}, worst |Δ sum| per token {worst_sum_tok:.5}");
    assert!(worst_mean < 1e-3, "mean log-prob off by {worst_mean}");
    assert!(
        worst_sum_tok < 1e-3,
        "summed log-prob off by {worst_sum_tok} per token"
    );
}

/// `--card` writes README.md into a checkpoint folder (and FILE.gguf.md beside a GGUF file)
/// with the measured numbers, lists it in the manifest, and `--manifest` still passes.
#[test]
fn card_is_written_and_listed_in_the_manifest() {
    let dir = tmpdir("card");
    let file = tiny_tasks(&dir);
    let t = tiny();
    let out = dir.join("fp8");
    convert_tiny("fp8", &out);
    run_ok(
        "minitron-verify",
        &[
            out.to_str().unwrap(),
            "--reference",
            t.to_str().unwrap(),
            "--hellaswag",
            file.to_str().unwrap(),
            "--card",
        ],
    );
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(
        card.contains("| hellaswag accuracy (6 tasks, all) |"),
        "{card}"
    );
    assert!(card.contains("| recovery |"), "{card}");
    assert!(card.contains("`hellaswag_tasks`"), "{card}");
    assert!(card.contains("--to fp8"), "{card}");
    run_ok("minitron-verify", &["--manifest", out.to_str().unwrap()]);
    // Again (the entry is replaced, not doubled), then a GGUF file's card.
    run_ok(
        "minitron-verify",
        &[
            out.to_str().unwrap(),
            "--hellaswag",
            file.to_str().unwrap(),
            "--card",
        ],
    );
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("minitron-manifest.json")).unwrap())
            .unwrap();
    let n = m["files"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|f| f["file"] == "README.md")
        .count();
    assert_eq!(n, 1);
    run_ok("minitron-verify", &["--manifest", out.to_str().unwrap()]);
    let g = dir.join("m.gguf");
    convert_tiny("gguf:q8_0", &g);
    run_ok(
        "minitron-verify",
        &[
            g.to_str().unwrap(),
            "--hellaswag",
            file.to_str().unwrap(),
            "--card",
        ],
    );
    assert!(dir.join("m.gguf.md").exists());
    run_ok("minitron-verify", &["--manifest", g.to_str().unwrap()]);
}

/// The fused CPU block (bf16 weights on the runner's GEMM) honours packing too: each choice's
/// scores equal a whole-model bf16 run of that choice alone. Both run the same kernels on the
/// same rows; only attention's sums see a different layout (masked keys add exact zeros, but
/// the kept ones fall in other SIMD lanes), so 1e-4 on log-probs is far above what reordered
/// f32 sums can move and far below a position or mask mistake.
#[test]
fn packed_scores_on_the_fused_bf16_block_equal_unpacked_runs() {
    let dir = tmpdir("bf16");
    let file = tiny_tasks(&dir);
    let ck = Checkpoint::open(&tiny()).unwrap();
    let tok = Tokenizer::load(&tiny()).unwrap();
    let r = score_tiny(&ck, &tok, &file, DType::BF16, 128, 4);
    let model = minitron::runtime::Llama::load(&ck, DType::BF16, &Device::Cpu).unwrap();
    let all = Suite::Hellaswag.read(&file).unwrap();
    let mut worst = 0f64;
    for (t, rec) in all.iter().zip(&r.per_task) {
        let p = tasks::prepare(&tok, t, &file).unwrap();
        for (s, seq) in p.seqs.iter().enumerate() {
            let logits = model.logits(seq).unwrap();
            let lp = |k: usize| {
                let row: Vec<f64> = logits[k - 1].iter().map(|&v| v as f64).collect();
                log_softmax(&row)[seq[k] as usize]
            };
            let mean = p.lcpp[s].clone().map(lp).sum::<f64>() / p.lcpp[s].len() as f64;
            worst = worst.max((mean - rec.candidate.mean_logprob[s]).abs());
        }
    }
    println!("largest |Δ| packed vs unpacked bf16: {worst:e}");
    assert!(worst < 1e-4, "packed bf16 scores differ by {worst}");
}
