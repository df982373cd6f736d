//! Residual add of a shared-mask dropout: `y = residual + update * mask` (AF2 supplement
//! Algorithm 6, every `x += Dropout{rowwise,columnwise}(f(x))` line of the Evoformer).
//!
//! The mask is the keep mask of [`crate::model::dropout::dropout_mask`]: `x`'s shape with the
//! shared dimension set to 1, entry `k` (row-major) is `0` when the `k`-th SplitMix64 draw of the
//! [`DropoutCtx`] seed, as a 53-bit uniform `u`, is `< rate`, else `1/(1-rate)` rounded to `x`'s
//! dtype. SplitMix64 is counter-based (draw `k` = `mix(seed + (k+1)·γ)`), so the fused kernel
//! computes each entry on the GPU from `(seed, k)`: bitwise the same mask as the host RNG
//! (`u < rate` ⇔ `u·2⁵³ < ⌈rate·2⁵³⌉`, an integer compare), with no host loop, no upload and no
//! full-size mask. Each thread draws `V` consecutive mask entries once and applies them to a few
//! rows along the shared dimension.
//!
//! Fused on CUDA (f32/bf16, fp32 math): forward one kernel; backward one kernel
//! `d_update = dy * mask` (`d_residual = dy` is passed through). In f32 the forward is bitwise
//! equal to the CPU and GPU twins (`__fmul_rn` then `__fadd_rn`, as candle's two kernels); in
//! bf16 the fused result is rounded once instead of twice, and the mask scale is the host's
//! `bf16::from_f64` (the CPU twin's cast).
//!
//! Not fused: the bias add of the `linear_o`/`linear_z` producing the update (it stays in the
//! linear layer).

use candle_core::{DType, Device, Tensor};

#[cfg(feature = "cuda")]
use super::permute::Contig;
use super::{ElemBenchRow, ElemCheck};
use crate::error::Result;
use crate::model::dropout::{dropout_shared, DropoutCtx};

/// NVRTC module name.
pub const MODULE: &str = "ferrofold_dropout_residual";

/// Rows (along the shared dimension) handled by one thread.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const ROWS: usize = 4;

