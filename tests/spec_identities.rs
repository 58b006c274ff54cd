//! The identities of docs/math.md §1–§4 that the optimizers rely on, each
//! checked against an independent computation done here (central finite
//! differences of norms computed by nalgebra's f64 SVD, or an exact closed
//! form), not against the crate's own code path:
//!
//! - §1 `∇‖W‖₂ = u₁v₁ᵀ` ([`theta`]) and power iteration's rate `(σ₂/σ₁)²` per
//!   iteration;
//! - §3 `∇‖G‖_* = msign(G)`, `∂_λ‖G + λΘ‖_* = tr(ΘᵀΦ)`, and the Stiefel dual
//!   gradient `(WᵀΦ + ΦᵀW)/2` (the crate steps along twice that);
//! - §4 the Newton–Schulz tables against the literal numbers of SPEC.md;
//! - §2 one sphere step of radius `r` against its closed form.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::*;
use nalgebra::{DMatrix, DVector};
use steepest::linalg::{theta, top_singular_precise};
use steepest::optim::steepest::{spectral_sphere_direction, stiefel_direction};
use steepest::optim::NamedVar;
use steepest::{msign, power_iteration, DualAscent, Manifold, NewtonSchulz, Norm, Steepest};
use steepest::{SteepestConfig, TopSingular};

fn t64(a: &DMatrix<f64>) -> Tensor {
    from_dmatrix(a, DType::F64)
}

fn scalar(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64).unwrap().to_scalar::<f64>().unwrap()
}

/// `‖A‖₂` by nalgebra's SVD.
fn spectral_norm(a: &DMatrix<f64>) -> f64 {
    singular_values(a)[0]
}

/// `‖A‖_*` by nalgebra's SVD.
fn nuclear_norm(a: &DMatrix<f64>) -> f64 {
    singular_values(a).iter().sum()
}

/// The central-difference gradient of `f` at `a`, entry by entry, step `h`.
fn fd_gradient(a: &DMatrix<f64>, h: f64, f: impl Fn(&DMatrix<f64>) -> f64) -> DMatrix<f64> {
    DMatrix::from_fn(a.nrows(), a.ncols(), |i, j| {
        let mut plus = a.clone();
        plus[(i, j)] += h;
        let mut minus = a.clone();
        minus[(i, j)] -= h;
        (f(&plus) - f(&minus)) / (2.0 * h)
    })
}

/// Max absolute entry of `a − b`.
fn max_abs(a: &DMatrix<f64>, b: &DMatrix<f64>) -> f64 {
    (a - b).abs().max()
}

/// A Newton–Schulz schedule that converges to the polar factor in f64 on
/// the (well-conditioned) inputs below: 30 cubic steps take the smallest
/// normalised singular value (≥ 0.02 here) to 1 in ≈ 10 steps, then
/// converge quadratically.
fn exact_ns() -> NewtonSchulz {
    NewtonSchulz::cubic(30)
}

/// Guard: the crate's `msign` really is the polar factor here (f64 SVD), so
/// the checks below test the identities, not the iteration's accuracy.
fn crate_msign(a: &DMatrix<f64>) -> DMatrix<f64> {
    let phi = to_dmatrix(&msign(&t64(a), &exact_ns()).unwrap());
    let err = rel_err(&phi, &polar(a));
    assert!(err < 1e-12, "msign vs the SVD polar factor: {err:e}");
    phi
}

/// §1: `∇_W ‖W‖₂ = u₁v₁ᵀ = Θ`. [`theta`] of the crate's top singular triplet
/// (from [`top_singular_precise`] and from [`power_iteration`]) against the
/// central differences of `‖W‖₂` (nalgebra SVD), `h = 1e-6`, on a tall and a
/// wide matrix with `σ₂/σ₁ = 2/3`. The FD error is `O(h²/(σ₁ − σ₂))` ≈ 1e-12
/// plus the SVD's rounding over `h`, ≈ 1e-9; measured max |Θ − FD| = 0.9e-9
/// (9×5) and 1.5e-9 (5×9), on entries up to 0.45. A wrong formula fails by O(1):
/// `σ₁u₁v₁ᵀ` (the gradient of `½‖W‖₂²`) is 3× too large here, `W/‖W‖_F`
/// (Frobenius) or `u₂v₂ᵀ` differ from `Θ` by O(1) in Frobenius norm (√2 for
/// `u₂v₂ᵀ`), and a `u` whose sign does not match `v` flips every entry.
#[test]
fn spectral_norm_gradient_is_theta() {
    let mut r = rng(101);
    for (m, n) in [(9usize, 5usize), (5, 9)] {
        let w = with_singular_values(&mut r, m, n, &[3.0, 2.0, 1.5, 1.0, 0.5]);
        let fd = fd_gradient(&w, 1e-6, spectral_norm);
        let tops: [(&str, TopSingular); 2] = [
            (
                "top_singular_precise",
                top_singular_precise(&t64(&w), None).unwrap(),
            ),
            (
                "power_iteration(200)",
                power_iteration(&t64(&w), None, 200).unwrap(),
            ),
        ];
        for (who, top) in tops {
            let th = to_dmatrix(&theta(&top).unwrap());
            assert_eq!(th.shape(), (m, n));
            let d = max_abs(&th, &fd);
            println!(
                "{m}x{n} {who}: max |Θ − FD| = {d:e}, max |FD| = {:e}",
                fd.abs().max()
            );
            assert!(d < 1e-8, "{m}x{n} {who}: max |Θ − ∇‖W‖₂ (FD)| = {d:e}");
        }
    }
}

