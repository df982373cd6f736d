//! `y[b, n, k] = x[b, n, k] · s[b, k]`: a per-batch column scale (a broadcast over the middle
//! axis), the gating of global column attention (AF2 supplement Algorithm 19: the one attended
//! value per column `o[b, h, c]` scales the gate of every sequence, and the same product in the
//! backward). candle runs this broadcast through its strided binary kernel (~0.3 TB/s at
//! `[256, 1024, 64]` bf16); the fused kernel is one 16-byte access per operand per thread.
//!
//! Twin: `x.broadcast_mul(s.unsqueeze(1))` (contiguous). Both compute one fp32 product rounded
//! once, so the results are bitwise equal.

use candle_core::Tensor;

use crate::error::Result;

/// NVRTC module name.
pub const MODULE: &str = "ferrofold_batch_col_scale";

/// CUDA C source: `bcs_{f32,bf16}_v{1,4|8}`.
#[cfg(feature = "cuda")]
pub const SOURCE: &str = concat!(
    elem_prelude!(),
    r#"
template <typename T, int V>
__device__ __forceinline__ void bcs(const T* x, const T* s, T* y, size_t groups, size_t nk, size_t k) {
    size_t g = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (g >= groups) return;
    size_t i = g * V;
    size_t b = i / nk, col = i % k;
    Pack<T, V> xv = reinterpret_cast<const Pack<T, V>*>(x)[g];
    Pack<T, V> out;
#pragma unroll
    for (int j = 0; j < V; j++) st(out.v, j, ld(xv.v, j) * ld(s, b * k + col + j));
    reinterpret_cast<Pack<T, V>*>(y)[g] = out;
}
#define BCS(SUF, T, V) \
extern "C" __global__ void bcs_##SUF(const T* x, const T* s, T* y, size_t groups, size_t nk, size_t k) { \
    bcs<T, V>(x, s, y, groups, nk, k); }
BCS(f32_v1, float, 1)
BCS(f32_v4, float, 4)
BCS(bf16_v1, __nv_bfloat16, 1)
BCS(bf16_v8, __nv_bfloat16, 8)
"#
);

/// Plain-candle twin: `x [B, N, K] · s [B, K]` broadcast over `N`, contiguous.
pub fn batch_col_scale_twin(x: &Tensor, s: &Tensor) -> Result<Tensor> {
    Ok(x.broadcast_mul(&s.unsqueeze(1)?)?.contiguous()?)
}

/// `x [B, N, K] · s [B, K]` (broadcast over `N`), no graph: the fused kernel on CUDA (f32/bf16,
/// same dtype, fused kernels on), the twin otherwise.
pub fn batch_col_scale(x: &Tensor, s: &Tensor) -> Result<Tensor> {
    let (x, s) = (x.detach(), s.detach());
    let ok = super::fused_for(&x)
        && x.rank() == 3
        && s.dims2().ok() == Some((x.dims()[0], x.dims()[2]))
        && x.dtype() == s.dtype()
        && x.elem_count() > 0
        && x.device().same_device(s.device());
    if ok {
        #[cfg(feature = "cuda")]
        {
            let (x, s) = (x.contiguous()?, s.contiguous()?);
            return match x.dtype() {
                candle_core::DType::F32 => cuda::run::<f32>(&x, &s),
                candle_core::DType::BF16 => cuda::run::<half::bf16>(&x, &s),
                _ => batch_col_scale_twin(&x, &s),
            };
        }
    }
    batch_col_scale_twin(&x, &s)
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{DType, Tensor};
    use cudarc::driver::{DeviceRepr, PushKernelArg};

    use super::super::launch::{cuda_storage, func, range, suffix, tensor_from_slice, BLOCK};
    use super::super::nvrtc;
    use super::{MODULE, SOURCE};
    use crate::error::Result;

    pub(super) fn run<T: CudaDType + DeviceRepr>(x: &Tensor, s: &Tensor) -> Result<Tensor> {
        let (_, n, k) = x.dims3()?;
        let total = x.elem_count();
        let (sx, lx) = x.storage_and_layout();
        let (ss, ls) = s.storage_and_layout();
        let (sx, ss) = (cuda_storage(&sx)?, cuda_storage(&ss)?);
        let dev = sx.device();
        let (rx, rs) = (range(lx)?, range(ls)?);
        let wide = if x.dtype() == DType::BF16 { 8 } else { 4 };
        let v = if k.is_multiple_of(wide) && rx.start.is_multiple_of(wide) {
            wide
        } else {
            1
        };
        let f = func(
            dev,
            MODULE,
            SOURCE,
            &format!("bcs_{}_v{v}", suffix(x.dtype())?),
        )?;
        let xv = sx.as_cuda_slice::<T>()?.slice(rx);
        let sv = ss.as_cuda_slice::<T>()?.slice(rs);
        // SAFETY: every element is written by the kernel.
        let mut y = unsafe { dev.alloc::<T>(total)? };
        let groups = total / v;
        let nk = n * k;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&xv)
            .arg(&sv)
            .arg(&mut y)
            .arg(&groups)
            .arg(&nk)
            .arg(&k);
        // SAFETY: argument types match the kernel; `x` holds `total = groups·v` elements
        // (`v`-aligned start, `v | k` so a group never crosses a row), `s` `B·K`.
        unsafe { b.launch(nvrtc::grid_1d(groups, BLOCK)) }.w()?;
        Ok(tensor_from_slice(y, dev, x.shape()))
    }
}
