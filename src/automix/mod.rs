//! `--to gguf:auto`: each tensor's GGUF type chosen to minimise the model's KL-divergence
//! against bf16 under a byte budget, from costs measured with the runner, written, and checked
//! on calibration chunks the choice never saw (formats/auto-mix.md).
//!
//! The calibration chunks are split: the last `holdout` are held back; the rest (the choice
//! chunks) make the importance matrix, and the first `probe` of them are where
//! [`sensitivity::measure`] measures each tensor's cost. [`allocate::allocate`] picks the types;
//! the export pipeline writes the file with them and the importance matrix; the written file and
//! the uniform mixes of nearby size are then scored against the bf16 model on the held-back
//! chunks.

pub mod allocate;
pub mod packed;
pub mod sensitivity;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::export::gguf::{planned, GgufOptions, TensorPlan};
use crate::export::{ExportOptions, Target};
use crate::format::gguf::GgmlType;
use crate::model::Checkpoint;
use crate::quant::recipe::{Mix, Recipe};
use crate::verify::ppl::{Divergence, Perplexity};

/// GGUF data is aligned to this many bytes per tensor (the writer's default alignment).
const ALIGN: u64 = 32;

fn aligned(n: u64) -> u64 {
    n.div_ceil(ALIGN) * ALIGN
}

/// How big the file may be.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    /// Bits per weight: 8 × tensor-data bytes ÷ parameters, every tensor counted (embedding,
    /// head and norms included).
    Bpw(f64),
    /// Bytes of the whole file.
    Size(u64),
}

/// Which uniform mixes the result is compared with.
#[derive(Debug, Clone, PartialEq)]
pub enum Compare {
    /// The largest quantized mix no bigger than the result and the smallest bigger one.
    Nearby,
    None,
    Mixes(Vec<Mix>),
    /// Uniform `w4a16:auto` kinds (every layer the same).
    Kinds(Vec<crate::scheme::LayerQuant>),
}

/// Everything `gguf:auto` needs besides the checkpoint.
#[derive(Debug, Clone)]
pub struct AutoOptions {
    /// `None` with a recipe.
    pub budget: Option<Budget>,
    /// `--recipe FILE`: types from a file (llama-quantize's `--tensor-type-file` layout) instead
    /// of a measurement.
    pub recipe: Option<PathBuf>,
    /// Choice chunks the KL-divergences are measured on.
    pub probe: usize,
    /// Calibration chunks held back for the check.
    pub holdout: usize,
    /// Rows per tensor quantized for the error tables.
    pub sample_rows: usize,
    pub compare: Compare,
    /// Output path (`--out`), calibration text and chunking, GGUF settings.
    pub export: ExportOptions,
}

/// One scored file on the held-back chunks.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Scored {
    pub name: String,
    pub bytes: u64,
    pub bpw: f64,
    /// Sum of the tensors' predicted costs (the chosen mix only).
    pub predicted_kld: Option<f64>,
    pub divergence: Divergence,
    pub ppl: Perplexity,
}

/// What `gguf:auto` did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AutoReport {
    pub path: PathBuf,
    pub recipe_file: PathBuf,
    pub imatrix_file: PathBuf,
    pub bytes: u64,
    pub bpw: f64,
    pub budget_bytes: Option<u64>,
    /// Type → tensor count.
    pub types: BTreeMap<String, usize>,
    pub choice_s: f64,
    pub write_s: f64,
    pub check_s: f64,
    /// The chosen file first, then the compared mixes by size.
    pub scored: Vec<Scored>,
    pub holdout_chunks: usize,
    pub positions: usize,
}

/// `FILE.gguf` → `FILE.gguf.<suffix>`.
fn beside(p: &Path, suffix: &str) -> PathBuf {
    let mut n = p.file_name().unwrap_or_default().to_os_string();
    n.push(suffix);
    p.with_file_name(n)
}

/// Where the recipe of `out` is written.
pub fn recipe_path(out: &Path) -> PathBuf {
    beside(out, ".recipe.txt")
}

/// Where the importance matrix of `out` is written.
pub fn imatrix_path(out: &Path) -> PathBuf {
    beside(out, ".imatrix")
}

