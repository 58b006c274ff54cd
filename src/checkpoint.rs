//! Saving and loading optimizer state.
//!
//! A state dict maps names to tensors:
//! - `__steepest__`: a `u8` tensor holding one JSON header — format name and
//!   version, the kind of object that wrote it (`adamw`, `muon`, …), the
//!   parameter names, and the hyperparameters and structure (partitions,
//!   transforms) as written by the owner;
//! - `<param>.<transform>.<field>` for each piece of per-parameter state
//!   (e.g. `fc1.weight.adam.exp_avg`); step counters are `i64` scalars;
//! - `<param>.master_weight`: the f32 master weight of a bf16/f16
//!   parameter ([`Driver::with_master_weights`](crate::optim::Driver::with_master_weights)).
//!
//! In a file ([`save`], [`OptimizerState::save_state`]) the header travels in
//! the safetensors metadata (`steepest`, with its CRC-32 in
//! `steepest.header.crc32`), beside a CRC-32 of every tensor's bytes
//! (`steepest.crc32`), so a truncated or corrupted file is refused; the
//! file is written to a temporary name, synced to disk and renamed (the
//! directory synced after), so a crash or power loss mid-write leaves the
//! old file. Files from before format 2 (`__steepest__.kind`
//! entries) and files from elsewhere are refused with a clear error.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{fail, Error, Result};

/// The key of the header in a state dict.
pub const HEADER_KEY: &str = "__steepest__";
/// The format name in the header.
pub const FORMAT: &str = "steepest-state";
/// The current format version (1 was the `__steepest__.kind` layout).
pub const VERSION: u32 = 2;
const META_HEADER: &str = "steepest";
const META_CRC: &str = "steepest.crc32";
const META_HEADER_CRC: &str = "steepest.header.crc32";

/// An object whose state (moments, step counters, `v₁` vectors, dual
/// variables, hyperparameters) can be saved and restored.
///
/// Loading validates the whole checkpoint first (format, kind, parameter
/// names, structure, each tensor's shape and dtype) and changes nothing if
/// anything is off. Hyperparameters are restored from the checkpoint; call
/// `set_learning_rate` afterwards to override the learning rate.
pub trait OptimizerState {
    /// The state as named tensors (copies, on the CPU). Refused
    /// ([`Error::Config`]) while the learning rate is NaN, ±Inf or negative,
    /// since no load would take such a checkpoint: set a valid rate first.
    fn state_dict(&self) -> Result<HashMap<String, Tensor>>;

    /// Restores the state from [`OptimizerState::state_dict`]'s output.
    fn load_state_dict(&mut self, state: &HashMap<String, Tensor>) -> Result<()>;

    /// Writes [`OptimizerState::state_dict`] to a safetensors file, with
    /// checksums (see [`save`]); refused, writing nothing, when
    /// `state_dict` is.
    fn save_state<P: AsRef<Path>>(&self, path: P) -> Result<()> {
        save(&self.state_dict()?, path)
    }

    /// Reads a file written by [`OptimizerState::save_state`] (verifying
    /// its checksums) and loads it.
    fn load_state<P: AsRef<Path>>(&mut self, path: P) -> Result<()> {
        let state = load(path)?;
        self.load_state_dict(&state)
    }
}

/// The header of a state dict.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub(crate) struct Header {
    pub format: String,
    pub version: u32,
    pub kind: String,
    pub params: Vec<String>,
    pub body: serde_json::Value,
    /// How bare variables (`param.<i>`) were numbered: `"creation"` (their
    /// creation order). Absent in files written before that rule, which
    /// numbered them in the order given (see [`Header::check_params`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bare_names: Option<String>,
}

/// The numbering rule of bare variables' names recorded in new headers.
const BARE_NAMES: &str = "creation";

/// Whether `params` are the names `Optimizer::new` gives bare variables:
/// exactly `param.0`, …, `param.{n−1}` (a user's own name that merely looks
/// like one does not make a checkpoint a bare-variable one).
fn are_bare_names(params: &[String]) -> bool {
    let mut seen = vec![false; params.len()];
    !params.is_empty()
        && params.iter().all(|p| {
            match p
                .strip_prefix("param.")
                .and_then(|i| i.parse::<usize>().ok())
            {
                Some(i) if i < seen.len() && !seen[i] && p == &format!("param.{i}") => {
                    seen[i] = true;
                    true
                }
                _ => false,
            }
        })
}

