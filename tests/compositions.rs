//! Each alias is a short composition of transforms: `AdamW`, `Sgd`, `Muon`
//! and `Steepest` equal their hand-written chains (built from the public
//! transforms, not from the configs' `chain()`) step for step, bit for bit on
//! the CPU; and the generic (non-fused) path of Adam and SGD's momentum
//! equals the fused one within f32 rounding. `Adam → Retract` is Adam's step
//! followed by the projection onto the manifold, computed in f64.

mod common;
mod support;

use candle_core::DType;
use candle_nn::{Optimizer, VarMap};
use steepest::optim::transform::{
    Adam, Decay, Dualize, ManifoldStep, Momentum, Orthogonalize, Retract, ShapeScale,
};
use steepest::optim::{
    AdamW, AdamWConfig, Chain, Driver, DualAscent, LrAdjust, Manifold, Muon, MuonConfig, Norm,
    OptimizerState, Partition, Sgd, SgdConfig, Steepest, SteepestConfig, TryStep,
};
use steepest::{NewtonSchulz, WeightDecay};
use support::*;

type Shapes = [(&'static str, &'static [usize])];

/// Matrices of two shapes (two of one, so they batch), a wide one, a
/// conv-shaped rank-4 kernel (matrix view 4×8), an "embed" matrix, a bias
/// and a scalar.
const MIXED: &Shapes = &[
    ("a.weight", &[6, 4]),
    ("b.weight", &[6, 4]),
    ("wide.weight", &[3, 5]),
    ("conv.weight", &[4, 2, 2, 2]),
    ("embed.weight", &[9, 4]),
    ("a.bias", &[6]),
    ("gain", &[]),
];

/// Tall matrices only (the Stiefel manifold needs rows ≥ cols): two 6×4, an
/// 8×3 and a conv kernel whose matrix view is 8×4.
const TALL: &Shapes = &[
    ("a.weight", &[6, 4]),
    ("b.weight", &[6, 4]),
    ("c.weight", &[8, 3]),
    ("conv.weight", &[8, 1, 2, 2]),
];

/// Matrices and vectors of at least 4 entries (for the vector norms and the
/// vector sphere).
const VECTORS: &Shapes = &[
    ("a.weight", &[6, 4]),
    ("b.weight", &[6, 4]),
    ("conv.weight", &[4, 2, 2, 2]),
    ("a.bias", &[6]),
    ("b.bias", &[4]),
];

const STEPS: u64 = 5;

/// Runs `alias` and `composed` side by side over two copies of the same
/// model for [`STEPS`] steps (the rate halved before step 3, through
/// `set_learning_rate`): parameters and per-parameter state must agree bit
/// for bit after every step.
fn same_steps<A, B>(
    what: &str,
    shapes: &Shapes,
    dtype: DType,
    alias: impl Fn(&VarMap) -> A,
    composed: impl Fn(&VarMap) -> B,
) where
    A: Optimizer + OptimizerState,
    B: Optimizer + OptimizerState,
{
    let (va, vb) = (model_of(shapes, dtype, 7), model_of(shapes, dtype, 7));
    let start = snapshot(&va);
    let (mut a, mut b) = (alias(&va), composed(&vb));
    for t in 0..STEPS {
        if t == 3 {
            a.set_learning_rate(a.learning_rate() * 0.5);
            b.set_learning_rate(b.learning_rate() * 0.5);
        }
        a.backward_step(&loss_of(&va, shapes, t)).unwrap();
        b.backward_step(&loss_of(&vb, shapes, t)).unwrap();
        assert_eq!(
            snapshot(&va),
            snapshot(&vb),
            "{what} {dtype:?}: parameters differ after step {t}"
        );
        let (sa, sb) = (
            state_tensors(&a.state_dict().unwrap()),
            state_tensors(&b.state_dict().unwrap()),
        );
        assert_eq!(
            sa.keys().collect::<std::collections::BTreeSet<_>>(),
            sb.keys().collect::<std::collections::BTreeSet<_>>(),
            "{what} {dtype:?}: state keys differ after step {t}"
        );
        assert_eq!(sa, sb, "{what} {dtype:?}: state differs after step {t}");
    }
    // The comparison is not vacuous: every parameter moved.
    let end = snapshot(&va);
    for (name, _) in shapes {
        assert_ne!(end[*name], start[*name], "{what}: {name} never moved");
    }
}

