//! Steepest descent on a manifold: the tangent direction (with the dual
//! variables of the spectral sphere and the Stiefel manifold), the step and
//! the retraction, as one transform.

use std::any::Any;

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use super::{
    from_json, state_mut, to_json, FieldSpec, FieldValue, Fields, GroupStep, Transform,
    TransformState,
};
use crate::device;
use crate::error::{fail, Result};
use crate::linalg::{
    spectral_sphere_retract_members, stiefel_retract_members, theta, top_singular_precise,
    MemberError, NewtonSchulz, TopSingular,
};
use crate::optim::steepest::{
    spectral_sphere_direction, sphere_direction, sphere_retract, stiefel_direction, DualAscent,
    Manifold, Norm,
};
use crate::params::ParamInfo;

/// One step on a manifold (docs/math.md §3): with `d` the direction so far,
/// - `Sphere{r}`: `φ = sphere_direction(d, w)` under `norm`, then
///   `w ← r·(w − ηφ)/ρ(w − ηφ)`;
/// - `SpectralSphere{r}`: `Φ = msign(D̂ + λΘ)`, `λ ← λ − η₂ tr(ΘᵀΦ)` (or,
///   with [`DualAscent::bracket`], the dual solved: the exactly tangent
///   combination of two such `Φ`), then `W ← r·(W − ηΦ)/‖W − ηΦ‖₂`;
/// - `Stiefel`: `Φ = msign(D̂ + WX)` (for a nearly square `W`, the smoothed
///   `(D̂ + WX)((D̂ + WX)ᵀ(D̂ + WX) + μ²I)^{-1/2}`, see
///   [`stiefel_direction`](crate::optim::steepest::stiefel_direction)),
///   `X ← X − η₂(WᵀΦ + ΦᵀW)`, then `W ← msign(W − ηΦ)` (the first step also
///   projects `W` onto the manifold);
///
/// with `D̂ = D/rms(σ(D))`, `Θ = u₁v₁ᵀ` of `W`, pending decay applied to `W`
/// before the step. It runs the update itself. State: `lambda` (scalar) and
/// `theta_v` (`v₁` of `W`, warm start) on the spectral sphere; `x` (`k × k`,
/// `k` the short side) on the Stiefel manifold. `Manifold::Free` is not a
/// manifold step: use [`Dualize`](super::Dualize).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ManifoldStep {
    /// The manifold (not `Free`).
    pub manifold: Manifold,
    /// The norm of a step: a vector norm on `Sphere`, `Norm::Spectral` on the
    /// matrix manifolds.
    pub norm: Norm,
    /// Dual descent of the multipliers.
    pub dual: DualAscent,
}

impl ManifoldStep {
    /// Errors on a combination that makes no sense.
    pub fn validate(&self, who: &str) -> Result<()> {
        self.norm.validate(&format!("{who}.norm"))?;
        self.dual.validate(&format!("{who}.dual"))?;
        let spectral = matches!(self.norm, Norm::Spectral(_));
        let m = format!("{who}.manifold");
        match self.manifold {
            Manifold::Free => fail!(
                Config,
                m,
                "Manifold::Free is no manifold step; use the Dualize transform"
            ),
            Manifold::Sphere { radius } | Manifold::SpectralSphere { radius }
                if !(radius.is_finite() && radius > 0.0) =>
            {
                fail!(Config, m, "the radius must be finite and > 0, got {radius}")
            }
            Manifold::Sphere { .. } if spectral => fail!(
                Config,
                m,
                "Sphere is the sphere of a vector norm; with Norm::Spectral use Manifold::SpectralSphere"
            ),
            Manifold::SpectralSphere { .. } | Manifold::Stiefel { .. } if !spectral => fail!(
                Config,
                m,
                "{:?} is a matrix manifold for the spectral norm; it needs Norm::Spectral, got {:?}",
                self.manifold,
                self.norm
            ),
            _ => Ok(()),
        }
    }

