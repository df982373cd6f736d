//! Fused CUDA kernels (NVRTC, behind the `cuda` feature) and their plain-candle twins.
//!
//! Every kernel is CUDA C source held in a Rust string, compiled at run time by NVRTC the first
//! time a process needs it ([`nvrtc`]), loaded into candle's CUDA device as a custom module and
//! launched on candle's stream from a candle `CustomOp`. [`SOURCES`] lists every module so one
//! test can compile them all (NVRTC needs no GPU).
//!
//! [`set_fused`] (or the environment variable `FERROFOLD_FUSED_KERNELS=0`) switches the model back
//! to the composite candle twins, for benchmarks and A/B checks.
//!
//! Element-wise kernels (this file's `gate`, `dropout_residual`, `adam`, `bias_act`, `tri_gate`
//! modules): each public entry point dispatches to the fused kernel on a CUDA device when
//! [`fused_enabled`] and to its plain-candle twin (`*_twin`) everywhere else, so CPU results never
//! change. `bias_act` (bias + relu / row-scale epilogues, relu backward) and `tri_gate`
//! (triangle-multiplication gating, tiled transposes) serve the hand-written backward path and
//! can be switched off alone with `FERROFOLD_FUSED_EPILOGUES=0` ([`epilogues_enabled`]).

/// CUDA C prelude of the element-wise kernels (a literal, for `concat!`): fp32 load/store of
/// f32 and bf16 elements.
#[cfg(feature = "cuda")]
macro_rules! elem_prelude {
    () => {
        r#"
#include <cuda_bf16.h>
__device__ __forceinline__ float ld(const float* p, size_t i) { return p[i]; }
__device__ __forceinline__ float ld(const __nv_bfloat16* p, size_t i) { return __bfloat162float(p[i]); }
__device__ __forceinline__ void st(float* p, size_t i, float v) { p[i] = v; }
__device__ __forceinline__ void st(__nv_bfloat16* p, size_t i, float v) { p[i] = __float2bfloat16_rn(v); }
// V consecutive elements, loaded/stored as one 8- or 16-byte access (the address must be aligned).
template <typename T, int V> struct alignas(sizeof(T) * V) Pack { T v[V]; };
"#
    };
}

pub mod adam;
pub mod add;
pub mod batch_col_scale;
pub mod bias_act;
pub mod check;
pub mod dropout_residual;
pub mod gate;
pub mod grad_norm;
#[cfg(feature = "cuda")]
pub(crate) mod launch;
pub mod layer_norm;
#[cfg(feature = "cuda")]
pub mod nvrtc;
pub mod permute;
pub mod pool;
pub mod row_attention;
pub mod softmax;
pub mod tri_gate;
pub mod wgrad;

use std::sync::atomic::{AtomicU8, Ordering};

/// `(module name, CUDA C source)` of every NVRTC module, for the compile-all test and `bench`.
#[cfg(feature = "cuda")]
pub const SOURCES: &[(&str, &str)] = &[
    (layer_norm::MODULE, layer_norm::SRC),
    (softmax::MODULE, softmax::SRC),
    (gate::MODULE, gate::SOURCE),
    (dropout_residual::MODULE, dropout_residual::SOURCE),
    (adam::MODULE, adam::SOURCE),
    (grad_norm::MODULE, grad_norm::SOURCE),
    (bias_act::MODULE, bias_act::SOURCE),
    (tri_gate::MODULE, tri_gate::SOURCE),
    (row_attention::MODULE, row_attention::SOURCE),
    (batch_col_scale::MODULE, batch_col_scale::SOURCE),
    (permute::MODULE, permute::SOURCE),
    (add::MODULE, add::SOURCE),
];

/// Process-wide switch: 0 = not decided yet (read `FERROFOLD_FUSED_KERNELS`), 1 = on, 2 = off.
static FUSED: AtomicU8 = AtomicU8::new(0);

/// Force the fused kernels on or off for the whole process (off: every op runs its plain-candle
/// twin). Overrides `FERROFOLD_FUSED_KERNELS`.
pub fn set_fused(on: bool) {
    FUSED.store(if on { 1 } else { 2 }, Ordering::Relaxed);
}

/// Whether fused kernels may be used (they still run only on CUDA devices). Default on;
/// `FERROFOLD_FUSED_KERNELS=0` (or `false`/`off`) turns them off unless [`set_fused`] was called.
pub fn fused_enabled() -> bool {
    match FUSED.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let on = !matches!(
                std::env::var("FERROFOLD_FUSED_KERNELS").as_deref(),
                Ok("0") | Ok("false") | Ok("off")
            );
            // A concurrent `set_fused` wins over the environment.
            let _ = FUSED.compare_exchange(
                0,
                if on { 1 } else { 2 },
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            FUSED.load(Ordering::Relaxed) == 1
        }
    }
}

