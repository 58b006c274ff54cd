//! The input/parameter gradient inequality as a diagnostic (docs/math.md §6).

use candle_core::{Module, Tensor, Var};
use candle_nn::Linear;

use crate::device::{host_f64_scalar, wide_dtype};
use crate::error::{fail, Result};
use crate::linalg::power_iteration;

/// An elementwise activation `g⁽ᵗ⁾`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// `tanh z`.
    Tanh,
    /// `max(z, 0)` (candle's derivative at 0 is 1).
    Relu,
    /// The exact GELU `z Φ(z) = ½ z (1 + erf(z/√2))`, built from `erf` so that
    /// its backward is exact (candle's fused `gelu_erf` backward rounds
    /// `1/√(2π)` to 6 digits).
    Gelu,
    /// `z`.
    Identity,
}

impl Activation {
    /// Applies the activation elementwise.
    pub fn apply(&self, z: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Activation::Tanh => z.tanh()?,
            Activation::Relu => z.relu()?,
            Activation::Gelu => {
                let phi = ((z / std::f64::consts::SQRT_2)?.erf()? + 1.0)?;
                ((z * phi)? * 0.5)?
            }
            Activation::Identity => z.clone(),
        })
    }
}

/// A multilayer perceptron `h⁽ᵗ⁺¹⁾ = g⁽ᵗ⁾(W⁽ᵗ⁾ h⁽ᵗ⁾ + b⁽ᵗ⁾)`, `t = 1..l`: each
/// layer is a candle-nn [`Linear`] (weight `(out, in)`, computing `x Wᵀ + b`
/// on row vectors, which is `W h + b` on columns) followed by its activation
/// (use [`Activation::Identity`] after the last layer for logits).
#[derive(Clone, Debug)]
pub struct Mlp {
    layers: Vec<(Linear, Activation)>,
}

/// A layer's weight, optional bias and activation.
type Layer = (Tensor, Option<Tensor>, Activation);

impl Mlp {
    /// An MLP from its layers. Errors when there are no layers or when a
    /// layer's input width is not the previous layer's output width.
    pub fn new(layers: Vec<(Linear, Activation)>) -> Result<Self> {
        if layers.is_empty() {
            fail!(Config, "Mlp::new: layers", "expected at least one layer");
        }
        for (t, (lin, _)) in layers.iter().enumerate() {
            let (out, _) = lin.weight().dims2()?;
            if let Some(b) = lin.bias() {
                if b.dims() != [out] {
                    fail!(
                        Shape,
                        format!("Mlp::new: layers[{t}].bias"),
                        "expected shape [{out}], got {:?}",
                        b.dims()
                    );
                }
            }
            if t > 0 {
                let (prev_out, _) = layers[t - 1].0.weight().dims2()?;
                let (_, inp) = lin.weight().dims2()?;
                if inp != prev_out {
                    fail!(Shape, format!("Mlp::new: layers[{t}].weight"),
                        "input width {inp} does not match the previous layer's output width {prev_out}"
                    );
                }
            }
        }
        Ok(Self { layers })
    }

    /// The layers.
    pub fn layers(&self) -> &[(Linear, Activation)] {
        &self.layers
    }

    /// The input width `d` (columns of `W⁽¹⁾`).
    pub fn input_dim(&self) -> usize {
        self.layers[0].0.weight().dim(1).unwrap_or(0)
    }

    /// All layer inputs and the output for a batch `x` of shape `(b, d)`:
    /// `[h⁽¹⁾ = x, h⁽²⁾, …, h⁽ˡ⁺¹⁾]`, each `(b, width)`.
    pub fn forward_all(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        forward_all(&self.params(), x)
    }

    fn params(&self) -> Vec<Layer> {
        self.layers
            .iter()
            .map(|(l, a)| (l.weight().clone(), l.bias().cloned(), *a))
            .collect()
    }

    /// The Jacobians `J_t = ∂h⁽ᵗ⁾/∂x` at a single input `x` (`(d,)` or
    /// `(1, d)`), for `t = 1..l+1` (the last is the Jacobian of the output):
    /// `J_t` has shape `(width_t, d)`, `J_1 = I`.
    ///
    /// Computed by backprop in one pass: `x` is replicated into a batch with
    /// one row per coordinate of every `h⁽ᵗ⁾` (`t ≥ 2`); row `i` of block `t`
    /// back-propagates `h⁽ᵗ⁾ᵢ`, so its input gradient is row `i` of `J_t`
    /// (the rows of an MLP batch do not interact).
    pub fn input_jacobians(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let x = single_input(self, x)?;
        jacobians(&self.params(), &x)
    }
}

