//! train_lm's outputs (see `--help`): the CSV log, the results table and
//! summary.md, the figure, the timing files and the loss log, written from
//! the finished runs.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::cli::Args;
use crate::lm::{self, OptKind, RunResult};
use crate::plot;
use crate::support::{self, fmt_num, replace_file, replace_files};

/// The mean and the sample standard deviation (n − 1; 0 for one value).
pub fn mean_std(xs: &[f64]) -> (f64, f64) {
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
pub fn write_csv(path: &Path, runs: &[RunResult]) -> Result<()> {
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
pub fn figure(runs: &[RunResult], kinds: &[OptKind]) -> [plot::Panel; 2] {
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

/// The files [`write_outputs`] writes in `out` (without the loss log).
pub fn output_paths(out: &Path, timing: bool) -> Vec<PathBuf> {
    let mut names = vec!["train_lm.csv", "train_lm.svg", "train_lm.png", "summary.md"];
    if timing {
        names.extend(["timing.csv", "timing.json"]);
    }
    names.into_iter().map(|n| out.join(n)).collect()
}

/// Refuses a `--loss-log` path that is one of the outputs in `out` (the
/// loss log would overwrite it, or it the loss log), compared as paths with
/// their directories resolved (`runs/x/../x/summary.md` is `summary.md`
/// in `runs/x`). Call it after the directories exist.
pub fn check_loss_log(loss_log: &Path, out: &Path) -> Result<()> {
    let resolved = |p: &Path| -> Option<PathBuf> {
        let dir = p
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        Some(std::fs::canonicalize(dir).ok()?.join(p.file_name()?))
    };
    let log = resolved(loss_log);
    for path in output_paths(out, true) {
        if log.is_some() && resolved(&path) == log {
            bail!(
                "--loss-log {} is the output {} of --out: choose another path",
                loss_log.display(),
                path.display()
            );
        }
    }
    Ok(())
}

/// What [`write_outputs`] wrote: the results table (also in summary.md) and
/// the paths.
pub struct Written {
    /// The results table ([`results_table`]).
    pub table: String,
    /// `train_lm.csv`.
    pub csv: PathBuf,
    /// `train_lm.svg`.
    pub svg: PathBuf,
    /// `train_lm.png`.
    pub png: PathBuf,
    /// `summary.md`.
    pub summary: PathBuf,
    /// The loss log and the timing files, if written.
    pub others: Vec<PathBuf>,
}

/// The CSV log, the timing files, the figure, summary.md and the loss log
/// for `runs` (see `--help`), each replaced whole (the loss log last:
/// a path given apart from --out, the likeliest to fail). `note` ends the
/// caption (which runs are missing, if any).
pub fn write_outputs(
    args: &Args,
    source: &str,
    runs: &[RunResult],
    vocab: usize,
    note: &str,
) -> Result<Written> {
    let cfg = &args.cfg;
    let csv = args.out.join("train_lm.csv");
    replace_file(&csv, |p| write_csv(p, runs))?;
    let mut others = Vec::new();
    let table = results_table(&args.optimizers, cfg, runs);
    let (tcsv, tjson) = (args.out.join("timing.csv"), args.out.join("timing.json"));
    if !cfg.timing {
        // an earlier run's, which would pass for this one's
        remove_stale(&[&tcsv, &tjson])?;
    }
    if cfg.timing {
        write_timing(&tcsv, &tjson, args, runs)?;
        others.push(tcsv);
        others.push(tjson);
    }
    let caption = caption(args, source, vocab, note);
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

/// The results table: per optimizer of `kinds` that has runs, the peak
/// rate, the final validation loss (mean ± std over seeds), seconds per run
/// and, with `cfg.timing`, tokens/s, the optimizer's share of step time and
/// the phase table.
pub fn results_table(kinds: &[OptKind], cfg: &lm::Config, runs: &[RunResult]) -> String {
    let timing = cfg.timing;
    let mut table = String::from(if timing {
        "| optimizer | peak lr | final val loss (nats/char) | seconds/run | tokens/s | optimizer share of step time |\n|---|---|---|---|---|---|\n"
    } else {
        "| optimizer | peak lr | final val loss (nats/char) | seconds/run |\n|---|---|---|---|\n"
    });
    for kind in kinds {
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
            // Over the runs with a timed step (not a run of one step).
            let tps: Vec<f64> = mine
                .iter()
                .filter_map(|r| r.timing.tokens_per_s())
                .collect();
            let share: Vec<f64> = mine
                .iter()
                .filter_map(|r| r.timing.optimizer_share())
                .collect();
            if tps.is_empty() {
                " n/a | n/a |".to_string()
            } else {
                format!(
                    " {:.0} | {:.1} % |",
                    mean_std(&tps).0,
                    100.0 * mean_std(&share).0
                )
            }
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
        table.push_str(&phase_table(kinds, runs));
    }
    table
}

/// The figure's caption and summary.md's first line: the data, the model,
/// the run sizes and the decay; with `args.cfg.timing`, the parameter count and
/// the device; then `note`.
pub fn caption(args: &Args, source: &str, vocab: usize, note: &str) -> String {
    let cfg = &args.cfg;
    let sphere = if args.optimizers.contains(&OptKind::MuonSpectralSphere) {
        let dual = match cfg.sphere_bracket {
            Some(k) => format!(", dual solved with ≤ {k} msigns"),
            None => String::new(),
        };
        format!(
            " (sphere: r={}, no decay on its matrices{dual})",
            fmt_num(cfg.radius)
        )
    } else {
        String::new()
    };
    let runs_ns = args.optimizers.iter().any(|k| k.uses_newton_schulz());
    let gram = match (runs_ns && cfg.gram_ns, runs_ns && cfg.ns_bf16) {
        (true, true) => ", Gram Newton–Schulz in bf16",
        (true, false) => ", Gram Newton–Schulz",
        (false, true) => ", Newton–Schulz in bf16",
        (false, false) => "",
    };
    let penalty = if cfg.spectral_penalty > 0.0 {
        format!(
            ", spectral norm penalty μ/2·Σσ₁² with μ={}",
            fmt_num(cfg.spectral_penalty)
        )
    } else {
        String::new()
    };
    let stopped = match cfg.stop_after {
        Some(n) if n < cfg.steps => format!(" (stopped after {n})"),
        _ => String::new(),
    };
    let caption = format!(
        "{source}; {} layers, d={}, context {}, {} steps{stopped} × batch {}, λ={}{sphere}{gram}{penalty}; {} seed(s)",
        cfg.layers,
        cfg.d_model,
        cfg.context,
        cfg.steps,
        cfg.batch,
        fmt_num(cfg.weight_decay),
        args.seeds
    );
    let caption = if cfg.timing {
        format!(
            "{caption}; {} parameters; device {}",
            cfg.param_count(vocab),
            args.device
        )
    } else {
        caption
    };
    format!("{caption}{note}")
}

/// Removes those of `paths` that are regular files (outputs of an earlier
/// run that this one does not write); a missing path is fine.
pub fn remove_stale(paths: &[&Path]) -> Result<()> {
    for p in paths {
        if std::fs::symlink_metadata(p).is_ok_and(|m| m.is_file()) {
            std::fs::remove_file(p).with_context(|| format!("removing {}", p.display()))?;
        }
    }
    Ok(())
}

/// When no run finished: summary.md says so (the caption, then `No run
/// finished` and `note`), and the other outputs of an earlier run in
/// `--out`, which would pass for this one's, are removed. Returns
/// summary.md's path.
pub fn write_no_runs(args: &Args, source: &str, vocab: usize, note: &str) -> Result<PathBuf> {
    let mut stale = output_paths(&args.out, true);
    let summary = args.out.join("summary.md");
    stale.retain(|p| *p != summary);
    remove_stale(&stale.iter().map(PathBuf::as_path).collect::<Vec<_>>())?;
    let caption = caption(args, source, vocab, "");
    replace_file(&summary, |p| {
        let text = format!("{caption}\n\nNo run finished{note}.\n");
        Ok(support::create(p)?.write_all(text.as_bytes())?)
    })?;
    Ok(summary)
}

/// The outputs of the finished runs (see `--help`), and the results
/// table and the paths on stdout; `note` ends the caption.
pub fn report(
    args: &Args,
    source: &str,
    runs: &[RunResult],
    note: &str,
    vocab: usize,
    wall: f64,
) -> Result<()> {
    let w = write_outputs(args, source, runs, vocab, note)?;
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

/// One line per finished run: throughput and the optimizer's share (none
/// for a run of one step, whose only step is not timed).
pub fn run_line(r: &RunResult) -> String {
    let t = &r.timing;
    let speed = match (t.tokens_per_s(), t.optimizer_share()) {
        (Some(tps), Some(share)) => format!(
            "{tps:.0} tokens/s, {:.1} ms/step (optimizer {:.1} % of it)",
            t.step_ms().unwrap_or(f64::NAN),
            100.0 * share
        ),
        _ => "no step timed (step 1 is not)".to_string(),
    };
    format!(
        "train_lm: {} seed {}: {} steps in {:.1} s, {speed}, final val loss {:.4}",
        r.kind.name(),
        r.seed,
        r.losses.len(),
        r.seconds,
        r.final_val()
    )
}

/// Milliseconds per step by phase (mean over seeds), for summary.md.
pub fn phase_table(kinds: &[OptKind], runs: &[RunResult]) -> String {
    let mut t = String::from(
        "\nms per timed step (step 1 excluded; phases fenced with device.synchronize()):\n\n\
         | optimizer | forward | backward | clip | optimizer step | total |\n|---|---|---|---|---|---|\n",
    );
    let mut rows = 0;
    for kind in kinds {
        // Runs of one step have no timed step.
        let mine: Vec<&RunResult> = runs
            .iter()
            .filter(|r| r.kind == *kind && r.timing.steps > 0)
            .collect();
        if mine.is_empty() {
            continue;
        }
        let ms = |f: &dyn Fn(&lm::Timing) -> f64| -> f64 {
            let xs: Vec<f64> = mine
                .iter()
                .map(|r| 1e3 * f(&r.timing) / r.timing.steps as f64)
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
        rows += 1;
    }
    if rows == 0 {
        return String::new();
    }
    t
}

/// `timing.csv` and `timing.json`: one row / object per run.
pub fn write_timing(
    csv_path: &Path,
    json_path: &Path,
    args: &Args,
    runs: &[RunResult],
) -> Result<()> {
    let cfg = &args.cfg;
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
                "step_ms": t.step_ms(),
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
pub fn write_timing_csv(path: &Path, device: &str, runs: &[RunResult]) -> Result<()> {
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
            t.step_ms().map_or(String::new(), |x| format!("{x:.4}")),
            t.tokens_per_s()
                .map_or(String::new(), |x| format!("{x:.1}")),
            t.optimizer_share()
                .map_or(String::new(), |x| format!("{x:.5}")),
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
pub fn write_loss_log(path: &Path, runs: &[RunResult]) -> Result<()> {
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
