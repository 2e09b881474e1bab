//! `minitron-verify`'s whole run: load, measure, and report as JSON and as a table.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device};
use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::model::checkpoint::sha256_file;
use crate::model::Tokenizer;
use crate::runtime::load::{gguf::GgufSource, safetensors::SafetensorsSource, Source};
use crate::runtime::{Llama, LoadOptions};
use crate::verify::gen::{first_difference, read_prompts, GenResult};
use crate::verify::ppl::{score_streamed, ChunkPlan, Divergence, Perplexity, StatsOn, StreamPlan};

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
    /// Perplexity chunks per forward pass; 0 picks by the model's size (about 512 MB of
    /// activations on a CPU) and up to 4,096 tokens per batch on a GPU.
    pub batch: usize,
    /// Weight and matmul dtype (f32 or bf16). Default: bf16 for streamed perplexity/KLD (f32 on
    /// a CPU without AVX-512 BF16); see [`Self::whole_dtype`] for generation.
    pub dtype: Option<DType>,
    /// Perplexity and KLD with both models resident (the pre-streaming path), for cross-checks.
    pub whole_model: bool,
    /// Multiple-choice task accuracy on this file (with the reference too, when given).
    pub tasks: Option<(crate::verify::tasks::Suite, PathBuf)>,
    /// Score only this many tasks (llama-perplexity's draw).
    pub task_limit: Option<usize>,
}

/// Hidden states held per model and pass of chunks (f32 residual streams).
const PASS_BYTES: usize = 1 << 30;
/// Activation memory one batched CPU forward may use.
const BATCH_BYTES: usize = 512 << 20;

impl VerifyOptions {
    /// The perplexity batch size in chunks for a model of this shape: on a CPU as many chunks
    /// as keep a block's largest activations (about six `[rows, max(hidden, mlp)]` f32 tensors)
    /// under 512 MB.
    pub fn chunks_per_batch(&self, c: &crate::model::LlamaConfig) -> usize {
        let ctx = self.ctx.max(1);
        match self.batch {
            0 if self.device.is_cpu() => {
                let row = 6 * 4 * c.intermediate_size.max(c.hidden_size);
                (BATCH_BYTES / (row * ctx)).max(1)
            }
            0 => (4096 / ctx).max(1),
            b => b,
        }
    }

    /// Chunks per streamed pass: hidden states of at most 1 GiB per model.
    pub fn chunks_per_pass(&self, c: &crate::model::LlamaConfig) -> usize {
        (PASS_BYTES / (4 * c.hidden_size * self.ctx.max(1))).max(1)
    }

    /// The matmul dtype: as asked, else bf16 on a GPU or a CPU with AVX-512 BF16 or AVX2 +
    /// FMA (the same bits on either), f32 on other CPUs, whose portable bf16 kernel is ~30×
    /// slower than f32 matmuls. On AVX2 the bf16 kernel now keeps pace with f32 at two thirds
    /// of the memory (SmolLM2, 2 AVX2 cores: 100 HellaSwag tasks 38.5 s bf16 / 36.3 s f32;
    /// 20 perplexity chunks of 512 24.9 s / 25.1 s, peak RSS 431 / 570 MB).
    pub fn compute_dtype(&self) -> DType {
        match self.dtype {
            Some(d) => d,
            None if self.device.is_cpu()
                && crate::runtime::gemm::Isa::detect() == crate::runtime::gemm::Isa::Portable =>
            {
                DType::F32
            }
            None => DType::BF16,
        }
    }

    /// The dtype of the resident whole model (generation, the logits dump, `--whole-model`) of
    /// a model with `params` parameters: as asked; on a CPU serving generation or the dump
    /// alone, f32 (greedy tokens as the exact reference gives them) when its f32 weights take
    /// at most a quarter of the machine's memory, else bf16 (a 4.5 B model: 9 GB instead of
    /// 18); with `--whole-model`, [`Self::compute_dtype`], so the cross-check runs the same
    /// arithmetic as the streamed pass.
    pub fn whole_dtype(&self, params: u64) -> DType {
        match self.dtype {
            Some(d) => d,
            None if self.device.is_cpu()
                && !self.whole_model
                && 4 * params <= crate::runtime::physical_memory() / 4 =>
            {
                DType::F32
            }
            None => self.compute_dtype(),
        }
    }
}

