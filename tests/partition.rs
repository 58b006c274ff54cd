//! `Partition`: routing parameters to chains by a label function, the checks
//! at construction, learning-rate ratios, atomic steps across groups, and one
//! checkpoint for all groups.

mod common;
mod support;

use std::collections::{BTreeSet, HashMap};

use candle_core::DType;
use candle_nn::{Optimizer, VarMap};
use steepest::optim::transform::{Adam, Decay, Momentum, Orthogonalize, Retract, ShapeScale};
use steepest::optim::{
    Chain, Driver, LrAdjust, Manifold, NamedVar, OptimizerState, ParamInfo, Partition,
};
use steepest::{Error, NewtonSchulz, TryStep, WeightDecay};
use support::*;

type Shapes = [(&'static str, &'static [usize])];

const SHAPES: &Shapes = &[
    ("a.weight", &[6, 4]),
    ("b.weight", &[6, 4]),
    ("wide.weight", &[3, 5]),
    ("conv.weight", &[4, 2, 2, 2]),
    ("embed.weight", &[9, 4]),
    ("a.bias", &[6]),
    ("gain", &[]),
];

/// Muon's matrix chain.
fn muon_chain() -> Chain {
    Chain::new()
        .then(Decay::new(WeightDecay::spectral(0.1), false).unwrap())
        .then(Momentum::ema(0.9, true).unwrap())
        .then(Orthogonalize {
            ns: NewtonSchulz::muon(),
        })
        .then(ShapeScale {
            adjust: LrAdjust::Original,
        })
}

fn adamw_chain() -> Chain {
    Chain::new()
        .then(Decay::new(WeightDecay::Decoupled(0.1), true).unwrap())
        .then(Adam::default())
}

/// Adam, then back onto the spectral sphere ‖W‖₂ = 2 (a fallible chain: the
/// driver runs it first, under an undo copy).
fn sphere_chain() -> Chain {
    Chain::new()
        .then(Adam::default())
        .then(Retract::new(Manifold::SpectralSphere { radius: 2.0 }).unwrap())
}

/// Matrices (but the embedding) to `muon`, the rest to `adamw`.
fn muon_label(p: &ParamInfo) -> &'static str {
    if p.is_matrix() && !p.name.starts_with("embed") {
        "muon"
    } else {
        "adamw"
    }
}

/// Powers of two, so that `lr × ratio` is exact and a reference driver at
/// the product runs bit for bit like the group.
const LR_MUON: f64 = 0.0625;
const LR_ADAMW: f64 = 0.015625;

fn muon_partition(vm: &VarMap) -> Driver {
    Partition::by(muon_label)
        .group("muon", muon_chain(), LR_MUON)
        .group("adamw", adamw_chain(), LR_ADAMW)
        .build_from_varmap(vm)
        .unwrap()
}

fn named(vm: &VarMap, names: &[&str]) -> Vec<NamedVar> {
    names
        .iter()
        .map(|n| NamedVar {
            name: n.to_string(),
            var: var(vm, n),
        })
        .collect()
}

const MUON_NAMES: [&str; 4] = ["a.weight", "b.weight", "conv.weight", "wide.weight"];
const ADAMW_NAMES: [&str; 3] = ["a.bias", "embed.weight", "gain"];

/// The partition against one plain driver per group over a copy of the
/// model, at the rates `lrs` (set before each step): parameters and state
/// must agree bit for bit after every step.
fn partition_equals_separate_drivers(lrs: &[f64]) {
    let (vp, vr) = (
        model_of(SHAPES, DType::F32, 5),
        model_of(SHAPES, DType::F32, 5),
    );
    let mut part = muon_partition(&vp);
    let mut muon = Driver::new(named(&vr, &MUON_NAMES), muon_chain(), LR_MUON).unwrap();
    let mut adamw = Driver::new(named(&vr, &ADAMW_NAMES), adamw_chain(), LR_ADAMW).unwrap();
    for (t, &lr) in lrs.iter().enumerate() {
        part.set_learning_rate(lr);
        assert_eq!(part.learning_rate(), lr);
        assert_eq!(part.lr_ratio("muon"), Some(1.0));
        assert_eq!(part.lr_ratio("adamw"), Some(LR_ADAMW / LR_MUON));
        muon.set_learning_rate(lr);
        adamw.set_learning_rate(lr * LR_ADAMW / LR_MUON);
        let before = snapshot(&vp);
        part.backward_step(&loss_of(&vp, SHAPES, t as u64)).unwrap();
        let grads = loss_of(&vr, SHAPES, t as u64).backward().unwrap();
        muon.step(&grads).unwrap();
        adamw.step(&grads).unwrap();
        assert_eq!(snapshot(&vp), snapshot(&vr), "step {t} at lr {lr}");
        if lr == 0.0 {
            assert_eq!(snapshot(&vp), before, "a step at rate 0 moved a parameter");
        } else {
            assert_ne!(snapshot(&vp), before);
        }
        let mut reference = state_tensors(&muon.state_dict().unwrap());
        reference.extend(state_tensors(&adamw.state_dict().unwrap()));
        assert_eq!(
            state_tensors(&part.state_dict().unwrap()),
            reference,
            "state after step {t}"
        );
    }
}

