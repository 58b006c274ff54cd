//! `ParamGather::Bf16Updates`: the all-gather after the owners' step carries
//! each owner's update rounded to bf16, which every rank (the owner
//! included) adds to its parameters.
//!
//! Reference: a single process fed the rank-order average of the gradients
//! (as in `distributed_data_parallel.rs`), whose every step is followed, on
//! the host, by `W ← W_old + bf16(W_new − W_old)` in f32 (the `half` crate's
//! round-to-nearest-even) for each parameter some rank had a gradient for.
//! The stand-in optimizer's momentum is computed from the exact averaged
//! gradients, so it too is compared bit for bit.

mod distributed_support;

use std::collections::BTreeMap;
use std::sync::Mutex;

use candle_core::{DType, Device, Result, Tensor, Var};
use distributed_support::{
    averaged_step, bits, bits_of, grad, host, make_vars, named_p, params_host, rank_order_avg,
    MomentumSgd,
};
use half::bf16;
use steepest::distributed::{
    Collective, DataParallel, DataParallelConfig, LocalComm, LocalGroup, ParamGather, ReduceOp,
    ShardedStep,
};
use steepest::{AdamWConfig, MuonConfig, WeightDecay};

type GradFn = dyn Fn(usize, usize, usize) -> Option<Tensor> + Sync;
/// Parameters after each step, and the momentum by parameter index.
type Trajectory = (Vec<Vec<Vec<f32>>>, BTreeMap<usize, Vec<f32>>);

/// Matrices, a vector and a scalar-like parameter, over more elements than
/// one rank's chunk so that owners differ.
fn shapes() -> Vec<Vec<usize>> {
    vec![
        vec![6, 5],
        vec![7],
        vec![4, 9],
        vec![1, 3],
        vec![5, 5],
        vec![2],
    ]
}

/// Seeded gradients, with holes: parameter 1 has none on rank 0, parameter
/// 5 none on any rank at even steps, and step 3 has a NaN on rank 1.
fn gradients(shapes: Vec<Vec<usize>>) -> impl Fn(usize, usize, usize) -> Option<Tensor> + Sync {
    move |step, rank, i| {
        if (i == 1 && rank == 0) || (i == 5 && step % 2 == 0) {
            return None;
        }
        let g = grad(step, rank, i, &shapes[i]);
        if step == 3 && rank == 1 && i == 2 {
            let mut v = host(&g);
            v[4] = f32::NAN;
            return Some(Tensor::from_vec(v, shapes[i].as_slice(), &Device::Cpu).unwrap());
        }
        Some(g)
    }
}

struct RankOut {
    history: Vec<Vec<Vec<f32>>>,
    state: BTreeMap<usize, Vec<f32>>,
    results: Vec<std::result::Result<(), String>>,
}

fn run_distributed(
    world: usize,
    cfg: &DataParallelConfig,
    steps: usize,
    grads: &GradFn,
) -> Vec<RankOut> {
    let shapes = shapes();
    LocalGroup::run(world, |comm| {
        let rank = comm.rank();
        let vars = make_vars(&shapes, 1 + rank as u64);
        let opt = MomentumSgd::new(vars.clone());
        let mut dp = DataParallel::new(comm, named_p(&vars), opt, cfg.clone())?;
        let mut history = vec![params_host(&vars)];
        let mut results = Vec::new();
        for step in 0..steps {
            let g: Vec<Option<Tensor>> = (0..shapes.len()).map(|i| grads(step, rank, i)).collect();
            results.push(dp.step_grads(&g).map_err(|e| e.to_string()));
            history.push(params_host(&vars));
        }
        let (_, opt) = dp.into_parts();
        Ok(RankOut {
            history,
            state: opt.state_host(),
            results,
        })
    })
    .unwrap()
    .into_iter()
    .map(|r| r.expect("rank failed"))
    .collect()
}

