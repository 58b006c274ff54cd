//! Weight decay: decoupled (`W ← W − ηλW`) and spectral (`W ← W − ηλ·W v₁v₁ᵀ`, docs/math.md §1).

use candle_core::{Tensor, Var};

use crate::error::{fail, Result};
use crate::linalg::{matrix_dims, TopSingular};

/// Power iterations used when a parameter has no stored `v₁` yet (first step,
/// or a parameter that had no gradient before). Later steps warm-start.
pub(crate) const COLD_START_ITERS: usize = 10;

/// The power iteration of same-shape matrices `ws`, each from its own state
/// vector `vs[i]`, which receives the new `v₁`: the warm ones (`warm[i]`, a
/// vector from an earlier step) with `iters` iterations, the cold ones (a
/// zero vector: the default start) with `max(iters, COLD_START_ITERS)`, in
/// at most two batched calls ([`crate::device::power_iteration_members`]).
/// `each(members, top)` gets each call's member indices and result (row `j`
/// of `top` is matrix `members[j]`).
pub(crate) fn warm_or_cold_power_iteration(
    ws: &[Tensor],
    vs: &[Var],
    warm: &[bool],
    iters: usize,
    mut each: impl FnMut(&[usize], &TopSingular) -> Result<()>,
) -> Result<()> {
    let (hot, cold): (Vec<usize>, Vec<usize>) = (0..ws.len()).partition(|&i| warm[i]);
    for (members, iters) in [(hot, iters), (cold, iters.max(COLD_START_ITERS))] {
        if members.is_empty() {
            continue;
        }
        let ws: Vec<Tensor> = members.iter().map(|&i| ws[i].clone()).collect();
        let vs: Vec<Var> = members.iter().map(|&i| vs[i].clone()).collect();
        let top = crate::device::power_iteration_members(&ws, &vs, iters)?;
        each(&members, &top)?;
    }
    Ok(())
}

/// Which weight decay an optimizer applies to its matrices.
///
/// Decay is decoupled (applied to the weights, not added to the gradient) and
/// uses the optimizer's current learning rate `η`. Vectors (biases, gains) get
/// no decay unless the optimizer is configured with `decay_vectors`; a vector is
/// a `1 × n` matrix, whose spectral decay is the decoupled one.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum WeightDecay {
    /// No weight decay.
    #[default]
    None,
    /// `W ← (1 − ηλ) W`: shrinks every singular value (AdamW's decay).
    Decoupled(f64),
    /// `W ← W − ηλ·W v₁v₁ᵀ`: shrinks only the top singular value,
    /// `σ₁ ← (1 − ηλ)σ₁`. `v₁` comes from `iters` power iterations per step,
    /// warm-started from the previous step's `v₁` (kept in the optimizer
    /// state); a matrix's cold start (its first step) uses `max(iters, 10)`.
    Spectral {
        /// The decay coefficient `λ`.
        lambda: f64,
        /// Power iterations per step (1 is the usual amortised choice).
        iters: usize,
    },
}

impl WeightDecay {
    /// Spectral decay with `lambda` and one warm-started power iteration per step.
    pub fn spectral(lambda: f64) -> Self {
        Self::Spectral { lambda, iters: 1 }
    }

    /// The coefficient `λ` (0 for `None`).
    pub fn lambda(&self) -> f64 {
        match *self {
            Self::None => 0.0,
            Self::Decoupled(l) | Self::Spectral { lambda: l, .. } => l,
        }
    }

    /// Checks that `λ ≥ 0` is finite and that spectral decay runs at least
    /// one power iteration; `who` names the optimizer field in errors.
    pub fn validate(&self, who: &str) -> Result<()> {
        let l = self.lambda();
        if !(l.is_finite() && l >= 0.0) {
            fail!(
                Config,
                who,
                "weight decay λ must be finite and ≥ 0, got {l}"
            );
        }
        if let Self::Spectral { iters: 0, .. } = self {
            fail!(
                Config,
                who,
                "spectral decay needs iters ≥ 1 (with 0, v₁ would never be refreshed)"
            );
        }
        Ok(())
    }
}

/// `W ← (1 − coeff)·W` with `coeff = ηλ`.
pub fn decoupled_decay(w: &Tensor, coeff: f64) -> Result<Tensor> {
    Ok((w * (1.0 - coeff))?)
}

/// `W ← W − coeff·σ₁u₁v₁ᵀ` with `coeff = ηλ`, for a matrix or a batch, given its
/// top singular triplet. Uses the vector of the side the power iteration ran
/// on: `W − coeff·(W v)vᵀ` when `n ≤ m`, `W − coeff·u(uᵀW)` when `n > m`.
/// With exact `u₁, v₁` this sets `σ₁ ← (1 − coeff)σ₁` and leaves every other
/// singular triplet unchanged.
pub fn spectral_decay(w: &Tensor, top: &TopSingular, coeff: f64) -> Result<Tensor> {
    let (m, n) = matrix_dims("spectral_decay: w", w)?;
    let batched = w.rank() == 3;
    let dt = w.dtype();
    let (u, v) = (top.u.to_dtype(dt)?, top.v.to_dtype(dt)?);
    // Column and row vectors: (.., k, 1) and (.., 1, k).
    let (ucol, vrow) = if batched {
        (u.unsqueeze(2)?, v.unsqueeze(1)?)
    } else {
        (u.unsqueeze(1)?, v.unsqueeze(0)?)
    };
    let rank_one = if n <= m {
        w.matmul(&vrow.t()?)?.matmul(&vrow)?
    } else {
        ucol.matmul(&ucol.t()?.matmul(w)?)?
    };
    Ok((w - (rank_one * coeff)?)?)
}
