//! Whole optimizer steps on two devices from the same parameters and the
//! same gradients: AdamW (decoupled, spectral), SGD with Nesterov momentum
//! and spectral decay, Muon (decoupled, spectral, Gram form). Used by
//! `tests/gpu_kernels.rs` (CPU vs CUDA); `tests/whole_steps_cpu.rs` runs the
//! same harness CPU vs CPU, where everything must agree bit for bit, so that
//! the harness itself is tested in every `cargo test`.
//!
//! Tolerances (CPU vs GPU, absolute, parameters of size ~1): the elementwise
//! kernels match the CPU to 1 ulp per step, so AdamW and SGD (with spectral
//! decay's power iteration differing at ~1e-6 relative) stay within 1e-5
//! over 5 steps. Muon adds msign, whose GPU and CPU results differ by at
//! most 2e-3 of its largest entry (the emulator tests' bound; ≤ 1) per
//! step: 5 steps × lr 0.02 × shape factor ≤ 2 × 2e-3 = 4e-4. A wrong
//! momentum or a missing update differs by ~lr·|msign| ≈ 4e-3 per step.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use steepest::optim::NamedVar;
use steepest::{
    AdamW, AdamWConfig, Muon, MuonConfig, NewtonSchulz, OptimizerState, Sgd, SgdConfig, WeightDecay,
};

use super::cases::*;

/// Parameter names and shapes: same-shape matrices (batched by Muon), wide,
/// tall and square ones, a vector, and an embedding (AdamW under Muon).
const PARAMS: [(&str, &[usize]); 7] = [
    ("h.0.qkv.weight", &[96, 32]),
    ("h.1.qkv.weight", &[96, 32]),
    ("h.0.fc.weight", &[128, 32]),
    ("h.0.proj.weight", &[32, 128]),
    ("h.0.attn.weight", &[32, 32]),
    ("h.0.ln.weight", &[32]),
    ("embed.weight", &[50, 32]),
];

pub const STEPS: usize = 5;

/// The optimizers compared, with the absolute tolerance on parameters.
pub fn cases() -> Vec<(&'static str, f64)> {
    vec![
        ("adamw", 1e-5),
        ("adamw-spectral", 1e-5),
        ("sgd-nesterov-spectral", 1e-5),
        ("muon", 5e-4),
        ("muon-spectral", 5e-4),
        ("muon-gram", 5e-4),
    ]
}

pub enum Opt {
    AdamW(AdamW),
    Sgd(Sgd),
    Muon(Muon),
}

impl Opt {
    fn step(&mut self, g: &GradStore) {
        match self {
            Opt::AdamW(o) => o.step(g),
            Opt::Sgd(o) => o.step(g),
            Opt::Muon(o) => o.step(g),
        }
        .unwrap()
    }

    fn state(&self) -> std::collections::HashMap<String, Tensor> {
        match self {
            Opt::AdamW(o) => o.state_dict(),
            Opt::Sgd(o) => o.state_dict(),
            Opt::Muon(o) => o.state_dict(),
        }
        .unwrap()
    }
}

fn build(name: &str, vars: Vec<NamedVar>) -> Opt {
    let adamw = |decay| AdamWConfig {
        lr: 3e-3,
        weight_decay: decay,
        ..AdamWConfig::default()
    };
    let muon = |decay, ns: NewtonSchulz| MuonConfig {
        lr: 0.02,
        weight_decay: decay,
        newton_schulz: ns,
        adamw: adamw(WeightDecay::Decoupled(0.1)),
        adamw_names: vec!["embed".into()],
        ..MuonConfig::default()
    };
    match name {
        "adamw" => Opt::AdamW(AdamW::from_named(vars, adamw(WeightDecay::Decoupled(0.1))).unwrap()),
        "adamw-spectral" => {
            Opt::AdamW(AdamW::from_named(vars, adamw(WeightDecay::spectral(0.1))).unwrap())
        }
        "sgd-nesterov-spectral" => Opt::Sgd(
            Sgd::from_named(
                vars,
                SgdConfig {
                    lr: 0.05,
                    momentum: 0.9,
                    nesterov: true,
                    weight_decay: WeightDecay::spectral(0.1),
                    decay_vectors: false,
                },
            )
            .unwrap(),
        ),
        "muon" => Opt::Muon(
            Muon::from_named(
                vars,
                muon(WeightDecay::Decoupled(0.1), NewtonSchulz::muon()),
            )
            .unwrap(),
        ),
        "muon-spectral" => Opt::Muon(
            Muon::from_named(vars, muon(WeightDecay::spectral(0.1), NewtonSchulz::muon())).unwrap(),
        ),
        "muon-gram" => Opt::Muon(
            Muon::from_named(
                vars,
                muon(
                    WeightDecay::Decoupled(0.1),
                    NewtonSchulz::muon().gram_form(),
                ),
            )
            .unwrap(),
        ),
        other => panic!("unknown case {other}"),
    }
}

