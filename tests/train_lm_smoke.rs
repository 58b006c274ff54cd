//! Smoke test of `examples/train_lm`'s core (the corpus, the model and the
//! training loop itself) on a tiny configuration, and of its plumbing
//! (output files, seeds, error messages).

mod common;
#[path = "../examples/train_lm/lm.rs"]
mod lm;
#[path = "../examples/train_lm/support.rs"]
mod support;

use std::collections::HashMap;

use candle_core::Device;
use lm::{builtin_corpus, train, Config, Data, Finished, OptKind, RunResult};

fn tiny() -> Config {
    Config {
        layers: 1,
        d_model: 16,
        heads: 2,
        context: 16,
        batch: 8,
        steps: 30,
        eval_every: 10,
        eval_batches: 2,
        ..Config::default()
    }
}

#[test]
fn corpus_is_deterministic_and_consistent() {
    let a = builtin_corpus(4, 20_000);
    assert_eq!(a, builtin_corpus(4, 20_000));
    assert_ne!(a, builtin_corpus(5, 20_000));
    assert!(a.len() >= 20_000);
    // each person lives in one city throughout the corpus (a learnable fact)
    let mut city: HashMap<&str, &str> = HashMap::new();
    let mut n_facts = 0;
    let mut n_agree = 0;
    for sentence in a.split(['.', '\n']) {
        let words: Vec<&str> = sentence.split_whitespace().collect();
        if let [name, "lives", "in", place] = words.as_slice() {
            n_facts += 1;
            let prev = city.entry(name).or_insert(place);
            assert_eq!(prev, place, "{name} lives in two cities");
        }
        // arithmetic facts are correct
        if let [x, "plus", y, "is", z] = words.as_slice() {
            let (x, y, z): (u32, u32, u32) =
                (x.parse().unwrap(), y.parse().unwrap(), z.parse().unwrap());
            assert_eq!(x + y, z);
        }
        // agreement: a plural subject takes a plural verb
        if let ["the", rest @ ..] = words.as_slice() {
            let adjs = ["small", "old", "happy", "quiet", "tall"];
            let subj = if adjs.contains(&rest[0]) {
                rest[1]
            } else {
                rest[0]
            };
            let verb = rest[rest.len() - 1];
            let plural =
                ["dogs", "children", "birds", "farmers", "mice", "teachers"].contains(&subj);
            assert_eq!(
                plural,
                !verb.ends_with('s'),
                "agreement broken in `{sentence}`"
            );
            n_agree += 1;
        }
    }
    assert!(n_facts > 50 && city.len() > 5 && n_agree > 100);
    let d = Data::from_text(&a, 16).unwrap();
    assert_eq!(
        d.decode(&d.train[..50]),
        a.chars().take(50).collect::<String>()
    );
    assert!(Data::from_text("too short", 16).is_err());
}

