//! Strided view → contiguous tensor (permutes, transposes, narrowed views), replacing candle's
//! generic strided copy (`ucopy`) on the CUDA hot path.
//!
//! candle's `.contiguous()` (and the implicit copy of `reshape` on a non-contiguous tensor) runs
//! one thread per element with the full index decomposition and uploads the layout to the device
//! on every call; on the Evoformer's head split/merge, column transposes and the outer product's
//! `[Ri, C, Rj, C] → [Ri, Rj, C·C]` it reaches about a tenth of the HBM bandwidth. This module:
//!
//! 1. reduces the view to a canonical form ([`merge_dims`]: size-1 dims dropped, collapsible
//!    neighbours merged; at most [`MAX_RANK`] dims remain or candle's copy is used);
//! 2. when the innermost dim has stride 1, re-expresses the copy in *words* of up to 16 bytes
//!    (the widest that divides the row length, the start offset and every outer stride), so a
//!    bf16 row of 32 channels is four 16-byte loads/stores ([`plan`]);
//! 3. copies with one of two kernels, chosen by the word-level layout ([`Kernel`]):
//!    - `gather`: each thread copies words of the contiguous output; the source offset comes from
//!      the output index by a divide-by-invariant (multiply-high) chain in 32-bit arithmetic when
//!      the sizes fit (64-bit division otherwise); 4 independent words per thread;
//!    - `tile`: the innermost output dim is not unit-stride in the source but another dim is (a
//!      true transpose of the last axis): 32 × 32 tiles through shared memory, so both the reads
//!      (along the source's unit-stride dim) and the writes (along the output's last dim) are
//!      coalesced.
//!
//! The kernels copy bits (words of 2, 4, 8 or 16 bytes), so every dtype of 2, 4 or 8 bytes is
//! exact: f16, bf16, f32 and f64 are routed here. The op is a candle `CustomOp1` whose backward
//! passes the incoming gradient through unchanged (the gradient of a copy), so it can sit inside
//! autograd graphs. The plain-candle twin is `Tensor::contiguous`.
//!
//! [`cat_cols`] uses the same gather with a strided destination: parts (any views) are written
//! straight into the column blocks of one `[rows, Σ w]` buffer, so the attention backward's head
//! merges and the concatenation of the joint q/k/v/g cotangent are one pass.
//!
//! Measured on H100 (bf16, `bench elem-kernels --only permute`, copy incl. launch and sync):
//! head split `[128, 256, 8, 32] → [128, 8, 256, 32]` 0.024 ms vs candle 0.107 ms; outer product
//! `[256, 32, 256, 32] → [256, 256, 32, 32]` 0.110 vs 0.701 ms (2.4 TB/s); one Evoformer block
//! 128 × 256 fwd+bwd 15.58 → 10.72 ms (`FERROFOLD_FUSED_PERMUTE=0` vs on).
//!
//! [`contiguous`] dispatches: already contiguous → a cheap clone; CUDA tensor of a supported dtype
//! with fused kernels enabled ([`super::fused_enabled`]) and `FERROFOLD_FUSED_PERMUTE` not `0` →
//! the kernel; otherwise candle's `contiguous`. [`Contig::contig`] is the same as a method, for
//! call chains.

use candle_core::{DType, Device, Tensor};

use super::{ElemBenchRow, ElemCheck};
use crate::error::Result;

/// NVRTC module name.
pub const MODULE: &str = "ferrofold_permute";

/// Most dims a view may keep after [`merge_dims`] for the kernels (more: candle's copy).
pub const MAX_RANK: usize = 6;

/// Tile edge of the transpose kernel.
const TILE: usize = 32;

/// Words per thread of the gather kernel.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const UNROLL: usize = 4;

/// Threads per block of the gather kernel.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const GATHER_BLOCK: usize = 256;

/// CUDA C source: `gather_w{2,4,8,16}_i{32,64}` and `tile_w{2,4,8,16}` (word size in bytes).
#[cfg(feature = "cuda")]
pub const SOURCE: &str = r#"
struct PermP {
    unsigned long long n;          // output words
    unsigned long long offset;     // source start offset (words)
    unsigned long long dims[6];    // output dims (words), innermost last
    unsigned long long strides[6]; // source strides (words)
    unsigned long long ostr[6];    // output strides (words, contiguous)
    unsigned int mul[6];           // divide-by-invariant multipliers of dims (32-bit path)
    unsigned int shr[6];           // and shifts
    int rank;
    int p;                         // tile: output dim whose source stride is 1
    unsigned long long doff;       // gather_into: destination start offset (words; strides ostr)
};
struct __align__(16) W16 { unsigned int x, y, z, w; };
template <bool WIDE> struct Idx { typedef unsigned T; };
template <> struct Idx<true> { typedef unsigned long long T; };

// q = n / d for n, d < 2^31 with (mul, shr) from the host (`magic` in permute.rs).
__device__ __forceinline__ unsigned fdiv(unsigned n, unsigned mul, unsigned shr) {
    return (__umulhi(n, mul) + n) >> shr;
}

__device__ __forceinline__ unsigned src_off32(const PermP& p, unsigned i) {
    unsigned off = (unsigned)p.offset;
#pragma unroll
    for (int d = 5; d >= 1; --d) {
        if (d < p.rank) {
            unsigned q = fdiv(i, p.mul[d], p.shr[d]);
            off += (i - q * (unsigned)p.dims[d]) * (unsigned)p.strides[d];
            i = q;
        }
    }
    return off + i * (unsigned)p.strides[0];
}

__device__ __forceinline__ unsigned long long src_off64(const PermP& p, unsigned long long i) {
    unsigned long long off = p.offset;
#pragma unroll
    for (int d = 5; d >= 1; --d) {
        if (d < p.rank) {
            unsigned long long q = i / p.dims[d];
            off += (i - q * p.dims[d]) * p.strides[d];
            i = q;
        }
    }
    return off + i * p.strides[0];
}

// Source and destination offsets of logical word i (gather_into: destination strides ostr).
__device__ __forceinline__ void offs32(const PermP& p, unsigned i, unsigned& so, unsigned& dof) {
    so = (unsigned)p.offset;
    dof = (unsigned)p.doff;
#pragma unroll
    for (int d = 5; d >= 1; --d) {
        if (d < p.rank) {
            unsigned q = fdiv(i, p.mul[d], p.shr[d]);
            unsigned r = i - q * (unsigned)p.dims[d];
            so += r * (unsigned)p.strides[d];
            dof += r * (unsigned)p.ostr[d];
            i = q;
        }
    }
    so += i * (unsigned)p.strides[0];
    dof += i * (unsigned)p.ostr[0];
}

