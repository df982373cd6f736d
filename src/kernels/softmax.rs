//! Fused CUDA softmax over the last dimension with up to two additive broadcast biases: the
//! attention core `softmax(x + b1 + b2)` of AF2 supplement Algorithms 7, 8, 13, 14 (mask bias
//! first, then the pair/triangle bias, as OpenFold adds them).
//!
//! - Forward: one warp per row (`x` contiguous, f32 or bf16); the biases are read through their
//!   own strides (0 on broadcast dims, so no broadcast bias or biased logit is materialised); the
//!   sum `(x + b1) + b2`, max, exp and normalisation are f32; the output has `x`'s dtype. Rows up to
//!   1024 are held in registers (`V` values per lane); longer rows use a two-pass online-softmax
//!   kernel.
//! - Backward: `dx = y · (g − Σ_j g_j y_j)` (one pass per row, f32 accumulation). A bias gradient
//!   is `dx` summed to the bias's shape: for a bias broadcast over a leading prefix of dims (the
//!   pair bias `[1, H, Q, K]` of `[B, H, Q, K]` logits) a deterministic kernel sums over the prefix
//!   in a fixed order with f32 accumulation; other broadcast patterns use candle's sums in f32.

use candle_core::Tensor;

use crate::error::Result;

/// NVRTC module name.
pub const MODULE: &str = "ff_softmax";

/// CUDA C source of the module.
#[cfg(feature = "cuda")]
pub const SRC: &str = concat!(
    crate::ff_cuda_prelude!(),
    r#"
template <typename T, int N> struct alignas(sizeof(T) * N) Pack { T v[N]; };
struct SmBias { long long off; long long st[4]; long long sk; };
struct SmParams { SmBias b1; SmBias b2; int d[4]; int nb; int k; };

// Offsets of row `row`'s first element in both biases (row < 2^32: 32-bit index arithmetic).
__device__ __forceinline__ void bias_offsets(const SmParams& p, long long row, long long& o1, long long& o2) {
    o1 = p.b1.off; o2 = p.b2.off;
    unsigned r = (unsigned)row;
#pragma unroll
    for (int d = 3; d >= 0; --d) {
        unsigned n = (unsigned)p.d[d];
        unsigned q = r / n;
        long long i = (long long)(r - q * n);
        r = q;
        o1 += i * p.b1.st[d];
        o2 += i * p.b2.st[d];
    }
}

template <typename T>
__device__ __forceinline__ float logit(const T* __restrict__ xr, const T* __restrict__ b1, const T* __restrict__ b2,
                                       const SmParams& p, long long o1, long long o2, int j) {
    float t = to_f(xr[j]);
    if (p.nb > 0) t += to_f(b1[o1 + j * p.b1.sk]);
    if (p.nb > 1) t += to_f(b2[o2 + j * p.b2.sk]);
    return t;
}

template <typename T, int V>
__device__ void sm_fwd(const T* __restrict__ x, const T* __restrict__ b1, const T* __restrict__ b2,
                       T* __restrict__ y, long long rows, SmParams p) {
    long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    int k = p.k;
    long long o1, o2;
    bias_offsets(p, row, o1, o2);
    const T* xr = x + row * k;
    float v[V];
    float m = -FF_INF;
#pragma unroll
    for (int i = 0; i < V; ++i) {
        int j = lane + 32 * i;
        v[i] = j < k ? logit(xr, b1, b2, p, o1, o2, j) : -FF_INF;
        m = fmaxf(m, v[i]);
    }
    m = warp_max(m);
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < V; ++i) {
        int j = lane + 32 * i;
        v[i] = j < k ? __expf(v[i] - m) : 0.f;
        s += v[i];
    }
    float inv = 1.f / warp_sum(s);
    T* yr = y + row * k;
#pragma unroll
    for (int i = 0; i < V; ++i) {
        int j = lane + 32 * i;
        if (j < k) yr[j] = from_f<T>(v[i] * inv);
    }
}

// Vectorised forward for rows of exactly k = 32·V elements: lane `l` holds the NP = V / W packs
// of W elements (16 bytes at most) at element offsets (q·32 + l)·W, loaded as single 8/16-byte
// accesses from x and from both biases (whose row offsets and strides are multiples of W and
// whose last-dim stride is 1, checked on the host). Each warp takes R consecutive rows and
// issues all their loads before the reductions (more bytes in flight per warp); statistics f32.
template <typename T, int V, int R>
__device__ void sm_fwd_vec(const T* __restrict__ x, const T* __restrict__ b1, const T* __restrict__ b2,
                           T* __restrict__ y, long long rows, SmParams p) {
    constexpr int W = (V * (int)sizeof(T) > 16) ? 16 / (int)sizeof(T) : V;
    constexpr int NP = V / W;
    constexpr int K = 32 * V;
    typedef Pack<T, W> P;
    long long row0 = ((long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5)) * R;
    int lane = threadIdx.x & 31;
    if (row0 >= rows) return;
    float v[R][V];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        long long row = row0 + r;
        if (row >= rows) break;  // warp-uniform
        long long o1, o2;
        bias_offsets(p, row, o1, o2);
        const T* xr = x + row * K;
#pragma unroll
        for (int q = 0; q < NP; ++q) {
            int e = (q * 32 + lane) * W;
            P xv = *reinterpret_cast<const P*>(xr + e);
#pragma unroll
            for (int w = 0; w < W; ++w) v[r][q * W + w] = to_f(xv.v[w]);
            if (p.nb > 0) {
                P bv = *reinterpret_cast<const P*>(b1 + o1 + e);
#pragma unroll
                for (int w = 0; w < W; ++w) v[r][q * W + w] += to_f(bv.v[w]);
            }
            if (p.nb > 1) {
                P bv = *reinterpret_cast<const P*>(b2 + o2 + e);
#pragma unroll
                for (int w = 0; w < W; ++w) v[r][q * W + w] += to_f(bv.v[w]);
            }
        }
    }
    float m[R], s[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
        m[r] = -FF_INF;
#pragma unroll
        for (int i = 0; i < V; ++i) m[r] = fmaxf(m[r], v[r][i]);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
#pragma unroll
        for (int r = 0; r < R; ++r) m[r] = fmaxf(m[r], __shfl_xor_sync(0xffffffffu, m[r], o));
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
        s[r] = 0.f;
#pragma unroll
        for (int i = 0; i < V; ++i) {
            v[r][i] = __expf(v[r][i] - m[r]);
            s[r] += v[r][i];
        }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
#pragma unroll
        for (int r = 0; r < R; ++r) s[r] += __shfl_xor_sync(0xffffffffu, s[r], o);
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
        long long row = row0 + r;
        if (row >= rows) break;
        float inv = 1.f / s[r];
        T* yr = y + row * K;
#pragma unroll
        for (int q = 0; q < NP; ++q) {
            P out;
#pragma unroll
            for (int w = 0; w < W; ++w) out.v[w] = from_f<T>(v[r][q * W + w] * inv);
            *reinterpret_cast<P*>(yr + (q * 32 + lane) * W) = out;
        }
    }
}

