//! Learning-rate schedules: values at known steps (hand-computed closed
//! forms), composition with warmup, argument checks, and the driver.

use candle_core::{Device, Tensor, Var};
use candle_nn::Optimizer;
use steepest::optim::{Sgd, SgdConfig};
use steepest::schedule::{DecayShape, Schedule, Scheduled};
use steepest::WeightDecay;

fn close(a: f64, b: f64) {
    assert!((a - b).abs() <= 1e-12 * (1.0 + b.abs()), "{a} vs {b}");
}

#[test]
fn constant_and_linear_warmup() {
    let c = Schedule::constant(0.1).unwrap();
    for s in [0, 1, 7, 100_000] {
        close(c.lr(s), 0.1);
    }
    let w = Schedule::linear_warmup(1.0, 4).unwrap();
    let expect = [0.25, 0.5, 0.75, 1.0, 1.0, 1.0];
    for (s, e) in expect.iter().enumerate() {
        close(w.lr(s), *e);
    }
    assert_eq!(w.rates(3), vec![0.25, 0.5, 0.75]);
}

#[test]
fn cosine_values() {
    let c = Schedule::cosine(1.0, 0.1, 4).unwrap();
    let pi = std::f64::consts::PI;
    close(c.lr(0), 1.0);
    close(c.lr(1), 0.1 + 0.9 * (1.0 + (pi / 4.0).cos()) / 2.0);
    close(c.lr(2), 0.55);
    close(c.lr(3), 0.1 + 0.9 * (1.0 + (3.0 * pi / 4.0).cos()) / 2.0);
    close(c.lr(4), 0.1);
    close(c.lr(40), 0.1);
}

#[test]
fn wsd_shapes() {
    let lin = Schedule::wsd(1.0, 0.0, 10, 4, DecayShape::Linear).unwrap();
    for s in 0..=10 {
        close(lin.lr(s), 1.0);
    }
    close(lin.lr(11), 0.75);
    close(lin.lr(12), 0.5);
    close(lin.lr(13), 0.25);
    close(lin.lr(14), 0.0);
    close(lin.lr(99), 0.0);

    let cos = Schedule::wsd(2.0, 0.0, 0, 4, DecayShape::Cosine).unwrap();
    close(cos.lr(0), 2.0);
    close(cos.lr(2), 1.0); // (1 + cos(π/2))/2 = 1/2
    close(cos.lr(1), 1.0 + std::f64::consts::FRAC_1_SQRT_2);

    let sq = Schedule::wsd(1.0, 0.2, 5, 4, DecayShape::OneMinusSqrt).unwrap();
    close(sq.lr(6), 0.2 + 0.8 * 0.5); // 1 − √(1/4)
    close(sq.lr(8), 0.2 + 0.8 * (1.0 - 0.75f64.sqrt()));
    close(sq.lr(9), 0.2);

    // Warmup in front shifts the whole schedule.
    let wl = Schedule::wsd(1.0, 0.0, 10, 4, DecayShape::Linear)
        .unwrap()
        .with_warmup(2)
        .unwrap();
    close(wl.lr(0), 0.5);
    close(wl.lr(1), 1.0);
    close(wl.lr(12), 1.0);
    close(wl.lr(13), 0.75);
    close(wl.lr(16), 0.0);
    // with_warmup(0) is the identity.
    let same = Schedule::cosine(1.0, 0.0, 9).unwrap();
    assert_eq!(same.clone().with_warmup(0).unwrap(), same);
}

#[test]
fn inverse_sqrt_and_last_iterate_optimal() {
    let s = Schedule::inverse_sqrt(2.0).unwrap();
    close(s.lr(0), 2.0);
    close(s.lr(3), 1.0);
    close(s.lr(15), 0.5);
    let o = Schedule::last_iterate_optimal(2.0, 3.0, 100).unwrap();
    let expect = 2.0 / (3.0 * (100.0 * (2.0 + 100f64.ln())).sqrt());
    close(o.lr(0), expect);
    close(o.lr(99), expect);
    // warmup to it
    let ow = o.with_warmup(2).unwrap();
    close(ow.lr(0), expect / 2.0);
}

