//! Gated projections of the triangle multiplicative update (AF2 supplement Algorithms 11 and 12,
//! lines 2–3): `a = sigmoid(a_g) · mask · a_p` (and `b` likewise), written straight into the
//! channel-first layout the per-channel batched matmul reads.
//!
//! The hand-written path computes the five projections of `LN(z)` as one GEMM `proj`
//! `[n, ld]` (`n = I·J` pair rows; columns `a_p, a_g, b_p, b_g, g`). Unfused, each of `a`, `b`
//! costs a `sigmoid`, a broadcast mask multiply, a multiply and a permuted copy, and the backward
//! as many again plus a concatenation of the five projection cotangents. Fused (CUDA, f32/bf16,
//! fp32 math rounded to the activation dtype after each step as the twin's candle ops round, so
//! the hand-written path computes what autograd computes; no atomics):
//! - [`tri_gate_fwd`]: one tiled-transpose kernel reads `p`, `g` (strided column slices of
//!   `proj`) and `mask`, and writes `[C, A, B]` or `[C, B, A]` (see [`PairPerm`]).
//! - [`tri_gate_bwd`]: reads the cotangents in that channel-first layout and writes
//!   `d_p = d·mask·s`, `d_g = d·mask·p·s·(1 − s)` (`s = sigmoid(g)`) at their columns of one
//!   `[n, ld]` buffer laid out like `proj`; the remaining columns are copied from `extra`
//!   tensors, so no concatenation pass is needed.
//!
//! Twins: the plain candle chains (`sigmoid`, `broadcast_mul`, `mul`, `permute` + `contiguous`;
//! the backward formulas as candle ops and `Tensor::cat`).

use candle_core::{DType, Device, Tensor};

#[cfg(feature = "cuda")]
use super::permute::Contig;
use super::{ElemBenchRow, ElemCheck};
use crate::error::{Error, Result};
use crate::model::primitives::{cast, sigmoid};

/// NVRTC module name.
pub const MODULE: &str = "ferrofold_tri_gate";

/// CUDA C source: `tri_gate_{fwd,bwd}_{f32,bf16}` (32 × 32 tiles through shared memory, 32 × 8
/// threads) and `copy_cols_{f32,bf16}_v{V}`.
#[cfg(feature = "cuda")]
pub const SOURCE: &str = concat!(
    elem_prelude!(),
    r#"
__device__ __forceinline__ float sigm(float x) { return 1.0f / (1.0f + expf(-x)); }
// Round to T's precision (identity for f32): each step rounds as the twin's candle op does.
template <typename T> __device__ __forceinline__ float rt(float v);
template <> __device__ __forceinline__ float rt<float>(float v) { return v; }
template <> __device__ __forceinline__ float rt<__nv_bfloat16>(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }

// Element (c, t, r) of the channel-first tensor sits at c·n + t·ots + r; its pair row in `proj`
// is r·rs + t·ts. Grid (ceil(R/32), ceil(C/32), T).
template <typename T>
__device__ __forceinline__ void tri_gate_fwd(const T* proj, size_t ldp, size_t off_p, size_t off_g,
        const T* mask, T* out, unsigned R, unsigned C, size_t rs, size_t ts, size_t ots, size_t n) {
    __shared__ float tile[32][33];
    unsigned r0 = blockIdx.x * 32, c0 = blockIdx.y * 32;
    size_t t = blockIdx.z;
    unsigned tx = threadIdx.x, ty = threadIdx.y;
#pragma unroll
    for (int k = 0; k < 32; k += 8) {
        unsigned r = r0 + ty + k, c = c0 + tx;
        if (r < R && c < C) {
            size_t row = (size_t)r * rs + t * ts;
            const T* pr = proj + row * ldp;
            // Twin: (sigmoid(g) · mask) · p, each op rounded.
            float sg = rt<T>(sigm(ld(pr, off_g + c)));
            tile[ty + k][tx] = rt<T>(sg * ld(mask, row)) * ld(pr, off_p + c);
        }
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < 32; k += 8) {
        unsigned c = c0 + ty + k, r = r0 + tx;
        if (r < R && c < C) st(out, (size_t)c * n + t * ots + r, tile[tx][ty + k]);
    }
}

template <typename T>
__device__ __forceinline__ void tri_gate_bwd(const T* d, const T* proj, size_t ldp, size_t off_p,
        size_t off_g, const T* mask, T* dproj, unsigned R, unsigned C, size_t rs, size_t ts,
        size_t ots, size_t n) {
    __shared__ float tile[32][33];
    unsigned r0 = blockIdx.x * 32, c0 = blockIdx.y * 32;
    size_t t = blockIdx.z;
    unsigned tx = threadIdx.x, ty = threadIdx.y;
#pragma unroll
    for (int k = 0; k < 32; k += 8) {
        unsigned c = c0 + ty + k, r = r0 + tx;
        if (r < R && c < C) tile[ty + k][tx] = ld(d, (size_t)c * n + t * ots + r);
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < 32; k += 8) {
        unsigned r = r0 + ty + k, c = c0 + tx;
        if (r < R && c < C) {
            size_t row = (size_t)r * rs + t * ts;
            const T* pr = proj + row * ldp;
            // Twin: dm = d·mask, d_p = dm·s, d_g = ((dm·p)·s)·(1 − s), each op rounded.
            float dm = rt<T>(tile[tx][ty + k] * ld(mask, row));
            float s = rt<T>(sigm(ld(pr, off_g + c)));
            float p = ld(pr, off_p + c);
            T* dr = dproj + row * ldp;
            st(dr, off_p + c, dm * s);
            st(dr, off_g + c, rt<T>(rt<T>(dm * p) * s) * rt<T>(1.0f - s));
        }
    }
}

// dst[row·ldd + off + col] = src[row·w + col], V columns per thread (cg = w / V).
template <typename T, int V>
__device__ __forceinline__ void copy_cols(const T* src, T* dst, size_t ldd, size_t off, unsigned cg,
                                          unsigned n_groups) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n_groups) return;
    unsigned row = i / cg;
    unsigned col = (i - row * cg) * V;
    *reinterpret_cast<Pack<T, V>*>(dst + (size_t)row * ldd + off + col) =
        reinterpret_cast<const Pack<T, V>*>(src)[i];
}

