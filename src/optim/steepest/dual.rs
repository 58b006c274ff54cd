//! Muon on matrix manifolds by dual gradient descent (docs/math.md §3): the
//! spectral sphere `‖W‖₂ = r` and the Stiefel manifold `WᵀW = I`.
//!
//! Each function takes one matrix `(m, n)` or a batch `(b, m, n)`; the
//! multipliers are `()`/`(b,)` (spectral sphere) and `(k, k)`/`(b, k, k)`
//! (Stiefel). Gradients are normalised to `Ĝ = G/rms(σ(G))` (`rms(σ) =
//! ‖G‖_F/√k`, `k` the short side) before the dual problem, so the multipliers
//! and the dual learning rate are dimensionless (the direction
//! `msign(G + λΘ)` is invariant under scaling `G` and `λ` together).

use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::device::{host_f64, upload_f64};
use crate::error::{fail, Result};
use crate::linalg::{batch3, msign, unbatch, NewtonSchulz};
use crate::params::round_to;

/// Where the parameters live. A retraction after every step puts each
/// parameter back on the manifold, so after the first step it lies there
/// wherever it started (the Stiefel manifold also projects the starting point
/// before the first direction is computed).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
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
    /// norm: `Φ = msign(G + λΘ)`, `Θ = u₁v₁ᵀ`, `λ` by dual descent (or solved
    /// per step, [`DualAscent::bracket`]; [`spectral_sphere_direction`]),
    /// then `W ← r·(W − ηΦ)/‖W − ηΦ‖₂`.
    SpectralSphere {
        /// The radius `r > 0`.
        radius: f64,
    },
    /// The Stiefel manifold, with the spectral norm: `Φ = msign(G + WX)`,
    /// `X` symmetric by dual descent ([`stiefel_direction`]; exact in one
    /// `msign` for a square matrix, on a smoothed dual for a nearly square
    /// one, `n ≤ 2m`), then
    /// `W ← msign(W − ηΦ)` ([`crate::linalg::stiefel_retract`]). `transpose: false` keeps
    /// `WᵀW = I` and needs a tall matrix view (rows ≥ cols); `transpose: true`
    /// keeps `WWᵀ = I` and needs a wide one (rows ≤ cols).
    Stiefel {
        /// Constrain `Wᵀ` instead of `W` (orthonormal rows).
        transpose: bool,
    },
}

impl Manifold {
    /// The radius of a sphere (`Sphere`, `SpectralSphere`); `None` otherwise.
    pub(crate) fn radius(&self) -> Option<f64> {
        match *self {
            Self::Sphere { radius } | Self::SpectralSphere { radius } => Some(radius),
            Self::Free | Self::Stiefel { .. } => None,
        }
    }

    /// Whether `other` is the same manifold up to its radius: the same kind
    /// and, on the Stiefel manifold, the same orientation. A checkpoint's
    /// state (a dual multiplier, a singular vector) belongs to one manifold;
    /// a radius is a hyperparameter that a checkpoint may restore.
    pub(crate) fn same_up_to_radius(&self, other: &Manifold) -> bool {
        match (self, other) {
            (Self::Stiefel { transpose: a }, Self::Stiefel { transpose: b }) => a == b,
            _ => std::mem::discriminant(self) == std::mem::discriminant(other),
        }
    }

    /// Refuses checkpoint settings written for another manifold (see
    /// [`Manifold::same_up_to_radius`]).
    pub(crate) fn check_resumable(&self, stored: &Manifold, who: &str) -> Result<()> {
        if !self.same_up_to_radius(stored) {
            fail!(
                Checkpoint,
                who,
                "written for {stored:?}, this optimizer is on {self:?}"
            );
        }
        Ok(())
    }
}

