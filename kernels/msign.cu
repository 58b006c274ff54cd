// The elementwise parts of Newton–Schulz msign; the products are strided-
// batched GEMMs (cuBLAS on the GPU, a CPU stand-in under the emulator)
// issued by src/device/launch/msign.rs `msign`.
//
// X (b, s, l) is the iterate on the short side (s = min(m, n)), f32, row-
// major. `Xop`, `Aop`, `Bop` are the GEMM operands: f32 copies, or bf16/f16
// roundings when the schedule asks for a lower operand dtype (`op_kind`
// 1 = bf16, 2 = f16; 0 = f32; −1 = no operand to write).

#include "common.cuh"

__device__ __forceinline__ void put_op(void* op, int kind, u64 i, float v) {
    if (kind == 0) reinterpret_cast<float*>(op)[i] = v;
    else if (kind == 1) reinterpret_cast<bf16*>(op)[i] = __float2bfloat16_rn(v);
    else if (kind == 2) reinterpret_cast<f16*>(op)[i] = __float2half_rn(v);
}

// Moves matrix `bi` of `src` (rows × cols, row-major) to `dst` through a
// 32×32 shared tile, transposed when `transpose` (dst is cols × rows), so
// that both the reads and the writes are coalesced. `f(dst_index, value)`
// stores. Grid: (⌈cols/32⌉, ⌈rows/32⌉, b); block 256 = 32 × 8.
template <class S, class F>
__device__ __forceinline__ void move_tile(const S* src, unsigned rows, unsigned cols, int transpose, F f) {
    __shared__ float tile[32][33];
    const unsigned tx = threadIdx.x % 32, ty = threadIdx.x / 32;
    const unsigned r0 = blockIdx.y * 32, c0 = blockIdx.x * 32;
    const u64 base = u64(blockIdx.z) * rows * cols;
    if (!transpose) {
        for (unsigned i = ty; i < 32; i += 8) {
            unsigned r = r0 + i, c = c0 + tx;
            if (r < rows && c < cols) f(base + u64(r) * cols + c, ld(src, base + u64(r) * cols + c));
        }
        return;
    }
    for (unsigned i = ty; i < 32; i += 8) {
        unsigned r = r0 + i, c = c0 + tx;
        if (r < rows && c < cols) tile[i][tx] = ld(src, base + u64(r) * cols + c);
    }
    __syncthreads();
    // dst is cols × rows: dst[c][r] = src[r][c].
    for (unsigned i = ty; i < 32; i += 8) {
        unsigned c = c0 + i, r = r0 + tx;
        if (r < rows && c < cols) f(base + u64(c) * rows + r, tile[tx][i]);
    }
}

// X ← G / (‖G‖_F·norm_scale + eps) on the short side (Gᵀ when `tall`, i.e.
// m > n), plus its operand copy. `sumsq` (b) holds ‖G‖_F² per matrix. The
// scaling is in f64, as the CPU path does.
template <class P>
__device__ void ns_load_impl(const P* g, const double* sumsq, float* x, void* xop, int op_kind, unsigned m,
                             unsigned n, int tall, double norm_scale, double eps) {
    // G = 0 gives X = 0 also with eps = 0 (zero in, zero out).
    const double denom = sqrt(sumsq[blockIdx.z]) * norm_scale + eps;
    const double inv = denom > 0.0 ? 1.0 / denom : 0.0;
    move_tile(g, m, n, tall, [&](u64 i, float v) {
        float xv = float(double(v) * inv);
        x[i] = xv;
        put_op(xop, op_kind, i, xv);
    });
}

// out (b, m, n) in the parameter dtype ← X (transposed back when `tall`).
template <class P>
__device__ void ns_store_impl(const float* x, P* out, unsigned m, unsigned n, int tall) {
    // X is n × m when tall (its rows are G's columns), else m × n.
    unsigned rows = tall ? n : m, cols = tall ? m : n;
    move_tile(x, rows, cols, tall, [&](u64 i, float v) { st(out, i, v); });
}

