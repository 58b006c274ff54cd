//! f32 master weights for bf16/f16 parameters (`with_master_weights`): the
//! bf16 parameter follows, rounded, the same steps taken in f32, bit for bit;
//! an update below half a bf16 unit is kept (and lost without); a parameter
//! changed outside the optimizer is not overwritten; a refused step changes
//! neither parameter nor master; checkpoints carry the masters; data-parallel
//! ranks agree with one process.

mod common;
mod support;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Optimizer, VarMap};
use common::max_abs_diff;
use steepest::distributed::{ShardedOptimizer, ShardedStep};
use steepest::optim::{
    AdamW, AdamWConfig, Driver, Manifold, Muon, MuonConfig, NamedVar, OptimizerState, Steepest,
    SteepestConfig,
};
use steepest::WeightDecay;
use support::*;

/// `vm`'s variables converted to `dtype` (same names, new variables with
/// their own storage).
fn converted(vm: &VarMap, dtype: DType) -> VarMap {
    let out = VarMap::new();
    {
        let mut data = out.data().lock().unwrap();
        for (k, v) in vm.data().lock().unwrap().iter() {
            // (a copy: to_dtype to the same dtype shares the storage)
            let t = v.as_tensor().to_dtype(dtype).unwrap().copy().unwrap();
            data.insert(k.clone(), Var::from_tensor(&t).unwrap());
        }
    }
    out
}

/// The gradient of parameter `i` (shape `dims`) at `step`: f32 values that
/// bf16 holds exactly (so a bf16 gradient and an f32 one are the same).
fn grad(step: usize, i: usize, dims: &[usize], scale: f64) -> Tensor {
    let n = dims.iter().product();
    Tensor::from_vec(values(7919 * step as u64 + i as u64, n), dims, &Device::Cpu)
        .unwrap()
        .affine(scale, 0.0)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
}

