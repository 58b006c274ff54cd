//! Gradient-norm penalties and the input/parameter gradient inequality (docs/math.md §6).

mod common;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::{Linear, Optimizer};
use common::{normal_vec, randn, rng, singular_values, to_dmatrix};
use nalgebra::{DMatrix, DVector};
use rand::rngs::StdRng;
use rand::Rng;
use steepest::penalty::{
    gradient_inequality, gradient_terms, input_grad_penalty, param_grad_penalty, Activation,
    FdStep, GradPenaltyConfig, InequalityReport, LayerTerms, Mlp, Penalty,
};

const ACTS: [Activation; 4] = [
    Activation::Tanh,
    Activation::Relu,
    Activation::Gelu,
    Activation::Identity,
];

// ---------------------------------------------------------------- helpers

/// Random f64 weights `(out, in)` scaled by `gain/√in`, and biases.
fn random_layers(r: &mut StdRng, dims: &[usize], gain: f64) -> Vec<(Var, Var)> {
    dims.windows(2)
        .map(|w| {
            let (i, o) = (w[0], w[1]);
            let wt = (randn(r, &[o, i], DType::F64) * (gain / (i as f64).sqrt())).unwrap();
            let b = (randn(r, &[o], DType::F64) * 0.5).unwrap();
            (
                Var::from_tensor(&wt).unwrap(),
                Var::from_tensor(&b).unwrap(),
            )
        })
        .collect()
}

fn mlp_of(layers: &[(Var, Var)], acts: &[Activation]) -> Mlp {
    Mlp::new(
        layers
            .iter()
            .zip(acts)
            .map(|((w, b), a)| {
                (
                    Linear::new(w.as_tensor().clone(), Some(b.as_tensor().clone())),
                    *a,
                )
            })
            .collect(),
    )
    .unwrap()
}

/// An MLP from plain f64 matrices/vectors (fresh tensors, not variables).
fn mlp_from(ws: &[DMatrix<f64>], bs: &[DVector<f64>], acts: &[Activation]) -> Mlp {
    Mlp::new(
        ws.iter()
            .zip(bs)
            .zip(acts)
            .map(|((w, b), a)| {
                let wt = common::from_dmatrix(w, DType::F64);
                let bt = Tensor::from_vec(b.as_slice().to_vec(), b.len(), &Device::Cpu).unwrap();
                (Linear::new(wt, Some(bt)), *a)
            })
            .collect(),
    )
    .unwrap()
}

fn vec_of(t: &Tensor) -> Vec<f64> {
    common::to_f64_vec(t)
}

fn row(v: &[f64]) -> Tensor {
    Tensor::from_vec(v.to_vec(), (1, v.len()), &Device::Cpu).unwrap()
}

fn norm(v: &[f64]) -> f64 {
    v.iter().map(|x| x * x).sum::<f64>().sqrt()
}

fn max_rel(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let d: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    norm(&d) / norm(b).max(1e-300)
}

/// The scalar `f` used on MLP outputs: `cᵀy + ¼‖y‖²` with a fixed `c`.
fn test_f(out_dim: usize) -> impl Fn(&Tensor) -> Result<Tensor> {
    let c: Vec<f64> = (0..out_dim).map(|i| 0.7 - 0.4 * i as f64).collect();
    let c = Tensor::from_vec(c, (1, out_dim), &Device::Cpu).unwrap();
    move |y: &Tensor| (y * &c)?.sum_all()? + (y.sqr()?.sum_all()? * 0.25)?
}

/// `f(mlp(x))` for one row `x`, by the forward pass only.
fn f_of(mlp: &Mlp, x: &[f64], f: &impl Fn(&Tensor) -> Result<Tensor>) -> f64 {
    let out = candle_core::Module::forward(mlp, &row(x)).unwrap();
    f(&out).unwrap().to_scalar::<f64>().unwrap()
}

fn spectral(a: &DMatrix<f64>) -> f64 {
    singular_values(a)[0]
}

// ------------------------------------------------------------- diagnostic

