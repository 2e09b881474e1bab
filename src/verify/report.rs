//! `minitron-verify`'s whole run: load, measure, and report as JSON and as a table.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device};
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::model::checkpoint::sha256_file;
use crate::model::{Checkpoint, Tokenizer};
use crate::runtime::Llama;
use crate::verify::gen::{first_difference, read_prompts, GenResult};
use crate::verify::ppl::{score_batch, ChunkPlan, Divergence, Perplexity, StatsOn};

/// What to measure.
#[derive(Debug, Clone)]
pub struct VerifyOptions {
    pub candidate: PathBuf,
    pub reference: Option<PathBuf>,
    pub ppl: Option<PathBuf>,
    pub kld: bool,
    pub gen: Option<PathBuf>,
    pub gen_tokens: usize,
    pub ctx: usize,
    pub chunks: Option<usize>,
    pub threads: usize,
    pub device: Device,
    pub command_line: String,
    /// Run the candidate's quantized weights with unquantized activations.
    pub weight_only: bool,
    /// Write the candidate's logits of the first perplexity chunk here (raw little-endian f32,
    /// `[ctx, vocab]`), for comparing devices.
    pub dump_logits: Option<PathBuf>,
    /// GGUF candidates: dequantize block-quantized weights at load (dense matmuls).
    pub gguf_dense: bool,
    /// Perplexity chunks per forward pass; 0 picks one on a CPU and up to 4,096 tokens per
    /// batch on a GPU.
    pub batch: usize,
    /// Weight and matmul dtype (f32 or bf16); default f32 on a CPU, bf16 on a GPU.
    pub dtype: Option<DType>,
}

impl VerifyOptions {
    /// The perplexity batch size in chunks.
    pub fn chunks_per_batch(&self) -> usize {
        match self.batch {
            0 if self.device.is_cpu() => 1,
            0 => (4096 / self.ctx.max(1)).max(1),
            b => b,
        }
    }
}

