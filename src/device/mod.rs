//! The device seam: every hot operation of a step goes through here, and is
//! dispatched to the CPU implementation ([`cpu`], in place, one pass over
//! memory), a CUDA kernel (feature `cuda`, `kernels/*.cu`), or candle's generic
//! ops (any other device, e.g. Metal; new values are computed and then written
//! into the existing storage with `Var::set`).
//!
//! The operations:
//! - the fused multi-tensor updates, in place on parameters and state:
//!   [`adamw_step`], [`sgd_step`], [`ema_momentum`] (Muon's momentum, writing
//!   the direction) and [`apply_step`] (`w ← decayed(w) − α·d`); decoupled and
//!   rank-1 spectral decay are folded into them ([`DecayTerm`]);
//! - [`first_nonfinite`], the finite check of a whole step's gradients (one
//!   host sync);
//! - [`msign`] and [`power_iteration`] on a batch of same-shape matrices;
//! - [`sum_squares`], squared norms of many tensors (one host sync).
//!
//! Every function here assumes the caller validated what it knows (the
//! gradients against their parameters, one device); it still refuses what
//! it alone can see — operand counts and sizes, an unsupported dtype, an
//! output sharing memory with another operand, a shape the kernels cannot
//! take — and reports a kernel that fails to launch.
//!
//! The CUDA kernels are also compiled for the host and run on the CPU by the
//! crate's kernel emulator (`emu`, feature `emu`: on for this crate's own
//! tests), which the tests compare with [`cpu`]; the launch code (`launch/`)
//! is shared by both. See `docs/kernels.md`.

pub mod access;
mod count;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "emu")]
pub mod emu;
mod host;
pub(crate) mod launch;

use candle_core::{DType, Device, Tensor, Var};

use crate::error::{fail, Result};
use crate::linalg::{NewtonSchulz, TopSingular};
use access::{slice, slice_mut, with_cpu_data, Data, DataMut, Typed};
pub use count::{msign_device_work, MsignWork};
pub use cpu::AdamStep;
pub(crate) use host::{host_f64, host_f64_scalar, upload_f64, wide_dtype};

/// Decay folded into an update: `w ← scale·w − coeff·a bᵀ` on the matrix view.
#[derive(Clone, Copy, Debug)]
pub struct DecayTerm<'a> {
    /// The factor on `w`: `1 − ηλ` (decoupled), 1 (none or spectral).
    pub scale: f64,
    /// The spectral decay's rank-1 term.
    pub rank1: Option<Rank1<'a>>,
}

/// The rank-1 term `coeff·a bᵀ` of spectral decay: `a` has the matrix view's
/// rows, `b` its columns, both in the arithmetic dtype (f32, f64 for f64).
#[derive(Clone, Copy, Debug)]
pub struct Rank1<'a> {
    /// The coefficient (`ηλ`).
    pub coeff: f64,
    /// Column factor, `(rows,)`.
    pub a: &'a Tensor,
    /// Row factor, `(cols,)`.
    pub b: &'a Tensor,
}

impl DecayTerm<'_> {
    /// No decay.
    pub const NONE: DecayTerm<'static> = DecayTerm {
        scale: 1.0,
        rank1: None,
    };
}

/// One parameter of a fused AdamW update.
#[derive(Clone, Copy, Debug)]
pub struct AdamItem<'a> {
    /// The parameter, updated in place.
    pub w: &'a Var,
    /// Its gradient (the parameter's dtype and shape).
    pub g: &'a Tensor,
    /// First moment (arithmetic dtype), updated in place.
    pub m: &'a Var,
    /// Second moment, updated in place.
    pub v: &'a Var,
    /// This parameter's step factors.
    pub step: AdamStep,
    /// Decay folded into the update.
    pub decay: DecayTerm<'a>,
}

/// One parameter of a fused SGD update.
#[derive(Clone, Copy, Debug)]
pub struct SgdItem<'a> {
    /// The parameter, updated in place.
    pub w: &'a Var,
    /// Its gradient.
    pub g: &'a Tensor,
    /// Momentum buffer (arithmetic dtype), `None` without momentum.
    pub buf: Option<&'a Var>,
    /// Learning rate.
    pub lr: f64,
    /// Decay folded into the update.
    pub decay: DecayTerm<'a>,
}

/// The arithmetic dtype of a parameter dtype: f64 stays f64, the rest use f32.
pub fn math_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F64 => DType::F64,
        _ => DType::F32,
    }
}

fn all_cpu(ts: &[&Tensor]) -> bool {
    !generic_only() && ts.iter().all(|t| t.device().is_cpu())
}

