//! Fault injection into the collectives of a data-parallel step, a
//! checkpoint save and a checkpoint load.
//!
//! [`FaultyComm`] wraps an in-process [`LocalComm`] and, on a chosen rank (or
//! on every rank) at a chosen call of a chosen collective, injects one fault
//! **after taking part in the underlying collective** (so the other ranks
//! get their results and can go on): an error, a result one element short or
//! long, a NaN in the first element, or the last element changed by +1.
//!
//! The sweep enumerates every call a fault-free run makes (counted by a first,
//! fault-free run of the same case) × fault × faulty rank (each rank alone,
//! and all ranks at once), at 2 and 3 ranks, for Muon (spectral decay),
//! AdamW and `Scheduled<Steepest>` on the Stiefel manifold (two-phase step),
//! each with and without clipping, and checks the contract of
//! `src/distributed/data_parallel.rs`'s module docs: no panic, no hang, no
//! split (some ranks `Ok`, some `Err`), no desynchronisation (ranks issuing
//! different collectives: a hang under NCCL), and after an error either
//! nothing changed on any rank or every rank refuses further steps; the
//! parameters agree across ranks (except after a failed all-gather, the
//! step's last collective, which the docs say may leave them apart); and
//! when every rank returns `Ok` after an error or a result of the wrong
//! length, the outcome is the fault-free run's (anything else swallowed a
//! reported fault: only a corrupted value may pass unseen). Every case
//! runs under a deadline.
//!
//! The four violations the sweep found (now fixed) have one test each at
//! the end; the sweep fails on any violation. It prints its table with
//! `cargo test --test distributed_faults -- --nocapture`.

mod distributed_support;

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Result as CResult, Tensor};
use distributed_support::{bits, gvalues, host};
use steepest::distributed::{
    load_union, Collective, DataParallel, DataParallelConfig, LocalComm, LocalGroup, ReduceOp,
    ShardedOptimizer,
};
use steepest::optim::NamedVar;
use steepest::schedule::{Schedule, Scheduled};
use steepest::{
    AdamW, AdamWConfig, Manifold, Muon, MuonConfig, OptimizerState, Steepest, SteepestConfig,
    WeightDecay,
};

// ---------------------------------------------------------------------------
// The faulty communicator.

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Op {
    AllReduce,
    ReduceScatter,
    AllGather,
    Broadcast,
    Barrier,
}

