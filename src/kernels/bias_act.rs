//! Bias + activation epilogues of the hand-written (manual-backward) trunk path:
//! `y = act((x + b[col]) · s[row])` and the relu backward `dx = dy · [y > 0]`.
//!
//! candle adds a `Linear` bias with `broadcast_add`, whose strided-broadcast kernel runs at a
//! fraction of the bandwidth of a contiguous add (measured with `ncu` on H100: `[32768, 256]`
//! bf16 151–242 µs vs 44 µs), then `relu`, the mask multiply and the relu backward
//! (`gt` + `cast` + `mul`) each take another full pass. Here each is one pass:
//! - [`bias_act`]: `x` `[*, c]` may be a column slice of a wider row-major buffer (row stride
//!   `≥ c`, e.g. the gate part of a joint q/k/v/g projection); the output is contiguous. `b` `[c]`
//!   is f32 or `x`'s dtype, `s` `[*]` (one value per row, e.g. a mask) has `x`'s dtype; both
//!   optional. fp32 math, rounded to `x`'s dtype after each step exactly as the twin's candle
//!   ops round (the bias cast to `x`'s dtype first, as `Linear::forward` does): the fused result
//!   is bitwise the twin's, so the hand-written path computes the same function as autograd's.
//! - [`relu_bwd`]: `dy · [y > 0]` (a select: bitwise equal to the twin).
//!
//! Twins (`*_twin`): the plain candle chains (`broadcast_add`, `broadcast_mul`, `relu`, `gt`).

use candle_core::{DType, Device, Tensor};

#[cfg(feature = "cuda")]
use super::permute::Contig;
use super::{ElemBenchRow, ElemCheck};
use crate::error::Result;
use crate::model::primitives::cast;

/// NVRTC module name.
pub const MODULE: &str = "ferrofold_bias_act";

/// CUDA C source: `bias_act_{T}_{B}_r{0,1}_v{V}` (one thread per `V` consecutive elements of a
/// row; bias and row scale may be null) and `relu_bwd_{T}_v{V}`.
#[cfg(feature = "cuda")]
pub const SOURCE: &str = concat!(
    elem_prelude!(),
    r#"
// Round to T's precision (identity for f32): each step rounds as the twin's candle op does.
template <typename T> __device__ __forceinline__ float rt(float v);
template <> __device__ __forceinline__ float rt<float>(float v) { return v; }
template <> __device__ __forceinline__ float rt<__nv_bfloat16>(float v) { return __bfloat162float(__float2bfloat16_rn(v)); }

template <typename T, typename B, int V, bool RELU>
__device__ __forceinline__ void bias_act(const T* x, size_t ldx, const B* b, const T* s, T* y,
                                         unsigned cg, unsigned n_groups) {
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n_groups) return;
    unsigned row = i / cg;
    unsigned col = (i - row * cg) * V;
    Pack<T, V> xv = *reinterpret_cast<const Pack<T, V>*>(x + (size_t)row * ldx + col);
    float sc = s ? ld(s, row) : 1.0f;
    Pack<T, V> out;
#pragma unroll
    for (int j = 0; j < V; j++) {
        float v = ld(xv.v, j);
        if (b) v = rt<T>(v + rt<T>(ld(b, col + j)));
        if (s) v = rt<T>(v * sc);
        if (RELU) v = fmaxf(v, 0.0f);
        st(out.v, j, v);
    }
    reinterpret_cast<Pack<T, V>*>(y)[i] = out;
}

template <typename T, int V>
__device__ __forceinline__ void relu_bwd(const T* y, const T* dy, T* dx, size_t n_groups) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n_groups) return;
    Pack<T, V> yv = reinterpret_cast<const Pack<T, V>*>(y)[i];
    Pack<T, V> dv = reinterpret_cast<const Pack<T, V>*>(dy)[i];
    Pack<T, V> out;
#pragma unroll
    for (int j = 0; j < V; j++) out.v[j] = ld(yv.v, j) > 0.0f ? dv.v[j] : T(0.0f);
    reinterpret_cast<Pack<T, V>*>(dx)[i] = out;
}

#define BIAS_ACT(SUF, T, B, V) \
extern "C" __global__ void bias_act_##SUF##_r0_v##V(const T* x, size_t ldx, const B* b, const T* s, T* y, unsigned cg, unsigned n) { \
    bias_act<T, B, V, false>(x, ldx, b, s, y, cg, n); } \