#[test]
fn training_loop_learns_and_is_deterministic() {
    let cfg = tiny();
    let data = Data::from_text(&builtin_corpus(1, 30_000), cfg.context).unwrap();
    for kind in OptKind::ALL {
        let mut calls = 0;
        let mut cb = |_step: usize, _r: Option<&lm::Record>| calls += 1;
        let run = train(kind, 0, &cfg, &data, &Device::Cpu, &mut cb).unwrap();
        assert_eq!(calls, cfg.steps + 1);
        // evaluations at 0, 10, 20, 30
        let steps: Vec<usize> = run.records.iter().map(|r| r.step).collect();
        assert_eq!(steps, vec![0, 10, 20, 30]);
        let first = run.records[0].val_loss;
        let last = run.final_val();
        // starts near the uniform guess ln(vocab), and learns something
        let uniform = (data.vocab.len() as f64).ln();
        assert!((first - uniform).abs() < 0.3, "{first} vs ln V = {uniform}");
        assert!(
            last < first - 0.3,
            "{}: val loss {first} → {last}",
            kind.name()
        );
        // σ₁ of each weight matrix: embeddings, 4 per block, head
        assert_eq!(run.matrices.len(), 2 + 4 * cfg.layers + 1);
        for r in &run.records {
            assert!(r.sigmas.iter().all(|s| s.is_finite() && *s > 0.0));
        }
        // on the spectral sphere, every block matrix ends with σ₁ = r
        if kind == OptKind::MuonSpectralSphere {
            let last = run.records.last().unwrap();
            for (name, s) in run.matrices.iter().zip(&last.sigmas) {
                if name.starts_with("h.") {
                    assert!(
                        (s - cfg.radius).abs() < 0.05 * cfg.radius,
                        "{name}: σ₁ = {s}, radius {}",
                        cfg.radius
                    );
                }
            }
        }
    }
    // same seed → identical run; another seed → different
    let mut nop = |_: usize, _: Option<&lm::Record>| {};
    let a = train(
        OptKind::MuonSpectral,
        3,
        &cfg,
        &data,
        &Device::Cpu,
        &mut nop,
    )
    .unwrap();
    let b = train(
        OptKind::MuonSpectral,
        3,
        &cfg,
        &data,
        &Device::Cpu,
        &mut nop,
    )
    .unwrap();
    let c = train(
        OptKind::MuonSpectral,
        4,
        &cfg,
        &data,
        &Device::Cpu,
        &mut nop,
    )
    .unwrap();
    assert_eq!(a.final_val(), b.final_val());
    assert_ne!(a.final_val(), c.final_val());
}

/// `bf16_updates` (the ranks gather bf16-rounded updates): the losses move
/// away from the exact two-rank run's (the rounding is applied) but by less
/// than 2⁻⁸ of how far the loss itself has moved (each update is rounded by
/// at most 2⁻⁸ of itself).
#[test]
fn bf16_updates_stay_within_the_rounding_of_the_exact_two_rank_run() {
    let cfg = Config {
        steps: 6,
        eval_every: 3,
        ranks: 2,
        ..tiny()
    };
    let data = Data::from_text(&builtin_corpus(1, 30_000), cfg.context).unwrap();
    let mut nop = |_: usize, _: Option<&lm::Record>| {};
    for kind in [OptKind::Muon, OptKind::AdamW] {
        let exact = train(kind, 2, &cfg, &data, &Device::Cpu, &mut nop).unwrap();
        let rounded = train(
            kind,
            2,
            &Config {
                bf16_updates: true,
                ..cfg.clone()
            },
            &data,
            &Device::Cpu,
            &mut nop,
        )
        .unwrap();
        let start = exact.records[0].val_loss;
        assert_eq!(start, rounded.records[0].val_loss);
        for (a, b) in exact.records.iter().zip(&rounded.records).skip(1) {
            let moved = (a.val_loss - start).abs();
            let off = (a.val_loss - b.val_loss).abs();
            assert!(
                off > 0.0 && off <= moved * 2f64.powi(-8),
                "{}: step {}: exact {} rounded {} (moved {moved:e})",
                kind.name(),
                a.step,
                a.val_loss,
                b.val_loss
            );
        }
    }
}

/// `train` with `ranks: 2` (two in-process ranks, each on half of every
/// batch, DataParallel with clipping across ranks) follows the one-process
/// run: the first steps agree up to the reduction order of the batch sums
/// (about 1e-7 relative per step), far below what a wrong split or a missing
/// average would give. (Over hundreds of steps training amplifies rounding,
/// so only a short run is compared.)
#[test]
fn two_in_process_ranks_follow_the_one_process_run() {
    let cfg = Config {
        steps: 6,
        eval_every: 3,
        ..tiny()
    };
    let data = Data::from_text(&builtin_corpus(1, 30_000), cfg.context).unwrap();
    let mut nop = |_: usize, _: Option<&lm::Record>| {};
    for kind in [OptKind::Muon, OptKind::AdamW, OptKind::MuonSpectralSphere] {
        let one = train(kind, 2, &cfg, &data, &Device::Cpu, &mut nop).unwrap();
        let two = train(
            kind,
            2,
            &Config {
                ranks: 2,
                ..cfg.clone()
            },
            &data,
            &Device::Cpu,
            &mut nop,
        )
        .unwrap();
        let steps: Vec<usize> = two.records.iter().map(|r| r.step).collect();
        assert_eq!(steps, vec![0, 3, 6]);
        for (a, b) in one.records.iter().zip(&two.records) {
            let rel = (a.val_loss - b.val_loss).abs() / a.val_loss;
            assert!(
                rel < 1e-5,
                "{}: step {}: {} vs {}",
                kind.name(),
                a.step,
                a.val_loss,
                b.val_loss
            );
            if a.step > 0 {
                let rel = (a.train_loss - b.train_loss).abs() / a.train_loss;
                assert!(
                    rel < 1e-5,
                    "{}: train loss {} vs {}",
                    kind.name(),
                    a.train_loss,
                    b.train_loss
                );
            }
        }
        assert!(one.final_val() < one.records[0].val_loss - 0.1);
    }
    // An odd split is refused with a clear error.
    let e = train(
        OptKind::Muon,
        2,
        &Config {
            ranks: 3,
            ..cfg.clone()
        },
        &data,
        &Device::Cpu,
        &mut nop,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("divisible by the number of ranks"), "{e}");
}

