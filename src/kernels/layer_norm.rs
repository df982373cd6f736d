//! Fused CUDA LayerNorm over the last dimension (AF2 supplement section 1.11.4 uses PyTorch's
//! LayerNorm: biased variance, affine weight and bias).
//!
//! `y = (x − mean) · rstd · w + b` with `rstd = 1/sqrt(var + eps)`; `x` and `y` are f32 or bf16,
//! `w`/`b` f32 (the master parameters, no cast), statistics in f32.
//!
//! Kernels (one warp per row; each lane keeps `V` values of the row in registers, `32·V ≥ c`,
//! so `c ≤ 1024`; larger rows use the composite twin):
//! - `ln_fwd`: mean, then the sum of squared deviations (two-pass, exact), then `y`.
//! - `ln_bwd_dx`: recomputes mean/rstd; with `x̂ = (x − mean)·rstd`, `gw = g·w`:
//!   `dx = rstd · (gw − mean(gw) − x̂ · mean(gw·x̂))`.
//! - `ln_bwd_wb_part` + `ln_bwd_wb_final`: `dw = Σ_rows g·x̂`, `db = Σ_rows g` as a deterministic
//!   two-stage reduction (fixed row→block assignment, fixed summation order, no atomics): every run
//!   gives the same bits.
//!
//! The forward is a `CustomOp3` whose `bwd` applies the two backward ops (themselves custom ops).

use candle_core::Tensor;

use crate::error::Result;

/// Largest channel count the fused kernels take.
pub const MAX_C: usize = 1024;

/// NVRTC module name.
pub const MODULE: &str = "ff_layer_norm";

/// CUDA C source of the module.
#[cfg(feature = "cuda")]
pub const SRC: &str = concat!(
    crate::ff_cuda_prelude!(),
    r#"
template <typename T, int V>
__device__ __forceinline__ void load_row(const T* __restrict__ r, int c, int lane, float* v) {
#pragma unroll
    for (int i = 0; i < V; ++i) {
        int j = lane + 32 * i;
        v[i] = j < c ? to_f(r[j]) : 0.f;
    }
}

// mean and rstd of the row held in v (zeros past c).
template <int V>
__device__ __forceinline__ void row_stats(const float* v, int c, int lane, float eps, float& mean, float& rstd) {
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < V; ++i) s += v[i];
    mean = warp_sum(s) / (float)c;
    float q = 0.f;
#pragma unroll
    for (int i = 0; i < V; ++i) {
        int j = lane + 32 * i;
        float d = j < c ? v[i] - mean : 0.f;
        q += d * d;
    }
    rstd = 1.f / sqrtf(warp_sum(q) / (float)c + eps);
}

template <typename T, int V>
__device__ void ln_fwd(const T* __restrict__ x, const float* __restrict__ w, const float* __restrict__ b,
                       T* __restrict__ y, long long rows, int c, float eps) {
    long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    float v[V];
    load_row<T, V>(x + row * c, c, lane, v);
    float mean, rstd;
    row_stats<V>(v, c, lane, eps, mean, rstd);
    T* yr = y + row * c;
#pragma unroll
    for (int i = 0; i < V; ++i) {
        int j = lane + 32 * i;
        if (j < c) yr[j] = from_f<T>((v[i] - mean) * rstd * w[j] + b[j]);
    }
}

template <typename T, int V>
__device__ void ln_bwd_dx(const T* __restrict__ x, const float* __restrict__ w, const T* __restrict__ g,
                          T* __restrict__ dx, long long rows, int c, float eps) {
    long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    float v[V], gv[V];
    load_row<T, V>(x + row * c, c, lane, v);
    load_row<T, V>(g + row * c, c, lane, gv);
    float mean, rstd;
    row_stats<V>(v, c, lane, eps, mean, rstd);
    float s1 = 0.f, s2 = 0.f;
#pragma unroll
    for (int i = 0; i < V; ++i) {
        int j = lane + 32 * i;
        float ww = j < c ? w[j] : 0.f;
        v[i] = (v[i] - mean) * rstd;  // x-hat
        gv[i] *= ww;                  // g*w (zero past c)
        s1 += gv[i];
        s2 += gv[i] * v[i];
    }
    float a = warp_sum(s1) / (float)c;
    float bb = warp_sum(s2) / (float)c;
    T* dr = dx + row * c;
#pragma unroll
    for (int i = 0; i < V; ++i) {
        int j = lane + 32 * i;
        if (j < c) dr[j] = from_f<T>(rstd * (gv[i] - a - v[i] * bb));
    }
}

