//! [`Accumulate`] around a [`DataParallel`] step: the constructor, and
//! checkpoints that keep each rank's pending micro-batches.

use std::path::Path;

use super::{take_pending, Accumulate, ACCUMULATE_SUM_PREFIX};
use crate::checkpoint::OptimizerState;
use crate::distributed::checkpoint::read_manifest;
use crate::distributed::{Collective, DataParallel, ShardedStep};
use crate::error::{fail, Result};

/// The prefix of a data-parallel [`Accumulate`]'s running sums in a
/// checkpoint: rank `r`'s sum of parameter `p` is
/// `__accumulate__.rank-<r>.sum.<p>` (each rank sums its own micro-batches).
pub const ACCUMULATE_RANK_PREFIX: &str = "__accumulate__.rank-";

/// Where rank `rank`'s sums are kept in a checkpoint.
fn rank_sum_prefix(rank: usize) -> String {
    format!("{ACCUMULATE_RANK_PREFIX}{rank}.sum.")
}

impl<C: Collective, S: ShardedStep> Accumulate<DataParallel<C, S>> {
    /// Gradient accumulation under data-parallel training: each rank adds
    /// its own micro-batches, and every `every`-th call (on every rank, as
    /// the step is collective) runs one [`DataParallel`] step with each
    /// rank's mean, which the step averages over the ranks: the mean over
    /// all `every × world` micro-batches.
    ///
    /// So that the ranks' counts never part, nothing here is refused on one
    /// rank alone: a micro-batch's NaN/Inf is added like any value, and the
    /// data-parallel step refuses it on every rank alike
    /// ([`Error::NonFiniteGradient`](crate::Error::NonFiniteGradient));
    /// after any refused step every rank drops its pending micro-batches
    /// (the step was refused everywhere, so all drop the same batch) and
    /// the next call starts a new one. A gradient of the wrong shape is
    /// still an error on its own rank: a programming error, which leaves the
    /// ranks apart. Checkpoints: [`save_state`](Self::save_state) and
    /// [`load_state`](Self::load_state) keep the pending micro-batches.
    pub fn data_parallel(dp: DataParallel<C, S>, every: usize) -> Result<Self> {
        Self::wrap(dp, every, true)
    }
}

impl<C: Collective, S: ShardedStep + OptimizerState> Accumulate<DataParallel<C, S>> {
    /// [`DataParallel::save_state`] with this wrapper's state: `every`, the
    /// count of pending micro-batches (the same on every rank) and each
    /// rank's own running sums, in that rank's file
    /// ([`ACCUMULATE_RANK_PREFIX`]). Collective; an error on any rank is an
    /// error on every rank. A run saved between optimizer steps resumes bit
    /// for bit with [`load_state`](Self::load_state) at the same world size.
    pub fn save_state(&self, dir: impl AsRef<Path>) -> Result<()> {
        let rank = self.opt.comm().rank();
        self.opt
            .save_state_with(dir.as_ref(), self.pending_state(&rank_sum_prefix(rank)))
    }

    /// Loads a checkpoint written by [`save_state`](Self::save_state) (a
    /// directory), or by a single-process `Accumulate` (one file, a world
    /// of 1): the wrapped optimizer's state as
    /// [`DataParallel::load_state`] does, `every`, and this rank's pending
    /// sums. Pending micro-batches resume only at the world size that saved
    /// them (a step averages `every × world` of them, and each rank's sums
    /// are its own); with none pending the checkpoint loads at any world
    /// size. Collective and all-or-nothing: on a refusal on any rank, every
    /// rank keeps its optimizer state and its own pending micro-batches.
    pub fn load_state(&mut self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let (rank, world) = (self.opt.comm().rank(), self.opt.comm().world_size());
        let params = &self.params;
        let pending = self.opt.load_state_with(path, |union| {
            // This rank's sums (in a single-process file: its only ones);
            // the other ranks' are theirs.
            let (saved_world, mine) = if path.is_dir() {
                (read_manifest(path)?.world_size, rank_sum_prefix(rank))
            } else {
                (1, ACCUMULATE_SUM_PREFIX.to_string())
            };
            union.retain(|k, _| !k.starts_with(ACCUMULATE_RANK_PREFIX) || k.starts_with(&mine));
            let pending = take_pending(params, union, &mine)?;
            if pending.count > 0 && saved_world != world {
                fail!(
                    Checkpoint,
                    path.display().to_string(),
                    "{} micro-batch(es) pending on each of {saved_world} rank(s): they resume \
                     only at that world size, not {world} (save when `pending()` is 0 to \
                     resume at any)",
                    pending.count
                );
            }
            Ok(pending)
        })?;
        self.set_pending(pending);
        Ok(())
    }
}
