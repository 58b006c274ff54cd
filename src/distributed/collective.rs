//! The collective-communication interface: what a distributed algorithm may
//! ask of the other ranks.
//!
//! [`Collective`] is **object-safe** on purpose: the element type travels in
//! the tensor (`DType`), not in a type parameter, so one value of type
//! `Box<dyn Collective>` can stand for in-process ranks in a CPU test and for
//! NCCL in a GPU run, chosen at run time (e.g. from a command-line flag).
//! The algorithms ([`DataParallel`]) are still generic over `C: Collective`,
//! so a concrete communicator costs no dynamic dispatch; `Box<dyn
//! Collective>` and `&C` implement the trait too. A generic-over-element-type
//! design (`fn all_reduce<T: WithDType>`) would not be object-safe and would
//! buy nothing: candle tensors already carry their dtype, and the backends
//! dispatch on it once per call.
//!
//! # Semantics (every implementation)
//!
//! Every rank of the group calls the same collectives in the same order, each
//! with a tensor of the same dtype and element count (per op below). Tensors
//! are read in their logical (row-major) order whatever their strides; results
//! are new contiguous tensors on the input's device, in the input's dtype.
//!
//! | op | input on each rank | output on each rank |
//! |---|---|---|
//! | [`all_reduce`](Collective::all_reduce) | `x`, any shape | `Σ_r x_r` (or `/ N`), `x`'s shape |
//! | [`reduce_scatter`](Collective::reduce_scatter) | flat buffer of `N·c` elements, any shape | 1-D, `c` elements: `Σ_r x_r[rank·c .. (rank+1)·c]` (or `/ N`) |
//! | [`all_gather`](Collective::all_gather) | `c` elements, any shape | 1-D, `N·c`: rank `r`'s input at `[r·c .. (r+1)·c]` |
//! | [`broadcast`](Collective::broadcast) | `x` (only the root's values matter) | the root's `x`, `x`'s shape |
//! | [`barrier`](Collective::barrier) | — | returns once every rank has entered it |
//!
//! `N` is [`world_size`](Collective::world_size). Supported dtypes: `F32` and
//! `BF16`; anything else is an error naming the op and the dtype. For `BF16`
//! an implementation accumulates in f32 where it can and rounds the result
//! once to bf16 (the in-process ranks do; NCCL reduces bf16 in its own way,
//! see `nccl`). [`ReduceOp::Avg`] is the sum divided by `N`.
//!
//! Errors are `candle_core::Error::Msg("steepest: <Type>::<op>: <what is
//! wrong>")`. An implementation that can see the other ranks' arguments
//! (in-process ranks) reports mismatches (element counts, dtypes, different
//! ops, a root out of range) to every rank; NCCL cannot, so there the caller
//! must guarantee agreement (as [`DataParallel`] does by checking a
//! fingerprint of the parameter list once at construction).
//!
//! [`DataParallel`]: super::DataParallel

use candle_core::{DType, Result, Tensor};

/// How [`Collective::all_reduce`] and [`Collective::reduce_scatter`] combine
/// the ranks' values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ReduceOp {
    /// Element-wise sum over ranks.
    Sum,
    /// Element-wise sum over ranks divided by the world size.
    Avg,
}

impl ReduceOp {
    /// `"sum"` or `"avg"`, for messages.
    pub fn name(self) -> &'static str {
        match self {
            ReduceOp::Sum => "sum",
            ReduceOp::Avg => "avg",
        }
    }
}

/// Collective operations over candle tensors on one device, among the
/// `world_size()` ranks of a group. See the [module docs](self) for the
/// semantics every implementation follows.
pub trait Collective {
    /// This rank's index, `0 ≤ rank < world_size`.
    fn rank(&self) -> usize;

    /// Number of ranks in the group.
    fn world_size(&self) -> usize;

    /// Element-wise reduction of `x` over all ranks; every rank gets the
    /// result, in `x`'s shape and dtype.
    fn all_reduce(&self, x: &Tensor, op: ReduceOp) -> Result<Tensor>;

    /// Reduce a flat buffer of `world_size · chunk` elements over all ranks and
    /// return this rank's `chunk` (elements `rank·chunk .. (rank+1)·chunk` of
    /// the reduced buffer) as a 1-D tensor. An element count that is not a
    /// multiple of the world size is an error.
    fn reduce_scatter(&self, x: &Tensor, op: ReduceOp) -> Result<Tensor>;

    /// Concatenate every rank's `x` (flattened; same element count on every
    /// rank) in rank order; the inverse of [`reduce_scatter`](Self::reduce_scatter)'s
    /// split. Returns a 1-D tensor of `world_size · x.elem_count()` elements.
    fn all_gather(&self, x: &Tensor) -> Result<Tensor>;

    /// Every rank gets the root's `x` (shape and dtype must agree on all
    /// ranks; the values of the non-root ranks' `x` are ignored).
    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor>;

