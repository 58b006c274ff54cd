//! Muon: momentum, then the orthogonalised update `msign(M)` per matrix
//! (`torch.optim.Muon` semantics), with an internal AdamW for the rest.

use std::collections::{BTreeMap, HashMap};
use std::str::FromStr;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::{Optimizer, VarMap};

use super::adamw::{
    adam_group, adam_slot_spec, check_lr, check_momentum, AdamWConfig, EXP_AVG, EXP_AVG_SQ, STEP,
};
use super::decay_step::{apply_decay, spectral_v_spec, SPECTRAL_V};
use super::params::{
    check_unique, commit, gather, math_dtype, matrix_view, name_vars, varmap_vars, Item, NamedVar,
};
use super::state::{export, import, key, scalar, Imported, OptimizerState, Slots};
use crate::decay::WeightDecay;
use crate::error::{fail, invalid};
use crate::linalg::{msign, NewtonSchulz};

/// How Muon scales the learning rate per matrix of (matrix-view) shape `rows × cols`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LrAdjust {
    /// `η` unchanged.
    None,
    /// `η·√max(1, rows/cols)` (Keller Jordan's Muon; torch's `"original"`).
    Original,
    /// `η·k·√max(rows, cols)` with `k` usually 0.2, so that the update's RMS
    /// matches AdamW's (Moonlight; torch's `"match_rms_adamw"`).
    MatchAdamWRms(f64),
}

impl LrAdjust {
    /// The factor on `η` for a `rows × cols` matrix.
    pub fn factor(&self, rows: usize, cols: usize) -> f64 {
        let (r, c) = (rows as f64, cols as f64);
        match *self {
            Self::None => 1.0,
            Self::Original => (r / c).max(1.0).sqrt(),
            Self::MatchAdamWRms(k) => k * r.max(c).sqrt(),
        }
    }

    fn encode(&self) -> [f64; 2] {
        match *self {
            Self::None => [0.0, 0.0],
            Self::Original => [1.0, 0.0],
            Self::MatchAdamWRms(k) => [2.0, k],
        }
    }

    fn decode(c: &[f64]) -> Result<Self> {
        Ok(match (c.first().map(|k| *k as u32), c.get(1)) {
            (Some(0), _) => Self::None,
            (Some(1), _) => Self::Original,
            (Some(2), Some(&k)) => Self::MatchAdamWRms(k),
            _ => fail!("checkpoint: lr_adjust", "bad code {c:?}"),
        })
    }
}

/// Muon hyperparameters. Defaults follow `torch.optim.Muon`: `lr = 1e-3`,
/// momentum 0.95 with Nesterov, Keller Jordan's Newton–Schulz table,
/// `LrAdjust::Original`, decoupled decay 0.1. Parameters of rank < 2, and
/// those whose name contains one of `adamw_names`, are updated by an
/// internal AdamW configured by `adamw`.
#[derive(Clone, Debug, PartialEq)]
pub struct MuonConfig {
    /// Learning rate `η` of the matrices.
    pub lr: f64,
    /// Momentum `μ`: `buf ← μ·buf + (1−μ)·g`.
    pub momentum: f64,
    /// Orthogonalise `(1−μ)·g + μ·buf` instead of `buf`.
    pub nesterov: bool,
    /// The Newton–Schulz schedule for `msign`.
    pub newton_schulz: NewtonSchulz,
    /// Per-shape learning-rate scaling.
    pub lr_adjust: LrAdjust,
    /// Weight decay of the Muon matrices (uses the unadjusted `η`, as torch).
    pub weight_decay: WeightDecay,
    /// Config of the internal AdamW. Its `lr` keeps its ratio to `lr` when
    /// `set_learning_rate` changes the Muon rate (so one schedule drives both).
    pub adamw: AdamWConfig,
    /// Substrings of parameter names routed to AdamW (e.g. `"embed"`, `"lm_head"`).
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
        check_momentum("MuonConfig.momentum", self.momentum)?;
        self.weight_decay.validate("MuonConfig.weight_decay")?;
        self.adamw.validate()
    }
}

/// Muon's momentum for one tensor: `buf ← buf + (1−μ)(g − buf)`; returns
/// `(update, buf)` with `update = g + μ(buf − g)` (Nesterov) or `buf`.
pub fn muon_momentum(
    g: &Tensor,
    buf: &Tensor,
    momentum: f64,
    nesterov: bool,
) -> Result<(Tensor, Tensor)> {
    let buf = (buf + ((g - buf)? * (1.0 - momentum))?)?;
    let update = if nesterov {
        (g + ((&buf - g)? * momentum)?)?
    } else {
        buf.clone()
    };
    Ok((update, buf))
}

const MOMENTUM: &str = "momentum";
const KIND: &str = "muon";

