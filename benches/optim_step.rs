//! One optimizer step over the same parameter set: AdamW, AdamW + spectral
//! decay, Muon, Muon + spectral decay (CPU).
//!
//!     cargo bench --bench optim_step
//!
//! Parameters: GPT-2-small matrix kinds scaled down by 4 (d = 192) for 4
//! layers — qkv 576×192, proj 192×192, fc 768×192, fc-proj 192×768 — plus a
//! bias per matrix.

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use candle_nn::Optimizer;
use criterion::{criterion_group, criterion_main, Criterion};
use steepest::optim::NamedVar;
use steepest::{AdamW, AdamWConfig, Muon, MuonConfig, WeightDecay};

fn params() -> (Vec<NamedVar>, GradStore) {
    let dev = Device::Cpu;
    let mut vars = Vec::new();
    for layer in 0..4 {
        for (kind, (r, c)) in [
            ("qkv", (576, 192)),
            ("proj", (192, 192)),
            ("fc", (768, 192)),
            ("fc_proj", (192, 768)),
        ] {
            let w = Var::from_tensor(
                &(Tensor::randn(0f32, 1.0, (r, c), &dev).unwrap() * 0.02).unwrap(),
            )
            .unwrap();
            let b = Var::zeros(r, candle_core::DType::F32, &dev).unwrap();
            vars.push(NamedVar {
                name: format!("h.{layer}.{kind}.weight"),
                var: w,
            });
            vars.push(NamedVar {
                name: format!("h.{layer}.{kind}.bias"),
                var: b,
            });
        }
    }
    // Fixed gradients: d/dw Σ w⊙g = g.
    let mut loss = Tensor::new(0f32, &dev).unwrap();
    for nv in &vars {
        let g = Tensor::randn(0f32, 1.0, nv.var.shape(), &dev).unwrap();
        loss = (loss + (nv.var.as_tensor() * g).unwrap().sum_all().unwrap()).unwrap();
    }
    let grads = loss.backward().unwrap();
    (vars, grads)
}

fn bench_steps(c: &mut Criterion) {
    let mut g = c.benchmark_group("optimizer_step_gpt2_quarter_4_layers");
    g.sample_size(10);
    let (vars, grads) = params();
    let mut adamw = AdamW::from_named(vars.clone(), AdamWConfig::default()).unwrap();
    g.bench_function("adamw", |b| b.iter(|| adamw.step(&grads).unwrap()));
    let cfg = AdamWConfig {
        weight_decay: WeightDecay::spectral(0.1),
        ..Default::default()
    };
    let mut adamw_sp = AdamW::from_named(vars.clone(), cfg).unwrap();
    g.bench_function("adamw_spectral", |b| {
        b.iter(|| adamw_sp.step(&grads).unwrap())
    });
    let mut muon = Muon::from_named(vars.clone(), MuonConfig::default()).unwrap();
    g.bench_function("muon", |b| b.iter(|| muon.step(&grads).unwrap()));
    let cfg = MuonConfig {
        weight_decay: WeightDecay::spectral(0.1),
        ..Default::default()
    };
    let mut muon_sp = Muon::from_named(vars, cfg).unwrap();
    g.bench_function("muon_spectral", |b| {
        b.iter(|| muon_sp.step(&grads).unwrap())
    });
    g.finish();
}

criterion_group!(benches, bench_steps);
criterion_main!(benches);
