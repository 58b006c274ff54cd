//! Optimizer behaviour: bad input (NaN/Inf, wrong shapes, bad configs) changes
//! nothing; missing gradients; 1×n / n×1 / rank-3 / scalar / half parameters;
//! Muon's routing, batching and learning-rate coupling.

mod support;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Optimizer, VarMap};
use steepest::optim::{
    AdamW, AdamWConfig, LrAdjust, Muon, MuonConfig, NamedVar, OptimizerState, Sgd, SgdConfig,
};
use steepest::{NewtonSchulz, WeightDecay};
use support::*;

type StepFn = SharedStep<Tensor>;
type StateFn = Box<dyn Fn() -> std::collections::HashMap<String, Tensor>>;

/// The three optimizers (spectral decay on) over `vm`.
fn optimizers(vm: &VarMap) -> Vec<(&'static str, Box<dyn Stepper>)> {
    vec![
        ("adamw", Box::new(spectral_adamw(vm))),
        (
            "sgd",
            Box::new(
                Sgd::from_varmap(
                    vm,
                    SgdConfig {
                        momentum: 0.9,
                        weight_decay: WeightDecay::spectral(0.1),
                        ..Default::default()
                    },
                )
                .unwrap(),
            ),
        ),
        ("muon", Box::new(spectral_muon(vm))),
    ]
}

/// [`optimizers`] as a name, a step function (from a loss) and a
/// state-dict function sharing one optimizer each.
fn all_optimizers(vm: &VarMap) -> Vec<(&'static str, StepFn, StateFn)> {
    shared(vm, |o, l: &Tensor| o.step_loss(l))
}

/// Each of [`optimizers`] as a name, `step` (`s` on the optimizer) and a
/// state-dict function, sharing one optimizer.
fn shared<A: ?Sized + 'static>(
    vm: &VarMap,
    s: fn(&mut dyn Stepper, &A) -> candle_core::Result<()>,
) -> Vec<(&'static str, SharedStep<A>, StateFn)> {
    use std::cell::RefCell;
    use std::rc::Rc;
    optimizers(vm)
        .into_iter()
        .map(|(name, o)| {
            let o = Rc::new(RefCell::new(o));
            let o2 = o.clone();
            let step: SharedStep<A> = Box::new(move |a: &A| s(&mut **o.borrow_mut(), a));
            let state: StateFn = Box::new(move || o2.borrow().state());
            (name, step, state)
        })
        .collect()
}

type SharedStep<A> = Box<dyn FnMut(&A) -> candle_core::Result<()>>;

/// `Σ_p loss + Σ w⊙g_bad` for one parameter: its gradient picks up `bad`.
fn poisoned_loss(vm: &VarMap, name: &str, bad: f32) -> Tensor {
    let v = var(vm, name);
    let mut g = vec![0.5f32; v.elem_count()];
    g[v.elem_count() / 2] = bad;
    let g = Tensor::from_vec(g, v.shape(), &Device::Cpu)
        .unwrap()
        .to_dtype(v.dtype())
        .unwrap();
    (loss(vm, 9, &[])
        + (v.as_tensor() * g)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap())
    .unwrap()
}

#[test]
fn nan_or_inf_gradient_is_an_error_naming_the_parameter_and_changes_nothing() {
    for dtype in [DType::F32, DType::BF16] {
        let vm = model(dtype);
        for (name, mut step, state) in all_optimizers(&vm) {
            for t in 0..2 {
                step(&loss(&vm, t, &[])).unwrap();
            }
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let params = snapshot(&vm);
                let st = state_snapshot(&state());
                let err = step(&poisoned_loss(&vm, "fc2.weight", bad))
                    .unwrap_err()
                    .to_string();
                assert!(
                    err.contains("fc2.weight") && err.contains("NaN or Inf"),
                    "{name}: {err}"
                );
                assert_eq!(
                    snapshot(&vm),
                    params,
                    "{name}: parameters changed by a failed step"
                );
                assert_eq!(
                    state_snapshot(&state()),
                    st,
                    "{name}: state changed by a failed step"
                );
            }
            // Training goes on normally afterwards.
            step(&loss(&vm, 3, &[])).unwrap();
        }
    }
}

