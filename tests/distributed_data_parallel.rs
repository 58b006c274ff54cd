//! `DataParallel` over in-process ranks against a single process fed the
//! averaged gradient.
//!
//! Exactness: the in-process ranks average by summing in rank order in f32
//! and dividing by N once; the single-process reference computes the averaged
//! gradient with the same arithmetic (`rank_order_avg`), and the stand-in
//! optimizer then does the same candle ops on the same values. Packing,
//! unpacking and the all-gather only copy. So parameters and momentum are
//! compared **bit for bit**. (Against a reference that averaged in another
//! order, e.g. pairwise, the difference would be rounding only: ≤ (N−1)·2⁻²⁴
//! relative per averaged element.)

mod distributed_support;

use std::collections::BTreeMap;

use candle_core::{DType, Device, Result, Tensor, Var};
use distributed_support::{
    averaged_step, bits, bits_of, grad, host, make_vars, named_p, params_host, rank_order_avg,
    MomentumSgd,
};
use steepest::distributed::{
    Collective, DataParallel, DataParallelConfig, LocalGroup, ShardedStep,
};

type GradFn = dyn Fn(usize, usize, usize) -> Option<Tensor> + Sync;
/// Parameters after each step, and the momentum by parameter index.
type Trajectory = (Vec<Vec<Vec<f32>>>, BTreeMap<usize, Vec<f32>>);

#[derive(Debug)]
struct RankOut {
    /// Parameters after each step (index 0: after construction).
    history: Vec<Vec<Vec<f32>>>,
    state: BTreeMap<usize, Vec<f32>>,
    owned: Vec<usize>,
    calls: Vec<Vec<usize>>,
    results: Vec<std::result::Result<(), String>>,
    never_stepped: Vec<String>,
}

/// Runs `steps` data-parallel steps on `world` in-process ranks; rank r starts
/// from its own random values (seed 1 + r), so the initial broadcast matters.
fn run_distributed(
    world: usize,
    shapes: &[Vec<usize>],
    cfg: &DataParallelConfig,
    steps: usize,
    grads: &GradFn,
    fail_on_call: Option<(usize, usize)>,
) -> Vec<RankOut> {
    LocalGroup::run(world, |comm| {
        let rank = comm.rank();
        let vars = make_vars(shapes, 1 + rank as u64);
        let mut opt = MomentumSgd::new(vars.clone());
        if let Some((r, call)) = fail_on_call {
            if r == rank {
                opt.fail_on_call = Some(call);
            }
        }
        let named = named_p(&vars);
        let mut dp = DataParallel::new(comm, named, opt, cfg.clone())?;
        let mut history = vec![params_host(&vars)];
        let mut results = Vec::new();
        for step in 0..steps {
            let g: Vec<Option<Tensor>> = (0..shapes.len()).map(|i| grads(step, rank, i)).collect();
            results.push(dp.step_grads(&g).map_err(|e| match e {
                steepest::Error::NonFiniteGradient { param } => format!("nonfinite {param}"),
                e @ steepest::Error::Numerical { .. } => format!("numerical: {e}"),
                e => e.to_string(),
            }));
            history.push(params_host(&vars));
            // After a step that failed partway, the next is refused; this
            // optimizer's failure changed nothing on its rank, so go on.
            if results[step]
                .as_ref()
                .is_err_and(|e| e.contains("refused: an earlier step failed"))
            {
                dp.clear_failure();
            }
        }
        let owned = dp.owned().to_vec();
        let never_stepped = dp.never_stepped().into_iter().map(String::from).collect();
        let (_, opt) = dp.into_parts();
        Ok(RankOut {
            history,
            state: opt.state_host(),
            owned,
            calls: opt.calls.clone(),
            results,
            never_stepped,
        })
    })
    .unwrap()
    .into_iter()
    .map(|r| r.expect("rank failed"))
    .collect()
}

/// The single-process reference: rank 0's initial values, each step fed the
/// rank-order average; a step with a non-finite gradient anywhere is skipped.
fn run_reference(
    world: usize,
    shapes: &[Vec<usize>],
    bf16_comm: bool,
    steps: usize,
    grads: &GradFn,
) -> Trajectory {
    let vars = make_vars(shapes, 1);
    let mut opt = MomentumSgd::new(vars.clone());
    let mut history = vec![params_host(&vars)];
    for step in 0..steps {
        if let Some(list) = averaged_step(world, shapes, step, grads, bf16_comm) {
            opt.step_subset(&list).unwrap();
        }
        history.push(params_host(&vars));
    }
    (history, opt.state_host())
}

