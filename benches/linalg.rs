//! msign and power iteration on the CPU.
//!
//!     cargo bench --bench linalg
//!
//! `msign/N` is the whole Newton–Schulz call (CPU fast path); `msign_generic/N`
//! the device-generic candle-ops version; `matmuls_only/N` runs exactly msign's
//! matrix products (X Xᵀ, A², B X per step) through candle and nothing else, so
//! `matmuls_only / msign` is the share of msign's time spent in its matmuls.
//! `power_iteration_10/*` is 10 power iterations by the CPU path, and by the
//! generic path (`*_generic`) in the same run.

use candle_core::{DType, Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use steepest::device::with_generic_ops;
use steepest::linalg::msign_generic;
use steepest::{msign, power_iteration, NewtonSchulz};

/// FLOPs of `steps` Newton–Schulz steps on `b` matrices `m × n` (m ≤ n): `4m²n + 2m³` each.
fn ns_flops(b: usize, m: usize, n: usize, steps: usize) -> u64 {
    let (m, n) = (m.min(n) as u64, m.max(n) as u64);
    b as u64 * steps as u64 * (4 * m * m * n + 2 * m * m * m)
}

/// The products of msign alone, same shapes and order, every step on the same
/// normalised input: feeding `B X` back without msign's coefficients would
/// shrink the iterate through the subnormal range to zero within three steps,
/// and the products' speed would then depend on that, not on the shapes.
fn matmuls_only(x: &Tensor, steps: usize) -> candle_core::Result<Vec<Tensor>> {
    let r = x.rank();
    let xt = x.transpose(r - 2, r - 1)?;
    (0..steps)
        .map(|_| {
            let a = x.matmul(&xt)?;
            let b = a.matmul(&a)?;
            b.matmul(x)
        })
        .collect()
}

/// GPT-2-small matrix kinds scaled down by 4 (d = 192), 12 layers each:
/// qkv (576×192), proj (192×192), fc (768×192), fc-proj (192×768).
fn gpt2_quarter() -> Vec<(usize, usize, usize)> {
    vec![
        (12, 576, 192),
        (12, 192, 192),
        (12, 768, 192),
        (12, 192, 768),
    ]
}

fn bench_msign(c: &mut Criterion) {
    let dev = Device::Cpu;
    let ns = NewtonSchulz::muon();
    let steps = ns.coefficients().len();
    let mut g = c.benchmark_group("msign");
    g.sample_size(10);
    for n in [128usize, 256, 512, 1024] {
        let x = Tensor::randn(0f32, 1.0, (n, n), &dev).unwrap();
        g.throughput(Throughput::Elements(ns_flops(1, n, n, steps)));
        g.bench_with_input(BenchmarkId::new("msign", n), &x, |b, x| {
            b.iter(|| msign(x, &ns).unwrap())
        });
        g.bench_with_input(BenchmarkId::new("msign_generic", n), &x, |b, x| {
            b.iter(|| msign_generic(x, &ns).unwrap())
        });
        // Normalised input, as msign's products see it (‖x‖_F ≈ n for an
        // n×n Gaussian).
        let xn = (&x / n as f64).unwrap();
        g.bench_with_input(BenchmarkId::new("matmuls_only", n), &xn, |b, x| {
            b.iter(|| matmuls_only(x, steps).unwrap())
        });
    }
    g.finish();

    let mut g = c.benchmark_group("msign_gpt2_quarter");
    g.sample_size(10);
    let mats: Vec<Tensor> = gpt2_quarter()
        .into_iter()
        .map(|s| Tensor::randn(0f32, 1.0, s, &dev).unwrap())
        .collect();
    let flops: u64 = gpt2_quarter()
        .iter()
        .map(|&(b, m, n)| ns_flops(b, m, n, steps))
        .sum();
    g.throughput(Throughput::Elements(flops));
    g.bench_function("batched_by_shape", |b| {
        b.iter(|| {
            mats.iter()
                .map(|m| msign(m, &ns).unwrap())
                .collect::<Vec<_>>()
        })
    });
    g.bench_function("one_matrix_at_a_time", |b| {
        b.iter(|| {
            mats.iter()
                .map(|m| {
                    (0..m.dim(0).unwrap())
                        .map(|i| msign(&m.get(i).unwrap(), &ns).unwrap())
                        .collect::<Vec<_>>()
                })
                .collect::<Vec<_>>()
        })
    });
    g.finish();
}

fn bench_power_iteration(c: &mut Criterion) {
    let dev = Device::Cpu;
    let mut g = c.benchmark_group("power_iteration_10");
    g.sample_size(10);
    let mats: Vec<Tensor> = gpt2_quarter()
        .into_iter()
        .map(|s| Tensor::randn(0f32, 1.0, s, &dev).unwrap())
        .collect();
    // Bytes: one read of W per iteration, the least a Gram step needs (the
    // CPU path reads it once per step, plus once for the final `W v` or
    // `Wᵀu` and, when wide, once for the start; the generic path reads it
    // twice per step, by its two matrix–vector products).
    let bytes: u64 = mats.iter().map(|m| m.elem_count() as u64 * 4 * 10).sum();
    g.throughput(Throughput::Bytes(bytes));
    let all = |mats: &[Tensor]| {
        mats.iter()
            .map(|m| power_iteration(m, None, 10).unwrap())
            .collect::<Vec<_>>()
    };
    g.bench_function("gpt2_quarter_batched", |b| b.iter(|| all(&mats)));
    g.bench_function("gpt2_quarter_batched_generic", |b| {
        b.iter(|| with_generic_ops(|| all(&mats)))
    });
    let w = Tensor::randn(0f32, 1.0, (1024, 1024), &dev)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    g.throughput(Throughput::Bytes(1024 * 1024 * 4 * 10));
    g.bench_function("1024x1024", |b| {
        b.iter(|| power_iteration(&w, None, 10).unwrap())
    });
    g.bench_function("1024x1024_generic", |b| {
        b.iter(|| with_generic_ops(|| power_iteration(&w, None, 10).unwrap()))
    });
    g.finish();
}

criterion_group!(benches, bench_msign, bench_power_iteration);
criterion_main!(benches);
