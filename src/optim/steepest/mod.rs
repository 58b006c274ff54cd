//! Steepest descent under a norm and on a manifold (SPEC §2, §3).
//!
//! One optimizer, [`Steepest`], configured by a [`Norm`] (the geometry of a
//! step) and a [`Manifold`] (where the parameters live):
//!
//! | norm \ manifold | `Free` | `Sphere{r}` | `SpectralSphere{r}` | `Stiefel` |
//! |---|---|---|---|---|
//! | `Euclidean` | `φ = g/‖g‖₂` | `φ = P g/‖P g‖₂`, `P = I − ŵŵᵀ` | — | — |
//! | `Lp(p)` | `φ = g^{[q/p]}/‖g^{[q/p]}‖_p` | `φ ∝ (g + λ ŵ^{[p−1]})^{[q/p]}`, `λ` solved | — | — |
//! | `Sign` | `φ = sign(g)` | `sign(g)`, `φ_k = 0` at `k = argmax|w_k|` | — | — |
//! | `Spectral` | `Φ = msign(G)` (Muon) | — | `Φ = msign(G + λΘ)` | `Φ = msign(G + WX)` |
//!
//! Every step is `w ← retract(w − ηφ)`, `φ` computed from the momentum
//! buffer (`buf ← μ·buf + (1−μ)·g`, optionally Nesterov). The multipliers
//! `λ` and `X` follow dual descent (`λ ← λ − η₂ tr(ΘᵀΦ)`,
//! `X ← X − η₂(WᵀΦ + ΦᵀW)`), persist across steps and are saved with the state.

mod manifold;
mod norm;

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::{Optimizer, VarMap};

pub use manifold::{
    spectral_sphere_direction, spectral_sphere_retract, stiefel_direction, stiefel_retract, theta,
    top_singular_precise, DualAscent, DualStep, Manifold, DEFAULT_DUAL_LR_SPECTRAL_SPHERE,
    DEFAULT_DUAL_LR_STIEFEL, GRAM_SQUARINGS, STIEFEL_RETRACT_MAX_ITERS,
};
pub use norm::{dualize, lp_sphere_multiplier, p_norm, sphere_direction, sphere_retract, Norm};

use super::adamw::{check_lr, check_momentum};
use super::decay_step::{apply_decay, spectral_v_spec, SPECTRAL_V};
use super::muon::muon_momentum;
use super::params::{
    check_unique, commit, gather, math_dtype, matrix_view, name_vars, varmap_vars, Item, NamedVar,
};
use super::state::{export, import, key, scalar, Imported, OptimizerState, Slots};
use crate::decay::WeightDecay;
use crate::error::{fail, invalid};
use crate::linalg::{msign, power_iteration, NewtonSchulz};

/// [`Steepest`] hyperparameters. Defaults: `lr = 0.02`, momentum 0.95 with
/// Nesterov, the spectral norm with Keller Jordan's Newton–Schulz table, no
/// manifold, no weight decay, one dual step per training step with the
/// manifold's default `η₂`.
#[derive(Clone, Debug, PartialEq)]
pub struct SteepestConfig {
    /// Step length `η`: every step has `ρ(Δw) = η` before the retraction (no
    /// per-shape adjustment, unlike `Muon`'s `LrAdjust`).
    pub lr: f64,
    /// Momentum `μ` (0 disables the buffer): `buf ← buf + (1−μ)(g − buf)`.
    pub momentum: f64,
    /// Dualize `g + μ(buf − g)` instead of `buf`.
    pub nesterov: bool,
    /// The norm of a step.
    pub norm: Norm,
    /// Where the parameters live.
    pub manifold: Manifold,
    /// Decoupled weight decay `w ← w − ηλ(…)`, applied before the step to every
    /// parameter (on a manifold the retraction undoes a change of scale).
    pub weight_decay: WeightDecay,
    /// Dual descent of the multipliers (`SpectralSphere`, `Stiefel`).
    pub dual: DualAscent,
}

impl Default for SteepestConfig {
    fn default() -> Self {
        Self {
            lr: 0.02,
            momentum: 0.95,
            nesterov: true,
            norm: Norm::Spectral(NewtonSchulz::muon()),
            manifold: Manifold::Free,
            weight_decay: WeightDecay::None,
            dual: DualAscent::default(),
        }
    }
}

