//! Gradient clipping by global norm (candle has none).
//!
//! `‖g‖ = √(Σ_p ‖g_p‖_F²)` over the parameters that have a gradient; when
//! `‖g‖ > max_norm`, every gradient is scaled by `max_norm/‖g‖`, so the global
//! norm after clipping is exactly `max_norm` (up to rounding). Unlike
//! `torch.nn.utils.clip_grad_norm_` there is no `+1e-6` in the denominator.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};

use crate::device::{host_f64, wide_dtype};
use crate::error::{fail, Error, Result};
use crate::params::NamedVar;

/// The global norm `√(Σ_p ‖g_p‖_F²)` of the gradients of `vars` in `grads`
/// (variables without a gradient are skipped, a variable listed twice counts
/// once; 0 when none has one), summed in f64 for f64 gradients and f32
/// otherwise. Finite gradients too large or too small for an f32 sum of
/// squares (entries beyond ~1e19, or all below ~1e-19) are measured again
/// scaled by their largest entry, so the norm is infinite only when a
/// gradient is, and 0 only when every gradient is.
pub fn grad_norm(grads: &GradStore, vars: &[Var]) -> Result<f64> {
    grad_norm_of(grads, &vars.iter().collect::<Vec<_>>())
}

fn grad_norm_of(grads: &GradStore, vars: &[&Var]) -> Result<f64> {
    let mut seen = std::collections::HashSet::new();
    let gs: Vec<&Tensor> = vars
        .iter()
        .filter(|v| seen.insert(v.id()))
        .filter_map(|v| grads.get(v))
        // an empty gradient adds nothing (and has no largest entry)
        .filter(|g| g.elem_count() > 0)
        .collect();
    if gs.is_empty() {
        return Ok(0.0);
    }
    let total = sum_of_squares(&gs, 1.0)?;
    if total.is_finite() && total > 0.0 {
        return Ok(total.sqrt());
    }
    // Overflow, a NaN/Inf entry, or underflow (entries below ~1e-19 in f32
    // square to 0): scale by the largest magnitude (finite only if every
    // entry is; 0 only if every entry is) and sum again.
    let maxima = gs
        .iter()
        .map(|g| g.abs()?.max_all()?.to_dtype(wide_dtype(g.device())))
        .collect::<candle_core::Result<Vec<_>>>()?;
    // (data-parallel clipping reads each maximum in f32: exact for the f32,
    // bf16 and f16 gradients it supports)
    let m = crate::linalg::max_or_nan(host_f64(&Tensor::stack(&maxima, 0)?)?);
    if !(m.is_finite() && m > 0.0) {
        return Ok(total.sqrt());
    }
    Ok(m * sum_of_squares(&gs, 1.0 / m)?.sqrt())
}

/// `Σ_p ‖scale·g_p‖_F²`, each term [`squared_norm_term`], summed in f64
/// (one device-to-host transfer for all).
fn sum_of_squares(gs: &[&Tensor], scale: f64) -> Result<f64> {
    let squares = gs
        .iter()
        .map(|g| squared_norm_term(g, scale)?.to_dtype(wide_dtype(g.device())))
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(host_f64(&Tensor::stack(&squares, 0)?)?.iter().sum())
}

/// `‖scale·g‖_F²` as a scalar tensor, computed in f64 for an f64 gradient and
/// in f32 otherwise: one parameter's term of the global norm. Data-parallel
/// clipping sums the same terms, so its norm is this one bit for bit.
pub(crate) fn squared_norm_term(g: &Tensor, scale: f64) -> candle_core::Result<Tensor> {
    let dt = if g.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let g = g.to_dtype(dt)?;
    let g = if scale == 1.0 {
        g
    } else if dt == DType::F32 && scale > f32::MAX as f64 {
        // 1/max of an all-subnormal gradient overflows f32 (where `affine`
        // takes its factor): scale in two finite halves.
        let half = scale.sqrt();
        g.affine(half, 0.0)?.affine(scale / half, 0.0)?
    } else {
        g.affine(scale, 0.0)?
    };
    g.sqr()?.sum_all()
}

