//! Same-shape element-wise add `a + b` (residual adds and gradient accumulation of the
//! hand-written trunk path).
//!
//! candle's `badd` kernel reads and writes 2- or 4-byte elements behind a per-element contiguity
//! branch: measured with `ncu` on H100 at 860 GB/s on `[128, 256, 256]` bf16 (44 µs). Here one
//! thread adds 16 bytes of each operand (`V` = 8 bf16/f16 or 4 f32 elements), with candle's own
//! rounding: bf16/f16 pairs through `__hadd2` (one correctly rounded add per element, as candle's
//! `x + y` / `__hadd2`), f32 a plain add. The result is bitwise the twin's.
//!
//! [`add`] takes the kernel for contiguous CUDA tensors of one shape and dtype (f32, bf16, f16)
//! without gradient history and the fused kernels on; everything else (CPU, broadcasts, strided
//! views, tensors in an autograd graph) goes to the twin [`add_twin`] (candle's `a + b`).

use candle_core::{DType, Device, Tensor};

use super::{ElemBenchRow, ElemCheck};
use crate::error::Result;

/// NVRTC module name.
pub const MODULE: &str = "ferrofold_add";

/// CUDA C source: `add_{f32,bf16,f16}_v{1,V}` (one thread per `V` consecutive elements).
#[cfg(feature = "cuda")]
pub const SOURCE: &str = r#"
#include <cuda_bf16.h>
#include <cuda_fp16.h>
template <typename T, int V> struct alignas(sizeof(T) * V) Pack { T v[V]; };

__device__ __forceinline__ float add1(float a, float b) { return a + b; }
__device__ __forceinline__ __nv_bfloat16 add1(__nv_bfloat16 a, __nv_bfloat16 b) { return __hadd(a, b); }
__device__ __forceinline__ __half add1(__half a, __half b) { return __hadd(a, b); }

// Pairs of 16-bit values as one x2 add (the same per-element rounding as the scalar add).
template <typename T, typename T2, int V>
__device__ __forceinline__ void add_pack2(const Pack<T, V>& a, const Pack<T, V>& b, Pack<T, V>& y) {
    const T2* a2 = reinterpret_cast<const T2*>(a.v);
    const T2* b2 = reinterpret_cast<const T2*>(b.v);
    T2* y2 = reinterpret_cast<T2*>(y.v);
#pragma unroll
    for (int j = 0; j < V / 2; j++) y2[j] = __hadd2(a2[j], b2[j]);
}

template <typename T, int V>
__device__ __forceinline__ void add_pack(const Pack<T, V>& a, const Pack<T, V>& b, Pack<T, V>& y) {
#pragma unroll
    for (int j = 0; j < V; j++) y.v[j] = add1(a.v[j], b.v[j]);
}
template <>
__device__ __forceinline__ void add_pack<__nv_bfloat16, 8>(const Pack<__nv_bfloat16, 8>& a, const Pack<__nv_bfloat16, 8>& b,
                                                           Pack<__nv_bfloat16, 8>& y) {
    add_pack2<__nv_bfloat16, __nv_bfloat162, 8>(a, b, y);
}
template <>
__device__ __forceinline__ void add_pack<__half, 8>(const Pack<__half, 8>& a, const Pack<__half, 8>& b, Pack<__half, 8>& y) {
    add_pack2<__half, __half2, 8>(a, b, y);
}

template <typename T, int V>
__device__ __forceinline__ void add_k(const T* __restrict__ a, const T* __restrict__ b, T* __restrict__ y, size_t n_groups) {
    size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n_groups) return;
    Pack<T, V> av = reinterpret_cast<const Pack<T, V>*>(a)[i];
    Pack<T, V> bv = reinterpret_cast<const Pack<T, V>*>(b)[i];
    Pack<T, V> out;
    add_pack<T, V>(av, bv, out);
    reinterpret_cast<Pack<T, V>*>(y)[i] = out;
}

#define ADD(SUF, T, V) \
extern "C" __global__ void add_##SUF##_v##V(const T* a, const T* b, T* y, size_t n) { add_k<T, V>(a, b, y, n); }
ADD(f32, float, 1)
ADD(f32, float, 4)
ADD(bf16, __nv_bfloat16, 1)
ADD(bf16, __nv_bfloat16, 8)
ADD(f16, __half, 1)
ADD(f16, __half, 8)
"#;

