//! What the optimizer aliases ([`AdamW`](super::AdamW), [`Sgd`](super::Sgd),
//! [`Muon`](super::Muon), [`Steepest`](super::Steepest)) share. Each is a
//! [`Driver`] plus the config it was built from; [`AliasConfig`] says what
//! differs between them (the chains, how the rates follow the main one, what
//! a checkpoint's config must agree with), and `alias!` writes the rest once:
//! the constructors, the accessors, `candle_nn::Optimizer` and
//! [`OptimizerState`](crate::checkpoint::OptimizerState).

use std::collections::HashMap;

use candle_core::Tensor;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{Chain, Driver};
use crate::error::{Error, Result};
use crate::params::NamedVar;

/// The config of an alias: what makes it that optimizer.
pub(crate) trait AliasConfig: Clone + Serialize + DeserializeOwned {
    /// The checkpoint header's kind (a checkpoint of another kind is refused).
    const KIND: &'static str;

    /// Checks the hyperparameters (the config's own `validate`).
    fn check(&self) -> Result<()>;

    /// The chain of each partition, in the driver's order.
    fn chains(&self) -> Vec<Chain>;

    /// A driver over `vars` running [`AliasConfig::chains`].
    fn build(&self, vars: Vec<NamedVar>) -> Result<Driver>;

    /// Records the main learning rate `lr` in the config, with the rates that
    /// follow it (their ratios are the driver's).
    fn record_lr(&mut self, lr: f64, driver: &Driver);

    /// Refuses a checkpoint's config this optimizer cannot take, before
    /// anything is loaded.
    fn check_resumable(&self, _stored: &Self) -> Result<()> {
        Ok(())
    }

    /// The config after loading `stored`: by default the stored one (the
    /// checkpoint's hyperparameters), with what is this optimizer's own kept.
    fn resumed(&self, stored: Self) -> Self {
        stored
    }
}

/// A driver over `vars` for `config`, after checking it.
pub(crate) fn build<C: AliasConfig>(vars: Vec<NamedVar>, config: &C) -> Result<Driver> {
    config.check()?;
    Ok(config.build(vars)?.with_kind(C::KIND))
}

/// Sets the driver's rate and the config's record of it.
pub(crate) fn set_lr<C: AliasConfig>(driver: &mut Driver, config: &mut C, lr: f64) {
    driver.set_lr(lr);
    config.record_lr(lr, driver);
}

/// The driver's state dict, with the config in its header.
pub(crate) fn state_dict<C: AliasConfig>(
    driver: &Driver,
    config: &C,
) -> Result<HashMap<String, Tensor>> {
    driver.state_dict_with(serde_json::to_value(config).expect("config encodes"))
}

/// Loads `state` into the driver, rebuilding the chains from the stored
/// config; nothing changes unless all of it loads.
pub(crate) fn load_state_dict<C: AliasConfig>(
    driver: &mut Driver,
    config: &mut C,
    state: &HashMap<String, Tensor>,
) -> Result<()> {
    let header = driver.read_header(state)?;
    let stored: C = header.field("config")?;
    stored
        .check()
        .map_err(|e| Error::checkpoint("config", e.to_string()))?;
    config.check_resumable(&stored)?;
    driver.load_with(state, Some(stored.chains()))?;
    *config = config.resumed(stored);
    // The rates the driver runs at (its own record), not the config's
    // copies, so `learning_rate()` reports the rate steps use.
    config.record_lr(driver.lr(), driver);
    Ok(())
}

/// [`AliasConfig`] for a config with one chain (its `chain()`) and one rate
/// (its `lr`), checked by its `validate()`; further trait items (e.g.
/// `check_resumable`) may follow the kind.
macro_rules! single_chain_config {
    ($config:ty, $kind:literal $(, $($extra:tt)*)?) => {
        impl crate::optim::alias::AliasConfig for $config {
            const KIND: &'static str = $kind;

            fn check(&self) -> Result<()> {
                self.validate()
            }

            fn chains(&self) -> Vec<crate::optim::Chain> {
                vec![self.chain()]
            }

            fn build(&self, vars: Vec<crate::params::NamedVar>) -> Result<crate::optim::Driver> {
                crate::optim::Driver::new(vars, self.chain(), self.lr)
            }

            fn record_lr(&mut self, lr: f64, _: &crate::optim::Driver) {
                self.lr = lr;
            }

            $($($extra)*)?
        }
    };
}
pub(crate) use single_chain_config;