/// The single-process reference of the module docs.
fn run_reference(world: usize, bf16_comm: bool, steps: usize, grads: &GradFn) -> Trajectory {
    let shapes = shapes();
    let vars = make_vars(&shapes, 1);
    let mut opt = MomentumSgd::new(vars.clone());
    let mut history = vec![params_host(&vars)];
    for step in 0..steps {
        if let Some(list) = averaged_step(world, &shapes, step, grads, bf16_comm) {
            let old = params_host(&vars);
            opt.step_subset(&list).unwrap();
            for (i, _) in &list {
                let new = host(vars[*i].as_tensor());
                let applied: Vec<f32> = old[*i]
                    .iter()
                    .zip(&new)
                    .map(|(&w0, &w1)| w0 + bf16::from_f32(w1 - w0).to_f32())
                    .collect();
                vars[*i]
                    .set(&Tensor::from_vec(applied, shapes[*i].as_slice(), &Device::Cpu).unwrap())
                    .unwrap();
            }
        }
        history.push(params_host(&vars));
    }
    (history, opt.state_host())
}

/// Over 8 steps on 2 and 3 ranks, with f32 and bf16 gradients, every rank's
/// parameters equal the reference's bit for bit after every step (the
/// rounded update applied, parameters without a gradient untouched, the
/// NaN step refused with nothing changed), and the owners' momentum equals
/// the reference's exact momentum.
#[test]
fn bf16_updates_follow_the_rounded_reference_bit_for_bit() {
    let g = gradients(shapes());
    for world in [2, 3] {
        for grad_dtype in [DType::F32, DType::BF16] {
            let cfg = DataParallelConfig {
                grad_dtype,
                param_gather: ParamGather::Bf16Updates,
                ..Default::default()
            };
            let outs = run_distributed(world, &cfg, 8, &g);
            let (ref_hist, ref_state) = run_reference(world, grad_dtype == DType::BF16, 8, &g);
            for (r, out) in outs.iter().enumerate() {
                for (step, res) in out.results.iter().enumerate() {
                    assert_eq!(
                        res.is_err(),
                        step == 3,
                        "world {world} rank {r} step {step}: {res:?}"
                    );
                }
                for (step, (got, want)) in out.history.iter().zip(&ref_hist).enumerate() {
                    assert_eq!(
                        bits_of(got),
                        bits_of(want),
                        "world {world}, {grad_dtype:?} grads, rank {r}, after step {step}"
                    );
                }
                for (i, m) in &out.state {
                    assert_eq!(
                        bits(m),
                        bits(&ref_state[i]),
                        "world {world} rank {r} momentum {i}"
                    );
                }
            }
            let owners: usize = outs.iter().map(|o| o.state.len()).sum();
            assert_eq!(
                owners,
                ref_state.len(),
                "each momentum at exactly one owner"
            );
        }
    }
}

/// The rounding is visible: the same run gathering parameters differs from
/// the bf16-update run (after the first step already), and by no more than
/// half a bf16 unit of each element's update.
#[test]
fn bf16_updates_differ_from_the_exact_step_by_at_most_half_a_bf16_unit() {
    let g = gradients(shapes());
    let exact = run_distributed(2, &DataParallelConfig::default(), 1, &g);
    let rounded = run_distributed(
        2,
        &DataParallelConfig {
            param_gather: ParamGather::Bf16Updates,
            ..Default::default()
        },
        1,
        &g,
    );
    let (w0, w_exact, w_rounded) = (
        &exact[0].history[0],
        &exact[0].history[1],
        &rounded[0].history[1],
    );
    let mut differing = 0;
    for i in 0..w0.len() {
        for k in 0..w0[i].len() {
            let delta = (w_exact[i][k] - w0[i][k]) as f64;
            let off = (w_rounded[i][k] as f64 - w_exact[i][k] as f64).abs();
            // half a bf16 ulp of the update (bf16 rounds to 2⁻⁸ relative), plus the f32 roundings of the
            // subtraction and the addition (relative to W)
            let bound =
                delta.abs() * 2f64.powi(-8) + 2.0 * w_exact[i][k].abs() as f64 * 2f64.powi(-24);
            assert!(
                off <= bound,
                "param {i} element {k}: off {off:e} > {bound:e} (Δ {delta:e})"
            );
            differing += (off > 0.0) as usize;
        }
    }
    assert!(
        differing > 10,
        "only {differing} elements differ: is the update rounded at all?"
    );
}

