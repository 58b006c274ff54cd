//! Muon on matrix manifolds by dual gradient descent (SPEC §3): the
//! spectral sphere `‖W‖₂ = r` and the Stiefel manifold `WᵀW = I`.
//!
//! Each function takes one matrix `(m, n)` or a batch `(b, m, n)`; the
//! multipliers are `()`/`(b,)` (spectral sphere) and `(k, k)`/`(b, k, k)`
//! (Stiefel). Gradients are normalised to `Ĝ = G/rms(σ(G))` (`rms(σ) =
//! ‖G‖_F/√k`, `k` the short side) before the dual problem, so the multipliers
//! and the dual learning rate are dimensionless (the direction
//! `msign(G + λΘ)` is invariant under scaling `G` and `λ` together).

use candle_core::{DType, Result, Tensor};

use crate::error::fail;
use crate::linalg::{msign, power_iteration, NewtonSchulz, TopSingular};

/// Where the parameters live. A retraction after every step puts each
/// parameter back on the manifold, so after the first step it lies there
/// wherever it started (the Stiefel manifold also projects the starting point
/// before the first direction is computed).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Manifold {
    /// No constraint: `w ← w − ηφ`.
    Free,
    /// The sphere `ρ(w) = radius` of the (vector) norm `ρ`, any parameter
    /// taken as one flat vector: `φ` is the steepest tangent direction
    /// ([`super::sphere_direction`]), then `w ← r·(w − ηφ)/ρ(w − ηφ)`.
    Sphere {
        /// The radius `r > 0`.
        radius: f64,
    },
    /// The spectral sphere `‖W‖₂ = radius` of a matrix, with the spectral
    /// norm: `Φ = msign(G + λΘ)`, `Θ = u₁v₁ᵀ`, `λ` by dual descent
    /// ([`spectral_sphere_direction`]), then `W ← r·(W − ηΦ)/‖W − ηΦ‖₂`.
    SpectralSphere {
        /// The radius `r > 0`.
        radius: f64,
    },
    /// The Stiefel manifold, with the spectral norm: `Φ = msign(G + WX)`,
    /// `X` symmetric by dual descent ([`stiefel_direction`]), then
    /// `W ← msign(W − ηΦ)` ([`stiefel_retract`]). `transpose: false` keeps
    /// `WᵀW = I` and needs a tall matrix view (rows ≥ cols); `transpose: true`
    /// keeps `WWᵀ = I` and needs a wide one (rows ≤ cols).
    Stiefel {
        /// Constrain `Wᵀ` instead of `W` (orthonormal rows).
        transpose: bool,
    },
}

impl Manifold {
    /// `[kind, radius, transpose]` for checkpoints.
    pub(crate) fn encode(&self) -> [f64; 3] {
        match *self {
            Self::Free => [0.0, 0.0, 0.0],
            Self::Sphere { radius } => [1.0, radius, 0.0],
            Self::SpectralSphere { radius } => [2.0, radius, 0.0],
            Self::Stiefel { transpose } => [3.0, 0.0, transpose as u8 as f64],
        }
    }

    /// Inverse of [`Manifold::encode`].
    pub(crate) fn decode(c: &[f64]) -> Result<Self> {
        Ok(match (c.first().map(|k| *k as u32), c.get(1), c.get(2)) {
            (Some(0), _, _) => Self::Free,
            (Some(1), Some(&radius), _) => Self::Sphere { radius },
            (Some(2), Some(&radius), _) => Self::SpectralSphere { radius },
            (Some(3), _, Some(&t)) => Self::Stiefel {
                transpose: t != 0.0,
            },
            _ => fail!("checkpoint: manifold", "bad code {c:?}"),
        })
    }
}

