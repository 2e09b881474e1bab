//! A Hugging Face checkpoint folder: config, tokenizer files and safetensors weights, one file or
//! shards listed in `model.safetensors.index.json`.
//!
//! Weights are memory-mapped and read lazily. Every safetensors header is parsed and checked by
//! our own code (formats/hf-llama.md#safetensors) so a damaged file is reported with the file and
//! tensor at fault instead of a generic parse failure.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::model::config::LlamaConfig;
use crate::model::names::{expected_tensors, part, TensorRole, TensorSpec, EMBED, LM_HEAD};
pub use crate::numerics::dtype::Dtype;

pub use crate::format::safetensors::{SafetensorsFile, TensorInfo};

/// A checkpoint folder, opened and checked against its config.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub config: LlamaConfig,
    /// The raw config.json object, kept so writers can copy unknown keys through.
    pub config_json: Value,
    pub files: Vec<SafetensorsFile>,
    /// Tensor name → index into `files`.
    pub index: BTreeMap<String, usize>,
    /// Tensors present in the files that the architecture does not use.
    pub unexpected: Vec<String>,
}

impl Checkpoint {
    /// Opens `dir`, validates config.json and every weight file, and checks that each tensor the
    /// architecture needs is present with the expected shape and a float dtype.
    pub fn open(dir: &Path) -> Result<Self> {
        let config_path = dir.join("config.json");
        let config = LlamaConfig::from_file(&config_path)?;
        let config_json: Value = serde_json::from_str(
            &std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?,
        )
        .map_err(|e| Error::format(&config_path, format!("not valid JSON: {e}")))?;

        // The index is read once: it names the shards and is checked against them below.
        let map = weight_map(dir)?;
        let shard_names = files_of(dir, map.as_deref())?;
        let files = shard_names
            .par_iter()
            .map(|p| SafetensorsFile::open(p))
            .collect::<Result<Vec<_>>>()?;
        let mut index = BTreeMap::new();
        for (i, f) in files.iter().enumerate() {
            for name in f.tensors.keys() {
                if let Some(prev) = index.insert(name.clone(), i) {
                    return Err(Error::format(
                        &f.path,
                        format!(
                            "tensor `{name}` also appears in {}",
                            files[prev].path.display()
                        ),
                    ));
                }
            }
        }
        if let Some(map) = &map {
            let idx = dir.join("model.safetensors.index.json");
            for (t, f) in map {
                let holds = files
                    .iter()
                    .any(|x| x.path.file_name() == Some(f.as_ref()) && x.tensors.contains_key(t));
                if !holds {
                    return Err(Error::format(
                        &idx,
                        format!("weight_map puts tensor `{t}` in {f}, which does not hold it"),
                    ));
                }
            }
        }
        let ck = Checkpoint {
            dir: dir.to_owned(),
            config,
            config_json,
            files,
            index,
            unexpected: Vec::new(),
        };
        ck.validate()
    }

    fn validate(mut self) -> Result<Self> {
        let specs = expected_tensors(&self.config);
        let quantized = self.config_json.get("quantization_config").is_some();
        let mut known = std::collections::BTreeSet::new();
        for spec in &specs {
            known.insert(spec.name.clone());
            // A quantized checkpoint's linear layers are checked by their scheme
            // (`scheme::open`): their weight may be stored under other names and dtypes.
            let stem = spec.name.strip_suffix(".weight").unwrap_or(&spec.name);
            if quantized
                && matches!(spec.role, TensorRole::Linear(..))
                && (self.index.contains_key(&spec.name)
                    || part::ALL
                        .iter()
                        .any(|p| self.index.contains_key(&part::of(stem, p))))
            {
                continue;
            }
            if !self.index.contains_key(&spec.name) {
                if spec.optional {
                    continue;
                }
                return Err(Error::MissingTensor {
                    path: self.weights_label(),
                    tensor: spec.name.clone(),
                    expected: format!("shape {:?}", spec.shape),
                });
            }
            self.check_float(spec)?;
        }
        self.check_tied_head()?;
        self.unexpected = self
            .index
            .keys()
            .filter(|n| {
                !known.contains(*n)
                    && !n.ends_with("rotary_emb.inv_freq")
                    && !part::ALL
                        .iter()
                        .any(|s| n.strip_suffix(s).is_some_and(|r| r.ends_with('.')))
            })
            .cloned()
            .collect();
        Ok(self)
    }