/// Every term of the report (and `J_t`, `∇_x f`, `∇_W f`, `∇_b f`) against
/// independent computations: central differences of the forward pass (f64)
/// and nalgebra SVDs.
#[test]
fn diagnostic_terms_match_independent_computations() {
    let dims = [3, 5, 4, 2];
    for (k, act) in ACTS.iter().enumerate() {
        let mut r = rng(100 + k as u64);
        let layers = random_layers(&mut r, &dims, 1.5);
        let acts = [*act, *act, Activation::Identity];
        let mlp = mlp_of(&layers, &acts);
        let x = normal_vec(&mut r, 3);
        let f = test_f(2);
        let terms =
            gradient_terms(&mlp, &Tensor::new(x.as_slice(), &Device::Cpu).unwrap(), &f).unwrap();
        let report = gradient_inequality(&mlp, &row(&x), &f, 200).unwrap();
        let h = 1e-6;

        // Jacobians J_t = ∂h⁽ᵗ⁾/∂x by central differences of the forward pass.
        let jac = mlp.input_jacobians(&row(&x)).unwrap();
        assert_eq!(jac.len(), 4);
        for t in 0..4 {
            let n = dims[t];
            let mut fd = DMatrix::zeros(n, 3);
            for j in 0..3 {
                let (mut xp, mut xm) = (x.clone(), x.clone());
                xp[j] += h;
                xm[j] -= h;
                let hp = vec_of(&mlp.forward_all(&row(&xp)).unwrap()[t]);
                let hm = vec_of(&mlp.forward_all(&row(&xm)).unwrap()[t]);
                for i in 0..n {
                    fd[(i, j)] = (hp[i] - hm[i]) / (2.0 * h);
                }
            }
            let got = to_dmatrix(&jac[t]);
            assert!(
                common::rel_err(&got, &fd) < 1e-7,
                "{act:?} J_{}: {got} vs {fd}",
                t + 1
            );
            if t < 3 {
                assert!(common::rel_err(&to_dmatrix(&terms.jacobians[t]), &fd) < 1e-7);
                let want = if t == 0 { 1.0 } else { spectral(&fd) };
                let got = report.layers[t].jacobian_norm;
                assert!(
                    (got - want).abs() < 1e-7 * want,
                    "{act:?} ‖J_{}‖: {got} vs {want}",
                    t + 1
                );
            }
        }

        // ‖∇_x f‖² by central differences.
        let gx_fd: Vec<f64> = (0..3)
            .map(|j| {
                let (mut xp, mut xm) = (x.clone(), x.clone());
                xp[j] += h;
                xm[j] -= h;
                (f_of(&mlp, &xp, &f) - f_of(&mlp, &xm, &f)) / (2.0 * h)
            })
            .collect();
        assert!(max_rel(&vec_of(&terms.grad_x), &gx_fd) < 1e-7);
        assert!((report.grad_x_sq - norm(&gx_fd).powi(2)).abs() < 1e-7 * report.grad_x_sq);

        // Per layer: ‖h‖², ‖W‖₂ (SVD), ‖∇_W f‖_F², ‖∇_b f‖² (central differences).
        let ws: Vec<DMatrix<f64>> = layers
            .iter()
            .map(|(w, _)| to_dmatrix(w.as_tensor()))
            .collect();
        let bs: Vec<DVector<f64>> = layers
            .iter()
            .map(|(_, b)| DVector::from_vec(vec_of(b.as_tensor())))
            .collect();
        let hs = mlp.forward_all(&row(&x)).unwrap();
        for t in 0..3 {
            let lt = &report.layers[t];
            let hsq = norm(&vec_of(&hs[t])).powi(2);
            assert!((lt.h_norm_sq - hsq).abs() < 1e-12 * hsq.max(1.0));
            let sw = spectral(&ws[t]);
            assert!(
                (lt.weight_norm - sw).abs() < 1e-10 * sw,
                "{act:?} ‖W‖: {} vs {sw}",
                lt.weight_norm
            );

            let eval =
                |ws: &[DMatrix<f64>], bs: &[DVector<f64>]| f_of(&mlp_from(ws, bs, &acts), &x, &f);
            let mut gw = DMatrix::zeros(ws[t].nrows(), ws[t].ncols());
            for i in 0..ws[t].nrows() {
                for j in 0..ws[t].ncols() {
                    let (mut p, mut m) = (ws.to_vec(), ws.to_vec());
                    p[t][(i, j)] += h;
                    m[t][(i, j)] -= h;
                    gw[(i, j)] = (eval(&p, &bs) - eval(&m, &bs)) / (2.0 * h);
                }
            }
            let mut gb = DVector::zeros(bs[t].len());
            for i in 0..bs[t].len() {
                let (mut p, mut m) = (bs.to_vec(), bs.to_vec());
                p[t][i] += h;
                m[t][i] -= h;
                gb[i] = (eval(&ws, &p) - eval(&ws, &m)) / (2.0 * h);
            }
            assert!(common::rel_err(&to_dmatrix(&terms.grad_weights[t]), &gw) < 1e-7);
            assert!((lt.grad_weight_sq - gw.norm_squared()).abs() < 1e-7 * gw.norm_squared());
            let gbsq = lt.grad_bias_sq.unwrap();
            assert!((gbsq - gb.norm_squared()).abs() < 1e-7 * gb.norm_squared());

            // The left-hand sides from the independent pieces.
            let ratio = norm(&gx_fd).powi(2) / (sw * lt.jacobian_norm).powi(2);
            assert!((lt.bias_lhs.unwrap() - ratio).abs() < 1e-6 * ratio);
            assert!((lt.weight_lhs - ratio * hsq).abs() < 1e-6 * ratio * hsq);
        }
        let lhs: f64 = report
            .layers
            .iter()
            .map(|l| l.weight_lhs + l.bias_lhs.unwrap())
            .sum();
        let rhs: f64 = report
            .layers
            .iter()
            .map(|l| l.grad_weight_sq + l.grad_bias_sq.unwrap())
            .sum();
        assert_eq!(report.lhs(), lhs);
        assert_eq!(report.rhs(), rhs);
    }
}

/// The proof's key step `h⁽ᵗ⁾ (∇_x f)ᵀ = (∇_{W⁽ᵗ⁾} f)ᵀ W⁽ᵗ⁾ J_t` (column
/// convention), from the computed vectors.
#[test]
fn key_step_identity() {
    let mut r = rng(7);
    let dims = [4, 6, 5, 3];
    for act in ACTS {
        let layers = random_layers(&mut r, &dims, 1.3);
        let acts = [act, act, Activation::Tanh];
        let mlp = mlp_of(&layers, &acts);
        let x = normal_vec(&mut r, 4);
        let terms = gradient_terms(&mlp, &row(&x), test_f(3)).unwrap();
        // One entry per layer t = 1..l (the output's Jacobian is not a term).
        assert_eq!(terms.h.len(), 3);
        assert_eq!(terms.jacobians.len(), 3);
        assert_eq!(terms.grad_weights.len(), 3);
        let gx = DMatrix::from_row_slice(1, 4, &vec_of(&terms.grad_x));
        for t in 0..3 {
            let hv = DMatrix::from_column_slice(dims[t], 1, &vec_of(&terms.h[t]));
            let lhs = &hv * &gx;
            let rhs = to_dmatrix(&terms.grad_weights[t]).transpose()
                * to_dmatrix(layers[t].0.as_tensor())
                * to_dmatrix(&terms.jacobians[t]);
            assert!(
                common::rel_err(&lhs, &rhs) < 1e-12,
                "{act:?} t={t}: {lhs} vs {rhs}"
            );
        }
    }
}

/// Random MLPs (depth 1–3, widths 1–8), random inputs and a random scalar of
/// the output: every term of the inequality holds, and so does the total.
#[test]
fn inequality_holds_term_by_term_for_random_mlps() {
    let mut r = rng(2024);
    let mut checked = 0;
    let mut max_ratio: f64 = 0.0;
    for act in ACTS {
        for _ in 0..12 {
            let depth = r.gen_range(1..=3);
            let dims: Vec<usize> = (0..=depth).map(|_| r.gen_range(1..=8)).collect();
            let gain = r.gen_range(0.5..3.0);
            let layers = random_layers(&mut r, &dims, gain);
            let mut acts = vec![act; depth];
            if r.gen_bool(0.5) {
                acts[depth - 1] = Activation::Identity;
            }
            let mlp = mlp_of(&layers, &acts);
            let x = (randn(&mut r, &[dims[0]], DType::F64) * r.gen_range(0.3..3.0)).unwrap();
            let out = dims[depth];
            let c = randn(&mut r, &[1, out], DType::F64);
            let f = move |y: &Tensor| -> Result<Tensor> {
                // A smooth nonlinear scalar: log-sum-exp of shifted outputs.
                let s = (y + &c)?;
                s.exp()?.sum_all()?.log()
            };
            let rep = gradient_inequality(&mlp, &x, f, 300).unwrap();
            if rep.grad_x_sq == 0.0 {
                continue; // e.g. all ReLUs off: both sides' terms are then 0 ≤ …
            }
            for (t, l) in rep.layers.iter().enumerate() {
                let tol = 1e-9;
                assert!(
                    l.weight_lhs <= l.grad_weight_sq * (1.0 + tol) + 1e-300,
                    "{act:?} dims {dims:?} layer {t}: weight {} > {}",
                    l.weight_lhs,
                    l.grad_weight_sq
                );
                let (bl, br) = (l.bias_lhs.unwrap(), l.grad_bias_sq.unwrap());
                assert!(
                    bl <= br * (1.0 + tol),
                    "{act:?} dims {dims:?} layer {t}: bias {bl} > {br}"
                );
                if l.grad_weight_sq > 0.0 {
                    max_ratio = max_ratio.max(l.weight_lhs / l.grad_weight_sq);
                }
            }
            assert!(rep.holds(1e-9, 0.0));
            assert!(rep.lhs() <= rep.rhs() * (1.0 + 1e-9));
            assert!(rep.lhs() > 0.0);
            checked += 1;
        }
    }
    assert!(checked >= 40, "only {checked} non-degenerate cases");
    assert!(max_ratio <= 1.0 + 1e-9 && max_ratio > 0.0);
}

