//! `--to w4a16:auto`: each block linear layer stored as 4-bit codes with 128, 64 or 32 columns
//! per scale, 8-bit codes per channel, or bf16, chosen to minimise the model's KL-divergence
//! against bf16 under a budget, in one compressed-tensors `pack-quantized` checkpoint whose
//! config groups name their layers (formats/auto-mix.md#w4a16).
//!
//! The costs come from the same measurement as `gguf:auto` ([`sensitivity::measure_with`]):
//! each layer's measured cost at the GGUF probe type, scaled by each candidate's error over the
//! probe's — under GPTQ the layer's output error with the codes GPTQ gives ([`block_ratios`],
//! from second moments collected in the measurement's reference pass), under round to nearest
//! the importance-weighted squared error. Layers a runtime fuses — q, k
//! and v; gate and up, the layers reading one input — get one kind together (vLLM refuses
//! fused layers of different schemes), so the choice is made per input site. The writer then
//! quantizes the chosen kinds with the run's method (GPTQ by default) calibrated on the choice
//! chunks only, and the checkpoint is scored on the held-back chunks beside uniform W4A16
//! checkpoints written the same way.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use rayon::prelude::*;

use super::{allocate, beside, sensitivity, AutoOptions, Budget, Compare, Scored};
use crate::error::{Error, Result};
use crate::export::Target;
use crate::format::gguf::GgmlType;
use crate::model::names::{self, InputSite, LinearRole};
use crate::model::Checkpoint;
use crate::quant::int8::Int4Method;
use crate::scheme::LayerQuant;

/// One candidate kind of one unit (the layers reading one input of one block).
#[derive(Debug, Clone, serde::Serialize)]
pub struct UnitCandidate {
    #[serde(serialize_with = "ser_kind")]
    pub kind: LayerQuant,
    pub bytes: u64,
    /// Predicted contribution to the model's mean KL-divergence.
    pub kld: f64,
}

fn ser_kind<S: serde::Serializer>(k: &LayerQuant, s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&k.name())
}

/// What was measured for one unit.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UnitSense {
    /// Its linear weights (Hugging Face names).
    pub layers: Vec<String>,
    /// Their measured share of the KL-divergence at the GGUF probe type.
    pub kld_at_probe: f64,
    pub candidates: Vec<UnitCandidate>,
}

/// The layers of block `l` reading input `site`, in block order.
fn unit_roles(site: InputSite) -> Vec<LinearRole> {
    LinearRole::ALL
        .into_iter()
        .filter(|r| r.site() == site)
        .collect()
}

/// Importance-weighted squared error of rows `x` (`cols` wide) stored as `k` (round to
/// nearest, as the error tables of `gguf:auto` are).
fn packed_error(x: &[f32], cols: usize, imp: &[f32], k: LayerQuant) -> f64 {
    let d = match k {
        LayerQuant::Bf16 => return 0.0,
        LayerQuant::Int8 => crate::quant::int8::quantize(x, cols, None).dequantize(cols),
        LayerQuant::Int4 { group } => {
            crate::quant::int8::quantize_bits(x, cols, Some(group), 4).dequantize(cols)
        }
    };
    // Rows in parallel, summed in order: the same bits whatever the threads do.
    x.par_chunks(cols)
        .zip(d.par_chunks(cols))
        .map(|(a, b)| {
            a.iter()
                .zip(b)
                .zip(imp)
                .map(|((&u, &v), &w)| {
                    let e = (u - v) as f64;
                    w as f64 * e * e
                })
                .sum::<f64>()
        })
        .collect::<Vec<f64>>()
        .iter()
        .sum()
}

/// The mean squared input of GGUF tensor `gg` from the measurement's importance matrix.
fn importance(m: &crate::calib::imatrix::Imatrix, gg: &str) -> Result<Vec<f32>> {
    Ok(m.entries
        .get(gg)
        .ok_or_else(|| Error::Internal(format!("no importance for {gg}")))?
        .mean())
}