fn decay(wd: WeightDecay, vectors: bool) -> Decay {
    Decay::new(wd, vectors).unwrap()
}

const DECAYS: [WeightDecay; 2] = [
    WeightDecay::Decoupled(0.05),
    WeightDecay::Spectral {
        lambda: 0.1,
        iters: 2,
    },
];

#[test]
fn adamw_is_decay_then_adam() {
    for dtype in [DType::F32, DType::BF16] {
        for wd in DECAYS {
            for decay_vectors in [false, true] {
                let cfg = AdamWConfig {
                    lr: 0.01,
                    beta1: 0.8,
                    beta2: 0.99,
                    eps: 1e-7,
                    weight_decay: wd,
                    decay_vectors,
                };
                same_steps(
                    &format!("AdamW {wd:?} vectors {decay_vectors}"),
                    MIXED,
                    dtype,
                    |vm| AdamW::from_varmap(vm, cfg.clone()).unwrap(),
                    |vm| {
                        let chain = Chain::new()
                            .then(decay(wd, decay_vectors))
                            .then(Adam::new(0.8, 0.99, 1e-7).unwrap());
                        Driver::from_varmap(vm, chain, 0.01).unwrap()
                    },
                );
            }
        }
    }
}

#[test]
fn sgd_is_decay_then_classic_momentum() {
    for dtype in [DType::F32, DType::BF16] {
        for wd in DECAYS {
            for (momentum, nesterov) in [(0.0, false), (0.9, false), (0.9, true)] {
                let cfg = SgdConfig {
                    lr: 0.05,
                    momentum,
                    nesterov,
                    weight_decay: wd,
                    decay_vectors: true,
                };
                same_steps(
                    &format!("Sgd {wd:?} μ {momentum} nesterov {nesterov}"),
                    MIXED,
                    dtype,
                    |vm| Sgd::from_varmap(vm, cfg.clone()).unwrap(),
                    |vm| {
                        let mut chain = Chain::new().then(decay(wd, true));
                        if momentum > 0.0 {
                            chain = chain.then(Momentum::classic(momentum, nesterov).unwrap());
                        }
                        Driver::from_varmap(vm, chain, 0.05).unwrap()
                    },
                );
            }
        }
    }
}

#[test]
fn muon_is_a_partition_of_a_muon_chain_and_an_adamw_chain() {
    let cases = [
        (
            WeightDecay::spectral(0.1),
            true,
            LrAdjust::Original,
            NewtonSchulz::muon(),
        ),
        (
            WeightDecay::Decoupled(0.1),
            false,
            LrAdjust::MatchAdamWRms(0.2),
            NewtonSchulz::polar_express(6),
        ),
    ];
    for dtype in [DType::F32, DType::BF16] {
        for (wd, nesterov, adjust, ns) in cases.clone() {
            let adamw = AdamWConfig {
                lr: 0.004,
                weight_decay: WeightDecay::Decoupled(0.01),
                decay_vectors: true,
                ..Default::default()
            };
            let cfg = MuonConfig {
                lr: 0.02,
                momentum: 0.9,
                nesterov,
                newton_schulz: ns.clone(),
                lr_adjust: adjust,
                weight_decay: wd,
                adamw: adamw.clone(),
                adamw_names: vec!["embed".into()],
            };
            same_steps(
                &format!("Muon {wd:?} nesterov {nesterov} {adjust:?}"),
                MIXED,
                dtype,
                |vm| Muon::from_varmap(vm, cfg.clone()).unwrap(),
                |vm| {
                    let muon = Chain::new()
                        .then(decay(wd, false))
                        .then(Momentum::ema(0.9, nesterov).unwrap())
                        .then(Orthogonalize { ns: ns.clone() })
                        .then(ShapeScale { adjust });
                    let adam = Chain::new()
                        .then(decay(WeightDecay::Decoupled(0.01), true))
                        .then(Adam::default());
                    Partition::by(|p| {
                        if p.is_matrix() && !p.name.contains("embed") {
                            "muon"
                        } else {
                            "adamw"
                        }
                    })
                    .group("muon", muon, 0.02)
                    .group("adamw", adam, 0.004)
                    .build_from_varmap(vm)
                    .unwrap()
                },
            );
        }
    }
}

