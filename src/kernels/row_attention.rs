//! Fused attention core for small heads with a key mask and a pair bias: the MSA row attention
//! of the extra-MSA stack (AF2 supplement Algorithm 7 inside Algorithm 18: 8 heads × c 8 over
//! 1024 rows of 256 residues), flash-attention style (Dao et al. 2022: online softmax, the
//! `[B, H, N, N]` probabilities are never stored; the backward recomputes them from the saved
//! softmax statistics).
//!
//! Layouts (no head split/merge copies): the joint projection `y` `[B·N, 4·H·C]` holds the
//! (already scaled) queries, keys, values and gate logits per row (`[q | k | v | g]`, head `h`
//! at columns `h·C..`); the outputs and the output cotangent use the merged-head layout
//! `[B·N, H·C]`. The mask is `[B, N]` (0/1; bias `inf·(mask − 1)` on the keys), the pair bias
//! `[H, N, N]` (shared over `B`).
//!
//! Kernels (fp32 math, deterministic: every sum has a fixed order, no atomics):
//! - `ra_fwd`: one block per `(b, h)`, keys and values in shared memory, one thread per query:
//!   `o` and the softmax statistics (row max, log denominator; f32).
//! - `ra_bwd_qkv`: one block per `(b, h)`: `dq` (thread per query), then `dk`, `dv` (thread per
//!   key), and `D = Σ_c dO·O` per query for the next kernel.
//! - `ra_bwd_bias`: the pair-bias gradient `Σ_b dS` as per-chunk partial sums over `b` (grid
//!   `(query tiles, H, chunks)`, thread per key), summed over the chunks afterwards.
//!
//! Status: correct (GPU tests vs the twin, f32 ~1e-6) but OPT-IN (`FERROFOLD_FUSED_ROW_ATTN=1`):
//! on H100 at 1024 × 256 × 8 heads × c 8 (bf16) `ra_fwd` takes 3.0 ms, `ra_bwd_qkv` 4.6 ms and
//! `ra_bwd_bias` 3.5 ms (~60 GB/s: bound by scalar FP32 issue, accurate `expf` and shared-memory
//! loads), slower than the composite path (cuBLAS + fused softmax, ~8 ms for the same work). A
//! tensor-core (mma, c padded to 16) formulation would be needed to win; the memory saving
//! (~1.4 GB per extra-MSA block, no `[S, H, R, R]` probabilities) is real.
//!
//! The plain-candle twin [`row_attention_twin`] computes the same with candle ops (logits, biased
//! softmax, values) and is differentiable by autograd; `tests/gpu_row_attention.rs` compares
//! both directions on the GPU.

use candle_core::{DType, Tensor, D};

use crate::error::Result;

/// NVRTC module name.
pub const MODULE: &str = "ferrofold_row_attn";

/// Head widths the kernels are compiled for.
pub const HEAD_WIDTHS: [usize; 2] = [8, 16];

/// Query rows per block of `ra_bwd_bias`.
pub const BIAS_TILE: usize = 16;