impl Header {
    pub fn new(kind: &str, params: Vec<String>, body: serde_json::Value) -> Self {
        Self {
            format: FORMAT.into(),
            version: VERSION,
            kind: kind.into(),
            bare_names: are_bare_names(&params).then(|| BARE_NAMES.to_string()),
            params,
            body,
        }
    }

    /// The header as the `u8` tensor stored under [`HEADER_KEY`].
    pub fn to_tensor(&self) -> Result<Tensor> {
        let text = serde_json::to_string(self)
            .map_err(|e| Error::checkpoint(HEADER_KEY, format!("cannot encode: {e}")))?;
        let n = text.len();
        Ok(Tensor::from_vec(text.into_bytes(), n, &Device::Cpu)?)
    }

    /// Reads and checks the header of `state`: the format, the version and
    /// that `kind` wrote it.
    pub fn read(state: &HashMap<String, Tensor>, kind: &str) -> Result<Self> {
        let h = Self::decode(state)?;
        if h.kind != kind {
            fail!(
                Checkpoint,
                "checkpoint",
                "written by `{}`, cannot load into `{kind}`",
                h.kind
            );
        }
        Ok(h)
    }

    /// Reads and checks the header of `state` (format and version), whoever
    /// wrote it.
    pub fn decode(state: &HashMap<String, Tensor>) -> Result<Self> {
        let Some(t) = state.get(HEADER_KEY) else {
            if state.keys().any(|k| k.starts_with("__steepest__.")) {
                fail!(
                    Checkpoint,
                    "checkpoint",
                    "written by steepest 0.1 (format 1, `__steepest__.kind` entries); this \
                     version reads format {VERSION}: the old state cannot be resumed"
                );
            }
            fail!(
                Checkpoint,
                "checkpoint",
                "no `{HEADER_KEY}` header: not a steepest optimizer checkpoint"
            );
        };
        if t.dtype() != DType::U8 || t.rank() != 1 {
            fail!(Checkpoint, HEADER_KEY, "must be a u8 byte string");
        }
        let bytes = t.to_vec1::<u8>()?;
        let h: Header = serde_json::from_slice(&bytes)
            .map_err(|e| Error::checkpoint(HEADER_KEY, format!("not a valid header: {e}")))?;
        if h.format != FORMAT {
            fail!(
                Checkpoint,
                HEADER_KEY,
                "format `{}` is not `{FORMAT}`",
                h.format
            );
        }
        if h.version != VERSION {
            fail!(
                Checkpoint,
                HEADER_KEY,
                "format version {} (this version of steepest reads version {VERSION})",
                h.version
            );
        }
        Ok(h)
    }

    /// Errors unless the header lists exactly `names`, and, for bare
    /// variables, unless they were numbered by the current rule.
    pub fn check_params<'a>(&self, names: impl Iterator<Item = &'a str>) -> Result<()> {
        if self.bare_names.as_deref() != Some(BARE_NAMES) && are_bare_names(&self.params) {
            fail!(
                Checkpoint,
                "checkpoint",
                "its bare variables (`param.<i>`, from `Optimizer::new`) were numbered in the \
                 order given, by an earlier steepest; this version numbers them in creation \
                 order, and `VarMap::all_vars()` gives a different order in every run, so the \
                 state cannot be matched to the variables reliably. Start the optimizer state \
                 afresh (the model's weights are not in this file), and build the optimizer \
                 with `from_varmap` to key it by name"
            );
        }
        let theirs: BTreeSet<&str> = self.params.iter().map(|s| s.as_str()).collect();
        let ours: BTreeSet<&str> = names.collect();
        if theirs != ours {
            let missing: Vec<_> = ours.difference(&theirs).collect();
            let extra: Vec<_> = theirs.difference(&ours).collect();
            let mut what = Vec::new();
            if !missing.is_empty() {
                what.push(format!("missing from checkpoint {missing:?}"));
            }
            if !extra.is_empty() {
                what.push(format!("not in this optimizer {extra:?}"));
            }
            fail!(
                Checkpoint,
                "checkpoint",
                "parameter names do not match this optimizer's: {}",
                what.join(", ")
            );
        }
        Ok(())
    }

    /// A field of the body, decoded.
    pub fn field<T: serde::de::DeserializeOwned>(&self, name: &str) -> Result<T> {
        let v = self
            .body
            .get(name)
            .ok_or_else(|| Error::checkpoint(HEADER_KEY, format!("missing `{name}`")))?;
        serde_json::from_value(v.clone())
            .map_err(|e| Error::checkpoint(format!("{HEADER_KEY}: {name}"), e.to_string()))
    }
}

