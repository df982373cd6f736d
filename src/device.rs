//! Device selection: GPU = local rank (modulo the GPUs visible) in `cuda` builds, else CPU.

use candle_core::Device;

use crate::config::DeviceKind;
use crate::error::{Error, Result};

/// Number of CUDA devices visible to this process (0 in CPU builds or without a GPU/driver).
pub fn cuda_device_count() -> usize {
    #[cfg(feature = "cuda")]
    {
        cudarc::driver::CudaContext::device_count()
            .map(|n| usize::try_from(n).unwrap_or(0))
            .unwrap_or(0)
    }
    #[cfg(not(feature = "cuda"))]
    {
        0
    }
}

/// The device this rank would use, as a short description (no allocation on the device).
pub fn describe(kind: DeviceKind, local_rank: usize) -> String {
    match plan(kind, local_rank) {
        Ok(Some(i)) => format!("cuda:{i} ({} visible)", cuda_device_count()),
        Ok(None) => "cpu".to_string(),
        Err(e) => format!("unavailable: {e}"),
    }
}

/// `Some(gpu index)` when this rank should use a GPU, `None` for CPU.
fn plan(kind: DeviceKind, local_rank: usize) -> Result<Option<usize>> {
    let n = cuda_device_count();
    match kind {
        DeviceKind::Cpu => Ok(None),
        DeviceKind::Auto if n == 0 => Ok(None),
        DeviceKind::Auto => Ok(Some(local_rank % n)),
        DeviceKind::Cuda if n == 0 => Err(Error::Msg(if cfg!(feature = "cuda") {
            "train.device = \"cuda\" but no CUDA device is visible".into()
        } else {
            "train.device = \"cuda\" but this binary was built without the `cuda` feature".into()
        })),
        DeviceKind::Cuda => Ok(Some(local_rank % n)),
    }
}

/// Create the device for this rank.
pub fn select(kind: DeviceKind, local_rank: usize) -> Result<Device> {
    match plan(kind, local_rank)? {
        None => Ok(Device::Cpu),
        Some(i) => Ok(Device::new_cuda(i)?),
    }
}

/// On a CUDA device, let the stream-ordered memory pool keep freed memory instead of returning
/// it to the driver at every synchronisation (CUDA's default release threshold is 0, so a loop
/// that synchronises each step re-maps its working set every step). No-op on the CPU or without a
/// memory pool.
pub fn keep_pool_memory(device: &Device) -> Result<()> {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(cd) = device {
        use cudarc::driver::sys;
        let stream = cd.cuda_stream();
        let ctx = stream.context();
        ctx.bind_to_thread()
            .map_err(|e| Error::Msg(format!("bind CUDA context: {e:?}")))?;
        if !ctx.has_async_alloc() {
            return Ok(());
        }
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: valid out-pointer and the device handle of a live context.
        unsafe { sys::cuDeviceGetMemPool(&mut pool, ctx.cu_device()) }
            .result()
            .map_err(|e| Error::Msg(format!("cuDeviceGetMemPool: {e:?}")))?;
        let mut keep: u64 = u64::MAX;
        // SAFETY: the release threshold is a cuuint64_t; `keep` outlives the call.
        unsafe {
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut keep as *mut u64).cast(),
            )
        }
        .result()
        .map_err(|e| Error::Msg(format!("cuMemPoolSetAttribute: {e:?}")))?;
    }
    #[cfg(not(feature = "cuda"))]
    let _ = device;
    Ok(())
}
