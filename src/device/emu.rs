//! The CUDA kernels of `kernels/*.cu`, run on the CPU by the crate's kernel
//! emulator, on CPU tensors.
//!
//! `build.rs` compiles every `.cu` file with the host C++ compiler against
//! `kernels/emu.h` (one OS thread per CUDA thread of a block, a
//! `std::barrier` for `__syncthreads`, warp shuffles as an exchange among
//! 32 lanes, blocks one after another). The functions here have the
//! signatures of the device seam ([`super::adamw_step`], …) and run the same
//! launch code as the CUDA backend (`launch/`: tables, grids, argument
//! packing, the power-iteration and Newton–Schulz sequences); only the
//! backend differs: host memory stands for device memory, and a CPU GEMM with
//! cuBLAS's column-major `C ← α·op(A)·op(B) + β·C` semantics stands for
//! cuBLAS. They exist to test the kernels against the CPU path on every
//! `cargo test`, without a GPU; they are slow (hundreds of OS threads per
//! launch) and are never used by the optimizers.

use std::alloc::Layout;
use std::collections::BTreeMap;
use std::ffi::{c_char, c_int, c_void, CString};
use std::sync::{Mutex, OnceLock};

use candle_core::{Tensor, Var};

use super::access::{with_cpu_data, Data, DataMut};
use super::launch::{self, Backend, Elt, Gemm, Launch, Resolve, TableCache};
use super::{AdamItem, DecayTerm, SgdItem};
use crate::error::{fail, Result};
use crate::linalg::{NewtonSchulz, TopSingular};

/// Grid, block and shared memory as `emu::LaunchDims` in `emu.h` takes them.
#[repr(C)]
struct LaunchDims {
    grid: [u32; 3],
    block: [u32; 3],
    shared: u64,
}

type EmuFn = unsafe extern "C" fn(*const LaunchDims, *mut *mut c_void, *const c_char) -> c_int;

/// Declares the exported launcher `steepest_emu_<name>` of each kernel and
/// the lookup by name (the names are the PTX entry points too).
macro_rules! emu_kernels {
    ($($name:ident),* $(,)?) => {
        mod ffi {
            use super::*;
            extern "C" {
                $(
                    #[link_name = concat!("steepest_emu_", stringify!($name))]
                    pub(super) fn $name(
                        d: *const LaunchDims,
                        args: *mut *mut c_void,
                        sig: *const c_char,
                    ) -> c_int;
                )*
            }
        }

        /// Every kernel of `kernels/*.cu`, by entry-point name.
        pub(crate) const KERNELS: &[&str] = &[$(stringify!($name)),*];

        fn kernel_fn(name: &str) -> Option<EmuFn> {
            match name {
                $(stringify!($name) => Some(ffi::$name as EmuFn),)*
                _ => None,
            }
        }
    };
}

emu_kernels!(
    adamw_f32,
    adamw_bf16,
    adamw_f16,
    sgd_f32,
    sgd_bf16,
    sgd_f16,
    ema_f32,
    ema_bf16,
    ema_f16,
    apply_f32,
    apply_bf16,
    apply_f16,
    finite_f32,
    finite_bf16,
    finite_f16,
    sumsq_f32,
    sumsq_bf16,
    sumsq_f16,
    sumsq_finish,
    power_start,
    power_gram_f32,
    power_gram_bf16,
    power_gram_f16,
    power_normalize,
    power_store,
    ns_load_f32,
    ns_load_bf16,
    ns_load_f16,
    ns_store_f32,
    ns_store_bf16,
    ns_store_f16,
    ns_symmetrize,
    ns_shift_diag,
    ns_copy_cast,
);

/// "Device" memory of the emulator: an exact-size heap block (so that the
/// AddressSanitizer build sees a one-past-the-end access), 16-byte aligned.
pub(crate) struct EmuBuf {
    ptr: *mut u8,
    layout: Layout,
}

// SAFETY: the block is owned; kernels access it only during a launch.
unsafe impl Send for EmuBuf {}
unsafe impl Sync for EmuBuf {}

impl Drop for EmuBuf {
    fn drop(&mut self) {
        emu()
            .regions
            .lock()
            .expect("regions lock")
            .remove(&(self.ptr as u64));
        // SAFETY: allocated in `Emu::alloc_zeroed` with this layout.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) }
    }
}

/// The emulator backend.
pub(crate) struct Emu {
    cache: Mutex<TableCache<EmuBuf>>,
    /// Live allocations (address → bytes), to check the GEMMs' extents.
    regions: Mutex<BTreeMap<u64, usize>>,
}

