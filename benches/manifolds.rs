//! One optimizer step on each manifold against plain Muon, same parameters (CPU).
//!
//!     cargo bench --bench manifolds
//!
//! Parameters: 4 matrices 256×128 (one same-shape batch), fixed gradients.
//! `muon` is `optim::Muon` without weight decay; `free` is `Steepest` with
//! the spectral norm and no manifold (the same update); `sphere` the
//! Frobenius sphere (Euclidean norm, closed form); `spectral_sphere` and
//! `stiefel` Muon on those manifolds with 1 dual step per step (and 5 for
//! `stiefel_dual5`). Every variant uses Keller Jordan's Newton–Schulz table.
//! 256×128 is nearly square (`n ≤ 2m`), so `stiefel` and `stiefel_dual5`
//! descend the smoothed dual (`msign` of the 384×128 matrix `[Ĝ + WX; μI]`);
//! `stiefel_plain` is `stiefel` with the plain dual (`smoothing: Some(0.0)`).

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use criterion::{criterion_group, criterion_main, Criterion};
use steepest::optim::NamedVar;
use steepest::{
    DualAscent, Manifold, Muon, MuonConfig, Norm, Steepest, SteepestConfig, WeightDecay,
};

fn params(rows: usize) -> (Vec<NamedVar>, GradStore) {
    let dev = Device::Cpu;
    let vars: Vec<NamedVar> = (0..4)
        .map(|i| NamedVar {
            name: format!("w{i}"),
            var: Var::from_tensor(
                &(Tensor::randn(0f32, 1.0, (rows, 128), &dev).unwrap() * 0.05).unwrap(),
            )
            .unwrap(),
        })
        .collect();
    // Fixed gradients: d/dw Σ w⊙g = g.
    let mut loss = Tensor::new(0f32, &dev).unwrap();
    for nv in &vars {
        let g = Tensor::randn(0f32, 1.0, nv.var.shape(), &dev)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        loss = (loss + (nv.var.as_tensor() * g).unwrap().sum_all().unwrap()).unwrap();
    }
    let grads = loss.backward().unwrap();
    (vars, grads)
}

/// Fresh variables with the same values (each optimizer moves its own copy:
/// `Var::from_tensor` of a variable is that variable, sharing its storage).
fn copy(vars: &[NamedVar]) -> Vec<NamedVar> {
    vars.iter()
        .map(|v| NamedVar {
            name: v.name.clone(),
            var: Var::from_tensor(&v.var.as_tensor().copy().unwrap()).unwrap(),
        })
        .collect()
}

/// Gradients of `copy(vars)` equal to those in `grads` for `vars`.
fn regrad(orig: &[NamedVar], vars: &[NamedVar], grads: &GradStore) -> GradStore {
    let mut loss = Tensor::new(0f32, &Device::Cpu).unwrap();
    for (o, v) in orig.iter().zip(vars) {
        let g = grads.get(&o.var).unwrap().detach();
        loss = (loss + (v.var.as_tensor() * g).unwrap().sum_all().unwrap()).unwrap();
    }
    loss.backward().unwrap()
}

/// `optim::Muon` without weight decay on a copy of `vars`.
fn muon(vars: &[NamedVar], grads: &GradStore) -> (Muon, GradStore) {
    let v = copy(vars);
    let gr = regrad(vars, &v, grads);
    let muon = Muon::from_named(
        v,
        MuonConfig {
            lr: 0.02,
            weight_decay: WeightDecay::None,
            ..Default::default()
        },
    )
    .unwrap();
    (muon, gr)
}

/// Times `Steepest` under each configuration on a copy of `vars`.
fn bench_variants(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    vars: &[NamedVar],
    grads: &GradStore,
    variants: Vec<(&str, SteepestConfig)>,
) {
    for (name, cfg) in variants {
        let v = copy(vars);
        let gr = regrad(vars, &v, grads);
        let mut opt = Steepest::from_named(v, cfg).unwrap();
        opt.step(&gr).unwrap(); // leave the cold first step out
        g.bench_function(name, |b| b.iter(|| opt.step(&gr).unwrap()));
    }
}

fn stiefel() -> SteepestConfig {
    SteepestConfig {
        manifold: Manifold::Stiefel { transpose: false },
        ..Default::default()
    }
}

fn bench_steps(c: &mut Criterion) {
    let mut g = c.benchmark_group("manifold_step_4x256x128");
    g.sample_size(10);
    let (vars, grads) = params(256);
    let (mut muon_opt, gr) = muon(&vars, &grads);
    g.bench_function("muon", |b| b.iter(|| muon_opt.step(&gr).unwrap()));

    let variants: Vec<(&str, SteepestConfig)> = vec![
        ("free", SteepestConfig::default()),
        (
            "sphere",
            SteepestConfig {
                norm: Norm::Euclidean,
                manifold: Manifold::Sphere { radius: 10.0 },
                ..Default::default()
            },
        ),
        (
            "spectral_sphere",
            SteepestConfig {
                manifold: Manifold::SpectralSphere { radius: 1.0 },
                ..Default::default()
            },
        ),
        ("stiefel", stiefel()),
        (
            "stiefel_plain",
            SteepestConfig {
                dual: DualAscent {
                    smoothing: Some(0.0),
                    ..Default::default()
                },
                ..stiefel()
            },
        ),
        (
            "stiefel_dual5",
            SteepestConfig {
                dual: DualAscent {
                    steps: 5,
                    ..Default::default()
                },
                ..stiefel()
            },
        ),
    ];
    bench_variants(&mut g, &vars, &grads, variants);
    g.finish();
}

criterion_group!(benches, bench_steps);
criterion_main!(benches);
