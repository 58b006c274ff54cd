//! A property-style robustness sweep over the public optimizers: awkward
//! shapes, dtypes, gradients and parameters, every case checked against the
//! crate's contract:
//!
//! - construction either succeeds or returns a typed error (never a panic);
//! - a step that returns `Ok` leaves every parameter finite (and a
//!   parameter without a gradient untouched);
//! - a step that returns `Err` leaves every parameter and the whole
//!   `state_dict()` bit-identical, is not a bare `Error::Candle`, and its
//!   message names the parameter it is about;
//! - a NaN/Inf gradient is refused as `Error::NonFiniteGradient` naming the
//!   parameter, a gradient of the wrong shape as `Error::Shape` naming it;
//! - nothing panics (each case runs under `catch_unwind`).
//!
//! Each case is a model of two parameters: the `target` (the swept shape,
//! dtype and values, given the swept gradient) and a well-behaved 2×2
//! companion `aux` (normal gradient), so a refused step must also leave the
//! companion alone (atomicity across parameters and groups). Each case runs
//! two steps: a warm-up with normal gradients (the target gets one only
//! when its values are generic, so degenerate values stay degenerate for
//! the second step), then the swept gradient; both are checked.
//! Deterministic: every random value comes from a seed derived from the
//! case. The sweep fails listing every violated case. The slower optimizers
//! (Muon, the manifolds, the wrappers, and AdamW, Muon and Stiefel with f32
//! master weights) run each case in f32 and one other
//! dtype, rotating through f64, bf16 and f16. `SWEEP_WHY=1` (or `=cases`)
//! with `--nocapture` prints why steps were refused, and where an `Ok` step
//! left a non-finite state (Adam's second moment after a gradient ≳ 1e19 in
//! f32: as in PyTorch; noted, not a failure). `clip_grad_norm` gets the same
//! sweep. The three bugs the sweep found (fixed) have their own tests at
//! the end: the step length under huge and tiny f32 gradients, free and on
//! the manifolds, and candle's sub-16-bit float dtypes at construction.
//!
//! Existing edge-case tests (`why_cases.rs`, `optim_behaviour.rs`) check
//! single cases in depth; this file checks the contract broadly.

mod common;
mod support;

use support::{spectral, steepest_cfg};

use std::collections::{BTreeMap, HashMap};
use std::panic::{catch_unwind, AssertUnwindSafe};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use steepest::accumulate::Accumulate;
use steepest::optim::{Chain, Partition};
use steepest::schedule::{Schedule, Scheduled};
use steepest::{
    AdamW, AdamWConfig, Error, Manifold, Muon, MuonConfig, NewtonSchulz, Norm, OptimizerState, Sgd,
    SgdConfig, Steepest, SteepestConfig, TryStep, WeightDecay,
};

const TARGET: &str = "target";
const AUX: &str = "aux";
const AUX_SHAPE: &[usize] = &[2, 2];

// ---------------------------------------------------------------------------
// The swept inputs.

const SHAPES: &[&[usize]] = &[
    &[],
    &[0],
    &[1],
    &[5],
    &[1, 5],
    &[5, 1],
    &[1, 1],
    &[0, 3],
    &[3, 0],
    &[2, 3],
    &[3, 2],
    &[4, 4],
    &[2, 3, 2],
    &[3, 2, 1, 2],
];

const DTYPES: &[DType] = &[DType::F32, DType::F64, DType::BF16, DType::F16];