/// One linear layer, `f = uᵀz` with `u` the top left singular vector of a
/// full-rank `W`: then `∇_z f = u` and `‖Wᵀu‖ = ‖W‖₂`, so both Cauchy–Schwarz
/// steps are equalities and every term is tight.
#[test]
fn inequality_is_tight_for_top_singular_direction() {
    let mut r = rng(11);
    let w = DMatrix::from_row_slice(5, 4, &normal_vec(&mut r, 20));
    let svd = w.clone().svd(true, false);
    let i = svd.singular_values.imax();
    let u: Vec<f64> = svd.u.unwrap().column(i).iter().copied().collect();
    let b = DVector::from_vec(normal_vec(&mut r, 5));
    let mlp = mlp_from(&[w], &[b], &[Activation::Identity]);
    let ut = row(&u);
    let f = move |y: &Tensor| (y * &ut)?.sum_all();
    let x = normal_vec(&mut r, 4);
    let rep = gradient_inequality(&mlp, &row(&x), f, 500).unwrap();
    let l = &rep.layers[0];
    assert!(
        (l.weight_lhs / l.grad_weight_sq - 1.0).abs() < 1e-10,
        "{l:?}"
    );
    assert!(
        (l.bias_lhs.unwrap() / l.grad_bias_sq.unwrap() - 1.0).abs() < 1e-10,
        "{l:?}"
    );
    assert!((rep.lhs() / rep.rhs() - 1.0).abs() < 1e-10);
}

/// A chain of rank-one layers aligned end to end — `W⁽¹⁾ = a₁c₁ᵀ`,
/// `W⁽ᵗ⁾ = a_t a_{t−1}ᵀ`, `b⁽ᵗ⁾ = β_t a_t` — with `f = ½‖h⁽ˡ⁺¹⁾‖²`: every
/// `∇_{z⁽ᵗ⁺¹⁾} f` is along `a_t`, the top left singular vector of `W⁽ᵗ⁾`, and
/// `W⁽ᵗ⁾ᵀ a_t ∝ a_{t−1}` is the top left singular vector of `J_t`, so every
/// term is an equality. Holds with identity activations and with ReLUs whose
/// pre-activations are all positive (positive `a_t`, `β_t`).
#[test]
fn inequality_is_tight_for_aligned_rank_one_chain() {
    let mut r = rng(5);
    for act in [Activation::Identity, Activation::Relu] {
        let dims = [3, 4, 5, 2];
        let a: Vec<DVector<f64>> = dims[1..]
            .iter()
            .map(|&n| DVector::from_iterator(n, (0..n).map(|_| r.gen_range(0.2..1.5))))
            .collect();
        let c1 = DVector::from_iterator(3, (0..3).map(|_| r.gen_range(0.2..1.5)));
        let mut ws = vec![&a[0] * c1.transpose()];
        for t in 1..a.len() {
            ws.push(&a[t] * a[t - 1].transpose());
        }
        let bs: Vec<DVector<f64>> = a.iter().map(|at| at * r.gen_range(0.1..1.0)).collect();
        let mlp = mlp_from(&ws, &bs, &[act; 3]);
        let x: Vec<f64> = (0..3).map(|_| r.gen_range(0.1..1.0)).collect();
        let f = |y: &Tensor| y.sqr()?.sum_all()? * 0.5;
        let e = gradient_inequality(&mlp, &row(&x), f, 0).unwrap_err();
        assert!(
            matches!(&e, steepest::Error::Config { who, .. }
                if who == "gradient_inequality: power_iters"),
            "{e:?}"
        );
        let rep = gradient_inequality(&mlp, &row(&x), f, 50).unwrap();
        assert!(rep.grad_x_sq > 0.0);
        for (t, l) in rep.layers.iter().enumerate() {
            let rw = l.weight_lhs / l.grad_weight_sq;
            let rb = l.bias_lhs.unwrap() / l.grad_bias_sq.unwrap();
            assert!(
                (rw - 1.0).abs() < 1e-10,
                "{act:?} layer {t}: weight ratio {rw}"
            );
            assert!(
                (rb - 1.0).abs() < 1e-10,
                "{act:?} layer {t}: bias ratio {rb}"
            );
        }
        // And a generic (non-aligned) perturbation makes it strict.
        let mut ws2 = ws.clone();
        ws2[1][(0, 0)] += 0.5;
        let rep2 = gradient_inequality(&mlp_from(&ws2, &bs, &[act; 3]), &row(&x), f, 200).unwrap();
        assert!(
            rep2.lhs() < rep2.rhs() * (1.0 - 1e-4),
            "{} vs {}",
            rep2.lhs(),
            rep2.rhs()
        );
    }
}

#[test]
fn diagnostic_rejects_bad_inputs() {
    let mut r = rng(3);
    let layers = random_layers(&mut r, &[3, 4], 1.0);
    let mlp = mlp_of(&layers, &[Activation::Tanh]);
    let err = gradient_inequality(&mlp, &row(&[1.0, 2.0]), test_f(4), 10).unwrap_err();
    assert!(err.to_string().contains("gradient_inequality: x"), "{err}");
    let err = gradient_inequality(&mlp, &row(&[1.0, 2.0, 3.0]), |y: &Tensor| Ok(y.clone()), 10)
        .unwrap_err();
    assert!(err.to_string().contains("scalar"), "{err}");
    let bad = Mlp::new(vec![
        (
            Linear::new(layers[0].0.as_tensor().clone(), None),
            Activation::Tanh,
        ),
        (
            Linear::new(layers[0].0.as_tensor().clone(), None),
            Activation::Tanh,
        ),
    ]);
    assert!(bad.unwrap_err().to_string().contains("layers[1]"));
    // A bias of the wrong length (5 for a layer of 4 outputs).
    let bias = Tensor::zeros(5, DType::F64, &Device::Cpu).unwrap();
    let bad = Mlp::new(vec![(
        Linear::new(layers[0].0.as_tensor().clone(), Some(bias)),
        Activation::Tanh,
    )]);
    let err = bad.unwrap_err().to_string();
    assert!(err.contains("layers[0].bias"), "{err}");
}

