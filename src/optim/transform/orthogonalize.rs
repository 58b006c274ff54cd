//! Muon's matrix pieces: orthogonalising the direction, and scaling the step
//! by the matrix's shape.

use serde::{Deserialize, Serialize};

use super::{from_json, to_json, GroupStep, Transform, TransformState};
use crate::device;
use crate::error::{fail, Result};
use crate::linalg::NewtonSchulz;
use crate::params::ParamInfo;

/// Replaces each matrix direction `D` by `msign(D) = U Vᵀ` (Newton–Schulz),
/// all same-shape matrices of a group in one batched call. Matrices only.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Orthogonalize {
    /// The Newton–Schulz schedule.
    pub ns: NewtonSchulz,
}

impl Transform for Orthogonalize {
    fn kind(&self) -> &'static str {
        "orthogonalize"
    }

    fn matrix_cost(&self) -> bool {
        true
    }

    fn hparams(&self) -> serde_json::Value {
        to_json(self)
    }

    fn set_hparams(&mut self, v: &serde_json::Value) -> Result<()> {
        let new: Self = from_json(self.kind(), v)?;
        new.ns.validate("Orthogonalize.ns")?;
        *self = new;
        Ok(())
    }

    fn check(&self, p: &ParamInfo) -> Result<()> {
        // Public fields: refuse at construction what `set_hparams` refuses.
        self.ns.validate("Orthogonalize.ns")?;
        if p.matrix().is_none() {
            fail!(
                Config,
                p.name,
                "orthogonalisation needs a matrix (rank ≥ 2), this parameter has shape {:?}",
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
        step.set_dir(device::msign(&d, &self.ns)?)
    }

    fn boxed(&self) -> Box<dyn Transform> {
        Box::new(self.clone())
    }
}

/// How a step's length is scaled per matrix of (matrix-view) shape
/// `rows × cols`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum LrAdjust {
    /// `η` unchanged.
    None,
    /// `η·√max(1, rows/cols)` (Keller Jordan's Muon; torch's `"original"`).
    Original,
    /// `η·k·√max(rows, cols)` with `k` usually 0.2, so that the update's RMS
    /// matches AdamW's (Moonlight; torch's `"match_rms_adamw"`).
    MatchAdamWRms(f64),
}

impl LrAdjust {
    /// The factor on `η` for a `rows × cols` matrix.
    pub fn factor(&self, rows: usize, cols: usize) -> f64 {
        let (r, c) = (rows as f64, cols as f64);
        match *self {
            Self::None => 1.0,
            Self::Original => (r / c).max(1.0).sqrt(),
            Self::MatchAdamWRms(k) => k * r.max(c).sqrt(),
        }
    }

    pub(crate) fn validate(&self, who: &str) -> Result<()> {
        if let Self::MatchAdamWRms(k) = *self {
            if !(k.is_finite() && k > 0.0) {
                fail!(Config, who, "MatchAdamWRms needs a finite k > 0, got {k}");
            }
        }
        Ok(())
    }
}

/// Multiplies each matrix's step length by [`LrAdjust::factor`] of its
/// matrix view (vectors keep theirs). Weight decay is not scaled.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ShapeScale {
    /// The scaling rule.
    pub adjust: LrAdjust,
}

impl Transform for ShapeScale {
    fn kind(&self) -> &'static str {
        "shape_scale"
    }

    fn hparams(&self) -> serde_json::Value {
        to_json(self)
    }

    fn set_hparams(&mut self, v: &serde_json::Value) -> Result<()> {
        let new: Self = from_json(self.kind(), v)?;
        new.adjust.validate("ShapeScale.adjust")?;
        *self = new;
        Ok(())
    }

    fn check(&self, _p: &ParamInfo) -> Result<()> {
        // Public fields: refuse at construction what `set_hparams` refuses.
        self.adjust.validate("ShapeScale.adjust")
    }

    fn apply(
        &self,
        step: &mut GroupStep<'_>,
        _states: &mut [Option<Box<dyn TransformState>>],
        _fuse: bool,
    ) -> Result<()> {
        if let Some((r, c)) = step.matrix() {
            let f = self.adjust.factor(r, c);
            for i in 0..step.len() {
                step.scale_alpha(i, f);
            }
        }
        Ok(())
    }

    fn boxed(&self) -> Box<dyn Transform> {
        Box::new(self.clone())
    }
}