#[derive(Clone, Copy, Debug, PartialEq)]
enum Values {
    /// Standard normal.
    Normal,
    /// All zero.
    Zero,
    /// `u vᵀ` of the matrix view.
    RankOne,
    /// Singular values `2, 2, 0.5, …`: the top two equal.
    EqualTop,
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Grad {
    Normal,
    Zero,
    NaN,
    Inf,
    /// Normal values scaled to max |g| = 1e30 (6e4 in f16, its range).
    Huge,
    /// Normal values scaled to max |g| = 1e-30 (1e-7 in f16, a subnormal).
    Tiny,
    /// No gradient for the target.
    Missing,
    /// Normal values in another float dtype (f32, or f64 for f32 targets).
    OtherDtype,
    /// A flat gradient with one element too many.
    WrongShape,
}

const GRADS: &[Grad] = &[
    Grad::Normal,
    Grad::Zero,
    Grad::NaN,
    Grad::Inf,
    Grad::Huge,
    Grad::Tiny,
    Grad::Missing,
    Grad::OtherDtype,
    Grad::WrongShape,
];

fn matrix_view(shape: &[usize]) -> Option<(usize, usize)> {
    match shape {
        [] | [_] => None,
        [r, rest @ ..] => Some((*r, rest.iter().product())),
    }
}

/// The value kinds that mean something for `shape`.
fn values_for(shape: &[usize]) -> Vec<Values> {
    let n: usize = shape.iter().product();
    if n == 0 {
        return vec![Values::Normal];
    }
    match matrix_view(shape) {
        Some((r, c)) if r.min(c) >= 2 => vec![
            Values::Normal,
            Values::Zero,
            Values::RankOne,
            Values::EqualTop,
        ],
        _ => vec![Values::Normal, Values::Zero],
    }
}

// ---------------------------------------------------------------------------
// Tensors.

fn tensor(v: Vec<f64>, shape: &[usize], dtype: DType) -> Tensor {
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

fn param_values(values: Values, shape: &[usize], seed: u64) -> Vec<f64> {
    let mut rng = common::rng(seed);
    let n: usize = shape.iter().product();
    match values {
        Values::Normal => common::normal_vec(&mut rng, n),
        Values::Zero => vec![0.0; n],
        Values::RankOne => {
            let (r, c) = matrix_view(shape).unwrap();
            let u = common::normal_vec(&mut rng, r);
            let v = common::normal_vec(&mut rng, c);
            (0..r)
                .flat_map(|i| v.iter().map(|vj| u[i] * vj).collect::<Vec<_>>())
                .collect()
        }
        Values::EqualTop => {
            let (r, c) = matrix_view(shape).unwrap();
            let k = r.min(c);
            let s: Vec<f64> = (0..k).map(|i| if i < 2 { 2.0 } else { 0.5 }).collect();
            let a = common::with_singular_values(&mut rng, r, c, &s);
            (0..r)
                .flat_map(|i| (0..c).map(move |j| (i, j)))
                .map(|(i, j)| a[(i, j)])
                .collect()
        }
    }
}

/// Normal values scaled to max |x| = `to`.
fn scaled(rng: &mut rand::rngs::StdRng, n: usize, to: f64) -> Vec<f64> {
    let v = common::normal_vec(rng, n);
    let m = v.iter().fold(0.0f64, |a, x| a.max(x.abs())).max(1e-300);
    v.iter().map(|x| x / m * to).collect()
}

/// The target's gradient of kind `g` (`None`: no gradient).
fn target_grad(g: Grad, shape: &[usize], dtype: DType, seed: u64) -> Option<Tensor> {
    let mut rng = common::rng(seed ^ 0x9e37_79b9);
    let n: usize = shape.iter().product();
    let f16 = dtype == DType::F16;
    let with_bad = |bad: f64, rng: &mut rand::rngs::StdRng| {
        let mut v = common::normal_vec(rng, n);
        if n > 0 {
            v[n / 2] = bad;
        }
        tensor(v, shape, dtype)
    };
    Some(match g {
        Grad::Normal => tensor(common::normal_vec(&mut rng, n), shape, dtype),
        Grad::Zero => tensor(vec![0.0; n], shape, dtype),
        Grad::NaN => with_bad(f64::NAN, &mut rng),
        Grad::Inf => with_bad(f64::INFINITY, &mut rng),
        Grad::Huge => tensor(
            scaled(&mut rng, n, if f16 { 6e4 } else { 1e30 }),
            shape,
            dtype,
        ),
        Grad::Tiny => tensor(
            scaled(&mut rng, n, if f16 { 1e-7 } else { 1e-30 }),
            shape,
            dtype,
        ),
        Grad::Missing => return None,
        Grad::OtherDtype => {
            let other = if dtype == DType::F32 {
                DType::F64
            } else {
                DType::F32
            };
            tensor(common::normal_vec(&mut rng, n), shape, other)
        }
        Grad::WrongShape => tensor(common::normal_vec(&mut rng, n + 1), &[n + 1], dtype),
    })
}

/// An empty `GradStore` to fill by hand (candle's only constructor is
/// `backward`; a constant's backward holds no variable).
fn empty_grads() -> GradStore {
    Tensor::zeros((), DType::F32, &Device::Cpu)
        .unwrap()
        .backward()
        .unwrap()
}

// ---------------------------------------------------------------------------
// Bitwise snapshots.

type Bits = (Vec<usize>, DType, Vec<u64>);

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

fn param_bits(vars: &[(String, Var)]) -> BTreeMap<String, Bits> {
    vars.iter()
        .map(|(n, v)| (n.clone(), bits(v.as_tensor())))
        .collect()
}

fn state_bits(state: &HashMap<String, Tensor>) -> BTreeMap<String, Bits> {
    state.iter().map(|(k, t)| (k.clone(), bits(t))).collect()
}

fn all_finite(t: &Tensor) -> bool {
    common::to_f64_vec(t).iter().all(|x| x.is_finite())
}

// ---------------------------------------------------------------------------
// The optimizers.

/// What the sweep needs of an optimizer (`OptimizerState` has generic
/// methods, so it cannot be a trait object itself).
trait Swept {
    fn sweep_step(&mut self, grads: &GradStore) -> steepest::Result<()>;
    fn sweep_state(&self) -> steepest::Result<HashMap<String, Tensor>>;
    fn sweep_load(&mut self, state: &HashMap<String, Tensor>) -> steepest::Result<()>;
}

impl<O: TryStep + OptimizerState> Swept for O {
    fn sweep_step(&mut self, grads: &GradStore) -> steepest::Result<()> {
        self.try_step(grads)
    }
    fn sweep_state(&self) -> steepest::Result<HashMap<String, Tensor>> {
        self.state_dict()
    }
    fn sweep_load(&mut self, state: &HashMap<String, Tensor>) -> steepest::Result<()> {
        self.load_state_dict(state)
    }
}

type Make = fn(&VarMap) -> steepest::Result<Box<dyn Swept>>;

fn boxed<O: Swept + 'static>(r: steepest::Result<O>) -> steepest::Result<Box<dyn Swept>> {
    r.map(|o| Box::new(o) as Box<dyn Swept>)
}

fn adamw_cfg(wd: WeightDecay) -> AdamWConfig {
    AdamWConfig {
        lr: 0.01,
        weight_decay: wd,
        decay_vectors: true,
        ..Default::default()
    }
}

fn sgd_cfg(wd: WeightDecay) -> SgdConfig {
    SgdConfig {
        lr: 0.05,
        momentum: 0.9,
        nesterov: true,
        weight_decay: wd,
        decay_vectors: true,
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
        ..Default::default()
    }
}

/// Matrices to a manifold chain, everything else to AdamW: one driver.
fn partition(vm: &VarMap, manifold: Manifold) -> steepest::Result<Box<dyn Swept>> {
    let cfg = steepest_cfg(spectral(), manifold);
    cfg.validate()?;
    let adamw: Chain = adamw_cfg(WeightDecay::Decoupled(0.1)).chain();
    boxed(
        Partition::by(|p| if p.is_matrix() { "manifold" } else { "adamw" })
            .group("manifold", cfg.chain(), 0.02)
            .group("adamw", adamw, 0.01)
            .build_from_varmap(vm),
    )
}

const OPTIMIZERS: &[(&str, Make)] = &[
    ("AdamW decoupled", |vm| {
        boxed(AdamW::from_varmap(
            vm,
            adamw_cfg(WeightDecay::Decoupled(0.1)),
        ))
    }),
    ("AdamW spectral", |vm| {
        boxed(AdamW::from_varmap(
            vm,
            adamw_cfg(WeightDecay::spectral(0.1)),
        ))
    }),
    ("Sgd decoupled", |vm| {
        boxed(Sgd::from_varmap(vm, sgd_cfg(WeightDecay::Decoupled(0.1))))
    }),
    ("Sgd spectral", |vm| {
        boxed(Sgd::from_varmap(vm, sgd_cfg(WeightDecay::spectral(0.1))))
    }),
    ("Muon default", |vm| {
        boxed(Muon::from_varmap(vm, MuonConfig::default()))
    }),
    ("Muon spectral", |vm| {
        boxed(Muon::from_varmap(
            vm,
            muon_cfg(WeightDecay::spectral(0.1), NewtonSchulz::muon()),
        ))
    }),
    ("Muon gram", |vm| {
        boxed(Muon::from_varmap(
            vm,
            muon_cfg(
                WeightDecay::Decoupled(0.1),
                NewtonSchulz::muon().gram_form(),
            ),
        ))
    }),
    ("Steepest free euclidean", |vm| {
        boxed(Steepest::from_varmap(
            vm,
            steepest_cfg(Norm::Euclidean, Manifold::Free),
        ))
    }),
    ("Steepest free lp3", |vm| {
        boxed(Steepest::from_varmap(
            vm,
            steepest_cfg(Norm::Lp(3.0), Manifold::Free),
        ))
    }),
    ("Steepest free sign", |vm| {
        boxed(Steepest::from_varmap(
            vm,
            steepest_cfg(Norm::Sign, Manifold::Free),
        ))
    }),
    ("Steepest free spectral", |vm| {
        boxed(Steepest::from_varmap(
            vm,
            steepest_cfg(spectral(), Manifold::Free),
        ))
    }),
    ("Steepest sphere euclidean", |vm| {
        boxed(Steepest::from_varmap(
            vm,
            steepest_cfg(Norm::Euclidean, Manifold::Sphere { radius: 2.0 }),
        ))
    }),
    ("Steepest sphere lp3", |vm| {
        boxed(Steepest::from_varmap(
            vm,
            steepest_cfg(Norm::Lp(3.0), Manifold::Sphere { radius: 2.0 }),
        ))
    }),
    ("Steepest sphere sign", |vm| {
        boxed(Steepest::from_varmap(
            vm,
            steepest_cfg(Norm::Sign, Manifold::Sphere { radius: 2.0 }),
        ))
    }),
    ("Steepest spectral sphere", |vm| {
        boxed(Steepest::from_varmap(
            vm,
            steepest_cfg(spectral(), Manifold::SpectralSphere { radius: 2.0 }),
        ))
    }),
    ("Steepest stiefel", |vm| {
        boxed(Steepest::from_varmap(
            vm,
            steepest_cfg(spectral(), Manifold::Stiefel { transpose: false }),
        ))
    }),
    ("Steepest stiefel transposed", |vm| {
        boxed(Steepest::from_varmap(
            vm,
            steepest_cfg(spectral(), Manifold::Stiefel { transpose: true }),
        ))
    }),
    ("Partition spectral sphere | AdamW", |vm| {
        partition(vm, Manifold::SpectralSphere { radius: 2.0 })
    }),
    ("Partition stiefel | AdamW", |vm| {
        partition(vm, Manifold::Stiefel { transpose: false })
    }),
    ("Accumulate(2) Muon", |vm| {
        let muon = Muon::from_varmap(
            vm,
            muon_cfg(WeightDecay::spectral(0.1), NewtonSchulz::muon()),
        )?;
        boxed(Accumulate::new(muon, 2))
    }),
    ("Scheduled AdamW", |vm| {
        let adamw = AdamW::from_varmap(vm, adamw_cfg(WeightDecay::spectral(0.1)))?;
        let schedule = Schedule::linear_warmup(0.01, 3)?;
        Ok(Box::new(Scheduled::new(adamw, schedule)) as Box<dyn Swept>)
    }),
    ("AdamW spectral, master weights", |vm| {
        let adamw = AdamW::from_varmap(vm, adamw_cfg(WeightDecay::spectral(0.1)))?;
        boxed(Ok(adamw.with_master_weights()))
    }),
    ("Muon spectral, master weights", |vm| {
        let muon = Muon::from_varmap(
            vm,
            muon_cfg(WeightDecay::spectral(0.1), NewtonSchulz::muon()),
        )?;
        boxed(Ok(muon.with_master_weights()))
    }),
    ("Steepest stiefel, master weights", |vm| {
        let cfg = steepest_cfg(spectral(), Manifold::Stiefel { transpose: false });
        boxed(Ok(Steepest::from_varmap(vm, cfg)?.with_master_weights()))
    }),
];

// ---------------------------------------------------------------------------
// One case.

#[derive(Clone, Debug)]
struct Case {
    opt: &'static str,
    shape: &'static [usize],
    dtype: DType,
    values: Values,
    grad: Grad,
    seed: u64,
}

impl std::fmt::Display for Case {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "[{} | shape {:?} {:?} | params {:?} | grad {:?} | seed {}]",
            self.opt, self.shape, self.dtype, self.values, self.grad, self.seed
        )
    }
}

