//! Residual add of a shared-mask dropout: `y = residual + update * mask` (AF2 supplement
//! Algorithm 6, every `x += Dropout{rowwise,columnwise}(f(x))` line of the Evoformer).
//!
//! `mask` is the keep mask of [`crate::model::dropout::dropout_mask`] (entries `0` or
//! `1/(1-rate)`, the scale already folded in, drawn on the host from the seeded [`DropoutCtx`]):
//! the fused path uses exactly the twin's mask, so results do not depend on the device's RNG.
//! The mask has `x`'s shape with the shared dimension set to 1 and is read broadcast by the
//! kernel (never materialised at full size).
//!
//! Fused on CUDA (f32/bf16, fp32 math): forward one kernel; backward one kernel
//! `d_update = dy * mask` (`d_residual = dy` is passed through, the mask is a constant).
//! In f32 the forward is bitwise equal to the twin (`__fmul_rn` then `__fadd_rn`, as candle's
//! two kernels); in bf16 the fused result is rounded once instead of twice.
//!
//! DISCREPANCY (none with AF2; implementation note): the linear's bias add that precedes the
//! dropout is not folded in: the update comes out of `linear_o`/`linear_z` with its bias added.

use candle_core::{DType, Device, Tensor};

use super::{ElemBenchRow, ElemCheck};
use crate::error::Result;
use crate::model::dropout::{dropout_mask, dropout_shared, DropoutCtx};

/// NVRTC module name.
pub const MODULE: &str = "ferrofold_dropout_residual";

/// CUDA C source (`dropres_fwd_{f32,bf16}`, `dropres_bwd_{f32,bf16}`). The mask of `x` viewed as
/// `[outer, shared, inner]` is `[outer, 1, inner]`: element `i` reads mask
/// `(i / (shared·inner))·inner + i % inner`.
#[cfg(feature = "cuda")]
pub const SOURCE: &str = concat!(
    elem_prelude!(),
    r#"
__device__ __forceinline__ size_t mask_idx(size_t i, size_t block, size_t inner) {
    return (i / block) * inner + i % inner;
}

template <typename T>
__device__ __forceinline__ void dropres_fwd(const T* r, const T* u, const T* m, T* y, size_t n, size_t block, size_t inner) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    st(y, i, __fadd_rn(ld(r, i), __fmul_rn(ld(u, i), ld(m, mask_idx(i, block, inner)))));
}

template <typename T>
__device__ __forceinline__ void dropres_bwd(const T* dy, const T* m, T* du, size_t n, size_t block, size_t inner) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    st(du, i, __fmul_rn(ld(dy, i), ld(m, mask_idx(i, block, inner))));
}

extern "C" __global__ void dropres_fwd_f32(const float* r, const float* u, const float* m, float* y, size_t n, size_t block, size_t inner) {
    dropres_fwd(r, u, m, y, n, block, inner);
}
extern "C" __global__ void dropres_fwd_bf16(const __nv_bfloat16* r, const __nv_bfloat16* u, const __nv_bfloat16* m, __nv_bfloat16* y,
                                            size_t n, size_t block, size_t inner) {
    dropres_fwd(r, u, m, y, n, block, inner);
}
extern "C" __global__ void dropres_bwd_f32(const float* dy, const float* m, float* du, size_t n, size_t block, size_t inner) {
    dropres_bwd(dy, m, du, n, block, inner);
}
extern "C" __global__ void dropres_bwd_bf16(const __nv_bfloat16* dy, const __nv_bfloat16* m, __nv_bfloat16* du,
                                            size_t n, size_t block, size_t inner) {
    dropres_bwd(dy, m, du, n, block, inner);
}
"#
);

/// Plain-candle twin: `residual + dropout_shared(update, rate, shared_dim, ctx)`.
pub fn residual_dropout_twin(
    residual: &Tensor,
    update: &Tensor,
    rate: f64,
    shared_dim: usize,
    ctx: Option<&DropoutCtx>,
) -> Result<Tensor> {
    Ok((residual + dropout_shared(update, rate, shared_dim, ctx)?)?)
}