/// Every rank's parameters after every step, and the union of the ranks'
/// momentum (each kept only by the owner), equal the reference bit for bit.
fn assert_matches_reference(outs: &[RankOut], reference: &Trajectory, what: &str) {
    let (ref_hist, ref_state) = reference;
    let mut union = BTreeMap::new();
    for (r, o) in outs.iter().enumerate() {
        for (s, (got, want)) in o.history.iter().zip(ref_hist).enumerate() {
            for (i, (g, w)) in got.iter().zip(want).enumerate() {
                assert_eq!(
                    bits(g),
                    bits(w),
                    "{what}: rank {r}, after step {s}, param {i}"
                );
            }
        }
        for (i, m) in &o.state {
            assert!(
                o.owned.contains(i),
                "{what}: rank {r} keeps state for param {i} it does not own"
            );
            assert!(
                union.insert(*i, m.clone()).is_none(),
                "{what}: two ranks keep state for param {i}"
            );
        }
        for call in &o.calls {
            assert!(
                call.iter().all(|i| o.owned.contains(i)),
                "{what}: rank {r} stepped a param it does not own"
            );
        }
    }
    assert_eq!(
        union.keys().collect::<Vec<_>>(),
        ref_state.keys().collect::<Vec<_>>(),
        "{what}: state keys"
    );
    for (i, m) in ref_state {
        assert_eq!(bits(&union[i]), bits(m), "{what}: momentum of param {i}");
    }
}

fn mixed_shapes() -> Vec<Vec<usize>> {
    vec![
        vec![6, 4],
        vec![6, 4],
        vec![3, 7],
        vec![4, 2, 3],
        vec![6],
        vec![],
        vec![5, 5],
        vec![6, 4],
    ]
}

fn seeded(shapes: Vec<Vec<usize>>) -> impl Fn(usize, usize, usize) -> Option<Tensor> + Sync {
    move |step, rank, i| Some(grad(step, rank, i, &shapes[i]))
}

#[test]
fn one_to_four_ranks_equal_single_process_sgd_bit_for_bit() {
    let shapes = mixed_shapes();
    let g = seeded(shapes.clone());
    for world in 1..=4 {
        let outs = run_distributed(world, &shapes, &DataParallelConfig::default(), 10, &g, None);
        for o in &outs {
            assert!(o.results.iter().all(|r| r.is_ok()), "{:?}", o.results);
            assert_eq!(o.calls.len(), 10);
        }
        let reference = run_reference(world, &shapes, false, 10, &g);
        assert_matches_reference(&outs, &reference, &format!("{world} ranks"));
        // The parameters moved.
        assert_ne!(reference.0[0], reference.0[10]);
    }
}

#[test]
fn bf16_gradients_match_the_bf16_reference_and_differ_from_f32() {
    let shapes = mixed_shapes();
    let g = seeded(shapes.clone());
    let cfg = DataParallelConfig {
        grad_dtype: DType::BF16,
        ..Default::default()
    };
    let outs = run_distributed(3, &shapes, &cfg, 10, &g, None);
    assert_matches_reference(
        &outs,
        &run_reference(3, &shapes, true, 10, &g),
        "bf16, 3 ranks",
    );
    let f32_ref = run_reference(3, &shapes, false, 10, &g);
    assert_ne!(
        outs[0].history[10], f32_ref.0[10],
        "bf16 communication must round"
    );
    // …by rounding only: each averaged gradient element is off by at most
    // about 2⁻⁸ of the largest |g| over ranks (the input rounding and the
    // output rounding, 2⁻⁹ each), and SGD with momentum is linear in the
    // gradients, so the parameters are off by at most 2⁻⁷ · η Σₜ Σ_{s≤t} μ^{t−s}
    // max_r |g_{r,s}| (2⁻⁷: a factor 2 of slack), element by element.
    let (lr, mu) = (0.05f32, 0.9f32);
    for (i, dims) in shapes.iter().enumerate() {
        let n: usize = dims.iter().product();
        let mut m_abs = vec![0f32; n];
        let mut bound = vec![0f32; n];
        for step in 0..10 {
            let gmax: Vec<f32> = (0..n)
                .map(|j| {
                    (0..3)
                        .map(|r| host(&g(step, r, i).unwrap())[j].abs())
                        .fold(0f32, f32::max)
                })
                .collect();
            for ((m, b), g) in m_abs.iter_mut().zip(bound.iter_mut()).zip(&gmax) {
                *m = mu * *m + g;
                *b += lr * *m;
            }
        }
        let got = &outs[0].history[10][i];
        let f32_run = &f32_ref.0[10][i];
        for (j, ((a, b), bound)) in got.iter().zip(f32_run).zip(&bound).enumerate() {
            let bound = bound / 128.0 + 1e-6;
            assert!(
                (a - b).abs() <= bound,
                "param {i}[{j}]: {a} vs {b}, bound {bound}"
            );
        }
    }
}

#[test]
fn uneven_groups_fewer_matrices_than_ranks_and_one_huge_matrix() {
    let cases: Vec<(Vec<Vec<usize>>, usize)> = vec![
        (vec![vec![8, 8], vec![3]], 4),
        (
            vec![vec![48, 48], vec![4, 4], vec![4, 4], vec![4, 4], vec![5]],
            3,
        ),
        (
            vec![vec![48, 48], vec![4, 4], vec![4, 4], vec![4, 4], vec![5]],
            4,
        ),
    ];
    for (shapes, world) in cases {
        let g = seeded(shapes.clone());
        let outs = run_distributed(world, &shapes, &DataParallelConfig::default(), 10, &g, None);
        let idle = outs.iter().filter(|o| o.owned.is_empty()).count();
        if shapes.len() < world {
            assert_eq!(idle, world - shapes.len());
            // An idle rank is still called every step, with nothing.
            let o = outs.iter().find(|o| o.owned.is_empty()).unwrap();
            assert_eq!(o.calls, vec![Vec::<usize>::new(); 10]);
        } else {
            let huge_owner = outs.iter().find(|o| o.owned.contains(&0)).unwrap();
            assert_eq!(huge_owner.owned, vec![0]);
        }
        let reference = run_reference(world, &shapes, false, 10, &g);
        assert_matches_reference(&outs, &reference, &format!("{shapes:?} on {world} ranks"));
    }
}

