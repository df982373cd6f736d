//! Shared launch helpers of the fused LayerNorm / softmax kernels (CUDA builds only): a
//! per-device cache of loaded kernel functions (a launch after the first costs one map lookup,
//! no PTX copy) and the choice of the per-lane register width of the warp-per-row kernels.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use candle_core::cuda_backend::{CudaDevice, DeviceId};
use cudarc::driver::CudaFunction;

/// `candle_core::Error` from any message (kernel errors inside a `CustomOp`).
pub(crate) fn cerr(e: impl std::fmt::Display) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

type FuncCache = HashMap<DeviceId, HashMap<String, CudaFunction>>;

/// Kernel `name` of NVRTC module `module` (source `src`) on `dev`, compiled/loaded on first use.
pub(crate) fn func(
    dev: &CudaDevice,
    module: &str,
    src: &str,
    name: &str,
) -> candle_core::Result<CudaFunction> {
    static CACHE: OnceLock<Mutex<FuncCache>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(f) = cache
        .lock()
        .map_err(|_| cerr("kernel cache poisoned"))?
        .get(&dev.id())
        .and_then(|m| m.get(name))
    {
        return Ok(f.clone());
    }
    let f = super::nvrtc::func(dev, module, src, name).map_err(cerr)?;
    cache
        .lock()
        .map_err(|_| cerr("kernel cache poisoned"))?
        .entry(dev.id())
        .or_default()
        .insert(name.to_string(), f.clone());
    Ok(f)
}

/// Values per lane of a warp-per-row kernel for rows of `c` elements: the smallest of
/// 1, 2, 4, 8, 16, 32 with `32 · v ≥ c`; `None` above 1024 (the looping kernels take those).
pub(crate) fn values_per_lane(c: usize) -> Option<usize> {
    [1usize, 2, 4, 8, 16, 32].into_iter().find(|v| 32 * v >= c)
}

/// Kernel-name suffix of a dtype (`f32`, `bf16`), `None` for dtypes without fused kernels.
pub(crate) fn dtype_suffix(dt: candle_core::DType) -> Option<&'static str> {
    match dt {
        candle_core::DType::F32 => Some("f32"),
        candle_core::DType::BF16 => Some("bf16"),
        _ => None,
    }
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
