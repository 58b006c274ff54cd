//! Optimizers implementing [`candle_nn::Optimizer`], with saveable state.
//!
//! Each optimizer is a thin walker over its parameters; the per-tensor math
//! lives in plain functions ([`adam_update`], [`sgd_update`],
//! [`muon_momentum`], [`crate::linalg::msign`], [`crate::decay`]) that can be
//! reused and tested on their own. A step either applies to every parameter or
//! — on a NaN/Inf gradient or any other error — to none.

mod adamw;
mod decay_step;
mod muon;
pub(crate) mod params;
mod sgd;
pub(crate) mod state;
pub mod steepest;

pub use adamw::{adam_update, AdamW, AdamWConfig};
pub use muon::{muon_momentum, LrAdjust, Muon, MuonConfig};
pub use params::NamedVar;
pub use sgd::{sgd_update, Sgd, SgdConfig};
pub use state::OptimizerState;
pub use steepest::{DualAscent, Manifold, Norm, Steepest, SteepestConfig};
