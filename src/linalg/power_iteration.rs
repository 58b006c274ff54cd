//! Top singular triplet by power iteration (docs/math.md §1).

use candle_core::{DType, Device, Tensor};

use super::{compute_dtype, matrix_dims};
use crate::error::{fail, Result};

/// The top singular triplet `W ≈ σ₁ u₁ v₁ᵀ + …` of a matrix or of each matrix
/// of a batch.
///
/// For `W` of shape `(m, n)`: `sigma` is a scalar, `u` has shape `(m,)`, `v`
/// has shape `(n,)`. For a batch `(b, m, n)`: `(b,)`, `(b, m)`, `(b, n)`. The
/// dtype is f32 (f64 for an f64 `W`).
///
/// The iterate is the vector of the shorter side, and the other vector is
/// derived from it: for tall or square `W` (`n ≤ m`), `v` is the iterate and
/// `u = W v/σ`, `σ = ‖W v‖`; for wide `W` (`n > m`), `u` is the iterate and
/// `v = Wᵀu/‖Wᵀu‖`, `σ = ‖Wᵀu‖`. Both are exact singular vectors only at
/// convergence; before it, `W v = σ u` holds exactly for tall `W` and
/// `Wᵀu = σ v` for wide `W`. For `W = 0`, `sigma` is 0, the iterate's vector
/// is a unit vector and the derived one is zero (tall) or a unit default
/// (wide).
#[derive(Clone, Debug)]
pub struct TopSingular {
    /// Estimate of the largest singular value (`‖W v‖` for tall `W`,
    /// `‖Wᵀu‖` for wide `W`).
    pub sigma: Tensor,
    /// Left singular vector `u₁` (unit; zero for a tall `W = 0`).
    pub u: Tensor,
    /// Right singular vector `v₁` (unit): the top eigenvector of `WᵀW`.
    pub v: Tensor,
}

/// `σ₁, u₁, v₁` of `w` (`(m, n)` or `(b, m, n)`) by `iters` power iterations.
///
/// Iterates on the smaller side: `x ← WᵀW x / ‖WᵀW x‖` on `v` when `n ≤ m`,
/// `y ← W Wᵀ y / ‖W Wᵀ y‖` on `u` when `n > m` (then `v = Wᵀu / ‖Wᵀu‖`).
/// `start` is an estimate of `v₁` (shape `(n,)` or `(b, n)`), typically the
/// previous optimizer step's `v`; a zero or non-finite start is ignored.
/// Without a start, a fixed pseudo-random unit vector is used, so the result is
/// deterministic and still finds `σ₁` when `v₁` is orthogonal to the all-ones
/// vector. The error shrinks like `(σ₂/σ₁)^{2·iters}`. `iters = 0` is
/// allowed: no Gram product, σ, u and v from the normalised start alone
/// (tall: `v = v₀`, `σ = ‖W v₀‖`), an estimate only as good as the start.
///
/// A NaN or ±Inf in `W` gives `σ = NaN` (tested on the CPU and
/// emulated-kernel paths; not checked, which would cost a
/// host synchronisation; [`crate::penalty::SpectralNormPenalty`] reads `σ`
/// back and refuses it; spectral decay runs it on the weights an optimizer
/// updates, which stay finite as long as its steps are).
///
/// Scale: every norm is taken after dividing by the largest magnitude, so
/// `σ` and the unit vectors are right for any finite `W` whose products
/// `W v` are finite. The Gram products `WᵀW x` are of order `σ₁²`: in f32
/// (and the 16-bit dtypes, computed in f32) the iterations refine `v` for
/// `10⁻¹⁸ ≲ σ₁ ≲ 10¹⁸`. Below, to `σ₁ ≈ 10⁻²²`, the product is subnormal:
/// its few bits perturb the iterate (σ measured within 10⁻³), while `u`, `v`
/// stay unit, as every vector is normalised as `s/‖s‖` with `s = y/max|yᵢ|`.
/// Further out the product under- or overflows and an iteration keeps its
/// vector (σ and u are still computed from it).
pub fn power_iteration(w: &Tensor, start: Option<&Tensor>, iters: usize) -> Result<TopSingular> {
    matrix_dims("power_iteration: w", w)?;
    crate::device::power_iteration(w, start, iters)
}

/// [`power_iteration`] with plain candle ops (any device): the reference.
pub(crate) fn power_iteration_generic(
    w: &Tensor,
    start: Option<&Tensor>,
    iters: usize,
) -> Result<TopSingular> {
    let (m, n) = matrix_dims("power_iteration: w", w)?;
    let batched = w.rank() == 3;
    let w3 = if batched { w.clone() } else { w.unsqueeze(0)? };
    let b = w3.dim(0)?;
    let dtype = compute_dtype(w.dtype());
    let w3 = w3.to_dtype(dtype)?;
    let wt = w3.transpose(1, 2)?;

    let v0 = initial_v(start, b, n, batched, dtype, w.device())?;
    let wide = n > m;
    // x: (b, k, 1), the iterate on the short side.
    let mut x = if wide {
        let y = w3.matmul(&v0)?;
        renormalize(&y, &default_start(b, m, dtype, w.device())?)?
    } else {
        v0
    };
    for _ in 0..iters {
        let y = if wide {
            w3.matmul(&wt.matmul(&x)?)?
        } else {
            wt.matmul(&w3.matmul(&x)?)?
        };
        x = renormalize(&y, &x)?;
    }
    let (u, v, sigma) = if wide {
        let wtu = wt.matmul(&x)?;
        let sigma = super::frobenius_keepdim(&wtu)?;
        let v = renormalize(&wtu, &default_start(b, n, dtype, w.device())?)?;
        (x, v, sigma)
    } else {
        let wv = w3.matmul(&x)?;
        let sigma = super::frobenius_keepdim(&wv)?;
        let (u, _) = unit_or_self(&wv)?;
        (u, x, sigma)
    };
    let (u, v, sigma) = (u.squeeze(2)?, v.squeeze(2)?, sigma.flatten_all()?);
    if batched {
        Ok(TopSingular { sigma, u, v })
    } else {
        Ok(TopSingular {
            sigma: sigma.squeeze(0)?,
            u: u.squeeze(0)?,
            v: v.squeeze(0)?,
        })
    }
}