/// (rank, dtype, element count) of each all-gather.
type GatherLog = Mutex<Vec<(usize, DType, usize)>>;

/// A collective that records the dtype and element count of every
/// all-gather (to see what the step sends), and whose reduce-scatter fails
/// on rank `fail_scatter_on` (after taking part).
struct Probe<'a> {
    comm: LocalComm,
    gathers: Option<&'a GatherLog>,
    fail_scatter_on: Option<usize>,
}

impl Collective for Probe<'_> {
    fn rank(&self) -> usize {
        self.comm.rank()
    }
    fn world_size(&self) -> usize {
        self.comm.world_size()
    }
    fn all_reduce(&self, x: &Tensor, op: ReduceOp) -> Result<Tensor> {
        self.comm.all_reduce(x, op)
    }
    fn reduce_scatter(&self, x: &Tensor, op: ReduceOp) -> Result<Tensor> {
        let out = self.comm.reduce_scatter(x, op)?;
        if self.fail_scatter_on == Some(self.comm.rank()) {
            return Err(candle_core::Error::Msg(
                "injected reduce-scatter fault".into(),
            ));
        }
        Ok(out)
    }
    fn all_gather(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(g) = self.gathers {
            g.lock()
                .unwrap()
                .push((self.comm.rank(), x.dtype(), x.elem_count()));
        }
        self.comm.all_gather(x)
    }
    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor> {
        self.comm.broadcast(x, root)
    }
    fn barrier(&self) -> Result<()> {
        self.comm.barrier()
    }
}

/// The step's all-gather sends one bf16 per element of the chunk (plus the
/// status element) instead of one f32: half the bytes.
#[test]
fn the_step_gathers_bf16_instead_of_f32() {
    let shapes = shapes();
    for (gather, want) in [
        (ParamGather::Parameters, DType::F32),
        (ParamGather::Bf16Updates, DType::BF16),
    ] {
        let log = Mutex::new(Vec::new());
        let chunk = LocalGroup::run(2, |comm| {
            let rank = comm.rank();
            let vars = make_vars(&shapes, 1 + rank as u64);
            let opt = MomentumSgd::new(vars.clone());
            let comm = Probe {
                comm,
                gathers: Some(&log),
                fail_scatter_on: None,
            };
            let cfg = DataParallelConfig {
                param_gather: gather,
                ..Default::default()
            };
            let mut dp = DataParallel::new(comm, named_p(&vars), opt, cfg)?;
            log.lock().unwrap().clear();
            dp.comm().barrier()?;
            let g: Vec<Option<Tensor>> = (0..shapes.len())
                .map(|i| Some(grad(0, rank, i, &shapes[i])))
                .collect();
            dp.step_grads(&g)?;
            Ok(dp.plan().chunk_len())
        })
        .unwrap()
        .into_iter()
        .map(|r| r.unwrap())
        .next()
        .unwrap();
        let log = log.into_inner().unwrap();
        assert_eq!(
            log.len(),
            2,
            "{gather:?}: one all-gather per rank per step: {log:?}"
        );
        for (rank, dtype, n) in log {
            assert_eq!((dtype, n), (want, chunk + 1), "{gather:?}, rank {rank}");
        }
    }
}

