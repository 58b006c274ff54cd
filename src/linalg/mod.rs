//! Matrix functions the optimizers are built on.
//!
//! Each function takes a matrix `(m, n)` or a batch of same-shape matrices
//! `(b, m, n)` and runs on any candle device through plain candle ops (this is
//! the reference path; the CUDA kernels are tested against it).

mod msign_cpu;
mod newton_schulz;
mod power_iteration;

pub use newton_schulz::{msign, msign_generic, NewtonSchulz};
pub use power_iteration::{power_iteration, TopSingular};

use candle_core::{DType, Result, Tensor};

/// The dtype the iterations run in: f64 stays f64, everything else uses f32.
pub(crate) fn compute_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F64 => DType::F64,
        _ => DType::F32,
    }
}

/// Checks that `t` is a float matrix or batch of matrices; returns `(m, n)`.
pub(crate) fn matrix_dims(who: &str, t: &Tensor) -> Result<(usize, usize)> {
    if !t.dtype().is_float() {
        crate::error::fail!(who, "expected a float tensor, got {:?}", t.dtype());
    }
    match t.dims() {
        [m, n] | [_, m, n] => Ok((*m, *n)),
        d => crate::error::fail!(
            who,
            "expected a matrix (m, n) or a batch (b, m, n), got shape {d:?}"
        ),
    }
}

/// Swaps the last two dimensions (works for both `(m, n)` and `(b, m, n)`).
pub(crate) fn transpose_last(t: &Tensor) -> Result<Tensor> {
    let r = t.rank();
    t.transpose(r - 2, r - 1)
}

/// Frobenius norm of each matrix, kept as `(1, 1)` or `(b, 1, 1)` for broadcasting.
pub(crate) fn frobenius_keepdim(t: &Tensor) -> Result<Tensor> {
    let r = t.rank();
    t.sqr()?.sum_keepdim(r - 1)?.sum_keepdim(r - 2)?.sqrt()
}
