//! Momentum: the exponential moving average of Muon (`buf ← buf + (1−μ)(g − buf)`)
//! and SGD's classic heavy ball (`buf ← μ·buf + g`), each optionally Nesterov.

use std::any::Any;

use candle_core::{Tensor, Var};
use serde::{Deserialize, Serialize};

use super::{
    from_json, state_mut, to_json, zeros_var, Dir, FieldSpec, FieldValue, Fields, GroupStep,
    Transform, TransformState,
};
use crate::device::{self, SgdItem};
use crate::error::{fail, Result};
use crate::params::ParamInfo;

/// Which momentum.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MomentumKind {
    /// `buf ← buf + (1−μ)(d − buf)`; direction `buf`, or `d + μ(buf − d)`
    /// with Nesterov (Muon, `torch.optim.Muon`).
    Ema,
    /// `buf ← μ·buf + d`; direction `buf`, or `d + μ·buf` with Nesterov
    /// (`torch.optim.SGD`, dampening 0).
    Classic,
}

/// Momentum on the direction. State: `buf` (the parameter's shape,
/// arithmetic dtype). As the last direction transform, the classic kind runs
/// the update itself (SGD's fused pass).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Momentum {
    /// Which momentum.
    pub kind: MomentumKind,
    /// `μ ∈ [0, 1)`.
    pub momentum: f64,
    /// Nesterov's variant (needs `μ > 0`).
    pub nesterov: bool,
}

/// Errors unless `m ∈ [0, 1)`.
pub(crate) fn check_momentum(who: &str, m: f64) -> Result<()> {
    if !(0.0..1.0).contains(&m) {
        fail!(Config, who, "must be in [0, 1), got {m}");
    }
    Ok(())
}

impl Momentum {
    /// Momentum of `kind`; errors unless `μ ∈ [0, 1)` (and `μ > 0` with Nesterov).
    pub fn new(kind: MomentumKind, momentum: f64, nesterov: bool) -> Result<Self> {
        let m = Self {
            kind,
            momentum,
            nesterov,
        };
        m.validate("Momentum")?;
        Ok(m)
    }

    /// Muon's momentum.
    pub fn ema(momentum: f64, nesterov: bool) -> Result<Self> {
        Self::new(MomentumKind::Ema, momentum, nesterov)
    }

    /// SGD's momentum.
    pub fn classic(momentum: f64, nesterov: bool) -> Result<Self> {
        Self::new(MomentumKind::Classic, momentum, nesterov)
    }

    pub(crate) fn validate(&self, who: &str) -> Result<()> {
        check_momentum(&format!("{who}.momentum"), self.momentum)?;
        if self.nesterov && self.momentum == 0.0 {
            fail!(
                Config,
                format!("{who}.nesterov"),
                "Nesterov needs momentum > 0"
            );
        }
        Ok(())
    }
}

/// A parameter's momentum buffer.
#[derive(Debug)]
pub struct MomentumState {
    /// The buffer (parameter shape, arithmetic dtype).
    pub buf: Var,
}

impl TransformState for MomentumState {
    fn fields(&self) -> Vec<(&'static str, FieldValue<'_>)> {
        vec![("buf", FieldValue::Tensor(self.buf.as_tensor()))]
    }
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_any_mut(&mut self) -> &mut dyn Any {
        self
    }
}

/// Each member's buffer, created (zero) where missing.
fn buffers<'s>(
    step: &GroupStep<'_>,
    states: &'s mut [Option<Box<dyn TransformState>>],
) -> Result<Vec<&'s Var>> {
    for (i, slot) in states.iter_mut().enumerate() {
        if state_mut::<MomentumState>(slot).is_none() {
            let info = step.info(i);
            *slot = Some(Box::new(MomentumState {
                buf: zeros_var(info, &info.dims)?,
            }));
        }
    }
    Ok(states
        .iter()
        .map(|s| {
            &s.as_ref()
                .and_then(|s| s.as_any().downcast_ref::<MomentumState>())
                .expect("created above")
                .buf
        })
        .collect())
}

impl Transform for Momentum {
    fn kind(&self) -> &'static str {
        "momentum"
    }

    fn hparams(&self) -> serde_json::Value {
        to_json(self)
    }

    fn set_hparams(&mut self, v: &serde_json::Value) -> Result<()> {
        let new: Self = from_json(self.kind(), v)?;
        new.validate("Momentum")?;
        *self = new;
        Ok(())
    }

    fn check(&self, _p: &ParamInfo) -> Result<()> {
        // Public fields: refuse at construction what `set_hparams` refuses.
        self.validate("Momentum")
    }

    fn fields(&self, p: &ParamInfo) -> Vec<FieldSpec> {
        vec![FieldSpec::tensor("buf", p.dims.clone(), p.math_dtype())]
    }

    fn load(&self, _p: &ParamInfo, f: &Fields) -> Result<Box<dyn TransformState>> {
        Ok(Box::new(MomentumState { buf: f.var("buf")? }))
    }

    fn apply(
        &self,
        step: &mut GroupStep<'_>,
        states: &mut [Option<Box<dyn TransformState>>],
        fuse: bool,
    ) -> Result<()> {
        let (mu, nesterov) = (self.momentum, self.nesterov);
        let bufs = buffers(step, states)?;
        let grad_dir = matches!(step.dir(), Dir::Grad);
        match self.kind {
            MomentumKind::Classic if fuse && grad_dir => {
                // SGD: momentum, decay and update in one pass.
                let items: Vec<SgdItem<'_>> = (0..step.len())
                    .map(|i| SgdItem {
                        w: step.var(i),
                        g: step.grad(i),
                        buf: Some(bufs[i]),
                        lr: step.lr() * step.alpha(i),
                        decay: step.decay_term(i),
                    })
                    .collect();
                device::sgd_step(&items, mu, nesterov)?;
                step.mark_applied();
            }
            MomentumKind::Ema => {
                let out = Var::zeros(step.batch_dims(), step.math_dtype(), step.var(0).device())?;
                let batch;
                let inputs: Vec<Tensor> = match step.dir() {
                    Dir::Grad => (0..step.len()).map(|i| step.grad(i).clone()).collect(),
                    Dir::Batch(b) => {
                        batch = b.clone();
                        (0..step.len())
                            .map(|i| batch.get(i))
                            .collect::<candle_core::Result<_>>()?
                    }
                };
                let refs: Vec<&Tensor> = inputs.iter().collect();
                device::ema_momentum(&refs, &bufs, &out, mu, nesterov)?;
                step.set_dir(out.as_tensor().clone())?;
            }
            MomentumKind::Classic => {
                let d = step.dir_batch()?;
                let mut dirs = Vec::with_capacity(step.len());
                for (i, buf) in bufs.iter().enumerate() {
                    let di = d.get(i)?.reshape(buf.shape())?;
                    let b = ((buf.as_tensor() * mu)? + &di)?;
                    let out = if nesterov {
                        (&di + (&b * mu)?)?
                    } else {
                        b.clone()
                    };
                    buf.set(&b)?;
                    dirs.push(out.reshape(d.get(i)?.shape())?);
                }
                step.set_dir(Tensor::stack(&dirs, 0)?)?;
            }
        }
        Ok(())
    }

    fn boxed(&self) -> Box<dyn Transform> {
        Box::new(self.clone())
    }
}
