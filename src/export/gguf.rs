//! Hugging Face Llama checkpoint → GGUF for llama.cpp (formats/gguf.md#export).
//!
//! Float targets (`f32`, `f16`, `bf16`) are laid out as llama.cpp's converter lays them out
//! (extra tensors first, then the checkpoint's tensors in name order, metadata in its order).
//! Quantized targets are laid out as llama-quantize rewrites such a file: tensors sorted
//! (non-block tensors by name, then block by block), `general.quantization_version` and
//! `general.file_type` moved to the end, followed by the `quantize.imatrix.*` keys when an
//! importance matrix was used. Per-tensor types follow llama-quantize's mixes, including its
//! fallbacks for rows that are not a multiple of a k-quant's 256-value super-block.
//!
//! The checkpoint's tensors arrive from the export loop in its own order ([`GgufSink`]), each
//! written at its planned offset; one tensor is in memory at a time, and the file is written
//! under a temporary name and renamed when complete.

use std::path::{Path, PathBuf};

use crate::calib::Imatrix;
use crate::error::{Error, Result};
use crate::format::gguf::keys;
use crate::format::gguf::{GgmlType, GgufWriter, PlannedTensor, Value};
use crate::model::config::RopeScaling;
use crate::model::names;
use crate::model::{Checkpoint, Dtype};
use crate::quant::recipe::{block_of, tensor_type, Recipe};

/// Where an importance matrix came from (written as `quantize.imatrix.*`).
#[derive(Debug, Clone)]
pub struct ImatrixUse {
    pub imatrix: Imatrix,
    /// `--imatrix` path, or a label for one computed from `--calib`.
    pub file: String,
    /// Made by this run's calibration: each block's entries arrive when the block is
    /// calibrated ([`GgufSink::block_calibrated`]), before its tensors are quantized.
    pub from_run: bool,
}

impl ImatrixUse {
    /// An importance matrix read from `file`.
    pub fn read(file: &Path, c: &crate::model::LlamaConfig) -> Result<Self> {
        let imatrix = Imatrix::read(file)?;
        imatrix.check_against(c, file)?;
        Ok(ImatrixUse {
            imatrix,
            file: file.display().to_string(),
            from_run: false,
        })
    }

    /// The importance matrix this run's calibration (`info`) makes, block by block.
    pub fn from_run(info: &crate::calib::CalibInfo) -> Self {
        ImatrixUse {
            imatrix: Imatrix::empty(info),
            file: format!("(computed from {})", info.source),
            from_run: true,
        }
    }

    /// Entries in the matrix: every block linear layer's for one made by this run (the
    /// header is written before they arrive).
    fn entries_count(&self, c: &crate::model::LlamaConfig) -> usize {
        if self.from_run {
            names::LinearRole::ALL.len() * c.num_hidden_layers
        } else {
            self.imatrix.entries.len()
        }
    }
}

/// Everything one GGUF artifact needs besides the checkpoint.
#[derive(Debug, Clone)]
pub struct GgufOptions {
    pub recipe: Recipe,
    /// How hard the k-quant encoders search.
    pub search: crate::quant::ggml::KSearch,
    pub imatrix: Option<ImatrixUse>,
    /// `tokenizer.ggml.pre` when it cannot be detected.
    pub pre: Option<String>,
}

/// One tensor of the output: GGUF name, source, dims (innermost first), type.
#[derive(Debug, Clone)]
pub struct TensorPlan {
    pub name: String,
    source: Source,
    pub dims: Vec<u64>,
    pub ty: GgmlType,
}

#[derive(Debug, Clone)]
enum Source {
    /// A checkpoint tensor; `permute_heads`: Q/K rows reordered for `n` heads.
    Hf {
        name: String,
        permute_heads: Option<usize>,
    },
    RopeFreqs(Vec<f32>),
}

