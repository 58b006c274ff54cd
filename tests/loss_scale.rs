//! Dynamic loss scaling (`steepest::loss_scale`): f16 gradients that
//! underflow to zero are recovered (against the closed-form gradient); an
//! overflow skips the step, changing nothing, and halves the scale down to
//! the largest that fits; the scale grows after its interval; the state
//! round-trips and bad state is refused; data-parallel ranks skip alike.

mod common;

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Optimizer, VarMap};
use steepest::loss_scale::{LossScaleConfig, LossScaler, ScaledStep};
use steepest::optim::{AdamW, AdamWConfig, OptimizerState, Sgd, SgdConfig};
use steepest::WeightDecay;

/// Deterministic values in [0.5, 1) with alternating signs.
fn xs(n: usize, seed: u64) -> Vec<f32> {
    (0..n)
        .map(|i| {
            let u = ((i as u64 * 2654435761 + seed * 97) % 1000) as f32 / 2000.0;
            (0.5 + u) * if i % 2 == 0 { 1.0 } else { -1.0 }
        })
        .collect()
}

/// An f16 weight `w` (4×6, near 1) in a `VarMap`, and AdamW over it with
/// f32 master weights.
fn f16_model() -> (VarMap, Var, AdamW) {
    let w: Vec<f32> = xs(24, 1).iter().map(|x| 1.0 + 0.1 * x).collect();
    let w = Tensor::from_vec(w, (4, 6), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F16)
        .unwrap();
    let var = Var::from_tensor(&w).unwrap();
    let vm = VarMap::new();
    vm.data().lock().unwrap().insert("w".into(), var.clone());
    let cfg = AdamWConfig {
        lr: 1e-2,
        weight_decay: WeightDecay::None,
        ..Default::default()
    };
    let opt = AdamW::from_varmap(&vm, cfg).unwrap().with_master_weights();
    (vm, var, opt)
}

/// `c · Σ w ⊙ x`, with `w` cast to f32 (its gradient `c·x` goes back to f16
/// through the cast).
fn linear_loss(w: &Var, x: &Tensor, c: f64) -> Tensor {
    let w = w.as_tensor().to_dtype(DType::F32).unwrap();
    (w * x).unwrap().sum_all().unwrap().affine(c, 0.0).unwrap()
}

/// `S · linear_loss(w, x, c)`'s gradients, a new batch of `scaler`.
fn scaled_grads(scaler: &mut LossScaler, w: &Var, x: &Tensor, c: f64) -> GradStore {
    scaler
        .scale_loss(&linear_loss(w, x, c))
        .unwrap()
        .backward()
        .unwrap()
}

fn host(t: &Tensor) -> Vec<f64> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// True gradients of 1e-8·x (below f16's smallest subnormal, 6e-8): the
/// plain backward pass rounds them to zero; scaled by 2¹⁶ they are normal
/// f16 numbers, and unscaled (in f32) they match `c·x` to f16's precision
/// (2⁻¹¹ relative). With them AdamW moves the weights; without, not at all.
#[test]
fn underflowing_f16_gradients_are_recovered() {
    let c = 1e-8;
    let xv = xs(24, 2);
    let x = Tensor::from_vec(xv.clone(), (4, 6), &Device::Cpu).unwrap();
    let (_, w, mut opt) = f16_model();
    let plain = linear_loss(&w, &x, c).backward().unwrap();
    let g = plain.get(&w).unwrap();
    assert_eq!(g.dtype(), DType::F16);
    assert!(
        host(g).iter().all(|&v| v == 0.0),
        "plain f16 gradients underflow"
    );
    let before = host(w.as_tensor());
    opt.step(&plain).unwrap();
    assert_eq!(host(w.as_tensor()), before, "zero gradients: no movement");

    let mut scaler = LossScaler::new(LossScaleConfig::default()).unwrap();
    let mut grads = scaled_grads(&mut scaler, &w, &x, c);
    scaler.unscale(&mut grads, opt.vars()).unwrap();
    let g = grads.get(&w).unwrap();
    assert_eq!(g.dtype(), DType::F32, "unscaled in f32");
    for (got, x) in host(g).iter().zip(&xv) {
        let want = c * *x as f64;
        assert!(
            (got - want).abs() <= want.abs() * 2f64.powi(-11),
            "{got:e} vs {want:e}"
        );
    }
    assert_eq!(
        scaler.step(&mut opt, &mut grads).unwrap(),
        ScaledStep::Stepped
    );
    let moved = host(w.as_tensor())
        .iter()
        .zip(&before)
        .filter(|(a, b)| a != b)
        .count();
    assert!(moved > 12, "only {moved} of 24 f16 weights moved");
}

