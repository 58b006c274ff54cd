//! The parameter-gradient-norm penalty by a finite-difference Hessian–vector
//! product (Zhao et al. 2022).

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use crate::device::{host_f64, wide_dtype};
use crate::error::{fail, Error, Result};
use crate::params::describe_var;

/// Which gradient-norm penalty is added to the loss.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Penalty {
    /// `ρ ‖∇L‖`; its gradient is `ρ H ĝ` with `ĝ = ∇L/‖∇L‖` (0 where `∇L = 0`).
    Norm,
    /// `ρ/2 ‖∇L‖²`; its gradient is `ρ H g = ρ ‖g‖ H ĝ`.
    HalfSquared,
}

/// The finite-difference step `h`: the distance moved along the unit gradient
/// direction `ĝ`, i.e. the point `θ + h ĝ = θ + ε g` with `ε = h/‖g‖`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum FdStep {
    /// `h = δ (1 + ‖θ‖)` with `δ = √ε_mach` (forward differences) or
    /// `∛ε_mach` (central), `ε_mach` the machine epsilon of the perturbed
    /// tensors' dtype (the coarsest if they differ; variables without a
    /// gradient are not perturbed and count for neither `‖θ‖` nor the
    /// dtype): f64 `1.5e-8` / `6.1e-6`, f32 `3.5e-4` / `4.9e-3`. This
    /// balances the `O(h)` (central: `O(h²)`) truncation error against the
    /// `O(ε_mach/h)` rounding error of the difference quotient. The dtype
    /// is the tensors' own: a loss that computes in a coarser one (f32
    /// weights cast to bf16 inside the model) needs a larger step, e.g.
    /// [`FdStep::Relative`] with bf16's `√ε = 0.088`, or the perturbation
    /// rounds away there and the penalty's gradient comes out 0.
    Auto,
    /// `h = δ (1 + ‖θ‖)` for the given `δ` (`‖θ‖`: the global norm of all the
    /// perturbed tensors).
    Relative(f64),
    /// `h` itself: Zhao et al.'s radius `r`.
    Absolute(f64),
}

/// Configuration of [`param_grad_penalty`] and
/// [`input_grad_penalty`](super::input_grad_penalty).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct GradPenaltyConfig {
    /// The penalty weight `ρ ≥ 0`.
    pub rho: f64,
    /// `ρ‖∇L‖` or `ρ/2‖∇L‖²`.
    pub penalty: Penalty,
    /// The finite-difference step.
    pub step: FdStep,
    /// Central differences `(∇L(θ + hĝ) − ∇L(θ − hĝ))/(2h)`: two extra
    /// forward/backward passes instead of one, error `O(h²)` instead of `O(h)`.
    pub central: bool,
}

impl Default for GradPenaltyConfig {
    /// `ρ = 0.1`, [`Penalty::Norm`], [`FdStep::Auto`], forward differences.
    fn default() -> Self {
        Self {
            rho: 0.1,
            penalty: Penalty::Norm,
            step: FdStep::Auto,
            central: false,
        }
    }
}

impl GradPenaltyConfig {
    pub(crate) fn validate(&self, who: &str) -> Result<()> {
        if !(self.rho.is_finite() && self.rho >= 0.0) {
            fail!(
                Config,
                format!("{who}: GradPenaltyConfig.rho"),
                "expected a finite ρ ≥ 0, got {}",
                self.rho
            );
        }
        match self.step {
            FdStep::Relative(d) | FdStep::Absolute(d) if !(d.is_finite() && d > 0.0) => fail!(
                Config,
                format!("{who}: GradPenaltyConfig.step"),
                "expected a finite step > 0, got {d}"
            ),
            _ => Ok(()),
        }
    }

    /// The step `h` for perturbed tensors of global norm `norm` and `dtype`.
    pub(crate) fn step_size(&self, norm: f64, dtype: DType) -> f64 {
        let rel = |d: f64| d * (1.0 + norm);
        match self.step {
            FdStep::Absolute(h) => h,
            FdStep::Relative(d) => rel(d),
            FdStep::Auto => {
                let eps = machine_eps(dtype);
                rel(if self.central { eps.cbrt() } else { eps.sqrt() })
            }
        }
    }