/// Runs every requested measurement and returns the report.
pub fn run(o: &VerifyOptions) -> Result<Report> {
    if o.ppl.is_none() && o.gen.is_none() && o.tasks.is_none() {
        return Err(Error::Invalid(
            "nothing to measure: give --ppl FILE, --gen PROMPTS, --hellaswag FILE, --choices FILE or --winogrande FILE".into(),
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
    // Every named input is checked before a model is loaded: a typo costs no load time.
    let task_path = o.tasks.as_ref().map(|t| t.1.clone());
    for p in [&o.ppl, &o.gen, &task_path].into_iter().flatten() {
        std::fs::File::open(p).map_err(|e| Error::io(p, e))?;
    }
    // A malformed task file is refused before any model loads.
    if let Some((suite, p)) = &o.tasks {
        suite.read(p)?;
    }
    for p in [Some(&o.candidate), o.reference.as_ref()]
        .into_iter()
        .flatten()
    {
        std::fs::metadata(p).map_err(|e| Error::io(p, e))?;
    }
    // `--reference REPORT.json`: the reference's task scores from an earlier run.
    let saved = match &o.reference {
        Some(p) if is_report(p) => Some((p.as_path(), saved_reference(p, o)?)),
        _ => None,
    };
    crate::runtime::tune_allocator();
    let t0 = Instant::now();
    let dtype = o.compute_dtype();
    let opts = LoadOptions {
        weight_only: o.weight_only,
        gguf_dense: o.gguf_dense,
        ..Default::default()
    };
    let is_gguf = o.candidate.is_file();
    let (cand_src, tok, cand_hashes): (Box<dyn Source>, Tokenizer, Vec<(String, String)>) =
        if is_gguf {
            // A GGUF file runs with the tokenizer rebuilt from its own metadata, as llama.cpp
            // would.
            let tok = Tokenizer::from_gguf(&o.candidate)?;
            let hashes = vec![(file_label(&o.candidate), sha256_file(&o.candidate)?)];
            (Box::new(GgufSource::open(&o.candidate)?), tok, hashes)
        } else {
            let ck = std::sync::Arc::new(crate::scheme::open(&o.candidate)?);
            let tok = Tokenizer::load(&o.candidate).or_else(|e| match &o.reference {
                Some(r) if is_report(r) => Err(e),
                Some(r) if r.is_file() => Tokenizer::from_gguf(r),
                Some(r) => Tokenizer::load(r),
                None => Err(e),
            })?;
            let hashes = ck.input_hashes()?;
            (Box::new(SafetensorsSource::new(ck)), tok, hashes)
        };
    let cand_cfg = cand_src.config().clone();
    let whole_dtype = o.whole_dtype(cand_cfg.parameter_count());
    let need_ref =
        o.reference.is_some() && saved.is_none() && (o.kld || o.gen.is_some() || o.tasks.is_some());
    // The reference: a checkpoint folder, or a GGUF file (a bf16 conversion of the original).
    type Hashes = Vec<(String, String)>;
    let (ref_src, ref_hashes): (Option<Box<dyn Source>>, Hashes) = if need_ref {
        let path = o.reference.as_ref().expect("checked");
        let (src, hashes): (Box<dyn Source>, _) = if path.is_file() {
            (
                Box::new(GgufSource::open(path)?),
                vec![(file_label(path), sha256_file(path)?)],
            )
        } else {
            let ck = std::sync::Arc::new(crate::scheme::open(path)?);
            let hashes = ck.input_hashes()?;
            (Box::new(SafetensorsSource::new(ck)), hashes)
        };
        check_same_vocab(cand_cfg.vocab_size, src.config().vocab_size, path)?;
        (Some(src), hashes)
    } else {
        (None, Vec::new())
    };
    // Generation (and the logits dump) run the whole model, resident in stored precision;
    // perplexity and KL-divergence stream it block by block, except on a GPU that holds the
    // model (and the reference, for --kld) with room for a batch's logits: there streaming
    // would re-send every weight from the host on every pass.
    let resident = !o.device.is_cpu() && o.ppl.is_some() && {
        // bf16 compute keeps weights in their stored bytes (GPU forms); f32 widens every
        // weight to 4 bytes.
        let held = |p: &std::path::Path| match whole_dtype {
            candle_core::DType::F32 => 4 * cand_cfg.parameter_count(),
            _ => crate::runtime::device::stored_bytes(p),
        };
        let mut bytes = held(&o.candidate);
        if o.kld {
            if let Some(r) = &o.reference {
                bytes = bytes.saturating_add(held(r));
            }
        }
        let batch_tokens = (o.chunks_per_batch(&cand_cfg) * o.ctx) as u64;
        // Logits in f32 and their log-softmax copies (×4), for both models, plus 4 GiB.
        let headroom = 8 * 4 * batch_tokens * cand_cfg.vocab_size as u64 + (4 << 30);
        crate::runtime::device::fits_resident(&o.device, bytes, headroom)
    };
    let whole_ppl = o.whole_model || resident;
    let whole = o.gen.is_some() || o.dump_logits.is_some() || whole_ppl;
    let cand = whole
        .then(|| Llama::from_source(cand_src.as_ref(), whole_dtype, &o.device, opts))
        .transpose()?;
    let reference = match (&ref_src, o.gen.is_some() || (whole_ppl && o.kld)) {
        (Some(r), true) => Some(Llama::from_source(
            r.as_ref(),
            whole_dtype,
            &o.device,
            LoadOptions::default(),
        )?),
        _ => None,
    };
    let load_s = t0.elapsed().as_secs_f64();
    if !o.device.is_cpu() {
        // The first kernel launches JIT-compile candle's PTX and create the cuBLAS handles;
        // a short untimed prefill and decode keeps that out of the measured throughput.
        let warm: Vec<u32> = (0..16u32).collect();
        for m in cand.iter().chain(reference.iter()) {
            m.greedy(&warm, 2)?;
        }
        o.device.synchronize()?;
    }

    let mut inputs = BTreeMap::new();
    for (k, v) in cand_hashes {
        inputs.insert(format!("candidate/{k}"), v);
    }
    for (k, v) in ref_hashes {
        inputs.insert(format!("reference/{k}"), v);
    }
    if let Some((p, r)) = &saved {
        // The saved report's own inputs name the reference model's files.
        for (k, v) in &r.inputs_sha256 {
            if let Some(f) = k.strip_prefix("candidate/") {
                inputs.insert(format!("reference/{f}"), v.clone());
            }
        }
        inputs.insert("reference_report".into(), sha256_file(p)?);
    }

    let mut report = Report {
        tool: "minitron-verify".into(),
        version: crate::VERSION.into(),
        command_line: o.command_line.clone(),
        candidate: o.candidate.display().to_string(),
        reference: o.reference.as_ref().map(|p| p.display().to_string()),
        settings: Settings {
            ctx: o.ctx,
            chunks: o.chunks,
            threads: o.threads,
            device: format!("{:?}", o.device),
            compute_dtype: format!("{dtype:?}").to_lowercase(),
            whole_model_dtype: whole.then(|| format!("{whole_dtype:?}").to_lowercase()),
            gen_tokens: o.gen_tokens,
            weight_only: o.weight_only,
            gguf_dense: o.gguf_dense,
            ppl_batch: o.chunks_per_batch(&cand_cfg),
            ppl_pass_chunks: o.chunks_per_pass(&cand_cfg),
            whole_model: whole_ppl,
            kernel: crate::runtime::gemm::Isa::detect().name().into(),
        },
        machine: machine_info(),
        timings: Timings {
            load_s,
            total_s: 0.0,
        },
        ppl: None,
        kld: None,
        gen: None,
        tasks: None,
        inputs_sha256: BTreeMap::new(),
        calibration_overlap: None,
    };

    if let Some(text_path) = &o.ppl {
        let (text, sha) = crate::format::text::read_hashed(text_path)?;
        inputs.insert("ppl_text".into(), sha.clone());
        let t_tok = Instant::now();
        let tokens = tok.encode(&text, true)?;
        let tok_s = t_tok.elapsed().as_secs_f64();
        let plan = ChunkPlan {
            ctx: o.ctx,
            max_chunks: o.chunks,
            bos: if tok.adds_bos { tok.bos_id } else { None },
        };
        let chunks = plan.chunks(&tokens)?;
        report.calibration_overlap = crate::verify::overlap::check(&o.candidate, &sha, &chunks);
        if let (Some(path), Some(first), Some(cand)) = (&o.dump_logits, chunks.first(), &cand) {
            let ids = candle_core::Tensor::from_slice(first, (1, first.len()), &o.device)?;
            let l = cand
                .forward(&ids, None, None)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let bytes: Vec<u8> = l.iter().flat_map(|v| v.to_le_bytes()).collect();
            std::fs::write(path, bytes).map_err(|e| Error::io(path, e))?;
        }
        let plan_s = StreamPlan {
            dtype,
            batch: o.chunks_per_batch(&cand_cfg),
            pass_chunks: o.chunks_per_pass(&cand_cfg),
            on: StatsOn::for_device(&o.device),
        };
        // Token × block steps of every model run (the reference's too, for --kld).
        let models = if o.kld { 2 } else { 1 };
        let depth = (cand_cfg.num_hidden_layers * models) as u64;
        let pb = crate::progress::bar(
            (chunks.len() * o.ctx) as u64 * depth,
            if o.kld { "ppl + kld" } else { "perplexity" },
            crate::progress::Unit::Tokens { passes: depth },
        );
        let t_eval = Instant::now();
        let mut nll = Vec::new();
        let mut ref_nll = Vec::new();
        let mut kld = Vec::new();
        let mut same = Vec::new();
        let mut per_chunk = Vec::new();
        let ref_for_kld: Option<&dyn Source> = if o.kld { ref_src.as_deref() } else { None };
        let results = match (&cand, whole_ppl) {
            (Some(c), true) => {
                let r = if o.kld { reference.as_ref() } else { None };
                let mut all = Vec::new();
                for group in chunks.chunks(plan_s.batch.max(1)) {
                    let g: Vec<&[u32]> = group.iter().map(|c| c.as_slice()).collect();
                    all.extend(crate::verify::ppl::score_batch(
                        c,
                        r,
                        &g,
                        plan.first_scored(),
                        plan_s.on,
                    )?);
                    pb.inc(g.iter().map(|c| c.len() as u64).sum::<u64>() * depth);
                }
                all
            }
            _ => score_streamed(
                cand_src.as_ref(),
                opts,
                ref_for_kld,
                &o.device,
                &chunks,
                plan.first_scored(),
                plan_s,
                &|n| pb.inc(n),
            )?,
        };
        for r in results {
            per_chunk.push(Perplexity::from_nll(&r.nll).ppl);
            nll.extend(r.nll);
            ref_nll.extend(r.ref_nll);
            kld.extend(r.kld);
            same.extend(r.same_top1);
        }
        pb.finish_and_clear();
        o.device.synchronize()?;
        let eval_s = t_eval.elapsed().as_secs_f64();
        let evaluated = chunks.len() * o.ctx * if ref_for_kld.is_some() { 2 } else { 1 };
        let p = Perplexity::from_nll(&nll);
        report.ppl = Some(PplRecord {
            text: text_path.display().to_string(),
            text_tokens: tokens.len(),
            chunks: chunks.len(),
            bos_first: plan.bos.is_some(),
            perplexity: p.clone(),
            per_chunk_ppl: per_chunk,
            tokens_evaluated: evaluated,
            eval_s,
            tokens_per_s: evaluated as f64 / eval_s,
            tokenize_s: tok_s,
        });
        if ref_for_kld.is_some() {
            let rp = Perplexity::from_nll(&ref_nll);
            report.kld = Some(KldRecord {
                delta_ppl_pct: 100.0 * (p.ppl / rp.ppl - 1.0),
                reference_perplexity: rp,
                divergence: Divergence::from_results(&kld, &same),
            });
        }
    }

    if let Some(prompts_path) = &o.gen {
        inputs.insert("prompts".into(), sha256_file(prompts_path)?);
        let prompts = read_prompts(prompts_path)?;
        let t_gen = Instant::now();
        let pb = crate::progress::bar(
            prompts.len() as u64,
            "generate",
            crate::progress::Unit::Items("prompts"),
        );
        let mut results = Vec::new();
        let (mut prefill_tokens, mut prefill_s, mut decode_tokens, mut decode_s) =
            (0usize, 0f64, 0usize, 0f64);
        for p in prompts {
            let ids = tok.encode(&p, true)?;
            if ids.is_empty() {
                return Err(Error::Invalid(format!("prompt {p:?} tokenizes to nothing")));
            }
            let cand = cand.as_ref().expect("loaded for generation");
            let g = cand.greedy_timed(&ids, o.gen_tokens)?;
            let candidate = g.tokens;
            prefill_tokens += ids.len();
            prefill_s += g.prefill_s;
            decode_tokens += candidate.len().saturating_sub(1);
            decode_s += g.decode_s;
            let reference = reference
                .as_ref()
                .map(|m| m.greedy(&ids, o.gen_tokens))
                .transpose()?;
            let first_diff = reference
                .as_ref()
                .and_then(|r| first_difference(&candidate, r));
            results.push(GenResult {
                candidate_text: tok.decode(&candidate)?,
                reference_text: reference.as_ref().map(|r| tok.decode(r)).transpose()?,
                prompt: p,
                prompt_ids: ids,
                candidate,
                candidate_margins: g.margins,
                reference,
                first_diff,
            });
            pb.inc(1);
        }
        pb.finish_and_clear();
        let gen_s = t_gen.elapsed().as_secs_f64();
        let with_ref = results.iter().filter(|r| r.reference.is_some()).count();
        let exact = results
            .iter()
            .filter(|r| r.reference.is_some() && r.first_diff.is_none())
            .count();
        report.gen = Some(GenRecord {
            prompts: results,
            exact_match: (with_ref > 0).then_some(exact),
            exact_match_rate: (with_ref > 0).then(|| exact as f64 / with_ref as f64),
            gen_s,
            prefill_tokens_per_s: prefill_tokens as f64 / prefill_s.max(1e-12),
            decode_tokens_per_s: decode_tokens as f64 / decode_s.max(1e-12),
        });
    }
    if let Some((suite, path)) = &o.tasks {
        let ti = crate::verify::tasks::TaskInputs {
            suite: *suite,
            path,
            limit: o.task_limit,
            candidate: cand_src.as_ref(),
            candidate_opts: opts,
            reference: ref_src.as_deref(),
            reference_scores: saved
                .as_ref()
                .and_then(|(p, r)| r.tasks.as_ref().map(|t| (*p, t))),
            tokenizer: &tok,
            device: &o.device,
            plan: crate::verify::tasks::RunPlan::for_model(dtype, cand_cfg.hidden_size),
        };
        let r = crate::verify::tasks::run(&ti)?;
        inputs.insert(format!("{}_tasks", suite.name()), r.file_sha256.clone());
        report.tasks = Some(r);
    }
    report.inputs_sha256 = inputs;
    report.timings.total_s = t0.elapsed().as_secs_f64();
    Ok(report)
}

/// Whether `--reference` names a saved report rather than a model.
fn is_report(p: &Path) -> bool {
    p.is_file()
        && p.extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("json"))
}

/// Reads `--reference REPORT.json`: an earlier `--report` with task scores, usable only for a
/// task suite (perplexity, KLD and generation need the reference model itself).
fn saved_reference(p: &Path, o: &VerifyOptions) -> Result<Report> {
    if o.kld || o.gen.is_some() || o.tasks.is_none() {
        return Err(Error::Invalid(format!(
            "--reference {}: a saved report holds task scores only; it serves --hellaswag, --choices and --winogrande, not --kld or --gen (give the reference model for those)",
            p.display()
        )));
    }
    let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
    let r: Report = serde_json::from_str(&text).map_err(|e| Error::Format {
        path: p.into(),
        msg: format!("not a minitron-verify report: {e}"),
    })?;
    if r.tasks.is_none() {
        return Err(Error::Format {
            path: p.into(),
            msg: "the report has no task scores (it was not written with --hellaswag, --choices or --winogrande)".into(),
        });
    }
    Ok(r)
}

fn check_same_vocab(candidate_vocab: usize, reference_vocab: usize, path: &Path) -> Result<()> {
    if candidate_vocab != reference_vocab {
        return Err(Error::TensorMismatch {
            path: if path.is_dir() {
                path.join("config.json")
            } else {
                path.to_owned()
            },
            tensor: "vocab_size".into(),
            expected: format!("{candidate_vocab} (the candidate's)"),
            found: reference_vocab.to_string(),
        });
    }
    Ok(())
}

/// A file's name for report keys.
fn file_label(path: &Path) -> String {
    path.file_name()
        .map_or("model.gguf".into(), |f| f.to_string_lossy().into_owned())
}

fn machine_info() -> Machine {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|x| x.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    Machine {
        os: std::env::consts::OS.into(),
        arch: std::env::consts::ARCH.into(),
        cpu,
        logical_cpus: std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1),
    }
}

/// The report as a readable table.
pub fn table(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "candidate   {}", r.candidate);
    if let Some(rf) = &r.reference {
        let _ = writeln!(s, "reference   {rf}");
    }
    if let Some(p) = &r.ppl {
        let pp = &p.perplexity;
        let _ = writeln!(
            s,
            "perplexity  {:.4} ± {:.4}   ({} chunks × {} ctx, {} tokens scored, {:.1} tokens/s evaluated)",
            pp.ppl, pp.stderr, p.chunks, r.settings.ctx, pp.tokens, p.tokens_per_s
        );
    }
    if let Some(o) = &r.calibration_overlap {
        let _ = writeln!(s, "WARNING     {}", o.warning);
    }
    if let Some(k) = &r.kld {
        let d = &k.divergence;
        let _ = writeln!(
            s,
            "reference   ppl {:.4} ± {:.4}   Δppl {:+.3} %",
            k.reference_perplexity.ppl, k.reference_perplexity.stderr, k.delta_ppl_pct
        );
        let _ = writeln!(
            s,
            "KLD         mean {:.6} ± {:.6}   median {:.6}   p99 {:.6}   max {:.6}",
            d.mean_kld, d.mean_kld_stderr, d.median_kld, d.p99_kld, d.max_kld
        );
        let _ = writeln!(
            s,
            "top-1       {:.3} ± {:.3} % same token over {} positions",
            d.top1_agreement_pct, d.top1_agreement_stderr_pct, d.positions
        );
    }
    if let Some(t) = &r.tasks {
        s.push_str(&crate::verify::tasks::table(t));
    }
    if let Some(g) = &r.gen {
        for p in &g.prompts {
            let status = match (&p.reference, p.first_diff) {
                (None, _) => "".to_owned(),
                (Some(_), None) => "  [matches reference]".to_owned(),
                (Some(_), Some(d)) => format!("  [differs from reference at token {d}]"),
            };
            let _ = writeln!(
                s,
                "gen         {:?} → {:?}{}",
                p.prompt, p.candidate_text, status
            );
            // A differing generation is shown beside the reference's, so the difference can
            // be read, not only counted.
            if let (Some(_), Some(rt)) = (p.first_diff, &p.reference_text) {
                let _ = writeln!(s, "  reference {:?} → {:?}", p.prompt, rt);
            }
        }
        if let Some(exact) = g.exact_match {
            let _ = writeln!(
                s,
                "greedy      {}/{} prompts identical to the reference",
                exact,
                g.prompts.len()
            );
        }
        let _ = writeln!(
            s,
            "speed       prefill {:.1} tokens/s, decode {:.1} tokens/s (candidate, batch 1)",
            g.prefill_tokens_per_s, g.decode_tokens_per_s
        );
    }
    let _ = writeln!(
        s,
        "time        {:.1} s total ({:.1} s loading)",
        r.timings.total_s, r.timings.load_s
    );
    s
}