// y[b, c, r] = x[b, r, c] (exact copy through fp32 tiles). Grid (ceil(C/32), ceil(R/32), B).
template <typename T>
__device__ __forceinline__ void transpose(const T* x, T* y, unsigned R, unsigned C) {
    __shared__ float tile[32][33];
    unsigned c0 = blockIdx.x * 32, r0 = blockIdx.y * 32;
    size_t base = (size_t)blockIdx.z * R * C;
    unsigned tx = threadIdx.x, ty = threadIdx.y;
#pragma unroll
    for (int k = 0; k < 32; k += 8) {
        unsigned r = r0 + ty + k, c = c0 + tx;
        if (r < R && c < C) tile[ty + k][tx] = ld(x, base + (size_t)r * C + c);
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < 32; k += 8) {
        unsigned c = c0 + ty + k, r = r0 + tx;
        if (r < R && c < C) st(y, base + (size_t)c * R + r, tile[tx][ty + k]);
    }
}

#define TRI(SUF, T) \
extern "C" __global__ void tri_gate_fwd_##SUF(const T* proj, size_t ldp, size_t off_p, size_t off_g, \
        const T* mask, T* out, unsigned R, unsigned C, size_t rs, size_t ts, size_t ots, size_t n) { \
    tri_gate_fwd<T>(proj, ldp, off_p, off_g, mask, out, R, C, rs, ts, ots, n); } \
extern "C" __global__ void tri_gate_bwd_##SUF(const T* d, const T* proj, size_t ldp, size_t off_p, \
        size_t off_g, const T* mask, T* dproj, unsigned R, unsigned C, size_t rs, size_t ts, size_t ots, size_t n) { \
    tri_gate_bwd<T>(d, proj, ldp, off_p, off_g, mask, dproj, R, C, rs, ts, ots, n); }
TRI(f32, float)
TRI(bf16, __nv_bfloat16)
extern "C" __global__ void transpose_f32(const float* x, float* y, unsigned R, unsigned C) { transpose<float>(x, y, R, C); }
extern "C" __global__ void transpose_bf16(const __nv_bfloat16* x, __nv_bfloat16* y, unsigned R, unsigned C) {
    transpose<__nv_bfloat16>(x, y, R, C);
}

#define COPY(SUF, T, V) \
extern "C" __global__ void copy_cols_##SUF##_v##V(const T* src, T* dst, size_t ldd, size_t off, unsigned cg, unsigned n) { \
    copy_cols<T, V>(src, dst, ldd, off, cg, n); }
COPY(f32, float, 1)
COPY(f32, float, 4)
COPY(bf16, __nv_bfloat16, 1)
COPY(bf16, __nv_bfloat16, 8)
"#
);

/// How the pair rows of `proj` map to the channel-first tensor: the `n = a·b` rows are the pair
/// grid `[a, b]` (row `i·b + j`); the channel-first tensor is `[C, a, b]` (`swap = false`) or
/// `[C, b, a]` (`swap = true`).
///
/// Triangle multiplication with pair rows `[I, J]` of `z` `[I, J, c_z]`: outgoing `a[i,k]` →
/// `[C, I, K]` (no swap), `b[j,k]` → `[C, K, J]` (swap); incoming `a[k,i]` → `[C, I, K]` (swap),
/// `b[k,j]` → `[C, K, J]` (no swap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PairPerm {
    pub a: usize,
    pub b: usize,
    pub swap: bool,
}

impl PairPerm {
    /// Dims of the channel-first tensor for `c` channels.
    pub fn out_dims(&self, c: usize) -> [usize; 3] {
        if self.swap {
            [c, self.b, self.a]
        } else {
            [c, self.a, self.b]
        }
    }

    /// Kernel geometry `(R, T, rs, ts, ots)`: see the CUDA source.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    fn geometry(&self) -> (usize, usize, usize, usize, usize) {
        if self.swap {
            (self.a, self.b, self.b, 1, self.a)
        } else {
            (self.a * self.b, 1, 1, 0, 0)
        }
    }
}

