//! The spectral norm penalty `λ/2 Σ σ₁(W)²` (Yoshida & Miyato; docs/math.md
//! §1): its value and gradient against an f64 SVD and finite differences of
//! the SVD's `σ₁`, its warm start, batching, the SGD step it equals, bad
//! input and checkpoints.

mod common;

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Optimizer, VarBuilder, VarMap};
use common::{from_dmatrix, max_abs_diff, normal_vec, rng, to_dmatrix, with_singular_values};
use nalgebra::DMatrix;
use rand::rngs::StdRng;
use steepest::checkpoint::HEADER_KEY;
use steepest::decay::spectral_decay;
use steepest::optim::NamedVar;
use steepest::penalty::SpectralNormPenalty;
use steepest::{power_iteration, Error, OptimizerState};

/// A named variable holding `a` (shape `dims`, row-major like `a`'s rows).
fn named(name: &str, a: &DMatrix<f64>, dims: &[usize], dtype: DType) -> NamedVar {
    let t = from_dmatrix(a, dtype).reshape(dims).unwrap();
    NamedVar {
        name: name.into(),
        var: Var::from_tensor(&t).unwrap(),
    }
}

/// `σ₁(a)` and `∇ ½σ₁(a)² = σ₁u₁v₁ᵀ` by f64 SVD.
fn svd_top(a: &DMatrix<f64>) -> (f64, DMatrix<f64>) {
    let svd = a.clone().svd(true, true);
    let (u, vt) = (svd.u.unwrap(), svd.v_t.unwrap());
    let k = svd.singular_values.imax();
    let s = svd.singular_values[k];
    (s, u.column(k) * vt.row(k) * s)
}

/// A matrix with singular values `3, 1.5, 1, 0.5, …` (gap 0.5).
fn gapped(r: &mut StdRng, m: usize, n: usize) -> DMatrix<f64> {
    let k = m.min(n);
    let s: Vec<f64> = (0..k)
        .map(|i| if i == 0 { 3.0 } else { 1.5 / i as f64 })
        .collect();
    with_singular_values(r, m, n, &s)
}

fn grad_of(loss: &Tensor, var: &Var) -> Tensor {
    loss.backward().unwrap().get(var).unwrap().clone()
}

#[test]
fn value_and_gradient_match_the_svd() {
    let mut r = rng(1);
    let lambda = 0.3;
    // (matrix view, parameter shape): tall, wide, square, 1 × n, n × 1, rank 3.
    let cases: [((usize, usize), Vec<usize>); 6] = [
        ((7, 4), vec![7, 4]),
        ((3, 8), vec![3, 8]),
        ((5, 5), vec![5, 5]),
        ((1, 6), vec![1, 6]),
        ((6, 1), vec![6, 1]),
        ((4, 6), vec![4, 2, 3]),
    ];
    for dtype in [DType::F64, DType::F32] {
        for ((m, n), dims) in &cases {
            let a = gapped(&mut r, *m, *n);
            let nv = named("w", &a, dims, dtype);
            let var = nv.var.clone();
            let mut p = SpectralNormPenalty::from_named(vec![nv], lambda)
                .unwrap()
                .with_iters(40)
                .unwrap();
            let loss = p.loss().unwrap();
            let (s, g) = svd_top(&a);
            let tol = if dtype == DType::F64 { 1e-10 } else { 1e-5 };
            let value = loss
                .to_dtype(DType::F64)
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert!(
                (value - lambda / 2.0 * s * s).abs() <= tol * s * s,
                "{dims:?} {dtype:?}: penalty {value} vs λ/2 σ₁² = {}",
                lambda / 2.0 * s * s
            );
            assert!((p.sigmas()[0].1 - s).abs() <= tol * s, "{dims:?} σ₁");
            let grad = grad_of(&loss, &var);
            assert_eq!(grad.dims(), &dims[..]);
            let got = to_dmatrix(&grad.reshape((*m, *n)).unwrap());
            let want = &g * lambda;
            let err = (&got - &want).abs().max();
            assert!(
                err <= tol * 10.0,
                "{dims:?} {dtype:?}: gradient off by {err}"
            );
        }
    }
}