extern "C" __global__ void bias_act_##SUF##_r1_v##V(const T* x, size_t ldx, const B* b, const T* s, T* y, unsigned cg, unsigned n) { \
    bias_act<T, B, V, true>(x, ldx, b, s, y, cg, n); }
BIAS_ACT(f32_f32, float, float, 1)
BIAS_ACT(f32_f32, float, float, 4)
BIAS_ACT(bf16_f32, __nv_bfloat16, float, 1)
BIAS_ACT(bf16_f32, __nv_bfloat16, float, 8)
BIAS_ACT(bf16_bf16, __nv_bfloat16, __nv_bfloat16, 1)
BIAS_ACT(bf16_bf16, __nv_bfloat16, __nv_bfloat16, 8)

#define RELU_BWD(SUF, T, V) \
extern "C" __global__ void relu_bwd_##SUF##_v##V(const T* y, const T* dy, T* dx, size_t n) { relu_bwd<T, V>(y, dy, dx, n); }
RELU_BWD(f32, float, 1)
RELU_BWD(f32, float, 4)
RELU_BWD(bf16, __nv_bfloat16, 1)
RELU_BWD(bf16, __nv_bfloat16, 8)
"#
);

/// Plain-candle twin of [`bias_act`]: `x + b`, `· s[..., None]`, `relu` (each a candle op).
pub fn bias_act_twin(
    x: &Tensor,
    bias: Option<&Tensor>,
    row_scale: Option<&Tensor>,
    relu: bool,
) -> Result<Tensor> {
    let mut y = x.clone();
    if let Some(b) = bias {
        y = y.broadcast_add(&cast(b, x.dtype())?)?;
    }
    if let Some(s) = row_scale {
        let s = cast(s, x.dtype())?;
        // One value per row (`[*]` or `[*, 1]`), or anything broadcastable to `x`.
        let s = if s.elem_count() == x.elem_count() / x.dims().last().copied().unwrap_or(1).max(1) {
            s.reshape(row_dims(x))?
        } else {
            s
        };
        y = y.broadcast_mul(&s)?;
    }
    if relu {
        y = y.relu()?;
    }
    // Same contract as the fused op: a contiguous result.
    Ok(y.contiguous()?)
}

/// `x.dims()` with the last dimension set to 1 (the shape of a per-row scale).
fn row_dims(x: &Tensor) -> Vec<usize> {
    let mut d = x.dims().to_vec();
    if let Some(l) = d.last_mut() {
        *l = 1;
    }
    d
}

/// `act((x + b[col]) · s[row])` with `x` `[*, c]`, `b` `[c]` (f32 or `x`'s dtype), `s` with one
/// value per row (`[*]`, `x`'s dtype), `act` = relu or identity; a contiguous result in `x`'s
/// dtype. No graph (detached inputs). The fused kernel on CUDA (f32/bf16, fused kernels on),
/// the twin otherwise.
pub fn bias_act(
    x: &Tensor,
    bias: Option<&Tensor>,
    row_scale: Option<&Tensor>,
    relu: bool,
) -> Result<Tensor> {
    let x = x.detach();
    let bias = bias.map(|b| b.detach());
    let row_scale = row_scale.map(|s| s.detach());
    if super::fused_for(&x)
        && super::epilogues_enabled()
        && fused_applies(&x, bias.as_ref(), row_scale.as_ref())
    {
        #[cfg(feature = "cuda")]
        {
            let y = match x.dtype() {
                DType::F32 => cuda::bias_act_t::<f32>(&x, bias.as_ref(), row_scale.as_ref(), relu)?,
                DType::BF16 => {
                    cuda::bias_act_t::<half::bf16>(&x, bias.as_ref(), row_scale.as_ref(), relu)?
                }
                _ => return bias_act_twin(&x, bias.as_ref(), row_scale.as_ref(), relu),
            };
            return Ok(y);
        }
    }
    bias_act_twin(&x, bias.as_ref(), row_scale.as_ref(), relu)
}

/// `x + b` over the last dimension ([`bias_act`]).
pub fn bias_add(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    bias_act(x, Some(b), None, false)
}

/// `relu(x + b)` over the last dimension ([`bias_act`]).
pub fn bias_relu(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    bias_act(x, Some(b), None, true)
}

