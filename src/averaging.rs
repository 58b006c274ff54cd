//! Iterate averaging: EMA, Polyak (uniform running) average and WSM
//! checkpoint merging, with averaged weights that can be swapped in for
//! evaluation and back, and state that saves with [`OptimizerState`].
//!
//! Call [`WeightAverage::update`] after every optimizer step. With `θ_n` the
//! parameters at the `n`-th update:
//!
//! - EMA (decay `β`): `θ̄_1 = θ_1`, `θ̄_n = β·θ̄_{n−1} + (1−β)·θ_n`.
//! - Polyak: `θ̄_n = θ̄_{n−1} + (θ_n − θ̄_{n−1})/n = (1/n) Σ_{i≤n} θ_i`
//!   (SPEC §5: the averaged iterate enjoys the averaged-loss bound).
//! - WSM (Warmup–Stable–Merge, arXiv 2507.17634): every `interval` updates a
//!   checkpoint is kept, the last `k+1` of them `θ^{(0)}, …, θ^{(k)}` (oldest
//!   first), and the merged model is `Σ_i c_i θ^{(i)}` with the weights of
//!   [`wsm_weights`].
//!
//! ## Why WSM's weights emulate a decay
//!
//! Between checkpoints a constant-rate run moves `θ^{(i+1)} = θ^{(i)} − η·Δ_i`
//! (`Δ_i` the sum of the `interval` gradients). Then
//! `Σ_i c_i θ^{(i)} = θ^{(0)} − η Σ_{j<k} (Σ_{i>j} c_i)·Δ_j`, which is the
//! iterate of a run from `θ^{(0)}` whose rate in interval `j` is `η·w_j` with
//! `w_j = Σ_{i>j} c_i`. Solving for `c` with `Σ c_i = 1`:
//! `c_0 = 1 − w_0`, `c_i = w_{i−1} − w_i` (`0 < i < k`), `c_k = w_{k−1}`:
//! the merge weights are the decay schedule's successive decrements. The
//! identity is exact when the gradients do not depend on `θ` (a linear loss);
//! otherwise it holds to first order.

use std::collections::{HashMap, VecDeque};

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarMap;

use crate::error::{fail, invalid};
use crate::optim::params::{check_unique, math_dtype, varmap_vars};
use crate::optim::state::{export, import, key, scalar, OptimizerState, Slots};
use crate::optim::NamedVar;
use crate::schedule::DecayShape;

/// WSM merge weights `c_0, …, c_k` (oldest checkpoint first) that emulate the
/// per-interval decay factors `w_0 ≥ w_1 ≥ … ≥ w_{k−1}` (each in `[0, 1]`,
/// the rate of interval `j` relative to the constant rate):
/// `c_0 = 1 − w_0`, `c_i = w_{i−1} − w_i` for `0 < i < k`, `c_k = w_{k−1}`.
/// They are `≥ 0` and sum to 1. Errors on an empty, out-of-range or
/// increasing `decay_factors`.
pub fn wsm_weights(decay_factors: &[f64]) -> Result<Vec<f64>> {
    let k = decay_factors.len();
    if k == 0 {
        fail!(
            "wsm_weights: decay_factors",
            "is empty (need k ≥ 1 factors)"
        );
    }
    for (j, &w) in decay_factors.iter().enumerate() {
        if !(0.0..=1.0).contains(&w) {
            fail!("wsm_weights: decay_factors", "[{j}] = {w} is not in [0, 1]");
        }
        if j > 0 && w > decay_factors[j - 1] {
            fail!(
                "wsm_weights: decay_factors",
                "must be non-increasing, but [{j}] = {w} > [{}] = {}",
                j - 1,
                decay_factors[j - 1]
            );
        }
    }
    let mut c = Vec::with_capacity(k + 1);
    c.push(1.0 - decay_factors[0]);
    for j in 1..k {
        c.push(decay_factors[j - 1] - decay_factors[j]);
    }
    c.push(decay_factors[k - 1]);
    Ok(c)
}

/// [`wsm_weights`] for the decay phase of a WSD schedule of the given shape
/// spread over `k` checkpoint intervals: `w_j = f(j/k)`, `j = 0..k`
/// ([`DecayShape::factor`]). For [`DecayShape::Linear`] this is the uniform
/// average of the last `k` checkpoints.
pub fn wsm_weights_for_shape(shape: DecayShape, k: usize) -> Result<Vec<f64>> {
    if k == 0 {
        fail!("wsm_weights_for_shape: k", "must be ≥ 1");
    }
    let w: Vec<f64> = (0..k).map(|j| shape.factor(j as f64 / k as f64)).collect();
    wsm_weights(&w)
}

