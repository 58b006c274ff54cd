//! Spectral norm regularisation (Yoshida & Miyato 2017): the penalty
//! `λ/2 Σ_W σ₁(W)²` added to the loss (docs/math.md §1, "the coupled form").
//!
//! Its gradient is `λ σ₁ u₁ v₁ᵀ` (`= λ W v₁v₁ᵀ`), the term spectral weight decay
//! ([`crate::WeightDecay::Spectral`]) subtracts from the weights directly. As
//! a loss term it goes through the optimizer: with SGD the two are the same
//! step; with Adam the penalty's gradient is rescaled by the second moments
//! like any other (the difference between L2 regularisation and AdamW's
//! decoupled decay).
//!
//! `σ₁` is differentiated as Yoshida & Miyato do: `u₁, v₁` come from power
//! iteration on the detached weights, warm-started from the previous call,
//! and the loss term is `λ/2 (u₁ᵀ W v₁)²`, whose gradient with `u₁, v₁` held
//! fixed is `λ (u₁ᵀWv₁) u₁v₁ᵀ`. Only first-order autograd is used.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{host_copy, read_slots, Header, OptimizerState, HEADER_KEY};
use crate::decay::warm_or_cold_power_iteration;
use crate::device::{host_f64, math_dtype};
use crate::error::{fail, Error, Result};
use crate::params::{check_params, largest_finite, matrix_view, varmap_vars, NamedVar};

/// The checkpoint kind of a [`SpectralNormPenalty`].
const KIND: &str = "spectral_norm_penalty";
/// The checkpoint slot of a matrix's `v₁` estimate.
const V: &str = "v";

/// The spectral norm penalty `λ/2 Σ_W σ₁(W)²` over a model's weight
/// matrices (Yoshida & Miyato 2017, "Spectral Norm Regularization for
/// Improving the Generalizability of Deep Learning").
///
/// Each call runs `iters` power iterations per matrix (warm-started from
/// the previous call's `v₁`; a matrix's first call runs `max(iters, 10)`),
/// batching matrices of one shape, dtype and device. [`loss`](Self::loss)
/// then returns the penalty as a differentiable scalar, to add to the loss
/// before `backward`; [`add_to_grads`](Self::add_to_grads) instead adds its
/// gradient to the `GradStore` after `backward` (the same step, in a third
/// of the time: no graph). A parameter of rank > 2 is penalised through its matrix view
/// `(d₀, d₁·d₂·…)` (a conv kernel `(out, in, kh, kw)` as `(out, in·kh·kw)`).
/// The matrices must share one device (the penalty is one scalar).
///
/// ```
/// # fn main() -> steepest::Result<()> {
/// use candle_core::{DType, Device, Tensor};
/// use candle_nn::{Module, Optimizer, VarBuilder, VarMap};
/// use steepest::penalty::SpectralNormPenalty;
///
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
/// let layer = candle_nn::linear(4, 3, vb.pp("fc"))?;
/// let mut penalty = SpectralNormPenalty::from_varmap(&varmap, 1e-2)?;
/// let mut opt = candle_nn::SGD::new(varmap.all_vars(), 0.1)?;
///
/// let x = Tensor::ones((2, 4), DType::F32, &Device::Cpu)?;
/// let loss = layer.forward(&x)?.sqr()?.mean_all()?;
/// opt.backward_step(&(loss + penalty.loss()?)?)?;
/// assert_eq!(penalty.sigmas().len(), 1); // fc.weight (the bias is no matrix)
///
/// // The same gradient without the penalty in the graph (faster):
/// let loss = layer.forward(&x)?.sqr()?.mean_all()?;
/// let mut grads = loss.backward()?;
/// let value = penalty.add_to_grads(&mut grads)?;
/// opt.step(&grads)?;
/// assert!(value > 0.0);
/// # Ok(())
/// # }
/// ```
#[derive(Debug)]
pub struct SpectralNormPenalty {
    vars: Vec<NamedVar>,
    lambda: f64,
    iters: usize,
    /// Each matrix's `v₁` estimate (math dtype, on its device), once it has one.
    v: Vec<Option<Tensor>>,
    /// `σ₁` of each matrix at the last [`loss`](Self::loss) or
    /// [`add_to_grads`](Self::add_to_grads) call.
    sigmas: Vec<f64>,
}

