//! Matrix functions of the manifold optimizers: the top singular triplet to
//! working precision, `Θ = u₁v₁ᵀ`, and the retractions onto the spectral
//! sphere and the Stiefel manifold.

use candle_core::{DType, Tensor};

use super::{matrix_dims, msign, power_iteration, NewtonSchulz, TopSingular};
use crate::device::{host_f64, upload_f64, wide_dtype};
use crate::error::{fail, Error, Result};

/// Up to `(b, m, n)`, with whether a batch dimension was added.
pub(crate) fn batch3(t: &Tensor) -> Result<(Tensor, bool)> {
    match t.rank() {
        2 => Ok((t.unsqueeze(0)?, true)),
        3 => Ok((t.clone(), false)),
        _ => fail!(
            Shape,
            "linalg",
            "expected (m, n) or (b, m, n), got {:?}",
            t.dims()
        ),
    }
}

pub(crate) fn unbatch(t: Tensor, added: bool) -> Result<Tensor> {
    Ok(if added { t.squeeze(0)? } else { t })
}

/// Errors (naming `who`) unless `w` is a float matrix `(m, n)` or batch
/// `(b, m, n)` and `start`, when given, has the shape of its `v₁`: `(n,)`
/// (or `(1, n)`) for a matrix, `(b, n)` for a batch.
fn check_matrix_and_start(who: &str, w: &Tensor, start: Option<&Tensor>) -> Result<()> {
    let (_, n) = matrix_dims(&format!("{who}: w"), w)?;
    let Some(s) = start else { return Ok(()) };
    let fits = match (w.dims(), s.dims()) {
        ([_, _], [k]) | ([_, _], [1, k]) => *k == n,
        ([b, _, _], [sb, k]) => sb == b && *k == n,
        _ => false,
    };
    if !fits {
        let expected = match w.dims() {
            [b, _, _] => format!("({b}, {n})"),
            _ => format!("({n},)"),
        };
        fail!(
            Shape,
            who,
            "start: expected the shape of v₁ for w {:?}, {expected}, got {:?}",
            w.dims(),
            s.dims()
        );
    }
    Ok(())
}

/// `Θ = u₁v₁ᵀ` from a top singular triplet, `(b, m, n)` (or `(m, n)`).
pub fn theta(top: &TopSingular) -> Result<Tensor> {
    if top.u.rank() == 1 {
        return Ok(top.u.unsqueeze(1)?.matmul(&top.v.unsqueeze(0)?)?);
    }
    Ok(top.u.unsqueeze(2)?.matmul(&top.v.unsqueeze(1)?)?)
}

/// Squarings of the Gram matrix in [`top_singular_precise`].
const GRAM_SQUARINGS: usize = 16;