/// `spectral_penalty`: the penalty is in the gradient (σ₁ of every matrix
/// ends lower), not in the logged loss (the first step's loss is the same),
/// and two ranks, each adding it, follow the one-process run.
#[test]
fn the_spectral_penalty_shrinks_sigma_and_is_not_logged() {
    let cfg = Config {
        steps: 12,
        eval_every: 6,
        ..tiny()
    };
    let penalised = Config {
        spectral_penalty: 0.5,
        ..cfg.clone()
    };
    let data = Data::from_text(&builtin_corpus(1, 30_000), cfg.context).unwrap();
    let mut nop = |_: usize, _: Option<&lm::Record>| {};
    for kind in [OptKind::AdamW, OptKind::Muon] {
        let plain = train(kind, 1, &cfg, &data, &Device::Cpu, &mut nop).unwrap();
        let pen = train(kind, 1, &penalised, &data, &Device::Cpu, &mut nop).unwrap();
        assert_eq!(
            plain.losses[0],
            pen.losses[0],
            "{}: step 1's loss",
            kind.name()
        );
        assert_ne!(
            plain.losses[1],
            pen.losses[1],
            "{}: step 2's loss",
            kind.name()
        );
        let (a, b) = (plain.records.last().unwrap(), pen.records.last().unwrap());
        for ((name, s0), s1) in plain.matrices.iter().zip(&a.sigmas).zip(&b.sigmas) {
            // Muon's AdamW part keeps the embeddings and the head; the block
            // matrices' orthogonalised steps ignore the gradient's scale but
            // not its direction, so they shrink too.
            assert!(
                s1 < s0,
                "{} {name}: σ₁ {s1} with the penalty, {s0} without",
                kind.name()
            );
        }
        let two = train(
            kind,
            1,
            &Config {
                ranks: 2,
                ..penalised.clone()
            },
            &data,
            &Device::Cpu,
            &mut nop,
        )
        .unwrap();
        for (x, y) in pen.losses.iter().zip(&two.losses) {
            assert!(
                (x - y).abs() < 1e-5 * x,
                "{}: {x} vs {y} over two ranks",
                kind.name()
            );
        }
    }
}

/// `sphere_bracket`: the spectral-sphere run with its dual solved per step
/// keeps every block matrix at σ₁ = r, learns, and is another run than
/// the one-dual-step default.
#[test]
fn the_bracketed_sphere_dual_trains() {
    let cfg = Config {
        steps: 12,
        eval_every: 6,
        ..tiny()
    };
    let data = Data::from_text(&builtin_corpus(1, 30_000), cfg.context).unwrap();
    let mut nop = |_: usize, _: Option<&lm::Record>| {};
    let kind = OptKind::MuonSpectralSphere;
    let plain = train(kind, 1, &cfg, &data, &Device::Cpu, &mut nop).unwrap();
    let bracketed = Config {
        sphere_bracket: Some(6),
        ..cfg.clone()
    };
    let run = train(kind, 1, &bracketed, &data, &Device::Cpu, &mut nop).unwrap();
    assert_ne!(plain.losses[1], run.losses[1]);
    assert!(run.final_val() < run.records[0].val_loss - 0.3);
    let last = run.records.last().unwrap();
    for (name, s) in run.matrices.iter().zip(&last.sigmas) {
        if name.starts_with("h.") {
            assert!(
                (s - cfg.radius).abs() < 0.05 * cfg.radius,
                "{name}: σ₁ = {s}"
            );
        }
    }
}

