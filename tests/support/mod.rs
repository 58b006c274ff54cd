//! A small named-parameter model shared by the optimizer tests.
#![allow(dead_code)]

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;

/// Parameter names and shapes: two same-shape matrices (one Muon batch), a
/// wide and a tall matrix, 1×n and n×1 matrices, a rank-3 tensor, a bias, a
/// scalar and an "embed" matrix (routed to AdamW by name in the Muon tests).
pub const PARAMS: [(&str, &[usize]); 9] = [
    ("fc1.weight", &[6, 4]),
    ("fc2.weight", &[6, 4]),
    ("wide.weight", &[3, 7]),
    ("row.weight", &[1, 5]),
    ("col.weight", &[5, 1]),
    ("conv.weight", &[4, 2, 3]),
    ("fc1.bias", &[6]),
    ("gain", &[]),
    ("embed.weight", &[9, 4]),
];

/// Deterministic pseudo-random values in [-1, 1).
pub fn values(seed: u64, n: usize) -> Vec<f64> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        })
        .collect()
}

/// A fresh `VarMap` holding `PARAMS` with fixed initial values.
pub fn model(dtype: DType) -> VarMap {
    let vm = VarMap::new();
    {
        let mut data = vm.data().lock().unwrap();
        for (i, (name, shape)) in PARAMS.iter().enumerate() {
            let n = shape.iter().product::<usize>();
            let t = Tensor::from_vec(values(i as u64, n), *shape, &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            data.insert(name.to_string(), Var::from_tensor(&t).unwrap());
        }
    }
    vm
}

pub fn var(vm: &VarMap, name: &str) -> Var {
    vm.data().lock().unwrap()[name].clone()
}

/// A nonlinear loss coupling each parameter with step-dependent targets:
/// `Σ_p mean((p ⊙ p − t_p)²) + mean(p ⊙ s_p)`.
pub fn loss(vm: &VarMap, step: u64, skip: &[&str]) -> Tensor {
    let mut total = Tensor::new(0f32, &Device::Cpu).unwrap();
    for (i, (name, shape)) in PARAMS.iter().enumerate() {
        if skip.contains(name) {
            continue;
        }
        let p = var(vm, name).as_tensor().to_dtype(DType::F32).unwrap();
        let n = shape.iter().product::<usize>();
        let t = Tensor::from_vec(values(100 + i as u64, n), *shape, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let s = Tensor::from_vec(values(1000 * step + i as u64, n), *shape, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let term = ((&p * &p).unwrap() - t)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap();
        let lin = (&p * s).unwrap().mean_all().unwrap();
        total = ((total + term).unwrap() + lin).unwrap();
    }
    total
}

/// All parameter values, by name (for bitwise comparisons).
pub fn snapshot(vm: &VarMap) -> HashMap<String, Vec<f64>> {
    vm.data()
        .lock()
        .unwrap()
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                v.as_tensor()
                    .to_dtype(DType::F64)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap(),
            )
        })
        .collect()
}

/// A state dict's tensors as f64 vectors plus dtypes and shapes, for bitwise comparisons.
pub fn state_snapshot(
    state: &HashMap<String, Tensor>,
) -> HashMap<String, (Vec<usize>, DType, Vec<f64>)> {
    state
        .iter()
        .map(|(k, t)| {
            let v = t.to_dtype(DType::F64).unwrap();
            (
                k.clone(),
                (
                    t.dims().to_vec(),
                    t.dtype(),
                    v.flatten_all().unwrap().to_vec1::<f64>().unwrap(),
                ),
            )
        })
        .collect()
}

