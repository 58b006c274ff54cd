//! Gradient clipping by global norm, against an f64 computation of the norm.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use steepest::clip::{clip_grad_norm, grad_norm};

/// Vars and a gradient store whose gradients are known: the loss
/// `Σ_p ⟨p, c_p⟩` has gradient `c_p` (values in `cs`, f64).
fn setup(scale: f64) -> (Vec<Var>, GradStore, Vec<Vec<f64>>) {
    let mut rng = StdRng::seed_from_u64(11);
    let shapes: [(&[usize], DType); 3] = [
        (&[3, 4], DType::F32),
        (&[5], DType::F64),
        (&[2, 2, 2], DType::F32),
    ];
    let mut vars = Vec::new();
    let mut cs = Vec::new();
    let mut loss: Option<Tensor> = None;
    for (shape, dt) in shapes {
        let n: usize = shape.iter().product();
        let v = Var::zeros(shape, dt, &Device::Cpu).unwrap();
        let c: Vec<f64> = (0..n).map(|_| scale * rng.gen_range(-1.0..1.0)).collect();
        let ct = Tensor::from_vec(c.clone(), shape, &Device::Cpu)
            .unwrap()
            .to_dtype(dt)
            .unwrap();
        // what the gradient will hold, rounded to the var's dtype
        let c_rounded = ct
            .to_dtype(DType::F64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap();
        let term = (v.as_tensor() * &ct)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        loss = Some(match loss {
            None => term,
            Some(l) => (l + term).unwrap(),
        });
        vars.push(v);
        cs.push(c_rounded);
    }
    // a var that takes no part in the loss has no gradient and is skipped
    vars.push(Var::zeros(4, DType::F32, &Device::Cpu).unwrap());
    let grads = loss.unwrap().backward().unwrap();
    (vars, grads, cs)
}

fn grad_values(grads: &GradStore, v: &Var) -> Vec<f64> {
    grads
        .get(v)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

fn norm64(cs: &[Vec<f64>]) -> f64 {
    cs.iter().flatten().map(|x| x * x).sum::<f64>().sqrt()
}

#[test]
fn clips_to_max_norm_and_keeps_direction() {
    let (vars, mut grads, cs) = setup(3.0);
    let norm = norm64(&cs);
    assert!((grad_norm(&grads, &vars).unwrap() - norm).abs() < 1e-6 * norm);
    let max = norm / 3.0;
    let before = clip_grad_norm(&mut grads, &vars, max).unwrap();
    assert!((before - norm).abs() < 1e-6 * norm, "{before} vs {norm}");
    let after: Vec<Vec<f64>> = vars[..3].iter().map(|v| grad_values(&grads, v)).collect();
    let after_norm = norm64(&after);
    assert!(
        (after_norm - max).abs() < 1e-6 * max,
        "{after_norm} vs {max}"
    );
    for (a, c) in after.iter().flatten().zip(cs.iter().flatten()) {
        assert!(
            (a - c * max / norm).abs() < 1e-6,
            "{a} vs {}",
            c * max / norm
        );
    }
    assert!(grads.get(&vars[3]).is_none());
}

#[test]
fn below_max_norm_nothing_changes() {
    let (vars, mut grads, cs) = setup(0.1);
    let norm = norm64(&cs);
    let before: Vec<Vec<f64>> = vars[..3].iter().map(|v| grad_values(&grads, v)).collect();
    let got = clip_grad_norm(&mut grads, &vars, norm * 1.5).unwrap();
    assert!((got - norm).abs() < 1e-6 * norm);
    let after: Vec<Vec<f64>> = vars[..3].iter().map(|v| grad_values(&grads, v)).collect();
    assert_eq!(before, after);
}

#[test]
fn nan_and_bad_max_norm_are_errors_and_change_nothing() {
    let (vars, mut grads, _) = setup(1.0);
    let before: Vec<Vec<f64>> = vars[..3].iter().map(|v| grad_values(&grads, v)).collect();
    for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        let e = clip_grad_norm(&mut grads, &vars, bad)
            .unwrap_err()
            .to_string();
        assert!(e.contains("max_norm"), "{e}");
    }
    // poison one gradient with a NaN
    let g0 = grads.get(&vars[0]).unwrap().clone();
    let mut vals = g0.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    vals[5] = f32::NAN;
    grads.insert(
        &vars[0],
        Tensor::from_vec(vals, g0.shape(), &Device::Cpu).unwrap(),
    );
    // the same error as an optimizer's step, naming the variable as
    // `Optimizer::new` names it (creation order: vars[0] is `param.0`
    // whatever its place in the list) and by its place in the list
    let reversed: Vec<Var> = vars.iter().rev().cloned().collect();
    match clip_grad_norm(&mut grads, &reversed, 1e-3).unwrap_err() {
        steepest::Error::NonFiniteGradient { param } => {
            let want = format!("clip_grad_norm: param.0 (vars[3], shape {:?})", g0.dims());
            assert_eq!(param, want);
        }
        e => panic!("expected NonFiniteGradient, got {e:?}"),
    }
    let mut sgd =
        <steepest::Sgd as candle_nn::Optimizer>::new(reversed, Default::default()).unwrap();
    match sgd.try_step(&grads).unwrap_err() {
        steepest::Error::NonFiniteGradient { param } => assert_eq!(param, "param.0"),
        e => panic!("expected NonFiniteGradient, got {e:?}"),
    }
    // the first such variable: vars[1] poisoned with +Inf, vars[0] fixed
    grads.insert(&vars[0], g0.clone());
    let g1 = grads.get(&vars[1]).unwrap().clone();
    grads.insert(&vars[1], (g1.ones_like().unwrap() * f64::INFINITY).unwrap());
    let e = clip_grad_norm(&mut grads, &vars, 1e-3).unwrap_err();
    assert!(
        matches!(&e, steepest::Error::NonFiniteGradient { param } if param.contains("vars[1]")),
        "{e:?}"
    );
    // named variables: the error names the parameter
    let named: Vec<steepest::optim::NamedVar> = vars
        .iter()
        .enumerate()
        .map(|(i, v)| steepest::optim::NamedVar {
            name: format!("layer{i}.weight"),
            var: v.clone(),
        })
        .collect();
    let e = steepest::clip::clip_grad_norm_named(&mut grads, &named, 1e-3).unwrap_err();
    assert!(
        matches!(&e, steepest::Error::NonFiniteGradient { param } if param == "layer1.weight"),
        "{e:?}"
    );
    grads.insert(&vars[1], g1);
    let after: Vec<Vec<f64>> = vars[1..3].iter().map(|v| grad_values(&grads, v)).collect();
    assert_eq!(&before[1..3], &after[..]);
}

/// Finite gradients whose squares overflow f32 (entries of 1e20: the sum
/// of squares is 1e40 > f32::MAX) still have a finite norm, measured
/// scaled by the largest entry, and are clipped; a variable listed twice
/// counts once; a NaN is still refused.
#[test]
fn huge_finite_gradients_are_measured_and_clipped() {
    let a = Var::new(&[1f32, 2., 3.], &Device::Cpu).unwrap();
    let b = Var::new(&[[1f32, 1.], [1., 1.]], &Device::Cpu).unwrap();
    let loss = |ga: &[f32], gb: f32| {
        let ga = Tensor::new(ga, &Device::Cpu).unwrap();
        ((a.as_tensor() * &ga).unwrap().sum_all().unwrap()
            + (b.as_tensor() * gb as f64).unwrap().sum_all().unwrap())
        .unwrap()
    };
    let mut grads = loss(&[1e20, -2e20, 3e19], 4e19).backward().unwrap();
    let want = (1e40f64 + 4e40 + 9e38 + 4.0 * 1.6e39).sqrt();
    let vars = [a.clone(), b.clone()];
    let norm = grad_norm(&grads, &vars).unwrap();
    assert!((norm - want).abs() <= 1e-6 * want, "{norm:e} vs {want:e}");
    let before = clip_grad_norm(&mut grads, &vars, 1.0).unwrap();
    assert!((before - want).abs() <= 1e-6 * want);
    let after = grad_norm(&grads, &vars).unwrap();
    assert!((after - 1.0).abs() < 1e-5, "{after}");
    // a variable listed twice counts once
    let small = loss(&[3., 4., 0.], 0.).backward().unwrap();
    let once = grad_norm(&small, std::slice::from_ref(&a)).unwrap();
    assert_eq!(grad_norm(&small, &[a.clone(), a.clone()]).unwrap(), once);
    assert!((once - 5.0).abs() < 1e-6);
    // NaN is still an error, and nothing is clipped
    let mut bad = loss(&[1e20, f32::NAN, 1.], 1.).backward().unwrap();
    let e = clip_grad_norm(&mut bad, &vars, 1.0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("NaN or Inf"), "{e}");
}

/// An empty parameter's gradient adds nothing to the norm, also on the
/// rescaling path (it has no largest entry).
#[test]
fn an_empty_gradient_is_skipped_on_every_path() {
    let a = Var::new(&[1f32, 2.], &Device::Cpu).unwrap();
    let e = Var::zeros((0, 3), DType::F32, &Device::Cpu).unwrap();
    for scale in [1f32, 1e20] {
        let g = Tensor::new(&[3f32 * scale, 4. * scale], &Device::Cpu).unwrap();
        let loss = ((a.as_tensor() * &g).unwrap().sum_all().unwrap()
            + e.as_tensor().sum_all().unwrap())
        .unwrap();
        let grads = loss.backward().unwrap();
        assert!(
            grads.get(e.as_tensor()).is_some(),
            "candle gives the empty var a gradient"
        );
        let norm = grad_norm(&grads, &[a.clone(), e.clone()]).unwrap();
        let want = 5.0 * scale as f64;
        assert!((norm - want).abs() <= 1e-6 * want, "{scale}: {norm:e}");
    }
}

/// The scale is exactly `max/‖g‖` at any norm: a gradient of norm ~1e-3
/// clipped to 1e-4 ends at norm 1e-4 within f32 rounding (a scale with an
/// additive guard, `max/(‖g‖ + ε)`, would be off by ~ε/‖g‖ ≈ 1e-3).
#[test]
fn small_gradients_are_clipped_to_exactly_max_norm() {
    let (vars, mut grads, cs) = setup(3e-4);
    let norm = norm64(&cs);
    assert!(norm > 5e-4 && norm < 5e-3, "{norm}");
    let max = 1e-4;
    let before = clip_grad_norm(&mut grads, &vars, max).unwrap();
    assert!((before - norm).abs() < 1e-6 * norm, "{before} vs {norm}");
    let after: Vec<Vec<f64>> = vars[..3].iter().map(|v| grad_values(&grads, v)).collect();
    let got = norm64(&after);
    assert!(
        (got - max).abs() < 1e-6 * max,
        "clipped norm {got:e}, not {max:e}"
    );
}

/// A NaN gradient is named by its place among the variables given, also
/// when a variable before it has no gradient: `vars[1]` here (and its name
/// through `clip_grad_norm_named`).
#[test]
fn a_nan_after_a_variable_without_gradient_names_the_right_one() {
    let (vars, _, _) = setup(1.0);
    // vars[3] takes no part in the loss; put it first.
    let unused = vars[3].clone();
    let poisoned = vars[0].clone();
    let loss = (poisoned.as_tensor().sum_all().unwrap() * f64::NAN).unwrap();
    let mut grads = loss.backward().unwrap();
    let e = clip_grad_norm(&mut grads, &[unused.clone(), poisoned.clone()], 1.0).unwrap_err();
    assert!(
        matches!(&e, steepest::Error::NonFiniteGradient { param } if param.contains("vars[1]")),
        "{e}"
    );
    let named = [
        steepest::optim::NamedVar {
            name: "unused".into(),
            var: unused,
        },
        steepest::optim::NamedVar {
            name: "poisoned".into(),
            var: poisoned,
        },
    ];
    let e = steepest::clip::clip_grad_norm_named(&mut grads, &named, 1.0).unwrap_err();
    assert!(
        matches!(&e, steepest::Error::NonFiniteGradient { param } if param == "poisoned"),
        "{e}"
    );
}

/// f64 gradients are measured in f64 (the docs): entries 3e-30 and 4e-30
/// (whose squares are zero in f32) have the norm 5e-30, and entries 3e200
/// and 4e200 (infinite in f32) the norm 5e200; both are clipped to
/// `max_norm`.
#[test]
fn f64_gradients_are_measured_in_f64() {
    let a = Var::new(&[1f64, 2.], &Device::Cpu).unwrap();
    for scale in [1e-30, 1e200] {
        let g = Tensor::new(&[3.0 * scale, 4.0 * scale], &Device::Cpu).unwrap();
        let mut grads = (a.as_tensor() * &g)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let want = 5.0 * scale;
        let norm = grad_norm(&grads, std::slice::from_ref(&a)).unwrap();
        assert!((norm - want).abs() <= 1e-14 * want, "{norm:e} vs {want:e}");
        let max = 0.5 * want;
        clip_grad_norm(&mut grads, std::slice::from_ref(&a), max).unwrap();
        let after = grad_values(&grads, &a);
        let want_after = [1.5 * scale, 2.0 * scale];
        for (x, w) in after.iter().zip(want_after) {
            assert!((x - w).abs() <= 1e-14 * w, "{x:e} vs {w:e}");
        }
    }
}

/// f32 gradients whose squares underflow to 0 (entries 3e-25 and 4e-25)
/// are measured again scaled by their largest entry: the norm is 5e-25 (f64
/// closed form, to 1e-6), not 0, and clipping to half of it halves them.
#[test]
fn tiny_f32_gradients_are_measured_not_zero() {
    let a = Var::new(&[1f32, 2.], &Device::Cpu).unwrap();
    let g = Tensor::new(&[3e-25f32, 4e-25], &Device::Cpu).unwrap();
    let mut grads = (a.as_tensor() * &g)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let norm = grad_norm(&grads, std::slice::from_ref(&a)).unwrap();
    assert!((norm / 5e-25 - 1.0).abs() <= 1e-6, "{norm:e}");
    clip_grad_norm(&mut grads, std::slice::from_ref(&a), 0.5 * norm).unwrap();
    let after = grad_values(&grads, &a);
    for (x, w) in after.iter().zip([1.5e-25, 2e-25]) {
        assert!((x / w - 1.0).abs() <= 1e-6, "{x:e} vs {w:e}");
    }
}

/// A gradient all of whose entries are subnormal in f32 (squares 0, and
/// 1/max beyond f32's range): its norm is measured, finite and right, not
/// NaN (scaling by 1/max in f32 made every entry Inf and zeros NaN), and
/// clipping halves it.
#[test]
fn subnormal_f32_gradients_are_measured() {
    let a = Var::new(&[1f32, 2., 3.], &Device::Cpu).unwrap();
    let g = Tensor::new(&[1e-40f32, 0.0, 2e-40], &Device::Cpu).unwrap();
    let stored: Vec<f64> = g.to_dtype(DType::F64).unwrap().to_vec1().unwrap();
    assert!(stored[0] > 0.0 && stored[0] < f32::MIN_POSITIVE as f64);
    let want = stored.iter().map(|x| x * x).sum::<f64>().sqrt();
    let mut grads = (a.as_tensor() * &g)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let norm = grad_norm(&grads, std::slice::from_ref(&a)).unwrap();
    assert!((norm / want - 1.0).abs() <= 1e-6, "{norm:e} vs {want:e}");
    clip_grad_norm(&mut grads, std::slice::from_ref(&a), 0.5 * norm).unwrap();
    let after = grad_values(&grads, &a);
    assert_eq!(after[1], 0.0);
    for (x, w) in after.iter().zip(&stored) {
        // half of a subnormal, to its spacing 1.4e-45
        assert!((x - 0.5 * w).abs() <= 1.5e-45, "{x:e} vs {:e}", 0.5 * w);
    }
}

/// All-zero gradients have norm 0 (the rescaling path, taken because the
/// sum of squares is 0, finds a largest entry of 0 and must not divide by
/// it), are not an error, and are left as they are; with no gradient at all
/// (vars that took no part in the loss) the norm is 0 too.
#[test]
fn zero_gradients_and_no_gradients_have_norm_zero() {
    let (vars, grads, _) = setup(0.0);
    for v in &vars[..3] {
        assert!(grad_values(&grads, v).iter().all(|&x| x == 0.0));
    }
    assert_eq!(grad_norm(&grads, &vars).unwrap(), 0.0);
    let mut grads = grads;
    assert_eq!(clip_grad_norm(&mut grads, &vars, 1.0).unwrap(), 0.0);
    for v in &vars[..3] {
        assert!(grad_values(&grads, v).iter().all(|&x| x == 0.0));
    }
    // No var has a gradient: the store of an unrelated loss.
    let other = Var::new(&[1f32, 2.], &Device::Cpu).unwrap();
    let mut grads = other.as_tensor().sum_all().unwrap().backward().unwrap();
    assert_eq!(grad_norm(&grads, &vars).unwrap(), 0.0);
    assert_eq!(clip_grad_norm(&mut grads, &vars, 1.0).unwrap(), 0.0);
}

/// `NamedVar::from_varmap` names a `VarMap`'s float variables by their
/// `VarMap` names, sorted, so that clipping's NaN error names the
/// parameter without an optimizer at hand; an empty `VarMap` is refused.
#[test]
fn clipping_names_a_varmaps_parameter() {
    use candle_nn::{Init, VarMap};
    use steepest::optim::NamedVar;
    let vm = VarMap::new();
    let err = NamedVar::from_varmap(&vm).unwrap_err().to_string();
    assert!(err.contains("build the model first"), "{err}");
    let dev = Device::Cpu;
    let b = vm
        .get(3, "fc.bias", Init::Const(0.5), DType::F32, &dev)
        .unwrap();
    let w = vm
        .get((3, 2), "fc.weight", Init::Const(1.0), DType::F32, &dev)
        .unwrap();
    let named = NamedVar::from_varmap(&vm).unwrap();
    let names: Vec<&str> = named.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["fc.bias", "fc.weight"]);
    let loss = (b.sum_all().unwrap() + w.sqr().unwrap().sum_all().unwrap()).unwrap();
    let mut grads = loss.backward().unwrap();
    let bad = Tensor::new(&[[1f32, f32::NAN], [0., 0.], [0., 0.]], &dev).unwrap();
    let wv = named[1].var.as_tensor().clone();
    grads.insert(&wv, bad);
    let e = steepest::clip::clip_grad_norm_named(&mut grads, &named, 1.0).unwrap_err();
    assert!(
        matches!(&e, steepest::Error::NonFiniteGradient { param } if param == "fc.weight"),
        "{e:?}"
    );
}

