//! Steepest descent on manifolds, on problems with known answers:
//!
//! 1. the Rayleigh quotient `min wᵀAw` on the sphere `‖w‖₂ = 1` → `λ_min(A)`;
//! 2. `min tr(WᵀAW)` on the Stiefel manifold `WᵀW = I` → the sum of the `k`
//!    smallest eigenvalues of `A`;
//! 3. `min ½‖W − B‖_F²` on the spectral sphere `‖W‖₂ = r`, with
//!    `σ₁(B) > r > σ₂(B)` → `½(σ₁(B) − r)²` (`W* = B` with `σ₁` set to `r`).
//!
//! The optima come from an f64 eigendecomposition / SVD (nalgebra). Per step
//! the table prints the constraint error, the tangent residual of the step's
//! direction (`Steepest::tangent_residuals`; "—" where the direction is
//! tangent by construction) and the gap to the optimum.
//!
//! Near an optimum the gradient is normal to the manifold (`G = WS`, `S`
//! symmetric, on the Stiefel manifold; `G ∝ Θ` on the spectral sphere), so
//! the normalised `Ĝ` is almost all normal part, which the multiplier has to
//! cancel: `Ĝ + WX` (or `Ĝ + λΘ`) is then a vanishing matrix, its `msign` an
//! arbitrary unit direction, and the residual loses its meaning (it reads
//! ≈ 2√k, or 1). Steps stay `η` long (normalised steepest descent) and the
//! decaying `η` is what converges. The spectral sphere's dual solved per step
//! (`DualAscent::bracket`) stays tangent there too: its direction is the
//! exactly tangent combination of two `msign`s.
//!
//!     cargo run --example manifolds

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::Optimizer;
use nalgebra::{DMatrix, DVector};
use rand::{rngs::StdRng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use steepest::optim::NamedVar;
use steepest::{DualAscent, Manifold, NewtonSchulz, Norm, Steepest, SteepestConfig};

const STEPS: usize = 300;
const SHOW: [usize; 9] = [1, 5, 10, 25, 50, 100, 150, 200, 300];

const USAGE: &str = "\
manifolds: steepest descent on manifolds, on problems with known optima.

1. min w'Aw on the sphere ||w||_2 = 1 (optimum: the smallest eigenvalue of A),
   by normalized SGD without and with Nesterov momentum;
2. min tr(W'AW) on the Stiefel manifold W'W = I (optimum: the sum of the 4
   smallest eigenvalues), by Muon on Stiefel with 1, 5 and sign dual steps;
3. min 1/2 ||W - B||_F^2 on the spectral sphere ||W||_2 = r, by Muon on the
   spectral sphere with 1 and 5 dual steps and with the dual solved per step
   (DualAscent::bracket).

Each run takes 300 steps with a decaying learning rate and prints, at steps
1, 5, 10, 25, 50, 100, 150, 200 and 300: the learning rate, the constraint
error, the tangent residual of the step's direction and the gap to the
optimum (computed in f64). Seeded: the same numbers every run. A few seconds
on the CPU after the build; writes no files.

Usage: cargo run --example manifolds [-- --help]
";

fn gaussian(r: &mut StdRng, m: usize, n: usize) -> DMatrix<f64> {
    DMatrix::from_fn(m, n, |_, _| StandardNormal.sample(r))
}

fn orthogonal(r: &mut StdRng, n: usize) -> DMatrix<f64> {
    gaussian(r, n, n).qr().q()
}

fn to_tensor(a: &DMatrix<f64>) -> Result<Tensor> {
    let (m, n) = a.shape();
    let v: Vec<f32> = (0..m)
        .flat_map(|i| (0..n).map(move |j| a[(i, j)] as f32))
        .collect();
    Tensor::from_vec(v, (m, n), &Device::Cpu)
}

fn to_matrix(t: &Tensor) -> Result<DMatrix<f64>> {
    let (m, n) = t.dims2()?;
    let v = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    Ok(DMatrix::from_row_slice(m, n, &v))
}

fn spectrum(a: &DMatrix<f64>) -> Vec<f64> {
    let mut s: Vec<f64> = a
        .clone()
        .symmetric_eigen()
        .eigenvalues
        .iter()
        .copied()
        .collect();
    s.sort_by(|x, y| x.partial_cmp(y).unwrap());
    s
}

/// Runs `opt` on `w` for `STEPS` steps with `lr_t = lr·decay^t`; `loss` builds
/// the loss, `row` computes `(constraint error, gap)` from the current value.
fn run(
    title: &str,
    w: &Var,
    mut opt: Steepest,
    lr: f64,
    decay: f64,
    loss: impl Fn(&Tensor) -> Result<Tensor>,
    row: impl Fn(&DMatrix<f64>) -> (f64, f64),
) -> Result<()> {
    println!("  {title}");
    println!(
        "    {:>5} {:>9} {:>12} {:>12} {:>12}",
        "step", "lr", "constraint", "tangent res", "gap"
    );
    for t in 1..=STEPS {
        opt.set_learning_rate(lr * decay.powi(t as i32 - 1));
        opt.backward_step(&loss(w.as_tensor())?)?;
        if SHOW.contains(&t) {
            let (c, gap) = row(&to_matrix(w.as_tensor())?);
            let res = opt.tangent_residuals()?;
            let res = match res.first() {
                Some((_, r)) => format!("{r:12.2e}"),
                None => format!("{:>12}", "—"),
            };
            println!(
                "    {t:>5} {:>9.2e} {c:>12.2e} {res} {gap:>12.2e}",
                opt.learning_rate()
            );
        }
    }
    Ok(())
}

fn steepest(w: &Var, config: SteepestConfig) -> Result<Steepest> {
    Ok(Steepest::from_named(
        vec![NamedVar {
            name: "w".into(),
            var: w.clone(),
        }],
        config,
    )?)
}

fn main() -> Result<()> {
    quiet_broken_pipe();
    if let Some(arg) = std::env::args_os().nth(1) {
        if arg == "--help" || arg == "-h" {
            print!("{USAGE}");
            return Ok(());
        }
        eprintln!("manifolds: unexpected argument {arg:?} (it takes none; see --help)");
        std::process::exit(2);
    }

    let mut r = StdRng::seed_from_u64(7);

    // 1. Rayleigh quotient on the sphere.
    let n = 16;
    let eig: Vec<f64> = (0..n)
        .map(|i| -1.0 + 4.0 * i as f64 / (n - 1) as f64)
        .collect();
    let q = orthogonal(&mut r, n);
    let a = &q * DMatrix::from_diagonal(&DVector::from_vec(eig)) * q.transpose();
    let lmin = spectrum(&a)[0];
    let at = to_tensor(&a)?;
    let w0 = gaussian(&mut r, n, 1);
    println!("1. min wᵀAw on ‖w‖₂ = 1, A 16×16, λ_min = {lmin:.6} (f64 eigendecomposition)");
    for (name, momentum) in [
        ("normalized SGD", 0.0),
        ("normalized SGD, Nesterov 0.9", 0.9),
    ] {
        let w = Var::from_tensor(&to_tensor(&w0)?)?;
        let opt = steepest(
            &w,
            SteepestConfig {
                lr: 0.2,
                momentum,
                nesterov: momentum > 0.0,
                norm: Norm::Euclidean,
                manifold: Manifold::Sphere { radius: 1.0 },
                ..Default::default()
            },
        )?;
        run(
            name,
            &w,
            opt,
            0.2,
            0.98,
            |w| w.t()?.matmul(&at.matmul(w)?)?.sum_all(),
            |w| {
                let rq = (w.transpose() * &a * w)[(0, 0)];
                ((w.norm() - 1.0).abs(), rq - lmin)
            },
        )?;
    }

    // 2. Trace minimisation on the Stiefel manifold.
    let (n, k) = (16, 4);
    let eig: Vec<f64> = (0..n)
        .map(|i| -2.0 + 4.0 * i as f64 / (n - 1) as f64)
        .collect();
    let q = orthogonal(&mut r, n);
    let a = &q * DMatrix::from_diagonal(&DVector::from_vec(eig)) * q.transpose();
    let target: f64 = spectrum(&a)[..k].iter().sum();
    let at = to_tensor(&a)?;
    let eye = Tensor::eye(k, DType::F32, &Device::Cpu)?;
    let w0 = gaussian(&mut r, n, k);
    println!("\n2. min tr(WᵀAW) on WᵀW = I, A 16×16, W 16×4, Σ 4 smallest λ = {target:.6}");
    for (name, dual) in [
        ("Muon on Stiefel, 1 dual step", DualAscent::default()),
        (
            "Muon on Stiefel, 5 dual steps",
            DualAscent {
                steps: 5,
                ..Default::default()
            },
        ),
        (
            "Muon on Stiefel, sign dual steps (η₂ = 0.01)",
            DualAscent {
                lr: Some(0.01),
                sign: true,
                ..Default::default()
            },
        ),
    ] {
        let w = Var::from_tensor(&to_tensor(&w0)?)?;
        let opt = steepest(
            &w,
            SteepestConfig {
                lr: 0.1,
                momentum: 0.0,
                nesterov: false,
                norm: Norm::Spectral(NewtonSchulz::polar_express(8)),
                manifold: Manifold::Stiefel { transpose: false },
                dual,
                ..Default::default()
            },
        )?;
        run(
            name,
            &w,
            opt,
            0.1,
            0.985,
            |w| w.t()?.matmul(&at.matmul(w)?)?.mul(&eye)?.sum_all(),
            |w| {
                let dev = (w.transpose() * w - DMatrix::identity(k, k)).norm();
                (dev, (w.transpose() * &a * w).trace() - target)
            },
        )?;
    }

    // 3. Nearest point on the spectral sphere.
    let (m, n) = (12, 8);
    let s = [4.0, 2.5, 2.0, 1.5, 1.0, 0.5, 0.3, 0.1];
    let radius = 3.0;
    let u = orthogonal(&mut r, m).columns(0, n).into_owned();
    let v = orthogonal(&mut r, n);
    let b = &u * DMatrix::from_diagonal(&DVector::from_row_slice(&s)) * v.transpose();
    let best: f64 = 0.5 * (s[0] - radius).powi(2);
    let bt = to_tensor(&b)?;
    let w0 = gaussian(&mut r, m, n);
    println!("\n3. min ½‖W − B‖_F² on ‖W‖₂ = {radius}, B 12×8, optimum ½(σ₁ − r)² = {best:.6}");
    for (name, dual) in [
        (
            "Muon on the spectral sphere, 1 dual step",
            DualAscent::default(),
        ),
        (
            "… 5 dual steps",
            DualAscent {
                steps: 5,
                ..Default::default()
            },
        ),
        (
            "… the dual solved per step (bracket, ≤ 8 msigns)",
            DualAscent {
                bracket: Some(8),
                ..Default::default()
            },
        ),
    ] {
        let w = Var::from_tensor(&to_tensor(&w0)?)?;
        let opt = steepest(
            &w,
            SteepestConfig {
                lr: 0.3,
                momentum: 0.0,
                nesterov: false,
                norm: Norm::Spectral(NewtonSchulz::polar_express(8)),
                manifold: Manifold::SpectralSphere { radius },
                dual,
                ..Default::default()
            },
        )?;
        run(
            name,
            &w,
            opt,
            0.3,
            0.98,
            |w| (w - &bt)?.sqr()?.sum_all()? * 0.5,
            |w| {
                let s1 = w.clone().svd(false, false).singular_values.max();
                ((s1 - radius).abs(), 0.5 * (w - &b).norm_squared() - best)
            },
        )?;
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