    /// The factor `c` such that the penalty gradient is `c · H ĝ`, and the
    /// penalty value, for a gradient of norm `g`.
    pub(crate) fn scale_and_value(&self, g: f64) -> (f64, f64) {
        match self.penalty {
            Penalty::Norm => (self.rho, self.rho * g),
            Penalty::HalfSquared => (self.rho * g, 0.5 * self.rho * g * g),
        }
    }
}

fn machine_eps(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => f64::EPSILON,
        DType::F16 => 9.765_625e-4,
        DType::BF16 => 7.812_5e-3,
        _ => f32::EPSILON as f64,
    }
}

/// Gradients of a penalised objective, ready for `candle_nn::Optimizer::step`.
#[derive(Debug)]
pub struct PenalizedGrads {
    /// `∇_θ (L + penalty)` for every variable that has a gradient (keyed by
    /// the variables, as `loss.backward()` would key them).
    pub grads: GradStore,
    /// `L` at the unperturbed point.
    pub loss: f64,
    /// `‖∇L‖` at the unperturbed point (w.r.t. `θ` for
    /// [`param_grad_penalty`], w.r.t. `x` for
    /// [`input_grad_penalty`](super::input_grad_penalty)).
    pub grad_norm: f64,
    /// The penalty value `ρ‖∇L‖` or `ρ/2 ‖∇L‖²`; the objective is `loss + penalty`.
    pub penalty: f64,
    /// The finite-difference step `h` used (0 when no perturbation was needed).
    pub step: f64,
}

/// Gradients w.r.t. `vars` of `L(θ) + ρ‖∇_θ L‖` ([`Penalty::Norm`]) or
/// `L(θ) + ρ/2 ‖∇_θ L‖²` ([`Penalty::HalfSquared`]).
///
/// With `g = ∇_θ L(θ)`, `ĝ = g/‖g‖` and the step `h` ([`FdStep`]):
///
/// ```text
/// H ĝ ≈ (∇_θ L(θ + h ĝ) − g) / h                    (forward)
/// H ĝ ≈ (∇_θ L(θ + h ĝ) − ∇_θ L(θ − h ĝ)) / (2h)    (central)
/// Norm:        ∇ = g + ρ H ĝ
/// HalfSquared: ∇ = g + ρ ‖g‖ H ĝ
/// ```
///
/// For [`Penalty::Norm`] with forward differences this is exactly Zhao et
/// al.'s `(1 − α) ∇L(θ) + α ∇L(θ + r ĝ)` with `r = h` and `α = ρ/h`, i.e.
/// `ρ = α r` (use [`FdStep::Absolute`]`(r)` to reproduce their setting).
///
/// `loss_fn` computes the loss from the current values of `vars` and must be
/// deterministic (it is called 2 or 3 times). Each variable is moved by
/// `Var::set` and then restored from a copy taken before, so afterwards it is
/// bit-identical to what it was, also when an error occurs part-way.
/// Variables without a gradient are left out of the result (and are not
/// perturbed). A non-finite loss, or a NaN/Inf gradient (at `θ` or at a
/// perturbed point), is [`Error::NonFiniteGradient`], as an optimizer's step
/// on it would be, naming the variable as `param.k (vars[i])` (`param.k`:
/// the name `Optimizer::new` gives it among `vars`, stable across runs).
/// When `‖g‖ = 0` the penalty gradient is 0 (no perturbation is made).
pub fn param_grad_penalty<F>(
    loss_fn: F,
    vars: &[Var],
    cfg: &GradPenaltyConfig,
) -> Result<PenalizedGrads>
where
    F: Fn() -> candle_core::Result<Tensor>,
{
    const WHO: &str = "param_grad_penalty";
    cfg.validate(WHO)?;
    check_distinct(vars, WHO)?;
    let (loss, grads) = loss_and_grads(&loss_fn, WHO)?;
    let g = var_grads(vars, &grads)?;
    let norms = sq_norms(
        &g.iter().map(|x| x.as_ref()).collect::<Vec<_>>(),
        |i| describe_var(vars, i, ""),
        WHO,
    )?;
    let grad_norm = norms.iter().sum::<f64>().sqrt();
    let (scale, penalty) = cfg.scale_and_value(grad_norm);
    if grad_norm == 0.0 || scale == 0.0 {
        return Ok(PenalizedGrads {
            grads: to_store(vars, g)?,
            loss,
            grad_norm,
            penalty,
            step: 0.0,
        });
    }
    let theta: Vec<Tensor> = vars
        .iter()
        .map(|v| v.as_tensor().detach().copy())
        .collect::<candle_core::Result<_>>()?;
    // ‖θ‖ and the dtype of the perturbed tensors only (those with a
    // gradient): a frozen or unused variable is not moved, so it must not
    // set the step (an unused [100, 0] made h 31× too large).
    let perturbed: Vec<Option<&Tensor>> = theta
        .iter()
        .zip(&g)
        .map(|(t, gi)| gi.as_ref().map(|_| t))
        .collect();
    let theta_norm = sq_norms(&perturbed, |i| describe_var(vars, i, ""), WHO)
        .map_err(|e| match e {
            Error::NonFiniteGradient { param } => {
                Error::numerical(param, "the parameter holds NaN or Inf")
            }
            e => e,
        })?
        .iter()
        .sum::<f64>()
        .sqrt();
    // (the coarsest, should the perturbed tensors' dtypes differ)
    let dtype = vars
        .iter()
        .zip(&g)
        .filter(|(_, gi)| gi.is_some())
        .map(|(v, _)| v.dtype())
        .max_by(|a, b| machine_eps(*a).total_cmp(&machine_eps(*b)))
        .unwrap_or(DType::F32);
    let h = cfg.step_size(theta_norm, dtype);
    let at = |sign: f64| -> Result<Vec<Option<Tensor>>> {
        let moved = (|| {
            for ((v, t), gi) in vars.iter().zip(&theta).zip(&g) {
                if let Some(gi) = gi {
                    v.set(&axpy(t, gi, sign * h / grad_norm)?)?;
                }
            }
            let (_, grads) = loss_and_grads(&loss_fn, WHO)?;
            var_grads(vars, &grads)
        })();
        let restored = restore(vars, &theta);
        let moved = moved?;
        restored?;
        Ok(moved)
    };
    let plus = at(1.0)?;
    let (base, denom) = if cfg.central {
        (at(-1.0)?, 2.0 * h)
    } else {
        (g.clone(), h)
    };
    check_finite(&plus, vars, "at the perturbed point", WHO)?;
    if cfg.central {
        check_finite(&base, vars, "at the perturbed point", WHO)?;
    }
    let combined = combine(&g, &plus, &base, scale / denom)?;
    Ok(PenalizedGrads {
        grads: to_store(vars, combined)?,
        loss,
        grad_norm,
        penalty,
        step: h,
    })
}