/// §3: `∇_G ‖G‖_* = msign(G)`. The crate's `msign` (30 cubic steps, f64)
/// against central differences of the nuclear norm (nalgebra SVD), `h =
/// 1e-6`, tall, wide and square Gaussian `G`. Measured max |msign − FD|
/// = 2.0e-9, 2.4e-9, 2.3e-9 (7×4, 4×7, 5×5). A wrong formula fails by
/// O(1): `G/‖G‖_F` or `G/‖G‖₂` differ from the polar factor by O(1) in
/// Frobenius norm (their singular values are not all 1), and Muon's 5-step
/// table (singular values left in [0.7, 1.2]) is asserted to miss by > 1e-3.
#[test]
fn nuclear_norm_gradient_is_msign() {
    let mut r = rng(102);
    for (m, n) in [(7usize, 4usize), (4, 7), (5, 5)] {
        let g = DMatrix::from_vec(m, n, normal_vec(&mut r, m * n));
        let phi = crate_msign(&g);
        let fd = fd_gradient(&g, 1e-6, nuclear_norm);
        let d = max_abs(&phi, &fd);
        println!("{m}x{n}: max |msign(G) − FD| = {d:e}");
        assert!(d < 1e-7, "{m}x{n}: max |msign(G) − ∇‖G‖_* (FD)| = {d:e}");
        let muon = to_dmatrix(&msign(&t64(&g), &NewtonSchulz::muon()).unwrap());
        assert!(max_abs(&muon, &fd) > 1e-3, "Muon's table is not exact");
    }
}

/// §3: `∂_λ ‖G + λΘ‖_* = tr(ΘᵀΦ)`, `Φ = msign(G + λΘ)`: central differences
/// in `λ` (`h = 1e-6`, nalgebra nuclear norm) against the trace with the
/// crate's `Φ`, for `λ` on both sides of `λ*`. Then the crate's dual step
/// ([`spectral_sphere_direction`], one step) moves `λ` by `−η₂` times exactly
/// that derivative (factor 1; compare the Stiefel step below), with `G`
/// normalised to `Ĝ = G·√k/‖G‖_F` (done here independently). Measured
/// |tr − FD| ≤ 2.1e-9 on values from 0.03 to 0.67 in magnitude (e.g. λ = 2:
/// tr 0.569738623743, FD 0.569738624279); the dual step's residual 0.3379338561
/// against FD 0.3379338547. Wrong formulas: `−tr(ΘᵀΦ)`
/// (the sign) or `tr(ΘᵀG)` fail wherever the derivative is not ≈ 0.
#[test]
fn nuclear_norm_derivative_along_theta() {
    let mut r = rng(103);
    let (m, n) = (8usize, 5usize);
    let w = DMatrix::from_vec(m, n, normal_vec(&mut r, m * n));
    let svd = w.clone().svd(true, true);
    let i = svd.singular_values.imax();
    let u1 = svd.u.as_ref().unwrap().column(i).into_owned();
    let v1 = svd.v_t.as_ref().unwrap().row(i).transpose();
    let th = &u1 * v1.transpose();
    let g = DMatrix::from_vec(m, n, normal_vec(&mut r, m * n));
    let h = 1e-6;
    let mut nonzero = 0;
    for lam in [-3.0, -1.0, -0.3, 0.0, 0.5, 2.0] {
        let phi = crate_msign(&(&g + &th * lam));
        let tr = th.dot(&phi);
        let fd = (nuclear_norm(&(&g + &th * (lam + h))) - nuclear_norm(&(&g + &th * (lam - h))))
            / (2.0 * h);
        println!("λ = {lam}: tr(ΘᵀΦ) = {tr:.12}, FD = {fd:.12}");
        assert!((tr - fd).abs() < 1e-7, "λ = {lam}: tr(ΘᵀΦ) = {tr}, FD {fd}");
        if fd.abs() > 0.05 {
            nonzero += 1;
        }
    }
    assert!(nonzero >= 4, "the check must see non-zero derivatives");

    // The crate's dual step on the spectral sphere: λ ← λ − η₂·∂_λ‖Ĝ + λΘ‖_*.
    let k = m.min(n) as f64;
    let g_hat = &g * (k.sqrt() / g.norm());
    let (lam, lr) = (0.4, 0.5);
    let dual = DualAscent {
        lr: Some(lr),
        steps: 1,
        sign: false,
        smoothing: None,
        bracket: None,
    };
    let scalar_t = |x: f64| Tensor::new(x, &Device::Cpu).unwrap();
    let step =
        spectral_sphere_direction(&t64(&g), &t64(&th), &scalar_t(lam), &dual, &exact_ns()).unwrap();
    let fd = (nuclear_norm(&(&g_hat + &th * (lam + h)))
        - nuclear_norm(&(&g_hat + &th * (lam - h))))
        / (2.0 * h);
    let residual = scalar(&step.residual);
    let moved = (lam - scalar(&step.multiplier)) / lr;
    println!("spectral sphere: residual {residual:.12}, (λ − λ')/η₂ {moved:.12}, FD {fd:.12}");
    assert!(fd.abs() > 0.05);
    assert!((residual - fd).abs() < 1e-7 && (moved - fd).abs() < 1e-7);
}