/// One gated part: the columns `off_p..off_p + c` (`p`) and `off_g..off_g + c` (gate logits) of
/// `proj`, and the pair permutation of its channel-first tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatedPart {
    pub off_p: usize,
    pub off_g: usize,
    pub c: usize,
    pub perm: PairPerm,
}

fn check_args(proj: &Tensor, mask: &Tensor, part: &GatedPart) -> Result<(usize, usize)> {
    let (n, ld) = proj.dims2()?;
    let bad = |m: String| Err(Error::Model(format!("tri_gate: {m}")));
    if n != part.perm.a * part.perm.b {
        return bad(format!(
            "{n} rows for a {}×{} pair grid",
            part.perm.a, part.perm.b
        ));
    }
    if mask.elem_count() != n {
        return bad(format!("mask of {} values for {n} rows", mask.elem_count()));
    }
    if part.off_p + part.c > ld || part.off_g + part.c > ld {
        return bad(format!("columns beyond {ld}: {part:?}"));
    }
    Ok((n, ld))
}

/// Plain-candle twin of [`tri_gate_fwd`].
pub fn tri_gate_fwd_twin(proj: &Tensor, mask: &Tensor, part: &GatedPart) -> Result<Tensor> {
    let (n, _) = check_args(proj, mask, part)?;
    let m = cast(mask, proj.dtype())?.reshape((n, 1))?;
    let p = proj.narrow(1, part.off_p, part.c)?;
    let g = proj.narrow(1, part.off_g, part.c)?;
    let x = sigmoid(&g)?.broadcast_mul(&m)?.mul(&p)?; // [n, C]
    let x = x.reshape((part.perm.a, part.perm.b, part.c))?;
    let x = if part.perm.swap {
        x.permute((2, 1, 0))?
    } else {
        x.permute((2, 0, 1))?
    };
    Ok(x.contiguous()?)
}

/// `sigmoid(g) · mask[row] · p` of `part` of `proj` `[n, ld]` (`mask` `[n]`), channel-first
/// ([`PairPerm::out_dims`]). No graph. Fused on CUDA (f32/bf16, fused kernels on), the twin
/// otherwise.
pub fn tri_gate_fwd(proj: &Tensor, mask: &Tensor, part: &GatedPart) -> Result<Tensor> {
    let (proj, mask) = (proj.detach(), mask.detach());
    check_args(&proj, &mask, part)?;
    if fused_ok(&proj, &mask, part) {
        #[cfg(feature = "cuda")]
        {
            let (proj, mask) = (proj.contig()?, cast(&mask, proj.dtype())?.contig()?);
            return Ok(match proj.dtype() {
                DType::F32 => cuda::fwd_t::<f32>(&proj, &mask, part)?,
                _ => cuda::fwd_t::<half::bf16>(&proj, &mask, part)?,
            });
        }
    }
    tri_gate_fwd_twin(&proj, &mask, part)
}

fn fused_ok(proj: &Tensor, mask: &Tensor, part: &GatedPart) -> bool {
    let (a, b) = (part.perm.a, part.perm.b);
    super::fused_for(proj)
        && super::epilogues_enabled()
        && proj.elem_count() > 0
        && part.c > 0
        && mask.device().same_device(proj.device())
        && a < u32::MAX as usize / 2
        && (!part.perm.swap || b <= 65535)
        && part.c.div_ceil(32) <= 65535
        && (a * b).div_ceil(32) < i32::MAX as usize
}

/// Plain-candle twin of [`transpose12`]: `x.transpose(1, 2).contiguous()`.
pub fn transpose12_twin(x: &Tensor) -> Result<Tensor> {
    Ok(x.transpose(1, 2)?.contiguous()?)
}

/// `x` `[B, R, C]` → `[B, C, R]` contiguous (the layout changes of the triangle product between
/// channel-first `[C, I·J]` and pair `[I·J, C]`). A tiled-transpose kernel on CUDA (f32/bf16,
/// fused kernels on; an exact copy), candle's strided copy otherwise.
pub fn transpose12(x: &Tensor) -> Result<Tensor> {
    let (b, r, c) = x.dims3()?;
    if super::fused_for(x)
        && super::epilogues_enabled()
        && x.elem_count() > 0
        && r.div_ceil(32) <= 65535
        && b <= 65535
        && x.elem_count() < u32::MAX as usize
        && c > 0
    {
        #[cfg(feature = "cuda")]
        {
            let x = x.detach().contig()?;
            return Ok(match x.dtype() {
                DType::F32 => cuda::transpose_t::<f32>(&x, b, r, c)?,
                _ => cuda::transpose_t::<half::bf16>(&x, b, r, c)?,
            });
        }
    }
    transpose12_twin(x)
}

/// The cotangent of one gated part: `d` in the part's channel-first layout.
pub struct PartGrad<'a> {
    pub part: GatedPart,
    pub d: &'a Tensor,
}