#[test]
fn a_nan_on_one_rank_refuses_the_step_everywhere_and_changes_nothing() {
    let shapes = mixed_shapes();
    let base = seeded(shapes.clone());
    let g = move |step: usize, rank: usize, i: usize| {
        let t = base(step, rank, i)?;
        if (step, rank, i) == (4, 1, 2) {
            let mut v = host(&t);
            v[5] = f32::NAN;
            return Some(Tensor::from_vec(v, t.shape(), &Device::Cpu).unwrap());
        }
        if (step, rank, i) == (7, 2, 4) {
            let mut v = host(&t);
            v[0] = f32::INFINITY;
            return Some(Tensor::from_vec(v, t.shape(), &Device::Cpu).unwrap());
        }
        Some(t)
    };
    let outs = run_distributed(3, &shapes, &DataParallelConfig::default(), 10, &g, None);
    for (r, o) in outs.iter().enumerate() {
        for (step, res) in o.results.iter().enumerate() {
            match step {
                4 | 7 => {
                    // The typed error, naming the parameter, on every rank
                    // (not only on the rank whose gradient it was).
                    let e = res.as_ref().unwrap_err();
                    let name = if step == 4 { "p2" } else { "p4" };
                    assert_eq!(e, &format!("nonfinite {name}"), "rank {r}");
                    // Nothing changed on this rank.
                    assert_eq!(o.history[step + 1], o.history[step], "rank {r} step {step}");
                }
                _ => assert!(res.is_ok(), "rank {r} step {step}: {res:?}"),
            }
        }
        // The optimizer was not called for the refused steps.
        assert_eq!(o.calls.len(), 8);
    }
    // And the run equals the reference that skips those two steps.
    assert_matches_reference(&outs, &run_reference(3, &shapes, false, 10, &g), "NaN run");
}

#[test]
fn missing_gradients_average_zeros_and_never_seen_parameters_are_skipped() {
    let shapes = mixed_shapes();
    let base = seeded(shapes.clone());
    let g = move |step: usize, rank: usize, i: usize| match i {
        1 if rank != 0 => None, // only rank 0 has a gradient for p1
        3 => None,              // nobody has one for p3
        _ => base(step, rank, i),
    };
    let outs = run_distributed(3, &shapes, &DataParallelConfig::default(), 10, &g, None);
    let reference = run_reference(3, &shapes, false, 10, &g);
    assert_matches_reference(&outs, &reference, "missing gradients");
    assert_eq!(reference.0[10][3], reference.0[0][3], "p3 never moves");
    assert!(!reference.1.contains_key(&3), "and has no state");
    assert_ne!(reference.0[10][1], reference.0[0][1], "p1 moves");
    // On every rank: p3 (no rank has a gradient) was never stepped, p1
    // (rank 0 has one) was.
    for o in &outs {
        assert_eq!(o.never_stepped, ["p3"]);
    }
}

#[test]
fn a_bad_gradient_shape_on_one_rank_refuses_everywhere() {
    let shapes = mixed_shapes();
    let base = seeded(shapes.clone());
    let g = move |step: usize, rank: usize, i: usize| {
        if (step, rank, i) == (2, 0, 0) {
            return Some(Tensor::zeros((4, 6), DType::F32, &Device::Cpu).unwrap());
        }
        base(step, rank, i)
    };
    let outs = run_distributed(2, &shapes, &DataParallelConfig::default(), 3, &g, None);
    for (r, o) in outs.iter().enumerate() {
        let e = o.results[2].as_ref().unwrap_err();
        assert!(
            e.contains("invalid gradients on rank(s) [0]"),
            "rank {r}: {e}"
        );
        if r == 0 {
            assert!(
                e.contains("parameter 0 (p0): expected shape [6, 4], got [4, 6]"),
                "{e}"
            );
        }
        assert_eq!(o.history[3], o.history[2]);
    }
}

#[test]
fn a_failing_owner_step_is_reported_everywhere_and_parameters_stay_identical() {
    let shapes = mixed_shapes();
    let g = seeded(shapes.clone());
    // Rank 1's optimizer fails on its third call (step 2).
    let outs = run_distributed(
        3,
        &shapes,
        &DataParallelConfig::default(),
        5,
        &g,
        Some((1, 2)),
    );
    for (r, o) in outs.iter().enumerate() {
        let e = o.results[2].as_ref().unwrap_err();
        assert!(
            e.contains("optimizer step failed on rank(s) [1]"),
            "rank {r}: {e}"
        );
        // The failed rank's kind of error, on every rank.
        assert!(e.starts_with("numerical: "), "rank {r}: {e}");
        if r == 1 {
            assert!(e.contains("planned failure"), "{e}");
        }
        assert!(
            e.contains("further steps are refused until load_state"),
            "{e}"
        );
        // The next step is refused on every rank, changing nothing; after
        // clear_failure (the harness), steps go on.
        let e = o.results[3].as_ref().unwrap_err();
        assert!(
            e.contains("refused: an earlier step failed"),
            "rank {r}: {e}"
        );
        assert_eq!(o.history[4], o.history[3], "rank {r}");
        assert!(o.results[4].is_ok(), "rank {r}: {:?}", o.results[4]);
        assert_ne!(o.history[5], o.history[4], "rank {r}");
        for s in 0..=5 {
            assert_eq!(
                o.history[s], outs[0].history[s],
                "rank {r} vs rank 0 after step {s}"
            );
        }
    }
    // Rank 1's parameters did not move at step 2; the others' did.
    let owned1 = &outs[1].owned;
    for i in 0..shapes.len() {
        let moved = outs[0].history[3][i] != outs[0].history[2][i];
        assert_eq!(moved, !owned1.contains(&i), "param {i}");
    }
}