#[test]
fn parameters_are_routed_by_the_label_function() {
    let vm = model_of(SHAPES, DType::F32, 5);
    let part = muon_partition(&vm);
    assert_eq!(part.labels(), ["muon", "adamw"]);
    for n in MUON_NAMES {
        assert_eq!(part.label_of(n), Some("muon"), "{n}");
    }
    for n in ADAMW_NAMES {
        assert_eq!(part.label_of(n), Some("adamw"), "{n}");
    }
    assert_eq!(part.label_of("nonexistent"), None);
    // Each group runs its own chain: state keys by transform.
    let mut part = part;
    part.backward_step(&loss_of(&vm, SHAPES, 0)).unwrap();
    let keys: BTreeSet<String> = part.state_dict().unwrap().into_keys().collect();
    for k in [
        "a.weight.momentum.buf",
        "a.weight.decay.v",
        "conv.weight.momentum.buf",
        "embed.weight.adam.exp_avg",
        "gain.adam.step",
    ] {
        assert!(keys.contains(k), "{k} missing from {keys:?}");
    }
    assert!(!keys.contains("a.weight.adam.exp_avg"));
    assert!(!keys.contains("embed.weight.momentum.buf"));
    // And steps exactly like one driver per group.
    partition_equals_separate_drivers(&[LR_MUON; 3]);
}

#[test]
fn a_label_without_a_group_is_refused_naming_the_parameter() {
    let vm = model_of(SHAPES, DType::F32, 5);
    let err = Partition::by(|p: &ParamInfo| {
        if p.dims.is_empty() {
            "scalars".to_string()
        } else {
            muon_label(p).to_string()
        }
    })
    .group("muon", muon_chain(), 0.02)
    .group("adamw", adamw_chain(), 0.01)
    .build_from_varmap(&vm)
    .unwrap_err();
    match &err {
        Error::Config { who, what } => {
            assert_eq!(who, "gain", "{err}");
            assert!(what.contains("scalars"), "{err}");
        }
        e => panic!("expected Error::Config, got {e:?}"),
    }
}

#[test]
fn a_group_defined_twice_is_refused() {
    let vm = model_of(SHAPES, DType::F32, 5);
    let err = Partition::by(muon_label)
        .group("muon", muon_chain(), 0.02)
        .group("adamw", adamw_chain(), 0.01)
        .group("muon", adamw_chain(), 0.01)
        .build_from_varmap(&vm)
        .unwrap_err();
    match &err {
        Error::Config { who, what } => {
            assert!(who.contains("muon"), "{err}");
            assert!(what.contains("twice"), "{err}");
        }
        e => panic!("expected Error::Config, got {e:?}"),
    }
    // No groups at all.
    assert!(matches!(
        Partition::by(muon_label).build_from_varmap(&vm),
        Err(Error::Config { .. })
    ));
}

