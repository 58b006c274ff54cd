//! One optimizer step over the same parameter set: AdamW, AdamW + spectral
//! decay, Muon, Muon + spectral decay (CPU); and the spectral norm penalty
//! (`penalty::SpectralNormPenalty`) on the same matrices, the work it adds
//! to a training step two ways: its loss term and that term's backward, and
//! `add_to_grads`.
//!
//!     cargo bench --bench optim_step
//!
//! Parameters: GPT-2-small matrix kinds scaled down by 4 (d = 192) for 4
//! layers — qkv 576×192, proj 192×192, fc 768×192, fc-proj 192×768 — plus a
//! bias per matrix: 1.78 M parameters.
//!
//! The group `adamw_bf16_master_weights` times one AdamW step over the same
//! parameters in f32, bf16, and bf16 with f32 master weights.
//!
//! The group `adamw_bandwidth` compares one AdamW step (which reads `w, g, m,
//! v` and writes `w, m, v`: 28 bytes per f32 parameter) with a plain copy of
//! the same number of bytes (14 bytes per parameter read and written, split
//! across the same thread pool), both reported in bytes/s of those 28 bytes.

use candle_core::backprop::GradStore;
use candle_core::DType;
use candle_nn::Optimizer;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rayon::prelude::*;
use steepest::optim::NamedVar;
use steepest::penalty::SpectralNormPenalty;
use steepest::{AdamW, AdamWConfig, Muon, MuonConfig, WeightDecay};

#[path = "support/model.rs"]
mod model;

fn params() -> (Vec<NamedVar>, GradStore) {
    let (vars, grads, _) = model::gpt2_quarter();
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
    let mut muon_sp = Muon::from_named(vars.clone(), cfg).unwrap();
    g.bench_function("muon_spectral", |b| {
        b.iter(|| muon_sp.step(&grads).unwrap())
    });
    let matrices: Vec<NamedVar> = vars.into_iter().filter(|v| v.var.rank() == 2).collect();
    let mut penalty = SpectralNormPenalty::from_named(matrices, 0.1).unwrap();
    penalty.loss().unwrap(); // warm: one power iteration per call from here
    g.bench_function("spectral_norm_penalty_loss_and_backward", |b| {
        b.iter(|| penalty.loss().unwrap().backward().unwrap())
    });
    // (each call adds to the same store: the work per call is the same)
    let mut store = grads;
    g.bench_function("spectral_norm_penalty_add_to_grads", |b| {
        b.iter(|| penalty.add_to_grads(&mut store).unwrap())
    });
    g.finish();
}

fn bench_bandwidth(c: &mut Criterion) {
    let (vars, grads) = params();
    let n: usize = vars.iter().map(|v| v.var.elem_count()).sum();
    let mut g = c.benchmark_group("adamw_bandwidth");
    g.sample_size(20);
    g.throughput(Throughput::Bytes(28 * n as u64));
    // 14 bytes per parameter copied = 28 bytes per parameter moved.
    let src = vec![1u8; 14 * n];
    let mut dst = vec![0u8; 14 * n];
    const CHUNK: usize = 1 << 20;
    g.bench_function("copy_28B_per_param", |b| {
        b.iter(|| {
            dst.par_chunks_mut(CHUNK)
                .zip(src.par_chunks(CHUNK))
                .for_each(|(d, s)| d.copy_from_slice(s));
            std::hint::black_box(&dst);
        })
    });
    let mut adamw = AdamW::from_named(vars, AdamWConfig::default()).unwrap();
    g.bench_function("adamw_step", |b| b.iter(|| adamw.step(&grads).unwrap()));
    g.finish();
}

/// One AdamW step over the same parameters in f32, in bf16, and in bf16
/// with f32 master weights (`with_master_weights`: the step runs on the
/// masters, then checks and rounds them into the parameters).
fn bench_master_weights(c: &mut Criterion) {
    let mut g = c.benchmark_group("adamw_bf16_master_weights");
    g.sample_size(10);
    for (name, dtype, master) in [
        ("f32", DType::F32, false),
        ("bf16", DType::BF16, false),
        ("bf16_master", DType::BF16, true),
    ] {
        let (vars, grads, _) = model::gpt2_quarter_as(dtype);
        let mut opt = AdamW::from_named(vars, AdamWConfig::default()).unwrap();
        if master {
            opt = opt.with_master_weights();
        }
        g.bench_function(name, |b| b.iter(|| opt.step(&grads).unwrap()));
    }
    g.finish();
}

criterion_group!(benches, bench_steps, bench_bandwidth, bench_master_weights);
criterion_main!(benches);
