//! Muon on matrix manifolds by dual gradient descent (SPEC §3): the
//! spectral sphere `‖W‖₂ = r` and the Stiefel manifold `WᵀW = I`.
//!
//! Each function takes one matrix `(m, n)` or a batch `(b, m, n)`; the
//! multipliers are `()`/`(b,)` (spectral sphere) and `(k, k)`/`(b, k, k)`
//! (Stiefel). Gradients are normalised to `Ĝ = G/rms(σ(G))` (`rms(σ) =
//! ‖G‖_F/√k`, `k` the short side) before the dual problem, so the multipliers
//! and the dual learning rate are dimensionless (the direction
//! `msign(G + λΘ)` is invariant under scaling `G` and `λ` together).

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
    /// Dual learning rate `η₂` (in units of `rms(σ(G))`, see the module doc);
    /// `None` takes the measured default of the manifold,
    /// [`DEFAULT_DUAL_LR_SPECTRAL_SPHERE`] or [`DEFAULT_DUAL_LR_STIEFEL`].
    pub lr: Option<f64>,
    /// Dual steps (one `msign` each) per training step; 1 is the amortised
    /// scheme of SPEC §3 (the multiplier carries over between steps).
    pub steps: usize,
    /// Step along `sign(∇)` instead of `∇` (`λ ← λ − η₂·sign(tr(ΘᵀΦ))`).
    pub sign: bool,
}

/// Default dual learning rate on the spectral sphere, by measurement
/// (`examples/manifolds.rs`, `tests/steepest_matrix.rs`): with `Ĝ`
/// normalised to `rms(σ) = 1`, `η₂ ∈ [0.5, 1]` drives `|tr(ΘᵀΦ)|` below 1e-4
/// within 20 dual steps for shapes from 8×3 to 256×128; 0.5 is the safe end.
pub const DEFAULT_DUAL_LR_SPECTRAL_SPHERE: f64 = 0.5;

/// Default dual learning rate on the Stiefel manifold, by measurement: the
/// dual objective `‖Ĝ + WX‖_*` is stiffer (its curvature grows with the
/// short side `m`), constant steps of 0.1 oscillate from 64×32 on, 0.05
/// converges for 8×3 to 256×128 (slowly for the large ones: ‖WᵀΦ + ΦᵀW‖_F
/// ≈ 1e-2 after 300 dual steps at 256×128, against 1e-6 at 16×8).
pub const DEFAULT_DUAL_LR_STIEFEL: f64 = 0.05;

impl Default for DualAscent {
    /// The manifold's default `η₂`, one dual step per training step, plain
    /// (not sign) steps.
    fn default() -> Self {
        Self {
            lr: None,
            steps: 1,
            sign: false,
        }
    }
}

impl DualAscent {
    pub(crate) fn validate(&self, who: &str) -> Result<()> {
        if let Some(lr) = self.lr {
            if !(lr.is_finite() && lr >= 0.0) {
                fail!(who, "dual lr must be finite and ≥ 0, got {lr}");
            }
        }
        if self.steps == 0 {
            fail!(who, "dual steps must be ≥ 1, got 0");
        }
        Ok(())
    }

    /// `[lr (NaN for None), steps, sign]` for checkpoints.
    pub(crate) fn encode(&self) -> [f64; 3] {
        [
            self.lr.unwrap_or(f64::NAN),
            self.steps as f64,
            self.sign as u8 as f64,
        ]
    }

    /// Inverse of [`DualAscent::encode`].
    pub(crate) fn decode(c: &[f64]) -> Result<Self> {
        let [lr, steps, sign] = <[f64; 3]>::try_from(c)
            .map_err(|_| crate::error::invalid("checkpoint: dual", "must have 3 entries"))?;
        Ok(Self {
            lr: (!lr.is_nan()).then_some(lr),
            steps: steps as usize,
            sign: sign != 0.0,
        })
    }

