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

mod lm;
mod plot;
mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::Parser;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use lm::{builtin_corpus, train, Config, Data, Finished, OptKind, Record, RunResult};
use support::{check_writable, error_line, fmt_num, replace_file, replace_files, seed_range};

const OUTPUT_HELP: &str = "\
OUTPUT (in --out):
  train_lm.csv   step, optimizer, seed, lr, train_loss, val_loss, sigma1 of each weight matrix
  train_lm.svg   validation loss per optimizer; σ₁ of each weight matrix over training
  train_lm.png   the same figure as a bitmap
  summary.md     final validation loss per optimizer (mean ± std over seeds);
                 with --timing, also tokens/s and the optimizer's share of step time
  timing.csv     with --timing: per run, seconds per phase (forward, backward, clip,
  timing.json    optimizer), tokens/s, the optimizer's share (step 1 not timed); then
                 step 1's seconds, the evaluations' seconds and count, the first
                 evaluation's seconds
These are rewritten as each run ends (with the runs finished so far). When runs
fail, the others are still written and train_lm then exits with an error naming
each failed run (over NCCL, a failure ends the queue: the runs before it are
written).
--loss-log PATH: optimizer, seed, step, train_loss for every step (compare two
  runs with scripts/compare_losses.py)

PRESETS:
  small  2 layers, d=64, 4 heads, context 64; 300 steps × 16; 400 k-char corpus; all optimizers
  gpu    6 layers, d=384, 6 heads, context 256 (10.75 M parameters); 600 steps × 64;
         8 M-char corpus; adamw, muon, muon-spectral (sized for one H200: ~2 min at 20 TFLOP/s)";

/// train_lm — train a small char-level GPT and compare optimizers
#[derive(Parser, Debug)]
#[command(name = "train_lm", after_help = OUTPUT_HELP)]
struct Cli {
    /// Model, data and run sizes (see PRESETS below)
    #[arg(long, value_name = "NAME", default_value = "small", value_parser = Config::PRESETS)]
    preset: String,
    /// Which optimizers to train, comma-separated, or all of them [default: all; --preset gpu: adamw,muon,muon-spectral]
    #[arg(long, value_name = "NAME,…", value_delimiter = ',', value_parser = optimizer_parser())]
    optimizer: Vec<Choice>,
    /// Optimizer steps per run (the schedule's length) [default: 300; --preset gpu: 600]
    #[arg(long, value_name = "N", value_parser = at_least_one::<usize>)]
    steps: Option<usize>,
    /// Stop each run after N steps of its schedule (to compare the first steps of two runs)
    #[arg(long, value_name = "N", value_parser = at_least_one::<usize>)]
    stop_after: Option<usize>,
    /// Seeds per optimizer (mean ± std in the table)
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = at_least_one::<u64>)]
    seeds: u64,
    /// The first seed (runs use seeds S, S+1, …)
    #[arg(long, value_name = "S", default_value_t = 0)]
    first_seed: u64,
    /// Train on this text file instead of the built-in corpus
    #[arg(long, value_name = "PATH")]
    data: Option<PathBuf>,
    /// Output directory
    #[arg(long, value_name = "DIR", default_value = "runs/train_lm")]
    out: PathBuf,
    /// Device (cuda needs `--features cuda`)
    #[arg(long, value_name = "DEV", default_value = "cpu", value_parser = ["cpu", "cuda"])]
    device: String,
    /// Peak learning rate for every chosen optimizer [default: AdamW 3e-3, Muon 0.02, sphere 0.02]
    #[arg(long, value_name = "X", value_parser = positive, allow_negative_numbers = true)]
    lr: Option<f64>,
    /// Weight decay λ (decoupled or spectral; muon-spectral-sphere decays only its AdamW part)
    #[arg(long, value_name = "X", default_value_t = Config::default().weight_decay, value_parser = non_negative, allow_negative_numbers = true)]
    wd: f64,
    /// Spectral-sphere radius r, ‖W‖₂ = r
    #[arg(long, value_name = "X", default_value_t = Config::default().radius, value_parser = positive, allow_negative_numbers = true)]
    radius: f64,
    /// Sequences (of the preset's context length) per batch [default: 16; --preset gpu: 64]
    #[arg(long, value_name = "N", value_parser = at_least_one::<usize>)]
    batch: Option<usize>,
    /// Steps between evaluations [default: 20; --preset gpu: 50]
    #[arg(long, value_name = "N", value_parser = at_least_one::<usize>)]
    eval_every: Option<usize>,
    /// Runs trained at once, one thread each (set RAYON_NUM_THREADS to give each run more threads) [default: CPU cores / ranks; with --device cuda: 1]
    #[arg(long, value_name = "N", value_parser = at_least_one::<usize>)]
    jobs: Option<usize>,
    /// Time each step's phases with device.synchronize() between them; tokens/s and the optimizer's share of step time in summary.md, timing.csv, timing.json [default: on with --device cuda]
    #[arg(long)]
    timing: bool,
    /// Write every step's training loss to this CSV (optimizer, seed, step, train_loss)
    #[arg(long, value_name = "PATH")]
    loss_log: Option<PathBuf>,
    /// Muon's Newton–Schulz in the Gram form on matrices with aspect ratio ≥ 2 (restart every two steps; NewtonSchulz::gram_form)
    #[arg(long)]
    gram_ns: bool,
    /// Data-parallel ranks per run, each on batch/N sequences: on the CPU, N in-process ranks (threads); with --device cuda, N processes over NCCL, one GPU each (needs --features nccl)
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = at_least_one::<usize>)]
    ranks: usize,
    /// With --ranks N > 1: gather each owner's update rounded to bf16 instead of the f32 parameters after the owners' step (ParamGather::Bf16Updates: half the all-gather's bytes)
    #[arg(long)]
    bf16_updates: bool,
    /// With --device cuda: leave the CUDA memory pool's release threshold at 0, so freed memory goes back to the driver at every synchronisation (by default the pool keeps it for reuse; for comparison)
    #[arg(long)]
    release_freed_memory: bool,
}

