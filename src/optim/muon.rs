//! Muon: a partition of the matrices, running
//! `Chain[Decay, Momentum::ema, Orthogonalize, ShapeScale]`, and the rest,
//! running AdamW (`torch.optim.Muon` semantics for the matrices).

use serde::{Deserialize, Serialize};

use super::alias::{alias, AliasConfig};
use super::driver::{check_lr, Driver};
use super::transform::{Decay, LrAdjust, Momentum, Orthogonalize, ShapeScale};
use super::{AdamWConfig, Chain, Partition};
use crate::decay::WeightDecay;
use crate::error::{fail, Result};
use crate::linalg::NewtonSchulz;
use crate::params::{NamedVar, ParamInfo};

/// Muon hyperparameters. Defaults follow `torch.optim.Muon`: `lr = 1e-3`,
/// momentum 0.95 with Nesterov, Keller Jordan's Newton–Schulz table,
/// `LrAdjust::Original`, decoupled decay 0.1. Parameters of rank < 2, and
/// those whose name contains one of `adamw_names`, are updated by an
/// internal AdamW configured by `adamw`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MuonConfig {
    /// Learning rate `η` of the matrices.
    pub lr: f64,
    /// Momentum `μ`: `buf ← μ·buf + (1−μ)·g`.
    pub momentum: f64,
    /// Orthogonalise `(1−μ)·g + μ·buf` instead of `buf` (needs `μ > 0`).
    pub nesterov: bool,
    /// The Newton–Schulz schedule for `msign`.
    pub newton_schulz: NewtonSchulz,
    /// Per-shape learning-rate scaling.
    pub lr_adjust: LrAdjust,
    /// Weight decay of the Muon matrices (uses the unadjusted `η`, as torch).
    pub weight_decay: WeightDecay,
    /// Config of the internal AdamW. Its `lr` keeps its ratio to `lr` when
    /// `set_learning_rate` changes the Muon rate (so one schedule drives both);
    /// so `lr` must be > 0 unless `adamw.lr` is 0 too. With both at 0 the
    /// ratio is taken as 1: a later `set_learning_rate(η)` runs AdamW at `η`
    /// too (build with the peak rates to keep another ratio).
    pub adamw: AdamWConfig,
    /// Substrings of parameter names routed to AdamW (e.g. `"embed"`,
    /// `"lm_head"`). Every matrix not matched goes to Muon, the output layer
    /// and the embeddings included: Muon's authors keep those two on AdamW,
    /// so name them here (a substring match: `"head"` also catches
    /// `"attn_head.w"`; empty by default).
    pub adamw_names: Vec<String>,
}

impl Default for MuonConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            momentum: 0.95,
            nesterov: true,
            newton_schulz: NewtonSchulz::muon(),
            lr_adjust: LrAdjust::Original,
            weight_decay: WeightDecay::Decoupled(0.1),
            adamw: AdamWConfig::default(),
            adamw_names: Vec::new(),
        }
    }
}

impl MuonConfig {
    /// Errors (naming the field) on a hyperparameter out of range.
    pub fn validate(&self) -> Result<()> {
        check_lr("MuonConfig.lr", self.lr)?;
        self.momentum().validate("MuonConfig")?;
        self.newton_schulz.validate("MuonConfig.newton_schulz")?;
        self.lr_adjust.validate("MuonConfig.lr_adjust")?;
        self.weight_decay.validate("MuonConfig.weight_decay")?;
        self.adamw.validate_as("MuonConfig.adamw")?;
        if self.lr == 0.0 && self.adamw.lr != 0.0 {
            fail!(
                Config,
                "MuonConfig.lr",
                "is 0 while adamw.lr is {}: the AdamW rate's ratio to the Muon rate (kept by \
                 set_learning_rate) would be undefined; build with the peak rates and let a \
                 schedule set the rate",
                self.adamw.lr
            );
        }
        Ok(())
    }

    fn momentum(&self) -> Momentum {
        Momentum {
            kind: super::transform::MomentumKind::Ema,
            momentum: self.momentum,
            nesterov: self.nesterov,
        }
    }

    /// The chain of the Muon matrices: decay, momentum, `msign`, shape scaling.
    /// The chain carries no rate: in a [`Partition`](crate::optim::Partition)
    /// group, the group's rate is the one used, not this config's `lr`.
    pub fn chain(&self) -> Chain {
        Chain::new()
            .then(Decay {
                decay: self.weight_decay,
                vectors: false,
            })
            .then(self.momentum())
            .then(Orthogonalize {
                ns: self.newton_schulz.clone(),
            })
            .then(ShapeScale {
                adjust: self.lr_adjust,
            })
    }

    /// Whether a parameter goes to the Muon chain (else to AdamW).
    pub fn is_muon(&self, p: &ParamInfo) -> bool {
        p.is_matrix() && !self.adamw_names.iter().any(|s| p.name.contains(s.as_str()))
    }
}

/// Muon (MomentUm Orthogonalized by Newton–Schulz) as a candle optimizer.
///
/// For each matrix `W` with gradient `G`: momentum, then
/// `W ← W − decay − η·adjust(rows, cols)·msign(update)`. Same-shape matrices
/// are orthogonalised together as one `(b, m, n)` batch. A tensor of rank > 2
/// is treated as its matrix view `(d₀, d₁·d₂·…)` (e.g. a conv kernel
/// `(out, in, kh, kw)` → `(out, in·kh·kw)`). Rank-0/1 parameters and
/// name-routed ones go to the internal AdamW. It is a [`Partition`] with
/// groups `muon` ([`MuonConfig::chain`]) and `adamw`
/// ([`AdamWConfig::chain`]).
#[derive(Debug)]
pub struct Muon {
    driver: Driver,
    config: MuonConfig,
}

impl AliasConfig for MuonConfig {
    const KIND: &'static str = "muon";

    fn check(&self) -> Result<()> {
        self.validate()
    }

    /// `muon`, then `adamw`.
    fn chains(&self) -> Vec<Chain> {
        vec![self.chain(), self.adamw.chain()]
    }

    fn build(&self, vars: Vec<NamedVar>) -> Result<Driver> {
        let route = self.clone();
        Partition::by(move |p: &ParamInfo| if route.is_muon(p) { "muon" } else { "adamw" })
            .group("muon", self.chain(), self.lr)
            .group("adamw", self.adamw.chain(), self.adamw.lr)
            .build(vars)
    }

    fn record_lr(&mut self, lr: f64, driver: &Driver) {
        // The ratio fixed at construction (kept by the driver), so a rate of 0
        // (e.g. the first warmup step) does not lose it.
        self.lr = lr;
        self.adamw.lr = lr * driver.lr_ratio("adamw").unwrap_or(1.0);
    }

    /// The driver refuses a checkpoint that routes a parameter elsewhere;
    /// routing is this optimizer's own, so its `adamw_names` stay.
    fn resumed(&self, stored: Self) -> Self {
        Self {
            adamw_names: self.adamw_names.clone(),
            ..stored
        }
    }
}

alias!(Muon, MuonConfig, "Muon");

impl Muon {
    /// Names of the parameters updated by Muon (the others go to AdamW).
    pub fn muon_params(&self) -> Vec<&str> {
        self.driver
            .params()
            .iter()
            .filter(|v| self.driver.label_of(&v.name) == Some("muon"))
            .map(|v| v.name.as_str())
            .collect()
    }
}
