//! Distributed Muon (and AdamW) over in-process ranks against the
//! single-process optimizer fed the averaged gradient.
//!
//! Exactness. The in-process ranks average by summing in rank order in f32
//! and dividing by N once; the reference computes the averaged gradient with
//! the same arithmetic (`rank_order_avg`). From there both run the same
//! optimizer code: the owner's `Driver::step_subset` on its share is the
//! single-process step restricted to those parameters, and every kernel on
//! the way works per parameter (momentum, Adam and the update are element-wise;
//! Newton–Schulz, the Frobenius normalisation and spectral decay's power
//! iteration are per matrix, also inside a batch of same-shape matrices, so a
//! smaller batch at the owner gives the same bits). Clipping sums each
//! parameter's `Σ g²` in f32 exactly as `clip::grad_norm` does, moves those
//! values through an all-reduce where every slot has one non-zero
//! contribution (exact), and adds them in parameter order in f64 as the
//! reference does with the same variable order. Packing, unpacking and the
//! all-gather only copy. So parameters and state are compared **bit for
//! bit**, and they match (f32 and bf16 communication alike).

mod distributed_support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use distributed_support::{averaged_step, bits, gvalues, host};
use steepest::clip::clip_grad_norm;
use steepest::distributed::{
    load_union, param_specs, Collective, DataParallel, DataParallelConfig, LocalGroup, ParamKind,
    ShardedOptimizer,
};
use steepest::optim::NamedVar;
use steepest::schedule::{Schedule, Scheduled};
use steepest::{AdamW, AdamWConfig, Muon, MuonConfig, OptimizerState, TryStep, WeightDecay};

/// A model's parameters: names and shapes. Muon-routed matrices of four
/// shapes (two of them shared, so same-shape stacks form), a rank-3 kernel
/// (matrix view 4 × 6), AdamW-routed matrices (by name), vectors, a scalar.
fn model() -> Vec<(&'static str, Vec<usize>)> {
    vec![
        ("embed.weight", vec![10, 6]),
        ("h.0.qkv.weight", vec![12, 6]),
        ("h.0.fc.weight", vec![16, 6]),
        ("h.0.proj.weight", vec![6, 16]),
        ("h.0.ln.weight", vec![6]),
        ("h.1.qkv.weight", vec![12, 6]),
        ("h.1.fc.weight", vec![16, 6]),
        ("h.1.proj.weight", vec![6, 16]),
        ("h.1.ln.weight", vec![6]),
        ("conv.weight", vec![4, 2, 3]),
        ("lm_head.weight", vec![10, 6]),
        ("gain", vec![]),
    ]
}

type Shapes = Vec<(&'static str, Vec<usize>)>;

/// Named variables of these shapes, values from `seed`.
fn make_named(shapes: &Shapes, seed: u64) -> Vec<NamedVar> {
    distributed_support::make_named(shapes, seed)
}

/// Muon with spectral decay on its matrices and on the AdamW part's
/// matrices, embeddings and head routed to AdamW.
fn muon_config() -> MuonConfig {
    MuonConfig {
        lr: 0.02,
        weight_decay: WeightDecay::spectral(0.1),
        adamw: AdamWConfig {
            lr: 3e-3,
            beta2: 0.95,
            weight_decay: WeightDecay::spectral(0.1),
            ..AdamWConfig::default()
        },
        adamw_names: vec!["embed".into(), "lm_head".into()],
        ..MuonConfig::default()
    }
}

fn muon(vars: Vec<NamedVar>) -> Muon {
    Muon::from_named(vars, muon_config()).unwrap()
}

fn adamw(vars: Vec<NamedVar>) -> AdamW {
    AdamW::from_named(
        vars,
        AdamWConfig {
            weight_decay: WeightDecay::Decoupled(0.1),
            ..AdamWConfig::default()
        },
    )
    .unwrap()
}

/// Gradients: `(step, rank, param) → gradient` (None: no gradient).
type GradFn = dyn Fn(usize, usize, usize) -> Option<Tensor> + Sync;

/// Seeded gradients of magnitudes 1e-3 … 1e2, both signs, per (step, rank, param).
fn seeded(shapes: Shapes) -> impl Fn(usize, usize, usize) -> Option<Tensor> + Sync {
    move |step, rank, i| {
        let d = &shapes[i].1;
        let seed = (step as u64) << 32 | (rank as u64) << 16 | i as u64;
        let n = d.iter().product();
        Some(Tensor::from_vec(gvalues(seed, n), d.as_slice(), &Device::Cpu).unwrap())
    }
}

/// A state dict as comparable host values: key → (dtype, dims, bytes).
type HostState = BTreeMap<String, (DType, Vec<usize>, Vec<u8>)>;

fn host_state(state: &std::collections::HashMap<String, Tensor>) -> HostState {
    state
        .iter()
        .filter(|(k, _)| k.as_str() != "__steepest__")
        .map(|(k, t)| {
            let flat = t.flatten_all().unwrap();
            let bytes: Vec<u8> = match t.dtype() {
                DType::F32 => flat
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
                DType::I64 => flat
                    .to_vec1::<i64>()
                    .unwrap()
                    .iter()
                    .flat_map(|x| x.to_le_bytes())
                    .collect(),
                DType::U8 => flat.to_vec1::<u8>().unwrap(),
                d => panic!("{k}: unexpected dtype {d:?}"),
            };
            (k.clone(), (t.dtype(), t.dims().to_vec(), bytes))
        })
        .collect()
}

fn params_host(vars: &[NamedVar]) -> Vec<Vec<f32>> {
    vars.iter().map(|v| host(v.var.as_tensor())).collect()
}

/// The parameter a state key belongs to (the longest name that prefixes it).
fn owner_param<'a>(key: &str, names: &[&'a str]) -> Option<&'a str> {
    names
        .iter()
        .filter(|n| key.starts_with(&format!("{n}.")))
        .max_by_key(|n| n.len())
        .copied()
}

/// One rank's run.
#[derive(Debug)]
struct RankOut {
    /// Parameters after each step (index 0: after construction).
    history: Vec<Vec<Vec<f32>>>,
    /// State dict after each step (index 0: after construction).
    states: Vec<HostState>,
    owned: Vec<String>,
    results: Vec<Result<(), String>>,
    norms: Vec<Option<f64>>,
}

/// How a run starts: fresh (rank r's values from seed 1 + r: the initial
/// broadcast makes them rank 0's), or from given parameter values and a
/// checkpoint.
#[derive(Clone)]
enum Start<'a> {
    Fresh,
    Resume {
        params: &'a [Vec<f32>],
        checkpoint: &'a Path,
        first_step: usize,
    },
}

fn error_string(e: steepest::Error) -> String {
    match e {
        steepest::Error::NonFiniteGradient { param } => format!("nonfinite {param}"),
        e => e.to_string(),
    }
}

fn set_params(vars: &[NamedVar], values: &[Vec<f32>]) {
    for (v, x) in vars.iter().zip(values) {
        let t = Tensor::from_vec(x.clone(), v.var.dims(), &Device::Cpu).unwrap();
        v.var.set(&t).unwrap();
    }
}

