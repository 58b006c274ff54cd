//! Test cases shared by the emulator tests (`kernels_emu.rs`) and the GPU
//! tests (`gpu_kernels.rs`): shapes, dtypes, decays, and seeded data.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor, Var};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};

/// A seeded RNG.
pub fn rng(seed: u64) -> StdRng {
    StdRng::seed_from_u64(seed)
}

/// A standard-normal tensor of `shape` in `dtype` on `dev`.
pub fn randn(r: &mut StdRng, shape: &[usize], dtype: DType, dev: &Device) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| StandardNormal.sample(r)).collect();
    Tensor::from_vec(v, shape, dev)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// A tensor of `|N(0, 1)|·scale` (second moments must be ≥ 0).
pub fn rand_pos(r: &mut StdRng, shape: &[usize], scale: f32, dev: &Device) -> Tensor {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            let x: f32 = StandardNormal.sample(r);
            x.abs() * scale
        })
        .collect();
    Tensor::from_vec(v, shape, dev).unwrap()
}

/// Shapes of the elementwise tests: lengths around the block (256) and the
/// chunk (4096), 1×n and n×1, rank 3, and tensors of several chunks.
pub const UPDATE_SHAPES: &[&[usize]] = &[
    &[1],
    &[3],
    &[255],
    &[256],
    &[257],
    &[1000],
    &[4095],
    &[4096],
    &[4097],
    &[1, 1],
    &[1, 777],
    &[777, 1],
    &[7, 13],
    &[33, 65],
    &[64, 64],
    &[3, 5, 7],
    &[2, 4097],
    &[4097, 2],
    &[100, 301],
    &[9, 1031],
    &[300, 300],
];

/// The parameter dtypes with kernels.
pub const DTYPES: &[DType] = &[DType::F32, DType::BF16, DType::F16];

/// Decay of a test case: none, decoupled, or decoupled plus rank-1.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum DecayKind {
    None,
    Decoupled,
    Rank1,
}

pub const DECAYS: &[DecayKind] = &[DecayKind::None, DecayKind::Decoupled, DecayKind::Rank1];

/// `(rows, cols)` of the matrix view (`cols` the last dimension).
pub fn matrix_view(shape: &[usize]) -> (usize, usize) {
    let cols = *shape.last().unwrap();
    (shape.iter().product::<usize>() / cols, cols)
}

/// The rank-1 factors `a (rows)`, `b (cols)` of a case, f32.
pub fn rank1_factors(r: &mut StdRng, shape: &[usize], dev: &Device) -> (Tensor, Tensor) {
    let (rows, cols) = matrix_view(shape);
    (
        randn(r, &[rows], DType::F32, dev),
        randn(r, &[cols], DType::F32, dev),
    )
}

/// One CPU parameter with everything any fused update family needs: its
/// gradient, two state tensors in the arithmetic dtype (AdamW's `m`, `v`;
/// SGD's or EMA's buffer is `s1`) and, for a rank-1 decay, its factors.
/// Shared by the emulator tests (`update.rs`, bit for bit) and the generic
/// path's tests (`generic_path.rs`, to rounding).
pub struct Member {
    pub w: Var,
    pub g: Tensor,
    pub s1: Var,
    pub s2: Var,
    pub r1: Option<(Tensor, Tensor)>,
    pub scale: f64,
    pub coeff: f64,
    pub lr: f64,
}

impl Member {
    /// Seeded values of `shape` in `dtype`, with `decay`.
    pub fn new(seed: u64, shape: &[usize], dtype: DType, decay: DecayKind) -> Self {
        let dev = Device::Cpu;
        let acc = steepest::device::math_dtype(dtype);
        let mut r = rng(seed);
        let w = var_on(&randn(&mut r, shape, dtype, &dev), &dev);
        let g = randn(&mut r, shape, dtype, &dev);
        let s1 = (randn(&mut r, shape, DType::F32, &dev) * 0.1).unwrap();
        let s2 = rand_pos(&mut r, shape, 0.01, &dev);
        let r1 = (decay == DecayKind::Rank1).then(|| {
            let (a, b) = rank1_factors(&mut r, shape, &dev);
            (a.to_dtype(acc).unwrap(), b.to_dtype(acc).unwrap())
        });
        Self {
            w,
            g,
            s1: var_on(&s1.to_dtype(acc).unwrap(), &dev),
            s2: var_on(&s2.to_dtype(acc).unwrap(), &dev),
            r1,
            scale: if decay == DecayKind::None {
                1.0
            } else {
                1.0 - 0.01 * 0.1
            },
            coeff: 0.03,
            lr: 0.01 + seed as f64 * 1e-4,
        }
    }

