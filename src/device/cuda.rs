//! The CUDA backend (feature `cuda`): the kernels of `kernels/*.cu` as PTX
//! embedded by `build.rs`, launched on candle's stream, with candle's cuBLAS
//! handle for the GEMMs. What to launch is decided by `launch/`, shared
//! with the emulator; this file only provides memory, launches and GEMMs, and
//! the device addresses of candle tensors.
//!
//! Invariant (see `launch/mod.rs`): kernels write parameters and state through
//! raw device addresses, outside candle's storage locks. Every launch, copy
//! and GEMM here goes on the stream candle's own ops use in the calling
//! thread (candle's `CudaDevice` runs on CUDA's per-thread default stream),
//! so they are ordered with those ops; nothing here runs on another stream.
//! Host threads sharing a device each have their own stream: what one thread
//! frees (stream-ordered) must not be something another thread's pending
//! kernels read, hence the per-thread table cache. The GEMMs use the
//! device's cuBLAS handle, as candle's own matmuls do, so steps on one device
//! from several host threads at once share one handle (its settings and
//! workspace), which cuBLAS leaves to the caller to make safe and which has
//! not been tested: step each device from one thread (`train_lm` runs one job
//! at a time on CUDA). An output that shares memory with another operand is
//! refused, as on the CPU.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::cuda_backend::cudarc;
use candle_core::cuda_backend::cudarc::driver::{
    result as drv,
    sys::{CUdevice_attribute, CUfunction_attribute_enum},
    CudaFunction, CudaSlice, CudaStream, DevicePtr,
};
use candle_core::cuda_backend::{CudaDevice, DeviceId};
use candle_core::{DType, Storage, Tensor, Var};

use super::launch::{self, Backend, Elt, Gemm, Launch, MtTensor, Resolve, TableCache};
use super::{AdamItem, DecayTerm, SgdItem};
use crate::error::{fail, Error, Result};
use crate::linalg::{NewtonSchulz, TopSingular};

mod ptx {
    include!(concat!(env!("OUT_DIR"), "/steepest_ptx.rs"));
}

fn derr(who: &str, e: impl std::fmt::Debug) -> Error {
    Error::device(who, format!("{e:?}"))
}

/// A device buffer and its address on the stream.
pub(crate) struct CudaBuf {
    _slice: CudaSlice<u8>,
    addr: u64,
}

/// A loaded kernel, its static shared memory (from the driver) and the
/// dynamic shared memory it has been opted in to so far.
#[derive(Clone)]
struct Kernel {
    f: CudaFunction,
    static_shared: u32,
    opted_in: u32,
}

/// One CUDA device's backend state.
pub(crate) struct Cuda {
    dev: CudaDevice,
    stream: Arc<CudaStream>,
    funcs: Mutex<HashMap<String, Kernel>>,
    /// The shared memory a block may opt in to on this device (the
    /// driver's `MAX_SHARED_MEMORY_PER_BLOCK_OPTIN`), once read; 0 until
    /// then (see [`Cuda::shared_limit`]).
    shared_max: std::sync::atomic::AtomicU32,
}

thread_local! {
    /// Each host thread's uploaded tables, per device. candle's stream is
    /// CUDA's per-thread default stream, so a table evicted (and freed,
    /// stream-ordered) by one thread must not be one another thread's
    /// pending kernels still read: each thread keeps its own.
    static TABLES: std::cell::RefCell<HashMap<DeviceId, TableCache<CudaBuf>>> =
        std::cell::RefCell::new(HashMap::new());
}