/// The process-wide emulator backend.
pub(crate) fn emu() -> &'static Emu {
    static EMU: OnceLock<Emu> = OnceLock::new();
    EMU.get_or_init(|| Emu {
        cache: Mutex::new(TableCache::default()),
        regions: Mutex::new(BTreeMap::new()),
    })
}

impl Emu {
    /// Errors unless `[addr, addr + bytes)` lies in one live allocation.
    fn check_extent(&self, who: &str, addr: u64, bytes: u64) -> Result<()> {
        let regions = self.regions.lock().expect("regions lock");
        match regions.range(..=addr).next_back() {
            Some((&start, &len)) if addr + bytes <= start + len as u64 => Ok(()),
            _ => fail!(
                Device,
                "emulated gemm",
                "{who}: {bytes} bytes at {addr:#x} outside any allocation"
            ),
        }
    }

    /// Uploads the table cache has made (for tests).
    #[cfg(test)]
    fn uploads(&self) -> u64 {
        self.cache.lock().expect("cache lock").uploads
    }
}

extern "C" {
    /// The GEMM stand-in of `emu.h` (cuBLAS's strided-batched semantics).
    fn steepest_emu_gemm(
        transa: c_int,
        transb: c_int,
        m: i64,
        n: i64,
        k: i64,
        alpha: f32,
        a: *const c_void,
        lda: i64,
        stride_a: i64,
        b: *const c_void,
        ldb: i64,
        stride_b: i64,
        beta: f32,
        c: *mut f32,
        ldc: i64,
        stride_c: i64,
        batch: i64,
        kind: c_int,
    );
}

/// The largest element offset a column-major `rows × cols` operand with
/// leading dimension `ld` and batch stride `stride` touches, plus one.
fn extent(rows: usize, cols: usize, ld: usize, stride: usize, batch: usize) -> usize {
    (rows - 1) + (cols - 1) * ld + (batch - 1) * stride + 1
}

impl Emu {
    /// A registered host allocation of `bytes` bytes (16-aligned), every
    /// byte `fill`.
    fn alloc_filled(&self, bytes: usize, fill: u8) -> Result<EmuBuf> {
        let layout = Layout::from_size_align(bytes.max(1), 16)
            .map_err(|e| crate::error::Error::device("emulator", e))?;
        // SAFETY: non-zero size.
        let ptr = unsafe { std::alloc::alloc(layout) };
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        // SAFETY: `ptr` holds `layout.size()` bytes.
        unsafe { std::ptr::write_bytes(ptr, fill, layout.size()) };
        self.regions
            .lock()
            .expect("regions lock")
            .insert(ptr as u64, bytes);
        Ok(EmuBuf { ptr, layout })
    }
}

impl Backend for Emu {
    type Buf = EmuBuf;

    fn addr(buf: &EmuBuf) -> u64 {
        buf.ptr as u64
    }

    fn alloc_zeroed(&self, bytes: usize) -> Result<EmuBuf> {
        self.alloc_filled(bytes, 0)
    }

    fn alloc_uninit(&self, bytes: usize) -> Result<EmuBuf> {
        self.alloc_filled(bytes, 0xFF)
    }

    fn upload(&self, bytes: &[u8]) -> Result<EmuBuf> {
        let b = self.alloc_zeroed(bytes.len())?;
        // SAFETY: `b` holds `bytes.len()` bytes.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), b.ptr, bytes.len()) };
        Ok(b)
    }