/// Runs every requested measurement and returns the report.
pub fn run(o: &VerifyOptions) -> Result<Value> {
    if o.ppl.is_none() && o.gen.is_none() {
        return Err(Error::Invalid(
            "nothing to measure: give --ppl FILE and/or --gen PROMPTS".into(),
        ));
    }
    if o.kld && o.reference.is_none() {
        return Err(Error::Invalid("--kld needs --reference DIR".into()));
    }
    if o.kld && o.ppl.is_none() {
        return Err(Error::Invalid(
            "--kld is measured on the --ppl text: give --ppl FILE".into(),
        ));
    }
    let t0 = Instant::now();
    // f32 on the CPU (exact comparisons); bf16 weights and compute on a GPU (cuBLAS), as
    // serving runtimes run there.
    let dtype = match o.dtype {
        Some(d) => d,
        None if o.device.is_cpu() => DType::F32,
        None => DType::BF16,
    };
    let is_gguf = o.candidate.is_file();
    let (cand, tok, cand_hashes) = if is_gguf {
        // A GGUF file runs with the tokenizer rebuilt from its own metadata, as llama.cpp would.
        let tok = Tokenizer::from_gguf(&o.candidate)?;
        let cand = Llama::load_gguf_with(&o.candidate, dtype, &o.device, o.gguf_dense)?;
        let name = o
            .candidate
            .file_name()
            .map_or("model.gguf".into(), |f| f.to_string_lossy().into_owned());
        (cand, tok, vec![(name, sha256_file(&o.candidate)?)])
    } else {
        let cand_ck = Checkpoint::open(&o.candidate)?;
        let tok = Tokenizer::load(&o.candidate).or_else(|e| match &o.reference {
            Some(r) => Tokenizer::load(r),
            None => Err(e),
        })?;
        let cand = Llama::load_with(
            &cand_ck,
            dtype,
            &o.device,
            crate::runtime::LoadOptions {
                weight_only: o.weight_only,
            },
        )?;
        (cand, tok, cand_ck.input_hashes()?)
    };
    let need_ref = o.reference.is_some() && (o.kld || o.gen.is_some());
    let (ref_ck, reference) = if need_ref {
        let dir = o.reference.as_ref().expect("checked");
        let ck = Checkpoint::open(dir)?;
        check_same_vocab(cand.config.vocab_size, &ck)?;
        let m = Llama::load(&ck, dtype, &o.device)?;
        (Some(ck), Some(m))
    } else {
        (None, None)
    };
    let load_s = t0.elapsed().as_secs_f64();
    if !o.device.is_cpu() {
        // The first kernel launches JIT-compile candle's PTX and create the cuBLAS handles;
        // a short untimed prefill and decode keeps that out of the measured throughput.
        let warm: Vec<u32> = (0..16u32).collect();
        cand.greedy(&warm, 2)?;
        if let Some(r) = &reference {
            r.greedy(&warm, 2)?;
        }
        o.device.synchronize()?;
    }

    let mut inputs = serde_json::Map::new();
    for (k, v) in cand_hashes {
        inputs.insert(format!("candidate/{k}"), json!(v));
    }
    if let Some(ck) = &ref_ck {
        for (k, v) in ck.input_hashes()? {
            inputs.insert(format!("reference/{k}"), json!(v));
        }
    }

    let mut report = json!({
        "tool": "minitron-verify",
        "version": crate::VERSION,
        "command_line": o.command_line,
        "candidate": o.candidate.display().to_string(),
        "reference": o.reference.as_ref().map(|p| p.display().to_string()),
        "settings": {
            "ctx": o.ctx, "chunks": o.chunks, "threads": o.threads,
            "device": format!("{:?}", o.device), "compute_dtype": format!("{dtype:?}").to_lowercase(),
            "gen_tokens": o.gen_tokens,
            "weight_only": o.weight_only,
            "gguf_dense": o.gguf_dense,
            "ppl_batch": o.chunks_per_batch(),
        },
        "machine": machine_info(),
        "timings": {"load_s": load_s},
    });

    if let Some(text_path) = &o.ppl {
        inputs.insert("ppl_text".into(), json!(sha256_file(text_path)?));
        let text = std::fs::read_to_string(text_path).map_err(|e| Error::io(text_path, e))?;
        let t_tok = Instant::now();
        let tokens = tok.encode(&text, true)?;
        let tok_s = t_tok.elapsed().as_secs_f64();
        let plan = ChunkPlan {
            ctx: o.ctx,
            max_chunks: o.chunks,
            bos: if tok.adds_bos { tok.bos_id } else { None },
        };
        let chunks = plan.chunks(&tokens)?;
        if let (Some(path), Some(first)) = (&o.dump_logits, chunks.first()) {
            let ids = candle_core::Tensor::from_slice(first, (1, first.len()), &o.device)?;
            let l = cand
                .forward(&ids, None, None)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let bytes: Vec<u8> = l.iter().flat_map(|v| v.to_le_bytes()).collect();
            std::fs::write(path, bytes).map_err(|e| Error::io(path, e))?;
        }
        let pb = crate::progress::bar(chunks.len() as u64, "perplexity", false);
        let t_eval = Instant::now();
        let mut nll = Vec::new();
        let mut ref_nll = Vec::new();
        let mut kld = Vec::new();
        let mut same = Vec::new();
        let mut per_chunk = Vec::new();
        let ref_for_kld = if o.kld { reference.as_ref() } else { None };
        let batch = o.chunks_per_batch();
        let on = StatsOn::for_device(&o.device);
        for group in chunks.chunks(batch) {
            let group: Vec<&[u32]> = group.iter().map(|c| c.as_slice()).collect();
            for r in score_batch(&cand, ref_for_kld, &group, plan.first_scored(), on)? {
                per_chunk.push(Perplexity::from_nll(&r.nll).ppl);
                nll.extend(r.nll);
                ref_nll.extend(r.ref_nll);
                kld.extend(r.kld);
                same.extend(r.same_top1);
            }
            pb.inc(group.len() as u64);
        }
        pb.finish_and_clear();
        o.device.synchronize()?;
        let eval_s = t_eval.elapsed().as_secs_f64();
        let evaluated = chunks.len() * o.ctx * if ref_for_kld.is_some() { 2 } else { 1 };
        let p = Perplexity::from_nll(&nll);
        report["ppl"] = json!({
            "text": text_path.display().to_string(),
            "text_tokens": tokens.len(),
            "chunks": chunks.len(),
            "bos_first": plan.bos.is_some(),
            "perplexity": p,
            "per_chunk_ppl": per_chunk,
            "tokens_evaluated": evaluated,
            "eval_s": eval_s,
            "tokens_per_s": evaluated as f64 / eval_s,
            "tokenize_s": tok_s,
        });
        if ref_for_kld.is_some() {
            let rp = Perplexity::from_nll(&ref_nll);
            report["kld"] = json!({
                "reference_perplexity": rp,
                "delta_ppl_pct": 100.0 * (p.ppl / rp.ppl - 1.0),
                "divergence": Divergence::from_results(&kld, &same),
            });
        }
    }

    if let Some(prompts_path) = &o.gen {
        inputs.insert("prompts".into(), json!(sha256_file(prompts_path)?));
        let prompts = read_prompts(prompts_path)?;
        let t_gen = Instant::now();
        let pb = crate::progress::bar(prompts.len() as u64, "generate", false);
        let mut results = Vec::new();
        let (mut prefill_tokens, mut prefill_s, mut decode_tokens, mut decode_s) =
            (0usize, 0f64, 0usize, 0f64);
        for p in prompts {
            let ids = tok.encode(&p, true)?;
            if ids.is_empty() {
                return Err(Error::Invalid(format!("prompt {p:?} tokenizes to nothing")));
            }
            let (candidate, pf, dc) = cand.greedy_timed(&ids, o.gen_tokens)?;
            prefill_tokens += ids.len();
            prefill_s += pf;
            decode_tokens += candidate.len().saturating_sub(1);
            decode_s += dc;
            let reference = reference
                .as_ref()
                .map(|m| m.greedy(&ids, o.gen_tokens))
                .transpose()?;
            let first_diff = reference
                .as_ref()
                .and_then(|r| first_difference(&candidate, r));
            results.push(GenResult {
                candidate_text: tok.decode(&candidate)?,
                prompt: p,
                prompt_ids: ids,
                candidate,
                reference,
                first_diff,
            });
            pb.inc(1);
        }
        pb.finish_and_clear();
        let gen_s = t_gen.elapsed().as_secs_f64();
        let with_ref: Vec<&GenResult> = results.iter().filter(|r| r.reference.is_some()).collect();
        let exact = with_ref.iter().filter(|r| r.first_diff.is_none()).count();
        report["gen"] = json!({
            "prompts": results,
            "exact_match": if with_ref.is_empty() { Value::Null } else { json!(exact) },
            "exact_match_rate": if with_ref.is_empty() { Value::Null } else { json!(exact as f64 / with_ref.len() as f64) },
            "gen_s": gen_s,
            "prefill_tokens_per_s": prefill_tokens as f64 / prefill_s.max(1e-12),
            "decode_tokens_per_s": decode_tokens as f64 / decode_s.max(1e-12),
        });
    }
    report["inputs_sha256"] = Value::Object(inputs);
    report["timings"]["total_s"] = json!(t0.elapsed().as_secs_f64());
    Ok(report)
}