/// CUDA C source.
#[cfg(feature = "cuda")]
pub const SOURCE: &str = concat!(
    crate::ff_cuda_prelude!(),
    r#"
#define BT 16
__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
// y: [B*N, 4*H*C]; mask: [B, N]; pb: [H, N, N]; o: [B*N, H*C]; lse: [B*H*N, 2] = (row max m,
// log sum exp(s - m)): p = exp((s - m) - log l) stays exact when |m| is huge (fully masked rows).
template <typename T, int C>
__device__ __forceinline__ void ra_fwd(const T* __restrict__ y, const T* __restrict__ mask,
        const T* __restrict__ pb, T* __restrict__ o, float* __restrict__ lse,
        int N, int H, float inf) {
    extern __shared__ float sm[];
    float* Ks = sm;
    float* Vs = sm + N * C;
    float* Mb = sm + 2 * N * C;
    const int bh = blockIdx.x, b = bh / H, h = bh % H;
    const size_t ld = 4 * (size_t)H * C;
    const T* yb = y + (size_t)b * N * ld;
    for (int t = threadIdx.x; t < N * C; t += blockDim.x) {
        const int j = t / C, c = t % C;
        Ks[t] = to_f(yb[j * ld + H * C + h * C + c]);
        Vs[t] = to_f(yb[j * ld + 2 * H * C + h * C + c]);
    }
    for (int j = threadIdx.x; j < N; j += blockDim.x)
        Mb[j] = to_f(mask[(size_t)b * N + j]) * inf - inf;
    __syncthreads();
    for (int i = threadIdx.x; i < N; i += blockDim.x) {
        float q[C], acc[C];
#pragma unroll
        for (int c = 0; c < C; c++) { q[c] = to_f(yb[i * ld + h * C + c]); acc[c] = 0.f; }
        const T* pr = pb + ((size_t)h * N + i) * N;
        float m = -FF_INF, l = 0.f;
        for (int j0 = 0; j0 < N; j0 += 32) {
            float s[32];
            float cm = m;
#pragma unroll
            for (int jj = 0; jj < 32; jj++) {
                const int j = j0 + jj;
                if (j < N) {
                    float v = Mb[j] + to_f(pr[j]);
#pragma unroll
                    for (int c = 0; c < C; c++) v = fmaf(q[c], Ks[j * C + c], v);
                    s[jj] = v;
                    cm = fmaxf(cm, v);
                }
            }
            const float sc = expf(m - cm);
            l *= sc;
#pragma unroll
            for (int c = 0; c < C; c++) acc[c] *= sc;
#pragma unroll
            for (int jj = 0; jj < 32; jj++) {
                const int j = j0 + jj;
                if (j < N) {
                    const float p = expf(s[jj] - cm);
                    l += p;
#pragma unroll
                    for (int c = 0; c < C; c++) acc[c] = fmaf(p, Vs[j * C + c], acc[c]);
                }
            }
            m = cm;
        }
        const float inv = 1.f / l;
        T* orow = o + ((size_t)b * N + i) * H * C + h * C;
#pragma unroll
        for (int c = 0; c < C; c++) orow[c] = from_f<T>(acc[c] * inv);
        lse[2 * ((size_t)bh * N + i)] = m;
        lse[2 * ((size_t)bh * N + i) + 1] = logf(l);
    }
}

// Gradients of q, k, v (merged layout [B*N, H*C] each) and D = sum_c dO*O [B*H*N].
template <typename T, int C>
__device__ __forceinline__ void ra_bwd_qkv(const T* __restrict__ y, const T* __restrict__ mask,
        const T* __restrict__ pb, const T* __restrict__ o, const float* __restrict__ lse,
        const T* __restrict__ dout, T* __restrict__ dq, T* __restrict__ dk, T* __restrict__ dv,
        float* __restrict__ dd, int N, int H, float inf) {
    extern __shared__ float sm[];
    float* Qs = sm;
    float* Ks = Qs + N * C;
    float* Vs = Ks + N * C;
    float* Gs = Vs + N * C;   // dO
    float* Ls = Gs + N * C;   // (m, log l) pairs
    float* Ds = Ls + 2 * N;   // D
    float* Mb = Ds + N;
    const int bh = blockIdx.x, b = bh / H, h = bh % H;
    const size_t ld = 4 * (size_t)H * C, lo = (size_t)H * C;
    const T* yb = y + (size_t)b * N * ld;
    for (int t = threadIdx.x; t < N * C; t += blockDim.x) {
        const int j = t / C, c = t % C;
        Qs[t] = to_f(yb[j * ld + h * C + c]);
        Ks[t] = to_f(yb[j * ld + H * C + h * C + c]);
        Vs[t] = to_f(yb[j * ld + 2 * H * C + h * C + c]);
        Gs[t] = to_f(dout[((size_t)b * N + j) * lo + h * C + c]);
    }
    for (int j = threadIdx.x; j < N; j += blockDim.x) {
        Mb[j] = to_f(mask[(size_t)b * N + j]) * inf - inf;
        Ls[2 * j] = lse[2 * ((size_t)bh * N + j)];
        Ls[2 * j + 1] = lse[2 * ((size_t)bh * N + j) + 1];
        const T* orow = o + ((size_t)b * N + j) * lo + h * C;
        const T* grow = dout + ((size_t)b * N + j) * lo + h * C;
        float d = 0.f;
#pragma unroll
        for (int c = 0; c < C; c++) d = fmaf(to_f(grow[c]), to_f(orow[c]), d);
        Ds[j] = d;
        dd[(size_t)bh * N + j] = d;
    }
    __syncthreads();
    // dq_i = sum_j p_ij (dp_ij - D_i) k_j (thread per query).
    for (int i = threadIdx.x; i < N; i += blockDim.x) {
        float q[C], g[C], acc[C];
#pragma unroll
        for (int c = 0; c < C; c++) { q[c] = Qs[i * C + c]; g[c] = Gs[i * C + c]; acc[c] = 0.f; }
        const float mi = Ls[2 * i], li = Ls[2 * i + 1], di = Ds[i];
        const T* pr = pb + ((size_t)h * N + i) * N;
        for (int j = 0; j < N; j++) {
            float s = Mb[j] + to_f(pr[j]), dp = 0.f;
#pragma unroll
            for (int c = 0; c < C; c++) { s = fmaf(q[c], Ks[j * C + c], s); dp = fmaf(g[c], Vs[j * C + c], dp); }
            const float ds = expf((s - mi) - li) * (dp - di);
#pragma unroll
            for (int c = 0; c < C; c++) acc[c] = fmaf(ds, Ks[j * C + c], acc[c]);
        }
        T* row = dq + ((size_t)b * N + i) * lo + h * C;
#pragma unroll
        for (int c = 0; c < C; c++) row[c] = from_f<T>(acc[c]);
    }
    // dk_j = sum_i ds_ij q_i, dv_j = sum_i p_ij dO_i (thread per key).
    for (int j = threadIdx.x; j < N; j += blockDim.x) {
        float k[C], v[C], ak[C], av[C];
#pragma unroll
        for (int c = 0; c < C; c++) { k[c] = Ks[j * C + c]; v[c] = Vs[j * C + c]; ak[c] = 0.f; av[c] = 0.f; }
        const float mj = Mb[j];
        const T* pc = pb + (size_t)h * N * N + j;
        for (int i = 0; i < N; i++) {
            float s = mj + to_f(pc[(size_t)i * N]), dp = 0.f;
#pragma unroll
            for (int c = 0; c < C; c++) { s = fmaf(Qs[i * C + c], k[c], s); dp = fmaf(Gs[i * C + c], v[c], dp); }
            const float p = expf((s - Ls[2 * i]) - Ls[2 * i + 1]);
            const float ds = p * (dp - Ds[i]);
#pragma unroll
            for (int c = 0; c < C; c++) { ak[c] = fmaf(ds, Qs[i * C + c], ak[c]); av[c] = fmaf(p, Gs[i * C + c], av[c]); }
        }
        T* rk = dk + ((size_t)b * N + j) * lo + h * C;
        T* rv = dv + ((size_t)b * N + j) * lo + h * C;
#pragma unroll
        for (int c = 0; c < C; c++) { rk[c] = from_f<T>(ak[c]); rv[c] = from_f<T>(av[c]); }
    }
}

// Partial pair-bias gradients part[chunk, h, i, j] = sum_{b in chunk} dS[b, h, i, j].
// Grid (ceil(N / BT), H, chunks), threads over keys j.
template <typename T, int C>
__device__ __forceinline__ void ra_bwd_bias(const T* __restrict__ y, const T* __restrict__ mask,
        const T* __restrict__ pb, const float* __restrict__ lse, const float* __restrict__ dd,
        const T* __restrict__ dout, float* __restrict__ part, int B, int N, int H, int chunk,
        float inf) {
    __shared__ float Qs[BT * C], Gs[BT * C], Ls[2 * BT], Ds[BT];
    const int i0 = blockIdx.x * BT, h = blockIdx.y, ch = blockIdx.z;
    const int b0 = ch * chunk, b1 = imin(B, b0 + chunk);
    const int ni = imin(BT, N - i0);
    const size_t ld = 4 * (size_t)H * C, lo = (size_t)H * C;
    for (int jb = 0; jb < N; jb += blockDim.x) {
        const int j = jb + threadIdx.x;
        const bool live = j < N;
        float acc[BT], pbv[BT];
#pragma unroll
        for (int ii = 0; ii < BT; ii++) {
            acc[ii] = 0.f;
            pbv[ii] = (live && ii < ni) ? to_f(pb[((size_t)h * N + i0 + ii) * N + j]) : 0.f;
        }
        for (int b = b0; b < b1; b++) {
            __syncthreads();
            for (int t = threadIdx.x; t < ni * C; t += blockDim.x) {
                const int ii = t / C, c = t % C;
                const size_t r = (size_t)b * N + i0 + ii;
                Qs[t] = to_f(y[r * ld + h * C + c]);
                Gs[t] = to_f(dout[r * lo + h * C + c]);
            }
            for (int ii = threadIdx.x; ii < ni; ii += blockDim.x) {
                Ls[2 * ii] = lse[2 * (((size_t)b * H + h) * N + i0 + ii)];
                Ls[2 * ii + 1] = lse[2 * (((size_t)b * H + h) * N + i0 + ii) + 1];
                Ds[ii] = dd[((size_t)b * H + h) * N + i0 + ii];
            }
            __syncthreads();
            if (!live) continue;
            float k[C], v[C];
            const size_t rj = ((size_t)b * N + j) * ld;
#pragma unroll
            for (int c = 0; c < C; c++) { k[c] = to_f(y[rj + H * C + h * C + c]); v[c] = to_f(y[rj + 2 * H * C + h * C + c]); }
            const float mj = to_f(mask[(size_t)b * N + j]) * inf - inf;
#pragma unroll
            for (int ii = 0; ii < BT; ii++) {
                if (ii < ni) {
                    float s = mj + pbv[ii], dp = 0.f;
#pragma unroll
                    for (int c = 0; c < C; c++) { s = fmaf(Qs[ii * C + c], k[c], s); dp = fmaf(Gs[ii * C + c], v[c], dp); }
                    acc[ii] += expf((s - Ls[2 * ii]) - Ls[2 * ii + 1]) * (dp - Ds[ii]);
                }
            }
        }
        if (live) {
#pragma unroll
            for (int ii = 0; ii < BT; ii++)
                if (ii < ni) part[(((size_t)ch * H + h) * N + i0 + ii) * N + j] = acc[ii];
        }
    }
}

#define RA(SUF, T, C) \
extern "C" __global__ void ra_fwd_##SUF##_c##C(const T* y, const T* mask, const T* pb, T* o, float* lse, \
        int N, int H, float inf) { ra_fwd<T, C>(y, mask, pb, o, lse, N, H, inf); } \
