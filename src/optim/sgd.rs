//! SGD with momentum, Nesterov and any weight decay.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Result, Tensor, Var};
use candle_nn::{Optimizer, VarMap};

use super::adamw::{check_lr, check_momentum};
use super::decay_step::{apply_decay, spectral_v_spec, SPECTRAL_V};
use super::params::{check_unique, commit, gather, math_dtype, name_vars, varmap_vars, NamedVar};
use super::state::{export, import, key, scalar, OptimizerState, Slots};
use crate::decay::WeightDecay;
use crate::error::fail;

/// SGD hyperparameters. Defaults: `lr = 1e-2`, no momentum, no decay.
#[derive(Clone, Debug, PartialEq)]
pub struct SgdConfig {
    /// Learning rate `η`.
    pub lr: f64,
    /// Momentum `μ` (0 disables the buffer).
    pub momentum: f64,
    /// Nesterov momentum: step along `g + μ·buf` instead of `buf`.
    pub nesterov: bool,
    /// Decoupled weight decay applied before the update.
    pub weight_decay: WeightDecay,
    /// Also decay rank-0/1 parameters.
    pub decay_vectors: bool,
}

impl Default for SgdConfig {
    fn default() -> Self {
        Self {
            lr: 1e-2,
            momentum: 0.0,
            nesterov: false,
            weight_decay: WeightDecay::None,
            decay_vectors: false,
        }
    }
}

impl SgdConfig {
    /// Errors (naming the field) on a hyperparameter out of range.
    pub fn validate(&self) -> Result<()> {
        check_lr("SgdConfig.lr", self.lr)?;
        check_momentum("SgdConfig.momentum", self.momentum)?;
        if self.nesterov && self.momentum == 0.0 {
            fail!("SgdConfig.nesterov", "Nesterov needs momentum > 0");
        }
        self.weight_decay.validate("SgdConfig.weight_decay")
    }
}

const MOMENTUM: &str = "momentum";
const KIND: &str = "sgd";

/// One SGD step of a single tensor: `buf ← μ·buf + g`, then
/// `w ← w − η·(g + μ·buf)` (Nesterov) or `w ← w − η·buf`. `w` is already
/// decayed. Same as `torch.optim.SGD` with `dampening = 0`. Returns `(w, buf)`.
pub fn sgd_update(
    w: &Tensor,
    g: &Tensor,
    buf: &Tensor,
    lr: f64,
    momentum: f64,
    nesterov: bool,
) -> Result<(Tensor, Tensor)> {
    let buf = ((buf * momentum)? + g)?;
    let dir = if nesterov {
        (g + (&buf * momentum)?)?
    } else {
        buf.clone()
    };
    Ok(((w - (dir * lr)?)?, buf))
}

/// Stochastic gradient descent with momentum and decoupled (or spectral)
/// weight decay. With `momentum = 0` and `Decoupled(λ)` this equals
/// `torch.optim.SGD(weight_decay=λ)`.
#[derive(Debug)]
pub struct Sgd {
    vars: Vec<NamedVar>,
    config: SgdConfig,
    slots: Slots,
}

impl Sgd {
    /// SGD over the float variables of `varmap`, keeping their names.
    pub fn from_varmap(varmap: &VarMap, config: SgdConfig) -> Result<Self> {
        Self::from_named(varmap_vars(varmap), config)
    }

    /// SGD over explicitly named variables.
    pub fn from_named(vars: Vec<NamedVar>, config: SgdConfig) -> Result<Self> {
        config.validate()?;
        check_unique(&vars)?;
        Ok(Self {
            vars,
            config,
            slots: HashMap::new(),
        })
    }

    /// The current hyperparameters.
    pub fn config(&self) -> &SgdConfig {
        &self.config
    }
}

impl Optimizer for Sgd {
    type Config = SgdConfig;

    fn new(vars: Vec<Var>, config: SgdConfig) -> Result<Self> {
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
        let mut updates = Vec::with_capacity(items.len());
        for (it, w) in items.iter().zip(decayed) {
            let k = key(&self.vars[it.index].name, MOMENTUM);
            if cfg.momentum == 0.0 {
                updates.push((it.index, (w - (&it.grad * cfg.lr)?)?));
                continue;
            }
            let buf = staged
                .get(&k)
                .cloned()
                .map_or_else(|| it.grad.zeros_like(), Ok)?;
            let (w, buf) = sgd_update(&w, &it.grad, &buf, cfg.lr, cfg.momentum, cfg.nesterov)?;
            staged.insert(k, buf);
            updates.push((it.index, w));
        }
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

impl OptimizerState for Sgd {
    fn state_dict(&self) -> Result<HashMap<String, Tensor>> {
        let c = &self.config;
        let hp = vec![
            ("lr".to_string(), scalar(c.lr)?),
            ("momentum".to_string(), scalar(c.momentum)?),
            ("nesterov".to_string(), scalar(c.nesterov as u8 as f64)?),
            ("weight_decay".to_string(), c.weight_decay.to_tensor()?),
            (
                "decay_vectors".to_string(),
                scalar(c.decay_vectors as u8 as f64)?,
            ),
        ];
        export(KIND, hp, &self.vars, &self.slots)
    }

    fn load_state_dict(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let vars = &self.vars;
        let spec = |i: usize, slot: &str| -> Option<(Vec<usize>, DType)> {
            match slot {
                SPECTRAL_V => spectral_v_spec(&vars[i]),
                MOMENTUM => Some((vars[i].var.dims().to_vec(), math_dtype(vars[i].var.dtype()))),
                _ => None,
            }
        };
        let imp = import(KIND, vars, &[MOMENTUM, SPECTRAL_V], &spec, state)?;
        let config = SgdConfig {
            lr: imp.f64("lr")?,
            momentum: imp.f64("momentum")?,
            nesterov: imp.f64("nesterov")? != 0.0,
            weight_decay: WeightDecay::from_tensor(imp.tensor("weight_decay")?)?,
            decay_vectors: imp.f64("decay_vectors")? != 0.0,
        };
        config.validate()?;
        self.config = config;
        self.slots = imp.slots;
        Ok(())
    }
}
