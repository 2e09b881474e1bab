//! Multiple-choice task accuracy (formats/tasks.md): HellaSwag as `llama-perplexity
//! --hellaswag` scores it, lm-eval's acc / acc_norm from the same forward passes, our
//! multiple-choice JSONL and Winogrande's partial scoring, for one model or a candidate against
//! a reference with a paired test.
//!
//! The choices of a task are token sequences that share a prefix. They are packed into rows
//! (llama.cpp's sequence ids in one batch): the prefix once, then each choice's remaining
//! tokens, which see the prefix and their own earlier tokens only ([`Packing`]). Rows of many
//! tasks run block by block ([`Streamed::packed`]), so memory holds one block and the rows'
//! hidden states, as the `--ppl` path does; only the positions whose next token is scored go
//! through the head.

pub mod draw;
pub mod file;
pub mod stats;

use std::ops::Range;
use std::path::Path;

use candle_core::DType;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

pub use file::{Task, TaskKind};

use crate::error::{Error, Result};
use crate::model::Tokenizer;
use crate::runtime::{LoadOptions, Packing, Source, Streamed};
use crate::verify::stats::log_sum_exp;

/// Which file layout a task file has and how its tasks are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Suite {
    Hellaswag,
    Choices,
    Winogrande,
}

impl Suite {
    pub fn name(self) -> &'static str {
        match self {
            Suite::Hellaswag => "hellaswag",
            Suite::Choices => "choices",
            Suite::Winogrande => "winogrande",
        }
    }

    /// Reads `path` in this suite's layout.
    pub fn read(self, path: &Path) -> Result<Vec<Task>> {
        match self {
            Suite::Hellaswag => file::hellaswag(path),
            Suite::Choices => file::choices(path),
            Suite::Winogrande => file::winogrande(path),
        }
    }
}

/// Tasks scored on a subset: `n` of the file's, in llama-perplexity's draw (which over the
/// whole file only changes the order).
pub fn select(tasks: Vec<Task>, n: Option<usize>) -> Vec<Task> {
    match n {
        Some(n) if n < tasks.len() => {
            let order = draw::llama_cpp_order(tasks.len(), n);
            order.into_iter().map(|i| tasks[i].clone()).collect()
        }
        _ => tasks,
    }
}

/// Winogrande: when both choices leave more than this many tokens after their common prefix,
/// the option word itself is not scored, only what follows it (llama.cpp's `k_min_trailing_ctx`).
const MIN_TRAILING: usize = 3;

/// A task tokenized: each choice's tokens, their common prefix, and which target tokens each
/// convention scores (token `k` is predicted from position `k − 1`).
#[derive(Debug, Clone)]
pub struct Prepared {
    pub seqs: Vec<Vec<u32>>,
    /// Tokens shared by every choice (at most the shortest choice's length − 1).
    pub prefix: usize,
    /// llama.cpp: the mean log-prob over these targets picks the choice.
    pub lcpp: Vec<Range<usize>>,
    /// lm-eval: the summed log-prob over these targets (the continuation after the context's
    /// own tokenization).
    pub lmeval: Vec<Range<usize>>,
    /// UTF-8 bytes of each continuation (lm-eval's acc_norm divides by them).
    pub bytes: Vec<usize>,
}

impl Prepared {
    /// Tokens the task takes in a packed row: the prefix, and each choice's tokens after it
    /// but its last (a last token predicts nothing that is scored, so it is not run).
    pub fn packed_len(&self) -> usize {
        self.prefix
            + self
                .seqs
                .iter()
                .map(|s| s.len() - 1 - self.prefix)
                .sum::<usize>()
    }
}

fn common_prefix(seqs: &[Vec<u32>]) -> usize {
    let min = seqs.iter().map(Vec::len).min().unwrap_or(0);
    (0..min)
        .take_while(|&k| seqs.iter().all(|s| s[k] == seqs[0][k]))
        .count()
}

