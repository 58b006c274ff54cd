//! Learning-rate schedules (docs/math.md §5) and a driver that applies one to any
//! [`candle_nn::Optimizer`] through `set_learning_rate`.
//!
//! A [`Schedule`] maps the step index `s = 0, 1, 2, …` (the number of optimizer
//! steps already taken) to a learning rate `η(s)`. Schedules compose: a linear
//! warmup can precede any schedule ([`Schedule::with_warmup`]).
//!
//! | constructor | `η(s)` |
//! |---|---|
//! | [`Schedule::constant`] | `η` |
//! | [`Schedule::linear_warmup`] | `η·(s+1)/W` for `s < W`, then `η` |
//! | [`Schedule::cosine`] | `η_min + (η − η_min)(1 + cos(π·min(s, S)/S))/2` |
//! | [`Schedule::wsd`] | `η` for `s < S`, then `η_min + (η − η_min)·f((s−S)/D)` for `S ≤ s < S+D`, then `η_min` |
//! | [`Schedule::inverse_sqrt`] | `α/√(s+1)` (docs/math.md §5's `η_t = α/√t` with `t = s+1`) |
//! | [`Schedule::last_iterate_optimal`] | `R / (G·√(T(2 + ln T)))` (docs/math.md §5) |
//!
//! with the WSD decay shapes `f` of [`DecayShape`].

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor};
use candle_nn::Optimizer;

use crate::checkpoint::OptimizerState;

use crate::error::{fail, Result};

/// The shape `f: [0, 1] → [0, 1]` of a WSD decay phase, `f(0) = 1`, `f(1) = 0`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecayShape {
    /// `f(x) = 1 − x`.
    Linear,
    /// `f(x) = (1 + cos πx)/2`.
    Cosine,
    /// `f(x) = 1 − √x`.
    OneMinusSqrt,
}

impl DecayShape {
    /// `f(x)` for `x` clamped to `[0, 1]`.
    pub fn factor(&self, x: f64) -> f64 {
        let x = x.clamp(0.0, 1.0);
        match self {
            Self::Linear => 1.0 - x,
            Self::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * x).cos()),
            Self::OneMinusSqrt => 1.0 - x.sqrt(),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Kind {
    Constant(f64),
    Cosine {
        peak: f64,
        min: f64,
        steps: usize,
    },
    Wsd {
        peak: f64,
        min: f64,
        stable: usize,
        decay: usize,
        shape: DecayShape,
    },
    InverseSqrt(f64),
    Warmup {
        steps: usize,
        then: Box<Kind>,
    },
}

impl Kind {
    fn lr(&self, s: usize) -> f64 {
        match self {
            Self::Constant(lr) => *lr,
            Self::Cosine { peak, min, steps } => {
                let x = s.min(*steps) as f64 / *steps as f64;
                min + (peak - min) * DecayShape::Cosine.factor(x)
            }
            Self::Wsd {
                peak,
                min,
                stable,
                decay,
                shape,
            } => {
                if s < *stable {
                    *peak
                } else if s - stable < *decay {
                    // (not `s < stable + decay`, which overflows near usize::MAX)
                    min + (peak - min) * shape.factor((s - stable) as f64 / *decay as f64)
                } else {
                    *min
                }
            }
            Self::InverseSqrt(alpha) => alpha / (s as f64 + 1.0).sqrt(),
            Self::Warmup { steps, then } => {
                if s < *steps {
                    then.lr(0) * (s + 1) as f64 / *steps as f64
                } else {
                    then.lr(s - steps)
                }
            }
        }
    }
}

/// A learning-rate schedule `s ↦ η(s)` over steps `s = 0, 1, …`; see the
/// [module docs](self) for the formulas. Constructors validate their
/// arguments (finite, `≥ 0` rates, positive lengths) and name the bad one.
#[derive(Clone, Debug, PartialEq)]
pub struct Schedule(Kind);

/// A decay goes down: `min ≤ peak` (a larger `min` would make the
/// "decay" an increase, which no caller means; a warmup is
/// [`Schedule::with_warmup`]).
fn check_decay(who: &str, peak: f64, min: f64) -> Result<()> {
    if min > peak {
        fail!(
            Config,
            format!("{who}: min"),
            "min = {min} is above peak = {peak}: the schedule would increase (put a warmup \
             in front with Schedule::with_warmup instead)"
        );
    }
    Ok(())
}

fn check_rate(who: &str, x: f64) -> Result<()> {
    if !(x.is_finite() && x >= 0.0) {
        fail!(Config, who, "must be finite and ≥ 0, got {x}");
    }
    Ok(())
}

fn check_len(who: &str, n: usize) -> Result<()> {
    if n == 0 {
        fail!(Config, who, "must be ≥ 1 step");
    }
    Ok(())
}

impl Schedule {
    /// `η(s) = lr`.
    pub fn constant(lr: f64) -> Result<Self> {
        check_rate("Schedule::constant: lr", lr)?;
        Ok(Self(Kind::Constant(lr)))
    }