#[test]
fn group_rates_are_checked() {
    let vm = model_of(SHAPES, DType::F32, 5);
    let build = |muon: f64, adamw: f64| {
        Partition::by(muon_label)
            .group("muon", muon_chain(), muon)
            .group("adamw", adamw_chain(), adamw)
            .build_from_varmap(&vm)
    };
    // The first group at 0, another not: the ratio would be undefined.
    match build(0.0, 0.01).unwrap_err() {
        Error::Config { who, what } => {
            assert!(who.contains("adamw"), "{who}: {what}");
            assert!(what.contains("undefined"), "{who}: {what}");
        }
        e => panic!("expected Error::Config, got {e:?}"),
    }
    // Both at 0 (e.g. before a warmup): accepted, ratio 1.
    let d = build(0.0, 0.0).unwrap();
    assert_eq!(d.lr_ratio("adamw"), Some(1.0));
    // Another group at 0 behind a non-zero first: ratio 0.
    assert_eq!(build(0.02, 0.0).unwrap().lr_ratio("adamw"), Some(0.0));
    // Not finite, negative.
    for bad in [f64::NAN, f64::INFINITY, -0.01] {
        assert!(
            matches!(build(bad, 0.01), Err(Error::Config { .. })),
            "first group at {bad}"
        );
        assert!(
            matches!(build(0.01, bad), Err(Error::Config { .. })),
            "second group at {bad}"
        );
    }
}

#[test]
fn set_learning_rate_keeps_each_groups_ratio() {
    // Halve, stop (rate 0: nothing moves), and come back above the start:
    // the second group runs at a quarter of the first throughout.
    partition_equals_separate_drivers(&[LR_MUON, LR_MUON / 2.0, 0.0, LR_MUON * 2.0, LR_MUON]);
}

#[test]
fn a_step_is_atomic_across_partitions() {
    // A fallible group (Adam then a retraction, run first under an undo
    // copy) and an infallible one.
    let make = |vm: &VarMap| {
        Partition::by(|p: &ParamInfo| if p.is_matrix() { "sphere" } else { "adamw" })
            .group("sphere", sphere_chain(), 0.01)
            .group("adamw", adamw_chain(), 0.01)
            .build_from_varmap(vm)
            .unwrap()
    };
    for poisoned in ["a.bias", "conv.weight"] {
        for bad in [f64::NAN, f64::INFINITY] {
            let vm = model_of(SHAPES, DType::F32, 5);
            let mut opt = make(&vm);
            let reference = model_of(SHAPES, DType::F32, 5);
            let mut ref_opt = make(&reference);
            for t in 0..2 {
                opt.backward_step(&loss_of(&vm, SHAPES, t)).unwrap();
                ref_opt
                    .backward_step(&loss_of(&reference, SHAPES, t))
                    .unwrap();
            }
            let params = snapshot(&vm);
            let state = state_snapshot(&opt.state_dict().unwrap());
            let err = opt
                .try_step(&grads_with(&vm, SHAPES, 2, poisoned, bad))
                .unwrap_err();
            match &err {
                Error::NonFiniteGradient { param } => assert_eq!(param, poisoned),
                e => panic!("expected NonFiniteGradient, got {e:?}"),
            }
            assert_eq!(
                snapshot(&vm),
                params,
                "{poisoned} {bad}: a parameter changed"
            );
            assert_eq!(
                state_snapshot(&opt.state_dict().unwrap()),
                state,
                "{poisoned} {bad}: the state changed"
            );
            // The next good step is the one the reference takes.
            for t in 2..4 {
                opt.backward_step(&loss_of(&vm, SHAPES, t)).unwrap();
                ref_opt
                    .backward_step(&loss_of(&reference, SHAPES, t))
                    .unwrap();
            }
            assert_eq!(snapshot(&vm), snapshot(&reference));
        }
    }
}

fn sphere_partition(vm: &VarMap) -> Driver {
    Partition::by(|p: &ParamInfo| {
        if p.name.starts_with("embed") {
            "sphere"
        } else {
            muon_label(p)
        }
    })
    .group("muon", muon_chain(), LR_MUON)
    .group("adamw", adamw_chain(), LR_ADAMW)
    .group("sphere", sphere_chain(), 0.01)
    .build_from_varmap(vm)
    .unwrap()
}

