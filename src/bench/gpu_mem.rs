//! Peak device memory: the CUDA memory pool's high-water mark (CPU builds: nothing to watch).

#[cfg(feature = "cuda")]
mod imp {
    //! Peak memory through the CUDA memory pool that candle's `cuMemAllocAsync` allocates from.
    use candle_core::Device;
    use cudarc::driver::sys;

    use crate::error::{Error, Result};

    fn drv(r: sys::CUresult, what: &str) -> Result<()> {
        r.result()
            .map_err(|e| Error::Msg(format!("bench: {what}: {e:?}")))
    }

    pub struct PoolWatch {
        pool: sys::CUmemoryPool,
    }

    impl PoolWatch {
        /// `None` on CPU or when the context has no stream-ordered allocator.
        pub fn new(dev: &Device) -> Result<Option<Self>> {
            let Device::Cuda(cd) = dev else {
                return Ok(None);
            };
            let stream = cd.cuda_stream();
            let ctx = stream.context();
            ctx.bind_to_thread()
                .map_err(|e| Error::Msg(format!("bench: bind context: {e:?}")))?;
            if !ctx.has_async_alloc() {
                return Ok(None);
            }
            let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
            // SAFETY: valid out-pointer and device handle of a live context.
            drv(
                unsafe { sys::cuDeviceGetMemPool(&mut pool, ctx.cu_device()) },
                "cuDeviceGetMemPool",
            )?;
            Ok(Some(Self { pool }))
        }

        fn get(&self, attr: sys::CUmemPool_attribute) -> Result<u64> {
            let mut v: u64 = 0;
            // SAFETY: the attribute is a cuuint64_t; `v` outlives the call.
            drv(
                unsafe { sys::cuMemPoolGetAttribute(self.pool, attr, (&mut v as *mut u64).cast()) },
                "cuMemPoolGetAttribute",
            )?;
            Ok(v)
        }

        pub fn used_now(&self) -> Result<u64> {
            self.get(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)
        }

        pub fn peak(&self) -> Result<u64> {
            self.get(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)
        }

        /// Reset the high-water mark to the current use.
        pub fn reset_peak(&self) -> Result<()> {
            let mut zero: u64 = 0;
            // SAFETY: setting USED_MEM_HIGH to 0 resets it (CUDA driver API); `zero` outlives the call.
            drv(
                unsafe {
                    sys::cuMemPoolSetAttribute(
                        self.pool,
                        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                        (&mut zero as *mut u64).cast(),
                    )
                },
                "cuMemPoolSetAttribute",
            )
        }
    }
}

#[cfg(not(feature = "cuda"))]
mod imp {
    //! CPU builds: no device memory to watch.
    use candle_core::Device;

    use crate::error::Result;

    pub struct PoolWatch;

    impl PoolWatch {
        pub fn new(_dev: &Device) -> Result<Option<Self>> {
            Ok(None)
        }
        pub fn used_now(&self) -> Result<u64> {
            Ok(0)
        }
        pub fn peak(&self) -> Result<u64> {
            Ok(0)
        }
        pub fn reset_peak(&self) -> Result<()> {
            Ok(())
        }
    }
}

pub use imp::PoolWatch;
