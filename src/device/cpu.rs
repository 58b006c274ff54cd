//! The CPU implementation of the seam's hot operations: each optimizer
//! family's update as one in-place pass over memory, on slices.
//!
//! These are the reference the CUDA kernels (`kernels/*.cu`) are tested
//! against: same formulas, same order of operations, f32 arithmetic for
//! f32/bf16/f16 parameters (f64 for f64), state in the arithmetic type.
//! Large tensors are split into spans processed by rayon's thread pool.

use half::{bf16, f16};
use rayon::prelude::*;

/// The arithmetic type of an update (`f32`, or `f64` for f64 parameters).
pub trait Real:
    Copy
    + Send
    + Sync
    + PartialOrd
    + std::ops::Add<Output = Self>
    + std::ops::Sub<Output = Self>
    + std::ops::Mul<Output = Self>
    + std::ops::Div<Output = Self>
    + 'static
{
    /// From an f64 hyperparameter.
    fn of(x: f64) -> Self;
    /// Square root.
    fn sqrt(self) -> Self;
    /// Zero.
    fn zero() -> Self;
    /// Whether finite (not NaN, not ±Inf).
    fn finite(self) -> bool;
}

impl Real for f32 {
    fn of(x: f64) -> Self {
        x as f32
    }
    fn sqrt(self) -> Self {
        f32::sqrt(self)
    }
    fn zero() -> Self {
        0.0
    }
    fn finite(self) -> bool {
        self.is_finite()
    }
}

impl Real for f64 {
    fn of(x: f64) -> Self {
        x
    }
    fn sqrt(self) -> Self {
        f64::sqrt(self)
    }
    fn zero() -> Self {
        0.0
    }
    fn finite(self) -> bool {
        self.is_finite()
    }
}

/// A parameter element type and its arithmetic type.
pub trait Elem: Copy + Send + Sync + 'static {
    /// The arithmetic (and state) type.
    type A: Real;
    /// Widen to the arithmetic type.
    fn get(self) -> Self::A;
    /// Round from the arithmetic type.
    fn put(a: Self::A) -> Self;
}

impl Elem for f32 {
    type A = f32;
    fn get(self) -> f32 {
        self
    }
    fn put(a: f32) -> Self {
        a
    }
}

impl Elem for f64 {
    type A = f64;
    fn get(self) -> f64 {
        self
    }
    fn put(a: f64) -> Self {
        a
    }
}

impl Elem for bf16 {
    type A = f32;
    fn get(self) -> f32 {
        self.to_f32()
    }
    fn put(a: f32) -> Self {
        bf16::from_f32(a)
    }
}

impl Elem for f16 {
    type A = f32;
    fn get(self) -> f32 {
        self.to_f32()
    }
    fn put(a: f32) -> Self {
        f16::from_f32(a)
    }
}

/// Decay folded into an update of one parameter: `w ← scale·w − c·a bᵀ`,
/// elementwise `w[r, c] ← scale·w[r, c] − (coeff·a[r])·b[c]` over the matrix
/// view `(rows, cols)`.
#[derive(Clone, Copy, Debug)]
pub struct Decay<'a, A> {
    /// The factor on `w` (`1 − ηλ` for decoupled decay, 1 for none).
    pub scale: A,
    /// The rank-1 term `(coeff, a (rows), b (cols))`, for spectral decay.
    pub rank1: Option<(A, &'a [A], &'a [A])>,
}

impl<A: Real> Decay<'_, A> {
    /// No decay.
    pub fn none() -> Self {
        Self {
            scale: A::of(1.0),
            rank1: None,
        }
    }
}

/// Runs `f` compiled for AVX2 (eight f32 lanes where the baseline x86-64
/// build has SSE's four) when the CPU has it, else as built. The loops `f`
/// runs do the same IEEE operations in the same order either way (Rust
/// contracts no `a·b + c` into an FMA), so only the speed depends on it, not
/// a bit of the result. `f` is called from one place, so it is inlined into
/// the AVX2 function and compiled with its features.
#[inline(always)]
pub(crate) fn wide<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if wide_enabled() {
        // SAFETY: the CPU has AVX2 (checked by `wide_enabled`).
        return unsafe { avx2(f) };
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// Set to force the baseline code (the tests compare the two).
#[cfg(target_arch = "x86_64")]
static BASELINE_ONLY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn wide_enabled() -> bool {
    std::arch::is_x86_feature_detected!("avx2")
        && !BASELINE_ONLY.load(std::sync::atomic::Ordering::Relaxed)
}

/// Runs `f` with [`wide`] turned off (the baseline build's code) on every
/// thread, then turns it back on: for tests that compare the two.
#[cfg(all(test, target_arch = "x86_64"))]
pub(crate) fn baseline_only<R>(f: impl FnOnce() -> R) -> R {
    use std::sync::atomic::Ordering;
    BASELINE_ONLY.store(true, Ordering::SeqCst);
    let r = f();
    BASELINE_ONLY.store(false, Ordering::SeqCst);
    r
}

/// Elements per span when a tensor is split across threads.
const SPAN: usize = 1 << 15;
/// Below this many elements in a whole call, run on the calling thread.
pub(crate) const PARALLEL_MIN: usize = 1 << 17;

/// Runs `f(member, start, end)` over `[0, len)` of each member, in spans
/// aligned to `align` elements (a row, so a span sees whole rows of the
/// rank-1 term), in parallel when the call is large.
pub(crate) fn for_spans<F>(lens: &[(usize, usize)], f: F)
where
    F: Fn(usize, usize, usize) + Send + Sync,
{
    let total: usize = lens.iter().map(|l| l.0).sum();
    if total < PARALLEL_MIN {
        for (i, &(len, _)) in lens.iter().enumerate() {
            wide(
                #[inline(always)]
                || f(i, 0, len),
            );
        }
        return;
    }
    let mut spans = Vec::new();
    for (i, &(len, align)) in lens.iter().enumerate() {
        let step = SPAN.div_ceil(align.max(1)) * align.max(1);
        let mut s = 0;
        while s < len {
            spans.push((i, s, (s + step).min(len)));
            s += step;
        }
    }
    spans.par_iter().for_each(|&(i, s, e)| {
        wide(
            #[inline(always)]
            || f(i, s, e),
        )
    });
}

/// A raw pointer that may cross threads: each span touches a disjoint range.
#[derive(Clone, Copy)]
pub(crate) struct Ptr<T>(pub *mut T);
// SAFETY: used only to hand disjoint sub-ranges of one slice to rayon tasks.
unsafe impl<T> Send for Ptr<T> {}
unsafe impl<T> Sync for Ptr<T> {}

impl<T> Ptr<T> {
    pub(crate) fn of(s: &mut [T]) -> Self {
        Self(s.as_mut_ptr())
    }
    /// # Safety
    /// `[start, end)` must lie in the slice and be touched by no other task.
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn span(&self, start: usize, end: usize) -> &mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(start), end - start)
    }
}

