//! Dynamic loss scaling, for gradients computed in f16.
//!
//! f16 holds magnitudes down to 6·10⁻⁸ (5.96·10⁻⁸ the smallest subnormal,
//! 6.1·10⁻⁵ the smallest normal): the gradients of a model run in f16 often
//! fall below that and become 0 in the backward pass. Scaling the loss by
//! `S` scales every gradient of the backward pass by `S`; dividing them by
//! `S` afterwards (in f32, where they fit) gives the true gradients. `S` is
//! kept as large as the gradients allow: a step whose gradients overflow to
//! ±Inf or NaN is skipped and `S` halved, and after `growth_interval` steps
//! in a row without one, `S` doubles (Micikevicius et al., "Mixed Precision
//! Training", 2018; PyTorch's `torch.amp.GradScaler`).
//!
//! ```
//! # use candle_core::{DType, Device, Var};
//! # use steepest::{AdamW, AdamWConfig};
//! # use steepest::loss_scale::{LossScaler, LossScaleConfig, ScaledStep};
//! # fn main() -> steepest::Result<()> {
//! // an f16 model: one weight matrix
//! let varmap = candle_nn::VarMap::new();
//! let w = Var::ones((4, 3), DType::F16, &Device::Cpu)?;
//! varmap.data().lock().unwrap().insert("w".into(), w.clone());
//! let mut opt = AdamW::from_varmap(&varmap, AdamWConfig::default())?.with_master_weights();
//! let mut scaler = LossScaler::new(LossScaleConfig::default())?;
//! for _ in 0..3 {
//!     // the loss in f32 (see below)
//!     let loss = w.as_tensor().to_dtype(DType::F32)?.sqr()?.mean_all()?;
//!     let mut grads = scaler.scale_loss(&loss)?.backward()?;
//!     if let ScaledStep::Skipped { param } = scaler.step(&mut opt, &mut grads)? {
//!         eprintln!("overflow in {param}: loss scale now {}", scaler.scale());
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! The unscaled gradients are f32 (an f16 one would underflow again), so
//! f16 parameters must be stepped through f32 master weights
//! ([`Driver::with_master_weights`](crate::optim::Driver::with_master_weights)),
//! which take them as they are ([`LossScaler::step`] refuses f16
//! parameters without: the optimizer would round the gradients back to f16,
//! where a large one overflows at any scale). Compute the loss itself in
//! f32 (cast the logits): the backward pass of an f16 loss carries `S` in
//! f16, which overflows at `S ≥ 65520` whatever the loss. bf16 has f32's
//! range and needs no scaling.
//!
//! Each batch starts with [`scale_loss`](LossScaler::scale_loss): the
//! scaler then unscales each parameter's gradient exactly once before the
//! step, whether [`unscale`](LossScaler::unscale) ran first (to clip the
//! true gradients) or not. A skipped step is a refused step: a
//! [`Scheduled`](crate::schedule::Scheduled) optimizer's counter does not
//! advance, and an [`Accumulate`](crate::accumulate::Accumulate) drops that
//! micro-batch.

use std::collections::{HashMap, HashSet};

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, TensorId};
use serde::{Deserialize, Serialize};

use crate::checkpoint::{Header, OptimizerState, HEADER_KEY};
use crate::error::{fail, Error, Result};
use crate::optim::{HasParams, NamedVar, TryStep};

const KIND: &str = "loss_scale";

/// The scale never grows beyond 2⁶⁴ (an f32 gradient times that is still
/// finite below 1.8·10¹⁹, and no useful scale is larger).
const MAX_SCALE: f64 = 18446744073709551616.0;

/// Nor falls below 2⁻²⁴ (its inverse, by which the gradients are
/// multiplied in f32, stays far from f32's overflow).
const MIN_SCALE: f64 = 1.0 / 16777216.0;

/// How the loss scale starts and moves. Defaults are PyTorch's
/// `GradScaler`'s: `2¹⁶`, ×2 after 2000 good steps, ×½ on an overflow.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LossScaleConfig {
    /// The first scale `S`, in `[2⁻²⁴, 2⁶⁴]` (a power of two keeps the
    /// scaling and unscaling exact, as do power-of-two factors).
    pub init_scale: f64,
    /// `S ← S · growth_factor` after `growth_interval` good steps (> 1).
    pub growth_factor: f64,
    /// `S ← S · backoff_factor` on an overflow (in (0, 1)).
    pub backoff_factor: f64,
    /// Good steps in a row before the scale grows (≥ 1).
    pub growth_interval: u64,
}

impl Default for LossScaleConfig {
    fn default() -> Self {
        Self {
            init_scale: 65536.0,
            growth_factor: 2.0,
            backoff_factor: 0.5,
            growth_interval: 2000,
        }
    }
}