/// A fresh `VarMap` holding `params` (name, shape) in `dtype`, with fixed
/// pseudo-random initial values (`values(seed + i, ..)` for the `i`-th).
pub fn model_of(params: &[(&str, &[usize])], dtype: DType, seed: u64) -> VarMap {
    let vm = VarMap::new();
    {
        let mut data = vm.data().lock().unwrap();
        for (i, (name, shape)) in params.iter().enumerate() {
            let n = shape.iter().product::<usize>();
            let t = Tensor::from_vec(values(seed + i as u64, n), *shape, &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            data.insert(name.to_string(), Var::from_tensor(&t).unwrap());
        }
    }
    vm
}

/// [`loss`] over an arbitrary parameter list: `Σ_p mean((p ⊙ p − t_p)²) +
/// mean(p ⊙ s_p)`, the targets `t_p` fixed and the tilts `s_p` changing
/// with `step`.
pub fn loss_of(vm: &VarMap, params: &[(&str, &[usize])], step: u64) -> Tensor {
    let mut total = Tensor::new(0f32, &Device::Cpu).unwrap();
    for (i, (name, shape)) in params.iter().enumerate() {
        let p = var(vm, name).as_tensor().to_dtype(DType::F32).unwrap();
        let n = shape.iter().product::<usize>();
        let t = Tensor::from_vec(values(100 + i as u64, n), *shape, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let s = Tensor::from_vec(values(1000 * step + i as u64, n), *shape, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let term = ((&p * &p).unwrap() - t)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap();
        let lin = (&p * s).unwrap().mean_all().unwrap();
        total = ((total + term).unwrap() + lin).unwrap();
    }
    total
}

/// A state dict without its header (`__steepest__`), as f64 snapshots: the
/// per-parameter state only, comparable between optimizers of other kinds.
pub fn state_tensors(
    state: &HashMap<String, Tensor>,
) -> HashMap<String, (Vec<usize>, DType, Vec<f64>)> {
    let mut s = state_snapshot(state);
    s.remove("__steepest__");
    s
}

/// The gradients of [`loss_of`] at `step`, with the middle entry of `name`'s
/// gradient replaced by `bad` (NaN or ±Inf).
pub fn grads_with(
    vm: &VarMap,
    params: &[(&str, &[usize])],
    step: u64,
    name: &str,
    bad: f64,
) -> candle_core::backprop::GradStore {
    let mut grads = loss_of(vm, params, step).backward().unwrap();
    let v = var(vm, name);
    let g = grads.get(v.as_tensor()).unwrap();
    let mut vals = g
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let mid = vals.len() / 2;
    vals[mid] = bad;
    let g = Tensor::from_vec(vals, v.shape(), &Device::Cpu)
        .unwrap()
        .to_dtype(v.dtype())
        .unwrap();
    grads.insert(v.as_tensor(), g);
    grads
}

/// A fresh, empty directory under the system temp dir, unique per call
/// (tests run in parallel threads of one process).
pub fn temp_dir(tag: &str) -> std::path::PathBuf {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "steepest-{tag}-{}-{}",
        std::process::id(),
        CALLS.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::remove_dir_all(&dir).ok();
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// An optimizer under test, behind one object type: a step from a loss or
/// from given gradients, and its state dict.
pub trait Stepper {
    fn step_loss(&mut self, loss: &Tensor) -> candle_core::Result<()>;
    fn step_grads(&mut self, grads: &candle_core::backprop::GradStore) -> candle_core::Result<()>;
    fn state(&self) -> HashMap<String, Tensor>;
}

impl<O: candle_nn::Optimizer + steepest::optim::OptimizerState> Stepper for O {
    fn step_loss(&mut self, loss: &Tensor) -> candle_core::Result<()> {
        self.backward_step(loss)
    }
    fn step_grads(&mut self, grads: &candle_core::backprop::GradStore) -> candle_core::Result<()> {
        self.step(grads)
    }
    fn state(&self) -> HashMap<String, Tensor> {
        self.state_dict().unwrap()
    }
}

/// A user transform that fails on the member named `target` while `now` is
/// set, declaring `fallible()` or not (an undeclared failure comes after
/// the step's first write).
#[derive(Clone, Debug)]
pub struct FailOn {
    pub target: &'static str,
    pub now: std::sync::Arc<std::sync::atomic::AtomicBool>,
    pub declared: bool,
}

impl steepest::optim::transform::Transform for FailOn {
    fn kind(&self) -> &'static str {
        "fail_on"
    }
    fn hparams(&self) -> steepest::serde_json::Value {
        steepest::serde_json::Value::Null
    }
    fn set_hparams(&mut self, _: &steepest::serde_json::Value) -> steepest::Result<()> {
        Ok(())
    }
    fn fallible(&self) -> bool {
        self.declared
    }
    fn apply(
        &self,
        step: &mut steepest::optim::transform::GroupStep<'_>,
        _: &mut [Option<Box<dyn steepest::optim::transform::TransformState>>],
        _: bool,
    ) -> steepest::Result<()> {
        let hit = (0..step.len()).any(|i| step.info(i).name == self.target);
        if hit && self.now.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(steepest::Error::numerical(self.target, "told to fail"));
        }
        Ok(())
    }
    fn boxed(&self) -> Box<dyn steepest::optim::transform::Transform> {
        Box::new(self.clone())
    }
}

/// Muon with spectral decay (λ = 0.1) on `vm`, "embed" routed to AdamW.
pub fn spectral_muon(vm: &VarMap) -> steepest::Muon {
    steepest::Muon::from_varmap(
        vm,
        steepest::MuonConfig {
            weight_decay: steepest::WeightDecay::spectral(0.1),
            adamw_names: vec!["embed".into()],
            ..Default::default()
        },
    )
    .unwrap()
}

/// AdamW with spectral decay (λ = 0.1) on `vm`.
pub fn spectral_adamw(vm: &VarMap) -> steepest::AdamW {
    steepest::AdamW::from_varmap(
        vm,
        steepest::AdamWConfig {
            weight_decay: steepest::WeightDecay::spectral(0.1),
            ..Default::default()
        },
    )
    .unwrap()
}

/// A `Steepest` config at rate 0.02 with decoupled decay 0.1, on this norm
/// and manifold (the sweeps' common case).
pub fn steepest_cfg(
    norm: steepest::Norm,
    manifold: steepest::Manifold,
) -> steepest::SteepestConfig {
    steepest::SteepestConfig {
        lr: 0.02,
        norm,
        manifold,
        weight_decay: steepest::WeightDecay::Decoupled(0.1),
        ..Default::default()
    }
}

/// The spectral norm with Keller Jordan's Newton–Schulz table.
pub fn spectral() -> steepest::Norm {
    steepest::Norm::Spectral(steepest::NewtonSchulz::muon())
}
