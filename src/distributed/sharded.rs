//! The crate's optimizers as owners of a data-parallel step: [`ShardedStep`]
//! for every optimizer run by a [`Driver`], and what the planner needs to know
//! about their parameters ([`ShardedOptimizer`], [`param_specs`]).
//!
//! Every optimizer of the crate is a [`Driver`], whose
//! [`step_subset`](Driver::step_subset) steps a subset of the parameters
//! with the full step protocol (validate, then mutate; state only for the
//! parameters it has stepped; same-shape matrices batched). An owner's share
//! is such a subset, so distributed Muon is Muon's own step on the matrices
//! (and AdamW-routed parameters) a rank owns: momentum, spectral decay and
//! Newton–Schulz run there, and nowhere else.

use super::data_parallel::ShardedStep;
use super::plan::ParamSpec;
use crate::error::{Error, Result};
use crate::optim::{AdamW, Driver, Muon, Sgd, Steepest};
use crate::schedule::Scheduled;
use candle_core::Tensor;
use candle_nn::Optimizer;

/// An optimizer run by a [`Driver`], which
/// [`DataParallel::for_optimizer`](super::DataParallel::for_optimizer) can
/// plan by itself: the parameters (names, order) and each one's chain come
/// from the driver.
pub trait ShardedOptimizer: ShardedStep {
    /// The driver: parameters in the order of
    /// [`ShardedStep::step_subset`]'s indices, partitions and chains.
    fn driver(&self) -> &Driver;
}

macro_rules! sharded_by_inherent {
    ($($t:ty),*) => {$(
        impl ShardedStep for $t {
            fn step_subset(&mut self, grads: &[(usize, Tensor)]) -> Result<()> {
                <$t>::step_subset(self, grads)
            }
            fn agrees_before_commit(&self) -> bool {
                <$t>::driver(self).has_fallible_chain()
            }
            fn step_subset_agreed(
                &mut self,
                grads: &[(usize, Tensor)],
                agree: &mut dyn FnMut(Option<&Error>) -> Result<()>,
            ) -> Result<()> {
                <$t>::driver_mut(self).step_subset_agreed(grads, agree)
            }
            fn settings(&self) -> Option<serde_json::Value> {
                Some(<$t>::driver(self).settings())
            }
            fn keeps_master_weights(&self) -> bool {
                <$t>::driver(self).master_weights()
            }
            fn check_ready(&self, lr: Option<f64>) -> Result<()> {
                <$t>::driver(self).check_rates(lr)
            }
        }

        impl ShardedOptimizer for $t {
            fn driver(&self) -> &Driver {
                <$t>::driver(self)
            }
        }
    )*};
}
sharded_by_inherent!(Muon, AdamW, Sgd, Steepest);

impl ShardedStep for Driver {
    fn step_subset(&mut self, grads: &[(usize, Tensor)]) -> Result<()> {
        Driver::step_subset(self, grads)
    }
    fn agrees_before_commit(&self) -> bool {
        self.has_fallible_chain()
    }
    fn step_subset_agreed(
        &mut self,
        grads: &[(usize, Tensor)],
        agree: &mut dyn FnMut(Option<&Error>) -> Result<()>,
    ) -> Result<()> {
        Driver::step_subset_agreed(self, grads, agree)
    }
    fn settings(&self) -> Option<serde_json::Value> {
        Some(Driver::settings(self))
    }
    fn keeps_master_weights(&self) -> bool {
        self.master_weights()
    }
    fn check_ready(&self, lr: Option<f64>) -> Result<()> {
        self.check_rates(lr)
    }
}

impl ShardedOptimizer for Driver {
    fn driver(&self) -> &Driver {
        self
    }
}