/// `--optimizer`: one of them, or all.
#[derive(Clone, Copy, Debug)]
enum Choice {
    /// `all`: every optimizer, in display order.
    All,
    /// One optimizer, by its CLI name.
    One(OptKind),
}

/// The names of the optimizers and `all` (listed in `--help`, suggested on a typo).
fn optimizer_parser() -> impl TypedValueParser<Value = Choice> {
    let names = OptKind::ALL.map(|k| k.name());
    PossibleValuesParser::new(names.into_iter().chain(["all"]))
        .map(|s| OptKind::parse(&s).map_or(Choice::All, Choice::One))
}

/// An integer ≥ 1.
fn at_least_one<T: std::str::FromStr + PartialOrd + From<u8>>(s: &str) -> Result<T, String> {
    match s.parse::<T>() {
        Ok(n) if n >= T::from(1) => Ok(n),
        _ => Err("must be an integer ≥ 1".into()),
    }
}

/// A finite number > 0.
fn positive(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
        _ => Err("must be a positive number".into()),
    }
}

/// A finite number ≥ 0.
fn non_negative(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(x) if x.is_finite() && x >= 0.0 => Ok(x),
        _ => Err("must be a number ≥ 0".into()),
    }
}

/// The parsed command line, with the defaults filled in.
struct Args {
    preset: String,
    optimizers: Vec<OptKind>,
    seeds: u64,
    first_seed: u64,
    data: Option<PathBuf>,
    out: PathBuf,
    device: String,
    jobs: usize,
    loss_log: Option<PathBuf>,
    release_freed_memory: bool,
    cfg: Config,
}

