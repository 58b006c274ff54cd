//! Steepest descent under a norm and on a manifold (docs/math.md §2, §3).
//!
//! One optimizer, [`Steepest`], configured by a [`Norm`] (the geometry of a
//! step) and a [`Manifold`] (where the parameters live):
//!
//! | norm \ manifold | `Free` | `Sphere{r}` | `SpectralSphere{r}` | `Stiefel` |
//! |---|---|---|---|---|
//! | `Euclidean` | `φ = g/‖g‖₂` | `φ = P g/‖P g‖₂`, `P = I − ŵŵᵀ` | — | — |
//! | `Lp(p)` | `φ = g^{[q/p]}/‖g^{[q/p]}‖_p` | `φ ∝ (g + λ ŵ^{[p−1]})^{[q/p]}`, `λ` solved | — | — |
//! | `Sign` | `φ = sign(g)` | `sign(g)`, `φ_k = 0` at `k = argmax|w_k|` | — | — |
//! | `Spectral` | `Φ = msign(G)` (Muon) | — | `Φ = msign(G + λΘ)` | `Φ = msign(G + WX)` |
//!
//! Every step is `w ← retract(w − ηφ)`, `φ` computed from the momentum
//! buffer (`buf ← μ·buf + (1−μ)·g`, optionally Nesterov). The multipliers
//! `λ` and `X` follow dual descent (`λ ← λ − η₂ tr(ΘᵀΦ)`,
//! `X ← X − η₂(WᵀΦ + ΦᵀW)`), persist across steps and are saved with the state.
//! The per-tensor math is in [`dualize`], [`sphere_direction`],
//! [`spectral_sphere_direction`] and [`stiefel_direction`]; the retractions
//! are in [`crate::linalg`].

mod dual;
mod norm;

use serde::{Deserialize, Serialize};

pub use dual::{spectral_sphere_direction, stiefel_direction, DualAscent, DualStep, Manifold};
pub use norm::{dualize, lp_sphere_multiplier, p_norm, sphere_direction, sphere_retract, Norm};

use super::alias::{alias, single_chain_config};
use super::driver::{check_lr, Driver};
use super::transform::{Decay, Dualize, ManifoldState, ManifoldStep, Momentum, MomentumKind};
use super::Chain;
use crate::decay::WeightDecay;
use crate::error::Result;
use crate::linalg::NewtonSchulz;

/// [`Steepest`] hyperparameters. Defaults: `lr = 0.02`, momentum 0.95 with
/// Nesterov, the spectral norm with Keller Jordan's Newton–Schulz table, no
/// manifold, no weight decay, one dual step per training step with the
/// manifold's default `η₂`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SteepestConfig {
    /// Step length `η`: every step has `ρ(Δw) = η` before the retraction (no
    /// per-shape adjustment, unlike `Muon`'s `LrAdjust`).
    pub lr: f64,
    /// Momentum `μ` (0 disables the buffer): `buf ← buf + (1−μ)(g − buf)`.
    pub momentum: f64,
    /// Dualize `g + μ(buf − g)` instead of `buf`.
    pub nesterov: bool,
    /// The norm of a step.
    pub norm: Norm,
    /// Where the parameters live.
    pub manifold: Manifold,
    /// Decoupled weight decay `w ← w − ηλ(…)`, applied before the step to every
    /// parameter (on a manifold the retraction undoes a change of scale).
    pub weight_decay: WeightDecay,
    /// Dual descent of the multipliers (`SpectralSphere`, `Stiefel`).
    pub dual: DualAscent,
}

impl Default for SteepestConfig {
    fn default() -> Self {
        Self {
            lr: 0.02,
            momentum: 0.95,
            nesterov: true,
            norm: Norm::Spectral(NewtonSchulz::muon()),
            manifold: Manifold::Free,
            weight_decay: WeightDecay::None,
            dual: DualAscent::default(),
        }
    }
}

impl SteepestConfig {
    /// Errors (naming the field) on a hyperparameter out of range or a norm
    /// that does not fit the manifold.
    pub fn validate(&self) -> Result<()> {
        check_lr("SteepestConfig.lr", self.lr)?;
        self.momentum().validate("SteepestConfig")?;
        self.norm.validate("SteepestConfig.norm")?;
        self.weight_decay.validate("SteepestConfig.weight_decay")?;
        self.dual.validate("SteepestConfig.dual")?;
        match self.manifold {
            Manifold::Free => Ok(()),
            _ => self.manifold_step().validate("SteepestConfig"),
        }
    }

    fn momentum(&self) -> Momentum {
        Momentum {
            kind: MomentumKind::Ema,
            momentum: self.momentum,
            nesterov: self.nesterov,
        }
    }

    fn manifold_step(&self) -> ManifoldStep {
        ManifoldStep {
            manifold: self.manifold,
            norm: self.norm.clone(),
            dual: self.dual,
        }
    }

