//! CPU fast path of the power iteration: the recurrences of
//! `power_iteration_generic` (same start, fallbacks and derived vectors) on
//! slices, so that each Gram step `WᵀW x` (or `W Wᵀ x` when wide) reads `W`
//! from memory once, where the generic path's two matrix–vector products read
//! it twice and allocate their results. Spectral decay runs one warm
//! iteration per matrix per step, so this pass is most of its cost.
//!
//! Only the summation order differs from the generic path (tested against it
//! on every shape kind and dtype, and against an f64 SVD). The work is cut
//! into pieces of a fixed size and their partial sums added in a fixed order,
//! so the result does not depend on the number of threads.

use candle_core::{DType, Device, Layout, Storage, Tensor, Var, WithDType};
use rayon::prelude::*;

use super::power_iteration::{check_start, default_start_values};
use super::TopSingular;
use crate::device::cpu::{wide, Real};
use crate::error::Result;

/// Elements of `W` per piece of work (128 KiB of f32): small enough to spread
/// a 192×768 matrix over a few threads, large enough to amortise a task.
const PIECE: usize = 32 * 1024;

/// The top singular triplet of a CPU tensor `(m, n)` / `(b, m, n)`, as
/// `power_iteration_generic` computes it: in f64 for f64 weights, else in
/// f32 (other float dtypes are converted first).
pub(crate) fn power_iteration_cpu(
    w: &Tensor,
    start: Option<&Tensor>,
    iters: usize,
) -> Result<TopSingular> {
    match w.dtype() {
        DType::F64 => top_of::<f64>(w, start, iters),
        _ => top_of::<f32>(w, start, iters),
    }
}

/// [`power_iteration_cpu`] of the batch the same-shape CPU matrices `ws`
/// would stack into, each read where it is (no stacked copy), each
/// warm-started from its state vector `vs[i]`, which then receives the new
/// v₁; results `(b,)`, `(b, m)`, `(b, n)`.
pub(crate) fn power_iteration_cpu_members(
    ws: &[Tensor],
    vs: &[Var],
    iters: usize,
) -> Result<TopSingular> {
    let starts: Vec<Tensor> = vs.iter().map(|v| v.as_tensor().clone()).collect();
    let top = match ws.first().map(|w| w.dtype()) {
        Some(DType::F64) => top_of_members::<f64>(ws, Some(&starts), iters)?,
        _ => top_of_members::<f32>(ws, Some(&starts), iters)?,
    };
    for (i, v) in vs.iter().enumerate() {
        v.set(&top.v.get(i)?.to_dtype(v.dtype())?)?;
    }
    Ok(top)
}

fn top_of<T>(w: &Tensor, start: Option<&Tensor>, iters: usize) -> Result<TopSingular>
where
    T: Real + WithDType,
{
    let (_, n) = super::matrix_dims("power_iteration: w", w)?;
    let batched = w.rank() == 3;
    let b = if batched { w.dim(0)? } else { 1 };
    check_start(start, batched, b, n)?;
    let starts = start
        .map(|s| {
            let s = s.reshape((b, n))?;
            (0..b)
                .map(|i| s.get(i))
                .collect::<candle_core::Result<Vec<_>>>()
        })
        .transpose()?;
    if batched {
        let w = w.contiguous()?;
        let members = (0..b)
            .map(|i| w.get(i))
            .collect::<candle_core::Result<Vec<_>>>()?;
        return top_of_members::<T>(&members, starts.as_deref(), iters);
    }
    let top = top_of_members::<T>(std::slice::from_ref(w), starts.as_deref(), iters)?;
    Ok(TopSingular {
        sigma: top.sigma.squeeze(0)?,
        u: top.u.squeeze(0)?,
        v: top.v.squeeze(0)?,
    })
}

