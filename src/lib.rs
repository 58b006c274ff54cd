//! # steepest
//!
//! Matrix-aware optimizers for [Candle](https://github.com/huggingface/candle):
//! optimizers that see weight matrices as matrices.
//!
//! - [`linalg::msign`]: the polar factor `U Vᵀ` by Newton–Schulz iteration;
//!   [`linalg::power_iteration`]: the top singular triplet.
//! - [`decay::WeightDecay::Spectral`]: decay `−ηλ·W v₁v₁ᵀ`, which shrinks only
//!   the top singular value.
//! - [`optim::AdamW`], [`optim::Sgd`], [`optim::Muon`]: `candle_nn::Optimizer`s
//!   with any weight decay and state that saves to safetensors
//!   ([`optim::OptimizerState`]).
//! - [`optim::Steepest`]: steepest descent under a norm (Euclidean, `ℓ_p`,
//!   sign, spectral) on a manifold (sphere, spectral sphere, Stiefel), with
//!   dual descent for the manifolds' multipliers ([`optim::steepest`]).
//! - [`penalty`]: gradient-norm penalties (parameter and input gradients) by
//!   finite-difference Hessian–vector products, and the input/parameter
//!   gradient inequality as a diagnostic.
//! - [`schedule`]: learning-rate schedules (constant, warmup, cosine, WSD,
//!   `α/√t`, the last-iterate-optimal constant rate) and [`schedule::Scheduled`],
//!   which drives any `candle_nn::Optimizer`; [`averaging`]: EMA, Polyak and
//!   WSM checkpoint merging; [`theory`]: docs/math.md §5's last-iterate and average
//!   bounds; [`clip`]: gradient clipping by global norm; [`accumulate`]:
//!   gradient accumulation over micro-batches.
//! - bf16/f16 training: f32 master weights
//!   ([`optim::Driver::with_master_weights`], on every optimizer) and
//!   dynamic loss scaling for f16 gradients ([`loss_scale`]).
//!
//! ```no_run
//! use candle_core::{DType, Device};
//! use candle_nn::{Optimizer, VarBuilder, VarMap};
//! use steepest::{decay::WeightDecay, optim::{Muon, MuonConfig}};
//!
//! # fn main() -> candle_core::Result<()> {
//! let varmap = VarMap::new();
//! let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
//! let layer = candle_nn::linear(64, 32, vb.pp("fc"))?;
//! let mut opt = Muon::from_varmap(&varmap, MuonConfig {
//!     lr: 0.02,
//!     weight_decay: WeightDecay::spectral(0.1),
//!     ..MuonConfig::default()
//! })?;
//! # let x = candle_core::Tensor::zeros((8, 64), DType::F32, &Device::Cpu)?;
//! let loss = candle_core::Module::forward(&layer, &x)?.sqr()?.mean_all()?;
//! opt.backward_step(&loss)?;
//! # Ok(()) }
//! ```

#![warn(missing_docs)]

pub mod accumulate;
pub mod averaging;
pub mod checkpoint;
pub mod clip;
pub mod decay;
pub mod device;
pub mod distributed;
pub mod error;
pub mod linalg;
pub mod loss_scale;
pub mod optim;
mod params;
pub mod penalty;
pub mod schedule;
pub mod theory;

pub use decay::WeightDecay;
pub use error::{Error, Result};
pub use linalg::{msign, power_iteration, GramNewtonSchulz, NewtonSchulz, TopSingular};
pub use optim::{AdamW, AdamWConfig, LrAdjust, Muon, MuonConfig, OptimizerState, Sgd, SgdConfig};
pub use optim::{DualAscent, HasParams, Manifold, Norm, Steepest, SteepestConfig, TryStep};
/// The JSON crate of [`optim::transform::Transform::hparams`]'s signature.
pub use serde_json;