#[test]
fn different_parameter_lists_are_refused_at_construction_on_every_rank() {
    // Each rank builds a DataParallel over parameters `p{i}` of its shapes.
    let construct = |world: usize, shapes_of: &(dyn Fn(usize) -> Vec<Vec<usize>> + Sync)| {
        LocalGroup::run(world, |comm| {
            let vars = make_vars(&shapes_of(comm.rank()), 1);
            let named = named_p(&vars);
            let cfg = DataParallelConfig::default();
            DataParallel::new(comm, named, MomentumSgd::new(vars), cfg).map(|_| ())
        })
        .unwrap()
    };
    let out = construct(3, &|rank| {
        let mut shapes = mixed_shapes();
        if rank == 2 {
            shapes[4] = vec![7];
        }
        shapes
    });
    for (r, res) in out.iter().enumerate() {
        let e = res.as_ref().unwrap_err().to_string();
        assert!(
            e.contains("DataParallel::new") && e.contains("differs from this rank's"),
            "rank {r}: {e}"
        );
        // Which parameter: p4, shape [7] on rank 2, [6] elsewhere.
        let (shape, others) = if r == 2 {
            ("[7]", "[0, 1]")
        } else {
            ("[6]", "[2]")
        };
        assert!(
            e.contains(&format!(
                "the first difference is parameter 4 (`p4` here, shape {shape}, F32) on rank(s) {others}"
            )),
            "rank {r}: {e}"
        );
    }
    // A parameter list longer on one rank: the first extra parameter.
    let out = construct(2, &|rank| {
        let mut shapes = mixed_shapes();
        if rank == 1 {
            shapes.push(vec![2]);
        }
        shapes
    });
    let n = mixed_shapes().len();
    for (r, res) in out.iter().enumerate() {
        let e = res.as_ref().unwrap_err().to_string();
        let here = if r == 1 {
            format!("`p{n}` here, shape [2], F32")
        } else {
            "none here".into()
        };
        assert!(
            e.contains(&format!(
                "parameter {n} ({here}) on rank(s) [{}]; parameter counts per rank: [{n}, {}]",
                1 - r,
                n + 1
            )),
            "rank {r}: {e}"
        );
    }
}

/// A parameter whose dtype differs across ranks (bf16 on rank 1, f32 on
/// rank 0; same names and shapes) is refused at construction on every rank,
/// naming the parameter: its packing, and so the collectives, would differ.
#[test]
fn a_parameter_dtype_that_differs_across_ranks_is_refused_at_construction() {
    let out = LocalGroup::run(2, |comm| {
        let mut vars = make_vars(&mixed_shapes(), 1);
        if comm.rank() == 1 {
            vars[2] = Var::from_tensor(&vars[2].as_tensor().to_dtype(DType::BF16)?)?;
        }
        let named = named_p(&vars);
        DataParallel::new(
            comm,
            named,
            MomentumSgd::new(vars),
            DataParallelConfig::default(),
        )
        .map(|_| ())
    })
    .unwrap();
    for (r, res) in out.iter().enumerate() {
        let e = res.as_ref().unwrap_err().to_string();
        assert!(e.contains("differs from this rank's"), "rank {r}: {e}");
        assert!(
            e.contains("the first difference is parameter 2"),
            "rank {r}: {e}"
        );
    }
}

/// `DataParallel::new` on two in-process ranks over `mixed_shapes()` with
/// [`MomentumSgd`], after `setup(rank, parameters, config)` edits that
/// rank's parameter list and the default config; each rank's result.
fn construct_on_two_ranks(
    setup: impl Fn(usize, &mut Vec<(String, Var)>, &mut DataParallelConfig) + Sync,
) -> Vec<steepest::Result<()>> {
    LocalGroup::run(2, |comm| {
        let vars = make_vars(&mixed_shapes(), 1);
        let mut named = named_p(&vars);
        let mut cfg = DataParallelConfig::default();
        setup(comm.rank(), &mut named, &mut cfg);
        DataParallel::new(comm, named, MomentumSgd::new(vars), cfg).map(|_| ())
    })
    .unwrap()
}

/// Ranks that disagree on `grad_dtype` would reduce-scatter buffers of
/// different dtypes (and sizes in bytes): refused at construction on every
/// rank, naming the option.
#[test]
fn a_grad_dtype_that_differs_across_ranks_is_refused_at_construction() {
    let out = construct_on_two_ranks(|rank, _, cfg| {
        cfg.grad_dtype = if rank == 0 { DType::F32 } else { DType::BF16 };
    });
    for (r, res) in out.iter().enumerate() {
        let e = res.as_ref().unwrap_err().to_string();
        assert!(
            e.contains("grad_dtype") && e.contains("differs from this rank's"),
            "rank {r}: {e}"
        );
    }
}