/// The dual-descent schedule for a manifold's Lagrange multiplier.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct DualAscent {
    /// Dual learning rate `η₂` (in units of `rms(σ(G))`, see the module doc);
    /// `None` takes the measured default of the manifold: 0.5 on the spectral
    /// sphere (`μ/2` when its dual is smoothed), 0.05 on the Stiefel manifold
    /// (see the constants' notes in the source).
    pub lr: Option<f64>,
    /// Dual steps (one `msign` each) per training step; 1 is the amortised
    /// scheme of docs/math.md §3 (the multiplier carries over between steps).
    /// A square matrix on the Stiefel manifold takes none: its dual problem
    /// is solved exactly ([`stiefel_direction`]).
    pub steps: usize,
    /// Step along `sign(∇)` instead of `∇` (`λ ← λ − η₂·sign(tr(ΘᵀΦ))`).
    pub sign: bool,
    /// The Stiefel dual's smoothing `μ` (in units of `rms(σ(Ĝ))`, see
    /// [`stiefel_direction`]): `None` takes `μ = 0.1` for nearly square
    /// matrices (`m < n ≤ 2m`, where the plain dual can stall) and the plain
    /// dual (`μ = 0`) for the rest; `Some(0.0)` is the plain dual for every
    /// shape, `Some(μ)` smooths every non-square matrix. Plain (not sign)
    /// steps need `η₂ < μ` on the smoothed dual, whose gradient is
    /// `1/μ`-Lipschitz: a larger rate is refused. On the spectral sphere
    /// `None` and `Some(0.0)` are the plain dual and `Some(μ)` smooths it
    /// ([`spectral_sphere_direction`]; plain steps need `η₂ < 2μ` there). A
    /// checkpoint written before this setting existed resumes with
    /// `Some(0.0)`, the plain dual it was trained with.
    #[serde(default = "plain_dual")]
    pub smoothing: Option<f64>,
    /// Spectral sphere only: solve the dual at every step, by bracketing the
    /// root of `h(λ) = tr(ΘᵀΦ(λ))` with at most this many `msign`s (≥ 2),
    /// instead of taking `steps` dual steps (`lr` and `sign` are then
    /// unused); the direction is tangent whatever `h` does at its root (see
    /// [`spectral_sphere_direction`]). `None` (the default, and what a
    /// checkpoint written before this setting resumes with): dual steps.
    #[serde(default)]
    pub bracket: Option<usize>,
}

/// [`DualAscent::smoothing`] of a checkpoint written before it existed.
fn plain_dual() -> Option<f64> {
    Some(0.0)
}

/// Default dual learning rate on the spectral sphere, by measurement
/// (`examples/manifolds.rs`, `tests/steepest_matrix.rs`): with `Ĝ`
/// normalised to `rms(σ) = 1`, `η₂ ∈ [0.5, 1]` drives `|tr(ΘᵀΦ)|` below 1e-4
/// within 20 dual steps for shapes from 8×3 to 256×128; 0.5 is the safe end.
const DEFAULT_DUAL_LR_SPECTRAL_SPHERE: f64 = 0.5;

/// Default dual learning rate on the Stiefel manifold, by measurement: the
/// dual objective `‖Ĝ + WX‖_*` is stiffer (its curvature grows with the
/// short side `m`), constant steps of 0.1 oscillate from 64×32 on, 0.05
/// converges for 8×3 to 256×128 (slowly for the large ones: ‖WᵀΦ + ΦᵀW‖_F
/// ≈ 1e-2 after 300 dual steps at 256×128, against 1e-6 at 16×8).
const DEFAULT_DUAL_LR_STIEFEL: f64 = 0.05;

impl Default for DualAscent {
    /// The manifold's default `η₂`, one dual step per training step, plain
    /// (not sign) steps.
    fn default() -> Self {
        Self {
            lr: None,
            steps: 1,
            sign: false,
            smoothing: None,
            bracket: None,
        }
    }
}

impl DualAscent {
    /// Errors (naming `who`) on a negative or non-finite dual rate or 0 steps.
    pub fn validate(&self, who: &str) -> Result<()> {
        if let Some(lr) = self.lr {
            if !(lr.is_finite() && lr >= 0.0) {
                fail!(Config, who, "dual lr must be finite and ≥ 0, got {lr}");
            }
        }
        if self.steps == 0 {
            fail!(Config, who, "dual steps must be ≥ 1, got 0");
        }
        if let Some(mu) = self.smoothing {
            if !(mu.is_finite() && mu >= 0.0) {
                fail!(Config, who, "smoothing must be finite and ≥ 0, got {mu}");
            }
        }
        if let Some(n) = self.bracket.filter(|&n| n < 2) {
            fail!(
                Config,
                who,
                "bracket needs at least 2 msigns (one at the stored λ, one past the root), got {n}"
            );
        }
        Ok(())
    }

    /// The smoothing `μ` of the Stiefel dual for a tall `n × m` matrix
    /// (`n > m`; 0: the plain dual).
    pub(crate) fn stiefel_smoothing(&self, n: usize, m: usize) -> f64 {
        match self.smoothing {
            Some(mu) => mu,
            None if n <= 2 * m => STIEFEL_SMOOTHING,
            None => 0.0,
        }
    }