/// CUDA C source: `dropres_{f32,bf16}_v{1,4|8}`. `x` is viewed as `[outer, shared, inner]`, the
/// mask as `[outer, inner]` (index `k`); a thread takes `V` consecutive mask entries (`V` divides
/// `inner`) and `ROWS` rows `s`: elements `(o·shared + s)·inner + in`. `add = 1`:
/// `y = a + u·mask` (forward); `add = 0`: `y = u·mask` (backward, `u = dy`).
#[cfg(feature = "cuda")]
pub const SOURCE: &str = concat!(
    elem_prelude!(),
    r#"
__device__ __forceinline__ unsigned long long splitmix(unsigned long long seed, unsigned long long k) {
    unsigned long long z = seed + (k + 1ull) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

template <typename T, int V>
__device__ __forceinline__ void dropres(const T* a, const T* u, T* y, size_t n_groups, size_t shared, size_t inner,
                                        size_t rows, unsigned long long seed, unsigned long long thr, float scale, int add) {
    size_t grp = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (grp >= n_groups) return;
    size_t k0 = grp * V;
    size_t o = k0 / inner, in = k0 % inner;
    float m[V];
#pragma unroll
    for (int j = 0; j < V; j++) m[j] = (splitmix(seed, k0 + j) >> 11) >= thr ? scale : 0.0f;
    size_t s0 = (size_t)blockIdx.y * rows;
    size_t s1 = s0 + rows < shared ? s0 + rows : shared;
    for (size_t s = s0; s < s1; s++) {
        size_t i = (o * shared + s) * inner + in;
        Pack<T, V> uv = *reinterpret_cast<const Pack<T, V>*>(u + i);
        Pack<T, V> out;
        if (add) {
            Pack<T, V> av = *reinterpret_cast<const Pack<T, V>*>(a + i);
#pragma unroll
            for (int j = 0; j < V; j++) st(out.v, j, __fadd_rn(ld(av.v, j), __fmul_rn(ld(uv.v, j), m[j])));
        } else {
#pragma unroll
            for (int j = 0; j < V; j++) st(out.v, j, __fmul_rn(ld(uv.v, j), m[j]));
        }
        *reinterpret_cast<Pack<T, V>*>(y + i) = out;
    }
}

#define DROPRES(NAME, T, V) \
extern "C" __global__ void NAME(const T* a, const T* u, T* y, size_t n_groups, size_t shared, size_t inner, \
                                size_t rows, unsigned long long seed, unsigned long long thr, float scale, int add) { \
    dropres<T, V>(a, u, y, n_groups, shared, inner, rows, seed, thr, scale, add); \
}
DROPRES(dropres_f32_v1, float, 1)
DROPRES(dropres_f32_v4, float, 4)
DROPRES(dropres_bf16_v1, __nv_bfloat16, 1)
DROPRES(dropres_bf16_v8, __nv_bfloat16, 8)
"#
);

/// Host mirror of the kernel's keep decision for mask entry `k` (tests the equivalence with
/// [`crate::model::dropout::dropout_mask`]).
pub fn keep_entry(seed: u64, k: u64, thr: u64) -> bool {
    let state = seed.wrapping_add(k.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    (crate::train::seed::splitmix64(state) >> 11) >= thr
}

/// `⌈rate·2⁵³⌉`: a 53-bit draw `d` is dropped iff `d < thr` (iff `d·2⁻⁵³ < rate`).
pub fn drop_threshold(rate: f64) -> u64 {
    (rate * (1u64 << 53) as f64).ceil() as u64
}

/// The kept mask value `1/(1-rate)` rounded to `dtype` (as the CPU twin casts it), as f32.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn mask_scale(rate: f64, dtype: DType) -> f32 {
    let s = 1.0 / (1.0 - rate);
    if dtype == DType::BF16 {
        half::bf16::from_f64(s).to_f32()
    } else {
        s as f32
    }
}

/// Plain-candle twin: `residual + dropout_shared(update, rate, shared_dim, ctx)`.
pub fn residual_dropout_twin(
    residual: &Tensor,
    update: &Tensor,
    rate: f64,
    shared_dim: usize,
    ctx: Option<&DropoutCtx>,
) -> Result<Tensor> {
    Ok((residual + dropout_shared(update, rate, shared_dim, ctx)?)?)
}

/// `residual + dropout_shared(update, rate, shared_dim, ctx)`: one fused kernel on CUDA in
/// training mode (f32/bf16, same shape and dtype, fused kernels enabled), the twin otherwise
/// (eval mode is a plain add).
pub fn residual_dropout(
    residual: &Tensor,
    update: &Tensor,
    rate: f64,
    shared_dim: usize,
    ctx: Option<&DropoutCtx>,
) -> Result<Tensor> {
    if let Some(ctx) = ctx {
        // (Not in CUDA-graph mode: the mask seed is a launch argument, which a graph would
        // freeze; the twin takes its mask from the graph's refilled pool instead.)
        if rate > 0.0
            && !crate::model::dropout_pool::pool_active()
            && super::fused_for(update)
            && residual.shape() == update.shape()
            && residual.dtype() == update.dtype()
            && update.elem_count() > 0
            && residual.device().same_device(update.device())
        {
            return residual_dropout_fused(residual, update, rate, shared_dim, ctx);
        }
    }
    if ctx.is_none() || rate <= 0.0 {
        // Eval mode (no dropout): a plain add, by the fast add kernel where it applies
        // (bitwise candle's add; candle's add for graphs, broadcasts and the CPU).
        return super::add::add(residual, update);
    }
    residual_dropout_twin(residual, update, rate, shared_dim, ctx)
}

/// The update's gradient of [`residual_dropout`] for hand-written backward passes:
/// `dropout_shared(dy, rate, shared_dim, ctx)` (the residual's gradient is `dy` itself). One
/// kernel on CUDA when [`residual_dropout`] would use the fused kernel (same mask); the twin's
/// mask product otherwise; `dy` unchanged in eval mode.
pub fn dropout_grad(
    dy: &Tensor,
    rate: f64,
    shared_dim: usize,
    ctx: Option<&DropoutCtx>,
) -> Result<Tensor> {
    let Some(ctx) = ctx else {
        return Ok(dy.clone());
    };
    if rate <= 0.0 {
        return Ok(dy.clone());
    }
    #[cfg(feature = "cuda")]
    if !crate::model::dropout_pool::pool_active() && super::fused_for(dy) && dy.elem_count() > 0 {
        let op = cuda::DropResOp {
            seed: ctx.seed,
            thr: drop_threshold(rate),
            scale: mask_scale(rate, dy.dtype()),
            shared_dim,
        };
        let dy = dy.detach().contig()?;
        return Ok(match dy.dtype() {
            DType::F32 => op.bwd_t::<f32>(&dy)?,
            _ => op.bwd_t::<half::bf16>(&dy)?,
        });
    }
    crate::model::dropout::dropout_shared(&dy.detach(), rate, shared_dim, Some(ctx))
}

/// The fused op, unconditionally (CUDA tensors only; errors without the `cuda` feature):
/// `residual + dropout_shared(update, rate, shared_dim, Some(ctx))`, the mask drawn on the GPU.
pub fn residual_dropout_fused(
    residual: &Tensor,
    update: &Tensor,
    rate: f64,
    shared_dim: usize,
    ctx: &DropoutCtx,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    {
        let op = cuda::DropResOp {
            seed: ctx.seed,
            thr: drop_threshold(rate),
            scale: mask_scale(rate, update.dtype()),
            shared_dim,
        };
        Ok(residual.contig()?.apply_op2(&update.contig()?, op)?)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (residual, update, rate, shared_dim, ctx);
        Err(crate::error::Error::Msg(
            "the fused residual-dropout kernel needs the `cuda` feature".into(),
        ))
    }
}

/// `(outer, shared, inner)` of `dims` around `shared_dim`; no sharing (`(1, 1, n)`) when
/// `shared_dim` is past the last axis.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn mask_geometry(dims: &[usize], shared_dim: usize) -> (usize, usize, usize) {
    if shared_dim >= dims.len() {
        return (1, 1, dims.iter().product());
    }
    let outer: usize = dims[..shared_dim].iter().product();
    let inner: usize = dims[shared_dim + 1..].iter().product();
    (outer, dims[shared_dim], inner)
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::backend::BackendStorage;
    use candle_core::cuda_backend::{CudaDType, CudaStorage, WrapErr};
    use candle_core::{DType, Layout, Shape, Tensor};
    use cudarc::driver::{CudaView, DeviceRepr, LaunchConfig, PushKernelArg};

    use super::super::launch::{cuda_storage, func, range, suffix, tensor_from_slice, BLOCK};
    use super::{mask_geometry, MODULE, ROWS, SOURCE};
    use crate::kernels::permute::Contig;

    /// `residual + update * mask(seed, rate)` with the mask shared along `shared_dim`.
    pub(super) struct DropResOp {
        pub(super) seed: u64,
        pub(super) thr: u64,
        pub(super) scale: f32,
        pub(super) shared_dim: usize,
    }

    impl DropResOp {
        /// `y = a + u·mask` (`add`) or `y = u·mask`, all of `dims`, contiguous views.
        fn launch<T: CudaDType + DeviceRepr + candle_core::WithDType>(
            &self,
            dev: &candle_core::cuda_backend::CudaDevice,
            dims: &[usize],
            a: &CudaView<T>,
            u: &CudaView<T>,
            starts: [usize; 2],
            add: bool,
        ) -> candle_core::Result<cudarc::driver::CudaSlice<T>> {
            let n: usize = dims.iter().product();
            let (outer, shared, inner) = mask_geometry(dims, self.shared_dim);
            let dtype = T::DTYPE;
            let wide = if dtype == DType::BF16 { 8 } else { 4 };
            let v = if inner.is_multiple_of(wide) && starts.iter().all(|s| s.is_multiple_of(wide)) {
                wide
            } else {
                1
            };
            let name = format!("dropres_{}_v{v}", suffix(dtype)?);
            let f = func(dev, MODULE, SOURCE, &name)?;
            // SAFETY: every element is written by the kernel.
            let mut y = unsafe { dev.alloc::<T>(n)? };
            let n_groups = outer * inner / v;
            let gx = u32::try_from(n_groups.div_ceil(BLOCK as usize).max(1))
                .map_err(|_| candle_core::Error::Msg("dropout residual: grid too large".into()))?;
            let gy = u32::try_from(shared.div_ceil(ROWS).max(1))
                .map_err(|_| candle_core::Error::Msg("dropout residual: grid too large".into()))?;
            let cfg = LaunchConfig {
                grid_dim: (gx, gy, 1),
                block_dim: (BLOCK, 1, 1),
                shared_mem_bytes: 0,
            };
            let add = i32::from(add);
            let rows = ROWS;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(a)
                .arg(u)
                .arg(&mut y)
                .arg(&n_groups)
                .arg(&shared)
                .arg(&inner)
                .arg(&rows)
                .arg(&self.seed)
                .arg(&self.thr)
                .arg(&self.scale)
                .arg(&add);
            // SAFETY: argument types match the kernel; `a`, `u`, `y` hold `n = outer·shared·inner`
            // elements; with `V > 1` every start offset and `inner` are multiples of `V`, so each
            // `Pack` access is aligned (allocations are 256-byte aligned).
            unsafe { b.launch(cfg) }.w()?;
            Ok(y)
        }

        fn fwd_t<T: CudaDType + DeviceRepr + candle_core::WithDType>(
            &self,
            s1: &CudaStorage,
            l1: &Layout,
            s2: &CudaStorage,
            l2: &Layout,
        ) -> candle_core::Result<CudaStorage> {
            let dev = s1.device();
            let (r1, r2) = (range(l1)?, range(l2)?);
            let starts = [r1.start, r2.start];
            let a = s1.as_cuda_slice::<T>()?.slice(r1);
            let u = s2.as_cuda_slice::<T>()?.slice(r2);
            let y = self.launch(dev, l1.shape().dims(), &a, &u, starts, true)?;
            Ok(CudaStorage::wrap_cuda_slice(y, dev.clone()))
        }

        pub(super) fn bwd_t<T: CudaDType + DeviceRepr + candle_core::WithDType>(
            &self,
            dy: &Tensor,
        ) -> candle_core::Result<Tensor> {
            let (sd, ld) = dy.storage_and_layout();
            let sd = cuda_storage(&sd)?;
            let dev = sd.device();
            let r = range(ld)?;
            let starts = [r.start, r.start];
            let dv = sd.as_cuda_slice::<T>()?.slice(r);
            let du = self.launch(dev, dy.dims(), &dv, &dv, starts, false)?;
            Ok(tensor_from_slice(du, dev, dy.shape()))
        }
    }

    impl candle_core::CustomOp2 for DropResOp {
        fn name(&self) -> &'static str {
            "ferrofold-dropout-residual"
        }

        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &Layout,
            _: &candle_core::CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
            candle_core::bail!("ferrofold-dropout-residual: CUDA only")
        }

        fn cuda_fwd(
            &self,
            s1: &CudaStorage,
            l1: &Layout,
            s2: &CudaStorage,
            l2: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            if l1.shape() != l2.shape() || s1.dtype() != s2.dtype() {
                candle_core::bail!("ferrofold-dropout-residual: operands differ in shape or dtype");
            }
            let out = match s1.dtype() {
                DType::F32 => self.fwd_t::<f32>(s1, l1, s2, l2)?,
                DType::BF16 => self.fwd_t::<half::bf16>(s1, l1, s2, l2)?,
                other => candle_core::bail!("ferrofold-dropout-residual: dtype {other:?}"),
            };
            Ok((out, l1.shape().clone()))
        }

        fn bwd(
            &self,
            residual: &Tensor,
            _update: &Tensor,
            _res: &Tensor,
            dy: &Tensor,
        ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
            let dy = dy.to_dtype(residual.dtype())?.contig()?;
            let du = match dy.dtype() {
                DType::F32 => self.bwd_t::<f32>(&dy)?,
                DType::BF16 => self.bwd_t::<half::bf16>(&dy)?,
                other => candle_core::bail!("ferrofold-dropout-residual: dtype {other:?}"),
            };
            Ok((Some(dy), Some(du)))
        }
    }
}