#[test]
fn gradient_matches_finite_differences_of_the_svd() {
    // ⟨∇P, D⟩ against (P(W + hD) − P(W − hD))/2h with P = λ/2 σ₁², σ₁ from
    // an f64 SVD: the gradient of the actual spectral norm, not of the formula.
    let mut r = rng(2);
    let lambda = 0.7;
    for (m, n) in [(6, 4), (4, 9), (5, 5)] {
        let a = DMatrix::from_vec(m, n, normal_vec(&mut r, m * n));
        let d = DMatrix::from_vec(m, n, normal_vec(&mut r, m * n));
        let nv = named("w", &a, &[m, n], DType::F64);
        let var = nv.var.clone();
        let mut p = SpectralNormPenalty::from_named(vec![nv], lambda)
            .unwrap()
            .with_iters(200)
            .unwrap();
        let grad = to_dmatrix(&grad_of(&p.loss().unwrap(), &var));
        let pen = |x: &DMatrix<f64>| {
            let s = common::singular_values(x)[0];
            lambda / 2.0 * s * s
        };
        let h = 1e-5;
        let fd = (pen(&(&a + &d * h)) - pen(&(&a - &d * h))) / (2.0 * h);
        let an = grad.dot(&d);
        assert!(
            (an - fd).abs() <= 1e-6 * fd.abs().max(1.0),
            "{m}×{n}: ⟨∇P, D⟩ = {an}, finite difference {fd}"
        );
    }
}

#[test]
fn one_iteration_per_call_converges_by_warm_start() {
    // σ₂/σ₁ = 0.9: ten cold iterations leave an error the warm starts remove.
    let mut r = rng(3);
    let a = with_singular_values(&mut r, 12, 8, &[2.0, 1.8, 1.0, 0.5]);
    let nv = named("w", &a, &[12, 8], DType::F64);
    let mut p = SpectralNormPenalty::from_named(vec![nv], 1.0).unwrap();
    assert_eq!(p.iters(), 1);
    let mut errs = Vec::new();
    for _ in 0..60 {
        p.loss().unwrap();
        errs.push((p.sigmas()[0].1 - 2.0).abs());
    }
    assert!(
        errs[0] > 1e-4,
        "the cold start alone is not converged: {}",
        errs[0]
    );
    assert!(errs[59] < 1e-9, "after 60 calls σ₁ is off by {}", errs[59]);
    assert!(errs.windows(2).all(|w| w[1] <= w[0] + 1e-15), "{errs:?}");
}

#[test]
fn matrices_batched_together_give_what_each_gives_alone() {
    let mut r = rng(4);
    let shapes = [(6, 4), (6, 4), (3, 5), (6, 4)];
    let mats: Vec<DMatrix<f64>> = shapes
        .iter()
        .map(|&(m, n)| DMatrix::from_vec(m, n, normal_vec(&mut r, m * n)))
        .collect();
    let together: Vec<NamedVar> = mats
        .iter()
        .enumerate()
        .map(|(i, a)| named(&format!("w{i}"), a, &[a.nrows(), a.ncols()], DType::F32))
        .collect();
    let vars: Vec<Var> = together.iter().map(|nv| nv.var.clone()).collect();
    let mut all = SpectralNormPenalty::from_named(together, 0.5).unwrap();
    let loss = all.loss().unwrap();
    let grads = loss.backward().unwrap();
    let mut sum = 0.0;
    for (i, a) in mats.iter().enumerate() {
        let nv = named("w", a, &[a.nrows(), a.ncols()], DType::F32);
        let var = nv.var.clone();
        let mut one = SpectralNormPenalty::from_named(vec![nv], 0.5).unwrap();
        let l = one.loss().unwrap();
        sum += l.to_scalar::<f32>().unwrap() as f64;
        let g = grad_of(&l, &var);
        assert!(
            max_abs_diff(grads.get(&vars[i]).unwrap(), &g) < 1e-6,
            "w{i}"
        );
        assert!((all.sigmas()[i].1 - one.sigmas()[0].1).abs() < 1e-6, "w{i}");
    }
    let total = loss.to_scalar::<f32>().unwrap() as f64;
    assert!((total - sum).abs() < 1e-5 * sum, "{total} vs {sum}");
}

#[test]
fn an_sgd_step_on_the_penalty_is_a_spectral_decay_step() {
    // W − η∇(λ/2 σ₁²) = W − ηλ σ₁u₁v₁ᵀ: spectral decay with coefficient ηλ.
    let mut r = rng(5);
    let (lr, lambda) = (0.1, 0.4);
    for (m, n) in [(7, 5), (4, 9)] {
        let a = gapped(&mut r, m, n);
        let nv = named("w", &a, &[m, n], DType::F64);
        let var = nv.var.clone();
        let w0 = var.as_tensor().copy().unwrap();
        let mut p = SpectralNormPenalty::from_named(vec![nv], lambda)
            .unwrap()
            .with_iters(60)
            .unwrap();
        let mut sgd = candle_nn::SGD::new(vec![var.clone()], lr).unwrap();
        sgd.backward_step(&p.loss().unwrap()).unwrap();
        let top = power_iteration(&w0, None, 60).unwrap();
        let want = spectral_decay(&w0, &top, lr * lambda).unwrap();
        assert!(max_abs_diff(var.as_tensor(), &want) < 1e-12, "{m}×{n}");
        let s = common::singular_values(&to_dmatrix(var.as_tensor()));
        assert!(
            (s[0] - 3.0 * (1.0 - lr * lambda)).abs() < 1e-10,
            "σ₁ {}",
            s[0]
        );
        assert!((s[1] - 1.5).abs() < 1e-10, "σ₂ {} unchanged", s[1]);
    }
}

