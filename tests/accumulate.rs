//! Gradient accumulation (`steepest::accumulate::Accumulate`): the step is
//! the wrapped optimizer's on the mean gradient, checked against the f64
//! closed-form gradient of the whole batch; `every = 1` is the wrapped
//! optimizer bit for bit; refusals change nothing; a checkpoint between
//! optimizer steps resumes bit for bit.

mod common;
mod support;

use candle_core::{DType, Device, Tensor};
use candle_nn::{Optimizer, VarMap};
use common::AmaxNan;
use nalgebra::DMatrix;
use steepest::accumulate::{
    Accumulate, ACCUMULATE_COUNT_KEY, ACCUMULATE_EVERY_KEY, ACCUMULATE_SUM_PREFIX,
};
use steepest::schedule::{Schedule, Scheduled};
use steepest::{Error, OptimizerState, Sgd, SgdConfig, TryStep};
use support::*;

/// A linear least-squares model `Y ≈ X W + b`, `W` 6×3, `b` 3, and
/// `N = 4·8` rows of data, split into micro-batches of 8 rows.
const PARAMS: &[(&str, &[usize])] = &[("lin.weight", &[6, 3]), ("lin.bias", &[3])];
const ROWS: usize = 32;
const MICRO: usize = 8;

fn data() -> (Tensor, Tensor) {
    let x = Tensor::from_vec(values(11, ROWS * 6), (ROWS, 6), &Device::Cpu).unwrap();
    let y = Tensor::from_vec(values(12, ROWS * 3), (ROWS, 3), &Device::Cpu).unwrap();
    (
        x.to_dtype(DType::F32).unwrap(),
        y.to_dtype(DType::F32).unwrap(),
    )
}

/// `mean((X W + b − Y)²)` over rows `[from, from + n)` (mean over rows and
/// outputs), in `vm`'s dtype cast to f32.
fn loss(vm: &VarMap, from: usize, n: usize) -> Tensor {
    let (x, y) = data();
    let w = var(vm, "lin.weight")
        .as_tensor()
        .to_dtype(DType::F32)
        .unwrap();
    let b = var(vm, "lin.bias")
        .as_tensor()
        .to_dtype(DType::F32)
        .unwrap();
    let pred = x
        .narrow(0, from, n)
        .unwrap()
        .matmul(&w)
        .unwrap()
        .broadcast_add(&b)
        .unwrap();
    (pred - y.narrow(0, from, n).unwrap())
        .unwrap()
        .sqr()
        .unwrap()
        .mean_all()
        .unwrap()
}

fn sgd(vm: &VarMap, lr: f64) -> Sgd {
    Sgd::from_varmap(
        vm,
        SgdConfig {
            lr,
            ..Default::default()
        },
    )
    .unwrap()
}

fn mat(t: &Tensor) -> DMatrix<f64> {
    let t = t.to_dtype(DType::F64).unwrap();
    let (r, c) = match t.dims() {
        [r, c] => (*r, *c),
        [c] => (1, *c),
        d => panic!("{d:?}"),
    };
    DMatrix::from_row_slice(r, c, &t.flatten_all().unwrap().to_vec1::<f64>().unwrap())
}

/// Four micro-batches of 8 rows make one SGD step equal to the f64 step on
/// the whole batch's gradient, `∇_W = (2/(N·3)) Xᵀ R`, `∇_b = (2/(N·3)) 1ᵀ R`
/// with `R = X W + b − Y` (the mean of the four micro-batch means is the
/// mean over all rows); the first three calls change nothing.
#[test]
fn four_micro_batches_make_one_step_on_the_whole_batch_gradient() {
    let vm = model_of(PARAMS, DType::F32, 3);
    let (w0, b0) = (
        mat(var(&vm, "lin.weight").as_tensor()),
        mat(var(&vm, "lin.bias").as_tensor()),
    );
    let lr = 0.1;
    let mut opt = Accumulate::new(sgd(&vm, lr), 4).unwrap();
    let start = snapshot(&vm);
    for j in 0..4 {
        let stepped = opt.backward_step(&loss(&vm, j * MICRO, MICRO)).unwrap();
        assert_eq!(stepped, j == 3, "call {j}");
        assert_eq!(opt.pending(), (j + 1) % 4, "call {j}");
        if j < 3 {
            assert_eq!(snapshot(&vm), start, "a parameter moved at call {j}");
        }
    }
    let (x, y) = data();
    let (x, y) = (mat(&x), mat(&y));
    let ones = DMatrix::<f64>::from_element(ROWS, 1, 1.0);
    let r = &x * &w0 + &ones * &b0 - y;
    let scale = 2.0 / (ROWS * 3) as f64;
    let w1 = &w0 - lr * scale * (x.transpose() * &r);
    let b1 = &b0 - lr * scale * (ones.transpose() * &r);
    let (w, b) = (
        mat(var(&vm, "lin.weight").as_tensor()),
        mat(var(&vm, "lin.bias").as_tensor()),
    );
    let err = (w - &w1).amax_nan().max((b - &b1).amax_nan());
    assert!(err < 1e-6, "max |Δ| = {err:e}");
    assert!((&w1 - &w0).amax() > 1e-3, "the step is not vacuous");
}