impl SteepestConfig {
    /// Errors (naming the field) on a hyperparameter out of range or a norm
    /// that does not fit the manifold.
    pub fn validate(&self) -> Result<()> {
        check_lr("SteepestConfig.lr", self.lr)?;
        check_momentum("SteepestConfig.momentum", self.momentum)?;
        if self.nesterov && self.momentum == 0.0 {
            fail!("SteepestConfig.nesterov", "Nesterov needs momentum > 0");
        }
        self.norm.validate("SteepestConfig.norm")?;
        self.weight_decay.validate("SteepestConfig.weight_decay")?;
        self.dual.validate("SteepestConfig.dual")?;
        let spectral = matches!(self.norm, Norm::Spectral(_));
        match self.manifold {
            Manifold::Free => {}
            Manifold::Sphere { radius } | Manifold::SpectralSphere { radius }
                if !(radius.is_finite() && radius > 0.0) =>
            {
                fail!(
                    "SteepestConfig.manifold",
                    "the radius must be finite and > 0, got {radius}"
                )
            }
            Manifold::Sphere { .. } if spectral => fail!(
                "SteepestConfig.manifold",
                "Sphere is the sphere of a vector norm; with Norm::Spectral use Manifold::SpectralSphere"
            ),
            Manifold::SpectralSphere { .. } | Manifold::Stiefel { .. } if !spectral => fail!(
                "SteepestConfig.manifold",
                "{:?} is a matrix manifold for the spectral norm; it needs Norm::Spectral, got {:?}",
                self.manifold,
                self.norm
            ),
            _ => {}
        }
        Ok(())
    }

    /// Checks that the config fits a parameter of shape `dims` named `name`.
    fn check_param(&self, name: &str, dims: &[usize]) -> Result<()> {
        let mv = matrix_view(dims);
        match (self.manifold, mv) {
            (Manifold::SpectralSphere { .. } | Manifold::Stiefel { .. }, None) => fail!(
                name,
                "{:?} is a matrix manifold, this parameter has shape {dims:?}",
                self.manifold
            ),
            (Manifold::Stiefel { transpose: false }, Some((r, c))) if r < c => fail!(
                name,
                "Stiefel (WᵀW = I) needs rows ≥ cols, the matrix view is {r}×{c} (wide); \
                 use Manifold::Stiefel {{ transpose: true }} to keep WWᵀ = I"
            ),
            (Manifold::Stiefel { transpose: true }, Some((r, c))) if r > c => fail!(
                name,
                "Stiefel {{ transpose: true }} (WWᵀ = I) needs rows ≤ cols, the matrix view is {r}×{c} (tall); \
                 use Manifold::Stiefel {{ transpose: false }} to keep WᵀW = I"
            ),
            _ => {}
        }
        if matches!(self.norm, Norm::Spectral(_)) && mv.is_none() {
            fail!(
                name,
                "Norm::Spectral needs a matrix (rank ≥ 2), this parameter has shape {dims:?}; \
                 give vectors to a Steepest with a vector norm (Steepest::from_named)"
            );
        }
        Ok(())
    }
}

const MOMENTUM: &str = "momentum";
const DUAL_LAMBDA: &str = "dual_lambda";
const THETA_V: &str = "theta_v";
const DUAL_X: &str = "dual_x";
const KIND: &str = "steepest";

/// Steepest descent under a [`Norm`] on a [`Manifold`], as a candle optimizer.
///
/// Per parameter with gradient `g`: momentum `m`, decay, then
/// - `Free`: `w ← w − η·dualize(m)` ([`dualize`]);
/// - `Sphere{r}`: `w ← r·(w − ηφ)/ρ(w − ηφ)`, `φ = sphere_direction(m, w)`;
/// - `SpectralSphere{r}`: `Φ = msign(M̂ + λΘ)`, `λ ← λ − η₂ tr(ΘᵀΦ)`,
///   `W ← r·(W − ηΦ)/‖W − ηΦ‖₂`;
/// - `Stiefel`: `Φ = msign(M̂ + WX)`, `X ← X − η₂(WᵀΦ + ΦᵀW)`,
///   `W ← msign(W − ηΦ)`,
///
/// with `M̂ = M/rms(σ(M))`. Same-shape matrices are processed as one batch.
/// State slots: `<name>.momentum`, `<name>.dual_lambda` (scalar),
/// `<name>.theta_v` (`v₁` of `W`, warm start of the power iteration),
/// `<name>.dual_x` (`k×k`, `k` the short side), and `<name>.spectral_v` for
/// spectral weight decay. A step either applies to every parameter or (NaN
/// gradient, any error) to none.
///
/// Combinations that make no sense are refused at construction, naming the
/// parameter: the spectral norm or a matrix manifold on a vector, a wide
/// matrix on `Stiefel { transpose: false }`, a vector norm on a matrix
/// manifold, etc.
#[derive(Debug)]
pub struct Steepest {
    vars: Vec<NamedVar>,
    config: SteepestConfig,
    slots: Slots,
    /// Tangent residual of the last step's direction, per parameter (device
    /// scalars: reading them is the only host sync).
    residuals: Vec<(usize, Tensor)>,
}