/// §3, Stiefel: for symmetric `X` the gradient of `X ↦ ‖G + WX‖_*` is
/// `(WᵀΦ + ΦᵀW)/2`, `Φ = msign(G + WX)` — half of SPEC.md §3's
/// `WᵀΦ + ΦᵀW`. Proof: `d/dt ‖G + W(X + tS)‖_* = ⟨Φ, WS⟩ = ⟨WᵀΦ, S⟩ =
/// ⟨sym(WᵀΦ), S⟩` for symmetric `S`. Checked by central differences along
/// random symmetric directions `S` (nalgebra nuclear norm, `h = 1e-6`), with
/// the residual `WᵀΦ + ΦᵀW` and the updated `X` of the crate's
/// [`stiefel_direction`] (one dual step, `Ĝ = G·√m/‖G‖_F` formed here
/// independently). The crate's step `X ← X − η₂(WᵀΦ + ΦᵀW)` is therefore
/// twice the gradient step: the ratio `⟨WᵀΦ + ΦᵀW, S⟩ / FD` is 2 (measured
/// 2 ± 3e-8, |FD| from 0.02 to 4.4); the factor is absorbed into `η₂` (docs/math.md §3). A test
/// of SPEC's formula as a gradient (ratio 1) fails by 100%. The nearly
/// square shapes (7×5, 10×5: `n ≤ 2m`) check the smoothed dual the crate
/// descends there, `Σᵢ √(σᵢ² + μ²)` (`μ = 0.1`) and its
/// `Φ = M(MᵀM + μ²I)^{-1/2}`, the same way.
#[test]
fn stiefel_dual_gradient_is_half_the_symmetrised_product() {
    let mut r = rng(104);
    // 7×5 and 10×5 are nearly square (n ≤ 2m): there the crate descends the
    // smoothed dual Σ√(σᵢ² + μ²), μ = 0.1, with Φ = M(MᵀM + μ²I)^{-1/2}; the
    // same identity holds for it (d/dt Σ√(σᵢ² + μ²) = ⟨Φ, WS⟩).
    for (n, m) in [(8usize, 3usize), (12, 5), (7, 5), (10, 5)] {
        let mu = if n <= 2 * m { 0.1 } else { 0.0 };
        let w = orthonormal(&mut r, n, m);
        let g = DMatrix::from_vec(n, m, normal_vec(&mut r, n * m)) * 3.7;
        let x = random_symmetric(&mut r, m, 0.3);
        let g_hat = &g * ((m as f64).sqrt() / g.norm());
        let lr = 0.05;
        let dual = DualAscent {
            lr: Some(lr),
            steps: 1,
            sign: false,
            smoothing: None,
            bracket: None,
        };
        let step = stiefel_direction(&t64(&g), &t64(&w), &t64(&x), &dual, &exact_ns()).unwrap();
        let residual = to_dmatrix(&step.residual);
        let x_new = to_dmatrix(&step.multiplier);
        // The crate's Φ is msign(Ĝ + WX) (f64 SVD), or its smoothed form,
        // its residual WᵀΦ + ΦᵀW.
        let svd = (&g_hat + &w * &x).svd(true, true);
        let shrink = svd.singular_values.map(|s| s / (s * s + mu * mu).sqrt());
        let phi = svd.u.unwrap() * DMatrix::from_diagonal(&shrink) * svd.v_t.unwrap();
        assert!(rel_err(&to_dmatrix(&step.phi), &phi) < 1e-12);
        let sym2 = w.transpose() * &phi + phi.transpose() * &w;
        assert!(max_abs(&residual, &sym2) < 1e-12);
        assert!(max_abs(&((&x - &x_new) / lr), &residual) < 1e-12);
        let f = |t: f64, s: &DMatrix<f64>| {
            let a = &g_hat + &w * (&x + s * t);
            if mu == 0.0 {
                nuclear_norm(&a)
            } else {
                let sv = a.singular_values();
                sv.iter().map(|s| (s * s + mu * mu).sqrt()).sum()
            }
        };
        let h = 1e-6;
        let mut steep = 0;
        for _ in 0..8 {
            let s = random_symmetric(&mut r, m, 1.0);
            let fd = (f(h, &s) - f(-h, &s)) / (2.0 * h);
            let grad = (&residual * 0.5).dot(&s);
            let ratio = residual.dot(&s) / fd;
            println!("{n}x{m}: FD {fd:.12}, ⟨(WᵀΦ+ΦᵀW)/2, S⟩ {grad:.12}, ratio {ratio:.12}");
            assert!((grad - fd).abs() < 1e-7, "FD {fd} vs gradient {grad}");
            // The ratio only where the direction is not too flat for it.
            if fd.abs() > 0.05 {
                steep += 1;
                assert!((ratio - 2.0).abs() < 1e-6, "ratio {ratio}");
            }
        }
        assert!(steep >= 4, "{n}×{m}: {steep} directions steep enough");
    }
}