impl Module for Mlp {
    /// `h⁽ˡ⁺¹⁾` for `x` of shape `(b, d)`.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let mut hs = self.forward_all(x)?;
        Ok(hs.pop().expect("at least one layer"))
    }
}

fn forward_all(layers: &[Layer], x: &Tensor) -> Result<Vec<Tensor>> {
    if x.rank() != 2 {
        fail!(
            Shape,
            "Mlp: x",
            "expected a batch (b, d), got shape {:?}",
            x.dims()
        );
    }
    let mut hs = vec![x.clone()];
    for (w, b, act) in layers {
        let h = hs.last().expect("non-empty");
        let mut z = h.matmul(&w.t()?)?;
        if let Some(b) = b {
            z = z.broadcast_add(b)?;
        }
        hs.push(act.apply(&z)?);
    }
    Ok(hs)
}

/// `x` as `(1, d)`, checked against the MLP's input width.
fn single_input(mlp: &Mlp, x: &Tensor) -> Result<Tensor> {
    let d = mlp.input_dim();
    let x = match x.dims() {
        [n] if *n == d => x.unsqueeze(0)?,
        [1, n] if *n == d => x.clone(),
        dims => fail!(
            Shape,
            "gradient_inequality: x",
            "expected one input of shape [{d}] or [1, {d}], got {dims:?}"
        ),
    };
    Ok(x)
}

fn jacobians(layers: &[Layer], x: &Tensor) -> Result<Vec<Tensor>> {
    let d = x.dim(1)?;
    let widths: Vec<usize> = layers
        .iter()
        .map(|(w, _, _)| w.dim(0))
        .collect::<candle_core::Result<_>>()?;
    let total: usize = widths.iter().sum();
    let xs = Var::from_tensor(&x.detach().broadcast_as((total, d))?.contiguous()?)?;
    let hs = forward_all(layers, xs.as_tensor())?;
    // Σ over blocks t of Σ_i h⁽ᵗ⁾[offset_t + i, i].
    let mut selected = Vec::with_capacity(widths.len());
    let mut offset = 0;
    for (h, &n) in hs[1..].iter().zip(&widths) {
        let block = h.narrow(0, offset, n)?;
        let eye = Tensor::eye(n, h.dtype(), h.device())?;
        selected.push((block * eye)?.sum_all()?);
        offset += n;
    }
    let s = Tensor::stack(&selected, 0)?.sum_all()?;
    let grads = s.backward()?;
    let g = match grads.get(xs.as_tensor()) {
        Some(g) => g.detach(),
        None => xs.as_tensor().zeros_like()?,
    };
    let mut out = vec![Tensor::eye(d, x.dtype(), x.device())?];
    let mut offset = 0;
    for &n in &widths {
        out.push(g.narrow(0, offset, n)?);
        offset += n;
    }
    Ok(out)
}

/// The vectors and matrices the inequality is made of, at one input `x`.
#[derive(Clone, Debug)]
pub struct GradientTerms {
    /// `f(h⁽ˡ⁺¹⁾)`.
    pub value: f64,
    /// `∇_x f`, shape `(d,)`.
    pub grad_x: Tensor,
    /// `h⁽ᵗ⁾`, `t = 1..l`, each `(width_t,)` (`h⁽¹⁾ = x`).
    pub h: Vec<Tensor>,
    /// `J_t = ∂h⁽ᵗ⁾/∂x`, `t = 1..l`, each `(width_t, d)` (`J_1 = I`).
    pub jacobians: Vec<Tensor>,
    /// `∇_{W⁽ᵗ⁾} f`, `t = 1..l`, each the weight's shape `(out, in)`.
    pub grad_weights: Vec<Tensor>,
    /// `∇_{b⁽ᵗ⁾} f`, `t = 1..l` (`None` for a layer without bias).
    pub grad_biases: Vec<Option<Tensor>>,
}

