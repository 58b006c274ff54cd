//! Steepest descent's direction under a norm, with no constraint.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use super::{from_json, to_json, GroupStep, Transform, TransformState};
use crate::device;
use crate::error::{fail, Result};
use crate::optim::steepest::{dualize, Norm};
use crate::params::ParamInfo;

/// Replaces the direction `d` by the unit-norm direction of steepest ascent
/// `φ = argmax_{ρ(φ)=1} ⟨d, φ⟩` ([`dualize`]): `d/‖d‖₂` (normalized SGD),
/// `d^{[q/p]}/‖·‖_p` (pbSGD), `sign(d)` (SignSGD) or `msign(D)` (Muon; same-shape
/// matrices batched).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Dualize {
    /// The norm `ρ`.
    pub norm: Norm,
}

impl Transform for Dualize {
    fn kind(&self) -> &'static str {
        "dualize"
    }

    fn matrix_cost(&self) -> bool {
        true
    }

    fn hparams(&self) -> serde_json::Value {
        to_json(self)
    }

    fn set_hparams(&mut self, v: &serde_json::Value) -> Result<()> {
        let new: Self = from_json(self.kind(), v)?;
        new.norm.validate("Dualize.norm")?;
        *self = new;
        Ok(())
    }

    fn check(&self, p: &ParamInfo) -> Result<()> {
        // Public fields: refuse at construction what `set_hparams` refuses.
        self.norm.validate("Dualize.norm")?;
        if matches!(self.norm, Norm::Spectral(_)) && p.matrix().is_none() {
            fail!(
                Config,
                p.name,
                "Norm::Spectral needs a matrix (rank ≥ 2), this parameter has shape {:?}; \
                 give vectors a vector norm",
                p.dims
            );
        }
        Ok(())
    }

    fn apply(
        &self,
        step: &mut GroupStep<'_>,
        _states: &mut [Option<Box<dyn TransformState>>],
        _fuse: bool,
    ) -> Result<()> {
        let d = step.dir_batch()?;
        let out = match &self.norm {
            Norm::Spectral(ns) => device::msign(&d, ns)?,
            norm => {
                let dirs = (0..step.len())
                    .map(|i| dualize(&d.get(i)?, norm))
                    .collect::<Result<Vec<_>>>()?;
                Tensor::stack(&dirs, 0)?
            }
        };
        step.set_dir(out)
    }

    fn boxed(&self) -> Box<dyn Transform> {
        Box::new(self.clone())
    }
}