fn grads_for(vars: &[NamedVar], step: usize, scale: f64) -> Vec<(usize, Tensor)> {
    vars.iter()
        .enumerate()
        .map(|(i, v)| (i, grad(step, i, v.var.dims(), scale)))
        .collect()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

fn muon_config() -> MuonConfig {
    MuonConfig {
        lr: 0.02,
        weight_decay: WeightDecay::spectral(0.1),
        adamw: AdamWConfig {
            lr: 3e-3,
            ..Default::default()
        },
        adamw_names: vec!["embed".into()],
        ..Default::default()
    }
}

fn adamw_config(lr: f64) -> AdamWConfig {
    AdamWConfig {
        lr,
        weight_decay: WeightDecay::spectral(0.05),
        decay_vectors: true,
        ..Default::default()
    }
}

/// Every parameter of `low` (bf16/f16) equals its master rounded, and its
/// master equals the f32 reference bit for bit.
fn assert_follows(opt_low: &Driver, reference: &Driver) {
    for (v, r) in opt_low.params().iter().zip(reference.params()) {
        let master = opt_low
            .master_weight(&v.name)
            .unwrap_or_else(|| panic!("{}: no master weight after a step", v.name));
        assert_eq!(bits(master), bits(r.var.as_tensor()), "{}: master", v.name);
        let rounded = r.var.as_tensor().to_dtype(v.var.dtype()).unwrap();
        assert_eq!(
            bits(v.var.as_tensor()),
            bits(&rounded),
            "{}: parameter",
            v.name
        );
    }
}

/// Steps `low` (with master weights) and `high` (f32, the same values)
/// with the same gradients, checking after every step that `low` follows.
fn run_pair<O: ShardedOptimizer>(mut low: O, mut high: O, steps: usize, scale: f64) {
    for step in 0..steps {
        low.step_subset(&grads_for(low.driver().params(), step, scale))
            .unwrap();
        high.step_subset(&grads_for(high.driver().params(), step, scale))
            .unwrap();
        assert_follows(low.driver(), high.driver());
    }
}

/// Muon (spectral decay; AdamW for the embedding, the vectors and the
/// scalar) and AdamW over bf16 and f16 parameters of every rank: with master
/// weights, the masters are the f32 run's parameters bit for bit and the
/// parameters their rounding, step after step.
#[test]
fn master_weights_follow_the_f32_run_bit_for_bit() {
    for dtype in [DType::BF16, DType::F16] {
        let low = converted(&model(DType::F32), dtype);
        let high = converted(&low, DType::F32);
        run_pair(
            Muon::from_varmap(&low, muon_config())
                .unwrap()
                .with_master_weights(),
            Muon::from_varmap(&high, muon_config()).unwrap(),
            6,
            0.5,
        );
        adamw_follows(dtype, 6);
    }
}

/// AdamW over the model in `dtype` with master weights follows the f32 run
/// for `steps` steps ([`run_pair`]).
fn adamw_follows(dtype: DType, steps: usize) {
    let low = converted(&model(DType::F32), dtype);
    let high = converted(&low, DType::F32);
    run_pair(
        AdamW::from_varmap(&low, adamw_config(1e-3))
            .unwrap()
            .with_master_weights(),
        AdamW::from_varmap(&high, adamw_config(1e-3)).unwrap(),
        steps,
        0.5,
    );
}

/// bf16 weights near 1 (8 significant bits: a unit in the last place is
/// 2⁻⁷) trained by AdamW at `lr = 1e-4` through candle's autograd: without
/// master weights every update is rounded away and the weights never move;
/// with them the weights move as the f32 run's do (rounded).
#[test]
fn updates_below_half_a_bf16_unit_are_kept_only_with_master_weights() {
    let init: Vec<f32> = values(3, 24)
        .into_iter()
        .map(|x| half::bf16::from_f64(1.0 + 0.25 * x).to_f32())
        .collect();
    // Far below the weights: the gradients 2(w − t) keep their sign, which
    // the rounding of a bf16 weight cannot flip.
    let target = Tensor::from_vec(values(4, 24), (4, 6), &Device::Cpu)
        .unwrap()
        .affine(0.25, -1.0)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let cfg = AdamWConfig {
        lr: 1e-4,
        weight_decay: WeightDecay::None,
        ..Default::default()
    };
    let make = |dtype: DType| {
        let t = Tensor::from_vec(init.clone(), (4, 6), &Device::Cpu)
            .unwrap()
            .to_dtype(dtype)
            .unwrap();
        let vm = VarMap::new();
        vm.data()
            .lock()
            .unwrap()
            .insert("w".into(), Var::from_tensor(&t).unwrap());
        vm
    };
    let train = |vm: &VarMap, opt: &mut AdamW| {
        for _ in 0..40 {
            let w = var(vm, "w").as_tensor().to_dtype(DType::F32).unwrap();
            let loss = (w - &target).unwrap().sqr().unwrap().sum_all().unwrap();
            opt.step(&loss.backward().unwrap()).unwrap();
        }
    };
    let (plain, master, exact) = (make(DType::BF16), make(DType::BF16), make(DType::F32));
    let start = bits(var(&plain, "w").as_tensor());
    train(
        &plain,
        &mut AdamW::from_varmap(&plain, cfg.clone()).unwrap(),
    );
    let mut with = AdamW::from_varmap(&master, cfg.clone())
        .unwrap()
        .with_master_weights();
    train(&master, &mut with);
    train(&exact, &mut AdamW::from_varmap(&exact, cfg).unwrap());
    assert_eq!(
        bits(var(&plain, "w").as_tensor()),
        start,
        "bf16 without master weights: 40 steps of 1e-4 should all round away"
    );
    let moved = bits(var(&master, "w").as_tensor())
        .iter()
        .zip(&start)
        .filter(|(a, b)| a != b)
        .count();
    assert!(moved > 12, "only {moved} of 24 bf16 weights moved");
    // The gradients differ from the f32 run's (they are taken at the bf16
    // weights), so compare the movement, not the bits: within a bf16 unit.
    let got = var(&master, "w").as_tensor().to_dtype(DType::F32).unwrap();
    let want = var(&exact, "w").as_tensor().clone();
    let diff = max_abs_diff(&got, &want);
    assert!(diff <= 2f64.powi(-7), "bf16 with master vs f32: {diff}");
    let master_w = with.driver().master_weight("w").unwrap();
    assert!(max_abs_diff(master_w, &want) < 1e-5);
}

/// A parameter set outside the optimizer (here between two steps) is not
/// overwritten by its stale master: the master is re-made from it, and the
/// run goes on as the f32 run does when its parameter is set alike.
#[test]
fn a_parameter_changed_outside_the_optimizer_wins_over_its_master() {
    parameter_changed_outside();
}

/// The same two checks on candle's generic ops (the path of Metal, and of
/// CUDA for the master's check and rounding): the masters' check and
/// rounding by candle's comparison and conversion.
#[test]
fn the_generic_path_keeps_masters_alike() {
    steepest::device::with_generic_ops(|| {
        adamw_follows(DType::BF16, 4);
        parameter_changed_outside();
    });
}

fn parameter_changed_outside() {
    let low = converted(&model(DType::F32), DType::BF16);
    let high = converted(&low, DType::F32);
    let mut a = Muon::from_varmap(&low, muon_config())
        .unwrap()
        .with_master_weights();
    let mut b = Muon::from_varmap(&high, muon_config()).unwrap();
    for step in 0..3 {
        a.step_subset(&grads_for(a.vars(), step, 0.5)).unwrap();
        b.step_subset(&grads_for(b.vars(), step, 0.5)).unwrap();
    }
    let edit = Tensor::from_vec(values(99, 24), (6, 4), &Device::Cpu)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    var(&low, "fc1.weight").set(&edit).unwrap();
    var(&high, "fc1.weight")
        .set(&edit.to_dtype(DType::F32).unwrap())
        .unwrap();
    for step in 3..6 {
        a.step_subset(&grads_for(a.vars(), step, 0.5)).unwrap();
        b.step_subset(&grads_for(b.vars(), step, 0.5)).unwrap();
        assert_follows(a.driver(), b.driver());
    }
}

/// The parameters, and the masters by name.
fn params_and_masters(d: &Driver) -> (Vec<Vec<u32>>, Vec<Option<Vec<u32>>>) {
    (
        d.params().iter().map(|v| bits(v.var.as_tensor())).collect(),
        d.params()
            .iter()
            .map(|v| d.master_weight(&v.name).map(bits))
            .collect(),
    )
}

/// A step refused for a NaN gradient, and one refused by a retraction on the
/// Stiefel manifold (a fallible chain, run under an undo copy), changes
/// neither the bf16 parameters nor their masters nor the state.
#[test]
fn a_refused_step_changes_neither_parameters_nor_masters() {
    let low = converted(&model(DType::F32), DType::BF16);
    let mut opt = Muon::from_varmap(&low, muon_config())
        .unwrap()
        .with_master_weights();
    for step in 0..2 {
        opt.step_subset(&grads_for(opt.vars(), step, 0.5)).unwrap();
    }
    let before = params_and_masters(opt.driver());
    let state = state_snapshot(&opt.state_dict().unwrap());
    let mut grads = grads_for(opt.vars(), 2, 0.5);
    let last = grads.len() - 1;
    grads[last].1 = (grads[last].1.ones_like().unwrap() * f64::NAN).unwrap();
    let e = opt.step_subset(&grads).unwrap_err();
    assert!(
        matches!(e, steepest::Error::NonFiniteGradient { .. }),
        "{e}"
    );
    assert_eq!(params_and_masters(opt.driver()), before);
    assert_eq!(state_snapshot(&opt.state_dict().unwrap()), state);

    // Stiefel: the second matrix zero; a zero gradient for it (its first)
    // leaves its retraction no answer, after the first's ran.
    let (mut st, vars) = stiefel_pair(DType::BF16, 20, true);
    let mut grads = grads_for(&vars, 0, 0.5);
    st.step_subset(&grads[..1]).unwrap();
    let before = params_and_masters(st.driver());
    let state = state_snapshot(&st.state_dict().unwrap());
    grads[1].1 = grads[1].1.zeros_like().unwrap();
    st.step_subset(&grads)
        .expect_err("a zero gradient's Stiefel retraction is refused");
    assert_eq!(params_and_masters(st.driver()), before);
    assert_eq!(state_snapshot(&st.state_dict().unwrap()), state);
}

/// Checkpoints: the masters are saved as `<param>.master_weight` and a
/// resume is bit-identical; a checkpoint with masters is refused by an
/// optimizer without them, and one without by none (its masters are made
/// from the parameters); a master of the wrong shape or dtype, or for an
/// f32 parameter, is refused naming its key, and changes nothing.
#[test]
fn checkpoints_carry_the_master_weights() {
    let run = |steps: std::ops::Range<usize>, opt: &mut Muon| {
        for step in steps {
            opt.step_subset(&grads_for(opt.vars(), step, 0.5)).unwrap();
        }
    };
    let vm = converted(&model(DType::F32), DType::BF16);
    let mut whole = Muon::from_varmap(&vm, muon_config())
        .unwrap()
        .with_master_weights();
    run(0..3, &mut whole);
    let saved = whole.state_dict().unwrap();
    let saved_params = converted(&vm, DType::BF16);
    let n = whole.vars().len();
    let masters = saved
        .keys()
        .filter(|k| k.ends_with(".master_weight"))
        .count();
    assert_eq!(masters, n, "one master per bf16 parameter");
    run(3..6, &mut whole);

    // Resume in a new optimizer over the saved parameters.
    let mut resumed = Muon::from_varmap(&saved_params, muon_config())
        .unwrap()
        .with_master_weights();
    resumed.load_state_dict(&saved).unwrap();
    run(3..6, &mut resumed);
    assert_eq!(
        params_and_masters(resumed.driver()),
        params_and_masters(whole.driver())
    );

    // Into an optimizer without master weights: refused, nothing loaded.
    let mut plain = Muon::from_varmap(&converted(&vm, DType::BF16), muon_config()).unwrap();
    let e = plain.load_state_dict(&saved).unwrap_err();
    assert!(
        e.to_string()
            .contains(".master_weight: an f32 master weight"),
        "{e}"
    );
    assert!(plain.state_dict().unwrap().len() == 1, "only the header");

    // A checkpoint without masters loads; the masters come from the
    // parameters at the next step.
    let mut plain = Muon::from_varmap(&converted(&vm, DType::BF16), muon_config()).unwrap();
    run(0..2, &mut plain);
    let no_masters = plain.state_dict().unwrap();
    let fresh = converted(&vm, DType::BF16);
    let mut with = Muon::from_varmap(&fresh, muon_config())
        .unwrap()
        .with_master_weights();
    with.load_state_dict(&no_masters).unwrap();
    assert!(with.driver().master_weight("fc1.weight").is_none());
    run(2..3, &mut with);
    assert!(with.driver().master_weight("fc1.weight").is_some());

    // Bad master tensors: refused naming the key; the optimizer is as before.
    let before = state_snapshot(&resumed.state_dict().unwrap());
    let key = "fc1.weight.master_weight".to_string();
    let bad_dtype = saved[&key].to_dtype(DType::BF16).unwrap();
    let bad_shape = saved[&key].reshape((4, 6)).unwrap();
    for (bad, what) in [(bad_dtype, "dtype"), (bad_shape, "shape")] {
        let mut s = saved.clone();
        s.insert(key.clone(), bad);
        let e = resumed.load_state_dict(&s).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains(&key) && msg.contains("F32"), "{what}: {msg}");
        assert_eq!(state_snapshot(&resumed.state_dict().unwrap()), before);
    }
    // A master for an f32 parameter.
    let f32_vm = converted(&vm, DType::F32);
    let mut f32_opt = Muon::from_varmap(&f32_vm, muon_config())
        .unwrap()
        .with_master_weights();
    let e = f32_opt.load_state_dict(&saved).unwrap_err();
    assert!(e.to_string().contains("keeps none"), "{e}");
}

