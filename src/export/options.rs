//! What an export is asked to do: targets, weight methods, calibration, GGUF settings; and what
//! follows from them (the calibration each target needs, what blocks are calibrated on).

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::calib::{CalibInputs, CalibOptions, Needs};
use crate::error::{Error, Result};
use crate::format::gguf::GgmlType;
use crate::model::Checkpoint;
use crate::quant::fp8::WeightMode;
use crate::scheme::Target;

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
    /// Exact per-tensor types (GGUF name → type) of a chosen mix (`gguf:auto`, `--recipe`).
    pub tensor_types: std::collections::BTreeMap<String, GgmlType>,
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
    /// `--calib-inputs`; `None`: each mode's default (see [`ExportOptions::propagation`]).
    pub calib_inputs: Option<CalibInputs>,
    /// `--resume`: continue an interrupted run of the same request from its journal.
    pub resume: bool,
    /// `--journal-every`: seconds between two journal records (0: after every block).
    pub journal_every_s: u64,
    /// Per-layer kinds of a mixed `w4a16` checkpoint (`w4a16:auto`), by linear weight name;
    /// empty for a uniform one.
    pub layer_quant: BTreeMap<String, crate::scheme::LayerQuant>,
}

impl ExportOptions {
    /// Where target `t` of model `ck` is written.
    pub fn path(&self, t: Target, ck: &Checkpoint) -> PathBuf {
        t.path(&self.out, self.targets.len() == 1, &model_name(ck))
    }

    /// Whether GGUF targets take their importance matrix from this run's calibration.
    pub(crate) fn gguf_from_calibration(&self) -> bool {
        self.gguf.imatrix.is_none()
            && self.calib_asked
            && self
                .targets
                .iter()
                .any(|t| t.mix().is_some_and(|m| !m.is_float()))
    }

    /// The per-layer kinds target `t` is written with (only `w4a16` takes them).
    pub(crate) fn layers_of(&self, t: Target) -> BTreeMap<String, crate::scheme::LayerQuant> {
        if t == Target::W4A16 {
            self.layer_quant.clone()
        } else {
            BTreeMap::new()
        }
    }

    /// The weight methods asked for.
    pub fn methods(&self) -> crate::scheme::Methods {
        crate::scheme::Methods {
            fp8_weights: self.fp8_weights,
            int8_weights: self.int8_weights,
            int4_weights: self.int4_weights,
            group_size: self.group_size,
            smooth_alpha: self.smooth_alpha,
        }
    }

    /// What the encoders of target `t` need from calibration (GGUF: an importance matrix from
    /// this run, when asked for).
    fn target_needs(&self, t: Target) -> Needs {
        match (t.mix(), crate::scheme::of(t)) {
            (Some(m), _) => Needs {
                stats: self.gguf_from_calibration() && !m.is_float(),
                hessians: false,
            },
            (None, Some(s)) => s.needs(t, &self.methods()),
            (None, None) => Needs::default(),
        }
    }