impl From<Cli> for Args {
    fn from(c: Cli) -> Self {
        let preset = Config::preset(&c.preset).expect("clap checks the preset name");
        let choices = if c.optimizer.is_empty() {
            match c.preset.as_str() {
                "gpu" => [OptKind::AdamW, OptKind::Muon, OptKind::MuonSpectral]
                    .map(Choice::One)
                    .to_vec(),
                _ => vec![Choice::All],
            }
        } else {
            c.optimizer
        };
        // in the order given, each once; `all` stands for every one
        let mut optimizers: Vec<OptKind> = Vec::new();
        for choice in choices {
            let kinds = match choice {
                Choice::All => OptKind::ALL.to_vec(),
                Choice::One(k) => vec![k],
            };
            for k in kinds {
                if !optimizers.contains(&k) {
                    optimizers.push(k);
                }
            }
        }
        let cuda = c.device == "cuda";
        Args {
            preset: c.preset,
            optimizers,
            seeds: c.seeds,
            first_seed: c.first_seed,
            data: c.data,
            out: c.out,
            device: c.device,
            // Runs at once on one GPU would share it (and its timings).
            jobs: c.jobs.unwrap_or_else(|| {
                if cuda {
                    return 1;
                }
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                (cores / c.ranks).max(1)
            }),
            loss_log: c.loss_log,
            release_freed_memory: c.release_freed_memory,
            cfg: Config {
                steps: c.steps.unwrap_or(preset.steps),
                batch: c.batch.unwrap_or(preset.batch),
                eval_every: c.eval_every.unwrap_or(preset.eval_every),
                lr: c.lr,
                weight_decay: c.wd,
                radius: c.radius,
                ranks: c.ranks,
                stop_after: c.stop_after,
                timing: c.timing || cuda,
                gram_ns: c.gram_ns,
                bf16_updates: c.bf16_updates,
                ..preset
            },
        }
    }
}

/// The arguments, or `None` after `--help` was printed. A usage error is
/// returned as one line: clap's message and hints, without its usage block.
fn parse_args() -> Result<Option<Args>> {
    match Cli::try_parse() {
        Ok(cli) => Ok(Some(cli.into())),
        Err(e) if !e.use_stderr() => {
            // --help
            e.print()?;
            Ok(None)
        }
        Err(e) => {
            let text = e.render().to_string();
            let msg: Vec<&str> = text
                .lines()
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            let msg = msg.join("; ");
            bail!("{} (see --help)", msg.trim_start_matches("error: "))
        }
    }
}

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

fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    let var = if xs.len() > 1 {
        xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0)
    } else {
        0.0
    };
    (mean, var.sqrt())
}

/// The log: one row per run and evaluation point.
fn write_csv(path: &Path, runs: &[RunResult]) -> Result<()> {
    let mut w = csv::Writer::from_writer(support::create(path)?);
    let mut header: Vec<String> = ["step", "optimizer", "seed", "lr", "train_loss", "val_loss"]
        .map(String::from)
        .to_vec();
    if let Some(r) = runs.first() {
        header.extend(r.matrices.iter().map(|m| format!("sigma1:{m}")));
    }
    w.write_record(&header)?;
    for r in runs {
        for rec in &r.records {
            let mut row = vec![
                rec.step.to_string(),
                r.kind.name().to_string(),
                r.seed.to_string(),
                format!("{:.6e}", rec.lr),
                format!("{:.6}", rec.train_loss),
                format!("{:.6}", rec.val_loss),
            ];
            row.extend(rec.sigmas.iter().map(|sg| format!("{sg:.6}")));
            w.write_record(&row)?;
        }
    }
    w.flush()?;
    Ok(())
}