// Rows longer than 1024: online max/sum per lane, combined across the warp, then a second pass.
template <typename T>
__device__ void sm_fwd_loop(const T* __restrict__ x, const T* __restrict__ b1, const T* __restrict__ b2,
                            T* __restrict__ y, long long rows, SmParams p) {
    long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    int k = p.k;
    long long o1, o2;
    bias_offsets(p, row, o1, o2);
    const T* xr = x + row * k;
    float m = -FF_INF, s = 0.f;
    for (int j = lane; j < k; j += 32) {
        float t = logit(xr, b1, b2, p, o1, o2, j);
        if (t > m) { s = s * __expf(m - t) + 1.f; m = t; } else { s += __expf(t - m); }
    }
    float mm = warp_max(m);
    s = (m == -FF_INF) ? 0.f : s * __expf(m - mm);
    float inv = 1.f / warp_sum(s);
    T* yr = y + row * k;
    for (int j = lane; j < k; j += 32) yr[j] = from_f<T>(__expf(logit(xr, b1, b2, p, o1, o2, j) - mm) * inv);
}

template <typename T, int V>
__device__ void sm_bwd(const T* __restrict__ y, const T* __restrict__ g, T* __restrict__ dx, long long rows, int k) {
    long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const T* yr = y + row * k;
    const T* gr = g + row * k;
    float yv[V], gv[V];
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < V; ++i) {
        int j = lane + 32 * i;
        yv[i] = j < k ? to_f(yr[j]) : 0.f;
        gv[i] = j < k ? to_f(gr[j]) : 0.f;
        s += yv[i] * gv[i];
    }
    s = warp_sum(s);
    T* dr = dx + row * k;
#pragma unroll
    for (int i = 0; i < V; ++i) {
        int j = lane + 32 * i;
        if (j < k) dr[j] = from_f<T>(yv[i] * (gv[i] - s));
    }
}

template <typename T>
__device__ void sm_bwd_loop(const T* __restrict__ y, const T* __restrict__ g, T* __restrict__ dx, long long rows, int k) {
    long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const T* yr = y + row * k;
    const T* gr = g + row * k;
    float s = 0.f;
    for (int j = lane; j < k; j += 32) s += to_f(yr[j]) * to_f(gr[j]);
    s = warp_sum(s);
    T* dr = dx + row * k;
    for (int j = lane; j < k; j += 32) dr[j] = from_f<T>(to_f(yr[j]) * (to_f(gr[j]) - s));
}

// out[i] = sum_{l < lead} a[l * m + i], in order, f32 accumulation.
template <typename T>
__device__ void sum_lead(const T* __restrict__ a, T* __restrict__ out, long long lead, long long m) {
    long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= m) return;
    float s = 0.f;
    for (long long l = 0; l < lead; ++l) s += to_f(a[l * m + i]);
    out[i] = from_f<T>(s);
}

// sum_lead with 4 consecutive outputs per thread (8- or 16-byte loads): each output is summed in
// the same order with the same f32 accumulation as `sum_lead` (bitwise the same result).
template <typename T>
__device__ void sum_lead4(const T* __restrict__ a, T* __restrict__ out, long long lead, long long m) {
    long long i = ((long long)blockIdx.x * blockDim.x + threadIdx.x) * 4;
    if (i >= m) return;
    typedef Pack<T, 4> P;
    float s[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll 8
    for (long long l = 0; l < lead; ++l) {
        P v = *reinterpret_cast<const P*>(a + l * m + i);
#pragma unroll
        for (int w = 0; w < 4; ++w) s[w] += to_f(v.v[w]);
    }
    P o;
#pragma unroll
    for (int w = 0; w < 4; ++w) o.v[w] = from_f<T>(s[w]);
    *reinterpret_cast<P*>(out + i) = o;
}

#define SM_INST(T, TN, V)                                                                          \
    extern "C" __global__ void sm_fwd_##TN##_##V(const T* x, const T* b1, const T* b2, T* y,        \
                                                 long long rows, SmParams p) {                      \
        sm_fwd<T, V>(x, b1, b2, y, rows, p);                                                       \
    }                                                                                              \
    extern "C" __global__ void sm_bwd_##TN##_##V(const T* y, const T* g, T* dx, long long rows,     \
                                                 int k) {                                           \
        sm_bwd<T, V>(y, g, dx, rows, k);                                                           \
    }                                                                                              \
    extern "C" __global__ void sm_fwdv_##TN##_##V(const T* x, const T* b1, const T* b2, T* y,       \
                                                  long long rows, SmParams p) {                     \
        sm_fwd_vec<T, V, (V <= 4 ? 8 : (V == 8 ? 4 : (V == 16 ? 2 : 1)))>(x, b1, b2, y, rows, p);   \
    }
