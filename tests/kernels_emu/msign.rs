//! Newton–Schulz msign (`kernels/msign.cu` + the GEMM sequence of
//! `launch/msign.rs`, with the emulator's cuBLAS stand-in) against the CPU path.
//!
//! Tolerance: both compute the same polynomial steps in f32 but sum the
//! products in different orders (~1e-6 relative). A step maps a singular
//! value s to a·s + b·s³ + c·s⁵ with slope up to a ≈ 3.4 (Muon) or 8.3
//! (Polar Express) near 0, so over 5–8 steps a rounding difference in the
//! smallest singular directions grows by up to ~10³: entries (of size
//! ~1/√n) may differ by ~1e-3 absolute. 2e-3·max(1, max|x|) bounds that;
//! a wrong coefficient, offset or transpose gives differences of order 1.
//! bf16 operands are compared with the generic path using bf16 operands,
//! at bf16's precision (2⁻⁸ relative per product, same amplification).

use candle_core::{DType, Device, Tensor};
use steepest::device::emu;
use steepest::linalg::{msign, msign_generic, GramNewtonSchulz, NewtonSchulz};

use super::cases::*;

fn check(what: &str, want: &Tensor, got: &Tensor, tol: f64) {
    assert_eq!(want.dims(), got.dims(), "{what}: shape");
    assert_eq!(want.dtype(), got.dtype(), "{what}: dtype");
    let d = max_diff(want, got);
    let scale = max_abs(want).max(1.0);
    assert!(
        d <= tol * scale,
        "{what}: max |Δ| = {d:e} (tolerance {:e})",
        tol * scale
    );
}

fn input(i: usize, b: usize, m: usize, n: usize, dt: DType) -> Tensor {
    let mut r = rng(300 + i as u64);
    let g = randn(&mut r, &[b, m, n], dt, &Device::Cpu);
    if b == 1 && i.is_multiple_of(2) {
        g.squeeze(0).unwrap()
    } else {
        g
    }
}

/// The schedules the every-shape tests cycle through.
fn schedules() -> [NewtonSchulz; 4] {
    [
        NewtonSchulz::muon(),
        NewtonSchulz::polar_express(8),
        NewtonSchulz::you(),
        NewtonSchulz::cubic(6),
    ]
}

#[test]
fn msign_matches_cpu_on_every_shape() {
    let schedules = schedules();
    for (i, &(b, m, n)) in MSIGN_SHAPES.iter().enumerate() {
        let ns = &schedules[i % schedules.len()];
        let g = input(i, b, m, n, DType::F32);
        let want = msign(&g, ns).unwrap();
        let got = emu::msign(&g, ns, None).unwrap();
        check(
            &format!("({b}, {m}, {n}) schedule {}", i % 4),
            &want,
            &got,
            2e-3,
        );
    }
}

/// A factor on `‖G‖_F` in the normalisation (`with_norm_scale`: Polar
/// Express's 1.01, the Stiefel retraction's `1/√m` with `eps = 0`) reaches
/// the kernel: the emulator matches the CPU path with factor 2 (Muon, cubic)
/// and `1/√s` (cubic, `s` the short side),
/// and both differ from the result without the factor by far more than the
/// tolerance. (The every-shape tests use factors 1 and 1.01, which a lost
/// factor would hardly change.) Tolerance: these schedules are short (4–5
/// steps), so f32 rounding grows little: measured ≤ 8e-7; 1e-5 here,
/// against differences of 6e-2 to 0.8 without the factor.
#[test]
fn msign_norm_scale_reaches_the_kernel() {
    for (i, &(b, m, n)) in [(1, 24, 8), (3, 8, 24), (2, 16, 16)].iter().enumerate() {
        let g = input(40 + i, b, m, n, DType::F32);
        let cubic = NewtonSchulz::cubic(4).with_eps(0.0);
        let stiefel = 1.0 / (m.min(n) as f64).sqrt();
        for (base, scale) in [
            (NewtonSchulz::muon(), 2.0),
            (cubic.clone(), 2.0),
            (cubic, stiefel),
        ] {
            let ns = base.clone().with_norm_scale(scale);
            let want = msign(&g, &ns).unwrap();
            let got = emu::msign(&g, &ns, None).unwrap();
            let what = format!("({b}, {m}, {n}) scale {scale}");
            check(&what, &want, &got, 1e-5);
            let unscaled = msign(&g, &base).unwrap();
            assert!(max_diff(&want, &unscaled) > 1e-2, "{what}: vacuous");
        }
    }
}

