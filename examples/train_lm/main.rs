//! train_lm: a small char-level GPT trained with AdamW / Muon, each with
//! decoupled or spectral weight decay, and Muon on the spectral sphere, on a
//! built-in corpus (or any text file). Writes a CSV log, a figure (validation
//! loss; σ₁ of every weight matrix over training) as SVG and PNG, and a
//! results table.
//!
//!     cargo run --example train_lm                 # all 5 optimizers, 1 seed
//!     cargo run --example train_lm -- --seeds 3    # the README table
//!     cargo run --example train_lm -- --help
//!
//! The `gpu` preset (6 layers, d = 384, context 256, 10.75 M parameters;
//! AdamW, Muon, Muon with spectral decay; tokens/s and the optimizer's share
//! of step time in summary.md and timing.csv):
//!
//!     cargo run --release --features cuda --example train_lm -- --device cuda --preset gpu
//!
//! On a GPU machine without Rust, `examples/train_lm/gpu_run.sh` runs it with
//! a binary built elsewhere, after checking that the first 20 losses of the
//! small default configuration agree on the CPU and the GPU
//! (`--stop-after 20 --loss-log PATH`, `scripts/compare_losses.py`).
//!
//! Data-parallel (`--ranks N`, each rank on `batch / N` sequences of every
//! batch, gradients averaged, optimizer state sharded across ranks):
//!
//!     cargo run --example train_lm -- --ranks 2    # 2 in-process ranks per run (CPU check)
//!     cargo run --release --features nccl --example train_lm -- --device cuda --ranks 4
//!                                                  # 4 processes over NCCL, one GPU each

mod cli;
mod launch;
mod lm;
mod outputs;
mod plot;
mod queue;
mod support;

use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use cli::Parsed;
use launch::Role;

use lm::{builtin_corpus, Data, Finished, OptKind};
use outputs::{check_loss_log, output_paths, report, write_no_runs, write_outputs};
use queue::train_queue;
use support::{caught, check_writable, error_line, seed_range};

fn device(name: &str) -> Result<Device> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => cuda_device(),
        other => bail!("--device: unknown `{other}`; use cpu or cuda"),
    }
}

#[cfg(feature = "cuda")]
fn cuda_device() -> Result<Device> {
    Ok(Device::new_cuda(0)?)
}

#[cfg(not(feature = "cuda"))]
fn cuda_device() -> Result<Device> {
    bail!("--device cuda: this binary was built without CUDA; rebuild with `--features cuda`")
}

