// Batched power iteration on a shape group W (b, m, n), all on the device.
//
// The iteration runs on the short side k = min(m, n) (l = max(m, n) the long
// side), as `power_iteration_generic` does. W is seen as l vectors a_t of
// length k: its rows when n ≤ m ("tall": a_t[e] = W[t, e]), its columns when
// n > m ("wide": a_t[e] = W[e, t]). One step of the iteration is the Gram
// product G x = Σ_t a_t (a_t · x) (G = WᵀW, or W Wᵀ when wide), both
// products of a step from one pass over W: each group of 32 vectors is read
// for its dot products and, right after, for its contributions (from the
// cache the first read filled), so W comes from memory once per iteration.
//
// Launch sequence (src/device/launch/power.rs `power_iteration`): `power_start`
// (the start vector, or the default one), then per iteration `power_gram`
// (accumulate G x into y) and `power_normalize` (x ← y/‖y‖, or keep x when
// ‖y‖ is 0 or not finite; clears y; the norm scaled by max|yᵢ|, `block_scaled_norm`),
// and a last `power_gram` in DOT mode for W v (or Wᵀ u)
// with `power_normalize` writing σ₁; for a group's state vectors,
// `power_store` writes v₁ back where the starts came from.

#include "common.cuh"

// Modes of `power_gram` (bits).
#define POWER_DOT 1   // out[t] = a_t · x
#define POWER_GRAM 2  // y += Σ_t a_t (a_t · x)
#define POWER_ACC 4   // y += Σ_t a_t z[t]

// x (b, k) ← the start vector of each matrix: the k floats at `starts[bi]`
// where that address is non-zero and they are finite and not all zero, else
// `dflt` (k); then normalised as the generic path does
// (`renormalize(chosen, dflt)`). `starts` (b addresses) may be null: no
// starts at all.
STEEPEST_KERNEL void power_start(const u64* starts, const float* dflt, float* x, unsigned k) {
    __shared__ float scratch[STEEPEST_SCRATCH];
    unsigned bi = blockIdx.x;
    const float* s = starts ? reinterpret_cast<const float*>(starts[bi]) : nullptr;
    // NaN when the start is not finite; > 0 when it is finite and not all zero.
    float d = 1.0f;
    float ns = s ? block_scaled_norm(s, k, scratch, &d) : 0.0f;
    bool usable = s && ns > 0.0f;
    const float* chosen = usable ? s : dflt;
    if (!usable) ns = block_scaled_norm(dflt, k, scratch, &d);
    float* out = x + u64(bi) * k;
    // (y/d)/‖y/d‖, not y/‖y‖: a subnormal ‖y‖ has few bits (`power_normalize`).
    for (unsigned e = threadIdx.x; e < k; e += blockDim.x) {
        out[e] = ns > 0.0f ? chosen[e] / d / ns : dflt[e];
    }
}
STEEPEST_EMU_EXPORT(power_start)

// outs[bi] ← x[bi] (k floats per matrix, grid b): the new v₁ of each matrix
// written back to where its start came from (a group's state vectors), one
// launch for the group.
STEEPEST_KERNEL void power_store(const float* x, const u64* outs, unsigned k) {
    unsigned bi = blockIdx.x;
    float* o = reinterpret_cast<float*>(outs[bi]);
    for (unsigned e = threadIdx.x; e < k; e += blockDim.x) o[e] = x[u64(bi) * k + e];
}
STEEPEST_EMU_EXPORT(power_store)

// Static shared memory of `power_gram_*` (the per-warp tiles and
// coefficients), mirrored by POWER_STATIC_SHARED in launch/power.rs.
#define POWER_TILE_PAD 33