/// [`MomentumSgd`] that declares a two-phase step (and implements it: the
/// default `step_subset_agreed` is enough for a step that cannot fail).
struct TwoPhase(MomentumSgd);

impl ShardedStep for TwoPhase {
    fn step_subset(&mut self, grads: &[(usize, Tensor)]) -> steepest::Result<()> {
        self.0.step_subset(grads)
    }
    fn agrees_before_commit(&self) -> bool {
        true
    }
}

/// An optimizer with a two-phase step on one rank only (the same settings,
/// here none, on both) would issue the agreement's all-reduce on that rank
/// alone: refused at construction on every rank.
#[test]
fn a_two_phase_step_on_some_ranks_only_is_refused_at_construction() {
    let out = LocalGroup::run(2, |comm| {
        let vars = make_vars(&mixed_shapes(), 1);
        let named = named_p(&vars);
        let cfg = DataParallelConfig::default();
        let opt: Box<dyn ShardedStep + Send> = if comm.rank() == 0 {
            Box::new(TwoPhase(MomentumSgd::new(vars)))
        } else {
            Box::new(MomentumSgd::new(vars))
        };
        DataParallel::new(comm, named, opt, cfg).map(|_| ())
    })
    .unwrap();
    for (r, res) in out.iter().enumerate() {
        let e = res.as_ref().unwrap_err().to_string();
        assert!(e.contains("two-phase step"), "rank {r}: {e}");
    }
}

/// y = W₂ relu(W₁ x + b₁), squared error; each rank's micro-batch from its seed.
fn mlp_loss(vars: &[Var], step: usize, rank: usize) -> Result<Tensor> {
    // Inputs and targets of magnitude ≤ 1, so plain SGD does not diverge.
    let x = (grad(1000 + step, rank, 0, &[5, 4]) * 0.01)?;
    let y = (grad(2000 + step, rank, 0, &[5, 2]) * 0.01)?;
    let h = x
        .matmul(&vars[0].as_tensor().t()?)?
        .broadcast_add(vars[1].as_tensor())?
        .relu()?;
    let out = h.matmul(&vars[2].as_tensor().t()?)?;
    (out - y)?.sqr()?.mean_all()
}

#[test]
fn gradients_from_backward_on_micro_batches_match_the_averaged_single_process_run() {
    let shapes = vec![vec![8, 4], vec![8], vec![2, 8]];
    for world in [2, 3] {
        let outs = LocalGroup::run(world, |comm| {
            let rank = comm.rank();
            let vars = make_vars(&shapes, 1 + rank as u64);
            let named = named_p(&vars);
            let mut dp = DataParallel::new(
                comm,
                named,
                MomentumSgd::new(vars.clone()),
                DataParallelConfig::default(),
            )?;
            for step in 0..10 {
                dp.backward_step(&mlp_loss(&vars, step, rank)?)?;
            }
            Ok(params_host(&vars))
        })
        .unwrap();
        // Reference: one process, the micro-batches' gradients averaged in rank order.
        let vars = make_vars(&shapes, 1);
        let mut opt = MomentumSgd::new(vars.clone());
        for step in 0..10 {
            let per_rank: Vec<Vec<Option<Tensor>>> = (0..world)
                .map(|r| {
                    let gs = mlp_loss(&vars, step, r).unwrap().backward().unwrap();
                    vars.iter()
                        .map(|v| gs.get(v.as_tensor()).cloned())
                        .collect()
                })
                .collect();
            let list: Vec<(usize, Tensor)> = (0..shapes.len())
                .map(|i| {
                    let col: Vec<Option<Tensor>> = per_rank.iter().map(|g| g[i].clone()).collect();
                    (i, rank_order_avg(&col, &shapes[i], false))
                })
                .collect();
            opt.step_subset(&list).unwrap();
        }
        let want = params_host(&vars);
        for (r, got) in outs.into_iter().enumerate() {
            let got = got.expect("rank failed");
            for i in 0..shapes.len() {
                assert_eq!(
                    bits(&got[i]),
                    bits(&want[i]),
                    "{world} ranks, rank {r}, param {i}"
                );
            }
        }
    }
}

#[test]
fn a_box_dyn_collective_drives_data_parallel() {
    let shapes = mixed_shapes();
    let g = seeded(shapes.clone());
    let outs = LocalGroup::run(2, |comm| {
        let rank = comm.rank();
        let comm: Box<dyn Collective> = Box::new(comm);
        let vars = make_vars(&shapes, 1 + rank as u64);
        let named = named_p(&vars);
        let mut dp = DataParallel::new(
            comm,
            named,
            MomentumSgd::new(vars.clone()),
            DataParallelConfig::default(),
        )?;
        for step in 0..3 {
            let gs: Vec<Option<Tensor>> = (0..shapes.len()).map(|i| g(step, rank, i)).collect();
            dp.step_grads(&gs)?;
        }
        assert_eq!(dp.steps(), 3);
        Ok(params_host(&vars))
    })
    .unwrap();
    let want = run_reference(2, &shapes, false, 3, &g).0.pop().unwrap();
    for o in outs {
        assert_eq!(o.unwrap(), want);
    }
}