/// The dual-descent schedule for a manifold's Lagrange multiplier.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DualAscent {
    /// Dual learning rate `η₂` (in units of `rms(σ(G))`, see the module doc);
    /// `None` takes the measured default of the manifold,
    /// [`DEFAULT_DUAL_LR_SPECTRAL_SPHERE`] or [`DEFAULT_DUAL_LR_STIEFEL`].
    pub lr: Option<f64>,
    /// Dual steps (one `msign` each) per training step; 1 is the amortised
    /// scheme of SPEC §3 (the multiplier carries over between steps).
    pub steps: usize,
    /// Step along `sign(∇)` instead of `∇` (`λ ← λ − η₂·sign(tr(ΘᵀΦ))`).
    pub sign: bool,
}

/// Default dual learning rate on the spectral sphere, by measurement
/// (`examples/manifolds.rs`, `tests/steepest_matrix.rs`): with `Ĝ`
/// normalised to `rms(σ) = 1`, `η₂ ∈ [0.5, 1]` drives `|tr(ΘᵀΦ)|` below 1e-4
/// within 20 dual steps for shapes from 8×3 to 256×128; 0.5 is the safe end.
pub const DEFAULT_DUAL_LR_SPECTRAL_SPHERE: f64 = 0.5;

/// Default dual learning rate on the Stiefel manifold, by measurement: the
/// dual objective `‖Ĝ + WX‖_*` is stiffer (its curvature grows with the
/// short side `m`), constant steps of 0.1 oscillate from 64×32 on, 0.05
/// converges for 8×3 to 256×128 (slowly for the large ones: ‖WᵀΦ + ΦᵀW‖_F
/// ≈ 1e-2 after 300 dual steps at 256×128, against 1e-6 at 16×8).
pub const DEFAULT_DUAL_LR_STIEFEL: f64 = 0.05;

impl Default for DualAscent {
    /// The manifold's default `η₂`, one dual step per training step, plain
    /// (not sign) steps.
    fn default() -> Self {
        Self {
            lr: None,
            steps: 1,
            sign: false,
        }
    }
}

impl DualAscent {
    pub(crate) fn validate(&self, who: &str) -> Result<()> {
        if let Some(lr) = self.lr {
            if !(lr.is_finite() && lr >= 0.0) {
                fail!(who, "dual lr must be finite and ≥ 0, got {lr}");
            }
        }
        if self.steps == 0 {
            fail!(who, "dual steps must be ≥ 1, got 0");
        }
        Ok(())
    }

    /// `[lr (NaN for None), steps, sign]` for checkpoints.
    pub(crate) fn encode(&self) -> [f64; 3] {
        [
            self.lr.unwrap_or(f64::NAN),
            self.steps as f64,
            self.sign as u8 as f64,
        ]
    }

    /// Inverse of [`DualAscent::encode`].
    pub(crate) fn decode(c: &[f64]) -> Result<Self> {
        let [lr, steps, sign] = <[f64; 3]>::try_from(c)
            .map_err(|_| crate::error::invalid("checkpoint: dual", "must have 3 entries"))?;
        Ok(Self {
            lr: (!lr.is_nan()).then_some(lr),
            steps: steps as usize,
            sign: sign != 0.0,
        })
    }

    fn step(&self, lr: f64, multiplier: &Tensor, grad: &Tensor) -> Result<Tensor> {
        let d = if self.sign {
            grad.sign()?
        } else {
            grad.clone()
        };
        multiplier - (d * lr)?
    }
}

/// The result of a dual solve: the direction, the updated multiplier, and the
/// tangent residual of the returned direction.
#[derive(Clone, Debug)]
pub struct DualStep {
    /// The direction `Φ` (unit spectral norm, up to the Newton–Schulz accuracy).
    pub phi: Tensor,
    /// The multiplier after the dual steps (`λ` or `X`).
    pub multiplier: Tensor,
    /// The tangent residual of `phi`: `tr(ΘᵀΦ)` (shape of `λ`) or
    /// `WᵀΦ + ΦᵀW` (shape of `X`). Zero means `phi` is tangent.
    pub residual: Tensor,
}