/// Gradients near 1 under a scale of 2⁴⁰ overflow f16: each step is
/// skipped (parameter, master and state unchanged) and halves the scale,
/// until the first scale `S` with every `S·g` below f16's overflow
/// threshold (65520), whose double overflows: then the step runs.
#[test]
fn overflow_skips_and_backs_off_to_the_largest_scale_that_fits() {
    let xv = xs(24, 3);
    let x = Tensor::from_vec(xv.clone(), (4, 6), &Device::Cpu).unwrap();
    let (_, w, mut opt) = f16_model();
    let cfg = LossScaleConfig {
        init_scale: 2f64.powi(40),
        ..Default::default()
    };
    let mut scaler = LossScaler::new(cfg).unwrap();
    let max_g = xv.iter().map(|v| v.abs() as f64).fold(0.0, f64::max);
    let fits = |s: f64| s * max_g < 65520.0;
    let mut skips = 0;
    loop {
        let before = (host(w.as_tensor()), opt.state_dict().unwrap().len());
        let s = scaler.scale();
        let mut grads = scaled_grads(&mut scaler, &w, &x, 1.0);
        match scaler.step(&mut opt, &mut grads).unwrap() {
            ScaledStep::Skipped { param } => {
                assert_eq!(param, "w");
                assert!(!fits(s), "skipped at a scale that fits: {s}");
                assert_eq!(
                    (host(w.as_tensor()), opt.state_dict().unwrap().len()),
                    before
                );
                assert_eq!(scaler.scale(), s / 2.0);
                skips += 1;
            }
            ScaledStep::Stepped => {
                assert!(fits(s) && !fits(2.0 * s), "stepped at {s}");
                break;
            }
        }
        assert!(skips < 40);
    }
    assert_eq!(scaler.skipped(), skips);
    assert!(skips > 20);
}

/// The scale doubles after `growth_interval` steps in a row that ran; a
/// skip resets the count.
#[test]
fn the_scale_grows_after_its_interval() {
    let x = Tensor::from_vec(xs(24, 4), (4, 6), &Device::Cpu).unwrap();
    let (_, w, mut opt) = f16_model();
    let cfg = LossScaleConfig {
        init_scale: 8.0,
        growth_interval: 3,
        ..Default::default()
    };
    let mut scaler = LossScaler::new(cfg).unwrap();
    let mut step = |scaler: &mut LossScaler, c: f64| {
        let mut grads = scaled_grads(scaler, &w, &x, c);
        scaler.step(&mut opt, &mut grads).unwrap()
    };
    let mut scales = Vec::new();
    for _ in 0..7 {
        assert_eq!(step(&mut scaler, 1e-3), ScaledStep::Stepped);
        scales.push(scaler.scale());
    }
    assert_eq!(scales, vec![8.0, 8.0, 16.0, 16.0, 16.0, 32.0, 32.0]);
    // An overflow (c = 1e4: 32·1e4 > 65504) halves the scale and restarts
    // the count: three good steps more to grow again.
    assert!(matches!(step(&mut scaler, 1e4), ScaledStep::Skipped { .. }));
    assert_eq!(scaler.scale(), 16.0);
    for want in [16.0, 16.0, 32.0] {
        assert_eq!(step(&mut scaler, 1e-3), ScaledStep::Stepped);
        assert_eq!(scaler.scale(), want);
    }
}