/// Calls `f(row_scale_term, b_segment, start, end)` for each row segment of
/// `[start, end)` under the rank-1 term, or once without it.
#[inline(always)]
fn by_rows<A: Real>(
    decay: &Decay<'_, A>,
    start: usize,
    end: usize,
    mut f: impl FnMut(Option<(A, &[A])>, usize, usize),
) {
    match decay.rank1 {
        None => f(None, start, end),
        Some((coeff, a, b)) => {
            let cols = b.len();
            let mut s = start;
            while s < end {
                let r = s / cols;
                let c0 = s - r * cols;
                let e = (s + cols - c0).min(end);
                f(Some((coeff * a[r], &b[c0..c0 + (e - s)])), s, e);
                s = e;
            }
        }
    }
}

/// Runs `$body` for `$j in 0..$n` with `$wd` the decayed weight
/// `scale·w[j] − t·b[j]` (`− t·b[j]` only under a rank-1 term), one loop per
/// case so that the loop has no branch and vectorises.
macro_rules! for_decayed {
    ($n:expr, $w:ident, $scale:expr, $r1:expr, |$j:ident, $wd:ident| $body:block) => {
        // Slices cut to `n` up front, so the loop has no bounds checks and
        // vectorises.
        let $w = &mut $w[..$n];
        match $r1 {
            None => {
                for $j in 0..$n {
                    let $wd = $scale * $w[$j].get();
                    $body
                }
            }
            Some((t, b)) => {
                let b = &b[..$n];
                for $j in 0..$n {
                    let $wd = $scale * $w[$j].get() - t * b[$j];
                    $body
                }
            }
        }
    };
}

/// Panics unless every slice of a job has `n` elements (the gradient's or
/// direction's) and a rank-1 term spans them (`len(a)·len(b) = n`): the
/// tasks below cut their spans from raw pointers by `n`, so a shorter slice
/// would be written past its end.
fn assert_job<A>(who: &str, k: usize, n: usize, slices: &[(&str, usize)], decay: &Decay<'_, A>) {
    for &(what, len) in slices {
        assert!(
            len == n,
            "{who}: job {k}: {what} has {len} elements, the gradient or direction {n}"
        );
    }
    if let Some((_, a, b)) = decay.rank1 {
        assert!(
            a.len() * b.len() == n,
            "{who}: job {k}: spectral decay factors of {} and {} elements for {n}",
            a.len(),
            b.len()
        );
    }
}

/// AdamW hyperparameters of one step, per parameter (`lr_bc1 = η/(1 − β₁ᵗ)`,
/// `bc2_sqrt = √(1 − β₂ᵗ)`) and shared.
#[derive(Clone, Copy, Debug)]
pub struct AdamStep {
    /// `η / (1 − β₁ᵗ)`.
    pub lr_bc1: f64,
    /// `√(1 − β₂ᵗ)`.
    pub bc2_sqrt: f64,
}

/// One parameter of a multi-tensor AdamW update (slices of one tensor each).
#[derive(Debug)]
pub struct AdamJob<'a, P: Elem> {
    /// The parameter, updated in place.
    pub w: &'a mut [P],
    /// Its gradient.
    pub g: &'a [P],
    /// First moment, updated in place.
    pub m: &'a mut [P::A],
    /// Second moment, updated in place.
    pub v: &'a mut [P::A],
    /// This parameter's step factors.
    pub step: AdamStep,
    /// Decay folded into the update.
    pub decay: Decay<'a, P::A>,
}

/// One AdamW update in place (`torch.optim.AdamW` order of operations):
/// `m ← m + (g − m)(1 − β₁)`, `v ← v·β₂ + g²(1 − β₂)`,
/// `w ← decayed(w) − (m / (√v/bc2_sqrt + eps))·lr_bc1`.
/// Panics as [`adamw_multi`].
#[allow(clippy::too_many_arguments)]
pub fn adamw<P: Elem>(
    w: &mut [P],
    g: &[P],
    m: &mut [P::A],
    v: &mut [P::A],
    beta1: f64,
    beta2: f64,
    eps: f64,
    step: AdamStep,
    decay: Decay<'_, P::A>,
) {
    let job = AdamJob {
        w,
        g,
        m,
        v,
        step,
        decay,
    };
    adamw_multi(&mut [job], beta1, beta2, eps);
}

