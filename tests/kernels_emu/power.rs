//! Batched power iteration (`kernels/power.cu` + the launch sequence) under
//! the emulator against the generic path (`power_iteration` on the CPU).
//!
//! Both run the same recurrence in f32; only the summation orders differ
//! (warp/block trees and atomics here, candle's sequential sums there), so
//! they differ by rounding, which a power iteration does not amplify
//! (normalisation keeps every vector at unit length). With ≤ 520-term dot
//! products in f32 the rounding is ~1e-6 relative; the tolerances (σ: 1e-4
//! relative, vectors: 1e-3 absolute on unit vectors) leave a wide margin and
//! still catch any wrong coefficient, index or missing term.

use candle_core::{DType, Device, Tensor, Var};
use steepest::device::emu;
use steepest::linalg::{power_iteration, TopSingular};

use super::cases::*;

fn compare(what: &str, want: &TopSingular, got: &TopSingular) {
    assert_eq!(want.sigma.dims(), got.sigma.dims(), "{what}: σ shape");
    assert_eq!(want.u.dims(), got.u.dims(), "{what}: u shape");
    assert_eq!(want.v.dims(), got.v.dims(), "{what}: v shape");
    assert_eq!(got.sigma.dtype(), DType::F32);
    let (s1, s2) = (f64s(&want.sigma), f64s(&got.sigma));
    for (a, b) in s1.iter().zip(&s2) {
        assert!(
            (a - b).abs() <= 1e-4 * a.abs().max(1e-30),
            "{what}: σ {a} vs {b}"
        );
    }
    let du = max_diff(&want.u, &got.u);
    let dv = max_diff(&want.v, &got.v);
    assert!(du < 1e-3 && dv < 1e-3, "{what}: |Δu| {du:e}, |Δv| {dv:e}");
}

fn unbatch(t: &Tensor, b: usize) -> Tensor {
    if b == 1 {
        t.squeeze(0).unwrap()
    } else {
        t.clone()
    }
}

#[test]
fn power_iteration_matches_generic_on_every_shape() {
    for (i, &(b, m, n)) in POWER_SHAPES.iter().enumerate() {
        let dt = [DType::F32, DType::BF16, DType::F16][i % 3];
        let mut r = rng(200 + i as u64);
        let w = unbatch(&spiked(&mut r, b, m, n, dt, &Device::Cpu), b);
        let start = unbatch(&start_vec(&mut r, b, n, &Device::Cpu), b);
        for (iters, s) in [(0, None), (1, Some(&start)), (6, Some(&start)), (4, None)] {
            let want = power_iteration(&w, s, iters).unwrap();
            let got = emu::power_iteration(&w, s, iters).unwrap();
            compare(
                &format!("({b}, {m}, {n}) {dt:?} iters {iters}"),
                &want,
                &got,
            );
        }
    }
}

/// W = 0: σ = 0; tall: v is the (unit) start, u = 0; wide: u and v are the
/// default unit vectors — whatever the generic path gives.
#[test]
fn zero_matrix() {
    for &(b, m, n) in &[(1, 9, 4), (1, 4, 9), (3, 6, 6), (2, 1, 5), (2, 5, 1)] {
        for dt in [DType::F32, DType::BF16] {
            let w = Tensor::zeros((b, m, n), dt, &Device::Cpu).unwrap();
            let mut r = rng(5);
            let start = start_vec(&mut r, b, n, &Device::Cpu);
            for s in [None, Some(&start)] {
                let want = power_iteration(&w, s, 3).unwrap();
                let got = emu::power_iteration(&w, s, 3).unwrap();
                compare(&format!("zero ({b}, {m}, {n}) {dt:?}"), &want, &got);
                assert!(f64s(&got.sigma).iter().all(|&x| x == 0.0));
                let vn: f64 = f64s(&got.v).iter().map(|x| x * x).sum::<f64>() / b as f64;
                assert!((vn - 1.0).abs() < 1e-5, "v stays unit");
            }
        }
    }
}