/// A rank whose partner has gone fails with an error that names the gone
/// rank; `train_local_ranks` reports the gone rank's own error instead of
/// rank 0's consequence of it, so the error it prints is the cause.
#[test]
fn a_rank_left_alone_is_recognised_as_a_consequence() {
    use steepest::distributed::{Collective, LocalGroup, ReduceOp};
    let mut comms = LocalGroup::new(2).unwrap().into_iter();
    let (zero, one) = (comms.next().unwrap(), comms.next().unwrap());
    drop(one);
    let x = candle_core::Tensor::ones(3, candle_core::DType::F32, &Device::Cpu).unwrap();
    let err = zero.all_reduce(&x, ReduceOp::Sum).unwrap_err();
    assert!(lm::left_the_group(&err), "{err}");
    let other = candle_core::Error::Msg("the batch is empty".into());
    assert!(!lm::left_the_group(&other));
}

/// The presets: `small` is the default configuration (and its 400 000-char
/// corpus), `gpu` has ≥ 10 M parameters; `param_count` counts what the
/// model builds; a longer built-in corpus starts with the shorter one.
#[test]
fn presets_parameter_count_and_grown_corpus() {
    let small = Config::preset("small").unwrap();
    let d = Config::default();
    assert_eq!(
        (small.layers, small.d_model, small.heads, small.context),
        (d.layers, d.d_model, d.heads, d.context)
    );
    assert_eq!((small.batch, small.steps, small.eval_every), (16, 300, 20));
    assert_eq!(small.corpus_chars, 400_000);
    assert!(!small.timing && small.stop_after.is_none());
    assert!(Config::preset("huge").is_none());
    for name in Config::PRESETS {
        assert!(Config::preset(name).is_some(), "{name}");
    }

    let gpu = Config::gpu();
    assert_eq!(
        (gpu.layers, gpu.d_model, gpu.heads, gpu.context),
        (6, 384, 6, 256)
    );
    assert_eq!(gpu.d_model % gpu.heads, 0);
    // the built-in corpus has 39 characters
    assert_eq!(gpu.param_count(39), 10_750_080);
    assert!(gpu.param_count(39) >= 10_000_000);
    // enough text that a run sees each training character about once or twice
    let tokens = gpu.steps * gpu.batch * gpu.context;
    let train_chars = gpu.corpus_chars * 9 / 10;
    assert!(train_chars <= tokens && tokens <= 2 * train_chars);

    // the count matches the model that is built
    let cfg = tiny();
    let data = Data::from_text(&builtin_corpus(0, 20_000), cfg.context).unwrap();
    let varmap = candle_nn::VarMap::new();
    lm::Gpt::new(&varmap, &cfg, data.vocab.len(), 0, &Device::Cpu).unwrap();
    let built: usize = varmap.all_vars().iter().map(|v| v.elem_count()).sum();
    assert_eq!(built, cfg.param_count(data.vocab.len()));

    // grown corpus: the small one is its beginning, byte for byte
    let grown = builtin_corpus(0, 1_000_000);
    let small_corpus = builtin_corpus(0, small.corpus_chars);
    assert!(grown.len() >= 1_000_000);
    assert!(grown.starts_with(&small_corpus));
    assert_eq!(
        Data::from_text(&grown, 16).unwrap().vocab.len(),
        Data::from_text(&small_corpus, 16).unwrap().vocab.len()
    );
}