/// [`adamw`] over many parameters in one pass: their spans are spread over
/// the thread pool together (the multi-tensor update).
///
/// # Panics
/// When a job's `w`, `m` or `v` is not `g`'s length, or its rank-1 factors
/// do not span it.
pub fn adamw_multi<P: Elem>(jobs: &mut [AdamJob<'_, P>], beta1: f64, beta2: f64, eps: f64) {
    for (k, j) in jobs.iter().enumerate() {
        let lens = [("w", j.w.len()), ("m", j.m.len()), ("v", j.v.len())];
        assert_job("adamw_multi", k, j.g.len(), &lens, &j.decay);
    }
    struct Raw<P: Elem> {
        w: Ptr<P>,
        m: Ptr<P::A>,
        v: Ptr<P::A>,
    }
    // SAFETY: each task touches a disjoint span of one job's slices.
    unsafe impl<P: Elem> Sync for Raw<P> {}
    let raws: Vec<Raw<P>> = jobs
        .iter_mut()
        .map(|j| Raw {
            w: Ptr::of(j.w),
            m: Ptr::of(j.m),
            v: Ptr::of(j.v),
        })
        .collect();
    let lens: Vec<(usize, usize)> = jobs
        .iter()
        .map(|j| (j.g.len(), j.decay.rank1.map_or(1, |r| r.2.len())))
        .collect();
    let (b1, b2, e) = (P::A::of(1.0 - beta1), P::A::of(beta2), P::A::of(eps));
    let b2c = P::A::of(1.0 - beta2);
    let jobs = &*jobs;
    for_spans(
        &lens,
        #[inline(always)]
        |i, s, end| {
            let job = &jobs[i];
            let raw = &raws[i];
            let (lr, bc2) = (P::A::of(job.step.lr_bc1), P::A::of(job.step.bc2_sqrt));
            by_rows(
                &job.decay,
                s,
                end,
                #[inline(always)]
                |r1, s, end| {
                    // SAFETY: spans are disjoint ranges of the slices.
                    let (w, m, v) =
                        unsafe { (raw.w.span(s, end), raw.m.span(s, end), raw.v.span(s, end)) };
                    let g = &job.g[s..end];
                    let (scale, n) = (job.decay.scale, g.len());
                    let (m, v) = (&mut m[..n], &mut v[..n]);
                    for_decayed!(n, w, scale, r1, |j, wd| {
                        let gj = g[j].get();
                        let mj = m[j] + (gj - m[j]) * b1;
                        let vj = v[j] * b2 + gj * gj * b2c;
                        let denom = vj.sqrt() / bc2 + e;
                        w[j] = P::put(wd - (mj / denom) * lr);
                        m[j] = mj;
                        v[j] = vj;
                    });
                },
            );
        },
    );
}

/// One parameter of a multi-tensor SGD update.
#[derive(Debug)]
pub struct SgdJob<'a, P: Elem> {
    /// The parameter, updated in place.
    pub w: &'a mut [P],
    /// Its gradient.
    pub g: &'a [P],
    /// Momentum buffer (none without momentum), updated in place.
    pub buf: Option<&'a mut [P::A]>,
    /// Learning rate.
    pub lr: f64,
    /// Decay folded into the update.
    pub decay: Decay<'a, P::A>,
}

/// One SGD update in place (`torch.optim.SGD`, dampening 0): with a buffer,
/// `buf ← buf·μ + g` and `d = g + buf·μ` (Nesterov) or `d = buf`; without,
/// `d = g`; then `w ← decayed(w) − d·lr`. Panics as [`sgd_multi`].
#[allow(clippy::too_many_arguments)]
pub fn sgd<P: Elem>(
    w: &mut [P],
    g: &[P],
    buf: Option<&mut [P::A]>,
    momentum: f64,
    nesterov: bool,
    lr: f64,
    decay: Decay<'_, P::A>,
) {
    let job = SgdJob {
        w,
        g,
        buf,
        lr,
        decay,
    };
    sgd_multi(&mut [job], momentum, nesterov);
}