/// The `rope_freqs.weight` divisors of llama3 RoPE scaling (one per dimension pair), computed
/// with f32 base frequencies as llama.cpp's converter does.
pub fn rope_freq_factors(c: &crate::model::LlamaConfig) -> Option<Vec<f32>> {
    let RopeScaling::Llama3 {
        factor,
        low_freq_factor,
        high_freq_factor,
        original_max_position_embeddings,
    } = c.rope_scaling
    else {
        return None;
    };
    let d = c.head_dim;
    let old = original_max_position_embeddings as f64;
    let (low_wl, high_wl) = (old / low_freq_factor, old / high_freq_factor);
    Some(
        (0..d / 2)
            .map(|i| {
                let f = 1.0f32 / (c.rope_theta as f32).powf((2 * i) as f32 / d as f32);
                let wavelen = 2.0 * std::f64::consts::PI / f as f64;
                if wavelen < high_wl {
                    1.0
                } else if wavelen > low_wl {
                    factor as f32
                } else {
                    let smooth =
                        (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                    (1.0 / ((1.0 - smooth) / factor + smooth)) as f32
                }
            })
            .collect(),
    )
}

/// The output's tensors in file order with their types.
pub fn plan(ck: &Checkpoint, o: &GgufOptions) -> Result<Vec<TensorPlan>> {
    let c = &ck.config;
    let mut hf: Vec<&String> = ck.index.keys().collect();
    hf.sort();
    let has_output = ck.index.contains_key(names::LM_HEAD);
    let mut out = Vec::new();
    if let Some(f) = rope_freq_factors(c) {
        out.push(TensorPlan {
            name: crate::model::names::GGUF_ROPE_FREQS.into(),
            dims: vec![f.len() as u64],
            source: Source::RopeFreqs(f),
            ty: GgmlType::F32,
        });
    }
    for h in hf {
        let Some((name, permute_heads)) = names::gguf_name(c, h) else {
            continue;
        };
        let (_, info) = ck.info(h).expect("indexed");
        let dims: Vec<u64> = info.shape.iter().rev().map(|&d| d as u64).collect();
        out.push(TensorPlan {
            name,
            source: Source::Hf {
                name: h.clone(),
                permute_heads,
            },
            dims,
            ty: GgmlType::F32,
        });
    }
    for t in out.iter_mut() {
        t.ty = tensor_type(&o.recipe, &t.name, &t.dims, c.num_hidden_layers, has_output)?;
    }
    if !o.recipe.mix.is_float() {
        out.sort_by(|a, b| {
            let ka = (block_of(&a.name).map_or(-1, |v| v as i64), a.name.as_str());
            let kb = (block_of(&b.name).map_or(-1, |v| v as i64), b.name.as_str());
            ka.cmp(&kb)
        });
    }
    Ok(out)
}

/// The file [`GgufSink::create`] would write for `o`: its length in bytes and its tensors in
/// file order with their types.
pub fn planned(ck: &Checkpoint, o: &GgufOptions) -> Result<(u64, Vec<TensorPlan>)> {
    let md = metadata(ck, o)?;
    let plan = plan(ck, o)?;
    let planned: Vec<PlannedTensor> = plan
        .iter()
        .map(|t| PlannedTensor {
            name: t.name.clone(),
            dims: t.dims.clone(),
            ty: t.ty,
        })
        .collect();
    Ok((crate::format::gguf::file_size(&md, &planned)?, plan))
}

use crate::format::gguf::llama::{permute_row_bytes, permute_rows};

pub use crate::model::gguf_vocab::detect_pre;

/// `135M`, `4.5B`: llama.cpp-style size label from a parameter count.
fn size_label(n: u64) -> String {
    let (v, u) = if n >= 1_000_000_000 {
        (n as f64 / 1e9, "B")
    } else if n >= 1_000_000 {
        (n as f64 / 1e6, "M")
    } else {
        (n as f64 / 1e3, "K")
    };
    if v >= 100.0 {
        format!("{v:.0}{u}")
    } else {
        format!("{:.1}{u}", v).replace(".0", "")
    }
}

/// All metadata in file order.
fn metadata(ck: &Checkpoint, o: &GgufOptions) -> Result<Vec<(String, Value)>> {
    let c = &ck.config;
    let u = |v: usize| Value::U32(v as u32);
    let params: u64 = ck
        .index
        .keys()
        .filter_map(|n| {
            ck.info(n)
                .map(|(_, t)| t.shape.iter().product::<usize>() as u64)
        })
        .sum();
    let folder = ck
        .dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|f| f.to_string_lossy().into_owned()))
        .unwrap_or_else(|| "model".into());
    let mut md: Vec<(String, Value)> = vec![
        (
            keys::GENERAL_ARCHITECTURE.into(),
            Value::String("llama".into()),
        ),
        (keys::GENERAL_TYPE.into(), Value::String("model".into())),
        (keys::GENERAL_NAME.into(), Value::String(folder)),
        (
            keys::GENERAL_SIZE_LABEL.into(),
            Value::String(size_label(params)),
        ),
        (keys::LLAMA_BLOCK_COUNT.into(), u(c.num_hidden_layers)),
        (
            keys::LLAMA_CONTEXT_LENGTH.into(),
            u(c.max_position_embeddings),
        ),
        (keys::LLAMA_EMBEDDING_LENGTH.into(), u(c.hidden_size)),
        (
            keys::LLAMA_FEED_FORWARD_LENGTH.into(),
            u(c.intermediate_size),
        ),
        (keys::LLAMA_HEAD_COUNT.into(), u(c.num_attention_heads)),
        (keys::LLAMA_HEAD_COUNT_KV.into(), u(c.num_key_value_heads)),
        (
            keys::LLAMA_ROPE_FREQ_BASE.into(),
            Value::F32(c.rope_theta as f32),
        ),
        (
            keys::LLAMA_RMS_EPS.into(),
            Value::F32(c.rms_norm_eps as f32),
        ),
    ];
    if ck.config_json.get("head_dim").is_some() {
        md.push((keys::LLAMA_KEY_LENGTH.into(), u(c.head_dim)));
        md.push((keys::LLAMA_VALUE_LENGTH.into(), u(c.head_dim)));
    }
    let file_type = (
        keys::GENERAL_FILE_TYPE.to_string(),
        Value::U32(o.recipe.mix.file_type()),
    );
    let qv = (
        keys::GENERAL_QUANTIZATION_VERSION.to_string(),
        Value::U32(2),
    );
    if o.recipe.mix.is_float() {
        md.push(file_type.clone());
    }
    md.push((keys::LLAMA_VOCAB_SIZE.into(), u(c.vocab_size)));
    md.push((keys::LLAMA_ROPE_DIMENSION_COUNT.into(), u(c.head_dim)));
    if o.recipe.mix.is_float() {
        md.push(qv.clone());
    }
    md.extend(crate::model::gguf_vocab::tokenizer_metadata(
        ck,
        o.pre.as_deref(),
    )?);
    if !o.recipe.mix.is_float() {
        md.push(qv);
        md.push(file_type);
        if let Some(im) = &o.imatrix {
            md.push((
                keys::QUANTIZE_IMATRIX_FILE.into(),
                Value::String(im.file.clone()),
            ));
            md.push((
                keys::QUANTIZE_IMATRIX_DATASET.into(),
                Value::String(im.imatrix.datasets.first().cloned().unwrap_or_default()),
            ));
            md.push((
                keys::QUANTIZE_IMATRIX_ENTRIES.into(),
                Value::I32(im.entries_count(c) as i32),
            ));
            md.push((
                keys::QUANTIZE_IMATRIX_CHUNKS.into(),
                Value::I32(im.imatrix.chunk_count as i32),
            ));
        }
    }
    Ok(md)
}

