//! Fused multi-tensor sum of squares (the global gradient norm of gradient clipping, AF2
//! supplement 1.11.3) in two launches for any number of tensors, instead of three candle ops
//! per tensor (`to_dtype`, `sqr`, `sum_all`: ~15k launches for AF2's 4915 parameters) plus a
//! `stack` and a host copy.
//!
//! The tensors are described by one device table (pointer, element offset in the flat
//! concatenation, dtype), uploaded in one copy. Stage 1 (`sqnorm_partial`): block `b` sums the
//! squares of flat elements `[b·CHUNK, (b+1)·CHUNK)` (walking the tensor segments that range
//! crosses) into `partial[b]`. Stage 2 (`sqnorm_final`): one block sums `partial` in a fixed
//! order. Squares and sums are in f64 (the square of an f32/bf16 value is exact in f64), and
//! every reduction is a fixed tree (warp shuffles, then shared memory), no atomics: the result
//! is bitwise reproducible run to run. One device-to-host copy of the f64 result.
//!
//! The candle-op path (f32 squares, f32 sum per tensor, f64 sum over tensors) rounds
//! differently: the two agree to ~1e-6 relative, not bitwise. NaN/inf elements make the sum
//! non-finite on both paths (the trainer skips such steps).

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};

/// NVRTC module name.
pub const MODULE: &str = "ferrofold_grad_norm";

/// Flat elements summed by one block of stage 1.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const CHUNK: usize = 8192;

/// Threads per block of both stages.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const THREADS: u32 = 256;

/// CUDA C source. Table `tab` (u64, `T` tensors): `tab[0..T]` device pointers,
/// `tab[T..2T+1]` element offsets in the flat concatenation (`offs[T]` = total),
/// `tab[2T+1..3T+1]` dtype codes (0 = f32, 1 = bf16).
#[cfg(feature = "cuda")]
pub const SOURCE: &str = r#"
#include <cuda_bf16.h>
#define CHUNK 8192ULL
#define THREADS 256

// Sum over the block in a fixed order (deterministic): butterfly within each warp, then warp 0
// over the warp sums. The result is valid in thread 0.
__device__ __forceinline__ double block_sum(double v, double* red) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) red[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < (THREADS / 32) ? red[lane] : 0.0;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    }
    return v;
}

extern "C" __global__ void sqnorm_partial(const unsigned long long* tab, int n_tensors, double* partial)
{
    __shared__ int t_first;
    __shared__ double red[THREADS / 32];
    const unsigned long long* ptrs = tab;
    const unsigned long long* offs = tab + n_tensors;
    const unsigned long long* kinds = tab + 2 * n_tensors + 1;
    const unsigned long long total = offs[n_tensors];
    const unsigned long long start = (unsigned long long)blockIdx.x * CHUNK;
    const unsigned long long end = min(start + CHUNK, total);
    if (threadIdx.x == 0) {
        // Last tensor whose offset is <= start.
        int lo = 0, hi = n_tensors - 1;
        while (lo < hi) {
            int mid = (lo + hi + 1) / 2;
            if (offs[mid] <= start) lo = mid; else hi = mid - 1;
        }
        t_first = lo;
    }
    __syncthreads();
    double acc = 0.0;
    int t = t_first;
    unsigned long long s = start;
    // Block-uniform walk over the tensor segments inside [start, end).
    while (s < end) {
        while (offs[t + 1] <= s) t++;
        const unsigned long long base = offs[t];
        const unsigned long long seg_end = min(offs[t + 1], end);
        if (kinds[t] == 0) {
            const float* p = (const float*)ptrs[t];
#pragma unroll 4
            for (unsigned long long i = s + threadIdx.x; i < seg_end; i += THREADS) {
                const double x = (double)p[i - base];
                acc = fma(x, x, acc);
            }
        } else {
            const __nv_bfloat16* p = (const __nv_bfloat16*)ptrs[t];
#pragma unroll 4
            for (unsigned long long i = s + threadIdx.x; i < seg_end; i += THREADS) {
                const double x = (double)__bfloat162float(p[i - base]);
                acc = fma(x, x, acc);
            }
        }
        s = seg_end;
    }
    acc = block_sum(acc, red);
    if (threadIdx.x == 0) partial[blockIdx.x] = acc;
}