/// Tokenizes `t` with `tok` (BOS as the tokenizer adds it, as llama.cpp's `common_tokenize(…,
/// true)` does).
pub fn prepare(tok: &Tokenizer, t: &Task, path: &Path) -> Result<Prepared> {
    let short = |what: &str| Error::TaskFile {
        path: path.to_path_buf(),
        line: t.line,
        field: what.into(),
        msg: "tokenizes to fewer than 2 tokens".into(),
    };
    match &t.kind {
        TaskKind::Endings {
            context,
            delimiter,
            choices,
        } => {
            let seqs = choices
                .iter()
                .map(|c| tok.encode(&format!("{context}{delimiter}{c}"), true))
                .collect::<Result<Vec<_>>>()?;
            if seqs.iter().any(|s| s.len() < 2) {
                return Err(short("choice"));
            }
            let min = seqs.iter().map(Vec::len).min().unwrap_or(0);
            let prefix = common_prefix(&seqs).min(min - 1);
            let n_ctx = tok.encode(context, true)?.len().max(1);
            Ok(Prepared {
                lcpp: seqs.iter().map(|s| prefix.max(1)..s.len()).collect(),
                lmeval: seqs.iter().map(|s| n_ctx.min(s.len())..s.len()).collect(),
                bytes: choices.iter().map(|c| delimiter.len() + c.len()).collect(),
                seqs,
                prefix,
            })
        }
        TaskKind::Partial {
            first,
            options,
            second,
        } => {
            let seqs = options
                .iter()
                .map(|o| tok.encode(&format!("{first}{o}{second}"), true))
                .collect::<Result<Vec<_>>>()?;
            if seqs.iter().any(|s| s.len() < 2) {
                return Err(short("sentence"));
            }
            let min = seqs.iter().map(Vec::len).min().unwrap_or(0);
            let prefix = common_prefix(&seqs).min(min - 1);
            let bases = options
                .iter()
                .map(|o| Ok(tok.encode(&format!("{first}{o}"), true)?.len()))
                .collect::<Result<Vec<usize>>>()?;
            let skip = seqs.iter().all(|s| s.len() - prefix > MIN_TRAILING);
            let lcpp = seqs
                .iter()
                .zip(&bases)
                .map(|(s, &b)| {
                    let base = if skip { b.min(s.len() - 1) } else { prefix }.max(1);
                    // llama.cpp leaves the last token out when more than one is scored.
                    let last = usize::from(s.len() - base > 1);
                    base..s.len() - last
                })
                .collect();
            Ok(Prepared {
                lmeval: seqs
                    .iter()
                    .zip(&bases)
                    .map(|(s, &b)| b.clamp(1, s.len())..s.len())
                    .collect(),
                lcpp,
                bytes: vec![second.len(); seqs.len()],
                seqs,
                prefix,
            })
        }
    }
}

/// Where a task sits in the packed rows.
#[derive(Debug, Clone)]
struct Placed {
    row: usize,
    /// Row offset of the shared prefix.
    start: usize,
    /// Row offset of each choice's own tokens.
    branch: Vec<usize>,
}

impl Placed {
    /// Row position whose logits predict target token `k` of choice `s`.
    fn position(&self, p: &Prepared, s: usize, k: usize) -> usize {
        let at = k - 1;
        if at < p.prefix {
            self.start + at
        } else {
            self.branch[s] + at - p.prefix
        }
    }
}

