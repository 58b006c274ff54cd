//! The CPU fast path of the power iteration against the generic path (the
//! same recurrences with candle's matrix products, forced by
//! `device::with_generic_ops`) on every kind of shape, dtype and start, and
//! its result independent of the number of threads.
//!
//! Both run in f32 (f64 for f64 weights); only the summation orders differ,
//! and normalisation keeps every vector at unit length, so they agree to
//! rounding: σ to 1e-4 relative and vectors to 1e-3 absolute in f32 (1e-10
//! in f64), far below what a wrong index, coefficient or missing term gives.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::*;
use steepest::device::with_generic_ops;
use steepest::linalg::TopSingular;
use steepest::power_iteration;

/// Shapes `(b, m, n)`: 1×1, vectors, tall, wide, square, batches, and sizes
/// that cut `W` into several pieces (rows of a tall matrix, column blocks of
/// a wide one, a single row longer than a piece).
const SHAPES: &[(usize, usize, usize)] = &[
    (1, 1, 1),
    (1, 1, 17),
    (1, 17, 1),
    (1, 1, 300),
    (1, 300, 1),
    (1, 33, 31),
    (1, 31, 33),
    (3, 64, 16),
    (2, 16, 64),
    (1, 100, 257),
    (1, 257, 100),
    (4, 48, 48),
    (1, 3000, 20),
    (1, 5, 9000),
    (2, 2, 40000),
];

fn compare(what: &str, want: &TopSingular, got: &TopSingular, f64_weights: bool) {
    assert_eq!(want.sigma.dims(), got.sigma.dims(), "{what}: σ shape");
    assert_eq!(want.u.dims(), got.u.dims(), "{what}: u shape");
    assert_eq!(want.v.dims(), got.v.dims(), "{what}: v shape");
    for t in [&got.sigma, &got.u, &got.v] {
        assert_eq!(t.dtype(), want.sigma.dtype(), "{what}: dtype");
    }
    let (rel, abs) = if f64_weights {
        (1e-10, 1e-10)
    } else {
        (1e-4, 1e-3)
    };
    let (s1, s2) = (to_f64_vec(&want.sigma), to_f64_vec(&got.sigma));
    for (a, b) in s1.iter().zip(&s2) {
        assert!(
            (a - b).abs() <= rel * a.abs().max(1e-30),
            "{what}: σ {a} vs {b}"
        );
    }
    let du = max_abs_diff(&want.u, &got.u);
    let dv = max_abs_diff(&want.v, &got.v);
    assert!(du < abs && dv < abs, "{what}: |Δu| {du:e}, |Δv| {dv:e}");
}

fn unbatch(t: Tensor, b: usize) -> Tensor {
    if b == 1 {
        t.squeeze(0).unwrap()
    } else {
        t
    }
}

#[test]
fn cpu_path_matches_generic_path_on_every_shape_dtype_and_start() {
    let dtypes = [DType::F32, DType::F64, DType::BF16, DType::F16];
    for (i, &(b, m, n)) in SHAPES.iter().enumerate() {
        let dt = dtypes[i % 4];
        let mut r = rng(300 + i as u64);
        let w = unbatch(randn(&mut r, &[b, m, n], dt), b);
        let good = unbatch(randn(&mut r, &[b, n], DType::F32), b);
        // The first member's start unusable (NaN, ∞, then zero), the others not.
        let mut vals = to_f64_vec(&good);
        vals[0] = f64::NAN;
        let nan = Tensor::from_vec(vals.clone(), good.shape(), &Device::Cpu).unwrap();
        vals[0] = f64::INFINITY;
        let inf = Tensor::from_vec(vals.clone(), good.shape(), &Device::Cpu).unwrap();
        vals[..n].iter_mut().for_each(|x| *x = 0.0);
        let zero = Tensor::from_vec(vals, good.shape(), &Device::Cpu).unwrap();
        let zero_w = w.zeros_like().unwrap();
        for (iters, w, s) in [
            (0, &w, None),
            (1, &w, Some(&good)),
            (5, &w, Some(&good)),
            (3, &w, None),
            (2, &w, Some(&nan)),
            (2, &w, Some(&inf)),
            (2, &w, Some(&zero)),
            (3, &zero_w, Some(&good)),
            (3, &zero_w, None),
        ] {
            let what = format!("({b}, {m}, {n}) {dt:?} iters {iters} start {s:?}");
            let want = with_generic_ops(|| power_iteration(w, s, iters)).unwrap();
            let got = power_iteration(w, s, iters).unwrap();
            compare(&what, &want, &got, dt == DType::F64);
        }
    }
}