#[test]
fn half_precision_and_mixed_dtypes() {
    let mut r = rng(6);
    let a = gapped(&mut r, 8, 6);
    let b = gapped(&mut r, 5, 5);
    // 16-bit weights: against the SVD of the rounded matrix; the gradient
    // within a few of its dtype's ulps (|g| < 4), the value in f32.
    for (dt, ulp) in [(DType::BF16, 2f64.powi(-8)), (DType::F16, 2f64.powi(-11))] {
        let wa = named("a", &a, &[8, 6], dt);
        let va = wa.var.clone();
        let mut p = SpectralNormPenalty::from_named(vec![wa], 1.0)
            .unwrap()
            .with_iters(30)
            .unwrap();
        let loss = p.loss().unwrap();
        assert_eq!(loss.dtype(), DType::F32);
        let (s, want) = svd_top(&to_dmatrix(va.as_tensor()));
        let value = loss.to_scalar::<f32>().unwrap() as f64;
        assert!(
            (value - s * s / 2.0).abs() < 1e-5 * s * s,
            "{dt:?}: {value} vs {}",
            s * s / 2.0
        );
        assert!((p.sigmas()[0].1 - s).abs() < 1e-5 * s, "{dt:?}: σ₁");
        let g = grad_of(&loss, &va);
        assert_eq!(g.dtype(), dt);
        let err = (to_dmatrix(&g) - want).abs().max();
        assert!(err < 3.0 * ulp * 4.0, "{dt:?} gradient off by {err}");
    }
    // f32 and f64 together: an f64 scalar, each term and gradient as alone.
    let mixed = vec![
        named("a", &a, &[8, 6], DType::F32),
        named("b", &b, &[5, 5], DType::F64),
    ];
    let vars: Vec<Var> = mixed.iter().map(|nv| nv.var.clone()).collect();
    let mut p = SpectralNormPenalty::from_named(mixed, 0.5)
        .unwrap()
        .with_iters(40)
        .unwrap();
    let loss = p.loss().unwrap();
    assert_eq!(loss.dtype(), DType::F64);
    let ((sa, ga), (sb, gb)) = (svd_top(&a), svd_top(&b));
    let want = 0.25 * (sa * sa + sb * sb);
    let value = loss.to_scalar::<f64>().unwrap();
    assert!((value - want).abs() < 1e-5 * want, "{value} vs {want}");
    let grads = loss.backward().unwrap();
    let (got_a, got_b) = (grads.get(&vars[0]).unwrap(), grads.get(&vars[1]).unwrap());
    assert_eq!((got_a.dtype(), got_b.dtype()), (DType::F32, DType::F64));
    assert!((to_dmatrix(got_a) - ga * 0.5).abs().max() < 1e-5);
    assert!((to_dmatrix(got_b) - gb * 0.5).abs().max() < 1e-10);
}

#[test]
fn equal_top_singular_values_still_give_the_penalty() {
    // σ₁ = σ₂: the pair (u, v) is any in the top subspace, the value is
    // still λ/2 σ₁², and the gradient λσ₁uvᵀ has ‖·‖_F = λσ₁ and
    // ⟨∇, W⟩ = λσ₁² (uᵀWv = σ₁ for any such pair).
    let mut r = rng(14);
    let lambda = 0.6;
    for (m, n) in [(7, 5), (4, 8)] {
        let a = with_singular_values(&mut r, m, n, &[2.0, 2.0, 0.5]);
        let nv = named("w", &a, &[m, n], DType::F64);
        let var = nv.var.clone();
        let mut p = SpectralNormPenalty::from_named(vec![nv], lambda)
            .unwrap()
            .with_iters(30)
            .unwrap();
        let loss = p.loss().unwrap();
        let value = loss.to_scalar::<f64>().unwrap();
        assert!((value - lambda * 2.0).abs() < 1e-9, "{m}×{n}: {value}");
        let g = to_dmatrix(&grad_of(&loss, &var));
        assert!(
            (g.norm() - lambda * 2.0).abs() < 1e-9,
            "{m}×{n}: ‖∇‖ = {}",
            g.norm()
        );
        assert!(
            (g.dot(&a) - lambda * 4.0).abs() < 1e-9,
            "{m}×{n}: ⟨∇, W⟩ = {}",
            g.dot(&a)
        );
    }
}