/// What a case came to (for the summary).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    /// Refused at construction with a typed error.
    Refused,
    /// The swept step succeeded.
    Stepped,
    /// The swept step was refused (as the contract allows or requires).
    StepRefused,
}

struct Model {
    vm: VarMap,
    vars: Vec<(String, Var)>,
}

fn model(case: &Case) -> Model {
    let vm = VarMap::new();
    let t = tensor(
        param_values(case.values, case.shape, case.seed),
        case.shape,
        case.dtype,
    );
    let mut rng = common::rng(case.seed.wrapping_add(7));
    let a = tensor(common::normal_vec(&mut rng, 4), AUX_SHAPE, case.dtype);
    let (t, a) = (Var::from_tensor(&t).unwrap(), Var::from_tensor(&a).unwrap());
    {
        let mut data = vm.data().lock().unwrap();
        data.insert(TARGET.to_string(), t.clone());
        data.insert(AUX.to_string(), a.clone());
    }
    Model {
        vm,
        vars: vec![(AUX.to_string(), a), (TARGET.to_string(), t)],
    }
}

/// Gradients: `aux` normal, the target's of kind `g`.
fn grads(m: &Model, case: &Case, g: Grad, seed: u64) -> GradStore {
    let mut store = empty_grads();
    let mut rng = common::rng(seed);
    let aux = tensor(common::normal_vec(&mut rng, 4), AUX_SHAPE, case.dtype);
    store.insert(m.vars[0].1.as_tensor(), aux);
    if let Some(t) = target_grad(g, case.shape, case.dtype, seed) {
        store.insert(m.vars[1].1.as_tensor(), t);
    }
    store
}