/// f32 parameters get no master: `with_master_weights` changes nothing for
/// them, bit for bit, and saves no extra tensor.
#[test]
fn f32_parameters_have_no_master() {
    let a = model(DType::F32);
    let b = converted(&a, DType::F32);
    let mut oa = Muon::from_varmap(&a, muon_config())
        .unwrap()
        .with_master_weights();
    let mut ob = Muon::from_varmap(&b, muon_config()).unwrap();
    for step in 0..3 {
        oa.step_subset(&grads_for(oa.vars(), step, 0.5)).unwrap();
        ob.step_subset(&grads_for(ob.vars(), step, 0.5)).unwrap();
    }
    assert_eq!(snapshot(&a), snapshot(&b));
    assert!(oa.driver().master_weight("fc1.weight").is_none());
    let sa = oa.state_dict().unwrap();
    let sb = ob.state_dict().unwrap();
    let mut ka: Vec<_> = sa.keys().collect();
    let mut kb: Vec<_> = sb.keys().collect();
    ka.sort();
    kb.sort();
    assert_eq!(ka, kb);
}

/// The two-phase step refused by its verdict (as a data-parallel step is
/// when another rank fails) after the fallible groups ran, at the first
/// step: the masters made for it are dropped again, the parameters and the
/// state are as before.
#[test]
fn a_step_refused_by_its_verdict_leaves_no_master_behind() {
    let (mut st, vars) = stiefel_pair(DType::BF16, 30, false);
    let (mut untouched, _) = stiefel_pair(DType::BF16, 30, false);
    let before = params_and_masters(st.driver());
    assert_eq!(before.1, vec![None, None]);
    let grads = grads_for(&vars, 0, 0.5);
    let mut calls = 0;
    let e = ShardedStep::step_subset_agreed(&mut st, &grads, &mut |so_far| {
        calls += 1;
        assert!(so_far.is_none());
        Err(steepest::Error::config("verdict", "another rank failed"))
    })
    .unwrap_err();
    assert!(e.to_string().contains("another rank failed"), "{e}");
    assert_eq!(calls, 1);
    assert_eq!(params_and_masters(st.driver()), before);
    assert_eq!(st.state_dict().unwrap().len(), 1, "only the header");
    // And the next steps run as if the refused one had not been.
    for step in 0..2 {
        st.step_subset(&grads_for(&vars, step, 0.5)).unwrap();
        untouched.step_subset(&grads_for(&vars, step, 0.5)).unwrap();
    }
    assert_eq!(
        params_and_masters(st.driver()),
        params_and_masters(untouched.driver())
    );
}