/// Each activation against its formula in f64, computed apart from candle:
/// `tanh`, `max(z, 0)`, `z` and the exact GELU `z Φ(z)`, with the normal CDF
/// `Φ(z) = ½ + ∫₀^z φ(t) dt` by composite Simpson's rule (2 000 intervals:
/// error below 1e-13 on |z| ≤ 5), not by `erf`. The diagnostic tests check
/// the MLP against finite differences of its own forward pass, so a wrong
/// activation formula would pass them.
#[test]
fn activations_match_their_formulas() {
    fn normal_cdf(z: f64) -> f64 {
        let n = 2000;
        let h = z / n as f64;
        let phi = |t: f64| (-0.5 * t * t).exp() / (2.0 * std::f64::consts::PI).sqrt();
        let inner: f64 = (1..n)
            .map(|i| phi(i as f64 * h) * if i % 2 == 1 { 4.0 } else { 2.0 })
            .sum();
        0.5 + h / 3.0 * (phi(0.0) + inner + phi(z))
    }
    let zs: Vec<f64> = (0..=80).map(|i| -5.0 + 0.125 * i as f64).collect();
    let t = Tensor::new(zs.as_slice(), &Device::Cpu).unwrap();
    for act in ACTS {
        let got = act.apply(&t).unwrap().to_vec1::<f64>().unwrap();
        for (z, g) in zs.iter().zip(&got) {
            let want = match act {
                Activation::Tanh => z.tanh(),
                Activation::Relu => z.max(0.0),
                Activation::Gelu => z * normal_cdf(*z),
                Activation::Identity => *z,
            };
            assert!((g - want).abs() <= 1e-12, "{act:?}({z}) = {g}, want {want}");
        }
    }
}

/// `holds` checks both terms of every layer: a bias term above its
/// right-hand side fails it even when the weight term holds, and a
/// relative tolerance admits it (`3 ≤ 1·(1 + 2.5)`), as does an absolute
/// one added to the right-hand side (`3 ≤ 1 + 2`).
#[test]
fn holds_checks_the_bias_term_too() {
    let layer = |bias_lhs: f64| LayerTerms {
        h_norm_sq: 1.0,
        weight_norm: 1.0,
        jacobian_norm: 1.0,
        grad_weight_sq: 2.0,
        grad_bias_sq: Some(1.0),
        weight_lhs: 1.0,
        bias_lhs: Some(bias_lhs),
    };
    assert!(layer(0.5).holds(0.0, 0.0));
    assert!(!layer(3.0).holds(0.0, 0.0));
    assert!(layer(3.0).holds(2.5, 0.0));
    // The absolute tolerance is added: 3 ≤ 1 + 2, but not 3 ≤ 1 + 1.5.
    assert!(layer(3.0).holds(0.0, 2.0));
    assert!(!layer(3.0).holds(0.0, 1.5));
    let report = |bias_lhs: f64| InequalityReport {
        value: 0.0,
        grad_x_sq: 1.0,
        layers: vec![layer(0.5), layer(bias_lhs)],
    };
    assert!(report(0.5).holds(0.0, 0.0));
    assert!(!report(3.0).holds(0.0, 0.0));
}

/// A zero weight matrix (`‖W⁽¹⁾‖₂ = 0`, so `∇_x f = 0` and `J_2 = 0`):
/// the layers' left-hand terms are 0 (the docs), not 0/0, and the
/// inequality holds.
#[test]
fn a_zero_weight_layer_gives_zero_left_hand_terms() {
    let mut r = rng(8);
    let ws = [
        DMatrix::<f64>::zeros(4, 3),
        DMatrix::from_row_slice(2, 4, &normal_vec(&mut r, 8)),
    ];
    let bs = [
        DVector::from_vec(normal_vec(&mut r, 4)),
        DVector::from_vec(normal_vec(&mut r, 2)),
    ];
    let mlp = mlp_from(&ws, &bs, &[Activation::Tanh, Activation::Identity]);
    let rep = gradient_inequality(&mlp, &row(&[0.3, -1.0, 2.0]), test_f(2), 20).unwrap();
    assert_eq!(rep.grad_x_sq, 0.0);
    assert_eq!(rep.layers[0].weight_norm, 0.0);
    assert_eq!(rep.layers[1].jacobian_norm, 0.0);
    for (t, l) in rep.layers.iter().enumerate() {
        assert_eq!((l.weight_lhs, l.bias_lhs), (0.0, Some(0.0)), "layer {t}");
    }
    assert!(rep.rhs() > 0.0);
    assert!(rep.holds(0.0, 0.0));
}

// -------------------------------------------------------------- penalties

/// A small regression problem: MLP 3 → 5 → 2, batch of 4, mean squared error.
struct Problem {
    vars: Vec<Var>,
    mlp: Mlp,
    x: Tensor,
    y: Tensor,
}

fn problem(seed: u64, act: Activation) -> Problem {
    let mut r = rng(seed);
    let layers = random_layers(&mut r, &[3, 5, 2], 1.5);
    let mlp = mlp_of(&layers, &[act, Activation::Identity]);
    let vars = layers
        .iter()
        .flat_map(|(w, b)| [w.clone(), b.clone()])
        .collect();
    let x = randn(&mut r, &[4, 3], DType::F64);
    let y = randn(&mut r, &[4, 2], DType::F64);
    Problem { vars, mlp, x, y }
}

impl Problem {
    fn loss_at(&self, x: &Tensor) -> Result<Tensor> {
        let out = candle_core::Module::forward(&self.mlp, x)?;
        (out - &self.y)?.sqr()?.mean_all()
    }

    fn loss(&self) -> Result<Tensor> {
        self.loss_at(&self.x)
    }

    fn flat(&self) -> Vec<Vec<f64>> {
        self.vars.iter().map(|v| vec_of(v.as_tensor())).collect()
    }

    fn set(&self, theta: &[Vec<f64>]) {
        for (v, t) in self.vars.iter().zip(theta) {
            v.set(&Tensor::from_vec(t.clone(), v.shape(), &Device::Cpu).unwrap())
                .unwrap();
        }
    }

    /// Central differences of `phi` over every parameter entry, in f64.
    fn central_grad(&self, phi: impl Fn(&Problem) -> f64) -> Vec<Vec<f64>> {
        let theta = self.flat();
        let h = 1e-5;
        let mut out = Vec::new();
        for i in 0..theta.len() {
            let mut gi = Vec::new();
            for j in 0..theta[i].len() {
                let mut p = theta.clone();
                p[i][j] += h;
                self.set(&p);
                let fp = phi(self);
                p[i][j] -= 2.0 * h;
                self.set(&p);
                let fm = phi(self);
                gi.push((fp - fm) / (2.0 * h));
            }
            out.push(gi);
        }
        self.set(&theta);
        out
    }
}

/// `‖∇_θ L‖` at the current parameters.
fn param_grad_norm(p: &Problem) -> f64 {
    let g = p.loss().unwrap().backward().unwrap();
    p.vars
        .iter()
        .map(|v| norm(&vec_of(g.get(v.as_tensor()).unwrap())).powi(2))
        .sum::<f64>()
        .sqrt()
}