/// The figure's two panels: validation loss (mean over seeds) per optimizer,
/// and σ₁ of every weight matrix over training (first seed).
fn figure(runs: &[RunResult], kinds: &[OptKind]) -> [plot::Panel; 2] {
    let mut loss_series = Vec::new();
    let mut sigma_series = Vec::new();
    let mut lo = f64::MAX;
    for (ki, kind) in kinds.iter().enumerate() {
        let color = plot::COLORS[ki % plot::COLORS.len()];
        let mine: Vec<&RunResult> = runs.iter().filter(|r| r.kind == *kind).collect();
        let Some(first) = mine.first() else { continue };
        // mean validation loss over seeds at each evaluation point
        let points: Vec<(f64, f64)> = (0..first.records.len())
            .map(|i| {
                let vals: Vec<f64> = mine
                    .iter()
                    .filter_map(|r| r.records.get(i))
                    .map(|r| r.val_loss)
                    .collect();
                (first.records[i].step as f64, mean_std(&vals).0)
            })
            .collect();
        lo = points.iter().map(|p| p.1).fold(lo, f64::min);
        loss_series.push(plot::Series {
            label: Some(kind.name().to_string()),
            color,
            points,
            width: 2.0,
            opacity: 1.0,
        });
        // σ₁ of every matrix (thin), and the largest σ₁ among the
        // transformer-block matrices (thick), first seed
        for (mi, _) in first.matrices.iter().enumerate() {
            sigma_series.push(plot::Series {
                label: None,
                color,
                points: first
                    .records
                    .iter()
                    .map(|r| (r.step as f64, r.sigmas[mi]))
                    .collect(),
                width: 0.8,
                opacity: 0.35,
            });
        }
        let blocks: Vec<usize> = (0..first.matrices.len())
            .filter(|&i| first.matrices[i].starts_with("h."))
            .collect();
        sigma_series.push(plot::Series {
            label: Some(kind.name().to_string()),
            color,
            points: first
                .records
                .iter()
                .map(|r| {
                    let max = blocks.iter().map(|&i| r.sigmas[i]).fold(0.0, f64::max);
                    (r.step as f64, max)
                })
                .collect(),
            width: 2.2,
            opacity: 1.0,
        });
    }
    [
        plot::Panel {
            title: "Validation loss (mean over seeds)".into(),
            xlabel: "step".into(),
            ylabel: "cross-entropy (nats/char)".into(),
            log_y: false,
            y_range: Some((lo - 0.05, lo + 1.6)),
            legend_bottom: false,
            series: loss_series,
        },
        plot::Panel {
            title: "σ₁: each matrix (thin), max over blocks (thick)".into(),
            xlabel: "step".into(),
            ylabel: "top singular value σ₁".into(),
            log_y: true,
            y_range: None,
            legend_bottom: true,
            series: sigma_series,
        },
    ]
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
    let Some(args) = parse_args()? else {
        return Ok(());
    };
    if args.cfg.batch % args.cfg.ranks != 0 {
        bail!(
            "--batch {} must be divisible by --ranks {} (each rank trains on batch/ranks sequences)",
            args.cfg.batch,
            args.cfg.ranks
        );
    }
    if args.cfg.bf16_updates && args.cfg.ranks == 1 {
        bail!("--bf16-updates changes what the ranks exchange: it needs --ranks N > 1");
    }
    let role = role(&args);
    let device = match role {
        Role::Local => device(&args.device)?,
        Role::Launcher => return launch_nccl(args.cfg.ranks),
        Role::NcclRank => nccl_device(args.cfg.ranks)?,
    };
    let pool = memory_pool(&device, args.release_freed_memory);
    let cfg = args.cfg.clone();
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
        }
    }
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
        if let Err(e) = caught(|| write_outputs(&args, &cfg, &source, f.runs(), vocab, &note)) {
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
    if !runs.is_empty() {
        report(&args, &cfg, &source, &runs, &note, vocab, wall)?;
    }
    match failed {
        None => Ok(()),
        Some(e) => bail!("{e}"),
    }
}