    /// Deep copies (another path's operands).
    pub fn copy(&self) -> Self {
        let dev = Device::Cpu;
        Self {
            w: var_on(self.w.as_tensor(), &dev),
            g: self.g.copy().unwrap(),
            s1: var_on(self.s1.as_tensor(), &dev),
            s2: var_on(self.s2.as_tensor(), &dev),
            r1: self.r1.clone(),
            ..*self
        }
    }

    pub fn decay(&self) -> steepest::device::DecayTerm<'_> {
        steepest::device::DecayTerm {
            scale: self.scale,
            rank1: self.r1.as_ref().map(|(a, b)| steepest::device::Rank1 {
                coeff: self.coeff,
                a,
                b,
            }),
        }
    }

    /// The AdamW item of step `t` with first-moment decay `beta1`.
    pub fn adam(&self, t: i32, beta1: f64) -> steepest::device::AdamItem<'_> {
        steepest::device::AdamItem {
            w: &self.w,
            g: &self.g,
            m: &self.s1,
            v: &self.s2,
            step: steepest::device::AdamStep {
                lr_bc1: self.lr / (1.0 - beta1.powi(t)),
                bc2_sqrt: (1.0 - 0.999f64.powi(t)).sqrt(),
            },
            decay: self.decay(),
        }
    }

    /// The SGD item, with or without momentum (`s1`).
    pub fn sgd(&self, momentum: bool) -> steepest::device::SgdItem<'_> {
        steepest::device::SgdItem {
            w: &self.w,
            g: &self.g,
            buf: momentum.then_some(&self.s1),
            lr: self.lr,
            decay: self.decay(),
        }
    }
}

/// A deep copy of a tensor as a new `Var` on `dev`.
pub fn var_on(t: &Tensor, dev: &Device) -> Var {
    Var::from_tensor(&t.to_device(dev).unwrap().copy().unwrap()).unwrap()
}

/// Bits of every element (f32/bf16/f16 widened losslessly to f32 bits).
pub fn bits(t: &Tensor) -> Vec<u32> {
    t.to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|x| x.to_bits())
        .collect()
}

/// Elements as f64.
pub fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap()
}

/// Largest `|a − b|`; infinite where one is NaN (or ±Inf) and the other is
/// not the same value (`f64::max` alone would skip a NaN and pass).
pub fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    let (a, b) = (f64s(a), f64s(b));
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(&b)
        .map(|(x, y)| {
            if x == y {
                0.0
            } else if (x - y).is_finite() {
                (x - y).abs()
            } else {
                f64::INFINITY
            }
        })
        .fold(0.0, f64::max)
}

/// Largest `|x|`; infinite if any element is NaN or ±Inf.
pub fn max_abs(a: &Tensor) -> f64 {
    f64s(a)
        .iter()
        .map(|x| {
            if x.is_finite() {
                x.abs()
            } else {
                f64::INFINITY
            }
        })
        .fold(0.0, f64::max)
}

/// Asserts equal bits, naming the first differing element.
pub fn assert_same_bits(what: &str, a: &Tensor, b: &Tensor) {
    let (x, y) = (bits(a), bits(b));
    assert_eq!(x.len(), y.len(), "{what}: lengths");
    if let Some(i) = (0..x.len()).find(|&i| x[i] != y[i]) {
        let diff = (0..x.len()).filter(|&i| x[i] != y[i]).count();
        panic!(
            "{what}: {diff} of {} elements differ, first at {i}: {} vs {}",
            x.len(),
            f32::from_bits(x[i]),
            f32::from_bits(y[i])
        );
    }
}

/// Shapes `(b, m, n)` of the power-iteration tests: 1×n, n×1, square, tall,
/// wide (so both the row and the column layouts of the Gram kernel), batch
/// 1 and many, lengths off the warp and block sizes.
pub const POWER_SHAPES: &[(usize, usize, usize)] = &[
    (1, 1, 1),
    (1, 1, 17),
    (1, 17, 1),
    (1, 1, 300),
    (1, 300, 1),
    (1, 8, 8),
    (1, 33, 31),
    (1, 31, 33),
    (1, 64, 16),
    (1, 16, 64),
    (1, 100, 257),
    (1, 257, 100),
    (1, 40, 40),
    (4, 20, 30),
    (4, 30, 20),
    (17, 5, 9),
    (17, 9, 5),
    (3, 1, 50),
    (3, 50, 1),
    (2, 129, 65),
    (2, 65, 129),
    (1, 200, 520),
];