// Stage 1 of dw/db: block b, warp k handles rows b*W + k + n*(gridDim.x*W); per-lane register
// partial sums; the W warps are then combined in shared memory in a fixed order.
// part: [gridDim.x, 2, c] (dw then db). Dynamic shared memory: W*2*c floats.
template <typename T, int V>
__device__ void ln_bwd_wb_part(const T* __restrict__ x, const T* __restrict__ g, float* __restrict__ part,
                               long long rows, int c, float eps) {
    extern __shared__ float sm[];
    int W = blockDim.x >> 5;
    int warp = threadIdx.x >> 5;
    int lane = threadIdx.x & 31;
    float dw[V], db[V];
#pragma unroll
    for (int i = 0; i < V; ++i) { dw[i] = 0.f; db[i] = 0.f; }
    long long stride = (long long)gridDim.x * W;
    for (long long row = (long long)blockIdx.x * W + warp; row < rows; row += stride) {
        float v[V], gv[V];
        load_row<T, V>(x + row * c, c, lane, v);
        load_row<T, V>(g + row * c, c, lane, gv);
        float mean, rstd;
        row_stats<V>(v, c, lane, eps, mean, rstd);
#pragma unroll
        for (int i = 0; i < V; ++i) {
            dw[i] += gv[i] * ((v[i] - mean) * rstd);
            db[i] += gv[i];
        }
    }
#pragma unroll
    for (int i = 0; i < V; ++i) {
        int j = lane + 32 * i;
        if (j < c) {
            sm[(warp * 2) * c + j] = dw[i];
            sm[(warp * 2 + 1) * c + j] = db[i];
        }
    }
    __syncthreads();
    for (int t = threadIdx.x; t < 2 * c; t += blockDim.x) {
        int which = t / c, j = t - which * c;
        float s = 0.f;
        for (int k = 0; k < W; ++k) s += sm[(k * 2 + which) * c + j];
        part[(long long)blockIdx.x * 2 * c + t] = s;
    }
}

extern "C" __global__ void ln_bwd_wb_final(const float* __restrict__ part, float* __restrict__ out,
                                           int nblk, int n) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= n) return;
    float s = 0.f;
    for (int k = 0; k < nblk; ++k) s += part[(long long)k * n + t];
    out[t] = s;
}

#define LN_INST(T, TN, V)                                                                          \
    extern "C" __global__ void ln_fwd_##TN##_##V(const T* x, const float* w, const float* b, T* y,   \
                                                 long long rows, int c, float eps) {                \
        ln_fwd<T, V>(x, w, b, y, rows, c, eps);                                                    \
    }                                                                                              \
    extern "C" __global__ void ln_bwd_dx_##TN##_##V(const T* x, const float* w, const T* g, T* dx,  \
                                                    long long rows, int c, float eps) {             \
        ln_bwd_dx<T, V>(x, w, g, dx, rows, c, eps);                                                \
    }                                                                                              \
    extern "C" __global__ void ln_bwd_wb_part_##TN##_##V(const T* x, const T* g, float* part,      \
                                                         long long rows, int c, float eps) {        \
        ln_bwd_wb_part<T, V>(x, g, part, rows, c, eps);                                            \
    }
#define LN_ALL(T, TN) LN_INST(T, TN, 1) LN_INST(T, TN, 2) LN_INST(T, TN, 4) LN_INST(T, TN, 8) \
    LN_INST(T, TN, 16) LN_INST(T, TN, 32)
LN_ALL(float, f32)
LN_ALL(bf16, bf16)
"#
);

/// Fused LayerNorm of `x` `[*, c]` with f32 `w`, `b` `[c]` when it applies (CUDA tensor, f32 or
/// bf16 `x`, `c ≤` [`MAX_C`]); `Ok(None)` otherwise (the caller then uses the composite twin).
/// `w`/`b` of another dtype are cast to f32 first (the gradient flows back through the cast).
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    {
        cuda::layer_norm(x, w, b, eps)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (x, w, b, eps);
        Ok(None)
    }
}

