// A small CUDA kernel emulator: the host C++ compiler builds kernels/*.cu
// against this header, and the Rust tests run the kernels on the CPU.
//
// Model (enough for the kernels of this crate, and strict where a kernel bug
// would otherwise go unnoticed):
// - one OS thread per CUDA thread of a block; the blocks of a grid run one
//   after another on the same threads, so `__shared__` variables can be
//   plain statics and the dynamic shared arena one buffer per launch (filled
//   with 0xFF bytes, a NaN in every float, before each block);
// - `__syncthreads()` is a `std::barrier` over the block's threads; a thread
//   that reaches a different barrier than the others (a divergent
//   `__syncthreads`, or an early `return` before one) aborts with a message;
// - warp shuffles are an exchange among the 32 lanes of one warp, honouring
//   the mask: only the lanes in the mask take part, a lane outside its own
//   mask or a read from a lane outside the mask aborts; other warps do not
//   wait (unlike an emulation that shuffles through a block-wide barrier);
// - atomics are `std::atomic_ref` operations (relaxed, as on the GPU);
// - bf16/f16 are 16-bit structs with round-to-nearest-even conversions;
// - launches are serialised by one mutex (statics stand for shared memory).
//
// Built with -fsanitize=thread, a missing `__syncthreads()` between a write
// and a read of shared memory shows up as a data race; with
// -fsanitize=address, an out-of-bounds access to a tensor or to the dynamic
// shared arena shows up as such.

#pragma once

#if defined(__CUDACC__)
#error "emu.h is for the host compiler only"
#endif

#include <array>
#include <atomic>
#include <barrier>
#include <cmath>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Blocks run one after another and launches are serialised, so a static is
// private to the running block.
#define __shared__ static

struct uint3 {
    unsigned x, y, z;
};

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

using std::isfinite;

