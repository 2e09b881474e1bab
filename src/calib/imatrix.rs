//! Importance matrices as llama.cpp writes and reads them (formats/imatrix.md).
//!
//! GGUF form (llama.cpp's default): `general.type = "imatrix"`, `imatrix.datasets`,
//! `imatrix.chunk_count`, `imatrix.chunk_size`; per weight `<name>.in_sum2` (F32, Σx² per input
//! channel) and `<name>.counts` (F32, tokens seen). Legacy `.dat`: entries of
//! (name, ncall, values = mean·ncall), then the chunk count and the dataset name.

use std::collections::BTreeMap;
use std::path::Path;

use crate::calib::stats::{CalibInfo, CalibStats, LayerStats};
use crate::error::{Error, Result};
use crate::format::gguf::keys;
use crate::format::gguf::{GgmlType, GgufFile, GgufWriter, PlannedTensor, Value};
use crate::model::names::{gguf_linear, LinearRole};
use crate::model::LlamaConfig;

/// One weight's importance data.
#[derive(Debug, Clone, PartialEq)]
pub struct ImatrixEntry {
    /// Σx² per input channel.
    pub sum_sq: Vec<f32>,
    /// Number of activation rows summed (for legacy files: the number of calls).
    pub count: f32,
}

impl ImatrixEntry {
    /// E[x²] per channel, the vector quantizers weight by; a zero count gives ones (as
    /// llama-quantize does for unseen columns).
    pub fn mean(&self) -> Vec<f32> {
        if self.count <= 0.0 {
            return vec![1.0; self.sum_sq.len()];
        }
        self.sum_sq.iter().map(|s| s / self.count).collect()
    }
}

/// An importance matrix keyed by GGUF tensor name (`blk.N.attn_q.weight` …).
#[derive(Debug, Clone, PartialEq)]
pub struct Imatrix {
    pub entries: BTreeMap<String, ImatrixEntry>,
    pub datasets: Vec<String>,
    pub chunk_count: u32,
    pub chunk_size: u32,
}

impl Imatrix {
    /// The importance matrix of every block linear layer from calibration statistics.
    pub fn from_stats(stats: &CalibStats) -> Self {
        let mut m = Imatrix::empty(&stats.info);
        for (l, ls) in stats.layers.iter().enumerate() {
            m.add_layer(l, ls);
        }
        m
    }

    /// No entries yet, for a calibration described by `info` (see [`Self::add_layer`]).
    pub fn empty(info: &CalibInfo) -> Self {
        Imatrix {
            entries: BTreeMap::new(),
            datasets: vec![info.source.clone()],
            chunk_count: info.samples as u32,
            chunk_size: info.seq_len as u32,
        }
    }

    /// The entries of block `l`'s linear layers from its statistics (replacing any).
    pub fn add_layer(&mut self, l: usize, ls: &LayerStats) {
        for role in LinearRole::ALL {
            let s = &ls.sites[role.site().index()];
            self.entries.insert(
                gguf_linear(l, role),
                ImatrixEntry {
                    sum_sq: s.sum_sq.iter().map(|&v| v as f32).collect(),
                    count: s.count as f32,
                },
            );
        }
    }

    /// Writes llama.cpp's GGUF imatrix form.
    pub fn write_gguf(&self, path: &Path) -> Result<()> {
        let md = vec![
            (
                keys::GENERAL_TYPE.to_owned(),
                Value::String("imatrix".into()),
            ),
            (
                keys::IMATRIX_DATASETS.to_owned(),
                Value::strings(self.datasets.iter().cloned()),
            ),
            (
                keys::IMATRIX_CHUNK_COUNT.to_owned(),
                Value::U32(self.chunk_count),
            ),
            (
                keys::IMATRIX_CHUNK_SIZE.to_owned(),
                Value::U32(self.chunk_size),
            ),
        ];
        let f32t = GgmlType::F32;
        let mut plan = Vec::new();
        for (name, e) in &self.entries {
            plan.push(PlannedTensor {
                name: format!("{name}.in_sum2"),
                dims: vec![e.sum_sq.len() as u64],
                ty: f32t,
            });
            plan.push(PlannedTensor {
                name: format!("{name}.counts"),
                dims: vec![1],
                ty: f32t,
            });
        }
        let mut w = GgufWriter::create(path, &md, &plan)?;
        for e in self.entries.values() {
            w.write_tensor(
                &e.sum_sq
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect::<Vec<u8>>(),
            )?;
            w.write_tensor(&e.count.to_le_bytes())?;
        }
        w.finish().map(|_| ())
    }