/// Up to `(b, m, n)`, with whether a batch dimension was added.
fn batch3(t: &Tensor) -> Result<(Tensor, bool)> {
    match t.rank() {
        2 => Ok((t.unsqueeze(0)?, true)),
        3 => Ok((t.clone(), false)),
        _ => fail!(
            "manifold",
            "expected (m, n) or (b, m, n), got {:?}",
            t.dims()
        ),
    }
}

fn unbatch(t: Tensor, added: bool) -> Result<Tensor> {
    if added {
        t.squeeze(0)
    } else {
        Ok(t)
    }
}

/// `Ĝ = G/rms(σ(G)) = G·√k/‖G‖_F` per matrix of a `(b, m, n)` batch, `k` the
/// short side (zero stays zero): singular values of order 1 whatever the
/// shape and the gradient's scale, so one dual learning rate fits all.
fn normalise(g: &Tensor) -> Result<Tensor> {
    let (_, m, n) = g.dims3()?;
    let n = (g.sqr()?.sum_keepdim(2)?.sum_keepdim(1)? / m.min(n) as f64)?.sqrt()?;
    let tiny = match g.dtype() {
        DType::F64 => f64::MIN_POSITIVE,
        _ => f32::MIN_POSITIVE as f64,
    };
    g.broadcast_div(&n.maximum(tiny)?)
}

/// `Θ = u₁v₁ᵀ` from a top singular triplet, `(b, m, n)` (or `(m, n)`).
pub fn theta(top: &TopSingular) -> Result<Tensor> {
    if top.u.rank() == 1 {
        return top.u.unsqueeze(1)?.matmul(&top.v.unsqueeze(0)?);
    }
    top.u.unsqueeze(2)?.matmul(&top.v.unsqueeze(1)?)
}

/// Spectral-sphere direction by dual descent (SPEC §3):
/// repeat `steps` times `Φ = msign(Ĝ + λΘ); λ ← λ − η₂·tr(ΘᵀΦ)`, with
/// `Ĝ = G/rms(σ(G))`. Returns the last `Φ`, the updated `λ` and `tr(ΘᵀΦ)` of that
/// `Φ`. At the fixed point `tr(ΘᵀΦ) = 0` and `Φ` maximises `tr(GᵀΦ)` over
/// `‖Φ‖₂ = 1`, `tr(ΘᵀΦ) = 0` (`λ* = argmin ‖G + λΘ‖_*`).
///
/// `g`, `theta`: `(m, n)` or `(b, m, n)`; `lambda`: `()` or `(b,)`.
pub fn spectral_sphere_direction(
    g: &Tensor,
    theta: &Tensor,
    lambda: &Tensor,
    dual: &DualAscent,
    ns: &NewtonSchulz,
) -> Result<DualStep> {
    dual.validate("spectral_sphere_direction: dual")?;
    let lr = dual.lr.unwrap_or(DEFAULT_DUAL_LR_SPECTRAL_SPHERE);
    let (g3, added) = batch3(g)?;
    let (t3, _) = batch3(theta)?;
    if g3.dims() != t3.dims() {
        fail!(
            "spectral_sphere_direction",
            "g {:?} and theta {:?} differ in shape",
            g.dims(),
            theta.dims()
        );
    }
    let b = g3.dim(0)?;
    let mut lam = lambda.to_dtype(g3.dtype())?.reshape(b)?;
    let gn = normalise(&g3)?;
    let mut phi = gn.zeros_like()?;
    let mut res = lam.zeros_like()?;
    for _ in 0..dual.steps {
        let shifted = (&gn + t3.broadcast_mul(&lam.reshape((b, 1, 1))?)?)?;
        phi = msign(&shifted, ns)?;
        res = (&t3 * &phi)?.sum(2)?.sum(1)?;
        lam = dual.step(lr, &lam, &res)?;
    }
    let shape = lambda.shape().clone();
    Ok(DualStep {
        phi: unbatch(phi, added)?,
        multiplier: lam.reshape(shape.clone())?,
        residual: res.reshape(shape)?,
    })
}

