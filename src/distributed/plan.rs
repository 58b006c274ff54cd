//! Parameter ownership across ranks, and the flat packing that lets one
//! reduce-scatter and one all-gather move every gradient and parameter.
//!
//! # Cost model
//!
//! Each parameter is assigned whole to exactly one owner rank, which is the
//! only rank that updates it and keeps its optimizer state. The cost of a
//! parameter is
//!
//! - a **matrix** ([`ParamKind::Matrix`], `rows × cols`, the matrix view
//!   `(d₀, d₁·d₂·…)` of a parameter of rank ≥ 2): `rows · cols · min(rows, cols)`,
//!   proportional to the flops of one Newton–Schulz iteration
//!   (`X Xᵀ` and `(·) X` on the short side: `2·m²n + m³` multiply-adds for
//!   `m = min`, `n = max`, so within a factor 3 of `m·n·min`);
//! - an **element-wise** parameter ([`ParamKind::Elementwise`]: vectors, scalars,
//!   and matrices an optimizer treats element by element, such as embeddings
//!   under AdamW): its element count.
//!
//! Costs are `u64`. Element-wise costs are tiny next to Newton–Schulz costs, so
//! they fill the gaps that the matrices leave.
//!
//! # Assignment
//!
//! Longest-processing-time-first greedy: parameters sorted by cost, largest
//! first (ties: lower parameter index first), each given to the rank with the
//! smallest load so far (ties: lower rank). Deterministic: the same list of
//! specs and world size give the same plan on every rank. Its largest load is
//! at most `4/3 − 1/(3N)` times the best possible one (Graham's bound), and at
//! most the mean load plus the largest single cost. With fewer parameters than
//! ranks some ranks own nothing; one huge matrix makes its owner the
//! bottleneck whatever the plan (its cost alone exceeds the mean), and the
//! greedy then gives everything else to the other ranks.
//!
//! # Packing
//!
//! Rank `r`'s **chunk** holds the parameters it owns, flattened and
//! concatenated in this order: matrices grouped by shape — shapes in the order
//! of their first appearance in the parameter list, each group's members by
//! parameter index, so a group is one contiguous `(b, rows, cols)` stack — then
//! element-wise parameters by index; then zero padding up to
//! [`chunk_len`](Plan::chunk_len), the largest rank's element count. The
//! **flat buffer** is the chunks of ranks `0, 1, …, N−1` one after the other,
//! `N · chunk_len` elements. Hence:
//!
//! - every rank [`pack`](Plan::pack)s its local gradients into the flat buffer;
//!   one reduce-scatter gives rank `r` chunk `r`, the reduced gradients of
//!   exactly its parameters ([`unpack_owned`](Plan::unpack_owned));
//! - every owner [`pack_owned`](Plan::pack_owned)s its updated parameters
//!   into its chunk; one all-gather gives every rank the flat buffer of all
//!   parameters ([`unpack`](Plan::unpack)).

use super::dist_err;
use candle_core::{DType, Device, Result, Tensor};

/// How the optimizer treats a parameter, which sets its cost.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ParamKind {
    /// Updated as a `rows × cols` matrix (Newton–Schulz); cost
    /// `rows · cols · min(rows, cols)`.
    Matrix {
        /// `d₀`.
        rows: usize,
        /// `d₁·d₂·…`.
        cols: usize,
    },
    /// Updated element by element; cost = element count.
    Elementwise,
}

/// A named parameter shape as the planner sees it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ParamSpec {
    /// The parameter's name (for messages and the fingerprint).
    pub name: String,
    /// The parameter's shape.
    pub dims: Vec<usize>,
    /// Matrix or element-wise.
    pub kind: ParamKind,
}

impl ParamSpec {
    /// A parameter of rank ≥ 2 is a matrix, viewed as `(d₀, d₁·d₂·…)`; rank
    /// ≤ 1 is element-wise.
    pub fn new(name: impl Into<String>, dims: &[usize]) -> Self {
        let kind = if dims.len() >= 2 {
            ParamKind::Matrix {
                rows: dims[0],
                cols: dims[1..].iter().product(),
            }
        } else {
            ParamKind::Elementwise
        };
        Self {
            name: name.into(),
            dims: dims.to_vec(),
            kind,
        }
    }

