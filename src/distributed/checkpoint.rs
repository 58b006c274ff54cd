//! One consistent checkpoint of a data-parallel optimizer, loadable at any
//! world size and by the single-process optimizer.
//!
//! # Layout
//!
//! A directory with
//!
//! - `rank-<r>-of-<N>.safetensors`, one per rank: [`crate::checkpoint::save`]
//!   of that rank's optimizer state dict — the header (identical on every
//!   rank: kind, hyperparameters, **all** parameter names) and the state of
//!   the parameters the rank owns (its driver keeps no other) — with the
//!   usual CRC-32 of the header and of every tensor;
//! - `manifest.json`, written by rank 0 after every rank has written its file:
//!   format, world size, the plan's fingerprint, and per rank the file name,
//!   the CRC-32 of the whole file and the parameters it owns.
//!
//! The manifest ties the files together: [`load_union`] refuses a file whose
//! bytes do not match the manifest's CRC-32, so files left from another save
//! (a crash between the rank files and the manifest) are never mixed; save
//! each checkpoint to a new directory to keep the previous one loadable
//! through a crash. Once the manifest is written, rank 0 removes the rank
//! files of other world sizes (`rank-<r>-of-<M>.safetensors`, `M ≠ N`) from
//! the directory: the manifest no longer lists them.
//!
//! # Loading
//!
//! [`load_union`] merges the rank files ([`crate::checkpoint::merge`]: one
//! header, disjoint parameters) into the state dict a single-process
//! optimizer would have written: `opt.load_state_dict(&load_union(dir)?)`
//! resumes a distributed run in one process. A data-parallel rank keeps
//! only the parameters it owns under its own plan
//! ([`DataParallel::load_state`](super::DataParallel::load_state), through
//! [`crate::checkpoint::restrict`]), so a checkpoint saved at 4 ranks loads
//! at 2 or 3, and a single-process file loads at any world size.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::collective::{Checked, Collective, ReduceOp};
use super::plan::Plan;
use crate::checkpoint::{load, merge, save, split_key, Header};
use crate::error::{fail, Error, Result};

/// The manifest's file name inside a checkpoint directory.
pub const MANIFEST: &str = "manifest.json";
/// The manifest's format name.
pub const MANIFEST_FORMAT: &str = "steepest-sharded-state";
/// The manifest's format version.
pub const MANIFEST_VERSION: u32 = 1;

/// The manifest of a sharded checkpoint (see the [module docs](self)).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_FORMAT`].
    pub format: String,
    /// [`MANIFEST_VERSION`].
    pub version: u32,
    /// Number of ranks that wrote it.
    pub world_size: usize,
    /// [`Plan::fingerprint`](super::Plan::fingerprint) of the writers' plan,
    /// in hex (informational: any plan can load it).
    pub plan_fingerprint: String,
    /// One entry per rank, in rank order.
    pub files: Vec<ManifestFile>,
}

/// One rank's file in a [`Manifest`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ManifestFile {
    /// The rank that wrote it.
    pub rank: usize,
    /// Its name inside the checkpoint directory.
    pub file: String,
    /// CRC-32 of the whole file, 8 hex digits.
    pub crc32: String,
    /// The parameters that rank owned (the file holds state for no others).
    pub params: Vec<String>,
}

/// The name of rank `rank`'s file in a checkpoint of `world` ranks.
pub fn rank_file(rank: usize, world: usize) -> String {
    format!("rank-{rank}-of-{world}.safetensors")
}