/// What [`SpectralNormPenalty::refresh`] computed, not yet kept.
struct Fresh {
    /// `(u₁, v₁)` of each matrix (math dtype).
    pairs: Vec<(Tensor, Tensor)>,
    /// The state vectors holding each new `v₁`.
    new_v: Vec<Var>,
    /// `σ₁` of each matrix.
    sigmas: Vec<f64>,
}

/// The header body of a [`SpectralNormPenalty`] checkpoint.
#[derive(Debug, Serialize, Deserialize)]
struct PenaltyBody {
    lambda: f64,
    iters: usize,
}

fn check_lambda(lambda: f64) -> Result<()> {
    if !(lambda.is_finite() && lambda >= 0.0) {
        fail!(
            Config,
            "SpectralNormPenalty.lambda",
            "λ must be finite and ≥ 0, got {lambda}"
        );
    }
    Ok(())
}

fn check_iters(iters: usize) -> Result<()> {
    if iters == 0 {
        fail!(
            Config,
            "SpectralNormPenalty.iters",
            "needs at least one power iteration per call (with 0, v₁ would never be refreshed)"
        );
    }
    Ok(())
}

impl SpectralNormPenalty {
    /// The penalty over the matrices of `varmap` (its float variables of
    /// rank ≥ 2, by name; biases and gains are left out), with one power
    /// iteration per call. Errors when the `VarMap` holds no matrix.
    pub fn from_varmap(varmap: &VarMap, lambda: f64) -> Result<Self> {
        let vars: Vec<NamedVar> = varmap_vars(varmap)?
            .into_iter()
            .filter(|nv| nv.var.rank() >= 2)
            .collect();
        if vars.is_empty() {
            fail!(
                Config,
                "varmap",
                "the VarMap holds no matrix (no float variable of rank ≥ 2) to penalise"
            );
        }
        Self::from_named(vars, lambda)
    }

    /// The penalty over explicitly named matrices (at least one; each of
    /// rank ≥ 2 and float), with one power iteration per call.
    pub fn from_named(vars: Vec<NamedVar>, lambda: f64) -> Result<Self> {
        check_lambda(lambda)?;
        if vars.is_empty() {
            fail!(
                Config,
                "SpectralNormPenalty",
                "no matrices to penalise (build the penalty after the model)"
            );
        }
        check_params(&vars)?;
        let first = vars[0].var.device();
        for nv in &vars {
            if !nv.var.device().same_device(first) {
                fail!(
                    Device,
                    nv.name,
                    "is on {:?} but `{}` on {:?}: the penalty's matrices must share one device",
                    nv.var.device().location(),
                    vars[0].name,
                    first.location()
                );
            }
            match matrix_view(nv.var.dims()) {
                Some((m, n)) if m > 0 && n > 0 => {}
                Some(_) => fail!(Shape, nv.name, "empty matrix {:?}", nv.var.dims()),
                None => fail!(
                    Shape,
                    nv.name,
                    "the spectral norm penalty takes matrices (rank ≥ 2), got shape {:?}",
                    nv.var.dims()
                ),
            }
        }
        let k = vars.len();
        Ok(Self {
            vars,
            lambda,
            iters: 1,
            v: vec![None; k],
            sigmas: Vec::new(),
        })
    }

    /// Runs `iters` (≥ 1) power iterations per call instead of one.
    pub fn with_iters(mut self, iters: usize) -> Result<Self> {
        check_iters(iters)?;
        self.iters = iters;
        Ok(self)
    }

    /// The coefficient `λ`.
    pub fn lambda(&self) -> f64 {
        self.lambda
    }

    /// Sets `λ` (finite, ≥ 0), e.g. from a schedule.
    pub fn set_lambda(&mut self, lambda: f64) -> Result<()> {
        check_lambda(lambda)?;
        self.lambda = lambda;
        Ok(())
    }

    /// Power iterations per call.
    pub fn iters(&self) -> usize {
        self.iters
    }

    /// The penalised matrices' names, in order.
    pub fn names(&self) -> Vec<&str> {
        self.vars.iter().map(|nv| nv.name.as_str()).collect()
    }

    /// `(name, σ₁)` of each matrix as estimated by the last
    /// [`loss`](Self::loss) or [`add_to_grads`](Self::add_to_grads) call;
    /// empty before the first (and after a load).
    pub fn sigmas(&self) -> Vec<(&str, f64)> {
        self.vars
            .iter()
            .zip(&self.sigmas)
            .map(|(nv, &s)| (nv.name.as_str(), s))
            .collect()
    }

