//! Data-parallel steps of an optimizer whose step can fail on valid
//! gradients: `Steepest` on the Stiefel manifold, whose retraction refuses a
//! rank-deficient matrix. A failure at one owner must be undone on every
//! rank (the two-phase step: `ShardedStep::step_subset_agreed`), so the
//! refused step changes no parameter, no state and no schedule counter on
//! any rank, as in one process.

mod distributed_support;
mod support;

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use distributed_support::{bits, host, make_vars, rank_order_avg};
use steepest::distributed::{DataParallel, DataParallelConfig, LocalGroup, ShardedStep};
use steepest::optim::NamedVar;
use steepest::schedule::{Schedule, Scheduled};
use steepest::{Error, Manifold, OptimizerState, Steepest, SteepestConfig};
use support::FailOn;

const WORLD: usize = 3;
const STEPS: usize = 5;
/// The step at which `w.3` (zero from the start, and without a gradient
/// until then) gets a zero gradient: its retraction has no answer.
const BAD_STEP: usize = 2;
const ZERO: usize = 3;

fn shapes() -> Vec<Vec<usize>> {
    vec![vec![8, 4]; 6]
}

/// Six tall matrices; `w.3` is zero.
fn named_vars() -> Vec<NamedVar> {
    make_vars(&shapes(), 7)
        .into_iter()
        .enumerate()
        .map(|(i, var)| {
            let var = if i == ZERO {
                Var::zeros((8, 4), DType::F32, &Device::Cpu).unwrap()
            } else {
                var
            };
            NamedVar {
                name: format!("w.{i}"),
                var,
            }
        })
        .collect()
}

fn optimizer(vars: Vec<NamedVar>) -> Scheduled<Steepest> {
    let cfg = SteepestConfig {
        lr: 0.05,
        manifold: Manifold::Stiefel { transpose: false },
        ..Default::default()
    };
    let schedule = Schedule::cosine(0.05, 0.005, STEPS).unwrap();
    Scheduled::new(Steepest::from_named(vars, cfg).unwrap(), schedule)
}

/// Rank `rank`'s gradient of parameter `i` at `step` (`None`: no gradient).
fn grad(step: usize, rank: usize, i: usize) -> Option<Tensor> {
    if i == ZERO {
        return (step == BAD_STEP)
            .then(|| Tensor::zeros((8, 4), DType::F32, &Device::Cpu).unwrap());
    }
    Some((distributed_support::grad(step, rank, i, &[8, 4]) * 0.01).unwrap())
}

type HostState = BTreeMap<String, Vec<u8>>;

fn host_state<O: OptimizerState>(opt: &O) -> HostState {
    opt.state_dict()
        .unwrap()
        .into_iter()
        .filter(|(k, _)| k != "__steepest__")
        .map(|(k, t)| {
            let v = t.flatten_all().unwrap().to_dtype(DType::F32).unwrap();
            let b = bits(&host(&v))
                .iter()
                .flat_map(|x| x.to_le_bytes())
                .collect();
            (k, b)
        })
        .collect()
}

fn params(vars: &[NamedVar]) -> Vec<Vec<u32>> {
    vars.iter()
        .map(|v| bits(&host(v.var.as_tensor())))
        .collect()
}

/// Per step: the result, then the parameters, state and schedule counter.
struct Trace {
    errors: Vec<Option<Error>>,
    params: Vec<Vec<Vec<u32>>>,
    states: Vec<HostState>,
    counters: Vec<usize>,
}

fn run_distributed() -> Vec<Trace> {
    LocalGroup::run(WORLD, |comm| {
        let rank = steepest::distributed::Collective::rank(&comm);
        let vars = named_vars();
        let opt = optimizer(vars.clone());
        let mut dp = DataParallel::for_optimizer(comm, opt, DataParallelConfig::default())?;
        assert!(dp.optimizer().agrees_before_commit());
        let mut t = Trace {
            errors: vec![],
            params: vec![params(&vars)],
            states: vec![host_state(dp.optimizer())],
            counters: vec![dp.optimizer().current_step()],
        };
        for step in 0..STEPS {
            let g: Vec<Option<Tensor>> = (0..vars.len()).map(|i| grad(step, rank, i)).collect();
            t.errors.push(dp.step_grads(&g).err());
            t.params.push(params(&vars));
            t.states.push(host_state(dp.optimizer()));
            t.counters.push(dp.optimizer().current_step());
        }
        Ok(t)
    })
    .unwrap()
    .into_iter()
    .map(|r| r.unwrap())
    .collect()
}