/// `residual + dropout_shared(update, rate, shared_dim, ctx)`: one fused kernel on CUDA in
/// training mode (f32/bf16, same shape and dtype, fused kernels enabled), the twin otherwise
/// (eval mode is a plain add).
pub fn residual_dropout(
    residual: &Tensor,
    update: &Tensor,
    rate: f64,
    shared_dim: usize,
    ctx: Option<&DropoutCtx>,
) -> Result<Tensor> {
    if let Some(ctx) = ctx {
        if rate > 0.0
            && super::fused_for(update)
            && residual.shape() == update.shape()
            && residual.dtype() == update.dtype()
            && update.elem_count() > 0
            && residual.device().same_device(update.device())
        {
            let mask = dropout_mask(update, rate, shared_dim, ctx)?;
            return residual_masked_fused(residual, update, &mask, shared_dim);
        }
    }
    residual_dropout_twin(residual, update, rate, shared_dim, ctx)
}

/// The fused op, unconditionally: `residual + update * mask`, `mask` of `update`'s shape with
/// dimension `shared_dim` set to 1 (a constant: no gradient). CUDA only.
pub fn residual_masked_fused(
    residual: &Tensor,
    update: &Tensor,
    mask: &Tensor,
    shared_dim: usize,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        let mut want = update.dims().to_vec();
        if shared_dim < want.len() {
            want[shared_dim] = 1;
        }
        if mask.dims() != want.as_slice() {
            return Err(crate::error::Error::Model(format!(
                "residual dropout: mask shape {:?}, expected {want:?}",
                mask.dims()
            )));
        }
        let mask = mask.detach().to_dtype(update.dtype())?.contiguous()?;
        Ok(residual.contiguous()?.apply_op3(
            &update.contiguous()?,
            &mask,
            cuda::DropResOp { shared_dim },
        )?)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (residual, update, mask, shared_dim);
        Err(crate::error::Error::Msg(
            "the fused residual-dropout kernel needs the `cuda` feature".into(),
        ))
    }
}

