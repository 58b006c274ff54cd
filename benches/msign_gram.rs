//! The Gram form of Newton–Schulz against the standard form on the CPU,
//! measured interleaved: each round times one standard `msign`, one in the
//! Gram form (`NewtonSchulz::gram_form`: restart every two steps) and one in
//! the Gram form without restarts (fastest; unstable with bf16/f16 operands,
//! see docs/math.md §4) on the same input, so a machine whose speed drifts
//! slows all three alike. Prints per shape the medians, the measured ratios
//! standard/Gram and the ratios of the product FLOPs (full products, as the
//! CPU runs them).
//!
//!     cargo bench --bench msign_gram

#[path = "support/interleaved.rs"]
mod interleaved;

use candle_core::{Device, Result, Tensor};
use interleaved::{median, seconds};
use steepest::{msign, GramNewtonSchulz, NewtonSchulz};

/// FLOPs (2 per multiply–add) of the matrix products of one msign of an
/// `(m, n)` matrix under `ns`, as the CPU path runs them: the standard form
/// `4s²l + 2s³` per step (no `A²` when `c = 0`); the Gram form `2s²l` for
/// each `R = X Xᵀ` and each `X ← Q X`, `2s³` per `R²`, `Q·Z` and each half
/// of the `R` update.
fn product_flops(ns: &NewtonSchulz, m: usize, n: usize) -> f64 {
    let (s, l) = (m.min(n) as f64, m.max(n) as f64);
    let (sl, sss) = (2.0 * s * s * l, 2.0 * s * s * s);
    let table = ns.coefficients();
    let Some(restarts) = ns.gram_restarts(m, n) else {
        return table
            .iter()
            .map(|&[_, _, c]| 2.0 * sl + if c == 0.0 { 0.0 } else { sss })
            .sum();
    };
    let mut flops = sl; // R = X Xᵀ
    let mut fresh = true;
    for (k, &[_, _, c]) in table.iter().enumerate() {
        if !fresh && restarts.contains(&k) {
            flops += 2.0 * sl; // X ← Q X, R = X Xᵀ
            fresh = true;
        }
        if c != 0.0 {
            flops += sss; // R²
        }
        if !fresh {
            flops += sss; // Q·Z
        }
        fresh = false;
        if k + 1 < table.len() && !restarts.contains(&(k + 1)) {
            flops += 2.0 * sss; // R·Z, Z·RZ
        }
    }
    flops + sl // X ← Q X
}

fn main() -> Result<()> {
    // (batch, m, n): aspect ratios 1 to 4 at s = 256, GPT-2/4-sized blocks
    // (d = 192: attention 192×576, MLP 192×768 and 768×192), and 384×1536.
    let shapes = [
        (1, 256, 256),
        (1, 256, 512),
        (1, 256, 768),
        (1, 256, 1024),
        (4, 192, 576),
        (4, 192, 768),
        (4, 768, 192),
        (1, 384, 1536),
    ];
    let standard = NewtonSchulz::muon();
    let gram = NewtonSchulz::muon().gram_form();
    let no_restart = NewtonSchulz::muon().with_gram(GramNewtonSchulz {
        min_aspect: 2.0,
        restarts: vec![],
    });
    println!(
        "threads: {}; Muon's quintic × {} steps, f32; Gram form restarts before steps {:?}; medians over rounds",
        candle_core::utils::get_num_threads(),
        standard.coefficients().len(),
        gram.gram().map(|g| g.restarts.clone()).unwrap_or_default()
    );
    println!(
        "{:>14} {:>7} {:>12} {:>9} {:>9} {:>7} {:>14} {:>9} {:>7}",
        "shape",
        "rounds",
        "standard ms",
        "Gram ms",
        "measured",
        "FLOPs",
        "no-restart ms",
        "measured",
        "FLOPs"
    );
    for (b, m, n) in shapes {
        let g = Tensor::randn(0f32, 1.0, (b, m, n), &Device::Cpu)?;
        let f_std = product_flops(&standard, m, n);
        let f_gram = product_flops(&gram, m, n);
        let f_none = product_flops(&no_restart, m, n);
        let rounds = ((3e10 / (b as f64 * f_std)) as usize).clamp(9, 100);
        std::hint::black_box(msign(&g, &standard)?);
        std::hint::black_box(msign(&g, &gram)?);
        std::hint::black_box(msign(&g, &no_restart)?);
        let (mut t_std, mut t_gram, mut t_none) = (Vec::new(), Vec::new(), Vec::new());
        let (mut ratios, mut ratios_none) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            let a = seconds(|| {
                std::hint::black_box(msign(&g, &standard)?);
                Ok(())
            })?;
            let c = seconds(|| {
                std::hint::black_box(msign(&g, &gram)?);
                Ok(())
            })?;
            let d = seconds(|| {
                std::hint::black_box(msign(&g, &no_restart)?);
                Ok(())
            })?;
            t_std.push(a);
            t_gram.push(c);
            t_none.push(d);
            ratios.push(a / c);
            ratios_none.push(a / d);
        }
        println!(
            "{:>14} {rounds:>7} {:>12.3} {:>9.3} {:>8.2}× {:>6.2}× {:>14.3} {:>8.2}× {:>6.2}×",
            format!("{b}×{m}×{n}"),
            median(t_std) * 1e3,
            median(t_gram) * 1e3,
            median(ratios),
            f_std / f_gram,
            median(t_none) * 1e3,
            median(ratios_none),
            f_std / f_none
        );
    }
    Ok(())
}