#[test]
fn an_overflowing_penalty_is_refused_and_changes_nothing() {
    // f32 weights whose σ₁ is finite but σ₁² (or λ/2·σ₁²) is not in f32.
    let mut r = rng(15);
    let a = gapped(&mut r, 5, 4);
    let small = named("small", &a, &[5, 4], DType::F32);
    for (scale, lambda) in [(1e20 / 3.0, 1.0), (1.5e19 / 3.0, 4.0)] {
        let big = named("big", &(&a * scale), &[5, 4], DType::F32);
        let mut p = SpectralNormPenalty::from_named(vec![small.clone(), big], lambda).unwrap();
        let e = p.loss().unwrap_err();
        assert!(
            matches!(&e, Error::Numerical { who, .. } if who == "big")
                && e.to_string().contains("overflows"),
            "{scale:e}: {e}"
        );
        assert!(p.sigmas().is_empty());
        assert!(p.state_dict().unwrap().len() == 1, "no vector stored");
    }
    // Just inside: σ₁ = 1.5e19, λ = 1 gives λ/2·σ₁² ≈ 1.1e38 < f32::MAX.
    let big = named("big", &(&a * (1.5e19 / 3.0)), &[5, 4], DType::F32);
    let mut p = SpectralNormPenalty::from_named(vec![big], 1.0).unwrap();
    assert!(p.loss().unwrap().to_scalar::<f32>().unwrap().is_finite());
}

#[test]
fn from_varmap_takes_the_matrices_only() {
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    candle_nn::linear(4, 3, vb.pp("fc1")).unwrap();
    candle_nn::linear(3, 2, vb.pp("fc2")).unwrap();
    let p = SpectralNormPenalty::from_varmap(&varmap, 1e-3).unwrap();
    assert_eq!(p.names(), ["fc1.weight", "fc2.weight"]);

    let only_bias = VarMap::new();
    let vb = VarBuilder::from_varmap(&only_bias, DType::F32, &Device::Cpu);
    vb.get_with_hints(3, "bias", candle_nn::Init::Const(0.0))
        .unwrap();
    let e = SpectralNormPenalty::from_varmap(&only_bias, 1e-3).unwrap_err();
    assert!(
        matches!(e, Error::Config { .. }) && e.to_string().contains("no matrix"),
        "{e}"
    );
}

#[test]
fn bad_configuration_is_refused_naming_what_is_wrong() {
    let mut r = rng(7);
    let a = gapped(&mut r, 3, 3);
    let w = || named("w", &a, &[3, 3], DType::F32);
    for lambda in [-1.0, f64::NAN, f64::INFINITY] {
        let e = SpectralNormPenalty::from_named(vec![w()], lambda).unwrap_err();
        assert!(e.to_string().contains("lambda"), "{e}");
    }
    let e = SpectralNormPenalty::from_named(vec![w()], 1.0)
        .unwrap()
        .with_iters(0)
        .unwrap_err();
    assert!(e.to_string().contains("iters"), "{e}");
    let mut p = SpectralNormPenalty::from_named(vec![w()], 1.0).unwrap();
    assert!(p.set_lambda(-0.5).is_err());
    assert_eq!(p.lambda(), 1.0);

    let bias = NamedVar {
        name: "fc.bias".into(),
        var: Var::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    };
    let e = SpectralNormPenalty::from_named(vec![w(), bias], 1.0).unwrap_err();
    assert!(
        matches!(&e, Error::Shape { who, .. } if who == "fc.bias") && e.to_string().contains("[3]"),
        "{e}"
    );
    let e = SpectralNormPenalty::from_named(Vec::new(), 1.0).unwrap_err();
    assert!(matches!(e, Error::Config { .. }), "{e}");
    let e = SpectralNormPenalty::from_named(vec![w(), w()], 1.0).unwrap_err();
    assert!(e.to_string().contains("share this name"), "{e}");
    let empty = NamedVar {
        name: "e".into(),
        var: Var::zeros((0, 3), DType::F32, &Device::Cpu).unwrap(),
    };
    let e = SpectralNormPenalty::from_named(vec![empty], 1.0).unwrap_err();
    assert!(e.to_string().contains("empty"), "{e}");
}