impl Steepest {
    /// Steepest over the float variables of `varmap`, keeping their names.
    pub fn from_varmap(varmap: &VarMap, config: SteepestConfig) -> Result<Self> {
        Self::from_named(varmap_vars(varmap), config)
    }

    /// Steepest over explicitly named variables.
    pub fn from_named(vars: Vec<NamedVar>, config: SteepestConfig) -> Result<Self> {
        config.validate()?;
        check_unique(&vars)?;
        for v in &vars {
            config.check_param(&v.name, v.var.dims())?;
        }
        Ok(Self {
            vars,
            config,
            slots: HashMap::new(),
            residuals: Vec::new(),
        })
    }

    /// The current hyperparameters.
    pub fn config(&self) -> &SteepestConfig {
        &self.config
    }

    /// The tangent residual of the direction each parameter took in the last
    /// step, by name: `|tr(ΘᵀΦ)|` on the spectral sphere, `‖WᵀΦ + ΦᵀW‖_F` on
    /// the Stiefel manifold (`Φ` for the normalised gradient, so 0 means
    /// tangent and the scale is that of `‖Φ‖₂ = 1`). Empty for `Free` and
    /// `Sphere`, whose directions are tangent by construction (closed form or
    /// an f64 root solve).
    pub fn tangent_residuals(&self) -> Result<Vec<(String, f64)>> {
        self.residuals
            .iter()
            .map(|(i, t)| {
                let r = t.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                Ok((self.vars[*i].name.clone(), r))
            })
            .collect()
    }

    /// The Newton–Schulz schedule (for the spectral norm).
    fn ns(&self) -> &NewtonSchulz {
        match &self.config.norm {
            Norm::Spectral(ns) => ns,
            _ => unreachable!("matrix manifolds are validated to use Norm::Spectral"),
        }
    }

    fn name(&self, it: &Item) -> &str {
        &self.vars[it.index].name
    }

    /// Groups item positions by matrix-view shape.
    fn by_shape(items: &[Item]) -> BTreeMap<(usize, usize), Vec<usize>> {
        let mut groups: BTreeMap<(usize, usize), Vec<usize>> = BTreeMap::new();
        for (pos, it) in items.iter().enumerate() {
            let rc = matrix_view(it.param.dims()).expect("validated: a matrix");
            groups.entry(rc).or_default().push(pos);
        }
        groups
    }

    fn stack(ts: &[&Tensor], rc: (usize, usize)) -> Result<Tensor> {
        let mats = ts
            .iter()
            .map(|t| t.reshape(rc))
            .collect::<Result<Vec<_>>>()?;
        Tensor::stack(&mats, 0)
    }

    fn free(
        &self,
        items: &[Item],
        dirs: &[Tensor],
        decayed: &[Tensor],
    ) -> Result<Vec<(usize, Tensor)>> {
        let lr = self.config.lr;
        let mut out = Vec::with_capacity(items.len());
        if let Norm::Spectral(ns) = &self.config.norm {
            for (rc, members) in Self::by_shape(items) {
                let batch =
                    Self::stack(&members.iter().map(|&p| &dirs[p]).collect::<Vec<_>>(), rc)?;
                let phi = msign(&batch, ns)?;
                for (i, &p) in members.iter().enumerate() {
                    let step = (phi.get(i)?.reshape(items[p].param.shape())? * lr)?;
                    out.push((items[p].index, (&decayed[p] - step)?));
                }
            }
            return Ok(out);
        }
        for (p, it) in items.iter().enumerate() {
            let phi = dualize(&dirs[p], &self.config.norm)?;
            out.push((it.index, (&decayed[p] - (phi * lr)?)?));
        }
        Ok(out)
    }

