//! docs/math.md §5: the identity, the bounds against their unsimplified sums, the
//! constant-rate closed form, and a Monte-Carlo check that SGD on a convex
//! stochastic problem (least absolute deviations) stays below the bounds.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use steepest::schedule::{DecayShape, Schedule};
use steepest::theory::{
    average_bound, constant_lr_last_iterate_bound, last_iterate_bound, last_iterate_identity_rhs,
    optimal_constant_lr,
};

/// A random non-increasing positive sequence of length `t`.
fn random_rates(rng: &mut StdRng, t: usize) -> Vec<f64> {
    let mut eta = rng.gen_range(0.05..2.0);
    (0..t)
        .map(|_| {
            let out = eta;
            eta *= rng.gen_range(0.9..1.0);
            out
        })
        .collect()
}

#[test]
fn identity_holds_to_rounding() {
    let mut rng = StdRng::seed_from_u64(3);
    for t in [1usize, 2, 3, 10, 57, 300] {
        for _ in 0..5 {
            let q: Vec<f64> = (0..t).map(|_| rng.gen_range(-10.0..10.0)).collect();
            let rhs = last_iterate_identity_rhs(&q);
            let scale: f64 = q.iter().map(|x| x.abs()).sum::<f64>() * t as f64;
            assert!(
                (rhs - q[t - 1]).abs() <= 1e-14 * scale.max(1.0),
                "T={t}: rhs {rhs} vs q_T {}",
                q[t - 1]
            );
        }
    }
}

/// The last-iterate bound before the swap of sums (docs/math.md §5 derivation, eq. 12):
/// `R²/(2Tη_T) + (G²/(2T))Σ_t η_t²/η_T + (G²/2)Σ_{k=1}^{T−1} 1/(k(k+1)) Σ_{t=T−k}^{T} η_t²/η_T`.
fn unsimplified_last_bound(lrs: &[f64], r: f64, g: f64) -> f64 {
    let t = lrs.len();
    let et = lrs[t - 1];
    let avg: f64 = lrs.iter().map(|e| e * e / et).sum::<f64>() / t as f64;
    let mut tail = 0.0;
    for k in 1..t {
        let inner: f64 = lrs[t - k - 1..].iter().map(|e| e * e / et).sum();
        tail += inner / (k * (k + 1)) as f64;
    }
    r * r / (2.0 * t as f64 * et) + 0.5 * g * g * avg + 0.5 * g * g * tail
}

#[test]
fn bounds_match_their_unsimplified_sums() {
    let mut rng = StdRng::seed_from_u64(5);
    for t in [1usize, 2, 9, 100, 400] {
        let lrs = random_rates(&mut rng, t);
        let (r, g) = (rng.gen_range(0.1..5.0), rng.gen_range(0.1..5.0));
        let got = last_iterate_bound(&lrs, r, g).unwrap();
        let want = unsimplified_last_bound(&lrs, r, g);
        assert!((got - want).abs() <= 1e-12 * want, "T={t}: {got} vs {want}");

        let et = lrs[t - 1];
        let want_avg = r * r / (2.0 * t as f64 * et)
            + g * g / (2.0 * t as f64) * lrs.iter().map(|e| e * e / et).sum::<f64>();
        let got_avg = average_bound(&lrs, r, g).unwrap();
        assert!((got_avg - want_avg).abs() <= 1e-12 * want_avg);
        assert!(got_avg <= got * (1.0 + 1e-12), "average bound ≤ last bound");
    }
}

#[test]
fn constant_rate_closed_form() {
    let (r, g) = (2.0, 1.5);
    for t in [1usize, 2, 10, 1000] {
        let eta = 0.01;
        let general = last_iterate_bound(&vec![eta; t], r, g).unwrap();
        // Σ_{t<T} 1/(T−t) = H_{T−1}; the t = T term contributes 1.
        let h: f64 = (1..t).map(|k| 1.0 / k as f64).sum();
        let exact = r * r / (2.0 * t as f64 * eta) + 0.5 * g * g * eta * (1.0 + h);
        assert!(
            (general - exact).abs() <= 1e-12 * exact,
            "{general} vs {exact}"
        );
        let closed = constant_lr_last_iterate_bound(eta, r, g, t).unwrap();
        assert!(general <= closed, "closed form must upper-bound the sum");
        // and it is the sum with H_{T−1} replaced by 1 + ln T (difference in [0, 1 + ln T − H_{T−1}])
        let by_formula =
            r * r / (2.0 * t as f64 * eta) + 0.5 * g * g * eta * (2.0 + (t as f64).ln());
        assert!((closed - by_formula).abs() <= 1e-12 * closed);
    }
    // the optimal rate minimises the closed form, with value R·G·√((2+ln T)/T)
    let t = 500;
    let eta = optimal_constant_lr(r, g, t).unwrap();
    let best = constant_lr_last_iterate_bound(eta, r, g, t).unwrap();
    let tf = t as f64;
    assert!((best - r * g * ((2.0 + tf.ln()) / tf).sqrt()).abs() < 1e-12 * best);
    for f in [0.9, 0.99, 1.01, 1.1] {
        assert!(constant_lr_last_iterate_bound(eta * f, r, g, t).unwrap() > best);
    }
}