/// An f16 weight (4×6, near 1) and plain SGD (`lr = 1`, no momentum, no
/// decay) over it with f32 master weights: a step moves the master by
/// exactly the gradient it was given, so unscaling once, twice or never
/// shows in the weights.
fn f16_sgd() -> (Var, Sgd) {
    let (vm, w, _) = f16_model();
    let cfg = SgdConfig {
        lr: 1.0,
        momentum: 0.0,
        nesterov: false,
        weight_decay: WeightDecay::None,
        decay_vectors: false,
    };
    (w, Sgd::from_varmap(&vm, cfg).unwrap().with_master_weights())
}

fn master(opt: &Sgd) -> Vec<f64> {
    host(opt.driver().master_weight("w").unwrap())
}

/// `w_before − g`, in f32 as the SGD step computes it.
fn sgd_step(before: &[f64], g: &[f64]) -> Vec<f64> {
    before
        .iter()
        .zip(g)
        .map(|(w, g)| (*w as f32 - *g as f32) as f64)
        .collect()
}

fn assert_unscaled(got: &[f64], want: &[f64], what: &str) {
    for (g, w) in got.iter().zip(want) {
        assert!(
            (g - w).abs() <= w.abs() * 2f64.powi(-11),
            "{what}: {g:e} vs {w:e}"
        );
    }
}

/// `unscale` twice divides once; `unscale`, clipping, then `step` steps
/// with the clipped gradients (no second division); after an error other
/// than an overflow (a NaN rate) the store holds the unscaled gradients and
/// a retry divides nothing more; a batch dropped after such an error leaves
/// the next batch (which starts with `scale_loss`) divided once.
#[test]
fn each_gradient_is_unscaled_exactly_once() {
    let x = Tensor::from_vec(xs(24, 5), (4, 6), &Device::Cpu).unwrap();
    let want_g: Vec<f64> = host(&x).iter().map(|v| v * 1e-3).collect();
    let (w, mut opt) = f16_sgd();
    let mut scaler = LossScaler::new(LossScaleConfig::default()).unwrap();
    let mut grads = scaled_grads(&mut scaler, &w, &x, 1e-3);
    scaler.unscale(&mut grads, opt.vars()).unwrap();
    let once = host(grads.get(&w).unwrap());
    scaler.unscale(&mut grads, opt.vars()).unwrap();
    assert_eq!(
        host(grads.get(&w).unwrap()),
        once,
        "a second unscale divides"
    );
    assert_unscaled(&once, &want_g, "unscale");
    let norm = steepest::clip::clip_grad_norm_named(&mut grads, opt.vars(), 1e-4).unwrap();
    let want_norm = once.iter().map(|g| g * g).sum::<f64>().sqrt();
    assert!(
        (norm - want_norm).abs() <= 1e-6 * want_norm,
        "{norm} vs {want_norm}"
    );
    let clipped = host(grads.get(&w).unwrap());
    // (the master is made from the weight at the first step)
    let before = host(w.as_tensor());
    assert_eq!(
        scaler.step(&mut opt, &mut grads).unwrap(),
        ScaledStep::Stepped
    );
    assert_eq!(master(&opt), sgd_step(&before, &clipped));

    // An error that is not an overflow, then a retry with the same store.
    let mut grads = scaled_grads(&mut scaler, &w, &x, 1e-3);
    opt.set_learning_rate(f64::NAN);
    let s = scaler.scale();
    let e = scaler.step(&mut opt, &mut grads).unwrap_err();
    assert!(matches!(e, steepest::Error::Config { .. }), "{e}");
    assert_eq!(scaler.scale(), s);
    opt.set_learning_rate(1.0);
    let before = master(&opt);
    let g = host(grads.get(&w).unwrap());
    assert_unscaled(&g, &want_g, "retry");
    assert_eq!(
        scaler.step(&mut opt, &mut grads).unwrap(),
        ScaledStep::Stepped
    );
    assert_eq!(master(&opt), sgd_step(&before, &g));

    // The same error, the batch dropped; the next batch is divided once.
    let mut grads = scaled_grads(&mut scaler, &w, &x, 1e-3);
    opt.set_learning_rate(f64::NAN);
    scaler.step(&mut opt, &mut grads).unwrap_err();
    opt.set_learning_rate(1.0);
    drop(grads);
    let mut grads = scaled_grads(&mut scaler, &w, &x, 1e-3);
    let before = master(&opt);
    assert_eq!(
        scaler.step(&mut opt, &mut grads).unwrap(),
        ScaledStep::Stepped
    );
    let g = host(grads.get(&w).unwrap());
    assert_unscaled(&g, &want_g, "next batch");
    assert_eq!(master(&opt), sgd_step(&before, &g));
}

