//! `examples/train_lm`'s front end: the command line (the presets' defaults
//! as `--help` states them, the options that override them, every refusal as
//! one line) and the files written from finished runs (the CSV log, the loss
//! log, the timing files, the results table and caption, the figure's
//! series, summary.md), read back and checked against values worked out here
//! from synthetic runs; and the run queue (every run once, in queue order,
//! the same as alone, a failure recorded while the others go on).

#[allow(dead_code)]
#[path = "../examples/train_lm/cli.rs"]
mod cli;
mod common;
#[path = "../examples/train_lm/lm.rs"]
mod lm;
#[allow(dead_code)]
#[path = "../examples/train_lm/outputs.rs"]
mod outputs;
#[allow(dead_code)]
#[path = "../examples/train_lm/plot.rs"]
mod plot;
#[path = "../examples/train_lm/queue.rs"]
mod queue;
#[path = "../examples/train_lm/support.rs"]
mod support;

use std::path::{Path, PathBuf};

use cli::{Args, Parsed};
use lm::{OptKind, Record, RunResult, Timing};

// ------------------------------------------------------------ command line

/// `train_lm ARGS…` parsed, or the error's one line.
fn parse(args: &[&str]) -> Result<Parsed, String> {
    let argv = std::iter::once("train_lm").chain(args.iter().copied());
    cli::parse(argv).map_err(|e| format!("{e:#}"))
}

/// `train_lm ARGS…`, which must be a run.
fn run_args(args: &[&str]) -> Args {
    match parse(args) {
        Ok(Parsed::Run(a)) => *a,
        Ok(Parsed::Help(_)) => panic!("{args:?}: --help, not a run"),
        Err(e) => panic!("{args:?}: {e}"),
    }
}