/// Steepest's chain: decay of every parameter, EMA momentum (if μ > 0),
/// then `Dualize` (free) or `ManifoldStep`.
fn steepest_case(what: &str, shapes: &Shapes, cfg: SteepestConfig, last: Chain, dtype: DType) {
    let (wd, mu, nesterov, lr) = (cfg.weight_decay, cfg.momentum, cfg.nesterov, cfg.lr);
    same_steps(
        what,
        shapes,
        dtype,
        |vm| Steepest::from_varmap(vm, cfg.clone()).unwrap(),
        |vm| {
            let mut chain = Chain::new().then(decay(wd, true));
            if mu > 0.0 {
                chain = chain.then(Momentum::ema(mu, nesterov).unwrap());
            }
            for (name, t) in last.iter() {
                chain.push(name, t.boxed());
            }
            Driver::from_varmap(vm, chain, lr).unwrap()
        },
    );
}

fn manifold_step(manifold: Manifold, norm: Norm, dual: DualAscent) -> Chain {
    let m = ManifoldStep {
        manifold,
        norm,
        dual,
    };
    m.validate("test").unwrap();
    Chain::new().then(m)
}

#[test]
fn steepest_free_is_momentum_then_dualize() {
    let spectral = Norm::Spectral(NewtonSchulz::muon());
    for dtype in [DType::F32, DType::BF16] {
        for (norm, shapes, wd, mu) in [
            (spectral.clone(), TALL, WeightDecay::spectral(0.1), 0.9),
            (spectral.clone(), TALL, WeightDecay::Decoupled(0.1), 0.0),
            (Norm::Lp(3.0), VECTORS, WeightDecay::Decoupled(0.1), 0.9),
            (Norm::Sign, VECTORS, WeightDecay::spectral(0.1), 0.9),
            (Norm::Euclidean, VECTORS, WeightDecay::None, 0.5),
        ] {
            let cfg = SteepestConfig {
                lr: 0.02,
                momentum: mu,
                nesterov: mu > 0.0,
                norm: norm.clone(),
                manifold: Manifold::Free,
                weight_decay: wd,
                dual: DualAscent::default(),
            };
            steepest_case(
                &format!("Steepest free {norm:?} {wd:?} μ {mu}"),
                shapes,
                cfg,
                Chain::new().then(Dualize { norm }),
                dtype,
            );
        }
    }
}

#[test]
fn steepest_on_a_manifold_is_momentum_then_manifold_step() {
    let spectral = Norm::Spectral(NewtonSchulz::muon());
    let dual = DualAscent {
        lr: None,
        steps: 2,
        sign: false,
        smoothing: None,
        bracket: None,
    };
    for dtype in [DType::F32, DType::BF16] {
        for (manifold, norm, shapes, wd) in [
            (
                Manifold::Sphere { radius: 2.0 },
                Norm::Euclidean,
                VECTORS,
                WeightDecay::Decoupled(0.1),
            ),
            (
                Manifold::Sphere { radius: 2.0 },
                Norm::Lp(3.0),
                VECTORS,
                WeightDecay::spectral(0.1),
            ),
            (
                Manifold::SpectralSphere { radius: 1.5 },
                spectral.clone(),
                TALL,
                WeightDecay::spectral(0.1),
            ),
            (
                Manifold::Stiefel { transpose: false },
                spectral.clone(),
                TALL,
                WeightDecay::Decoupled(0.1),
            ),
        ] {
            let cfg = SteepestConfig {
                lr: 0.05,
                momentum: 0.9,
                nesterov: true,
                norm: norm.clone(),
                manifold,
                weight_decay: wd,
                dual,
            };
            steepest_case(
                &format!("Steepest {manifold:?} {norm:?} {wd:?}"),
                shapes,
                cfg,
                manifold_step(manifold, norm, dual),
                dtype,
            );
        }
    }
}

/// Muon's matrix step and Steepest's free spectral step are one algorithm
/// (EMA momentum, then `msign`): without decay and shape scaling they agree
/// bit for bit.
#[test]
fn muon_matrices_step_like_steepest_free_spectral() {
    let ns = NewtonSchulz::muon();
    let muon = MuonConfig {
        lr: 0.02,
        momentum: 0.9,
        nesterov: true,
        newton_schulz: ns.clone(),
        lr_adjust: LrAdjust::None,
        weight_decay: WeightDecay::None,
        ..Default::default()
    };
    let steepest = SteepestConfig {
        lr: 0.02,
        momentum: 0.9,
        nesterov: true,
        norm: Norm::Spectral(ns),
        manifold: Manifold::Free,
        weight_decay: WeightDecay::None,
        dual: DualAscent::default(),
    };
    let (va, vb) = (model_of(TALL, DType::F32, 3), model_of(TALL, DType::F32, 3));
    let mut a = Muon::from_varmap(&va, muon).unwrap();
    let mut b = Steepest::from_varmap(&vb, steepest).unwrap();
    assert_eq!(a.muon_params().len(), TALL.len());
    for t in 0..STEPS {
        a.backward_step(&loss_of(&va, TALL, t)).unwrap();
        b.backward_step(&loss_of(&vb, TALL, t)).unwrap();
        assert_eq!(snapshot(&va), snapshot(&vb), "step {t}");
    }
}