/// Clipping an overflowed batch returns `NonFiniteGradient`; `step` then
/// skips and backs off, and the next batch steps.
#[test]
fn clipping_an_overflow_then_step_skips() {
    let x = Tensor::from_vec(xs(24, 8), (4, 6), &Device::Cpu).unwrap();
    let (w, mut opt) = f16_sgd();
    let mut scaler = LossScaler::new(LossScaleConfig::default()).unwrap();
    let mut grads = scaled_grads(&mut scaler, &w, &x, 1e4);
    scaler.unscale(&mut grads, opt.vars()).unwrap();
    let e = steepest::clip::clip_grad_norm_named(&mut grads, opt.vars(), 1.0).unwrap_err();
    assert!(
        matches!(e, steepest::Error::NonFiniteGradient { .. }),
        "{e}"
    );
    let before = host(w.as_tensor());
    assert!(matches!(
        scaler.step(&mut opt, &mut grads).unwrap(),
        ScaledStep::Skipped { .. }
    ));
    assert_eq!(host(w.as_tensor()), before);
    assert_eq!(scaler.scale(), 32768.0);
    let mut grads = scaled_grads(&mut scaler, &w, &x, 1e-3);
    assert_eq!(
        scaler.step(&mut opt, &mut grads).unwrap(),
        ScaledStep::Stepped
    );
}

/// f16 parameters without master weights are refused by name, nothing
/// changed; bf16 ones are not.
#[test]
fn f16_parameters_need_master_weights() {
    let (vm, w, _) = f16_model();
    let mut opt = AdamW::from_varmap(&vm, AdamWConfig::default()).unwrap();
    let x = Tensor::from_vec(xs(24, 9), (4, 6), &Device::Cpu).unwrap();
    let mut scaler = LossScaler::new(LossScaleConfig::default()).unwrap();
    let mut grads = scaled_grads(&mut scaler, &w, &x, 1e-3);
    let before = host(w.as_tensor());
    let e = scaler.step(&mut opt, &mut grads).unwrap_err();
    assert!(e.to_string().contains("w: an f16 parameter"), "{e}");
    assert_eq!(host(w.as_tensor()), before);
    let b = Var::from_tensor(&w.as_tensor().to_dtype(DType::BF16).unwrap()).unwrap();
    let vb = VarMap::new();
    vb.data().lock().unwrap().insert("w".into(), b.clone());
    let mut opt = AdamW::from_varmap(&vb, AdamWConfig::default()).unwrap();
    let mut grads = scaled_grads(&mut scaler, &b, &x, 1e-3);
    assert_eq!(
        scaler.step(&mut opt, &mut grads).unwrap(),
        ScaledStep::Stepped
    );
}

/// The scale stays within [2⁻²⁴, 2⁶⁴]: growth stops at the top, back-off
/// at the bottom.
#[test]
fn the_scale_is_clamped() {
    let x = Tensor::from_vec(xs(24, 10), (4, 6), &Device::Cpu).unwrap();
    let (w, mut opt) = f16_sgd();
    let mut top = LossScaler::new(LossScaleConfig {
        init_scale: 2f64.powi(64),
        growth_interval: 1,
        ..Default::default()
    })
    .unwrap();
    let mut bottom = LossScaler::new(LossScaleConfig {
        init_scale: 2f64.powi(-24),
        ..Default::default()
    })
    .unwrap();
    // an f32 loss: a tiny one at 2⁶⁴ still gives finite f16 gradients
    let mut grads = scaled_grads(&mut top, &w, &x, 1e-24);
    assert_eq!(top.step(&mut opt, &mut grads).unwrap(), ScaledStep::Stepped);
    assert_eq!(top.scale(), 2f64.powi(64));
    let mut grads = scaled_grads(&mut bottom, &w, &x, f64::NAN);
    assert!(matches!(
        bottom.step(&mut opt, &mut grads).unwrap(),
        ScaledStep::Skipped { .. }
    ));
    assert_eq!(bottom.scale(), 2f64.powi(-24));
}