/// One process fed the averaged gradients.
fn run_reference() -> (Vec<Option<Error>>, Vec<Vec<Vec<u32>>>) {
    let vars = named_vars();
    let mut opt = optimizer(vars.clone());
    let (mut errors, mut trace) = (vec![], vec![params(&vars)]);
    for step in 0..STEPS {
        let g: Vec<(usize, Tensor)> = (0..vars.len())
            .filter_map(|i| {
                let per_rank: Vec<_> = (0..WORLD).map(|r| grad(step, r, i)).collect();
                per_rank
                    .iter()
                    .any(Option::is_some)
                    .then(|| (i, rank_order_avg(&per_rank, &[8, 4], false)))
            })
            .collect();
        errors.push(ShardedStep::step_subset(&mut opt, &g).err());
        trace.push(params(&vars));
    }
    (errors, trace)
}

#[test]
fn a_retraction_failing_at_one_owner_is_undone_on_every_rank() {
    let traces = run_distributed();
    let (ref_errors, ref_params) = run_reference();
    assert!(
        matches!(&ref_errors[BAD_STEP], Some(Error::Numerical { who, .. }) if who == "w.3"),
        "one process refuses the step too: {:?}",
        ref_errors[BAD_STEP]
    );
    for (rank, t) in traces.iter().enumerate() {
        for (step, e) in t.errors.iter().enumerate() {
            if step != BAD_STEP {
                assert!(e.is_none(), "rank {rank}, step {step}: {e:?}");
                continue;
            }
            // The same kind and parameter on every rank, though only w.3's
            // owner failed.
            match e {
                Some(Error::Numerical { who, what }) => {
                    assert_eq!(who, "w.3", "rank {rank}");
                    assert!(
                        what.contains("refused on every rank, nothing changed"),
                        "{what}"
                    );
                }
                other => panic!("rank {rank}: {other:?}"),
            }
        }
        // Nothing changed at the refused step: parameters, state, counter.
        assert_eq!(
            t.params[BAD_STEP + 1],
            t.params[BAD_STEP],
            "rank {rank}: parameters"
        );
        assert_eq!(
            t.states[BAD_STEP + 1],
            t.states[BAD_STEP],
            "rank {rank}: state"
        );
        assert_eq!(
            t.counters,
            [0, 1, 2, 2, 3, 4],
            "rank {rank}: schedule counter"
        );
        // Every other step moved the parameters that have gradients.
        for step in [0, 1, 3, 4] {
            for i in (0..6).filter(|&i| i != ZERO) {
                assert_ne!(
                    t.params[step + 1][i],
                    t.params[step][i],
                    "rank {rank}, step {step}, w.{i}"
                );
            }
        }
        // The ranks agree bit for bit.
        assert_eq!(t.params, traces[0].params, "rank {rank} vs rank 0");
    }
    // Some ranks had stepped their shares before the agreement undid them:
    // the owners of the good matrices hold state from steps 0–1.
    let with_state = traces
        .iter()
        .filter(|t| !t.states[BAD_STEP].is_empty())
        .count();
    assert!(with_state >= 2, "{with_state} ranks hold state");
    // And the run is the one-process run (a smaller batch at an owner may
    // end the cold retraction at another round, hence the tolerance).
    assert_eq!(
        (traces[0].params.len(), ref_params.len()),
        (STEPS + 1, STEPS + 1)
    );
    for (step, (ours, theirs)) in traces[0].params.iter().zip(&ref_params).enumerate() {
        for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
            let d = a
                .iter()
                .zip(b)
                .map(|(x, y)| (f32::from_bits(*x) - f32::from_bits(*y)).abs())
                .fold(0f32, f32::max);
            assert!(d <= 1e-6, "step {step}, w.{i}: max |Δ| = {d:e}");
        }
    }
}

