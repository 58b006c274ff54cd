//! Adam's moment estimates and bias-corrected scaling.

use std::any::Any;

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use super::{
    from_json, state_mut, to_json, zeros_var, Dir, FieldSpec, FieldValue, Fields, GroupStep,
    Transform, TransformState,
};
use crate::device::{self, AdamItem, AdamStep};
use crate::error::{fail, Result};
use crate::params::ParamInfo;

/// Adam scaling (`torch.optim.AdamW` order of operations): with `d` the
/// direction, `m ← m + (d − m)(1 − β₁)`, `v ← v·β₂ + d²(1 − β₂)`, and the
/// new direction `(m / (√v/√(1 − β₂ᵗ) + eps)) / (1 − β₁ᵗ)`. Per-parameter
/// step counts `t` (a parameter without a gradient keeps its count). As the
/// last direction transform it runs the update itself (one fused pass with
/// the pending decay).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Adam {
    /// `β₁ ∈ [0, 1)`.
    pub beta1: f64,
    /// `β₂ ∈ [0, 1)`.
    pub beta2: f64,
    /// `eps > 0`, added to `√v̂`.
    pub eps: f64,
}

impl Default for Adam {
    /// `torch`'s defaults: `β = (0.9, 0.999)`, `eps = 1e-8`.
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
        }
    }
}

impl Adam {
    /// Adam with these hyperparameters (validated).
    pub fn new(beta1: f64, beta2: f64, eps: f64) -> Result<Self> {
        let a = Self { beta1, beta2, eps };
        a.validate("Adam")?;
        Ok(a)
    }

    pub(crate) fn validate(&self, who: &str) -> Result<()> {
        for (f, b) in [("beta1", self.beta1), ("beta2", self.beta2)] {
            if !(0.0..1.0).contains(&b) {
                fail!(Config, format!("{who}.{f}"), "must be in [0, 1), got {b}");
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            fail!(
                Config,
                format!("{who}.eps"),
                "must be finite and > 0, got {}",
                self.eps
            );
        }
        Ok(())
    }

    /// The step factors after `t` steps (`t ≥ 1`).
    pub fn step_factors(&self, lr: f64, t: u64) -> AdamStep {
        let t = t.min(i32::MAX as u64) as i32;
        AdamStep {
            lr_bc1: lr / (1.0 - self.beta1.powi(t)),
            bc2_sqrt: (1.0 - self.beta2.powi(t)).sqrt(),
        }
    }
}

/// A parameter's Adam moments and step count.
#[derive(Debug)]
pub struct AdamState {
    /// First moment (parameter shape, arithmetic dtype).
    pub exp_avg: Var,
    /// Second moment.
    pub exp_avg_sq: Var,
    /// Steps taken.
    pub step: u64,
}

impl TransformState for AdamState {
    fn fields(&self) -> Vec<(&'static str, FieldValue<'_>)> {
        vec![
            ("exp_avg", FieldValue::Tensor(self.exp_avg.as_tensor())),
            (
                "exp_avg_sq",
                FieldValue::Tensor(self.exp_avg_sq.as_tensor()),
            ),
            ("step", FieldValue::Count(self.step)),
        ]
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

impl Transform for Adam {
    fn kind(&self) -> &'static str {
        "adam"
    }

    fn hparams(&self) -> serde_json::Value {
        to_json(self)
    }

    fn set_hparams(&mut self, v: &serde_json::Value) -> Result<()> {
        let new: Self = from_json(self.kind(), v)?;
        new.validate("Adam")?;
        *self = new;
        Ok(())
    }

    /// The first step's rate `η/(1 − β₁)` (bias correction) must be
    /// finite in f32, where the kernels compute it.
    fn check_lr(&self, lr: f64) -> Result<()> {
        let first = lr / (1.0 - self.beta1);
        if first > f32::MAX as f64 {
            fail!(
                Config,
                "lr",
                "lr/(1 − β₁) = {lr}/(1 − {}) = {first} is beyond f32's range, in which \
                 AdamW's step computes",
                self.beta1
            );
        }
        Ok(())
    }

    fn check(&self, _p: &ParamInfo) -> Result<()> {
        // The fields are public: refuse at construction what `set_hparams`
        // would refuse, rather than step with it.
        self.validate("Adam")
    }

    fn fields(&self, p: &ParamInfo) -> Vec<FieldSpec> {
        let dt = p.math_dtype();
        vec![
            FieldSpec::tensor("exp_avg", p.dims.clone(), dt),
            FieldSpec::tensor("exp_avg_sq", p.dims.clone(), dt),
            FieldSpec::count("step"),
        ]
    }

    fn load(&self, _p: &ParamInfo, f: &Fields) -> Result<Box<dyn TransformState>> {
        Ok(Box::new(AdamState {
            exp_avg: f.var("exp_avg")?,
            exp_avg_sq: f.var("exp_avg_sq")?,
            step: f.count("step")?,
        }))
    }

    fn apply(
        &self,
        step: &mut GroupStep<'_>,
        states: &mut [Option<Box<dyn TransformState>>],
        fuse: bool,
    ) -> Result<()> {
        for (i, slot) in states.iter_mut().enumerate() {
            match state_mut::<AdamState>(slot) {
                Some(st) => st.step += 1,
                None => {
                    let info = step.info(i);
                    *slot = Some(Box::new(AdamState {
                        exp_avg: zeros_var(info, &info.dims)?,
                        exp_avg_sq: zeros_var(info, &info.dims)?,
                        step: 1,
                    }));
                }
            }
        }
        let st: Vec<&AdamState> = states
            .iter()
            .map(|s| {
                s.as_ref()
                    .and_then(|s| s.as_any().downcast_ref::<AdamState>())
                    .expect("created above")
            })
            .collect();
        if fuse && matches!(step.dir(), Dir::Grad) {
            let items: Vec<AdamItem<'_>> = (0..step.len())
                .map(|i| AdamItem {
                    w: step.var(i),
                    g: step.grad(i),
                    m: &st[i].exp_avg,
                    v: &st[i].exp_avg_sq,
                    step: self.step_factors(step.lr() * step.alpha(i), st[i].step),
                    decay: step.decay_term(i),
                })
                .collect();
            device::adamw_step(&items, self.beta1, self.beta2, self.eps)?;
            step.mark_applied();
            return Ok(());
        }
        // Not last: the scaled moment becomes the direction (`η` applies later).
        let d = step.dir_batch()?;
        let mut dirs = Vec::with_capacity(step.len());
        for (i, s) in st.iter().enumerate() {
            let di = d.get(i)?.reshape(s.exp_avg.shape())?;
            let (m, v) = (s.exp_avg.as_tensor(), s.exp_avg_sq.as_tensor());
            let m_new = (m + ((&di - m)? * (1.0 - self.beta1))?)?;
            let v_new = ((v * self.beta2)? + (di.sqr()? * (1.0 - self.beta2))?)?;
            let f = self.step_factors(1.0, s.step);
            let denom = ((v_new.sqrt()? / f.bc2_sqrt)? + self.eps)?;
            let out = ((&m_new / &denom)? * f.lr_bc1)?;
            s.exp_avg.set(&m_new)?;
            s.exp_avg_sq.set(&v_new)?;
            dirs.push(out.reshape(d.get(i)?.shape())?);
        }
        step.set_dir(Tensor::stack(&dirs, 0)?)
    }

    fn boxed(&self) -> Box<dyn Transform> {
        Box::new(self.clone())
    }
}
