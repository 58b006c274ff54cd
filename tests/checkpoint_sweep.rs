//! A robustness sweep of checkpoints (saving and loading optimizer state),
//! against the crate's contract:
//!
//! - resuming is bit-identical on the CPU: 2 steps, save to a file, a fresh
//!   optimizer on copies of the parameters loads it, 2 more steps on both
//!   give the same parameters and `state_dict()`, bit for bit (for every
//!   optimizer and wrapper × f32, bf16, f64 × awkward shapes);
//! - a bad checkpoint is refused with `Error::Checkpoint` naming what is
//!   wrong (never a panic: every load runs under `catch_unwind`), and a
//!   refused load changes nothing: the `state_dict()` (whose header holds the
//!   learning rate and every hyperparameter), the learning rate and the
//!   parameters are bit-identical before and after;
//! - a corruption that lands in bytes that genuinely do not matter may load,
//!   but only into exactly the state that was saved.
//!
//! The corruptions: truncation at every ~1/40 of the file and at each of the
//! first 16 bytes; ~200 seeded single-byte changes (length prefix, JSON
//! header, tensor data); edits of the steepest header (re-saved with valid
//! checksums, so only the semantic checks can catch them); edits of the
//! safetensors header (a tensor's dtype or shape, the length prefix fixed,
//! the tensor bytes and their CRC-32 intact); edits of the state dict; and a
//! 2-rank data-parallel checkpoint directory with a corrupted rank file, a
//! missing one or a corrupted manifest (`DataParallel::load_state` refuses
//! on every rank and changes nothing, `load_union` refuses).
//!
//! A bare `Error::Candle` refusal fails the sweep (listed with
//! `--nocapture`). The bugs the sweep found, now fixed, have one test each
//! at the end.
//! Step-by-step contracts are `api_sweep.rs`'s; single checkpoint cases in
//! depth are in `checkpoint_file.rs` and `optim_state.rs`.

mod common;
mod support;

use support::{spectral, steepest_cfg};

use std::collections::{BTreeMap, HashMap};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Optimizer, VarMap};
use serde_json::{json, Value};
use steepest::accumulate::Accumulate;
use steepest::averaging::{AverageKind, WeightAverage};
use steepest::checkpoint;
use steepest::distributed::{load_union, Collective, DataParallel, DataParallelConfig, LocalGroup};
use steepest::optim::{Chain, Partition};
use steepest::schedule::{Schedule, Scheduled};
use steepest::{
    AdamW, AdamWConfig, Error, Manifold, Muon, MuonConfig, NewtonSchulz, Norm, OptimizerState, Sgd,
    SgdConfig, Steepest, TryStep, WeightDecay,
};

// ---------------------------------------------------------------------------
// Bitwise snapshots (scratch directories: common::scratch_dir).

type Bits = (Vec<usize>, DType, Vec<u64>);

/// A tensor's shape, dtype and values (as f64 bits: exact for every dtype
/// used here; the header's bytes included).
fn bits(t: &Tensor) -> Bits {
    let v = t
        .flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    (
        t.dims().to_vec(),
        t.dtype(),
        v.iter().map(|x| x.to_bits()).collect(),
    )
}

fn state_bits(state: &HashMap<String, Tensor>) -> BTreeMap<String, Bits> {
    state.iter().map(|(k, t)| (k.clone(), bits(t))).collect()
}

fn param_bits(vm: &VarMap) -> BTreeMap<String, Bits> {
    vm.data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), bits(v.as_tensor())))
        .collect()
}

/// The keys whose entries differ between two snapshots.
fn differing(a: &BTreeMap<String, Bits>, b: &BTreeMap<String, Bits>) -> Vec<String> {
    a.keys()
        .chain(b.keys())
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect()
}

fn variant(e: &Error) -> &'static str {
    match e {
        Error::NonFiniteGradient { .. } => "NonFiniteGradient",
        Error::Shape { .. } => "Shape",
        Error::Config { .. } => "Config",
        Error::Checkpoint { .. } => "Checkpoint",
        Error::Device { .. } => "Device",
        Error::Numerical { .. } => "Numerical",
        Error::Candle(_) => "Candle",
        _ => "other",
    }
}

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------
// The optimizers under test.

/// What the sweep needs of a checkpointed object (`OptimizerState` has
/// generic methods, so it cannot be a trait object itself).
trait Subject {
    fn step(&mut self, grads: &GradStore) -> steepest::Result<()>;
    fn state(&self) -> steepest::Result<HashMap<String, Tensor>>;
    fn restore(&mut self, state: &HashMap<String, Tensor>) -> steepest::Result<()>;
    fn save(&self, path: &Path) -> steepest::Result<()>;
    fn load(&mut self, path: &Path) -> steepest::Result<()>;
    /// The learning rate, where the object has one.
    fn lr(&self) -> Option<f64>;
}

/// An optimizer (or a wrapper of one) and how to read its learning rate.
struct Opt<O> {
    o: O,
    lr: fn(&O) -> Option<f64>,
}

impl<O: TryStep + OptimizerState> Subject for Opt<O> {
    fn step(&mut self, grads: &GradStore) -> steepest::Result<()> {
        self.o.try_step(grads)
    }
    fn state(&self) -> steepest::Result<HashMap<String, Tensor>> {
        self.o.state_dict()
    }
    fn restore(&mut self, state: &HashMap<String, Tensor>) -> steepest::Result<()> {
        self.o.load_state_dict(state)
    }
    fn save(&self, path: &Path) -> steepest::Result<()> {
        self.o.save_state(path)
    }
    fn load(&mut self, path: &Path) -> steepest::Result<()> {
        self.o.load_state(path)
    }
    fn lr(&self) -> Option<f64> {
        (self.lr)(&self.o)
    }
}

fn plain<O: Optimizer + TryStep + OptimizerState + 'static>(
    o: steepest::Result<O>,
) -> steepest::Result<Box<dyn Subject>> {
    Ok(Box::new(Opt {
        o: o?,
        lr: |o: &O| Some(o.learning_rate()),
    }))
}

/// AdamW with an EMA of the weights: the average's file, and the
/// optimizer's beside it (`<path>.opt`). `state()` is the average's state
/// and the optimizer's under `opt/`.
struct Averaged {
    opt: AdamW,
    wa: WeightAverage,
}

const OPT_PREFIX: &str = "opt/";

fn side_file(path: &Path) -> PathBuf {
    path.with_extension("opt")
}

impl Subject for Averaged {
    fn step(&mut self, grads: &GradStore) -> steepest::Result<()> {
        self.opt.try_step(grads)?;
        self.wa.update()
    }
    fn state(&self) -> steepest::Result<HashMap<String, Tensor>> {
        let mut s = self.wa.state_dict()?;
        for (k, t) in self.opt.state_dict()? {
            s.insert(format!("{OPT_PREFIX}{k}"), t);
        }
        Ok(s)
    }
    fn restore(&mut self, state: &HashMap<String, Tensor>) -> steepest::Result<()> {
        let (mut wa, mut opt) = (HashMap::new(), HashMap::new());
        for (k, t) in state {
            match k.strip_prefix(OPT_PREFIX) {
                Some(k) => opt.insert(k.to_string(), t.clone()),
                None => wa.insert(k.clone(), t.clone()),
            };
        }
        self.wa.load_state_dict(&wa)?;
        self.opt.load_state_dict(&opt)
    }
    fn save(&self, path: &Path) -> steepest::Result<()> {
        self.wa.save_state(path)?;
        self.opt.save_state(side_file(path))
    }
    fn load(&mut self, path: &Path) -> steepest::Result<()> {
        self.wa.load_state(path)?;
        self.opt.load_state(side_file(path))
    }
    fn lr(&self) -> Option<f64> {
        Some(self.opt.learning_rate())
    }
}

/// A `WeightAverage` alone (for the corruption fuzz of its file).
struct AverageOnly(WeightAverage);

impl Subject for AverageOnly {
    fn step(&mut self, _grads: &GradStore) -> steepest::Result<()> {
        self.0.update()
    }
    fn state(&self) -> steepest::Result<HashMap<String, Tensor>> {
        self.0.state_dict()
    }
    fn restore(&mut self, state: &HashMap<String, Tensor>) -> steepest::Result<()> {
        self.0.load_state_dict(state)
    }
    fn save(&self, path: &Path) -> steepest::Result<()> {
        self.0.save_state(path)
    }
    fn load(&mut self, path: &Path) -> steepest::Result<()> {
        self.0.load_state(path)
    }
    fn lr(&self) -> Option<f64> {
        None
    }
}