    fn ns(&self) -> &NewtonSchulz {
        match &self.norm {
            Norm::Spectral(ns) => ns,
            _ => unreachable!("validated: matrix manifolds use Norm::Spectral"),
        }
    }
}

/// The dual state of a parameter on a matrix manifold.
#[derive(Debug)]
pub enum ManifoldState {
    /// On the spectral sphere.
    SpectralSphere {
        /// The multiplier `λ` (scalar).
        lambda: Var,
        /// `v₁` of `W` after the last retraction (warm start).
        theta_v: Var,
        /// `|tr(ΘᵀΦ)|` of the last step (not saved).
        residual: Option<Tensor>,
    },
    /// On the Stiefel manifold.
    Stiefel {
        /// The symmetric multiplier `X` (`k × k`).
        x: Var,
        /// `‖WᵀΦ + ΦᵀW‖_F` of the last step (not saved).
        residual: Option<Tensor>,
    },
}

impl ManifoldState {
    /// The last step's tangent residual (a device scalar), if any.
    pub fn residual(&self) -> Option<&Tensor> {
        match self {
            Self::SpectralSphere { residual, .. } | Self::Stiefel { residual, .. } => {
                residual.as_ref()
            }
        }
    }
}

impl TransformState for ManifoldState {
    fn fields(&self) -> Vec<(&'static str, FieldValue<'_>)> {
        match self {
            Self::SpectralSphere {
                lambda, theta_v, ..
            } => vec![
                ("lambda", FieldValue::Tensor(lambda.as_tensor())),
                ("theta_v", FieldValue::Tensor(theta_v.as_tensor())),
            ],
            Self::Stiefel { x, .. } => vec![("x", FieldValue::Tensor(x.as_tensor()))],
        }
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// The pending decay applied to the parameters, as a batch (candle ops).
fn decayed_batch(step: &GroupStep<'_>, w: &Tensor) -> Result<Tensor> {
    let mut out = Vec::with_capacity(step.len());
    for i in 0..step.len() {
        let d = step.pending_decay(i);
        let mut wi = (w.get(i)? * d.scale)?;
        if let Some((coeff, a, b)) = &d.rank1 {
            let outer = a.unsqueeze(1)?.matmul(&b.unsqueeze(0)?)?;
            let outer = outer.reshape(wi.shape())?;
            wi = (wi - (outer * *coeff)?)?;
        }
        out.push(wi);
    }
    Ok(Tensor::stack(&out, 0)?)
}

/// `(b, 1, 1)` step lengths `η·αᵢ`.
fn step_lengths(step: &GroupStep<'_>, like: &Tensor) -> Result<Tensor> {
    let lrs: Vec<f64> = (0..step.len()).map(|i| step.lr() * step.alpha(i)).collect();
    let mut dims = vec![step.len()];
    dims.extend(std::iter::repeat_n(1, like.rank() - 1));
    Ok(crate::device::upload_f64(
        lrs,
        dims,
        like.dtype(),
        like.device(),
    )?)
}

fn write_back(step: &GroupStep<'_>, new_w: &Tensor) -> Result<()> {
    for i in 0..step.len() {
        let v = step.var(i);
        v.set(&new_w.get(i)?.reshape(v.shape())?.to_dtype(v.dtype())?)?;
    }
    Ok(())
}

impl Transform for ManifoldStep {
    fn kind(&self) -> &'static str {
        "manifold"
    }

    fn matrix_cost(&self) -> bool {
        true
    }

    fn hparams(&self) -> serde_json::Value {
        to_json(self)
    }

    fn set_hparams(&mut self, v: &serde_json::Value) -> Result<()> {
        let new: Self = from_json(self.kind(), v)?;
        new.validate("ManifoldStep")?;
        self.manifold.check_resumable(&new.manifold, "manifold")?;
        *self = new;
        Ok(())
    }

    fn check(&self, p: &ParamInfo) -> Result<()> {
        // The fields are public and `SteepestConfig::chain` does not validate:
        // refuse a norm that does not fit the manifold here, at construction,
        // rather than at the first step.
        self.validate("ManifoldStep")?;
        if let Some(radius) = self.manifold.radius() {
            p.check_radius_fits(radius)?;
        }
        let mv = p.matrix();
        match (self.manifold, mv) {
            (Manifold::SpectralSphere { .. } | Manifold::Stiefel { .. }, None) => fail!(
                Config,
                p.name,
                "{:?} is a matrix manifold, this parameter has shape {:?}",
                self.manifold,
                p.dims
            ),
            (Manifold::Stiefel { transpose: false }, Some((r, c))) if r < c => fail!(
                Config,
                p.name,
                "Stiefel (WᵀW = I) needs rows ≥ cols, the matrix view is {r}×{c} (wide); \
                 use Manifold::Stiefel {{ transpose: true }} to keep WWᵀ = I"
            ),
            (Manifold::Stiefel { transpose: true }, Some((r, c))) if r > c => fail!(
                Config,
                p.name,
                "Stiefel {{ transpose: true }} (WWᵀ = I) needs rows ≤ cols, the matrix view is {r}×{c} (tall); \
                 use Manifold::Stiefel {{ transpose: false }} to keep WᵀW = I"
            ),
            (Manifold::Stiefel { .. }, Some((r, c))) => {
                let who = format!("{}: dual", p.name);
                self.dual.check_stiefel_bracket(&who)?;
                self.dual.check_stiefel_rate(r.max(c), r.min(c), &who)
            }
            (Manifold::SpectralSphere { .. }, Some(_)) => {
                self.dual.check_sphere_rate(&format!("{}: dual", p.name))
            }
            _ => Ok(()),
        }
    }

    fn fields(&self, p: &ParamInfo) -> Vec<FieldSpec> {
        let dt = p.math_dtype();
        match (self.manifold, p.matrix()) {
            (Manifold::SpectralSphere { .. }, Some((_, c))) => vec![
                FieldSpec::tensor("lambda", vec![], dt),
                FieldSpec::tensor("theta_v", vec![c], dt),
            ],
            (Manifold::Stiefel { .. }, Some((r, c))) => {
                vec![FieldSpec::tensor("x", vec![r.min(c), r.min(c)], dt)]
            }
            _ => Vec::new(),
        }
    }

    fn load(&self, p: &ParamInfo, f: &Fields) -> Result<Box<dyn TransformState>> {
        Ok(Box::new(match self.manifold {
            Manifold::SpectralSphere { .. } => ManifoldState::SpectralSphere {
                lambda: f.var("lambda")?,
                theta_v: f.var("theta_v")?,
                residual: None,
            },
            Manifold::Stiefel { .. } => ManifoldState::Stiefel {
                x: f.var("x")?,
                residual: None,
            },
            _ => fail!(Checkpoint, p.name, "this manifold keeps no state"),
        }))
    }

    fn fallible(&self) -> bool {
        true
    }

    fn applies_update(&self) -> bool {
        true
    }

    fn apply(
        &self,
        step: &mut GroupStep<'_>,
        states: &mut [Option<Box<dyn TransformState>>],
        _fuse: bool,
    ) -> Result<()> {
        let who = step.info(0).name.clone();
        let w = step.params_batch()?;
        let g = step.dir_batch()?;
        let base = decayed_batch(step, &w)?;
        let lrs = step_lengths(step, &w)?;
        match self.manifold {
            Manifold::Free => fail!(Config, who, "Manifold::Free is no manifold step"),
            Manifold::Sphere { radius } => {
                let mut out = Vec::with_capacity(step.len());
                for i in 0..step.len() {
                    let name = &step.info(i).name;
                    let phi = sphere_direction(&g.get(i)?, &w.get(i)?, &self.norm)
                        .map_err(|e| e.about(name))?;
                    let wi = (base.get(i)? - (phi * (step.lr() * step.alpha(i)))?)?;
                    out.push(sphere_retract(&wi, radius, &self.norm).map_err(|e| e.about(name))?);
                }
                write_back(step, &Tensor::stack(&out, 0)?)?;
            }
            Manifold::SpectralSphere { radius } => {
                let cols = g.dim(2)?;
                let (dt, dev) = (w.dtype(), w.device().clone());
                let mut cold = Vec::new();
                let mut starts = Vec::new();
                let mut lambdas = Vec::new();
                for (i, s) in states.iter_mut().enumerate() {
                    match state_mut::<ManifoldState>(s) {
                        Some(ManifoldState::SpectralSphere {
                            lambda, theta_v, ..
                        }) => {
                            starts.push(theta_v.as_tensor().clone());
                            lambdas.push(lambda.as_tensor().clone());
                        }
                        _ => {
                            cold.push(i);
                            starts.push(Tensor::zeros(cols, dt, &dev)?);
                            lambdas.push(Tensor::zeros((), dt, &dev)?);
                        }
                    }
                }
                let start = Tensor::stack(&starts, 0)?;
                // Θ of the current W: the stored v₁ came from the last retraction,
                // one iteration refreshes it; a cold start (per member: the
                // group's other members are not affected) iterates to
                // convergence.
                let top = top_of_members(&w, &start, &cold)?;
                let th = theta(&top)?;
                let lam = Tensor::stack(&lambdas, 0)?;
                let ds = spectral_sphere_direction(&g, &th, &lam, &self.dual, self.ns())?;
                let stepped = (&base - ds.phi.broadcast_mul(&lrs)?)?;
                let (new_w, new_top) =
                    spectral_sphere_retract_members(&stepped, radius, Some(&top.v))
                        .map_err(|e| step.member_error(e))?;
                write_back(step, &new_w)?;
                for (i, s) in states.iter_mut().enumerate() {
                    let (v, l) = (new_top.v.get(i)?, ds.multiplier.get(i)?);
                    let res = Some(ds.residual.get(i)?.abs()?);
                    match state_mut::<ManifoldState>(s) {
                        Some(ManifoldState::SpectralSphere {
                            lambda,
                            theta_v,
                            residual,
                        }) => {
                            theta_v.set(&v)?;
                            lambda.set(&l)?;
                            *residual = res;
                        }
                        _ => {
                            *s = Some(Box::new(ManifoldState::SpectralSphere {
                                lambda: Var::from_tensor(&l.detach())?,
                                theta_v: Var::from_tensor(&v.detach())?,
                                residual: res,
                            }))
                        }
                    }
                }
            }
            Manifold::Stiefel { transpose } => {
                // Tall working view: W (n×m), n ≥ m; a transposed parameter is Wᵀ.
                let tall = |t: Tensor| -> Result<Tensor> {
                    Ok(if transpose {
                        t.transpose(1, 2)?.contiguous()?
                    } else {
                        t
                    })
                };
                let (w, g, base) = (tall(w)?, tall(g)?, tall(base)?);
                let k = w.dim(2)?;
                let (dt, dev) = (w.dtype(), w.device().clone());
                let mut cold = Vec::new();
                let mut xs = Vec::new();
                for (i, s) in states.iter_mut().enumerate() {
                    match state_mut::<ManifoldState>(s) {
                        Some(ManifoldState::Stiefel { x, .. }) => xs.push(x.as_tensor().clone()),
                        _ => {
                            cold.push(i);
                            xs.push(Tensor::zeros((k, k), dt, &dev)?);
                        }
                    }
                }
                // A member's first step projects its starting point onto the
                // manifold (only its own: the group's others keep theirs,
                // decay included).
                let project = |t: &Tensor| stiefel_retract_members(t, true);
                let w = on_members(&w, &cold, project).map_err(|e| step.member_error(e))?;
                let base = on_members(&base, &cold, project).map_err(|e| step.member_error(e))?;
                let x = Tensor::stack(&xs, 0)?;
                let ds = stiefel_direction(&g, &w, &x, &self.dual, self.ns())?;
                let stepped = (&base - ds.phi.broadcast_mul(&lrs)?)?;
                let new_w = tall(
                    stiefel_retract_members(&stepped, false).map_err(|e| step.member_error(e))?,
                )?;
                write_back(step, &new_w)?;
                for (i, s) in states.iter_mut().enumerate() {
                    let xi = ds.multiplier.get(i)?;
                    let res = Some(ds.residual.get(i)?.sqr()?.sum_all()?.sqrt()?);
                    match state_mut::<ManifoldState>(s) {
                        Some(ManifoldState::Stiefel { x, residual }) => {
                            x.set(&xi)?;
                            *residual = res;
                        }
                        _ => {
                            *s = Some(Box::new(ManifoldState::Stiefel {
                                x: Var::from_tensor(&xi.detach())?,
                                residual: res,
                            }))
                        }
                    }
                }
            }
        }
        step.mark_applied();
        Ok(())
    }

    fn boxed(&self) -> Box<dyn Transform> {
        Box::new(self.clone())
    }
}

/// The members `idx` of the batch `t`, stacked.
fn take_members(t: &Tensor, idx: &[usize]) -> candle_core::Result<Tensor> {
    Tensor::stack(
        &idx.iter()
            .map(|&i| t.get(i))
            .collect::<candle_core::Result<Vec<_>>>()?,
        0,
    )
}

/// The batch `all` with its members `idx` replaced by those of `some` (in
/// the order of `idx`).
fn put_members(all: &Tensor, idx: &[usize], some: &Tensor) -> candle_core::Result<Tensor> {
    let mut parts = (0..all.dim(0)?)
        .map(|i| all.get(i))
        .collect::<candle_core::Result<Vec<_>>>()?;
    for (j, &i) in idx.iter().enumerate() {
        parts[i] = some.get(j)?;
    }
    Tensor::stack(&parts, 0)
}

/// `f` applied to the members `idx` of the batch `t` only, the others kept
/// as they are; a member error names the member of `t`.
fn on_members(
    t: &Tensor,
    idx: &[usize],
    f: impl Fn(&Tensor) -> std::result::Result<Tensor, MemberError>,
) -> std::result::Result<Tensor, MemberError> {
    if idx.is_empty() {
        return Ok(t.clone());
    }
    if idx.len() == t.dim(0)? {
        return f(t);
    }
    let done = f(&take_members(t, idx)?).map_err(|e| MemberError {
        member: e.member.map(|j| idx[j]),
        error: e.error,
    })?;
    Ok(put_members(t, idx, &done)?)
}

/// `σ₁, u₁, v₁` of each member of `w` for the spectral sphere: one power
/// iteration from `start` (the last retraction's `v₁`) for a warm member,
/// [`top_singular_precise`] for the `cold` ones (their first step).
fn top_of_members(w: &Tensor, start: &Tensor, cold: &[usize]) -> Result<TopSingular> {
    if cold.len() == w.dim(0)? {
        return top_singular_precise(w, Some(start));
    }
    let warm = device::power_iteration(w, Some(start), 1)?;
    if cold.is_empty() {
        return Ok(warm);
    }
    let precise = top_singular_precise(&take_members(w, cold)?, Some(&take_members(start, cold)?))?;
    Ok(TopSingular {
        sigma: put_members(&warm.sigma, cold, &precise.sigma)?,
        u: put_members(&warm.u, cold, &precise.u)?,
        v: put_members(&warm.v, cold, &precise.v)?,
    })
}
