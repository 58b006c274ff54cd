//! The Newton–Schulz msign's launch sequence (standard and Gram forms,
//! the symmetric-product tiling), and its call on tensors.
#![cfg_attr(not(any(feature = "cuda", feature = "emu")), allow(dead_code))]

use super::*;

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

/// The Gram tile size: `X Xᵀ` is computed over the tile pairs `(I, J)`,
/// `I ≤ J` only, one GEMM per tile row ([`sym_gemms`]), then mirrored — for
/// 4 tiles 4 GEMMs computing 10/16 of the product. Small matrices are one
/// tile (one GEMM).
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
