//! The input-gradient-norm penalty by a finite-difference mixed derivative.

use candle_core::{Tensor, Var};

use super::param_grad::{
    axpy, check_finite, combine, loss_and_grads, sq_norms, to_store, var_grads,
};
use super::{GradPenaltyConfig, PenalizedGrads};
use crate::device::{host_f64_scalar, wide_dtype};
use crate::error::{fail, Result};
use crate::params::describe_var;

/// Gradients w.r.t. `vars` of `L(θ, x) + ρ‖∇_x L‖` ([`Penalty::Norm`]) or
/// `L(θ, x) + ρ/2 ‖∇_x L‖²` ([`Penalty::HalfSquared`]).
///
/// With `g_x = ∇_x L(θ, x)` (backprop w.r.t. `x` made a `Var`),
/// `ĝ_x = g_x/‖g_x‖` and the step `h` ([`FdStep`], relative to `‖x‖`), the
/// mixed second derivative along `ĝ_x` is
///
/// ```text
/// M ĝ_x = (∂²L/∂θ∂x) ĝ_x ≈ (∇_θ L(θ, x + h ĝ_x) − ∇_θ L(θ, x)) / h   (forward)
///                       ≈ (∇_θ L(θ, x + h ĝ_x) − ∇_θ L(θ, x − h ĝ_x)) / (2h)   (central)
/// Norm:        ∇_θ = ∇_θ L + ρ M ĝ_x
/// HalfSquared: ∇_θ = ∇_θ L + ρ ‖g_x‖ M ĝ_x
/// ```
///
/// `x` is the whole input batch, so `‖∇_x L‖² = Σ_i ‖∇_{x_i} L‖²` (for a loss
/// averaged over `b` samples, `(1/b²) Σ_i ‖∇_{x_i} ℓ_i‖²`). `loss_fn(x)`
/// computes the loss from an input and the current values of `vars`; it must
/// be deterministic (it is called 2 or 3 times). `x` and `vars` are not
/// modified. Variables without a gradient are left out of the result. A
/// non-finite loss, or NaN/Inf in `∇_x L` or in a parameter gradient, is
/// [`Error::NonFiniteGradient`](crate::Error::NonFiniteGradient), as an
/// optimizer's step would give, naming `x` or the variable (`param.k
/// (vars[i])`, as in [`param_grad_penalty`](super::param_grad_penalty)).
/// When `∇_x L = 0` the penalty gradient is 0.
///
/// [`Penalty::Norm`]: super::Penalty::Norm
/// [`Penalty::HalfSquared`]: super::Penalty::HalfSquared
/// [`FdStep`]: super::FdStep
pub fn input_grad_penalty<F>(
    loss_fn: F,
    x: &Tensor,
    vars: &[Var],
    cfg: &GradPenaltyConfig,
) -> Result<PenalizedGrads>
where
    F: Fn(&Tensor) -> candle_core::Result<Tensor>,
{
    const WHO: &str = "input_grad_penalty";
    cfg.validate(WHO)?;
    if !x.dtype().is_float() {
        fail!(
            Shape,
            format!("{WHO}: x"),
            "expected a float input, got {:?}",
            x.dtype()
        );
    }
    let xv = Var::from_tensor(&x.detach())?;
    let (loss, grads) = loss_and_grads(&|| loss_fn(xv.as_tensor()), WHO)?;
    let g = var_grads(vars, &grads)?;
    sq_norms(
        &g.iter().map(|t| t.as_ref()).collect::<Vec<_>>(),
        |i| describe_var(vars, i, ""),
        WHO,
    )?;
    // A leaf's gradient still carries a graph back to the parameters (candle
    // detaches only the gradients it propagates further); the perturbed input
    // must be a constant, so detach it.
    let gx = match grads.get(xv.as_tensor()) {
        Some(gx) => gx.detach(),
        None => x.zeros_like()?,
    };
    let gx_norm = sq_norms(&[Some(&gx)], |_| "x".to_string(), WHO)?[0].sqrt();
    let (scale, penalty) = cfg.scale_and_value(gx_norm);
    if gx_norm == 0.0 || scale == 0.0 {
        return Ok(PenalizedGrads {
            grads: to_store(vars, g)?,
            loss,
            grad_norm: gx_norm,
            penalty,
            step: 0.0,
        });
    }
    let x_norm = host_f64_scalar(&x.to_dtype(wide_dtype(x.device()))?.sqr()?.sum_all()?)?.sqrt();
    let h = cfg.step_size(x_norm, x.dtype());
    let at = |sign: f64| -> Result<Vec<Option<Tensor>>> {
        let xp = axpy(&x.detach(), &gx, sign * h / gx_norm)?;
        let (_, grads) = loss_and_grads(&|| loss_fn(&xp), WHO)?;
        let gp = var_grads(vars, &grads)?;
        check_finite(&gp, vars, "at the perturbed input", WHO)?;
        Ok(gp)
    };
    let plus = at(1.0)?;
    let (base, denom) = if cfg.central {
        (at(-1.0)?, 2.0 * h)
    } else {
        (g.clone(), h)
    };
    let combined = combine(&g, &plus, &base, scale / denom)?;
    Ok(PenalizedGrads {
        grads: to_store(vars, combined)?,
        loss,
        grad_norm: gx_norm,
        penalty,
        step: h,
    })
}
