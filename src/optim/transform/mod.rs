//! Composable gradient transforms, and what a transform sees of a step.
//!
//! An optimizer is a [`Chain`](super::Chain) of transforms run by the
//! [`Driver`](super::Driver) over each group of parameters with the same
//! matrix view (`(d₀, d₁·d₂·…)`; vectors by length). A step
//! of a group starts with the gradients as the *direction*; each transform,
//! in order, may
//! - fold a decay into the pending parameter update ([`Decay`]: `Stage::Pre`),
//! - change the direction and its own state ([`Momentum`], [`Adam`],
//!   [`Orthogonalize`], [`ShapeScale`], [`Dualize`]: `Stage::Direction`),
//! - step on a manifold (direction, update and retraction together:
//!   [`ManifoldStep`]), or
//! - change the parameters after the update ([`Retract`]: `Stage::Post`).
//!
//! The update itself is `w ← decayed(w) − η·αᵢ·dᵢ` (`αᵢ` a per-parameter
//! factor, e.g. Muon's shape scaling). It runs when the first `Post` transform
//! is reached or after the last transform. An elementwise transform that is
//! the last before it (Adam, SGD's momentum) runs the update itself, fused with
//! its own state update and the pending decay: one pass over memory.
//!
//! State is per (parameter, transform): a typed struct implementing
//! [`TransformState`], created at the parameter's first step, saved as
//! `<param>.<transform name>.<field>`.

mod adam;
mod decay;
mod dualize;
mod manifold;
mod momentum;
mod orthogonalize;
mod retract;

pub use adam::{Adam, AdamState};
pub use decay::{Decay, SpectralDecayState};
pub use dualize::Dualize;
pub use manifold::{ManifoldState, ManifoldStep};
pub use momentum::{Momentum, MomentumKind, MomentumState};
pub use orthogonalize::{LrAdjust, Orthogonalize, ShapeScale};
pub use retract::{Retract, RetractState};

use std::any::Any;
use std::collections::HashMap;
use std::fmt::Debug;

use candle_core::{DType, Tensor, Var};

use crate::device::{self, DecayTerm, Rank1, SgdItem};
use crate::error::{fail, Error, Result};
use crate::params::ParamInfo;

/// Where in a chain a transform runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Acts on the pending parameter update before the step (decay).
    Pre,
    /// Changes the direction (or runs the update itself).
    Direction,
    /// Acts on the parameters after the update (retractions).
    Post,
}

/// The type of one piece of a transform's state.
#[derive(Clone, Debug, PartialEq)]
pub enum FieldKind {
    /// A tensor of this shape and dtype, on the parameter's device.
    Tensor {
        /// Shape.
        dims: Vec<usize>,
        /// Dtype.
        dtype: DType,
    },
    /// A step counter (saved as an `i64` scalar on the CPU).
    Count,
}

/// One named piece of a transform's state for a parameter.
#[derive(Clone, Debug, PartialEq)]
pub struct FieldSpec {
    /// The field's name (the last part of its checkpoint key).
    pub name: &'static str,
    /// Its type.
    pub kind: FieldKind,
}

impl FieldSpec {
    /// A tensor field.
    pub fn tensor(name: &'static str, dims: Vec<usize>, dtype: DType) -> Self {
        Self {
            name,
            kind: FieldKind::Tensor { dims, dtype },
        }
    }

    /// A step counter.
    pub fn count(name: &'static str) -> Self {
        Self {
            name,
            kind: FieldKind::Count,
        }
    }
}

/// The value of one field, for saving.
#[derive(Debug)]
pub enum FieldValue<'a> {
    /// A tensor field.
    Tensor(&'a Tensor),
    /// A step counter.
    Count(u64),
}

/// Loaded field values for [`Transform::load`]: tensors already checked
/// against [`Transform::fields`] and placed on the parameter's device.
#[derive(Debug, Default)]
pub struct Fields {
    tensors: HashMap<&'static str, Tensor>,
    counts: HashMap<&'static str, u64>,
}

