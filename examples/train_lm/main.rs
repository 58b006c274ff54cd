//! train_lm: a small char-level GPT trained with AdamW / Muon, each with
//! decoupled or spectral weight decay, and Muon on the spectral sphere, on a
//! built-in corpus (or any text file). Writes a CSV log, an SVG figure (validation loss; σ₁ of every weight
//! matrix over training) and a results table.
//!
//!     cargo run --example train_lm                 # all 5 optimizers, 1 seed
//!     cargo run --example train_lm -- --seeds 3    # the README table
//!     cargo run --example train_lm -- --help

mod lm;
mod plot;

use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use lm::{builtin_corpus, train, Config, Data, OptKind, Record, RunResult};

/// The CLI names of the optimizers, for error messages.
fn optimizer_names() -> String {
    OptKind::ALL.map(|k| k.name()).join(", ")
}

const USAGE: &str = "\
train_lm — train a small char-level GPT and compare optimizers

USAGE:
    cargo run --example train_lm -- [OPTIONS]

OPTIONS:
    --optimizer NAME   adamw | adamw-spectral | muon | muon-spectral |
                       muon-spectral-sphere | all                            [all]
    --steps N          optimizer steps per run                               [300]
    --seeds N          seeds per optimizer (mean ± std in the table)         [1]
    --data PATH        train on this text file instead of the built-in corpus
    --out DIR          output directory                                      [runs/train_lm]
    --device DEV       cpu | cuda (cuda needs `--features cuda`)             [cpu]
    --lr X             peak learning rate for every chosen optimizer
                       (defaults: AdamW 3e-3, Muon 0.02, sphere 0.02)
    --wd X             weight decay λ (decoupled or spectral; muon-spectral-sphere
                       decays only its AdamW part)                           [0.1]
    --radius X         spectral-sphere radius r, ‖W‖₂ = r                    [2]
    --batch N          sequences of 64 characters per batch                  [16]
    --eval-every N     steps between evaluations                             [20]
    --jobs N           runs trained at once, one thread each                 [CPU cores]
                       (set RAYON_NUM_THREADS to give each run more threads)
    -h, --help         this text

OUTPUT (in --out):
    train_lm.csv   step, optimizer, seed, lr, train_loss, val_loss, sigma1 of each weight matrix
    train_lm.svg   validation loss per optimizer; σ₁ of each weight matrix over training
    summary.md     final validation loss per optimizer (mean ± std over seeds)
";

struct Args {
    optimizers: Vec<OptKind>,
    seeds: u64,
    data: Option<PathBuf>,
    out: PathBuf,
    device: String,
    jobs: usize,
    cfg: Config,
}

fn parse_num<T: std::str::FromStr>(flag: &str, v: Option<String>) -> Result<T> {
    let v = v.with_context(|| format!("{flag} needs a value (see --help)"))?;
    v.parse::<T>()
        .map_err(|_| anyhow::anyhow!("{flag}: cannot parse `{v}` as a number (see --help)"))
}