/// Around `Scheduled`, a skip does not advance the schedule; around
/// `Accumulate` (every 2, master weights), micro-batches whose f16
/// gradients underflow without scaling reach the master as their f32 mean.
#[test]
fn scheduled_and_accumulate_take_the_scaler() {
    use steepest::accumulate::Accumulate;
    use steepest::schedule::{Schedule, Scheduled};
    let x = Tensor::from_vec(xs(24, 11), (4, 6), &Device::Cpu).unwrap();
    let (w, opt) = f16_sgd();
    let mut sched = Scheduled::new(opt, Schedule::cosine(1.0, 0.1, 10).unwrap());
    let mut scaler = LossScaler::new(LossScaleConfig::default()).unwrap();
    for (c, stepped) in [(1e-3, true), (1e4, false), (1e-3, true)] {
        let mut grads = scaled_grads(&mut scaler, &w, &x, c);
        let out = scaler.step(&mut sched, &mut grads).unwrap();
        assert_eq!(out == ScaledStep::Stepped, stepped);
    }
    assert_eq!(sched.current_step(), 2);

    // (a rate of 100: updates of 1e-8 would vanish in an f32 weight near 1)
    let (w, mut opt) = f16_sgd();
    opt.set_learning_rate(100.0);
    let mut acc = Accumulate::new(opt, 2).unwrap();
    let mut scaler = LossScaler::new(LossScaleConfig::default()).unwrap();
    let before = host(w.as_tensor());
    let (c1, c2) = (1e-8, 3e-8);
    for c in [c1, c2] {
        let mut grads = scaled_grads(&mut scaler, &w, &x, c);
        assert_eq!(
            scaler.step(&mut acc, &mut grads).unwrap(),
            ScaledStep::Stepped
        );
    }
    let m = host(acc.inner().driver().master_weight("w").unwrap());
    for ((m, w0), x) in m.iter().zip(&before).zip(host(&x)) {
        let want = w0 - 100.0 * (c1 + c2) / 2.0 * x;
        // f16 rounding of the scaled gradients (2⁻¹¹), then an f32 step
        assert!(
            (m - want).abs() <= 100.0 * (c1 + c2) * 2f64.powi(-11) + 2f64.powi(-23),
            "{m} vs {want}"
        );
        assert_ne!(m, w0, "the mean reached the master");
    }
}

#[test]
fn bad_configs_are_refused_by_field() {
    let d = LossScaleConfig::default();
    for (cfg, field) in [
        (
            LossScaleConfig {
                init_scale: 0.0,
                ..d.clone()
            },
            "init_scale",
        ),
        (
            LossScaleConfig {
                init_scale: f64::INFINITY,
                ..d.clone()
            },
            "init_scale",
        ),
        (
            LossScaleConfig {
                growth_factor: 1.0,
                ..d.clone()
            },
            "growth_factor",
        ),
        (
            LossScaleConfig {
                backoff_factor: 1.0,
                ..d.clone()
            },
            "backoff_factor",
        ),
        (
            LossScaleConfig {
                backoff_factor: f64::NAN,
                ..d.clone()
            },
            "backoff_factor",
        ),
        (
            LossScaleConfig {
                growth_interval: 0,
                ..d.clone()
            },
            "growth_interval",
        ),
    ] {
        let e = LossScaler::new(cfg).unwrap_err();
        assert!(e.to_string().contains(field), "{field}: {e}");
    }
    let e = LossScaler::new(d)
        .unwrap()
        .scale_loss(&Tensor::new(&[1u32], &Device::Cpu).unwrap())
        .unwrap_err();
    assert!(e.to_string().contains("float"), "{e}");
}

