//! The export loop: every target's sink opened up front, one calibration, then each input tensor
//! read once and handed to every sink that holds it; artifacts renamed into place only when all
//! of them are complete.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use crate::calib::{calibrate_for, CalibOptions, CalibStats, Calibration, Imatrix, Needs};
use crate::error::{Error, Result};
use crate::export::gguf::{GgufOptions, GgufReport, GgufSink, ImatrixUse};
use crate::export::manifest::{InputRecord, LayerAlpha, Manifest, SmoothQuantRecord, TensorError};
use crate::export::plan::{inputs, kv_scale_names, plan, quantization_config};
use crate::export::target::Target;
use crate::format::gguf::GgmlType;
use crate::format::safetensors::{begin_dir, commit_dir, sha256_bytes, ShardedWriter, WrittenFile};
use crate::model::names::{InputSite, LinearRole, TensorRole};
use crate::model::synth::MAX_SHARD_BYTES;
use crate::model::Checkpoint;
use crate::quant::fp8::{self, Fp8Matrix, ScaleStyle, WeightMode};
use crate::quant::int8::Int4Method;
use crate::quant::recipe::Recipe;
use crate::quant::smoothquant::{LayerSmoothing, SmoothPlan};

/// GGUF settings shared by every GGUF target.
#[derive(Debug, Clone, Default)]
pub struct GgufSettings {
    /// `--tensor-type REGEX=TYPE`, applied in order after the mix (the last match wins).
    pub overrides: Vec<(String, GgmlType)>,
    pub output_type: Option<GgmlType>,
    pub embedding_type: Option<GgmlType>,
    /// `--imatrix FILE` (llama.cpp's GGUF or legacy format).
    pub imatrix: Option<PathBuf>,
    /// `tokenizer.ggml.pre` when it cannot be detected.
    pub pre: Option<String>,
    /// How hard the k-quant encoders search (`--gguf-search`).
    pub search: crate::quant::ggml::KSearch,
}

/// Everything an export needs besides the input.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub targets: Vec<Target>,
    pub out: PathBuf,
    pub force: bool,
    pub fp8_weights: WeightMode,
    /// `rtn` or `gptq` (W8A8 weights, after smoothing).
    pub int8_weights: WeightMode,
    /// `rtn`, `gptq` or `awq` (`w4a16` weights).
    pub int4_weights: crate::quant::int8::Int4Method,
    /// SmoothQuant migration strength for `int8` (`None`: choose per layer from a grid).
    pub smooth_alpha: Option<f64>,
    /// Group size for `int8-w8a16` (`None`: one scale per output channel).
    pub group_size: Option<usize>,
    pub calib: CalibOptions,
    /// Whether the user asked for calibration (any `--calib*`, `--load-calib` or `--save-calib`
    /// option): GGUF k-quant targets then use an importance matrix made from it, as they would
    /// from `--imatrix`.
    pub calib_asked: bool,
    pub gguf: GgufSettings,
    pub command_line: String,
    /// Convert weights holding NaN or infinite values instead of refusing them.
    pub allow_nonfinite: bool,
}

impl ExportOptions {
    /// Where target `t` of model `ck` is written.
    pub fn path(&self, t: Target, ck: &Checkpoint) -> PathBuf {
        t.path(&self.out, self.targets.len() == 1, &model_name(ck))
    }

    /// Whether GGUF targets take their importance matrix from this run's calibration.
    fn gguf_from_calibration(&self) -> bool {
        self.gguf.imatrix.is_none()
            && self.calib_asked
            && self
                .targets
                .iter()
                .any(|t| t.mix().is_some_and(|m| !m.is_float()))
    }

    /// What calibration must produce for these targets.
    pub fn needs(&self) -> Needs {
        let has = |t: Target| self.targets.contains(&t);
        let has_fp8 = self.targets.iter().any(|t| t.is_fp8());
        Needs {
            stats: has(Target::Fp8Static)
                || has(Target::Int8)
                || self.targets.iter().any(|t| t.nvfp4_activations())
                || (has(Target::W4A16) && self.int4_weights == Int4Method::Awq)
                || (has_fp8 && self.fp8_weights != WeightMode::Rtn)
                || self.gguf_from_calibration(),
            hessians: (has_fp8 && self.fp8_weights == WeightMode::Gptq)
                || (has(Target::Int8) && self.int8_weights == WeightMode::Gptq)
                || (has(Target::W4A16) && self.int4_weights == Int4Method::Gptq),
        }
    }

    /// The targets that use this run's calibration statistics.
    pub fn calibrated_targets(&self) -> Vec<Target> {
        let gguf = self.gguf_from_calibration();
        self.targets
            .iter()
            .copied()
            .filter(|&t| match t {
                Target::Fp8Static | Target::Int8 => true,
                Target::Fp8 | Target::Fp8ModelOpt => self.fp8_weights != WeightMode::Rtn,
                Target::Int8W8A16 | Target::Nvfp4A16 => false,
                Target::Nvfp4 | Target::Nvfp4ModelOpt => true,
                Target::W4A16 => self.int4_weights != Int4Method::Rtn,
                Target::Gguf(m) => gguf && !m.is_float(),
            })
            .collect()
    }
}