/// Every step's training loss is kept; `stop_after` runs the first steps of
/// the full schedule (the same losses as the full run); the timing counts
/// every step but the first, and fencing it does not change the results;
/// the data-parallel loop keeps them too.
#[test]
fn per_step_losses_stop_after_and_timing() {
    let cfg = Config {
        steps: 30,
        eval_every: 5,
        ..tiny()
    };
    let data = Data::from_text(&builtin_corpus(1, 30_000), cfg.context).unwrap();
    let mut nop = |_: usize, _: Option<&lm::Record>| {};
    let full = train(OptKind::Muon, 0, &cfg, &data, &Device::Cpu, &mut nop).unwrap();
    assert_eq!(full.losses.len(), 30);
    assert!(full.losses.iter().all(|l| l.is_finite() && *l > 0.0));
    // a record's train loss is the mean of the steps since the last one
    let mean: f64 = full.losses[5..10].iter().sum::<f64>() / 5.0;
    assert!((full.records[2].train_loss - mean).abs() < 1e-9);

    let short_cfg = Config {
        stop_after: Some(12),
        timing: true,
        ..cfg.clone()
    };
    assert_eq!(short_cfg.steps_run(), 12);
    let mut calls = 0;
    let mut count = |_: usize, _: Option<&lm::Record>| calls += 1;
    let short = train(
        OptKind::Muon,
        0,
        &short_cfg,
        &data,
        &Device::Cpu,
        &mut count,
    )
    .unwrap();
    assert_eq!(calls, 13);
    assert_eq!(short.losses, full.losses[..12].to_vec());
    let steps: Vec<usize> = short.records.iter().map(|r| r.step).collect();
    assert_eq!(steps, vec![0, 5, 10, 12]);
    assert_eq!(short.records[2].val_loss, full.records[2].val_loss);

    let t = &short.timing;
    assert!(t.synchronized && !full.timing.synchronized);
    assert_eq!(t.steps, 11);
    assert_eq!(t.tokens, 11 * cfg.batch * cfg.context);
    for s in [t.forward_s, t.backward_s, t.clip_s, t.optimizer_s] {
        assert!(s >= 0.0 && s.is_finite());
    }
    assert!(t.forward_s > 0.0 && t.backward_s > 0.0 && t.optimizer_s > 0.0);
    let share = t.optimizer_share().unwrap();
    assert!(share > 0.0 && share < 1.0);
    assert!(t.tokens_per_s().unwrap() > 0.0);
    assert!((t.step_s() - (t.forward_s + t.backward_s + t.clip_s + t.optimizer_s)).abs() < 1e-12);
    // step 1 and the evaluations (steps 0, 5, 10, 12) are timed apart
    assert!(t.first_step_s > 0.0 && t.first_step_s.is_finite());
    assert_eq!(t.evals, short.records.len());
    assert_eq!(full.timing.evals, full.records.len());
    assert!(t.first_eval_s > 0.0 && t.eval_s > t.first_eval_s);
    assert!(short.seconds > t.step_s() + t.first_step_s + t.eval_s - 1e-9);

    let ranked = train(
        OptKind::AdamW,
        0,
        &Config {
            ranks: 2,
            ..short_cfg.clone()
        },
        &data,
        &Device::Cpu,
        &mut nop,
    )
    .unwrap();
    assert_eq!(ranked.losses.len(), 12);
    assert_eq!(ranked.timing.steps, 11);
    assert_eq!(ranked.timing.clip_s, 0.0);
    assert!(ranked.timing.optimizer_s > 0.0);
}

