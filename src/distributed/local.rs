//! In-process ranks: `N` threads of one process that communicate through
//! shared buffers.
//!
//! **A test double, not a way to train.** [`LocalGroup`] exists so that CI,
//! which has no GPU, can run every distributed algorithm of this crate on the
//! CPU with real concurrency (each rank on its own thread, blocking in each
//! collective until all ranks have joined it). It copies every tensor to the
//! host and reduces under one lock, on one thread: N ranks are never faster
//! than one process.
//!
//! # Determinism
//!
//! Reductions sum **in rank order** in f32, whatever order the threads arrive
//! in: `s = x₀; s += x₁; …; s += x_{N−1}` element by element, then for
//! [`ReduceOp::Avg`] `s / N` (one IEEE f32 division). The result is therefore
//! bit-reproducible from run to run, and equal to a single-process loop that
//! does the same arithmetic. Bf16 inputs are widened to f32 exactly, summed and
//! divided in f32 as above, and rounded once to bf16 (round to nearest even).
//!
//! # Failures
//!
//! Every rank's arguments are checked against the others' when the last one
//! arrives: different ops, dtypes, element counts or shapes (broadcast), a
//! root out of range, an element count not divisible by `N` (reduce-scatter)
//! or an unsupported dtype on any rank make the collective fail **on every
//! rank** with the same message, and the group stays usable.
//!
//! A rank that stops taking part must not leave the others blocked forever:
//! - dropping a [`LocalComm`] (its thread returned, maybe with an error, or
//!   unwound from a panic) marks the rank as gone; every collective that is
//!   waiting for it, and every later collective of the group, fails with an
//!   error naming the rank and whether it panicked or was dropped (the first
//!   rank to leave, as the others then leave in a cascade);
//! - [`LocalComm::abort`] fails the collectives waiting now and every later
//!   one, on every rank, with the given reason.
//!
//! A collective that completed before a rank left still returns its result
//! on every rank, so ranks that finish their work and drop their
//! communicators at different times do not fail each other. A rank that
//! loops forever without dropping its communicator still blocks the others:
//! there is no timeout.

use super::collective::{Collective, ReduceOp, SUPPORTED_DTYPES};
use super::dist_err;
use candle_core::{DType, Device, Result, Shape, Tensor};
use half::bf16;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

/// Creates the in-process ranks of one group (see the [module docs](self)).
#[derive(Debug)]
pub struct LocalGroup;

impl LocalGroup {
    /// `n` connected communicators, rank `0..n` in order; give each to its own
    /// thread. `n = 0` is an error.
    #[allow(clippy::new_ret_no_self)]
    pub fn new(n: usize) -> Result<Vec<LocalComm>> {
        if n == 0 {
            return Err(dist_err(
                "LocalGroup::new",
                "the world size must be ≥ 1, got 0",
            ));
        }
        let shared = Arc::new(Shared {
            world: n,
            state: Mutex::new(State {
                round: 0,
                slots: (0..n).map(|_| None).collect(),
                arrived: 0,
                last: None,
                gone: Vec::new(),
                aborted: None,
            }),
            cv: Condvar::new(),
        });
        Ok((0..n)
            .map(|rank| LocalComm {
                rank,
                shared: shared.clone(),
            })
            .collect())
    }

    /// Runs `f` on `n` ranks, each on its own (scoped) thread with its own
    /// [`LocalComm`], and returns the ranks' results in rank order. A rank
    /// that panics yields `Err("… rank r panicked: <message>")` (its
    /// communicator is dropped while unwinding, so the other ranks' pending
    /// collectives fail instead of waiting for it). The crate's error type,
    /// so a rank's [`Error`](crate::Error) stays typed (a candle error
    /// converts with `?`).
    pub fn run<T, F>(n: usize, f: F) -> crate::Result<Vec<crate::Result<T>>>
    where
        T: Send,
        F: Fn(LocalComm) -> crate::Result<T> + Sync,
    {
        let comms = Self::new(n)?;
        let f = &f;
        Ok(std::thread::scope(|s| {
            let handles: Vec<_> = comms
                .into_iter()
                .map(|c| {
                    let rank = c.rank;
                    (rank, s.spawn(move || f(c)))
                })
                .collect();
            handles
                .into_iter()
                .map(|(rank, h)| match h.join() {
                    Ok(r) => r,
                    Err(payload) => Err(dist_err(
                        "LocalGroup::run",
                        format!("rank {rank} panicked: {}", panic_message(&payload)),
                    )
                    .into()),
                })
                .collect()
        }))
    }
}

