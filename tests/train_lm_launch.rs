//! train_lm's NCCL launcher without a GPU: the role a process plays given
//! its environment, the ranks' commands, and the supervision of the ranks
//! (shell commands stand in for them).

#![cfg(unix)]

#[path = "../examples/train_lm/launch.rs"]
mod launch;

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::Path;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use launch::{rank_command, role, supervise, Role};

/// `role` with exactly the variables `vars` set.
fn role_with(device: &str, ranks: usize, vars: &[(&str, &str)]) -> Result<Role, String> {
    let env: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    role(device, ranks, |k| env.get(k).cloned()).map_err(|e| e.to_string())
}

#[test]
fn the_environment_decides_the_role() {
    let id = ("STEEPEST_NCCL_ID", "00ff");
    let file = ("STEEPEST_NCCL_ID_FILE", "/tmp/job-17.id");
    let (rank, world) = (("RANK", "1"), ("WORLD_SIZE", "4"));
    assert_eq!(role_with("cpu", 1, &[]), Ok(Role::Local));
    // on the CPU the ranks are threads of one process, whatever the environment
    assert_eq!(role_with("cpu", 4, &[rank, world]), Ok(Role::Local));
    assert_eq!(role_with("cpu", 4, &[rank, world, id]), Ok(Role::Local));
    assert_eq!(role_with("cuda", 1, &[]), Ok(Role::Local));
    assert_eq!(role_with("cuda", 4, &[]), Ok(Role::Launcher));
    // started by this launcher (the variable) or by another one (the file)
    assert_eq!(role_with("cuda", 4, &[rank, world, id]), Ok(Role::NcclRank));
    assert_eq!(
        role_with("cuda", 4, &[rank, world, file]),
        Ok(Role::NcclRank)
    );
    // an id without RANK: a launcher, which gives its ranks their own id
    assert_eq!(role_with("cuda", 4, &[id]), Ok(Role::Launcher));
    // one GPU in a job of one process: RANK alone changes nothing
    assert_eq!(role_with("cuda", 1, &[("RANK", "0")]), Ok(Role::Local));
    assert_eq!(
        role_with("cuda", 1, &[("RANK", "0"), ("WORLD_SIZE", "1")]),
        Ok(Role::Local)
    );
    // started by another launcher without an id: each would launch N more
    for vars in [&[rank, world][..], &[rank], &[world]] {
        let e = role_with("cuda", 4, vars).unwrap_err();
        for word in ["RANK", "STEEPEST_NCCL_ID_FILE", "--ranks 4"] {
            assert!(e.contains(word), "{vars:?}: `{word}` not in {e}");
        }
    }
    // … or trained the whole job alone, N times over
    assert!(role_with("cuda", 1, &[rank, world]).is_err());
    assert!(role_with("cuda", 1, &[("WORLD_SIZE", "two")]).is_err());
}

#[test]
fn a_rank_gets_the_arguments_its_number_and_the_id() {
    let args: Vec<OsString> = [
        "-c",
        r#"echo "$RANK/$WORLD_SIZE/$LOCAL_RANK/$STEEPEST_NCCL_ID/$0/$1""#,
        "--steps",
        "20",
    ]
    .map(OsString::from)
    .to_vec();
    let mut cmd = rank_command(Path::new("/bin/sh"), &args, 2, 4, "abc123");
    // an inherited id file would not be read (the variable wins), but it
    // must not reach the ranks at all
    let removed = cmd
        .get_envs()
        .any(|(k, v)| k == "STEEPEST_NCCL_ID_FILE" && v.is_none());
    assert!(removed);
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "2/4/2/abc123/--steps/20"
    );
}

/// A rank outlives neither its launcher nor, on Linux, the thread that
/// started it: here a thread starts a rank that would sleep 30 s and ends;
/// the rank is killed at once (the launcher starts its ranks from its main
/// thread, so they end with the launcher).
#[cfg(target_os = "linux")]
#[test]
fn a_rank_dies_with_the_thread_that_started_it() {
    use std::os::unix::process::ExitStatusExt;
    let args: Vec<OsString> = ["30"].map(OsString::from).to_vec();
    let start = Instant::now();
    let mut child = std::thread::spawn(move || {
        rank_command(Path::new("sleep"), &args, 0, 1, "00")
            .spawn()
            .unwrap()
    })
    .join()
    .unwrap();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(20) {
            let _ = child.kill();
            panic!("the rank outlived the thread that started it");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status:?}");
}

/// A shell command as a rank.
fn sh(script: &str) -> Child {
    Command::new("/bin/sh")
        .args(["-c", script])
        .spawn()
        .unwrap()
}

#[test]
fn ranks_that_all_succeed_succeed() {
    supervise(vec![sh("sleep 0.1"), sh("exit 0")], Duration::from_secs(5)).unwrap();
}

/// A failure every rank sees ends the others by themselves: they are not
/// killed while rank 0 still writes its outputs (here: touches a file after
/// the other rank has failed).
#[test]
fn the_other_ranks_may_finish_after_a_failure() {
    let dir = std::env::temp_dir().join(format!("steepest-launch-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let done = dir.join("rank0-wrote-its-outputs");
    let rank0 = sh(&format!("sleep 0.5; touch '{}'", done.display()));
    let e = supervise(vec![rank0, sh("exit 3")], Duration::from_secs(20))
        .unwrap_err()
        .to_string();
    assert!(e.contains("rank 1 failed") && e.contains('3'), "{e}");
    assert!(!e.contains("stopped"), "{e}");
    assert!(
        done.exists(),
        "rank 0 was stopped before it wrote its outputs"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A rank left waiting (in NCCL, for the failed one) is stopped once the
/// grace period is over, and the error says so.
#[test]
fn a_rank_still_running_after_the_grace_period_is_stopped() {
    let start = Instant::now();
    let e = supervise(
        vec![sh("sleep 30"), sh("exit 3")],
        Duration::from_millis(300),
    )
    .unwrap_err()
    .to_string();
    assert!(
        start.elapsed() < Duration::from_secs(15),
        "{:?}",
        start.elapsed()
    );
    assert!(e.contains("rank 1 failed"), "{e}");
    assert!(e.contains("[0]") && e.contains("stopped"), "{e}");
}

/// Rank 0 speaks for the group: its failure is the one named, even when
/// another rank failed first.
#[test]
fn rank_0s_failure_is_named_first() {
    let e = supervise(
        vec![sh("sleep 0.3; exit 5"), sh("exit 3"), sh("exit 0")],
        Duration::from_secs(20),
    )
    .unwrap_err()
    .to_string();
    assert!(e.starts_with("rank 0 failed") && e.contains('5'), "{e}");
    assert!(e.contains("rank(s) [1] failed too"), "{e}");
}