thread_local! {
    static GENERIC_ONLY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether this thread is inside [`with_generic_ops`].
fn generic_only() -> bool {
    GENERIC_ONLY.with(|g| g.get())
}

/// Runs `f` with every operation of this module on candle's generic ops, on
/// this thread: the path that Metal and any other device without its own
/// kernels take. Tensors stay where they are; only the dispatch changes.
///
/// This is how that path is tested on the CPU (`tests/generic_path.rs`: whole
/// optimizer steps against the CPU kernels) and how the CUDA kernels can be
/// compared with candle's ops on the same GPU. The previous setting is
/// restored when `f` returns or unwinds, so calls nest.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use steepest::device::{first_nonfinite, with_generic_ops};
///
/// let g = Tensor::new(&[1f32, f32::NAN], &Device::Cpu)?;
/// let found = with_generic_ops(|| first_nonfinite(&[&g]))?;
/// assert_eq!(found, Some(0));
/// # Ok::<(), steepest::Error>(())
/// ```
pub fn with_generic_ops<T>(f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            GENERIC_ONLY.with(|g| g.set(self.0));
        }
    }
    let _restore = Restore(GENERIC_ONLY.with(|g| g.replace(true)));
    f()
}

/// The generic path's aliasing rule, the same as the CPU path's and the
/// kernels': an output may not share its storage with another operand (the
/// generic path writes each output after computing it, so a shared output
/// would be overwritten by a later one).
fn refuse_shared_storage(ins: &[&Tensor], outs: &[&Tensor]) -> Result<()> {
    let id = |t: &&Tensor| access::storage_id(t);
    let (ins, outs): (Vec<usize>, Vec<usize>) =
        (ins.iter().map(id).collect(), outs.iter().map(id).collect());
    for (i, o) in outs.iter().enumerate() {
        if outs[..i].contains(o) || ins.contains(o) {
            fail!(
                Device,
                "generic update",
                "an output tensor shares its storage with another operand"
            );
        }
    }
    Ok(())
}

/// A CPU kernel over a group, generic over the parameter element type `P`
/// (arithmetic type `P::A`).
trait GroupKernel {
    fn run<P: cpu::Elem + Typed>(&mut self) -> Result<()>
    where
        P::A: Typed;
}

/// Runs `k` at the element type of `dtype`.
fn on_dtype<K: GroupKernel>(dtype: DType, k: &mut K) -> Result<()> {
    match dtype {
        DType::F32 => k.run::<f32>(),
        DType::F64 => k.run::<f64>(),
        DType::BF16 => k.run::<half::bf16>(),
        DType::F16 => k.run::<half::f16>(),
        d => fail!(
            Device,
            "cpu kernel",
            "parameters of dtype {d:?} are not supported"
        ),
    }
}

/// Whether the CPU path applies: every tensor on the CPU, one parameter dtype.
fn cpu_group(ws: &[&Var], others: &[&Tensor]) -> bool {
    let dt = ws.first().map(|w| w.dtype());
    !generic_only()
        && ws
            .iter()
            .all(|w| w.device().is_cpu() && Some(w.dtype()) == dt)
        && all_cpu(others)
}

/// The decay of one item as CPU slices, reading `a`, `b` from `ins[at..]`.
fn cpu_decay<'a, A: cpu::Real + Typed>(
    d: &DecayTerm<'_>,
    ins: &[Data<'a>],
    at: usize,
) -> Result<cpu::Decay<'a, A>> {
    let rank1 = match d.rank1 {
        None => None,
        Some(r) => Some((
            A::of(r.coeff),
            slice::<A>(&ins[at], "spectral decay: a")?,
            slice::<A>(&ins[at + 1], "spectral decay: b")?,
        )),
    };
    Ok(cpu::Decay {
        scale: A::of(d.scale),
        rank1,
    })
}

fn decay_inputs<'a>(d: &DecayTerm<'a>, ins: &mut Vec<&'a Tensor>) {
    if let Some(r) = d.rank1 {
        ins.push(r.a);
        ins.push(r.b);
    }
}

/// `scale·w − coeff·a bᵀ` with candle ops (the generic path), in `w`'s shape.
fn generic_decayed(w: &Tensor, d: &DecayTerm<'_>) -> Result<Tensor> {
    let mut out = (w * d.scale)?;
    if let Some(r) = d.rank1 {
        let outer = r.a.unsqueeze(1)?.matmul(&r.b.unsqueeze(0)?)?;
        out = (out - (outer.reshape(w.shape())? * r.coeff)?)?;
    }
    Ok(out)
}