    /// Tensor `name` must have `shape`.
    pub fn check_shape(&self, name: &str, shape: &[usize]) -> Result<()> {
        let Some((f, t)) = self.info(name) else {
            return Err(Error::MissingTensor {
                path: self.weights_label(),
                tensor: name.into(),
                expected: format!("shape {shape:?}"),
            });
        };
        if t.shape != shape {
            return Err(Error::TensorMismatch {
                path: f.path.clone(),
                tensor: name.into(),
                expected: format!("shape {shape:?}"),
                found: format!("shape {:?}", t.shape),
            });
        }
        Ok(())
    }

    /// Tensor `spec` stored as floats: its shape, and a bf16, f16 or f32 dtype.
    pub fn check_float(&self, spec: &TensorSpec) -> Result<()> {
        if spec.optional && !self.index.contains_key(&spec.name) {
            return Ok(());
        }
        self.check_shape(&spec.name, &spec.shape)?;
        let (f, t) = self.info(&spec.name).expect("checked above");
        if !matches!(t.dtype, Dtype::BF16 | Dtype::F16 | Dtype::F32) {
            return Err(Error::TensorMismatch {
                path: f.path.clone(),
                tensor: spec.name.clone(),
                expected: "dtype BF16, F16 or F32".into(),
                found: format!("dtype {}", t.dtype),
            });
        }
        Ok(())
    }

    /// With `tie_word_embeddings` the head is the embedding matrix. A stored `lm_head.weight` is
    /// accepted only as an exact copy: a different head means the config and the weights
    /// disagree about the model, and either reading would silently drop one of them.
    fn check_tied_head(&self) -> Result<()> {
        if !self.config.tie_word_embeddings {
            return Ok(());
        }
        let Some((head, ht)) = self.info(LM_HEAD) else {
            return Ok(());
        };
        let (embed, et) = self.raw(EMBED)?;
        let hb = head.bytes(LM_HEAD).expect("indexed tensor");
        let found = if ht.dtype != et.dtype {
            Some(format!(
                "dtype {} where the embeddings are {}",
                ht.dtype, et.dtype
            ))
        } else {
            let w = ht.dtype.size().max(1);
            hb.chunks(w)
                .zip(embed.chunks(w))
                .position(|(a, b)| a != b)
                .map(|i| format!("a different matrix (first difference at element {i})"))
        };
        match found {
            None => Ok(()),
            Some(found) => Err(Error::TensorMismatch {
                path: head.path.clone(),
                tensor: LM_HEAD.into(),
                expected: format!(
                    "absent or equal to `{EMBED}` (config.json sets tie_word_embeddings = true)"
                ),
                found,
            }),
        }
    }

    fn weights_label(&self) -> PathBuf {
        let idx = self.dir.join("model.safetensors.index.json");
        if idx.exists() {
            idx
        } else {
            self.dir.join("model.safetensors")
        }
    }

    /// Header entry and file of tensor `name`.
    pub fn info(&self, name: &str) -> Option<(&SafetensorsFile, &TensorInfo)> {
        let f = &self.files[*self.index.get(name)?];
        Some((f, &f.tensors[name]))
    }

    /// Tensor `name` widened to f32, in row-major order.
    pub fn read_f32(&self, name: &str) -> Result<Vec<f32>> {
        let (f, t) = self.info(name).ok_or_else(|| Error::MissingTensor {
            path: self.weights_label(),
            tensor: name.into(),
            expected: "present".into(),
        })?;
        let bytes = f.bytes(name).expect("indexed tensor");
        crate::numerics::convert::to_f32(bytes, t.dtype).ok_or_else(|| Error::TensorMismatch {
            path: f.path.clone(),
            tensor: name.into(),
            expected: "a float dtype".into(),
            found: t.dtype.to_string(),
        })
    }

    /// See [`SafetensorsFile::release`].
    pub fn release(&self, name: &str) {
        if let Some((f, _)) = self.info(name) {
            f.release(name);
        }
    }

    /// See [`SafetensorsFile::release_range`].
    pub fn release_range(&self, name: &str, range: std::ops::Range<usize>) {
        if let Some((f, _)) = self.info(name) {
            f.release_range(name, range);
        }
    }

    /// Raw bytes and header entry of tensor `name`.
    pub fn raw(&self, name: &str) -> Result<(&[u8], &TensorInfo)> {
        let (f, t) = self.info(name).ok_or_else(|| Error::MissingTensor {
            path: self.weights_label(),
            tensor: name.into(),
            expected: "present".into(),
        })?;
        Ok((f.bytes(name).expect("indexed tensor"), t))
    }