/// Largest |a − b| over all parameters, and the largest |a|.
fn max_diff(a: &VarMap, b: &VarMap) -> (f64, f64) {
    let (sa, sb) = (snapshot(a), snapshot(b));
    let mut d: f64 = 0.0;
    let mut m: f64 = 0.0;
    for (k, va) in &sa {
        for (x, y) in va.iter().zip(&sb[k]) {
            d = d.max(common::nan_aware_diff(*x, *y));
            m = m.max(x.abs());
        }
    }
    (d, m)
}

/// Runs two chains over copies of `MIXED` (f32) for `steps` steps; returns
/// the largest parameter difference and the largest |w|.
fn fused_vs_generic(fused: Chain, generic: Chain, lr: f64, steps: u64) -> (f64, f64) {
    let (va, vb) = (
        model_of(MIXED, DType::F32, 11),
        model_of(MIXED, DType::F32, 11),
    );
    let mut a = Driver::from_varmap(&va, fused, lr).unwrap();
    let mut b = Driver::from_varmap(&vb, generic, lr).unwrap();
    let start = snapshot(&va);
    for t in 0..steps {
        a.backward_step(&loss_of(&va, MIXED, t)).unwrap();
        b.backward_step(&loss_of(&vb, MIXED, t)).unwrap();
    }
    assert_ne!(snapshot(&va), start);
    max_diff(&va, &vb)
}

/// Adam followed by another direction transform does not fuse: it writes its
/// scaled moment as the direction (candle ops), and the update runs after.
/// With a transform that changes nothing (`ShapeScale { None }`) the result
/// equals the fused pass up to f32 rounding.
///
/// Tolerance: the two paths compute the same moments with the same f32
/// operations, but the update differs in rounding order (fused:
/// `(m/(√v/√bc₂ + ε))·f32(η/bc₁)`; generic: `((m/(√v·f32(1/√bc₂) + ε))·f32(1/bc₁))·f32(η)`),
/// a few ulps of the update, and `w − u` may then round to the neighbouring
/// f32. Per step that is at most ~1 ulp of |w| plus ~8 ulps of η·|m̂/√v̂|
/// (≤ η·3 in these steps); the differences feed back through the gradients
/// (Lipschitz constant O(1) here) but do not grow faster than linearly over
/// a few steps. So after `N` steps: `|Δw| ≤ N·(2·ulp(max|w|) + 8·ulp(3η))`,
/// with a further factor 4 of headroom (≈ 6e-6 here; measured: 6e-8, one
/// ulp). A wrong generic path (a missing bias correction, β applied twice,
/// the decay lost) is off by ≥ 1e-3 here (β₁ = 0.5 instead of 0.9: 2e-2).
#[test]
fn unfused_adam_equals_fused_adam_within_f32_rounding() {
    let lr = 0.01;
    let steps = 6;
    let wd = WeightDecay::Decoupled(0.05);
    let fused = Chain::new().then(decay(wd, true)).then(Adam::default());
    let generic = Chain::new()
        .then(decay(wd, true))
        .then(Adam::default())
        .then(ShapeScale {
            adjust: LrAdjust::None,
        });
    let (d, wmax) = fused_vs_generic(fused, generic, lr, steps);
    let ulp = |x: f64| x * f32::EPSILON as f64;
    let tol = 4.0 * steps as f64 * (2.0 * ulp(wmax) + 8.0 * ulp(3.0 * lr));
    assert!(
        d <= tol,
        "generic Adam path differs from the fused one by {d:e} (tolerance {tol:e})"
    );
    // The check can see a real error: a generic path that got one
    // hyperparameter wrong (β₁ = 0.5 instead of 0.9) is far outside it.
    let other = Chain::new()
        .then(decay(wd, true))
        .then(Adam::new(0.5, 0.999, 1e-8).unwrap())
        .then(ShapeScale {
            adjust: LrAdjust::None,
        });
    let fused = Chain::new().then(decay(wd, true)).then(Adam::default());
    let (d_other, _) = fused_vs_generic(fused, other, lr, steps);
    assert!(d_other > 100.0 * tol, "{d_other:e} vs tolerance {tol:e}");
}