    /// Returns once every rank has entered the barrier (for NCCL: once this
    /// rank's stream has finished a collective that every rank joined).
    fn barrier(&self) -> Result<()>;

    /// [`all_reduce`](Self::all_reduce) with [`ReduceOp::Sum`].
    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor> {
        self.all_reduce(x, ReduceOp::Sum)
    }

    /// [`all_reduce`](Self::all_reduce) with [`ReduceOp::Avg`].
    fn all_reduce_avg(&self, x: &Tensor) -> Result<Tensor> {
        self.all_reduce(x, ReduceOp::Avg)
    }
}

impl<C: Collective + ?Sized> Collective for Box<C> {
    fn rank(&self) -> usize {
        (**self).rank()
    }
    fn world_size(&self) -> usize {
        (**self).world_size()
    }
    fn all_reduce(&self, x: &Tensor, op: ReduceOp) -> Result<Tensor> {
        (**self).all_reduce(x, op)
    }
    fn reduce_scatter(&self, x: &Tensor, op: ReduceOp) -> Result<Tensor> {
        (**self).reduce_scatter(x, op)
    }
    fn all_gather(&self, x: &Tensor) -> Result<Tensor> {
        (**self).all_gather(x)
    }
    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor> {
        (**self).broadcast(x, root)
    }
    fn barrier(&self) -> Result<()> {
        (**self).barrier()
    }
}

impl<C: Collective + ?Sized> Collective for &C {
    fn rank(&self) -> usize {
        (**self).rank()
    }
    fn world_size(&self) -> usize {
        (**self).world_size()
    }
    fn all_reduce(&self, x: &Tensor, op: ReduceOp) -> Result<Tensor> {
        (**self).all_reduce(x, op)
    }
    fn reduce_scatter(&self, x: &Tensor, op: ReduceOp) -> Result<Tensor> {
        (**self).reduce_scatter(x, op)
    }
    fn all_gather(&self, x: &Tensor) -> Result<Tensor> {
        (**self).all_gather(x)
    }
    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor> {
        (**self).broadcast(x, root)
    }
    fn barrier(&self) -> Result<()> {
        (**self).barrier()
    }
}

/// A [`Collective`] whose results are checked against the trait's contract
/// (element count and dtype): a faulty implementation gives an error where
/// the result is used, not a panic or a misread buffer. `DataParallel` and
/// the sharded checkpoint issue every collective through it.
pub(crate) struct Checked<'c, C: ?Sized>(pub(crate) &'c C);

/// `got`, if it has `want` elements of `dtype`; else an error naming `op`.
fn expect(op: &str, got: Tensor, want: usize, dtype: DType) -> Result<Tensor> {
    if got.elem_count() != want || got.dtype() != dtype {
        return Err(super::dist_err(
            &format!("Collective::{op}"),
            format!(
                "returned {} elements of {:?}, expected {want} of {dtype:?} (a faulty \
                 implementation or communicator)",
                got.elem_count(),
                got.dtype()
            ),
        ));
    }
    Ok(got)
}

impl<C: Collective + ?Sized> Collective for Checked<'_, C> {
    fn rank(&self) -> usize {
        self.0.rank()
    }
    fn world_size(&self) -> usize {
        self.0.world_size()
    }
    fn all_reduce(&self, x: &Tensor, op: ReduceOp) -> Result<Tensor> {
        let got = self.0.all_reduce(x, op)?;
        expect("all_reduce", got, x.elem_count(), x.dtype())
    }
    fn reduce_scatter(&self, x: &Tensor, op: ReduceOp) -> Result<Tensor> {
        let got = self.0.reduce_scatter(x, op)?;
        let want = x.elem_count() / self.0.world_size().max(1);
        expect("reduce_scatter", got, want, x.dtype())
    }
    fn all_gather(&self, x: &Tensor) -> Result<Tensor> {
        let got = self.0.all_gather(x)?;
        let want = self.0.world_size() * x.elem_count();
        expect("all_gather", got, want, x.dtype())
    }
    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor> {
        let got = self.0.broadcast(x, root)?;
        expect("broadcast", got, x.elem_count(), x.dtype())
    }
    fn barrier(&self) -> Result<()> {
        self.0.barrier()
    }
}

/// The dtypes every [`Collective`] supports.
pub const SUPPORTED_DTYPES: [DType; 2] = [DType::F32, DType::BF16];

/// `Ok` for a supported dtype, otherwise an error naming `who` (e.g.
/// `"LocalComm::all_reduce"`) and the dtype.
#[cfg_attr(not(feature = "nccl"), allow(dead_code))]
pub(crate) fn check_dtype(who: &str, dtype: DType) -> Result<()> {
    if SUPPORTED_DTYPES.contains(&dtype) {
        Ok(())
    } else {
        Err(super::dist_err(
            who,
            format!("dtype {dtype:?} is not supported (f32 and bf16 are)"),
        ))
    }
}
