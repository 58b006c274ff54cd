//! The data-parallel step: reduce-scatter the gradients to their owners,
//! step the owned parameters, all-gather the updated parameters.
//!
//! [`DataParallel`] works over any [`Collective`] and any optimizer that can
//! update a subset of its parameters ([`ShardedStep`]: every optimizer of
//! the crate, through [`Driver::step_subset`](crate::optim::Driver::step_subset)).
//! Each call of [`step_grads`](DataParallel::step_grads) (or
//! [`step`](DataParallel::step) with a `GradStore`) on every rank, with that
//! rank's own micro-batch gradients, does:
//!
//! 1. **Check and agree.** Pack the local gradients into the flat buffer of the
//!    [`Plan`] (in [`DataParallelConfig::grad_dtype`]) and check it is finite
//!    (one host sync); check the gradient list (count, shapes). One all-reduce
//!    of a small f32 status vector (`2N + 2P` elements: a non-finite flag and
//!    an error flag per rank; per parameter the number of ranks that have a
//!    gradient for it and the number whose gradient for it is not finite)
//!    tells every rank whether any rank found a problem. If one did, **every
//!    rank refuses the step** — with [`Error::NonFiniteGradient`] naming the
//!    first such parameter (the same on every rank), [`Error::Shape`]
//!    naming the ranks with invalid gradients, or [`Error::Config`] naming
//!    those whose optimizer would refuse any step ([`ShardedStep::check_ready`]:
//!    a learning rate set to NaN, say) — and no parameter, no
//!    optimizer state and nothing else changes anywhere. No rank returns
//!    before this all-reduce, so a local problem never leaves the others
//!    waiting.
//! 2. **One reduce-scatter** ([`ReduceOp::Avg`]) of the flat buffer: this rank
//!    receives the averaged gradients of exactly the parameters it owns.
//! 3. **Clipping** (optional, [`DataParallelConfig::clip_grad_norm`]): each
//!    rank computes `Σ g²` of each parameter it owns, one all-reduce of
//!    `P + 1` values (the last flags a rank whose gradients could not be
//!    prepared) gives every rank all of them, every rank sums them in
//!    parameter order in f64 and scales its gradients by `max/‖g‖` when
//!    `‖g‖ > max`: [`crate::clip::clip_grad_norm`]'s arithmetic on the averaged
//!    gradient, so the same norm and the same scaled gradients (see
//!    [`DataParallel::last_grad_norm`]), bit for bit. When the sum
//!    overflows f32 (finite entries beyond ~1e19) or is 0 (entries all below
//!    ~1e-19, or zero), both measure again scaled by the largest entry: here
//!    two more all-reduces (the maxima, then the scaled sums), only at such a
//!    step.
//! 4. **The owner's step**: [`ShardedStep::step_subset`] with those gradients
//!    (cast to each parameter's dtype), called on every rank at every step,
//!    with an empty list on a rank that owns nothing. For an optimizer whose
//!    step can fail on valid gradients (a retraction), its two-phase form
//!    [`ShardedStep::step_subset_agreed`], with one all-reduce of a small
//!    status vector between the phases (see below).
//! 5. **One all-gather** of the owners' parameters (in the parameters' dtype:
//!    bf16 when every parameter is bf16, f32 otherwise, so nothing is rounded)
//!    plus one status element per rank; every rank writes the parameters it
//!    does not own into its `Var`s. Afterwards every rank holds bit-identical
//!    parameters. With [`ParamGather::Bf16Updates`]
//!    ([`DataParallelConfig::param_gather`]) the owners send their updates
//!    rounded to bf16 instead (half the bytes of f32 parameters), and every
//!    rank, the owner included, adds them to the parameters it had: still
//!    bit-identical on every rank, each update rounded (≤ 2⁻⁸ relative).
//!
//! Gradients: a parameter without a gradient on some ranks (unused in their
//! micro-batch) contributes zeros from those ranks to the average, as in
//! PyTorch's DDP; a parameter without a gradient on **every** rank is not
//! passed to `step_subset` at all, as a single-process optimizer skips it.
//!
//! A failure of the owner's step on valid gradients can come only from a
//! fallible transform (a retraction of a rank-deficient matrix, a root
//! solve). The crate's optimizers with such a chain step in two phases
//! ([`ShardedStep::agrees_before_commit`]): the fallible groups run first,
//! undoably, then one all-reduce of a small status vector tells every rank
//! whether any owner failed; if one did, **every rank undoes its share and
//! refuses the step** (the same error on every rank, naming the parameter),
//! so no parameter, state or schedule counter changed anywhere. Any other
//! failure of an owner's step (a device error, a transform that fails
//! without declaring it can — the step is then partly applied on that
//! rank —, or a third-party optimizer without the two phases) is reported
//! on every rank through the status elements of the all-gather; the other
//! owners have then stepped their shares, so the parameters stay identical
//! on every rank but the optimizer states (and `Scheduled` counters) may
//! not agree. **Every rank then refuses further steps** until
//! [`load_state`](DataParallel::load_state) restores a consistent state
//! (or, when the failed step changed nothing on its rank and no counter
//! is involved, [`clear_failure`](DataParallel::clear_failure)). A failure
//! of the all-gather itself (a communicator fault) marks the rank it
//! happens on broken the same way, and then the parameters may differ
//! across ranks too: restore them as well.
//!
//! Communicator faults. Every collective's result is checked against the
//! [`Collective`] contract (its element count and dtype), so a faulty
//! implementation is an error, never a panic. The agreement itself is one
//! collective that every rank must reach: a rank whose own collective call
//! fails (a device or communicator fault) cannot tell the others, as with
//! any collective, so such a fault on one rank only may leave that rank's
//! result different from the others' (or, on NCCL, the others waiting).
//!
//! Checkpoints: [`save_state`](DataParallel::save_state) writes one file per
//! rank (that rank's optimizer state: the parameters it owns) and a manifest;
//! [`load_state`](DataParallel::load_state) reads the union of any such
//! checkpoint (or of a single-process optimizer's file) and keeps the state of
//! the parameters this rank owns under the current plan, whatever the world
//! size that wrote it. See [`super::checkpoint`].

use std::collections::HashMap;
use std::path::Path;

use super::checkpoint::{load_union, save_sharded};
use super::collective::{Checked, Collective, ReduceOp};
use super::plan::{fnv1a, ParamSpec, Plan, FNV_OFFSET, FNV_PRIME};
use super::sharded::{param_specs, ShardedOptimizer};
use crate::checkpoint::{restrict, OptimizerState};
use crate::clip::squared_norm_term;
use crate::error::{Error, Result};
use crate::optim::{HasParams, Muon, MuonConfig, NamedVar, TryStep};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};

/// What the distributed layer needs from an optimizer: the step of a subset
/// of its parameters.
pub trait ShardedStep {
    /// Update the parameters at these indices (into the optimizer's parameter
    /// list), with these gradients (already averaged across ranks); other
    /// parameters are untouched and keep no state on this rank.
    ///
    /// Called on every rank at every step, with an empty slice on a rank that
    /// owns no parameter with a gradient. Each gradient has its parameter's
    /// shape and dtype (f32 for a bf16/f16 parameter when
    /// [`keeps_master_weights`](Self::keeps_master_weights)). On error, the implementation must change no parameter
    /// and no state (the crate's step protocol).
    fn step_subset(&mut self, grads: &[(usize, Tensor)]) -> Result<()>;

    /// Whether a step of valid gradients can fail (a retraction, a root
    /// solve) and the optimizer can still undo it after the part that can
    /// fail: then [`DataParallel`] calls
    /// [`step_subset_agreed`](Self::step_subset_agreed) instead of
    /// `step_subset`, so that a failure at one owner is undone on every rank.
    /// Must be the same on every rank (it is checked at construction). The
    /// default, `false`, skips that agreement (one small all-reduce and one
    /// host sync per step).
    fn agrees_before_commit(&self) -> bool {
        false
    }

    /// The step of [`step_subset`](Self::step_subset) in two phases around
    /// `agree`, which the implementation calls **exactly once** per call,
    /// with its error so far (`None`: fine so far): everything that can fail
    /// runs before, undoably; if `agree` returns an error (some rank
    /// failed), undo and return it; else finish the step. The default runs
    /// `step_subset` and then `agree`, undoing nothing, so an implementation
    /// that returns `true` from
    /// [`agrees_before_commit`](Self::agrees_before_commit) must override
    /// both; [`Driver::step_subset_agreed`](crate::optim::Driver::step_subset_agreed)
    /// is the real one. (An implementation that skips `agree` or calls it
    /// twice gets an error, on every rank, rather than a hang.)
    fn step_subset_agreed(
        &mut self,
        grads: &[(usize, Tensor)],
        agree: &mut dyn FnMut(Option<&Error>) -> Result<()>,
    ) -> Result<()> {
        let result = self.step_subset(grads);
        let verdict = agree(result.as_ref().err());
        result.and(verdict)
    }

