//! Peak heap bytes allocated during one optimizer step (a counting global
//! allocator; CPU): candle-nn's AdamW and SGD, then this crate's AdamW, SGD,
//! AdamW + spectral decay, SGD with momentum and Muon, over the benches'
//! model (`support/model.rs`: GPT-2-small matrix kinds scaled by 1/4, 4
//! layers, 1.78 M parameters), after a warm-up step so that the optimizer
//! state exists.
//!
//!     cargo bench --bench step_memory
//!
//! Prints one line per optimizer: peak bytes above the level before the step,
//! and that peak per parameter. Only the public API that every version of the
//! crate has is used, so this file (with `support/model.rs`) measures an
//! older checkout too.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::backprop::GradStore;
use candle_nn::Optimizer;
use steepest::{AdamW, AdamWConfig, Muon, MuonConfig, Sgd, SgdConfig, WeightDecay};

/// Counts live heap bytes and their peak.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = System.alloc(layout);
        if !p.is_null() {
            let now = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(now, Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            if new_size > layout.size() {
                let now = LIVE.fetch_add(new_size - layout.size(), Ordering::Relaxed)
                    + (new_size - layout.size());
                PEAK.fetch_max(now, Ordering::Relaxed);
            } else {
                LIVE.fetch_sub(layout.size() - new_size, Ordering::Relaxed);
            }
        }
        p
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

#[path = "support/model.rs"]
mod model;

/// Peak bytes allocated above the live level while `f` runs.
fn peak_during(f: impl FnOnce()) -> usize {
    let base = LIVE.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    f();
    PEAK.load(Ordering::SeqCst) - base
}

fn measure<O: Optimizer>(name: &str, mut opt: O, grads: &GradStore, n: usize) {
    opt.step(grads).unwrap(); // warm-up: the state exists afterwards
    let peak = peak_during(|| opt.step(grads).unwrap());
    println!(
        "{name:<16} peak {:>12} bytes  ({:.2} bytes/param, {:.2} MiB)",
        peak,
        peak as f64 / n as f64,
        peak as f64 / (1 << 20) as f64
    );
}

fn main() {
    let (vars, grads, n) = model::gpt2_quarter();
    println!("parameters: {n}");
    // candle-nn's optimizers, for comparison (its AdamW decays every
    // parameter; its SGD has no momentum).
    let bare: Vec<_> = vars.iter().map(|v| v.var.clone()).collect();
    measure(
        "candle_nn_adamw",
        candle_nn::AdamW::new(bare.clone(), candle_nn::ParamsAdamW::default()).unwrap(),
        &grads,
        n,
    );
    measure(
        "candle_nn_sgd",
        candle_nn::SGD::new(bare, 0.01).unwrap(),
        &grads,
        n,
    );
    // (candle-nn's AdamW decays every parameter, vectors too: the same here)
    measure(
        "adamw",
        AdamW::from_named(
            vars.clone(),
            AdamWConfig {
                decay_vectors: true,
                ..Default::default()
            },
        )
        .unwrap(),
        &grads,
        n,
    );
    measure(
        "sgd",
        Sgd::from_named(vars.clone(), SgdConfig::default()).unwrap(),
        &grads,
        n,
    );
    let cfg = AdamWConfig {
        weight_decay: WeightDecay::spectral(0.1),
        ..Default::default()
    };
    measure(
        "adamw_spectral",
        AdamW::from_named(vars.clone(), cfg).unwrap(),
        &grads,
        n,
    );
    let cfg = SgdConfig {
        momentum: 0.9,
        ..Default::default()
    };
    measure(
        "sgd_momentum",
        Sgd::from_named(vars.clone(), cfg).unwrap(),
        &grads,
        n,
    );
    measure(
        "muon",
        Muon::from_named(vars, MuonConfig::default()).unwrap(),
        &grads,
        n,
    );
}
