//! Dualized gradients under a norm, free and on the sphere (docs/math.md §2).
//!
//! The steepest-descent direction under a norm `ρ` is
//! `φ = argmax_{ρ(φ)=1} ⟨g, φ⟩`, and the step is `w ← w − η φ`. On the sphere
//! `ρ(w) = r` the maximum is taken over the tangent space only. The vector
//! norms treat a parameter of any shape as one flat vector.

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::device::host_f64;
use crate::error::{fail, Result};
use crate::linalg::{msign, tiny, NewtonSchulz};

/// The norm `ρ` whose unit ball bounds a step.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Norm {
    /// `ρ = ‖·‖₂`: `φ = g/‖g‖₂` (normalized SGD).
    Euclidean,
    /// `ρ = ‖·‖_p` with `1 < p < ∞`: `φ = g^{[q/p]}/‖g^{[q/p]}‖_p`, `1/p + 1/q = 1`,
    /// `x^{[α]} = sign(x)|x|^α` (pbSGD). `Lp(2.0)` is [`Norm::Euclidean`].
    Lp(f64),
    /// `ρ = ‖·‖_∞`: `φ = sign(g)` (SignSGD).
    Sign,
    /// `ρ = ‖·‖₂` of the matrix view (spectral norm): `φ = msign(G) = U Vᵀ`
    /// (Muon), by the given Newton–Schulz schedule. Matrices only.
    Spectral(NewtonSchulz),
}

impl Norm {
    /// The exponent `p` of a vector norm (`2` for Euclidean, `∞` for Sign);
    /// `None` for the spectral norm.
    pub fn p(&self) -> Option<f64> {
        match self {
            Self::Euclidean => Some(2.0),
            Self::Lp(p) => Some(*p),
            Self::Sign => Some(f64::INFINITY),
            Self::Spectral(_) => None,
        }
    }

    /// Errors (naming `who`) unless an `Lp` exponent is finite and `> 1`,
    /// or a spectral norm's Newton–Schulz schedule is invalid.
    pub fn validate(&self, who: &str) -> Result<()> {
        if let Self::Spectral(ns) = self {
            ns.validate(who)?;
        }
        if let Self::Lp(p) = *self {
            if !(p.is_finite() && p > 1.0) {
                fail!(
                    Config,
                    who,
                    "Lp needs a finite p > 1 (use Norm::Sign for p = ∞), got {p}"
                );
            }
        }
        Ok(())
    }

    /// The vector norm `‖x‖_p` of a whole tensor, as a host `f64`.
    fn vector_norm(&self, x: &Tensor) -> Result<f64> {
        let v = host_f64(x)?;
        Ok(p_norm(&v, self.p().unwrap_or(2.0)))
    }
}

/// `‖x‖_p` in f64 (`p = ∞`: max |xᵢ|), scaled by the largest entry first so
/// that large `p` neither overflows nor underflows.
pub fn p_norm(x: &[f64], p: f64) -> f64 {
    // (NaN-aware: `f64::max` drops a NaN, and ‖[NaN, 1]‖_∞ read 1)
    let m = crate::linalg::max_or_nan(x.iter().map(|v| v.abs()));
    if m == 0.0 || p.is_infinite() {
        return m;
    }
    m * x
        .iter()
        .map(|v| (v.abs() / m).powf(p))
        .sum::<f64>()
        .powf(1.0 / p)
}

/// `x^{[α]} = sign(x)|x|^α`.
fn signed_pow(x: f64, alpha: f64) -> f64 {
    x.signum() * x.abs().powf(alpha) * (x != 0.0) as u8 as f64
}