/// `Finished` collects runs as they end, in any order: the finished ones in
/// queue order (kept when others fail), the failed ones named with their
/// errors.
#[test]
fn finished_runs_are_kept_when_others_fail() {
    let run = |kind: OptKind, seed: u64| RunResult {
        kind,
        seed,
        matrices: Vec::new(),
        records: Vec::new(),
        seconds: 0.0,
        losses: Vec::new(),
        timing: lm::Timing::default(),
    };
    let mut f = Finished::default();
    assert_eq!((f.ended(), f.error(4, "")), (0, None));
    f.push(2, OptKind::Muon, 1, Ok(run(OptKind::Muon, 1)));
    f.push(3, OptKind::AdamW, 1, Err("out of memory".into()));
    f.push(0, OptKind::AdamW, 0, Ok(run(OptKind::AdamW, 0)));
    assert_eq!(f.ended(), 3);
    assert_eq!(
        f.error(4, ""),
        Some("1 of 4 runs failed: adamw seed 1: out of memory".into())
    );
    f.push(1, OptKind::Muon, 0, Err("panicked: boom".into()));
    let order: Vec<(OptKind, u64)> = f.runs().iter().map(|r| (r.kind, r.seed)).collect();
    assert_eq!(order, [(OptKind::AdamW, 0), (OptKind::Muon, 1)]);
    assert_eq!(f.failed_runs(), ["muon seed 0", "adamw seed 1"]);
    assert_eq!(
        f.error(4, " (2 kept)").unwrap(),
        "2 of 4 runs failed (2 kept): muon seed 0: panicked: boom; adamw seed 1: out of memory"
    );
    assert_eq!(f.ended(), 4);
    assert_eq!(f.into_runs().len(), 2);
}

/// The shortest text `Data::from_text` accepts is the one its message
/// names (the split is 90/10, and each part needs `context + 2` tokens).
#[test]
fn shortest_text_is_the_stated_minimum() {
    // the small preset's context: 650 characters fail, 651 train (the
    // validation part of 651 is 66 = context + 2 tokens)
    assert_eq!(Data::min_chars(64), 651);
    for context in [1, 16, 64, 256] {
        let min = Data::min_chars(context);
        // characters, not bytes
        let text: String = "aé,b".chars().cycle().take(min).collect();
        let d = Data::from_text(&text, context).unwrap();
        assert_eq!(d.train.len() + d.val.len(), min);
        assert!(d.train.len().min(d.val.len()) > context + 1);
        let short: String = text.chars().take(min - 1).collect();
        let e = Data::from_text(&short, context).unwrap_err().to_string();
        assert!(
            e.contains(&format!("has {} characters", min - 1))
                && e.contains(&format!("needs at least {min}")),
            "{e}"
        );
    }
}

#[test]
fn shortest_text_trains() {
    let cfg = Config {
        steps: 2,
        stop_after: None,
        ..tiny()
    };
    let text: String = builtin_corpus(2, 2_000)
        .chars()
        .take(Data::min_chars(cfg.context))
        .collect();
    let data = Data::from_text(&text, cfg.context).unwrap();
    let r = train(OptKind::AdamW, 0, &cfg, &data, &Device::Cpu, &mut |_, _| {}).unwrap();
    assert!(r.final_val().is_finite());
}

/// Nothing but `names` in `dir` (no temporary file left behind).
fn assert_only(dir: &std::path::Path, names: &[&str]) {
    let mut found: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    found.sort();
    let mut want: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    want.sort();
    assert_eq!(found, want);
}

#[test]
fn replace_file_replaces_whole_files_and_keeps_them_on_failure() {
    use std::fs;
    let dir = common::scratch_dir("train-lm", "replace");
    let path = dir.join("a.csv");
    // a new file, then an existing one replaced
    support::replace_file(&path, |p| Ok(fs::write(p, "one")?)).unwrap();
    support::replace_file(&path, |p| {
        assert_ne!(p, path, "written through a temporary file");
        Ok(fs::write(p, "two")?)
    })
    .unwrap();
    assert_eq!(fs::read_to_string(&path).unwrap(), "two");
    assert_only(&dir, &["a.csv"]);
    // a failed write leaves the previous version, and its error names the path
    let e = support::replace_file(&path, |p| {
        fs::write(p, "half")?;
        anyhow::bail!("disk full")
    })
    .unwrap_err();
    let msg = format!("{e:#}");
    assert!(
        msg.contains(&path.display().to_string()) && msg.contains("disk full"),
        "{msg}"
    );
    assert_eq!(fs::read_to_string(&path).unwrap(), "two");
    assert_only(&dir, &["a.csv"]);
    // two files at once
    let b = dir.join("b.txt");
    support::replace_files(&[&path, &b], |p| {
        fs::write(&p[0], "three")?;
        Ok(fs::write(&p[1], "four")?)
    })
    .unwrap();
    assert_eq!(fs::read_to_string(&path).unwrap(), "three");
    assert_eq!(fs::read_to_string(&b).unwrap(), "four");
    assert_only(&dir, &["a.csv", "b.txt"]);
    let _ = fs::remove_dir_all(&dir);
}

