//! Muon on matrix manifolds by dual gradient descent (SPEC §3): the
//! spectral sphere `‖W‖₂ = r` and the Stiefel manifold `WᵀW = I`.
//!
//! Each function takes one matrix `(m, n)` or a batch `(b, m, n)`; the
//! multipliers are `()`/`(b,)` (spectral sphere) and `(k, k)`/`(b, k, k)`
//! (Stiefel). Gradients are normalised to `G/‖G‖_F` before the dual problem,
//! so the multipliers and the dual learning rate are dimensionless (the
//! direction `msign(G + λΘ)` is invariant under scaling `G` and `λ` together).

use candle_core::{DType, Result, Tensor};

use crate::error::fail;
use crate::linalg::{msign, power_iteration, NewtonSchulz, TopSingular};

/// Where the parameters live. A retraction after every step puts each
/// parameter back on the manifold, so after the first step it lies there
/// wherever it started (the Stiefel manifold also projects the starting point
/// before the first direction is computed).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Manifold {
    /// No constraint: `w ← w − ηφ`.
    Free,
    /// The sphere `ρ(w) = radius` of the (vector) norm `ρ`, any parameter
    /// taken as one flat vector: `φ` is the steepest tangent direction
    /// ([`super::sphere_direction`]), then `w ← r·(w − ηφ)/ρ(w − ηφ)`.
    Sphere {
        /// The radius `r > 0`.
        radius: f64,
    },
    /// The spectral sphere `‖W‖₂ = radius` of a matrix, with the spectral
    /// norm: `Φ = msign(G + λΘ)`, `Θ = u₁v₁ᵀ`, `λ` by dual descent
    /// ([`spectral_sphere_direction`]), then `W ← r·(W − ηΦ)/‖W − ηΦ‖₂`.
    SpectralSphere {
        /// The radius `r > 0`.
        radius: f64,
    },
    /// The Stiefel manifold, with the spectral norm: `Φ = msign(G + WX)`,
    /// `X` symmetric by dual descent ([`stiefel_direction`]), then
    /// `W ← msign(W − ηΦ)` ([`stiefel_retract`]). `transpose: false` keeps
    /// `WᵀW = I` and needs a tall matrix view (rows ≥ cols); `transpose: true`
    /// keeps `WWᵀ = I` and needs a wide one (rows ≤ cols).
    Stiefel {
        /// Constrain `Wᵀ` instead of `W` (orthonormal rows).
        transpose: bool,
    },
}

impl Manifold {
    /// `[kind, radius, transpose]` for checkpoints.
    pub(crate) fn encode(&self) -> [f64; 3] {
        match *self {
            Self::Free => [0.0, 0.0, 0.0],
            Self::Sphere { radius } => [1.0, radius, 0.0],
            Self::SpectralSphere { radius } => [2.0, radius, 0.0],
            Self::Stiefel { transpose } => [3.0, 0.0, transpose as u8 as f64],
        }
    }

    /// Inverse of [`Manifold::encode`].
    pub(crate) fn decode(c: &[f64]) -> Result<Self> {
        Ok(match (c.first().map(|k| *k as u32), c.get(1), c.get(2)) {
            (Some(0), _, _) => Self::Free,
            (Some(1), Some(&radius), _) => Self::Sphere { radius },
            (Some(2), Some(&radius), _) => Self::SpectralSphere { radius },
            (Some(3), _, Some(&t)) => Self::Stiefel {
                transpose: t != 0.0,
            },
            _ => fail!("checkpoint: manifold", "bad code {c:?}"),
        })
    }
}

/// The dual-descent schedule for a manifold's Lagrange multiplier.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DualAscent {
    /// Dual learning rate `η₂` (in units of `‖G‖_F`, see the module doc).
    pub lr: f64,
    /// Dual steps (one `msign` each) per training step; 1 is the amortised
    /// scheme of SPEC §3 (the multiplier carries over between steps).
    pub steps: usize,
    /// Step along `sign(∇)` instead of `∇` (`λ ← λ − η₂·sign(tr(ΘᵀΦ))`).
    pub sign: bool,
}

/// The default dual learning rate, chosen by measurement (see
/// `tests/steepest_matrix.rs`, `dual_residual_*`): on normalised gradients the
/// curvature of `λ ↦ ‖G + λΘ‖_*` is of order 1, and 0.5 converges without
/// oscillation for the shapes measured (8×3 to 64×32).
pub const DEFAULT_DUAL_LR: f64 = 0.5;