/// All-bf16 parameters: refused at construction, naming the option.
#[test]
fn bf16_updates_are_refused_when_every_parameter_is_bf16() {
    let out = LocalGroup::run(2, |comm| {
        let vars: Vec<Var> = make_vars(&shapes(), 1)
            .iter()
            .map(|v| Var::from_tensor(&v.as_tensor().to_dtype(DType::BF16).unwrap()).unwrap())
            .collect();
        let opt = MomentumSgd::new(vars.clone());
        let cfg = DataParallelConfig {
            param_gather: ParamGather::Bf16Updates,
            ..Default::default()
        };
        Ok(DataParallel::new(comm, named_p(&vars), opt, cfg).map(|_| ()))
    })
    .unwrap();
    for r in out {
        let e = r
            .unwrap()
            .expect_err("all-bf16 parameters with Bf16Updates");
        assert!(matches!(e, steepest::Error::Config { .. }), "{e:?}");
        assert!(e.to_string().contains("param_gather"), "{e}");
    }
}

/// Ranks that disagree on the option are refused at construction on every
/// rank (the step's collectives would not match).
#[test]
fn ranks_that_disagree_on_param_gather_are_refused() {
    let out = LocalGroup::run(2, |comm| {
        let rank = comm.rank();
        let vars = make_vars(&shapes(), 1);
        let opt = MomentumSgd::new(vars.clone());
        let cfg = DataParallelConfig {
            param_gather: if rank == 0 {
                ParamGather::Parameters
            } else {
                ParamGather::Bf16Updates
            },
            ..Default::default()
        };
        Ok(DataParallel::new(comm, named_p(&vars), opt, cfg).map(|_| ()))
    })
    .unwrap();
    for r in out {
        let e = r.unwrap().expect_err("mismatched param_gather");
        assert!(e.to_string().contains("param_gather"), "{e}");
    }
}

/// An owner whose step fails (the stand-in's planned failure, which changes
/// nothing on its rank): every rank reports it, and the parameters still
/// agree bit for bit across ranks (the other owners' rounded updates were
/// applied everywhere, the failed owner's zero update too).
#[test]
fn a_failed_owner_step_leaves_the_ranks_in_agreement() {
    let shapes = shapes();
    let out = LocalGroup::run(3, |comm| {
        let rank = comm.rank();
        let vars = make_vars(&shapes, 1 + rank as u64);
        let mut opt = MomentumSgd::new(vars.clone());
        if rank == 1 {
            opt.fail_on_call = Some(1);
        }
        let cfg = DataParallelConfig {
            param_gather: ParamGather::Bf16Updates,
            ..Default::default()
        };
        let mut dp = DataParallel::new(comm, named_p(&vars), opt, cfg)?;
        let mut results = Vec::new();
        for step in 0..2 {
            let g: Vec<Option<Tensor>> = (0..shapes.len())
                .map(|i| Some(grad(step, rank, i, &shapes[i])))
                .collect();
            results.push(dp.step_grads(&g).map_err(|e| e.to_string()));
        }
        Ok((results, params_host(&vars)))
    })
    .unwrap();
    let out: Vec<_> = out.into_iter().map(|r| r.unwrap()).collect();
    for (r, (results, params)) in out.iter().enumerate() {
        assert!(results[0].is_ok(), "rank {r}: {:?}", results[0]);
        let e = results[1].as_ref().expect_err("rank 1's owner step failed");
        assert!(e.contains("failed on rank(s) [1]"), "rank {r}: {e}");
        assert_eq!(
            bits_of(params),
            bits_of(&out[0].1),
            "rank {r} differs from rank 0"
        );
    }
}