/// The dualized gradient `φ = argmax_{ρ(φ)=1} ⟨g, φ⟩` (no constraint on `w`):
/// `g/‖g‖₂`, `g^{[q/p]}/‖g^{[q/p]}‖_p`, `sign(g)` or `msign(G)` (of the matrix
/// view, for `Spectral`). A zero gradient gives a zero direction.
pub fn dualize(g: &Tensor, norm: &Norm) -> Result<Tensor> {
    norm.validate("dualize: norm")?;
    match norm {
        Norm::Euclidean => normalize_l2(g),
        Norm::Lp(p) if *p == 2.0 => normalize_l2(g),
        Norm::Lp(p) => {
            let e = 1.0 / (p - 1.0); // q/p = q − 1
                                     // Scaled by max |g| first, so |g|^e neither overflows nor
                                     // underflows: a division by the maximum as a tensor, exact also
                                     // when it is subnormal (`g / m` with m an f64 multiplies by
                                     // 1/m in g's dtype, which overflows f32 below m ≈ 2.9e-39 and
                                     // made Inf and NaN directions).
            let mt = g.abs()?.flatten_all()?.max_keepdim(0)?;
            let m = crate::device::host_f64_scalar(&mt)?;
            if m == 0.0 {
                return Ok(g.zeros_like()?);
            }
            let s = g.broadcast_div(&mt)?;
            let x = (s.abs()?.powf(e)? * g.sign()?)?;
            let n = Norm::Lp(*p).vector_norm(&x)?;
            Ok((x / n)?)
        }
        Norm::Sign => Ok(g.sign()?),
        Norm::Spectral(ns) => {
            let Some((r, c)) = crate::params::matrix_view(g.dims()) else {
                fail!(Shape, "dualize",
                    "the spectral norm needs a matrix, got shape {:?} (use Norm::Euclidean for vectors)",
                    g.dims()
                );
            };
            Ok(msign(&g.reshape((r, c))?, ns)?.reshape(g.shape())?)
        }
    }
}

/// `g/‖g‖₂` (zero stays zero), at any scale of `g`: computed as `s/‖s‖₂`
/// with `s = g/max|g|`, since `Σ g²` itself overflows f32 for `|g| ≳ 1e19`
/// and underflows for `|g| ≲ 1e-19`. On the device, no host sync.
fn normalize_l2(g: &Tensor) -> Result<Tensor> {
    let s = scaled_by_max_abs(g)?;
    let n = s.sqr()?.sum_all()?.sqrt()?;
    Ok(s.broadcast_div(&n.maximum(tiny(g.dtype()))?)?)
}

/// `g/max|g|` (zero stays zero): entries in `[−1, 1]`, the largest ±1.
fn scaled_by_max_abs(g: &Tensor) -> Result<Tensor> {
    let m = g.abs()?.flatten_all()?.max_keepdim(0)?.squeeze(0)?;
    Ok(g.broadcast_div(&m.maximum(tiny(g.dtype()))?)?)
}