/// Plain-candle twin of [`add`]: `a + b` (candle's binary add, broadcasting rules included).
pub fn add_twin(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok((a + b)?)
}

/// Whether [`add`] runs the fused kernel for `(a, b)`.
pub fn fused_applies(a: &Tensor, b: &Tensor) -> bool {
    cfg!(feature = "cuda")
        && a.device().is_cuda()
        && matches!(a.dtype(), DType::F32 | DType::BF16 | DType::F16)
        && super::fused_enabled()
        && a.dtype() == b.dtype()
        && a.shape() == b.shape()
        && a.elem_count() > 0
        && a.device().same_device(b.device())
        && a.is_contiguous()
        && b.is_contiguous()
        && !a.track_op()
        && !b.track_op()
}

/// `a + b`: the fused kernel when [`fused_applies`], candle's add ([`add_twin`]) otherwise. The
/// result is bitwise the same either way.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if fused_applies(a, b) {
        #[cfg(feature = "cuda")]
        {
            return Ok(match a.dtype() {
                DType::F32 => cuda::add_t::<f32>(a, b)?,
                DType::BF16 => cuda::add_t::<half::bf16>(a, b)?,
                DType::F16 => cuda::add_t::<half::f16>(a, b)?,
                _ => add_twin(a, b)?,
            });
        }
    }
    add_twin(a, b)
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{DType, Tensor};
    use cudarc::driver::{DeviceRepr, PushKernelArg};

    use super::super::launch::{cerr, cuda_storage, func, range, tensor_from_slice, BLOCK};
    use super::super::nvrtc;
    use super::{MODULE, SOURCE};

    fn sfx(dt: DType) -> candle_core::Result<(&'static str, usize)> {
        match dt {
            DType::F32 => Ok(("f32", 4)),
            DType::BF16 => Ok(("bf16", 8)),
            DType::F16 => Ok(("f16", 8)),
            _ => Err(cerr(format!("add kernel: dtype {dt:?}"))),
        }
    }

    /// See [`super::add`]; checked by `fused_applies` (contiguous, same shape and dtype).
    pub(super) fn add_t<T: CudaDType + DeviceRepr>(
        a: &Tensor,
        b: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let n = a.elem_count();
        let (sa, la) = a.storage_and_layout();
        let (sb, lb) = b.storage_and_layout();
        let (sa, sb) = (cuda_storage(&sa)?, cuda_storage(&sb)?);
        let dev = sa.device();
        let (ra, rb) = (range(la)?, range(lb)?);
        let (name, w) = sfx(a.dtype())?;
        let v = if n.is_multiple_of(w) && ra.start.is_multiple_of(w) && rb.start.is_multiple_of(w) {
            w
        } else {
            1
        };
        let f = func(dev, MODULE, SOURCE, &format!("add_{name}_v{v}"))?;
        let av = sa.as_cuda_slice::<T>()?.slice(ra);
        let bv = sb.as_cuda_slice::<T>()?.slice(rb);
        // SAFETY: every element is written by the kernel.
        let mut y = unsafe { dev.alloc::<T>(n)? };
        let groups = n / v;
        let stream = dev.cuda_stream();
        let mut lb = stream.launch_builder(&f);
        lb.arg(&av).arg(&bv).arg(&mut y).arg(&groups);
        // SAFETY: argument types match; all buffers hold `groups · v` elements, v-aligned.
        unsafe { lb.launch(nvrtc::grid_1d(groups, BLOCK)) }.w()?;
        Ok(tensor_from_slice(y, dev, a.shape()))
    }
}

