//! train_lm's plumbing, apart from main.rs so that `tests/train_lm_smoke.rs`
//! can include and test it: output files replaced whole (and checked before
//! training), the seeds, numbers in the results table, errors on one line.

#![allow(dead_code)]

use std::fs::{File, OpenOptions};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

/// How [`replace_files`] writes a path.
enum Target {
    /// Through a temporary file beside it, renamed over it (a missing path,
    /// or a regular file).
    Temp(PathBuf),
    /// Directly: the path exists and is not a regular file (a symbolic link,
    /// which stays a link to its target; a device such as /dev/stdout; a
    /// directory, which fails with its name).
    Direct,
}

fn target(path: &Path) -> Target {
    // not `path.is_file()`, which follows links: a renamed temporary would
    // replace the link itself
    let direct = std::fs::symlink_metadata(path).is_ok_and(|m| !m.file_type().is_file());
    match path.file_name() {
        Some(name) if !direct => {
            Target::Temp(path.with_file_name(format!(".{}.tmp", name.to_string_lossy())))
        }
        _ => Target::Direct,
    }
}

/// Writes `paths` through `write`, given where to write each: a temporary
/// file beside a missing or regular file, renamed over it once all are
/// written (a process killed while writing leaves the previous version,
/// never half a file); a path that exists and is not a regular file (a
/// symbolic link, /dev/stdout) itself. An error names the paths.
pub fn replace_files(paths: &[&Path], write: impl FnOnce(&[PathBuf]) -> Result<()>) -> Result<()> {
    let targets: Vec<Target> = paths.iter().map(|p| target(p)).collect();
    let written: Vec<PathBuf> = paths
        .iter()
        .zip(&targets)
        .map(|(p, t)| match t {
            Target::Temp(tmp) => tmp.clone(),
            Target::Direct => p.to_path_buf(),
        })
        .collect();
    let temps = || {
        targets.iter().filter_map(|t| match t {
            Target::Temp(tmp) => Some(tmp),
            Target::Direct => None,
        })
    };
    if let Err(e) = write(&written) {
        for tmp in temps() {
            let _ = std::fs::remove_file(tmp);
        }
        let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
        return Err(e.context(format!("writing {}", names.join(", "))));
    }
    for (path, t) in paths.iter().zip(&targets) {
        if let Target::Temp(tmp) = t {
            std::fs::rename(tmp, path)
                .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        }
    }
    Ok(())
}

/// [`replace_files`] for one path.
pub fn replace_file(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    replace_files(&[path], |p| write(&p[0]))
}

/// Checks, before training, that [`replace_file`] will be able to write
/// `path`, so that a bad path fails at once rather than after the runs:
/// creates its parent directories, refuses a directory, and tries what
/// the write will do without changing `path` itself: creates (and removes)
/// a temporary file beside a missing or regular file (named for this
/// process, so another run's temporary file is left alone); opens a link to a
/// regular file for writing without truncating it. Other paths that exist
/// (a device such as /dev/stdout, a FIFO: opening one would wait for or
/// signal its reader) are left to the write.
pub fn check_writable(path: &Path) -> Result<()> {
    let check = || -> Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the directory {}", dir.display()))?;
        }
        match target(path) {
            Target::Temp(tmp) => {
                // A name of its own (another run may be writing `tmp` now).
                let mut name = tmp.file_name().unwrap_or_default().to_os_string();
                name.push(format!(".check.{}", std::process::id()));
                let tmp = tmp.with_file_name(name);
                File::create(&tmp).with_context(|| {
                    let dir = tmp.parent().unwrap_or(Path::new("."));
                    format!("creating a file in {}", dir.display())
                })?;
                std::fs::remove_file(&tmp)
                    .with_context(|| format!("removing {}", tmp.display()))?;
            }
            Target::Direct => match std::fs::metadata(path) {
                Ok(m) if m.is_dir() => bail!("it is a directory"),
                Ok(m) if m.is_file() => {
                    OpenOptions::new().append(true).open(path)?;
                }
                _ => {}
            },
        }
        Ok(())
    };
    check().with_context(|| format!("cannot write {}", path.display()))
}