/// Stiefel direction by dual descent (SPEC §3), for tall `W` (`n ≥ m`,
/// `WᵀW = I`): repeat `steps` times `Φ = msign(Ĝ + W X);
/// X ← X − η₂ (WᵀΦ + ΦᵀW)`, with `Ĝ = G/rms(σ(G))` and `X` symmetric `m × m`.
/// Returns the last `Φ`, the updated `X` and `WᵀΦ + ΦᵀW` of that `Φ`.
pub fn stiefel_direction(
    g: &Tensor,
    w: &Tensor,
    x: &Tensor,
    dual: &DualAscent,
    ns: &NewtonSchulz,
) -> Result<DualStep> {
    dual.validate("stiefel_direction: dual")?;
    let lr = dual.lr.unwrap_or(DEFAULT_DUAL_LR_STIEFEL);
    let (g3, added) = batch3(g)?;
    let (w3, _) = batch3(w)?;
    let (x3, _) = batch3(x)?;
    let (b, n, m) = w3.dims3()?;
    if g3.dims() != w3.dims() || x3.dims() != [b, m, m] {
        fail!(
            "stiefel_direction",
            "shapes g {:?}, w {:?}, x {:?} do not fit (x must be m×m for w n×m)",
            g.dims(),
            w.dims(),
            x.dims()
        );
    }
    if n < m {
        fail!(
            "stiefel_direction",
            "w is wide ({n}×{m}); WᵀW = I needs rows ≥ cols (transpose it)"
        );
    }
    let gn = normalise(&g3)?;
    let wt = w3.transpose(1, 2)?;
    let mut x3 = x3.to_dtype(g3.dtype())?;
    let mut phi = gn.zeros_like()?;
    let mut res = x3.zeros_like()?;
    for _ in 0..dual.steps {
        phi = msign(&(&gn + w3.matmul(&x3)?)?, ns)?;
        let wtp = wt.matmul(&phi)?;
        res = (&wtp + wtp.transpose(1, 2)?)?;
        x3 = dual.step(lr, &x3, &res)?;
    }
    Ok(DualStep {
        phi: unbatch(phi, added)?,
        multiplier: unbatch(x3, added)?,
        residual: unbatch(res, added)?,
    })
}

/// Width of the block in [`top_singular_converged`].
pub const RAYLEIGH_RITZ_BLOCK: usize = 4;