/// Values converted and quantized at a time when a tensor is streamed in row chunks.
const CHUNK_VALUES: usize = 1 << 24;

/// What a GGUF artifact holds, for the log.
#[derive(Debug, Clone)]
pub struct GgufReport {
    pub path: PathBuf,
    pub bytes: u64,
    /// sha256 of the file (hex).
    pub sha256: String,
    /// The importance matrix used, if any (a file, or a note that calibration made it).
    pub imatrix: Option<String>,
    /// (GGUF name, type) in file order.
    pub tensors: Vec<(String, GgmlType)>,
}

/// One GGUF artifact being written: it takes the checkpoint's tensors in any order (each goes
/// to its planned place in the file) and writes the generated ones itself.
pub struct GgufSink {
    path: PathBuf,
    writer: GgufWriter,
    plan: Vec<TensorPlan>,
    /// Checkpoint tensor name → plan index.
    by_hf: std::collections::HashMap<String, usize>,
    imatrix: Option<ImatrixUse>,
    search: crate::quant::ggml::KSearch,
}

impl GgufSink {
    /// Plans `ck` under `o` and opens `out` (under a temporary name until [`Self::finish`]).
    pub fn create(ck: &Checkpoint, o: &GgufOptions, out: &Path) -> Result<Self> {
        Self::open(ck, o, out, None)
    }