/// The recipe as llama-quantize's `--tensor-type-file` reads it: one `PATTERN=TYPE` per line,
/// each pattern the tensor's name anchored and escaped.
pub fn recipe_text(types: &BTreeMap<String, GgmlType>, order: &[String]) -> String {
    let mut s = String::new();
    for name in order {
        if let Some(t) = types.get(name) {
            s.push_str(&format!(
                "^{}$={}\n",
                regex::escape(name),
                t.name().to_ascii_lowercase()
            ));
        }
    }
    s
}

/// The `PATTERN=VALUE` entries (whitespace-separated) of recipe file `path`, in order; `what`
/// names the value in errors.
pub(crate) fn read_rules<T>(
    path: &Path,
    what: &str,
    parse: impl Fn(&str) -> std::result::Result<T, String>,
) -> Result<Vec<(regex::Regex, T)>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut rules = Vec::new();
    for (i, line) in text.lines().enumerate() {
        for tok in line.split_whitespace() {
            let at = |m: String| Error::format(path, format!("line {}: {m}", i + 1));
            let (pat, v) = tok
                .rsplit_once('=')
                .ok_or_else(|| at(format!("`{tok}` is not PATTERN={what}")))?;
            let v = parse(v).map_err(at)?;
            let re = regex::Regex::new(pat).map_err(|e| at(format!("pattern `{pat}`: {e}")))?;
            rules.push((re, v));
        }
    }
    if rules.is_empty() {
        return Err(Error::format(path, format!("no PATTERN={what} entries")));
    }
    Ok(rules)
}

/// Reads a recipe file (whitespace-separated `PATTERN=TYPE` entries) and resolves it against
/// the tensors of `plan` as llama-quantize does: the first pattern found in a name wins.
/// Tensors no pattern names keep the plan's type.
pub fn read_recipe(path: &Path, plan: &[TensorPlan]) -> Result<BTreeMap<String, GgmlType>> {
    let rules = read_rules(path, "TYPE", |s| s.parse::<GgmlType>())?;
    let mut out = BTreeMap::new();
    for t in plan {
        if t.dims.len() < 2 {
            continue;
        }
        if let Some((_, ty)) = rules.iter().find(|(re, _)| re.is_match(&t.name)) {
            let ne0 = t.dims[0] as usize;
            if !ne0.is_multiple_of(ty.block_size()) {
                return Err(Error::format(
                    path,
                    format!(
                        "tensor `{}` has rows of {ne0} values, which {} (blocks of {}) cannot hold",
                        t.name,
                        ty.name(),
                        ty.block_size()
                    ),
                ));
            }
            out.insert(t.name.clone(), *ty);
        }
    }
    Ok(out)
}

/// Parameters of a plan (every tensor's elements).
fn parameters(plan: &[TensorPlan]) -> u64 {
    plan.iter().map(|t| t.dims.iter().product::<u64>()).sum()
}

/// Tensor data bytes of a plan, each tensor padded to the alignment.
fn data_bytes(plan: &[TensorPlan]) -> u64 {
    plan.iter()
        .map(|t| {
            let ne0 = t.dims[0] as usize;
            let rows = (t.dims.iter().product::<u64>() / t.dims[0]) as usize;
            aligned(t.ty.nbytes(ne0, rows).unwrap_or(0) as u64)
        })
        .sum()
}

/// GGUF options for mix `mix` with exact types `exact`, quantized with `imatrix`.
fn gguf_options(
    o: &ExportOptions,
    mix: Mix,
    exact: BTreeMap<String, GgmlType>,
    imatrix: Option<&crate::export::gguf::ImatrixUse>,
) -> GgufOptions {
    GgufOptions {
        recipe: Recipe {
            mix,
            overrides: vec![],
            output_type: None,
            embedding_type: None,
            imatrix: imatrix.is_some(),
            exact,
        },
        search: o.gguf.search,
        imatrix: imatrix.cloned(),
        pre: o.gguf.pre.clone(),
    }
}

/// The quantized mixes (`q8_0` … `q3_k_m`) with their file sizes under `imatrix`.
pub fn mix_sizes(
    ck: &Checkpoint,
    o: &ExportOptions,
    imatrix: Option<&crate::export::gguf::ImatrixUse>,
) -> Result<Vec<(Mix, u64)>> {
    let mut v = Vec::new();
    for m in Mix::ALL.into_iter().filter(|m| !m.is_float()) {
        let (size, _) = planned(ck, &gguf_options(o, m, BTreeMap::new(), imatrix))?;
        v.push((m, size));
    }
    v.sort_by_key(|&(_, s)| s);
    Ok(v)
}