/// The model's name in artifact file names: its folder's name (`Llama-3.1-8B`), as llama.cpp's
/// converter names its outputs.
pub fn model_name(ck: &Checkpoint) -> String {
    let dir = std::fs::canonicalize(&ck.dir).unwrap_or_else(|_| ck.dir.clone());
    dir.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "model".into())
}

/// One artifact written.
#[derive(Debug, Clone)]
pub enum Artifact {
    Checkpoint {
        path: PathBuf,
        manifest: Box<Manifest>,
    },
    Gguf(GgufReport),
}

/// What an export did.
#[derive(Debug, Clone)]
pub struct ExportReport {
    /// In `--to` order.
    pub artifacts: Vec<(Target, Artifact)>,
    /// The calibration used, if any, and the targets that used it.
    pub calibration: Option<crate::calib::CalibInfo>,
    pub calibrated: Vec<Target>,
    /// Forward passes over calibration text (0 or 1).
    pub calibration_passes: usize,
    /// Input tensors read (each once) and their bytes.
    pub tensors_read: usize,
    pub bytes_read: u64,
    pub wall_s: f64,
}

/// A checkpoint artifact being written.
struct CkSink {
    target: Target,
    out: PathBuf,
    tmp: PathBuf,
    writer: ShardedWriter,
    errors: BTreeMap<String, f64>,
    /// SmoothQuant α per block, for `int8`.
    alphas: Vec<LayerAlpha>,
}

/// Every open artifact.
struct Sinks {
    ck: Vec<CkSink>,
    gguf: Vec<(Target, GgufSink)>,
}