    /// Refuses (naming `who`) a plain dual rate `η₂ ≥ μ` where the Stiefel
    /// dual of a tall `n × m` matrix (`n > m`) is smoothed: descent on it
    /// needs `η₂ < μ` (the crate's step is `2η₂·∇`, the gradient
    /// `1/μ`-Lipschitz); measured with exact SVDs, `η₂ = 0.15` at `μ = 0.1`
    /// stalled at residuals 0.6 (40×32) and 1.6 (7×6).
    pub(crate) fn check_stiefel_rate(&self, n: usize, m: usize, who: &str) -> Result<()> {
        let mu = self.stiefel_smoothing(n, m);
        let lr = self.lr.unwrap_or(DEFAULT_DUAL_LR_STIEFEL);
        if n > m && mu > 0.0 && !self.sign && lr >= mu {
            fail!(
                Config,
                who,
                "dual lr {lr} ≥ smoothing μ = {mu}: descent on the smoothed Stiefel dual of \
                 this {n}×{m} matrix does not converge (it needs lr < μ); lower the dual lr, \
                 or set smoothing: Some(0.0) for the plain dual"
            );
        }
        Ok(())
    }

    /// Refuses (naming `who`) `bracket` on the Stiefel manifold: it solves
    /// the spectral sphere's scalar dual, and the Stiefel multiplier is a
    /// matrix.
    pub(crate) fn check_stiefel_bracket(&self, who: &str) -> Result<()> {
        if self.bracket.is_some() {
            fail!(
                Config,
                who,
                "bracket solves the spectral sphere's dual; the Stiefel multiplier is a matrix \
                 (set bracket: None)"
            );
        }
        Ok(())
    }

    /// The spectral sphere's smoothing `μ` (0: the plain dual) and dual rate.
    pub(crate) fn sphere_smoothing_and_rate(&self) -> (f64, f64) {
        let mu = self.smoothing.unwrap_or(0.0);
        let default = if mu > 0.0 {
            0.5 * mu
        } else {
            DEFAULT_DUAL_LR_SPECTRAL_SPHERE
        };
        (mu, self.lr.unwrap_or(default))
    }

    /// Refuses (naming `who`) a plain dual rate `η₂ ≥ 2μ` on the smoothed
    /// spectral-sphere dual: its derivative in `λ` is `1/μ`-Lipschitz
    /// (`‖Θ‖_F = 1`) and the step is `η₂·∇`.
    /// With `bracket` there are no dual steps, and any rate passes.
    pub(crate) fn check_sphere_rate(&self, who: &str) -> Result<()> {
        let (mu, lr) = self.sphere_smoothing_and_rate();
        if self.bracket.is_none() && mu > 0.0 && !self.sign && lr >= 2.0 * mu {
            fail!(
                Config,
                who,
                "dual lr {lr} ≥ 2μ = {}: descent on the smoothed spectral-sphere dual does \
                 not converge (it needs lr < 2μ); lower the dual lr, or the smoothing",
                2.0 * mu
            );
        }
        Ok(())
    }

    fn step(&self, lr: f64, multiplier: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let d = if self.sign {
            grad.sign()?
        } else {
            grad.clone()
        };
        Ok((multiplier - (d * lr)?)?)
    }
}

/// The result of a dual solve: the direction, the updated multiplier, and the
/// tangent residual of the returned direction.
#[derive(Clone, Debug)]
pub struct DualStep {
    /// The direction `Φ` (unit spectral norm, up to the Newton–Schulz
    /// accuracy: Keller Jordan's table leaves `‖Φ‖₂` up to ~1.13; with an
    /// exact `msign` a little below 1 for a nearly square Stiefel matrix,
    /// whose smoothed direction shrinks the singular values under `μ`).
    pub phi: Tensor,
    /// The multiplier after the dual steps (`λ` or `X`).
    pub multiplier: Tensor,
    /// The tangent residual of `phi`: `tr(ΘᵀΦ)` (shape of `λ`) or
    /// `WᵀΦ + ΦᵀW` (shape of `X`). Zero means `phi` is tangent.
    pub residual: Tensor,
}