impl Fields {
    /// No fields (then add them with [`insert_tensor`](Self::insert_tensor)
    /// and [`insert_count`](Self::insert_count), e.g. to test a
    /// [`Transform::load`]).
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a tensor field.
    pub fn insert_tensor(&mut self, name: &'static str, t: Tensor) {
        self.tensors.insert(name, t);
    }

    /// Adds a counter field.
    pub fn insert_count(&mut self, name: &'static str, n: u64) {
        self.counts.insert(name, n);
    }

    /// A tensor field as a new variable (its own copy of the data).
    pub fn var(&self, name: &str) -> Result<Var> {
        match self.tensors.get(name) {
            // `from_tensor` copies a non-variable tensor into a new variable.
            Some(t) => Ok(Var::from_tensor(&t.detach())?),
            None => fail!(Checkpoint, name, "missing state field"),
        }
    }

    /// A counter field.
    pub fn count(&self, name: &str) -> Result<u64> {
        match self.counts.get(name) {
            Some(&n) => Ok(n),
            None => fail!(Checkpoint, name, "missing state field"),
        }
    }
}

/// A transform's state for one parameter: a typed struct.
pub trait TransformState: Any + Send + Sync + Debug {
    /// The fields to save, by name (as in [`Transform::fields`]).
    fn fields(&self) -> Vec<(&'static str, FieldValue<'_>)>;
    /// For downcasting to the concrete state type.
    fn as_any(&self) -> &dyn Any;
    /// For downcasting to the concrete state type.
    fn as_any_mut(&mut self) -> &mut dyn Any;
}

/// The state of one member, downcast to `T`; `None` before its first step.
pub fn state_mut<T: TransformState>(slot: &mut Option<Box<dyn TransformState>>) -> Option<&mut T> {
    slot.as_mut()
        .and_then(|s| s.as_mut().as_any_mut().downcast_mut::<T>())
}

/// The state of one member, downcast to `T`.
pub fn state_ref<T: TransformState>(slot: &Option<Box<dyn TransformState>>) -> Option<&T> {
    slot.as_ref()
        .and_then(|s| s.as_ref().as_any().downcast_ref::<T>())
}

/// A zero tensor of `dims` in the parameter's arithmetic dtype, on its device.
pub fn zeros_var(p: &ParamInfo, dims: &[usize]) -> Result<Var> {
    Ok(Var::zeros(dims, p.math_dtype(), &p.device)?)
}