fn panic_message(payload: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic payload)".into()
    }
}

/// One rank of an in-process group ([`LocalGroup::new`]). `Send`: move it to
/// the rank's thread. Implements [`Collective`] for tensors on any device
/// (they are copied to the host and back; meant for the CPU).
pub struct LocalComm {
    rank: usize,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for LocalComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LocalComm(rank {} of {})", self.rank, self.shared.world)
    }
}

struct Shared {
    world: usize,
    state: Mutex<State>,
    cv: Condvar,
}

struct State {
    /// Number of completed rounds (collectives).
    round: u64,
    /// This round's contributions, by rank.
    slots: Vec<Option<Contribution>>,
    arrived: usize,
    /// The outcome of the last completed round, read by each rank as it wakes
    /// (valid until the next round completes, which needs every rank).
    last: Option<Arc<std::result::Result<Payload, String>>>,
    /// Ranks that have left the group, in the order they left, and why.
    gone: Vec<(usize, &'static str)>,
    aborted: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Op {
    AllReduce(ReduceOp),
    ReduceScatter(ReduceOp),
    AllGather,
    Broadcast(usize),
    Barrier,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::AllReduce(_) => "all_reduce",
            Op::ReduceScatter(_) => "reduce_scatter",
            Op::AllGather => "all_gather",
            Op::Broadcast(_) => "broadcast",
            Op::Barrier => "barrier",
        }
    }
    fn describe(self) -> String {
        match self {
            Op::AllReduce(r) | Op::ReduceScatter(r) => format!("{}({})", self.name(), r.name()),
            Op::Broadcast(root) => format!("broadcast(root {root})"),
            _ => self.name().into(),
        }
    }
}

enum Payload {
    F32(Vec<f32>),
    BF16(Vec<bf16>),
    Empty,
}

impl Payload {
    fn len(&self) -> usize {
        match self {
            Payload::F32(v) => v.len(),
            Payload::BF16(v) => v.len(),
            Payload::Empty => 0,
        }
    }
    fn dtype(&self) -> Option<DType> {
        match self {
            Payload::F32(_) => Some(DType::F32),
            Payload::BF16(_) => Some(DType::BF16),
            Payload::Empty => None,
        }
    }
    /// Elements `start..start+len` as a tensor of `shape` on `device`.
    fn to_tensor(&self, start: usize, len: usize, shape: Shape, device: &Device) -> Result<Tensor> {
        match self {
            Payload::F32(v) => Tensor::from_slice(&v[start..start + len], shape, device),
            Payload::BF16(v) => Tensor::from_slice(&v[start..start + len], shape, device),
            Payload::Empty => Tensor::zeros(shape, DType::F32, device),
        }
    }
}

struct Contribution {
    op: Op,
    shape: Shape,
    /// The data, or why this rank could not provide it (an unsupported dtype).
    data: std::result::Result<Payload, String>,
}

impl LocalComm {
    /// Fails every collective of the group that is waiting now or called
    /// later, on every rank (this one included), with an error that names
    /// this rank and `reason`. For a rank that hits an error outside a
    /// collective and wants the others to stop at once rather than when its
    /// communicator is dropped.
    pub fn abort(&self, reason: &str) {
        let mut st = self.shared.lock();
        if st.aborted.is_none() {
            st.aborted = Some(format!("rank {} aborted the group: {reason}", self.rank));
        }
        self.shared.cv.notify_all();
    }

    fn who(&self, op: Op) -> String {
        format!("LocalComm::{} (rank {})", op.name(), self.rank)
    }