/// bf16 and f16 inputs: f32 arithmetic inside, output rounded to the input
/// dtype (one rounding: ≤ 2⁻⁸ relative for bf16, 2⁻¹¹ for f16).
#[test]
fn msign_half_inputs() {
    for (i, &(b, m, n)) in MSIGN_SHAPES.iter().enumerate().step_by(3) {
        for dt in [DType::BF16, DType::F16] {
            let g = input(i, b, m, n, dt);
            let want = msign(&g, &NewtonSchulz::muon()).unwrap();
            let got = emu::msign(&g, &NewtonSchulz::muon(), None).unwrap();
            check(&format!("({b}, {m}, {n}) {dt:?}"), &want, &got, 1e-2);
        }
    }
}

/// The Gram product as several tiles (only one triangle computed, then
/// mirrored): tiles of 8, 5 and 7 on matrices with 12 to 40 rows.
#[test]
fn msign_tiled_gram() {
    for (i, &(b, m, n, tile)) in [
        (1, 20, 33, 8),
        (3, 12, 40, 5),
        (2, 40, 17, 7),
        (1, 64, 64, 16),
    ]
    .iter()
    .enumerate()
    {
        let g = input(i, b, m, n, DType::F32);
        let ns = NewtonSchulz::polar_express(6);
        let want = msign(&g, &ns).unwrap();
        let got = emu::msign(&g, &ns, Some(tile)).unwrap();
        check(&format!("({b}, {m}, {n}) tile {tile}"), &want, &got, 2e-3);
    }
}

/// A gradient whose norm is comparable to `eps` (1e-7): the normalisation
/// is `G / (‖G‖_F + eps)`, so `X₀` has norm 0.5 at ‖G‖_F = eps and 0.99 at
/// 100·eps. The kernel matches the CPU path there, where `eps` is not
/// negligible (`G / √(‖G‖_F² + eps)` would start from a norm of 3e-4).
#[test]
fn msign_of_a_gradient_as_small_as_eps() {
    for (i, norm) in [1e-5, 1e-7, 1e-9].into_iter().enumerate() {
        for ns in [NewtonSchulz::muon(), NewtonSchulz::cubic(6)] {
            let g = input(40 + i, 1, 24, 12, DType::F64);
            let f: f64 = g.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
            let g = (g * (norm / f.sqrt()))
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            let want = msign(&g, &ns).unwrap();
            let got = emu::msign(&g, &ns, None).unwrap();
            check(&format!("‖G‖_F = {norm:e}"), &want, &got, 2e-3);
        }
    }
}

/// With the grid capped (`emu::with_grid_cap`), the elementwise steps'
/// grid-stride loops (the diagonal shift of the Gram form, the operand
/// copies) walk several block-sized pieces per block: the same bits as with
/// the full grid. Each case has its own input and runs capped first, so that
/// an element a capped loop skipped cannot hold the right value left in a
/// reused buffer by the full run.
#[test]
fn msign_grid_stride_loops_give_the_full_grids_bits() {
    let mut i = 50;
    for ns in [NewtonSchulz::muon(), NewtonSchulz::muon().gram_form()] {
        for cap in [1, 3] {
            i += 1;
            let g = input(i, 2, 100, 40, DType::F32);
            let capped = emu::with_grid_cap(cap, || emu::msign(&g, &ns, None).unwrap());
            let full = emu::msign(&g, &ns, None).unwrap();
            assert_same_bits(&format!("{ns:?}, grid capped at {cap}"), &full, &capped);
        }
    }
}

/// A zero matrix stays zero (X₀ = 0/(0 + eps) = 0).
#[test]
fn msign_zero_matrix() {
    for (b, m, n) in [(1, 5, 9), (2, 9, 5), (1, 1, 1)] {
        let g = Tensor::zeros((b, m, n), DType::F32, &Device::Cpu).unwrap();
        let got = emu::msign(&g, &NewtonSchulz::muon(), None).unwrap();
        assert_eq!(max_abs(&got), 0.0);
    }
}

/// bf16 operands (`with_compute_dtype(BF16)`), f32 accumulation, against the
/// generic path with bf16 operands (which also rounds each product to bf16);
/// and f16 operands likewise.
#[test]
fn msign_low_precision_operands() {
    for (i, &(b, m, n)) in MSIGN_SHAPES.iter().enumerate().skip(3).step_by(2) {
        low_precision_operands(i, (b, m, n), &NewtonSchulz::muon());
    }
}

