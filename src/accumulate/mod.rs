//! Gradient accumulation: several micro-batches per optimizer step (optax's
//! `MultiSteps`), for a batch larger than fits in memory at once.
//!
//! [`Accumulate`] wraps an optimizer. Each call of
//! [`try_step`](Accumulate::try_step) adds one micro-batch's gradients to
//! running sums; every `every`-th call steps the wrapped optimizer with their
//! mean, `ḡ = (1/k) Σ_j g_j` (`k = every`), and clears the sums. With a loss
//! that is a mean over each micro-batch, `ḡ` is the gradient of the mean loss
//! over all `k` micro-batches (of equal size). A parameter without a
//! gradient in some micro-batch counts zero there (its mean is still over
//! `k`, as when the losses are summed before one backward pass); one without
//! a gradient in any is skipped by the wrapped optimizer.
//!
//! The sums are kept in f32 (f64 for f64 parameters), whatever the
//! parameters' dtype, so bf16 gradients are not rounded at every addition;
//! the mean is cast back to the parameter's dtype. With `every = 1` a step is
//! bit for bit the wrapped optimizer's.
//!
//! A micro-batch with a NaN/Inf gradient is refused with
//! [`Error::NonFiniteGradient`] naming the parameter, and nothing is added:
//! skip the micro-batch and go on. If the wrapped optimizer refuses its step
//! (its own checks), the micro-batch of that call is not added either and
//! the sums are kept, so the next call tries again; [`Accumulate::reset`]
//! drops the sums. (Under data-parallel training,
//! [`Accumulate::data_parallel`], a refused step drops them on every rank.)
//!
//! Gradient clipping belongs on the mean, not on each micro-batch:
//! [`Accumulate::with_clip_grad_norm`].
//!
//! A schedule counts optimizer steps, not micro-batches: put
//! [`Scheduled`](crate::schedule::Scheduled) inside, `Accumulate::new(
//! Scheduled::new(opt, schedule), k)`. Under data-parallel training wrap
//! the [`DataParallel`](crate::distributed::DataParallel) with
//! [`Accumulate::data_parallel`], which refuses nothing on one rank alone
//! (a refusal there would leave the ranks' counts apart) and whose
//! checkpoints keep each rank's pending micro-batches.
//!
//! ```
//! use candle_core::{DType, Device, Module, Tensor};
//! use candle_nn::{VarBuilder, VarMap};
//! use steepest::accumulate::Accumulate;
//! use steepest::{Muon, MuonConfig};
//!
//! # fn main() -> steepest::Result<()> {
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
//! let layer = candle_nn::linear(16, 8, vb.pp("fc"))?;
//! // Eight micro-batches of 4 rows each.
//! let batches: Vec<Tensor> = (0..8)
//!     .map(|_| Tensor::randn(0f32, 1.0, (4, 16), &Device::Cpu))
//!     .collect::<candle_core::Result<_>>()?;
//!
//! let muon = Muon::from_varmap(&varmap, MuonConfig::default())?;
//! let mut opt = Accumulate::new(muon, 4)?; // one Muon step per 4 micro-batches
//! let mut steps = 0;
//! for micro_batch in &batches {
//!     let loss = layer.forward(micro_batch)?.sqr()?.mean_all()?;
//!     if opt.backward_step(&loss)? {
//!         steps += 1; // an optimizer step was taken: log, schedule, ...
//!     }
//! }
//! assert_eq!((steps, opt.pending()), (2, 0));
//! # Ok(()) }
//! ```

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};

use crate::checkpoint::OptimizerState;
use crate::error::{fail, Error, Result};
use crate::optim::{HasParams, NamedVar, TryStep};

mod data_parallel;

pub use data_parallel::ACCUMULATE_RANK_PREFIX;

/// What every checkpoint key of [`Accumulate`]'s own starts with.
pub(crate) const ACCUMULATE_KEY_PREFIX: &str = "__accumulate__.";
/// The checkpoint key of [`Accumulate`]'s count of pending micro-batches
/// (an `i64` scalar).
pub const ACCUMULATE_COUNT_KEY: &str = "__accumulate__.count";
/// The checkpoint key of [`Accumulate`]'s micro-batches per step (an `i64`
/// scalar).
pub const ACCUMULATE_EVERY_KEY: &str = "__accumulate__.every";
/// The prefix of [`Accumulate`]'s running sums in a checkpoint: the sum of
/// parameter `p` is `__accumulate__.sum.<p>`.
pub const ACCUMULATE_SUM_PREFIX: &str = "__accumulate__.sum.";

