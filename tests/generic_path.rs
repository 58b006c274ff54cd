//! The generic path: what Metal (and any device without this crate's kernels)
//! runs. Every operation of `steepest::device` has three implementations —
//! the CPU kernels, the CUDA kernels and candle's generic ops — and the third
//! never runs on a CPU or CUDA tensor by itself. `device::with_generic_ops`
//! forces it, so here it runs on the CPU against the CPU kernels (which the
//! other tests check against closed forms and f64 references): each fused
//! update on every shape, dtype and decay; the finite check; whole optimizer
//! steps; the refusals (NaN gradients, aliased outputs) that must change
//! nothing.
//!
//! The two paths do the same arithmetic in a different order (candle's ops,
//! one tensor at a time), so they agree to rounding, not bit for bit: within
//! a few f32 ulps for f32/f64 arithmetic, and within one ulp of the stored
//! type for bf16/f16 parameters (both round the same f32 value once).

#[path = "kernels_emu/cases.rs"]
mod cases;
mod common;
mod support;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use cases::*;
use steepest::device::{self, with_generic_ops, AdamItem, AdamStep, DecayTerm, SgdItem};
use steepest::optim::{Manifold, Sgd, SgdConfig, Steepest, SteepestConfig};
use steepest::WeightDecay;

/// The largest relative gap `|a − b| / max(|b|, floor)` a value of `dtype`
/// may show between the two paths: a few f32 ulps for f32 arithmetic, one
/// ulp of the stored 16-bit type (both paths round the same f32 value once,
/// so they differ by at most one rounding step of it). f64 parameters run
/// in f64 on both paths.
fn rel_tol(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => 1e-12,
        DType::F32 => 4.0 * f32::EPSILON as f64,
        DType::BF16 => 2f64.powi(-7),
        DType::F16 => 2f64.powi(-10),
        d => panic!("no tolerance for {d:?}"),
    }
}

/// Asserts `a ≈ b` elementwise at `dtype`'s tolerance. Near zero the gap is
/// measured against `floor` (the scale of the values compared), where f32
/// cancellation leaves absolute errors of that scale's ulps.
fn assert_close(what: &str, a: &Tensor, b: &Tensor, dtype: DType, floor: f64) {
    assert_eq!(a.dims(), b.dims(), "{what}: shapes");
    let (x, y) = (f64s(a), f64s(b));
    let tol = rel_tol(dtype);
    for (i, (p, q)) in x.iter().zip(&y).enumerate() {
        let gap = (p - q).abs() / q.abs().max(floor);
        assert!(
            gap <= tol,
            "{what}: element {i}: generic {p} vs cpu {q} (relative gap {gap:e} > {tol:e})"
        );
    }
}

/// One parameter with everything any update family needs, its state in
/// the arithmetic dtype (`cases::Member`).
type P = Member;

/// Parameter and both state tensors of `p` close to `cpu`'s.
fn assert_close_to(p: &P, cpu: &P, what: &str) {
    let dt = p.w.dtype();
    let what = format!("{what} {dt:?} {:?}", p.w.dims());
    // the scale of the values: parameters and gradients are N(0, 1)
    assert_close(
        &format!("{what}: w"),
        p.w.as_tensor(),
        cpu.w.as_tensor(),
        dt,
        1.0,
    );
    for (k, (a, b)) in [(&p.s1, &cpu.s1), (&p.s2, &cpu.s2)].into_iter().enumerate() {
        let floor = max_abs(b.as_tensor()).max(1e-30);
        assert_close(
            &format!("{what}: state {}", k + 1),
            a.as_tensor(),
            b.as_tensor(),
            b.dtype(),
            floor,
        );
    }
}

const ALL_DTYPES: [DType; 4] = [DType::F32, DType::F64, DType::BF16, DType::F16];

/// Every update shape × dtype × decay (decay cycling with the shape).
fn cases() -> Vec<P> {
    let mut out = Vec::new();
    for (i, shape) in UPDATE_SHAPES.iter().enumerate() {
        for (j, &dt) in ALL_DTYPES.iter().enumerate() {
            out.push(P::new(
                (100 + 10 * i + j) as u64,
                shape,
                dt,
                DECAYS[(i + j) % DECAYS.len()],
            ));
        }
    }
    out
}