#[test]
fn missing_gradients_skip_the_parameter() {
    let vm = model(DType::F32);
    for (name, mut step, state) in all_optimizers(&vm) {
        let before = snapshot(&vm);
        step(&loss(&vm, 0, &["fc1.weight", "gain"])).unwrap();
        let after = snapshot(&vm);
        assert_eq!(after["fc1.weight"], before["fc1.weight"], "{name}");
        assert_eq!(after["gain"], before["gain"], "{name}");
        assert_ne!(after["fc2.weight"], before["fc2.weight"], "{name}");
        assert!(
            state()
                .keys()
                .all(|k| !k.starts_with("fc1.weight.") && !k.starts_with("gain.")),
            "{name}"
        );
    }
}

/// `Driver::never_stepped` lists the parameters no gradient has reached in
/// a successful step: all before the first step, those left out of the loss
/// after it; a refused step marks nothing.
#[test]
fn never_stepped_lists_the_parameters_no_gradient_reached() {
    use std::collections::BTreeSet;
    let vm = model(DType::F32);
    let mut opt = Muon::from_varmap(&vm, MuonConfig::default()).unwrap();
    let names = |o: &Muon| -> BTreeSet<String> {
        o.driver()
            .never_stepped()
            .into_iter()
            .map(String::from)
            .collect()
    };
    let all: BTreeSet<String> = PARAMS.iter().map(|(n, _)| n.to_string()).collect();
    assert_eq!(names(&opt), all);
    opt.backward_step(&loss(&vm, 0, &["fc1.weight", "gain"]))
        .unwrap();
    let left: BTreeSet<String> = ["fc1.weight", "gain"].map(String::from).into();
    assert_eq!(names(&opt), left);
    // A refused step (NaN in another parameter) marks nothing.
    assert!(opt
        .step(&grads_with(&vm, &PARAMS, 1, "fc2.weight", f64::NAN))
        .is_err());
    assert_eq!(names(&opt), left);
    opt.backward_step(&loss(&vm, 2, &[])).unwrap();
    assert!(names(&opt).is_empty());
}

/// Why `never_stepped` exists: candle-nn 0.11's `LayerNorm` forward runs a
/// fused op without a backward pass (`apply_op3_no_bwd`) on a contiguous
/// input, so no gradient reaches its weight, its bias, or anything before
/// it — silently. (If candle adds the backward pass, this test fails: then
/// update the README's note.)
#[test]
fn candle_layer_norm_blocks_gradients_and_never_stepped_shows_it() {
    use candle_core::Module;
    let vm = VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    let fc = candle_nn::linear(4, 8, vb.pp("fc")).unwrap();
    let ln = candle_nn::layer_norm(8, 1e-5, vb.pp("ln")).unwrap();
    let head = candle_nn::linear(8, 2, vb.pp("head")).unwrap();
    let mut opt = AdamW::from_varmap(&vm, AdamWConfig::default()).unwrap();
    let x = Tensor::ones((3, 4), DType::F32, &Device::Cpu).unwrap();
    let y = head
        .forward(&ln.forward(&fc.forward(&x).unwrap()).unwrap())
        .unwrap();
    opt.backward_step(&y.sqr().unwrap().mean_all().unwrap())
        .unwrap();
    let mut left = opt.driver().never_stepped();
    left.sort();
    assert_eq!(left, ["fc.bias", "fc.weight", "ln.bias", "ln.weight"]);
}

#[test]
fn gradient_of_the_wrong_shape_is_an_error() {
    let vm = model(DType::F32);
    let mut opt = AdamW::from_varmap(&vm, AdamWConfig::default()).unwrap();
    let v = var(&vm, "fc1.weight");
    let mut grads = loss(&vm, 0, &[]).backward().unwrap();
    grads.insert(
        v.as_tensor(),
        Tensor::zeros((4, 6), DType::F32, &Device::Cpu).unwrap(),
    );
    let before = snapshot(&vm);
    let err = opt.step(&grads).unwrap_err().to_string();
    assert!(err.contains("fc1.weight") && err.contains("shape"), "{err}");
    assert_eq!(snapshot(&vm), before);
}

