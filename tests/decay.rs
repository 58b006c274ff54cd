//! Spectral weight decay (docs/math.md §1): σ₁ ← (1 − ηλ)σ₁, every other singular
//! triplet unchanged — checked with an f64 SVD, for the pure function and
//! through each optimizer.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use common::*;
use nalgebra::DMatrix;
use steepest::decay::{decoupled_decay, spectral_decay};
use steepest::optim::{AdamW, AdamWConfig, Muon, MuonConfig, NamedVar, Sgd, SgdConfig};
use steepest::{power_iteration, WeightDecay};

const S: [f64; 4] = [4.0, 2.0, 1.0, 0.5];

/// Asserts `after` has singular values `S` with σ₁ scaled by `1 − coeff`, and
/// that `before − after` is rank one along the top singular pair.
fn assert_only_top_shrunk(before: &DMatrix<f64>, after: &DMatrix<f64>, coeff: f64, tol: f64) {
    let got = singular_values(after);
    let mut want = S.to_vec();
    want[0] *= 1.0 - coeff;
    want.sort_by(|a, b| b.partial_cmp(a).unwrap());
    for (g, w) in got.iter().zip(&want) {
        assert!(
            (g - w).abs() < tol,
            "singular values {got:?}, expected {want:?}"
        );
    }
    let svd = before.clone().svd(true, true);
    let i = svd.singular_values.imax();
    let u1 = svd.u.as_ref().unwrap().column(i).into_owned();
    let v1 = svd.v_t.as_ref().unwrap().row(i).transpose();
    let expected = before - (&u1 * v1.transpose()) * (coeff * svd.singular_values[i]);
    assert!(
        (after - expected).norm() < tol * 10.0,
        "change is not −coeff·σ₁u₁v₁ᵀ"
    );
}

#[test]
fn spectral_decay_shrinks_only_sigma1() {
    let mut r = rng(20);
    for (m, n) in [(7, 4), (4, 7), (5, 5)] {
        let w = with_singular_values(&mut r, m, n, &S);
        let t = from_dmatrix(&w, DType::F64);
        let top = power_iteration(&t, None, 60).unwrap();
        let after = to_dmatrix(&spectral_decay(&t, &top, 0.1).unwrap());
        assert_only_top_shrunk(&w, &after, 0.1, 1e-10);
    }
}

#[test]
fn spectral_decay_batched() {
    let mut r = rng(21);
    let mats: Vec<_> = (0..3)
        .map(|_| with_singular_values(&mut r, 6, 4, &S))
        .collect();
    let batch = Tensor::stack(
        &mats
            .iter()
            .map(|w| from_dmatrix(w, DType::F64))
            .collect::<Vec<_>>(),
        0,
    )
    .unwrap();
    let top = power_iteration(&batch, None, 60).unwrap();
    let after = spectral_decay(&batch, &top, 0.2).unwrap();
    for (i, w) in mats.iter().enumerate() {
        assert_only_top_shrunk(w, &to_dmatrix(&after.get(i).unwrap()), 0.2, 1e-10);
    }
}

/// Before convergence the two sides differ: `spectral_decay` uses the
/// vector the power iteration ran on (its docs), `W − c·(Wv)vᵀ` for
/// `n ≤ m` and `W − c·u(uᵀW)` for `n > m` — checked in f64 against those
/// products from one iteration's `u`, `v` (square included).
#[test]
fn spectral_decay_uses_the_iterated_side_before_convergence() {
    let mut r = rng(25);
    for (m, n) in [(5, 5), (7, 4), (4, 7)] {
        let w = DMatrix::<f64>::from_fn(m, n, |_, _| normal_vec(&mut r, 1)[0]);
        let t = from_dmatrix(&w, DType::F64);
        let top = power_iteration(&t, None, 1).unwrap();
        let (u, v) = (to_dvector(&top.u), to_dvector(&top.v));
        let want = if n <= m {
            &w - (&w * &v) * v.transpose() * 0.3
        } else {
            &w - &u * (u.transpose() * &w) * 0.3
        };
        let got = to_dmatrix(&spectral_decay(&t, &top, 0.3).unwrap());
        assert!((&got - &want).amax_nan() < 1e-12, "({m}, {n})");
        // Not converged: the other side's product is another matrix.
        let other = if n <= m {
            &w - &u * (u.transpose() * &w) * 0.3
        } else {
            &w - (&w * &v) * v.transpose() * 0.3
        };
        assert!(
            (&got - &other).amax() > 1e-6,
            "({m}, {n}): converged already"
        );
    }
}