fn parse_args() -> Result<Option<Args>> {
    let mut a = Args {
        optimizers: OptKind::ALL.to_vec(),
        seeds: 1,
        data: None,
        out: PathBuf::from("runs/train_lm"),
        device: "cpu".into(),
        jobs: std::thread::available_parallelism().map_or(1, |n| n.get()),
        cfg: Config::default(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "-h" | "--help" => return Ok(None),
            "--optimizer" => {
                let v = it
                    .next()
                    .context("--optimizer needs a value (see --help)")?;
                a.optimizers = if v == "all" {
                    OptKind::ALL.to_vec()
                } else {
                    vec![OptKind::parse(&v).with_context(|| {
                        format!(
                            "--optimizer: unknown `{v}`; use {} or all",
                            optimizer_names()
                        )
                    })?]
                };
            }
            "--steps" => a.cfg.steps = parse_num(&flag, it.next())?,
            "--seeds" => a.seeds = parse_num(&flag, it.next())?,
            "--batch" => a.cfg.batch = parse_num(&flag, it.next())?,
            "--eval-every" => a.cfg.eval_every = parse_num(&flag, it.next())?,
            "--jobs" => a.jobs = parse_num(&flag, it.next())?,
            "--lr" => a.cfg.lr = Some(parse_num(&flag, it.next())?),
            "--wd" => a.cfg.weight_decay = parse_num(&flag, it.next())?,
            "--radius" => a.cfg.radius = parse_num(&flag, it.next())?,
            "--data" => a.data = Some(it.next().context("--data needs a path")?.into()),
            "--out" => a.out = it.next().context("--out needs a directory")?.into(),
            "--device" => a.device = it.next().context("--device needs cpu or cuda")?,
            other => bail!("unknown argument `{other}` (see --help)"),
        }
    }
    if a.cfg.steps == 0 {
        bail!("--steps must be ≥ 1");
    }
    if a.seeds == 0 {
        bail!("--seeds must be ≥ 1");
    }
    if a.cfg.batch == 0 || a.cfg.eval_every == 0 || a.jobs == 0 {
        bail!("--batch, --eval-every and --jobs must be ≥ 1");
    }
    if let Some(lr) = a.cfg.lr {
        if !(lr.is_finite() && lr > 0.0) {
            bail!("--lr must be a positive number, got {lr}");
        }
    }
    let r = a.cfg.radius;
    if !(r.is_finite() && r > 0.0) {
        bail!("--radius must be a positive number, got {r}");
    }
    let wd = a.cfg.weight_decay;
    if !(wd.is_finite() && wd >= 0.0) {
        bail!("--wd must be ≥ 0, got {wd}");
    }
    Ok(Some(a))
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

/// A one-line progress bar on stderr, redrawn at most every 100 ms.
struct Progress {
    total: usize,
    /// Steps done, per run.
    done: Vec<usize>,
    start: Instant,
    last_draw: Option<Instant>,
}

impl Progress {
    fn draw(&mut self, what: &str, val: Option<f64>, force: bool) {
        let now = Instant::now();
        if !force
            && self
                .last_draw
                .is_some_and(|t| now.duration_since(t).as_millis() < 100)
        {
            return;
        }
        self.last_draw = Some(now);
        let done: usize = self.done.iter().sum();
        let frac = done as f64 / self.total.max(1) as f64;
        let width = 30;
        let filled = (frac * width as f64).round() as usize;
        let elapsed = self.start.elapsed().as_secs_f64();
        let eta = if done > 0 {
            elapsed / done as f64 * (self.total - done) as f64
        } else {
            0.0
        };
        let val = val.map(|v| format!(" val {v:.3}")).unwrap_or_default();
        eprint!(
            "\r[{}{}] {:3.0}% {what}{val}  {:.0}s elapsed, ~{:.0}s left   ",
            "#".repeat(filled),
            ".".repeat(width - filled),
            100.0 * frac,
            elapsed,
            eta
        );
        let _ = std::io::stderr().flush();
    }
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

fn write_csv(path: &PathBuf, runs: &[RunResult]) -> Result<()> {
    let mut s = String::from("step,optimizer,seed,lr,train_loss,val_loss");
    if let Some(r) = runs.first() {
        for m in &r.matrices {
            s.push_str(&format!(",sigma1:{m}"));
        }
    }
    s.push('\n');
    for r in runs {
        for rec in &r.records {
            s.push_str(&format!(
                "{},{},{},{:.6e},{:.6},{:.6}",
                rec.step,
                r.kind.name(),
                r.seed,
                rec.lr,
                rec.train_loss,
                rec.val_loss
            ));
            for sg in &rec.sigmas {
                s.push_str(&format!(",{sg:.6}"));
            }
            s.push('\n');
        }
    }
    std::fs::write(path, s).with_context(|| format!("writing {}", path.display()))
}

fn figure(runs: &[RunResult], kinds: &[OptKind], caption: &str) -> String {
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
    let panels = [
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
    ];
    plot::svg(&panels, caption)
}

/// Errors are printed as one clear message (no backtrace) with exit code 1.
fn main() -> std::process::ExitCode {
    match real_main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\ntrain_lm: error: {e:#}");
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
    let Some(args) = parse_args()? else {
        print!("{USAGE}");
        return Ok(());
    };
    let device = device(&args.device)?;
    let cfg = args.cfg.clone();
    let (text, source) = match &args.data {
        Some(p) => (
            std::fs::read_to_string(p)
                .with_context(|| format!("--data: cannot read {}", p.display()))?,
            p.display().to_string(),
        ),
        None => (builtin_corpus(0, 400_000), "built-in corpus".to_string()),
    };
    let data = Data::from_text(&text, cfg.context).context("--data")?;
    std::fs::create_dir_all(&args.out)
        .with_context(|| format!("creating {}", args.out.display()))?;
    eprintln!(
        "train_lm: {source}, {} train / {} val chars, vocab {}; model {} layers, d={}, {} heads, context {}; \
         {} steps × batch {}; optimizers {:?}; seeds {}; device {}",
        data.train.len(),
        data.val.len(),
        data.vocab.len(),
        cfg.layers,
        cfg.d_model,
        cfg.heads,
        cfg.context,
        cfg.steps,
        cfg.batch,
        args.optimizers.iter().map(|k| k.name()).collect::<Vec<_>>(),
        args.seeds,
        args.device
    );
    // The runs are independent: `jobs` worker threads take them in turn, each
    // run single-threaded (RAYON_NUM_THREADS=1, set in main), which on a small
    // shared CPU is much faster than one run with threads contending.
    let mut queue: Vec<(u64, OptKind)> = Vec::new();
    for seed in 0..args.seeds {
        for &kind in &args.optimizers {
            queue.push((seed, kind));
        }
    }
    let jobs = args.jobs.min(queue.len()).max(1);
    let n_runs = queue.len();
    let progress = Mutex::new(Progress {
        total: n_runs * cfg.steps,
        done: vec![0; n_runs],
        start: Instant::now(),
        last_draw: None,
    });
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<(usize, Result<RunResult>)>> = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..jobs {
            scope.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(&(seed, kind)) = queue.get(i) else {
                    break;
                };
                let mut last_val = None;
                let mut cb = |step: usize, rec: Option<&Record>| {
                    if let Some(r) = rec {
                        last_val = Some(r.val_loss);
                    }
                    let mut p = progress.lock().expect("progress lock");
                    p.done[i] = step;
                    let what = format!("{} seed {seed} step {step}/{}", kind.name(), cfg.steps);
                    p.draw(&what, last_val, false);
                };
                let run = train(kind, seed, &cfg, &data, &device, &mut cb)
                    .with_context(|| format!("training with {} (seed {seed})", kind.name()));
                results.lock().expect("results lock").push((i, run));
            });
        }
    });
    progress
        .lock()
        .expect("progress lock")
        .draw("done", None, true);
    eprintln!();
    let mut results = results.into_inner().expect("results lock");
    results.sort_by_key(|(i, _)| *i);
    let runs: Vec<RunResult> = results.into_iter().map(|(_, r)| r).collect::<Result<_>>()?;
    let wall = progress
        .lock()
        .expect("progress lock")
        .start
        .elapsed()
        .as_secs_f64();

    let csv = args.out.join("train_lm.csv");
    write_csv(&csv, &runs)?;
    let mut table = String::from(
        "| optimizer | peak lr | final val loss (nats/char) | seconds/run |\n|---|---|---|---|\n",
    );
    for kind in &args.optimizers {
        let mine: Vec<&RunResult> = runs.iter().filter(|r| r.kind == *kind).collect();
        let finals: Vec<f64> = mine.iter().map(|r| r.final_val()).collect();
        let (m, s) = mean_std(&finals);
        let secs = mine.iter().map(|r| r.seconds).sum::<f64>() / mine.len() as f64;
        let spread = if finals.len() > 1 {
            format!(" ± {s:.4}")
        } else {
            String::new()
        };
        let radius = if *kind == OptKind::MuonSpectralSphere {
            format!(" (r = {})", cfg.radius)
        } else {
            String::new()
        };
        table.push_str(&format!(
            "| {} | {}{radius} | {m:.4}{spread} | {secs:.0} |\n",
            kind.name(),
            cfg.lr.unwrap_or(kind.default_lr())
        ));
    }
    let sphere = if args.optimizers.contains(&OptKind::MuonSpectralSphere) {
        format!(" (sphere: r={}, no decay on its matrices)", cfg.radius)
    } else {
        String::new()
    };
    let caption = format!(
        "{source}; {} layers, d={}, context {}, {} steps × batch {}, λ={}{sphere}; {} seed(s)",
        cfg.layers, cfg.d_model, cfg.context, cfg.steps, cfg.batch, cfg.weight_decay, args.seeds
    );
    let svg = args.out.join("train_lm.svg");
    std::fs::write(&svg, figure(&runs, &args.optimizers, &caption))
        .with_context(|| format!("writing {}", svg.display()))?;
    let summary = args.out.join("summary.md");
    std::fs::write(&summary, format!("{caption}\n\n{table}"))?;
    println!("{table}");
    println!(
        "wrote {}, {}, {} ({:.0} s)",
        csv.display(),
        svg.display(),
        summary.display(),
        wall
    );
    Ok(())
}