type ResDropFn = fn(&Tensor, &Tensor, f64, usize, Option<&DropoutCtx>) -> Result<Tensor>;

/// The fused op (what [`residual_dropout`] does on CUDA in training), unconditionally.
fn fused_with_ctx(
    residual: &Tensor,
    update: &Tensor,
    rate: f64,
    shared_dim: usize,
    ctx: Option<&DropoutCtx>,
) -> Result<Tensor> {
    let ctx = ctx.ok_or_else(|| crate::error::Error::Msg("residual dropout: no ctx".into()))?;
    residual_dropout_fused(residual, update, rate, shared_dim, ctx)
}

/// Output and the gradients of `sum(op(...) * dy)` for residual and update.
fn fwd_bwd(
    op: ResDropFn,
    r: &Tensor,
    u: &Tensor,
    dy: &Tensor,
    rate: f64,
    shared_dim: usize,
    ctx: &DropoutCtx,
) -> Result<(Tensor, Tensor, Tensor)> {
    let rv = candle_core::Var::from_tensor(r)?;
    let uv = candle_core::Var::from_tensor(u)?;
    let y = op(rv.as_tensor(), uv.as_tensor(), rate, shared_dim, Some(ctx))?;
    let grads = (&y * dy)?.sum_all()?.backward()?;
    let missing = || crate::error::Error::Msg("residual dropout: no gradient".into());
    let dr = grads.get(rv.as_tensor()).ok_or_else(missing)?.clone();
    let du = grads.get(uv.as_tensor()).ok_or_else(missing)?.clone();
    Ok((y.detach(), dr, du))
}