/// `x · s[..., None]` (one scale per row, e.g. a mask; [`bias_act`]).
pub fn row_scale(x: &Tensor, s: &Tensor) -> Result<Tensor> {
    bias_act(x, None, Some(s), false)
}

/// Shapes and dtypes the fused kernel takes (see [`bias_act`]).
fn fused_applies(x: &Tensor, bias: Option<&Tensor>, s: Option<&Tensor>) -> bool {
    let c = *x.dims().last().unwrap_or(&0);
    let n = x.elem_count();
    if c == 0 || n == 0 || x.rank() == 0 || n / c.max(1) > u32::MAX as usize / 2 {
        return false;
    }
    let dev_ok = |t: &Tensor| t.device().same_device(x.device());
    let b_ok = bias.is_none_or(|b| {
        dev_ok(b) && b.elem_count() == c && (b.dtype() == DType::F32 || b.dtype() == x.dtype())
    });
    let s_ok = s.is_none_or(|s| dev_ok(s) && s.elem_count() == n / c && s.dtype() == x.dtype());
    b_ok && s_ok
}

/// `dy · [y > 0]`: the backward of `y = relu(x)` from its output (twin: `gt`, cast, `mul`).
pub fn relu_bwd_twin(y: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let keep = y.gt(0.0)?.to_dtype(dy.dtype())?;
    Ok((dy * keep)?)
}

/// [`relu_bwd_twin`] as one fused kernel on CUDA (same shape and dtype, f32/bf16, fused kernels
/// on); the twin otherwise.
pub fn relu_bwd(y: &Tensor, dy: &Tensor) -> Result<Tensor> {
    if super::fused_for(y)
        && super::epilogues_enabled()
        && y.shape() == dy.shape()
        && y.dtype() == dy.dtype()
        && y.elem_count() > 0
        && y.device().same_device(dy.device())
    {
        #[cfg(feature = "cuda")]
        {
            let (y, dy) = (y.detach().contig()?, dy.detach().contig()?);
            return Ok(match y.dtype() {
                DType::F32 => cuda::relu_bwd_t::<f32>(&y, &dy)?,
                DType::BF16 => cuda::relu_bwd_t::<half::bf16>(&y, &dy)?,
                _ => relu_bwd_twin(&y, &dy)?,
            });
        }
    }
    relu_bwd_twin(y, dy)
}