/// Runs `run` on copies of `ps` by the CPU path and by the generic path;
/// returns each path's copies and result.
fn on_both_paths<R>(ps: &[P], run: impl Fn(&[P]) -> R) -> ((Vec<P>, R), (Vec<P>, R)) {
    let cpu: Vec<P> = ps.iter().map(P::copy).collect();
    let gen: Vec<P> = ps.iter().map(P::copy).collect();
    let r_cpu = run(&cpu);
    let r_gen = with_generic_ops(|| run(&gen));
    ((cpu, r_cpu), (gen, r_gen))
}

/// Runs `step` on each member of copies of `ps` by both paths; returns
/// (cpu, generic), after checking that the step moved every parameter (a
/// path that silently did nothing would otherwise agree with a path that
/// did nothing either).
fn both_paths(ps: &[P], step: impl Fn(&P)) -> (Vec<P>, Vec<P>) {
    let ((cpu, ()), (gen, ())) = on_both_paths(ps, |ps| ps.iter().for_each(&step));
    for (p, c) in ps.iter().zip(&cpu) {
        assert_ne!(
            f64s(p.w.as_tensor()),
            f64s(c.w.as_tensor()),
            "the step left {:?} {:?} unchanged",
            p.w.dtype(),
            p.w.dims()
        );
    }
    (cpu, gen)
}

#[test]
fn adamw_generic_matches_cpu_on_every_shape_dtype_and_decay() {
    let ps = cases();
    for t in [1, 3] {
        let (cpu, gen) = both_paths(&ps, |p| {
            device::adamw_step(&[p.adam(t, 0.9)], 0.9, 0.999, 1e-8).unwrap()
        });
        for (g, c) in gen.iter().zip(&cpu) {
            assert_close_to(g, c, &format!("adamw step {t}"));
        }
    }
}

/// The comparison can fail: a generic step with another β₁ (a 10 % change
/// of the first moment's update) is far outside the tolerance.
#[test]
fn the_comparison_sees_a_wrong_first_moment() {
    let p = P::new(5, &[6, 4], DType::F32, DecayKind::Rank1);
    let (cpu, gen) = (p.copy(), p.copy());
    device::adamw_step(&[cpu.adam(2, 0.9)], 0.9, 0.999, 1e-8).unwrap();
    with_generic_ops(|| device::adamw_step(&[gen.adam(2, 0.9)], 0.89, 0.999, 1e-8)).unwrap();
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        assert_close_to(&gen, &cpu, "wrong β₁")
    }));
    assert!(caught.is_err(), "a wrong β₁ passed the comparison");
}

#[test]
fn sgd_generic_matches_cpu_on_every_shape_dtype_and_decay() {
    let ps = cases();
    for (momentum, nesterov) in [(false, false), (true, false), (true, true)] {
        let (cpu, gen) = both_paths(&ps, |p| {
            device::sgd_step(&[p.sgd(momentum)], 0.9, nesterov).unwrap()
        });
        for (g, c) in gen.iter().zip(&cpu) {
            assert_close_to(
                g,
                c,
                &format!("sgd momentum {momentum} nesterov {nesterov}"),
            );
        }
    }
}