/// `every = 1` is the wrapped optimizer, bit for bit (f32 and bf16,
/// Muon with spectral decay, three steps).
#[test]
fn every_one_is_the_wrapped_optimizer_bit_for_bit() {
    for dtype in [DType::F32, DType::BF16] {
        let (va, vb) = (model_of(PARAMS, dtype, 5), model_of(PARAMS, dtype, 5));
        let mut plain = spectral_muon(&va);
        let mut acc = Accumulate::new(spectral_muon(&vb), 1).unwrap();
        for t in 0..3 {
            plain.backward_step(&loss(&va, t * MICRO, MICRO)).unwrap();
            assert!(acc.backward_step(&loss(&vb, t * MICRO, MICRO)).unwrap());
            assert_eq!(snapshot(&va), snapshot(&vb), "{dtype:?} step {t}");
        }
        assert_eq!(
            state_tensors(&plain.state_dict().unwrap()),
            state_tensors(&acc.inner().state_dict().unwrap())
        );
    }
}

/// A parameter without a gradient in a micro-batch counts zero there: the
/// mean is still over `every`.
#[test]
fn a_missing_gradient_counts_zero_in_the_mean() {
    let vm = model_of(PARAMS, DType::F32, 3);
    let b0 = mat(var(&vm, "lin.bias").as_tensor());
    let mut opt = Accumulate::new(sgd(&vm, 0.5), 2).unwrap();
    // Micro-batch 1: a loss of the bias alone, Σ b (gradient 1 per entry);
    // micro-batch 2: of the weight alone.
    let bias_only = var(&vm, "lin.bias").as_tensor().sum_all().unwrap();
    assert!(!opt.backward_step(&bias_only).unwrap());
    let weight_only = var(&vm, "lin.weight").as_tensor().sum_all().unwrap();
    assert!(opt.backward_step(&weight_only).unwrap());
    let b = mat(var(&vm, "lin.bias").as_tensor());
    // b − η·(1 + 0)/2
    let err = (b - b0.add_scalar(-0.25)).amax_nan();
    assert!(err < 1e-7, "{err:e}");
}

/// A micro-batch with a NaN gradient is refused naming the parameter, and
/// nothing is added: skipping it gives the run without it, bit for bit.
#[test]
fn a_non_finite_micro_batch_is_refused_and_adds_nothing() {
    let (va, vb) = (
        model_of(PARAMS, DType::F32, 3),
        model_of(PARAMS, DType::F32, 3),
    );
    let mut clean = Accumulate::new(sgd(&va, 0.1), 2).unwrap();
    let mut dirty = Accumulate::new(sgd(&vb, 0.1), 2).unwrap();
    clean.backward_step(&loss(&va, 0, MICRO)).unwrap();
    dirty.backward_step(&loss(&vb, 0, MICRO)).unwrap();
    let before = dirty.state_dict().unwrap();
    let nan = (var(&vb, "lin.weight").as_tensor().sum_all().unwrap() * f64::NAN).unwrap();
    let e = dirty.try_step(&nan.backward().unwrap()).unwrap_err();
    assert!(
        matches!(&e, Error::NonFiniteGradient { param } if param == "lin.weight"),
        "{e}"
    );
    assert_eq!(dirty.pending(), 1);
    assert_eq!(
        state_snapshot(&dirty.state_dict().unwrap()),
        state_snapshot(&before)
    );
    clean.backward_step(&loss(&va, MICRO, MICRO)).unwrap();
    dirty.backward_step(&loss(&vb, MICRO, MICRO)).unwrap();
    assert_eq!(snapshot(&va), snapshot(&vb));
}