    fn step(&self, lr: f64, multiplier: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let d = if self.sign {
            grad.sign()?
        } else {
            grad.clone()
        };
        multiplier - (d * lr)?
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

/// `Ĝ = G/rms(σ(G)) = G·√k/‖G‖_F` per matrix of a `(b, m, n)` batch, `k` the
/// short side (zero stays zero): singular values of order 1 whatever the
/// shape and the gradient's scale, so one dual learning rate fits all.
fn normalise(g: &Tensor) -> Result<Tensor> {
    let (_, m, n) = g.dims3()?;
    let n = (g.sqr()?.sum_keepdim(2)?.sum_keepdim(1)? / m.min(n) as f64)?.sqrt()?;
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
/// `Ĝ = G/rms(σ(G))`. Returns the last `Φ`, the updated `λ` and `tr(ΘᵀΦ)` of that
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
    let lr = dual.lr.unwrap_or(DEFAULT_DUAL_LR_SPECTRAL_SPHERE);
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
        lam = dual.step(lr, &lam, &res)?;
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
/// X ← X − η₂ (WᵀΦ + ΦᵀW)`, with `Ĝ = G/rms(σ(G))` and `X` symmetric `m × m`.
/// Returns the last `Φ`, the updated `X` and `WᵀΦ + ΦᵀW` of that `Φ`.
pub fn stiefel_direction(
    g: &Tensor,
    w: &Tensor,
    x: &Tensor,
    dual: &DualAscent,
    ns: &NewtonSchulz,
) -> Result<DualStep> {
    dual.validate("stiefel_direction: dual")?;
    let lr = dual.lr.unwrap_or(DEFAULT_DUAL_LR_STIEFEL);
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
        x3 = dual.step(lr, &x3, &res)?;
    }
    Ok(DualStep {
        phi: unbatch(phi, added)?,
        multiplier: unbatch(x3, added)?,
        residual: unbatch(res, added)?,
    })
}

/// Squarings of the Gram matrix in [`top_singular_precise`].
pub const GRAM_SQUARINGS: usize = 16;

/// The top singular triplet to working precision, also when `σ₁ ≈ σ₂`.
///
/// Forms the Gram matrix of the short side (`A = WᵀW`, or `WWᵀ` for a wide
/// `W`), squares it `GRAM_SQUARINGS` times (`A ← A²/‖A²‖_F`, so `A ∝ (WᵀW)^N`
/// with `N = 2¹⁶`), applies it to the start vector (`start`, an estimate of
/// `v₁`, or a fixed pseudo-random one) and returns the Rayleigh quotient
/// `σ₁ = ‖W v‖` with `u = W v/σ₁`. Components with `σᵢ² ≤ (1 − g)σ₁²` are
/// damped by `(1 − g)^N`, and `σ₁`'s error is second order in `v`'s, so the
/// relative error of `σ₁` is at most about `ln(R)/2^{17}` (`R` the ratio of
/// start-vector weights off and on the top cluster): ≈ 4e-5 for a random
/// start, less for a warm one, whatever the gap `σ₁ − σ₂`. Cost: one Gram
/// product and 16 products of `k × k` matrices (`k` the short side), on the
/// device; no host sync.
pub fn top_singular_precise(w: &Tensor, start: Option<&Tensor>) -> Result<TopSingular> {
    let (w3, added) = batch3(w)?;
    let dt = crate::linalg::compute_dtype(w3.dtype());
    let w3 = w3.to_dtype(dt)?;
    let (_, m, n) = w3.dims3()?;
    let wide = n > m;
    let wt = w3.transpose(1, 2)?;
    // A start on the short side (power_iteration with 0 iterations handles a
    // missing, zero or non-finite start), plus a fixed pseudo-random vector so
    // that no start is orthogonal to the top singular subspace.
    let p0 = power_iteration(&w3, start.map(|s| s.to_dtype(dt)).transpose()?.as_ref(), 0)?;
    let x = if wide { p0.u } else { p0.v };
    let k = x.dim(1)?;
    let r = pseudo_random(k, 1, dt, w3.device())?;
    let x = x.broadcast_add(&(r * 1e-3)?)?.unsqueeze(2)?;
    let mut a = if wide {
        w3.matmul(&wt)?
    } else {
        wt.matmul(&w3)?
    };
    let tiny = match dt {
        DType::F64 => 1e-300,
        _ => 1e-30,
    };
    // Entries below `flush` are set to 0 before each product: far below the
    // working precision (‖A‖_F = 1), and their products would be subnormal,
    // which the CPU computes very slowly.
    let flush = match dt {
        DType::F64 => 1e-150,
        _ => 1e-18,
    };
    for _ in 0..GRAM_SQUARINGS {
        let f = a
            .sqr()?
            .sum_keepdim(2)?
            .sum_keepdim(1)?
            .sqrt()?
            .maximum(tiny)?;
        let an = a.broadcast_div(&f)?;
        let an = (an.abs()?.ge(flush)?.to_dtype(dt)? * an)?;
        a = an.matmul(&an)?;
    }
    let y = a.matmul(&x)?; // (b, k, 1)
    let y = y.broadcast_div(&y.sqr()?.sum_keepdim(1)?.sqrt()?.maximum(tiny)?)?;
    let v = if wide { wt.matmul(&y)? } else { y };
    let v = v.squeeze(2)?;
    // σ = ‖W v‖, u = W v/σ (for a wide W, one more half step on the long side).
    let top = power_iteration(&w3, Some(&v), 0)?;
    if added {
        Ok(TopSingular {
            sigma: top.sigma.squeeze(0)?,
            u: top.u.squeeze(0)?,
            v: top.v.squeeze(0)?,
        })
    } else {
        Ok(top)
    }
}

/// A fixed pseudo-random unit vector `(n,)` (splitmix64, seeded by `seed`).
fn pseudo_random(n: usize, seed: u64, dt: DType, dev: &candle_core::Device) -> Result<Tensor> {
    let mut state = 0x2545_F491_4F6C_DD1Du64.wrapping_mul(seed + 1);
    let vals: Vec<f64> = (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        })
        .collect();
    let norm = vals
        .iter()
        .map(|x| x * x)
        .sum::<f64>()
        .sqrt()
        .max(f64::MIN_POSITIVE);
    Tensor::from_vec(vals.iter().map(|x| x / norm).collect::<Vec<_>>(), n, dev)?.to_dtype(dt)
}

/// The spectral-sphere retraction `W ← r·W/‖W‖₂`, with `‖W‖₂` from
/// [`top_singular_precise`] warm-started at `start` (an estimate of `v₁`). Returns the retracted matrix and the top singular triplet of the
/// input (whose `u, v` are also those of the output). Errors on `W = 0`.
pub fn spectral_sphere_retract(
    w: &Tensor,
    radius: f64,
    start: Option<&Tensor>,
) -> Result<(Tensor, TopSingular)> {
    let top = top_singular_precise(w, start)?;
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

/// Cap on the rounds of the Stiefel retraction (each: cubic Newton–Schulz
/// steps, then one residual check).
pub const STIEFEL_RETRACT_MAX_ITERS: usize = 8;

/// The polar retraction `W ← msign(W)` onto `WᵀW = I` (tall `W`, `n ≥ m`), to
/// working precision.
///
/// `cold = false` assumes `W` is near the manifold (one optimizer step away):
/// cubic Newton–Schulz steps `X ← X(3I − XᵀX)/2` from `X₀ = W/rms(σ)`
/// (`rms(σ) = ‖W‖_F/√m`; [`msign`] with `NewtonSchulz::cubic`, whose fused
/// CPU path does the products), 2 at a time, which converge quadratically
/// near 1, until `‖XᵀX − I‖_F ≤ 4·ε·m·√n` (the rounding floor of that
/// residual) or it stops decreasing (one host sync per round; with an
/// optimizer step of `η = 0.02` one round is enough). `cold = true` first applies
/// Polar Express (8 steps), which brings any full-rank `W` near the manifold.
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
        w3.clone()
    };
    let eps = match w3.dtype() {
        DType::F64 => f64::EPSILON,
        _ => f32::EPSILON as f64,
    };
    // The rounding floor of ‖XᵀX − I‖_F: m² entries, each a sum of n products.
    let tol = 4.0 * eps * m as f64 * (n as f64).sqrt();
    let eye = Tensor::eye(m, w3.dtype(), w3.device())?
        .unsqueeze(0)?
        .broadcast_as((b, m, m))?;
    // X / rms(σ(X)) inside msign: ‖X‖_F·(1/√m).
    let scale = 1.0 / (m as f64).sqrt();
    let mut best: Option<(f64, Tensor)> = None;
    for round in 0..STIEFEL_RETRACT_MAX_ITERS {
        let steps = if round == 0 && cold { 1 } else { 2 };
        x = msign(
            &x,
            &NewtonSchulz::cubic(steps)
                .with_norm_scale(scale)
                .with_eps(0.0),
        )?;
        let dev = (x.transpose(1, 2)?.matmul(&x)? - &eye)?;
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
        let stalled = matches!(&best, Some((rb, _)) if r >= 0.5 * rb);
        if !stalled {
            best = Some((r, x.clone()));
        }
        if stalled || r <= tol {
            break;
        }
    }
    let (r, x) = best.expect("at least one round");
    if r > 1e-3 && !cold {
        // Not near the manifold after all (e.g. a huge step): start over cold.
        return stiefel_retract(w, true);
    }
    unbatch(x, added)
}
