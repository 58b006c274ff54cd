//! Power iteration against an f64 SVD.

mod common;

use candle_core::{DType, Device, Tensor};
use common::*;
use nalgebra::{DMatrix, DVector};
use steepest::power_iteration;

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

/// Checks σ, u, v against the SVD of `w` (top singular value simple).
fn check_against_svd(w: &DMatrix<f64>, sigma: f64, u: &DVector<f64>, v: &DVector<f64>, tol: f64) {
    let svd = w.clone().svd(true, true);
    let i = svd.singular_values.imax();
    let (s1, u1, v1) = (
        svd.singular_values[i],
        svd.u.unwrap().column(i).into_owned(),
        svd.v_t.unwrap().row(i).transpose(),
    );
    assert!((sigma - s1).abs() < tol * s1, "σ = {sigma}, SVD σ₁ = {s1}");
    assert!(
        (u.dot(&u1).abs() - 1.0).abs() < tol,
        "|⟨u, u₁⟩| = {}",
        u.dot(&u1).abs()
    );
    assert!(
        (v.dot(&v1).abs() - 1.0).abs() < tol,
        "|⟨v, v₁⟩| = {}",
        v.dot(&v1).abs()
    );
    // u and v are a consistent pair: W v = σ u.
    assert!((w * v - u * sigma).norm() < tol * s1.max(1.0));
}

#[test]
fn finds_the_top_triplet_tall_wide_square() {
    finds_the_top_triplet();
}

/// The generic path (candle's ops: Metal, f64 on CUDA) against the SVD too,
/// not only against the CPU kernels.
#[test]
fn generic_path_finds_the_top_triplet_and_runs_k_products() {
    steepest::device::with_generic_ops(|| {
        finds_the_top_triplet();
        k_iterations_are_k_products();
    });
}

fn finds_the_top_triplet() {
    let mut r = rng(10);
    for (m, n) in [(12, 7), (7, 12), (9, 9), (1, 6), (6, 1)] {
        let k = m.min(n);
        let s: Vec<f64> = (0..k).map(|i| 3.0 / (1.0 + i as f64)).collect(); // gap σ₂/σ₁ = 1/2
        let w = with_singular_values(&mut r, m, n, &s);
        let top = power_iteration(&from_dmatrix(&w, DType::F64), None, 40).unwrap();
        assert_eq!(top.u.dims(), &[m]);
        assert_eq!(top.v.dims(), &[n]);
        check_against_svd(
            &w,
            scalar(&top.sigma),
            &to_dvector(&top.u),
            &to_dvector(&top.v),
            1e-10,
        );
    }
}

/// `iters` means `iters` products with `WᵀW` (or `W Wᵀ` on the short side
/// of a wide matrix), checked in f64 for 0–3 iterations from a given start
/// against the closed form: tall or square, `v = (WᵀW)ᵏx₀/‖·‖`, `σ = ‖Wv‖`,
/// `u = Wv/σ`; wide, `u = (W Wᵀ)ᵏ y₀/‖·‖` with `y₀ = W x₀/‖·‖`, `σ = ‖Wᵀu‖`,
/// `v = Wᵀu/σ`. (Converged results cannot tell one iteration more or less.)
#[test]
fn k_iterations_are_k_products_with_the_gram_matrix() {
    k_iterations_are_k_products();
}

fn k_iterations_are_k_products() {
    let mut r = rng(17);
    for (m, n) in [(7, 4), (5, 5), (4, 7)] {
        let w = DMatrix::<f64>::from_fn(m, n, |_, _| normal_vec(&mut r, 1)[0]);
        let x0 = DVector::from_vec(normal_vec(&mut r, n));
        let start = Tensor::from_vec(x0.as_slice().to_vec(), n, &Device::Cpu).unwrap();
        let t = from_dmatrix(&w, DType::F64);
        let mut seen: Vec<DVector<f64>> = Vec::new();
        for k in 0..4 {
            let top = power_iteration(&t, Some(&start), k).unwrap();
            let (sigma, u, v) = if n <= m {
                let mut v = x0.normalize();
                for _ in 0..k {
                    v = (w.transpose() * (&w * &v)).normalize();
                }
                let wv = &w * &v;
                (wv.norm(), &wv / wv.norm(), v)
            } else {
                let mut u = (&w * &x0).normalize();
                for _ in 0..k {
                    u = (&w * (w.transpose() * &u)).normalize();
                }
                let wtu = w.transpose() * &u;
                (wtu.norm(), u, &wtu / wtu.norm())
            };
            let what = format!("({m}, {n}), {k} iterations");
            assert!(
                (scalar(&top.sigma) - sigma).abs() < 1e-12 * sigma,
                "{what}: σ"
            );
            assert!((to_dvector(&top.u) - &u).amax_nan() < 1e-12, "{what}: u");
            assert!((to_dvector(&top.v) - &v).amax_nan() < 1e-12, "{what}: v");
            // Each iteration moves the iterate (the check is not vacuous).
            let iterate = if n <= m { v } else { u };
            assert!(seen.iter().all(|s| (s - &iterate).amax() > 1e-6), "{what}");
            seen.push(iterate);
        }
    }
}