__device__ __forceinline__ void offs64(const PermP& p, unsigned long long i, unsigned long long& so,
                                       unsigned long long& dof) {
    so = p.offset;
    dof = p.doff;
#pragma unroll
    for (int d = 5; d >= 1; --d) {
        if (d < p.rank) {
            unsigned long long q = i / p.dims[d];
            unsigned long long r = i - q * p.dims[d];
            so += r * p.strides[d];
            dof += r * p.ostr[d];
            i = q;
        }
    }
    so += i * p.strides[0];
    dof += i * p.ostr[0];
}

// dst[doff(i)] = src[off(i)] for every logical word i (a strided destination).
template <typename W, bool WIDE>
__device__ __forceinline__ void gather_into(const W* __restrict__ src, W* __restrict__ dst, const PermP& p) {
    typedef typename Idx<WIDE>::T I;
    const I n = (I)p.n;
    const I bd = blockDim.x;
    const I step = (I)gridDim.x * bd * 4;
    for (I base = (I)blockIdx.x * bd * 4 + threadIdx.x; base < n; base += step) {
        W v[4];
        I dofs[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            I i = base + u * bd;
            if (i < n) {
                if (WIDE) {
                    unsigned long long so, dof;
                    offs64(p, i, so, dof);
                    v[u] = src[so];
                    dofs[u] = (I)dof;
                } else {
                    unsigned so, dof;
                    offs32(p, (unsigned)i, so, dof);
                    v[u] = src[so];
                    dofs[u] = (I)dof;
                }
            }
        }
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            I i = base + u * bd;
            if (i < n) dst[dofs[u]] = v[u];
        }
    }
}

// dst[i] = src[off(i)] for every output word i; UNROLL words per thread, loads before stores.
template <typename W, bool WIDE>
__device__ __forceinline__ void gather(const W* __restrict__ src, W* __restrict__ dst, const PermP& p) {
    typedef typename Idx<WIDE>::T I;
    const I n = (I)p.n;
    const I bd = blockDim.x;
    const I step = (I)gridDim.x * bd * 4;
    for (I base = (I)blockIdx.x * bd * 4 + threadIdx.x; base < n; base += step) {
        W v[4];
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            I i = base + u * bd;
            if (i < n) {
                if (WIDE) v[u] = src[src_off64(p, i)];
                else v[u] = src[src_off32(p, (unsigned)i)];
            }
        }
#pragma unroll
        for (int u = 0; u < 4; ++u) {
            I i = base + u * bd;
            if (i < n) dst[i] = v[u];
        }
    }
}

// Tiled transpose of output dims (p.p, last): reads along the source's unit-stride dim p.p,
// writes along the output's last dim. Grid (ceil(nL/32), ceil(nP/32), min(batches, 65535)),
// block (32, 8); every other dim is a batch dim walked by blockIdx.z.
template <typename W, typename S>
__device__ __forceinline__ void tile(const W* __restrict__ src, W* __restrict__ dst, const PermP& p) {
    __shared__ S t[32][33];
    const int L = p.rank - 1, P = p.p;
    const unsigned long long nL = p.dims[L], nP = p.dims[P];
    const unsigned long long sL = p.strides[L], oP = p.ostr[P];
    const unsigned long long nb = p.n / (nL * nP);
    const unsigned long long l0 = (unsigned long long)blockIdx.x * 32, p0 = (unsigned long long)blockIdx.y * 32;
    const unsigned tx = threadIdx.x, ty = threadIdx.y;
    for (unsigned long long b = blockIdx.z; b < nb; b += gridDim.z) {
        unsigned long long sb = p.offset, ob = 0, q = b;
        for (int d = L - 1; d >= 0; --d) {
            if (d == P) continue;
            unsigned long long k = q % p.dims[d];
            q /= p.dims[d];
            sb += k * p.strides[d];
            ob += k * p.ostr[d];
        }
#pragma unroll
        for (int k = 0; k < 32; k += 8) {
            unsigned long long ip = p0 + tx, il = l0 + ty + k;
            if (ip < nP && il < nL) t[ty + k][tx] = (S)src[sb + ip + il * sL];
        }
        __syncthreads();
#pragma unroll
        for (int k = 0; k < 32; k += 8) {
            unsigned long long il = l0 + tx, ip = p0 + ty + k;
            if (ip < nP && il < nL) dst[ob + ip * oP + il] = (W)t[tx][ty + k];
        }
        __syncthreads();
    }
}

#define GATHER(B, W) \
extern "C" __global__ void gather_w##B##_i32(const W* src, W* dst, PermP p) { gather<W, false>(src, dst, p); } \
extern "C" __global__ void gather_w##B##_i64(const W* src, W* dst, PermP p) { gather<W, true>(src, dst, p); } \
extern "C" __global__ void gather_into_w##B##_i32(const W* src, W* dst, PermP p) { gather_into<W, false>(src, dst, p); } \
extern "C" __global__ void gather_into_w##B##_i64(const W* src, W* dst, PermP p) { gather_into<W, true>(src, dst, p); }
GATHER(2, unsigned short)
GATHER(4, unsigned int)
GATHER(8, unsigned long long)
GATHER(16, W16)
extern "C" __global__ void tile_w2(const unsigned short* src, unsigned short* dst, PermP p) { tile<unsigned short, unsigned>(src, dst, p); }
extern "C" __global__ void tile_w4(const unsigned int* src, unsigned int* dst, PermP p) { tile<unsigned int, unsigned>(src, dst, p); }
extern "C" __global__ void tile_w8(const unsigned long long* src, unsigned long long* dst, PermP p) {
    tile<unsigned long long, unsigned long long>(src, dst, p);
}
extern "C" __global__ void tile_w16(const W16* src, W16* dst, PermP p) { tile<W16, W16>(src, dst, p); }
"#;

/// Drop size-1 dims and merge neighbours `(n_a, s_a), (n_b, s_b)` with `s_a = n_b · s_b` into
/// `(n_a · n_b, s_b)`: the same element order with fewest dims. A view of one element (or no
/// dims) becomes `[1]` with stride 1.
pub fn merge_dims(dims: &[usize], strides: &[usize]) -> (Vec<usize>, Vec<usize>) {
    let (d, s, _) = merge_dims2(dims, strides, &contiguous_strides(dims));
    (d, s)
}

/// [`merge_dims`] of two stride sets over the same dims (source and destination of a copy): a
/// pair of neighbours merges only where both stride sets allow it.
pub fn merge_dims2(
    dims: &[usize],
    s1: &[usize],
    s2: &[usize],
) -> (Vec<usize>, Vec<usize>, Vec<usize>) {
    let mut d: Vec<usize> = Vec::with_capacity(dims.len());
    let mut a: Vec<usize> = Vec::with_capacity(dims.len());
    let mut b: Vec<usize> = Vec::with_capacity(dims.len());
    for ((&n, &x), &y) in dims.iter().zip(s1).zip(s2) {
        if n == 1 {
            continue;
        }
        if let (Some(ld), Some(la), Some(lb)) = (d.last_mut(), a.last_mut(), b.last_mut()) {
            if *la == x * n && *lb == y * n {
                *ld *= n;
                *la = x;
                *lb = y;
                continue;
            }
        }
        d.push(n);
        a.push(x);
        b.push(y);
    }
    if d.is_empty() {
        d.push(1);
        a.push(1);
        b.push(1);
    }
    (d, a, b)
}

