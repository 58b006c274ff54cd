//! Dynamic loss scaling (`steepest::loss_scale`): f16 gradients that
//! underflow to zero are recovered (against the closed-form gradient); an
//! overflow skips the step, changing nothing, and halves the scale down to
//! the largest that fits; the scale grows after its interval; the state
//! round-trips and bad state is refused; data-parallel ranks skip alike.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Optimizer, VarMap};
use steepest::loss_scale::{LossScaleConfig, LossScaler, ScaledStep};
use steepest::optim::{AdamW, AdamWConfig, OptimizerState};
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
    let mut grads = scaler
        .scale_loss(&linear_loss(&w, &x, c))
        .unwrap()
        .backward()
        .unwrap();
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
        let mut grads = scaler
            .scale_loss(&linear_loss(&w, &x, 1.0))
            .unwrap()
            .backward()
            .unwrap();
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
        let mut grads = scaler
            .scale_loss(&linear_loss(&w, &x, c))
            .unwrap()
            .backward()
            .unwrap();
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

/// `unscale` twice is refused with the store unchanged; `unscale`, then
/// clipping, then `step` steps with the clipped gradients (no second
/// division); an error other than an overflow (a NaN learning rate) is
/// returned with the scale unchanged.
#[test]
fn unscale_then_clip_then_step() {
    let x = Tensor::from_vec(xs(24, 5), (4, 6), &Device::Cpu).unwrap();
    let (_, w, mut opt) = f16_model();
    let mut scaler = LossScaler::new(LossScaleConfig::default()).unwrap();
    let mut grads = scaler
        .scale_loss(&linear_loss(&w, &x, 1e-3))
        .unwrap()
        .backward()
        .unwrap();
    scaler.unscale(&mut grads, opt.vars()).unwrap();
    let once = host(grads.get(&w).unwrap());
    let e = scaler.unscale(&mut grads, opt.vars()).unwrap_err();
    assert!(e.to_string().contains("already unscaled"), "{e}");
    assert_eq!(host(grads.get(&w).unwrap()), once);
    let norm = steepest::clip::clip_grad_norm_named(&mut grads, opt.vars(), 1e-4).unwrap();
    let want_norm = once.iter().map(|g| g * g).sum::<f64>().sqrt();
    assert!(
        (norm - want_norm).abs() <= 1e-6 * want_norm,
        "{norm} vs {want_norm}"
    );
    let clipped = host(grads.get(&w).unwrap());
    // The reference: the same AdamW step from the same weights on the
    // clipped gradients, given directly.
    let (_, w2, mut reference) = f16_model();
    let g = Tensor::from_vec(
        clipped.iter().map(|&v| v as f32).collect::<Vec<_>>(),
        (4, 6),
        &Device::Cpu,
    )
    .unwrap();
    reference.step_subset(&[(0, g)]).unwrap();
    assert_eq!(
        scaler.step(&mut opt, &mut grads).unwrap(),
        ScaledStep::Stepped
    );
    assert_eq!(host(w.as_tensor()), host(w2.as_tensor()));

    let mut grads = scaler
        .scale_loss(&linear_loss(&w, &x, 1e-3))
        .unwrap()
        .backward()
        .unwrap();
    opt.set_learning_rate(f64::NAN);
    let s = scaler.scale();
    let e = scaler.step(&mut opt, &mut grads).unwrap_err();
    assert!(matches!(e, steepest::Error::Config { .. }), "{e}");
    assert_eq!(scaler.scale(), s);
    opt.set_learning_rate(1e-2);
    // the store now holds unscaled gradients: a retry steps without a
    // second division
    assert_eq!(
        scaler.step(&mut opt, &mut grads).unwrap(),
        ScaledStep::Stepped
    );
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
        let mut grads = a
            .scale_loss(&linear_loss(&w, &x, c))
            .unwrap()
            .backward()
            .unwrap();
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
        (opt.state_dict().unwrap(), "kind"),
    ];
    for (s, what) in bad {
        let mut c = fresh.clone();
        let e = c.load_state_dict(&s).unwrap_err();
        assert!(
            matches!(e, steepest::Error::Checkpoint { .. }),
            "{what}: {e}"
        );
        assert!(
            e.to_string().contains(what) || what == "kind",
            "{what}: {e}"
        );
        assert_eq!(c.scale(), fresh.scale());
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
        for c in [if rank == 1 { 1e4 } else { 1e-3 }, 1e-3] {
            let mut grads = scaler.scale_loss(&linear_loss(&w, &x, c))?.backward()?;
            outcomes.push(scaler.step(&mut dp, &mut grads)?);
        }
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