/// The same for SGD's classic momentum (fused as the last direction
/// transform, candle ops when another follows). Tolerance as above with the
/// update `η·|buf| ≤ η·Σμᵏ|g| ≤ 10η` here (|g| ≤ 1): Nesterov's
/// `g + μ·buf` and the product with η could round in another order
/// (measured: both paths run the same f32 operations and agree bit for bit).
#[test]
fn unfused_sgd_momentum_equals_fused_within_f32_rounding() {
    let lr = 0.05;
    let steps = 6;
    for nesterov in [false, true] {
        let wd = WeightDecay::spectral(0.1);
        let fused = Chain::new()
            .then(decay(wd, true))
            .then(Momentum::classic(0.9, nesterov).unwrap());
        let generic = Chain::new()
            .then(decay(wd, true))
            .then(Momentum::classic(0.9, nesterov).unwrap())
            .then(ShapeScale {
                adjust: LrAdjust::None,
            });
        let (d, wmax) = fused_vs_generic(fused, generic, lr, steps);
        let ulp = |x: f64| x * f32::EPSILON as f64;
        let tol = 4.0 * steps as f64 * (2.0 * ulp(wmax) + 8.0 * ulp(10.0 * lr));
        assert!(
            d <= tol,
            "nesterov {nesterov}: generic momentum differs from the fused one by {d:e} (tolerance {tol:e})"
        );
        // Another momentum is far outside the tolerance.
        let fused = Chain::new()
            .then(decay(wd, true))
            .then(Momentum::classic(0.9, nesterov).unwrap());
        let other = Chain::new()
            .then(decay(wd, true))
            .then(Momentum::classic(0.8, nesterov).unwrap())
            .then(ShapeScale {
                adjust: LrAdjust::None,
            });
        let (d_other, _) = fused_vs_generic(fused, other, lr, steps);
        assert!(d_other > 100.0 * tol, "{d_other:e} vs tolerance {tol:e}");
    }
}

/// The projection onto `manifold` of a matrix, in f64: `r·W/‖W‖_F` (the
/// Euclidean sphere), `r·W/σ₁(W)` (the spectral sphere, σ₁ from an SVD),
/// the polar factor `UVᵀ` (Stiefel).
fn project(manifold: Manifold, w: &nalgebra::DMatrix<f64>) -> nalgebra::DMatrix<f64> {
    match manifold {
        Manifold::Sphere { radius } => w * (radius / w.norm()),
        Manifold::SpectralSphere { radius } => w * (radius / common::singular_values(w)[0]),
        Manifold::Stiefel { .. } => common::polar(w),
        Manifold::Free => unreachable!(),
    }
}

/// A parameter's matrix view (rows = first dimension) in f64.
fn matrix_of(vm: &VarMap, name: &str) -> nalgebra::DMatrix<f64> {
    let t = var(vm, name).as_tensor().clone();
    let rows = t.dim(0).unwrap();
    common::to_dmatrix(&t.reshape((rows, ())).unwrap())
}

