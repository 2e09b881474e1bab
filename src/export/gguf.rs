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

use serde_json::{json, Value as Json};

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

use crate::format::gguf::llama::{permute_row_bytes, permute_rows};

/// Detects llama.cpp's pre-tokenizer name from tokenizer.json's `pre_tokenizer`.
pub fn detect_pre(tokenizer: &Json) -> Option<&'static str> {
    let pre = tokenizer.get("pre_tokenizer")?;
    let parts: Vec<&Json> = match pre.get("type")?.as_str()? {
        "Sequence" => pre.get("pretokenizers")?.as_array()?.iter().collect(),
        _ => vec![pre],
    };
    let kinds: Vec<&str> = parts
        .iter()
        .filter_map(|p| p.get("type")?.as_str())
        .collect();
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    match kinds.as_slice() {
        ["Split", "ByteLevel"] => {
            let re = parts[0].get("pattern")?.get("Regex")?.as_str()?;
            (re == LLAMA3).then_some("llama-bpe")
        }
        ["Digits", "ByteLevel"] => {
            let individual = parts[0].get("individual_digits")?.as_bool()?;
            let byte_regex = parts[1].get("use_regex")?.as_bool()?;
            (individual && byte_regex).then_some("smollm")
        }
        _ => None,
    }
}

fn read_json(p: &Path) -> Result<Option<Json>> {
    if !p.exists() {
        return Ok(None);
    }
    let t = std::fs::read_to_string(p).map_err(|e| Error::io(p, e))?;
    serde_json::from_str(&t)
        .map(Some)
        .map_err(|e| Error::format(p, format!("not valid JSON: {e}")))
}