    /// `λ/2 Σ_W (u₁ᵀ W v₁)²`, a scalar differentiable in every matrix `W`
    /// (its gradient is `λ σ₁ u₁v₁ᵀ`), after refreshing each `u₁, v₁` by
    /// power iteration. The scalar is f32, or f64 when a matrix is f64.
    ///
    /// Reads the `σ₁` back to the host (one synchronisation per call) to
    /// refuse non-finite weights: an [`Error::Numerical`] naming the first
    /// matrix whose `σ₁` is NaN or infinite, or the largest when the sum of
    /// `σ₁²` overflows the scalar's dtype, with no `v₁` estimate changed.
    ///
    /// Candle's backward of the term also computes gradients for `u₁` and
    /// `v₁`, which nothing uses (an extra read of each `W`):
    /// [`add_to_grads`](Self::add_to_grads) adds the same gradient without
    /// the graph, in about a third of the time (BENCHMARKS.md).
    pub fn loss(&mut self) -> Result<Tensor> {
        let out_dt = self.scalar_dtype();
        let fresh = self.refresh(out_dt)?;
        let mut terms = Vec::with_capacity(self.vars.len());
        for (i, (u, v)) in fresh.pairs.iter().enumerate() {
            let (m, n) = (u.dim(0)?, v.dim(0)?);
            // Held fixed: on candle's generic path `u`, `v` come from ops
            // on the state variables, and backward would walk them.
            let (u, v) = (u.detach().reshape((1, m))?, v.detach().reshape((n, 1))?);
            let w = self.matrix(i)?.to_dtype(u.dtype())?;
            let sigma = u.matmul(&w)?.matmul(&v)?.reshape(())?.to_dtype(out_dt)?;
            terms.push(sigma.sqr()?);
        }
        let total = Tensor::stack(&terms, 0)?.sum_all()?;
        self.commit(fresh);
        Ok(total.affine(self.lambda / 2.0, 0.0)?)
    }

    /// Adds the penalty's gradient `λ σ₁ u₁v₁ᵀ` to each matrix's gradient
    /// in `grads` (inserting it for a matrix that has none), after
    /// refreshing each `u₁, v₁` by power iteration, and returns the
    /// penalty's value `λ/2 Σ σ₁²`: the gradient of `loss + penalty`
    /// without putting the penalty in the graph (one rank-one product and
    /// one add per matrix). Call it between `backward` and the optimizer's
    /// `step`. Each sum is taken in f32 (f64 for f64 matrices) and rounded
    /// to the gradient's dtype: the matrix's, or f32 for a bf16/f16 matrix
    /// (the unscaled gradients of [`LossScaler`](crate::loss_scale::LossScaler)).
    /// With a loss scaler the store holds the *scaled* gradients until
    /// they are unscaled: call
    /// [`unscale`](crate::loss_scale::LossScaler::unscale) first, then this,
    /// then the scaler's `step` (which unscales nothing twice); added before,
    /// the penalty's gradient would be divided by the scale.
    ///
    /// Refuses what [`loss`](Self::loss) refuses (non-finite weights, an
    /// overflowing value), a rank-one term beyond the range of its
    /// gradient's dtype (`λσ₁`, its largest entry, in an f16 gradient, say),
    /// and a gradient of the wrong shape or dtype for its matrix, changing
    /// neither `grads` nor any `v₁` estimate.
    pub fn add_to_grads(&mut self, grads: &mut GradStore) -> Result<f64> {
        let fresh = self.refresh(self.scalar_dtype())?;
        let mut sums = Vec::with_capacity(self.vars.len());
        for ((nv, (u, v)), sigma) in self.vars.iter().zip(&fresh.pairs).zip(&fresh.sigmas) {
            let w = nv.var.as_tensor();
            let g = grads.get(w);
            // An f32 gradient of a bf16/f16 matrix (unscaled, for a master
            // weight) stays f32; any other gradient has the matrix's dtype.
            let wide = matches!(w.dtype(), DType::BF16 | DType::F16)
                && g.is_some_and(|g| g.dtype() == DType::F32);
            let out_dt = if wide { DType::F32 } else { w.dtype() };
            let scale = self.lambda * sigma;
            if scale > largest_finite(out_dt) {
                fail!(
                    Numerical,
                    nv.name,
                    "λσ₁ = {scale:e}, the largest entry of the penalty's gradient, overflows {:?}",
                    out_dt
                );
            }
            // (λσ₁u₁) v₁ᵀ: one pass over the matrix.
            let rank_one = u
                .affine(scale, 0.0)?
                .unsqueeze(1)?
                .broadcast_mul(&v.unsqueeze(0)?)?
                .reshape(w.shape())?;
            let sum = match g {
                Some(g) if g.dims() != w.dims() || g.dtype() != out_dt => fail!(
                    Shape,
                    nv.name,
                    "gradient of shape {:?} dtype {:?}, the matrix is {:?} {:?}",
                    g.dims(),
                    g.dtype(),
                    w.dims(),
                    w.dtype()
                ),
                Some(g) => (g.to_dtype(rank_one.dtype())? + rank_one)?,
                None => rank_one,
            };
            sums.push(sum.to_dtype(out_dt)?);
        }
        for (nv, sum) in self.vars.iter().zip(sums) {
            grads.insert(nv.var.as_tensor(), sum);
        }
        let value = self.lambda / 2.0 * fresh.sigmas.iter().map(|s| s * s).sum::<f64>();
        self.commit(fresh);
        Ok(value)
    }