/// What a budget is counted on: the file's header bytes (they do not depend on the types),
/// its parameters, and its tensors in file order.
#[derive(Debug, Clone)]
pub struct Layout {
    pub header: u64,
    pub params: u64,
    pub plan: Vec<TensorPlan>,
}

impl Layout {
    /// The GGUF layout of `ck` under the GGUF settings of `o`.
    pub fn of(ck: &Checkpoint, o: &ExportOptions) -> Result<Self> {
        let (size, plan) = planned(ck, &gguf_options(o, Mix::Q8_0, BTreeMap::new(), None))?;
        Ok(Layout {
            header: size - data_bytes(&plan),
            params: parameters(&plan),
            plan,
        })
    }

    /// Bits per weight of a file of `bytes`.
    pub fn bpw(&self, bytes: u64) -> f64 {
        8.0 * bytes.saturating_sub(self.header) as f64 / self.params as f64
    }

    /// Refuses a budget no choice of candidate types meets (before anything is measured).
    pub fn check(&self, budget: Budget) -> Result<()> {
        let mut fixed = self.header;
        let mut opts = Vec::new();
        for t in &self.plan {
            let ne0 = t.dims[0] as usize;
            let rows = (t.dims.iter().product::<u64>() / t.dims[0]) as usize;
            if t.dims.len() < 2 {
                fixed += aligned(GgmlType::F32.nbytes(ne0, rows).unwrap_or(0) as u64);
                continue;
            }
            opts.push(
                sensitivity::candidates(ne0)
                    .into_iter()
                    .map(|ty| allocate::Choice {
                        bytes: aligned(ty.nbytes(ne0, rows).unwrap_or(0) as u64),
                        kld: 0.0,
                    })
                    .collect::<Vec<_>>(),
            );
        }
        let r = allocate::range(&opts, fixed);
        let want = budget_of(budget, self.header, self.params);
        if want < r.min || want > r.max {
            return Err(infeasible(budget, r, self.header, self.params));
        }
        Ok(())
    }

    /// The types of `m`'s tensors with the smallest predicted cost within `budget`.
    pub fn choose(
        &self,
        m: &sensitivity::Measured,
        budget: Budget,
    ) -> Result<BTreeMap<String, GgmlType>> {
        choose(m, &self.plan, self.header, self.params, budget)
    }
}

/// Writes `ck` as GGUF `out` with the exact `types` (the rest as mix `label` gives them) and
/// the importance matrix in `imatrix`; returns the file's length.
pub fn write_gguf(
    ck: &Checkpoint,
    o: &ExportOptions,
    label: Mix,
    types: &BTreeMap<String, GgmlType>,
    imatrix: &Path,
    out: &Path,
    device: &candle_core::Device,
) -> Result<u64> {
    let mut eo = o.clone();
    eo.targets = vec![Target::Gguf(label)];
    eo.out = out.to_owned();
    eo.gguf.tensor_types = types.clone();
    eo.gguf.imatrix = Some(imatrix.to_owned());
    eo.gguf.overrides.clear();
    eo.calib_asked = false;
    crate::export::run(ck, &eo, device, &|_, _| ())?;
    Ok(std::fs::metadata(out).map_err(|e| Error::io(out, e))?.len())
}

/// The calibration chunks of a run, split: the choice chunks first, the held-back ones last;
/// and the first scored position of a chunk.
pub(crate) struct Chunks {
    pub all: Vec<Vec<u32>>,
    pub choice_len: usize,
    pub first: usize,
    /// The calibration text's label.
    pub label: String,
}

impl Chunks {
    pub fn choice(&self) -> &[Vec<u32>] {
        &self.all[..self.choice_len]
    }
    pub fn held(&self) -> &[Vec<u32>] {
        &self.all[self.choice_len..]
    }
}

