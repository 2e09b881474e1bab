//! llama-quantize's recipes: which ggml type each tensor of a Llama GGUF gets under a
//! whole-file mix (`Q4_K_M` …), with its per-layer bumps, user overrides, and the fallbacks for
//! rows that are not a multiple of a k-quant's 256-value super-block (formats/gguf.md#mixes).

use crate::error::{Error, Result};
use crate::format::gguf::GgmlType;

/// A whole-file recipe (llama-quantize's `ftype`, or a float outtype).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mix {
    F32,
    F16,
    BF16,
    Q8_0,
    Q6K,
    Q5KM,
    Q5KS,
    Q4KM,
    Q4KS,
    Q4_0,
    Q3KM,
}

impl Mix {
    pub const ALL: [Mix; 11] = [
        Mix::F32,
        Mix::F16,
        Mix::BF16,
        Mix::Q8_0,
        Mix::Q6K,
        Mix::Q5KM,
        Mix::Q5KS,
        Mix::Q4KM,
        Mix::Q4KS,
        Mix::Q4_0,
        Mix::Q3KM,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mix::F32 => "f32",
            Mix::F16 => "f16",
            Mix::BF16 => "bf16",
            Mix::Q8_0 => "q8_0",
            Mix::Q6K => "q6_k",
            Mix::Q5KM => "q5_k_m",
            Mix::Q5KS => "q5_k_s",
            Mix::Q4KM => "q4_k_m",
            Mix::Q4KS => "q4_k_s",
            Mix::Q4_0 => "q4_0",
            Mix::Q3KM => "q3_k_m",
        }
    }

    /// `--to` spelling: `gguf:<name>`.
    pub fn target_name(self) -> &'static str {
        match self {
            Mix::F32 => "gguf:f32",
            Mix::F16 => "gguf:f16",
            Mix::BF16 => "gguf:bf16",
            Mix::Q8_0 => "gguf:q8_0",
            Mix::Q6K => "gguf:q6_k",
            Mix::Q5KM => "gguf:q5_k_m",
            Mix::Q5KS => "gguf:q5_k_s",
            Mix::Q4KM => "gguf:q4_k_m",
            Mix::Q4KS => "gguf:q4_k_s",
            Mix::Q4_0 => "gguf:q4_0",
            Mix::Q3KM => "gguf:q3_k_m",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        let l = s.to_ascii_lowercase();
        Mix::ALL.into_iter().find(|m| m.name() == l).ok_or_else(|| {
            Error::Invalid(format!(
                "unknown GGUF type `{s}` (available: {})",
                Mix::ALL.map(|m| m.name()).join(", ")
            ))
        })
    }

    /// llama.cpp's `llama_ftype` value (`general.file_type`).
    pub fn file_type(self) -> u32 {
        match self {
            Mix::F32 => 0,
            Mix::F16 => 1,
            Mix::Q4_0 => 2,
            Mix::Q8_0 => 7,
            Mix::Q3KM => 12,
            Mix::Q4KS => 14,
            Mix::Q4KM => 15,
            Mix::Q5KS => 16,
            Mix::Q5KM => 17,
            Mix::Q6K => 18,
            Mix::BF16 => 32,
        }
    }

    /// The type most tensors get.
    pub fn base(self) -> GgmlType {
        match self {
            Mix::F32 => GgmlType::F32,
            Mix::F16 => GgmlType::F16,
            Mix::BF16 => GgmlType::BF16,
            Mix::Q8_0 => GgmlType::Q8_0,
            Mix::Q6K => GgmlType::Q6_K,
            Mix::Q5KM | Mix::Q5KS => GgmlType::Q5_K,
            Mix::Q4KM | Mix::Q4KS => GgmlType::Q4_K,
            Mix::Q4_0 => GgmlType::Q4_0,
            Mix::Q3KM => GgmlType::Q3_K,
        }
    }

    /// Float targets are what the converter writes; the others what llama-quantize writes.
    pub fn is_float(self) -> bool {
        matches!(self, Mix::F32 | Mix::F16 | Mix::BF16)
    }
}

/// A mix with the user's adjustments.
#[derive(Debug, Clone)]
pub struct Recipe {
    pub mix: Mix,
    /// `--tensor-type REGEX=TYPE`, applied in order after the mix (the last match wins).
    pub overrides: Vec<(String, GgmlType)>,
    pub output_type: Option<GgmlType>,
    pub embedding_type: Option<GgmlType>,
    /// Whether an importance matrix is used (llama-quantize changes one rule with it).
    pub imatrix: bool,
    /// Exact per-tensor types (GGUF name → type), applied after everything else: a chosen mix
    /// (`gguf:auto`, `--recipe`). No fallback: a type whose block does not divide the row is an
    /// error.
    pub exact: std::collections::BTreeMap<String, GgmlType>,
}

impl Recipe {
    /// `mix` as llama-quantize applies it with no options.
    pub fn plain(mix: Mix) -> Self {
        Recipe {
            mix,
            overrides: vec![],
            output_type: None,
            embedding_type: None,
            imatrix: false,
            exact: Default::default(),
        }
    }
}