    /// A parameter the optimizer updates element by element whatever its
    /// rank (e.g. an embedding matrix given to AdamW).
    pub fn elementwise(name: impl Into<String>, dims: &[usize]) -> Self {
        Self {
            name: name.into(),
            dims: dims.to_vec(),
            kind: ParamKind::Elementwise,
        }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.dims.iter().product()
    }

    /// The cost model of the [module docs](self).
    pub fn cost(&self) -> u64 {
        match self.kind {
            ParamKind::Matrix { rows, cols } => rows as u64 * cols as u64 * rows.min(cols) as u64,
            ParamKind::Elementwise => self.numel() as u64,
        }
    }
}

/// A stack of same-shape matrices owned by one rank, contiguous in its chunk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stack {
    /// Rows of each matrix.
    pub rows: usize,
    /// Columns of each matrix.
    pub cols: usize,
    /// Parameter indices, in stack order.
    pub params: Vec<usize>,
    /// Offset of the stack's first element in the owner's chunk.
    pub offset: usize,
}

/// Which rank owns which parameter, and the flat layout (see the [module
/// docs](self)).
#[derive(Clone, Debug)]
pub struct Plan {
    world: usize,
    specs: Vec<ParamSpec>,
    owner: Vec<usize>,
    /// Offset of each parameter inside its owner's chunk.
    offset: Vec<usize>,
    owned: Vec<Vec<usize>>,
    stacks: Vec<Vec<Stack>>,
    load: Vec<u64>,
    chunk: usize,
}

impl Plan {
    /// Plans `specs` (in the optimizer's parameter order) over `world` ranks.
    /// Errors: `world = 0`.
    pub fn new(specs: Vec<ParamSpec>, world: usize) -> Result<Self> {
        if world == 0 {
            return Err(dist_err("Plan::new", "the world size must be ≥ 1, got 0"));
        }
        let p = specs.len();
        let mut order: Vec<usize> = (0..p).collect();
        order.sort_by(|&a, &b| specs[b].cost().cmp(&specs[a].cost()).then(a.cmp(&b)));
        let mut load = vec![0u64; world];
        let mut owner = vec![0usize; p];
        for i in order {
            let r = (0..world).min_by_key(|&r| (load[r], r)).unwrap();
            owner[i] = r;
            load[r] += specs[i].cost();
        }

        // Matrix shapes in order of first appearance.
        let mut shapes: Vec<(usize, usize)> = Vec::new();
        for s in &specs {
            if let ParamKind::Matrix { rows, cols } = s.kind {
                if !shapes.contains(&(rows, cols)) {
                    shapes.push((rows, cols));
                }
            }
        }
        let mut offset = vec![0usize; p];
        let mut owned = vec![Vec::new(); world];
        let mut stacks = vec![Vec::new(); world];
        let mut chunk = 0;
        for r in 0..world {
            let mut at = 0;
            for &(rows, cols) in &shapes {
                let members: Vec<usize> = (0..p)
                    .filter(|&i| owner[i] == r && specs[i].kind == ParamKind::Matrix { rows, cols })
                    .collect();
                if members.is_empty() {
                    continue;
                }
                stacks[r].push(Stack {
                    rows,
                    cols,
                    params: members.clone(),
                    offset: at,
                });
                for i in members {
                    offset[i] = at;
                    at += specs[i].numel();
                    owned[r].push(i);
                }
            }
            for i in 0..p {
                if owner[i] == r && specs[i].kind == ParamKind::Elementwise {
                    offset[i] = at;
                    at += specs[i].numel();
                    owned[r].push(i);
                }
            }
            chunk = chunk.max(at);
        }
        Ok(Self {
            world,
            specs,
            owner,
            offset,
            owned,
            stacks,
            load,
            chunk,
        })
    }

    /// Plans the parameters of these names and shapes, matrices by rank
    /// ([`ParamSpec::new`]).
    pub fn from_shapes<S: AsRef<str>>(params: &[(S, Vec<usize>)], world: usize) -> Result<Self> {
        Self::new(
            params
                .iter()
                .map(|(n, d)| ParamSpec::new(n.as_ref(), d))
                .collect(),
            world,
        )
    }

    /// Number of ranks.
    pub fn world_size(&self) -> usize {
        self.world
    }