/// Clips the gradients of `vars` in place to global norm `max_norm`; returns
/// the norm before clipping.
///
/// If `‖g‖ > max_norm`, each `g_p ← g_p·(max_norm/‖g‖)` (in the gradient's
/// dtype, the factor in f32 for bf16/f16); otherwise nothing changes. Errors — changing no gradient — when
/// `max_norm` is not finite and `> 0` ([`Error::Config`]), or when a
/// gradient holds NaN or ±Inf: [`Error::NonFiniteGradient`], the error an
/// optimizer's step gives, so one `match` arm skips such a batch whether or
/// not you clip first. Its `param` is `clip_grad_norm: param.k (vars[i],
/// shape …)` for the first such variable: `vars` carry no names, so `param.k`
/// is the name `candle_nn::Optimizer::new` gives the same variables (their
/// creation order, the same in every run, where `vars[i]`, an index into
/// `VarMap::all_vars()`, is not); [`clip_grad_norm_named`] names it.
pub fn clip_grad_norm(grads: &mut GradStore, vars: &[Var], max_norm: f64) -> Result<f64> {
    let refs: Vec<&Var> = vars.iter().collect();
    clip(grads, &refs, max_norm, |i, dims| {
        let var = crate::params::describe_var(vars, i, &format!(", shape {dims:?}"));
        format!("clip_grad_norm: {var}")
    })
}

/// [`clip_grad_norm`] over named variables — a `VarMap`'s
/// ([`NamedVar::from_varmap`]) or an optimizer's own,
/// `opt.driver().params()` — so that a NaN/Inf gradient's
/// [`Error::NonFiniteGradient`] names the parameter, as a step does.
pub fn clip_grad_norm_named(
    grads: &mut GradStore,
    vars: &[NamedVar],
    max_norm: f64,
) -> Result<f64> {
    let refs: Vec<&Var> = vars.iter().map(|v| &v.var).collect();
    clip(grads, &refs, max_norm, |i, _| vars[i].name.clone())
}

fn clip(
    grads: &mut GradStore,
    vars: &[&Var],
    max_norm: f64,
    name: impl Fn(usize, &[usize]) -> String,
) -> Result<f64> {
    if !(max_norm.is_finite() && max_norm > 0.0) {
        fail!(
            Config,
            "clip_grad_norm: max_norm",
            "must be finite and > 0, got {max_norm}"
        );
    }
    let norm = grad_norm_of(grads, vars)?;
    if !norm.is_finite() {
        // grad_norm is finite unless an entry is NaN or ±Inf: find it
        let listed: Vec<(usize, Tensor)> = vars
            .iter()
            .enumerate()
            .filter_map(|(i, v)| grads.get(v).map(|g| (i, g)))
            .filter(|(_, g)| g.elem_count() > 0)
            .map(|(i, g)| Ok((i, g.contiguous()?)))
            .collect::<Result<_>>()?;
        let refs: Vec<&Tensor> = listed.iter().map(|(_, g)| g).collect();
        let param = match crate::device::first_nonfinite(&refs)? {
            Some(k) => name(listed[k].0, listed[k].1.dims()),
            None => format!("clip_grad_norm (global norm {norm})"),
        };
        return Err(Error::NonFiniteGradient { param });
    }
    if norm > max_norm {
        let scale = max_norm / norm;
        // Compute every scaled gradient first, then insert: a failure leaves
        // the store unchanged.
        let mut scaled = Vec::new();
        for v in vars {
            if let Some(g) = grads.get(v) {
                scaled.push((v, scaled_by(g, scale)?));
            }
        }
        for (v, g) in scaled {
            grads.insert(v, g);
        }
    }
    Ok(norm)
}

/// `g · scale`, with `scale` kept in f32 for a bf16/f16 gradient: candle's
/// `affine` rounds the factor to the tensor's dtype, where a factor below
/// f16's normal range (6.1e-5) loses bits and one below 3e-8 becomes 0.
pub(crate) fn scaled_by(g: &Tensor, scale: f64) -> Result<Tensor> {
    Ok(match g.dtype() {
        DType::BF16 | DType::F16 => g
            .to_dtype(DType::F32)?
            .affine(scale, 0.0)?
            .to_dtype(g.dtype())?,
        _ => g.affine(scale, 0.0)?,
    })
}
