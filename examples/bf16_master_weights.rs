//! bf16 weights with and without f32 master weights, beside f32 weights.
//!
//! Fits a random "teacher" MLP with a student MLP whose weights are kept in
//! f32, in bf16, and in bf16 with f32 master weights
//! (`AdamW::with_master_weights`), AdamW under a cosine schedule down to a
//! small rate. The forward pass computes in f32 in all three (the weights
//! are cast), so the three differ in how the updates land in the weights
//! and in the gradients' rounding (the backward pass of the cast rounds a
//! bf16 weight's gradient to bf16, master weights or not). Seeded: the
//! same numbers every run.
//!
//!     cargo run --release --example bf16_master_weights

use anyhow::Result;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarMap;
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use steepest::schedule::{Schedule, Scheduled};
use steepest::{AdamW, AdamWConfig, WeightDecay};

const USAGE: &str = "\
bf16_master_weights: bf16 weights with and without f32 master weights.

A student MLP (32 -> 128 -> 8, tanh) fits a random teacher on 512 Gaussian
inputs (seeded) for 1000 AdamW steps, the rate cosine-decayed from 3e-3 to
1e-5, three times: weights in f32, in bf16, and in bf16 with f32 master
weights. Prints the training loss of each every 200 steps and how many bf16
weights the last 100 steps moved. A few seconds on the CPU; writes no files.

Usage: cargo run --release --example bf16_master_weights [-- --help]
";

const STEPS: usize = 1000;

fn gaussian(rng: &mut StdRng, dims: (usize, usize), scale: f64) -> Result<Tensor> {
    let v: Vec<f32> = (0..dims.0 * dims.1)
        .map(|_| {
            let x: f64 = StandardNormal.sample(rng);
            (x * scale) as f32
        })
        .collect();
    Ok(Tensor::from_vec(v, dims, &Device::Cpu)?)
}

/// `tanh(x W₁ᵀ) W₂ᵀ`, computed in f32 whatever the weights' dtype.
fn forward(w1: &Tensor, w2: &Tensor, x: &Tensor) -> Result<Tensor> {
    let (w1, w2) = (w1.to_dtype(DType::F32)?, w2.to_dtype(DType::F32)?);
    Ok(x.matmul(&w1.t()?)?.tanh()?.matmul(&w2.t()?)?)
}

fn main() -> Result<()> {
    if std::env::args().skip(1).any(|a| a == "--help" || a == "-h") {
        print!("{USAGE}");
        return Ok(());
    }
    if let Some(a) = std::env::args().nth(1) {
        anyhow::bail!("unknown argument {a:?}\n\n{USAGE}");
    }
    let mut rng = StdRng::seed_from_u64(7);
    let x = gaussian(&mut rng, (512, 32), 1.0)?;
    let (t1, t2) = (
        gaussian(&mut rng, (128, 32), 0.25)?,
        gaussian(&mut rng, (8, 128), 0.15)?,
    );
    let y = forward(&t1, &t2, &x)?;
    let init = [
        gaussian(&mut rng, (128, 32), 0.25)?,
        gaussian(&mut rng, (8, 128), 0.1)?,
    ];
    let runs = [
        ("f32", DType::F32, false),
        ("bf16", DType::BF16, false),
        ("bf16 + f32 master weights", DType::BF16, true),
    ];
    let mut curves = Vec::new();
    let mut moved = Vec::new();
    for &(_, dtype, master) in &runs {
        // Every run starts from the same (bf16-representable) weights.
        let varmap = VarMap::new();
        let vars: Vec<Var> = init
            .iter()
            .map(|t| Var::from_tensor(&t.to_dtype(DType::BF16)?.to_dtype(dtype)?))
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
        let mut adamw = AdamW::from_varmap(&varmap, config)?;
        if master {
            adamw = adamw.with_master_weights();
        }
        let mut opt = Scheduled::new(adamw, Schedule::cosine(3e-3, 1e-5, STEPS)?);
        let mut curve = Vec::new();
        let mut before_tail = None;
        for step in 0..STEPS {
            if step == STEPS - 100 {
                // (a copy: to_dtype to the same dtype shares the storage)
                before_tail = Some(vars[0].as_tensor().to_dtype(DType::F32)?.copy()?);
            }
            let pred = forward(vars[0].as_tensor(), vars[1].as_tensor(), &x)?;
            let loss = (pred - &y)?.sqr()?.mean_all()?;
            if step % 200 == 0 {
                curve.push(loss.to_scalar::<f32>()?);
            }
            opt.step(&loss.backward()?)?;
        }
        let pred = forward(vars[0].as_tensor(), vars[1].as_tensor(), &x)?;
        curve.push((pred - &y)?.sqr()?.mean_all()?.to_scalar::<f32>()?);
        let now = vars[0].as_tensor().to_dtype(DType::F32)?;
        let changed = now
            .ne(&before_tail.expect("set"))?
            .to_dtype(DType::F32)?
            .sum_all()?
            .to_scalar::<f32>()?;
        curves.push(curve);
        moved.push(changed as usize);
    }
    println!(
        "training loss (mean squared error) of a 32-128-8 student, AdamW, cosine 3e-3 -> 1e-5"
    );
    print!("{:>6}", "step");
    for (name, ..) in &runs {
        print!("  {name:>26}");
    }
    println!();
    for k in 0..curves[0].len() {
        print!("{:>6}", (k * 200).min(STEPS));
        for c in &curves {
            print!("  {:>26.6}", c[k]);
        }
        println!();
    }
    print!("{:>6}", "moved");
    for m in &moved {
        print!("  {:>26}", format!("{m} of {}", 128 * 32));
    }
    println!("\n(moved: entries of w1 that changed over the last 100 steps)");
    Ok(())
}
