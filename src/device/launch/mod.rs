//! Launch code shared by the CUDA backend (`cuda.rs`, feature `cuda`) and
//! the kernel emulator (`super::emu`, feature `emu`): what to launch, with which grid,
//! block, shared memory and arguments, and in which order.
//!
//! A [`Backend`] only moves bytes, launches a named kernel with a packed
//! argument list, and runs a strided-batched GEMM; everything else — the
//! multi-tensor tables, the chunking, the argument packing (one pointer per
//! parameter, as `cuLaunchKernel` takes them), the power-iteration and
//! Newton–Schulz sequences, the Gram tiling and GEMM leading dimensions — is
//! here, so the emulator tests on every `cargo test` exercise the code the
//! GPU runs.
//!
//! Device memory is addressed by `u64` (a `CUdeviceptr` on the GPU, a host
//! address under the emulator). Kernels write parameters and optimizer state
//! through these addresses, bypassing candle's storage locks: this is sound
//! because every launch goes on the stream candle's own ops use in the
//! calling thread (CUDA's per-thread default stream), so a kernel is ordered
//! after the ops that produced its inputs and before any later op that reads
//! its outputs.
//!
//! Without `cuda` and `emu` only the GEMM counting of `count.rs` uses this
//! module (a dependent crate's CPU build); the rest is then unused.
#![cfg_attr(not(any(feature = "cuda", feature = "emu")), allow(dead_code))]

use std::collections::VecDeque;
use std::ffi::c_void;
use std::sync::Arc;

use candle_core::{DType, Tensor};

use super::{AdamItem, DecayTerm, SgdItem};
use crate::error::{fail, Result};

mod msign;
mod multi_tensor;
mod power;

pub(crate) use msign::*;
pub(crate) use multi_tensor::*;
pub(crate) use power::*;

/// Threads per block of every kernel (`STEEPEST_BLOCK` in `common.cuh`).
pub(crate) const BLOCK: u32 = 256;
/// Elements per block-chunk of the multi-tensor kernels.
pub(crate) const CHUNK: u32 = 4096;
/// Cap on the grid of grid-stride kernels (enough to fill any current GPU).
pub(crate) const MAX_BLOCKS: u64 = 4096;

/// The cap [`grid_for`] applies: [`MAX_BLOCKS`], or a smaller one while the
/// emulator tests run under `emu::with_grid_cap`, so that they reach the
/// grid-stride loops (one block walking several chunks) at sizes the
/// emulator can run.
#[cfg(feature = "emu")]
pub(crate) static GRID_CAP: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(MAX_BLOCKS);

#[cfg(feature = "emu")]
fn grid_cap() -> u64 {
    GRID_CAP.load(std::sync::atomic::Ordering::Relaxed)
}

#[cfg(not(feature = "emu"))]
const fn grid_cap() -> u64 {
    MAX_BLOCKS
}

/// Shared memory (static and dynamic together) a block gets without opting
/// in: a launch beyond it fails unless the function's
/// `MAX_DYNAMIC_SHARED_SIZE_BYTES` was raised first.
pub(crate) const SHARED_DEFAULT: u32 = 48 * 1024;
/// Shared memory (static and dynamic together) a block may opt in to on
/// sm_90 (227 KiB): the emulator's limit. The CUDA backend asks the driver
/// for its device's (`MAX_SHARED_MEMORY_PER_BLOCK_OPTIN`: 163 KiB on sm_80,
/// 99 KiB on sm_86/sm_89), and [`Backend::shared_max`] gives it.
pub(crate) const SHARED_MAX: u32 = 227 * 1024;