    /// Each checkpoint target with its scheme.
    pub(crate) fn schemes(
        &self,
    ) -> impl Iterator<Item = (Target, &'static dyn crate::scheme::Scheme)> + '_ {
        self.targets
            .iter()
            .filter_map(|&t| crate::scheme::of(t).map(|s| (t, s)))
    }

    /// How target `t` smooths each block's inputs, if it does.
    pub(crate) fn smoothing(&self, t: Target) -> Option<crate::quant::smoothquant::SmoothPlan> {
        crate::scheme::of(t).and_then(|s| s.smoothing(t, &self.methods()))
    }

    /// What calibration must produce for these targets.
    pub fn needs(&self) -> Needs {
        self.targets
            .iter()
            .fold(Needs::default(), |n, &t| n.or(self.target_needs(t)))
    }

    /// What blocks are calibrated on, and the target whose quantized blocks make the next
    /// block's inputs when that is `quantized`. Quantized inputs follow one artifact, so they
    /// need exactly one checkpoint target that calibrates: with several, every target would
    /// need its own hidden states and its own pass through each block (and GGUF importance
    /// matrices are the bf16 model's activations), so a run of several calibrated targets
    /// calibrates on original inputs.
    pub fn propagation(&self) -> Result<(CalibInputs, Option<Target>)> {
        let calibrated: Vec<Target> = self
            .calibrated_targets()
            .into_iter()
            .filter(|t| t.mix().is_none())
            .collect();
        let single = match calibrated.as_slice() {
            [t] if !self.gguf_from_calibration() => Some(*t),
            _ => None,
        };
        match (self.calib_inputs, single) {
            (Some(CalibInputs::Quantized), Some(t)) => Ok((CalibInputs::Quantized, Some(t))),
            (Some(CalibInputs::Quantized), None) => Err(Error::Invalid(format!(
                "--calib-inputs quantized calibrates each block on the outputs of one artifact's quantized blocks, so it needs exactly one calibrated checkpoint target (and no GGUF importance matrix from this run); this run calibrates {}",
                if calibrated.is_empty() {
                    "none".to_owned()
                } else {
                    calibrated.iter().map(|t| t.name()).collect::<Vec<_>>().join(", ")
                }
            ))),
            (Some(CalibInputs::Original), _) | (None, None) => Ok((CalibInputs::Original, None)),
            (None, Some(t)) => Ok(match self.default_calib_inputs(t) {
                CalibInputs::Quantized => (CalibInputs::Quantized, Some(t)),
                CalibInputs::Original => (CalibInputs::Original, None),
            }),
        }
    }

    /// Each mode's default, as its scheme measured it on SmolLM2 (built-in corpus → dev text,
    /// README "The export, block by block"); modes not measured keep original inputs.
    fn default_calib_inputs(&self, t: Target) -> CalibInputs {
        match crate::scheme::of(t) {
            Some(s) if s.prefers_quantized_inputs(t, &self.methods()) => CalibInputs::Quantized,
            _ => CalibInputs::Original,
        }
    }

    /// The targets that use this run's calibration.
    pub fn calibrated_targets(&self) -> Vec<Target> {
        self.targets
            .iter()
            .copied()
            .filter(|&t| {
                let n = self.target_needs(t);
                n.stats || n.hessians
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::int8::Int4Method;

    /// What calibration must produce for these targets (the rules before schemes, kept to
    /// check them against).
    fn needs_by_rule(o: &ExportOptions) -> Needs {
        let has = |t: Target| o.targets.contains(&t);
        let has_fp8 = o.targets.iter().any(|t| t.is_fp8());
        Needs {
            stats: has(Target::Fp8Static)
                || has(Target::Int8)
                || o.targets.iter().any(|t| t.nvfp4_activations())
                || (has(Target::W4A16) && o.int4_weights == Int4Method::Awq)
                || (has_fp8 && o.fp8_weights != WeightMode::Rtn)
                || o.gguf_from_calibration(),
            hessians: (has_fp8 && o.fp8_weights == WeightMode::Gptq)
                || (has(Target::Int8) && o.int8_weights == WeightMode::Gptq)
                || (has(Target::W4A16) && o.int4_weights == Int4Method::Gptq),
        }
    }

    /// The schemes' needs are the rules they replaced, for every target and method.
    #[test]
    fn scheme_needs_equal_the_rules_they_replaced() {
        use crate::quant::fp8::WeightMode as M;
        let mut o = ExportOptions {
            targets: vec![],
            out: PathBuf::from("x"),
            force: false,
            fp8_weights: M::Rtn,
            int8_weights: M::Rtn,
            int4_weights: Int4Method::Rtn,
            smooth_alpha: None,
            group_size: None,
            calib: CalibOptions {
                calib: None,
                spec: crate::calib::CalibSpec {
                    samples: 1,
                    seq_len: 8,
                    shuffle: None,
                },
                load: None,
                save: None,
                hidden_budget_bytes: 0,
                spill_dir: PathBuf::from("x"),
            },
            calib_asked: false,
            gguf: GgufSettings::default(),
            command_line: String::new(),
            allow_nonfinite: false,
            calib_inputs: None,
            resume: false,
            journal_every_s: 0,
            layer_quant: BTreeMap::new(),
        };
        for t in Target::ALL {
            for fp8 in [M::Rtn, M::Search, M::Gptq] {
                for int8 in [M::Rtn, M::Gptq] {
                    for int4 in [Int4Method::Rtn, Int4Method::Gptq, Int4Method::Awq] {
                        for asked in [false, true] {
                            o.targets = vec![t];
                            o.fp8_weights = fp8;
                            o.int8_weights = int8;
                            o.int4_weights = int4;
                            o.calib_asked = asked;
                            assert_eq!(
                                o.needs(),
                                needs_by_rule(&o),
                                "{t} {fp8:?} {int8:?} {int4:?} {asked}"
                            );
                        }
                    }
                }
            }
        }
    }
}
