//! Shared by the `distributed_*` tests: a stand-in [`ShardedStep`] (SGD with
//! momentum that keeps state only for the parameters it is given), seeded
//! gradients and the host reference of the in-process ranks' averaging.
#![allow(dead_code)]

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use half::bf16;
use steepest::distributed::ShardedStep;
use steepest::optim::NamedVar;

/// SGD with momentum, `m ← μ·m + g`, `w ← w − η·m`; momentum only for the
/// parameters it has stepped. All updates are computed before any is written,
/// so an error changes nothing.
pub struct MomentumSgd {
    pub vars: Vec<Var>,
    pub lr: f64,
    pub momentum: f64,
    pub state: BTreeMap<usize, Tensor>,
    /// The indices of every call, in order.
    pub calls: Vec<Vec<usize>>,
    /// Fail (without changing anything) on this call number.
    pub fail_on_call: Option<usize>,
}

impl MomentumSgd {
    pub fn new(vars: Vec<Var>) -> Self {
        Self {
            vars,
            lr: 0.05,
            momentum: 0.9,
            state: BTreeMap::new(),
            calls: Vec::new(),
            fail_on_call: None,
        }
    }

    /// The momentum buffers as host vectors, by parameter index.
    pub fn state_host(&self) -> BTreeMap<usize, Vec<f32>> {
        self.state.iter().map(|(i, t)| (*i, host(t))).collect()
    }
}

impl ShardedStep for MomentumSgd {
    fn step_subset(&mut self, grads: &[(usize, Tensor)]) -> steepest::Result<()> {
        let call = self.calls.len();
        self.calls.push(grads.iter().map(|(i, _)| *i).collect());
        if self.fail_on_call == Some(call) {
            return Err(steepest::Error::numerical("MomentumSgd", "planned failure"));
        }
        let mut staged = self.state.clone();
        let mut updates = Vec::new();
        for (i, g) in grads {
            let g = g.to_dtype(DType::F32)?;
            let m = match self.state.get(i) {
                Some(m) => ((m * self.momentum)? + &g)?,
                None => g,
            };
            let w = (self.vars[*i].as_tensor() - (&m * self.lr)?)?;
            staged.insert(*i, m);
            updates.push((*i, w));
        }
        for (i, w) in updates {
            // (an empty parameter has nothing to write; candle refuses to
            // set a variable from an empty tensor derived from it)
            if w.elem_count() > 0 {
                self.vars[i].set(&w)?;
            }
        }
        self.state = staged;
        Ok(())
    }
}

/// Any tensor as a host f32 vector (row-major).
pub fn host(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

/// Bit patterns, to compare floats exactly (NaN-safe, -0 ≠ +0).
pub fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Deterministic values for (seed, n), spanning magnitudes 1e-3 .. 1e2 with
/// both signs so that the order of a floating-point sum matters.
pub fn gvalues(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(0x632B_E59B_D9B4_E019);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            let u = (s >> 11) as f64 / (1u64 << 53) as f64; // [0, 1)
            let sign = if (s >> 3) & 1 == 0 { 1.0 } else { -1.0 };
            (sign * 10f64.powf(-3.0 + 5.0 * u)) as f32
        })
        .collect()
}

/// A seeded gradient of `dims` for (step, rank, param).
pub fn grad(step: usize, rank: usize, param: usize, dims: &[usize]) -> Tensor {
    let n = dims.iter().product();
    let seed = (step as u64) << 32 | (rank as u64) << 16 | param as u64;
    Tensor::from_vec(gvalues(seed, n), dims, &Device::Cpu).unwrap()
}