/// The `η_t = α/√t` schedule (`Schedule::inverse_sqrt`) in the general
/// last-iterate bound has the closed form
/// `R²/(2α√T) + G²α(H_{T−1} + ½)/√T`: with `η_T = α/√T` the second term is
/// `(G²/2)·α√T·Σ_t 1/(t·max(1, T−t))`, and `1/(t(T−t)) = (1/t + 1/(T−t))/T`
/// sums to `2H_{T−1}/T` over `t < T`, the `t = T` term adding `1/T`. So the
/// bound is `O(ln T/√T)` (docs/math.md §5): `B·√T/ln T` falls towards `G²α`.
#[test]
fn inverse_sqrt_rate_closed_form() {
    let (alpha, r, g) = (0.7, 2.0, 1.5);
    let mut scaled_prev = f64::INFINITY;
    for t in [1usize, 2, 10, 1000, 10_000, 100_000, 1_000_000] {
        let lrs = Schedule::inverse_sqrt(alpha).unwrap().rates(t);
        assert_eq!(lrs.len(), t);
        assert!((lrs[t - 1] - alpha / (t as f64).sqrt()).abs() < 1e-15);
        let got = last_iterate_bound(&lrs, r, g).unwrap();
        let h: f64 = (1..t).map(|k| 1.0 / k as f64).sum();
        let sqrt_t = (t as f64).sqrt();
        let want = r * r / (2.0 * alpha * sqrt_t) + g * g * alpha * (h + 0.5) / sqrt_t;
        assert!(
            (got - want).abs() <= 1e-12 * want,
            "T = {t}: {got} vs {want}"
        );
        if t >= 10_000 {
            let scaled = got * sqrt_t / (t as f64).ln();
            assert!(
                scaled < scaled_prev && scaled > g * g * alpha,
                "T = {t}: B·√T/ln T = {scaled} (before {scaled_prev}, limit {})",
                g * g * alpha
            );
            scaled_prev = scaled;
        }
    }
}

#[test]
fn bad_inputs_are_refused() {
    let e = last_iterate_bound(&[], 1.0, 1.0).unwrap_err().to_string();
    assert!(e.contains("empty"), "{e}");
    let e = last_iterate_bound(&[0.1, 0.2], 1.0, 1.0)
        .unwrap_err()
        .to_string();
    assert!(e.contains("non-increasing"), "{e}");
    assert!(average_bound(&[0.1, 0.0], 1.0, 1.0).is_err());
    assert!(average_bound(&[0.1], f64::NAN, 1.0).is_err());
    assert!(last_iterate_bound(&[0.1], 1.0, -1.0).is_err());
    assert!(optimal_constant_lr(1.0, 0.0, 5).is_err());
    assert!(constant_lr_last_iterate_bound(0.1, 1.0, 1.0, 0).is_err());
}

/// `R = 0` (starting at the minimiser) and `G = 0` are valid (`≥ 0`): the
/// bounds are then the remaining term alone, `(G²/2)Σ_t (η_t²/η_T)/max(1, T−t)`
/// resp. `R²/(2Tη_T)`, worked here by hand for `η = [0.2, 0.1]`, `T = 2`:
/// `Σ = 0.4/1 + 0.1/1 = 0.5`.
#[test]
fn zero_distance_or_zero_gradient_bound_is_the_other_term() {
    let lrs = [0.2, 0.1];
    let close = |a: f64, b: f64| assert!((a - b).abs() <= 1e-14 * b, "{a} vs {b}");
    // R = 0: (G²/2)·0.5 with G = 2.
    close(last_iterate_bound(&lrs, 0.0, 2.0).unwrap(), 1.0);
    // averaged: (G²/(2T))Σ η_t²/η_T = (4/4)(0.4 + 0.1)
    close(average_bound(&lrs, 0.0, 2.0).unwrap(), 0.5);
    // G = 0: R²/(2Tη_T) = 9/(2·2·0.1) with R = 3.
    close(last_iterate_bound(&lrs, 3.0, 0.0).unwrap(), 22.5);
    close(average_bound(&lrs, 3.0, 0.0).unwrap(), 22.5);
    close(
        constant_lr_last_iterate_bound(0.1, 0.0, 2.0, 1).unwrap(),
        0.5 * 4.0 * 0.1 * 2.0,
    );
}