#[test]
fn cpu_path_takes_a_strided_matrix() {
    let mut r = rng(320);
    let w = randn(&mut r, &[40, 90], DType::F32);
    for view in [w.t().unwrap(), w.narrow(1, 10, 50).unwrap()] {
        let want = power_iteration(&view.contiguous().unwrap(), None, 4).unwrap();
        let got = power_iteration(&view, None, 4).unwrap();
        compare("view", &want, &got, false);
        assert_eq!(max_abs_diff(&want.u, &got.u), 0.0, "same bits as a copy");
    }
}

/// The pieces and the order their partial sums are added in are fixed, so
/// one thread and three give the same bits, and so does a matrix alone
/// (small enough to run on the calling thread) and in a batch (large enough
/// to go to the pool).
#[test]
fn cpu_path_does_not_depend_on_the_thread_count() {
    let mut r = rng(321);
    for &(b, m, n) in &[(1, 3000, 50), (1, 20, 8000), (3, 300, 150), (4, 150, 300)] {
        let w = unbatch(randn(&mut r, &[b, m, n], DType::F32), b);
        let run = |threads: usize| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| power_iteration(&w, None, 3).unwrap())
        };
        let (one, three) = (run(1), run(3));
        for (x, y) in [
            (&one.sigma, &three.sigma),
            (&one.u, &three.u),
            (&one.v, &three.v),
        ] {
            assert_eq!(to_f64_vec(x), to_f64_vec(y), "({b}, {m}, {n})");
        }
        if b > 1 {
            for i in 0..b {
                let alone = power_iteration(&w.get(i).unwrap(), None, 3).unwrap();
                let got = (three.u.get(i).unwrap(), three.v.get(i).unwrap());
                assert_eq!(to_f64_vec(&alone.u), to_f64_vec(&got.0), "member {i} alone");
                assert_eq!(to_f64_vec(&alone.v), to_f64_vec(&got.1), "member {i} alone");
            }
        }
    }
}

/// A group's parameters given one by one (each where it is, one a view at
/// an offset), each warm-started from its own state vector (one of them
/// zero: no start), give the bits of the same matrices and starts stacked
/// into one batch, and each state vector ends holding its new v₁;
/// mismatched members and vectors are refused.
#[test]
fn members_read_in_place_give_the_stacked_batch_bits() {
    let mut r = rng(322);
    for &(b, m, n) in &[(3, 50, 20), (2, 20, 50), (1, 30, 30), (3, 300, 150)] {
        let ws: Vec<Tensor> = (0..b)
            .map(|_| {
                randn(&mut r, &[m + 2, n], DType::F32)
                    .narrow(0, 2, m)
                    .unwrap()
            })
            .collect();
        let mut starts: Vec<Tensor> = (0..b).map(|_| randn(&mut r, &[n], DType::F32)).collect();
        starts[b - 1] = starts[b - 1].zeros_like().unwrap();
        let vs: Vec<Var> = starts
            .iter()
            .map(|s| Var::from_tensor(s).unwrap())
            .collect();
        let batch = Tensor::stack(&ws, 0).unwrap();
        let want = power_iteration(&batch, Some(&Tensor::stack(&starts, 0).unwrap()), 3).unwrap();
        let got = steepest::device::power_iteration_members(&ws, &vs, 3).unwrap();
        for (x, y) in [
            (&want.sigma, &got.sigma),
            (&want.u, &got.u),
            (&want.v, &got.v),
        ] {
            assert_eq!(x.dims(), y.dims());
            assert_eq!(to_f64_vec(x), to_f64_vec(y), "({b}, {m}, {n})");
        }
        for (i, v) in vs.iter().enumerate() {
            assert_eq!(
                to_f64_vec(v),
                to_f64_vec(&want.v.get(i).unwrap()),
                "v₁ stored"
            );
        }
    }
    let a = randn(&mut r, &[4, 3], DType::F32);
    let v3 = || Var::zeros(3, DType::F32, &Device::Cpu).unwrap();
    let members = steepest::device::power_iteration_members;
    for other in [
        randn(&mut r, &[3, 4], DType::F32),
        randn(&mut r, &[4, 3], DType::F64),
    ] {
        let e = members(&[a.clone(), other], &[v3(), v3()], 1)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("power_iteration: w") && e.contains("[4, 3]"),
            "{e}"
        );
    }
    let bad_vs: [Vec<Var>; 2] = [
        vec![v3()],
        vec![v3(), Var::zeros(4, DType::F32, &Device::Cpu).unwrap()],
    ];
    for vs in bad_vs {
        let e = members(&[a.clone(), a.clone()], &vs, 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("power_iteration: v"), "{e}");
    }
    let e = members(&[], &[], 1).unwrap_err().to_string();
    assert!(e.contains("no matrices"), "{e}");
}

