//! Data-parallel training across ranks: collectives, parameter ownership, the
//! distributed step of the crate's optimizers (distributed Muon with sharded
//! optimizer state) and sharded checkpoints (issue 12).
//!
//! The design (nanochat's `DistMuonAdamW`, generalised): every rank computes
//! the gradients of its own micro-batch; **one reduce-scatter** of a flat
//! gradient buffer, ordered by owner rank, hands each rank the averaged
//! gradients of exactly the parameters it owns; the owner runs the optimizer
//! on those parameters only (Newton–Schulz on its stack of same-shape
//! matrices, momentum and Adam moments kept only there); **one all-gather** of
//! the owners' updated parameters gives every rank every parameter. The bytes
//! on the wire equal a plain ring all-reduce of the gradients, and optimizer
//! state is divided by the world size (DESIGN.md, "Data-parallel Muon:
//! communication").
//!
//! - [`collective`]: the [`Collective`] trait (all-reduce, reduce-scatter,
//!   all-gather, broadcast, barrier over candle tensors, f32 and bf16).
//! - [`local`]: [`LocalGroup`] / [`LocalComm`], in-process ranks (threads) — a
//!   test double that runs every distributed algorithm on the CPU with real
//!   concurrency. Not a way to train.
//! - `nccl` (feature `nccl`): `NcclComm`, one process per GPU over NCCL, on
//!   candle's CUDA stream.
//! - [`plan`]: [`Plan`], which rank owns which parameter (balanced by
//!   Newton–Schulz cost) and the flat packing for the reduce-scatter and the
//!   all-gather.
//! - [`data_parallel`]: [`DataParallel`], the step over any [`Collective`] and
//!   any optimizer implementing [`ShardedStep`], with optional gradient
//!   clipping across ranks; [`DataParallel::muon`] is distributed Muon in
//!   one line.
//! - [`sharded`]: [`ShardedStep`] for every optimizer of the crate (through
//!   [`Driver::step_subset`](crate::optim::Driver::step_subset)) and for
//!   [`Scheduled`](crate::schedule::Scheduled); [`param_specs`], the cost
//!   model read from an optimizer's chains.
//! - [`checkpoint`]: one checkpoint (a file per rank and a manifest) that
//!   loads at any world size and into the single-process optimizer.

pub mod checkpoint;
pub mod collective;
pub mod data_parallel;
pub mod local;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod plan;
pub mod sharded;

pub use checkpoint::{load_union, Manifest};
pub use collective::{Collective, ReduceOp};
pub use data_parallel::{DataParallel, DataParallelConfig, ParamGather, ShardedStep};
pub use local::{LocalComm, LocalGroup};
#[cfg(feature = "nccl")]
pub use nccl::{LaunchEnv, NcclComm, NcclId};
pub use plan::{ParamKind, ParamSpec, Plan, Stack};
pub use sharded::{param_specs, ShardedOptimizer};

/// `candle_core::Error::Msg("steepest: <who>: <what>")`, the crate's error
/// format, built here so this module does not depend on `crate::error`.
pub(crate) fn dist_err(who: &str, what: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(format!("steepest: {who}: {what}"))
}