impl LossScaleConfig {
    /// Errors (naming the field) on a value out of range.
    pub fn validate(&self) -> Result<()> {
        let c = self;
        if !(MIN_SCALE..=MAX_SCALE).contains(&c.init_scale) {
            fail!(
                Config,
                "LossScaleConfig.init_scale",
                "must be in [2⁻²⁴, 2⁶⁴], got {}",
                c.init_scale
            );
        }
        if !(c.growth_factor.is_finite() && c.growth_factor > 1.0) {
            fail!(
                Config,
                "LossScaleConfig.growth_factor",
                "must be finite and > 1, got {}",
                c.growth_factor
            );
        }
        if !(c.backoff_factor > 0.0 && c.backoff_factor < 1.0) {
            fail!(
                Config,
                "LossScaleConfig.backoff_factor",
                "must be in (0, 1), got {}",
                c.backoff_factor
            );
        }
        if c.growth_interval == 0 {
            fail!(Config, "LossScaleConfig.growth_interval", "must be ≥ 1");
        }
        Ok(())
    }
}

/// What [`LossScaler::step`] did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScaledStep {
    /// The optimizer accepted the gradients (it stepped, or, for a wrapper
    /// such as [`Accumulate`](crate::accumulate::Accumulate), added them).
    Stepped,
    /// A gradient overflowed (±Inf or NaN, in parameter `param`): the
    /// optimizer refused the step, changing no parameter and no state, and
    /// the scale backed off. (The gradient store holds the unscaled
    /// gradients.)
    Skipped {
        /// The first parameter whose gradient was not finite.
        param: String,
    },
}

/// Dynamic loss scaling (module docs): [`scale_loss`](Self::scale_loss)
/// before `backward`, [`step`](Self::step) after.
#[derive(Clone, Debug)]
pub struct LossScaler {
    config: LossScaleConfig,
    scale: f64,
    /// Good steps since the scale last changed.
    good_steps: u64,
    /// Steps skipped for an overflow, in all.
    skipped: u64,
    /// The parameters (variable ids) whose gradient was unscaled since this
    /// batch's [`scale_loss`](Self::scale_loss) and not yet stepped.
    unscaled: HashSet<TensorId>,
}

/// The checkpoint header's body: everything a scaler holds.
#[derive(Debug, Serialize, Deserialize)]
struct Body {
    config: LossScaleConfig,
    scale: f64,
    good_steps: u64,
    skipped: u64,
}

impl LossScaler {
    /// A scaler at `config.init_scale`; errors on a bad config.
    pub fn new(config: LossScaleConfig) -> Result<Self> {
        config.validate()?;
        Ok(Self {
            scale: config.init_scale,
            config,
            good_steps: 0,
            skipped: 0,
            unscaled: HashSet::new(),
        })
    }

    /// The current scale `S`.
    pub fn scale(&self) -> f64 {
        self.scale
    }

    /// Steps skipped for an overflow so far.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// The config.
    pub fn config(&self) -> &LossScaleConfig {
        &self.config
    }

    /// `S · loss`, computed in f32 (f64 for an f64 loss); its backward pass
    /// carries the scaled gradients, in the model's dtypes. Starts a batch:
    /// every gradient [`step`](Self::step) sees next is unscaled once.
    pub fn scale_loss(&mut self, loss: &Tensor) -> Result<Tensor> {
        if !loss.dtype().is_float() {
            fail!(
                Shape,
                "LossScaler::scale_loss",
                "the loss is {:?}: a float tensor expected",
                loss.dtype()
            );
        }
        let loss = match loss.dtype() {
            DType::F16 | DType::BF16 => loss.to_dtype(DType::F32)?,
            _ => loss.clone(),
        };
        self.unscaled.clear();
        Ok(loss.affine(self.scale, 0.0)?)
    }

    /// Replaces the gradient of each of `params` in `grads` by the gradient
    /// divided by `S`, in f32 (f64 for an f64 gradient): the true
    /// gradients, for clipping or inspection before [`step`](Self::step).
    /// A parameter already unscaled in this batch is left as it is (so
    /// clipping between `unscale` and `step` is kept, and nothing is
    /// divided twice). On error the store is as it was.
    pub fn unscale(&mut self, grads: &mut GradStore, params: &[NamedVar]) -> Result<()> {
        let inv = 1.0 / self.scale;
        let mut unscaled = Vec::new();
        for nv in params {
            if self.unscaled.contains(&nv.var.id()) {
                continue;
            }
            if let Some(g) = grads.get(&nv.var) {
                let wide = match g.dtype() {
                    DType::F64 => g.clone(),
                    _ => g.to_dtype(DType::F32)?,
                };
                unscaled.push((nv, wide.affine(inv, 0.0)?));
            }
        }
        for (nv, g) in unscaled {
            grads.insert(&nv.var, g);
            self.unscaled.insert(nv.var.id());
        }
        Ok(())
    }