    /// The settings every rank must share (learning rate, hyperparameters),
    /// compared across ranks by [`DataParallel`] at construction: ranks that
    /// step their shares with different settings would train a model no
    /// single process trains. `None` (the default) skips the comparison.
    fn settings(&self) -> Option<serde_json::Value> {
        None
    }

    /// Whether the optimizer steps bf16/f16 parameters through f32 master
    /// weights ([`Driver::with_master_weights`](crate::optim::Driver::with_master_weights)):
    /// [`DataParallel`] then refuses [`ParamGather::Bf16Updates`], which
    /// would rewrite those parameters behind the masters. Default `false`:
    /// a wrapper around one of the crate's optimizers must forward it (as
    /// the crate's own wrappers do), or the refusal cannot see the masters.
    fn keeps_master_weights(&self) -> bool {
        false
    }

    /// Checks, changing nothing and without a collective, what would make
    /// every step of this rank fail whatever the gradients (an invalid
    /// learning rate): [`DataParallel`] folds it into the status all-reduce
    /// that opens every step, so such a step is refused on every rank with
    /// nothing changed, rather than failing at the owners and leaving every
    /// rank refusing further steps. `lr`: the rate the next step will run
    /// at when a wrapper sets it (a schedule's), else `None` (the
    /// optimizer's own). Default: nothing to check.
    fn check_ready(&self, lr: Option<f64>) -> Result<()> {
        let _ = lr;
        Ok(())
    }
}

/// `ShardedStep` for a pointer to one (`&mut O`, `Box<O>`): every method
/// forwarded.
macro_rules! forward_sharded_step {
    ($($ptr:ty),*) => {$(
        impl<O: ShardedStep + ?Sized> ShardedStep for $ptr {
            fn step_subset(&mut self, grads: &[(usize, Tensor)]) -> Result<()> {
                (**self).step_subset(grads)
            }
            fn agrees_before_commit(&self) -> bool {
                (**self).agrees_before_commit()
            }
            fn step_subset_agreed(
                &mut self,
                grads: &[(usize, Tensor)],
                agree: &mut dyn FnMut(Option<&Error>) -> Result<()>,
            ) -> Result<()> {
                (**self).step_subset_agreed(grads, agree)
            }
            fn settings(&self) -> Option<serde_json::Value> {
                (**self).settings()
            }
            fn keeps_master_weights(&self) -> bool {
                (**self).keeps_master_weights()
            }
            fn check_ready(&self, lr: Option<f64>) -> Result<()> {
                (**self).check_ready(lr)
            }
        }
    )*};
}
forward_sharded_step!(&mut O, Box<O>);

/// Options of [`DataParallel`]. Every rank must pass the same options (checked
/// at construction).
#[derive(Clone, Debug)]
pub struct DataParallelConfig {
    /// The dtype gradients travel in: `F32` (default) or `BF16` (half the
    /// bytes; each rank's gradient is rounded to bf16 before the reduction,
    /// and the averaged gradient once more after it). `BF16` is refused
    /// with f16 parameters without master weights (the bf16 average, cast
    /// back to f16, could overflow).
    pub grad_dtype: DType,
    /// Parameters whose name contains one of these strings are planned as
    /// element-wise ([`ParamKind::Elementwise`](super::ParamKind::Elementwise), cost = element count) even
    /// when they are matrices. [`DataParallel::for_optimizer`] finds them by
    /// itself (from the optimizer's chains); for [`DataParallel::new`], pass
    /// the names the optimizer gives to AdamW.
    pub elementwise_names: Vec<String>,
    /// At construction (every constructor), broadcast rank 0's parameters to
    /// every rank (default `true`), so all ranks start from the same values.
    pub broadcast_initial: bool,
    /// Clip the averaged gradients to this global norm before the owners'
    /// step (`None`, the default: no clipping), as
    /// [`crate::clip::clip_grad_norm`] does in one process. Must be finite
    /// and > 0.
    pub clip_grad_norm: Option<f64>,
    /// What the all-gather after the owners' step carries (step 5 of the
    /// [module docs](self)): the updated parameters (default) or their
    /// updates rounded to bf16 ([`ParamGather::Bf16Updates`]).
    pub param_gather: ParamGather,
}

impl Default for DataParallelConfig {
    fn default() -> Self {
        Self {
            grad_dtype: DType::F32,
            elementwise_names: Vec::new(),
            broadcast_initial: true,
            clip_grad_norm: None,
            param_gather: ParamGather::Parameters,
        }
    }
}

/// What the all-gather after the owners' step sends
/// ([`DataParallelConfig::param_gather`]).
///
/// Per rank and step the data-parallel step sends `(N−1)/N · F · (b_g + b_p)`
/// bytes (`F` the padded flat buffer, `b_g` the bytes of a gradient element
/// in [`DataParallelConfig::grad_dtype`], `b_p` those of a gathered
/// element). With f32 parameters and bf16 gradients, gathering parameters
/// sends 1.5× what a plain all-reduce of the gradients (PyTorch's DDP)
/// sends; gathering bf16 updates brings it back to 1× (and with f32
/// gradients to 0.75×).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ParamGather {
    /// The owners' updated parameters, in the parameters' dtype (bf16 when
    /// every parameter is bf16, f32 otherwise): every rank receives exactly
    /// what the owner computed, and a step equals the single-process step.
    #[default]
    Parameters,
    /// Each owner's update `ΔW = W_new − W_old` (computed in f32), rounded to
    /// bf16; every rank, **the owner included**, then sets
    /// `W ← W_old + ΔW_bf16` (added in f32, stored in the parameter's dtype),
    /// so the parameters stay bit-identical on every rank while the gather
    /// sends 2 bytes per element instead of 4. Each element of a step's
    /// update is off by at most half a bf16 unit in the last place (a
    /// relative 2⁻⁸ of that element of `ΔW`, not of `W`); the optimizer's
    /// state (moments, momentum, spectral vectors) is computed exactly, as
    /// in one process. Parameters without a gradient on any rank are not
    /// touched. Refused at construction when every parameter is bf16: their
    /// gather is bf16 already, and rounding the update would only lose
    /// precision. Costs, per step, a copy of the rank's owned parameters
    /// before its step and, on every rank, an f32 subtraction and addition
    /// per element: memory passes that pay off where the link, not the
    /// device's memory, limits the step.
    Bf16Updates,
}

impl ParamGather {
    /// A code for the layout fingerprint (which collectives a step issues).
    fn code(self) -> u64 {
        match self {
            ParamGather::Parameters => 0,
            ParamGather::Bf16Updates => 1,
        }
    }
}

/// Data-parallel training of one optimizer over the ranks of a
/// [`Collective`] (see the [module docs](self) for the step).
///
/// ```
/// use candle_core::{DType, Device};
/// use candle_nn::{VarBuilder, VarMap};
/// use steepest::distributed::{DataParallel, DataParallelConfig, LocalGroup};
/// use steepest::MuonConfig;
/// # fn main() -> steepest::Result<()> {
/// // Two in-process ranks (threads); with NCCL, one process per GPU runs the
/// // same code with `NcclComm::from_env(&device)?`.
/// let out = LocalGroup::run(2, |comm| {
///     let varmap = VarMap::new();
///     let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
///     let fc = candle_nn::linear(8, 4, vb.pp("fc"))?;
///     let mut dp = DataParallel::muon(comm, &varmap, MuonConfig::default(), DataParallelConfig {
///         clip_grad_norm: Some(1.0),
///         ..Default::default()
///     })?;
///     let x = candle_core::Tensor::ones((3, 8), DType::F32, &Device::Cpu)?;
///     let loss = candle_core::Module::forward(&fc, &x)?.sqr()?.mean_all()?;
///     dp.backward_step(&loss)?; // this rank's micro-batch
///     Ok(dp.owned().len())
/// })?;
/// assert_eq!(out.len(), 2);
/// # Ok(()) }
/// ```
pub struct DataParallel<C: Collective, O: ShardedStep> {
    comm: C,
    opt: O,
    vars: Vec<Var>,
    /// `vars` with the plan's names ([`HasParams`]).
    named: Vec<NamedVar>,
    plan: Plan,
    config: DataParallelConfig,
    param_dtype: DType,
    device: Device,
    steps: u64,
    last_norm: Option<f64>,
    /// [`ShardedStep::agrees_before_commit`], read once at construction.
    two_phase: bool,
    /// [`ShardedStep::keeps_master_weights`], read once at construction:
    /// the owners' bf16/f16 parameters then get f32 gradients.
    masters: bool,
    /// Set (on every rank alike) when a step failed after some owners had
    /// stepped: the ranks' optimizer states (or schedule counters) may
    /// disagree, so steps are refused until [`DataParallel::load_state`]
    /// (or [`DataParallel::clear_failure`]).
    broken: Option<String>,
    /// Whether parameter `i` had a gradient on some rank in a step that
    /// succeeded ([`DataParallel::never_stepped`]).
    stepped: Vec<bool>,
}