/// What the in-process ranks compute for an averaged gradient: the ranks'
/// values (missing = zeros) summed in rank order in f32, divided by N; with
/// `bf16`, each input rounded to bf16 first and the result rounded to bf16.
pub fn rank_order_avg(per_rank: &[Option<Tensor>], dims: &[usize], bf16_comm: bool) -> Tensor {
    let n: usize = dims.iter().product();
    let round = |x: f32| {
        if bf16_comm {
            bf16::from_f32(x).to_f32()
        } else {
            x
        }
    };
    let mut acc = vec![0f32; n];
    for (r, g) in per_rank.iter().enumerate() {
        let v = g.as_ref().map(host).unwrap_or_else(|| vec![0f32; n]);
        for (a, x) in acc.iter_mut().zip(v) {
            if r == 0 {
                *a = round(x);
            } else {
                *a += round(x);
            }
        }
    }
    let w = per_rank.len() as f32;
    let avg: Vec<f32> = acc.into_iter().map(|a| round(a / w)).collect();
    Tensor::from_vec(avg, dims, &Device::Cpu).unwrap()
}

/// Fresh `Var`s of these shapes, values from `seed`.
pub fn make_vars(shapes: &[Vec<usize>], seed: u64) -> Vec<Var> {
    shapes
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let n = d.iter().product();
            let v: Vec<f32> = gvalues(seed * 1000 + i as u64, n)
                .into_iter()
                .map(|x| x * 0.01)
                .collect();
            Var::from_tensor(&Tensor::from_vec(v, d.as_slice(), &Device::Cpu).unwrap()).unwrap()
        })
        .collect()
}

/// Named f32 variables of these shapes, values `0.01·gvalues(seed·1000 + i)`.
pub fn make_named(shapes: &[(&str, Vec<usize>)], seed: u64) -> Vec<NamedVar> {
    shapes
        .iter()
        .enumerate()
        .map(|(i, (name, d))| {
            let n = d.iter().product();
            let v: Vec<f32> = gvalues(seed * 1000 + i as u64, n)
                .into_iter()
                .map(|x| x * 0.01)
                .collect();
            let t = Tensor::from_vec(v, d.as_slice(), &Device::Cpu).unwrap();
            NamedVar {
                name: name.to_string(),
                var: Var::from_tensor(&t).unwrap(),
            }
        })
        .collect()
}

/// One step of the single-process reference: every rank's gradient of every
/// parameter at `step`; `None` when any of them is not finite (the step is
/// refused), else the rank-order average ([`rank_order_avg`]) of each
/// parameter some rank has a gradient for, by parameter index.
pub fn averaged_step(
    world: usize,
    shapes: &[Vec<usize>],
    step: usize,
    grads: &(dyn Fn(usize, usize, usize) -> Option<Tensor> + Sync),
    bf16_comm: bool,
) -> Option<Vec<(usize, Tensor)>> {
    let per: Vec<Vec<Option<Tensor>>> = (0..shapes.len())
        .map(|i| (0..world).map(|r| grads(step, r, i)).collect())
        .collect();
    let finite = per
        .iter()
        .flatten()
        .flatten()
        .all(|g| host(g).iter().all(|x| x.is_finite()));
    finite.then(|| {
        per.iter()
            .enumerate()
            .filter(|(_, per_rank)| per_rank.iter().any(|g| g.is_some()))
            .map(|(i, per_rank)| (i, rank_order_avg(per_rank, &shapes[i], bf16_comm)))
            .collect()
    })
}

/// The variables named `p0`, `p1`, … in order.
pub fn named_p(vars: &[Var]) -> Vec<(String, Var)> {
    vars.iter()
        .enumerate()
        .map(|(i, v)| (format!("p{i}"), v.clone()))
        .collect()
}

/// Every variable as a host vector.
pub fn params_host(vars: &[Var]) -> Vec<Vec<f32>> {
    vars.iter().map(|v| host(v.as_tensor())).collect()
}

/// Bit patterns of each vector ([`bits`]).
pub fn bits_of(params: &[Vec<f32>]) -> Vec<Vec<u32>> {
    params.iter().map(|p| bits(p)).collect()
}