    fn download(&self, addr: u64, out: &mut [u8]) -> Result<()> {
        // SAFETY: the caller passes an address of at least `out.len()` bytes.
        unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    fn launch(&self, l: &Launch) -> Result<()> {
        let Some(f) = kernel_fn(&l.kernel) else {
            fail!(Device, "emulator", "no kernel `{}`", l.kernel);
        };
        // The CUDA backend opts in where this says so; beyond it, it fails.
        launch::shared_opt_in(
            &l.kernel,
            launch::static_shared(&l.kernel),
            l.shared,
            self.shared_max(),
        )?;
        let (mut params, sig) = launch::pack(&l.args);
        let sig = CString::new(sig).expect("no NUL in a signature");
        let dims = LaunchDims {
            grid: l.grid,
            block: [l.block, 1, 1],
            shared: u64::from(l.shared),
        };
        // SAFETY: `params` points into `l.args`, alive for the call; the
        // emulator checks the signature against the kernel's parameters.
        let rc = unsafe { f(&dims, params.as_mut_ptr(), sig.as_ptr()) };
        match rc {
            0 => Ok(()),
            1 => fail!(
                Device,
                l.kernel.as_str(),
                "argument signature mismatch (see stderr)"
            ),
            _ => fail!(
                Device,
                l.kernel.as_str(),
                "bad launch dimensions {:?} × {}",
                l.grid,
                l.block
            ),
        }
    }

    fn gemm(&self, g: &Gemm) -> Result<()> {
        if g.m == 0 || g.n == 0 || g.batch == 0 {
            return Ok(());
        }
        let os = g.op.size();
        let (ar, ac) = if g.transa { (g.k, g.m) } else { (g.m, g.k) };
        let (br, bc) = if g.transb { (g.n, g.k) } else { (g.k, g.n) };
        if g.k > 0 {
            self.check_extent(
                "A",
                g.a,
                extent(ar, ac, g.lda, g.stride_a, g.batch) as u64 * os,
            )?;
            self.check_extent(
                "B",
                g.b,
                extent(br, bc, g.ldb, g.stride_b, g.batch) as u64 * os,
            )?;
        }
        let c_bytes = extent(g.m, g.n, g.ldc, g.stride_c, g.batch) as u64 * 4;
        self.check_extent("C", g.c, c_bytes)?;
        // cuBLAS leaves a C that overlaps an operand undefined (this stand-in
        // would compute it right): refuse it here, where the tests can see it.
        if g.k > 0 {
            let a_bytes = extent(ar, ac, g.lda, g.stride_a, g.batch) as u64 * os;
            let b_bytes = extent(br, bc, g.ldb, g.stride_b, g.batch) as u64 * os;
            for (name, at, bytes) in [("A", g.a, a_bytes), ("B", g.b, b_bytes)] {
                if at < g.c + c_bytes && g.c < at + bytes {
                    fail!(Device, "emulated GEMM", "C overlaps operand {name}");
                }
            }
        }
        let kind = match g.op {
            Elt::F32 => 0,
            Elt::BF16 => 1,
            Elt::F16 => 2,
        };
        // SAFETY: every operand's extent lies in a live allocation (checked above).
        unsafe {
            steepest_emu_gemm(
                c_int::from(g.transa),
                c_int::from(g.transb),
                g.m as i64,
                g.n as i64,
                g.k as i64,
                g.alpha,
                g.a as *const c_void,
                g.lda as i64,
                g.stride_a as i64,
                g.b as *const c_void,
                g.ldb as i64,
                g.stride_b as i64,
                g.beta,
                g.c as *mut f32,
                g.ldc as i64,
                g.stride_c as i64,
                g.batch as i64,
                kind,
            )
        };
        Ok(())
    }

    fn with_cache<R>(&self, f: impl FnOnce(&mut TableCache<EmuBuf>) -> R) -> R {
        f(&mut self.cache.lock().expect("table cache lock"))
    }

    fn shared_max(&self) -> u32 {
        SHARED_CAP.with(|c| c.get()).unwrap_or(launch::SHARED_MAX)
    }
}

// ------------------------------------------------------------ tensors

/// First pass: records the tensors a call touches (made contiguous).
#[derive(Default)]
struct Collect {
    ins: Vec<Tensor>,
    outs: Vec<Tensor>,
    /// `(is_output, index)` per `addr` call, in order.
    order: Vec<(bool, usize)>,
}

impl Resolve for Collect {
    fn addr(&mut self, t: &Tensor, write: bool) -> Result<u64> {
        if write {
            self.outs.push(t.clone());
            self.order.push((true, self.outs.len() - 1));
        } else {
            self.ins.push(t.contiguous()?);
            self.order.push((false, self.ins.len() - 1));
        }
        Ok(0)
    }
}

/// Second pass: the same calls, answered with the locked data's addresses.
struct Lookup<'a> {
    order: &'a [(bool, usize)],
    ins: &'a [u64],
    outs: &'a [u64],
    next: usize,
}

impl Resolve for Lookup<'_> {
    fn addr(&mut self, _t: &Tensor, _write: bool) -> Result<u64> {
        let Some(&(out, i)) = self.order.get(self.next) else {
            fail!(Device, "emulator", "tensor lookups out of step");
        };
        self.next += 1;
        Ok(if out { self.outs[i] } else { self.ins[i] })
    }
}