/// `tan∠(x, v₁)` for unit `v₁`.
fn tan_angle(x: &DVector<f64>, v1: &DVector<f64>) -> f64 {
    let c = x.dot(v1).abs();
    let s = (x - v1 * x.dot(v1)).norm();
    s / c
}

/// §1: power iteration's angle to `v₁` falls by `(σ₂/σ₁)²` per iteration.
/// `W` (tall 10×6 and wide 6×10) has singular values `1, 0.8, 0.5, 0.4,
/// 0.3, 0.2`. From the same random start, the crate's iterates after `t = 10`
/// and `t + k = 18` iterations give `tan∠_t / tan∠_{t+k}` against
/// `(σ₁/σ₂)^{2k} = 0.8^{−16} ≈ 35.53`.
///
/// Tolerance: in exact arithmetic `x_t ∝ (WᵀW)^t x_0`, so with `x_0 = Σ cᵢvᵢ`,
/// `tan∠_t = (σ₂/σ₁)^{2t} |c₂/c₁| · √(1 + Σ_{i≥3} (cᵢ/c₂)² (σᵢ/σ₂)^{4t})`;
/// the ratio deviates from `0.8^{−2k}` by at most `½ Σ_{i≥3} (cᵢ/c₂)² ·
/// 0.625^{40}` ≈ 7e-9·Σ(cᵢ/c₂)² (to first order it *is* the deviation),
/// computed below from the start vector; the test allows that bound plus
/// 1e-6 for rounding (tan∠ ≥ 5e-5 here, so f64 rounding contributes
/// ~1e-11) — far inside the 5% one might allow. Measured: 35.527137 both
/// times, relative deviation 1.20e-9 against a bound of 1.20e-9 (tall) and
/// 3.3e-10 against 2.1e-9 (wide). A rate of `σ₂/σ₁` per iteration (no
/// square) gives 5.96, one of `(σ₂/σ₁)⁴` gives 1262. For the wide matrix the crate iterates on `u`
/// and returns `v ∝ Wᵀu`, one power of `WᵀW` more; the ratio is the same.
#[test]
fn power_iteration_angle_falls_by_the_squared_gap() {
    let mut r = rng(105);
    let s: [f64; 6] = [1.0, 0.8, 0.5, 0.4, 0.3, 0.2];
    let (t, k) = (10usize, 8usize);
    let want = (s[1] / s[0]).powi(-2 * k as i32);
    for (m, n) in [(10usize, 6usize), (6, 10)] {
        let w = with_singular_values(&mut r, m, n, &s);
        let svd = w.clone().svd(true, true);
        // v_i sorted by singular value.
        let mut idx: Vec<usize> = (0..s.len()).collect();
        idx.sort_by(|&a, &b| svd.singular_values[b].total_cmp(&svd.singular_values[a]));
        let vt = svd.v_t.unwrap();
        let vs: Vec<DVector<f64>> = idx.iter().map(|&i| vt.row(i).transpose()).collect();
        let x0 = DVector::from_vec(normal_vec(&mut r, n));
        // The start's coefficients cᵢ = ⟨vᵢ, x0⟩ (for the wide matrix the
        // returned v is ∝ (WᵀW)^{t+1} x0, which only shrinks the bound).
        let c: Vec<f64> = vs.iter().map(|v| v.dot(&x0)).collect();
        let bound: f64 = (2..s.len())
            .map(|i| 0.5 * (c[i] / c[1]).powi(2) * (s[i] / s[1]).powi(4 * t as i32))
            .sum();
        assert!(bound < 1e-3, "start too unlucky: deviation bound {bound:e}");
        let start = Tensor::from_vec(x0.as_slice().to_vec(), n, &Device::Cpu).unwrap();
        let tan_after = |iters: usize| {
            let top = power_iteration(&t64(&w), Some(&start), iters).unwrap();
            let v = DVector::from_vec(top.v.to_vec1::<f64>().unwrap());
            tan_angle(&v, &vs[0])
        };
        let (a, b) = (tan_after(t), tan_after(t + k));
        let ratio = a / b;
        println!(
            "{m}x{n}: tan∠ after {t}: {a:e}, after {}: {b:e}, ratio {ratio:.6} vs 0.8^-16 = {want:.6} (relative deviation {:e}, bound {bound:e})",
            t + k,
            ratio / want - 1.0
        );
        assert!(b > 1e-6, "angle too small to measure a rate: {b:e}");
        assert!(
            (ratio / want - 1.0).abs() <= bound + 1e-6,
            "{m}x{n}: tan∠ ratio {ratio} vs (σ₁/σ₂)^{} = {want} (allowed relative deviation {bound:e} + 1e-6)",
            2 * k
        );
    }
}