/// The steepest direction on the sphere `ρ(w) = r` at `w` (any `r > 0`):
/// `argmax ⟨g, φ⟩` over `ρ(φ) = 1` and the tangent condition
/// `⟨ŵ^{[p−1]}, φ⟩ = 0`, `ŵ = w/ρ(w)`.
///
/// - Euclidean: `φ = (g − ⟨g,ŵ⟩ŵ)/‖g − ⟨g,ŵ⟩ŵ‖₂` (closed form).
/// - `Lp(p)`: `φ ∝ (g + λ a)^{[q/p]}`, `a = ŵ^{[p−1]}`, with `λ` the root of
///   `⟨a, (g + λa)^{[q−1]}⟩ = 0` ([`lp_sphere_multiplier`]; no closed form).
///   Solved on the host in f64.
/// - Sign (`p = ∞`): `φ = sign(g)` with the coordinate `k = argmax |w_k|`
///   set to 0 (the first one on a tie).
///
/// At `w = 0` (on no sphere: a zero start, which the retraction then puts on
/// the sphere) there is no tangent condition, and under every norm the
/// direction is the dualized gradient ([`dualize`]), as the Euclidean closed
/// form gives. A gradient normal to the sphere gives a zero direction (Euclidean
/// and `Lp`: also when rounding leaves a tangent part `g − ⟨g,ŵ⟩ŵ`, or
/// `g + λa`, below `4·√n·ε·‖g‖` in the dual norm, `ε` of f32 for f32 and
/// 16-bit inputs, of f64 for f64; the Euclidean projection runs in f32 for
/// 16-bit inputs, the `Lp` one in f64).
pub fn sphere_direction(g: &Tensor, w: &Tensor, norm: &Norm) -> Result<Tensor> {
    norm.validate("sphere_direction: norm")?;
    if g.shape() != w.shape() {
        fail!(
            Shape,
            "sphere_direction",
            "g has shape {:?}, w has shape {:?}",
            g.dims(),
            w.dims()
        );
    }
    match norm {
        Norm::Spectral(_) => fail!(Config, "sphere_direction",
            "the vector sphere needs a vector norm; use Manifold::SpectralSphere for the spectral norm"
        ),
        Norm::Euclidean => euclidean_tangent(g, w),
        Norm::Lp(p) if *p == 2.0 => euclidean_tangent(g, w),
        Norm::Sign => {
            let abs = w.flatten_all()?.abs()?;
            let k = abs.argmax(0)?.to_dtype(DType::U32)?.to_scalar::<u32>()?;
            if crate::device::host_f64_scalar(&abs.get(k as usize)?)? == 0.0 {
                // w = 0: no coordinate is the normal one (see the doc)
                return dualize(g, norm);
            }
            let n = abs.dim(0)? as u32;
            let keep = Tensor::arange(0u32, n, w.device())?
                .ne(k)?
                .to_dtype(g.dtype())?
                .reshape(g.shape())?;
            Ok((g.sign()? * keep)?)
        }
        Norm::Lp(p) => {
            let (gv, wv) = (host_f64(g)?, host_f64(w)?);
            let wn = p_norm(&wv, *p);
            if wn == 0.0 {
                // w = 0: no tangent condition (see the doc)
                return dualize(g, norm);
            }
            let a: Vec<f64> = wv.iter().map(|x| signed_pow(x / wn, p - 1.0)).collect();
            let lambda = lp_sphere_multiplier(&gv, &a, *p)?;
            let tangent: Vec<f64> = gv.iter().zip(&a).map(|(g, a)| g + lambda * a).collect();
            // As in the Euclidean case: a gradient normal to the sphere
            // leaves only its own rounding in `g + λa` (measured in the dual
            // norm ℓ_q), which normalised would be a unit vector of noise.
            let q = p / (p - 1.0);
            let eps = crate::linalg::compute_eps(g.dtype());
            let tol = 4.0 * (gv.len() as f64).sqrt() * eps * p_norm(&gv, q);
            if p_norm(&tangent, q) <= tol {
                return Ok(g.zeros_like()?);
            }
            let e = 1.0 / (p - 1.0);
            let phi: Vec<f64> = tangent.iter().map(|t| signed_pow(*t, e)).collect();
            let n = p_norm(&phi, *p);
            let phi: Vec<f64> = phi.iter().map(|x| if n > 0.0 { x / n } else { 0.0 }).collect();
            Ok(Tensor::from_vec(phi, g.shape(), &Device::Cpu)?
                .to_dtype(g.dtype())?
                .to_device(g.device())?)
        }
    }
}

/// The Euclidean tangent direction; `g` is first scaled by `1/max|g|` (the
/// direction does not depend on `g`'s scale, and `⟨g, ŵ⟩` would overflow
/// f32 for huge gradients).
fn euclidean_tangent(g: &Tensor, w: &Tensor) -> Result<Tensor> {
    let out = g.dtype();
    let dt = crate::linalg::compute_dtype(out);
    let g = scaled_by_max_abs(&g.to_dtype(dt)?)?;
    let w_hat = normalize_l2(&w.to_dtype(dt)?)?;
    let along = (&g * &w_hat)?.sum_all()?;
    let t = (&g - w_hat.broadcast_mul(&along)?)?;
    // A gradient normal to the sphere leaves only rounding in `t` (~√n·ε of
    // ‖g‖): normalised, that would be a unit vector, neither tangent nor
    // meaningful. Below 4·√n·ε·‖g‖ the direction is zero.
    let tol = 4.0 * (g.elem_count() as f64).sqrt() * crate::linalg::compute_eps(dt);
    let g_norm = g.sqr()?.sum_all()?.sqrt()?;
    let t_norm = t.sqr()?.sum_all()?.sqrt()?;
    let keep = t_norm.gt(&(g_norm * tol)?)?.to_dtype(dt)?;
    Ok(normalize_l2(&t)?.broadcast_mul(&keep)?.to_dtype(out)?)
}