/// `Ĝ = G/rms(σ(G)) = G·√k/‖G‖_F` per matrix of a `(b, m, n)` batch, `k` the
/// short side (zero stays zero): singular values of order 1 whatever the
/// shape and the gradient's scale, so one dual learning rate fits all.
/// Computed from `S = G/max|G|` (per matrix), as `S·√k/‖S‖_F`: `‖G‖_F²`
/// itself overflows f32 for `|G| ≳ 1e19` and underflows for `|G| ≲ 1e-19`.
fn normalise(g: &Tensor) -> Result<Tensor> {
    let (_, m, n) = g.dims3()?;
    let tiny = crate::linalg::tiny(g.dtype());
    let max = g.abs()?.max_keepdim(2)?.max_keepdim(1)?;
    let s = g.broadcast_div(&max.maximum(tiny)?)?;
    let n = (s.sqr()?.sum_keepdim(2)?.sum_keepdim(1)? / m.min(n) as f64)?.sqrt()?;
    Ok(s.broadcast_div(&n.maximum(tiny)?)?)
}

/// The default smoothing of the nearly square Stiefel dual, in units of
/// `rms(σ(Ĝ)) = 1`: `μ = 0.1`. Measured (`tests/steepest_matrix.rs`, f32,
/// `X₀ = 0`, `η₂ = 0.05`, 1000 dual steps, 7×6 to 56×32): tangent residuals
/// 1e-6–4e-3 with Polar Express's Newton–Schulz (up to 3e-2 with Keller
/// Jordan's) where the plain dual stalled at 1–2.5, and `⟨Ĝ, Φ⟩/‖Φ‖₂`
/// 98.2–98.9 % of the dual bound `‖Ĝ + WX‖_*` (Polar Express). With exact
/// SVDs (`scripts/stiefel_smoothing.py`), `μ = 0.2` converges faster at
/// 94–97 %, `0.05` more slowly at 99.1–99.7 %.
const STIEFEL_SMOOTHING: f64 = 0.1;

/// `μI` for each matrix of the batch, `(b, m, m)`, the rows that
/// [`smoothed_msign`] stacks under `M`.
fn smoothing_block(g: &Tensor, b: usize, m: usize, mu: f64) -> Result<Tensor> {
    let eye = Tensor::eye(m, g.dtype(), g.device())?;
    Ok((eye * mu)?.unsqueeze(0)?.repeat((b, 1, 1))?)
}

/// `M (MᵀM + μ²I)^{-1/2}`, the gradient in `M` of the smoothed nuclear norm
/// `Σᵢ √(σᵢ² + μ²)`: the top `n` rows of `msign([M; μI])`, since
/// `[M; μI]ᵀ[M; μI] = MᵀM + μ²I`. Its singular values are `σ/√(σ² + μ²)`
/// (below 1 with an exact `msign`; Keller Jordan's table leaves them in
/// about `[0.7, 1.2]`). Every Newton–Schulz step is `X·q(XᵀX)`, so the top
/// rows are `M·h(MᵀM + μ²I)` for any table. The stacked matrix has no
/// singular value below `μ`, about `μ/√(1.01m)` after the normalisation
/// (0.009 at `m = 128`).
fn smoothed_msign(m: &Tensor, block: &Tensor, ns: &NewtonSchulz) -> Result<Tensor> {
    let rows = m.dim(1)?;
    let stacked = Tensor::cat(&[m, block], 1)?;
    Ok(msign(&stacked, ns)?.narrow(1, 0, rows)?)
}

