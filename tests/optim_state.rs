//! Saving and loading optimizer state: bit-identical resume, and mismatched
//! checkpoints refused with a clear error and no change.

mod common;
mod support;

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device, Tensor};
use candle_nn::{Optimizer, VarMap};
use steepest::optim::{AdamW, AdamWConfig, Muon, MuonConfig, OptimizerState, Sgd, SgdConfig};
use steepest::{NewtonSchulz, WeightDecay};
use support::*;

fn adamw(vm: &VarMap) -> AdamW {
    AdamW::from_varmap(
        vm,
        AdamWConfig {
            lr: 0.01,
            weight_decay: WeightDecay::spectral(0.1),
            ..Default::default()
        },
    )
    .unwrap()
}

fn sgd(vm: &VarMap) -> Sgd {
    Sgd::from_varmap(
        vm,
        SgdConfig {
            lr: 0.05,
            momentum: 0.9,
            nesterov: true,
            weight_decay: WeightDecay::spectral(0.1),
            decay_vectors: true,
        },
    )
    .unwrap()
}

fn muon(vm: &VarMap) -> Muon {
    let cfg = MuonConfig {
        lr: 0.02,
        weight_decay: WeightDecay::Spectral {
            lambda: 0.1,
            iters: 2,
        },
        newton_schulz: NewtonSchulz::polar_express(6),
        adamw: AdamWConfig {
            lr: 0.005,
            ..Default::default()
        },
        adamw_names: vec!["embed".into()],
        ..Default::default()
    };
    Muon::from_varmap(vm, cfg).unwrap()
}