/// Opens `path` for [`replace_files`]'s writer to write it whole: created or
/// truncated, except a stream — a path under /dev or /proc, or a link that
/// leads there — which is never truncated: truncating the file a shell
/// redirected stdout to would erase what the program has already printed
/// there. A link to one of this process's descriptors (/dev/stdout →
/// /proc/self/fd/1, /dev/fd/N) is written through a duplicate of that
/// descriptor, which shares its file offset, so later prints go after the
/// written text instead of over it; another stream is appended to.
pub fn create(path: &Path) -> std::io::Result<File> {
    let mut hop = path.to_path_buf();
    let mut stream = false;
    for _ in 0..40 {
        stream |= hop.starts_with("/dev") || hop.starts_with("/proc");
        #[cfg(unix)]
        if let Some(fd) = own_descriptor(&hop) {
            return duplicate(fd);
        }
        match std::fs::read_link(&hop) {
            Ok(next) => hop = hop.parent().unwrap_or(Path::new("/")).join(next),
            Err(_) => break,
        }
    }
    if stream {
        OpenOptions::new().append(true).open(path)
    } else {
        File::create(path)
    }
}

/// `N` of /proc/self/fd/N or /dev/fd/N.
#[cfg(unix)]
fn own_descriptor(p: &Path) -> Option<i32> {
    let rest = p
        .strip_prefix("/proc/self/fd")
        .or_else(|_| p.strip_prefix("/dev/fd"))
        .ok()?;
    rest.to_str()?.parse().ok()
}

/// A new descriptor for the open file `fd` (the same file offset).
#[cfg(unix)]
fn duplicate(fd: i32) -> std::io::Result<File> {
    use std::os::fd::FromRawFd;
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if new < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `new` is a fresh descriptor this process owns.
    Ok(unsafe { File::from_raw_fd(new) })
}

/// The seeds `first, first + 1, …`, `n` of them; an error if the last would
/// pass `u64::MAX`.
pub fn seed_range(first: u64, n: u64) -> Result<RangeInclusive<u64>> {
    match n.checked_sub(1).and_then(|k| first.checked_add(k)) {
        Some(last) => Ok(first..=last),
        None if n == 0 => bail!("--seeds must be at least 1"),
        None => bail!(
            "--first-seed {first} --seeds {n}: the seeds would pass {}, the largest",
            u64::MAX
        ),
    }
}

/// `x` as `{}` writes it, or as `{:e}` when tiny or huge (`1e-300`, not 300
/// zeros).
pub fn fmt_num(x: f64) -> String {
    if x != 0.0 && (x.abs() < 1e-4 || x.abs() >= 1e6) {
        format!("{x:e}")
    } else {
        format!("{x}")
    }
}

/// Runs `f`; an error or a panic becomes its message (one line).
pub fn caught<T, E: Into<anyhow::Error>>(
    f: impl FnOnce() -> std::result::Result<T, E>,
) -> std::result::Result<T, String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(error_line(&e.into())),
        Err(panic) => Err(format!(
            "panicked: {}",
            crate::lm::panic_message(panic.as_ref())
        )),
    }
}

/// `e` and its causes on one line (as `{e:#}`), without the backtrace that
/// candle attaches to its errors when backtraces are on (RUST_BACKTRACE=1)
/// and with any line breaks (candle's context) joined by ": ".
pub fn error_line(e: &anyhow::Error) -> String {
    let parts: Vec<String> = e
        .chain()
        .map(|c| match c.downcast_ref::<candle_core::Error>() {
            Some(ce) => candle_message(ce),
            None => c.to_string(),
        })
        .collect();
    let text = parts.join(": ");
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    lines.join(": ")
}

/// A candle error's message without its backtraces.
fn candle_message(e: &candle_core::Error) -> String {
    use candle_core::Error as E;
    match e {
        E::WithBacktrace { inner, .. } => candle_message(inner),
        E::Context { inner, context } => format!("{context}: {}", candle_message(inner)),
        E::WithPath { inner, path } => format!("{}: {}", path.display(), candle_message(inner)),
        other => other.to_string(),
    }
}