#define SM_ALL(T, TN)                                                                              \
    SM_INST(T, TN, 1) SM_INST(T, TN, 2) SM_INST(T, TN, 4) SM_INST(T, TN, 8) SM_INST(T, TN, 16)      \
    SM_INST(T, TN, 32)                                                                             \
    extern "C" __global__ void sm_fwd_##TN##_loop(const T* x, const T* b1, const T* b2, T* y,       \
                                                  long long rows, SmParams p) {                     \
        sm_fwd_loop<T>(x, b1, b2, y, rows, p);                                                     \
    }                                                                                              \
    extern "C" __global__ void sm_bwd_##TN##_loop(const T* y, const T* g, T* dx, long long rows,    \
                                                  int k) {                                          \
        sm_bwd_loop<T>(y, g, dx, rows, k);                                                         \
    }                                                                                              \
    extern "C" __global__ void sum_lead_##TN(const T* a, T* out, long long lead, long long m) {     \
        sum_lead<T>(a, out, lead, m);                                                              \
    }                                                                                              \
    extern "C" __global__ void sum_lead4_##TN(const T* a, T* out, long long lead, long long m) {    \
        sum_lead4<T>(a, out, lead, m);                                                             \
    }
SM_ALL(float, f32)
SM_ALL(bf16, bf16)
"#
);

/// Whether the forward may use the vectorised multi-row kernel (default on; [`set_vectorised`]).
static VEC: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Switch the vectorised forward kernel on or off for the whole process (off: the one-row-per-warp
/// scalar kernel for every shape; for A/B benchmarks and tests).
pub fn set_vectorised(on: bool) {
    VEC.store(on, std::sync::atomic::Ordering::Relaxed);
}

/// See [`set_vectorised`].
pub fn vectorised() -> bool {
    VEC.load(std::sync::atomic::Ordering::Relaxed)
}

/// Row dims (all but the last) of the kernels after merging: at most this many.
pub const MAX_ROW_DIMS: usize = 4;

/// Kernel parameters of one bias: element offset, strides of the (merged, front-padded) row dims
/// and of the last dim.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BiasParams {
    pub off: i64,
    pub st: [i64; MAX_ROW_DIMS],
    pub sk: i64,
}

/// Kernel parameters (mirrors `SmParams` in the CUDA source).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SmParams {
    pub b1: BiasParams,
    pub b2: BiasParams,
    /// Row dims, front-padded with 1s; their product is the number of rows.
    pub d: [i32; MAX_ROW_DIMS],
    /// Number of biases (0, 1, 2).
    pub nb: i32,
    /// Row length (last dim of `x`).
    pub k: i32,
}

/// Strides of a bias with `dims`/`strides` broadcast (right-aligned) to `xdims`: 0 on broadcast
/// dims. `None` if not broadcastable.
pub fn aligned_strides(xdims: &[usize], dims: &[usize], strides: &[usize]) -> Option<Vec<usize>> {
    let n = xdims.len();
    if dims.len() > n || strides.len() != dims.len() {
        return None;
    }
    let lead = n - dims.len();
    let mut out = vec![0usize; n];
    for i in 0..n {
        if i < lead {
            continue;
        }
        let (d, s) = (dims[i - lead], strides[i - lead]);
        if d == xdims[i] {
            out[i] = if d == 1 { 0 } else { s };
        } else if d != 1 {
            return None;
        }
    }
    Some(out)
}

/// Kernel parameters for logits `xdims` and biases given as `(dims, strides, start offset)`;
/// `None` when a bias is not broadcastable, there are more than two biases, more than
/// [`MAX_ROW_DIMS`] row dims remain after merging, or the sizes overflow the kernel's ints.
pub fn sm_params(xdims: &[usize], biases: &[(&[usize], &[usize], usize)]) -> Option<SmParams> {
    let n = xdims.len();
    if n == 0 || biases.len() > 2 {
        return None;
    }
    let k = xdims[n - 1];
    let rows: usize = xdims[..n - 1].iter().product();
    if k > i32::MAX as usize || rows > u32::MAX as usize || rows.checked_mul(k)? > i64::MAX as usize
    {
        return None;
    }
    let al = biases
        .iter()
        .map(|(d, s, _)| aligned_strides(xdims, d, s))
        .collect::<Option<Vec<_>>>()?;
    // Merge adjacent row dims wherever every bias's offset stays linear in the merged index.
    let mut groups: Vec<(usize, [usize; 2])> = Vec::new();
    for i in 0..n - 1 {
        let d = xdims[i];
        if d == 1 {
            continue;
        }
        let st = [
            al.first().map_or(0, |a| a[i]),
            al.get(1).map_or(0, |a| a[i]),
        ];
        if let Some(last) = groups.last_mut() {
            if (0..2).all(|b| last.1[b] == st[b] * d) {
                last.0 *= d;
                last.1 = st;
                continue;
            }
        }
        groups.push((d, st));
    }
    if groups.len() > MAX_ROW_DIMS || groups.iter().any(|g| g.0 > i32::MAX as usize) {
        return None;
    }
    let pad = MAX_ROW_DIMS - groups.len();
    let mut p = SmParams {
        nb: biases.len() as i32,
        k: k as i32,
        d: [1; MAX_ROW_DIMS],
        ..Default::default()
    };
    for (gi, g) in groups.iter().enumerate() {
        p.d[pad + gi] = g.0 as i32;
        p.b1.st[pad + gi] = g.1[0] as i64;
        p.b2.st[pad + gi] = g.1[1] as i64;
    }
    if let Some(a) = al.first() {
        p.b1.sk = a[n - 1] as i64;
        p.b1.off = biases[0].2 as i64;
    }
    if let Some(a) = al.get(1) {
        p.b2.sk = a[n - 1] as i64;
        p.b2.off = biases[1].2 as i64;
    }
    Some(p)
}