/// The top singular triplet to working precision, also when `σ₁ ≈ σ₂`.
///
/// Forms the Gram matrix of the short side (`A = WᵀW`, or `WWᵀ` for a wide
/// `W`), squares it `GRAM_SQUARINGS` times (`A ← A²/‖A²‖_F`, so `A ∝ (WᵀW)^N`
/// with `N = 2¹⁶`), applies it twice to the start vector (`start`, an
/// estimate of `v₁`, plus a fixed pseudo-random one; the second product
/// brings `v` to about the working precision even when the start's weight on
/// `v₁` is tiny) and returns the Rayleigh quotient
/// `σ₁ = ‖W v‖` with `u = W v/σ₁`. Components with `σᵢ² ≤ (1 − g)σ₁²` are
/// damped by `(1 − g)^N`, and `σ₁`'s error is second order in `v`'s, so the
/// relative error of `σ₁` is at most about `ln(R)/2^{17}` (`R` the ratio of
/// start-vector weights off and on the top cluster): ≈ 4e-5 for a random
/// start, less for a warm one, whatever the gap `σ₁ − σ₂`. Cost: one Gram
/// product, 16 products of `k × k` matrices (`k` the short side) and two
/// matrix–vector products, on the device; no host sync.
///
/// `w` is `(m, n)` or a batch `(b, m, n)`; `start`, when given, has the shape
/// of `v₁`: `(n,)` for an `(m, n)` `w` (as in [`power_iteration`]), `(b, n)`
/// for a batch (a `(1, n)` start is also accepted for an `(m, n)` `w`). A zero
/// or non-finite start is ignored.
pub fn top_singular_precise(w: &Tensor, start: Option<&Tensor>) -> Result<TopSingular> {
    check_matrix_and_start("top_singular_precise", w, start)?;
    let (w3, added) = batch3(w)?;
    // `w` was given one batch dimension: give an `(n,)` start one too.
    let start = match start {
        Some(s) if added && s.rank() == 1 => Some(s.unsqueeze(0)?),
        s => s.cloned(),
    };
    let start = start.as_ref();
    if w3.dim(0)? == 0 {
        // An empty batch: power_iteration's empty triplets.
        return power_iteration(&w3, start, 0);
    }
    let dt = crate::linalg::compute_dtype(w3.dtype());
    let w3 = w3.to_dtype(dt)?;
    let (_, m, n) = w3.dims3()?;
    let wide = n > m;
    // The Gram matrix and the products that find the direction of v₁ use
    // W/max|W| (per matrix): the direction does not depend on the scale,
    // and WᵀW itself underflows to 0 in f32 for |W| ≲ 1e-19 and overflows
    // for |W| ≳ 1e19 (σ came out of a default start, off by any factor).
    // σ itself comes from W (`power_iteration`, scale-free).
    let (ws, _, _) = super::scaled_keepdim(&w3)?;
    let wt = ws.transpose(1, 2)?;
    // A start on the short side (power_iteration with 0 iterations handles a
    // missing, zero or non-finite start), plus a fixed pseudo-random vector so
    // that no start is orthogonal to the top singular subspace.
    let p0 = power_iteration(&w3, start.map(|s| s.to_dtype(dt)).transpose()?.as_ref(), 0)?;
    let x = if wide { p0.u } else { p0.v };
    let k = x.dim(1)?;
    let r = pseudo_random(k, 1, dt, w3.device())?;
    let x = x.broadcast_add(&(r * 1e-3)?)?.unsqueeze(2)?;
    let mut a = if wide {
        ws.matmul(&wt)?
    } else {
        wt.matmul(&ws)?
    };
    let tiny = match dt {
        DType::F64 => 1e-300,
        _ => 1e-30,
    };
    // Entries below `flush` are set to 0 before each product: far below the
    // working precision (‖A‖_F = 1), and their products would be subnormal,
    // which the CPU computes very slowly.
    let flush = match dt {
        DType::F64 => 1e-150,
        _ => 1e-18,
    };
    for _ in 0..GRAM_SQUARINGS {
        let f = a
            .sqr()?
            .sum_keepdim(2)?
            .sum_keepdim(1)?
            .sqrt()?
            .maximum(tiny)?;
        let an = a.broadcast_div(&f)?;
        let an = (an.abs()?.ge(flush)?.to_dtype(dt)? * an)?;
        a = an.matmul(&an)?;
    }
    let unit = |y: Tensor| -> Result<Tensor> {
        Ok(y.broadcast_div(&y.sqr()?.sum_keepdim(1)?.sqrt()?.maximum(tiny)?)?)
    };
    // Applied twice: the first product leaves the rounding of `A` (about
    // `ε‖A‖`) against the start's weight on `v₁`, which may be as small as
    // the added `1e-3·r`; the second sees a vector whose weight is ~1, so
    // `v`'s error falls to about `ε` (one matrix–vector product more).
    let y = unit(a.matmul(&x)?)?; // (b, k, 1)
    let y = unit(a.matmul(&y)?)?;
    let v = if wide { wt.matmul(&y)? } else { y };
    let v = v.squeeze(2)?;
    // σ = ‖W v‖, u = W v/σ (for a wide W, one more half step on the long side).
    let top = power_iteration(&w3, Some(&v), 0)?;
    if added {
        Ok(TopSingular {
            sigma: top.sigma.squeeze(0)?,
            u: top.u.squeeze(0)?,
            v: top.v.squeeze(0)?,
        })
    } else {
        Ok(top)
    }
}

