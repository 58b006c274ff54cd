//! A composition no alias offers: Adam's preconditioning followed by a
//! retraction onto the spectral sphere `‖W‖₂ = r`, written as a chain of the
//! crate's public transforms:
//!
//! ```text
//! Decay → Adam → Retract { SpectralSphere { r } }
//! ```
//!
//! A two-layer tanh network (8 → 16 → 4) learns a teacher of the same shape
//! whose two weight matrices have spectral norm `r`, from synthetic data
//! built in. The student's weight matrices run the chain above (one
//! `Partition` group); its biases run plain Adam. Every step prints the loss
//! and `σ₁` of each constrained matrix (by an f64 SVD), which stays at `r`.
//!
//! ```sh
//! cargo run --example adam_sphere
//! ```

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{Optimizer, VarMap};
use nalgebra::DMatrix;
use steepest::optim::transform::{Adam, Decay, Retract};
use steepest::optim::{Chain, Manifold, ParamInfo, Partition};
use steepest::WeightDecay;

/// The spectral-norm radius of teacher and student matrices.
const RADIUS: f64 = 2.0;
const SAMPLES: usize = 256;
const IN: usize = 8;
const HIDDEN: usize = 16;
const OUT: usize = 4;
const STEPS: usize = 100;
const LR: f64 = 0.01;

/// Deterministic uniform values in [-1, 1) (a 64-bit LCG).
fn uniform(seed: u64, n: usize) -> Vec<f64> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
        })
        .collect()
}

fn tensor(v: Vec<f64>, shape: &[usize]) -> steepest::Result<Tensor> {
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(DType::F32)?)
}

/// The largest singular value of a matrix, by an f64 SVD.
fn sigma1(w: &Tensor) -> steepest::Result<f64> {
    let (m, n) = w.dims2()?;
    let v = w.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let s = DMatrix::from_row_slice(m, n, &v).singular_values();
    Ok(s.iter().copied().fold(0.0, f64::max))
}

/// A random `rows × cols` matrix scaled to spectral norm `RADIUS`.
fn on_sphere(seed: u64, rows: usize, cols: usize) -> steepest::Result<Tensor> {
    let w = tensor(uniform(seed, rows * cols), &[rows, cols])?;
    let s = sigma1(&w)?;
    Ok((w * (RADIUS / s))?)
}

/// `tanh(x W₁ᵀ + b₁) W₂ᵀ + b₂`.
fn forward(
    x: &Tensor,
    w1: &Tensor,
    b1: &Tensor,
    w2: &Tensor,
    b2: &Tensor,
) -> steepest::Result<Tensor> {
    let h = x.matmul(&w1.t()?)?.broadcast_add(b1)?.tanh()?;
    Ok(h.matmul(&w2.t()?)?.broadcast_add(b2)?)
}

fn main() -> steepest::Result<()> {
    // Data: inputs in [-1, 1)⁸, targets from the teacher.
    let x = tensor(uniform(1, SAMPLES * IN), &[SAMPLES, IN])?;
    let (t1, t2) = (on_sphere(2, HIDDEN, IN)?, on_sphere(3, OUT, HIDDEN)?);
    let (tb1, tb2) = (
        tensor(uniform(4, HIDDEN), &[HIDDEN])?,
        tensor(uniform(5, OUT), &[OUT])?,
    );
    let y = forward(&x, &t1, &tb1, &t2, &tb2)?;

    // The student, off the sphere at the start.
    let varmap = VarMap::new();
    {
        let mut data = varmap.data().lock().expect("VarMap lock");
        let mut put = |name: &str, t: Tensor| -> steepest::Result<()> {
            data.insert(name.to_string(), Var::from_tensor(&t)?);
            Ok(())
        };
        put("l1.weight", tensor(uniform(6, HIDDEN * IN), &[HIDDEN, IN])?)?;
        put("l1.bias", tensor(vec![0.0; HIDDEN], &[HIDDEN])?)?;
        put(
            "l2.weight",
            tensor(uniform(7, OUT * HIDDEN), &[OUT, HIDDEN])?,
        )?;
        put("l2.bias", tensor(vec![0.0; OUT], &[OUT])?)?;
    }
    let get = |name: &str| varmap.data().lock().expect("VarMap lock")[name].clone();
    let (w1, b1, w2, b2) = (
        get("l1.weight"),
        get("l1.bias"),
        get("l2.weight"),
        get("l2.bias"),
    );

    // Matrices: decay, Adam, back onto ‖W‖₂ = r. Biases: Adam.
    let sphere = Chain::new()
        .then(Decay::new(WeightDecay::Decoupled(0.01), false)?)
        .then(Adam::default())
        .then(Retract::new(Manifold::SpectralSphere { radius: RADIUS })?);
    let plain = Chain::new().then(Adam::default());
    let mut opt = Partition::by(|p: &ParamInfo| if p.is_matrix() { "sphere" } else { "bias" })
        .group("sphere", sphere, LR)
        .group("bias", plain, LR)
        .build_from_varmap(&varmap)?;

    println!(
        "teacher: σ₁(W₁) = {:.6}, σ₁(W₂) = {:.6}",
        sigma1(&t1)?,
        sigma1(&t2)?
    );
    println!(
        "start:   σ₁(W₁) = {:.6}, σ₁(W₂) = {:.6} (r = {RADIUS})",
        sigma1(w1.as_tensor())?,
        sigma1(w2.as_tensor())?
    );
    println!(
        "{:>4}  {:>10}  {:>10}  {:>10}",
        "step", "loss", "σ₁(W₁)", "σ₁(W₂)"
    );
    let mut first = None;
    let mut last = 0.0;
    for step in 0..STEPS {
        let pred = forward(
            &x,
            w1.as_tensor(),
            b1.as_tensor(),
            w2.as_tensor(),
            b2.as_tensor(),
        )?;
        let loss = (pred - &y)?.sqr()?.mean_all()?;
        let l = loss.to_scalar::<f32>()? as f64;
        first.get_or_insert(l);
        opt.backward_step(&loss)?;
        last = l;
        println!(
            "{step:>4}  {l:>10.6}  {:>10.6}  {:>10.6}",
            sigma1(w1.as_tensor())?,
            sigma1(w2.as_tensor())?
        );
    }
    println!(
        "loss {:.6} → {last:.6}; both matrices stayed on ‖W‖₂ = {RADIUS}",
        first.unwrap_or(f64::NAN)
    );
    Ok(())
}