// One block: out[0] = sum of partial[0..n] (fixed order).
extern "C" __global__ void sqnorm_final(const double* partial, int n, double* out)
{
    __shared__ double red[THREADS / 32];
    double acc = 0.0;
    for (int i = threadIdx.x; i < n; i += THREADS) acc += partial[i];
    acc = block_sum(acc, red);
    if (threadIdx.x == 0) out[0] = acc;
}
"#;

/// Whether the fused kernel can read `t`: a non-empty contiguous f32 or bf16 tensor on a CUDA
/// device (CUDA build).
pub fn eligible(t: &Tensor) -> bool {
    cfg!(feature = "cuda")
        && t.device().is_cuda()
        && matches!(t.dtype(), DType::F32 | DType::BF16)
        && t.elem_count() > 0
        && t.is_contiguous()
}

/// Which of `tensors` the fused path takes when [`super::fused_enabled`]: the [`eligible`]
/// ones on the device of the first eligible one (indices, in order); the rest go to the caller's
/// candle-op path. Empty when fused kernels are off.
pub fn fused_selection(tensors: &[&Tensor]) -> Vec<usize> {
    if !super::fused_enabled() {
        return Vec::new();
    }
    let mut dev: Option<&candle_core::Device> = None;
    let mut out = Vec::new();
    for (i, t) in tensors.iter().enumerate() {
        if !eligible(t) {
            continue;
        }
        match dev {
            None => {
                dev = Some(t.device());
                out.push(i);
            }
            Some(d) if d.same_device(t.device()) => out.push(i),
            Some(_) => {}
        }
    }
    out
}

/// The flat-concatenation offsets of tensors of `lens` elements (`lens.len() + 1` values, the
/// last one the total) and the number of stage-1 blocks (`ceil(total / CHUNK)`, at least 1).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn offsets_and_blocks(lens: &[usize]) -> (Vec<u64>, usize) {
    let mut offs = Vec::with_capacity(lens.len() + 1);
    let mut total = 0u64;
    for &n in lens {
        offs.push(total);
        total += n as u64;
    }
    offs.push(total);
    (offs, (total as usize).div_ceil(CHUNK).max(1))
}

/// Sum of the squares of every element of `tensors` (all [`eligible`], on one CUDA device) in
/// f64, by the fused kernel. 0 for an empty list.
pub fn sum_sq_fused(tensors: &[&Tensor]) -> Result<f64> {
    if tensors.is_empty() {
        return Ok(0.0);
    }
    if let Some(bad) = tensors.iter().position(|t| !eligible(t)) {
        return Err(Error::Train(format!(
            "fused grad norm: tensor {bad} is not a non-empty contiguous f32/bf16 CUDA tensor"
        )));
    }
    if let Some(bad) = tensors
        .iter()
        .position(|t| !t.device().same_device(tensors[0].device()))
    {
        return Err(Error::Train(format!(
            "fused grad norm: tensor {bad} is on another device than tensor 0"
        )));
    }
    sum_sq_unchecked(tensors)
}

/// [`sum_sq_fused`] without the checks (the caller selected the tensors with [`eligible`] on one
/// device, as [`fused_selection`] does).
fn sum_sq_unchecked(tensors: &[&Tensor]) -> Result<f64> {
    if tensors.is_empty() {
        return Ok(0.0);
    }
    #[cfg(feature = "cuda")]
    {
        cuda::sum_sq(tensors)
    }
    #[cfg(not(feature = "cuda"))]
    {
        Err(Error::Msg(
            "fused grad norm needs the `cuda` feature".into(),
        ))
    }
}

