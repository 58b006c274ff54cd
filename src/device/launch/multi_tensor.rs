//! Multi-tensor launches: the tables of tensors (one entry per parameter,
//! chunked), the fused AdamW / SGD / momentum / apply updates and the
//! reductions (finite check, sums of squares) over them.
#![cfg_attr(not(any(feature = "cuda", feature = "emu")), allow(dead_code))]

use super::*;

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

/// The grid of a grid-stride kernel over `units` block-sized units: one
/// block per unit, at most [`MAX_BLOCKS`].
pub(crate) fn grid_for(units: u64) -> u32 {
    units.clamp(1, grid_cap()) as u32
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
}