/// The triplets of the matrices `ws`, each started from `starts[i]` (`(n,)`).
/// The callers have checked the matrices: at least one, all of one shape
/// (`device::power_iteration_members`, or the rows of one batch).
fn top_of_members<T>(ws: &[Tensor], starts: Option<&[Tensor]>, iters: usize) -> Result<TopSingular>
where
    T: Real + WithDType,
{
    let (b, (m, n)) = (ws.len(), ws[0].dims2()?);
    let convert = |ts: &[Tensor]| {
        ts.iter()
            .map(|t| t.to_dtype(T::DTYPE)?.contiguous())
            .collect::<candle_core::Result<Vec<_>>>()
    };
    let ws = convert(ws)?;
    let starts = starts.map(convert).transpose()?;
    let guards: Vec<_> = ws.iter().map(|w| w.storage_and_layout()).collect();
    let data = guards
        .iter()
        .map(|(s, l)| cpu_slice::<T>(s, l))
        .collect::<Result<Vec<_>>>()?;
    let start_guards: Vec<_> = starts
        .iter()
        .flatten()
        .map(|s| s.storage_and_layout())
        .collect();
    let start_data = start_guards
        .iter()
        .map(|(s, l)| cpu_slice::<T>(s, l))
        .collect::<Result<Vec<_>>>()?;
    let consts = Consts::<T>::new(m, n);
    // Small calls stay on this thread: waking the pool costs more than they
    // do (the rule of the CPU updates, `cpu::PARALLEL_MIN`).
    let parallel = b * m * n >= crate::device::cpu::PARALLEL_MIN;
    let tops = map_pieces(parallel, (0..b).collect(), |i| {
        let w = Mat {
            data: data[i],
            m,
            n,
            parallel,
        };
        w.top_singular(start_data.get(i).copied(), iters, &consts)
    });
    let sigma: Vec<T> = tops.iter().map(|t| t.0).collect();
    let u: Vec<T> = tops.iter().flat_map(|t| t.1.iter().copied()).collect();
    let v: Vec<T> = tops.iter().flat_map(|t| t.2.iter().copied()).collect();
    let dev = Device::Cpu;
    Ok(TopSingular {
        sigma: Tensor::from_vec(sigma, b, &dev)?,
        u: Tensor::from_vec(u, (b, m), &dev)?,
        v: Tensor::from_vec(v, (b, n), &dev)?,
    })
}

/// The elements of a contiguous CPU tensor's storage.
fn cpu_slice<'a, T: WithDType>(storage: &'a Storage, layout: &Layout) -> Result<&'a [T]> {
    let Storage::Cpu(cpu) = storage else {
        crate::error::fail!(Device, "power_iteration", "tensor is not on the CPU");
    };
    let (start, end) = layout
        .contiguous_offsets()
        .expect("power_iteration_cpu: made contiguous above");
    Ok(&cpu.as_slice::<T>()?[start..end])
}

/// The default unit start vectors of both sides and the smallest positive
/// normal of `T` (the norms' scale floor, as on the generic path).
struct Consts<T> {
    dflt_m: Vec<T>,
    dflt_n: Vec<T>,
    tiny: T,
}

impl<T: Real + WithDType> Consts<T> {
    fn new(m: usize, n: usize) -> Self {
        let unit = |k: usize| {
            let (vals, norm) = default_start_values(k);
            vals.iter().map(|x| T::of(x / norm)).collect()
        };
        Self {
            dflt_m: unit(m),
            dflt_n: unit(n),
            tiny: T::of(super::tiny(T::DTYPE)),
        }
    }
}

/// One row-major matrix `(m, n)`; its passes split over the pool when
/// `parallel`.
struct Mat<'a, T> {
    data: &'a [T],
    m: usize,
    n: usize,
    parallel: bool,
}