/// SPEC.md §4, Polar Express, transcribed literally (before the safety
/// scaling).
const SPEC_POLAR_EXPRESS: [[f64; 3]; 8] = [
    [8.28721201814563, -23.595886519098837, 17.300387312530933],
    [4.107059111542203, -2.9478499167379106, 0.5448431082926601],
    [3.9486908534822946, -2.908902115962949, 0.5518191394370137],
    [3.3184196573706015, -2.488488024314874, 0.51004894012372],
    [2.300652019954817, -1.6689039845747493, 0.4188073119525673],
    [1.891301407787398, -1.2679958271945868, 0.37680408948524835],
    [1.8750014808534479, -1.2500016453999487, 0.3750001645474248],
    [1.875, -1.25, 0.375],
];

/// SPEC.md §4, Jiacheng You's 5 steps.
const SPEC_YOU: [[f64; 3]; 5] = [
    [4.0848, -6.8946, 2.9270],
    [3.9505, -6.3029, 2.6377],
    [3.7418, -5.5913, 2.3037],
    [2.8769, -3.1427, 1.2046],
    [2.8366, -3.0525, 1.2012],
];

/// SPEC.md §4, Keller Jordan's quintic.
const SPEC_MUON: [f64; 3] = [3.4445, -4.7750, 2.0315];

fn assert_table(who: &str, got: &[[f64; 3]], want: &[[f64; 3]]) {
    assert_eq!(got.len(), want.len(), "{who}: number of steps");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        for j in 0..3 {
            assert!(
                (g[j] - w[j]).abs() <= 1e-15 * w[j].abs(),
                "{who} step {i} coefficient {j}: {} vs SPEC {}",
                g[j],
                w[j]
            );
        }
    }
}

/// §4: the Newton–Schulz tables against SPEC.md's literal numbers.
///
/// Safety-scaling convention (the reference code's): the *table's* first
/// seven entries — `coeffs_list[:-1]` — are replaced by `(a/1.01, b/1.01³,
/// c/1.01⁵)` before the run takes its first `n` entries, repeating the
/// unscaled eighth `(1.875, −1.25, 0.375)` beyond 8. So
/// `polar_express(n)` for `n ≤ 7` scales *every* step (its last included),
/// for `n = 8` every step but the last, and for `n > 8` steps 0–6 only. The
/// input is normalised by `‖X‖_F·1.01 + 1e-7`. A rule "every step of the run
/// but its last" would leave step `n − 1` unscaled for `n < 8` and fail here
/// by 1–5%.
///
/// Convergence: the quintic `(3, −16/5, 6/5)` (`p(1) = 1`, `p'(1) = −3/5`,
/// so the error near 1 contracts by 0.6 a step) takes `msign`'s error against
/// the SVD polar factor down monotonically, below 1e-6 by 80 steps in f64,
/// on a 12×8 matrix with singular values from 1 to 1e-4 (measured relative
/// Frobenius error: 0.53 after 5 steps, 2.3e-2 after 10, 1.1e-4 after 20,
/// 4.0e-9 after 40, 1.9e-13 after 80).
#[test]
fn newton_schulz_tables_match_the_spec() {
    let muon = NewtonSchulz::muon();
    assert_table("muon", muon.coefficients(), &[SPEC_MUON; 5]);
    assert_eq!((muon.norm_scale(), muon.eps()), (1.0, 1e-7));
    let you = NewtonSchulz::you();
    assert_table("you", you.coefficients(), &SPEC_YOU);
    assert_eq!((you.norm_scale(), you.eps()), (1.0, 1e-7));

    let safe = |[a, b, c]: [f64; 3]| [a / 1.01, b / (1.01 * 1.01 * 1.01), c / 1.01f64.powi(5)];
    let scaled: Vec<[f64; 3]> = SPEC_POLAR_EXPRESS[..7]
        .iter()
        .map(|&e| safe(e))
        .chain([SPEC_POLAR_EXPRESS[7]])
        .collect();
    for n in 1..=12 {
        let want: Vec<[f64; 3]> = (0..n).map(|i| scaled[i.min(7)]).collect();
        let pe = NewtonSchulz::polar_express(n);
        assert_table(&format!("polar_express({n})"), pe.coefficients(), &want);
        assert_eq!(
            (pe.norm_scale(), pe.eps()),
            (1.01, 1e-7),
            "polar_express({n})"
        );
    }
    // The scaling really is there: step 0 differs from SPEC's raw entry by 1%.
    let raw = SPEC_POLAR_EXPRESS[0][0];
    assert!((NewtonSchulz::polar_express(1).coefficients()[0][0] - raw / 1.01).abs() < 1e-14);

    // The exact quintic converges.
    let q = NewtonSchulz::quintic(1).coefficients()[0];
    assert_table("quintic", &[q], &[[3.0, -16.0 / 5.0, 6.0 / 5.0]]);
    let mut r = rng(106);
    let s: Vec<f64> = (0..8).map(|i| 10f64.powf(-4.0 * i as f64 / 7.0)).collect();
    let g = with_singular_values(&mut r, 12, 8, &s);
    let exact = polar(&g);
    let mut last = f64::INFINITY;
    for steps in [5, 10, 20, 40, 80] {
        let out = to_dmatrix(&msign(&t64(&g), &NewtonSchulz::quintic(steps)).unwrap());
        let err = rel_err(&out, &exact);
        println!("quintic({steps}): relative error {err:e}");
        assert!(
            err < last || err < 1e-12,
            "quintic({steps}): {err:e} after {last:e}"
        );
        last = err;
    }
    assert!(last < 1e-6, "quintic(80): {last:e}");
}