/// Muon's momentum over a batch of same-shape members (one per dtype), and
/// the direction it writes.
#[test]
fn ema_momentum_generic_matches_cpu_on_every_shape() {
    for (i, shape) in UPDATE_SHAPES.iter().enumerate() {
        for dt in ALL_DTYPES {
            let ps: Vec<P> = (0..3)
                .map(|k| P::new((300 + 10 * i + k) as u64, shape, dt, DecayKind::None))
                .collect();
            let acc = device::math_dtype(dt);
            let mut dims = vec![ps.len()];
            dims.extend_from_slice(shape);
            let run = |ps: &[P]| {
                let out = Var::zeros(dims.as_slice(), acc, &Device::Cpu).unwrap();
                let gs: Vec<&Tensor> = ps.iter().map(|p| &p.g).collect();
                let bs: Vec<&Var> = ps.iter().map(|p| &p.s1).collect();
                device::ema_momentum(&gs, &bs, &out, 0.95, i % 2 == 0).unwrap();
                out
            };
            let ((cpu, d_cpu), (gen, d_gen)) = on_both_paths(&ps, run);
            let what = format!("ema {dt:?} {shape:?}");
            let floor = max_abs(d_cpu.as_tensor());
            assert_close(
                &format!("{what}: direction"),
                d_gen.as_tensor(),
                d_cpu.as_tensor(),
                acc,
                floor,
            );
            for (g, c) in gen.iter().zip(&cpu) {
                let floor = max_abs(c.s1.as_tensor());
                assert_close(
                    &format!("{what}: buffer"),
                    g.s1.as_tensor(),
                    c.s1.as_tensor(),
                    acc,
                    floor,
                );
            }
        }
    }
}

/// `w ← decayed(w) − α·d` over a batch, every decay.
#[test]
fn apply_step_generic_matches_cpu_on_every_shape_and_decay() {
    for (i, shape) in UPDATE_SHAPES.iter().enumerate() {
        for dt in ALL_DTYPES {
            let ps: Vec<P> = DECAYS
                .iter()
                .enumerate()
                .map(|(k, &dk)| P::new((500 + 10 * i + k) as u64, shape, dt, dk))
                .collect();
            let mut dims = vec![ps.len()];
            dims.extend_from_slice(shape);
            let d = randn(
                &mut rng(i as u64),
                &dims,
                device::math_dtype(dt),
                &Device::Cpu,
            );
            let alphas: Vec<f64> = (0..ps.len()).map(|k| 0.02 * (k + 1) as f64).collect();
            let run = |ps: &[P]| {
                let ws: Vec<&Var> = ps.iter().map(|p| &p.w).collect();
                let decays: Vec<DecayTerm<'_>> = ps.iter().map(P::decay).collect();
                device::apply_step(&ws, &d, &alphas, &decays).unwrap();
            };
            let ((cpu, ()), (gen, ())) = on_both_paths(&ps, run);
            for (g, c) in gen.iter().zip(&cpu) {
                assert_close(
                    &format!("apply {dt:?} {shape:?}: w"),
                    g.w.as_tensor(),
                    c.w.as_tensor(),
                    dt,
                    1.0,
                );
            }
        }
    }
}

/// The finite check finds the same first non-finite tensor on both paths,
/// for NaN, ±Inf and the largest finite values of each dtype.
#[test]
fn first_nonfinite_generic_matches_cpu() {
    for dt in ALL_DTYPES {
        let big = match dt {
            DType::F16 => 65504.0,
            DType::BF16 => 3.3e38,
            DType::F32 => f32::MAX as f64,
            _ => f64::MAX,
        };
        for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, big] {
            for at in 0..3 {
                let ts: Vec<Tensor> = (0..3)
                    .map(|k| {
                        let mut v = vec![big, -big, 0.5, -0.0, 1e-3];
                        if k == at {
                            v[k + 1] = bad;
                        }
                        Tensor::from_vec(v, 5, &Device::Cpu)
                            .unwrap()
                            .to_dtype(dt)
                            .unwrap()
                    })
                    .collect();
                let refs: Vec<&Tensor> = ts.iter().collect();
                let cpu = device::first_nonfinite(&refs).unwrap();
                let gen = with_generic_ops(|| device::first_nonfinite(&refs)).unwrap();
                let expect = (!bad.is_finite()).then_some(at);
                assert_eq!(cpu, expect, "cpu {dt:?} bad {bad} at {at}");
                assert_eq!(gen, expect, "generic {dt:?} bad {bad} at {at}");
            }
        }
    }
}