/// `(block, inner)` of `dims` split as `[outer, shared, inner]` around `shared_dim`
/// (`block = shared·inner`); no sharing when `shared_dim` is past the last axis.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn mask_geometry(dims: &[usize], shared_dim: usize) -> (usize, usize) {
    if shared_dim >= dims.len() {
        return (1, 1);
    }
    let inner: usize = dims[shared_dim + 1..].iter().product();
    (dims[shared_dim] * inner, inner)
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::{CudaDType, CudaStorage, WrapErr};
    use candle_core::{DType, Layout, Shape, Tensor};
    use cudarc::driver::{DeviceRepr, PushKernelArg};

    use super::super::elem_common::{cerr, cuda_storage, range, suffix, tensor_from_slice, BLOCK};
    use super::super::nvrtc;
    use super::{mask_geometry, MODULE, SOURCE};

    /// `residual + update * mask` with the mask shared along `shared_dim`.
    pub(super) struct DropResOp {
        pub(super) shared_dim: usize,
    }

    #[allow(clippy::too_many_arguments)]
    fn fwd_t<T: CudaDType + DeviceRepr>(
        shared_dim: usize,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<CudaStorage> {
        let dev = s1.device();
        let n = l1.shape().elem_count();
        let (block, inner) = mask_geometry(l1.shape().dims(), shared_dim);
        let f = nvrtc::func(
            dev,
            MODULE,
            SOURCE,
            &format!("dropres_fwd_{}", suffix(s1.dtype())?),
        )
        .map_err(cerr)?;
        let r = s1.as_cuda_slice::<T>()?.slice(range(l1)?);
        let u = s2.as_cuda_slice::<T>()?.slice(range(l2)?);
        let m = s3.as_cuda_slice::<T>()?.slice(range(l3)?);
        // SAFETY: every element is written by the kernel.
        let mut y = unsafe { dev.alloc::<T>(n)? };
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&r)
            .arg(&u)
            .arg(&m)
            .arg(&mut y)
            .arg(&n)
            .arg(&block)
            .arg(&inner);
        // SAFETY: argument types match the kernel signature; `r`, `u`, `y` hold `n` elements and
        // `m` holds `n / shared` (every index the kernel forms is below that).
        unsafe { b.launch(nvrtc::grid_1d(n, BLOCK)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
    }

    fn bwd_t<T: CudaDType + DeviceRepr>(
        shared_dim: usize,
        dy: &Tensor,
        mask: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let n = dy.elem_count();
        let (block, inner) = mask_geometry(dy.dims(), shared_dim);
        let (sd, ld) = dy.storage_and_layout();
        let (sm, lm) = mask.storage_and_layout();
        let (sd, sm) = (cuda_storage(&sd)?, cuda_storage(&sm)?);
        let dev = sd.device();
        let f = nvrtc::func(
            dev,
            MODULE,
            SOURCE,
            &format!("dropres_bwd_{}", suffix(dy.dtype())?),
        )
        .map_err(cerr)?;
        let dv = sd.as_cuda_slice::<T>()?.slice(range(ld)?);
        let mv = sm.as_cuda_slice::<T>()?.slice(range(lm)?);
        // SAFETY: every element is written by the kernel.
        let mut du = unsafe { dev.alloc::<T>(n)? };
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&dv)
            .arg(&mv)
            .arg(&mut du)
            .arg(&n)
            .arg(&block)
            .arg(&inner);
        // SAFETY: as in the forward.
        unsafe { b.launch(nvrtc::grid_1d(n, BLOCK)) }.w()?;
        Ok(tensor_from_slice(du, dev, dy.shape()))
    }

    impl candle_core::CustomOp3 for DropResOp {
        fn name(&self) -> &'static str {
            "ferrofold-dropout-residual"
        }

        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
            candle_core::bail!("ferrofold-dropout-residual: CUDA only")
        }

        fn cuda_fwd(
            &self,
            s1: &CudaStorage,
            l1: &Layout,
            s2: &CudaStorage,
            l2: &Layout,
            s3: &CudaStorage,
            l3: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            if l1.shape() != l2.shape() || s1.dtype() != s2.dtype() || s1.dtype() != s3.dtype() {
                candle_core::bail!("ferrofold-dropout-residual: operands differ in shape or dtype");
            }
            let sd = self.shared_dim;
            let out = match s1.dtype() {
                DType::F32 => fwd_t::<f32>(sd, s1, l1, s2, l2, s3, l3)?,
                DType::BF16 => fwd_t::<half::bf16>(sd, s1, l1, s2, l2, s3, l3)?,
                other => candle_core::bail!("ferrofold-dropout-residual: dtype {other:?}"),
            };
            Ok((out, l1.shape().clone()))
        }

        fn bwd(
            &self,
            residual: &Tensor,
            _update: &Tensor,
            mask: &Tensor,
            _res: &Tensor,
            dy: &Tensor,
        ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            let dy = dy.to_dtype(residual.dtype())?.contiguous()?;
            let du = match dy.dtype() {
                DType::F32 => bwd_t::<f32>(self.shared_dim, &dy, mask)?,
                DType::BF16 => bwd_t::<half::bf16>(self.shared_dim, &dy, mask)?,
                other => candle_core::bail!("ferrofold-dropout-residual: dtype {other:?}"),
            };
            Ok((Some(dy), Some(du), None))
        }
    }
}

type ResDropFn = fn(&Tensor, &Tensor, f64, usize, Option<&DropoutCtx>) -> Result<Tensor>;

