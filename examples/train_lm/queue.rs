//! train_lm's run queue: the runs of a comparison trained in this process,
//! several at a time, each failure recorded while the others go on.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use anyhow::Result;
use candle_core::Device;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::lm::{self, train, Data, Finished, OptKind, Record};
use crate::outputs::run_line;
use crate::support::caught;

/// Trains the runs of `queue` in this process: `jobs` worker threads take
/// them in turn (each run with `cfg.ranks` in-process ranks). A run that
/// fails (or panics) is recorded as failed and the others go on;
/// `on_end(&finished)` is called as each run ends, under the lock that
/// collects them (so its calls see ever more runs, one at a time).
pub fn train_queue(
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
