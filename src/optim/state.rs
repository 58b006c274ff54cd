//! Saving and loading optimizer state as safetensors, keyed `"<param name>.<slot>"`.
//!
//! Besides the per-parameter slots, a checkpoint holds `__steepest__.kind`
//! (which optimizer wrote it), `__steepest__.params` (the parameter names, so
//! a checkpoint of another model is refused) and the hyperparameters as f64
//! scalars `__steepest__.<kind>.<name>`.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Result, Tensor};

use super::params::NamedVar;
use crate::error::{fail, invalid};

const META: &str = "__steepest__";

/// An optimizer whose state (moments, step counters, `v₁` vectors, dual
/// variables, hyperparameters) can be saved and restored.
///
/// Loading validates the whole checkpoint first (optimizer kind, parameter
/// names, slot shapes and dtypes) and changes nothing if anything is off.
/// Hyperparameters are restored from the checkpoint; call
/// `set_learning_rate` afterwards to override the learning rate.
pub trait OptimizerState {
    /// The state as named tensors (on the CPU).
    fn state_dict(&self) -> Result<HashMap<String, Tensor>>;

    /// Restores the state from [`OptimizerState::state_dict`]'s output.
    fn load_state_dict(&mut self, state: &HashMap<String, Tensor>) -> Result<()>;

    /// Writes [`OptimizerState::state_dict`] to a safetensors file.
    fn save_state<P: AsRef<Path>>(&self, path: P) -> Result<()> {
        candle_core::safetensors::save(&self.state_dict()?, path)
    }

    /// Reads a safetensors file written by [`OptimizerState::save_state`].
    fn load_state<P: AsRef<Path>>(&mut self, path: P) -> Result<()> {
        let state = candle_core::safetensors::load(path, &Device::Cpu)?;
        self.load_state_dict(&state)
    }
}

/// Per-parameter state tensors, keyed `"<name>.<slot>"`.
pub(crate) type Slots = HashMap<String, Tensor>;

/// The key of `slot` for parameter `name`.
pub(crate) fn key(name: &str, slot: &str) -> String {
    format!("{name}.{slot}")
}

fn text_tensor(s: &str) -> Result<Tensor> {
    Tensor::from_vec(s.as_bytes().to_vec(), s.len(), &Device::Cpu)
}

fn tensor_text(t: &Tensor, what: &str) -> Result<String> {
    if t.dtype() != DType::U8 || t.rank() != 1 {
        fail!("checkpoint", "{what} is not a byte string");
    }
    String::from_utf8(t.to_vec1::<u8>()?)
        .map_err(|_| invalid("checkpoint", format!("{what} is not UTF-8")))
}

/// Builds a state dict: meta entries, hyperparameters and slots (moved to CPU).
pub(crate) fn export(
    kind: &str,
    hparams: Vec<(String, Tensor)>,
    vars: &[NamedVar],
    slots: &Slots,
) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    out.insert(format!("{META}.kind"), text_tensor(kind)?);
    let names: Vec<&str> = vars.iter().map(|v| v.name.as_str()).collect();
    out.insert(format!("{META}.params"), text_tensor(&names.join("\n"))?);
    for (name, t) in hparams {
        out.insert(format!("{META}.{kind}.{name}"), t.to_device(&Device::Cpu)?);
    }
    for (k, t) in slots {
        out.insert(k.clone(), t.to_device(&Device::Cpu)?);
    }
    Ok(out)
}

/// A scalar f64 hyperparameter tensor.
pub(crate) fn scalar(x: f64) -> Result<Tensor> {
    Tensor::new(x, &Device::Cpu)
}

/// What [`import`] found: hyperparameters by short name, and validated slots
/// moved to their parameters' devices.
pub(crate) struct Imported {
    pub hparams: HashMap<String, Tensor>,
    pub slots: Slots,
}

impl Imported {
    /// A scalar hyperparameter.
    pub fn f64(&self, name: &str) -> Result<f64> {
        let t = self.tensor(name)?;
        t.to_dtype(DType::F64)?.to_scalar::<f64>()
    }