/// AdamW on every item, in place (see [`cpu::adamw`] for the formulas).
pub fn adamw_step(items: &[AdamItem<'_>], beta1: f64, beta2: f64, eps: f64) -> Result<()> {
    check_adam_items(items)?;
    #[cfg(feature = "cuda")]
    if !generic_only() && cuda::adamw_step(items, beta1, beta2, eps)? {
        return Ok(());
    }
    let ws: Vec<&Var> = items.iter().map(|it| it.w).collect();
    let gs: Vec<&Tensor> = items.iter().map(|it| it.g).collect();
    if !items.is_empty() && cpu_group(&ws, &gs) {
        let (mut ins, mut at, mut outs) = (Vec::new(), Vec::new(), Vec::new());
        for it in items {
            at.push(ins.len());
            ins.push(it.g);
            decay_inputs(&it.decay, &mut ins);
            outs.extend([it.w.as_tensor(), it.m.as_tensor(), it.v.as_tensor()]);
        }
        return with_cpu_data(&ins, &outs, |ins, outs| {
            struct K<'x, 'a, 'b> {
                ins: &'x [Data<'a>],
                at: &'x [usize],
                outs: &'x mut [DataMut<'b>],
                items: &'x [AdamItem<'x>],
                hp: (f64, f64, f64),
            }
            impl GroupKernel for K<'_, '_, '_> {
                fn run<P: cpu::Elem + Typed>(&mut self) -> Result<()>
                where
                    P::A: Typed,
                {
                    let mut jobs = Vec::with_capacity(self.items.len());
                    for (k, chunk) in self.outs.chunks_mut(3).enumerate() {
                        let [w, m, v] = chunk else { unreachable!() };
                        let at = self.at[k];
                        jobs.push(cpu::AdamJob {
                            w: slice_mut::<P>(w, "parameter")?,
                            g: slice::<P>(&self.ins[at], "gradient")?,
                            m: slice_mut::<P::A>(m, "exp_avg")?,
                            v: slice_mut::<P::A>(v, "exp_avg_sq")?,
                            step: self.items[k].step,
                            decay: cpu_decay::<P::A>(&self.items[k].decay, self.ins, at + 1)?,
                        });
                    }
                    let (b1, b2, eps) = self.hp;
                    cpu::adamw_multi(&mut jobs, b1, b2, eps);
                    Ok(())
                }
            }
            let dtype = items[0].w.dtype();
            on_dtype(
                dtype,
                &mut K {
                    ins,
                    at: &at,
                    outs,
                    items,
                    hp: (beta1, beta2, eps),
                },
            )
        });
    }
    let mut ins = Vec::new();
    for it in items {
        ins.push(it.g);
        decay_inputs(&it.decay, &mut ins);
    }
    let outs: Vec<&Tensor> = items
        .iter()
        .flat_map(|it| [it.w.as_tensor(), it.m.as_tensor(), it.v.as_tensor()])
        .collect();
    refuse_shared_storage(&ins, &outs)?;
    for it in items {
        let dt = it.m.dtype();
        let g = it.g.to_dtype(dt)?;
        let (m, v) = (it.m.as_tensor(), it.v.as_tensor());
        let m_new = (m + ((&g - m)? * (1.0 - beta1))?)?;
        let v_new = ((v * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
        let denom = ((v_new.sqrt()? / it.step.bc2_sqrt)? + eps)?;
        let w = generic_decayed(&it.w.as_tensor().to_dtype(dt)?, &it.decay)?;
        let w_new = (w - ((&m_new / &denom)? * it.step.lr_bc1)?)?;
        it.m.set(&m_new)?;
        it.v.set(&v_new)?;
        it.w.set(&w_new.to_dtype(it.w.dtype())?)?;
    }
    Ok(())
}

/// SGD on every item, in place (see [`cpu::sgd`]).
pub fn sgd_step(items: &[SgdItem<'_>], momentum: f64, nesterov: bool) -> Result<()> {
    check_sgd_items(items)?;
    #[cfg(feature = "cuda")]
    if !generic_only() && cuda::sgd_step(items, momentum, nesterov)? {
        return Ok(());
    }
    let ws: Vec<&Var> = items.iter().map(|it| it.w).collect();
    let gs: Vec<&Tensor> = items.iter().map(|it| it.g).collect();
    if !items.is_empty() && cpu_group(&ws, &gs) {
        let (mut ins, mut at, mut outs) = (Vec::new(), Vec::new(), Vec::new());
        for it in items {
            at.push(ins.len());
            ins.push(it.g);
            decay_inputs(&it.decay, &mut ins);
            outs.push(it.w.as_tensor());
            if let Some(b) = it.buf {
                outs.push(b.as_tensor());
            }
        }
        return with_cpu_data(&ins, &outs, |ins, outs| {
            struct K<'x, 'a, 'b> {
                ins: &'x [Data<'a>],
                at: &'x [usize],
                outs: &'x mut [DataMut<'b>],
                items: &'x [SgdItem<'x>],
                hp: (f64, bool),
            }
            impl GroupKernel for K<'_, '_, '_> {
                fn run<P: cpu::Elem + Typed>(&mut self) -> Result<()>
                where
                    P::A: Typed,
                {
                    let mut jobs = Vec::with_capacity(self.items.len());
                    let mut rest: &mut [DataMut<'_>] = self.outs;
                    for (k, it) in self.items.iter().enumerate() {
                        let n = if it.buf.is_some() { 2 } else { 1 };
                        let (mine, tail) = rest.split_at_mut(n);
                        rest = tail;
                        let (w, buf) = mine.split_first_mut().expect("w");
                        let at = self.at[k];
                        jobs.push(cpu::SgdJob {
                            w: slice_mut::<P>(w, "parameter")?,
                            g: slice::<P>(&self.ins[at], "gradient")?,
                            buf: match buf.first_mut() {
                                Some(b) => Some(slice_mut::<P::A>(b, "momentum")?),
                                None => None,
                            },
                            lr: it.lr,
                            decay: cpu_decay::<P::A>(&it.decay, self.ins, at + 1)?,
                        });
                    }
                    let (mu, nesterov) = self.hp;
                    cpu::sgd_multi(&mut jobs, mu, nesterov);
                    Ok(())
                }
            }
            let dtype = items[0].w.dtype();
            on_dtype(
                dtype,
                &mut K {
                    ins,
                    at: &at,
                    outs,
                    items,
                    hp: (momentum, nesterov),
                },
            )
        });
    }
    let mut ins = Vec::new();
    let mut outs = Vec::new();
    for it in items {
        ins.push(it.g);
        decay_inputs(&it.decay, &mut ins);
        outs.push(it.w.as_tensor());
        outs.extend(it.buf.map(|b| b.as_tensor()));
    }
    refuse_shared_storage(&ins, &outs)?;
    for it in items {
        let dt = math_dtype(it.w.dtype());
        let g = it.g.to_dtype(dt)?;
        let w = generic_decayed(&it.w.as_tensor().to_dtype(dt)?, &it.decay)?;
        let d = match it.buf {
            None => g,
            Some(buf) => {
                let b = ((buf.as_tensor() * momentum)? + &g)?;
                let d = if nesterov {
                    (&g + (&b * momentum)?)?
                } else {
                    b.clone()
                };
                buf.set(&b)?;
                d
            }
        };
        it.w.set(&(w - (d * it.lr)?)?.to_dtype(it.w.dtype())?)?;
    }
    Ok(())
}