/// `base` with bf16 and f16 operands on the emulator: against the generic
/// path with the same operand rounding, and close to the f32 result (bf16
/// operands are a perturbation; tests/gpu_kernels.rs asks the same on a GPU).
fn low_precision_operands(i: usize, (b, m, n): (usize, usize, usize), base: &NewtonSchulz) {
    let g = input(i, b, m, n, DType::F32);
    let exact = msign(&g, &NewtonSchulz::muon()).unwrap();
    for op in [DType::BF16, DType::F16] {
        let ns = base.clone().with_compute_dtype(op);
        let want = msign_generic(&g, &ns).unwrap();
        let got = emu::msign(&g, &ns, Some(7)).unwrap();
        let what = format!("({b}, {m}, {n}) operands {op:?}");
        check(&what, &want, &got, 0.1);
        check(&format!("{what} vs f32"), &exact, &got, 0.1);
    }
}

/// The Gram form on the emulator against the CPU path's Gram form, on every
/// shape (`min_aspect = 1`: squares too), four schedules and restart lists
/// from none to every step, with the default and small tiles (so that each
/// symmetric product is several mirrored GEMMs).
#[test]
fn msign_gram_form_matches_cpu_on_every_shape() {
    let schedules = schedules();
    for (i, &(b, m, n)) in MSIGN_SHAPES.iter().enumerate() {
        let base = &schedules[i % schedules.len()];
        let steps = base.coefficients().len();
        // No restarts is unstable with Polar Express's first step (a ≈ 8.3):
        // rounding differences between two correct paths grow to ~0.1 there
        // (the CPU path's own error against the SVD is ~3e-2), so that
        // schedule always restarts.
        let restarts: Vec<usize> = match (i % 3, i % 4) {
            (0, 1) | (1, _) => (2..steps).step_by(2).collect(),
            (0, _) => vec![],
            _ => (1..steps).collect(),
        };
        let ns = base.clone().with_gram(GramNewtonSchulz {
            min_aspect: 1.0,
            restarts: restarts.clone(),
        });
        let g = input(i, b, m, n, DType::F32);
        let want = msign(&g, &ns).unwrap();
        for tile in [None, Some(7)] {
            let got = emu::msign(&g, &ns, tile).unwrap();
            check(
                &format!(
                    "({b}, {m}, {n}) schedule {} restarts {restarts:?} tile {tile:?}",
                    i % 4
                ),
                &want,
                &got,
                2e-3,
            );
        }
    }
}

/// The Gram form is the same map as the standard form: on the emulator the
/// two agree on rectangular shapes (default `gram_form`: aspect ≥ 2, restart
/// every two steps), and a square matrix is left to the standard form.
#[test]
fn msign_gram_form_matches_the_standard_form() {
    for (i, &(b, m, n)) in [(1, 10, 40), (3, 12, 30), (1, 130, 50), (2, 16, 64)]
        .iter()
        .enumerate()
    {
        let g = input(40 + i, b, m, n, DType::F32);
        let ns = NewtonSchulz::you();
        let standard = emu::msign(&g, &ns, None).unwrap();
        let gram = emu::msign(&g, &ns.clone().gram_form(), Some(8)).unwrap();
        check(&format!("({b}, {m}, {n})"), &standard, &gram, 2e-3);
    }
    let ns = NewtonSchulz::muon().gram_form();
    assert!(ns.gram_restarts(8, 8).is_none() && ns.gram_restarts(8, 16).is_some());
}

