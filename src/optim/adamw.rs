//! AdamW: `Chain[Decay, Adam]` with `torch.optim.AdamW` semantics.

use serde::{Deserialize, Serialize};

use super::alias::{alias, single_chain_config};
use super::driver::{check_lr, Driver};
use super::transform::{Adam, Decay};
use super::Chain;
use crate::decay::WeightDecay;
use crate::error::Result;

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

single_chain_config!(AdamWConfig, "adamw");

alias!(AdamW, AdamWConfig, "AdamW");