fn adamw_cfg() -> AdamWConfig {
    AdamWConfig {
        lr: 0.01,
        weight_decay: WeightDecay::spectral(0.1),
        decay_vectors: true,
        ..Default::default()
    }
}

fn muon_cfg(wd: WeightDecay, ns: NewtonSchulz) -> MuonConfig {
    MuonConfig {
        lr: 0.02,
        weight_decay: wd,
        newton_schulz: ns,
        adamw: AdamWConfig {
            lr: 0.004,
            ..Default::default()
        },
        adamw_names: vec!["embed".into()],
        ..Default::default()
    }
}

fn partition(vm: &VarMap) -> steepest::Result<Box<dyn Subject>> {
    let cfg = steepest_cfg(spectral(), Manifold::SpectralSphere { radius: 2.0 });
    cfg.validate()?;
    let adamw: Chain = AdamWConfig {
        weight_decay: WeightDecay::Decoupled(0.1),
        ..adamw_cfg()
    }
    .chain();
    plain(
        Partition::by(|p| if p.is_matrix() { "manifold" } else { "adamw" })
            .group("manifold", cfg.chain(), 0.02)
            .group("adamw", adamw, 0.01)
            .build_from_varmap(vm),
    )
}

type Make = fn(&VarMap) -> steepest::Result<Box<dyn Subject>>;

/// An optimizer of the sweep.
struct Kind {
    name: &'static str,
    make: Make,
    /// Whether the model gets a vector parameter too (the manifold and
    /// spectral-norm optimizers take matrices only).
    vectors: bool,
    /// Calls of `step` before the save and after it (`Accumulate(2)`: 3
    /// before, so one micro-batch is pending in the checkpoint).
    calls: (u64, u64),
}

const KINDS: &[Kind] = &[
    Kind {
        name: "AdamW spectral",
        make: |vm| plain(AdamW::from_varmap(vm, adamw_cfg())),
        vectors: true,
        calls: (2, 2),
    },
    Kind {
        name: "Sgd momentum",
        make: |vm| {
            plain(Sgd::from_varmap(
                vm,
                SgdConfig {
                    lr: 0.05,
                    momentum: 0.9,
                    nesterov: true,
                    weight_decay: WeightDecay::spectral(0.1),
                    decay_vectors: true,
                },
            ))
        },
        vectors: true,
        calls: (2, 2),
    },
    Kind {
        name: "Muon spectral",
        make: |vm| {
            plain(Muon::from_varmap(
                vm,
                muon_cfg(WeightDecay::spectral(0.1), NewtonSchulz::muon()),
            ))
        },
        vectors: true,
        calls: (2, 2),
    },
    Kind {
        name: "Muon gram",
        make: |vm| {
            plain(Muon::from_varmap(
                vm,
                muon_cfg(
                    WeightDecay::Decoupled(0.1),
                    NewtonSchulz::muon().gram_form(),
                ),
            ))
        },
        vectors: true,
        calls: (2, 2),
    },
    Kind {
        name: "Steepest free",
        make: |vm| {
            plain(Steepest::from_varmap(
                vm,
                steepest_cfg(spectral(), Manifold::Free),
            ))
        },
        vectors: false,
        calls: (2, 2),
    },
    Kind {
        name: "Steepest sphere",
        make: |vm| {
            plain(Steepest::from_varmap(
                vm,
                steepest_cfg(Norm::Euclidean, Manifold::Sphere { radius: 2.0 }),
            ))
        },
        vectors: true,
        calls: (2, 2),
    },
    Kind {
        name: "Steepest spectral sphere",
        make: |vm| {
            plain(Steepest::from_varmap(
                vm,
                steepest_cfg(spectral(), Manifold::SpectralSphere { radius: 2.0 }),
            ))
        },
        vectors: false,
        calls: (2, 2),
    },
    Kind {
        name: "Steepest Stiefel",
        make: |vm| {
            plain(Steepest::from_varmap(
                vm,
                steepest_cfg(spectral(), Manifold::Stiefel { transpose: false }),
            ))
        },
        vectors: false,
        calls: (2, 2),
    },
    Kind {
        name: "Partition spectral sphere | AdamW",
        make: partition,
        vectors: true,
        calls: (2, 2),
    },
    Kind {
        name: "Scheduled<AdamW>",
        make: |vm| {
            let o = Scheduled::new(
                AdamW::from_varmap(vm, adamw_cfg())?,
                Schedule::cosine(0.01, 0.001, 10)?,
            );
            Ok(Box::new(Opt {
                o,
                lr: |o: &Scheduled<AdamW>| Some(o.inner().learning_rate()),
            }))
        },
        vectors: true,
        calls: (2, 2),
    },
    Kind {
        name: "Accumulate(2)<Muon>",
        make: |vm| {
            let muon = Muon::from_varmap(
                vm,
                muon_cfg(WeightDecay::spectral(0.1), NewtonSchulz::muon()),
            )?;
            Ok(Box::new(Opt {
                o: Accumulate::new(muon, 2)?,
                lr: |o: &Accumulate<Muon>| Some(o.inner().learning_rate()),
            }))
        },
        vectors: true,
        calls: (3, 2),
    },
    Kind {
        name: "WeightAverage EMA over AdamW",
        make: |vm| {
            Ok(Box::new(Averaged {
                opt: AdamW::from_varmap(vm, adamw_cfg())?,
                wa: WeightAverage::from_varmap(vm, AverageKind::Ema { decay: 0.9 })?,
            }))
        },
        vectors: true,
        calls: (2, 2),
    },
];

// ---------------------------------------------------------------------------
// Models and gradients.

const TARGET: &str = "target";

/// `target` (the swept shape), a well-behaved `aux.weight` (3×2) and, for
/// optimizers that take vectors, `bias` (3).
fn model(shape: &[usize], dtype: DType, vectors: bool, seed: u64) -> VarMap {
    let mut params: Vec<(&str, &[usize])> = vec![(TARGET, shape), ("aux.weight", &[3, 2])];
    if vectors {
        params.push(("bias", &[3]));
    }
    support::model_of(&params, dtype, seed)
}

/// A `VarMap` holding copies of `vm`'s variables (same names and values).
fn copy_model(vm: &VarMap) -> VarMap {
    let out = VarMap::new();
    {
        let src = vm.data().lock().unwrap();
        let mut dst = out.data().lock().unwrap();
        for (k, v) in src.iter() {
            let t = v.as_tensor().copy().unwrap();
            dst.insert(k.clone(), Var::from_tensor(&t).unwrap());
        }
    }
    out
}

/// An empty `GradStore` to fill by hand.
fn empty_grads() -> GradStore {
    Tensor::zeros((), DType::F32, &Device::Cpu)
        .unwrap()
        .backward()
        .unwrap()
}

/// Deterministic gradients for call `t`: every variable of `vm`, seeded by
/// its name and `t`, in its dtype.
fn grads(vm: &VarMap, t: u64) -> GradStore {
    let mut g = empty_grads();
    let data = vm.data().lock().unwrap();
    for (name, v) in data.iter() {
        let seed = name
            .bytes()
            .fold(t.wrapping_mul(7919), |s, b| s.wrapping_mul(31) ^ b as u64);
        let n = v.elem_count();
        let x = Tensor::from_vec(support::values(seed, n), v.dims(), &Device::Cpu)
            .unwrap()
            .to_dtype(v.dtype())
            .unwrap();
        g.insert(v.as_tensor(), x);
    }
    g
}

// ---------------------------------------------------------------------------
// 1. Round trips.

const SHAPES: &[&[usize]] = &[&[1, 5], &[5, 1], &[0, 3], &[2, 3, 2]];
const DTYPES: &[DType] = &[DType::F32, DType::BF16, DType::F64];

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    /// Resumed bit-identically.
    Resumed,
    /// Refused at construction (typed).
    Refused,
    /// A step before the save was refused (typed), so there was nothing to
    /// resume.
    StepRefused,
}