#[test]
fn one_checkpoint_for_all_groups_round_trips_through_a_file() {
    let vm = model_of(SHAPES, DType::F32, 5);
    let mut opt = sphere_partition(&vm);
    for t in 0..6 {
        opt.backward_step(&loss_of(&vm, SHAPES, t)).unwrap();
    }
    let straight = snapshot(&vm);

    let dir = temp_dir("partition");
    let vm = model_of(SHAPES, DType::F32, 5);
    let mut opt = sphere_partition(&vm);
    for t in 0..3 {
        opt.backward_step(&loss_of(&vm, SHAPES, t)).unwrap();
    }
    opt.set_learning_rate(LR_MUON / 2.0);
    let s = opt.state_dict().unwrap();
    // One header with every group, one key per (parameter, transform, field).
    let h = common::header(&s);
    assert_eq!(h["kind"], "partition");
    let labels: Vec<&str> = h["body"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["label"].as_str().unwrap())
        .collect();
    assert_eq!(labels, ["muon", "adamw", "sphere"]);
    for k in [
        "a.weight.momentum.buf",
        "gain.adam.exp_avg",
        "embed.weight.adam.exp_avg",
        "embed.weight.retract.v",
    ] {
        assert!(s.contains_key(k), "{k}");
    }
    vm.save(dir.join("params.safetensors")).unwrap();
    opt.save_state(dir.join("opt.safetensors")).unwrap();
    drop(opt);

    let mut vm = model_of(SHAPES, DType::F32, 5);
    vm.load(dir.join("params.safetensors")).unwrap();
    let mut opt = sphere_partition(&vm);
    opt.load_state(dir.join("opt.safetensors")).unwrap();
    assert_eq!(opt.learning_rate(), LR_MUON / 2.0, "the rate is restored");
    assert_eq!(opt.lr_ratio("adamw"), Some(LR_ADAMW / LR_MUON));
    opt.set_learning_rate(LR_MUON);
    for t in 3..6 {
        opt.backward_step(&loss_of(&vm, SHAPES, t)).unwrap();
    }
    assert_eq!(snapshot(&vm), straight, "resumed run differs");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_checkpoint_with_other_routing_is_refused_naming_the_parameter() {
    let vm = model_of(SHAPES, DType::F32, 5);
    // Same groups; `embed.weight` goes to `muon` here, to `adamw` there.
    let mut other = Partition::by(|p: &ParamInfo| if p.is_matrix() { "muon" } else { "adamw" })
        .group("muon", muon_chain(), LR_MUON)
        .group("adamw", adamw_chain(), LR_ADAMW)
        .build_from_varmap(&vm)
        .unwrap();
    other.backward_step(&loss_of(&vm, SHAPES, 0)).unwrap();
    let theirs = other.state_dict().unwrap();

    let vm = model_of(SHAPES, DType::F32, 5);
    let mut opt = muon_partition(&vm);
    opt.backward_step(&loss_of(&vm, SHAPES, 0)).unwrap();
    opt.set_learning_rate(0.03);
    let before: HashMap<_, _> = state_snapshot(&opt.state_dict().unwrap());
    let err = opt.load_state_dict(&theirs).unwrap_err();
    match &err {
        Error::Checkpoint { who, what } => {
            assert_eq!(who, "embed.weight", "{err}");
            assert!(what.contains("muon") && what.contains("adamw"), "{err}");
        }
        e => panic!("expected Error::Checkpoint, got {e:?}"),
    }
    assert_eq!(state_snapshot(&opt.state_dict().unwrap()), before);
    assert_eq!(opt.learning_rate(), 0.03);
    // Through a file the same.
    let dir = temp_dir("partition-routing");
    other.save_state(dir.join("opt.safetensors")).unwrap();
    let err = opt.load_state(dir.join("opt.safetensors")).unwrap_err();
    assert!(
        matches!(&err, Error::Checkpoint { who, .. } if who == "embed.weight"),
        "{err}"
    );
    assert_eq!(state_snapshot(&opt.state_dict().unwrap()), before);
    std::fs::remove_dir_all(&dir).ok();
}

/// A transform that fails without declaring `fallible()` runs after the
/// first write: the step is partly applied, and the error says which
/// parameters were updated and which may be inconsistent. Declared
/// fallible, the same failure changes nothing.
#[test]
fn an_undeclared_failure_says_the_step_was_partly_applied() {
    for declared in [false, true] {
        let vm = model_of(SHAPES, DType::F32, 5);
        let now = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        // Momentum (state) before the failing transform: its state moves
        // before the failure.
        let failing = Chain::new()
            .then(Momentum::ema(0.9, false).unwrap())
            .then(FailOn {
                target: "wide.weight",
                now: now.clone(),
                declared,
            });
        let mut opt = Partition::by(|p: &ParamInfo| match p.name.as_str() {
            "wide.weight" => "failing",
            _ => "adamw",
        })
        .group("adamw", adamw_chain(), 0.01)
        .group("failing", failing, 0.01)
        .build_from_varmap(&vm)
        .unwrap();
        opt.backward_step(&loss_of(&vm, SHAPES, 0)).unwrap();
        now.store(true, std::sync::atomic::Ordering::SeqCst);
        let params = snapshot(&vm);
        let state = state_snapshot(&opt.state_dict().unwrap());
        let err = opt
            .try_step(&grads_with(&vm, SHAPES, 1, "gain", 1.0))
            .unwrap_err();
        assert_eq!(err.who(), Some("wide.weight"), "{err}");
        let after = snapshot(&vm);
        if declared {
            assert!(!err.to_string().contains("partly applied"), "{err}");
            assert_eq!(after, params, "declared fallible: nothing changes");
            assert_eq!(state_snapshot(&opt.state_dict().unwrap()), state);
        } else {
            let e = err.to_string();
            assert!(
                e.contains("told to fail; the step was partly applied"),
                "{e}"
            );
            // Groups run by partition (in the order defined) and shape: the
            // adamw groups ran before wide.weight's.
            let moved: BTreeSet<&str> = SHAPES
                .iter()
                .map(|(n, _)| *n)
                .filter(|n| after[*n] != params[*n])
                .collect();
            assert!(
                !moved.is_empty() && !moved.contains("wide.weight"),
                "{moved:?}"
            );
            // The first three updated are named, and the count is right.
            let listed = e
                .split("updated: ")
                .nth(1)
                .unwrap()
                .split(", …")
                .next()
                .unwrap();
            for n in listed.split(", ") {
                assert!(moved.contains(n), "{n} listed but did not move: {e}");
            }
            assert!(
                e.contains(&format!("({} in all)", moved.len())),
                "{moved:?}: {e}"
            );
            assert!(
                e.contains("possibly inconsistent (state advanced, parameters not): wide.weight"),
                "{e}"
            );
        }
    }
}

/// The transforms' own rate checks see each group's rate, not the base
/// rate: groups at 0.1 (plain Adam) and 0.2 (decay λ = 0.1, then Adam);
/// after `set_lr(6)` the second runs at 12, where `1 − lr·λ = −0.2` would
/// flip the weights' sign, so the step is refused naming the decay and the
/// group, and nothing changes (the base rate alone, 6, would pass: 0.6).
#[test]
fn a_group_rate_too_large_for_its_decay_is_refused() {
    let vm = model_of(SHAPES, DType::F32, 5);
    let decayed = Chain::new()
        .then(Decay::new(WeightDecay::Decoupled(0.1), true).unwrap())
        .then(Adam::default());
    let mut opt = Partition::by(|p: &ParamInfo| if p.is_matrix() { "decayed" } else { "plain" })
        .group("plain", Chain::new().then(Adam::default()), 0.1)
        .group("decayed", decayed, 0.2)
        .build_from_varmap(&vm)
        .unwrap();
    opt.backward_step(&loss_of(&vm, SHAPES, 0)).unwrap();
    opt.set_learning_rate(6.0);
    let before = snapshot(&vm);
    let state = state_snapshot(&opt.state_dict().unwrap());
    let e = opt.try_backward_step(&loss_of(&vm, SHAPES, 1)).unwrap_err();
    assert!(matches!(e, Error::Config { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("weight_decay") && msg.contains("decayed"),
        "{msg}"
    );
    assert_eq!(snapshot(&vm), before, "a parameter changed");
    assert_eq!(state_snapshot(&opt.state_dict().unwrap()), state);
    // At 5 the group runs at 10: lr·λ = 1, allowed.
    opt.set_learning_rate(5.0);
    opt.backward_step(&loss_of(&vm, SHAPES, 1)).unwrap();
}

/// The same label twice in a row is refused too.
#[test]
fn a_group_defined_twice_in_a_row_is_refused() {
    let vm = model_of(SHAPES, DType::F32, 5);
    let err = Partition::by(muon_label)
        .group("muon", muon_chain(), 0.02)
        .group("muon", muon_chain(), 0.02)
        .group("adamw", adamw_chain(), 0.01)
        .build_from_varmap(&vm)
        .unwrap_err();
    assert!(
        matches!(&err, Error::Config { who, what } if who.contains("muon") && what.contains("twice")),
        "{err}"
    );
}

/// A chain that changes the direction after a transform acting after the
/// update (`Retract`, stage Post) is refused when the optimizer is built:
/// the later transform would act on a direction already applied.
#[test]
fn a_direction_transform_after_a_retraction_is_refused() {
    let vm = model_of(&[("w", &[6, 4])], DType::F32, 5);
    let chain = Chain::new()
        .then(Retract::new(Manifold::Sphere { radius: 1.0 }).unwrap())
        .then(Momentum::ema(0.9, true).unwrap());
    let e = Driver::from_varmap(&vm, chain, 0.1).unwrap_err();
    assert!(
        matches!(&e, Error::Config { what, .. } if what.contains("acts after the update")),
        "{e}"
    );
}

/// Each rate is finite, but their ratio is not (`1e10 / 1e-300` overflows
/// f64): the partition is refused at construction, naming the group's lr
/// ratio, rather than at its first step.
#[test]
fn a_rate_ratio_that_overflows_is_refused_at_construction() {
    let vm = model_of(SHAPES, DType::F32, 5);
    let err = Partition::by(muon_label)
        .group("muon", muon_chain(), 1e-300)
        .group("adamw", adamw_chain(), 1e10)
        .build_from_varmap(&vm)
        .unwrap_err();
    match err {
        Error::Config { who, what } => {
            assert!(
                who.contains("adamw") && who.contains("ratio"),
                "{who}: {what}"
            );
        }
        e => panic!("expected Error::Config, got {e:?}"),
    }
}

/// `Retract`'s fields are public: a struct literal that `Retract::new`
/// would refuse (a bad radius, the spectral norm on the vector sphere) is
/// refused when a driver is built, naming the transform, as is a Stiefel
/// orientation that does not fit the matrix view.
#[test]
fn retract_settings_are_checked_at_construction() {
    let vm = model_of(&[("w", &[3usize, 5][..])], DType::F32, 6);
    let build = |r: Retract| Driver::from_varmap(&vm, Chain::new().then(r), 0.01);
    for (r, says) in [
        (
            Retract {
                manifold: Manifold::Sphere { radius: f64::NAN },
                norm: steepest::Norm::Euclidean,
            },
            "radius",
        ),
        (
            Retract {
                manifold: Manifold::SpectralSphere { radius: -1.0 },
                norm: steepest::Norm::Euclidean,
            },
            "radius",
        ),
        (
            Retract {
                manifold: Manifold::Sphere { radius: 1.0 },
                norm: steepest::Norm::Spectral(NewtonSchulz::default()),
            },
            "vector norm",
        ),
        (
            Retract::new(Manifold::Stiefel { transpose: false }).unwrap(),
            "3×5",
        ),
    ] {
        let e = build(r.clone()).unwrap_err().to_string();
        assert!(e.contains(says), "{r:?}: {e}");
    }
    assert!(build(Retract::new(Manifold::Stiefel { transpose: true }).unwrap()).is_ok());
}

/// Transforms compose: two `ShapeScale`s multiply the step length
/// (`√(8/5)` then `0.2·√8` on an 8×5 matrix) and two decays multiply the
/// decay factor (`(1 − ηλ₁)(1 − ηλ₂)`), on the gradient itself (no
/// direction transform): `w₁ = (1 − ηλ₁)(1 − ηλ₂)·w₀ − η·α·g`, f64, to 1e-14.
#[test]
fn chained_shape_scales_and_decays_multiply() {
    let vm = model_of(&[("w", &[8usize, 5][..])], DType::F64, 7);
    let w = vm.data().lock().unwrap()["w"].clone();
    let w0 = w
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let (eta, l1, l2) = (0.1, 0.5, 0.3);
    let decay = |l: f64| Decay {
        decay: WeightDecay::Decoupled(l),
        vectors: false,
    };
    let chain = Chain::new()
        .then(decay(l1))
        .then_named("decay2", decay(l2))
        .then(ShapeScale {
            adjust: LrAdjust::Original,
        })
        .then_named(
            "scale2",
            ShapeScale {
                adjust: LrAdjust::MatchAdamWRms(0.2),
            },
        );
    let mut d = Driver::from_varmap(&vm, chain, eta).unwrap();
    let g: Vec<f64> = (0..40).map(|i| (i as f64 * 0.37).sin()).collect();
    let gt = candle_core::Tensor::from_vec(g.clone(), (8, 5), &candle_core::Device::Cpu).unwrap();
    d.step_subset(&[(0, gt)]).unwrap();
    let alpha = (8.0f64 / 5.0).sqrt() * 0.2 * 8f64.sqrt();
    let s = (1.0 - eta * l1) * (1.0 - eta * l2);
    let got = w
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    for ((a, w), g) in got.iter().zip(&w0).zip(&g) {
        let want = s * w - eta * alpha * g;
        assert!((a - want).abs() < 1e-14, "{a} vs {want}");
    }
}

/// Two spectral decays in one chain are refused when the optimizer is
/// built, naming both: a step holds one rank-1 decay per parameter, and
/// the second replaced the first's (λ₁ was silently dropped). A spectral
/// and a decoupled decay together are accepted, and step as both (against
/// the f64 SVD); a checkpoint that would turn the decoupled one spectral is
/// refused, changing nothing.
#[test]
fn two_spectral_decays_in_one_chain_are_refused() {
    use steepest::OptimizerState;
    let vm = model_of(&[("w", &[8usize, 5][..])], DType::F32, 7);
    let spectral = |lambda: f64| Decay {
        decay: WeightDecay::Spectral { lambda, iters: 1 },
        vectors: false,
    };
    let two = Chain::new()
        .then(spectral(0.5))
        .then_named("decay2", spectral(0.3));
    match Driver::from_varmap(&vm, two, 0.1) {
        Err(steepest::Error::Config { what, .. }) => {
            assert!(
                what.contains("`decay2` and `decay` are both spectral"),
                "{what}"
            );
        }
        r => panic!("{:?}", r.err()),
    }
    let mixed = |second: Decay| {
        Chain::new()
            .then(spectral(0.5))
            .then_named("decay2", second)
    };
    let decoupled = Decay {
        decay: WeightDecay::Decoupled(0.3),
        vectors: false,
    };
    let mut d = Driver::from_varmap(&vm, mixed(decoupled), 0.1).unwrap();
    // Together they step W ← (1 − ηλ_d)·W − ηλ_s·σ₁u₁v₁ᵀ − η·g (the rank-1
    // term of W before the step; f64 SVD), on a matrix with a spectral gap
    // (the cold start's 10 power iterations then find v₁ to f32 precision).
    let mut r = common::rng(9);
    let a = common::with_singular_values(&mut r, 8, 5, &[3.0, 1.0, 0.5, 0.3, 0.1]);
    let w = vm.data().lock().unwrap()["w"].clone();
    w.set(&common::from_dmatrix(&a, DType::F32)).unwrap();
    let a = common::to_dmatrix(w.as_tensor());
    let g = common::with_singular_values(&mut r, 8, 5, &[1.0, 0.9, 0.8, 0.7, 0.6]);
    d.step_subset(&[(0, common::from_dmatrix(&g, DType::F32))])
        .unwrap();
    let svd = a.clone().svd(true, true);
    let k = svd.singular_values.imax();
    let top = svd.u.unwrap().column(k) * svd.v_t.unwrap().row(k) * svd.singular_values[k];
    let want = &a * (1.0 - 0.1 * 0.3) - top * (0.1 * 0.5) - &g * 0.1;
    let err = (common::to_dmatrix(w.as_tensor()) - &want).abs().max();
    assert!(err < 1e-5, "spectral + decoupled decay: off by {err:e}");
    let both = Driver::from_varmap(&VarMap::new(), mixed(spectral(0.0)), 0.1).err();
    assert!(both.is_some(), "built with two spectral decays");
    // A checkpoint of the same chain with `decay2` spectral: written by
    // hand from a valid one, since no valid optimizer holds it.
    let before = d.state_dict().unwrap();
    let st = common::with_header(&before, |h| {
        let decay2 = &mut h["body"]["partitions"][0]["transforms"][1];
        assert_eq!(decay2["name"], "decay2");
        decay2["hparams"]["decay"] = serde_json::json!({"Spectral": {"lambda": 0.3, "iters": 1}});
    });
    let e = d.load_state_dict(&st).unwrap_err();
    assert!(e.to_string().contains("both spectral"), "{e}");
    let after = d.state_dict().unwrap();
    assert_eq!(before.len(), after.len());
    for (k, t) in &before {
        assert_eq!(
            common::to_f64_vec(t),
            common::to_f64_vec(&after[k]),
            "{k} changed"
        );
    }
}