/// Row-major strides of `dims`.
pub fn contiguous_strides(dims: &[usize]) -> Vec<usize> {
    let mut s = vec![1; dims.len()];
    for i in (0..dims.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * dims[i + 1];
    }
    s
}

/// Which kernel copies a [`Plan`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// Per-word gather into a contiguous output (the innermost dim has stride 1, or no dim has).
    Gather,
    /// Tiled transpose of output dim `p` (unit source stride) and the last dim.
    Tile { p: usize },
    /// Per-word gather into a strided destination (a block of a larger tensor).
    GatherInto,
}

/// A strided copy in words: `dims`/`strides`/`offset` count words of `word` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Bytes per word (2, 4, 8 or 16; a multiple of the element size).
    pub word: usize,
    /// Logical dims (innermost last) and source strides, in words, after [`merge_dims2`].
    pub dims: Vec<usize>,
    pub strides: Vec<usize>,
    /// Source start offset in words.
    pub offset: usize,
    /// Destination strides and start offset in words (contiguous and 0 for [`plan`]).
    pub dst_strides: Vec<usize>,
    pub dst_offset: usize,
    pub kernel: Kernel,
    /// 64-bit index arithmetic needed (words or offsets reach 2^31).
    pub wide: bool,
}

impl Plan {
    /// Words copied.
    pub fn words(&self) -> usize {
        self.dims.iter().product()
    }

    /// Word index in the source of logical word `i` (what the kernels compute).
    pub fn src_word(&self, i: usize) -> usize {
        Self::at(&self.dims, &self.strides, self.offset, i)
    }

    /// Word index in the destination of logical word `i`.
    pub fn dst_word(&self, i: usize) -> usize {
        Self::at(&self.dims, &self.dst_strides, self.dst_offset, i)
    }

    fn at(dims: &[usize], strides: &[usize], offset: usize, mut i: usize) -> usize {
        let mut off = offset;
        for d in (1..dims.len()).rev() {
            off += (i % dims[d]) * strides[d];
            i /= dims[d];
        }
        off + i * strides[0]
    }
}

/// The copy plan of a view with `dims`, element `strides` and start `offset` of `elem`-byte
/// elements into a new contiguous tensor; `None` when no kernel applies (empty view, element
/// size not 2/4/8, more than [`MAX_RANK`] dims after merging).
pub fn plan(dims: &[usize], strides: &[usize], offset: usize, elem: usize) -> Option<Plan> {
    plan_into(dims, strides, offset, &contiguous_strides(dims), 0, elem)
}

/// The copy plan of a source view (`dims`, `strides`, `offset`) into a destination view of the
/// same dims (`dst_strides`, `dst_offset`), elements of `elem` bytes; `None` as for [`plan`].
pub fn plan_into(
    dims: &[usize],
    strides: &[usize],
    offset: usize,
    dst_strides: &[usize],
    dst_offset: usize,
    elem: usize,
) -> Option<Plan> {
    if !matches!(elem, 2 | 4 | 8)
        || dims.len() != strides.len()
        || dims.len() != dst_strides.len()
        || dims.contains(&0)
    {
        return None;
    }
    let (mut d, mut s, mut t) = merge_dims2(dims, strides, dst_strides);
    let (mut off, mut doff) = (offset, dst_offset);
    let mut word = elem;
    let r = d.len();
    if s[r - 1] == 1 && t[r - 1] == 1 {
        // Widest word (≤ 16 bytes) dividing the row length, both offsets and every outer stride.
        let mut w = 16;
        while w > elem {
            let v = w / elem;
            if d[r - 1].is_multiple_of(v)
                && off.is_multiple_of(v)
                && doff.is_multiple_of(v)
                && s[..r - 1].iter().all(|x| x.is_multiple_of(v))
                && t[..r - 1].iter().all(|x| x.is_multiple_of(v))
            {
                break;
            }
            w /= 2;
        }
        let v = w / elem;
        if v > 1 {
            word = w;
            d[r - 1] /= v;
            for x in s[..r - 1].iter_mut().chain(t[..r - 1].iter_mut()) {
                *x /= v;
            }
            off /= v;
            doff /= v;
            (d, s, t) = merge_dims2(&d, &s, &t);
        }
    }
    if d.len() > MAX_RANK {
        return None;
    }
    let r = d.len();
    let dst_contiguous = doff == 0 && t == contiguous_strides(&d);
    let kernel = if !dst_contiguous {
        Kernel::GatherInto
    } else if s[r - 1] == 1 {
        Kernel::Gather
    } else {
        match (0..r - 1).rev().find(|&i| s[i] == 1) {
            Some(p)
                if d[p].div_ceil(TILE) <= 65535 && d[r - 1].div_ceil(TILE) < i32::MAX as usize =>
            {
                Kernel::Tile { p }
            }
            _ => Kernel::Gather,
        }
    };
    let words: usize = d.iter().product();
    let last =
        |o: usize, st: &[usize]| o + d.iter().zip(st).map(|(n, x)| (n - 1) * x).sum::<usize>();
    let lim = 1usize << 31;
    let wide = words >= lim || last(off, &s) >= lim || last(doff, &t) >= lim;
    Some(Plan {
        word,
        dims: d,
        strides: s,
        offset: off,
        dst_strides: t,
        dst_offset: doff,
        kernel,
        wide,
    })
}

/// Destination strides of a part with `dims` (row-major `rows × w` elements) written as the
/// column block of width `w` of a row-major `[rows, ld]` matrix: the trailing dims whose product
/// is `w` are the columns. `None` when no trailing dims multiply to exactly `w`.
pub fn col_block_strides(dims: &[usize], w: usize, ld: usize) -> Option<Vec<usize>> {
    let r = dims.len();
    let mut k = r;
    let mut acc = 1usize;
    while acc < w {
        if k == 0 {
            return None;
        }
        k -= 1;
        acc *= dims[k];
    }
    if acc != w {
        return None;
    }
    let mut st = vec![0usize; r];
    let mut c = 1usize;
    for j in (k..r).rev() {
        st[j] = c;
        c *= dims[j];
    }
    let mut c = ld;
    for j in (0..k).rev() {
        st[j] = c;
        c *= dims[j];
    }
    Some(st)
}

