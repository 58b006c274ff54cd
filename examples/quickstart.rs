//! Quickstart: Muon with spectral weight decay in a plain candle training loop.
//!
//! Fits a random "teacher" MLP with a student MLP and prints the loss falling.
//!
//!     cargo run --example quickstart

use anyhow::Result;
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{linear, Linear, Optimizer, VarBuilder, VarMap};
use steepest::{power_iteration, Muon, MuonConfig, WeightDecay};

struct Mlp {
    fc1: Linear,
    fc2: Linear,
    out: Linear,
}

impl Mlp {
    fn new(vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            fc1: linear(16, 64, vb.pp("fc1"))?,
            fc2: linear(64, 64, vb.pp("fc2"))?,
            out: linear(64, 4, vb.pp("out"))?,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = self.fc1.forward(x)?.gelu()?;
        let h = self.fc2.forward(&h)?.gelu()?;
        self.out.forward(&h)
    }
}

fn main() -> Result<()> {
    let device = Device::Cpu;
    // Data: a fixed random teacher network labels Gaussian inputs.
    let teacher_map = VarMap::new();
    let teacher = Mlp::new(VarBuilder::from_varmap(&teacher_map, DType::F32, &device))?;
    let x = Tensor::randn(0f32, 1.0, (512, 16), &device)?;
    let y = teacher.forward(&x)?.detach();

    // Student + optimizer: the hidden matrices go to Muon with spectral decay,
    // biases and the output layer to Muon's internal AdamW.
    let varmap = VarMap::new();
    let model = Mlp::new(VarBuilder::from_varmap(&varmap, DType::F32, &device))?;
    let mut opt = Muon::from_varmap(
        &varmap,
        MuonConfig {
            lr: 0.02,
            weight_decay: WeightDecay::spectral(0.1),
            adamw_names: vec!["out.".into()],
            ..MuonConfig::default()
        },
    )?;
    println!("Muon updates: {:?}", opt.muon_params());

    for step in 0..=300 {
        let loss = model.forward(&x)?.sub(&y)?.sqr()?.mean_all()?;
        if step % 30 == 0 {
            println!("step {step:4}  loss {:.5}", loss.to_scalar::<f32>()?);
        }
        opt.backward_step(&loss)?;
    }

    // Spectral decay keeps the top singular value of each hidden matrix in check.
    for name in ["fc1.weight", "fc2.weight"] {
        let w = varmap.data().lock().unwrap()[name].as_tensor().clone();
        let sigma = power_iteration(&w, None, 50)?.sigma.to_scalar::<f32>()?;
        let rms = w
            .sqr()?
            .mean(D::Minus1)?
            .mean_all()?
            .sqrt()?
            .to_scalar::<f32>()?;
        println!("{name}: σ₁ = {sigma:.3}, rms = {rms:.4}");
    }
    Ok(())
}