/// Data-parallel Muon over bf16 parameters with master weights on two
/// in-process ranks: every rank's parameters equal the one-process run's
/// bit for bit (the owners step their masters with f32 gradients, as one
/// process does), each master lives only at its owner, and a resume from
/// `save_state` (each rank's file, masters included) continues bit for bit;
/// `ParamGather::Bf16Updates`, which would rewrite the parameters behind
/// their masters, is refused at construction.
#[test]
fn data_parallel_ranks_follow_one_process_and_resume() {
    use steepest::distributed::{
        Collective, DataParallel, DataParallelConfig, LocalGroup, ParamGather,
    };
    let dir = common::scratch_dir("master_weights", "data_parallel");
    let make = |vm: &VarMap| {
        Muon::from_varmap(vm, muon_config())
            .unwrap()
            .with_master_weights()
    };
    // Gradients bf16 does not hold (the owners must get them in f32, as
    // one process steps its masters with them).
    let fine = |vars: &[NamedVar], step: usize| -> Vec<(usize, Tensor)> {
        grads_for(vars, step, 0.5)
            .into_iter()
            .map(|(i, g)| (i, (g * (1.0 + 2f64.powi(-10))).unwrap()))
            .collect()
    };
    let grads = |opt: &Muon, step: usize| -> Vec<Option<Tensor>> {
        fine(opt.vars(), step)
            .into_iter()
            .map(|(_, g)| Some(g))
            .collect()
    };
    let init = converted(&model(DType::F32), DType::BF16);
    // One process.
    let one = converted(&init, DType::BF16);
    let mut single = make(&one);
    for step in 0..6 {
        single.step_subset(&fine(single.vars(), step)).unwrap();
    }
    let want: Vec<Vec<u32>> = single
        .vars()
        .iter()
        .map(|v| bits(v.var.as_tensor()))
        .collect();

    let out = LocalGroup::run(2, |comm| {
        let vm = converted(&init, DType::BF16);
        let opt = make(&vm);
        let g: Vec<Vec<Option<Tensor>>> = (0..6).map(|s| grads(&opt, s)).collect();
        let mut dp = DataParallel::for_optimizer(comm, opt, DataParallelConfig::default())?;
        for grads in &g[..3] {
            dp.step_grads(grads)?;
        }
        dp.save_state(&dir)?;
        let at3 = converted(&vm, DType::BF16);
        for grads in &g[3..] {
            dp.step_grads(grads)?;
        }
        let whole: Vec<Vec<u32>> = dp
            .optimizer()
            .vars()
            .iter()
            .map(|v| bits(v.var.as_tensor()))
            .collect();
        let driver = dp.optimizer().driver();
        let masters: Vec<(String, Vec<u32>)> = driver
            .params()
            .iter()
            .filter_map(|v| Some((v.name.clone(), bits(driver.master_weight(&v.name)?))))
            .collect();
        Ok((whole, masters, at3, g))
    })
    .unwrap();
    let mut masters = 0;
    for r in &out {
        let (whole, m, ..) = r.as_ref().unwrap();
        assert_eq!(whole, &want, "a rank differs from one process");
        for (name, bits_m) in m {
            let one = single.driver().master_weight(name).unwrap();
            assert_eq!(bits_m, &bits(one), "{name}: the owner's master");
        }
        masters += m.len();
    }
    assert_eq!(masters, want.len(), "each master at its owner only");

    // Resume each rank from its file over the parameters saved at step 3.
    let resumed = LocalGroup::run(2, |comm| {
        let (_, _, at3, g) = out[comm.rank()].as_ref().unwrap();
        let vm = converted(at3, DType::BF16);
        let mut dp = DataParallel::for_optimizer(comm, make(&vm), DataParallelConfig::default())?;
        dp.load_state(&dir)?;
        for grads in &g[3..] {
            dp.step_grads(grads)?;
        }
        Ok(dp
            .optimizer()
            .vars()
            .iter()
            .map(|v| bits(v.var.as_tensor()))
            .collect::<Vec<_>>())
    })
    .unwrap();
    for r in resumed {
        assert_eq!(r.unwrap(), want, "a resumed rank differs");
    }

    // Bf16Updates: refused on every rank (one f32 parameter among bf16 ones,
    // so that the option is otherwise allowed).
    let refused = LocalGroup::run(2, |comm| {
        let vm = converted(&init, DType::BF16);
        let gain = var(&vm, "gain").as_tensor().to_dtype(DType::F32).unwrap();
        vm.data()
            .lock()
            .unwrap()
            .insert("gain".into(), Var::from_tensor(&gain).unwrap());
        let cfg = DataParallelConfig {
            param_gather: ParamGather::Bf16Updates,
            ..Default::default()
        };
        Ok(DataParallel::for_optimizer(comm, make(&vm), cfg).map(|_| ()))
    })
    .unwrap();
    for r in refused {
        let e = r.unwrap().expect_err("Bf16Updates with master weights");
        assert!(e.to_string().contains("master weights"), "{e}");
    }
}

