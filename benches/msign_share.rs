//! How close `msign` comes to the rate of its own matrix products, measured
//! interleaved: each round times one `msign` call, then exactly its products
//! (`X Xᵀ`, `A²`, `B X` per Newton–Schulz step, through candle), then the
//! device-generic `msign_generic`, so a machine whose speed drifts (shared
//! hosts do) slows all three alike. Prints per-size medians and the ratio
//! `products / msign` (1 = msign runs at its products' rate; the polynomial
//! is folded into the products, so the remaining gap is normalisation and
//! two copies per step).
//!
//!     cargo bench --bench msign_share

#[path = "support/interleaved.rs"]
mod interleaved;

use candle_core::{Device, Result, Tensor};
use interleaved::{median, seconds};
use steepest::linalg::msign_generic;
use steepest::{msign, NewtonSchulz};

/// msign's products alone on a normalised input (the same input every step:
/// without msign's coefficients the iterate would underflow to zero).
fn products(x: &Tensor, xt: &Tensor, steps: usize) -> Result<()> {
    for _ in 0..steps {
        let a = x.matmul(xt)?;
        let b = a.matmul(&a)?;
        std::hint::black_box(b.matmul(x)?);
    }
    Ok(())
}

fn main() -> Result<()> {
    // `cargo bench` passes `--bench`; a size list may follow (e.g. `-- 256 1024`).
    let sizes: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let sizes = if sizes.is_empty() {
        vec![128, 256, 512, 1024]
    } else {
        sizes
    };
    let ns = NewtonSchulz::muon();
    let steps = ns.coefficients().len();
    println!(
        "threads: {}; {steps} Newton–Schulz steps; medians over rounds",
        candle_core::utils::get_num_threads()
    );
    println!(
        "{:>6} {:>7} {:>12} {:>12} {:>12} {:>10} {:>12}",
        "n", "rounds", "msign ms", "products ms", "generic ms", "prod/msign", "msign GFLOP/s"
    );
    for n in sizes {
        let g = Tensor::randn(0f32, 1.0, (n, n), &Device::Cpu)?;
        let x = (&g / n as f64)?; // ‖g‖_F ≈ n
        let xt = x.t()?;
        let rounds = ((4e9 / (n as f64).powi(3)) as usize).clamp(15, 200);
        // Warm-up: thread pool, allocator, caches.
        std::hint::black_box(msign(&g, &ns)?);
        products(&x, &xt, steps)?;
        let (mut t_msign, mut t_prod, mut t_gen, mut ratios) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for _ in 0..rounds {
            let a = seconds(|| {
                std::hint::black_box(msign(&g, &ns)?);
                Ok(())
            })?;
            let b = seconds(|| products(&x, &xt, steps))?;
            let c = seconds(|| {
                std::hint::black_box(msign_generic(&g, &ns)?);
                Ok(())
            })?;
            t_msign.push(a);
            t_prod.push(b);
            t_gen.push(c);
            ratios.push(b / a);
        }
        let flops = steps as f64 * 6.0 * (n as f64).powi(3); // 4m²n + 2m³, m = n
        let m = median(t_msign);
        println!(
            "{n:>6} {rounds:>7} {:>12.3} {:>12.3} {:>12.3} {:>10.2} {:>12.1}",
            m * 1e3,
            median(t_prod) * 1e3,
            median(t_gen) * 1e3,
            median(ratios),
            flops / m / 1e9
        );
    }
    Ok(())
}