/// §2: one step on the sphere of radius `r` with the Euclidean norm. With
/// `‖w‖ = r`, `g = αw + βt` (`t ⟂ w` unit, `β > 0`) the tangent direction is
/// `φ = t`, and the crate's rule `w ← r·(w − ηφ)/‖w − ηφ‖` is
/// `(w − ηφ)/√(1 + (η/r)²)`: `η` is a Euclidean step length, the angle moved
/// is `atan(η/r)` — the unit-sphere rule on `w/r` with step `η/r`. One
/// `Steepest` step (momentum 0, `Manifold::Sphere { radius }`) against that
/// closed form, f64, to 1e-12 (measured 2.2e-16; angle 0.119428926018
/// = atan(0.12)). Wrong rules fail by
/// O(η): the unit-sphere formula unscaled, `(w − ηφ)/√(1 + η²)`, leaves the
/// sphere (norm 2.41 instead of 2.5 here), and `r·(ŵ − ηφ)/√(1 + η²)` (η as an
/// angle step) moves by atan(0.3) instead of atan(0.12).
#[test]
fn sphere_step_of_radius_r_closed_form() {
    let mut r = rng(107);
    let (n, radius, eta) = (9usize, 2.5, 0.3);
    let w0 = DVector::from_vec(normal_vec(&mut r, n));
    let w0 = &w0 * (radius / w0.norm());
    let mut t = DVector::from_vec(normal_vec(&mut r, n));
    t -= &w0 * (t.dot(&w0) / (radius * radius));
    t /= t.norm();
    let g = &w0 * 0.7 + &t * 1.9;
    let var = Var::from_tensor(&Tensor::from_vec(w0.as_slice().to_vec(), n, &Device::Cpu).unwrap())
        .unwrap();
    let mut opt = Steepest::from_named(
        vec![NamedVar {
            name: "w".into(),
            var: var.clone(),
        }],
        SteepestConfig {
            lr: eta,
            momentum: 0.0,
            nesterov: false,
            norm: Norm::Euclidean,
            manifold: Manifold::Sphere { radius },
            ..Default::default()
        },
    )
    .unwrap();
    let gt = Tensor::from_vec(g.as_slice().to_vec(), n, &Device::Cpu).unwrap();
    opt.step_subset(&[(0, gt)]).unwrap();
    let got = DVector::from_vec(var.as_tensor().to_vec1::<f64>().unwrap());
    let want = (&w0 - &t * eta) / (1.0 + (eta / radius).powi(2)).sqrt();
    let d = (&got - &want).amax_nan();
    let angle = (got.dot(&w0) / (radius * got.norm())).acos();
    println!(
        "sphere r = {radius}, η = {eta}: max |w' − closed form| = {d:e}, ‖w'‖ = {}, angle {angle} vs atan(η/r) = {}",
        got.norm(),
        (eta / radius).atan()
    );
    assert!(d < 1e-12, "max |w' − (w − ηφ)/√(1 + (η/r)²)| = {d:e}");
    assert!((got.norm() - radius).abs() < 1e-12);
    assert!((angle - (eta / radius).atan()).abs() < 1e-9);
    // The same as the unit-sphere rule on w/r with step η/r, scaled back.
    let unit = (&w0 / radius - &t * (eta / radius)) / (1.0 + (eta / radius).powi(2)).sqrt();
    assert!((&got - unit * radius).amax_nan() < 1e-12);
}

/// `v₁` of `a` (f64 SVD), with its singular values sorted descending and the
/// right singular vectors in that order.
fn right_singular_vectors(a: &DMatrix<f64>) -> (Vec<f64>, Vec<DVector<f64>>) {
    let svd = a.clone().svd(false, true);
    let mut idx: Vec<usize> = (0..svd.singular_values.len()).collect();
    idx.sort_by(|&x, &y| svd.singular_values[y].total_cmp(&svd.singular_values[x]));
    let vt = svd.v_t.unwrap();
    (
        idx.iter().map(|&i| svd.singular_values[i]).collect(),
        idx.iter().map(|&i| vt.row(i).transpose()).collect(),
    )
}