impl<C: Collective, O: ShardedStep> std::fmt::Debug for DataParallel<C, O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataParallel")
            .field("rank", &self.comm.rank())
            .field("world_size", &self.comm.world_size())
            .field("params", &self.vars.len())
            .field("owned", &self.plan.owned(self.comm.rank()))
            .field("config", &self.config)
            .finish()
    }
}

impl<C: Collective, O: ShardedOptimizer> DataParallel<C, O> {
    /// Data-parallel training of one of the crate's optimizers (anything run
    /// by a [`Driver`](crate::optim::Driver): [`Muon`], `AdamW`, `Sgd`,
    /// `Steepest`, a [`Partition`](crate::optim::Partition), and
    /// [`Scheduled`](crate::schedule::Scheduled) around any of them): its
    /// parameters in its order, planned with the cost model of
    /// [`param_specs`] (matrices whose chain orthogonalises cost
    /// `m·n·min(m, n)`, everything else its element count), plus
    /// `config.elementwise_names`. Collective, as [`new`](Self::new).
    pub fn for_optimizer(comm: C, opt: O, config: DataParallelConfig) -> Result<Self> {
        let driver = opt.driver();
        let specs = param_specs(driver)
            .into_iter()
            .map(|s| {
                if config
                    .elementwise_names
                    .iter()
                    .any(|n| s.name.contains(n.as_str()))
                {
                    ParamSpec::elementwise(s.name, &s.dims)
                } else {
                    s
                }
            })
            .collect();
        let vars = driver.params().iter().map(|v| v.var.clone()).collect();
        let plan = Plan::new(specs, comm.world_size())?;
        Self::with_plan(comm, vars, plan, opt, config)
    }
}

impl<C: Collective> DataParallel<C, Muon> {
    /// Distributed Muon over the float variables of `varmap` in one line:
    /// [`Muon::from_varmap`] then [`for_optimizer`](Self::for_optimizer). Each
    /// rank runs momentum, spectral decay and Newton–Schulz only on the
    /// matrices it owns (same-shape ones batched), and the Adam moments of the
    /// AdamW-routed parameters are sharded the same way (ZeRO-1). Collective.
    pub fn muon(
        comm: C,
        varmap: &candle_nn::VarMap,
        muon: MuonConfig,
        config: DataParallelConfig,
    ) -> Result<Self> {
        Self::for_optimizer(comm, Muon::from_varmap(varmap, muon)?, config)
    }
}

impl<C: Collective, O: ShardedStep> DataParallel<C, O> {
    /// Plans `params` (named `Var`s, **in the optimizer's parameter order**:
    /// index `i` here is index `i` of [`ShardedStep::step_subset`]; use the
    /// optimizer's names, which [`save_state`](Self::save_state) and
    /// [`load_state`](Self::load_state) rely on) over the ranks of `comm` and
    /// checks, with one all-gather, that every rank has the same parameter
    /// list (names, shapes, dtypes), options and optimizer settings
    /// ([`ShardedStep::settings`]: learning rate, hyperparameters, schedule);
    /// then, if
    /// `config.broadcast_initial`, broadcasts rank 0's parameters. Every rank
    /// must call it (it is collective).
    pub fn new(
        comm: C,
        params: Vec<(String, Var)>,
        opt: O,
        config: DataParallelConfig,
    ) -> Result<Self> {
        let specs = params
            .iter()
            .map(|(name, v)| {
                if config
                    .elementwise_names
                    .iter()
                    .any(|s| name.contains(s.as_str()))
                {
                    ParamSpec::elementwise(name.clone(), v.dims())
                } else {
                    ParamSpec::new(name.clone(), v.dims())
                }
            })
            .collect();
        let plan = Plan::new(specs, comm.world_size())?;
        let vars = params.into_iter().map(|(_, v)| v).collect();
        Self::with_plan(comm, vars, plan, opt, config)
    }

    /// As [`new`](Self::new) with a plan made by the caller (it must list
    /// `vars`' shapes in order, for `comm`'s world size);
    /// `config.elementwise_names` is not used.
    pub fn with_plan(
        comm: C,
        vars: Vec<Var>,
        plan: Plan,
        opt: O,
        config: DataParallelConfig,
    ) -> Result<Self> {
        let who = format!("DataParallel::new (rank {})", comm.rank());
        let device = vars
            .first()
            .map(|v| v.device().clone())
            .unwrap_or(Device::Cpu);
        let param_dtype = if !vars.is_empty() && vars.iter().all(|v| v.dtype() == DType::BF16) {
            DType::BF16
        } else {
            DType::F32
        };
        // Every check that one rank can fail alone, before the first
        // collective: a rank that returned here would leave the others
        // waiting in `check_agreement`'s all-gather (forever, over NCCL).
        // It takes part in that exchange with a fingerprint no rank has, so
        // every rank refuses.
        let local = (|| -> Result<()> {
            if plan.world_size() != comm.world_size() {
                return Err(Error::config(
                    &who,
                    format!(
                        "the plan is for {} ranks, the communicator has {}",
                        plan.world_size(),
                        comm.world_size()
                    ),
                ));
            }
            if plan.len() != vars.len() {
                return Err(Error::config(
                    &who,
                    format!(
                        "the plan has {} parameters, got {} vars",
                        plan.len(),
                        vars.len()
                    ),
                ));
            }
            if !matches!(config.grad_dtype, DType::F32 | DType::BF16) {
                return Err(Error::config(
                    &who,
                    format!(
                        "grad_dtype must be F32 or BF16, got {:?}",
                        config.grad_dtype
                    ),
                ));
            }
            if let Some(c) = config.clip_grad_norm {
                if !(c.is_finite() && c > 0.0) {
                    return Err(Error::config(
                        &who,
                        format!("clip_grad_norm must be finite and > 0, got {c}"),
                    ));
                }
            }
            for (i, (v, s)) in vars.iter().zip(plan.specs()).enumerate() {
                if v.dims() != s.dims.as_slice() {
                    return Err(Error::shape(
                        &who,
                        format!(
                            "var {i} ({}) has shape {:?}, the plan says {:?}",
                            s.name,
                            v.dims(),
                            s.dims
                        ),
                    ));
                }
                if !matches!(v.dtype(), DType::F32 | DType::BF16 | DType::F16) {
                    return Err(Error::config(
                        &who,
                        format!(
                            "var {i} ({}) has dtype {:?}; f32, bf16 and f16 are supported",
                            s.name,
                            v.dtype()
                        ),
                    ));
                }
                if !v.device().same_device(vars[0].device()) {
                    return Err(Error::device(
                        &who,
                        format!("var {i} ({}) is on another device than var 0", s.name),
                    ));
                }
            }
            check_distinct(&vars, &plan, &who)?;
            if config.param_gather == ParamGather::Bf16Updates && param_dtype == DType::BF16 {
                return Err(Error::config(
                    &who,
                    "param_gather: Bf16Updates saves nothing when every parameter is bf16 (their \
                     gather is bf16 already) and would round each update: use \
                     ParamGather::Parameters",
                ));
            }
            if config.param_gather == ParamGather::Bf16Updates
                && opt.keeps_master_weights()
                && vars
                    .iter()
                    .any(|v| matches!(v.dtype(), DType::BF16 | DType::F16))
            {
                return Err(Error::config(
                    &who,
                    "param_gather: Bf16Updates rewrites each owner's bf16/f16 parameters from \
                     the rounded update, so their f32 master weights would be re-made from the \
                     parameters at every step and keep no precision: use \
                     ParamGather::Parameters",
                ));
            }
            if config.grad_dtype == DType::BF16 && !opt.keeps_master_weights() {
                // The owner casts the averaged bf16 gradient back to f16:
                // beyond 65504 (bf16 has f32's range) it overflows there,
                // after the ranks' finite check, into an Inf no rank sent.
                if let Some((i, s)) = vars
                    .iter()
                    .zip(plan.specs())
                    .enumerate()
                    .find_map(|(i, (v, s))| (v.dtype() == DType::F16).then_some((i, s)))
                {
                    return Err(Error::config(
                        &who,
                        format!(
                            "var {i} ({}) is f16 and grad_dtype is BF16: its averaged gradient \
                             would be cast from bf16 back to f16, which overflows beyond 65504 \
                             and keeps only bf16's 8 bits; use grad_dtype F32, or master \
                             weights (with_master_weights), which take the gradient in f32",
                            s.name
                        ),
                    ));
                }
            }
            Ok(())
        })();
        if let Err(e) = local {
            refuse_collectively(&comm, &device)?;
            return Err(e);
        }
        let two_phase = opt.agrees_before_commit();
        let masters = opt.keeps_master_weights();
        let plan_len = plan.len();
        let named = vars
            .iter()
            .zip(plan.specs())
            .map(|(v, s)| NamedVar {
                name: s.name.clone(),
                var: v.clone(),
            })
            .collect();
        let this = Self {
            comm,
            opt,
            vars,
            named,
            plan,
            config,
            param_dtype,
            device,
            steps: 0,
            last_norm: None,
            two_phase,
            masters,
            broken: None,
            stepped: vec![false; plan_len],
        };
        this.check_agreement()?;
        if this.config.broadcast_initial {
            this.sync_parameters()?;
        }
        Ok(this)
    }