    /// The penalty's scalar dtype: f64 when a matrix is f64, else f32.
    fn scalar_dtype(&self) -> DType {
        if self.vars.iter().any(|nv| nv.var.dtype() == DType::F64) {
            DType::F64
        } else {
            DType::F32
        }
    }

    /// Runs the power iterations (batched by [`power_groups`](Self::power_groups))
    /// into fresh vectors and reads every `σ₁` back, refusing non-finite
    /// ones and a sum of squares that overflows `out_dt`; changes nothing.
    fn refresh(&self, out_dt: DType) -> Result<Fresh> {
        let k = self.vars.len();
        let mut new_v: Vec<Option<Var>> = vec![None; k];
        let mut pairs: Vec<Option<(Tensor, Tensor)>> = vec![None; k];
        let mut sig: Vec<Option<Tensor>> = vec![None; k];
        for group in self.power_groups() {
            let first = &self.vars[group[0]].var;
            let (_, n) = matrix_view(first.dims()).expect("checked at construction");
            let (dt, dev) = (math_dtype(first.dtype()), first.device().clone());
            let ws = group
                .iter()
                .map(|&i| self.matrix(i).map(|w| w.detach()))
                .collect::<Result<Vec<_>>>()?;
            let vs = group
                .iter()
                .map(|&i| match &self.v[i] {
                    // A copy (`from_tensor` of a non-variable tensor makes
                    // one): the power iteration writes into these, and the
                    // stored vectors must survive a failed call.
                    Some(v) => Ok(Var::from_tensor(&v.detach())?),
                    None => Ok(Var::zeros(n, dt, &dev)?),
                })
                .collect::<Result<Vec<_>>>()?;
            let warm: Vec<bool> = group.iter().map(|&i| self.v[i].is_some()).collect();
            warm_or_cold_power_iteration(&ws, &vs, &warm, self.iters, |members, top| {
                for (j, &k) in members.iter().enumerate() {
                    let i = group[k];
                    pairs[i] = Some((top.u.get(j)?, top.v.get(j)?));
                    sig[i] = Some(top.sigma.get(j)?.to_dtype(out_dt)?);
                    new_v[i] = Some(vs[k].clone());
                }
                Ok(())
            })?;
        }
        let sig: Vec<Tensor> = sig.into_iter().map(|s| s.expect("every matrix")).collect();
        let sigmas = host_f64(&Tensor::stack(&sig, 0)?)?;
        if let Some(i) = sigmas.iter().position(|s| !s.is_finite()) {
            fail!(
                Numerical,
                self.vars[i].name,
                "σ₁ = {}: the matrix holds NaN or Inf (or its products overflow); \
                 the spectral norm penalty is undefined",
                sigmas[i]
            );
        }
        // `loss` forms Σσ₁² in `out_dt`, then scales it by λ/2: both must
        // fit. (Every σ₁ is finite here, so the sum is finite or +∞.)
        let sum_sq: f64 = sigmas.iter().map(|s| s * s).sum();
        if sum_sq.max(sum_sq * self.lambda / 2.0) > largest_finite(out_dt) {
            let i = (0..sigmas.len())
                .max_by(|&a, &b| sigmas[a].total_cmp(&sigmas[b]))
                .expect("at least one matrix");
            fail!(
                Numerical,
                self.vars[i].name,
                "σ₁ = {:e}: Σσ₁² = {sum_sq:e} (times λ/2 = {}) overflows the penalty's {out_dt:?}",
                sigmas[i],
                self.lambda / 2.0
            );
        }
        Ok(Fresh {
            pairs: pairs
                .into_iter()
                .map(|p| p.expect("every matrix"))
                .collect(),
            new_v: new_v
                .into_iter()
                .map(|v| v.expect("every matrix"))
                .collect(),
            sigmas,
        })
    }