/// bf16 and f16 operands in the Gram form against the generic path's Gram
/// form with the same operand rounding; bf16 inputs and a zero matrix.
#[test]
fn msign_gram_form_low_precision() {
    let gram = NewtonSchulz::muon().with_gram(GramNewtonSchulz {
        min_aspect: 1.0,
        restarts: vec![2, 4],
    });
    for (i, &(b, m, n)) in MSIGN_SHAPES.iter().enumerate().skip(1).step_by(3) {
        low_precision_operands(i, (b, m, n), &gram);
        let ns = NewtonSchulz::muon().gram_form();
        let g = input(i, b, m, n, DType::BF16);
        let want = msign(&g, &ns).unwrap();
        let got = emu::msign(&g, &ns, None).unwrap();
        check(&format!("({b}, {m}, {n}) bf16 input"), &want, &got, 1e-2);
    }
    let ns = NewtonSchulz::muon().gram_form();
    for (b, m, n) in [(1, 5, 19), (2, 30, 6)] {
        let g = Tensor::zeros((b, m, n), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(max_abs(&emu::msign(&g, &ns, None).unwrap()), 0.0);
    }
}

/// A schedule whose steps have c = 0 (cubic) with bf16 and f16 operands:
/// there `B = b·A` is no GEMM but a scaled mirror followed by its own
/// rounding into the operand copy, a path no quintic schedule takes. Against
/// the generic path with the same operand rounding and against the f32
/// result, in the standard and the Gram form.
#[test]
fn msign_cubic_low_precision_operands() {
    for (i, &(b, m, n)) in [(1, 12, 20), (2, 30, 9)].iter().enumerate() {
        let g = input(60 + i, b, m, n, DType::F32);
        let exact = msign(&g, &NewtonSchulz::cubic(6)).unwrap();
        let gram = NewtonSchulz::cubic(6).with_gram(GramNewtonSchulz {
            min_aspect: 1.0,
            restarts: vec![3],
        });
        for base in [NewtonSchulz::cubic(6), gram] {
            for op in [DType::BF16, DType::F16] {
                let ns = base.clone().with_compute_dtype(op);
                let want = msign_generic(&g, &ns).unwrap();
                let got = emu::msign(&g, &ns, Some(7)).unwrap();
                let what = format!("({b}, {m}, {n}) cubic, operands {op:?}");
                check(&what, &want, &got, 0.1);
                check(&format!("{what} vs f32"), &exact, &got, 0.1);
            }
        }
    }
}

/// Zero in, zero out on the kernels also with `eps = 0` (the normalisation
/// `1/(‖G‖_F·scale + eps)` would be 1/0, and 0·∞ NaN): standard and Gram
/// form, f32 and bf16 input, one member of a batch zero beside a nonzero one
/// (which keeps its CPU-path result).
#[test]
fn msign_of_zero_with_eps_zero_is_zero() {
    for ns in [
        NewtonSchulz::muon().with_eps(0.0),
        NewtonSchulz::muon().with_eps(0.0).gram_form(),
    ] {
        for dt in [DType::F32, DType::BF16] {
            for (m, n) in [(5, 19), (30, 6), (8, 8)] {
                let g = input(3, 1, m, n, dt);
                let zero = g.zeros_like().unwrap();
                let both = Tensor::cat(&[&zero, &g], 0).unwrap();
                let got = emu::msign(&both, &ns, None).unwrap();
                let z = got.get(0).unwrap();
                assert_eq!(max_abs(&z), 0.0, "{dt:?} {m}×{n} {ns:?}: zero member");
                let want = msign(&g, &ns).unwrap();
                check(
                    &format!("{dt:?} {m}×{n}: the other member"),
                    &want,
                    &got.narrow(0, 1, 1).unwrap(),
                    1e-2,
                );
            }
        }
    }
}

/// Entries so large that their squares overflow f32 (1e20, 1e30), or so
/// small that they underflow it (1e-24, with eps 0 so that the scale is
/// not hidden by eps): the kernels' ‖G‖_F is summed in f64, and their
/// result matches the CPU path, which matches msign of the input rescaled
/// to norm 1 (msign is scale-invariant). An f32 sum gave ‖G‖_F = Inf or 0
/// there, and all-zero results.
#[test]
fn msign_of_entries_whose_squares_leave_f32s_range() {
    for (i, scale) in [1e20, 1e30, 1e-24].into_iter().enumerate() {
        for dt in [DType::F32, DType::BF16] {
            for ns in [
                NewtonSchulz::muon().with_eps(0.0),
                NewtonSchulz::muon().with_eps(0.0).gram_form(),
            ] {
                let unit = input(60 + i, 1, 16, 8, DType::F64);
                let f: f64 = unit.sqr().unwrap().sum_all().unwrap().to_scalar().unwrap();
                let unit = (unit / f.sqrt()).unwrap();
                let g = (&unit * scale).unwrap().to_dtype(dt).unwrap();
                let what = format!("{scale:e} {dt:?} {ns:?}");
                let got = emu::msign(&g, &ns, None).unwrap();
                assert!(max_abs(&got) > 0.1, "{what}: result {}", max_abs(&got));
                let want = msign(&g, &ns).unwrap();
                let tol = if dt == DType::F32 { 2e-3 } else { 1e-2 };
                check(&format!("{what}: against the CPU path"), &want, &got, tol);
                let rescaled = msign(&unit.to_dtype(dt).unwrap(), &ns).unwrap();
                check(&format!("{what}: against norm 1"), &rescaled, &got, tol);
            }
        }
    }
}