    /// The communicator, its results checked against the trait's contract.
    fn coll(&self) -> Checked<'_, C> {
        Checked(&self.comm)
    }

    fn who(&self, op: &str) -> String {
        format!("DataParallel::{op} (rank {})", self.comm.rank())
    }

    /// One all-gather of two fingerprints, each in three f32-exact 22-bit
    /// pieces: the layout (plan, var dtypes, grad dtype, clipping:
    /// everything that decides which collectives a step issues and their
    /// sizes) and the optimizer's settings ([`ShardedStep::settings`]).
    fn check_agreement(&self) -> Result<()> {
        let mix = |h: u64, x: u64| (h ^ x).wrapping_mul(FNV_PRIME);
        let mut layout = self.plan.fingerprint();
        for v in &self.vars {
            layout = mix(layout, dtype_code(v.dtype()));
        }
        layout = mix(layout, dtype_code(self.config.grad_dtype));
        layout = mix(
            layout,
            self.config.clip_grad_norm.map_or(0, |c| c.to_bits() | 1),
        );
        layout = mix(layout, self.two_phase as u64);
        layout = mix(layout, self.config.param_gather.code());
        // (a rank that broadcasts while another does not would pair a
        // broadcast with a step's all-reduce)
        layout = mix(layout, self.config.broadcast_initial as u64);
        let settings = self
            .opt
            .settings()
            .map_or(0, |s| fnv1a(FNV_OFFSET, s.to_string().as_bytes()));
        let ours: Vec<f32> = [f32_pieces(layout), f32_pieces(settings)].concat();
        let t = Tensor::new(ours.as_slice(), &self.device)?;
        let all = self.coll().all_gather(&t)?.to_vec1::<f32>()?;
        let differ = |part: std::ops::Range<usize>| -> Vec<usize> {
            (0..self.comm.world_size())
                .filter(|&r| all[6 * r + part.start..6 * r + part.end] != ours[part.clone()])
                .collect()
        };
        let (layout_differs, settings_differ) = (differ(0..3), differ(3..6));
        if !layout_differs.is_empty() {
            let mut msg = format!(
                "the parameter list (names, shapes, dtypes), grad_dtype, clip_grad_norm, \
                 param_gather, broadcast_initial or the optimizer's two-phase step (ShardedStep::agrees_before_commit) differs from \
                 this rank's on rank(s) {layout_differs:?}"
            );
            if let Some(first) = self.first_param_difference()? {
                msg += &format!("; {first}");
            }
            return Err(Error::config(self.who("new"), msg));
        }
        if !settings_differ.is_empty() {
            return Err(Error::config(
                self.who("new"),
                format!(
                    "the optimizer's settings (learning rate, hyperparameters, partitions, master \
                     weights) differ \
                     from this rank's on rank(s) {settings_differ:?}: every rank must build the \
                     same optimizer"
                ),
            ));
        }
        Ok(())
    }

    /// After a layout mismatch, which parameter differs (collective: one
    /// all-gather of the parameter counts, one of a hash per parameter).
    fn first_param_difference(&self) -> Result<Option<String>> {
        let world = self.comm.world_size();
        let p = self.plan.len();
        let counts = Tensor::new(&[p as f32], &self.device)?;
        let counts: Vec<usize> = self
            .coll()
            .all_gather(&counts)?
            .to_vec1::<f32>()?
            .into_iter()
            .map(|c| c as usize)
            .collect();
        let longest = counts.iter().copied().max().unwrap_or(0);
        // Three f32-exact 22-bit pieces of each parameter's hash, padded
        // with -1 to the longest list.
        let mut ours = vec![-1f32; 3 * longest];
        for (i, (spec, v)) in self.plan.specs().iter().zip(&self.vars).enumerate() {
            let h = fnv1a(FNV_OFFSET, spec.name.as_bytes());
            let h = fnv1a(
                h,
                format!("{:?}|{:?}|{:?}", spec.dims, spec.kind, v.dtype()).as_bytes(),
            );
            ours[3 * i..3 * i + 3].copy_from_slice(&f32_pieces(h));
        }
        let t = Tensor::from_vec(ours.clone(), 3 * longest, &self.device)?;
        let all = self.coll().all_gather(&t)?.to_vec1::<f32>()?;
        let row = |r: usize| &all[3 * longest * r..3 * longest * (r + 1)];
        let first = (0..longest)
            .find(|&i| (0..world).any(|r| row(r)[3 * i..3 * i + 3] != ours[3 * i..3 * i + 3]));
        let Some(i) = first else {
            return Ok(None);
        };
        let ranks: Vec<usize> = (0..world)
            .filter(|&r| row(r)[3 * i..3 * i + 3] != ours[3 * i..3 * i + 3])
            .collect();
        let here = match self.plan.specs().get(i) {
            Some(s) => format!(
                "`{}` here, shape {:?}, {:?}",
                s.name,
                s.dims,
                self.vars[i].dtype()
            ),
            None => "none here".to_string(),
        };
        let mut msg =
            format!("the first difference is parameter {i} ({here}) on rank(s) {ranks:?}");
        if counts.iter().any(|&c| c != p) {
            msg += &format!("; parameter counts per rank: {counts:?}");
        }
        Ok(Some(msg))
    }

    /// Broadcasts rank 0's parameters to every rank (one broadcast of the flat
    /// buffer in the parameters' dtype). Collective.
    pub fn sync_parameters(&self) -> Result<()> {
        let values: Vec<Option<Tensor>> = self
            .vars
            .iter()
            .map(|v| Some(v.as_tensor().clone()))
            .collect();
        let flat = self.plan.pack(&values, self.param_dtype, &self.device)?;
        let flat = self.coll().broadcast(&flat, 0)?;
        if self.comm.rank() != 0 {
            for (v, t) in self.vars.iter().zip(self.plan.unpack(&flat)?) {
                v.set(&t.to_dtype(v.dtype())?)?;
            }
        }
        Ok(())
    }

    /// `loss.backward()` then [`step`](Self::step).
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        let grads = loss.backward()?;
        self.step(&grads)
    }

    /// One data-parallel step with this rank's gradients from a `GradStore`
    /// (looked up by each `Var`). Collective.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        let g: Vec<Option<Tensor>> = self
            .vars
            .iter()
            .map(|v| grads.get(v.as_tensor()).cloned())
            .collect();
        self.step_grads(&g)
    }

    /// One data-parallel step with this rank's gradients, one entry per
    /// parameter in parameter order (`None`: no gradient). Collective: every
    /// rank must call it (see the [module docs](self)).
    pub fn step_grads(&mut self, grads: &[Option<Tensor>]) -> Result<()> {
        let who = self.who("step");
        // Every rank holds the same `broken`, so all return here alike.
        if let Some(why) = &self.broken {
            return Err(Error::config(
                who,
                format!(
                    "refused: an earlier step failed after some owners had stepped ({why}); the \
                     ranks' optimizer states or schedule counters may disagree: load a \
                     checkpoint (load_state) on every rank to go on"
                ),
            ));
        }
        // 1. Check the gradients; a problem on any rank refuses the step on all.
        let (flat, has_grad) = self.check_gradients(grads, &who)?;
        // 2. One reduce-scatter: the averaged gradients of the owned parameters.
        // (A failure here is this rank's alone: it goes on to the clip's or
        // the all-gather's status, which every rank reads.)
        let owned = self
            .coll()
            .reduce_scatter(&flat, ReduceOp::Avg)
            .map_err(Error::from)
            .and_then(|chunk| self.owned_grads(&chunk, &has_grad));
        // 3. Clipping (collective when configured): refuses on every rank or
        // on none, before anything changed.
        let owned = match self.config.clip_grad_norm {
            None => owned,
            Some(max) => Ok(self.clip(owned, max, &has_grad)?),
        };
        // With bf16 updates, the owned parameters before the step (a copy:
        // the step writes the vars in place). A failure here is the owner
        // step's, reported like it.
        let (owned, before) = match self.config.param_gather {
            ParamGather::Parameters => (owned, None),
            ParamGather::Bf16Updates => {
                match owned.and_then(|o| Ok((o, self.owned_chunk(DType::F32)?.copy()?))) {
                    Ok((o, b)) => (Ok(o), Some(b)),
                    Err(e) => (Err(e), None),
                }
            }
        };
        // 4. The owner's step (two-phase optimizers: agreed by every rank).
        let step_result = match self.owner_step(owned) {
            OwnerStep::Refused(e) => return Err(e),
            OwnerStep::Ran(result) => result,
        };
        // 5. One all-gather of the owners' parameters (or updates) and their status.
        self.all_gather(step_result, before, &has_grad, who)?;
        for (s, &n) in self.stepped.iter_mut().zip(&has_grad) {
            *s |= n > 0.0;
        }
        self.steps += 1;
        Ok(())
    }

    /// Step 1 of the [module docs](self): local checks, then one all-reduce
    /// of the status vector, so that no rank returns before the others know.
    /// Returns the packed gradients and, per parameter, the number of ranks
    /// that have a gradient for it.
    fn check_gradients(&self, grads: &[Option<Tensor>], who: &str) -> Result<(Tensor, Vec<f32>)> {
        let world = self.comm.world_size();
        let rank = self.comm.rank();
        let p = self.plan.len();
        let mut local_error: Option<String> = None;
        let mut nonfinite: Vec<usize> = Vec::new();
        let mut flat = None;
        // (a setting every step would refuse, e.g. a learning rate set to
        // NaN on every rank: refused here, collectively, changing nothing)
        let settings_error = self.opt.check_ready(None).err();
        if let Some(e) = &settings_error {
            local_error = Some(e.to_string());
        } else if grads.len() != p {
            local_error = Some(format!(
                "expected {p} gradients (one per parameter), got {}",
                grads.len()
            ));
        } else {
            match self.plan.pack(grads, self.config.grad_dtype, &self.device) {
                Err(e) => local_error = Some(e.to_string()),
                Ok(f) => match all_finite(&f) {
                    Err(e) => local_error = Some(e.to_string()),
                    Ok(true) => flat = Some(f),
                    Ok(false) => nonfinite = self.nonfinite_params(grads),
                },
            }
        }
        // [non-finite flag per rank | error flag per rank | ranks with a
        // gradient, per parameter | ranks with a non-finite one, per parameter]
        let mut status = vec![0f32; 2 * world + 2 * p];
        if !nonfinite.is_empty() {
            status[rank] = 1.0;
            for &i in &nonfinite {
                status[2 * world + p + i] = 1.0;
            }
        }
        if local_error.is_some() {
            // (2: the optimizer's settings, 1: the gradients)
            status[world + rank] = if settings_error.is_some() { 2.0 } else { 1.0 };
        }
        if grads.len() == p {
            for (i, g) in grads.iter().enumerate() {
                if g.is_some() {
                    status[2 * world + i] = 1.0;
                }
            }
        }
        let status = Tensor::from_vec(status, 2 * world + 2 * p, &self.device)?;
        let status = self
            .coll()
            .all_reduce(&status, ReduceOp::Sum)?
            .to_vec1::<f32>()?;
        let bad_ranks: Vec<usize> = (0..world).filter(|&r| status[r] != 0.0).collect();
        let err_ranks: Vec<usize> = (0..world).filter(|&r| status[world + r] != 0.0).collect();
        if !err_ranks.is_empty() {
            let (settings, gradients): (Vec<usize>, Vec<usize>) =
                err_ranks.iter().partition(|&&r| status[world + r] == 2.0);
            let mut what = Vec::new();
            if !settings.is_empty() {
                what.push(format!(
                    "invalid optimizer settings on rank(s) {settings:?}"
                ));
            }
            if !gradients.is_empty() {
                what.push(format!("invalid gradients on rank(s) {gradients:?}"));
            }
            if !bad_ranks.is_empty() {
                what.push(format!("non-finite gradient on rank(s) {bad_ranks:?}"));
            }
            if let Some(e) = local_error {
                what.push(format!("here: {e}"));
            }
            let msg = format!(
                "step refused on every rank, nothing changed: {}",
                what.join("; ")
            );
            return Err(if settings.is_empty() {
                Error::shape(who, msg)
            } else {
                Error::config(who, msg)
            });
        }
        if !bad_ranks.is_empty() {
            // The same parameter on every rank: the first one any rank flagged
            // (or, if only the packed buffer was flagged, the first parameter).
            let first = (0..p).find(|&i| status[2 * world + p + i] != 0.0);
            let param = match first {
                Some(i) => self.plan.specs()[i].name.clone(),
                None => format!("(a gradient on rank(s) {bad_ranks:?})"),
            };
            return Err(Error::NonFiniteGradient { param });
        }
        let has_grad = status[2 * world..2 * world + p].to_vec();
        Ok((flat.expect("checked above"), has_grad))
    }

    /// This rank's share of the reduce-scatter, as the gradients of the
    /// parameters it owns and some rank has a gradient for, in their dtypes
    /// (f32 for a bf16/f16 parameter stepped through an f32 master weight,
    /// which would only lose bits in between).
    /// An error here is reported by the next collective (clipping or the
    /// owner's step), so no rank waits in vain.
    fn owned_grads(&self, chunk: &Tensor, has_grad: &[f32]) -> Result<Vec<(usize, Tensor)>> {
        let mut owned = Vec::new();
        for (i, g) in self.plan.unpack_owned(self.comm.rank(), chunk)? {
            if has_grad[i] > 0.0 {
                let dt = crate::params::stepped_dtype(self.vars[i].dtype(), self.masters);
                owned.push((i, g.to_dtype(dt)?));
            }
        }
        Ok(owned)
    }

    /// Step 4: the owner's step. With a two-phase optimizer, every rank
    /// agrees (one all-reduce) after the part that can fail: a failure
    /// anywhere is undone everywhere and the step refused on every rank
    /// ([`OwnerStep::Refused`]). Any other error is left for the
    /// all-gather's status element, so the other ranks never wait in vain.
    fn owner_step(&mut self, owned: Result<Vec<(usize, Tensor)>>) -> OwnerStep {
        if !self.two_phase {
            return OwnerStep::Ran(owned.and_then(|owned| self.opt.step_subset(&owned)));
        }
        let (comm, plan, device) = (&Checked(&self.comm), &self.plan, &self.device);
        let (calls, refused) = (std::cell::Cell::new(0), std::cell::Cell::new(false));
        let mut agree = |e: Option<&Error>| {
            calls.set(calls.get() + 1);
            if calls.get() > 1 {
                // (a second all-reduce would pair with another collective)
                return Err(Error::config(
                    "ShardedStep::step_subset_agreed",
                    "called `agree` twice; it must be called exactly once",
                ));
            }
            let verdict = agree_on_shares(comm, plan, device, e);
            refused.set(verdict.is_err());
            verdict
        };
        let mut result = match owned {
            Ok(owned) => self.opt.step_subset_agreed(&owned, &mut agree),
            Err(e) => Err(agree(Some(&e)).err().unwrap_or(e)),
        };
        if calls.get() == 0 {
            // An implementation that never asked: ask now, so that every
            // rank issues the same collectives; it undid nothing.
            let verdict = agree(result.as_ref().err());
            result = Err(Error::config(
                "ShardedStep::step_subset_agreed",
                format!(
                    "returned without calling `agree` (it must call it exactly once; \
                     result {result:?}, verdict {verdict:?}); this rank's share may \
                     disagree with the other ranks: sync_parameters and load a checkpoint"
                ),
            ));
        }
        if refused.get() {
            // The same on every rank, and nothing changed: no all-gather.
            return OwnerStep::Refused(result.err().unwrap_or_else(|| {
                Error::config(
                    "ShardedStep::step_subset_agreed",
                    "returned Ok after `agree` refused the step (it must undo its first phase \
                     and return that error); this rank's share may disagree with the other \
                     ranks: sync_parameters and load a checkpoint",
                )
            }));
        }
        OwnerStep::Ran(result)
    }

    /// This rank's owned parameters as a chunk of `dtype` (`chunk_len`
    /// elements, zero-padded; may share storage with the vars).
    fn owned_chunk(&self, dtype: DType) -> Result<Tensor> {
        let values: Vec<Tensor> = self.vars.iter().map(|v| v.as_tensor().clone()).collect();
        Ok(self
            .plan
            .pack_owned(self.comm.rank(), &values, dtype, &self.device)?)
    }

    /// Step 5: one all-gather of the owners' parameters (or, with
    /// [`ParamGather::Bf16Updates`], of their updates since `before`, this
    /// rank's owned parameters before the step), each rank's with a status
    /// element (its step's error kind, or [`PACK_FAILED`]); every rank
    /// writes the parameters it does not own (with updates: every parameter
    /// some rank had a gradient for, its own included). A failure anywhere
    /// is the same error on every rank, and marks every rank broken.
    fn all_gather(
        &mut self,
        step_result: Result<()>,
        before: Option<Tensor>,
        has_grad: &[f32],
        who: String,
    ) -> Result<()> {
        let (world, rank) = (self.comm.world_size(), self.comm.rank());
        let cl = self.plan.chunk_len();
        let updates = self.config.param_gather == ParamGather::Bf16Updates;
        let dtype = if updates {
            DType::BF16
        } else {
            self.param_dtype
        };
        let payload = match (&before, updates) {
            (_, false) => self.owned_chunk(dtype),
            (Some(before), true) => self
                .owned_chunk(DType::F32)
                .and_then(|after| Ok((after - before)?.to_dtype(dtype)?)),
            (None, true) => Err(Error::device(
                &who,
                "the copy of the owned parameters before the step failed",
            )),
        };
        let (send, pack_error) = match payload {
            Ok(c) => {
                let flag = step_result.as_ref().err().map_or(0.0, kind_code);
                let flag = Tensor::new(&[flag], &self.device)?.to_dtype(dtype)?;
                (Tensor::cat(&[&c, &flag], 0)?, None)
            }
            Err(e) => {
                let mut v = vec![0f32; cl + 1];
                v[cl] = PACK_FAILED;
                (
                    Tensor::from_vec(v, cl + 1, &self.device)?.to_dtype(dtype)?,
                    Some(e),
                )
            }
        };
        let flags = match self.gather_and_write(&send, before.as_ref(), has_grad) {
            Ok(flags) => flags,
            Err(e) => {
                // The owners have stepped (this rank's share at least) and
                // the others' parameters were not (all) written here: the
                // ranks may now differ, so no further step may run.
                self.broken = Some(format!(
                    "the all-gather after the owners' step failed on rank {rank}: parameters \
                     may differ across ranks (restore them, e.g. sync_parameters, as well)"
                ));
                return Err(Error::device(
                    who,
                    format!(
                        "the all-gather after the owners' step failed here ({e}); further steps \
                         are refused until load_state"
                    ),
                ));
            }
        };
        let failed: Vec<usize> = (0..world).filter(|&r| flags[r] != 0.0).collect();
        if failed.is_empty() {
            return Ok(());
        }
        let mut msg = format!(
            "the optimizer step failed on rank(s) {failed:?}; the other owners' parameters were stepped \
             (parameters agree across ranks except those of ranks whose packing failed)"
        );
        if let Err(e) = step_result {
            msg += &format!("; here: {e}");
        }
        if let Some(e) = pack_error {
            msg += &format!("; here (packing): {e}");
        }
        // Every rank saw the same flags: all are marked alike.
        self.broken = Some(format!("the owners' step failed on rank(s) {failed:?}"));
        msg += "; further steps are refused until load_state";
        Err(error_of_kind(flags[failed[0]], who, msg))
    }

    /// Step 5's collective: the all-gather of `send` (this rank's owned
    /// parameters or updates, and status), then the parameters written
    /// (those of owners whose packing did not fail); returns every rank's
    /// status. With updates, `W ← W_old + ΔW` in f32 on every rank alike,
    /// `W_old` the var (or, for this rank's own parameters, `before`).
    fn gather_and_write(
        &mut self,
        send: &Tensor,
        before: Option<&Tensor>,
        has_grad: &[f32],
    ) -> Result<Vec<f32>> {
        let (world, rank) = (self.comm.world_size(), self.comm.rank());
        let cl = self.plan.chunk_len();
        let gathered = self.coll().all_gather(send)?.reshape((world, cl + 1))?;
        let flags: Vec<f32> = gathered
            .narrow(1, cl, 1)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        let payload = gathered.narrow(1, 0, cl)?.contiguous()?;
        let before: HashMap<usize, Tensor> = match before {
            Some(b) => self.plan.unpack_owned(rank, b)?.into_iter().collect(),
            None => HashMap::new(),
        };
        for (i, t) in self.plan.unpack(&payload)?.into_iter().enumerate() {
            let o = self.plan.owner(i);
            if flags[o] == PACK_FAILED {
                continue;
            }
            let v = &self.vars[i];
            match self.config.param_gather {
                ParamGather::Parameters if o != rank => v.set(&t.to_dtype(v.dtype())?)?,
                ParamGather::Parameters => {}
                ParamGather::Bf16Updates if has_grad[i] > 0.0 => {
                    let old = if o == rank {
                        before.get(&i).cloned().ok_or_else(|| {
                            Error::device(
                                self.who("step"),
                                format!("no copy of owned parameter {i} before the step"),
                            )
                        })?
                    } else {
                        v.as_tensor().to_dtype(DType::F32)?
                    };
                    v.set(&(old + t.to_dtype(DType::F32)?)?.to_dtype(v.dtype())?)?;
                }
                ParamGather::Bf16Updates => {}
            }
        }
        Ok(flags)
    }

    /// Lets steps run again after a step that failed partway (see the
    /// [module docs](self)) without loading a checkpoint. Call it on every
    /// rank, and only when the optimizer's failure changed nothing on its
    /// rank and its state holds no step counter that the others advanced
    /// (e.g. not under [`Scheduled`](crate::schedule::Scheduled)): the
    /// failed rank's share then simply skipped that step.
    pub fn clear_failure(&mut self) {
        self.broken = None;
    }

    /// Step 3 of the [module docs](self): one all-reduce of the owned
    /// parameters' `Σ g²` (f32, one slot per parameter, zeros elsewhere, so
    /// the sum over ranks is exact in any order) plus an error count; every
    /// rank then computes the same norm, in [`crate::clip::grad_norm`]'s
    /// arithmetic, and scales its own gradients. As there, finite gradients
    /// whose f32 sum of squares overflows or is 0 are measured again scaled
    /// by the largest entry (two more all-reduces, only then).
    /// `has_grad[i]`: how many ranks have a gradient for parameter `i`.
    fn clip(
        &mut self,
        owned: Result<Vec<(usize, Tensor)>>,
        max: f64,
        has_grad: &[f32],
    ) -> Result<Vec<(usize, Tensor)>> {
        let p = self.plan.len();
        // (f32 terms: this layer supports no f64 parameters)
        let term = |scale: f64| move |g: &Tensor| squared_norm_term(g, scale);
        let (local, sq) = match owned.and_then(|owned| {
            let sq = per_param(p, &owned, term(1.0))?;
            Ok((owned, sq))
        }) {
            Ok((owned, sq)) => (Ok(owned), sq),
            Err(e) => {
                let mut flagged = vec![0f32; p + 1];
                flagged[p] = 1.0;
                (Err(e), flagged)
            }
        };
        let sq = self.all_reduce_host(sq)?;
        let who = self.who("step");
        if sq[p] != 0.0 {
            let mut msg = format!(
                "step refused on every rank, nothing changed: preparing the gradients failed on {} rank(s)",
                sq[p]
            );
            if let Err(e) = local {
                msg += &format!("; here: {e}");
            }
            return Err(Error::device(who, msg));
        }
        let owned = local?;
        // Parameter order, f64: the single-process sum over the parameters.
        let total = |sq: &[f32]| -> f64 {
            (0..p)
                .filter(|&i| has_grad[i] > 0.0)
                .map(|i| sq[i] as f64)
                .sum()
        };
        let mut norm = total(&sq).sqrt();
        if !norm.is_finite() || norm == 0.0 {
            // As clip::grad_norm: overflow of finite gradients (a NaN/Inf
            // was refused in step 1, but an average may overflow) or
            // underflow: measure again scaled by the largest magnitude.
            // (an empty gradient has no largest entry: 0, as clip::grad_norm
            // skips it; candle's max over an empty tensor panics)
            let maxima = per_param(p, &owned, |g| {
                if g.elem_count() == 0 {
                    Tensor::zeros((), DType::F32, g.device())
                } else {
                    g.abs()?.max_all()?.to_dtype(DType::F32)
                }
            })?;
            let maxima = self.all_reduce_host(maxima)?;
            let m = crate::linalg::max_or_nan(
                (0..p)
                    .filter(|&i| has_grad[i] > 0.0)
                    .map(|i| maxima[i] as f64),
            );
            if m.is_finite() && m > 0.0 {
                let scaled = per_param(p, &owned, term(1.0 / m))?;
                norm = m * total(&self.all_reduce_host(scaled)?).sqrt();
            }
        }
        self.last_norm = Some(norm);
        if !norm.is_finite() {
            return Err(Error::numerical(
                who,
                format!(
                    "the global gradient norm is {norm}; step refused on every rank, nothing changed"
                ),
            ));
        }
        if norm <= max {
            return Ok(owned);
        }
        let scale = max / norm;
        owned
            .into_iter()
            .map(|(i, g)| Ok((i, crate::clip::scaled_by(&g, scale)?)))
            .collect()
    }

    /// The sum over ranks of `v` (f32 on the host), through one all-reduce.
    fn all_reduce_host(&self, v: Vec<f32>) -> Result<Vec<f32>> {
        let n = v.len();
        let t = Tensor::from_vec(v, n, &self.device)?;
        Ok(self
            .coll()
            .all_reduce(&t, ReduceOp::Sum)?
            .to_vec1::<f32>()?)
    }

    /// Indices of the parameters whose local gradient is not finite (slow
    /// path, only after the packed check failed).
    fn nonfinite_params(&self, grads: &[Option<Tensor>]) -> Vec<usize> {
        let mut out = Vec::new();
        for (i, g) in grads.iter().enumerate() {
            if let Some(g) = g {
                let finite = g
                    .to_dtype(self.config.grad_dtype)
                    .map_err(Error::from)
                    .and_then(|g| all_finite(&g))
                    .unwrap_or(false);
                if !finite {
                    out.push(i);
                }
            }
        }
        out
    }

    /// The global norm of the averaged gradient before clipping, at the last
    /// step that got as far as clipping (`None` without
    /// [`DataParallelConfig::clip_grad_norm`]). The same on every rank.
    pub fn last_grad_norm(&self) -> Option<f64> {
        self.last_norm
    }

    /// This rank's communicator.
    pub fn comm(&self) -> &C {
        &self.comm
    }

    /// The optimizer (holding state only for this rank's parameters).
    pub fn optimizer(&self) -> &O {
        &self.opt
    }

    /// The optimizer, mutably (e.g. to set the learning rate; every rank must
    /// make the same change).
    pub fn optimizer_mut(&mut self) -> &mut O {
        &mut self.opt
    }

    /// The ownership plan.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// The options.
    pub fn config(&self) -> &DataParallelConfig {
        &self.config
    }

    /// The parameters, in parameter order.
    pub fn vars(&self) -> &[Var] {
        &self.vars
    }

    /// The parameters this rank owns, in chunk order.
    pub fn owned(&self) -> &[usize] {
        self.plan.owned(self.comm.rank())
    }

    /// Number of steps taken (refused steps are not counted).
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The parameters that no rank has had a gradient for in any successful
    /// step (the same on every rank), in order: what
    /// [`Driver::never_stepped`](crate::optim::Driver::never_stepped) is in
    /// one process (each rank's driver steps only its share).
    pub fn never_stepped(&self) -> Vec<&str> {
        self.plan
            .specs()
            .iter()
            .zip(&self.stepped)
            .filter(|(_, &s)| !s)
            .map(|(spec, _)| spec.name.as_str())
            .collect()
    }

    /// The communicator and the optimizer.
    pub fn into_parts(self) -> (C, O) {
        (self.comm, self.opt)
    }
}

