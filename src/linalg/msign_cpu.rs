//! CPU fast path of `msign`: each Newton–Schulz step is three GEMMs with the
//! polynomial folded into their `dst ← α·dst + β·lhs·rhs` form —
//! `A = X Xᵀ`, `B = b·A + c·A·A`, `X ← a·X + B·X` — so the only passes outside
//! the products are two copies (`B ← A`, `X' ← X`), not five elementwise ops.
//! Same arithmetic as the generic path; tested against it and an f64 SVD.
//! Large products are threaded inside the GEMM; a batch of small matrices
//! (whose products run on one thread) is spread over the threads instead.

use candle_core::{Result, Storage, Tensor, WithDType};
use gemm::{gemm, Parallelism};
use rayon::prelude::*;

use super::newton_schulz::NewtonSchulz;

/// `msign` of a contiguous-or-not CPU tensor `(m, n)` / `(b, m, n)` of dtype `T`
/// (f32 or f64), returning a tensor of the same shape and dtype.
pub(crate) fn msign_cpu<T: WithDType>(g: &Tensor, ns: &NewtonSchulz) -> Result<Tensor> {
    let g = g.contiguous()?;
    let dims = g.dims().to_vec();
    let (m, n) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    let batch: usize = dims[..dims.len() - 2].iter().product();
    let (short, long) = (m.min(n), m.max(n));
    let tall = m > n;
    let mut out = vec![T::zero(); batch * m * n];
    {
        let (storage, layout) = g.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("steepest: msign_cpu: tensor is not on the CPU")
        };
        let (start, end) = layout.contiguous_offsets().ok_or_else(|| {
            candle_core::Error::Msg("steepest: msign_cpu: non-contiguous input".into())
        })?;
        let data = &cpu.as_slice::<T>()?[start..end];
        let restarts = ns.gram_restarts(m, n);
        let new_work = || Workspace::<T>::new(short, long, restarts.is_some());
        let one = |work: &mut Workspace<T>, (src, dst): (&[T], &mut [T])| {
            work.load(src, m, n, tall, ns);
            match restarts {
                None => work.iterate(ns),
                Some(restarts) => work.iterate_gram(ns, restarts),
            }
            work.store(dst, m, n, tall);
        };
        // Products this small run on one thread each (see `parallelism`):
        // then the batch members go to the threads instead. Each member's
        // arithmetic is the same either way.
        let threads = candle_core::utils::get_num_threads();
        if batch > 1 && threads > 1 && short * short * long < PARALLEL_MIN_MACS {
            let pairs = data
                .par_chunks_exact(m * n)
                .zip(out.par_chunks_exact_mut(m * n));
            pairs.for_each_init(new_work, one);
        } else {
            let mut work = new_work();
            let pairs = data.chunks_exact(m * n).zip(out.chunks_exact_mut(m * n));
            pairs.for_each(|p| one(&mut work, p));
        }
    }
    Tensor::from_vec(out, dims, g.device())
}

/// Buffers for one matrix on the short side: `X (s × l)`, `A, B (s × s)`;
/// for the Gram form also `Q`, its next value and `RZ` (`s × s`), with `A`
/// holding `R` and `B` holding `Z`.
struct Workspace<T> {
    s: usize,
    l: usize,
    x: Vec<T>,
    x_next: Vec<T>,
    a: Vec<T>,
    b: Vec<T>,
    q: Vec<T>,
    q_next: Vec<T>,
    rz: Vec<T>,
}

/// Products below this many multiply–adds run on one thread: measured with
/// `cargo bench --bench msign_share` on 2 cores, threading a 128³ product
/// made it 3× slower (2.95 ms vs 0.92 ms per msign), a 256³ one broke even
/// and a 512³ one gained 1.5×.
const PARALLEL_MIN_MACS: usize = 192 * 192 * 192;

fn parallelism(m: usize, n: usize, k: usize) -> Parallelism {
    match candle_core::utils::get_num_threads() {
        0 | 1 => Parallelism::None,
        _ if m * n * k < PARALLEL_MIN_MACS => Parallelism::None,
        t => Parallelism::Rayon(t),
    }
}

/// Row-major `dst (m × n) ← α·dst + β·lhs (m × k) · rhs (k × n)`; `rhs_t` reads
/// `rhs` as the transpose of a row-major `(n × k)` buffer.
#[allow(clippy::too_many_arguments)]
fn gemm_rm<T: WithDType>(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [T],
    read_dst: bool,
    lhs: &[T],
    rhs: &[T],
    rhs_t: bool,
    alpha: T,
    beta: T,
) {
    debug_assert!(dst.len() >= m * n && lhs.len() >= m * k && rhs.len() >= k * n);
    let (rhs_cs, rhs_rs) = if rhs_t {
        (k as isize, 1)
    } else {
        (1, n as isize)
    };
    // SAFETY: the slices hold the full row-major matrices described by the
    // strides (checked above in debug builds), and dst does not alias lhs/rhs.
    unsafe {
        gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            n as isize,
            read_dst,
            lhs.as_ptr(),
            1,
            k as isize,
            rhs.as_ptr(),
            rhs_cs,
            rhs_rs,
            alpha,
            beta,
            false,
            false,
            false,
            parallelism(m, n, k),
        )
    }
}

impl<T: WithDType> Workspace<T> {
    fn new(s: usize, l: usize, gram: bool) -> Self {
        let square = |on: bool| vec![T::zero(); if on { s * s } else { 0 }];
        Self {
            s,
            l,
            x: vec![T::zero(); s * l],
            x_next: vec![T::zero(); s * l],
            a: square(true),
            b: square(true),
            q: square(gram),
            q_next: square(gram),
            rz: square(gram),
        }
    }

