//! An f16 model with and without dynamic loss scaling, beside f32.
//!
//! Fits a random "teacher" MLP with a student MLP run in f16 (weights,
//! inputs and activations), AdamW with f32 master weights, the loss a mean
//! over many small outputs computed in f32. The gradient of such a loss
//! with respect to each output is small (`2·error / outputs`), and in f16's
//! backward pass it and everything after it fall below f16's smallest
//! magnitudes: most weight gradients become exactly 0 and training stalls.
//! `LossScaler` scales the loss before `backward` and the gradients back
//! after it, in f32; the same model then trains as in f32. Seeded: the
//! same numbers every run.
//!
//!     cargo run --release --example f16_loss_scaling

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use steepest::loss_scale::{LossScaleConfig, LossScaler, ScaledStep};
use steepest::schedule::{Schedule, Scheduled};
use steepest::{AdamW, AdamWConfig, WeightDecay};

const USAGE: &str = "\
f16_loss_scaling: an f16 model with and without dynamic loss scaling.

A student MLP (32 -> 128 -> 8, tanh) fits a random teacher on 4096
Gaussian inputs (seeded) for 600 AdamW steps, the rate cosine-decayed from
3e-3 to 1e-5, three times: in f32; in f16 with f32 master weights; and in
f16 with master weights and a LossScaler (PyTorch's GradScaler defaults).
The teacher's outputs are small (about 0.01), and the loss, a mean over
all 4096 x 8 outputs, is computed in f32 in every run. Prints the training
loss of each every 100 steps, the share of w1's gradient entries that were
exactly 0 at the last step, and the scaler's final scale and skipped
steps. About half a minute on the CPU; writes no files.

Usage: cargo run --release --example f16_loss_scaling [-- --help]
";

const STEPS: usize = 600;
const EVERY: usize = 100;

fn gaussian(rng: &mut StdRng, dims: (usize, usize), scale: f64) -> Result<Tensor> {
    let v: Vec<f32> = (0..dims.0 * dims.1)
        .map(|_| {
            let x: f64 = StandardNormal.sample(rng);
            (x * scale) as f32
        })
        .collect();
    Ok(Tensor::from_vec(v, dims, &Device::Cpu)?)
}

/// `tanh(x W₁ᵀ) W₂ᵀ` in the weights' dtype, returned in f32 (the loss is
/// computed in f32: an f16 loss would carry the loss scale in f16).
fn forward(w1: &Tensor, w2: &Tensor, x: &Tensor) -> Result<Tensor> {
    let x = x.to_dtype(w1.dtype())?;
    let out = x.matmul(&w1.t()?)?.tanh()?.matmul(&w2.t()?)?;
    Ok(out.to_dtype(DType::F32)?)
}

/// The share of `g`'s entries that are exactly 0.
fn zero_share(g: &Tensor) -> Result<f64> {
    let zeros = g
        .eq(0.0)?
        .to_dtype(DType::F32)?
        .sum_all()?
        .to_scalar::<f32>()?;
    Ok(zeros as f64 / g.elem_count() as f64)
}

/// One run's record.
struct Run {
    curve: Vec<f32>,
    zero_grads: f64,
    scaler: Option<LossScaler>,
}

fn train(init: &[Tensor; 2], x: &Tensor, y: &Tensor, dtype: DType, scaled: bool) -> Result<Run> {
    let varmap = VarMap::new();
    let vars: Vec<Var> = init
        .iter()
        .map(|t| Var::from_tensor(&t.to_dtype(dtype)?))
        .collect::<candle_core::Result<_>>()?;
    for (name, v) in ["w1", "w2"].iter().zip(&vars) {
        varmap
            .data()
            .lock()
            .unwrap()
            .insert(name.to_string(), v.clone());
    }
    let config = AdamWConfig {
        lr: 3e-3,
        weight_decay: WeightDecay::None,
        ..Default::default()
    };
    // Master weights for f16 (a no-op for f32): the run without scaling
    // differs from the scaled one only in the scaling.
    let adamw = AdamW::from_varmap(&varmap, config)?.with_master_weights();
    let mut opt = Scheduled::new(adamw, Schedule::cosine(3e-3, 1e-5, STEPS)?);
    let mut scaler = if scaled {
        Some(LossScaler::new(LossScaleConfig::default())?)
    } else {
        None
    };
    let (mut curve, mut zero_grads) = (Vec::new(), 0.0);
    for step in 0..STEPS {
        let pred = forward(vars[0].as_tensor(), vars[1].as_tensor(), x)?;
        let loss = (pred - y)?.sqr()?.mean_all()?;
        if step % EVERY == 0 {
            curve.push(loss.to_scalar::<f32>()? * 1e6);
        }
        match scaler.as_mut() {
            None => {
                let grads = loss.backward()?;
                zero_grads = zero_share(grads.get(&vars[0]).expect("w1 has a gradient"))?;
                opt.try_step(&grads)?;
            }
            Some(scaler) => {
                let mut grads = scaler.scale_loss(&loss)?.backward()?;
                zero_grads = zero_share(grads.get(&vars[0]).expect("w1 has a gradient"))?;
                if let ScaledStep::Skipped { param } = scaler.step(&mut opt, &mut grads)? {
                    println!(
                        "  step {step}: gradient overflow in {param}, skipped; scale now {}",
                        scaler.scale()
                    );
                }
            }
        }
    }
    let pred = forward(vars[0].as_tensor(), vars[1].as_tensor(), x)?;
    curve.push((pred - y)?.sqr()?.mean_all()?.to_scalar::<f32>()? * 1e6);
    Ok(Run {
        curve,
        zero_grads,
        scaler,
    })
}

fn main() -> Result<()> {
    if std::env::args().skip(1).any(|a| a == "--help" || a == "-h") {
        print!("{USAGE}");
        return Ok(());
    }
    if let Some(a) = std::env::args().nth(1) {
        anyhow::bail!("unknown argument {a:?}\n\n{USAGE}");
    }
    let mut rng = StdRng::seed_from_u64(11);
    let x = gaussian(&mut rng, (4096, 32), 1.0)?;
    let (t1, t2) = (
        gaussian(&mut rng, (128, 32), 0.25)?,
        gaussian(&mut rng, (8, 128), 0.0015)?,
    );
    let y = forward(&t1, &t2, &x)?;
    // f16-representable starting weights, the same for every run.
    let init = [
        gaussian(&mut rng, (128, 32), 0.25)?.to_dtype(DType::F16)?,
        gaussian(&mut rng, (8, 128), 0.001)?.to_dtype(DType::F16)?,
    ];
    let names = ["f32", "f16, no loss scaling", "f16 + LossScaler"];
    let runs = [
        train(&init, &x, &y, DType::F32, false)?,
        train(&init, &x, &y, DType::F16, false)?,
        train(&init, &x, &y, DType::F16, true)?,
    ];
    println!(
        "training loss (mean squared error) x 1e6 of a 32-128-8 student, AdamW, cosine 3e-3 -> 1e-5"
    );
    print!("{:>6}", "step");
    for name in names {
        print!("  {name:>22}");
    }
    println!();
    for k in 0..runs[0].curve.len() {
        print!("{:>6}", (k * EVERY).min(STEPS));
        for r in &runs {
            print!("  {:>22.6}", r.curve[k]);
        }
        println!();
    }
    print!("{:>6}", "zeros");
    for r in &runs {
        print!("  {:>22}", format!("{:.1} %", 100.0 * r.zero_grads));
    }
    println!("\n(zeros: entries of w1's gradient that were exactly 0 at the last step)");
    if let Some(s) = &runs[2].scaler {
        println!(
            "loss scale at the end: {} ({} steps skipped)",
            s.scale(),
            s.skipped()
        );
    }
    Ok(())
}