/// `‖∇_x L‖` (the whole batch) at the current parameters.
fn input_grad_norm(p: &Problem) -> f64 {
    let xv = Var::from_tensor(&p.x.copy().unwrap()).unwrap();
    let g = p.loss_at(xv.as_tensor()).unwrap().backward().unwrap();
    norm(&vec_of(g.get(xv.as_tensor()).unwrap()))
}

fn penalised(kind: Penalty, rho: f64, loss: f64, gnorm: f64) -> f64 {
    match kind {
        Penalty::Norm => loss + rho * gnorm,
        Penalty::HalfSquared => loss + 0.5 * rho * gnorm * gnorm,
    }
}

fn loss_value(p: &Problem) -> f64 {
    p.loss().unwrap().to_scalar::<f64>().unwrap()
}

fn store_vecs(p: &Problem, grads: &candle_core::backprop::GradStore) -> Vec<f64> {
    p.vars
        .iter()
        .flat_map(|v| vec_of(grads.get(v.as_tensor()).unwrap()))
        .collect()
}

fn plain_grads(p: &Problem) -> Vec<f64> {
    store_vecs(p, &p.loss().unwrap().backward().unwrap())
}

/// The penalised gradients of `L + ρ‖∇_θ L‖` and `L + ρ/2‖∇_θ L‖²` against
/// central differences of the penalised objective (f64), with forward and
/// central Hessian–vector products.
#[test]
fn param_penalty_matches_central_differences() {
    for (k, act) in [Activation::Tanh, Activation::Gelu].into_iter().enumerate() {
        let p = problem(40 + k as u64, act);
        let before = p.flat();
        for kind in [Penalty::Norm, Penalty::HalfSquared] {
            let rho = 0.3;
            let want: Vec<f64> = p
                .central_grad(|p| penalised(kind, rho, loss_value(p), param_grad_norm(p)))
                .concat();
            let plain = plain_grads(&p);
            // The penalty must matter for this test to mean anything.
            assert!(
                max_rel(&plain, &want) > 1e-2,
                "{act:?} {kind:?}: penalty negligible"
            );
            for central in [false, true] {
                let cfg = GradPenaltyConfig {
                    rho,
                    penalty: kind,
                    step: FdStep::Auto,
                    central,
                };
                let out = param_grad_penalty(|| p.loss(), &p.vars, &cfg).unwrap();
                let got = store_vecs(&p, &out.grads);
                let err = max_rel(&got, &want);
                let tol = if central { 1e-8 } else { 1e-6 };
                assert!(
                    err < tol,
                    "{act:?} {kind:?} central={central}: rel err {err:e}"
                );
                assert!((out.loss - loss_value(&p)).abs() == 0.0);
                let gn = param_grad_norm(&p);
                assert!((out.grad_norm - gn).abs() < 1e-14 * gn);
                let pen = penalised(kind, rho, 0.0, gn);
                assert!((out.penalty - pen).abs() < 1e-13 * pen);
                assert!(out.step > 0.0);
                assert_eq!(p.flat(), before);
            }
        }
    }
}

/// With `FdStep::Absolute(r)` and forward differences, the Norm penalty's
/// gradient is Zhao et al.'s `(1 − α)∇L(θ) + α∇L(θ + r ĝ)` with `α = ρ/r`.
#[test]
fn param_penalty_is_zhao_interpolation() {
    let p = problem(9, Activation::Tanh);
    let (r, rho) = (0.05, 0.02);
    let alpha = rho / r;
    let cfg = GradPenaltyConfig {
        rho,
        penalty: Penalty::Norm,
        step: FdStep::Absolute(r),
        central: false,
    };
    let out = param_grad_penalty(|| p.loss(), &p.vars, &cfg).unwrap();
    assert_eq!(out.step, r);
    let g = plain_grads(&p);
    let gn = norm(&g);
    let theta = p.flat();
    let mut off = 0;
    let moved: Vec<Vec<f64>> = theta
        .iter()
        .map(|t| {
            let v = t
                .iter()
                .zip(&g[off..])
                .map(|(a, b)| a + r * b / gn)
                .collect();
            off += t.len();
            v
        })
        .collect();
    p.set(&moved);
    let g2 = plain_grads(&p);
    p.set(&theta);
    let want: Vec<f64> = g
        .iter()
        .zip(&g2)
        .map(|(a, b)| (1.0 - alpha) * a + alpha * b)
        .collect();
    let err = max_rel(&store_vecs(&p, &out.grads), &want);
    assert!(err < 1e-12, "rel err {err:e}");
}

/// After the call (and after a failure part-way) every variable is
/// bit-identical to before, in f32 where `θ + hĝ − hĝ ≠ θ` in general.
#[test]
fn param_penalty_restores_parameters_bit_identically() {
    let mut r = rng(77);
    let w = Var::from_tensor(&randn(&mut r, &[6, 5], DType::F32)).unwrap();
    let b = Var::from_tensor(&randn(&mut r, &[6], DType::F32)).unwrap();
    let x = randn(&mut r, &[8, 5], DType::F32);
    let bits = |v: &Var| -> Vec<u32> {
        v.as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|f| f.to_bits())
            .collect()
    };
    let (w0, b0) = (bits(&w), bits(&b));
    let loss = || {
        x.matmul(&w.as_tensor().t()?)?
            .broadcast_add(b.as_tensor())?
            .tanh()?
            .sqr()?
            .mean_all()
    };
    for central in [false, true] {
        for step in [FdStep::Auto, FdStep::Absolute(0.37)] {
            let cfg = GradPenaltyConfig {
                rho: 0.5,
                central,
                step,
                ..Default::default()
            };
            let out = param_grad_penalty(loss, &[w.clone(), b.clone()], &cfg).unwrap();
            assert!(out.step > 0.0);
            assert_eq!(bits(&w), w0);
            assert_eq!(bits(&b), b0);
        }
    }
    // A loss that fails at the perturbed point: error, parameters restored.
    let calls = std::cell::Cell::new(0);
    let failing = || {
        calls.set(calls.get() + 1);
        if calls.get() == 2 {
            candle_core::bail!("boom")
        }
        loss()
    };
    let err = param_grad_penalty(
        failing,
        &[w.clone(), b.clone()],
        &GradPenaltyConfig::default(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("boom"), "{err}");
    assert_eq!(bits(&w), w0);
    assert_eq!(bits(&b), b0);
}