/// When the wrapped optimizer refuses its step (a NaN learning rate), the
/// micro-batch of that call is not added and the sums are kept: after the
/// rate is mended, the next micro-batch completes the same step as a run
/// that never saw the refused one.
#[test]
fn a_refused_optimizer_step_keeps_the_sums() {
    let (va, vb) = (
        model_of(PARAMS, DType::F32, 3),
        model_of(PARAMS, DType::F32, 3),
    );
    let mut good = Accumulate::new(sgd(&va, 0.1), 2).unwrap();
    let mut bad = Accumulate::new(sgd(&vb, 0.1), 2).unwrap();
    good.backward_step(&loss(&va, 0, MICRO)).unwrap();
    bad.backward_step(&loss(&vb, 0, MICRO)).unwrap();
    bad.inner_mut().set_learning_rate(f64::NAN);
    let before = snapshot(&vb);
    let e = bad.backward_step(&loss(&vb, 16, MICRO)).unwrap_err();
    assert!(matches!(e, Error::Config { .. }), "{e}");
    assert_eq!(snapshot(&vb), before);
    assert_eq!(bad.pending(), 1);
    bad.inner_mut().set_learning_rate(0.1);
    assert!(good.backward_step(&loss(&va, MICRO, MICRO)).unwrap());
    assert!(bad.backward_step(&loss(&vb, MICRO, MICRO)).unwrap());
    assert_eq!(snapshot(&va), snapshot(&vb));
}

/// A schedule inside counts optimizer steps, not micro-batches.
#[test]
fn a_schedule_inside_counts_optimizer_steps() {
    let vm = model_of(PARAMS, DType::F32, 3);
    let schedule = Schedule::cosine(0.1, 0.0, 10).unwrap();
    let mut opt = Accumulate::new(Scheduled::new(sgd(&vm, 0.1), schedule), 3).unwrap();
    for j in 0..7 {
        opt.backward_step(&loss(&vm, (j % 4) * MICRO, MICRO))
            .unwrap();
    }
    assert_eq!(opt.inner().current_step(), 2);
    assert_eq!(opt.pending(), 1);
}