impl<C: Collective, O: ShardedStep + OptimizerState> DataParallel<C, O> {
    /// Saves the optimizer state as one checkpoint in the directory `dir`
    /// (created if needed; shared by all ranks, e.g. a network file system
    /// for several hosts): each rank writes its own state — the parameters
    /// it owns — to `rank-<r>-of-<N>.safetensors` (with the usual CRC-32
    /// checks), then rank 0 writes `manifest.json` listing the files and
    /// their whole-file CRC-32s, and removes the rank files of another world
    /// size that an earlier save left in `dir`. Collective; an error on any
    /// rank is an error on every rank, and then no manifest is written (and
    /// nothing is removed). Refused (on every rank) after a step that
    /// failed partway, until [`load_state`](Self::load_state) or
    /// [`clear_failure`](Self::clear_failure). The model's parameters
    /// are not included (they are identical on every rank: save them from
    /// rank 0).
    pub fn save_state(&self, dir: impl AsRef<Path>) -> Result<()> {
        self.save_state_with(dir.as_ref(), Ok(HashMap::new()))
    }

    /// [`save_state`](Self::save_state) with `extra` entries (a wrapper's
    /// own, e.g. [`Accumulate`](crate::accumulate::Accumulate)'s pending
    /// sums) added to this rank's file; their keys must differ from the
    /// other ranks' unless their values are equal (the files are merged on
    /// loading). An error in `extra` is an error on every rank.
    pub(crate) fn save_state_with(
        &self,
        dir: &Path,
        extra: Result<HashMap<String, Tensor>>,
    ) -> Result<()> {
        // After a step that failed partway the ranks' states may disagree:
        // such a checkpoint would load, clear the failure and keep the
        // disagreement (or, with differing counters, never load at all).
        let state = match &self.broken {
            Some(why) => Err(Error::config(
                self.who("save_state"),
                format!(
                    "refused: an earlier step failed after some owners had stepped ({why}); \
                     the ranks' states may disagree, so this checkpoint could not restore a \
                     consistent one: load_state (or clear_failure) first"
                ),
            )),
            None => self.opt.state_dict().and_then(|mut state| {
                state.extend(extra?);
                Ok(state)
            }),
        };
        // (save_sharded checks the communicator's results itself)
        save_sharded(&self.comm, &self.device, &self.plan, state, dir)
    }