/// One gradient transformation. Implement it to add a transform; compose
/// transforms with [`Chain`](super::Chain).
///
/// A stateless transform needs five methods: its kind (its name in the
/// chain and the checkpoint), its hyperparameters as JSON (`Null` when it
/// has none) and back, what it does to a group's direction, and a boxed
/// copy. A stateful one also lists its state's fields ([`Transform::fields`],
/// [`Transform::load`]) and keeps a [`TransformState`] per parameter;
/// `Momentum` and `Adam` in this module are the models to follow
/// ([`to_json`] and [`from_json`] write and read hyperparameters as they
/// do; `steepest::serde_json` is re-exported).
///
/// The contract the driver relies on:
/// - **Members are independent.** A group is the parameters with the same
///   matrix view (`(d₀, d₁·d₂·…)`, so not always the same shape) of
///   one partition that have a gradient in this step (on a data-parallel
///   rank: those it owns), batched for speed. Which parameters share a group
///   is an implementation detail, so `apply` must compute each member's
///   result from its own gradient, state and parameter only; a group-wide
///   statistic (a norm over all members) would change with the grouping and
///   with the number of ranks.
/// - **Errors mean "refuse".** The driver validates the gradients, the
///   rate ([`Transform::check_lr`]) and shapes before anything is written;
///   after that, an infallible transform must not fail. A transform whose
///   `apply` can fail on valid input (a retraction, a root solve) declares
///   [`Transform::fallible`] and runs under an undo copy, so its error
///   changes nothing. An error from an infallible transform (a bug, a
///   device error) leaves the step partly applied, and the driver's error
///   says so.
/// - **The update is not checked.** Gradients are checked for NaN/Inf;
///   what a transform makes of them is not.
/// - **`fuse`.** Ignoring it is always correct: set the direction
///   ([`GroupStep::set_dir`]) and the driver runs the update
///   `w ← decayed(w) − η·αᵢ·dᵢ`. When `fuse` is true (nothing after this
///   transform changes the direction), a transform may run that update
///   itself in one pass, including the pending decay
///   ([`GroupStep::decay_term`]), and call [`GroupStep::mark_applied`].
/// - **State fields are a checkpoint format.** A checkpoint must hold every
///   field [`Transform::fields`] lists, so one written before a field was
///   added is refused naming the key. To migrate, add the key to the loaded
///   state dict ([`checkpoint::load`](crate::checkpoint::load)) before
///   `load_state_dict`.
///
/// ```
/// use candle_core::{Device, Tensor, Var};
/// use candle_nn::Optimizer;
/// use steepest::optim::transform::{GroupStep, Transform, TransformState};
/// use steepest::optim::{Chain, Driver, NamedVar};
/// use steepest::serde_json; // re-exported: no dependency of your own needed
///
/// /// SignSGD's direction, `sign(d)` elementwise.
/// #[derive(Clone, Debug)]
/// struct Sign;
///
/// impl Transform for Sign {
///     fn kind(&self) -> &'static str {
///         "sign"
///     }
///     fn hparams(&self) -> serde_json::Value {
///         serde_json::Value::Null
///     }
///     fn set_hparams(&mut self, _: &serde_json::Value) -> steepest::Result<()> {
///         Ok(())
///     }
///     fn apply(
///         &self,
///         step: &mut GroupStep<'_>,
///         _states: &mut [Option<Box<dyn TransformState>>],
///         _fuse: bool,
///     ) -> steepest::Result<()> {
///         // the group's direction as one (members, …) batch
///         let d = step.dir_batch()?;
///         step.set_dir(d.sign()?)
///     }
///     fn boxed(&self) -> Box<dyn Transform> {
///         Box::new(self.clone())
///     }
/// }
///
/// let w = Var::new(&[1f32, -2.0, 3.0], &Device::Cpu)?;
/// let vars = vec![NamedVar { name: "w".into(), var: w.clone() }];
/// let mut opt = Driver::new(vars, Chain::new().then(Sign), 0.1)?;
/// // gradient (0.5, −4, 0): the step is −0.1·(1, −1, 0)
/// let g = Tensor::new(&[0.5f32, -4.0, 0.0], &Device::Cpu)?;
/// opt.backward_step(&(w.as_tensor() * g)?.sum_all()?)?;
/// let got = w.as_tensor().to_vec1::<f32>()?;
/// for (x, want) in got.iter().zip([0.9f32, -1.9, 3.0]) {
///     assert!((x - want).abs() < 1e-6, "{got:?}");
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub trait Transform: Send + Sync + Debug {
    /// The kind, e.g. `"adam"` (also the default name in a chain).
    fn kind(&self) -> &'static str;
    /// Where in a chain it runs.
    fn stage(&self) -> Stage {
        Stage::Direction
    }
    /// The hyperparameters, for the checkpoint header.
    fn hparams(&self) -> serde_json::Value;
    /// Restores hyperparameters written by [`Transform::hparams`] (validated);
    /// `load_state` calls it with the checkpoint's. Settings that `hparams`
    /// does not write must be kept as they are.
    fn set_hparams(&mut self, v: &serde_json::Value) -> Result<()>;
    /// Checks that the transform applies to a parameter (at construction).
    fn check(&self, _p: &ParamInfo) -> Result<()> {
        Ok(())
    }
    /// Checks the step's learning rate `lr` (the partition's) against the
    /// transform's settings. Runs before anything is written, so an error
    /// refuses the step with no change; `set_learning_rate` cannot fail, so
    /// this is where a rate that a transform cannot take is caught.
    fn check_lr(&self, _lr: f64) -> Result<()> {
        Ok(())
    }
    /// The state it keeps for a parameter (empty: stateless).
    fn fields(&self, _p: &ParamInfo) -> Vec<FieldSpec> {
        Vec::new()
    }
    /// Rebuilds a parameter's state from loaded fields (checkpoints, undo).
    fn load(&self, p: &ParamInfo, _f: &Fields) -> Result<Box<dyn TransformState>> {
        fail!(Checkpoint, p.name, "`{}` keeps no state", self.kind())
    }
    /// Whether [`Transform::apply`] can fail on validated input (a
    /// retraction that diverges, a root that is not bracketed). The driver
    /// runs such chains first, with an undo copy of their parameters and
    /// state, so a failing step still changes nothing.
    fn fallible(&self) -> bool {
        false
    }
    /// Whether it always runs the update itself ([`GroupStep::mark_applied`]),
    /// `fuse` or not (a manifold step, which moves along the manifold rather
    /// than by `−η·d`): only `Stage::Post` transforms may follow it in a
    /// chain, since a direction set after it would be dropped and a fused
    /// update would run a second time ([`Chain`](crate::optim::Chain)
    /// refuses such a chain).
    fn applies_update(&self) -> bool {
        false
    }
    /// Whether its cost on an `m×n` matrix grows like a matrix product,
    /// `m·n·min(m, n)` (`msign`, a dualisation, a manifold step), rather
    /// than with the element count: the data-parallel planner
    /// ([`distributed::param_specs`](crate::distributed::param_specs))
    /// balances such matrices across ranks by that cost.
    fn matrix_cost(&self) -> bool {
        false
    }
    /// Whether it sets its members' pending rank-1 decay
    /// ([`GroupStep::decay_rank1`]; spectral weight decay). A step holds one
    /// such term per member, so a chain with two of these is refused
    /// ([`Chain`](crate::optim::Chain)): the second would replace the
    /// first's.
    fn sets_rank1_decay(&self) -> bool {
        false
    }
    /// Runs on one group of parameters with the same matrix view (their
    /// shapes may differ: `(4, 6)` and `(4, 2, 3)`). `states[i]` is member
    /// `i`'s state (`None` before its first step). `fuse` is true when no
    /// further transform changes the direction, so the transform may run the
    /// update itself ([`GroupStep::mark_applied`]).
    fn apply(
        &self,
        step: &mut GroupStep<'_>,
        states: &mut [Option<Box<dyn TransformState>>],
        fuse: bool,
    ) -> Result<()>;
    /// A boxed copy.
    fn boxed(&self) -> Box<dyn Transform>;
}