/// `Adam → Retract(m)` is Adam's step followed by the projection onto `m`,
/// computed independently in f64 (an SVD for σ₁ and the polar factor).
/// Two copies of a model start on the manifold; before each step the plain
/// Adam copy is set to the retracted one's parameters, so both see the same
/// gradients and keep the same Adam state, and after the step the retracted
/// copy must equal the projection of the plain one, to f32 rounding
/// (measured: at most 1.6e-7 relative, on all three manifolds; the steps
/// leave the manifold by 2e-4 to 9e-2).
#[test]
fn retract_after_adam_is_the_projection_of_the_adam_step() {
    const TOL: f64 = 1e-6;
    // Wide matrices: the transposed Stiefel manifold, W Wᵀ = I.
    const WIDE: &Shapes = &[
        ("a.weight", &[4, 6]),
        ("b.weight", &[4, 6]),
        ("c.weight", &[3, 8]),
        ("conv.weight", &[4, 2, 2, 2]),
        // Square: on the manifold for both orientations (WᵀW = I ⇔ WWᵀ = I).
        ("s.weight", &[4, 4]),
    ];
    for (manifold, shapes) in [
        (Manifold::Sphere { radius: 2.0 }, TALL),
        (Manifold::SpectralSphere { radius: 2.0 }, TALL),
        (Manifold::Stiefel { transpose: false }, TALL),
        (Manifold::Stiefel { transpose: true }, WIDE),
    ] {
        let adam = || Adam::new(0.9, 0.99, 1e-8).unwrap();
        let (plain_vm, retracted_vm) = (
            model_of(shapes, DType::F32, 3),
            model_of(shapes, DType::F32, 3),
        );
        for (name, shape) in shapes {
            let on = project(manifold, &matrix_of(&retracted_vm, name));
            let t = common::from_dmatrix(&on, DType::F32)
                .reshape(*shape)
                .unwrap();
            var(&retracted_vm, name).set(&t).unwrap();
        }
        let mut plain = Driver::from_varmap(&plain_vm, Chain::new().then(adam()), 0.05).unwrap();
        let mut retracted = Driver::from_varmap(
            &retracted_vm,
            Chain::new()
                .then(adam())
                .then(Retract::new(manifold).unwrap()),
            0.05,
        )
        .unwrap();
        for t in 0..3 {
            for (name, _) in shapes {
                var(&plain_vm, name)
                    .set(var(&retracted_vm, name).as_tensor())
                    .unwrap();
            }
            plain.backward_step(&loss_of(&plain_vm, shapes, t)).unwrap();
            retracted
                .backward_step(&loss_of(&retracted_vm, shapes, t))
                .unwrap();
            for (name, _) in shapes {
                let stepped = matrix_of(&plain_vm, name);
                let want = project(manifold, &stepped);
                let got = matrix_of(&retracted_vm, name);
                let err = common::rel_err(&got, &want);
                assert!(
                    err <= TOL,
                    "{manifold:?}, step {t}, {name}: relative error {err:e} > {TOL:e}"
                );
                // Not vacuous: the Adam step left the manifold.
                let off = common::rel_err(&stepped, &want);
                assert!(
                    off > 100.0 * TOL,
                    "{manifold:?}, step {t}, {name}: the step stayed on the manifold ({off:e})"
                );
            }
        }
    }
}

/// A retraction after Adam from a zero-initialised matrix (a zero gradient
/// keeps it at 0, where no retraction has an answer) is refused naming that
/// parameter, first or second in its batch, and changes no parameter or
/// state.
#[test]
fn retract_after_adam_refuses_a_zero_matrix_naming_it_and_changes_nothing() {
    for (manifold, why) in [
        (Manifold::Sphere { radius: 1.0 }, "norm 0"),
        (Manifold::SpectralSphere { radius: 1.0 }, "spectral norm 0"),
        (Manifold::Stiefel { transpose: false }, "rank-deficient"),
    ] {
        for zero_first in [true, false] {
            let order: &Shapes = if zero_first {
                &[("w.zero", &[6, 4]), ("w.good", &[6, 4])]
            } else {
                &[("w.good", &[6, 4]), ("w.zero", &[6, 4])]
            };
            let vm = model_of(order, DType::F32, 5);
            let good = common::polar(&matrix_of(&vm, "w.good"));
            var(&vm, "w.good")
                .set(&common::from_dmatrix(&good, DType::F32))
                .unwrap();
            let zero = var(&vm, "w.zero");
            zero.set(&zero.as_tensor().zeros_like().unwrap()).unwrap();
            let chain = Chain::new()
                .then(Adam::new(0.9, 0.99, 1e-8).unwrap())
                .then(Retract::new(manifold).unwrap());
            let mut opt = Driver::from_varmap(&vm, chain, 0.05).unwrap();
            let before = snapshot(&vm);
            // Σ‖W‖²: its gradient at W = 0 is 0, so Adam leaves w.zero at 0.
            let sq = order
                .iter()
                .map(|(n, _)| var(&vm, n).as_tensor().sqr().unwrap().sum_all().unwrap())
                .reduce(|a, b| (a + b).unwrap())
                .unwrap();
            let e = opt.try_backward_step(&sq).unwrap_err();
            let case = format!("{manifold:?}, zero first: {zero_first}: {e}");
            assert_eq!(e.who(), Some("w.zero"), "{case}");
            assert!(e.to_string().contains(why), "{case}");
            assert_eq!(snapshot(&vm), before, "a parameter changed: {case}");
            assert!(
                opt.state_dict()
                    .unwrap()
                    .keys()
                    .all(|k| k.starts_with("__")),
                "state was created by the refused step: {case}"
            );
        }
    }
}