/// Packs tasks into rows of at most `cap` tokens (longer tasks get a row of their own), each
/// row padded to the longest row's length with tokens that see only each other. Tasks go in
/// first-fit decreasing order (longest first, each into the first row with room), which fills
/// rows to within a few percent where file order left a fifth of every row as padding
/// (SmolLM2, 1,000 HellaSwag tasks, 512-token rows: 202,867 → 166,400 tokens run for 164,210
/// tokens of tasks). A task's scores do not depend on where it is packed.
fn pack(ps: &[Prepared], cap: usize) -> (Vec<Vec<u32>>, Vec<Packing>, Vec<Placed>) {
    let mut order: Vec<usize> = (0..ps.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(ps[i].packed_len()), i));
    let mut rows: Vec<Vec<u32>> = Vec::new();
    let mut packs: Vec<Packing> = Vec::new();
    let mut placed: Vec<Option<Placed>> = vec![None; ps.len()];
    for ti in order {
        let p = &ps[ti];
        let need = p.packed_len();
        let r = match rows.iter().position(|row| row.len() + need <= cap) {
            Some(r) => r,
            None => {
                rows.push(Vec::new());
                packs.push(Packing::default());
                rows.len() - 1
            }
        };
        let (row, pk) = (&mut rows[r], &mut packs[r]);
        let id = ti as u32;
        let start = row.len();
        for (k, &tk) in p.seqs[0][..p.prefix].iter().enumerate() {
            row.push(tk);
            pk.pos.push(k as u32);
            pk.seg.push((id, 0));
        }
        let mut branch = Vec::with_capacity(p.seqs.len());
        for (s, seq) in p.seqs.iter().enumerate() {
            branch.push(row.len());
            for (k, &tk) in seq.iter().enumerate().take(seq.len() - 1).skip(p.prefix) {
                row.push(tk);
                pk.pos.push(k as u32);
                pk.seg.push((id, s as u32 + 1));
            }
        }
        placed[ti] = Some(Placed {
            row: r,
            start,
            branch,
        });
    }
    let placed: Vec<Placed> = placed.into_iter().flatten().collect();
    let t = rows.iter().map(Vec::len).max().unwrap_or(0);
    for (row, pk) in rows.iter_mut().zip(packs.iter_mut()) {
        let pad = row.first().copied().unwrap_or(0);
        while row.len() < t {
            row.push(pad);
            pk.pos.push(0);
            pk.seg.push((u32::MAX, 0));
        }
    }
    (rows, packs, placed)
}

/// One model's log-probs of every scored target of every task, per choice: `(lcpp targets,
/// lm-eval targets)`, each in target order.
type Logprobs = Vec<Vec<(Vec<f64>, Vec<f64>)>>;

/// How a task run is laid out.
#[derive(Debug, Clone, Copy)]
pub struct RunPlan {
    pub dtype: DType,
    /// Tokens per packed row.
    pub row_tokens: usize,
    /// Rows per batched forward.
    pub batch: usize,
    /// Packed tokens whose hidden states one pass holds.
    pub pass_tokens: usize,
}

impl RunPlan {
    /// A plan for a model of `hidden` width: 512-token rows, about 2,048 tokens per forward, and
    /// passes of at most 256 MiB of f32 hidden states.
    pub fn for_model(dtype: DType, hidden: usize) -> Self {
        RunPlan {
            dtype,
            row_tokens: 512,
            batch: 4,
            pass_tokens: ((256usize << 20) / (4 * hidden.max(1))).max(512),
        }
    }
}