    /// Expected tensors of this architecture, in canonical order.
    pub fn specs(&self) -> Vec<TensorSpec> {
        expected_tensors(&self.config)
    }

    /// Total parameters over the tensors the architecture uses.
    /// A layer stored under other names (packed codes) counts its logical `[out, in]` weight.
    pub fn parameter_count(&self) -> u64 {
        let packed = |n: &str| {
            n.strip_suffix(".weight").is_some_and(|stem| {
                part::ALL
                    .iter()
                    .any(|p| self.index.contains_key(&part::of(stem, p)))
            })
        };
        self.specs()
            .iter()
            .filter(|s| self.index.contains_key(&s.name) || packed(&s.name))
            .map(|s| s.shape.iter().product::<usize>() as u64)
            .sum()
    }

    /// sha256 of every weight file, config.json and tokenizer.json, in a stable order.
    pub fn input_hashes(&self) -> Result<Vec<(String, String)>> {
        self.input_hashes_on(true)
    }

    /// [`Self::input_hashes`] on the calling thread alone (`parallel: false`), for a caller
    /// that hashes beside other work instead of before it.
    pub fn input_hashes_on(&self, parallel: bool) -> Result<Vec<(String, String)>> {
        let name = |p: &Path| {
            p.file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        };
        // Weight files are hashed through their mappings (no read copies), in parallel unless
        // asked to stay on the calling thread.
        let mut out: Vec<(String, String)> = if parallel {
            self.files
                .par_iter()
                .map(|f| (name(&f.path), f.sha256()))
                .collect()
        } else {
            self.files
                .iter()
                .map(|f| (name(&f.path), f.sha256()))
                .collect()
        };
        for extra in ["config.json", "tokenizer.json"] {
            let p = self.dir.join(extra);
            if p.exists() {
                out.push((name(&p), sha256_file(&p)?));
            }
        }
        Ok(out)
    }
}

/// The weight files of `dir`: the shards listed by the index, or the single file.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    files_of(dir, weight_map(dir)?.as_deref())
}

/// [`weight_files`] given the folder's parsed index (`None`: it has none).
fn files_of(dir: &Path, map: Option<&[(String, String)]>) -> Result<Vec<PathBuf>> {
    if let Some(map) = map {
        let mut names: Vec<String> = map.iter().map(|(_, f)| f.clone()).collect();
        names.sort();
        names.dedup();
        if let Some(n) = names.iter().find(|n| !dir.join(n).is_file()) {
            let (t, _) = map.iter().find(|(_, f)| f == n).expect("from the map");
            return Err(Error::format(
                dir.join("model.safetensors.index.json"),
                format!("weight_map puts tensor `{t}` in {n}, which is not in the folder"),
            ));
        }
        return Ok(names.into_iter().map(|n| dir.join(n)).collect());
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(Error::format(
        dir,
        "no model.safetensors or model.safetensors.index.json in this folder",
    ))
}

/// The `weight_map` of `dir/model.safetensors.index.json` as (tensor, file) pairs, or `None`
/// when the folder has no index. A tensor listed twice, or a file name that leaves the folder,
/// is an error.
pub fn weight_map(dir: &Path) -> Result<Option<Vec<(String, String)>>> {
    let idx = dir.join("model.safetensors.index.json");
    if !idx.exists() {
        return Ok(None);
    }
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: crate::format::safetensors::Entries,
    }
    let text = std::fs::read_to_string(&idx).map_err(|e| Error::io(&idx, e))?;
    let v: Index = serde_json::from_str(&text).map_err(|e| {
        Error::format(
            &idx,
            format!("not a valid index (`weight_map` object): {e}"),
        )
    })?;
    let mut seen = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    for (t, f) in v.weight_map.0 {
        let f = f.as_str().ok_or_else(|| {
            Error::format(&idx, format!("weight_map entry `{t}` is not a file name"))
        })?;
        if !crate::format::safetensors::is_plain_file_name(f) {
            return Err(Error::format(
                &idx,
                format!("weight_map entry `{t}` points outside the folder: {f:?}"),
            ));
        }
        if !seen.insert(t.clone()) {
            return Err(Error::format(
                &idx,
                format!("weight_map lists tensor `{t}` twice"),
            ));
        }
        out.push((t, f.to_owned()));
    }
    Ok(Some(out))
}

/// sha256 of a file as lowercase hex, streamed.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(crate::numerics::hex(&h.finalize()))
}