/// Refuses a variable listed twice in `vars`: it would count twice in `‖g‖`
/// and `‖θ‖` (so `h` and the penalty would be off by up to `√2`) and be
/// moved twice per perturbation.
fn check_distinct(vars: &[Var], who: &str) -> Result<()> {
    if let Some((j, i)) = crate::params::first_repeat(vars.iter().map(|v| v.id())) {
        fail!(
            Config,
            format!("{who}: vars"),
            "vars[{j}] and vars[{i}] are the same variable (list each once)"
        );
    }
    Ok(())
}

/// Runs the loss and its backward; checks the loss is a finite scalar.
pub(crate) fn loss_and_grads<F>(loss_fn: &F, who: &str) -> Result<(f64, GradStore)>
where
    F: Fn() -> candle_core::Result<Tensor>,
{
    let loss = loss_fn()?;
    if loss.elem_count() != 1 {
        fail!(
            Shape,
            format!("{who}: loss"),
            "expected a scalar loss, got shape {:?}",
            loss.dims()
        );
    }
    let value = host_f64(&loss)?[0];
    if !value.is_finite() {
        // As a step on this loss's gradient would be refused (and so that
        // one `match` arm skips such a batch).
        return Err(Error::NonFiniteGradient {
            param: format!("{who}: the loss ({value})"),
        });
    }
    let grads = loss.backward()?;
    Ok((value, grads))
}