/// The driver's two-phase step on its own: `agree` is called exactly once
/// on every path, with the error so far; an `Err` from it undoes the
/// fallible groups (Stiefel) and leaves the infallible ones (AdamW) unrun.
#[test]
fn step_subset_agreed_asks_once_and_undoes_on_a_refusal() {
    use steepest::optim::{Driver, Partition};
    use steepest::AdamWConfig;
    let build = |zero: bool| -> (Driver, Vec<NamedVar>) {
        let mut vars = named_vars();
        if !zero {
            vars.remove(ZERO);
        }
        vars.push(NamedVar {
            name: "bias".into(),
            var: Var::new(&[0.5f32, -0.5, 0.25], &Device::Cpu).unwrap(),
        });
        let stiefel = SteepestConfig {
            lr: 0.05,
            manifold: Manifold::Stiefel { transpose: false },
            ..Default::default()
        }
        .chain();
        let d = Partition::by(|p| if p.is_matrix() { "stiefel" } else { "adamw" })
            .group("stiefel", stiefel, 0.05)
            .group("adamw", AdamWConfig::default().chain(), 1e-2)
            .build(vars.clone())
            .unwrap();
        assert!(d.has_fallible_chain());
        (d, vars)
    };
    let grads = |vars: &[NamedVar], zero_grad: bool| -> Vec<(usize, Tensor)> {
        vars.iter()
            .enumerate()
            .map(|(i, v)| {
                let g = if v.name == "w.3" && zero_grad {
                    v.var.zeros_like().unwrap()
                } else {
                    (distributed_support::grad(0, 0, i, v.var.dims()) * 0.01).unwrap()
                };
                (i, g)
            })
            .collect()
    };
    let snapshot = |d: &Driver, vars: &[NamedVar]| (params(vars), host_state(d));
    // (a zero matrix with a zero gradient, agree refuses, a bad gradient shape)
    for (zero, refuse, bad_shape) in [
        (false, false, false),
        (false, true, false),
        (true, false, false),
        (false, false, true),
    ] {
        let case = format!("zero {zero}, refuse {refuse}, bad shape {bad_shape}");
        let (mut d, vars) = build(zero);
        let mut g = grads(&vars, true);
        if bad_shape {
            g[0].1 = g[0].1.t().unwrap();
        }
        let before = snapshot(&d, &vars);
        let mut asked = Vec::new();
        let r = d.step_subset_agreed(&g, &mut |e| {
            asked.push(e.map(|e| e.to_string()));
            // Nothing of the infallible groups has run yet.
            assert_eq!(
                bits(&host(vars.last().unwrap().var.as_tensor())),
                before.0.last().unwrap().clone()
            );
            if refuse {
                Err(Error::numerical("agreement", "another rank failed"))
            } else {
                Ok(())
            }
        });
        assert_eq!(asked.len(), 1, "{case}: asked {asked:?}");
        let expect_err = zero || refuse || bad_shape;
        assert_eq!(asked[0].is_some(), zero || bad_shape, "{case}: {asked:?}");
        assert_eq!(r.is_err(), expect_err, "{case}: {r:?}");
        if refuse {
            assert!(
                r.unwrap_err().to_string().contains("another rank failed"),
                "{case}"
            );
        }
        let after = snapshot(&d, &vars);
        if expect_err {
            assert_eq!(after, before, "{case}: something changed");
        } else {
            assert!(
                after.0.iter().zip(&before.0).all(|(a, b)| a != b),
                "{case}: all move"
            );
        }
    }
}