/// Tokenizer metadata (`tokenizer.*` keys) in llama.cpp's order.
fn tokenizer_metadata(ck: &Checkpoint, o: &GgufOptions) -> Result<Vec<(String, Value)>> {
    let tpath = ck.dir.join("tokenizer.json");
    let tj = read_json(&tpath)?
        .ok_or_else(|| Error::format(&ck.dir, "no tokenizer.json in this folder"))?;
    let tc = read_json(&ck.dir.join("tokenizer_config.json"))?.unwrap_or(json!({}));
    let model = tj
        .get("model")
        .ok_or_else(|| Error::format(&tpath, "no `model` section"))?;
    if model.get("type").and_then(|t| t.as_str()) != Some("BPE") {
        return Err(Error::Unsupported(format!(
            "{}: only byte-level BPE tokenizers are exported to GGUF",
            tpath.display()
        )));
    }
    let n_vocab = ck.config.vocab_size;
    let mut tokens: Vec<Option<String>> = vec![None; n_vocab];
    let mut kinds = vec![1i32; n_vocab];
    let vocab = model
        .get("vocab")
        .and_then(|v| v.as_object())
        .ok_or_else(|| Error::format(&tpath, "no BPE vocab"))?;
    let mut by_text = std::collections::HashMap::new();
    for (t, id) in vocab {
        if let Some(i) = id.as_u64().map(|v| v as usize).filter(|&i| i < n_vocab) {
            tokens[i] = Some(t.clone());
            by_text.insert(t.clone(), i as u32);
        }
    }
    for a in tj
        .get("added_tokens")
        .and_then(|v| v.as_array())
        .into_iter()
        .flatten()
    {
        let (Some(i), Some(t)) = (
            a.get("id").and_then(|v| v.as_u64()),
            a.get("content").and_then(|v| v.as_str()),
        ) else {
            continue;
        };
        let i = i as usize;
        if i >= n_vocab {
            continue;
        }
        tokens[i] = Some(t.to_string());
        by_text.insert(t.to_string(), i as u32);
        let special = a.get("special").and_then(|v| v.as_bool()).unwrap_or(false);
        let looks = (t.starts_with("<|") && t.ends_with("|>"))
            || ["<pad>", "<mask>", "<2mass>", "[@BOS@]"].contains(&t)
            || (t.starts_with("<unused") && t.ends_with('>'));
        kinds[i] = if special || looks { 3 } else { 4 };
    }
    let mut names = Vec::with_capacity(n_vocab);
    for (i, t) in tokens.into_iter().enumerate() {
        match t {
            Some(t) => names.push(t),
            None => {
                names.push(format!("[PAD{i}]"));
                kinds[i] = 5;
            }
        }
    }
    let merges: Vec<String> = model
        .get("merges")
        .and_then(|m| m.as_array())
        .into_iter()
        .flatten()
        .filter_map(|m| match m {
            Json::String(s) => Some(s.clone()),
            Json::Array(p) => Some(format!("{} {}", p.first()?.as_str()?, p.get(1)?.as_str()?)),
            _ => None,
        })
        .collect();
    let pre = match (&o.pre, detect_pre(&tj)) {
        (Some(p), _) => p.clone(),
        (None, Some(p)) => p.to_string(),
        (None, None) => {
            return Err(Error::Unsupported(format!(
                "{}: the pre-tokenizer is not one llama.cpp knows by structure (Llama-3's split pattern or SmolLM's digit split); name it with --gguf-pre (e.g. llama-bpe)",
                tpath.display()
            )))
        }
    };
    let mut md: Vec<(String, Value)> = Vec::new();
    if let Some(b) = tc.get("add_prefix_space").and_then(|v| v.as_bool()) {
        md.push((keys::TOKENIZER_ADD_SPACE_PREFIX.into(), Value::Bool(b)));
    }
    md.push((keys::TOKENIZER_MODEL.into(), Value::String("gpt2".into())));
    md.push((keys::TOKENIZER_PRE.into(), Value::String(pre)));
    md.push((keys::TOKENIZER_TOKENS.into(), Value::strings(names)));
    md.push((
        keys::TOKENIZER_TOKEN_TYPE.into(),
        Value::Array(5, kinds.into_iter().map(Value::I32).collect()),
    ));
    md.push((keys::TOKENIZER_MERGES.into(), Value::strings(merges)));
    // Special ids: tokenizer_config.json's tokens first, then config.json's ids for the rest.
    let kinds = [
        ("bos", keys::TOKENIZER_BOS_ID),
        ("eos", keys::TOKENIZER_EOS_ID),
        ("unk", keys::TOKENIZER_UNK_ID),
        ("sep", keys::TOKENIZER_SEP_ID),
        ("pad", keys::TOKENIZER_PAD_ID),
        ("cls", keys::TOKENIZER_CLS_ID),
        ("mask", keys::TOKENIZER_MASK_ID),
    ];
    let mut found: Vec<(usize, u32)> = Vec::new();
    for (k, (typ, _)) in kinds.iter().enumerate() {
        let id = match tc.get(format!("{typ}_token")) {
            Some(Json::String(s)) => by_text.get(s).copied(),
            Some(Json::Object(m)) => m
                .get("content")
                .and_then(|c| c.as_str())
                .and_then(|s| by_text.get(s).copied()),
            _ => None,
        };
        if let Some(id) = id {
            found.push((k, id));
        }
    }
    for (k, (typ, _)) in kinds.iter().enumerate() {
        if found.iter().any(|(f, _)| *f == k) {
            continue;
        }
        let v = ck.config_json.get(format!("{typ}_token_id"));
        let id = match v {
            Some(Json::Number(n)) => n.as_u64(),
            Some(Json::Array(a)) => a.first().and_then(|x| x.as_u64()),
            _ => None,
        };
        if let Some(id) = id.filter(|&i| (i as usize) < n_vocab) {
            found.push((k, id as u32));
        }
    }
    for (k, id) in found {
        md.push((kinds[k].1.to_string(), Value::U32(id)));
    }
    // add_bos/add_eos: tokenizer_config.json's flags, else the post-processor's template.
    let (mut add_bos, mut add_eos) = (
        tc.get("add_bos_token").and_then(|v| v.as_bool()),
        tc.get("add_eos_token").and_then(|v| v.as_bool()),
    );
    if add_bos.is_none() && add_eos.is_none() {
        if let Some(single) = template_single(&tj) {
            let specials: Vec<bool> = single
                .iter()
                .map(|p| p.get("SpecialToken").is_some())
                .collect();
            add_bos = Some(specials.first().copied().unwrap_or(false));
            add_eos = Some(specials.len() > 1 && specials.last().copied().unwrap_or(false));
        }
    }
    if let Some(b) = add_bos {
        md.push((keys::TOKENIZER_ADD_BOS.into(), Value::Bool(b)));
    }
    if let Some(e) = add_eos {
        md.push((keys::TOKENIZER_ADD_EOS.into(), Value::Bool(e)));
    }
    if let Some(t) = tc.get("chat_template").and_then(|v| v.as_str()) {
        md.push((
            keys::TOKENIZER_CHAT_TEMPLATE.into(),
            Value::String(t.into()),
        ));
    }
    Ok(md)
}

/// The `single` template of a TemplateProcessing post-processor (alone or in a Sequence).
fn template_single(tj: &Json) -> Option<&Vec<Json>> {
    let pp = tj.get("post_processor")?;
    let procs: Vec<&Json> = match pp.get("type")?.as_str()? {
        "Sequence" => pp.get("processors")?.as_array()?.iter().collect(),
        _ => vec![pp],
    };
    procs
        .into_iter()
        .find(|p| p.get("type").and_then(|t| t.as_str()) == Some("TemplateProcessing"))?
        .get("single")?
        .as_array()
}

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
    md.extend(tokenizer_metadata(ck, o)?);
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
                Value::I32(im.imatrix.entries.len() as i32),
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
        if let Some(im) = &o.imatrix {
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
        let writer = GgufWriter::create(out, &md, &planned)?;
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