    /// Reopens the temporary file of an interrupted run with the same plan; the tensors
    /// `written` marks (from [`Self::mark`]) are kept.
    pub fn resume(ck: &Checkpoint, o: &GgufOptions, out: &Path, written: &[bool]) -> Result<Self> {
        Self::open(ck, o, out, Some(written))
    }

    /// Waits until every tensor handed over is in the file; returns which are.
    pub fn mark(&mut self) -> Result<Vec<bool>> {
        self.writer.mark()
    }

    fn open(
        ck: &Checkpoint,
        o: &GgufOptions,
        out: &Path,
        written: Option<&[bool]>,
    ) -> Result<Self> {
        // One made by this run is filled block by block as the pipeline goes.
        if let Some(im) = o.imatrix.as_ref().filter(|im| !im.from_run) {
            im.imatrix.check_against(&ck.config, Path::new(&im.file))?;
        }
        let md = metadata(ck, o)?;
        let plan = plan(ck, o)?;
        let planned: Vec<PlannedTensor> = plan
            .iter()
            .map(|t| PlannedTensor {
                name: t.name.clone(),
                dims: t.dims.clone(),
                ty: t.ty,
            })
            .collect();
        let writer = match written {
            None => GgufWriter::create(out, &md, &planned)?,
            Some(w) => GgufWriter::resume(out, &md, &planned, w)?,
        };
        let by_hf = plan
            .iter()
            .enumerate()
            .filter_map(|(i, t)| match &t.source {
                Source::Hf { name, .. } => Some((name.clone(), i)),
                Source::RopeFreqs(_) => None,
            })
            .collect();
        let mut sink = GgufSink {
            path: out.to_owned(),
            writer,
            plan,
            by_hf,
            imatrix: o.imatrix.clone(),
            search: o.search,
        };
        for i in 0..sink.plan.len() {
            if written.is_some_and(|w| w[i]) {
                continue;
            }
            if let Source::RopeFreqs(f) = &sink.plan[i].source {
                let bytes = sink.quantize(i, f)?;
                sink.writer.write_at(i, &bytes)?;
            }
        }
        Ok(sink)
    }

    /// Where the file goes.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The importance matrix this file is quantized with, if any.
    pub fn imatrix_file(&self) -> Option<String> {
        self.imatrix.as_ref().map(|im| im.file.clone())
    }

    /// Block `l` is calibrated: an importance matrix made by this run takes its entries.
    pub fn block_calibrated(&mut self, l: usize, stats: &crate::calib::stats::LayerStats) {
        if let Some(im) = self.imatrix.as_mut().filter(|im| im.from_run) {
            im.imatrix.add_layer(l, stats);
        }
    }

    /// Whether checkpoint tensor `hf` goes into this file.
    pub fn wants(&self, hf: &str) -> bool {
        self.by_hf.contains_key(hf)
    }

    /// Quantizes rows of plan entry `i` with its importance vector, if any.
    fn quantize(&self, i: usize, v: &[f32]) -> Result<Vec<u8>> {
        let t = &self.plan[i];
        let ne0 = t.dims[0] as usize;
        let importance = match (&self.imatrix, t.ty) {
            (_, GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 | GgmlType::Q8_0) => None,
            (Some(im), _) => im.imatrix.entries.get(&t.name).map(|e| e.mean()),
            _ => None,
        };
        if let Some(imp) = &importance {
            if imp.len() != ne0 {
                return Err(Error::TensorMismatch {
                    path: PathBuf::from(&self.imatrix.as_ref().expect("present").file),
                    tensor: t.name.clone(),
                    expected: format!("{ne0} values"),
                    found: format!("{} values", imp.len()),
                });
            }
        }
        crate::quant::ggml::quantize_with(&t.ty, v, ne0, importance.as_deref(), self.search)
    }