/// The fused op with a drawn mask (what [`residual_dropout`] does on CUDA), unconditionally.
fn fused_with_ctx(
    residual: &Tensor,
    update: &Tensor,
    rate: f64,
    shared_dim: usize,
    ctx: Option<&DropoutCtx>,
) -> Result<Tensor> {
    let ctx = ctx.ok_or_else(|| crate::error::Error::Msg("residual dropout: no ctx".into()))?;
    let mask = dropout_mask(update, rate, shared_dim, ctx)?;
    residual_masked_fused(residual, update, &mask, shared_dim)
}

/// Output and the gradients of `sum(op(...) * dy)` for residual and update.
fn fwd_bwd(
    op: ResDropFn,
    r: &Tensor,
    u: &Tensor,
    dy: &Tensor,
    rate: f64,
    shared_dim: usize,
    ctx: &DropoutCtx,
) -> Result<(Tensor, Tensor, Tensor)> {
    let rv = candle_core::Var::from_tensor(r)?;
    let uv = candle_core::Var::from_tensor(u)?;
    let y = op(rv.as_tensor(), uv.as_tensor(), rate, shared_dim, Some(ctx))?;
    let grads = (&y * dy)?.sum_all()?.backward()?;
    let missing = || crate::error::Error::Msg("residual dropout: no gradient".into());
    let dr = grads.get(rv.as_tensor()).ok_or_else(missing)?.clone();
    let du = grads.get(uv.as_tensor()).ok_or_else(missing)?.clone();
    Ok((y.detach(), dr, du))
}

/// `(shape, rate, shared_dim)` cases of [`self_check`]; the last ones are AF2's MSA
/// (`[S, R, c_m]`, row-wise 0.15) and pair (`[R, R, c_z]`, row-/column-wise 0.25) sites.
pub const CHECK_CASES: &[(&[usize], f64, usize)] = &[
    (&[4, 5, 6], 0.25, 0),
    (&[4, 5, 6], 0.25, 1),
    (&[3, 17, 33], 0.5, 0),
    (&[128, 256, 256], 0.15, 0),
    (&[256, 256, 128], 0.25, 0),
    (&[256, 256, 128], 0.25, 1),
];

fn case(shape: &[usize], rate: f64, shared_dim: usize, dtype: DType) -> String {
    format!("{shape:?} p={rate} shared={shared_dim} {dtype:?}")
}

/// Fused vs twin (forward, `d_residual`, `d_update`) for [`CHECK_CASES`] in f32 and bf16 on `dev`
/// (CUDA). The tolerance is 0 in f32 (bitwise).
pub fn self_check(dev: &Device) -> Result<Vec<ElemCheck>> {
    let mut out = Vec::new();
    for (k, &(shape, rate, sd)) in CHECK_CASES.iter().enumerate() {
        for dtype in [DType::F32, DType::BF16] {
            let seed = 0xd0_0000 + k as u64;
            let r = super::uniform_tensor(shape, 2.0, seed, dtype, dev)?;
            let u = super::uniform_tensor(shape, 1.0, seed ^ 1, dtype, dev)?;
            let dy = super::uniform_tensor(shape, 1.0, seed ^ 2, dtype, dev)?;
            let ctx = DropoutCtx::new(seed ^ 3);
            let (yf, drf, duf) = fwd_bwd(fused_with_ctx, &r, &u, &dy, rate, sd, &ctx)?;
            let (yt, drt, dut) = fwd_bwd(residual_dropout_twin, &r, &u, &dy, rate, sd, &ctx)?;
            let tol = if dtype == DType::BF16 { 1e-2 } else { 0.0 };
            for (what, a, b) in [
                ("dropres fwd", &yf, &yt),
                ("dropres bwd d_residual", &drf, &drt),
                ("dropres bwd d_update", &duf, &dut),
            ] {
                out.push(ElemCheck {
                    op: what.into(),
                    case: case(shape, rate, sd, dtype),
                    max_err: super::rel_err(a, b)?,
                    tol,
                });
            }
        }
    }
    Ok(out)
}