/// Spectral-sphere direction by dual descent (docs/math.md §3):
/// repeat `steps` times `Φ = msign(Ĝ + λΘ); λ ← λ − η₂·tr(ΘᵀΦ)`, with
/// `Ĝ = G/rms(σ(G))`. Returns the last `Φ`, the updated `λ` and `tr(ΘᵀΦ)` of that
/// `Φ`. At the fixed point `tr(ΘᵀΦ) = 0` and `Φ` maximises `tr(GᵀΦ)` over
/// `‖Φ‖₂ = 1`, `tr(ΘᵀΦ) = 0` (`λ* = argmin ‖G + λΘ‖_*`). A zero `G` gets
/// `Φ = 0`, its `λ` unchanged and a zero residual.
///
/// The plain dual's derivative `h(λ) = tr(ΘᵀΦ)` is steep where `msign`
/// turns a small singular value into 1: when `Ĝ` is (nearly) rank-deficient
/// in `Θ`'s directions (a low-rank gradient, as early in training) or lies
/// almost along `Θ`, `h` jumps across its root and no fixed `η₂` settles:
/// `λ` oscillates and `Φ` carries `±Θ`'s part, a normal component the
/// retraction takes back. Measured in `examples/train_lm`'s sphere run
/// (seed 0): `|tr(ΘᵀΦ)|` averages 0.75, 0.60 and 0.48 over the first 10
/// steps at `η₂` = 0.5, 0.25 and 0.15, alternating in sign for about 25
/// steps in each, and 0.08 after step 100.
/// `smoothing: Some(μ)` uses the smoothed dual instead,
/// `Φ = M(MᵀM + μ²I)^{-1/2}` with `M = Ĝ + λΘ` (the gradient of
/// `Σᵢ √(σᵢ(M)² + μ²)`, continuous in `λ`), whose residual settles there
/// (0.016 over the first 10 steps of the same run at `μ = 0.1`) at the
/// price of shrinking the singular values of `Φ` below `μ` and of one
/// `msign` of an `(m + n) × n` matrix; the run's final loss did not improve
/// (seed 0: 0.4608 against 0.4600), so it is not the default.
/// `bracket: Some(k)` solves the dual instead, with up to `k` `msign`s per
/// step (see `bracket_root` in the source): from the stored `λ`, steps
/// toward the root until `h` changes sign, bisection, and the convex
/// combination of the bracket's ends that is exactly tangent, which also
/// settles where `h` jumps.
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
    dual.check_sphere_rate("spectral_sphere_direction: dual")?;
    let (mu, lr) = dual.sphere_smoothing_and_rate();
    let (g3, added) = batch3(g)?;
    let (t3, _) = batch3(theta)?;
    if g3.dims() != t3.dims() {
        fail!(
            Shape,
            "spectral_sphere_direction",
            "g {:?} and theta {:?} differ in shape",
            g.dims(),
            theta.dims()
        );
    }
    let b = g3.dim(0)?;
    let lam0 = lambda.to_dtype(g3.dtype())?.reshape(b)?;
    let mut lam = lam0.clone();
    let gn = normalise(&g3)?;
    let block = if mu > 0.0 {
        Some(smoothing_block(&gn, b, gn.dim(2)?, mu)?)
    } else {
        None
    };
    // A zero gradient has the zero direction (as on the other manifolds),
    // and its λ is kept: Φ = msign(λΘ) = ±Θ moved W along the normal,
    // which the retraction turned into a change of the other σᵢ.
    let live = live_members(&gn)?;
    let direction = |lam: &Tensor| -> Result<(Tensor, Tensor)> {
        let shifted = (&gn + t3.broadcast_mul(&lam.reshape((b, 1, 1))?)?)?;
        let phi = match &block {
            Some(block) => smoothed_msign(&shifted, block, ns)?,
            None => msign(&shifted, ns)?,
        };
        let res = (&t3 * &phi)?.sum(2)?.sum(1)?;
        Ok((phi, res))
    };
    let (phi, res) = match dual.bracket {
        Some(evals) => {
            let (phi, res, solved) = bracket_root(&direction, &live, &t3, &lam0, evals)?;
            lam = solved;
            (phi, res)
        }
        None => {
            let mut phi = gn.zeros_like()?;
            let mut res = lam.zeros_like()?;
            for _ in 0..dual.steps {
                (phi, res) = direction(&lam)?;
                lam = dual.step(lr, &lam, &res)?;
            }
            (phi, res)
        }
    };
    let phi = live
        .reshape((b, 1, 1))?
        .broadcast_as(phi.shape())?
        .where_cond(&phi, &phi.zeros_like()?)?;
    let res = live.where_cond(&res, &res.zeros_like()?)?;
    let lam = live.where_cond(&lam, &lam0)?;
    let shape = lambda.shape().clone();
    Ok(DualStep {
        phi: unbatch(phi, added)?,
        multiplier: lam.reshape(shape.clone())?,
        residual: res.reshape(shape)?,
    })
}

/// One matrix's search in [`bracket_root`]: the ends found so far (`λ`
/// and `h(λ)`; `h ≤ 0` at the low end, `h ≥ 0` at the high one) and the
/// next step of the expansion.
#[derive(Clone, Copy, Debug)]
struct Bracket {
    lo: Option<(f64, f64)>,
    hi: Option<(f64, f64)>,
    reach: f64,
    solved: bool,
}

