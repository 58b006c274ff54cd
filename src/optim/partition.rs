//! Routing parameters to chains by a label function.

use candle_nn::VarMap;

use super::chain::Chain;
use super::driver::Driver;
use crate::error::{fail, Result};
use crate::params::{varmap_vars, NamedVar, ParamInfo};

type LabelFn = Box<dyn Fn(&ParamInfo) -> String>;

/// Builds a [`Driver`] whose parameters are split into groups by a label
/// function, each group with its own chain and learning rate; one step
/// updates all groups atomically and one checkpoint holds them all.
///
/// The first group's rate is the driver's learning rate; the others keep
/// their ratio to it when `set_learning_rate` changes it (one schedule drives
/// all groups).
///
/// ```
/// use candle_core::{DType, Device};
/// use candle_nn::{VarBuilder, VarMap};
/// use steepest::optim::transform::{Adam, Decay, Momentum, Orthogonalize, ShapeScale};
/// use steepest::optim::{Chain, LrAdjust, Partition};
/// use steepest::{NewtonSchulz, WeightDecay};
/// # fn main() -> steepest::Result<()> {
/// let varmap = VarMap::new();
/// let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
/// candle_nn::embedding(10, 8, vb.pp("embed"))?;
/// candle_nn::linear(8, 8, vb.pp("fc"))?;
/// let muon = Chain::new()
///     .then(Decay::new(WeightDecay::spectral(0.1), false)?)
///     .then(Momentum::ema(0.95, true)?)
///     .then(Orthogonalize { ns: NewtonSchulz::muon() })
///     .then(ShapeScale { adjust: LrAdjust::Original });
/// let adamw = Chain::new()
///     .then(Decay::new(WeightDecay::Decoupled(0.1), false)?)
///     .then(Adam::default());
/// let opt = Partition::by(|p| if p.is_matrix() && !p.name.starts_with("embed") { "muon" } else { "adamw" })
///     .group("muon", muon, 0.02)
///     .group("adamw", adamw, 3e-3)
///     .build_from_varmap(&varmap)?;
/// assert_eq!(opt.label_of("fc.weight"), Some("muon"));
/// assert_eq!(opt.label_of("embed.weight"), Some("adamw"));
/// # Ok(()) }
/// ```
pub struct Partition {
    label: LabelFn,
    groups: Vec<(String, Chain, f64)>,
}

impl std::fmt::Debug for Partition {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Partition")
            .field("groups", &self.groups)
            .finish_non_exhaustive()
    }
}

impl Partition {
    /// Parameters are labelled by `label`.
    pub fn by<S: Into<String>>(label: impl Fn(&ParamInfo) -> S + 'static) -> Self {
        Self {
            label: Box::new(move |p| label(p).into()),
            groups: Vec::new(),
        }
    }

    /// The parameters labelled `label` run `chain` at learning rate `lr`.
    pub fn group(mut self, label: impl Into<String>, chain: Chain, lr: f64) -> Self {
        self.groups.push((label.into(), chain, lr));
        self
    }

    /// The driver over the float variables of `varmap`, keeping their names.
    pub fn build_from_varmap(self, varmap: &VarMap) -> Result<Driver> {
        self.build(varmap_vars(varmap)?)
    }

    /// The driver over named variables. Errors on a label without a group, a
    /// group defined twice, or rates that are not finite and ≥ 0; a first
    /// group at rate 0 with another group at a non-zero rate is refused (the
    /// ratio of the rates, kept by `set_learning_rate`, would be undefined:
    /// build with the peak rates and let a schedule set the rate). Groups at
    /// rate 0 beside a first group at 0 get ratio 1: a later
    /// `set_learning_rate(η)` runs them at `η`.
    pub fn build(self, vars: Vec<NamedVar>) -> Result<Driver> {
        let Some((_, _, lr0)) = self.groups.first() else {
            fail!(Config, "Partition", "no groups");
        };
        let lr0 = *lr0;
        let mut parts = Vec::with_capacity(self.groups.len());
        for (i, (label, chain, lr)) in self.groups.iter().enumerate() {
            if self.groups[..i].iter().any(|g| &g.0 == label) {
                fail!(
                    Config,
                    format!("Partition group `{label}`"),
                    "defined twice"
                );
            }
            super::driver::check_lr(&format!("Partition group `{label}`: lr"), *lr)?;
            let ratio = if lr0 > 0.0 {
                lr / lr0
            } else if *lr == 0.0 {
                1.0
            } else {
                fail!(
                    Config,
                    format!("Partition group `{label}`: lr"),
                    "the first group's rate is 0, so this group's rate ratio ({lr} / 0) is \
                     undefined; build with the peak rates and let a schedule set the rate"
                );
            };
            parts.push((label.clone(), chain.clone(), ratio));
        }
        let mut assign = Vec::with_capacity(vars.len());
        for v in &vars {
            let label = (self.label)(&ParamInfo::of(v));
            let Some(k) = parts.iter().position(|p| p.0 == label) else {
                let labels: Vec<&str> = parts.iter().map(|p| p.0.as_str()).collect();
                fail!(
                    Config,
                    v.name,
                    "labelled `{label}`, which is no group of this partition (groups: {labels:?})"
                );
            };
            assign.push(k);
        }
        Driver::build(vars, parts, assign, lr0, "partition")
    }
}