/// The parameters on `dev`, values from a fixed seed (standard normal).
fn params(dev: &Device) -> Vec<NamedVar> {
    PARAMS
        .iter()
        .enumerate()
        .map(|(i, (name, shape))| {
            let t = randn(&mut rng(900 + i as u64), shape, DType::F32, &Device::Cpu);
            NamedVar {
                name: name.to_string(),
                var: Var::from_tensor(&t.to_device(dev).unwrap()).unwrap(),
            }
        })
        .collect()
}

/// The gradients of step `step` for `vars`, on their device.
fn grads(vars: &[NamedVar], step: usize) -> GradStore {
    let dev = vars[0].var.device().clone();
    let root = Tensor::zeros((), DType::F32, &dev).unwrap();
    let mut g = root.backward().unwrap();
    g.remove(&root);
    for (i, v) in vars.iter().enumerate() {
        let mut r = rng(10_000 + 100 * step as u64 + i as u64);
        let t = randn(&mut r, v.var.dims(), DType::F32, &Device::Cpu);
        g.insert(v.var.as_tensor(), t.to_device(&dev).unwrap());
    }
    g
}

/// Tensors by name, on the CPU.
type Named = Vec<(String, Tensor)>;

/// Runs case `name` for [`STEPS`] steps on `dev`; returns the parameters
/// and the state dict (sorted by key).
pub fn run(name: &str, dev: &Device) -> (Named, Named) {
    let vars = params(dev);
    let mut opt = build(name, vars.clone());
    for step in 0..STEPS {
        opt.step(&grads(&vars, step));
    }
    let cpu = |t: &Tensor| t.to_device(&Device::Cpu).unwrap();
    let ps = vars
        .iter()
        .map(|v| (v.name.clone(), cpu(v.var.as_tensor())))
        .collect();
    let mut st: Named = opt
        .state()
        .iter()
        .map(|(k, t)| (k.clone(), cpu(t)))
        .collect();
    st.sort_by(|a, b| a.0.cmp(&b.0));
    (ps, st)
}

/// Runs every case on `a` and `b` and compares parameters (absolute
/// tolerance of the case) and float state (the same tolerance, relative to
/// the entry's size where larger than 1). `exact`: every bit equal.
pub fn compare(a: &Device, b: &Device, exact: bool) {
    compare_runs(|name| run(name, a), |name| run(name, b), exact);
}

/// [`compare`] over two ways of running a case (e.g. one of them inside
/// `device::with_generic_ops`).
pub fn compare_runs(
    run_a: impl Fn(&str) -> (Named, Named),
    run_b: impl Fn(&str) -> (Named, Named),
    exact: bool,
) {
    for (name, tol) in cases() {
        let (pa, sa) = run_a(name);
        let (pb, sb) = run_b(name);
        for ((n, x), (_, y)) in pa.iter().zip(&pb) {
            if exact {
                assert_same_bits(&format!("{name}: {n}"), x, y);
            } else {
                let d = max_diff(x, y);
                assert!(
                    d <= tol,
                    "{name}: parameter {n}: max |Δ| = {d:e} (tolerance {tol:e})"
                );
            }
        }
        // The parameters moved (a step that does nothing would pass).
        for ((n, x), v) in pa.iter().zip(&params(&Device::Cpu)) {
            assert!(
                max_diff(x, v.var.as_tensor()) > 1e-4,
                "{name}: {n} did not move"
            );
        }
        assert_eq!(
            sa.iter().map(|s| &s.0).collect::<Vec<_>>(),
            sb.iter().map(|s| &s.0).collect::<Vec<_>>(),
            "{name}: state keys"
        );
        for ((k, x), (_, y)) in sa.iter().zip(&sb) {
            if !x.dtype().is_float() || x.elem_count() == 0 {
                continue;
            }
            if exact {
                assert_same_bits(&format!("{name}: state {k}"), x, y);
            } else {
                let d = max_diff(x, y);
                let scale = max_abs(x).max(1.0);
                assert!(
                    d <= tol * scale,
                    "{name}: state {k}: max |Δ| = {d:e} (tolerance {:e})",
                    tol * scale
                );
            }
        }
    }
}