impl Clone for Box<dyn Transform> {
    fn clone(&self) -> Self {
        self.boxed()
    }
}

/// Serialises hyperparameters (for [`Transform::hparams`]).
pub fn to_json<T: serde::Serialize>(t: &T) -> serde_json::Value {
    serde_json::to_value(t).expect("hyperparameters serialise")
}

/// Deserialises hyperparameters (for [`Transform::set_hparams`]); an error
/// names `kind`.
pub fn from_json<T: serde::de::DeserializeOwned>(kind: &str, v: &serde_json::Value) -> Result<T> {
    serde_json::from_value(v.clone())
        .map_err(|e| Error::checkpoint(kind, format!("bad hyperparameters: {e}")))
}

/// The running direction of a group.
#[derive(Clone, Debug)]
pub enum Dir {
    /// Still the gradients, untouched.
    Grad,
    /// A batch `(b, rows, cols)` (matrices) or `(b, n)` (vectors) in the
    /// arithmetic dtype; member `i` is `batch.get(i)`.
    Batch(Tensor),
}

/// The decay pending for one member: `w ← scale·w − coeff·a bᵀ`.
#[derive(Clone, Debug)]
pub struct PendingDecay {
    /// The factor on `w`.
    pub scale: f64,
    /// The spectral rank-1 term `(coeff, a, b)`.
    pub rank1: Option<(f64, Tensor, Tensor)>,
}

