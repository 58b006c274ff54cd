//! The step driver: one implementation of the step protocol for every
//! optimizer.
//!
//! A [`Driver`] owns the named parameters, one or more partitions (a label,
//! a [`Chain`] and a learning-rate ratio), each parameter's state, and the
//! learning rate. A step:
//!
//! 1. picks the parameters that have a gradient (the others are skipped and
//!    keep their state), checking each gradient's shape; a gradient of
//!    another float dtype than its parameter (an f16 gradient of an f32
//!    weight) is converted to the parameter's dtype, one of an integer dtype
//!    refused;
//! 2. validates the learning rate of every partition (finite, ≥ 0, and each
//!    transform's rule, [`Transform::check_lr`]: decay needs `lr·λ ≤ 1`);
//! 3. makes the gradients contiguous, skips parameters with no elements, and
//!    checks every gradient for NaN/Inf in one pass ([`device::first_nonfinite`],
//!    one host sync on a GPU), refusing the step naming the parameter;
//! 4. groups the parameters by partition and by the shape of their matrix
//!    view (`(d₀, d₁·d₂·…)` for rank ≥ 2, the element count otherwise),
//!    dtype and device, so that such matrices run as one `(b, m, n)` batch
//!    (a `(4, 6)` weight and a `(4, 2, 3)` kernel share one);
//! 5. runs each group's chain; the updates happen in place.
//!
//! Everything that can fail on valid input is checked before the first
//! write, so a refused step changes nothing and no copy of the parameters or
//! state is kept. The exception is a chain with a fallible transform (a
//! retraction, a root solve): such groups run first, after an undo copy of
//! their own parameters and state, restored if any of them fails.

use std::collections::{BTreeMap, HashMap};

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use super::chain::Chain;
use super::transform::{FieldKind, FieldValue, Fields, GroupStep, Transform, TransformState};
use crate::checkpoint::{count_tensor, host_copy, read_count, split_key, Header, HEADER_KEY};
use crate::device;
use crate::error::{fail, Error, Result};
use crate::params::{
    check_params, has_master, name_vars, stepped_dtype, varmap_vars, NamedVar, ParamInfo,
};

/// One partition: the parameters labelled `label` run `chain` at
/// `lr × lr_ratio`.
#[derive(Clone, Debug)]
struct Part {
    label: String,
    chain: Chain,
    lr_ratio: f64,
}

type StateSlot = Option<Box<dyn TransformState>>;

