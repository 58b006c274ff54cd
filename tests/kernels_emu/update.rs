//! The fused multi-tensor update kernels (`kernels/update.cu`) under the
//! emulator against the CPU path (`steepest::device::*` on CPU tensors,
//! i.e. `src/device/cpu.rs`). Both do the same f32 operations in the same
//! order without FMA contraction, so parameters and state must agree bit
//! for bit — any difference is a bug, no tolerance.
//!
//! The reference runs one parameter per call, or a batch of one dtype: the
//! seam takes the CPU path for a group of one dtype only (mixed groups go
//! through candle's generic ops, which would test those instead), while the
//! kernels get the whole mixed set in one call.

use candle_core::{DType, Device, Tensor, Var};
use steepest::device::{self, emu, AdamItem, DecayTerm, SgdItem};

use super::cases::*;

/// One parameter with everything any family needs (`cases::Member`).
type P = Member;

/// Parameter and both state tensors bit for bit equal.
fn assert_same(p: &P, other: &P, what: &str) {
    assert_same_bits(&format!("{what}: w"), p.w.as_tensor(), other.w.as_tensor());
    assert_same_bits(
        &format!("{what}: state 1"),
        p.s1.as_tensor(),
        other.s1.as_tensor(),
    );
    assert_same_bits(
        &format!("{what}: state 2"),
        p.s2.as_tensor(),
        other.s2.as_tensor(),
    );
}

/// The parameter of case `i`: shape `i`, dtype and decay cycling.
fn case(i: usize, dtype: DType) -> P {
    case_with(i, dtype, DECAYS[i % DECAYS.len()])
}

/// The parameter of case `i` (shape `i`) with this dtype and decay.
fn case_with(i: usize, dtype: DType, decay: DecayKind) -> P {
    let shape = UPDATE_SHAPES[i % UPDATE_SHAPES.len()];
    P::new(100 + i as u64, shape, dtype, decay)
}

fn check_adamw(ps: &[P], what: &str) {
    let qs: Vec<P> = ps.iter().map(P::copy).collect();
    for p in ps {
        device::adamw_step(&[p.adam(3, 0.9)], 0.9, 0.999, 1e-8).unwrap();
    }
    let kern: Vec<AdamItem<'_>> = qs.iter().map(|p| p.adam(3, 0.9)).collect();
    emu::adamw_step(&kern, 0.9, 0.999, 1e-8).unwrap();
    for (i, (p, q)) in ps.iter().zip(&qs).enumerate() {
        assert_same(
            p,
            q,
            &format!("{what} [{i}] {:?} {:?}", p.w.dtype(), p.w.dims()),
        );
    }
}

fn check_sgd(ps: &[P], momentum: bool, mu: f64, nesterov: bool, what: &str) {
    let qs: Vec<P> = ps.iter().map(P::copy).collect();
    let cpu: Vec<SgdItem<'_>> = ps.iter().map(|p| p.sgd(momentum)).collect();
    let kern: Vec<SgdItem<'_>> = qs.iter().map(|p| p.sgd(momentum)).collect();
    for it in &cpu {
        device::sgd_step(std::slice::from_ref(it), mu, nesterov).unwrap();
    }
    emu::sgd_step(&kern, mu, nesterov).unwrap();
    for (i, (p, q)) in ps.iter().zip(&qs).enumerate() {
        assert_same(
            p,
            q,
            &format!("{what} [{i}] {:?} {:?}", p.w.dtype(), p.w.dims()),
        );
    }
}

/// A batch of same-shape members (one per dtype) for the batched families.
fn batch(i: usize) -> Vec<P> {
    DTYPES.iter().map(|&dt| case(i, dt)).collect()
}