/// Which average [`WeightAverage`] keeps.
#[derive(Clone, Debug, PartialEq)]
pub enum AverageKind {
    /// Exponential moving average with decay `β ∈ [0, 1)`.
    Ema {
        /// The decay `β`.
        decay: f64,
    },
    /// Uniform running (Polyak–Ruppert) average of every update.
    Polyak,
    /// WSM: merge the last `weights.len()` checkpoints, taken every
    /// `interval` updates, with `weights` (oldest first; see [`wsm_weights`]).
    Wsm {
        /// Merge weights, oldest checkpoint first; `≥ 0`, sum 1.
        weights: Vec<f64>,
        /// Updates between checkpoints (≥ 1).
        interval: usize,
    },
}

impl AverageKind {
    fn validate(&self) -> Result<()> {
        match self {
            Self::Ema { decay } => {
                if !(0.0..1.0).contains(decay) {
                    fail!("AverageKind::Ema.decay", "must be in [0, 1), got {decay}");
                }
            }
            Self::Polyak => {}
            Self::Wsm { weights, interval } => {
                if *interval == 0 {
                    fail!("AverageKind::Wsm.interval", "must be ≥ 1");
                }
                if weights.is_empty() {
                    fail!("AverageKind::Wsm.weights", "is empty");
                }
                if let Some(w) = weights.iter().find(|w| !(w.is_finite() && **w >= 0.0)) {
                    fail!(
                        "AverageKind::Wsm.weights",
                        "must be finite and ≥ 0, got {w}"
                    );
                }
                let s: f64 = weights.iter().sum();
                if (s - 1.0).abs() > 1e-9 {
                    fail!("AverageKind::Wsm.weights", "must sum to 1, sum to {s}");
                }
            }
        }
        Ok(())
    }

    fn tag(&self) -> &'static str {
        match self {
            Self::Ema { .. } => "average_ema",
            Self::Polyak => "average_polyak",
            Self::Wsm { .. } => "average_wsm",
        }
    }
}

const AVG: &str = "avg";

/// An average of a model's parameters over training (see the [module
/// docs](self) for the formulas). Averages and checkpoints are kept in f32
/// (f64 for f64 parameters), detached, on the parameters' devices.
#[derive(Debug)]
pub struct WeightAverage {
    vars: Vec<NamedVar>,
    kind: AverageKind,
    /// Number of updates seen.
    count: u64,
    /// EMA / Polyak: the average, one per parameter.
    avg: Vec<Tensor>,
    /// WSM: the kept checkpoints, oldest first.
    ckpts: VecDeque<Vec<Tensor>>,
    /// The training weights while the average is swapped in.
    stash: Option<Vec<Tensor>>,
}

impl WeightAverage {
    /// An average over the float variables of `varmap`, keeping their names.
    pub fn from_varmap(varmap: &VarMap, kind: AverageKind) -> Result<Self> {
        Self::from_named(varmap_vars(varmap), kind)
    }

    /// An average over explicitly named variables.
    pub fn from_named(vars: Vec<NamedVar>, kind: AverageKind) -> Result<Self> {
        kind.validate()?;
        check_unique(&vars)?;
        Ok(Self {
            vars,
            kind,
            count: 0,
            avg: Vec::new(),
            ckpts: VecDeque::new(),
            stash: None,
        })
    }

    /// The kind of average.
    pub fn kind(&self) -> &AverageKind {
        &self.kind
    }

    /// The number of updates seen.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Whether the average is currently swapped into the model.
    pub fn is_swapped_in(&self) -> bool {
        self.stash.is_some()
    }

    /// The number of WSM checkpoints held (0 for EMA / Polyak).
    pub fn checkpoints(&self) -> usize {
        self.ckpts.len()
    }

    fn current(&self) -> Result<Vec<Tensor>> {
        self.vars
            .iter()
            .map(|nv| {
                // A copy: `to_dtype` to the same dtype shares the variable's
                // storage, which the next optimizer step overwrites in place.
                nv.var
                    .as_tensor()
                    .detach()
                    .to_dtype(math_dtype(nv.var.dtype()))?
                    .copy()
            })
            .collect()
    }