/// 6 uninterrupted steps vs 3 steps, save (params + optimizer state to files),
/// rebuild everything from the files, 3 more steps: identical bits.
fn resume_is_bit_identical<O: Optimizer + OptimizerState>(make: fn(&VarMap) -> O, dtype: DType) {
    let vm = model(dtype);
    let mut opt = make(&vm);
    for t in 0..6 {
        opt.backward_step(&loss(&vm, t, &[])).unwrap();
    }
    let straight = snapshot(&vm);

    // Tests run in parallel threads of one process: each call needs its own
    // directory, or one test removes the files another is about to read.
    static CALLS: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "steepest-resume-{}-{:?}-{}",
        std::process::id(),
        dtype,
        CALLS.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let vm = model(dtype);
    let mut opt = make(&vm);
    for t in 0..3 {
        opt.backward_step(&loss(&vm, t, &[])).unwrap();
    }
    vm.save(dir.join("params.safetensors")).unwrap();
    opt.save_state(dir.join("opt.safetensors")).unwrap();
    drop(opt);

    let mut vm = model(dtype);
    vm.load(dir.join("params.safetensors")).unwrap();
    let mut opt = make(&vm);
    opt.load_state(dir.join("opt.safetensors")).unwrap();
    for t in 3..6 {
        opt.backward_step(&loss(&vm, t, &[])).unwrap();
    }
    assert_eq!(
        snapshot(&vm),
        straight,
        "resumed run differs from the uninterrupted one"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn adamw_resume_is_bit_identical() {
    resume_is_bit_identical(adamw, DType::F32);
    resume_is_bit_identical(adamw, DType::BF16);
}

#[test]
fn sgd_resume_is_bit_identical() {
    resume_is_bit_identical(sgd, DType::F32);
}

#[test]
fn muon_resume_is_bit_identical() {
    resume_is_bit_identical(muon, DType::F32);
    resume_is_bit_identical(muon, DType::F16);
}

#[test]
fn state_holds_the_documented_slots_and_hyperparameters() {
    let vm = model(DType::BF16);
    let mut opt = muon(&vm);
    opt.backward_step(&loss(&vm, 0, &["gain"])).unwrap();
    let s = opt.state_dict().unwrap();
    assert_eq!(s["fc1.weight.momentum.buf"].dims(), &[6, 4]);
    assert_eq!(
        s["fc1.weight.momentum.buf"].dtype(),
        DType::F32,
        "half params keep f32 state"
    );
    assert_eq!(s["conv.weight.decay.v"].dims(), &[6]); // matrix view (4, 2·3)
    assert_eq!(s["embed.weight.adam.exp_avg"].dims(), &[9, 4]); // routed to AdamW by name
    assert_eq!(s["fc1.bias.adam.exp_avg_sq"].dims(), &[6]);
    assert_eq!(s["fc1.bias.adam.step"].to_scalar::<i64>().unwrap(), 1);
    assert!(
        !s.contains_key("gain.adam.exp_avg"),
        "a parameter without a gradient has no state"
    );
    assert!(!s.contains_key("embed.weight.momentum.buf"));
    let h = common::header(&s);
    assert_eq!(h["body"]["config"]["lr"].as_f64().unwrap(), 0.02);
    assert_eq!(
        h["body"]["config"]["newton_schulz"]["coefficients"]
            .as_array()
            .unwrap()
            .len(),
        6
    );
}

#[test]
fn loading_restores_hyperparameters() {
    let vm = model(DType::F32);
    let mut a = muon(&vm);
    a.set_learning_rate(0.5);
    let state = a.state_dict().unwrap();
    let mut b = muon(&vm);
    b.load_state_dict(&state).unwrap();
    assert_eq!(b.learning_rate(), 0.5);
    assert_eq!(b.config(), a.config());
}

/// The Newton–Schulz form is a hyperparameter like the others: a checkpoint
/// written in the Gram form brings it back, and resuming from it is exact.
#[test]
fn gram_form_is_saved_and_restored() {
    fn muon_gram(vm: &VarMap) -> Muon {
        let mut opt = muon(vm);
        let mut cfg = opt.config().clone();
        cfg.newton_schulz = cfg.newton_schulz.gram_form();
        opt = Muon::from_varmap(vm, cfg).unwrap();
        opt
    }
    let vm = model(DType::F32);
    let mut a = muon_gram(&vm);
    a.backward_step(&loss(&vm, 0, &[])).unwrap();
    let state = a.state_dict().unwrap();
    let h = common::header(&state);
    assert_eq!(
        h["body"]["config"]["newton_schulz"]["gram"]["restarts"],
        serde_json::json!([2, 4])
    );
    let mut b = muon(&vm);
    assert!(b.config().newton_schulz.gram().is_none());
    b.load_state_dict(&state).unwrap();
    assert_eq!(b.config().newton_schulz, a.config().newton_schulz);
    resume_is_bit_identical(muon_gram, DType::F32);
}

/// Loads `bad` into a stepped optimizer: must fail with `needle` in the message
/// and leave state and config exactly as they were.
fn refused<O: Optimizer + OptimizerState>(
    opt: &mut O,
    bad: &HashMap<String, Tensor>,
    needle: &str,
) {
    let before = state_snapshot(&opt.state_dict().unwrap());
    let lr = opt.learning_rate();
    let err = opt.load_state_dict(bad).unwrap_err().to_string();
    assert!(
        err.contains(needle),
        "error `{err}` should mention `{needle}`"
    );
    assert_eq!(
        state_snapshot(&opt.state_dict().unwrap()),
        before,
        "a refused load changed the state"
    );
    assert_eq!(opt.learning_rate(), lr);
}

#[test]
fn mismatched_checkpoints_are_refused_and_change_nothing() {
    let vm = model(DType::F32);
    let mut opt = adamw(&vm);
    for t in 0..2 {
        opt.backward_step(&loss(&vm, t, &[])).unwrap();
    }
    let good = opt.state_dict().unwrap();

    // Another optimizer's checkpoint.
    let other = muon(&model(DType::F32));
    refused(&mut opt, &other.state_dict().unwrap(), "muon");

    // Another model's parameter names.
    let small = VarMap::new();
    small
        .get(
            (2, 2),
            "other.weight",
            candle_nn::Init::Const(1.0),
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
    refused(
        &mut opt,
        &adamw(&small).state_dict().unwrap(),
        "other.weight",
    );

    // A slot with the wrong shape.
    let mut bad = good.clone();
    bad.insert(
        "fc1.weight.adam.exp_avg".into(),
        Tensor::zeros((4, 6), DType::F32, &Device::Cpu).unwrap(),
    );
    refused(&mut opt, &bad, "fc1.weight.adam.exp_avg");

    // A slot with the wrong dtype.
    let mut bad = good.clone();
    bad.insert(
        "fc1.weight.adam.exp_avg_sq".into(),
        Tensor::zeros((6, 4), DType::F64, &Device::Cpu).unwrap(),
    );
    refused(&mut opt, &bad, "F64");

    // A key that is no slot of this optimizer.
    let mut bad = good.clone();
    bad.insert(
        "fc1.weight.momentum.buf".into(),
        Tensor::zeros((6, 4), DType::F32, &Device::Cpu).unwrap(),
    );
    refused(&mut opt, &bad, "fc1.weight.momentum.buf");

    // A spectral v₁ on a vector.
    let mut bad = good.clone();
    bad.insert(
        "fc1.bias.decay.v".into(),
        Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap(),
    );
    refused(&mut opt, &bad, "fc1.bias.decay.v");

    // Not a steepest checkpoint at all; a missing hyperparameter.
    let mut bad = good.clone();
    bad.remove("__steepest__");
    refused(&mut opt, &bad, "not a steepest optimizer checkpoint");
    let bad = common::with_header(&good, |h| {
        h["body"]["config"].as_object_mut().unwrap().remove("beta2");
    });
    refused(&mut opt, &bad, "beta2");

    // The good one still loads.
    opt.load_state_dict(&good).unwrap();
}

#[test]
fn muon_checkpoint_with_other_routing_is_refused() {
    let vm = model(DType::F32);
    let mut a = muon(&vm);
    a.backward_step(&loss(&vm, 0, &[])).unwrap();
    let mut b = Muon::from_varmap(&vm, MuonConfig::default()).unwrap();
    b.backward_step(&loss(&vm, 0, &[])).unwrap();
    // b routes embed.weight to Muon (momentum), a to AdamW (exp_avg).
    refused(&mut b, &a.state_dict().unwrap(), "embed.weight");
}

#[test]
fn missing_file_is_an_error() {
    let vm = model(DType::F32);
    let mut opt = sgd(&vm);
    assert!(opt.load_state("/nonexistent/steepest.safetensors").is_err());
}

/// The live optimizer state holds no autograd graph: gradients from
/// `backward()` carry one, and state built from them as op outputs would
/// chain every past step together (unbounded memory). Every tensor field of
/// every parameter's live state (`Driver::state`, not `state_dict`, whose
/// copies are detached whatever the live state holds) is a variable, set in
/// place, or tracks no op. Muon (with its AdamW part), AdamW and SGD with
/// momentum, after three steps.
#[test]
fn state_tensors_carry_no_autograd_graph() {
    use steepest::optim::transform::FieldValue;
    let vm = model(DType::F32);
    let check = |driver: &steepest::optim::Driver, keys: Vec<String>| {
        let mut seen = 0;
        for key in keys.iter().filter(|k| !k.starts_with("__")) {
            // `<param>.<transform>.<field>`; parameter names hold dots too
            let mut parts = key.rsplitn(3, '.');
            let (_, transform, param) =
                (parts.next(), parts.next().unwrap(), parts.next().unwrap());
            let state = driver.state(param, transform).expect(key);
            for (field, value) in state.fields() {
                if let FieldValue::Tensor(t) = value {
                    assert!(
                        t.is_variable() || !t.track_op(),
                        "{param}.{transform}.{field} tracks an autograd op"
                    );
                    seen += 1;
                }
            }
        }
        assert!(seen > 0, "no tensor field checked");
    };
    let mut opt = muon(&vm);
    for t in 0..3 {
        opt.backward_step(&loss(&vm, t, &[])).unwrap();
    }
    check(
        opt.driver(),
        opt.state_dict().unwrap().into_keys().collect(),
    );
    let mut opt = adamw(&vm);
    let mut sgd = sgd(&vm);
    for t in 0..3 {
        opt.backward_step(&loss(&vm, t, &[])).unwrap();
        sgd.backward_step(&loss(&vm, t, &[])).unwrap();
    }
    check(
        opt.driver(),
        opt.state_dict().unwrap().into_keys().collect(),
    );
    check(
        sgd.driver(),
        sgd.state_dict().unwrap().into_keys().collect(),
    );
}
