//! What `--to` names: every artifact kind, parsed once, with the one rule for where each is
//! written.

use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::error::{Error, Result};
use crate::quant::fp8::ScaleStyle;
use crate::quant::recipe::Mix;

/// compressed-tensors' W4A16 preset group size.
pub const W4A16_GROUP: usize = 128;

/// An artifact kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Target {
    /// compressed-tensors FP8_DYNAMIC.
    Fp8,
    /// compressed-tensors FP8 with static per-tensor input scales and an FP8 KV cache.
    Fp8Static,
    /// ModelOpt unified HF checkpoint, FP8_PER_CHANNEL_PER_TOKEN.
    Fp8ModelOpt,
    /// compressed-tensors W8A8 INT8 (`int-quantized`) after SmoothQuant.
    Int8,
    /// compressed-tensors weight-only INT8 (`pack-quantized`).
    Int8W8A16,
    /// compressed-tensors weight-only INT4, symmetric, per group of 128 input columns by default
    /// (`pack-quantized`, eight codes per int32).
    W4A16,
    /// compressed-tensors NVFP4 (`nvfp4-pack-quantized`): E2M1 weights with E4M3 scales per 16
    /// and a per-tensor global scale; activations NVFP4 with a calibrated global scale.
    Nvfp4,
    /// compressed-tensors NVFP4A16: the weights of [`Target::Nvfp4`], activations untouched.
    Nvfp4A16,
    /// ModelOpt unified HF checkpoint, NVFP4 weights and activations.
    Nvfp4ModelOpt,
    /// A GGUF file for llama.cpp under one of llama-quantize's mixes (or a float type).
    Gguf(Mix),
}

impl Target {
    /// Every target, in `--help` order.
    pub const ALL: [Target; 20] = [
        Target::Fp8,
        Target::Fp8Static,
        Target::Fp8ModelOpt,
        Target::Int8,
        Target::Int8W8A16,
        Target::W4A16,
        Target::Nvfp4,
        Target::Nvfp4A16,
        Target::Nvfp4ModelOpt,
        Target::Gguf(Mix::F32),
        Target::Gguf(Mix::F16),
        Target::Gguf(Mix::BF16),
        Target::Gguf(Mix::Q8_0),
        Target::Gguf(Mix::Q6K),
        Target::Gguf(Mix::Q5KM),
        Target::Gguf(Mix::Q5KS),
        Target::Gguf(Mix::Q4KM),
        Target::Gguf(Mix::Q4KS),
        Target::Gguf(Mix::Q4_0),
        Target::Gguf(Mix::Q3KM),
    ];

    /// The spelling `--to` takes.
    pub fn name(self) -> &'static str {
        match self {
            Target::Fp8 => "fp8",
            Target::Fp8Static => "fp8-static",
            Target::Fp8ModelOpt => "fp8-modelopt",
            Target::Int8 => "int8",
            Target::Int8W8A16 => "int8-w8a16",
            Target::W4A16 => "w4a16",
            Target::Nvfp4 => "nvfp4",
            Target::Nvfp4A16 => "nvfp4-a16",
            Target::Nvfp4ModelOpt => "nvfp4-modelopt",
            Target::Gguf(m) => m.target_name(),
        }
    }

    /// Bits per weight code of a `pack-quantized` target.
    pub fn packed_bits(self) -> Option<u32> {
        match self {
            Target::Int8W8A16 => Some(8),
            Target::W4A16 => Some(4),
            _ => None,
        }
    }

    /// The input columns per weight scale this target uses given `--group-size`: W4A16 groups
    /// by 128 unless told otherwise, INT8 weight-only only when told (else per channel).
    pub fn group(self, group_size: Option<usize>) -> Option<usize> {
        match self {
            Target::W4A16 => Some(group_size.unwrap_or(W4A16_GROUP)),
            Target::Int8W8A16 => group_size,
            _ => None,
        }
    }

    /// Whose NVFP4 arithmetic and layout this target uses, for an NVFP4 target.
    pub fn nvfp4(self) -> Option<crate::quant::nvfp4::Flavor> {
        use crate::quant::nvfp4::Flavor;
        match self {
            Target::Nvfp4 | Target::Nvfp4A16 => Some(Flavor::CompressedTensors),
            Target::Nvfp4ModelOpt => Some(Flavor::ModelOpt),
            _ => None,
        }
    }

    /// Whether this NVFP4 target quantizes activations too (and so needs their calibrated
    /// global scale).
    pub fn nvfp4_activations(self) -> bool {
        matches!(self, Target::Nvfp4 | Target::Nvfp4ModelOpt)
    }

    pub fn is_fp8(self) -> bool {
        matches!(self, Target::Fp8 | Target::Fp8Static | Target::Fp8ModelOpt)
    }

    /// The GGUF mix, for a GGUF target.
    pub fn mix(self) -> Option<Mix> {
        match self {
            Target::Gguf(m) => Some(m),
            _ => None,
        }
    }

    /// How FP8 weight scales are laid out.
    pub fn style(self) -> ScaleStyle {
        match self {
            Target::Fp8ModelOpt => ScaleStyle::ModelOpt,
            _ => ScaleStyle::CompressedTensors,
        }
    }

    /// Where this target is written under `--out`: `out` itself when it is the only target;
    /// else `out/<name>` for a checkpoint folder and `out/<model>-<TYPE>.gguf` for a GGUF file
    /// (`Llama-3.1-8B-Q4_K_M.gguf`, the naming llama.cpp users find models by).
    pub fn path(self, out: &Path, only: bool, model: &str) -> PathBuf {
        match (only, self) {
            (true, _) => out.to_owned(),
            (false, Target::Gguf(m)) => {
                out.join(format!("{model}-{}.gguf", m.name().to_ascii_uppercase()))
            }
            (false, t) => out.join(t.name()),
        }
    }

    /// Parses a comma-separated `--to` list; a target named twice is an error.
    pub fn parse_list(s: &str) -> Result<Vec<Target>> {
        let mut v: Vec<Target> = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let t: Target = part.parse()?;
            if v.contains(&t) {
                return Err(Error::Invalid(format!("--to names {part} twice")));
            }
            v.push(t);
        }
        if v.is_empty() {
            return Err(Error::Invalid("--to needs at least one target".into()));
        }
        Ok(v)
    }
}

impl FromStr for Target {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let l = s.trim().to_ascii_lowercase();
        Target::ALL
            .into_iter()
            .find(|t| t.name() == l)
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "unknown target `{s}` (available: {})",
                    Target::ALL.map(|t| t.name()).join(", ")
                ))
            })
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_target_round_trips_through_its_name() {
        for t in Target::ALL {
            assert_eq!(t.name().parse::<Target>().unwrap(), t);
        }
        assert_eq!(
            "GGUF:Q4_K_M".parse::<Target>().unwrap(),
            Target::Gguf(Mix::Q4KM)
        );
        assert!("fp9".parse::<Target>().is_err());
        assert!(Target::parse_list("fp8,fp8").is_err());
    }

    #[test]
    fn one_rule_for_output_paths() {
        let out = Path::new("X");
        assert_eq!(Target::Fp8.path(out, true, "m"), out);
        assert_eq!(Target::Gguf(Mix::Q8_0).path(out, true, "m"), out);
        assert_eq!(Target::Fp8.path(out, false, "m"), out.join("fp8"));
        assert_eq!(
            Target::Gguf(Mix::Q4KM).path(out, false, "SmolLM2-135M"),
            out.join("SmolLM2-135M-Q4_K_M.gguf")
        );
    }
}