/// `ShapeScale` before a fused update (Adam, classic momentum: the last
/// direction transform, run by one kernel) scales each matrix's step by its
/// factor: `ShapeScale{Original} → Adam` at rate η on a tall 8×2 matrix
/// (factor √(8/2) = 2) is Adam at 2η, bit for bit, over 3 steps; likewise
/// SGD with Nesterov momentum. A square matrix (factor 1) is the control.
#[test]
fn shape_scale_before_a_fused_update_scales_its_step() {
    let adam = || Adam::new(0.9, 0.999, 1e-8).unwrap();
    let sgd = || Momentum::classic(0.9, true).unwrap();
    let (lr, steps) = (0.01, 3);
    const TALL_8X2: &Shapes = &[("m.weight", &[8, 2])];
    const SQUARE_4: &Shapes = &[("m.weight", &[4, 4])];
    for (shapes, factor) in [(TALL_8X2, 2.0), (SQUARE_4, 1.0)] {
        let shape = shapes[0].1;
        for (what, scaled, plain) in [
            (
                "adam",
                Chain::new()
                    .then(ShapeScale {
                        adjust: LrAdjust::Original,
                    })
                    .then(adam()),
                Chain::new().then(adam()),
            ),
            (
                "sgd",
                Chain::new()
                    .then(ShapeScale {
                        adjust: LrAdjust::Original,
                    })
                    .then(sgd()),
                Chain::new().then(sgd()),
            ),
        ] {
            let (va, vb) = (
                model_of(shapes, DType::F32, 4),
                model_of(shapes, DType::F32, 4),
            );
            let mut a = Driver::from_varmap(&va, scaled, lr).unwrap();
            let mut b = Driver::from_varmap(&vb, plain, lr * factor).unwrap();
            for t in 0..steps {
                a.backward_step(&loss_of(&va, shapes, t)).unwrap();
                b.backward_step(&loss_of(&vb, shapes, t)).unwrap();
            }
            assert_eq!(snapshot(&va), snapshot(&vb), "{what} {shape:?}");
        }
    }
}

/// A vector-norm `Dualize`, and an EMA `Momentum` after it (which then reads
/// the batched direction, not the gradients), act on each member of a batch
/// of same-shape parameters with that member's own direction: one step from
/// the known gradients `c_i` of `Σ ⟨c_i, w_i⟩` moves `w_i` by `−η·sign(c_i)`
/// (Sign) and by `−η(1−μ)·c_i/‖c_i‖` (Euclidean, then EMA from a zero
/// buffer), in closed form.
#[test]
fn each_batch_member_gets_its_own_direction() {
    use candle_core::{Device, Tensor, Var};
    let (lr, mu) = (0.1, 0.5);
    let c: [[f32; 6]; 2] = [
        [1.0, -2.0, 2.0, 0.5, 3.0, -1.0],
        [-3.0, 0.25, 1.0, 4.0, -0.5, 2.0],
    ];
    for ema in [false, true] {
        let vm = VarMap::new();
        let vars: Vec<Var> = ["a.weight", "b.weight"]
            .iter()
            .map(|name| {
                let v = Var::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
                vm.data()
                    .lock()
                    .unwrap()
                    .insert(name.to_string(), v.clone());
                v
            })
            .collect();
        let chain = if ema {
            Chain::new()
                .then(Dualize {
                    norm: Norm::Euclidean,
                })
                .then(Momentum::ema(mu, false).unwrap())
        } else {
            Chain::new().then(Dualize { norm: Norm::Sign })
        };
        let mut opt = Driver::from_varmap(&vm, chain, lr).unwrap();
        let mut loss = Tensor::new(0f32, &Device::Cpu).unwrap();
        for (v, ci) in vars.iter().zip(&c) {
            let ci = Tensor::from_slice(ci, (2, 3), &Device::Cpu).unwrap();
            loss = (loss + (v.as_tensor() * ci).unwrap().sum_all().unwrap()).unwrap();
        }
        opt.backward_step(&loss).unwrap();
        for (v, ci) in vars.iter().zip(&c) {
            let norm = ci.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
            let got = v
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            for (g, x) in got.iter().zip(ci) {
                let x = *x as f64;
                let want = if ema {
                    -lr * (1.0 - mu) * x / norm
                } else {
                    -lr * x.signum()
                };
                assert!(
                    (*g as f64 - want).abs() <= 1e-6,
                    "ema {ema}: {g} vs {want} (c = {ci:?})"
                );
            }
        }
    }
}