impl Default for DualAscent {
    fn default() -> Self {
        Self {
            lr: DEFAULT_DUAL_LR,
            steps: 1,
            sign: false,
        }
    }
}

impl DualAscent {
    pub(crate) fn validate(&self, who: &str) -> Result<()> {
        if !(self.lr.is_finite() && self.lr >= 0.0) {
            fail!(who, "dual lr must be finite and ≥ 0, got {}", self.lr);
        }
        if self.steps == 0 {
            fail!(who, "dual steps must be ≥ 1, got 0");
        }
        Ok(())
    }

    fn step(&self, multiplier: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let d = if self.sign {
            grad.sign()?
        } else {
            grad.clone()
        };
        multiplier - (d * self.lr)?
    }
}

/// The result of a dual solve: the direction, the updated multiplier, and the
/// tangent residual of the returned direction.
#[derive(Clone, Debug)]
pub struct DualStep {
    /// The direction `Φ` (unit spectral norm, up to the Newton–Schulz accuracy).
    pub phi: Tensor,
    /// The multiplier after the dual steps (`λ` or `X`).
    pub multiplier: Tensor,
    /// The tangent residual of `phi`: `tr(ΘᵀΦ)` (shape of `λ`) or
    /// `WᵀΦ + ΦᵀW` (shape of `X`). Zero means `phi` is tangent.
    pub residual: Tensor,
}

/// Up to `(b, m, n)`, with whether a batch dimension was added.
fn batch3(t: &Tensor) -> Result<(Tensor, bool)> {
    match t.rank() {
        2 => Ok((t.unsqueeze(0)?, true)),
        3 => Ok((t.clone(), false)),
        _ => fail!(
            "manifold",
            "expected (m, n) or (b, m, n), got {:?}",
            t.dims()
        ),
    }
}

fn unbatch(t: Tensor, added: bool) -> Result<Tensor> {
    if added {
        t.squeeze(0)
    } else {
        Ok(t)
    }
}

/// `G/‖G‖_F` per matrix of a `(b, m, n)` batch (zero stays zero).
fn normalise(g: &Tensor) -> Result<Tensor> {
    let n = g.sqr()?.sum_keepdim(2)?.sum_keepdim(1)?.sqrt()?;
    let tiny = match g.dtype() {
        DType::F64 => f64::MIN_POSITIVE,
        _ => f32::MIN_POSITIVE as f64,
    };
    g.broadcast_div(&n.maximum(tiny)?)
}

/// `Θ = u₁v₁ᵀ` from a top singular triplet, `(b, m, n)` (or `(m, n)`).
pub fn theta(top: &TopSingular) -> Result<Tensor> {
    if top.u.rank() == 1 {
        return top.u.unsqueeze(1)?.matmul(&top.v.unsqueeze(0)?);
    }
    top.u.unsqueeze(2)?.matmul(&top.v.unsqueeze(1)?)
}

/// Spectral-sphere direction by dual descent (SPEC §3):
/// repeat `steps` times `Φ = msign(Ĝ + λΘ); λ ← λ − η₂·tr(ΘᵀΦ)`, with
/// `Ĝ = G/‖G‖_F`. Returns the last `Φ`, the updated `λ` and `tr(ΘᵀΦ)` of that
/// `Φ`. At the fixed point `tr(ΘᵀΦ) = 0` and `Φ` maximises `tr(GᵀΦ)` over
/// `‖Φ‖₂ = 1`, `tr(ΘᵀΦ) = 0` (`λ* = argmin ‖G + λΘ‖_*`).
///
/// `g`, `theta`: `(m, n)` or `(b, m, n)`; `lambda`: `()` or `(b,)`.
pub fn spectral_sphere_direction(
    g: &Tensor,
    theta: &Tensor,
    lambda: &Tensor,
    dual: &DualAscent,
    ns: &NewtonSchulz,
) -> Result<DualStep> {
    dual.validate("spectral_sphere_direction: dual")?;
    let (g3, added) = batch3(g)?;
    let (t3, _) = batch3(theta)?;
    if g3.dims() != t3.dims() {
        fail!(
            "spectral_sphere_direction",
            "g {:?} and theta {:?} differ in shape",
            g.dims(),
            theta.dims()
        );
    }
    let b = g3.dim(0)?;
    let mut lam = lambda.to_dtype(g3.dtype())?.reshape(b)?;
    let gn = normalise(&g3)?;
    let mut phi = gn.zeros_like()?;
    let mut res = lam.zeros_like()?;
    for _ in 0..dual.steps {
        let shifted = (&gn + t3.broadcast_mul(&lam.reshape((b, 1, 1))?)?)?;
        phi = msign(&shifted, ns)?;
        res = (&t3 * &phi)?.sum(2)?.sum(1)?;
        lam = dual.step(&lam, &res)?;
    }
    let shape = lambda.shape().clone();
    Ok(DualStep {
        phi: unbatch(phi, added)?,
        multiplier: lam.reshape(shape.clone())?,
        residual: res.reshape(shape)?,
    })
}