extern "C" __global__ void ra_bwd_qkv_##SUF##_c##C(const T* y, const T* mask, const T* pb, const T* o, \
        const float* lse, const T* dout, T* dq, T* dk, T* dv, float* dd, int N, int H, float inf) { \
    ra_bwd_qkv<T, C>(y, mask, pb, o, lse, dout, dq, dk, dv, dd, N, H, inf); } \
extern "C" __global__ void ra_bwd_bias_##SUF##_c##C(const T* y, const T* mask, const T* pb, \
        const float* lse, const float* dd, const T* dout, float* part, int B, int N, int H, int chunk, \
        float inf) { ra_bwd_bias<T, C>(y, mask, pb, lse, dd, dout, part, B, N, H, chunk, inf); }
RA(f32, float, 8)
RA(bf16, bf16, 8)
RA(f32, float, 16)
RA(bf16, bf16, 16)
"#
);

/// Shared-memory bytes of `ra_bwd_qkv` (the larger of the two per-`(b, h)` kernels).
pub fn smem_bytes(n: usize, c: usize) -> usize {
    4 * n * (4 * c + 4)
}

/// Whether the fused kernels take this problem: a CUDA device with the fused kernels on, the
/// fused row attention switched on ([`enabled`]; OFF by default), f32/bf16, a compiled head
/// width, and the per-`(b, h)` tiles fitting the default 48 KiB of shared memory (`n ≤ 340` at
/// `c = 8`).
pub fn applies(y: &Tensor, n: usize, c: usize) -> bool {
    crate::kernels::fused_for(y)
        && enabled()
        && HEAD_WIDTHS.contains(&c)
        && smem_bytes(n, c) <= 48 * 1024
        && n > 0
}

