//! `minitron-verify`: perplexity, KL-divergence, top-1 agreement and greedy parity of a model.

mod common;

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// Measure a checkpoint: perplexity on a text (llama-perplexity's protocol), KL-divergence and
/// top-1 agreement against a reference, and greedy-generation parity.
#[derive(Parser, Debug)]
#[command(name = "minitron-verify", version)]
struct Args {
    /// The model to measure: a checkpoint folder (bf16, FP8 or INT8 safetensors) or a GGUF file.
    #[arg(required_unless_present = "manifest")]
    candidate: Option<PathBuf>,
    /// Check an artifact against the manifest written with it instead of measuring: recompute
    /// the sha256 of every file `minitron-manifest.json` (a folder) or `FILE.gguf.manifest.json`
    /// (a GGUF file) lists, and name every file changed, missing or extra. Exit status 0 when
    /// all match, 2 otherwise.
    #[arg(long, value_name = "DIR|FILE.gguf", conflicts_with_all = ["candidate", "ppl", "kld", "gen", "hellaswag", "choices", "winogrande"])]
    manifest: Option<PathBuf>,
    /// Reference model (the bf16 original: a checkpoint folder or a bf16/f32 GGUF file) for
    /// --kld, --gen and task comparisons. For a task suite it may instead be an earlier
    /// --report of the reference on the same task file (REPORT.json): its per-task scores are
    /// reused and the reference model is not run.
    #[arg(long, value_name = "DIR|FILE.gguf|REPORT.json")]
    reference: Option<PathBuf>,
    /// Perplexity over this text file.
    #[arg(long, value_name = "FILE")]
    ppl: Option<PathBuf>,
    /// KL-divergence and top-1 agreement against --reference, on the --ppl chunks.
    #[arg(long)]
    kld: bool,
    /// Greedy generation of each prompt in this file (one per line, `\n` escapes allowed).
    #[arg(long, value_name = "PROMPTS")]
    gen: Option<PathBuf>,
    /// Tokens to generate per prompt.
    #[arg(long, default_value_t = 32)]
    tokens: usize,
    /// Context (chunk) length for perplexity.
    #[arg(long, default_value_t = 512)]
    ctx: usize,
    /// Use at most this many chunks (default: the whole text).
    #[arg(long)]
    chunks: Option<usize>,
    /// Worker threads (default: all logical CPUs).
    #[arg(long)]
    threads: Option<usize>,
    /// cpu, or cuda[:N] in a CUDA build.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// On a CPU with bf16, run every layer in its GPU form through the CUDA kernels' CPU twins
    /// (what `scripts/gpu-check.sh --rehearse` uses to exercise the GPU arithmetic here).
    #[arg(long, hide = true)]
    emulate_gpu_forms: bool,
    /// Write the full report as JSON here.
    #[arg(long, value_name = "FILE.json")]
    report: Option<PathBuf>,
    /// Run a quantized candidate's weights with unquantized activations (what weight-only
    /// kernels such as FP8 Marlin on Ampere compute).
    #[arg(long)]
    weight_only: bool,
    /// Write the candidate's logits of the first --ppl chunk to FILE (raw f32, [ctx, vocab]).
    #[arg(long, value_name = "FILE")]
    dump_logits: Option<PathBuf>,
    /// GGUF: dequantize the weights at load and run dense matmuls with unquantized activations
    /// (as llama.cpp's dequantize + GEMM paths do); much faster on a CPU than quantized dot products.
    #[arg(long)]
    gguf_dense: bool,
    /// Perplexity chunks per forward pass (default: 1 on a CPU, 4,096 tokens' worth on a GPU).
    #[arg(long, default_value_t = 0, hide_default_value = true)]
    batch: usize,
    /// Weight and matmul dtype: f32 or bf16. Default: bf16 for --ppl/--kld (f32 on a CPU
    /// without AVX-512 BF16); for --gen on a CPU f32 (the exact reference greedy parity is
    /// measured in) when the f32 weights take at most a quarter of the machine's memory, else
    /// bf16; bf16 on a GPU.
    #[arg(long, value_parser = ["f32", "bf16"])]
    dtype: Option<String>,
    /// Print the JSON report on stdout instead of the table.
    #[arg(long)]
    json: bool,
    /// Measure --ppl/--kld with both models resident instead of streamed block by block (a
    /// cross-check: same numbers, much more memory).
    #[arg(long)]
    whole_model: bool,
    /// HellaSwag accuracy, scored as `llama-perplexity --hellaswag` scores it (mean log-prob of
    /// each ending's tokens after the endings' common prefix), plus lm-eval's acc and acc_norm.
    /// FILE: llama.cpp's six-lines-a-task layout or the original hellaswag_val.jsonl. With
    /// --reference, both models and the paired comparison.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["choices", "winogrande"])]
    hellaswag: Option<PathBuf>,
    /// Multiple-choice accuracy on a JSONL file, one task per line: {"query": …, "choices":
    /// [...], "gold": i} with optional "fewshot" (text before the query) and "delimiter"
    /// (between query and choice, default " "); scored like --hellaswag (formats/tasks.md).
    #[arg(long, value_name = "FILE.jsonl", conflicts_with = "winogrande")]
    choices: Option<PathBuf>,
    /// Winogrande accuracy on llama.cpp's CSV (index,sentence,option1,option2,answer): each
    /// option put in the blank, the shared rest of the sentence scored.
    #[arg(long, value_name = "FILE.csv")]
    winogrande: Option<PathBuf>,
    /// Score N tasks, drawn as llama-perplexity draws them (std::mt19937 seeded with 1, one
    /// uniform_int_distribution pick among the tasks left per task; libstdc++'s), so a subset's
    /// score is comparable with llama.cpp's. Default: every task in the file.
    #[arg(long, value_name = "N")]
    tasks: Option<usize>,
    /// Write a model card with what this run measured and the artifact's provenance: README.md
    /// in a checkpoint folder, FILE.gguf.md beside a GGUF file; it is added to the artifact's
    /// manifest, so --manifest still passes.
    #[arg(long)]
    card: bool,
}