    /// `X ← G / (‖G‖_F·scale + eps)`, transposed to the short side (0 for
    /// `G = 0`, also with `eps = 0`).
    fn load(&mut self, src: &[T], m: usize, n: usize, tall: bool, ns: &NewtonSchulz) {
        let mut norm = src
            .iter()
            .map(|v| v.to_f64() * v.to_f64())
            .sum::<f64>()
            .sqrt();
        if norm.is_infinite() || norm < 1e-150 {
            // f64 entries beyond ~1e154 overflow the sum of squares, and
            // below ~1e-162 their squares flush to 0 (a zero norm, and with
            // eps = 0 a zero output): scale by the largest entry first
            // (only then, to spare a pass).
            let amax = src.iter().fold(0f64, |a, v| a.max(v.to_f64().abs()));
            if amax.is_finite() {
                let s = src.iter().map(|v| (v.to_f64() / amax).powi(2)).sum::<f64>();
                norm = amax * s.sqrt();
            }
        }
        let denom = norm * ns.norm_scale() + ns.eps();
        let inv = if denom > 0.0 { 1.0 / denom } else { 0.0 };
        if tall {
            for i in 0..m {
                for j in 0..n {
                    self.x[j * m + i] = T::from_f64(src[i * n + j].to_f64() * inv);
                }
            }
        } else {
            for (x, v) in self.x.iter_mut().zip(src) {
                *x = T::from_f64(v.to_f64() * inv);
            }
        }
    }

    fn iterate(&mut self, ns: &NewtonSchulz) {
        let (s, l) = (self.s, self.l);
        for &[ca, cb, cc] in ns.coefficients() {
            self.gram_of_x();
            self.poly_of_a(cb, cc);
            // X' = a·X + B·X
            self.x_next.copy_from_slice(&self.x);
            let (one, ca) = (T::one(), T::from_f64(ca));
            gemm_rm(
                s,
                l,
                s,
                &mut self.x_next,
                true,
                &self.b,
                &self.x,
                false,
                ca,
                one,
            );
            std::mem::swap(&mut self.x, &mut self.x_next);
        }
    }

    /// `A = X Xᵀ`.
    fn gram_of_x(&mut self) {
        let (s, l) = (self.s, self.l);
        gemm_rm(
            s,
            s,
            l,
            &mut self.a,
            false,
            &self.x,
            &self.x,
            true,
            T::zero(),
            T::one(),
        );
    }

    /// `B = b·A + c·A·A`.
    fn poly_of_a(&mut self, cb: f64, cc: f64) {
        let s = self.s;
        let cb = T::from_f64(cb);
        if cc == 0.0 {
            for (b, a) in self.b.iter_mut().zip(&self.a) {
                *b = *a * cb;
            }
        } else {
            self.b.copy_from_slice(&self.a);
            let cc = T::from_f64(cc);
            gemm_rm(s, s, s, &mut self.b, true, &self.a, &self.a, false, cb, cc);
        }
    }

    /// The Gram form (see `GramNewtonSchulz`): `R` in `a`, `Z` in `b`.
    fn iterate_gram(&mut self, ns: &NewtonSchulz, restarts: &[usize]) {
        let s = self.s;
        let table = ns.coefficients();
        let one = T::one();
        self.gram_of_x();
        let mut have_q = false;
        for (k, &[ca, cb, cc]) in table.iter().enumerate() {
            if have_q && restarts.contains(&k) {
                self.apply_q();
                self.gram_of_x();
                have_q = false;
            }
            self.poly_of_a(cb, cc);
            let ca = T::from_f64(ca);
            // Q = Z + a·I on a segment's first step, else Q ← a·Q + Q·Z
            if have_q {
                self.q_next.copy_from_slice(&self.q);
                gemm_rm(
                    s,
                    s,
                    s,
                    &mut self.q_next,
                    true,
                    &self.q,
                    &self.b,
                    false,
                    ca,
                    one,
                );
                std::mem::swap(&mut self.q, &mut self.q_next);
            } else {
                self.q.copy_from_slice(&self.b);
                for i in 0..s {
                    self.q[i * s + i] += ca;
                }
                have_q = true;
            }
            // R ← (Z + aI)·R·(Z + aI), unless the segment ends here
            if k + 1 < table.len() && !restarts.contains(&(k + 1)) {
                self.rz.copy_from_slice(&self.a);
                gemm_rm(
                    s,
                    s,
                    s,
                    &mut self.rz,
                    true,
                    &self.a,
                    &self.b,
                    false,
                    ca,
                    one,
                );
                self.a.copy_from_slice(&self.rz);
                gemm_rm(
                    s,
                    s,
                    s,
                    &mut self.a,
                    true,
                    &self.b,
                    &self.rz,
                    false,
                    ca,
                    one,
                );
            }
        }
        if have_q {
            self.apply_q();
        }
    }

    /// `X ← Q·X`.
    fn apply_q(&mut self) {
        let (s, l) = (self.s, self.l);
        gemm_rm(
            s,
            l,
            s,
            &mut self.x_next,
            false,
            &self.q,
            &self.x,
            false,
            T::zero(),
            T::one(),
        );
        std::mem::swap(&mut self.x, &mut self.x_next);
    }

    fn store(&self, dst: &mut [T], m: usize, n: usize, tall: bool) {
        if tall {
            for i in 0..m {
                for j in 0..n {
                    dst[i * n + j] = self.x[j * m + i];
                }
            }
        } else {
            dst.copy_from_slice(&self.x);
        }
    }
}