#[test]
fn every_shape_and_half_dtypes_train() {
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        let vm = model(dtype);
        for (name, mut step, _) in all_optimizers(&vm) {
            let l0 = loss(&vm, 0, &[]).to_scalar::<f32>().unwrap();
            for _ in 0..30 {
                step(&loss(&vm, 0, &[])).unwrap();
            }
            let l1 = loss(&vm, 0, &[]).to_scalar::<f32>().unwrap();
            assert!(
                l1.is_finite() && l1 < l0,
                "{name} {dtype:?}: loss {l0} → {l1}"
            );
            for (p, shape) in PARAMS {
                let v = var(&vm, p);
                assert_eq!((v.dtype(), v.dims()), (dtype, shape), "{name}: {p}");
            }
        }
    }
}

#[test]
fn muon_on_a_row_vector_matrix_steps_along_the_normalised_gradient() {
    // msign of a 1×n matrix is g/‖g‖ (its only singular value maps to p(1) = 1
    // for a convergent table).
    for shape in [(1usize, 6usize), (6, 1)] {
        let w0 = Tensor::from_vec(values(5, 6), shape, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let g = Tensor::from_vec(values(6, 6), shape, &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let var = Var::from_tensor(&w0).unwrap();
        let cfg = MuonConfig {
            lr: 0.1,
            momentum: 0.0,
            nesterov: false,
            newton_schulz: NewtonSchulz::cubic(30),
            weight_decay: WeightDecay::None,
            ..Default::default()
        };
        let mut opt = Muon::from_named(
            vec![NamedVar {
                name: "w".into(),
                var: var.clone(),
            }],
            cfg,
        )
        .unwrap();
        opt.backward_step(&(var.as_tensor() * &g).unwrap().sum_all().unwrap())
            .unwrap();
        let norm = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .sqrt()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let adj = (shape.0 as f64 / shape.1 as f64).max(1.0).sqrt();
        let want = (&w0 - (&g * (0.1 * adj / norm)).unwrap()).unwrap();
        let diff = (var.as_tensor() - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert!(diff < 1e-9, "{shape:?}: {diff}");
    }
}

#[test]
fn muon_treats_a_rank3_tensor_as_its_matrix_view() {
    let data = values(7, 24);
    let grad = values(8, 24);
    let run = |shape: &[usize]| {
        let var = Var::from_tensor(&Tensor::from_vec(data.clone(), shape, &Device::Cpu).unwrap())
            .unwrap();
        let g = Tensor::from_vec(
            grad.iter().map(|x| *x as f32).collect::<Vec<_>>(),
            shape,
            &Device::Cpu,
        )
        .unwrap();
        let mut opt = Muon::from_named(
            vec![NamedVar {
                name: "w".into(),
                var: var.clone(),
            }],
            MuonConfig {
                lr: 0.1,
                ..Default::default()
            },
        )
        .unwrap();
        for _ in 0..2 {
            opt.backward_step(
                &(var.as_tensor().to_dtype(DType::F32).unwrap() * &g)
                    .unwrap()
                    .sum_all()
                    .unwrap(),
            )
            .unwrap();
        }
        assert_eq!(opt.muon_params(), vec!["w"]);
        var.as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f64>()
            .unwrap()
    };
    assert_eq!(run(&[4, 2, 3]), run(&[4, 6]));
}

#[test]
fn muon_routes_vectors_scalars_and_named_parameters_to_adamw() {
    let vm = model(DType::F32);
    let opt = Muon::from_varmap(
        &vm,
        MuonConfig {
            adamw_names: vec!["embed".into()],
            ..Default::default()
        },
    )
    .unwrap();
    let mut muon = opt.muon_params();
    muon.sort();
    assert_eq!(
        muon,
        vec![
            "col.weight",
            "conv.weight",
            "fc1.weight",
            "fc2.weight",
            "row.weight",
            "wide.weight"
        ]
    );
}

#[test]
fn muon_batches_same_shape_matrices_without_changing_results() {
    // fc1.weight and fc2.weight share a shape: one msign call. Each alone must match.
    let together = {
        let vm = model(DType::F32);
        let mut opt = Muon::from_varmap(&vm, MuonConfig::default()).unwrap();
        for t in 0..3 {
            opt.backward_step(&loss(&vm, t, &[])).unwrap();
        }
        snapshot(&vm)
    };
    for name in ["fc1.weight", "fc2.weight"] {
        let vm = model(DType::F32);
        let v = var(&vm, name);
        let mut opt = Muon::from_named(
            vec![NamedVar {
                name: name.into(),
                var: v,
            }],
            MuonConfig::default(),
        )
        .unwrap();
        for t in 0..3 {
            opt.backward_step(&loss(&vm, t, &[])).unwrap();
        }
        let alone = snapshot(&vm);
        let err = together[name]
            .iter()
            .zip(&alone[name])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(err < 1e-6, "{name}: batched vs alone differ by {err}");
    }
}

#[test]
fn muon_learning_rate_drives_the_adamw_group_proportionally() {
    let vm = model(DType::F32);
    let cfg = MuonConfig {
        lr: 0.02,
        adamw: AdamWConfig {
            lr: 0.004,
            ..Default::default()
        },
        ..Default::default()
    };
    let mut opt = Muon::from_varmap(&vm, cfg).unwrap();
    opt.set_learning_rate(0.01);
    assert_eq!(opt.learning_rate(), 0.01);
    assert!((opt.config().adamw.lr - 0.002).abs() < 1e-15);
}

#[test]
fn bad_configs_name_the_field() {
    let vm = model(DType::F32);
    let cases: Vec<(steepest::Error, &str)> = vec![
        (
            AdamW::from_varmap(
                &vm,
                AdamWConfig {
                    lr: -1.0,
                    ..Default::default()
                },
            )
            .unwrap_err(),
            "AdamWConfig.lr",
        ),
        (
            AdamW::from_varmap(
                &vm,
                AdamWConfig {
                    beta1: 1.0,
                    ..Default::default()
                },
            )
            .unwrap_err(),
            "AdamWConfig.beta1",
        ),
        (
            AdamW::from_varmap(
                &vm,
                AdamWConfig {
                    eps: 0.0,
                    ..Default::default()
                },
            )
            .unwrap_err(),
            "AdamWConfig.eps",
        ),
        (
            AdamW::from_varmap(
                &vm,
                AdamWConfig {
                    weight_decay: WeightDecay::Decoupled(-0.1),
                    ..Default::default()
                },
            )
            .unwrap_err(),
            "AdamWConfig.weight_decay",
        ),
        (
            Sgd::from_varmap(
                &vm,
                SgdConfig {
                    nesterov: true,
                    ..Default::default()
                },
            )
            .unwrap_err(),
            "SgdConfig.nesterov",
        ),
        (
            Sgd::from_varmap(
                &vm,
                SgdConfig {
                    lr: f64::NAN,
                    ..Default::default()
                },
            )
            .unwrap_err(),
            "SgdConfig.lr",
        ),
        (
            Muon::from_varmap(
                &vm,
                MuonConfig {
                    momentum: 1.5,
                    ..Default::default()
                },
            )
            .unwrap_err(),
            "MuonConfig.momentum",
        ),
        (
            Muon::from_varmap(
                &vm,
                MuonConfig {
                    weight_decay: WeightDecay::spectral(f64::INFINITY),
                    ..Default::default()
                },
            )
            .unwrap_err(),
            "MuonConfig.weight_decay",
        ),
        (
            // k = 0 would zero every matrix's step.
            Muon::from_varmap(
                &vm,
                MuonConfig {
                    lr_adjust: LrAdjust::MatchAdamWRms(0.0),
                    ..Default::default()
                },
            )
            .unwrap_err(),
            "MuonConfig.lr_adjust",
        ),
    ];
    for (err, field) in cases {
        assert!(
            err.to_string().contains(field),
            "`{err}` should name {field}"
        );
    }
    let v = Var::new(&[1f32, 2.0], &Device::Cpu).unwrap();
    let dup = vec![
        NamedVar {
            name: "x".into(),
            var: v.clone(),
        },
        NamedVar {
            name: "x".into(),
            var: v,
        },
    ];
    let err = AdamW::from_named(dup, AdamWConfig::default())
        .unwrap_err()
        .to_string();
    assert!(err.contains("x") && err.contains("share"), "{err}");
}

#[test]
fn plain_candle_optimizer_api_works() {
    // Optimizer::new takes bare Vars (named param.0, param.1, …), non-float ones dropped.
    let w = Var::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu).unwrap();
    let idx = Var::new(&[1u32, 2], &Device::Cpu).unwrap();
    let mut opt = Muon::new(
        vec![w.clone(), idx],
        MuonConfig {
            lr: 0.1,
            ..Default::default()
        },
    )
    .unwrap();
    opt.backward_step(&w.as_tensor().sqr().unwrap().sum_all().unwrap())
        .unwrap();
    let keys: Vec<String> = opt
        .state_dict()
        .unwrap()
        .into_keys()
        .filter(|k| !k.starts_with("__"))
        .collect();
    assert_eq!(keys, vec!["param.0.momentum.buf".to_string()]);
}

type GradStepFn = SharedStep<candle_core::backprop::GradStore>;

/// [`optimizers`], stepped with a given `GradStore` (the route of hand-made
/// gradients).
fn grad_optimizers(vm: &VarMap) -> Vec<(&'static str, GradStepFn, StateFn)> {
    shared(vm, |o, g: &candle_core::backprop::GradStore| {
        o.step_grads(g)
    })
}

/// An empty `GradStore` to fill by hand (candle's constructor is private).
fn empty_grads() -> candle_core::backprop::GradStore {
    Tensor::new(0f32, &Device::Cpu).unwrap().backward().unwrap()
}

/// A hand-made gradient may be a non-contiguous view (here a transpose):
/// the step is the one the same values in contiguous memory give, for every
/// optimizer (it used to fail in the in-place kernels after other groups
/// had already been written).
#[test]
fn a_non_contiguous_gradient_steps_like_its_contiguous_copy() {
    let params: &[(&str, &[usize])] = &[("a.weight", &[4, 4]), ("b.weight", &[8, 6])];
    let grads_of = |vm: &VarMap, contiguous: bool| {
        let mut gs = empty_grads();
        for (i, (name, dims)) in params.iter().enumerate() {
            let (r, c) = (dims[0], dims[1]);
            let vals: Vec<f32> = values(40 + i as u64, r * c)
                .into_iter()
                .map(|x| x as f32)
                .collect();
            // the gradient as the transpose of a (c, r) tensor
            let g = Tensor::from_vec(vals, (c, r), &Device::Cpu)
                .unwrap()
                .t()
                .unwrap();
            assert!(!g.is_contiguous());
            let g = if contiguous {
                g.contiguous().unwrap()
            } else {
                g
            };
            gs.insert(var(vm, name).as_tensor(), g);
        }
        gs
    };
    let (vm_view, vm_copy) = (
        model_of(params, DType::F32, 3),
        model_of(params, DType::F32, 3),
    );
    let runs = grad_optimizers(&vm_view)
        .into_iter()
        .zip(grad_optimizers(&vm_copy));
    for ((name, mut step_view, state_view), (_, mut step_copy, state_copy)) in runs {
        for _ in 0..2 {
            step_view(&grads_of(&vm_view, false)).unwrap_or_else(|e| panic!("{name}: {e}"));
            step_copy(&grads_of(&vm_copy, true)).unwrap();
        }
        assert_eq!(snapshot(&vm_view), snapshot(&vm_copy), "{name}: parameters");
        assert_eq!(
            state_snapshot(&state_view()),
            state_snapshot(&state_copy()),
            "{name}: state"
        );
    }
}

/// Parameters with no elements (`(8, 0)`, `(0,)`, `(0, 4)`) have nothing to
/// update: a step skips them and updates the others exactly as without
/// them; they get no state, and a checkpoint round trip works. (They used to
/// fail every step with an aliasing error naming no parameter, after the
/// other groups had been written.)
#[test]
fn empty_parameters_are_skipped_and_the_rest_steps_normally() {
    let full: &[(&str, &[usize])] = &[
        ("a.weight", &[4, 4]),
        ("empty.weight", &[8, 0]),
        ("empty.bias", &[0]),
        ("flat.weight", &[0, 4]),
        ("b.weight", &[3, 5]),
    ];
    let kept: Vec<(&str, &[usize])> = full
        .iter()
        .copied()
        .filter(|(_, d)| d.iter().product::<usize>() > 0)
        .collect();
    let grads_of = |vm: &VarMap, ps: &[(&str, &[usize])], step: u64| {
        let mut gs = empty_grads();
        for (name, dims) in ps {
            let n = dims.iter().product::<usize>();
            let vals: Vec<f32> = values(1000 * step + name.bytes().map(u64::from).sum::<u64>(), n)
                .into_iter()
                .map(|x| x as f32)
                .collect();
            gs.insert(
                var(vm, name).as_tensor(),
                Tensor::from_vec(vals, *dims, &Device::Cpu).unwrap(),
            );
        }
        gs
    };
    let vm_full = model_of(full, DType::F32, 0);
    let vm_kept = VarMap::new();
    {
        let src = vm_full.data().lock().unwrap();
        let mut dst = vm_kept.data().lock().unwrap();
        for (name, _) in &kept {
            let t = src[*name].as_tensor().copy().unwrap();
            dst.insert(name.to_string(), Var::from_tensor(&t).unwrap());
        }
    }
    let runs = grad_optimizers(&vm_full)
        .into_iter()
        .zip(grad_optimizers(&vm_kept));
    for ((name, mut step_full, state_full), (_, mut step_kept, state_kept)) in runs {
        for step in 0..3 {
            step_full(&grads_of(&vm_full, full, step)).unwrap_or_else(|e| panic!("{name}: {e}"));
            step_kept(&grads_of(&vm_kept, &kept, step)).unwrap();
        }
        let (sf, sk) = (snapshot(&vm_full), snapshot(&vm_kept));
        for (k, v) in &sk {
            assert_eq!(&sf[k], v, "{name}: {k}");
        }
        let st = state_full();
        assert!(
            st.keys()
                .all(|k| !k.starts_with("empty.") && !k.starts_with("flat.")),
            "{name}: state for an empty parameter: {:?}",
            st.keys().collect::<Vec<_>>()
        );
        assert_eq!(
            state_snapshot(&st).len(),
            state_snapshot(&state_kept()).len(),
            "{name}: state entries"
        );
    }
    // a checkpoint of the model with empty parameters loads back
    let mut opt = AdamW::from_varmap(&vm_full, AdamWConfig::default()).unwrap();
    opt.step(&grads_of(&vm_full, full, 0)).unwrap();
    let dir = temp_dir("empty-params");
    opt.save_state(dir.join("opt.safetensors")).unwrap();
    let mut back = AdamW::from_varmap(&vm_full, AdamWConfig::default()).unwrap();
    back.load_state(dir.join("opt.safetensors")).unwrap();
    assert_eq!(
        state_snapshot(&back.state_dict().unwrap()),
        state_snapshot(&opt.state_dict().unwrap())
    );
}

/// An optimizer or a weight average made from a `VarMap` before the model
/// exists (a `VarBuilder` creates the variables as the model is built)
/// would hold nothing and silently train nothing: refused, saying so.
#[test]
fn an_empty_varmap_is_refused_saying_to_build_the_model_first() {
    use steepest::averaging::{AverageKind, WeightAverage};
    use steepest::optim::{Partition, Steepest, SteepestConfig};
    let vm = VarMap::new();
    let errors = [
        AdamW::from_varmap(&vm, AdamWConfig::default()).map(|_| ()),
        Sgd::from_varmap(&vm, SgdConfig::default()).map(|_| ()),
        Muon::from_varmap(&vm, MuonConfig::default()).map(|_| ()),
        Steepest::from_varmap(&vm, SteepestConfig::default()).map(|_| ()),
        Partition::by(|_| "all")
            .group("all", AdamWConfig::default().chain(), 1e-3)
            .build_from_varmap(&vm)
            .map(|_| ()),
        WeightAverage::from_varmap(&vm, AverageKind::Ema { decay: 0.9 }).map(|_| ()),
        WeightAverage::from_named(Vec::new(), AverageKind::Ema { decay: 0.9 }).map(|_| ()),
    ];
    for (i, r) in errors.into_iter().enumerate() {
        let e = r.expect_err(&format!("case {i}")).to_string();
        assert!(
            e.contains("build the model first") || e.contains("after the model"),
            "case {i}: {e}"
        );
    }
}

/// `step_subset` with two gradients for one parameter is refused (a shape
/// error naming it) and changes nothing: the driver's step 1 (shapes).
#[test]
fn two_gradients_for_one_parameter_are_refused_and_change_nothing() {
    let vm = model(DType::F32);
    let mut d =
        steepest::optim::Driver::from_varmap(&vm, AdamWConfig::default().chain(), 1e-3).unwrap();
    let p = d
        .params()
        .iter()
        .position(|nv| nv.name == "fc1.weight")
        .unwrap();
    let g = Tensor::ones(d.params()[p].var.dims(), DType::F32, &Device::Cpu).unwrap();
    let before = snapshot(&vm);
    let err = d
        .step_subset(&[(p, g.clone()), (p, g)])
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("fc1.weight") && err.contains("two gradients"),
        "{err}"
    );
    assert_eq!(snapshot(&vm), before);
    assert_eq!(d.never_stepped().len(), d.params().len());
}

/// SGD's classic momentum (`torch.optim.SGD`) for any `μ > 0`, also a small
/// one: `buf₁ = g`, `buf₂ = μ·buf₁ + g`, `w ← w − η·buf`, so two steps with
/// a constant gradient `g` give `w₂ = w₀ − η(2 + μ)g` (f64, to 1e-15),
/// for `μ ∈ {0.1, 0.3, 0.9}`; `μ = 0` gives `w₀ − 2ηg`.
#[test]
fn sgd_momentum_of_any_size_follows_the_closed_form() {
    let (eta, w0, g) = (0.1, [1.0, -2.0, 0.5], [0.3, 0.7, -1.1]);
    for mu in [0.0, 0.1, 0.3, 0.9] {
        let var = Var::from_tensor(&Tensor::new(&w0, &Device::Cpu).unwrap()).unwrap();
        let mut opt = Sgd::from_named(
            vec![NamedVar {
                name: "w".into(),
                var: var.clone(),
            }],
            SgdConfig {
                lr: eta,
                momentum: mu,
                ..Default::default()
            },
        )
        .unwrap();
        let gt = Tensor::new(&g, &Device::Cpu).unwrap();
        for _ in 0..2 {
            opt.step_subset(&[(0, gt.clone())]).unwrap();
        }
        let got = var.as_tensor().to_vec1::<f64>().unwrap();
        for ((a, w), g) in got.iter().zip(&w0).zip(&g) {
            let want = w - eta * (2.0 + mu) * g;
            assert!((a - want).abs() < 1e-15, "μ = {mu}: {a} vs {want}");
        }
    }
}

/// A gradient of an integer dtype (a hand-made `GradStore`) is refused
/// naming the parameter, changing nothing; one of another float dtype (f16
/// for an f32 weight) is converted and stepped with, as documented.
#[test]
fn an_integer_gradient_is_refused_and_a_float_one_converted() {
    let vm = model(DType::F32);
    let mut opt = AdamW::from_varmap(&vm, AdamWConfig::default()).unwrap();
    let w = var(&vm, "fc1.weight");
    let mut grads = loss(&vm, 0, &[]).backward().unwrap();
    let g = grads.get(w.as_tensor()).unwrap().clone();
    grads.insert(
        w.as_tensor(),
        g.ones_like().unwrap().to_dtype(DType::U32).unwrap(),
    );
    let before = snapshot(&vm);
    let e = opt.try_step(&grads).unwrap_err();
    assert!(
        matches!(&e, steepest::Error::Shape { who, what }
            if who == "fc1.weight" && what.contains("U32")),
        "{e:?}"
    );
    assert_eq!(snapshot(&vm), before);
    assert!(opt.driver().never_stepped().contains(&"fc1.weight"));
    grads.insert(w.as_tensor(), g.to_dtype(DType::F16).unwrap());
    opt.try_step(&grads).unwrap();
    assert_ne!(snapshot(&vm)["fc1.weight"], before["fc1.weight"]);
}