/// Process-wide switch: 0 = not decided yet (read `FERROFOLD_FUSED_ROW_ATTN`), 1 = on, 2 = off.
static ROW_ATTN: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Force the fused row attention on or off for the whole process (overrides
/// `FERROFOLD_FUSED_ROW_ATTN`).
pub fn set_enabled(on: bool) {
    ROW_ATTN.store(if on { 1 } else { 2 }, std::sync::atomic::Ordering::Relaxed);
}

/// Whether the fused row attention may be used. OFF by default: measured on H100 at the
/// extra-MSA shape (1024 × 256, 8 heads × c 8, bf16) these scalar-FP32 kernels take 3.0 ms
/// (forward) + 4.6 + 3.5 ms (backward) against ~8 ms for the composite cuBLAS + fused-softmax
/// path (block forward+backward 27.2 ms vs 23.4 ms), though they keep ~1.4 GB less per block.
/// `FERROFOLD_FUSED_ROW_ATTN=1` (or `true`/`on`) or [`set_enabled`] turns it on.
pub fn enabled() -> bool {
    match ROW_ATTN.load(std::sync::atomic::Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let on = matches!(
                std::env::var("FERROFOLD_FUSED_ROW_ATTN").as_deref(),
                Ok("1") | Ok("true") | Ok("on")
            );
            set_enabled(on);
            on
        }
    }
}

