//! Activation statistics gathered through the runner's hooks (formats/calibration.md#stats).
//!
//! For each block and each of its four linear-layer inputs: per-channel absmax, per-channel Σx²
//! (f64) and the token count; per block the absmax of K (after RoPE) and of V. Column sums run
//! over rows in order, so results do not depend on the number of threads.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::format::safetensors::{write_file, OwnedTensor};
use crate::model::checkpoint::SafetensorsFile;
use crate::model::names::InputSite;
use crate::model::{Checkpoint, Dtype, LlamaConfig};
use crate::runtime::Observer;

/// Statistics of one linear-layer input.
#[derive(Debug, Clone, PartialEq)]
pub struct SiteStats {
    pub absmax: Vec<f32>,
    pub sum_sq: Vec<f64>,
    /// Tokens (rows) seen.
    pub count: u64,
}

impl SiteStats {
    fn new(width: usize) -> Self {
        SiteStats {
            absmax: vec![0.0; width],
            sum_sq: vec![0.0; width],
            count: 0,
        }
    }

    /// Mean of x² per channel (the importance-matrix value).
    pub fn mean_sq(&self) -> Vec<f64> {
        let n = self.count.max(1) as f64;
        self.sum_sq.iter().map(|s| s / n).collect()
    }

    /// Absmax over all channels (per-tensor input scale).
    pub fn tensor_absmax(&self) -> f32 {
        self.absmax.iter().copied().fold(0.0, f32::max)
    }

    fn add_rows(&mut self, x: &[f32]) {
        let w = self.absmax.len();
        let rows = x.len() / w;
        const COLS: usize = 64;
        self.absmax
            .par_chunks_mut(COLS)
            .zip(self.sum_sq.par_chunks_mut(COLS))
            .enumerate()
            .for_each(|(ci, (am, ss))| {
                let c0 = ci * COLS;
                for r in 0..rows {
                    let row = &x[r * w + c0..r * w + c0 + am.len()];
                    for ((a, s), &v) in am.iter_mut().zip(ss.iter_mut()).zip(row) {
                        *a = a.max(v.abs());
                        *s += (v as f64) * (v as f64);
                    }
                }
            });
        self.count += rows as u64;
    }
}

/// Statistics of one block.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerStats {
    /// Indexed by [`InputSite::index`].
    pub sites: Vec<SiteStats>,
    /// Up to [`sample_rows`] activation rows of each site (row-major, indexed by
    /// [`InputSite::index`]), kept in memory for SmoothQuant's α search; not saved.
    pub samples: [Vec<f32>; 4],
    pub k_absmax: f32,
    pub v_absmax: f32,
}

/// Activation rows kept per site: every `SAMPLE_STRIDE`-th row, up to 512 rows or 2^20 values
/// (at least 64 rows): 4 MiB per site, so a 16-block model holds 256 MiB of samples (a
/// 4096-wide input keeps 256 rows, a 14336-wide MLP activation 73; SmolLM2's 576- and
/// 1536-wide inputs keep 512).
pub fn sample_rows(width: usize) -> usize {
    ((1usize << 20) / width.max(1)).clamp(64, 512)
}
const SAMPLE_STRIDE: usize = 8;

/// Where the statistics came from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CalibInfo {
    pub source: String,
    pub sha256: String,
    pub samples: usize,
    pub seq_len: usize,
    pub tokens: usize,
    pub shuffle_seed: Option<u64>,
    pub wall_s: f64,
    /// Content fingerprint of the calibration tokens (`dataset::fingerprint`), with which
    /// `minitron-verify` tells when it is evaluating on text the artifact was calibrated on.
    /// Empty in manifests written before it existed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fingerprint: Vec<u32>,
}

/// Everything one calibration pass records; feeds FP8 static scales, SmoothQuant and imatrices.
#[derive(Debug, Clone, PartialEq)]
pub struct CalibStats {
    pub layers: Vec<LayerStats>,
    pub info: CalibInfo,
}

impl crate::scheme::Statistics for CalibStats {
    fn mean_sq(&self, layer: usize, site: InputSite) -> Vec<f64> {
        self.site(layer, site).mean_sq()
    }

    fn input_absmax(&self, layer: usize, site: InputSite) -> f32 {
        self.site(layer, site).tensor_absmax()
    }

    fn kv_absmax(&self, layer: usize) -> (f32, f32) {
        let l = &self.layers[layer];
        (l.k_absmax, l.v_absmax)
    }
}

/// Records the statistics, and passes every observation on to `also` (another collector that
/// shares the pass).
struct Collector<'a> {
    layers: Vec<LayerStats>,
    also: Option<&'a mut dyn Observer>,
}