/// f16 parameters under `DataParallelConfig { grad_dtype: BF16 }`: without
/// master weights the owner cast the averaged bf16 gradient back to f16,
/// where a gradient finite in f16 and rounded up in bf16 (65504 → 65536)
/// overflowed after the ranks' finite check: the step was refused for a
/// "NaN or Inf" gradient no rank had sent (an optimizer without Muon's
/// two-phase step would fail partway instead). Now refused at construction
/// on every rank, naming the parameter. With master weights (the owner takes the gradient in f32)
/// it is accepted, and such a gradient steps.
#[test]
fn data_parallel_bf16_gradients_of_f16_parameters_need_master_weights() {
    use steepest::distributed::{DataParallel, DataParallelConfig, LocalGroup};
    let init = converted(&model(DType::F32), DType::F16);
    let cfg = DataParallelConfig {
        grad_dtype: DType::BF16,
        ..Default::default()
    };
    for master in [false, true] {
        let out = LocalGroup::run(2, |comm| {
            let vm = converted(&init, DType::F16);
            let mut opt = Muon::from_varmap(&vm, muon_config()).unwrap();
            if master {
                opt = opt.with_master_weights();
            }
            let big: Vec<Option<Tensor>> = opt
                .vars()
                .iter()
                .map(|v| {
                    Some(
                        v.var
                            .as_tensor()
                            .ones_like()
                            .unwrap()
                            .affine(65504.0, 0.0)
                            .unwrap(),
                    )
                })
                .collect();
            let mut dp = DataParallel::for_optimizer(comm, opt, cfg.clone())?;
            dp.step_grads(&big)
        })
        .unwrap();
        for r in out {
            match (master, r) {
                (false, Err(e)) => {
                    let e = e.to_string();
                    assert!(e.contains("is f16 and grad_dtype is BF16"), "{e}");
                }
                (true, Ok(())) => {}
                (m, r) => panic!("master weights {m}: {r:?}"),
            }
        }
    }
}