/// The dynamic shared memory `kernel` must opt in to, given its static shared
/// memory: `Some(dynamic)` when the two together exceed [`SHARED_DEFAULT`],
/// `None` when they fit without; an error beyond `max` (the device's
/// [`Backend::shared_max`]).
pub(crate) fn shared_opt_in(
    kernel: &str,
    static_bytes: u32,
    dynamic: u32,
    max: u32,
) -> Result<Option<u32>> {
    let total = u64::from(static_bytes) + u64::from(dynamic);
    if total > u64::from(max) {
        fail!(
            Device,
            kernel,
            "{static_bytes} B of static and {dynamic} B of dynamic shared memory exceed the {max} B a block can have on this device"
        );
    }
    Ok((total > u64::from(SHARED_DEFAULT)).then_some(dynamic))
}

/// Static shared memory of each kernel, as `ptxas -v` reports it for sm_90
/// (`scripts/ptxas-report.sh`; the GPU tests compare it with the driver's
/// figure). The emulator, which cannot measure it, checks launches with it;
/// the CUDA backend asks the driver.
pub(crate) fn static_shared(kernel: &str) -> u32 {
    match kernel {
        k if k.starts_with("power_gram_") => POWER_STATIC_SHARED,
        k if k.starts_with("ns_load_") || k.starts_with("ns_store_") => 32 * 33 * 4,
        "ns_symmetrize" => 32 * 33 * 4,
        "power_normalize" | "power_start" => (BLOCK + 4) * 4,
        // f64 scratch (`sumsq_finish`, and `sumsq_*` since it sums in f64)
        k if k.starts_with("sumsq_") => (BLOCK + 1) * 8,
        _ => 0,
    }
}
/// Largest grid `y`/`z` dimension (the batch of power iteration and msign).
pub(crate) const MAX_GRID_YZ: usize = 65_535;
/// Table entries kept uploaded per backend (by content, least recently used out).
const TABLE_CACHE: usize = 64;

/// Element type of a kernel's parameter (or GEMM operand) data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Elt {
    F32,
    BF16,
    F16,
}

impl Elt {
    /// The kernel variant for a parameter dtype; `None` for f64 and non-floats
    /// (those take candle's generic path).
    pub(crate) fn of(dtype: DType) -> Option<Self> {
        match dtype {
            DType::F32 => Some(Self::F32),
            DType::BF16 => Some(Self::BF16),
            DType::F16 => Some(Self::F16),
            _ => None,
        }
    }

    /// The suffix of the kernel names (`adamw_bf16`).
    pub(crate) fn suffix(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::BF16 => "bf16",
            Self::F16 => "f16",
        }
    }

    /// Bytes per element.
    pub(crate) fn size(self) -> u64 {
        match self {
            Self::F32 => 4,
            _ => 2,
        }
    }

    /// `op_kind` of the msign kernels (0 f32, 1 bf16, 2 f16).
    fn op_kind(self) -> i32 {
        match self {
            Self::F32 => 0,
            Self::BF16 => 1,
            Self::F16 => 2,
        }
    }
}

/// One kernel argument, by value.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Arg {
    /// A device address (a pointer parameter).
    Ptr(u64),
    U32(u32),
    I32(i32),
    U64(u64),
    F32(f32),
    F64(f64),
}

impl Arg {
    /// The emulator's signature code of this argument's C type.
    fn code(&self) -> char {
        match self {
            Arg::Ptr(_) => 'p',
            Arg::U32(_) => 'u',
            Arg::I32(_) => 'i',
            Arg::U64(_) => 'U',
            Arg::F32(_) => 'f',
            Arg::F64(_) => 'd',
        }
    }

    /// A pointer to the value, as `cuLaunchKernel`'s `kernelParams` holds it.
    fn as_param(&self) -> *mut c_void {
        match self {
            Arg::Ptr(v) | Arg::U64(v) => v as *const u64 as *mut c_void,
            Arg::U32(v) => v as *const u32 as *mut c_void,
            Arg::I32(v) => v as *const i32 as *mut c_void,
            Arg::F32(v) => v as *const f32 as *mut c_void,
            Arg::F64(v) => v as *const f64 as *mut c_void,
        }
    }
}