/// Runs `src` over the packed tasks and returns the scored log-probs; `progress(tasks)` as
/// each pass's blocks complete (fractions of a pass's tasks).
fn logprobs(
    src: &dyn Source,
    opts: LoadOptions,
    device: &candle_core::Device,
    ps: &[Prepared],
    plan: RunPlan,
    progress: &dyn Fn(f64),
) -> Result<Logprobs> {
    let mut out: Logprobs = Vec::with_capacity(ps.len());
    let layers = src.config().num_hidden_layers.max(1);
    // Passes of whole tasks within the hidden-state budget.
    let mut i = 0;
    while i < ps.len() {
        let mut j = i;
        let mut tokens = 0;
        while j < ps.len() && (j == i || tokens + ps[j].packed_len() <= plan.pass_tokens) {
            tokens += ps[j].packed_len();
            j += 1;
        }
        let pass = &ps[i..j];
        let (rows, packs, placed) = pack(pass, plan.row_tokens);
        let refs: Vec<&[u32]> = rows.iter().map(Vec::as_slice).collect();
        let mut s = Streamed::packed(src, plan.dtype, device, opts, &refs, &packs, plan.batch)?;
        let mut done = 0;
        while !s.done() {
            s.step(None)?;
            done += 1;
            progress(pass.len() as f64 / layers as f64);
        }
        debug_assert_eq!(done, layers);
        let head = s.head()?;
        // Row index → (group, index in group).
        let mut at = Vec::with_capacity(rows.len());
        for (g, x) in s.groups.iter().enumerate() {
            for k in 0..x.dim(0)? {
                at.push((g, k));
            }
        }
        // Per row, each scored position and the target tokens read there (collected once, so
        // reading the log-probs back is a lookup).
        let mut want: Vec<std::collections::BTreeMap<u32, Vec<u32>>> =
            vec![Default::default(); rows.len()];
        for (p, pl) in pass.iter().zip(&placed) {
            for s_ in 0..p.seqs.len() {
                for k in p.lcpp[s_].clone().chain(p.lmeval[s_].clone()) {
                    let toks = want[pl.row]
                        .entry(pl.position(p, s_, k) as u32)
                        .or_default();
                    if !toks.contains(&p.seqs[s_][k]) {
                        toks.push(p.seqs[s_][k]);
                    }
                }
            }
        }
        let mut rowlp: Vec<std::collections::HashMap<(u32, u32), f64>> =
            Vec::with_capacity(rows.len());
        for (r, w) in want.iter().enumerate() {
            let positions: Vec<u32> = w.keys().copied().collect();
            let mut m = std::collections::HashMap::new();
            for piece in positions.chunks(256) {
                let (g, k) = at[r];
                let l = s.logits_at(&head, g, k, piece)?.to_vec2::<f32>()?;
                // Only a few tokens per position are read: each row's log-sum-exp, then those
                // entries (what a whole log-softmax row would hold there, bit for bit).
                let lse: Vec<f64> = l.par_iter().map(|row| log_sum_exp(row)).collect();
                for ((&pos, row), lse) in piece.iter().zip(&l).zip(lse) {
                    for &tok in &w[&pos] {
                        m.insert((pos, tok), row[tok as usize] as f64 - lse);
                    }
                }
            }
            rowlp.push(m);
        }
        for (p, pl) in pass.iter().zip(&placed) {
            let m = &rowlp[pl.row];
            let get = |s_: usize, k: usize| m[&(pl.position(p, s_, k) as u32, p.seqs[s_][k])];
            out.push(
                (0..p.seqs.len())
                    .map(|s_| {
                        (
                            p.lcpp[s_].clone().map(|k| get(s_, k)).collect(),
                            p.lmeval[s_].clone().map(|k| get(s_, k)).collect(),
                        )
                    })
                    .collect(),
            );
        }
        i = j;
    }
    Ok(out)
}

/// Index of the largest value, the first on ties.
fn first_max(v: &[f64]) -> usize {
    let mut b = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[b] {
            b = i;
        }
    }
    b
}

/// One model's result on one task.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskScore {
    /// Mean log-prob of each choice's scored tokens (llama.cpp's convention).
    pub mean_logprob: Vec<f64>,
    pub pick: usize,
    /// lm-eval: summed log-prob of each continuation.
    pub sum_logprob: Vec<f64>,
    pub acc_pick: usize,
    pub acc_norm_pick: usize,
}

fn score_task(p: &Prepared, lp: &[(Vec<f64>, Vec<f64>)]) -> TaskScore {
    let mean: Vec<f64> = lp
        .iter()
        .map(|(a, _)| a.iter().sum::<f64>() / a.len().max(1) as f64)
        .collect();
    let sum: Vec<f64> = lp.iter().map(|(_, b)| b.iter().sum::<f64>()).collect();
    let norm: Vec<f64> = sum
        .iter()
        .zip(&p.bytes)
        .map(|(s, &b)| s / b.max(1) as f64)
        .collect();
    TaskScore {
        pick: first_max(&mean),
        acc_pick: first_max(&sum),
        acc_norm_pick: first_max(&norm),
        mean_logprob: mean,
        sum_logprob: sum,
    }
}

/// A model's accuracies over the tasks.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Accuracy {
    /// llama.cpp's score (mean log-prob pick), percent.
    pub acc: f64,
    /// llama.cpp's Wilson 95 % interval, percent.
    pub wilson95: [f64; 2],
    /// lm-eval acc (summed log-prob), percent.
    pub lmeval_acc: f64,
    /// lm-eval acc_norm (summed ÷ continuation bytes), percent.
    pub lmeval_acc_norm: f64,
}