/// Muon's momentum over the batch `ps` (one shape): the kernels take the
/// whole batch in one call. The CPU path takes a call whose gradients share
/// one dtype, so a batch of one dtype is one call there too (its
/// multi-tensor loop) and a mixed batch one call per member (as one call it
/// would go through candle's generic ops instead).
fn check_ema(ps: &[P], mu: f64, nesterov: bool, what: &str) {
    let qs: Vec<P> = ps.iter().map(P::copy).collect();
    let mut dims = vec![ps.len()];
    dims.extend_from_slice(ps[0].w.dims());
    let ema_cpu = |ps: &[P]| {
        let mut dims = dims.clone();
        dims[0] = ps.len();
        let out = Var::zeros(dims.as_slice(), DType::F32, &Device::Cpu).unwrap();
        let gs: Vec<&Tensor> = ps.iter().map(|p| &p.g).collect();
        let bs: Vec<&Var> = ps.iter().map(|p| &p.s1).collect();
        device::ema_momentum(&gs, &bs, &out, mu, nesterov).unwrap();
        out.as_tensor().clone()
    };
    let o1 = if ps.iter().all(|p| p.g.dtype() == ps[0].g.dtype()) {
        ema_cpu(ps)
    } else {
        let rows: Vec<Tensor> = ps.chunks(1).map(ema_cpu).collect();
        Tensor::cat(&rows, 0).unwrap()
    };
    let o2 = Var::zeros(dims.as_slice(), DType::F32, &Device::Cpu).unwrap();
    let g2: Vec<&Tensor> = qs.iter().map(|p| &p.g).collect();
    let b2: Vec<&Var> = qs.iter().map(|p| &p.s1).collect();
    emu::ema_momentum(&g2, &b2, &o2, mu, nesterov).unwrap();
    assert_same_bits(&format!("{what}: direction"), &o1, o2.as_tensor());
    for (p, q) in ps.iter().zip(&qs) {
        assert_same(p, q, what);
    }
}

fn check_apply(ps: &[P], what: &str) {
    let qs: Vec<P> = ps.iter().map(P::copy).collect();
    let mut r = rng(7);
    let mut dims = vec![ps.len()];
    dims.extend_from_slice(ps[0].w.dims());
    let d = randn(&mut r, &dims, DType::F32, &Device::Cpu);
    let alphas: Vec<f64> = (0..ps.len()).map(|i| 0.02 * (i + 1) as f64).collect();
    let w2: Vec<&Var> = qs.iter().map(|p| &p.w).collect();
    let d2: Vec<DecayTerm<'_>> = qs.iter().map(P::decay).collect();
    for (i, p) in ps.iter().enumerate() {
        let di = d.narrow(0, i, 1).unwrap();
        device::apply_step(&[&p.w], &di, &alphas[i..=i], &[p.decay()]).unwrap();
    }
    emu::apply_step(&w2, &d, &alphas, &d2).unwrap();
    for (p, q) in ps.iter().zip(&qs) {
        assert_same(p, q, what);
    }
}

/// Every shape × dtype × decay (none, decoupled, rank-1: the spectral
/// decay's term, whose row and column the kernels carry along each thread's
/// stride).
#[test]
fn adamw_matches_cpu_on_every_shape_and_dtype() {
    for i in 0..UPDATE_SHAPES.len() {
        for &dt in DTYPES {
            for &dk in DECAYS {
                check_adamw(&[case_with(i, dt, dk)], "adamw");
            }
        }
    }
}

/// Every shape × dtype × decay, as AdamW.
#[test]
fn sgd_matches_cpu_on_every_shape_and_dtype() {
    for i in 0..UPDATE_SHAPES.len() {
        for &dt in DTYPES {
            for &dk in DECAYS {
                // plain, heavy-ball and Nesterov, cycling with the case
                let (momentum, nesterov) = [(false, false), (true, false), (true, true)][i % 3];
                check_sgd(&[case_with(i, dt, dk)], momentum, 0.9, nesterov, "sgd");
            }
        }
    }
}

#[test]
fn ema_momentum_matches_cpu_on_every_shape() {
    for i in 0..UPDATE_SHAPES.len() {
        check_ema(&batch(i), 0.95, i % 2 == 0, "ema");
    }
}

/// Every shape, under each decay (a batch of the three dtypes).
#[test]
fn apply_matches_cpu_on_every_shape() {
    for i in 0..UPDATE_SHAPES.len() {
        for &dk in DECAYS {
            let ps: Vec<P> = DTYPES.iter().map(|&dt| case_with(i, dt, dk)).collect();
            check_apply(&ps, "apply");
        }
    }
}