/// The scheduled step of a subset: sets the schedule's rate for the current
/// step, steps the subset and advances the counter; a failed step puts the
/// rate back and does not advance ([`Scheduled::try_step`]'s protocol). A
/// data-parallel step calls it on every rank at every step that is not
/// refused, so the counters stay equal across ranks (after a failure at one
/// owner that the agreement cannot undo they may not, and the
/// `DataParallel` refuses further steps until `load_state`).
impl<O: Optimizer + ShardedStep> ShardedStep for Scheduled<O> {
    fn step_subset(&mut self, grads: &[(usize, Tensor)]) -> Result<()> {
        scheduled(self, |o| o.step_subset(grads))
    }
    fn agrees_before_commit(&self) -> bool {
        self.inner().agrees_before_commit()
    }
    fn step_subset_agreed(
        &mut self,
        grads: &[(usize, Tensor)],
        agree: &mut dyn FnMut(Option<&Error>) -> Result<()>,
    ) -> Result<()> {
        scheduled(self, |o| o.step_subset_agreed(grads, agree))
    }
    /// The inner optimizer's settings without its learning rate (the
    /// schedule sets it at every step), the schedule and the step counter.
    fn settings(&self) -> Option<serde_json::Value> {
        let mut inner = self.inner().settings();
        if let Some(serde_json::Value::Object(m)) = inner.as_mut() {
            m.remove("lr");
        }
        Some(serde_json::json!({
            "optimizer": inner,
            "schedule": format!("{:?}", self.schedule()),
            "step": self.current_step(),
        }))
    }
    fn keeps_master_weights(&self) -> bool {
        self.inner().keeps_master_weights()
    }
    /// The inner optimizer at the schedule's rate for the next step (the
    /// rate the step will set), whatever its own rate now.
    fn check_ready(&self, _lr: Option<f64>) -> Result<()> {
        self.inner().check_ready(Some(self.next_lr()))
    }
}

/// `step` (a subset's step of the inner optimizer) at the schedule's rate
/// for the current step; the counter advances only if it succeeds, and a
/// failure puts the old rate back.
fn scheduled<O: Optimizer + ShardedStep>(
    s: &mut Scheduled<O>,
    step: impl FnOnce(&mut O) -> Result<()>,
) -> Result<()> {
    let before = s.inner().learning_rate();
    let lr = s.next_lr();
    s.inner_mut().set_learning_rate(lr);
    if let Err(e) = step(s.inner_mut()) {
        s.inner_mut().set_learning_rate(before);
        return Err(e);
    }
    let next = s.current_step() + 1;
    s.set_step(next);
    Ok(())
}

impl<O: Optimizer + ShardedOptimizer> ShardedOptimizer for Scheduled<O> {
    fn driver(&self) -> &Driver {
        self.inner().driver()
    }
}

/// The planner's view of a driver's parameters, in its order: a parameter of
/// rank ≥ 2 whose partition's chain has a transform of matrix cost
/// ([`Transform::matrix_cost`](crate::optim::transform::Transform::matrix_cost):
/// `orthogonalize`, `dualize`, `manifold`, or a user's own) is a
/// [`Matrix`](super::ParamKind::Matrix) (cost
/// `m·n·min(m, n)` of its matrix view); every other parameter — vectors,
/// and matrices under an element-wise chain such as Muon's `adamw`
/// partition (embeddings, heads) — is
/// [`Elementwise`](super::ParamKind::Elementwise) (cost = element count). So
/// Muon's Newton–Schulz work is balanced across ranks, and the Adam moments
/// of the rest fill the gaps (ZeRO-1).
pub fn param_specs(driver: &Driver) -> Vec<ParamSpec> {
    driver
        .params()
        .iter()
        .map(|v| {
            let matrix_chain = driver
                .label_of(&v.name)
                .and_then(|l| driver.chain(l))
                .is_some_and(|c| c.iter().any(|(_, t)| t.matrix_cost()));
            if matrix_chain {
                ParamSpec::new(v.name.clone(), v.var.dims())
            } else {
                ParamSpec::elementwise(v.name.clone(), v.var.dims())
            }
        })
        .collect()
}