/// Everything `minitron-verify` measured, as written to `--report` and `--json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub tool: String,
    pub version: String,
    pub command_line: String,
    pub candidate: String,
    pub reference: Option<String>,
    pub settings: Settings,
    pub machine: Machine,
    pub timings: Timings,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ppl: Option<PplRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kld: Option<KldRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gen: Option<GenRecord>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tasks: Option<crate::verify::tasks::TaskReport>,
    /// Input name → sha256 (`candidate/…`, `reference/…`, `ppl_text`, `prompts`).
    pub inputs_sha256: BTreeMap<String, String>,
    /// Set when the evaluated text is, or overlaps, the candidate's calibration text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub calibration_overlap: Option<crate::verify::overlap::CalibOverlap>,
}

/// How the measurement ran.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    pub ctx: usize,
    /// `--chunks` (`None`: the whole text).
    pub chunks: Option<usize>,
    pub threads: usize,
    pub device: String,
    pub compute_dtype: String,
    pub whole_model_dtype: Option<String>,
    pub gen_tokens: usize,
    pub weight_only: bool,
    pub gguf_dense: bool,
    pub ppl_batch: usize,
    pub ppl_pass_chunks: usize,
    pub whole_model: bool,
    pub kernel: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Machine {
    pub os: String,
    pub arch: String,
    pub cpu: String,
    pub logical_cpus: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Timings {
    pub load_s: f64,
    pub total_s: f64,
}

/// Perplexity of the candidate on `--ppl` text.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PplRecord {
    pub text: String,
    pub text_tokens: usize,
    pub chunks: usize,
    pub bos_first: bool,
    pub perplexity: Perplexity,
    pub per_chunk_ppl: Vec<f64>,
    pub tokens_evaluated: usize,
    pub eval_s: f64,
    pub tokens_per_s: f64,
    pub tokenize_s: f64,
}

/// The candidate against the reference on the same text.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KldRecord {
    pub reference_perplexity: Perplexity,
    pub delta_ppl_pct: f64,
    pub divergence: Divergence,
}

/// Greedy generation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GenRecord {
    pub prompts: Vec<GenResult>,
    pub exact_match: Option<usize>,
    pub exact_match_rate: Option<f64>,
    pub gen_s: f64,
    pub prefill_tokens_per_s: f64,
    pub decode_tokens_per_s: f64,
}