/// Warm steps run the configured number of power iterations: with
/// `Spectral { iters: 3 }` and a zero gradient, AdamW's second step is, from
/// the stored `v` (f64, closed form), on a tall matrix `W − ηλ(Wx)xᵀ` with
/// `x = (WᵀW)³v/‖·‖`, and on a wide one (iterating on the short side)
/// `W − ηλ·u uᵀW` with `u = (W Wᵀ)³y/‖·‖`, `y = Wv/‖Wv‖`; on matrices with
/// σ₂/σ₁ = 0.9 (so `v` is far from converged and one iteration is not three).
#[test]
fn warm_steps_run_the_configured_iterations() {
    let (lr, lambda) = (0.5, 0.2);
    let mut r = rng(26);
    for (m, n) in [(6, 4), (4, 6)] {
        let w0 = with_singular_values(&mut r, m, n, &[4.0, 3.6, 1.0, 0.5]);
        let var = Var::from_tensor(&from_dmatrix(&w0, DType::F64)).unwrap();
        let mut opt = AdamW::from_named(
            vec![NamedVar {
                name: "w".into(),
                var: var.clone(),
            }],
            AdamWConfig {
                lr,
                weight_decay: WeightDecay::Spectral { lambda, iters: 3 },
                ..Default::default()
            },
        )
        .unwrap();
        opt.backward_step(&zero_loss(&var)).unwrap();
        let w1 = to_dmatrix(var.as_tensor());
        let state = steepest::OptimizerState::state_dict(&opt).unwrap();
        let v = to_dvector(&state["w.decay.v"]);
        opt.backward_step(&zero_loss(&var)).unwrap();
        let got = to_dmatrix(var.as_tensor());
        let iterate = |k: usize| {
            if m >= n {
                let mut x = v.clone();
                for _ in 0..k {
                    x = w1.transpose() * (&w1 * &x);
                    x /= x.norm();
                }
                &w1 - (&w1 * &x) * x.transpose() * (lr * lambda)
            } else {
                let mut u = &w1 * &v;
                u /= u.norm();
                for _ in 0..k {
                    u = &w1 * (w1.transpose() * &u);
                    u /= u.norm();
                }
                &w1 - &u * (u.transpose() * &w1) * (lr * lambda)
            }
        };
        let err = (&got - iterate(3)).amax_nan();
        assert!(err < 1e-10, "{m}×{n}: {err:e}");
        assert!(
            (&got - iterate(1)).amax() > 1e-6,
            "{m}×{n}: 1 iteration gives the same"
        );
    }
}

/// Decoupled decay is `(1 − c)·W` entry by entry (singular values alone
/// would not see a sign flip, `(c − 1)·W`), so every singular value
/// shrinks by `1 − c`.
#[test]
fn decoupled_decay_shrinks_every_singular_value() {
    let mut r = rng(22);
    let w = with_singular_values(&mut r, 5, 3, &[3.0, 2.0, 1.0]);
    let after = to_dmatrix(&decoupled_decay(&from_dmatrix(&w, DType::F64), 0.1).unwrap());
    assert!((&after - &w * 0.9).amax_nan() < 1e-15);
    let s = singular_values(&after);
    for (g, want) in s.iter().zip([2.7, 1.8, 0.9]) {
        assert!((g - want).abs() < 1e-12);
    }
}

/// `Σ w⊙0`: a loss whose gradient is exactly zero (candle drops the gradient of `w * 0.0`).
fn zero_loss(var: &Var) -> Tensor {
    let t = var.as_tensor();
    (t * t.zeros_like().unwrap()).unwrap().sum_all().unwrap()
}

/// One optimizer step with a zero gradient leaves only the decay.
fn step_with_zero_grad<O: Optimizer>(
    w: &DMatrix<f64>,
    make: impl FnOnce(Vec<NamedVar>) -> O,
) -> DMatrix<f64> {
    let var = Var::from_tensor(&from_dmatrix(w, DType::F64)).unwrap();
    let mut opt = make(vec![NamedVar {
        name: "w".into(),
        var: var.clone(),
    }]);
    let loss = zero_loss(&var);
    opt.backward_step(&loss).unwrap();
    to_dmatrix(var.as_tensor())
}