/// All shapes, the three dtypes and the three decays in one call: one
/// launch per dtype over a table of 63 tensors.
#[test]
fn multi_tensor_update_over_a_mixed_set() {
    let ps: Vec<P> = (0..UPDATE_SHAPES.len() * 3)
        .map(|i| case(i % UPDATE_SHAPES.len(), DTYPES[(i / 7) % 3]))
        .collect();
    check_adamw(&ps, "adamw mixed");
    let ps: Vec<P> = (0..UPDATE_SHAPES.len() * 3)
        .map(|i| case(i % UPDATE_SHAPES.len(), DTYPES[(i / 5) % 3]))
        .collect();
    check_sgd(&ps, true, 0.9, true, "sgd mixed");
}

/// With the grid capped below the number of chunks (`emu::with_grid_cap`),
/// each block walks several chunks of several tensors, as on a GPU past
/// 4096 chunks: still the CPU's bits, for every update family.
#[test]
fn grid_stride_loops_give_the_cpu_bits() {
    // [2, 4097], [4097, 2], [100, 301] and [4097]: 2–8 chunks each.
    let multi = [16, 17, 18, 8];
    for cap in [1, 3] {
        emu::with_grid_cap(cap, || {
            let what = |f: &str| format!("{f}, grid capped at {cap}");
            let ps: Vec<P> = (0..12).map(|i| case(multi[i % 4], DTYPES[i % 3])).collect();
            check_adamw(&ps, &what("adamw"));
            check_sgd(&ps, true, 0.9, true, &what("sgd"));
            for &i in &multi {
                check_ema(&batch(i), 0.95, true, &what("ema"));
                let ps: Vec<P> = DTYPES
                    .iter()
                    .map(|&dt| case_with(i, dt, DecayKind::Rank1))
                    .collect();
                check_apply(&ps, &what("apply"));
            }
        });
    }
}

/// A second step on the same state (moments no longer what the first step
/// found): still the CPU's bits.
#[test]
fn adamw_two_steps() {
    let ps: Vec<P> = (0..6).map(|i| case(i * 3 + 1, DTYPES[i % 3])).collect();
    let qs: Vec<P> = ps.iter().map(P::copy).collect();
    for t in 1..=2 {
        for p in &ps {
            device::adamw_step(&[p.adam(t, 0.9)], 0.9, 0.999, 1e-8).unwrap();
        }
        let kern: Vec<AdamItem<'_>> = qs.iter().map(|p| p.adam(t, 0.9)).collect();
        emu::adamw_step(&kern, 0.9, 0.999, 1e-8).unwrap();
    }
    for (p, q) in ps.iter().zip(&qs) {
        assert_same(p, q, "adamw step 2");
    }
}

/// bf16 and f16 conversions of the emulator against `half`: every 16-bit
/// pattern widened (through `ema_*` with μ = 0, out = g exactly), and f32
/// values rounded (through `apply_*` on a zero parameter with α = −1, w = d).
#[test]
fn emulator_16_bit_conversions_match_half() {
    let dev = Device::Cpu;
    for dt in [DType::BF16, DType::F16] {
        let pats: Vec<u16> = (0..=u16::MAX).collect();
        let g = match dt {
            DType::BF16 => Tensor::from_vec(
                pats.iter()
                    .map(|&b| half::bf16::from_bits(b))
                    .collect::<Vec<_>>(),
                pats.len(),
                &dev,
            ),
            _ => Tensor::from_vec(
                pats.iter()
                    .map(|&b| half::f16::from_bits(b))
                    .collect::<Vec<_>>(),
                pats.len(),
                &dev,
            ),
        }
        .unwrap();
        let buf = Var::zeros(pats.len(), DType::F32, &dev).unwrap();
        let out = Var::zeros((1, pats.len()), DType::F32, &dev).unwrap();
        emu::ema_momentum(&[&g], &[&buf], &out, 0.0, false).unwrap();
        let got = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        for (&b, &x) in pats.iter().zip(&got) {
            // out = 0 + (g − 0)·1 = g exactly, except −0 → +0
            let want = match dt {
                DType::BF16 => half::bf16::from_bits(b).to_f32(),
                _ => half::f16::from_bits(b).to_f32(),
            } + 0.0;
            assert!(
                x.to_bits() == want.to_bits() || (x.is_nan() && want.is_nan()),
                "{dt:?} {b:#06x}: {x} vs {want}"
            );
        }
        // f32 → 16 bits: edges, every rounding boundary region, random bits.
        let mut r = rng(11);
        let mut vals: Vec<f32> = vec![
            0.0,
            -0.0,
            1.0,
            65504.0,
            65519.99,
            65520.0,
            -65520.0,
            6.1035156e-5,
            5.9604645e-8,
            2.9802322e-8,
            2.9802326e-8,
            1.0e-40,
            f32::MAX,
            f32::MIN_POSITIVE,
            f32::INFINITY,
            f32::NEG_INFINITY,
            3.3895314e38,
            3.4028235e38,
        ];
        for b in 0..=u16::MAX as u32 {
            // the exact midpoints between consecutive bf16 values, and around them
            let mid = (b << 16) | 0x8000;
            vals.extend([
                f32::from_bits(mid),
                f32::from_bits(mid + 1),
                f32::from_bits(mid - 1),
            ]);
        }
        vals.extend((0..200_000).map(|_| f32::from_bits(rand::Rng::gen::<u32>(&mut r))));
        let vals: Vec<f32> = vals.into_iter().filter(|v| !v.is_nan()).collect();
        let n = vals.len();
        let w = Var::zeros((1, n), dt, &dev).unwrap();
        let d = Tensor::from_vec(vals.clone(), (1, n), &dev).unwrap();
        emu::apply_step(&[&w], &d, &[-1.0], &[DecayTerm::NONE]).unwrap();
        let got: Vec<u16> = match dt {
            DType::BF16 => w
                .flatten_all()
                .unwrap()
                .to_vec1::<half::bf16>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect(),
            _ => w
                .flatten_all()
                .unwrap()
                .to_vec1::<half::f16>()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect(),
        };
        for (v, g) in vals.iter().zip(&got) {
            // w = 0·1 − d·(−1) = d exactly, except −0 → +0
            let v = if *v == 0.0 { 0.0 } else { *v };
            let want = match dt {
                DType::BF16 => half::bf16::from_f32(v).to_bits(),
                _ => half::f16::from_f32(v).to_bits(),
            };
            assert_eq!(*g, want, "{dt:?} from {v:e} ({:#010x})", v.to_bits());
        }
    }
}