/// One group's step: parameters of one partition with the same matrix view, with their
/// gradients, the running direction and the pending update.
#[derive(Debug)]
pub struct GroupStep<'a> {
    infos: Vec<&'a ParamInfo>,
    vars: Vec<&'a Var>,
    grads: Vec<&'a Tensor>,
    lr: f64,
    dir: Dir,
    alphas: Vec<f64>,
    decay: Vec<PendingDecay>,
    applied: bool,
}

impl<'a> GroupStep<'a> {
    pub(crate) fn new(
        infos: Vec<&'a ParamInfo>,
        vars: Vec<&'a Var>,
        grads: Vec<&'a Tensor>,
        lr: f64,
    ) -> Self {
        let n = infos.len();
        Self {
            infos,
            vars,
            grads,
            lr,
            dir: Dir::Grad,
            alphas: vec![1.0; n],
            decay: vec![
                PendingDecay {
                    scale: 1.0,
                    rank1: None
                };
                n
            ],
            applied: false,
        }
    }

    /// Number of members.
    pub fn len(&self) -> usize {
        self.infos.len()
    }

    /// Whether the group is empty.
    pub fn is_empty(&self) -> bool {
        self.infos.is_empty()
    }

    /// Member `i`'s description.
    pub fn info(&self, i: usize) -> &ParamInfo {
        self.infos[i]
    }

    /// A batched routine's error as an error about the member it names (the
    /// first member when it names none).
    pub(crate) fn member_error(&self, e: crate::linalg::MemberError) -> crate::error::Error {
        e.error.about(&self.infos[e.member.unwrap_or(0)].name)
    }

    /// Member `i`'s variable.
    pub fn var(&self, i: usize) -> &Var {
        self.vars[i]
    }

    /// Member `i`'s gradient (the parameter's shape and dtype).
    pub fn grad(&self, i: usize) -> &Tensor {
        self.grads[i]
    }

    /// The learning rate of this step (the chain's).
    pub fn lr(&self) -> f64 {
        self.lr
    }

    /// The matrix view shared by the members (`None` for vectors).
    pub fn matrix(&self) -> Option<(usize, usize)> {
        self.infos[0].matrix()
    }

    /// The arithmetic dtype.
    pub fn math_dtype(&self) -> DType {
        self.infos[0].math_dtype()
    }

    /// The per-member shape of a batch: `(rows, cols)` or `(n,)`.
    fn member_dims(&self) -> Vec<usize> {
        match self.matrix() {
            Some((r, c)) => vec![r, c],
            None => vec![self.infos[0].elem_count()],
        }
    }

    /// The batch shape `(b, rows, cols)` or `(b, n)`.
    pub fn batch_dims(&self) -> Vec<usize> {
        let mut d = vec![self.len()];
        d.extend(self.member_dims());
        d
    }

    /// The current direction.
    pub fn dir(&self) -> &Dir {
        &self.dir
    }

    /// The direction as a batch in the arithmetic dtype (stacking the
    /// gradients if the direction is still [`Dir::Grad`]).
    pub fn dir_batch(&self) -> Result<Tensor> {
        match &self.dir {
            Dir::Batch(b) => Ok(b.clone()),
            Dir::Grad => self.stack(&self.grads),
        }
    }

