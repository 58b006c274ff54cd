//! Named parameters: what every optimizer and the weight averages walk over.

use std::collections::HashSet;

use candle_core::{DType, Device, Var};
use candle_nn::VarMap;

use crate::error::{fail, Result};

/// A trainable variable and the name its state is saved under.
#[derive(Clone, Debug)]
pub struct NamedVar {
    /// Checkpoint key prefix: the `VarMap` name, or `param.<i>` for bare vars.
    pub name: String,
    /// The variable itself.
    pub var: Var,
}

/// What a transform or a label function knows about a parameter.
#[derive(Clone, Debug)]
pub struct ParamInfo {
    /// The parameter's name.
    pub name: String,
    /// Its shape.
    pub dims: Vec<usize>,
    /// Its dtype.
    pub dtype: DType,
    /// Its device.
    pub device: Device,
}

impl ParamInfo {
    /// The description of a named variable.
    pub fn of(v: &NamedVar) -> Self {
        Self {
            name: v.name.clone(),
            dims: v.var.dims().to_vec(),
            dtype: v.var.dtype(),
            device: v.var.device().clone(),
        }
    }

    /// The matrix view `(d₀, d₁·d₂·…)` of a parameter of rank ≥ 2 (a conv
    /// kernel `(out, in, kh, kw)` is `(out, in·kh·kw)`); `None` for rank ≤ 1.
    pub fn matrix(&self) -> Option<(usize, usize)> {
        matrix_view(&self.dims)
    }

    /// Whether the parameter has rank ≥ 2.
    pub fn is_matrix(&self) -> bool {
        self.dims.len() >= 2
    }

    /// Number of elements.
    pub fn elem_count(&self) -> usize {
        self.dims.iter().product()
    }

    /// The dtype of the update arithmetic and of the state (f64 for f64
    /// parameters, f32 for everything else).
    pub fn math_dtype(&self) -> DType {
        crate::device::math_dtype(self.dtype)
    }
}

impl PartialEq for NamedVar {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name && self.var.id() == other.var.id()
    }
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

/// Checks names are unique (they key the checkpoint) and that no variable is
/// listed twice under two names (it would be updated twice per step).
pub(crate) fn check_unique(vars: &[NamedVar]) -> Result<()> {
    let mut names = HashSet::new();
    let mut ids = HashSet::new();
    for v in vars {
        if !names.insert(v.name.as_str()) {
            fail!(Config, v.name, "two parameters share this name");
        }
        if !ids.insert(v.var.id()) {
            fail!(
                Config,
                v.name,
                "this variable is also listed under another name"
            );
        }
    }
    Ok(())
}

/// The matrix view `(rows, cols)` of a shape of rank ≥ 2: `(d₀, d₁·d₂·…)`.
/// `None` for rank ≤ 1.
pub fn matrix_view(dims: &[usize]) -> Option<(usize, usize)> {
    match dims {
        [] | [_] => None,
        [r, rest @ ..] => Some((*r, rest.iter().product())),
    }
}
