//! Fused CUDA kernels (NVRTC, behind the `cuda` feature) and their plain-candle twins.
//!
//! Every kernel is CUDA C source held in a Rust string, compiled at run time by NVRTC the first
//! time a process needs it ([`nvrtc`]), loaded into candle's CUDA device as a custom module and
//! launched on candle's stream from a candle `CustomOp`. [`SOURCES`] lists every module so one
//! test can compile them all (NVRTC needs no GPU).

#[cfg(feature = "cuda")]
pub mod nvrtc;

/// `(module name, CUDA C source)` of every NVRTC module, for the compile-all test and `bench`.
#[cfg(feature = "cuda")]
pub const SOURCES: &[(&str, &str)] = &[];