/// Split for a global norm: the f64 sum of squares of the tensors the fused kernel takes
/// ([`fused_selection`]) and the tensors left for the caller's candle-op path. On the CPU, in CPU
/// builds or with fused kernels off this is `(0.0, all tensors)`, so `fused + rest` equals the
/// caller's candle result bitwise there. When some tensors are fused, empty ones are left out of
/// the rest (they add nothing).
pub fn fused_sum_sq<'a>(tensors: &[&'a Tensor]) -> Result<(f64, Vec<&'a Tensor>)> {
    let sel = fused_selection(tensors);
    if sel.is_empty() {
        return Ok((0.0, tensors.to_vec()));
    }
    let mut take = vec![false; tensors.len()];
    for &i in &sel {
        take[i] = true;
    }
    let fused: Vec<&Tensor> = sel.iter().map(|&i| tensors[i]).collect();
    // Empty tensors add nothing (and some candle CUDA ops refuse them).
    let rest: Vec<&Tensor> = tensors
        .iter()
        .zip(&take)
        .filter(|(t, &k)| !k && t.elem_count() > 0)
        .map(|(t, _)| *t)
        .collect();
    if !rest.is_empty() {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            tracing::warn!(
                "global grad norm: {} of {} gradients are not contiguous f32/bf16 on the first \
                 CUDA device; they take per-tensor candle ops (slow)",
                rest.len(),
                tensors.len()
            )
        });
    }
    Ok((sum_sq_unchecked(&fused)?, rest))
}

