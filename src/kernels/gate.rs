//! Gated output `y = o * sigmoid(g)` (the output gate of AF2 supplement Algorithms 7, 8, 11-14:
//! `o` the attention / triangle-product output, `g` the logits of `linear_g`).
//!
//! Fused on CUDA (f32/bf16, fp32 math, one rounding per output): forward one kernel
//! (`y = o·s`, `s = 1 / (1 + exp(-g))`), backward one kernel writing both
//! `d_o = dy·s` and `d_g = dy·o·s·(1 − s)`. The twin is the plain candle chain
//! `o * sigmoid(g)` (two kernels forward, and candle's backward of `Mul` and `sigmoid`).

use candle_core::{DType, Device, Tensor};

#[cfg(feature = "cuda")]
use super::permute::Contig;
use super::{ElemBenchRow, ElemCheck};
use crate::error::Result;

/// NVRTC module name.
pub const MODULE: &str = "ferrofold_gate";

/// CUDA C source: `gate_{fwd,bwd}_{f32,bf16}_v{1,4|8}`, one thread per `V` consecutive elements
/// (one 16-byte access per operand when `V > 1`).
#[cfg(feature = "cuda")]
pub const SOURCE: &str = concat!(
    elem_prelude!(),
    r#"
__device__ __forceinline__ float sigm(float x) { return 1.0f / (1.0f + expf(-x)); }

template <typename T, int V>
__device__ __forceinline__ void gate_fwd(const T* o, const T* g, T* y, size_t n_groups) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n_groups) return;
    Pack<T, V> ov = reinterpret_cast<const Pack<T, V>*>(o)[i];
    Pack<T, V> gv = reinterpret_cast<const Pack<T, V>*>(g)[i];
    Pack<T, V> out;
#pragma unroll
    for (int j = 0; j < V; j++) st(out.v, j, ld(ov.v, j) * sigm(ld(gv.v, j)));
    reinterpret_cast<Pack<T, V>*>(y)[i] = out;
}

template <typename T, int V>
__device__ __forceinline__ void gate_bwd(const T* o, const T* g, const T* dy, T* d_o, T* d_g, size_t n_groups) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n_groups) return;
    Pack<T, V> ov = reinterpret_cast<const Pack<T, V>*>(o)[i];
    Pack<T, V> gv = reinterpret_cast<const Pack<T, V>*>(g)[i];
    Pack<T, V> dv = reinterpret_cast<const Pack<T, V>*>(dy)[i];
    Pack<T, V> a, b;
#pragma unroll
    for (int j = 0; j < V; j++) {
        float s = sigm(ld(gv.v, j));
        float d = ld(dv.v, j);
        st(a.v, j, d * s);
        st(b.v, j, d * ld(ov.v, j) * s * (1.0f - s));
    }
    reinterpret_cast<Pack<T, V>*>(d_o)[i] = a;
    reinterpret_cast<Pack<T, V>*>(d_g)[i] = b;
}

#define GATE(SUF, T, V) \
extern "C" __global__ void gate_fwd_##SUF(const T* o, const T* g, T* y, size_t n) { gate_fwd<T, V>(o, g, y, n); } \
extern "C" __global__ void gate_bwd_##SUF(const T* o, const T* g, const T* dy, T* d_o, T* d_g, size_t n) { \
    gate_bwd<T, V>(o, g, dy, d_o, d_g, n); \
}
GATE(f32_v1, float, 1)
GATE(f32_v4, float, 4)
GATE(bf16_v1, __nv_bfloat16, 1)
GATE(bf16_v8, __nv_bfloat16, 8)
"#
);

/// Plain-candle twin: `o * sigmoid(g)` (same shapes).
pub fn gate_twin(o: &Tensor, g: &Tensor) -> Result<Tensor> {
    Ok((o * crate::model::primitives::sigmoid(g)?)?)
}

/// `o * sigmoid(g)`: the fused kernel on CUDA (f32/bf16, same shape and dtype, fused kernels
/// enabled), the twin otherwise.
pub fn gate(o: &Tensor, g: &Tensor) -> Result<Tensor> {
    if super::fused_for(o)
        && o.shape() == g.shape()
        && o.dtype() == g.dtype()
        && o.elem_count() > 0
        && o.device().same_device(g.device())
    {
        return gate_fused(o, g);
    }
    gate_twin(o, g)
}