/// A step's groups: (infallible, partition, member shape, dtype, device) →
/// members (parameter index, gradient).
type Groups = BTreeMap<(bool, usize, Vec<usize>, &'static str, String), Vec<(usize, Tensor)>>;

/// The verdict between the two phases of
/// [`Driver::step_subset_agreed`].
type Agree<'a> = dyn FnMut(Option<&Error>) -> Result<()> + 'a;

/// Undo copies of the fallible groups: per group, per member, the
/// parameter's index, value and state.
type Undo = Vec<Vec<Snapshot>>;

/// An undo copy of one parameter: its index, the value its chain updates
/// (its master weight, if it has one), the parameter itself when that is a
/// master's (its exact bits: a −0 or a NaN payload is not the master's
/// rounding), and its state.
type Snapshot = (usize, Tensor, Option<Tensor>, Vec<StateSlot>);

/// Runs chains of transforms over named parameters; implements
/// `candle_nn::Optimizer` and [`OptimizerState`](crate::OptimizerState).
/// Build one with [`Driver::new`] (one chain for every parameter) or with
/// [`Partition`](super::Partition) (a chain per label).
#[derive(Debug)]
pub struct Driver {
    params: Vec<NamedVar>,
    infos: Vec<ParamInfo>,
    parts: Vec<Part>,
    /// Partition index of each parameter.
    assign: Vec<usize>,
    /// `states[p][k]`: parameter `p`'s state for transform `k` of its chain.
    states: Vec<Vec<StateSlot>>,
    lr: f64,
    kind: String,
    /// Whether parameter `p` has had a gradient in a step that succeeded
    /// (since construction; see [`Driver::never_stepped`]).
    stepped: Vec<bool>,
    /// Whether bf16/f16 parameters step an f32 master copy
    /// ([`Driver::with_master_weights`]).
    master_weights: bool,
    /// `masters[p]`: the f32 master copy of parameter `p`, made at its first
    /// step (so a data-parallel rank holds only its owned parameters').
    masters: Vec<Option<Var>>,
}

/// The checkpoint slot of a parameter's master weight: `<param>.master_weight`
/// (no second dot, so no transform's `<param>.<transform>.<field>` key).
pub(crate) const MASTER_SLOT: &str = "master_weight";

/// A partition's `rate` (`lr × ratio`): a valid rate ([`check_lr`], as
/// `who`), and one each transform of `chain` allows (decay's `ηλ ≤ 1`, say;
/// its error about `about`).
fn check_partition_rate(who: &str, about: &str, rate: f64, chain: &Chain) -> Result<()> {
    check_lr(who, rate)?;
    chain
        .iter()
        .try_for_each(|(_, t)| t.check_lr(rate).map_err(|e| e.about(about)))
}

/// Errors unless `lr` is finite and ≥ 0, and within f32's range (the
/// updates of f32, bf16 and f16 parameters compute in f32, where a larger
/// rate is Inf and writes Inf/NaN weights).
pub(crate) fn check_lr(who: &str, lr: f64) -> Result<()> {
    if !(lr.is_finite() && lr >= 0.0) {
        fail!(
            Config,
            who,
            "learning rate must be finite and ≥ 0, got {lr}"
        );
    }
    if lr > f32::MAX as f64 {
        fail!(
            Config,
            who,
            "learning rate {lr} is beyond f32's range, in which the updates compute"
        );
    }
    Ok(())
}

/// The checkpoint header's body.
#[derive(Debug, Serialize, Deserialize)]
struct Body {
    lr: f64,
    partitions: Vec<PartRecord>,
    /// The partition label of each parameter, in the header's order.
    assignment: Vec<String>,
    /// Whether the bf16/f16 parameters step f32 master weights (absent in
    /// checkpoints written before master weights existed: `false`).
    #[serde(default)]
    master_weights: bool,
    config: serde_json::Value,
}

#[derive(Debug, Serialize, Deserialize)]
struct PartRecord {
    label: String,
    lr_ratio: f64,
    transforms: Vec<TransformRecord>,
}

#[derive(Debug, Serialize, Deserialize)]
struct TransformRecord {
    name: String,
    kind: String,
    hparams: serde_json::Value,
}

impl Driver {
    /// One chain for every parameter, at learning rate `lr`.
    pub fn new(vars: Vec<NamedVar>, chain: Chain, lr: f64) -> Result<Self> {
        let n = vars.len();
        Self::build(
            vars,
            vec![("all".to_string(), chain, 1.0)],
            vec![0; n],
            lr,
            "driver",
        )
    }

    /// One chain for the float variables of `varmap`, keeping their names.
    pub fn from_varmap(varmap: &candle_nn::VarMap, chain: Chain, lr: f64) -> Result<Self> {
        Self::new(varmap_vars(varmap)?, chain, lr)
    }

    /// The general constructor: `parts[k] = (label, chain, lr ratio)`,
    /// `assign[p]` the partition of parameter `p`.
    pub(crate) fn build(
        params: Vec<NamedVar>,
        parts: Vec<(String, Chain, f64)>,
        assign: Vec<usize>,
        lr: f64,
        kind: &str,
    ) -> Result<Self> {
        check_params(&params)?;
        check_lr("lr", lr)?;
        let parts: Vec<Part> = parts
            .into_iter()
            .map(|(label, chain, lr_ratio)| Part {
                label,
                chain,
                lr_ratio,
            })
            .collect();
        for p in &parts {
            p.chain.validate(&format!("partition `{}`", p.label))?;
            check_lr(&format!("partition `{}`: lr ratio", p.label), p.lr_ratio)?;
        }
        let infos: Vec<ParamInfo> = params.iter().map(ParamInfo::of).collect();
        for (info, &k) in infos.iter().zip(&assign) {
            for (_, t) in parts[k].chain.iter() {
                t.check(info)?;
            }
        }
        let states = assign
            .iter()
            .map(|&k| (0..parts[k].chain.len()).map(|_| None).collect())
            .collect();
        Ok(Self {
            stepped: vec![false; params.len()],
            master_weights: false,
            masters: vec![None; params.len()],
            params,
            infos,
            parts,
            assign,
            states,
            lr,
            kind: kind.to_string(),
        })
    }

    /// Sets the kind recorded in checkpoints (aliases set theirs).
    pub(crate) fn with_kind(mut self, kind: &str) -> Self {
        self.kind = kind.to_string();
        self
    }

    /// Steps every bf16/f16 parameter through an f32 **master weight**: the
    /// chain updates an f32 copy of the parameter, and the parameter is set
    /// to that copy rounded to its dtype (to nearest, ties to even) after
    /// each step. Without it, an update below half a unit in the last place
    /// of a weight is lost when the new weight is rounded: a bf16 weight
    /// near 1 holds 8 significant bits, so AdamW at `lr = 1e-4` leaves it
    /// unchanged step after step (fine-tuning a bf16 checkpoint at a small
    /// rate, or the end of a decaying schedule). With master weights the
    /// bf16 parameter follows, rounded, the trajectory of the same steps
    /// in f32.
    ///
    /// Costs 4 bytes per bf16/f16 parameter element (the master, made at the
    /// parameter's first step, saved in checkpoints as
    /// `<param>.master_weight`), and per step: the gradient cast to f32 (a
    /// temporary of 4 bytes per element), a check that each parameter still
    /// equals its master rounded, and the rounding into the parameter.
    /// **The parameter is the truth**: if it changed outside the optimizer
    /// (loaded weights, an edit, a checkpoint of another run) so that it no
    /// longer equals its master rounded, as numbers, the master is re-made
    /// from it at its next step, so no value written to a parameter is
    /// overwritten by a stale master. (A parameter holding a NaN never
    /// equals its master: its master is re-made at every step.) A refused
    /// step leaves the parameters' bits, the masters and the state as they
    /// were. f32 and f64 parameters are stepped as before (they have no
    /// master). The state of a bf16 parameter is f32 either way, so an
    /// optimizer checkpoint without master weights loads into one with them
    /// (the masters are then made from the parameters), not the reverse (a
    /// checkpoint holding masters is refused by an optimizer without: the
    /// precision they hold would be lost).
    pub fn with_master_weights(mut self) -> Self {
        self.master_weights = true;
        for info in &mut self.infos {
            info.dtype = stepped_dtype(info.dtype, true);
        }
        self
    }

    /// Whether the bf16/f16 parameters step f32 master weights
    /// ([`with_master_weights`](Self::with_master_weights)).
    pub fn master_weights(&self) -> bool {
        self.master_weights
    }

    /// The f32 master weight of parameter `name`, once it has had a step
    /// with [`with_master_weights`](Self::with_master_weights) or was loaded
    /// from a checkpoint (`None` for an f32/f64 parameter, or before its
    /// first step). A master that no longer rounds to its parameter (the
    /// parameter changed since) is returned as it is; the next step re-makes
    /// it from the parameter.
    pub fn master_weight(&self, name: &str) -> Option<&Tensor> {
        let p = self.params.iter().position(|v| v.name == name)?;
        self.masters[p].as_ref().map(|m| m.as_tensor())
    }

    /// The variable the chain of parameter `p` updates: its master weight,
    /// if it has one, else the parameter itself.
    fn working(&self, p: usize) -> &Var {
        self.masters[p].as_ref().unwrap_or(&self.params[p].var)
    }

    /// The parameters, with their names.
    pub fn params(&self) -> &[NamedVar] {
        &self.params
    }

    /// The learning rate (partitions run at this times their ratio).
    pub fn lr(&self) -> f64 {
        self.lr
    }

    /// Sets the learning rate. Not validated here (`candle_nn::Optimizer`
    /// cannot return an error): a step with a non-finite or negative rate is
    /// refused and changes nothing.
    pub fn set_lr(&mut self, lr: f64) {
        self.lr = lr;
    }

    /// The partition labels, in order.
    pub fn labels(&self) -> Vec<&str> {
        self.parts.iter().map(|p| p.label.as_str()).collect()
    }

    /// The partition label of parameter `name`.
    pub fn label_of(&self, name: &str) -> Option<&str> {
        let p = self.params.iter().position(|v| v.name == name)?;
        Some(&self.parts[self.assign[p]].label)
    }

    /// The learning-rate ratio of partition `label` to [`Driver::lr`].
    pub fn lr_ratio(&self, label: &str) -> Option<f64> {
        self.parts
            .iter()
            .find(|p| p.label == label)
            .map(|p| p.lr_ratio)
    }

    /// The chain of partition `label`.
    pub fn chain(&self, label: &str) -> Option<&Chain> {
        self.parts
            .iter()
            .find(|p| p.label == label)
            .map(|p| &p.chain)
    }

    /// The state parameter `name` keeps for its transform `transform`
    /// (`None` before its first step).
    pub fn state(&self, name: &str, transform: &str) -> Option<&dyn TransformState> {
        let p = self.params.iter().position(|v| v.name == name)?;
        let (k, _) = self.parts[self.assign[p]].chain.get(transform)?;
        self.states[p][k].as_deref()
    }

    /// [`Driver::state`] downcast to its type, e.g.
    /// `driver.state_as::<MyState>("fc.weight", "my_transform")` (`None`
    /// before the first step, or for another type).
    pub fn state_as<T: TransformState>(&self, name: &str, transform: &str) -> Option<&T> {
        self.state(name, transform)?.as_any().downcast_ref::<T>()
    }

    /// One step with the gradients of `grads` (see [`Driver`]: pick, validate, check, group, run).
    pub fn try_step(&mut self, grads: &GradStore) -> Result<()> {
        let mut picked = Vec::new();
        for (p, nv) in self.params.iter().enumerate() {
            if let Some(g) = grads.get(&nv.var) {
                picked.push((p, g.clone()));
            }
        }
        self.step_subset(&picked)
    }

    /// One step of the parameters at `grads[..].0` (indices into
    /// [`Driver::params`]) with the given gradients; the others are untouched.
    /// This is the step a data-parallel owner runs on its share.
    pub fn step_subset(&mut self, grads: &[(usize, Tensor)]) -> Result<()> {
        self.step_in_two_phases(grads, None)
    }

    /// [`step_subset`](Self::step_subset) with a verdict between its two
    /// phases, so that a failure anywhere can still be undone everywhere:
    /// steps 1–4 and the fallible groups run (under their undo copy), then
    /// `agree` is called **exactly once** — with the error so far, if any —
    /// and only if it returns `Ok` do the infallible groups run. If it
    /// returns an error, the fallible groups are undone and that error is
    /// returned: nothing changed. A data-parallel step passes a collective
    /// `agree` (every rank's success, all-reduced), so a retraction that
    /// fails at one owner leaves every rank's parameters and state as they
    /// were ([`crate::distributed`]). Costs nothing more than `step_subset`
    /// besides `agree` itself.
    pub fn step_subset_agreed(
        &mut self,
        grads: &[(usize, Tensor)],
        agree: &mut dyn FnMut(Option<&Error>) -> Result<()>,
    ) -> Result<()> {
        self.step_in_two_phases(grads, Some(agree))
    }

    /// Whether any partition's chain has a fallible transform (a
    /// retraction, a root solve): the groups whose step can fail on valid
    /// input, run first under an undo copy.
    pub fn has_fallible_chain(&self) -> bool {
        self.parts.iter().any(|p| p.chain.fallible())
    }

    fn step_in_two_phases(
        &mut self,
        grads: &[(usize, Tensor)],
        agree: Option<&mut Agree<'_>>,
    ) -> Result<()> {
        let first = self.checked_groups(grads).and_then(|(groups, unseeded)| {
            let replaced = self.seed_masters(&unseeded)?;
            match self.run_fallible_groups(&groups) {
                Ok(undo) => Ok((undo, groups, replaced)),
                Err(e) => {
                    self.unseed_masters(replaced);
                    Err(e)
                }
            }
        });
        let (undo, groups, _) = match agree {
            None => first?,
            Some(agree) => {
                let verdict = agree(first.as_ref().err());
                match first {
                    // Already undone; the verdict's error says more (which
                    // ranks failed) when there is one.
                    Err(e) => return Err(verdict.err().unwrap_or(e)),
                    Ok((undo, groups, replaced)) => match verdict {
                        Ok(()) => (undo, groups, replaced),
                        Err(e) => {
                            self.restore(undo);
                            self.unseed_masters(replaced);
                            return Err(e);
                        }
                    },
                }
            }
        };
        drop(undo);
        for (g, ((infallible, k, ..), members)) in groups.iter().enumerate() {
            if *infallible {
                // Cannot fail on input that passed 1–3; if it does anyway (a
                // device error, or a transform that fails without declaring
                // `fallible`), the step is partly applied: say so. The groups
                // before this one (fallible ones sort first) were applied.
                if let Err(e) = self.run_group(*k, members) {
                    let done: Vec<usize> = groups.values().take(g).flatten().map(|m| m.0).collect();
                    return Err(self
                        .named(e, members)
                        .noted(&self.partial_step(&done, members)));
                }
            }
        }
        for (p, _) in grads {
            self.stepped[*p] = true;
        }
        Ok(())
    }

    /// The parameters that have not had a gradient in any successful step
    /// of this driver (since it was built, in this process), in order: a
    /// diagnostic for a model whose parameters never train because no
    /// gradient reaches them — e.g. through candle-nn 0.11's fused
    /// `LayerNorm`/`RmsNorm` forward or `ops::softmax_last_dim`, which have
    /// no backward pass. Steps skip parameters without a gradient silently,
    /// as PyTorch's optimizers do. Under data-parallel training, each
    /// rank's driver steps only the parameters it owns, so there it lists
    /// the others' too: ask the
    /// [`DataParallel`](crate::distributed::DataParallel) instead.
    pub fn never_stepped(&self) -> Vec<&str> {
        self.params
            .iter()
            .zip(&self.stepped)
            .filter(|(_, &s)| !s)
            .map(|(v, _)| v.name.as_str())
            .collect()
    }

    /// The learning rate of every partition (`lr × ratio`), and what each of
    /// its transforms allows of it (decay's `ηλ ≤ 1`, say): the check a step
    /// makes before it writes anything, and data-parallel training before
    /// its first collective ([`ShardedStep::check_ready`](crate::distributed::ShardedStep::check_ready)).
    /// `lr`: the rate to check in place of the driver's own (a schedule's
    /// next one).
    pub(crate) fn check_rates(&self, lr: Option<f64>) -> Result<()> {
        let lr = lr.unwrap_or(self.lr);
        // (one chain for every parameter: its rate is the optimizer's `lr`)
        let single = self.parts.len() == 1 && self.parts[0].label == "all";
        for p in &self.parts {
            let (who, about) = if single {
                ("lr".to_string(), "lr".to_string())
            } else {
                (
                    format!("lr (partition `{}`)", p.label),
                    format!("partition `{}`", p.label),
                )
            };
            check_partition_rate(&who, &about, lr * p.lr_ratio, &p.chain).map_err(|e| {
                Error::config(
                    e.who().unwrap_or("lr"),
                    format!("{}; the step was not applied", strip(&e)),
                )
            })?;
        }
        Ok(())
    }

    /// Steps 1–4 of the protocol: nothing is written. Also returns the
    /// parameters whose master weight must be (re)made from the parameter
    /// before the step (see [`Driver::with_master_weights`]).
    fn checked_groups(&self, grads: &[(usize, Tensor)]) -> Result<(Groups, Vec<usize>)> {
        // 1. shapes.
        let mut seen = vec![false; self.params.len()];
        for (p, g) in grads {
            let Some(nv) = self.params.get(*p) else {
                fail!(Shape, "step_subset", "no parameter at index {p}");
            };
            if std::mem::replace(&mut seen[*p], true) {
                fail!(Shape, nv.name, "two gradients given for this parameter");
            }
            if g.shape() != nv.var.shape() {
                fail!(
                    Shape,
                    nv.name,
                    "gradient shape {:?} does not match the parameter shape {:?}",
                    g.dims(),
                    nv.var.dims()
                );
            }
            if !g.dtype().is_float() {
                // (a float dtype other than the parameter's is converted)
                fail!(
                    Shape,
                    nv.name,
                    "gradient of dtype {:?}: gradients are floating point",
                    g.dtype()
                );
            }
            if !g.device().same_device(nv.var.device()) {
                fail!(
                    Device,
                    nv.name,
                    "gradient on {:?}, parameter on {:?}",
                    g.device(),
                    nv.var.device()
                );
            }
        }
        // 2. learning rates, and what each transform allows of them.
        self.check_rates(None)?;
        // 3. finite check, one pass. The kernels read contiguous gradients
        // (a hand-made GradStore may hold a transposed view); parameters
        // with no elements have nothing to update and are skipped.
        let grads: Vec<(usize, Tensor)> = grads
            .iter()
            .filter(|(p, _)| self.infos[*p].elem_count() > 0)
            .map(|(p, g)| {
                let g = g.detach().contiguous()?;
                // (the master's f32 for a parameter that has one)
                let dt = self.infos[*p].dtype;
                Ok((
                    *p,
                    if g.dtype() == dt {
                        g
                    } else {
                        device::cast(&g, dt)?
                    },
                ))
            })
            .collect::<Result<_>>()?;
        let refs: Vec<&Tensor> = grads.iter().map(|(_, g)| g).collect();
        if let Some(i) = device::first_nonfinite(&refs)? {
            return Err(Error::NonFiniteGradient {
                param: self.params[grads[i].0].name.clone(),
            });
        }
        let stepped: Vec<usize> = grads.iter().map(|(p, _)| *p).collect();
        let unseeded = self.unseeded_masters(&stepped)?;
        // 4. groups.
        let mut groups = Groups::new();
        for (p, g) in grads {
            let info = &self.infos[p];
            let k = self.assign[p];
            let dims = match info.matrix() {
                Some((r, c)) => vec![r, c],
                None => vec![info.elem_count()],
            };
            let key = (
                !self.parts[k].chain.fallible(),
                k,
                dims,
                info.dtype.as_str(),
                format!("{:?}", info.device.location()),
            );
            groups.entry(key).or_default().push((p, g));
        }
        Ok((groups, unseeded))
    }

    /// Of the parameters `ps`, those that step a master weight and have
    /// none yet, or one that no longer rounds to the parameter (the
    /// parameter changed outside the optimizer).
    fn unseeded_masters(&self, ps: &[usize]) -> Result<Vec<usize>> {
        let mut out = Vec::new();
        let mut kept = Vec::new();
        for &p in ps {
            if !(self.master_weights && has_master(self.params[p].var.dtype())) {
                continue;
            }
            match &self.masters[p] {
                None => out.push(p),
                Some(_) => kept.push(p),
            }
        }
        let masters: Vec<&Tensor> = kept.iter().map(|&p| self.working(p).as_tensor()).collect();
        let params: Vec<&Tensor> = kept
            .iter()
            .map(|&p| self.params[p].var.as_tensor())
            .collect();
        let fresh = device::masters_round_to(&masters, &params)?;
        out.extend(
            kept.iter()
                .zip(fresh)
                .filter(|(_, ok)| !ok)
                .map(|(&p, _)| p),
        );
        Ok(out)
    }

    /// (Re)makes the master weights of `ps` from their parameters, as new
    /// variables; returns what they replace, for
    /// [`unseed_masters`](Self::unseed_masters) if the step is refused
    /// (which then leaves the state as it was, masters included).
    fn seed_masters(&mut self, ps: &[usize]) -> Result<Vec<(usize, Option<Var>)>> {
        let mut replaced = Vec::with_capacity(ps.len());
        for &p in ps {
            let param = self.params[p].var.as_tensor();
            match param
                .to_dtype(candle_core::DType::F32)
                .and_then(|m| Var::from_tensor(&m))
            {
                Ok(m) => replaced.push((p, self.masters[p].replace(m))),
                Err(e) => {
                    self.unseed_masters(replaced);
                    return Err(e.into());
                }
            }
        }
        Ok(replaced)
    }

    /// Puts back the master weights [`seed_masters`](Self::seed_masters) replaced.
    fn unseed_masters(&mut self, replaced: Vec<(usize, Option<Var>)>) {
        for (p, old) in replaced {
            self.masters[p] = old;
        }
    }

    /// Sets each parameter of `ps` that has a master weight to it, rounded.
    fn write_back_masters(&self, ps: impl Iterator<Item = usize>) -> Result<()> {
        let (masters, params): (Vec<&Tensor>, Vec<&Var>) = ps
            .filter_map(|p| Some((self.masters[p].as_ref()?.as_tensor(), &self.params[p].var)))
            .unzip();
        device::round_masters_into(&masters, &params)
    }

    /// Step 5's first phase: the fallible groups, each after an undo copy
    /// of its parameters and state; on error everything is restored, else
    /// the copies are returned (to restore if the step is refused later).
    fn run_fallible_groups(&mut self, groups: &Groups) -> Result<Undo> {
        let mut undo = Vec::new();
        for ((infallible, k, ..), members) in groups {
            if *infallible {
                continue;
            }
            let snapshot = self.snapshot(members.iter().map(|m| m.0));
            let snapshot = match snapshot {
                Ok(s) => s,
                Err(e) => {
                    self.restore(undo);
                    return Err(e);
                }
            };
            undo.push(snapshot);
            if let Err(e) = self.run_group(*k, members) {
                self.restore(undo);
                return Err(self.named(e, members));
            }
        }
        Ok(undo)
    }

    /// What an error after the first write leaves: the parameters `done`
    /// were updated, the group `failed` may be half updated (its state
    /// advanced, its parameters not), the rest were not.
    fn partial_step(&self, done: &[usize], failed: &[(usize, Tensor)]) -> String {
        let names = |ps: Vec<usize>| {
            let all: Vec<&str> = ps.iter().map(|&p| self.params[p].name.as_str()).collect();
            match all.len() {
                0 => "none".to_string(),
                n if n <= 3 => all.join(", "),
                n => format!("{}, … ({n} in all)", all[..3].join(", ")),
            }
        };
        format!(
            "the step was partly applied: an infallible transform failed after the first \
             write; updated: {}; possibly inconsistent (state advanced, parameters not): {}; \
             restore from a checkpoint (a transform that can fail must declare `fallible()`)",
            names(done.to_vec()),
            names(failed.iter().map(|m| m.0).collect()),
        )
    }

    /// `e` as an error about a parameter of the group `members`: kept when it
    /// already names one of them, otherwise reported for the first member
    /// (a seam routine's error names the routine, not the parameter).
    fn named(&self, e: Error, members: &[(usize, Tensor)]) -> Error {
        let names = members.iter().map(|(p, _)| self.params[*p].name.as_str());
        let first = &self.params[members[0].0].name;
        match e {
            Error::Candle(c) => Error::device(first, c),
            e => match e.who() {
                Some(who) if names.clone().any(|n| n == who) => e,
                _ => e.about(first),
            },
        }
    }

    /// Runs partition `k`'s chain over `members`, then sets the parameters
    /// that step a master weight to it, rounded.
    fn run_group(&mut self, k: usize, members: &[(usize, Tensor)]) -> Result<()> {
        self.run_chain(k, members)?;
        self.write_back_masters(members.iter().map(|m| m.0))
    }

    fn run_chain(&mut self, k: usize, members: &[(usize, Tensor)]) -> Result<()> {
        let Self {
            params,
            masters,
            infos,
            parts,
            states,
            lr,
            ..
        } = self;
        let part = &parts[k];
        let mut step = GroupStep::new(
            members.iter().map(|(p, _)| &infos[*p]).collect(),
            members
                .iter()
                .map(|(p, _)| masters[*p].as_ref().unwrap_or(&params[*p].var))
                .collect(),
            members.iter().map(|(_, g)| g).collect(),
            *lr * part.lr_ratio,
        );
        for (t_idx, (name, t)) in part.chain.iter().enumerate() {
            if t.stage() == super::transform::Stage::Post {
                step.apply_update()?;
            } else if step.is_applied() {
                // Chain::validate refuses this for the crate's transforms; a
                // custom one that runs the update without `fuse` lands here.
                fail!(
                    Config,
                    format!("partition `{}`", part.label),
                    "`{name}` would change the direction after the update has run"
                );
            }
            let fuse = part.chain.only_post_after(t_idx);
            let mut slots: Vec<StateSlot> = members
                .iter()
                .map(|(p, _)| states[*p][t_idx].take())
                .collect();
            let r = t.apply(&mut step, &mut slots, fuse);
            for ((p, _), s) in members.iter().zip(slots) {
                states[*p][t_idx] = s;
            }
            r?;
        }
        step.apply_update()
    }

    /// Copies of the parameters `ps` (their master weights, for those that
    /// have one) and of their state.
    fn snapshot(&self, ps: impl Iterator<Item = usize>) -> Result<Vec<Snapshot>> {
        ps.map(|p| {
            let w = self.working(p).as_tensor().detach().copy()?;
            let param = match self.masters[p] {
                Some(_) => Some(self.params[p].var.as_tensor().detach().copy()?),
                None => None,
            };
            let chain = &self.parts[self.assign[p]].chain;
            let states = chain
                .iter()
                .zip(&self.states[p])
                .map(|((_, t), s)| copy_state(t, &self.infos[p], s.as_deref()))
                .collect::<Result<_>>()?;
            Ok((p, w, param, states))
        })
        .collect()
    }

    fn restore(&mut self, undo: Undo) {
        for (p, w, param, states) in undo.into_iter().flatten() {
            // Writing back a copy of the same shape and dtype cannot fail.
            let _ = self.working(p).set(&w);
            if let Some(param) = param {
                let _ = self.params[p].var.set(&param);
            }
            self.states[p] = states;
        }
    }

    /// The state dict (see [`crate::checkpoint`]) with `config` in the header.
    pub(crate) fn state_dict_with(
        &self,
        config: serde_json::Value,
    ) -> Result<HashMap<String, Tensor>> {
        // JSON has no NaN or ±Inf (serde writes `null`) and a load refuses a
        // negative rate: refuse here rather than write a file no load takes.
        check_lr("lr", self.lr).map_err(|e| {
            Error::config(
                "lr",
                format!(
                    "{}; a checkpoint cannot hold it (set a valid rate with \
                     set_learning_rate first); nothing was saved",
                    strip(&e)
                ),
            )
        })?;
        let body = self.body(config);
        let header = Header::new(
            &self.kind,
            self.params.iter().map(|v| v.name.clone()).collect(),
            serde_json::to_value(&body).expect("the header body encodes"),
        );
        // Bare variables are named by creation order, read from candle's
        // TensorId; if a candle release made it unreadable, they fell back
        // to the order given, which another process does not reproduce.
        if header.bare_names.is_some() && !crate::params::creation_order_readable() {
            fail!(
                Checkpoint,
                "checkpoint",
                "cannot name bare variables (param.<i>) across processes with this candle \
                 version (the creation order, read from TensorId, is unreadable); build the \
                 optimizer with from_varmap or from_named; nothing was saved"
            );
        }
        let mut out = HashMap::new();
        out.insert(HEADER_KEY.to_string(), header.to_tensor()?);
        for (p, nv) in self.params.iter().enumerate() {
            if let Some(m) = &self.masters[p] {
                out.insert(
                    format!("{}.{MASTER_SLOT}", nv.name),
                    host_copy(m.as_tensor())?,
                );
            }
            let chain = &self.parts[self.assign[p]].chain;
            for ((tname, _), slot) in chain.iter().zip(&self.states[p]) {
                let Some(s) = slot else { continue };
                for (field, v) in s.fields() {
                    let key = format!("{}.{tname}.{field}", nv.name);
                    let t = match v {
                        FieldValue::Tensor(t) => host_copy(t)?,
                        FieldValue::Count(n) => count_tensor(n)?,
                    };
                    out.insert(key, t);
                }
            }
        }
        Ok(out)
    }

    /// The settings of this optimizer as JSON: the learning rate, each
    /// partition's label, rate ratio and transforms (kinds and
    /// hyperparameters), and each parameter's partition — the checkpoint
    /// header's body. Data-parallel ranks compare it at construction
    /// (every rank must step with the same settings).
    pub fn settings(&self) -> serde_json::Value {
        serde_json::to_value(self.body(serde_json::Value::Null)).expect("the settings encode")
    }

    fn body(&self, config: serde_json::Value) -> Body {
        Body {
            lr: self.lr,
            partitions: self
                .parts
                .iter()
                .map(|p| PartRecord {
                    label: p.label.clone(),
                    lr_ratio: p.lr_ratio,
                    transforms: p
                        .chain
                        .iter()
                        .map(|(name, t)| TransformRecord {
                            name: name.to_string(),
                            kind: t.kind().to_string(),
                            hparams: t.hparams(),
                        })
                        .collect(),
                })
                .collect(),
            assignment: self
                .assign
                .iter()
                .map(|&k| self.parts[k].label.clone())
                .collect(),
            master_weights: self.master_weights,
            config,
        }
    }

    /// The header of `state`, checked against this driver's kind and
    /// parameter names (for aliases, which read their config from it first).
    pub(crate) fn read_header(&self, state: &HashMap<String, Tensor>) -> Result<Header> {
        let h = Header::read(state, &self.kind)?;
        h.check_params(self.params.iter().map(|v| v.name.as_str()))?;
        Ok(h)
    }

    /// Loads a state dict. `chains` (one per partition, for aliases that
    /// rebuild theirs from their config) replace the current chains; without,
    /// the current chains take the checkpoint's hyperparameters. Everything
    /// is validated before anything changes.
    pub(crate) fn load_with(
        &mut self,
        state: &HashMap<String, Tensor>,
        chains: Option<Vec<Chain>>,
    ) -> Result<()> {
        let header = self.read_header(state)?;
        let body: Body = serde_json::from_value(header.body.clone())
            .map_err(|e| Error::checkpoint(HEADER_KEY, format!("not a driver header: {e}")))?;
        if !self.master_weights {
            if let Some(key) = state.keys().find(|k| {
                k.rsplit_once('.')
                    .is_some_and(|(_, slot)| slot == MASTER_SLOT)
            }) {
                fail!(
                    Checkpoint,
                    key,
                    "an f32 master weight (saved with with_master_weights), which this \
                     optimizer does not keep: loading would drop the precision it holds; \
                     build the optimizer with with_master_weights() to resume"
                );
            }
        }
        check_lr("checkpoint: lr", body.lr).map_err(|e| Error::checkpoint("lr", strip(&e)))?;
        // Partitions and routing.
        let ours: Vec<&str> = self.labels();
        let theirs: Vec<&str> = body.partitions.iter().map(|p| p.label.as_str()).collect();
        if ours != theirs {
            fail!(
                Checkpoint,
                "checkpoint",
                "partitions {theirs:?}, this optimizer has {ours:?}"
            );
        }
        if body.assignment.len() != header.params.len() {
            fail!(
                Checkpoint,
                "checkpoint: assignment",
                "{} labels for {} parameters",
                body.assignment.len(),
                header.params.len()
            );
        }
        for (name, label) in header.params.iter().zip(&body.assignment) {
            let mine = self.label_of(name).expect("names checked");
            if mine != label {
                fail!(
                    Checkpoint,
                    name,
                    "the checkpoint routes this parameter to `{label}`, this optimizer to `{mine}`"
                );
            }
        }
        // Chains: rebuilt by the owner, or ours with the stored hyperparameters.
        let mut new_chains: Vec<Chain> = match chains {
            Some(c) => c,
            None => self.parts.iter().map(|p| p.chain.clone()).collect(),
        };
        for ((chain, rec), part) in new_chains.iter_mut().zip(&body.partitions).zip(&self.parts) {
            let names: Vec<&str> = chain.names();
            let stored: Vec<&str> = rec.transforms.iter().map(|t| t.name.as_str()).collect();
            if names != stored {
                fail!(
                    Checkpoint,
                    format!("partition `{}`", rec.label),
                    "transforms {stored:?}, this optimizer has {names:?}"
                );
            }
            for (k, tr) in rec.transforms.iter().enumerate() {
                let t = chain.get_mut(k);
                if t.kind() != tr.kind {
                    fail!(
                        Checkpoint,
                        format!("partition `{}`: {}", rec.label, tr.name),
                        "a `{}` transform, this optimizer has `{}`",
                        tr.kind,
                        t.kind()
                    );
                }
                t.set_hparams(&tr.hparams).map_err(|e| {
                    Error::checkpoint(format!("partition `{}`: {}", rec.label, tr.name), strip(&e))
                })?;
            }
            let who = format!("checkpoint: partition `{}`: lr ratio", rec.label);
            check_lr(&who, rec.lr_ratio).map_err(|e| Error::checkpoint(&who, strip(&e)))?;
            chain.validate(&format!("partition `{}`", part.label))?;
        }
        for (info, &k) in self.infos.iter().zip(&self.assign) {
            for (_, t) in new_chains[k].iter() {
                t.check(info)?;
            }
        }
        // State tensors.
        let names: Vec<&str> = self.params.iter().map(|v| v.name.as_str()).collect();
        let mut fields: HashMap<(usize, usize), Fields> = HashMap::new();
        let mut new_masters: Vec<Option<Var>> = vec![None; self.params.len()];
        for (key, t) in state {
            if key == HEADER_KEY {
                continue;
            }
            if let Some((p, MASTER_SLOT)) = split_key(key, &names) {
                let param = &self.params[p].var;
                if !(self.master_weights && has_master(param.dtype())) {
                    fail!(
                        Checkpoint,
                        key,
                        "a master weight for a {:?} parameter, which keeps none",
                        param.dtype()
                    );
                }
                if t.dims() != param.dims() || t.dtype() != candle_core::DType::F32 {
                    fail!(
                        Checkpoint,
                        key,
                        "checkpoint has shape {:?} dtype {:?}, expected shape {:?} dtype F32",
                        t.dims(),
                        t.dtype(),
                        param.dims()
                    );
                }
                // (detached: `from_tensor` then copies, so the master shares
                // no storage with the caller's tensor)
                new_masters[p] = Some(Var::from_tensor(&t.to_device(param.device())?.detach())?);
                continue;
            }
            let Some((p, rest)) = split_key(key, &names) else {
                if key == crate::schedule::SCHEDULE_STEP_KEY {
                    fail!(
                        Checkpoint,
                        key,
                        "this checkpoint was saved by a `Scheduled` optimizer (this key is the \
                         schedule's step): load it with `Scheduled::load_state` (or \
                         `load_state_dict`) into `Scheduled::new(<this optimizer>, schedule)`, \
                         or remove this key from the state (`checkpoint::load`, then \
                         `state.remove(SCHEDULE_STEP_KEY)`) to load only the optimizer's state"
                    );
                }
                if key.starts_with(crate::accumulate::ACCUMULATE_KEY_PREFIX) {
                    fail!(
                        Checkpoint,
                        key,
                        "this checkpoint was saved by `Accumulate` (gradient accumulation): \
                         load it into `Accumulate::new(<this optimizer>, every)` (or \
                         `Accumulate::data_parallel`), which restores the pending micro-batches"
                    );
                }
                fail!(
                    Checkpoint,
                    key,
                    "not a `<parameter>.<transform>.<field>` (or `<parameter>.master_weight`) \
                     key of this optimizer"
                );
            };
            let chain = &new_chains[self.assign[p]];
            let Some((tname, field)) = rest.split_once('.') else {
                fail!(
                    Checkpoint,
                    key,
                    "not a `<parameter>.<transform>.<field>` key"
                );
            };
            let Some((k, tr)) = chain.get(tname) else {
                fail!(
                    Checkpoint,
                    key,
                    "no transform `{tname}` for this parameter (its chain: {:?})",
                    chain.names()
                );
            };
            let info = &self.infos[p];
            let Some(spec) = tr.fields(info).into_iter().find(|f| f.name == field) else {
                fail!(
                    Checkpoint,
                    key,
                    "`{tname}` keeps no `{field}` state for this parameter"
                );
            };
            let entry = fields.entry((p, k)).or_default();
            match spec.kind {
                FieldKind::Count => entry.insert_count(spec.name, read_count(key, t)?),
                FieldKind::Tensor { dims, dtype } => {
                    if t.dims() != dims.as_slice() || t.dtype() != dtype {
                        // Bare variables are matched by creation order only.
                        let hint = if header.bare_names.is_some() && t.dims() != dims.as_slice() {
                            " (bare variables from `Optimizer::new` are numbered in the order \
                             the model created them: is this another model's checkpoint, or \
                             was the model built in another order? `from_varmap` keys the \
                             state by name)"
                        } else {
                            ""
                        };
                        fail!(
                            Checkpoint,
                            key,
                            "checkpoint has shape {:?} dtype {:?}, expected shape {dims:?} dtype \
                             {dtype:?}{hint}",
                            t.dims(),
                            t.dtype()
                        );
                    }
                    entry.insert_tensor(spec.name, t.to_device(&info.device)?);
                }
            }
        }
        let mut new_states: Vec<Vec<StateSlot>> = self
            .assign
            .iter()
            .map(|&k| (0..new_chains[k].len()).map(|_| None).collect())
            .collect();
        for ((p, k), f) in fields {
            let info = &self.infos[p];
            let (tname, tr) = new_chains[self.assign[p]]
                .iter()
                .nth(k)
                .expect("index from get");
            for spec in tr.fields(info) {
                let have = match spec.kind {
                    FieldKind::Count => f.count(spec.name).is_ok(),
                    FieldKind::Tensor { .. } => f.var(spec.name).is_ok(),
                };
                if !have {
                    fail!(
                        Checkpoint,
                        format!("{}.{tname}.{}", info.name, spec.name),
                        "missing from the checkpoint"
                    );
                }
            }
            new_states[p][k] = Some(tr.load(info, &f)?);
        }
        // Commit.
        for (part, (chain, rec)) in self
            .parts
            .iter_mut()
            .zip(new_chains.into_iter().zip(&body.partitions))
        {
            part.chain = chain;
            part.lr_ratio = rec.lr_ratio;
        }
        self.states = new_states;
        // A master that no longer rounds to its parameter (the parameters
        // were not restored from the same save) is re-made at its next step.
        self.masters = new_masters;
        self.lr = body.lr;
        Ok(())
    }
}

/// The message of an error without its `steepest: who: ` prefix.
fn strip(e: &Error) -> String {
    match e {
        Error::Shape { what, .. }
        | Error::Config { what, .. }
        | Error::Checkpoint { what, .. }
        | Error::Device { what, .. }
        | Error::Numerical { what, .. } => what.clone(),
        e => e.to_string(),
    }
}

/// A deep copy of one state (through its fields and the transform's `load`).
fn copy_state(
    t: &dyn Transform,
    info: &ParamInfo,
    s: Option<&dyn TransformState>,
) -> Result<StateSlot> {
    let Some(s) = s else { return Ok(None) };
    let mut f = Fields::default();
    for (name, v) in s.fields() {
        match v {
            FieldValue::Tensor(t) => f.insert_tensor(name, t.detach()),
            FieldValue::Count(n) => f.insert_count(name, n),
        }
    }
    Ok(Some(t.load(info, &f)?))
}

impl crate::checkpoint::OptimizerState for Driver {
    fn state_dict(&self) -> Result<HashMap<String, Tensor>> {
        self.state_dict_with(serde_json::Value::Null)
    }

    fn load_state_dict(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        self.load_with(state, None)
    }
}

/// What [`Driver`]'s `candle_nn::Optimizer::new` takes.
#[derive(Clone, Debug)]
pub struct DriverConfig {
    /// The chain for every parameter.
    pub chain: Chain,
    /// The learning rate.
    pub lr: f64,
}

impl candle_nn::Optimizer for Driver {
    type Config = DriverConfig;

    fn new(vars: Vec<Var>, config: DriverConfig) -> candle_core::Result<Self> {
        Ok(Self::new(name_vars(vars), config.chain, config.lr)?)
    }

    fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        Ok(self.try_step(grads)?)
    }

    fn learning_rate(&self) -> f64 {
        self.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.lr = lr;
    }
}