/// `∇L = 0`: the penalty gradient is 0 (no division by zero, no perturbation).
#[test]
fn zero_gradient_gives_zero_penalty_gradient() {
    let w = Var::zeros(3, DType::F64, &Device::Cpu).unwrap();
    for kind in [Penalty::Norm, Penalty::HalfSquared] {
        let cfg = GradPenaltyConfig {
            rho: 1.0,
            penalty: kind,
            ..Default::default()
        };
        let out = param_grad_penalty(
            || w.as_tensor().sqr()?.sum_all(),
            std::slice::from_ref(&w),
            &cfg,
        )
        .unwrap();
        assert_eq!(vec_of(out.grads.get(w.as_tensor()).unwrap()), vec![0.0; 3]);
        assert_eq!((out.grad_norm, out.penalty, out.step), (0.0, 0.0, 0.0));

        // Input penalty: a loss that does not depend on x.
        let x = Tensor::ones((2, 3), DType::F64, &Device::Cpu).unwrap();
        let w2 =
            Var::from_tensor(&Tensor::new(&[1.0f64, -2.0, 0.5], &Device::Cpu).unwrap()).unwrap();
        let out = input_grad_penalty(
            |x| w2.as_tensor().sqr()?.sum_all()? + (x.sum_all()? * 0.0)?,
            &x,
            std::slice::from_ref(&w2),
            &cfg,
        )
        .unwrap();
        assert_eq!(
            vec_of(out.grads.get(w2.as_tensor()).unwrap()),
            vec![2.0, -4.0, 1.0]
        );
        assert_eq!((out.grad_norm, out.step), (0.0, 0.0));
    }
}

/// `err` is `Error::NonFiniteGradient` (what a step on such a gradient
/// gives) naming `param`.
fn non_finite(err: steepest::Error, param: &str) {
    assert!(
        matches!(&err, steepest::Error::NonFiniteGradient { param: p } if p == param),
        "expected NonFiniteGradient naming {param}, got {err:?}"
    );
}

#[test]
fn non_finite_gradients_are_errors() {
    let a = Var::from_tensor(&Tensor::new(&[1.0f64, 2.0], &Device::Cpu).unwrap()).unwrap();
    let w = Var::from_tensor(&Tensor::new(&[0.0f64, 1.0], &Device::Cpu).unwrap()).unwrap();
    let cfg = GradPenaltyConfig::default();
    // d/dw √w is infinite at w = 0.
    // The error a step on that gradient gives (one `match` arm skips the
    // batch), naming the variable as `Optimizer::new` would (`a` was
    // created first: `param.0`, whatever its place in the list).
    let err = param_grad_penalty(
        || w.as_tensor().sqrt()?.sum_all()? + a.as_tensor().sum_all()?,
        &[w.clone(), a.clone()],
        &cfg,
    )
    .unwrap_err();
    non_finite(err, "param_grad_penalty: param.1 (vars[0])");
    // A non-finite loss: the same error, nothing moved.
    for bad in [f64::NAN, f64::INFINITY] {
        let err = param_grad_penalty(
            || a.as_tensor().sum_all()? * bad,
            std::slice::from_ref(&a),
            &cfg,
        )
        .unwrap_err();
        non_finite(err, &format!("param_grad_penalty: the loss ({bad})"));
        let x = Tensor::new(&[[1.0f64, 1.0]], &Device::Cpu).unwrap();
        let err = input_grad_penalty(
            |x| x.broadcast_mul(a.as_tensor())?.sum_all()? * bad,
            &x,
            std::slice::from_ref(&a),
            &cfg,
        )
        .unwrap_err();
        non_finite(err, &format!("input_grad_penalty: the loss ({bad})"));
        assert_eq!(vec_of(a.as_tensor()), vec![1.0, 2.0]);
    }
    // Same through the input.
    let x = Tensor::new(&[[0.0f64, 1.0]], &Device::Cpu).unwrap();
    let err = input_grad_penalty(
        |x| x.sqrt()?.broadcast_mul(a.as_tensor())?.sum_all(),
        &x,
        std::slice::from_ref(&a),
        &cfg,
    )
    .unwrap_err();
    non_finite(err, "input_grad_penalty: x");
    // Bad configuration.
    let bad = GradPenaltyConfig {
        rho: -1.0,
        ..Default::default()
    };
    let err =
        param_grad_penalty(|| a.as_tensor().sum_all(), std::slice::from_ref(&a), &bad).unwrap_err();
    assert!(err.to_string().contains("rho"), "{err}");
}

/// The result is a `GradStore` an ordinary candle-nn optimizer steps with.
#[test]
fn penalised_grads_drive_a_candle_optimizer() {
    let p = problem(12, Activation::Tanh);
    let theta = p.flat().concat();
    let out = param_grad_penalty(|| p.loss(), &p.vars, &GradPenaltyConfig::default()).unwrap();
    let g = store_vecs(&p, &out.grads);
    let mut opt = candle_nn::SGD::new(p.vars.clone(), 0.1).unwrap();
    opt.step(&out.grads).unwrap();
    let after = p.flat().concat();
    for ((a, t), gi) in after.iter().zip(&theta).zip(&g) {
        assert!((a - (t - 0.1 * gi)).abs() < 1e-15);
    }
}

/// The penalised gradients of `L + ρ‖∇_x L‖` and `L + ρ/2‖∇_x L‖²` (w.r.t.
/// the parameters) against central differences of the penalised objective.
#[test]
fn input_penalty_matches_central_differences() {
    for (k, act) in [Activation::Tanh, Activation::Gelu].into_iter().enumerate() {
        let p = problem(60 + k as u64, act);
        let x_before = vec_of(&p.x);
        for kind in [Penalty::Norm, Penalty::HalfSquared] {
            let rho = 2.0;
            let want: Vec<f64> = p
                .central_grad(|p| penalised(kind, rho, loss_value(p), input_grad_norm(p)))
                .concat();
            let plain = plain_grads(&p);
            assert!(
                max_rel(&plain, &want) > 1e-2,
                "{act:?} {kind:?}: penalty negligible"
            );
            for central in [false, true] {
                let cfg = GradPenaltyConfig {
                    rho,
                    penalty: kind,
                    step: FdStep::Auto,
                    central,
                };
                let out = input_grad_penalty(|x| p.loss_at(x), &p.x, &p.vars, &cfg).unwrap();
                let got = store_vecs(&p, &out.grads);
                let err = max_rel(&got, &want);
                let tol = if central { 1e-8 } else { 1e-6 };
                assert!(
                    err < tol,
                    "{act:?} {kind:?} central={central}: rel err {err:e}"
                );
                let gn = input_grad_norm(&p);
                assert!((out.grad_norm - gn).abs() < 1e-14 * gn);
                assert_eq!(vec_of(&p.x), x_before);
            }
        }
    }
}