/// `never_stepped` lists the parameters no rank had a gradient for in *any*
/// successful step: a gradient once is enough, later steps without one do
/// not undo it. p1 has a gradient only at step 0 and only on rank 1; p3
/// never has one; after 3 steps every rank lists p3 and only p3.
#[test]
fn a_parameter_stepped_once_is_never_listed_as_never_stepped() {
    let shapes = mixed_shapes();
    let base = seeded(shapes.clone());
    let g = move |step: usize, rank: usize, i: usize| match i {
        1 if (step, rank) != (0, 1) => None,
        3 => None,
        _ => base(step, rank, i),
    };
    let outs = run_distributed(3, &shapes, &DataParallelConfig::default(), 3, &g, None);
    let reference = run_reference(3, &shapes, false, 3, &g);
    assert_matches_reference(&outs, &reference, "p1 at step 0 only");
    // p1 did take a step (at step 0).
    assert_ne!(reference.0[1][1], reference.0[0][1], "p1 moves at step 0");
    for (r, o) in outs.iter().enumerate() {
        assert!(o.results.iter().all(|r| r.is_ok()), "{:?}", o.results);
        assert_eq!(o.never_stepped, ["p3"], "rank {r}");
    }
}

/// `Accumulate::new` over a `DataParallel` is refused, pointing at
/// `Accumulate::data_parallel`: it compiled and checked each rank's
/// micro-batches for NaN locally, so a NaN on one rank was refused there
/// alone, that rank's count fell behind, and its collective steps paired
/// with the other ranks' calls one out of phase from then on.
#[test]
fn accumulate_new_refuses_a_data_parallel_optimizer() {
    use steepest::accumulate::Accumulate;
    use steepest::optim::HasParams;
    let shapes: Vec<Vec<usize>> = vec![vec![4, 3], vec![5]];
    let outs = LocalGroup::run(2, |comm| {
        let vars = make_vars(&shapes, 1);
        let opt = MomentumSgd::new(vars.clone());
        let dp = DataParallel::new(comm, named_p(&vars), opt, DataParallelConfig::default())?;
        assert!(dp.steps_collectively());
        let Err(e) = Accumulate::new(dp, 2) else {
            panic!("Accumulate::new took a DataParallel");
        };
        Ok::<_, steepest::Error>(e.to_string())
    })
    .unwrap();
    for o in outs {
        let e = o.unwrap();
        assert!(e.contains("Accumulate::data_parallel"), "{e}");
    }
}

/// `Accumulate::data_parallel` on 2 ranks, 2 micro-batches per step: each
/// step is one data-parallel step with each rank's mean `(g₀ + g₁)/2`, bit
/// for bit against a `DataParallel` fed those means (the same f32 sum and
/// halving). With a NaN in one rank's first micro-batch, nothing is refused
/// on that rank alone; the step at the second call is refused on every
/// rank, every rank drops its batch, and the run goes on as one that never
/// saw that batch (bit for bit), the ranks agreeing throughout. Clipping
/// there is `DataParallelConfig`'s: `with_clip_grad_norm` is refused.
#[test]
fn accumulation_under_data_parallel_steps_on_the_ranks_means() {
    use steepest::accumulate::Accumulate;
    let shapes: Vec<Vec<usize>> = vec![vec![4, 3], vec![5], vec![2, 6]];
    let g = |call: usize, rank: usize, i: usize| grad(call, rank, i, &shapes[i]);
    let nan_call = 0;
    let build = |comm| {
        let vars = make_vars(&shapes, 1);
        let named = named_p(&vars);
        let opt = MomentumSgd::new(vars.clone());
        let dp = DataParallel::new(comm, named, opt, DataParallelConfig::default())?;
        Ok::<_, steepest::Error>((vars, dp))
    };
    // Accumulated: `calls` micro-batches; with `nan`, rank 1's first one
    // holds a NaN. Returns the parameters and each call's outcome.
    let accumulated = |calls: usize, nan: bool| {
        LocalGroup::run(2, |comm| {
            let rank = comm.rank();
            let (vars, dp) = build(comm)?;
            let mut acc = Accumulate::data_parallel(dp, 2)?;
            let mut outcomes = Vec::new();
            for call in 0..calls {
                let mut loss = Tensor::new(0f32, &Device::Cpu)?;
                for (i, v) in vars.iter().enumerate() {
                    let mut gi = g(call, rank, i);
                    if nan && rank == 1 && call == nan_call && i == 1 {
                        gi = (gi * f64::NAN)?;
                    }
                    loss = (loss + (v.as_tensor() * gi)?.sum_all()?)?;
                }
                let out = acc.backward_step(&loss);
                outcomes.push(match out {
                    Ok(stepped) => format!("ok {stepped}"),
                    Err(e) => format!("{e}"),
                });
                assert_eq!(acc.pending(), if out_is_step(&outcomes) { 0 } else { 1 });
            }
            // Clipping this rank's mean would not clip the gradient: refused.
            let e = acc.with_clip_grad_norm(1.0).unwrap_err();
            assert!(
                e.to_string().contains("DataParallelConfig::clip_grad_norm"),
                "{e}"
            );
            Ok((params_host(&vars), outcomes))
        })
        .unwrap()
        .into_iter()
        .map(|r| r.unwrap())
        .collect::<Vec<_>>()
    };
    // The reference: plain data-parallel steps on the means of the pairs
    // of calls listed.
    let reference = |pairs: &[usize]| {
        LocalGroup::run(2, |comm| {
            let rank = comm.rank();
            let (vars, mut dp) = build(comm)?;
            for &p in pairs {
                let means: Vec<Option<Tensor>> = (0..shapes.len())
                    .map(|i| {
                        Some(((g(2 * p, rank, i) + g(2 * p + 1, rank, i)).unwrap() / 2.0).unwrap())
                    })
                    .collect();
                dp.step_grads(&means)?;
            }
            Ok(params_host(&vars))
        })
        .unwrap()
        .into_iter()
        .map(|r| r.unwrap())
        .collect::<Vec<_>>()
    };
    let clean = accumulated(6, false);
    let want = reference(&[0, 1, 2]);
    for (rank, ((got, outcomes), want)) in clean.iter().zip(&want).enumerate() {
        assert_eq!(bits_of(got), bits_of(want), "rank {rank}");
        assert_eq!(outcomes, &["ok false", "ok true"].repeat(3), "rank {rank}");
    }
    let dirty = accumulated(6, true);
    let want = reference(&[1, 2]);
    for (rank, ((got, outcomes), want)) in dirty.iter().zip(&want).enumerate() {
        assert_eq!(bits_of(got), bits_of(want), "rank {rank}");
        assert_eq!(outcomes[0], "ok false", "rank {rank}: refused alone");
        assert!(
            outcomes[1].contains("non-finite") || outcomes[1].contains("NaN"),
            "rank {rank}: {}",
            outcomes[1]
        );
        assert_eq!(
            &outcomes[2..],
            &["ok false", "ok true"].repeat(2),
            "rank {rank}"
        );
    }
    assert_eq!(
        bits_of(&dirty[0].0),
        bits_of(&dirty[1].0),
        "the ranks disagree"
    );
}