/// `sum_squares` on the CPU (the path Metal shares) gives each tensor's
/// `Σ x²`, checked against an f64 sum over its stored values, in every
/// dtype, on shapes with negative entries (where `Σ |x|` or `Σ x` differ).
#[test]
fn sum_squares_on_the_cpu_matches_an_f64_sum() {
    let mut r = rng(11);
    let ts: Vec<Tensor> = ALL_DTYPES
        .iter()
        .flat_map(|&dt| UPDATE_SHAPES.iter().map(move |s| (s, dt)))
        .map(|(s, dt)| randn(&mut r, s, dt, &Device::Cpu))
        .collect();
    let refs: Vec<&Tensor> = ts.iter().collect();
    let got = device::sum_squares(&refs).unwrap();
    assert_eq!(got.len(), ts.len());
    for (t, s) in ts.iter().zip(&got) {
        let want: f64 = f64s(t).iter().map(|x| x * x).sum();
        assert!(
            (s - want).abs() <= 1e-5 * want.max(1e-30),
            "{:?} {:?}: {s} vs {want}",
            t.dims(),
            t.dtype()
        );
    }
    assert!(device::sum_squares(&[]).unwrap().is_empty());
}

/// A 16-bit parameter is rounded to the nearest value of its type (IEEE
/// round-to-nearest-even, `half`'s conversion from the exact f64 result), not
/// truncated, on both paths: `w = 1 − d` with `d` a fraction of one ulp at 1,
/// so that truncation and rounding land on different neighbours.
#[test]
fn sixteen_bit_parameters_round_to_the_nearest_value() {
    for (dt, ulp) in [(DType::BF16, 2f64.powi(-7)), (DType::F16, 2f64.powi(-10))] {
        let fracs = [0.75, 0.25, -0.75, -0.25, 0.5, 1.5];
        let d: Vec<f32> = fracs.iter().map(|f| (-f * ulp) as f32).collect();
        let want: Vec<f64> = fracs
            .iter()
            .map(|f| match dt {
                DType::BF16 => half::bf16::from_f64(1.0 + f * ulp).to_f64(),
                _ => half::f16::from_f64(1.0 + f * ulp).to_f64(),
            })
            .collect();
        assert_ne!(want[0], 1.0, "0.75 ulp up rounds up");
        let d = Tensor::from_vec(d, (1, fracs.len()), &Device::Cpu).unwrap();
        for generic in [false, true] {
            let w = Var::from_tensor(
                &Tensor::ones(fracs.len(), DType::F32, &Device::Cpu)
                    .unwrap()
                    .to_dtype(dt)
                    .unwrap(),
            )
            .unwrap();
            let run = || device::apply_step(&[&w], &d, &[1.0], &[DecayTerm::NONE]);
            if generic {
                with_generic_ops(run).unwrap();
            } else {
                run().unwrap();
            }
            let got = f64s(w.as_tensor());
            assert_eq!(got, want, "{dt:?} generic={generic}");
        }
    }
}

/// The generic path refuses an output that shares its storage with another
/// operand, as the CPU path and the kernels do, and changes nothing.
#[test]
fn generic_path_refuses_aliased_operands() {
    aliased_operands_are_refused_by(&Device::Cpu, |items| {
        with_generic_ops(|| device::adamw_step(items, 0.9, 0.999, 1e-8))
    });
}

/// `with_generic_ops` restores the dispatch when its closure returns or
/// panics, and nests. Observed through an AdamW step with rank-1 decay,
/// whose two paths round differently on this matrix (so the bits tell which
/// path ran).
#[test]
fn generic_dispatch_is_scoped() {
    let p = P::new(9, &[16, 16], DType::F32, DecayKind::Rank1);
    let step = |p: &P| device::adamw_step(&[p.adam(2, 0.9)], 0.9, 0.999, 1e-8).unwrap();
    let (cpu, after, generic, inner) = (p.copy(), p.copy(), p.copy(), p.copy());
    step(&cpu);
    with_generic_ops(|| step(&generic));
    assert_ne!(
        bits(cpu.w.as_tensor()),
        bits(generic.w.as_tensor()),
        "the two paths gave the same bits: this test cannot tell them apart"
    );
    assert_close(
        "generic adamw",
        generic.w.as_tensor(),
        cpu.w.as_tensor(),
        DType::F32,
        1.0,
    );
    // a panic inside, then a nested scope: afterwards the CPU path again
    let _ = std::panic::catch_unwind(|| with_generic_ops(|| panic!("inside")));
    with_generic_ops(|| {
        // leaving the inner scope keeps the outer one's setting
        with_generic_ops(|| ());
        step(&inner);
    });
    step(&after);
    assert_eq!(bits(after.w.as_tensor()), bits(cpu.w.as_tensor()));
    assert_eq!(bits(inner.w.as_tensor()), bits(generic.w.as_tensor()));
}