/// The candle-op sum of squares of [`crate::train::optim::global_grad_norm`]: per tensor f32
/// squares summed in f32 on the device, the per-tensor sums added in f64 in order on the host
/// (one device-to-host copy).
pub fn sum_sq_candle(tensors: &[&Tensor]) -> Result<f64> {
    if tensors.is_empty() {
        return Ok(0.0);
    }
    let sums = tensors
        .iter()
        .map(|g| g.to_dtype(DType::F32)?.sqr()?.sum_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let per_tensor = Tensor::stack(&sums, 0)?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?;
    Ok(per_tensor.iter().sum::<f64>())
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::WrapErr;
    use candle_core::{DType, Device, Tensor};
    use cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};
    use half::bf16;

    use super::super::launch::{cuda_storage, range};
    use super::super::nvrtc;
    use super::{offsets_and_blocks, MODULE, SOURCE, THREADS};
    use crate::error::{Error, Result};

    pub(super) fn sum_sq(tensors: &[&Tensor]) -> Result<f64> {
        let device = tensors[0].device().clone();
        let Device::Cuda(dev) = &device else {
            return Err(Error::Train("fused grad norm: not a CUDA device".into()));
        };
        let f1 = nvrtc::func(dev, MODULE, SOURCE, "sqnorm_partial")?;
        let f2 = nvrtc::func(dev, MODULE, SOURCE, "sqnorm_final")?;
        let stream = dev.cuda_stream();
        let n = tensors.len();
        let lens: Vec<usize> = tensors.iter().map(|t| t.elem_count()).collect();
        let (offs, blocks) = offsets_and_blocks(&lens);

        // Device pointers (read guards held until the launches are queued).
        let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
        let mut tab: Vec<u64> = Vec::with_capacity(3 * n + 1);
        let mut kinds: Vec<u64> = Vec::with_capacity(n);
        let mut syncs = Vec::with_capacity(n);
        for (t, (s, l)) in tensors.iter().zip(&guards) {
            let cs = cuda_storage(s)?;
            let r = range(l)?;
            let (base, sync, size, kind) = match t.dtype() {
                DType::F32 => {
                    let (p, s) = cs.as_cuda_slice::<f32>()?.device_ptr(&stream);
                    (p, s, 4u64, 0u64)
                }
                DType::BF16 => {
                    let (p, s) = cs.as_cuda_slice::<bf16>()?.device_ptr(&stream);
                    (p, s, 2, 1)
                }
                dt => {
                    return Err(Error::Train(format!(
                        "fused grad norm: unsupported dtype {dt:?}"
                    )))
                }
            };
            tab.push(base + size * r.start as u64);
            kinds.push(kind);
            syncs.push(sync);
        }
        tab.extend_from_slice(&offs);
        tab.extend_from_slice(&kinds);
        let d_tab = stream.clone_htod(&tab).w()?;
        let n_tensors = i32::try_from(n)
            .map_err(|_| Error::Train("fused grad norm: too many tensors".into()))?;
        let n_blocks = i32::try_from(blocks)
            .map_err(|_| Error::Train("fused grad norm: too many elements".into()))?;
        // SAFETY: every block writes its partial; stage 2 reads them after stage 1 (same stream).
        let mut partial = unsafe { stream.alloc::<f64>(blocks) }.w()?;
        let mut out = unsafe { stream.alloc::<f64>(1) }.w()?;
        let cfg1 = LaunchConfig {
            grid_dim: (n_blocks as u32, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = stream.launch_builder(&f1);
        b.arg(&d_tab).arg(&n_tensors).arg(&mut partial);
        // SAFETY: the table describes live, contiguous f32/bf16 buffers of the given lengths
        // (read guards held); `partial` has one slot per block.
        unsafe { b.launch(cfg1) }.w()?;
        let cfg2 = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let mut b = stream.launch_builder(&f2);
        b.arg(&partial).arg(&n_blocks).arg(&mut out);
        // SAFETY: `partial` holds `n_blocks` values written by stage 1; `out` one slot.
        unsafe { b.launch(cfg2) }.w()?;
        drop(syncs);
        drop(guards);
        // Device-to-host into pageable memory: returns once the value has arrived.
        let host = stream.clone_dtoh(&out).w()?;
        host.first()
            .copied()
            .ok_or_else(|| Error::Train("fused grad norm: empty result".into()))
    }
}

/// Compare the fused sum of squares with the candle-op one on `dev`: small and AF2-like shapes,
/// f32 and bf16 (and mixed); tolerance 2e-6 relative on the norm (the candle ops sum f32
/// squares in f32, the kernel in f64).
/// Also against the f64 sum on the host (1e-12), that two runs are bitwise equal and that a NaN / inf element gives a non-finite
/// result.
pub fn self_check(dev: &candle_core::Device) -> Result<Vec<super::ElemCheck>> {
    let shapes: Vec<Vec<usize>> = vec![
        vec![1],
        vec![7],
        vec![3, 5],
        vec![8191],
        vec![8193],
        vec![64, 33],
        vec![256, 256],
        vec![128, 3, 11],
        vec![2, 8192],
    ];
    let mut checks = Vec::new();
    for (label, dts) in [
        ("f32", vec![DType::F32]),
        ("bf16", vec![DType::BF16]),
        ("mixed", vec![DType::F32, DType::BF16]),
    ] {
        let ts: Vec<Tensor> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let dt = dts[i % dts.len()];
                super::uniform_tensor(s, 1.0 + i as f32, 0x9e0 + i as u64, dt, dev)
            })
            .collect::<Result<_>>()?;
        let refs: Vec<&Tensor> = ts.iter().collect();
        let fused = sum_sq_fused(&refs)?.sqrt();
        let again = sum_sq_fused(&refs)?.sqrt();
        let candle = sum_sq_candle(&refs)?.sqrt();
        let mut host = 0f64;
        for t in &refs {
            let v = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            host += v.iter().map(|x| f64::from(*x) * f64::from(*x)).sum::<f64>();
        }
        let host = host.sqrt();
        let case = format!("{} tensors {label}", refs.len());
        checks.push(super::ElemCheck {
            op: "grad norm vs host f64".into(),
            case: case.clone(),
            max_err: (fused - host).abs() / host.abs().max(f64::MIN_POSITIVE),
            tol: 1e-12,
        });
        checks.push(super::ElemCheck {
            op: "grad norm".into(),
            case: case.clone(),
            max_err: (fused - candle).abs() / candle.abs().max(f64::MIN_POSITIVE),
            tol: 2e-6,
        });
        checks.push(super::ElemCheck {
            op: "grad norm rerun".into(),
            case,
            max_err: if fused.to_bits() == again.to_bits() {
                0.0
            } else {
                f64::INFINITY
            },
            tol: 0.0,
        });
    }
    for bad in [f32::NAN, f32::INFINITY] {
        let a = super::uniform_tensor(&[1000], 1.0, 3, DType::F32, dev)?;
        let v: Vec<f32> = (0..4096)
            .map(|i| if i == 4000 { bad } else { 0.5 })
            .collect();
        let b = Tensor::from_vec(v, 4096, &candle_core::Device::Cpu)?.to_device(dev)?;
        let n = sum_sq_fused(&[&a, &b])?.sqrt();
        checks.push(super::ElemCheck {
            op: "grad norm non-finite".into(),
            case: format!("one {bad} element"),
            max_err: if n.is_finite() { f64::INFINITY } else { 0.0 },
            tol: 0.0,
        });
    }
    Ok(checks)
}