/// Refuses an output in the way, then tokenizes and splits the calibration for `what`
/// (`gguf:auto`, `w4a16:auto`).
fn prepare(ck: &Checkpoint, a: &AutoOptions, what: &str) -> Result<Chunks> {
    let o = &a.export;
    if o.out.exists() && !o.force {
        return Err(Error::Invalid(format!(
            "{} exists (use --force to replace it)",
            o.out.display()
        )));
    }
    let tok = crate::model::Tokenizer::load(&ck.dir)?;
    let text = crate::calib::dataset::load_source(o.calib.calib.as_deref())?;
    let all = crate::calib::dataset::calibration_chunks(&tok, &text, &o.calib.spec)?;
    let need = a.holdout + if a.recipe.is_some() { 1 } else { a.probe };
    if all.len() < need || a.holdout == 0 {
        return Err(Error::Invalid(format!(
            "{what} needs at least {need} calibration chunks ({} held back for the check, {} to measure on) and at least one held back; the calibration gives {} (raise --calib-samples or lower --auto-holdout / --auto-probe)",
            a.holdout,
            need - a.holdout,
            all.len()
        )));
    }
    Ok(Chunks {
        choice_len: all.len() - a.holdout,
        all,
        first: o.calib.spec.seq_len / 2,
        label: text.label,
    })
}

/// The sensitivity pass over the choice chunks, with a progress bar over the blocks.
fn measure_costs(
    ck: &Checkpoint,
    a: &AutoOptions,
    c: &Chunks,
    device: &candle_core::Device,
    note: &dyn Fn(&str),
    moments: Option<sensitivity::MomentsHook<'_>>,
) -> Result<sensitivity::Measured> {
    note(&format!(
        "measuring each tensor's cost: {} × {}-token chunks (importance from {}), {} held back",
        a.probe,
        a.export.calib.spec.seq_len,
        c.choice_len,
        c.held().len()
    ));
    let pb = crate::progress::bar(
        ck.config.num_hidden_layers as u64,
        "sensitivity",
        crate::progress::Unit::Items("blocks"),
    );
    let m = sensitivity::measure_with(
        ck,
        &sensitivity::ProbeOptions {
            chunks: c.choice(),
            probe: a.probe,
            first: c.first,
            sample_rows: a.sample_rows,
            search: a.export.gguf.search,
        },
        device,
        &|d, t| {
            pb.set_length(t);
            pb.set_position(d);
        },
        moments,
    )?;
    pb.finish_and_clear();
    Ok(m)
}

/// The held-back check's table (`head`: the first column's title).
fn check_table(
    head: &str,
    bits: &str,
    holdout: usize,
    positions: usize,
    scored: &[Scored],
) -> String {
    let mut s = format!(
        "held-back check: {holdout} chunks, {positions} positions, against bf16\n{head:<10} {:>12} {bits:>7} {:>12} {:>22} {:>8} {:>9}\n",
        "bytes", "predicted", "mean KLD ± se", "top-1 %", "PPL"
    );
    for x in scored {
        s.push_str(&format!(
            "{:<10} {:>12} {:>7.3} {:>12} {:>13.6} ± {:<7.6} {:>8.2} {:>9.4}\n",
            x.name,
            x.bytes,
            x.bpw,
            x.predicted_kld.map_or("-".into(), |p| format!("{p:.6}")),
            x.divergence.mean_kld,
            x.divergence.mean_kld_stderr,
            x.divergence.top1_agreement_pct,
            x.ppl.ppl
        ));
    }
    s.trim_end().to_string()
}