impl Op {
    fn index(self) -> usize {
        self as usize
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Fault {
    /// `Err` on the faulty rank(s), after taking part.
    Err,
    /// The result one element short (flattened).
    Short,
    /// The result one element long (a zero appended, flattened).
    Long,
    /// Element 0 of the result set to NaN.
    NanFirst,
    /// The last element of the result changed by +1.
    BumpLast,
}

const FAULTS: [Fault; 5] = [
    Fault::Err,
    Fault::Short,
    Fault::Long,
    Fault::NanFirst,
    Fault::BumpLast,
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Who {
    Rank(usize),
    All,
}

impl Who {
    fn hits(self, rank: usize) -> bool {
        match self {
            Who::Rank(r) => r == rank,
            Who::All => true,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Injection {
    op: Op,
    /// The call number of `op` since the communicator was armed.
    call: usize,
    fault: Fault,
    who: Who,
}

/// What every rank's communicator of one group shares with the others (not
/// a collective: plain shared memory, to see whether ranks fell out of step).
#[derive(Clone, Debug, Default)]
struct Progress {
    /// Collectives entered, in order.
    log: Vec<Op>,
    /// Done with the faulty operation (waiting in `settle`): the length of
    /// `log` then.
    done: Option<usize>,
}

type Shared = Arc<Mutex<Vec<Progress>>>;

struct FaultyComm {
    inner: LocalComm,
    injection: Option<Injection>,
    armed: Cell<bool>,
    /// Calls per op since armed.
    counts: Cell<[usize; 5]>,
    /// Ops issued while armed.
    armed_log: RefCell<Vec<Op>>,
    injected: Cell<bool>,
    shared: Shared,
}

impl FaultyComm {
    fn new(inner: LocalComm, injection: Option<Injection>, shared: Shared) -> Self {
        Self {
            inner,
            injection,
            armed: Cell::new(false),
            counts: Cell::new([0; 5]),
            armed_log: RefCell::new(Vec::new()),
            injected: Cell::new(false),
            shared,
        }
    }

    fn arm(&self) {
        self.armed.set(true);
    }

    /// Stops injecting; returns the ops issued while armed.
    fn disarm(&self) -> Vec<Op> {
        self.armed.set(false);
        self.armed_log.borrow().clone()
    }

    fn issued(&self) -> usize {
        self.shared.lock().unwrap()[self.inner.rank()].log.len()
    }

    /// Waits until every rank is done with the faulty operation. `true` if
    /// all issued the same collectives; if some rank waits in a collective
    /// that this one never joins (desynchronised), aborts the group (so that
    /// nothing hangs) and returns `false`.
    fn settle(&self, deadline: Instant) -> bool {
        let rank = self.inner.rank();
        let mine = {
            let mut st = self.shared.lock().unwrap();
            let n = st[rank].log.len();
            st[rank].done = Some(n);
            n
        };
        loop {
            {
                let st = self.shared.lock().unwrap();
                if st.iter().all(|p| p.done.is_some()) {
                    // (the others may have gone on to the probe step)
                    let upto = |p: &Progress| p.log[..p.done.unwrap()].to_vec();
                    return st.iter().all(|p| upto(p) == upto(&st[rank]));
                }
                if st.iter().any(|p| p.done.is_none() && p.log.len() > mine) {
                    drop(st);
                    self.inner.abort("desynchronised (fault sweep)");
                    return false;
                }
            }
            if Instant::now() > deadline {
                self.inner.abort("settle deadline (fault sweep)");
                return false;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    fn run(&self, op: Op, f: impl FnOnce() -> CResult<Tensor>) -> CResult<Tensor> {
        let rank = self.inner.rank();
        self.shared.lock().unwrap()[rank].log.push(op);
        let out = f();
        if !self.armed.get() {
            return out;
        }
        self.armed_log.borrow_mut().push(op);
        let mut counts = self.counts.get();
        let call = counts[op.index()];
        counts[op.index()] += 1;
        self.counts.set(counts);
        let Some(inj) = self.injection else {
            return out;
        };
        if inj.op != op || inj.call != call || !inj.who.hits(rank) {
            return out;
        }
        let t = out?;
        self.injected.set(true);
        let flat = t.flatten_all()?;
        let n = flat.elem_count();
        match inj.fault {
            Fault::Err => Err(candle_core::Error::Msg(format!(
                "injected fault: {op:?} call {call} on rank {rank}"
            ))),
            Fault::Short => flat.narrow(0, 0, n.saturating_sub(1)),
            Fault::Long => Tensor::cat(&[&flat, &flat.narrow(0, 0, 1)?.zeros_like()?], 0),
            Fault::NanFirst | Fault::BumpLast => {
                let dtype = flat.dtype();
                let mut v = flat.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                if inj.fault == Fault::NanFirst {
                    v[0] = f32::NAN;
                } else {
                    v[n - 1] += 1.0;
                }
                Tensor::from_vec(v, t.shape(), t.device())?.to_dtype(dtype)
            }
        }
    }
}

impl Collective for FaultyComm {
    fn rank(&self) -> usize {
        self.inner.rank()
    }
    fn world_size(&self) -> usize {
        self.inner.world_size()
    }
    fn all_reduce(&self, x: &Tensor, op: ReduceOp) -> CResult<Tensor> {
        self.run(Op::AllReduce, || self.inner.all_reduce(x, op))
    }
    fn reduce_scatter(&self, x: &Tensor, op: ReduceOp) -> CResult<Tensor> {
        self.run(Op::ReduceScatter, || self.inner.reduce_scatter(x, op))
    }
    fn all_gather(&self, x: &Tensor) -> CResult<Tensor> {
        self.run(Op::AllGather, || self.inner.all_gather(x))
    }
    fn broadcast(&self, x: &Tensor, root: usize) -> CResult<Tensor> {
        self.run(Op::Broadcast, || self.inner.broadcast(x, root))
    }
    fn barrier(&self) -> CResult<()> {
        self.run(Op::Barrier, || {
            self.inner.barrier()?;
            Tensor::zeros(1, DType::F32, &Device::Cpu)
        })
        .map(|_| ())
    }
}

// ---------------------------------------------------------------------------
// Models, optimizers, gradients, snapshots.

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Opt {
    Muon,
    AdamW,
    /// `Scheduled<Steepest>` on the Stiefel manifold (two-phase step).
    Stiefel,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Phase {
    Step,
    Save,
    Load,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Setup {
    opt: Opt,
    clip: bool,
    world: usize,
}

fn shapes(opt: Opt) -> Vec<(&'static str, Vec<usize>)> {
    match opt {
        Opt::Muon | Opt::AdamW => vec![
            ("embed.weight", vec![5, 4]),
            ("h.0.weight", vec![6, 4]),
            ("h.1.weight", vec![6, 4]),
            ("h.2.weight", vec![4, 6]),
            ("ln.weight", vec![4]),
        ],
        Opt::Stiefel => vec![
            ("w.0", vec![6, 3]),
            ("w.1", vec![6, 3]),
            ("w.2", vec![6, 3]),
            ("w.3", vec![5, 2]),
        ],
    }
}

fn make_named(opt: Opt, seed: u64) -> Vec<NamedVar> {
    distributed_support::make_named(&shapes(opt), seed)
}

fn muon(vars: Vec<NamedVar>) -> Muon {
    let cfg = MuonConfig {
        lr: 0.02,
        weight_decay: WeightDecay::spectral(0.1),
        adamw: AdamWConfig {
            lr: 3e-3,
            weight_decay: WeightDecay::spectral(0.1),
            ..AdamWConfig::default()
        },
        adamw_names: vec!["embed".into()],
        ..MuonConfig::default()
    };
    Muon::from_named(vars, cfg).unwrap()
}

fn adamw(vars: Vec<NamedVar>) -> AdamW {
    let cfg = AdamWConfig {
        weight_decay: WeightDecay::Decoupled(0.1),
        ..AdamWConfig::default()
    };
    AdamW::from_named(vars, cfg).unwrap()
}

fn stiefel(vars: Vec<NamedVar>) -> Scheduled<Steepest> {
    let cfg = SteepestConfig {
        lr: 0.05,
        manifold: Manifold::Stiefel { transpose: false },
        ..Default::default()
    };
    let schedule = Schedule::cosine(0.05, 0.005, 10).unwrap();
    Scheduled::new(Steepest::from_named(vars, cfg).unwrap(), schedule)
}

fn dp_config(clip: bool) -> DataParallelConfig {
    DataParallelConfig {
        clip_grad_norm: clip.then_some(1.0),
        ..DataParallelConfig::default()
    }
}

/// Rank `rank`'s gradients at `step`.
fn grads(opt: Opt, step: usize, rank: usize) -> Vec<Option<Tensor>> {
    let scale = if opt == Opt::Stiefel { 0.01 } else { 1.0 };
    shapes(opt)
        .iter()
        .enumerate()
        .map(|(i, (_, d))| {
            let seed = (step as u64) << 32 | (rank as u64) << 16 | i as u64;
            let n = d.iter().product();
            let v: Vec<f32> = gvalues(seed, n).into_iter().map(|x| x * scale).collect();
            Some(Tensor::from_vec(v, d.as_slice(), &Device::Cpu).unwrap())
        })
        .collect()
}

type HostState = BTreeMap<String, Vec<u8>>;

fn host_state(state: &HashMap<String, Tensor>) -> HostState {
    state
        .iter()
        .map(|(k, t)| {
            let flat = t.flatten_all().unwrap();
            let bytes: Vec<u8> = match t.dtype() {
                DType::U8 => flat.to_vec1::<u8>().unwrap(),
                DType::U32 => flat
                    .to_vec1::<u32>()
                    .unwrap()
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
                DType::I64 => flat
                    .to_vec1::<i64>()
                    .unwrap()
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
                _ => bits(&host(&flat))
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
            };
            (format!("{k} {:?} {:?}", t.dtype(), t.dims()), bytes)
        })
        .collect()
}

/// Parameters (bit patterns) and optimizer state of one rank.
#[derive(Clone, Debug, PartialEq)]
struct Snap {
    params: Vec<Vec<u32>>,
    state: HostState,
    steps: u64,
}

fn params(vars: &[NamedVar]) -> Vec<Vec<u32>> {
    vars.iter()
        .map(|v| bits(&host(v.var.as_tensor())))
        .collect()
}

fn snap<C: Collective, O: ShardedOptimizer + OptimizerState>(
    vars: &[NamedVar],
    dp: &DataParallel<C, O>,
) -> Snap {
    Snap {
        params: params(vars),
        state: host_state(&dp.optimizer().state_dict().unwrap()),
        steps: dp.steps(),
    }
}

fn has_nan(p: &[Vec<u32>]) -> bool {
    p.iter().flatten().any(|b| f32::from_bits(*b).is_nan())
}

// ---------------------------------------------------------------------------
// One case: a group of ranks, one faulty operation, a probe step after it.

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Case {
    setup: Setup,
    phase: Phase,
    injection: Option<Injection>,
}

/// A fault-free step after the faulty operation: its result, the number of
/// collectives it issued, the parameters after it.
type Probe = (Result<(), String>, usize, Vec<Vec<u32>>);

#[derive(Clone, Debug)]
struct RankOut {
    result: Result<(), String>,
    panicked: Option<String>,
    injected: bool,
    /// Collectives issued by the faulty operation.
    ops: Vec<Op>,
    before: Snap,
    after: Snap,
    /// Load: the state at the time of the checkpoint.
    saved: Option<Snap>,
    /// Whether every rank issued the same collectives (seen by this rank).
    in_sync: bool,
    /// A step after the faulty operation (fault-free): its result, the
    /// collectives it issued, the parameters after it.
    probe: Option<Probe>,
}

thread_local! {
    static QUIET: Cell<bool> = const { Cell::new(false) };
}

/// Panics of the ranks are caught and reported; keep them off stderr.
fn quiet_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !QUIET.with(|q| q.get()) {
                default(info);
            }
        }));
    });
}

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "(non-string panic)".into()
    }
}

fn err_text(e: steepest::Error) -> String {
    match e {
        steepest::Error::NonFiniteGradient { param } => format!("non-finite gradient: {param}"),
        e => e.to_string(),
    }
}

fn rank_body<O: ShardedOptimizer + OptimizerState>(
    comm: LocalComm,
    case: Case,
    shared: &Shared,
    dir: &Path,
    deadline: Instant,
    build: impl Fn(Vec<NamedVar>) -> O,
) -> steepest::Result<RankOut> {
    QUIET.with(|q| q.set(true));
    let rank = comm.rank();
    let opt = case.setup.opt;
    let fc = FaultyComm::new(comm, case.injection, shared.clone());
    let vars = make_named(opt, 1 + rank as u64);
    let mut dp = DataParallel::for_optimizer(fc, build(vars.clone()), dp_config(case.setup.clip))?;
    dp.step_grads(&grads(opt, 0, rank))?;
    let ckpt = dir.join("ckpt");
    let mut saved = None;
    if case.phase == Phase::Load {
        dp.save_state(&ckpt)?;
        saved = Some(snap(&vars, &dp));
        dp.step_grads(&grads(opt, 1, rank))?;
    }
    let before = snap(&vars, &dp);
    dp.comm().arm();
    let result = catch_unwind(AssertUnwindSafe(|| match case.phase {
        Phase::Step => dp.step_grads(&grads(opt, 2, rank)),
        Phase::Save => dp.save_state(dir.join("faulty")),
        Phase::Load => dp.load_state(&ckpt),
    }));
    let ops = dp.comm().disarm();
    let (result, panicked) = match result {
        Ok(r) => (r.map_err(err_text), None),
        Err(p) => (Err("panicked".into()), Some(panic_text(p))),
    };
    let in_sync = dp.comm().settle(deadline);
    let after = snap(&vars, &dp);
    let probe = if in_sync && case.phase != Phase::Save {
        let n = dp.comm().issued();
        let r = dp.step_grads(&grads(opt, 3, rank)).map_err(err_text);
        Some((r, dp.comm().issued() - n, params(&vars)))
    } else {
        None
    };
    Ok(RankOut {
        result,
        panicked,
        injected: dp.comm().injected.get(),
        ops,
        before,
        after,
        saved,
        in_sync,
        probe,
    })
}

/// Outcome of one case: the ranks' outputs, or why there are none.
type CaseOut = Result<Vec<RankOut>, String>;

fn scratch_root() -> PathBuf {
    std::env::temp_dir().join(format!(
        "steepest-distributed-faults-{}",
        std::process::id()
    ))
}

fn run_case(case: Case, id: usize) -> CaseOut {
    quiet_panics();
    let dir = scratch_root().join(format!("case-{id}"));
    let _ = std::fs::remove_dir_all(&dir);
    let (tx, rx) = std::sync::mpsc::channel();
    let thread_dir = dir.clone();
    let deadline = Instant::now() + Duration::from_secs(15);
    std::thread::spawn(move || {
        let shared: Shared = Arc::new(Mutex::new(vec![Progress::default(); case.setup.world]));
        let d = &thread_dir;
        let out = LocalGroup::run(case.setup.world, |comm| match case.setup.opt {
            Opt::Muon => rank_body(comm, case, &shared, d, deadline, muon),
            Opt::AdamW => rank_body(comm, case, &shared, d, deadline, adamw),
            Opt::Stiefel => rank_body(comm, case, &shared, d, deadline, stiefel),
        });
        let out = match out {
            Err(e) => Err(e.to_string()),
            Ok(ranks) => ranks
                .into_iter()
                .enumerate()
                .map(|(r, o)| o.map_err(|e| format!("rank {r}: setup failed: {e}")))
                .collect(),
        };
        let _ = tx.send(out);
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(o) => o,
        Err(_) => Err("HANG: no result within 20 s".into()),
    }
}

// ---------------------------------------------------------------------------
// Judging a case against the contract.

#[derive(Clone, Debug)]
struct Verdict {
    /// A short class name (the table's column).
    class: &'static str,
    /// A violation of the documented contract.
    violation: bool,
    detail: String,
}

fn verdict(class: &'static str, violation: bool, detail: impl Into<String>) -> Verdict {
    Verdict {
        class,
        violation,
        detail: detail.into(),
    }
}

fn all_equal<T: PartialEq>(v: &[T]) -> bool {
    v.windows(2).all(|w| w[0] == w[1])
}

/// The manifest of the faulty save, whether it exists and its union loads.
fn save_files(dir: &Path) -> (bool, Result<HostState, String>) {
    let d = dir.join("faulty");
    let manifest = d.join("manifest.json").exists();
    (
        manifest,
        load_union(&d)
            .map(|u| host_state(&u))
            .map_err(|e| e.to_string()),
    )
}

fn judge(case: Case, out: &CaseOut, reference: &[RankOut], files: Option<&SaveFiles>) -> Verdict {
    let ranks = match out {
        Err(e) if e.starts_with("HANG") => return verdict("hang", true, e.clone()),
        Err(e) => return verdict("harness-error", true, e.clone()),
        Ok(r) => r,
    };
    if let Some((r, p)) = ranks
        .iter()
        .enumerate()
        .find_map(|(r, o)| o.panicked.as_ref().map(|p| (r, p)))
    {
        return verdict("panic", true, format!("rank {r} panicked: {p}"));
    }
    let ops: Vec<&Vec<Op>> = ranks.iter().map(|o| &o.ops).collect();
    let results: Vec<&Result<(), String>> = ranks.iter().map(|o| &o.result).collect();
    let oks = results.iter().filter(|r| r.is_ok()).count();
    let injected: Vec<usize> = (0..ranks.len()).filter(|&r| ranks[r].injected).collect();
    if !all_equal(&ops) || ranks.iter().any(|o| !o.in_sync) {
        let counts: Vec<usize> = ops.iter().map(|o| o.len()).collect();
        let res: Vec<String> = results
            .iter()
            .map(|r| match r {
                Ok(()) => "Ok".into(),
                Err(e) => format!("Err({})", e.chars().take(90).collect::<String>()),
            })
            .collect();
        let detail = format!("collectives issued per rank {counts:?}; results {res:?}");
        return match limitation(case) {
            Some(Limitation::Corruption) => verdict("desync(corruption)", false, detail),
            Some(Limitation::OneRank) => {
                verdict("desync(one rank's collective failed)", false, detail)
            }
            None => verdict("desync", true, detail),
        };
    }
    let params_after: Vec<&Vec<Vec<u32>>> = ranks.iter().map(|o| &o.after.params).collect();
    let params_agree = all_equal(&params_after);
    if oks != 0 && oks != ranks.len() {
        let res: Vec<String> = results
            .iter()
            .map(|r| match r {
                Ok(()) => "Ok".into(),
                Err(e) => format!("Err({})", e.chars().take(120).collect::<String>()),
            })
            .collect();
        let detail = format!(
            "results {res:?}; injected on {injected:?}; parameters agree across ranks: \
             {params_agree}"
        );
        return match limitation(case) {
            Some(Limitation::Corruption) => verdict("split(corruption)", false, detail),
            Some(Limitation::OneRank) => {
                verdict("split(one rank's collective failed)", false, detail)
            }
            None => verdict("split", true, detail),
        };
    }
    match case.phase {
        Phase::Save => judge_save(case, oks == ranks.len(), ranks, files.unwrap()),
        Phase::Step | Phase::Load => {
            judge_step_or_load(case, oks == ranks.len(), ranks, reference, params_agree)
        }
    }
}

/// Why a split or a desynchronisation is not counted as a violation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Limitation {
    /// A corrupted value (a flag, a checksum) read differently by one rank:
    /// nothing can tell a corrupted value from a real one.
    Corruption,
    /// One rank's collective failed (an error, or a result of the wrong
    /// length): "a rank whose own all-reduce call fails (a device or
    /// communicator fault) cannot tell the others, as with any collective"
    /// (data_parallel.rs, module docs).
    OneRank,
}

fn limitation(case: Case) -> Option<Limitation> {
    let inj = case.injection?;
    match (inj.fault, inj.who) {
        (Fault::NanFirst | Fault::BumpLast, _) => Some(Limitation::Corruption),
        (_, Who::Rank(_)) => Some(Limitation::OneRank),
        _ => None,
    }
}

struct SaveFiles {
    manifest: bool,
    union: Result<HostState, String>,
}

fn judge_save(case: Case, all_ok: bool, ranks: &[RankOut], files: &SaveFiles) -> Verdict {
    let unchanged = ranks.iter().all(|o| o.before == o.after);
    if !unchanged {
        return verdict(
            "save-changed-state",
            true,
            "save_state changed a rank's state",
        );
    }
    let reference = &REFERENCE_UNION.lock().unwrap()[&(case.setup.opt, case.setup.world)];
    if all_ok {
        // (as for a step: only a corrupted value may pass unseen)
        let swallowed = limitation(case) != Some(Limitation::Corruption);
        match &files.union {
            Ok(u) if u == reference => verdict("ok-exact", false, ""),
            Ok(_) => verdict(
                "ok-silent-wrong-checkpoint",
                swallowed,
                "the checkpoint loads but differs from the fault-free one",
            ),
            Err(e) => verdict(
                "ok-unloadable(detected at load)",
                swallowed,
                format!("every rank returned Ok; load_union: {e}"),
            ),
        }
    } else if files.manifest && limitation(case).is_some() {
        verdict("err-but-manifest-written(corruption)", false, "")
    } else if files.manifest {
        verdict(
            "err-but-manifest-written",
            true,
            format!(
                "every rank returned Err ({}) but manifest.json was written; loadable: {}",
                ranks[0].result.clone().unwrap_err(),
                files.union.is_ok()
            ),
        )
    } else {
        verdict("err-no-manifest", false, "")
    }
}

fn judge_step_or_load(
    case: Case,
    all_ok: bool,
    ranks: &[RankOut],
    reference: &[RankOut],
    params_agree: bool,
) -> Verdict {
    let probes: Vec<&Probe> = ranks.iter().map(|o| o.probe.as_ref().unwrap()).collect();
    let probe_ok = probes.iter().all(|p| p.0.is_ok());
    let probe_agree = all_equal(&probes.iter().map(|p| &p.2).collect::<Vec<_>>());
    if all_ok {
        let exact = ranks.iter().zip(reference).all(|(o, r)| o.after == r.after);
        let nan = ranks.iter().any(|o| has_nan(&o.after.params));
        if exact {
            return verdict("ok-exact", false, "");
        }
        let state_agree_with_ref = ranks
            .iter()
            .zip(reference)
            .all(|(o, r)| o.after.state == r.after.state);
        let detail = format!(
            "all Ok; params agree across ranks: {params_agree}; NaN in params: {nan}; \
             states equal the fault-free run's: {state_agree_with_ref}; probe step: all Ok \
             {probe_ok}, params agree after it {probe_agree}"
        );
        // An error or a result of the wrong length is a fault the
        // collective reported: every rank returning Ok with another
        // result swallowed it. Only a corrupted value is undetectable.
        let swallowed = limitation(case) != Some(Limitation::Corruption);
        return if params_agree {
            verdict("ok-silent-consistent", swallowed, detail)
        } else {
            verdict("ok-silent-divergent", swallowed, detail)
        };
    }
    // Every rank returned Err.
    let unchanged = ranks.iter().all(|o| o.before == o.after);
    // The documented broken state: the probe is refused on every rank,
    // without a collective.
    let broken = probes
        .iter()
        .all(|p| p.1 == 0 && p.0.as_ref().is_err_and(|e| e.contains("refused")));
    let first_err = ranks[0].result.clone().unwrap_err();
    let first_err: String = first_err.chars().take(160).collect();
    if case.phase == Phase::Load {
        // "if loading fails on any rank, every rank keeps (or gets back) its
        // previous state and returns an error"
        return if unchanged && params_agree && probe_ok && probe_agree {
            verdict("err-unchanged", false, "")
        } else {
            let changed: Vec<usize> = (0..ranks.len())
                .filter(|&r| ranks[r].before.state != ranks[r].after.state)
                .collect();
            let to_ckpt: Vec<usize> = (0..ranks.len())
                .filter(|&r| {
                    Some(&ranks[r].after.state) == ranks[r].saved.as_ref().map(|s| &s.state)
                })
                .collect();
            verdict(
                "err-state-changed",
                true,
                format!(
                    "every rank returned Err ({first_err}) but the state changed on ranks \
                     {changed:?} (equal to the checkpoint on {to_ckpt:?}); probe all Ok \
                     {probe_ok}"
                ),
            )
        };
    }
    // A failed all-gather (the step's last collective) leaves the owners'
    // shares stepped and the others' parameters unwritten: documented as
    // the broken state with parameters that may differ.
    let after_gather = case.injection.is_some_and(|i| i.op == Op::AllGather);
    if broken && params_agree {
        verdict("err-broken", false, "")
    } else if broken && after_gather {
        verdict("err-broken-params-differ", false, "")
    } else if unchanged && params_agree {
        if probe_ok && probe_agree {
            verdict("err-unchanged", false, "")
        } else {
            verdict(
                "err-unchanged-probe-fails",
                true,
                format!("nothing changed but the next step: {:?}", probes[0].0),
            )
        }
    } else {
        let changed: Vec<usize> = (0..ranks.len())
            .filter(|&r| ranks[r].before != ranks[r].after)
            .collect();
        verdict(
            "err-inconsistent",
            true,
            format!(
                "every rank returned Err ({first_err}); changed on ranks {changed:?}; params \
                 agree across ranks: {params_agree}; next step refused on every rank: \
                 {broken}; next step all Ok: {probe_ok}, params agree after it: {probe_agree}"
            ),
        )
    }
}

type UnionKey = (Opt, usize);
static REFERENCE_UNION: Mutex<BTreeMap<UnionKey, HostState>> = Mutex::new(BTreeMap::new());

// ---------------------------------------------------------------------------
// The sweep.

fn setups() -> Vec<Setup> {
    let mut v = Vec::new();
    for world in [2, 3] {
        for opt in [Opt::Muon, Opt::AdamW, Opt::Stiefel] {
            for clip in [false, true] {
                v.push(Setup { opt, clip, world });
            }
        }
    }
    v
}

/// Every injection for the calls `ops` (a fault-free run's collectives).
fn injections(ops: &[Op], world: usize) -> Vec<Injection> {
    let mut counts: BTreeMap<Op, usize> = BTreeMap::new();
    for op in ops {
        *counts.entry(*op).or_default() += 1;
    }
    let mut out = Vec::new();
    for (&op, &n) in &counts {
        for call in 0..n {
            for fault in FAULTS {
                let whos = (0..world).map(Who::Rank).chain([Who::All]);
                for who in whos {
                    out.push(Injection {
                        op,
                        call,
                        fault,
                        who,
                    });
                }
            }
        }
    }
    out
}

fn next_id() -> usize {
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// The fault-free run of a setup and phase (every rank `Ok`; for a save,
/// its checkpoint's union kept for comparison).
fn reference_run(setup: Setup, phase: Phase) -> Vec<RankOut> {
    let clean = Case {
        setup,
        phase,
        injection: None,
    };
    let id = next_id();
    let reference = run_case(clean, id).unwrap_or_else(|e| panic!("{clean:?}: {e}"));
    for (r, o) in reference.iter().enumerate() {
        assert!(o.result.is_ok(), "{clean:?} rank {r}: {:?}", o.result);
    }
    let ref_dir = scratch_root().join(format!("case-{id}"));
    if phase == Phase::Save {
        let (_, u) = save_files(&ref_dir);
        REFERENCE_UNION
            .lock()
            .unwrap()
            .insert((setup.opt, setup.world), u.unwrap());
    }
    let _ = std::fs::remove_dir_all(&ref_dir);
    reference
}

fn run_and_judge(case: Case, reference: &[RankOut]) -> Verdict {
    let id = next_id();
    let out = run_case(case, id);
    let dir = scratch_root().join(format!("case-{id}"));
    let files = (case.phase == Phase::Save).then(|| {
        let (manifest, union) = save_files(&dir);
        SaveFiles { manifest, union }
    });
    let _ = std::fs::remove_dir_all(&dir);
    judge(case, &out, reference, files.as_ref())
}

/// One case with its own fault-free reference.
fn check(opt: Opt, clip: bool, world: usize, phase: Phase, injection: Injection) -> Verdict {
    let setup = Setup { opt, clip, world };
    let reference = reference_run(setup, phase);
    let case = Case {
        setup,
        phase,
        injection: Some(injection),
    };
    run_and_judge(case, &reference)
}

struct Row {
    case: Case,
    verdict: Verdict,
}

fn sweep() -> Vec<Row> {
    let mut rows = Vec::new();
    for setup in setups() {
        for phase in [Phase::Step, Phase::Save, Phase::Load] {
            // Save and load do not depend on clipping.
            if phase != Phase::Step && setup.clip {
                continue;
            }
            let reference = reference_run(setup, phase);
            for injection in injections(&reference[0].ops, setup.world) {
                let case = Case {
                    setup,
                    phase,
                    injection: Some(injection),
                };
                let verdict = run_and_judge(case, &reference);
                rows.push(Row { case, verdict });
            }
        }
    }
    rows
}

fn scope(who: Who) -> &'static str {
    match who {
        Who::Rank(0) => "rank 0",
        Who::Rank(_) => "rank k>0",
        Who::All => "all ranks",
    }
}

#[test]
fn fault_sweep_of_step_save_and_load() {
    let t0 = Instant::now();
    let rows = sweep();
    // Table: (phase, op, fault, scope) → class → count.
    let mut table: BTreeMap<(Phase, Op, Fault, &str), BTreeMap<&str, usize>> = BTreeMap::new();
    let mut classes: BTreeMap<&str, usize> = BTreeMap::new();
    for row in &rows {
        let inj = row.case.injection.unwrap();
        *table
            .entry((row.case.phase, inj.op, inj.fault, scope(inj.who)))
            .or_default()
            .entry(row.verdict.class)
            .or_default() += 1;
        *classes.entry(row.verdict.class).or_default() += 1;
    }
    eprintln!(
        "{} cases in {:.1} s",
        rows.len(),
        t0.elapsed().as_secs_f64()
    );
    eprintln!("classes: {classes:?}");
    for ((phase, op, fault, scope), c) in &table {
        eprintln!("{phase:?} {op:?} {fault:?} on {scope}: {c:?}");
    }
    let mut seen = BTreeMap::new();
    for row in &rows {
        let inj = row.case.injection.unwrap();
        let key = (
            row.case.phase,
            inj.op,
            inj.fault,
            scope(inj.who),
            row.verdict.class,
        );
        if row.verdict.class != "ok-exact" && seen.insert(key, ()).is_none() {
            eprintln!(
                "example {:?} {:?} {:?} call {} {:?} [{:?}]: {} {}",
                row.case.phase,
                row.case.setup,
                inj.op,
                inj.call,
                inj.fault,
                inj.who,
                row.verdict.class,
                row.verdict.detail
            );
        }
    }
    let violations: Vec<String> = rows
        .iter()
        .filter(|r| r.verdict.violation)
        .map(|row| {
            let inj = row.case.injection.unwrap();
            format!(
                "{:?} {:?} {:?}: {} {}",
                row.case.phase, row.case.setup, inj, row.verdict.class, row.verdict.detail
            )
        })
        .collect();
    // (only if empty: other tests of this file may be using it)
    let _ = std::fs::remove_dir(scratch_root());
    assert!(
        violations.is_empty(),
        "{} contract violations:\n{}",
        violations.len(),
        violations.join("\n")
    );
}

fn inj(op: Op, call: usize, fault: Fault, who: Who) -> Injection {
    Injection {
        op,
        call,
        fault,
        who,
    }
}

fn assert_holds(v: Verdict) {
    assert!(!v.violation, "{}: {}", v.class, v.detail);
}

/// A collective that returns one element too few (breaking the
/// `Collective` contract) is an error on every rank, not a panic: every
/// result is checked against the contract's element count. (Before, the
/// caller indexed past the end of the host vector: the clip's all-reduce,
/// the save's all-gather on rank 0, the save's broadcast, the load's
/// all-reduce.)
#[test]
fn a_short_collective_result_is_an_error_not_a_panic() {
    let cases = [
        (true, Phase::Step, Op::AllReduce, 1),
        (false, Phase::Save, Op::AllGather, 0),
        (false, Phase::Save, Op::Broadcast, 0),
        (false, Phase::Load, Op::AllReduce, 0),
    ];
    for (clip, phase, op, call) in cases {
        let v = check(
            Opt::Muon,
            clip,
            2,
            phase,
            inj(op, call, Fault::Short, Who::All),
        );
        assert_holds(v);
    }
}

/// When the step's final all-gather fails on every rank (an error, or a
/// result of the wrong length), the owners have already stepped their
/// shares and the other owners' parameters were not written: every rank
/// returns the error and refuses further steps (the documented broken
/// state, whose parameters may differ across ranks). Before, nothing
/// refused the next step, whose gradients were then computed on diverged
/// models.
#[test]
fn a_failed_all_gather_on_every_rank_refuses_further_steps_everywhere() {
    assert_holds(check(
        Opt::Muon,
        false,
        2,
        Phase::Step,
        inj(Op::AllGather, 0, Fault::Err, Who::All),
    ));
}

/// `load_state` loads the new state on every rank, then its all-reduce of
/// the success flags fails on every rank: every rank returns an error and
/// gets its previous state back ("if loading fails on any rank, every rank
/// keeps (or gets back) its previous state"). Before, the error returned
/// with the new state kept.
#[test]
fn load_state_keeps_the_previous_state_when_its_all_reduce_fails() {
    assert_holds(check(
        Opt::AdamW,
        false,
        2,
        Phase::Load,
        inj(Op::AllReduce, 0, Fault::Err, Who::All),
    ));
}

/// Rank 0 writes the manifest before the broadcast that tells the others
/// it did; when that broadcast fails on every rank, every rank returns an
/// error and rank 0 takes the manifest back ("an error on any rank is an
/// error on every rank, and then no manifest is written"). Before, the
/// manifest stayed (and the checkpoint loaded).
#[test]
fn save_state_leaves_no_manifest_when_its_broadcast_fails() {
    assert_holds(check(
        Opt::Muon,
        false,
        2,
        Phase::Save,
        inj(Op::Broadcast, 0, Fault::Err, Who::All),
    ));
}