/// `train_lm ARGS…`, which must be refused; the message.
fn refused(args: &[&str]) -> String {
    match parse(args) {
        Ok(p) => panic!("{args:?} was accepted: {p:?}"),
        Err(e) => e,
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[test]
fn no_options_give_the_small_preset_and_every_optimizer() {
    let a = run_args(&[]);
    assert_eq!(a.preset, "small");
    assert_eq!(a.optimizers, OptKind::ALL.to_vec());
    // the sizes `--help` states for `small`
    let c = &a.cfg;
    assert_eq!((c.layers, c.d_model, c.heads, c.context), (2, 64, 4, 64));
    assert_eq!((c.steps, c.batch, c.eval_every), (300, 16, 20));
    assert_eq!(c.corpus_chars, 400_000);
    assert_eq!((c.weight_decay, c.radius, c.lr), (0.1, 2.0, None));
    assert_eq!((c.ranks, c.stop_after), (1, None));
    assert!(!c.timing && !c.gram_ns && !c.ns_bf16 && !c.bf16_updates);
    assert_eq!(c.spectral_penalty, 0.0);
    assert_eq!(c.sphere_bracket, None);
    assert_eq!(c.newton_schulz().compute_dtype(), None);
    assert_eq!((a.seeds, a.first_seed), (1, 0));
    assert_eq!(a.out, PathBuf::from("runs/train_lm"));
    assert_eq!(a.device, "cpu");
    assert_eq!(a.data, None);
    assert_eq!(a.loss_log, None);
    assert!(!a.release_freed_memory);
    assert_eq!(a.jobs, cores());
}

#[test]
fn gpu_preset_has_its_own_sizes_and_three_optimizers() {
    let a = run_args(&["--preset", "gpu"]);
    assert_eq!(
        a.optimizers,
        [OptKind::AdamW, OptKind::Muon, OptKind::MuonSpectral]
    );
    let c = &a.cfg;
    assert_eq!((c.layers, c.d_model, c.heads, c.context), (6, 384, 6, 256));
    assert_eq!((c.steps, c.batch, c.eval_every), (600, 64, 50));
    assert_eq!(c.corpus_chars, 8_000_000);
    // 10.75 M parameters with the built-in corpus's 39 characters
    assert_eq!(
        (c.param_count(39) as f64 / 1e4).round() / 100.0,
        10.75,
        "{}",
        c.param_count(39)
    );
    // The preset decides only the defaults: `all` still means all.
    let all = run_args(&["--preset", "gpu", "--optimizer", "all"]);
    assert_eq!(all.optimizers, OptKind::ALL.to_vec());
}

#[test]
fn cuda_times_every_run_and_trains_one_at_a_time() {
    let a = run_args(&["--device", "cuda"]);
    assert!(a.cfg.timing);
    assert_eq!(a.jobs, 1);
    let b = run_args(&["--device", "cuda", "--jobs", "3"]);
    assert_eq!(b.jobs, 3);
    let cpu = run_args(&["--timing"]);
    assert!(cpu.cfg.timing);
    assert_eq!(cpu.jobs, cores());
    // on the CPU each run's ranks are threads: the cores are shared out
    let ranks = run_args(&["--ranks", "2"]);
    assert_eq!(ranks.jobs, (cores() / 2).max(1));
    let many = run_args(&["--ranks", "64", "--batch", "64"]);
    assert_eq!(many.jobs, (cores() / 64).max(1));
}

#[test]
fn optimizers_come_in_the_order_given_each_once() {
    let a = run_args(&["--optimizer", "muon,all,adamw"]);
    let mut want = vec![OptKind::Muon];
    want.extend(OptKind::ALL.into_iter().filter(|&k| k != OptKind::Muon));
    assert_eq!(a.optimizers, want);
    let b = run_args(&[
        "--optimizer",
        "muon-spectral-sphere",
        "--optimizer",
        "adamw,muon-spectral-sphere",
    ]);
    assert_eq!(b.optimizers, [OptKind::MuonSpectralSphere, OptKind::AdamW]);
    for k in OptKind::ALL {
        assert_eq!(run_args(&["--optimizer", k.name()]).optimizers, [k]);
    }
}

#[test]
fn options_override_the_preset_and_keep_the_rest() {
    let a = run_args(&[
        "--preset",
        "gpu",
        "--steps",
        "7",
        "--batch",
        "8",
        "--eval-every",
        "3",
        "--lr",
        "0.5",
        "--wd",
        "0",
        "--radius",
        "2.5",
        "--stop-after",
        "4",
        "--gram-ns",
        "--ns-bf16",
        "--spectral-penalty",
        "0.01",
        "--sphere-bracket",
        "6",
        "--seeds",
        "3",
        "--first-seed",
        "5",
        "--loss-log",
        "x/losses.csv",
        "--ranks",
        "2",
        "--bf16-updates",
        "--out",
        "elsewhere",
        "--data",
        "book.txt",
        "--jobs",
        "2",
        "--release-freed-memory",
    ]);
    let c = &a.cfg;
    assert_eq!((c.steps, c.batch, c.eval_every), (7, 8, 3));
    assert_eq!((c.lr, c.weight_decay, c.radius), (Some(0.5), 0.0, 2.5));
    assert_eq!((c.stop_after, c.steps_run()), (Some(4), 4));
    assert!(c.gram_ns && c.ns_bf16 && c.bf16_updates && !c.timing);
    assert_eq!(c.spectral_penalty, 0.01);
    assert_eq!(c.sphere_bracket, Some(6));
    let ns = c.newton_schulz();
    assert_eq!(ns.compute_dtype(), Some(candle_core::DType::BF16));
    assert!(ns.gram().is_some());
    assert_eq!(c.ranks, 2);
    // the rest of the preset is kept
    assert_eq!((c.layers, c.d_model, c.heads, c.context), (6, 384, 6, 256));
    assert_eq!(c.corpus_chars, 8_000_000);
    assert_eq!((a.seeds, a.first_seed, a.jobs), (3, 5, 2));
    assert_eq!(a.loss_log, Some(PathBuf::from("x/losses.csv")));
    assert_eq!(a.out, PathBuf::from("elsewhere"));
    assert_eq!(a.data, Some(PathBuf::from("book.txt")));
    assert!(a.release_freed_memory);
    // `--stop-after` past the schedule trains all of it
    assert_eq!(
        run_args(&["--steps", "5", "--stop-after", "9"])
            .cfg
            .steps_run(),
        5
    );
}

#[test]
fn bad_values_are_refused_in_one_line_naming_the_option() {
    let cases: [(&[&str], &[&str]); 27] = [
        (
            &["--sphere-bracket", "1"],
            &["--sphere-bracket", "integer ≥ 2"],
        ),
        (
            &["--spectral-penalty", "-0.1"],
            &["--spectral-penalty", "≥ 0"],
        ),
        (
            &["--spectral-penalty", "inf"],
            &["--spectral-penalty", "≥ 0"],
        ),
        (
            &["--spectral-penalty", "nan"],
            &["--spectral-penalty", "≥ 0"],
        ),
        (&["--steps", "0"], &["--steps", "integer in 1..=1000000000"]),
        (
            &["--steps", "-3"],
            &["--steps", "integer in 1..=1000000000"],
        ),
        (
            &["--steps", "2.5"],
            &["--steps", "integer in 1..=1000000000"],
        ),
        // (a count this large overflowed the run queue's arithmetic: a panic)
        (
            &["--steps", "4000000000000000000"],
            &["--steps", "integer in 1..=1000000000"],
        ),
        (&["--seeds", "0"], &["--seeds", "integer ≥ 1"]),
        (&["--seeds", "-1"], &["--seeds", "integer ≥ 1"]),
        (&["--first-seed", "-1"], &["--first-seed", "integer ≥ 0"]),
        (&["--batch", "0"], &["--batch", "integer ≥ 1"]),
        (&["--ranks", "0"], &["--ranks", "integer ≥ 1"]),
        (&["--jobs", "0"], &["--jobs", "integer ≥ 1"]),
        (&["--eval-every", "0"], &["--eval-every", "integer ≥ 1"]),
        (&["--stop-after", "0"], &["--stop-after", "integer ≥ 1"]),
        (&["--lr", "0"], &["--lr", "positive"]),
        (&["--lr", "-0.1"], &["--lr", "positive"]),
        (&["--lr", "NaN"], &["--lr", "positive"]),
        (&["--lr", "inf"], &["--lr", "positive"]),
        (&["--radius", "0"], &["--radius", "positive"]),
        (&["--wd", "-0.1"], &["--wd", "≥ 0"]),
        (&["--wd", "inf"], &["--wd", "≥ 0"]),
        (&["--optimizer", "adam"], &["adam", "adamw"]),
        (&["--preset", "big"], &["big", "small", "gpu"]),
        (&["--device", "metal"], &["metal", "cpu", "cuda"]),
        (&["--stepz", "3"], &["--stepz", "--steps"]),
    ];
    for (args, words) in cases {
        let e = refused(args);
        assert!(!e.contains('\n'), "{args:?}: more than one line: {e:?}");
        assert!(!e.contains("Usage:"), "{args:?}: {e}");
        assert!(e.ends_with("(see --help)"), "{args:?}: {e}");
        for w in words {
            assert!(e.contains(w), "{args:?}: `{w}` not in: {e}");
        }
    }
}

#[test]
fn options_that_must_agree_are_checked_together() {
    let e = refused(&["--batch", "10", "--ranks", "3"]);
    assert!(
        e.contains("--batch 10") && e.contains("--ranks 3") && e.contains("divisible"),
        "{e}"
    );
    // the preset's batch counts too
    let e = refused(&["--preset", "gpu", "--ranks", "5"]);
    assert!(e.contains("--batch 64") && e.contains("--ranks 5"), "{e}");
    let e = refused(&["--bf16-updates"]);
    assert!(e.contains("--bf16-updates") && e.contains("--ranks"), "{e}");
    let ok = run_args(&["--batch", "12", "--ranks", "3", "--bf16-updates"]);
    assert_eq!((ok.cfg.batch, ok.cfg.ranks), (12, 3));
}

/// Options that would change nothing in the runs asked for are named in a
/// warning (the command still runs); the defaults, and options that apply,
/// give none.
#[test]
fn options_that_change_nothing_are_warned_about() {
    let warned = |args: &[&str], words: &[&str]| {
        let w = run_args(args).warnings;
        assert_eq!(w.len(), 1, "{args:?}: {w:?}");
        for word in words {
            assert!(w[0].contains(word), "{args:?}: `{word}` not in {w:?}");
        }
    };
    warned(
        &["--optimizer", "muon", "--radius", "3"],
        &["--radius", "muon-spectral-sphere"],
    );
    warned(
        &["--optimizer", "adamw,adamw-spectral", "--gram-ns"],
        &["--gram-ns"],
    );
    warned(&["--optimizer", "adamw", "--ns-bf16"], &["--ns-bf16"]);
    warned(
        &["--optimizer", "muon", "--sphere-bracket", "8"],
        &["--sphere-bracket", "muon-spectral-sphere"],
    );
    warned(
        &["--release-freed-memory"],
        &["--release-freed-memory", "--device cuda"],
    );
    warned(
        &["--device", "cuda", "--ranks", "2", "--jobs", "2"],
        &["--jobs", "NCCL"],
    );
    warned(
        &["--device", "cuda", "--jobs", "2"],
        &["--jobs 2", "timing"],
    );
    for quiet in [
        &[][..],
        &["--preset", "gpu"],
        &["--radius", "3"],
        &[
            "--optimizer",
            "adamw,muon-spectral-sphere",
            "--radius",
            "3",
            "--gram-ns",
        ],
        &["--optimizer", "muon", "--gram-ns"],
        &["--optimizer", "muon-spectral-sphere", "--ns-bf16"],
        &["--device", "cuda", "--release-freed-memory", "--jobs", "1"],
        &["--jobs", "2"],
    ] {
        let w = run_args(quiet).warnings;
        assert!(w.is_empty(), "{quiet:?}: {w:?}");
    }
    // the radius still defaults to 2 and takes the value given
    assert_eq!(run_args(&[]).cfg.radius, 2.0);
    assert_eq!(run_args(&["--radius", "3"]).cfg.radius, 3.0);
}

/// A `--loss-log` that is one of the outputs of `--out` would overwrite it
/// (or be overwritten): refused, however the path is spelled; another path
/// in the same directory is fine.
#[test]
fn a_loss_log_over_an_output_is_refused() {
    let dir = common::scratch_dir("train-lm-cli", "loss-log");
    let out = dir.join("out");
    std::fs::create_dir_all(out.join("sub")).unwrap();
    for name in ["train_lm.csv", "summary.md", "train_lm.png", "timing.json"] {
        let e = outputs::check_loss_log(&out.join(name), &out)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--loss-log") && e.contains(name), "{e}");
        let e = outputs::check_loss_log(&out.join("sub").join("..").join(name), &out)
            .unwrap_err()
            .to_string();
        assert!(e.contains(name), "{e}");
    }
    outputs::check_loss_log(&out.join("losses.csv"), &out).unwrap();
    outputs::check_loss_log(&out.join("sub").join("train_lm.csv"), &out).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn help_is_not_an_error_and_lists_outputs_presets_and_optimizers() {
    for flag in ["--help", "-h"] {
        let help = match parse(&[flag]) {
            Ok(Parsed::Help(h)) => h.render().to_string(),
            other => panic!("{flag}: {other:?}"),
        };
        for word in [
            "OUTPUT",
            "PRESETS",
            "train_lm.csv",
            "summary.md",
            "--loss-log",
        ] {
            assert!(help.contains(word), "{flag}: no `{word}`");
        }
        for k in OptKind::ALL {
            assert!(help.contains(k.name()), "{flag}: no `{}`", k.name());
        }
    }
}

// ------------------------------------------------------------------ outputs

/// Block matrices (named `h.…`) and one that is not: the head, given the
/// largest σ₁ so that a maximum over all matrices would differ from the
/// maximum over the blocks.
const MATRICES: [&str; 3] = ["h.0.attn", "h.0.mlp", "head"];

/// A finished run whose numbers all depend on `(kind, seed)`: evaluations
/// at steps 0, 10 and 20 with `val` as their validation losses.
fn run(kind: OptKind, seed: u64, val: [f64; 3], seconds: f64, phases: [f64; 4]) -> RunResult {
    let k = OptKind::ALL.iter().position(|&o| o == kind).unwrap() as f64;
    let s = seed as f64;
    let records = (0..3)
        .map(|i| {
            let i_f = i as f64;
            Record {
                step: 10 * i,
                lr: 1e-3 * (1.0 + i_f) / 3.0,
                train_loss: val[i] + 0.123_456_7 + 0.01 * s,
                val_loss: val[i],
                sigmas: vec![1.0 + 0.1 * k + i_f, 2.0 + 0.5 * s - 0.3 * i_f, 9.0 + k],
            }
        })
        .collect();
    RunResult {
        kind,
        seed,
        matrices: MATRICES.map(String::from).to_vec(),
        records,
        seconds,
        losses: (1..=20)
            .map(|i| 4.0 / (1.0 + 0.1 * i as f64) + 0.001 * (k + s) + 1e-9)
            .collect(),
        timing: Timing {
            steps: 19,
            tokens: 19 * 16 * 64,
            forward_s: phases[0],
            backward_s: phases[1],
            clip_s: phases[2],
            optimizer_s: phases[3],
            synchronized: true,
            first_step_s: 0.75 + s,
            eval_s: 0.5,
            evals: 3,
            first_eval_s: 0.25,
        },
    }
}

/// AdamW with two seeds, Muon with one.
fn three_runs() -> Vec<RunResult> {
    vec![
        run(
            OptKind::AdamW,
            0,
            [4.0, 3.5, 3.0],
            10.0,
            [1.0, 2.0, 0.5, 0.5],
        ),
        run(
            OptKind::Muon,
            0,
            [4.0, 3.0, 2.5],
            12.0,
            [1.0, 2.0, 0.5, 1.5],
        ),
        run(
            OptKind::AdamW,
            1,
            [4.2, 3.7, 3.5],
            20.0,
            [2.0, 4.0, 1.0, 1.0],
        ),
    ]
}

/// A CSV file's header and rows.
fn read_csv(path: &Path) -> (Vec<String>, Vec<Vec<String>>) {
    let mut r = csv::Reader::from_path(path).unwrap();
    let header = r.headers().unwrap().iter().map(String::from).collect();
    let rows = r
        .records()
        .map(|rec| rec.unwrap().iter().map(String::from).collect())
        .collect();
    (header, rows)
}

fn num(s: &str) -> f64 {
    s.parse().unwrap_or_else(|_| panic!("not a number: {s:?}"))
}

/// `|a − b| ≤ tol·max(1, |b|)`.
fn close(a: f64, b: f64, tol: f64) -> bool {
    (a - b).abs() <= tol * b.abs().max(1.0)
}

#[test]
fn mean_std_is_the_sample_mean_and_deviation() {
    // 2, 4, 4, 4, 5, 5, 7, 9: mean 5, squared deviations summing to 32
    let (m, s) = outputs::mean_std(&[2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]);
    assert_eq!(m, 5.0);
    assert!((s - (32.0f64 / 7.0).sqrt()).abs() < 1e-15, "{s}");
    assert_eq!(outputs::mean_std(&[3.25]), (3.25, 0.0));
    let (m, s) = outputs::mean_std(&[1.0, 3.0]);
    assert_eq!(m, 2.0);
    assert!((s - 2f64.sqrt()).abs() < 1e-15, "{s}");
}

#[test]
fn csv_log_has_a_row_per_evaluation_that_reads_back() {
    let dir = common::scratch_dir("train-lm-cli", "csv");
    let runs = three_runs();
    let path = dir.join("train_lm.csv");
    outputs::write_csv(&path, &runs).unwrap();
    let (header, rows) = read_csv(&path);
    let mut want: Vec<String> = ["step", "optimizer", "seed", "lr", "train_loss", "val_loss"]
        .map(String::from)
        .to_vec();
    want.extend(MATRICES.iter().map(|m| format!("sigma1:{m}")));
    assert_eq!(header, want);
    assert_eq!(rows.len(), 9);
    // the runs in the order given, each run's evaluations in order
    let expected = runs
        .iter()
        .flat_map(|r| r.records.iter().map(move |rec| (r, rec)));
    for (row, (r, rec)) in rows.iter().zip(expected) {
        assert_eq!(row[0], rec.step.to_string());
        assert_eq!(row[1], r.kind.name());
        assert_eq!(row[2], r.seed.to_string());
        let lr = num(&row[3]);
        assert!(
            (lr - rec.lr).abs() <= 1e-6 * rec.lr,
            "lr {lr} vs {}",
            rec.lr
        );
        assert!(close(num(&row[4]), rec.train_loss, 1e-6), "{row:?}");
        assert!(close(num(&row[5]), rec.val_loss, 1e-6), "{row:?}");
        assert_eq!(row.len(), 6 + MATRICES.len());
        for (cell, sg) in row[6..].iter().zip(&rec.sigmas) {
            assert!(close(num(cell), *sg, 1e-6), "σ₁ {cell} vs {sg}");
        }
    }
    // no runs: the header alone
    outputs::write_csv(&path, &[]).unwrap();
    let (header, rows) = read_csv(&path);
    assert_eq!(header.len(), 6);
    assert!(rows.is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn loss_log_has_every_step_exactly_in_f32() {
    let dir = common::scratch_dir("train-lm-cli", "losses");
    let runs = three_runs();
    let path = dir.join("losses.csv");
    outputs::write_loss_log(&path, &runs).unwrap();
    let (header, rows) = read_csv(&path);
    assert_eq!(header, ["optimizer", "seed", "step", "train_loss"]);
    assert_eq!(rows.len(), 3 * 20);
    for (r, chunk) in runs.iter().zip(rows.chunks(20)) {
        for (i, row) in chunk.iter().enumerate() {
            assert_eq!(row[0], r.kind.name());
            assert_eq!(row[1], r.seed.to_string());
            assert_eq!(row[2], (i + 1).to_string());
            // f32's shortest round-trip text: read back, the same f32
            let back: f32 = row[3].parse().unwrap();
            assert_eq!(back.to_bits(), (r.losses[i] as f32).to_bits(), "{row:?}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn timing_files_agree_with_the_runs() {
    let dir = common::scratch_dir("train-lm-cli", "timing");
    let args = run_args(&["--timing", "--out", dir.to_str().unwrap()]);
    let runs = three_runs();
    let (csv_path, json_path) = (dir.join("timing.csv"), dir.join("timing.json"));
    outputs::write_timing(&csv_path, &json_path, &args, &runs).unwrap();
    let (header, rows) = read_csv(&csv_path);
    let col = |name: &str| header.iter().position(|h| h == name).unwrap();
    let json: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    assert_eq!((rows.len(), json.len()), (3, 3));
    for ((r, row), obj) in runs.iter().zip(&rows).zip(&json) {
        let t = &r.timing;
        let step_s = t.forward_s + t.backward_s + t.clip_s + t.optimizer_s;
        let step_ms = 1e3 * step_s / 19.0;
        let tokens_per_s = (19 * 16 * 64) as f64 / step_s;
        let share = t.optimizer_s / step_s;
        assert_eq!(row[col("optimizer")], r.kind.name());
        assert_eq!(row[col("seed")], r.seed.to_string());
        assert_eq!(row[col("device")], "cpu");
        assert_eq!(row[col("steps_timed")], "19");
        assert!(close(num(&row[col("step_ms")]), step_ms, 1e-6));
        assert!(close(num(&row[col("tokens_per_s")]), tokens_per_s, 1e-4));
        assert!(close(num(&row[col("optimizer_share")]), share, 1e-5));
        assert!(close(num(&row[col("optimizer_s")]), t.optimizer_s, 1e-6));
        assert!(close(num(&row[col("first_step_s")]), t.first_step_s, 1e-6));
        assert_eq!(row[col("evals")], "3");
        // JSON: the same numbers at full precision, and the configuration
        assert_eq!(obj["optimizer"], r.kind.name());
        assert_eq!(obj["seed"], r.seed);
        assert_eq!(obj["preset"], "small");
        assert_eq!(obj["steps"], 20);
        assert_eq!(obj["batch"], 16);
        assert_eq!(obj["context"], 64);
        assert_eq!(obj["synchronized"], true);
        assert!(close(obj["step_ms"].as_f64().unwrap(), step_ms, 1e-12));
        assert!(close(
            obj["tokens_per_s"].as_f64().unwrap(),
            tokens_per_s,
            1e-12
        ));
        assert!(close(
            obj["optimizer_share"].as_f64().unwrap(),
            share,
            1e-12
        ));
        assert_eq!(
            obj["final_val_loss"].as_f64().unwrap(),
            r.records[2].val_loss
        );
        assert_eq!(obj["run_s"].as_f64().unwrap(), r.seconds);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn results_table_gives_mean_and_spread_over_seeds() {
    let runs = three_runs();
    let plain = run_args(&[]);
    let table = outputs::results_table(&plain.optimizers, &plain.cfg, &runs);
    let lines: Vec<&str> = table.lines().collect();
    // AdamW: finals 3.0 and 3.5 (mean 3.25, sample deviation √0.125), 10 and
    // 20 s; Muon: one seed, no spread; kinds without runs have no row.
    assert_eq!(
        lines,
        [
            "| optimizer | peak lr | final val loss (nats/char) | seconds/run |",
            "|---|---|---|---|",
            "| adamw | 0.003 | 3.2500 ± 0.3536 | 15 |",
            "| muon | 0.02 | 2.5000 | 12 |",
        ]
    );
    // the rows follow the order asked for; an `lr` override shows in every
    // row; the sphere's row gives its radius
    let sphere = vec![run(
        OptKind::MuonSpectralSphere,
        0,
        [4.0, 3.0, 2.75],
        8.0,
        [1.0; 4],
    )];
    let mut all = runs.clone();
    all.extend(sphere);
    let args = run_args(&[
        "--optimizer",
        "muon-spectral-sphere,muon,adamw",
        "--lr",
        "0.0125",
        "--radius",
        "1.5",
    ]);
    let table = outputs::results_table(&args.optimizers, &args.cfg, &all);
    let rows: Vec<&str> = table.lines().skip(2).collect();
    assert_eq!(
        rows,
        [
            "| muon-spectral-sphere | 0.0125 (r = 1.5) | 2.7500 | 8 |",
            "| muon | 0.0125 | 2.5000 | 12 |",
            "| adamw | 0.0125 | 3.2500 ± 0.3536 | 15 |",
        ]
    );
}

#[test]
fn timed_results_table_has_throughput_share_and_phases() {
    let runs = three_runs();
    let args = run_args(&["--timing"]);
    let table = outputs::results_table(&args.optimizers, &args.cfg, &runs);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(
        lines[0],
        "| optimizer | peak lr | final val loss (nats/char) | seconds/run | tokens/s | optimizer share of step time |"
    );
    // AdamW: 19 456 tokens in 4 s and in 8 s (4864 and 2432 tokens/s, mean
    // 3648), the optimizer 0.5 of 4 s and 1 of 8 s (12.5 %); Muon: 1.5 of 5 s
    assert_eq!(
        lines[2],
        "| adamw | 0.003 | 3.2500 ± 0.3536 | 15 | 3648 | 12.5 % |"
    );
    assert_eq!(lines[3], "| muon | 0.02 | 2.5000 | 12 | 3891 | 30.0 % |");
    // ms per timed step (19 steps), mean over seeds: AdamW forward
    // (1000/19 + 2000/19)/2 = 78.95, backward 157.89, clip 39.47,
    // optimizer 39.47, total 315.79
    let phases: Vec<&&str> = lines
        .iter()
        .filter(|l| l.starts_with("| adamw |"))
        .collect();
    assert_eq!(phases.len(), 2);
    assert_eq!(
        *phases[1],
        "| adamw | 78.95 | 157.89 | 39.47 | 39.47 | 315.79 |"
    );
    let muon: Vec<&&str> = lines.iter().filter(|l| l.starts_with("| muon |")).collect();
    assert_eq!(
        *muon[1],
        "| muon | 52.63 | 105.26 | 26.32 | 78.95 | 263.16 |"
    );
    // and one line per run as it ends
    let line = outputs::run_line(&runs[1]);
    for part in [
        "muon seed 0",
        "20 steps in 12.0 s",
        "3891 tokens/s",
        "263.2 ms/step",
        "optimizer 30.0 %",
        "2.5000",
    ] {
        assert!(line.contains(part), "`{part}` not in {line}");
    }
}

/// A run of one step has no timed step (step 1 is timed apart): its
/// throughput and share are "n/a" in the table, empty in timing.csv, null in
/// timing.json and left out of the phase table, not NaN or 0.
#[test]
fn a_run_with_no_timed_step_has_no_throughput() {
    let mut one = run(OptKind::Muon, 0, [4.0, 3.5, 3.0], 2.0, [0.0; 4]);
    one.timing.steps = 0;
    one.timing.tokens = 0;
    let t = &one.timing;
    assert_eq!(
        (t.tokens_per_s(), t.optimizer_share(), t.step_ms()),
        (None, None, None)
    );
    let mut runs = three_runs();
    runs.push(one.clone());
    let args = run_args(&["--timing", "--optimizer", "adamw,muon"]);
    // the Muon row averages its timed run only; a Muon with none says n/a
    let table = outputs::results_table(&args.optimizers, &args.cfg, &runs);
    assert!(
        table.contains("| muon | 0.02 | 2.7500 ± 0.3536 | 7 | 3891 | 30.0 % |"),
        "{table}"
    );
    let alone = outputs::results_table(&args.optimizers, &args.cfg, &runs[3..]);
    assert!(
        alone.contains("| muon | 0.02 | 3.0000 | 2 | n/a | n/a |"),
        "{alone}"
    );
    assert!(!alone.contains("NaN") && !table.contains("NaN"));
    // no phase table without a timed run
    assert!(!alone.contains("ms per timed step"), "{alone}");
    assert!(table.contains("ms per timed step"), "{table}");
    let line = outputs::run_line(&one);
    assert!(
        line.contains("no step timed") && !line.contains("NaN"),
        "{line}"
    );

    let dir = common::scratch_dir("train-lm-cli", "untimed");
    let (csv_path, json_path) = (dir.join("timing.csv"), dir.join("timing.json"));
    outputs::write_timing(&csv_path, &json_path, &args, &runs[3..]).unwrap();
    let (header, rows) = read_csv(&csv_path);
    let col = |name: &str| header.iter().position(|h| h == name).unwrap();
    for name in ["step_ms", "tokens_per_s", "optimizer_share"] {
        assert_eq!(rows[0][col(name)], "", "{name}");
    }
    let json: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(&json_path).unwrap()).unwrap();
    for name in ["step_ms", "tokens_per_s", "optimizer_share"] {
        assert!(json[0][name].is_null(), "{name}: {}", json[0][name]);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn caption_states_data_model_schedule_and_what_is_missing() {
    let args = run_args(&[]);
    assert_eq!(
        outputs::caption(&args, "built-in corpus", 39, ""),
        "built-in corpus; 2 layers, d=64, context 64, 300 steps × batch 16, λ=0.1 (sphere: r=2, no decay on its matrices); 1 seed(s)"
    );
    let args = run_args(&[
        "--optimizer",
        "adamw,muon",
        "--steps",
        "50",
        "--stop-after",
        "20",
        "--gram-ns",
        "--wd",
        "0.00001",
        "--seeds",
        "2",
        "--timing",
    ]);
    let d = 64;
    let params = 2 * 39 * d + 64 * d + 2 * (12 * d * d + 2 * d) + d;
    assert_eq!(
        outputs::caption(&args, "book.txt", 39, "; 3 of 4 runs so far"),
        format!(
            "book.txt; 2 layers, d=64, context 64, 50 steps (stopped after 20) × batch 16, λ=1e-5, Gram Newton–Schulz; 2 seed(s); {params} parameters; device cpu; 3 of 4 runs so far"
        )
    );
    // stopping at or after the end of the schedule is not stopping early
    let args = run_args(&[
        "--optimizer",
        "adamw",
        "--steps",
        "20",
        "--stop-after",
        "20",
    ]);
    let caption = outputs::caption(&args, "x", 39, "");
    assert!(!caption.contains("stopped"), "{caption}");
    // bf16 Newton–Schulz, alone and in the Gram form
    for (flags, says) in [
        (&["--ns-bf16"][..], ", Newton–Schulz in bf16;"),
        (
            &["--ns-bf16", "--gram-ns"][..],
            ", Gram Newton–Schulz in bf16;",
        ),
    ] {
        let args = run_args(&[&["--optimizer", "muon"], flags].concat());
        let caption = outputs::caption(&args, "x", 39, "");
        assert!(caption.contains(says), "{flags:?}: {caption}");
    }
    // the spectral norm penalty, named apart from the weight decay's λ
    let args = run_args(&["--optimizer", "adamw", "--spectral-penalty", "0.003"]);
    let caption = outputs::caption(&args, "x", 39, "");
    assert!(
        caption.contains("λ=0.1, spectral norm penalty μ/2·Σσ₁² with μ=0.003;"),
        "{caption}"
    );
    let caption = outputs::caption(&run_args(&["--spectral-penalty", "0"]), "x", 39, "");
    assert!(!caption.contains("penalty"), "{caption}");
    // the sphere's bracketed dual
    let args = run_args(&[
        "--optimizer",
        "muon-spectral-sphere",
        "--sphere-bracket",
        "8",
    ]);
    let caption = outputs::caption(&args, "x", 39, "");
    assert!(
        caption.contains("(sphere: r=2, no decay on its matrices, dual solved with ≤ 8 msigns)"),
        "{caption}"
    );
}

#[test]
fn figure_averages_losses_over_seeds_and_takes_sigma_max_over_blocks() {
    let runs = three_runs();
    let kinds = [OptKind::AdamW, OptKind::AdamWSpectral, OptKind::Muon];
    let [loss, sigma] = outputs::figure(&runs, &kinds);
    // one loss line per optimizer with runs, in the order of `kinds`, with
    // the colour of its place in `kinds`
    let labels: Vec<Option<&str>> = loss.series.iter().map(|s| s.label.as_deref()).collect();
    assert_eq!(labels, [Some("adamw"), Some("muon")]);
    assert_eq!(loss.series[0].color, plot::COLORS[0]);
    assert_eq!(loss.series[1].color, plot::COLORS[2]);
    // AdamW: the mean of seeds 0 and 1 at each evaluation
    let adamw = &loss.series[0].points;
    assert_eq!(adamw.len(), 3);
    for (&(x, y), (wx, wy)) in adamw.iter().zip([(0.0, 4.1), (10.0, 3.6), (20.0, 3.25)]) {
        assert!(x == wx && (y - wy).abs() < 1e-12, "{adamw:?}");
    }
    assert_eq!(
        loss.series[1].points,
        [(0.0, 4.0), (10.0, 3.0), (20.0, 2.5)]
    );
    // the y range starts just under the lowest mean loss
    let (y0, y1) = loss.y_range.unwrap();
    assert!(
        (y0 - 2.45).abs() < 1e-12 && (y1 - 4.1).abs() < 1e-12,
        "{y0} {y1}"
    );
    assert!(!loss.log_y && sigma.log_y);
    // σ₁: per optimizer, a thin line per matrix (first seed), then a thick
    // labelled one, the maximum over the block matrices only (not the head)
    assert_eq!(sigma.series.len(), 2 * (MATRICES.len() + 1));
    for (ki, first) in [(0, &runs[0]), (1, &runs[1])] {
        let mine = &sigma.series[ki * 4..ki * 4 + 4];
        for (mi, s) in mine[..3].iter().enumerate() {
            assert_eq!(s.label, None);
            let want: Vec<(f64, f64)> = first
                .records
                .iter()
                .map(|r| (r.step as f64, r.sigmas[mi]))
                .collect();
            assert_eq!(s.points, want);
            assert!(s.width < mine[3].width);
        }
        assert_eq!(mine[3].label.as_deref(), Some(first.kind.name()));
        let want: Vec<(f64, f64)> = first
            .records
            .iter()
            .map(|r| (r.step as f64, r.sigmas[0].max(r.sigmas[1])))
            .collect();
        assert_eq!(mine[3].points, want);
    }
}

#[test]
fn outputs_are_all_written_and_summary_is_caption_then_table() {
    for timing in [false, true] {
        let dir = common::scratch_dir("train-lm-cli", &format!("all-{timing}"));
        let log = dir.join("new/dir/losses.csv");
        let mut argv = vec![
            "--out",
            dir.to_str().unwrap(),
            "--loss-log",
            log.to_str().unwrap(),
        ];
        if timing {
            argv.push("--timing");
        }
        let args = run_args(&argv);
        let runs = three_runs();
        let w = outputs::write_outputs(&args, "src", &runs, 39, "; note").unwrap();
        let mut names = vec!["train_lm.csv", "train_lm.svg", "train_lm.png", "summary.md"];
        if timing {
            names.extend(["timing.csv", "timing.json"]);
        }
        let want: Vec<PathBuf> = names.iter().map(|n| dir.join(n)).collect();
        assert_eq!(outputs::output_paths(&dir, timing), want);
        let mut found: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        found.sort();
        let mut expect: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        expect.push("new".into());
        expect.sort();
        assert_eq!(
            found, expect,
            "timing {timing}: only these, no temporary files"
        );
        for p in &want {
            assert!(std::fs::metadata(p).unwrap().len() > 0, "{}", p.display());
        }
        assert_eq!(
            (&w.csv, &w.svg, &w.png, &w.summary),
            (&want[0], &want[1], &want[2], &want[3])
        );
        let mut others = want[4..].to_vec();
        others.push(log.clone());
        assert_eq!(w.others, others);
        let png = std::fs::read(&want[2]).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let svg = std::fs::read_to_string(&want[1]).unwrap();
        assert!(svg.contains("<svg") && svg.contains("adamw") && svg.contains("src;"));
        let summary = std::fs::read_to_string(&want[3]).unwrap();
        let caption = outputs::caption(&args, "src", 39, "; note");
        let table = outputs::results_table(&args.optimizers, &args.cfg, &runs);
        assert_eq!(summary, format!("{caption}\n\n{table}"));
        assert_eq!(w.table, table);
        assert_eq!(read_csv(&log).1.len(), 60);
        assert_eq!(read_csv(&want[0]).1.len(), 9);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// A run without --timing in a directory of a timed one removes the old
/// timing files; when no run finished, summary.md says so and the other
/// outputs of the earlier run are removed (they would pass for this one's),
/// but not a link, nor a file that is not an output.
#[test]
fn outputs_of_an_earlier_run_do_not_pass_for_this_ones() {
    let dir = common::scratch_dir("train-lm-cli", "stale");
    let runs = three_runs();
    let timed = run_args(&["--out", dir.to_str().unwrap(), "--timing"]);
    outputs::write_outputs(&timed, "src", &runs, 39, "").unwrap();
    assert!(dir.join("timing.csv").exists() && dir.join("timing.json").exists());
    let untimed = run_args(&["--out", dir.to_str().unwrap()]);
    outputs::write_outputs(&untimed, "src", &runs, 39, "").unwrap();
    assert!(!dir.join("timing.csv").exists() && !dir.join("timing.json").exists());
    assert!(dir.join("train_lm.csv").exists());

    outputs::write_outputs(&timed, "src", &runs, 39, "").unwrap();
    std::fs::write(dir.join("notes.txt"), "mine").unwrap();
    let elsewhere = dir.join("elsewhere.svg");
    std::fs::write(&elsewhere, "kept").unwrap();
    std::fs::remove_file(dir.join("train_lm.svg")).unwrap();
    std::os::unix::fs::symlink(&elsewhere, dir.join("train_lm.svg")).unwrap();
    let summary =
        outputs::write_no_runs(&timed, "src", 39, "; failed: muon seed 0 (diverged)").unwrap();
    assert_eq!(summary, dir.join("summary.md"));
    let text = std::fs::read_to_string(&summary).unwrap();
    let caption = outputs::caption(&timed, "src", 39, "");
    assert_eq!(
        text,
        format!("{caption}\n\nNo run finished; failed: muon seed 0 (diverged).\n")
    );
    for gone in ["train_lm.csv", "train_lm.png", "timing.csv", "timing.json"] {
        assert!(!dir.join(gone).exists(), "{gone} was left");
    }
    assert_eq!(
        std::fs::read_to_string(dir.join("notes.txt")).unwrap(),
        "mine"
    );
    assert!(std::fs::symlink_metadata(dir.join("train_lm.svg")).is_ok());
    assert_eq!(std::fs::read_to_string(&elsewhere).unwrap(), "kept");
    let _ = std::fs::remove_dir_all(&dir);
}

// -------------------------------------------------------------- run queue

/// Three worker threads take four runs: the results come back in queue
/// order, each the same as the run trained alone, `on_end` sees one more
/// run ended at each call, and a run that fails (the sphere run, with a
/// radius its optimizer refuses) is recorded, named, while the others go on.
#[test]
fn queue_trains_each_run_once_in_order_and_goes_on_past_a_failure() {
    let cfg = lm::Config {
        layers: 1,
        d_model: 16,
        heads: 2,
        context: 16,
        batch: 4,
        steps: 4,
        eval_every: 2,
        eval_batches: 1,
        radius: -1.0,
        ..lm::Config::default()
    };
    let data = lm::Data::from_text(&lm::builtin_corpus(0, 20_000), cfg.context).unwrap();
    let dev = candle_core::Device::Cpu;
    let queue = [
        (0, OptKind::AdamW),
        (0, OptKind::MuonSpectralSphere),
        (1, OptKind::AdamW),
        (0, OptKind::Muon),
    ];
    let seen = std::sync::Mutex::new(Vec::new());
    let on_end = |f: &lm::Finished| seen.lock().unwrap().push((f.ended(), f.runs().len()));
    let finished = queue::train_queue(&queue, 3, &cfg, &data, &dev, &on_end).unwrap();
    let seen = seen.into_inner().unwrap();
    let ended: Vec<usize> = seen.iter().map(|s| s.0).collect();
    assert_eq!(ended, [1, 2, 3, 4]);
    assert_eq!(seen.last().unwrap().1, 3);
    let order: Vec<(OptKind, u64)> = finished.runs().iter().map(|r| (r.kind, r.seed)).collect();
    assert_eq!(
        order,
        [(OptKind::AdamW, 0), (OptKind::AdamW, 1), (OptKind::Muon, 0)]
    );
    assert_eq!(finished.failed_runs(), ["muon-spectral-sphere seed 0"]);
    let error = finished.error(4, "").unwrap();
    assert!(
        error.starts_with("1 of 4 runs failed: muon-spectral-sphere seed 0: "),
        "{error}"
    );
    assert!(error.contains("radius"), "{error}");
    for r in finished.runs() {
        let alone = lm::train(r.kind, r.seed, &cfg, &data, &dev, &mut |_, _| {}).unwrap();
        assert_eq!(r.losses.len(), 4);
        let bits = |l: &[f64]| l.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&r.losses),
            bits(&alone.losses),
            "{:?} seed {}",
            r.kind,
            r.seed
        );
        let vals = |r: &RunResult| {
            r.records
                .iter()
                .map(|x| x.val_loss.to_bits())
                .collect::<Vec<_>>()
        };
        assert_eq!(vals(r), vals(&alone));
    }
}
