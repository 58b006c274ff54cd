//! This crate's AdamW and SGD as drop-in replacements for candle-nn's: the
//! same hyperparameters give the same trajectory (candle-nn's optimizers,
//! written as plain tensor expressions, are the independent computation),
//! and our defaults that differ from candle-nn's are visible.

mod support;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Optimizer, ParamsAdamW, VarMap};
use steepest::{AdamW, AdamWConfig, Sgd, SgdConfig, WeightDecay};
use support::*;

const STEPS: u64 = 20;

/// Runs `STEPS` steps of `opt` on `vm` with the shared test loss.
fn train(vm: &VarMap, opt: &mut impl Optimizer) {
    for t in 0..STEPS {
        opt.backward_step(&loss(vm, t, &[])).unwrap();
    }
}

/// The largest difference between the two models' parameters, relative to
/// the largest total movement of a parameter from its start (so a pure
/// rounding difference reads ~1e-6 and a different update rule reads ≳ 1e-2).
fn relative_gap(a: &VarMap, b: &VarMap, start: &VarMap) -> f64 {
    let (a, b, s) = (snapshot(a), snapshot(b), snapshot(start));
    let mut gap = 0f64;
    let mut moved = 0f64;
    for (name, va) in &a {
        for ((x, y), x0) in va.iter().zip(&b[name]).zip(&s[name]) {
            gap = gap.max((x - y).abs());
            moved = moved.max((x - x0).abs());
        }
    }
    assert!(moved > 1e-3, "the parameters hardly moved ({moved})");
    gap / moved
}

fn candle_adamw(vm: &VarMap, params: ParamsAdamW) -> candle_nn::AdamW {
    candle_nn::AdamW::new(vm.all_vars(), params).unwrap()
}

#[test]
fn adamw_follows_candle_nn_adamw_with_the_same_hyperparameters() {
    let params = ParamsAdamW {
        lr: 0.01,
        beta1: 0.8,
        beta2: 0.99,
        eps: 1e-6,
        weight_decay: 0.1,
    };
    let (theirs, ours, start) = (model(DType::F32), model(DType::F32), model(DType::F32));
    train(&theirs, &mut candle_adamw(&theirs, params.clone()));
    let config = AdamWConfig {
        lr: params.lr,
        beta1: params.beta1,
        beta2: params.beta2,
        eps: params.eps,
        weight_decay: WeightDecay::Decoupled(params.weight_decay),
        decay_vectors: true, // candle-nn decays every parameter
    };
    train(
        &ours,
        &mut AdamW::from_varmap(&ours, config.clone()).unwrap(),
    );
    let gap = relative_gap(&theirs, &ours, &start);
    assert!(
        gap < 1e-5,
        "AdamW vs candle-nn AdamW: relative gap {gap:.3e}"
    );

    // Our default decays matrices only: on this model (biases, a scalar
    // gain) that is a different trajectory, well outside rounding.
    let matrices_only = model(DType::F32);
    let config = AdamWConfig {
        decay_vectors: false,
        ..config
    };
    train(
        &matrices_only,
        &mut AdamW::from_varmap(&matrices_only, config).unwrap(),
    );
    let gap = relative_gap(&theirs, &matrices_only, &start);
    assert!(gap > 1e-3, "decaying vectors should matter: gap {gap:.3e}");
}

#[test]
fn adamw_follows_candle_nn_adamw_in_f64() {
    let params = ParamsAdamW {
        lr: 0.01,
        ..ParamsAdamW::default()
    };
    let (theirs, ours, start) = (model(DType::F64), model(DType::F64), model(DType::F64));
    train(&theirs, &mut candle_adamw(&theirs, params.clone()));
    let config = AdamWConfig {
        lr: params.lr,
        weight_decay: WeightDecay::Decoupled(params.weight_decay),
        decay_vectors: true,
        ..AdamWConfig::default()
    };
    train(&ours, &mut AdamW::from_varmap(&ours, config).unwrap());
    let gap = relative_gap(&theirs, &ours, &start);
    assert!(
        gap < 1e-12,
        "f64 AdamW vs candle-nn AdamW: relative gap {gap:.3e}"
    );
}

