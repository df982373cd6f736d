//! Run-time compilation (NVRTC) and loading of ferrofold's CUDA kernels.
//!
//! A module's PTX is compiled once per process and kept; candle's device then keeps the loaded
//! module per device, so a launch after the first costs a map lookup.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use candle_core::cuda_backend::CudaDevice;
use cudarc::driver::CudaFunction;
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};

use crate::error::{Error, Result};

/// Compute capability targeted by NVRTC (Hopper: H100/H200). `FERROFOLD_NVRTC_ARCH` overrides it
/// (e.g. `compute_80`).
const DEFAULT_ARCH: &str = "compute_90";

fn arch() -> &'static str {
    static ARCH: OnceLock<&'static str> = OnceLock::new();
    ARCH.get_or_init(|| match std::env::var("FERROFOLD_NVRTC_ARCH") {
        Ok(a) if !a.is_empty() => Box::leak(a.into_boxed_str()),
        _ => DEFAULT_ARCH,
    })
}

/// Include directories for `cuda_bf16.h` etc.: `$CUDA_HOME/include`, `$CUDA_PATH/include`, then
/// `/usr/local/cuda/include`, those that exist.
fn include_paths() -> Vec<String> {
    let mut out = Vec::new();
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Ok(root) = std::env::var(var) {
            let p = std::path::Path::new(&root).join("include");
            if p.is_dir() {
                out.push(p.to_string_lossy().into_owned());
            }
        }
    }
    let sys = "/usr/local/cuda/include";
    if std::path::Path::new(sys).is_dir() {
        out.push(sys.to_string());
    }
    out.dedup();
    out
}

/// Compile `src` to PTX (cached per module name for the life of the process).
pub fn ptx(module: &str, src: &str) -> Result<String> {
    static CACHE: OnceLock<Mutex<HashMap<String, String>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(p) = cache
        .lock()
        .map_err(|_| Error::Msg("nvrtc cache poisoned".into()))?
        .get(module)
    {
        return Ok(p.clone());
    }
    let opts = CompileOptions {
        arch: Some(arch()),
        include_paths: include_paths(),
        name: Some(format!("{module}.cu")),
        ..Default::default()
    };
    let compiled = compile_ptx_with_opts(src, opts)
        .map_err(|e| Error::Msg(format!("NVRTC compile of kernel module `{module}`: {e}")))?
        .to_src();
    cache
        .lock()
        .map_err(|_| Error::Msg("nvrtc cache poisoned".into()))?
        .insert(module.to_string(), compiled.clone());
    Ok(compiled)
}

/// The kernel `func` of module `module` (CUDA C `src`) on `dev`, compiled and loaded on first use
/// and cached per (device, module, kernel): a launch after the first costs one map lookup.
/// Launch it on candle's stream: `dev.cuda_stream().launch_builder(&f)`.
pub fn func(dev: &CudaDevice, module: &str, src: &str, func: &str) -> Result<CudaFunction> {
    type Key = (candle_core::cuda_backend::DeviceId, String, String);
    static FUNCS: OnceLock<Mutex<HashMap<Key, CudaFunction>>> = OnceLock::new();
    let funcs = FUNCS.get_or_init(|| Mutex::new(HashMap::new()));
    let key = (dev.id(), module.to_string(), func.to_string());
    if let Some(f) = funcs
        .lock()
        .map_err(|_| Error::Msg("nvrtc function cache poisoned".into()))?
        .get(&key)
    {
        return Ok(f.clone());
    }
    let p = ptx(module, src)?;
    let f = dev
        .get_or_load_custom_func(func, module, &p)?
        .into_cuda_function();
    funcs
        .lock()
        .map_err(|_| Error::Msg("nvrtc function cache poisoned".into()))?
        .insert(key, f.clone());
    Ok(f)
}

/// Launch configuration for a 1-D grid of `n` threads in blocks of `block`.
pub fn grid_1d(n: usize, block: u32) -> cudarc::driver::LaunchConfig {
    let blocks = n.div_ceil(block as usize).max(1) as u32;
    cudarc::driver::LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (block, 1, 1),
        shared_mem_bytes: 0,
    }
}

#[cfg(test)]
mod tests {
    /// Every module compiles with NVRTC (no GPU needed; needs libnvrtc on the loader path and
    /// the CUDA headers, i.e. `source ../shared/gpu/env.sh` plus `LD_LIBRARY_PATH=$CUDA_HOME/lib`).
    /// Skips with a message when libnvrtc cannot be loaded.
    #[test]
    fn all_kernel_modules_compile() {
        if std::env::var("FERROFOLD_SKIP_NVRTC").is_ok() {
            eprintln!("skipped: FERROFOLD_SKIP_NVRTC set");
            return;
        }
        for (name, src) in super::super::SOURCES {
            if let Err(e) = super::ptx(name, src) {
                panic!("{e}");
            }
        }
    }
}
