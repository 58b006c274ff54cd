//! Shared test helpers: seeded random tensors, f64 references (nalgebra),
//! scratch directories.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use nalgebra::{DMatrix, DVector};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

/// A seeded RNG.
pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// `n` standard normal samples.
pub fn normal_vec(rng: &mut StdRng, n: usize) -> Vec<f64> {
    (0..n).map(|_| StandardNormal.sample(rng)).collect()
}

/// A random standard-normal tensor of `shape` in `dtype` on the CPU.
pub fn randn(rng: &mut StdRng, shape: &[usize], dtype: DType) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec(normal_vec(rng, n), shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// Any tensor's elements, row-major, as f64.
pub fn to_f64_vec(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// A 2-D tensor as an f64 nalgebra matrix.
pub fn to_dmatrix(t: &Tensor) -> DMatrix<f64> {
    let (m, n) = t.dims2().unwrap();
    let v = to_f64_vec(t);
    DMatrix::from_row_slice(m, n, &v)
}

/// A 1-D tensor as an f64 nalgebra vector.
pub fn to_dvector(t: &Tensor) -> DVector<f64> {
    DVector::from_vec(to_f64_vec(t))
}

/// An f64 nalgebra matrix as an `(m, n)` tensor of `dtype`.
pub fn from_dmatrix(a: &DMatrix<f64>, dtype: DType) -> Tensor {
    let (m, n) = a.shape();
    let v: Vec<f64> = (0..m)
        .flat_map(|i| (0..n).map(move |j| (i, j)))
        .map(|(i, j)| a[(i, j)])
        .collect();
    Tensor::from_vec(v, (m, n), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// Singular values, descending.
pub fn singular_values(a: &DMatrix<f64>) -> Vec<f64> {
    let mut s: Vec<f64> = a
        .clone()
        .svd(false, false)
        .singular_values
        .iter()
        .copied()
        .collect();
    s.sort_by(|x, y| y.partial_cmp(x).unwrap());
    s
}

/// A random orthonormal `n × k` matrix (QR of a Gaussian), `k ≤ n`.
pub fn orthonormal(rng: &mut StdRng, n: usize, k: usize) -> DMatrix<f64> {
    let g = DMatrix::from_vec(n, k, normal_vec(rng, n * k));
    g.qr().q().columns(0, k).into_owned()
}

/// `U diag(s) Vᵀ` with random orthonormal `U (m × k)`, `V (n × k)`, `k = s.len()`.
pub fn with_singular_values(rng: &mut StdRng, m: usize, n: usize, s: &[f64]) -> DMatrix<f64> {
    let k = s.len();
    let u = orthonormal(rng, m, k);
    let v = orthonormal(rng, n, k);
    u * DMatrix::from_diagonal(&nalgebra::DVector::from_row_slice(s)) * v.transpose()
}

/// The exact polar factor `U Vᵀ` of a full-rank matrix, by f64 SVD.
pub fn polar(a: &DMatrix<f64>) -> DMatrix<f64> {
    let svd = a.clone().svd(true, true);
    svd.u.unwrap() * svd.v_t.unwrap()
}

/// `‖a − b‖_F / ‖b‖_F`.
pub fn rel_err(a: &DMatrix<f64>, b: &DMatrix<f64>) -> f64 {
    (a - b).norm() / b.norm().max(1e-300)
}

/// Max absolute difference of two tensors (any shape), in f64.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    let a = to_f64_vec(a);
    let b = to_f64_vec(b);
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(&b)
        .map(|(x, y)| nan_aware_diff(*x, *y))
        .fold(0.0, f64::max)
}

/// `|x − y|`, 0 where both are the same value (two NaNs, two equal
/// infinities), +∞ where only one is NaN or the infinities differ: `f64::max`
/// drops a NaN, so a plain `|x − y|` let a NaN pass as agreement.
pub fn nan_aware_diff(x: f64, y: f64) -> f64 {
    if x == y || (x.is_nan() && y.is_nan()) {
        0.0
    } else {
        let d = (x - y).abs();
        if d.is_nan() {
            f64::INFINITY
        } else {
            d
        }
    }
}

/// Symmetric eigendecomposition: eigenvalues ascending with their eigenvectors as columns.
pub fn sym_eig(a: &DMatrix<f64>) -> (Vec<f64>, DMatrix<f64>) {
    let e = a.clone().symmetric_eigen();
    let mut idx: Vec<usize> = (0..e.eigenvalues.len()).collect();
    idx.sort_by(|&i, &j| e.eigenvalues[i].partial_cmp(&e.eigenvalues[j]).unwrap());
    let vals = idx.iter().map(|&i| e.eigenvalues[i]).collect();
    let vecs = DMatrix::from_columns(
        &idx.iter()
            .map(|&i| e.eigenvectors.column(i).into_owned())
            .collect::<Vec<_>>(),
    );
    (vals, vecs)
}

/// The JSON header of a state dict (`__steepest__`).
pub fn header(state: &std::collections::HashMap<String, Tensor>) -> serde_json::Value {
    let bytes = state["__steepest__"].to_vec1::<u8>().unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

/// A state dict whose header was changed by `edit`.
pub fn with_header(
    state: &std::collections::HashMap<String, Tensor>,
    edit: impl FnOnce(&mut serde_json::Value),
) -> std::collections::HashMap<String, Tensor> {
    let mut h = header(state);
    edit(&mut h);
    let text = serde_json::to_vec(&h).unwrap();
    let n = text.len();
    let mut out = state.clone();
    out.insert(
        "__steepest__".into(),
        Tensor::from_vec(text, n, &Device::Cpu).unwrap(),
    );
    out
}

/// The minimiser of a convex `f` on `[lo, hi]` by golden-section search:
/// `iters` steps shrink the interval by 0.618 each (the result is good to
/// about `√ε` relative where `f` is flat at its minimum).
pub fn golden_argmin(f: impl Fn(f64) -> f64, lo: f64, hi: f64, iters: usize) -> f64 {
    let r = (5f64.sqrt() - 1.0) / 2.0;
    let (mut a, mut b) = (lo, hi);
    for _ in 0..iters {
        let c = b - r * (b - a);
        let d = a + r * (b - a);
        if f(c) < f(d) {
            b = d;
        } else {
            a = c;
        }
    }
    0.5 * (a + b)
}

/// A random symmetric `k × k` matrix (`(A + Aᵀ)·scale/2`, `A` Gaussian).
pub fn random_symmetric(r: &mut StdRng, k: usize, scale: f64) -> DMatrix<f64> {
    let a = DMatrix::from_vec(k, k, normal_vec(r, k * k));
    (&a + a.transpose()) * (0.5 * scale)
}

/// A fresh, empty directory `steepest-{suite}-{name}-{pid}` in the system's
/// temporary directory: one per test (tests run as threads of one process)
/// and per run.
pub fn scratch_dir(suite: &str, name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("steepest-{suite}-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `amax` that sees NaN, for differences checked against a tolerance:
/// nalgebra's `amax` folds with `f64::max`, which drops a NaN, so a NaN
/// entry read as agreement. Any NaN gives +∞.
pub trait AmaxNan {
    /// The largest absolute entry, +∞ if any entry is NaN.
    fn amax_nan(&self) -> f64;
}

impl<R: nalgebra::Dim, C: nalgebra::Dim, S: nalgebra::Storage<f64, R, C>> AmaxNan
    for nalgebra::Matrix<f64, R, C, S>
{
    fn amax_nan(&self) -> f64 {
        if self.iter().any(|x| x.is_nan()) {
            f64::INFINITY
        } else {
            self.amax()
        }
    }
}