/// Muon (MomentUm Orthogonalized by Newton–Schulz) as a candle optimizer.
///
/// For each matrix `W` with gradient `G`: momentum, then
/// `W ← W − decay − η·adjust(rows, cols)·msign(update)`. Same-shape matrices
/// are orthogonalised together as one `(b, m, n)` batch. A tensor of rank > 2
/// is treated as its matrix view `(d₀, d₁·d₂·…)` (e.g. a conv kernel
/// `(out, in, kh, kw)` → `(out, in·kh·kw)`). Rank-0/1 parameters and
/// name-routed ones go to the internal AdamW.
#[derive(Debug)]
pub struct Muon {
    vars: Vec<NamedVar>,
    /// `true` where the parameter is updated by Muon, `false` for AdamW.
    is_muon: Vec<bool>,
    config: MuonConfig,
    adamw_lr_ratio: f64,
    slots: Slots,
}

impl Muon {
    /// Muon over the float variables of `varmap`, keeping their names (so
    /// `adamw_names` can route embeddings and heads to AdamW).
    pub fn from_varmap(varmap: &VarMap, config: MuonConfig) -> Result<Self> {
        Self::from_named(varmap_vars(varmap), config)
    }

    /// Muon over explicitly named variables.
    pub fn from_named(vars: Vec<NamedVar>, config: MuonConfig) -> Result<Self> {
        config.validate()?;
        check_unique(&vars)?;
        let is_muon = vars
            .iter()
            .map(|v| {
                v.var.rank() >= 2
                    && !config
                        .adamw_names
                        .iter()
                        .any(|s| v.name.contains(s.as_str()))
            })
            .collect();
        let adamw_lr_ratio = if config.lr > 0.0 {
            config.adamw.lr / config.lr
        } else {
            1.0
        };
        Ok(Self {
            vars,
            is_muon,
            config,
            adamw_lr_ratio,
            slots: HashMap::new(),
        })
    }

    /// The current hyperparameters.
    pub fn config(&self) -> &MuonConfig {
        &self.config
    }

    /// Names of the parameters updated by Muon (the others go to AdamW).
    pub fn muon_params(&self) -> Vec<&str> {
        self.vars
            .iter()
            .zip(&self.is_muon)
            .filter(|(_, &m)| m)
            .map(|(v, _)| v.name.as_str())
            .collect()
    }

    fn muon_group(
        &self,
        items: &[Item],
        decayed: Vec<Tensor>,
        slots: &mut Slots,
    ) -> Result<Vec<(usize, Tensor)>> {
        let cfg = &self.config;
        // Momentum per matrix, then one msign call per matrix-view shape.
        let mut groups: BTreeMap<(usize, usize), Vec<(usize, Tensor)>> = BTreeMap::new();
        for (pos, it) in items.iter().enumerate() {
            let k = key(&self.vars[it.index].name, MOMENTUM);
            let buf = slots
                .get(&k)
                .cloned()
                .map_or_else(|| it.grad.zeros_like(), Ok)?;
            let (update, buf) = muon_momentum(&it.grad, &buf, cfg.momentum, cfg.nesterov)?;
            slots.insert(k, buf);
            let rc = matrix_view(it.grad.dims()).expect("Muon items are matrices");
            groups
                .entry(rc)
                .or_default()
                .push((pos, update.reshape(rc)?));
        }
        let mut out = Vec::with_capacity(items.len());
        for ((rows, cols), members) in groups {
            let batch = Tensor::stack(&members.iter().map(|(_, u)| u).collect::<Vec<_>>(), 0)?;
            let ortho = msign(&batch, &cfg.newton_schulz)?;
            let lr = cfg.lr * cfg.lr_adjust.factor(rows, cols);
            for (i, (pos, _)) in members.iter().enumerate() {
                let it = &items[*pos];
                let step = (ortho.get(i)?.reshape(it.param.shape())? * lr)?;
                out.push((it.index, (&decayed[*pos] - step)?));
            }
        }
        Ok(out)
    }
}

impl Optimizer for Muon {
    type Config = MuonConfig;

    fn new(vars: Vec<Var>, config: MuonConfig) -> Result<Self> {
        Self::from_named(name_vars(vars), config)
    }

    fn step(&mut self, grads: &GradStore) -> Result<()> {
        let items = gather(&self.vars, grads)?;
        let (muon_items, adam_items): (Vec<Item>, Vec<Item>) =
            items.into_iter().partition(|it| self.is_muon[it.index]);
        let mut staged = self.slots.clone();
        let cfg = &self.config;
        let decayed = apply_decay(
            &self.vars,
            &muon_items,
            &cfg.weight_decay,
            false,
            cfg.lr,
            &mut staged,
        )?;
        let mut updates = self.muon_group(&muon_items, decayed, &mut staged)?;
        let a = &cfg.adamw;
        let decayed = apply_decay(
            &self.vars,
            &adam_items,
            &a.weight_decay,
            a.decay_vectors,
            a.lr,
            &mut staged,
        )?;
        updates.extend(adam_group(
            &self.vars,
            &adam_items,
            decayed,
            a.lr,
            a,
            &mut staged,
        )?);
        commit(&self.vars, updates)?;
        self.slots = staged;
        Ok(())
    }

