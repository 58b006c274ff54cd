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

/// Threads per block of every kernel (`STEEPEST_BLOCK` in `common.cuh`).
pub(crate) const BLOCK: u32 = 256;
/// Elements per block-chunk of the multi-tensor kernels.
pub(crate) const CHUNK: u32 = 4096;
/// Cap on the grid of grid-stride kernels (enough to fill any current GPU).
pub(crate) const MAX_BLOCKS: u64 = 4096;
/// Shared memory (static and dynamic together) a block gets without opting
/// in: a launch beyond it fails unless the function's
/// `MAX_DYNAMIC_SHARED_SIZE_BYTES` was raised first.
pub(crate) const SHARED_DEFAULT: u32 = 48 * 1024;
/// Shared memory (static and dynamic together) a block may opt in to on
/// sm_90 (227 KiB).
pub(crate) const SHARED_MAX: u32 = 227 * 1024;

/// The dynamic shared memory `kernel` must opt in to, given its static shared
/// memory: `Some(dynamic)` when the two together exceed [`SHARED_DEFAULT`],
/// `None` when they fit without; an error beyond [`SHARED_MAX`].
pub(crate) fn shared_opt_in(kernel: &str, static_bytes: u32, dynamic: u32) -> Result<Option<u32>> {
    let total = u64::from(static_bytes) + u64::from(dynamic);
    if total > u64::from(SHARED_MAX) {
        fail!(
            Device,
            kernel,
            "{static_bytes} B of static and {dynamic} B of dynamic shared memory exceed the {SHARED_MAX} B a block can have"
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
        "sumsq_finish" => (BLOCK + 1) * 8,
        k if k.starts_with("sumsq_") => (BLOCK + 1) * 4,
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

/// One tensor of a multi-tensor launch (`MtEntry` in `common.cuh`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct MtEntry {
    pub p: [u64; 4],
    pub a: u64,
    pub b: u64,
    pub len: u64,
    pub cols: u64,
    pub chunk0: u64,
}

/// Per-tensor scalars (`MtScalars` in `common.cuh`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct MtScalars {
    pub s: [f32; 4],
}

const _: () = assert!(std::mem::size_of::<MtEntry>() == 72);
const _: () = assert!(std::mem::size_of::<MtScalars>() == 16);

fn bytes_of<T: Copy>(v: &[T]) -> Vec<u8> {
    // SAFETY: T is a plain-old-data #[repr(C)] struct or number (no padding
    // in MtEntry/MtScalars, f32, f64), read as bytes.
    unsafe { std::slice::from_raw_parts(v.as_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
        .to_vec()
}

/// A tensor of a multi-tensor launch before chunking.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MtTensor {
    /// Parameter (or reduced tensor) element type: selects the kernel variant.
    pub elt: Elt,
    /// `p0..p3` (see `MtEntry` in `common.cuh` for each family's meaning).
    pub p: [u64; 4],
    /// Rank-1 decay `(a, b, cols)`.
    pub rank1: Option<(u64, u64, u64)>,
    pub len: u64,
    pub scalars: MtScalars,
}

/// The device table of one launch: entries with their first chunk, scalars,
/// and the total number of chunks.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct MtPlan {
    pub entries: Vec<MtEntry>,
    pub scalars: Vec<MtScalars>,
    pub chunks: u64,
}

/// Chunks the tensors (in order) into `chunk`-element pieces.
pub(crate) fn mt_plan(ts: &[MtTensor], chunk: u32) -> MtPlan {
    let mut chunks = 0u64;
    let mut entries = Vec::with_capacity(ts.len());
    for t in ts {
        let (a, b, cols) = t.rank1.unwrap_or((0, 0, 1));
        entries.push(MtEntry {
            p: t.p,
            a,
            b,
            len: t.len,
            cols: cols.max(1),
            chunk0: chunks,
        });
        chunks += t.len.div_ceil(u64::from(chunk));
    }
    MtPlan {
        entries,
        scalars: ts.iter().map(|t| t.scalars).collect(),
        chunks,
    }
}

/// The grid of a grid-stride kernel over `units` block-sized units.
pub(crate) fn grid_for(units: u64) -> u32 {
    units.clamp(1, MAX_BLOCKS) as u32
}

/// Groups `ts` by element type, keeping their order: `(elt, indices)`.
fn by_elt(ts: &[MtTensor]) -> Vec<(Elt, Vec<usize>)> {
    let mut groups: Vec<(Elt, Vec<usize>)> = Vec::new();
    for (i, t) in ts.iter().enumerate() {
        match groups.iter_mut().find(|g| g.0 == t.elt) {
            Some(g) => g.1.push(i),
            None => groups.push((t.elt, vec![i])),
        }
    }
    groups
}

/// A multi-tensor family: launches `<family>_<elt>` once per element type
/// over its tensors, with the table, the scalars (when `with_scalars`) and
/// the family's arguments after `(nt, nchunks, chunk)`.
fn mt_launch<B: Backend>(
    be: &B,
    family: &str,
    ts: &[MtTensor],
    with_scalars: bool,
    extra: &[Arg],
) -> Result<()> {
    for (elt, idx) in by_elt(ts) {
        let group: Vec<MtTensor> = idx.iter().map(|&i| ts[i]).collect();
        let plan = mt_plan(&group, CHUNK);
        if plan.chunks == 0 {
            continue;
        }
        let tab = cached_upload(be, &bytes_of(&plan.entries))?;
        let mut args = vec![Arg::Ptr(B::addr(&tab))];
        let sc;
        if with_scalars {
            sc = cached_upload(be, &bytes_of(&plan.scalars))?;
            args.push(Arg::Ptr(B::addr(&sc)));
        }
        args.extend([
            Arg::U32(group.len() as u32),
            Arg::U64(plan.chunks),
            Arg::U32(CHUNK),
        ]);
        args.extend_from_slice(extra);
        be.launch(&Launch {
            kernel: format!("{family}_{}", elt.suffix()),
            grid: [grid_for(plan.chunks), 1, 1],
            block: BLOCK,
            shared: 0,
            args,
        })?;
    }
    Ok(())
}

/// AdamW over `ts` (`p = [w, g, m, v]`, scalars `[η/(1−β₁ᵗ), √(1−β₂ᵗ), scale, coeff]`).
pub(crate) fn adamw<B: Backend>(
    be: &B,
    ts: &[MtTensor],
    beta1: f64,
    beta2: f64,
    eps: f64,
) -> Result<()> {
    // As `cpu::adamw`: each hyperparameter rounded to f32 from its f64 form.
    let extra = [
        Arg::F32((1.0 - beta1) as f32),
        Arg::F32(beta2 as f32),
        Arg::F32((1.0 - beta2) as f32),
        Arg::F32(eps as f32),
    ];
    mt_launch(be, "adamw", ts, true, &extra)
}

/// SGD over `ts` (`p = [w, g, buf or 0, 0]`, scalars `[lr, 0, scale, coeff]`).
pub(crate) fn sgd<B: Backend>(
    be: &B,
    ts: &[MtTensor],
    momentum: f64,
    nesterov: bool,
) -> Result<()> {
    let extra = [Arg::F32(momentum as f32), Arg::I32(nesterov as i32)];
    mt_launch(be, "sgd", ts, true, &extra)
}

/// Muon's momentum over `ts` (`p = [0, g, buf, out]`).
pub(crate) fn ema<B: Backend>(
    be: &B,
    ts: &[MtTensor],
    momentum: f64,
    nesterov: bool,
) -> Result<()> {
    let extra = [
        Arg::F32(momentum as f32),
        Arg::F32((1.0 - momentum) as f32),
        Arg::I32(nesterov as i32),
    ];
    mt_launch(be, "ema", ts, false, &extra)
}

/// `w ← decayed(w) − α·d` over `ts` (`p = [w, d, 0, 0]`, scalars `[α, 0, scale, coeff]`).
pub(crate) fn apply<B: Backend>(be: &B, ts: &[MtTensor]) -> Result<()> {
    mt_launch(be, "apply", ts, true, &[])
}

/// Per-tensor results of a reduction, in `ts`' order: one output buffer for
/// all element-type groups, so that reading it back is one host sync.
fn reduce_groups<B: Backend>(
    be: &B,
    ts: &[MtTensor],
    out_size: usize,
    mut each: impl FnMut(&[MtTensor], &MtPlan, u64) -> Result<()>,
) -> Result<(B::Buf, Vec<usize>)> {
    let out = be.alloc_zeroed(ts.len().max(1) * out_size)?;
    // position of each tensor in `out`
    let mut pos = vec![0usize; ts.len()];
    let mut at = 0usize;
    for (_, idx) in by_elt(ts) {
        let group: Vec<MtTensor> = idx.iter().map(|&i| ts[i]).collect();
        for (j, &i) in idx.iter().enumerate() {
            pos[i] = at + j;
        }
        let plan = mt_plan(&group, CHUNK);
        if plan.chunks > 0 {
            each(&group, &plan, B::addr(&out) + (at * out_size) as u64)?;
        }
        at += idx.len();
    }
    Ok((out, pos))
}

/// Whether each tensor (`p[1]` = data) holds a NaN or ±Inf; one host sync.
pub(crate) fn nonfinite<B: Backend>(be: &B, ts: &[MtTensor]) -> Result<Vec<bool>> {
    let (out, pos) = reduce_groups(be, ts, 4, |group, plan, flags| {
        let tab = cached_upload(be, &bytes_of(&plan.entries))?;
        be.launch(&Launch {
            kernel: format!("finite_{}", group[0].elt.suffix()),
            grid: [grid_for(plan.chunks), 1, 1],
            block: BLOCK,
            shared: 0,
            args: vec![
                Arg::Ptr(B::addr(&tab)),
                Arg::U32(group.len() as u32),
                Arg::U64(plan.chunks),
                Arg::U32(CHUNK),
                Arg::Ptr(flags),
            ],
        })
    })?;
    let mut bytes = vec![0u8; ts.len() * 4];
    be.download(B::addr(&out), &mut bytes)?;
    Ok(pos
        .iter()
        .map(|&p| u32::from_ne_bytes(bytes[p * 4..p * 4 + 4].try_into().expect("4 bytes")) != 0)
        .collect())
}

/// `Σ x²` of each tensor into a device buffer of f64 (tensor `i` at
/// position `pos[i]`), without a host sync.
pub(crate) fn sumsq_device<B: Backend>(be: &B, ts: &[MtTensor]) -> Result<(B::Buf, Vec<usize>)> {
    reduce_groups(be, ts, 8, |group, plan, out| {
        let tab = cached_upload(be, &bytes_of(&plan.entries))?;
        let partials = be.alloc_zeroed(plan.chunks as usize * 8)?;
        let nt = group.len() as u32;
        be.launch(&Launch {
            kernel: format!("sumsq_{}", group[0].elt.suffix()),
            grid: [grid_for(plan.chunks), 1, 1],
            block: BLOCK,
            shared: 0,
            args: vec![
                Arg::Ptr(B::addr(&tab)),
                Arg::U32(nt),
                Arg::U64(plan.chunks),
                Arg::U32(CHUNK),
                Arg::Ptr(B::addr(&partials)),
            ],
        })?;
        be.launch(&Launch {
            kernel: "sumsq_finish".into(),
            grid: [grid_for(u64::from(nt)), 1, 1],
            block: BLOCK,
            shared: 0,
            args: vec![
                Arg::Ptr(B::addr(&tab)),
                Arg::U32(nt),
                Arg::U64(plan.chunks),
                Arg::Ptr(B::addr(&partials)),
                Arg::Ptr(out),
            ],
        })
    })
}

/// `Σ x²` of each tensor, on the host (one host sync).
pub(crate) fn sum_squares<B: Backend>(be: &B, ts: &[MtTensor]) -> Result<Vec<f64>> {
    let (out, pos) = sumsq_device(be, ts)?;
    let mut bytes = vec![0u8; ts.len() * 8];
    be.download(B::addr(&out), &mut bytes)?;
    Ok(pos
        .iter()
        .map(|&p| f64::from_ne_bytes(bytes[p * 8..p * 8 + 8].try_into().expect("8 bytes")))
        .collect())
}

// ------------------------------------------------------------ tensors → tables

/// Gives the device address of a tensor's first element (the tensor is
/// contiguous, or made so by the resolver for an input). `write` marks
/// tensors the kernel writes.
pub(crate) trait Resolve {
    fn addr(&mut self, t: &Tensor, write: bool) -> Result<u64>;
}

fn scalars_f32(s0: f64, s1: f64, d: &DecayTerm<'_>) -> MtScalars {
    MtScalars {
        s: [
            s0 as f32,
            s1 as f32,
            d.scale as f32,
            d.rank1.map_or(0.0, |r| r.coeff as f32),
        ],
    }
}

/// Errors unless `t` is f32 (state, directions and rank-1 factors are).
fn need_f32(t: &Tensor, who: &str) -> Result<()> {
    if t.dtype() != DType::F32 {
        fail!(Device, who, "expected f32, got {:?}", t.dtype());
    }
    Ok(())
}

fn rank1(d: &DecayTerm<'_>, r: &mut dyn Resolve) -> Result<Option<(u64, u64, u64)>> {
    let Some(k) = d.rank1 else {
        return Ok(None);
    };
    need_f32(k.a, "spectral decay: a")?;
    need_f32(k.b, "spectral decay: b")?;
    let a = r.addr(k.a, false)?;
    let b = r.addr(k.b, false)?;
    Ok(Some((a, b, k.b.elem_count() as u64)))
}

fn elt_of(t: &Tensor, who: &str) -> Result<Elt> {
    match Elt::of(t.dtype()) {
        Some(e) => Ok(e),
        None => fail!(Device, who, "no kernel for dtype {:?}", t.dtype()),
    }
}

/// The table rows of a fused AdamW call.
pub(crate) fn adam_tensors(items: &[AdamItem<'_>], r: &mut dyn Resolve) -> Result<Vec<MtTensor>> {
    items
        .iter()
        .map(|it| {
            need_f32(it.m.as_tensor(), "adamw_step: exp_avg")?;
            need_f32(it.v.as_tensor(), "adamw_step: exp_avg_sq")?;
            Ok(MtTensor {
                elt: elt_of(it.w.as_tensor(), "adamw_step")?,
                p: [
                    r.addr(it.w.as_tensor(), true)?,
                    r.addr(it.g, false)?,
                    r.addr(it.m.as_tensor(), true)?,
                    r.addr(it.v.as_tensor(), true)?,
                ],
                rank1: rank1(&it.decay, r)?,
                len: it.g.elem_count() as u64,
                scalars: scalars_f32(it.step.lr_bc1, it.step.bc2_sqrt, &it.decay),
            })
        })
        .collect()
}

/// The table rows of a fused SGD call.
pub(crate) fn sgd_tensors(items: &[SgdItem<'_>], r: &mut dyn Resolve) -> Result<Vec<MtTensor>> {
    items
        .iter()
        .map(|it| {
            if let Some(b) = it.buf {
                need_f32(b.as_tensor(), "sgd_step: momentum")?;
            }
            Ok(MtTensor {
                elt: elt_of(it.w.as_tensor(), "sgd_step")?,
                p: [
                    r.addr(it.w.as_tensor(), true)?,
                    r.addr(it.g, false)?,
                    match it.buf {
                        Some(b) => r.addr(b.as_tensor(), true)?,
                        None => 0,
                    },
                    0,
                ],
                rank1: rank1(&it.decay, r)?,
                len: it.g.elem_count() as u64,
                scalars: scalars_f32(it.lr, 0.0, &it.decay),
            })
        })
        .collect()
}

/// The address of `t`, an f32 buffer holding the members of a batch one after
/// another (`total` elements in all); resolved once, as its members share
/// its storage.
fn packed_f32(
    who: &str,
    t: &Tensor,
    total: usize,
    write: bool,
    r: &mut dyn Resolve,
) -> Result<u64> {
    need_f32(t, who)?;
    if t.elem_count() != total {
        fail!(
            Shape,
            who,
            "{} elements for members of {total} elements in all",
            t.elem_count()
        );
    }
    r.addr(t, write)
}

/// The table rows of Muon's momentum: member `i` writes `out[i]` (`out` is
/// resolved once: its members share its storage).
pub(crate) fn ema_tensors(
    grads: &[&Tensor],
    bufs: &[&candle_core::Var],
    out: &Tensor,
    r: &mut dyn Resolve,
) -> Result<Vec<MtTensor>> {
    let total = grads.iter().map(|g| g.elem_count()).sum();
    let base = packed_f32("ema_momentum: out", out, total, true, r)?;
    let mut at = 0u64;
    let mut ts = Vec::with_capacity(grads.len());
    for (g, b) in grads.iter().zip(bufs) {
        need_f32(b.as_tensor(), "ema_momentum: buffer")?;
        let len = g.elem_count() as u64;
        ts.push(MtTensor {
            elt: elt_of(g, "ema_momentum")?,
            p: [
                0,
                r.addr(g, false)?,
                r.addr(b.as_tensor(), true)?,
                base + at * 4,
            ],
            rank1: None,
            len,
            scalars: MtScalars::default(),
        });
        at += len;
    }
    Ok(ts)
}

/// The table rows of `apply_step`: member `i` reads `d[i]` (`d` contiguous,
/// f32, resolved once).
pub(crate) fn apply_tensors(
    ws: &[&candle_core::Var],
    d: &Tensor,
    alphas: &[f64],
    decays: &[DecayTerm<'_>],
    r: &mut dyn Resolve,
) -> Result<Vec<MtTensor>> {
    let total = ws.iter().map(|w| w.elem_count()).sum();
    let base = packed_f32("apply_step: direction", d, total, false, r)?;
    let mut at = 0u64;
    let mut ts = Vec::with_capacity(ws.len());
    for (i, w) in ws.iter().enumerate() {
        let len = w.elem_count() as u64;
        ts.push(MtTensor {
            elt: elt_of(w.as_tensor(), "apply_step")?,
            p: [r.addr(w.as_tensor(), true)?, base + at * 4, 0, 0],
            rank1: rank1(&decays[i], r)?,
            len,
            scalars: scalars_f32(alphas[i], 0.0, &decays[i]),
        });
        at += len;
    }
    Ok(ts)
}

/// The table rows of a reduction over whole tensors (`p[1]` = data).
pub(crate) fn reduce_tensors(ts: &[&Tensor], r: &mut dyn Resolve) -> Result<Vec<MtTensor>> {
    ts.iter()
        .map(|t| {
            Ok(MtTensor {
                elt: elt_of(t, "reduction")?,
                p: [0, r.addr(t, false)?, 0, 0],
                rank1: None,
                len: t.elem_count() as u64,
                scalars: MtScalars::default(),
            })
        })
        .collect()
}

// ------------------------------------------------------------ power iteration

/// Modes of `power_gram` (`POWER_*` in `power.cu`).
const POWER_DOT: i32 = 1;
const POWER_GRAM: i32 = 2;
const POWER_ACC: i32 = 4;

/// The fixed pseudo-random unit start vector of the generic path
/// (`power_iteration.rs`'s `default_start`), rounded as it is there: the f64
/// values cast to f32, then multiplied by `1/‖·‖` (candle's affine).
pub(crate) fn default_start(n: usize) -> Vec<f32> {
    let (vals, norm) = crate::linalg::default_start_values(n);
    let mul = (1.0 / norm) as f32;
    vals.iter().map(|&v| v as f32 * mul).collect()
}

/// Static shared memory of `power_gram_*`: per warp a 32×33 f32 tile and 32
/// coefficients (the ptxas report shows the same figure).
pub(crate) const POWER_STATIC_SHARED: u32 = (BLOCK / 32) * (32 * 33 + 32) * 4;

/// Whether the kernels take a `(b, m, n)` power iteration: the short side's
/// two shared vectors must fit a block's shared memory beside the tiles
/// (up to k = 24 576).
pub(crate) fn power_supported(b: usize, m: usize, n: usize) -> bool {
    let k = m.min(n) as u64;
    b >= 1
        && m >= 1
        && n >= 1
        && b <= MAX_GRID_YZ
        && k * 8 + u64::from(POWER_STATIC_SHARED) <= u64::from(SHARED_MAX)
        && m.max(n) < u32::MAX as usize
}

/// A batched power iteration on the device: `w` `(b, m, n)` of `elt`,
/// `start` `(b, n)` f32 or none, outputs `sigma` `(b,)`, `u` `(b, m)`, `v`
/// `(b, n)` (f32), all device addresses. No host sync.
#[derive(Clone, Copy, Debug)]
pub(crate) struct PowerJob {
    pub w: u64,
    pub elt: Elt,
    pub b: usize,
    pub m: usize,
    pub n: usize,
    pub start: Option<u64>,
    pub iters: usize,
    pub sigma: u64,
    pub u: u64,
    pub v: u64,
}

/// The grid `x` of `power_gram`: about 4 vectors (rows, or 32-column tiles)
/// per warp, at most 256 blocks per matrix.
pub(crate) fn power_gram_blocks(m: usize, n: usize) -> u32 {
    let wide = n > m;
    let units = if wide { n.div_ceil(32) } else { m } as u64;
    let per_block = u64::from(BLOCK / 32) * 4;
    units.div_ceil(per_block).clamp(1, 256) as u32
}

/// Runs [`PowerJob`]; the launch sequence is described in `power.cu`.
pub(crate) fn power_iteration<B: Backend>(be: &B, j: &PowerJob) -> Result<()> {
    let (b, m, n) = (j.b, j.m, j.n);
    if !power_supported(b, m, n) {
        fail!(
            Device,
            "power_iteration",
            "no kernel for shape ({b}, {m}, {n})"
        );
    }
    let wide = n > m;
    let k = m.min(n);
    // The accumulator of the Gram products; alive until the end (the launches
    // are asynchronous on the GPU, and its free is stream-ordered after them).
    let y_buf = be.alloc_zeroed(b * k * 4)?;
    let y = B::addr(&y_buf);
    let dflt_n = cached_upload(be, &bytes_of(&default_start(n)))?;
    let dflt_m = cached_upload(be, &bytes_of(&default_start(m)))?;
    let gram = |mode: i32, x: u64, z: u64, out: u64| -> Result<()> {
        be.launch(&Launch {
            kernel: format!("power_gram_{}", j.elt.suffix()),
            grid: [power_gram_blocks(m, n), b as u32, 1],
            block: BLOCK,
            shared: (2 * k * 4) as u32,
            args: vec![
                Arg::Ptr(j.w),
                Arg::U32(m as u32),
                Arg::U32(n as u32),
                Arg::I32(wide as i32),
                Arg::I32(mode),
                Arg::Ptr(x),
                Arg::Ptr(z),
                Arg::Ptr(y),
                Arg::Ptr(out),
            ],
        })
    };
    let normalize =
        |src: u64, dst: u64, keep: u64, keep_stride: usize, sigma: u64, zero: bool, len: usize| {
            be.launch(&Launch {
                kernel: "power_normalize".into(),
                grid: [b as u32, 1, 1],
                block: BLOCK,
                shared: 0,
                args: vec![
                    Arg::Ptr(src),
                    Arg::Ptr(dst),
                    Arg::Ptr(keep),
                    Arg::U32(keep_stride as u32),
                    Arg::Ptr(sigma),
                    Arg::I32(zero as i32),
                    Arg::U32(len as u32),
                ],
            })
        };
    // v ← the start vector (the caller's where usable, else the default).
    be.launch(&Launch {
        kernel: "power_start".into(),
        grid: [b as u32, 1, 1],
        block: BLOCK,
        shared: 0,
        args: vec![
            Arg::Ptr(j.start.unwrap_or(0)),
            Arg::Ptr(B::addr(&dflt_n)),
            Arg::Ptr(j.v),
            Arg::U32(n as u32),
        ],
    })?;
    // The iterate x lives in the output it ends up as: u when wide, v when tall.
    let x = if wide {
        // x ← W v / ‖W v‖ (the default m-vector where W v = 0).
        gram(POWER_ACC, 0, j.v, 0)?;
        normalize(y, j.u, B::addr(&dflt_m), 0, 0, true, m)?;
        j.u
    } else {
        j.v
    };
    for _ in 0..j.iters {
        gram(POWER_GRAM, x, 0, 0)?;
        normalize(y, x, x, k, 0, true, k)?;
    }
    if wide {
        // v ← Wᵀu / ‖Wᵀu‖ (default where 0), σ = ‖Wᵀu‖.
        gram(POWER_DOT, x, 0, j.v)?;
        normalize(j.v, j.v, B::addr(&dflt_n), 0, j.sigma, false, n)?;
    } else {
        // u ← W v / max(‖W v‖, tiny), σ = ‖W v‖.
        gram(POWER_DOT, x, 0, j.u)?;
        normalize(j.u, j.u, 0, 0, j.sigma, false, m)?;
    }
    Ok(())
}

// ------------------------------------------------------------ Newton–Schulz

/// Whether the kernels take a `(b, m, n)` msign: `ns_load` puts the input's
/// 32-row tiles (`m`) on the grid's `y`; `ns_store` and `ns_symmetrize` put
/// the short side's there (at most `m`).
pub(crate) fn msign_supported(b: usize, m: usize, n: usize) -> bool {
    b >= 1
        && m >= 1
        && n >= 1
        && b <= MAX_GRID_YZ
        && m.div_ceil(32) <= MAX_GRID_YZ
        && m.max(n) < i32::MAX as usize / 64
}

/// The Gram tile size: `X Xᵀ` is computed as the GEMMs of the tile pairs
/// `(I, J)`, `I ≤ J`, then mirrored — for 4 tiles 10 products instead of 16.
/// Small matrices are one tile (one GEMM).
pub(crate) fn gram_tile(s: usize) -> usize {
    let t = s.div_ceil(4).next_multiple_of(32).max(128);
    t.min(s)
}

/// A Newton–Schulz msign on the device: `g` `(b, m, n)` of `elt` into `out`
/// (same shape and dtype), `table` the `(a, b, c)` per step, operands of
/// `op`, accumulation in f32. No host sync.
#[derive(Clone, Debug)]
pub(crate) struct MsignJob<'a> {
    pub g: u64,
    pub out: u64,
    pub elt: Elt,
    pub b: usize,
    pub m: usize,
    pub n: usize,
    pub table: &'a [[f64; 3]],
    pub eps: f64,
    pub norm_scale: f64,
    pub op: Elt,
    /// Gram tile size (default [`gram_tile`]).
    pub tile: Option<usize>,
    /// `Some(restarts)`: the Gram form (`GramNewtonSchulz`), restarting
    /// before those steps.
    pub gram: Option<&'a [usize]>,
}

/// The GEMMs of a symmetric product `C ← α·L·Rᵀ + β·C` over the tile pairs
/// `I ≤ J` only, `L` and `R` row-major `(s, k)`, `C` row-major `(s, s)`:
/// `X Xᵀ` (`L = R = X`), and the products of commuting symmetric matrices
/// (`R·Z = R·Zᵀ`), which are symmetric too. One GEMM per tile `I` covers
/// the tiles `J ≥ I` at once (they are contiguous): with `T` tiles, `T`
/// GEMMs computing `(T + 1)/2T` of the product. cuBLAS (column-major) sees
/// the row-major operands transposed; each GEMM writes the column-major
/// blocks `(I, J ≥ I)`, i.e. the row-major blocks `(J, I)` on and below the
/// diagonal, which `ns_symmetrize` then mirrors into the rest.
#[allow(clippy::too_many_arguments)]
pub(crate) fn sym_gemms(
    l: u64,
    r: u64,
    c: u64,
    op: Elt,
    b: usize,
    s: usize,
    k: usize,
    tile: usize,
    alpha: f32,
    beta: f32,
) -> Vec<Gemm> {
    (0..s)
        .step_by(tile.max(1))
        .map(|i0| Gemm {
            // column-major C(i, j) = Σ R[i0+i][·]·L[i0+j][·] = (L Rᵀ)[i0+j][i0+i]
            transa: true,
            transb: false,
            m: tile.min(s - i0),
            n: s - i0,
            k,
            alpha,
            a: r + (i0 * k) as u64 * op.size(),
            lda: k,
            stride_a: s * k,
            b: l + (i0 * k) as u64 * op.size(),
            ldb: k,
            stride_b: s * k,
            beta,
            c: c + (i0 + i0 * s) as u64 * 4,
            ldc: s,
            stride_c: s * s,
            batch: b,
            op,
        })
        .collect()
}

/// An `s × s` f32 matrix per batch member and the address of its operand copy.
type Square = (u64, u64);

/// The device buffers and launch helpers of one msign job.
struct Ns<'j, 'a, B: Backend> {
    be: &'j B,
    j: &'j MsignJob<'a>,
    s: usize,
    l: usize,
    tile: usize,
    /// `op_kind` of the operand copies of `s × s` matrices (−1: none, the
    /// f32 buffer is its own operand).
    kind: i32,
    bufs: Vec<B::Buf>,
}

impl<B: Backend> Ns<'_, '_, B> {
    /// A buffer of `elems` elements of `bytes` each, kept until the end;
    /// uninitialised: every one is written (by a kernel, or a GEMM with
    /// β = 0, which does not read C) before it is read.
    fn buf(&mut self, elems: usize, bytes: usize) -> Result<u64> {
        let buf = self.be.alloc_uninit(elems * bytes)?;
        let addr = B::addr(&buf);
        self.bufs.push(buf);
        Ok(addr)
    }

    /// An `s × s` f32 matrix per batch member and its operand copy (the same
    /// buffer when operands are f32, unless `separate`).
    fn square(&mut self, separate: bool) -> Result<Square> {
        let n = self.j.b * self.s * self.s;
        let f = self.buf(n, 4)?;
        let op = if self.kind < 0 && !separate {
            f
        } else {
            self.buf(n, self.j.op.size() as usize)?
        };
        Ok((f, op))
    }

    fn launch(&self, kernel: &str, grid: [u32; 3], args: Vec<Arg>) -> Result<()> {
        self.be.launch(&Launch {
            kernel: kernel.into(),
            grid,
            block: BLOCK,
            shared: 0,
            args,
        })
    }

    /// Grid of a grid-stride pass over `s²` elements per batch member.
    fn square_grid(&self) -> [u32; 3] {
        let ss = (self.s * self.s) as u64;
        [grid_for(ss.div_ceil(u64::from(BLOCK))), self.j.b as u32, 1]
    }

    /// `dst ← src` (when `dst ≠ 0`) and the operand rounding into `op` (when
    /// `kind ≥ 0`), over `len` elements.
    fn copy_cast(&self, src: u64, dst: u64, op: u64, kind: i32, len: usize) -> Result<()> {
        let grid = [grid_for(len.div_ceil(BLOCK as usize) as u64), 1, 1];
        let args = vec![
            Arg::Ptr(src),
            Arg::Ptr(dst),
            Arg::Ptr(if kind < 0 { 0 } else { op }),
            Arg::I32(kind),
            Arg::U64(len as u64),
        ];
        self.launch("ns_copy_cast", grid, args)
    }

    /// Mirrors the computed triangle of `c`; writes `copy ← scale·c` (when
    /// `copy ≠ 0`) and the operand copy `op` with `kind` (when `kind ≥ 0`).
    fn mirror(&self, c: u64, copy: u64, op: u64, kind: i32, scale: f32) -> Result<()> {
        let args = vec![
            Arg::Ptr(c),
            Arg::Ptr(copy),
            Arg::Ptr(if kind < 0 { 0 } else { op }),
            Arg::I32(kind),
            Arg::U32(self.s as u32),
            Arg::F32(scale),
        ];
        let tiles = self.s.div_ceil(32) as u32;
        self.launch("ns_symmetrize", [tiles, tiles, self.j.b as u32], args)
    }

    /// `C ← α·L·Rᵀ + β·C` on one triangle of tiles (see [`sym_gemms`]).
    fn sym(&self, l: u64, r: u64, c: u64, k: usize, alpha: f64, beta: f64) -> Result<()> {
        let j = self.j;
        let (a, b) = (alpha as f32, beta as f32);
        sym_gemms(l, r, c, j.op, j.b, self.s, k, self.tile, a, b)
            .iter()
            .try_for_each(|g| self.be.gemm(g))
    }

    /// `X ← β·X + M·Xop` (row-major `Xop (s, l)`, `M (s, s)` symmetric), as
    /// cuBLAS's column-major `Xᵀ ← β·Xᵀ + Xopᵀ·M`.
    fn times_x(&self, m: u64, x: u64, xop: u64, beta: f64) -> Result<()> {
        let (b, s, l) = (self.j.b, self.s, self.l);
        self.be.gemm(&Gemm {
            transa: false,
            transb: false,
            m: l,
            n: s,
            k: s,
            alpha: 1.0,
            a: xop,
            lda: l,
            stride_a: s * l,
            b: m,
            ldb: s,
            stride_b: s * s,
            beta: beta as f32,
            c: x,
            ldc: l,
            stride_c: s * l,
            batch: b,
            op: self.j.op,
        })
    }

    /// `Xop ← X` (rounded to the operand dtype).
    fn refresh_xop(&self, x: u64, xop: u64) -> Result<()> {
        let len = self.j.b * self.s * self.l;
        self.copy_cast(x, 0, xop, self.j.op.op_kind(), len)
    }

    /// `Z ← b·R + c·R²` from `R`'s computed triangle: mirrors `R` (writing
    /// `Rop` and `Z ← R`), then one tiled GEMM with β = b onto `Z`, mirrored
    /// (writing `Zop`). The standard form's `B` is the same sequence.
    fn poly(&self, r: Square, z: Square, cb: f64, cc: f64) -> Result<()> {
        if cc == 0.0 {
            self.mirror(r.0, z.0, r.1, self.kind, cb as f32)?;
            if self.kind >= 0 {
                self.copy_cast(z.0, 0, z.1, self.kind, self.j.b * self.s * self.s)?;
            }
            return Ok(());
        }
        self.mirror(r.0, z.0, r.1, self.kind, 1.0)?;
        self.sym(r.1, r.1, z.0, self.s, cc, cb)?;
        self.mirror(z.0, 0, z.1, self.kind, 1.0)
    }
}

/// Runs [`MsignJob`]. `X` is normalised on the device and iterated on the
/// short side, in the standard form ([`msign_standard_steps`]) or the Gram
/// form ([`msign_gram_steps`]); symmetric products are computed on one
/// triangle of tiles and mirrored, the polynomial is folded into the GEMMs'
/// α/β. Intermediate buffers are allocated here and freed (stream-ordered)
/// at the end.
pub(crate) fn msign<B: Backend>(be: &B, j: &MsignJob<'_>) -> Result<()> {
    let (b, m, n) = (j.b, j.m, j.n);
    if !msign_supported(b, m, n) {
        fail!(Device, "msign", "no kernel for shape ({b}, {m}, {n})");
    }
    let (s, l) = (m.min(n), m.max(n));
    let tall = m > n;
    let mut ns = Ns {
        be,
        j,
        s,
        l,
        tile: j.tile.unwrap_or_else(|| gram_tile(s)).clamp(1, s),
        kind: if j.op == Elt::F32 { -1 } else { j.op.op_kind() },
        bufs: Vec::new(),
    };
    // ‖G‖_F² per matrix, on the device.
    let members: Vec<MtTensor> = (0..b)
        .map(|i| MtTensor {
            elt: j.elt,
            p: [0, j.g + (i * m * n) as u64 * j.elt.size(), 0, 0],
            rank1: None,
            len: (m * n) as u64,
            scalars: MtScalars::default(),
        })
        .collect();
    let (sumsq, _) = sumsq_device(be, &members)?;
    let x = ns.buf(b * s * l, 4)?;
    let xop = ns.buf(b * s * l, j.op.size() as usize)?;
    let tiles32 =
        |rows: usize, cols: usize| [cols.div_ceil(32) as u32, rows.div_ceil(32) as u32, b as u32];
    // X ← G / (‖G‖_F·scale + eps) on the short side, and Xop.
    ns.launch(
        &format!("ns_load_{}", j.elt.suffix()),
        tiles32(m, n),
        vec![
            Arg::Ptr(j.g),
            Arg::Ptr(B::addr(&sumsq)),
            Arg::Ptr(x),
            Arg::Ptr(xop),
            Arg::I32(j.op.op_kind()),
            Arg::U32(m as u32),
            Arg::U32(n as u32),
            Arg::I32(tall as i32),
            Arg::F64(j.norm_scale),
            Arg::F64(j.eps),
        ],
    )?;
    match j.gram {
        None => msign_standard_steps(&mut ns, x, xop)?,
        Some(restarts) => msign_gram_steps(&mut ns, x, xop, restarts)?,
    }
    // out ← X in the input dtype (transposed back when tall).
    let (rows, cols) = if tall { (n, m) } else { (m, n) };
    ns.launch(
        &format!("ns_store_{}", j.elt.suffix()),
        tiles32(rows, cols),
        vec![
            Arg::Ptr(x),
            Arg::Ptr(j.out),
            Arg::U32(m as u32),
            Arg::U32(n as u32),
            Arg::I32(tall as i32),
        ],
    )?;
    Ok(())
}

/// The standard form: per step `A = X Xᵀ` and `B = b·A + c·A²` (tiled,
/// mirrored; β = b onto a copy of A), `X ← a·X + B·X` (one GEMM with β = a
/// onto X itself; the operand is X's copy `Xop`).
fn msign_standard_steps<B: Backend>(ns: &mut Ns<'_, '_, B>, x: u64, xop: u64) -> Result<()> {
    let a = ns.square(false)?;
    let bm = ns.square(false)?;
    let table = ns.j.table;
    for (step, &[ca, cb, cc]) in table.iter().enumerate() {
        ns.sym(xop, xop, a.0, ns.l, 1.0, 0.0)?;
        ns.poly(a, bm, cb, cc)?;
        ns.times_x(bm.1, x, xop, ca)?;
        if step + 1 < table.len() {
            ns.refresh_xop(x, xop)?;
        }
    }
    Ok(())
}

/// The Gram form (`GramNewtonSchulz`), every product but `Q·X` symmetric
/// (tiled, mirrored): `R = X Xᵀ`; per step `Z = b·R + c·R²`, `Q ← a·Q + Q·Z`
/// (`Q = Z + a·I` on a segment's first step), and unless the segment ends
/// `RZ = a·R + R·Z`, `R ← a·RZ + Z·RZ`; at a restart and at the end
/// `X ← Q·X`.
fn msign_gram_steps<B: Backend>(
    ns: &mut Ns<'_, '_, B>,
    x: u64,
    xop: u64,
    restarts: &[usize],
) -> Result<()> {
    let r = ns.square(false)?;
    let z = ns.square(false)?;
    let rz = ns.square(false)?;
    // Q is both the output and an operand of its own update: always a copy.
    let q = ns.square(true)?;
    let q_kind = ns.j.op.op_kind();
    let sss = ns.j.b * ns.s * ns.s;
    let table = ns.j.table;
    let mut fresh = true;
    ns.sym(xop, xop, r.0, ns.l, 1.0, 0.0)?;
    for (k, &[ca, cb, cc]) in table.iter().enumerate() {
        if !fresh && restarts.contains(&k) {
            ns.times_x(q.1, x, xop, 0.0)?;
            ns.refresh_xop(x, xop)?;
            ns.sym(xop, xop, r.0, ns.l, 1.0, 0.0)?;
            fresh = true;
        }
        ns.poly(r, z, cb, cc)?;
        if fresh {
            let args = vec![
                Arg::Ptr(z.0),
                Arg::Ptr(q.0),
                Arg::Ptr(q.1),
                Arg::I32(q_kind),
                Arg::U32(ns.s as u32),
                Arg::F32(ca as f32),
            ];
            ns.launch("ns_shift_diag", ns.square_grid(), args)?;
            fresh = false;
        } else {
            ns.sym(q.1, z.1, q.0, ns.s, 1.0, ca)?;
            ns.mirror(q.0, 0, q.1, q_kind, 1.0)?;
        }
        if k + 1 < table.len() && !restarts.contains(&(k + 1)) {
            ns.copy_cast(r.0, rz.0, 0, -1, sss)?;
            ns.sym(r.1, z.1, rz.0, ns.s, 1.0, ca)?;
            // Mirror RZ, R ← RZ (the C of the next product), RZop.
            ns.mirror(rz.0, r.0, rz.1, ns.kind, 1.0)?;
            ns.sym(z.1, rz.1, r.0, ns.s, 1.0, ca)?;
        }
    }
    ns.times_x(q.1, x, xop, 0.0)
}

// ------------------------------------------------------------ calls on tensors

/// A power iteration on tensors, checked and with its outputs allocated on
/// `w`'s device; `None` from [`power_prepare`] when no kernel takes it.
pub(crate) struct PowerCall {
    pub w: Tensor,
    pub start: Option<Tensor>,
    pub elt: Elt,
    pub b: usize,
    pub m: usize,
    pub n: usize,
    pub batched: bool,
    pub sigma: Tensor,
    pub u: Tensor,
    pub v: Tensor,
}

/// Validates like `power_iteration_generic` (same errors for a bad start)
/// and allocates σ, u, v (f32).
pub(crate) fn power_prepare(w: &Tensor, start: Option<&Tensor>) -> Result<Option<PowerCall>> {
    let (m, n) = crate::linalg::matrix_dims("power_iteration: w", w)?;
    let batched = w.rank() == 3;
    let b = if batched { w.dim(0)? } else { 1 };
    if let Some(s) = start {
        let expected: &[usize] = if batched { &[b, n] } else { &[n] };
        if s.dims() != expected {
            fail!(
                Config,
                "power_iteration: start",
                "expected shape {expected:?} (an estimate of v₁), got {:?}",
                s.dims()
            );
        }
    }
    let Some(elt) = Elt::of(w.dtype()) else {
        return Ok(None);
    };
    if !power_supported(b, m, n) {
        return Ok(None);
    }
    let dev = w.device();
    Ok(Some(PowerCall {
        w: w.contiguous()?,
        start: start
            .map(|s| s.to_dtype(DType::F32)?.contiguous())
            .transpose()?,
        elt,
        b,
        m,
        n,
        batched,
        sigma: Tensor::zeros(b, DType::F32, dev)?,
        u: Tensor::zeros((b, m), DType::F32, dev)?,
        v: Tensor::zeros((b, n), DType::F32, dev)?,
    }))
}

impl PowerCall {
    /// The device job, with addresses from `r`.
    pub(crate) fn job(&self, iters: usize, r: &mut dyn Resolve) -> Result<PowerJob> {
        Ok(PowerJob {
            w: r.addr(&self.w, false)?,
            elt: self.elt,
            b: self.b,
            m: self.m,
            n: self.n,
            start: self.start.as_ref().map(|s| r.addr(s, false)).transpose()?,
            iters,
            sigma: r.addr(&self.sigma, true)?,
            u: r.addr(&self.u, true)?,
            v: r.addr(&self.v, true)?,
        })
    }

    /// The result in `power_iteration`'s shapes.
    pub(crate) fn finish(self) -> Result<crate::linalg::TopSingular> {
        let (sigma, u, v) = if self.batched {
            (self.sigma, self.u, self.v)
        } else {
            (
                self.sigma.squeeze(0)?,
                self.u.squeeze(0)?,
                self.v.squeeze(0)?,
            )
        };
        Ok(crate::linalg::TopSingular { sigma, u, v })
    }
}

/// An msign on tensors, checked and with its output allocated.
pub(crate) struct MsignCall {
    pub g: Tensor,
    pub out: Tensor,
    pub elt: Elt,
    pub op: Elt,
    pub b: usize,
    pub m: usize,
    pub n: usize,
}

/// `None` when no kernel takes it (f64, an f64 operand dtype, a shape out of range).
pub(crate) fn msign_prepare(
    g: &Tensor,
    ns: &crate::linalg::NewtonSchulz,
) -> Result<Option<MsignCall>> {
    let (m, n) = crate::linalg::matrix_dims("msign: g", g)?;
    let b = if g.rank() == 3 { g.dim(0)? } else { 1 };
    let (Some(elt), Some(op)) = (
        Elt::of(g.dtype()),
        Elt::of(ns.compute_dtype().unwrap_or(DType::F32)),
    ) else {
        return Ok(None);
    };
    if !msign_supported(b, m, n) {
        return Ok(None);
    }
    Ok(Some(MsignCall {
        g: g.contiguous()?,
        out: Tensor::zeros(g.shape(), g.dtype(), g.device())?,
        elt,
        op,
        b,
        m,
        n,
    }))
}

impl MsignCall {
    /// The device job, with addresses from `r`.
    pub(crate) fn job<'a>(
        &self,
        ns: &'a crate::linalg::NewtonSchulz,
        tile: Option<usize>,
        r: &mut dyn Resolve,
    ) -> Result<MsignJob<'a>> {
        Ok(MsignJob {
            g: r.addr(&self.g, false)?,
            out: r.addr(&self.out, true)?,
            elt: self.elt,
            b: self.b,
            m: self.m,
            n: self.n,
            table: ns.coefficients(),
            eps: ns.eps(),
            norm_scale: ns.norm_scale(),
            op: self.op,
            tile,
            gram: ns.gram_restarts(self.m, self.n),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(len: u64) -> MtTensor {
        MtTensor {
            elt: Elt::F32,
            p: [0; 4],
            rank1: None,
            len,
            scalars: MtScalars::default(),
        }
    }

    #[test]
    fn chunks_are_prefix_sums() {
        let p = mt_plan(&[t(4096), t(0), t(4097), t(1)], 4096);
        let c: Vec<u64> = p.entries.iter().map(|e| e.chunk0).collect();
        assert_eq!(c, [0, 1, 1, 3]);
        assert_eq!(p.chunks, 4);
    }

    #[test]
    fn gram_tiles_cover_one_triangle() {
        // s = 300, tile 128: tiles at 0, 128, 256 → one GEMM per tile row.
        let g = sym_gemms(0, 0, 0, Elt::F32, 1, 300, 10, 128, 1.0, 0.0);
        assert_eq!(g.len(), 3);
        let mut covered = vec![0u8; 300 * 300];
        for x in &g {
            let (i0, j0) = ((x.c / 4) as usize % 300, (x.c / 4) as usize / 300);
            assert_eq!((x.a, x.b), (i0 as u64 * 10 * 4, j0 as u64 * 10 * 4));
            for i in 0..x.m {
                for j in 0..x.n {
                    covered[(i0 + i) + (j0 + j) * 300] += 1;
                }
            }
        }
        // column-major (i, j) with tile(i) ≤ tile(j) exactly once, the rest never
        for i in 0..300 {
            for j in 0..300 {
                let want = u8::from(i / 128 <= j / 128);
                assert_eq!(covered[i + j * 300], want, "({i}, {j})");
            }
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

    /// Static and dynamic shared memory together decide the opt-in: the
    /// power iteration's 34 816 B of tiles plus 2·4·k B for k = 2048 need it
    /// (16 KiB of dynamic memory alone would not), k = 1792 does not, and no
    /// supported shape exceeds what a block can opt in to.
    #[test]
    fn shared_memory_opt_in_counts_static_memory() {
        let gram = static_shared("power_gram_f32");
        assert_eq!(gram, 34_816);
        let dynamic = |k: u32| 2 * k * 4;
        assert_eq!(shared_opt_in("g", gram, dynamic(1792)).unwrap(), None);
        assert_eq!(
            shared_opt_in("g", gram, dynamic(1793)).unwrap(),
            Some(dynamic(1793))
        );
        assert_eq!(
            shared_opt_in("g", gram, dynamic(2048)).unwrap(),
            Some(dynamic(2048))
        );
        assert_eq!(shared_opt_in("g", 0, SHARED_DEFAULT).unwrap(), None);
        assert_eq!(
            shared_opt_in("g", 0, SHARED_DEFAULT + 1).unwrap(),
            Some(SHARED_DEFAULT + 1)
        );
        let kmax = (SHARED_MAX - gram) / 8;
        assert!(power_supported(1, kmax as usize, kmax as usize + 1));
        assert!(shared_opt_in("g", gram, dynamic(kmax)).unwrap().is_some());
        assert!(!power_supported(1, kmax as usize + 1, kmax as usize + 1));
        let e = shared_opt_in("power_gram_f32", gram, dynamic(kmax + 1)).unwrap_err();
        assert!(e.to_string().contains("power_gram_f32"), "{e}");
    }

    /// The input's 32-row tiles must fit the grid's `y` (a wide matrix's
    /// long side is on `x`, which is not limited here).
    #[test]
    fn msign_shapes_fit_the_grid() {
        let most = 65_535 * 32;
        assert!(msign_supported(1, most, 8) && msign_supported(1, 8, most));
        assert!(!msign_supported(1, most + 1, 8) && msign_supported(1, 8, most + 1));
        assert!(!msign_supported(65_536, 8, 8) && msign_supported(65_535, 8, 8));
    }
}