/// Every generic update refuses an output that shares storage with another
/// operand (here the parameter given again as momentum, gradient or
/// direction), before writing anything.
#[test]
fn every_generic_update_refuses_aliased_outputs() {
    let p = P::new(11, &[5, 4], DType::F32, DecayKind::None);
    let before = f64s(p.w.as_tensor());
    let refused = |what: &str, r: steepest::Result<()>| {
        let e = r.expect_err(what).to_string();
        assert!(e.contains("shares its storage"), "{what}: {e}");
        assert_eq!(f64s(p.w.as_tensor()), before, "{what}: w changed");
    };
    with_generic_ops(|| {
        let sgd = SgdItem {
            buf: Some(&p.w),
            ..p.sgd(true)
        };
        refused("sgd: buf = w", device::sgd_step(&[sgd], 0.9, false));
        let out = Var::zeros((1, 5, 4), DType::F32, &Device::Cpu).unwrap();
        refused(
            "ema: the gradient is the momentum buffer",
            device::ema_momentum(&[p.w.as_tensor()], &[&p.w], &out, 0.9, false),
        );
        let d = p.w.as_tensor().unsqueeze(0).unwrap();
        refused(
            "apply: d is a view of w",
            device::apply_step(&[&p.w], &d, &[0.1], &[DecayTerm::NONE]),
        );
    });
}

/// The CPU path's aliasing check also sees views of one empty storage
/// (whose address ranges are empty) and refuses them instead of locking
/// the storage twice; distinct empty tensors do not alias. Run on a thread
/// with a deadline: without the check, the step deadlocks on the storage's
/// lock, and the test must fail rather than hang.
#[test]
fn cpu_path_refuses_aliased_empty_tensors_and_takes_distinct_ones() {
    within_deadline(|| {
        let w = Var::zeros((0, 3), DType::F32, &Device::Cpu).unwrap();
        let g = Tensor::zeros((0, 3), DType::F32, &Device::Cpu).unwrap();
        let m = Var::zeros((0, 3), DType::F32, &Device::Cpu).unwrap();
        let v = Var::zeros((0, 3), DType::F32, &Device::Cpu).unwrap();
        let step = |m: &Var, v: &Var| {
            device::adamw_step(
                &[AdamItem {
                    w: &w,
                    g: &g,
                    m,
                    v,
                    step: AdamStep {
                        lr_bc1: 0.1,
                        bc2_sqrt: 0.1,
                    },
                    decay: DecayTerm::NONE,
                }],
                0.9,
                0.999,
                1e-8,
            )
        };
        step(&m, &v).expect("distinct empty tensors");
        let e = step(&m, &m).expect_err("m = v").to_string();
        assert!(e.contains("shares its storage"), "{e}");
    });
}

type Build = fn(&VarMap) -> Box<dyn support::Stepper>;
type Params = &'static [(&'static str, &'static [usize])];