    fn sphere(
        &self,
        radius: f64,
        items: &[Item],
        dirs: &[Tensor],
        decayed: &[Tensor],
    ) -> Result<Vec<(usize, Tensor)>> {
        let norm = &self.config.norm;
        let mut out = Vec::with_capacity(items.len());
        for (p, it) in items.iter().enumerate() {
            let phi = sphere_direction(&dirs[p], &it.param, norm)
                .map_err(|e| invalid(self.name(it), e))?;
            let w = (&decayed[p] - (phi * self.config.lr)?)?;
            out.push((
                it.index,
                sphere_retract(&w, radius, norm).map_err(|e| invalid(self.name(it), e))?,
            ));
        }
        Ok(out)
    }

    fn spectral_sphere(
        &self,
        radius: f64,
        items: &[Item],
        dirs: &[Tensor],
        decayed: &[Tensor],
        staged: &mut Slots,
        residuals: &mut Vec<(usize, Tensor)>,
    ) -> Result<Vec<(usize, Tensor)>> {
        let cfg = &self.config;
        let mut out = Vec::with_capacity(items.len());
        for ((rows, cols), members) in Self::by_shape(items) {
            let rc = (rows, cols);
            let w = Self::stack(
                &members.iter().map(|&p| &items[p].param).collect::<Vec<_>>(),
                rc,
            )?;
            let g = Self::stack(&members.iter().map(|&p| &dirs[p]).collect::<Vec<_>>(), rc)?;
            let base = Self::stack(
                &members.iter().map(|&p| &decayed[p]).collect::<Vec<_>>(),
                rc,
            )?;
            let (dt, dev) = (w.dtype(), w.device().clone());
            let mut cold = false;
            let mut starts = Vec::new();
            let mut lambdas = Vec::new();
            for &p in &members {
                let name = self.name(&items[p]);
                match staged.get(&key(name, THETA_V)) {
                    Some(v) => starts.push(v.clone()),
                    None => {
                        cold = true;
                        starts.push(Tensor::zeros(cols, dt, &dev)?);
                    }
                }
                match staged.get(&key(name, DUAL_LAMBDA)) {
                    Some(l) => lambdas.push(l.clone()),
                    None => lambdas.push(Tensor::zeros((), dt, &dev)?),
                }
            }
            let start = Tensor::stack(&starts, 0)?;
            // Θ of the current W: the stored v₁ came from the last retraction,
            // one iteration refreshes it; a cold start iterates to convergence.
            let top = if cold {
                top_singular_precise(&w, Some(&start))?
            } else {
                power_iteration(&w, Some(&start), 1)?
            };
            let th = theta(&top)?;
            let lam = Tensor::stack(&lambdas, 0)?;
            let ds = spectral_sphere_direction(&g, &th, &lam, &cfg.dual, self.ns())?;
            let stepped = (&base - (&ds.phi * cfg.lr)?)?;
            let (new_w, new_top) = spectral_sphere_retract(&stepped, radius, Some(&top.v))?;
            for (i, &p) in members.iter().enumerate() {
                let it = &items[p];
                let name = self.name(it).to_string();
                staged.insert(key(&name, THETA_V), new_top.v.get(i)?);
                staged.insert(key(&name, DUAL_LAMBDA), ds.multiplier.get(i)?);
                residuals.push((it.index, ds.residual.get(i)?.abs()?));
                out.push((it.index, new_w.get(i)?.reshape(it.param.shape())?));
            }
        }
        Ok(out)
    }