/// The backend of `dev` (one per device, created on first use). It lives as
/// long as the process, and with it a clone of the device (its stream, cuBLAS
/// handle and loaded modules): each `Device::new_cuda` is a new device id, so
/// a process that keeps creating devices to run kernels on keeps them all.
/// Create a device once and clone it, as candle intends.
fn backend(dev: &CudaDevice) -> Arc<Cuda> {
    static ALL: OnceLock<Mutex<HashMap<DeviceId, Arc<Cuda>>>> = OnceLock::new();
    let mut all = ALL
        .get_or_init(|| Mutex::new(HashMap::new()))
        .lock()
        .expect("backends lock");
    all.entry(dev.id())
        .or_insert_with(|| {
            Arc::new(Cuda {
                dev: dev.clone(),
                stream: dev.cuda_stream(),
                funcs: Mutex::new(HashMap::new()),
                shared_max: std::sync::atomic::AtomicU32::new(0),
            })
        })
        .clone()
}

impl Cuda {
    /// The shared memory a block may opt in to on this device, from the
    /// driver (read once, then kept). If the driver cannot say (a context
    /// holding an earlier error), 48 KiB, the amount every block has, for
    /// this call only: the next asks again, rather than keeping the larger
    /// shapes on candle's slower ops for the life of the process.
    fn shared_limit(&self) -> u32 {
        use std::sync::atomic::Ordering;
        let known = self.shared_max.load(Ordering::Relaxed);
        if known != 0 {
            return known;
        }
        let read = self
            .stream
            .context()
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
            .ok()
            .and_then(|v| u32::try_from(v).ok())
            .filter(|&v| v > 0);
        match read {
            Some(v) => {
                self.shared_max.store(v, Ordering::Relaxed);
                v
            }
            None => launch::SHARED_DEFAULT,
        }
    }

    /// The loaded kernel `name` (loaded once per device, under the module
    /// name that carries its PTX's hash).
    fn func(&self, name: &str) -> Result<Kernel> {
        let mut funcs = self.funcs.lock().expect("funcs lock");
        if let Some(k) = funcs.get(name) {
            return Ok(k.clone());
        }
        let Some(&(_, module)) = ptx::ENTRIES.iter().find(|(e, _)| *e == name) else {
            fail!(Device, "cuda", "no kernel `{name}` in the embedded PTX");
        };
        let (module_name, text) = ptx::MODULES[module];
        let f = self
            .dev
            .get_or_load_custom_func(name, module_name, text)?
            .into_cuda_function();
        let static_shared = f.shared_size_bytes().map_err(|e| derr(name, e))? as u32;
        let k = Kernel {
            f,
            static_shared,
            opted_in: 0,
        };
        funcs.insert(name.to_string(), k.clone());
        Ok(k)
    }

    /// Raises `name`'s dynamic shared memory limit to at least `bytes`
    /// (never lowers it: under the lock, so that two threads opting in to
    /// different sizes leave the larger one set).
    fn opt_in(&self, name: &str, k: &Kernel, bytes: u32) -> Result<()> {
        if bytes <= k.opted_in {
            return Ok(());
        }
        let mut funcs = self.funcs.lock().expect("funcs lock");
        let Some(entry) = funcs.get_mut(name) else {
            fail!(Device, "cuda", "kernel `{name}` not loaded");
        };
        if bytes > entry.opted_in {
            entry
                .f
                .set_attribute(
                    CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    bytes as i32,
                )
                .map_err(|e| derr(name, e))?;
            entry.opted_in = bytes;
        }
        Ok(())
    }
}

impl Backend for Cuda {
    type Buf = CudaBuf;

    fn addr(buf: &CudaBuf) -> u64 {
        buf.addr
    }

    fn alloc_zeroed(&self, bytes: usize) -> Result<CudaBuf> {
        let slice = self
            .stream
            .alloc_zeros::<u8>(bytes.max(1))
            .map_err(|e| derr("cuda alloc", e))?;
        let addr = slice.device_ptr(&self.stream).0;
        Ok(CudaBuf {
            _slice: slice,
            addr,
        })
    }

    fn alloc_uninit(&self, bytes: usize) -> Result<CudaBuf> {
        // SAFETY: the launch code writes every byte before reading it (the
        // emulator fills such buffers with NaN to check that).
        let slice =
            unsafe { self.stream.alloc::<u8>(bytes.max(1)) }.map_err(|e| derr("cuda alloc", e))?;
        let addr = slice.device_ptr(&self.stream).0;
        Ok(CudaBuf {
            _slice: slice,
            addr,
        })
    }