/// Each block linear layer's candidate kinds with their error over the GGUF probe type's,
/// both measured as the layer's output error on the calibration text.
pub type ErrorRatios = BTreeMap<String, Vec<f64>>;

/// `Σ_rows (x − d)ᵀ H (x − d)` for rows `x` and their stored values `d` (`n` wide): the
/// squared change of the layer's output summed over the inputs `H` was measured on.
fn output_error(x: &[f32], d: &[f32], h: &Tensor, n: usize) -> Result<f64> {
    let rows = x.len() / n;
    if rows == 0 {
        return Ok(0.0);
    }
    let delta: Vec<f32> = x.iter().zip(d).map(|(a, b)| a - b).collect();
    let dt = Tensor::from_vec(delta, (rows, n), &candle_core::Device::Cpu)?;
    let dh = dt.matmul(h)?;
    Ok((dh * dt)?
        .to_dtype(candle_core::DType::F64)?
        .sum_all()?
        .to_scalar::<f64>()?)
}

/// Block `l`'s [`ErrorRatios`] into `out`, from its second moments `hs` (taken out of it):
/// each kind rounded as the writer rounds it under GPTQ — 4-bit codes by GPTQ with the
/// writer's factor, 8-bit codes to nearest — and the probe as `gguf:auto` rounds it,
/// on evenly spaced rows. The output error rather than the importance-weighted rounding error
/// is what makes GPTQ's gain visible: its feedback moves each rounding error to where `H` makes
/// it cost least, which the diagonal does not see.
pub fn block_ratios(
    ck: &Checkpoint,
    l: usize,
    hs: &mut crate::calib::hessian::BlockHessians,
    imatrix: &crate::calib::imatrix::Imatrix,
    sample_rows: usize,
    search: crate::quant::ggml::KSearch,
    out: &mut ErrorRatios,
) -> Result<()> {
    let c = &ck.config;
    // The writer's own factor cache: the same damping, shrink and fallback as W4A16's GPTQ.
    let mut gptq = crate::scheme::GptqCache::default();
    for site in InputSite::ALL {
        let cols = site.width(c);
        gptq.load(l, site, || hs.take_mean(site));
        let (plan, h) = gptq.plan(crate::scheme::PlanKind::W4, cols, None)?;
        let ew = plan.error_weights();
        let ht = Tensor::from_slice(h, (cols, cols), &candle_core::Device::Cpu)?;
        for role in unit_roles(site) {
            let hf = names::hf_linear(l, role);
            let gg = names::gguf_linear(l, role);
            let [rows, _] = role.shape(c);
            let imp = importance(imatrix, &gg)?;
            let idx = sensitivity::sample(rows, sample_rows);
            let xs = sensitivity::rows_f32(ck, &hf, &idx)?;
            let probe = sensitivity::probe_type(cols);
            let pd = sensitivity::round_trip(&xs, cols, Some(&imp), probe, search)?;
            let pe = output_error(&xs, &pd, &ht, cols)?.max(f64::MIN_POSITIVE);
            let mut r = Vec::new();
            for k in LayerQuant::candidates(cols) {
                let d = match k {
                    LayerQuant::Bf16 => {
                        r.push(0.0);
                        continue;
                    }
                    LayerQuant::Int8 => {
                        crate::quant::int8::quantize(&xs, cols, None).dequantize(cols)
                    }
                    LayerQuant::Int4 { group } => crate::quant::int8::quantize_gptq_bits(
                        &xs,
                        cols,
                        Some(group),
                        plan,
                        4,
                        Some(&ew),
                        Some(h),
                    )
                    .dequantize(cols),
                };
                r.push(output_error(&xs, &d, &ht, cols)? / pe);
            }
            ck.release(&hf);
            out.insert(hf, r);
        }
    }
    Ok(())
}