#[test]
fn bad_arguments_are_named() {
    let e = Schedule::constant(-1.0).unwrap_err().to_string();
    assert!(e.contains("Schedule::constant: lr"), "{e}");
    assert!(Schedule::constant(f64::NAN).is_err());
    let e = Schedule::cosine(1.0, 0.0, 0).unwrap_err().to_string();
    assert!(e.contains("steps"), "{e}");
    let e = Schedule::wsd(1.0, 0.0, 3, 0, DecayShape::Linear)
        .unwrap_err()
        .to_string();
    assert!(e.contains("decay"), "{e}");
    assert!(Schedule::inverse_sqrt(f64::INFINITY).is_err());
    assert!(Schedule::last_iterate_optimal(0.0, 1.0, 10).is_err());
    // The error names the function called, then the one that refused.
    let e = Schedule::last_iterate_optimal(1.0, 1.0, 0).unwrap_err();
    assert!(
        matches!(&e, steepest::Error::Config { who, what }
            if who == "Schedule::last_iterate_optimal" && what.contains("total_steps")),
        "{e:?}"
    );
}

/// The driver sets each step's rate: on the linear loss `⟨a, w⟩` plain SGD
/// moves `w` by exactly `−η(s)·a` at step `s`.
#[test]
fn scheduled_drives_set_learning_rate() {
    let w = Var::from_vec(vec![0.0f64, 0.0], 2, &Device::Cpu).unwrap();
    let a = Tensor::new(&[1.0f64, -2.0], &Device::Cpu).unwrap();
    let opt = Sgd::new(
        vec![w.clone()],
        SgdConfig {
            lr: 123.0,
            weight_decay: WeightDecay::None,
            ..Default::default()
        },
    )
    .unwrap();
    let sched = Schedule::linear_warmup(0.5, 3).unwrap();
    let mut drv = Scheduled::new(opt, sched.clone());
    let mut expect = [0.0f64, 0.0];
    for s in 0..5 {
        close(drv.next_lr(), sched.lr(s));
        let loss = (w.as_tensor() * &a).unwrap().sum_all().unwrap();
        drv.backward_step(&loss).unwrap();
        expect[0] -= sched.lr(s);
        expect[1] += 2.0 * sched.lr(s);
        let got = w.as_tensor().to_vec1::<f64>().unwrap();
        close(got[0], expect[0]);
        close(got[1], expect[1]);
        assert_eq!(drv.current_step(), s + 1);
        close(drv.inner().learning_rate(), sched.lr(s));
    }
    // A failing step (NaN gradient) changes nothing and does not advance.
    let before = w.as_tensor().to_vec1::<f64>().unwrap();
    let nan = (w.as_tensor() * f64::NAN).unwrap().sum_all().unwrap();
    assert!(drv.backward_step(&nan).is_err());
    assert_eq!(drv.current_step(), 5);
    assert_eq!(w.as_tensor().to_vec1::<f64>().unwrap(), before);
}