/// One buffer and one output row per gradient (shared by every
/// implementation of [`ema_momentum`]).
pub(crate) fn check_ema_counts(grads: &[&Tensor], bufs: &[&Var], out: &Var) -> Result<()> {
    let n = grads.len();
    if bufs.len() != n || out.dim(0)? != n {
        fail!(
            Shape,
            "ema_momentum",
            "{n} gradients, {} buffers, {} outputs",
            bufs.len(),
            out.dim(0)?
        );
    }
    // Every member the same size as its output row (the CPU path splits
    // the output by it).
    let row = out.elem_count() / n.max(1);
    for (i, (g, b)) in grads.iter().zip(bufs).enumerate() {
        if g.elem_count() != row || b.elem_count() != row {
            fail!(
                Shape,
                "ema_momentum",
                "member {i}: gradient of {} and buffer of {} elements, output rows of {row}",
                g.elem_count(),
                b.elem_count()
            );
        }
    }
    Ok(())
}

/// `what` has `want` elements, or a Shape error naming item `i`. The fused
/// paths (CPU and kernels) size every slice of an item by its gradient or
/// direction, so a smaller state tensor would be read and written past its
/// end.
fn check_len(who: &str, i: usize, what: &str, t: &Tensor, want: usize) -> Result<()> {
    if t.elem_count() != want {
        fail!(
            Shape,
            who,
            "item {i}: {what} has {} elements, its parameter {want}",
            t.elem_count()
        );
    }
    Ok(())
}

/// The spectral decay's factors of item `i` span its parameter's matrix
/// view: `len(a)·len(b) = len(w)` (element `j` is decayed by
/// `a[j / len(b)]·b[j % len(b)]`).
fn check_decay(who: &str, i: usize, d: &DecayTerm<'_>, want: usize) -> Result<()> {
    if let Some(r) = d.rank1 {
        let (a, b) = (r.a.elem_count(), r.b.elem_count());
        if a * b != want {
            fail!(
                Shape,
                who,
                "item {i}: spectral decay factors of {a} and {b} elements for a parameter of {want}"
            );
        }
    }
    Ok(())
}

/// The gradient of item `i` in its parameter's dtype: the kernels read it
/// with the parameter's element type (a bf16 gradient of an f32 parameter
/// would be read past its end), the CPU path slices it so; the optimizers
/// convert gradients before they get here.
fn check_grad_dtype(who: &str, i: usize, g: &Tensor, w: &Var) -> Result<()> {
    if g.dtype() != w.dtype() {
        fail!(
            Shape,
            who,
            "item {i}: a {:?} gradient for a {:?} parameter (convert it first)",
            g.dtype(),
            w.dtype()
        );
    }
    Ok(())
}

/// Item `i` of `who`: the gradient in the parameter's dtype and every
/// tensor (gradient, `state`) and the decay the size of the parameter.
fn check_item(
    who: &str,
    i: usize,
    w: &Var,
    g: &Tensor,
    state: &[(&str, &Tensor)],
    decay: &DecayTerm<'_>,
) -> Result<()> {
    let n = w.elem_count();
    check_grad_dtype(who, i, g, w)?;
    check_len(who, i, "the gradient", g, n)?;
    for (what, t) in state {
        check_len(who, i, what, t, n)?;
    }
    check_decay(who, i, decay, n)
}

