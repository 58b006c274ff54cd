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
//! `Partition` group); its biases run plain Adam. Row `t` of the table is the
//! weights after `t` steps: their loss and the `σ₁` of each constrained
//! matrix (by an f64 SVD). Row 0 is the start, off the sphere; from row 1 on
//! `σ₁` stays at `r`, and the example fails (exit code 1) if it ever strays
//! by more than `TOL`.
//!
//! ```sh
//! cargo run --example adam_sphere
//! ```

use std::process::ExitCode;

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
/// The largest `|σ₁ − r|` accepted after a step: the retraction is exact to
/// f32 rounding (a few units of 1e-7 at `r = 2`).
const TOL: f64 = 1e-5;

fn usage() -> String {
    format!(
        "\
adam_sphere: Adam followed by a retraction onto the spectral sphere ||W||_2 = r
(r = {RADIUS}), composed from the crate's transforms: Decay -> Adam -> Retract.

A two-layer tanh network (8 -> 16 -> 4) learns a teacher of the same shape;
its two weight matrices run the chain, its biases plain Adam. Prints a row
per step, t = 0 to {STEPS}: the loss and the top singular value of each weight
matrix after t steps; then the largest |sigma_1 - r| after any step, and
exits 1 if that exceeds {TOL:e}. Under a second on the CPU after the build;
writes no files.

Usage: cargo run --example adam_sphere [-- --help]
"
    )
}

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

fn main() -> steepest::Result<ExitCode> {
    quiet_broken_pipe();
    if let Some(arg) = std::env::args_os().nth(1) {
        if arg == "--help" || arg == "-h" {
            print!("{}", usage());
            return Ok(ExitCode::SUCCESS);
        }
        eprintln!("adam_sphere: unexpected argument {arg:?} (it takes none; see --help)");
        return Ok(ExitCode::from(2));
    }

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
    println!("row t: the weights after t steps (row 0: the start, off the sphere; r = {RADIUS})");
    println!(
        "{:>4}  {:>10}  {:>10}  {:>10}",
        "t", "loss", "σ₁(W₁)", "σ₁(W₂)"
    );
    let mut first = f64::NAN;
    let mut last = f64::NAN;
    // The largest |σ₁ − r| after a step (row 0, the start, is off the sphere).
    let mut worst: f64 = 0.0;
    for step in 0..=STEPS {
        let pred = forward(
            &x,
            w1.as_tensor(),
            b1.as_tensor(),
            w2.as_tensor(),
            b2.as_tensor(),
        )?;
        let loss = (pred - &y)?.sqr()?.mean_all()?;
        let l = loss.to_scalar::<f32>()? as f64;
        let (s1, s2) = (sigma1(w1.as_tensor())?, sigma1(w2.as_tensor())?);
        println!("{step:>4}  {l:>10.6}  {s1:>10.6}  {s2:>10.6}");
        if step == 0 {
            first = l;
        } else {
            for dev in [(s1 - RADIUS).abs(), (s2 - RADIUS).abs()] {
                // A NaN counts as a violation (`f64::max` would drop it).
                worst = if dev.is_nan() || dev > worst {
                    dev
                } else {
                    worst
                };
            }
        }
        last = l;
        if step < STEPS {
            opt.backward_step(&loss)?;
        }
    }
    println!("loss {first:.6} → {last:.6} in {STEPS} steps");
    let verdict = format!(
        "max |σ₁ − {RADIUS}| over steps 1–{STEPS}, both matrices: {worst:.1e} (tolerance {TOL:.0e})"
    );
    if worst.is_nan() || worst > TOL {
        eprintln!("error: {verdict}: the matrices left the sphere");
        return Ok(ExitCode::FAILURE);
    }
    println!("{verdict}: on the sphere");
    Ok(ExitCode::SUCCESS)
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