    /// `η(s) = lr·(s+1)/warmup` for `s < warmup`, then `lr`.
    pub fn linear_warmup(lr: f64, warmup: usize) -> Result<Self> {
        Self::constant(lr)?.with_warmup(warmup)
    }

    /// Cosine decay from `peak` to `min` over `steps` steps, then `min`:
    /// `η(s) = min + (peak − min)(1 + cos(π·min(s, steps)/steps))/2`.
    pub fn cosine(peak: f64, min: f64, steps: usize) -> Result<Self> {
        check_rate("Schedule::cosine: peak", peak)?;
        check_rate("Schedule::cosine: min", min)?;
        check_decay("Schedule::cosine", peak, min)?;
        check_len("Schedule::cosine: steps", steps)?;
        Ok(Self(Kind::Cosine { peak, min, steps }))
    }

    /// Warmup–stable–decay: `peak` for `s < stable`, then
    /// `min + (peak − min)·f((s − stable)/decay)` for `decay` steps, then `min`.
    /// Put a warmup in front with [`Schedule::with_warmup`].
    pub fn wsd(
        peak: f64,
        min: f64,
        stable: usize,
        decay: usize,
        shape: DecayShape,
    ) -> Result<Self> {
        check_rate("Schedule::wsd: peak", peak)?;
        check_rate("Schedule::wsd: min", min)?;
        check_decay("Schedule::wsd", peak, min)?;
        check_len("Schedule::wsd: decay", decay)?;
        Ok(Self(Kind::Wsd {
            peak,
            min,
            stable,
            decay,
            shape,
        }))
    }

    /// `η(s) = α/√(s+1)`.
    pub fn inverse_sqrt(alpha: f64) -> Result<Self> {
        check_rate("Schedule::inverse_sqrt: alpha", alpha)?;
        Ok(Self(Kind::InverseSqrt(alpha)))
    }

    /// The constant rate minimising docs/math.md §5's constant-rate last-iterate bound
    /// `R²/(2Tη) + (G²η/2)(2 + ln T)`: `η = R / (G·√(T(2 + ln T)))`
    /// (see [`crate::theory::optimal_constant_lr`]).
    pub fn last_iterate_optimal(r: f64, g: f64, total_steps: usize) -> Result<Self> {
        let lr = crate::theory::optimal_constant_lr(r, g, total_steps)
            .map_err(|e| e.about("Schedule::last_iterate_optimal"))?;
        Self::constant(lr)
    }

    /// Linear warmup over `warmup` steps to this schedule's first rate, then
    /// this schedule shifted by `warmup`: `η'(s) = η(0)·(s+1)/warmup` for
    /// `s < warmup`, `η'(s) = η(s − warmup)` after. `warmup = 0` returns
    /// the schedule unchanged.
    pub fn with_warmup(self, warmup: usize) -> Result<Self> {
        if warmup == 0 {
            return Ok(self);
        }
        Ok(Self(Kind::Warmup {
            steps: warmup,
            then: Box::new(self.0),
        }))
    }

    /// The learning rate at step `s` (0-based).
    pub fn lr(&self, s: usize) -> f64 {
        self.0.lr(s)
    }

    /// The rates of steps `0..n`.
    pub fn rates(&self, n: usize) -> Vec<f64> {
        (0..n).map(|s| self.lr(s)).collect()
    }
}

/// Drives a [`candle_nn::Optimizer`] with a [`Schedule`]: before step `s` it
/// calls `set_learning_rate(schedule.lr(s))`. A step that fails changes
/// nothing: the step counter does not advance and the optimizer's learning
/// rate is put back.
///
/// The schedule owns the rate: one set by hand on the inner optimizer
/// (`inner_mut().set_learning_rate`) is overwritten at the next step. To
/// change the course, build a new `Scheduled` with another [`Schedule`] and
/// [`set_step`](Self::set_step). For the same reason `Scheduled` is not a
/// `candle_nn::Optimizer` (whose `set_learning_rate` it would have to
/// ignore): code generic over optimizers can take `impl TryStep +
/// OptimizerState`, which the crate's optimizers and `Scheduled` around one
/// all implement.
#[derive(Debug)]
pub struct Scheduled<O: Optimizer> {
    opt: O,
    schedule: Schedule,
    step: usize,
}

impl<O: Optimizer> Scheduled<O> {
    /// Wraps `opt`; the next step is step 0.
    pub fn new(opt: O, schedule: Schedule) -> Self {
        Self {
            opt,
            schedule,
            step: 0,
        }
    }

    /// Sets the learning rate for the current step and steps the optimizer.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        let before = self.opt.learning_rate();
        self.opt.set_learning_rate(self.schedule.lr(self.step));
        if let Err(e) = self.opt.step(grads) {
            self.opt.set_learning_rate(before);
            return Err(e.into());
        }
        self.step += 1;
        Ok(())
    }