/// Plain-candle twin of [`row_attention_fwd`]: `(o [B·N, H·C], stats [B·H·N, 2] f32)` from the joint
/// projection `y` `[B·N, 4·H·C]`, `mask` `[B, N]` and the pair bias `pb` `[H, N, N]` (any
/// leading 1s), differentiable in `y` and `pb` (softmax through candle's `softmax`).
pub fn row_attention_twin(
    y: &Tensor,
    mask: &Tensor,
    pb: &Tensor,
    h: usize,
    c: usize,
    inf: f64,
) -> Result<(Tensor, Tensor)> {
    let (b, n) = mask.dims2()?;
    let y5 = y.reshape((b, n, 4, h, c))?;
    let heads = |i: usize| -> Result<Tensor> {
        Ok(y5
            .narrow(2, i, 1)?
            .squeeze(2)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b * h, n, c))?)
    };
    let (q, k, v) = (heads(0)?, heads(1)?, heads(2)?);
    let mb = crate::model::primitives::mask_bias(&mask.to_dtype(y.dtype())?, inf)?
        .reshape((b, 1, 1, n))?;
    let logits = q
        .matmul(&k.t()?)?
        .reshape((b, h, n, n))?
        .broadcast_add(&mb)?
        .broadcast_add(&pb.reshape((1, h, n, n))?)?;
    let acc = if y.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let lf = logits.to_dtype(acc)?;
    let mx = lf.max_keepdim(D::Minus1)?.detach();
    let logl = lf
        .broadcast_sub(&mx)?
        .exp()?
        .sum_keepdim(D::Minus1)?
        .log()?;
    let stats = Tensor::cat(&[&mx, &logl], D::Minus1)?.reshape((b * h * n, 2))?;
    let a = candle_nn::ops::softmax(&lf, D::Minus1)?.to_dtype(y.dtype())?;
    let o = a
        .reshape((b * h, n, n))?
        .matmul(&v)?
        .reshape((b, h, n, c))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b * n, h * c))?;
    Ok((o, stats))
}

