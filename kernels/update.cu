// Fused multi-tensor updates: one launch per (family, parameter dtype) over
// every tensor of a group, through a device table of `MtEntry` (pointers,
// lengths, chunk offsets) and `MtScalars` (per-tensor step factors).
//
// Each tensor is cut into chunks of `chunk` elements; block `c` (grid-stride)
// finds its tensor by binary search over `chunk0` and updates that chunk in
// place. The formulas are those of src/device/cpu.rs, in the same order of
// operations and in f32, so that (without FMA contraction, which build.rs
// turns off) the results are the CPU path's bit for bit.

#include "common.cuh"

struct Span {
    MtEntry e;
    unsigned t;
    u64 lo, hi;
};

__device__ __forceinline__ Span mt_span(const MtEntry* tab, unsigned nt, u64 c, unsigned chunk) {
    Span s;
    s.t = mt_find(tab, nt, c);
    s.e = tab[s.t];
    s.lo = (c - s.e.chunk0) * chunk;
    u64 end = s.lo + chunk;
    s.hi = end < s.e.len ? end : s.e.len;
    return s;
}

// AdamW (torch order): m ← m + (g − m)(1 − β₁), v ← v·β₂ + g²(1 − β₂),
// w ← decayed(w) − (m / (√v / s1 + eps))·s0.
template <class P>
__device__ void adamw_impl(const MtEntry* tab, const MtScalars* sc, unsigned nt, u64 nchunks, unsigned chunk,
                           float b1, float b2, float b2c, float eps) {
    for (u64 c = blockIdx.x; c < nchunks; c += gridDim.x) {
        Span sp = mt_span(tab, nt, c, chunk);
        const MtScalars s = sc[sp.t];
        P* w = reinterpret_cast<P*>(sp.e.p0);
        const P* g = reinterpret_cast<const P*>(sp.e.p1);
        float* m = reinterpret_cast<float*>(sp.e.p2);
        float* v = reinterpret_cast<float*>(sp.e.p3);
        const float* ra = reinterpret_cast<const float*>(sp.e.a);
        const float* rb = reinterpret_cast<const float*>(sp.e.b);
        RowCol rc(ra != nullptr, sp.lo + threadIdx.x, blockDim.x, sp.e.cols);
        for (u64 j = sp.lo + threadIdx.x; j < sp.hi; j += blockDim.x, rc.next()) {
            float gj = ld(g, j);
            float mj = m[j] + (gj - m[j]) * b1;
            float vj = v[j] * b2 + gj * gj * b2c;
            float denom = sqrtf(vj) / s.s1 + eps;
            float wd = decayed(ld(w, j), s, ra, rb, rc);
            st(w, j, wd - (mj / denom) * s.s0);
            m[j] = mj;
            v[j] = vj;
        }
    }
}

// SGD (dampening 0): with a buffer, buf ← buf·μ + g and d = g + buf·μ
// (Nesterov) or d = buf; without, d = g; w ← decayed(w) − d·s0.
template <class P>
__device__ void sgd_impl(const MtEntry* tab, const MtScalars* sc, unsigned nt, u64 nchunks, unsigned chunk,
                         float mu, int nesterov) {
    for (u64 c = blockIdx.x; c < nchunks; c += gridDim.x) {
        Span sp = mt_span(tab, nt, c, chunk);
        const MtScalars s = sc[sp.t];
        P* w = reinterpret_cast<P*>(sp.e.p0);
        const P* g = reinterpret_cast<const P*>(sp.e.p1);
        float* buf = reinterpret_cast<float*>(sp.e.p2);
        const float* ra = reinterpret_cast<const float*>(sp.e.a);
        const float* rb = reinterpret_cast<const float*>(sp.e.b);
        RowCol rc(ra != nullptr, sp.lo + threadIdx.x, blockDim.x, sp.e.cols);
        for (u64 j = sp.lo + threadIdx.x; j < sp.hi; j += blockDim.x, rc.next()) {
            float gj = ld(g, j);
            float wd = decayed(ld(w, j), s, ra, rb, rc);
            if (!buf) {
                st(w, j, wd - gj * s.s0);
            } else {
                float bj = buf[j] * mu + gj;
                float d = nesterov ? gj + bj * mu : bj;
                st(w, j, wd - d * s.s0);
                buf[j] = bj;
            }
        }
    }
}