/// True when the fused element-wise kernels apply to `t`: CUDA build, CUDA tensor, f32 or bf16,
/// and [`fused_enabled`].
pub(crate) fn fused_for(t: &candle_core::Tensor) -> bool {
    cfg!(feature = "cuda")
        && t.device().is_cuda()
        && matches!(
            t.dtype(),
            candle_core::DType::F32 | candle_core::DType::BF16
        )
        && fused_enabled()
}

/// Whether the fused epilogue kernels of [`bias_act`] and [`tri_gate`] may be used (on top of
/// [`fused_for`]). Default on; `FERROFOLD_FUSED_EPILOGUES=0` (or `false`/`off`) turns only these
/// off, for A/B timings against candle's broadcast ops with every other fused kernel on.
pub fn epilogues_enabled() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        !matches!(
            std::env::var("FERROFOLD_FUSED_EPILOGUES").as_deref(),
            Ok("0") | Ok("false") | Ok("off")
        )
    })
}

/// One fused-vs-twin comparison of a `self_check`.
#[derive(Debug, Clone, PartialEq)]
pub struct ElemCheck {
    /// Op and pass, e.g. `gate fwd`, `gate bwd d_o`.
    pub op: String,
    /// Shape and dtype.
    pub case: String,
    /// `max |fused - twin| / max |twin|` (0 when both are zero).
    pub max_err: f64,
    /// Largest `max_err` accepted.
    pub tol: f64,
}

impl ElemCheck {
    /// Within tolerance (false for NaN).
    pub fn ok(&self) -> bool {
        self.max_err <= self.tol
    }
}

/// One fused-vs-twin timing of a `bench_rows`.
#[derive(Debug, Clone, PartialEq)]
pub struct ElemBenchRow {
    pub op: String,
    pub case: String,
    /// Median wall time of the fused op (ms, device-synchronised).
    pub fused_ms: f64,
    /// Median wall time of the plain-candle twin (ms).
    pub twin_ms: f64,
    /// `max |fused - twin| / max |twin|` of the timed outputs.
    pub max_err: f64,
}

/// `max |a - b| / max |b|` over all elements (computed in f32; 0 when both are zero).
pub fn rel_err(a: &candle_core::Tensor, b: &candle_core::Tensor) -> crate::error::Result<f64> {
    use candle_core::DType;
    let a = a.to_dtype(DType::F32)?;
    let b = b.to_dtype(DType::F32)?;
    let diff = (&a - &b)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()? as f64;
    let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()? as f64;
    if diff == 0.0 {
        return Ok(0.0);
    }
    Ok(diff / scale.max(f64::MIN_POSITIVE))
}

/// Median wall time (ms) of `f` over `iters` runs after `warmup` runs, each ended by a device
/// synchronisation.
pub fn median_ms(
    dev: &candle_core::Device,
    warmup: usize,
    iters: usize,
    mut f: impl FnMut() -> crate::error::Result<()>,
) -> crate::error::Result<f64> {
    for _ in 0..warmup {
        f()?;
    }
    dev.synchronize()?;
    let mut t = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let t0 = std::time::Instant::now();
        f()?;
        dev.synchronize()?;
        t.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    t.sort_by(|a, b| a.total_cmp(b));
    Ok(t[t.len() / 2])
}

/// [`median_ms`] of `reps` back-to-back runs of `f` per sample, divided by `reps`: the time of
/// one run without the launch-to-synchronise latency dominating short kernels.
pub fn median_ms_per_rep(
    dev: &candle_core::Device,
    iters: usize,
    reps: usize,
    mut f: impl FnMut() -> crate::error::Result<()>,
) -> crate::error::Result<f64> {
    let reps = reps.max(1);
    let ms = median_ms(dev, 2, iters, || {
        for _ in 0..reps {
            f()?;
        }
        Ok(())
    })?;
    Ok(ms / reps as f64)
}

/// Deterministic uniform values in `[-scale, scale)` as a `dtype` tensor on `dev` (generated on the
/// CPU: every device sees the same values).
pub fn uniform_tensor(
    shape: &[usize],
    scale: f32,
    seed: u64,
    dtype: candle_core::DType,
    dev: &candle_core::Device,
) -> crate::error::Result<candle_core::Tensor> {
    let n: usize = shape.iter().product();
    let mut st = seed;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            let u = (crate::data::rng::splitmix64(&mut st) >> 40) as f32 / (1u64 << 24) as f32;
            (u * 2.0 - 1.0) * scale
        })
        .collect();
    Ok(
        candle_core::Tensor::from_vec(v, shape, &candle_core::Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(dev)?,
    )
}
