//! Measurements on the real assets (SmolLM2-135M and the Llama-3 tokenizer, built by
//! ../shared/tools/real-assets.sh) against numbers measured with llama.cpp and transformers
//! (../shared/data/known-answers.json). Skipped, with a printed reason, when the assets are absent.

mod common;
use common::*;

fn dev_text() -> std::path::PathBuf {
    shared().join("data/wikitext2-valid.txt")
}

#[test]
#[cfg_attr(
    not(minitron_assets),
    ignore = "needs the real assets: ../shared/tools/real-assets.sh"
)]
fn tokenizers_give_the_known_token_counts() {
    let a = assets();
    let ka = known_answers();
    let text = std::fs::read_to_string(dev_text()).unwrap();
    for (dir, key) in [
        ("smollm2-135m", "smollm2_135m"),
        ("llama3-tokenizer", "llama3"),
    ] {
        let tok = minitron::model::Tokenizer::load(&a.join(dir)).unwrap();
        let n = tok.encode(&text, false).unwrap().len();
        assert_eq!(n as u64, ka["token_counts"][key].as_u64().unwrap(), "{dir}");
    }
    let l3 = minitron::model::Tokenizer::load(&a.join("llama3-tokenizer")).unwrap();
    assert!(l3.adds_bos);
    assert_eq!(l3.bos_id, Some(128000));
}

#[test]
#[cfg_attr(
    not(minitron_assets),
    ignore = "needs the real assets: ../shared/tools/real-assets.sh"
)]
fn smollm2_perplexity_matches_llama_cpp() {
    let a = assets();
    let ka = known_answers();
    let out = run_ok(
        "minitron-verify",
        &[
            s(&a.join("smollm2-135m")),
            "--ppl",
            s(&dev_text()),
            "--ctx",
            "512",
            "--chunks",
            "40",
            "--json",
        ],
    );
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    let ours = r["ppl"]["perplexity"]["ppl"].as_f64().unwrap();
    let theirs = ka["llama_cpp"]["bf16_gguf"]["ppl"].as_f64().unwrap();
    assert_eq!(r["ppl"]["perplexity"]["tokens"], 10200);
    // The bound. Our f32 compute differs from llama.cpp's bf16 matmuls by rounding only.
    let rel = (ours / theirs - 1.0).abs();
    eprintln!(
        "perplexity: ours {ours:.4}, llama.cpp bf16 {theirs:.4}, relative difference {:.4} %",
        100.0 * rel
    );
    assert!(rel < 0.003, "ours {ours} vs llama.cpp {theirs}");
    // The standard error uses llama-perplexity's estimate; it must agree to a few percent.
    let se = r["ppl"]["perplexity"]["stderr"].as_f64().unwrap();
    let se_ref = ka["llama_cpp"]["bf16_gguf"]["stderr"].as_f64().unwrap();
    assert!((se / se_ref - 1.0).abs() < 0.05, "stderr {se} vs {se_ref}");
}

#[test]
#[cfg_attr(
    not(minitron_assets),
    ignore = "needs the real assets: ../shared/tools/real-assets.sh"
)]
fn smollm2_greedy_matches_transformers() {
    let a = assets();
    let ka = known_answers();
    let runs = ka["transformers_greedy"]["runs"].as_array().unwrap();
    let t = tempdir();
    let prompts = t.path().join("prompts.txt");
    let lines: Vec<String> = runs
        .iter()
        .map(|r| {
            r["prompt"]
                .as_str()
                .unwrap()
                .replace('\\', "\\\\")
                .replace('\n', "\\n")
        })
        .collect();
    std::fs::write(&prompts, lines.join("\n") + "\n").unwrap();
    let out = run_ok(
        "minitron-verify",
        &[
            s(&a.join("smollm2-135m")),
            "--gen",
            s(&prompts),
            "--tokens",
            "32",
            // No --dtype: transformers ran f32 compute from the bf16 weights, and generation
            // on a CPU defaults to the same (bf16 matmul inputs move near-tied greedy choices).
            "--json",
        ],
    );
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["settings"]["whole_model_dtype"], "f32");
    let got = r["gen"]["prompts"].as_array().unwrap();
    assert_eq!(got.len(), runs.len());
    let mut exact = 0;
    for (want, got) in runs.iter().zip(got) {
        assert_eq!(
            want["prompt_ids"], got["prompt_ids"],
            "prompt tokens of {}",
            want["prompt"]
        );
        let w: Vec<u64> = want["greedy_32"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect();
        let g: Vec<u64> = got["candidate"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect();
        if w == g {
            exact += 1;
        } else {
            assert_eq!(w[..16], g[..16], "first 16 tokens of {}", want["prompt"]);
        }
    }
    eprintln!(
        "greedy: {exact}/{} prompts identical to transformers",
        runs.len()
    );
    assert!(
        exact + 1 >= runs.len(),
        "only {exact} of {} exact",
        runs.len()
    );
}

#[test]
#[cfg_attr(
    not(minitron_assets),
    ignore = "needs the real assets: ../shared/tools/real-assets.sh"
)]
fn smollm2_against_itself() {
    let a = assets();
    let m = a.join("smollm2-135m");
    let out = run_ok(
        "minitron-verify",
        &[
            s(&m),
            "--reference",
            s(&m),
            "--kld",
            "--ppl",
            s(&dev_text()),
            "--chunks",
            "2",
            "--json",
        ],
    );
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    let d = &r["kld"]["divergence"];
    assert!(d["mean_kld"].as_f64().unwrap() < 1e-6, "{d}");
    assert_eq!(d["top1_agreement_pct"].as_f64().unwrap(), 100.0);
    assert_eq!(d["positions"], 510);
}