/// An output that shares storage with another operand is refused, with
/// nothing changed, by the CPU path and by the kernels (the GPU test does the
/// same on CUDA tensors).
///
/// A regression here would take one storage's lock twice and deadlock, so
/// the cases run on a thread with a deadline: the test fails, CI goes on.
#[test]
fn aliased_operands_are_refused() {
    within_deadline(|| {
        let cpu = Device::Cpu;
        aliased_operands_are_refused_by(&cpu, |items| device::adamw_step(items, 0.9, 0.999, 1e-8));
        aliased_operands_are_refused_by(&cpu, |items| emu::adamw_step(items, 0.9, 0.999, 1e-8));
    });
}

/// Two outputs that are one empty storage (an empty parameter listed twice)
/// are refused too: their byte ranges are empty and overlap nothing, so only
/// the storage's identity tells them apart, and locking one storage twice
/// would deadlock. Run on a thread with a deadline, so that a regression
/// fails instead of hanging.
#[test]
fn an_empty_output_listed_twice_is_refused() {
    let res = within_deadline(|| {
        let w = Var::zeros((0, 3), DType::F32, &Device::Cpu).unwrap();
        let d = Tensor::zeros((2, 0, 3), DType::F32, &Device::Cpu).unwrap();
        device::apply_step(
            &[&w, &w],
            &d,
            &[0.1, 0.1],
            &[DecayTerm::NONE, DecayTerm::NONE],
        )
        .map_err(|e| e.to_string())
    });
    let e = res.expect_err("an output listed twice");
    assert!(e.contains("shares its storage"), "{e}");
}

/// Tensors large enough (≥ 2¹⁷ elements in one call) for the CPU path to
/// split them into spans across the thread pool still give the kernels'
/// bits: a (301, 500) parameter, so that under a rank-1 decay the spans are
/// whole rows (66 rows of 500, not the bare 2¹⁵-element span) and the last
/// span is shorter than the others. AdamW, SGD with Nesterov momentum and
/// apply under each decay, f32 and bf16; Muon's momentum over two members.
#[test]
fn large_tensors_split_across_threads_match_the_kernels() {
    let shape: &[usize] = &[301, 500];
    for (i, &decay) in DECAYS.iter().enumerate() {
        let dt = DTYPES[i % 2];
        let ps = [P::new(900 + i as u64, shape, dt, decay)];
        check_adamw(&ps, "adamw, large");
        check_sgd(&ps, true, 0.9, true, "sgd, large");
        check_apply(&ps, "apply, large");
    }
    let ps: Vec<P> = (0..2)
        .map(|i| P::new(910 + i, shape, DType::F32, DecayKind::None))
        .collect();
    check_ema(&ps, 0.95, true, "ema, large");
}