/// Stiefel direction by dual descent (SPEC §3), for tall `W` (`n ≥ m`,
/// `WᵀW = I`): repeat `steps` times `Φ = msign(Ĝ + W X);
/// X ← X − η₂ (WᵀΦ + ΦᵀW)`, with `Ĝ = G/‖G‖_F` and `X` symmetric `m × m`.
/// Returns the last `Φ`, the updated `X` and `WᵀΦ + ΦᵀW` of that `Φ`.
pub fn stiefel_direction(
    g: &Tensor,
    w: &Tensor,
    x: &Tensor,
    dual: &DualAscent,
    ns: &NewtonSchulz,
) -> Result<DualStep> {
    dual.validate("stiefel_direction: dual")?;
    let (g3, added) = batch3(g)?;
    let (w3, _) = batch3(w)?;
    let (x3, _) = batch3(x)?;
    let (b, n, m) = w3.dims3()?;
    if g3.dims() != w3.dims() || x3.dims() != [b, m, m] {
        fail!(
            "stiefel_direction",
            "shapes g {:?}, w {:?}, x {:?} do not fit (x must be m×m for w n×m)",
            g.dims(),
            w.dims(),
            x.dims()
        );
    }
    if n < m {
        fail!(
            "stiefel_direction",
            "w is wide ({n}×{m}); WᵀW = I needs rows ≥ cols (transpose it)"
        );
    }
    let gn = normalise(&g3)?;
    let wt = w3.transpose(1, 2)?;
    let mut x3 = x3.to_dtype(g3.dtype())?;
    let mut phi = gn.zeros_like()?;
    let mut res = x3.zeros_like()?;
    for _ in 0..dual.steps {
        phi = msign(&(&gn + w3.matmul(&x3)?)?, ns)?;
        let wtp = wt.matmul(&phi)?;
        res = (&wtp + wtp.transpose(1, 2)?)?;
        x3 = dual.step(&x3, &res)?;
    }
    Ok(DualStep {
        phi: unbatch(phi, added)?,
        multiplier: unbatch(x3, added)?,
        residual: unbatch(res, added)?,
    })
}

/// Power iteration, warm-started from `start`, until the relative change of
/// every `σ₁` estimate is at most `rel_tol` (or `max_iters` iterations).
///
/// `σ` converges from below and its error is second order in the error of
/// `v`, so this is accurate also when `σ₁ ≈ σ₂` (then any unit vector of the
/// top singular subspace gives the right `σ₁`). One host sync per iteration.
pub fn power_iteration_to_tolerance(
    w: &Tensor,
    start: Option<&Tensor>,
    rel_tol: f64,
    max_iters: usize,
) -> Result<TopSingular> {
    let mut top = power_iteration(w, start, 1)?;
    let mut prev = top
        .sigma
        .flatten_all()?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?;
    for _ in 1..max_iters {
        top = power_iteration(w, Some(&top.v), 1)?;
        let s = top
            .sigma
            .flatten_all()?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        let done = s
            .iter()
            .zip(&prev)
            .all(|(a, b)| (a - b).abs() <= rel_tol * a.abs().max(f64::MIN_POSITIVE));
        prev = s;
        if done {
            break;
        }
    }
    Ok(top)
}

/// Relative tolerance on `σ₁` for the spectral-sphere retraction.
pub const SPECTRAL_RETRACT_TOL: f64 = 1e-7;
/// Iteration cap of the spectral-sphere retraction's power iteration.
pub const SPECTRAL_RETRACT_MAX_ITERS: usize = 200;