/// Every tensor of every item the size of its parameter, the gradient in
/// the parameter's dtype (shared by every implementation of
/// [`adamw_step`]).
pub(crate) fn check_adam_items(items: &[AdamItem<'_>]) -> Result<()> {
    items.iter().enumerate().try_for_each(|(i, it)| {
        let state = [
            ("exp_avg", it.m.as_tensor()),
            ("exp_avg_sq", it.v.as_tensor()),
        ];
        check_item("adamw_step", i, it.w, it.g, &state, &it.decay)
    })
}

/// As [`check_adam_items`], for [`sgd_step`].
pub(crate) fn check_sgd_items(items: &[SgdItem<'_>]) -> Result<()> {
    items.iter().enumerate().try_for_each(|(i, it)| {
        let state: Vec<(&str, &Tensor)> = it
            .buf
            .map(|b| ("the momentum buffer", b.as_tensor()))
            .into_iter()
            .collect();
        check_item("sgd_step", i, it.w, it.g, &state, &it.decay)
    })
}

/// One direction row, step factor and decay per parameter (shared by every
/// implementation of [`apply_step`]).
pub(crate) fn check_apply_counts(
    ws: &[&Var],
    d: &Tensor,
    alphas: &[f64],
    decays: &[DecayTerm<'_>],
) -> Result<()> {
    let n = ws.len();
    if d.dim(0)? != n || alphas.len() != n || decays.len() != n {
        fail!(
            Shape,
            "apply_step",
            "{n} parameters, {} directions, {} step factors, {} decays",
            d.dim(0)?,
            alphas.len(),
            decays.len()
        );
    }
    // Every direction row the size of its parameter (the CPU path splits
    // the direction by the parameters' sizes).
    let row = d.elem_count() / n.max(1);
    for (i, w) in ws.iter().enumerate() {
        if w.elem_count() != row {
            fail!(
                Shape,
                "apply_step",
                "parameter {i} has {} elements, its direction row {row}",
                w.elem_count()
            );
        }
        check_decay("apply_step", i, &decays[i], row)?;
    }
    Ok(())
}

/// Muon's momentum for the members of a batch, in place on `bufs`, writing
/// the directions into `out` (`(b, …)`, arithmetic dtype, member `i` at
/// `out[i]`); see [`cpu::ema_momentum`].
pub fn ema_momentum(
    grads: &[&Tensor],
    bufs: &[&Var],
    out: &Var,
    momentum: f64,
    nesterov: bool,
) -> Result<()> {
    check_ema_counts(grads, bufs, out)?;
    if grads.is_empty() {
        return Ok(());
    }
    #[cfg(feature = "cuda")]
    if !generic_only() && cuda::ema_momentum(grads, bufs, out, momentum, nesterov)? {
        return Ok(());
    }
    if all_cpu(grads)
        && out.device().is_cpu()
        && grads.iter().all(|g| g.dtype() == grads[0].dtype())
    {
        let mut outs: Vec<&Tensor> = bufs.iter().map(|b| b.as_tensor()).collect();
        outs.push(out.as_tensor());
        return with_cpu_data(grads, &outs, |ins, outs| {
            struct K<'x, 'a, 'b> {
                ins: &'x [Data<'a>],
                outs: &'x mut [DataMut<'b>],
                hp: (f64, bool),
            }
            impl GroupKernel for K<'_, '_, '_> {
                fn run<P: cpu::Elem + Typed>(&mut self) -> Result<()>
                where
                    P::A: Typed,
                {
                    let (o, bufs) = self.outs.split_last_mut().expect("out");
                    let mut o = slice_mut::<P::A>(o, "direction")?;
                    let mut jobs = Vec::with_capacity(bufs.len());
                    for (g, b) in self.ins.iter().zip(bufs.iter_mut()) {
                        let g = slice::<P>(g, "gradient")?;
                        let (mine, tail) = std::mem::take(&mut o).split_at_mut(g.len());
                        o = tail;
                        jobs.push(cpu::EmaJob {
                            g,
                            buf: slice_mut::<P::A>(b, "momentum")?,
                            out: mine,
                        });
                    }
                    let (mu, nesterov) = self.hp;
                    cpu::ema_momentum_multi(&mut jobs, mu, nesterov);
                    Ok(())
                }
            }
            on_dtype(
                grads[0].dtype(),
                &mut K {
                    ins,
                    outs,
                    hp: (momentum, nesterov),
                },
            )
        });
    }
    let mut outs: Vec<&Tensor> = bufs.iter().map(|b| b.as_tensor()).collect();
    outs.push(out.as_tensor());
    refuse_shared_storage(grads, &outs)?;
    let dt = out.dtype();
    let mut dirs = Vec::with_capacity(grads.len());
    for (g, buf) in grads.iter().zip(bufs) {
        let g = g.to_dtype(dt)?;
        let b = (buf.as_tensor() + ((&g - buf.as_tensor())? * (1.0 - momentum))?)?;
        let d = if nesterov {
            (&g + ((&b - &g)? * momentum)?)?
        } else {
            b.clone()
        };
        buf.set(&b)?;
        dirs.push(d.reshape(out.dims()[1..].to_vec())?);
    }
    out.set(&Tensor::stack(&dirs, 0)?)?;
    Ok(())
}