    /// Stacks one tensor per member into a batch (arithmetic dtype).
    pub fn stack(&self, ts: &[&Tensor]) -> Result<Tensor> {
        let dims = self.member_dims();
        let dt = self.math_dtype();
        let ts = ts
            .iter()
            .map(|t| t.detach().to_dtype(dt)?.reshape(dims.as_slice()))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::stack(&ts, 0)?)
    }

    /// The parameters, each as its matrix view (or length), detached and
    /// not copied: what a batch would stack, for reading only.
    pub fn param_views(&self) -> Result<Vec<Tensor>> {
        let dims = self.member_dims();
        self.vars
            .iter()
            .map(|v| Ok(v.as_tensor().detach().reshape(dims.as_slice())?))
            .collect()
    }

    /// The parameters as a batch (arithmetic dtype, a copy).
    pub fn params_batch(&self) -> Result<Tensor> {
        let ts: Vec<&Tensor> = self.vars.iter().map(|v| v.as_tensor()).collect();
        let b = self.stack(&ts)?;
        // `stack` of a single member may share the parameter's storage.
        Ok(if self.len() == 1 {
            b.detach().copy()?
        } else {
            b
        })
    }

    /// Replaces the direction (a batch of [`GroupStep::batch_dims`]).
    pub fn set_dir(&mut self, batch: Tensor) -> Result<()> {
        if batch.dims() != self.batch_dims().as_slice() {
            fail!(
                Shape,
                "GroupStep::set_dir",
                "expected shape {:?}, got {:?}",
                self.batch_dims(),
                batch.dims()
            );
        }
        self.dir = Dir::Batch(batch.to_dtype(self.math_dtype())?.contiguous()?);
        Ok(())
    }

    /// Multiplies member `i`'s step length `αᵢ` by `f`.
    pub fn scale_alpha(&mut self, i: usize, f: f64) {
        self.alphas[i] *= f;
    }

    /// Member `i`'s step length factor `αᵢ` (the update is `η·αᵢ·dᵢ`).
    pub fn alpha(&self, i: usize) -> f64 {
        self.alphas[i]
    }

    /// Multiplies member `i`'s pending decay factor by `s` (`w ← s·w`).
    pub fn decay_scale(&mut self, i: usize, s: f64) {
        self.decay[i].scale *= s;
    }

    /// Sets member `i`'s pending rank-1 decay `w ← w − coeff·a bᵀ` (`a` of
    /// the matrix view's rows, `b` of its columns).
    pub fn decay_rank1(&mut self, i: usize, coeff: f64, a: Tensor, b: Tensor) {
        self.decay[i].rank1 = Some((coeff, a, b));
    }

    /// Member `i`'s pending decay.
    pub fn pending_decay(&self, i: usize) -> &PendingDecay {
        &self.decay[i]
    }

    /// The pending decay of member `i` in the form the fused updates of
    /// [`crate::device`] take (for a transform that runs the update itself).
    pub fn decay_term(&self, i: usize) -> DecayTerm<'_> {
        let d = &self.decay[i];
        DecayTerm {
            scale: d.scale,
            rank1: d.rank1.as_ref().map(|(coeff, a, b)| Rank1 {
                coeff: *coeff,
                a,
                b,
            }),
        }
    }

    /// Whether the update has run.
    pub fn is_applied(&self) -> bool {
        self.applied
    }

    /// Records that a transform ran the update itself (fused).
    pub fn mark_applied(&mut self) {
        self.applied = true;
    }

    /// Runs the update `w ← decayed(w) − η·αᵢ·dᵢ` now (once).
    pub fn apply_update(&mut self) -> Result<()> {
        if self.applied {
            return Ok(());
        }
        match &self.dir {
            Dir::Grad => {
                let items: Vec<SgdItem<'_>> = (0..self.len())
                    .map(|i| SgdItem {
                        w: self.vars[i],
                        g: self.grads[i],
                        buf: None,
                        lr: self.lr * self.alphas[i],
                        decay: self.decay_term(i),
                    })
                    .collect();
                device::sgd_step(&items, 0.0, false)?;
            }
            Dir::Batch(d) => {
                let alphas: Vec<f64> = self.alphas.iter().map(|a| a * self.lr).collect();
                let decays: Vec<DecayTerm<'_>> =
                    (0..self.len()).map(|i| self.decay_term(i)).collect();
                device::apply_step(&self.vars, d, &alphas, &decays)?;
            }
        }
        self.applied = true;
        Ok(())
    }
}