    fn stiefel(
        &self,
        transpose: bool,
        items: &[Item],
        dirs: &[Tensor],
        decayed: &[Tensor],
        staged: &mut Slots,
        residuals: &mut Vec<(usize, Tensor)>,
    ) -> Result<Vec<(usize, Tensor)>> {
        let cfg = &self.config;
        let mut out = Vec::with_capacity(items.len());
        // Tall working view: W (n×m), n ≥ m; a transposed parameter is Wᵀ.
        let tall = |t: Tensor| -> Result<Tensor> {
            if transpose {
                t.transpose(1, 2)?.contiguous()
            } else {
                Ok(t)
            }
        };
        for (rc, members) in Self::by_shape(items) {
            let k = rc.0.min(rc.1);
            let w = tall(Self::stack(
                &members.iter().map(|&p| &items[p].param).collect::<Vec<_>>(),
                rc,
            )?)?;
            let g = tall(Self::stack(
                &members.iter().map(|&p| &dirs[p]).collect::<Vec<_>>(),
                rc,
            )?)?;
            let base = tall(Self::stack(
                &members.iter().map(|&p| &decayed[p]).collect::<Vec<_>>(),
                rc,
            )?)?;
            let (dt, dev) = (w.dtype(), w.device().clone());
            let mut cold = false;
            let mut xs = Vec::new();
            for &p in &members {
                match staged.get(&key(self.name(&items[p]), DUAL_X)) {
                    Some(x) => xs.push(x.clone()),
                    None => {
                        cold = true;
                        xs.push(Tensor::zeros((k, k), dt, &dev)?);
                    }
                }
            }
            // First step: project the starting point onto the manifold.
            let (w, base) = if cold {
                (stiefel_retract(&w, true)?, stiefel_retract(&base, true)?)
            } else {
                (w, base)
            };
            let x = Tensor::stack(&xs, 0)?;
            let ds = stiefel_direction(&g, &w, &x, &cfg.dual, self.ns())?;
            let stepped = (&base - (&ds.phi * cfg.lr)?)?;
            let new_w = tall(stiefel_retract(&stepped, false)?)?;
            for (i, &p) in members.iter().enumerate() {
                let it = &items[p];
                let name = self.name(it).to_string();
                staged.insert(key(&name, DUAL_X), ds.multiplier.get(i)?);
                let res = ds.residual.get(i)?.sqr()?.sum_all()?.sqrt()?;
                residuals.push((it.index, res));
                out.push((it.index, new_w.get(i)?.reshape(it.param.shape())?));
            }
        }
        Ok(out)
    }
}

impl Optimizer for Steepest {
    type Config = SteepestConfig;

    fn new(vars: Vec<Var>, config: SteepestConfig) -> Result<Self> {
        Self::from_named(name_vars(vars), config)
    }

    fn step(&mut self, grads: &GradStore) -> Result<()> {
        let items = gather(&self.vars, grads)?;
        let mut staged = self.slots.clone();
        let cfg = &self.config;
        let decayed = apply_decay(
            &self.vars,
            &items,
            &cfg.weight_decay,
            true,
            cfg.lr,
            &mut staged,
        )?;
        let mut dirs = Vec::with_capacity(items.len());
        for it in &items {
            if cfg.momentum == 0.0 {
                dirs.push(it.grad.clone());
                continue;
            }
            let k = key(self.name(it), MOMENTUM);
            let buf = staged
                .get(&k)
                .cloned()
                .map_or_else(|| it.grad.zeros_like(), Ok)?;
            let (update, buf) = muon_momentum(&it.grad, &buf, cfg.momentum, cfg.nesterov)?;
            staged.insert(k, buf);
            dirs.push(update);
        }
        let mut residuals = Vec::new();
        let updates = match cfg.manifold {
            Manifold::Free => self.free(&items, &dirs, &decayed)?,
            Manifold::Sphere { radius } => self.sphere(radius, &items, &dirs, &decayed)?,
            Manifold::SpectralSphere { radius } => {
                self.spectral_sphere(radius, &items, &dirs, &decayed, &mut staged, &mut residuals)?
            }
            Manifold::Stiefel { transpose } => self.stiefel(
                transpose,
                &items,
                &dirs,
                &decayed,
                &mut staged,
                &mut residuals,
            )?,
        };
        commit(&self.vars, updates)?;
        self.slots = staged;
        self.residuals = residuals;
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        self.config.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.config.lr = lr;
    }
}

fn text(s: &str) -> Result<Tensor> {
    Tensor::from_vec(s.as_bytes().to_vec(), s.len(), &Device::Cpu)
}

fn read_text(imp: &Imported, name: &str) -> Result<String> {
    let bytes = imp.tensor(name)?.to_vec1::<u8>()?;
    String::from_utf8(bytes).map_err(|_| invalid("checkpoint", format!("`{name}` is not UTF-8")))
}

fn read_f64s(imp: &Imported, name: &str) -> Result<Vec<f64>> {
    imp.tensor(name)?
        .to_dtype(DType::F64)?
        .flatten_all()?
        .to_vec1::<f64>()
}