/// The scales a power iteration meets, f32 (σ₁ ≈ 1.3–2.5 × the scale here).
pub const SCALES: [f64; 14] = [
    1e-30, 1e-24, 1e-22, 1e-21, 1e-20, 1e-18, 1e-12, 1e-6, 1.0, 1e6, 1e10, 1e15, 1e18, 1e30,
];

/// Scale equivariance, `σ(sW) = s·σ(W)` with the same `u`, `v`: every norm
/// is taken after dividing by the largest magnitude, so for
/// `10⁻¹⁸ ≲ s ≲ 10¹⁸` (the Gram product `~σ₁²` representable in f32) both
/// paths give the scale-1 result up to rounding (σ/s to 1e-5, vectors to
/// 1e-4), tall and wide, with and without a start. Beyond that range the
/// Gram product under- or overflows and the iterations keep their vector,
/// but σ is still positive and finite and `u`, `v` unit — and the two paths
/// still agree. Between, at 1e-22…1e-20, the Gram product is subnormal:
/// `u`, `v` unit and σ/s within 1e-2. (Dividing `y` by a subnormal `‖y‖`
/// left `u`, `v` short of unit length there, σ off by 10⁶; the division is
/// now of the scaled `y/max|yᵢ|`.) (Before the scaling, σ came out 0 with `u = v = 0` at
/// s = 1e10, and the iterations stalled from s ≈ 1e-10 down.)
#[test]
fn every_scale_gives_the_scaled_result_on_both_paths() {
    let mut r = rng(323);
    for (m, n) in [(9, 4), (4, 9), (1, 6), (6, 1)] {
        let w1 = randn(&mut r, &[m, n], DType::F64);
        let start = randn(&mut r, &[n], DType::F32);
        for (iters, st) in [(10, None), (3, Some(&start))] {
            let one = power_iteration(&w1.to_dtype(DType::F32).unwrap(), st, iters).unwrap();
            let sigma1 = to_f64_vec(&one.sigma)[0];
            for scale in SCALES {
                let what = format!(
                    "({m}, {n}) iters {iters} start {} scale {scale:e}",
                    st.is_some()
                );
                let w = (&w1 * scale).unwrap().to_dtype(DType::F32).unwrap();
                let want = with_generic_ops(|| power_iteration(&w, st, iters)).unwrap();
                let got = power_iteration(&w, st, iters).unwrap();
                compare(&what, &want, &got, false);
                let sigma = to_f64_vec(&got.sigma)[0];
                assert!(sigma.is_finite() && sigma > 0.0, "{what}: σ {sigma:e}");
                for x in [&got.u, &got.v] {
                    let norm = to_f64_vec(x).iter().map(|a| a * a).sum::<f64>().sqrt();
                    assert!((norm - 1.0).abs() < 1e-5, "{what}: ‖·‖ = {norm}");
                }
                if (1e-18..=1e18).contains(&scale) {
                    let rel = (sigma / scale - sigma1).abs() / sigma1;
                    assert!(rel < 1e-5, "{what}: σ/s {} vs {sigma1}", sigma / scale);
                    let du = max_abs_diff(&got.u, &one.u);
                    let dv = max_abs_diff(&got.v, &one.v);
                    assert!(du < 1e-4 && dv < 1e-4, "{what}: |Δu| {du:e} |Δv| {dv:e}");
                } else if (1e-22..1e-18).contains(&scale) {
                    // The Gram product subnormal: its few bits perturb the
                    // iterate, σ stays within 1e-2 (1e-4 to 1e-3 measured).
                    let rel = (sigma / scale - sigma1).abs() / sigma1;
                    assert!(rel < 1e-2, "{what}: σ/s {} vs {sigma1}", sigma / scale);
                }
            }
        }
    }
}