/// The top singular triplet by block subspace iteration with Rayleigh–Ritz,
/// warm-started from `start` (an estimate of `v₁`, `(n,)` or `(b, n)`), until
/// the relative change of every `σ₁` estimate is at most `rel_tol` (or
/// `max_iters` iterations).
///
/// A block `V` of `k = min(4, short side)` orthonormal vectors (the start and
/// fixed pseudo-random ones) is iterated as `V ← orth(WᵀW V)`; `σ₁² ` is the
/// top eigenvalue of the `k × k` matrix `(WV)ᵀ(WV)` (solved on the host in
/// f64) and `v₁ = V e₁`. The estimate converges at the rate
/// `(σ_{k+1}/σ₁)²` per iteration, not `(σ₂/σ₁)²` as a single vector does, so
/// it stays exact when `σ₁ ≈ σ₂` (the case where `v₁` itself is
/// ill-determined but `σ₁` is not). One host sync of `b·k²` numbers per
/// iteration. Runs on the short side of a wide matrix.
pub fn top_singular_converged(
    w: &Tensor,
    start: Option<&Tensor>,
    rel_tol: f64,
    max_iters: usize,
) -> Result<TopSingular> {
    let (w3, added) = batch3(w)?;
    let dt = crate::linalg::compute_dtype(w3.dtype());
    let w3 = w3.to_dtype(dt)?;
    let (b, m, n) = w3.dims3()?;
    // Start vector (b, n), from the caller or a cold power-iteration start.
    let v0 = match start {
        Some(s) => {
            let s = s.to_dtype(dt)?.reshape((b, n))?;
            let fallback = power_iteration(&w3, None, 0)?.v;
            let norms = s.sqr()?.sum_keepdim(1)?.sqrt()?;
            #[allow(clippy::eq_op)]
            let ok = norms.gt(0.0)?.mul(&(&norms - &norms)?.eq(0.0)?)?;
            ok.broadcast_as((b, n))?.where_cond(&s, &fallback)?
        }
        None => power_iteration(&w3, None, 0)?.v,
    };
    // Work on the tall orientation: for a wide W iterate on Wᵀ with u as start.
    let wide = n > m;
    let (a, start) = if wide {
        let u = w3.matmul(&v0.unsqueeze(2)?)?.squeeze(2)?;
        (w3.transpose(1, 2)?.contiguous()?, u)
    } else {
        (w3.clone(), v0)
    };
    let (_, rows, cols) = a.dims3()?;
    let k = RAYLEIGH_RITZ_BLOCK.min(cols).max(1);
    let at = a.transpose(1, 2)?;
    // Block: the start, then fixed pseudo-random columns.
    let mut cols_v = vec![start.unsqueeze(2)?];
    for j in 1..k {
        let r = pseudo_random(cols, j as u64, dt, a.device())?;
        cols_v.push(
            r.reshape((1, cols, 1))?
                .broadcast_as((b, cols, 1))?
                .contiguous()?,
        );
    }
    let mut v = orthonormal_columns(&Tensor::cat(&cols_v, 2)?)?;
    let mut prev: Option<Vec<f64>> = None;
    let mut best;
    let mut iter = 0;
    loop {
        let z = a.matmul(&v)?; // (b, rows, k)
        let gram = z.transpose(1, 2)?.matmul(&z)?; // (b, k, k)
        let g = gram.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
        let mut sig = Vec::with_capacity(b);
        let mut evs = Vec::with_capacity(b * k);
        for i in 0..b {
            let (lam, e) = top_eigen(&g[i * k * k..(i + 1) * k * k], k);
            sig.push(lam.max(0.0).sqrt());
            evs.extend(e);
        }
        let e = Tensor::from_vec(evs, (b, k, 1), &candle_core::Device::Cpu)?
            .to_dtype(dt)?
            .to_device(a.device())?;
        best = (sig.clone(), v.matmul(&e)?, z.matmul(&e)?);
        iter += 1;
        let done = prev.as_ref().is_some_and(|p| {
            sig.iter()
                .zip(p)
                .all(|(s, q)| (s - q).abs() <= rel_tol * s.abs().max(f64::MIN_POSITIVE))
        });
        if done || iter >= max_iters {
            break;
        }
        prev = Some(sig);
        v = orthonormal_columns(&at.matmul(&z)?)?;
    }
    let (sig, v1, z1) = best;
    let sigma = Tensor::from_vec(sig, b, &candle_core::Device::Cpu)?
        .to_dtype(dt)?
        .to_device(a.device())?;
    let v1 = v1.squeeze(2)?;
    let u1 = z1
        .squeeze(2)?
        .broadcast_div(&sigma.maximum(f32::MIN_POSITIVE as f64)?.unsqueeze(1)?)?;
    let _ = rows;
    // Back to W's orientation.
    let (u, v) = if wide { (v1, u1) } else { (u1, v1) };
    let top = TopSingular { sigma, u, v };
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
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        })
        .collect();
    let norm = vals
        .iter()
        .map(|x| x * x)
        .sum::<f64>()
        .sqrt()
        .max(f64::MIN_POSITIVE);
    Tensor::from_vec(vals.iter().map(|x| x / norm).collect::<Vec<_>>(), n, dev)?.to_dtype(dt)
}