/// `steps` data-parallel steps on `world` in-process ranks; optionally saves
/// the optimizer state to `save` at the end.
#[allow(clippy::too_many_arguments)]
fn run_distributed<O, B>(
    world: usize,
    shapes: &Shapes,
    build: B,
    cfg: &DataParallelConfig,
    steps: usize,
    grads: &GradFn,
    start: Start<'_>,
    save: Option<&Path>,
) -> Vec<RankOut>
where
    O: ShardedOptimizer + OptimizerState,
    B: Fn(Vec<NamedVar>) -> O + Sync,
{
    LocalGroup::run(world, |comm| {
        let rank = comm.rank();
        let vars = make_named(shapes, 1 + rank as u64);
        let first_step = match &start {
            Start::Fresh => 0,
            Start::Resume {
                params, first_step, ..
            } => {
                set_params(&vars, params);
                *first_step
            }
        };
        let mut dp = DataParallel::for_optimizer(comm, build(vars.clone()), cfg.clone())?;
        if let Start::Resume { checkpoint, .. } = &start {
            dp.load_state(checkpoint)?;
        }
        let owned: Vec<String> = dp
            .owned()
            .iter()
            .map(|&i| dp.plan().specs()[i].name.clone())
            .collect();
        let mut history = vec![params_host(&vars)];
        let mut states = vec![host_state(&dp.optimizer().state_dict()?)];
        let mut results = Vec::new();
        let mut norms = Vec::new();
        for step in first_step..first_step + steps {
            let g: Vec<Option<Tensor>> = (0..shapes.len()).map(|i| grads(step, rank, i)).collect();
            results.push(dp.step_grads(&g).map_err(error_string));
            norms.push(dp.last_grad_norm());
            history.push(params_host(&vars));
            states.push(host_state(&dp.optimizer().state_dict()?));
        }
        if let Some(dir) = save {
            dp.save_state(dir)?;
        }
        Ok(RankOut {
            history,
            states,
            owned,
            results,
            norms,
        })
    })
    .unwrap()
    .into_iter()
    .map(|r| r.expect("rank failed"))
    .collect()
}

/// The single-process reference: rank 0's initial values; each step is the
/// optimizer's own `try_step` with a `GradStore` holding the rank-order
/// average, clipped by `clip::clip_grad_norm` (variables in parameter
/// order) when `clip` is set; a step with a non-finite gradient on any rank
/// is skipped.
struct Reference<O> {
    vars: Vec<NamedVar>,
    opt: O,
    history: Vec<Vec<Vec<f32>>>,
    states: Vec<HostState>,
    norms: Vec<Option<f64>>,
}

impl<O: OptimizerState + TryStep> Reference<O> {
    fn new(shapes: &Shapes, build: impl Fn(Vec<NamedVar>) -> O) -> Self {
        let vars = make_named(shapes, 1);
        let opt = build(vars.clone());
        let mut r = Self {
            history: vec![params_host(&vars)],
            states: Vec::new(),
            norms: Vec::new(),
            vars,
            opt,
        };
        r.states.push(host_state(&r.opt.state_dict().unwrap()));
        r
    }

    fn run(
        &mut self,
        world: usize,
        steps: std::ops::Range<usize>,
        grads: &GradFn,
        bf16: bool,
        clip: Option<f64>,
    ) {
        let shapes: Vec<Vec<usize>> = self.vars.iter().map(|v| v.var.dims().to_vec()).collect();
        for step in steps {
            if let Some(list) = averaged_step(world, &shapes, step, grads, bf16) {
                // A GradStore from any backward pass, its entries replaced.
                let mut store = self.vars[0]
                    .var
                    .as_tensor()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                store.remove(self.vars[0].var.as_tensor());
                for (i, avg) in list {
                    store.insert(self.vars[i].var.as_tensor(), avg);
                }
                let norm = clip.map(|c| {
                    let vars: Vec<Var> = self.vars.iter().map(|v| v.var.clone()).collect();
                    clip_grad_norm(&mut store, &vars, c).unwrap()
                });
                self.norms.push(norm);
                self.opt.try_step(&store).unwrap();
            }
            self.history.push(params_host(&self.vars));
            self.states
                .push(host_state(&self.opt.state_dict().unwrap()));
        }
    }
}

/// Every rank's parameters after every step equal the reference's bit for
/// bit; each rank keeps state only for parameters it owns, no two ranks for
/// the same one, and the union equals the reference's state bit for bit.
fn assert_matches<O>(outs: &[RankOut], reference: &Reference<O>, what: &str) {
    let names: Vec<&str> = reference.vars.iter().map(|v| v.name.as_str()).collect();
    for (r, o) in outs.iter().enumerate() {
        assert_eq!(o.history.len(), reference.history.len(), "{what}");
        for (s, (got, want)) in o.history.iter().zip(&reference.history).enumerate() {
            for (i, (g, w)) in got.iter().zip(want).enumerate() {
                assert_eq!(
                    bits(g),
                    bits(w),
                    "{what}: rank {r}, after step {s}, param {}",
                    names[i]
                );
            }
        }
    }
    for s in 0..reference.states.len() {
        let mut union: HostState = BTreeMap::new();
        for (r, o) in outs.iter().enumerate() {
            for (k, v) in &o.states[s] {
                if k == "__schedule__.step" {
                    union.insert(k.clone(), v.clone());
                    continue;
                }
                let p = owner_param(k, &names).unwrap_or_else(|| panic!("{what}: key {k}"));
                assert!(
                    o.owned.iter().any(|n| n == p),
                    "{what}: rank {r} keeps state {k} of a parameter it does not own"
                );
                assert!(
                    union.insert(k.clone(), v.clone()).is_none(),
                    "{what}: two ranks keep {k}"
                );
            }
        }
        let want = &reference.states[s];
        assert_eq!(
            union.keys().collect::<Vec<_>>(),
            want.keys().collect::<Vec<_>>(),
            "{what}: state keys after step {s}"
        );
        for (k, v) in want {
            assert!(union[k] == *v, "{what}: state {k} after step {s} differs");
        }
    }
}

fn clip_cfg() -> DataParallelConfig {
    DataParallelConfig {
        clip_grad_norm: Some(1.0),
        ..Default::default()
    }
}