/// Stiefel-constrained bf16/f16 matrices `w0`, `w1` (orthonormal columns;
/// `w1` zero with `zero_second`), for the refusal tests: a zero gradient for
/// a zero `w1` at its first step leaves its retraction no answer.
fn stiefel_pair(dtype: DType, seed: u64, zero_second: bool) -> (Steepest, Vec<NamedVar>) {
    let vars: Vec<NamedVar> = (0..2)
        .map(|i| {
            let t = Tensor::from_vec(values(seed + i, 32), (8, 4), &Device::Cpu)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let q = steepest::msign(&t, &steepest::NewtonSchulz::polar_express(8)).unwrap();
            let keep = if zero_second && i == 1 { 0.0 } else { 1.0 };
            let q = (q * keep).unwrap();
            NamedVar {
                name: format!("w{i}"),
                var: Var::from_tensor(&q.to_dtype(dtype).unwrap()).unwrap(),
            }
        })
        .collect();
    let cfg = SteepestConfig {
        lr: 0.05,
        manifold: Manifold::Stiefel { transpose: false },
        ..Default::default()
    };
    let opt = Steepest::from_named(vars.clone(), cfg)
        .unwrap()
        .with_master_weights();
    (opt, vars)
}

/// A parameter edited outside the optimizer (its master now stale), with a
/// −0 where its master rounds to +0 and a NaN whose payload rounding would
/// change, then a step refused by a retraction: the parameter keeps its
/// exact bits, the stale master and the state are as before; bf16 and f16.
#[test]
fn a_refused_step_after_an_edit_keeps_the_edit_and_the_old_master() {
    for (dtype, nan_bits) in [(DType::BF16, 0x7F81u16), (DType::F16, 0x7C01u16)] {
        let (mut st, vars) = stiefel_pair(dtype, 40, true);
        let mut grads = grads_for(&vars, 0, 0.5);
        st.step_subset(&grads[..1]).unwrap();
        let w0 = &vars[0].var;
        let mut bits16: Vec<u16> = w0
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|&x| match dtype {
                DType::BF16 => half::bf16::from_f32(x).to_bits(),
                _ => half::f16::from_f32(x).to_bits(),
            })
            .collect();
        bits16[5] = nan_bits;
        let edit = match dtype {
            DType::BF16 => Tensor::from_vec(
                bits16
                    .iter()
                    .map(|&b| half::bf16::from_bits(b))
                    .collect::<Vec<_>>(),
                (8, 4),
                &Device::Cpu,
            ),
            _ => Tensor::from_vec(
                bits16
                    .iter()
                    .map(|&b| half::f16::from_bits(b))
                    .collect::<Vec<_>>(),
                (8, 4),
                &Device::Cpu,
            ),
        }
        .unwrap();
        w0.set(&edit).unwrap();
        let before_params = params_and_masters(st.driver()).0;
        let before_state = st.state_dict().unwrap();
        grads[1].1 = grads[1].1.zeros_like().unwrap();
        st.step_subset(&grads)
            .expect_err("a zero gradient's Stiefel retraction is refused");
        let raw16 = |t: &Tensor| -> Vec<u16> {
            match dtype {
                DType::BF16 => t
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<half::bf16>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect(),
                _ => t
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<half::f16>()
                    .unwrap()
                    .iter()
                    .map(|x| x.to_bits())
                    .collect(),
            }
        };
        assert_eq!(raw16(w0.as_tensor()), bits16, "{dtype:?}: the edit's bits");
        assert_eq!(params_and_masters(st.driver()).0, before_params);
        let after_state = st.state_dict().unwrap();
        assert_eq!(
            after_state
                .keys()
                .collect::<std::collections::BTreeSet<_>>(),
            before_state.keys().collect()
        );
        for (k, t) in &before_state {
            assert_eq!(bits(t), bits(&after_state[k]), "{dtype:?}: {k}");
        }
        // A −0 written where the master rounds to +0 counts as the same
        // value: that master is kept, and a refused step keeps the −0.
        let (mut st, vars) = stiefel_pair(dtype, 50, true);
        let mut grads = grads_for(&vars, 0, 0.5);
        st.step_subset(&grads[..1]).unwrap();
        let w0 = &vars[0].var;
        let zeroed = w0.as_tensor().zeros_like().unwrap();
        let neg = zeroed.neg().unwrap();
        // the master is re-made from +0 by a step with a zero direction …
        w0.set(&zeroed).unwrap();
        let masters_before = params_and_masters(st.driver()).1;
        w0.set(&neg).unwrap();
        grads[1].1 = grads[1].1.zeros_like().unwrap();
        st.step_subset(&grads).expect_err("refused");
        assert_eq!(raw16(w0.as_tensor()), raw16(&neg), "{dtype:?}: −0 kept");
        assert_eq!(params_and_masters(st.driver()).1, masters_before);
    }
}