/// Trains the runs of `queue` in this process: `jobs` worker threads take
/// them in turn (each run with `cfg.ranks` in-process ranks). A run that
/// fails (or panics) is recorded as failed and the others go on;
/// `on_end(&finished)` is called as each run ends, under the lock that
/// collects them (so its calls see ever more runs, one at a time).
fn train_queue(
    queue: &[(u64, OptKind)],
    jobs: usize,
    cfg: &lm::Config,
    data: &Data,
    device: &Device,
    on_end: &(dyn Fn(&Finished) + Sync),
) -> Result<Finished> {
    let jobs = jobs.min(queue.len()).max(1);
    let n_runs = queue.len();
    // Progress: a total bar, and one bar per worker for the run it trains.
    // (indicatif draws nothing when stderr is not a terminal.)
    let bars = MultiProgress::new();
    let total = bars.add(ProgressBar::new((n_runs * cfg.steps_run()) as u64));
    total.set_style(
        ProgressStyle::with_template(
            "[{bar:30}] {percent:>3}% {msg}  {elapsed} elapsed, ~{eta} left",
        )?
        .progress_chars("#>."),
    );
    total.set_message(format!("{n_runs} runs"));
    let run_style = ProgressStyle::with_template("  {prefix:<32} [{bar:20}] {pos:>4}/{len} {msg}")?
        .progress_chars("#>.");
    let next = AtomicUsize::new(0);
    let finished: Mutex<Finished> = Mutex::new(Finished::default());
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            let bar = bars.add(ProgressBar::new(cfg.steps_run() as u64));
            bar.set_style(run_style.clone());
            let (bar, total) = (bar, total.clone());
            let (next, finished, bars) = (&next, &finished, &bars);
            scope.spawn(move || {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(&(seed, kind)) = queue.get(i) else {
                        break;
                    };
                    bar.reset();
                    bar.set_prefix(format!("{} seed {seed}", kind.name()));
                    bar.set_message("");
                    let mut done = 0;
                    let mut cb = |step: usize, rec: Option<&Record>| {
                        if let Some(r) = rec {
                            bar.set_message(format!("val {:.3}", r.val_loss));
                        }
                        bar.set_position(step as u64);
                        total.inc((step - done) as u64);
                        done = step;
                    };
                    let run = caught(|| train(kind, seed, cfg, data, device, &mut cb));
                    if let (Ok(r), true) = (&run, cfg.timing) {
                        // one line per run as it ends (kept in a captured log)
                        let line = run_line(r);
                        if bars.is_hidden() {
                            eprintln!("{line}");
                        } else {
                            let _ = bars.println(line);
                        }
                    }
                    let mut ended = finished.lock().unwrap_or_else(|e| e.into_inner());
                    ended.push(i, kind, seed, run);
                    on_end(&ended);
                }
                bar.finish_and_clear();
            });
        }
    });
    total.finish_with_message("done");
    Ok(finished.into_inner().unwrap_or_else(|e| e.into_inner()))
}

/// Runs `f`; an error or a panic becomes its message (one line).
fn caught<T, E: Into<anyhow::Error>>(
    f: impl FnOnce() -> std::result::Result<T, E>,
) -> std::result::Result<T, String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(error_line(&e.into())),
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .copied()
                .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
                .unwrap_or("(no message)");
            Err(format!("panicked: {msg}"))
        }
    }
}

/// The files [`write_outputs`] writes in `out` (without the loss log).
fn output_paths(out: &Path, timing: bool) -> Vec<PathBuf> {
    let mut names = vec!["train_lm.csv", "train_lm.svg", "train_lm.png", "summary.md"];
    if timing {
        names.extend(["timing.csv", "timing.json"]);
    }
    names.into_iter().map(|n| out.join(n)).collect()
}

/// What [`write_outputs`] wrote: the results table (also in summary.md) and
/// the paths.
struct Written {
    table: String,
    csv: PathBuf,
    svg: PathBuf,
    png: PathBuf,
    summary: PathBuf,
    /// The loss log and the timing files, if written.
    others: Vec<PathBuf>,
}