impl Bracket {
    fn new() -> Self {
        Self {
            lo: None,
            hi: None,
            reach: 1.0,
            solved: false,
        }
    }

    /// Takes `h` at `lam`; returns which ends moved (the direction there
    /// replaces theirs) and the next `λ`, rounded by `round`. A solved
    /// bracket keeps its ends and its point.
    fn update(&mut self, lam: f64, h: f64, round: impl Fn(f64) -> f64) -> (bool, bool, f64) {
        if self.solved {
            return (false, false, lam);
        }
        if h.is_nan() {
            // Not from finite inputs: the search ends at this point.
            (self.lo, self.hi, self.solved) = (None, Some((lam, h)), true);
            return (false, true, lam);
        }
        let (to_lo, to_hi) = (h <= 0.0, h >= 0.0);
        if to_lo {
            self.lo = Some((lam, h));
        }
        if to_hi {
            self.hi = Some((lam, h));
        }
        let next = match (self.lo, self.hi) {
            (Some((l, _)), Some((u, _))) => {
                let mid = round(0.5 * (l + u));
                let narrow = u - l <= 1e-6 * l.abs().max(1.0);
                self.solved = narrow || mid == l || mid == u;
                mid
            }
            (Some((l, _)), None) => round(l + self.reach),
            (None, Some((u, _))) => round(u - self.reach),
            (None, None) => unreachable!("h is a number here"),
        };
        if self.lo.is_none() || self.hi.is_none() {
            self.reach *= 2.0;
        }
        (to_lo, to_hi, next)
    }

    /// The weight of the low end's direction and the multiplier: the
    /// zero-residual combination where both ends were found (and differ),
    /// the one end found otherwise.
    fn weights(&self) -> (f64, f64) {
        match (self.lo, self.hi) {
            (Some((l, hl)), Some((u, hu))) if hu > hl => {
                let alpha = hu / (hu - hl);
                (alpha, alpha * l + (1.0 - alpha) * u)
            }
            (Some((l, _)), _) => (1.0, l),
            (None, Some((u, _))) => (0.0, u),
            (None, None) => unreachable!("every matrix was evaluated at least once"),
        }
    }
}