/// `Orthogonalize` on a parameter with no matrix view (a bias) is refused
/// when the optimizer is built, as a configuration error naming that
/// parameter, not at the first step.
#[test]
fn orthogonalize_refuses_a_vector_at_construction() {
    let vm = model_of(&[("w", &[4, 3]), ("w.bias", &[4])], DType::F32, 1);
    let chain = Chain::new().then(Orthogonalize {
        ns: NewtonSchulz::muon(),
    });
    match Driver::from_varmap(&vm, chain, 0.1) {
        Err(steepest::Error::Config { who, what }) => {
            assert_eq!(who, "w.bias");
            assert!(what.contains("matrix"), "{what}");
        }
        r => panic!("{:?}", r.err()),
    }
}

/// The transforms' fields are public, so a struct literal can hold settings
/// their constructors refuse; building an optimizer with one is refused at
/// construction (`Error::Config`, naming the setting), as loading such
/// settings from a checkpoint is, instead of stepping with them (measured
/// before: NaN weights from `Adam { beta1: 1 }` or a negative Newton–Schulz
/// eps, growing weights from a negative decay, no complaint at all from
/// momentum 1.5, a negative `MatchAdamWRms` or `cubic(0)`).
#[test]
fn transforms_built_from_struct_literals_are_validated_at_construction() {
    let vm = model_of(TALL, DType::F32, 3);
    let bad: Vec<(&str, Chain)> = vec![
        (
            "Adam",
            Chain::new().then(Adam {
                beta1: 1.0,
                ..Adam::default()
            }),
        ),
        (
            "Adam",
            Chain::new().then(Adam {
                eps: 0.0,
                ..Adam::default()
            }),
        ),
        (
            "Momentum",
            Chain::new().then(Momentum {
                momentum: 1.5,
                ..Momentum::ema(0.9, false).unwrap()
            }),
        ),
        (
            "Decay.decay",
            Chain::new().then(Decay {
                decay: WeightDecay::Decoupled(-5.0),
                vectors: false,
            }),
        ),
        (
            "Orthogonalize.ns",
            Chain::new().then(Orthogonalize {
                ns: NewtonSchulz::muon().with_eps(-1.0),
            }),
        ),
        (
            "Orthogonalize.ns",
            Chain::new().then(Orthogonalize {
                ns: NewtonSchulz::cubic(0),
            }),
        ),
        (
            "ShapeScale.adjust",
            Chain::new().then(ShapeScale {
                adjust: LrAdjust::MatchAdamWRms(-1.0),
            }),
        ),
        (
            "Dualize.norm",
            Chain::new().then(Dualize {
                norm: Norm::Lp(0.5),
            }),
        ),
    ];
    for (who, chain) in bad {
        let e = Driver::from_varmap(&vm, chain, 0.01).unwrap_err();
        assert!(
            matches!(&e, steepest::Error::Config { .. }) && e.to_string().contains(who),
            "{who}: {e}"
        );
    }
}

/// A manifold step runs the update itself: a direction transform after it
/// (Adam would run a second, fused update off the manifold; ShapeScale
/// would be dropped) is refused when the chain is built, naming both; a
/// post-update transform after it is fine.
#[test]
fn nothing_but_post_update_transforms_may_follow_a_manifold_step() {
    let vm = VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &candle_core::Device::Cpu);
    vb.get_with_hints(
        (4, 3),
        "w",
        candle_nn::Init::Randn {
            mean: 0.0,
            stdev: 1.0,
        },
    )
    .unwrap();
    let step = || ManifoldStep {
        manifold: Manifold::Sphere { radius: 1.0 },
        norm: Norm::Euclidean,
        dual: DualAscent::default(),
    };
    for (after, name) in [
        (Chain::new().then(step()).then(Adam::default()), "adam"),
        (
            Chain::new().then(step()).then(ShapeScale {
                adjust: LrAdjust::Original,
            }),
            "shape_scale",
        ),
    ] {
        let e = Driver::from_varmap(&vm, after, 0.01)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("runs the update itself") && e.contains(name),
            "{e}"
        );
    }
    Driver::from_varmap(
        &vm,
        Chain::new()
            .then(Momentum::ema(0.9, false).unwrap())
            .then(step()),
        0.01,
    )
    .unwrap();
}
