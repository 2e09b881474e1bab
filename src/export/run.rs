//! The export loop: every target's sink opened up front, one calibration, then each input tensor
//! read once and handed to every sink that holds it; artifacts renamed into place only when all
//! of them are complete.

use std::path::PathBuf;
use std::time::Instant;

use crate::calib::{BlockCalibration, CalibInputs, CalibStats};
use crate::error::{Error, Result};
use crate::export::gguf::{GgufOptions, GgufReport, GgufSink, ImatrixUse};
use crate::export::journal::{CkRecord, Journal, Record};
use crate::export::linear::CkSink;
use crate::export::manifest::{InputRecord, Manifest, SmoothQuantRecord, TensorError};
pub use crate::export::options::{model_name, ExportOptions, GgufSettings};
use crate::export::pipeline::{export_loop, Sinks, Start};
use crate::export::plan::plan;
use crate::format::safetensors::{
    begin_dir, commit_dir, partial_dir, sha256_bytes, temp_path, ShardedWriter, WrittenFile,
};
use crate::model::synth::MAX_SHARD_BYTES;
use crate::model::Checkpoint;
use crate::quant::recipe::Recipe;
use crate::scheme::Target;

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
    /// Passes over calibration text (0, 1, or 2 when GGUF importance matrices from this run
    /// share it with second moments).
    pub calibration_passes: usize,
    /// What blocks were calibrated on, when a pass ran.
    pub calib_inputs: Option<CalibInputs>,
    /// Input tensors read (each once) and their bytes.
    pub tensors_read: usize,
    pub bytes_read: u64,
    pub wall_s: f64,
}

/// Refuses, before any work, a request that cannot succeed: a quantized input, an output inside
/// the input, unreadable input files, targets that cannot share a run, outputs in the way, group
/// sizes that do not divide the layers.
fn check_request(ck: &Checkpoint, o: &ExportOptions) -> Result<()> {
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
    let smoothing: Vec<Target> = o
        .targets
        .iter()
        .copied()
        .filter(|&t| o.smoothing(t).is_some())
        .collect();
    if let [a, b, ..] = smoothing[..] {
        return Err(Error::Invalid(format!(
            "--to {a} and --to {b} (with these weight methods) both smooth the block inputs into the norm weights, each its own way: convert them in two runs"
        )));
    }
    o.propagation()?;
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
    for (t, scheme) in o.schemes() {
        // A mixed checkpoint's kinds were chosen (or checked) against each layer's width.
        if !o.layers_of(t).is_empty() {
            continue;
        }
        if let Some((g, fixed)) = scheme.input_group(t, &o.methods()) {
            let c = &ck.config;
            let widths = [c.hidden_size, c.q_dim(), c.intermediate_size];
            if g == 0 || widths.iter().any(|w| w % g != 0) {
                let fix = if fixed {
                    format!("{t}'s group size is fixed")
                } else {
                    "choose one with --group-size".to_owned()
                };
                return Err(Error::Invalid(format!(
                    "{t}: group size {g} must divide every linear layer's input width ({widths:?}); {fix}"
                )));
            }
        }
    }
    Ok(())
}

/// The importance matrix every GGUF file of this run is quantized with: `--imatrix`'s, or
/// one made by this run's calibration (on original inputs, the bf16 model's activations as
/// llama.cpp's imatrix defines them) block by block as the pipeline reaches each block.
fn gguf_imatrix(
    ck: &Checkpoint,
    o: &ExportOptions,
    bc: &BlockCalibration<'_>,
) -> Result<Option<ImatrixUse>> {
    if let Some(p) = &o.gguf.imatrix {
        return Ok(Some(ImatrixUse::read(p, &ck.config)?));
    }
    if !o.gguf_from_calibration() {
        return Ok(None);
    }
    let info = bc
        .info()
        .ok_or_else(|| Error::Internal("a calibrated GGUF target without calibration".into()))?;
    Ok(Some(ImatrixUse::from_run(info)))
}