/// `(mul, shr)` with `n / d = (umulhi(n, mul) + n) >> shr` for all `n, d < 2^31`, `d ≥ 1`
/// (division by an invariant integer with a 32-bit multiplier).
pub fn magic(d: u32) -> (u32, u32) {
    let d = d.max(1) as u64;
    let shr = 64 - (d - 1).leading_zeros() as u64; // ceil(log2 d); 0 for d = 1
    let shr = if d == 1 { 0 } else { shr };
    let mul = ((1u64 << 32) * ((1u64 << shr) - d)) / d + 1;
    (mul as u32, shr as u32)
}

/// The kernels' quotient from [`magic`]'s `(mul, shr)` (CPU emulation, for tests).
pub fn magic_div(n: u32, mul: u32, shr: u32) -> u32 {
    let hi = ((n as u64 * mul as u64) >> 32) as u32;
    ((hi as u64 + n as u64) >> shr) as u32
}

/// Whether the permute kernel may be used (on top of [`super::fused_enabled`]): default on;
/// `FERROFOLD_FUSED_PERMUTE=0` (or `false`/`off`) turns only this kernel off, for A/B timings.
pub fn permute_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        !matches!(
            std::env::var("FERROFOLD_FUSED_PERMUTE").as_deref(),
            Ok("0") | Ok("false") | Ok("off")
        )
    })
}

/// Whether `t` (not contiguous) would be copied by the kernel.
pub fn kernel_applies(t: &Tensor) -> bool {
    cfg!(feature = "cuda")
        && t.device().is_cuda()
        && matches!(
            t.dtype(),
            DType::F16 | DType::BF16 | DType::F32 | DType::F64
        )
        && super::fused_enabled()
        && permute_enabled()
        && plan(
            t.dims(),
            t.layout().stride(),
            t.layout().start_offset(),
            t.dtype().size_in_bytes(),
        )
        .is_some()
}

/// Plain-candle twin of [`contiguous`].
pub fn contiguous_twin(t: &Tensor) -> Result<Tensor> {
    Ok(t.contiguous()?)
}

/// `t` as a contiguous tensor (same values, shape and gradient flow as `Tensor::contiguous`):
/// a cheap clone when already contiguous, the permute kernel on CUDA ([`kernel_applies`]),
/// candle's copy otherwise.
pub fn contiguous(t: &Tensor) -> Result<Tensor> {
    Ok(contig_c(t)?)
}

/// [`contiguous`] with candle's error type (for use inside candle ops and call chains).
fn contig_c(t: &Tensor) -> candle_core::Result<Tensor> {
    if t.is_contiguous() {
        return Ok(t.clone());
    }
    if kernel_applies(t) {
        #[cfg(feature = "cuda")]
        {
            return t.apply_op1_arc(cuda::op());
        }
    }
    t.contiguous()
}

/// Plain-candle twin of [`cat_cols`].
pub fn cat_cols_twin(parts: &[Tensor], rows: usize) -> Result<Tensor> {
    let ps = parts
        .iter()
        .map(|p| {
            Ok(p.contiguous()?
                .reshape((rows, p.elem_count() / rows.max(1)))?)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&ps, 1)?)
}

/// The parts side by side as `[rows, Σ w_k]`: part `k` is any view of `rows · w_k` elements,
/// read in row-major order as `[rows, w_k]` (e.g. attention heads `[B, N, H, C]` as a transposed
/// view of `[B, H, N, C]`: the head merge and the concatenation in one pass). On CUDA (parts of
/// one supported dtype, no part recording a graph, kernels enabled) one strided copy per part
/// straight into its column block; candle's `contiguous` + `reshape` + `cat` otherwise (which
/// keeps autograd).
pub fn cat_cols(parts: &[Tensor], rows: usize) -> Result<Tensor> {
    let bad = |m: &str| Err(crate::error::Error::Model(format!("cat_cols: {m}")));
    let Some(first) = parts.first() else {
        return bad("no parts");
    };
    if rows == 0 || parts.iter().any(|p| !p.elem_count().is_multiple_of(rows)) {
        return bad("a part's size is not a multiple of the row count");
    }
    if parts
        .iter()
        .any(|p| p.dtype() != first.dtype() || !p.device().same_device(first.device()))
    {
        return bad("parts differ in dtype or device");
    }
    let fast = cfg!(feature = "cuda")
        && first.device().is_cuda()
        && matches!(
            first.dtype(),
            DType::F16 | DType::BF16 | DType::F32 | DType::F64
        )
        && super::fused_enabled()
        && permute_enabled()
        && !parts.iter().any(|p| p.track_op());
    if fast {
        #[cfg(feature = "cuda")]
        {
            return Ok(cuda::cat_cols(parts, rows)?);
        }
    }
    cat_cols_twin(parts, rows)
}

/// `t.transpose(d1, d2)` made contiguous by [`contiguous`].
pub fn transpose_contiguous(t: &Tensor, d1: usize, d2: usize) -> Result<Tensor> {
    contiguous(&t.transpose(d1, d2)?)
}

/// `t.permute(dims)` made contiguous by [`contiguous`].
pub fn permute_contiguous(t: &Tensor, dims: &[usize]) -> Result<Tensor> {
    contiguous(&t.permute(dims)?)
}

/// [`contiguous`] as a method, for call chains: `x.transpose(0, 1)?.contig()?`.
pub trait Contig {
    /// See [`contiguous`] (candle's error type, so it chains inside candle ops too).
    fn contig(&self) -> candle_core::Result<Tensor>;
}