fn data_addr(d: &Data<'_>) -> u64 {
    match d {
        Data::F32(s) => s.as_ptr() as u64,
        Data::F64(s) => s.as_ptr() as u64,
        Data::BF16(s) => s.as_ptr() as u64,
        Data::F16(s) => s.as_ptr() as u64,
    }
}

fn data_mut_addr(d: &mut DataMut<'_>) -> u64 {
    match d {
        DataMut::F32(s) => s.as_mut_ptr() as u64,
        DataMut::F64(s) => s.as_mut_ptr() as u64,
        DataMut::BF16(s) => s.as_mut_ptr() as u64,
        DataMut::F16(s) => s.as_mut_ptr() as u64,
    }
}

/// Builds a job twice — once to learn its tensors, once inside
/// [`with_cpu_data`] (inputs locked for reading, outputs for writing) with
/// their addresses — and runs it while the locks are held.
fn run_locked<T, R>(
    build: impl Fn(&mut dyn Resolve) -> Result<T>,
    run: impl FnOnce(T) -> Result<R>,
) -> Result<R> {
    let mut c = Collect::default();
    build(&mut c)?;
    let ins: Vec<&Tensor> = c.ins.iter().collect();
    let outs: Vec<&Tensor> = c.outs.iter().collect();
    with_cpu_data(&ins, &outs, |di, dout| {
        let ia: Vec<u64> = di.iter().map(data_addr).collect();
        let oa: Vec<u64> = dout.iter_mut().map(data_mut_addr).collect();
        let mut l = Lookup {
            order: &c.order,
            ins: &ia,
            outs: &oa,
            next: 0,
        };
        let job = build(&mut l)?;
        run(job)
    })
}

/// Runs `f` with the grid of every grid-stride kernel (the multi-tensor
/// updates and reductions, Newton–Schulz's elementwise steps) capped at
/// `blocks` instead of 4096, so that each block walks several chunks or
/// tensors: what a GPU does past 4096 chunks (16.7 M elements), which is
/// more than the emulator can run in a test. The results must not change
/// (every chunk is computed alike whichever block takes it). Calls are
/// serialised; the cap applies to every launch made meanwhile, on any thread.
///
/// # Panics
/// If `blocks` is 0.
pub fn with_grid_cap<R>(blocks: u32, f: impl FnOnce() -> R) -> R {
    use std::sync::atomic::Ordering;
    assert!(blocks > 0, "with_grid_cap: blocks must be ≥ 1");
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    /// Puts the cap back even when `f` panics.
    struct Restore;
    impl Drop for Restore {
        fn drop(&mut self) {
            launch::GRID_CAP.store(launch::MAX_BLOCKS, Ordering::Relaxed);
        }
    }
    let _restore = Restore;
    launch::GRID_CAP.store(u64::from(blocks), Ordering::Relaxed);
    f()
}

thread_local! {
    /// This thread's shared memory per block, when `with_shared_max` set
    /// one (per thread: a lowered limit changes which shapes the kernels
    /// take, which other tests running meanwhile must not see).
    static SHARED_CAP: std::cell::Cell<Option<u32>> = const { std::cell::Cell::new(None) };
}