/// Runs the export; `progress(done, total)` counts input bytes converted.
pub fn run(
    ck: &Checkpoint,
    o: &ExportOptions,
    device: &candle_core::Device,
    progress: &dyn Fn(u64, u64),
) -> Result<ExportReport> {
    if o.targets.is_empty() {
        return Err(Error::Invalid("--to needs at least one target".into()));
    }
    // A quantized checkpoint is not an input: its linear layers are codes and scales, and
    // re-quantizing them would compound the rounding (or, for packed layouts, drop them).
    if let Some(q) = ck.config_json.get("quantization_config") {
        let method = q
            .get("quant_method")
            .and_then(|m| m.as_str())
            .unwrap_or("unknown");
        return Err(Error::config(
            ck.dir.join("config.json"),
            "quantization_config",
            format!(
                "expected an unquantized (bf16, f16 or f32) checkpoint, found one already quantized ({method}); convert from the original"
            ),
        ));
    }
    if is_inside(&o.out, &ck.dir) {
        return Err(Error::Invalid(format!(
            "--out {} is inside the input folder {}: write artifacts elsewhere, so that an input is never replaced or read back as one",
            o.out.display(),
            ck.dir.display()
        )));
    }
    // Every input file named besides the checkpoint is opened before any work.
    for p in [&o.calib.calib, &o.calib.load, &o.gguf.imatrix]
        .into_iter()
        .flatten()
    {
        std::fs::File::open(p).map_err(|e| Error::io(p, e))?;
    }
    if o.int4_weights == Int4Method::Awq
        && o.targets.contains(&Target::W4A16)
        && o.targets.contains(&Target::Int8)
    {
        return Err(Error::Invalid(
            "--to int8 and --to w4a16 --int4-weights awq rewrite the norm weights each their own way: convert them in two runs".into(),
        ));
    }
    // So is every output path: nothing is calibrated or written when one of them is in the way.
    for &t in &o.targets {
        let p = o.path(t, ck);
        if p.exists() && !o.force {
            return Err(Error::Invalid(format!(
                "{} already exists (pass --force to replace it)",
                p.display()
            )));
        }
    }
    for t in &o.targets {
        let g = if t.nvfp4().is_some() {
            Some(crate::quant::nvfp4::GROUP)
        } else {
            t.group(o.group_size)
        };
        if let Some(g) = g {
            let c = &ck.config;
            let widths = [c.hidden_size, c.q_dim(), c.intermediate_size];
            if g == 0 || widths.iter().any(|w| w % g != 0) {
                let fix = if t.nvfp4().is_some() {
                    "NVFP4's group size is fixed"
                } else {
                    "choose one with --group-size"
                };
                return Err(Error::Invalid(format!(
                    "{t}: group size {g} must divide every linear layer's input width ({widths:?}); {fix}"
                )));
            }
        }
    }
    // With several targets `out` is their folder; made when the sinks open, removed again if
    // the export fails and it was ours.
    let out_existed = o.out.exists();
    crate::runtime::tune_allocator();
    let t0 = Instant::now();
    let imatrix_file = match &o.gguf.imatrix {
        Some(p) => {
            // Checked here, before calibration, so a foreign or damaged matrix costs no time.
            let imatrix = Imatrix::read(p)?;
            imatrix.check_against(&ck.config, p)?;
            Some(ImatrixUse {
                imatrix,
                file: p.display().to_string(),
            })
        }
        None => None,
    };
    let cal = calibrate_for(ck, &o.calib, o.needs(), device)?;
    let imatrix = match (imatrix_file, &cal.stats) {
        (Some(f), _) => Some(f),
        (None, Some(st)) if o.gguf_from_calibration() => {
            let mut im = Imatrix::from_stats(st);
            if im.datasets.is_empty() {
                im.datasets.push(st.info.source.clone());
            }
            Some(ImatrixUse {
                imatrix: im,
                file: format!("(computed from {})", st.info.source),
            })
        }
        _ => None,
    };
    let mut sinks = Sinks {
        ck: Vec::new(),
        gguf: Vec::new(),
    };
    let opened = open_sinks(ck, o, imatrix, &mut sinks);
    // Every partial folder opened, removed again if anything below fails (finishing drains the
    // sinks, so they cannot be asked afterwards).
    let partials: Vec<PathBuf> = sinks.ck.iter().map(|s| s.tmp.clone()).collect();
    let result = opened.and_then(|()| {
        // The inputs' sha256 (for the manifests) is taken on its own thread while the loop
        // runs over the same, already mapped pages.
        let (looped, input_hashes) = std::thread::scope(|sc| {
            let h = sc.spawn(|| ck.input_hashes_on(false));
            let looped = export_loop(ck, o, &cal, &mut sinks, progress);
            let hashes = h
                .join()
                .unwrap_or_else(|_| Err(Error::Invalid("input hashing panicked".into())));
            (looped, hashes)
        });
        let (tensors, bytes) = looped?;
        let input_hashes = input_hashes?;
        // Finished artifacts with the partial folder each checkpoint still has to be moved from.
        let mut done: Vec<(Target, Artifact, Option<PathBuf>)> = Vec::new();
        for s in sinks.ck.drain(..) {
            let (t, path, tmp) = (s.target, s.out.clone(), s.tmp.clone());
            let m = finish_ck(ck, o, cal.info.as_ref(), s, &input_hashes, t0)?;
            let manifest = Box::new(m);
            done.push((t, Artifact::Checkpoint { path, manifest }, Some(tmp)));
        }
        for (t, g) in sinks.gguf.drain(..) {
            let (path, imatrix) = (g.path().to_owned(), g.imatrix_file());
            let r = g.finish_then(|file| {
                let m = GgufRecord {
                    path: &path,
                    file,
                    imatrix,
                };
                write_gguf_manifest(o, t, &m, cal.stats.as_ref(), ck, &input_hashes, t0)
            })?;
            done.push((t, Artifact::Gguf(r), None));
        }
        Ok((tensors, bytes, done))
    });
    let (tensors_read, bytes_read, done) = match result {
        Ok(v) => v,
        Err(e) => {
            // GGUF sinks remove their temporary files when dropped.
            for tmp in &partials {
                let _ = std::fs::remove_dir_all(tmp);
            }
            drop(sinks);
            if !out_existed && o.targets.len() > 1 {
                let _ = std::fs::remove_dir(&o.out);
            }
            return Err(e);
        }
    };
    // Every artifact is complete: move the checkpoint folders into place (GGUF files were
    // renamed by their writers).
    let mut artifacts = Vec::new();
    for (t, a, tmp) in done {
        if let (Some(tmp), Artifact::Checkpoint { path, .. }) = (tmp, &a) {
            commit_dir(&tmp, path)?;
        }
        artifacts.push((t, a));
    }
    artifacts.sort_by_key(|(t, _)| o.targets.iter().position(|x| x == t));
    Ok(ExportReport {
        artifacts,
        calibration: cal.info.clone(),
        calibrated: if cal.info.is_some() {
            o.calibrated_targets()
        } else {
            Vec::new()
        },
        calibration_passes: cal.passes,
        tensors_read,
        bytes_read,
        wall_s: t0.elapsed().as_secs_f64(),
    })
}

fn open_sinks(
    ck: &Checkpoint,
    o: &ExportOptions,
    imatrix: Option<ImatrixUse>,
    sinks: &mut Sinks,
) -> Result<()> {
    for &t in &o.targets {
        let out = o.path(t, ck);
        if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
        }
        match t.mix() {
            Some(mix) => {
                let g = GgufOptions {
                    recipe: Recipe {
                        mix,
                        overrides: o.gguf.overrides.clone(),
                        output_type: o.gguf.output_type,
                        embedding_type: o.gguf.embedding_type,
                        imatrix: imatrix.is_some(),
                    },
                    imatrix: imatrix.clone(),
                    pre: o.gguf.pre.clone(),
                    search: o.gguf.search,
                };
                sinks.gguf.push((t, GgufSink::create(ck, &g, &out)?));
            }
            None => {
                let tmp = begin_dir(&out, o.force)?;
                let writer =
                    ShardedWriter::create(&tmp, plan(t, ck, o.group_size), MAX_SHARD_BYTES);
                let writer = match writer {
                    Ok(w) => w,
                    Err(e) => {
                        let _ = std::fs::remove_dir_all(&tmp);
                        return Err(e);
                    }
                };
                sinks.ck.push(CkSink {
                    target: t,
                    out,
                    tmp,
                    writer,
                    errors: BTreeMap::new(),
                    alphas: Vec::new(),
                });
            }
        }
    }
    Ok(())
}

