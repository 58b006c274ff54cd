//! Peak heap bytes allocated during one optimizer step (a counting global
//! allocator; CPU): AdamW, AdamW + spectral decay, SGD with momentum, Muon,
//! over the bench model of `optim_step` (GPT-2-small matrix kinds scaled by
//! 1/4, 4 layers, 1.78 M parameters), after a warm-up step so that the
//! optimizer state exists.
//!
//!     cargo bench --bench step_memory
//!
//! Prints one line per optimizer: peak bytes above the level before the step,
//! and that peak per parameter. Only the public API that every version of the
//! crate has is used, so the same file measures an older checkout.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::Optimizer;
use steepest::optim::NamedVar;
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

fn params() -> (Vec<NamedVar>, GradStore, usize) {
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
            let b = Var::zeros(r, DType::F32, &dev).unwrap();
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
    let n = vars.iter().map(|v| v.var.elem_count()).sum();
    let mut loss = Tensor::new(0f32, &dev).unwrap();
    for nv in &vars {
        let g = Tensor::randn(0f32, 1.0, nv.var.shape(), &dev).unwrap();
        loss = (loss + (nv.var.as_tensor() * g).unwrap().sum_all().unwrap()).unwrap();
    }
    let grads = loss.backward().unwrap();
    (vars, grads, n)
}

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
    let (vars, grads, n) = params();
    println!("parameters: {n}");
    measure(
        "adamw",
        AdamW::from_named(vars.clone(), AdamWConfig::default()).unwrap(),
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