/// On a CUDA device, unless `release`: the memory pool keeps freed memory
/// for reuse instead of returning it to the driver at every synchronisation
/// (`steepest::device::cuda::retain_freed_memory`). The note for the header
/// line.
#[cfg(feature = "cuda")]
fn memory_pool(device: &Device, release: bool) -> String {
    if !device.is_cuda() {
        return String::new();
    }
    if release {
        return "; CUDA pool releases freed memory (--release-freed-memory)".into();
    }
    match steepest::device::cuda::retain_freed_memory(device) {
        Ok(()) => "; CUDA pool keeps freed memory".into(),
        Err(e) => {
            eprintln!(
                "train_lm: warning: could not make the CUDA memory pool keep freed memory: {e}"
            );
            String::new()
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn memory_pool(_device: &Device, _release: bool) -> String {
    String::new()
}

/// candle allocates every intermediate tensor afresh. With glibc's default,
/// adaptive thresholds, whether the freed memory stays in the heap or goes
/// back to the kernel depends on the sizes freed first; when it goes back,
/// every step faults its pages in again (measured on the default run: 5× the
/// page faults and +25 % wall time, from an unrelated change in what was
/// allocated at start-up). Fixed thresholds keep up to 256 MiB free in the
/// heap and map only blocks over 32 MiB, so runs do not depend on that.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; called before threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

/// Errors are printed as one line (no backtrace) with exit code 1.
fn main() -> std::process::ExitCode {
    // candle captures a backtrace into each error it makes when backtraces
    // are on (RUST_BACKTRACE=1); they would end up in the messages, also in
    // those of failed runs. RUST_LIB_BACKTRACE=0 turns that off (panics
    // still follow RUST_BACKTRACE). Before any thread starts.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    match real_main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("train_lm: error: {}", error_line(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

fn real_main() -> Result<()> {
    // One thread per run unless the user says otherwise (must precede any
    // candle / rayon work).
    if std::env::var_os("RAYON_NUM_THREADS").is_none() {
        std::env::set_var("RAYON_NUM_THREADS", "1");
    }
    keep_freed_memory();
    let args = match cli::parse(std::env::args_os())? {
        Parsed::Run(args) => *args,
        Parsed::Help(help) => return Ok(help.print()?),
    };
    let role = launch::role(&args.device, args.cfg.ranks, |k| {
        std::env::var_os(k).map(|v| v.to_string_lossy().into_owned())
    })?;
    let cfg = args.cfg.clone();
    // The data, the seeds and the output paths are checked before any rank
    // starts: a bad --data fails once, not once per rank.
    let (text, source) = match &args.data {
        Some(p) => (
            std::fs::read_to_string(p)
                .with_context(|| format!("--data: cannot read {}", p.display()))?,
            p.display().to_string(),
        ),
        None => (
            builtin_corpus(0, cfg.corpus_chars),
            "built-in corpus".to_string(),
        ),
    };
    let data = Data::from_text(&text, cfg.context).context("--data")?;
    let seeds = seed_range(args.first_seed, args.seeds)?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("--out: creating {}", args.out.display()))?;
    // Over NCCL, rank 0 speaks for all (and alone writes the outputs).
    let quiet = role == Role::NcclRank && std::env::var("RANK").is_ok_and(|r| r.trim() != "0");
    if !quiet {
        // A path that cannot be written fails now, not after the runs.
        for path in output_paths(&args.out, cfg.timing) {
            check_writable(&path).context("--out")?;
        }
        if let Some(path) = &args.loss_log {
            check_writable(path).context("--loss-log")?;
            check_loss_log(path, &args.out)?;
        }
        for w in &args.warnings {
            eprintln!("train_lm: warning: {w}");
        }
    }
    let device = match role {
        Role::Local => device(&args.device)?,
        Role::Launcher => return launch_nccl(args.cfg.ranks),
        Role::NcclRank => nccl_device(args.cfg.ranks)?,
    };
    let pool = memory_pool(&device, args.release_freed_memory);
    if !quiet {
        eprintln!(
        "train_lm: {source}, {} train / {} val chars, vocab {}; preset {}: model {} layers, d={}, {} heads, context {}, {} parameters; \
         {} steps × batch {}{}; optimizers {:?}; seeds {}; device {}{}{pool}",
        data.train.len(),
        data.val.len(),
        data.vocab.len(),
        args.preset,
        cfg.layers,
        cfg.d_model,
        cfg.heads,
        cfg.context,
        cfg.param_count(data.vocab.len()),
        cfg.steps,
        cfg.batch,
        match cfg.stop_after {
            Some(n) if n < cfg.steps => format!(" (stopping after {n})"),
            _ => String::new(),
        },
        args.optimizers.iter().map(|k| k.name()).collect::<Vec<_>>(),
        args.seeds,
        args.device,
        match (role, cfg.ranks) {
            (_, 1) => String::new(),
            (Role::NcclRank, n) => format!("; {n} ranks over NCCL"),
            (_, n) => format!("; {n} in-process ranks per run"),
        }
    );
    }
    // The runs are independent: `jobs` worker threads take them in turn, each
    // run single-threaded (RAYON_NUM_THREADS=1, set in main), which on a small
    // shared CPU is much faster than one run with threads contending.
    let mut queue: Vec<(u64, OptKind)> = Vec::new();
    for seed in seeds {
        for &kind in &args.optimizers {
            queue.push((seed, kind));
        }
    }
    // As each run ends, the outputs are rewritten with the runs finished so
    // far (silently), so a process stopped part-way keeps them; after the
    // last, `report` writes them once more and prints the table.
    let vocab = data.vocab.len();
    let n_runs = queue.len();
    let failed_note = |f: &Finished| match f.failed_runs() {
        failed if failed.is_empty() => String::new(),
        failed => format!("; failed: {}", failed.join(", ")),
    };
    let on_end = |f: &Finished| {
        if f.ended() == n_runs || f.runs().is_empty() {
            return;
        }
        let note = format!(
            "; {} of {n_runs} runs so far{}",
            f.runs().len(),
            failed_note(f)
        );
        if let Err(e) = caught(|| write_outputs(&args, &source, f.runs(), vocab, &note)) {
            eprintln!("train_lm: warning: writing the runs finished so far: {e}");
        }
    };
    let start = Instant::now();
    let finished = if role == Role::NcclRank {
        // Every process runs the whole queue in lockstep; rank 0 reports.
        match train_nccl(&queue, &cfg, &data, &device, &on_end)? {
            Some(finished) => finished,
            None => return Ok(()),
        }
    } else {
        train_queue(&queue, args.jobs, &cfg, &data, &device, &on_end)?
    };
    let wall = start.elapsed().as_secs_f64();
    let kept = match finished.runs().len() {
        0 => String::new(),
        1 => format!(" (the finished run is in {})", args.out.display()),
        k => format!(" (the {k} finished runs are in {})", args.out.display()),
    };
    let failed = finished.error(n_runs, &kept);
    let note = failed_note(&finished);
    let runs = finished.into_runs();
    if runs.is_empty() {
        let summary = write_no_runs(&args, &source, vocab, &note)?;
        eprintln!("train_lm: no run finished (wrote {})", summary.display());
    } else {
        report(&args, &source, &runs, &note, vocab, wall)?;
    }
    match failed {
        None => Ok(()),
        Some(e) => bail!("{e}"),
    }
}

#[cfg(not(feature = "nccl"))]
const NO_NCCL: &str = "--device cuda --ranks N runs N processes over NCCL: rebuild with \
                       `--features nccl` (see the README, \"Data-parallel training\")";

#[cfg(not(feature = "nccl"))]
fn launch_nccl(_ranks: usize) -> Result<()> {
    bail!("{NO_NCCL}")
}

#[cfg(not(feature = "nccl"))]
fn nccl_device(_ranks: usize) -> Result<Device> {
    bail!("{NO_NCCL}")
}

#[cfg(not(feature = "nccl"))]
fn train_nccl(
    _queue: &[(u64, OptKind)],
    _cfg: &lm::Config,
    _data: &Data,
    _device: &Device,
    _on_end: &(dyn Fn(&Finished) + Sync),
) -> Result<Option<Finished>> {
    bail!("{NO_NCCL}")
}

/// Starts `ranks` copies of this program with the same arguments, rank `r`
/// on GPU `r` (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, and the NCCL id in
/// `STEEPEST_NCCL_ID`), and waits for them. This process creates the id, so
/// it hosts NCCL's bootstrap root and must outlive the ranks' set-up. When a
/// rank fails, the others are stopped: they would wait for it forever inside
/// NCCL.
#[cfg(feature = "nccl")]
fn launch_nccl(ranks: usize) -> Result<()> {
    let id = steepest::distributed::NcclId::new()?;
    let exe = std::env::current_exe().context("finding this program to start the ranks")?;
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    eprintln!("train_lm: starting {ranks} ranks over NCCL, one GPU each");
    let mut children = Vec::new();
    for r in 0..ranks {
        match launch::rank_command(&exe, &args, r, ranks, &id.to_hex()).spawn() {
            Ok(c) => children.push(c),
            Err(e) => {
                for mut c in children {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                bail!("starting rank {r}: {e}");
            }
        }
    }
    launch::supervise(children, launch::GRACE)
}

/// This rank's GPU (`LOCAL_RANK`), after checking `WORLD_SIZE` = `--ranks`.
#[cfg(feature = "nccl")]
fn nccl_device(ranks: usize) -> Result<Device> {
    let env = steepest::distributed::LaunchEnv::from_env()?;
    if env.world_size != ranks {
        bail!(
            "WORLD_SIZE={} but --ranks {ranks}: pass the same number",
            env.world_size
        );
    }
    Device::new_cuda(env.local_rank).with_context(|| {
        format!(
            "rank {}: GPU {} (LOCAL_RANK; --ranks {ranks} needs {ranks} GPUs)",
            env.rank, env.local_rank
        )
    })
}

/// Every run of `queue`, in order, as this process's rank over NCCL (one
/// communicator for all runs); rank 0 shows progress, calls `on_end` as
/// each run ends and returns the results, the other ranks `None`. A failed
/// run ends the queue (the ranks may be out of step): rank 0 returns the
/// runs finished before it and the failure, the other ranks the error.
#[cfg(feature = "nccl")]
fn train_nccl(
    queue: &[(u64, OptKind)],
    cfg: &lm::Config,
    data: &Data,
    device: &Device,
    on_end: &(dyn Fn(&Finished) + Sync),
) -> Result<Option<Finished>> {
    use indicatif::{ProgressBar, ProgressStyle};
    use lm::Record;
    use outputs::run_line;
    let comm = steepest::distributed::NcclComm::from_env(device)?;
    let rank0 = steepest::distributed::Collective::rank(&comm) == 0;
    let mut finished = Finished::default();
    for (i, &(seed, kind)) in queue.iter().enumerate() {
        let bar = if rank0 {
            ProgressBar::new(cfg.steps_run() as u64)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template("  {prefix:<32} [{bar:20}] {pos:>4}/{len} {msg}")?
                .progress_chars("#>."),
        );
        bar.set_prefix(format!("{} seed {seed}", kind.name()));
        let mut cb = |step: usize, rec: Option<&Record>| {
            if let Some(r) = rec {
                bar.set_message(format!("val {:.3}", r.val_loss));
            }
            bar.set_position(step as u64);
        };
        let progress: Option<lm::Progress<'_>> = if rank0 { Some(&mut cb) } else { None };
        let run = lm::train_rank(&comm, kind, seed, cfg, data, device, progress);
        bar.finish_and_clear();
        match run {
            Ok(Some(r)) => {
                if cfg.timing {
                    eprintln!("{}", run_line(&r));
                }
                finished.push(i, kind, seed, Ok(r));
                on_end(&finished);
            }
            Ok(None) => {}
            Err(e) if rank0 => {
                finished.push(i, kind, seed, Err(error_line(&e.into())));
                break;
            }
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("training with {} (seed {seed})", kind.name()))
            }
        }
    }
    Ok(rank0.then_some(finished))
}