/// Fused forward: `(o [B·N, H·C], stats [B·H·N, 2] f32)` with `stats` the per-query row max of
/// the logits and the log of the softmax denominator; `Ok(None)` when [`applies`] is false.
/// `y` `[B·N, 4·H·C]`, `mask` `[B, N]`, `pb` `[1, H, N, N]` or `[H, N, N]`. No graph is built.
pub fn row_attention_fwd(
    y: &Tensor,
    mask: &Tensor,
    pb: &Tensor,
    h: usize,
    c: usize,
    inf: f64,
) -> Result<Option<(Tensor, Tensor)>> {
    let (b, n) = mask.dims2()?;
    if !applies(y, n, c) || y.dims() != [b * n, 4 * h * c] || pb.elem_count() != h * n * n {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    {
        let dt = y.dtype();
        let y = y.detach().contiguous()?;
        let mask = mask.detach().to_dtype(dt)?.contiguous()?;
        let pb = pb.detach().to_dtype(dt)?.contiguous()?;
        let r = match dt {
            DType::F32 => cuda::fwd::<f32>(&y, &mask, &pb, b, n, h, c, inf)?,
            DType::BF16 => cuda::fwd::<half::bf16>(&y, &mask, &pb, b, n, h, c, inf)?,
            _ => return Ok(None),
        };
        Ok(Some(r))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = inf;
        Ok(None)
    }
}

/// Gradients of [`row_attention_fwd`] for the cotangent `d_o` `[B·N, H·C]`:
/// `(dq, dk, dv)` each `[B·N, H·C]` (w.r.t. the scaled queries, keys, values in `y`) and the pair
/// bias gradient `[H, N, N]` (all in `y`'s dtype); `Ok(None)` when [`applies`] is false.
#[allow(clippy::too_many_arguments)]
pub fn row_attention_bwd(
    y: &Tensor,
    mask: &Tensor,
    pb: &Tensor,
    o: &Tensor,
    lse: &Tensor,
    d_o: &Tensor,
    h: usize,
    c: usize,
    inf: f64,
) -> Result<Option<[Tensor; 4]>> {
    let (b, n) = mask.dims2()?;
    if !applies(y, n, c) || y.dims() != [b * n, 4 * h * c] || pb.elem_count() != h * n * n {
        return Ok(None);
    }
    #[cfg(feature = "cuda")]
    {
        let dt = y.dtype();
        let y = y.detach().contiguous()?;
        let mask = mask.detach().to_dtype(dt)?.contiguous()?;
        let pb = pb.detach().to_dtype(dt)?.contiguous()?;
        let o = o.detach().to_dtype(dt)?.contiguous()?;
        let d_o = d_o.detach().to_dtype(dt)?.contiguous()?;
        let lse = lse.detach().to_dtype(DType::F32)?.contiguous()?;
        let a = cuda::BwdArgs {
            y: &y,
            mask: &mask,
            pb: &pb,
            o: &o,
            lse: &lse,
            d_o: &d_o,
            dims: (b, n, h, c),
            inf,
        };
        let r = match dt {
            DType::F32 => cuda::bwd::<f32>(&a)?,
            DType::BF16 => cuda::bwd::<half::bf16>(&a)?,
            _ => return Ok(None),
        };
        Ok(Some(r))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (o, lse, d_o, inf);
        Ok(None)
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{Shape, Tensor};
    use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};

    use super::super::launch::{cuda_storage, func, range, suffix, tensor_from_slice};
    use super::{smem_bytes, BIAS_TILE, MODULE, SOURCE};
    use crate::error::Result;

    /// Threads per block of the per-`(b, h)` kernels (one query or key per thread, looping).
    const THREADS: u32 = 256;

    #[allow(clippy::too_many_arguments)]
    pub(super) fn fwd<T: CudaDType + DeviceRepr>(
        y: &Tensor,
        mask: &Tensor,
        pb: &Tensor,
        b: usize,
        n: usize,
        h: usize,
        c: usize,
        inf: f64,
    ) -> Result<(Tensor, Tensor)> {
        let name = format!("ra_fwd_{}_c{c}", suffix(y.dtype())?);
        let (sy, ly) = y.storage_and_layout();
        let (sm, lm) = mask.storage_and_layout();
        let (sp, lp) = pb.storage_and_layout();
        let (sy, sm, sp) = (cuda_storage(&sy)?, cuda_storage(&sm)?, cuda_storage(&sp)?);
        let dev = sy.device();
        let f = func(dev, MODULE, SOURCE, &name)?;
        let yv = sy.as_cuda_slice::<T>()?.slice(range(ly)?);
        let mv = sm.as_cuda_slice::<T>()?.slice(range(lm)?);
        let pv = sp.as_cuda_slice::<T>()?.slice(range(lp)?);
        // SAFETY: every element is written by the kernel (each (b, h, i) once).
        let mut o: CudaSlice<T> = unsafe { dev.alloc::<T>(b * n * h * c)? };
        let mut lse: CudaSlice<f32> = unsafe { dev.alloc::<f32>(2 * b * h * n)? };
        let (ni, hi, infv) = (n as i32, h as i32, inf as f32);
        let cfg = LaunchConfig {
            grid_dim: ((b * h) as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: (4 * n * (2 * c + 1)) as u32,
        };
        let stream = dev.cuda_stream();
        let mut lb = stream.launch_builder(&f);
        lb.arg(&yv)
            .arg(&mv)
            .arg(&pv)
            .arg(&mut o)
            .arg(&mut lse)
            .arg(&ni)
            .arg(&hi)
            .arg(&infv);
        // SAFETY: argument types match the kernel; `y` holds B·N rows of 4·H·C, `mask` B·N,
        // `pb` H·N·N elements (checked by the caller), outputs as allocated.
        unsafe { lb.launch(cfg) }.w()?;
        Ok((
            tensor_from_slice(o, dev, &Shape::from((b * n, h * c))),
            tensor_from_slice(lse, dev, &Shape::from((b * h * n, 2))),
        ))
    }

    pub(super) struct BwdArgs<'a> {
        pub y: &'a Tensor,
        pub mask: &'a Tensor,
        pub pb: &'a Tensor,
        pub o: &'a Tensor,
        pub lse: &'a Tensor,
        pub d_o: &'a Tensor,
        pub dims: (usize, usize, usize, usize),
        pub inf: f64,
    }

    pub(super) fn bwd<T: CudaDType + DeviceRepr>(a: &BwdArgs<'_>) -> Result<[Tensor; 4]> {
        let (b, n, h, c) = a.dims;
        let suf = suffix(a.y.dtype())?;
        let (sy, ly) = a.y.storage_and_layout();
        let (sm, lm) = a.mask.storage_and_layout();
        let (sp, lp) = a.pb.storage_and_layout();
        let (so, lo) = a.o.storage_and_layout();
        let (sl, ll) = a.lse.storage_and_layout();
        let (sg, lg) = a.d_o.storage_and_layout();
        let (sy, sm, sp) = (cuda_storage(&sy)?, cuda_storage(&sm)?, cuda_storage(&sp)?);
        let (so, sl, sg) = (cuda_storage(&so)?, cuda_storage(&sl)?, cuda_storage(&sg)?);
        let dev = sy.device();
        let yv = sy.as_cuda_slice::<T>()?.slice(range(ly)?);
        let mv = sm.as_cuda_slice::<T>()?.slice(range(lm)?);
        let pv = sp.as_cuda_slice::<T>()?.slice(range(lp)?);
        let ov = so.as_cuda_slice::<T>()?.slice(range(lo)?);
        let lv = sl.as_cuda_slice::<f32>()?.slice(range(ll)?);
        let gv = sg.as_cuda_slice::<T>()?.slice(range(lg)?);
        let rows = b * n * h * c;
        // SAFETY: every element of each output is written by the kernels.
        let mut dq: CudaSlice<T> = unsafe { dev.alloc::<T>(rows)? };
        let mut dk: CudaSlice<T> = unsafe { dev.alloc::<T>(rows)? };
        let mut dv: CudaSlice<T> = unsafe { dev.alloc::<T>(rows)? };
        let mut dd: CudaSlice<f32> = unsafe { dev.alloc::<f32>(b * h * n)? };
        let (ni, hi, bi, infv) = (n as i32, h as i32, b as i32, a.inf as f32);
        let stream = dev.cuda_stream();
        let f1 = func(dev, MODULE, SOURCE, &format!("ra_bwd_qkv_{suf}_c{c}"))?;
        let cfg1 = LaunchConfig {
            grid_dim: ((b * h) as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: smem_bytes(n, c) as u32,
        };
        let mut lb = stream.launch_builder(&f1);
        lb.arg(&yv)
            .arg(&mv)
            .arg(&pv)
            .arg(&ov)
            .arg(&lv)
            .arg(&gv)
            .arg(&mut dq)
            .arg(&mut dk)
            .arg(&mut dv)
            .arg(&mut dd)
            .arg(&ni)
            .arg(&hi)
            .arg(&infv);
        // SAFETY: argument types match the kernel; sizes as allocated / checked by the caller.
        unsafe { lb.launch(cfg1) }.w()?;
        // Pair-bias gradient: partial sums over chunks of `b`, then a fixed-order sum.
        let chunks = b.clamp(1, 16);
        let chunk = b.div_ceil(chunks);
        let chunks = b.div_ceil(chunk);
        let mut part: CudaSlice<f32> = unsafe { dev.alloc::<f32>(chunks * h * n * n)? };
        let f2 = func(dev, MODULE, SOURCE, &format!("ra_bwd_bias_{suf}_c{c}"))?;
        let threads = (n.div_ceil(32) * 32).min(THREADS as usize) as u32;
        let cfg2 = LaunchConfig {
            grid_dim: (n.div_ceil(BIAS_TILE) as u32, h as u32, chunks as u32),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        let chunk_i = chunk as i32;
        let mut lb = stream.launch_builder(&f2);
        lb.arg(&yv)
            .arg(&mv)
            .arg(&pv)
            .arg(&lv)
            .arg(&dd)
            .arg(&gv)
            .arg(&mut part)
            .arg(&bi)
            .arg(&ni)
            .arg(&hi)
            .arg(&chunk_i)
            .arg(&infv);
        // SAFETY: as above; `part` holds chunks·H·N·N f32, each written once.
        unsafe { lb.launch(cfg2) }.w()?;
        let sh = Shape::from((b * n, h * c));
        let part = tensor_from_slice(part, dev, &Shape::from((chunks, h, n, n)));
        let dpb = part.sum(0)?.to_dtype(a.y.dtype())?;
        Ok([
            tensor_from_slice(dq, dev, &sh),
            tensor_from_slice(dk, dev, &sh),
            tensor_from_slice(dv, dev, &sh),
            dpb,
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The twin against a direct f64 evaluation (loops) of masked, pair-biased softmax attention
    /// on the joint-projection layout, including a fully masked batch element.
    #[test]
    fn twin_matches_direct_evaluation() {
        let (b, n, h, c) = (3usize, 5usize, 2usize, 4usize);
        let dev = Device::Cpu;
        let y = Tensor::randn(0f64, 1.0, (b * n, 4 * h * c), &dev).unwrap();
        let pb = Tensor::randn(0f64, 1.0, (1, h, n, n), &dev).unwrap();
        let mv: Vec<f64> = (0..b * n)
            .map(|i| if i < n || i % 4 == 1 { 0.0 } else { 1.0 })
            .collect();
        let mask = Tensor::from_vec(mv.clone(), (b, n), &dev).unwrap();
        let inf = 1e9;
        let (o, stats) = row_attention_twin(&y, &mask, &pb, h, c, inf).unwrap();
        let yv = y.to_vec2::<f64>().unwrap();
        let pv = pb.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let ov = o.to_vec2::<f64>().unwrap();
        let sv = stats.to_vec2::<f64>().unwrap();
        for bi in 0..b {
            for hi in 0..h {
                for i in 0..n {
                    let s: Vec<f64> = (0..n)
                        .map(|j| {
                            let q = &yv[bi * n + i][hi * c..hi * c + c];
                            let k = &yv[bi * n + j][h * c + hi * c..h * c + hi * c + c];
                            let dot: f64 = q.iter().zip(k).map(|(a, b)| a * b).sum();
                            dot + inf * (mv[bi * n + j] - 1.0) + pv[(hi * n + i) * n + j]
                        })
                        .collect();
                    let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let l: f64 = s.iter().map(|v| (v - m).exp()).sum();
                    let row = &sv[(bi * h + hi) * n + i];
                    assert!((row[0] - m).abs() <= 1e-9 * m.abs().max(1.0));
                    assert!((row[1] - l.ln()).abs() < 1e-9);
                    for cc in 0..c {
                        let want: f64 = (0..n)
                            .map(|j| (s[j] - m).exp() / l * yv[bi * n + j][2 * h * c + hi * c + cc])
                            .sum();
                        let got = ov[bi * n + i][hi * c + cc];
                        assert!(
                            (got - want).abs() < 1e-9,
                            "{bi} {hi} {i} {cc}: {got} vs {want}"
                        );
                    }
                }
            }
        }
    }
}
