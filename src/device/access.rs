//! Raw, typed access to the memory of CPU tensors, for the in-place kernels.
//!
//! candle exposes shared access through `Tensor::storage_and_layout` and
//! exclusive access through `Tensor::inplace_op1`; [`with_cpu_data`] nests
//! one `inplace_op1` per output so that every output is locked for writing
//! (and every input for reading) while the kernel runs. Outputs must not share
//! storage with each other or with an input: that is checked first, since
//! candle's storage lock is not re-entrant and would deadlock.

use std::cell::RefCell;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, DType, InplaceOp1, Layout, Storage, Tensor};
use half::{bf16, f16};

use crate::error::{fail, Error, Result};

/// The element data of a contiguous CPU tensor, read-only.
#[derive(Clone, Copy, Debug)]
pub enum Data<'a> {
    /// `f32` elements.
    F32(&'a [f32]),
    /// `f64` elements.
    F64(&'a [f64]),
    /// `bf16` elements.
    BF16(&'a [bf16]),
    /// `f16` elements.
    F16(&'a [f16]),
}

/// The element data of a contiguous CPU tensor, writable in place.
#[derive(Debug)]
pub enum DataMut<'a> {
    /// `f32` elements.
    F32(&'a mut [f32]),
    /// `f64` elements.
    F64(&'a mut [f64]),
    /// `bf16` elements.
    BF16(&'a mut [bf16]),
    /// `f16` elements.
    F16(&'a mut [f16]),
}

impl Data<'_> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Self::F32(s) => s.len(),
            Self::F64(s) => s.len(),
            Self::BF16(s) => s.len(),
            Self::F16(s) => s.len(),
        }
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl DataMut<'_> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            Self::F32(s) => s.len(),
            Self::F64(s) => s.len(),
            Self::BF16(s) => s.len(),
            Self::F16(s) => s.len(),
        }
    }

    /// Whether there are no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Element types that [`Data`] / [`DataMut`] hold.
pub trait Typed: Sized + 'static {
    /// The slice, if `d` holds this type.
    fn in_data<'a>(d: &Data<'a>) -> Option<&'a [Self]>;
    /// The mutable slice, if `d` holds this type.
    fn in_data_mut<'b>(d: &'b mut DataMut<'_>) -> Option<&'b mut [Self]>;
}

macro_rules! typed {
    ($t:ty, $v:ident) => {
        impl Typed for $t {
            fn in_data<'a>(d: &Data<'a>) -> Option<&'a [Self]> {
                match d {
                    Data::$v(s) => Some(s),
                    _ => None,
                }
            }
            fn in_data_mut<'b>(d: &'b mut DataMut<'_>) -> Option<&'b mut [Self]> {
                match d {
                    DataMut::$v(s) => Some(s),
                    _ => None,
                }
            }
        }
    };
}
typed!(f32, F32);
typed!(f64, F64);
typed!(bf16, BF16);
typed!(f16, F16);

/// The slice of type `T` in `d`, or an error naming `who`.
pub fn slice<'a, T: Typed>(d: &Data<'a>, who: &str) -> Result<&'a [T]> {
    match T::in_data(d) {
        Some(s) => Ok(s),
        None => fail!(Device, who, "unexpected dtype"),
    }
}

/// The mutable slice of type `T` in `d`, or an error naming `who`.
pub fn slice_mut<'b, T: Typed>(d: &'b mut DataMut<'_>, who: &str) -> Result<&'b mut [T]> {
    match T::in_data_mut(d) {
        Some(s) => Ok(s),
        None => fail!(Device, who, "unexpected dtype"),
    }
}

fn cpu_range<'a>(s: &'a CpuStorage, l: &Layout, who: &str) -> Result<Data<'a>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        fail!(Device, who, "in-place kernels need a contiguous tensor");
    };
    Ok(match s {
        CpuStorage::F32(v) => Data::F32(&v[a..b]),
        CpuStorage::F64(v) => Data::F64(&v[a..b]),
        CpuStorage::BF16(v) => Data::BF16(&v[a..b]),
        CpuStorage::F16(v) => Data::F16(&v[a..b]),
        _ => fail!(Device, who, "expected a float tensor, got {:?}", s.dtype()),
    })
}

