//! `aᵀ b` of two 16-bit row-major matrices written straight in f32: the weight (and bias)
//! gradients of the hand-written trunk backward (`dW = dyᵀ x`, `db = 1ᵀ dy`).
//!
//! candle's matmul writes its output in the input dtype, so a bf16 trunk got `dW` rounded to bf16
//! and then cast to the f32 master gradient: one extra cast launch per weight and per bias, and 8
//! bits of the f32 accumulator thrown away before the optimiser sees them. Here cuBLAS's
//! `cublasGemmEx` (A/B in bf16/f16, C in f32, f32 compute: the same accumulation as candle's
//! 16-bit GEMM) writes the f32 result directly, on candle's stream and cuBLAS handle (so it is
//! captured into CUDA graphs like any candle matmul).
//!
//! [`matmul_tn_f32`] takes that path for CUDA operands of one 16-bit dtype (made contiguous) with
//! the fused kernels on; everything else (CPU, f32/f64 operands) is the twin
//! [`matmul_tn_f32_twin`]: candle's `aᵀ b` cast to f32.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
#[cfg(feature = "cuda")]
use crate::kernels::permute::Contig;

/// Plain-candle twin of [`matmul_tn_f32`].
pub fn matmul_tn_f32_twin(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(a.t()?.matmul(b)?.to_dtype(DType::F32)?)
}

/// `aᵀ b` in f32 for `a` `[n, p]` and `b` `[n, q]` (same dtype) → `[p, q]`, no graph.
pub fn matmul_tn_f32(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (n, p) = a.dims2()?;
    let (nb, q) = b.dims2()?;
    if n != nb || a.dtype() != b.dtype() {
        return Err(Error::Model(format!(
            "matmul_tn_f32: operands {:?} {:?} and {:?} {:?}",
            a.dims(),
            a.dtype(),
            b.dims(),
            b.dtype()
        )));
    }
    let fast = cfg!(feature = "cuda")
        && a.device().is_cuda()
        && matches!(a.dtype(), DType::BF16 | DType::F16)
        && super::fused_enabled()
        && n > 0
        // cuBLAS takes `int` sizes.
        && [n, p, q].iter().all(|&d| d <= i32::MAX as usize);
    if fast {
        #[cfg(feature = "cuda")]
        {
            let (a, b) = (a.detach().contig()?, b.detach().contig()?);
            return Ok(a.apply_op2_no_bwd(&b, &cuda::GemmTnF32)?);
        }
    }
    matmul_tn_f32_twin(&a.detach(), &b.detach())
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::cudarc::cublas::{result as blas, sys};
    use candle_core::cuda_backend::cudarc::driver::{DevicePtr, DevicePtrMut};
    use candle_core::cuda_backend::CudaDType;
    use candle_core::{CpuStorage, CudaStorage, CustomOp2, DType, Layout, Shape};
    use half::{bf16, f16};
    use std::ffi::c_void;

    /// `(a [n, p], b [n, q]) → aᵀ b [p, q]` in f32 (see the module docs). Used only on detached
    /// operands (`apply_op2_no_bwd`): the hand-written backward is its caller.
    pub(super) struct GemmTnF32;

    fn err(m: &str) -> candle_core::Error {
        candle_core::Error::Msg(format!("gemm_tn_f32: {m}"))
    }

    fn gemm<T: CudaDType>(
        (sa, la): (&CudaStorage, &Layout),
        (sb, lb): (&CudaStorage, &Layout),
        ty: sys::cudaDataType,
    ) -> candle_core::Result<CudaStorage> {
        let (n, p) = la.shape().dims2()?;
        let (_, q) = lb.shape().dims2()?;
        let ra = la
            .contiguous_offsets()
            .ok_or_else(|| err("a not contiguous"))?;
        let rb = lb
            .contiguous_offsets()
            .ok_or_else(|| err("b not contiguous"))?;
        let dev = sa.device().clone();
        let stream = dev.cuda_stream();
        let blas_h = dev.cublas_handle();
        let av = sa.as_cuda_slice::<T>()?.slice(ra.0..ra.1);
        let bv = sb.as_cuda_slice::<T>()?.slice(rb.0..rb.1);
        // SAFETY: every element is written by the GEMM (beta = 0).
        let mut out = unsafe { dev.alloc::<f32>(p * q)? };
        {
            let (pa, _ga) = av.device_ptr(&stream);
            let (pb, _gb) = bv.device_ptr(&stream);
            let (pc, _gc) = out.device_ptr_mut(&stream);
            let (alpha, beta) = (1f32, 0f32);
            // Column-major: row-major C [p, q] is C_cm [q, p] (ldc q) = B_cm [q, n] (ldb q) ·
            // A_cmᵀ, A_cm = row-major a seen as [p, n] (lda p).
            // SAFETY: live device buffers of the sizes the (contiguous) layouts give; alpha/beta
            // host f32 (cuBLAS's default pointer mode); the handle is bound to candle's stream.
            unsafe {
                blas::gemm_ex(
                    *blas_h.handle(),
                    sys::cublasOperation_t::CUBLAS_OP_N,
                    sys::cublasOperation_t::CUBLAS_OP_T,
                    q as i32,
                    p as i32,
                    n as i32,
                    (&alpha as *const f32).cast::<c_void>(),
                    pb as *const c_void,
                    ty,
                    q as i32,
                    pa as *const c_void,
                    ty,
                    p as i32,
                    (&beta as *const f32).cast::<c_void>(),
                    pc as *mut c_void,
                    sys::cudaDataType::CUDA_R_32F,
                    q as i32,
                    sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .map_err(|e| err(&format!("{e:?}")))?;
        }
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }

    impl CustomOp2 for GemmTnF32 {
        fn name(&self) -> &'static str {
            "ff-gemm-tn-f32"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<(CpuStorage, Shape)> {
            Err(err("CUDA only"))
        }

        fn cuda_fwd(
            &self,
            sa: &CudaStorage,
            la: &Layout,
            sb: &CudaStorage,
            lb: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let (_, p) = la.shape().dims2()?;
            let (_, q) = lb.shape().dims2()?;
            let out = match sa.dtype() {
                DType::BF16 => gemm::<bf16>((sa, la), (sb, lb), sys::cudaDataType::CUDA_R_16BF)?,
                DType::F16 => gemm::<f16>((sa, la), (sb, lb), sys::cudaDataType::CUDA_R_16F)?,
                dt => return Err(err(&format!("dtype {dt:?}"))),
            };
            Ok((out, Shape::from((p, q))))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn cpu_is_the_twin_and_shapes_are_checked() {
        let dev = Device::Cpu;
        let a = Tensor::new(&[[1f32, 2.0], [3.0, 4.0], [5.0, 6.0]], &dev).unwrap();
        let b = Tensor::new(&[[1f32], [0.5], [2.0]], &dev).unwrap();
        // aᵀ b = [1 + 1.5 + 10, 2 + 2 + 12].
        let y = matmul_tn_f32(&a, &b).unwrap();
        assert_eq!(y.dims(), &[2, 1]);
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![12.5, 16.0]
        );
        let bad = Tensor::zeros((2, 1), DType::F32, &dev).unwrap();
        assert!(matmul_tn_f32(&a, &bad).is_err());
    }
}