/// [`sgd`] over many parameters in one pass.
///
/// # Panics
/// When a job's `w` or buffer is not `g`'s length, or its rank-1 factors
/// do not span it.
pub fn sgd_multi<P: Elem>(jobs: &mut [SgdJob<'_, P>], momentum: f64, nesterov: bool) {
    for (k, j) in jobs.iter().enumerate() {
        let buf = j.buf.as_deref().map_or(j.g.len(), <[_]>::len);
        let lens = [("w", j.w.len()), ("the buffer", buf)];
        assert_job("sgd_multi", k, j.g.len(), &lens, &j.decay);
    }
    struct Raw<P: Elem> {
        w: Ptr<P>,
        b: Option<Ptr<P::A>>,
    }
    // SAFETY: each task touches a disjoint span of one job's slices.
    unsafe impl<P: Elem> Sync for Raw<P> {}
    let raws: Vec<Raw<P>> = jobs
        .iter_mut()
        .map(|j| Raw {
            w: Ptr::of(j.w),
            b: j.buf.as_deref_mut().map(Ptr::of),
        })
        .collect();
    let lens: Vec<(usize, usize)> = jobs
        .iter()
        .map(|j| (j.g.len(), j.decay.rank1.map_or(1, |r| r.2.len())))
        .collect();
    let mu = P::A::of(momentum);
    let jobs = &*jobs;
    for_spans(
        &lens,
        #[inline(always)]
        |i, s, end| {
            let job = &jobs[i];
            let raw = &raws[i];
            let lr = P::A::of(job.lr);
            by_rows(
                &job.decay,
                s,
                end,
                #[inline(always)]
                |r1, s, end| {
                    // SAFETY: spans are disjoint ranges of the slices.
                    let w = unsafe { raw.w.span(s, end) };
                    let g = &job.g[s..end];
                    let (scale, n) = (job.decay.scale, g.len());
                    match raw.b {
                        None => {
                            for_decayed!(n, w, scale, r1, |j, wd| {
                                w[j] = P::put(wd - g[j].get() * lr);
                            });
                        }
                        Some(bp) => {
                            // SAFETY: as above.
                            let buf = unsafe { bp.span(s, end) };
                            for_decayed!(n, w, scale, r1, |j, wd| {
                                let gj = g[j].get();
                                let bj = buf[j] * mu + gj;
                                let d = if nesterov { gj + bj * mu } else { bj };
                                w[j] = P::put(wd - d * lr);
                                buf[j] = bj;
                            });
                        }
                    }
                },
            );
        },
    );
}

/// One parameter of Muon's momentum: its gradient (or direction), its
/// buffer, and where its new direction goes.
#[derive(Debug)]
pub struct EmaJob<'a, P: Elem> {
    /// The incoming direction (the gradient).
    pub g: &'a [P],
    /// Momentum buffer, updated in place.
    pub buf: &'a mut [P::A],
    /// The new direction, written.
    pub out: &'a mut [P::A],
}

/// Muon's momentum in place, writing the direction: `buf ← buf + (g − buf)(1 − μ)`,
/// `out = g + (buf − g)·μ` (Nesterov) or `out = buf`. Panics as
/// [`ema_momentum_multi`].
pub fn ema_momentum<P: Elem>(
    g: &[P],
    buf: &mut [P::A],
    out: &mut [P::A],
    momentum: f64,
    nesterov: bool,
) {
    ema_momentum_multi(&mut [EmaJob { g, buf, out }], momentum, nesterov);
}

/// [`ema_momentum`] over many parameters in one pass.
///
/// # Panics
/// When a job's buffer or output is not `g`'s length.
pub fn ema_momentum_multi<P: Elem>(jobs: &mut [EmaJob<'_, P>], momentum: f64, nesterov: bool) {
    for (k, j) in jobs.iter().enumerate() {
        let lens = [("buf", j.buf.len()), ("out", j.out.len())];
        assert_job(
            "ema_momentum_multi",
            k,
            j.g.len(),
            &lens,
            &Decay::<P::A>::none(),
        );
    }
    // (momentum buffer, direction) of each job, raw so that spans can split them.
    type BufOut<A> = (Ptr<A>, Ptr<A>);
    let raws: Vec<BufOut<P::A>> = jobs
        .iter_mut()
        .map(|j| (Ptr::of(j.buf), Ptr::of(j.out)))
        .collect();
    let lens: Vec<(usize, usize)> = jobs.iter().map(|j| (j.g.len(), 1)).collect();
    let (mu, one_mu) = (P::A::of(momentum), P::A::of(1.0 - momentum));
    let jobs = &*jobs;
    for_spans(
        &lens,
        #[inline(always)]
        |i, s, end| {
            let (bp, op) = raws[i];
            // SAFETY: spans are disjoint ranges of the slices.
            let (b, o) = unsafe { (bp.span(s, end), op.span(s, end)) };
            let g = &jobs[i].g[s..end];
            for j in 0..g.len() {
                let gj = g[j].get();
                let bj = b[j] + (gj - b[j]) * one_mu;
                b[j] = bj;
                o[j] = if nesterov { gj + (bj - gj) * mu } else { bj };
            }
        },
    );
}

/// One parameter of a multi-tensor apply.
#[derive(Debug)]
pub struct ApplyJob<'a, P: Elem> {
    /// The parameter, updated in place.
    pub w: &'a mut [P],
    /// Its direction.
    pub d: &'a [P::A],
    /// The step length.
    pub alpha: f64,
    /// Decay folded into the update.
    pub decay: Decay<'a, P::A>,
}

/// Applies a direction in place: `w ← decayed(w) − d·alpha`. Panics as
/// [`apply_multi`].
pub fn apply<P: Elem>(w: &mut [P], d: &[P::A], alpha: f64, decay: Decay<'_, P::A>) {
    apply_multi(&mut [ApplyJob { w, d, alpha, decay }]);
}