fn cpu_range_mut<'a>(s: &'a mut CpuStorage, l: &Layout, who: &str) -> Result<DataMut<'a>> {
    let Some((a, b)) = l.contiguous_offsets() else {
        fail!(Device, who, "in-place kernels need a contiguous tensor");
    };
    let dtype = s.dtype();
    Ok(match s {
        CpuStorage::F32(v) => DataMut::F32(&mut v[a..b]),
        CpuStorage::F64(v) => DataMut::F64(&mut v[a..b]),
        CpuStorage::BF16(v) => DataMut::BF16(&mut v[a..b]),
        CpuStorage::F16(v) => DataMut::F16(&mut v[a..b]),
        _ => fail!(Device, who, "expected a float tensor, got {dtype:?}"),
    })
}

/// The address of a tensor's storage object (any device): equal for views
/// of one storage, empty ones included.
pub(crate) fn storage_id(t: &Tensor) -> usize {
    let (s, _) = t.storage_and_layout();
    &*s as *const Storage as usize
}

/// The address range of a CPU tensor's whole storage and its
/// [`storage_id`], to detect sharing: two tensors share when they are views
/// of one storage (also when it is empty) or when their ranges overlap.
fn storage_span(t: &Tensor) -> Result<(usize, usize, usize)> {
    let id = storage_id(t);
    let (s, _) = t.storage_and_layout();
    let Storage::Cpu(c) = &*s else {
        fail!(Device, "cpu kernel", "tensor is not on the CPU");
    };
    let (p, bytes) = match c {
        CpuStorage::F32(v) => (v.as_ptr() as usize, v.len() * 4),
        CpuStorage::F64(v) => (v.as_ptr() as usize, v.len() * 8),
        CpuStorage::BF16(v) => (v.as_ptr() as usize, v.len() * 2),
        CpuStorage::F16(v) => (v.as_ptr() as usize, v.len() * 2),
        other => fail!(
            Device,
            "cpu kernel",
            "expected a float tensor, got {:?}",
            other.dtype()
        ),
    };
    // An empty storage's range is empty and overlaps no range (empty vectors
    // share one dangling pointer); the storage address still tells views of
    // one empty storage apart from other empty storages.
    Ok((p, p + bytes, id))
}

/// A pointer, its length and dtype, kept while its write lock is held.
struct Raw {
    ptr: *mut u8,
    len: usize,
    dtype: DType,
}

impl Raw {
    /// # Safety
    /// The storage behind `ptr` must stay locked for writing, and no other
    /// `DataMut` of it may exist, for `'a`.
    unsafe fn data_mut<'a>(&self) -> DataMut<'a> {
        match self.dtype {
            DType::F32 => DataMut::F32(std::slice::from_raw_parts_mut(self.ptr.cast(), self.len)),
            DType::F64 => DataMut::F64(std::slice::from_raw_parts_mut(self.ptr.cast(), self.len)),
            DType::BF16 => DataMut::BF16(std::slice::from_raw_parts_mut(self.ptr.cast(), self.len)),
            _ => DataMut::F16(std::slice::from_raw_parts_mut(self.ptr.cast(), self.len)),
        }
    }
}

type Body<'f> = dyn FnMut(&mut [DataMut<'_>]) -> Result<()> + 'f;

/// One level of the nest: locks `outs[0]`, records its pointer, recurses.
struct Nest<'a, 'f> {
    outs: &'a [&'a Tensor],
    raws: &'a RefCell<Vec<Raw>>,
    body: &'a RefCell<&'f mut Body<'f>>,
    result: &'a RefCell<Option<Error>>,
}