fn main() -> std::process::ExitCode {
    common::exit_on_error(|| {
        let a = Args::parse();
        let threads = common::set_threads(a.threads);
        if let Some(m) = &a.manifest {
            return check_manifest(m, a.json);
        }
        let candidate = a
            .candidate
            .clone()
            .expect("clap requires it without --manifest");
        let device = minitron::runtime::pick_device(&a.device)?;
        minitron::runtime::devform::set_emulate(a.emulate_gpu_forms);
        let opts = minitron::verify::report::VerifyOptions {
            candidate,
            reference: a.reference,
            ppl: a.ppl,
            kld: a.kld,
            gen: a.gen,
            gen_tokens: a.tokens,
            ctx: a.ctx,
            chunks: a.chunks,
            threads,
            device,
            command_line: common::command_line(),
            weight_only: a.weight_only,
            dump_logits: a.dump_logits.clone(),
            gguf_dense: a.gguf_dense,
            whole_model: a.whole_model,
            tasks: {
                use minitron::verify::tasks::Suite;
                match (&a.hellaswag, &a.choices, &a.winogrande) {
                    (Some(p), _, _) => Some((Suite::Hellaswag, p.clone())),
                    (_, Some(p), _) => Some((Suite::Choices, p.clone())),
                    (_, _, Some(p)) => Some((Suite::Winogrande, p.clone())),
                    _ => None,
                }
            },
            task_limit: a.tasks,
            batch: a.batch,
            dtype: a.dtype.as_deref().map(|d| match d {
                "bf16" => candle_core::DType::BF16,
                _ => candle_core::DType::F32,
            }),
        };
        let report = minitron::verify::report::run(&opts)?;
        let text = serde_json::to_string_pretty(&report).context("serialising the report")?;
        if let Some(p) = &a.report {
            common::write_atomic(p, &(text.clone() + "\n"))?;
        }
        if a.json {
            println!("{text}");
        } else {
            print!("{}", minitron::verify::report::table(&report));
        }
        if a.card {
            let p = minitron::verify::card::write(&report)?;
            eprintln!("model card: {}", p.display());
        }
        Ok(())
    })
}

/// `--manifest`: checks every file against the manifest; a mismatch is an error (exit 2).
fn check_manifest(path: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let c = minitron::export::manifest::check(path)?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&c).context("serialising the check")?
        );
    } else {
        println!("manifest {}", c.manifest.display());
        for f in &c.ok {
            println!("  ok       {f}");
        }
        for f in &c.changed {
            println!(
                "  CHANGED  {} (expected {} bytes, sha256 {}; found {} bytes, sha256 {})",
                f.file, f.expected_bytes, f.expected_sha256, f.found_bytes, f.found_sha256
            );
        }
        for f in &c.missing {
            println!("  MISSING  {f}");
        }
        for f in &c.extra {
            println!("  EXTRA    {f} (not in the manifest)");
        }
    }
    if c.passed() {
        return Ok(());
    }
    Err(common::BadInput(format!(
        "{}: {} changed, {} missing, {} extra of {} listed files",
        c.manifest.display(),
        c.changed.len(),
        c.missing.len(),
        c.extra.len(),
        c.ok.len() + c.changed.len() + c.missing.len()
    ))
    .into())
}
