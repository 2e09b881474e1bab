//! `config.json` of a Hugging Face Llama checkpoint → a validated [`LlamaConfig`].
//!
//! Accepts both spellings transformers has used for rotary settings: the classic top-level
//! `rope_theta` + `rope_scaling`, and the single `rope_parameters` block of transformers ≥ 5.
//! Spec: formats/hf-llama.md#config.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Rotary-embedding frequency scaling.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Plain RoPE (`rope_scaling: null` or `rope_type: "default"`).
    None,
    /// Llama 3.1's piecewise frequency scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

/// The architecture facts we need from config.json, checked for consistency.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub tie_word_embeddings: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub max_position_embeddings: usize,
    /// `torch_dtype` (or transformers 5's `dtype`), as written.
    pub torch_dtype: Option<String>,
}

impl LlamaConfig {
    /// Reads and validates `config.json` at `path`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json_str(&text, path)
    }

    /// Parses config text; `path` is only used in error messages.
    pub fn from_json_str(text: &str, path: &Path) -> Result<Self> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| Error::format(path, "expected a JSON object at the top level"))?;
        let r = Reader { path, obj };

        if let Some(mt) = obj.get("model_type").and_then(Value::as_str) {
            if mt != "llama" {
                return Err(r.err(
                    "model_type",
                    format!("expected \"llama\", found \"{mt}\" (only Llama-architecture checkpoints are supported)"),
                ));
            }
        }
        for flag in ["attention_bias", "mlp_bias"] {
            if obj.get(flag).and_then(Value::as_bool) == Some(true) {
                return Err(r.err(flag, "expected false: biased projections are not supported"));
            }
        }
        if let Some(act) = obj.get("hidden_act").and_then(Value::as_str) {
            if act != "silu" {
                return Err(r.err("hidden_act", format!("expected \"silu\", found \"{act}\"")));
            }
        }

        let hidden_size = r.usize("hidden_size")?;
        let num_attention_heads = r.usize("num_attention_heads")?;
        let num_key_value_heads = match obj.get("num_key_value_heads") {
            None | Some(Value::Null) => num_attention_heads,
            Some(_) => r.usize("num_key_value_heads")?,
        };
        if num_attention_heads % num_key_value_heads != 0 {
            return Err(r.err(
                "num_key_value_heads",
                format!(
                    "must divide num_attention_heads = {num_attention_heads}, found {num_key_value_heads}"
                ),
            ));
        }
        let head_dim = match obj.get("head_dim") {
            None | Some(Value::Null) => {
                if hidden_size % num_attention_heads != 0 {
                    return Err(r.err(
                        "hidden_size",
                        format!("must be a multiple of num_attention_heads = {num_attention_heads} when head_dim is absent, found {hidden_size}"),
                    ));
                }
                hidden_size / num_attention_heads
            }
            Some(_) => r.usize("head_dim")?,
        };
        if head_dim % 2 != 0 {
            return Err(r.err(
                "head_dim",
                format!("must be even for RoPE, found {head_dim}"),
            ));
        }

        let (rope_theta, rope_scaling) = r.rope()?;
        let rms_norm_eps = r.f64_or("rms_norm_eps", 1e-6)?;
        if rms_norm_eps.is_nan() || rms_norm_eps <= 0.0 {
            return Err(r.err("rms_norm_eps", format!("must be > 0, found {rms_norm_eps}")));
        }

        Ok(LlamaConfig {
            hidden_size,
            intermediate_size: r.usize("intermediate_size")?,
            num_hidden_layers: r.usize("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            vocab_size: r.usize("vocab_size")?,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            tie_word_embeddings: match obj.get("tie_word_embeddings") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(other) => {
                    return Err(r.err(
                        "tie_word_embeddings",
                        format!("expected a boolean, found {other}"),
                    ))
                }
            },
            bos_token_id: r.opt_ids("bos_token_id")?.and_then(|v| v.first().copied()),
            eos_token_ids: r.opt_ids("eos_token_id")?.unwrap_or_default(),
            max_position_embeddings: match obj.get("max_position_embeddings") {
                None | Some(Value::Null) => 8192,
                Some(_) => r.usize("max_position_embeddings")?,
            },
            torch_dtype: obj
                .get("torch_dtype")
                .or_else(|| obj.get("dtype"))
                .and_then(Value::as_str)
                .map(str::to_owned),
        })
    }

    /// Query heads per KV head.
    pub fn gqa_groups(&self) -> usize {
        self.num_attention_heads / self.num_key_value_heads
    }

    /// Width of the Q projection's output.
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }

    /// Width of the K and V projections' outputs.
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// RoPE inverse frequencies (one per pair of dimensions), llama3 scaling applied.
    ///
    /// Kept in f64: the runner forms angles `position · frequency` in f64 and rounds only the
    /// cos/sin values to the compute dtype. (transformers forms them in f32, whose rounding at
    /// long positions is larger than any other error in the forward pass.)
    pub fn rope_inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim;
        (0..d / 2)
            .map(|i| {
                let f = 1.0 / self.rope_theta.powf((2 * i) as f64 / d as f64);
                scale_freq(f, &self.rope_scaling)
            })
            .collect()
    }
}