    /// A hyperparameter tensor.
    pub fn tensor(&self, name: &str) -> Result<&Tensor> {
        self.hparams
            .get(name)
            .ok_or_else(|| invalid("checkpoint", format!("missing hyperparameter `{name}`")))
    }
}

/// The expected `(shape, dtype)` of `slot` for a parameter, or `None` when the
/// optimizer keeps no such slot for it.
pub(crate) type SlotSpec<'a> = dyn Fn(usize, &str) -> Option<(Vec<usize>, DType)> + 'a;

/// Validates a state dict against this optimizer's kind, parameters and slot
/// shapes; errors name the offending key. Nothing is changed here.
pub(crate) fn import(
    kind: &str,
    vars: &[NamedVar],
    slot_names: &[&str],
    spec: &SlotSpec<'_>,
    state: &HashMap<String, Tensor>,
) -> Result<Imported> {
    let found_kind = state.get(&format!("{META}.kind")).ok_or_else(|| {
        invalid(
            "checkpoint",
            format!("no `{META}.kind` entry: not a steepest optimizer checkpoint"),
        )
    })?;
    let found_kind = tensor_text(found_kind, "kind")?;
    if found_kind != kind {
        fail!(
            "checkpoint",
            "written by a `{found_kind}` optimizer, cannot load into `{kind}`"
        );
    }
    let names = state
        .get(&format!("{META}.params"))
        .ok_or_else(|| invalid("checkpoint", format!("no `{META}.params` entry")))?;
    let names = tensor_text(names, "params")?;
    let theirs: BTreeSet<&str> = names.split('\n').filter(|s| !s.is_empty()).collect();
    let ours: BTreeSet<&str> = vars.iter().map(|v| v.name.as_str()).collect();
    if theirs != ours {
        let missing: Vec<_> = ours.difference(&theirs).collect();
        let extra: Vec<_> = theirs.difference(&ours).collect();
        fail!(
            "checkpoint",
            "parameter names do not match this optimizer's: missing from checkpoint {missing:?}, not in this optimizer {extra:?}"
        );
    }
    let index: HashMap<&str, usize> = vars
        .iter()
        .enumerate()
        .map(|(i, v)| (v.name.as_str(), i))
        .collect();
    let hp_prefix = format!("{META}.{kind}.");
    let mut imported = Imported {
        hparams: HashMap::new(),
        slots: HashMap::new(),
    };
    for (k, t) in state {
        if let Some(hp) = k.strip_prefix(&hp_prefix) {
            imported.hparams.insert(hp.to_string(), t.clone());
            continue;
        }
        if k.starts_with(META) {
            if k == &format!("{META}.kind") || k == &format!("{META}.params") {
                continue;
            }
            fail!(k, "unknown checkpoint metadata entry");
        }
        let parsed = slot_names.iter().find_map(|slot| {
            let name = k.strip_suffix(slot)?.strip_suffix('.')?;
            index.get(name).map(|&i| (i, *slot))
        });
        let Some((i, slot)) = parsed else {
            fail!(
                k,
                "not a `<parameter>.<slot>` key of this optimizer (slots: {slot_names:?})"
            );
        };
        let Some((shape, dtype)) = spec(i, slot) else {
            fail!(
                k,
                "this optimizer keeps no `{slot}` state for this parameter"
            );
        };
        if t.dims() != shape.as_slice() || t.dtype() != dtype {
            fail!(
                k,
                "checkpoint has shape {:?} dtype {:?}, expected shape {shape:?} dtype {dtype:?}",
                t.dims(),
                t.dtype()
            );
        }
        // Integer counters stay on the host; tensors go to their parameter's device.
        let t = if dtype == DType::I64 {
            t.to_device(&Device::Cpu)?
        } else {
            t.to_device(vars[i].var.device())?
        };
        imported.slots.insert(k.clone(), t);
    }
    Ok(imported)
}