/// Scale equivariance under the kernels as on the CPU: at scales from 1e-30
/// to 1e30 (f32) the kernels agree with the CPU path, σ is positive
/// and finite, u and v are unit; within 1e-18..1e18 (the Gram product
/// representable) the result is the scale-1 one scaled (σ/s to 1e-5,
/// vectors to 1e-4). The norms are taken after dividing by the largest
/// magnitude (`block_scaled_norm`), as on the CPU; at 1e-21 the Gram
/// product is subnormal and u, v are still unit (they were not before the
/// scaled division).
#[test]
fn every_scale_gives_the_scaled_result() {
    // (each regime once: the emulator is slow, and slower under TSan in CI)
    let scales = [1e-30, 1e-21, 1e-18, 1e-12, 1e10, 1e18, 1e30];
    let mut r = rng(41);
    for (m, n) in [(9, 4), (4, 9), (1, 6), (6, 1)] {
        let w1 = spiked(&mut r, 1, m, n, DType::F32, &Device::Cpu)
            .squeeze(0)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let start = start_vec(&mut r, 1, n, &Device::Cpu).squeeze(0).unwrap();
        for (iters, st) in [(4, None), (2, Some(&start))] {
            let one = emu::power_iteration(&w1.to_dtype(DType::F32).unwrap(), st, iters).unwrap();
            let sigma1 = f64s(&one.sigma)[0];
            for scale in scales {
                let what = format!(
                    "({m}, {n}) iters {iters} start {} scale {scale:e}",
                    st.is_some()
                );
                let w = (&w1 * scale).unwrap().to_dtype(DType::F32).unwrap();
                let want = power_iteration(&w, st, iters).unwrap();
                let got = emu::power_iteration(&w, st, iters).unwrap();
                compare(&what, &want, &got);
                let sigma = f64s(&got.sigma)[0];
                assert!(sigma.is_finite() && sigma > 0.0, "{what}: σ {sigma:e}");
                for x in [&got.u, &got.v] {
                    let norm = f64s(x).iter().map(|a| a * a).sum::<f64>().sqrt();
                    assert!((norm - 1.0).abs() < 1e-5, "{what}: ‖·‖ = {norm}");
                }
                if (1e-18..=1e18).contains(&scale) {
                    let rel = (sigma / scale - sigma1).abs() / sigma1;
                    assert!(rel < 1e-5, "{what}: σ/s {} vs {sigma1}", sigma / scale);
                    let (du, dv) = (max_diff(&got.u, &one.u), max_diff(&got.v, &one.v));
                    assert!(du < 1e-4 && dv < 1e-4, "{what}: |Δu| {du:e} |Δv| {dv:e}");
                }
            }
        }
    }
}

/// A start orthogonal to v₁: W = diag(3, 2, 1) (padded), start = e₂. In
/// exact arithmetic (and here, where every product is exact) the iteration
/// never leaves e₂: both paths report σ = 2, v = e₂ — the documented limit
/// of a warm start, reproduced by the kernels.
#[test]
fn start_orthogonal_to_v1() {
    for (m, n) in [(5, 3), (3, 5)] {
        let mut w = vec![0f32; m * n];
        for (k, s) in [3.0f32, 2.0, 1.0].iter().enumerate() {
            w[k * n + k] = *s;
        }
        let w = Tensor::from_vec(w, (m, n), &Device::Cpu).unwrap();
        let mut e2 = vec![0f32; n];
        e2[1] = 1.0;
        let e2 = Tensor::from_vec(e2, n, &Device::Cpu).unwrap();
        let want = power_iteration(&w, Some(&e2), 10).unwrap();
        let got = emu::power_iteration(&w, Some(&e2), 10).unwrap();
        compare(&format!("orthogonal start {m}×{n}"), &want, &got);
        assert_eq!(got.sigma.to_scalar::<f32>().unwrap(), 2.0);
        // a generic start finds σ₁ = 3
        let got = emu::power_iteration(&w, None, 30).unwrap();
        assert!((got.sigma.to_scalar::<f32>().unwrap() - 3.0).abs() < 1e-3);
    }
}