#[test]
fn random_gaussian_matrices_f32() {
    let mut r = rng(11);
    for (m, n) in [(16, 8), (8, 16), (10, 10)] {
        let w = randn(&mut r, &[m, n], DType::F32);
        let wd = to_dmatrix(&w);
        let top = power_iteration(&w, None, 300).unwrap();
        let s1 = singular_values(&wd)[0];
        let sigma = scalar(&top.sigma);
        assert!(
            (sigma - s1).abs() < 1e-4 * s1,
            "{m}x{n}: σ = {sigma} vs {s1}"
        );
    }
}

#[test]
fn batch_matches_each_matrix_and_warm_start_shapes() {
    let mut r = rng(12);
    for (m, n) in [(8, 5), (5, 8)] {
        let mats: Vec<DMatrix<f64>> = (0..3)
            .map(|_| with_singular_values(&mut r, m, n, &[4.0, 2.0, 1.0, 0.5, 0.25]))
            .collect();
        let batch = Tensor::stack(
            &mats
                .iter()
                .map(|w| from_dmatrix(w, DType::F64))
                .collect::<Vec<_>>(),
            0,
        )
        .unwrap();
        let top = power_iteration(&batch, None, 40).unwrap();
        assert_eq!(
            (top.sigma.dims(), top.u.dims(), top.v.dims()),
            (&[3][..], &[3, m][..], &[3, n][..])
        );
        for (i, w) in mats.iter().enumerate() {
            check_against_svd(
                w,
                scalar(&top.sigma.get(i).unwrap()),
                &to_dvector(&top.u.get(i).unwrap()),
                &to_dvector(&top.v.get(i).unwrap()),
                1e-10,
            );
        }
    }
}

#[test]
fn finds_sigma1_when_v1_is_orthogonal_to_all_ones() {
    // Every row sums to zero, so W·1 = 0 and all-ones is a useless start.
    let mut r = rng(13);
    for (m, n) in [(6, 4), (4, 6)] {
        let mut w = DMatrix::from_vec(m, n, normal_vec(&mut r, m * n));
        for i in 0..m {
            let mean = w.row(i).sum() / n as f64;
            for j in 0..n {
                w[(i, j)] -= mean;
            }
        }
        assert!((&w * DVector::from_element(n, 1.0)).norm() < 1e-12);
        let top = power_iteration(&from_dmatrix(&w, DType::F64), None, 500).unwrap();
        let s1 = singular_values(&w)[0];
        assert!(
            (scalar(&top.sigma) - s1).abs() < 1e-8 * s1,
            "σ = {} vs {s1}",
            scalar(&top.sigma)
        );
    }
}

#[test]
fn zero_matrix_gives_zero_sigma_and_finite_vectors() {
    for dt in [DType::F32, DType::F64, DType::BF16] {
        for (m, n) in [(4, 3), (3, 4)] {
            let z = Tensor::zeros((m, n), dt, &Device::Cpu).unwrap();
            let top = power_iteration(&z, None, 5).unwrap();
            assert_eq!(scalar(&top.sigma), 0.0);
            let v = to_dvector(&top.v);
            let u = to_dvector(&top.u);
            assert!(v.iter().chain(u.iter()).all(|x| x.is_finite()));
            assert!(
                (v.norm() - 1.0).abs() < 1e-6,
                "v should stay a unit vector, ‖v‖ = {}",
                v.norm()
            );
        }
    }
}