impl Observer for Collector<'_> {
    fn linear_input(&mut self, layer: usize, site: InputSite, v: &[f32]) -> Result<()> {
        if let Some(o) = self.also.as_deref_mut() {
            o.linear_input(layer, site, v)?;
        }
        self.layers[layer].add_linear(site, v);
        Ok(())
    }

    fn kv(&mut self, layer: usize, k: &[f32], v: &[f32]) -> Result<()> {
        if let Some(o) = self.also.as_deref_mut() {
            o.kv(layer, k, v)?;
        }
        self.layers[layer].add_kv(k, v);
        Ok(())
    }
}

impl LayerStats {
    /// Records rows `v` seen at `site` (statistics and the sampled rows).
    pub(crate) fn add_linear(&mut self, site: InputSite, v: &[f32]) {
        let s = &mut self.sites[site.index()];
        let (w, seen) = (s.absmax.len(), s.count as usize);
        s.add_rows(v);
        let buf = &mut self.samples[site.index()];
        let cap = sample_rows(w) * w;
        for (i, row) in v.chunks(w).enumerate() {
            if (seen + i) % SAMPLE_STRIDE == 0 && buf.len() < cap {
                buf.extend_from_slice(row);
            }
        }
    }

    /// Records the block's K (after RoPE) and V values.
    pub(crate) fn add_kv(&mut self, k: &[f32], v: &[f32]) {
        let absmax = |x: &[f32]| {
            x.par_chunks(1 << 16)
                .map(|c| c.iter().fold(0f32, |m, v| m.max(v.abs())))
                .reduce(|| 0.0, f32::max)
        };
        self.k_absmax = self.k_absmax.max(absmax(k));
        self.v_absmax = self.v_absmax.max(absmax(v));
    }
}

impl CalibStats {
    /// Statistics with nothing recorded yet.
    pub(crate) fn empty(c: &LlamaConfig, info: CalibInfo) -> Self {
        CalibStats {
            layers: (0..c.num_hidden_layers)
                .map(|_| LayerStats {
                    sites: InputSite::ALL
                        .iter()
                        .map(|s| SiteStats::new(s.width(c)))
                        .collect(),
                    samples: Default::default(),
                    k_absmax: 0.0,
                    v_absmax: 0.0,
                })
                .collect(),
            info,
        }
    }

    /// Runs the checkpoint's blocks over `chunks` (`dtype` compute on `device`, one block in
    /// memory at a time) and records the statistics. `on_tokens(n)` is called as each batch of `n` tokens leaves a block.
    pub fn collect(
        ck: &Checkpoint,
        dtype: DType,
        device: &Device,
        chunks: &[Vec<u32>],
        info: CalibInfo,
        on_tokens: &dyn Fn(u64),
    ) -> Result<Self> {
        Self::collect_with(ck, dtype, device, chunks, info, None, on_tokens)
    }

    /// [`Self::collect`], with `also` observing the same pass (one forward pass feeds both).
    pub fn collect_with(
        ck: &Checkpoint,
        dtype: DType,
        device: &Device,
        chunks: &[Vec<u32>],
        mut info: CalibInfo,
        also: Option<&mut dyn Observer>,
        on_tokens: &dyn Fn(u64),
    ) -> Result<Self> {
        let t0 = Instant::now();
        let mut col = Collector {
            layers: Self::empty(&ck.config, info.clone()).layers,
            also,
        };
        crate::runtime::observe_streamed(ck, dtype, device, chunks, &mut col, on_tokens)?;
        info.samples = chunks.len();
        info.tokens = chunks.iter().map(Vec::len).sum();
        info.wall_s = t0.elapsed().as_secs_f64();
        Ok(CalibStats {
            layers: col.layers,
            info,
        })
    }

    /// Block `layer`'s input-site activations as SmoothQuant takes them.
    pub fn activations(&self, layer: usize) -> [crate::quant::smoothquant::SiteActivations<'_>; 4] {
        let l = &self.layers[layer];
        std::array::from_fn(|i| crate::quant::smoothquant::SiteActivations {
            absmax: &l.sites[i].absmax,
            samples: &l.samples[i],
        })
    }

    /// Statistics of `site` in block `layer`.
    pub fn site(&self, layer: usize, site: InputSite) -> &SiteStats {
        &self.layers[layer].sites[site.index()]
    }