/// The start vector as `(b, n, 1)`: the caller's (if usable) or the default.
fn initial_v(
    start: Option<&Tensor>,
    b: usize,
    n: usize,
    batched: bool,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let fallback = default_start(b, n, dtype, device)?;
    let Some(s) = start else {
        return Ok(fallback);
    };
    check_start(Some(s), batched, b, n)?;
    let s = s.to_dtype(dtype)?.reshape((b, n, 1))?;
    // Per matrix: use the start only where it is finite and non-zero.
    #[allow(clippy::eq_op)]
    let finite = (&s - &s)?.sum_keepdim(1)?.eq(0.0)?;
    let nonzero = super::frobenius_keepdim(&s)?.gt(0.0)?;
    let usable = (finite.to_dtype(DType::U8)? * nonzero.to_dtype(DType::U8)?)?;
    let s = usable.broadcast_as(s.shape())?.where_cond(&s, &fallback)?;
    Ok(renormalize(&s, &fallback)?)
}

/// Checks that a start vector has the shape of `v₁`: `(n,)`, or `(b, n)`
/// for a batch (every path's error for a bad start).
pub(crate) fn check_start(start: Option<&Tensor>, batched: bool, b: usize, n: usize) -> Result<()> {
    let Some(s) = start else {
        return Ok(());
    };
    let expected: &[usize] = if batched { &[b, n] } else { &[n] };
    if s.dims() != expected {
        fail!(
            Shape,
            "power_iteration: start",
            "expected shape {expected:?} (an estimate of v₁), got {:?}",
            s.dims()
        );
    }
    Ok(())
}

/// Checks that the matrices given one by one all have the shape `(m, n)`.
pub(crate) fn check_members(ws: &[Tensor], m: usize, n: usize) -> Result<()> {
    for w in ws {
        if w.dims() != [m, n]
            || w.dtype() != ws[0].dtype()
            || !w.device().same_device(ws[0].device())
        {
            fail!(
                Shape,
                "power_iteration: w",
                "expected matrices of shape [{m}, {n}], dtype {:?} and one device, got {:?} {:?}",
                ws[0].dtype(),
                w.dims(),
                w.dtype()
            );
        }
    }
    Ok(())
}

/// Checks that there is one state vector `(n,)` per matrix, of one float
/// dtype.
pub(crate) fn check_state_vectors(vs: &[candle_core::Var], b: usize, n: usize) -> Result<()> {
    if vs.len() != b {
        fail!(
            Shape,
            "power_iteration: v",
            "expected one state vector per matrix ({b}), got {}",
            vs.len()
        );
    }
    for v in vs {
        if v.dims() != [n] || v.dtype() != vs[0].dtype() || !v.dtype().is_float() {
            fail!(
                Shape,
                "power_iteration: v",
                "expected float vectors of shape [{n}] and one dtype, got {:?} {:?}",
                v.dims(),
                v.dtype()
            );
        }
    }
    Ok(())
}

/// One step of splitmix64 (the generator of the crate's fixed start vectors).
pub(crate) fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The entries of the default start vector (not normalised) and their norm:
/// splitmix64 mapped to `[0.5, 1.5)` with a random sign, so the vector is
/// not orthogonal to any particular structured vector (unlike all-ones).
/// The device path builds its copy from the same values.
pub(crate) fn default_start_values(n: usize) -> (Vec<f64>, f64) {
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let vals: Vec<f64> = (0..n)
        .map(|_| {
            let z = splitmix64(&mut state);
            let mag = 0.5 + (z >> 11) as f64 / (1u64 << 53) as f64;
            if z & 1 == 0 {
                mag
            } else {
                -mag
            }
        })
        .collect();
    let norm = vals.iter().map(|x| x * x).sum::<f64>().sqrt();
    (vals, norm.max(f64::MIN_POSITIVE))
}

/// A fixed pseudo-random unit vector per matrix, `(b, n, 1)`, reproducible.
fn default_start(b: usize, n: usize, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
    let (vals, norm) = default_start_values(n);
    let v = crate::device::upload_f64(vals, (1, n, 1), dtype, device)?;
    (v / norm)?.broadcast_as((b, n, 1))?.contiguous()
}

/// `y / ‖y‖`, or `keep` where `‖y‖ = 0` (so `W = 0` leaves a unit vector).
fn renormalize(y: &Tensor, keep: &Tensor) -> candle_core::Result<Tensor> {
    let (unit, positive) = unit_or_self(y)?;
    positive.broadcast_as(y.shape())?.where_cond(&unit, keep)
}

/// `y / ‖y‖` computed as `s / ‖s‖` (`s = y / m`, `super::scaled_keepdim`)
/// where `‖y‖ > 0`, else `y` itself (zero stays zero); and where it was
/// positive. Dividing the scaled `s`, not `y`, by the norm: where `‖y‖` is
/// subnormal it has few bits, and `y / ‖y‖` came out short of unit length.
fn unit_or_self(y: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
    let (s, norm_s, _) = super::scaled_keepdim(y)?;
    let positive = norm_s.gt(0.0)?;
    let divisor = positive.where_cond(&norm_s, &norm_s.ones_like()?)?;
    Ok((s.broadcast_div(&divisor)?, positive))
}