/// A fixed pseudo-random unit vector `(n,)` (splitmix64, seeded by `seed`).
fn pseudo_random(n: usize, seed: u64, dt: DType, dev: &candle_core::Device) -> Result<Tensor> {
    let mut state = 0x2545_F491_4F6C_DD1Du64.wrapping_mul(seed + 1);
    let vals: Vec<f64> = (0..n)
        .map(|_| (super::splitmix64(&mut state) >> 11) as f64 / (1u64 << 53) as f64 - 0.5)
        .collect();
    let norm = vals
        .iter()
        .map(|x| x * x)
        .sum::<f64>()
        .sqrt()
        .max(f64::MIN_POSITIVE);
    Ok(upload_f64(
        vals.iter().map(|x| x / norm).collect(),
        n,
        dt,
        dev,
    )?)
}

/// The spectral-sphere retraction `W ← r·W/‖W‖₂`, with `‖W‖₂` from
/// [`top_singular_precise`] warm-started at `start` (an estimate of `v₁`,
/// `(n,)` for an `(m, n)` `w`, `(b, n)` for a batch).
/// Returns the retracted matrix and the top singular triplet of the input
/// (whose `u, v` are also those of the output). Errors on `W = 0` or a
/// non-finite `W` (for a batch, naming the first such member), on a radius
/// that is not finite and > 0 or beyond the largest value of `w`'s dtype,
/// and on a `start` not of `v₁`'s shape.
pub fn spectral_sphere_retract(
    w: &Tensor,
    radius: f64,
    start: Option<&Tensor>,
) -> Result<(Tensor, TopSingular)> {
    spectral_sphere_retract_members(w, radius, start)
        .map_err(|e| e.for_batch(w, "spectral_sphere_retract"))
}

/// [`spectral_sphere_retract`], whose failure says which member of the
/// batch failed.
pub(crate) fn spectral_sphere_retract_members(
    w: &Tensor,
    radius: f64,
    start: Option<&Tensor>,
) -> std::result::Result<(Tensor, TopSingular), MemberError> {
    if !(radius.is_finite() && radius > 0.0) {
        return Err(Error::config(
            "spectral_sphere_retract: radius",
            format!("must be finite and > 0, got {radius}"),
        )
        .into());
    }
    check_matrix_and_start("spectral_sphere_retract", w, start)?;
    // Entries of the result are at most `radius` in size: it must fit the dtype.
    let largest = crate::params::largest_finite(w.dtype());
    if radius > largest {
        return Err(Error::config(
            "spectral_sphere_retract: radius",
            format!(
                "{radius:e} is beyond the largest {:?} value ({largest:e}): the result would overflow",
                w.dtype()
            ),
        )
        .into());
    }
    let top = top_singular_precise(w, start)?;
    let s = host_f64(&top.sigma)?;
    if let Some(i) = s.iter().position(|s| !(s.is_finite() && *s > 0.0)) {
        return Err(MemberError {
            member: Some(i),
            error: Error::numerical(
                "spectral_sphere_retract",
                format!("cannot retract a matrix with spectral norm {}", s[i]),
            ),
        });
    }
    // The factors r/σ in f64 and the product in f64 (f32 on Metal, which
    // has none), rounded to w's dtype once: in f16, σ beyond 65504 or r/σ
    // beyond it made the factor Inf (a zero or Inf/NaN result), and in bf16
    // the factor's 8 bits missed the radius by a few ulps.
    let work = wide_dtype(w.device());
    let factors: Vec<f64> = s.iter().map(|si| radius / si).collect();
    let shape: &[usize] = if w.rank() == 3 {
        &[s.len(), 1, 1]
    } else {
        &[1, 1]
    };
    let scale = upload_f64(factors, shape, work, w.device())?;
    let scaled = w
        .to_dtype(work)?
        .broadcast_mul(&scale)?
        .to_dtype(w.dtype())?;
    Ok((scaled, top))
}

/// Cap on the rounds of the Stiefel retraction (each: cubic Newton–Schulz
/// steps, then one residual check).
const STIEFEL_RETRACT_MAX_ITERS: usize = 8;