/// `(shape, rate, shared_dim)` cases of [`self_check`]; the last ones are AF2's MSA
/// (`[S, R, c_m]`, row-wise 0.15) and pair (`[R, R, c_z]`, row-/column-wise 0.25) sites.
pub const CHECK_CASES: &[(&[usize], f64, usize)] = &[
    (&[4, 5, 6], 0.25, 0),
    (&[4, 5, 6], 0.25, 1),
    (&[3, 17, 33], 0.5, 0),
    (&[2, 6, 16], 0.25, 1),
    (&[5, 3, 8], 0.5, 3),
    (&[128, 256, 256], 0.15, 0),
    (&[256, 256, 128], 0.25, 0),
    (&[256, 256, 128], 0.25, 1),
];

fn case(shape: &[usize], rate: f64, shared_dim: usize, dtype: DType) -> String {
    format!("{shape:?} p={rate} shared={shared_dim} {dtype:?}")
}

/// Fused vs twin (forward, `d_residual`, `d_update`) for [`CHECK_CASES`] in f32 and bf16 on `dev`
/// (CUDA). The tolerance is 0 in f32 (bitwise).
pub fn self_check(dev: &Device) -> Result<Vec<ElemCheck>> {
    let mut out = Vec::new();
    for (k, &(shape, rate, sd)) in CHECK_CASES.iter().enumerate() {
        for dtype in [DType::F32, DType::BF16] {
            let seed = 0xd0_0000 + k as u64;
            let r = super::uniform_tensor(shape, 2.0, seed, dtype, dev)?;
            let u = super::uniform_tensor(shape, 1.0, seed ^ 1, dtype, dev)?;
            let dy = super::uniform_tensor(shape, 1.0, seed ^ 2, dtype, dev)?;
            let ctx = DropoutCtx::new(seed ^ 3);
            let (yf, drf, duf) = fwd_bwd(fused_with_ctx, &r, &u, &dy, rate, sd, &ctx)?;
            let (yt, drt, dut) = fwd_bwd(residual_dropout_twin, &r, &u, &dy, rate, sd, &ctx)?;
            let tol = if dtype == DType::BF16 { 1e-2 } else { 0.0 };
            for (what, a, b) in [
                ("dropres fwd", &yf, &yt),
                ("dropres bwd d_residual", &drf, &drt),
                ("dropres bwd d_update", &duf, &dut),
            ] {
                out.push(ElemCheck {
                    op: what.into(),
                    case: case(shape, rate, sd, dtype),
                    max_err: super::rel_err(a, b)?,
                    tol,
                });
            }
        }
    }
    Ok(out)
}