#[test]
fn sgd_follows_candle_nn_sgd() {
    let (theirs, ours, start) = (model(DType::F32), model(DType::F32), model(DType::F32));
    train(
        &theirs,
        &mut candle_nn::SGD::new(theirs.all_vars(), 0.05).unwrap(),
    );
    let config = SgdConfig {
        lr: 0.05,
        ..SgdConfig::default() // no momentum, no decay: candle-nn's SGD
    };
    train(&ours, &mut Sgd::from_varmap(&ours, config).unwrap());
    // Both compute `w − g·lr` with `lr` rounded to f32: the same bits.
    let gap = relative_gap(&theirs, &ours, &start);
    assert_eq!(gap, 0.0, "SGD vs candle-nn SGD: relative gap {gap:.3e}");
}

/// bf16 parameters: our SGD computes `w − lr·g` in f32 and rounds once to
/// bf16, so each new weight is the bf16 nearest the exact value
/// `w − lr·g`; candle-nn computes in bf16 (`g·lr` rounded, then the
/// difference rounded), which is not always: where `lr·g` is comparable to
/// `w` the two differ (what README's "Coming from candle-nn" says), ours the
/// closer to exact. On 4096 weights `w ~ N(0, 1)` with the gradient of
/// `Σ w ⊙ c`, `c ~ 10·N(0, 1)`, `lr = 0.05`.
#[test]
fn sgd_on_bf16_rounds_once_where_candle_nn_rounds_each_operation() {
    let lr = 0.05;
    let n = 4096;
    let w0: Vec<f64> = values(1, n);
    let c: Vec<f64> = values(2, n).iter().map(|v| 10.0 * v).collect();
    let c = Tensor::from_vec(c, n, &Device::Cpu).unwrap();
    let c = c.to_dtype(DType::F32).unwrap();
    let new_var = || {
        let w = Tensor::from_vec(w0.clone(), n, &Device::Cpu).unwrap();
        Var::from_tensor(&w.to_dtype(DType::BF16).unwrap()).unwrap()
    };
    let loss = |w: &Var| {
        (w.as_tensor().to_dtype(DType::F32).unwrap() * &c)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let (theirs, ours) = (new_var(), new_var());
    let start = to_f64(ours.as_tensor());
    let grads = loss(&ours).backward().unwrap();
    let g = to_f64(grads.get(ours.as_tensor()).unwrap());
    candle_nn::SGD::new(vec![theirs.clone()], lr)
        .unwrap()
        .step(&grads_for(&theirs, &grads, &ours))
        .unwrap();
    let config = SgdConfig {
        lr,
        ..SgdConfig::default()
    };
    Sgd::new(vec![ours.clone()], config)
        .unwrap()
        .step(&grads)
        .unwrap();
    let (theirs, ours) = (to_f64(theirs.as_tensor()), to_f64(ours.as_tensor()));
    let (mut differ, mut err_ours, mut err_theirs) = (0, 0f64, 0f64);
    for i in 0..n {
        let exact = start[i] - lr * g[i];
        let nearest = half::bf16::from_f64(exact).to_f64();
        assert_eq!(ours[i], nearest, "[{i}]: w {}, g {}", start[i], g[i]);
        differ += usize::from(theirs[i] != nearest);
        err_ours += (ours[i] - exact).abs();
        err_theirs += (theirs[i] - exact).abs();
    }
    eprintln!(
        "{differ} of {n} candle-nn weights not the nearest bf16; |error| sums {err_ours:.3e} vs {err_theirs:.3e}"
    );
    assert!(differ > 0, "candle-nn's bf16 SGD rounded once too");
    assert!(err_ours < err_theirs);
}

fn to_f64(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap()
}

/// `grads` (of `ours`) as the gradients of `theirs`, which holds the same
/// values: a GradStore is keyed by tensor.
fn grads_for(theirs: &Var, grads: &GradStore, ours: &Var) -> GradStore {
    let loss = theirs.as_tensor().sum_all().unwrap();
    let mut store = loss.backward().unwrap();
    store.insert(
        theirs.as_tensor(),
        grads.get(ours.as_tensor()).unwrap().clone(),
    );
    store
}