    /// Folds the current parameters into the average (call after each
    /// optimizer step). Errors while the average is swapped in.
    pub fn update(&mut self) -> Result<()> {
        if self.stash.is_some() {
            fail!(
                "WeightAverage::update",
                "the average is swapped in; call swap_out() before updating"
            );
        }
        let cur = self.current()?;
        let n = self.count + 1;
        match &self.kind {
            AverageKind::Ema { decay } => {
                self.avg = if self.avg.is_empty() {
                    cur
                } else {
                    self.avg
                        .iter()
                        .zip(&cur)
                        .map(|(a, x)| a.affine(*decay, 0.0)? + x.affine(1.0 - decay, 0.0)?)
                        .collect::<Result<_>>()?
                };
            }
            AverageKind::Polyak => {
                self.avg = if self.avg.is_empty() {
                    cur
                } else {
                    self.avg
                        .iter()
                        .zip(&cur)
                        .map(|(a, x)| a + (x - a)?.affine(1.0 / n as f64, 0.0)?)
                        .collect::<Result<_>>()?
                };
            }
            AverageKind::Wsm { weights, interval } => {
                if n % *interval as u64 == 0 {
                    self.ckpts.push_back(cur);
                    while self.ckpts.len() > weights.len() {
                        self.ckpts.pop_front();
                    }
                }
            }
        }
        self.count = n;
        Ok(())
    }

    /// The averaged parameters, by name (math dtype). Errors before the first
    /// update, and for WSM until all `weights.len()` checkpoints are held.
    pub fn averaged(&self) -> Result<Vec<(String, Tensor)>> {
        let values: Vec<Tensor> = match &self.kind {
            AverageKind::Ema { .. } | AverageKind::Polyak => {
                if self.avg.is_empty() {
                    fail!(
                        "WeightAverage::averaged",
                        "no update yet: nothing to average"
                    );
                }
                self.avg.clone()
            }
            AverageKind::Wsm { weights, .. } => {
                if self.ckpts.len() < weights.len() {
                    fail!(
                        "WeightAverage::averaged",
                        "WSM holds {} of the {} checkpoints it merges",
                        self.ckpts.len(),
                        weights.len()
                    );
                }
                (0..self.vars.len())
                    .map(|p| {
                        let mut acc = self.ckpts[0][p].affine(weights[0], 0.0)?;
                        for (c, ck) in weights.iter().zip(&self.ckpts).skip(1) {
                            acc = (acc + ck[p].affine(*c, 0.0)?)?;
                        }
                        Ok(acc)
                    })
                    .collect::<Result<_>>()?
            }
        };
        Ok(self
            .vars
            .iter()
            .map(|nv| nv.name.clone())
            .zip(values)
            .collect())
    }

    /// Replaces the model's parameters by the average (keeping the training
    /// weights aside). Errors, changing nothing, if already swapped in or if
    /// there is no average yet.
    pub fn swap_in(&mut self) -> Result<()> {
        if self.stash.is_some() {
            fail!(
                "WeightAverage::swap_in",
                "the average is already swapped in"
            );
        }
        let avg = self.averaged()?;
        let stash: Vec<Tensor> = self
            .vars
            .iter()
            .map(|nv| nv.var.as_tensor().detach().copy())
            .collect::<Result<_>>()?;
        let ready: Vec<Tensor> = self
            .vars
            .iter()
            .zip(&avg)
            .map(|(nv, (_, a))| a.to_dtype(nv.var.dtype()))
            .collect::<Result<_>>()?;
        for (nv, a) in self.vars.iter().zip(&ready) {
            nv.var.set(a)?;
        }
        self.stash = Some(stash);
        Ok(())
    }

    /// Puts the training weights back after [`WeightAverage::swap_in`].
    /// Errors if the average is not swapped in.
    pub fn swap_out(&mut self) -> Result<()> {
        let Some(stash) = self.stash.take() else {
            fail!("WeightAverage::swap_out", "the average is not swapped in");
        };
        for (nv, t) in self.vars.iter().zip(&stash) {
            nv.var.set(t)?;
        }
        Ok(())
    }

    fn hparams(&self) -> Result<Vec<(String, Tensor)>> {
        let mut h = vec![("count".to_string(), scalar(self.count as f64)?)];
        match &self.kind {
            AverageKind::Ema { decay } => h.push(("decay".into(), scalar(*decay)?)),
            AverageKind::Polyak => {}
            AverageKind::Wsm { weights, interval } => {
                h.push((
                    "weights".into(),
                    Tensor::new(weights.as_slice(), &Device::Cpu)?,
                ));
                h.push(("interval".into(), scalar(*interval as f64)?));
                h.push(("held".into(), scalar(self.ckpts.len() as f64)?));
            }
        }
        Ok(h)
    }
}

fn ckpt_slot(i: usize) -> String {
    format!("ckpt{i}")
}