/// `min(‖v − v₁‖, ‖v + v₁‖)`: the distance to `v₁` up to sign.
fn dist_up_to_sign(v: &DVector<f64>, v1: &DVector<f64>) -> f64 {
    (v - v1).norm().min((v + v1).norm())
}

/// §1, [`top_singular_precise`] with a start exactly orthogonal to `v₁`: its
/// docs promise that a fixed pseudo-random vector is added to the start "so
/// that no start is orthogonal to the top singular subspace". Powers of the
/// Gram matrix never create a component the start lacks, so without it the
/// result is the top triplet of the subspace the start spans (or, when that
/// component is flushed to zero, the zero-start fallback): `W = [[1, 0],
/// [0, 2], [0, 0]]` from `v = e₁` gives `σ = 1.3138` instead of 2 (a probe of
/// that mutant). Here: that `W` (whose `A = WᵀW = diag(1, 4)` stays exactly
/// diagonal through the squarings) from `e₁`, and random tall 9×5 and wide
/// 5×9 matrices (singular values 3, 2.4, 1.5, 1, 0.5) started at their `v₂`
/// (f64 SVD), in f64 and f32. Expected: `σ₁` and `±v₁` of the f64 SVD,
/// `σ` to 1e-5 relative in both dtypes, `v` to 1e-5 in f64 and 1e-6 in f32.
/// The f32 bound on `v` holds only because the power of the Gram matrix is
/// applied twice: the start's weight on `v₁` is only the added `1e-3·r`
/// (`c₁ ~ 4e-4`), and the f32 rounding of the squared Gram matrix
/// (`A ≈ v₁v₁ᵀ + E`, `|E| ~ 1e-7`) adds `E x` to `c₁v₁`, a relative error of
/// order `1e-7/c₁ ≈ 2.5e-4` after one product (measured 1.2e-4 on 9×5); the
/// second product starts from a weight of ~1 (measured 1.7e-7 after it).
/// `σ`'s error is second order in `v`'s. A start without any `v₁` weight
/// leaves `A x = E x`, a direction unrelated to `v₁` (and exactly 0 for the
/// diagonal `W`, whose fallback gives `σ = 1.31`).
#[test]
fn top_singular_precise_finds_v1_from_a_start_orthogonal_to_it() {
    let exact = DMatrix::from_row_slice(3, 2, &[1.0, 0.0, 0.0, 2.0, 0.0, 0.0]);
    let mut r = rng(108);
    let s = [3.0, 2.4, 1.5, 1.0, 0.5];
    let cases = [
        ("diag 3x2", exact),
        ("9x5", with_singular_values(&mut r, 9, 5, &s)),
        ("5x9", with_singular_values(&mut r, 5, 9, &s)),
    ];
    for (what, w) in &cases {
        let (sv, vs) = right_singular_vectors(w);
        let (s1, v1, v2) = (sv[0], &vs[0], &vs[1]);
        assert!(
            v1.dot(v2).abs() < 1e-14,
            "{what}: the start is orthogonal to v₁"
        );
        for dt in [DType::F64, DType::F32] {
            let start = Tensor::from_vec(v2.as_slice().to_vec(), v2.len(), &Device::Cpu)
                .unwrap()
                .to_dtype(dt)
                .unwrap();
            let top = top_singular_precise(&from_dmatrix(w, dt), Some(&start)).unwrap();
            let sigma = scalar(&top.sigma);
            let v = to_dvector(&top.v);
            let dv = dist_up_to_sign(&v, v1);
            println!("{what} {dt:?}: σ = {sigma} (SVD {s1}), |v ∓ v₁| = {dv:e}");
            assert!(
                (sigma - s1).abs() <= 1e-5 * s1,
                "{what} {dt:?}: σ = {sigma}, SVD σ₁ = {s1}"
            );
            let tol = if dt == DType::F64 { 1e-5 } else { 1e-6 };
            assert!(dv <= tol, "{what} {dt:?}: v is {dv:e} from ±v₁");
        }
    }
}

/// §1, [`top_singular_precise`]'s damping: its docs square the Gram matrix
/// 16 times (`N = 2¹⁶`), which damps a component with `σ₂² = (1 − g)σ₁²`
/// by `(1 − g)^N`. `W = diag(1, √(1 − g))` in f64 with `g = 2e-4` and the
/// start `(1, 1)/√2`: `A = WᵀW = diag(1, 1 − g)` stays diagonal, so `v`'s
/// second component over its first is `(1 − g)^N ≈ 2e-6` times the start's
/// ratio (1 up to the added `1e-3·r`); checked within a factor 4. (With
/// 15 squarings it would be `(1 − g)^{N/2} ≈ 1.4e-3`.)
#[test]
fn top_singular_precise_damps_a_close_second_singular_value_by_its_power() {
    let g = 2e-4f64;
    let w = DMatrix::from_row_slice(2, 2, &[1.0, 0.0, 0.0, (1.0 - g).sqrt()]);
    let start = Tensor::new(&[1.0f64, 1.0], &Device::Cpu).unwrap();
    let top = top_singular_precise(&t64(&w), Some(&start)).unwrap();
    let v = to_dvector(&top.v);
    let damping = (1.0 - g).powf(65536.0);
    let ratio = (v[1] / v[0]).abs();
    assert!(
        ratio <= 4.0 * damping,
        "|v₂/v₁| = {ratio:e}, (1 − g)^N = {damping:e}"
    );
    assert!((scalar(&top.sigma) - 1.0).abs() < 1e-12);
}

