//! AdamW with decoupled or spectral weight decay (`torch.optim.AdamW` semantics).

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, Var};
use candle_nn::{Optimizer, VarMap};

use super::decay_step::{apply_decay, spectral_v_spec, SPECTRAL_V};
use super::params::{
    check_unique, commit, gather, math_dtype, name_vars, varmap_vars, Item, NamedVar,
};
use super::state::{export, import, key, scalar, Imported, OptimizerState, Slots};
use crate::decay::WeightDecay;
use crate::error::fail;

/// AdamW hyperparameters. Defaults are `torch.optim.AdamW`'s: `lr = 1e-3`,
/// `β = (0.9, 0.999)`, `eps = 1e-8`, decoupled decay `0.01` (on matrices only
/// unless `decay_vectors`).
#[derive(Clone, Debug, PartialEq)]
pub struct AdamWConfig {
    /// Learning rate `η`.
    pub lr: f64,
    /// First-moment decay `β₁`.
    pub beta1: f64,
    /// Second-moment decay `β₂`.
    pub beta2: f64,
    /// Added to `√v̂` in the denominator.
    pub eps: f64,
    /// Weight decay applied before the Adam update.
    pub weight_decay: WeightDecay,
    /// Also decay rank-0/1 parameters (biases, gains); `torch` does.
    pub decay_vectors: bool,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: WeightDecay::Decoupled(0.01),
            decay_vectors: false,
        }
    }
}

impl AdamWConfig {
    /// Errors (naming the field) on a hyperparameter out of range.
    pub fn validate(&self) -> Result<()> {
        check_lr("AdamWConfig.lr", self.lr)?;
        for (who, b) in [
            ("AdamWConfig.beta1", self.beta1),
            ("AdamWConfig.beta2", self.beta2),
        ] {
            if !(0.0..1.0).contains(&b) {
                fail!(who, "must be in [0, 1), got {b}");
            }
        }
        if !(self.eps.is_finite() && self.eps > 0.0) {
            fail!(
                "AdamWConfig.eps",
                "must be finite and > 0, got {}",
                self.eps
            );
        }
        self.weight_decay.validate("AdamWConfig.weight_decay")
    }

    pub(crate) fn hparams(&self, prefix: &str) -> Result<Vec<(String, Tensor)>> {
        Ok(vec![
            (format!("{prefix}lr"), scalar(self.lr)?),
            (format!("{prefix}beta1"), scalar(self.beta1)?),
            (format!("{prefix}beta2"), scalar(self.beta2)?),
            (format!("{prefix}eps"), scalar(self.eps)?),
            (
                format!("{prefix}weight_decay"),
                self.weight_decay.to_tensor()?,
            ),
            (
                format!("{prefix}decay_vectors"),
                scalar(self.decay_vectors as u8 as f64)?,
            ),
        ])
    }

    pub(crate) fn from_hparams(imp: &Imported, prefix: &str) -> Result<Self> {
        let cfg = Self {
            lr: imp.f64(&format!("{prefix}lr"))?,
            beta1: imp.f64(&format!("{prefix}beta1"))?,
            beta2: imp.f64(&format!("{prefix}beta2"))?,
            eps: imp.f64(&format!("{prefix}eps"))?,
            weight_decay: WeightDecay::from_tensor(imp.tensor(&format!("{prefix}weight_decay"))?)?,
            decay_vectors: imp.f64(&format!("{prefix}decay_vectors"))? != 0.0,
        };
        cfg.validate()?;
        Ok(cfg)
    }
}

/// Errors unless `lr` is finite and ≥ 0.
pub(crate) fn check_lr(who: &str, lr: f64) -> Result<()> {
    if !(lr.is_finite() && lr >= 0.0) {
        fail!(who, "learning rate must be finite and ≥ 0, got {lr}");
    }
    Ok(())
}

/// Errors unless the momentum `m` lies in `[0, 1)`.
pub(crate) fn check_momentum(who: &str, m: f64) -> Result<()> {
    if !(0.0..1.0).contains(&m) {
        fail!(who, "must be in [0, 1), got {m}");
    }
    Ok(())
}

pub(crate) const EXP_AVG: &str = "exp_avg";
pub(crate) const EXP_AVG_SQ: &str = "exp_avg_sq";
pub(crate) const STEP: &str = "step";

/// One Adam update of a single tensor (the math, no state handling):
/// `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`,
/// `w ← w − (η/(1−β₁ᵗ))·m / (√v/√(1−β₂ᵗ) + eps)`. `w` is already decayed.
/// Returns `(w, m, v)`.
pub fn adam_update(
    w: &Tensor,
    g: &Tensor,
    m: &Tensor,
    v: &Tensor,
    step: u64,
    lr: f64,
    cfg: &AdamWConfig,
) -> Result<(Tensor, Tensor, Tensor)> {
    let m = (m + ((g - m)? * (1.0 - cfg.beta1))?)?;
    let v = ((v * cfg.beta2)? + (g.sqr()? * (1.0 - cfg.beta2))?)?;
    let bc1 = 1.0 - cfg.beta1.powi(step as i32);
    let bc2_sqrt = (1.0 - cfg.beta2.powi(step as i32)).sqrt();
    let denom = ((v.sqrt()? / bc2_sqrt)? + cfg.eps)?;
    let w = (w - ((&m / &denom)? * (lr / bc1))?)?;
    Ok((w, m, v))
}