/// The input penalty's finite-difference step is relative to the input:
/// `FdStep::Relative(δ)` is `h = δ(1 + ‖x‖)` (`FdStep`'s docs, "‖θ‖: the
/// global norm of all the perturbed tensors", here `x`; `input_grad_penalty`:
/// "relative to ‖x‖"), and `FdStep::Auto` is the same with `δ = √ε` forward,
/// `∛ε` central (f64 here). Checked against the reported `step` on the
/// MLP problem at two inputs: `x` with entries 3, 4, 12 and zeros, whose
/// `‖x‖ = 13` exactly, so `h = 14δ` bit for bit; and the problem's random
/// `x`, whose `‖x‖` is summed here in f64 (to 1e-15 relative: the order of
/// the sum may differ). `‖∇ₓL‖` is asserted to differ from `‖x‖` by more
/// than 10% at both points, so a step computed from the gradient's norm
/// fails.
#[test]
fn input_penalty_step_is_relative_to_the_input_norm() {
    let p = problem(70, Activation::Tanh);
    let exact = Tensor::from_vec(
        vec![
            3.0f64, 4.0, 0.0, 0.0, 0.0, 12.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
        ],
        (4, 3),
        &Device::Cpu,
    )
    .unwrap();
    let eps = f64::EPSILON;
    for (what, x) in [("‖x‖ = 13", exact), ("random x", p.x.clone())] {
        let x_norm = norm(&vec_of(&x));
        let cases = [
            (FdStep::Relative(1e-4), false, 1e-4),
            (FdStep::Relative(3e-3), true, 3e-3),
            (FdStep::Auto, false, eps.sqrt()),
            (FdStep::Auto, true, eps.cbrt()),
        ];
        for (step, central, delta) in cases {
            let cfg = GradPenaltyConfig {
                rho: 1.0,
                penalty: Penalty::Norm,
                step,
                central,
            };
            let out = input_grad_penalty(|x| p.loss_at(x), &x, &p.vars, &cfg).unwrap();
            let want = delta * (1.0 + x_norm);
            println!(
                "{what} {step:?} central={central}: h = {:e}, δ(1 + ‖x‖) = {want:e}, ‖∇ₓL‖ = {}",
                out.step, out.grad_norm
            );
            assert!(
                (out.grad_norm - x_norm).abs() > 0.1 * x_norm,
                "{what}: ‖∇ₓL‖ = {} too close to ‖x‖ = {x_norm}",
                out.grad_norm
            );
            if what == "‖x‖ = 13" {
                assert_eq!(x_norm, 13.0);
                assert_eq!(out.step, delta * 14.0, "{what} {step:?} central={central}");
            } else {
                assert!(
                    (out.step - want).abs() <= 1e-15 * want,
                    "{what} {step:?} central={central}: h = {}, δ(1 + ‖x‖) = {want}",
                    out.step
                );
            }
        }
    }
}

/// `ρ = 0` is valid (`ρ ≥ 0`): the gradients are the plain ones, the
/// penalty 0, and no perturbation is made (`step` 0), for both penalties.
/// A finite-difference step that is not finite and `> 0` is refused.
#[test]
fn rho_zero_is_the_plain_gradient_and_bad_steps_are_refused() {
    let p = problem(12, Activation::Tanh);
    let plain = plain_grads(&p);
    let cfg = GradPenaltyConfig {
        rho: 0.0,
        ..Default::default()
    };
    let out = param_grad_penalty(|| p.loss(), &p.vars, &cfg).unwrap();
    assert_eq!(store_vecs(&p, &out.grads), plain);
    assert_eq!((out.penalty, out.step), (0.0, 0.0));
    let out = input_grad_penalty(|x| p.loss_at(x), &p.x, &p.vars, &cfg).unwrap();
    assert_eq!(store_vecs(&p, &out.grads), plain);
    assert_eq!((out.penalty, out.step), (0.0, 0.0));
    assert!(out.grad_norm > 0.0);
    for step in [
        FdStep::Absolute(0.0),
        FdStep::Relative(0.0),
        FdStep::Absolute(-0.1),
        FdStep::Relative(f64::NAN),
        FdStep::Absolute(f64::INFINITY),
    ] {
        let cfg = GradPenaltyConfig {
            step,
            ..Default::default()
        };
        let e = param_grad_penalty(|| p.loss(), &p.vars, &cfg).unwrap_err();
        assert!(e.to_string().contains("step"), "{step:?}: {e}");
        let e = input_grad_penalty(|x| p.loss_at(x), &p.x, &p.vars, &cfg).unwrap_err();
        assert!(e.to_string().contains("step"), "{step:?}: {e}");
    }
}

/// A variable listed twice would count twice in `‖g‖` and `‖θ‖` and be
/// moved twice: refused, naming both places, with the variable unchanged.
#[test]
fn a_variable_listed_twice_is_refused() {
    let p = problem(12, Activation::Tanh);
    let before: Vec<Vec<f64>> = p.vars.iter().map(|v| vec_of(v.as_tensor())).collect();
    let mut vars = p.vars.clone();
    vars.push(p.vars[0].clone());
    let e = param_grad_penalty(|| p.loss(), &vars, &GradPenaltyConfig::default()).unwrap_err();
    assert!(matches!(e, steepest::Error::Config { .. }), "{e:?}");
    let last = vars.len() - 1;
    let msg = e.to_string();
    assert!(
        msg.contains("vars[0]") && msg.contains(&format!("vars[{last}]")),
        "{msg}"
    );
    let after: Vec<Vec<f64>> = p.vars.iter().map(|v| vec_of(v.as_tensor())).collect();
    assert_eq!(before, after);
}

/// `FdStep::Auto` takes the machine epsilon of the parameters' dtype:
/// `h = δ(1 + ‖θ‖)` with `δ = √ε` (forward) or `∛ε` (central), `ε = 2⁻⁵²`
/// (f64), `2⁻²³` (f32), `2⁻⁷` (bf16). `θ = (0.5, −1.25, 2)` is exact in
/// every dtype; `‖θ‖ = √5.8125`.
#[test]
fn auto_step_follows_the_parameters_dtype() {
    let theta_norm = 5.8125f64.sqrt();
    for (dtype, eps) in [
        (DType::F64, 2f64.powi(-52)),
        (DType::F32, 2f64.powi(-23)),
        (DType::BF16, 2f64.powi(-7)),
    ] {
        let w = Var::from_tensor(
            &Tensor::new(&[0.5f64, -1.25, 2.0], &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap(),
        )
        .unwrap();
        let loss = || w.as_tensor().to_dtype(DType::F32)?.powf(3.0)?.sum_all();
        for (central, delta) in [(false, eps.sqrt()), (true, eps.cbrt())] {
            let cfg = GradPenaltyConfig {
                central,
                ..Default::default()
            };
            let out = param_grad_penalty(loss, std::slice::from_ref(&w), &cfg).unwrap();
            let want = delta * (1.0 + theta_norm);
            assert!(
                (out.step - want).abs() <= 1e-12 * want,
                "{dtype:?} central={central}: h = {:e}, want {want:e}",
                out.step
            );
        }
    }
}

/// A gradient that is finite at `θ` but not at a perturbed point is an
/// error naming the variable, not a NaN/Inf result: `−√w` at `w = 1` with
/// `h = 1` moves to `w = 0` (forward), `√w` at `w = 1` has `θ − hĝ` at
/// `w = 0` (central), and the input penalty of `−√(x·a)` at `x = a = 1`
/// moves `x` to 0, where `∂/∂a` is 0/0. The variables are restored.
#[test]
fn a_non_finite_gradient_at_a_perturbed_point_is_an_error() {
    let one = || Var::from_tensor(&Tensor::new(&[1.0f64], &Device::Cpu).unwrap()).unwrap();
    let cfg = |central: bool| GradPenaltyConfig {
        step: FdStep::Absolute(1.0),
        central,
        ..Default::default()
    };
    let w = one();
    type Loss = fn(&Tensor) -> Result<Tensor>;
    let cases: [(Loss, bool); 2] = [
        (|w| w.sqrt()?.neg()?.sum_all(), false),
        (|w| w.sqrt()?.sum_all(), true),
    ];
    for (f, central) in cases {
        let e = param_grad_penalty(|| f(w.as_tensor()), std::slice::from_ref(&w), &cfg(central))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("param_grad_penalty: param.0 (vars[0], at the perturbed point)")
                && e.contains("NaN or Inf"),
            "central={central}: {e}"
        );
        assert_eq!(vec_of(w.as_tensor()), vec![1.0]);
    }
    let a = one();
    let x = Tensor::new(&[[1.0f64]], &Device::Cpu).unwrap();
    let e = input_grad_penalty(
        |x| x.broadcast_mul(a.as_tensor())?.sqrt()?.neg()?.sum_all(),
        &x,
        std::slice::from_ref(&a),
        &cfg(false),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("input_grad_penalty: param.0 (vars[0], at the perturbed input)")
            && e.contains("NaN or Inf"),
        "{e}"
    );
}