/// [`top_singular_precise`]'s `start` has the shape of `v₁`, as in
/// [`power_iteration`]: `(n,)` for an `(m, n)` matrix, `(b, n)` for a batch
/// `(b, m, n)` (a regression: an `(n,)` start with a 2-D `W` was refused with
/// "expected shape [1, n]", because the matrix was batched and the start was
/// not). Checked on a tall 7×4 and a wide 4×7 f64 matrix (singular values
/// 2, 1.2, 0.7, 0.3): with an `(n,)` start, `σ` and `±v₁` match the f64 SVD
/// (1e-9 relative: f64, warm start), and the result is bit for bit that of
/// the same matrix as a batch of one with the `(1, n)` start (same
/// computation). A batch of two 7×4 matrices with a `(2, 4)` start matches
/// each member's SVD. `spectral_sphere_retract` takes the same `(n,)` start
/// (same code path; `‖W‖₂` after it is the radius by SVD). A start of the
/// wrong length is still refused as a shape error.
#[test]
fn top_singular_precise_takes_a_start_shaped_like_v1() {
    let mut r = rng(109);
    let s = [2.0, 1.2, 0.7, 0.3];
    for (m, n) in [(7usize, 4usize), (4, 7)] {
        let w = with_singular_values(&mut r, m, n, &s);
        let (sv, vs) = right_singular_vectors(&w);
        let x0 = DVector::from_vec(normal_vec(&mut r, n));
        let start = Tensor::from_vec(x0.as_slice().to_vec(), n, &Device::Cpu).unwrap();
        let top = top_singular_precise(&t64(&w), Some(&start)).unwrap();
        assert_eq!(top.v.dims(), &[n]);
        assert_eq!(top.u.dims(), &[m]);
        let sigma = scalar(&top.sigma);
        let dv = dist_up_to_sign(&to_dvector(&top.v), &vs[0]);
        println!(
            "{m}x{n}, (n,) start: σ = {sigma} (SVD {}), |v ∓ v₁| = {dv:e}",
            sv[0]
        );
        assert!(
            (sigma - sv[0]).abs() <= 1e-9 * sv[0],
            "{m}x{n}: σ = {sigma}"
        );
        assert!(dv <= 1e-9, "{m}x{n}: v is {dv:e} from ±v₁");
        // The same as a batch of one with a (1, n) start, bit for bit.
        let one = top_singular_precise(
            &t64(&w).unsqueeze(0).unwrap(),
            Some(&start.unsqueeze(0).unwrap()),
        )
        .unwrap();
        assert_eq!(to_f64_vec(&one.sigma), vec![sigma]);
        assert_eq!(to_f64_vec(&one.v), to_f64_vec(&top.v));
        assert_eq!(to_f64_vec(&one.u), to_f64_vec(&top.u));
        // The retraction on the spectral sphere takes it too.
        let (out, _) =
            steepest::linalg::spectral_sphere_retract(&t64(&w), 1.5, Some(&start)).unwrap();
        let s_out = singular_values(&to_dmatrix(&out))[0];
        assert!(
            (s_out - 1.5).abs() <= 1e-9,
            "{m}x{n}: retracted to ‖W‖₂ = {s_out}"
        );
        // A start of another length is refused.
        let bad = Tensor::zeros(n + 1, DType::F64, &Device::Cpu).unwrap();
        let e = top_singular_precise(&t64(&w), Some(&bad)).unwrap_err();
        assert!(
            matches!(e, steepest::Error::Shape { .. }),
            "{m}x{n}: (n + 1,) start: {e}"
        );
    }
    // A batch (b, m, n) with a (b, n) start.
    let ws: Vec<DMatrix<f64>> = (0..2)
        .map(|_| with_singular_values(&mut r, 7, 4, &s))
        .collect();
    let batch = Tensor::stack(&[t64(&ws[0]), t64(&ws[1])], 0).unwrap();
    let start = Tensor::from_vec(normal_vec(&mut r, 8), (2, 4), &Device::Cpu).unwrap();
    let top = top_singular_precise(&batch, Some(&start)).unwrap();
    assert_eq!(top.v.dims(), &[2, 4]);
    let sigmas = to_f64_vec(&top.sigma);
    for (i, w) in ws.iter().enumerate() {
        let (sv, vs) = right_singular_vectors(w);
        let v = to_dvector(&top.v.get(i).unwrap());
        assert!((sigmas[i] - sv[0]).abs() <= 1e-9 * sv[0], "member {i}");
        assert!(dist_up_to_sign(&v, &vs[0]) <= 1e-9, "member {i}");
    }
}