/// Row structure of a layout: `(start, rows, c, row stride)` when the last dimension has unit
/// stride and the leading dimensions flatten to rows of one uniform stride (e.g. a column slice
/// `narrow(-1, ..)` of a contiguous tensor); `None` otherwise.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
pub(crate) fn row_layout(l: &candle_core::Layout) -> Option<(usize, usize, usize, usize)> {
    let dims = l.dims();
    let strides = l.stride();
    let rank = dims.len();
    if rank == 0 {
        return None;
    }
    let c = dims[rank - 1];
    if c > 1 && strides[rank - 1] != 1 {
        return None;
    }
    // Leading dims (size-1 dims skipped), outermost first: each stride = next stride · next dim.
    let lead: Vec<(usize, usize)> = dims[..rank - 1]
        .iter()
        .zip(&strides[..rank - 1])
        .filter(|(d, _)| **d != 1)
        .map(|(d, s)| (*d, *s))
        .collect();
    let rows: usize = lead.iter().map(|(d, _)| d).product();
    let ld = lead.last().map_or(c, |(_, s)| *s);
    for w in lead.windows(2) {
        if w[0].1 != w[1].1 * w[1].0 {
            return None;
        }
    }
    if ld < c {
        return None;
    }
    Some((l.start_offset(), rows, c, ld))
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{DType, Tensor};
    use cudarc::driver::{DeviceRepr, PushKernelArg};

    use super::super::launch::{cerr, cuda_storage, func, range, suffix, tensor_from_slice, BLOCK};
    use super::super::nvrtc;
    use super::{row_layout, MODULE, SOURCE};
    use crate::kernels::permute::Contig;

    fn wide(dt: DType) -> usize {
        if dt == DType::BF16 {
            8
        } else {
            4
        }
    }

    /// See [`super::bias_act`]; inputs detached, checked by `fused_applies`.
    pub(super) fn bias_act_t<T: CudaDType + DeviceRepr>(
        x: &Tensor,
        bias: Option<&Tensor>,
        s: Option<&Tensor>,
        relu: bool,
    ) -> candle_core::Result<Tensor> {
        let x = match row_layout(x.layout()) {
            Some(_) => x.clone(),
            None => x.contig()?,
        };
        let (start, rows, c, ldx) =
            row_layout(x.layout()).ok_or_else(|| cerr("bias_act: no row layout"))?;
        let dt = x.dtype();
        let bias = match bias {
            Some(b) if b.dtype() == DType::F32 || b.dtype() == dt => Some(b.contig()?),
            Some(b) => Some(b.to_dtype(DType::F32)?.contig()?),
            None => None,
        };
        let s = match s {
            Some(s) => Some(s.to_dtype(dt)?.contig()?),
            None => None,
        };
        let bdt = bias.as_ref().map_or(DType::F32, |b| b.dtype());
        let w = wide(dt);
        let v = if c.is_multiple_of(w) && ldx.is_multiple_of(w) && start.is_multiple_of(w) {
            w
        } else {
            1
        };
        let name = format!(
            "bias_act_{}_{}_r{}_v{v}",
            suffix(dt)?,
            suffix(bdt)?,
            u8::from(relu)
        );
        let (sx, _) = x.storage_and_layout();
        let sx = cuda_storage(&sx)?;
        let dev = sx.device().clone();
        let f = func(&dev, MODULE, SOURCE, &name)?;
        let end = start + (rows.max(1) - 1) * ldx + c;
        let xv = sx.as_cuda_slice::<T>()?.slice(start..end);
        let n = rows * c;
        // SAFETY: every element is written by the kernel.
        let mut y = unsafe { dev.alloc::<T>(n)? };
        let groups = (n / v) as u32;
        let cg = (c / v) as u32;
        let null = 0u64;
        let bs = bias.as_ref().map(|b| b.storage_and_layout());
        let ss = s.as_ref().map(|s| s.storage_and_layout());
        let (bv32, bvt, sv);
        let stream = dev.cuda_stream();
        let mut lb = stream.launch_builder(&f);
        lb.arg(&xv).arg(&ldx);
        // Bias: f32 or T; null when absent.
        match &bs {
            Some((st, l)) => {
                let st = cuda_storage(st)?;
                if bdt == DType::F32 {
                    bv32 = st.as_cuda_slice::<f32>()?.slice(range(l)?);
                    lb.arg(&bv32);
                } else {
                    bvt = st.as_cuda_slice::<T>()?.slice(range(l)?);
                    lb.arg(&bvt);
                }
            }
            None => {
                lb.arg(&null);
            }
        }
        match &ss {
            Some((st, l)) => {
                sv = cuda_storage(st)?.as_cuda_slice::<T>()?.slice(range(l)?);
                lb.arg(&sv);
            }
            None => {
                lb.arg(&null);
            }
        }
        lb.arg(&mut y).arg(&cg).arg(&groups);
        // SAFETY: argument types match the kernel signature; `x` holds `rows` rows of `c`
        // elements at stride `ldx` (v-aligned when v > 1), the bias `c` and the scale `rows`
        // elements, `y` `rows · c`.
        unsafe { lb.launch(nvrtc::grid_1d(groups as usize, BLOCK)) }.w()?;
        let mut dims = x.dims().to_vec();
        if dims.is_empty() {
            dims.push(1);
        }
        Ok(tensor_from_slice(y, &dev, &dims.into()))
    }

    pub(super) fn relu_bwd_t<T: CudaDType + DeviceRepr>(
        y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let n = y.elem_count();
        let (sy, ly) = y.storage_and_layout();
        let (sd, ld) = dy.storage_and_layout();
        let (sy, sd) = (cuda_storage(&sy)?, cuda_storage(&sd)?);
        let dev = sy.device();
        let (ry, rd) = (range(ly)?, range(ld)?);
        let w = wide(y.dtype());
        let v = if n.is_multiple_of(w) && ry.start.is_multiple_of(w) && rd.start.is_multiple_of(w) {
            w
        } else {
            1
        };
        let name = format!("relu_bwd_{}_v{v}", suffix(y.dtype())?);
        let f = func(dev, MODULE, SOURCE, &name)?;
        let yv = sy.as_cuda_slice::<T>()?.slice(ry);
        let dv = sd.as_cuda_slice::<T>()?.slice(rd);
        // SAFETY: every element is written by the kernel.
        let mut dx = unsafe { dev.alloc::<T>(n)? };
        let groups = n / v;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        b.arg(&yv).arg(&dv).arg(&mut dx).arg(&groups);
        // SAFETY: argument types match; all buffers hold `groups · v` elements, v-aligned.
        unsafe { b.launch(nvrtc::grid_1d(groups, BLOCK)) }.w()?;
        Ok(tensor_from_slice(dx, dev, y.shape()))
    }
}