/// A failure the agreement cannot undo (an infallible transform that fails
/// after the first write, at one owner) is reported on every rank, and
/// every rank refuses further steps — the failed rank's schedule counter
/// and state are behind the others' — and `save_state` (whose checkpoint
/// would have held the disagreeing counters: it saved, then never loaded)
/// until `load_state` brings back a consistent state; then steps go on with
/// equal counters.
#[test]
fn a_failure_after_the_agreement_refuses_further_steps_until_load_state() {
    use steepest::optim::transform::Momentum;
    use steepest::optim::{Chain, Partition};
    let dir = std::env::temp_dir().join(format!("steepest_dp_broken_{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = LocalGroup::run(2, |comm| {
        let rank = steepest::distributed::Collective::rank(&comm);
        let now = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let chain = Chain::new()
            .then(Momentum::ema(0.9, false).unwrap())
            .then(FailOn {
                target: "w.1",
                now: now.clone(),
                declared: false,
            });
        let vars: Vec<NamedVar> = named_vars()
            .into_iter()
            .filter(|v| v.name != "w.3")
            .collect();
        let driver = Partition::by(|_| "m")
            .group("m", chain, 0.01)
            .build(vars.clone())?;
        let opt = Scheduled::new(driver, Schedule::cosine(0.01, 0.001, 10).unwrap());
        let mut dp = DataParallel::for_optimizer(comm, opt, DataParallelConfig::default())?;
        let grads = |step: usize| -> Vec<Option<Tensor>> {
            (0..vars.len()).map(|i| grad(step, rank, i)).collect()
        };
        dp.step_grads(&grads(0))?;
        dp.save_state(&dir)?;
        now.store(true, std::sync::atomic::Ordering::SeqCst);
        let failed = dp.step_grads(&grads(1)).unwrap_err().to_string();
        let refused = dp.step_grads(&grads(2)).unwrap_err().to_string();
        // Nor is the disagreeing state saved (on every rank; no manifest).
        let not_saved = dp.save_state(dir.join("broken")).unwrap_err().to_string();
        assert!(
            not_saved.contains("refused: an earlier step failed"),
            "rank {rank}: {not_saved}"
        );
        assert!(!dir.join("broken").join("manifest.json").exists());
        let counter_after_failure = dp.optimizer().current_step();
        now.store(false, std::sync::atomic::Ordering::SeqCst);
        dp.load_state(&dir)?;
        let counter_after_load = dp.optimizer().current_step();
        dp.step_grads(&grads(2))?;
        Ok((
            failed,
            refused,
            counter_after_failure,
            counter_after_load,
            dp.optimizer().current_step(),
        ))
    })
    .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let out: Vec<_> = out.into_iter().map(|r| r.unwrap()).collect();
    for (rank, (failed, refused, ..)) in out.iter().enumerate() {
        assert!(
            failed.contains("further steps are refused until load_state"),
            "rank {rank}: {failed}"
        );
        assert!(
            refused.contains("refused: an earlier step failed"),
            "rank {rank}: {refused}"
        );
    }
    // The owner of w.1 failed partway: its counter stayed, the other's moved.
    let mut after_failure: Vec<usize> = out.iter().map(|o| o.2).collect();
    after_failure.sort();
    assert_eq!(after_failure, [1, 2]);
    assert!(
        out.iter().any(|o| o.0.contains("partly applied")),
        "{:?}",
        out[0].0
    );
    for (rank, o) in out.iter().enumerate() {
        assert_eq!(
            (o.3, o.4),
            (1, 2),
            "rank {rank}: counters after load, after a step"
        );
    }
}

