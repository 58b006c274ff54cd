//! Iterate averaging: EMA, Polyak (uniform running) average and WSM
//! checkpoint merging, with averaged weights that can be swapped in for
//! evaluation and back, and state that saves with [`OptimizerState`].
//!
//! Call [`WeightAverage::update`] after every optimizer step. With `θ_n` the
//! parameters at the `n`-th update:
//!
//! - EMA (decay `β`): `θ̄_1 = θ_1`, `θ̄_n = β·θ̄_{n−1} + (1−β)·θ_n`.
//! - Polyak: `θ̄_n = θ̄_{n−1} + (θ_n − θ̄_{n−1})/n = (1/n) Σ_{i≤n} θ_i`
//!   (docs/math.md §5: the averaged iterate enjoys the averaged-loss bound).
//!   The increments are added with Kahan compensation (one more tensor per
//!   parameter, saved with the average): plain f32 additions round each
//!   increment `(θ_n − θ̄)/n` to whole ulps of `θ̄`, so once it falls below
//!   half an ulp (after ~2·10³ updates for iterates 10⁻⁴ apart, relative)
//!   the average stops moving or moves by a whole ulp, and its error from
//!   the true mean grows with `n`. EMA is not
//!   compensated: its increment `(1−β)(θ_n − θ̄)` does not shrink with `n`,
//!   so f32 rounding only limits how closely it tracks (to about
//!   `2⁻²⁴/(1−β)` relative: 6·10⁻⁴ at `β = 0.9999`).
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

use candle_core::Tensor;
use candle_nn::VarMap;
use serde::{Deserialize, Serialize};