#[test]
fn non_finite_weights_are_refused_and_change_nothing() {
    let mut r = rng(8);
    let a = gapped(&mut r, 6, 4);
    let b = gapped(&mut r, 4, 4);
    let good = named("good", &a, &[6, 4], DType::F32);
    let bad = named("bad", &b, &[4, 4], DType::F32);
    let bad_var = bad.var.clone();
    let mut p = SpectralNormPenalty::from_named(vec![good, bad], 1.0).unwrap();
    p.loss().unwrap();
    let before = p.state_dict().unwrap();
    let sigmas: Vec<f64> = p.sigmas().iter().map(|s| s.1).collect();
    for poison in [f32::NAN, f32::INFINITY] {
        let mut w = bad_var
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        w[5] = poison;
        bad_var
            .set(&Tensor::from_vec(w, (4, 4), &Device::Cpu).unwrap())
            .unwrap();
        let e = p.loss().unwrap_err();
        assert!(
            matches!(&e, Error::Numerical { who, .. } if who == "bad"),
            "{poison}: {e}"
        );
        let after = p.state_dict().unwrap();
        for (k, t) in &before {
            assert_eq!(max_abs_diff(t, &after[k]), 0.0, "{k} changed");
        }
        let now: Vec<f64> = p.sigmas().iter().map(|s| s.1).collect();
        assert_eq!(now, sigmas);
    }
}

#[test]
fn a_zero_matrix_has_zero_penalty_and_gradient() {
    for (m, n) in [(5, 3), (3, 5), (1, 4)] {
        let var = Var::zeros((m, n), DType::F32, &Device::Cpu).unwrap();
        let nv = NamedVar {
            name: "z".into(),
            var: var.clone(),
        };
        let mut p = SpectralNormPenalty::from_named(vec![nv], 1.0).unwrap();
        let loss = p.loss().unwrap();
        assert_eq!(loss.to_scalar::<f32>().unwrap(), 0.0);
        assert_eq!(p.sigmas()[0].1, 0.0);
        let g = grad_of(&loss, &var);
        assert_eq!(max_abs_diff(&g, &g.zeros_like().unwrap()), 0.0, "{m}×{n}");
    }
}

fn two_matrices(seed: u64) -> Vec<NamedVar> {
    let mut r = rng(seed);
    let a = gapped(&mut r, 6, 4);
    let b = with_singular_values(&mut r, 5, 7, &[2.0, 1.9, 1.0]);
    vec![
        named("l1.weight", &a, &[6, 4], DType::F32),
        named("l2.weight", &b, &[5, 7], DType::F32),
    ]
}

#[test]
fn a_loaded_checkpoint_continues_exactly() {
    let mut p = SpectralNormPenalty::from_named(two_matrices(9), 0.25)
        .unwrap()
        .with_iters(2)
        .unwrap();
    for _ in 0..3 {
        p.loss().unwrap();
    }
    let dir = common::scratch_dir("penalty_spectral_norm", "resume");
    let path = dir.join("penalty.safetensors");
    p.save_state(&path).unwrap();
    let mut q = SpectralNormPenalty::from_named(two_matrices(9), 9.0).unwrap();
    q.load_state(&path).unwrap();
    assert_eq!((q.lambda(), q.iters()), (0.25, 2));
    assert!(q.sigmas().is_empty());
    let (a, b) = (p.loss().unwrap(), q.loss().unwrap());
    assert_eq!(a.to_scalar::<f32>().unwrap(), b.to_scalar::<f32>().unwrap());
    // A fresh penalty (cold start) gives another value: the vectors mattered.
    let mut fresh = SpectralNormPenalty::from_named(two_matrices(9), 0.25)
        .unwrap()
        .with_iters(2)
        .unwrap();
    let c = fresh.loss().unwrap().to_scalar::<f32>().unwrap();
    assert_ne!(c, b.to_scalar::<f32>().unwrap());
}