/// `blk.N.` → N.
pub fn block_of(name: &str) -> Option<usize> {
    name.strip_prefix("blk.")?.split('.').next()?.parse().ok()
}

/// llama-quantize's `use_more_bits`.
fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i as i64 - (n / 8) as i64) % 3 == 2
}

/// The type of tensor `name` (dims innermost first) under `o`, for a model of `layers` blocks
/// that has (`has_output`) or ties its output matrix.
pub fn tensor_type(
    o: &Recipe,
    name: &str,
    dims: &[u64],
    layers: usize,
    has_output: bool,
) -> Result<GgmlType> {
    match o.exact.get(name) {
        Some(&t) => {
            let ne0 = dims.first().copied().unwrap_or(1) as usize;
            if !ne0.is_multiple_of(t.block_size()) {
                return Err(Error::Invalid(format!(
                    "tensor `{name}`: rows of {ne0} values cannot be {} (block of {})",
                    t.name(),
                    t.block_size()
                )));
            }
            Ok(t)
        }
        None => mix_type(o, name, dims, layers, has_output),
    }
}

/// [`tensor_type`] without the exact per-tensor types.
fn mix_type(
    o: &Recipe,
    name: &str,
    dims: &[u64],
    layers: usize,
    has_output: bool,
) -> Result<GgmlType> {
    let f32t = GgmlType::F32;
    // 1-D tensors, norms and generated tensors stay F32.
    if dims.len() < 2
        || name.ends_with("_norm.weight")
        || name == crate::model::names::GGUF_ROPE_FREQS
    {
        return Ok(f32t);
    }
    let mix = o.mix;
    let ne0 = dims[0] as usize;
    if mix.is_float() {
        let mut t = mix.base();
        for (re, over) in &o.overrides {
            if regex_match(re, name)? {
                t = *over;
            }
        }
        return Ok(fallback(t, ne0));
    }
    let base = mix.base();
    let mut t = base;
    let is_output = name == crate::model::names::GGUF_OUTPUT
        || (!has_output && name == crate::model::names::GGUF_EMBED);
    if is_output {
        t = match o.output_type {
            Some(t) => t,
            None if !ne0.is_multiple_of(base.block_size()) => GgmlType::Q8_0,
            None if base != GgmlType::Q8_0 => GgmlType::Q6_K,
            None => base,
        };
    } else if name == crate::model::names::GGUF_EMBED {
        if let Some(e) = o.embedding_type {
            t = e;
        }
    } else if let Some(layer) = block_of(name) {
        let n = layers;
        if name.contains("attn_v.weight") {
            match mix {
                Mix::Q3KM => {
                    t = if layer < 2 {
                        GgmlType::Q5_K
                    } else {
                        GgmlType::Q4_K
                    }
                }
                Mix::Q4KM | Mix::Q5KM if use_more_bits(layer, n) => t = GgmlType::Q6_K,
                Mix::Q4KS if layer < 4 => t = GgmlType::Q5_K,
                _ => {}
            }
        } else if name.contains("ffn_down") {
            match mix {
                Mix::Q3KM => {
                    t = if layer < n / 16 {
                        GgmlType::Q5_K
                    } else {
                        GgmlType::Q4_K
                    }
                }
                Mix::Q4KM | Mix::Q5KM if use_more_bits(layer, n) => t = GgmlType::Q6_K,
                Mix::Q4KS if layer < n / 8 => t = GgmlType::Q5_K,
                Mix::Q4_0 if o.imatrix && layer < n / 8 => t = GgmlType::Q4_1,
                _ => {}
            }
        } else if name.contains("attn_output.weight") && mix == Mix::Q3KM {
            t = GgmlType::Q4_K;
        }
    }
    for (re, over) in &o.overrides {
        if regex_match(re, name)? {
            t = *over;
        }
    }
    Ok(fallback(t, ne0))
}

/// llama-quantize's replacement for a type whose block does not divide the row.
fn fallback(t: GgmlType, ne0: usize) -> GgmlType {
    if ne0.is_multiple_of(t.block_size()) {
        return t;
    }
    let alt = match t {
        GgmlType::Q4_K => GgmlType::Q5_0,
        GgmlType::Q5_K => GgmlType::Q5_1,
        GgmlType::Q6_K => GgmlType::Q8_0,
        GgmlType::Q2_K | GgmlType::Q3_K => GgmlType::Q4_0,
        _ => GgmlType::F16,
    };
    if ne0.is_multiple_of(alt.block_size()) {
        alt
    } else {
        GgmlType::F16
    }
}

fn regex_match(re: &str, name: &str) -> Result<bool> {
    let r = regex::Regex::new(re)
        .map_err(|e| Error::Invalid(format!("--tensor-type pattern `{re}`: {e}")))?;
    Ok(r.is_match(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn more_bits_layers_for_16_blocks() {
        let v: Vec<usize> = (0..16).filter(|&i| use_more_bits(i, 16)).collect();
        assert_eq!(v, vec![0, 1, 4, 7, 10, 13, 14, 15]);
    }
}