/// The constructors, accessors, `candle_nn::Optimizer` and `OptimizerState`
/// of an alias `$alias { driver: Driver, config: $config }`, whose config
/// implements [`AliasConfig`].
macro_rules! alias {
    ($alias:ident, $config:ty, $what:literal) => {
        impl $alias {
            #[doc = concat!($what, " over the float variables of `varmap`, keeping their names.")]
            pub fn from_varmap(varmap: &candle_nn::VarMap, config: $config) -> Result<Self> {
                Self::from_named(crate::params::varmap_vars(varmap)?, config)
            }

            #[doc = concat!($what, " over explicitly named variables.")]
            pub fn from_named(vars: Vec<crate::params::NamedVar>, config: $config) -> Result<Self> {
                let driver = crate::optim::alias::build(vars, &config)?;
                Ok(Self { driver, config })
            }

            /// Steps bf16/f16 parameters through f32 master weights (see
            /// [`Driver::with_master_weights`](crate::optim::Driver::with_master_weights)).
            pub fn with_master_weights(mut self) -> Self {
                self.driver = self.driver.with_master_weights();
                self
            }

            /// The current hyperparameters (the rates follow `set_learning_rate`).
            pub fn config(&self) -> &$config {
                &self.config
            }

            /// The parameters, with their names, in the order they are stepped.
            pub fn vars(&self) -> &[crate::params::NamedVar] {
                self.driver.params()
            }

            /// The driver (partitions, chains, state).
            pub fn driver(&self) -> &crate::optim::Driver {
                &self.driver
            }

            /// The driver, mutably (the data-parallel step runs its two-phase step).
            pub(crate) fn driver_mut(&mut self) -> &mut crate::optim::Driver {
                &mut self.driver
            }

            /// One step, with the crate's typed error.
            pub fn try_step(&mut self, grads: &candle_core::backprop::GradStore) -> Result<()> {
                self.driver.try_step(grads)
            }

            /// One step of only the parameters at `grads[..].0` (indices into
            /// [`Driver::params`](crate::optim::Driver::params), i.e. this
            /// optimizer's parameter order), with these gradients; the others
            /// are untouched and get no state. What a data-parallel owner runs
            /// on its share (see
            /// [`Driver::step_subset`](crate::optim::Driver::step_subset)).
            pub fn step_subset(&mut self, grads: &[(usize, candle_core::Tensor)]) -> Result<()> {
                self.driver.step_subset(grads)
            }
        }

        impl candle_nn::Optimizer for $alias {
            type Config = $config;

            /// Bare variables are named `param.0`, `param.1`, … in the order they
            /// were created (not the order given), which is also their order in
            /// the driver (`driver().params()`) and for `step_subset`'s indices.
            fn new(vars: Vec<candle_core::Var>, config: $config) -> candle_core::Result<Self> {
                Ok(Self::from_named(crate::params::name_vars(vars), config)?)
            }

            fn step(
                &mut self,
                grads: &candle_core::backprop::GradStore,
            ) -> candle_core::Result<()> {
                Ok(self.try_step(grads)?)
            }

            fn learning_rate(&self) -> f64 {
                self.driver.lr()
            }

            fn set_learning_rate(&mut self, lr: f64) {
                crate::optim::alias::set_lr(&mut self.driver, &mut self.config, lr)
            }
        }

        impl crate::checkpoint::OptimizerState for $alias {
            fn state_dict(&self) -> Result<std::collections::HashMap<String, candle_core::Tensor>> {
                crate::optim::alias::state_dict(&self.driver, &self.config)
            }

            fn load_state_dict(
                &mut self,
                state: &std::collections::HashMap<String, candle_core::Tensor>,
            ) -> Result<()> {
                crate::optim::alias::load_state_dict(&mut self.driver, &mut self.config, state)
            }
        }
    };
}
pub(crate) use alias;