#[test]
fn mismatched_checkpoints_are_refused_and_change_nothing() {
    let mut p = SpectralNormPenalty::from_named(two_matrices(10), 0.5).unwrap();
    p.loss().unwrap();
    let good = p.state_dict().unwrap();
    let mut q = SpectralNormPenalty::from_named(two_matrices(11), 0.1).unwrap();
    q.loss().unwrap();
    let q_before = q.state_dict().unwrap();

    let mut cases: Vec<(&str, HashMap<String, Tensor>)> = Vec::new();
    let mut wrong_shape = good.clone();
    wrong_shape.insert(
        "l1.weight.v".into(),
        Tensor::zeros(5, DType::F32, &Device::Cpu).unwrap(),
    );
    cases.push(("shape", wrong_shape));
    let mut wrong_dtype = good.clone();
    wrong_dtype.insert(
        "l1.weight.v".into(),
        Tensor::zeros(4, DType::F64, &Device::Cpu).unwrap(),
    );
    cases.push(("dtype", wrong_dtype));
    let mut extra = good.clone();
    extra.insert(
        "l1.weight.u".into(),
        Tensor::zeros(6, DType::F32, &Device::Cpu).unwrap(),
    );
    cases.push(("keeps no `u`", extra));
    let mut stranger = good.clone();
    stranger.insert(
        "l3.weight.v".into(),
        Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap(),
    );
    cases.push(("not a `<parameter>.<slot>` key of this penalty", stranger));
    let mut no_header = good.clone();
    no_header.remove(HEADER_KEY);
    cases.push(("header", no_header));
    for (what, v) in [
        ("NaN", vec![f32::NAN; 4]),
        ("zero", vec![0.0; 4]),
        ("norm 2", vec![1.0; 4]),
    ] {
        let mut not_unit = good.clone();
        not_unit.insert(
            "l1.weight.v".into(),
            Tensor::from_vec(v, 4, &Device::Cpu).unwrap(),
        );
        cases.push((
            if what == "NaN" {
                "norm NaN"
            } else {
                "unit vector"
            },
            not_unit,
        ));
    }
    let bad_lambda = common::with_header(&good, |h| h["body"]["lambda"] = (-1.0).into());
    cases.push(("bad hyperparameters", bad_lambda));
    let other_names = {
        let vars = vec![two_matrices(10).remove(0)];
        let mut o = SpectralNormPenalty::from_named(vars, 0.5).unwrap();
        o.loss().unwrap();
        o.state_dict().unwrap()
    };
    cases.push(("l2.weight", other_names));
    let adamw = {
        let vars: Vec<Var> = two_matrices(10).into_iter().map(|nv| nv.var).collect();
        let opt = steepest::AdamW::new(vars, Default::default()).unwrap();
        opt.state_dict().unwrap()
    };
    cases.push(("adamw", adamw));

    for (what, state) in cases {
        let e = q.load_state_dict(&state).unwrap_err();
        assert!(matches!(e, Error::Checkpoint { .. }), "{what}: {e}");
        assert!(e.to_string().contains(what), "{what}: {e}");
        let after = q.state_dict().unwrap();
        assert_eq!(after.len(), q_before.len());
        for (k, t) in &q_before {
            assert_eq!(max_abs_diff(t, &after[k]), 0.0, "{what}: {k} changed");
        }
        assert_eq!(q.lambda(), 0.1, "{what}");
    }
    // A checkpoint without a matrix's vector: that matrix starts cold.
    let mut partial = good.clone();
    partial.remove("l2.weight.v");
    q.load_state_dict(&partial).unwrap();
    assert!(!q.state_dict().unwrap().contains_key("l2.weight.v"));
}

#[test]
fn the_generic_path_gives_what_the_cpu_path_gives() {
    // Metal's path (candle's ops: stacked power iteration, vectors set one
    // by one), forced on CPU tensors, over three calls (cold, then warm).
    let make = || {
        two_matrices(12)
            .into_iter()
            .chain(two_matrices(13))
            .collect::<Vec<_>>()
    };
    let renamed = |vs: Vec<NamedVar>| -> Vec<NamedVar> {
        vs.into_iter()
            .enumerate()
            .map(|(i, nv)| NamedVar {
                name: format!("w{i}"),
                var: nv.var,
            })
            .collect()
    };
    let (a_vars, b_vars) = (renamed(make()), renamed(make()));
    let mut cpu = SpectralNormPenalty::from_named(a_vars.clone(), 0.2).unwrap();
    let mut gen = SpectralNormPenalty::from_named(b_vars.clone(), 0.2).unwrap();
    for call in 0..3 {
        let la = cpu.loss().unwrap();
        let lb = steepest::device::with_generic_ops(|| gen.loss()).unwrap();
        let (x, y) = (
            la.to_scalar::<f32>().unwrap(),
            lb.to_scalar::<f32>().unwrap(),
        );
        assert!((x - y).abs() <= 1e-5 * x, "call {call}: {x} vs {y}");
        let (ga, gb) = (la.backward().unwrap(), lb.backward().unwrap());
        // u and v are held fixed: on the generic path they come from ops on
        // the power iteration's state variables, which backward must not
        // walk (the store would hold gradients for them and their inputs).
        assert_eq!(gb.get_ids().count(), ga.get_ids().count(), "call {call}");
        for (p, q) in a_vars.iter().zip(&b_vars) {
            let d = max_abs_diff(ga.get(&p.var).unwrap(), gb.get(&q.var).unwrap());
            assert!(d < 1e-5, "call {call} {}: {d}", p.name);
        }
    }
}