impl Contig for Tensor {
    fn contig(&self) -> candle_core::Result<Tensor> {
        contig_c(self)
    }
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::{Arc, OnceLock};

    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, WrapErr};
    use candle_core::{CpuStorage, CustomOp1, DType, Layout, Shape, Tensor};
    use cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};

    use super::{
        col_block_strides, magic, plan, plan_into, Kernel, Plan, GATHER_BLOCK, MAX_RANK, MODULE,
        SOURCE, TILE, UNROLL,
    };
    use crate::kernels::launch::{cerr, cuda_storage, func, tensor_from_slice};

    /// Kernel parameters (mirrors `PermP` in the CUDA source).
    #[repr(C)]
    #[derive(Debug, Clone, Copy, Default)]
    struct PermP {
        n: u64,
        offset: u64,
        dims: [u64; MAX_RANK],
        strides: [u64; MAX_RANK],
        ostr: [u64; MAX_RANK],
        mul: [u32; MAX_RANK],
        shr: [u32; MAX_RANK],
        rank: i32,
        p: i32,
        doff: u64,
    }

    // SAFETY: plain-old-data `#[repr(C)]` struct of integers, mirrored by `PermP` in the source.
    unsafe impl DeviceRepr for PermP {}

    fn params(pl: &Plan) -> PermP {
        let mut p = PermP {
            n: pl.words() as u64,
            offset: pl.offset as u64,
            rank: pl.dims.len() as i32,
            p: match pl.kernel {
                Kernel::Tile { p } => p as i32,
                _ => -1,
            },
            doff: pl.dst_offset as u64,
            ..Default::default()
        };
        for i in (0..pl.dims.len()).rev() {
            p.dims[i] = pl.dims[i] as u64;
            p.strides[i] = pl.strides[i] as u64;
            p.ostr[i] = pl.dst_strides[i] as u64;
            if !pl.wide {
                let (m, s) = magic(pl.dims[i] as u32);
                p.mul[i] = m;
                p.shr[i] = s;
            }
        }
        p
    }

    /// The permute op: forward = strided copy, backward = identity.
    struct PermuteOp;

    /// One shared instance (no allocation per call).
    pub(super) fn op() -> Arc<Box<dyn CustomOp1 + Send + Sync>> {
        static OP: OnceLock<Arc<Box<dyn CustomOp1 + Send + Sync>>> = OnceLock::new();
        OP.get_or_init(|| Arc::new(Box::new(PermuteOp))).clone()
    }

    fn launch<T: CudaDType + DeviceRepr>(
        s: &CudaStorage,
        pl: &Plan,
        elems: usize,
    ) -> candle_core::Result<CudaStorage> {
        let dev = s.device();
        // SAFETY: every output word (hence element) is written by the kernel.
        let mut out = unsafe { dev.alloc::<T>(elems)? };
        launch_into(dev, s.as_cuda_slice::<T>()?, &mut out, pl)?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
    }

    /// Copy `pl`'s words from `src` into `dst` (contiguous from 0 or at `pl`'s destination
    /// strides). The caller guarantees that `pl` addresses words inside both buffers.
    fn launch_into<T: CudaDType + DeviceRepr>(
        dev: &CudaDevice,
        src: &CudaSlice<T>,
        dst: &mut CudaSlice<T>,
        pl: &Plan,
    ) -> candle_core::Result<()> {
        let p = params(pl);
        let gather_cfg = || {
            let per_block = GATHER_BLOCK * UNROLL;
            let blocks = pl.words().div_ceil(per_block).clamp(1, 1 << 20) as u32;
            LaunchConfig {
                grid_dim: (blocks, 1, 1),
                block_dim: (GATHER_BLOCK as u32, 1, 1),
                shared_mem_bytes: 0,
            }
        };
        let iw = if pl.wide { 64 } else { 32 };
        let (name, cfg) = match pl.kernel {
            Kernel::Gather => (format!("gather_w{}_i{iw}", pl.word), gather_cfg()),
            Kernel::GatherInto => (format!("gather_into_w{}_i{iw}", pl.word), gather_cfg()),
            Kernel::Tile { p: dp } => {
                let r = pl.dims.len();
                let (nl, np) = (pl.dims[r - 1], pl.dims[dp]);
                let nb = pl.words() / (nl * np);
                (
                    format!("tile_w{}", pl.word),
                    LaunchConfig {
                        grid_dim: (
                            nl.div_ceil(TILE) as u32,
                            np.div_ceil(TILE) as u32,
                            nb.clamp(1, 65535) as u32,
                        ),
                        block_dim: (TILE as u32, 8, 1),
                        shared_mem_bytes: 0,
                    },
                )
            }
        };
        let f = func(dev, MODULE, SOURCE, &name)?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(src).arg(dst).arg(&p);
        // SAFETY: the kernel reads source words `offset + Σ idx·stride` and writes destination
        // words `dst_offset + Σ idx·dst_stride` (or `0..words()`), inside both buffers by the
        // callers' layouts; word alignment: the word divides the offsets and every outer stride
        // (`plan_into`).
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    }

    /// [`super::cat_cols`] on CUDA: one allocation, one strided copy per part into its columns.
    pub(super) fn cat_cols(parts: &[Tensor], rows: usize) -> candle_core::Result<Tensor> {
        match parts[0].dtype() {
            DType::F32 => cat_cols_t::<f32>(parts, rows),
            DType::BF16 => cat_cols_t::<half::bf16>(parts, rows),
            DType::F16 => cat_cols_t::<half::f16>(parts, rows),
            DType::F64 => cat_cols_t::<f64>(parts, rows),
            other => candle_core::bail!("ferrofold-permute: unsupported dtype {other:?}"),
        }
    }

    fn cat_cols_t<T: CudaDType + DeviceRepr>(
        parts: &[Tensor],
        rows: usize,
    ) -> candle_core::Result<Tensor> {
        let ws: Vec<usize> = parts.iter().map(|p| p.elem_count() / rows).collect();
        let ld: usize = ws.iter().sum();
        let elem = parts[0].dtype().size_in_bytes();
        let dev = match parts[0].device() {
            candle_core::Device::Cuda(d) => d.clone(),
            _ => candle_core::bail!("cat_cols: not a CUDA tensor"),
        };
        // SAFETY: every column block is written by its part's copy (the blocks tile [0, ld)).
        let mut out = unsafe { dev.alloc::<T>(rows * ld)? };
        let mut off = 0;
        for (p, &w) in parts.iter().zip(&ws) {
            if w == 0 {
                continue;
            }
            let direct = col_block_strides(p.dims(), w, ld).and_then(|st| {
                plan_into(
                    p.dims(),
                    p.layout().stride(),
                    p.layout().start_offset(),
                    &st,
                    off,
                    elem,
                )
            });
            // Parts whose trailing dims do not split at `w`: contiguous first, then `[rows, w]`.
            let (t, pl) = match direct {
                Some(pl) => (p.clone(), pl),
                None => {
                    let t = super::contig_c(p)?;
                    let pl = plan_into(
                        &[rows, w],
                        &[w, 1],
                        t.layout().start_offset(),
                        &[ld, 1],
                        off,
                        elem,
                    )
                    .ok_or_else(|| cerr("cat_cols: no plan"))?;
                    (t, pl)
                }
            };
            let (st, _) = t.storage_and_layout();
            let src = cuda_storage(&st)?.as_cuda_slice::<T>()?;
            launch_into(&dev, src, &mut out, &pl)?;
            off += w;
        }
        Ok(tensor_from_slice(out, &dev, &(rows, ld).into()))
    }

    impl CustomOp1 for PermuteOp {
        fn name(&self) -> &'static str {
            "ferrofold-permute"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            candle_core::bail!("ferrofold-permute: CUDA only (use kernels::permute::contiguous)")
        }

        fn cuda_fwd(
            &self,
            s: &CudaStorage,
            l: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let dt = s.dtype();
            let pl = plan(l.dims(), l.stride(), l.start_offset(), dt.size_in_bytes())
                .ok_or_else(|| cerr(format!("ferrofold-permute: no plan for {l:?}")))?;
            let n = l.shape().elem_count();
            let out = match dt {
                DType::F32 => launch::<f32>(s, &pl, n)?,
                DType::BF16 => launch::<half::bf16>(s, &pl, n)?,
                DType::F16 => launch::<half::f16>(s, &pl, n)?,
                DType::F64 => launch::<f64>(s, &pl, n)?,
                other => candle_core::bail!("ferrofold-permute: unsupported dtype {other:?}"),
            };
            Ok((out, l.shape().clone()))
        }

        fn bwd(
            &self,
            _arg: &Tensor,
            _res: &Tensor,
            grad_res: &Tensor,
        ) -> candle_core::Result<Option<Tensor>> {
            // The gradient of a copy is the incoming gradient (same shape).
            Ok(Some(grad_res.clone()))
        }
    }
}