/// The spectral-sphere retraction `W ← r·W/‖W‖₂`, with `‖W‖₂` from
/// [`power_iteration_to_tolerance`] warm-started at `start` (an estimate of
/// `v₁`). Returns the retracted matrix and the top singular triplet of the
/// input (whose `u, v` are also those of the output). Errors on `W = 0`.
pub fn spectral_sphere_retract(
    w: &Tensor,
    radius: f64,
    start: Option<&Tensor>,
) -> Result<(Tensor, TopSingular)> {
    let top =
        power_iteration_to_tolerance(w, start, SPECTRAL_RETRACT_TOL, SPECTRAL_RETRACT_MAX_ITERS)?;
    let s = top
        .sigma
        .flatten_all()?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?;
    if s.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
        fail!(
            "spectral_sphere_retract",
            "cannot retract a matrix with spectral norm {s:?}"
        );
    }
    let scale = (radius / top.sigma.to_dtype(w.dtype())?)?;
    let scale = if w.rank() == 3 {
        scale.reshape((s.len(), 1, 1))?
    } else {
        scale.reshape((1, 1))?
    };
    Ok((w.broadcast_mul(&scale)?, top))
}

/// Iteration cap of the Stiefel retraction's cubic Newton–Schulz loop.
pub const STIEFEL_RETRACT_MAX_ITERS: usize = 30;

/// The polar retraction `W ← msign(W)` onto `WᵀW = I` (tall `W`, `n ≥ m`), to
/// working precision.
///
/// `cold = false` assumes `W` is near the manifold (one optimizer step away):
/// `X₀ = W/rms(σ)` with `rms(σ) = ‖W‖_F/√m`, then cubic Newton–Schulz steps
/// `X ← X(3I − XᵀX)/2`, which converge quadratically near 1, until
/// `‖XᵀX − I‖_F ≤ 8·ε·m` or it stops decreasing (the rounding floor; one host
/// sync per step). `cold = true` first applies Polar Express (8 steps), which
/// brings any full-rank `W` near the manifold.
pub fn stiefel_retract(w: &Tensor, cold: bool) -> Result<Tensor> {
    let (w3, added) = batch3(w)?;
    let (b, n, m) = w3.dims3()?;
    if n < m {
        fail!(
            "stiefel_retract",
            "w is wide ({n}×{m}); WᵀW = I needs rows ≥ cols (transpose it)"
        );
    }
    let mut x = if cold {
        msign(&w3, &NewtonSchulz::polar_express(8))?
    } else {
        let rms = (w3.sqr()?.sum_keepdim(2)?.sum_keepdim(1)? / m as f64)?.sqrt()?;
        w3.broadcast_div(&rms)?
    };
    let eps = match w3.dtype() {
        DType::F64 => f64::EPSILON,
        _ => f32::EPSILON as f64,
    };
    let tol = 8.0 * eps * m as f64;
    let eye = Tensor::eye(m, w3.dtype(), w3.device())?
        .unsqueeze(0)?
        .broadcast_as((b, m, m))?;
    let mut best: Option<(f64, Tensor)> = None;
    for _ in 0..STIEFEL_RETRACT_MAX_ITERS {
        let a = x.transpose(1, 2)?.matmul(&x)?;
        let dev = (&a - &eye)?;
        let r = dev
            .sqr()?
            .sum(2)?
            .sum(1)?
            .sqrt()?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?
            .into_iter()
            .fold(0.0f64, f64::max);
        if !r.is_finite() {
            fail!(
                "stiefel_retract",
                "the iteration diverged (W rank-deficient?)"
            );
        }
        match &best {
            Some((rb, _)) if r >= 0.5 * rb => break, // at the rounding floor
            _ => {}
        }
        best = Some((r, x.clone()));
        if r <= tol {
            break;
        }
        // X ← 1.5 X − 0.5 X (XᵀX)
        x = ((&x * 1.5)? - (x.matmul(&a)? * 0.5)?)?;
    }
    let (r, x) = best.expect("at least one iteration");
    if r > 1e-3 && !cold {
        // Not near the manifold after all (e.g. a huge step): start over cold.
        return stiefel_retract(w, true);
    }
    unbatch(x, added)
}