    fn learning_rate(&self) -> f64 {
        self.config.lr
    }

    fn set_learning_rate(&mut self, lr: f64) {
        self.config.lr = lr;
        self.config.adamw.lr = lr * self.adamw_lr_ratio;
    }
}

fn text(s: &str) -> Result<Tensor> {
    Tensor::from_vec(s.as_bytes().to_vec(), s.len(), &Device::Cpu)
}

fn read_text(imp: &Imported, name: &str) -> Result<String> {
    let bytes = imp.tensor(name)?.to_vec1::<u8>()?;
    String::from_utf8(bytes).map_err(|_| invalid("checkpoint", format!("`{name}` is not UTF-8")))
}

impl OptimizerState for Muon {
    fn state_dict(&self) -> Result<HashMap<String, Tensor>> {
        let c = &self.config;
        let ns = &c.newton_schulz;
        let table: Vec<f64> = ns.coefficients().iter().flatten().copied().collect();
        let cdt = ns.compute_dtype().map(|d| d.as_str()).unwrap_or("");
        let mut hp = vec![
            ("lr".to_string(), scalar(c.lr)?),
            ("momentum".to_string(), scalar(c.momentum)?),
            ("nesterov".to_string(), scalar(c.nesterov as u8 as f64)?),
            (
                "ns_coefficients".to_string(),
                Tensor::from_vec(table, (ns.coefficients().len(), 3), &Device::Cpu)?,
            ),
            ("ns_eps".to_string(), scalar(ns.eps())?),
            ("ns_norm_scale".to_string(), scalar(ns.norm_scale())?),
            ("ns_compute_dtype".to_string(), text(cdt)?),
            (
                "lr_adjust".to_string(),
                Tensor::new(&c.lr_adjust.encode(), &Device::Cpu)?,
            ),
            ("weight_decay".to_string(), c.weight_decay.to_tensor()?),
            ("adamw_lr_ratio".to_string(), scalar(self.adamw_lr_ratio)?),
            ("adamw_names".to_string(), text(&c.adamw_names.join("\n"))?),
        ];
        hp.extend(c.adamw.hparams("adamw.")?);
        export(KIND, hp, &self.vars, &self.slots)
    }

    fn load_state_dict(&mut self, state: &HashMap<String, Tensor>) -> Result<()> {
        let vars = &self.vars;
        let is_muon = &self.is_muon;
        let spec = |i: usize, slot: &str| -> Option<(Vec<usize>, DType)> {
            match slot {
                SPECTRAL_V => spectral_v_spec(&vars[i]),
                MOMENTUM if is_muon[i] => {
                    Some((vars[i].var.dims().to_vec(), math_dtype(vars[i].var.dtype())))
                }
                EXP_AVG | EXP_AVG_SQ | STEP if !is_muon[i] => adam_slot_spec(&vars[i], slot),
                _ => None,
            }
        };
        let imp = import(
            KIND,
            vars,
            &[MOMENTUM, EXP_AVG, EXP_AVG_SQ, STEP, SPECTRAL_V],
            &spec,
            state,
        )?;
        let table = imp
            .tensor("ns_coefficients")?
            .to_dtype(DType::F64)?
            .to_vec2::<f64>()?;
        let table = table
            .into_iter()
            .map(|r| {
                <[f64; 3]>::try_from(r)
                    .map_err(|_| invalid("checkpoint: ns_coefficients", "rows must have 3 entries"))
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
        let names = read_text(&imp, "adamw_names")?;
        let config = MuonConfig {
            lr: imp.f64("lr")?,
            momentum: imp.f64("momentum")?,
            nesterov: imp.f64("nesterov")? != 0.0,
            newton_schulz: ns,
            lr_adjust: LrAdjust::decode(
                &imp.tensor("lr_adjust")?
                    .to_dtype(DType::F64)?
                    .to_vec1::<f64>()?,
            )?,
            weight_decay: WeightDecay::from_tensor(imp.tensor("weight_decay")?)?,
            adamw: AdamWConfig::from_hparams(&imp, "adamw.")?,
            adamw_names: names
                .split('\n')
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
        };
        config.validate()?;
        if config.adamw_names != self.config.adamw_names {
            fail!(
                "checkpoint: adamw_names",
                "routes {:?} to AdamW, this optimizer routes {:?}",
                config.adamw_names,
                self.config.adamw_names
            );
        }
        self.adamw_lr_ratio = imp.f64("adamw_lr_ratio")?;
        self.config = config;
        self.slots = imp.slots;
        Ok(())
    }
}