    /// Deposits this rank's contribution, waits for the round to complete and
    /// returns its outcome.
    fn round(&self, c: Contribution) -> Result<Arc<std::result::Result<Payload, String>>> {
        let op = c.op;
        let sh = &*self.shared;
        let mut st = sh.lock();
        if let Some(why) = broken(&st) {
            return Err(dist_err(&self.who(op), why));
        }
        let my_round = st.round;
        st.slots[self.rank] = Some(c);
        st.arrived += 1;
        if st.arrived == sh.world {
            let slots: Vec<Contribution> = st.slots.iter_mut().map(|s| s.take().unwrap()).collect();
            st.arrived = 0;
            st.last = Some(Arc::new(complete(sh.world, &slots)));
            st.round += 1;
            sh.cv.notify_all();
            return Ok(st.last.clone().unwrap());
        }
        loop {
            st = sh.cv.wait(st).unwrap_or_else(|e| e.into_inner());
            if st.round != my_round {
                return Ok(st.last.clone().unwrap());
            }
            if let Some(why) = broken(&st) {
                return Err(dist_err(
                    &self.who(op),
                    format!("{why} while this rank waited"),
                ));
            }
        }
    }

    fn run_op(
        &self,
        op: Op,
        x: Option<&Tensor>,
    ) -> Result<(Arc<std::result::Result<Payload, String>>, Shape)> {
        let (shape, data) = match x {
            None => (Shape::from(()), Ok(Payload::Empty)),
            Some(x) => {
                let data = if SUPPORTED_DTYPES.contains(&x.dtype()) {
                    Ok(host_payload(x)?)
                } else {
                    Err(format!(
                        "rank {}: dtype {:?} is not supported (f32 and bf16 are)",
                        self.rank,
                        x.dtype()
                    ))
                };
                (x.shape().clone(), data)
            }
        };
        let out = self.round(Contribution {
            op,
            shape: shape.clone(),
            data,
        })?;
        if let Err(msg) = out.as_ref() {
            return Err(dist_err(&self.who(op), msg));
        }
        Ok((out, shape))
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Why the group cannot complete a round: aborted, or a rank gone (the first
/// one to leave is named as the cause).
fn broken(st: &State) -> Option<String> {
    if let Some(a) = &st.aborted {
        return Some(a.clone());
    }
    // The first rank to leave is the cause; the others may have left because
    // of it.
    let (r, why) = st.gone.first()?;
    let mut msg = format!("rank {r} left the group ({why})");
    if st.gone.len() > 1 {
        let later: Vec<usize> = st.gone[1..].iter().map(|(r, _)| *r).collect();
        msg += &format!(", then rank(s) {later:?}");
    }
    Some(msg)
}

fn host_payload(x: &Tensor) -> Result<Payload> {
    let flat = x.flatten_all()?;
    Ok(match x.dtype() {
        DType::F32 => Payload::F32(flat.to_vec1::<f32>()?),
        DType::BF16 => Payload::BF16(flat.to_vec1::<bf16>()?),
        _ => unreachable!("dtype checked before"),
    })
}

/// Validates the round's contributions against each other and computes its
/// outcome (the same for every rank; each rank reads its own part).
fn complete(world: usize, slots: &[Contribution]) -> std::result::Result<Payload, String> {
    let op = slots[0].op;
    if slots.iter().any(|c| c.op != op) {
        let ops: Vec<String> = slots
            .iter()
            .enumerate()
            .map(|(r, c)| format!("rank {r}: {}", c.op.describe()))
            .collect();
        return Err(format!(
            "ranks called different collectives: {}",
            ops.join(", ")
        ));
    }
    let mut data = Vec::with_capacity(world);
    for c in slots {
        match &c.data {
            Err(msg) => return Err(msg.clone()),
            Ok(p) => data.push(p),
        }
    }
    if op == Op::Barrier {
        return Ok(Payload::Empty);
    }
    let dtypes: Vec<_> = data.iter().map(|p| p.dtype().unwrap()).collect();
    if dtypes.iter().any(|d| *d != dtypes[0]) {
        return Err(format!(
            "dtypes differ across ranks: {dtypes:?} (rank order)"
        ));
    }
    let lens: Vec<usize> = data.iter().map(|p| p.len()).collect();
    if lens.iter().any(|l| *l != lens[0]) {
        return Err(format!(
            "element counts differ across ranks: {lens:?} (rank order)"
        ));
    }
    match op {
        Op::AllReduce(r) => Ok(reduce(&data, r, world)),
        Op::ReduceScatter(r) => {
            if !lens[0].is_multiple_of(world) {
                return Err(format!(
                    "the input has {} elements, not a multiple of the world size {world}",
                    lens[0]
                ));
            }
            Ok(reduce(&data, r, world))
        }
        Op::AllGather => Ok(match data[0] {
            Payload::F32(_) => Payload::F32(
                data.iter()
                    .flat_map(|p| match p {
                        Payload::F32(v) => v.iter().copied(),
                        _ => unreachable!(),
                    })
                    .collect(),
            ),
            Payload::BF16(_) => Payload::BF16(
                data.iter()
                    .flat_map(|p| match p {
                        Payload::BF16(v) => v.iter().copied(),
                        _ => unreachable!(),
                    })
                    .collect(),
            ),
            Payload::Empty => unreachable!(),
        }),
        Op::Broadcast(root) => {
            if root >= world {
                return Err(format!(
                    "root {root} is out of range for world size {world}"
                ));
            }
            let shapes: Vec<&Shape> = slots.iter().map(|c| &c.shape).collect();
            if shapes.iter().any(|s| *s != shapes[0]) {
                return Err(format!(
                    "shapes differ across ranks: {shapes:?} (rank order)"
                ));
            }
            Ok(match data[root] {
                Payload::F32(v) => Payload::F32(v.clone()),
                Payload::BF16(v) => Payload::BF16(v.clone()),
                Payload::Empty => unreachable!(),
            })
        }
        Op::Barrier => unreachable!(),
    }
}

/// Sum in rank order in f32 (then `/ world` for Avg); bf16 rounded once.
fn reduce(data: &[&Payload], op: ReduceOp, world: usize) -> Payload {
    let n = data[0].len();
    let mut acc = vec![0f32; n];
    for (r, p) in data.iter().enumerate() {
        match p {
            Payload::F32(v) => {
                if r == 0 {
                    acc.copy_from_slice(v);
                } else {
                    acc.iter_mut().zip(v).for_each(|(a, x)| *a += *x);
                }
            }
            Payload::BF16(v) => {
                if r == 0 {
                    acc.iter_mut().zip(v).for_each(|(a, x)| *a = x.to_f32());
                } else {
                    acc.iter_mut().zip(v).for_each(|(a, x)| *a += x.to_f32());
                }
            }
            Payload::Empty => unreachable!(),
        }
    }
    if op == ReduceOp::Avg {
        let w = world as f32;
        acc.iter_mut().for_each(|a| *a /= w);
    }
    match data[0] {
        Payload::BF16(_) => Payload::BF16(acc.into_iter().map(bf16::from_f32).collect()),
        _ => Payload::F32(acc),
    }
}

impl Collective for LocalComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_reduce(&self, x: &Tensor, op: ReduceOp) -> Result<Tensor> {
        let (out, shape) = self.run_op(Op::AllReduce(op), Some(x))?;
        let p = out.as_ref().as_ref().unwrap();
        p.to_tensor(0, p.len(), shape, x.device())
    }

    fn reduce_scatter(&self, x: &Tensor, op: ReduceOp) -> Result<Tensor> {
        let (out, _) = self.run_op(Op::ReduceScatter(op), Some(x))?;
        let p = out.as_ref().as_ref().unwrap();
        let chunk = p.len() / self.shared.world;
        p.to_tensor(self.rank * chunk, chunk, Shape::from(chunk), x.device())
    }

    fn all_gather(&self, x: &Tensor) -> Result<Tensor> {
        let (out, _) = self.run_op(Op::AllGather, Some(x))?;
        let p = out.as_ref().as_ref().unwrap();
        p.to_tensor(0, p.len(), Shape::from(p.len()), x.device())
    }

    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor> {
        let (out, shape) = self.run_op(Op::Broadcast(root), Some(x))?;
        let p = out.as_ref().as_ref().unwrap();
        p.to_tensor(0, p.len(), shape, x.device())
    }

    fn barrier(&self) -> Result<()> {
        self.run_op(Op::Barrier, None).map(|_| ())
    }
}

impl Drop for LocalComm {
    fn drop(&mut self) {
        let mut st = self.shared.lock();
        let why = if std::thread::panicking() {
            "it panicked"
        } else {
            "its communicator was dropped"
        };
        st.gone.push((self.rank, why));
        self.shared.cv.notify_all();
    }
}