/// Runs the export; `progress(done, total)` counts input bytes converted.
pub fn run(
    ck: &Checkpoint,
    o: &ExportOptions,
    device: &candle_core::Device,
    progress: &dyn Fn(u64, u64),
) -> Result<ExportReport> {
    check_request(ck, o)?;
    let (inputs_mode, propagate) = o.propagation()?;
    // With several targets `out` is their folder; made when the sinks open, removed again if
    // the export fails and it was ours.
    let out_existed = o.out.exists();
    crate::runtime::tune_allocator();
    let t0 = Instant::now();
    let (mut journal, rec) = Journal::open(ck, o)?;
    if let Some(r) = &rec {
        crate::progress::note(&format!(
            "resuming from the journal in {}: {} of the input tensors are written",
            journal.dir().display(),
            r.next_item
        ));
    }
    let src = crate::runtime::load::safetensors::SafetensorsSource::borrowed(ck);
    let mut bc = BlockCalibration::start(ck, &src, &o.calib, o.needs(), inputs_mode, device)?;
    let passes = usize::from(bc.runs());
    let imatrix = gguf_imatrix(ck, o, &bc)?;
    let mut sinks = Sinks {
        ck: Vec::new(),
        gguf: Vec::new(),
    };
    let opened = open_sinks(ck, o, imatrix, &mut sinks, rec.as_ref()).and_then(|()| match &rec {
        Some(r) => bc.restore_state(journal.dir(), &r.calib),
        None => Ok(()),
    });
    // Every partial folder opened, removed again if anything below fails (finishing drains the
    // sinks, so they cannot be asked afterwards).
    let partials: Vec<PathBuf> = o
        .targets
        .iter()
        .filter(|t| t.mix().is_none())
        .map(|&t| partial_dir(&o.path(t, ck)))
        .collect();
    let start = rec.as_ref().map_or_else(Start::default, |r| Start {
        next_item: r.next_item,
        tensors_read: r.tensors_read,
        bytes_read: r.bytes_read,
    });
    let result = opened.and_then(|()| {
        // The inputs' sha256 (for the manifests) is taken on its own thread while the loop
        // runs over the same, already mapped pages.
        let (looped, input_hashes) = std::thread::scope(|sc| {
            let h = sc.spawn(|| ck.input_hashes_on(false));
            let looped = export_loop(
                ck,
                o,
                &mut bc,
                propagate,
                &mut sinks,
                &mut journal,
                start,
                progress,
            );
            let hashes = h
                .join()
                .unwrap_or_else(|_| Err(Error::Internal("input hashing panicked".into())));
            (looped, hashes)
        });
        let (tensors, bytes) = looped?;
        let input_hashes = input_hashes?;
        let (stats, info) = bc.finish()?;
        let cal = Finished {
            stats: stats.as_ref(),
            info: info.as_ref(),
            inputs: inputs_mode,
            hashes: &input_hashes,
            t0,
        };
        let done = finish_all(ck, o, &cal, &mut sinks)?;
        Ok((tensors, bytes, done, info))
    });
    let (tensors_read, bytes_read, done, info) = match result {
        Ok(v) => v,
        Err(e) => {
            drop(sinks);
            remove_partial_outputs(ck, o, &partials, rec.is_some(), out_existed);
            journal.remove();
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
    journal.remove();
    artifacts.sort_by_key(|(t, _)| o.targets.iter().position(|x| x == t));
    Ok(ExportReport {
        artifacts,
        calibrated: if info.is_some() {
            o.calibrated_targets()
        } else {
            Vec::new()
        },
        calibration: info,
        calibration_passes: passes,
        calib_inputs: (passes > 0).then_some(inputs_mode),
        tensors_read,
        bytes_read,
        wall_s: t0.elapsed().as_secs_f64(),
    })
}

/// After a failed export (its sinks dropped: GGUF writers remove their temporary files then),
/// removes the partial checkpoint folders, an interrupted run's GGUF temporaries when this run
/// resumed it, and the multi-target folder if this run made it.
fn remove_partial_outputs(
    ck: &Checkpoint,
    o: &ExportOptions,
    partials: &[PathBuf],
    resumed: bool,
    out_existed: bool,
) {
    for tmp in partials {
        let _ = std::fs::remove_dir_all(tmp);
    }
    if resumed {
        for t in o.targets.iter().filter(|t| t.mix().is_some()) {
            let _ = std::fs::remove_file(temp_path(&o.path(*t, ck)));
        }
    }
    if !out_existed && o.targets.len() > 1 {
        let _ = std::fs::remove_dir(&o.out);
    }
}

/// What the finished calibration gives the manifests.
struct Finished<'a> {
    stats: Option<&'a CalibStats>,
    info: Option<&'a crate::calib::CalibInfo>,
    inputs: CalibInputs,
    hashes: &'a [(String, String)],
    t0: Instant,
}

/// Finishes every sink: checkpoint folders get their config, copied files and manifest (still
/// under their partial names), GGUF files their sidecar manifest and final name.
fn finish_all(
    ck: &Checkpoint,
    o: &ExportOptions,
    cal: &Finished<'_>,
    sinks: &mut Sinks,
) -> Result<Vec<(Target, Artifact, Option<PathBuf>)>> {
    let mut done: Vec<(Target, Artifact, Option<PathBuf>)> = Vec::new();
    for s in sinks.ck.drain(..) {
        let (t, path, tmp) = (s.target, s.out.clone(), s.tmp.clone());
        let manifest = Box::new(finish_ck(ck, o, cal, s)?);
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
            write_gguf_manifest(o, t, &m, cal.stats, ck, cal.hashes, cal.t0)
        })?;
        done.push((t, Artifact::Gguf(r), None));
    }
    Ok(done)
}