/// `∇_x f`, `h⁽ᵗ⁾`, `J_t`, `∇_{W⁽ᵗ⁾} f`, `∇_{b⁽ᵗ⁾} f` at one input `x`
/// (`(d,)` or `(1, d)`), where `f` maps the MLP output `h⁽ˡ⁺¹⁾` (shape
/// `(1, out)`) to a scalar (any shape with one element).
///
/// One forward/backward with fresh copies of the weights (the MLP's own
/// tensors need not be variables), plus one for the Jacobians
/// ([`Mlp::input_jacobians`]). Errors when `f` does not give one element or
/// gives NaN/Inf.
pub fn gradient_terms<F>(mlp: &Mlp, x: &Tensor, f: F) -> Result<GradientTerms>
where
    F: Fn(&Tensor) -> candle_core::Result<Tensor>,
{
    let x = single_input(mlp, x)?;
    let xv = Var::from_tensor(&x.detach())?;
    let mut layers = Vec::with_capacity(mlp.layers.len());
    let mut vars = Vec::with_capacity(mlp.layers.len());
    for (lin, act) in &mlp.layers {
        let w = Var::from_tensor(&lin.weight().detach())?;
        let b = lin
            .bias()
            .map(|b| Var::from_tensor(&b.detach()))
            .transpose()?;
        layers.push((
            w.as_tensor().clone(),
            b.as_ref().map(|b| b.as_tensor().clone()),
            *act,
        ));
        vars.push((w, b));
    }
    let hs = forward_all(&layers, xv.as_tensor())?;
    let out = hs.last().expect("non-empty");
    let fx = f(out)?;
    if fx.elem_count() != 1 {
        fail!(
            Shape,
            "gradient_terms: f",
            "expected a scalar (one element), got shape {:?}",
            fx.dims()
        );
    }
    let fx = fx.flatten_all()?.sum_all()?;
    let value = host_f64_scalar(&fx)?;
    if !value.is_finite() {
        fail!(Numerical, "gradient_terms: f", "f(x) is {value}");
    }
    let grads = fx.backward()?;
    let grad_or_zero = |t: &Tensor| -> Result<Tensor> {
        match grads.get(t) {
            Some(g) => Ok(g.detach()),
            None => Ok(t.zeros_like()?),
        }
    };
    let grad_x = grad_or_zero(xv.as_tensor())?.squeeze(0)?;
    let mut grad_weights = Vec::with_capacity(vars.len());
    let mut grad_biases = Vec::with_capacity(vars.len());
    for (w, b) in &vars {
        grad_weights.push(grad_or_zero(w.as_tensor())?);
        grad_biases.push(
            b.as_ref()
                .map(|b| grad_or_zero(b.as_tensor()))
                .transpose()?,
        );
    }
    let l = mlp.layers.len();
    let h = hs[..l]
        .iter()
        .map(|h| h.squeeze(0))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let mut jacobians = jacobians(&mlp.params(), &x)?;
    jacobians.truncate(l);
    Ok(GradientTerms {
        value,
        grad_x,
        h,
        jacobians,
        grad_weights,
        grad_biases,
    })
}

/// Both sides of the inequality for one layer `t`.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerTerms {
    /// `‖h⁽ᵗ⁾‖²`.
    pub h_norm_sq: f64,
    /// `‖W⁽ᵗ⁾‖₂` (power iteration).
    pub weight_norm: f64,
    /// `‖J_t‖₂` (power iteration on the explicit Jacobian; 1 for `t = 1`).
    pub jacobian_norm: f64,
    /// `‖∇_{W⁽ᵗ⁾} f‖_F²`: the weight term's right-hand side.
    pub grad_weight_sq: f64,
    /// `‖∇_{b⁽ᵗ⁾} f‖²`: the bias term's right-hand side (`None` without bias).
    pub grad_bias_sq: Option<f64>,
    /// `‖∇_x f‖² ‖h⁽ᵗ⁾‖² / (‖W⁽ᵗ⁾‖₂² ‖J_t‖₂²)`: the weight term's left-hand side.
    pub weight_lhs: f64,
    /// `‖∇_x f‖² / (‖W⁽ᵗ⁾‖₂² ‖J_t‖₂²)`: the bias term's left-hand side
    /// (`None` without bias).
    pub bias_lhs: Option<f64>,
}

impl LayerTerms {
    /// The layer's left-hand side: `weight_lhs + bias_lhs`.
    pub fn lhs(&self) -> f64 {
        self.weight_lhs + self.bias_lhs.unwrap_or(0.0)
    }

    /// The layer's right-hand side: `‖∇_W f‖_F² + ‖∇_b f‖²`.
    pub fn rhs(&self) -> f64 {
        self.grad_weight_sq + self.grad_bias_sq.unwrap_or(0.0)
    }

    /// Whether both terms satisfy `lhs ≤ rhs·(1 + rel_tol) + abs_tol`.
    pub fn holds(&self, rel_tol: f64, abs_tol: f64) -> bool {
        let ok = |lhs: f64, rhs: f64| lhs <= rhs * (1.0 + rel_tol) + abs_tol;
        ok(self.weight_lhs, self.grad_weight_sq)
            && match (self.bias_lhs, self.grad_bias_sq) {
                (Some(l), Some(r)) => ok(l, r),
                _ => true,
            }
    }
}

