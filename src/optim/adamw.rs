//! AdamW: `Chain[Decay, Adam]` with `torch.optim.AdamW` semantics.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use candle_nn::{Optimizer, VarMap};
use serde::{Deserialize, Serialize};

use super::driver::{check_lr, Driver};
use super::transform::{Adam, Decay};
use super::Chain;
use crate::checkpoint::OptimizerState;
use crate::decay::WeightDecay;
use crate::error::{Error, Result};
use crate::params::{name_vars, varmap_vars, NamedVar};

/// AdamW hyperparameters. Defaults are `torch.optim.AdamW`'s: `lr = 1e-3`,
/// `β = (0.9, 0.999)`, `eps = 1e-8`, decoupled decay `0.01` (on matrices only
/// unless `decay_vectors`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
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
        self.validate_as("AdamWConfig")
    }

    pub(crate) fn validate_as(&self, who: &str) -> Result<()> {
        check_lr(&format!("{who}.lr"), self.lr)?;
        self.adam().validate(who)?;
        self.weight_decay.validate(&format!("{who}.weight_decay"))
    }

    fn adam(&self) -> Adam {
        Adam {
            beta1: self.beta1,
            beta2: self.beta2,
            eps: self.eps,
        }
    }

    /// The chain this config stands for: decay, then Adam.
    /// The chain carries no rate: in a [`Partition`](crate::optim::Partition)
    /// group, the group's rate is the one used, not this config's `lr`.
    pub fn chain(&self) -> Chain {
        Chain::new()
            .then(Decay {
                decay: self.weight_decay,
                vectors: self.decay_vectors,
            })
            .then(self.adam())
    }
}

/// AdamW (`torch.optim.AdamW` semantics: bias correction, decay applied before
/// the Adam update) with any [`WeightDecay`]: the chain
/// [`Decay`] → [`Adam`], whose update runs as one fused in-place pass per
/// parameter; spectral decay batches same-shape matrices into one power
/// iteration. Moments are kept in f32 for f16/bf16 parameters. Per-parameter
/// step counts (a parameter without a gradient keeps its count).
#[derive(Debug)]
pub struct AdamW {
    driver: Driver,
    config: AdamWConfig,
}

const KIND: &str = "adamw";

impl AdamW {
    /// AdamW over the float variables of `varmap`, keeping their names.
    pub fn from_varmap(varmap: &VarMap, config: AdamWConfig) -> Result<Self> {
        Self::from_named(varmap_vars(varmap)?, config)
    }

    /// AdamW over explicitly named variables.
    pub fn from_named(vars: Vec<NamedVar>, config: AdamWConfig) -> Result<Self> {
        config.validate()?;
        let driver = Driver::new(vars, config.chain(), config.lr)?.with_kind(KIND);
        Ok(Self { driver, config })
    }

    /// The current hyperparameters.
    pub fn config(&self) -> &AdamWConfig {
        &self.config
    }

    /// The parameters, with their names.
    pub fn vars(&self) -> &[NamedVar] {
        self.driver.params()
    }

    /// The driver (chain, state).
    pub fn driver(&self) -> &Driver {
        &self.driver
    }

    /// The driver, mutably (the data-parallel step runs its two-phase step).
    pub(crate) fn driver_mut(&mut self) -> &mut Driver {
        &mut self.driver
    }

    /// One step, with the crate's typed error.
    pub fn try_step(&mut self, grads: &GradStore) -> Result<()> {
        self.driver.try_step(grads)
    }

    /// One step of only the parameters at `grads[..].0` (indices into
    /// [`Driver::params`], i.e. this optimizer's parameter order), with
    /// these gradients; the others are untouched and get no state. What a
    /// data-parallel owner runs on its share (see [`Driver::step_subset`]).
    pub fn step_subset(&mut self, grads: &[(usize, Tensor)]) -> Result<()> {
        self.driver.step_subset(grads)
    }
}

impl Optimizer for AdamW {
    type Config = AdamWConfig;

    /// Bare variables are named `param.0`, `param.1`, … in the order they
    /// were created (not the order given), which is also their order in
    /// the driver (`driver().params()`) and for `step_subset`'s indices.
    fn new(vars: Vec<Var>, config: AdamWConfig) -> candle_core::Result<Self> {
        Ok(Self::from_named(name_vars(vars), config)?)
    }

    fn step(&mut self, grads: &GradStore) -> candle_core::Result<()> {
        Ok(self.try_step(grads)?)
    }

    fn learning_rate(&self) -> f64 {
        self.config.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.config.lr = lr;
        self.driver.set_lr(lr);
    }
}

impl OptimizerState for AdamW {
    fn state_dict(&self) -> Result<HashMap<String, Tensor>> {
        self.driver
            .state_dict_with(serde_json::to_value(&self.config).expect("config encodes"))
    }

    fn load_state_dict(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let header = self.driver.read_header(state)?;
        let config: AdamWConfig = header.field("config")?;
        config
            .validate()
            .map_err(|e| Error::checkpoint("config", e.to_string()))?;
        self.driver.load_with(state, Some(vec![config.chain()]))?;
        self.config = config;
        self.config.lr = self.driver.lr();
        Ok(())
    }
}