    fn upload(&self, bytes: &[u8]) -> Result<CudaBuf> {
        let slice = self
            .stream
            .clone_htod(bytes)
            .map_err(|e| derr("cuda upload", e))?;
        let addr = slice.device_ptr(&self.stream).0;
        Ok(CudaBuf {
            _slice: slice,
            addr,
        })
    }

    fn download(&self, addr: u64, out: &mut [u8]) -> Result<()> {
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| derr("cuda", e))?;
        // SAFETY: `addr` holds `out.len()` bytes; the stream sync below
        // completes the copy before `out` is read.
        unsafe { drv::memcpy_dtoh_async(out, addr, self.stream.cu_stream()) }
            .map_err(|e| derr("cuda download", e))?;
        self.stream.synchronize().map_err(|e| derr("cuda sync", e))
    }

    fn launch(&self, l: &Launch) -> Result<()> {
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| derr("cuda", e))?;
        let k = self.func(&l.kernel)?;
        // Static and dynamic shared memory together above 48 KiB need the
        // opt-in, whatever the dynamic part alone is.
        if let Some(bytes) =
            launch::shared_opt_in(&l.kernel, k.static_shared, l.shared, self.shared_limit())?
        {
            self.opt_in(&l.kernel, &k, bytes)?;
        }
        let (mut params, _sig) = launch::pack(&l.args);
        // SAFETY: `params` points into `l.args` (alive for the call; the
        // driver copies the values at launch); the argument list is the one
        // the emulator checks against the kernel's parameter types.
        unsafe {
            drv::launch_kernel(
                k.f.cu_function(),
                (l.grid[0], l.grid[1], l.grid[2]),
                (l.block, 1, 1),
                l.shared,
                self.stream.cu_stream(),
                &mut params,
            )
        }
        .map_err(|e| derr(&l.kernel, e))
    }

    fn gemm(&self, g: &Gemm) -> Result<()> {
        use cudarc::cublas::sys::{
            cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t,
        };
        let blas = self.dev.cublas_handle();
        let op = |t: bool| {
            if t {
                cublasOperation_t::CUBLAS_OP_T
            } else {
                cublasOperation_t::CUBLAS_OP_N
            }
        };
        let ty = match g.op {
            Elt::F32 => cudaDataType_t::CUDA_R_32F,
            Elt::BF16 => cudaDataType_t::CUDA_R_16BF,
            Elt::F16 => cudaDataType_t::CUDA_R_16F,
        };
        let (alpha, beta) = (g.alpha, g.beta);
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| derr("cuda", e))?;
        // SAFETY: the addresses and extents come from `launch/` (checked by
        // the emulator's GEMM stand-in); the handle is candle's, bound to the
        // device's stream, in host pointer mode (α, β on the host).
        unsafe {
            cudarc::cublas::result::gemm_strided_batched_ex(
                *blas.handle(),
                op(g.transa),
                op(g.transb),
                g.m as i32,
                g.n as i32,
                g.k as i32,
                (&alpha) as *const f32 as *const _,
                g.a as *const _,
                ty,
                g.lda as i32,
                g.stride_a as i64,
                g.b as *const _,
                ty,
                g.ldb as i32,
                g.stride_b as i64,
                (&beta) as *const f32 as *const _,
                g.c as *mut _,
                cudaDataType_t::CUDA_R_32F,
                g.ldc as i32,
                g.stride_c as i64,
                g.batch as i32,
                cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| derr("cublas gemm", e))
    }

    fn with_cache<R>(&self, f: impl FnOnce(&mut TableCache<CudaBuf>) -> R) -> R {
        TABLES.with(|t| f(t.borrow_mut().entry(self.dev.id()).or_default()))
    }

    fn shared_max(&self) -> u32 {
        self.shared_limit()
    }
}