// One pass over W (grid (gx, b), dynamic shared memory: x̂ and the block's
// accumulator, k floats each). `Ws` (b) holds the address of each matrix, so
// that a group's parameters are read where they are, with no stacked copy.
// `x` (b, k) is the current unit vector, `z`
// (b, l) the weights of POWER_ACC, `y` (b, k) the accumulated result (zeroed
// by the caller), `out` (b, l) the dot products of POWER_DOT.
//
// Each warp takes a group of 32 vectors a_t and moves W through a 32×32
// shared tile, so that memory accesses are coalesced in both layouts and a
// warp synchronises once per tile instead of reducing across lanes per row:
// - tall (rows): lane = column while a tile of 32 rows is loaded, lane = row
//   while the row dot products are summed from it; then each lane adds
//   Σ_i coef_i·W[t0+i, e] for its column e (second read of the rows, which
//   the first one has just brought into the cache);
// - wide (columns): lane = column t, the dot products need no exchange;
//   the contributions coef_t·W[e, t] of 32 rows go through the tile and lane
//   = row sums them over the 32 columns.
template <class P>
__device__ void power_gram_impl(const u64* Ws, unsigned m, unsigned n, int wide, int mode, const float* x,
                                const float* z, float* y, float* out) {
    __shared__ float tiles[STEEPEST_WARPS][32][POWER_TILE_PAD];
    __shared__ float coefs[STEEPEST_WARPS][32];
    const unsigned k = wide ? m : n, l = wide ? n : m;
    const unsigned bi = blockIdx.y;
    const P* w = reinterpret_cast<const P*>(Ws[bi]);
    const bool need_dot = mode & (POWER_DOT | POWER_GRAM);
    const bool accumulate = mode & (POWER_GRAM | POWER_ACC);
    STEEPEST_DYNAMIC_SHARED(float, xs);
    float* acc = xs + k;
    for (unsigned e = threadIdx.x; e < k; e += blockDim.x) {
        if (need_dot) xs[e] = x[u64(bi) * k + e];
        if (accumulate) acc[e] = 0.0f;
    }
    __syncthreads();
    const unsigned lane = threadIdx.x % 32, warp = threadIdx.x / 32, nw = blockDim.x / 32;
    float(*tile)[POWER_TILE_PAD] = tiles[warp];
    for (unsigned g = blockIdx.x * nw + warp; g * 32 < l; g += gridDim.x * nw) {
        const unsigned t0 = g * 32;
        const unsigned cnt = l - t0 < 32 ? l - t0 : 32;  // vectors in this group
        if (!wide) {
            float dot = 0.0f;  // of row t0 + lane
            if (need_dot) {
                for (unsigned e0 = 0; e0 < k; e0 += 32) {
                    const unsigned e = e0 + lane;
                    for (unsigned i = 0; i < 32; ++i)
                        tile[i][lane] = (i < cnt && e < k) ? ld(w, u64(t0 + i) * n + e) : 0.0f;
                    __syncwarp();
                    for (unsigned j = 0; j < 32 && e0 + j < k; ++j) dot += tile[lane][j] * xs[e0 + j];
                    __syncwarp();
                }
                if ((mode & POWER_DOT) && lane < cnt) out[u64(bi) * l + t0 + lane] = dot;
            }
            if (accumulate) {
                coefs[warp][lane] = lane >= cnt ? 0.0f : (mode & POWER_GRAM) ? dot : z[u64(bi) * l + t0 + lane];
                __syncwarp();
                for (unsigned e = lane; e < k; e += 32) {
                    float s = 0.0f;
                    for (unsigned i = 0; i < cnt; ++i) s += ld(w, u64(t0 + i) * n + e) * coefs[warp][i];
                    atomicAdd(&acc[e], s);
                }
                __syncwarp();
            }
        } else {
            const unsigned t = t0 + lane;
            const bool valid = lane < cnt;
            float dot = 0.0f;  // of column t
            if (need_dot && valid)
                for (unsigned e = 0; e < k; ++e) dot += ld(w, u64(e) * n + t) * xs[e];
            if ((mode & POWER_DOT) && valid) out[u64(bi) * l + t] = dot;
            if (accumulate) {
                const float coef = !valid ? 0.0f : (mode & POWER_GRAM) ? dot : z[u64(bi) * l + t];
                for (unsigned e0 = 0; e0 < k; e0 += 32) {
                    for (unsigned i = 0; i < 32; ++i)
                        tile[i][lane] = (valid && e0 + i < k) ? coef * ld(w, u64(e0 + i) * n + t) : 0.0f;
                    __syncwarp();
                    if (e0 + lane < k) {
                        float s = 0.0f;
                        for (unsigned j = 0; j < 32; ++j) s += tile[lane][j];
                        atomicAdd(&acc[e0 + lane], s);
                    }
                    __syncwarp();
                }
            }
        }
    }
    if (!accumulate) return;
    __syncthreads();
    for (unsigned e = threadIdx.x; e < k; e += blockDim.x) atomicAdd(&y[u64(bi) * k + e], acc[e]);
}

#define STEEPEST_POWER_GRAM(SUF, P)                                                                      \
    STEEPEST_KERNEL void power_gram_##SUF(const u64* Ws, unsigned m, unsigned n, int wide, int mode,     \
                                          const float* x, const float* z, float* y, float* out) {        \
        power_gram_impl<P>(Ws, m, n, wide, mode, x, z, y, out);                                          \
    }                                                                                                    \
    STEEPEST_EMU_EXPORT(power_gram_##SUF)

STEEPEST_POWER_GRAM(f32, float)
STEEPEST_POWER_GRAM(bf16, bf16)
STEEPEST_POWER_GRAM(f16, f16)

// Per matrix (grid b): ν = ‖y‖; x ← y / ν where ν > 0, else `keep` (when
// `keep` is given: `renormalize`; without it `unit_or_self`, so a zero y
// gives a zero x). The division as (y/d)/‖y/d‖ (d = max|yᵢ| floored at the
// smallest normal, `block_scaled_norm`), not y/ν: where ν is subnormal it
// has few bits, and y/ν came out short of unit length. `keep` has stride
// `keep_stride` per matrix (0: one vector for all) and may be x itself.
// Writes σ = ν when `sigma` is given; clears y when `zero_y` (ready for the
// next accumulation). x may be y.
STEEPEST_KERNEL void power_normalize(float* y, float* x, const float* keep, unsigned keep_stride,
                                     float* sigma, int zero_y, unsigned k) {
    __shared__ float scratch[STEEPEST_SCRATCH];
    unsigned bi = blockIdx.x;
    float* yb = y + u64(bi) * k;
    float* xb = x + u64(bi) * k;
    float d;
    float ns = block_scaled_norm(yb, k, scratch, &d);
    bool positive = ns > 0.0f;
    float div = positive ? ns : 1.0f;
    const float* kb = keep ? keep + u64(bi) * keep_stride : nullptr;
    // Each thread reads and writes only its own elements: x, y and keep may alias.
    for (unsigned e = threadIdx.x; e < k; e += blockDim.x) {
        float ye = yb[e];
        xb[e] = (kb && !positive) ? kb[e] : ye / d / div;
        if (zero_y) yb[e] = 0.0f;
    }
    if (sigma && threadIdx.x == 0) sigma[bi] = ns * d;
}
STEEPEST_EMU_EXPORT(power_normalize)