/// A master loaded from a state dict is the optimizer's own copy: a state
/// dict holding another optimizer's live master tensor, loaded, and stepped,
/// leaves that tensor alone.
#[test]
fn a_loaded_master_shares_no_storage_with_the_state_dict() {
    let vm = converted(&model(DType::F32), DType::BF16);
    let mut a = AdamW::from_varmap(&vm, adamw_config(1e-3))
        .unwrap()
        .with_master_weights();
    a.step_subset(&grads_for(a.vars(), 0, 0.5)).unwrap();
    let mut state = a.state_dict().unwrap();
    let live = a.driver().master_weight("fc1.weight").unwrap().clone();
    let kept = bits(&live);
    state.insert("fc1.weight.master_weight".into(), live.clone());
    let vb = converted(&vm, DType::BF16);
    let mut b = AdamW::from_varmap(&vb, adamw_config(1e-3))
        .unwrap()
        .with_master_weights();
    b.load_state_dict(&state).unwrap();
    b.step_subset(&grads_for(b.vars(), 1, 0.5)).unwrap();
    assert_eq!(bits(&live), kept, "the state dict's tensor was written");
    assert_ne!(
        bits(b.driver().master_weight("fc1.weight").unwrap()),
        kept,
        "b's master stepped"
    );
}