/// Fused vs twin timings at AF2 shapes: forward alone and forward+backward (both include drawing
/// and uploading the mask, as in training).
pub fn bench_rows(dev: &Device, iters: usize) -> Result<Vec<ElemBenchRow>> {
    let mut rows = Vec::new();
    for &(shape, rate, sd) in &CHECK_CASES[3..] {
        for dtype in [DType::BF16, DType::F32] {
            let r = super::uniform_tensor(shape, 2.0, 1, dtype, dev)?;
            let u = super::uniform_tensor(shape, 1.0, 2, dtype, dev)?;
            let dy = super::uniform_tensor(shape, 1.0, 3, dtype, dev)?;
            let ctx = DropoutCtx::new(7);
            let c = Some(&ctx);
            let fused_ms = super::median_ms(dev, 3, iters, || {
                fused_with_ctx(&r, &u, rate, sd, c).map(|_| ())
            })?;
            let twin_ms = super::median_ms(dev, 3, iters, || {
                residual_dropout_twin(&r, &u, rate, sd, c).map(|_| ())
            })?;
            let err = super::rel_err(
                &fused_with_ctx(&r, &u, rate, sd, c)?,
                &residual_dropout_twin(&r, &u, rate, sd, c)?,
            )?;
            rows.push(ElemBenchRow {
                op: "dropout+residual fwd".into(),
                case: case(shape, rate, sd, dtype),
                fused_ms,
                twin_ms,
                max_err: err,
            });
            let fused_ms = super::median_ms(dev, 3, iters, || {
                fwd_bwd(fused_with_ctx, &r, &u, &dy, rate, sd, &ctx).map(|_| ())
            })?;
            let twin_ms = super::median_ms(dev, 3, iters, || {
                fwd_bwd(residual_dropout_twin, &r, &u, &dy, rate, sd, &ctx).map(|_| ())
            })?;
            let (_, _, a) = fwd_bwd(fused_with_ctx, &r, &u, &dy, rate, sd, &ctx)?;
            let (_, _, b) = fwd_bwd(residual_dropout_twin, &r, &u, &dy, rate, sd, &ctx)?;
            rows.push(ElemBenchRow {
                op: "dropout+residual fwd+bwd".into(),
                case: case(shape, rate, sd, dtype),
                fused_ms,
                twin_ms,
                max_err: super::rel_err(&a, &b)?,
            });
        }
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_of_row_and_column_sharing() {
        // [4, 5, 6]: row-wise mask [1, 5, 6] → index i % 30; column-wise [4, 1, 6].
        assert_eq!(mask_geometry(&[4, 5, 6], 0), (120, 30));
        assert_eq!(mask_geometry(&[4, 5, 6], 1), (30, 6));
        assert_eq!(mask_geometry(&[4, 5, 6], 3), (1, 1));
        // The kernel's index rule reproduces the broadcast of a [4, 1, 6] mask.
        let (block, inner) = mask_geometry(&[4, 5, 6], 1);
        for a in 0..4 {
            for b in 0..5 {
                for c in 0..6 {
                    let i = (a * 5 + b) * 6 + c;
                    assert_eq!((i / block) * inner + i % inner, a * 6 + c);
                }
            }
        }
    }

    /// On the CPU the entry point is the twin: the residual plus the dropped-out update, with the
    /// masks of `dropout_shared`.
    #[test]
    fn cpu_path_is_residual_plus_dropout() {
        let r = Tensor::arange(0f32, 24.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 3, 4))
            .unwrap();
        let u = Tensor::ones((2, 3, 4), DType::F32, &Device::Cpu).unwrap();
        let ctx = DropoutCtx::new(11);
        let y = residual_dropout(&r, &u, 0.5, 0, Some(&ctx)).unwrap();
        let want = (&r + dropout_shared(&u, 0.5, 0, Some(&ctx)).unwrap()).unwrap();
        let (y, want) = (
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert_eq!(y, want);
        // Eval mode: a plain add.
        let e = residual_dropout(&r, &u, 0.5, 0, None).unwrap();
        let e = e.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(e.iter().enumerate().all(|(i, v)| *v == i as f32 + 1.0));
    }
}