/// A start vector with subnormal entries (‖v₀‖ ≈ 1e-40 in f32) is usable
/// and normalised to unit length: with 0 iterations `v` is the start's
/// direction (f64 division, to 1e-4: the entries have ~17 bits) on both
/// paths, tall and wide. (A floor of the divisor at the smallest normal
/// gave ‖v‖ ≈ 1e-2.)
#[test]
fn a_subnormal_start_is_normalised_to_unit_length() {
    let mut r = rng(325);
    for (m, n) in [(7, 5), (5, 7)] {
        let w = randn(&mut r, &[m, n], DType::F32);
        let start = (randn(&mut r, &[n], DType::F64) * 1e-40)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        let s = to_f64_vec(&start);
        let ns = s.iter().map(|a| a * a).sum::<f64>().sqrt();
        assert!(ns > 0.0 && ns < f32::MIN_POSITIVE as f64, "‖v₀‖ = {ns:e}");
        let dir: Vec<f64> = s.iter().map(|a| a / ns).collect();
        let generic = with_generic_ops(|| power_iteration(&w, Some(&start), 0)).unwrap();
        let cpu = power_iteration(&w, Some(&start), 0).unwrap();
        compare(&format!("({m}, {n})"), &generic, &cpu, false);
        for (path, got) in [("generic", &generic), ("cpu", &cpu)] {
            for (what, x) in [("u", &got.u), ("v", &got.v)] {
                let norm = to_f64_vec(x).iter().map(|a| a * a).sum::<f64>().sqrt();
                assert!(
                    (norm - 1.0).abs() < 1e-5,
                    "({m}, {n}) {path} ‖{what}‖ = {norm}"
                );
            }
            if n <= m {
                // Tall: v is the normalised start itself.
                let d = to_f64_vec(&got.v)
                    .iter()
                    .zip(&dir)
                    .fold(0.0f64, |a, (x, y)| a.max((x - y).abs()));
                assert!(d < 1e-4, "({m}, {n}) {path}: |v − v₀/‖v₀‖| = {d:e}");
            }
        }
    }
}

/// An empty batch `(0, m, n)` has no triplets: σ `(0,)`, u `(0, m)`, v
/// `(0, n)` on the CPU path as on the generic one (the CPU path indexed
/// its first member and panicked), tall and wide, with and without a
/// start; and so for the routines built on it (`top_singular_precise`,
/// which errored on the empty reduction, and the retractions).
#[test]
fn an_empty_batch_gives_empty_triplets() {
    use steepest::linalg::{spectral_sphere_retract, top_singular_precise};
    for (m, n) in [(4, 3), (3, 4)] {
        for dt in [DType::F32, DType::F64, DType::BF16] {
            let w = Tensor::zeros((0, m, n), dt, &Device::Cpu).unwrap();
            let start = Tensor::zeros((0, n), DType::F32, &Device::Cpu).unwrap();
            for s in [None, Some(&start)] {
                let cpu = power_iteration(&w, s, 3).unwrap();
                let generic = with_generic_ops(|| power_iteration(&w, s, 3)).unwrap();
                for t in [&cpu, &generic] {
                    assert_eq!(t.sigma.dims(), &[0]);
                    assert_eq!(t.u.dims(), &[0, m]);
                    assert_eq!(t.v.dims(), &[0, n]);
                }
                assert_eq!(cpu.sigma.dtype(), generic.sigma.dtype(), "{dt:?}");
            }
            let top = top_singular_precise(&w, None).unwrap();
            assert_eq!(top.sigma.dims(), &[0]);
            assert_eq!(
                spectral_sphere_retract(&w, 1.0, None).unwrap().0.dims(),
                &[0, m, n]
            );
            if m >= n {
                for cold in [false, true] {
                    let x = steepest::linalg::stiefel_retract(&w, cold).unwrap();
                    assert_eq!(x.dims(), &[0, m, n]);
                }
            }
        }
    }
}