/// Whether the last outcome recorded was a step or a refused step (either
/// leaves nothing pending).
fn out_is_step(outcomes: &[String]) -> bool {
    outcomes.last().is_some_and(|o| o != "ok false")
}

/// A collective whose reduce-scatter hands rank 1 one element too few (a
/// stand-in for a device fault between the collective and the unpacking).
struct ShortScatterOnRank1(steepest::distributed::LocalComm);

impl Collective for ShortScatterOnRank1 {
    fn rank(&self) -> usize {
        self.0.rank()
    }
    fn world_size(&self) -> usize {
        self.0.world_size()
    }
    fn all_reduce(&self, x: &Tensor, op: steepest::distributed::ReduceOp) -> Result<Tensor> {
        self.0.all_reduce(x, op)
    }
    fn reduce_scatter(&self, x: &Tensor, op: steepest::distributed::ReduceOp) -> Result<Tensor> {
        let chunk = self.0.reduce_scatter(x, op)?;
        Ok(if self.rank() == 1 {
            chunk.narrow(0, 0, chunk.elem_count() - 1)?
        } else {
            chunk
        })
    }
    fn all_gather(&self, x: &Tensor) -> Result<Tensor> {
        self.0.all_gather(x)
    }
    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor> {
        self.0.broadcast(x, root)
    }
    fn barrier(&self) -> Result<()> {
        self.0.barrier()
    }
}

/// With clipping configured, gradients that cannot be prepared on one rank
/// (its share of the reduce-scatter unusable) refuse the step on every rank
/// before anything changed, as a typed `Error::Device` naming the step and
/// the failing rank count; no optimizer ran and the ranks agree.
#[test]
fn a_gradient_preparation_failure_under_clipping_is_a_device_error_on_every_rank() {
    let shapes = mixed_shapes();
    let g = seeded(shapes.clone());
    let cfg = DataParallelConfig {
        clip_grad_norm: Some(1.0),
        ..DataParallelConfig::default()
    };
    let outs = LocalGroup::run(2, |comm| {
        let rank = comm.rank();
        let vars = make_vars(&shapes, 1 + rank as u64);
        let named = named_p(&vars);
        let opt = MomentumSgd::new(vars.clone());
        let mut dp = DataParallel::new(ShortScatterOnRank1(comm), named, opt, cfg.clone())?;
        let before = params_host(&vars);
        let gs: Vec<Option<Tensor>> = (0..shapes.len()).map(|i| g(0, rank, i)).collect();
        let err = dp.step_grads(&gs).unwrap_err();
        let unchanged = params_host(&vars) == before && dp.steps() == 0;
        let (_, opt) = dp.into_parts();
        Ok((err, unchanged, opt.calls.len(), params_host(&vars)))
    })
    .unwrap();
    let outs: Vec<_> = outs.into_iter().map(|o| o.unwrap()).collect();
    for (rank, (err, unchanged, calls, _)) in outs.iter().enumerate() {
        match err {
            steepest::Error::Device { who, what } => {
                assert!(who.contains(&format!("step (rank {rank})")), "{who}");
                assert!(
                    what.contains("refused on every rank, nothing changed")
                        && what.contains("failed on 1 rank(s)"),
                    "rank {rank}: {what}"
                );
            }
            e => panic!("rank {rank}: expected Error::Device, got {e:?}"),
        }
        assert!(unchanged, "rank {rank}: changed by a refused step");
        assert_eq!(*calls, 0, "rank {rank}: the optimizer ran");
    }
    assert_eq!(outs[0].3, outs[1].3, "the ranks disagree");
}