fn check_same_vocab(candidate_vocab: usize, b: &Checkpoint) -> Result<()> {
    if candidate_vocab != b.config.vocab_size {
        return Err(Error::TensorMismatch {
            path: b.dir.join("config.json"),
            tensor: "vocab_size".into(),
            expected: format!("{candidate_vocab} (the candidate's)"),
            found: b.config.vocab_size.to_string(),
        });
    }
    Ok(())
}

fn machine_info() -> Value {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|x| x.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    json!({
        "os": std::env::consts::OS,
        "arch": std::env::consts::ARCH,
        "cpu": cpu,
        "logical_cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    })
}

/// The report as a readable table.
pub fn table(r: &Value) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "candidate   {}", r["candidate"].as_str().unwrap_or("?"));
    if let Some(rf) = r["reference"].as_str() {
        let _ = writeln!(s, "reference   {rf}");
    }
    if let Some(p) = r.get("ppl") {
        let pp = &p["perplexity"];
        let _ = writeln!(
            s,
            "perplexity  {:.4} ± {:.4}   ({} chunks × {} ctx, {} tokens scored, {:.1} tokens/s evaluated)",
            pp["ppl"].as_f64().unwrap_or(f64::NAN),
            pp["stderr"].as_f64().unwrap_or(f64::NAN),
            p["chunks"],
            r["settings"]["ctx"],
            pp["tokens"],
            p["tokens_per_s"].as_f64().unwrap_or(f64::NAN)
        );
    }
    if let Some(k) = r.get("kld") {
        let d = &k["divergence"];
        let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
        let _ = writeln!(
            s,
            "reference   ppl {:.4} ± {:.4}   Δppl {:+.3} %",
            f(&k["reference_perplexity"]["ppl"]),
            f(&k["reference_perplexity"]["stderr"]),
            f(&k["delta_ppl_pct"])
        );
        let _ = writeln!(
            s,
            "KLD         mean {:.6} ± {:.6}   median {:.6}   p99 {:.6}   max {:.6}",
            f(&d["mean_kld"]),
            f(&d["mean_kld_stderr"]),
            f(&d["median_kld"]),
            f(&d["p99_kld"]),
            f(&d["max_kld"])
        );
        let _ = writeln!(
            s,
            "top-1       {:.3} ± {:.3} % same token over {} positions",
            f(&d["top1_agreement_pct"]),
            f(&d["top1_agreement_stderr_pct"]),
            d["positions"]
        );
    }
    if let Some(g) = r.get("gen") {
        if let Some(ps) = g["prompts"].as_array() {
            for p in ps {
                let status = match (&p["reference"], &p["first_diff"]) {
                    (Value::Null, _) => "".to_owned(),
                    (_, Value::Null) => "  [matches reference]".to_owned(),
                    (_, d) => format!("  [differs from reference at token {d}]"),
                };
                let _ = writeln!(
                    s,
                    "gen         {:?} → {:?}{}",
                    p["prompt"].as_str().unwrap_or(""),
                    p["candidate_text"].as_str().unwrap_or(""),
                    status
                );
            }
        }
        if !g["exact_match"].is_null() {
            let n = g["prompts"].as_array().map_or(0, |a| a.len());
            let _ = writeln!(
                s,
                "greedy      {}/{} prompts identical to the reference",
                g["exact_match"], n
            );
        }
        let _ = writeln!(
            s,
            "speed       prefill {:.1} tokens/s, decode {:.1} tokens/s (candidate, batch 1)",
            g["prefill_tokens_per_s"].as_f64().unwrap_or(0.0),
            g["decode_tokens_per_s"].as_f64().unwrap_or(0.0)
        );
    }
    let _ = writeln!(
        s,
        "time        {:.1} s total ({:.1} s loading)",
        r["timings"]["total_s"].as_f64().unwrap_or(0.0),
        r["timings"]["load_s"].as_f64().unwrap_or(0.0)
    );
    s
}
