//! SGD: `Chain[Decay, Momentum::classic]` (`torch.optim.SGD`, dampening 0).

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};
use candle_nn::{Optimizer, VarMap};
use serde::{Deserialize, Serialize};

use super::driver::{check_lr, Driver};
use super::transform::{Decay, Momentum, MomentumKind};
use super::Chain;
use crate::checkpoint::OptimizerState;
use crate::decay::WeightDecay;
use crate::error::{Error, Result};
use crate::params::{name_vars, varmap_vars, NamedVar};

/// SGD hyperparameters. Defaults: `lr = 1e-2`, no momentum, no decay.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
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
        self.momentum().validate("SgdConfig")?;
        self.weight_decay.validate("SgdConfig.weight_decay")
    }

    fn momentum(&self) -> Momentum {
        Momentum {
            kind: MomentumKind::Classic,
            momentum: self.momentum,
            nesterov: self.nesterov,
        }
    }

    /// The chain this config stands for: decay, then (with `μ > 0`) momentum.
    /// The chain carries no rate: in a [`Partition`](crate::optim::Partition)
    /// group, the group's rate is the one used, not this config's `lr`.
    pub fn chain(&self) -> Chain {
        let chain = Chain::new().then(Decay {
            decay: self.weight_decay,
            vectors: self.decay_vectors,
        });
        if self.momentum > 0.0 {
            chain.then(self.momentum())
        } else {
            chain
        }
    }
}

/// Stochastic gradient descent with momentum and decoupled (or spectral)
/// weight decay: the chain [`Decay`] → [`Momentum`] (classic), one fused
/// in-place pass per parameter. With `momentum = 0` and `Decoupled(λ)` this
/// equals `torch.optim.SGD(weight_decay=λ)`.
#[derive(Debug)]
pub struct Sgd {
    driver: Driver,
    config: SgdConfig,
}

const KIND: &str = "sgd";

impl Sgd {
    /// SGD over the float variables of `varmap`, keeping their names.
    pub fn from_varmap(varmap: &VarMap, config: SgdConfig) -> Result<Self> {
        Self::from_named(varmap_vars(varmap)?, config)
    }

    /// SGD over explicitly named variables.
    pub fn from_named(vars: Vec<NamedVar>, config: SgdConfig) -> Result<Self> {
        config.validate()?;
        let driver = Driver::new(vars, config.chain(), config.lr)?.with_kind(KIND);
        Ok(Self { driver, config })
    }

    /// The current hyperparameters.
    pub fn config(&self) -> &SgdConfig {
        &self.config
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

impl Optimizer for Sgd {
    type Config = SgdConfig;

    /// Bare variables are named `param.0`, `param.1`, … in the order they
    /// were created (not the order given), which is also their order in
    /// the driver (`driver().params()`) and for `step_subset`'s indices.
    fn new(vars: Vec<Var>, config: SgdConfig) -> candle_core::Result<Self> {
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

impl OptimizerState for Sgd {
    fn state_dict(&self) -> Result<HashMap<String, Tensor>> {
        self.driver
            .state_dict_with(serde_json::to_value(&self.config).expect("config encodes"))
    }

    fn load_state_dict(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let header = self.driver.read_header(state)?;
        let config: SgdConfig = header.field("config")?;
        config
            .validate()
            .map_err(|e| Error::checkpoint("config", e.to_string()))?;
        self.driver.load_with(state, Some(vec![config.chain()]))?;
        self.config = config;
        self.config.lr = self.driver.lr();
        Ok(())
    }
}
