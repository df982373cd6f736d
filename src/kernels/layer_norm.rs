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
//! - `ln_bwd_wb_part` + `ln_bwd_wb_final_cols`: `dw = Σ_rows g·x̂`, `db = Σ_rows g` as a
//!   deterministic two-stage reduction (fixed row→block assignment, fixed summation order, no
//!   atomics): every run gives the same bits. The second stage runs one block per 8 columns (the
//!   serial `ln_bwd_wb_final` on 1-2 blocks took ~21 µs) with the same per-column order, so its
//!   sums are bitwise those of `ln_bwd_wb_final` (kept for the GPU test that compares them).
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

// dx (as ln_bwd_dx) and the dw/db partials (as ln_bwd_wb_part) in one pass over x and g: the
// same row->(block, warp) assignment, the same per-row arithmetic, so dx and the partials are
// those of the two kernels (checked bitwise on the GPU); the next row's loads are issued before
// the current row's reductions (two rows in flight per warp).
template <typename T, int V>
__device__ void ln_bwd_all(const T* __restrict__ x, const float* __restrict__ w, const T* __restrict__ g,
                           T* __restrict__ dx, float* __restrict__ part, long long rows, int c, float eps) {
    extern __shared__ float sm[];
    int W = blockDim.x >> 5;
    int warp = threadIdx.x >> 5;
    int lane = threadIdx.x & 31;
    float dw[V], db[V], ww[V];
#pragma unroll
    for (int i = 0; i < V; ++i) {
        int j = lane + 32 * i;
        dw[i] = 0.f; db[i] = 0.f;
        ww[i] = j < c ? w[j] : 0.f;
    }
    long long stride = (long long)gridDim.x * W;
    long long row = (long long)blockIdx.x * W + warp;
    float v[V], gv[V];
    if (row < rows) {
        load_row<T, V>(x + row * c, c, lane, v);
        load_row<T, V>(g + row * c, c, lane, gv);
    }
    for (; row < rows; row += stride) {
        long long nrow = row + stride;
        float vn[V], gn[V];
        if (nrow < rows) {
            load_row<T, V>(x + nrow * c, c, lane, vn);
            load_row<T, V>(g + nrow * c, c, lane, gn);
        }
        float mean, rstd;
        row_stats<V>(v, c, lane, eps, mean, rstd);
        float s1 = 0.f, s2 = 0.f;
#pragma unroll
        for (int i = 0; i < V; ++i) {
            float xh = (v[i] - mean) * rstd;
            dw[i] += gv[i] * xh;
            db[i] += gv[i];
            float gw = gv[i] * ww[i];
            v[i] = xh;
            gv[i] = gw;
            s1 += gw;
            s2 += gw * xh;
        }
        float a = warp_sum(s1) / (float)c;
        float bb = warp_sum(s2) / (float)c;
        T* dr = dx + row * c;
#pragma unroll
        for (int i = 0; i < V; ++i) {
            int j = lane + 32 * i;
            if (j < c) dr[j] = from_f<T>(rstd * (gv[i] - a - v[i] * bb));
        }
        if (nrow < rows) {
#pragma unroll
            for (int i = 0; i < V; ++i) { v[i] = vn[i]; gv[i] = gn[i]; }
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

// Stage 2 parallel over columns: block b sums columns [8b, 8b + 8) of the [nblk, n] partials in
// the same order as the serial loop above (bitwise the same sums); all threads stage the
// partials in shared memory (chunks of 512 rows), then one thread per column adds them up.
#define WB_COLS 8
#define WB_CHUNK 512
extern "C" __global__ void ln_bwd_wb_final_cols(const float* __restrict__ part, float* __restrict__ out,
                                                int nblk, int n) {
    __shared__ float sm[WB_CHUNK * WB_COLS];
    int c0 = blockIdx.x * WB_COLS;
    float s = 0.f;
    for (int k0 = 0; k0 < nblk; k0 += WB_CHUNK) {
        int kn = min(WB_CHUNK, nblk - k0);
#pragma unroll 4
        for (int t = threadIdx.x; t < kn * WB_COLS; t += blockDim.x) {
            int k = t / WB_COLS, col = c0 + (t - k * WB_COLS);
            sm[t] = col < n ? part[(long long)(k0 + k) * n + col] : 0.f;
        }
        __syncthreads();
        if (threadIdx.x < WB_COLS) {
            // Unrolled so the shared-memory loads run ahead of the (ordered) adds.
#pragma unroll 16
            for (int k = 0; k < kn; ++k) s += sm[k * WB_COLS + threadIdx.x];
        }
        __syncthreads();
    }
    if (threadIdx.x < WB_COLS && c0 + (int)threadIdx.x < n) out[c0 + threadIdx.x] = s;
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
    }                                                                                              \
    extern "C" __global__ void ln_bwd_all_##TN##_##V(const T* x, const float* w, const T* g, T* dx, \
                                                     float* part, long long rows, int c, float eps) { \
        ln_bwd_all<T, V>(x, w, g, dx, part, rows, c, eps);                                         \
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

/// Whether the backward with parameter gradients runs the one-pass `ln_bwd_all` kernel (default)
/// or the separate dx and dw/db kernels ([`set_fused_backward`]).
static FUSED_BWD: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Switch the one-pass backward (dx + dw/db partials in one kernel) on or off for the process
/// (off: `ln_bwd_dx` then `ln_bwd_wb_part`; for A/B checks).
pub fn set_fused_backward(on: bool) {
    FUSED_BWD.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// See [`set_fused_backward`].
pub fn fused_backward() -> bool {
    FUSED_BWD.load(std::sync::atomic::Ordering::Relaxed)
}

/// The second stage of the weight/bias gradient reduction on f32 partials `part` `[nblk, n]`:
/// `out[j] = Σ_k part[k, j]` in order `k = 0, 1, ...`, by the column-parallel kernel the backward
/// uses (`cols`) or the serial one it replaced. CUDA only (`Ok(None)` elsewhere); for the GPU test
/// that compares both bitwise and the bench.
pub fn wb_final(part: &Tensor, cols: bool) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    {
        if !part.device().is_cuda() || part.rank() != 2 || part.dtype() != candle_core::DType::F32 {
            return Ok(None);
        }
        Ok(Some(cuda::wb_final(&part.contiguous()?, cols)?))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (part, cols);
        Ok(None)
    }
}

/// [`wb_final`]'s column-parallel kernel against the serial one (bitwise: tolerance 0) and
/// against candle's f32 sum over rows (the same sums up to order), at the backward's shapes
/// (`[512, 2c]`), an odd width and more than one 512-row chunk; and the one-pass backward
/// (`ln_bwd_all`) against the separate dx and dw/db kernels (bitwise, and bitwise reruns).
pub fn wb_final_self_check(dev: &candle_core::Device) -> Result<Vec<super::ElemCheck>> {
    let mut out = Vec::new();
    for (k, &(nblk, n)) in [
        (512usize, 512usize),
        (512, 256),
        (37, 203),
        (1100, 24),
        (1, 9),
    ]
    .iter()
    .enumerate()
    {
        let part = super::uniform_tensor(
            &[nblk, n],
            4.0,
            0x1bf1 + k as u64,
            candle_core::DType::F32,
            dev,
        )?;
        let missing = || crate::error::Error::Msg("wb_final: not a CUDA device".into());
        let new = wb_final(&part, true)?.ok_or_else(missing)?;
        let old = wb_final(&part, false)?.ok_or_else(missing)?;
        let diff = (&new - &old)?.abs()?.max(0)?.to_scalar::<f32>()? as f64;
        let new2 = wb_final(&part, true)?.ok_or_else(missing)?;
        let rerun = (&new - &new2)?.abs()?.max(0)?.to_scalar::<f32>()? as f64;
        out.push(super::ElemCheck {
            op: "ln wb final cols vs serial".into(),
            case: format!("[{nblk}, {n}] F32 (rerun diff {rerun:e})"),
            max_err: diff + rerun,
            tol: 0.0,
        });
        out.push(super::ElemCheck {
            op: "ln wb final vs candle sum".into(),
            case: format!("[{nblk}, {n}] F32"),
            max_err: super::rel_err(&new, &part.sum(0)?)?,
            tol: 1e-5,
        });
    }
    // The one-pass backward (dx + dw/db partials) against the separate kernels: bitwise.
    for (k, &(rows, c)) in [
        (4096usize, 256usize),
        (1000, 100),
        (37, 33),
        (3000, 200),
        (65536, 128),
    ]
    .iter()
    .enumerate()
    {
        for dt in [candle_core::DType::F32, candle_core::DType::BF16] {
            let seed = 0x1bf9 + 8 * k as u64;
            let x = super::uniform_tensor(&[rows, c], 2.0, seed, dt, dev)?;
            let g = super::uniform_tensor(&[rows, c], 1.0, seed ^ 1, dt, dev)?;
            let w =
                (super::uniform_tensor(&[c], 0.2, seed ^ 2, candle_core::DType::F32, dev)? + 1.0)?;
            let missing = || crate::error::Error::Msg("layer norm backward did not run".into());
            let run = |fused: bool| -> Result<(Tensor, Tensor, Tensor)> {
                set_fused_backward(fused);
                let out = layer_norm_bwd(&x, &w, &g, 1e-5, true)?.ok_or_else(missing)?;
                set_fused_backward(true);
                let (dx, wb) = out;
                let (dw, db) = wb.ok_or_else(missing)?;
                Ok((dx, dw, db))
            };
            let (a, b, r) = (run(true)?, run(false)?, run(true)?);
            let names = ["dx", "dw", "db"];
            let pa = [&a.0, &a.1, &a.2];
            let pb = [&b.0, &b.1, &b.2];
            let pr = [&r.0, &r.1, &r.2];
            for i in 0..3 {
                out.push(super::ElemCheck {
                    op: format!("ln bwd one-pass {} vs 2 kernels", names[i]),
                    case: format!("[{rows}, {c}] {dt:?}"),
                    max_err: super::rel_err(pa[i], pb[i])? + super::rel_err(pa[i], pr[i])?,
                    tol: 0.0,
                });
            }
        }
    }
    Ok(out)
}

/// Timings of the final reduction at the backward's shapes `[512, 2c]`: the
/// column-parallel kernel (fused) against the serial one (twin column); 50 back-to-back launches
/// per sample.
pub fn wb_final_bench_rows(
    dev: &candle_core::Device,
    iters: usize,
) -> Result<Vec<super::ElemBenchRow>> {
    let mut rows = Vec::new();
    for n in [512usize, 256] {
        let part = super::uniform_tensor(&[512, n], 1.0, 77, candle_core::DType::F32, dev)?;
        let fused_ms =
            super::median_ms_per_rep(dev, iters, 50, || wb_final(&part, true).map(|_| ()))?;
        let twin_ms =
            super::median_ms_per_rep(dev, iters, 50, || wb_final(&part, false).map(|_| ()))?;
        let (a, b) = (wb_final(&part, true)?, wb_final(&part, false)?);
        let max_err = match (a, b) {
            (Some(a), Some(b)) => super::rel_err(&a, &b)?,
            _ => f64::NAN,
        };
        rows.push(super::ElemBenchRow {
            op: "ln wb final (vs serial)".into(),
            case: format!("[512, {n}] F32"),
            fused_ms,
            twin_ms,
            max_err,
        });
    }
    // The whole backward with parameter gradients: one pass vs dx + dw/db kernels (twin column).
    for (nr, c) in [(65536usize, 128usize), (32768, 256)] {
        let dt = candle_core::DType::BF16;
        let x = super::uniform_tensor(&[nr, c], 2.0, 78, dt, dev)?;
        let g = super::uniform_tensor(&[nr, c], 1.0, 79, dt, dev)?;
        let w = super::uniform_tensor(&[c], 1.0, 80, candle_core::DType::F32, dev)?;
        let f = || layer_norm_bwd(&x, &w, &g, 1e-5, true).map(|_| ());
        set_fused_backward(true);
        let fused_ms = super::median_ms_per_rep(dev, iters, 10, f)?;
        set_fused_backward(false);
        let twin_ms = super::median_ms_per_rep(dev, iters, 10, f)?;
        set_fused_backward(true);
        let bytes = 3.0 * x.elem_count() as f64 * 2.0;
        rows.push(super::ElemBenchRow {
            op: "ln bwd one-pass (vs 2)".into(),
            case: format!(
                "[{nr}, {c}] BF16 {:.0} GB/s",
                bytes / (fused_ms * 1e-3) / 1e9
            ),
            fused_ms,
            twin_ms,
            max_err: 0.0,
        });
    }
    Ok(rows)
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
    use crate::kernels::permute::Contig;

    /// Warps per block of the row kernels.
    const WARPS: u32 = 8;
    /// Largest row length the one-pass backward `ln_bwd_all` takes (8 values per lane; longer
    /// rows would spill the two-row pipeline's registers).
    const ONE_PASS_MAX_C: usize = 256;

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
        let y = x.contig()?.apply_op3(
            &w.contig()?,
            &b.contig()?,
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
        let x = x.detach().contig()?;
        let w = crate::model::primitives::cast(&w.detach(), DType::F32)?.contig()?;
        let g = g.detach().to_dtype(x.dtype())?.contig()?;
        let eps = eps as f32;
        // One pass for rows of at most 256 (register budget of the two-row pipeline).
        if params && super::fused_backward() && c <= ONE_PASS_MAX_C {
            let (dx, wb) = bwd_all_t(eps, &x, &w, &g)?;
            return Ok(Some((dx, Some((wb.get(0)?, wb.get(1)?)))));
        }
        let dx = x.apply_op3(&w, &g, LayerNormBwdDx { eps })?;
        if !params {
            return Ok(Some((dx, None)));
        }
        let wb = x.apply_op2(&g, LayerNormBwdWb { eps })?; // [2, c] f32
        Ok(Some((dx, Some((wb.get(0)?, wb.get(1)?)))))
    }

    /// dx and `[2, c]` (dw, db) of contiguous `x`, `g` (`x`'s dtype) and f32 `w` in one pass over
    /// `x` and `g` (`ln_bwd_all`) plus the final column reduction.
    fn bwd_all_t(
        eps: f32,
        x: &Tensor,
        w: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        match x.dtype() {
            DType::F32 => bwd_all::<f32>(eps, x, w, g),
            DType::BF16 => bwd_all::<bf16>(eps, x, w, g),
            dt => candle_core::bail!("layer norm backward: dtype {dt:?}"),
        }
    }

    fn bwd_all<T: CudaDType + DeviceRepr>(
        eps: f32,
        x: &Tensor,
        w: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Tensor, Tensor)> {
        use crate::kernels::launch::{cuda_storage, tensor_from_slice};
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (gs, gl) = g.storage_and_layout();
        let (xs, ws, gs) = (cuda_storage(&xs)?, cuda_storage(&ws)?, cuda_storage(&gs)?);
        let dev = xs.device().clone();
        let (rows, c, sfx) = dims(xl, x.dtype())?;
        let cu = c as usize;
        let (xv, wv, gv) = (view::<T>(xs, xl)?, view::<f32>(ws, wl)?, view::<T>(gs, gl)?);
        // Same row→block assignment as `bwd_wb`: the same partial sums.
        let nblk = (rows as usize)
            .div_ceil(WARPS_WB as usize)
            .clamp(1, MAX_WB_BLOCKS);
        let f = func(&dev, MODULE, SRC, &format!("ln_bwd_all_{sfx}"))?;
        // SAFETY: every dx row is written by its warp; each block writes its whole [2, c] slab.
        let dx = unsafe { dev.alloc::<T>(xl.shape().elem_count())? };
        // SAFETY: as above.
        let part = unsafe { dev.alloc::<f32>(nblk * 2 * cu)? };
        let cfg = LaunchConfig {
            grid_dim: (nblk as u32, 1, 1),
            block_dim: (32 * WARPS_WB, 1, 1),
            shared_mem_bytes: WARPS_WB * 2 * c as u32 * 4,
        };
        let stream = dev.cuda_stream();
        let mut a = stream.launch_builder(&f);
        a.arg(&xv)
            .arg(&wv)
            .arg(&gv)
            .arg(&dx)
            .arg(&part)
            .arg(&rows)
            .arg(&c)
            .arg(&eps);
        // SAFETY: the arguments match the kernel signature.
        unsafe { a.launch(cfg) }.map_err(cerr)?;
        let wb = wb_final_launch(&dev, &part, nblk, 2 * cu)?;
        Ok((
            tensor_from_slice(dx, &dev, xl.shape()),
            tensor_from_slice(wb, &dev, &Shape::from((2, cu))),
        ))
    }

    /// `out[j] = Σ_k part[k, j]` of f32 partials `[nblk, n]` (`ln_bwd_wb_final_cols`).
    fn wb_final_launch(
        dev: &candle_core::cuda_backend::CudaDevice,
        part: &cudarc::driver::CudaSlice<f32>,
        nblk: usize,
        n: usize,
    ) -> candle_core::Result<cudarc::driver::CudaSlice<f32>> {
        let f2 = func(dev, MODULE, SRC, "ln_bwd_wb_final_cols")?;
        // SAFETY: every output element is written (one block per 8 columns).
        let out = unsafe { dev.alloc::<f32>(n)? };
        let (nblk_i, n_i) = (nblk as i32, n as i32);
        let stream = dev.cuda_stream();
        let mut a = stream.launch_builder(&f2);
        a.arg(part).arg(&out).arg(&nblk_i).arg(&n_i);
        // One block per 8 columns (`WB_COLS` in the source).
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(8) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: the arguments match the kernel signature.
        unsafe { a.launch(cfg) }.map_err(cerr)?;
        Ok(out)
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
        let out = wb_final_launch(&dev, &part, nblk, 2 * cu)?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }

    /// See [`super::wb_final`] (`part` contiguous f32 `[nblk, n]`).
    pub(super) fn wb_final(part: &Tensor, cols: bool) -> candle_core::Result<Tensor> {
        use candle_core::cuda_backend::WrapErr;
        let (nblk, n) = part.dims2()?;
        let (st, l) = part.storage_and_layout();
        let st = crate::kernels::launch::cuda_storage(&st)?;
        let dev = st.device().clone();
        let pv = view::<f32>(st, l)?;
        let name = if cols {
            "ln_bwd_wb_final_cols"
        } else {
            "ln_bwd_wb_final"
        };
        let f = func(&dev, MODULE, SRC, name)?;
        // SAFETY: every output element is written.
        let out = unsafe { dev.alloc::<f32>(n)? };
        let (nblk_i, n_i) = (nblk as i32, n as i32);
        let cfg = if cols {
            LaunchConfig {
                grid_dim: (n.div_ceil(8) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            }
        } else {
            crate::kernels::nvrtc::grid_1d(n, 256)
        };
        let stream = dev.cuda_stream();
        let mut a = stream.launch_builder(&f);
        a.arg(&pv).arg(&out).arg(&nblk_i).arg(&n_i);
        // SAFETY: the arguments match the kernel signature.
        unsafe { a.launch(cfg) }.w()?;
        Ok(crate::kernels::launch::tensor_from_slice(
            out,
            &dev,
            &Shape::from(n),
        ))
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
            let g = g.detach().to_dtype(x.dtype())?.contig()?;
            let c = x.dims().last().copied().unwrap_or(0);
            if params && super::fused_backward() && c <= ONE_PASS_MAX_C {
                let w32 = crate::model::primitives::cast(&w, DType::F32).map_err(cerr)?;
                let (dx, wb) = bwd_all_t(self.eps, &x.contiguous()?, &w32.contiguous()?, &g)?;
                return Ok((Some(dx), Some(wb.get(0)?), Some(wb.get(1)?)));
            }
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