    /// The parameter specs, in parameter order.
    pub fn specs(&self) -> &[ParamSpec] {
        &self.specs
    }

    /// Number of parameters.
    pub fn len(&self) -> usize {
        self.specs.len()
    }

    /// `true` when there are no parameters.
    pub fn is_empty(&self) -> bool {
        self.specs.is_empty()
    }

    /// The owner rank of parameter `i`.
    pub fn owner(&self, i: usize) -> usize {
        self.owner[i]
    }

    /// The parameters rank `r` owns, in chunk order.
    pub fn owned(&self, r: usize) -> &[usize] {
        &self.owned[r]
    }

    /// Rank `r`'s same-shape matrix stacks, in chunk order.
    pub fn stacks(&self, r: usize) -> &[Stack] {
        &self.stacks[r]
    }

    /// Total cost owned by each rank.
    pub fn loads(&self) -> &[u64] {
        &self.load
    }

    /// Largest load over smallest load (`inf` when some rank owns nothing,
    /// 1 for an empty plan).
    pub fn load_ratio(&self) -> f64 {
        let max = *self.load.iter().max().unwrap();
        let min = *self.load.iter().min().unwrap();
        if max == 0 {
            1.0
        } else if min == 0 {
            f64::INFINITY
        } else {
            max as f64 / min as f64
        }
    }

    /// Elements per rank in the flat buffer (the largest rank's owned element
    /// count; the others are padded with zeros).
    pub fn chunk_len(&self) -> usize {
        self.chunk
    }

    /// `world_size · chunk_len`.
    pub fn flat_len(&self) -> usize {
        self.world * self.chunk
    }

    /// Position of parameter `i`'s first element in the flat buffer.
    pub fn flat_offset(&self, i: usize) -> usize {
        self.owner[i] * self.chunk + self.offset[i]
    }

    /// Number of elements rank `r` owns (its chunk without padding).
    pub fn owned_len(&self, r: usize) -> usize {
        self.owned[r].iter().map(|&i| self.specs[i].numel()).sum()
    }

    /// A 64-bit FNV-1a hash of the world size and every spec (name, dims,
    /// kind), to check that all ranks planned the same parameter list.
    pub fn fingerprint(&self) -> u64 {
        let mut h = FNV_OFFSET;
        let mut eat = |bytes: &[u8]| h = fnv1a(h, bytes);
        eat(&(self.world as u64).to_le_bytes());
        for s in &self.specs {
            eat(s.name.as_bytes());
            eat(&[0xff]);
            for d in &s.dims {
                eat(&(*d as u64).to_le_bytes());
            }
            match s.kind {
                // (the matrix view decides the cost, so the owners)
                ParamKind::Matrix { rows, cols } => {
                    eat(b"M");
                    eat(&(rows as u64).to_le_bytes());
                    eat(&(cols as u64).to_le_bytes());
                }
                ParamKind::Elementwise => eat(b"E"),
            }
        }
        h
    }

    fn check(&self, who: &str, i: usize, t: &Tensor) -> Result<()> {
        if t.dims() != self.specs[i].dims.as_slice() {
            return Err(dist_err(
                who,
                format!(
                    "parameter {i} ({}): expected shape {:?}, got {:?}",
                    self.specs[i].name,
                    self.specs[i].dims,
                    t.dims()
                ),
            ));
        }
        Ok(())
    }

    fn check_len(&self, who: &str, what: &str, got: usize) -> Result<()> {
        if got != self.specs.len() {
            return Err(dist_err(
                who,
                format!(
                    "expected {} {what} (one per parameter), got {got}",
                    self.specs.len()
                ),
            ));
        }
        Ok(())
    }

    /// Rank `r`'s chunk built from `values` (indexed by parameter; `None` is
    /// zeros), cast to `dtype`, padded.
    fn chunk_of(
        &self,
        who: &str,
        r: usize,
        values: &[Option<&Tensor>],
        dtype: DType,
        device: &Device,
        pieces: &mut Vec<Tensor>,
    ) -> Result<()> {
        for &i in &self.owned[r] {
            match values[i] {
                Some(t) => {
                    self.check(who, i, t)?;
                    pieces.push(t.flatten_all()?.to_dtype(dtype)?.to_device(device)?);
                }
                None => pieces.push(Tensor::zeros(self.specs[i].numel(), dtype, device)?),
            }
        }
        let pad = self.chunk - self.owned_len(r);
        if pad > 0 {
            pieces.push(Tensor::zeros(pad, dtype, device)?);
        }
        Ok(())
    }