namespace emu {

[[noreturn]] inline void fail(const char* what) {
    std::fprintf(stderr, "steepest kernel emulator: %s\n", what);
    std::fflush(stderr);
    std::abort();
}

// ---------------------------------------------------------------- 16-bit floats

inline uint32_t bits_of(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}

inline float float_of(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

}  // namespace emu

struct __nv_bfloat16 {
    uint16_t x;
};

struct __half {
    uint16_t x;
};

inline float __bfloat162float(__nv_bfloat16 h) { return emu::float_of(uint32_t(h.x) << 16); }

// Round to nearest, ties to even; a NaN stays a (quiet) NaN of the same sign.
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
    uint32_t u = emu::bits_of(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return {uint16_t((u >> 16) | 0x0040u)};
    uint32_t keep = u >> 16;
    uint32_t rest = u & 0xffffu;
    if (rest > 0x8000u || (rest == 0x8000u && (keep & 1u))) keep += 1;
    return {uint16_t(keep)};
}

inline float __half2float(__half h) {
    uint32_t sign = uint32_t(h.x & 0x8000u) << 16;
    uint32_t exp = (h.x >> 10) & 0x1fu;
    uint32_t man = h.x & 0x3ffu;
    if (exp == 0x1f) return emu::float_of(sign | 0x7f800000u | (man << 13));  // Inf, NaN
    if (exp == 0) {
        // zero or subnormal: man · 2⁻²⁴, exact in f32
        float mag = std::ldexp(float(man), -24);
        return sign ? -mag : mag;
    }
    return emu::float_of(sign | ((exp + 112u) << 23) | (man << 13));
}

// Round to nearest, ties to even, with f16 subnormals; overflow gives ±Inf.
inline __half __float2half_rn(float f) {
    uint32_t u = emu::bits_of(f);
    uint16_t sign = uint16_t((u >> 16) & 0x8000u);
    uint32_t abs = u & 0x7fffffffu;
    if (abs >= 0x7f800000u) {  // Inf, or NaN kept quiet with its top payload bits
        uint16_t nan = abs > 0x7f800000u ? uint16_t(0x0200u | ((abs >> 13) & 0x3ffu)) : 0;
        return {uint16_t(sign | 0x7c00u | nan)};
    }
    int e = int(abs >> 23) - 127;  // unbiased exponent
    // Below 2^-25 (half the smallest f16 subnormal, f32 subnormals included)
    // everything rounds to zero.
    if (e < -25) return {sign};
    uint32_t man = (abs & 0x7fffffu) | 0x800000u;  // value = man · 2^(e-23)
    // Bits of `man` below the f16 ulp: 2^(e-10) for normals, 2^-24 below 2^-14.
    int shift = e >= -14 ? 13 : -e - 1;
    uint32_t q = man >> shift;
    uint32_t rem = man & ((1u << shift) - 1u);
    uint32_t half_ulp = 1u << (shift - 1);
    if (rem > half_ulp || (rem == half_ulp && (q & 1u))) q += 1;
    if (e < -14) return {uint16_t(sign | q)};  // subnormal; q = 0x400 is the smallest normal
    if (q == 0x800u) {  // rounding carried into the next binade
        q = 0x400u;
        e += 1;
    }
    if (e + 15 >= 0x1f) return {uint16_t(sign | 0x7c00u)};
    return {uint16_t(sign | (uint32_t(e + 15) << 10) | (q & 0x3ffu))};
}

namespace emu {

// ---------------------------------------------------------------- launches

enum class Arrive : unsigned char { Sync, BlockEnd };

struct Launch;

// What a CUDA thread sees of itself.
struct Here {
    uint3 thread_idx{0, 0, 0};
    uint3 block_idx{0, 0, 0};
    dim3 block_dim;
    dim3 grid_dim;
    unsigned tid = 0;     // linear thread index in the block
    unsigned parity = 0;  // which buffer this lane's next full-warp exchange uses
    Launch* launch = nullptr;
};

inline thread_local Here here_;

inline Here& here() {
    if (!here_.launch) fail("a kernel builtin was used outside a launch");
    return here_;
}

// One warp's exchanges. A full-mask operation (every kernel here) is one
// phase of a 32-lane std::barrier over a double buffer: lane l writes
// buf[p][l], all arrive, each reads its source. The next operation writes the
// other buffer, and the one after can only start writing buf[p] again once
// every lane has arrived at the phase in between, i.e. finished reading.
// A partial mask goes through a mutex/condition-variable exchange among the
// lanes of the mask only.
struct Warp {
    std::barrier<> bar{32};
    uint64_t buf[2][32] = {};
    std::mutex mu;
    std::condition_variable cv;
    unsigned mask = 0;     // lanes of the partial exchange in progress
    unsigned arrived = 0;  // lanes that have put their value
    unsigned left = 0;     // lanes that have yet to read
    bool reading = false;
    std::array<uint64_t, 32> vals{};
};

// Checks, once per barrier phase, that every thread reached the same kind of
// barrier (run by the last thread to arrive, before any is released), and
// refills the dynamic shared arena with 0xFF (NaN floats) between blocks.
struct PhaseCheck {
    Launch* launch;
    void operator()() noexcept;
};

struct Launch {
    dim3 grid, block;
    size_t shared_bytes;
    unsigned threads;
    std::unique_ptr<unsigned char[]> shared;
    std::vector<Arrive> kinds;
    std::vector<std::unique_ptr<Warp>> warps;
    std::barrier<PhaseCheck> bar;