fn accuracy(gold: &[usize], s: &[TaskScore]) -> Accuracy {
    let n = gold.len().max(1) as f64;
    let right =
        |f: &dyn Fn(&TaskScore) -> usize| gold.iter().zip(s).filter(|(g, t)| f(t) == **g).count();
    let k = right(&|t| t.pick);
    let w = stats::wilson(k, gold.len());
    Accuracy {
        acc: 100.0 * k as f64 / n,
        wilson95: [100.0 * w.0, 100.0 * w.1],
        lmeval_acc: 100.0 * right(&|t| t.acc_pick) as f64 / n,
        lmeval_acc_norm: 100.0 * right(&|t| t.acc_norm_pick) as f64 / n,
    }
}

/// Candidate against reference on the same tasks (llama.cpp's convention).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Paired {
    /// Candidate accuracy ÷ reference accuracy, percent (absent when the reference gets none
    /// right).
    pub recovery: Option<f64>,
    /// Tasks where both pick the same choice, percent.
    pub same_choice: f64,
    /// Tasks only the candidate gets right, and only the reference.
    pub candidate_only: usize,
    pub reference_only: usize,
    /// Exact two-sided McNemar p-value of the difference.
    pub mcnemar_p: f64,
}

/// One task in the report.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskRecord {
    pub line: usize,
    pub gold: usize,
    /// Common-prefix tokens and each choice's token count.
    pub prefix: usize,
    pub tokens: Vec<usize>,
    pub candidate: TaskScore,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reference: Option<TaskScore>,
}

/// The whole task measurement.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskReport {
    pub suite: Suite,
    pub file: String,
    pub file_sha256: String,
    /// Tasks in the file, and how many were scored (`draw`: llama-perplexity's mt19937(1) draw).
    pub file_tasks: usize,
    pub tasks: usize,
    pub subset: String,
    pub candidate: Accuracy,
    pub reference: Option<Accuracy>,
    pub paired: Option<Paired>,
    /// Tokens run per model (packed: each prefix once) and the wall time of the scoring.
    pub packed_tokens: usize,
    pub eval_s: f64,
    pub tasks_per_s: f64,
    pub per_task: Vec<TaskRecord>,
}

/// What [`run`] scores.
pub struct TaskInputs<'a> {
    pub suite: Suite,
    pub path: &'a Path,
    pub limit: Option<usize>,
    pub candidate: &'a dyn Source,
    pub candidate_opts: LoadOptions,
    pub reference: Option<&'a dyn Source>,
    /// Instead of running a reference model: its scores from an earlier report (`--reference
    /// REPORT.json`), with the report's path for messages.
    pub reference_scores: Option<(&'a Path, &'a TaskReport)>,
    pub tokenizer: &'a Tokenizer,
    pub device: &'a candle_core::Device,
    pub plan: RunPlan,
}