fn case(what: &str, shape: &[usize], dtype: DType) -> String {
    format!("{what}{shape:?} {dtype:?}")
}

fn tol(dtype: DType) -> f64 {
    if dtype == DType::BF16 {
        2e-2
    } else {
        2e-6
    }
}

/// One [`bias_act`] self-check case: `x` is `[rows, c]` or, with `ld > c`, the column slice
/// `[.., off..off + c]` of a `[rows, ld]` buffer.
struct ActCase {
    rows: usize,
    c: usize,
    ld: usize,
    off: usize,
    bias: Option<DType>,
    scale: bool,
    relu: bool,
}

/// Fused vs twin: [`bias_act`] (contiguous and column-slice inputs, f32 and same-dtype biases,
/// row scales, relu; odd widths) forward, the relu backward [`relu_bwd`], and the gradient of
/// `relu(x + b)` through [`relu_bwd`] against candle's autograd of the twin, in f32 and bf16 on
/// `dev` (a CUDA device).
pub fn self_check(dev: &Device) -> Result<Vec<ElemCheck>> {
    let cases = [
        ActCase {
            rows: 7,
            c: 13,
            ld: 13,
            off: 0,
            bias: Some(DType::F32),
            scale: false,
            relu: false,
        },
        ActCase {
            rows: 15,
            c: 40,
            ld: 40,
            off: 0,
            bias: Some(DType::F32),
            scale: true,
            relu: true,
        },
        ActCase {
            rows: 33,
            c: 24,
            ld: 96,
            off: 72,
            bias: Some(DType::F32),
            scale: false,
            relu: false,
        },
        ActCase {
            rows: 33,
            c: 24,
            ld: 97,
            off: 71,
            bias: None,
            scale: true,
            relu: false,
        },
        ActCase {
            rows: 64,
            c: 1000,
            ld: 1000,
            off: 0,
            bias: Some(DType::BF16),
            scale: false,
            relu: true,
        },
        ActCase {
            rows: 2048,
            c: 256,
            ld: 256,
            off: 0,
            bias: None,
            scale: true,
            relu: false,
        },
        ActCase {
            rows: 4096,
            c: 640,
            ld: 640,
            off: 0,
            bias: Some(DType::F32),
            scale: false,
            relu: false,
        },
    ];
    let mut out = Vec::new();
    for (k, a) in cases.iter().enumerate() {
        for dtype in [DType::F32, DType::BF16] {
            let seed = 0xb1a5_0000 + 16 * k as u64;
            let buf = super::uniform_tensor(&[a.rows, a.ld], 2.0, seed, dtype, dev)?;
            let x = buf.narrow(1, a.off, a.c)?;
            let bdt = match a.bias {
                Some(DType::BF16) => Some(dtype),
                other => other,
            };
            let b = match bdt {
                Some(bd) => Some(super::uniform_tensor(&[a.c], 1.0, seed ^ 1, bd, dev)?),
                None => None,
            };
            let s = if a.scale {
                // A mask-like scale: zeros and ones, some other values.
                let u = super::uniform_tensor(&[a.rows], 1.0, seed ^ 2, dtype, dev)?;
                Some(u.ge(-0.3)?.to_dtype(dtype)?.mul(&(u.abs()? + 0.5)?)?)
            } else {
                None
            };
            if !(super::fused_for(&x) && fused_applies(&x, b.as_ref(), s.as_ref())) {
                return Err(crate::error::Error::Msg(format!(
                    "bias_act self-check: the fused kernel does not take case {k} ({dtype:?})"
                )));
            }
            let yf = bias_act(&x, b.as_ref(), s.as_ref(), a.relu)?;
            let yt = bias_act_twin(&x, b.as_ref(), s.as_ref(), a.relu)?;
            let what = format!(
                "bias_act{}{}{} fwd",
                if b.is_some() { " +b" } else { "" },
                if s.is_some() { " ·s" } else { "" },
                if a.relu { " relu" } else { "" }
            );
            let shape = if a.ld == a.c {
                format!("[{}, {}]", a.rows, a.c)
            } else {
                format!("[{}, {}] of ld {} @{}", a.rows, a.c, a.ld, a.off)
            };
            out.push(ElemCheck {
                op: what,
                case: format!("{shape} {dtype:?}"),
                max_err: super::rel_err(&yf, &yt)?,
                tol: tol(dtype),
            });
            if a.relu {
                // Gradients of relu(x + b) (· s): relu_bwd on the fused output, then the
                // (unfused) bias column sum, vs candle autograd of the twin.
                let dy = super::uniform_tensor(&[a.rows, a.c], 1.0, seed ^ 3, dtype, dev)?;
                let xv = candle_core::Var::from_tensor(&x.contiguous()?)?;
                let bv = match &b {
                    Some(b) => Some(candle_core::Var::from_tensor(b)?),
                    None => None,
                };
                let y = bias_act_twin(
                    xv.as_tensor(),
                    bv.as_ref().map(|v| v.as_tensor()),
                    s.as_ref(),
                    true,
                )?;
                let grads = (&y * &dy)?.sum_all()?.backward()?;
                let missing = || crate::error::Error::Msg("bias_act: no gradient".into());
                // candle's relu backward uses `x ≥ 0`, the output-based one `y > 0`: they
                // differ only where `x + b == 0` exactly (common in bf16), a subgradient choice.
                let dx_t = (grads.get(xv.as_tensor()).ok_or_else(missing)?
                    * yt.gt(0.0)?.to_dtype(dtype)?)?;
                let dx_t = &dx_t;
                // dx = relu_bwd(y, dy) · s (the scale, when present, is applied by row_scale).
                let mut dx_f = relu_bwd(&yf, &dy)?;
                if let Some(s) = &s {
                    dx_f = row_scale(&dx_f, s)?;
                }
                out.push(ElemCheck {
                    op: "bias_relu bwd dx".into(),
                    case: case("", &[a.rows, a.c], dtype),
                    max_err: super::rel_err(&dx_f, dx_t)?,
                    tol: tol(dtype),
                });
                if let Some(bv) = &bv {
                    // Σ_rows of the reference dx (f32 accumulation); autograd's own db
                    // carries the x + b == 0 terms.
                    let _ = grads.get(bv.as_tensor()).ok_or_else(missing)?;
                    let db_t = &dx_t.to_dtype(DType::F32)?.sum(0)?;
                    let db_f = crate::model::vjp::bias_grad(&dx_f)?;
                    out.push(ElemCheck {
                        op: "bias_relu bwd db".into(),
                        case: case("", &[a.rows, a.c], dtype),
                        max_err: super::rel_err(&db_f, db_t)?,
                        tol: 2.0 * tol(dtype),
                    });
                }
            }
        }
    }
    // relu backward alone, odd and non-multiple-of-vector lengths.
    for (k, shape) in [
        &[3usize, 5, 7][..],
        &[2, 33, 64],
        &[129, 1031],
        &[1024, 1024],
    ]
    .iter()
    .enumerate()
    {
        for dtype in [DType::F32, DType::BF16] {
            let seed = 0x4e10_0000 + k as u64;
            let y = super::uniform_tensor(shape, 1.0, seed, dtype, dev)?.relu()?;
            let dy = super::uniform_tensor(shape, 1.0, seed ^ 5, dtype, dev)?;
            out.push(ElemCheck {
                op: "relu_bwd".into(),
                case: case("", shape, dtype),
                max_err: super::rel_err(&relu_bwd(&y, &dy)?, &relu_bwd_twin(&y, &dy)?)?,
                tol: 0.0,
            });
        }
    }
    Ok(out)
}