#[test]
fn one_to_four_ranks_equal_single_process_muon_bit_for_bit() {
    let shapes = model();
    let g = seeded(shapes.clone());
    for world in 1..=4 {
        let outs = run_distributed(
            world,
            &shapes,
            muon,
            &clip_cfg(),
            10,
            &g,
            Start::Fresh,
            None,
        );
        for o in &outs {
            assert!(o.results.iter().all(|r| r.is_ok()), "{:?}", o.results);
        }
        let mut reference = Reference::new(&shapes, muon);
        reference.run(world, 0..10, &g, false, Some(1.0));
        assert_matches(&outs, &reference, &format!("muon, {world} ranks"));
        // The norm every rank computed is the reference's, and it clipped.
        for o in &outs {
            assert_eq!(o.norms, reference.norms, "{world} ranks: norms");
        }
        assert!(reference.norms.iter().all(|n| n.unwrap() > 1.0));
        // Work was shared: with ≥ 2 ranks every rank owns some Muon matrix.
        if world > 1 {
            let muon_params = reference.opt.muon_params();
            for o in &outs {
                assert!(
                    o.owned.iter().any(|n| muon_params.contains(&n.as_str())),
                    "{world} ranks: a rank without Newton–Schulz work: {:?}",
                    o.owned
                );
            }
        }
        // Parameters moved, and the momentum and spectral-decay vectors exist.
        assert_ne!(reference.history[0], reference.history[10]);
        let keys = &reference.states[10];
        assert!(
            keys.contains_key("h.0.fc.weight.momentum.buf"),
            "{:?}",
            keys.keys()
        );
        assert!(keys.contains_key("h.0.fc.weight.decay.v"));
        assert!(keys.contains_key("embed.weight.adam.exp_avg"));
    }
}

/// Newton–Schulz in the Gram form (the qkv, fc and proj matrices have aspect
/// ratio ≥ 2): split across ranks, still bit-identical to one process.
#[test]
fn gram_form_muon_on_two_and_three_ranks_equals_single_process() {
    fn muon_gram(vars: Vec<NamedVar>) -> Muon {
        let mut cfg = muon_config();
        cfg.newton_schulz = cfg.newton_schulz.gram_form();
        Muon::from_named(vars, cfg).unwrap()
    }
    let shapes = model();
    let g = seeded(shapes.clone());
    for world in [2, 3] {
        let outs = run_distributed(
            world,
            &shapes,
            muon_gram,
            &clip_cfg(),
            6,
            &g,
            Start::Fresh,
            None,
        );
        let mut reference = Reference::new(&shapes, muon_gram);
        reference.run(world, 0..6, &g, false, Some(1.0));
        assert_matches(
            &outs,
            &reference,
            &format!("muon (Gram form), {world} ranks"),
        );
        // and the Gram form moved the parameters differently from the standard
        // form only by rounding
        let mut standard = Reference::new(&shapes, muon);
        standard.run(world, 0..6, &g, false, Some(1.0));
        let (a, b) = (&reference.history[6], &standard.history[6]);
        let diff = a
            .iter()
            .flatten()
            .zip(b.iter().flatten())
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(
            diff > 0.0 && diff < 1e-4,
            "{world} ranks: Gram vs standard {diff}"
        );
    }
}

#[test]
fn adamw_moments_are_sharded_and_equal_single_process_adamw() {
    let shapes = model();
    let g = seeded(shapes.clone());
    let outs = run_distributed(3, &shapes, adamw, &clip_cfg(), 10, &g, Start::Fresh, None);
    let mut reference = Reference::new(&shapes, adamw);
    reference.run(3, 0..10, &g, false, Some(1.0));
    assert_matches(&outs, &reference, "adamw, 3 ranks");
    // ZeRO-1: each rank holds a third or so of the moments, not all of them.
    let total = reference.states[10].len();
    for o in &outs {
        assert!(
            o.states[10].len() < total,
            "{} of {total}",
            o.states[10].len()
        );
    }
}

#[test]
fn bf16_gradient_communication_with_muon_matches_the_bf16_reference() {
    let shapes = model();
    let g = seeded(shapes.clone());
    let cfg = DataParallelConfig {
        grad_dtype: DType::BF16,
        ..clip_cfg()
    };
    let outs = run_distributed(3, &shapes, muon, &cfg, 10, &g, Start::Fresh, None);
    let mut reference = Reference::new(&shapes, muon);
    reference.run(3, 0..10, &g, true, Some(1.0));
    assert_matches(&outs, &reference, "muon, bf16 gradients, 3 ranks");
    // And bf16 communication did round (the f32 run differs).
    let mut f32_run = Reference::new(&shapes, muon);
    f32_run.run(3, 0..10, &g, false, Some(1.0));
    assert_ne!(outs[0].history[10], f32_run.history[10]);
}

