//! Launch helpers shared by the element-wise kernels (`gate`, `dropout_residual`, `adam`).

use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{DType, Layout, Shape, Storage, Tensor};
use cudarc::driver::CudaSlice;

/// Threads per block of every element-wise kernel.
pub(crate) const BLOCK: u32 = 256;

/// Our error as a candle error (inside `CustomOp` implementations).
pub(crate) fn cerr(e: crate::error::Error) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// Kernel-name suffix of a dtype (`f32` / `bf16`); other dtypes have no kernel.
pub(crate) fn suffix(dt: DType) -> candle_core::Result<&'static str> {
    match dt {
        DType::F32 => Ok("f32"),
        DType::BF16 => Ok("bf16"),
        other => candle_core::bail!("fused element-wise kernels support f32/bf16, not {other:?}"),
    }
}

/// Element range of a contiguous layout inside its storage.
pub(crate) fn range(l: &Layout) -> candle_core::Result<std::ops::Range<usize>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(a..b),
        None => candle_core::bail!("fused element-wise kernel: input must be contiguous"),
    }
}

/// The CUDA storage of a storage guard.
pub(crate) fn cuda_storage(s: &Storage) -> candle_core::Result<&CudaStorage> {
    match s {
        Storage::Cuda(c) => Ok(c),
        _ => candle_core::bail!("fused element-wise kernel: tensor is not on a CUDA device"),
    }
}

/// A tensor (no gradient history) owning `slice`, contiguous with `shape`.
pub(crate) fn tensor_from_slice<T: CudaDType>(
    slice: CudaSlice<T>,
    dev: &CudaDevice,
    shape: &Shape,
) -> Tensor {
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, dev.clone()));
    Tensor::from_storage(storage, shape.clone(), BackpropOp::none(), false)
}