/// Fused vs twin timings at the Evoformer's shapes (bf16, 128 × 256 block): `Linear` bias adds
/// (`[32768, 256]`, the triangle multiplication's joint projection `[65536, 640]`, the gate
/// columns of the attention's q/k/v/g projection), the transition's `relu(x + b)` and relu
/// backward `[32768, 1024]`, the mask multiply `[65536, 128]`.
pub fn bench_rows(dev: &Device, iters: usize) -> Result<Vec<ElemBenchRow>> {
    let dt = DType::BF16;
    let mut rows = Vec::new();
    // (name, rows, c, ld, off, bias, scale, relu)
    type Row = (&'static str, usize, usize, usize, usize, bool, bool, bool);
    let cases: [Row; 6] = [
        ("bias_add", 32768, 256, 256, 0, true, false, false),
        ("bias_add", 65536, 640, 640, 0, true, false, false),
        (
            "bias_add g-slice",
            32768,
            256,
            1024,
            768,
            true,
            false,
            false,
        ),
        ("bias_relu", 32768, 1024, 1024, 0, true, false, false),
        ("bias_add ·mask", 32768, 256, 256, 0, true, true, false),
        ("row_scale", 65536, 128, 128, 0, false, true, false),
    ];
    for (k, &(name, nr, c, ld, off, has_b, has_s, _)) in cases.iter().enumerate() {
        let relu = name == "bias_relu";
        let buf = super::uniform_tensor(&[nr, ld], 2.0, 10 + k as u64, dt, dev)?;
        let x = buf.narrow(1, off, c)?;
        let b = if has_b {
            Some(super::uniform_tensor(
                &[c],
                1.0,
                20 + k as u64,
                DType::F32,
                dev,
            )?)
        } else {
            None
        };
        let s = if has_s {
            Some(
                super::uniform_tensor(&[nr], 1.0, 30, dt, dev)?
                    .ge(-0.5)?
                    .to_dtype(dt)?,
            )
        } else {
            None
        };
        let f = || bias_act(&x, b.as_ref(), s.as_ref(), relu);
        let t = || bias_act_twin(&x, b.as_ref(), s.as_ref(), relu);
        let fused_ms = super::median_ms(dev, 3, iters, || f().map(|_| ()))?;
        let twin_ms = super::median_ms(dev, 3, iters, || t().map(|_| ()))?;
        rows.push(ElemBenchRow {
            op: name.into(),
            case: if ld == c {
                format!("[{nr}, {c}] {dt:?}")
            } else {
                format!("[{nr}, {c}] of ld {ld} {dt:?}")
            },
            fused_ms,
            twin_ms,
            max_err: super::rel_err(&f()?, &t()?)?,
        });
    }
    let y = super::uniform_tensor(&[32768, 1024], 1.0, 40, dt, dev)?.relu()?;
    let dy = super::uniform_tensor(&[32768, 1024], 1.0, 41, dt, dev)?;
    let fused_ms = super::median_ms(dev, 3, iters, || relu_bwd(&y, &dy).map(|_| ()))?;
    let twin_ms = super::median_ms(dev, 3, iters, || relu_bwd_twin(&y, &dy).map(|_| ()))?;
    rows.push(ElemBenchRow {
        op: "relu_bwd".into(),
        case: format!("[32768, 1024] {dt:?}"),
        fused_ms,
        twin_ms,
        max_err: super::rel_err(&relu_bwd(&y, &dy)?, &relu_bwd_twin(&y, &dy)?)?,
    });
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On the CPU every entry point is its twin.
    #[test]
    fn cpu_is_the_twin() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[[1.0f32, -2.0, 0.5], [3.0, -1.0, -4.0]], &dev).unwrap();
        let b = Tensor::new(&[0.5f32, 1.0, -1.0], &dev).unwrap();
        let s = Tensor::new(&[2.0f32, 0.0], &dev).unwrap();
        let y = bias_act(&x, Some(&b), Some(&s), true)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(y, vec![vec![3.0, 0.0, 0.0], vec![0.0, 0.0, 0.0]]);
        let y = bias_add(&x, &b).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(y[1], vec![3.5, 0.0, -5.0]);
        let d = relu_bwd(&x, &Tensor::ones((2, 3), DType::F32, &dev).unwrap())
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert_eq!(d, vec![vec![1.0, 0.0, 1.0], vec![1.0, 0.0, 0.0]]);
    }

    /// Column slices are recognised as rows of a uniform stride; transposes are not.
    #[test]
    fn row_layout_of_slices() {
        let x = Tensor::zeros((4, 5, 12), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(row_layout(x.layout()), Some((0, 20, 12, 12)));
        let v = x.narrow(2, 8, 4).unwrap();
        assert_eq!(row_layout(v.layout()), Some((8, 20, 4, 12)));
        let y = x.reshape((4, 5, 4, 3)).unwrap();
        let g = y.narrow(2, 3, 1).unwrap();
        assert_eq!(row_layout(g.layout()), Some((9, 20, 3, 12)));
        assert_eq!(row_layout(x.transpose(0, 1).unwrap().layout()), None);
        assert_eq!(row_layout(x.transpose(1, 2).unwrap().layout()), None);
    }
}