fn round_trip_case(
    kind: &Kind,
    shape: &[usize],
    dtype: DType,
    path: &Path,
    fails: &mut Vec<String>,
) -> Outcome {
    let case = format!("[{} | {shape:?} {dtype:?}]", kind.name);
    let mut fail = |s: String| fails.push(format!("{case}: {s}"));
    let vm_a = model(shape, dtype, kind.vectors, 11);
    let mut a = match (kind.make)(&vm_a) {
        Ok(o) => o,
        Err(e) => {
            if matches!(e, Error::Candle(_)) || e.who().is_none_or(str::is_empty) {
                fail(format!("construction: untyped or anonymous error: {e:?}"));
            }
            return Outcome::Refused;
        }
    };
    let (before, after) = kind.calls;
    for t in 0..before {
        if let Err(e) = a.step(&grads(&vm_a, t)) {
            if matches!(e, Error::Candle(_)) {
                fail(format!("step {t}: untyped error: {e:?}"));
            }
            return Outcome::StepRefused;
        }
    }
    if a.state().unwrap().len() < 2 {
        fail("no state to resume after the first steps".into());
    }
    if let Err(e) = a.save(path) {
        fail(format!("save: {e}"));
        return Outcome::Resumed;
    }
    let vm_b = copy_model(&vm_a);
    let mut b = match (kind.make)(&vm_b) {
        Ok(o) => o,
        Err(e) => {
            fail(format!("the second construction failed: {e}"));
            return Outcome::Resumed;
        }
    };
    if let Err(e) = b.load(path) {
        fail(format!("its own checkpoint does not load: {e}"));
        return Outcome::Resumed;
    }
    let (sa, sb) = (
        state_bits(&a.state().unwrap()),
        state_bits(&b.state().unwrap()),
    );
    if sa != sb {
        fail(format!(
            "state after loading differs at {:?}",
            differing(&sa, &sb)
        ));
    }
    if a.lr().map(f64::to_bits) != b.lr().map(f64::to_bits) {
        fail(format!("learning rate {:?} vs {:?}", a.lr(), b.lr()));
    }
    for t in before..before + after {
        let (ra, rb) = (a.step(&grads(&vm_a, t)), b.step(&grads(&vm_b, t)));
        if ra.is_ok() != rb.is_ok() {
            fail(format!("call {t}: {ra:?} vs the resumed {rb:?}"));
        }
    }
    let (pa, pb) = (param_bits(&vm_a), param_bits(&vm_b));
    if pa != pb {
        fail(format!("parameters differ at {:?}", differing(&pa, &pb)));
    }
    let (sa, sb) = (
        state_bits(&a.state().unwrap()),
        state_bits(&b.state().unwrap()),
    );
    if sa != sb {
        fail(format!(
            "state after resuming differs at {:?}",
            differing(&sa, &sb)
        ));
    }
    Outcome::Resumed
}

fn round_trips(kinds: &[Kind], tag: &str) {
    let start = std::time::Instant::now();
    let dir = common::scratch_dir("checkpoint-sweep", tag);
    let mut fails = Vec::new();
    let mut outcomes: BTreeMap<(&str, Outcome), usize> = BTreeMap::new();
    let mut n = 0;
    for kind in kinds {
        for &shape in SHAPES {
            for &dtype in DTYPES {
                n += 1;
                let path = dir.join(format!("case-{n}.safetensors"));
                let mut local = Vec::new();
                let r = catch_unwind(AssertUnwindSafe(|| {
                    round_trip_case(kind, shape, dtype, &path, &mut local)
                }));
                fails.extend(local);
                match r {
                    Ok(o) => *outcomes.entry((kind.name, o)).or_default() += 1,
                    Err(p) => fails.push(format!(
                        "[{} | {shape:?} {dtype:?}]: PANIC: {}",
                        kind.name,
                        panic_text(p)
                    )),
                }
            }
        }
    }
    eprintln!(
        "round trips ({tag}): {n} cases in {:.1} s: {outcomes:?}",
        start.elapsed().as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        fails.is_empty(),
        "{} round-trip failures:\n{}",
        fails.len(),
        fails.join("\n")
    );
    // Every optimizer resumed in at least one case.
    for kind in kinds {
        assert!(
            outcomes.contains_key(&(kind.name, Outcome::Resumed)),
            "{}: no case resumed: {outcomes:?}",
            kind.name
        );
    }
}

#[test]
fn round_trip_plain_optimizers() {
    round_trips(&KINDS[..8], "rt-plain");
}

#[test]
fn round_trip_partition_and_wrappers() {
    round_trips(&KINDS[8..], "rt-wrappers");
}

// ---------------------------------------------------------------------------
// 2. Corruption of single files.

/// A subject whose checkpoint file is `bytes` (the state `saved`); the
/// subject itself has moved on since (one more step), so a load that
/// silently took a corrupted file, or nothing, is visible.
struct Target {
    name: &'static str,
    subject: Box<dyn Subject>,
    vm: VarMap,
    bytes: Vec<u8>,
    saved: BTreeMap<String, Bits>,
    state: HashMap<String, Tensor>,
    dir: PathBuf,
    /// A case left it in a state it could not leave (see [`put_back`]).
    broken: bool,
}

/// The tally of a sweep: failures, bare candle errors, refusals by variant,
/// benign loads.
#[derive(Default)]
struct Tally {
    fails: Vec<String>,
    candle: Vec<String>,
    variants: BTreeMap<&'static str, usize>,
    benign: Vec<String>,
    /// Typed refusals of another variant than `Error::Checkpoint`.
    others: Vec<String>,
    cases: usize,
}

impl Tally {
    fn finish(self, what: &str, known_candle: &[&str]) {
        eprintln!(
            "{what}: {} cases: refused {:?}, loaded the saved state unchanged {} ({:?})",
            self.cases,
            self.variants,
            self.benign.len(),
            self.benign
        );
        for c in &self.candle {
            eprintln!("  bare Error::Candle: {c}");
        }
        for c in &self.others {
            eprintln!("  typed, not Error::Checkpoint: {c}");
        }
        let mut fails = self.fails;
        for c in &self.candle {
            if !known_candle.iter().any(|k| c.contains(k)) {
                fails.push(format!("an unknown bare Error::Candle: {c}"));
            }
        }
        for c in &self.others {
            fails.push(format!("a refusal that is not Error::Checkpoint: {c}"));
        }
        assert!(
            fails.is_empty(),
            "{what}: {} failures:\n{}",
            fails.len(),
            fails.join("\n")
        );
    }
}

/// Writes `bad` and loads it into the target, under the contract (see the
/// module docs). `must_fail`: an `Ok` is a failure even with the saved state.
fn try_bad(t: &mut Target, what: &str, bad: &[u8], must_fail: bool, tally: &mut Tally) {
    let path = t.dir.join("bad.safetensors");
    std::fs::write(&path, bad).unwrap();
    try_load(t, what, &path, must_fail, tally);
}

fn try_load(t: &mut Target, what: &str, path: &Path, must_fail: bool, tally: &mut Tally) {
    try_with(t, what, must_fail, tally, |s| s.load(path));
}

/// Puts the target's own state back after a case that changed it; if even
/// that fails, the target is dropped from the rest of the sweep.
fn put_back(t: &mut Target, what: &str, tally: &mut Tally) {
    if let Err(e) = t.subject.restore(&t.state) {
        tally.fails.push(format!(
            "{what}: afterwards its own state does not load back ({e}); the rest of {} is skipped",
            t.name
        ));
        t.broken = true;
    }
}

/// [`try_bad`]'s checks around `load` (a file or a state dict).
fn try_with(
    t: &mut Target,
    what: &str,
    must_fail: bool,
    tally: &mut Tally,
    load: impl FnOnce(&mut dyn Subject) -> steepest::Result<()>,
) {
    if t.broken {
        return;
    }
    tally.cases += 1;
    let what = format!("{} | {what}", t.name);
    let before = state_bits(&t.state);
    debug_assert!(before == state_bits(&t.subject.state().unwrap()));
    let (lr, params) = (t.subject.lr(), param_bits(&t.vm));
    let r = catch_unwind(AssertUnwindSafe(|| load(&mut *t.subject)));
    match r {
        Err(p) => {
            tally
                .fails
                .push(format!("{what}: PANIC: {}", panic_text(p)));
            // The subject may be half-changed: put it back.
            put_back(t, &what, tally);
        }
        Ok(Ok(())) => {
            let now = state_bits(&t.subject.state().unwrap());
            if must_fail || now != t.saved {
                tally.fails.push(format!(
                    "{what}: loaded (state differs from the saved one at {:?})",
                    differing(&now, &t.saved)
                ));
            } else {
                tally.benign.push(what.clone());
            }
            put_back(t, &what, tally);
        }
        Ok(Err(e)) => {
            *tally.variants.entry(variant(&e)).or_default() += 1;
            let msg = e.to_string();
            match &e {
                Error::Candle(_) => tally.candle.push(format!("{what}: {msg}")),
                Error::Checkpoint { .. } => {}
                _ => tally.others.push(format!("{what}: {}: {msg}", variant(&e))),
            }
            if e.who().is_some_and(str::is_empty) {
                tally
                    .fails
                    .push(format!("{what}: the error names nothing: {msg}"));
            }
            let after = state_bits(&t.subject.state().unwrap());
            if after != before {
                tally.fails.push(format!(
                    "{what}: refused ({msg}) but changed the state at {:?}",
                    differing(&after, &before)
                ));
                put_back(t, &what, tally);
            }
            if t.subject.lr().map(f64::to_bits) != lr.map(f64::to_bits) {
                tally.fails.push(format!(
                    "{what}: refused ({msg}) but changed the rate {lr:?} → {:?}",
                    t.subject.lr()
                ));
            }
            if param_bits(&t.vm) != params {
                tally
                    .fails
                    .push(format!("{what}: refused ({msg}) but changed a parameter"));
            }
        }
    }
}