    /// `loss.backward()` then [`Scheduled::step`].
    pub fn backward_step(&mut self, loss: &Tensor) -> Result<()> {
        let grads = loss.backward()?;
        self.step(&grads)
    }

    /// The number of steps taken (the index of the next step).
    pub fn current_step(&self) -> usize {
        self.step
    }

    /// Sets the step counter (e.g. when resuming from a checkpoint).
    pub fn set_step(&mut self, step: usize) {
        self.step = step;
    }

    /// The learning rate the next step will use.
    pub fn next_lr(&self) -> f64 {
        self.schedule.lr(self.step)
    }

    /// The schedule.
    pub fn schedule(&self) -> &Schedule {
        &self.schedule
    }

    /// The wrapped optimizer.
    pub fn inner(&self) -> &O {
        &self.opt
    }

    /// The wrapped optimizer, mutably (e.g. to load its state).
    pub fn inner_mut(&mut self) -> &mut O {
        &mut self.opt
    }

    /// Unwraps the optimizer.
    pub fn into_inner(self) -> O {
        self.opt
    }
}

/// The checkpoint key of [`Scheduled`]'s step counter (an `i64` scalar).
pub const SCHEDULE_STEP_KEY: &str = "__schedule__.step";

impl<O: Optimizer + crate::optim::TryStep> Scheduled<O> {
    /// [`Scheduled::step`] keeping the crate's typed error (e.g.
    /// [`Error::NonFiniteGradient`](crate::Error::NonFiniteGradient)); a
    /// refused step changes nothing, as there.
    pub fn try_step(&mut self, grads: &GradStore) -> Result<()> {
        let before = self.opt.learning_rate();
        self.opt.set_learning_rate(self.schedule.lr(self.step));
        if let Err(e) = self.opt.try_step(grads) {
            self.opt.set_learning_rate(before);
            return Err(e);
        }
        self.step += 1;
        Ok(())
    }
}

impl<O: Optimizer + crate::optim::HasParams> crate::optim::HasParams for Scheduled<O> {
    fn params(&self) -> &[crate::optim::NamedVar] {
        self.opt.params()
    }
    fn keeps_master_weights(&self) -> bool {
        self.opt.keeps_master_weights()
    }
    fn steps_collectively(&self) -> bool {
        self.opt.steps_collectively()
    }
}

impl<O: Optimizer + crate::optim::TryStep> crate::optim::TryStep for Scheduled<O> {
    fn try_step(&mut self, grads: &GradStore) -> Result<()> {
        Scheduled::try_step(self, grads)
    }
}

/// A scheduled optimizer's checkpoint is the wrapped optimizer's plus the
/// step counter ([`SCHEDULE_STEP_KEY`]), so a resumed run continues the
/// schedule where it stopped. The [`Schedule`] itself is not saved (it is
/// code, like the model): the resumed run follows the one this `Scheduled`
/// was built with, from the saved step, so build it as before to continue
/// the same course (or with another to change it, as
/// [`set_step`](Scheduled::set_step) allows).
///
/// The two kinds do not mix: a plain optimizer's checkpoint (no counter) is
/// refused here, and a `Scheduled` one is refused by the plain optimizer (the
/// counter is not one of its keys). Either refusal changes nothing. To resume a
/// schedule from a plain checkpoint, load it through
/// [`Scheduled::inner_mut`] and set the step with [`Scheduled::set_step`];
/// to load a `Scheduled` checkpoint into the plain optimizer, remove
/// [`SCHEDULE_STEP_KEY`] from the state first.
impl<O: Optimizer + OptimizerState> OptimizerState for Scheduled<O> {
    fn state_dict(&self) -> Result<HashMap<String, Tensor>> {
        let mut state = self.opt.state_dict()?;
        let step = Tensor::new(self.step as i64, &Device::Cpu)?;
        state.insert(SCHEDULE_STEP_KEY.to_string(), step);
        Ok(state)
    }

    fn load_state_dict(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let Some(step) = state.get(SCHEDULE_STEP_KEY) else {
            fail!(
                Checkpoint,
                "checkpoint",
                "no `{SCHEDULE_STEP_KEY}` entry, so it was not saved by a `Scheduled` optimizer \
                 (that key is the schedule's step; a plain optimizer's checkpoint has none). \
                 To resume a schedule from a plain optimizer's checkpoint, load it with \
                 `scheduled.inner_mut().load_state(..)` (or `load_state_dict`) and set the \
                 schedule's step with `scheduled.set_step(..)`"
            );
        };
        let step = match step.to_scalar::<i64>() {
            Ok(s) if s >= 0 => s as usize,
            _ => fail!(
                Checkpoint,
                SCHEDULE_STEP_KEY,
                "must be a non-negative i64 scalar, got {step:?}"
            ),
        };
        let mut inner = state.clone();
        inner.remove(SCHEDULE_STEP_KEY);
        // The inner optimizer validates everything before it changes anything;
        // the counter is set only after it succeeded.
        self.opt.load_state_dict(&inner)?;
        self.step = step;
        Ok(())
    }
}