/// Llama 3.1's frequency rule: wavelengths shorter than `orig / high_freq_factor` keep their
/// frequency, those longer than `orig / low_freq_factor` are divided by `factor`, and the band in
/// between is blended linearly in `orig / wavelength`.
fn scale_freq(freq: f64, scaling: &RopeScaling) -> f64 {
    match *scaling {
        RopeScaling::None => freq,
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings,
        } => {
            let orig = original_max_position_embeddings as f64;
            let low_wavelen = orig / low_freq_factor;
            let high_wavelen = orig / high_freq_factor;
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            if wavelen < high_wavelen {
                freq
            } else if wavelen > low_wavelen {
                freq / factor
            } else {
                let smooth =
                    (orig / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor);
                (1.0 - smooth) * freq / factor + smooth * freq
            }
        }
    }
}

struct Reader<'a> {
    path: &'a Path,
    obj: &'a Map<String, Value>,
}

impl Reader<'_> {
    fn err(&self, field: &str, msg: impl Into<String>) -> Error {
        Error::config(PathBuf::from(self.path), field, msg)
    }

    fn usize(&self, key: &str) -> Result<usize> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Err(self.err(key, "missing")),
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 => Ok(n as usize),
                _ => Err(self.err(key, format!("expected a positive integer, found {v}"))),
            },
        }
    }

    fn f64_in(&self, obj: &Map<String, Value>, key: &str, ctx: &str) -> Result<f64> {
        match obj.get(key) {
            None | Some(Value::Null) => Err(self.err(&format!("{ctx}{key}"), "missing")),
            Some(v) => v.as_f64().ok_or_else(|| {
                self.err(
                    &format!("{ctx}{key}"),
                    format!("expected a number, found {v}"),
                )
            }),
        }
    }

    fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(_) => self.f64_in(self.obj, key, ""),
        }
    }

    fn opt_ids(&self, key: &str) -> Result<Option<Vec<u32>>> {
        let bad = |v: &Value| {
            self.err(
                key,
                format!("expected a token id or a list of ids, found {v}"),
            )
        };
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| x.as_u64().map(|n| n as u32).ok_or_else(|| bad(x)))
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(v) => v
                .as_u64()
                .map(|n| Some(vec![n as u32]))
                .ok_or_else(|| bad(v)),
        }
    }

    /// Returns (theta, scaling) from either `rope_parameters` or `rope_theta` + `rope_scaling`.
    fn rope(&self) -> Result<(f64, RopeScaling)> {
        let (block, ctx, theta) = match self.obj.get("rope_parameters") {
            Some(Value::Object(p)) => {
                let theta = match p.get("rope_theta") {
                    Some(_) => self.f64_in(p, "rope_theta", "rope_parameters.")?,
                    None => self.f64_or("rope_theta", 10000.0)?,
                };
                (Some(p), "rope_parameters.", theta)
            }
            Some(Value::Null) | None => {
                let theta = self.f64_or("rope_theta", 10000.0)?;
                match self.obj.get("rope_scaling") {
                    Some(Value::Object(s)) => (Some(s), "rope_scaling.", theta),
                    None | Some(Value::Null) => (None, "rope_scaling.", theta),
                    Some(other) => {
                        return Err(self.err(
                            "rope_scaling",
                            format!("expected an object or null, found {other}"),
                        ))
                    }
                }
            }
            Some(other) => {
                return Err(self.err(
                    "rope_parameters",
                    format!("expected an object, found {other}"),
                ))
            }
        };
        if theta.is_nan() || theta <= 0.0 {
            return Err(self.err("rope_theta", format!("must be > 0, found {theta}")));
        }
        let Some(s) = block else {
            return Ok((theta, RopeScaling::None));
        };
        let kind = s
            .get("rope_type")
            .or_else(|| s.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let scaling = match kind {
            "default" => RopeScaling::None,
            "llama3" => {
                let factor = self.f64_in(s, "factor", ctx)?;
                let low_freq_factor = self.f64_in(s, "low_freq_factor", ctx)?;
                let high_freq_factor = self.f64_in(s, "high_freq_factor", ctx)?;
                let orig = self.f64_in(s, "original_max_position_embeddings", ctx)?;
                if !(factor > 0.0
                    && low_freq_factor > 0.0
                    && high_freq_factor > low_freq_factor
                    && orig >= 1.0)
                {
                    return Err(self.err(
                        &format!("{ctx}factor"),
                        format!("llama3 scaling needs factor > 0 and high_freq_factor > low_freq_factor > 0, found factor {factor}, low {low_freq_factor}, high {high_freq_factor}"),
                    ));
                }
                RopeScaling::Llama3 {
                    factor,
                    low_freq_factor,
                    high_freq_factor,
                    original_max_position_embeddings: orig as usize,
                }
            }
            other => {
                return Err(self.err(
                    &format!("{ctx}rope_type"),
                    format!(
                        "unsupported rope type \"{other}\" (supported: \"default\", \"llama3\")"
                    ),
                ))
            }
        };
        Ok((theta, scaling))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<LlamaConfig> {
        LlamaConfig::from_json_str(s, Path::new("config.json"))
    }

    const BASE: &str = r#""hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 16,
        "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
        "rms_norm_eps": 1e-5, "max_position_embeddings": 131072, "bos_token_id": 128000,
        "eos_token_id": [128001, 128009], "torch_dtype": "bfloat16""#;

    #[test]
    fn classic_and_rope_parameters_agree() {
        let a = parse(&format!(
            r#"{{{BASE}, "rope_theta": 500000.0, "rope_scaling": {{"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}}}"#
        ))
        .unwrap();
        let b = parse(&format!(
            r#"{{{BASE}, "rope_parameters": {{"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}}}"#
        ))
        .unwrap();
        assert_eq!(a, b);
        assert_eq!(a.head_dim, 128);
        assert_eq!(a.gqa_groups(), 4);
        assert_eq!(a.eos_token_ids, vec![128001, 128009]);
        assert_eq!(a.bos_token_id, Some(128000));
    }

    #[test]
    fn llama3_frequencies_match_the_published_rule() {
        // Reference values computed independently in f64 from the rule in Meta's llama3 code
        // (apply_scaling): the first pair is untouched, the last is divided by the factor.
        let c = parse(&format!(
            r#"{{{BASE}, "rope_theta": 500000.0, "rope_scaling": {{"rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}}}"#
        ))
        .unwrap();
        let f = c.rope_inv_freq();
        assert_eq!(f.len(), 64);
        assert_eq!(f[0], 1.0);
        let last_plain = 1.0 / 500000f64.powf(126.0 / 128.0);
        assert!((f[63] - last_plain / 8.0).abs() < 1e-18);
        // Band blend: every scaled frequency lies between freq/8 and freq.
        for (i, &x) in f.iter().enumerate() {
            let plain = 1.0 / 500000f64.powf((2 * i) as f64 / 128.0);
            assert!(x <= plain * (1.0 + 1e-12) && x >= plain / 8.0 * (1.0 - 1e-12));
        }
    }

    #[test]
    fn kv_heads_must_divide_heads() {
        let e = parse(
            r#"{"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
            "num_attention_heads": 4, "num_key_value_heads": 3, "vocab_size": 10}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("num_key_value_heads") && e.contains("4") && e.contains("3"),
            "{e}"
        );
    }

    #[test]
    fn unknown_rope_type_is_named() {
        let e = parse(&format!(
            r#"{{{BASE}, "rope_scaling": {{"rope_type": "yarn", "factor": 4.0}}}}"#
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("rope_scaling.rope_type") && e.contains("yarn"),
            "{e}"
        );
    }

    #[test]
    fn head_dim_defaults_to_hidden_over_heads() {
        let c = parse(&format!(r#"{{{BASE}}}"#)).unwrap();
        assert_eq!(c.head_dim, 128);
        assert_eq!(c.rope_scaling, RopeScaling::None);
    }
}