/// The CSV log, the timing files, the figure, summary.md and the loss log
/// for `runs` (see `OUTPUT_HELP`), each replaced whole (the loss log last:
/// a path given apart from --out, the likeliest to fail). `note` ends the
/// caption (which runs are missing, if any).
fn write_outputs(
    args: &Args,
    cfg: &lm::Config,
    source: &str,
    runs: &[RunResult],
    vocab: usize,
    note: &str,
) -> Result<Written> {
    let csv = args.out.join("train_lm.csv");
    replace_file(&csv, |p| write_csv(p, runs))?;
    let mut others = Vec::new();
    let timing = cfg.timing;
    let mut table = String::from(if timing {
        "| optimizer | peak lr | final val loss (nats/char) | seconds/run | tokens/s | optimizer share of step time |\n|---|---|---|---|---|---|\n"
    } else {
        "| optimizer | peak lr | final val loss (nats/char) | seconds/run |\n|---|---|---|---|\n"
    });
    for kind in &args.optimizers {
        let mine: Vec<&RunResult> = runs.iter().filter(|r| r.kind == *kind).collect();
        if mine.is_empty() {
            continue;
        }
        let finals: Vec<f64> = mine.iter().map(|r| r.final_val()).collect();
        let (m, s) = mean_std(&finals);
        let secs = mine.iter().map(|r| r.seconds).sum::<f64>() / mine.len() as f64;
        let spread = if finals.len() > 1 {
            format!(" ± {s:.4}")
        } else {
            String::new()
        };
        let radius = if *kind == OptKind::MuonSpectralSphere {
            format!(" (r = {})", fmt_num(cfg.radius))
        } else {
            String::new()
        };
        let timed = if timing {
            let tps: Vec<f64> = mine.iter().map(|r| r.timing.tokens_per_s()).collect();
            let share: Vec<f64> = mine.iter().map(|r| r.timing.optimizer_share()).collect();
            format!(
                " {:.0} | {:.1} % |",
                mean_std(&tps).0,
                100.0 * mean_std(&share).0
            )
        } else {
            String::new()
        };
        table.push_str(&format!(
            "| {} | {}{radius} | {m:.4}{spread} | {secs:.0} |{timed}\n",
            kind.name(),
            fmt_num(cfg.lr.unwrap_or(kind.default_lr()))
        ));
    }
    if timing {
        table.push_str(&phase_table(&args.optimizers, runs));
        let (tcsv, tjson) = (args.out.join("timing.csv"), args.out.join("timing.json"));
        write_timing(&tcsv, &tjson, args, cfg, runs)?;
        others.push(tcsv);
        others.push(tjson);
    }
    let sphere = if args.optimizers.contains(&OptKind::MuonSpectralSphere) {
        format!(
            " (sphere: r={}, no decay on its matrices)",
            fmt_num(cfg.radius)
        )
    } else {
        String::new()
    };
    let gram = if cfg.gram_ns {
        ", Gram Newton–Schulz"
    } else {
        ""
    };
    let stopped = match cfg.stop_after {
        Some(n) if n < cfg.steps => format!(" (stopped after {n})"),
        _ => String::new(),
    };
    let caption = format!(
        "{source}; {} layers, d={}, context {}, {} steps{stopped} × batch {}, λ={}{sphere}{gram}; {} seed(s)",
        cfg.layers,
        cfg.d_model,
        cfg.context,
        cfg.steps,
        cfg.batch,
        fmt_num(cfg.weight_decay),
        args.seeds
    );
    let caption = if timing {
        format!(
            "{caption}; {} parameters; device {}",
            cfg.param_count(vocab),
            args.device
        )
    } else {
        caption
    };
    let caption = format!("{caption}{note}");
    let svg = args.out.join("train_lm.svg");
    let png = args.out.join("train_lm.png");
    replace_files(&[&svg, &png], |p| {
        plot::write(&p[0], &p[1], &figure(runs, &args.optimizers), &caption)
    })?;
    let summary = args.out.join("summary.md");
    replace_file(&summary, |p| {
        Ok(support::create(p)?.write_all(format!("{caption}\n\n{table}").as_bytes())?)
    })?;
    if let Some(path) = &args.loss_log {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        replace_file(path, |p| write_loss_log(p, runs)).context("--loss-log")?;
        others.push(path.clone());
    }
    Ok(Written {
        table,
        csv,
        svg,
        png,
        summary,
        others,
    })
}

/// The outputs of the finished runs (see `OUTPUT_HELP`), and the results
/// table and the paths on stdout; `note` ends the caption.
fn report(
    args: &Args,
    cfg: &lm::Config,
    source: &str,
    runs: &[RunResult],
    note: &str,
    vocab: usize,
    wall: f64,
) -> Result<()> {
    let w = write_outputs(args, cfg, source, runs, vocab, note)?;
    println!("{}", w.table);
    println!(
        "wrote {}, {}, {}, {} ({:.0} s)",
        w.csv.display(),
        w.svg.display(),
        w.png.display(),
        w.summary.display(),
        wall
    );
    if !w.others.is_empty() {
        let others: Vec<String> = w.others.iter().map(|p| p.display().to_string()).collect();
        println!("wrote {}", others.join(", "));
    }
    Ok(())
}

