//! Launch helpers shared by every fused kernel (CUDA builds only): kernel lookup, dtype names,
//! storage access, output wrapping, and the launch shapes of the warp-per-row (LayerNorm /
//! softmax) and element-wise (gate, dropout + residual, Adam) kernels.

use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{DType, Layout, Shape, Storage, Tensor};
use cudarc::driver::{CudaFunction, CudaSlice};

/// Threads per block of every element-wise kernel.
pub(crate) const BLOCK: u32 = 256;

/// `candle_core::Error` from any message (kernel errors inside a `CustomOp`).
pub(crate) fn cerr(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// Kernel `name` of NVRTC module `module` (source `src`) on `dev` ([`super::nvrtc::func`], as a
/// candle error).
pub(crate) fn func(
    dev: &CudaDevice,
    module: &str,
    src: &str,
    name: &str,
) -> candle_core::Result<CudaFunction> {
    super::nvrtc::func(dev, module, src, name).map_err(cerr)
}

/// Values per lane of a warp-per-row kernel for rows of `c` elements: the smallest of
/// 1, 2, 4, 8, 16, 32 with `32 · v ≥ c`; `None` above 1024 (the looping kernels take those).
pub(crate) fn values_per_lane(c: usize) -> Option<usize> {
    [1usize, 2, 4, 8, 16, 32].into_iter().find(|v| 32 * v >= c)
}

/// Kernel-name suffix of a dtype (`f32`, `bf16`), `None` for dtypes without fused kernels.
pub(crate) fn dtype_suffix(dt: DType) -> Option<&'static str> {
    match dt {
        DType::F32 => Some("f32"),
        DType::BF16 => Some("bf16"),
        _ => None,
    }
}

/// [`dtype_suffix`] or an error naming the dtype.
pub(crate) fn suffix(dt: DType) -> candle_core::Result<&'static str> {
    dtype_suffix(dt).ok_or_else(|| cerr(format!("fused kernels support f32/bf16, not {dt:?}")))
}

/// Element range of a contiguous layout inside its storage.
pub(crate) fn range(l: &Layout) -> candle_core::Result<std::ops::Range<usize>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(a..b),
        None => candle_core::bail!("fused kernel: input must be contiguous"),
    }
}

/// The CUDA storage of a storage guard.
pub(crate) fn cuda_storage(s: &Storage) -> candle_core::Result<&CudaStorage> {
    match s {
        Storage::Cuda(c) => Ok(c),
        _ => candle_core::bail!("fused kernel: tensor is not on a CUDA device"),
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

/// 1-D launch of `rows` warps (one row each) in blocks of `warps_per_block` warps.
pub(crate) fn warp_rows(rows: usize, warps_per_block: u32) -> cudarc::driver::LaunchConfig {
    let blocks = rows.div_ceil(warps_per_block as usize).max(1) as u32;
    cudarc::driver::LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (32 * warps_per_block, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// CUDA C helpers shared by the modules (prepended to each module's source).
#[macro_export]
#[doc(hidden)]
macro_rules! ff_cuda_prelude {
    () => {
        r#"
#include <cuda_bf16.h>
typedef __nv_bfloat16 bf16;
#define FF_INF __int_as_float(0x7f800000)
__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(bf16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ bf16 from_f<bf16>(float v) { return __float2bfloat16(v); }
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
"#
    };
}