/// Adam updates for a group of items whose parameters were already decayed;
/// reads and writes `exp_avg`, `exp_avg_sq`, `step` in the staged `slots`.
pub(crate) fn adam_group(
    vars: &[NamedVar],
    items: &[Item],
    decayed: Vec<Tensor>,
    lr: f64,
    cfg: &AdamWConfig,
    slots: &mut Slots,
) -> Result<Vec<(usize, Tensor)>> {
    let mut out = Vec::with_capacity(items.len());
    for (it, w) in items.iter().zip(decayed) {
        let name = &vars[it.index].name;
        let zeros = || it.grad.zeros_like();
        let m = slots
            .get(&key(name, EXP_AVG))
            .cloned()
            .map_or_else(zeros, Ok)?;
        let v = slots
            .get(&key(name, EXP_AVG_SQ))
            .cloned()
            .map_or_else(zeros, Ok)?;
        let step = match slots.get(&key(name, STEP)) {
            Some(s) => s.to_scalar::<i64>()? as u64 + 1,
            None => 1,
        };
        let (w, m, v) = adam_update(&w, &it.grad, &m, &v, step, lr, cfg)?;
        slots.insert(key(name, EXP_AVG), m);
        slots.insert(key(name, EXP_AVG_SQ), v);
        // Kept on the host: reading it back costs no device sync.
        slots.insert(
            key(name, STEP),
            Tensor::new(step as i64, &candle_core::Device::Cpu)?,
        );
        out.push((it.index, w));
    }
    Ok(out)
}

/// Shape and dtype of the Adam slots of a parameter.
pub(crate) fn adam_slot_spec(var: &NamedVar, slot: &str) -> Option<(Vec<usize>, DType)> {
    let dt = math_dtype(var.var.dtype());
    match slot {
        EXP_AVG | EXP_AVG_SQ => Some((var.var.dims().to_vec(), dt)),
        STEP => Some((vec![], DType::I64)),
        _ => None,
    }
}

/// AdamW (`torch.optim.AdamW` semantics: bias correction, decay applied before
/// the Adam update) with any [`WeightDecay`]; spectral decay batches
/// same-shape matrices into one power iteration.
///
/// Moments are kept in f32 for f16/bf16 parameters. Per-parameter step counts
/// (a parameter without a gradient is skipped and its count does not advance).
#[derive(Debug)]
pub struct AdamW {
    vars: Vec<NamedVar>,
    config: AdamWConfig,
    slots: Slots,
}

const KIND: &str = "adamw";

impl AdamW {
    /// AdamW over the float variables of `varmap`, keeping their names.
    pub fn from_varmap(varmap: &VarMap, config: AdamWConfig) -> Result<Self> {
        Self::from_named(varmap_vars(varmap), config)
    }

    /// AdamW over explicitly named variables.
    pub fn from_named(vars: Vec<NamedVar>, config: AdamWConfig) -> Result<Self> {
        config.validate()?;
        check_unique(&vars)?;
        Ok(Self {
            vars,
            config,
            slots: HashMap::new(),
        })
    }

    /// The current hyperparameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// The parameters, with their names.
    pub fn vars(&self) -> &[NamedVar] {
        &self.vars
    }
}

impl Optimizer for AdamW {
    type Config = AdamWConfig;

    fn new(vars: Vec<Var>, config: AdamWConfig) -> Result<Self> {
        Self::from_named(name_vars(vars), config)
    }

    fn step(&mut self, grads: &GradStore) -> Result<()> {
        let items = gather(&self.vars, grads)?;
        let mut staged = self.slots.clone();
        let cfg = &self.config;
        let decayed = apply_decay(
            &self.vars,
            &items,
            &cfg.weight_decay,
            cfg.decay_vectors,
            cfg.lr,
            &mut staged,
        )?;
        let updates = adam_group(&self.vars, &items, decayed, cfg.lr, cfg, &mut staged)?;
        commit(&self.vars, updates)?;
        self.slots = staged;
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        self.config.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.config.lr = lr;
    }
}

impl OptimizerState for AdamW {
    fn state_dict(&self) -> Result<HashMap<String, Tensor>> {
        export(KIND, self.config.hparams("")?, &self.vars, &self.slots)
    }

    fn load_state_dict(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let vars = &self.vars;
        let spec = |i: usize, slot: &str| match slot {
            SPECTRAL_V => spectral_v_spec(&vars[i]),
            _ => adam_slot_spec(&vars[i], slot),
        };
        let imp = import(
            KIND,
            vars,
            &[EXP_AVG, EXP_AVG_SQ, STEP, SPECTRAL_V],
            &spec,
            state,
        )?;
        let config = AdamWConfig::from_hparams(&imp, "")?;
        self.config = config;
        self.slots = imp.slots;
        Ok(())
    }
}