impl OptimizerState for WeightAverage {
    /// Keys: `"<param>.avg"` (EMA / Polyak) or `"<param>.ckpt<i>"` (WSM,
    /// oldest first), plus the kind, count and hyperparameters.
    fn state_dict(&self) -> Result<HashMap<String, Tensor>> {
        let mut slots = Slots::new();
        for (p, nv) in self.vars.iter().enumerate() {
            if let Some(a) = self.avg.get(p) {
                slots.insert(key(&nv.name, AVG), a.clone());
            }
            for (i, ck) in self.ckpts.iter().enumerate() {
                slots.insert(key(&nv.name, &ckpt_slot(i)), ck[p].clone());
            }
        }
        export(self.kind.tag(), self.hparams()?, &self.vars, &slots)
    }

    /// Validates everything (kind, parameter names, shapes, dtypes, counts)
    /// before changing anything; the hyperparameters (EMA decay, WSM weights
    /// and interval) are restored from the checkpoint. Errors while the
    /// average is swapped in.
    fn load_state_dict(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        if self.stash.is_some() {
            fail!(
                "WeightAverage::load_state_dict",
                "the average is swapped in; call swap_out() first"
            );
        }
        let n_ckpt = match &self.kind {
            AverageKind::Wsm { weights, .. } => weights.len().max(
                state
                    .get("__steepest__.average_wsm.weights")
                    .map(|t| t.elem_count())
                    .unwrap_or(0),
            ),
            _ => 0,
        };
        let ckpt_names: Vec<String> = (0..n_ckpt).map(ckpt_slot).collect();
        let mut slot_names: Vec<&str> = vec![AVG];
        slot_names.extend(ckpt_names.iter().map(|s| s.as_str()));
        let vars = &self.vars;
        let is_wsm = matches!(self.kind, AverageKind::Wsm { .. });
        let spec = |i: usize, slot: &str| {
            let ok = if is_wsm { slot != AVG } else { slot == AVG };
            ok.then(|| {
                let v = &vars[i].var;
                (v.dims().to_vec(), math_dtype(v.dtype()))
            })
        };
        let imp = import(self.kind.tag(), vars, &slot_names, &spec, state)?;
        let count = imp.f64("count")?;
        if !(count >= 0.0 && count.fract() == 0.0) {
            fail!(
                "checkpoint: count",
                "must be a whole number ≥ 0, got {count}"
            );
        }
        let count = count as u64;
        let kind = match &self.kind {
            AverageKind::Ema { .. } => AverageKind::Ema {
                decay: imp.f64("decay")?,
            },
            AverageKind::Polyak => AverageKind::Polyak,
            AverageKind::Wsm { .. } => AverageKind::Wsm {
                weights: imp
                    .tensor("weights")?
                    .to_dtype(DType::F64)?
                    .flatten_all()?
                    .to_vec1::<f64>()?,
                interval: imp.f64("interval")? as usize,
            },
        };
        kind.validate()
            .map_err(|e| invalid("checkpoint", format!("bad hyperparameters: {e}")))?;
        let get = |name: &str, slot: &str| -> Result<Tensor> {
            imp.slots
                .get(&key(name, slot))
                .cloned()
                .ok_or_else(|| invalid("checkpoint", format!("missing `{}`", key(name, slot))))
        };
        let mut avg = Vec::new();
        let mut ckpts = VecDeque::new();
        match &kind {
            AverageKind::Wsm { weights, .. } => {
                let held = imp.f64("held")? as usize;
                if held > weights.len() {
                    fail!(
                        "checkpoint: held",
                        "{held} checkpoints but only {} weights",
                        weights.len()
                    );
                }
                if imp.slots.len() != held * vars.len() {
                    fail!(
                        "checkpoint",
                        "expected {} checkpoint tensors ({held} per parameter), found {}",
                        held * vars.len(),
                        imp.slots.len()
                    );
                }
                for i in 0..held {
                    let ck = vars
                        .iter()
                        .map(|nv| get(&nv.name, &ckpt_slot(i)))
                        .collect::<Result<Vec<_>>>()?;
                    ckpts.push_back(ck);
                }
            }
            _ => {
                if count > 0 {
                    avg = vars
                        .iter()
                        .map(|nv| get(&nv.name, AVG))
                        .collect::<Result<Vec<_>>>()?;
                } else if !imp.slots.is_empty() {
                    fail!("checkpoint", "count is 0 but averages are present");
                }
            }
        }
        self.kind = kind;
        self.count = count;
        self.avg = avg;
        self.ckpts = ckpts;
        Ok(())
    }
}