/// Saved between optimizer steps (2 of 4 micro-batches pending, bf16
/// parameters, Muon with spectral decay under a schedule) and resumed into
/// a fresh model and optimizer, the run continues bit for bit.
#[test]
fn a_checkpoint_between_steps_resumes_bit_for_bit() {
    let dir = std::env::temp_dir().join(format!("steepest-accumulate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("acc.safetensors");
    let build = |vm: &VarMap| {
        let s = Schedule::cosine(0.02, 0.0, 20).unwrap();
        Accumulate::new(Scheduled::new(spectral_muon(vm), s), 4).unwrap()
    };
    let (va, vb) = (
        model_of(PARAMS, DType::BF16, 9),
        model_of(PARAMS, DType::BF16, 9),
    );
    let mut a = build(&va);
    for j in 0..6 {
        a.backward_step(&loss(&va, (j % 4) * MICRO, MICRO)).unwrap();
    }
    assert_eq!(a.pending(), 2);
    a.save_state(&path).unwrap();
    // The other process: the model from the same saved values, a fresh optimizer.
    for (name, _) in PARAMS {
        var(&vb, name).set(var(&va, name).as_tensor()).unwrap();
    }
    let mut b = build(&vb);
    b.load_state(&path).unwrap();
    assert_eq!(b.pending(), 2);
    for j in 6..14 {
        a.backward_step(&loss(&va, (j % 4) * MICRO, MICRO)).unwrap();
        b.backward_step(&loss(&vb, (j % 4) * MICRO, MICRO)).unwrap();
        assert_eq!(snapshot(&va), snapshot(&vb), "call {j}");
    }
    assert_eq!(
        state_snapshot(&a.state_dict().unwrap()),
        state_snapshot(&b.state_dict().unwrap())
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// Mismatched checkpoints are refused naming what is wrong, and change
/// nothing: a plain optimizer's, a sum of the wrong shape, a sum of an
/// unknown parameter, a count not below `every`, a sum of the wrong dtype
/// (f64 for an f32 parameter), sums with a count of 0, a negative `every`.
#[test]
fn mismatched_checkpoints_are_refused_and_change_nothing() {
    let vm = model_of(PARAMS, DType::F32, 3);
    let mut opt = Accumulate::new(sgd(&vm, 0.1), 4).unwrap();
    opt.backward_step(&loss(&vm, 0, MICRO)).unwrap();
    let good = opt.state_dict().unwrap();
    let plain = opt.inner().state_dict().unwrap();
    let sum_key = format!("{ACCUMULATE_SUM_PREFIX}lin.bias");
    let mut wrong_shape = good.clone();
    wrong_shape.insert(
        sum_key.clone(),
        Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap(),
    );
    let mut unknown = good.clone();
    unknown.insert(
        format!("{ACCUMULATE_SUM_PREFIX}lin.gain"),
        Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
    );
    let mut too_many = good.clone();
    too_many.insert(
        ACCUMULATE_COUNT_KEY.into(),
        Tensor::new(4i64, &Device::Cpu).unwrap(),
    );
    // An f32 parameter's sum is f32.
    let mut wrong_dtype = good.clone();
    wrong_dtype.insert(
        sum_key.clone(),
        Tensor::zeros(3, DType::F64, &Device::Cpu).unwrap(),
    );
    // Sums, but no micro-batch pending.
    let mut sums_of_nothing = good.clone();
    sums_of_nothing.insert(
        ACCUMULATE_COUNT_KEY.into(),
        Tensor::new(0i64, &Device::Cpu).unwrap(),
    );
    // A negative `every` (as usize it would be huge, and accepted).
    let mut negative_every = good.clone();
    negative_every.insert(
        ACCUMULATE_EVERY_KEY.into(),
        Tensor::new(-1i64, &Device::Cpu).unwrap(),
    );
    // Another optimizer to load into, one micro-batch ahead of `good`.
    opt.backward_step(&loss(&vm, MICRO, MICRO)).unwrap();
    let before = state_snapshot(&opt.state_dict().unwrap());
    for (state, want) in [
        (&plain, ACCUMULATE_COUNT_KEY),
        (&wrong_shape, sum_key.as_str()),
        (&unknown, "lin.gain"),
        (&too_many, ACCUMULATE_COUNT_KEY),
        (&wrong_dtype, sum_key.as_str()),
        (&sums_of_nothing, ACCUMULATE_COUNT_KEY),
        (&negative_every, "non-negative"),
    ] {
        let e = opt.load_state_dict(state).unwrap_err();
        assert!(matches!(e, Error::Checkpoint { .. }), "{e}");
        assert!(e.to_string().contains(want), "{want}: {e}");
        assert_eq!(state_snapshot(&opt.state_dict().unwrap()), before, "{want}");
    }
    opt.load_state_dict(&good).unwrap();
    assert_eq!(opt.pending(), 1);
}

/// `every = 0` is refused, and so is changing `every` while micro-batches
/// are pending (their mean would be over the wrong count).
#[test]
fn bad_every_is_refused() {
    let vm = model_of(PARAMS, DType::F32, 3);
    let e = Accumulate::new(sgd(&vm, 0.1), 0).unwrap_err();
    assert!(
        matches!(e, Error::Config { .. }) && e.to_string().contains("every"),
        "{e}"
    );
    let mut opt = Accumulate::new(sgd(&vm, 0.1), 2).unwrap();
    opt.backward_step(&loss(&vm, 0, MICRO)).unwrap();
    let e = opt.set_every(3).unwrap_err();
    assert!(e.to_string().contains("pending"), "{e}");
    assert_eq!(opt.every(), 2);
    opt.reset();
    opt.set_every(3).unwrap();
    assert_eq!((opt.every(), opt.pending()), (3, 0));
    // Through the generic trait too.
    fn generic(o: &mut impl TryStep, l: &Tensor) {
        o.try_backward_step(l).unwrap();
    }
    generic(&mut opt, &loss(&vm, 0, MICRO));
    assert_eq!(opt.pending(), 1);
}

/// Clipping applies to the mean gradient: the step equals the f64 step on
/// the whole batch's gradient scaled to norm `max` (its norm before
/// clipping reported by `last_grad_norm`).
#[test]
fn clipping_applies_to_the_mean_gradient() {
    let vm = model_of(PARAMS, DType::F32, 3);
    let (w0, b0) = (
        mat(var(&vm, "lin.weight").as_tensor()),
        mat(var(&vm, "lin.bias").as_tensor()),
    );
    let (lr, max) = (0.1, 0.05);
    let mut opt = Accumulate::new(sgd(&vm, lr), 4)
        .unwrap()
        .with_clip_grad_norm(max)
        .unwrap();
    assert_eq!(opt.last_grad_norm(), None);
    for j in 0..4 {
        opt.backward_step(&loss(&vm, j * MICRO, MICRO)).unwrap();
    }
    let (x, y) = data();
    let (x, y) = (mat(&x), mat(&y));
    let ones = DMatrix::<f64>::from_element(ROWS, 1, 1.0);
    let r = &x * &w0 + &ones * &b0 - y;
    let scale = 2.0 / (ROWS * 3) as f64;
    let (gw, gb) = (
        scale * (x.transpose() * &r),
        scale * (ones.transpose() * &r),
    );
    let norm = (gw.norm_squared() + gb.norm_squared()).sqrt();
    assert!(norm > 2.0 * max, "clipping is not vacuous: ‖g‖ = {norm}");
    let got = opt.last_grad_norm().unwrap();
    assert!((got - norm).abs() < 1e-5 * norm, "{got} vs {norm}");
    let k = max / norm;
    let (w, b) = (
        mat(var(&vm, "lin.weight").as_tensor()),
        mat(var(&vm, "lin.bias").as_tensor()),
    );
    let err = (w - (&w0 - lr * k * gw))
        .amax_nan()
        .max((b - (&b0 - lr * k * gb)).amax_nan());
    assert!(err < 1e-7, "max |Δ| = {err:e}");
    assert!(Accumulate::new(sgd(&vm, lr), 2)
        .unwrap()
        .with_clip_grad_norm(0.0)
        .is_err());
}

/// The NaN error names the parameter whose gradient holds it, also when it
/// is not the first parameter with a gradient (`lin.weight` after
/// `lin.bias`, the parameters being in name order).
#[test]
fn a_non_finite_gradient_is_named_by_its_parameter() {
    let vm = model_of(PARAMS, DType::F32, 3);
    let mut opt = Accumulate::new(sgd(&vm, 0.1), 2).unwrap();
    let b = var(&vm, "lin.bias").as_tensor().sum_all().unwrap();
    let w = (var(&vm, "lin.weight").as_tensor().sum_all().unwrap() * f64::NAN).unwrap();
    let e = opt.backward_step(&(b + w).unwrap()).unwrap_err();
    assert!(
        matches!(&e, Error::NonFiniteGradient { param } if param == "lin.weight"),
        "{e}"
    );
}

/// bf16 parameters' gradients are summed in f32: micro-batch gradients 1,
/// 2⁻⁹, 2⁻⁹, 2⁻⁹ (each exact in bf16) have the mean (1 + 3·2⁻⁹)/4 =
/// 0.25 + 0.75·2⁻⁹, which rounds once to bf16's 0.25 + 2⁻⁹; summed in bf16,
/// 1 + 2⁻⁹ would round back to 1 at every addition and the mean be 0.25.
/// SGD at rate 1 from W = 0 makes the applied mean −W. The pending sums are
/// f32 in the checkpoint.
#[test]
fn bf16_gradients_are_summed_in_f32() {
    let vm = model_of(&[("w", &[2, 3])], DType::BF16, 3);
    let w = var(&vm, "w");
    w.set(&w.as_tensor().zeros_like().unwrap()).unwrap();
    let mut opt = Accumulate::new(sgd(&vm, 1.0), 4).unwrap();
    let small = 2f64.powi(-9);
    for (j, c) in [1.0, small, small, small].into_iter().enumerate() {
        // Σ c·w: the gradient is c everywhere.
        let loss = (w.as_tensor().to_dtype(DType::F32).unwrap() * c)
            .unwrap()
            .sum_all()
            .unwrap();
        opt.backward_step(&loss).unwrap();
        if j == 1 {
            let state = opt.state_dict().unwrap();
            assert_eq!(
                state[&format!("{ACCUMULATE_SUM_PREFIX}w")].dtype(),
                DType::F32
            );
        }
    }
    let want = 0.25 + small;
    for x in common::to_f64_vec(w.as_tensor()) {
        assert_eq!(-x, want, "applied mean {}", -x);
    }
}

/// Loading restores the checkpoint's `every`, as optimizers restore their
/// hyperparameters: saved with `every = 4` and 3 micro-batches pending, an
/// accumulator built with `every = 2` then has `every = 4`, 3 pending, and
/// steps at the next call.
#[test]
fn loading_restores_every() {
    let vm = model_of(PARAMS, DType::F32, 3);
    let mut a = Accumulate::new(sgd(&vm, 0.1), 4).unwrap();
    for j in 0..3 {
        a.backward_step(&loss(&vm, j * MICRO, MICRO)).unwrap();
    }
    let state = a.state_dict().unwrap();
    let mut b = Accumulate::new(sgd(&vm, 0.1), 2).unwrap();
    b.load_state_dict(&state).unwrap();
    assert_eq!((b.every(), b.pending()), (4, 3));
    assert!(b.backward_step(&loss(&vm, 3 * MICRO, MICRO)).unwrap());
}

/// Finite micro-batches can still sum to Inf in f32 (two gradients of 3e38):
/// the wrapped optimizer's own check refuses the mean at the step, with
/// `NonFiniteGradient` naming the parameter, and nothing changes (the
/// earlier micro-batch stays pending, as for any refused step); after
/// `reset`, the next pair of finite micro-batches steps. This is why the
/// wrapped optimizer checks the mean again although every micro-batch was
/// checked on its way in.
#[test]
fn finite_micro_batches_whose_sum_overflows_are_refused_at_the_step() {
    let vm = model_of(PARAMS, DType::F32, 3);
    let mut opt = Accumulate::new(sgd(&vm, 0.1), 2).unwrap();
    let w = var(&vm, "lin.weight");
    let big = Tensor::full(3e38f32, (6, 3), &Device::Cpu).unwrap();
    let lin = |g: &Tensor| (w.as_tensor() * g).unwrap().sum_all().unwrap();
    assert!(!opt.backward_step(&lin(&big)).unwrap());
    let before = snapshot(&vm);
    match opt.backward_step(&lin(&big)).unwrap_err() {
        Error::NonFiniteGradient { param } => assert_eq!(param, "lin.weight"),
        e => panic!("expected NonFiniteGradient, got {e}"),
    }
    assert_eq!(snapshot(&vm), before);
    assert_eq!(opt.pending(), 1);
    opt.reset();
    let one = Tensor::ones((6, 3), DType::F32, &Device::Cpu).unwrap();
    assert!(!opt.backward_step(&lin(&one)).unwrap());
    assert!(opt.backward_step(&lin(&one)).unwrap());
    assert_ne!(snapshot(&vm), before);
}

/// The whole-batch gradient over rows `[from, from + n)` at `(w, b)`, in
/// f64: `∇_W = (2/(n·3)) Xᵀ R`, `∇_b = (2/(n·3)) 1ᵀ R`, `R = X W + b − Y`.
fn grad_f64(
    w: &DMatrix<f64>,
    b: &DMatrix<f64>,
    from: usize,
    n: usize,
) -> (DMatrix<f64>, DMatrix<f64>) {
    let (x, y) = data();
    let (x, y) = (
        mat(&x).rows(from, n).into_owned(),
        mat(&y).rows(from, n).into_owned(),
    );
    let ones = DMatrix::<f64>::from_element(n, 1, 1.0);
    let r = &x * w + &ones * b - y;
    let scale = 2.0 / (n * 3) as f64;
    (
        scale * (x.transpose() * &r),
        scale * (ones.transpose() * &r),
    )
}

/// Each optimizer step uses only its own micro-batches: with `every = 2`,
/// the second step is the f64 step on rows 16..32 at the weights the first
/// step left (nothing of the first step's micro-batches is carried over).
#[test]
fn consecutive_steps_use_only_their_own_micro_batches() {
    let vm = model_of(PARAMS, DType::F32, 3);
    let lr = 0.1;
    let mut opt = Accumulate::new(sgd(&vm, lr), 2).unwrap();
    let params = |vm: &VarMap| {
        (
            mat(var(vm, "lin.weight").as_tensor()),
            mat(var(vm, "lin.bias").as_tensor()),
        )
    };
    for j in 0..2 {
        opt.backward_step(&loss(&vm, j * MICRO, MICRO)).unwrap();
    }
    let (w1, b1) = params(&vm);
    for j in 2..4 {
        let stepped = opt.backward_step(&loss(&vm, j * MICRO, MICRO)).unwrap();
        assert_eq!(stepped, j == 3);
    }
    let (gw, gb) = grad_f64(&w1, &b1, 2 * MICRO, 2 * MICRO);
    let (w2, b2) = params(&vm);
    let err = (w2 - (&w1 - lr * &gw))
        .amax_nan()
        .max((b2 - (&b1 - lr * &gb)).amax_nan());
    assert!(err < 1e-6, "max |Δ| = {err:e}");
    assert!(lr * gw.amax() > 1e-3, "the step is not vacuous");
}

/// f64 parameters' gradients are summed in f64: micro-batch gradients 1,
/// 2⁻³⁰, 2⁻³⁰, 2⁻³⁰ have the mean (1 + 3·2⁻³⁰)/4 = 0.25 + 0.75·2⁻³⁰, exact
/// in f64; summed in f32, 1 + 2⁻³⁰ would round back to 1 and the mean be
/// 0.25. SGD at rate 1 from W = 0 makes the applied mean −W. The pending
/// sums are f64 in the checkpoint.
#[test]
fn f64_gradients_are_summed_in_f64() {
    let vm = model_of(&[("w", &[2, 3])], DType::F64, 3);
    let w = var(&vm, "w");
    w.set(&w.as_tensor().zeros_like().unwrap()).unwrap();
    let mut opt = Accumulate::new(sgd(&vm, 1.0), 4).unwrap();
    let small = 2f64.powi(-30);
    for (j, c) in [1.0, small, small, small].into_iter().enumerate() {
        let loss = (w.as_tensor() * c).unwrap().sum_all().unwrap();
        opt.backward_step(&loss).unwrap();
        if j == 1 {
            let state = opt.state_dict().unwrap();
            assert_eq!(
                state[&format!("{ACCUMULATE_SUM_PREFIX}w")].dtype(),
                DType::F64
            );
        }
    }
    let want = 0.25 + 0.75 * small;
    for x in common::to_f64_vec(w.as_tensor()) {
        assert_eq!(-x, want, "applied mean {}", -x);
    }
}

/// A checkpoint saved with no micro-batch pending (right after a step, the
/// time to save) loads, into an accumulator that has one pending: it then
/// has none, and runs on as the saved one, bit for bit.
#[test]
fn a_checkpoint_with_nothing_pending_loads() {
    let (va, vb) = (
        model_of(PARAMS, DType::F32, 3),
        model_of(PARAMS, DType::F32, 3),
    );
    let mut a = Accumulate::new(sgd(&va, 0.1), 2).unwrap();
    for j in 0..2 {
        a.backward_step(&loss(&va, j * MICRO, MICRO)).unwrap();
    }
    assert_eq!(a.pending(), 0);
    let state = a.state_dict().unwrap();
    for (name, _) in PARAMS {
        var(&vb, name).set(var(&va, name).as_tensor()).unwrap();
    }
    let mut b = Accumulate::new(sgd(&vb, 0.1), 2).unwrap();
    b.backward_step(&loss(&vb, 3 * MICRO, MICRO)).unwrap();
    assert_eq!(b.pending(), 1);
    b.load_state_dict(&state).unwrap();
    assert_eq!(b.pending(), 0);
    for j in 2..4 {
        a.backward_step(&loss(&va, j * MICRO, MICRO)).unwrap();
        b.backward_step(&loss(&vb, j * MICRO, MICRO)).unwrap();
    }
    assert_eq!(snapshot(&va), snapshot(&vb));
}