/// [`apply`] over many parameters in one pass.
///
/// # Panics
/// When a job's `w` is not `d`'s length, or its rank-1 factors do not span
/// it.
pub fn apply_multi<P: Elem>(jobs: &mut [ApplyJob<'_, P>]) {
    for (k, j) in jobs.iter().enumerate() {
        assert_job("apply_multi", k, j.d.len(), &[("w", j.w.len())], &j.decay);
    }
    let raws: Vec<Ptr<P>> = jobs.iter_mut().map(|j| Ptr::of(j.w)).collect();
    let lens: Vec<(usize, usize)> = jobs
        .iter()
        .map(|j| (j.d.len(), j.decay.rank1.map_or(1, |r| r.2.len())))
        .collect();
    let jobs = &*jobs;
    for_spans(
        &lens,
        #[inline(always)]
        |i, s, end| {
            let job = &jobs[i];
            let alpha = P::A::of(job.alpha);
            by_rows(
                &job.decay,
                s,
                end,
                #[inline(always)]
                |r1, s, end| {
                    // SAFETY: spans are disjoint ranges of the slices.
                    let w = unsafe { raws[i].span(s, end) };
                    let d = &job.d[s..end];
                    let (scale, n) = (job.decay.scale, d.len());
                    for_decayed!(n, w, scale, r1, |j, wd| {
                        w[j] = P::put(wd - d[j] * alpha);
                    });
                },
            );
        },
    );
}

/// `x` widened to f32 (exact), across the thread pool when large.
pub fn widen<P: Elem<A = f32>>(x: &[P]) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    #[inline(always)]
    fn span<P: Elem<A = f32>>(x: &[P], out: &mut [f32]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = v.get();
        }
    }
    if x.len() < PARALLEL_MIN {
        wide(
            #[inline(always)]
            || span(x, &mut out),
        );
    } else {
        out.par_chunks_mut(SPAN)
            .zip(x.par_chunks(SPAN))
            .for_each(|(o, x)| {
                wide(
                    #[inline(always)]
                    || span(x, o),
                )
            });
    }
    out
}

/// A 16-bit float a parameter can be kept in beside an f32 master weight
/// (see [`round_all_into`] and [`all_round_to`]).
pub trait Half: Elem<A = f32> {
    /// The exponent bits (also the bits of +∞).
    const INF: u16;
    /// The bits.
    fn bits(self) -> u16;
    /// From bits.
    fn from_bits(b: u16) -> Self;
    /// The bits of `m` rounded to this type (to nearest, ties to even).
    fn round_bits(m: f32) -> u16;
}

impl Half for bf16 {
    const INF: u16 = 0x7F80;
    fn bits(self) -> u16 {
        self.to_bits()
    }
    fn from_bits(b: u16) -> Self {
        bf16::from_bits(b)
    }
    #[inline(always)]
    fn round_bits(m: f32) -> u16 {
        // `bf16::from_f32` without its branch, so that the loops vectorise:
        // add just under half a unit of the kept bits, plus the last kept
        // bit (ties to even), and truncate; a NaN keeps its sign and top
        // payload bits and is made quiet, as `half` does.
        let b = m.to_bits();
        let rounded = (b.wrapping_add(0x7FFF + ((b >> 16) & 1)) >> 16) as u16;
        let nan = (b & 0x7FFF_FFFF) > 0x7F80_0000;
        if nan {
            (b >> 16) as u16 | 0x0040
        } else {
            rounded
        }
    }
}

impl Half for f16 {
    const INF: u16 = 0x7C00;
    fn bits(self) -> u16 {
        self.to_bits()
    }
    fn from_bits(b: u16) -> Self {
        f16::from_bits(b)
    }
    fn round_bits(m: f32) -> u16 {
        f16::from_f32(m).to_bits()
    }
}