/// A header without the `master_weights` field (checkpoints written before
/// master weights existed) loads; a state dict without master keys loads
/// into an optimizer without masters whatever its header says.
#[test]
fn headers_without_the_master_flag_load() {
    let vm = converted(&model(DType::F32), DType::BF16);
    let mut a = Muon::from_varmap(&vm, muon_config()).unwrap();
    a.step_subset(&grads_for(a.vars(), 0, 0.5)).unwrap();
    let state = common::with_header(&a.state_dict().unwrap(), |h| {
        let body = h["body"].as_object_mut().unwrap();
        assert!(body.remove("master_weights").is_some());
    });
    let mut b = Muon::from_varmap(&converted(&vm, DType::BF16), muon_config()).unwrap();
    b.load_state_dict(&state).unwrap();
    let mut c = Muon::from_varmap(&converted(&vm, DType::BF16), muon_config())
        .unwrap()
        .with_master_weights();
    c.load_state_dict(&state).unwrap();
    // saved with master weights before any step: no master to lose
    let d = Muon::from_varmap(&converted(&vm, DType::BF16), muon_config())
        .unwrap()
        .with_master_weights();
    b.load_state_dict(&d.state_dict().unwrap()).unwrap();
}

/// The seam's master functions refuse mismatched lists and pairs by name.
#[test]
fn the_master_seam_refuses_mismatched_pairs() {
    use steepest::device::{masters_round_to, round_masters_into};
    let m = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
    let p = Var::zeros((2, 3), DType::BF16, &Device::Cpu).unwrap();
    let q = Var::zeros((3, 2), DType::BF16, &Device::Cpu).unwrap();
    let f = Var::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
    let e = masters_round_to(&[&m], &[p.as_tensor(), p.as_tensor()]).unwrap_err();
    assert!(e.to_string().contains("1 masters for 2 parameters"), "{e}");
    let e = round_masters_into(&[&m, &m], &[&p]).unwrap_err();
    assert!(e.to_string().contains("round_masters_into"), "{e}");
    let e = round_masters_into(&[&m], &[&q]).unwrap_err();
    assert!(e.to_string().contains("pair 0"), "{e}");
    let e = masters_round_to(&[&m], &[f.as_tensor()]).unwrap_err();
    assert!(e.to_string().contains("bf16/f16"), "{e}");
    assert_eq!(
        masters_round_to(&[&m], &[p.as_tensor()]).unwrap(),
        vec![true]
    );
}

/// Data-parallel ranks that disagree on master weights are refused at
/// construction, on every rank, naming the settings.
#[test]
fn data_parallel_ranks_must_agree_on_master_weights() {
    use steepest::distributed::{Collective, DataParallel, DataParallelConfig, LocalGroup};
    let init = converted(&model(DType::F32), DType::BF16);
    let out = LocalGroup::run(2, |comm| {
        let vm = converted(&init, DType::BF16);
        let mut opt = Muon::from_varmap(&vm, muon_config()).unwrap();
        if comm.rank() == 1 {
            opt = opt.with_master_weights();
        }
        Ok(DataParallel::for_optimizer(comm, opt, DataParallelConfig::default()).map(|_| ()))
    })
    .unwrap();
    for r in out {
        let e = r.unwrap().expect_err("ranks disagree on master weights");
        assert!(e.to_string().contains("master weights"), "{e}");
    }
}