/// `w_i ← decayed(w_i) − alphas[i]·d[i]` for every member `i` of the batch
/// `d` (`(b, …)`, arithmetic dtype), in place.
pub fn apply_step(ws: &[&Var], d: &Tensor, alphas: &[f64], decays: &[DecayTerm<'_>]) -> Result<()> {
    check_apply_counts(ws, d, alphas, decays)?;
    let n = ws.len();
    #[cfg(feature = "cuda")]
    if !generic_only() && cuda::apply_step(ws, d, alphas, decays)? {
        return Ok(());
    }
    let d = d.contiguous()?;
    if n > 0 && cpu_group(ws, &[&d]) {
        let (mut ins, mut at) = (vec![&d], Vec::new());
        for dec in decays {
            at.push(ins.len());
            decay_inputs(dec, &mut ins);
        }
        let outs: Vec<&Tensor> = ws.iter().map(|w| w.as_tensor()).collect();
        return with_cpu_data(&ins, &outs, |ins, outs| {
            struct K<'x, 'a, 'b> {
                ins: &'x [Data<'a>],
                at: &'x [usize],
                outs: &'x mut [DataMut<'b>],
                alphas: &'x [f64],
                decays: &'x [DecayTerm<'x>],
            }
            impl GroupKernel for K<'_, '_, '_> {
                fn run<P: cpu::Elem + Typed>(&mut self) -> Result<()>
                where
                    P::A: Typed,
                {
                    let mut d = slice::<P::A>(&self.ins[0], "direction")?;
                    let mut jobs = Vec::with_capacity(self.outs.len());
                    for (k, w) in self.outs.iter_mut().enumerate() {
                        let w = slice_mut::<P>(w, "parameter")?;
                        let (mine, tail) = d.split_at(w.len());
                        d = tail;
                        jobs.push(cpu::ApplyJob {
                            w,
                            d: mine,
                            alpha: self.alphas[k],
                            decay: cpu_decay::<P::A>(&self.decays[k], self.ins, self.at[k])?,
                        });
                    }
                    cpu::apply_multi(&mut jobs);
                    Ok(())
                }
            }
            on_dtype(
                ws[0].dtype(),
                &mut K {
                    ins,
                    at: &at,
                    outs,
                    alphas,
                    decays,
                },
            )
        });
    }
    let mut ins = vec![&d];
    for dec in decays {
        decay_inputs(dec, &mut ins);
    }
    let outs: Vec<&Tensor> = ws.iter().map(|w| w.as_tensor()).collect();
    refuse_shared_storage(&ins, &outs)?;
    for (i, w) in ws.iter().enumerate() {
        let di = d.get(i)?;
        let dt = d.dtype();
        let wd = generic_decayed(&w.as_tensor().to_dtype(dt)?, &decays[i])?;
        let new = (wd - (di.reshape(w.shape())? * alphas[i])?)?;
        w.set(&new.to_dtype(w.dtype())?)?;
    }
    Ok(())
}