/// The argument array of a launch (pointers into `args`, which must outlive
/// it) and its signature string (one code per argument, checked by the
/// emulator against the kernel's parameter types).
pub(crate) fn pack(args: &[Arg]) -> (Vec<*mut c_void>, String) {
    (
        args.iter().map(Arg::as_param).collect(),
        args.iter().map(Arg::code).collect(),
    )
}

/// One kernel launch.
#[derive(Clone, Debug)]
pub(crate) struct Launch {
    /// Kernel name (the PTX entry point, `steepest_emu_<name>` in the emulator).
    pub kernel: String,
    /// Grid `(x, y, z)`.
    pub grid: [u32; 3],
    /// Threads per block (1-D blocks).
    pub block: u32,
    /// Dynamic shared memory in bytes.
    pub shared: u32,
    /// Arguments in parameter order.
    pub args: Vec<Arg>,
}

/// Operand types of a GEMM: `a` and `b` of `op`, `c` always f32, f32 accumulation.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Gemm {
    /// `op(A) = Aᵀ`.
    pub transa: bool,
    /// `op(B) = Bᵀ`.
    pub transb: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub alpha: f32,
    pub a: u64,
    pub lda: usize,
    /// Elements between batch members.
    pub stride_a: usize,
    pub b: u64,
    pub ldb: usize,
    pub stride_b: usize,
    /// When 0, `c` is not read (cuBLAS semantics).
    pub beta: f32,
    pub c: u64,
    pub ldc: usize,
    pub stride_c: usize,
    pub batch: usize,
    /// Element type of `a` and `b`.
    pub op: Elt,
}

/// What a device must provide: memory, launches, and a column-major
/// strided-batched GEMM `C ← α·op(A)·op(B) + β·C` (cuBLAS's convention).
pub(crate) trait Backend {
    /// An owned device buffer.
    type Buf;
    /// The device address of a buffer.
    fn addr(buf: &Self::Buf) -> u64;
    /// Allocates `bytes` zeroed bytes.
    fn alloc_zeroed(&self, bytes: usize) -> Result<Self::Buf>;
    /// Allocates `bytes` bytes the caller writes before reading (no fill on
    /// the GPU; the emulator fills them with `0xFF`, NaN as floats, so a read
    /// before the write shows in the results).
    fn alloc_uninit(&self, bytes: usize) -> Result<Self::Buf>;
    /// Allocates and fills a buffer from the host.
    fn upload(&self, bytes: &[u8]) -> Result<Self::Buf>;
    /// Copies device memory to the host (a host sync on the GPU).
    fn download(&self, addr: u64, out: &mut [u8]) -> Result<()>;
    /// Launches a kernel (asynchronously on the GPU).
    fn launch(&self, l: &Launch) -> Result<()>;
    /// A strided-batched GEMM (asynchronously on the GPU).
    fn gemm(&self, g: &Gemm) -> Result<()>;
    /// Runs `f` on the cache of uploaded tables of the calling thread (on
    /// the GPU each host thread has its own stream, hence its own cache).
    fn with_cache<R>(&self, f: impl FnOnce(&mut TableCache<Self::Buf>) -> R) -> R;
    /// The shared memory (static and dynamic) a block may opt in to on this
    /// device: which launches it takes ([`shared_opt_in`]) and which shapes
    /// the kernels that size their shared memory by the input take.
    fn shared_max(&self) -> u32;
}

/// Uploaded tables by content: a `Var`'s storage does not move, so a group's
/// table of pointers is the same every step and is uploaded once. Keyed by
/// the bytes themselves, so a hit is always the right table; the buffer is
/// shared (`Arc`) so that an eviction never frees a table in use.
pub(crate) struct TableCache<B> {
    entries: VecDeque<(Vec<u8>, Arc<B>)>,
    /// Uploads so far (for tests of the cache).
    pub uploads: u64,
}

impl<B> Default for TableCache<B> {
    fn default() -> Self {
        Self {
            entries: VecDeque::new(),
            uploads: 0,
        }
    }
}