/// `add_to_grads` gives the gradient of `loss + penalty` without the graph:
/// against `(loss + penalty.loss()).backward()` on f32, bf16 and f64
/// matrices (one of rank 3, one with no gradient in the store), over three
/// calls (cold, then warm), the same value and gradients.
#[test]
fn add_to_grads_equals_the_penalty_in_the_loss() {
    let mut r = rng(16);
    let shapes: [(&[usize], DType); 5] = [
        (&[7, 5], DType::F32),
        (&[7, 5], DType::F32),
        (&[4, 9], DType::BF16),
        (&[3, 2, 4], DType::F64),
        (&[6, 6], DType::F32),
    ];
    let make = || -> Vec<NamedVar> {
        let mut r = rng(17);
        shapes
            .iter()
            .enumerate()
            .map(|(i, (dims, dt))| NamedVar {
                name: format!("w{i}"),
                var: Var::from_tensor(&common::randn(&mut r, dims, *dt)).unwrap(),
            })
            .collect()
    };
    let (a, b) = (make(), make());
    let x: Vec<Tensor> = (0..4)
        .map(|i| common::randn(&mut r, shapes[i].0, DType::F64))
        .collect();
    // A loss over the first four matrices (the fifth has no gradient).
    let data_loss = |vars: &[NamedVar]| -> Tensor {
        let terms: Vec<Tensor> = (0..4)
            .map(|i| {
                let w = vars[i].var.as_tensor().to_dtype(DType::F64).unwrap();
                (w * &x[i]).unwrap().sum_all().unwrap().sqr().unwrap()
            })
            .collect();
        Tensor::stack(&terms, 0).unwrap().sum_all().unwrap()
    };
    let mut in_loss = SpectralNormPenalty::from_named(a.clone(), 0.3).unwrap();
    let mut added = SpectralNormPenalty::from_named(b.clone(), 0.3).unwrap();
    for call in 0..3 {
        let pen = in_loss.loss().unwrap().to_dtype(DType::F64).unwrap();
        let want_value = pen.to_scalar::<f64>().unwrap();
        let want = (data_loss(&a) + pen).unwrap().backward().unwrap();
        let mut got = data_loss(&b).backward().unwrap();
        assert!(got.get(b[4].var.as_tensor()).is_none());
        let value = added.add_to_grads(&mut got).unwrap();
        assert!(
            (value - want_value).abs() <= 1e-6 * want_value,
            "call {call}: {value} vs {want_value}"
        );
        for (p, q) in a.iter().zip(&b) {
            let (w, g) = (
                want.get(p.var.as_tensor()).unwrap(),
                got.get(q.var.as_tensor()).unwrap(),
            );
            assert_eq!((g.dims(), g.dtype()), (w.dims(), w.dtype()), "{}", p.name);
            let scale = common::to_f64_vec(w)
                .iter()
                .fold(0f64, |m, x| m.max(x.abs()));
            let tol = if w.dtype() == DType::BF16 { 1e-2 } else { 1e-5 } * scale.max(1.0);
            let d = max_abs_diff(w, g);
            assert!(
                d <= tol,
                "call {call} {}: off by {d} (scale {scale})",
                p.name
            );
        }
    }
}