/// A refused step (NaN gradient), through `step` or `try_step`, puts the
/// inner optimizer's learning rate back to the one it held (the rate of the
/// last step taken, not the schedule's next rate, which differs under a
/// cosine schedule), and a checkpoint taken at step 0 loads (0 is a valid
/// step counter).
#[test]
fn a_refused_step_restores_the_rate_and_step_zero_loads() {
    use steepest::optim::OptimizerState;
    let w = Var::from_vec(vec![0.5f64, -1.0], 2, &Device::Cpu).unwrap();
    let sgd = |w: &Var| {
        Sgd::new(
            vec![w.clone()],
            SgdConfig {
                lr: 123.0,
                weight_decay: WeightDecay::None,
                ..Default::default()
            },
        )
        .unwrap()
    };
    let sched = Schedule::cosine(0.4, 0.0, 4).unwrap();
    assert_ne!(sched.lr(0), sched.lr(1));
    let mut drv = Scheduled::new(sgd(&w), sched.clone());
    // Step 0 saved before any step, loaded into a fresh driver.
    let at_zero = drv.state_dict().unwrap();
    let mut fresh = Scheduled::new(sgd(&w), sched.clone());
    fresh.set_step(3);
    fresh.load_state_dict(&at_zero).unwrap();
    assert_eq!(fresh.current_step(), 0);
    let loss = w.as_tensor().sqr().unwrap().sum_all().unwrap();
    drv.backward_step(&loss).unwrap();
    close(drv.inner().learning_rate(), sched.lr(0));
    let nan = (w.as_tensor() * f64::NAN).unwrap().sum_all().unwrap();
    assert!(drv.backward_step(&nan).is_err());
    close(drv.inner().learning_rate(), sched.lr(0));
    let grads = nan.backward().unwrap();
    assert!(matches!(
        drv.try_step(&grads),
        Err(steepest::Error::NonFiniteGradient { .. })
    ));
    close(drv.inner().learning_rate(), sched.lr(0));
    assert_eq!(drv.current_step(), 1);
}

/// A scheduled optimizer's checkpoint carries the step counter: 3 steps,
/// state_dict, a fresh optimizer loads it and continues the schedule with the
/// same rates (and bits) as an uninterrupted run. A checkpoint without the
/// counter is refused and changes nothing.
#[test]
fn scheduled_state_resumes_the_schedule() {
    use steepest::optim::OptimizerState;
    use steepest::schedule::SCHEDULE_STEP_KEY;
    let sched = Schedule::cosine(0.3, 0.01, 6)
        .unwrap()
        .with_warmup(2)
        .unwrap();
    let a = Tensor::new(&[1.0f64, -2.0, 0.5], &Device::Cpu).unwrap();
    let make = |w: &Var| {
        let opt = Sgd::new(
            vec![w.clone()],
            SgdConfig {
                lr: 1.0,
                momentum: 0.9,
                weight_decay: WeightDecay::None,
                ..Default::default()
            },
        )
        .unwrap();
        Scheduled::new(opt, sched.clone())
    };
    // Loss Σ a·w² (gradient depends on w, so the momentum state matters).
    let step = |drv: &mut Scheduled<Sgd>, w: &Var| {
        let loss = (w.as_tensor().sqr().unwrap() * &a)
            .unwrap()
            .sum_all()
            .unwrap();
        drv.backward_step(&loss).unwrap();
    };
    let init = [0.7f64, -0.3, 1.1];
    let w = Var::from_slice(&init, 3, &Device::Cpu).unwrap();
    let mut drv = make(&w);
    for _ in 0..8 {
        step(&mut drv, &w);
    }
    let straight = w.as_tensor().to_vec1::<f64>().unwrap();

    let w = Var::from_slice(&init, 3, &Device::Cpu).unwrap();
    let mut drv = make(&w);
    for _ in 0..3 {
        step(&mut drv, &w);
    }
    let state = drv.state_dict().unwrap();
    assert_eq!(state[SCHEDULE_STEP_KEY].to_scalar::<i64>().unwrap(), 3);
    let w2 = Var::from_tensor(w.as_tensor()).unwrap();
    let mut resumed = make(&w2);
    let mut no_counter = state.clone();
    no_counter.remove(SCHEDULE_STEP_KEY);
    assert!(resumed.load_state_dict(&no_counter).is_err());
    assert_eq!(
        resumed.current_step(),
        0,
        "a refused checkpoint changes nothing"
    );
    resumed.load_state_dict(&state).unwrap();
    assert_eq!(resumed.current_step(), 3);
    close(resumed.next_lr(), sched.lr(3));
    for _ in 3..8 {
        step(&mut resumed, &w2);
    }
    assert_eq!(w2.as_tensor().to_vec1::<f64>().unwrap(), straight);
}

