//! Quickstart: Muon with spectral weight decay in a plain candle training loop.
//!
//! Fits a random "teacher" MLP with a student MLP and prints the loss falling.
//! Everything random comes from one seeded generator, so the numbers are the
//! same on every run.
//!
//!     cargo run --example quickstart

use anyhow::Result;
use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{linear, Linear, Optimizer, VarBuilder, VarMap};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use steepest::{power_iteration, Muon, MuonConfig, WeightDecay};

const USAGE: &str = "\
quickstart: Muon with spectral weight decay in a plain candle training loop.

A student MLP (16 -> 64 -> 64 -> 4, GELU) fits a random teacher of the same
shape on 512 Gaussian inputs (seeded: the same numbers every run). Prints
which parameters Muon updates, the loss every 30 steps up to step 300, then
the top singular value and RMS of the two hidden weight matrices. A few
seconds on the CPU after the build; writes no files.

Usage: cargo run --example quickstart [-- --help]
";

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

/// Redraws every `linear` layer of `varmap` from `rng` with candle's default
/// initialisation (weights `N(0, 2/fan_in)`, biases `U(±1/√fan_in)`): candle's
/// CPU generator cannot be seeded (`Device::Cpu.set_seed` is an error).
fn seeded_init(varmap: &VarMap, rng: &mut StdRng) -> Result<()> {
    let data = varmap.data().lock().unwrap();
    let mut layers: Vec<&str> = data
        .keys()
        .filter_map(|k| k.strip_suffix(".weight"))
        .collect();
    layers.sort(); // a HashMap's order changes from run to run
    for layer in layers {
        let w = &data[&format!("{layer}.weight")];
        let (fan_out, fan_in) = w.dims2()?;
        let std = (2.0 / fan_in as f32).sqrt();
        let ws = (0..fan_out * fan_in)
            .map(|_| std * Distribution::<f32>::sample(&StandardNormal, rng))
            .collect::<Vec<f32>>();
        w.set(&Tensor::from_vec(ws, (fan_out, fan_in), w.device())?)?;
        let b = &data[&format!("{layer}.bias")];
        let bound = 1.0 / (fan_in as f32).sqrt();
        let bs = (0..fan_out).map(|_| rng.gen_range(-bound..bound)).collect();
        b.set(&Tensor::from_vec(bs, fan_out, b.device())?)?;
    }
    Ok(())
}

fn main() -> Result<()> {
    quiet_broken_pipe();
    if let Some(arg) = std::env::args_os().nth(1) {
        if arg == "--help" || arg == "-h" {
            print!("{USAGE}");
            return Ok(());
        }
        eprintln!("quickstart: unexpected argument {arg:?} (it takes none; see --help)");
        std::process::exit(2);
    }

    let device = Device::Cpu;
    let mut rng = StdRng::seed_from_u64(0);
    // Data: a fixed random teacher network labels Gaussian inputs.
    let teacher_map = VarMap::new();
    let teacher = Mlp::new(VarBuilder::from_varmap(&teacher_map, DType::F32, &device))?;
    seeded_init(&teacher_map, &mut rng)?;
    let xs = (0..512 * 16)
        .map(|_| StandardNormal.sample(&mut rng))
        .collect::<Vec<f32>>();
    let x = Tensor::from_vec(xs, (512, 16), &device)?;
    let y = teacher.forward(&x)?.detach();

    // Student + optimizer: the hidden matrices go to Muon with spectral decay,
    // biases and the output layer to Muon's internal AdamW.
    let varmap = VarMap::new();
    let model = Mlp::new(VarBuilder::from_varmap(&varmap, DType::F32, &device))?;
    seeded_init(&varmap, &mut rng)?;
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
        if step < 300 {
            // (the loss after 300 steps printed, not a 301st step)
            opt.backward_step(&loss)?;
        }
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

/// Piped into `head`, the example ends quietly when the pipe closes (killed by
/// SIGPIPE, like other Unix tools) instead of panicking in `println!`.
fn quiet_broken_pipe() {
    // SAFETY: sets one signal back to its default action at the start of
    // `main`, before any other thread exists.
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}