fn bf16_bytes(v: &[f32]) -> Vec<u8> {
    crate::numerics::convert::f32_to_bf16_bytes(v)
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// compressed-tensors' static observer: `bf16(absmax / 448)`.
fn fp8_static_scale(absmax: f32) -> f32 {
    let s = crate::numerics::fp8::round_bf16(absmax / crate::numerics::fp8::E4M3_MAX);
    if s == 0.0 {
        0.0078125
    } else {
        s
    }
}

/// A GPTQ factor cached for one (layer, site): key, E[x xᵀ], inverse factor.
type GptqFactor = ((usize, usize), Vec<f64>, crate::quant::gptq::GptqPlan);

/// Whether `path` (which need not exist yet) lies inside folder `dir`, links resolved.
fn is_inside(path: &std::path::Path, dir: &std::path::Path) -> bool {
    let Ok(dir) = dir.canonicalize() else {
        return false;
    };
    let abs = if path.is_absolute() {
        path.to_owned()
    } else {
        match std::env::current_dir() {
            Ok(c) => c.join(path),
            Err(_) => return false,
        }
    };
    // The deepest existing ancestor, resolved; the rest cannot be a link.
    let mut existing = abs.as_path();
    while !existing.exists() {
        match existing.parent() {
            Some(p) => existing = p,
            None => return false,
        }
    }
    existing.canonicalize().is_ok_and(|e| e.starts_with(&dir))
}

/// Streams every input tensor once to every sink; returns the tensors and bytes read.
fn export_loop(
    ck: &Checkpoint,
    o: &ExportOptions,
    cal: &Calibration,
    sinks: &mut Sinks,
    progress: &dyn Fn(u64, u64),
) -> Result<(usize, u64)> {
    let stats = cal.stats.as_ref();
    let hessians = cal.hessians.as_ref();
    let items = inputs(ck);
    // GPTQ factor of the last (layer, site): q/k/v and gate/up share one.
    let mut factor: Option<GptqFactor> = None;
    // The same for the smoothed inputs INT8 weights see.
    let mut int8_factor: Option<((usize, usize), crate::quant::gptq::GptqPlan)> = None;
    // Progress counts input bytes: what a user can compare with the checkpoint's size.
    let stored = |name: &str| {
        ck.info(name).map_or(0, |(_, t)| {
            (t.shape.iter().product::<usize>() * t.dtype.size()) as u64
        })
    };
    let total: u64 = items.iter().map(|s| stored(&s.name)).sum();
    let mut done = 0u64;
    // The clock of the caller's rate and ETA starts here, not after the first tensor.
    progress(0, total);
    let mut bytes_read = 0u64;
    // INT8 (SmoothQuant) and W4A16 with AWQ rewrite the norms, each its own way; the two are
    // refused together before any work (see `run`).
    let awq = o.int4_weights == Int4Method::Awq && o.targets.contains(&Target::W4A16);
    let want_smooth = awq || sinks.ck.iter().any(|s| s.target == Target::Int8);
    let mut smooth: Option<LayerSmoothing> = None;
    // NVFP4: layers reading one input (q/k/v, gate/up) share one per-tensor scale, taken from
    // the largest magnitude among them, as vLLM requires of fused projections.
    let want_group_absmax = sinks.ck.iter().any(|s| s.target.nvfp4().is_some());
    let mut group_absmax: Option<((usize, usize), f32)> = None;
    for spec in &items {
        let (name, shape) = (&spec.name, &spec.shape);
        let norm_of = spec.role.norm_site();
        if let (true, Some(l)) = (want_smooth, spec.role.layer()) {
            if smooth.as_ref().map(|s| s.layer) != Some(l) {
                let st = stats.ok_or_else(|| {
                    Error::Invalid("int8 and w4a16 with awq need calibration".into())
                })?;
                let plan = match Target::W4A16.group(o.group_size) {
                    Some(g) if awq => SmoothPlan::awq(g),
                    _ => SmoothPlan::from_alpha(o.smooth_alpha),
                };
                let sm = LayerSmoothing::compute(ck, &st.activations(l), l, plan)?;
                let sites: BTreeMap<String, f64> = InputSite::ALL
                    .into_iter()
                    .filter_map(|site| sm.alpha(site).map(|a| (site.name().to_owned(), a)))
                    .collect();
                for s in sinks
                    .ck
                    .iter_mut()
                    .filter(|s| s.target == Target::Int8 || (awq && s.target == Target::W4A16))
                {
                    s.alphas.push(LayerAlpha {
                        layer: l,
                        sites: sites.clone(),
                    });
                }
                smooth = Some(sm);
            }
        }
        let (f, info) = ck.info(name).expect("listed");
        if !o.allow_nonfinite {
            let raw = f.bytes(name).expect("listed");
            if let Some(i) = crate::numerics::convert::first_nonfinite(raw, info.dtype) {
                return Err(Error::format(
                    &f.path,
                    format!(
                        "tensor `{name}`: value {i} (flat index) is NaN or infinite; pass --allow-nonfinite to convert it anyway"
                    ),
                ));
            }
        }
        bytes_read += (info.shape.iter().product::<usize>() * info.dtype.size()) as u64;
        match spec.role {
            TensorRole::Linear(layer, r) => {
                // GGUF files that keep the stored dtype take the bytes as they are; the f32
                // values are made only when some target needs them.
                let mut f32_gguf = Vec::new();
                for (gi, (_, g)) in sinks.gguf.iter_mut().enumerate() {
                    if !g.write_same_dtype(ck, name)? {
                        f32_gguf.push(gi);
                    }
                }
                if sinks.ck.is_empty() && f32_gguf.is_empty() {
                    ck.release(name);
                    done += stored(name);
                    progress(done, total);
                    continue;
                }
                let key = (layer, r.site().index());
                if want_group_absmax && group_absmax.map(|g| g.0) != Some(key) {
                    let mut m = 0f32;
                    for r2 in LinearRole::ALL
                        .into_iter()
                        .filter(|r2| r2.site() == r.site())
                    {
                        let n2 = crate::model::names::hf_linear(layer, r2);
                        let (f2, i2) = ck.info(&n2).expect("validated");
                        let raw = f2.bytes(&n2).expect("listed");
                        m = m.max(crate::numerics::convert::absmax(raw, i2.dtype).unwrap_or(0.0));
                    }
                    group_absmax = Some((key, m));
                }
                let w = ck.read_f32(name)?;
                // FP8 weights computed once per scale layout; targets share them.
                let mut cache: Vec<(ScaleStyle, Fp8Matrix, f64)> = Vec::new();
                for s in sinks.ck.iter_mut() {
                    let ctx = LinearCtx {
                        o,
                        stats,
                        hessians,
                        smooth: smooth.as_ref(),
                        name,
                        shape,
                        layer,
                        role: r,
                        group_absmax: group_absmax.map(|g| g.1),
                    };
                    write_linear(&ctx, s, &w, &mut cache, &mut factor, &mut int8_factor)?;
                }
                for gi in f32_gguf {
                    sinks.gguf[gi].1.write_f32(name, &w)?;
                }
            }
            _ => {
                let bytes = f.bytes(name).expect("listed");
                for s in sinks.ck.iter_mut() {
                    match (s.target, norm_of, smooth.as_ref()) {
                        (t, Some((_, site)), Some(sm))
                            if t == Target::Int8 || (awq && t == Target::W4A16) =>
                        {
                            let g = ck.read_f32(name)?;
                            s.writer
                                .write(name, &bf16_bytes(&sm.smooth_norm(site, &g)))?;
                        }
                        _ => s.writer.write(name, bytes)?,
                    }
                }
                for (_, g) in sinks.gguf.iter_mut() {
                    if !g.write_same_dtype(ck, name)? {
                        g.write_stored(ck, name)?;
                    }
                }
            }
        }
        ck.release(name);
        done += stored(name);
        progress(done, total);
    }
    Ok((items.len(), bytes_read))
}

/// What writing one linear weight needs to know.
struct LinearCtx<'a> {
    o: &'a ExportOptions,
    stats: Option<&'a CalibStats>,
    hessians: Option<&'a crate::calib::hessian::Hessians>,
    smooth: Option<&'a LayerSmoothing>,
    name: &'a str,
    shape: &'a [usize],
    layer: usize,
    role: LinearRole,
    /// The largest weight magnitude among the layers sharing this layer's input (NVFP4).
    group_absmax: Option<f32>,
}