/// Two parameters (a weight and a bias) and an AdamW over them, with a
/// quadratic loss `1.5·Σ w²` (state that depends on the steps).
mod mixing {
    use std::collections::BTreeMap;

    use candle_core::{Device, Tensor, Var};
    use candle_nn::Optimizer;
    use steepest::optim::{AdamW, AdamWConfig, NamedVar, OptimizerState};

    pub fn vars(shift: f64) -> Vec<NamedVar> {
        let w: Vec<f64> = (0..6).map(|i| 0.3 * i as f64 - 0.7 + shift).collect();
        vec![
            NamedVar {
                name: "fc.weight".into(),
                var: Var::from_slice(&w, (3, 2), &Device::Cpu).unwrap(),
            },
            NamedVar {
                name: "fc.bias".into(),
                var: Var::from_slice(&[0.5 + shift, -0.25], 2, &Device::Cpu).unwrap(),
            },
        ]
    }

    pub fn adamw(vars: &[NamedVar]) -> AdamW {
        AdamW::from_named(
            vars.to_vec(),
            AdamWConfig {
                lr: 0.05,
                ..Default::default()
            },
        )
        .unwrap()
    }

    pub fn loss(vars: &[NamedVar]) -> Tensor {
        let mut total = Tensor::new(0f64, &Device::Cpu).unwrap();
        for v in vars {
            let t = v.var.as_tensor();
            let l = (t.sqr().unwrap().sum_all().unwrap() * 1.5).unwrap();
            total = (total + l).unwrap();
        }
        total
    }

    /// Parameters and state as bit patterns (NaNs compare equal).
    pub fn snapshot<O: OptimizerState>(
        vars: &[NamedVar],
        opt: &O,
    ) -> (Vec<Vec<u64>>, BTreeMap<String, Vec<u8>>) {
        let params = vars
            .iter()
            .map(|v| {
                let t = v.var.as_tensor().flatten_all().unwrap();
                t.to_vec1::<f64>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect()
            })
            .collect();
        let state = opt
            .state_dict()
            .unwrap()
            .into_iter()
            .map(|(k, t)| {
                let bytes = t
                    .flatten_all()
                    .unwrap()
                    .to_dtype(candle_core::DType::F64)
                    .unwrap()
                    .to_vec1::<f64>()
                    .unwrap()
                    .iter()
                    .flat_map(|x| x.to_bits().to_le_bytes())
                    .collect();
                (k, bytes)
            })
            .collect();
        (params, state)
    }

    pub fn step<O: Optimizer>(opt: &mut O, vars: &[NamedVar], n: usize) {
        for _ in 0..n {
            opt.backward_step(&loss(vars)).unwrap();
        }
    }