/// Each unit's candidates with their bytes and predicted costs, from measurement `m`: a
/// layer's cost at a kind is its measured cost at the probe times the kind's error over the
/// probe's — from `ratios` (output errors) where given, else importance-weighted rounding
/// errors.
pub fn tables(
    ck: &Checkpoint,
    m: &sensitivity::Measured,
    ratios: Option<&ErrorRatios>,
    sample_rows: usize,
    search: crate::quant::ggml::KSearch,
) -> Result<Vec<UnitSense>> {
    let c = &ck.config;
    let by_name: BTreeMap<&str, &sensitivity::TensorSense> =
        m.tensors.iter().map(|t| (t.name.as_str(), t)).collect();
    let mut out = Vec::new();
    for l in 0..c.num_hidden_layers {
        for site in InputSite::ALL {
            let roles = unit_roles(site);
            let cols = roles[0].shape(c)[1];
            let kinds = LayerQuant::candidates(cols);
            let mut kld = vec![0.0; kinds.len()];
            let mut bytes = vec![0u64; kinds.len()];
            let mut at_probe = 0.0;
            let mut layers = Vec::new();
            for &r in &roles {
                let hf = names::hf_linear(l, r);
                let gg = names::gguf_linear(l, r);
                let [rows, _] = r.shape(c);
                let ts = by_name
                    .get(gg.as_str())
                    .ok_or_else(|| Error::Internal(format!("no measured cost for {gg}")))?;
                let rel: Vec<f64> = match ratios {
                    Some(rs) => rs
                        .get(&hf)
                        .filter(|v| v.len() == kinds.len())
                        .cloned()
                        .ok_or_else(|| Error::Internal(format!("no error ratios for {hf}")))?,
                    None => {
                        let imp = importance(&m.imatrix, &gg)?;
                        let idx = sensitivity::sample(rows, sample_rows);
                        let xs = sensitivity::rows_f32(ck, &hf, &idx)?;
                        let probe: GgmlType = ts.probe;
                        let pe = sensitivity::errors(
                            &xs,
                            cols,
                            Some(&imp),
                            Some(&imp),
                            &[probe],
                            search,
                        )?[0]
                            .max(f64::MIN_POSITIVE);
                        kinds
                            .iter()
                            .map(|&k| packed_error(&xs, cols, &imp, k) / pe)
                            .collect()
                    }
                };
                for (i, &k) in kinds.iter().enumerate() {
                    kld[i] += ts.kld_at_probe * rel[i];
                    bytes[i] += k.bytes(rows, cols);
                }
                at_probe += ts.kld_at_probe;
                layers.push(hf);
            }
            out.push(UnitSense {
                layers,
                kld_at_probe: at_probe,
                candidates: kinds
                    .iter()
                    .zip(kld)
                    .zip(bytes)
                    .map(|((&kind, kld), bytes)| UnitCandidate { kind, bytes, kld })
                    .collect(),
            });
        }
    }
    Ok(out)
}

/// What a `w4a16:auto` budget counts: the block linear layers' weights and stored bytes, and
/// the checkpoint's other tensor bytes.
#[derive(Debug, Clone, Copy)]
pub struct Counted {
    /// Block linear weights.
    pub params: u64,
    /// Bytes of every other tensor (embedding, head, norms), as stored.
    pub other_bytes: u64,
}

impl Counted {
    pub fn of(ck: &Checkpoint) -> Self {
        let mut params = 0u64;
        let mut other = 0u64;
        for spec in crate::export::plan::inputs(ck) {
            let n: u64 = spec.shape.iter().map(|&d| d as u64).product();
            match spec.role {
                names::TensorRole::Linear(..) => params += n,
                _ => {
                    let size = ck.info(&spec.name).map_or(2, |(_, i)| i.dtype.size());
                    other += n * size as u64;
                }
            }
        }
        Counted {
            params,
            other_bytes: other,
        }
    }

    /// Linear-layer bytes a budget allows.
    fn allowed(&self, b: Budget) -> u64 {
        match b {
            Budget::Bpw(bits) => (bits * self.params as f64 / 8.0).floor() as u64,
            Budget::Size(s) => s.saturating_sub(self.other_bytes),
        }
    }