/// Quantizes linear weight `w` for checkpoint sink `s` and writes its tensors.
fn write_linear(
    c: &LinearCtx<'_>,
    s: &mut CkSink,
    w: &[f32],
    cache: &mut Vec<(ScaleStyle, Fp8Matrix, f64)>,
    factor: &mut Option<GptqFactor>,
    int8_factor: &mut Option<((usize, usize), crate::quant::gptq::GptqPlan)>,
) -> Result<()> {
    let (name, cols, layer, r) = (c.name, c.shape[1], c.layer, c.role);
    let stem = name.strip_suffix(".weight").expect("weight");
    match s.target {
        Target::Int8 => {
            let sm = c.smooth.expect("computed for this layer");
            let ws = sm.smooth_weight(r, w, cols);
            let m = match (c.o.int8_weights, c.hessians) {
                (WeightMode::Gptq, Some(h)) => {
                    let key = (layer, r.site().index());
                    if int8_factor.as_ref().map(|f| f.0) != Some(key) {
                        // Second moments of the smoothed input x/s.
                        let n = h.count.max(1) as f64;
                        let s = sm.factors[key.1].as_deref();
                        let f = |j: usize| s.map_or(1.0, |s| s[j] as f64);
                        let mean: Vec<f64> = h.sums[key.0][key.1]
                            .iter()
                            .enumerate()
                            .map(|(ij, v)| v / n / (f(ij / cols) * f(ij % cols)))
                            .collect();
                        let u = crate::quant::gptq::GptqPlan::new(&mean, cols, 0.01)?;
                        *int8_factor = Some((key, u));
                    }
                    let (_, u) = int8_factor.as_ref().expect("just set");
                    crate::quant::int8::quantize_gptq(&ws, cols, u)
                }
                _ => crate::quant::int8::quantize(&ws, cols, None),
            };
            s.errors.insert(name.to_owned(), m.relative_rms(&ws, cols));
            let bytes: Vec<u8> = m.q.iter().map(|&v| v as u8).collect();
            s.writer.write(name, &bytes)?;
            s.writer
                .write(&format!("{stem}.weight_scale"), &bf16_bytes(&m.scales))?;
        }
        Target::Int8W8A16 => {
            let m = crate::quant::int8::quantize(w, cols, c.o.group_size);
            write_packed(s, name, c.shape, w, &m, 8)?;
        }
        Target::W4A16 => {
            let group = s.target.group(c.o.group_size);
            let m = match (c.o.int4_weights, c.hessians) {
                (Int4Method::Gptq, Some(h)) => {
                    let key = (layer, r.site().index());
                    if factor.as_ref().map(|f| f.0) != Some(key) {
                        let n = h.count.max(1) as f64;
                        let mean: Vec<f64> = h.sums[key.0][key.1].iter().map(|v| v / n).collect();
                        let u = crate::quant::gptq::GptqPlan::with_shrink(
                            &mean,
                            cols,
                            0.01,
                            crate::quant::int8::W4A16_GPTQ_SHRINK,
                        )?;
                        *factor = Some((key, mean, u));
                    }
                    let (_, mean, u) = factor.as_ref().expect("just set");
                    // Group scales searched under what each column's error costs after the
                    // feedback, then refitted to the codes under the full second moments.
                    let imp = u.error_weights();
                    crate::quant::int8::quantize_gptq_bits(
                        w,
                        cols,
                        group,
                        u,
                        4,
                        Some(&imp),
                        Some(mean),
                    )
                }
                (Int4Method::Awq, _) => {
                    let sm = c.smooth.expect("computed for this layer");
                    let ws = sm.smooth_weight(r, w, cols);
                    // AWQ's clipping step: group scales searched under the importance of the
                    // scaled inputs x / s, E[x²] / s².
                    let st = c.stats.expect("AWQ calibrates");
                    let mut imp = st.site(layer, r.site()).mean_sq();
                    if let Some(f) = sm.factors[r.site().index()].as_deref() {
                        for (i, &f) in imp.iter_mut().zip(f) {
                            *i /= (f as f64) * (f as f64);
                        }
                    }
                    let scales = crate::quant::int8::searched_scales(&ws, cols, group, 4, &imp);
                    let m = crate::quant::int8::quantize_with_scales(&ws, cols, group, 4, scales);
                    // The error is against the scaled weights the codes stand for.
                    return write_packed(s, name, c.shape, &ws, &m, 4);
                }
                _ => crate::quant::int8::quantize_bits(w, cols, group, 4),
            };
            write_packed(s, name, c.shape, w, &m, 4)?;
        }
        Target::Fp8 | Target::Fp8Static | Target::Fp8ModelOpt => {
            let style = s.target.style();
            if !cache.iter().any(|(st, _, _)| *st == style) {
                let m = fp8_weights(c, style, w, factor)?;
                let err = m.relative_rms(w, c.shape[1]);
                cache.push((style, m, err));
            }
            let (_, m, err) = cache
                .iter()
                .find(|(st, _, _)| *st == style)
                .expect("cached");
            s.errors.insert(name.to_owned(), *err);
            s.writer.write(name, &m.codes)?;
            match s.target {
                Target::Fp8 => s
                    .writer
                    .write(&format!("{stem}.weight_scale"), &bf16_bytes(&m.scales))?,
                Target::Fp8Static => {
                    s.writer
                        .write(&format!("{stem}.weight_scale"), &bf16_bytes(&m.scales))?;
                    let st = c
                        .stats
                        .ok_or_else(|| Error::Invalid("fp8-static needs calibration".into()))?;
                    // q/k/v (and gate/up) share one input, so the per-tensor scale is already
                    // the max over the fused group that runtimes take.
                    let scale = fp8_static_scale(st.site(layer, r.site()).tensor_absmax());
                    s.writer
                        .write(&format!("{stem}.input_scale"), &bf16_bytes(&[scale]))?;
                    if r == LinearRole::V {
                        let ls = &st.layers[layer];
                        let [kn, vn] = kv_scale_names(layer);
                        s.writer
                            .write(&kn, &bf16_bytes(&[fp8_static_scale(ls.k_absmax)]))?;
                        s.writer
                            .write(&vn, &bf16_bytes(&[fp8_static_scale(ls.v_absmax)]))?;
                    }
                }
                _ => s
                    .writer
                    .write(&format!("{stem}.weight_scale"), &f32_bytes(&m.scales))?,
            }
        }
        Target::Nvfp4 | Target::Nvfp4A16 | Target::Nvfp4ModelOpt => {
            use crate::quant::nvfp4;
            let flavor = s.target.nvfp4().expect("NVFP4 target");
            let amax = c.group_absmax.expect("computed for NVFP4 sinks");
            let m = nvfp4::quantize(w, cols, nvfp4::tensor_scale(amax, flavor), flavor);
            s.errors.insert(name.to_owned(), m.relative_rms(w, cols));
            let modelopt = flavor == nvfp4::Flavor::ModelOpt;
            let packed = if modelopt {
                name.to_owned()
            } else {
                format!("{stem}.weight_packed")
            };
            s.writer.write(&packed, &m.packed)?;
            s.writer.write(&format!("{stem}.weight_scale"), &m.scales)?;
            let tensor = if modelopt {
                "weight_scale_2"
            } else {
                "weight_global_scale"
            };
            s.writer
                .write(&format!("{stem}.{tensor}"), &f32_bytes(&[m.tensor]))?;
            if s.target.nvfp4_activations() {
                let st = c
                    .stats
                    .ok_or_else(|| Error::Invalid(format!("{} needs calibration", s.target)))?;
                // q/k/v (and gate/up) read one input: one scale serves the fused group.
                let a = nvfp4::input_scale(st.site(layer, r.site()).tensor_absmax(), flavor);
                let input = if modelopt {
                    "input_scale"
                } else {
                    "input_global_scale"
                };
                s.writer
                    .write(&format!("{stem}.{input}"), &f32_bytes(&[a]))?;
            }
        }
        Target::Gguf(_) => unreachable!("GGUF targets have their own sinks"),
    }
    Ok(())
}

