//! Weight decay as a transform: decoupled `w ← (1 − ηλ)w` or spectral
//! `W ← W − ηλ·σ₁u₁v₁ᵀ`, folded into the update.

use std::any::Any;

use candle_core::Var;
use serde::{Deserialize, Serialize};

use super::{
    from_json, state_mut, to_json, FieldSpec, FieldValue, Fields, GroupStep, Stage, Transform,
    TransformState,
};
use crate::decay::{warm_or_cold_power_iteration, WeightDecay};
use crate::error::{fail, Result};
use crate::params::ParamInfo;

/// Decoupled or spectral weight decay with coefficient `η·λ` (`η` the
/// chain's learning rate), applied to the weights before the step.
///
/// Matrices (rank ≥ 2, by their matrix view) get `decay`; vectors get the
/// decoupled form when `vectors` is set (a vector is a `1 × n` matrix, whose
/// spectral decay is the decoupled one), nothing otherwise. Spectral decay
/// keeps `v₁` per matrix (field `v`) and warm-starts the batched power
/// iteration from it; a cold start uses `max(iters, COLD_START_ITERS)`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Decay {
    /// The decay of matrices.
    pub decay: WeightDecay,
    /// Also decay rank-0/1 parameters (decoupled).
    pub vectors: bool,
}

impl Decay {
    /// Decay matrices (and vectors if `vectors`) with `decay`.
    pub fn new(decay: WeightDecay, vectors: bool) -> Result<Self> {
        decay.validate("Decay.decay")?;
        Ok(Self { decay, vectors })
    }
}

/// The `v₁` estimate of a matrix under spectral decay.
#[derive(Debug)]
pub struct SpectralDecayState {
    /// `v₁`, shape `(cols,)` of the matrix view.
    pub v: Var,
}

impl TransformState for SpectralDecayState {
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

impl Transform for Decay {
    fn kind(&self) -> &'static str {
        "decay"
    }

    fn stage(&self) -> Stage {
        Stage::Pre
    }

    fn hparams(&self) -> serde_json::Value {
        to_json(self)
    }

    fn set_hparams(&mut self, v: &serde_json::Value) -> Result<()> {
        let new: Self = from_json(self.kind(), v)?;
        new.decay.validate("Decay.decay")?;
        *self = new;
        Ok(())
    }

    fn check(&self, _p: &ParamInfo) -> Result<()> {
        // Public fields: refuse at construction what `set_hparams` refuses.
        self.decay.validate("Decay.decay")
    }

    fn sets_rank1_decay(&self) -> bool {
        matches!(self.decay, WeightDecay::Spectral { .. })
    }

    fn fields(&self, p: &ParamInfo) -> Vec<FieldSpec> {
        match (self.decay, p.matrix()) {
            (WeightDecay::Spectral { .. }, Some((_, cols))) => {
                vec![FieldSpec::tensor("v", vec![cols], p.math_dtype())]
            }
            _ => Vec::new(),
        }
    }

    /// `ηλ ≤ 1`: beyond it the decay factor `1 − ηλ` is negative (decoupled
    /// decay would flip every weight's sign, spectral decay the top singular
    /// direction's), which no schedule means.
    fn check_lr(&self, lr: f64) -> Result<()> {
        let coeff = lr * self.decay.lambda();
        if coeff.is_nan() || coeff > 1.0 {
            fail!(
                Config,
                "weight_decay",
                "lr·λ = {lr}·{} = {coeff} > 1: the decay factor 1 − lr·λ would be negative",
                self.decay.lambda()
            );
        }
        Ok(())
    }

    fn load(&self, _p: &ParamInfo, f: &Fields) -> Result<Box<dyn TransformState>> {
        Ok(Box::new(SpectralDecayState { v: f.var("v")? }))
    }

    fn apply(
        &self,
        step: &mut GroupStep<'_>,
        states: &mut [Option<Box<dyn TransformState>>],
        _fuse: bool,
    ) -> Result<()> {
        let coeff = step.lr() * self.decay.lambda();
        if coeff == 0.0 {
            return Ok(());
        }
        let (WeightDecay::Spectral { iters, .. }, Some((_, cols))) = (self.decay, step.matrix())
        else {
            if step.matrix().is_some() || self.vectors {
                for i in 0..step.len() {
                    step.decay_scale(i, 1.0 - coeff);
                }
            }
            return Ok(());
        };
        let ws = step.param_views()?;
        let (dt, dev) = (step.math_dtype(), ws[0].device().clone());
        // Each member's v₁ estimate is the power iteration's start and gets
        // its result in place. A member without one yet gets a zero vector:
        // no start, so the default one, with the cold start's iterations
        // (its own: the warm members of the group keep `iters`, as alone).
        // The cold members' vectors go into their slots only once every
        // power iteration has run: a failed step leaves them cold.
        let mut warm = Vec::with_capacity(states.len());
        let mut vs = Vec::with_capacity(states.len());
        for slot in states.iter_mut() {
            let v = state_mut::<SpectralDecayState>(slot).map(|st| st.v.clone());
            warm.push(v.is_some());
            vs.push(match v {
                Some(v) => v,
                None => Var::zeros(cols, dt, &dev)?,
            });
        }
        warm_or_cold_power_iteration(&ws, &vs, &warm, iters, |members, top| {
            // σ₁u₁ (no host sync): the rank-1 term is σ₁u₁v₁ᵀ = W v₁v₁ᵀ.
            let a_all = top.u.broadcast_mul(&top.sigma.unsqueeze(1)?)?;
            for (j, &i) in members.iter().enumerate() {
                step.decay_rank1(i, coeff, a_all.get(j)?, top.v.get(j)?);
            }
            Ok(())
        })?;
        for (i, slot) in states.iter_mut().enumerate() {
            if !warm[i] {
                *slot = Some(Box::new(SpectralDecayState { v: vs[i].clone() }));
            }
        }
        Ok(())
    }

    fn boxed(&self) -> Box<dyn Transform> {
        Box::new(self.clone())
    }
}