/// A third-party `ShardedStep` that claims the two phases but breaks the
/// `agree` contract (never calls it, calls it twice, or returns `Ok` after
/// `agree` refused the step) gets an error on every rank, not a deadlock
/// or a silent success.
#[test]
fn an_agree_contract_violation_is_an_error_not_a_hang() {
    use distributed_support::MomentumSgd;
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Violation {
        NeverAsks,
        AsksTwice,
        IgnoresRefusal,
    }
    struct Broken {
        inner: MomentumSgd,
        violation: Violation,
        rank: usize,
    }
    impl ShardedStep for Broken {
        fn step_subset(&mut self, g: &[(usize, Tensor)]) -> steepest::Result<()> {
            self.inner.step_subset(g)
        }
        fn agrees_before_commit(&self) -> bool {
            true
        }
        fn step_subset_agreed(
            &mut self,
            g: &[(usize, Tensor)],
            agree: &mut dyn FnMut(Option<&Error>) -> steepest::Result<()>,
        ) -> steepest::Result<()> {
            self.inner.step_subset(g)?;
            match self.violation {
                Violation::NeverAsks => {}
                Violation::AsksTwice => {
                    agree(None)?;
                    agree(None)?;
                }
                Violation::IgnoresRefusal => {
                    // Rank 0 reports a failure; every rank ignores the verdict.
                    let failure = Error::numerical("p0", "a failing first phase");
                    let _ = agree((self.rank == 0).then_some(&failure));
                }
            }
            Ok(())
        }
    }
    for violation in [
        Violation::NeverAsks,
        Violation::AsksTwice,
        Violation::IgnoresRefusal,
    ] {
        let out = LocalGroup::run(2, |comm| {
            let rank = steepest::distributed::Collective::rank(&comm);
            let vars = make_vars(&shapes(), 1);
            let named = vars
                .iter()
                .enumerate()
                .map(|(i, v)| (format!("p{i}"), v.clone()))
                .collect();
            let opt = Broken {
                inner: MomentumSgd::new(vars),
                violation,
                rank,
            };
            let mut dp = DataParallel::new(comm, named, opt, DataParallelConfig::default())?;
            let g: Vec<Option<Tensor>> = (0..6).map(|i| grad(0, rank, i)).collect();
            Ok(dp.step_grads(&g).unwrap_err().to_string())
        })
        .unwrap();
        for (rank, e) in out.into_iter().enumerate() {
            let e = e.unwrap();
            let want = match violation {
                Violation::NeverAsks => "returned without calling `agree`",
                Violation::AsksTwice => "called `agree` twice",
                Violation::IgnoresRefusal => "returned Ok after `agree` refused the step",
            };
            assert!(e.contains(want), "{violation:?}, rank {rank}: {e}");
        }
    }
}

/// A refused step of `Scheduled` puts the inner optimizer's learning rate
/// back as well as its counter: the rate is the schedule's value at the
/// counter of the last successful step. Rule: the rate starts at the
/// configured 0.05; step k that succeeds runs at `schedule.lr(counter)` and
/// advances the counter; a refused step leaves both. With the refusal at
/// step 2 the rates after each step are lr(0), lr(1), lr(1), lr(2), lr(3),
/// on every rank.
#[test]
fn a_refused_scheduled_step_restores_the_learning_rate_on_every_rank() {
    use candle_nn::Optimizer;
    let schedule = Schedule::cosine(0.05, 0.005, STEPS).unwrap();
    let lr = |s: usize| schedule.lr(s);
    let want = [0.05, lr(0), lr(1), lr(1), lr(2), lr(3)];
    // Not vacuous: the refused step's own rate differs from the one kept.
    assert_ne!(lr(BAD_STEP), lr(BAD_STEP - 1));
    let rates = LocalGroup::run(WORLD, |comm| {
        let rank = steepest::distributed::Collective::rank(&comm);
        let vars = named_vars();
        let mut dp = DataParallel::for_optimizer(
            comm,
            optimizer(vars.clone()),
            DataParallelConfig::default(),
        )?;
        let mut rates = vec![dp.optimizer().inner().learning_rate()];
        let mut refused = vec![];
        for step in 0..STEPS {
            let g: Vec<Option<Tensor>> = (0..vars.len()).map(|i| grad(step, rank, i)).collect();
            refused.push(dp.step_grads(&g).is_err());
            rates.push(dp.optimizer().inner().learning_rate());
        }
        Ok((rates, refused, dp.optimizer().current_step()))
    })
    .unwrap();
    for (rank, out) in rates.into_iter().enumerate() {
        let (rates, refused, counter) = out.unwrap();
        let expect_refused: Vec<bool> = (0..STEPS).map(|s| s == BAD_STEP).collect();
        assert_eq!(refused, expect_refused, "rank {rank}");
        assert_eq!(counter, STEPS - 1, "rank {rank}: schedule counter");
        assert_eq!(rates, want, "rank {rank}: learning rate after each step");
    }
}