/// Cap on the rounds of a cold Stiefel retraction. A cubic step multiplies a
/// small singular value by 1.5 only, and a random square matrix has some far
/// below Polar Express's range (σ_min/σ_max ~ 1/n): 24 rounds of 2 steps
/// lift a value by 1.5⁴⁸ ≈ 3·10⁸ before the quadratic phase.
const STIEFEL_COLD_MAX_ROUNDS: usize = 24;

/// Rounds without any decrease of the residual after which a cold
/// retraction stops: a plateau (an exactly zero singular value stays zero).
const STIEFEL_COLD_PATIENCE: usize = 3;

/// The polar retraction `W ← msign(W)` onto `WᵀW = I` (tall `W`, `n ≥ m`), to
/// working precision.
///
/// `cold = false` assumes `W` is near the manifold (one optimizer step away):
/// cubic Newton–Schulz steps `X ← X(3I − XᵀX)/2` from `X₀ = W/rms(σ)`
/// (`rms(σ) = ‖W‖_F/√m`; [`msign`] with `NewtonSchulz::cubic`, whose fused
/// CPU path does the products, then unnormalised: renormalising every
/// round could lift a value beyond √3, where the cubic negates it), 2 at a time, which converge quadratically
/// near 1, until `‖XᵀX − I‖_F ≤ 4·ε·m·√n` (the rounding floor of that
/// residual) or it stops decreasing (one host sync per round; with an
/// optimizer step of `η = 0.02` one round is enough). `cold = true` first applies
/// Polar Express (8 steps) twice, which lifts every singular value above
/// ~1e-3 of the largest to ~1 and multiplies smaller ones by up to ~5·10⁷
/// (~7·10³ a pass, the second divided by √k for the k values already at 1), then
/// cubic rounds, not normalised (every singular value is then in
/// `[0, ~1]`, where they converge; divided by `rms(σ)`, a few dominant
/// values over a small tail would go beyond √3 and come out negated), for
/// as long as the residual still falls (up to 47 steps: small singular
/// values grow by 1.5× a step before the quadratic phase), which brings
/// any full-rank `W` onto the manifold. A `W` whose residual stays above
/// `max(1e-3, 2·floor)` (rank-deficient, or in f64 a condition number
/// beyond ~10¹⁵) is an error; for a batch `(b, n, m)`, it names the first
/// such member. A singular value that rounding has made nonzero counts as one:
/// a matrix of rank `r < m` in exact arithmetic whose f32 entries give it
/// singular values near 1e-8 is accepted, and its polar factor then turns
/// that rounding into full directions.
///
/// A bf16 or f16 `W` is retracted in f32 and the result rounded to its
/// dtype: it is the polar factor to that dtype's rounding (each entry within
/// a relative 2⁻⁸ in bf16, 2⁻¹¹ in f16), and its own `‖WᵀW − I‖_F` is at
/// that level (≈ 1e-2 for a 64×64 bf16 matrix), far above f32's floor, which
/// the iteration could not reach in the narrow type.
pub fn stiefel_retract(w: &Tensor, cold: bool) -> Result<Tensor> {
    stiefel_retract_members(w, cold).map_err(|e| e.for_batch(w, "stiefel_retract"))
}