    /// Loads a checkpoint written by [`save_state`](Self::save_state) at any
    /// world size (a directory), or by a single-process optimizer
    /// (`OptimizerState::save_state`, one file): reads the union of its
    /// state ([`load_union`]) and keeps only the entries of the parameters
    /// this rank owns under the current plan
    /// ([`checkpoint::restrict`](crate::checkpoint::restrict)), so optimizer
    /// memory stays sharded. Collective and all-or-nothing: if loading fails
    /// on any rank, every rank keeps (or gets back) its previous state and
    /// returns an error. The parameters' values are not part of it.
    pub fn load_state(&mut self, path: impl AsRef<Path>) -> Result<()> {
        self.load_state_with(path.as_ref(), |_| Ok(()))
    }

    /// [`load_state`](Self::load_state), where `take` first removes and
    /// validates a wrapper's own entries from the checkpoint's union (e.g.
    /// [`Accumulate`](crate::accumulate::Accumulate)'s); what it returns is
    /// returned only if the load succeeded on every rank (so the wrapper
    /// commits it then), and an error from it is an error on every rank.
    pub(crate) fn load_state_with<T>(
        &mut self,
        path: &Path,
        take: impl FnOnce(&mut HashMap<String, Tensor>) -> Result<T>,
    ) -> Result<T> {
        let who = self.who("load_state");
        let names: Vec<&str> = self
            .owned()
            .iter()
            .map(|&i| self.plan.specs()[i].name.as_str())
            .collect();
        let mut previous = None;
        let local = (|| -> Result<T> {
            let mut union = load_union(path)?;
            let taken = take(&mut union)?;
            let mine = restrict(&union, &names)?;
            previous = Some(self.opt.state_dict()?);
            self.opt.load_state_dict(&mine)?;
            Ok(taken)
        })();
        let flag = Tensor::new(&[if local.is_ok() { 0f32 } else { 1f32 }], &self.device)?;
        let verdict = self
            .coll()
            .all_reduce(&flag, ReduceOp::Sum)
            .and_then(|t| t.to_vec1::<f32>());
        let mut msg = match verdict {
            Ok(failed) if failed[0] == 0.0 => {
                // A consistent state on every rank again.
                self.broken = None;
                return local;
            }
            Ok(failed) => format!(
                "loading {} failed on {} rank(s); every rank kept its previous state",
                path.display(),
                failed[0]
            ),
            // This rank cannot know whether the others loaded: it keeps its
            // previous state, as on a refusal.
            Err(e) => format!(
                "loading {}: the agreement all-reduce failed here ({e}); this rank kept its \
                 previous state",
                path.display()
            ),
        };
        // Roll back a rank whose own load succeeded.
        match local {
            Err(e) => msg += &format!("; here: {e}"),
            Ok(_) => {
                let prev = previous.expect("set before a successful load");
                if let Err(e) = self.opt.load_state_dict(&prev) {
                    msg += &format!("; here, restoring the previous state failed too: {e}");
                }
            }
        }
        Err(Error::checkpoint(who, msg))
    }
}

