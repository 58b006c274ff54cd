//! Smoke test of `examples/train_lm`'s core (the corpus, the model and the
//! training loop itself) on a tiny configuration.

#[path = "../examples/train_lm/lm.rs"]
mod lm;

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
    assert!(t.optimizer_share() > 0.0 && t.optimizer_share() < 1.0);
    assert!(t.tokens_per_s() > 0.0);
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