/// A narrow `(dim, start, len)`.
type Narrow = (usize, usize, usize);

/// A bench case: name, base dims, permutation, narrow.
type BenchCase = (&'static str, Vec<usize>, Vec<usize>, Option<Narrow>);

/// `base` narrowed by `narrow` (if any), then permuted by `perm`.
fn view_of(base: &Tensor, perm: &[usize], narrow: Option<Narrow>) -> Result<Tensor> {
    let t = match narrow {
        Some((d, start, len)) => base.narrow(d, start, len)?,
        None => base.clone(),
    };
    Ok(t.permute(perm)?)
}

/// Kernel vs candle's strided copy: exact equality (copies are bit-exact) over permutations of
/// rank-3/4 tensors with odd sizes, narrowed views and the trunk's shapes, f32/bf16/f16/f64, on
/// `dev` (a CUDA device); plus the gradient through the op.
pub fn self_check(dev: &Device) -> Result<Vec<ElemCheck>> {
    let mut out = Vec::new();
    let cases: Vec<(Vec<usize>, Vec<usize>, Option<Narrow>)> = vec![
        (vec![5, 7, 9], vec![1, 0, 2], None),
        (vec![5, 7, 9], vec![2, 1, 0], None),
        (vec![6, 8, 16], vec![1, 0, 2], Some((2, 8, 8))),
        (vec![3, 33, 4, 40], vec![0, 2, 1, 3], None),
        (vec![3, 33, 4, 40], vec![0, 3, 1, 2], Some((3, 1, 37))),
        (vec![16, 24, 4, 8, 32], vec![0, 3, 1, 4, 2], Some((2, 1, 1))),
        (vec![64, 96, 8], vec![2, 0, 1], None),
    ];
    for (k, (dims, perm, nar)) in cases.iter().enumerate() {
        for dtype in [DType::F32, DType::BF16, DType::F16, DType::F64] {
            let base = super::uniform_tensor(dims, 1.0, 0x9e_0000 + k as u64, dtype, dev)?;
            let v = view_of(&base, perm, *nar)?;
            let got = contiguous(&v)?;
            let want = contiguous_twin(&v)?;
            let pl = plan(
                v.dims(),
                v.layout().stride(),
                v.layout().start_offset(),
                dtype.size_in_bytes(),
            );
            out.push(ElemCheck {
                op: "permute".into(),
                case: format!(
                    "{dims:?} p{perm:?} n{nar:?} {dtype:?} {}",
                    pl.map(|p| format!("{:?} w{}", p.kernel, p.word))
                        .unwrap_or_default()
                ),
                max_err: max_abs_diff(&got, &want)?,
                tol: 0.0,
            });
        }
    }
    // cat_cols: head views, a contiguous block, a transposed block and an odd narrow.
    for dtype in [DType::F32, DType::BF16, DType::F16] {
        let (b, n, h, c) = (3, 17, 4, 8);
        let rows = b * n;
        let heads = super::uniform_tensor(&[b * h, n, c], 1.0, 0x9f_0001, dtype, dev)?;
        let hv = heads.reshape((b, h, n, c))?.transpose(1, 2)?;
        let plain = super::uniform_tensor(&[rows, 5], 1.0, 0x9f_0002, dtype, dev)?;
        let tr = super::uniform_tensor(&[3, rows], 1.0, 0x9f_0003, dtype, dev)?.t()?;
        let nar = super::uniform_tensor(&[rows, 9], 1.0, 0x9f_0004, dtype, dev)?.narrow(1, 1, 7)?;
        let parts = [hv, plain, tr, nar];
        out.push(ElemCheck {
            op: "cat_cols".into(),
            case: format!("rows {rows} {dtype:?}"),
            max_err: max_abs_diff(&cat_cols(&parts, rows)?, &cat_cols_twin(&parts, rows)?)?,
            tol: 0.0,
        });
    }
    Ok(out)
}

/// `max |a − b|` in f64 (NaN-propagating through the comparison: NaN if shapes differ).
fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    if a.dims() != b.dims() {
        return Ok(f64::NAN);
    }
    let a = a.to_dtype(DType::F64)?;
    let b = b.to_dtype(DType::F64)?;
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?)
}