/// Orthonormalises the columns of `(b, n, k)` by Gram–Schmidt, twice (CGS2);
/// a column in the span of the previous ones becomes zero.
fn orthonormal_columns(y: &Tensor) -> Result<Tensor> {
    let k = y.dim(2)?;
    let mut q: Vec<Tensor> = Vec::with_capacity(k);
    for j in 0..k {
        let mut c = y.narrow(2, j, 1)?;
        for _ in 0..2 {
            for qi in &q {
                let proj = (qi * &c)?.sum_keepdim(1)?;
                c = (&c - qi.broadcast_mul(&proj)?)?;
            }
        }
        let norm = c.sqr()?.sum_keepdim(1)?.sqrt()?;
        let tiny = match c.dtype() {
            DType::F64 => 1e-200,
            _ => 1e-30,
        };
        let ok = norm.gt(tiny)?.to_dtype(c.dtype())?;
        c = c.broadcast_div(&norm.maximum(tiny)?)?.broadcast_mul(&ok)?;
        q.push(c);
    }
    Tensor::cat(&q, 2)
}

/// The largest eigenvalue of a symmetric `k × k` matrix (row-major) and its
/// unit eigenvector, by cyclic Jacobi rotations in f64.
fn top_eigen(a: &[f64], k: usize) -> (f64, Vec<f64>) {
    let mut a: Vec<f64> = a.to_vec();
    // Symmetrise (the f32 Gram matrix is symmetric only up to rounding).
    for i in 0..k {
        for j in 0..i {
            let s = 0.5 * (a[i * k + j] + a[j * k + i]);
            a[i * k + j] = s;
            a[j * k + i] = s;
        }
    }
    let mut vecs = vec![0.0; k * k];
    for i in 0..k {
        vecs[i * k + i] = 1.0;
    }
    for _sweep in 0..50 {
        let off: f64 = (0..k)
            .flat_map(|i| (0..k).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * k + j] * a[i * k + j])
            .sum();
        let diag: f64 = (0..k).map(|i| a[i * k + i] * a[i * k + i]).sum();
        if off <= 1e-30 * diag.max(f64::MIN_POSITIVE) {
            break;
        }
        for p in 0..k {
            for q in p + 1..k {
                let apq = a[p * k + q];
                if apq == 0.0 {
                    continue;
                }
                let theta = (a[q * k + q] - a[p * k + p]) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for r in 0..k {
                    let (arp, arq) = (a[r * k + p], a[r * k + q]);
                    a[r * k + p] = c * arp - s * arq;
                    a[r * k + q] = s * arp + c * arq;
                }
                for r in 0..k {
                    let (apr, aqr) = (a[p * k + r], a[q * k + r]);
                    a[p * k + r] = c * apr - s * aqr;
                    a[q * k + r] = s * apr + c * aqr;
                }
                for r in 0..k {
                    let (vrp, vrq) = (vecs[r * k + p], vecs[r * k + q]);
                    vecs[r * k + p] = c * vrp - s * vrq;
                    vecs[r * k + q] = s * vrp + c * vrq;
                }
            }
        }
    }
    let top = (0..k)
        .max_by(|&i, &j| {
            a[i * k + i]
                .partial_cmp(&a[j * k + j])
                .unwrap_or(std::cmp::Ordering::Equal)
        })
        .unwrap_or(0);
    (
        a[top * k + top],
        (0..k).map(|r| vecs[r * k + top]).collect(),
    )
}

/// Relative tolerance on the change of `σ₁` between iterations for the
/// spectral-sphere retraction (above the f32 rounding noise of the estimate;
/// the remaining error is at most `tol·ρ/(1−ρ)`, `ρ = (σ₅/σ₁)²`).
pub const SPECTRAL_RETRACT_TOL: f64 = 1e-6;
/// Iteration cap of the spectral-sphere retraction's power iteration.
pub const SPECTRAL_RETRACT_MAX_ITERS: usize = 100;