/// A construction error is fine if typed and it says about what.
fn check_refusal(case: &Case, e: &Error, fails: &mut Vec<String>) {
    let msg = e.to_string();
    match e {
        Error::Candle(_) => fails.push(format!("{case}: construction: untyped error: {msg}")),
        _ if e.who().is_none_or(|w| w.is_empty()) => {
            fails.push(format!("{case}: construction: error names nothing: {msg}"))
        }
        _ => {}
    }
}

thread_local! {
    /// Why swept steps were refused: (optimizer, gradient, message with the
    /// numbers blanked) → count, for the summary.
    static WHY: std::cell::RefCell<BTreeMap<String, usize>> = Default::default();
}

fn note_refusal(case: &Case, what: &str, msg: &str) {
    let blank: String = msg
        .chars()
        .map(|c| if c.is_ascii_digit() { '#' } else { c })
        .collect();
    let key = if std::env::var_os("SWEEP_WHY").is_some_and(|v| v == "cases") {
        format!("{case} | {what} | {msg}")
    } else {
        format!("{} | {what} | {:?} | {blank}", case.opt, case.grad)
    };
    WHY.with(|w| *w.borrow_mut().entry(key).or_default() += 1);
}

/// One step under the contract; returns whether it succeeded.
fn checked_step(
    case: &Case,
    what: &str,
    opt: &mut dyn Swept,
    m: &Model,
    grads: &GradStore,
    g: Grad,
    fails: &mut Vec<String>,
) -> bool {
    let fail = |fails: &mut Vec<String>, s: String| fails.push(format!("{case}: {what}: {s}"));
    let params = param_bits(&m.vars);
    let state = match opt.sweep_state() {
        Ok(s) => state_bits(&s),
        Err(e) => {
            fail(fails, format!("state_dict() before the step failed: {e}"));
            return false;
        }
    };
    let n_target: usize = case.shape.iter().product();
    let r = opt.sweep_step(grads);
    match r {
        Ok(()) => {
            for (name, v) in &m.vars {
                if !all_finite(v.as_tensor()) {
                    fail(
                        fails,
                        format!(
                            "Ok, but `{name}` is not finite: {:?}",
                            common::to_f64_vec(v.as_tensor())
                        ),
                    );
                }
            }
            // The state it leaves saves and loads back (resume), and is
            // finite (noted, not a failure: see the summary).
            match opt.sweep_state() {
                Ok(st) => {
                    if st.values().any(|t| t.dtype().is_float() && !all_finite(t)) {
                        note_refusal(case, "NON-FINITE STATE after Ok", "");
                    }
                    if let Err(e) = opt.sweep_load(&st) {
                        fail(
                            fails,
                            format!("Ok, but its own state_dict does not load back: {e}"),
                        );
                    }
                }
                Err(e) => fail(fails, format!("Ok, but state_dict() then fails: {e}")),
            }
            match g {
                Grad::NaN | Grad::Inf if n_target > 0 => {
                    fail(fails, "a NaN/Inf gradient was accepted".into())
                }
                Grad::WrongShape => {
                    fail(fails, "a gradient of the wrong shape was accepted".into())
                }
                // (Accumulate steps with the mean of both micro-batches: the
                // warm-up's gradient of the target is in it.)
                Grad::Missing
                    if !(case.opt.starts_with("Accumulate") && case.values == Values::Normal)
                        && param_bits(&m.vars[1..])[TARGET] != params[TARGET] =>
                {
                    fail(fails, "the target has no gradient but changed".into())
                }
                _ => {}
            }
            true
        }
        Err(e) => {
            let msg = e.to_string();
            note_refusal(case, what, &msg);
            if param_bits(&m.vars) != params {
                let changed: Vec<String> = param_bits(&m.vars)
                    .into_iter()
                    .filter(|(k, v)| params[k] != *v)
                    .map(|(k, _)| k)
                    .collect();
                fail(
                    fails,
                    format!("refused ({msg}) but changed parameters {changed:?}"),
                );
            }
            match opt.sweep_state() {
                Ok(s) => {
                    let after = state_bits(&s);
                    if after != state {
                        let keys: Vec<&String> = after
                            .keys()
                            .chain(state.keys())
                            .filter(|k| after.get(*k) != state.get(*k))
                            .collect();
                        fail(fails, format!("refused ({msg}) but changed state {keys:?}"));
                    }
                }
                Err(e2) => fail(
                    fails,
                    format!("refused ({msg}), then state_dict() failed: {e2}"),
                ),
            }
            let names_one = msg.contains(TARGET) || msg.contains(AUX);
            match (&e, g) {
                (Error::Candle(_), _) => fail(fails, format!("untyped error: {msg}")),
                (Error::NonFiniteGradient { param }, Grad::NaN | Grad::Inf) if param == TARGET => {}
                (_, Grad::NaN | Grad::Inf) if n_target > 0 => fail(
                    fails,
                    format!("NaN/Inf gradient: expected NonFiniteGradient {{ param: {TARGET} }}, got {e:?}"),
                ),
                (Error::Shape { who, .. }, Grad::WrongShape) if who == TARGET => {}
                (_, Grad::WrongShape) => fail(
                    fails,
                    format!("wrong shape: expected Shape {{ who: {TARGET} }}, got {e:?}"),
                ),
                _ if !names_one => fail(fails, format!("the error names no parameter: {msg}")),
                _ => {}
            }
            false
        }
    }
}