/// The state (config, scale, counters) round-trips through a file; a
/// scale out of range, a count past the interval, an extra tensor and
/// another kind's header are refused, nothing changed.
#[test]
fn state_round_trips_and_bad_state_is_refused() {
    let x = Tensor::from_vec(xs(24, 6), (4, 6), &Device::Cpu).unwrap();
    let (_, w, mut opt) = f16_model();
    let cfg = LossScaleConfig {
        init_scale: 2f64.powi(30),
        growth_interval: 5,
        ..Default::default()
    };
    let mut a = LossScaler::new(cfg).unwrap();
    for c in [1.0, 1e-3, 1e-3] {
        let mut grads = scaled_grads(&mut a, &w, &x, c);
        a.step(&mut opt, &mut grads).unwrap();
    }
    let dir = common::scratch_dir("loss_scale", "state");
    let path = dir.join("scaler.safetensors");
    a.save_state(&path).unwrap();
    let mut b = LossScaler::new(LossScaleConfig::default()).unwrap();
    b.load_state(&path).unwrap();
    assert_eq!(
        (b.scale(), b.skipped(), b.config()),
        (a.scale(), a.skipped(), a.config())
    );
    assert_eq!(b.state_dict().unwrap().len(), 1);
    assert_eq!(
        common::header(&b.state_dict().unwrap()),
        common::header(&a.state_dict().unwrap())
    );

    let state = a.state_dict().unwrap();
    let fresh = LossScaler::new(LossScaleConfig::default()).unwrap();
    let bad: Vec<(HashMap<String, Tensor>, &str)> = vec![
        (
            common::with_header(&state, |h| h["body"]["scale"] = serde_json::json!(0.0)),
            "scale",
        ),
        (
            common::with_header(&state, |h| h["body"]["good_steps"] = serde_json::json!(5)),
            "good_steps",
        ),
        (
            common::with_header(&state, |h| {
                h["body"]["config"]["growth_factor"] = serde_json::json!(0.5)
            }),
            "growth_factor",
        ),
        (
            {
                let mut s = state.clone();
                s.insert("w.scale".into(), Tensor::new(1f32, &Device::Cpu).unwrap());
                s
            },
            "w.scale",
        ),
        (opt.state_dict().unwrap(), "adamw"),
    ];
    for (s, what) in bad {
        let mut c = fresh.clone();
        let e = c.load_state_dict(&s).unwrap_err();
        assert!(
            matches!(e, steepest::Error::Checkpoint { .. }),
            "{what}: {e}"
        );
        assert!(e.to_string().contains(what), "{what}: {e}");
        assert_eq!(
            common::header(&c.state_dict().unwrap()),
            common::header(&fresh.state_dict().unwrap())
        );
    }
}

/// Two data-parallel ranks, one of which overflows: both skip the step,
/// name the same parameter and keep the same scale; then both step.
#[test]
fn data_parallel_ranks_skip_alike() {
    use steepest::distributed::{Collective, DataParallel, DataParallelConfig, LocalGroup};
    let out = LocalGroup::run(2, |comm| {
        let rank = comm.rank();
        let (_, w, opt) = f16_model();
        let mut dp = DataParallel::for_optimizer(comm, opt, DataParallelConfig::default())?;
        let mut scaler = LossScaler::new(LossScaleConfig::default())?;
        let x = Tensor::from_vec(xs(24, 7), (4, 6), &Device::Cpu)?;
        let mut outcomes = Vec::new();
        let start = host(w.as_tensor());
        let mut after_first = None;
        for c in [if rank == 1 { 1e4 } else { 1e-3 }, 1e-3] {
            let mut grads = scaler.scale_loss(&linear_loss(&w, &x, c))?.backward()?;
            outcomes.push(scaler.step(&mut dp, &mut grads)?);
            after_first.get_or_insert_with(|| host(w.as_tensor()));
        }
        assert_eq!(after_first.unwrap(), start, "the skipped step moved w");
        Ok((outcomes, scaler.scale(), host(w.as_tensor())))
    })
    .unwrap();
    let results: Vec<_> = out.into_iter().map(|r| r.unwrap()).collect();
    assert_eq!(
        results[0].0,
        vec![
            ScaledStep::Skipped { param: "w".into() },
            ScaledStep::Stepped
        ]
    );
    assert_eq!(results[0].0, results[1].0);
    assert_eq!(results[0].1, 32768.0);
    assert_eq!(results[0].1, results[1].1);
    assert_eq!(results[0].2, results[1].2, "the ranks' weights agree");
}