/// Per-coordinate LAD loss `E|x − z|`, `z ~ U[−1, 1]`: `(x² + 1)/2` on
/// `[−1, 1]`, `|x|` outside; minimised at 0 with value 1/2.
fn lad(x: f64) -> f64 {
    if x.abs() <= 1.0 {
        (x * x + 1.0) / 2.0
    } else {
        x.abs()
    }
}

/// `L(θ) − L*` for `L(θ) = Σ_i E|θ_i − z_i|`.
fn excess(theta: &[f64]) -> f64 {
    theta.iter().map(|&x| lad(x) - 0.5).sum()
}

/// Runs SGD with `g_i = sign(θ_i − z_i)` (so `‖g‖² = d = G²`) over `seeds`
/// seeds; returns (mean, standard error) of the last iterate's excess loss and
/// the mean excess loss of the averaged iterate `(1/T)Σ θ_t`.
fn run_lad(lrs: &[f64], theta1: &[f64], seeds: u64) -> (f64, f64, f64) {
    let (mut s1, mut s2, mut savg) = (0.0, 0.0, 0.0);
    for seed in 0..seeds {
        let mut rng = StdRng::seed_from_u64(1000 + seed);
        let mut th = theta1.to_vec();
        let mut sum = vec![0.0; th.len()];
        // θ_1 … θ_T: T iterates, T − 1 updates with η_1 … η_{T−1}.
        for (t, &eta) in lrs.iter().enumerate() {
            for (s, x) in sum.iter_mut().zip(&th) {
                *s += x;
            }
            if t + 1 == lrs.len() {
                break;
            }
            for x in th.iter_mut() {
                let z: f64 = rng.gen_range(-1.0..1.0);
                *x -= eta * if *x > z { 1.0 } else { -1.0 };
            }
        }
        let e = excess(&th);
        s1 += e;
        s2 += e * e;
        let avg: Vec<f64> = sum.iter().map(|s| s / lrs.len() as f64).collect();
        savg += excess(&avg);
    }
    let n = seeds as f64;
    let mean = s1 / n;
    let var = (s2 / n - mean * mean).max(0.0);
    (mean, (var / n).sqrt(), savg / n)
}

#[test]
fn sgd_on_lad_stays_below_the_bounds() {
    let theta1 = [1.5, -2.0, 0.5];
    let r = theta1.iter().map(|x| x * x).sum::<f64>().sqrt();
    let g = (theta1.len() as f64).sqrt();
    let t = 200;
    let schedules = [
        (
            "optimal constant",
            Schedule::last_iterate_optimal(r, g, t).unwrap(),
        ),
        ("α/√t", Schedule::inverse_sqrt(r / g).unwrap()),
        ("cosine", Schedule::cosine(0.3, 0.02, t).unwrap()),
        (
            "wsd linear",
            Schedule::wsd(0.2, 0.01, t / 2, t / 2, DecayShape::Linear).unwrap(),
        ),
    ];
    for (name, s) in schedules {
        let lrs = s.rates(t);
        let last = last_iterate_bound(&lrs, r, g).unwrap();
        let avgb = average_bound(&lrs, r, g).unwrap();
        let (mean, se, avg_mean) = run_lad(&lrs, &theta1, 2000);
        eprintln!("{name}: last {mean:.4} ± {se:.4} (bound {last:.4}), average {avg_mean:.4} (bound {avgb:.4})");
        assert!(mean >= 0.0 && avg_mean >= 0.0);
        assert!(
            mean + 3.0 * se < last,
            "{name}: E[L(θ_T)] − L* ≈ {mean} ± {se} exceeds the bound {last}"
        );
        assert!(
            avg_mean < avgb,
            "{name}: averaged iterate {avg_mean} exceeds the bound {avgb}"
        );
    }
}