/// With the crate's optimizers (AdamW, Muon, both with spectral decay) on
/// two ranks: the ranks stay bit-identical over 5 steps, and each parameter
/// stays within `2⁻⁸ · Σₜ ‖ΔWₜ‖_F` of the run that gathers the exact
/// parameters (the gradients do not depend on the parameters here, so the
/// runs differ by the roundings of the updates only, plus the decay's tiny
/// dependence on `W`: 1 % slack).
#[test]
fn crate_optimizers_stay_in_agreement_and_within_the_rounding_of_their_path() {
    use steepest::{AdamW, Muon};
    let shapes: Vec<(&str, Vec<usize>)> = vec![
        ("w1", vec![16, 12]),
        ("b1", vec![16]),
        ("w2", vec![12, 16]),
        ("w3", vec![8, 8]),
    ];
    let steps = 5;
    // Each rank's parameters after each step (index 0: the start).
    let run = |muon: bool, gather: ParamGather| -> Vec<Vec<Vec<Vec<f32>>>> {
        LocalGroup::run(2, |comm| {
            let rank = comm.rank();
            let named = distributed_support::make_named(&shapes, 7);
            let vars: Vec<Var> = named.iter().map(|n| n.var.clone()).collect();
            let cfg = DataParallelConfig {
                param_gather: gather,
                ..Default::default()
            };
            let grads = |step: usize| -> Vec<Option<Tensor>> {
                shapes
                    .iter()
                    .enumerate()
                    .map(|(i, (_, d))| Some((grad(step, rank, i, d) * 0.01).unwrap()))
                    .collect()
            };
            let mut history = vec![params_host(&vars)];
            if muon {
                let muon = MuonConfig {
                    lr: 0.02,
                    weight_decay: WeightDecay::spectral(0.1),
                    ..MuonConfig::default()
                };
                let mut dp =
                    DataParallel::for_optimizer(comm, Muon::from_named(named, muon)?, cfg)?;
                for step in 0..steps {
                    dp.step_grads(&grads(step))?;
                    history.push(params_host(&vars));
                }
            } else {
                let adamw = AdamWConfig {
                    lr: 0.01,
                    weight_decay: WeightDecay::spectral(0.1),
                    ..AdamWConfig::default()
                };
                let mut dp =
                    DataParallel::for_optimizer(comm, AdamW::from_named(named, adamw)?, cfg)?;
                for step in 0..steps {
                    dp.step_grads(&grads(step))?;
                    history.push(params_host(&vars));
                }
            }
            Ok(history)
        })
        .unwrap()
        .into_iter()
        .map(|r| r.unwrap())
        .collect()
    };
    let dist = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .map(|(x, y)| ((x - y) as f64).powi(2))
            .sum::<f64>()
            .sqrt()
    };
    for muon in [false, true] {
        let exact = run(muon, ParamGather::Parameters);
        let rounded = run(muon, ParamGather::Bf16Updates);
        for (t, (r0, r1)) in rounded[0].iter().zip(&rounded[1]).enumerate() {
            assert_eq!(
                bits_of(r0),
                bits_of(r1),
                "muon {muon}: ranks differ after step {t}"
            );
        }
        for i in 0..shapes.len() {
            let path: f64 = (0..steps)
                .map(|t| dist(&rounded[0][t + 1][i], &rounded[0][t][i]))
                .sum();
            let off = dist(&rounded[0][steps][i], &exact[0][steps][i]);
            assert!(path > 0.0, "muon {muon} param {i} did not move");
            assert!(
                off > 0.0 && off <= 1.01 * 2f64.powi(-8) * path,
                "muon {muon} param {i}: off {off:e}, path {path:e}"
            );
        }
    }
}

/// SGD `w ← w − η·g`, computed in f32 and stored in each parameter's dtype
/// (the stand-in `MomentumSgd` takes f32 parameters only).
struct CastSgd {
    vars: Vec<Var>,
    lr: f64,
}

impl ShardedStep for CastSgd {
    fn step_subset(&mut self, grads: &[(usize, Tensor)]) -> steepest::Result<()> {
        for (i, g) in grads {
            let v = &self.vars[*i];
            let w = (v.as_tensor().to_dtype(DType::F32)? - (g.to_dtype(DType::F32)? * self.lr)?)?;
            v.set(&w.to_dtype(v.dtype())?)?;
        }
        Ok(())
    }
}

