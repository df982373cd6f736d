//! CUDA memory-pool policy. candle allocates with `cuMemAllocAsync` from the device's default
//! memory pool, whose release threshold is 0: at every stream synchronisation all freed memory
//! goes back to the driver, and the next allocations map fresh physical pages again (costly for
//! the activation-sized tensors of a training step). [`keep_pool_memory`] raises the threshold so
//! freed memory stays cached in the pool (like PyTorch's caching allocator).

use candle_core::Device;

use crate::error::Result;

/// Keep freed memory in `dev`'s default memory pool (release threshold = `u64::MAX`).
/// `Ok(false)` on CPU, in CPU builds, or without a stream-ordered allocator.
pub fn keep_pool_memory(dev: &Device) -> Result<bool> {
    #[cfg(feature = "cuda")]
    {
        use cudarc::driver::sys;
        let Device::Cuda(cd) = dev else {
            return Ok(false);
        };
        let stream = cd.cuda_stream();
        let ctx = stream.context();
        ctx.bind_to_thread()
            .map_err(|e| crate::error::Error::Msg(format!("pool: bind context: {e:?}")))?;
        if !ctx.has_async_alloc() {
            return Ok(false);
        }
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: valid out-pointer and the device handle of a live context.
        unsafe { sys::cuDeviceGetMemPool(&mut pool, ctx.cu_device()) }
            .result()
            .map_err(|e| crate::error::Error::Msg(format!("pool: cuDeviceGetMemPool: {e:?}")))?;
        let mut threshold: u64 = u64::MAX;
        // SAFETY: the attribute is a cuuint64_t; `threshold` outlives the call.
        unsafe {
            sys::cuMemPoolSetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                (&mut threshold as *mut u64).cast(),
            )
        }
        .result()
        .map_err(|e| crate::error::Error::Msg(format!("pool: set release threshold: {e:?}")))?;
        Ok(true)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = dev;
        Ok(false)
    }
}

/// The pool policy every ferrofold CUDA device gets ([`crate::device::select`]): keep freed
/// memory ([`keep_pool_memory`]) unless the environment variable `FERROFOLD_POOL_KEEP` is `0`
/// (driver default, for comparisons). Returns whether memory is kept.
pub fn apply_pool_policy(dev: &Device) -> Result<bool> {
    if std::env::var("FERROFOLD_POOL_KEEP").as_deref() == Ok("0") {
        Ok(false)
    } else {
        keep_pool_memory(dev)
    }
}