/// Runs `gguf:auto` (see the module docs). `note` receives one-line progress messages.
pub fn run(
    ck: &Checkpoint,
    a: &AutoOptions,
    device: &candle_core::Device,
    note: &dyn Fn(&str),
) -> Result<AutoReport> {
    let o = &a.export;
    let out = o.out.clone();
    let t0 = std::time::Instant::now();
    let cs = prepare(ck, a, "gguf:auto")?;
    let (choice, held, first) = (cs.choice(), cs.held(), cs.first);
    let imatrix_file = imatrix_path(&out);
    let recipe_file = recipe_path(&out);

    // A plan of the file (any mix: the header does not depend on the types).
    let lay = Layout::of(ck, o)?;
    let (header, params, plan0) = (lay.header, lay.params, &lay.plan);
    let order: Vec<String> = plan0.iter().map(|t| t.name.clone()).collect();

    let (types, measured, imatrix) = match &a.recipe {
        Some(path) => {
            let types = read_recipe(path, plan0)?;
            note(&format!(
                "recipe {}: {} tensor types; importance matrix from {} choice chunks",
                path.display(),
                types.len(),
                choice.len()
            ));
            let im = sensitivity::imatrix_of(ck, choice, device)?;
            (types, None, im)
        }
        None => {
            let budget = a.budget.ok_or_else(|| {
                Error::Invalid("gguf:auto needs --bpw BITS, --size BYTES or --recipe FILE".into())
            })?;
            lay.check(budget)?;
            let m = measure_costs(ck, a, &cs, device, note, None)?;
            let types = lay.choose(&m, budget)?;
            let im = m.imatrix.clone();
            (types, Some(m), im)
        }
    };
    let choice_s = t0.elapsed().as_secs_f64();

    // The importance matrix and recipe beside the file, then the file.
    let mut im = imatrix;
    im.datasets = vec![format!("{} (choice chunks)", cs.label)];
    im.write_gguf(&imatrix_file)?;
    std::fs::write(&recipe_file, recipe_text(&types, &order))
        .map_err(|e| Error::io(&recipe_file, e))?;
    let im_use = crate::export::gguf::ImatrixUse::read(&imatrix_file, &ck.config)?;
    let (size, plan) = planned(
        ck,
        &gguf_options(o, Mix::Q8_0, types.clone(), Some(&im_use)),
    )?;
    let sizes = mix_sizes(ck, o, Some(&im_use))?;
    // general.file_type: the mix nearest in size.
    let label = sizes
        .iter()
        .min_by_key(|&&(_, s)| s.abs_diff(size))
        .map_or(Mix::Q4KM, |&(m, _)| m);
    let t1 = std::time::Instant::now();
    note(&format!(
        "writing {} ({} bytes, {:.3} bits per weight)",
        out.display(),
        size,
        8.0 * data_bytes(&plan) as f64 / params as f64
    ));
    let bytes = write_gguf(ck, o, label, &types, &imatrix_file, &out, device)?;
    let write_s = t1.elapsed().as_secs_f64();

    // The check on the held-back chunks.
    let t2 = std::time::Instant::now();
    let mut compare: Vec<Mix> = match &a.compare {
        Compare::None => vec![],
        Compare::Mixes(v) => v.clone(),
        Compare::Kinds(_) => {
            return Err(Error::Invalid(
                "gguf:auto compares with GGUF mixes (q4_k_m, q4_0 …), not w4a16 kinds".into(),
            ))
        }
        Compare::Nearby => {
            let below = sizes
                .iter()
                .rev()
                .find(|&&(_, s)| s <= bytes)
                .map(|&(m, _)| m);
            let above = sizes.iter().find(|&&(_, s)| s > bytes).map(|&(m, _)| m);
            below.into_iter().chain(above).collect()
        }
    };
    compare.dedup();
    let predicted = measured.as_ref().map(|m| predicted_kld(m, &types));
    let mut scored = vec![score(
        ck, &out, held, first, device, "auto", predicted, params, header,
    )?];
    if !compare.is_empty() {
        let dir = out.with_file_name(format!(
            ".{}.compare.partial",
            out.file_name().unwrap_or_default().to_string_lossy()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let mut co = o.clone();
        co.targets = compare.iter().map(|&m| Target::Gguf(m)).collect();
        co.out = dir.clone();
        co.force = true;
        co.gguf.imatrix = Some(imatrix_file.clone());
        co.gguf.tensor_types.clear();
        co.calib_asked = false;
        note(&format!(
            "writing {} for comparison",
            compare
                .iter()
                .map(|m| m.name())
                .collect::<Vec<_>>()
                .join(", ")
        ));
        let r = crate::export::run(ck, &co, device, &|_, _| ());
        let scored_more = r.and_then(|r| {
            let mut v = Vec::new();
            for (t, art) in &r.artifacts {
                if let crate::export::Artifact::Gguf(g) = art {
                    v.push(score(
                        ck,
                        &g.path,
                        held,
                        first,
                        device,
                        t.name(),
                        None,
                        params,
                        header,
                    )?);
                }
            }
            Ok(v)
        });
        let _ = std::fs::remove_dir_all(&dir);
        let mut more = scored_more?;
        more.sort_by_key(|s| s.bytes);
        scored.extend(more);
    }
    let check_s = t2.elapsed().as_secs_f64();
    let mut counts = BTreeMap::new();
    for t in &plan {
        *counts
            .entry(t.ty.name().to_ascii_lowercase())
            .or_insert(0usize) += 1;
    }
    let budget_bytes = a.budget.map(|b| budget_of(b, header, params));
    let report = AutoReport {
        path: out.clone(),
        recipe_file,
        imatrix_file,
        bytes,
        bpw: 8.0 * (bytes - header) as f64 / params as f64,
        budget_bytes,
        types: counts,
        choice_s,
        write_s,
        check_s,
        positions: scored[0].divergence.positions,
        scored,
        holdout_chunks: held.len(),
    };
    record(&out, &report, measured.as_ref(), &types)?;
    Ok(report)
}

/// The file bytes a budget allows.
fn budget_of(b: Budget, header: u64, params: u64) -> u64 {
    match b {
        Budget::Size(s) => s,
        Budget::Bpw(bits) => header + (bits * params as f64 / 8.0).floor() as u64,
    }
}

/// The types that minimise the predicted cost within the budget.
fn choose(
    m: &sensitivity::Measured,
    plan: &[TensorPlan],
    header: u64,
    params: u64,
    budget: Budget,
) -> Result<BTreeMap<String, GgmlType>> {
    let by_name: BTreeMap<&str, &sensitivity::TensorSense> =
        m.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    // Tensors without candidates (norms, generated tensors) keep their type.
    let fixed: u64 = plan
        .iter()
        .filter(|t| !by_name.contains_key(t.name.as_str()))
        .map(|t| {
            let ne0 = t.dims[0] as usize;
            let rows = (t.dims.iter().product::<u64>() / t.dims[0]) as usize;
            aligned(GgmlType::F32.nbytes(ne0, rows).unwrap_or(0) as u64)
        })
        .sum::<u64>()
        + header;
    let opts: Vec<Vec<allocate::Choice>> = m
        .tensors
        .iter()
        .map(|t| {
            t.candidates
                .iter()
                .map(|c| allocate::Choice {
                    bytes: aligned(c.bytes),
                    kld: c.kld,
                })
                .collect()
        })
        .collect();
    let want = budget_of(budget, header, params);
    let pick = allocate::allocate(&opts, fixed, want)
        .map_err(|r| infeasible(budget, r, header, params))?;
    Ok(m.tensors
        .iter()
        .zip(pick)
        .map(|(t, i)| (t.name.clone(), t.candidates[i].ty))
        .collect())
}

/// The error for a budget outside `r`.
fn infeasible(budget: Budget, r: allocate::Infeasible, header: u64, params: u64) -> Error {
    let bpw = |b: u64| 8.0 * (b - header) as f64 / params as f64;
    Error::Invalid(match budget {
        Budget::Size(s) => format!(
            "--size {s} cannot be met: this model's GGUF takes {} to {} bytes (every tensor at its smallest candidate type, or at bf16)",
            r.min,
            r.max,
        ),
        Budget::Bpw(b) => format!(
            "--bpw {b} cannot be met: this model's GGUF takes {:.4} to {:.4} bits per weight (every tensor at its smallest candidate type, or at bf16)",
            bpw(r.min).ceil_to(4),
            bpw(r.max).floor_to(4),
        ),
    })
}

/// Rounding that keeps a printed bound inside the range.
trait Round4 {
    fn ceil_to(self, d: i32) -> f64;
    fn floor_to(self, d: i32) -> f64;
}

impl Round4 for f64 {
    fn ceil_to(self, d: i32) -> f64 {
        let p = 10f64.powi(d);
        (self * p).ceil() / p
    }
    fn floor_to(self, d: i32) -> f64 {
        let p = 10f64.powi(d);
        (self * p).floor() / p
    }
}

/// The predicted KL-divergence of `types`.
pub fn predicted_kld(m: &sensitivity::Measured, types: &BTreeMap<String, GgmlType>) -> f64 {
    m.tensors
        .iter()
        .filter_map(|t| {
            let ty = types.get(&t.name)?;
            t.candidates.iter().find(|c| c.ty == *ty).map(|c| c.kld)
        })
        .sum()
}

/// Scores GGUF `path` against the bf16 checkpoint on `chunks` (positions from `first`).
#[allow(clippy::too_many_arguments)]
pub fn score(
    ck: &Checkpoint,
    path: &Path,
    chunks: &[Vec<u32>],
    first: usize,
    device: &candle_core::Device,
    name: &str,
    predicted: Option<f64>,
    params: u64,
    header: u64,
) -> Result<Scored> {
    let cand = crate::runtime::load::gguf::GgufSource::open(path)?;
    let bytes = std::fs::metadata(path)
        .map_err(|e| Error::io(path, e))?
        .len();
    let bpw = 8.0 * bytes.saturating_sub(header) as f64 / params as f64;
    score_source(
        ck, &cand, chunks, first, device, name, predicted, bytes, bpw,
    )
}

/// Scores model `cand` (`bytes` long, `bpw` bits per weight as its budget counts them)
/// against the bf16 checkpoint on `chunks` (positions from `first`).
#[allow(clippy::too_many_arguments)]
pub fn score_source(
    ck: &Checkpoint,
    cand: &dyn crate::runtime::load::source::Source,
    chunks: &[Vec<u32>],
    first: usize,
    device: &candle_core::Device,
    name: &str,
    predicted: Option<f64>,
    bytes: u64,
    bpw: f64,
) -> Result<Scored> {
    use crate::runtime::load::safetensors::SafetensorsSource;
    use crate::verify::ppl::{score_streamed, StatsOn, StreamPlan};
    let reference = SafetensorsSource::borrowed(ck);
    let t = chunks.first().map_or(1, Vec::len).max(1);
    let plan = StreamPlan {
        dtype: crate::calib::pass_dtype(device),
        batch: (crate::runtime::llama::OBSERVE_ROWS / t).max(1),
        pass_chunks: chunks.len(),
        on: StatsOn::for_device(device),
    };
    let r = score_streamed(
        cand,
        crate::runtime::LoadOptions::default(),
        Some(&reference),
        device,
        chunks,
        first,
        plan,
        &|_| (),
    )?;
    let kld: Vec<f64> = r.iter().flat_map(|c| c.kld.iter().copied()).collect();
    let same: Vec<bool> = r.iter().flat_map(|c| c.same_top1.iter().copied()).collect();
    let nll: Vec<f64> = r.iter().flat_map(|c| c.nll.iter().copied()).collect();
    Ok(Scored {
        name: name.into(),
        bytes,
        bpw,
        predicted_kld: predicted,
        divergence: Divergence::from_results(&kld, &same),
        ppl: Perplexity::from_nll(&nll),
    })
}

/// Adds the choice (types, measured costs, the check) to the file's sidecar manifest.
fn record(
    out: &Path,
    r: &AutoReport,
    m: Option<&sensitivity::Measured>,
    types: &BTreeMap<String, GgmlType>,
) -> Result<()> {
    let p = crate::export::manifest::sidecar_path(out);
    let mut v = get_manifest(&p)?;
    let tensors: Vec<serde_json::Value> = match m {
        Some(m) => m
            .tensors
            .iter()
            .map(|t| {
                serde_json::json!({
                    "name": t.name,
                    "type": types.get(&t.name).map(|ty| ty.name().to_ascii_lowercase()),
                    "probe": t.probe.name().to_ascii_lowercase(),
                    "kld_at_probe": t.kld_at_probe,
                    "candidates": t.candidates,
                })
            })
            .collect(),
        None => types
            .iter()
            .map(|(n, ty)| serde_json::json!({"name": n, "type": ty.name().to_ascii_lowercase()}))
            .collect(),
    };
    v["auto_mix"] = serde_json::json!({
        "report": r,
        "measured": m.map(measured_json),
        "tensors": tensors,
    });
    put_manifest(&p, &v)
}

/// What the measurement found per block, for the manifest.
fn measured_json(m: &sensitivity::Measured) -> serde_json::Value {
    serde_json::json!({
        "block_kld": m.block_kld,
        "embed_kld": m.embed_kld,
        "head_kld": m.head_kld,
        "positions": m.positions,
        "wall_s": m.wall_s,
    })
}

/// Reads manifest `p` as JSON.
fn get_manifest(p: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
    serde_json::from_str(&text).map_err(|e| Error::format(p, format!("not JSON: {e}")))
}

/// Replaces manifest `p` with `v` (through a temporary name).
fn put_manifest(p: &Path, v: &serde_json::Value) -> Result<()> {
    let tmp = crate::format::safetensors::temp_path(p);
    std::fs::write(&tmp, serde_json::to_string_pretty(v).expect("json") + "\n")
        .map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, p).map_err(|e| Error::io(p, e))
}

/// The check as a table: each file's size, predicted and measured KL-divergence on the
/// held-back chunks.
pub fn report_table(r: &AutoReport) -> String {
    check_table("file", "bpw", r.holdout_chunks, r.positions, &r.scored)
}
