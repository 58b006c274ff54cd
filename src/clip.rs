//! Gradient clipping by global norm (candle has none).
//!
//! `‖g‖ = √(Σ_p ‖g_p‖_F²)` over the parameters that have a gradient; when
//! `‖g‖ > max_norm`, every gradient is scaled by `max_norm/‖g‖`, so the global
//! norm after clipping is exactly `max_norm` (up to rounding). Unlike
//! `torch.nn.utils.clip_grad_norm_` there is no `+1e-6` in the denominator.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use crate::error::{fail, Result};

/// The global norm `√(Σ_p ‖g_p‖_F²)` of the gradients of `vars` in `grads`
/// (variables without a gradient are skipped; 0 when none has one), summed in
/// f64 for f64 gradients and f32 otherwise.
pub fn grad_norm(grads: &GradStore, vars: &[Var]) -> Result<f64> {
    let mut squares = Vec::new();
    for v in vars {
        if let Some(g) = grads.get(v) {
            let dt = if g.dtype() == DType::F64 {
                DType::F64
            } else {
                DType::F32
            };
            squares.push(g.to_dtype(dt)?.sqr()?.sum_all()?.to_dtype(DType::F64)?);
        }
    }
    if squares.is_empty() {
        return Ok(0.0);
    }
    // One device-to-host transfer for all parameters.
    let total: f64 = Tensor::stack(&squares, 0)?.to_vec1::<f64>()?.iter().sum();
    Ok(total.sqrt())
}

/// Clips the gradients of `vars` in place to global norm `max_norm`; returns
/// the norm before clipping.
///
/// If `‖g‖ > max_norm`, each `g_p ← g_p·(max_norm/‖g‖)` (in the gradient's
/// dtype); otherwise nothing changes. Errors — changing no gradient — when
/// `max_norm` is not finite and `> 0`, or when the norm is NaN or infinite
/// (a NaN/Inf gradient).
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[Var], max_norm: f64) -> Result<f64> {
    if !(max_norm.is_finite() && max_norm > 0.0) {
        fail!(
            Config,
            "clip_grad_norm: max_norm",
            "must be finite and > 0, got {max_norm}"
        );
    }
    let norm = grad_norm(grads, vars)?;
    if !norm.is_finite() {
        fail!(
            Numerical,
            "clip_grad_norm",
            "the global gradient norm is {norm} (a gradient holds NaN or Inf); nothing was clipped"
        );
    }
    if norm > max_norm {
        let scale = max_norm / norm;
        // Compute every scaled gradient first, then insert: a failure leaves
        // the store unchanged.
        let mut scaled = Vec::new();
        for v in vars {
            if let Some(g) = grads.get(v) {
                scaled.push((v, g.affine(scale, 0.0)?));
            }
        }
        for (v, g) in scaled {
            grads.insert(v, g);
        }
    }
    Ok(norm)
}