/// Writes this rank's `state` (its optimizer's state dict, or the error that
/// producing it gave) to `dir`, then — once every rank has written its file —
/// the manifest from rank 0. Collective (one all-reduce of one f32, one
/// all-gather of three f32 per rank, one broadcast of one); an error on any
/// rank is an error on every rank (naming the ranks), and then no manifest
/// is written. A rank whose `state` is an error stops every rank before
/// any file is written (the all-reduce), so a save refused for that reason
/// leaves a checkpoint already in `dir` as it was. `plan`: the ownership
/// plan (the same on every rank); `device`: where the communicator's
/// tensors live.
pub fn save_sharded<C: Collective>(
    comm: &C,
    device: &Device,
    plan: &Plan,
    state: Result<HashMap<String, Tensor>>,
    dir: &Path,
) -> Result<()> {
    let comm = &Checked(comm);
    let (rank, world) = (comm.rank(), comm.world_size());
    let who = format!("DataParallel::save_state (rank {rank})");
    let file = rank_file(rank, world);
    // Before any write: does every rank have its state? (A rank that has not
    // would fail the save after the others had overwritten their files.)
    let missing = Tensor::new(&[if state.is_ok() { 0f32 } else { 1f32 }], device)?;
    let missing = comm.all_reduce(&missing, ReduceOp::Sum)?.to_vec1::<f32>()?[0];
    if missing > 0.0 {
        let mut msg = format!("{missing} rank(s) could not produce their state; nothing written");
        if let Err(e) = &state {
            msg += &format!("; here: {e}");
        }
        return Err(Error::checkpoint(who, msg));
    }
    let local = state.and_then(|state| {
        std::fs::create_dir_all(dir).map_err(|e| {
            Error::checkpoint(dir.display().to_string(), format!("cannot create: {e}"))
        })?;
        let path = dir.join(&file);
        save(&state, &path)?;
        let bytes = std::fs::read(&path).map_err(|e| {
            Error::checkpoint(path.display().to_string(), format!("cannot read back: {e}"))
        })?;
        Ok(crc32fast::hash(&bytes))
    });
    // [ok, crc low 16 bits, crc high 16 bits]: exact in f32.
    let mine = match &local {
        Ok(crc) => [1f32, (crc & 0xffff) as f32, (crc >> 16) as f32],
        Err(_) => [0f32; 3],
    };
    let all = comm
        .all_gather(&Tensor::new(&mine, device)?)?
        .to_vec1::<f32>()?;
    let failed: Vec<usize> = (0..world).filter(|&r| all[3 * r] != 1.0).collect();
    if !failed.is_empty() {
        let mut msg =
            format!("writing the rank files failed on rank(s) {failed:?}; no manifest written");
        if let Err(e) = local {
            msg += &format!("; here: {e}");
        }
        return Err(Error::checkpoint(who, msg));
    }
    let mut status = 0f32;
    let mut here = None;
    if rank == 0 {
        let crcs: Vec<u32> = (0..world)
            .map(|r| all[3 * r + 1] as u32 | ((all[3 * r + 2] as u32) << 16))
            .collect();
        let written = write_manifest(dir, plan, &crcs);
        if let Err(e) = written {
            status = 1.0;
            here = Some(e);
        }
    }
    let status = comm
        .broadcast(&Tensor::new(&[status], device)?, 0)
        .and_then(|t| t.to_vec1::<f32>());
    let status = match status {
        Ok(s) => s[0],
        Err(e) => {
            // The other ranks may not learn of the manifest: take it back,
            // so that an error on any rank leaves none.
            if rank == 0 && here.is_none() {
                let _ = std::fs::remove_file(dir.join(MANIFEST));
            }
            return Err(e.into());
        }
    };
    if status != 0.0 {
        let mut msg = "writing the manifest failed on rank 0".to_string();
        if let Some(e) = here {
            msg += &format!(": {e}");
        }
        return Err(Error::checkpoint(who, msg));
    }
    if rank == 0 {
        remove_stale_rank_files(dir, world);
    }
    Ok(())
}

/// Removes the rank files of another world size from `dir`, once the new
/// manifest (which lists only this world size's files) is written: left
/// from an earlier save, they could not be loaded any more and would only
/// take space (a rank's optimizer state). Best effort: a file that cannot
/// be removed is left; other files are not touched.
fn remove_stale_rank_files(dir: &Path, world: usize) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if parse_rank_file(name).is_some_and(|(_, w)| w != world) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// `(rank, world)` of a name made by [`rank_file`].
fn parse_rank_file(name: &str) -> Option<(usize, usize)> {
    let rest = name.strip_prefix("rank-")?.strip_suffix(".safetensors")?;
    let (r, w) = rest.split_once("-of-")?;
    let (r, w): (usize, usize) = (r.parse().ok()?, w.parse().ok()?);
    (rank_file(r, w) == name).then_some((r, w))
}

/// Rank 0's part of [`save_sharded`]: the manifest, listing each rank's file,
/// its CRC-32 and the parameters it owns.
fn write_manifest(dir: &Path, plan: &Plan, crcs: &[u32]) -> Result<()> {
    let world = plan.world_size();
    let files = crcs
        .iter()
        .enumerate()
        .map(|(r, crc)| ManifestFile {
            rank: r,
            file: rank_file(r, world),
            crc32: format!("{crc:08x}"),
            params: plan
                .owned(r)
                .iter()
                .map(|&i| plan.specs()[i].name.clone())
                .collect(),
        })
        .collect();
    let manifest = Manifest {
        format: MANIFEST_FORMAT.into(),
        version: MANIFEST_VERSION,
        world_size: world,
        plan_fingerprint: format!("{:016x}", plan.fingerprint()),
        files,
    };
    let text = serde_json::to_string_pretty(&manifest).expect("the manifest encodes");
    let path = dir.join(MANIFEST);
    let tmp = dir.join(format!("{MANIFEST}.tmp"));
    let io = |e: std::io::Error| {
        Error::checkpoint(path.display().to_string(), format!("cannot write: {e}"))
    };
    // Synced before the rename and the directory after, as the rank files
    // (`checkpoint::save`): a power loss keeps the old manifest or the new.
    std::fs::File::create(&tmp)
        .and_then(|mut f| {
            std::io::Write::write_all(&mut f, text.as_bytes())?;
            f.sync_all()
        })
        .map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)?;
    crate::checkpoint::sync_dir_of(&path);
    Ok(())
}