impl<T: Real> Mat<'_, T> {
    /// Runs the generic path's recurrences; returns `(σ, u, v)`.
    fn top_singular(
        &self,
        start: Option<&[T]>,
        iters: usize,
        c: &Consts<T>,
    ) -> (T, Vec<T>, Vec<T>) {
        let (m, n) = (self.m, self.n);
        // v₀: the start where finite and non-zero, else the default; normalised.
        let chosen = match start {
            Some(s) if s.iter().all(|x| x.finite()) && norm(s, c.tiny) > T::zero() => s,
            _ => &c.dflt_n[..],
        };
        let v0 = renormalized(chosen, &c.dflt_n, c.tiny);
        if n > m {
            // The iterate is u: u ← W v₀ / ‖W v₀‖, then u ← W Wᵀ u / ‖·‖.
            let mut x = renormalized(&self.times(&v0), &c.dflt_m, c.tiny);
            for _ in 0..iters {
                x = renormalized(&self.gram_wide(&x), &x, c.tiny);
            }
            let wtu = self.transpose_times(&x);
            let sigma = norm(&wtu, c.tiny);
            (sigma, x, renormalized(&wtu, &c.dflt_n, c.tiny))
        } else {
            // The iterate is v: v ← WᵀW v / ‖·‖; u = W v / σ.
            let mut x = v0;
            for _ in 0..iters {
                x = renormalized(&self.gram_tall(&x), &x, c.tiny);
            }
            let wv = self.times(&x);
            let sigma = norm(&wv, c.tiny);
            (sigma, unit_or(&wv, None, c.tiny), x)
        }
    }

    /// The row ranges of the pieces.
    fn row_pieces(&self) -> Vec<std::ops::Range<usize>> {
        let rows = (PIECE / self.n.max(1)).max(1);
        (0..self.m)
            .step_by(rows)
            .map(|r0| r0..(r0 + rows).min(self.m))
            .collect()
    }

    /// The column ranges of the blocks of the wide products: a block of all
    /// `m` rows stays in a 256 KiB cache between its two uses.
    fn col_blocks(&self) -> Vec<std::ops::Range<usize>> {
        let by_cache = (256 * 1024 / std::mem::size_of::<T>()) / self.m.max(1);
        let by_piece = PIECE / self.m.max(1);
        let cols = by_cache.min(by_piece).max(8);
        (0..self.n)
            .step_by(cols)
            .map(|c0| c0..(c0 + cols).min(self.n))
            .collect()
    }

    fn row(&self, r: usize) -> &[T] {
        &self.data[r * self.n..(r + 1) * self.n]
    }

    /// `W[r, cols]`.
    fn row_part(&self, r: usize, cols: &std::ops::Range<usize>) -> &[T] {
        &self.data[r * self.n + cols.start..r * self.n + cols.end]
    }

    /// `W x` (one dot product per row).
    fn times(&self, x: &[T]) -> Vec<T> {
        map_pieces(self.parallel, self.row_pieces(), |rows| {
            wide(
                #[inline(always)]
                || {
                    let mut y = Vec::with_capacity(rows.len());
                    for r in rows {
                        y.push(dot(self.row(r), x));
                    }
                    y
                },
            )
        })
        .concat()
    }

    /// `WᵀW x` for `n ≤ m`: `Σ_r (w_r·x) w_r`, each row read once from
    /// memory (its second use, right after the dot product, hits the cache).
    fn gram_tall(&self, x: &[T]) -> Vec<T> {
        let parts = map_pieces(self.parallel, self.row_pieces(), |rows| {
            wide(
                #[inline(always)]
                || {
                    let mut y = vec![T::zero(); self.n];
                    for r in rows {
                        axpy(&mut y, dot(self.row(r), x), self.row(r));
                    }
                    y
                },
            )
        });
        sum_in_order(parts, self.n)
    }

    /// `W[:, cols]ᵀ x`, row by row.
    #[inline(always)]
    fn block_transpose_times(&self, x: &[T], cols: &std::ops::Range<usize>) -> Vec<T> {
        let mut t = vec![T::zero(); cols.len()];
        for (r, &xr) in x.iter().enumerate() {
            axpy(&mut t, xr, self.row_part(r, cols));
        }
        t
    }

    /// `W Wᵀ x` for `n > m`, by blocks of columns `B`: `t = W[:, B]ᵀ x`,
    /// then `y += W[:, B] t`, the block read once from memory for both.
    fn gram_wide(&self, x: &[T]) -> Vec<T> {
        let parts = map_pieces(self.parallel, self.col_blocks(), |cols| {
            wide(
                #[inline(always)]
                || {
                    let t = self.block_transpose_times(x, &cols);
                    // A loop, not `map().collect()`, whose closure would be
                    // compiled outside the AVX2 function.
                    let mut y = Vec::with_capacity(self.m);
                    for r in 0..self.m {
                        y.push(dot(self.row_part(r, &cols), &t));
                    }
                    y
                },
            )
        });
        sum_in_order(parts, self.m)
    }

    /// `Wᵀ x` for `n > m`, by blocks of columns (each block its own part of
    /// the result).
    fn transpose_times(&self, x: &[T]) -> Vec<T> {
        map_pieces(self.parallel, self.col_blocks(), |cols| {
            wide(
                #[inline(always)]
                || self.block_transpose_times(x, &cols),
            )
        })
        .concat()
    }
}