    /// Unscales the gradients of `opt`'s parameters in `grads` (those not
    /// unscaled yet in this batch) and steps `opt`. A step the optimizer
    /// refuses for a non-finite gradient ([`Error::NonFiniteGradient`],
    /// after which nothing changed) is an overflow: the scale backs off and
    /// `Skipped` is returned. After `growth_interval` steps in a row that
    /// ran, the scale grows. Any other error is returned as it is, the
    /// scale unchanged; the store then holds the unscaled gradients, which a
    /// second `step` with it takes as they are.
    ///
    /// Clipping with [`clip_grad_norm_named`](crate::clip::clip_grad_norm_named)
    /// between [`unscale`](Self::unscale) and `step` returns
    /// `NonFiniteGradient` on an overflow: call `step` anyway, which then
    /// skips and backs off.
    ///
    /// Errors (changing nothing) if `opt` has an f16 parameter and keeps no
    /// master weights. A [`DataParallel`](crate::distributed::DataParallel)
    /// refuses a step on every rank when any rank's gradient is not finite,
    /// so its ranks skip alike and keep one scale (the unscaling itself is
    /// local: a device error there returns on that rank alone).
    pub fn step<O: TryStep + HasParams>(
        &mut self,
        opt: &mut O,
        grads: &mut GradStore,
    ) -> Result<ScaledStep> {
        if !opt.keeps_master_weights() {
            if let Some(p) = opt.params().iter().find(|p| p.var.dtype() == DType::F16) {
                fail!(
                    Config,
                    p.name,
                    "an f16 parameter of an optimizer without master weights: the unscaled \
                     gradients would be rounded back to f16 (build it with \
                     with_master_weights())"
                );
            }
        }
        self.unscale(grads, opt.params())?;
        match opt.try_step(grads) {
            Ok(()) => {
                self.unscaled.clear();
                self.good_steps += 1;
                if self.good_steps >= self.config.growth_interval {
                    self.scale = (self.scale * self.config.growth_factor).min(MAX_SCALE);
                    self.good_steps = 0;
                }
                Ok(ScaledStep::Stepped)
            }
            Err(Error::NonFiniteGradient { param }) => {
                self.unscaled.clear();
                self.scale = (self.scale * self.config.backoff_factor).max(MIN_SCALE);
                self.good_steps = 0;
                self.skipped += 1;
                Ok(ScaledStep::Skipped { param })
            }
            Err(e) => Err(e),
        }
    }
}

impl OptimizerState for LossScaler {
    /// Only the header: the config, the scale and the counters.
    fn state_dict(&self) -> Result<HashMap<String, Tensor>> {
        let body = Body {
            config: self.config.clone(),
            scale: self.scale,
            good_steps: self.good_steps,
            skipped: self.skipped,
        };
        let header = Header::new(
            KIND,
            Vec::new(),
            serde_json::to_value(&body).expect("the header body encodes"),
        );
        Ok(HashMap::from([(
            HEADER_KEY.to_string(),
            header.to_tensor()?,
        )]))
    }

    /// Validates the header (kind, config, a scale in range, a count below
    /// the interval) before changing anything; restores config, scale and
    /// counters (not which gradients of the current batch were unscaled).
    fn load_state_dict(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let header = Header::read(state, KIND)?;
        if let Some(key) = state.keys().find(|k| *k != HEADER_KEY) {
            fail!(Checkpoint, key, "a loss scaler's state holds no tensor");
        }
        let body: Body = serde_json::from_value(header.body.clone())
            .map_err(|e| Error::checkpoint(HEADER_KEY, format!("not a loss scaler header: {e}")))?;
        body.config
            .validate()
            .map_err(|e| Error::checkpoint("checkpoint: config", e.to_string()))?;
        if !(MIN_SCALE..=MAX_SCALE).contains(&body.scale) {
            fail!(
                Checkpoint,
                "checkpoint: scale",
                "must be in [2⁻²⁴, 2⁶⁴], got {}",
                body.scale
            );
        }
        if body.good_steps >= body.config.growth_interval {
            fail!(
                Checkpoint,
                "checkpoint: good_steps",
                "{} good steps, but the scale grows after {}",
                body.good_steps,
                body.config.growth_interval
            );
        }
        self.config = body.config;
        self.scale = body.scale;
        self.good_steps = body.good_steps;
        self.skipped = body.skipped;
        Ok(())
    }
}