#[test]
fn every_optimizer_applies_spectral_decay_exactly() {
    let (lr, lambda) = (0.5, 0.2);
    let wd = WeightDecay::Spectral { lambda, iters: 60 };
    let mut r = rng(23);
    for (m, n) in [(6, 4), (4, 6)] {
        let w = with_singular_values(&mut r, m, n, &S);
        let adamw = step_with_zero_grad(&w, |v| {
            AdamW::from_named(
                v,
                AdamWConfig {
                    lr,
                    weight_decay: wd,
                    ..Default::default()
                },
            )
            .unwrap()
        });
        assert_only_top_shrunk(&w, &adamw, lr * lambda, 1e-9);
        let sgd = step_with_zero_grad(&w, |v| {
            Sgd::from_named(
                v,
                SgdConfig {
                    lr,
                    momentum: 0.9,
                    weight_decay: wd,
                    ..Default::default()
                },
            )
            .unwrap()
        });
        assert_only_top_shrunk(&w, &sgd, lr * lambda, 1e-9);
        let muon = step_with_zero_grad(&w, |v| {
            Muon::from_named(
                v,
                MuonConfig {
                    lr,
                    weight_decay: wd,
                    ..Default::default()
                },
            )
            .unwrap()
        });
        assert_only_top_shrunk(&w, &muon, lr * lambda, 1e-9);
    }
}

#[test]
fn cold_start_uses_enough_iterations_and_warm_start_tracks_v1() {
    // iters = 1, but the first step has no stored v₁: it must still be accurate.
    let (lr, lambda) = (0.1, 0.5);
    let mut r = rng(24);
    let w = with_singular_values(&mut r, 8, 5, &S);
    let var = Var::from_tensor(&from_dmatrix(&w, DType::F64)).unwrap();
    let cfg = SgdConfig {
        lr,
        weight_decay: WeightDecay::spectral(lambda),
        ..Default::default()
    };
    let mut opt = Sgd::from_named(
        vec![NamedVar {
            name: "w".into(),
            var: var.clone(),
        }],
        cfg,
    )
    .unwrap();
    let mut sigma1 = 4.0;
    for step in 0..5 {
        let loss = zero_loss(&var);
        opt.backward_step(&loss).unwrap();
        sigma1 *= 1.0 - lr * lambda;
        let s = singular_values(&to_dmatrix(var.as_tensor()));
        // Cold start: 10 iterations, error ∝ (σ₂/σ₁)²⁰ ≈ 1e-6; then one warm iteration a step.
        assert!(
            (s[0] - sigma1).abs() < 1e-4 * sigma1,
            "step {step}: σ₁ = {}, expected {sigma1}",
            s[0]
        );
        assert!(
            (s[1] - 2.0).abs() < 1e-4,
            "step {step}: σ₂ moved to {}",
            s[1]
        );
    }
    let state = steepest::OptimizerState::state_dict(&opt).unwrap();
    assert_eq!(state["w.decay.v"].dims(), &[5]);
}

#[test]
fn vectors_are_not_decayed_unless_configured() {
    for decay_vectors in [false, true] {
        let var =
            Var::from_tensor(&Tensor::new(&[1.0f64, -2.0, 3.0], &Device::Cpu).unwrap()).unwrap();
        let cfg = SgdConfig {
            lr: 0.5,
            weight_decay: WeightDecay::spectral(0.2),
            decay_vectors,
            ..Default::default()
        };
        let mut opt = Sgd::from_named(
            vec![NamedVar {
                name: "b".into(),
                var: var.clone(),
            }],
            cfg,
        )
        .unwrap();
        opt.backward_step(&zero_loss(&var)).unwrap();
        let got = var.as_tensor().to_vec1::<f64>().unwrap();
        let f = if decay_vectors { 0.9 } else { 1.0 };
        assert_eq!(got, vec![f, -2.0 * f, 3.0 * f]);
    }
}