/// Fused `softmax(x + b1 + b2 ...)` over the last dim when it applies (CUDA, `x` f32/bf16, at
/// most two biases broadcastable to `x`); `Ok(None)` otherwise. Biases are cast to `x`'s dtype.
pub fn softmax_with_biases(x: &Tensor, biases: &[&Tensor]) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    {
        cuda::softmax_with_biases(x, biases)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (x, biases);
        Ok(None)
    }
}

/// Fused last-dim softmax when it applies (see [`softmax_with_biases`]).
pub fn softmax(x: &Tensor) -> Result<Option<Tensor>> {
    softmax_with_biases(x, &[])
}

/// Backward of the fused softmax for hand-written backward passes: `dx = y · (g − Σ_j g_j y_j)`
/// from the softmax output `y` and its cotangent `g` (cast to `y`'s dtype); `Ok(None)` when the
/// kernel does not apply (not CUDA, not f32/bf16, fused kernels off).
pub fn softmax_bwd(y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    {
        cuda::softmax_bwd(y, g)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (y, g);
        Ok(None)
    }
}

/// The gradient of a bias broadcast to the logits: `dx` summed to `bias_dims` (right-aligned
/// broadcast), deterministic (a leading broadcast prefix is summed in order with f32
/// accumulation). `Ok(None)` when `dx` is not a CUDA tensor.
pub fn reduce_bias_grad(dx: &Tensor, bias_dims: &[usize]) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    {
        if !dx.device().is_cuda() || !super::fused_enabled() {
            return Ok(None);
        }
        Ok(Some(cuda::reduce_to_dims(dx, bias_dims, dx.dtype())?))
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (dx, bias_dims);
        Ok(None)
    }
}

/// Attention-like inputs on `dev`: logits `xd`, optional mask bias `[B, 1, .., K]` (some keys
/// masked with `-1e9`) and pair bias `[1, H, Q, K]` (for rank-4 `xd`).
fn vec_case_inputs(
    xd: &[usize],
    biases: usize,
    dt: candle_core::DType,
    dev: &candle_core::Device,
    seed: u64,
) -> Result<(Tensor, Vec<Tensor>)> {
    let x = super::uniform_tensor(xd, 4.0, seed, dt, dev)?;
    let n = xd.len();
    let mut bs = Vec::new();
    if biases > 0 {
        let mut md = vec![1usize; n];
        md[0] = xd[0];
        md[n - 1] = xd[n - 1];
        let u = super::uniform_tensor(&md, 1.0, seed ^ 1, dt, dev)?;
        let mask = u.ge(-0.8)?.to_dtype(dt)?;
        bs.push(crate::model::primitives::mask_bias(&mask, 1e9)?);
    }
    if biases > 1 {
        let mut pd = xd.to_vec();
        pd[0] = 1;
        bs.push(super::uniform_tensor(&pd, 2.0, seed ^ 2, dt, dev)?);
    }
    Ok((x, bs))
}

/// The vectorised multi-row forward against the scalar one-row-per-warp kernel and against the
/// plain-candle twin, f32 and bf16, every vectorised row length (32..1024), row counts that are
/// not a multiple of the rows per warp, the attention biases, a misaligned bias view (scalar
/// fallback); plus a bitwise rerun check. Leaves the vectorised kernel switched on.
pub fn vec_self_check(dev: &candle_core::Device) -> Result<Vec<super::ElemCheck>> {
    use candle_core::DType;
    let mut out = Vec::new();
    let cases: [(&[usize], usize); 9] = [
        (&[4, 8, 64, 256], 2),
        (&[6, 8, 32, 128], 1),
        (&[3, 5, 7, 128], 2),
        (&[5, 3, 64], 1),
        (&[7, 32], 0),
        (&[9, 512], 1),
        (&[5, 1024], 1),
        (&[3, 3, 1024], 0),
        (&[2, 4, 9, 256], 2),
    ];
    for (ci, &(xd, nb)) in cases.iter().enumerate() {
        for dt in [DType::F32, DType::BF16] {
            let (x, bs) = vec_case_inputs(xd, nb, dt, dev, 0x50f7 + 16 * ci as u64)?;
            let brefs: Vec<&Tensor> = bs.iter().collect();
            let missing = || crate::error::Error::Msg("softmax: fused kernel did not run".into());
            set_vectorised(true);
            let yv = softmax_with_biases(&x, &brefs)?.ok_or_else(missing)?;
            let yv2 = softmax_with_biases(&x, &brefs)?.ok_or_else(missing)?;
            set_vectorised(false);
            let ys = softmax_with_biases(&x, &brefs)?.ok_or_else(missing)?;
            set_vectorised(true);
            let yt = crate::model::primitives::softmax_with_biases_twin(&x, &brefs)?;
            let tol = if dt == DType::BF16 { 2e-2 } else { 1e-5 };
            let case = format!("x{xd:?} {nb} bias {dt:?}");
            out.push(super::ElemCheck {
                op: "softmax fwd vec vs twin".into(),
                case: case.clone(),
                max_err: super::rel_err(&yv, &yt)?,
                tol,
            });
            out.push(super::ElemCheck {
                op: "softmax fwd vec vs scalar".into(),
                case: case.clone(),
                max_err: super::rel_err(&yv, &ys)?,
                tol,
            });
            out.push(super::ElemCheck {
                op: "softmax fwd vec rerun".into(),
                case,
                max_err: super::rel_err(&yv, &yv2)?,
                tol: 0.0,
            });
        }
    }
    // The pair-bias gradient (sum over the leading dim): 4 outputs per thread vs one, bitwise.
    for (ci, (xd, bd)) in [
        ([16usize, 8, 64, 256], [1usize, 8, 64, 256]),
        ([7, 3, 5, 77], [1, 3, 5, 77]),
        ([33, 2, 4, 128], [1, 1, 4, 128]),
    ]
    .iter()
    .enumerate()
    {
        for dt in [DType::F32, DType::BF16] {
            let dx = super::uniform_tensor(xd, 1.0, 0x5e1d + ci as u64, dt, dev)?;
            let missing = || crate::error::Error::Msg("softmax: no bias reduction".into());
            set_vectorised(true);
            let a = reduce_bias_grad(&dx, bd)?.ok_or_else(missing)?;
            set_vectorised(false);
            let b = reduce_bias_grad(&dx, bd)?.ok_or_else(missing)?;
            set_vectorised(true);
            let t = crate::model::vjp::sum_to_composite(&dx, bd, dt)?;
            let case = format!("dx{xd:?} -> {bd:?} {dt:?}");
            out.push(super::ElemCheck {
                op: "bias grad sum_lead4 vs scalar".into(),
                case: case.clone(),
                max_err: super::rel_err(&a, &b)?,
                tol: 0.0,
            });
            out.push(super::ElemCheck {
                op: "bias grad vs candle sum".into(),
                case,
                max_err: super::rel_err(&a, &t)?,
                tol: if dt == DType::BF16 { 2e-2 } else { 1e-5 },
            });
        }
    }
    // A pair bias viewed at an odd element offset: not 16-byte aligned, the scalar kernel runs.
    let dt = DType::BF16;
    let (x, bs) = vec_case_inputs(&[2, 4, 16, 256], 1, dt, dev, 0x50f8)?;
    let buf = super::uniform_tensor(&[4 * 16 * 256 + 1], 2.0, 0x50f9, dt, dev)?;
    let pb = buf.narrow(0, 1, 4 * 16 * 256)?.reshape((1, 4, 16, 256))?;
    let missing = || crate::error::Error::Msg("softmax: fused kernel did not run".into());
    let y = softmax_with_biases(&x, &[&bs[0], &pb])?.ok_or_else(missing)?;
    let yt = crate::model::primitives::softmax_with_biases_twin(&x, &[&bs[0], &pb])?;
    out.push(super::ElemCheck {
        op: "softmax fwd misaligned bias".into(),
        case: "x[2, 4, 16, 256] pair @1 BF16".into(),
        max_err: super::rel_err(&y, &yt)?,
        tol: 2e-2,
    });
    Ok(out)
}