/// Whether the warm rounds of [`stiefel_retract`] converge to the polar
/// factor on every member of `w3` `(b, n, m)`. They divide by
/// `rms(σ) = ‖W‖_F/√m`, and the cubic step `1.5s − 0.5s³` sends a
/// normalised singular value `s > √3` to −1: the result is then on the
/// manifold but is not the polar factor (`diag(4, 1, 1, 1, 1)` came back
/// as `diag(−1, 1, 1, 1, 1)`, with no error). Safe when Gershgorin's bound
/// on `λ_max(WᵀW)/rms(σ)²` is below 3; otherwise when σ₁ by 30 power
/// iterations (an estimate from below, which converges fast here: `σ₁`
/// beyond `√3·rms` stands out) is below `1.5·rms`. Not finite: not safe.
fn warm_start_is_safe(w3: &Tensor) -> Result<bool> {
    let m = w3.dim(2)?;
    let a = w3.transpose(1, 2)?.matmul(w3)?;
    let b = w3.dim(0)?;
    let to_f64 = |t: Tensor| -> Result<Vec<f64>> { Ok(host_f64(&t)?) };
    // tr(WᵀW) = ‖W‖_F² and Gershgorin's bound, per member: one transfer
    let both = to_f64(Tensor::cat(
        &[w3.sqr()?.sum(2)?.sum(1)?, a.abs()?.sum(2)?.max(1)?],
        0,
    )?)?;
    let (trace, gershgorin) = both.split_at(b);
    let rms2: Vec<f64> = trace.iter().map(|t| t / m as f64).collect();
    let safe = |bound2: &[f64], limit2: f64| {
        bound2
            .iter()
            .zip(&rms2)
            .all(|(b, r)| (b / r).is_finite() && b / r < limit2)
    };
    if safe(gershgorin, 3.0) {
        return Ok(true);
    }
    let sigma = to_f64(power_iteration(w3, None, 30)?.sigma)?;
    let sigma2: Vec<f64> = sigma.iter().map(|s| s * s).collect();
    Ok(safe(&sigma2, 2.25))
}

/// `steps` cubic Newton–Schulz steps `X ← 1.5X − 0.5·X(XᵀX)` on the tall
/// `(b, n, m)` batch `x`, without normalising: each singular value `s` maps
/// to `1.5s − 0.5s³`, which converges to 1 from any `s ∈ (0, √3)`.
fn cubic_steps(x: &Tensor, steps: usize) -> Result<Tensor> {
    let mut x = x.clone();
    for _ in 0..steps {
        let gram = x.transpose(1, 2)?.matmul(&x)?;
        x = ((&x * 1.5)? - (x.matmul(&gram)? * 0.5)?)?;
    }
    Ok(x)
}

/// An error about one member of a batch (`member`: its index, when the
/// error is about one).
pub(crate) struct MemberError {
    pub member: Option<usize>,
    pub error: Error,
}

impl MemberError {
    /// The error of the public routine `routine` on `w`: on a batch, about
    /// `routine (batch member i)`.
    fn for_batch(self, w: &Tensor, routine: &str) -> Error {
        match self.member {
            Some(i) if w.rank() == 3 => self.error.about(&format!("{routine} (batch member {i})")),
            _ => self.error,
        }
    }
}

impl From<Error> for MemberError {
    fn from(error: Error) -> Self {
        Self {
            member: None,
            error,
        }
    }
}

impl From<candle_core::Error> for MemberError {
    fn from(e: candle_core::Error) -> Self {
        Error::from(e).into()
    }
}

