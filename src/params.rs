//! Named parameters: what every optimizer and the weight averages walk over.

use std::collections::HashSet;

use candle_core::{DType, Device, Var};
use candle_nn::VarMap;

use crate::error::{fail, Result};

/// A trainable variable and the name its state is saved under.
#[derive(Clone, Debug)]
pub struct NamedVar {
    /// Checkpoint key prefix: the `VarMap` name, or `param.<i>` for bare vars
    /// (`Optimizer::new`), numbered in the order the vars were created.
    pub name: String,
    /// The variable itself.
    pub var: Var,
}

impl NamedVar {
    /// The float variables of a `VarMap`, named and sorted by their `VarMap`
    /// names (as `from_varmap` optimizers name them): for
    /// [`crate::clip::clip_grad_norm_named`] and [`crate::averaging`]
    /// without reaching into an optimizer. Errors when the `VarMap` holds no
    /// float variable (the model is not built yet).
    pub fn from_varmap(varmap: &VarMap) -> Result<Vec<NamedVar>> {
        varmap_vars(varmap)
    }
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

/// Names bare variables `param.0`, `param.1`, … in the order they were
/// created, not the order given (non-float vars are dropped, as in
/// candle-nn's optimizers).
///
/// The names key the checkpoint, so they must mean the same variables in the
/// next process. The order given does not: `VarMap::all_vars()`, the usual
/// argument of `Optimizer::new`, lists a `HashMap`'s values, whose order
/// changes from one run to the next, and a checkpoint would load into the
/// wrong same-shape parameters without an error. The creation order is the
/// order the model's code made its variables in, the same in every run.
pub(crate) fn name_vars(vars: Vec<Var>) -> Vec<NamedVar> {
    let mut vars: Vec<(usize, Var)> = vars
        .into_iter()
        .filter(|v| v.dtype().is_float())
        .enumerate()
        .collect();
    // stable: vars without a readable counter keep the order given
    vars.sort_by_key(|(i, v)| creation_index(v).map_or((1, *i), |c| (0, c)));
    vars.into_iter()
        .enumerate()
        .map(|(i, (_, var))| NamedVar {
            name: format!("param.{i}"),
            var,
        })
        .collect()
}

/// `vars[i]` described for an error: `param.k (vars[i]{more})`, `param.k`
/// the name [`name_vars`] gives it among `vars` (its creation order, the
/// same in every run, which `i`, a place in a list such as
/// `VarMap::all_vars()`, is not; the name an optimizer built by
/// `Optimizer::new` from the same list reports).
pub(crate) fn describe_var(vars: &[Var], i: usize, more: &str) -> String {
    let bare = name_vars(vars.to_vec())
        .into_iter()
        .find(|nv| nv.var.id() == vars[i].id())
        .map_or_else(|| "a variable".to_string(), |nv| nv.name);
    format!("{bare} (vars[{i}]{more})")
}

/// The creation counter of a variable's tensor. candle numbers tensors from
/// one process-wide counter, in creation order; `TensorId` keeps it private
/// and has no `Ord`, but its `Debug` form is `TensorId(n)` (candle 0.11; a
/// unit test checks the form, so a change shows as a test failure).
fn creation_index(v: &Var) -> Option<usize> {
    format!("{:?}", v.id())
        .strip_prefix("TensorId(")?
        .strip_suffix(')')?
        .parse()
        .ok()
}

/// Whether this candle's tensors show their creation counter
/// ([`creation_index`]): bare-variable checkpoints rely on it.
pub(crate) fn creation_order_readable() -> bool {
    Var::new(&[0f32], &candle_core::Device::Cpu).is_ok_and(|v| creation_index(&v).is_some())
}

/// The float variables of a `VarMap`, with their names, sorted by name.
/// Errors when there are none: a `VarBuilder` creates the variables as the
/// model is built, so an optimizer (or average) made from the `VarMap`
/// before the model would hold nothing and silently train nothing.
pub(crate) fn varmap_vars(varmap: &VarMap) -> Result<Vec<NamedVar>> {
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
    if vars.is_empty() {
        fail!(
            Config,
            "varmap",
            "the VarMap holds no float variables: build the model first (a VarBuilder \
             creates its variables as the model is built), then the optimizer"
        );
    }
    Ok(vars)
}

/// Checks names are unique (they key the checkpoint), that no variable is
/// listed twice under two names (it would be updated twice per step), and
/// that every dtype is one the updates support: f16, bf16, f32 or f64
/// (candle's 8-, 6- and 4-bit float formats are refused here, naming the
/// parameter, rather than at every step).
pub(crate) fn check_params(vars: &[NamedVar]) -> Result<()> {
    let mut names = HashSet::new();
    let mut ids = HashSet::new();
    for v in vars {
        if !matches!(
            v.var.dtype(),
            DType::F16 | DType::BF16 | DType::F32 | DType::F64
        ) {
            fail!(
                Config,
                v.name,
                "dtype {:?} is not supported: parameters must be f16, bf16, f32 or f64",
                v.var.dtype()
            );
        }
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

/// The first key of `keys` seen before: `(its first index, this index)`
/// (a variable or a name listed twice).
pub(crate) fn first_repeat<K: std::hash::Hash + Eq>(
    keys: impl IntoIterator<Item = K>,
) -> Option<(usize, usize)> {
    let mut first = std::collections::HashMap::new();
    keys.into_iter()
        .enumerate()
        .find_map(|(i, k)| first.insert(k, i).map(|j| (j, i)))
}

/// The matrix view `(rows, cols)` of a shape of rank ≥ 2: `(d₀, d₁·d₂·…)`.
/// `None` for rank ≤ 1.
pub fn matrix_view(dims: &[usize]) -> Option<(usize, usize)> {
    match dims {
        [] | [_] => None,
        [r, rest @ ..] => Some((*r, rest.iter().product())),
    }
}

/// Whether a parameter of `dtype` gets an f32 master weight under
/// [`Driver::with_master_weights`](crate::optim::Driver::with_master_weights).
pub(crate) fn has_master(dtype: DType) -> bool {
    matches!(dtype, DType::BF16 | DType::F16)
}

/// The dtype a parameter of `dtype` is stepped in, and takes its gradient
/// in: f32 for one with a master weight (`master_weights` on), else its own.
pub(crate) fn stepped_dtype(dtype: DType, master_weights: bool) -> DType {
    if master_weights && has_master(dtype) {
        DType::F32
    } else {
        dtype
    }
}

/// `x` rounded to the nearest value of the float `dtype` (to nearest,
/// ties to even, as candle's casts from f64 round), as f64 (f32's rounding
/// for the others).
pub(crate) fn round_to(dtype: DType, x: f64) -> f64 {
    match dtype {
        DType::F64 => x,
        DType::BF16 => half::bf16::from_f64(x).to_f64(),
        DType::F16 => half::f16::from_f64(x).to_f64(),
        _ => x as f32 as f64,
    }
}

/// The largest finite value of a float dtype (f32's for the others).
pub(crate) fn largest_finite(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => f64::MAX,
        DType::F16 => half::f16::MAX.to_f64(),
        DType::BF16 => half::bf16::MAX.to_f64(),
        _ => f32::MAX as f64,
    }
}

impl ParamInfo {
    /// Errors (naming the parameter) when a sphere's `radius` is beyond the
    /// largest value of its dtype: the entries of a point on the sphere of
    /// any p-norm (p ≥ 1) or of the spectral norm reach up to `radius`, and
    /// the step would write Inf into the parameter.
    pub(crate) fn check_radius_fits(&self, radius: f64) -> Result<()> {
        let largest = largest_finite(self.dtype);
        if radius > largest {
            fail!(
                Config,
                self.name,
                "the radius {radius:e} is beyond the largest {:?} value ({largest:e}): the parameter would overflow",
                self.dtype
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Tensor;

    #[test]
    fn creation_index_reads_candles_counter_in_creation_order() {
        let first = Var::zeros(3, DType::F32, &Device::Cpu).unwrap();
        let second = Var::zeros(3, DType::F32, &Device::Cpu).unwrap();
        assert!(creation_order_readable());
        let (a, b) = (creation_index(&first), creation_index(&second));
        assert!(
            a.is_some(),
            "TensorId's Debug form changed: {:?}",
            first.id()
        );
        assert!(a < b, "{a:?} then {b:?}");
        // a clone is the same variable, with the same index
        assert_eq!(creation_index(&first.clone()), a);
    }

    /// A `VarMap`'s parameters are its float variables only (an integer
    /// one, such as an index table, is not trained, as in candle-nn's
    /// optimizers), sorted by name: the `HashMap` lists them in an order that
    /// changes between runs, and the names key the checkpoint.
    #[test]
    fn varmap_vars_are_the_float_ones_sorted_by_name() {
        let vm = VarMap::new();
        {
            let mut data = vm.data().lock().unwrap();
            for name in ["m.b", "m.a", "idx", "a", "z"] {
                let var = if name == "idx" {
                    Var::new(&[1u32, 2], &Device::Cpu).unwrap()
                } else {
                    Var::zeros(2, DType::F32, &Device::Cpu).unwrap()
                };
                data.insert(name.to_string(), var);
            }
        }
        let names: Vec<String> = varmap_vars(&vm)
            .unwrap()
            .into_iter()
            .map(|v| v.name)
            .collect();
        assert_eq!(names, ["a", "m.a", "m.b", "z"]);
        let only_ints = VarMap::new();
        only_ints
            .data()
            .lock()
            .unwrap()
            .insert("idx".into(), Var::new(&[1u32], &Device::Cpu).unwrap());
        match varmap_vars(&only_ints) {
            Err(crate::Error::Config { who, what }) => {
                assert_eq!(who, "varmap");
                assert!(what.contains("no float variables"), "{what}");
            }
            r => panic!("{r:?}"),
        }
    }

    /// One variable under two names would be updated twice per step:
    /// `check_params` refuses it, naming the second name; distinct variables
    /// with distinct names pass.
    #[test]
    fn a_variable_listed_under_two_names_is_refused() {
        let v = Var::zeros(2, DType::F32, &Device::Cpu).unwrap();
        let other = Var::zeros(2, DType::F32, &Device::Cpu).unwrap();
        let nv = |name: &str, var: &Var| NamedVar {
            name: name.into(),
            var: var.clone(),
        };
        check_params(&[nv("a", &v), nv("b", &other)]).unwrap();
        match check_params(&[nv("a", &v), nv("b", &other), nv("c", &v)]) {
            Err(crate::Error::Config { who, what }) => {
                assert_eq!(who, "c");
                assert!(what.contains("also listed under another name"), "{what}");
            }
            r => panic!("{r:?}"),
        }
    }

    #[test]
    fn bare_vars_are_named_by_creation_not_by_the_order_given() {
        let vars: Vec<Var> = (0..4)
            .map(|i| Var::from_tensor(&Tensor::new(&[i as f32; 2], &Device::Cpu).unwrap()).unwrap())
            .collect();
        let index = Var::new(&[1u32], &Device::Cpu).unwrap();
        for order in [[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]] {
            let mut given: Vec<Var> = order.iter().map(|&i| vars[i].clone()).collect();
            given.insert(2, index.clone());
            let named = name_vars(given);
            assert_eq!(named.len(), 4, "the u32 var is dropped");
            for (k, nv) in named.iter().enumerate() {
                assert_eq!(nv.name, format!("param.{k}"));
                assert_eq!(nv.var.id(), vars[k].id(), "order {order:?}: param.{k}");
            }
        }
    }
}