/// Writes a `pack-quantized` layer (formats/int8.md#w8a16, #w4a16): `bits`-bit codes packed
/// into int32 words, the bf16 scales, the logical shape; records the layer's error.
fn write_packed(
    s: &mut CkSink,
    name: &str,
    shape: &[usize],
    w: &[f32],
    m: &crate::quant::int8::Int8Matrix,
    bits: u32,
) -> Result<()> {
    let stem = name.strip_suffix(".weight").expect("weight");
    let cols = shape[1];
    s.errors.insert(name.to_owned(), m.relative_rms(w, cols));
    s.writer.write(
        &format!("{stem}.weight_packed"),
        &crate::quant::int8::pack_bits(&m.q, cols, bits),
    )?;
    s.writer
        .write(&format!("{stem}.weight_scale"), &bf16_bytes(&m.scales))?;
    let dims: Vec<u8> = [shape[0] as i64, cols as i64]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect();
    s.writer.write(&format!("{stem}.weight_shape"), &dims)
}

/// FP8 weights of one linear layer under `style` (RTN, clipping search or GPTQ).
fn fp8_weights(
    c: &LinearCtx<'_>,
    style: ScaleStyle,
    w: &[f32],
    factor: &mut Option<GptqFactor>,
) -> Result<Fp8Matrix> {
    let cols = c.shape[1];
    let m = match (c.o.fp8_weights, c.hessians) {
        (WeightMode::Gptq, Some(h)) => {
            let key = (c.layer, c.role.site().index());
            if factor.as_ref().map(|f| f.0) != Some(key) {
                let n = h.count.max(1) as f64;
                let mean: Vec<f64> = h.sums[key.0][key.1].iter().map(|v| v / n).collect();
                let u = crate::quant::gptq::GptqPlan::new(&mean, cols, 0.01)?;
                *factor = Some((key, mean, u));
            }
            let (_, mean, u) = factor.as_ref().expect("just set");
            fp8::quantize_gptq(w, cols, style, mean, u)
        }
        (mode, _) => {
            let importance = c.stats.map(|st| st.site(c.layer, c.role.site()).mean_sq());
            fp8::quantize(w, cols, style, mode, importance.as_deref())
        }
    };
    Ok(m)
}