/// The optimizers whose steps run through the seam, each with spectral
/// decay (power iteration, the rank-1 term) where it has one.
fn optimizers() -> Vec<(&'static str, Build, Params)> {
    const MATRICES: &[(&str, &[usize])] = &[
        ("fc1.weight", &[6, 4]),
        ("fc2.weight", &[6, 4]),
        ("wide.weight", &[3, 7]),
        ("row.weight", &[1, 5]),
    ];
    vec![
        (
            "adamw",
            |vm| Box::new(support::spectral_adamw(vm)),
            &support::PARAMS,
        ),
        (
            "sgd nesterov",
            |vm| {
                Box::new(
                    Sgd::from_varmap(
                        vm,
                        SgdConfig {
                            lr: 0.05,
                            momentum: 0.9,
                            nesterov: true,
                            weight_decay: WeightDecay::spectral(0.1),
                            ..Default::default()
                        },
                    )
                    .unwrap(),
                )
            },
            &support::PARAMS,
        ),
        (
            "sgd plain",
            |vm| {
                Box::new(
                    Sgd::from_varmap(
                        vm,
                        SgdConfig {
                            lr: 0.05,
                            weight_decay: WeightDecay::Decoupled(0.1),
                            ..Default::default()
                        },
                    )
                    .unwrap(),
                )
            },
            &support::PARAMS,
        ),
        (
            "muon",
            |vm| Box::new(support::spectral_muon(vm)),
            &support::PARAMS,
        ),
        (
            "steepest on the spectral sphere",
            |vm| {
                Box::new(
                    Steepest::from_varmap(
                        vm,
                        SteepestConfig {
                            lr: 0.05,
                            manifold: Manifold::SpectralSphere { radius: 2.0 },
                            ..Default::default()
                        },
                    )
                    .unwrap(),
                )
            },
            MATRICES,
        ),
    ]
}

/// Five steps of each optimizer on the generic path and on the CPU path:
/// parameters and every state tensor agree to f32 rounding, grown over the
/// steps (`msign` and the power iteration amplify a rounding difference by
/// a modest factor; a formula difference shows at the learning rate's
/// scale, 1e-3 or more).
#[test]
fn whole_optimizer_steps_generic_match_cpu() {
    for (name, build, params) in optimizers() {
        for dt in [DType::F32, DType::F64] {
            let run = |generic: bool| {
                let vm = support::model_of(params, dt, 0);
                let mut opt = build(&vm);
                for step in 0..5 {
                    let loss = support::loss_of(&vm, params, step);
                    if generic {
                        with_generic_ops(|| opt.step_loss(&loss)).unwrap();
                    } else {
                        opt.step_loss(&loss).unwrap();
                    }
                }
                (support::snapshot(&vm), support::state_tensors(&opt.state()))
            };
            let (w_cpu, s_cpu) = run(false);
            let (w_gen, s_gen) = run(true);
            let start = support::snapshot(&support::model_of(params, dt, 0));
            let tol = if dt == DType::F64 { 1e-10 } else { 1e-5 };
            for (k, c) in &w_cpu {
                assert_ne!(c, &start[k], "{name} {dt:?}: {k} never moved");
                let gap = max_gap(&w_gen[k], c);
                assert!(
                    gap <= tol,
                    "{name} {dt:?}: parameter {k}: gap {gap:e} > {tol:e}"
                );
            }
            assert_eq!(
                s_cpu.keys().collect::<std::collections::BTreeSet<_>>(),
                s_gen.keys().collect(),
                "{name} {dt:?}: state keys"
            );
            for (k, (dims, dtype, c)) in &s_cpu {
                let (gdims, gdtype, g) = &s_gen[k];
                assert_eq!((dims, dtype), (gdims, gdtype), "{name} {dt:?}: state {k}");
                let gap = max_gap(g, c);
                assert!(
                    gap <= tol,
                    "{name} {dt:?}: state {k}: gap {gap:e} > {tol:e}"
                );
            }
        }
    }
}

/// `max |a − b| / max(1, max |b|)`; +∞ when the lengths differ or a pair
/// differs in NaN-ness or infinity (`f64::max` drops a NaN: a path writing
/// NaN passed as agreeing).
fn max_gap(a: &[f64], b: &[f64]) -> f64 {
    if a.len() != b.len() {
        return f64::INFINITY;
    }
    let scale = b.iter().fold(1.0f64, |m, x| m.max(x.abs()));
    a.iter()
        .zip(b)
        .map(|(x, y)| common::nan_aware_diff(*x, *y))
        .fold(0.0, f64::max)
        / scale
}