/// The fuzz targets: Muon (spectral decay, an AdamW part) in f32, a
/// partition (spectral sphere | AdamW) in bf16, an EMA in f32.
fn targets(dir: &Path) -> Vec<Target> {
    let specs: [(&'static str, usize, DType); 3] = [
        ("Muon f32", 2, DType::F32),
        ("Partition bf16", 8, DType::BF16),
        ("EMA f32", 11, DType::F32),
    ];
    specs
        .into_iter()
        .map(|(name, k, dtype)| {
            let vm = model(&[2, 3, 2], dtype, true, 5);
            {
                // an AdamW-routed matrix for Muon
                let t = Tensor::from_vec(support::values(77, 8), (4, 2), &Device::Cpu)
                    .unwrap()
                    .to_dtype(dtype)
                    .unwrap();
                vm.data()
                    .lock()
                    .unwrap()
                    .insert("embed".into(), Var::from_tensor(&t).unwrap());
            }
            let mut s = (KINDS[k].make)(&vm).unwrap();
            for t in 0..2 {
                s.step(&grads(&vm, t)).unwrap();
            }
            let file = dir.join(format!("{}.safetensors", name.replace(' ', "-")));
            s.save(&file).unwrap();
            let saved_full = s.state().unwrap();
            s.step(&grads(&vm, 2)).unwrap();
            let (subject, saved): (Box<dyn Subject>, _) = if name.starts_with("EMA") {
                // fuzz the average's own file
                let wa_state: HashMap<String, Tensor> = saved_full
                    .into_iter()
                    .filter(|(k, _)| !k.starts_with(OPT_PREFIX))
                    .collect();
                let avg = {
                    // take the average out of the composite
                    let mut wa =
                        WeightAverage::from_varmap(&vm, AverageKind::Ema { decay: 0.5 }).unwrap();
                    let mut now = s.state().unwrap();
                    now.retain(|k, _| !k.starts_with(OPT_PREFIX));
                    wa.load_state_dict(&now).unwrap();
                    wa
                };
                (Box::new(AverageOnly(avg)), state_bits(&wa_state))
            } else {
                (s, state_bits(&saved_full))
            };
            let state = subject.state().unwrap();
            assert_ne!(
                state_bits(&state),
                saved,
                "{name}: the target did not move on"
            );
            Target {
                name,
                subject,
                vm,
                bytes: std::fs::read(&file).unwrap(),
                saved,
                state,
                dir: dir.to_path_buf(),
                broken: false,
            }
        })
        .collect()
}

/// The length of the safetensors JSON header and the byte range of each
/// tensor's data.
fn layout(bytes: &[u8]) -> (usize, Vec<(String, std::ops::Range<usize>)>) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let tensors = header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            let o = &v["data_offsets"];
            let (a, b) = (o[0].as_u64().unwrap(), o[1].as_u64().unwrap());
            (k.clone(), 8 + n + a as usize..8 + n + b as usize)
        })
        .collect();
    (n, tensors)
}

/// A deterministic LCG (the sweep needs no distribution, only positions).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Bare candle errors the sweep accepts: none (the one it found, a tensor
/// whose dtype candle cannot read, is now a `Checkpoint` error; its own
/// test is at the end).
const KNOWN_CANDLE: &[&str] = &[];

#[test]
fn truncated_files_are_refused() {
    let dir = common::scratch_dir("checkpoint-sweep", "truncate");
    let mut tally = Tally::default();
    for mut t in targets(&dir) {
        let len = t.bytes.len();
        let mut cuts: Vec<usize> = (0..16).chain((1..40).map(|k| k * len / 40)).collect();
        cuts.push(len - 1);
        cuts.sort();
        cuts.dedup();
        for cut in cuts {
            let bad = t.bytes[..cut].to_vec();
            try_bad(
                &mut t,
                &format!("cut at {cut}/{len}"),
                &bad,
                true,
                &mut tally,
            );
        }
        // The intact file loads, into the saved state.
        let good = t.bytes.clone();
        try_bad(&mut t, "intact", &good, false, &mut tally);
    }
    let _ = std::fs::remove_dir_all(&dir);
    tally.finish("truncation", KNOWN_CANDLE);
}

#[test]
fn single_byte_corruptions_are_refused_or_harmless() {
    let dir = common::scratch_dir("checkpoint-sweep", "flip");
    let mut tally = Tally::default();
    for (i, mut t) in targets(&dir).into_iter().enumerate() {
        let (n, tensors) = layout(&t.bytes);
        let data = 8 + n..t.bytes.len();
        assert_eq!(tensors.iter().map(|(_, r)| r.end).max(), Some(data.end));
        let mut rng = Lcg(1000 + i as u64);
        let mut cases: Vec<(usize, u8)> = Vec::new();
        // The length prefix: low and high bit of every byte.
        for pos in 0..8 {
            cases.push((pos, 0x01));
            cases.push((pos, 0x80));
        }
        // 92 in the JSON header, 92 in the tensor data; a seeded XOR.
        for range in [8..8 + n, data] {
            for _ in 0..92 {
                let pos = range.start + rng.below(range.len());
                cases.push((pos, 1 + rng.below(255) as u8));
            }
        }
        for (pos, x) in cases {
            let mut bad = t.bytes.clone();
            bad[pos] ^= x;
            let what = format!(
                "byte {pos} ({:?} → {:?}) ^ {x:#04x}",
                t.bytes[pos] as char, bad[pos] as char
            );
            try_bad(&mut t, &what, &bad, false, &mut tally);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    tally.finish("single-byte corruption", KNOWN_CANDLE);
}

/// `bytes` with its safetensors JSON header changed by `edit` (re-encoded,
/// padded to a multiple of 8 as the writer does, the length prefix
/// updated; the tensor bytes as they were).
fn with_st_header(bytes: &[u8], edit: impl FnOnce(&mut Value)) -> Vec<u8> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    edit(&mut header);
    let mut text = serde_json::to_vec(&header).unwrap();
    while !text.len().is_multiple_of(8) {
        text.push(b' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&bytes[8 + n..]);
    out
}

/// The name of the first tensor (sorted) whose safetensors entry passes `f`.
fn st_key(bytes: &[u8], f: impl Fn(&str, &Value) -> bool) -> Option<String> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    let mut keys: Vec<&String> = header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, v)| *k != "__metadata__" && f(k, v))
        .map(|(k, _)| k)
        .collect();
    keys.sort();
    keys.first().map(|k| k.to_string())
}

/// A safetensors-header edit: the tensor (chosen by `pick`) gets `dtype`
/// and its shape `reshape`d (same byte count: the data and its CRC-32 stay
/// valid).
type StEdit = (
    &'static str,
    fn(&str, &Value) -> bool,
    &'static str,
    fn(&[u64]) -> Vec<u64>,
);

fn is_counter(_: &str, v: &Value) -> bool {
    v["dtype"] == "I64" && v["shape"].as_array().unwrap().is_empty()
}

fn is_f32_matrix(_: &str, v: &Value) -> bool {
    v["dtype"] == "F32" && v["shape"].as_array().unwrap().len() == 2
}