/// Steps the wrapped optimizer once every `every` micro-batches, with the
/// mean of their gradients (see the [module docs](self)).
#[derive(Debug)]
pub struct Accumulate<O> {
    opt: O,
    params: Vec<NamedVar>,
    every: usize,
    sums: Vec<Option<Tensor>>,
    count: usize,
    clip: Option<f64>,
    last_norm: Option<f64>,
    /// Data-parallel: no local finite check, and a refused step drops the
    /// pending micro-batches (see [`Accumulate::data_parallel`]).
    collective: bool,
    /// The wrapped optimizer keeps f32 master weights: the mean gradient of
    /// a bf16/f16 parameter stays f32.
    masters: bool,
}

/// The dtype of a parameter's running sum.
fn sum_dtype(param: DType) -> DType {
    if param == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

fn check_every(every: usize) -> Result<()> {
    if every == 0 {
        fail!(
            Config,
            "Accumulate: every",
            "must be at least 1 micro-batch per step, got 0"
        );
    }
    Ok(())
}

/// A `GradStore` to fill by hand: candle's only public constructor is
/// `backward`, which here yields one entry for a constant no parameter is.
fn empty_grad_store() -> Result<GradStore> {
    Ok(Tensor::zeros((), DType::F32, &Device::Cpu)?.backward()?)
}

impl<O: TryStep + HasParams> Accumulate<O> {
    /// Wraps `opt`, which then steps once every `every` micro-batches
    /// (`every ≥ 1`). Refuses an optimizer that steps collectively (a
    /// [`DataParallel`](crate::distributed::DataParallel)): its wrapper is
    /// [`Accumulate::data_parallel`], whose refusals are collective too
    /// (here a NaN micro-batch on one rank would be refused on that rank
    /// alone, and the ranks' steps would fall out of step).
    pub fn new(opt: O, every: usize) -> Result<Self> {
        if opt.steps_collectively() {
            fail!(
                Config,
                "Accumulate::new",
                "the optimizer steps collectively (a DataParallel): wrap it with \
                 Accumulate::data_parallel, which keeps the ranks in step"
            );
        }
        Self::wrap(opt, every, false)
    }

    /// The wrapper; `collective`: its refusals are the wrapped
    /// optimizer's collective ones ([`Accumulate::data_parallel`]).
    pub(super) fn wrap(opt: O, every: usize, collective: bool) -> Result<Self> {
        check_every(every)?;
        let params = opt.params().to_vec();
        Ok(Self {
            sums: vec![None; params.len()],
            masters: opt.keeps_master_weights(),
            opt,
            params,
            every,
            count: 0,
            clip: None,
            last_norm: None,
            collective,
        })
    }

    /// Clips the mean gradient to global norm `max_norm` before each step of
    /// the wrapped optimizer ([`crate::clip::clip_grad_norm_named`] on the
    /// whole batch's gradient: clipping each micro-batch's would not be the
    /// same). A setting, like the schedule of a `Scheduled`: not saved in
    /// checkpoints.
    /// Refused after [`Accumulate::data_parallel`], which averages over the
    /// ranks after this point: there, clip with
    /// [`DataParallelConfig::clip_grad_norm`](crate::distributed::DataParallelConfig::clip_grad_norm).
    pub fn with_clip_grad_norm(mut self, max_norm: f64) -> Result<Self> {
        if self.collective {
            fail!(
                Config,
                "Accumulate::with_clip_grad_norm",
                "under data-parallel training clip the mean over the ranks with \
                 DataParallelConfig::clip_grad_norm (this rank's mean is not the gradient)"
            );
        }
        if !(max_norm.is_finite() && max_norm > 0.0) {
            fail!(
                Config,
                "Accumulate: max_norm",
                "must be finite and > 0, got {max_norm}"
            );
        }
        self.clip = Some(max_norm);
        Ok(self)
    }
}

impl<O: TryStep> Accumulate<O> {
    /// Adds one micro-batch's gradients; on every `every`-th call steps the
    /// wrapped optimizer with the mean. Returns whether it stepped. On an
    /// error nothing changed (see the [module docs](self)).
    pub fn try_step(&mut self, grads: &GradStore) -> Result<bool> {
        // 1. Validate before anything changes: shapes, then one finite check
        // (left to the collective step under data-parallel training).
        let mut found: Vec<(usize, Tensor)> = Vec::new();
        for (i, p) in self.params.iter().enumerate() {
            if let Some(g) = grads.get(p.var.as_tensor()) {
                if g.dims() != p.var.dims() {
                    fail!(
                        Shape,
                        &p.name,
                        "gradient of shape {:?} for a parameter of shape {:?}",
                        g.dims(),
                        p.var.dims()
                    );
                }
                found.push((i, g.detach()));
            }
        }
        let refs: Vec<&Tensor> = found.iter().map(|(_, g)| g).collect();
        if !self.collective {
            if let Some(k) = crate::device::first_nonfinite(&refs)? {
                return Err(Error::NonFiniteGradient {
                    param: self.params[found[k].0].name.clone(),
                });
            }
        }
        // 2. The new sums, beside the old ones.
        let mut sums = self.sums.clone();
        for (i, g) in found {
            let g = g.to_dtype(sum_dtype(self.params[i].var.dtype()))?;
            sums[i] = Some(match &sums[i] {
                Some(s) => (s + g)?,
                None => g,
            });
        }
        if self.count + 1 < self.every {
            self.sums = sums;
            self.count += 1;
            return Ok(false);
        }
        // 3. The mean, and one step of the wrapped optimizer (whose own
        // finite check is not redundant: finite micro-batches may sum to Inf).
        let mut mean = empty_grad_store()?;
        for (p, s) in self.params.iter().zip(&sums) {
            if let Some(s) = s {
                let g = if self.every == 1 {
                    s.clone()
                } else {
                    (s / self.every as f64)?
                };
                // (in the parameter's dtype, or f32 for a master weight,
                // which rounding to bf16/f16 would only cost bits)
                let dt = crate::params::stepped_dtype(p.var.dtype(), self.masters);
                mean.insert(p.var.as_tensor(), g.to_dtype(dt)?);
            }
        }
        let norm = match self.clip {
            Some(max) => Some(crate::clip::clip_grad_norm_named(
                &mut mean,
                &self.params,
                max,
            )?),
            None => None,
        };
        if let Err(e) = self.opt.try_step(&mean) {
            if self.collective {
                // Refused on every rank alike: every rank drops its batch.
                self.reset();
            }
            return Err(e);
        }
        self.reset();
        if norm.is_some() {
            self.last_norm = norm;
        }
        Ok(true)
    }

    /// `loss.backward()`, then [`Accumulate::try_step`].
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<bool> {
        let grads = loss.backward()?;
        self.try_step(&grads)
    }

    /// Drops the micro-batches added since the last step.
    pub fn reset(&mut self) {
        self.sums.iter_mut().for_each(|s| *s = None);
        self.count = 0;
    }

    /// Micro-batches added since the last step (`0 ≤ pending < every`).
    pub fn pending(&self) -> usize {
        self.count
    }

    /// The global norm of the mean gradient before clipping, at the last
    /// step (`None` without [`with_clip_grad_norm`](Accumulate::with_clip_grad_norm)
    /// or before the first step).
    pub fn last_grad_norm(&self) -> Option<f64> {
        self.last_norm
    }

    /// Micro-batches per optimizer step.
    pub fn every(&self) -> usize {
        self.every
    }

    /// Changes the micro-batches per step; refused while micro-batches are
    /// pending (their mean would be over the wrong count).
    pub fn set_every(&mut self, every: usize) -> Result<()> {
        check_every(every)?;
        if self.count > 0 {
            fail!(
                Config,
                "Accumulate::set_every",
                "{} micro-batch(es) pending: step or reset first",
                self.count
            );
        }
        self.every = every;
        Ok(())
    }

    /// The wrapped optimizer.
    pub fn inner(&self) -> &O {
        &self.opt
    }

    /// The wrapped optimizer, mutably (e.g. to change its learning rate).
    pub fn inner_mut(&mut self) -> &mut O {
        &mut self.opt
    }

    /// Unwraps the optimizer (dropping pending micro-batches).
    pub fn into_inner(self) -> O {
        self.opt
    }
}

impl<O> crate::optim::HasParams for Accumulate<O> {
    fn params(&self) -> &[NamedVar] {
        &self.params
    }
    fn keeps_master_weights(&self) -> bool {
        self.masters
    }
    fn steps_collectively(&self) -> bool {
        self.collective
    }
}

impl<O: TryStep> TryStep for Accumulate<O> {
    /// [`Accumulate::try_step`], without saying whether it stepped.
    fn try_step(&mut self, grads: &GradStore) -> Result<()> {
        Accumulate::try_step(self, grads).map(|_| ())
    }
}

/// The checkpoint is the wrapped optimizer's, plus the pending
/// micro-batches' sums ([`ACCUMULATE_SUM_PREFIX`]), their count and `every`,
/// so a run saved between optimizer steps resumes exactly. Loading restores
/// `every` from the checkpoint, as every optimizer restores its
/// hyperparameters. A checkpoint without these keys (a plain optimizer's) is
/// refused, as is a wrong sum's name, shape or dtype; a refusal changes
/// nothing.
impl<O: TryStep + OptimizerState> OptimizerState for Accumulate<O> {
    fn state_dict(&self) -> Result<HashMap<String, Tensor>> {
        let mut state = self.opt.state_dict()?;
        state.extend(self.pending_state(ACCUMULATE_SUM_PREFIX)?);
        Ok(state)
    }

    fn load_state_dict(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        if let Some(key) = state.keys().find(|k| k.starts_with(ACCUMULATE_RANK_PREFIX)) {
            fail!(
                Checkpoint,
                key,
                "saved by a data-parallel `Accumulate` with micro-batches pending on each \
                 rank: load it with `Accumulate::data_parallel(..)` and `load_state`, at the \
                 world size that saved it"
            );
        }
        let mut inner = state.clone();
        let pending = take_pending(&self.params, &mut inner, ACCUMULATE_SUM_PREFIX)?;
        // The wrapped optimizer validates everything before it changes
        // anything; ours is set only after it succeeded.
        self.opt.load_state_dict(&inner)?;
        self.set_pending(pending);
        Ok(())
    }
}

impl<O> Accumulate<O> {
    /// The checkpoint entries of the pending micro-batches: their count,
    /// `every`, and the sums under `sum_prefix` + the parameter's name.
    fn pending_state(&self, sum_prefix: &str) -> Result<HashMap<String, Tensor>> {
        let scalar = |v: usize| Tensor::new(v as i64, &Device::Cpu);
        let mut state = HashMap::new();
        state.insert(ACCUMULATE_COUNT_KEY.into(), scalar(self.count)?);
        state.insert(ACCUMULATE_EVERY_KEY.into(), scalar(self.every)?);
        for (p, s) in self.params.iter().zip(&self.sums) {
            if let Some(s) = s {
                state.insert(
                    format!("{sum_prefix}{}", p.name),
                    s.to_device(&Device::Cpu)?,
                );
            }
        }
        Ok(state)
    }

    fn set_pending(&mut self, pending: Pending) {
        self.sums = pending.sums;
        self.count = pending.count;
        self.every = pending.every;
    }
}

/// Pending micro-batches read from a checkpoint and validated.
struct Pending {
    count: usize,
    every: usize,
    sums: Vec<Option<Tensor>>,
}

/// Removes `Accumulate`'s entries (count, every, and the sums under
/// `sum_prefix` + the parameter's name) from `state` and validates them
/// against `params`: a missing count, a count not below `every`, a sum of an
/// unknown parameter, or of the wrong shape or dtype, is refused.
fn take_pending(
    params: &[NamedVar],
    state: &mut HashMap<String, Tensor>,
    sum_prefix: &str,
) -> Result<Pending> {
    let count_of = |key: &str| -> Result<usize> {
        let Some(t) = state.get(key) else {
            fail!(
                Checkpoint,
                "checkpoint",
                "no `{key}` entry, so it was not saved by `Accumulate`; to load a plain \
                 optimizer's checkpoint, use `accumulate.inner_mut().load_state(..)`"
            );
        };
        match t.to_scalar::<i64>() {
            Ok(v) if v >= 0 => Ok(v as usize),
            _ => fail!(
                Checkpoint,
                key,
                "must be a non-negative i64 scalar, got {t:?}"
            ),
        }
    };
    let (count, every) = (
        count_of(ACCUMULATE_COUNT_KEY)?,
        count_of(ACCUMULATE_EVERY_KEY)?,
    );
    check_every(every).map_err(|e| e.about(ACCUMULATE_EVERY_KEY))?;
    if count >= every {
        fail!(
            Checkpoint,
            ACCUMULATE_COUNT_KEY,
            "{count} pending micro-batches with every = {every} (must be fewer)"
        );
    }
    state.remove(ACCUMULATE_COUNT_KEY);
    state.remove(ACCUMULATE_EVERY_KEY);
    let mut sums = vec![None; params.len()];
    let keys: Vec<String> = state
        .keys()
        .filter(|k| k.starts_with(sum_prefix))
        .cloned()
        .collect();
    for key in keys {
        let t = state.remove(&key).expect("listed above");
        let name = &key[sum_prefix.len()..];
        let Some(i) = params.iter().position(|p| p.name == name) else {
            fail!(Checkpoint, key, "no parameter `{name}` here");
        };
        let var = &params[i].var;
        let want = sum_dtype(var.dtype());
        if t.dims() != var.dims() || t.dtype() != want {
            fail!(
                Checkpoint,
                key,
                "{:?} {:?}, expected {:?} {want:?}",
                t.dims(),
                t.dtype(),
                var.dims()
            );
        }
        sums[i] = Some(t.to_device(var.device())?);
    }
    if count == 0 && sums.iter().any(Option::is_some) {
        fail!(
            Checkpoint,
            ACCUMULATE_COUNT_KEY,
            "0 pending micro-batches, but the checkpoint holds sums"
        );
    }
    Ok(Pending { count, every, sums })
}