/// A variable without a gradient at the perturbed point counts zero there:
/// `L = ‖w‖² + 3·Σb` while `w₀ < 1.1`, `‖w‖²` alone beyond. At `w = (1, 1)`,
/// `b = 1`: `g = (2, 2, 3)`, and with `h = 1` the point `θ + hĝ` has
/// `w₀ = 1 + 2/√17 > 1.1`, so (Zhao's form, `α = ρ/h`) the gradient is
/// `(1 − α)g + α·(2w⁺, 2w⁺, 0)` with `w⁺ = 1 + 2/√17`.
#[test]
fn a_gradient_missing_at_the_perturbed_point_counts_zero() {
    let w = Var::from_tensor(&Tensor::new(&[1.0f64, 1.0], &Device::Cpu).unwrap()).unwrap();
    let b = Var::from_tensor(&Tensor::new(&[1.0f64], &Device::Cpu).unwrap()).unwrap();
    let loss = || {
        let sq = w.as_tensor().sqr()?.sum_all()?;
        if w.as_tensor().to_vec1::<f64>()?[0] < 1.1 {
            sq + (b.as_tensor().sum_all()? * 3.0)?
        } else {
            Ok(sq)
        }
    };
    let rho = 0.1;
    let cfg = GradPenaltyConfig {
        rho,
        penalty: Penalty::Norm,
        step: FdStep::Absolute(1.0),
        central: false,
    };
    let out = param_grad_penalty(loss, &[w.clone(), b.clone()], &cfg).unwrap();
    let alpha = rho / 1.0;
    let wp = 1.0 + 2.0 / 17f64.sqrt();
    let want_w = (1.0 - alpha) * 2.0 + alpha * 2.0 * wp;
    let want_b = (1.0 - alpha) * 3.0;
    let got_w = vec_of(out.grads.get(w.as_tensor()).unwrap());
    let got_b = vec_of(out.grads.get(b.as_tensor()).unwrap());
    for g in got_w {
        assert!((g - want_w).abs() < 1e-14, "{g} vs {want_w}");
    }
    assert!(
        (got_b[0] - want_b).abs() < 1e-14,
        "{} vs {want_b}",
        got_b[0]
    );
}

/// An integer input is refused up front, naming `x`.
#[test]
fn an_integer_input_is_refused() {
    let a = Var::from_tensor(&Tensor::new(&[1.0f64, 2.0], &Device::Cpu).unwrap()).unwrap();
    let x = Tensor::new(&[[1u32, 2]], &Device::Cpu).unwrap();
    let e = input_grad_penalty(
        |x| {
            x.to_dtype(DType::F64)?
                .broadcast_mul(a.as_tensor())?
                .sum_all()
        },
        &x,
        std::slice::from_ref(&a),
        &GradPenaltyConfig::default(),
    )
    .unwrap_err();
    assert!(
        matches!(e, steepest::Error::Shape { .. })
            && e.to_string().contains("input_grad_penalty: x"),
        "{e}"
    );
}

/// Variables without a gradient (frozen, or unused by the loss) are not
/// perturbed, so they set neither `‖θ‖` in `h = δ(1 + ‖θ‖)` nor the dtype of
/// `FdStep::Auto`'s `ε_mach`: the step and the penalised gradients are those
/// of the run without them, bit for bit. Before, an unused `[100, 0]` made
/// `h` 31× too large under `Relative(1e-3)`, an unused f32 variable listed
/// first gave an f64 run f32's `h` under `Auto`, and an unused NaN variable
/// was an error.
#[test]
fn variables_without_a_gradient_do_not_set_the_step() {
    let a = Var::from_tensor(&Tensor::new(&[1.0f64, 2.0], &Device::Cpu).unwrap()).unwrap();
    let loss = || a.as_tensor().sqr()?.sum_all()? * 0.5 + a.as_tensor().powf(3.0)?.sum_all()?;
    let unused = |v: Vec<f64>, dt: DType| {
        let t = Tensor::new(v.as_slice(), &Device::Cpu).unwrap();
        Var::from_tensor(&t.to_dtype(dt).unwrap()).unwrap()
    };
    for (step, extra) in [
        (FdStep::Relative(1e-3), unused(vec![100.0, 0.0], DType::F64)),
        (FdStep::Auto, unused(vec![3.0, 4.0], DType::F32)),
        (FdStep::Auto, unused(vec![f64::NAN], DType::F64)),
    ] {
        let cfg = GradPenaltyConfig {
            step,
            ..GradPenaltyConfig::default()
        };
        let alone = param_grad_penalty(loss, std::slice::from_ref(&a), &cfg).unwrap();
        let with = param_grad_penalty(loss, &[extra.clone(), a.clone()], &cfg).unwrap();
        let case = format!("{step:?}, {extra:?}");
        // Relative: h = 1e-3·(1 + ‖(1, 2)‖) = 3.24e-3, not 0.101
        assert!(
            alone.step > 0.0 && alone.step < 5e-3,
            "{case}: h {}",
            alone.step
        );
        assert_eq!(with.step, alone.step, "{case}: h");
        assert_eq!(
            vec_of(with.grads.get(a.as_tensor()).unwrap()),
            vec_of(alone.grads.get(a.as_tensor()).unwrap()),
            "{case}"
        );
        assert!(with.grads.get(extra.as_tensor()).is_none(), "{case}");
    }
}