    /// The chain this config stands for: decay (of every parameter), momentum
    /// (if `μ > 0`), then [`Dualize`] (free) or [`ManifoldStep`]. For a
    /// [`Partition`](crate::optim::Partition) group, e.g. the matrices of a
    /// model whose vectors go to AdamW (see [`Steepest`]). Not validated:
    /// call [`SteepestConfig::validate`] first, as [`Steepest`]'s
    /// constructors do (a norm that does not fit the manifold is refused
    /// when the driver is built either way). The chain carries no rate: in a
    /// `Partition` group, the group's rate is the one used, not `lr`.
    pub fn chain(&self) -> Chain {
        let mut chain = Chain::new().then(Decay {
            decay: self.weight_decay,
            vectors: true,
        });
        if self.momentum > 0.0 {
            chain = chain.then(self.momentum());
        }
        match self.manifold {
            Manifold::Free => chain.then(Dualize {
                norm: self.norm.clone(),
            }),
            _ => chain.then(self.manifold_step()),
        }
    }
}

/// Steepest descent under a [`Norm`] on a [`Manifold`], as a candle optimizer.
///
/// Per parameter with gradient `g`: momentum `m`, decay, then
/// - `Free`: `w ← w − η·dualize(m)` ([`dualize`]);
/// - `Sphere{r}`: `w ← r·(w − ηφ)/ρ(w − ηφ)`, `φ = sphere_direction(m, w)`;
/// - `SpectralSphere{r}`: `Φ = msign(M̂ + λΘ)`, `λ ← λ − η₂ tr(ΘᵀΦ)`,
///   `W ← r·(W − ηΦ)/‖W − ηΦ‖₂`;
/// - `Stiefel`: `Φ = msign(M̂ + WX)` (for a nearly square matrix, `n ≤ 2m`,
///   the top rows of `msign([M̂ + WX; μI])`, a smoothed dual: see
///   [`stiefel_direction`]), `X ← X − η₂(WᵀΦ + ΦᵀW)`,
///   `W ← msign(W − ηΦ)`,
///
/// with `M̂ = M/rms(σ(M))`. Same-shape matrices are processed as one batch.
/// It is the chain [`SteepestConfig::chain`]; state keys are
/// `<name>.momentum.buf`, `<name>.manifold.lambda` (scalar),
/// `<name>.manifold.theta_v` (`v₁` of `W`, warm start of the power iteration),
/// `<name>.manifold.x` (`k×k`, `k` the short side), and `<name>.decay.v` for
/// spectral weight decay. A step either applies to every parameter or (NaN
/// gradient, a bad rate, a retraction that fails) to none; only an error no
/// check can foresee (a device fault) leaves it partly applied, and the
/// error says so (see [`crate::optim`]).
///
/// Combinations that make no sense are refused at construction, naming the
/// parameter: the spectral norm or a matrix manifold on a vector, a wide
/// matrix on `Stiefel { transpose: false }`, a vector norm on a matrix
/// manifold, etc.
///
/// So on a model with biases or norm gains, `Steepest` under `Norm::Spectral`
/// or on a matrix manifold cannot take every parameter: route the matrices
/// to [`SteepestConfig::chain`] and the rest to
/// [`AdamWConfig::chain`](crate::AdamWConfig::chain) with a
/// [`Partition`](crate::optim::Partition), one driver for both (the README's
/// "Steepest descent under norms and on manifolds" shows it for the Stiefel
/// manifold, `tests/readme_snippets.rs` runs it).
#[derive(Debug)]
pub struct Steepest {
    driver: Driver,
    config: SteepestConfig,
}

single_chain_config!(
    SteepestConfig,
    "steepest",
    /// The manifold is the model's (its state has that manifold's fields).
    fn check_resumable(&self, stored: &Self) -> Result<()> {
        self.manifold
            .check_resumable(&stored.manifold, "checkpoint: manifold")
    }
);

alias!(Steepest, SteepestConfig, "Steepest");

impl Steepest {
    /// The tangent residual of the direction each parameter took in its last
    /// step, by name: `|tr(ΘᵀΦ)|` on the spectral sphere, `‖WᵀΦ + ΦᵀW‖_F` on
    /// the Stiefel manifold (`Φ` for the normalised gradient, so 0 means
    /// tangent and the scale is that of `‖Φ‖₂ = 1`). Empty for `Free` and
    /// `Sphere`, whose directions are tangent by construction (closed form or
    /// an f64 root solve).
    pub fn tangent_residuals(&self) -> Result<Vec<(String, f64)>> {
        let mut out = Vec::new();
        for v in self.driver.params() {
            let Some(s) = self.driver.state(&v.name, "manifold") else {
                continue;
            };
            let Some(s) = s.as_any().downcast_ref::<ManifoldState>() else {
                continue;
            };
            if let Some(r) = s.residual() {
                out.push((v.name.clone(), crate::device::host_f64_scalar(r)?));
            }
        }
        Ok(out)
    }
}