/// Reads the manifest of the checkpoint directory `dir`.
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST);
    let who = path.display().to_string();
    let text = std::fs::read_to_string(&path)
        .map_err(|e| Error::checkpoint(&who, format!("cannot read: {e}")))?;
    let m: Manifest = serde_json::from_str(&text)
        .map_err(|e| Error::checkpoint(&who, format!("not a valid manifest: {e}")))?;
    if m.format != MANIFEST_FORMAT {
        fail!(
            Checkpoint,
            who,
            "format `{}` is not `{MANIFEST_FORMAT}`",
            m.format
        );
    }
    if m.version != MANIFEST_VERSION {
        fail!(
            Checkpoint,
            who,
            "manifest version {} (this version of steepest reads {MANIFEST_VERSION})",
            m.version
        );
    }
    let ranks: Vec<usize> = m.files.iter().map(|f| f.rank).collect();
    if m.world_size == 0 || ranks != (0..m.world_size).collect::<Vec<_>>() {
        fail!(
            Checkpoint,
            who,
            "lists rank files {ranks:?} for a world size of {}",
            m.world_size
        );
    }
    Ok(m)
}

/// The whole optimizer state of a checkpoint, as one state dict (what the
/// single-process optimizer would have written):
///
/// - `path` a directory with a [`MANIFEST`] ([`save_sharded`],
///   [`DataParallel::save_state`](super::DataParallel::save_state)): every
///   rank file is checked against the manifest's CRC-32 and its own
///   checksums, and the files are merged ([`crate::checkpoint::merge`]: one
///   header, each key from one file or equal in all);
/// - `path` a file: a single-process checkpoint ([`crate::checkpoint::load`]).
///
/// Load it into the single-process optimizer with `load_state_dict`; a
/// data-parallel rank restricts it to the parameters it owns.
pub fn load_union(path: impl AsRef<Path>) -> Result<HashMap<String, Tensor>> {
    let path = path.as_ref();
    if !path.is_dir() {
        return load(path);
    }
    let manifest = read_manifest(path)?;
    let mut dicts = Vec::with_capacity(manifest.files.len());
    for f in &manifest.files {
        let file = path.join(&f.file);
        let who = file.display().to_string();
        let bytes = std::fs::read(&file)
            .map_err(|e| Error::checkpoint(&who, format!("cannot read: {e}")))?;
        let crc = format!("{:08x}", crc32fast::hash(&bytes));
        if crc != f.crc32 {
            fail!(
                Checkpoint,
                who,
                "CRC-32 {crc} differs from the manifest's {} (a file from another save, or corrupted)",
                f.crc32
            );
        }
        let dict = load(&file)?;
        check_owned(&dict, &f.params, &who)?;
        dicts.push(dict);
    }
    merge(&dicts)
}

/// Refuses a rank file holding state of a parameter the manifest does not
/// list for that rank (e.g. another rank's file copied over it, its CRC-32
/// updated): merged, its parameters would silently start from scratch.
fn check_owned(dict: &HashMap<String, Tensor>, owned: &[String], who: &str) -> Result<()> {
    let header = Header::decode(dict)?;
    let names: Vec<&str> = header.params.iter().map(String::as_str).collect();
    for key in dict.keys() {
        if let Some((p, _)) = split_key(key, &names) {
            if !owned.iter().any(|o| o == names[p]) {
                fail!(
                    Checkpoint,
                    who,
                    "holds state of `{}` (key `{key}`), which the manifest does not list for \
                     this rank (a file from another rank or save?)",
                    names[p]
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_file_names_parse_back_and_nothing_else_does() {
        for (r, w) in [(0, 1), (3, 4), (12, 16)] {
            assert_eq!(parse_rank_file(&rank_file(r, w)), Some((r, w)));
        }
        for name in [
            "rank-01-of-2.safetensors",
            "rank-0-of-x.safetensors",
            "rank-0-of-2.safetensors.tmp",
            "xrank-0-of-2.safetensors",
            "rank--1-of-2.safetensors",
            "rank-0-of-+2.safetensors",
            "manifest.json",
        ] {
            assert_eq!(parse_rank_file(name), None, "{name}");
        }
    }
}