/// Opens every target's sink: new, or (`rec`) continued from an interrupted run's journal.
fn open_sinks(
    ck: &Checkpoint,
    o: &ExportOptions,
    imatrix: Option<ImatrixUse>,
    sinks: &mut Sinks,
    rec: Option<&Record>,
) -> Result<()> {
    let mut ck_recs = rec.map(|r| r.ck.iter());
    let mut gguf_recs = rec.map(|r| r.gguf.iter());
    let mismatch = |t: Target| {
        Error::Internal(format!(
            "the journal's artifacts do not match this run's targets (at {t})"
        ))
    };
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
                        exact: o.gguf.tensor_types.clone(),
                    },
                    imatrix: imatrix.clone(),
                    pre: o.gguf.pre.clone(),
                    search: o.gguf.search,
                };
                let sink = match gguf_recs.as_mut() {
                    None => GgufSink::create(ck, &g, &out)?,
                    Some(recs) => {
                        let r = recs.next().filter(|r| r.target == t.name());
                        let r = r.ok_or_else(|| mismatch(t))?;
                        GgufSink::resume(ck, &g, &out, &r.written)?
                    }
                };
                sinks.gguf.push((t, sink));
            }
            None => {
                let r = match ck_recs.as_mut() {
                    None => None,
                    Some(recs) => Some(
                        recs.next()
                            .filter(|r| r.target == t.name())
                            .ok_or_else(|| mismatch(t))?,
                    ),
                };
                let tmp = match r {
                    None => begin_dir(&out, o.force)?,
                    Some(_) => {
                        let tmp = partial_dir(&out);
                        if !tmp.is_dir() {
                            return Err(Error::Invalid(format!(
                                "the journal continues {}, which is gone; start over with --force instead of --resume",
                                tmp.display()
                            )));
                        }
                        tmp
                    }
                };
                let planned = plan(t, ck, o.group_size, &o.layers_of(t))?;
                let writer = match r {
                    None => ShardedWriter::create(&tmp, planned, MAX_SHARD_BYTES),
                    Some(r) => {
                        ShardedWriter::resume(&tmp, planned, MAX_SHARD_BYTES, r.writer.clone())
                    }
                };
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
                    errors: r.map(CkRecord::errors).unwrap_or_default(),
                    layers: o.layers_of(t),
                    alphas: r.map(CkRecord::alphas).unwrap_or_default(),
                });
            }
        }
    }
    Ok(())
}

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
    cal: &Finished<'_>,
    s: CkSink,
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
    let scheme = crate::scheme::of(s.target)
        .ok_or_else(|| Error::Internal(format!("{} is not a checkpoint target", s.target)))?;
    let qc = if s.layers.is_empty() {
        scheme.config(s.target, &o.methods())
    } else {
        crate::scheme::mixed_config(&s.layers, &o.methods())
    };
    let mut cfg = ck.config_json.clone();
    cfg["quantization_config"] = qc.clone();
    write(
        "config.json",
        serde_json::to_string_pretty(&cfg).expect("json") + "\n",
        &mut files,
    )?;
    for (name, text) in scheme.side_files(s.target) {
        write(name, text, &mut files)?;
    }
    copy_side_files(ck, &s.tmp, &mut files)?;
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
            sha256: cal.hashes.iter().cloned().collect(),
        },
        calibration: cal.info.cloned(),
        calib_inputs: cal.info.map(|_| cal.inputs.name().to_owned()),
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
        wall_s: cal.t0.elapsed().as_secs_f64(),
    };
    let text = serde_json::to_string_pretty(&manifest).expect("json") + "\n";
    let p = s.tmp.join(crate::export::manifest::MANIFEST_FILE);
    std::fs::write(&p, text).map_err(|e| Error::io(&p, e))?;
    Ok(manifest)
}

/// Copies the tokenizer and generation files the input has into folder `dir`.
fn copy_side_files(
    ck: &Checkpoint,
    dir: &std::path::Path,
    files: &mut Vec<WrittenFile>,
) -> Result<()> {
    for f in COPIED_FILES {
        let src = ck.dir.join(f);
        if src.exists() {
            let dst = dir.join(f);
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
    Ok(())
}