const COPIED_FILES: [&str; 5] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

/// A finished GGUF file, as its sidecar manifest records it.
struct GgufRecord<'a> {
    path: &'a std::path::Path,
    file: &'a WrittenFile,
    imatrix: Option<String>,
}

/// Writes the sidecar manifest of a finished GGUF file (through a temporary name), before the
/// file itself takes its name.
fn write_gguf_manifest(
    o: &ExportOptions,
    t: Target,
    r: &GgufRecord<'_>,
    stats: Option<&CalibStats>,
    ck: &Checkpoint,
    input_hashes: &[(String, String)],
    t0: Instant,
) -> Result<()> {
    use crate::export::manifest::{sidecar_path, GgufManifest};
    let m = GgufManifest {
        tool: "minitron-convert".into(),
        version: crate::VERSION.into(),
        command_line: o.command_line.clone(),
        target: t.name().into(),
        input: InputRecord {
            dir: ck.dir.display().to_string(),
            sha256: input_hashes.iter().cloned().collect(),
        },
        calibration: stats
            .filter(|_| r.imatrix.is_some())
            .map(|st| st.info.clone()),
        imatrix: r.imatrix.clone(),
        total_bytes: r.file.bytes,
        files: vec![r.file.clone()],
        wall_s: t0.elapsed().as_secs_f64(),
    };
    let p = sidecar_path(r.path);
    let tmp = crate::format::safetensors::temp_path(&p);
    let text = serde_json::to_string_pretty(&m).expect("json") + "\n";
    std::fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, &p).map_err(|e| Error::io(&p, e))
}