/// The bracketing solve of [`DualAscent::bracket`]: for each matrix of the
/// batch, the root of `h(λ) = tr(ΘᵀΦ(λ))`, non-decreasing in `λ` (the
/// derivative of the convex `‖Ĝ + λΘ‖_*`), with at most `evals` batched
/// evaluations of `direction` (one `msign` each, and one host read of the
/// residuals). From the stored `λ`, steps of 1, 2, 4, … (in units of
/// `rms(σ(Ĝ))`) toward the root until `h` changes sign, then bisection. A
/// matrix's search ends once its bracket is narrower than
/// `1e-6·max(1, |λ|)` or can no longer be split in the multipliers' dtype
/// (a zero `Ĝ`, whose direction the caller discards, from the start); its
/// later evaluations are ignored, so it gets what it would alone, and the
/// solve stops when every search has ended.
///
/// `h` may jump across its root (a low-rank `Ĝ`; see
/// [`spectral_sphere_direction`]), so no `λ` need give `h = 0`. The
/// direction returned is the convex combination of the bracket's ends with
/// zero residual, `Φ = α Φ(λ_lo) + (1 − α) Φ(λ_hi)`,
/// `α = h_hi/(h_hi − h_lo)`. With an exact `msign`, `‖Φ‖₂ ≤ 1` and, by
/// the subgradient inequalities of `f(λ) = ‖Ĝ + λΘ‖_*` at both ends and
/// weak duality, `⟨Ĝ, Φ⟩` is within `c·(λ_hi − λ_lo)` of the optimum
/// `min_λ f`, `c = h_hi|h_lo|/(h_hi + |h_lo|) ≤ 1/2`: the primal optimum as
/// the bracket closes. The multiplier returned is `α λ_lo + (1 − α) λ_hi`.
/// A matrix whose `h` never changed sign keeps the last point reached (and
/// its non-zero residual).
///
/// The ends' directions are kept as two batch tensors (each matrix's
/// slice replaced where its end moves), so the solve holds two `Φ`s
/// besides the one being evaluated, whatever `evals`.
fn bracket_root(
    direction: &dyn Fn(&Tensor) -> Result<(Tensor, Tensor)>,
    live: &Tensor,
    theta: &Tensor,
    lam0: &Tensor,
    evals: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (b, dt, dev) = (lam0.dim(0)?, lam0.dtype(), lam0.device());
    let round = |x: f64| round_to(dt, x);
    let mut at: Vec<f64> = host_f64(lam0)?.into_iter().map(round).collect();
    let mut searches: Vec<Bracket> = Vec::new();
    let (mut phi_lo, mut phi_hi) = (None::<Tensor>, None::<Tensor>);
    for _ in 0..evals {
        let (phi, res) = direction(&upload_f64(at.clone(), b, dt, dev)?)?;
        let first = searches.is_empty();
        let (h, dead) = if first {
            // The first read also says which gradients are zero.
            let both = host_f64(&Tensor::cat(&[&res, &live.to_dtype(res.dtype())?], 0)?)?;
            searches = vec![Bracket::new(); b];
            (
                both[..b].to_vec(),
                both[b..].iter().map(|&l| l == 0.0).collect(),
            )
        } else {
            (host_f64(&res)?, vec![false; b])
        };
        let mut moved = (vec![0.0; b], vec![0.0; b]);
        for i in 0..b {
            let (lo, hi, next) = searches[i].update(at[i], h[i], round);
            (moved.0[i], moved.1[i], at[i]) =
                (f64::from(u8::from(lo)), f64::from(u8::from(hi)), next);
            // A zero gradient's search ends at its first point (the caller
            // discards its direction and keeps its λ).
            searches[i].solved |= dead[i];
        }
        let keep = |mask: Vec<f64>, old: Option<Tensor>| -> Result<Tensor> {
            let mask = upload_f64(mask, (b, 1, 1), DType::U8, dev)?.broadcast_as(phi.shape())?;
            Ok(match old {
                Some(old) => mask.where_cond(&phi, &old)?,
                None => mask.where_cond(&phi, &phi.zeros_like()?)?,
            })
        };
        phi_lo = Some(keep(moved.0, phi_lo)?);
        phi_hi = Some(keep(moved.1, phi_hi)?);
        if searches.iter().all(|s| s.solved) {
            break;
        }
    }
    let (w_lo, lams): (Vec<f64>, Vec<f64>) = searches.iter().map(Bracket::weights).unzip();
    let w_hi: Vec<f64> = w_lo.iter().map(|a| 1.0 - a).collect();
    let (phi_lo, phi_hi) = (
        phi_lo.expect("at least one evaluation"),
        phi_hi.expect("at least one evaluation"),
    );
    let weights = |w: Vec<f64>| upload_f64(w, (b, 1, 1), phi_lo.dtype(), dev);
    // An end that was never found is zero and weighs 0.
    let phi = (phi_lo.broadcast_mul(&weights(w_lo)?)? + phi_hi.broadcast_mul(&weights(w_hi)?)?)?;
    let res = (theta * &phi)?.sum(2)?.sum(1)?;
    Ok((phi, res, upload_f64(lams, b, dt, dev)?))
}