/// A parameter's slice, to write, for [`round_all_into`].
pub enum HalfMut<'a> {
    /// bf16 elements.
    BF16(&'a mut [bf16]),
    /// f16 elements.
    F16(&'a mut [f16]),
}

/// A parameter's slice, to read, for [`all_round_to`].
pub enum HalfRef<'a> {
    /// bf16 elements.
    BF16(&'a [bf16]),
    /// f16 elements.
    F16(&'a [f16]),
}

impl HalfRef<'_> {
    fn len(&self) -> usize {
        match self {
            HalfRef::BF16(p) => p.len(),
            HalfRef::F16(p) => p.len(),
        }
    }
}

#[derive(Clone, Copy)]
enum HalfPtr {
    BF16(Ptr<bf16>),
    F16(Ptr<f16>),
}

/// `p ← m` rounded (to nearest, ties to even) for each pair: bf16/f16
/// parameters set from their f32 master weights, as one multi-tensor pass.
/// Panics unless each pair has one length.
pub fn round_all_into(ms: &[&[f32]], ps: &mut [HalfMut<'_>]) {
    let ptrs: Vec<(HalfPtr, usize)> = ps
        .iter_mut()
        .map(|p| match p {
            HalfMut::BF16(s) => (HalfPtr::BF16(Ptr::of(s)), s.len()),
            HalfMut::F16(s) => (HalfPtr::F16(Ptr::of(s)), s.len()),
        })
        .collect();
    for (m, (_, n)) in ms.iter().zip(&ptrs) {
        assert_eq!(m.len(), *n, "a master and its parameter differ in length");
    }
    #[inline(always)]
    fn span<P: Half>(m: &[f32], p: &mut [P]) {
        for (d, &s) in p.iter_mut().zip(m) {
            *d = P::from_bits(P::round_bits(s));
        }
    }
    let lens: Vec<(usize, usize)> = ptrs.iter().map(|&(_, n)| (n, 1)).collect();
    for_spans(
        &lens,
        #[inline(always)]
        |i, s, e| {
            let m = &ms[i][s..e];
            // SAFETY: spans of one member are disjoint, and each parameter is
            // its own slice.
            match ptrs[i].0 {
                HalfPtr::BF16(p) => span(m, unsafe { p.span(s, e) }),
                HalfPtr::F16(p) => span(m, unsafe { p.span(s, e) }),
            }
        },
    );
}

/// For each pair, whether every `p[i]` equals `m[i]` rounded, as numbers
/// (`+0 = −0`; a NaN equals nothing): whether a bf16/f16 parameter still
/// holds what its f32 master weight last set (`false` for a pair of two
/// lengths). One multi-tensor pass.
pub fn all_round_to(ms: &[&[f32]], ps: &[HalfRef<'_>]) -> Vec<bool> {
    use std::sync::atomic::{AtomicBool, Ordering};
    #[inline(always)]
    fn span<P: Half>(m: &[f32], p: &[P]) -> bool {
        // (no early exit: the loop vectorises)
        p.iter().zip(m).fold(true, |ok, (&d, &s)| {
            let (d, r) = (d.bits(), P::round_bits(s));
            let zeros = (d | r) & 0x7FFF == 0;
            let nan = (r & 0x7FFF) > P::INF;
            ok & ((d == r) | zeros) & !nan
        })
    }
    let ok: Vec<AtomicBool> = ms
        .iter()
        .zip(ps)
        .map(|(m, p)| AtomicBool::new(m.len() == p.len()))
        .collect();
    let lens: Vec<(usize, usize)> = ms
        .iter()
        .zip(&ok)
        .map(|(m, ok)| {
            (
                if ok.load(Ordering::Relaxed) {
                    m.len()
                } else {
                    0
                },
                1,
            )
        })
        .collect();
    for_spans(
        &lens,
        #[inline(always)]
        |i, s, e| {
            let m = &ms[i][s..e];
            let same = match &ps[i] {
                HalfRef::BF16(p) => span(m, &p[s..e]),
                HalfRef::F16(p) => span(m, &p[s..e]),
            };
            if !same {
                ok[i].store(false, Ordering::Relaxed);
            }
        },
    );
    ok.into_iter().map(AtomicBool::into_inner).collect()
}

/// Whether every element is finite (no NaN, no ±Inf).
pub fn all_finite<P: Elem>(x: &[P]) -> bool {
    // `v − v` is 0 for finite v and NaN otherwise; comparing the running sum
    // to itself keeps the loop branch-free (and vectorisable).
    // Eight independent running sums: one sum would chain every add on the
    // last (latency-bound, not vectorised); lanes let the loop run at
    // memory speed.
    #[inline(always)]
    fn check<P: Elem>(xs: &[P]) -> bool {
        const LANES: usize = 8;
        let mut acc = [P::A::zero(); LANES];
        let mut chunks = xs.chunks_exact(LANES);
        for c in &mut chunks {
            for (a, &v) in acc.iter_mut().zip(c) {
                let v = v.get();
                #[allow(clippy::eq_op)]
                let d = v - v;
                *a = *a + d;
            }
        }
        let mut tail = P::A::zero();
        for &v in chunks.remainder() {
            let v = v.get();
            #[allow(clippy::eq_op)]
            let d = v - v;
            tail = tail + d;
        }
        acc.iter().fold(tail, |s, &a| s + a).finite()
    }
    if x.len() < PARALLEL_MIN {
        return wide(
            #[inline(always)]
            || check(x),
        );
    }
    x.par_chunks(SPAN).all(|c| {
        wide(
            #[inline(always)]
            || check(c),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `widen` is exact (every bf16 and f16 bit pattern, NaN payloads
    /// included, serially and across parallel spans).
    #[test]
    fn widen_is_exact() {
        let n = PARALLEL_MIN + 3 * SPAN + 7;
        let b: Vec<bf16> = (0..n)
            .map(|i| bf16::from_bits((i % 65536) as u16))
            .collect();
        let h: Vec<f16> = (0..n).map(|i| f16::from_bits((i % 65536) as u16)).collect();
        for len in [0, 9, n] {
            let wb = widen(&b[..len]);
            let wh = widen(&h[..len]);
            for i in 0..len {
                assert_eq!(wb[i].to_bits(), b[i].to_f32().to_bits(), "bf16 {i}");
                assert_eq!(wh[i].to_bits(), h[i].to_f32().to_bits(), "f16 {i}");
            }
        }
    }

    /// `round_all_into` rounds as `half` does (to nearest, ties to even:
    /// the reference of candle's conversion; NaN, ±∞, overflow, subnormals
    /// and ±0 included), serially and across parallel spans of several
    /// members; `all_round_to` finds a single differing element anywhere,
    /// takes `−0` for `+0` and never matches a NaN.
    #[test]
    fn masters_round_and_are_checked_everywhere() {
        let specials = [
            f32::NAN,
            -f32::NAN,
            f32::from_bits(0x7F80_0001),
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            -f32::MAX,
            65520.0,
            1e-40,
            -1e-45,
            0.0,
            -0.0,
        ];
        let sizes = [0usize, 1, 9, 40, PARALLEL_MIN + 3 * SPAN + 7];
        let masters: Vec<Vec<f32>> = sizes
            .iter()
            .map(|&n| {
                (0..n)
                    .map(|i| match i % 97 {
                        k if k < specials.len() => specials[k],
                        _ => 1.0 + (i % 4099) as f32 * 2f32.powi(-12) - (i % 3) as f32,
                    })
                    .collect()
            })
            .collect();
        let ms: Vec<&[f32]> = masters.iter().map(|m| m.as_slice()).collect();
        let mut b: Vec<Vec<bf16>> = sizes.iter().map(|&n| vec![bf16::ZERO; n]).collect();
        let mut h: Vec<Vec<f16>> = sizes.iter().map(|&n| vec![f16::ZERO; n]).collect();
        // bf16 and f16 members alternate in one call
        let mut outs: Vec<HalfMut<'_>> = b
            .iter_mut()
            .zip(h.iter_mut())
            .enumerate()
            .map(|(k, (b, h))| match k % 2 {
                0 => HalfMut::BF16(b),
                _ => HalfMut::F16(h),
            })
            .collect();
        round_all_into(&ms, &mut outs);
        drop(outs);
        let refs: Vec<HalfRef<'_>> = (0..sizes.len())
            .map(|k| match k % 2 {
                0 => HalfRef::BF16(&b[k]),
                _ => HalfRef::F16(&h[k]),
            })
            .collect();
        for (k, m) in masters.iter().enumerate() {
            for (i, &s) in m.iter().enumerate() {
                let (got, want) = match k % 2 {
                    0 => (b[k][i].to_bits(), bf16::from_f32(s).to_bits()),
                    _ => (h[k][i].to_bits(), f16::from_f32(s).to_bits()),
                };
                assert_eq!(got, want, "member {k} element {i} ({s:e})");
            }
        }
        // every member matches unless it holds a NaN
        let has_nan: Vec<bool> = masters
            .iter()
            .map(|m| m.iter().any(|x| x.is_nan()))
            .collect();
        let ok = all_round_to(&ms, &refs);
        let want: Vec<bool> = has_nan.iter().map(|n| !n).collect();
        assert_eq!(ok, want);
        // ±0 alike; one changed element anywhere is found
        let zeros = [0.0f32, -0.0, 0.0];
        assert!(
            all_round_to(
                &[&zeros],
                &[HalfRef::BF16(&[bf16::NEG_ZERO, bf16::ZERO, bf16::NEG_ZERO])]
            )[0]
        );
        let finite: Vec<f32> = masters[4]
            .iter()
            .map(|x| if x.is_nan() { 1.0 } else { *x })
            .collect();
        let mut p: Vec<bf16> = finite.iter().map(|&x| bf16::from_f32(x)).collect();
        assert!(all_round_to(&[&finite], &[HalfRef::BF16(&p)])[0]);
        for at in [0, 12, p.len() / 2, p.len() - 1] {
            let old = p[at];
            p[at] = bf16::from_f32(old.to_f32() + 1.0);
            if p[at] != old {
                assert!(!all_round_to(&[&finite], &[HalfRef::BF16(&p)])[0], "{at}");
            }
            p[at] = old;
        }
    }

    /// Every position of a NaN, +∞ or −∞ is found, in the eight lanes, the
    /// tail and across parallel spans, in every parameter dtype.
    #[test]
    fn all_finite_finds_every_position() {
        fn check<P: Elem>(of: impl Fn(f32) -> P) {
            for n in [0usize, 1, 7, 8, 9, 17, 64, 67] {
                let xs: Vec<P> = (0..n).map(|i| of(i as f32 * 0.5 - 3.0)).collect();
                assert!(all_finite(&xs), "finite input of length {n}");
                for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                    for at in 0..n {
                        let mut ys = xs.clone();
                        ys[at] = of(bad);
                        assert!(!all_finite(&ys), "{bad} at {at} of {n} missed");
                    }
                }
            }
            // Large enough to be split across the thread pool.
            let n = PARALLEL_MIN * 3 + 5;
            let mut xs: Vec<P> = (0..n).map(|i| of((i % 97) as f32)).collect();
            assert!(all_finite(&xs));
            for at in [0, SPAN - 1, SPAN, n / 2, n - 1] {
                xs[at] = of(f32::NAN);
                assert!(!all_finite(&xs), "NaN at {at} of {n} missed");
                xs[at] = of(1.0);
            }
        }
        check(|x: f32| x);
        check(|x: f32| x as f64);
        check(half::bf16::from_f32);
        check(half::f16::from_f32);
    }

    /// The bytes of a slice, to compare results bit for bit.
    fn bytes<T>(x: &[T]) -> Vec<u8> {
        // SAFETY: plain float data, read as bytes.
        unsafe { std::slice::from_raw_parts(x.as_ptr().cast::<u8>(), std::mem::size_of_val(x)) }
            .to_vec()
    }

    /// The AVX2 build of the loops (`wide`) and the baseline build give the
    /// same bits: every update family, with and without the rank-1 term,
    /// on sizes with tails, on one thread and split over the pool, in every
    /// parameter dtype; and the CPU power iteration, tall and wide.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn the_avx2_loops_give_the_baseline_bits() {
        if !std::arch::is_x86_feature_detected!("avx2") {
            eprintln!("no AVX2 on this CPU: both builds are the baseline");
            return;
        }
        fn vals(n: usize, seed: u64) -> Vec<f64> {
            let mut x = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (0..n)
                .map(|_| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    ((x >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0
                })
                .collect()
        }
        /// All four families on members of `(rows, cols)`; every output's bytes.
        fn updates<P: Elem>(shapes: &[(usize, usize)], of: impl Fn(f64) -> P) -> Vec<Vec<u8>> {
            let a_of = |x: f64| P::A::of(x);
            let mut out = Vec::new();
            let mut w: Vec<Vec<P>> = shapes
                .iter()
                .enumerate()
                .map(|(i, &(r, c))| vals(r * c, i as u64).into_iter().map(&of).collect())
                .collect();
            let g: Vec<Vec<P>> = shapes
                .iter()
                .enumerate()
                .map(|(i, &(r, c))| {
                    vals(r * c, 50 + i as u64)
                        .into_iter()
                        .map(|x| of(x * 0.1))
                        .collect()
                })
                .collect();
            let mut m: Vec<Vec<P::A>> = shapes
                .iter()
                .map(|&(r, c)| vals(r * c, 7).into_iter().map(|x| a_of(x * 0.01)).collect())
                .collect();
            let mut v: Vec<Vec<P::A>> = shapes
                .iter()
                .map(|&(r, c)| {
                    vals(r * c, 8)
                        .into_iter()
                        .map(|x| a_of(x * x * 1e-3))
                        .collect()
                })
                .collect();
            let ra: Vec<Vec<P::A>> = shapes
                .iter()
                .map(|&(r, _)| vals(r, 9).into_iter().map(a_of).collect())
                .collect();
            let rb: Vec<Vec<P::A>> = shapes
                .iter()
                .map(|&(_, c)| vals(c, 10).into_iter().map(a_of).collect())
                .collect();
            // The rank-1 term on every other member (`odd`: the other half).
            let decay = |i: usize, odd: bool| Decay {
                scale: a_of(0.999),
                rank1: (i % 2 == usize::from(odd)).then(|| (a_of(0.003), &ra[i][..], &rb[i][..])),
            };
            let mut jobs: Vec<AdamJob<'_, P>> = w
                .iter_mut()
                .zip(&g)
                .zip(m.iter_mut().zip(v.iter_mut()))
                .enumerate()
                .map(|(i, ((w, g), (m, v)))| AdamJob {
                    w,
                    g,
                    m,
                    v,
                    step: AdamStep {
                        lr_bc1: 0.01,
                        bc2_sqrt: 0.3,
                    },
                    decay: decay(i, false),
                })
                .collect();
            adamw_multi(&mut jobs, 0.9, 0.999, 1e-8);
            drop(jobs);
            for nesterov in [false, true] {
                let mut jobs: Vec<SgdJob<'_, P>> = w
                    .iter_mut()
                    .zip(&g)
                    .zip(m.iter_mut())
                    .enumerate()
                    .map(|(i, ((w, g), buf))| SgdJob {
                        w,
                        g,
                        buf: Some(buf),
                        lr: 0.02,
                        decay: decay(i, true),
                    })
                    .collect();
                sgd_multi(&mut jobs, 0.9, nesterov);
                drop(jobs);
                let mut jobs: Vec<EmaJob<'_, P>> = g
                    .iter()
                    .zip(m.iter_mut().zip(v.iter_mut()))
                    .map(|(g, (buf, out))| EmaJob { g, buf, out })
                    .collect();
                ema_momentum_multi(&mut jobs, 0.95, nesterov);
            }
            let mut jobs: Vec<ApplyJob<'_, P>> = w
                .iter_mut()
                .zip(&v)
                .enumerate()
                .map(|(i, (w, d))| ApplyJob {
                    w,
                    d,
                    alpha: 0.05,
                    decay: decay(i, false),
                })
                .collect();
            apply_multi(&mut jobs);
            drop(jobs);
            out.extend(w.iter().map(|x| bytes(x)));
            out.extend(m.iter().chain(&v).map(|x| bytes(x)));
            out
        }
        // The switch itself: on (the AVX2 CPU has it) but inside
        // `baseline_only`, and on again after it, or the comparison compares
        // a build with itself.
        fn both<R: PartialEq + std::fmt::Debug>(what: &str, f: impl Fn() -> R) {
            assert!(wide_enabled(), "{what}: the AVX2 loops are not in use");
            let wide = f();
            let base = baseline_only(|| {
                assert!(!wide_enabled(), "{what}: baseline_only left AVX2 on");
                f()
            });
            assert!(wide_enabled(), "{what}: baseline_only left AVX2 off");
            assert!(wide == base, "{what}: the AVX2 loops changed the result");
        }
        // Tails of 1–7 elements, a row of 300 under the rank-1 term, and a
        // call large enough for the pool (> PARALLEL_MIN elements).
        let small = [(1, 1), (1, 7), (3, 5), (13, 300)];
        let large = [(512, 300), (3, 1000)];
        for shapes in [&small[..], &large[..]] {
            both("f32", || updates(shapes, |x| x as f32));
            both("f64", || updates(shapes, |x| x));
            both("bf16", || updates(shapes, half::bf16::from_f64));
            both("f16", || updates(shapes, half::f16::from_f64));
        }
        for (m, n) in [(300, 40), (40, 300), (1, 9), (9, 1), (700, 300)] {
            let w =
                candle_core::Tensor::from_vec(vals(m * n, 3), (m, n), &candle_core::Device::Cpu)
                    .unwrap();
            for w in [w.to_dtype(candle_core::DType::F32).unwrap(), w] {
                both("power iteration", || {
                    let t = crate::linalg::power_cpu::power_iteration_cpu(&w, None, 3).unwrap();
                    let f = |x: &candle_core::Tensor| {
                        x.flatten_all()
                            .unwrap()
                            .to_dtype(candle_core::DType::F64)
                            .unwrap()
                            .to_vec1::<f64>()
                            .unwrap()
                    };
                    (f(&t.sigma), f(&t.u), f(&t.v))
                });
            }
        }
    }
}