/// `f` of each owned gradient (an f32 scalar), at its parameter's slot of a
/// vector of `p + 1` zeros (the last slot: the error count of the clip's
/// all-reduce); one host sync for all.
/// Refuses a parameter listed twice (by name or by variable): each copy
/// would be owned, stepped and gathered on its own, and the ranks' values
/// of it would diverge.
fn check_distinct(vars: &[Var], plan: &Plan, who: &str) -> Result<()> {
    use crate::params::first_repeat;
    if let Some((j, i)) = first_repeat(plan.specs().iter().map(|s| s.name.as_str())) {
        let name = &plan.specs()[i].name;
        return Err(Error::config(
            who,
            format!("vars {j} and {i} are both named `{name}`"),
        ));
    }
    if let Some((j, i)) = first_repeat(vars.iter().map(|v| v.id())) {
        let name = |k: usize| &plan.specs()[k].name;
        return Err(Error::config(
            who,
            format!(
                "vars {j} ({}) and {i} ({}) are the same variable (list it once)",
                name(j),
                name(i)
            ),
        ));
    }
    Ok(())
}

/// The collectives of a refused `check_agreement` (its all-gather and
/// `first_param_difference`'s two), made by a rank that failed a local
/// check: a fingerprint of NaN, which matches no rank's, no parameters.
/// The other ranks then refuse too, naming this one, instead of waiting.
fn refuse_collectively<C: Collective>(comm: &C, device: &Device) -> Result<()> {
    let poison = Tensor::new(&[f32::NAN; 6], device)?;
    Checked(comm).all_gather(&poison)?;
    let counts = Checked(comm)
        .all_gather(&Tensor::new(&[0f32], device)?)?
        .to_vec1::<f32>()?;
    let longest = counts.iter().fold(0f32, |a, &c| a.max(c)) as usize;
    let pad = Tensor::from_vec(vec![-1f32; 3 * longest], 3 * longest, device)?;
    Checked(comm).all_gather(&pad)?;
    Ok(())
}