    pub fn temp_file(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("steepest-schedule-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir.join(name)
    }
}

/// A `Scheduled` optimizer's checkpoint file loaded into the plain optimizer
/// is refused at the schedule's key, as a checkpoint error naming
/// `__schedule__.step`, and changes neither the parameters nor the state nor
/// the rate; without that key the same state loads into the plain optimizer
/// and equals the wrapped optimizer's.
#[test]
fn scheduled_checkpoint_into_the_plain_optimizer_is_refused() {
    use mixing::*;
    use steepest::optim::OptimizerState;
    use steepest::schedule::SCHEDULE_STEP_KEY;
    use steepest::Error;

    let sched_vars = vars(0.0);
    let mut scheduled = Scheduled::new(adamw(&sched_vars), Schedule::constant(0.02).unwrap());
    for _ in 0..3 {
        scheduled.backward_step(&loss(&sched_vars)).unwrap();
    }
    let path = temp_file("scheduled.safetensors");
    scheduled.save_state(&path).unwrap();

    let plain_vars = vars(0.1);
    let mut plain = adamw(&plain_vars);
    step(&mut plain, &plain_vars, 2);
    let before = snapshot(&plain_vars, &plain);
    let lr = plain.learning_rate();

    // (So a load that changed anything would show.)
    assert_ne!(before.1, snapshot(&sched_vars, scheduled.inner()).1);
    let e = plain.load_state(&path).unwrap_err();
    assert!(matches!(e, Error::Checkpoint { .. }), "{e}");
    assert_eq!(e.who(), Some(SCHEDULE_STEP_KEY), "{e}");
    let msg = e.to_string();
    for part in [
        SCHEDULE_STEP_KEY,
        "saved by a `Scheduled` optimizer",
        "Scheduled::load_state",
        "state.remove(SCHEDULE_STEP_KEY)",
    ] {
        assert!(msg.contains(part), "missing {part:?}: {msg}");
    }
    assert_eq!(
        snapshot(&plain_vars, &plain),
        before,
        "a refused load changes nothing"
    );
    assert_eq!(plain.learning_rate(), lr);

    // The way out: drop the schedule's key.
    let mut state = steepest::checkpoint::load(&path).unwrap();
    assert!(state.remove(SCHEDULE_STEP_KEY).is_some());
    plain.load_state_dict(&state).unwrap();
    assert_eq!(
        snapshot(&plain_vars, &plain).1,
        snapshot(&sched_vars, scheduled.inner()).1
    );
    std::fs::remove_file(&path).unwrap();
}

/// A plain optimizer's checkpoint file loaded into a `Scheduled` one is
/// refused with a message saying it was not saved by a `Scheduled` optimizer
/// and how to load it (`inner_mut`, `set_step`), and changes neither the
/// parameters, the state, the step counter nor the rate; the way the message
/// gives then works.
#[test]
fn plain_checkpoint_into_a_scheduled_optimizer_is_refused() {
    use mixing::*;
    use steepest::optim::OptimizerState;
    use steepest::schedule::SCHEDULE_STEP_KEY;
    use steepest::Error;

    let plain_vars = vars(0.0);
    let mut plain = adamw(&plain_vars);
    step(&mut plain, &plain_vars, 2);
    let path = temp_file("plain.safetensors");
    plain.save_state(&path).unwrap();

    let sched_vars = vars(0.1);
    let mut scheduled = Scheduled::new(adamw(&sched_vars), Schedule::constant(0.02).unwrap());
    for _ in 0..3 {
        scheduled.backward_step(&loss(&sched_vars)).unwrap();
    }
    let before = snapshot(&sched_vars, &scheduled);
    let lr = scheduled.inner().learning_rate();

    assert_ne!(before.1, snapshot(&plain_vars, &plain).1);
    let e = scheduled.load_state(&path).unwrap_err();
    assert!(matches!(e, Error::Checkpoint { .. }), "{e}");
    let msg = e.to_string();
    for part in [
        SCHEDULE_STEP_KEY,
        "not saved by a `Scheduled` optimizer",
        "plain optimizer",
        "inner_mut()",
        "set_step",
    ] {
        assert!(msg.contains(part), "missing {part:?}: {msg}");
    }
    assert_eq!(
        snapshot(&sched_vars, &scheduled),
        before,
        "a refused load changes nothing"
    );
    assert_eq!(scheduled.current_step(), 3);
    assert_eq!(scheduled.inner().learning_rate(), lr);

    // The way the message gives.
    scheduled.inner_mut().load_state(&path).unwrap();
    scheduled.set_step(2);
    let state = scheduled.state_dict().unwrap();
    assert_eq!(state[SCHEDULE_STEP_KEY].to_scalar::<i64>().unwrap(), 2);
    assert_eq!(
        snapshot(&sched_vars, scheduled.inner()).1,
        snapshot(&plain_vars, &plain).1
    );
    std::fs::remove_file(&path).unwrap();
}

/// A decay whose `min` is above its `peak` would increase: refused naming
/// `min`; `min = peak` (a constant) is fine. The constant-rate bound names
/// its own argument `eta` when it is bad.
#[test]
fn a_decay_that_would_increase_is_refused_and_bounds_name_eta() {
    let e = Schedule::cosine(0.01, 0.02, 100).unwrap_err().to_string();
    assert!(e.contains("min") && e.contains("above peak"), "{e}");
    let e = Schedule::wsd(0.01, 0.02, 10, 10, DecayShape::Linear)
        .unwrap_err()
        .to_string();
    assert!(e.contains("min") && e.contains("above peak"), "{e}");
    assert!(Schedule::cosine(0.02, 0.02, 100).is_ok());
    for eta in [-0.1, 0.0, f64::NAN] {
        let e = steepest::theory::constant_lr_last_iterate_bound(eta, 1.0, 1.0, 10)
            .unwrap_err()
            .to_string();
        assert!(e.contains("eta") && !e.contains("lrs[0]"), "{eta}: {e}");
    }
}

/// A warmup ramps to the wrapped schedule's first rate `η(0)`, not to its
/// rate at the current step: before a cosine decay, `η'(s) = η(0)·(s+1)/W`
/// for `s < W`, then the cosine from its start (hand-computed, `W = 4`,
/// cosine 1 → 0 over 4 steps). A one-step warmup is a warmup too:
/// `η'(0) = η(0)`, then the schedule one step late.
#[test]
fn warmup_ramps_to_the_first_rate_of_a_decaying_schedule() {
    let pi = std::f64::consts::PI;
    let cos = |s: f64| (1.0 + (pi * s / 4.0).cos()) / 2.0;
    let w = Schedule::cosine(1.0, 0.0, 4)
        .unwrap()
        .with_warmup(4)
        .unwrap();
    let expect = [0.25, 0.5, 0.75, 1.0, 1.0, cos(1.0), 0.5, cos(3.0), 0.0];
    for (s, e) in expect.iter().enumerate() {
        close(w.lr(s), *e);
    }
    let one = Schedule::cosine(1.0, 0.0, 4)
        .unwrap()
        .with_warmup(1)
        .unwrap();
    let expect = [1.0, 1.0, cos(1.0), 0.5, cos(3.0), 0.0];
    for (s, e) in expect.iter().enumerate() {
        close(one.lr(s), *e);
    }
}

/// `DecayShape::factor` clamps its argument to `[0, 1]` (its docs): below
/// 0 it is `f(0) = 1`, above 1 it is `f(1) = 0`, for every shape (the
/// cosine unclamped would rise again past 1: `(1 + cos 2π)/2 = 1`).
#[test]
fn decay_shape_factors_clamp_their_argument() {
    for shape in [
        DecayShape::Linear,
        DecayShape::Cosine,
        DecayShape::OneMinusSqrt,
    ] {
        for x in [-0.5, -3.0] {
            close(shape.factor(x), 1.0);
        }
        for x in [1.5, 2.0, 7.0] {
            close(shape.factor(x), 0.0);
        }
    }
}

/// A `Scheduled` checkpoint that is refused changes nothing: a negative
/// step counter (not wrapped to a huge `usize`) is a checkpoint error
/// (neither the counter nor the inner optimizer's state or rate moves), and
/// a checkpoint whose inner optimizer state is refused (a momentum buffer
/// of the wrong shape) leaves the step counter where it was — the counter
/// is set only after the inner load succeeded. The good checkpoint then
/// loads.
#[test]
fn a_refused_scheduled_checkpoint_leaves_the_step_counter() {
    use std::collections::HashMap;
    use steepest::optim::OptimizerState;
    use steepest::schedule::SCHEDULE_STEP_KEY;
    let w = Var::from_vec(vec![0.5f64, -1.0], 2, &Device::Cpu).unwrap();
    let make = || {
        let sgd = Sgd::new(
            vec![w.clone()],
            SgdConfig {
                lr: 0.1,
                momentum: 0.9,
                weight_decay: WeightDecay::None,
                ..Default::default()
            },
        )
        .unwrap();
        Scheduled::new(sgd, Schedule::cosine(0.4, 0.0, 10).unwrap())
    };
    let mut drv = make();
    for _ in 0..2 {
        let loss = w.as_tensor().sqr().unwrap().sum_all().unwrap();
        drv.backward_step(&loss).unwrap();
    }
    let good = drv.state_dict().unwrap();
    let mut fresh = make();
    fresh.set_step(5);

    let mut negative = good.clone();
    negative.insert(
        SCHEDULE_STEP_KEY.into(),
        Tensor::new(-1i64, &Device::Cpu).unwrap(),
    );
    let e = fresh.load_state_dict(&negative).unwrap_err();
    assert!(matches!(e, steepest::Error::Checkpoint { .. }), "{e}");
    assert_eq!(fresh.current_step(), 5);
    // Nor did the inner optimizer take the refused checkpoint's state (a
    // fresh one has none) or its rate.
    let inner = fresh.inner().state_dict().unwrap();
    assert!(
        inner.values().all(|t| t.dims() != [2]),
        "the refused checkpoint's buffers were loaded: {:?}",
        inner.keys()
    );
    assert_eq!(fresh.inner().learning_rate(), 0.1);

    // The inner optimizer's buffers: the entries shaped like `w`.
    let buffers: Vec<String> = good
        .iter()
        .filter(|(_, t)| t.dims() == [2])
        .map(|(k, _)| k.clone())
        .collect();
    assert!(!buffers.is_empty(), "keys {:?}", good.keys());
    let mut bad: HashMap<String, Tensor> = good.clone();
    for k in &buffers {
        bad.insert(
            k.clone(),
            Tensor::zeros(7, candle_core::DType::F64, &Device::Cpu).unwrap(),
        );
    }
    assert!(fresh.load_state_dict(&bad).is_err());
    assert_eq!(fresh.current_step(), 5);

    fresh.load_state_dict(&good).unwrap();
    assert_eq!(fresh.current_step(), 2);
}

/// Step counts near `usize::MAX` give the formula's rate, not an overflow
/// (`stable + decay` and `s + 1` would wrap or panic there).
#[test]
fn steps_near_usize_max_follow_the_formulas() {
    let big = usize::MAX - 3;
    let lin = Schedule::wsd(1.0, 0.0, big, 4, DecayShape::Linear).unwrap();
    close(lin.lr(big - 1), 1.0);
    close(lin.lr(big), 1.0);
    close(lin.lr(big + 1), 0.75);
    close(lin.lr(usize::MAX), 0.25);
    let past = Schedule::wsd(1.0, 0.1, usize::MAX - 9, 4, DecayShape::Linear).unwrap();
    close(past.lr(usize::MAX), 0.1);
    let inv = Schedule::inverse_sqrt(2.0).unwrap();
    let expect = 2.0 / (usize::MAX as f64 + 1.0).sqrt();
    assert!((inv.lr(usize::MAX) / expect - 1.0).abs() < 1e-12);
}

/// Both rates of a decay are checked, each by name: a negative or NaN `min`
/// (which `min ≤ peak` lets through) and a negative or NaN `peak`.
#[test]
fn both_rates_of_a_decay_are_checked_by_name() {
    for bad in [-0.1, f64::NAN] {
        let errs = [
            (Schedule::cosine(1.0, bad, 10), "Schedule::cosine: min"),
            (
                Schedule::wsd(1.0, bad, 5, 10, DecayShape::Linear),
                "Schedule::wsd: min",
            ),
            (Schedule::cosine(bad, 0.0, 10), "Schedule::cosine: peak"),
            (
                Schedule::wsd(bad, 0.0, 5, 10, DecayShape::Linear),
                "Schedule::wsd: peak",
            ),
        ];
        for (r, who) in errs {
            let e = r.unwrap_err().to_string();
            assert!(e.contains(who) && e.contains("finite"), "{bad}: {e}");
        }
    }
}