/// Checks of [`tri_gate_bwd`]: every column of `[0, ld)` covered exactly once by the parts'
/// `p` and `g` columns and the `extra` blocks.
fn check_cover(
    ld: usize,
    n: usize,
    parts: &[PartGrad<'_>],
    extra: &[(usize, &Tensor)],
) -> Result<()> {
    let mut blocks: Vec<(usize, usize)> = Vec::new();
    for pg in parts {
        blocks.push((pg.part.off_p, pg.part.c));
        blocks.push((pg.part.off_g, pg.part.c));
        let want = pg.part.perm.out_dims(pg.part.c);
        if pg.d.dims() != want {
            return Err(Error::Model(format!(
                "tri_gate_bwd: cotangent {:?}, expected {want:?}",
                pg.d.dims()
            )));
        }
    }
    for (off, t) in extra {
        let (rows, w) = t.dims2()?;
        if rows != n {
            return Err(Error::Model(format!(
                "tri_gate_bwd: extra block of {rows} rows, expected {n}"
            )));
        }
        blocks.push((*off, w));
    }
    blocks.sort();
    let mut next = 0;
    for (off, w) in blocks {
        if off != next {
            return Err(Error::Model(format!(
                "tri_gate_bwd: columns not covered exactly once at {next} (next block at {off})"
            )));
        }
        next = off + w;
    }
    if next != ld {
        return Err(Error::Model(format!(
            "tri_gate_bwd: blocks cover {next} of {ld} columns"
        )));
    }
    Ok(())
}

/// Plain-candle twin of [`tri_gate_bwd`].
pub fn tri_gate_bwd_twin(
    proj: &Tensor,
    mask: &Tensor,
    parts: &[PartGrad<'_>],
    extra: &[(usize, &Tensor)],
) -> Result<Tensor> {
    let (n, ld) = proj.dims2()?;
    check_cover(ld, n, parts, extra)?;
    let m = cast(mask, proj.dtype())?.reshape((n, 1))?;
    let mut blocks: Vec<(usize, Tensor)> = Vec::new();
    for pg in parts {
        let part = &pg.part;
        check_args(proj, mask, part)?;
        let d = cast(pg.d, proj.dtype())?;
        // Back to the pair layout [a, b, C] → [n, C].
        let d = if part.perm.swap {
            d.permute((2, 1, 0))?
        } else {
            d.permute((1, 2, 0))?
        };
        let d = d.contiguous()?.reshape((n, part.c))?;
        let p = proj.narrow(1, part.off_p, part.c)?;
        let s = sigmoid(&proj.narrow(1, part.off_g, part.c)?)?;
        let dm = d.broadcast_mul(&m)?;
        let dp = (&dm * &s)?;
        let dg = crate::model::vjp::sigmoid_bwd_from_output(&(dm * p)?, &s)?;
        blocks.push((part.off_p, dp));
        blocks.push((part.off_g, dg));
    }
    for (off, t) in extra {
        blocks.push((*off, cast(t, proj.dtype())?));
    }
    blocks.sort_by_key(|(o, _)| *o);
    let ts: Vec<&Tensor> = blocks.iter().map(|(_, t)| t).collect();
    Ok(Tensor::cat(&ts, 1)?)
}

/// The cotangent of `proj` `[n, ld]` of the gated parts ([`tri_gate_fwd`]) for their cotangents
/// `parts[k].d` (channel-first), with the columns of no part taken from `extra`
/// `(column offset, [n, w])` (every column covered exactly once). No graph. Fused on CUDA
/// (f32/bf16, fused kernels on), the twin otherwise.
pub fn tri_gate_bwd(
    proj: &Tensor,
    mask: &Tensor,
    parts: &[PartGrad<'_>],
    extra: &[(usize, &Tensor)],
) -> Result<Tensor> {
    let (n, ld) = proj.dims2()?;
    check_cover(ld, n, parts, extra)?;
    let ok = parts.iter().all(|pg| {
        check_args(proj, mask, &pg.part).is_ok()
            && fused_ok(proj, mask, &pg.part)
            && pg.d.device().same_device(proj.device())
    }) && extra
        .iter()
        .all(|(_, t)| t.device().same_device(proj.device()))
        && n * ld < i32::MAX as usize;
    if ok && super::fused_for(proj) {
        #[cfg(feature = "cuda")]
        {
            let dt = proj.dtype();
            let proj = proj.detach().contig()?;
            let mask = cast(&mask.detach(), dt)?.contig()?;
            let ds = parts
                .iter()
                .map(|pg| Ok(cast(&pg.d.detach(), dt)?.contig()?))
                .collect::<Result<Vec<_>>>()?;
            let ex = extra
                .iter()
                .map(|(o, t)| Ok((*o, cast(&t.detach(), dt)?.contig()?)))
                .collect::<Result<Vec<_>>>()?;
            let ps: Vec<GatedPart> = parts.iter().map(|pg| pg.part).collect();
            return Ok(match dt {
                DType::F32 => cuda::bwd_t::<f32>(&proj, &mask, &ps, &ds, &ex)?,
                _ => cuda::bwd_t::<half::bf16>(&proj, &mask, &ps, &ds, &ex)?,
            });
        }
    }
    tri_gate_bwd_twin(proj, mask, parts, extra)
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{DType, Tensor};
    use cudarc::driver::{DeviceRepr, LaunchConfig, PushKernelArg};

    use super::super::launch::{cuda_storage, func, range, suffix, tensor_from_slice, BLOCK};
    use super::super::nvrtc;
    use super::{GatedPart, MODULE, SOURCE};

    fn tile_cfg(r: usize, c: usize, t: usize) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (
                r.div_ceil(32).max(1) as u32,
                c.div_ceil(32).max(1) as u32,
                t.max(1) as u32,
            ),
            block_dim: (32, 8, 1),
            shared_mem_bytes: 0,
        }
    }

    pub(super) fn fwd_t<T: CudaDType + DeviceRepr>(
        proj: &Tensor,
        mask: &Tensor,
        part: &GatedPart,
    ) -> candle_core::Result<Tensor> {
        let (n, ld) = proj.dims2()?;
        let c = part.c;
        let (sp, lp) = proj.storage_and_layout();
        let (sm, lm) = mask.storage_and_layout();
        let (sp, sm) = (cuda_storage(&sp)?, cuda_storage(&sm)?);
        let dev = sp.device();
        let f = func(
            dev,
            MODULE,
            SOURCE,
            &format!("tri_gate_fwd_{}", suffix(proj.dtype())?),
        )?;
        let pv = sp.as_cuda_slice::<T>()?.slice(range(lp)?);
        let mv = sm.as_cuda_slice::<T>()?.slice(range(lm)?);
        // SAFETY: every element is written by the kernel (the tiles cover [C] × [R] × [T]).
        let mut out = unsafe { dev.alloc::<T>(n * c)? };
        let (r, t, rs, ts, ots) = part.perm.geometry();
        let (r32, c32) = (r as u32, c as u32);
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&pv)
            .arg(&ld)
            .arg(&part.off_p)
            .arg(&part.off_g)
            .arg(&mv)
            .arg(&mut out)
            .arg(&r32)
            .arg(&c32)
            .arg(&rs)
            .arg(&ts)
            .arg(&ots)
            .arg(&n);
        // SAFETY: argument types match the kernel; `proj` holds `n · ld` elements and the part's
        // columns lie inside `ld` (checked by `check_args`), `mask` `n`, `out` `n · c`.
        unsafe { b.launch(tile_cfg(r, c, t)) }.w()?;
        Ok(tensor_from_slice(
            out,
            dev,
            &part.perm.out_dims(c).to_vec().into(),
        ))
    }

    pub(super) fn transpose_t<T: CudaDType + DeviceRepr>(
        x: &Tensor,
        b: usize,
        r: usize,
        c: usize,
    ) -> candle_core::Result<Tensor> {
        let (sx, lx) = x.storage_and_layout();
        let sx = cuda_storage(&sx)?;
        let dev = sx.device();
        let f = func(
            dev,
            MODULE,
            SOURCE,
            &format!("transpose_{}", suffix(x.dtype())?),
        )?;
        let xv = sx.as_cuda_slice::<T>()?.slice(range(lx)?);
        // SAFETY: every element is written by the kernel.
        let mut y = unsafe { dev.alloc::<T>(b * r * c)? };
        let (r32, c32) = (r as u32, c as u32);
        let stream = dev.cuda_stream();
        let mut lb = stream.launch_builder(&f);
        lb.arg(&xv).arg(&mut y).arg(&r32).arg(&c32);
        let cfg = LaunchConfig {
            grid_dim: (
                c.div_ceil(32).max(1) as u32,
                r.div_ceil(32).max(1) as u32,
                b.max(1) as u32,
            ),
            block_dim: (32, 8, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: argument types match; `x` and `y` hold `b · r · c` elements.
        unsafe { lb.launch(cfg) }.w()?;
        Ok(tensor_from_slice(y, dev, &(b, c, r).into()))
    }

    pub(super) fn bwd_t<T: CudaDType + DeviceRepr>(
        proj: &Tensor,
        mask: &Tensor,
        parts: &[GatedPart],
        ds: &[Tensor],
        extra: &[(usize, Tensor)],
    ) -> candle_core::Result<Tensor> {
        let dt = proj.dtype();
        let (n, ld) = proj.dims2()?;
        let (sp, lp) = proj.storage_and_layout();
        let (sm, lm) = mask.storage_and_layout();
        let (sp, sm) = (cuda_storage(&sp)?, cuda_storage(&sm)?);
        let dev = sp.device();
        let fb = func(
            dev,
            MODULE,
            SOURCE,
            &format!("tri_gate_bwd_{}", suffix(dt)?),
        )?;
        let pv = sp.as_cuda_slice::<T>()?.slice(range(lp)?);
        let mv = sm.as_cuda_slice::<T>()?.slice(range(lm)?);
        // SAFETY: every column of every row is written: the parts' p and g columns by the gated
        // kernels, the rest by the copies (`check_cover`).
        let mut out = unsafe { dev.alloc::<T>(n * ld)? };
        let stream = dev.cuda_stream();
        for (part, d) in parts.iter().zip(ds) {
            let (sd, ldl) = d.storage_and_layout();
            let sd = cuda_storage(&sd)?;
            let dv = sd.as_cuda_slice::<T>()?.slice(range(ldl)?);
            let (r, t, rs, ts, ots) = part.perm.geometry();
            let (r32, c32) = (r as u32, part.c as u32);
            let mut b = stream.launch_builder(&fb);
            b.arg(&dv)
                .arg(&pv)
                .arg(&ld)
                .arg(&part.off_p)
                .arg(&part.off_g)
                .arg(&mv)
                .arg(&mut out)
                .arg(&r32)
                .arg(&c32)
                .arg(&rs)
                .arg(&ts)
                .arg(&ots)
                .arg(&n);
            // SAFETY: as in the forward; `d` holds `n · c` elements.
            unsafe { b.launch(tile_cfg(r, part.c, t)) }.w()?;
        }
        let wide = if dt == DType::BF16 { 8 } else { 4 };
        for (off, src) in extra {
            let w = src.dims2()?.1;
            if w == 0 || n == 0 {
                continue;
            }
            let (ss, ls) = src.storage_and_layout();
            let ss = cuda_storage(&ss)?;
            let rs_ = range(ls)?;
            let v = if w.is_multiple_of(wide)
                && ld.is_multiple_of(wide)
                && off.is_multiple_of(wide)
                && rs_.start.is_multiple_of(wide)
            {
                wide
            } else {
                1
            };
            let sv = ss.as_cuda_slice::<T>()?.slice(rs_);
            let fc = func(
                dev,
                MODULE,
                SOURCE,
                &format!("copy_cols_{}_v{v}", suffix(dt)?),
            )?;
            let cg = (w / v) as u32;
            let groups = (n * w / v) as u32;
            let mut b = stream.launch_builder(&fc);
            b.arg(&sv)
                .arg(&mut out)
                .arg(&ld)
                .arg(off)
                .arg(&cg)
                .arg(&groups);
            // SAFETY: `src` holds `n · w` elements, the block `off..off + w` lies inside `ld`
            // (`check_cover`), all v-aligned when v > 1.
            unsafe { b.launch(nvrtc::grid_1d(groups as usize, BLOCK)) }.w()?;
        }
        Ok(tensor_from_slice(out, dev, &(n, ld).into()))
    }
}

/// Geometry of a check / bench case: the pair grid `a × b`, `c` channels, `extra` columns after
/// the four gated blocks.
fn parts_for(a: usize, b: usize, c: usize, outgoing: bool) -> [GatedPart; 2] {
    // Outgoing: a → [C, a, b], b → [C, b, a]; incoming the other way round.
    let pa = PairPerm {
        a,
        b,
        swap: !outgoing,
    };
    let pb = PairPerm {
        a,
        b,
        swap: outgoing,
    };
    [
        GatedPart {
            off_p: 0,
            off_g: c,
            c,
            perm: pa,
        },
        GatedPart {
            off_p: 2 * c,
            off_g: 3 * c,
            c,
            perm: pb,
        },
    ]
}

/// Fused vs twin: forward of both gated parts, and the projection cotangent (the gated columns
/// against candle's autograd of the twin forward, the copied columns exactly), outgoing and
/// incoming, f32 and bf16, odd sizes, on `dev` (a CUDA device).
pub fn self_check(dev: &Device) -> Result<Vec<ElemCheck>> {
    let mut out = Vec::new();
    for (k, &(a, b, c, extra)) in [
        (7usize, 5usize, 9usize, 3usize),
        (33, 31, 40, 17),
        (64, 48, 128, 128),
    ]
    .iter()
    .enumerate()
    {
        for outgoing in [true, false] {
            for dtype in [DType::F32, DType::BF16] {
                let seed = 0x7a1_0000 + 8 * k as u64 + u64::from(outgoing);
                let n = a * b;
                let ld = 4 * c + extra;
                let proj = super::uniform_tensor(&[n, ld], 3.0, seed, dtype, dev)?;
                let mask = super::uniform_tensor(&[n], 1.0, seed ^ 1, dtype, dev)?
                    .ge(-0.6)?
                    .to_dtype(dtype)?;
                let parts = parts_for(a, b, c, outgoing);
                let name =
                    |w: &str| format!("tri_gate {w} {}", if outgoing { "out" } else { "in" });
                let cs = format!("[{a}, {b}] c {c} ld {ld} {dtype:?}");
                if !parts.iter().all(|p| fused_ok(&proj, &mask, p)) {
                    return Err(Error::Msg(format!(
                        "tri_gate self-check: the fused kernel does not take {cs}"
                    )));
                }
                let mut ds = Vec::new();
                for (i, part) in parts.iter().enumerate() {
                    let yf = tri_gate_fwd(&proj, &mask, part)?;
                    let yt = tri_gate_fwd_twin(&proj, &mask, part)?;
                    out.push(ElemCheck {
                        op: name(&format!("fwd {}", ["a", "b"][i])),
                        case: cs.clone(),
                        max_err: super::rel_err(&yf, &yt)?,
                        tol: if dtype == DType::BF16 { 2e-2 } else { 2e-6 },
                    });
                    ds.push(super::uniform_tensor(
                        &part.perm.out_dims(c),
                        1.0,
                        seed ^ (16 + i as u64),
                        dtype,
                        dev,
                    )?);
                }
                let ex = super::uniform_tensor(&[n, extra], 1.0, seed ^ 5, dtype, dev)?;
                let pgs: Vec<PartGrad<'_>> = parts
                    .iter()
                    .zip(&ds)
                    .map(|(p, d)| PartGrad { part: *p, d })
                    .collect();
                let extras = [(4 * c, &ex)];
                let df = tri_gate_bwd(&proj, &mask, &pgs, &extras)?;
                let dtw = tri_gate_bwd_twin(&proj, &mask, &pgs, &extras)?;
                // Autograd of the twin forward.
                let pv = candle_core::Var::from_tensor(&proj)?;
                let mut loss = Tensor::zeros((), DType::F32, dev)?;
                for (part, d) in parts.iter().zip(&ds) {
                    let y = tri_gate_fwd_twin(pv.as_tensor(), &mask, part)?;
                    loss = (loss + (y * d)?.to_dtype(DType::F32)?.sum_all()?)?;
                }
                let g = loss.backward()?;
                let dauto = g
                    .get(pv.as_tensor())
                    .ok_or_else(|| Error::Msg("tri_gate: no gradient".into()))?;
                let tol = if dtype == DType::BF16 { 2e-2 } else { 2e-6 };
                for (what, off, w) in [
                    ("d_ap", 0, c),
                    ("d_ag", c, c),
                    ("d_bp", 2 * c, c),
                    ("d_bg", 3 * c, c),
                ] {
                    out.push(ElemCheck {
                        op: name(&format!("bwd {what}")),
                        case: cs.clone(),
                        max_err: super::rel_err(&df.narrow(1, off, w)?, &dauto.narrow(1, off, w)?)?,
                        tol,
                    });
                }
                out.push(ElemCheck {
                    op: name("bwd vs twin"),
                    case: cs.clone(),
                    max_err: super::rel_err(&df, &dtw)?,
                    tol,
                });
                out.push(ElemCheck {
                    op: name("bwd extra cols"),
                    case: cs,
                    max_err: super::rel_err(&df.narrow(1, 4 * c, extra)?, &ex)?,
                    tol: 0.0,
                });
            }
        }
    }
    for (k, shape) in [[1usize, 7, 5], [3, 33, 40], [1, 128, 4096], [2, 1000, 96]]
        .iter()
        .enumerate()
    {
        for dtype in [DType::F32, DType::BF16] {
            let x = super::uniform_tensor(shape, 1.0, 0x7e_0000 + k as u64, dtype, dev)?;
            out.push(ElemCheck {
                op: "transpose12".into(),
                case: format!("{shape:?} {dtype:?}"),
                max_err: super::rel_err(&transpose12(&x)?, &transpose12_twin(&x)?)?,
                tol: 0.0,
            });
        }
    }
    Ok(out)
}

/// Fused vs twin timings at the Evoformer's pair shape (256 × 256 residues, `c = 128`,
/// `c_z = 128`, bf16): the forward of both parts, and the backward (both parts + the gate
/// columns); outgoing and incoming.
pub fn bench_rows(dev: &Device, iters: usize) -> Result<Vec<ElemBenchRow>> {
    let dt = DType::BF16;
    let (r, c, cz) = (256usize, 128usize, 128usize);
    let (n, ld) = (r * r, 4 * c + cz);
    let proj = super::uniform_tensor(&[n, ld], 3.0, 1, dt, dev)?;
    let mask = super::uniform_tensor(&[n], 1.0, 2, dt, dev)?
        .ge(-0.9)?
        .to_dtype(dt)?;
    let dg = super::uniform_tensor(&[n, cz], 1.0, 3, dt, dev)?;
    let mut rows = Vec::new();
    for shape in [[1usize, c, n], [1, n, c]] {
        let x = super::uniform_tensor(&shape, 1.0, 6, dt, dev)?;
        let fused_ms = super::median_ms(dev, 3, iters, || transpose12(&x).map(|_| ()))?;
        let twin_ms = super::median_ms(dev, 3, iters, || transpose12_twin(&x).map(|_| ()))?;
        rows.push(ElemBenchRow {
            op: "transpose12".into(),
            case: format!("{shape:?} {dt:?}"),
            fused_ms,
            twin_ms,
            max_err: super::rel_err(&transpose12(&x)?, &transpose12_twin(&x)?)?,
        });
    }
    for outgoing in [true, false] {
        let parts = parts_for(r, r, c, outgoing);
        let dir = if outgoing { "out" } else { "in" };
        let fwd = |f: fn(&Tensor, &Tensor, &GatedPart) -> Result<Tensor>| -> Result<Vec<Tensor>> {
            parts.iter().map(|p| f(&proj, &mask, p)).collect()
        };
        let fused_ms = super::median_ms(dev, 3, iters, || fwd(tri_gate_fwd).map(|_| ()))?;
        let twin_ms = super::median_ms(dev, 3, iters, || fwd(tri_gate_fwd_twin).map(|_| ()))?;
        let (yf, yt) = (fwd(tri_gate_fwd)?, fwd(tri_gate_fwd_twin)?);
        rows.push(ElemBenchRow {
            op: format!("tri_gate fwd a+b {dir}"),
            case: format!("[{r}, {r}] c {c} {dt:?}"),
            fused_ms,
            twin_ms,
            max_err: super::rel_err(&yf[0], &yt[0])?.max(super::rel_err(&yf[1], &yt[1])?),
        });
        let ds = [
            super::uniform_tensor(&parts[0].perm.out_dims(c), 1.0, 4, dt, dev)?,
            super::uniform_tensor(&parts[1].perm.out_dims(c), 1.0, 5, dt, dev)?,
        ];
        let pgs = [
            PartGrad {
                part: parts[0],
                d: &ds[0],
            },
            PartGrad {
                part: parts[1],
                d: &ds[1],
            },
        ];
        let extras = [(4 * c, &dg)];
        let fused_ms = super::median_ms(dev, 3, iters, || {
            tri_gate_bwd(&proj, &mask, &pgs, &extras).map(|_| ())
        })?;
        let twin_ms = super::median_ms(dev, 3, iters, || {
            tri_gate_bwd_twin(&proj, &mask, &pgs, &extras).map(|_| ())
        })?;
        rows.push(ElemBenchRow {
            op: format!("tri_gate bwd + cat {dir}"),
            case: format!("[{r}, {r}] ld {ld} {dt:?}"),
            fused_ms,
            twin_ms,
            max_err: super::rel_err(
                &tri_gate_bwd(&proj, &mask, &pgs, &extras)?,
                &tri_gate_bwd_twin(&proj, &mask, &pgs, &extras)?,
            )?,
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel64(a: &Tensor, b: &Tensor) -> f64 {
        let d = (a - b).unwrap().abs().unwrap().max_all().unwrap();
        let m = b.abs().unwrap().max_all().unwrap();
        d.to_scalar::<f64>().unwrap() / m.to_scalar::<f64>().unwrap().max(1e-300)
    }

    #[test]
    fn transpose12_on_cpu() {
        let x = Tensor::arange(0f32, 24.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 3, 4))
            .unwrap();
        let y = transpose12(&x).unwrap();
        assert_eq!(y.dims(), &[2, 4, 3]);
        let v = y.to_vec3::<f32>().unwrap();
        assert_eq!(v[1][2], vec![14.0, 18.0, 22.0]);
    }

    /// CPU: the dispatching entry points are the twins, whose backward matches autograd; the
    /// forward matches the unfused formula of the triangle multiplication.
    #[test]
    fn cpu_twin_forward_backward() {
        let dev = Device::Cpu;
        let (a, b, c, extra) = (3, 4, 5, 2);
        let (n, ld) = (a * b, 4 * c + extra);
        let proj = super::super::uniform_tensor(&[n, ld], 2.0, 1, DType::F64, &dev).unwrap();
        let mask = super::super::uniform_tensor(&[n], 1.0, 2, DType::F64, &dev)
            .unwrap()
            .ge(-0.5)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        for outgoing in [true, false] {
            let parts = parts_for(a, b, c, outgoing);
            // Forward = sigmoid(g) · mask · p, permuted.
            let y = tri_gate_fwd(&proj, &mask, &parts[1]).unwrap();
            let p = proj
                .narrow(1, 2 * c, c)
                .unwrap()
                .reshape((a, b, c))
                .unwrap();
            let g = proj
                .narrow(1, 3 * c, c)
                .unwrap()
                .reshape((a, b, c))
                .unwrap();
            let m = mask.reshape((a, b, 1)).unwrap();
            let want = sigmoid(&g)
                .unwrap()
                .broadcast_mul(&m)
                .unwrap()
                .mul(&p)
                .unwrap();
            let want = if outgoing {
                want.permute((2, 1, 0)).unwrap()
            } else {
                want.permute((2, 0, 1)).unwrap()
            };
            let d = rel64(&y, &want.contiguous().unwrap());
            assert!(d < 1e-15, "{d}");
            // Backward vs autograd.
            let ds: Vec<Tensor> = parts
                .iter()
                .enumerate()
                .map(|(i, p)| {
                    super::super::uniform_tensor(
                        &p.perm.out_dims(c),
                        1.0,
                        5 + i as u64,
                        DType::F64,
                        &dev,
                    )
                    .unwrap()
                })
                .collect();
            let ex = super::super::uniform_tensor(&[n, extra], 1.0, 9, DType::F64, &dev).unwrap();
            let pgs: Vec<PartGrad<'_>> = parts
                .iter()
                .zip(&ds)
                .map(|(p, d)| PartGrad { part: *p, d })
                .collect();
            let got = tri_gate_bwd(&proj, &mask, &pgs, &[(4 * c, &ex)]).unwrap();
            let pv = candle_core::Var::from_tensor(&proj).unwrap();
            let mut loss = Tensor::zeros((), DType::F64, &dev).unwrap();
            for (part, d) in parts.iter().zip(&ds) {
                let y = tri_gate_fwd_twin(pv.as_tensor(), &mask, part).unwrap();
                loss = (loss + (y * d).unwrap().sum_all().unwrap()).unwrap();
            }
            let g = loss.backward().unwrap();
            let want = g.get(pv.as_tensor()).unwrap().narrow(1, 0, 4 * c).unwrap();
            let e = rel64(&got.narrow(1, 0, 4 * c).unwrap(), &want);
            assert!(e < 1e-12, "{e}");
            assert_eq!(rel64(&got.narrow(1, 4 * c, extra).unwrap(), &ex), 0.0);
            // Columns must be covered exactly once.
            assert!(tri_gate_bwd(&proj, &mask, &pgs, &[]).is_err());
        }
    }
}