fn per_param(
    p: usize,
    owned: &[(usize, Tensor)],
    f: impl Fn(&Tensor) -> candle_core::Result<Tensor>,
) -> Result<Vec<f32>> {
    let mut out = vec![0f32; p + 1];
    if owned.is_empty() {
        return Ok(out);
    }
    let vals = owned
        .iter()
        .map(|(_, g)| f(g))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let vals = Tensor::stack(&vals, 0)?.to_vec1::<f32>()?;
    for ((i, _), v) in owned.iter().zip(vals) {
        out[*i] = v;
    }
    Ok(out)
}

/// The parameters in plan order, with the plan's names (for wrappers such
/// as [`Accumulate::data_parallel`](crate::accumulate::Accumulate::data_parallel)).
impl<C: Collective, O: ShardedStep> HasParams for DataParallel<C, O> {
    fn params(&self) -> &[NamedVar] {
        &self.named
    }
    fn keeps_master_weights(&self) -> bool {
        self.masters
    }
    fn steps_collectively(&self) -> bool {
        true
    }
}

/// [`DataParallel::step`]: collective, every rank must call it.
impl<C: Collective, O: ShardedStep> TryStep for DataParallel<C, O> {
    fn try_step(&mut self, grads: &GradStore) -> Result<()> {
        self.step(grads)
    }
}

/// What the owner's step ([`DataParallel::owner_step`]) leaves for the
/// all-gather.
enum OwnerStep {
    /// Every rank refused the step in the two-phase agreement and undid its
    /// share: the same error everywhere, and no all-gather follows.
    Refused(Error),
    /// The step ran (or failed outside any agreement): the result goes to
    /// the other ranks in the all-gather's status element.
    Ran(Result<()>),
}

/// The agreement of a two-phase step ([`ShardedStep::step_subset_agreed`]):
/// one all-reduce of what each rank's first phase found (`e`: its error, if
/// any). `Ok` when no rank failed; otherwise the same error on every rank —
/// of the kind of the first failed rank's error, about the parameter it
/// names (when it names one of the plan's) — saying that the step was
/// refused everywhere, plus, on a failed rank, its own error.
fn agree_on_shares<C: Collective>(
    comm: &C,
    plan: &Plan,
    device: &Device,
    e: Option<&Error>,
) -> Result<()> {
    let (world, rank) = (comm.world_size(), comm.rank());
    // Per rank: [failed | index of the parameter its error names, + 1 | kind].
    let mut status = vec![0f32; 3 * world];
    if let Some(e) = e {
        status[rank] = 1.0;
        let named = e
            .who()
            .and_then(|w| plan.specs().iter().position(|s| s.name == w));
        status[world + rank] = named.map_or(0.0, |i| (i + 1) as f32);
        status[2 * world + rank] = kind_code(e);
    }
    let status = Tensor::from_vec(status, 3 * world, device)?;
    let status = comm.all_reduce(&status, ReduceOp::Sum)?.to_vec1::<f32>()?;
    let failed: Vec<usize> = (0..world).filter(|&r| status[r] != 0.0).collect();
    let Some(&first) = failed.first() else {
        return Ok(());
    };
    let who = match status[world + first] as usize {
        0 => format!("DataParallel::step (rank {first})"),
        i => plan.specs()[i - 1].name.clone(),
    };
    let mut what = format!(
        "the optimizer step failed on rank(s) {failed:?}; every rank undid its share: the \
         step was refused on every rank, nothing changed"
    );
    if let Some(e) = e {
        what += &format!("; here: {e}");
    }
    Err(error_of_kind(status[2 * world + first], who, what))
}

/// A 64-bit hash as three 22-bit pieces, each exact in f32 (for a
/// collective of f32 tensors).
fn f32_pieces(h: u64) -> [f32; 3] {
    [
        (h & 0x3f_ffff) as f32,
        ((h >> 22) & 0x3f_ffff) as f32,
        (h >> 44) as f32,
    ]
}

/// The status code of a rank whose packing of its parameters failed (step 5).
const PACK_FAILED: f32 = 8.0;

/// An error's kind as a small status code (exact in bf16), so that every
/// rank can report a failure of one rank as an error of the same kind.
fn kind_code(e: &Error) -> f32 {
    match e {
        Error::Numerical { .. } => 1.0,
        Error::Device { .. } | Error::Candle(_) => 2.0,
        Error::Shape { .. } => 3.0,
        Error::Config { .. } => 4.0,
        Error::NonFiniteGradient { .. } => 5.0,
        Error::Checkpoint { .. } => 6.0,
    }
}

/// The error of kind [`kind_code`] `code` (a device error for any other
/// code); a non-finite gradient's `param` is `who`, and `what` is dropped.
fn error_of_kind(code: f32, who: String, what: String) -> Error {
    match code as u32 {
        1 => Error::numerical(who, what),
        3 => Error::shape(who, what),
        4 => Error::config(who, what),
        5 => Error::NonFiniteGradient { param: who },
        6 => Error::checkpoint(who, what),
        _ => Error::device(who, what),
    }
}

/// `true` iff every element is finite: `sum(x · 0)` is 0 unless some `x` is
/// NaN or ±Inf (then NaN). One host sync.
fn all_finite(x: &Tensor) -> Result<bool> {
    if x.elem_count() == 0 {
        return Ok(true);
    }
    let s = x
        .affine(0.0, 0.0)?
        .sum_all()?
        .to_dtype(DType::F32)?
        .to_scalar::<f32>()?;
    Ok(s == 0.0)
}

fn dtype_code(d: DType) -> u64 {
    match d {
        DType::F32 => 1,
        DType::BF16 => 2,
        DType::F16 => 3,
        _ => 4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kind survives the status code that carries it to the other ranks.
    #[test]
    fn every_error_kind_round_trips_through_its_code() {
        let kinds = [
            Error::numerical("w", "x"),
            Error::device("w", "x"),
            Error::shape("w", "x"),
            Error::config("w", "x"),
            Error::NonFiniteGradient { param: "w".into() },
            Error::checkpoint("w", "x"),
        ];
        for e in kinds {
            let code = kind_code(&e);
            assert_eq!(code, half::bf16::from_f32(code).to_f32(), "exact in bf16");
            assert_ne!(code, PACK_FAILED);
            let back = error_of_kind(code, "w".into(), "x".into());
            assert_eq!(
                std::mem::discriminant(&back),
                std::mem::discriminant(&e),
                "{e:?} → {back:?}"
            );
        }
    }
}