/// Unusable starts (zero, NaN, Inf) fall back to the default vector, per
/// matrix of the batch.
#[test]
fn unusable_start_falls_back_per_matrix() {
    let mut r = rng(9);
    let w = spiked(&mut r, 4, 12, 7, DType::F32, &Device::Cpu);
    let mut s = start_vec(&mut r, 4, 7, &Device::Cpu)
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    s[7..14].iter_mut().for_each(|x| *x = 0.0);
    s[14] = f32::NAN;
    s[27] = f32::INFINITY;
    let start = Tensor::from_vec(s, (4, 7), &Device::Cpu).unwrap();
    for iters in [0, 2] {
        let want = power_iteration(&w, Some(&start), iters).unwrap();
        let got = emu::power_iteration(&w, Some(&start), iters).unwrap();
        compare(&format!("unusable starts, iters {iters}"), &want, &got);
    }
}

/// A start of subnormal entries (‖v₀‖ ≈ 1e-40) is usable and normalised to
/// unit length under the kernels as on the CPU (`power_start` divides the
/// scaled start, not the start by its subnormal norm).
#[test]
fn subnormal_start_is_normalised_to_unit_length() {
    let mut r = rng(10);
    let w = spiked(&mut r, 2, 9, 6, DType::F32, &Device::Cpu);
    let start = (start_vec(&mut r, 2, 6, &Device::Cpu)
        .to_dtype(DType::F64)
        .unwrap()
        * 1e-40)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    for iters in [0, 2] {
        let want = power_iteration(&w, Some(&start), iters).unwrap();
        let got = emu::power_iteration(&w, Some(&start), iters).unwrap();
        let what = format!("subnormal start, iters {iters}");
        compare(&what, &want, &got);
        for row in f64s(&got.v).chunks(6) {
            let norm = row.iter().map(|a| a * a).sum::<f64>().sqrt();
            assert!((norm - 1.0).abs() < 1e-5, "{what}: ‖v‖ = {norm}");
        }
    }
}

/// A start of 1e-10 everywhere but one entry of 1e30, wherever that entry
/// falls among the block's threads (one place per warp, and one past the
/// block): the kernels scale by the largest magnitude before squaring, and
/// with a maximum that missed the big entry the squares would overflow (its
/// ratio to the rest is 1e40). The start normalises to ±e_p and σ = ‖W e_p‖.
#[test]
fn a_start_dominated_by_one_entry_anywhere_in_the_block() {
    let (m, n) = (400, 320);
    let mut r = rng(14);
    let w = spiked(&mut r, 1, m, n, DType::F32, &Device::Cpu)
        .squeeze(0)
        .unwrap();
    for p in (0..8).map(|warp| 32 * warp + 5).chain([256 + 37]) {
        let mut s = vec![1e-10f32; n];
        s[p] = 1e30;
        let start = Tensor::from_vec(s, n, &Device::Cpu).unwrap();
        let want = power_iteration(&w, Some(&start), 0).unwrap();
        let got = emu::power_iteration(&w, Some(&start), 0).unwrap();
        let what = format!("the big entry at {p}");
        compare(&what, &want, &got);
        let v = f64s(&got.v);
        assert!((v[p].abs() - 1.0).abs() < 1e-6, "{what}: v[p] = {}", v[p]);
    }
}

/// Converged on a matrix with a known spectrum: σ₁ to f32 precision.
#[test]
fn converges_to_sigma1() {
    let (m, n) = (60, 40);
    let mut r = rng(13);
    // W = U diag(s) Vᵀ with orthonormal U, V from a QR of Gaussians (nalgebra)
    let qu = nalgebra::DMatrix::<f64>::from_fn(m, n, |_, _| {
        rand_distr::Distribution::sample(&rand_distr::StandardNormal, &mut r)
    })
    .qr()
    .q();
    let qv = nalgebra::DMatrix::<f64>::from_fn(n, n, |_, _| {
        rand_distr::Distribution::sample(&rand_distr::StandardNormal, &mut r)
    })
    .qr()
    .q();
    let s = nalgebra::DVector::<f64>::from_fn(n, |i, _| 10.0 / (1.0 + i as f64));
    let wm = &qu * nalgebra::DMatrix::from_diagonal(&s) * qv.transpose();
    let w: Vec<f32> = (0..m)
        .flat_map(|i| (0..n).map(move |j| (i, j)))
        .map(|(i, j)| wm[(i, j)] as f32)
        .collect();
    let w = Tensor::from_vec(w, (m, n), &Device::Cpu).unwrap();
    for w in [w.clone(), w.t().unwrap().contiguous().unwrap()] {
        let got = emu::power_iteration(&w, None, 60).unwrap();
        let sigma = got.sigma.to_scalar::<f32>().unwrap();
        assert!((sigma - 10.0).abs() < 1e-4, "σ₁ = {sigma}");
    }
}