#[test]
fn equal_top_singular_values_shrink_one_direction_of_the_top_subspace() {
    // σ₁ = σ₂: v₁ is any unit vector of the top subspace; decay shrinks that
    // direction only, so the singular values become {(1−c)σ₁, σ₁, rest}.
    let mut r = rng(25);
    let w = with_singular_values(&mut r, 6, 5, &[3.0, 3.0, 1.0, 0.5]);
    let t = from_dmatrix(&w, DType::F64);
    let top = power_iteration(&t, None, 30).unwrap();
    let after = singular_values(&to_dmatrix(&spectral_decay(&t, &top, 0.1).unwrap()));
    let want = [3.0, 2.7, 1.0, 0.5];
    for (g, w) in after.iter().zip(want) {
        assert!((g - w).abs() < 1e-9, "{after:?} vs {want:?}");
    }
}

/// Two matrices of one shape share a batched power iteration: each is
/// decayed along its own top singular triplet (checked per matrix against
/// its f64 SVD), not along another member's.
#[test]
fn same_shape_matrices_each_lose_their_own_top_direction() {
    let (lr, lambda) = (0.5, 0.2);
    let mut r = rng(27);
    let ws: Vec<DMatrix<f64>> = (0..3)
        .map(|_| with_singular_values(&mut r, 6, 4, &S))
        .collect();
    let vars: Vec<Var> = ws
        .iter()
        .map(|w| Var::from_tensor(&from_dmatrix(w, DType::F64)).unwrap())
        .collect();
    let named = vars
        .iter()
        .enumerate()
        .map(|(i, v)| NamedVar {
            name: format!("w{i}"),
            var: v.clone(),
        })
        .collect();
    let mut opt = Sgd::from_named(
        named,
        SgdConfig {
            lr,
            weight_decay: WeightDecay::Spectral { lambda, iters: 60 },
            ..Default::default()
        },
    )
    .unwrap();
    let loss = vars
        .iter()
        .map(zero_loss)
        .reduce(|a, b| (a + b).unwrap())
        .unwrap();
    opt.backward_step(&loss).unwrap();
    for (w, v) in ws.iter().zip(&vars) {
        assert_only_top_shrunk(w, &to_dmatrix(v.as_tensor()), lr * lambda, 1e-9);
    }
}

/// The cold start (no stored `v₁` yet) uses the power iteration's default
/// start, not an all-ones vector: on a matrix whose columns come in pairs
/// `(a, −a)`, `W·1 = 0` holds exactly in floating point (every product with
/// an all-ones start cancels to 0, so such a start finds σ = 0 and decays
/// nothing), while the default start finds σ₁ within the cold start's
/// iterations: σ₁ shrinks by `1 − ηλ`, σ₂ stays (checked by f64 SVD).
#[test]
fn cold_start_finds_sigma1_when_all_ones_is_in_the_null_space() {
    let (lr, lambda) = (0.1, 0.5);
    let mut r = rng(28);
    let a = with_singular_values(&mut r, 8, 2, &[4.0, 2.0]);
    let w = DMatrix::from_fn(8, 4, |i, j| {
        let x = a[(i, j / 2)];
        if j % 2 == 0 {
            x
        } else {
            -x
        }
    });
    let before = singular_values(&w);
    let var = Var::from_tensor(&from_dmatrix(&w, DType::F64)).unwrap();
    let ones = Tensor::ones(4, DType::F64, &Device::Cpu).unwrap();
    let wx = var.as_tensor().matmul(&ones.unsqueeze(1).unwrap()).unwrap();
    assert!(to_f64_vec(&wx).iter().all(|&x| x == 0.0), "W·1 = 0 exactly");
    let mut opt = Sgd::from_named(
        vec![NamedVar {
            name: "w".into(),
            var: var.clone(),
        }],
        SgdConfig {
            lr,
            weight_decay: WeightDecay::spectral(lambda),
            ..Default::default()
        },
    )
    .unwrap();
    opt.backward_step(&zero_loss(&var)).unwrap();
    let s = singular_values(&to_dmatrix(var.as_tensor()));
    let sigma1 = before[0] * (1.0 - lr * lambda);
    assert!(
        (s[0] - sigma1).abs() < 1e-4 * sigma1,
        "σ₁ = {}, expected {sigma1} (before: {before:?})",
        s[0]
    );
    assert!(
        (s[1] - before[1]).abs() < 1e-4,
        "σ₂ moved from {} to {}",
        before[1],
        s[1]
    );
}