/// Reads, tokenizes and scores the tasks with the candidate (and the reference).
pub fn run(i: &TaskInputs<'_>) -> Result<TaskReport> {
    let all = i.suite.read(i.path)?;
    let file_tasks = all.len();
    let tasks = select(all, i.limit);
    let prepared = tasks
        .iter()
        .map(|t| prepare(i.tokenizer, t, i.path))
        .collect::<Result<Vec<_>>>()?;
    let file_sha256 = crate::model::checkpoint::sha256_file(i.path)?;
    let saved = i
        .reference_scores
        .map(|(rp, r)| saved_scores(rp, r, i.suite, &file_sha256, &tasks, &prepared))
        .transpose()?;
    let models = if i.reference.is_some() { 2 } else { 1 };
    let pb = crate::progress::bar(
        (tasks.len() * models) as u64,
        i.suite.name(),
        crate::progress::Unit::Items("tasks"),
    );
    let done = std::sync::Mutex::new(0f64);
    let tick = |x: f64| {
        if let Ok(mut d) = done.lock() {
            *d += x;
            pb.set_position(*d as u64);
        }
    };
    let t0 = std::time::Instant::now();
    let cand = logprobs(
        i.candidate,
        i.candidate_opts,
        i.device,
        &prepared,
        i.plan,
        &tick,
    )?;
    let reference = i
        .reference
        .map(|r| {
            logprobs(
                r,
                LoadOptions::default(),
                i.device,
                &prepared,
                i.plan,
                &tick,
            )
        })
        .transpose()?;
    pb.finish_and_clear();
    let eval_s = t0.elapsed().as_secs_f64();
    let cs: Vec<TaskScore> = prepared
        .iter()
        .zip(&cand)
        .map(|(p, l)| score_task(p, l))
        .collect();
    let rs: Option<Vec<TaskScore>> = reference
        .as_ref()
        .map(|r| {
            prepared
                .iter()
                .zip(r)
                .map(|(p, l)| score_task(p, l))
                .collect()
        })
        .or(saved);
    let gold: Vec<usize> = tasks.iter().map(|t| t.gold).collect();
    let ca = accuracy(&gold, &cs);
    let ra = rs.as_ref().map(|r| accuracy(&gold, r));
    let paired = rs.as_ref().zip(ra.as_ref()).map(|(r, a)| {
        let n = gold.len().max(1) as f64;
        let same = cs.iter().zip(r).filter(|(c, r)| c.pick == r.pick).count();
        let (mut b, mut c) = (0, 0);
        for ((cc, rr), &g) in cs.iter().zip(r).zip(&gold) {
            match (cc.pick == g, rr.pick == g) {
                (true, false) => b += 1,
                (false, true) => c += 1,
                _ => {}
            }
        }
        Paired {
            recovery: (a.acc > 0.0).then(|| 100.0 * ca.acc / a.acc),
            same_choice: 100.0 * same as f64 / n,
            candidate_only: b,
            reference_only: c,
            mcnemar_p: stats::mcnemar_exact(b, c),
        }
    });
    let per_task = tasks
        .iter()
        .zip(&prepared)
        .enumerate()
        .map(|(k, (t, p))| TaskRecord {
            line: t.line,
            gold: t.gold,
            prefix: p.prefix,
            tokens: p.seqs.iter().map(Vec::len).collect(),
            candidate: cs[k].clone(),
            reference: rs.as_ref().map(|r| r[k].clone()),
        })
        .collect();
    Ok(TaskReport {
        suite: i.suite,
        file: i.path.display().to_string(),
        file_sha256,
        file_tasks,
        subset: if tasks.len() < file_tasks {
            format!(
                "{} of {} in llama-perplexity's draw (mt19937 seed 1)",
                tasks.len(),
                file_tasks
            )
        } else {
            "all".into()
        },
        tasks: tasks.len(),
        candidate: ca,
        reference: ra,
        paired,
        packed_tokens: prepared.iter().map(Prepared::packed_len).sum(),
        eval_s,
        tasks_per_s: (tasks.len() * models) as f64 / eval_s.max(1e-9),
        per_task,
    })
}

/// A reference's scores from an earlier report, checked to be of the same tasks, tokenized the
/// same way: same suite, file (sha256) and subset, and per task the same line, gold, common
/// prefix and choice lengths.
fn saved_scores(
    report: &Path,
    r: &TaskReport,
    suite: Suite,
    sha: &str,
    tasks: &[Task],
    prepared: &[Prepared],
) -> Result<Vec<TaskScore>> {
    let differs = |what: &str, saved: String, now: String| {
        Err(Error::Invalid(format!(
            "{}: the saved reference scores are of other tasks ({what}: the report has {saved}, this run {now}); re-run the reference on this file, or give the reference model",
            report.display()
        )))
    };
    if r.suite != suite {
        return differs("suite", r.suite.name().into(), suite.name().into());
    }
    if r.file_sha256 != sha {
        return differs("task file sha256", r.file_sha256.clone(), sha.into());
    }
    if r.per_task.len() != tasks.len() {
        return differs(
            "tasks",
            r.per_task.len().to_string(),
            tasks.len().to_string(),
        );
    }
    for (k, ((rec, t), p)) in r.per_task.iter().zip(tasks).zip(prepared).enumerate() {
        let lens: Vec<usize> = p.seqs.iter().map(Vec::len).collect();
        if (rec.line, rec.gold, rec.prefix, &rec.tokens) != (t.line, t.gold, p.prefix, &lens) {
            return differs(
                &format!("task {k}"),
                format!(
                    "line {} gold {} prefix {} tokens {:?}",
                    rec.line, rec.gold, rec.prefix, rec.tokens
                ),
                format!(
                    "line {} gold {} prefix {} tokens {:?}",
                    t.line, t.gold, p.prefix, lens
                ),
            );
        }
    }
    Ok(r.per_task.iter().map(|t| t.candidate.clone()).collect())
}