/// The fused op, unconditionally (CUDA tensors only; errors without the `cuda` feature).
pub fn gate_fused(o: &Tensor, g: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        Ok(o.contig()?.apply_op2(&g.contig()?, cuda::GateOp)?)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (o, g);
        Err(crate::error::Error::Msg(
            "the fused gate kernel needs the `cuda` feature".into(),
        ))
    }
}

/// Backward of the fused gate for hand-written backward passes: `(d_o, d_g)` of `o * sigmoid(g)`
/// for the cotangent `dy`; `Ok(None)` when the fused kernel does not apply (see [`gate`]).
pub fn gate_bwd(o: &Tensor, g: &Tensor, dy: &Tensor) -> Result<Option<(Tensor, Tensor)>> {
    if !(super::fused_for(o)
        && o.shape() == g.shape()
        && o.shape() == dy.shape()
        && o.dtype() == g.dtype()
        && o.elem_count() > 0
        && o.device().same_device(g.device()))
    {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    {
        let dy = dy.detach().to_dtype(o.dtype())?.contig()?;
        let (o, g) = (o.detach().contig()?, g.detach().contig()?);
        let r = match o.dtype() {
            candle_core::DType::F32 => cuda::bwd_t::<f32>(&o, &g, &dy)?,
            candle_core::DType::BF16 => cuda::bwd_t::<half::bf16>(&o, &g, &dy)?,
            _ => return Ok(None),
        };
        Ok(Some(r))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = dy;
        Ok(None)
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::{CudaDType, CudaStorage, WrapErr};
    use candle_core::{DType, Layout, Shape, Tensor};
    use cudarc::driver::{DeviceRepr, PushKernelArg};

    use super::super::launch::{cuda_storage, func, range, suffix, tensor_from_slice, BLOCK};
    use super::super::nvrtc;
    use super::{MODULE, SOURCE};
    use crate::kernels::permute::Contig;

    /// `o * sigmoid(g)` with an analytic backward.
    pub(super) struct GateOp;

    /// Elements per thread: 16 bytes when `n` and every start offset allow it, else 1.
    fn width(dtype: DType, n: usize, starts: &[usize]) -> usize {
        let wide = if dtype == DType::BF16 { 8 } else { 4 };
        if n.is_multiple_of(wide) && starts.iter().all(|s| s.is_multiple_of(wide)) {
            wide
        } else {
            1
        }
    }

    fn fwd_t<T: CudaDType + DeviceRepr>(
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<CudaStorage> {
        let dev = s1.device();
        let n = l1.shape().elem_count();
        let (r1, r2) = (range(l1)?, range(l2)?);
        let v = width(s1.dtype(), n, &[r1.start, r2.start]);
        let name = format!("gate_fwd_{}_v{v}", suffix(s1.dtype())?);
        let f = func(dev, MODULE, SOURCE, &name)?;
        let o = s1.as_cuda_slice::<T>()?.slice(r1);
        let g = s2.as_cuda_slice::<T>()?.slice(r2);
        // SAFETY: every element is written by the kernel.
        let mut y = unsafe { dev.alloc::<T>(n)? };
        let groups = n / v;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&o).arg(&g).arg(&mut y).arg(&groups);
        // SAFETY: argument types match the kernel signature; all buffers hold `n = groups·v`
        // elements and start `v`-aligned.
        unsafe { b.launch(nvrtc::grid_1d(groups, BLOCK)) }.w()?;
        Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
    }

    pub(super) fn bwd_t<T: CudaDType + DeviceRepr>(
        o: &Tensor,
        g: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        let n = o.elem_count();
        let (so, lo) = o.storage_and_layout();
        let (sg, lg) = g.storage_and_layout();
        let (sd, ld) = dy.storage_and_layout();
        let (so, sg, sd) = (cuda_storage(&so)?, cuda_storage(&sg)?, cuda_storage(&sd)?);
        let dev = so.device();
        let (ro, rg, rd) = (range(lo)?, range(lg)?, range(ld)?);
        let v = width(o.dtype(), n, &[ro.start, rg.start, rd.start]);
        let name = format!("gate_bwd_{}_v{v}", suffix(o.dtype())?);
        let f = func(dev, MODULE, SOURCE, &name)?;
        let ov = so.as_cuda_slice::<T>()?.slice(ro);
        let gv = sg.as_cuda_slice::<T>()?.slice(rg);
        let dv = sd.as_cuda_slice::<T>()?.slice(rd);
        // SAFETY: every element is written by the kernel.
        let mut d_o = unsafe { dev.alloc::<T>(n)? };
        let mut d_g = unsafe { dev.alloc::<T>(n)? };
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        let groups = n / v;
        b.arg(&ov)
            .arg(&gv)
            .arg(&dv)
            .arg(&mut d_o)
            .arg(&mut d_g)
            .arg(&groups);
        // SAFETY: as in the forward.
        unsafe { b.launch(nvrtc::grid_1d(groups, BLOCK)) }.w()?;
        Ok((
            tensor_from_slice(d_o, dev, o.shape()),
            tensor_from_slice(d_g, dev, o.shape()),
        ))
    }

    impl candle_core::CustomOp2 for GateOp {
        fn name(&self) -> &'static str {
            "ferrofold-gate"
        }

        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
            candle_core::bail!("ferrofold-gate: CUDA only (use kernels::gate::gate)")
        }

        fn cuda_fwd(
            &self,
            s1: &CudaStorage,
            l1: &Layout,
            s2: &CudaStorage,
            l2: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            if l1.shape() != l2.shape() || s1.dtype() != s2.dtype() {
                candle_core::bail!("ferrofold-gate: operands differ in shape or dtype");
            }
            let out = match s1.dtype() {
                DType::F32 => fwd_t::<f32>(s1, l1, s2, l2)?,
                DType::BF16 => fwd_t::<half::bf16>(s1, l1, s2, l2)?,
                other => candle_core::bail!("ferrofold-gate: unsupported dtype {other:?}"),
            };
            Ok((out, l1.shape().clone()))
        }

        fn bwd(
            &self,
            o: &Tensor,
            g: &Tensor,
            _res: &Tensor,
            dy: &Tensor,
        ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
            let dy = dy.to_dtype(o.dtype())?.contig()?;
            let (d_o, d_g) = match o.dtype() {
                DType::F32 => bwd_t::<f32>(o, g, &dy)?,
                DType::BF16 => bwd_t::<half::bf16>(o, g, &dy)?,
                other => candle_core::bail!("ferrofold-gate: unsupported dtype {other:?}"),
            };
            Ok((Some(d_o), Some(d_g)))
        }
    }
}