    Launch(dim3 g, dim3 b, size_t shm)
        : grid(g),
          block(b),
          shared_bytes(shm),
          threads(b.x * b.y * b.z),
          shared(shm ? new unsigned char[shm] : nullptr),
          kinds(threads, Arrive::Sync),
          bar(std::ptrdiff_t(threads), PhaseCheck{this}) {
        if (shm) std::memset(shared.get(), 0xff, shm);
        for (unsigned w = 0; w < threads / 32; ++w) warps.emplace_back(new Warp);
    }
};

inline void PhaseCheck::operator()() noexcept {
    const auto& k = launch->kinds;
    for (unsigned t = 1; t < launch->threads; ++t) {
        if (k[t] != k[0]) {
            std::fprintf(stderr,
                         "steepest kernel emulator: threads 0 and %u of a block reached "
                         "different barriers (%s vs %s): divergent __syncthreads()\n",
                         t, k[0] == Arrive::Sync ? "__syncthreads" : "block end",
                         k[t] == Arrive::Sync ? "__syncthreads" : "block end");
            std::fflush(stderr);
            std::abort();
        }
    }
    if (k[0] == Arrive::BlockEnd && launch->shared_bytes)
        std::memset(launch->shared.get(), 0xff, launch->shared_bytes);
}

inline void arrive(Arrive kind) {
    Here& h = here();
    h.launch->kinds[h.tid] = kind;
    h.launch->bar.arrive_and_wait();
}

inline void* dynamic_shared() { return here().launch->shared.get(); }

// All 32 values of the lanes in `mask` after each has put `v`; the caller
// reads its source lane. Lanes in the mask wait for each other only.
inline std::array<uint64_t, 32> exchange(unsigned mask, uint64_t v) {
    Here& h = here();
    unsigned lane = h.tid % 32;
    unsigned bit = 1u << lane;
    if (!(mask & bit)) fail("a lane called a warp operation with a mask that excludes it");
    Warp& w = *h.launch->warps[h.tid / 32];
    std::array<uint64_t, 32> out;
    if (mask == 0xffffffffu) {
        unsigned p = h.parity;
        h.parity ^= 1u;
        w.buf[p][lane] = v;
        w.bar.arrive_and_wait();
        std::memcpy(out.data(), w.buf[p], sizeof w.buf[p]);
        return out;
    }
    std::unique_lock<std::mutex> lk(w.mu);
    for (;;) {
        if (!w.reading && w.mask != 0 && w.mask != mask && (w.mask & bit))
            fail("lanes of one warp operation passed different masks");
        if (!w.reading && (w.mask == 0 || w.mask == mask) && !(w.arrived & bit)) break;
        w.cv.wait(lk);
    }
    w.mask = mask;
    w.vals[lane] = v;
    w.arrived |= bit;
    if (w.arrived == mask) {
        w.reading = true;
        w.left = mask;
        w.cv.notify_all();
    } else {
        w.cv.wait(lk, [&] { return w.reading && (w.left & bit); });
    }
    out = w.vals;
    w.left &= ~bit;
    if (w.left == 0) {
        w.reading = false;
        w.mask = 0;
        w.arrived = 0;
        w.cv.notify_all();
    }
    return out;
}

template <class T>
uint64_t pack(T v) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>);
    uint64_t u = 0;
    std::memcpy(&u, &v, sizeof(T));
    return u;
}

template <class T>
T unpack(uint64_t u) {
    T v;
    std::memcpy(&v, &u, sizeof(T));
    return v;
}

// A shuffle reading lane `src` (or its own value when `src` is out of range).
template <class T>
T shuffle(unsigned mask, T v, int src) {
    auto vals = exchange(mask, pack(v));
    if (src < 0 || src > 31) return v;
    if (!(mask & (1u << src))) fail("a shuffle read a lane outside its mask");
    return unpack<T>(vals[unsigned(src)]);
}

// The launch mutex: statics stand for shared memory, so one launch at a time.
inline std::mutex& launch_mutex() {
    static std::mutex m;
    return m;
}

// The OS threads that run the CUDA threads, kept across launches (creating
// 256 threads per launch cost more than most kernels). Thread `i` always
// runs CUDA thread `i` of a block. Never destroyed: the threads wait for
// work until the process exits.
class Pool {
   public:
    // Runs job(tid) for tid in [0, n) on n threads; returns when all are done.
    void run(unsigned n, const std::function<void(unsigned)>& job) {
        std::unique_lock<std::mutex> lk(mu_);
        while (threads_.size() < n) {
            unsigned id = unsigned(threads_.size());
            threads_.emplace_back([this, id] { worker(id); });
        }
        job_ = &job;
        active_ = n;
        pending_ = n;
        ++gen_;
        work_.notify_all();
        done_.wait(lk, [&] { return pending_ == 0; });
        job_ = nullptr;
    }

   private:
    void worker(unsigned id) {
        uint64_t seen = 0;
        std::unique_lock<std::mutex> lk(mu_);
        for (;;) {
            work_.wait(lk, [&] { return gen_ != seen && id < active_; });
            seen = gen_;
            const std::function<void(unsigned)>* job = job_;
            lk.unlock();
            (*job)(id);
            lk.lock();
            if (--pending_ == 0) done_.notify_one();
        }
    }

    std::mutex mu_;
    std::condition_variable work_, done_;
    std::vector<std::thread> threads_;
    const std::function<void(unsigned)>* job_ = nullptr;
    unsigned active_ = 0, pending_ = 0;
    uint64_t gen_ = 0;
};