    /// Writes checkpoint tensor `hf` from its f32 values (rows permuted here where GGUF wants).
    pub fn write_f32(&mut self, hf: &str, v: &[f32]) -> Result<()> {
        let Some(&i) = self.by_hf.get(hf) else {
            return Ok(());
        };
        let ne0 = self.plan[i].dims[0] as usize;
        let bytes = match &self.plan[i].source {
            Source::Hf {
                permute_heads: Some(h),
                ..
            } => self.quantize(i, &permute_rows(v, v.len() / ne0, ne0, *h))?,
            _ => self.quantize(i, v)?,
        };
        self.writer.write_owned(i, bytes)
    }

    /// Writes checkpoint tensor `hf` as its stored bytes when the file keeps its dtype (a bf16
    /// weight in a bf16 GGUF: rows only reordered where GGUF wants), and says whether it did.
    /// Nothing is converted, so the bytes are the checkpoint's exactly.
    pub fn write_same_dtype(&mut self, ck: &Checkpoint, hf: &str) -> Result<bool> {
        let Some(&i) = self.by_hf.get(hf) else {
            return Ok(true);
        };
        let (raw, info) = ck.raw(hf)?;
        let same = matches!(
            (info.dtype, self.plan[i].ty),
            (Dtype::BF16, GgmlType::BF16)
                | (Dtype::F16, GgmlType::F16)
                | (Dtype::F32, GgmlType::F32)
        );
        if !same {
            return Ok(false);
        }
        match &self.plan[i].source {
            Source::Hf {
                permute_heads: Some(h),
                ..
            } => {
                let rows = info.shape.first().copied().unwrap_or(1);
                self.writer
                    .write_owned(i, permute_row_bytes(raw, rows, *h))?
            }
            _ => self.writer.write_at(i, raw)?,
        }
        ck.release(hf);
        Ok(true)
    }

    /// Writes checkpoint tensor `hf` straight from its stored bytes, converted and quantized in
    /// row chunks of about 16M values (a 128k-row embedding never exists in f32 at once), the
    /// mapped pages released after each chunk.
    pub fn write_stored(&mut self, ck: &Checkpoint, hf: &str) -> Result<()> {
        let Some(&i) = self.by_hf.get(hf) else {
            return Ok(());
        };
        if matches!(
            self.plan[i].source,
            Source::Hf {
                permute_heads: Some(_),
                ..
            }
        ) {
            return self.write_f32(hf, &ck.read_f32(hf)?);
        }
        let ne0 = self.plan[i].dims[0] as usize;
        let (raw, info) = ck.raw(hf)?;
        let es = info.dtype.size();
        let rows_per = (CHUNK_VALUES / ne0).max(1);
        let mut out = Vec::new();
        for part in raw.chunks(rows_per * ne0 * es) {
            let v = crate::numerics::convert::to_f32(part, info.dtype).ok_or_else(|| {
                Error::TensorMismatch {
                    path: ck.dir.clone(),
                    tensor: hf.to_owned(),
                    expected: "a float dtype".into(),
                    found: info.dtype.to_string(),
                }
            })?;
            out.extend_from_slice(&self.quantize(i, &v)?);
            ck.release(hf);
        }
        self.writer.write_owned(i, out)
    }

    /// Checks every tensor was written, then renames the file into place.
    pub fn finish(self) -> Result<GgufReport> {
        self.finish_then(|_| Ok(()))
    }

    /// [`Self::finish`], with `before_rename` run on the finished file's record (name, size,
    /// sha256) before it takes its name: the sidecar manifest is written there.
    pub fn finish_then(
        self,
        before_rename: impl FnOnce(&crate::format::safetensors::WrittenFile) -> Result<()>,
    ) -> Result<GgufReport> {
        let file = self.writer.finish_then(before_rename)?;
        Ok(GgufReport {
            path: self.path,
            bytes: file.bytes,
            sha256: file.sha256,
            imatrix: self.imatrix.map(|im| im.file),
            tensors: self.plan.iter().map(|t| (t.name.clone(), t.ty)).collect(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_labels() {
        assert_eq!(size_label(134_515_008), "135M");
        assert_eq!(size_label(4_540_469_248), "4.5B");
    }
}
