//! train_lm's command line: the options (clap), the presets' defaults
//! filled in, and the checks that need more than one option.

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::Parser;

use crate::lm::{Config, OptKind};

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
written). When none finished, summary.md says so. Files of these names that the
run does not write (timing.* without --timing; all but summary.md when no run
finished) are removed, so that none left by an earlier run passes for this one's.
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
    /// Optimizer steps per run (the schedule's length, up to 10⁹) [default: 300; --preset gpu: 600]
    #[arg(long, value_name = "N", value_parser = step_count, allow_negative_numbers = true)]
    steps: Option<usize>,
    /// Stop each run after N steps of its schedule (to compare the first steps of two runs)
    #[arg(long, value_name = "N", value_parser = at_least::<usize, 1>, allow_negative_numbers = true)]
    stop_after: Option<usize>,
    /// Seeds per optimizer (mean ± std in the table)
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = at_least::<u64, 1>, allow_negative_numbers = true)]
    seeds: u64,
    /// The first seed (runs use seeds S, S+1, …)
    #[arg(long, value_name = "S", default_value_t = 0, value_parser = whole::<u64>, allow_negative_numbers = true)]
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
    /// Spectral-sphere radius r, ‖W‖₂ = r (muon-spectral-sphere) [default: 2]
    #[arg(long, value_name = "X", value_parser = positive, allow_negative_numbers = true)]
    radius: Option<f64>,
    /// Sequences (of the preset's context length) per batch [default: 16; --preset gpu: 64]
    #[arg(long, value_name = "N", value_parser = at_least::<usize, 1>, allow_negative_numbers = true)]
    batch: Option<usize>,
    /// Steps between evaluations [default: 20; --preset gpu: 50]
    #[arg(long, value_name = "N", value_parser = at_least::<usize, 1>, allow_negative_numbers = true)]
    eval_every: Option<usize>,
    /// Runs trained at once, one thread each (set RAYON_NUM_THREADS to give each run more threads) [default: CPU cores / ranks; with --device cuda: 1]
    #[arg(long, value_name = "N", value_parser = at_least::<usize, 1>, allow_negative_numbers = true)]
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
    /// Newton–Schulz iterations in bf16 for the Muon runs and the spectral sphere (NewtonSchulz::with_compute_dtype; the update is applied in the parameters' f32), as Muon usually runs on GPUs
    #[arg(long)]
    ns_bf16: bool,
    /// muon-spectral-sphere: solve the dual at every step with up to K msigns (DualAscent::bracket: exactly tangent directions) instead of one dual step
    #[arg(long, value_name = "K", value_parser = at_least::<usize, 2>, allow_negative_numbers = true)]
    sphere_bracket: Option<usize>,
    /// Add the spectral norm penalty μ/2 Σ σ₁(W)² (μ = X) over every weight matrix to each run's training loss (penalty::SpectralNormPenalty::add_to_grads, Yoshida & Miyato: spectral decay's coupled form, one warm-started power iteration per step; on muon-spectral-sphere's block matrices, whose σ₁ the sphere fixes, its gradient lies along Θ = u₁v₁ᵀ, which the dual multiplier absorbs); the logged losses leave it out [default: 0, off]
    #[arg(long, value_name = "X", value_parser = non_negative, allow_negative_numbers = true)]
    spectral_penalty: Option<f64>,
    /// Data-parallel ranks per run, each on batch/N sequences: on the CPU, N in-process ranks (threads); with --device cuda, N processes over NCCL, one GPU each (needs --features nccl)
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = at_least::<usize, 1>, allow_negative_numbers = true)]
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

/// An integer ≥ `MIN`.
fn at_least<T: std::str::FromStr + PartialOrd + From<u8>, const MIN: u8>(
    s: &str,
) -> Result<T, String> {
    match s.parse::<T>() {
        Ok(n) if n >= T::from(MIN) => Ok(n),
        _ => Err(format!("must be an integer ≥ {MIN}")),
    }
}

/// A step count in `1..=10⁹` (far beyond any run here; larger counts
/// overflowed the run queue's arithmetic and its loss log's allocation).
fn step_count(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=1_000_000_000).contains(&n) => Ok(n),
        _ => Err("must be an integer in 1..=1000000000".into()),
    }
}

