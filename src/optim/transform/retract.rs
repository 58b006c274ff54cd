//! Retraction onto a manifold after the update, for any direction.

use std::any::Any;

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use super::{
    from_json, state_mut, to_json, FieldSpec, FieldValue, Fields, GroupStep, Stage, Transform,
    TransformState,
};
use crate::error::{fail, Result};
use crate::linalg::{spectral_sphere_retract_members, stiefel_retract_members};
use crate::optim::steepest::{sphere_retract, Manifold, Norm};
use crate::params::ParamInfo;

/// Puts each parameter back on a manifold after the update, whatever the
/// direction was (e.g. after Adam): `Sphere{r}`: `w ← r·w/ρ(w)` (`ρ` the
/// vector `norm`); `SpectralSphere{r}`: `W ← r·W/‖W‖₂` (`‖W‖₂` to f32
/// precision, warm-started from the stored `v₁`, field `v`); `Stiefel`:
/// `W ← msign(W)` (polar factor). The direction is not projected onto the
/// tangent space: for that, use [`ManifoldStep`](super::ManifoldStep).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Retract {
    /// The manifold (not `Free`).
    pub manifold: Manifold,
    /// The vector norm of `Sphere` (ignored by the matrix manifolds).
    pub norm: Norm,
}

impl Retract {
    /// Retraction onto `manifold` (`Sphere` uses the Euclidean norm).
    pub fn new(manifold: Manifold) -> Result<Self> {
        let r = Self {
            manifold,
            norm: Norm::Euclidean,
        };
        r.validate("Retract")?;
        Ok(r)
    }

    fn validate(&self, who: &str) -> Result<()> {
        match self.manifold {
            Manifold::Free => fail!(Config, who, "Manifold::Free has no retraction"),
            Manifold::Sphere { radius } | Manifold::SpectralSphere { radius }
                if !(radius.is_finite() && radius > 0.0) =>
            {
                fail!(
                    Config,
                    who,
                    "the radius must be finite and > 0, got {radius}"
                )
            }
            Manifold::Sphere { .. } if self.norm.p().is_none() => {
                fail!(Config, who, "Sphere needs a vector norm")
            }
            Manifold::Sphere { .. } if !self.norm.p().is_some_and(|p| p >= 1.0 && !p.is_nan()) => {
                fail!(
                    Config,
                    format!("{who}.norm"),
                    "the sphere of Lp needs p ≥ 1 (a norm), got {:?}",
                    self.norm
                )
            }
            _ => Ok(()),
        }
    }
}

/// The `v₁` warm start of the spectral-sphere retraction.
#[derive(Debug)]
pub struct RetractState {
    /// `v₁` of the last retracted matrix, `(cols,)`.
    pub v: Var,
}

impl TransformState for RetractState {
    fn fields(&self) -> Vec<(&'static str, FieldValue<'_>)> {
        vec![("v", FieldValue::Tensor(self.v.as_tensor()))]
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

impl Transform for Retract {
    fn kind(&self) -> &'static str {
        "retract"
    }

    fn stage(&self) -> Stage {
        Stage::Post
    }

    fn hparams(&self) -> serde_json::Value {
        to_json(self)
    }

    fn set_hparams(&mut self, v: &serde_json::Value) -> Result<()> {
        let new: Self = from_json(self.kind(), v)?;
        new.validate("Retract")?;
        self.manifold.check_resumable(&new.manifold, "manifold")?;
        *self = new;
        Ok(())
    }

    fn check(&self, p: &ParamInfo) -> Result<()> {
        // The fields are public: refuse settings `Retract::new` would refuse
        // here, at construction, rather than step with them.
        self.validate("Retract")?;
        if let Some(radius) = self.manifold.radius() {
            p.check_radius_fits(radius)?;
        }
        match (self.manifold, p.matrix()) {
            (Manifold::SpectralSphere { .. } | Manifold::Stiefel { .. }, None) => fail!(
                Config,
                p.name,
                "{:?} is a matrix manifold, this parameter has shape {:?}",
                self.manifold,
                p.dims
            ),
            (Manifold::Stiefel { transpose }, Some((r, c))) if (r < c) != transpose && r != c => {
                fail!(
                    Config,
                    p.name,
                    "the {r}×{c} matrix view does not fit Stiefel {{ transpose: {transpose} }}"
                )
            }
            _ => Ok(()),
        }
    }

    fn fields(&self, p: &ParamInfo) -> Vec<FieldSpec> {
        match (self.manifold, p.matrix()) {
            (Manifold::SpectralSphere { .. }, Some((_, c))) => {
                vec![FieldSpec::tensor("v", vec![c], p.math_dtype())]
            }
            _ => Vec::new(),
        }
    }

    fn load(&self, _p: &ParamInfo, f: &Fields) -> Result<Box<dyn TransformState>> {
        Ok(Box::new(RetractState { v: f.var("v")? }))
    }

    fn fallible(&self) -> bool {
        true
    }

    fn apply(
        &self,
        step: &mut GroupStep<'_>,
        states: &mut [Option<Box<dyn TransformState>>],
        _fuse: bool,
    ) -> Result<()> {
        let w = step.params_batch()?;
        let new_w = match self.manifold {
            Manifold::Free => return Ok(()),
            Manifold::Sphere { radius } => {
                let out = (0..step.len())
                    .map(|i| {
                        sphere_retract(&w.get(i)?, radius, &self.norm)
                            .map_err(|e| e.about(&step.info(i).name))
                    })
                    .collect::<Result<Vec<_>>>()?;
                Tensor::stack(&out, 0)?
            }
            Manifold::SpectralSphere { radius } => {
                let starts = states
                    .iter_mut()
                    .map(|s| match state_mut::<RetractState>(s) {
                        Some(st) => Ok(st.v.as_tensor().clone()),
                        None => Ok(Tensor::zeros(w.dim(2)?, w.dtype(), w.device())?),
                    })
                    .collect::<Result<Vec<_>>>()?;
                let (new_w, top) =
                    spectral_sphere_retract_members(&w, radius, Some(&Tensor::stack(&starts, 0)?))
                        .map_err(|e| step.member_error(e))?;
                for (i, s) in states.iter_mut().enumerate() {
                    let v = top.v.get(i)?;
                    match state_mut::<RetractState>(s) {
                        Some(st) => st.v.set(&v)?,
                        None => {
                            *s = Some(Box::new(RetractState {
                                v: Var::from_tensor(&v.detach())?,
                            }))
                        }
                    }
                }
                new_w
            }
            Manifold::Stiefel { transpose } => {
                let tall = if transpose {
                    w.transpose(1, 2)?.contiguous()?
                } else {
                    w
                };
                let r = stiefel_retract_members(&tall, false).map_err(|e| step.member_error(e))?;
                if transpose {
                    r.transpose(1, 2)?.contiguous()?
                } else {
                    r
                }
            }
        };
        for i in 0..step.len() {
            let v = step.var(i);
            v.set(&new_w.get(i)?.reshape(v.shape())?.to_dtype(v.dtype())?)?;
        }
        Ok(())
    }

    fn boxed(&self) -> Box<dyn Transform> {
        Box::new(self.clone())
    }
}