#[test]
fn scheduled_muon_steps_its_schedule_on_every_rank() {
    let shapes = model();
    let g = seeded(shapes.clone());
    let sched = || {
        Schedule::wsd(0.02, 0.0, 4, 4, steepest::schedule::DecayShape::Linear)
            .unwrap()
            .with_warmup(2)
            .unwrap()
    };
    let build = |vars| Scheduled::new(muon(vars), sched());
    let dir = scratch("scheduled");
    let outs = run_distributed(
        2,
        &shapes,
        build,
        &clip_cfg(),
        10,
        &g,
        Start::Fresh,
        Some(&dir),
    );
    let mut reference = Reference::new(&shapes, build);
    reference.run(2, 0..10, &g, false, Some(1.0));
    assert_matches(&outs, &reference, "Scheduled<Muon>, 2 ranks");
    assert_eq!(reference.opt.current_step(), 10);
    // The schedule's counter, written by both ranks, merges into one and
    // resumes the schedule in one process.
    let mut single = build(make_named(&shapes, 1));
    single.load_state_dict(&load_union(&dir).unwrap()).unwrap();
    assert_eq!(single.current_step(), 10);
    assert!(host_state(&single.state_dict().unwrap()) == reference.states[10]);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn uneven_groups_fewer_matrices_than_ranks_and_one_huge_matrix() {
    let few: Shapes = vec![
        ("a.weight", vec![8, 8]),
        ("b.weight", vec![5, 3]),
        ("c", vec![3]),
    ];
    let huge: Shapes = vec![
        ("big.weight", vec![48, 48]),
        ("s0.weight", vec![4, 4]),
        ("s1.weight", vec![4, 4]),
        ("s2.weight", vec![4, 4]),
        ("s3.weight", vec![4, 6]),
        ("v", vec![5]),
    ];
    for (shapes, world) in [(few, 4), (huge.clone(), 3), (huge, 4)] {
        let g = seeded(shapes.clone());
        // Without clipping here (the other tests clip).
        let cfg = DataParallelConfig::default();
        let outs = run_distributed(world, &shapes, muon, &cfg, 10, &g, Start::Fresh, None);
        let idle = outs.iter().filter(|o| o.owned.is_empty()).count();
        if shapes.len() < world {
            assert_eq!(idle, world - shapes.len());
            for o in outs.iter().filter(|o| o.owned.is_empty()) {
                assert!(
                    o.states.iter().all(|s| s.is_empty()),
                    "an idle rank keeps no state"
                );
            }
        } else {
            // The huge matrix's Newton–Schulz cost exceeds the mean: its owner
            // gets nothing else.
            let owner = outs
                .iter()
                .find(|o| o.owned.contains(&"big.weight".into()))
                .unwrap();
            assert_eq!(owner.owned, vec!["big.weight".to_string()]);
        }
        let mut reference = Reference::new(&shapes, muon);
        reference.run(world, 0..10, &g, false, None);
        assert_matches(&outs, &reference, &format!("{shapes:?} on {world} ranks"));
        assert!(outs.iter().all(|o| o.norms.iter().all(|n| n.is_none())));
    }
}

#[test]
fn a_nan_on_one_rank_refuses_the_step_everywhere_and_changes_nothing() {
    let shapes = model();
    let base = seeded(shapes.clone());
    let g = move |step: usize, rank: usize, i: usize| {
        let t = base(step, rank, i)?;
        if (step, rank, i) == (4, 2, 3) || (step, rank, i) == (7, 0, 0) {
            let mut v = host(&t);
            v[1] = if step == 4 {
                f32::NAN
            } else {
                f32::NEG_INFINITY
            };
            return Some(Tensor::from_vec(v, t.shape(), &Device::Cpu).unwrap());
        }
        Some(t)
    };
    let outs = run_distributed(3, &shapes, muon, &clip_cfg(), 10, &g, Start::Fresh, None);
    for (r, o) in outs.iter().enumerate() {
        for (step, res) in o.results.iter().enumerate() {
            match step {
                4 | 7 => {
                    let name = if step == 4 {
                        "h.0.proj.weight"
                    } else {
                        "embed.weight"
                    };
                    assert_eq!(
                        res,
                        &Err(format!("nonfinite {name}")),
                        "rank {r} step {step}"
                    );
                    // Nothing changed on this rank: parameters and state.
                    assert_eq!(o.history[step + 1], o.history[step], "rank {r} step {step}");
                    assert!(
                        o.states[step + 1] == o.states[step],
                        "rank {r} step {step}: state"
                    );
                }
                _ => assert!(res.is_ok(), "rank {r} step {step}: {res:?}"),
            }
        }
    }
    // And the run equals the reference that skips those two steps.
    let mut reference = Reference::new(&shapes, muon);
    reference.run(3, 0..10, &g, false, Some(1.0));
    assert_matches(&outs, &reference, "NaN run");
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "steepest-distributed-muon-{name}-{}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn a_checkpoint_saved_at_4_ranks_loads_at_2_and_at_1_and_continues_identically() {
    let shapes = model();
    let g = seeded(shapes.clone());
    let dir = scratch("4to2");
    let ckpt = dir.join("step5");
    let first = run_distributed(
        4,
        &shapes,
        muon,
        &clip_cfg(),
        5,
        &g,
        Start::Fresh,
        Some(&ckpt),
    );
    // One file per rank and a manifest.
    let manifest = steepest::distributed::checkpoint::read_manifest(&ckpt).unwrap();
    assert_eq!(manifest.world_size, 4);
    assert_eq!(manifest.files.len(), 4);
    // Its files' owners partition the parameters.
    let mut listed: Vec<&str> = manifest
        .files
        .iter()
        .flat_map(|f| f.params.iter().map(|p| p.as_str()))
        .collect();
    listed.sort();
    let mut all: Vec<&str> = shapes.iter().map(|(n, _)| *n).collect();
    all.sort();
    assert_eq!(listed, all);
    let params5 = first[0].history[5].clone();

    // The uninterrupted single-process run, fed the averages of 4 micro-batches
    // for 5 steps, then of the 2 micro-batches that the 2-rank run sees.
    let mut reference = Reference::new(&shapes, muon);
    reference.run(4, 0..5, &g, false, Some(1.0));
    reference.run(2, 5..10, &g, false, Some(1.0));

    // 4 → 2 ranks: each rank keeps only the state of what it owns now.
    let resume = Start::Resume {
        params: &params5,
        checkpoint: &ckpt,
        first_step: 5,
    };
    let second = run_distributed(2, &shapes, muon, &clip_cfg(), 5, &g, resume.clone(), None);
    let mut tail = Reference::new(&shapes, muon);
    tail.history = reference.history[5..].to_vec();
    tail.states = reference.states[5..].to_vec();
    tail.vars = reference.vars.clone();
    assert_matches(&second, &tail, "4 → 2 ranks");

    // 4 → 1: the single-process Muon loads the union as is.
    let vars = make_named(&shapes, 7);
    set_params(&vars, &params5);
    let mut single = muon(vars.clone());
    single.load_state_dict(&load_union(&ckpt).unwrap()).unwrap();
    assert!(host_state(&single.state_dict().unwrap()) == reference.states[5]);
    let mut one = Reference {
        vars,
        opt: single,
        history: vec![params5.clone()],
        states: vec![reference.states[5].clone()],
        norms: Vec::new(),
    };
    one.run(2, 5..10, &g, false, Some(1.0));
    for s in 0..=5 {
        assert_eq!(
            one.history[s],
            reference.history[5 + s],
            "4 → 1: after step {}",
            5 + s
        );
        assert!(
            one.states[s] == reference.states[5 + s],
            "4 → 1: state after step {}",
            5 + s
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_single_process_checkpoint_loads_at_3_ranks_and_back() {
    let shapes = model();
    let g = seeded(shapes.clone());
    let dir = scratch("1to3");
    std::fs::create_dir_all(&dir).unwrap();
    let mut reference = Reference::new(&shapes, muon);
    reference.run(3, 0..5, &g, false, Some(1.0));
    let file = dir.join("single.safetensors");
    reference.opt.save_state(&file).unwrap();
    let params5 = reference.history[5].clone();
    reference.run(3, 5..10, &g, false, Some(1.0));

    // 1 → 3 ranks, continuing 3 steps, then saving at 3 ranks.
    let ckpt = dir.join("three");
    let resume = Start::Resume {
        params: &params5,
        checkpoint: &file,
        first_step: 5,
    };
    let outs = run_distributed(3, &shapes, muon, &clip_cfg(), 3, &g, resume, Some(&ckpt));
    let mut tail = Reference::new(&shapes, muon);
    tail.history = reference.history[5..9].to_vec();
    tail.states = reference.states[5..9].to_vec();
    tail.vars = reference.vars.clone();
    assert_matches(&outs, &tail, "1 → 3 ranks");

    // … and back to one process, which continues identically.
    let union = host_state(&load_union(&ckpt).unwrap());
    assert!(
        union == reference.states[8],
        "the 3-rank checkpoint's union"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_checkpoint_with_a_file_from_another_save_is_refused_on_every_rank() {
    let shapes = model();
    let g = seeded(shapes.clone());
    let dir = scratch("mixed");
    let (a, b) = (dir.join("a"), dir.join("b"));
    run_distributed(2, &shapes, muon, &clip_cfg(), 2, &g, Start::Fresh, Some(&a));
    run_distributed(2, &shapes, muon, &clip_cfg(), 3, &g, Start::Fresh, Some(&b));
    // Rank 1's file of save b put into save a: the manifest's CRC catches it.
    std::fs::copy(
        b.join("rank-1-of-2.safetensors"),
        a.join("rank-1-of-2.safetensors"),
    )
    .unwrap();
    let e = load_union(&a).unwrap_err().to_string();
    assert!(e.contains("differs from the manifest"), "{e}");
    let out = LocalGroup::run(3, |comm| {
        let vars = make_named(&shapes, 1);
        let mut dp = DataParallel::for_optimizer(comm, muon(vars), clip_cfg())?;
        let gs: Vec<Option<Tensor>> = (0..shapes.len()).map(|i| g(0, 0, i)).collect();
        dp.step_grads(&gs)?;
        let before = host_state(&dp.optimizer().state_dict()?);
        let res = dp.load_state(&a).map_err(|e| e.to_string());
        let after = host_state(&dp.optimizer().state_dict()?);
        Ok((res, before == after))
    })
    .unwrap();
    for (r, o) in out.into_iter().enumerate() {
        let (res, unchanged) = o.unwrap();
        let e = res.unwrap_err();
        assert!(e.contains("kept its previous state"), "rank {r}: {e}");
        assert!(unchanged, "rank {r}: state changed");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A rank whose file cannot be written (here a directory stands where rank
/// 1's file goes) fails the save on every rank, naming that rank, and no
/// manifest is written: a save that lost a shard must not read as complete.
#[test]
fn a_rank_file_that_cannot_be_written_fails_the_save_on_every_rank() {
    let shapes = model();
    let g = seeded(shapes.clone());
    let dir = scratch("unwritable");
    std::fs::create_dir_all(dir.join("rank-1-of-2.safetensors")).unwrap();
    let out = LocalGroup::run(2, |comm| {
        let vars = make_named(&shapes, 1);
        let mut dp = DataParallel::for_optimizer(comm, muon(vars), clip_cfg())?;
        let gs: Vec<Option<Tensor>> = (0..shapes.len()).map(|i| g(0, 0, i)).collect();
        dp.step_grads(&gs)?;
        Ok(dp.save_state(&dir).map_err(|e| e.to_string()))
    })
    .unwrap();
    for (r, o) in out.into_iter().enumerate() {
        let e = o.unwrap().unwrap_err();
        assert!(
            e.contains("writing the rank files failed on rank(s) [1]; no manifest written"),
            "rank {r}: {e}"
        );
    }
    assert!(
        !dir.join(steepest::distributed::checkpoint::MANIFEST)
            .exists(),
        "a manifest was written for an incomplete save"
    );
    let e = load_union(&dir).unwrap_err().to_string();
    assert!(e.contains("cannot read"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_cost_model_reads_the_chains() {
    let vars = make_named(&model(), 1);
    let m = muon(vars.clone());
    let specs = param_specs(ShardedOptimizer::driver(&m));
    let kinds: BTreeMap<&str, ParamKind> =
        specs.iter().map(|s| (s.name.as_str(), s.kind)).collect();
    assert_eq!(
        kinds["h.0.fc.weight"],
        ParamKind::Matrix { rows: 16, cols: 6 }
    );
    assert_eq!(kinds["conv.weight"], ParamKind::Matrix { rows: 4, cols: 6 });
    // AdamW-routed matrices and vectors: element-wise.
    for n in ["embed.weight", "lm_head.weight", "h.0.ln.weight", "gain"] {
        assert_eq!(kinds[n], ParamKind::Elementwise, "{n}");
    }
    let a = adamw(make_named(&model(), 1));
    let specs = param_specs(ShardedOptimizer::driver(&a));
    assert!(specs.iter().all(|s| s.kind == ParamKind::Elementwise));
    // The Muon matrices are spread by Newton–Schulz cost at 2 ranks.
    let out = LocalGroup::run(2, |comm| {
        let dp = DataParallel::for_optimizer(comm, muon(make_named(&model(), 1)), clip_cfg())?;
        Ok(dp.plan().loads().to_vec())
    })
    .unwrap();
    let loads = out[0].as_ref().unwrap();
    let (hi, lo) = (*loads.iter().max().unwrap(), *loads.iter().min().unwrap());
    assert!(hi as f64 <= 1.5 * lo as f64, "{loads:?}");
    let names: BTreeSet<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names.len(), model().len());
}

#[test]
fn different_clipping_across_ranks_is_refused_at_construction() {
    let out = LocalGroup::run(2, |comm| {
        let cfg = if comm.rank() == 0 {
            clip_cfg()
        } else {
            DataParallelConfig::default()
        };
        DataParallel::for_optimizer(comm, muon(make_named(&model(), 1)), cfg).map(|_| ())
    })
    .unwrap();
    for res in out {
        let e = res.unwrap_err().to_string();
        assert!(
            e.contains(
                "clip_grad_norm, param_gather, broadcast_initial or the optimizer's two-phase step"
            ),
            "{e}"
        );
    }
}

/// Ranks that both clip, but to different norms, would scale their owned
/// gradients differently with every collective still matching: refused at
/// construction on every rank (the clipping value, not only whether there
/// is one, is part of the layout the ranks agree on).
#[test]
fn different_clip_values_across_ranks_are_refused_at_construction() {
    let out = LocalGroup::run(2, |comm| {
        let cfg = DataParallelConfig {
            clip_grad_norm: Some(if comm.rank() == 0 { 1.0 } else { 2.0 }),
            ..Default::default()
        };
        DataParallel::for_optimizer(comm, muon(make_named(&model(), 1)), cfg).map(|_| ())
    })
    .unwrap();
    for res in out {
        let e = res.unwrap_err().to_string();
        assert!(e.contains("clip_grad_norm"), "{e}");
    }
}

/// Ranks whose optimizers differ only in their settings (a learning rate, a
/// weight decay, a schedule) would each step their share differently, with
/// every collective still matching: refused at construction on every rank,
/// naming the settings, as the layout mismatches are.
#[test]
fn different_optimizer_settings_across_ranks_are_refused_at_construction() {
    use steepest::distributed::ShardedStep;
    type Build = fn(usize) -> Box<dyn ShardedStep + Send>;
    let cases: [(&str, Build); 5] = [
        ("lr", |rank| {
            let cfg = MuonConfig {
                lr: if rank == 0 { 0.02 } else { 0.5 },
                ..muon_config()
            };
            Box::new(Muon::from_named(make_named(&model(), 1), cfg).unwrap())
        }),
        ("adamw weight decay", |rank| {
            let mut cfg = muon_config();
            if rank == 1 {
                cfg.adamw.weight_decay = WeightDecay::Decoupled(0.1);
            }
            Box::new(Muon::from_named(make_named(&model(), 1), cfg).unwrap())
        }),
        ("schedule", |rank| {
            let steps = if rank == 0 { 100 } else { 200 };
            Box::new(Scheduled::new(
                muon(make_named(&model(), 1)),
                Schedule::cosine(0.02, 0.0, steps).unwrap(),
            ))
        }),
        ("same settings", |_| Box::new(muon(make_named(&model(), 1)))),
        // the schedule sets the rate at every step: the base rate an AdamW
        // was built with does not matter (for Muon it would: it sets the
        // AdamW group's ratio to the Muon rate, which the check sees)
        ("same schedule, other base rates", |rank| {
            let cfg = AdamWConfig {
                lr: if rank == 0 { 0.02 } else { 0.5 },
                ..AdamWConfig::default()
            };
            Box::new(Scheduled::new(
                AdamW::from_named(make_named(&model(), 1), cfg).unwrap(),
                Schedule::cosine(0.02, 0.0, 100).unwrap(),
            ))
        }),
    ];
    for (what, build) in cases {
        let out = LocalGroup::run(2, |comm| {
            let rank = comm.rank();
            let named = make_named(&model(), 1);
            let params = named
                .iter()
                .map(|v| (v.name.clone(), v.var.clone()))
                .collect();
            DataParallel::new(comm, params, build(rank), DataParallelConfig::default()).map(|_| ())
        })
        .unwrap();
        for res in out {
            if what.starts_with("same") {
                res.unwrap();
                continue;
            }
            let e = res.expect_err(what).to_string();
            assert!(
                e.contains("optimizer's settings") && e.contains("rank(s) ["),
                "{what}: {e}"
            );
        }
    }
}

/// The manifest must list one file per rank, ranks 0..N−1 in order. A
/// manifest of a 3-rank save that drops rank 2's file, or lists rank 1's
/// twice in its place, would load without rank 2's state (its parameters
/// silently fresh): `read_manifest` and `load_union` refuse it as a
/// checkpoint error naming the manifest and the ranks it lists, and
/// `DataParallel::load_state` refuses it on every rank without changing
/// the state.
#[test]
fn a_manifest_that_does_not_list_every_rank_once_is_refused() {
    use steepest::distributed::checkpoint::{read_manifest, MANIFEST};
    let shapes = model();
    let g = seeded(shapes.clone());
    let dir = scratch("manifest-ranks");
    let ckpt = dir.join("three");
    run_distributed(
        3,
        &shapes,
        muon,
        &clip_cfg(),
        2,
        &g,
        Start::Fresh,
        Some(&ckpt),
    );
    // The intact checkpoint loads; rank 2 owns something (so dropping its
    // file would lose state).
    load_union(&ckpt).unwrap();
    let manifest = read_manifest(&ckpt).unwrap();
    assert_eq!(manifest.world_size, 3);
    assert!(!manifest.files[2].params.is_empty(), "{manifest:?}");
    let text = std::fs::read_to_string(ckpt.join(MANIFEST)).unwrap();
    let original: serde_json::Value = serde_json::from_str(&text).unwrap();

    type Edit = fn(&mut Vec<serde_json::Value>);
    let cases: [(&str, Edit, &str); 2] = [
        ("rank 2 dropped", |f| drop(f.remove(2)), "[0, 1]"),
        ("rank 1 twice", |f| f[2] = f[1].clone(), "[0, 1, 1]"),
    ];
    for (what, edit, ranks) in cases {
        let mut m = original.clone();
        edit(m["files"].as_array_mut().unwrap());
        std::fs::write(
            ckpt.join(MANIFEST),
            serde_json::to_string_pretty(&m).unwrap(),
        )
        .unwrap();
        let check = |e: steepest::Error| match e {
            steepest::Error::Checkpoint { who, what: msg } => {
                assert!(who.ends_with(MANIFEST), "{what}: {who}");
                assert!(msg.contains(ranks), "{what}: {msg}");
                assert!(msg.contains("world size of 3"), "{what}: {msg}");
            }
            e => panic!("{what}: expected Error::Checkpoint, got {e:?}"),
        };
        check(read_manifest(&ckpt).unwrap_err());
        check(load_union(&ckpt).unwrap_err());
        let out = LocalGroup::run(3, |comm| {
            let vars = make_named(&shapes, 1);
            let mut dp = DataParallel::for_optimizer(comm, muon(vars), clip_cfg())?;
            let gs: Vec<Option<Tensor>> = (0..shapes.len()).map(|i| g(0, 0, i)).collect();
            dp.step_grads(&gs)?;
            let before = host_state(&dp.optimizer().state_dict()?);
            let res = dp.load_state(&ckpt);
            let after = host_state(&dp.optimizer().state_dict()?);
            Ok((res, before == after))
        })
        .unwrap();
        for (r, o) in out.into_iter().enumerate() {
            let (res, unchanged) = o.unwrap();
            match res {
                Err(steepest::Error::Checkpoint { what: msg, .. }) => {
                    assert!(
                        msg.contains("kept its previous state"),
                        "{what}, rank {r}: {msg}"
                    );
                    assert!(msg.contains(MANIFEST), "{what}, rank {r}: {msg}");
                }
                other => panic!("{what}, rank {r}: expected Error::Checkpoint, got {other:?}"),
            }
            assert!(unchanged, "{what}, rank {r}: state changed");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// One micro-batch on one rank: the loss `Σ_p ⟨w_p, g_p⟩`, whose gradient is
/// `g` exactly, through `Accumulate::backward_step`.
fn feed_micro_batch<O: steepest::distributed::ShardedStep>(
    acc: &mut steepest::accumulate::Accumulate<DataParallel<steepest::distributed::LocalComm, O>>,
    vars: &[NamedVar],
    g: &GradFn,
    call: usize,
    rank: usize,
) -> steepest::Result<bool> {
    let mut loss = Tensor::new(0f32, &Device::Cpu)?;
    for (i, v) in vars.iter().enumerate() {
        if let Some(gi) = g(call, rank, i) {
            loss = (loss + (v.var.as_tensor() * gi)?.sum_all()?)?;
        }
    }
    acc.backward_step(&loss)
}

/// `Accumulate::data_parallel` keeps each rank's pending micro-batches in its
/// checkpoint. Saved with one micro-batch pending (spectral-decay Muon, 2
/// ranks, 3 micro-batches per step), a fresh run (built with `every = 1`)
/// that loads it and is fed the same micro-batches ends bit for bit where the
/// unbroken run does: parameters, optimizer state, `every` and the pending
/// count, on every rank. At another world size the pending micro-batches are
/// refused on every rank, nothing changed; saved with none pending, the
/// checkpoint loads at any world size and in a single process. A
/// single-process `Accumulate` and a plain `DataParallel` refuse the pending
/// checkpoint, each naming the way to load it.
#[test]
fn accumulation_checkpoints_keep_each_ranks_pending_micro_batches() {
    use steepest::accumulate::Accumulate;
    let shapes = model();
    let g = seeded(shapes.clone());
    // 8 calls: steps at calls 2 and 5; saved before call 3 (none pending)
    // and before call 4 (one pending).
    let (every, calls, boundary_at, pending_at) = (3, 8, 3, 4);
    let dir = scratch("accumulate-pending");
    let (boundary, pending) = (dir.join("boundary"), dir.join("pending"));
    type Out = (Vec<Vec<f32>>, HostState, usize, usize);
    let unbroken = LocalGroup::run(2, |comm| {
        let rank = comm.rank();
        let vars = make_named(&shapes, 1);
        let dp = DataParallel::for_optimizer(comm, muon(vars.clone()), Default::default())?;
        let mut acc = Accumulate::data_parallel(dp, every)?;
        let mut at_save = None;
        for call in 0..calls {
            if call == boundary_at {
                assert_eq!(acc.pending(), 0);
                acc.save_state(&boundary)?;
            }
            if call == pending_at {
                assert_eq!(acc.pending(), 1);
                acc.save_state(&pending)?;
                at_save = Some(params_host(&vars));
            }
            feed_micro_batch(&mut acc, &vars, &g, call, rank)?;
        }
        let state = host_state(&acc.inner().optimizer().state_dict()?);
        let out: Out = (params_host(&vars), state, acc.every(), acc.pending());
        Ok((out, at_save.expect("saved")))
    })
    .unwrap()
    .into_iter()
    .map(|r| r.unwrap())
    .collect::<Vec<_>>();
    assert_eq!(
        unbroken[0].0 .3, 2,
        "the run ends with micro-batches pending"
    );

    let resumed = LocalGroup::run(2, |comm| {
        let rank = comm.rank();
        let vars = make_named(&shapes, 7);
        set_params(&vars, &unbroken[rank].1);
        let dp = DataParallel::for_optimizer(comm, muon(vars.clone()), Default::default())?;
        let mut acc = Accumulate::data_parallel(dp, 1)?;
        acc.load_state(&pending)?;
        for call in pending_at..calls {
            feed_micro_batch(&mut acc, &vars, &g, call, rank)?;
        }
        let state = host_state(&acc.inner().optimizer().state_dict()?);
        let out: Out = (params_host(&vars), state, acc.every(), acc.pending());
        Ok(out)
    })
    .unwrap();
    for (rank, (got, want)) in resumed.into_iter().zip(&unbroken).enumerate() {
        let got = got.unwrap();
        let want = &want.0;
        for (i, (a, b)) in got.0.iter().zip(&want.0).enumerate() {
            assert_eq!(bits(a), bits(b), "rank {rank}: parameter {}", shapes[i].0);
        }
        assert!(got.1 == want.1, "rank {rank}: optimizer state differs");
        assert_eq!(
            (got.2, got.3),
            (want.2, want.3),
            "rank {rank}: every, pending"
        );
    }

    // At 3 ranks: the pending micro-batches are refused everywhere, and
    // each rank keeps its state and its own pending micro-batch; the
    // boundary checkpoint loads.
    let at_three = LocalGroup::run(3, |comm| {
        let rank = comm.rank();
        let vars = make_named(&shapes, 1);
        let dp = DataParallel::for_optimizer(comm, muon(vars.clone()), Default::default())?;
        let mut acc = Accumulate::data_parallel(dp, 2)?;
        feed_micro_batch(&mut acc, &vars, &g, 0, rank)?;
        let before = host_state(&acc.inner().optimizer().state_dict()?);
        let refused = acc.load_state(&pending).map_err(|e| e.to_string());
        let after = host_state(&acc.inner().optimizer().state_dict()?);
        let kept = (before == after, acc.every(), acc.pending());
        acc.reset();
        acc.load_state(&boundary)?;
        Ok((refused, kept, (acc.every(), acc.pending())))
    })
    .unwrap();
    for (rank, out) in at_three.into_iter().enumerate() {
        let (refused, kept, loaded) = out.unwrap();
        let e = refused.expect_err("pending micro-batches at another world size");
        assert!(
            e.contains("every rank kept its previous state"),
            "rank {rank}: {e}"
        );
        assert!(
            e.contains("only at that world size, not 3"),
            "rank {rank}: {e}"
        );
        assert_eq!(kept, (true, 2, 1), "rank {rank}: changed by the refusal");
        assert_eq!(loaded, (every, 0), "rank {rank}: the boundary checkpoint");
    }
    // At 1 rank (fewer than saved) the pending micro-batches are refused
    // too; the boundary checkpoint loads.
    let at_one = LocalGroup::run(1, |comm| {
        let vars = make_named(&shapes, 1);
        let dp = DataParallel::for_optimizer(comm, muon(vars.clone()), Default::default())?;
        let mut acc = Accumulate::data_parallel(dp, 2)?;
        let refused = acc.load_state(&pending).map_err(|e| e.to_string());
        let pending_after = acc.pending();
        acc.load_state(&boundary)?;
        Ok((refused, pending_after, (acc.every(), acc.pending())))
    })
    .unwrap();
    let (refused, pending_after, loaded) = at_one.into_iter().next().unwrap().unwrap();
    let e = refused.expect_err("pending micro-batches at a smaller world size");
    assert!(e.contains("only at that world size, not 1"), "{e}");
    assert_eq!(pending_after, 0, "changed by the refusal");
    assert_eq!(loaded, (every, 0), "the boundary checkpoint at 1 rank");

    // One process: the pending checkpoint is refused by `Accumulate` and by
    // the plain optimizer; the boundary one loads into `Accumulate`.
    let vars = make_named(&shapes, 1);
    let mut single = Accumulate::new(muon(vars.clone()), 1).unwrap();
    let e = single
        .load_state_dict(&load_union(&pending).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("data-parallel `Accumulate`"), "{e}");
    single
        .load_state_dict(&load_union(&boundary).unwrap())
        .unwrap();
    assert_eq!((single.every(), single.pending()), (every, 0));
    let mut plain = muon(vars);
    let e = plain
        .load_state_dict(&load_union(&boundary).unwrap())
        .unwrap_err()
        .to_string();
    assert!(e.contains("saved by `Accumulate`"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Exploding but finite gradients (entries up to 1e20 at steps 2 and 3,
/// whose f32 squares overflow) are clipped as in one process: the norm is
/// measured again scaled by the largest entry, as `clip::grad_norm` does,
/// instead of the step being refused as an infinite norm. Vanishing ones
/// (below 1e-22 at step 4, whose squares underflow to 0) are measured the
/// same way, not as norm 0. 3 ranks, Muon with spectral decay: every step
/// succeeds, and parameters, state and the reported norms equal the
/// single-process run bit for bit.
#[test]
fn exploding_and_vanishing_gradients_are_clipped_as_in_one_process() {
    let shapes = model();
    let base = seeded(shapes.clone());
    let g = move |step: usize, rank: usize, i: usize| {
        let t = base(step, rank, i)?;
        Some(match step {
            2 | 3 => (t * 1e18).unwrap(),
            4 => (t * 1e-25).unwrap(),
            _ => t,
        })
    };
    let outs = run_distributed(3, &shapes, muon, &clip_cfg(), 6, &g, Start::Fresh, None);
    let mut reference = Reference::new(&shapes, muon);
    reference.run(3, 0..6, &g, false, Some(1.0));
    for (r, o) in outs.iter().enumerate() {
        assert!(
            o.results.iter().all(|x| x.is_ok()),
            "rank {r}: {:?}",
            o.results
        );
        let bits_of = |n: &[Option<f64>]| n.iter().map(|x| x.map(f64::to_bits)).collect::<Vec<_>>();
        assert_eq!(
            bits_of(&o.norms),
            bits_of(&reference.norms),
            "rank {r}: norms"
        );
        assert!(
            o.norms[2].is_some_and(|n| n.is_finite() && n > 1e19),
            "{:?}",
            o.norms
        );
        assert!(
            o.norms[4].is_some_and(|n| n > 1e-24 && n < 1e-20),
            "{:?}",
            o.norms
        );
    }
    assert_matches(&outs, &reference, "exploding gradients");
}

/// A learning rate every step would refuse (NaN), set on every rank or on
/// one rank only, is refused by the step's opening status all-reduce on
/// every rank, as a configuration error that changed nothing, and leaves no
/// rank refusing further steps: with a valid rate set again, the next step
/// runs (no `clear_failure`, no `load_state`). Before, each owner's step
/// failed its rate check, which the data-parallel layer could not tell from
/// a step that failed partway: every rank then refused every step, and
/// `load_state` itself was refused (the optimizer's state could not be read
/// back at that rate).
#[test]
fn a_rate_every_step_refuses_is_refused_collectively_and_changes_nothing() {
    use candle_nn::Optimizer;
    let shapes = model();
    let g = seeded(shapes.clone());
    for nan_on in [None, Some(1)] {
        let out = LocalGroup::run(2, |comm| {
            let rank = comm.rank();
            let vars = make_named(&shapes, 1);
            let mut dp = DataParallel::for_optimizer(comm, muon(vars.clone()), clip_cfg())?;
            let gs = |s: usize| -> Vec<Option<Tensor>> {
                (0..shapes.len()).map(|i| g(s, rank, i)).collect()
            };
            dp.step_grads(&gs(0))?;
            let params = |vars: &[NamedVar]| -> Vec<Vec<f32>> {
                vars.iter()
                    .map(|v| {
                        v.var
                            .flatten_all()
                            .unwrap()
                            .to_dtype(DType::F32)
                            .unwrap()
                            .to_vec1()
                            .unwrap()
                    })
                    .collect()
            };
            let before = (params(&vars), host_state(&dp.optimizer().state_dict()?));
            if nan_on.is_none_or(|r| r == rank) {
                dp.optimizer_mut().set_learning_rate(f64::NAN);
            }
            let refused = dp.step_grads(&gs(1)).unwrap_err();
            dp.optimizer_mut().set_learning_rate(0.02);
            let after = (params(&vars), host_state(&dp.optimizer().state_dict()?));
            let next = dp.step_grads(&gs(1)).map_err(|e| e.to_string());
            Ok((refused, before == after, next))
        })
        .unwrap();
        for (r, o) in out.into_iter().enumerate() {
            let (refused, unchanged, next) = o.unwrap();
            assert!(
                matches!(refused, steepest::Error::Config { .. })
                    && refused.to_string().contains("nothing changed"),
                "NaN on {nan_on:?}, rank {r}: {refused}"
            );
            assert!(
                unchanged,
                "NaN on {nan_on:?}, rank {r}: the refused step changed something"
            );
            assert!(next.is_ok(), "NaN on {nan_on:?}, rank {r}: {next:?}");
        }
    }
}

/// The same under a schedule, whose rate the step sets: a schedule whose
/// rate the optimizer refuses (AdamW with decoupled decay λ = 0.1 at rate
/// 20: ηλ = 2 > 1) is refused by the opening status all-reduce on every
/// rank, a Config error with nothing changed (parameters, state, the
/// schedule's counter); moved on to a step whose rate is valid, it runs.
#[test]
fn a_schedule_rate_the_optimizer_refuses_is_refused_collectively() {
    let shapes = model();
    let g = seeded(shapes.clone());
    let out = LocalGroup::run(2, |comm| {
        let rank = comm.rank();
        let vars = make_named(&shapes, 1);
        let opt = Scheduled::new(
            adamw(vars.clone()),
            Schedule::cosine(20.0, 0.0, 10).unwrap(),
        );
        let mut dp = DataParallel::for_optimizer(comm, opt, DataParallelConfig::default())?;
        let gs: Vec<Option<Tensor>> = (0..shapes.len()).map(|i| g(0, rank, i)).collect();
        let params = |vars: &[NamedVar]| -> Vec<Vec<f32>> {
            vars.iter().map(|v| host(v.var.as_tensor())).collect()
        };
        let before = params(&vars);
        let refused = dp.step_grads(&gs).unwrap_err();
        let unchanged = params(&vars) == before && dp.optimizer().current_step() == 0;
        dp.optimizer_mut().set_step(9); // 20·(1 − cos(π/10))/2 ≈ 0.49: ηλ < 1
        let next = dp.step_grads(&gs).map_err(|e| e.to_string());
        Ok((refused, unchanged, next))
    })
    .unwrap();
    for (r, o) in out.into_iter().enumerate() {
        let (refused, unchanged, next) = o.unwrap();
        assert!(
            matches!(refused, steepest::Error::Config { .. })
                && refused
                    .to_string()
                    .contains("invalid optimizer settings on rank(s) [0, 1]"),
            "rank {r}: {refused}"
        );
        assert!(unchanged, "rank {r}: the refused step changed something");
        assert!(next.is_ok(), "rank {r}: {next:?}");
    }
}

/// A save that one rank cannot make (its optimizer cannot produce its state:
/// here a NaN rate, which a checkpoint cannot hold) is refused on every
/// rank before any rank writes, so a good checkpoint already in the
/// directory is left as it was, byte for byte, and still loads. Before,
/// the other ranks overwrote their files and then the save was refused:
/// the old manifest no longer matched them.
#[test]
fn a_save_refused_on_one_rank_leaves_the_previous_checkpoint_intact() {
    use candle_nn::Optimizer;
    let shapes = model();
    let g = seeded(shapes.clone());
    let dir = scratch("refused_save_keeps_old");
    let files = |dir: &Path| -> BTreeMap<String, Vec<u8>> {
        std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let p = e.unwrap().path();
                (p.display().to_string(), std::fs::read(&p).unwrap())
            })
            .collect()
    };
    let out = LocalGroup::run(2, |comm| {
        let rank = comm.rank();
        let vars = make_named(&shapes, 1);
        let mut dp = DataParallel::for_optimizer(comm, muon(vars), clip_cfg())?;
        let gs = |s: usize| -> Vec<Option<Tensor>> {
            (0..shapes.len()).map(|i| g(s, rank, i)).collect()
        };
        dp.step_grads(&gs(0))?;
        dp.save_state(&dir)?;
        // (rank 0 reads the checkpoint before the next collective: no rank
        // can write again before then)
        let saved = (rank == 0).then(|| files(&dir));
        dp.step_grads(&gs(1))?;
        if rank == 1 {
            dp.optimizer_mut().set_learning_rate(f64::NAN);
        }
        Ok((saved, dp.save_state(&dir).map_err(|e| e.to_string())))
    })
    .unwrap();
    let mut before = None;
    for (r, o) in out.into_iter().enumerate() {
        let (saved, res) = o.unwrap();
        before = before.or(saved);
        let e = res.unwrap_err();
        assert!(e.contains("nothing written"), "rank {r}: {e}");
    }
    let before = before.expect("rank 0's snapshot");
    assert_eq!(before.len(), 3, "two rank files and the manifest");
    assert!(
        files(&dir) == before,
        "the refused save changed the checkpoint's files"
    );
    load_union(&dir).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