use crate::checkpoint::{host_copy, read_slots, Header, OptimizerState, HEADER_KEY};
use crate::device::math_dtype;
use crate::error::{fail, Error, Result};
use crate::params::{check_params, varmap_vars, NamedVar};
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
            Config,
            "wsm_weights: decay_factors",
            "is empty (need k ≥ 1 factors)"
        );
    }
    for (j, &w) in decay_factors.iter().enumerate() {
        if !(0.0..=1.0).contains(&w) {
            fail!(
                Config,
                "wsm_weights: decay_factors",
                "[{j}] = {w} is not in [0, 1]"
            );
        }
        if j > 0 && w > decay_factors[j - 1] {
            fail!(
                Config,
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
        fail!(Config, "wsm_weights_for_shape: k", "must be ≥ 1");
    }
    let w: Vec<f64> = (0..k).map(|j| shape.factor(j as f64 / k as f64)).collect();
    wsm_weights(&w)
}

/// Which average [`WeightAverage`] keeps.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
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
    /// The oldest checkpoints are not kept while their weight is 0: leading
    /// zeros (e.g. the first of [`wsm_weights_for_shape`]`(Linear, k)`,
    /// whose `k + 1` weights start with `1 − f(0) = 0`) shorten the window.
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
                    fail!(
                        Config,
                        "AverageKind::Ema.decay",
                        "must be in [0, 1), got {decay}"
                    );
                }
            }
            Self::Polyak => {}
            Self::Wsm { weights, interval } => {
                if *interval == 0 {
                    fail!(Config, "AverageKind::Wsm.interval", "must be ≥ 1");
                }
                if weights.is_empty() {
                    fail!(Config, "AverageKind::Wsm.weights", "is empty");
                }
                if let Some(w) = weights.iter().find(|w| !(w.is_finite() && **w >= 0.0)) {
                    fail!(
                        Config,
                        "AverageKind::Wsm.weights",
                        "must be finite and ≥ 0, got {w}"
                    );
                }
                let s: f64 = weights.iter().sum();
                if (s - 1.0).abs() > 1e-9 {
                    fail!(
                        Config,
                        "AverageKind::Wsm.weights",
                        "must sum to 1, sum to {s}"
                    );
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
/// The slot of Polyak's Kahan compensation.
const AVG_COMP: &str = "avg_comp";

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
    /// Polyak: the Kahan compensation of `avg` (the true mean is
    /// `avg − comp`), one per parameter; empty otherwise.
    comp: Vec<Tensor>,
    /// WSM: the kept checkpoints, oldest first.
    ckpts: VecDeque<Vec<Tensor>>,
    /// The training weights while the average is swapped in.
    stash: Option<Vec<Tensor>>,
}

impl WeightAverage {
    /// An average over the float variables of `varmap`, keeping their names.
    pub fn from_varmap(varmap: &VarMap, kind: AverageKind) -> Result<Self> {
        Self::from_named(varmap_vars(varmap)?, kind)
    }

    /// An average over explicitly named variables (at least one).
    pub fn from_named(vars: Vec<NamedVar>, kind: AverageKind) -> Result<Self> {
        kind.validate()?;
        if vars.is_empty() {
            fail!(
                Config,
                "WeightAverage",
                "no variables to average (build the average after the model)"
            );
        }
        check_params(&vars)?;
        Ok(Self {
            vars,
            kind,
            count: 0,
            avg: Vec::new(),
            comp: Vec::new(),
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
            .collect::<candle_core::Result<_>>()
            .map_err(Into::into)
    }

    /// Folds the current parameters into the average (call after each
    /// optimizer step). Errors while the average is swapped in.
    pub fn update(&mut self) -> Result<()> {
        if self.stash.is_some() {
            fail!(
                Config,
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
                        // a + (1 − β)(x − a), not βa + (1 − β)x: β and
                        // 1 − β rounded to f32 apart do not sum to 1, and
                        // the average settled at x·(1 − β)/(1 − β)_f32 (a
                        // 1.7e-4 bias at β = 0.9999); here x is a fixed point.
                        .map(|(a, x)| a + (x - a)?.affine(1.0 - decay, 0.0)?)
                        .collect::<candle_core::Result<_>>()?
                };
            }
            AverageKind::Polyak => {
                if self.avg.is_empty() {
                    self.comp = cur
                        .iter()
                        .map(Tensor::zeros_like)
                        .collect::<candle_core::Result<_>>()?;
                    self.avg = cur;
                } else {
                    let (avg, comp) = self
                        .avg
                        .iter()
                        .zip(&self.comp)
                        .zip(&cur)
                        .map(|((a, c), x)| polyak_step(a, c, x, n))
                        .collect::<candle_core::Result<Vec<_>>>()?
                        .into_iter()
                        .unzip();
                    self.avg = avg;
                    self.comp = comp;
                }
            }
            AverageKind::Wsm { weights, interval } => {
                if n.is_multiple_of(*interval as u64) {
                    self.ckpts.push_back(cur);
                    while self.ckpts.len() > merged(weights).len() {
                        self.ckpts.pop_front();
                    }
                }
            }
        }
        self.count = n;
        Ok(())
    }

    /// The averaged parameters, by name (math dtype). Errors before the first
    /// update, and for WSM until every checkpoint of non-zero weight is held
    /// (`weights.len()` less the leading zeros).
    pub fn averaged(&self) -> Result<Vec<(String, Tensor)>> {
        self.averaged_for("WeightAverage::averaged")
    }

    /// [`Self::averaged`], its errors naming `who` (the public call made).
    fn averaged_for(&self, who: &str) -> Result<Vec<(String, Tensor)>> {
        let values: Vec<Tensor> = match &self.kind {
            AverageKind::Ema { .. } | AverageKind::Polyak => {
                if self.avg.is_empty() {
                    fail!(Config, who, "no update yet: nothing to average");
                }
                if self.comp.is_empty() {
                    self.avg.clone()
                } else {
                    // The compensated mean, rounded once.
                    self.avg
                        .iter()
                        .zip(&self.comp)
                        .map(|(a, c)| a - c)
                        .collect::<candle_core::Result<_>>()?
                }
            }
            AverageKind::Wsm { weights, .. } => {
                let weights = merged(weights);
                if self.ckpts.len() < weights.len() {
                    fail!(
                        Config,
                        who,
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
    ///
    /// For evaluation only: until [`swap_out`](Self::swap_out), the model's
    /// variables hold the average. An optimizer step taken meanwhile would
    /// update the average's copy: `swap_out` then refuses (it would discard
    /// the step), and [`update`](Self::update) refuses to run while swapped
    /// in.
    pub fn swap_in(&mut self) -> Result<()> {
        if self.stash.is_some() {
            fail!(
                Config,
                "WeightAverage::swap_in",
                "the average is already swapped in"
            );
        }
        let ready = self.in_var_dtypes("WeightAverage::swap_in")?;
        let stash: Vec<Tensor> = self
            .vars
            .iter()
            .map(|nv| nv.var.as_tensor().detach().copy())
            .collect::<candle_core::Result<_>>()?;
        for (nv, a) in self.vars.iter().zip(&ready) {
            nv.var.set(a)?;
        }
        self.stash = Some(stash);
        Ok(())
    }

    /// The average in the variables' dtypes: what [`swap_in`](Self::swap_in)
    /// writes into them.
    fn in_var_dtypes(&self, who: &str) -> Result<Vec<Tensor>> {
        let avg = self.averaged_for(who)?;
        Ok(self
            .vars
            .iter()
            .zip(&avg)
            .map(|(nv, (_, a))| a.to_dtype(nv.var.dtype()))
            .collect::<candle_core::Result<_>>()?)
    }

    /// Puts the training weights back after [`WeightAverage::swap_in`].
    /// Errors, changing nothing, if the average is not swapped in, or if a
    /// variable no longer holds the average — an optimizer step taken while
    /// swapped in, which swapping out would silently discard (the
    /// optimizer's state has moved with it: restore from a checkpoint, or
    /// call [`swap_out_discarding`](Self::swap_out_discarding) to put the
    /// training weights back anyway). The check compares every variable with
    /// the average, exactly (one host sync).
    pub fn swap_out(&mut self) -> Result<()> {
        if self.stash.is_none() {
            fail!(
                Config,
                "WeightAverage::swap_out",
                "the average is not swapped in"
            );
        }
        let ready = self.in_var_dtypes("WeightAverage::swap_out")?;
        // Per variable, 1 where every entry is the same (NaN = NaN here),
        // else 0: a minimum, exact at any size (a count summed in f32 lost
        // ones beyond 2²⁴ entries and called unchanged variables changed).
        let unchanged = self
            .vars
            .iter()
            .zip(&ready)
            .map(|(nv, a)| {
                let w = nv.var.as_tensor();
                if w.elem_count() == 0 {
                    return Tensor::new(1f32, w.device());
                }
                let same = w.eq(a)?.maximum(&w.ne(w)?.mul(&a.ne(a)?)?)?;
                same.to_dtype(candle_core::DType::F32)?.min_all()
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let unchanged = if unchanged.is_empty() {
            Vec::new()
        } else {
            Tensor::stack(&unchanged, 0)?.to_vec1::<f32>()?
        };
        let changed: Vec<&str> = self
            .vars
            .iter()
            .zip(&unchanged)
            .filter(|(_, u)| **u != 1.0)
            .map(|(nv, _)| nv.name.as_str())
            .collect();
        if !changed.is_empty() {
            let shown = changed
                .iter()
                .take(3)
                .copied()
                .collect::<Vec<_>>()
                .join(", ");
            fail!(
                Config,
                "WeightAverage::swap_out",
                "{} variable(s) ({shown}{}) changed while the average was swapped in (an optimizer \
                 step?); swapping out would discard that change silently. Nothing was changed: \
                 call swap_out_discarding() to put the training weights back anyway",
                changed.len(),
                if changed.len() > 3 { ", …" } else { "" }
            );
        }
        self.swap_out_discarding()
    }

    /// Puts the training weights back after [`WeightAverage::swap_in`],
    /// discarding whatever the variables hold now. Errors if the average is
    /// not swapped in.
    pub fn swap_out_discarding(&mut self) -> Result<()> {
        let Some(stash) = self.stash.take() else {
            fail!(
                Config,
                "WeightAverage::swap_out_discarding",
                "the average is not swapped in"
            );
        };
        for (nv, t) in self.vars.iter().zip(&stash) {
            nv.var.set(t)?;
        }
        Ok(())
    }
}

/// The header body of a [`WeightAverage`] checkpoint.
#[derive(Debug, Serialize, Deserialize)]
struct AverageBody {
    kind: AverageKind,
    count: u64,
    /// WSM checkpoints held.
    held: usize,
}

fn ckpt_slot(i: usize) -> String {
    format!("ckpt{i}")
}

impl OptimizerState for WeightAverage {
    /// Keys: `"<param>.avg"` (EMA / Polyak), `"<param>.avg_comp"` (Polyak's
    /// Kahan compensation) or `"<param>.ckpt<i>"` (WSM, oldest first), plus
    /// the header (kind, count, hyperparameters).
    fn state_dict(&self) -> Result<HashMap<String, Tensor>> {
        let body = AverageBody {
            kind: self.kind.clone(),
            count: self.count,
            held: self.ckpts.len(),
        };
        let header = Header::new(
            self.kind.tag(),
            self.vars.iter().map(|v| v.name.clone()).collect(),
            serde_json::to_value(&body).expect("the header body encodes"),
        );
        let mut out = HashMap::new();
        out.insert(HEADER_KEY.to_string(), header.to_tensor()?);
        for (p, nv) in self.vars.iter().enumerate() {
            if let Some(a) = self.avg.get(p) {
                out.insert(format!("{}.{AVG}", nv.name), host_copy(a)?);
            }
            if let Some(c) = self.comp.get(p) {
                out.insert(format!("{}.{AVG_COMP}", nv.name), host_copy(c)?);
            }
            for (i, ck) in self.ckpts.iter().enumerate() {
                out.insert(format!("{}.{}", nv.name, ckpt_slot(i)), host_copy(&ck[p])?);
            }
        }
        Ok(out)
    }

    /// Validates everything (kind, parameter names, shapes, dtypes, counts)
    /// before changing anything; the hyperparameters (EMA decay, WSM weights
    /// and interval) are restored from the checkpoint. Errors while the
    /// average is swapped in.
    fn load_state_dict(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        if self.stash.is_some() {
            fail!(
                Config,
                "WeightAverage::load_state_dict",
                "the average is swapped in; call swap_out() first"
            );
        }
        let header = Header::read(state, self.kind.tag())?;
        header.check_params(self.vars.iter().map(|v| v.name.as_str()))?;
        let body: AverageBody = serde_json::from_value(header.body.clone())
            .map_err(|e| Error::checkpoint(HEADER_KEY, format!("not an average header: {e}")))?;
        if body.kind.tag() != self.kind.tag() {
            fail!(
                Checkpoint,
                HEADER_KEY,
                "the header is of kind `{}` but its body holds a `{}` average",
                self.kind.tag(),
                body.kind.tag()
            );
        }
        body.kind
            .validate()
            .map_err(|e| Error::checkpoint("checkpoint", format!("bad hyperparameters: {e}")))?;
        let wsm_len = match &body.kind {
            AverageKind::Wsm { weights, .. } => Some(weights.len()),
            _ => None,
        };
        if wsm_len.is_some_and(|k| body.held > k) {
            fail!(
                Checkpoint,
                "checkpoint: held",
                "{} checkpoints but only {} weights",
                body.held,
                wsm_len.unwrap_or(0)
            );
        }
        if let AverageKind::Wsm { weights, interval } = &body.kind {
            // One checkpoint every `interval` updates, the oldest dropped
            // beyond those of non-zero weight (all of them, before such
            // checkpoints were dropped): `count` says how many there are.
            let taken = body.count / *interval as u64;
            let fewest = taken.min(merged(weights).len() as u64);
            let most = taken.min(weights.len() as u64);
            if (body.held as u64) < fewest || body.held as u64 > most {
                fail!(
                    Checkpoint,
                    "checkpoint: held",
                    "{} checkpoints after {} updates every {interval} (expected {})",
                    body.held,
                    body.count,
                    if fewest == most {
                        fewest.to_string()
                    } else {
                        format!("{fewest} to {most}")
                    }
                );
            }
        }
        let names: Vec<&str> = self.vars.iter().map(|v| v.name.as_str()).collect();
        let keeps = |_: usize, slot: &str| match wsm_len {
            Some(_) => (0..body.held).any(|i| slot == ckpt_slot(i)),
            None => {
                body.count > 0
                    && (slot == AVG || (slot == AVG_COMP && body.kind == AverageKind::Polyak))
            }
        };
        let expect = |p: usize| {
            let v = &self.vars[p].var;
            (v.dims().to_vec(), math_dtype(v.dtype()), v.device().clone())
        };
        let mut found = read_slots(state, &names, "this average", keeps, expect)?;
        let has_comp = found.keys().any(|(_, slot)| slot == AVG_COMP);
        let mut take = |p: usize, slot: &str| -> Result<Tensor> {
            found.remove(&(p, slot.to_string())).ok_or_else(|| {
                Error::checkpoint(
                    format!("{}.{slot}", names[p]),
                    "missing from the checkpoint",
                )
            })
        };
        let mut avg = Vec::new();
        let mut comp = Vec::new();
        let mut ckpts = VecDeque::new();
        match wsm_len {
            Some(_) => {
                for i in 0..body.held {
                    let ck = (0..names.len())
                        .map(|p| take(p, &ckpt_slot(i)))
                        .collect::<Result<Vec<_>>>()?;
                    ckpts.push_back(ck);
                }
            }
            None if body.count > 0 => {
                avg = (0..names.len())
                    .map(|p| take(p, AVG))
                    .collect::<Result<Vec<_>>>()?;
                if body.kind == AverageKind::Polyak {
                    // A checkpoint saved before the compensation was kept
                    // has none (zero is what that average was); one that
                    // has some must have all.
                    comp = (0..names.len())
                        .map(|p| match take(p, AVG_COMP) {
                            Ok(c) => Ok(c),
                            Err(e) if has_comp => Err(e),
                            Err(_) => Ok(avg[p].zeros_like()?),
                        })
                        .collect::<Result<_>>()?;
                }
            }
            None => {}
        }
        // (a checkpoint may hold a zero-weight checkpoint, which is not kept)
        if let AverageKind::Wsm { weights, .. } = &body.kind {
            while ckpts.len() > merged(weights).len() {
                ckpts.pop_front();
            }
        }
        self.kind = body.kind;
        self.count = body.count;
        self.avg = avg;
        self.comp = comp;
        self.ckpts = ckpts;
        Ok(())
    }
}

/// The WSM weights of the checkpoints kept: `weights` without its leading
/// zeros (never empty: the weights sum to 1).
fn merged(weights: &[f64]) -> &[f64] {
    let zeros = weights.iter().take_while(|w| **w == 0.0).count();
    &weights[zeros.min(weights.len() - 1)..]
}

/// One compensated Polyak update of the mean `a` (with Kahan compensation
/// `c`, the true mean being `a − c`) by the `n`-th iterate `x`: adds
/// `(x − (a − c))/n` to `a` and returns the new mean and compensation.
fn polyak_step(
    a: &Tensor,
    c: &Tensor,
    x: &Tensor,
    n: u64,
) -> candle_core::Result<(Tensor, Tensor)> {
    let y = ((x - a)? + c)?.affine(1.0 / n as f64, 0.0)?.sub(c)?;
    let t = (a + &y)?;
    // What the rounded addition added beyond `y`: subtracted next time.
    let c = (&t - a)?.sub(&y)?;
    Ok((t, c))
}