    /// Bits per linear weight of `bytes` of linear layers.
    pub fn bpw(&self, bytes: u64) -> f64 {
        8.0 * bytes as f64 / self.params.max(1) as f64
    }
}

/// The smallest and largest linear bytes any choice reaches.
fn feasible(ck: &Checkpoint) -> (u64, u64) {
    let c = &ck.config;
    let (mut lo, mut hi) = (0, 0);
    for _ in 0..c.num_hidden_layers {
        for r in LinearRole::ALL {
            let [rows, cols] = r.shape(c);
            let b: Vec<u64> = LayerQuant::candidates(cols)
                .into_iter()
                .map(|k| k.bytes(rows, cols))
                .collect();
            lo += b.iter().min().copied().unwrap_or(0);
            hi += b.iter().max().copied().unwrap_or(0);
        }
    }
    (lo, hi)
}

/// Refuses a budget no choice meets, naming the feasible range.
pub fn check_budget(ck: &Checkpoint, budget: Budget) -> Result<()> {
    let n = Counted::of(ck);
    let (lo, hi) = feasible(ck);
    let want = n.allowed(budget);
    if (lo..=hi).contains(&want) && !matches!(budget, Budget::Size(s) if s < n.other_bytes) {
        return Ok(());
    }
    Err(Error::Invalid(match budget {
        Budget::Bpw(b) => format!(
            "--bpw {b} cannot be met: this model's w4a16:auto checkpoint takes {:.4} to {:.4} bits per linear weight (every layer at 4 bits in groups of 128, or at bf16)",
            (n.bpw(lo) * 1e4).ceil() / 1e4,
            (n.bpw(hi) * 1e4).floor() / 1e4,
        ),
        Budget::Size(s) => format!(
            "--size {s} cannot be met: this model's w4a16:auto checkpoint takes {} to {} tensor bytes (every layer at 4 bits in groups of 128, or at bf16)",
            lo + n.other_bytes,
            hi + n.other_bytes,
        ),
    }))
}

/// The kinds with the smallest predicted cost within `budget`, per linear weight name.
pub fn choose(
    ck: &Checkpoint,
    units: &[UnitSense],
    budget: Budget,
) -> Result<BTreeMap<String, LayerQuant>> {
    let n = Counted::of(ck);
    let opts: Vec<Vec<allocate::Choice>> = units
        .iter()
        .map(|u| {
            u.candidates
                .iter()
                .map(|c| allocate::Choice {
                    bytes: c.bytes,
                    kld: c.kld,
                })
                .collect()
        })
        .collect();
    let pick = allocate::allocate(&opts, 0, n.allowed(budget)).map_err(|_| {
        check_budget(ck, budget)
            .err()
            .unwrap_or_else(|| Error::Internal("no choice within a feasible budget".into()))
    })?;
    Ok(units
        .iter()
        .zip(pick)
        .flat_map(|(u, i)| {
            u.layers
                .iter()
                .map(move |l| (l.clone(), u.candidates[i].kind))
        })
        .collect())
}

/// Linear-layer bytes of a choice.
pub fn linear_bytes(ck: &Checkpoint, kinds: &BTreeMap<String, LayerQuant>) -> u64 {
    let c = &ck.config;
    (0..c.num_hidden_layers)
        .flat_map(|l| LinearRole::ALL.map(|r| (l, r)))
        .map(|(l, r)| {
            let [rows, cols] = r.shape(c);
            kinds
                .get(&names::hf_linear(l, r))
                .map_or(0, |k| k.bytes(rows, cols))
        })
        .sum()
}

/// Every block linear weight stored as `k`.
pub fn uniform(ck: &Checkpoint, k: LayerQuant) -> BTreeMap<String, LayerQuant> {
    let c = &ck.config;
    (0..c.num_hidden_layers)
        .flat_map(|l| LinearRole::ALL.map(|r| names::hf_linear(l, r)))
        .map(|n| (n, k))
        .collect()
}