/// A table of plain-old-data values as the bytes a kernel reads.
fn bytes_of<T: Copy>(v: &[T]) -> Vec<u8> {
    // SAFETY: T is a plain-old-data #[repr(C)] struct or number (no padding
    // in MtEntry/MtScalars, f32, f64), read as bytes.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
        .to_vec()
}

/// The device copy of `bytes`, from the cache or uploaded now.
pub(crate) fn cached_upload<B: Backend>(be: &B, bytes: &[u8]) -> Result<Arc<B::Buf>> {
    be.with_cache(|c| {
        if let Some(i) = c.entries.iter().position(|(k, _)| k.as_slice() == bytes) {
            let e = c.entries.remove(i).expect("present");
            let buf = e.1.clone();
            c.entries.push_front(e);
            return Ok(buf);
        }
        let buf = Arc::new(be.upload(bytes)?);
        c.uploads += 1;
        c.entries.push_front((bytes.to_vec(), buf.clone()));
        c.entries.truncate(TABLE_CACHE);
        Ok(buf)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `static_shared` against the ptxas table in BENCHMARKS.md
    /// (`scripts/ptxas-report.sh`, regenerated whenever a kernel changes):
    /// every kernel listed there, the figure the emulator checks launches
    /// with. (When `sumsq_*` moved to an f64 scratch, the table changed and
    /// this function did not.)
    #[test]
    fn static_shared_matches_the_ptxas_table() {
        let table = include_str!("../../../BENCHMARKS.md");
        let rows: Vec<(&str, u32)> = table
            .lines()
            .filter(|l| l.starts_with("| ") && l.contains(".cu | `"))
            .map(|l| {
                let cells: Vec<&str> = l.split('|').map(str::trim).collect();
                let smem = cells[7].parse().expect("static smem column");
                (cells[2].trim_matches('`'), smem)
            })
            .collect();
        assert!(rows.len() >= 30, "{} rows found", rows.len());
        for (kernel, smem) in rows {
            assert_eq!(static_shared(kernel), smem, "{kernel}");
        }
    }

    #[test]
    fn packing_matches_signature() {
        let args = [
            Arg::Ptr(1),
            Arg::U32(2),
            Arg::F32(3.0),
            Arg::F64(4.0),
            Arg::I32(-1),
        ];
        let (ptrs, sig) = pack(&args);
        assert_eq!(sig, "pufdi");
        // SAFETY: each pointer points at the matching value inside `args`.
        unsafe {
            assert_eq!(*(ptrs[0] as *const u64), 1);
            assert_eq!(*(ptrs[1] as *const u32), 2);
            assert_eq!(*(ptrs[2] as *const f32), 3.0);
            assert_eq!(*(ptrs[3] as *const f64), 4.0);
            assert_eq!(*(ptrs[4] as *const i32), -1);
        }
    }

    /// `power_gram` counts groups of 32 vectors in 32 bits: at the longest
    /// side it takes, the last group any warp tries (one grid stride past the
    /// end at most) still has `32·g` below 2³²; a side one longer is refused.
    #[test]
    fn power_side_limit_keeps_the_group_counter_in_32_bits() {
        use power::{power_gram_blocks, power_supported, POWER_MAX_SIDE};
        for (m, n) in [(POWER_MAX_SIDE, 1), (1, POWER_MAX_SIDE)] {
            assert!(power_supported(1, m, n, SHARED_MAX));
            let l = m.max(n) as u64; // vectors walked (the long side at most)
            let groups = l.div_ceil(32);
            let warps = u64::from(power_gram_blocks(m, n)) * u64::from(BLOCK / 32);
            // Warp w tries g = w, w + warps, …: the last is the first ≥ groups.
            let last = (0..warps)
                .map(|w| {
                    if w >= groups {
                        w
                    } else {
                        w + (groups - w).div_ceil(warps) * warps
                    }
                })
                .max()
                .unwrap();
            assert!(
                last * 32 <= u64::from(u32::MAX),
                "{m}×{n}: 32·{last} overflows"
            );
        }
        assert!(!power_supported(1, POWER_MAX_SIDE + 1, 1, SHARED_MAX));
        assert!(!power_supported(1, 1, POWER_MAX_SIDE + 1, SHARED_MAX));
    }

    /// `power_gram`'s grid gives every block at least one group of 32
    /// vectors (the kernel deals group `g` to warp `g mod (8·blocks)` of
    /// block `⌊g/8⌋ mod blocks`): block `blocks − 1`'s first group exists;
    /// and below the cap the grid holds every group at one per warp.
    #[test]
    fn power_gram_launches_no_block_without_a_group() {
        use power::{power_gram_blocks, POWER_GRAM_MAX_BLOCKS};
        let nw = u64::from(BLOCK / 32);
        for (m, n) in [
            (1, 1),
            (32, 5),
            (33, 5),
            (256, 256),
            (257, 64),
            (768, 768),
            (768, 3072),
            (3072, 768),
            (8192, 8192),
            (50257, 768),
            (768, 50257),
            (1 << 20, 16),
        ] {
            let blocks = u64::from(power_gram_blocks(m, n));
            let groups = (m.max(n) as u64).div_ceil(32);
            assert!(
                (blocks - 1) * nw < groups,
                "{m}×{n}: {blocks} blocks for {groups} groups"
            );
            if blocks < u64::from(POWER_GRAM_MAX_BLOCKS) {
                assert!(
                    blocks * nw >= groups,
                    "{m}×{n}: {blocks} blocks leave groups over"
                );
            }
        }
    }

    /// Static and dynamic shared memory together decide the opt-in: the
    /// power iteration's 34 816 B of tiles plus 2·4·k B for k = 2048 need it
    /// (16 KiB of dynamic memory alone would not), k = 1792 does not, and no
    /// supported shape exceeds what a block can opt in to.
    #[test]
    fn shared_memory_opt_in_counts_static_memory() {
        let gram = static_shared("power_gram_f32");
        assert_eq!(gram, 34_816);
        let dynamic = |k: u32| 2 * k * 4;
        assert_eq!(
            shared_opt_in("g", gram, dynamic(1792), SHARED_MAX).unwrap(),
            None
        );
        assert_eq!(
            shared_opt_in("g", gram, dynamic(1793), SHARED_MAX).unwrap(),
            Some(dynamic(1793))
        );
        assert_eq!(
            shared_opt_in("g", gram, dynamic(2048), SHARED_MAX).unwrap(),
            Some(dynamic(2048))
        );
        assert_eq!(
            shared_opt_in("g", 0, SHARED_DEFAULT, SHARED_MAX).unwrap(),
            None
        );
        assert_eq!(
            shared_opt_in("g", 0, SHARED_DEFAULT + 1, SHARED_MAX).unwrap(),
            Some(SHARED_DEFAULT + 1)
        );
        // sm_90 (227 KiB), sm_80 (163 KiB), sm_86/sm_89 (99 KiB)
        for max in [SHARED_MAX, 163 * 1024, 99 * 1024] {
            let kmax = (max - gram) / 8;
            assert!(power_supported(1, kmax as usize, kmax as usize + 1, max));
            assert!(shared_opt_in("g", gram, dynamic(kmax), max)
                .unwrap()
                .is_some());
            assert!(!power_supported(
                1,
                kmax as usize + 1,
                kmax as usize + 1,
                max
            ));
            let e = shared_opt_in("power_gram_f32", gram, dynamic(kmax + 1), max).unwrap_err();
            assert!(e.to_string().contains("power_gram_f32"), "{e}");
        }
        assert_eq!((SHARED_MAX - gram) / 8, 24_704);
        assert_eq!((99 * 1024 - gram) / 8, 8_320);
    }

    /// A power iteration's batch is the grid's `y`: up to CUDA's 65 535.
    #[test]
    fn power_batches_fit_the_grid() {
        assert!(
            power_supported(65_535, 3, 2, SHARED_MAX) && !power_supported(65_536, 3, 2, SHARED_MAX)
        );
    }
}
