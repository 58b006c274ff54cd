//! Steepest descent under vector norms, free and on the sphere (docs/math.md §2),
//! checked against facts: Hölder equality, optimality among random feasible
//! tangent directions, the dual value `min_λ ‖g + λa‖_q` found independently,
//! the constraint after every step, and the Rayleigh quotient's minimum
//! against an f64 eigendecomposition.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use common::*;
use nalgebra::{DMatrix, DVector};
use rand::Rng;
use steepest::optim::steepest::{dualize, lp_sphere_multiplier, p_norm, sphere_direction};
use steepest::optim::NamedVar;
use steepest::{Manifold, NewtonSchulz, Norm, Steepest, SteepestConfig};

fn vec_of(t: &Tensor) -> Vec<f64> {
    common::to_f64_vec(t)
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn tensor(v: &[f64], dtype: DType) -> Tensor {
    Tensor::from_vec(v.to_vec(), v.len(), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// The dual exponent `q` of `p` (1 for `p = ∞`).
fn dual_exp(p: f64) -> f64 {
    if p.is_infinite() {
        1.0
    } else {
        p / (p - 1.0)
    }
}

#[test]
fn free_directions_attain_the_dual_norm() {
    let mut r = rng(1);
    let g = normal_vec(&mut r, 40);
    for dtype in [DType::F32, DType::F64] {
        let gt = tensor(&g, dtype);
        let tol = if dtype == DType::F32 { 1e-5 } else { 1e-12 };
        // Euclidean: g/‖g‖₂.
        let phi = vec_of(&dualize(&gt, &Norm::Euclidean).unwrap());
        let n2 = p_norm(&g, 2.0);
        for (a, b) in phi.iter().zip(&g) {
            assert!((a - b / n2).abs() < tol);
        }
        // ℓ_p: ‖φ‖_p = 1 and ⟨g, φ⟩ = ‖g‖_q (Hölder's equality case).
        for p in [1.3, 1.5, 2.0, 2.5, 3.0, 6.0] {
            let phi = vec_of(&dualize(&gt, &Norm::Lp(p)).unwrap());
            assert!((p_norm(&phi, p) - 1.0).abs() < tol, "p = {p}");
            let gq = p_norm(&g, dual_exp(p));
            assert!(
                (dot(&g, &phi) - gq).abs() < tol * gq * 10.0,
                "p = {p}: ⟨g,φ⟩ = {} vs ‖g‖_q = {gq}",
                dot(&g, &phi)
            );
            // And entry by entry, φᵢ = sign(gᵢ)|gᵢ|^{q−1}/‖g‖_q^{q−1} (the
            // equality case, unique for 1 < p < ∞): ⟨g, φ⟩ above is
            // stationary at it, blind to first order to an error in φ.
            let q = dual_exp(p);
            let scale = p_norm(&g, q).powf(q - 1.0);
            for (i, (a, b)) in phi.iter().zip(&g).enumerate() {
                let want = b.signum() * b.abs().powf(q - 1.0) / scale;
                assert!(
                    (a - want).abs() < tol * 10.0,
                    "{dtype:?} p = {p}: φ[{i}] = {a} vs {want}"
                );
            }
        }
        // Sign: ⟨g, φ⟩ = ‖g‖₁ with ‖φ‖_∞ = 1, and φ = sign(g) entry by entry.
        let phi_sign = vec_of(&dualize(&gt, &Norm::Sign).unwrap());
        for (a, b) in phi_sign.iter().zip(&g) {
            assert_eq!(*a, b.signum(), "{dtype:?} sign of {b}");
        }
        let phi = vec_of(&dualize(&gt, &Norm::Sign).unwrap());
        assert_eq!(p_norm(&phi, f64::INFINITY), 1.0);
        assert!((dot(&g, &phi) - p_norm(&g, 1.0)).abs() < tol * 100.0);
    }
    // Spectral: Φ = U Vᵀ, so ⟨G, Φ⟩ = ‖G‖_* (f64 SVD).
    let gm = DMatrix::from_vec(12, 7, normal_vec(&mut r, 84));
    let phi = dualize(
        &from_dmatrix(&gm, DType::F32),
        &Norm::Spectral(NewtonSchulz::polar_express(10)),
    )
    .unwrap();
    let phi = to_dmatrix(&phi);
    assert!(rel_err(&phi, &polar(&gm)) < 1e-3);
    let nuclear: f64 = singular_values(&gm).iter().sum();
    assert!((gm.dot(&phi) - nuclear).abs() < 1e-3 * nuclear);
    // Zero in, zero out.
    let z = Tensor::zeros(5, DType::F32, &Device::Cpu).unwrap();
    for norm in [Norm::Euclidean, Norm::Lp(3.0), Norm::Sign] {
        assert_eq!(vec_of(&dualize(&z, &norm).unwrap()), vec![0.0; 5]);
    }
}

/// The normal `a = ŵ^{[p−1]}` of the sphere `‖w‖_p = r` at `w` (one-hot at the
/// largest |wᵢ| for `p = ∞`).
fn normal(w: &[f64], p: f64) -> Vec<f64> {
    if p.is_infinite() {
        let k = (0..w.len())
            .max_by(|&i, &j| w[i].abs().partial_cmp(&w[j].abs()).unwrap())
            .unwrap();
        return (0..w.len())
            .map(|i| if i == k { w[k].signum() } else { 0.0 })
            .collect();
    }
    let n = p_norm(w, p);
    w.iter()
        .map(|x| (x / n).signum() * (x / n).abs().powf(p - 1.0))
        .collect()
}

/// A random direction of the tangent space `⟨a, ψ⟩ = 0` with `‖ψ‖_p = 1`.
fn tangent(z: &[f64], a: &[f64], p: f64) -> Vec<f64> {
    let c = dot(z, a) / dot(a, a);
    let t: Vec<f64> = z.iter().zip(a).map(|(z, a)| z - c * a).collect();
    let n = p_norm(&t, p);
    t.iter().map(|x| x / n).collect()
}

#[test]
fn sphere_direction_is_optimal_among_tangent_directions() {
    let mut r = rng(2);
    let n = 20;
    for (norm, p) in [
        (Norm::Euclidean, 2.0),
        (Norm::Lp(1.5), 1.5),
        (Norm::Lp(3.0), 3.0),
        (Norm::Lp(7.0), 7.0),
        (Norm::Sign, f64::INFINITY),
    ] {
        for trial in 0..3 {
            let w: Vec<f64> = normal_vec(&mut r, n).iter().map(|x| 2.5 * x).collect();
            let g = normal_vec(&mut r, n);
            let phi =
                sphere_direction(&tensor(&g, DType::F64), &tensor(&w, DType::F64), &norm).unwrap();
            let phi = vec_of(&phi);
            let a = normal(&w, p);
            let who = format!("{norm:?} trial {trial}");
            assert!((p_norm(&phi, p) - 1.0).abs() < 1e-9, "{who}: ‖φ‖_p ≠ 1");
            assert!(dot(&a, &phi).abs() < 1e-9, "{who}: φ is not tangent");
            let best = dot(&g, &phi);
            // The dual value min_λ ‖g + λa‖_q, found independently.
            let q = dual_exp(p);
            let at = |l: f64| {
                let x: Vec<f64> = g.iter().zip(&a).map(|(g, a)| g + l * a).collect();
                p_norm(&x, q)
            };
            let dual = at(golden_argmin(at, -1e3, 1e3, 400));
            assert!(
                (best - dual).abs() < 1e-7 * dual,
                "{who}: ⟨g,φ⟩ = {best}, min_λ ‖g+λa‖_q = {dual}"
            );
            // No feasible tangent direction does better: random ones and
            // small perturbations of φ itself.
            for i in 0..2000 {
                let z = normal_vec(&mut r, n);
                let z: Vec<f64> = if i % 2 == 0 {
                    z
                } else {
                    phi.iter().zip(&z).map(|(f, z)| f + 1e-2 * z).collect()
                };
                let psi = tangent(&z, &a, p);
                assert!(
                    dot(&g, &psi) <= best + 1e-12,
                    "{who}: ψ beats φ: {} > {best}",
                    dot(&g, &psi)
                );
            }
            if p.is_infinite() {
                // The extreme points of the ℓ∞ ball in the tangent space.
                for _ in 0..500 {
                    let psi: Vec<f64> = a
                        .iter()
                        .map(|&ai| {
                            if ai != 0.0 {
                                0.0
                            } else if r.gen::<bool>() {
                                1.0
                            } else {
                                -1.0
                            }
                        })
                        .collect();
                    assert!(dot(&g, &psi) <= best + 1e-12);
                }
            }
        }
    }
}

#[test]
fn lp_multiplier_makes_the_direction_tangent() {
    let mut r = rng(3);
    let g = normal_vec(&mut r, 30);
    let w = normal_vec(&mut r, 30);
    // p = 2: the closed form λ = −⟨g, a⟩/⟨a, a⟩.
    let a = normal(&w, 2.0);
    let l = lp_sphere_multiplier(&g, &a, 2.0).unwrap();
    assert!((l + dot(&g, &a) / dot(&a, &a)).abs() < 1e-12);
    // General p: h(λ) = ⟨a, (g + λa)^{[q−1]}⟩ = 0 at the root, also for
    // badly scaled inputs (g ~ 1e6, a ~ 1e-6).
    for p in [1.2, 1.5, 3.0, 10.0] {
        for (sg, sa) in [(1.0, 1.0), (1e6, 1.0), (1.0, 1e-6)] {
            let gs: Vec<f64> = g.iter().map(|x| x * sg).collect();
            let a: Vec<f64> = normal(&w, p).iter().map(|x| x * sa).collect();
            let l = lp_sphere_multiplier(&gs, &a, p).unwrap();
            let (h, scale) = multiplier_residual(&gs, &a, l, p);
            assert!(
                h.abs() <= 1e-12 * scale,
                "p = {p}: h(λ) = {h}, scale {scale}"
            );
        }
    }
    assert!(lp_sphere_multiplier(&g, &vec![0.0; 30], 3.0)
        .unwrap_err()
        .to_string()
        .contains("zero"));
    assert!(lp_sphere_multiplier(&g, &a, 1.0).is_err());
}

/// `h(λ) = ⟨a, (g + λa)^{[q−1]}⟩` (zero at the ℓp-sphere multiplier), in
/// f64, and the sum of its terms' magnitudes (its scale).
fn multiplier_residual(g: &[f64], a: &[f64], l: f64, p: f64) -> (f64, f64) {
    let e = 1.0 / (p - 1.0);
    let terms: Vec<f64> = g
        .iter()
        .zip(a)
        .map(|(g, a)| a * (g + l * a).signum() * (g + l * a).abs().powf(e))
        .collect();
    (terms.iter().sum(), terms.iter().map(|t| t.abs()).sum())
}

/// The bracket widens until it holds the root, on both sides: for a large
/// `p` (`q − 1 ≈ 0.05`, so `h` is nearly a sum of signs), one large normal
/// entry and many small ones, the root sits near `∓1/δ = ∓100`, far from
/// the first guess `−⟨g, a⟩/⟨a, a⟩ ≈ ±2`. Checked by `h(λ) = 0` in f64.
#[test]
fn lp_multiplier_finds_a_root_far_from_the_first_guess() {
    let (p, delta, n) = (20.0, 0.01, 200);
    for side in [1.0, -1.0] {
        let a: Vec<f64> = std::iter::once(1.0)
            .chain(std::iter::repeat_n(delta, n))
            .collect();
        let g: Vec<f64> = std::iter::once(0.0)
            .chain(std::iter::repeat_n(side, n))
            .collect();
        let guess = -dot(&g, &a) / dot(&a, &a);
        let l = lp_sphere_multiplier(&g, &a, p).unwrap();
        assert!((l - guess).abs() > 10.0, "λ = {l}, guess {guess}");
        let (h, scale) = multiplier_residual(&g, &a, l, p);
        assert!(
            h.abs() <= 1e-9 * scale,
            "side {side}: h({l}) = {h}, scale {scale}"
        );
    }
}

fn sphere_model(r: &mut rand::rngs::StdRng) -> Vec<NamedVar> {
    [("w", vec![24]), ("m", vec![6, 4])]
        .into_iter()
        .map(|(name, shape)| NamedVar {
            name: name.into(),
            var: Var::from_tensor(&randn(r, &shape, DType::F32)).unwrap(),
        })
        .collect()
}

/// A loss with step-dependent linear and quadratic terms.
fn sphere_loss(vars: &[NamedVar], step: u64) -> Tensor {
    let mut r = rng(1000 + step);
    let mut total = Tensor::new(0f32, &Device::Cpu).unwrap();
    for v in vars {
        let c = randn(&mut r, v.var.dims(), DType::F32);
        let d = randn(&mut r, v.var.dims(), DType::F32).abs().unwrap();
        let x = v.var.as_tensor();
        let t = ((x * &c).unwrap().sum_all().unwrap()
            + (x.sqr().unwrap() * &d).unwrap().sum_all().unwrap())
        .unwrap();
        total = (total + t).unwrap();
    }
    total
}

/// One `Steepest` step on the sphere `‖w‖_p = r` (f64, momentum 0, loss
/// `⟨c, w⟩` so `g = c`) lands on `r·(w − ηφ)/‖w − ηφ‖_p`, with φ found
/// independently: for `Lp(p)`, `λ*` minimises the dual `‖g + λa‖_q`
/// (golden-section search, `a = ŵ^{[p−1]}`) and `φ = x^{[q−1]}/‖x^{[q−1]}‖_p`
/// with `x = g + λ*a` (Hölder's equality case of the dual); for `Sign`,
/// `φ = sign(g)` with the coordinate of the largest `|wᵢ|` zeroed, and the
/// `ℓ∞` retraction. (`sphere_constraint_holds_after_every_step` holds for
/// any φ: it checks only the radius.)
#[test]
fn lp_and_sign_sphere_steps_match_the_closed_form() {
    let mut r = rng(7);
    let (lr, radius, n) = (0.1, 2.0, 20);
    for (norm, p, tol) in [
        (Norm::Lp(1.5), 1.5, 1e-8),
        (Norm::Lp(3.0), 3.0, 1e-8),
        (Norm::Sign, f64::INFINITY, 1e-12),
    ] {
        let w0: Vec<f64> = normal_vec(&mut r, n).iter().map(|x| 1.7 * x).collect();
        let c = normal_vec(&mut r, n);
        let var = Var::from_tensor(&tensor(&w0, DType::F64)).unwrap();
        let vars = vec![NamedVar {
            name: "w".into(),
            var: var.clone(),
        }];
        let mut opt = Steepest::from_named(
            vars,
            SteepestConfig {
                lr,
                momentum: 0.0,
                nesterov: false,
                norm: norm.clone(),
                manifold: Manifold::Sphere { radius },
                ..Default::default()
            },
        )
        .unwrap();
        let loss = (var.as_tensor() * tensor(&c, DType::F64))
            .unwrap()
            .sum_all()
            .unwrap();
        opt.backward_step(&loss).unwrap();
        let got = vec_of(var.as_tensor());

        let a = normal(&w0, p);
        let phi: Vec<f64> = if p.is_infinite() {
            c.iter()
                .zip(&a)
                .map(|(g, a)| if *a != 0.0 { 0.0 } else { g.signum() })
                .collect()
        } else {
            let q = dual_exp(p);
            let dual = |l: f64| {
                let x: Vec<f64> = c.iter().zip(&a).map(|(g, a)| g + l * a).collect();
                p_norm(&x, q)
            };
            let l = golden_argmin(dual, -1e3, 1e3, 400);
            let y: Vec<f64> = c
                .iter()
                .zip(&a)
                .map(|(g, a)| {
                    let x = g + l * a;
                    x.signum() * x.abs().powf(q - 1.0)
                })
                .collect();
            let ny = p_norm(&y, p);
            y.iter().map(|y| y / ny).collect()
        };
        let stepped: Vec<f64> = w0.iter().zip(&phi).map(|(w, f)| w - lr * f).collect();
        let ns = p_norm(&stepped, p);
        for (i, (g, s)) in got.iter().zip(&stepped).enumerate() {
            let want = radius * s / ns;
            assert!((g - want).abs() < tol, "{norm:?}: w[{i}] = {g} vs {want}");
        }
    }
}

#[test]
fn sphere_constraint_holds_after_every_step() {
    let mut r = rng(4);
    for (norm, p) in [
        (Norm::Euclidean, 2.0),
        (Norm::Lp(1.5), 1.5),
        (Norm::Lp(4.0), 4.0),
        (Norm::Sign, f64::INFINITY),
    ] {
        let radius = 2.0;
        let vars = sphere_model(&mut r);
        let mut opt = Steepest::from_named(
            vars.clone(),
            SteepestConfig {
                lr: 0.05,
                momentum: 0.9,
                nesterov: true,
                norm: norm.clone(),
                manifold: Manifold::Sphere { radius },
                ..Default::default()
            },
        )
        .unwrap();
        for t in 0..40 {
            opt.backward_step(&sphere_loss(&vars, t)).unwrap();
            for v in &vars {
                let n = p_norm(&vec_of(v.var.as_tensor()), p);
                assert!(
                    (n - radius).abs() <= 1e-5,
                    "{norm:?} step {t} {}: ‖w‖_p = {n}",
                    v.name
                );
            }
        }
    }
}

/// `A = Q diag(λ) Qᵀ` with a random orthogonal `Q` and the given spectrum.
fn symmetric_with_spectrum(r: &mut rand::rngs::StdRng, eig: &[f64]) -> DMatrix<f64> {
    let n = eig.len();
    let q = orthonormal(r, n, n);
    &q * DMatrix::from_diagonal(&DVector::from_row_slice(eig)) * q.transpose()
}

#[test]
fn rayleigh_quotient_on_the_sphere_reaches_the_smallest_eigenvalue() {
    let mut r = rng(5);
    let n = 16;
    let eig: Vec<f64> = (0..n)
        .map(|i| -1.0 + 4.0 * i as f64 / (n - 1) as f64)
        .collect();
    let a = symmetric_with_spectrum(&mut r, &eig);
    let (vals, vecs) = sym_eig(&a);
    let at = from_dmatrix(&a, DType::F32);
    for (momentum, nesterov) in [(0.0, false), (0.9, true)] {
        let w = Var::from_tensor(&randn(&mut r, &[n, 1], DType::F32)).unwrap();
        let vars = vec![NamedVar {
            name: "w".into(),
            var: w.clone(),
        }];
        let mut opt = Steepest::from_named(
            vars,
            SteepestConfig {
                lr: 0.2,
                momentum,
                nesterov,
                norm: Norm::Euclidean,
                manifold: Manifold::Sphere { radius: 1.0 },
                ..Default::default()
            },
        )
        .unwrap();
        for t in 0..400 {
            opt.set_learning_rate(0.2 * 0.98f64.powi(t));
            let loss = w
                .as_tensor()
                .t()
                .unwrap()
                .matmul(&at.matmul(w.as_tensor()).unwrap())
                .unwrap()
                .sum_all()
                .unwrap();
            opt.backward_step(&loss).unwrap();
        }
        let wv = DVector::from_vec(vec_of(w.as_tensor()));
        assert!((wv.norm() - 1.0).abs() < 1e-5);
        let rq = (wv.transpose() * &a * &wv)[(0, 0)];
        assert!(
            (rq - vals[0]).abs() < 1e-4,
            "momentum {momentum}: wᵀAw = {rq}, λ_min = {}",
            vals[0]
        );
        let align = wv.dot(&vecs.column(0)).abs();
        assert!(align > 1.0 - 1e-3, "|⟨w, q_min⟩| = {align}");
    }
}

#[test]
fn free_steps_have_length_lr_and_attain_the_dual_norm() {
    // Momentum 0: Δw = −η φ, so ρ(Δw) = η and ⟨g, Δw⟩ = −η‖g‖_q (Hölder).
    let mut r = rng(6);
    let lr = 0.03;
    for (norm, p) in [
        (Norm::Euclidean, 2.0),
        (Norm::Lp(1.5), 1.5),
        (Norm::Lp(5.0), 5.0),
        (Norm::Sign, f64::INFINITY),
    ] {
        let vars = sphere_model(&mut r);
        let before: Vec<Vec<f64>> = vars.iter().map(|v| vec_of(v.var.as_tensor())).collect();
        let mut opt = Steepest::from_named(
            vars.clone(),
            SteepestConfig {
                lr,
                momentum: 0.0,
                nesterov: false,
                norm: norm.clone(),
                ..Default::default()
            },
        )
        .unwrap();
        let loss = sphere_loss(&vars, 0);
        let grads = loss.backward().unwrap();
        opt.step(&grads).unwrap();
        for (v, w0) in vars.iter().zip(&before) {
            let g = vec_of(grads.get(&v.var).unwrap());
            let dw: Vec<f64> = vec_of(v.var.as_tensor())
                .iter()
                .zip(w0)
                .map(|(a, b)| a - b)
                .collect();
            assert!(
                (p_norm(&dw, p) - lr).abs() < 1e-6,
                "{norm:?}: ρ(Δw) = {}",
                p_norm(&dw, p)
            );
            let gq = p_norm(&g, dual_exp(p));
            assert!((dot(&g, &dw) + lr * gq).abs() < 1e-5 * lr * gq, "{norm:?}");
        }
    }
    // The spectral norm: Δw = −η·UVᵀ of each matrix (f64 SVD), same-shape
    // matrices batched together.
    let mats: Vec<NamedVar> = ["a", "b", "c"]
        .iter()
        .zip([[7, 4], [7, 4], [3, 5]])
        .map(|(n, s)| NamedVar {
            name: n.to_string(),
            var: Var::from_tensor(&randn(&mut r, &s, DType::F32)).unwrap(),
        })
        .collect();
    let before: Vec<DMatrix<f64>> = mats.iter().map(|v| to_dmatrix(v.var.as_tensor())).collect();
    let mut opt = Steepest::from_named(
        mats.clone(),
        SteepestConfig {
            lr,
            momentum: 0.0,
            nesterov: false,
            norm: Norm::Spectral(NewtonSchulz::polar_express(10)),
            ..Default::default()
        },
    )
    .unwrap();
    let grads = sphere_loss(&mats, 1).backward().unwrap();
    opt.step(&grads).unwrap();
    for (v, w0) in mats.iter().zip(&before) {
        let g = to_dmatrix(grads.get(&v.var).unwrap());
        let dw = to_dmatrix(v.var.as_tensor()) - w0;
        assert!(rel_err(&(-dw / lr), &polar(&g)) < 2e-3, "{}", v.name);
    }
}

/// `ShapeScale` before a `ManifoldStep` on `Manifold::Sphere` scales each
/// matrix's step length by its factor (the transform's docs: "Multiplies
/// each matrix's step length by `LrAdjust::factor`"; `ManifoldStep` steps by
/// `η·αᵢ`): `ShapeScale { MatchAdamWRms(0.2) } → ManifoldStep { Sphere }` at
/// rate η on a 4×6 matrix is the bare `ManifoldStep` at `η·0.2·√max(4, 6)`
/// (Moonlight's rule, `k·√max(rows, cols)`, ≈ 0.49 here), bit for bit over 3
/// steps, for the Euclidean and the ℓ₃ sphere (radius 2, f32). A control:
/// the bare step at η itself differs, so the factor is not 1 by accident.
/// A sphere step that ignores the factor moves by η instead of 0.49η.
#[test]
fn shape_scale_before_a_sphere_step_scales_its_step() {
    use steepest::optim::transform::{ManifoldStep, ShapeScale};
    use steepest::optim::{Chain, Driver};
    use steepest::{DualAscent, LrAdjust};
    let (lr, steps) = (0.05, 3);
    let factor = 0.2 * 6f64.sqrt();
    for norm in [Norm::Euclidean, Norm::Lp(3.0)] {
        let step = ManifoldStep {
            manifold: Manifold::Sphere { radius: 2.0 },
            norm: norm.clone(),
            dual: DualAscent::default(),
        };
        step.validate("test").unwrap();
        let model = || {
            vec![NamedVar {
                name: "m".into(),
                var: Var::from_tensor(&randn(&mut rng(20), &[4, 6], DType::F32)).unwrap(),
            }]
        };
        let run = |chain: Chain, lr: f64| {
            let vars = model();
            let mut opt = Driver::new(vars.clone(), chain, lr).unwrap();
            for t in 0..steps {
                opt.backward_step(&sphere_loss(&vars, t)).unwrap();
            }
            vec_of(vars[0].var.as_tensor())
        };
        let scaled = run(
            Chain::new()
                .then(ShapeScale {
                    adjust: LrAdjust::MatchAdamWRms(0.2),
                })
                .then(step.clone()),
            lr,
        );
        let plain = run(Chain::new().then(step.clone()), lr * factor);
        let unscaled = run(Chain::new().then(step.clone()), lr);
        assert_eq!(
            scaled, plain,
            "{norm:?}: ShapeScale → sphere step vs η·0.2·√6"
        );
        let d = scaled
            .iter()
            .zip(&unscaled)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(d > 1e-3, "{norm:?}: the factor made no difference ({d:e})");
    }
}

/// A sphere step folds the pending weight decay into the parameter before
/// the step: `w₁ = r·(s·w₀ − ηφ)/‖s·w₀ − ηφ‖₂`, `s = 1 − ηλ`, `φ` the
/// Euclidean tangent direction `(g − ⟨g,ŵ⟩ŵ)/‖g − ⟨g,ŵ⟩ŵ‖₂` at `w₀`
/// (closed form, f64), checked to 1e-12 (f64 parameter). A step from the
/// undecayed `w₀` is off by `ηλ·r/…`.
#[test]
fn a_sphere_step_folds_the_pending_decay_into_w() {
    let mut r = rng(46);
    let w0 = normal_vec(&mut r, 7);
    let g = normal_vec(&mut r, 7);
    let (eta, wd, radius) = (0.1, 0.5, 2.0);
    let var = Var::from_tensor(&tensor(&w0, DType::F64)).unwrap();
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
            weight_decay: steepest::WeightDecay::Decoupled(wd),
            ..Default::default()
        },
    )
    .unwrap();
    opt.step_subset(&[(0, tensor(&g, DType::F64))]).unwrap();
    let nw = dot(&w0, &w0).sqrt();
    let what: Vec<f64> = w0.iter().map(|x| x / nw).collect();
    let along = dot(&g, &what);
    let t: Vec<f64> = g.iter().zip(&what).map(|(g, w)| g - along * w).collect();
    let nt = dot(&t, &t).sqrt();
    let s = 1.0 - eta * wd;
    let stepped: Vec<f64> = w0
        .iter()
        .zip(&t)
        .map(|(w, t)| s * w - eta * t / nt)
        .collect();
    let ns = dot(&stepped, &stepped).sqrt();
    let got = vec_of(var.as_tensor());
    for (a, b) in got.iter().zip(&stepped) {
        let want = radius * b / ns;
        assert!((a - want).abs() < 1e-12, "{a} vs {want}");
    }
}

/// A zero gradient on the `ℓ_p` sphere: `h(λ) = ⟨a, (λa)^{[q−1]}⟩` has its
/// root at `λ = 0`, so the multiplier is 0 and the direction is zero (a
/// multiplier off 0 would step along the normal `a`).
#[test]
fn a_zero_gradient_on_the_lp_sphere_gives_a_zero_direction() {
    let w = normal_vec(&mut rng(48), 9);
    for p in [1.5, 3.0] {
        let a = normal(&w, p);
        assert_eq!(lp_sphere_multiplier(&[0.0; 9], &a, p).unwrap(), 0.0);
        let phi = sphere_direction(
            &tensor(&[0.0; 9], DType::F64),
            &tensor(&w, DType::F64),
            &Norm::Lp(p),
        )
        .unwrap();
        assert_eq!(vec_of(&phi), vec![0.0; 9], "p = {p}");
    }
}

/// `sphere_retract` refuses a `w` whose norm is not finite (as it refuses
/// `w = 0`) rather than return `w·(r/∞)`.
#[test]
fn sphere_retract_refuses_a_non_finite_norm() {
    use steepest::optim::steepest::sphere_retract;
    for (w, norm) in [
        (vec![1.0, f64::INFINITY, 2.0], Norm::Euclidean),
        (vec![1.0, f64::NAN, 2.0], Norm::Lp(3.0)),
        (vec![0.0; 3], Norm::Sign),
        // ‖·‖_∞ of a NaN entry: `f64::max` dropped it and read 2
        (vec![1.0, f64::NAN, 2.0], Norm::Sign),
        (vec![f64::NAN, 1.0], Norm::Sign),
    ] {
        let r = sphere_retract(&tensor(&w, DType::F64), 1.0, &norm);
        assert!(r.is_err(), "{w:?} under {norm:?}: {r:?}");
    }
    let ok = sphere_retract(&tensor(&[3.0, 4.0], DType::F64), 1.0, &Norm::Euclidean).unwrap();
    for (a, b) in vec_of(&ok).iter().zip([0.6, 0.8]) {
        assert!((a - b).abs() < 1e-15, "{a} vs {b}");
    }
}

/// `sphere_direction` refuses `g` and `w` of different shapes, also when
/// they have as many entries (the `ℓ_p` root solve works on flat copies
/// and would not notice).
#[test]
fn sphere_direction_refuses_mismatched_shapes() {
    let v = normal_vec(&mut rng(52), 6);
    let g = tensor(&v, DType::F64).reshape((2, 3)).unwrap();
    let w = tensor(&v, DType::F64).reshape((3, 2)).unwrap();
    for norm in [Norm::Euclidean, Norm::Lp(3.0), Norm::Sign] {
        let e = sphere_direction(&g, &w, &norm).unwrap_err();
        assert!(
            matches!(e, steepest::Error::Shape { .. }),
            "{norm:?}: {e:?}"
        );
    }
}

/// A gradient normal to the sphere (`g = 2w`, exact in every dtype) gives a
/// zero Euclidean direction in f32, bf16 and f64 alike; in f32 it gave a
/// unit vector made of rounding, with `⟨φ, ŵ⟩ ≈ 1` (not even tangent). A
/// small genuine tangent part (1e-3 of `g`) still gives the unit tangent
/// direction, against f64.
#[test]
fn a_normal_gradient_gives_a_zero_sphere_direction_in_every_dtype() {
    let mut r = rng(61);
    for n in [5usize, 64, 1000] {
        let w: Vec<f64> = (0..n).map(|_| r.gen_range(-3.0..3.0)).collect();
        let z: Vec<f64> = (0..n).map(|_| r.gen_range(-1.0..1.0)).collect();
        let wv = DVector::from_vec(w.clone());
        // a unit tangent vector: z minus its part along w
        let t = DVector::from_vec(z.clone())
            - &wv * (wv.dot(&DVector::from_vec(z)) / wv.norm_squared());
        let t = &t / t.norm();
        for dt in [DType::F32, DType::BF16, DType::F64] {
            // w in dt, and g = 2w exactly
            let wt = tensor(&w, dt);
            let g = (&wt * 2.0).unwrap();
            let phi = sphere_direction(&g, &wt, &Norm::Euclidean).unwrap();
            assert_eq!(phi.dtype(), dt);
            assert!(
                to_f64_vec(&phi).iter().all(|x| *x == 0.0),
                "n {n} {dt:?}: {:?}",
                &to_f64_vec(&phi)[..3]
            );
        }
        // g = 2w + 1e-3·‖2w‖·t: the direction is t
        let g: Vec<f64> = (0..n)
            .map(|i| 2.0 * w[i] + 1e-3 * 2.0 * wv.norm() * t[i])
            .collect();
        let phi = sphere_direction(
            &tensor(&g, DType::F32),
            &tensor(&w, DType::F32),
            &Norm::Euclidean,
        )
        .unwrap();
        let phi = DVector::from_vec(to_f64_vec(&phi));
        assert!(
            (&phi - &t).norm() < 1e-2,
            "n {n}: |φ − t| = {}",
            (&phi - &t).norm()
        );
    }
}

/// The same on the `ℓ_p` sphere: a gradient normal to it (`g = c·a`,
/// `a = ŵ^{[p−1]}` computed in f64 and rounded to the dtype) gives a zero
/// direction in f32 and f64; it gave a unit vector made of the rounding
/// (`ρ(φ) = 1`, `⟨g, φ⟩/‖g‖_q ≈ 3e-8`), so a loss of `‖w‖_p` alone moved
/// `w` a full step along noise. A genuine tangent part (1e-3 of `g`) still
/// gives a unit direction (`ρ(φ) = 1`) with `⟨g, φ⟩ > 0`.
#[test]
fn a_normal_gradient_gives_a_zero_lp_sphere_direction() {
    let mut r = rng(62);
    for p in [1.5, 3.0, 4.0] {
        for n in [5usize, 50, 400] {
            let w: Vec<f64> = (0..n).map(|_| r.gen_range(-3.0..3.0)).collect();
            let z: Vec<f64> = (0..n).map(|_| r.gen_range(-1.0..1.0)).collect();
            for dt in [DType::F32, DType::F64] {
                let wt = tensor(&w, dt);
                let a = normal(&to_f64_vec(&wt), p);
                let g: Vec<f64> = a.iter().map(|x| 2.5 * x).collect();
                let phi = sphere_direction(&tensor(&g, dt), &wt, &Norm::Lp(p)).unwrap();
                assert!(
                    to_f64_vec(&phi).iter().all(|x| *x == 0.0),
                    "p {p} n {n} {dt:?}: {:?}",
                    &to_f64_vec(&phi)[..3]
                );
                let scale = g.iter().map(|x| x * x).sum::<f64>().sqrt();
                let g: Vec<f64> = g
                    .iter()
                    .zip(&z)
                    .map(|(g, z)| g + 1e-3 * scale * z)
                    .collect();
                let phi =
                    to_f64_vec(&sphere_direction(&tensor(&g, dt), &wt, &Norm::Lp(p)).unwrap());
                let rho = phi
                    .iter()
                    .map(|x| x.abs().powf(p))
                    .sum::<f64>()
                    .powf(1.0 / p);
                assert!((rho - 1.0).abs() < 1e-5, "p {p} n {n} {dt:?}: ρ(φ) = {rho}");
                assert!(dot(&g, &phi) > 0.0, "p {p} n {n} {dt:?}");
            }
        }
    }
}

/// At `w = 0` the sphere direction is the dualized gradient under every
/// vector norm, as the Euclidean closed form gives (`ℓ_p` refused it: "w = 0
/// is not on a sphere"; Sign zeroed the first coordinate as if it were the
/// normal one); and `Steepest` on an `ℓ_p` sphere steps from a zero start
/// onto the sphere.
#[test]
fn the_sphere_direction_at_zero_is_the_dualized_gradient() {
    use steepest::optim::steepest::sphere_retract;
    let g = [0.3, -1.2, 0.7, 2.0, -0.4];
    let g = tensor(&g, DType::F64);
    let zero = tensor(&[0.0; 5], DType::F64);
    for norm in [Norm::Euclidean, Norm::Lp(3.0), Norm::Lp(1.5), Norm::Sign] {
        let phi = sphere_direction(&g, &zero, &norm).unwrap();
        let want = dualize(&g, &norm).unwrap();
        assert_eq!(vec_of(&phi), vec_of(&want), "{norm:?}");
        assert!(
            vec_of(&phi).iter().all(|x| *x != 0.0),
            "{norm:?}: {:?}",
            vec_of(&phi)
        );
    }
    let vars = vec![NamedVar {
        name: "w".into(),
        var: Var::from_tensor(&zero).unwrap(),
    }];
    let mut opt = Steepest::from_named(
        vars.clone(),
        SteepestConfig {
            lr: 0.1,
            norm: Norm::Lp(3.0),
            manifold: Manifold::Sphere { radius: 2.0 },
            ..SteepestConfig::default()
        },
    )
    .unwrap();
    let loss = (vars[0].var.as_tensor() * &g).unwrap().sum_all().unwrap();
    opt.backward_step(&loss).unwrap();
    let w = vec_of(vars[0].var.as_tensor());
    let r = p_norm(&w, 3.0);
    assert!((r - 2.0).abs() < 1e-12, "‖w‖₃ = {r}");
    let back = sphere_retract(&tensor(&w, DType::F64), 2.0, &Norm::Lp(3.0)).unwrap();
    assert_eq!(vec_of(&back), w);
}

/// `Norm::Lp` of a gradient whose entries are all subnormal in f32 (a
/// momentum buffer decaying under a gradient that stays zero reaches them):
/// the direction is finite and is the f64 formula's,
/// `sign(g)|g/max|g||^{1/(p−1)}` normalised in the p-norm. (Scaling by
/// 1/max in f32 made it Inf and NaN, and a step wrote them into the weights.)
#[test]
fn lp_dualize_of_a_subnormal_gradient_is_finite_and_right() {
    let g = Tensor::new(&[1e-39f32, 0.0, -2e-40, 5e-40], &Device::Cpu).unwrap();
    let gv: Vec<f64> = g.to_dtype(DType::F64).unwrap().to_vec1().unwrap();
    for p in [1.5, 3.0, 6.0] {
        let e = 1.0 / (p - 1.0);
        let m = gv.iter().fold(0.0f64, |a, x| a.max(x.abs()));
        let x: Vec<f64> = gv
            .iter()
            .map(|v| v.signum() * (v.abs() / m).powf(e) * (*v != 0.0) as u8 as f64)
            .collect();
        let n = p_norm(&x, p);
        let got: Vec<f64> = dualize(&g, &Norm::Lp(p))
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec1()
            .unwrap();
        for (a, b) in got.iter().zip(&x) {
            assert!(
                a.is_finite() && (a - b / n).abs() <= 1e-6,
                "p = {p}: {got:?} vs {x:?}/{n}"
            );
        }
    }
}

/// A sphere whose radius is beyond the parameter dtype's largest value is
/// refused at construction, naming the parameter: a point on it has entries
/// up to the radius (all of it in one entry under `Norm::Sign`), and the
/// step wrote Inf into an f16 parameter, after which every step failed.
#[test]
fn a_sphere_radius_beyond_the_dtype_is_refused_at_construction() {
    use steepest::optim::transform::Retract;
    use steepest::optim::{Chain, Driver};
    let var = |dt: DType| Var::from_tensor(&tensor(&[1.0, 0.0, 0.0, 0.0], dt)).unwrap();
    let named = |v: &Var| {
        vec![NamedVar {
            name: "emb".into(),
            var: v.clone(),
        }]
    };
    let steepest = |v: &Var, radius: f64, norm: Norm| {
        Steepest::from_named(
            named(v),
            SteepestConfig {
                lr: 0.1,
                momentum: 0.0,
                nesterov: false,
                norm,
                manifold: Manifold::Sphere { radius },
                ..Default::default()
            },
        )
        .map(|_| ())
    };
    let retract = |v: &Var, manifold: Manifold| {
        let t = Retract::new(manifold).unwrap();
        Driver::new(named(v), Chain::new().then(t), 0.1).map(|_| ())
    };
    let f16 = var(DType::F16);
    for r in [
        steepest(&f16, 1e5, Norm::Sign),
        steepest(&f16, 1e5, Norm::Euclidean),
        retract(&f16, Manifold::Sphere { radius: 1e5 }),
    ] {
        let e = r.unwrap_err().to_string();
        assert!(
            e.contains("emb") && e.contains("radius") && e.contains("F16"),
            "{e}"
        );
    }
    // within range: accepted, and the step stays finite
    let v = var(DType::F16);
    let mut opt = Steepest::from_named(
        named(&v),
        SteepestConfig {
            lr: 0.1,
            momentum: 0.0,
            nesterov: false,
            norm: Norm::Sign,
            manifold: Manifold::Sphere { radius: 6e4 },
            ..Default::default()
        },
    )
    .unwrap();
    let c = tensor(&[0.0, 1.0, -2.0, 0.5], DType::F16);
    opt.backward_step(&(v.as_tensor() * c).unwrap().sum_all().unwrap())
        .unwrap();
    assert!(vec_of(v.as_tensor()).iter().all(|x| x.is_finite()));
    // f32 takes the same radius
    steepest(&var(DType::F32), 1e5, Norm::Sign).unwrap();
    retract(&var(DType::F32), Manifold::Sphere { radius: 1e5 }).unwrap();
}

/// `Retract`'s vector norm is checked at construction (its fields are
/// public): an `Lp` exponent that is NaN or below 1 (no norm) was accepted,
/// and every step then failed with "cannot retract w", blaming `w`.
#[test]
fn retract_refuses_an_exponent_that_is_no_norm() {
    use steepest::optim::transform::Retract;
    use steepest::optim::{Chain, Driver};
    let v = Var::from_tensor(&tensor(&[1.0, 2.0, 3.0], DType::F32)).unwrap();
    let build = |p: f64| {
        let t = Retract {
            manifold: Manifold::Sphere { radius: 1.0 },
            norm: Norm::Lp(p),
        };
        Driver::new(
            vec![NamedVar {
                name: "w".into(),
                var: v.clone(),
            }],
            Chain::new().then(t),
            0.1,
        )
        .map(|_| ())
    };
    for p in [f64::NAN, -1.0, 0.0, 0.5] {
        let e = build(p).unwrap_err().to_string();
        assert!(
            e.contains("Retract.norm") && e.contains("p ≥ 1"),
            "p = {p}: {e}"
        );
    }
    for p in [1.0, 1.5, 3.0, f64::INFINITY] {
        build(p).unwrap_or_else(|e| panic!("p = {p}: {e}"));
    }
}

/// `p_norm` against the sums written out here: `(Σ|xᵢ|^p)^{1/p}` for
/// p = 1, 1.5, 2, 3 and `max |xᵢ|` for p = ∞, ‖(3, 4)‖₂ = 5, a vector whose
/// entries overflow when raised to p unscaled, zero, and NaN (which every p
/// reports).
#[test]
fn p_norm_is_the_sum_written_out() {
    let x = [3.0, -4.0, 0.5, -1.25, 0.0];
    for p in [1.0, 1.5, 2.0, 3.0] {
        let want = x
            .iter()
            .map(|v: &f64| v.abs().powf(p))
            .sum::<f64>()
            .powf(1.0 / p);
        let got = p_norm(&x, p);
        assert!(
            (got - want).abs() < 1e-14 * want,
            "p = {p}: {got} vs {want}"
        );
    }
    assert_eq!(p_norm(&x, f64::INFINITY), 4.0);
    assert!((p_norm(&[3.0, 4.0], 2.0) - 5.0).abs() < 1e-15);
    assert_eq!(p_norm(&[1e300, -1e300], 1.0), 2e300);
    let big = p_norm(&[1e200, 1e200], 3.0);
    assert!((big / (2f64.cbrt() * 1e200) - 1.0).abs() < 1e-14, "{big:e}");
    assert_eq!(p_norm(&[0.0, -0.0], 2.0), 0.0);
    for p in [1.0, 2.0, 3.0, f64::INFINITY] {
        assert!(p_norm(&[1.0, f64::NAN], p).is_nan(), "p = {p}");
    }
}