inline Pool& pool() {
    static Pool* p = new Pool;  // leaked on purpose: its threads outlive main
    return *p;
}

// Grid, block and dynamic shared memory of a launch, as the Rust side packs them.
struct LaunchDims {
    unsigned grid[3];
    unsigned block[3];
    unsigned long long shared;
};

// Runs `body` as a kernel launch: one thread per CUDA thread, blocks in
// order, one barrier (the block end) between blocks.
template <class F>
void run(const LaunchDims& d, F&& body) {
    dim3 g{d.grid[0], d.grid[1], d.grid[2]};
    dim3 b{d.block[0], d.block[1], d.block[2]};
    Launch L(g, b, size_t(d.shared));
    std::function<void(unsigned)> job = [&L, &body, g, b](unsigned tid) {
        here_.launch = &L;
        here_.tid = tid;
        here_.parity = 0;
        here_.block_dim = b;
        here_.grid_dim = g;
        here_.thread_idx = {tid % b.x, (tid / b.x) % b.y, tid / (b.x * b.y)};
        for (unsigned z = 0; z < g.z; ++z)
            for (unsigned y = 0; y < g.y; ++y)
                for (unsigned x = 0; x < g.x; ++x) {
                    here_.block_idx = {x, y, z};
                    body();
                    arrive(Arrive::BlockEnd);
                }
        here_.launch = nullptr;
    };
    pool().run(L.threads, job);
}

// One character per kernel parameter type, compared with the Rust packing.
template <class T>
constexpr char sig_code() {
    using U = std::remove_cv_t<T>;
    if constexpr (std::is_pointer_v<U>) return 'p';
    else if constexpr (std::is_same_v<U, float>) return 'f';
    else if constexpr (std::is_same_v<U, double>) return 'd';
    else if constexpr (std::is_integral_v<U> && sizeof(U) == 4) return std::is_signed_v<U> ? 'i' : 'u';
    else if constexpr (std::is_integral_v<U> && sizeof(U) == 8) return std::is_signed_v<U> ? 'I' : 'U';
    else return '?';
}

template <class... A, size_t... I>
void call_unpacked(void (*k)(A...), void** args, std::index_sequence<I...>) {
    k(*static_cast<std::remove_cv_t<A>*>(args[I])...);
}

// The generic launcher behind every exported kernel: checks the argument
// signature and the dimensions, then runs the kernel with `args` (one pointer
// per parameter, as `cuLaunchKernel` takes them) unpacked into its types.
// Returns 0, or 1 on a signature mismatch, 2 on bad dimensions.
template <class... A>
int launch(void (*k)(A...), const LaunchDims* d, void** args, const char* sig) {
    static constexpr char expect[] = {sig_code<A>()..., '\0'};
    if (std::strcmp(sig, expect) != 0) {
        std::fprintf(stderr, "steepest kernel emulator: argument signature %s, kernel takes %s\n", sig,
                     expect);
        return 1;
    }
    unsigned threads = d->block[0] * d->block[1] * d->block[2];
    if (threads == 0 || threads > 1024 || threads % 32 != 0) return 2;
    if (d->grid[0] == 0 || d->grid[1] == 0 || d->grid[2] == 0 || d->grid[1] > 65535 || d->grid[2] > 65535)
        return 2;
    std::lock_guard<std::mutex> g(launch_mutex());
    run(*d, [&] { call_unpacked(k, args, std::index_sequence_for<A...>{}); });
    return 0;
}

}  // namespace emu

// ---------------------------------------------------------------- builtins

#define threadIdx (::emu::here().thread_idx)
#define blockIdx (::emu::here().block_idx)
#define blockDim (::emu::here().block_dim)
#define gridDim (::emu::here().grid_dim)

inline void __syncthreads() { emu::arrive(emu::Arrive::Sync); }

inline void __syncwarp(unsigned mask = 0xffffffffu) { (void)emu::exchange(mask, 0); }

template <class T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    int lane = int(emu::here().tid % 32);
    return emu::shuffle(mask, v, (lane & ~(width - 1)) + (src & (width - 1)));
}

template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    int lane = int(emu::here().tid % 32);
    int src = lane ^ lane_mask;
    // Reading a later group of `width` lanes returns the caller's own value.
    if (src / width > lane / width) src = lane;
    return emu::shuffle(mask, v, src);
}