impl InplaceOp1 for Nest<'_, '_> {
    fn name(&self) -> &'static str {
        "steepest-inplace"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> candle_core::Result<()> {
        let raw = match cpu_range_mut(s, l, "in-place kernel") {
            Ok(d) => match d {
                DataMut::F32(v) => Raw {
                    ptr: v.as_mut_ptr().cast(),
                    len: v.len(),
                    dtype: DType::F32,
                },
                DataMut::F64(v) => Raw {
                    ptr: v.as_mut_ptr().cast(),
                    len: v.len(),
                    dtype: DType::F64,
                },
                DataMut::BF16(v) => Raw {
                    ptr: v.as_mut_ptr().cast(),
                    len: v.len(),
                    dtype: DType::BF16,
                },
                DataMut::F16(v) => Raw {
                    ptr: v.as_mut_ptr().cast(),
                    len: v.len(),
                    dtype: DType::F16,
                },
            },
            Err(e) => {
                *self.result.borrow_mut() = Some(e);
                return Ok(());
            }
        };
        self.raws.borrow_mut().push(raw);
        if let Some((next, rest)) = self.outs.split_first() {
            let inner = Nest {
                outs: rest,
                raws: self.raws,
                body: self.body,
                result: self.result,
            };
            return next.inplace_op1(&inner);
        }
        // Innermost: every output is locked for writing.
        let raws = self.raws.borrow();
        // SAFETY: each pointer comes from a distinct storage (checked by the
        // caller) whose write guard is held by an enclosing `inplace_op1`
        // frame for the whole call of `body`.
        let mut data: Vec<DataMut<'_>> = raws.iter().map(|r| unsafe { r.data_mut() }).collect();
        if let Err(e) = (self.body.borrow_mut())(&mut data) {
            *self.result.borrow_mut() = Some(e);
        }
        Ok(())
    }
}

/// Runs `body` with the data of `ins` (read) and `outs` (written in place),
/// CPU float tensors, the outputs contiguous. Errors if an output shares
/// storage with another output or an input.
///
/// A non-contiguous input is read from a contiguous copy, as the kernels'
/// launch code reads it (so a copied input shares no storage with an
/// output).
pub fn with_cpu_data<R>(
    ins: &[&Tensor],
    outs: &[&Tensor],
    body: impl FnOnce(&[Data<'_>], &mut [DataMut<'_>]) -> Result<R>,
) -> Result<R> {
    let copies = ins
        .iter()
        .map(|t| t.contiguous())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let ins: Vec<&Tensor> = copies.iter().collect();
    let ins = &ins[..];
    let out_spans = outs
        .iter()
        .map(|t| storage_span(t))
        .collect::<Result<Vec<_>>>()?;
    let in_spans = ins
        .iter()
        .map(|t| storage_span(t))
        .collect::<Result<Vec<_>>>()?;
    for (i, a) in out_spans.iter().enumerate() {
        let overlaps = |b: &(usize, usize, usize)| a.2 == b.2 || (a.0 < b.1 && b.0 < a.1);
        if out_spans[..i].iter().any(overlaps) || in_spans.iter().any(overlaps) {
            fail!(
                Device,
                "in-place kernel",
                "an output tensor shares its storage with another operand"
            );
        }
    }
    let guards: Vec<_> = ins.iter().map(|t| t.storage_and_layout()).collect();
    let data = guards
        .iter()
        .map(|(s, l)| match &**s {
            Storage::Cpu(c) => cpu_range(c, l, "in-place kernel input"),
            _ => fail!(Device, "in-place kernel", "input tensor is not on the CPU"),
        })
        .collect::<Result<Vec<_>>>()?;
    let mut body = Some(body);
    let mut out: Option<R> = None;
    {
        let mut call = |d: &mut [DataMut<'_>]| -> Result<()> {
            let f = body.take().expect("the kernel body runs once");
            out = Some(f(&data, d)?);
            Ok(())
        };
        let raws = RefCell::new(Vec::with_capacity(outs.len()));
        let callref: &mut Body<'_> = &mut call;
        let cell = RefCell::new(callref);
        let result = RefCell::new(None);
        match outs.split_first() {
            None => (cell.borrow_mut())(&mut [])?,
            Some((first, rest)) => {
                let nest = Nest {
                    outs: rest,
                    raws: &raws,
                    body: &cell,
                    result: &result,
                };
                first.inplace_op1(&nest)?;
                if let Some(e) = result.into_inner() {
                    return Err(e);
                }
            }
        }
    }
    out.ok_or_else(|| Error::device("in-place kernel", "the kernel body did not run"))
}