/// Fused vs twin timings at AF2 shapes: forward alone (the twin draws the mask on the host and
/// uploads it, as in training; the fused kernel draws it on the GPU) and backward alone.
pub fn bench_rows(dev: &Device, iters: usize) -> Result<Vec<ElemBenchRow>> {
    let mut rows = Vec::new();
    for &(shape, rate, sd) in &CHECK_CASES[5..] {
        for dtype in [DType::BF16, DType::F32] {
            let r = super::uniform_tensor(shape, 2.0, 1, dtype, dev)?;
            let u = super::uniform_tensor(shape, 1.0, 2, dtype, dev)?;
            let dy = super::uniform_tensor(shape, 1.0, 3, dtype, dev)?;
            let ctx = DropoutCtx::new(7);
            let c = Some(&ctx);
            let fused_ms = super::median_ms(dev, 3, iters, || {
                fused_with_ctx(&r, &u, rate, sd, c).map(|_| ())
            })?;
            let twin_ms = super::median_ms(dev, 3, iters, || {
                residual_dropout_twin(&r, &u, rate, sd, c).map(|_| ())
            })?;
            let err = super::rel_err(
                &fused_with_ctx(&r, &u, rate, sd, c)?,
                &residual_dropout_twin(&r, &u, rate, sd, c)?,
            )?;
            rows.push(ElemBenchRow {
                op: "dropout+residual fwd".into(),
                case: case(shape, rate, sd, dtype),
                fused_ms,
                twin_ms,
                max_err: err,
            });
            // Backward alone: `y.backward()` (seeded with ones) on a graph built once.
            let rv = candle_core::Var::from_tensor(&r)?;
            let uv = candle_core::Var::from_tensor(&u)?;
            let yf = fused_with_ctx(rv.as_tensor(), uv.as_tensor(), rate, sd, c)?;
            let yt = residual_dropout_twin(rv.as_tensor(), uv.as_tensor(), rate, sd, c)?;
            let fused_ms = super::median_ms(dev, 3, iters, || {
                yf.backward().map(|_| ()).map_err(Into::into)
            })?;
            let twin_ms = super::median_ms(dev, 3, iters, || {
                yt.backward().map(|_| ()).map_err(Into::into)
            })?;
            let (_, _, a) = fwd_bwd(fused_with_ctx, &r, &u, &dy, rate, sd, &ctx)?;
            let (_, _, b) = fwd_bwd(residual_dropout_twin, &r, &u, &dy, rate, sd, &ctx)?;
            rows.push(ElemBenchRow {
                op: "dropout+residual bwd".into(),
                case: case(shape, rate, sd, dtype),
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

    #[test]
    fn geometry_of_row_and_column_sharing() {
        // [4, 5, 6] as [outer, shared, inner].
        assert_eq!(mask_geometry(&[4, 5, 6], 0), (1, 4, 30));
        assert_eq!(mask_geometry(&[4, 5, 6], 1), (4, 5, 6));
        assert_eq!(mask_geometry(&[4, 5, 6], 3), (1, 1, 120));
        // The kernel's element index for mask entry (o, in) and row s reproduces the broadcast
        // of a [4, 1, 6] mask.
        let (_, shared, inner) = mask_geometry(&[4, 5, 6], 1);
        for a in 0..4 {
            for b in 0..5 {
                for c in 0..6 {
                    let k = a * inner + c;
                    let (o, i_n) = (k / inner, k % inner);
                    assert_eq!((o * shared + b) * inner + i_n, (a * 5 + b) * 6 + c);
                }
            }
        }
    }

    /// The kernel's counter-based draw (`keep_entry`, `drop_threshold`, `mask_scale`) gives
    /// exactly the mask of `dropout_mask` (the host RNG), for several rates and seeds.
    #[test]
    fn gpu_mask_rule_equals_host_rng() {
        let x = Tensor::zeros((3, 7, 11), DType::F64, &Device::Cpu).unwrap();
        for (rate, seed) in [
            (0.15, 1u64),
            (0.25, 0xdead_beef),
            (0.5, u64::MAX),
            (0.9, 42),
        ] {
            let ctx = DropoutCtx::new(seed);
            for sd in [0usize, 1, 2, 3] {
                let m = crate::model::dropout::dropout_mask(&x, rate, sd, &ctx).unwrap();
                let m = m.flatten_all().unwrap().to_vec1::<f64>().unwrap();
                let thr = drop_threshold(rate);
                let scale = 1.0 / (1.0 - rate);
                for (k, v) in m.iter().enumerate() {
                    let want = if keep_entry(seed, k as u64, thr) {
                        scale
                    } else {
                        0.0
                    };
                    assert_eq!(*v, want, "rate {rate} seed {seed} dim {sd} entry {k}");
                }
                assert!(m.contains(&0.0) && m.iter().any(|v| *v != 0.0));
            }
            assert_eq!(mask_scale(rate, DType::F32), (1.0 / (1.0 - rate)) as f32);
        }
        // Exactness at the boundary: a draw equal to rate·2⁵³ is kept (u < rate is false).
        assert_eq!(drop_threshold(0.5), 1 << 52);
    }

    /// On the CPU the entry point is the twin: the residual plus the dropped-out update, with the
    /// masks of `dropout_shared`.
    #[test]
    fn cpu_path_is_residual_plus_dropout() {
        let r = Tensor::arange(0f32, 24.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 3, 4))
            .unwrap();
        let u = Tensor::ones((2, 3, 4), DType::F32, &Device::Cpu).unwrap();
        let ctx = DropoutCtx::new(11);
        let y = residual_dropout(&r, &u, 0.5, 0, Some(&ctx)).unwrap();
        let want = (&r + dropout_shared(&u, 0.5, 0, Some(&ctx)).unwrap()).unwrap();
        let (y, want) = (
            y.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            want.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        );
        assert_eq!(y, want);
        // Eval mode: a plain add.
        let e = residual_dropout(&r, &u, 0.5, 0, None).unwrap();
        let e = e.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(e.iter().enumerate().all(|(i, v)| *v == i as f32 + 1.0));
    }
}