/// The spectral-sphere retraction `W ← r·W/‖W‖₂`, with `‖W‖₂` from
/// [`top_singular_converged`] warm-started at `start` (an estimate of
/// `v₁`). Returns the retracted matrix and the top singular triplet of the
/// input (whose `u, v` are also those of the output). Errors on `W = 0`.
pub fn spectral_sphere_retract(
    w: &Tensor,
    radius: f64,
    start: Option<&Tensor>,
) -> Result<(Tensor, TopSingular)> {
    let top = top_singular_converged(w, start, SPECTRAL_RETRACT_TOL, SPECTRAL_RETRACT_MAX_ITERS)?;
    let s = top
        .sigma
        .flatten_all()?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?;
    if s.iter().any(|s| !(s.is_finite() && *s > 0.0)) {
        fail!(
            "spectral_sphere_retract",
            "cannot retract a matrix with spectral norm {s:?}"
        );
    }
    let scale = (radius / top.sigma.to_dtype(w.dtype())?)?;
    let scale = if w.rank() == 3 {
        scale.reshape((s.len(), 1, 1))?
    } else {
        scale.reshape((1, 1))?
    };
    Ok((w.broadcast_mul(&scale)?, top))
}

/// Iteration cap of the Stiefel retraction's cubic Newton–Schulz loop.
pub const STIEFEL_RETRACT_MAX_ITERS: usize = 30;

/// The polar retraction `W ← msign(W)` onto `WᵀW = I` (tall `W`, `n ≥ m`), to
/// working precision.
///
/// `cold = false` assumes `W` is near the manifold (one optimizer step away):
/// `X₀ = W/rms(σ)` with `rms(σ) = ‖W‖_F/√m`, then cubic Newton–Schulz steps
/// `X ← X(3I − XᵀX)/2`, which converge quadratically near 1, until
/// `‖XᵀX − I‖_F ≤ 8·ε·m` or it stops decreasing (the rounding floor; one host
/// sync per step). `cold = true` first applies Polar Express (8 steps), which
/// brings any full-rank `W` near the manifold.
pub fn stiefel_retract(w: &Tensor, cold: bool) -> Result<Tensor> {
    let (w3, added) = batch3(w)?;
    let (b, n, m) = w3.dims3()?;
    if n < m {
        fail!(
            "stiefel_retract",
            "w is wide ({n}×{m}); WᵀW = I needs rows ≥ cols (transpose it)"
        );
    }
    let mut x = if cold {
        msign(&w3, &NewtonSchulz::polar_express(8))?
    } else {
        let rms = (w3.sqr()?.sum_keepdim(2)?.sum_keepdim(1)? / m as f64)?.sqrt()?;
        w3.broadcast_div(&rms)?
    };
    let eps = match w3.dtype() {
        DType::F64 => f64::EPSILON,
        _ => f32::EPSILON as f64,
    };
    let tol = 8.0 * eps * m as f64;
    let eye = Tensor::eye(m, w3.dtype(), w3.device())?
        .unsqueeze(0)?
        .broadcast_as((b, m, m))?;
    let mut best: Option<(f64, Tensor)> = None;
    for _ in 0..STIEFEL_RETRACT_MAX_ITERS {
        let a = x.transpose(1, 2)?.matmul(&x)?;
        let dev = (&a - &eye)?;
        let r = dev
            .sqr()?
            .sum(2)?
            .sum(1)?
            .sqrt()?
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?
            .into_iter()
            .fold(0.0f64, f64::max);
        if !r.is_finite() {
            fail!(
                "stiefel_retract",
                "the iteration diverged (W rank-deficient?)"
            );
        }
        match &best {
            Some((rb, _)) if r >= 0.5 * rb => break, // at the rounding floor
            _ => {}
        }
        best = Some((r, x.clone()));
        if r <= tol {
            break;
        }
        // X ← 1.5 X − 0.5 X (XᵀX)
        x = ((&x * 1.5)? - (x.matmul(&a)? * 0.5)?)?;
    }
    let (r, x) = best.expect("at least one iteration");
    if r > 1e-3 && !cold {
        // Not near the manifold after all (e.g. a huge step): start over cold.
        return stiefel_retract(w, true);
    }
    unbatch(x, added)
}