/// A symbolic link (such as /dev/stdout, a link to /proc/self/fd/1) is
/// written through, not replaced by a regular file.
#[cfg(unix)]
#[test]
fn replace_file_writes_through_a_symlink() {
    use std::fs;
    let dir = common::scratch_dir("train-lm", "symlink");
    let target = dir.join("target.csv");
    let link = dir.join("link.csv");
    fs::write(&target, "old").unwrap();
    std::os::unix::fs::symlink("target.csv", &link).unwrap();
    support::check_writable(&link).unwrap();
    assert_eq!(fs::read_to_string(&target).unwrap(), "old");
    support::replace_file(&link, |p| Ok(fs::write(p, "new")?)).unwrap();
    assert!(fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(fs::read_to_string(&target).unwrap(), "new");
    assert_only(&dir, &["link.csv", "target.csv"]);
    let _ = fs::remove_dir_all(&dir);
}

/// A stream — here a link to /proc/self/fd/N, as /dev/stdout is a link to
/// /proc/self/fd/1 — is not truncated, and is written at the descriptor's
/// own offset: with `--loss-log /dev/stdout > run.txt`, truncating would
/// erase what the run had printed to run.txt, and a file offset of its own
/// would let the next print overwrite the log. A plain file is still
/// replaced whole.
#[cfg(target_os = "linux")]
#[test]
fn a_stream_is_appended_to_and_a_file_replaced() {
    use std::fs;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let dir = common::scratch_dir("train-lm", "stream");
    let out = dir.join("run.txt");
    // The shell's redirect: a file open for writing, with output already in it.
    let mut redirected = fs::File::create(&out).unwrap();
    redirected.write_all(b"printed\n").unwrap();
    let link = dir.join("stdout");
    std::os::unix::fs::symlink(format!("/proc/self/fd/{}", redirected.as_raw_fd()), &link).unwrap();
    support::check_writable(&link).unwrap();
    support::replace_file(&link, |p| Ok(support::create(p)?.write_all(b"log\n")?)).unwrap();
    assert_eq!(fs::read_to_string(&out).unwrap(), "printed\nlog\n");
    // and what the program prints next goes after the log, not over it
    redirected.write_all(b"after\n").unwrap();
    assert_eq!(fs::read_to_string(&out).unwrap(), "printed\nlog\nafter\n");
    // A plain file (and a link to one) is replaced whole.
    let plain = dir.join("plain.csv");
    fs::write(&plain, "old, longer content\n").unwrap();
    let to_plain = dir.join("to_plain.csv");
    std::os::unix::fs::symlink("plain.csv", &to_plain).unwrap();
    support::replace_file(&plain, |p| Ok(support::create(p)?.write_all(b"new\n")?)).unwrap();
    assert_eq!(fs::read_to_string(&plain).unwrap(), "new\n");
    support::replace_file(&to_plain, |p| Ok(support::create(p)?.write_all(b"x\n")?)).unwrap();
    assert_eq!(fs::read_to_string(&plain).unwrap(), "x\n");
    drop(redirected);
    let _ = fs::remove_dir_all(&dir);
}

/// `check_writable` (before training): creates the parent directories,
/// leaves an existing file as it is and no new one, and names the path of
/// one it cannot write.
#[test]
fn check_writable_fails_early_and_changes_nothing() {
    use std::fs;
    let dir = common::scratch_dir("train-lm", "check");
    // a new file in new directories: they are made, the file is not
    let new = dir.join("x/y/loss.csv");
    support::check_writable(&new).unwrap();
    assert!(dir.join("x/y").is_dir() && !new.exists());
    assert_only(&dir.join("x/y"), &[]);
    // an existing file keeps its content
    let old = dir.join("old.csv");
    fs::write(&old, "kept").unwrap();
    support::check_writable(&old).unwrap();
    assert_eq!(fs::read_to_string(&old).unwrap(), "kept");
    // a directory
    let e = format!("{:#}", support::check_writable(&dir.join("x")).unwrap_err());
    assert!(
        e.contains(&dir.join("x").display().to_string()) && e.contains("directory"),
        "{e}"
    );
    // under a regular file
    let bad = old.join("loss.csv");
    let e = format!("{:#}", support::check_writable(&bad).unwrap_err());
    assert!(
        e.starts_with(&format!("cannot write {}", bad.display())),
        "{e}"
    );
    assert_only(&dir, &["old.csv", "x"]);
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn seed_range_does_not_overflow() {
    assert_eq!(support::seed_range(0, 3).unwrap(), 0..=2);
    assert_eq!(
        support::seed_range(u64::MAX, 1).unwrap(),
        u64::MAX..=u64::MAX
    );
    assert_eq!(support::seed_range(u64::MAX - 2, 3).unwrap().count(), 3);
    let e = support::seed_range(u64::MAX, 2).unwrap_err().to_string();
    assert!(
        e.contains("--first-seed 18446744073709551615 --seeds 2"),
        "{e}"
    );
    assert!(support::seed_range(u64::MAX - 1, 3).is_err());
}

#[test]
fn numbers_in_the_table_stay_short() {
    // the defaults as before
    assert_eq!(support::fmt_num(0.003), "0.003");
    assert_eq!(support::fmt_num(0.02), "0.02");
    assert_eq!(support::fmt_num(2.0), "2");
    assert_eq!(support::fmt_num(0.0), "0");
    assert_eq!(support::fmt_num(1e-300), "1e-300");
    assert_eq!(support::fmt_num(2.5e-7), "2.5e-7");
    assert_eq!(support::fmt_num(1e300), "1e300");
}

/// A candle error made with backtraces on (RUST_BACKTRACE=1) prints as its
/// message alone, on one line.
#[test]
fn error_line_leaves_out_candle_backtraces() {
    let inner = candle_core::Error::Msg("the text has 12 characters".into());
    let traced = candle_core::Error::WithBacktrace {
        inner: Box::new(inner),
        backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
    };
    assert!(
        traced.to_string().lines().count() > 1,
        "the backtrace is in its Display"
    );
    let e = anyhow::Error::from(traced).context("--data");
    assert_eq!(
        support::error_line(&e),
        "--data: the text has 12 characters"
    );
    let ctx = candle_core::Error::Msg("bad shape".into()).context("in layer 2");
    let e = anyhow::Error::from(ctx).context("training");
    assert_eq!(support::error_line(&e), "training: in layer 2: bad shape");
}

/// A run's failure, error or panic, becomes one line naming it; a success
/// passes through.
#[test]
fn caught_turns_errors_and_panics_into_one_line() {
    use support::caught;
    assert_eq!(caught(|| Ok::<_, anyhow::Error>(3)), Ok(3));
    let e = caught(|| -> anyhow::Result<()> {
        Err(anyhow::anyhow!("disk full").context("writing train_lm.csv"))
    });
    assert_eq!(e, Err("writing train_lm.csv: disk full".into()));
    let shape = caught(|| {
        candle_core::Tensor::zeros((2, 3), candle_core::DType::F32, &Device::Cpu)?.matmul(
            &candle_core::Tensor::zeros((2, 3), candle_core::DType::F32, &Device::Cpu)?,
        )
    })
    .unwrap_err();
    assert!(
        shape.contains("shape mismatch") && !shape.contains('\n'),
        "{shape}"
    );
    // the panics' payloads: a literal, a formatted message, anything else
    assert_eq!(
        caught(|| -> anyhow::Result<()> { panic!("boom") }),
        Err("panicked: boom".into())
    );
    let n = 7;
    assert_eq!(
        caught(|| -> anyhow::Result<()> { panic!("boom {n}") }),
        Err("panicked: boom 7".into())
    );
    assert_eq!(
        caught(|| -> anyhow::Result<()> { std::panic::panic_any(5u8) }),
        Err("panicked: (no message)".into())
    );
}