/// Stiefel direction by dual descent (docs/math.md §3), for tall `W` (`n ≥ m`,
/// `WᵀW = I`): repeat `steps` times `Φ = msign(Ĝ + W X);
/// X ← X − η₂ (WᵀΦ + ΦᵀW)`, with `Ĝ = G/rms(σ(G))` and `X` symmetric `m × m`.
/// Returns the last `Φ`, the updated `X` and `WᵀΦ + ΦᵀW` of that `Φ`; a
/// zero gradient gets `Φ = 0`, its `X` kept and a zero residual.
///
/// A square `W` (`n = m`, the orthogonal group) takes the dual problem's
/// exact solution instead, in one `msign` and whatever `dual` says: with
/// `WᵀĜ = S + K` (`S` symmetric, `K` skew), `X* = −S` minimises
/// `‖Ĝ + WX‖_* = ‖S + K + X‖_*` (its value `‖K‖_*` is the primal maximum),
/// and `Φ = W·msign(K)` is tangent (`msign` of a skew matrix is skew). Dual
/// descent does not settle there: for odd `n`, `K` is singular and the
/// optimal `Φ` is rank-deficient, which `msign` of a nearby full-rank
/// matrix never is (measured: `‖WᵀΦ + ΦᵀW‖_F` stays near 2 after 1000 dual
/// steps; for 6×6 and 32×32 too). Nearly square tall shapes (`m < n ≤ 2m`)
/// share the difficulty and have no closed form: plain dual descent
/// stalled there at residuals of order 1. By default
/// ([`DualAscent::smoothing`]) they descend the smoothed dual
/// `Σᵢ √(σᵢ(Ĝ + WX)² + μ²)` instead (`μ = 0.1`), with
/// `Φ = (Ĝ + WX)((Ĝ + WX)ᵀ(Ĝ + WX) + μ²I)^{-1/2}`, the top rows of
/// `msign([Ĝ + WX; μI])`: its residual goes to zero (measured 1e-6–4e-3
/// after 1000 dual steps from `X = 0` with Polar Express's Newton–Schulz,
/// up to 3e-2 with Keller Jordan's), and `⟨Ĝ, Φ⟩/‖Φ‖₂` is 98.2–98.9 % of
/// the unsmoothed optimum's bound with Polar Express (72–83 % with Keller
/// Jordan's inexact table, as for its plain dual; docs/math.md §3). A plain
/// dual rate `η₂ ≥ μ` is refused there: descent on the smoothed dual needs
/// `η₂ < μ`.
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
            Shape,
            "stiefel_direction",
            "shapes g {:?}, w {:?}, x {:?} do not fit (x must be m×m for w n×m)",
            g.dims(),
            w.dims(),
            x.dims()
        );
    }
    if n < m {
        fail!(
            Shape,
            "stiefel_direction",
            "w is wide ({n}×{m}); WᵀW = I needs rows ≥ cols (transpose it)"
        );
    }
    // (for every shape, the square one's exact solve included)
    dual.check_stiefel_bracket("stiefel_direction: dual")?;
    let gn = normalise(&g3)?;
    let wt = w3.transpose(1, 2)?;
    if n == m {
        let s = wt.matmul(&gn)?;
        let st = s.transpose(1, 2)?;
        let skew = ((&s - &st)? * 0.5)?;
        let x3 = ((&s + &st)? * -0.5)?;
        let phi = w3.matmul(&msign(&skew, ns)?)?;
        let wtp = wt.matmul(&phi)?;
        let res = (&wtp + wtp.transpose(1, 2)?)?;
        return Ok(DualStep {
            phi: unbatch(phi, added)?,
            multiplier: unbatch(x3, added)?,
            residual: unbatch(res, added)?,
        });
    }
    let x0 = x3.to_dtype(g3.dtype())?;
    let mut x3 = x0.clone();
    let mut phi = gn.zeros_like()?;
    let mut res = x3.zeros_like()?;
    // Nearly square: the smoothed dual (see `smoothed_msign`), whose
    // descent converges where the plain one stalls.
    dual.check_stiefel_rate(n, m, "stiefel_direction: dual")?;
    let mu = dual.stiefel_smoothing(n, m);
    let smooth = (mu > 0.0)
        .then(|| smoothing_block(&g3, b, m, mu))
        .transpose()?;
    for _ in 0..dual.steps {
        let shifted = (&gn + w3.matmul(&x3)?)?;
        phi = match &smooth {
            Some(block) => smoothed_msign(&shifted, block, ns)?,
            None => msign(&shifted, ns)?,
        };
        let wtp = wt.matmul(&phi)?;
        res = (&wtp + wtp.transpose(1, 2)?)?;
        x3 = dual.step(lr, &x3, &res)?;
    }
    // A zero gradient has the zero direction and keeps its X (as on the
    // spectral sphere): Φ = msign(WX) ≠ 0 would move X by 2η₂·msign(X) a
    // step, for a W that stays where it is.
    let live = live_members(&gn)?.reshape((b, 1, 1))?;
    let keep = |t: &Tensor, dead: &Tensor| -> Result<Tensor> {
        Ok(live.broadcast_as(t.shape())?.where_cond(t, dead)?)
    };
    Ok(DualStep {
        phi: unbatch(keep(&phi, &phi.zeros_like()?)?, added)?,
        multiplier: unbatch(keep(&x3, &x0)?, added)?,
        residual: unbatch(keep(&res, &res.zeros_like()?)?, added)?,
    })
}

/// Per member of the batch `g3` `(b, m, n)`, whether its gradient is not
/// all zero (`(b,)`, u8): a zero gradient gets the zero direction and
/// keeps its multiplier, on every manifold.
fn live_members(g3: &Tensor) -> Result<Tensor> {
    Ok(g3.sqr()?.sum(2)?.sum(1)?.ne(0.0)?)
}
