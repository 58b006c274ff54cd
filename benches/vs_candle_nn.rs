//! This crate's AdamW and SGD against candle-nn's, one step over the same
//! parameters and gradients (the benches' model, `support/model.rs`: 1.78 M
//! f32 parameters in 32 tensors), measured interleaved: each round times one
//! step of every optimizer in turn, so a machine whose speed drifts (shared
//! hosts do) slows all of them alike, each step after the same settling
//! (caches flushed, 2 ms idle: see `timed`). Prints medians over rounds and
//! candle-nn's time over ours.
//!
//!     cargo bench --bench vs_candle_nn
//!
//! Same hyperparameters on both sides: AdamW at candle-nn's defaults
//! (`lr = 1e-3`, `β = (0.9, 0.999)`, `eps = 1e-8`, decoupled decay 0.01 on
//! every parameter, so ours with `decay_vectors`), SGD at `lr = 0.01` with
//! no momentum and no decay (candle-nn's SGD has neither).
//! `tests/candle_nn_parity.rs` checks that the two sides compute the same
//! steps.

#[path = "support/interleaved.rs"]
mod interleaved;
#[path = "support/model.rs"]
mod model;

use candle_core::backprop::GradStore;
use candle_core::Result;
use candle_nn::{Optimizer, ParamsAdamW};
use interleaved::{median, seconds};
use steepest::optim::NamedVar;
use steepest::{AdamW, AdamWConfig, Sgd, SgdConfig, WeightDecay};

/// Bytes written before each timed step: twice this machine's 32 MiB L3,
/// so that every step starts with the same cold cache.
const SCRATCH_BYTES: usize = 64 << 20;

/// One step of `opt`, timed, after the same settling for every optimizer:
/// the caches filled with other (dirty) lines, then 2 ms idle. Without it a
/// step pays for the one before it: measured on our SGD (medians of 60,
/// 2026-12-01), 0.9–1.2 ms with the caches warm from its own previous step,
/// 1.4–1.8 ms after `SCRATCH_BYTES` written, 2.3 ms right after
/// candle-nn's SGD step and 1.2–1.6 ms after that step plus 5 ms idle (a
/// transient left by the previous step's allocations and frees).
fn timed(opt: &mut impl Optimizer, grads: &GradStore, scratch: &mut [u8]) -> Result<f64> {
    for (i, x) in scratch.iter_mut().step_by(64).enumerate() {
        *x = x.wrapping_add(i as u8);
    }
    std::hint::black_box(&scratch);
    std::thread::sleep(std::time::Duration::from_millis(2));
    seconds(|| opt.step(grads))
}

fn main() -> Result<()> {
    // Each optimizer its own parameters (same shapes), with gradients keyed by them.
    let bare = |vars: &[NamedVar]| vars.iter().map(|v| v.var.clone()).collect::<Vec<_>>();
    let (p_cn_adamw, g_cn_adamw, n) = model::gpt2_quarter();
    let (p_adamw, g_adamw, _) = model::gpt2_quarter();
    let (p_cn_sgd, g_cn_sgd, _) = model::gpt2_quarter();
    let (p_sgd, g_sgd, _) = model::gpt2_quarter();
    println!(
        "threads: {}; {n} f32 parameters in {} tensors; medians over rounds",
        candle_core::utils::get_num_threads(),
        p_adamw.len()
    );
    let mut cn_adamw = candle_nn::AdamW::new(bare(&p_cn_adamw), ParamsAdamW::default())?;
    let mut adamw = AdamW::from_named(
        p_adamw,
        AdamWConfig {
            weight_decay: WeightDecay::Decoupled(0.01),
            decay_vectors: true,
            ..AdamWConfig::default()
        },
    )?;
    let mut cn_sgd = candle_nn::SGD::new(bare(&p_cn_sgd), 0.01)?;
    let mut sgd = Sgd::from_named(
        p_sgd,
        SgdConfig {
            lr: 0.01,
            ..SgdConfig::default()
        },
    )?;

    let mut scratch = vec![0u8; SCRATCH_BYTES];
    // Warm-up: state allocated, thread pool and allocator warm.
    for _ in 0..3 {
        timed(&mut cn_adamw, &g_cn_adamw, &mut scratch)?;
        timed(&mut adamw, &g_adamw, &mut scratch)?;
        timed(&mut cn_sgd, &g_cn_sgd, &mut scratch)?;
        timed(&mut sgd, &g_sgd, &mut scratch)?;
    }
    let rounds = 60;
    let mut t = [const { Vec::new() }; 4];
    for _ in 0..rounds {
        t[0].push(timed(&mut cn_adamw, &g_cn_adamw, &mut scratch)?);
        t[1].push(timed(&mut adamw, &g_adamw, &mut scratch)?);
        t[2].push(timed(&mut cn_sgd, &g_cn_sgd, &mut scratch)?);
        t[3].push(timed(&mut sgd, &g_sgd, &mut scratch)?);
    }
    let [cn_a, a, cn_s, s] = t.map(median);
    println!(
        "{:<8} {:>14} {:>14} {:>22}",
        "step", "candle-nn ms", "steepest ms", "candle-nn / steepest"
    );
    for (name, cn, ours) in [("AdamW", cn_a, a), ("SGD", cn_s, s)] {
        println!(
            "{name:<8} {:>14.2} {:>14.2} {:>22.2}",
            cn * 1e3,
            ours * 1e3,
            cn / ours
        );
    }
    println!("({rounds} rounds)");
    Ok(())
}