/// Runs `f` with the emulator's shared memory per block lowered to `bytes`
/// (from sm_90's 227 KiB) on this thread, as on a smaller GPU (99 KiB on
/// sm_86/sm_89): launches beyond it fail, and the power iteration takes no
/// shape whose vectors do not fit (on CUDA, candle's ops then run it). The
/// limit is put back when `f` returns or panics.
pub fn with_shared_max<R>(bytes: u32, f: impl FnOnce() -> R) -> R {
    /// Puts the previous limit back even when `f` panics.
    struct Restore(Option<u32>);
    impl Drop for Restore {
        fn drop(&mut self) {
            SHARED_CAP.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(SHARED_CAP.with(|c| c.replace(Some(bytes))));
    f()
}

/// [`super::adamw_step`] through the emulated `adamw_*` kernels.
pub fn adamw_step(items: &[AdamItem<'_>], beta1: f64, beta2: f64, eps: f64) -> Result<()> {
    super::check_adam_items(items)?;
    run_locked(
        |r| launch::adam_tensors(items, r),
        |ts| launch::adamw(emu(), &ts, beta1, beta2, eps),
    )
}

/// [`super::sgd_step`] through the emulated `sgd_*` kernels.
pub fn sgd_step(items: &[SgdItem<'_>], momentum: f64, nesterov: bool) -> Result<()> {
    super::check_sgd_items(items)?;
    run_locked(
        |r| launch::sgd_tensors(items, r),
        |ts| launch::sgd(emu(), &ts, momentum, nesterov),
    )
}

/// [`super::ema_momentum`] through the emulated `ema_*` kernels.
pub fn ema_momentum(
    grads: &[&Tensor],
    bufs: &[&Var],
    out: &Var,
    momentum: f64,
    nesterov: bool,
) -> Result<()> {
    super::check_ema_counts(grads, bufs, out)?;
    run_locked(
        |r| launch::ema_tensors(grads, bufs, out.as_tensor(), r),
        |ts| launch::ema(emu(), &ts, momentum, nesterov),
    )
}

/// [`super::apply_step`] through the emulated `apply_*` kernels.
pub fn apply_step(ws: &[&Var], d: &Tensor, alphas: &[f64], decays: &[DecayTerm<'_>]) -> Result<()> {
    super::check_apply_counts(ws, d, alphas, decays)?;
    let d = d.contiguous()?;
    run_locked(
        |r| launch::apply_tensors(ws, &d, alphas, decays, r),
        |ts| launch::apply(emu(), &ts),
    )
}

/// [`super::first_nonfinite`] through the emulated `finite_*` kernels.
pub fn first_nonfinite(ts: &[&Tensor]) -> Result<Option<usize>> {
    let flags = run_locked(
        |r| launch::reduce_tensors(ts, r),
        |tt| launch::nonfinite(emu(), &tt),
    )?;
    Ok(flags.iter().position(|&f| f))
}

/// [`super::sum_squares`] through the emulated `sumsq_*` kernels.
pub fn sum_squares(ts: &[&Tensor]) -> Result<Vec<f64>> {
    run_locked(
        |r| launch::reduce_tensors(ts, r),
        |tt| launch::sum_squares(emu(), &tt),
    )
}

/// [`super::power_iteration`] through the emulated `power_*` kernels
/// (f32, bf16 and f16 `w`; errors on what the kernels do not take).
pub fn power_iteration(w: &Tensor, start: Option<&Tensor>, iters: usize) -> Result<TopSingular> {
    run_power(
        launch::power_prepare(w, start, emu().shared_max())?,
        iters,
        w,
    )
}

/// [`super::power_iteration_members`] through the emulated `power_*`
/// kernels, each matrix and state vector used where it is.
pub fn power_iteration_members(ws: &[Tensor], vs: &[Var], iters: usize) -> Result<TopSingular> {
    let call = launch::power_prepare_members(ws, vs, emu().shared_max())?;
    run_power(call, iters, &ws[0])
}

fn run_power(call: Option<launch::PowerCall>, iters: usize, w: &Tensor) -> Result<TopSingular> {
    let Some(call) = call else {
        fail!(
            Device,
            "power_iteration",
            "no kernel for {:?} {:?}",
            w.dtype(),
            w.dims()
        );
    };
    run_locked(
        |r| call.job(iters, r),
        |job| launch::power_iteration(emu(), &job),
    )?;
    call.finish()
}

/// [`super::msign`] through the emulated `ns_*` kernels and the CPU GEMM
/// stand-in; `tile` overrides the Gram tile size (default: `gram_tile`), so
/// that small matrices can exercise the tiled, mirrored Gram product.
pub fn msign(g: &Tensor, ns: &NewtonSchulz, tile: Option<usize>) -> Result<Tensor> {
    ns.validate("msign")?;
    let Some(call) = launch::msign_prepare(g, ns)? else {
        fail!(
            Device,
            "msign",
            "no kernel for {:?} {:?}",
            g.dtype(),
            g.dims()
        );
    };
    run_locked(|r| call.job(ns, tile, r), |job| launch::msign(emu(), &job))?;
    Ok(call.out)
}

/// Every kernel entry point the launch code may name.
pub fn kernel_names() -> &'static [&'static str] {
    KERNELS
}

#[cfg(test)]
mod tests {
    use super::*;
    use launch::Arg;

    fn adamw_launch(args: Vec<Arg>, block: u32) -> Launch {
        Launch {
            kernel: "adamw_f32".into(),
            grid: [1, 1, 1],
            block,
            shared: 0,
            args,
        }
    }

    #[test]
    fn every_kernel_is_exported() {
        for k in KERNELS {
            assert!(kernel_fn(k).is_some(), "{k}");
        }
        assert!(kernel_fn("no_such_kernel").is_none());
    }

    /// A launch whose arguments do not match the kernel's parameter types is
    /// refused before anything runs (the same packing goes to the GPU).
    #[test]
    fn signature_mismatch_is_an_error() {
        // adamw_f32 takes (p, p, u, U, u, f, f, f, f): give it 8 arguments
        let args = vec![
            Arg::Ptr(0),
            Arg::Ptr(0),
            Arg::U32(0),
            Arg::U64(0),
            Arg::U32(4096),
            Arg::F32(0.1),
            Arg::F32(0.9),
            Arg::F32(0.1),
        ];
        assert!(emu().launch(&adamw_launch(args.clone(), 256)).is_err());
        // a u32 where the kernel takes a u64
        let mut wrong = args.clone();
        wrong[3] = Arg::U32(0);
        wrong.push(Arg::F32(1e-8));
        assert!(emu().launch(&adamw_launch(wrong, 256)).is_err());
        // the right arguments with no tensors (0 chunks): runs, does nothing
        let mut right = args;
        right.push(Arg::F32(1e-8));
        emu().launch(&adamw_launch(right.clone(), 256)).unwrap();
        // a block that is not whole warps is refused
        assert!(emu().launch(&adamw_launch(right, 100)).is_err());
    }

    #[test]
    fn gemm_extents_are_checked() {
        let e = emu();
        let a = e.alloc_zeroed(4 * 4 * 4).unwrap();
        let c = e.alloc_zeroed(4 * 4 * 4).unwrap();
        let g = Gemm {
            transa: false,
            transb: false,
            m: 4,
            n: 4,
            k: 4,
            alpha: 1.0,
            a: Emu::addr(&a),
            lda: 4,
            stride_a: 16,
            b: Emu::addr(&a),
            ldb: 4,
            stride_b: 16,
            beta: 0.0,
            c: Emu::addr(&c),
            ldc: 4,
            stride_c: 16,
            batch: 1,
            op: Elt::F32,
        };
        e.gemm(&g).unwrap();
        // a second batch member would read and write past both buffers
        assert!(e.gemm(&Gemm { batch: 2, ..g }).is_err());
        assert!(e.gemm(&Gemm { lda: 5, ..g }).is_err());
        // C may not overlap an operand (undefined in cuBLAS)
        let err = e
            .gemm(&Gemm {
                c: Emu::addr(&a),
                ..g
            })
            .unwrap_err();
        assert!(err.to_string().contains("C overlaps operand A"), "{err}");
        let big = e.alloc_zeroed(4 * 32 * 4).unwrap();
        let (c2, b2) = (Emu::addr(&big), Emu::addr(&big) + 16);
        let err = e.gemm(&Gemm { c: c2, b: b2, ..g }).unwrap_err();
        assert!(err.to_string().contains("C overlaps operand B"), "{err}");
        // adjacent, not overlapping: fine
        e.gemm(&Gemm {
            c: c2,
            b: c2 + 64,
            ..g
        })
        .unwrap();
    }

    /// The same table uploads once; a different one uploads again.
    #[test]
    fn tables_are_cached_by_content() {
        let e = Emu {
            cache: Mutex::new(TableCache::default()),
            regions: Mutex::new(BTreeMap::new()),
        };
        let t1 = launch::cached_upload(&e, &[1, 2, 3]).unwrap();
        let t2 = launch::cached_upload(&e, &[1, 2, 3]).unwrap();
        assert_eq!(Emu::addr(&t1), Emu::addr(&t2));
        assert_eq!(e.uploads(), 1);
        let _t3 = launch::cached_upload(&e, &[1, 2, 4]).unwrap();
        assert_eq!(e.uploads(), 2);
    }

    /// The cache keeps the 64 most recently used tables: a hit makes its
    /// table the most recent, so a 65th distinct table evicts the least
    /// recently used one (uploaded again when next asked for), not the hit.
    #[test]
    fn table_cache_evicts_the_least_recently_used() {
        let e = Emu {
            cache: Mutex::new(TableCache::default()),
            regions: Mutex::new(BTreeMap::new()),
        };
        let get = |i: u8| drop(launch::cached_upload(&e, &[i, 7, 7]).unwrap());
        for i in 0..64 {
            get(i);
        }
        assert_eq!(e.uploads(), 64);
        get(0); // a hit: table 0 is now the most recent, table 1 the least
        assert_eq!(e.uploads(), 64);
        get(64); // evicts table 1
        assert_eq!(e.uploads(), 65);
        get(0);
        assert_eq!(e.uploads(), 65, "the table just used was evicted");
        get(1);
        assert_eq!(e.uploads(), 66, "the least recently used table was kept");
    }
}