/// Each variable's gradient (shape-checked, detached from the graph that
/// produced it), in the variable's order.
pub(crate) fn var_grads(vars: &[Var], grads: &GradStore) -> Result<Vec<Option<Tensor>>> {
    vars.iter()
        .enumerate()
        .map(|(i, v)| match grads.get(v.as_tensor()) {
            None => Ok(None),
            Some(g) if g.shape() != v.shape() => Err(Error::shape(
                describe_var(vars, i, ""),
                format!(
                    "gradient shape {:?} does not match the variable shape {:?}",
                    g.dims(),
                    v.dims()
                ),
            )),
            Some(g) => Ok(Some(g.detach())),
        })
        .collect()
}

/// `‖tᵢ‖²` for each gradient (0 for `None`) with one host transfer; a
/// NaN/Inf one is [`Error::NonFiniteGradient`] (the error an optimizer's
/// step gives) naming `who: name(i)`.
pub(crate) fn sq_norms(
    ts: &[Option<&Tensor>],
    name: impl Fn(usize) -> String,
    who: &str,
) -> Result<Vec<f64>> {
    let sums: Vec<Tensor> = ts
        .iter()
        .flatten()
        .map(|t| t.to_dtype(wide_dtype(t.device()))?.sqr()?.sum_all())
        .collect::<candle_core::Result<_>>()?;
    let vals = if sums.is_empty() {
        vec![]
    } else {
        host_f64(&Tensor::stack(&sums, 0)?)?
    };
    let mut it = vals.into_iter();
    let mut out = Vec::with_capacity(ts.len());
    for (i, t) in ts.iter().enumerate() {
        let v = if t.is_some() {
            it.next().unwrap_or(0.0)
        } else {
            0.0
        };
        if !v.is_finite() {
            return Err(Error::NonFiniteGradient {
                param: format!("{who}: {}", name(i)),
            });
        }
        out.push(v);
    }
    Ok(out)
}

/// Each of `gs` (the variables' gradients at a perturbed point) finite, or
/// [`Error::NonFiniteGradient`] naming the first that is not, `at` the point.
pub(crate) fn check_finite(gs: &[Option<Tensor>], vars: &[Var], at: &str, who: &str) -> Result<()> {
    let refs: Vec<Option<&Tensor>> = gs.iter().map(Option::as_ref).collect();
    sq_norms(&refs, |i| describe_var(vars, i, &format!(", {at}")), who).map(|_| ())
}

/// `t + a·d` computed in f64 (f64) or f32 (otherwise), cast back to `t`'s dtype.
pub(crate) fn axpy(t: &Tensor, d: &Tensor, a: f64) -> Result<Tensor> {
    let dt = crate::linalg::compute_dtype(t.dtype());
    Ok((t.to_dtype(dt)? + (d.to_dtype(dt)? * a)?)?.to_dtype(t.dtype())?)
}

fn restore(vars: &[Var], theta: &[Tensor]) -> Result<()> {
    let mut first_err = None;
    for (v, t) in vars.iter().zip(theta) {
        if let Err(e) = v.set(t) {
            first_err.get_or_insert(e);
        }
    }
    first_err.map_or(Ok(()), |e| Err(e.into()))
}

/// `g + c (plus − base)` per variable; a missing gradient counts as zero.
pub(crate) fn combine(
    g: &[Option<Tensor>],
    plus: &[Option<Tensor>],
    base: &[Option<Tensor>],
    c: f64,
) -> Result<Vec<Option<Tensor>>> {
    g.iter()
        .zip(plus)
        .zip(base)
        .map(|((g, p), b)| {
            let Some(g) = g else { return Ok(None) };
            let dt = crate::linalg::compute_dtype(g.dtype());
            let g32 = g.to_dtype(dt)?;
            let diff = match (p, b) {
                (Some(p), Some(b)) => (p.to_dtype(dt)? - b.to_dtype(dt)?)?,
                (Some(p), None) => p.to_dtype(dt)?,
                (None, Some(b)) => b.to_dtype(dt)?.neg()?,
                (None, None) => return Ok(Some(g.clone())),
            };
            Ok(Some((g32 + (diff * c)?)?.to_dtype(g.dtype())?))
        })
        .collect()
}

/// A `GradStore` holding `grads[i]` for `vars[i]`.
pub(crate) fn to_store(vars: &[Var], grads: Vec<Option<Tensor>>) -> Result<GradStore> {
    let mut store = GradStore::default();
    for (v, g) in vars.iter().zip(grads) {
        if let Some(g) = g {
            store.insert(v.as_tensor(), g);
        }
    }
    Ok(store)
}