impl OptimizerState for Steepest {
    fn state_dict(&self) -> Result<HashMap<String, Tensor>> {
        let c = &self.config;
        let d = &c.dual;
        let mut hp = vec![
            ("lr".to_string(), scalar(c.lr)?),
            ("momentum".to_string(), scalar(c.momentum)?),
            ("nesterov".to_string(), scalar(c.nesterov as u8 as f64)?),
            (
                "norm".to_string(),
                Tensor::new(&c.norm.encode(), &Device::Cpu)?,
            ),
            (
                "manifold".to_string(),
                Tensor::new(&c.manifold.encode(), &Device::Cpu)?,
            ),
            ("weight_decay".to_string(), c.weight_decay.to_tensor()?),
            ("dual".to_string(), Tensor::new(&d.encode(), &Device::Cpu)?),
        ];
        if let Norm::Spectral(ns) = &c.norm {
            let table: Vec<f64> = ns.coefficients().iter().flatten().copied().collect();
            let cdt = ns.compute_dtype().map(|d| d.as_str()).unwrap_or("");
            hp.extend([
                (
                    "ns_coefficients".to_string(),
                    Tensor::from_vec(table, (ns.coefficients().len(), 3), &Device::Cpu)?,
                ),
                ("ns_eps".to_string(), scalar(ns.eps())?),
                ("ns_norm_scale".to_string(), scalar(ns.norm_scale())?),
                ("ns_compute_dtype".to_string(), text(cdt)?),
            ]);
        }
        export(KIND, hp, &self.vars, &self.slots)
    }

    fn load_state_dict(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let vars = &self.vars;
        let manifold = self.config.manifold;
        let spec = |i: usize, slot: &str| -> Option<(Vec<usize>, DType)> {
            let dt = math_dtype(vars[i].var.dtype());
            let mv = matrix_view(vars[i].var.dims());
            match (slot, manifold, mv) {
                (SPECTRAL_V, _, _) => spectral_v_spec(&vars[i]),
                (MOMENTUM, _, _) => Some((vars[i].var.dims().to_vec(), dt)),
                (DUAL_LAMBDA, Manifold::SpectralSphere { .. }, Some(_)) => Some((vec![], dt)),
                (THETA_V, Manifold::SpectralSphere { .. }, Some((_, c))) => Some((vec![c], dt)),
                (DUAL_X, Manifold::Stiefel { .. }, Some((r, c))) => {
                    Some((vec![r.min(c), r.min(c)], dt))
                }
                _ => None,
            }
        };
        let imp = import(
            KIND,
            vars,
            &[MOMENTUM, SPECTRAL_V, DUAL_LAMBDA, THETA_V, DUAL_X],
            &spec,
            state,
        )?;
        let norm_code = read_f64s(&imp, "norm")?;
        let ns = if norm_code.first() == Some(&3.0) {
            let table = imp
                .tensor("ns_coefficients")?
                .to_dtype(DType::F64)?
                .to_vec2::<f64>()?
                .into_iter()
                .map(|r| {
                    <[f64; 3]>::try_from(r).map_err(|_| {
                        invalid("checkpoint: ns_coefficients", "rows must have 3 entries")
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let mut ns = NewtonSchulz::custom(table)?
                .with_eps(imp.f64("ns_eps")?)
                .with_norm_scale(imp.f64("ns_norm_scale")?);
            let cdt = read_text(&imp, "ns_compute_dtype")?;
            if !cdt.is_empty() {
                let dt = DType::from_str(&cdt).map_err(|_| {
                    invalid(
                        "checkpoint: ns_compute_dtype",
                        format!("unknown dtype {cdt}"),
                    )
                })?;
                ns = ns.with_compute_dtype(dt);
            }
            Some(ns)
        } else {
            None
        };
        let dual = read_f64s(&imp, "dual")?;
        if dual.len() != 3 {
            fail!(
                "checkpoint: dual",
                "must have 3 entries, got {}",
                dual.len()
            );
        }
        let config = SteepestConfig {
            lr: imp.f64("lr")?,
            momentum: imp.f64("momentum")?,
            nesterov: imp.f64("nesterov")? != 0.0,
            norm: Norm::decode(&norm_code, ns)?,
            manifold: Manifold::decode(&read_f64s(&imp, "manifold")?)?,
            weight_decay: WeightDecay::from_tensor(imp.tensor("weight_decay")?)?,
            dual: DualAscent::decode(&read_f64s(&imp, "dual")?)?,
        };
        config.validate()?;
        let (mine, theirs) = (self.config.manifold.encode(), config.manifold.encode());
        if mine[0] != theirs[0] || mine[2] != theirs[2] {
            fail!(
                "checkpoint: manifold",
                "written for {:?}, this optimizer is on {:?}",
                config.manifold,
                self.config.manifold
            );
        }
        for v in vars {
            config.check_param(&v.name, v.var.dims())?;
        }
        self.config = config;
        self.slots = imp.slots;
        self.residuals.clear();
        Ok(())
    }
}