/// The multiplier `λ` of the `ℓ_p` sphere: the root of
/// `h(λ) = ⟨a, (g + λa)^{[q−1]}⟩`, `q − 1 = 1/(p − 1)`, which makes
/// `φ ∝ (g + λa)^{[q−1]}` tangent (`⟨a, φ⟩ = 0`).
///
/// `h` is the derivative of the convex dual objective `‖g + λa‖_q^q / q`, so
/// it is non-decreasing in `λ` and the root is found by bracketing (doubling
/// from the `p = 2` guess `−⟨g,a⟩/⟨a,a⟩`) and bisection to f64 precision.
/// Errors when `a = 0`.
pub fn lp_sphere_multiplier(g: &[f64], a: &[f64], p: f64) -> Result<f64> {
    if !(p.is_finite() && p > 1.0) {
        fail!(
            Config,
            "lp_sphere_multiplier: p",
            "needs a finite p > 1, got {p}"
        );
    }
    if g.len() != a.len() {
        fail!(
            Shape,
            "lp_sphere_multiplier",
            "g has {} entries, a has {}",
            g.len(),
            a.len()
        );
    }
    // h is jointly homogeneous: scale g and a to max-abs 1, solve, scale back.
    let sg = g.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let sa = a.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    if sa == 0.0 || !sa.is_finite() || !sg.is_finite() {
        fail!(
            Numerical,
            "lp_sphere_multiplier: a",
            "the normal vector is zero or not finite (w = 0?)"
        );
    }
    if sg == 0.0 {
        return Ok(0.0);
    }
    let gs: Vec<f64> = g.iter().map(|v| v / sg).collect();
    let as_: Vec<f64> = a.iter().map(|v| v / sa).collect();
    let e = 1.0 / (p - 1.0);
    let h = |lambda: f64| -> f64 {
        gs.iter()
            .zip(&as_)
            .map(|(g, a)| a * signed_pow(g + lambda * a, e))
            .sum()
    };
    let guess = -gs.iter().zip(&as_).map(|(g, a)| g * a).sum::<f64>()
        / as_.iter().map(|a| a * a).sum::<f64>();
    let (mut lo, mut hi) = (guess - 1.0, guess + 1.0);
    let mut width = 1.0;
    let mut tries = 0;
    while h(lo) > 0.0 {
        width *= 2.0;
        lo = guess - width;
        tries += 1;
        if tries > 200 {
            fail!(
                Numerical,
                "lp_sphere_multiplier",
                "could not bracket the root"
            );
        }
    }
    while h(hi) < 0.0 {
        width *= 2.0;
        hi = guess + width;
        tries += 1;
        if tries > 400 {
            fail!(
                Numerical,
                "lp_sphere_multiplier",
                "could not bracket the root"
            );
        }
    }
    for _ in 0..300 {
        let mid = 0.5 * (lo + hi);
        if mid <= lo || mid >= hi {
            break;
        }
        if h(mid) < 0.0 {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(0.5 * (lo + hi) * sg / sa)
}

/// The retraction onto the sphere `ρ(w) = r`: `w ← r·w/ρ(w)` with
/// `ρ = ‖·‖_p` of the norm (`‖·‖_∞` for Sign). For the Euclidean norm and a
/// tangent step this is `(w − ηφ)·r/√(r² + η²)`. Errors on `w = 0`.
pub fn sphere_retract(w: &Tensor, radius: f64, norm: &Norm) -> Result<Tensor> {
    let Some(p) = norm.p() else {
        fail!(
            Config,
            "sphere_retract",
            "the vector sphere needs a vector norm, got the spectral norm"
        );
    };
    let n = p_norm(&host_f64(w)?, p);
    if n == 0.0 || !n.is_finite() {
        fail!(
            Numerical,
            "sphere_retract",
            "cannot retract w with norm {n}"
        );
    }
    Ok((w * (radius / n))?)
}