const ST_EDITS: &[StEdit] = &[
    ("counter I64 → F64", is_counter, "F64", |s| s.to_vec()),
    ("counter I64 → U64", is_counter, "U64", |s| s.to_vec()),
    ("counter I64 → I32 ×2", is_counter, "I32", |_| vec![2]),
    ("counter shape [] → [1]", is_counter, "I64", |_| vec![1]),
    ("matrix F32 → I32", is_f32_matrix, "I32", |s| s.to_vec()),
    ("matrix F32 → U32", is_f32_matrix, "U32", |s| s.to_vec()),
    ("matrix F32 → BF16 ×2", is_f32_matrix, "BF16", |s| {
        vec![s[0], s[1] * 2]
    }),
    ("matrix F32 → U16 ×2", is_f32_matrix, "U16", |s| {
        vec![s[0], s[1] * 2]
    }),
    ("matrix F32 → I16 ×2", is_f32_matrix, "I16", |s| {
        vec![s[0], s[1] * 2]
    }),
    ("matrix F32 → U8 ×4", is_f32_matrix, "U8", |s| {
        vec![s[0], s[1] * 4]
    }),
    ("matrix F32 → I8 ×4", is_f32_matrix, "I8", |s| {
        vec![s[0], s[1] * 4]
    }),
    ("matrix F32 → BOOL ×4", is_f32_matrix, "BOOL", |s| {
        vec![s[0], s[1] * 4]
    }),
    (
        "matrix F32 → F8_E4M3 ×4",
        is_f32_matrix,
        "F8_E4M3",
        |s| vec![s[0], s[1] * 4],
    ),
    (
        "matrix F32 → F8_E5M2 ×4",
        is_f32_matrix,
        "F8_E5M2",
        |s| vec![s[0], s[1] * 4],
    ),
    ("matrix F32 → F4 ×8", is_f32_matrix, "F4", |s| {
        vec![s[0], s[1] * 8]
    }),
    ("matrix transposed", is_f32_matrix, "F32", |s| {
        vec![s[1], s[0]]
    }),
    ("matrix flattened", is_f32_matrix, "F32", |s| {
        vec![s[0] * s[1]]
    }),
    ("matrix as rank 3", is_f32_matrix, "F32", |s| {
        vec![s[0], 1, s[1]]
    }),
];

/// Edits of the steepest header (re-saved with valid checksums): a name, a
/// JSON pointer the header must have for the edit to apply ("" for any),
/// and the edit.
type HeaderEdit = (&'static str, &'static str, fn(&mut Value));

const HEADER_EDITS: &[HeaderEdit] = &[
    ("version 1", "", |h| h["version"] = json!(1)),
    ("version 3", "", |h| h["version"] = json!(3)),
    ("version -1", "", |h| h["version"] = json!(-1)),
    ("version \"2\"", "", |h| h["version"] = json!("2")),
    ("version 2.5", "", |h| h["version"] = json!(2.5)),
    ("format other", "", |h| h["format"] = json!("other-state")),
    ("kind sgd", "", |h| h["kind"] = json!("sgd")),
    ("kind empty", "", |h| h["kind"] = json!("")),
    ("kind null", "", |h| h["kind"] = Value::Null),
    ("format missing", "", |h| {
        drop(h.as_object_mut().unwrap().remove("format"))
    }),
    ("version missing", "", |h| {
        drop(h.as_object_mut().unwrap().remove("version"))
    }),
    ("kind missing", "", |h| {
        drop(h.as_object_mut().unwrap().remove("kind"))
    }),
    ("params missing", "", |h| {
        drop(h.as_object_mut().unwrap().remove("params"))
    }),
    ("body missing", "", |h| {
        drop(h.as_object_mut().unwrap().remove("body"))
    }),
    ("body null", "", |h| h["body"] = Value::Null),
    ("body empty", "", |h| h["body"] = json!({})),
    ("header an array", "", |h| *h = json!([1, 2, 3])),
    ("header a string", "", |h| *h = json!("steepest-state")),
    ("extra parameter", "", |h| {
        h["params"].as_array_mut().unwrap().push(json!("ghost"))
    }),
    ("a parameter missing", "", |h| {
        drop(h["params"].as_array_mut().unwrap().pop())
    }),
    ("a parameter renamed", "", |h| {
        h["params"][0] = json!("ghost")
    }),
    ("a parameter twice", "", |h| {
        h["params"][1] = h["params"][0].clone()
    }),
    ("params reversed", "", |h| {
        h["params"].as_array_mut().unwrap().reverse()
    }),
    ("params not strings", "", |h| h["params"] = json!([1, 2])),
    ("bare_names of another rule", "", |h| {
        h["bare_names"] = json!("given")
    }),
    ("lr negative", "/body/lr", |h| {
        h["body"]["lr"] = json!(-0.01)
    }),
    ("lr null (NaN)", "/body/lr", |h| {
        h["body"]["lr"] = Value::Null
    }),
    ("lr a string", "/body/lr", |h| {
        h["body"]["lr"] = json!("0.01")
    }),
    ("config missing", "/body/config/lr", |h| {
        drop(h["body"].as_object_mut().unwrap().remove("config"))
    }),
    ("config null", "/body/config/lr", |h| {
        h["body"]["config"] = Value::Null
    }),
    ("config lr negative", "/body/config/lr", |h| {
        h["body"]["config"]["lr"] = json!(-1.0)
    }),
    ("config field of another type", "/body/config/lr", |h| {
        let c = h["body"]["config"].as_object_mut().unwrap();
        let k = c.keys().next().unwrap().clone();
        c.insert(k, json!({"nonsense": true}));
    }),
    ("config unknown field", "/body/config/lr", |h| {
        h["body"]["config"]["unknown_field"] = json!(1)
    }),
    ("average kind missing", "/body/kind", |h| {
        drop(h["body"].as_object_mut().unwrap().remove("kind"))
    }),
    ("EMA decay 1.5", "/body/kind", |h| {
        h["body"]["kind"] = json!({"Ema": {"decay": 1.5}})
    }),
    ("EMA decay null", "/body/kind", |h| {
        h["body"]["kind"] = json!({"Ema": {"decay": null}})
    }),
    ("count negative", "/body/count", |h| {
        h["body"]["count"] = json!(-1)
    }),
    ("count 0", "/body/count", |h| h["body"]["count"] = json!(0)),
    ("held 3", "/body/held", |h| h["body"]["held"] = json!(3)),
    ("partitions missing", "/body/partitions", |h| {
        drop(h["body"].as_object_mut().unwrap().remove("partitions"))
    }),
    ("partitions empty", "/body/partitions", |h| {
        h["body"]["partitions"] = json!([])
    }),
    ("a partition relabelled", "/body/partitions/0/label", |h| {
        h["body"]["partitions"][0]["label"] = json!("elsewhere")
    }),
    ("lr ratio negative", "/body/partitions/0/lr_ratio", |h| {
        h["body"]["partitions"][0]["lr_ratio"] = json!(-1.0)
    }),
    ("lr ratio null", "/body/partitions/0/lr_ratio", |h| {
        h["body"]["partitions"][0]["lr_ratio"] = Value::Null
    }),
    (
        "a transform dropped",
        "/body/partitions/0/transforms/0",
        |h| {
            drop(
                h["body"]["partitions"][0]["transforms"]
                    .as_array_mut()
                    .unwrap()
                    .pop(),
            )
        },
    ),
    (
        "a transform renamed",
        "/body/partitions/0/transforms/0",
        |h| h["body"]["partitions"][0]["transforms"][0]["name"] = json!("other"),
    ),
    (
        "a transform of another kind",
        "/body/partitions/0/transforms/0",
        |h| h["body"]["partitions"][0]["transforms"][0]["kind"] = json!("sign"),
    ),
    (
        "a transform's hparams emptied",
        "/body/partitions/0/transforms/0",
        |h| h["body"]["partitions"][0]["transforms"][0]["hparams"] = json!({}),
    ),
    (
        "the transforms' hparams out of range",
        "/body/partitions/0/transforms/0",
        |h| {
            for tr in h["body"]["partitions"][0]["transforms"]
                .as_array_mut()
                .unwrap()
            {
                if let Some(o) = tr["hparams"].as_object_mut() {
                    for (_, v) in o.iter_mut() {
                        if v.is_f64() {
                            *v = json!(-7.5);
                        }
                    }
                }
            }
        },
    ),
    ("assignment missing", "/body/assignment", |h| {
        drop(h["body"].as_object_mut().unwrap().remove("assignment"))
    }),
    (
        "assignment to an unknown partition",
        "/body/assignment/0",
        |h| h["body"]["assignment"][0] = json!("nowhere"),
    ),
    ("assignment shortened", "/body/assignment/0", |h| {
        drop(h["body"]["assignment"].as_array_mut().unwrap().pop())
    }),
];

