//! train_lm over NCCL, the process side: which part this process plays
//! (its environment), and the launcher's children (their command, their
//! supervision). Apart from main.rs so that `tests/train_lm_launch.rs` can
//! test it without a GPU.

#![allow(dead_code)]

use std::ffi::OsString;
use std::path::Path;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};

/// How this process takes part in the runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Trains the runs itself: one process (`--ranks N` on the CPU: N
    /// in-process ranks per run).
    Local,
    /// `--ranks N --device cuda`: starts N copies of itself, one per GPU, and
    /// waits for them.
    Launcher,
    /// One of those copies (or a process started by another launcher): rank
    /// `RANK` of `WORLD_SIZE` over NCCL.
    NcclRank,
}

/// The role of a process run with `--device device --ranks ranks`, given its
/// environment (`env(name)`, `None` when unset): with `RANK` and an NCCL id
/// (`STEEPEST_NCCL_ID` or `STEEPEST_NCCL_ID_FILE`) it is a rank; otherwise
/// `--device cuda --ranks N > 1` launches N of them. A process that another
/// launcher started (`RANK` or `WORLD_SIZE` set) without an id is refused
/// when it would train with others: as a launcher itself, each of the N
/// processes would start N more and train the whole job, N times over.
pub fn role(device: &str, ranks: usize, env: impl Fn(&str) -> Option<String>) -> Result<Role> {
    let set = |k: &str| env(k).is_some();
    let id = set("STEEPEST_NCCL_ID") || set("STEEPEST_NCCL_ID_FILE");
    let world = env("WORLD_SIZE");
    let several = world
        .as_deref()
        .is_some_and(|w| w.trim().parse::<usize>().map_or(true, |w| w > 1));
    if device != "cuda" {
        return Ok(Role::Local);
    }
    if set("RANK") && id {
        return Ok(Role::NcclRank);
    }
    if (set("RANK") || world.is_some()) && (ranks > 1 || several) {
        bail!(
            "RANK or WORLD_SIZE is set (started by another launcher?) but neither \
             STEEPEST_NCCL_ID nor STEEPEST_NCCL_ID_FILE is: set STEEPEST_NCCL_ID_FILE to \
             a new path for this job in every process (see the README, \"Data-parallel \
             training\"), or unset RANK and WORLD_SIZE to let --ranks {ranks} start the ranks"
        );
    }
    Ok(if ranks > 1 {
        Role::Launcher
    } else {
        Role::Local
    })
}

/// The command of rank `rank` of `ranks`: `exe` with `args`, on GPU `rank`
/// (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`), joining the group of `id_hex`
/// (`STEEPEST_NCCL_ID`; an inherited `STEEPEST_NCCL_ID_FILE` removed). On
/// Linux the rank is killed when the thread that started it ends: a
/// launcher killed by a signal or a scheduler takes its ranks with it
/// instead of leaving them waiting in NCCL, holding their GPUs.
pub fn rank_command(
    exe: &Path,
    args: &[OsString],
    rank: usize,
    ranks: usize,
    id_hex: &str,
) -> Command {
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .env("RANK", rank.to_string())
        .env("WORLD_SIZE", ranks.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("STEEPEST_NCCL_ID", id_hex)
        .env_remove("STEEPEST_NCCL_ID_FILE");
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: between fork and exec only async-signal-safe calls:
        // prctl and getppid.
        let parent = std::process::id() as libc::pid_t;
        unsafe {
            cmd.pre_exec(move || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // The launcher may have died before prctl took effect.
                if libc::getppid() != parent {
                    libc::_exit(1);
                }
                Ok(())
            });
        }
    }
    cmd
}

/// How long [`supervise`] lets the other ranks finish after one failed
/// before stopping them: a failure every rank sees (a diverged loss is
/// averaged over the ranks) ends them all at once, and rank 0 then writes
/// the outputs of the runs finished before it; a rank waiting in NCCL for a
/// failed one never ends by itself.
pub const GRACE: Duration = Duration::from_secs(20);

/// Waits for the ranks (`children[r]` is rank `r`). When one fails, the
/// others get `grace` to end by themselves and are then killed. The error
/// names rank 0's failure when rank 0 failed (it speaks for the group),
/// else the first one seen, and lists the other failed and the stopped
/// ranks. When waiting on a child fails, every child is killed.
pub fn supervise(children: Vec<Child>, grace: Duration) -> Result<()> {
    let mut slots: Vec<Option<Child>> = children.into_iter().map(Some).collect();
    let mut failed: Vec<(usize, ExitStatus)> = Vec::new();
    let mut stopped: Vec<usize> = Vec::new();
    let mut deadline: Option<Instant> = None;
    let kill_all = |slots: &mut Vec<Option<Child>>| -> Vec<usize> {
        let mut killed = Vec::new();
        for (r, slot) in slots.iter_mut().enumerate() {
            if let Some(c) = slot.as_mut() {
                let _ = c.kill();
                let _ = c.wait();
                killed.push(r);
            }
            *slot = None;
        }
        killed
    };
    loop {
        let mut running = 0;
        for r in 0..slots.len() {
            let Some(c) = slots[r].as_mut() else { continue };
            match c.try_wait() {
                Ok(None) => running += 1,
                Ok(Some(status)) => {
                    if !status.success() {
                        failed.push((r, status));
                    }
                    slots[r] = None;
                }
                Err(e) => {
                    kill_all(&mut slots);
                    bail!("waiting for rank {r}: {e}; every rank was stopped");
                }
            }
        }
        if !failed.is_empty() && deadline.is_none() {
            deadline = Some(Instant::now() + grace);
        }
        if running == 0 {
            break;
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            stopped = kill_all(&mut slots);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let Some(&(r, status)) = failed.iter().find(|(r, _)| *r == 0).or(failed.first()) else {
        return Ok(());
    };
    let mut msg = format!("rank {r} failed ({status})");
    let others: Vec<usize> = failed.iter().map(|f| f.0).filter(|&o| o != r).collect();
    if !others.is_empty() {
        msg += &format!("; rank(s) {others:?} failed too");
    }
    if !stopped.is_empty() {
        msg += &format!(
            "; rank(s) {stopped:?} were still running {}s later and were stopped",
            grace.as_secs_f64()
        );
    }
    bail!("{msg}")
}