/// One line per finished run: throughput and the optimizer's share.
fn run_line(r: &RunResult) -> String {
    let t = &r.timing;
    format!(
        "train_lm: {} seed {}: {} steps in {:.1} s, {:.0} tokens/s, {:.1} ms/step (optimizer {:.1} % of it), final val loss {:.4}",
        r.kind.name(),
        r.seed,
        r.losses.len(),
        r.seconds,
        t.tokens_per_s(),
        1e3 * t.step_s() / t.steps.max(1) as f64,
        100.0 * t.optimizer_share(),
        r.final_val()
    )
}

/// Milliseconds per step by phase (mean over seeds), for summary.md.
fn phase_table(kinds: &[OptKind], runs: &[RunResult]) -> String {
    let mut t = String::from(
        "\nms per timed step (step 1 excluded; phases fenced with device.synchronize()):\n\n\
         | optimizer | forward | backward | clip | optimizer step | total |\n|---|---|---|---|---|---|\n",
    );
    for kind in kinds {
        let mine: Vec<&RunResult> = runs.iter().filter(|r| r.kind == *kind).collect();
        if mine.is_empty() {
            continue;
        }
        let ms = |f: &dyn Fn(&lm::Timing) -> f64| -> f64 {
            let xs: Vec<f64> = mine
                .iter()
                .map(|r| 1e3 * f(&r.timing) / r.timing.steps.max(1) as f64)
                .collect();
            mean_std(&xs).0
        };
        t.push_str(&format!(
            "| {} | {:.2} | {:.2} | {:.2} | {:.2} | {:.2} |\n",
            kind.name(),
            ms(&|t| t.forward_s),
            ms(&|t| t.backward_s),
            ms(&|t| t.clip_s),
            ms(&|t| t.optimizer_s),
            ms(&|t| t.step_s()),
        ));
    }
    t
}

/// `timing.csv` and `timing.json`: one row / object per run.
fn write_timing(
    csv_path: &Path,
    json_path: &Path,
    args: &Args,
    cfg: &lm::Config,
    runs: &[RunResult],
) -> Result<()> {
    replace_file(csv_path, |p| write_timing_csv(p, &args.device, runs))?;
    let objs: Vec<serde_json::Value> = runs
        .iter()
        .map(|r| {
            let t = &r.timing;
            serde_json::json!({
                "optimizer": r.kind.name(),
                "seed": r.seed,
                "device": args.device,
                "preset": args.preset,
                "layers": cfg.layers,
                "d_model": cfg.d_model,
                "heads": cfg.heads,
                "context": cfg.context,
                "batch": cfg.batch,
                "steps": r.losses.len(),
                "steps_timed": t.steps,
                "tokens": t.tokens,
                "synchronized": t.synchronized,
                "forward_s": t.forward_s,
                "backward_s": t.backward_s,
                "clip_s": t.clip_s,
                "optimizer_s": t.optimizer_s,
                "step_ms": 1e3 * t.step_s() / t.steps.max(1) as f64,
                "tokens_per_s": t.tokens_per_s(),
                "optimizer_share": t.optimizer_share(),
                "run_s": r.seconds,
                "final_val_loss": r.final_val(),
                "eval_every": cfg.eval_every,
                "first_step_s": t.first_step_s,
                "eval_s": t.eval_s,
                "evals": t.evals,
                "first_eval_s": t.first_eval_s,
            })
        })
        .collect();
    replace_file(json_path, |p| {
        let text = serde_json::to_string_pretty(&objs)? + "\n";
        Ok(support::create(p)?.write_all(text.as_bytes())?)
    })
}

