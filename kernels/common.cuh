// Shared by every kernel file: the CUDA/emulator switch, element access for
// f32/bf16/f16 parameters, block reductions, and the multi-tensor table.
//
// The same source is compiled by nvcc (PTX, feature `cuda`) and by the host
// C++ compiler against emu.h (every build; the tests run it on the CPU).
// Layouts shared with Rust (`MtEntry`, `MtScalars`) are mirrored in
// src/device/launch/multi_tensor.rs; static_asserts here and const asserts there keep
// the two in step.

#pragma once

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define STEEPEST_KERNEL extern "C" __global__
#define STEEPEST_EMU_EXPORT(name)
#define STEEPEST_DYNAMIC_SHARED(T, name)                        \
    extern __shared__ __align__(16) unsigned char steepest_smem_[]; \
    T* name = reinterpret_cast<T*>(steepest_smem_)
#else
#include "emu.h"
// Under the emulator a kernel is a host function with internal linkage;
// STEEPEST_EMU_EXPORT gives it its exported launcher.
#define STEEPEST_KERNEL static
#define STEEPEST_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(::emu::dynamic_shared())
#endif

typedef unsigned long long u64;
typedef __nv_bfloat16 bf16;
typedef __half f16;

// f32 is the arithmetic type of every kernel: parameters are widened on load
// and rounded (to nearest, ties to even) on store, as `cpu::Elem` does.
__device__ __forceinline__ float ld(const float* p, u64 i) { return p[i]; }
__device__ __forceinline__ float ld(const bf16* p, u64 i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ float ld(const f16* p, u64 i) { return __half2float(p[i]); }
__device__ __forceinline__ void st(float* p, u64 i, float v) { p[i] = v; }
__device__ __forceinline__ void st(bf16* p, u64 i, float v) { p[i] = __float2bfloat16_rn(v); }
__device__ __forceinline__ void st(f16* p, u64 i, float v) { p[i] = __float2half_rn(v); }

// Smallest positive normal f32: the floor of a divisor in safe divisions
// (`y / max(‖y‖, tiny)`), as in the generic path.
#define STEEPEST_TINY 1.17549435e-38f

// Block size of every kernel (the Rust side launches with it; the reductions
// size their scratch by it).
#define STEEPEST_BLOCK 256
#define STEEPEST_WARPS (STEEPEST_BLOCK / 32)
// Scratch entries of `block_sum`.
#define STEEPEST_SCRATCH (STEEPEST_BLOCK + 1)

// Sum over a warp; every lane gets the total (butterfly order, the same on
// every lane, so every lane gets the same bits).
template <class T>
__device__ __forceinline__ T warp_sum(T v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Sum over the block (blockDim.x == STEEPEST_BLOCK); every thread gets the
// total. `scratch` is block-shared, STEEPEST_BLOCK + 1 entries (the last
// holds the total). Only warp 0 shuffles (each lane first adds 8 partials).
// Two barriers: a following call writes the total's slot only after its own
// first barrier, which every thread passes after reading this total. The
// order of the sum is fixed.
template <class T>
__device__ __forceinline__ T block_sum(T v, T* scratch) {
    scratch[threadIdx.x] = v;
    __syncthreads();
    if (threadIdx.x < 32) {
        T t = scratch[threadIdx.x];
        for (unsigned w = 1; w < STEEPEST_WARPS; ++w) t += scratch[threadIdx.x + 32 * w];
        t = warp_sum(t);
        if (threadIdx.x == 0) scratch[STEEPEST_BLOCK] = t;
    }
    __syncthreads();
    return scratch[STEEPEST_BLOCK];
}

// Largest value over the block, as `block_sum` (same scratch, same two
// barriers); fmaxf ignores NaN.
__device__ __forceinline__ float block_max(float v, float* scratch) {
    scratch[threadIdx.x] = v;
    __syncthreads();
    if (threadIdx.x < 32) {
        float t = scratch[threadIdx.x];
        for (unsigned w = 1; w < STEEPEST_WARPS; ++w) t = fmaxf(t, scratch[threadIdx.x + 32 * w]);
        for (int o = 16; o > 0; o >>= 1) t = fmaxf(t, __shfl_xor_sync(0xffffffffu, t, o));
        if (threadIdx.x == 0) scratch[STEEPEST_BLOCK] = t;
    }
    __syncthreads();
    return scratch[STEEPEST_BLOCK];
}

// ‖y/d‖ of the k floats at y, over the block, with d = max(max|yᵢ|, tiny)
// written to *d: scaled by the largest magnitude first so that neither the
// squares nor their sum under- or overflow (‖y‖ = d·‖y/d‖, the generic path's
// `scaled_keepdim`); NaN when y is not finite. Where y is subnormal d is the
// smallest normal, a power of two, so y/d is exact. Every thread gets both.
__device__ __forceinline__ float block_scaled_norm(const float* y, unsigned k, float* scratch, float* d) {
    float m = 0.0f;
    for (unsigned e = threadIdx.x; e < k; e += blockDim.x) m = fmaxf(m, fabsf(y[e]));
    *d = fmaxf(block_max(m, scratch), STEEPEST_TINY);
    float ss = 0.0f;
    for (unsigned e = threadIdx.x; e < k; e += blockDim.x) {
        float q = y[e] / *d;  // NaN for a NaN, and for an Inf (d = Inf then)
        ss += q * q;
    }
    return sqrtf(block_sum(ss, scratch));
}

// One tensor of a multi-tensor launch. The pointers mean, per family:
//   adamw: p0 = w (P), p1 = g (P), p2 = m (f32), p3 = v (f32)
//   sgd:   p0 = w (P), p1 = g (P), p2 = momentum buffer (f32) or 0
//   ema:   p1 = g (P), p2 = buffer (f32), p3 = direction out (f32)
//   apply: p0 = w (P), p1 = direction (f32)
//   finite / sumsq: p1 = x (P)
// `a`, `b` are the rank-1 decay factors (f32, `rows` and `cols` long) or 0.
struct MtEntry {
    u64 p0, p1, p2, p3;
    u64 a, b;
    u64 len;     // elements
    u64 cols;    // columns of the matrix view (≥ 1): element j is in row j / cols (RowCol)
    u64 chunk0;  // global index of this tensor's first chunk
};

// Per-tensor scalars (f32, as the CPU path rounds its f64 hyperparameters):
//   adamw: s0 = lr/(1−β₁ᵗ), s1 = √(1−β₂ᵗ); sgd: s0 = lr; apply: s0 = α;
//   all: s2 = decay scale, s3 = rank-1 coefficient.
struct MtScalars {
    float s0, s1, s2, s3;
};

static_assert(sizeof(MtEntry) == 72, "MtEntry layout is shared with Rust");
static_assert(sizeof(MtScalars) == 16, "MtScalars layout is shared with Rust");

// The tensor holding global chunk `c`: the last entry with chunk0 ≤ c.
__device__ __forceinline__ unsigned mt_find(const MtEntry* tab, unsigned n, u64 c) {
    unsigned lo = 0, hi = n;  // invariant: tab[lo].chunk0 ≤ c, answer in [lo, hi)
    while (hi - lo > 1) {
        unsigned mid = lo + (hi - lo) / 2;
        if (tab[mid].chunk0 <= c) lo = mid;
        else hi = mid;
    }
    return lo;
}

// Row and column of element j of a row-major matrix with `cols` columns, for
// the decay's rank-1 term. A thread walks j, j + step, j + 2·step, …; the row
// and column follow with one carry per step (`next`) instead of a 64-bit
// division per element, which a memory-bound update cannot hide. Without a
// rank-1 term (`on` false) nothing is computed.
struct RowCol {
    u64 row, col, drow, dcol, cols;
    __device__ __forceinline__ RowCol(bool on, u64 j, u64 step, u64 cols_)
        : row(0), col(0), drow(0), dcol(0), cols(cols_) {
        if (!on) return;
        row = j / cols;
        col = j - row * cols;
        drow = step / cols;
        dcol = step - drow * cols;
    }
    __device__ __forceinline__ void next() {
        row += drow;
        col += dcol;  // < 2·cols
        if (col >= cols) {
            col -= cols;
            ++row;
        }
    }
};

// `scale·w − (coeff·a[row])·b[col]`, or `scale·w` without a rank-1 term: the
// CPU's `decayed`, same order of operations.
__device__ __forceinline__ float decayed(float w, const MtScalars& s, const float* a, const float* b,
                                         const RowCol& rc) {
    if (!a) return s.s2 * w;
    return s.s2 * w - (s.s3 * a[rc.row]) * b[rc.col];
}