/// With a `LossScaler` and an f16 matrix stepped through master weights:
/// after `unscale` the store holds the f32 gradient, which `add_to_grads`
/// now takes (it refused it, the matrix being f16), keeping it f32: the
/// unscaled data gradient plus `λσ₁u₁v₁ᵀ` of the f16 matrix (f64 SVD).
#[test]
fn add_to_grads_takes_the_unscaled_f32_gradient_of_an_f16_matrix() {
    use steepest::loss_scale::{LossScaleConfig, LossScaler};
    let mut r = rng(19);
    let a = gapped(&mut r, 6, 4);
    let w = named("w", &a, &[6, 4], DType::F16);
    let x = common::randn(&mut r, &[6, 4], DType::F32);
    let loss = (w.var.as_tensor().to_dtype(DType::F32).unwrap() * &x)
        .unwrap()
        .sum_all()
        .unwrap();
    let s = 1024.0;
    let mut scaler = LossScaler::new(LossScaleConfig {
        init_scale: s,
        ..Default::default()
    })
    .unwrap();
    let mut grads = scaler.scale_loss(&loss).unwrap().backward().unwrap();
    assert_eq!(grads.get(w.var.as_tensor()).unwrap().dtype(), DType::F16);
    scaler
        .unscale(&mut grads, std::slice::from_ref(&w))
        .unwrap();
    let mut p = SpectralNormPenalty::from_named(vec![w.clone()], 0.5).unwrap();
    p.add_to_grads(&mut grads).unwrap();
    let got = grads.get(w.var.as_tensor()).unwrap();
    assert_eq!(got.dtype(), DType::F32);
    // The data gradient as the f16 backward pass and the unscaling left it.
    let data = x
        .affine(s, 0.0)
        .unwrap()
        .to_dtype(DType::F16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .affine(1.0 / s, 0.0)
        .unwrap();
    let (_, top) = svd_top(&to_dmatrix(w.var.as_tensor()));
    let want = (from_dmatrix(&(top * 0.5), DType::F32) + data).unwrap();
    let d = max_abs_diff(got, &want);
    assert!(d < 1e-4, "off by {d}");
}

/// `add_to_grads` on non-finite weights or a gradient of the wrong shape:
/// an error naming the matrix, and neither the store nor a vector changed.
#[test]
fn add_to_grads_refuses_and_changes_nothing() {
    let mut r = rng(18);
    let a = gapped(&mut r, 6, 4);
    let vars = vec![
        named("good", &a, &[6, 4], DType::F32),
        named("bad", &a, &[6, 4], DType::F32),
    ];
    let mut p = SpectralNormPenalty::from_named(vars.clone(), 1.0).unwrap();
    let mut grads = vars[0]
        .var
        .as_tensor()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    p.add_to_grads(&mut grads).unwrap();
    let before = p.state_dict().unwrap();
    let g0 = grads.get(vars[0].var.as_tensor()).unwrap().copy().unwrap();
    // a gradient of the wrong shape for `bad`
    grads.insert(
        vars[1].var.as_tensor(),
        Tensor::zeros((4, 6), DType::F32, &Device::Cpu).unwrap(),
    );
    let e = p.add_to_grads(&mut grads).unwrap_err();
    assert!(
        matches!(&e, Error::Shape { who, .. } if who == "bad"),
        "{e}"
    );
    assert_eq!(
        max_abs_diff(grads.get(vars[0].var.as_tensor()).unwrap(), &g0),
        0.0
    );
    assert_eq!(grads.get(vars[1].var.as_tensor()).unwrap().dims(), &[4, 6]);
    // NaN weights
    grads.remove(vars[1].var.as_tensor());
    let mut w = vars[1]
        .var
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    w[0] = f32::NAN;
    vars[1]
        .var
        .set(&Tensor::from_vec(w, (6, 4), &Device::Cpu).unwrap())
        .unwrap();
    let e = p.add_to_grads(&mut grads).unwrap_err();
    assert!(
        matches!(&e, Error::Numerical { who, .. } if who == "bad"),
        "{e}"
    );
    assert_eq!(
        max_abs_diff(grads.get(vars[0].var.as_tensor()).unwrap(), &g0),
        0.0
    );
    assert!(grads.get(vars[1].var.as_tensor()).is_none());
    let after = p.state_dict().unwrap();
    for (k, t) in &before {
        assert_eq!(max_abs_diff(t, &after[k]), 0.0, "{k} changed");
    }
    // An f16 matrix whose σ₁ (2.4e5) is finite in f32, but λσ₁ is beyond
    // f16's 65504: the rank-one gradient would be Inf.
    let big = named("big", &(&a * (2.4e5 / 3.0)), &[6, 4], DType::F32);
    let f16 = NamedVar {
        name: "half".into(),
        var: Var::from_tensor(
            &(big.var.as_tensor() / 8.0)
                .unwrap()
                .to_dtype(DType::F16)
                .unwrap(),
        )
        .unwrap(),
    };
    let mut p = SpectralNormPenalty::from_named(vec![f16.clone()], 8.0).unwrap();
    let mut grads = f16
        .var
        .as_tensor()
        .to_dtype(DType::F32)
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let g = grads.get(f16.var.as_tensor()).unwrap().copy().unwrap();
    let e = p.add_to_grads(&mut grads).unwrap_err();
    assert!(
        matches!(&e, Error::Numerical { who, .. } if who == "half")
            && e.to_string().contains("overflows F16"),
        "{e}"
    );
    assert_eq!(
        max_abs_diff(grads.get(f16.var.as_tensor()).unwrap(), &g),
        0.0
    );
    assert!(p.sigmas().is_empty());
}
