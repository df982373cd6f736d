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
        Some(i) => {
            let dev = Device::new_cuda(i)?;
            crate::kernels::pool::apply_pool_policy(&dev)?;
            Ok(dev)
        }
    }
}
