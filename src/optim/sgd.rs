//! SGD: `Chain[Decay, Momentum::classic]` (`torch.optim.SGD`, dampening 0).

use serde::{Deserialize, Serialize};

use super::alias::{alias, single_chain_config};
use super::driver::{check_lr, Driver};
use super::transform::{Decay, Momentum, MomentumKind};
use super::Chain;
use crate::decay::WeightDecay;
use crate::error::Result;

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
/// in-place pass per parameter. With `momentum = 0`, `Decoupled(λ)` and
/// `decay_vectors: true` this equals `torch.optim.SGD(weight_decay=λ)`; by
/// default (`decay_vectors: false`) biases and other vectors are not
/// decayed, where torch decays every parameter.
#[derive(Debug)]
pub struct Sgd {
    driver: Driver,
    config: SgdConfig,
}

single_chain_config!(SgdConfig, "sgd");

alias!(Sgd, SgdConfig, "SGD");
