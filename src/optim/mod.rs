//! Optimizers implementing [`candle_nn::Optimizer`], with saveable state.
//!
//! Every optimizer is a [`Chain`] of composable [`transform`]s run by one
//! [`Driver`], which owns the step protocol (walking named parameters,
//! gathering gradients, the finite check, grouping same-shape matrices into
//! batches, the learning rate, in-place updates, checkpoints). A [`Partition`]
//! routes parameters to chains by a label function. The aliases are short
//! compositions:
//!
//! | optimizer | chain |
//! |---|---|
//! | [`AdamW`] | [`Decay`](transform::Decay) → [`Adam`](transform::Adam) |
//! | [`Sgd`] | `Decay` → [`Momentum`](transform::Momentum) (classic) |
//! | [`Muon`] | matrices: `Decay` → `Momentum` (EMA) → [`Orthogonalize`](transform::Orthogonalize) → [`ShapeScale`](transform::ShapeScale); the rest: AdamW's chain |
//! | [`Steepest`] | `Decay` → `Momentum` (EMA) → [`Dualize`](transform::Dualize) or [`ManifoldStep`](transform::ManifoldStep) |
//!
//! A step either applies to every parameter or — on a NaN/Inf gradient, a
//! bad learning rate, a shape or device mismatch, or the failure of a
//! transform that declares it can fail (a retraction) — to none. The one
//! exception is an error no check can foresee (a device fault, or a
//! transform that fails without declaring
//! [`fallible`](transform::Transform::fallible)): the step is then partly
//! applied, and the error says so and names what was updated.

mod adamw;
mod alias;
mod chain;
mod driver;
mod muon;
mod partition;
mod sgd;
pub mod steepest;
pub mod transform;

pub use adamw::{AdamW, AdamWConfig};
pub use chain::Chain;
pub use driver::{Driver, DriverConfig};
pub use muon::{Muon, MuonConfig};
pub use partition::Partition;
pub use sgd::{Sgd, SgdConfig};
pub use steepest::{DualAscent, Manifold, Norm, Steepest, SteepestConfig};
pub use transform::LrAdjust;

pub use crate::checkpoint::OptimizerState;
pub use crate::params::{NamedVar, ParamInfo};

/// A step that keeps the crate's typed [`Error`](crate::Error).
/// `candle_nn::Optimizer::step` has to return a `candle_core::Error`, which
/// can only carry the message; `try_step` keeps the enum (e.g.
/// [`Error::NonFiniteGradient`](crate::Error::NonFiniteGradient), to skip a
/// batch). Implemented by every optimizer of the crate and by
/// [`Scheduled`](crate::schedule::Scheduled) around one.
pub trait TryStep {
    /// One step with these gradients.
    fn try_step(&mut self, grads: &candle_core::backprop::GradStore) -> crate::Result<()>;

    /// `loss.backward()`, then [`TryStep::try_step`].
    fn try_backward_step(&mut self, loss: &candle_core::Tensor) -> crate::Result<()> {
        let grads = loss.backward()?;
        self.try_step(&grads)
    }
}

macro_rules! try_step_by_inherent {
    ($($t:ty),*) => {$(
        impl TryStep for $t {
            fn try_step(&mut self, grads: &candle_core::backprop::GradStore) -> crate::Result<()> {
                <$t>::try_step(self, grads)
            }
        }
    )*};
}
try_step_by_inherent!(AdamW, Sgd, Muon, Steepest, Driver);

/// An optimizer that knows its parameters: names and variables, in the
/// order it steps them. Implemented by every optimizer of the crate and by
/// [`Scheduled`](crate::schedule::Scheduled) around one; used by wrappers
/// such as [`Accumulate`](crate::accumulate::Accumulate).
pub trait HasParams {
    /// The parameters, with their (checkpoint) names.
    fn params(&self) -> &[NamedVar];

    /// Whether bf16/f16 parameters are stepped through f32 master weights
    /// ([`Driver::with_master_weights`]), which take f32 gradients as they
    /// are. Default `false`; wrappers forward it.
    fn keeps_master_weights(&self) -> bool {
        false
    }

    /// Whether a step is collective: every rank of a data-parallel group
    /// must take it together ([`DataParallel`](crate::distributed::DataParallel)).
    /// A wrapper that may refuse a step on one rank alone (a local
    /// NaN check, say) must not wrap such an optimizer. Default `false`;
    /// wrappers forward it.
    fn steps_collectively(&self) -> bool {
        false
    }
}

macro_rules! has_params_by_driver {
    ($($t:ty),*) => {$(
        impl HasParams for $t {
            fn params(&self) -> &[NamedVar] {
                self.driver().params()
            }
            fn keeps_master_weights(&self) -> bool {
                self.driver().master_weights()
            }
        }
    )*};
}
has_params_by_driver!(AdamW, Sgd, Muon, Steepest);

impl HasParams for Driver {
    fn params(&self) -> &[NamedVar] {
        Driver::params(self)
    }
    fn keeps_master_weights(&self) -> bool {
        self.master_weights()
    }
}