/// The global gradient norm over the full AF2 parameter set (4915 tensors): fused vs candle ops
/// (median ms including the host copy of the result), and their relative difference.
pub fn bench_rows(dev: &candle_core::Device, iters: usize) -> Result<Vec<super::ElemBenchRow>> {
    let shapes = super::adam::af2_param_shapes(dev)?;
    let n: usize = shapes.iter().map(|s| s.iter().product::<usize>()).sum();
    let mut rows = Vec::new();
    for dt in [DType::F32, DType::BF16] {
        let ts: Vec<Tensor> = shapes
            .iter()
            .enumerate()
            .map(|(i, s)| super::uniform_tensor(s, 1.0, 0x6e0 ^ (i as u64) << 16, dt, dev))
            .collect::<Result<_>>()?;
        let refs: Vec<&Tensor> = ts.iter().collect();
        let mut fused = 0.0;
        let fused_ms = super::median_ms(dev, 2, iters, || {
            fused = sum_sq_fused(&refs)?.sqrt();
            Ok(())
        })?;
        let mut candle = 0.0;
        let twin_ms = super::median_ms(dev, 1, iters.min(3), || {
            candle = sum_sq_candle(&refs)?.sqrt();
            Ok(())
        })?;
        rows.push(super::ElemBenchRow {
            op: "grad norm".into(),
            case: format!(
                "{} tensors, {:.1}M {}",
                shapes.len(),
                n as f64 / 1e6,
                if dt == DType::F32 { "f32" } else { "bf16" }
            ),
            fused_ms,
            twin_ms,
            max_err: (fused - candle).abs() / candle.abs().max(f64::MIN_POSITIVE),
        });
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_cover_all_elements() {
        let (offs, blocks) = offsets_and_blocks(&[3, 0, CHUNK, 1]);
        assert_eq!(offs, vec![0, 3, 3, 3 + CHUNK as u64, 4 + CHUNK as u64]);
        assert_eq!(blocks, 2);
        let (offs, blocks) = offsets_and_blocks(&[CHUNK, CHUNK]);
        assert_eq!(offs.last(), Some(&(2 * CHUNK as u64)));
        assert_eq!(blocks, 2);
        assert_eq!(offsets_and_blocks(&[]).1, 1);
    }

    /// On the CPU nothing is fused: the split hands every tensor to the candle path, whose sum
    /// is the exact f64 sum of the squares here.
    #[test]
    fn cpu_split_keeps_candle_path() {
        let dev = candle_core::Device::Cpu;
        let a = Tensor::new(&[3.0f32, 0.0], &dev).unwrap();
        let b = Tensor::new(&[0.0f32, 4.0], &dev).unwrap();
        let (f, rest) = fused_sum_sq(&[&a, &b]).unwrap();
        assert_eq!(f, 0.0);
        assert_eq!(rest.len(), 2);
        assert!(fused_selection(&[&a, &b]).is_empty());
        assert!(!eligible(&a));
        assert_eq!(sum_sq_candle(&rest).unwrap(), 25.0);
        assert_eq!(sum_sq_candle(&[]).unwrap(), 0.0);
        assert!(sum_sq_fused(&[&a]).is_err());
        assert_eq!(sum_sq_fused(&[]).unwrap(), 0.0);
    }
}
