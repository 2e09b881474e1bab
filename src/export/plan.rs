//! What each checkpoint target holds: its tensors (names, dtypes, shapes) in the input's order.
//! Each linear layer's tensors come from the target's scheme (`scheme`); everything else is
//! copied as the input stores it.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::format::safetensors::PlannedTensor;
use crate::model::names::{TensorRole, TensorSpec};
use crate::model::Checkpoint;
use crate::scheme::{LayerQuant, Target};

/// The checkpoint's tensors in canonical order with their roles (a tied `lm_head` that is
/// absent stays absent).
pub fn inputs(ck: &Checkpoint) -> Vec<TensorSpec> {
    ck.specs()
        .into_iter()
        .filter(|s| ck.index.contains_key(&s.name))
        .collect()
}

/// Every tensor of target `t`'s checkpoint, in the input's order.
/// `layers` (a mixed `w4a16` checkpoint's per-layer kinds) overrides `t` for the layers it names.
pub fn plan(
    t: Target,
    ck: &Checkpoint,
    group: Option<usize>,
    layers: &BTreeMap<String, LayerQuant>,
) -> Result<Vec<PlannedTensor>> {
    let scheme = crate::scheme::of(t)
        .ok_or_else(|| Error::Internal(format!("{t} is not a checkpoint target")))?;
    let mut v = Vec::new();
    for spec in inputs(ck) {
        let (name, shape) = (spec.name, spec.shape);
        match spec.role {
            TensorRole::Linear(_, _) if layers.contains_key(&name) => {
                v.extend(crate::scheme::mixed_tensors(layers[&name], &name, &shape));
            }
            TensorRole::Linear(l, r) => {
                v.extend(scheme.tensors(t, &name, &shape, group));
                v.extend(scheme.after_linear(t, l, r));
            }
            _ => {
                let (_, info) = ck.info(&name).expect("listed");
                v.push(PlannedTensor {
                    name,
                    dtype: info.dtype,
                    shape: shape.clone(),
                });
            }
        }
    }
    Ok(v)
}
