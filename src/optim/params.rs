//! The plumbing every optimizer shares: named parameters, gathering gradients,
//! checking them, and committing a step all at once.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, Var};
use candle_nn::VarMap;

use crate::error::{fail, invalid};

/// A trainable variable and the name its optimizer state is saved under.
#[derive(Clone, Debug)]
pub struct NamedVar {
    /// Checkpoint key prefix: the `VarMap` name, or `param.<i>` for bare vars.
    pub name: String,
    /// The variable itself.
    pub var: Var,
}

/// Names bare variables `param.0`, `param.1`, … (non-float vars are dropped,
/// as in candle-nn's optimizers).
pub(crate) fn name_vars(vars: Vec<Var>) -> Vec<NamedVar> {
    vars.into_iter()
        .filter(|v| v.dtype().is_float())
        .enumerate()
        .map(|(i, var)| NamedVar {
            name: format!("param.{i}"),
            var,
        })
        .collect()
}

/// The float variables of a `VarMap`, with their names, sorted by name.
pub(crate) fn varmap_vars(varmap: &VarMap) -> Vec<NamedVar> {
    let data = varmap.data().lock().expect("VarMap lock poisoned");
    let mut vars: Vec<NamedVar> = data
        .iter()
        .filter(|(_, v)| v.dtype().is_float())
        .map(|(name, var)| NamedVar {
            name: name.clone(),
            var: var.clone(),
        })
        .collect();
    vars.sort_by(|a, b| a.name.cmp(&b.name));
    vars
}

/// Checks names are unique (they key the checkpoint).
pub(crate) fn check_unique(vars: &[NamedVar]) -> Result<()> {
    let mut seen = HashMap::new();
    for v in vars {
        if seen.insert(v.name.as_str(), ()).is_some() {
            fail!(v.name, "two parameters share this name");
        }
    }
    Ok(())
}

/// The dtype the update math runs in: f64 stays f64, everything else is f32
/// (so f16/bf16 parameters keep f32 moments and update in f32).
pub(crate) fn math_dtype(dtype: DType) -> DType {
    crate::linalg::compute_dtype(dtype)
}

/// One parameter that has a gradient this step, upcast to the math dtype.
#[derive(Clone, Debug)]
pub(crate) struct Item {
    /// Index into the optimizer's parameter list.
    pub index: usize,
    /// The current value, math dtype, original shape.
    pub param: Tensor,
    /// Its gradient, math dtype, original shape.
    pub grad: Tensor,
}

/// Collects the parameters that have a gradient, skipping the others. Errors
/// (naming the parameter) on a gradient of the wrong shape or with a NaN/Inf;
/// all gradients are checked with a single device-to-host transfer.
pub(crate) fn gather(vars: &[NamedVar], grads: &GradStore) -> Result<Vec<Item>> {
    let mut items = Vec::new();
    let mut checks = Vec::new();
    for (index, nv) in vars.iter().enumerate() {
        let Some(grad) = grads.get(&nv.var) else {
            continue;
        };
        if grad.shape() != nv.var.shape() {
            fail!(
                nv.name,
                "gradient shape {:?} does not match the parameter shape {:?}",
                grad.dims(),
                nv.var.dims()
            );
        }
        let dt = math_dtype(nv.var.dtype());
        // Detached: candle's gradients (and the Var itself) carry an autograd
        // graph, and state built from them would chain every past step's
        // tensors together (unbounded memory over training).
        let grad = grad.detach().to_dtype(dt)?;
        // g − g is 0 for finite g and NaN for NaN/±Inf; the sum flags any.
        #[allow(clippy::eq_op)]
        checks.push((&grad - &grad)?.sum_all()?.to_dtype(DType::F32)?);
        items.push(Item {
            index,
            param: nv.var.as_tensor().detach().to_dtype(dt)?,
            grad,
        });
    }
    if !checks.is_empty() {
        let flags = Tensor::stack(&checks, 0)?.to_vec1::<f32>()?;
        if let Some(pos) = flags.iter().position(|f| !f.is_finite()) {
            let nv = &vars[items[pos].index];
            return Err(invalid(
                &nv.name,
                "gradient contains NaN or Inf; the step was not applied (no parameter or state changed)",
            ));
        }
    }
    Ok(items)
}

/// Writes the new values (math dtype) back, cast to each variable's dtype.
/// Everything is cast and shape-checked before the first write, so a failure
/// leaves every parameter as it was.
pub(crate) fn commit(vars: &[NamedVar], updates: Vec<(usize, Tensor)>) -> Result<()> {
    let mut ready = Vec::with_capacity(updates.len());
    for (index, value) in updates {
        let nv = &vars[index];
        let value = value.to_dtype(nv.var.dtype())?;
        if value.shape() != nv.var.shape() {
            fail!(
                nv.name,
                "internal error: update has shape {:?}",
                value.dims()
            );
        }
        ready.push((nv, value));
    }
    for (nv, value) in ready {
        nv.var.set(&value)?;
    }
    Ok(())
}

/// The matrix view `(rows, cols)` of a parameter of rank ≥ 2: `(d₀, d₁·d₂·…)`
/// (a conv kernel `(out, in, kh, kw)` becomes `(out, in·kh·kw)`). `None` for
/// rank ≤ 1.
pub(crate) fn matrix_view(dims: &[usize]) -> Option<(usize, usize)> {
    match dims {
        [] | [_] => None,
        [r, rest @ ..] => Some((*r, rest.iter().product())),
    }
}