/// The index of the first tensor holding a NaN or ±Inf, if any. One pass
/// over memory on the CPU; one host sync for all tensors elsewhere.
pub fn first_nonfinite(ts: &[&Tensor]) -> Result<Option<usize>> {
    if ts.is_empty() {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    if !generic_only() {
        if let Some(r) = cuda::first_nonfinite(ts)? {
            return Ok(r);
        }
    }
    if all_cpu(ts) {
        for (i, t) in ts.iter().enumerate() {
            let t = t.contiguous()?;
            let finite = with_cpu_data(&[&t], &[], |ins, _| {
                Ok(match ins[0] {
                    Data::F32(s) => cpu::all_finite(s),
                    Data::F64(s) => cpu::all_finite(s),
                    Data::BF16(s) => cpu::all_finite(s),
                    Data::F16(s) => cpu::all_finite(s),
                })
            })?;
            if !finite {
                return Ok(Some(i));
            }
        }
        return Ok(None);
    }
    // g − g is 0 for finite g and NaN otherwise; the sum flags any.
    #[allow(clippy::eq_op)]
    let flags = ts
        .iter()
        .map(|t| (*t - *t)?.sum_all()?.to_dtype(DType::F32))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let flags = Tensor::stack(&flags, 0)?.to_vec1::<f32>()?;
    Ok(flags.iter().position(|f| !f.is_finite()))
}

/// Whether each parameter (bf16/f16) equals its f32 master weight (same
/// shape, contiguous) rounded to the parameter's dtype, as numbers: one pass
/// per pair on the CPU; candle's ops and one host read per device elsewhere.
pub fn masters_round_to(masters: &[&Tensor], params: &[&Tensor]) -> Result<Vec<bool>> {
    check_master_pairs("masters_round_to", masters, params)?;
    if masters.is_empty() {
        return Ok(Vec::new());
    }
    if all_cpu(masters) && all_cpu(params) {
        let ins: Vec<&Tensor> = masters.iter().chain(params).copied().collect();
        return with_cpu_data(&ins, &[], |d, _| {
            let (ms, ps) = d.split_at(masters.len());
            let ms = ms
                .iter()
                .map(|m| slice::<f32>(m, "masters_round_to: master"))
                .collect::<Result<Vec<_>>>()?;
            let ps = ps
                .iter()
                .map(|p| match p {
                    Data::BF16(p) => Ok(cpu::HalfRef::BF16(p)),
                    Data::F16(p) => Ok(cpu::HalfRef::F16(p)),
                    _ => fail!(Device, "masters_round_to", "a bf16/f16 parameter expected"),
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(cpu::all_round_to(&ms, &ps))
        });
    }
    let mut out = vec![false; params.len()];
    let mut by_device: std::collections::BTreeMap<String, Vec<(usize, Tensor)>> =
        Default::default();
    for (i, (m, p)) in masters.iter().zip(params).enumerate() {
        let differ = m
            .to_dtype(p.dtype())?
            .ne(*p)?
            .to_dtype(DType::F32)?
            .sum_all()?;
        let at = format!("{:?}", p.device().location());
        by_device.entry(at).or_default().push((i, differ));
    }
    for counts in by_device.into_values() {
        let ts: Vec<&Tensor> = counts.iter().map(|(_, n)| n).collect();
        let n: Vec<f32> = Tensor::stack(&ts, 0)?.to_vec1()?;
        for ((i, _), n) in counts.iter().zip(n) {
            out[*i] = n == 0.0;
        }
    }
    Ok(out)
}

/// Sets each parameter (bf16/f16) to its f32 master weight (same shape)
/// rounded to the parameter's dtype, in place: one multi-tensor pass on the
/// CPU, a conversion and a copy per parameter elsewhere.
pub fn round_masters_into(masters: &[&Tensor], params: &[&Var]) -> Result<()> {
    let outs: Vec<&Tensor> = params.iter().map(|p| p.as_tensor()).collect();
    check_master_pairs("round_masters_into", masters, &outs)?;
    if masters.is_empty() {
        return Ok(());
    }
    if all_cpu(masters) && all_cpu(&outs) {
        return with_cpu_data(masters, &outs, |ins, outs| {
            let ms = ins
                .iter()
                .map(|m| slice::<f32>(m, "round_masters_into: master"))
                .collect::<Result<Vec<_>>>()?;
            let mut ps = outs
                .iter_mut()
                .map(|p| match p {
                    DataMut::BF16(p) => Ok(cpu::HalfMut::BF16(p)),
                    DataMut::F16(p) => Ok(cpu::HalfMut::F16(p)),
                    _ => fail!(
                        Device,
                        "round_masters_into",
                        "a bf16/f16 parameter expected"
                    ),
                })
                .collect::<Result<Vec<_>>>()?;
            cpu::round_all_into(&ms, &mut ps);
            Ok(())
        });
    }
    for (m, p) in masters.iter().zip(params) {
        p.set(&m.to_dtype(p.dtype())?)?;
    }
    Ok(())
}

/// Errors unless there is one master per parameter, each f32 of its
/// parameter's shape and device, and each parameter bf16/f16.
fn check_master_pairs(who: &str, masters: &[&Tensor], params: &[&Tensor]) -> Result<()> {
    if masters.len() != params.len() {
        fail!(
            Shape,
            who,
            "{} masters for {} parameters",
            masters.len(),
            params.len()
        );
    }
    for (i, (m, p)) in masters.iter().zip(params).enumerate() {
        if m.dtype() != DType::F32 || !matches!(p.dtype(), DType::BF16 | DType::F16) {
            fail!(
                Shape,
                who,
                "pair {i}: an f32 master and a bf16/f16 parameter expected, got {:?} and {:?}",
                m.dtype(),
                p.dtype()
            );
        }
        if m.dims() != p.dims() || !m.device().same_device(p.device()) {
            fail!(
                Shape,
                who,
                "pair {i}: master {:?} on {:?}, parameter {:?} on {:?}",
                m.dims(),
                m.device(),
                p.dims(),
                p.device()
            );
        }
    }
    Ok(())
}

/// `t` in `dtype`. A bf16/f16 tensor widened to f32 on the CPU is
/// converted across the thread pool (exact, as candle's conversion; a
/// master weight's gradient at every step); anything else is candle's
/// `to_dtype`.
pub fn cast(t: &Tensor, dtype: DType) -> Result<Tensor> {
    let half = matches!(t.dtype(), DType::BF16 | DType::F16);
    if !(half && dtype == DType::F32 && all_cpu(&[t])) {
        return Ok(t.to_dtype(dtype)?);
    }
    let t = t.contiguous()?;
    let wide = with_cpu_data(&[&t], &[], |ins, _| {
        Ok(match &ins[0] {
            Data::BF16(s) => cpu::widen(s),
            Data::F16(s) => cpu::widen(s),
            _ => fail!(Device, "cast", "a bf16/f16 tensor expected"),
        })
    })?;
    Ok(Tensor::from_vec(wide, t.shape(), &Device::Cpu)?)
}

/// `Σ x²` of each tensor, in f64 on the host (one host sync for all).
/// Summed in f64 on the CPU and CUDA, so that entries whose squares leave
/// f32's range (beyond ~1.8e19, below ~1e-23) count; in f32 on Metal,
/// which has no f64.
pub fn sum_squares(ts: &[&Tensor]) -> Result<Vec<f64>> {
    if ts.is_empty() {
        return Ok(Vec::new());
    }
    #[cfg(feature = "cuda")]
    if !generic_only() {
        if let Some(r) = cuda::sum_squares(ts)? {
            return Ok(r);
        }
    }
    let sums = ts
        .iter()
        .map(|t| t.to_dtype(wide_dtype(t.device()))?.sqr()?.sum_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(host_f64(&Tensor::stack(&sums, 0)?)?)
}

/// `msign` of a matrix or batch: the CPU's fused Newton–Schulz when the
/// products run in the arithmetic dtype, the kernels' cuBLAS sequence on
/// CUDA (feature `cuda`), otherwise candle's generic ops.
pub fn msign(g: &Tensor, ns: &NewtonSchulz) -> Result<Tensor> {
    // (the paths read the table differently: a NaN eps zeroed the CPU's
    // output and filled the generic path's with NaN)
    ns.validate("msign: ns")?;
    crate::linalg::matrix_dims("msign: g", g)?;
    if g.elem_count() == 0 {
        // An empty matrix (a zero dimension) has nothing to orthogonalise.
        return Ok(g.zeros_like()?);
    }
    let acc = math_dtype(g.dtype());
    if !generic_only() && g.device().is_cpu() && ns.compute_dtype().is_none_or(|d| d == acc) {
        let x = g.to_dtype(acc)?;
        let out = match acc {
            DType::F64 => crate::linalg::msign_cpu::msign_cpu::<f64>(&x, ns)?,
            _ => crate::linalg::msign_cpu::msign_cpu::<f32>(&x, ns)?,
        };
        return Ok(out.to_dtype(g.dtype())?);
    }
    #[cfg(feature = "cuda")]
    if !generic_only() {
        if let Some(x) = cuda::msign(g, ns)? {
            return Ok(x);
        }
    }
    crate::linalg::msign_generic(g, ns)
}

/// Batched power iteration (see [`crate::linalg::power_iteration`]).
pub fn power_iteration(w: &Tensor, start: Option<&Tensor>, iters: usize) -> Result<TopSingular> {
    if w.rank() == 3 && w.dim(0)? == 0 {
        // No matrices, no triplets (each path below needs a first one).
        let (m, n) = crate::linalg::matrix_dims("power_iteration: w", w)?;
        crate::linalg::check_start(start, true, 0, n)?;
        let dt = crate::linalg::compute_dtype(w.dtype());
        let empty = |dims: &[usize]| Tensor::zeros(dims, dt, w.device());
        return Ok(TopSingular {
            sigma: empty(&[0])?,
            u: empty(&[0, m])?,
            v: empty(&[0, n])?,
        });
    }
    #[cfg(feature = "cuda")]
    if !generic_only() {
        if let Some(top) = cuda::power_iteration(w, start, iters)? {
            return Ok(top);
        }
    }
    if all_cpu(&[w]) && start.is_none_or(|s| s.device().is_cpu()) {
        return crate::linalg::power_iteration_cpu(w, start, iters);
    }
    crate::linalg::power_iteration_generic(w, start, iters)
}

/// [`power_iteration`] of the batch that the same-shape matrices `ws` would
/// stack into, each warm-started from its own state vector `vs[i]` (`(n,)`;
/// a zero or non-finite one is no start: the default is used), which then
/// receives the new v₁; results `(b,)`, `(b, m)`, `(b, n)`. What spectral
/// decay runs on a group's parameters: on the CPU and on CUDA each matrix
/// and vector is used where it is (no stacked copies; on CUDA one launch
/// stores every v₁); elsewhere they are stacked and the vectors set one by
/// one.
pub fn power_iteration_members(ws: &[Tensor], vs: &[Var], iters: usize) -> Result<TopSingular> {
    let Some(first) = ws.first() else {
        fail!(Shape, "power_iteration", "no matrices");
    };
    let (m, n) = crate::linalg::matrix_dims("power_iteration: w", first)?;
    crate::linalg::check_members(ws, m, n)?;
    crate::linalg::check_state_vectors(vs, ws.len(), n)?;
    #[cfg(feature = "cuda")]
    if !generic_only() {
        if let Some(top) = cuda::power_iteration_members(ws, vs, iters)? {
            return Ok(top);
        }
    }
    let mut refs: Vec<&Tensor> = ws.iter().collect();
    refs.extend(vs.iter().map(|v| v.as_tensor()));
    if all_cpu(&refs) {
        return crate::linalg::power_iteration_cpu_members(ws, vs, iters);
    }
    let starts: Vec<&Tensor> = vs.iter().map(|v| v.as_tensor()).collect();
    let top = power_iteration(
        &Tensor::stack(ws, 0)?,
        Some(&Tensor::stack(&starts, 0)?),
        iters,
    )?;
    for (i, v) in vs.iter().enumerate() {
        v.set(&top.v.get(i)?.to_dtype(v.dtype())?)?;
    }
    Ok(top)
}

/// Whether all tensors are on `device`.
pub fn same_device(ts: &[&Tensor], device: &Device) -> bool {
    ts.iter().all(|t| t.device().same_device(device))
}