    /// Reads either form (GGUF recognised by its magic, anything else as legacy `.dat`).
    pub fn read(path: &Path) -> Result<Self> {
        let mut head = [0u8; 4];
        {
            use std::io::Read;
            let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
            let n = f.read(&mut head).map_err(|e| Error::io(path, e))?;
            if n < 4 {
                return Err(Error::format(path, "too short to be an importance matrix"));
            }
        }
        if &head == crate::format::gguf::MAGIC {
            Self::read_gguf(path)
        } else {
            Self::read_dat(path)
        }
    }

    fn read_gguf(path: &Path) -> Result<Self> {
        let g = GgufFile::open(path)?;
        match g.get(keys::GENERAL_TYPE).and_then(Value::as_str) {
            Some("imatrix") => {}
            other => {
                return Err(Error::format(
                    path,
                    format!(
                        "{} is {other:?}, expected \"imatrix\" (is this a model file?)",
                        keys::GENERAL_TYPE
                    ),
                ))
            }
        }
        let datasets = match g.get(keys::IMATRIX_DATASETS) {
            Some(Value::Array(_, items)) => items
                .iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect(),
            _ => vec![],
        };
        let u32k = |k: &str| g.get(k).and_then(Value::as_u64).unwrap_or(0) as u32;
        let mut entries = BTreeMap::new();
        for t in &g.tensors {
            let Some(name) = t.name.strip_suffix(".in_sum2") else {
                continue;
            };
            if t.dims.len() > 1 && t.dims[1..].iter().any(|&d| d != 1) {
                return Err(Error::Unsupported(format!(
                    "{}: `{}` has {:?} matrices (mixture-of-experts imatrices are not supported)",
                    path.display(),
                    t.name,
                    &t.dims[1..]
                )));
            }
            let sum_sq = g.f32_values(&t.name)?;
            let counts = g.f32_values(&format!("{name}.counts"))?;
            let count = *counts
                .first()
                .ok_or_else(|| Error::format(path, format!("`{name}.counts` is empty")))?;
            entries.insert(name.to_owned(), ImatrixEntry { sum_sq, count });
        }
        if entries.is_empty() {
            return Err(Error::format(path, "no `*.in_sum2` tensors"));
        }
        Ok(Imatrix {
            entries,
            datasets,
            chunk_count: u32k(keys::IMATRIX_CHUNK_COUNT),
            chunk_size: u32k(keys::IMATRIX_CHUNK_SIZE),
        })
    }

    fn read_dat(path: &Path) -> Result<Self> {
        let b = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        let mut pos = 0usize;
        let fail =
            |pos: usize, m: &str| Error::format(path, format!("legacy imatrix: {m} at byte {pos}"));
        let i32at = |pos: &mut usize| -> Result<i32> {
            let s = b
                .get(*pos..*pos + 4)
                .ok_or_else(|| fail(*pos, "file ends early"))?;
            *pos += 4;
            Ok(i32::from_le_bytes(s.try_into().expect("4")))
        };
        let n = i32at(&mut pos)?;
        if n <= 0 || n as usize > b.len() / 12 {
            return Err(fail(
                0,
                &format!("implausible entry count {n} (not an imatrix file?)"),
            ));
        }
        let mut entries = BTreeMap::new();
        for _ in 0..n {
            let len = i32at(&mut pos)?;
            if len <= 0 || pos + len as usize > b.len() {
                return Err(fail(pos, &format!("bad name length {len}")));
            }
            let name = String::from_utf8(b[pos..pos + len as usize].to_vec())
                .map_err(|_| fail(pos, "name is not UTF-8"))?;
            pos += len as usize;
            let ncall = i32at(&mut pos)?;
            let nval = i32at(&mut pos)?;
            if nval <= 0 || pos + 4 * nval as usize > b.len() {
                return Err(fail(
                    pos,
                    &format!("entry `{name}`: bad value count {nval}"),
                ));
            }
            let sum_sq = b[pos..pos + 4 * nval as usize]
                .chunks_exact(4)
                .map(|x| f32::from_le_bytes(x.try_into().expect("4")))
                .collect();
            pos += 4 * nval as usize;
            entries.insert(
                name,
                ImatrixEntry {
                    sum_sq,
                    count: ncall as f32,
                },
            );
        }
        let mut chunk_count = 0;
        let mut datasets = vec![];
        if pos + 4 <= b.len() {
            chunk_count = i32at(&mut pos)?.max(0) as u32;
            if pos + 4 <= b.len() {
                let len = i32at(&mut pos)?;
                if len > 0 && pos + len as usize <= b.len() {
                    datasets
                        .push(String::from_utf8_lossy(&b[pos..pos + len as usize]).into_owned());
                }
            }
        }
        Ok(Imatrix {
            entries,
            datasets,
            chunk_count,
            chunk_size: 0,
        })
    }

