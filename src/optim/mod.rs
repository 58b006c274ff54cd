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
//! bad learning rate or any other error — to none.

mod adamw;
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
