//! Timings of the CUDA kernels through the device seam (feature `cuda`):
//! fused AdamW and SGD over a GPT-2-small-sized parameter set, the finite
//! check, batched power iteration and msign.
//!
//!     cargo bench --features cuda --bench gpu_kernels
//!
//! Each timing is the mean over `REPS` calls after `WARMUP` calls, between
//! two device synchronisations; bandwidth figures count the bytes each
//! kernel must move (reads + writes), not what caches saved. Without
//! feature `cuda` this binary only says so.

#[cfg(not(feature = "cuda"))]
fn main() {
    eprintln!("gpu_kernels: build with --features cuda (and run on a GPU)");
}

#[cfg(feature = "cuda")]
fn main() {
    gpu::main();
}

#[cfg(feature = "cuda")]
mod gpu {
    use std::time::Instant;

    use candle_core::{DType, Device, Tensor, Var};
    use steepest::device::{self, AdamItem, AdamStep, DecayTerm, SgdItem};
    use steepest::linalg::{msign, power_iteration, NewtonSchulz};

    const WARMUP: usize = 3;
    const REPS: usize = 20;

    /// Mean seconds per call of `f`.
    fn time(dev: &Device, mut f: impl FnMut()) -> f64 {
        for _ in 0..WARMUP {
            f();
        }
        dev.synchronize().unwrap();
        let t = Instant::now();
        for _ in 0..REPS {
            f();
        }
        dev.synchronize().unwrap();
        t.elapsed().as_secs_f64() / REPS as f64
    }

    /// GPT-2 small's matrices (12 layers) and their biases: 85 M + 0.1 M elements.
    fn shapes() -> Vec<Vec<usize>> {
        let mut s = Vec::new();
        for _ in 0..12 {
            for (r, c) in [(2304, 768), (768, 768), (3072, 768), (768, 3072)] {
                s.push(vec![r, c]);
                s.push(vec![r]);
            }
        }
        s
    }

    fn report(name: &str, secs: f64, bytes: f64) {
        if bytes > 0.0 {
            println!(
                "{name:<44} {:>9.3} ms  {:>7.1} GB/s",
                secs * 1e3,
                bytes / secs / 1e9
            );
        } else {
            println!("{name:<44} {:>9.3} ms", secs * 1e3);
        }
    }

    pub fn main() {
        let dev = Device::new_cuda(0).expect("a CUDA device");
        println!("steepest gpu_kernels: {WARMUP} warm-up + {REPS} timed calls each");
        for dt in [DType::F32, DType::BF16] {
            let ps: Vec<(Var, Tensor, Var, Var)> = shapes()
                .iter()
                .map(|s| {
                    let w = Var::from_tensor(
                        &Tensor::randn(0f32, 0.02, s.as_slice(), &dev)
                            .unwrap()
                            .to_dtype(dt)
                            .unwrap(),
                    )
                    .unwrap();
                    let g = Tensor::randn(0f32, 1.0, s.as_slice(), &dev)
                        .unwrap()
                        .to_dtype(dt)
                        .unwrap();
                    let m = Var::zeros(s.as_slice(), DType::F32, &dev).unwrap();
                    let v = Var::zeros(s.as_slice(), DType::F32, &dev).unwrap();
                    (w, g, m, v)
                })
                .collect();
            let n: usize = ps.iter().map(|p| p.1.elem_count()).sum();
            let pb = dt.size_in_bytes() as f64;
            let items: Vec<AdamItem<'_>> = ps
                .iter()
                .map(|(w, g, m, v)| AdamItem {
                    w,
                    g,
                    m,
                    v,
                    step: AdamStep {
                        lr_bc1: 1e-3,
                        bc2_sqrt: 0.1,
                    },
                    decay: DecayTerm {
                        scale: 0.999,
                        rank1: None,
                    },
                })
                .collect();
            let s = time(&dev, || {
                device::adamw_step(&items, 0.9, 0.999, 1e-8).unwrap()
            });
            // w, g read; w written (param dtype); m, v read and written (f32)
            report(
                &format!("adamw {dt:?} ({} tensors, {n} elements)", ps.len()),
                s,
                n as f64 * (3.0 * pb + 16.0),
            );
            let sgd: Vec<SgdItem<'_>> = ps
                .iter()
                .map(|(w, g, m, _)| SgdItem {
                    w,
                    g,
                    buf: Some(m),
                    lr: 1e-3,
                    decay: DecayTerm::NONE,
                })
                .collect();
            let s = time(&dev, || device::sgd_step(&sgd, 0.9, true).unwrap());
            report(
                &format!("sgd nesterov {dt:?}"),
                s,
                n as f64 * (3.0 * pb + 8.0),
            );
            let gs: Vec<&Tensor> = ps.iter().map(|p| &p.1).collect();
            let s = time(&dev, || {
                assert_eq!(device::first_nonfinite(&gs).unwrap(), None);
            });
            report(
                &format!("finite check {dt:?} (incl. host sync)"),
                s,
                n as f64 * pb,
            );
        }
        for (b, m, n) in [(12, 768, 3072), (12, 3072, 768), (1, 4096, 4096)] {
            for dt in [DType::F32, DType::BF16] {
                let w = Tensor::randn(0f32, 1.0, (b, m, n), &dev)
                    .unwrap()
                    .to_dtype(dt)
                    .unwrap();
                let start = Tensor::randn(0f32, 1.0, (b, n), &dev).unwrap();
                for iters in [1, 5] {
                    let s = time(&dev, || {
                        power_iteration(&w, Some(&start), iters).unwrap();
                    });
                    let bytes = (b * m * n) as f64 * dt.size_in_bytes() as f64 * (iters + 1) as f64;
                    report(
                        &format!("power_iteration ({b},{m},{n}) {dt:?} ×{iters}"),
                        s,
                        bytes,
                    );
                }
            }
        }
        for (b, m, n) in [
            (1, 1024, 1024),
            (1, 4096, 4096),
            (12, 768, 3072),
            (12, 768, 768),
        ] {
            let g = Tensor::randn(0f32, 1.0, (b, m, n), &dev).unwrap();
            for (name, ns) in [
                ("f32", NewtonSchulz::muon()),
                (
                    "bf16 ops",
                    NewtonSchulz::muon().with_compute_dtype(DType::BF16),
                ),
            ] {
                let s = time(&dev, || {
                    msign(&g, &ns).unwrap();
                });
                // 5 steps × (s²l + s³ + s²l) multiply–adds, reported as TFLOP/s
                let (sm, l) = (m.min(n) as f64, m.max(n) as f64);
                let flops = 5.0 * 2.0 * (2.0 * sm * sm * l + sm * sm * sm) * b as f64;
                println!(
                    "{:<44} {:>9.3} ms  {:>7.1} TFLOP/s",
                    format!("msign ({b},{m},{n}) {name}"),
                    s * 1e3,
                    flops / s / 1e12
                );
            }
        }
    }
}