/// An integer ≥ 0.
fn whole<T: std::str::FromStr>(s: &str) -> Result<T, String> {
    s.parse::<T>().map_err(|_| "must be an integer ≥ 0".into())
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
#[derive(Debug)]
pub struct Args {
    /// The preset's name (`--preset`).
    pub preset: String,
    /// The optimizers to train, each once, in the order given (`all` expanded).
    pub optimizers: Vec<OptKind>,
    /// Seeds per optimizer.
    pub seeds: u64,
    /// The first seed.
    pub first_seed: u64,
    /// A text file to train on instead of the built-in corpus.
    pub data: Option<PathBuf>,
    /// The output directory.
    pub out: PathBuf,
    /// `cpu` or `cuda`.
    pub device: String,
    /// Runs trained at once (one thread each).
    pub jobs: usize,
    /// Where to write every step's training loss, if anywhere.
    pub loss_log: Option<PathBuf>,
    /// Let the CUDA memory pool return freed memory to the driver.
    pub release_freed_memory: bool,
    /// The run's configuration: the preset with the options applied.
    pub cfg: Config,
    /// Options given that change nothing in these runs (one line each, for
    /// the user: the command still runs).
    pub warnings: Vec<String>,
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
            c.optimizer.clone()
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
        let warnings = ignored_options(&c, &optimizers);
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
            warnings,
            cfg: Config {
                steps: c.steps.unwrap_or(preset.steps),
                batch: c.batch.unwrap_or(preset.batch),
                eval_every: c.eval_every.unwrap_or(preset.eval_every),
                lr: c.lr,
                weight_decay: c.wd,
                radius: c.radius.unwrap_or(preset.radius),
                ranks: c.ranks,
                stop_after: c.stop_after,
                timing: c.timing || cuda,
                gram_ns: c.gram_ns,
                ns_bf16: c.ns_bf16,
                spectral_penalty: c.spectral_penalty.unwrap_or(0.0),
                sphere_bracket: c.sphere_bracket,
                bf16_updates: c.bf16_updates,
                ..preset
            },
        }
    }
}

/// The options of `c` that change nothing for these `optimizers` and this
/// device, each with why (the defaults say nothing).
fn ignored_options(c: &Cli, optimizers: &[OptKind]) -> Vec<String> {
    let cuda = c.device == "cuda";
    let mut w = Vec::new();
    if c.sphere_bracket.is_some() && !optimizers.contains(&OptKind::MuonSpectralSphere) {
        w.push("--sphere-bracket has no effect: it solves the dual of muon-spectral-sphere, which is not among the optimizers".into());
    }
    if c.radius.is_some() && !optimizers.contains(&OptKind::MuonSpectralSphere) {
        w.push("--radius has no effect: it is the radius of muon-spectral-sphere, which is not among the optimizers".into());
    }
    if c.gram_ns && !optimizers.iter().any(|k| k.uses_newton_schulz()) {
        w.push("--gram-ns has no effect: none of the optimizers runs Newton–Schulz".into());
    }
    if c.ns_bf16 && !optimizers.iter().any(|k| k.uses_newton_schulz()) {
        w.push("--ns-bf16 has no effect: none of the optimizers runs Newton–Schulz".into());
    }
    if !cuda && c.release_freed_memory {
        w.push("--release-freed-memory has no effect without --device cuda".into());
    }
    match c.jobs {
        Some(_) if cuda && c.ranks > 1 => w.push(
            "--jobs has no effect over NCCL (--device cuda --ranks N): the ranks train the runs one after another".into(),
        ),
        Some(j) if cuda && j > 1 => w.push(format!(
            "--jobs {j} on one GPU: the runs share it, and each run's timing counts the others' work"
        )),
        _ => {}
    }
    w
}

/// What the command line asks for.
#[derive(Debug)]
pub enum Parsed {
    /// Train, with these arguments.
    Run(Box<Args>),
    /// `--help` (or `-h`): print this and stop.
    Help(clap::Error),
}

/// The arguments from `argv` (the program's name first), checked. A usage
/// error is returned as one line: clap's message and hints, without its
/// usage block.
pub fn parse<I, T>(argv: I) -> Result<Parsed>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let args: Args = match Cli::try_parse_from(argv) {
        Ok(cli) => cli.into(),
        Err(e) if !e.use_stderr() => return Ok(Parsed::Help(e)),
        Err(e) => bail!("{}", usage_error(&e)),
    };
    if !args.cfg.batch.is_multiple_of(args.cfg.ranks) {
        bail!(
            "--batch {} must be divisible by --ranks {} (each rank trains on batch/ranks sequences)",
            args.cfg.batch,
            args.cfg.ranks
        );
    }
    if args.cfg.bf16_updates && args.cfg.ranks == 1 {
        bail!("--bf16-updates changes what the ranks exchange: it needs --ranks N > 1");
    }
    Ok(Parsed::Run(Box::new(args)))
}

/// clap's error as one line, ending with a pointer to `--help`.
fn usage_error(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let msg: Vec<&str> = text
        .lines()
        .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more information"))
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let msg = msg.join("; ");
    format!("{} (see --help)", msg.trim_start_matches("error: "))
}