/// Every term of the inequality at one input.
#[derive(Clone, Debug, PartialEq)]
pub struct InequalityReport {
    /// `f(h⁽ˡ⁺¹⁾)`.
    pub value: f64,
    /// `‖∇_x f‖²`.
    pub grad_x_sq: f64,
    /// Per layer `t = 1..l`.
    pub layers: Vec<LayerTerms>,
}

impl InequalityReport {
    /// The left-hand side `‖∇_x f‖² Σ_t (1 + ‖h⁽ᵗ⁾‖²) / (‖W⁽ᵗ⁾‖₂² ‖J_t‖₂²)`
    /// (layers without bias contribute only their `‖h⁽ᵗ⁾‖²` part).
    pub fn lhs(&self) -> f64 {
        self.layers.iter().map(LayerTerms::lhs).sum()
    }

    /// The right-hand side `‖∇_θ f‖² = Σ_t ‖∇_{W⁽ᵗ⁾} f‖_F² + ‖∇_{b⁽ᵗ⁾} f‖²`.
    pub fn rhs(&self) -> f64 {
        self.layers.iter().map(LayerTerms::rhs).sum()
    }

    /// Whether every term of every layer holds (see [`LayerTerms::holds`]).
    pub fn holds(&self, rel_tol: f64, abs_tol: f64) -> bool {
        self.layers.iter().all(|l| l.holds(rel_tol, abs_tol))
    }
}

/// Computes both sides of the inequality, per layer and in total, at one
/// input `x` (`(d,)` or `(1, d)`) for the scalar `f` of the MLP output (see
/// [`gradient_terms`]).
///
/// `‖W⁽ᵗ⁾‖₂` and `‖J_t‖₂` come from [`power_iteration`] with `power_iters`
/// iterations (a few dozen suffice for small layers; power iteration
/// approaches `σ₁` from below, so too few iterations overstate the left-hand
/// side; 0 is refused). When `‖W⁽ᵗ⁾‖₂ ‖J_t‖₂ = 0`, then `∇_x f = J_tᵀ W⁽ᵗ⁾ᵀ ∇_{z⁽ᵗ⁺¹⁾} f = 0`
/// and the layer's left-hand terms are defined as 0.
pub fn gradient_inequality<F>(
    mlp: &Mlp,
    x: &Tensor,
    f: F,
    power_iters: usize,
) -> Result<InequalityReport>
where
    F: Fn(&Tensor) -> candle_core::Result<Tensor>,
{
    if power_iters == 0 {
        // σ would be the start vector's Rayleigh quotient: a guess, not σ₁.
        fail!(
            Config,
            "gradient_inequality: power_iters",
            "must be ≥ 1 (a few dozen for small layers)"
        );
    }
    let terms = gradient_terms(mlp, x, f)?;
    let sq = |t: &Tensor| -> Result<f64> {
        Ok(host_f64_scalar(
            &t.to_dtype(wide_dtype(t.device()))?.sqr()?.sum_all()?,
        )?)
    };
    let sigma = |t: &Tensor| -> Result<f64> {
        Ok(host_f64_scalar(
            &power_iteration(t, None, power_iters)?.sigma,
        )?)
    };
    let grad_x_sq = sq(&terms.grad_x)?;
    let mut layers = Vec::with_capacity(terms.h.len());
    for (t, (lin, _)) in mlp.layers.iter().enumerate() {
        let h_norm_sq = sq(&terms.h[t])?;
        let weight_norm = sigma(lin.weight())?;
        let jacobian_norm = if t == 0 {
            1.0
        } else {
            sigma(&terms.jacobians[t])?
        };
        let grad_weight_sq = sq(&terms.grad_weights[t])?;
        let grad_bias_sq = terms.grad_biases[t].as_ref().map(sq).transpose()?;
        let denom = (weight_norm * jacobian_norm).powi(2);
        let ratio = if denom > 0.0 { grad_x_sq / denom } else { 0.0 };
        layers.push(LayerTerms {
            h_norm_sq,
            weight_norm,
            jacobian_norm,
            grad_weight_sq,
            grad_bias_sq,
            weight_lhs: ratio * h_norm_sq,
            bias_lhs: grad_bias_sq.map(|_| ratio),
        });
    }
    Ok(InequalityReport {
        value: terms.value,
        grad_x_sq,
        layers,
    })
}
