//! Matrix functions the optimizers are built on.
//!
//! Each function takes a matrix `(m, n)` or a batch of same-shape matrices
//! `(b, m, n)`. The hot ones ([`msign`], [`power_iteration`]) go through the
//! device seam ([`crate::device`]), which picks the CPU's own path (`msign`
//! with its polynomial folded into the GEMMs; the power iteration on slices),
//! a CUDA kernel, or the generic candle-ops version kept here
//! ([`msign_generic`], and the power iteration's), which runs on every device
//! and is the reference the others are tested against.

pub(crate) mod msign_cpu;
mod newton_schulz;
pub(crate) mod power_cpu;
mod power_iteration;
mod spectral;

pub use newton_schulz::{msign, msign_generic, GramNewtonSchulz, NewtonSchulz};
pub(crate) use power_cpu::{power_iteration_cpu, power_iteration_cpu_members};
pub(crate) use power_iteration::{
    check_members, check_start, check_state_vectors, default_start_values, power_iteration_generic,
    splitmix64,
};
pub use power_iteration::{power_iteration, TopSingular};
pub(crate) use spectral::{batch3, unbatch};
pub use spectral::{spectral_sphere_retract, stiefel_retract, theta, top_singular_precise};
pub(crate) use spectral::{spectral_sphere_retract_members, stiefel_retract_members, MemberError};

use candle_core::{DType, Tensor};

use crate::error::Result;

/// The largest of `xs` (0 when empty), NaN if any is NaN (`f64::max`
/// drops a NaN: `max(0, NaN) = 0`, which would read a NaN residual or
/// magnitude as small).
pub(crate) fn max_or_nan(xs: impl IntoIterator<Item = f64>) -> f64 {
    xs.into_iter().fold(0.0, |a, x| {
        if a.is_nan() || x.is_nan() {
            f64::NAN
        } else {
            a.max(x)
        }
    })
}

/// The dtype the iterations run in: f64 stays f64, everything else uses f32.
pub(crate) fn compute_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F64 => DType::F64,
        _ => DType::F32,
    }
}

/// The unit roundoff of [`compute_dtype`]`(dtype)`: f64's for f64, f32's
/// for every other dtype (16-bit inputs are computed on in f32).
pub(crate) fn compute_eps(dtype: DType) -> f64 {
    match compute_dtype(dtype) {
        DType::F64 => f64::EPSILON,
        _ => f32::EPSILON as f64,
    }
}

/// Checks that `t` is a float matrix or batch of matrices; returns `(m, n)`.
pub(crate) fn matrix_dims(who: &str, t: &Tensor) -> Result<(usize, usize)> {
    if !t.dtype().is_float() {
        crate::error::fail!(Shape, who, "expected a float tensor, got {:?}", t.dtype());
    }
    match t.dims() {
        [m, n] | [_, m, n] => Ok((*m, *n)),
        d => crate::error::fail!(
            Shape,
            who,
            "expected a matrix (m, n) or a batch (b, m, n), got shape {d:?}"
        ),
    }
}

/// Swaps the last two dimensions (works for both `(m, n)` and `(b, m, n)`).
pub(crate) fn transpose_last(t: &Tensor) -> candle_core::Result<Tensor> {
    let r = t.rank();
    t.transpose(r - 2, r - 1)
}

/// The smallest positive normal number of `dtype` (a floor for divisors).
pub(crate) fn tiny(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => f64::MIN_POSITIVE,
        DType::F16 => half::f16::MIN_POSITIVE.to_f64(),
        _ => f32::MIN_POSITIVE as f64,
    }
}

/// Frobenius norm of each matrix, kept as `(1, 1)` or `(b, 1, 1)` for broadcasting.
pub(crate) fn frobenius_keepdim(t: &Tensor) -> candle_core::Result<Tensor> {
    let (_, norm_s, m) = scaled_keepdim(t)?;
    norm_s * m
}

/// `(s, ‖s‖_F, m)` per matrix with `s = t / m`, `m = max(max|t|, tiny)`, the
/// norms and scales kept as `(1, 1)` or `(b, 1, 1)`: `‖t‖_F = m·‖s‖_F`.
pub(crate) fn scaled_keepdim(t: &Tensor) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    // As m·‖t/m‖_F with m = max|t| per matrix: Σ t² itself overflows f32 for
    // |t| ≳ 1e19 (and underflows for |t| ≲ 1e-19), which would zero a huge
    // gradient's msign. Where t is subnormal m is the smallest normal, a
    // power of two, so s is exact.
    let r = t.rank();
    let tiny = tiny(t.dtype());
    let m = t
        .abs()?
        .max_keepdim(r - 1)?
        .max_keepdim(r - 2)?
        .maximum(tiny)?;
    let s = t.broadcast_div(&m)?;
    let norm_s = s.sqr()?.sum_keepdim(r - 1)?.sum_keepdim(r - 2)?.sqrt()?;
    Ok((s, norm_s, m))
}