/// Forward, `d_o` and `d_g` of `op` on `o`, `g` with cotangent `dy` (the gradient of
/// `sum(op(o, g) * dy)`).
fn fwd_bwd(
    op: fn(&Tensor, &Tensor) -> Result<Tensor>,
    o: &Tensor,
    g: &Tensor,
    dy: &Tensor,
) -> Result<(Tensor, Tensor, Tensor)> {
    let ov = candle_core::Var::from_tensor(o)?;
    let gv = candle_core::Var::from_tensor(g)?;
    let y = op(ov.as_tensor(), gv.as_tensor())?;
    let grads = (&y * dy)?.sum_all()?.backward()?;
    let missing = || crate::error::Error::Msg("gate: no gradient".into());
    let d_o = grads.get(ov.as_tensor()).ok_or_else(missing)?.clone();
    let d_g = grads.get(gv.as_tensor()).ok_or_else(missing)?.clone();
    Ok((y.detach(), d_o, d_g))
}

fn case(shape: &[usize], dtype: DType) -> String {
    format!("{shape:?} {dtype:?}")
}

fn tol(dtype: DType) -> f64 {
    if dtype == DType::BF16 {
        2e-2
    } else {
        2e-6
    }
}

/// Shapes checked by [`self_check`] (the last ones are AF2's: MSA attention `[S, R, H·C]`,
/// pair `[R, R, c]`).
pub const CHECK_SHAPES: &[&[usize]] =
    &[&[3, 5, 7], &[2, 33, 64], &[128, 256, 256], &[256, 256, 128]];