/// `f` of each item, in order: on rayon's pool when `parallel`, else on this
/// thread. The items (pieces of work) are the same either way, so the
/// results are too.
fn map_pieces<I, R, F>(parallel: bool, items: Vec<I>, f: F) -> Vec<R>
where
    I: Send,
    R: Send,
    F: Fn(I) -> R + Send + Sync,
{
    if parallel {
        items.into_par_iter().map(f).collect()
    } else {
        items.into_iter().map(f).collect()
    }
}

/// The sum of equal-length vectors, added in their order.
fn sum_in_order<T: Real>(parts: Vec<Vec<T>>, len: usize) -> Vec<T> {
    let mut it = parts.into_iter();
    let mut acc = it.next().unwrap_or_else(|| vec![T::zero(); len]);
    for p in it {
        for (a, &b) in acc.iter_mut().zip(&p) {
            *a = *a + b;
        }
    }
    acc
}

/// `a · b` over eight independent lanes (so that the sum vectorises).
#[inline(always)]
fn dot<T: Real>(a: &[T], b: &[T]) -> T {
    let mut lanes = [T::zero(); 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail = ac
        .remainder()
        .iter()
        .zip(bc.remainder())
        .fold(T::zero(), |s, (&x, &y)| s + x * y);
    for (x, y) in ac.zip(bc) {
        let (x, y): (&[T; 8], &[T; 8]) = (x.try_into().unwrap(), y.try_into().unwrap());
        for l in 0..8 {
            lanes[l] = lanes[l] + x[l] * y[l];
        }
    }
    let pair = |i: usize| lanes[i] + lanes[i + 4];
    (pair(0) + pair(2)) + (pair(1) + pair(3)) + tail
}

/// `y ← y + c·x`.
#[inline(always)]
fn axpy<T: Real>(y: &mut [T], c: T, x: &[T]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = *y + c * x;
    }
}

/// `‖y‖`, scaled by the largest magnitude first (`d = max(max|yᵢ|, tiny)`,
/// `‖y‖ = d·‖y/d‖`) so that neither the squares nor their sum under- or
/// overflow: the generic path's `frobenius_keepdim`. NaN when `y` is not
/// finite.
fn norm<T: Real>(y: &[T], tiny: T) -> T {
    let (_, ns, d) = scaled(y, tiny);
    ns * d
}

/// `(s, ‖s‖, d)` with `s = y / d`, `d = max(max|yᵢ|, tiny)`: `y`'s direction
/// and norm with every entry of `s` at most 1 in magnitude. Where `y` is
/// subnormal `d` is the smallest normal, a power of two, so `s` is exact.
fn scaled<T: Real>(y: &[T], tiny: T) -> (Vec<T>, T, T) {
    let m = y.iter().fold(T::zero(), |a, &x| max(a, abs(x)));
    let d = max(m, tiny);
    let s: Vec<T> = y.iter().map(|&x| x / d).collect();
    let ns = dot(&s, &s).sqrt();
    (s, ns, d)
}

fn abs<T: Real>(x: T) -> T {
    if x < T::zero() {
        T::zero() - x
    } else {
        x
    }
}

fn max<T: Real>(a: T, b: T) -> T {
    if a > b {
        a
    } else {
        b
    }
}

/// `y / ‖y‖` as `s / ‖s‖` (`s = y / d`, [`scaled`]) where `‖y‖ > 0`, else
/// `keep` (the generic path's `renormalize`), or `y` itself when `keep` is
/// `None` (zero stays zero: the generic path's `unit_or_self`). Dividing the
/// scaled `s` rather than `y` by `‖y‖`: where `‖y‖` is subnormal it has
/// few bits, and `y / ‖y‖` came out short of unit length.
fn unit_or<T: Real>(y: &[T], keep: Option<&[T]>, tiny: T) -> Vec<T> {
    let (s, ns, _) = scaled(y, tiny);
    if ns > T::zero() {
        s.iter().map(|&x| x / ns).collect()
    } else {
        keep.unwrap_or(y).to_vec()
    }
}

/// `y / ‖y‖`, or `keep` where `‖y‖` is not positive ([`unit_or`]).
fn renormalized<T: Real>(y: &[T], keep: &[T], tiny: T) -> Vec<T> {
    unit_or(y, Some(keep), tiny)
}