/// Runs one case; failures go to `fails`.
fn run_case(case: &Case, make: Make, fails: &mut Vec<String>) -> Outcome {
    let m = model(case);
    let mut opt = match make(&m.vm) {
        Ok(o) => o,
        Err(e) => {
            check_refusal(case, &e, fails);
            return Outcome::Refused;
        }
    };
    // Warm-up: normal gradients (the target's only for generic values).
    let warm = if case.values == Values::Normal {
        Grad::Normal
    } else {
        Grad::Missing
    };
    let g0 = grads(&m, case, warm, case.seed.wrapping_add(1));
    checked_step(case, "warm-up step", &mut *opt, &m, &g0, warm, fails);
    let g1 = grads(&m, case, case.grad, case.seed.wrapping_add(2));
    if checked_step(case, "swept step", &mut *opt, &m, &g1, case.grad, fails) {
        Outcome::Stepped
    } else {
        Outcome::StepRefused
    }
}

/// Every case of the optimizers `opts`, each under `catch_unwind`; panics
/// if any case broke the contract, listing them all. `all_dtypes: false`
/// (the slower optimizers) runs each (shape, values, gradient) in f32 and
/// in one other dtype, rotating through f64, bf16 and f16.
fn sweep(opts: &[(&'static str, Make)], all_dtypes: bool) {
    let start = std::time::Instant::now();
    let mut fails = Vec::new();
    let mut outcomes: BTreeMap<(&str, Outcome), usize> = BTreeMap::new();
    let mut n = 0u64;
    for &(opt, make) in opts {
        for (si, &shape) in SHAPES.iter().enumerate() {
            for (di, &dtype) in DTYPES.iter().enumerate() {
                for values in values_for(shape) {
                    for (gi, &grad) in GRADS.iter().enumerate() {
                        if !(all_dtypes || di == 0 || di == 1 + (si + gi) % 3) {
                            continue;
                        }
                        n += 1;
                        let case = Case {
                            opt,
                            shape,
                            dtype,
                            values,
                            grad,
                            seed: 1000 + n,
                        };
                        let mut local = Vec::new();
                        let r =
                            catch_unwind(AssertUnwindSafe(|| run_case(&case, make, &mut local)));
                        fails.extend(local);
                        match r {
                            Ok(o) => *outcomes.entry((opt, o)).or_default() += 1,
                            Err(p) => {
                                let msg = p
                                    .downcast_ref::<String>()
                                    .cloned()
                                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                                    .unwrap_or_default();
                                fails.push(format!("{case}: PANIC: {msg}"));
                            }
                        }
                    }
                }
            }
        }
    }
    eprintln!(
        "{n} cases in {:.1} s: {outcomes:?}",
        start.elapsed().as_secs_f64()
    );
    if std::env::var_os("SWEEP_WHY").is_some() {
        WHY.with(|w| {
            for (k, n) in w.borrow().iter() {
                eprintln!("{n:5} {k}");
            }
        });
    }
    assert!(
        fails.is_empty(),
        "{} contract violations:\n{}",
        fails.len(),
        fails.join("\n")
    );
}

#[test]
fn sweep_adamw_sgd() {
    sweep(&OPTIMIZERS[0..4], true);
}

#[test]
fn sweep_muon() {
    sweep(&OPTIMIZERS[4..7], false);
}

#[test]
fn sweep_steepest_free() {
    sweep(&OPTIMIZERS[7..11], true);
}

#[test]
fn sweep_steepest_manifolds() {
    sweep(&OPTIMIZERS[11..17], false);
}

#[test]
fn sweep_wrappers() {
    sweep(&OPTIMIZERS[17..21], false);
}

#[test]
fn sweep_master_weights() {
    sweep(&OPTIMIZERS[21..], false);
}

// ---------------------------------------------------------------------------
// Gradient clipping.

/// `clip_grad_norm` over the swept shapes, dtypes and gradients: `Ok` ⇒
/// every gradient finite and the global norm (f64) at most `max_norm`
/// (rounding aside); `Err` ⇒ typed, naming the offending variable, and the
/// gradients unchanged; no panic.
#[test]
fn sweep_clip_grad_norm() {
    use steepest::clip::clip_grad_norm;
    let mut fails = Vec::new();
    let mut n = 0u64;
    for &shape in SHAPES {
        for &dtype in DTYPES {
            for &grad in GRADS {
                n += 1;
                let case = Case {
                    opt: "clip_grad_norm",
                    shape,
                    dtype,
                    values: Values::Normal,
                    grad,
                    seed: 90_000 + n,
                };
                let r = catch_unwind(AssertUnwindSafe(|| {
                    let m = model(&case);
                    let mut g = grads(&m, &case, grad, case.seed);
                    let vars: Vec<Var> = m.vars.iter().map(|(_, v)| v.clone()).collect();
                    let before: Vec<Option<Bits>> = vars
                        .iter()
                        .map(|v| g.get(v.as_tensor()).map(bits))
                        .collect();
                    match clip_grad_norm(&mut g, &vars, 1.0) {
                        Ok(norm) => {
                            let mut sq = 0.0;
                            for v in &vars {
                                if let Some(t) = g.get(v.as_tensor()) {
                                    let x = common::to_f64_vec(t);
                                    if x.iter().any(|x| !x.is_finite()) {
                                        fails.push(format!(
                                            "{case}: Ok ({norm}), a gradient is not finite"
                                        ));
                                    }
                                    sq += x.iter().map(|x| x * x).sum::<f64>();
                                }
                            }
                            if !norm.is_finite() || sq.sqrt() > 1.0 + 2e-2 {
                                fails.push(format!(
                                    "{case}: Ok, norm before {norm}, after {}",
                                    sq.sqrt()
                                ));
                            }
                            if matches!(grad, Grad::NaN | Grad::Inf)
                                && shape.iter().product::<usize>() > 0
                            {
                                fails.push(format!("{case}: a NaN/Inf gradient was clipped"));
                            }
                        }
                        Err(e) => {
                            let after: Vec<Option<Bits>> = vars
                                .iter()
                                .map(|v| g.get(v.as_tensor()).map(bits))
                                .collect();
                            if after != before {
                                fails.push(format!(
                                    "{case}: refused ({e}) but changed the gradients"
                                ));
                            }
                            if matches!(e, Error::Candle(_)) || e.who().is_none() {
                                fails.push(format!("{case}: untyped or anonymous error: {e:?}"));
                            }
                        }
                    }
                }));
                if r.is_err() {
                    fails.push(format!("{case}: PANIC"));
                }
            }
        }
    }
    assert!(
        fails.is_empty(),
        "{} of {n} clip cases broke the contract:\n{}",
        fails.len(),
        fails.join("\n")
    );
}

// ---------------------------------------------------------------------------
// The bugs the sweep found, fixed: one test each.

/// One step of a fresh `Steepest` (no momentum, no decay, rate 0.02) on a
/// 4×3 parameter of `dtype` from `w0` with gradient `scale·g0`, after
/// `warm` steps with `g0` (to put it on its manifold); returns `‖Δw‖_F`.
fn steepest_step_len(norm: Norm, manifold: Manifold, dtype: DType, warm: usize, scale: f64) -> f64 {
    let w0 = tensor(common::normal_vec(&mut common::rng(1), 12), &[4, 3], dtype);
    let var = Var::from_tensor(&w0).unwrap();
    let vm = VarMap::new();
    vm.data().lock().unwrap().insert("w".into(), var.clone());
    let cfg = SteepestConfig {
        lr: 0.02,
        momentum: 0.0,
        nesterov: false,
        norm,
        manifold,
        weight_decay: WeightDecay::None,
        ..Default::default()
    };
    let mut opt = Steepest::from_varmap(&vm, cfg).unwrap();
    let g0 = common::normal_vec(&mut common::rng(2), 12);
    for _ in 0..warm {
        let mut g = empty_grads();
        g.insert(var.as_tensor(), tensor(g0.clone(), &[4, 3], dtype));
        opt.try_step(&g).unwrap();
    }
    let before = common::to_f64_vec(var.as_tensor());
    let mut g = empty_grads();
    let scaled: Vec<f64> = g0.iter().map(|x| x * scale).collect();
    g.insert(var.as_tensor(), tensor(scaled, &[4, 3], dtype));
    opt.try_step(&g).unwrap();
    let after = common::to_f64_vec(var.as_tensor());
    before
        .iter()
        .zip(&after)
        .map(|(a, b)| (a - b) * (a - b))
        .sum::<f64>()
        .sqrt()
}

/// The Euclidean direction `g/‖g‖₂` (`Norm::Euclidean`, `Norm::Lp(2.0)`)
/// is scale-free, also in f32/bf16: `‖g‖₂` is computed from `g/max|g|`, as
/// `Σ g²` itself overflows f32 for max|g| ≳ 1e19 (the direction was 0, a
/// silent no-op step) and underflows for max|g| ≲ 1e-19 (a step of ~6e6
/// instead of η = 0.02). Gradients ×1e30 and ×1e-30 give the step of the
/// unscaled gradient: to 1e-6 relative in f32 and bf16 (whose parameters
/// round the step), and η = 0.02 to 1e-3 in f32.
#[test]
fn euclidean_step_length_does_not_depend_on_the_gradient_scale() {
    for dtype in [DType::F32, DType::BF16] {
        let one = steepest_step_len(Norm::Euclidean, Manifold::Free, dtype, 0, 1.0);
        if dtype == DType::F32 {
            assert!((one / 0.02 - 1.0).abs() < 1e-3, "f32: ‖Δw‖ = {one:e}");
        }
        for scale in [1e30, 1e-30] {
            let len = steepest_step_len(Norm::Euclidean, Manifold::Free, dtype, 0, scale);
            assert!(
                (len / one - 1.0).abs() < 1e-6,
                "{dtype:?}, gradient ×{scale:e}: ‖Δw‖ = {len:e}, unscaled {one:e}"
            );
        }
    }
}

/// The same in the manifolds' directions: the Euclidean sphere's tangent
/// direction (`euclidean_tangent`) and the Stiefel / spectral-sphere
/// normalisation `Ĝ = G·√k/‖G‖_F` (`normalise` in steepest/dual.rs) scale
/// by max|G| first. Before, a gradient with max|g| ≳ 1e19 in f32 gave
/// (almost) no step on the sphere or on the Stiefel manifold (‖Δw‖ ≈ 1e-7
/// instead of ≈ 0.02–0.03), and a 1e-30 one jumped a quarter turn on the
/// sphere (‖Δw‖ = 2.83 at radius 2). Now f32 at ×1e30 and ×1e-30 gives the
/// f64 step to 1e-4 relative.
#[test]
fn manifold_step_length_does_not_depend_on_the_gradient_scale() {
    let sphere = || (Norm::Euclidean, Manifold::Sphere { radius: 2.0 });
    let stiefel = || (spectral(), Manifold::Stiefel { transpose: false });
    for (what, make) in [
        ("sphere", &sphere as &dyn Fn() -> (Norm, Manifold)),
        ("stiefel", &stiefel),
    ] {
        let (n, m) = make();
        let reference = steepest_step_len(n, m, DType::F64, 1, 1e30);
        for scale in [1e30, 1e-30] {
            let (n, m) = make();
            let len = steepest_step_len(n, m, DType::F32, 1, scale);
            assert!(
                (len / reference - 1.0).abs() < 1e-4,
                "{what} f32, gradient ×{scale:e}: ‖Δw‖ = {len:e}, f64: {reference:e}"
            );
        }
    }
}

/// candle's other float dtypes (`F8E4M3`, and the `F6E2M3`, `F6E3M2`,
/// `F4`, `F8E8M0` formats: `DType::is_float()` is true for all of them) are
/// refused at construction with `Error::Config` naming the parameter and its
/// dtype (before, they were accepted, and every step was then refused by
/// the finite check with a `Device` error naming no parameter).
#[test]
fn an_unsupported_float_dtype_is_refused_at_construction() {
    let t = Tensor::ones((2, 2), DType::F32, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F8E4M3)
        .unwrap();
    let vm = VarMap::new();
    let v = Var::from_tensor(&t).unwrap();
    vm.data().lock().unwrap().insert("w".into(), v);
    let e = AdamW::from_varmap(&vm, AdamWConfig::default()).unwrap_err();
    assert!(matches!(e, Error::Config { .. }), "{e:?}");
    assert_eq!(e.who(), Some("w"), "{e}");
    assert!(e.to_string().contains("F8E4M3"), "{e}");
}