/// A direction (apply) or an output (Muon's momentum) whose members are not
/// the parameters' size is refused as a shape error, nothing written — too
/// long as well as too short — by the kernels' launch code and by the CPU
/// path (which used the first elements of a too-long row and panicked on a
/// too-short one): the table, or the split, would otherwise read or write
/// the wrong elements silently.
#[test]
fn a_direction_or_output_of_the_wrong_size_is_refused() {
    type Apply = fn(&[&Var], &Tensor, &[f64], &[DecayTerm<'_>]) -> steepest::Result<()>;
    type Ema = fn(&[&Tensor], &[&Var], &Var, f64, bool) -> steepest::Result<()>;
    let paths: [(&str, Apply, Ema); 2] = [
        ("kernels", emu::apply_step, emu::ema_momentum),
        ("cpu", device::apply_step, device::ema_momentum),
    ];
    let dev = Device::Cpu;
    for (path, apply, ema) in paths {
        let w = Var::zeros((2, 3), DType::F32, &dev).unwrap();
        for len in [5usize, 7] {
            let d = Tensor::ones((1, len), DType::F32, &dev).unwrap();
            let e = apply(&[&w], &d, &[1.0], &[DecayTerm::NONE]).unwrap_err();
            assert!(
                matches!(e, steepest::Error::Shape { .. }),
                "{path} {len}: {e}"
            );
            assert_eq!(max_abs(w.as_tensor()), 0.0, "{path} {len}: written");
        }
        let g = Tensor::ones((2, 3), DType::F32, &dev).unwrap();
        let buf = Var::zeros((2, 3), DType::F32, &dev).unwrap();
        for len in [5usize, 7] {
            let out = Var::zeros((1, len), DType::F32, &dev).unwrap();
            let e = ema(&[&g], &[&buf], &out, 0.9, false).unwrap_err();
            assert!(
                matches!(e, steepest::Error::Shape { .. }),
                "{path} {len}: {e}"
            );
            assert_eq!(max_abs(buf.as_tensor()), 0.0, "{path} {len}: written");
        }
    }
}

type AdamFn = fn(&[AdamItem<'_>], f64, f64, f64) -> steepest::Result<()>;
type SgdFn = fn(&[SgdItem<'_>], f64, bool) -> steepest::Result<()>;

fn generic_adam(items: &[AdamItem<'_>], b1: f64, b2: f64, e: f64) -> steepest::Result<()> {
    device::with_generic_ops(|| device::adamw_step(items, b1, b2, e))
}

fn generic_sgd(items: &[SgdItem<'_>], mu: f64, nesterov: bool) -> steepest::Result<()> {
    device::with_generic_ops(|| device::sgd_step(items, mu, nesterov))
}

/// AdamW and SGD on the kernels (emulated), the CPU path and the generic
/// path.
fn update_paths() -> [(&'static str, AdamFn, SgdFn); 3] {
    [
        ("kernels", emu::adamw_step, emu::sgd_step),
        ("cpu", device::adamw_step, device::sgd_step),
        ("generic", generic_adam, generic_sgd),
    ]
}

/// AdamW's and SGD's state and spectral-decay factors of the wrong size are
/// Shape errors naming the item and the tensor, on the kernels, the CPU
/// path and the generic path, and nothing is written: the fused paths size
/// every slice by the gradient, so a short `m`, `v` or momentum buffer was
/// written past its end (the kernels and the CPU path's raw spans), and
/// rank-1 factors that do not span the matrix view were read past theirs.
#[test]
fn a_state_or_decay_factor_of_the_wrong_size_is_refused() {
    /// Shapes of the gradient, m, v and the buffer; rank-1 `b`; what the
    /// error names.
    type Case<'a> = (
        &'a [usize],
        &'a [usize],
        &'a [usize],
        &'a [usize],
        &'a Tensor,
        &'a str,
    );
    let paths = update_paths();
    let dev = Device::Cpu;
    let f32s = |shape: &[usize]| Tensor::ones(shape, DType::F32, &dev).unwrap();
    let vars = |shape: &[usize]| Var::ones(shape, DType::F32, &dev).unwrap();
    let unchanged = |what: &str, vs: &[&Var]| {
        for v in vs {
            let t = v.as_tensor();
            assert_eq!(
                max_diff(t, &t.ones_like().unwrap()),
                0.0,
                "{what}: a tensor was written"
            );
        }
    };
    let step = steepest::device::AdamStep {
        lr_bc1: 0.1,
        bc2_sqrt: 1.0,
    };
    let (a_ok, b_ok, b_bad) = (f32s(&[4]), f32s(&[6]), f32s(&[5]));
    fn rank1<'a>(a: &'a Tensor, b: &'a Tensor) -> device::Rank1<'a> {
        device::Rank1 { coeff: 0.1, a, b }
    }
    for (path, adam, sgd) in paths {
        let cases: [Case<'_>; 6] = [
            (&[4, 7], &[4, 6], &[4, 6], &[4, 6], &b_ok, "the gradient"),
            (&[4, 5], &[4, 6], &[4, 6], &[4, 6], &b_ok, "the gradient"),
            (&[4, 6], &[4, 5], &[4, 6], &[4, 5], &b_ok, "exp_avg"),
            (&[4, 6], &[4, 6], &[3, 6], &[3, 6], &b_ok, "exp_avg_sq"),
            (&[4, 6], &[4, 6], &[4, 6], &[4, 6], &b_bad, "spectral decay"),
            (&[24], &[24], &[24], &[24], &b_bad, "spectral decay"),
        ];
        for (k, &(g, m, v, buf, b, names)) in cases.iter().enumerate() {
            let what = format!("{path} case {k}");
            // A well-formed first item, so that the bad one is item 1.
            let (w0, m0, v0) = (vars(&[2, 3]), vars(&[2, 3]), vars(&[2, 3]));
            let (w, mv, vv, bv) = (vars(&[4, 6]), vars(m), vars(v), vars(buf));
            let (g0, g) = (f32s(&[2, 3]), f32s(g));
            let decay = DecayTerm {
                scale: 1.0,
                rank1: Some(rank1(&a_ok, b)),
            };
            let e = adam(
                &[
                    AdamItem {
                        w: &w0,
                        g: &g0,
                        m: &m0,
                        v: &v0,
                        step,
                        decay: DecayTerm::NONE,
                    },
                    AdamItem {
                        w: &w,
                        g: &g,
                        m: &mv,
                        v: &vv,
                        step,
                        decay,
                    },
                ],
                0.9,
                0.999,
                1e-8,
            )
            .unwrap_err();
            let msg = e.to_string();
            assert!(matches!(e, steepest::Error::Shape { .. }), "{what}: {msg}");
            assert!(
                msg.contains("adamw_step") && msg.contains("item 1") && msg.contains(names),
                "{what}: {msg}"
            );
            unchanged(&format!("{what} adamw"), &[&w0, &m0, &v0, &w, &mv, &vv]);
            // SGD: the buffer takes exp_avg's place (the v cases reuse it).
            if names == "exp_avg_sq" {
                continue;
            }
            let e = sgd(
                &[
                    SgdItem {
                        w: &w0,
                        g: &g0,
                        buf: Some(&m0),
                        lr: 0.1,
                        decay: DecayTerm::NONE,
                    },
                    SgdItem {
                        w: &w,
                        g: &g,
                        buf: Some(&bv),
                        lr: 0.1,
                        decay,
                    },
                ],
                0.9,
                false,
            )
            .unwrap_err();
            let msg = e.to_string();
            let names = if names == "exp_avg" {
                "the momentum buffer"
            } else {
                names
            };
            assert!(matches!(e, steepest::Error::Shape { .. }), "{what}: {msg}");
            assert!(
                msg.contains("sgd_step") && msg.contains("item 1") && msg.contains(names),
                "{what}: {msg}"
            );
            unchanged(&format!("{what} sgd"), &[&w0, &m0, &w, &bv]);
        }
    }
}

/// apply_step with rank-1 factors that do not span the parameter: a Shape
/// error on the kernels and the CPU path, nothing written.
#[test]
fn apply_step_refuses_decay_factors_of_the_wrong_size() {
    type Apply = fn(&[&Var], &Tensor, &[f64], &[DecayTerm<'_>]) -> steepest::Result<()>;
    let paths: [(&str, Apply); 2] = [("kernels", emu::apply_step), ("cpu", device::apply_step)];
    let dev = Device::Cpu;
    let (a, b) = (
        Tensor::ones(4, DType::F32, &dev).unwrap(),
        Tensor::ones(5, DType::F32, &dev).unwrap(),
    );
    for (path, apply) in paths {
        let w = Var::zeros((4, 6), DType::F32, &dev).unwrap();
        let d = Tensor::ones((1, 24), DType::F32, &dev).unwrap();
        let decay = DecayTerm {
            scale: 1.0,
            rank1: Some(device::Rank1 {
                coeff: 0.1,
                a: &a,
                b: &b,
            }),
        };
        let e = apply(&[&w], &d, &[1.0], &[decay]).unwrap_err();
        assert!(
            matches!(e, steepest::Error::Shape { .. }) && e.to_string().contains("spectral decay"),
            "{path}: {e}"
        );
        assert_eq!(max_abs(w.as_tensor()), 0.0, "{path}: written");
    }
}

/// The CPU slice functions (`device::cpu::*_multi`, public) panic on slices
/// of different lengths instead of writing past the shorter one.
#[test]
fn cpu_slice_updates_panic_on_slices_of_different_lengths() {
    use steepest::device::cpu;
    let caught = |what: &str, f: &mut dyn FnMut()| {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        let e = r.expect_err(what);
        let msg = e.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(msg.contains("elements"), "{what}: {msg}");
    };
    let g = vec![1f32; 8];
    let step = device::AdamStep {
        lr_bc1: 0.1,
        bc2_sqrt: 1.0,
    };
    let (mut w, mut m, mut v) = (vec![0f32; 8], vec![0f32; 3], vec![0f32; 8]);
    caught("adamw m", &mut || {
        cpu::adamw(
            &mut w,
            &g,
            &mut m,
            &mut v,
            0.9,
            0.999,
            1e-8,
            step,
            cpu::Decay::none(),
        )
    });
    let mut buf = vec![0f32; 3];
    caught("sgd buffer", &mut || {
        cpu::sgd(
            &mut w,
            &g,
            Some(&mut buf),
            0.9,
            false,
            0.1,
            cpu::Decay::none(),
        )
    });
    let mut out = vec![0f32; 3];
    let mut b8 = vec![0f32; 8];
    caught("ema out", &mut || {
        cpu::ema_momentum(&g, &mut b8, &mut out, 0.9, false)
    });
    let mut short_w = vec![0f32; 3];
    caught("apply w", &mut || {
        cpu::apply(&mut short_w, &g, 1.0, cpu::Decay::none())
    });
    let (ra, rb) = (vec![1f32; 2], vec![1f32; 3]);
    let decay = cpu::Decay {
        scale: 1.0,
        rank1: Some((0.1, &ra[..], &rb[..])),
    };
    caught("apply rank-1", &mut || cpu::apply(&mut w, &g, 1.0, decay));
    assert!(w.iter().all(|&x| x == 0.0), "w written");
}

/// A gradient in another dtype than its parameter is a Shape error on every
/// path (the kernels read it with the parameter's element type: a bf16
/// gradient of an f32 parameter was read past its end, an f64 one as
/// garbage), and nothing is written.
#[test]
fn a_gradient_of_another_dtype_is_refused() {
    let paths = update_paths();
    let dev = Device::Cpu;
    for (path, adam, sgd) in paths {
        for (wt, gt) in [
            (DType::F32, DType::BF16),
            (DType::F32, DType::F64),
            (DType::BF16, DType::F16),
        ] {
            let what = format!("{path}: {gt:?} gradient, {wt:?} parameter");
            let w = Var::zeros(4096, wt, &dev).unwrap();
            let (m, v) = (
                Var::zeros(4096, DType::F32, &dev).unwrap(),
                Var::zeros(4096, DType::F32, &dev).unwrap(),
            );
            let g = Tensor::ones(4096, gt, &dev).unwrap();
            let item = AdamItem {
                w: &w,
                g: &g,
                m: &m,
                v: &v,
                step: device::AdamStep {
                    lr_bc1: 0.1,
                    bc2_sqrt: 1.0,
                },
                decay: DecayTerm::NONE,
            };
            let e = adam(&[item], 0.9, 0.999, 1e-8).unwrap_err();
            assert!(
                matches!(e, steepest::Error::Shape { .. })
                    && e.to_string().contains("adamw_step")
                    && e.to_string().contains("gradient"),
                "{what}: {e}"
            );
            let sgd_item = SgdItem {
                w: &w,
                g: &g,
                buf: Some(&m),
                lr: 0.1,
                decay: DecayTerm::NONE,
            };
            let e = sgd(&[sgd_item], 0.9, false).unwrap_err();
            assert!(
                matches!(e, steepest::Error::Shape { .. }) && e.to_string().contains("sgd_step"),
                "{what}: {e}"
            );
            for t in [w.as_tensor(), m.as_tensor(), v.as_tensor()] {
                assert_eq!(max_abs(t), 0.0, "{what}: written");
            }
        }
    }
}

/// Muon's momentum over no members at all is nothing to do on every path
/// (the CPU path read the first gradient's dtype while holding the output's
/// lock, panicked, and left the output unusable).
#[test]
fn ema_momentum_of_no_members_is_a_no_op() {
    type Ema = fn(&[&Tensor], &[&Var], &Var, f64, bool) -> steepest::Result<()>;
    let paths: [(&str, Ema); 2] = [
        ("kernels", emu::ema_momentum),
        ("cpu", device::ema_momentum),
    ];
    for (path, ema) in paths {
        let out = Var::zeros((0, 4), DType::F32, &Device::Cpu).unwrap();
        ema(&[], &[], &out, 0.9, false).unwrap_or_else(|e| panic!("{path}: {e}"));
        assert_eq!(out.dims(), &[0, 4], "{path}");
        out.set(&Tensor::zeros((0, 4), DType::F32, &Device::Cpu).unwrap())
            .unwrap();
    }
}

/// A non-contiguous gradient (a transposed view) is read as its contiguous
/// copy on every path: AdamW and SGD give the same bits as with the copy on
/// the CPU path, the kernels and the generic path (the CPU path refused it:
/// "in-place kernels need a contiguous tensor", while the kernels copied
/// it).
#[test]
fn a_non_contiguous_gradient_is_read_as_its_copy() {
    let paths = update_paths();
    let dev = Device::Cpu;
    let mut r = rng(91);
    let w0 = randn(&mut r, &[5, 7], DType::F32, &dev);
    let gt = randn(&mut r, &[7, 5], DType::F32, &dev).t().unwrap();
    assert!(!gt.is_contiguous());
    let gc = gt.contiguous().unwrap();
    let step = device::AdamStep {
        lr_bc1: 0.1,
        bc2_sqrt: 0.5,
    };
    for (path, adam, sgd) in paths {
        let run = |g: &Tensor| {
            let w = Var::from_tensor(&w0).unwrap();
            let m = Var::zeros((5, 7), DType::F32, &dev).unwrap();
            let v = Var::zeros((5, 7), DType::F32, &dev).unwrap();
            let item = AdamItem {
                w: &w,
                g,
                m: &m,
                v: &v,
                step,
                decay: DecayTerm::NONE,
            };
            adam(&[item], 0.9, 0.999, 1e-8).unwrap_or_else(|e| panic!("{path}: {e}"));
            let ws = Var::from_tensor(&w0).unwrap();
            let buf = Var::zeros((5, 7), DType::F32, &dev).unwrap();
            let item = SgdItem {
                w: &ws,
                g,
                buf: Some(&buf),
                lr: 0.1,
                decay: DecayTerm::NONE,
            };
            sgd(&[item], 0.9, true).unwrap_or_else(|e| panic!("{path}: {e}"));
            (w, m, ws, buf)
        };
        let (a, b) = (run(&gt), run(&gc));
        assert_same_bits(&format!("{path} adamw w"), a.0.as_tensor(), b.0.as_tensor());
        assert_same_bits(&format!("{path} adamw m"), a.1.as_tensor(), b.1.as_tensor());
        assert_same_bits(&format!("{path} sgd w"), a.2.as_tensor(), b.2.as_tensor());
        assert_same_bits(&format!("{path} sgd buf"), a.3.as_tensor(), b.3.as_tensor());
        assert!(max_diff(a.0.as_tensor(), &w0) > 0.0, "{path}: w moved");
    }
}
