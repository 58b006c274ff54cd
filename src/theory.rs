//! Convergence bounds of SGD for convex losses (docs/math.md §5), as functions.
//!
//! Setting: convex `L`, stochastic gradients with `E‖g‖² ≤ G²`, learning
//! rates `η_1 ≥ η_2 ≥ … ≥ η_T > 0` (non-increasing), `R = ‖θ_1 − θ*‖`,
//! SGD `θ_{t+1} = θ_t − η_t g_t`. The slices `lrs` below hold
//! `[η_1, …, η_T]` (so `lrs[t−1] = η_t`).
//!
//! - Averaged loss (and, by Jensen, the averaged iterate `θ̄_T = (1/T)Σθ_t`):
//!   `(1/T) Σ_t E[L(θ_t) − L*] ≤ R²/(2Tη_T) + (G²/(2T)) Σ_t η_t²/η_T`.
//! - Last iterate:
//!   `E[L(θ_T) − L*] ≤ R²/(2Tη_T) + (G²/2) Σ_{t=1}^{T} (η_t²/η_T) / max(1, T−t)`.
//!
//! Source: F. Orabona, "Last iterate of SGD converges (even in unbounded
//! domains)", 2020, in the simplified form of Su Jianlin's note (docs/math.md §5).

use crate::error::{fail, Result};

fn check_inputs(who: &str, lrs: &[f64], r: f64, g: f64) -> Result<()> {
    if lrs.is_empty() {
        fail!(Config, who, "lrs is empty (need T ≥ 1 learning rates)");
    }
    if !(r.is_finite() && r >= 0.0) {
        fail!(Config, who, "R must be finite and ≥ 0, got {r}");
    }
    if !(g.is_finite() && g >= 0.0) {
        fail!(Config, who, "G must be finite and ≥ 0, got {g}");
    }
    for (i, &eta) in lrs.iter().enumerate() {
        if !(eta.is_finite() && eta > 0.0) {
            fail!(Config, who, "lrs[{i}] must be finite and > 0, got {eta}");
        }
        if i > 0 && eta > lrs[i - 1] {
            fail!(
                Config,
                who,
                "the bound needs non-increasing rates, but lrs[{i}] = {eta} > lrs[{}] = {}",
                i - 1,
                lrs[i - 1]
            );
        }
    }
    Ok(())
}

/// docs/math.md §5's last-iterate bound:
/// `E[L(θ_T) − L*] ≤ R²/(2Tη_T) + (G²/2) Σ_{t=1}^{T} (η_t²/η_T) / max(1, T−t)`.
///
/// Errors on an empty `lrs`, a rate that is not finite and positive, rates
/// that increase, or `R`, `G` not finite and `≥ 0`.
pub fn last_iterate_bound(lrs: &[f64], r: f64, g: f64) -> Result<f64> {
    check_inputs("last_iterate_bound", lrs, r, g)?;
    let t_total = lrs.len();
    let eta_t = lrs[t_total - 1];
    let sum: f64 = lrs
        .iter()
        .enumerate()
        .map(|(i, &eta)| {
            let t = i + 1;
            (eta * eta / eta_t) / (t_total - t).max(1) as f64
        })
        .sum();
    Ok(r * r / (2.0 * t_total as f64 * eta_t) + 0.5 * g * g * sum)
}

/// docs/math.md §5's averaged-loss bound, which also bounds the averaged iterate:
/// `E[L(θ̄_T) − L*] ≤ (1/T) Σ_t E[L(θ_t) − L*] ≤ R²/(2Tη_T) + (G²/(2T)) Σ_t η_t²/η_T`.
///
/// Same input checks as [`last_iterate_bound`].
pub fn average_bound(lrs: &[f64], r: f64, g: f64) -> Result<f64> {
    check_inputs("average_bound", lrs, r, g)?;
    let t_total = lrs.len() as f64;
    let eta_t = lrs[lrs.len() - 1];
    let sum: f64 = lrs.iter().map(|&eta| eta * eta / eta_t).sum();
    Ok(r * r / (2.0 * t_total * eta_t) + g * g * sum / (2.0 * t_total))
}

/// The closed-form constant-rate last-iterate bound of docs/math.md §5:
/// `R²/(2Tη) + (G²η/2)(2 + ln T)`. It is an upper bound of
/// [`last_iterate_bound`] on `[η; T]`, whose exact value is
/// `R²/(2Tη) + (G²η/2)(1 + H_{T−1})` (`H_n` the harmonic number), since
/// `H_{T−1} ≤ 1 + ln T`.
pub fn constant_lr_last_iterate_bound(eta: f64, r: f64, g: f64, total_steps: usize) -> Result<f64> {
    if !(eta.is_finite() && eta > 0.0) {
        fail!(
            Config,
            "constant_lr_last_iterate_bound: eta",
            "must be finite and > 0, got {eta}"
        );
    }
    check_inputs("constant_lr_last_iterate_bound", &[eta], r, g)?;
    if total_steps == 0 {
        fail!(
            Config,
            "constant_lr_last_iterate_bound: total_steps",
            "must be ≥ 1"
        );
    }
    let t = total_steps as f64;
    Ok(r * r / (2.0 * t * eta) + 0.5 * g * g * eta * (2.0 + t.ln()))
}

/// The constant rate minimising [`constant_lr_last_iterate_bound`]:
/// `η = R / (G·√(T(2 + ln T)))`, which gives the bound
/// `R·G·√((2 + ln T)/T)`.
///
/// Errors unless `R > 0`, `G > 0` are finite and `T ≥ 1`.
pub fn optimal_constant_lr(r: f64, g: f64, total_steps: usize) -> Result<f64> {
    if !(r.is_finite() && r > 0.0) {
        fail!(
            Config,
            "optimal_constant_lr: R",
            "must be finite and > 0, got {r}"
        );
    }
    if !(g.is_finite() && g > 0.0) {
        fail!(
            Config,
            "optimal_constant_lr: G",
            "must be finite and > 0, got {g}"
        );
    }
    if total_steps == 0 {
        fail!(Config, "optimal_constant_lr: total_steps", "must be ≥ 1");
    }
    let t = total_steps as f64;
    Ok(r / (g * (t * (2.0 + t.ln())).sqrt()))
}

/// The right-hand side of docs/math.md §5's identity, which equals `q_T` for any
/// sequence `q = [q_1, …, q_T]`:
/// `q_T = (1/T) Σ_{t=1}^T q_t + Σ_{k=1}^{T−1} 1/(k(k+1)) Σ_{t=T−k}^{T} (q_t − q_{T−k})`.
/// Computed literally, in `O(T²)`. Returns 0 for an empty `q`.
pub fn last_iterate_identity_rhs(q: &[f64]) -> f64 {
    let t_total = q.len();
    if t_total == 0 {
        return 0.0;
    }
    let mean = q.iter().sum::<f64>() / t_total as f64;
    let mut tail = 0.0;
    for k in 1..t_total {
        // q_{T−k} is q[T−k−1] (1-based → 0-based); t runs T−k..=T.
        let base = q[t_total - k - 1];
        let inner: f64 = q[t_total - k - 1..].iter().map(|&qt| qt - base).sum();
        tail += inner / (k * (k + 1)) as f64;
    }
    mean + tail
}