/// Device addresses of CUDA tensors (inputs made contiguous and kept alive),
/// with the storage, byte span and direction of each, to refuse an output
/// that shares its storage with another operand, by the CPU path's and the
/// emulator's rule: also two disjoint views of one storage (a program that
/// runs on the GPU then runs on the CPU too).
struct Addrs<'a> {
    be: &'a Cuda,
    keep: Vec<Tensor>,
    /// (storage base, none for an empty storage; start; end; written)
    spans: Vec<(Option<u64>, u64, u64, bool)>,
}

impl<'a> Addrs<'a> {
    fn new(be: &'a Cuda) -> Self {
        Self {
            be,
            keep: Vec::new(),
            spans: Vec::new(),
        }
    }

    /// Records `[start, end)` of the storage at `base`; errors when it is
    /// written and shares its storage with (or overlaps) any operand, or
    /// shares it with an operand that is written.
    fn claim(&mut self, base: Option<u64>, start: u64, end: u64, write: bool) -> Result<()> {
        let same = |b: Option<u64>| b.is_some() && b == base;
        let clash = self
            .spans
            .iter()
            .any(|&(b, s, e, w)| (write || w) && (same(b) || (start < e && s < end)));
        if clash {
            fail!(
                Device,
                "in-place kernel",
                "an output tensor shares its storage with another operand"
            );
        }
        self.spans.push((base, start, end, write));
        Ok(())
    }
}

impl Resolve for Addrs<'_> {
    fn addr(&mut self, t: &Tensor, write: bool) -> Result<u64> {
        let t = if write || t.is_contiguous() {
            t.clone()
        } else {
            t.contiguous()?
        };
        let (base, addr) = {
            let (s, l) = t.storage_and_layout();
            let Storage::Cuda(cs) = &*s else {
                fail!(Device, "cuda", "tensor is not on a CUDA device");
            };
            if !cs.device.same_device(&self.be.dev) {
                fail!(Device, "cuda", "tensors on different CUDA devices");
            }
            let Some((o, _)) = l.contiguous_offsets() else {
                fail!(Device, "cuda", "kernels write contiguous tensors only");
            };
            let stream = &self.be.stream;
            let (base, len, size) = match cs.dtype() {
                DType::F32 => {
                    let c = cs.as_cuda_slice::<f32>()?;
                    (c.device_ptr(stream).0, c.len(), 4)
                }
                DType::BF16 => {
                    let c = cs.as_cuda_slice::<half::bf16>()?;
                    (c.device_ptr(stream).0, c.len(), 2)
                }
                DType::F16 => {
                    let c = cs.as_cuda_slice::<half::f16>()?;
                    (c.device_ptr(stream).0, c.len(), 2)
                }
                other => fail!(Device, "cuda", "no kernel for dtype {other:?}"),
            };
            // Empty allocations need not have distinct addresses.
            let id = (len > 0).then_some(base);
            (id, base + (o * size) as u64)
        };
        let bytes = (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        self.claim(base, addr, addr + bytes, write)?;
        self.keep.push(t);
        Ok(addr)
    }
}

/// The CUDA device of `ts`, if they are all on one CUDA device and every
/// dtype has a kernel (otherwise the caller takes the generic path).
fn cuda_of(ts: &[&Tensor]) -> Option<CudaDevice> {
    let first = ts.first()?;
    let candle_core::Device::Cuda(dev) = first.device() else {
        return None;
    };
    ts.iter()
        .all(|t| t.device().same_device(first.device()) && Elt::of(t.dtype()).is_some())
        .then(|| dev.clone())
}

fn decay_tensors<'a>(d: &DecayTerm<'a>, out: &mut Vec<&'a Tensor>) {
    if let Some(r) = d.rank1 {
        out.push(r.a);
        out.push(r.b);
    }
}