/// A checkpoint whose spectral decay hyperparameters are invalid (`iters`
/// set to 0 in its header: `v₁` would never be refreshed) is refused as a
/// checkpoint error naming `iters`, as the same settings are at
/// construction; the untouched checkpoint loads.
#[test]
fn a_checkpoint_with_invalid_decay_settings_is_refused() {
    use steepest::OptimizerState;
    fn zero_iters(v: &mut serde_json::Value) -> usize {
        match v {
            serde_json::Value::Object(o) => o
                .iter_mut()
                .map(|(k, x)| {
                    if k == "iters" {
                        *x = serde_json::json!(0);
                        1
                    } else {
                        zero_iters(x)
                    }
                })
                .sum(),
            serde_json::Value::Array(a) => a.iter_mut().map(zero_iters).sum(),
            _ => 0,
        }
    }
    let mut r = rng(29);
    let w = with_singular_values(&mut r, 6, 4, &S);
    let make = |var: &Var| {
        Sgd::from_named(
            vec![NamedVar {
                name: "w".into(),
                var: var.clone(),
            }],
            SgdConfig {
                lr: 0.1,
                weight_decay: WeightDecay::spectral(0.5),
                ..Default::default()
            },
        )
        .unwrap()
    };
    let var = Var::from_tensor(&from_dmatrix(&w, DType::F64)).unwrap();
    let mut opt = make(&var);
    opt.backward_step(&zero_loss(&var)).unwrap();
    let good = opt.state_dict().unwrap();
    let mut edited = 0;
    let bad = with_header(&good, |h| {
        for part in h["body"]["partitions"].as_array_mut().unwrap() {
            for t in part["transforms"].as_array_mut().unwrap() {
                if t["kind"] == "decay" {
                    edited += zero_iters(&mut t["hparams"]);
                }
            }
        }
    });
    assert_eq!(edited, 1, "one decay transform with `iters`");
    let mut fresh = make(&var);
    let e = fresh.load_state_dict(&bad).unwrap_err();
    assert!(matches!(e, steepest::Error::Checkpoint { .. }), "{e:?}");
    assert!(e.to_string().contains("iters"), "{e}");
    fresh.load_state_dict(&good).unwrap();
}

/// Spectral decay's cold start (more power iterations for a member with no
/// stored `v₁`) is the member's own: a warm parameter batched with one that
/// steps for the first time decays as it does alone, bit for bit. Before,
/// one cold member gave the whole group `max(iters, 10)` iterations.
#[test]
fn a_cold_member_does_not_change_a_warm_ones_spectral_decay() {
    let mut r = rng(63);
    let a0 = randn(&mut r, &[7, 5], DType::F32);
    let b0 = randn(&mut r, &[7, 5], DType::F32);
    let g1 = randn(&mut r, &[7, 5], DType::F32);
    let g2a = randn(&mut r, &[7, 5], DType::F32);
    let g2b = randn(&mut r, &[7, 5], DType::F32);
    let cfg = SgdConfig {
        lr: 0.1,
        weight_decay: WeightDecay::Spectral {
            lambda: 0.5,
            iters: 1,
        },
        ..Default::default()
    };
    let named = |items: &[(&str, &Tensor)]| -> Vec<NamedVar> {
        items
            .iter()
            .map(|(n, t)| NamedVar {
                name: n.to_string(),
                var: Var::from_tensor(t).unwrap(),
            })
            .collect()
    };
    let both = named(&[("a", &a0), ("b", &b0)]);
    let mut opt = Sgd::from_named(both.clone(), cfg.clone()).unwrap();
    opt.step_subset(&[(0, g1.clone())]).unwrap();
    opt.step_subset(&[(0, g2a.clone()), (1, g2b.clone())])
        .unwrap();
    let alone = named(&[("a", &a0)]);
    let mut solo = Sgd::from_named(alone.clone(), cfg).unwrap();
    solo.step_subset(&[(0, g1.clone())]).unwrap();
    solo.step_subset(&[(0, g2a.clone())]).unwrap();
    assert_eq!(
        to_f64_vec(both[0].var.as_tensor()),
        to_f64_vec(alone[0].var.as_tensor())
    );
}