/// f16 and bf16 gradients are clipped by a factor kept in f32: candle's
/// `affine` rounds the factor to the gradient's dtype, so in f16 a factor
/// below 6.1e-5 lost bits (1e-7 became 1.19e-7, the clipped norm 19 %
/// above `max_norm`) and one below 3e-8 became 0, zeroing every gradient
/// without an error. 36 entries of 6e4 clipped to a global norm of 1e-3
/// (factor 2.8e-9) and of 1e3 to 1e-2 (factor 1.7e-6, an f16 subnormal
/// with 5 bits): the clipped norm is `max_norm` to the dtype's rounding.
#[test]
fn half_precision_gradients_are_clipped_by_an_f32_factor() {
    for dt in [DType::F16, DType::BF16] {
        for (entry, max_norm) in [(6e4f64, 1e-3), (1e3, 1e-2)] {
            let v = Var::zeros((4, 9), dt, &Device::Cpu).unwrap();
            let c = Tensor::full(entry as f32, (4, 9), &Device::Cpu)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            let mut grads = (v.as_tensor() * &c)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .backward()
                .unwrap();
            let vars = [v.clone()];
            let before = clip_grad_norm(&mut grads, &vars, max_norm).unwrap();
            assert!(before > 5e3, "{dt:?}: {before}");
            assert_eq!(grads.get(&v).unwrap().dtype(), dt);
            let after = grad_norm(&grads, &vars).unwrap();
            let u = if dt == DType::F16 {
                2f64.powi(-11)
            } else {
                2f64.powi(-8)
            };
            assert!(
                (after - max_norm).abs() <= 2.0 * u * max_norm,
                "{dt:?}, entries {entry:e}: clipped to {after:e}, not {max_norm:e}"
            );
        }
    }
}