    fn concat(pieces: Vec<Tensor>, dtype: DType, device: &Device) -> Result<Tensor> {
        match pieces.len() {
            0 => Tensor::zeros(0, dtype, device),
            1 => Ok(pieces.into_iter().next().unwrap()),
            _ => Tensor::cat(&pieces, 0),
        }
    }

    /// The flat buffer (`flat_len` elements, `dtype`, on `device`) of all
    /// parameters' `values`, e.g. this rank's local gradients, indexed by
    /// parameter; `None` (a parameter without a gradient) packs as zeros, and
    /// so does the padding. A shape that differs from the spec is an error.
    pub fn pack(&self, values: &[Option<Tensor>], dtype: DType, device: &Device) -> Result<Tensor> {
        self.check_len("Plan::pack", "values", values.len())?;
        let refs: Vec<Option<&Tensor>> = values.iter().map(|v| v.as_ref()).collect();
        let mut pieces = Vec::with_capacity(self.specs.len() + self.world);
        for r in 0..self.world {
            self.chunk_of("Plan::pack", r, &refs, dtype, device, &mut pieces)?;
        }
        Self::concat(pieces, dtype, device)
    }

    /// Rank `r`'s chunk (`chunk_len` elements) of the parameters it owns, taken
    /// from `params` (indexed by parameter; only the owned entries are read),
    /// cast to `dtype`, padded with zeros.
    pub fn pack_owned(
        &self,
        r: usize,
        params: &[Tensor],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        self.check_len("Plan::pack_owned", "params", params.len())?;
        let refs: Vec<Option<&Tensor>> = params.iter().map(Some).collect();
        let mut pieces = Vec::with_capacity(self.owned[r].len() + 1);
        self.chunk_of("Plan::pack_owned", r, &refs, dtype, device, &mut pieces)?;
        Self::concat(pieces, dtype, device)
    }

    /// The parameters rank `r` owns, read from its chunk (e.g. the output of
    /// the reduce-scatter), as `(parameter index, tensor of the parameter's
    /// shape)` in chunk order. The tensors are views of `chunk` (no copy).
    pub fn unpack_owned(&self, r: usize, chunk: &Tensor) -> Result<Vec<(usize, Tensor)>> {
        if chunk.elem_count() != self.chunk {
            return Err(dist_err(
                "Plan::unpack_owned",
                format!(
                    "expected a chunk of {} elements, got {}",
                    self.chunk,
                    chunk.elem_count()
                ),
            ));
        }
        let flat = chunk.flatten_all()?;
        self.owned[r]
            .iter()
            .map(|&i| {
                let s = &self.specs[i];
                Ok((
                    i,
                    flat.narrow(0, self.offset[i], s.numel())?
                        .reshape(s.dims.as_slice())?,
                ))
            })
            .collect()
    }

    /// Every parameter, read from a flat buffer of `flat_len` elements (e.g.
    /// the output of the all-gather), in parameter order and shape. The
    /// padding is ignored.
    pub fn unpack(&self, flat: &Tensor) -> Result<Vec<Tensor>> {
        if flat.elem_count() != self.flat_len() {
            return Err(dist_err(
                "Plan::unpack",
                format!(
                    "expected a flat buffer of {} elements ({} ranks × {}), got {}",
                    self.flat_len(),
                    self.world,
                    self.chunk,
                    flat.elem_count()
                ),
            ));
        }
        let flat = flat.flatten_all()?;
        (0..self.specs.len())
            .map(|i| {
                let s = &self.specs[i];
                flat.narrow(0, self.flat_offset(i), s.numel())?
                    .reshape(s.dims.as_slice())
            })
            .collect()
    }
}

/// FNV-1a's offset basis: the hash of nothing.
pub(super) const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a's prime.
pub(super) const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// The 64-bit FNV-1a hash `h` continued over `bytes`.
pub(super) fn fnv1a(h: u64, bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(h, |h, b| (h ^ *b as u64).wrapping_mul(FNV_PRIME))
}