    /// Checks that this matrix belongs to a model of configuration `c`: every block entry names
    /// an existing layer with the right input length, and every block weight is covered.
    /// Also refuses values no calibration can produce: a NaN, infinite or negative Σx² or
    /// count, and a zero count. A dense Llama block weight sees every calibration token, so an
    /// entry that saw none means a damaged or partial file, and quantizing with it would
    /// silently fall back to unweighted rounding for that tensor.
    pub fn check_against(&self, c: &LlamaConfig, path: &Path) -> Result<()> {
        for (name, e) in &self.entries {
            if !(e.count.is_finite() && e.count > 0.0) {
                return Err(Error::TensorMismatch {
                    path: path.to_owned(),
                    tensor: name.clone(),
                    expected: "a positive, finite count of activation rows".into(),
                    found: format!(
                        "count {} (the entry recorded no activations: a partial or damaged imatrix)",
                        e.count
                    ),
                });
            }
            if let Some(i) = e.sum_sq.iter().position(|v| !(v.is_finite() && *v >= 0.0)) {
                return Err(Error::TensorMismatch {
                    path: path.to_owned(),
                    tensor: name.clone(),
                    expected: "finite, non-negative sums of squares".into(),
                    found: format!("{} at input channel {i}", e.sum_sq[i]),
                });
            }
            let Some((layer, stem)) = parse_block_name(name) else {
                if name == crate::model::names::GGUF_OUTPUT && e.sum_sq.len() == c.hidden_size {
                    continue;
                }
                return Err(Error::format(
                    path,
                    format!("entry `{name}` is not a tensor of a Llama model"),
                ));
            };
            let role = LinearRole::ALL.into_iter().find(|r| r.gguf_stem() == stem);
            let Some(role) = role.filter(|_| layer < c.num_hidden_layers) else {
                return Err(Error::format(
                    path,
                    format!("entry `{name}` does not exist in this model ({} layers): the imatrix was made for another model", c.num_hidden_layers),
                ));
            };
            let want = role.shape(c)[1];
            if e.sum_sq.len() != want {
                return Err(Error::TensorMismatch {
                    path: path.to_owned(),
                    tensor: name.clone(),
                    expected: format!("{want} values (the model's input width)"),
                    found: format!(
                        "{} values: the imatrix was made for another model",
                        e.sum_sq.len()
                    ),
                });
            }
        }
        for l in 0..c.num_hidden_layers {
            for role in LinearRole::ALL {
                let n = gguf_linear(l, role);
                if !self.entries.contains_key(&n) {
                    return Err(Error::MissingTensor {
                        path: path.to_owned(),
                        tensor: n,
                        expected: "an imatrix entry for every block weight".into(),
                    });
                }
            }
        }
        Ok(())
    }
}

fn parse_block_name(name: &str) -> Option<(usize, &str)> {
    let rest = name.strip_prefix("blk.")?;
    let (n, rest) = rest.split_once('.')?;
    let stem = rest.strip_suffix(".weight")?;
    Some((n.parse().ok()?, stem))
}
