//! Applying a [`WeightDecay`] to a step's parameters: same-shape matrices are
//! batched into one power iteration, warm-started from the stored `v₁`.

use std::collections::BTreeMap;

use candle_core::{DType, Result, Tensor};

use super::params::{matrix_view, Item, NamedVar};
use super::state::{key, Slots};
use crate::decay::{decoupled_decay, spectral_decay, WeightDecay, COLD_START_ITERS};
use crate::linalg::power_iteration;

/// Slot holding a matrix's `v₁` (shape `(cols,)` of its matrix view).
pub(crate) const SPECTRAL_V: &str = "spectral_v";

/// The `spectral_v` slot spec of a parameter (any parameter of rank ≥ 2).
pub(crate) fn spectral_v_spec(var: &NamedVar) -> Option<(Vec<usize>, DType)> {
    let (_, cols) = matrix_view(var.var.dims())?;
    Some((vec![cols], super::params::math_dtype(var.var.dtype())))
}

/// Returns each item's parameter after decay with coefficient `lr·λ` (the
/// items' order), writing new `v₁` vectors into `slots` (a staged copy).
pub(crate) fn apply_decay(
    vars: &[NamedVar],
    items: &[Item],
    decay: &WeightDecay,
    decay_vectors: bool,
    lr: f64,
    slots: &mut Slots,
) -> Result<Vec<Tensor>> {
    let coeff = lr * decay.lambda();
    let mut out: Vec<Tensor> = items.iter().map(|it| it.param.clone()).collect();
    if coeff == 0.0 {
        return Ok(out);
    }
    // Same-shape matrices → one batched power iteration.
    let mut groups: BTreeMap<(usize, usize), Vec<usize>> = BTreeMap::new();
    for (pos, it) in items.iter().enumerate() {
        match (matrix_view(it.param.dims()), decay) {
            (Some(rc), WeightDecay::Spectral { .. }) => groups.entry(rc).or_default().push(pos),
            (Some(_), _) => out[pos] = decoupled_decay(&it.param, coeff)?,
            // A vector is a 1×n matrix: its spectral decay is the decoupled one.
            (None, _) if decay_vectors => out[pos] = decoupled_decay(&it.param, coeff)?,
            (None, _) => {}
        }
    }
    let WeightDecay::Spectral { iters, .. } = *decay else {
        return Ok(out);
    };
    for ((rows, cols), members) in groups {
        let mats = members
            .iter()
            .map(|&p| items[p].param.reshape((rows, cols)))
            .collect::<Result<Vec<_>>>()?;
        let batch = Tensor::stack(&mats, 0)?;
        let mut cold = false;
        let starts = members
            .iter()
            .map(
                |&p| match slots.get(&key(&vars[items[p].index].name, SPECTRAL_V)) {
                    Some(v) => Ok(v.clone()),
                    None => {
                        cold = true;
                        Tensor::zeros(cols, batch.dtype(), batch.device())
                    }
                },
            )
            .collect::<Result<Vec<_>>>()?;
        let start = Tensor::stack(&starts, 0)?;
        let iters = if cold {
            iters.max(COLD_START_ITERS)
        } else {
            iters
        };
        let top = power_iteration(&batch, Some(&start), iters)?;
        let decayed = spectral_decay(&batch, &top, coeff)?;
        for (i, &p) in members.iter().enumerate() {
            let it = &items[p];
            out[p] = decayed.get(i)?.reshape(it.param.shape())?;
            let v = top.v.get(i)?.to_dtype(it.param.dtype())?;
            slots.insert(key(&vars[it.index].name, SPECTRAL_V), v);
        }
    }
    Ok(out)
}
