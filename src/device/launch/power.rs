//! The batched power iteration's launch sequence, and its call on tensors.
#![cfg_attr(not(any(feature = "cuda", feature = "emu")), allow(dead_code))]

use candle_core::Var;

use super::*;

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

/// Whether the kernels take a `(b, m, n)` power iteration on a device whose
/// blocks may have `shared_max` bytes of shared memory: the short side's
/// two shared vectors must fit beside the tiles (up to k = 24 704 on sm_90,
/// 8 320 on sm_86/sm_89's 99 KiB); otherwise candle's ops run it.
pub(crate) fn power_supported(b: usize, m: usize, n: usize, shared_max: u32) -> bool {
    let k = m.min(n) as u64;
    b >= 1
        && m >= 1
        && n >= 1
        && b <= MAX_GRID_YZ
        && k * 8 + u64::from(POWER_STATIC_SHARED) <= u64::from(shared_max)
        && m.max(n) <= POWER_MAX_SIDE
}

/// The longest side `power_gram` takes: its warps walk groups of 32 vectors
/// with a 32-bit counter `g` (64 bits would cost it ~90 more registers per
/// thread), and the last `g` a warp tries is up to one grid stride (at most
/// [`POWER_GRAM_MAX_BLOCKS`] blocks of `BLOCK / 32` warps) past the end, so `32·g` stays below 2³²
/// only if the side leaves that much room.
pub(crate) const POWER_MAX_SIDE: usize =
    u32::MAX as usize - 32 * POWER_GRAM_MAX_BLOCKS as usize * (BLOCK as usize / 32);

/// The most blocks `power_gram` runs per matrix (its grid `x`).
pub(crate) const POWER_GRAM_MAX_BLOCKS: u32 = 256;

/// A batched power iteration on the device: `ws` the addresses of `b`
/// matrices `(m, n)` of `elt`, `starts` the addresses of their start vectors
/// (`n` f32 each) or none, outputs `sigma` `(b,)`, `u` `(b, m)`, `v` `(b, n)`
/// (f32), all device addresses; with `store`, v₁ is also written to the
/// starts' addresses. No host sync.
#[derive(Clone, Debug)]
pub(crate) struct PowerJob {
    pub ws: Vec<u64>,
    pub elt: Elt,
    pub b: usize,
    pub m: usize,
    pub n: usize,
    pub starts: Option<Vec<u64>>,
    pub store: bool,
    pub iters: usize,
    pub sigma: u64,
    pub u: u64,
    pub v: u64,
}

/// The grid `x` of `power_gram`: one group of 32 vectors (rows when tall,
/// columns when wide: the kernel's unit of work, one per warp at a time) per
/// warp, at most [`POWER_GRAM_MAX_BLOCKS`] blocks per matrix (beyond that a
/// warp takes several groups). So no block is launched without a group:
/// such a block would still clear its accumulator and add k zeros into `y`
/// with global atomics. (It counted rows, 4 per warp, when tall, so 7 of 8
/// blocks had no group; and 4 column groups per warp when wide.)
pub(crate) fn power_gram_blocks(m: usize, n: usize) -> u32 {
    let groups = m.max(n).div_ceil(32) as u64;
    groups
        .div_ceil(u64::from(BLOCK / 32))
        .clamp(1, u64::from(POWER_GRAM_MAX_BLOCKS)) as u32
}