/// A NaN gradient on the generic path (its finite check: `g − g` summed) is
/// refused with the parameter's name and changes no parameter and no state.
#[test]
fn a_nan_gradient_on_the_generic_path_changes_nothing() {
    for (name, build, params) in optimizers() {
        let vm = support::model_of(params, DType::F32, 0);
        let mut opt = build(&vm);
        for step in 0..2 {
            let loss = support::loss_of(&vm, params, step);
            with_generic_ops(|| opt.step_loss(&loss)).unwrap();
        }
        let (w0, s0) = (support::snapshot(&vm), support::state_tensors(&opt.state()));
        let bad = params[1].0;
        let grads = support::grads_with(&vm, params, 2, bad, f64::NAN);
        let err = with_generic_ops(|| opt.step_grads(&grads));
        let err = err.expect_err(name).to_string();
        assert!(
            err.contains(bad),
            "{name}: the error does not name {bad}: {err}"
        );
        assert_eq!(support::snapshot(&vm), w0, "{name}: a parameter changed");
        assert_eq!(
            support::state_tensors(&opt.state()),
            s0,
            "{name}: state changed"
        );
    }
}

/// Metal has no f64: candle 0.11's Metal backend refuses every cast to or
/// from f64, so a device tensor read as f64 (`to_dtype(F64)`, `to_vec1::<f64>`)
/// or built from f64 values on the device failed clipping, the penalties,
/// the norms' scalars and power iteration's start vector there. Outside the
/// CPU-only files, such reads go through `device::host` (f64 on the CPU and
/// CUDA, f32 on Metal); this keeps them there, and keeps tensors built from
/// host values (`Tensor::new`, `from_vec`, `from_slice`) on `Device::Cpu`
/// (unless their values are spelled as another type, `1f32`)
/// outside `device::host::upload_f64` and the data-parallel code (whose
/// payloads are f32 or bf16, and which runs on CUDA or the CPU). (No Metal
/// machine runs the tests: this is the check that can run here.)
#[test]
fn no_f64_on_the_device_outside_the_host_helpers() {
    let cpu_only = [
        "src/device/host.rs",
        "src/device/cpu.rs",
        "src/device/emu.rs",
        "src/linalg/power_cpu.rs",
        "src/linalg/msign_cpu.rs",
    ];
    let banned = [
        "to_dtype(DType::F64)",
        "to_dtype(candle_core::DType::F64)",
        "to_vec0::<f64>()",
        "to_vec1::<f64>()",
        "to_vec2::<f64>()",
        "to_vec3::<f64>()",
        "to_scalar::<f64>()",
    ];
    let builders = ["Tensor::new(", "Tensor::from_vec(", "Tensor::from_slice("];
    /// The text of the call whose opening parenthesis ends `text[..open]`.
    fn call_args(text: &str, open: usize) -> &str {
        let mut depth = 0usize;
        for (i, c) in text[open - 1..].char_indices() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        return &text[open..open - 1 + i];
                    }
                }
                _ => {}
            }
        }
        &text[open..]
    }
    fn rust_files(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                rust_files(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    assert!(files.len() > 20, "{files:?}");
    let mut found = Vec::new();
    for f in &files {
        let rel = f
            .strip_prefix(root)
            .unwrap()
            .to_string_lossy()
            .replace('\\', "/");
        if cpu_only.contains(&rel.as_str()) {
            continue;
        }
        let text = std::fs::read_to_string(f).unwrap();
        for (i, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap();
            if banned.iter().any(|b| code.contains(b)) {
                found.push(format!("{rel}:{}: {}", i + 1, line.trim()));
            }
        }
        if rel.starts_with("src/distributed/") {
            continue;
        }
        for b in builders {
            for (at, _) in text.match_indices(b) {
                let line_start = text[..at].rfind('\n').map_or(0, |k| k + 1);
                if text[line_start..at].contains("//") {
                    continue;
                }
                let args = call_args(&text, at + b.len());
                // (or whose values are spelled as another type: `1f32`)
                let typed = ["f32", "u32", "u8", "bf16", "f16"]
                    .iter()
                    .any(|t| args.contains(t));
                if !args.contains("Device::Cpu") && !typed {
                    let line = text[..at].matches('\n').count() + 1;
                    found.push(format!(
                        "{rel}:{line}: {b}{}…) not on Device::Cpu",
                        args.lines().next().unwrap_or("")
                    ));
                }
            }
        }
    }
    assert!(found.is_empty(), "f64 on the device:\n{}", found.join("\n"));
}