#define STEEPEST_NS_KERNELS(SUF, P)                                                                      \
    STEEPEST_KERNEL void ns_load_##SUF(const P* g, const double* sumsq, float* x, void* xop, int op_kind, \
                                       unsigned m, unsigned n, int tall, double norm_scale, double eps) { \
        ns_load_impl<P>(g, sumsq, x, xop, op_kind, m, n, tall, norm_scale, eps);                         \
    }                                                                                                    \
    STEEPEST_EMU_EXPORT(ns_load_##SUF)                                                                   \
    STEEPEST_KERNEL void ns_store_##SUF(const float* x, P* out, unsigned m, unsigned n, int tall) {      \
        ns_store_impl<P>(x, out, m, n, tall);                                                            \
    }                                                                                                    \
    STEEPEST_EMU_EXPORT(ns_store_##SUF)

STEEPEST_NS_KERNELS(f32, float)
STEEPEST_NS_KERNELS(bf16, bf16)
STEEPEST_NS_KERNELS(f16, f16)

// Completes the symmetric matrix A (b, s, s) of which only the tiles with
// row tile ≥ column tile were computed, by copying its lower triangle into
// the upper one — inside the diagonal tiles too, so that the result is
// exactly symmetric (the Gram form amplifies asymmetry by up to ~20× per
// step). Writes bcopy = bscale·A (when bcopy is given) and A's operand copy.
// Each block owns one 32×32 tile (rows r0.., columns c0..): an upper tile is
// read transposed from its lower mirror image through shared memory, so
// reads and writes are both coalesced. Nobody writes the lower triangle.
// Grid: (⌈s/32⌉, ⌈s/32⌉, b); block 256 = 32 × 8.
STEEPEST_KERNEL void ns_symmetrize(float* a, float* bcopy, void* aop, int op_kind, unsigned s, float bscale) {
    __shared__ float tile[32][33];
    const unsigned tx = threadIdx.x % 32, ty = threadIdx.x / 32;
    const unsigned r0 = blockIdx.y * 32, c0 = blockIdx.x * 32;
    const u64 base = u64(blockIdx.z) * s * s;
    const bool upper = r0 < c0, diagonal = r0 == c0;
    if (upper || diagonal) {
        // The mirror image: rows c0.., columns r0.. (the tile itself on the diagonal).
        for (unsigned i = ty; i < 32; i += 8) {
            unsigned r = c0 + i, c = r0 + tx;
            if (r < s && c < s) tile[i][tx] = a[base + u64(r) * s + c];
        }
        __syncthreads();
    }
    for (unsigned i = ty; i < 32; i += 8) {
        unsigned r = r0 + i, c = c0 + tx;
        if (r >= s || c >= s) continue;
        u64 k = base + u64(r) * s + c;
        float v;
        if (upper || (diagonal && r < c)) {
            v = tile[tx][i];  // a[c][r]
            a[k] = v;
        } else {
            v = a[k];
        }
        if (bcopy) bcopy[k] = v * bscale;
        put_op(aop, op_kind, k, v);
    }
}
STEEPEST_EMU_EXPORT(ns_symmetrize)

// Gram Newton–Schulz, first step of a segment: Q = Z + shift·I (b, s, s)
// and its operand copy. Grid: (⌈s²/256⌉ chunks, b), grid-stride.
STEEPEST_KERNEL void ns_shift_diag(const float* z, float* q, void* qop, int op_kind, unsigned s, float shift) {
    const u64 ss = u64(s) * s, base = u64(blockIdx.y) * ss;
    for (u64 i = u64(blockIdx.x) * blockDim.x + threadIdx.x; i < ss; i += u64(gridDim.x) * blockDim.x) {
        float v = z[base + i];
        if (i / s == i % s) v += shift;
        q[base + i] = v;
        put_op(qop, op_kind, base + i, v);
    }
}
STEEPEST_EMU_EXPORT(ns_shift_diag)

// dst ← src (when dst is given) and its operand rounding (when op_kind ≥ 0),
// over `len` elements. Grid-stride.
STEEPEST_KERNEL void ns_copy_cast(const float* src, float* dst, void* op, int op_kind, u64 len) {
    for (u64 i = u64(blockIdx.x) * blockDim.x + threadIdx.x; i < len; i += u64(gridDim.x) * blockDim.x) {
        float v = src[i];
        if (dst) dst[i] = v;
        put_op(op, op_kind, i, v);
    }
}
STEEPEST_EMU_EXPORT(ns_copy_cast)