/// Mixed dtypes (an f32 matrix, a bf16 and an f16 one) on 2 ranks, with
/// either gather. `Bf16Updates` is accepted (only all-bf16 parameters are
/// refused), and after every step each rank's parameters equal, bit for
/// bit, a single-process run followed on the host by
/// `W ← dtype(f32(W_old) + bf16(f32(W_new) − f32(W_old)))` — the update
/// rounded to bf16 but added in f32 and rounded once to the parameter's
/// dtype. The f32 matrix is the whole of rank 0's chunk (no padding), so
/// its packed copy may share the var's storage: the `before` snapshot must
/// be a copy, or the owner would see a zero update. Non-owners read `W_old`
/// of the bf16/f16 parameters from their vars (converted to f32). With
/// `Parameters` the gather is f32 (not every parameter is bf16), so every
/// rank equals the single-process run exactly.
#[test]
fn mixed_dtypes_follow_the_reference_bit_for_bit() {
    let shapes = vec![vec![4, 4], vec![2, 4], vec![2, 4]];
    let dtypes = [DType::F32, DType::BF16, DType::F16];
    let lr = 1e-3;
    let steps = 4;
    let make = || -> Vec<Var> {
        make_vars(&shapes, 1)
            .iter()
            .zip(dtypes)
            .map(|(v, dt)| Var::from_tensor(&v.as_tensor().to_dtype(dt).unwrap()).unwrap())
            .collect()
    };
    let world = 2;
    for gather in [ParamGather::Parameters, ParamGather::Bf16Updates] {
        let outs = LocalGroup::run(world, |comm| {
            let rank = comm.rank();
            let vars = make();
            let opt = CastSgd {
                vars: vars.clone(),
                lr,
            };
            let cfg = DataParallelConfig {
                param_gather: gather,
                ..Default::default()
            };
            let mut dp = DataParallel::new(comm, named_p(&vars), opt, cfg)?;
            let layout = (dp.owned().to_vec(), dp.plan().chunk_len());
            let mut history = vec![params_host(&vars)];
            for step in 0..steps {
                let g: Vec<Option<Tensor>> = (0..shapes.len())
                    .map(|i| Some(grad(step, rank, i, &shapes[i])))
                    .collect();
                dp.step_grads(&g)?;
                history.push(params_host(&vars));
            }
            Ok((layout, history))
        })
        .unwrap();
        let outs: Vec<_> = outs.into_iter().map(|r| r.unwrap()).collect();
        // The layout this test relies on: rank 0 owns the f32 matrix alone.
        assert!(
            outs.iter()
                .any(|((owned, chunk), _)| owned == &[0] && *chunk == 16),
            "layouts {:?}",
            outs.iter().map(|o| &o.0).collect::<Vec<_>>()
        );
        // The reference.
        let vars = make();
        let mut opt = CastSgd {
            vars: vars.clone(),
            lr,
        };
        let mut want = vec![params_host(&vars)];
        for step in 0..steps {
            let old = params_host(&vars);
            let list: Vec<(usize, Tensor)> = (0..shapes.len())
                .map(|i| {
                    let per: Vec<Option<Tensor>> = (0..world)
                        .map(|r| Some(grad(step, r, i, &shapes[i])))
                        .collect();
                    let g = rank_order_avg(&per, &shapes[i], false);
                    (i, g.to_dtype(dtypes[i]).unwrap())
                })
                .collect();
            opt.step_subset(&list).unwrap();
            if gather == ParamGather::Bf16Updates {
                for (i, v) in vars.iter().enumerate() {
                    let new = host(v.as_tensor());
                    let applied: Vec<f32> = old[i]
                        .iter()
                        .zip(&new)
                        .map(|(&w0, &w1)| w0 + bf16::from_f32(w1 - w0).to_f32())
                        .collect();
                    let t = Tensor::from_vec(applied, shapes[i].as_slice(), &Device::Cpu).unwrap();
                    v.set(&t.to_dtype(dtypes[i]).unwrap()).unwrap();
                }
            }
            want.push(params_host(&vars));
        }
        for (r, (_, history)) in outs.iter().enumerate() {
            for (step, (got, want)) in history.iter().zip(&want).enumerate() {
                assert_eq!(
                    bits_of(got),
                    bits_of(want),
                    "{gather:?}: rank {r}, after step {step}"
                );
            }
        }
        // Every parameter moved (a zero update would pass the comparison only
        // if the reference did not move either).
        for (i, (w0, w1)) in want[0].iter().zip(&want[steps]).enumerate() {
            assert_ne!(bits(w0), bits(w1), "param {i} moved");
        }
    }
}