/// `timing.csv`: one row per run.
fn write_timing_csv(path: &Path, device: &str, runs: &[RunResult]) -> Result<()> {
    let mut w = csv::Writer::from_writer(support::create(path)?);
    w.write_record([
        "optimizer",
        "seed",
        "device",
        "steps_timed",
        "tokens",
        "forward_s",
        "backward_s",
        "clip_s",
        "optimizer_s",
        "step_ms",
        "tokens_per_s",
        "optimizer_share",
        "run_s",
        "first_step_s",
        "eval_s",
        "evals",
        "first_eval_s",
    ])?;
    for r in runs {
        let t = &r.timing;
        let step_ms = 1e3 * t.step_s() / t.steps.max(1) as f64;
        w.write_record([
            r.kind.name().to_string(),
            r.seed.to_string(),
            device.to_string(),
            t.steps.to_string(),
            t.tokens.to_string(),
            format!("{:.6}", t.forward_s),
            format!("{:.6}", t.backward_s),
            format!("{:.6}", t.clip_s),
            format!("{:.6}", t.optimizer_s),
            format!("{step_ms:.4}"),
            format!("{:.1}", t.tokens_per_s()),
            format!("{:.5}", t.optimizer_share()),
            format!("{:.3}", r.seconds),
            format!("{:.6}", t.first_step_s),
            format!("{:.6}", t.eval_s),
            t.evals.to_string(),
            format!("{:.6}", t.first_eval_s),
        ])?;
    }
    w.flush()?;
    Ok(())
}

/// `--loss-log`: every step's training loss (f32, written exactly).
fn write_loss_log(path: &Path, runs: &[RunResult]) -> Result<()> {
    let mut w = csv::Writer::from_writer(support::create(path)?);
    w.write_record(["optimizer", "seed", "step", "train_loss"])?;
    for r in runs {
        for (i, l) in r.losses.iter().enumerate() {
            w.write_record([
                r.kind.name().to_string(),
                r.seed.to_string(),
                (i + 1).to_string(),
                format!("{}", *l as f32),
            ])?;
        }
    }
    w.flush()?;
    Ok(())
}

/// How this process takes part in the runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
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

/// A process with `RANK` and an NCCL id (`STEEPEST_NCCL_ID` or
/// `STEEPEST_NCCL_ID_FILE`) in its environment is a rank; otherwise
/// `--device cuda --ranks N > 1` launches N of them.
fn role(args: &Args) -> Role {
    let env = |k: &str| std::env::var_os(k).is_some();
    let rank_env = env("RANK") && (env("STEEPEST_NCCL_ID") || env("STEEPEST_NCCL_ID_FILE"));
    match (args.device.as_str(), args.cfg.ranks, rank_env) {
        ("cuda", _, true) => Role::NcclRank,
        ("cuda", n, false) if n > 1 => Role::Launcher,
        _ => Role::Local,
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
    use std::process::{Child, Command};
    let id = steepest::distributed::NcclId::new()?;
    let exe = std::env::current_exe().context("finding this program to start the ranks")?;
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    eprintln!("train_lm: starting {ranks} ranks over NCCL, one GPU each");
    let mut children: Vec<Option<Child>> = Vec::new();
    let stop = |children: &mut Vec<Option<Child>>| {
        for c in children.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    };
    for r in 0..ranks {
        let spawned = Command::new(&exe)
            .args(&args)
            .env("RANK", r.to_string())
            .env("WORLD_SIZE", ranks.to_string())
            .env("LOCAL_RANK", r.to_string())
            .env("STEEPEST_NCCL_ID", id.to_hex())
            .spawn();
        match spawned {
            Ok(c) => children.push(Some(c)),
            Err(e) => {
                stop(&mut children);
                bail!("starting rank {r}: {e}");
            }
        }
    }
    loop {
        let mut running = 0;
        let mut failed = None;
        for (r, slot) in children.iter_mut().enumerate() {
            let Some(c) = slot else { continue };
            match c.try_wait()? {
                None => running += 1,
                Some(status) => {
                    if !status.success() && failed.is_none() {
                        failed = Some((r, status));
                    }
                    *slot = None;
                }
            }
        }
        if let Some((r, status)) = failed {
            stop(&mut children);
            bail!("rank {r} failed ({status}); the other ranks were stopped");
        }
        if running == 0 {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
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
    Ok(Device::new_cuda(env.local_rank)?)
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