/// Fused vs twin, forward and both gradients, for every shape of [`CHECK_SHAPES`] in f32 and
/// bf16 on `dev` (a CUDA device).
pub fn self_check(dev: &Device) -> Result<Vec<ElemCheck>> {
    let mut out = Vec::new();
    for (k, shape) in CHECK_SHAPES.iter().enumerate() {
        for dtype in [DType::F32, DType::BF16] {
            let seed = 0x6a7e_0000 + k as u64;
            let o = super::uniform_tensor(shape, 2.0, seed, dtype, dev)?;
            let g = super::uniform_tensor(shape, 4.0, seed ^ 0x11, dtype, dev)?;
            let dy = super::uniform_tensor(shape, 1.0, seed ^ 0x22, dtype, dev)?;
            let (yf, dof, dgf) = fwd_bwd(gate_fused, &o, &g, &dy)?;
            let (yt, dot, dgt) = fwd_bwd(gate_twin, &o, &g, &dy)?;
            for (what, a, b) in [
                ("gate fwd", &yf, &yt),
                ("gate bwd d_o", &dof, &dot),
                ("gate bwd d_g", &dgf, &dgt),
            ] {
                out.push(ElemCheck {
                    op: what.into(),
                    case: case(shape, dtype),
                    max_err: super::rel_err(a, b)?,
                    tol: tol(dtype),
                });
            }
        }
    }
    Ok(out)
}

/// Fused vs twin timings at AF2 shapes (bf16 and f32): forward alone and backward alone (the
/// error column of the backward row is that of `d_g`).
pub fn bench_rows(dev: &Device, iters: usize) -> Result<Vec<ElemBenchRow>> {
    let mut rows = Vec::new();
    for shape in [&[128usize, 256, 256][..], &[256, 256, 128]] {
        for dtype in [DType::BF16, DType::F32] {
            let o = super::uniform_tensor(shape, 2.0, 1, dtype, dev)?;
            let g = super::uniform_tensor(shape, 4.0, 2, dtype, dev)?;
            let dy = super::uniform_tensor(shape, 1.0, 3, dtype, dev)?;
            let fused_ms = super::median_ms(dev, 3, iters, || gate_fused(&o, &g).map(|_| ()))?;
            let twin_ms = super::median_ms(dev, 3, iters, || gate_twin(&o, &g).map(|_| ()))?;
            let err = super::rel_err(&gate_fused(&o, &g)?, &gate_twin(&o, &g)?)?;
            rows.push(ElemBenchRow {
                op: "gate fwd".into(),
                case: case(shape, dtype),
                fused_ms,
                twin_ms,
                max_err: err,
            });
            // Backward alone: `y.backward()` (seeded with ones) on a graph built once.
            let ov = candle_core::Var::from_tensor(&o)?;
            let gv = candle_core::Var::from_tensor(&g)?;
            let yf = gate_fused(ov.as_tensor(), gv.as_tensor())?;
            let yt = gate_twin(ov.as_tensor(), gv.as_tensor())?;
            let fused_ms = super::median_ms(dev, 3, iters, || {
                yf.backward().map(|_| ()).map_err(Into::into)
            })?;
            let twin_ms = super::median_ms(dev, 3, iters, || {
                yt.backward().map(|_| ()).map_err(Into::into)
            })?;
            let (_, _, a) = fwd_bwd(gate_fused, &o, &g, &dy)?;
            let (_, _, b) = fwd_bwd(gate_twin, &o, &g, &dy)?;
            rows.push(ElemBenchRow {
                op: "gate bwd".into(),
                case: case(shape, dtype),
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

    /// On the CPU `gate` is the twin, whose values are `o / (1 + exp(-g))`.
    #[test]
    fn gate_on_cpu_is_the_twin() {
        let o = Tensor::new(&[1.0f32, -2.0, 0.5], &Device::Cpu).unwrap();
        let g = Tensor::new(&[0.0f32, 3.0, -1.0], &Device::Cpu).unwrap();
        let y = gate(&o, &g).unwrap().to_vec1::<f32>().unwrap();
        for (i, (ov, gv)) in [(1.0f32, 0.0f32), (-2.0, 3.0), (0.5, -1.0)]
            .iter()
            .enumerate()
        {
            let want = ov / (1.0 + (-gv).exp());
            assert!((y[i] - want).abs() < 1e-6, "{i}: {} vs {want}", y[i]);
        }
        assert!(gate_fused(&o, &g).is_err());
    }
}