/// [`stiefel_retract`], whose failure says which member of the batch failed
/// (an optimizer names that member's parameter).
pub(crate) fn stiefel_retract_members(
    w: &Tensor,
    cold: bool,
) -> std::result::Result<Tensor, MemberError> {
    check_matrix_and_start("stiefel_retract", w, None)?;
    let work = super::compute_dtype(w.dtype());
    if w.dtype() != work {
        // A 16-bit iteration's residual stays above the acceptance
        // threshold (f32's rounding; bf16 already at 8×4): iterate in the
        // linalg routines' working dtype, round once.
        let x = stiefel_retract_members(&w.to_dtype(work)?, cold)?;
        return Ok(x.to_dtype(w.dtype())?);
    }
    let (w3, added) = batch3(w)?;
    let (b, n, m) = w3.dims3()?;
    if n < m {
        return Err(Error::shape(
            "stiefel_retract",
            format!("w is wide ({n}×{m}); WᵀW = I needs rows ≥ cols (transpose it)"),
        )
        .into());
    }
    if m == 0 || b == 0 {
        // No columns (WᵀW is the empty identity already), or no matrices.
        return Ok(w.clone());
    }
    if !cold && !warm_start_is_safe(&w3)? {
        return stiefel_retract_members(w, true);
    }
    let mut x = if cold {
        // Polar Express lifts singular values down to ~1e-3 of the largest
        // to ~1 and multiplies smaller ones by ~7e3 (the product of its
        // linear coefficients); a second pass multiplies those by ~7e3/√k
        // again (k: the values already at 1), far faster than the cubic
        // rounds' 1.5 a step.
        let pe = NewtonSchulz::polar_express(8);
        msign(&msign(&w3, &pe)?, &pe)?
    } else {
        w3.clone()
    };
    let eps = super::compute_eps(w3.dtype());
    // The rounding floor of ‖XᵀX − I‖_F: m² entries, each a sum of n products.
    let tol = 4.0 * eps * m as f64 * (n as f64).sqrt();
    let eye = Tensor::eye(m, w3.dtype(), w3.device())?
        .unsqueeze(0)?
        .broadcast_as((b, m, m))?;
    // The warm rounds: X / rms(σ(X)) inside msign, ‖X‖_F·(1/√m).
    let scale = 1.0 / (m as f64).sqrt();
    // (largest residual, its member, X)
    let mut best: Option<(f64, usize, Tensor)> = None;
    let mut flat_rounds = 0;
    let max_rounds = if cold {
        STIEFEL_COLD_MAX_ROUNDS
    } else {
        STIEFEL_RETRACT_MAX_ITERS
    };
    for round in 0..max_rounds {
        let steps = if round == 0 && cold { 1 } else { 2 };
        x = if cold || round > 0 {
            // Not normalised: Polar Express (cold) or the first warm round
            // left every singular value in [0, ~1], where the cubic
            // converges. Divided by rms(σ) again, a few values near 1 over
            // small ones go beyond √3 and come out negative (a flipped
            // direction, on the manifold, no error).
            cubic_steps(&x, steps)?
        } else {
            // The first warm round, normalised: `warm_start_is_safe` has
            // checked that every σ/rms(σ) of W is below √3.
            msign(
                &x,
                &NewtonSchulz::cubic(steps)
                    .with_norm_scale(scale)
                    .with_eps(0.0),
            )?
        };
        let dev = (x.transpose(1, 2)?.matmul(&x)? - &eye)?;
        let r = host_f64(&dev.sqr()?.sum(2)?.sum(1)?.sqrt()?)?;
        // a NaN residual (W = 0) must not read as converged
        if let Some(i) = r.iter().position(|r| !r.is_finite()) {
            return Err(MemberError {
                member: Some(i),
                error: Error::numerical(
                    "stiefel_retract",
                    "the iteration diverged: W is zero, rank-deficient or not finite",
                ),
            });
        }
        let (worst, r) =
            r.iter()
                .copied()
                .enumerate()
                .fold((0, 0.0), |a, b| if b.1 > a.1 { b } else { a });
        // Warm: quadratic convergence is expected, so a round that does not
        // halve the residual ends the rounds (then a cold start if still far).
        // Cold: small singular values grow slowly at first, so go on while
        // the residual still falls at all, and stop on a plateau.
        let rb = best.as_ref().map_or(f64::INFINITY, |(rb, ..)| *rb);
        let stalled = if cold {
            flat_rounds = if r < rb { 0 } else { flat_rounds + 1 };
            flat_rounds >= STIEFEL_COLD_PATIENCE
        } else {
            r >= 0.5 * rb
        };
        // (a warm round that did not halve the residual is not kept)
        if r < rb && (cold || !stalled) {
            best = Some((r, worst, x.clone()));
        }
        if stalled || r <= tol {
            break;
        }
    }
    let (r, worst, x) = best.expect("at least one round");
    // Off the manifold: beyond 1e-3, or beyond twice the rounding floor
    // (which exceeds 1e-3 in f32 from about 300×300 on).
    if r > (2.0 * tol).max(1e-3) {
        if !cold {
            // Not near the manifold after all (e.g. a huge step): start over cold.
            return stiefel_retract_members(w, true);
        }
        // Newton–Schulz keeps a zero singular value at zero: a rank-deficient
        // W has no polar factor on the manifold.
        return Err(MemberError {
            member: Some(worst),
            error: Error::numerical(
                "stiefel_retract",
                format!(
                    "W is rank-deficient (or too ill-conditioned): the polar retraction \
                     stops at ‖WᵀW − I‖_F = {r:.3e}, not on the manifold"
                ),
            ),
        });
    }
    Ok(unbatch(x, added)?)
}