/// A group's parameters given one by one (each its own storage, one of them
/// a view at an offset into a larger tensor, as a reshaped parameter can
/// be), each warm-started from its own state vector (one zero, one NaN: no
/// start): the kernels read them through tables of addresses, give what the
/// same matrices and starts stacked into one batch give, and store each new
/// v₁ into its state vector.
#[test]
fn members_read_in_place_match_the_stacked_batch() {
    for (i, &(b, m, n)) in [(3, 40, 24), (2, 24, 40), (4, 33, 33), (2, 1, 70)]
        .iter()
        .enumerate()
    {
        let dt = [DType::F32, DType::BF16][i % 2];
        let mut r = rng(400 + i as u64);
        let batch = spiked(&mut r, b, m, n, dt, &Device::Cpu);
        let mut ws: Vec<Tensor> = (0..b)
            .map(|j| batch.get(j).unwrap().copy().unwrap())
            .collect();
        // The last member as a view 5 rows into a taller tensor.
        let padded = Tensor::cat(
            &[
                &Tensor::zeros((5, n), dt, &Device::Cpu).unwrap(),
                &ws[b - 1],
            ],
            0,
        )
        .unwrap();
        ws[b - 1] = padded.narrow(0, 5, m).unwrap();
        let start = start_vec(&mut r, b, n, &Device::Cpu);
        let mut rows: Vec<Tensor> = (0..b).map(|j| start.get(j).unwrap()).collect();
        rows[0] = rows[0].zeros_like().unwrap();
        rows[b - 1] = (rows[b - 1].clone() * f64::NAN).unwrap();
        let start = Tensor::stack(&rows, 0).unwrap();
        for iters in [0, 2] {
            let what = format!("members ({b}, {m}, {n}) {dt:?} iters {iters}");
            let vs: Vec<Var> = rows.iter().map(|s| Var::from_tensor(s).unwrap()).collect();
            let want = emu::power_iteration(&batch, Some(&start), iters).unwrap();
            let got = emu::power_iteration_members(&ws, &vs, iters).unwrap();
            compare(&what, &want, &got);
            let cpu = power_iteration(&batch, Some(&start), iters).unwrap();
            compare(&what, &cpu, &got);
            for (j, v) in vs.iter().enumerate() {
                assert_eq!(f64s(v), f64s(&got.v.get(j).unwrap()), "{what}: v₁ stored");
            }
        }
    }
}

/// The power iteration's kernels size their shared memory by the short
/// side `k` (two f32 vectors beside 34 816 B of tiles), and GPUs allow a
/// block different amounts (227 KiB on sm_90, 163 KiB on sm_80, 99 KiB on
/// sm_86/sm_89): the shapes the kernels take follow the device's limit,
/// not sm_90's, so a larger `k` goes to candle's ops instead of failing at
/// the launch. Under a limit lowered to fit `k = 64` (`emu::with_shared_max`,
/// the emulator's stand-in for the device's figure), 64×70 runs on the
/// kernels and matches the generic path, and 65×70 is not taken ("no
/// kernel"; on CUDA the dispatch then runs candle's ops); at sm_90's limit
/// both run.
#[test]
fn power_iteration_shapes_follow_the_devices_shared_memory() {
    let tiles = 34_816u32;
    let limit = tiles + 8 * 64;
    let mut r = rng(290);
    let fits = spiked(&mut r, 1, 64, 70, DType::F32, &Device::Cpu)
        .squeeze(0)
        .unwrap();
    let over = spiked(&mut r, 1, 65, 70, DType::F32, &Device::Cpu)
        .squeeze(0)
        .unwrap();
    emu::with_shared_max(limit, || {
        let got = emu::power_iteration(&fits, None, 5).unwrap();
        compare("64×70", &power_iteration(&fits, None, 5).unwrap(), &got);
        let e = emu::power_iteration(&over, None, 5)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no kernel"), "{e}");
    });
    for w in [&fits, &over] {
        let got = emu::power_iteration(w, None, 5).unwrap();
        compare("sm_90", &power_iteration(w, None, 5).unwrap(), &got);
    }
}