/// The recipe: one `^module$=kind` line per linear layer (the `--recipe` layout of `gguf:auto`).
pub fn recipe_text(kinds: &BTreeMap<String, LayerQuant>, order: &[String]) -> String {
    order
        .iter()
        .filter_map(|n| {
            let k = kinds.get(n)?;
            let module = n.strip_suffix(".weight").unwrap_or(n);
            Some(format!("^{}$={}\n", regex::escape(module), k.name()))
        })
        .collect()
}

/// Reads a recipe (`PATTERN=KIND` entries; the first pattern found in a module name wins;
/// layers no pattern names get 4 bits in groups of 128) and checks that fused layers agree.
pub fn read_recipe(ck: &Checkpoint, path: &Path) -> Result<BTreeMap<String, LayerQuant>> {
    let rules = super::read_rules(path, "KIND", LayerQuant::parse)?;
    let c = &ck.config;
    let mut out = BTreeMap::new();
    for l in 0..c.num_hidden_layers {
        for site in InputSite::ALL {
            let mut unit: Option<(String, LayerQuant)> = None;
            for r in unit_roles(site) {
                let name = names::hf_linear(l, r);
                let module = name.strip_suffix(".weight").unwrap_or(&name).to_owned();
                let k = rules
                    .iter()
                    .find(|(re, _)| re.is_match(&module))
                    .map_or(LayerQuant::Int4 { group: 128 }, |(_, k)| *k);
                let cols = r.shape(c)[1];
                if let LayerQuant::Int4 { group } = k {
                    if !cols.is_multiple_of(group) {
                        return Err(Error::format(
                            path,
                            format!("{module} has {cols} input columns, which groups of {group} do not divide"),
                        ));
                    }
                }
                if let Some((first, k0)) = &unit {
                    if *k0 != k {
                        return Err(Error::format(
                            path,
                            format!(
                                "{first} is {} but {module}, which reads the same input and is fused with it by vLLM, is {}: give them one kind",
                                k0.name(),
                                k.name()
                            ),
                        ));
                    }
                } else {
                    unit = Some((module, k));
                }
                out.insert(name, k);
            }
        }
    }
    Ok(out)
}

/// What `w4a16:auto` did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PackedReport {
    pub path: PathBuf,
    pub recipe_file: PathBuf,
    /// Bytes of the checkpoint's tensors (all safetensors files).
    pub bytes: u64,
    /// Bits per block linear weight.
    pub bpw: f64,
    pub budget_linear_bytes: Option<u64>,
    pub int4_weights: String,
    /// Kind → layer count.
    pub kinds: BTreeMap<String, usize>,
    pub choice_s: f64,
    pub write_s: f64,
    pub check_s: f64,
    /// The chosen checkpoint first, then the compared uniform ones by size.
    pub scored: Vec<Scored>,
    pub holdout_chunks: usize,
    pub positions: usize,
}

/// Bytes of the safetensors files in folder `dir`.
fn tensor_bytes(dir: &Path) -> Result<u64> {
    let mut n = 0;
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let e = e.map_err(|e| Error::io(dir, e))?;
        if e.path().extension().is_some_and(|x| x == "safetensors") {
            n += e.metadata().map_err(|er| Error::io(e.path(), er))?.len();
        }
    }
    Ok(n)
}

/// Writes `ck` as a `w4a16` checkpoint at `out` with per-layer `kinds`, calibrated on the
/// first `samples` calibration chunks.
fn write(
    ck: &Checkpoint,
    a: &AutoOptions,
    kinds: &BTreeMap<String, LayerQuant>,
    samples: usize,
    out: &Path,
    force: bool,
    device: &candle_core::Device,
) -> Result<()> {
    let mut eo = a.export.clone();
    eo.targets = vec![Target::W4A16];
    eo.out = out.to_owned();
    eo.force = force;
    eo.layer_quant = kinds.clone();
    eo.calib.spec.samples = samples;
    eo.calib.load = None;
    eo.calib.save = None;
    crate::export::run(ck, &eo, device, &|_, _| ())?;
    Ok(())
}