/// Fused vs twin on `dev` (a CUDA device): f32, bf16 and f16, vector and odd lengths, offset
/// views; bitwise (tolerance 0). Also checks that a broadcast or strided operand takes the twin.
pub fn self_check(dev: &Device) -> Result<Vec<ElemCheck>> {
    let mut out = Vec::new();
    for (k, shape) in [
        &[7usize][..],
        &[3, 5, 7],
        &[33, 64],
        &[129, 1031],
        &[64, 256, 128],
    ]
    .iter()
    .enumerate()
    {
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let seed = 0xadd0_0000 + 8 * k as u64;
            let a = super::uniform_tensor(shape, 3.0, seed, dtype, dev)?;
            let b = super::uniform_tensor(shape, 1.5, seed ^ 1, dtype, dev)?;
            if !fused_applies(&a, &b) {
                return Err(crate::error::Error::Msg(format!(
                    "add self-check: the fused kernel does not take {shape:?} {dtype:?}"
                )));
            }
            out.push(ElemCheck {
                op: "add".into(),
                case: format!("{shape:?} {dtype:?}"),
                max_err: super::rel_err(&add(&a, &b)?, &add_twin(&a, &b)?)?,
                tol: 0.0,
            });
        }
    }
    // A contiguous view at an odd offset (scalar kernel) and one at a vector-aligned offset.
    for (off, len) in [(3usize, 1000usize), (8, 4096)] {
        let buf = super::uniform_tensor(&[off + len], 2.0, 0xadd1, DType::BF16, dev)?;
        let a = buf.narrow(0, off, len)?;
        let b = super::uniform_tensor(&[len], 2.0, 0xadd2, DType::BF16, dev)?;
        out.push(ElemCheck {
            op: "add view".into(),
            case: format!("[{len}] @{off} BF16"),
            max_err: super::rel_err(&add(&a, &b)?, &add_twin(&a, &b)?)?,
            tol: 0.0,
        });
    }
    // Broadcast and transposed operands fall back to candle.
    let a = super::uniform_tensor(&[16, 8], 1.0, 0xadd3, DType::F32, dev)?;
    let row = super::uniform_tensor(&[1, 8], 1.0, 0xadd4, DType::F32, dev)?;
    let t = super::uniform_tensor(&[8, 16], 1.0, 0xadd5, DType::F32, dev)?.t()?;
    let fallback_ok = !fused_applies(&a, &row.broadcast_as((16, 8))?) && !fused_applies(&a, &t);
    out.push(ElemCheck {
        op: "add fallback".into(),
        case: "broadcast / transposed".into(),
        max_err: super::rel_err(&add(&a, &t)?, &add_twin(&a, &t)?)?
            + if fallback_ok { 0.0 } else { 1.0 },
        tol: 0.0,
    });
    Ok(out)
}

/// Fused vs twin timings at the Evoformer's residual shapes (`[128, 256, 256]` MSA and
/// `[256, 256, 128]` pair, bf16; f32 for comparison); 10 back-to-back adds per sample.
pub fn bench_rows(dev: &Device, iters: usize) -> Result<Vec<ElemBenchRow>> {
    let mut rows = Vec::new();
    for (shape, dt) in [
        ([128usize, 256, 256], DType::BF16),
        ([256, 256, 128], DType::BF16),
        ([128, 256, 256], DType::F32),
    ] {
        let a = super::uniform_tensor(&shape, 2.0, 50, dt, dev)?;
        let b = super::uniform_tensor(&shape, 2.0, 51, dt, dev)?;
        let fused_ms = super::median_ms_per_rep(dev, iters, 10, || add(&a, &b).map(|_| ()))?;
        let twin_ms = super::median_ms_per_rep(dev, iters, 10, || add_twin(&a, &b).map(|_| ()))?;
        let bytes = 3.0 * a.elem_count() as f64 * dt.size_in_bytes() as f64;
        rows.push(ElemBenchRow {
            op: "add".into(),
            case: format!(
                "{shape:?} {dt:?} {:.0} GB/s",
                bytes / (fused_ms * 1e-3) / 1e9
            ),
            fused_ms,
            twin_ms,
            max_err: super::rel_err(&add(&a, &b)?, &add_twin(&a, &b)?)?,
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On the CPU [`add`] is candle's add (broadcasts included).
    #[test]
    fn cpu_is_the_twin() {
        let dev = Device::Cpu;
        let a = Tensor::new(&[[1.0f32, -2.0], [3.0, 0.5]], &dev).unwrap();
        let b = Tensor::new(&[[0.5f32, 1.0], [-1.0, 2.0]], &dev).unwrap();
        assert!(!fused_applies(&a, &b));
        let y = add(&a, &b).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(y, vec![vec![1.5, -1.0], vec![2.0, 2.5]]);
    }
}