/// `x %`, or `n/a`.
pub fn percent(x: Option<f64>) -> String {
    x.map_or("n/a".into(), |v| format!("{v:.2} %"))
}

/// The report's table.
pub fn table(r: &TaskReport) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} {}: {} tasks ({}), {:.1} tasks/s",
        r.suite.name(),
        r.file,
        r.tasks,
        r.subset,
        r.tasks_per_s
    );
    let _ = writeln!(
        s,
        "{:<10} {:>8} {:>20} {:>11} {:>15}",
        "model", "acc %", "95 % (Wilson)", "lm-eval acc", "lm-eval acc_norm"
    );
    let row = |s: &mut String, name: &str, a: &Accuracy| {
        let _ = writeln!(
            s,
            "{:<10} {:>8.2} {:>20} {:>11.2} {:>15.2}",
            name,
            a.acc,
            format!("[{:.2}, {:.2}]", a.wilson95[0], a.wilson95[1]),
            a.lmeval_acc,
            a.lmeval_acc_norm
        );
    };
    row(&mut s, "candidate", &r.candidate);
    if let Some(a) = &r.reference {
        row(&mut s, "reference", a);
    }
    if let Some(p) = &r.paired {
        let _ = writeln!(
            s,
            "recovery {}, same choice {:.2} %, right only in candidate {} / only in reference {}, McNemar exact p = {:.4}",
            percent(p.recovery),
            p.same_choice, p.candidate_only, p.reference_only, p.mcnemar_p
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prep(seqs: Vec<Vec<u32>>, prefix: usize) -> Prepared {
        Prepared {
            lcpp: seqs.iter().map(|s| prefix..s.len()).collect(),
            lmeval: seqs.iter().map(|s| prefix..s.len()).collect(),
            bytes: vec![1; seqs.len()],
            seqs,
            prefix,
        }
    }

    /// Packing puts each prefix once, each branch after it, positions continuing the prefix,
    /// and a scored target's position is the token before it in its own sequence.
    #[test]
    fn packing_layout() {
        let a = prep(
            vec![vec![1, 2, 3, 4], vec![1, 2, 5], vec![1, 2, 6, 7, 8]],
            2,
        );
        let b = prep(vec![vec![9, 8], vec![9, 7]], 1);
        let (rows, packs, placed) = pack(&[a.clone(), b.clone()], 64);
        assert_eq!(rows.len(), 1);
        // Each choice's last token is not run.
        assert_eq!(rows[0], [1, 2, 3, 6, 7, 9]);
        assert_eq!(packs[0].pos, [0, 1, 2, 2, 3, 0]);
        assert_eq!(
            packs[0].seg,
            [(0, 0), (0, 0), (0, 1), (0, 3), (0, 3), (1, 0)]
        );
        // Choice 2 of task 0: target 2 (token 6) is predicted at the prefix's last position,
        // target 4 (token 8) at the row position of token 7.
        assert_eq!(placed[0].position(&a, 2, 2), 1);
        assert_eq!(placed[0].position(&a, 2, 4), 4);
        assert_eq!(placed[1].position(&b, 1, 1), 5);
        // Longest first, whatever the file order; `placed` stays in file order.
        let (rows2, _, placed2) = pack(&[b.clone(), a.clone()], 64);
        assert_eq!(rows2[0], rows[0]);
        assert_eq!((placed2[0].start, placed2[1].start), (5, 0));
        // A smaller row capacity starts a new row; rows are padded to one length.
        let (rows, packs, _) = pack(&[a, b], 5);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1].len(), 5);
        assert_eq!(packs[1].seg[3], (u32::MAX, 0));
    }
}