    /// Keeps the refreshed vectors and `σ₁`.
    fn commit(&mut self, fresh: Fresh) {
        for (slot, v) in self.v.iter_mut().zip(fresh.new_v) {
            *slot = Some(v.as_tensor().clone());
        }
        self.sigmas = fresh.sigmas;
    }

    /// Matrix `i` in its matrix view, tracked by autograd.
    fn matrix(&self, i: usize) -> Result<Tensor> {
        let w = self.vars[i].var.as_tensor();
        let (m, n) = matrix_view(w.dims()).expect("checked at construction");
        Ok(w.reshape((m, n))?)
    }

    /// The matrices grouped for batched power iterations: by shape, dtype
    /// and device (each group then runs its warm members, with a `v₁`
    /// estimate, apart from its cold ones).
    fn power_groups(&self) -> Vec<Vec<usize>> {
        let mut groups: Vec<Vec<usize>> = Vec::new();
        for (i, nv) in self.vars.iter().enumerate() {
            let same = |j: usize| {
                let o = &self.vars[j].var;
                matrix_view(o.dims()) == matrix_view(nv.var.dims())
                    && o.dtype() == nv.var.dtype()
                    && o.device().same_device(nv.var.device())
            };
            match groups.iter_mut().find(|g| same(g[0])) {
                Some(g) => g.push(i),
                None => groups.push(vec![i]),
            }
        }
        groups
    }
}

impl OptimizerState for SpectralNormPenalty {
    /// Keys: `"<matrix>.v"` (its `v₁` estimate, once it has one) and the
    /// header (`λ`, iterations per call).
    fn state_dict(&self) -> Result<HashMap<String, Tensor>> {
        let body = PenaltyBody {
            lambda: self.lambda,
            iters: self.iters,
        };
        let header = Header::new(
            KIND,
            self.vars.iter().map(|nv| nv.name.clone()).collect(),
            serde_json::to_value(&body).expect("the header body encodes"),
        );
        let mut out = HashMap::new();
        out.insert(HEADER_KEY.to_string(), header.to_tensor()?);
        for (nv, v) in self.vars.iter().zip(&self.v) {
            if let Some(v) = v {
                out.insert(format!("{}.{V}", nv.name), host_copy(v)?);
            }
        }
        Ok(out)
    }

    /// Validates everything (kind, matrix names, `λ`, iterations, each
    /// vector's shape, dtype and unit norm) before changing anything; `λ` and the
    /// iterations are restored from the checkpoint. A matrix without a
    /// saved vector gets a cold start at the next call.
    fn load_state_dict(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let header = Header::read(state, KIND)?;
        header.check_params(self.vars.iter().map(|nv| nv.name.as_str()))?;
        let body: PenaltyBody = serde_json::from_value(header.body.clone()).map_err(|e| {
            Error::checkpoint(
                HEADER_KEY,
                format!("not a spectral norm penalty header: {e}"),
            )
        })?;
        check_lambda(body.lambda)
            .and(check_iters(body.iters))
            .map_err(|e| Error::checkpoint("checkpoint", format!("bad hyperparameters: {e}")))?;
        let expect = |i: usize| {
            let var = &self.vars[i].var;
            let (_, n) = matrix_view(var.dims()).expect("checked at construction");
            (vec![n], math_dtype(var.dtype()), var.device().clone())
        };
        let found = read_slots(
            state,
            &self.names(),
            "this penalty",
            |_, slot| slot == V,
            expect,
        )?;
        let mut v: Vec<Option<Tensor>> = vec![None; self.vars.len()];
        for ((i, _), t) in found {
            // What the power iteration stores is a unit vector; anything
            // else (zero, NaN) would be ignored as a start, but then warmed
            // by `iters` iterations instead of a cold start's.
            let norm = host_f64(&t)?.iter().map(|x| x * x).sum::<f64>().sqrt();
            let unit = (norm - 1.0).abs() <= 1e-3; // false for NaN
            if !unit {
                fail!(
                    Checkpoint,
                    format!("{}.{V}", self.vars[i].name),
                    "expected the unit vector v₁, got one of norm {norm}"
                );
            }
            v[i] = Some(t);
        }
        self.lambda = body.lambda;
        self.iters = body.iters;
        self.v = v;
        self.sigmas.clear();
        Ok(())
    }
}