/// A parameter without a gradient on any rank is not touched, to the bit:
/// `−0.0` stays `−0.0` (adding its zero update, `−0 + +0 = +0`, would not
/// keep it).
#[test]
fn parameters_without_a_gradient_keep_their_bits() {
    let shapes = vec![vec![3, 4], vec![3, 4]];
    let outs = LocalGroup::run(2, |comm| {
        let rank = comm.rank();
        let vars = make_vars(&shapes, 1);
        let zeros = Tensor::new(&[-0.0f32; 12], &Device::Cpu)?.reshape((3, 4))?;
        vars[1].set(&zeros)?;
        let start = params_host(&vars);
        let opt = MomentumSgd::new(vars.clone());
        let cfg = DataParallelConfig {
            param_gather: ParamGather::Bf16Updates,
            ..Default::default()
        };
        let mut dp = DataParallel::new(comm, named_p(&vars), opt, cfg)?;
        dp.step_grads(&[Some(grad(0, rank, 0, &shapes[0])), None])?;
        Ok((start, params_host(&vars)))
    })
    .unwrap();
    for (r, out) in outs.into_iter().enumerate() {
        let (start, end) = out.unwrap();
        assert_ne!(bits(&start[0]), bits(&end[0]), "rank {r}: param 0 moved");
        assert_eq!(bits(&start[1]), bits(&end[1]), "rank {r}: param 1 touched");
    }
}

/// A rank whose reduce-scatter fails has no gradients and no `before` copy:
/// it sends the "packing failed" status, which every rank (that rank
/// included) reports as the same failure of that rank; nobody writes its
/// parameters (they keep their bits everywhere), the other owner's rounded
/// updates are applied everywhere, and the ranks agree bit for bit.
#[test]
fn a_failed_reduce_scatter_is_reported_alike_and_leaves_the_ranks_in_agreement() {
    let shapes = shapes();
    let out = LocalGroup::run(2, |comm| {
        let rank = comm.rank();
        let vars = make_vars(&shapes, 1);
        let start = params_host(&vars);
        let opt = MomentumSgd::new(vars.clone());
        let cfg = DataParallelConfig {
            param_gather: ParamGather::Bf16Updates,
            ..Default::default()
        };
        let comm = Probe {
            comm,
            gathers: None,
            fail_scatter_on: Some(1),
        };
        let mut dp = DataParallel::new(comm, named_p(&vars), opt, cfg)?;
        let owned = dp.owned().to_vec();
        let g: Vec<Option<Tensor>> = (0..shapes.len())
            .map(|i| Some(grad(0, rank, i, &shapes[i])))
            .collect();
        let e = dp.step_grads(&g).map_err(|e| e.to_string());
        Ok((owned, e, start, params_host(&vars)))
    })
    .unwrap();
    let out: Vec<_> = out.into_iter().map(|r| r.unwrap()).collect();
    for (r, (_, e, start, params)) in out.iter().enumerate() {
        let e = e.as_ref().expect_err("rank 1's reduce-scatter failed");
        assert!(e.contains("failed on rank(s) [1]"), "rank {r}: {e}");
        assert_eq!(bits_of(params), bits_of(&out[0].3), "rank {r} differs");
        for i in 0..shapes.len() {
            let moved = bits(&start[i]) != bits(&params[i]);
            assert_eq!(moved, out[0].0.contains(&i), "rank {r}, param {i}");
        }
    }
}