/// Scores checkpoint `dir` against bf16 on the held-back chunks.
#[allow(clippy::too_many_arguments)]
fn score_dir(
    ck: &Checkpoint,
    dir: &Path,
    kinds: &BTreeMap<String, LayerQuant>,
    held: &[Vec<u32>],
    first: usize,
    device: &candle_core::Device,
    name: &str,
    predicted: Option<f64>,
) -> Result<Scored> {
    let q = crate::scheme::open(dir)?;
    let src = crate::runtime::load::safetensors::SafetensorsSource::borrowed(&q);
    let bpw = Counted::of(ck).bpw(linear_bytes(ck, kinds));
    super::score_source(
        ck,
        &src,
        held,
        first,
        device,
        name,
        predicted,
        tensor_bytes(dir)?,
        bpw,
    )
}

/// Runs `w4a16:auto` (see the module docs). `note` receives one-line progress messages.
pub fn run(
    ck: &Checkpoint,
    a: &AutoOptions,
    device: &candle_core::Device,
    note: &dyn Fn(&str),
) -> Result<PackedReport> {
    let o = &a.export;
    let out = o.out.clone();
    if o.int4_weights == Int4Method::Awq {
        return Err(Error::Invalid(
            "w4a16:auto takes --int4-weights gptq or rtn: AWQ's scales fold into the norms for one group size".into(),
        ));
    }
    let t0 = std::time::Instant::now();
    let cs = super::prepare(ck, a, "w4a16:auto")?;
    let (choice, held, first) = (cs.choice(), cs.held(), cs.first);
    let recipe_file = beside(&out, ".recipe.txt");
    let order: Vec<String> = crate::export::plan::inputs(ck)
        .into_iter()
        .filter(|s| matches!(s.role, names::TensorRole::Linear(..)))
        .map(|s| s.name)
        .collect();
    let counted = Counted::of(ck);

    let (kinds, units, measured) = match &a.recipe {
        Some(p) => {
            let k = read_recipe(ck, p)?;
            note(&format!("recipe {}: {} layers", p.display(), k.len()));
            (k, None, None)
        }
        None => {
            let budget = a.budget.ok_or_else(|| {
                Error::Invalid("w4a16:auto needs --bpw BITS, --size BYTES or --recipe FILE".into())
            })?;
            check_budget(ck, budget)?;
            // Under GPTQ the costs come from output errors, which need each block's full
            // second moments (collected in the measurement's reference pass).
            let gptq = o.int4_weights == Int4Method::Gptq;
            let mut ratios = ErrorRatios::new();
            let mut hook = |l: usize,
                            hs: &mut crate::calib::hessian::BlockHessians,
                            im: &crate::calib::imatrix::Imatrix| {
                block_ratios(ck, l, hs, im, a.sample_rows, o.gguf.search, &mut ratios)
            };
            let m = super::measure_costs(
                ck,
                a,
                &cs,
                device,
                note,
                if gptq { Some(&mut hook) } else { None },
            )?;
            let units = tables(
                ck,
                &m,
                gptq.then_some(&ratios),
                a.sample_rows,
                o.gguf.search,
            )?;
            let k = choose(ck, &units, budget)?;
            (k, Some(units), Some(m))
        }
    };
    let choice_s = t0.elapsed().as_secs_f64();
    std::fs::write(&recipe_file, recipe_text(&kinds, &order))
        .map_err(|e| Error::io(&recipe_file, e))?;

    let t1 = std::time::Instant::now();
    let lb = linear_bytes(ck, &kinds);
    note(&format!(
        "writing {} ({:.3} bits per linear weight, {} weights)",
        out.display(),
        counted.bpw(lb),
        o.int4_weights.name()
    ));
    write(ck, a, &kinds, choice.len(), &out, o.force, device)?;
    let write_s = t1.elapsed().as_secs_f64();

    let t2 = std::time::Instant::now();
    let predicted = units.as_ref().map(|u| predicted_kld(u, &kinds));
    let mut scored = vec![score_dir(
        ck, &out, &kinds, held, first, device, "auto", predicted,
    )?];
    let compare: Vec<LayerQuant> =
        match &a.compare {
            Compare::None => vec![],
            Compare::Kinds(v) => v.clone(),
            Compare::Mixes(_) => return Err(Error::Invalid(
                "w4a16:auto compares with uniform kinds (w4g128, w4g64, w4g32, w8), not GGUF mixes"
                    .into(),
            )),
            Compare::Nearby => {
                // The uniform 4-bit group sizes just below and above the result's size.
                let cols_ok = |g: usize| {
                    let c = &ck.config;
                    [c.hidden_size, c.q_dim(), c.intermediate_size]
                        .iter()
                        .all(|w| w % g == 0)
                };
                let mut u: Vec<(u64, LayerQuant)> = [128, 64, 32]
                    .into_iter()
                    .filter(|&g| cols_ok(g))
                    .map(|group| {
                        let k = LayerQuant::Int4 { group };
                        (linear_bytes(ck, &uniform(ck, k)), k)
                    })
                    .collect();
                u.sort_by_key(|x| x.0);
                let below = u.iter().rev().find(|x| x.0 <= lb).map(|x| x.1);
                let above = u.iter().find(|x| x.0 > lb).map(|x| x.1);
                below.into_iter().chain(above).collect()
            }
        };
    for k in compare {
        let dir = out.with_file_name(format!(
            ".{}.compare-{}.partial",
            out.file_name().unwrap_or_default().to_string_lossy(),
            k.name()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        note(&format!("writing uniform {} for comparison", k.name()));
        let u = uniform(ck, k);
        let r = write(ck, a, &u, choice.len(), &dir, true, device)
            .and_then(|()| score_dir(ck, &dir, &u, held, first, device, &k.name(), None));
        let _ = std::fs::remove_dir_all(&dir);
        scored.push(r?);
    }
    scored[1..].sort_by_key(|s| s.bytes);
    let check_s = t2.elapsed().as_secs_f64();

    let mut counts = BTreeMap::new();
    for k in kinds.values() {
        *counts.entry(k.name()).or_insert(0usize) += 1;
    }
    let report = PackedReport {
        path: out.clone(),
        recipe_file,
        bytes: scored[0].bytes,
        bpw: counted.bpw(lb),
        budget_linear_bytes: a.budget.map(|b| counted.allowed(b)),
        int4_weights: o.int4_weights.name().into(),
        kinds: counts,
        choice_s,
        write_s,
        check_s,
        positions: scored[0].divergence.positions,
        scored,
        holdout_chunks: held.len(),
    };
    // The choice and what it was made from, in the checkpoint's manifest.
    let mp = out.join(crate::export::manifest::MANIFEST_FILE);
    let mut v = super::get_manifest(&mp)?;
    v["auto_mix"] = serde_json::json!({
        "report": report,
        "measured": measured.as_ref().map(super::measured_json),
        "units": units,
        "layers": kinds.iter().map(|(n, k)| (n.clone(), k.name())).collect::<BTreeMap<_, _>>(),
    });
    super::put_manifest(&mp, &v)?;
    Ok(report)
}

/// The predicted KL-divergence of `kinds`.
pub fn predicted_kld(units: &[UnitSense], kinds: &BTreeMap<String, LayerQuant>) -> f64 {
    units
        .iter()
        .filter_map(|u| {
            let k = kinds.get(u.layers.first()?)?;
            u.candidates.iter().find(|c| c.kind == *k).map(|c| c.kld)
        })
        .sum()
}

/// The check as a table.
pub fn report_table(r: &PackedReport) -> String {
    super::check_table("model", "bits", r.holdout_chunks, r.positions, &r.scored)
}