    /// Saves to a safetensors file (exact values; metadata holds [`CalibInfo`]).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut t = BTreeMap::new();
        let f32b = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        for (l, ls) in self.layers.iter().enumerate() {
            for site in InputSite::ALL {
                let s = &ls.sites[site.index()];
                let p = format!("layers.{l}.{}", site.name());
                t.insert(
                    format!("{p}.absmax"),
                    OwnedTensor {
                        dtype: Dtype::F32,
                        shape: vec![s.absmax.len()],
                        data: f32b(&s.absmax),
                    },
                );
                t.insert(
                    format!("{p}.sum_sq"),
                    OwnedTensor {
                        dtype: Dtype::F64,
                        shape: vec![s.sum_sq.len()],
                        data: s.sum_sq.iter().flat_map(|x| x.to_le_bytes()).collect(),
                    },
                );
                t.insert(
                    format!("{p}.count"),
                    OwnedTensor {
                        dtype: Dtype::I64,
                        shape: vec![1],
                        data: (s.count as i64).to_le_bytes().to_vec(),
                    },
                );
            }
            t.insert(
                format!("layers.{l}.k_absmax"),
                OwnedTensor {
                    dtype: Dtype::F32,
                    shape: vec![1],
                    data: f32b(&[ls.k_absmax]),
                },
            );
            t.insert(
                format!("layers.{l}.v_absmax"),
                OwnedTensor {
                    dtype: Dtype::F32,
                    shape: vec![1],
                    data: f32b(&[ls.v_absmax]),
                },
            );
        }
        let mut md = BTreeMap::new();
        md.insert("minitron.calib.format".to_owned(), "1".to_owned());
        md.insert(
            "minitron.calib.layers".to_owned(),
            self.layers.len().to_string(),
        );
        md.insert(
            "minitron.calib.info".to_owned(),
            serde_json::to_string(&self.info).expect("info serialises"),
        );
        write_file(path, &t, &md)
    }

    /// Loads statistics saved by [`CalibStats::save`] and checks them against `c`.
    pub fn load(path: &Path, c: &LlamaConfig) -> Result<Self> {
        let f = SafetensorsFile::open(path)?;
        let bad = |m: String| Error::format(path, m);
        if f.metadata.get("minitron.calib.format").map(String::as_str) != Some("1") {
            return Err(bad(
                "not a minitron calibration file (no minitron.calib.format = 1 metadata)".into(),
            ));
        }
        let info: CalibInfo = serde_json::from_str(
            f.metadata
                .get("minitron.calib.info")
                .map(String::as_str)
                .unwrap_or(""),
        )
        .map_err(|e| bad(format!("calibration info: {e}")))?;
        let get = |name: &str, dtype: Dtype, len: usize| -> Result<&[u8]> {
            let t = f.tensors.get(name).ok_or_else(|| Error::MissingTensor {
                path: path.to_owned(),
                tensor: name.into(),
                expected: format!(
                    "{dtype} [{len}] (statistics for a model with {} layers)",
                    c.num_hidden_layers
                ),
            })?;
            if t.dtype != dtype || t.shape != [len] {
                return Err(Error::TensorMismatch {
                    path: path.to_owned(),
                    tensor: name.into(),
                    expected: format!("{dtype} [{len}]"),
                    found: format!("{} {:?}", t.dtype, t.shape),
                });
            }
            Ok(f.bytes(name).expect("present"))
        };
        let n_layers: usize = f
            .metadata
            .get("minitron.calib.layers")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        if n_layers != c.num_hidden_layers {
            return Err(bad(format!(
                "statistics for {n_layers} layers, the model has {}",
                c.num_hidden_layers
            )));
        }
        let f32s = |b: &[u8]| {
            b.chunks_exact(4)
                .map(|x| f32::from_le_bytes(x.try_into().expect("4")))
                .collect::<Vec<f32>>()
        };
        let mut out = Self::empty(c, info);
        for (l, ls) in out.layers.iter_mut().enumerate() {
            for site in InputSite::ALL {
                let w = site.width(c);
                let p = format!("layers.{l}.{}", site.name());
                let s = &mut ls.sites[site.index()];
                s.absmax = f32s(get(&format!("{p}.absmax"), Dtype::F32, w)?);
                s.sum_sq = get(&format!("{p}.sum_sq"), Dtype::F64, w)?
                    .chunks_exact(8)
                    .map(|x| f64::from_le_bytes(x.try_into().expect("8")))
                    .collect();
                s.count = i64::from_le_bytes(
                    get(&format!("{p}.count"), Dtype::I64, 1)?
                        .try_into()
                        .expect("8"),
                ) as u64;
            }
            ls.k_absmax = f32s(get(&format!("layers.{l}.k_absmax"), Dtype::F32, 1)?)[0];
            ls.v_absmax = f32s(get(&format!("layers.{l}.v_absmax"), Dtype::F32, 1)?)[0];
        }
        Ok(out)
    }
}