/// Runs [`PowerJob`]; the launch sequence is described in `power.cu`.
pub(crate) fn power_iteration<B: Backend>(be: &B, j: &PowerJob) -> Result<()> {
    let (b, m, n) = (j.b, j.m, j.n);
    if !power_supported(b, m, n, be.shared_max()) {
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
    // A group's parameters and state vectors do not move (`j.store`), so
    // their tables are uploaded once; a temporary's are uploaded per call
    // and not kept, where they would only push useful tables out.
    let table = |addrs: &[u64]| -> Result<Arc<B::Buf>> {
        if j.store {
            cached_upload(be, &bytes_of(addrs))
        } else {
            Ok(Arc::new(be.upload(&bytes_of(addrs))?))
        }
    };
    let w_table = table(&j.ws)?;
    let dflt_n = cached_upload(be, &bytes_of(&default_start(n)))?;
    let dflt_m = cached_upload(be, &bytes_of(&default_start(m)))?;
    let gram = |mode: i32, x: u64, z: u64, out: u64| -> Result<()> {
        be.launch(&Launch {
            kernel: format!("power_gram_{}", j.elt.suffix()),
            grid: [power_gram_blocks(m, n), b as u32, 1],
            block: BLOCK,
            shared: (2 * k * 4) as u32,
            args: vec![
                Arg::Ptr(B::addr(&w_table)),
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
    let starts = j.starts.as_deref().map(table).transpose()?;
    let starts_addr = starts.as_ref().map_or(0, |t| B::addr(t));
    be.launch(&Launch {
        kernel: "power_start".into(),
        grid: [b as u32, 1, 1],
        block: BLOCK,
        shared: 0,
        args: vec![
            Arg::Ptr(starts_addr),
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
    if j.store && starts_addr != 0 {
        // v₁ back into each matrix's start vector (one launch per group).
        be.launch(&Launch {
            kernel: "power_store".into(),
            grid: [b as u32, 1, 1],
            block: BLOCK,
            shared: 0,
            args: vec![Arg::Ptr(j.v), Arg::Ptr(starts_addr), Arg::U32(n as u32)],
        })?;
    }
    Ok(())
}

/// A power iteration on tensors, checked and with its outputs allocated on
/// the matrices' device; `None` from [`power_prepare`] when no kernel takes it.
pub(crate) struct PowerCall {
    /// The `b` matrices `(m, n)`, contiguous (views of one batch, or a
    /// group's parameters each where it is).
    pub ws: Vec<Tensor>,
    /// Each matrix's start vector `(n,)` f32, contiguous, or none.
    pub starts: Option<Vec<Tensor>>,
    /// Whether v₁ goes back into the starts (a group's state vectors).
    pub store: bool,
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
/// and allocates σ, u, v (f32); `None` when no kernel takes it on a device
/// with `shared_max` bytes of shared memory per block.
pub(crate) fn power_prepare(
    w: &Tensor,
    start: Option<&Tensor>,
    shared_max: u32,
) -> Result<Option<PowerCall>> {
    let (m, n) = crate::linalg::matrix_dims("power_iteration: w", w)?;
    let batched = w.rank() == 3;
    let b = if batched { w.dim(0)? } else { 1 };
    crate::linalg::check_start(start, batched, b, n)?;
    let rows = |t: Tensor| {
        (0..b)
            .map(|i| t.get(i))
            .collect::<candle_core::Result<Vec<_>>>()
    };
    let ws = rows(w.contiguous()?.reshape((b, m, n))?)?;
    let starts = start
        .map(|s| rows(s.to_dtype(DType::F32)?.contiguous()?.reshape((b, n))?))
        .transpose()?;
    prepare(ws, starts, false, batched, shared_max)
}

/// [`power_prepare`] for the batch that the same-shape matrices `ws` would
/// stack into, each read where it is, each warm-started from its own state
/// vector `vs[i]` (`(n,)` f32), which receives the new v₁. `None` also when
/// the state vectors are not f32.
pub(crate) fn power_prepare_members(
    ws: &[Tensor],
    vs: &[Var],
    shared_max: u32,
) -> Result<Option<PowerCall>> {
    let Some(first) = ws.first() else {
        fail!(Shape, "power_iteration", "no matrices");
    };
    let (m, n) = crate::linalg::matrix_dims("power_iteration: w", first)?;
    crate::linalg::check_members(ws, m, n)?;
    crate::linalg::check_state_vectors(vs, ws.len(), n)?;
    if vs
        .iter()
        .any(|v| v.dtype() != DType::F32 || !v.is_contiguous())
    {
        return Ok(None);
    }
    let ws = ws
        .iter()
        .map(|w| w.contiguous())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let starts = vs.iter().map(|v| v.as_tensor().clone()).collect();
    prepare(ws, Some(starts), true, true, shared_max)
}

fn prepare(
    ws: Vec<Tensor>,
    starts: Option<Vec<Tensor>>,
    store: bool,
    batched: bool,
    shared_max: u32,
) -> Result<Option<PowerCall>> {
    let (b, (m, n)) = (ws.len(), ws[0].dims2()?);
    let Some(elt) = Elt::of(ws[0].dtype()) else {
        return Ok(None);
    };
    if !power_supported(b, m, n, shared_max) {
        return Ok(None);
    }
    let dev = ws[0].device().clone();
    // The launch sequence writes every entry of σ, u and v before anything
    // reads them (σ by the last `power_normalize`; the iterate's vector by
    // `power_start` or the first `power_normalize`; the other by the last
    // `power_gram`, in DOT mode, over every row or column), so on a GPU they
    // are left uninitialised (no memsets). Under the emulator (CPU tensors)
    // they start as NaN, so that a missed entry fails its tests.
    let out = |dims: &[usize]| -> candle_core::Result<Tensor> {
        if dev.is_cpu() {
            Tensor::full(f32::NAN, dims, &dev)
        } else {
            // SAFETY: every entry is written before it is read (above).
            unsafe { Tensor::empty(dims, DType::F32, &dev) }
        }
    };
    Ok(Some(PowerCall {
        starts,
        store,
        elt,
        b,
        m,
        n,
        batched,
        sigma: out(&[b])?,
        u: out(&[b, m])?,
        v: out(&[b, n])?,
        ws,
    }))
}

impl PowerCall {
    /// The device job, with addresses from `r`.
    pub(crate) fn job(&self, iters: usize, r: &mut dyn Resolve) -> Result<PowerJob> {
        Ok(PowerJob {
            ws: self
                .ws
                .iter()
                .map(|w| r.addr(w, false))
                .collect::<Result<_>>()?,
            elt: self.elt,
            b: self.b,
            m: self.m,
            n: self.n,
            // Stored into: resolved as outputs (each its own storage).
            starts: self
                .starts
                .as_ref()
                .map(|ss| ss.iter().map(|s| r.addr(s, self.store)).collect())
                .transpose()?,
            store: self.store,
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