template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    int lane = int(emu::here().tid % 32);
    int src = (lane % width) + int(delta) < width ? lane + int(delta) : lane;
    return emu::shuffle(mask, v, src);
}

template <class T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    int lane = int(emu::here().tid % 32);
    int src = (lane % width) >= int(delta) ? lane - int(delta) : lane;
    return emu::shuffle(mask, v, src);
}

inline unsigned __ballot_sync(unsigned mask, int pred) {
    auto vals = emu::exchange(mask, pred ? 1 : 0);
    unsigned out = 0;
    for (unsigned l = 0; l < 32; ++l)
        if ((mask >> l & 1u) && vals[l]) out |= 1u << l;
    return out;
}

inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }

inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == mask; }

template <class T>
T atomicAdd(T* p, T v) {
    return std::atomic_ref<T>(*p).fetch_add(v, std::memory_order_relaxed);
}

template <class T>
T atomicOr(T* p, T v) {
    return std::atomic_ref<T>(*p).fetch_or(v, std::memory_order_relaxed);
}

template <class T>
T atomicExch(T* p, T v) {
    return std::atomic_ref<T>(*p).exchange(v, std::memory_order_relaxed);
}

template <class T>
T atomicCAS(T* p, T expected, T desired) {
    std::atomic_ref<T>(*p).compare_exchange_strong(expected, desired, std::memory_order_relaxed);
    return expected;
}

template <class T>
T atomicMax(T* p, T v) {
    std::atomic_ref<T> a(*p);
    T old = a.load(std::memory_order_relaxed);
    while (old < v && !a.compare_exchange_weak(old, v, std::memory_order_relaxed)) {
    }
    return old;
}

// Exports kernel `name` to Rust as `steepest_emu_<name>`.
#define STEEPEST_EMU_EXPORT(name)                                                             \
    extern "C" int steepest_emu_##name(const ::emu::LaunchDims* d, void** args, const char* sig) { \
        return ::emu::launch(name, d, args, sig);                                             \
    }

#ifdef STEEPEST_EMU_RUNTIME
// The emulator's stand-in for cublasGemmStridedBatchedEx, compiled once
// (build.rs defines STEEPEST_EMU_RUNTIME in one translation unit): column-
// major C (f32) ← α·op(A)·op(B) + β·C per batch member, A and B of `kind`
// (0 f32, 1 bf16, 2 f16) widened to f32, f32 accumulation in order; when
// β = 0, C is not read (cuBLAS semantics: it may hold NaN). The extents were
// checked by the caller (src/device/emu.rs).
extern "C" void steepest_emu_gemm(int transa, int transb, long long m, long long n, long long k, float alpha,
                                  const void* a, long long lda, long long stride_a, const void* b,
                                  long long ldb, long long stride_b, float beta, float* c, long long ldc,
                                  long long stride_c, long long batch, int kind) {
    auto rd = [kind](const void* p, long long i) -> float {
        if (kind == 0) return static_cast<const float*>(p)[i];
        if (kind == 1) return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
        return __half2float(static_cast<const __half*>(p)[i]);
    };
    std::vector<float> ar(size_t(m * k)), bc(size_t(n * k));
    for (long long p = 0; p < batch; ++p) {
        long long oa = p * stride_a, ob = p * stride_b;
        for (long long i = 0; i < m; ++i)
            for (long long q = 0; q < k; ++q)
                ar[size_t(i * k + q)] = rd(a, oa + (transa ? q + i * lda : i + q * lda));
        for (long long j = 0; j < n; ++j)
            for (long long q = 0; q < k; ++q)
                bc[size_t(j * k + q)] = rd(b, ob + (transb ? j + q * ldb : q + j * ldb));
        float* cp = c + p * stride_c;
        for (long long j = 0; j < n; ++j)
            for (long long i = 0; i < m; ++i) {
                float acc = 0.0f;
                const float* x = &ar[size_t(i * k)];
                const float* y = &bc[size_t(j * k)];
                for (long long q = 0; q < k; ++q) acc += x[q] * y[q];
                float& cij = cp[i + j * ldc];
                cij = beta == 0.0f ? alpha * acc : alpha * acc + beta * cij;
            }
    }
}
#endif