/// Kernel vs candle timings at the Evoformer's copy shapes (bf16): the attention head split
/// `[128, 256, 8, 32] → [128, 8, 256, 32]`, the head split out of the joint q/k/v/g projection,
/// the outer product's `[256, 32, 256, 32] → [256, 256, 32, 32]`, the column transpose
/// `[256, 256, 128]` 0↔1 and the triangle bias `[256, 256, 8] → [8, 256, 256]`. The case string
/// ends with the effective bandwidth (read + write bytes / time) of both.
pub fn bench_rows(dev: &Device, iters: usize) -> Result<Vec<ElemBenchRow>> {
    let dt = DType::BF16;
    let mut rows = Vec::new();
    let cases: Vec<BenchCase> = vec![
        ("head split", vec![128, 256, 8, 32], vec![0, 2, 1, 3], None),
        (
            "head split of qkvg",
            vec![128, 256, 32, 32],
            vec![0, 2, 1, 3],
            Some((2, 8, 8)),
        ),
        ("OPM outer", vec![256, 32, 256, 32], vec![0, 2, 1, 3], None),
        ("swap 0<->1", vec![256, 256, 128], vec![1, 0, 2], None),
        ("tri bias", vec![256, 256, 8], vec![2, 0, 1], None),
        ("swap 1<->2", vec![256, 256, 128], vec![0, 2, 1], None),
    ];
    for (name, dims, perm, nar) in cases {
        let base = super::uniform_tensor(&dims, 1.0, 11, dt, dev)?;
        let v = view_of(&base, &perm, nar)?;
        let fused_ms = super::median_ms(dev, 3, iters, || contiguous(&v).map(|_| ()))?;
        let twin_ms = super::median_ms(dev, 3, iters, || contiguous_twin(&v).map(|_| ()))?;
        let bytes = 2.0 * (v.elem_count() * dt.size_in_bytes()) as f64;
        let gbs = |ms: f64| bytes / (ms * 1e-3) / 1e9;
        rows.push(ElemBenchRow {
            op: format!("permute {name}"),
            case: format!(
                "{:?} {:.0}|{:.0} GB/s",
                v.dims(),
                gbs(fused_ms),
                gbs(twin_ms)
            ),
            fused_ms,
            twin_ms,
            max_err: max_abs_diff(&contiguous(&v)?, &contiguous_twin(&v)?)?,
        });
    }
    // Attention backward: dq, dk, dv heads merged and joined with d_g into [B·N, 4·H·C].
    let (b, n, h, c) = (128usize, 256usize, 8usize, 32usize);
    let hs = (0..3)
        .map(|k| super::uniform_tensor(&[b * h, n, c], 1.0, 20 + k, dt, dev))
        .collect::<Result<Vec<_>>>()?;
    let dg = super::uniform_tensor(&[b * n, h * c], 1.0, 23, dt, dev)?;
    let views = |merge: bool| -> Result<Vec<Tensor>> {
        let mut v = hs
            .iter()
            .map(|t| {
                let t = t.reshape((b, h, n, c))?.transpose(1, 2)?;
                Ok(if merge {
                    t.contiguous()?.reshape((b * n, h * c))?
                } else {
                    t
                })
            })
            .collect::<Result<Vec<_>>>()?;
        v.push(dg.clone());
        Ok(v)
    };
    let fused_ms = super::median_ms(dev, 3, iters, || {
        cat_cols(&views(false)?, b * n).map(|_| ())
    })?;
    let twin_ms = super::median_ms(dev, 3, iters, || {
        cat_cols_twin(&views(true)?, b * n).map(|_| ())
    })?;
    let bytes = 2.0 * (4 * b * n * h * c * dt.size_in_bytes()) as f64;
    let gbs = |ms: f64| bytes / (ms * 1e-3) / 1e9;
    rows.push(ElemBenchRow {
        op: "cat_cols merge+cat".into(),
        case: format!(
            "[{}, {}] {:.0}|{:.0} GB/s",
            b * n,
            4 * h * c,
            gbs(fused_ms),
            gbs(twin_ms)
        ),
        fused_ms,
        twin_ms,
        max_err: max_abs_diff(
            &cat_cols(&views(false)?, b * n)?,
            &cat_cols_twin(&views(true)?, b * n)?,
        )?,
    });
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Source element index of output element `i` of a strided view, directly.
    fn naive_src(dims: &[usize], strides: &[usize], offset: usize, mut i: usize) -> usize {
        let mut off = offset;
        for d in (0..dims.len()).rev() {
            off += (i % dims[d]) * strides[d];
            i /= dims[d];
        }
        off
    }

    /// Every output element of the plan's word copy comes from the right source element, for a
    /// view `perm` of a contiguous `dims` tensor narrowed along `nar`.
    fn check_view(
        dims: &[usize],
        perm: &[usize],
        nar: Option<(usize, usize, usize)>,
        elem: usize,
    ) -> Plan {
        let st = contiguous_strides(dims);
        let mut vd = dims.to_vec();
        let mut off = 0;
        if let Some((d, start, len)) = nar {
            off = start * st[d];
            vd[d] = len;
        }
        let pd: Vec<usize> = perm.iter().map(|&p| vd[p]).collect();
        let ps: Vec<usize> = perm.iter().map(|&p| st[p]).collect();
        let pl = plan(&pd, &ps, off, elem).expect("plan");
        let n: usize = pd.iter().product();
        let v = pl.word / elem;
        assert_eq!(pl.words() * v, n, "{pd:?} {ps:?} {pl:?}");
        assert_eq!(pl.offset * v, off);
        for i in 0..n {
            let (w, e) = (i / v, i % v);
            let got = pl.src_word(w) * v + e;
            assert_eq!(
                got,
                naive_src(&pd, &ps, off, i),
                "{dims:?} perm {perm:?} nar {nar:?} elem {elem} plan {pl:?} i {i}"
            );
        }
        // Tile plans: the tile dim has unit stride and the last one not.
        if let Kernel::Tile { p } = pl.kernel {
            assert_eq!(pl.strides[p], 1);
            assert_ne!(*pl.strides.last().unwrap(), 1);
        }
        pl
    }

    fn permutations(n: usize) -> Vec<Vec<usize>> {
        if n == 0 {
            return vec![vec![]];
        }
        let mut out = Vec::new();
        for p in permutations(n - 1) {
            for k in 0..n {
                let mut q = p.clone();
                q.insert(k, n - 1);
                out.push(q);
            }
        }
        out
    }

    #[test]
    fn merge_drops_unit_dims_and_merges_collapsible() {
        // Contiguous → one dim.
        assert_eq!(merge_dims(&[2, 3, 4], &[12, 4, 1]), (vec![24], vec![1]));
        // Size-1 dims vanish whatever their stride.
        assert_eq!(
            merge_dims(&[2, 1, 3, 1], &[3, 99, 1, 7]),
            (vec![6], vec![1])
        );
        // Transpose of the two outer dims of [A, B, C]: nothing merges.
        assert_eq!(
            merge_dims(&[3, 2, 4], &[4, 12, 1]),
            (vec![3, 2, 4], vec![4, 12, 1])
        );
        // [B, N, H, C] → [B, H, N, C] with B merged only when collapsible.
        assert_eq!(
            merge_dims(&[2, 8, 5, 32], &[5 * 8 * 32, 32, 8 * 32, 1]),
            (vec![2, 8, 5, 32], vec![1280, 32, 256, 1])
        );
        // Scalar / single element.
        assert_eq!(merge_dims(&[], &[]), (vec![1], vec![1]));
        assert_eq!(merge_dims(&[1, 1], &[5, 9]), (vec![1], vec![1]));
        // Broadcast (stride 0) dims merge with each other.
        assert_eq!(
            merge_dims(&[3, 4, 5], &[0, 0, 1]),
            (vec![12, 5], vec![0, 1])
        );
    }

    #[test]
    fn plan_picks_words_and_kernels() {
        // Head split, bf16: rows of 32 channels = four 16-byte words, gather.
        let pl = check_view(&[4, 6, 8, 32], &[0, 2, 1, 3], None, 2);
        assert_eq!((pl.word, pl.kernel), (16, Kernel::Gather));
        // Rows of 8 bf16 = one word: the copy becomes a word transpose (tile).
        let pl = check_view(&[5, 7, 8], &[1, 0, 2], None, 2);
        assert_eq!(pl.word, 16);
        assert_eq!(pl.kernel, Kernel::Tile { p: 0 });
        // Last axis moved: element tile (the two leading output dims merge).
        let pl = check_view(&[6, 9, 4], &[2, 0, 1], None, 4);
        assert_eq!(pl.dims, vec![4, 54]);
        assert_eq!((pl.word, pl.kernel), (4, Kernel::Tile { p: 0 }));
        // Odd row length: element words, gather.
        let pl = check_view(&[3, 5, 7], &[1, 0, 2], None, 2);
        assert_eq!((pl.word, pl.kernel), (2, Kernel::Gather));
        // Narrow with an odd offset: the word shrinks to what the offset allows.
        let pl = check_view(&[4, 3, 16], &[1, 0, 2], Some((2, 2, 8)), 2);
        assert_eq!(pl.word, 4);
        let pl = check_view(&[4, 3, 16], &[1, 0, 2], Some((2, 8, 8)), 2);
        assert_eq!(pl.word, 16);
        // A contiguous narrow is one 1-D word run.
        let pl = check_view(&[4, 3, 16], &[0, 1, 2], Some((0, 1, 2)), 4);
        assert_eq!(pl.dims.len(), 1);
        // Stepped view without a unit-stride dim: gather.
        let pl = plan(&[3, 4], &[10, 2], 1, 4).unwrap();
        assert_eq!((pl.word, pl.kernel), (4, Kernel::Gather));
        // Unsupported element size, empty views, too many dims.
        assert!(plan(&[3, 4], &[1, 3], 0, 1).is_none());
        assert!(plan(&[3, 0], &[1, 3], 0, 4).is_none());
        let d7 = [2usize; 7];
        let s7 = [1usize, 4, 16, 64, 2, 8, 32];
        assert!(plan(&d7, &s7, 0, 4).is_none());
        // Index width.
        let big = plan(&[1 << 16, 1 << 15], &[1, 1 << 16], 0, 4).unwrap();
        assert!(big.wide);
        assert!(!plan(&[1 << 10, 1 << 10], &[1, 1 << 10], 0, 4).unwrap().wide);
    }

    /// Every permutation of rank-3/4/5 tensors with odd and size-1 dims, with and without a
    /// narrow, for 2-, 4- and 8-byte elements.
    #[test]
    fn plans_address_every_element_of_all_permutations() {
        let shapes: [&[usize]; 6] = [
            &[3, 5, 7],
            &[4, 1, 16],
            &[2, 3, 4, 8],
            &[5, 1, 3, 6],
            &[2, 3, 2, 5, 8],
            &[1, 4, 3, 1, 9],
        ];
        for dims in shapes {
            for perm in permutations(dims.len()) {
                for elem in [2, 4, 8] {
                    check_view(dims, &perm, None, elem);
                    let last = dims.len() - 1;
                    if dims[last] > 2 {
                        check_view(dims, &perm, Some((last, 1, dims[last] - 2)), elem);
                    }
                    if dims[0] > 1 {
                        check_view(dims, &perm, Some((0, 1, dims[0] - 1)), elem);
                    }
                }
            }
        }
    }

    /// Column-block destinations ([`col_block_strides`] + [`plan_into`]): every element of each
    /// part lands at `row · ld + off + col` and comes from its source element.
    #[test]
    fn col_block_plans_address_the_right_columns() {
        let (b, n, h, c) = (2, 3, 4, 8);
        // Heads [B, H, N, C] viewed as [B, N, H, C]; a contiguous [B·N, 5]; a transposed
        // [B·N, 3] (= [3, B·N] contiguous, transposed); a narrow with an odd offset.
        let heads = (vec![b, n, h, c], vec![h * n * c, c, n * c, 1], 0usize);
        let plain = (vec![b * n, 5], vec![5, 1], 0);
        let trans = (vec![b * n, 3], vec![1, b * n], 0);
        let narrowed = (vec![b * n, 7], vec![9, 1], 1);
        let parts = [heads, plain, trans, narrowed];
        let rows = b * n;
        let ws: Vec<usize> = parts
            .iter()
            .map(|(d, _, _)| d.iter().product::<usize>() / rows)
            .collect();
        let ld: usize = ws.iter().sum();
        for elem in [2, 4, 8] {
            let mut off = 0;
            for ((dims, st, o), &w) in parts.iter().zip(&ws) {
                let dst = col_block_strides(dims, w, ld).expect("split");
                let pl = plan_into(dims, st, *o, &dst, off, elem).expect("plan");
                let v = pl.word / elem;
                for i in 0..rows * w {
                    let (wi, e) = (i / v, i % v);
                    assert_eq!(pl.src_word(wi) * v + e, naive_src(dims, st, *o, i));
                    assert_eq!(pl.dst_word(wi) * v + e, (i / w) * ld + off + i % w);
                }
                off += w;
            }
        }
        // No trailing dims multiply to the width.
        assert!(col_block_strides(&[4, 6], 4, 10).is_none());
        assert_eq!(col_block_strides(&[2, 3, 4], 12, 20), Some(vec![20, 4, 1]));
    }

    #[test]
    fn magic_division_is_exact() {
        let mut st = 0x1234_5678_u64;
        let mut ds: Vec<u32> = vec![1, 2, 3, 5, 7, 8, 31, 32, 33, 255, 256, 1000, 65535, 65536];
        ds.extend([(1u32 << 30) + 1, (1 << 31) - 1, 1 << 31]);
        for _ in 0..200 {
            ds.push((crate::data::rng::splitmix64(&mut st) % (1 << 31)) as u32 + 1);
        }
        for &d in &ds {
            let (m, s) = magic(d);
            let mut ns: Vec<u32> = vec![0, 1, d - 1, d, d.wrapping_add(1), (1 << 31) - 1];
            for _ in 0..200 {
                ns.push((crate::data::rng::splitmix64(&mut st) % (1 << 31)) as u32);
            }
            for n in ns {
                if n >= 1 << 31 {
                    continue;
                }
                assert_eq!(magic_div(n, m, s), n / d, "n {n} d {d}");
            }
        }
    }

    /// CPU: the entry points are candle's copy.
    #[test]
    fn cpu_dispatch_is_candle() {
        let x = Tensor::arange(0f32, 24.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 3, 4))
            .unwrap();
        let y = transpose_contiguous(&x, 0, 2).unwrap();
        assert!(y.is_contiguous());
        let want = x.transpose(0, 2).unwrap().contiguous().unwrap();
        assert_eq!(
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            want.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
        let z = permute_contiguous(&x, &[1, 2, 0]).unwrap();
        assert_eq!(z.dims(), &[3, 4, 2]);
        let c = x.contig().unwrap();
        assert!(c.is_contiguous());
        assert!(!kernel_applies(&x.t().unwrap()));
    }
}