#[test]
fn equal_top_singular_values() {
    let mut r = rng(14);
    let w = with_singular_values(&mut r, 7, 5, &[2.0, 2.0, 1.0, 0.5, 0.1]);
    let top = power_iteration(&from_dmatrix(&w, DType::F64), None, 60).unwrap();
    let v = to_dvector(&top.v);
    assert!((scalar(&top.sigma) - 2.0).abs() < 1e-10);
    // v lies in the top-2 right singular subspace: ‖W v‖ = σ₁.
    assert!(((&w * &v).norm() - 2.0).abs() < 1e-10);
}

#[test]
fn warm_start_with_v1_is_exact_in_one_iteration() {
    let mut r = rng(15);
    let w = with_singular_values(&mut r, 9, 6, &[5.0, 4.9, 1.0, 1.0, 0.5, 0.1]); // tiny gap
    let v1 = w.clone().svd(false, true).v_t.unwrap().row(0).transpose();
    let start = Tensor::from_vec(v1.as_slice().to_vec(), 6, &Device::Cpu).unwrap();
    let wt = from_dmatrix(&w, DType::F64);
    let warm = power_iteration(&wt, Some(&start), 1).unwrap();
    assert!((scalar(&warm.sigma) - 5.0).abs() < 1e-12);
    // Cold, one iteration is far off with this gap: the warm start is doing the work.
    let cold = power_iteration(&wt, None, 1).unwrap();
    assert!((scalar(&cold.sigma) - 5.0).abs() > 1e-4);
    // A wide matrix takes the same v start.
    let wide = power_iteration(
        &wt.t().unwrap().contiguous().unwrap(),
        Some(&vec_to_tensor(
            &w.clone().svd(true, false).u.unwrap().column(0).into_owned(),
        )),
        1,
    )
    .unwrap();
    assert!((scalar(&wide.sigma) - 5.0).abs() < 1e-12);
}

fn vec_to_tensor(v: &DVector<f64>) -> Tensor {
    Tensor::from_vec(v.as_slice().to_vec(), v.len(), &Device::Cpu).unwrap()
}

#[test]
fn half_precision_weights() {
    let mut r = rng(16);
    let w = with_singular_values(&mut r, 8, 6, &[3.0, 1.0, 0.5]);
    for dt in [DType::F16, DType::BF16] {
        let t = from_dmatrix(&w, dt);
        let top = power_iteration(&t, None, 30).unwrap();
        assert_eq!(top.sigma.dtype(), DType::F32);
        let s1 = singular_values(&to_dmatrix(&t))[0]; // σ₁ of the rounded matrix
        assert!((scalar(&top.sigma) - s1).abs() < 1e-5 * s1, "{dt:?}");
    }
}

#[test]
fn bad_inputs() {
    let w = Tensor::zeros((4, 3), DType::F32, &Device::Cpu).unwrap();
    let bad_start = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
    let e = power_iteration(&w, Some(&bad_start), 1)
        .unwrap_err()
        .to_string();
    assert!(e.contains("start") && e.contains("[3]"), "{e}");
    let v = Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap();
    let e = power_iteration(&v, None, 1).unwrap_err().to_string();
    assert!(e.contains("power_iteration"), "{e}");
    // A NaN start is ignored in favour of the default.
    let mut r = rng(17);
    let w = with_singular_values(&mut r, 6, 4, &[2.0, 1.0]);
    let nan = Tensor::from_vec(vec![f64::NAN; 4], 4, &Device::Cpu).unwrap();
    let top = power_iteration(&from_dmatrix(&w, DType::F64), Some(&nan), 60).unwrap();
    assert!((scalar(&top.sigma) - 2.0).abs() < 1e-10);
}

/// A NaN or ±Inf in `W` gives `σ = NaN` (documented; not a finite estimate),
/// tall and wide, and leaves the other matrices of a batch alone.
#[test]
fn non_finite_input_gives_a_nan_sigma() {
    let mut r = rng(78);
    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
        for (m, n) in [(6, 4), (4, 6), (1, 5)] {
            let mut v = normal_vec(&mut r, 2 * m * n);
            v[2] = bad;
            let w = Tensor::from_vec(v, (2, m, n), &Device::Cpu)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            for (path, top) in [
                ("cpu", power_iteration(&w, None, 3).unwrap()),
                (
                    "emulated kernels",
                    steepest::device::emu::power_iteration(&w, None, 3).unwrap(),
                ),
            ] {
                let s = to_f64_vec(&top.sigma);
                assert!(
                    s[0].is_nan() && s[1].is_finite(),
                    "{bad} {m}×{n} {path}: σ = {s:?}"
                );
            }
        }
    }
}