fn finish_ck(
    ck: &Checkpoint,
    o: &ExportOptions,
    calibration: Option<&crate::calib::CalibInfo>,
    s: CkSink,
    input_hashes: &[(String, String)],
    t0: Instant,
) -> Result<Manifest> {
    let mut files: Vec<WrittenFile> = s.writer.finish()?;
    let write = |name: &str, text: String, files: &mut Vec<WrittenFile>| -> Result<()> {
        let p = s.tmp.join(name);
        std::fs::write(&p, &text).map_err(|e| Error::io(&p, e))?;
        files.push(WrittenFile {
            file: name.into(),
            bytes: text.len() as u64,
            sha256: sha256_bytes(text.as_bytes()),
        });
        Ok(())
    };
    let searched = s.target == Target::W4A16 && o.int4_weights != Int4Method::Rtn;
    let qc = quantization_config(s.target, o.group_size, searched);
    let mut cfg = ck.config_json.clone();
    cfg["quantization_config"] = qc.clone();
    write(
        "config.json",
        serde_json::to_string_pretty(&cfg).expect("json") + "\n",
        &mut files,
    )?;
    if matches!(s.target, Target::Fp8ModelOpt | Target::Nvfp4ModelOpt) {
        let quantization = if s.target == Target::Nvfp4ModelOpt {
            serde_json::json!({"quant_algo": "NVFP4", "kv_cache_quant_algo": null,
                               "group_size": crate::quant::nvfp4::GROUP,
                               "exclude_modules": ["lm_head", "model.embed_tokens"]})
        } else {
            serde_json::json!({"quant_algo": "FP8_PER_CHANNEL_PER_TOKEN", "kv_cache_quant_algo": null,
                               "exclude_modules": ["lm_head"]})
        };
        let hq = serde_json::json!({
            "producer": {"name": "minitron", "version": crate::VERSION},
            "quantization": quantization,
        });
        write(
            "hf_quant_config.json",
            serde_json::to_string_pretty(&hq).expect("json") + "\n",
            &mut files,
        )?;
    }
    for f in COPIED_FILES {
        let src = ck.dir.join(f);
        if src.exists() {
            let dst = s.tmp.join(f);
            std::fs::copy(&src, &dst).map_err(|e| Error::io(&dst, e))?;
            let sha = crate::model::checkpoint::sha256_file(&dst)?;
            files.push(WrittenFile {
                file: f.into(),
                bytes: std::fs::metadata(&dst)
                    .map_err(|e| Error::io(&dst, e))?
                    .len(),
                sha256: sha,
            });
        }
    }
    let manifest = Manifest {
        tool: "minitron-convert".into(),
        version: crate::VERSION.into(),
        command_line: o.command_line.clone(),
        target: s.target.name().into(),
        fp8_weights: o.fp8_weights.name().into(),
        int8_weights: o.int8_weights.name().into(),
        int4_weights: (s.target == Target::W4A16).then(|| o.int4_weights.name().into()),
        input: InputRecord {
            dir: ck.dir.display().to_string(),
            sha256: input_hashes.iter().cloned().collect(),
        },
        calibration: calibration.cloned(),
        quantization_config: qc,
        total_bytes: files.iter().map(|f| f.bytes).sum(),
        files,
        smoothquant: (s.target == Target::Int8 || !s.alphas.is_empty()).then(|| {
            SmoothQuantRecord {
                alpha: match (s.target, o.smooth_alpha) {
                    (Target::W4A16, _) => serde_json::json!("awq"),
                    (_, None) => serde_json::json!("auto"),
                    (_, Some(a)) => serde_json::json!(a),
                },
                per_layer: s.alphas,
            }
        }),
        tensor_error: TensorError::new(s.errors),
        wall_s: t0.elapsed().as_secs_f64(),
    };
    let text = serde_json::to_string_pretty(&manifest).expect("json") + "\n";
    let p = s.tmp.join(crate::export::manifest::MANIFEST_FILE);
    std::fs::write(&p, text).map_err(|e| Error::io(&p, e))?;
    Ok(manifest)
}