/// Edits of the state dict (re-saved with valid checksums).
/// `None`: the state has nothing the edit applies to.
type StateEdit = (&'static str, fn(&mut HashMap<String, Tensor>) -> Option<()>);

fn first_key(s: &HashMap<String, Tensor>, f: impl Fn(&str, &Tensor) -> bool) -> Option<String> {
    let mut keys: Vec<&String> = s
        .iter()
        .filter(|(k, t)| *k != "__steepest__" && f(k, t))
        .map(|(k, _)| k)
        .collect();
    keys.sort();
    keys.first().map(|k| k.to_string())
}

fn is_float_tensor(_: &str, t: &Tensor) -> bool {
    t.dtype().is_float() && t.elem_count() >= 2
}

fn is_count(_: &str, t: &Tensor) -> bool {
    t.dtype() == DType::I64 && t.rank() == 0
}

const STATE_EDITS: &[StateEdit] = &[
    // (one field of several: a parameter's whole state of a transform may
    // be absent, as after `checkpoint::restrict`)
    ("a tensor dropped", |s| {
        let k = first_key(s, |k, _| k.ends_with(".exp_avg") || k.ends_with(".avg"))?;
        s.remove(&k).map(drop)
    }),
    ("an extra key", |s| {
        let t = Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap();
        s.insert("ghost.adam.exp_avg".into(), t);
        Some(())
    }),
    ("an extra field of a parameter", |s| {
        let k = first_key(s, is_float_tensor)?;
        let (p, _) = k.rsplit_once('.')?;
        let t = s[&k].clone();
        s.insert(format!("{p}.ghost"), t);
        Some(())
    }),
    ("a tensor in f64", |s| {
        let k = first_key(s, |k, t| is_float_tensor(k, t) && t.dtype() != DType::F64)?;
        let t = s[&k].to_dtype(DType::F64).unwrap();
        s.insert(k, t).map(drop)
    }),
    ("a tensor in bf16", |s| {
        let k = first_key(s, |k, t| is_float_tensor(k, t) && t.dtype() != DType::BF16)?;
        let t = s[&k].to_dtype(DType::BF16).unwrap();
        s.insert(k, t).map(drop)
    }),
    ("a tensor flattened", |s| {
        let k = first_key(s, |k, t| is_float_tensor(k, t) && t.rank() >= 2)?;
        let t = s[&k].flatten_all().unwrap();
        s.insert(k, t).map(drop)
    }),
    ("a tensor one element longer", |s| {
        let k = first_key(s, |k, t| is_float_tensor(k, t) && t.rank() == 1)?;
        let t = &s[&k];
        let t = Tensor::cat(&[t, &t.narrow(0, 0, 1).unwrap()], 0).unwrap();
        s.insert(k, t).map(drop)
    }),
    ("a counter negative", |s| {
        let k = first_key(s, is_count)?;
        s.insert(k, Tensor::new(-1i64, &Device::Cpu).unwrap())
            .map(drop)
    }),
    ("a counter in f32", |s| {
        let k = first_key(s, is_count)?;
        s.insert(k, Tensor::new(2f32, &Device::Cpu).unwrap())
            .map(drop)
    }),
    ("a counter as a vector", |s| {
        let k = first_key(s, is_count)?;
        s.insert(k, Tensor::new(&[2i64], &Device::Cpu).unwrap())
            .map(drop)
    }),
    ("a tensor as a counter", |s| {
        let k = first_key(s, is_float_tensor)?;
        s.insert(k, Tensor::new(2i64, &Device::Cpu).unwrap())
            .map(drop)
    }),
    ("the header as f32", |s| {
        let t = s["__steepest__"].to_dtype(DType::F32).unwrap();
        s.insert("__steepest__".into(), t).map(drop)
    }),
    ("the header as a matrix", |s| {
        let t = &s["__steepest__"];
        let n = t.elem_count();
        let t = t
            .narrow(0, 0, n / 2 * 2)
            .unwrap()
            .reshape((2, n / 2))
            .unwrap();
        s.insert("__steepest__".into(), t).map(drop)
    }),
];

#[test]
fn edited_headers_and_state_are_refused() {
    let dir = common::scratch_dir("checkpoint-sweep", "edits");
    let mut tally = Tally::default();
    let mut not_applicable = Vec::new();
    let mut save_refused = Vec::new();
    for mut t in targets(&dir) {
        let good_path = dir.join("good.safetensors");
        std::fs::write(&good_path, &t.bytes).unwrap();
        let good = checkpoint::load(&good_path).unwrap();
        // The safetensors header.
        for &(what, pick, dtype, reshape) in ST_EDITS {
            let Some(key) = st_key(&t.bytes, pick) else {
                not_applicable.push(format!("{} | st header: {what}", t.name));
                continue;
            };
            let bad = with_st_header(&t.bytes, |h| {
                let e = &mut h[&key];
                let shape: Vec<u64> = e["shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap())
                    .collect();
                e["dtype"] = json!(dtype);
                e["shape"] = json!(reshape(&shape));
            });
            try_bad(
                &mut t,
                &format!("st header: {what} ({key})"),
                &bad,
                false,
                &mut tally,
            );
        }
        // The rewriting alone keeps a loadable file.
        let same = with_st_header(&t.bytes, |_| {});
        try_bad(&mut t, "st header re-encoded", &same, false, &mut tally);
        // The steepest header, re-saved with valid checksums.
        let original = common::header(&good);
        for &(what, needs, edit) in HEADER_EDITS {
            let mut h = original.clone();
            if original.pointer(needs).is_none() {
                not_applicable.push(format!("{} | header: {what}", t.name));
                continue;
            }
            edit(&mut h);
            if h == original {
                not_applicable.push(format!("{} | header: {what}", t.name));
                continue;
            }
            let edited = common::with_header(&good, |x| *x = h.clone());
            let path = dir.join("edited.safetensors");
            checkpoint::save(&edited, &path).unwrap();
            try_load(&mut t, &format!("header: {what}"), &path, false, &mut tally);
        }
        // The header's own bytes: not JSON, empty, not UTF-8 (written
        // through the file's metadata directly, with a valid CRC).
        for (what, text) in [
            ("header not JSON", "{not json"),
            ("header empty", ""),
            ("header null", "null"),
        ] {
            let bad = with_st_header(&t.bytes, |h| {
                let m = &mut h["__metadata__"];
                m["steepest"] = json!(text);
                m["steepest.header.crc32"] =
                    json!(format!("{:08x}", crc32fast::hash(text.as_bytes())));
            });
            try_bad(&mut t, &format!("header: {what}"), &bad, false, &mut tally);
        }
        // The metadata's checksum entries.
        type MetaEdit = (&'static str, fn(&mut Value));
        let meta_edits: [MetaEdit; 6] = [
            ("crc list missing", |m| {
                m.as_object_mut().unwrap().remove("steepest.crc32");
            }),
            ("crc list not JSON", |m| m["steepest.crc32"] = json!("{")),
            ("crc list empty", |m| m["steepest.crc32"] = json!("{}")),
            ("header crc missing", |m| {
                m.as_object_mut().unwrap().remove("steepest.header.crc32");
            }),
            ("header missing", |m| {
                m.as_object_mut().unwrap().remove("steepest");
            }),
            ("metadata empty", |m| *m = json!({})),
        ];
        for (what, edit) in meta_edits {
            let bad = with_st_header(&t.bytes, |h| edit(&mut h["__metadata__"]));
            try_bad(
                &mut t,
                &format!("metadata: {what}"),
                &bad,
                false,
                &mut tally,
            );
        }
        // The state dict, re-saved with valid checksums.
        for &(what, edit) in STATE_EDITS {
            let mut s = good.clone();
            if edit(&mut s).is_none() {
                not_applicable.push(format!("{} | state: {what}", t.name));
                continue;
            }
            // as a state dict
            try_with(
                &mut t,
                &format!("state dict: {what}"),
                false,
                &mut tally,
                |o| o.restore(&s),
            );
            // and as a file (where `save` takes it)
            let path = dir.join("edited.safetensors");
            match checkpoint::save(&s, &path) {
                Ok(()) => try_load(
                    &mut t,
                    &format!("state file: {what}"),
                    &path,
                    false,
                    &mut tally,
                ),
                Err(e) => {
                    let first = e.to_string().lines().next().unwrap_or_default().to_string();
                    save_refused.push(format!("{} | {what}: {}: {first}", t.name, variant(&e)))
                }
            }
        }
    }
    eprintln!("edits not applicable to a target: {not_applicable:?}");
    eprintln!("edited state dicts `checkpoint::save` refused: {save_refused:?}");
    let _ = std::fs::remove_dir_all(&dir);
    tally.finish("edits", KNOWN_CANDLE);
}

// ---------------------------------------------------------------------------
// 3. Sharded checkpoints.

const SHARDED: &[(&str, &[usize])] = &[
    ("h.0.weight", &[4, 3]),
    ("h.1.weight", &[4, 3]),
    ("proj.weight", &[3, 5]),
    ("conv.weight", &[2, 3, 2]),
    ("embed", &[5, 3]),
    ("bias", &[4]),
];

fn sharded_muon(comm: steepest::distributed::LocalComm, vm: &VarMap) -> steepest::Result<DP> {
    DataParallel::muon(
        comm,
        vm,
        muon_cfg(WeightDecay::spectral(0.1), NewtonSchulz::muon()),
        DataParallelConfig::default(),
    )
}

type DP = DataParallel<steepest::distributed::LocalComm, Muon>;

/// Gradients for rank `rank` at step `t`.
fn rank_grads(vm: &VarMap, t: u64, rank: usize) -> GradStore {
    grads(vm, t * 16 + rank as u64)
}

/// A sharded checkpoint in `dir`, saved by 2 ranks after two steps.
fn save_two_rank_checkpoint(dir: &Path) {
    save_sharded_checkpoint(dir, 2);
}

fn save_sharded_checkpoint(dir: &Path, world: usize) {
    LocalGroup::run(world, |comm| {
        let rank = comm.rank();
        let vm = support::model_of(SHARDED, DType::F32, 3);
        let mut dp = sharded_muon(comm, &vm)?;
        for t in 0..2 {
            dp.step(&rank_grads(&vm, t, rank))?;
        }
        dp.save_state(dir)
    })
    .unwrap()
    .into_iter()
    .for_each(|r| r.unwrap());
}

/// What one rank saw when loading a corrupted checkpoint.
#[derive(Debug)]
struct RankLoad {
    result: Result<(), (&'static str, String)>,
    state_unchanged: bool,
    lr_unchanged: bool,
    params_unchanged: bool,
}

/// On 2 ranks: build, take one step (so the state differs from the
/// checkpoint's), load `dir`, and report (`Err`: the rank failed otherwise,
/// or panicked: `LocalGroup::run` reports a rank's panic as an error; no
/// `catch_unwind` inside a rank, whose peer would wait for it forever).
fn load_on_two_ranks(dir: &Path) -> Vec<Result<RankLoad, String>> {
    LocalGroup::run(2, |comm| {
        let rank = comm.rank();
        let vm = support::model_of(SHARDED, DType::F32, 3);
        let mut dp = sharded_muon(comm, &vm)?;
        dp.step(&rank_grads(&vm, 9, rank))?;
        let before = state_bits(&dp.optimizer().state_dict()?);
        let (lr, params) = (dp.optimizer().learning_rate(), param_bits(&vm));
        let result = dp.load_state(dir).map_err(|e| (variant(&e), e.to_string()));
        Ok(RankLoad {
            result,
            state_unchanged: state_bits(&dp.optimizer().state_dict()?) == before,
            lr_unchanged: dp.optimizer().learning_rate() == lr,
            params_unchanged: param_bits(&vm) == params,
        })
    })
    .unwrap()
    .into_iter()
    .map(|r| r.map_err(|e| e.to_string()))
    .collect()
}

fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

/// Sets rank `r`'s CRC-32 in the manifest of `dir` to its file's.
fn refresh_manifest_crc(dir: &Path, r: usize) {
    let path = dir.join("manifest.json");
    let mut m: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let file = m["files"][r]["file"].as_str().unwrap().to_string();
    let bytes = std::fs::read(dir.join(file)).unwrap();
    m["files"][r]["crc32"] = json!(format!("{:08x}", crc32fast::hash(&bytes)));
    std::fs::write(&path, serde_json::to_string_pretty(&m).unwrap()).unwrap();
}

fn edit_manifest(dir: &Path, edit: impl FnOnce(&mut Value)) {
    let path = dir.join("manifest.json");
    let mut m: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut m);
    std::fs::write(&path, serde_json::to_string_pretty(&m).unwrap()).unwrap();
}

fn flip(path: &Path, pos: impl FnOnce(&[u8]) -> usize) {
    let mut b = std::fs::read(path).unwrap();
    let p = pos(&b);
    b[p] ^= 0x10;
    std::fs::write(path, b).unwrap();
}

type ShardedCase = (&'static str, fn(&Path));

const R0: &str = "rank-0-of-2.safetensors";
const R1: &str = "rank-1-of-2.safetensors";

const SHARDED_CASES: &[ShardedCase] = &[
    ("rank 1: last data byte flipped", |d| {
        flip(&d.join(R1), |b| b.len() - 1)
    }),
    ("rank 0: data byte flipped, manifest CRC refreshed", |d| {
        flip(&d.join(R0), |b| b.len() - 3);
        refresh_manifest_crc(d, 0);
    }),
    (
        "rank 1: JSON header byte flipped, manifest CRC refreshed",
        |d| {
            flip(&d.join(R1), |b| 8 + layout(b).0 / 2);
            refresh_manifest_crc(d, 1);
        },
    ),
    ("rank 1: truncated, manifest CRC refreshed", |d| {
        let b = std::fs::read(d.join(R1)).unwrap();
        std::fs::write(d.join(R1), &b[..b.len() / 2]).unwrap();
        refresh_manifest_crc(d, 1);
    }),
    ("rank 0: file deleted", |d| {
        std::fs::remove_file(d.join(R0)).unwrap()
    }),
    ("rank 1: file empty", |d| {
        std::fs::write(d.join(R1), b"").unwrap()
    }),
    ("manifest deleted", |d| {
        std::fs::remove_file(d.join("manifest.json")).unwrap()
    }),
    ("manifest truncated", |d| {
        let p = d.join("manifest.json");
        let b = std::fs::read(&p).unwrap();
        std::fs::write(&p, &b[..b.len() / 2]).unwrap();
    }),
    ("manifest empty", |d| {
        std::fs::write(d.join("manifest.json"), b"").unwrap()
    }),
    ("manifest a byte flipped", |d| {
        flip(&d.join("manifest.json"), |b| b.len() / 3)
    }),
    ("manifest version 2", |d| {
        edit_manifest(d, |m| m["version"] = json!(2))
    }),
    ("manifest format", |d| {
        edit_manifest(d, |m| m["format"] = json!("other"))
    }),
    ("manifest world size 3", |d| {
        edit_manifest(d, |m| m["world_size"] = json!(3))
    }),
    ("manifest rank 1's CRC zeroed", |d| {
        edit_manifest(d, |m| m["files"][1]["crc32"] = json!("00000000"))
    }),
    ("manifest names a missing file", |d| {
        edit_manifest(d, |m| {
            m["files"][1]["file"] = json!("rank-1-of-3.safetensors")
        })
    }),
    ("manifest rank 0 listed twice", |d| {
        edit_manifest(d, |m| m["files"][1] = m["files"][0].clone())
    }),
    ("manifest files missing", |d| {
        edit_manifest(d, |m| {
            m.as_object_mut().unwrap().remove("files");
        })
    }),
];

#[test]
fn corrupted_sharded_checkpoints_are_refused_on_every_rank() {
    let start = std::time::Instant::now();
    let dir = common::scratch_dir("checkpoint-sweep", "sharded");
    let good = dir.join("good");
    save_two_rank_checkpoint(&good);
    let manifest = steepest::distributed::checkpoint::read_manifest(&good).unwrap();
    assert!(manifest.files.iter().all(|f| !f.params.is_empty()));
    // The intact checkpoint loads on both ranks and as a union.
    let union = load_union(&good).unwrap();
    for (r, l) in load_on_two_ranks(&good).into_iter().enumerate() {
        let l = l.unwrap();
        assert!(l.result.is_ok(), "intact, rank {r}: {:?}", l.result);
    }
    let mut fails = Vec::new();
    let mut variants: BTreeMap<String, usize> = BTreeMap::new();
    for &(what, corrupt) in SHARDED_CASES {
        let case = dir.join("case");
        copy_dir(&good, &case);
        corrupt(&case);
        match catch_unwind(AssertUnwindSafe(|| load_union(&case))) {
            Err(p) => fails.push(format!("{what}: load_union PANIC: {}", panic_text(p))),
            Ok(Ok(u)) => fails.push(format!(
                "{what}: load_union accepted it ({} keys, the intact union has {}; \
                 equal: {})",
                u.len(),
                union.len(),
                state_bits(&u) == state_bits(&union)
            )),
            Ok(Err(e)) => {
                *variants
                    .entry(format!("load_union {}", variant(&e)))
                    .or_default() += 1;
                if matches!(e, Error::Candle(_)) {
                    fails.push(format!("{what}: load_union: bare candle error {e}"));
                }
            }
        }
        for (r, l) in load_on_two_ranks(&case).into_iter().enumerate() {
            let l = match l {
                Ok(l) => l,
                Err(e) => {
                    fails.push(format!("{what}: rank {r} failed: {e}"));
                    continue;
                }
            };
            match &l.result {
                Ok(()) => fails.push(format!("{what}: rank {r} loaded it")),
                Err((v, msg)) => {
                    *variants.entry(format!("load_state {v}")).or_default() += 1;
                    if *v != "Checkpoint" || !msg.contains("kept its previous state") {
                        fails.push(format!("{what}: rank {r}: {v}: {msg}"));
                    }
                }
            }
            if !(l.state_unchanged && l.lr_unchanged && l.params_unchanged) {
                fails.push(format!("{what}: rank {r} refused but changed: {l:?}"));
            }
        }
    }
    eprintln!(
        "sharded: {} corruptions in {:.1} s: {variants:?}",
        SHARDED_CASES.len(),
        start.elapsed().as_secs_f64()
    );
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        fails.is_empty(),
        "{} sharded failures:\n{}",
        fails.len(),
        fails.join("\n")
    );
}

// ---------------------------------------------------------------------------
// The sweep's findings, fixed: one test each.

/// A Muon after two steps, its state dict and its file's bytes.
fn muon_saved(dir: &Path) -> (VarMap, Muon, HashMap<String, Tensor>, Vec<u8>) {
    let vm = model(&[3, 2], DType::F32, true, 5);
    let mut opt = Muon::from_varmap(
        &vm,
        muon_cfg(WeightDecay::spectral(0.1), NewtonSchulz::muon()),
    )
    .unwrap();
    for t in 0..2 {
        opt.try_step(&grads(&vm, t)).unwrap();
    }
    let path = dir.join("muon.safetensors");
    opt.save_state(&path).unwrap();
    let state = opt.state_dict().unwrap();
    (vm, opt, state, std::fs::read(&path).unwrap())
}

/// One byte of a checkpoint file changed — the `I` of a step counter's
/// dtype `"I64"` in the safetensors header, giving `"U64"` — is refused
/// with an `Error::Checkpoint` naming the file (it was a bare
/// `Error::Candle`, "unsupported safetensor dtype U64", from candle's
/// reader: the tensor bytes and their CRC-32s are intact). The same for a
/// tensor declared `I8`, `BOOL` or `F8_E5M2` (the size matches). The state
/// is unchanged.
#[test]
fn a_dtype_candle_cannot_read_is_a_checkpoint_error() {
    let dir = common::scratch_dir("checkpoint-sweep", "bug-dtype");
    let (_vm, mut opt, before, bytes) = muon_saved(&dir);
    let at = bytes
        .windows(5)
        .position(|w| w == b"\"I64\"")
        .expect("a step counter")
        + 1;
    let mut bad = bytes.clone();
    bad[at] = b'U';
    let path = dir.join("bad.safetensors");
    std::fs::write(&path, &bad).unwrap();
    let e = opt.load_state(&path).unwrap_err();
    assert_eq!(state_bits(&opt.state_dict().unwrap()), state_bits(&before));
    assert!(
        matches!(&e, Error::Checkpoint { who, .. } if who.contains("bad.safetensors")),
        "{e:?}"
    );
}

/// A header whose Muon config's `lr` (0.5) differs from the driver's `lr`
/// (0.02) — both are in the header, re-saved with valid checksums — must
/// not leave the two disagreeing (before the fix, `learning_rate()` said
/// 0.5 while the steps ran at 0.02): refused, or the config's rate made the
/// driver's (what `Muon`, `AdamW`, `Sgd` and `Steepest` now do).
#[test]
fn a_muon_header_with_two_rates_is_refused() {
    let dir = common::scratch_dir("checkpoint-sweep", "bug-muon-lr");
    let (_vm, mut opt, state, _) = muon_saved(&dir);
    let edited = common::with_header(&state, |h| h["body"]["config"]["lr"] = json!(0.5));
    match opt.load_state_dict(&edited) {
        Err(Error::Checkpoint { .. }) => {}
        Err(e) => panic!("{e:?}"),
        Ok(()) => {
            let driver_lr = common::header(&opt.state_dict().unwrap())["body"]["lr"].clone();
            assert_eq!(
                json!(opt.learning_rate()),
                driver_lr,
                "loaded: learning_rate() {} but the driver steps at {driver_lr}",
                opt.learning_rate()
            );
        }
    }
}

/// A `WeightAverage` checkpoint whose header says `average_ema` but whose
/// body's `kind` is `Polyak` (re-saved with valid checksums) is refused.
/// Before the fix it loaded into an EMA, which became a Polyak average and
/// could no longer load its own EMA checkpoints.
#[test]
fn a_weight_average_body_of_another_kind_is_refused() {
    let vm = model(&[3, 2], DType::F32, true, 5);
    let mut opt = AdamW::from_varmap(&vm, adamw_cfg()).unwrap();
    let mut wa = WeightAverage::from_varmap(&vm, AverageKind::Ema { decay: 0.9 }).unwrap();
    for t in 0..2 {
        opt.try_step(&grads(&vm, t)).unwrap();
        wa.update().unwrap();
    }
    let state = wa.state_dict().unwrap();
    let edited = common::with_header(&state, |h| h["body"]["kind"] = json!("Polyak"));
    let r = wa.load_state_dict(&edited);
    assert_eq!(wa.kind(), &AverageKind::Ema { decay: 0.9 }, "{r:?}");
    assert!(matches!(r, Err(Error::Checkpoint { .. })), "{r:?}");
}

/// A 2-rank checkpoint whose rank-1 file is a copy of rank 0's, the
/// manifest's CRC-32 updated to match, is refused by `load_union` and by
/// `DataParallel::load_state` on every rank, naming the file and a
/// parameter: each file's keys are checked against the parameters the
/// manifest lists for its rank. (Before the fix it loaded, and rank 1's
/// parameters silently started afresh.)
#[test]
fn a_rank_file_with_another_ranks_state_is_refused() {
    let dir = common::scratch_dir("checkpoint-sweep", "bug-rank-copy");
    let good = dir.join("good");
    save_two_rank_checkpoint(&good);
    let full = load_union(&good).unwrap().len();
    std::fs::copy(good.join(R0), good.join(R1)).unwrap();
    refresh_manifest_crc(&good, 1);
    match load_union(&good) {
        Err(Error::Checkpoint { .. }) => {}
        r => panic!(
            "expected Error::Checkpoint, got {:?} (the intact union has {full} keys)",
            r.map(|u| u.len())
        ),
    }
}

/// `checkpoint::save` of a state dict whose header is not a `u8` vector is
/// refused with an `Error::Checkpoint`, as `Header::decode` refuses the same
/// dict (it was a bare `Error::Candle`, "unexpected dtype, expected: U8").
/// Only a hand-made dict gets there.
#[test]
fn saving_a_malformed_header_is_a_checkpoint_error() {
    let dir = common::scratch_dir("checkpoint-sweep", "bug-save-header");
    let (_vm, _opt, mut state, _) = muon_saved(&dir);
    let t = state["__steepest__"].to_dtype(DType::F32).unwrap();
    state.insert("__steepest__".into(), t);
    let e = checkpoint::save(&state, dir.join("x.safetensors")).unwrap_err();
    assert!(matches!(e, Error::Checkpoint { .. }), "{e:?}");
}

/// Saving into a directory that holds a checkpoint of another world size
/// removes that one's rank files once the new manifest is written (they
/// could not be loaded any more), and leaves every other file: 3 ranks,
/// then 2 in the same directory keeps `rank-{0,1}-of-2` and the unrelated
/// files, and the result loads on 2 ranks.
#[test]
fn a_sharded_save_removes_the_rank_files_of_another_world_size() {
    let dir = common::scratch_dir("checkpoint-sweep", "stale-rank-files");
    save_sharded_checkpoint(&dir, 3);
    let keep = [
        "notes.txt",
        "rank-0-of-x.safetensors",
        "rank-01-of-3.safetensors",
    ];
    for k in keep {
        std::fs::write(dir.join(k), b"user file").unwrap();
    }
    save_sharded_checkpoint(&dir, 2);
    let mut names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let mut want: Vec<String> = ["manifest.json", R0, R1]
        .iter()
        .chain(keep.iter())
        .map(|s| s.to_string())
        .collect();
    want.sort();
    assert_eq!(names, want);
    for (rank, r) in load_on_two_ranks(&dir).into_iter().enumerate() {
        let r = r.unwrap_or_else(|e| panic!("rank {rank}: {e}"));
        assert!(r.result.is_ok(), "rank {rank}: {:?}", r.result);
    }
}
