//! Reading values back to the host in f64, on every backend.
//!
//! Metal has no f64: candle 0.11's Metal backend refuses every cast to f64
//! ("Metal contiguous to_dtype F32 F64 not implemented"). Everything that
//! reads a device tensor as f64, or sums in f64 on the device, goes through
//! these, which keep f64 on the CPU and CUDA and use f32 on Metal.

use candle_core::{DType, Device, Tensor};

/// The dtype for reductions that want f64: f64, or f32 on Metal.
pub(crate) fn wide_dtype(device: &Device) -> DType {
    if device.is_metal() {
        DType::F32
    } else {
        DType::F64
    }
}

/// A float tensor's values, flattened, as f64 on the host (one transfer). On
/// the CPU and CUDA the cast runs where the tensor is; a Metal tensor comes
/// to the host in its own dtype and widens there.
pub(crate) fn host_f64(t: &Tensor) -> candle_core::Result<Vec<f64>> {
    let t = t.flatten_all()?;
    let t = if t.device().is_metal() {
        t.to_device(&Device::Cpu)?
    } else {
        t
    };
    t.to_dtype(DType::F64)?.to_vec1::<f64>()
}

/// A one-element float tensor's value as f64 on the host ([`host_f64`]).
pub(crate) fn host_f64_scalar(t: &Tensor) -> candle_core::Result<f64> {
    match host_f64(t)?.as_slice() {
        [x] => Ok(*x),
        v => candle_core::bail!(
            "expected one value, got {} of shape {:?}",
            v.len(),
            t.dims()
        ),
    }
}

/// f64 values as a tensor of `dtype` on `device`, rounded to `dtype` where
/// they are going; on Metal, which can neither hold f64 nor cast from it,
/// rounded on the host and then transferred.
pub(crate) fn upload_f64<S: Into<candle_core::Shape>>(
    vals: Vec<f64>,
    shape: S,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<Tensor> {
    if device.is_metal() {
        Tensor::from_vec(vals, shape, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(device)
    } else {
        Tensor::from_vec(vals, shape, device)?.to_dtype(dtype)
    }
}