/// Splits `key` into `(parameter index, rest)` where `names[index]` is the
/// parameter and `key = "<name>.<rest>"`; the longest matching name wins
/// (names may contain dots). `None` when no name matches.
pub(crate) fn split_key<'k>(key: &'k str, names: &[&str]) -> Option<(usize, &'k str)> {
    names
        .iter()
        .enumerate()
        .filter_map(|(i, n)| Some((i, key.strip_prefix(n)?.strip_prefix('.')?, n.len())))
        .max_by_key(|&(_, _, len)| len)
        .map(|(i, rest, _)| (i, rest))
}

/// Merges state dicts that share one header into one: e.g. the per-rank
/// files of a data-parallel optimizer, each holding the state of the
/// parameters its rank owns ([`crate::distributed::DataParallel::save_state`]).
///
/// Every dict must have a header, and the headers must be identical (the
/// same optimizer, hyperparameters and parameter list). A key present in
/// several dicts must hold the same tensor in each (dtype, shape and bytes:
/// e.g. a schedule's step counter, which every rank writes); two different
/// values for one key are refused. Errors name the key.
pub fn merge(dicts: &[HashMap<String, Tensor>]) -> Result<HashMap<String, Tensor>> {
    let Some(first) = dicts.first() else {
        fail!(Checkpoint, "checkpoint::merge", "no state dicts to merge");
    };
    let header = Header::decode(first)?;
    let mut out: HashMap<String, Tensor> = HashMap::new();
    for (i, d) in dicts.iter().enumerate() {
        let h = Header::decode(d)?;
        if h != header {
            fail!(
                Checkpoint,
                HEADER_KEY,
                "state dict {i} has another header than state dict 0 (written by another \
                 optimizer, with other hyperparameters or at another time)"
            );
        }
        for (k, t) in d {
            match out.get(k) {
                None => {
                    out.insert(k.clone(), t.clone());
                }
                Some(prev) => {
                    if !same_tensor(prev, t)? {
                        fail!(
                            Checkpoint,
                            k,
                            "state dicts 0..{i} and {i} hold different values for this key"
                        );
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Whether two tensors have the same dtype, shape and bytes.
fn same_tensor(a: &Tensor, b: &Tensor) -> Result<bool> {
    use safetensors::View;
    if a.dtype() != b.dtype() || a.dims() != b.dims() {
        return Ok(false);
    }
    let (a, b) = (a.to_device(&Device::Cpu)?, b.to_device(&Device::Cpu)?);
    Ok(a.data() == b.data())
}

/// The part of a state dict that concerns the parameters `keep`: the header,
/// every `<param>.<transform>.<field>` entry of a parameter in `keep` (names
/// matched against the header's parameter list, the longest matching name
/// first, as loading does), and every entry that belongs to no parameter of
/// the header (e.g. a schedule's step counter). Loading the result into an
/// optimizer leaves the parameters outside `keep` without state, as if they
/// had never been stepped — how a data-parallel rank keeps only the state of
/// the parameters it owns. Errors on a name in `keep` that the header does
/// not list.
pub fn restrict(state: &HashMap<String, Tensor>, keep: &[&str]) -> Result<HashMap<String, Tensor>> {
    let header = Header::decode(state)?;
    let names: Vec<&str> = header.params.iter().map(|s| s.as_str()).collect();
    let mut wanted = vec![false; names.len()];
    for k in keep {
        match names.iter().position(|n| n == k) {
            Some(i) => wanted[i] = true,
            None => fail!(
                Checkpoint,
                k,
                "not a parameter of this checkpoint (it lists {} parameters)",
                names.len()
            ),
        }
    }
    Ok(state
        .iter()
        .filter(|(k, _)| match split_key(k, &names) {
            Some((p, _)) => wanted[p],
            None => true,
        })
        .map(|(k, t)| (k.clone(), t.clone()))
        .collect())
}

/// The per-parameter tensors of a state dict (every key but the header),
/// checked before anything is kept: each key is `<name>.<slot>` for one of
/// `names` and a slot that `keeps` accepts for that parameter, and the
/// tensor has the shape and dtype `expect` gives for it. Returned by
/// (parameter index, slot), copied onto the device `expect` gives; `owner`
/// ("this average") names what reads them in errors.
pub(crate) fn read_slots(
    state: &HashMap<String, Tensor>,
    names: &[&str],
    owner: &str,
    keeps: impl Fn(usize, &str) -> bool,
    expect: impl Fn(usize) -> (Vec<usize>, DType, Device),
) -> Result<HashMap<(usize, String), Tensor>> {
    let mut found = HashMap::new();
    for (key, t) in state {
        if key == HEADER_KEY {
            continue;
        }
        let Some((p, slot)) = split_key(key, names) else {
            fail!(Checkpoint, key, "not a `<parameter>.<slot>` key of {owner}");
        };
        if !keeps(p, slot) {
            fail!(Checkpoint, key, "{owner} keeps no `{slot}` state");
        }
        let (dims, dt, device) = expect(p);
        if t.dims() != dims.as_slice() || t.dtype() != dt {
            fail!(
                Checkpoint,
                key,
                "checkpoint has shape {:?} dtype {:?}, expected shape {dims:?} dtype {dt:?}",
                t.dims(),
                t.dtype()
            );
        }
        found.insert((p, slot.to_string()), t.to_device(&device)?.copy()?);
    }
    Ok(found)
}

/// A detached copy of `t` on the CPU (state dicts never share storage with
/// live state, which later steps overwrite in place).
pub(crate) fn host_copy(t: &Tensor) -> Result<Tensor> {
    let t = t.detach();
    Ok(if t.device().is_cpu() {
        t.copy()?
    } else {
        t.to_device(&Device::Cpu)?
    })
}

/// A scalar step counter as a checkpoint tensor.
pub(crate) fn count_tensor(n: u64) -> Result<Tensor> {
    Ok(Tensor::new(n as i64, &Device::Cpu)?)
}

/// Reads a step counter written by [`count_tensor`].
pub(crate) fn read_count(key: &str, t: &Tensor) -> Result<u64> {
    if t.dtype() != DType::I64 || t.rank() != 0 {
        fail!(
            Checkpoint,
            key,
            "must be an i64 scalar (a step counter), got shape {:?} dtype {:?}",
            t.dims(),
            t.dtype()
        );
    }
    match t.to_scalar::<i64>()? {
        n if n >= 0 => Ok(n as u64),
        n => fail!(Checkpoint, key, "a step counter must be ≥ 0, got {n}"),
    }
}

/// Writes a state dict to a safetensors file: the header in the metadata,
/// a CRC-32 of each tensor's bytes beside it. Written to `<path>.tmp` (the
/// whole name with `.tmp` appended), then renamed over `path`, so that a
/// failed write leaves an earlier file at `path` as it was (the temporary
/// file is removed).
pub fn save<P: AsRef<Path>>(state: &HashMap<String, Tensor>, path: P) -> Result<()> {
    let path = path.as_ref();
    let mut meta = HashMap::new();
    let mut tensors: BTreeMap<&str, Tensor> = BTreeMap::new();
    for (k, t) in state {
        if k == HEADER_KEY {
            let bytes = t.to_vec1::<u8>().map_err(|_| {
                Error::checkpoint(
                    HEADER_KEY,
                    format!(
                        "must be a 1-D u8 tensor, got {:?} {:?}",
                        t.dtype(),
                        t.dims()
                    ),
                )
            })?;
            let text = String::from_utf8(bytes)
                .map_err(|_| Error::checkpoint(HEADER_KEY, "is not UTF-8"))?;
            meta.insert(
                META_HEADER_CRC.to_string(),
                format!("{:08x}", crc32fast::hash(text.as_bytes())),
            );
            meta.insert(META_HEADER.to_string(), text);
        } else {
            tensors.insert(k, t.to_device(&Device::Cpu)?);
        }
    }
    let mut crcs = BTreeMap::new();
    for (k, t) in &tensors {
        crcs.insert(k.to_string(), format!("{:08x}", crc32(t)?));
    }
    meta.insert(
        META_CRC.to_string(),
        serde_json::to_string(&crcs).expect("a string map encodes"),
    );
    // A missing directory named as such (safetensors' own error names the
    // temporary file it tried, not `path`).
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        let problem = match std::fs::metadata(dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Some("does not exist"),
            Ok(m) if !m.is_dir() => Some("is not a directory"),
            _ => None,
        };
        if let Some(problem) = problem {
            fail!(
                Checkpoint,
                path.display(),
                "cannot write: the directory {} {problem}",
                dir.display()
            );
        }
    }
    // `<path>.tmp`, not `with_extension`: that would give `m.bin` and `m.pt`
    // the same temporary file.
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = std::path::PathBuf::from(tmp);
    // The data reaches the disk before the rename does (fsync of the file,
    // then of the directory holding the new name): otherwise a power loss
    // could keep the rename and lose the data, and `path` would be empty or
    // truncated with the previous checkpoint gone.
    let written =
        safetensors::serialize_to_file(tensors.iter().map(|(k, t)| (*k, t)), Some(meta), &tmp)
            .map_err(|e| e.to_string())
            .and_then(|()| {
                std::fs::File::open(&tmp)
                    .and_then(|f| f.sync_all())
                    .map_err(|e| format!("syncing {}: {e}", tmp.display()))
            })
            .and_then(|()| std::fs::rename(&tmp, path).map_err(|e| e.to_string()))
            .map(|()| sync_dir_of(path));
    written.map_err(|e| {
        std::fs::remove_file(&tmp).ok();
        Error::checkpoint(path.display().to_string(), format!("cannot write: {e}"))
    })
}

/// Best effort: fsyncs the directory holding `path`, so that a rename into
/// it survives a power loss (Unix; elsewhere a directory cannot be opened
/// for this, and nothing is done).
pub(crate) fn sync_dir_of(path: &Path) {
    #[cfg(unix)]
    {
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        if let Ok(d) = std::fs::File::open(dir) {
            d.sync_all().ok();
        }
    }
    #[cfg(not(unix))]
    let _ = path;
}

/// The CRC-32 of a CPU tensor's little-endian bytes.
fn crc32(t: &Tensor) -> Result<u32> {
    use safetensors::View;
    Ok(crc32fast::hash(&t.data()))
}

/// Reads a file written by [`save`], verifying every tensor's checksum.
/// Errors (naming the file and the key) on a truncated file, a checksum
/// mismatch, a missing or extra checksum, or a file from elsewhere.
pub fn load<P: AsRef<Path>>(path: P) -> Result<HashMap<String, Tensor>> {
    let path = path.as_ref();
    let who = path.display().to_string();
    if path.is_dir() {
        let sharded = path
            .join(crate::distributed::checkpoint::MANIFEST)
            .is_file();
        fail!(
            Checkpoint,
            who,
            "is a directory, not a checkpoint file{}",
            if sharded {
                " (a data-parallel checkpoint: load it with `DataParallel::load_state`, or \
                 into one process with `distributed::load_union(dir)` and `load_state_dict`)"
            } else {
                ""
            }
        );
    }
    let bytes =
        std::fs::read(path).map_err(|e| Error::checkpoint(&who, format!("cannot read: {e}")))?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(|e| {
        Error::checkpoint(
            &who,
            format!("not a readable safetensors file (truncated?): {e}"),
        )
    })?;
    let (_, metadata) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| Error::checkpoint(&who, format!("unreadable metadata: {e}")))?;
    let meta = metadata.metadata().clone().unwrap_or_default();
    let Some(header) = meta.get(META_HEADER) else {
        if st.names().iter().any(|n| n.starts_with("__steepest__.")) {
            fail!(
                Checkpoint,
                who,
                "written by steepest 0.1 (format 1, no checksums); this version reads format \
                 {VERSION}: the old state cannot be resumed"
            );
        }
        fail!(
            Checkpoint,
            who,
            "no steepest header in the metadata: not a steepest checkpoint"
        );
    };
    let header_crc = format!("{:08x}", crc32fast::hash(header.as_bytes()));
    match meta.get(META_HEADER_CRC) {
        Some(want) if *want == header_crc => {}
        Some(want) => fail!(
            Checkpoint,
            HEADER_KEY,
            "checksum mismatch in {who} (stored {want}, header gives {header_crc}): the file is corrupted"
        ),
        None => fail!(Checkpoint, HEADER_KEY, "no header checksum in {who}"),
    }
    let crcs: BTreeMap<String, String> = meta
        .get(META_CRC)
        .and_then(|s| serde_json::from_str(s).ok())
        .ok_or_else(|| Error::checkpoint(&who, "no checksums in the metadata"))?;
    let mut seen = BTreeSet::new();
    for (name, view) in st.iter() {
        let Some(want) = crcs.get(name) else {
            fail!(Checkpoint, name, "in {who} without a checksum");
        };
        let got = format!("{:08x}", crc32fast::hash(view.data()));
        if &got != want {
            fail!(
                Checkpoint,
                name,
                "checksum mismatch in {who} (stored {want}, bytes give {got}): the file is corrupted"
            );
        }
        seen.insert(name.to_string());
    }
    if let Some(missing) = crcs.keys().find(|k| !seen.contains(*k)) {
        fail!(Checkpoint, missing, "listed in {who} but missing from it");
    }
    let mut state = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .map_err(|e| Error::checkpoint(&who, format!("cannot be read: {e}")))?;
    let n = header.len();
    state.insert(
        HEADER_KEY.to_string(),
        Tensor::from_vec(header.as_bytes().to_vec(), n, &Device::Cpu)?,
    );
    Ok(state)
}