/// Shapes `(b, m, n)` of the msign tests.
pub const MSIGN_SHAPES: &[(usize, usize, usize)] = &[
    (1, 1, 1),
    (1, 1, 17),
    (1, 17, 1),
    (1, 8, 8),
    (1, 32, 32),
    (1, 33, 33),
    (1, 40, 10),
    (1, 10, 40),
    (1, 50, 130),
    (1, 130, 50),
    (3, 20, 12),
    (3, 12, 20),
    (7, 5, 9),
    (2, 64, 64),
    (1, 3, 100),
    (1, 100, 3),
    (5, 16, 48),
    (1, 129, 140),
    (2, 37, 23),
    (1, 64, 200),
];

/// A matrix `(b, m, n)` with a clear top singular value: Gaussian plus a
/// rank-1 spike (so a few power iterations agree to tight tolerances).
pub fn spiked(r: &mut StdRng, b: usize, m: usize, n: usize, dtype: DType, dev: &Device) -> Tensor {
    let g = randn(r, &[b, m, n], DType::F32, &Device::Cpu);
    let u = randn(r, &[b, m, 1], DType::F32, &Device::Cpu);
    let v = randn(r, &[b, 1, n], DType::F32, &Device::Cpu);
    let s = (m.max(n) as f64).sqrt() * 0.5;
    let spike = (u.matmul(&v).unwrap() * s).unwrap();
    (g + spike)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
        .to_device(dev)
        .unwrap()
}

/// A random unit-ish start vector batch `(b, n)`.
pub fn start_vec(r: &mut StdRng, b: usize, n: usize, dev: &Device) -> Tensor {
    let v: Vec<f32> = (0..b * n).map(|_| r.gen_range(-1.0f32..1.0)).collect();
    Tensor::from_vec(v, (b, n), dev).unwrap()
}

/// An AdamW step whose item aliases its moments (`m` and `v` are one `Var`)
/// or whose gradient is its own parameter: `step` (the CPU path, the
/// emulator or the GPU, on `dev`) must refuse both with the seam's
/// "shares its storage" error and change nothing.
pub fn aliased_operands_are_refused_by(
    dev: &Device,
    step: impl Fn(&[steepest::device::AdamItem<'_>]) -> steepest::Result<()>,
) {
    use steepest::device::{AdamItem, AdamStep, DecayTerm};
    let mut r = rng(77);
    let w = var_on(&randn(&mut r, &[6, 5], DType::F32, &Device::Cpu), dev);
    let g = randn(&mut r, &[6, 5], DType::F32, &Device::Cpu)
        .to_device(dev)
        .unwrap();
    let m = var_on(&rand_pos(&mut r, &[6, 5], 0.1, &Device::Cpu), dev);
    let before = (f64s(w.as_tensor()), f64s(m.as_tensor()));
    let step_of = |w: &Var, g: &Tensor, m: &Var, v: &Var| {
        step(&[AdamItem {
            w,
            g,
            m,
            v,
            step: AdamStep {
                lr_bc1: 0.01,
                bc2_sqrt: 0.1,
            },
            decay: DecayTerm {
                scale: 1.0,
                rank1: None,
            },
        }])
    };
    for (what, res) in [
        ("m = v", step_of(&w, &g, &m, &m)),
        (
            "g = w",
            step_of(
                &w,
                w.as_tensor(),
                &m,
                &var_on(&m.as_tensor().copy().unwrap(), dev),
            ),
        ),
    ] {
        let e = res.expect_err(what).to_string();
        assert!(e.contains("shares its storage"), "{what}: {e}");
        assert_eq!(f64s(w.as_tensor()), before.0, "{what}: w changed");
        assert_eq!(f64s(m.as_tensor()), before.1, "{what}: m changed");
    }
}

/// Runs `f` on its own thread and fails the test if it has not returned
/// within 20 s (a deadlock on a storage lock would otherwise hang the test
/// binary); a panic in `f` fails the test with its own message.
pub fn within_deadline<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    let worker = std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(std::time::Duration::from_secs(20)) {
        Ok(v) => v,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("did not return within 20 s (deadlock on a shared storage?)")
        }
        // the worker panicked before sending: fail with its message
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => match worker.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => unreachable!("the worker sends before it returns"),
        },
    }
}