/// Gradients that are exactly zero on every rank under clipping: the
/// global norm is 0 — there is no largest entry to measure again by, as
/// `clip::grad_norm` finds for a zero gradient — so the step runs on every
/// rank, unscaled, and `last_grad_norm` reports 0 (not a refused step with
/// a NaN norm).
#[test]
fn zero_gradients_under_clipping_step_with_norm_zero() {
    let shapes = mixed_shapes();
    let cfg = DataParallelConfig {
        clip_grad_norm: Some(1.0),
        ..DataParallelConfig::default()
    };
    let outs = LocalGroup::run(2, |comm| {
        let rank = comm.rank();
        let vars = make_vars(&shapes, 1 + rank as u64);
        let named = named_p(&vars);
        let opt = MomentumSgd::new(vars.clone());
        let mut dp = DataParallel::new(comm, named, opt, cfg.clone())?;
        let gs: Vec<Option<Tensor>> = shapes
            .iter()
            .map(|s| Some(Tensor::zeros(s.as_slice(), DType::F32, &Device::Cpu).unwrap()))
            .collect();
        let stepped = dp.step_grads(&gs).map_err(|e| e.to_string());
        Ok((stepped, dp.last_grad_norm(), dp.steps()))
    })
    .unwrap();
    for (rank, out) in outs.into_iter().enumerate() {
        let (stepped, norm, steps) = out.unwrap();
        assert_eq!(stepped, Ok(()), "rank {rank}");
        assert_eq!(norm, Some(0.0), "rank {rank}");
        assert_eq!(steps, 1, "rank {rank}");
    }
}

/// A check that fails on one rank only (here a NaN `clip_grad_norm` on
/// rank 1) refuses construction on every rank: the failing rank with its
/// own error, the others naming it. That rank used to return before the
/// agreement check, and the others waited in its all-gather (over NCCL,
/// forever).
#[test]
fn a_local_check_failing_on_one_rank_is_refused_on_every_rank() {
    let out = construct_on_two_ranks(|rank, _, cfg| {
        cfg.clip_grad_norm = Some(if rank == 1 { f64::NAN } else { 1.0 });
    });
    let e1 = out[1].as_ref().unwrap_err().to_string();
    assert!(e1.contains("clip_grad_norm must be finite"), "rank 1: {e1}");
    let e0 = out[0].as_ref().unwrap_err().to_string();
    assert!(
        e0.contains("differs from this rank's on rank(s) [1]"),
        "rank 0: {e0}"
    );
}

/// Ranks that disagree on broadcast_initial would pair one rank's broadcast
/// with another's first all-reduce: refused at construction on every rank,
/// naming the option.
#[test]
fn broadcast_initial_that_differs_across_ranks_is_refused_at_construction() {
    let out = construct_on_two_ranks(|rank, _, cfg| cfg.broadcast_initial = rank == 0);
    for (r, res) in out.iter().enumerate() {
        let e = res.as_ref().unwrap_err().to_string();
        assert!(e.contains("broadcast_initial"), "rank {r}: {e}");
    }
}

/// A variable listed twice (tied weights) or two parameters of one name
/// would be owned and gathered twice and drift apart across ranks: refused
/// at construction on every rank.
#[test]
fn a_parameter_listed_twice_is_refused_at_construction() {
    for by_name in [false, true] {
        let out = construct_on_two_ranks(|_, named, _| {
            if by_name {
                named[1].0 = named[0].0.clone();
            } else {
                named[1].1 = named[0].1.clone();
            }
        });
        for (r, res) in out.iter().enumerate() {
            let e = res.as_ref().unwrap_err().to_string();
            let want = if by_name {
                "both named"
            } else {
                "same variable"
            };
            assert!(e.contains(want), "by name {by_name}, rank {r}: {e}");
        }
    }
}

/// Clipping across ranks with an empty parameter and an all-zero gradient
/// (the path that measures again scaled by the largest entries) does not
/// panic on the empty one's owner, and agrees with single-process clipping:
/// norm 0, nothing scaled.
#[test]
fn clipping_with_an_empty_parameter_and_zero_gradients_steps() {
    let shapes = vec![vec![0, 4], vec![3, 2], vec![0]];
    let cfg = DataParallelConfig {
        clip_grad_norm: Some(1.0),
        ..Default::default()
    };
    let zero = |_: usize, _: usize, i: usize| -> Option<Tensor> {
        let dims = [vec![0, 4], vec![3, 2], vec![0]][i].clone();
        Some(Tensor::zeros(dims, DType::F32, &Device::Cpu).unwrap())
    };
    for world in [1, 2, 3] {
        let outs = run_distributed(world, &shapes, &cfg, 2, &zero, None);
        for o in &outs {
            assert!(
                o.results.iter().all(|r| r.is_ok()),
                "{world}: {:?}",
                o.results
            );
        }
    }
}