// Muon's momentum, writing the direction: buf ← buf + (g − buf)(1 − μ),
// out = g + (buf − g)·μ (Nesterov) or out = buf.
template <class P>
__device__ void ema_impl(const MtEntry* tab, unsigned nt, u64 nchunks, unsigned chunk, float mu, float one_mu,
                         int nesterov) {
    for (u64 c = blockIdx.x; c < nchunks; c += gridDim.x) {
        Span sp = mt_span(tab, nt, c, chunk);
        const P* g = reinterpret_cast<const P*>(sp.e.p1);
        float* buf = reinterpret_cast<float*>(sp.e.p2);
        float* out = reinterpret_cast<float*>(sp.e.p3);
        for (u64 j = sp.lo + threadIdx.x; j < sp.hi; j += blockDim.x) {
            float gj = ld(g, j);
            float bj = buf[j] + (gj - buf[j]) * one_mu;
            buf[j] = bj;
            out[j] = nesterov ? gj + (bj - gj) * mu : bj;
        }
    }
}

// Applies a direction: w ← decayed(w) − d·s0.
template <class P>
__device__ void apply_impl(const MtEntry* tab, const MtScalars* sc, unsigned nt, u64 nchunks, unsigned chunk) {
    for (u64 c = blockIdx.x; c < nchunks; c += gridDim.x) {
        Span sp = mt_span(tab, nt, c, chunk);
        const MtScalars s = sc[sp.t];
        P* w = reinterpret_cast<P*>(sp.e.p0);
        const float* d = reinterpret_cast<const float*>(sp.e.p1);
        const float* ra = reinterpret_cast<const float*>(sp.e.a);
        const float* rb = reinterpret_cast<const float*>(sp.e.b);
        RowCol rc(ra != nullptr, sp.lo + threadIdx.x, blockDim.x, sp.e.cols);
        for (u64 j = sp.lo + threadIdx.x; j < sp.hi; j += blockDim.x, rc.next()) {
            float wd = decayed(ld(w, j), s, ra, rb, rc);
            st(w, j, wd - d[j] * s.s0);
        }
    }
}

#define STEEPEST_UPDATE_KERNELS(SUF, P)                                                                  \
    STEEPEST_KERNEL void adamw_##SUF(const MtEntry* tab, const MtScalars* sc, unsigned nt, u64 nchunks,   \
                                     unsigned chunk, float b1, float b2, float b2c, float eps) {          \
        adamw_impl<P>(tab, sc, nt, nchunks, chunk, b1, b2, b2c, eps);                                     \
    }                                                                                                    \
    STEEPEST_EMU_EXPORT(adamw_##SUF)                                                                     \
    STEEPEST_KERNEL void sgd_##SUF(const MtEntry* tab, const MtScalars* sc, unsigned nt, u64 nchunks,     \
                                   unsigned chunk, float mu, int nesterov) {                             \
        sgd_impl<P>(tab, sc, nt, nchunks, chunk, mu, nesterov);                                           \
    }                                                                                                    \
    STEEPEST_EMU_EXPORT(sgd_##SUF)                                                                       \
    STEEPEST_KERNEL void ema_##SUF(const MtEntry* tab, unsigned nt, u64 nchunks, unsigned chunk, float mu, \
                                   float one_mu, int nesterov) {                                         \
        ema_impl<P>(tab, nt, nchunks, chunk, mu, one_mu, nesterov);                                       \
    }                                                                                                    \
    STEEPEST_EMU_EXPORT(ema_##SUF)                                                                       \
    STEEPEST_KERNEL void apply_##SUF(const MtEntry* tab, const MtScalars* sc, unsigned nt, u64 nchunks,   \
                                     unsigned chunk) {                                                   \
        apply_impl<P>(tab, sc, nt, nchunks, chunk);                                                       \
    }                                                                                                    \
    STEEPEST_EMU_EXPORT(apply_##SUF)

STEEPEST_UPDATE_KERNELS(f32, float)
STEEPEST_UPDATE_KERNELS(bf16, bf16)
STEEPEST_UPDATE_KERNELS(f16, f16)