/// Timings of the forward at the Evoformer's attention shapes (bf16, 128 × 256): MSA row
/// attention with mask + pair bias, column attention with the mask, triangle attention with mask +
/// triangle bias. Fused = vectorised kernel (DRAM GB/s and the scalar kernel's time in the case
/// column; 5 back-to-back launches per sample), twin = the plain-candle composite.
pub fn bench_rows(dev: &candle_core::Device, iters: usize) -> Result<Vec<super::ElemBenchRow>> {
    use candle_core::DType;
    let dt = DType::BF16;
    let mut rows = Vec::new();
    let cases: [(&str, [usize; 4], usize); 3] = [
        ("softmax fwd row+pair", [128, 8, 256, 256], 2),
        ("softmax fwd col", [256, 8, 128, 128], 1),
        ("softmax fwd tri", [256, 4, 256, 256], 2),
    ];
    for (i, (name, xd, nb)) in cases.iter().enumerate() {
        let (x, bs) = vec_case_inputs(xd, *nb, dt, dev, 90 + i as u64)?;
        let brefs: Vec<&Tensor> = bs.iter().collect();
        let f = || softmax_with_biases(&x, &brefs).map(|_| ());
        set_vectorised(false);
        let scalar_ms = super::median_ms_per_rep(dev, iters, 5, f)?;
        set_vectorised(true);
        let fused_ms = super::median_ms_per_rep(dev, iters, 5, f)?;
        let twin_ms = super::median_ms(dev, 1, iters.min(5), || {
            crate::model::primitives::softmax_with_biases_twin(&x, &brefs).map(|_| ())
        })?;
        let bytes = 2.0 * x.elem_count() as f64 * dt.size_in_bytes() as f64;
        let y = softmax_with_biases(&x, &brefs)?
            .ok_or_else(|| crate::error::Error::Msg("softmax: fused kernel did not run".into()))?;
        rows.push(super::ElemBenchRow {
            op: (*name).into(),
            case: format!(
                "{xd:?} {:.0} GB/s; scalar {:.3} ms",
                bytes / (fused_ms * 1e-3) / 1e9,
                scalar_ms
            ),
            fused_ms,
            twin_ms,
            max_err: super::rel_err(
                &y,
                &crate::model::primitives::softmax_with_biases_twin(&x, &brefs)?,
            )?,
        });
    }
    Ok(rows)
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::{CudaDType, CudaStorage};
    use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Tensor};
    use cudarc::driver::{CudaView, DeviceRepr, PushKernelArg};
    use half::bf16;

    use super::{sm_params, SmParams, MODULE, SRC};
    use crate::error::Result;
    use crate::kernels::launch::{cerr, dtype_suffix, func, values_per_lane, warp_rows};
    use crate::kernels::permute::Contig;

    // SAFETY: plain-old-data `#[repr(C)]` struct of integers, mirrored by `SmParams` in the source.
    unsafe impl DeviceRepr for SmParams {}

    /// Warps (rows) per block.
    const WARPS: u32 = 8;

    pub(super) fn softmax_with_biases(x: &Tensor, biases: &[&Tensor]) -> Result<Option<Tensor>> {
        if !x.device().is_cuda() || dtype_suffix(x.dtype()).is_none() || x.rank() == 0 {
            return Ok(None);
        }
        if x.dims().last().copied().unwrap_or(0) == 0 || biases.len() > 2 {
            return Ok(None);
        }
        let x = x.contig()?;
        let bs = biases
            .iter()
            .map(|b| crate::model::primitives::cast(b, x.dtype()))
            .collect::<Result<Vec<_>>>()?;
        let lay: Vec<(&[usize], &[usize], usize)> = bs
            .iter()
            .map(|b| (b.dims(), b.layout().stride(), b.layout().start_offset()))
            .collect();
        if bs.iter().any(|b| !b.device().same_device(x.device()))
            || sm_params(x.dims(), &lay).is_none()
        {
            return Ok(None);
        }
        let nb = bs.len();
        let b1 = bs.first().unwrap_or(&x);
        let b2 = bs.get(1).unwrap_or(&x);
        Ok(Some(x.apply_op3(b1, b2, BiasedSoftmaxCuda { nb })?))
    }

    pub(super) fn softmax_bwd(y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        if !y.device().is_cuda()
            || !crate::kernels::fused_enabled()
            || dtype_suffix(y.dtype()).is_none()
            || y.rank() == 0
            || y.dims().last().copied().unwrap_or(0) == 0
            || y.dims() != g.dims()
        {
            return Ok(None);
        }
        let y = y.detach().contig()?;
        let g = g.detach().to_dtype(y.dtype())?.contig()?;
        Ok(Some(y.apply_op2(&g, SoftmaxBwdCuda)?))
    }

    fn view<'a, T: CudaDType>(
        s: &'a CudaStorage,
        l: &Layout,
    ) -> candle_core::Result<CudaView<'a, T>> {
        let (a, e) = l
            .contiguous_offsets()
            .ok_or_else(|| cerr("softmax kernel: operand not contiguous"))?;
        Ok(s.as_cuda_slice::<T>()?.slice(a..e))
    }

    fn kernel_name(base: &str, dt: DType, k: usize) -> candle_core::Result<String> {
        let sfx = dtype_suffix(dt).ok_or_else(|| cerr("softmax kernel: dtype"))?;
        Ok(match values_per_lane(k) {
            Some(v) => format!("{base}_{sfx}_{v}"),
            None => format!("{base}_{sfx}_loop"),
        })
    }

    fn fwd<T: CudaDType + DeviceRepr>(
        nb: usize,
        (xs, xl): (&CudaStorage, &Layout),
        (s1, l1): (&CudaStorage, &Layout),
        (s2, l2): (&CudaStorage, &Layout),
    ) -> candle_core::Result<CudaStorage> {
        let dev = xs.device().clone();
        let dims = xl.dims();
        let k = dims.last().copied().unwrap_or(1).max(1);
        let rows = xl.shape().elem_count() / k;
        let lay = [
            (l1.dims(), l1.stride(), l1.start_offset()),
            (l2.dims(), l2.stride(), l2.start_offset()),
        ];
        let p = sm_params(dims, &lay[..nb]).ok_or_else(|| cerr("softmax kernel: bias layout"))?;
        let x = view::<T>(xs, xl)?;
        let (b1, b2) = (s1.as_cuda_slice::<T>()?, s2.as_cuda_slice::<T>()?);
        let x_start = xl.start_offset();
        let vec = super::vectorised()
            .then(|| vec_rows_per_warp(&p, k, x_start, std::mem::size_of::<T>()))
            .flatten();
        let (name, warps) = match vec {
            Some(r) => (kernel_name("sm_fwdv", xs.dtype(), k)?, rows.div_ceil(r)),
            None => (kernel_name("sm_fwd", xs.dtype(), k)?, rows),
        };
        let f = func(&dev, MODULE, SRC, &name)?;
        // SAFETY: every element is written (each warp covers its rows).
        let y = unsafe { dev.alloc::<T>(rows * k)? };
        let rows_i = rows as i64;
        let stream = dev.cuda_stream();
        let mut a = stream.launch_builder(&f);
        a.arg(&x).arg(b1).arg(b2).arg(&y).arg(&rows_i).arg(&p);
        // SAFETY: the arguments match the kernel signature; the vectorised kernel's alignment
        // and row-length conditions were checked by `vec_rows_per_warp`.
        unsafe { a.launch(warp_rows(warps, WARPS)) }.map_err(cerr)?;
        Ok(CudaStorage::wrap_cuda_slice(y, dev))
    }

    /// Rows per warp of the vectorised forward `sm_fwdv_*` when it takes these parameters
    /// (row length exactly `32·V`, `x` and every bias row `W`-aligned with unit last-dim stride,
    /// `W` = elements per 16-byte pack); `None` for the scalar kernel.
    pub(crate) fn vec_rows_per_warp(
        p: &SmParams,
        k: usize,
        x_start: usize,
        elem_bytes: usize,
    ) -> Option<usize> {
        let v = values_per_lane(k)?;
        if k != 32 * v {
            return None;
        }
        let w = v.min(16 / elem_bytes.max(1)) as i64;
        if (x_start as i64) % w != 0 {
            return None;
        }
        let biases = [&p.b1, &p.b2];
        for b in biases.iter().take(p.nb.max(0) as usize) {
            if b.sk != 1 || b.off % w != 0 || b.st.iter().any(|st| st % w != 0) {
                return None;
            }
        }
        // R · V ≤ 32 values per lane in registers (mirrors the kernel instantiation).
        Some(match v {
            32 => 1,
            16 => 2,
            8 => 4,
            _ => 8,
        })
    }

    fn bwd<T: CudaDType + DeviceRepr>(
        (ys, yl): (&CudaStorage, &Layout),
        (gs, gl): (&CudaStorage, &Layout),
    ) -> candle_core::Result<CudaStorage> {
        let dev = ys.device().clone();
        let k = yl.dims().last().copied().unwrap_or(1).max(1);
        let rows = yl.shape().elem_count() / k;
        let (y, g) = (view::<T>(ys, yl)?, view::<T>(gs, gl)?);
        let f = func(&dev, MODULE, SRC, &kernel_name("sm_bwd", ys.dtype(), k)?)?;
        // SAFETY: every element is written (one warp per row covers its row).
        let dx = unsafe { dev.alloc::<T>(rows * k)? };
        let (rows_i, k_i) = (rows as i64, k as i32);
        let stream = dev.cuda_stream();
        let mut a = stream.launch_builder(&f);
        a.arg(&y).arg(&g).arg(&dx).arg(&rows_i).arg(&k_i);
        // SAFETY: the arguments match the kernel signature.
        unsafe { a.launch(warp_rows(rows, WARPS)) }.map_err(cerr)?;
        Ok(CudaStorage::wrap_cuda_slice(dx, dev))
    }

    fn sum_lead<T: CudaDType + DeviceRepr>(
        lead: usize,
        (s, l): (&CudaStorage, &Layout),
    ) -> candle_core::Result<CudaStorage> {
        let dev = s.device().clone();
        let m = l.shape().elem_count() / lead.max(1);
        let a = view::<T>(s, l)?;
        let sfx = dtype_suffix(s.dtype()).ok_or_else(|| cerr("sum_lead: dtype"))?;
        // Four outputs per thread (bitwise the same sums) when the rows are 4-aligned.
        let four = super::vectorised() && m.is_multiple_of(4) && l.start_offset().is_multiple_of(4);
        let (name, threads) = if four {
            (format!("sum_lead4_{sfx}"), m / 4)
        } else {
            (format!("sum_lead_{sfx}"), m)
        };
        let f = func(&dev, MODULE, SRC, &name)?;
        // SAFETY: every output element is written (one thread per 1 or 4 outputs).
        let out = unsafe { dev.alloc::<T>(m)? };
        let (lead_i, m_i) = (lead as i64, m as i64);
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&a).arg(&out).arg(&lead_i).arg(&m_i);
        // SAFETY: the arguments match the kernel signature; 4-alignment checked above.
        unsafe { b.launch(crate::kernels::nvrtc::grid_1d(threads, 256)) }.map_err(cerr)?;
        Ok(CudaStorage::wrap_cuda_slice(out, dev))
    }

    /// `dx` `[*x dims]` summed to the shape of a bias broadcast to it.
    fn reduce_to(dx: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
        reduce_to_dims(dx, bias.dims(), bias.dtype())
    }

    /// `dx` summed to the (right-aligned, broadcast) shape `bd`, in dtype `dt` (see
    /// [`super::reduce_bias_grad`]).
    pub(super) fn reduce_to_dims(
        dx: &Tensor,
        bd: &[usize],
        dt: DType,
    ) -> candle_core::Result<Tensor> {
        let xd = dx.dims();
        let n = xd.len();
        if bd.len() > n {
            candle_core::bail!("softmax bias of higher rank than the logits");
        }
        let mut bp = vec![1usize; n - bd.len()];
        bp.extend_from_slice(bd);
        // Broadcast over a leading prefix only (the hot pair-bias case): one ordered sum kernel.
        let p = bp.iter().take_while(|&&d| d == 1).count();
        if bp[p..] == xd[p..] {
            let lead: usize = xd[..p].iter().product();
            if lead == 1 {
                return dx.reshape(bd);
            }
            return dx.contig()?.apply_op1(SumLead { lead })?.reshape(bd);
        }
        crate::model::vjp::sum_to_composite(dx, bd, dt).map_err(cerr)
    }

    fn no_cpu(name: &str) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("{name}: CUDA only")
    }

    /// `(x, b1, b2) → softmax(x + b1 + b2)`; only the first `nb` biases are used (the others are
    /// placeholders).
    struct BiasedSoftmaxCuda {
        nb: usize,
    }

    impl CustomOp3 for BiasedSoftmaxCuda {
        fn name(&self) -> &'static str {
            "ff-biased-softmax-cuda"
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
            s1: &CudaStorage,
            l1: &Layout,
            s2: &CudaStorage,
            l2: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let a = ((xs, xl), (s1, l1), (s2, l2));
            let out = match xs.dtype() {
                DType::F32 => fwd::<f32>(self.nb, a.0, a.1, a.2)?,
                DType::BF16 => fwd::<bf16>(self.nb, a.0, a.1, a.2)?,
                dt => candle_core::bail!("{}: dtype {dt:?}", self.name()),
            };
            Ok((out, xl.shape().clone()))
        }

        fn bwd(
            &self,
            _x: &Tensor,
            b1: &Tensor,
            b2: &Tensor,
            res: &Tensor,
            g: &Tensor,
        ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
            let y = res.detach();
            let g = g.detach().to_dtype(y.dtype())?.contig()?;
            let dx = y.apply_op2(&g, SoftmaxBwdCuda)?;
            let d1 = if self.nb > 0 && b1.track_op() {
                Some(reduce_to(&dx, b1)?)
            } else {
                None
            };
            let d2 = if self.nb > 1 && b2.track_op() {
                Some(reduce_to(&dx, b2)?)
            } else {
                None
            };
            Ok((Some(dx), d1, d2))
        }
    }

    /// `(y, g) → y · (g − Σ g·y)`.
    struct SoftmaxBwdCuda;

    impl CustomOp2 for SoftmaxBwdCuda {
        fn name(&self) -> &'static str {
            "ff-softmax-bwd-cuda"
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
            ys: &CudaStorage,
            yl: &Layout,
            gs: &CudaStorage,
            gl: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let out = match ys.dtype() {
                DType::F32 => bwd::<f32>((ys, yl), (gs, gl))?,
                DType::BF16 => bwd::<bf16>((ys, yl), (gs, gl))?,
                dt => candle_core::bail!("{}: dtype {dt:?}", self.name()),
            };
            Ok((out, yl.shape().clone()))
        }
    }

    /// `[lead, *rest] → [prod(rest)]`, summed over the leading dim in order (f32 accumulation).
    struct SumLead {
        lead: usize,
    }

    impl CustomOp1 for SumLead {
        fn name(&self) -> &'static str {
            "ff-sum-lead-cuda"
        }

        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
            no_cpu(self.name())
        }

        fn cuda_fwd(
            &self,
            s: &CudaStorage,
            l: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let m = l.shape().elem_count() / self.lead.max(1);
            let out = match s.dtype() {
                DType::F32 => sum_lead::<f32>(self.lead, (s, l))?,
                DType::BF16 => sum_lead::<bf16>(self.lead, (s, l))?,
                dt => candle_core::bail!("{}: dtype {dt:?}", self.name()),
            };
            Ok((out, Shape::from(m)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Which parameters take the vectorised forward, and how many rows per warp.
    #[cfg(feature = "cuda")]
    #[test]
    fn vectorised_kernel_conditions() {
        use super::cuda::vec_rows_per_warp as vr;
        // MSA row attention: x [B, H, Q, K = 256], mask [B, 1, 1, K], pair [1, H, Q, K].
        let x = [4usize, 8, 64, 256];
        let mb = ([4usize, 1, 1, 256], [256usize, 256, 256, 1]);
        let pb = ([1usize, 8, 64, 256], [131072usize, 16384, 256, 1]);
        let p = sm_params(&x, &[(&mb.0, &mb.1, 0), (&pb.0, &pb.1, 0)]).unwrap();
        assert_eq!(vr(&p, 256, 0, 2), Some(4));
        assert_eq!(vr(&p, 256, 0, 4), Some(4));
        // x view not 16-byte aligned (bf16: 8 elements per pack).
        assert_eq!(vr(&p, 256, 4, 2), None);
        assert_eq!(vr(&p, 256, 8, 2), Some(4));
        // Pair bias at an odd offset, or a permuted pair bias (last-dim stride H).
        let p_off = sm_params(&x, &[(&mb.0, &mb.1, 0), (&pb.0, &pb.1, 3)]).unwrap();
        assert_eq!(vr(&p_off, 256, 0, 2), None);
        let perm = ([1usize, 8, 64, 256], [131072usize, 1, 2048, 8]);
        let p_perm = sm_params(&x, &[(&mb.0, &mb.1, 0), (&perm.0, &perm.1, 0)]).unwrap();
        assert_eq!(vr(&p_perm, 256, 0, 2), None);
        // Row lengths: exactly 32·V only; rows per warp by V.
        let plain = |k: usize| sm_params(&[3, k], &[]).unwrap();
        assert_eq!(vr(&plain(200), 200, 0, 2), None);
        assert_eq!(vr(&plain(32), 32, 0, 2), Some(8));
        assert_eq!(vr(&plain(128), 128, 0, 2), Some(8));
        assert_eq!(vr(&plain(512), 512, 0, 2), Some(2));
        assert_eq!(vr(&plain(1024), 1024, 0, 4), Some(1));
        assert_eq!(vr(&plain(2048), 2048, 0, 4), None);
    }

    #[test]
    fn params_of_attention_biases() {
        // x [B=3, H=2, Q=5, K=7] contiguous; mask bias [3, 1, 1, 7]; pair bias [1, 2, 5, 7].
        let x = [3usize, 2, 5, 7];
        let mb = ([3usize, 1, 1, 7], [7usize, 7, 7, 1]);
        let pb = ([1usize, 2, 5, 7], [70usize, 35, 7, 1]);
        let p = sm_params(&x, &[(&mb.0, &mb.1, 0), (&pb.0, &pb.1, 4)]).unwrap();
        assert_eq!(p.nb, 2);
        assert_eq!(p.k, 7);
        // B stays alone; H and Q merge (mask stride 0 for both, pair 35 = 7·5).
        assert_eq!(p.d, [1, 1, 3, 10]);
        assert_eq!(p.b1.st, [0, 0, 7, 0]);
        assert_eq!(p.b2.st, [0, 0, 0, 7]);
        assert_eq!((p.b1.sk, p.b2.sk, p.b2.off), (1, 1, 4));
        // Offsets computed from the params equal the direct strided offsets.
        for row in 0..30usize {
            let (b, hq) = (row / 10, row % 10);
            let (h, q) = (hq / 5, hq % 5);
            let want1 = b * 7;
            let want2 = 4 + h * 35 + q * 7;
            let mut r = row as i64;
            let (mut o1, mut o2) = (p.b1.off, p.b2.off);
            for d in (0..4).rev() {
                let i = r % p.d[d] as i64;
                r /= p.d[d] as i64;
                o1 += i * p.b1.st[d];
                o2 += i * p.b2.st[d];
            }
            assert_eq!((o1 as usize, o2 as usize), (want1, want2));
            let _ = (h, q);
        }
        // Lower-rank bias [B, 1, K] of x [B, H, K] (global attention); not broadcastable → None.
        let p = sm_params(&[4, 3, 9], &[(&[4, 1, 9], &[9, 9, 1], 0)]).unwrap();
        assert_eq!(p.d, [1, 1, 4, 3]);
        assert_eq!(p.b1.st, [0, 0, 9, 0]);
        assert!(sm_params(&[4, 3, 9], &[(&[2, 1, 9], &[9, 9, 1], 0)]).is_none());
        assert!(sm_params(&[4, 3, 9], &[(&[9], &[1], 0)]).is_some());
        // Six alternating broadcast dims cannot merge below four row dims.
        let xd = [2usize, 3, 2, 3, 2, 5];
        let bd = [2usize, 1, 2, 1, 2, 5];
        let bs = [20usize, 0, 10, 0, 5, 1];
        assert!(sm_params(&xd, &[(&bd, &bs, 0)]).is_none());
    }
}