/// Backward of the fused LayerNorm for hand-written backward passes: from the input `x`, the
/// weight `w` (f32 or castable) and the cotangent `g` of the output, `dx` (in `x`'s dtype) and, if
/// `params`, `(dw, db)` in f32. `Ok(None)` when the kernel does not apply (see [`layer_norm`]).
#[allow(clippy::type_complexity)]
pub fn layer_norm_bwd(
    x: &Tensor,
    w: &Tensor,
    g: &Tensor,
    eps: f64,
    params: bool,
) -> Result<Option<(Tensor, Option<(Tensor, Tensor)>)>> {
    #[cfg(feature = "cuda")]
    {
        cuda::layer_norm_bwd(x, w, g, eps, params)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (x, w, g, eps, params);
        Ok(None)
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::{CudaDType, CudaStorage};
    use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
    use cudarc::driver::{CudaView, DeviceRepr, LaunchConfig, PushKernelArg};
    use half::bf16;

    use super::{MAX_C, MODULE, SRC};
    use crate::error::Result;
    use crate::kernels::launch::{cerr, dtype_suffix, func, values_per_lane, warp_rows};

    /// Warps per block of the row kernels.
    const WARPS: u32 = 8;
    /// Warps per block of the dw/db stage-1 kernel (shared memory: WARPS_WB · 2 · c floats).
    const WARPS_WB: u32 = 4;
    /// Most blocks of the dw/db stage-1 kernel.
    const MAX_WB_BLOCKS: usize = 512;

    pub(super) fn layer_norm(
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        eps: f64,
    ) -> Result<Option<Tensor>> {
        let c = x.dims().last().copied().unwrap_or(0);
        if !x.device().is_cuda()
            || dtype_suffix(x.dtype()).is_none()
            || x.rank() == 0
            || c == 0
            || c > MAX_C
            || w.dims() != [c]
            || b.dims() != [c]
        {
            return Ok(None);
        }
        let w = crate::model::primitives::cast(w, DType::F32)?;
        let b = crate::model::primitives::cast(b, DType::F32)?;
        let y = x.contiguous()?.apply_op3(
            &w.contiguous()?,
            &b.contiguous()?,
            LayerNormCuda { eps: eps as f32 },
        )?;
        Ok(Some(y))
    }

    #[allow(clippy::type_complexity)]
    pub(super) fn layer_norm_bwd(
        x: &Tensor,
        w: &Tensor,
        g: &Tensor,
        eps: f64,
        params: bool,
    ) -> Result<Option<(Tensor, Option<(Tensor, Tensor)>)>> {
        let c = x.dims().last().copied().unwrap_or(0);
        if !x.device().is_cuda()
            || !crate::kernels::fused_enabled()
            || dtype_suffix(x.dtype()).is_none()
            || x.rank() == 0
            || c == 0
            || c > MAX_C
            || w.dims() != [c]
            || g.dims() != x.dims()
        {
            return Ok(None);
        }
        let x = x.detach().contiguous()?;
        let w = crate::model::primitives::cast(&w.detach(), DType::F32)?.contiguous()?;
        let g = g.detach().to_dtype(x.dtype())?.contiguous()?;
        let eps = eps as f32;
        let dx = x.apply_op3(&w, &g, LayerNormBwdDx { eps })?;
        if !params {
            return Ok(Some((dx, None)));
        }
        let wb = x.apply_op2(&g, LayerNormBwdWb { eps })?; // [2, c] f32
        Ok(Some((dx, Some((wb.get(0)?, wb.get(1)?)))))
    }

    /// Contiguous view of a storage's slice of type `T`.
    fn view<'a, T: CudaDType>(
        s: &'a CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<CudaView<'a, T>> {
        let (a, e) = l
            .contiguous_offsets()
            .ok_or_else(|| cerr("layer norm kernel: operand not contiguous"))?;
        Ok(s.as_cuda_slice::<T>()?.slice(a..e))
    }

    /// Row count, channels and the kernel-name suffix `{dtype}_{values per lane}`.
    fn dims(l: &Layout, dt: DType) -> candle_core::Result<(i64, i32, String)> {
        let c = l.dims().last().copied().unwrap_or(0);
        let vpt = values_per_lane(c).ok_or_else(|| cerr("layer norm kernel: c > 1024"))?;
        let sfx = dtype_suffix(dt).ok_or_else(|| cerr("layer norm kernel: dtype"))?;
        Ok((
            (l.shape().elem_count() / c.max(1)) as i64,
            c as i32,
            format!("{sfx}_{vpt}"),
        ))
    }

    fn fwd<T: CudaDType + DeviceRepr>(
        eps: f32,
        (xs, xl): (&CudaStorage, &Layout),
        (ws, wl): (&CudaStorage, &Layout),
        (bs, bl): (&CudaStorage, &Layout),
    ) -> candle_core::Result<CudaStorage> {
        let dev = xs.device().clone();
        let (rows, c, sfx) = dims(xl, xs.dtype())?;
        let (x, w, b) = (
            view::<T>(xs, xl)?,
            view::<f32>(ws, wl)?,
            view::<f32>(bs, bl)?,
        );
        let f = func(&dev, MODULE, SRC, &format!("ln_fwd_{sfx}"))?;
        // SAFETY: every element is written (one warp per row covers its row).
        let y = unsafe { dev.alloc::<T>(xl.shape().elem_count())? };
        let stream = dev.cuda_stream();
        let mut a = stream.launch_builder(&f);
        a.arg(&x)
            .arg(&w)
            .arg(&b)
            .arg(&y)
            .arg(&rows)
            .arg(&c)
            .arg(&eps);
        // SAFETY: the arguments match the kernel signature.
        unsafe { a.launch(warp_rows(rows as usize, WARPS)) }.map_err(cerr)?;
        Ok(CudaStorage::wrap_cuda_slice(y, dev))
    }

    fn bwd_dx<T: CudaDType + DeviceRepr>(
        eps: f32,
        (xs, xl): (&CudaStorage, &Layout),
        (ws, wl): (&CudaStorage, &Layout),
        (gs, gl): (&CudaStorage, &Layout),
    ) -> candle_core::Result<CudaStorage> {
        let dev = xs.device().clone();
        let (rows, c, sfx) = dims(xl, xs.dtype())?;
        let (x, w, g) = (view::<T>(xs, xl)?, view::<f32>(ws, wl)?, view::<T>(gs, gl)?);
        let f = func(&dev, MODULE, SRC, &format!("ln_bwd_dx_{sfx}"))?;
        // SAFETY: every element is written (one warp per row covers its row).
        let dx = unsafe { dev.alloc::<T>(xl.shape().elem_count())? };
        let stream = dev.cuda_stream();
        let mut a = stream.launch_builder(&f);
        a.arg(&x)
            .arg(&w)
            .arg(&g)
            .arg(&dx)
            .arg(&rows)
            .arg(&c)
            .arg(&eps);
        // SAFETY: the arguments match the kernel signature.
        unsafe { a.launch(warp_rows(rows as usize, WARPS)) }.map_err(cerr)?;
        Ok(CudaStorage::wrap_cuda_slice(dx, dev))
    }

    fn bwd_wb<T: CudaDType + DeviceRepr>(
        eps: f32,
        (xs, xl): (&CudaStorage, &Layout),
        (gs, gl): (&CudaStorage, &Layout),
    ) -> candle_core::Result<CudaStorage> {
        let dev = xs.device().clone();
        let (rows, c, sfx) = dims(xl, xs.dtype())?;
        let cu = c as usize;
        let (x, g) = (view::<T>(xs, xl)?, view::<T>(gs, gl)?);
        // The row→block assignment depends only on the row count: reproducible sums.
        let nblk = (rows as usize)
            .div_ceil(WARPS_WB as usize)
            .clamp(1, MAX_WB_BLOCKS);
        let f = func(&dev, MODULE, SRC, &format!("ln_bwd_wb_part_{sfx}"))?;
        // SAFETY: each block writes its whole [2, c] slab.
        let part = unsafe { dev.alloc::<f32>(nblk * 2 * cu)? };
        let cfg = LaunchConfig {
            grid_dim: (nblk as u32, 1, 1),
            block_dim: (32 * WARPS_WB, 1, 1),
            shared_mem_bytes: WARPS_WB * 2 * c as u32 * 4,
        };
        let stream = dev.cuda_stream();
        let mut a = stream.launch_builder(&f);
        a.arg(&x).arg(&g).arg(&part).arg(&rows).arg(&c).arg(&eps);
        // SAFETY: the arguments match the kernel signature.
        unsafe { a.launch(cfg) }.map_err(cerr)?;
        let f2 = func(&dev, MODULE, SRC, "ln_bwd_wb_final")?;
        let n2 = 2 * cu;
        // SAFETY: one thread per output element.
        let out = unsafe { dev.alloc::<f32>(n2)? };
        let (nblk_i, n2_i) = (nblk as i32, n2 as i32);
        let mut a = stream.launch_builder(&f2);
        a.arg(&part).arg(&out).arg(&nblk_i).arg(&n2_i);
        // SAFETY: the arguments match the kernel signature.
        unsafe { a.launch(crate::kernels::nvrtc::grid_1d(n2, 256)) }.map_err(cerr)?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }

    fn no_cpu(name: &str) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("{name}: CUDA only")
    }

    /// Forward op: `(x, w, b) → y`.
    pub(super) struct LayerNormCuda {
        pub(super) eps: f32,
    }

    impl CustomOp3 for LayerNormCuda {
        fn name(&self) -> &'static str {
            "ff-layer-norm-cuda"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<(CpuStorage, Shape)> {
            no_cpu(self.name())
        }

        fn cuda_fwd(
            &self,
            xs: &CudaStorage,
            xl: &Layout,
            ws: &CudaStorage,
            wl: &Layout,
            bs: &CudaStorage,
            bl: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let args = ((xs, xl), (ws, wl), (bs, bl));
            let out = match xs.dtype() {
                DType::F32 => fwd::<f32>(self.eps, args.0, args.1, args.2)?,
                DType::BF16 => fwd::<bf16>(self.eps, args.0, args.1, args.2)?,
                dt => candle_core::bail!("{}: dtype {dt:?}", self.name()),
            };
            Ok((out, xl.shape().clone()))
        }

        fn bwd(
            &self,
            x: &Tensor,
            w: &Tensor,
            b: &Tensor,
            _res: &Tensor,
            g: &Tensor,
        ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            let params = w.track_op() || b.track_op();
            let (x, w) = (x.detach(), w.detach());
            let g = g.detach().to_dtype(x.dtype())?.contiguous()?;
            let dx = x.apply_op3(&w, &g, LayerNormBwdDx { eps: self.eps })?;
            if !params {
                return Ok((Some(dx), None, None));
            }
            let wb = x.apply_op2(&g, LayerNormBwdWb { eps: self.eps })?; // [2, c] f32
            Ok((Some(dx), Some(wb.get(0)?), Some(wb.get(1)?)))
        }
    }

    /// `(x, w, g) → dx`.
    struct LayerNormBwdDx {
        eps: f32,
    }

    impl CustomOp3 for LayerNormBwdDx {
        fn name(&self) -> &'static str {
            "ff-layer-norm-bwd-dx-cuda"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<(CpuStorage, Shape)> {
            no_cpu(self.name())
        }

        fn cuda_fwd(
            &self,
            xs: &CudaStorage,
            xl: &Layout,
            ws: &CudaStorage,
            wl: &Layout,
            gs: &CudaStorage,
            gl: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let args = ((xs, xl), (ws, wl), (gs, gl));
            let out = match xs.dtype() {
                DType::F32 => bwd_dx::<f32>(self.eps, args.0, args.1, args.2)?,
                DType::BF16 => bwd_dx::<bf16>(self.eps, args.0, args.1, args.2)?,
                dt => candle_core::bail!("{}: dtype {dt:?}", self.name()),
            };
            Ok((out, xl.shape().clone()))
        }
    }

    /// `(x, g) → [dw; db]` `[2, c]` f32, deterministic two-stage column reduction.
    struct LayerNormBwdWb {
        eps: f32,
    }

    impl CustomOp2 for LayerNormBwdWb {
        fn name(&self) -> &'static str {
            "ff-layer-norm-bwd-wb-cuda"
        }

        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<(CpuStorage, Shape)> {
            no_cpu(self.name())
        }

        fn cuda_fwd(
            &self,
            xs: &CudaStorage,
            xl: &Layout,
            gs: &CudaStorage,
            gl: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let c = xl.dims().last().copied().unwrap_or(0);
            let out = match xs.dtype() {
                DType::F32 => bwd_wb::<f32>(self.eps, (xs, xl), (gs, gl))?,
                DType::BF16 => bwd_wb::<bf16>(self.eps, (xs, xl), (gs, gl))?,
                dt => candle_core::bail!("{}: dtype {dt:?}", self.name()),
            };
            Ok((out, Shape::from((2, c))))
        }
    }
}
