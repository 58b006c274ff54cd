//! Gradient-norm penalties and the input/parameter gradient inequality (docs/math.md §6).
//!
//! **Penalties.** Candle's autograd has no reliable double backward, so the
//! gradient of a penalised objective is computed with a finite-difference
//! Hessian–vector product (Zhao et al. 2022, "Penalizing Gradient Norm for
//! Efficiently Improving Generalization"): one extra forward/backward at a
//! point perturbed along the gradient.
//!
//! - [`param_grad_penalty`]: gradients w.r.t. `θ` of `L + ρ‖∇_θ L‖`
//!   ([`Penalty::Norm`]) or `L + ρ/2 ‖∇_θ L‖²` ([`Penalty::HalfSquared`]),
//!   using `∇_θ ½‖∇_θ L‖² = H g ≈ (∇_θ L(θ + h ĝ) − ∇_θ L(θ))·‖g‖/h` with
//!   `g = ∇_θ L`, `ĝ = g/‖g‖`.
//! - [`input_grad_penalty`]: gradients w.r.t. `θ` of `L + ρ‖∇_x L‖` or
//!   `L + ρ/2 ‖∇_x L‖²`, using the mixed derivative
//!   `∇_θ ½‖∇_x L‖² = (∂²L/∂θ∂x) g_x ≈ (∇_θ L(x + h ĝ_x) − ∇_θ L(x))·‖g_x‖/h`.
//!
//! Both return a [`GradStore`](candle_core::backprop::GradStore) that any
//! `candle_nn::Optimizer` can [`step`](candle_nn::Optimizer::step) with.
//!
//! **The inequality** (Dherin et al., "The Geometric Occam's Razor Implicit in
//! Deep Learning", arXiv 2111.15090). For an MLP ([`Mlp`])
//! `z⁽ᵗ⁺¹⁾ = W⁽ᵗ⁾ h⁽ᵗ⁾ + b⁽ᵗ⁾`, `h⁽ᵗ⁺¹⁾ = g⁽ᵗ⁾(z⁽ᵗ⁺¹⁾)`, `h⁽¹⁾ = x`, a scalar
//! `f(h⁽ˡ⁺¹⁾)` and `J_t = ∂h⁽ᵗ⁾/∂x`:
//!
//! ```text
//! ‖∇_x f‖² Σ_t (1 + ‖h⁽ᵗ⁾‖²) / (‖W⁽ᵗ⁾‖₂² ‖J_t‖₂²) ≤ ‖∇_θ f‖²
//! ```
//!
//! term by term: `‖∇_x f‖² ‖h⁽ᵗ⁾‖² / (‖W⁽ᵗ⁾‖₂² ‖J_t‖₂²) ≤ ‖∇_{W⁽ᵗ⁾} f‖_F²` and
//! `‖∇_x f‖² / (‖W⁽ᵗ⁾‖₂² ‖J_t‖₂²) ≤ ‖∇_{b⁽ᵗ⁾} f‖²`. [`gradient_inequality`]
//! computes every term ([`InequalityReport`]); [`gradient_terms`] gives the
//! underlying vectors and Jacobians.
//!
//! **Spectral norm regularisation** (Yoshida & Miyato 2017):
//! [`SpectralNormPenalty`] is the loss term `λ/2 Σ_W σ₁(W)²`, whose gradient
//! `λ σ₁u₁v₁ᵀ` (`= λ W v₁v₁ᵀ`) is the coupled counterpart of spectral weight
//! decay.

mod diagnostic;
mod input_grad;
mod param_grad;
mod spectral_norm;

pub use diagnostic::{
    gradient_inequality, gradient_terms, Activation, GradientTerms, InequalityReport, LayerTerms,
    Mlp,
};
pub use input_grad::input_grad_penalty;
pub use param_grad::{param_grad_penalty, FdStep, GradPenaltyConfig, PenalizedGrads, Penalty};
pub use spectral_norm::SpectralNormPenalty;
