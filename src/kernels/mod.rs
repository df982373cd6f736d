//! Fused CUDA kernels (NVRTC, behind the `cuda` feature) and their plain-candle twins.
//!
//! Every kernel is CUDA C source held in a Rust string, compiled at run time by NVRTC the first
//! time a process needs it ([`nvrtc`]), loaded into candle's CUDA device as a custom module and
//! launched on candle's stream from a candle `CustomOp`. [`SOURCES`] lists every module so one
//! test can compile them all (NVRTC needs no GPU).
//!
//! [`set_fused`] (or the environment variable `FERROFOLD_FUSED_KERNELS=0`) switches the model back
//! to the composite candle twins, for benchmarks and A/B checks.

pub mod check;
#[cfg(feature = "cuda")]
pub(crate) mod launch;
pub mod layer_norm;
#[cfg(feature = "cuda")]
pub mod nvrtc;
pub mod pool;
pub mod softmax;

use std::sync::atomic::{AtomicU8, Ordering};

/// `(module name, CUDA C source)` of every NVRTC module, for the compile-all test and `bench`.
#[cfg(feature = "cuda")]
pub const SOURCES: &[(&str, &str)] = &[
    (layer_norm::MODULE, layer_norm::SRC),
    (softmax::MODULE, softmax::SRC),
];

/// 0: not yet read from the environment, 1: fused kernels on, 2: off (composite twins).
static FUSED: AtomicU8 = AtomicU8::new(0);

/// Use the fused kernels where they apply (`true`, the default) or force the composite twins.
pub fn set_fused(on: bool) {
    FUSED.store(if on { 1 } else { 2 }, Ordering::Relaxed);
}

/// Whether the fused kernels are on: [`set_fused`] if called, else `FERROFOLD_FUSED_KERNELS`
/// (`0`/`false`/`off` turn them off), else on.
pub fn fused_enabled() -> bool {
    match FUSED.load(Ordering::Relaxed) {
        1 => true,
        2 => false,
        _ => {
            let on = !matches!(
                std::env::var("FERROFOLD_FUSED_KERNELS").as_deref(),
                Ok("0") | Ok("false") | Ok("off")
            );
            // Only the first reader initialises; a concurrent `set_fused` wins.
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
