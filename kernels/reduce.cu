// Reductions the step driver needs, over many tensors in one launch (the
// multi-tensor table of update.cu): the finite check and sums of squares.
// Their results stay on the device until the single host copy of a step.

#include "common.cuh"

__device__ __forceinline__ void chunk_range(const MtEntry& e, u64 c, unsigned chunk, u64* lo, u64* hi) {
    *lo = (c - e.chunk0) * chunk;
    u64 end = *lo + chunk;
    *hi = end < e.len ? end : e.len;
}

// flags[t] |= 1 when tensor t holds a NaN or ±Inf. Like the CPU check, sums
// `x − x` (0 for finite x, NaN otherwise) and tests the sum once per thread.
template <class P>
__device__ void finite_impl(const MtEntry* tab, unsigned nt, u64 nchunks, unsigned chunk, unsigned* flags) {
    for (u64 c = blockIdx.x; c < nchunks; c += gridDim.x) {
        unsigned t = mt_find(tab, nt, c);
        const MtEntry e = tab[t];
        u64 lo, hi;
        chunk_range(e, c, chunk, &lo, &hi);
        const P* x = reinterpret_cast<const P*>(e.p1);
        float acc = 0.0f;
        for (u64 j = lo + threadIdx.x; j < hi; j += blockDim.x) {
            float v = ld(x, j);
            acc += v - v;
        }
        if (!isfinite(acc)) atomicOr(&flags[t], 1u);
    }
}

// partials[c] = Σ x² over chunk c, in f64: a square of an f32 entry
// beyond ~1.8e19 overflows f32 and one below ~1e-23 underflows it, and
// msign normalises by this sum (an Inf or 0 there zeroed the whole result;
// the CPU paths scale first). The loads stay f32-wide, so the reduction
// remains bound by memory, not by f64 arithmetic.
template <class P>
__device__ void sumsq_impl(const MtEntry* tab, unsigned nt, u64 nchunks, unsigned chunk, double* partials) {
    __shared__ double scratch[STEEPEST_SCRATCH];
    for (u64 c = blockIdx.x; c < nchunks; c += gridDim.x) {
        const MtEntry e = tab[mt_find(tab, nt, c)];
        u64 lo, hi;
        chunk_range(e, c, chunk, &lo, &hi);
        const P* x = reinterpret_cast<const P*>(e.p1);
        double acc = 0.0;
        for (u64 j = lo + threadIdx.x; j < hi; j += blockDim.x) {
            double v = ld(x, j);
            acc += v * v;
        }
        acc = block_sum(acc, scratch);
        if (threadIdx.x == 0) partials[c] = acc;
    }
}

#define STEEPEST_REDUCE_KERNELS(SUF, P)                                                                  \
    STEEPEST_KERNEL void finite_##SUF(const MtEntry* tab, unsigned nt, u64 nchunks, unsigned chunk,      \
                                      unsigned* flags) {                                                 \
        finite_impl<P>(tab, nt, nchunks, chunk, flags);                                                  \
    }                                                                                                    \
    STEEPEST_EMU_EXPORT(finite_##SUF)                                                                    \
    STEEPEST_KERNEL void sumsq_##SUF(const MtEntry* tab, unsigned nt, u64 nchunks, unsigned chunk,       \
                                     double* partials) {                                                 \
        sumsq_impl<P>(tab, nt, nchunks, chunk, partials);                                                \
    }                                                                                                    \
    STEEPEST_EMU_EXPORT(sumsq_##SUF)

STEEPEST_REDUCE_KERNELS(f32, float)
STEEPEST_REDUCE_KERNELS(bf16, bf16)
STEEPEST_REDUCE_KERNELS(f16, f16)

// out[t] = Σ of tensor t's chunk partials, in f64 and in a fixed order (so
// the result does not depend on the grid of `sumsq_*`).
STEEPEST_KERNEL void sumsq_finish(const MtEntry* tab, unsigned nt, u64 nchunks, const double* partials,
                                  double* out) {
    __shared__ double scratch[STEEPEST_SCRATCH];
    for (unsigned t = blockIdx.x; t < nt; t += gridDim.x) {
        u64 c0 = tab[t].chunk0;
        u64 c1 = t + 1 < nt ? tab[t + 1].chunk0 : nchunks;
        double acc = 0.0;
        for (u64 c = c0 + threadIdx.x; c < c1; c += blockDim.x) acc += partials[c];
        acc = block_sum(acc, scratch);
        if (threadIdx.x == 0) out[t] = acc;
    }
}
STEEPEST_EMU_EXPORT(sumsq_finish)