/// The multi-tensor protocol on CUDA: when `ts` are all on one CUDA device
/// with kernel dtypes, resolve the table rows with `tables`, then `run`
/// them; `None` otherwise (the caller takes another path). The resolved
/// tensors are kept alive until `run` returns.
fn on_cuda<T>(
    ts: &[&Tensor],
    tables: impl FnOnce(&mut dyn Resolve) -> Result<Vec<MtTensor>>,
    run: impl FnOnce(&Cuda, &[MtTensor]) -> Result<T>,
) -> Result<Option<T>> {
    let Some(dev) = cuda_of(ts) else {
        return Ok(None);
    };
    let be = backend(&dev);
    let mut r = Addrs::new(&be);
    let tabs = tables(&mut r)?;
    Ok(Some(run(&be, &tabs)?))
}

/// [`super::adamw_step`] as one `adamw_*` launch per parameter dtype;
/// `Ok(false)` when the items are not all on one CUDA device in f32/bf16/f16.
pub(crate) fn adamw_step(items: &[AdamItem<'_>], b1: f64, b2: f64, eps: f64) -> Result<bool> {
    let mut ts = Vec::new();
    for it in items {
        ts.extend([it.w.as_tensor(), it.g, it.m.as_tensor(), it.v.as_tensor()]);
        decay_tensors(&it.decay, &mut ts);
    }
    let done = on_cuda(
        &ts,
        |r| launch::adam_tensors(items, r),
        |be, tabs| launch::adamw(be, tabs, b1, b2, eps),
    )?;
    Ok(done.is_some())
}

/// [`super::sgd_step`] as one `sgd_*` launch per parameter dtype.
pub(crate) fn sgd_step(items: &[SgdItem<'_>], momentum: f64, nesterov: bool) -> Result<bool> {
    let mut ts = Vec::new();
    for it in items {
        ts.extend([it.w.as_tensor(), it.g]);
        if let Some(b) = it.buf {
            ts.push(b.as_tensor());
        }
        decay_tensors(&it.decay, &mut ts);
    }
    let done = on_cuda(
        &ts,
        |r| launch::sgd_tensors(items, r),
        |be, tabs| launch::sgd(be, tabs, momentum, nesterov),
    )?;
    Ok(done.is_some())
}

/// [`super::ema_momentum`] as one `ema_*` launch per gradient dtype.
pub(crate) fn ema_momentum(
    grads: &[&Tensor],
    bufs: &[&Var],
    out: &Var,
    momentum: f64,
    nesterov: bool,
) -> Result<bool> {
    let mut ts: Vec<&Tensor> = grads.to_vec();
    ts.extend(bufs.iter().map(|b| b.as_tensor()));
    ts.push(out.as_tensor());
    let done = on_cuda(
        &ts,
        |r| launch::ema_tensors(grads, bufs, out.as_tensor(), r),
        |be, tabs| launch::ema(be, tabs, momentum, nesterov),
    )?;
    Ok(done.is_some())
}

/// [`super::apply_step`] as one `apply_*` launch per parameter dtype.
pub(crate) fn apply_step(
    ws: &[&Var],
    d: &Tensor,
    alphas: &[f64],
    decays: &[DecayTerm<'_>],
) -> Result<bool> {
    let mut ts: Vec<&Tensor> = ws.iter().map(|w| w.as_tensor()).collect();
    ts.push(d);
    for dec in decays {
        decay_tensors(dec, &mut ts);
    }
    // `Addrs` keeps the contiguous copy alive until the launch.
    let done = on_cuda(
        &ts,
        |r| launch::apply_tensors(ws, &d.contiguous()?, alphas, decays, r),
        launch::apply,
    )?;
    Ok(done.is_some())
}

/// [`super::first_nonfinite`]: one `finite_*` launch per dtype, one host sync.
pub(crate) fn first_nonfinite(ts: &[&Tensor]) -> Result<Option<Option<usize>>> {
    on_cuda(
        ts,
        |r| launch::reduce_tensors(ts, r),
        |be, tabs| Ok(launch::nonfinite(be, tabs)?.iter().position(|&f| f)),
    )
}

/// [`super::sum_squares`]: `sumsq_*` then `sumsq_finish`, one host sync.
pub(crate) fn sum_squares(ts: &[&Tensor]) -> Result<Option<Vec<f64>>> {
    on_cuda(ts, |r| launch::reduce_tensors(ts, r), launch::sum_squares)
}

/// The shared memory (static and dynamic together, in bytes) a block of
/// this crate's kernels may opt in to on `dev`, as its driver reports it
/// (227 KiB on sm_90, 163 KiB on sm_80, 99 KiB on sm_86/sm_89; 48 KiB if
/// the driver does not say): the power iteration runs on the kernels for a
/// short side `k` while `34 816 + 8·k` bytes fit it (k ≤ 24 704 on sm_90),
/// on candle's ops beyond.
pub fn shared_memory_per_block(dev: &CudaDevice) -> u32 {
    backend(dev).shared_limit()
}

/// [`super::power_iteration`] on the device (no host sync); `None` when no
/// kernel takes it.
pub(crate) fn power_iteration(
    w: &Tensor,
    start: Option<&Tensor>,
    iters: usize,
) -> Result<Option<TopSingular>> {
    let candle_core::Device::Cuda(dev) = w.device() else {
        return Ok(None);
    };
    let shared_max = backend(dev).shared_limit();
    run_power(launch::power_prepare(w, start, shared_max)?, iters)
}

/// [`super::power_iteration_members`] on the device, each matrix and state
/// vector used where it is (no host sync); `None` when no kernel takes it.
pub(crate) fn power_iteration_members(
    ws: &[Tensor],
    vs: &[Var],
    iters: usize,
) -> Result<Option<TopSingular>> {
    let same = |t: &Tensor| t.device().same_device(ws[0].device());
    if !ws[0].device().is_cuda() || !ws.iter().all(same) || !vs.iter().all(|v| same(v.as_tensor()))
    {
        return Ok(None);
    }
    let candle_core::Device::Cuda(dev) = ws[0].device() else {
        return Ok(None);
    };
    let shared_max = backend(dev).shared_limit();
    run_power(launch::power_prepare_members(ws, vs, shared_max)?, iters)
}

fn run_power(call: Option<launch::PowerCall>, iters: usize) -> Result<Option<TopSingular>> {
    let Some(call) = call else {
        return Ok(None);
    };
    let candle_core::Device::Cuda(dev) = call.ws[0].device() else {
        return Ok(None);
    };
    let be = backend(dev);
    let mut r = Addrs::new(&be);
    let job = call.job(iters, &mut r)?;
    launch::power_iteration(&*be, &job)?;
    drop(r);
    Ok(Some(call.finish()?))
}

/// [`super::msign`] on the device: kernels plus cuBLAS strided-batched
/// GEMMs (no host sync); `None` when no kernel takes it.
pub(crate) fn msign(g: &Tensor, ns: &NewtonSchulz) -> Result<Option<Tensor>> {
    msign_with_tile(g, ns, None)
}

fn msign_with_tile(g: &Tensor, ns: &NewtonSchulz, tile: Option<usize>) -> Result<Option<Tensor>> {
    let candle_core::Device::Cuda(dev) = g.device() else {
        return Ok(None);
    };
    let Some(call) = launch::msign_prepare(g, ns)? else {
        return Ok(None);
    };
    let be = backend(dev);
    let mut r = Addrs::new(&be);
    let job = call.job(ns, tile, &mut r)?;
    launch::msign(&*be, &job)?;
    drop(r);
    Ok(Some(call.out))
}

/// `msign` of a CUDA tensor with the symmetric products cut into tiles of
/// `tile` rows (`tile ≥ short side`: one GEMM each), for benchmarks that
/// choose the tile size; [`super::msign`] uses the default. Errors when the
/// tensor is not on a CUDA device or no kernel takes it.
pub fn msign_tiled(g: &Tensor, ns: &NewtonSchulz, tile: usize) -> Result<Tensor> {
    ns.validate("msign_tiled")?;
    match msign_with_tile(g, ns, Some(tile))? {
        Some(out) => Ok(out),
        None => fail!(
            Device,
            "msign_tiled",
            "no CUDA kernel for {:?} {:?} on {:?}",
            g.dtype(),
            g.dims(),
            g.device().location()
        ),
    }
}

/// The CUDA device of `device`; an error naming `who` otherwise.
fn cuda_device<'d>(device: &'d candle_core::Device, who: &str) -> Result<&'d CudaDevice> {
    match device {
        candle_core::Device::Cuda(dev) => Ok(dev),
        other => fail!(Device, who, "not a CUDA device: {:?}", other.location()),
    }
}

/// Keeps the device memory that candle frees in the CUDA memory pool of
/// `device` instead of returning it to the driver.
///
/// candle allocates with `cuMemAllocAsync` from the device's memory pool,
/// whose release threshold is 0 by default: at every synchronisation (a
/// loss read back, a finite check) the pool hands its free memory back, and
/// the next step's allocations map it again. PyTorch's caching allocator
/// keeps freed blocks instead. This sets the pool's release threshold to
/// `u64::MAX`, so freed memory stays reserved by this process for reuse
/// (other processes on the GPU cannot use it). It changes the device's
/// current pool for the whole process; the training example and the GPU
/// benchmark call it once at start-up. Errors when `device` is not CUDA.
pub fn retain_freed_memory(device: &candle_core::Device) -> Result<()> {
    use cudarc::driver::sys::CUmemPool_attribute;
    let dev = cuda_device(device, "retain_freed_memory")?;
    let ctx = dev.cuda_stream().context().clone();
    ctx.bind_to_thread().map_err(|e| derr("cuda", e))?;
    let mut threshold = u64::MAX;
    // SAFETY: the device comes from a live context; the attribute takes a
    // `u64` (cuMemPoolSetAttribute, RELEASE_THRESHOLD).
    unsafe {
        let pool = drv::device::get_mem_pool(ctx.cu_device())
            .map_err(|e| derr("retain_freed_memory", e))?;
        drv::mem_pool::set_attribute(
            pool,
            CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
        .map_err(|e| derr("retain_freed_memory", e))
    }
}

/// What the driver reports for a kernel of `kernels/` once loaded on a
/// device (the ptxas figures of the JIT-compiled code).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelResources {
    /// Registers per thread.
    pub registers: u32,
    /// Static shared memory per block, bytes.
    pub static_shared: u32,
    /// Local memory per thread (spills, stack), bytes.
    pub local: u32,
    /// The static shared memory `launch/` assumes for it (what the
    /// emulator checks launches with).
    pub assumed_static_shared: u32,
}

/// Loads kernel `name` on `device` and reports its resources.
pub fn kernel_resources(device: &candle_core::Device, name: &str) -> Result<KernelResources> {
    let dev = cuda_device(device, "kernel_resources")?;
    let be = backend(dev);
    be.stream
        .context()
        .bind_to_thread()
        .map_err(|e| derr("cuda", e))?;
    let k = be.func(name)?;
    let get = |a| {
        k.f.get_attribute(a)
            .map(|v| v as u32)
            .map_err(|e| derr(name, e))
    };
    Ok(KernelResources {
        registers: get(CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_NUM_REGS)?,
        static_shared: k.static_shared,
        local: get(CUfunction_attribute_enum::CU_FUNC_ATTRIBUTE_LOCAL_SIZE_BYTES)?,
        assumed_static_shared: launch::static_shared(name),
    })
}

/// The kernel entry points in the embedded PTX (for the GPU tests).
pub fn ptx_entries() -> Vec<&'static str> {
    ptx::ENTRIES.iter().map(|(e, _)| *e).collect()
}
