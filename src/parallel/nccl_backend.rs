//! NCCL backend of [`Communicator`] for CUDA tensors (cudarc 0.19's NCCL bindings).
//!
//! # Construction
//! [`NcclComm::new`] is collective over an MPI communicator with the same ranks (its *host
//! companion*): group rank 0 creates the NCCL unique id, which travels to the others by an MPI
//! broadcast (no files), and every rank calls `ncclCommInitRank`. [`NcclComm::split`] splits the
//! companion and builds a fresh NCCL communicator over each part, so a `ProcessGroups` built from an
//! `NcclComm` world has one NCCL communicator per group (world, DAP group, DP group).
//!
//! # Streams and events (what keeps candle's stream-ordered memory valid)
//! candle launches everything on its device stream (the *compute stream*). Each `NcclComm` owns a
//! non-blocking, high-priority *communication stream*. A collective (`start_*`):
//! 1. prepares its send buffer with candle ops on the compute stream (contiguous copy, all-to-all
//!    packing, bf16/f16 → f32 for reductions) and allocates the output on the compute stream;
//! 2. records an event on the compute stream; the communication stream waits on it (so it sees
//!    the inputs produced and the output allocated);
//! 3. enqueues the NCCL call(s) on the communication stream, then records a completion event.
//!
//! The returned [`CommHandle`] holds the input tensors, the output and the completion event.
//! `wait()` makes the *compute stream* wait on the completion event (no host synchronisation) and
//! then finishes the result with candle ops (reshape / reassembly / dtype) on the compute stream.
//! Only after that wait are the held inputs released: their stream-ordered frees are enqueued on
//! the compute stream *behind* the collective, so NCCL never reads freed memory. Dropping a handle
//! without `wait` does the same wait first. Between `start_*` and `wait` the compute stream runs
//! freely: that is the overlap. The blocking forms are `start_*(..)?.wait()`.
//!
//! The communication stream is created directly (not through `CudaContext::new_stream`), so the
//! context does not switch cudarc into multi-stream event tracking: candle's kernels stay as cheap
//! as in a single-stream process, and the ordering above is done by hand.
//!
//! Threads: candle's default device stream is CUDA's per-thread stream, so `start_*` and `wait` of
//! one collective must run on the same thread (the training thread; see the ordering rule in
//! [`super::comm`]).
//!
//! # Data types
//! f32, f64, bf16 and f16 travel natively for gathers, all-to-alls and broadcasts (exact);
//! reductions of bf16/f16 are carried out in f32 and rounded back once (the same semantics as the
//! MPI backend). CPU tensors given to an `NcclComm` go through its MPI companion, as do the host
//! reductions.
//!
//! # NCCL symbols
//! Only functions present in NCCL 2.28 are referenced: `ncclGetUniqueId`, `ncclCommInitRank`,
//! `ncclCommDestroy`, `ncclAllReduce`, `ncclAllGather`, `ncclBroadcast`, `ncclSend`, `ncclRecv`,
//! `ncclGroupStart`, `ncclGroupEnd`.

use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::cuda_backend::CudaDType;
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Device, DeviceLocation, Storage, Tensor};
use cudarc::driver::{CudaContext, CudaEvent, CudaSlice, CudaStream, DevicePtr};
use cudarc::nccl::{result as nccl, sys as nccl_sys};

use super::comm::{
    assemble_gathered, check_all_to_all, check_dim, comm_err, pack_all_to_all, unpack_all_to_all,
    CommHandle, Communicator, PendingOp, ReduceOp,
};
use super::ctx::ParallelCtx;
use super::mpi_backend::MpiComm;
use crate::error::Result;

/// The owned NCCL communicator and communication stream.
struct Inner {
    comm: nccl_sys::ncclComm_t,
    /// Raw handle of the communication stream (destroyed in `Drop`).
    raw_stream: cudarc::driver::sys::CUstream,
    /// The same stream, wrapped (borrowed) for cudarc's event API.
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
    device: CudaDevice,
    rank: usize,
    size: usize,
    label: String,
    /// Serialises issuing on this communicator (see the ordering rule in `super::comm`).
    issue: Mutex<()>,
    /// With `FERROFOLD_NCCL_TIMING=1`: (before, after) timing events around each compute-stream
    /// wait, to measure how long the GPU stalled on communication.
    stalls: Option<Mutex<Vec<(CudaEvent, CudaEvent)>>>,
}

// SAFETY: the raw NCCL communicator and stream handles are only used through NCCL/CUDA calls,
// which are thread-safe for distinct calls; issuing on the communicator is serialised by `issue`.
unsafe impl Send for Inner {}
// SAFETY: as above.
unsafe impl Sync for Inner {}

impl Drop for Inner {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: both handles were created in `NcclComm::new` and are destroyed exactly once,
        // here; every pending operation holds an `Arc<Inner>`, so none is in flight on our side.
        unsafe {
            let _ = cudarc::driver::result::stream::synchronize(self.raw_stream);
            let _ = nccl::comm_destroy(self.comm);
            let _ = cudarc::driver::result::stream::destroy(self.raw_stream);
        }
    }
}

/// A communicator over CUDA tensors backed by NCCL, with an MPI companion over the same ranks for
/// CPU tensors and host values. Cheap to share as `Arc<dyn Communicator>`.
pub struct NcclComm {
    inner: Arc<Inner>,
    mpi: Arc<dyn Communicator>,
}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "NcclComm({} rank {}/{} on cuda:{})",
            self.inner.label,
            self.inner.rank,
            self.inner.size,
            self.inner.ctx.ordinal()
        )
    }
}

fn nccl_err(rank: usize, what: &str, e: nccl::NcclError) -> crate::error::Error {
    comm_err(rank, format!("NCCL {what} failed: {:?}", e.0))
}

fn cuda_err(rank: usize, what: &str, e: cudarc::driver::DriverError) -> crate::error::Error {
    comm_err(rank, format!("CUDA {what} failed: {e:?}"))
}

/// NCCL data type of a candle dtype.
fn nccl_dtype(dt: DType, rank: usize) -> Result<nccl_sys::ncclDataType_t> {
    use nccl_sys::ncclDataType_t as T;
    Ok(match dt {
        DType::F32 => T::ncclFloat32,
        DType::F64 => T::ncclFloat64,
        DType::BF16 => T::ncclBfloat16,
        DType::F16 => T::ncclFloat16,
        other => {
            return Err(comm_err(
                rank,
                format!("NCCL collectives support f32/f64/bf16/f16 tensors, got {other:?}"),
            ))
        }
    })
}

/// Which NCCL collective to enqueue.
#[derive(Debug, Clone, Copy)]
enum Coll {
    AllReduce {
        avg: bool,
    },
    AllGather,
    /// Send layout `[size, *chunk]`: chunk `p` goes to rank `p`.
    AllToAll,
    Broadcast {
        root: usize,
    },
}

/// How the raw output buffer (flat) becomes the result tensor (in `wait`, on the compute stream).
#[derive(Debug, Clone)]
enum Finish {
    /// Same shape as the input.
    Plain { dims: Vec<usize> },
    /// Rank-major `[size, *per_rank]`, reassembled along `dim`.
    Gather { per_rank: Vec<usize>, dim: usize },
    /// Rank-major `[size, *chunk]`, concatenated along `concat_dim`.
    AllToAll {
        chunk: Vec<usize>,
        concat_dim: usize,
    },
}

impl Finish {
    fn apply(&self, flat: Tensor, size: usize, out: DType) -> Result<Tensor> {
        let t = match self {
            Finish::Plain { dims } => flat.reshape(dims.as_slice())?,
            Finish::Gather { per_rank, dim } => {
                let mut sd = vec![size];
                sd.extend_from_slice(per_rank);
                assemble_gathered(&flat.reshape(sd)?, per_rank, *dim)?
            }
            Finish::AllToAll { chunk, concat_dim } => {
                let mut sd = vec![size];
                sd.extend_from_slice(chunk);
                unpack_all_to_all(&flat.reshape(sd)?, chunk, *concat_dim)?
            }
        };
        Ok(if t.dtype() == out {
            t
        } else {
            t.to_dtype(out)?
        })
    }
}

/// Device pointer (with the layout's start offset) of a contiguous CUDA tensor on `device`.
fn device_ptr(t: &Tensor, stream: &CudaStream, rank: usize) -> Result<u64> {
    fn base<T: CudaDType>(cs: &CudaStorage, stream: &CudaStream) -> Result<u64> {
        let s: &CudaSlice<T> = cs.as_cuda_slice::<T>()?;
        let (p, _sync) = s.device_ptr(stream);
        Ok(p)
    }
    let (st, layout) = t.storage_and_layout();
    if !layout.is_contiguous() {
        return Err(comm_err(
            rank,
            "NCCL: internal error: non-contiguous buffer",
        ));
    }
    let off = (layout.start_offset() * t.dtype().size_in_bytes()) as u64;
    let p = match &*st {
        Storage::Cuda(cs) => match t.dtype() {
            DType::F32 => base::<f32>(cs, stream)?,
            DType::F64 => base::<f64>(cs, stream)?,
            DType::BF16 => base::<half::bf16>(cs, stream)?,
            DType::F16 => base::<half::f16>(cs, stream)?,
            other => return Err(comm_err(rank, format!("NCCL: unsupported dtype {other:?}"))),
        },
        _ => return Err(comm_err(rank, "NCCL: tensor is not on a CUDA device")),
    };
    Ok(p + off)
}

/// An uninitialised 1-D CUDA tensor of `n` elements, allocated on candle's (compute) stream.
fn alloc_flat(dev: &CudaDevice, n: usize, dt: DType, rank: usize) -> Result<Tensor> {
    fn wrap<T: CudaDType + cudarc::driver::DeviceRepr>(
        dev: &CudaDevice,
        n: usize,
    ) -> Result<CudaStorage> {
        // SAFETY: the buffer is written entirely by the collective before anything reads it (the
        // compute stream reads it only after waiting on the collective's completion event).
        let s = unsafe { dev.alloc::<T>(n) }?;
        Ok(CudaStorage::wrap_cuda_slice(s, dev.clone()))
    }
    let cs = match dt {
        DType::F32 => wrap::<f32>(dev, n)?,
        DType::F64 => wrap::<f64>(dev, n)?,
        DType::BF16 => wrap::<half::bf16>(dev, n)?,
        DType::F16 => wrap::<half::f16>(dev, n)?,
        other => return Err(comm_err(rank, format!("NCCL: unsupported dtype {other:?}"))),
    };
    Ok(Tensor::from_storage(
        Storage::Cuda(cs),
        n,
        BackpropOp::none(),
        false,
    ))
}

impl NcclComm {
    /// NCCL over the MPI world (a private duplicate of it as the companion), on `device` (this
    /// rank's GPU). Collective over the world.
    pub fn world(ctx: &ParallelCtx, device: &Device) -> Result<Arc<NcclComm>> {
        ctx.require_collectives()?;
        let mpi: Arc<dyn Communicator> = MpiComm::world(ctx)?;
        Self::new(mpi, device, "world".into())
    }

    /// An NCCL communicator over the ranks of `mpi` (collective over it), on `device`.
    pub fn new(mpi: Arc<dyn Communicator>, device: &Device, label: String) -> Result<Arc<Self>> {
        let (rank, size) = (mpi.rank(), mpi.size());
        let dev = match device {
            Device::Cuda(d) => d.clone(),
            _ => {
                return Err(comm_err(
                    rank,
                    "the NCCL backend needs a CUDA device (parallel.backend = \"nccl\" on CPU)",
                ))
            }
        };
        let compute = dev.cuda_stream();
        let ctx = compute.context().clone();
        // The unique id: created on rank 0, broadcast over MPI as 128 bytes (+ an ok flag, so that
        // a failure on rank 0 fails every rank instead of leaving them waiting in init).
        let mut buf = vec![0f64; 129];
        if rank == 0 {
            match nccl::get_uniqueid() {
                Ok(id) => {
                    for (b, c) in buf.iter_mut().zip(id.internal.iter()) {
                        *b = f64::from(*c as u8);
                    }
                    buf[128] = 1.0;
                }
                Err(e) => eprintln!("[rank {rank}] ncclGetUniqueId failed: {:?}", e.0),
            }
        }
        let t = Tensor::from_vec(buf, 129, &Device::Cpu)?;
        let got: Vec<f64> = mpi.broadcast(&t, 0)?.to_vec1()?;
        if got[128] != 1.0 {
            return Err(comm_err(rank, "NCCL: rank 0 could not create a unique id"));
        }
        let mut internal = [0 as std::ffi::c_char; 128];
        for (c, b) in internal.iter_mut().zip(&got) {
            *c = (*b as u8) as std::ffi::c_char;
        }
        let id = nccl_sys::ncclUniqueId { internal };
        ctx.bind_to_thread()
            .map_err(|e| cuda_err(rank, "bind context", e))?;
        // The communication stream: non-blocking, highest priority (NCCL kernels get SMs first
        // when they overlap compute).
        let priority = cudarc::driver::result::stream::get_priority_range()
            .map(|(_, greatest)| greatest)
            .unwrap_or(0);
        let raw_stream = cudarc::driver::result::stream::create_with_priority(
            cudarc::driver::result::stream::StreamKind::NonBlocking,
            priority,
        )
        .map_err(|e| cuda_err(rank, "stream create", e))?;
        // SAFETY: `raw_stream` belongs to `ctx` and lives until `Inner::drop`, which outlives the
        // wrapper (it is a field of the same struct, dropped after its use there).
        let stream = unsafe { ctx.wrap_borrowed_stream(raw_stream) };
        let mut comm = std::mem::MaybeUninit::<nccl_sys::ncclComm_t>::uninit();
        let n = i32::try_from(size).map_err(|_| comm_err(rank, "group too large"))?;
        let r = i32::try_from(rank).map_err(|_| comm_err(rank, "rank too large"))?;
        // SAFETY: `comm` is a valid out-pointer; the id is the same on every rank (broadcast).
        let comm = unsafe {
            match nccl::comm_init_rank(comm.as_mut_ptr(), n, id, r) {
                Ok(_) => comm.assume_init(),
                Err(e) => {
                    let _ = cudarc::driver::result::stream::destroy(raw_stream);
                    return Err(nccl_err(rank, "ncclCommInitRank", e));
                }
            }
        };
        let stalls = std::env::var("FERROFOLD_NCCL_TIMING")
            .map(|v| v == "1")
            .unwrap_or(false)
            .then(|| Mutex::new(Vec::new()));
        Ok(Arc::new(Self {
            inner: Arc::new(Inner {
                comm,
                raw_stream,
                stream,
                ctx,
                device: dev,
                rank,
                size,
                label,
                issue: Mutex::new(()),
                stalls,
            }),
            mpi,
        }))
    }

    /// The label ("world", "world/split3", ...).
    pub fn label(&self) -> &str {
        &self.inner.label
    }

    /// With `FERROFOLD_NCCL_TIMING=1`: total milliseconds the compute stream stalled in `wait`
    /// (waiting on collectives) since the last call, and the number of waits; synchronises the
    /// events. `None` when timing is off.
    pub fn take_stall_ms(&self) -> Result<Option<(f64, usize)>> {
        let Some(st) = &self.inner.stalls else {
            return Ok(None);
        };
        let evs = std::mem::take(&mut *self.lock_stalls(st)?);
        let mut ms = 0.0f64;
        for (a, b) in &evs {
            ms += f64::from(
                a.elapsed_ms(b)
                    .map_err(|e| cuda_err(self.inner.rank, "event elapsed", e))?,
            );
        }
        Ok(Some((ms, evs.len())))
    }

    fn lock_stalls<'a>(
        &self,
        st: &'a Mutex<Vec<(CudaEvent, CudaEvent)>>,
    ) -> Result<MutexGuard<'a, Vec<(CudaEvent, CudaEvent)>>> {
        st.lock()
            .map_err(|_| comm_err(self.inner.rank, "stall timer lock poisoned"))
    }

    /// True for a CPU tensor (carried by the MPI companion); error unless it is on this
    /// communicator's GPU.
    fn is_cpu(&self, x: &Tensor) -> Result<bool> {
        match x.device().location() {
            DeviceLocation::Cpu => Ok(true),
            DeviceLocation::Cuda { gpu_id } if gpu_id == self.inner.ctx.ordinal() => Ok(false),
            other => Err(comm_err(
                self.inner.rank,
                format!("{self:?}: tensor is on {other:?}"),
            )),
        }
    }

    /// Enqueue `coll` on `send` (a contiguous CUDA tensor in its wire dtype); the result is
    /// `finish` applied to the flat output, converted to `out_dtype`.
    fn start(
        &self,
        send: Tensor,
        coll: Coll,
        finish: Finish,
        out_dtype: DType,
    ) -> Result<CommHandle> {
        let inner = &self.inner;
        let rank = inner.rank;
        let send = send.contiguous()?;
        let n = send.elem_count();
        let dt = send.dtype();
        let ndt = nccl_dtype(dt, rank)?;
        let out_len = match coll {
            Coll::AllGather => n * inner.size,
            _ => n,
        };
        if n == 0 {
            let out = Tensor::zeros(out_len, dt, send.device())?;
            return Ok(CommHandle::ready(finish.apply(out, inner.size, out_dtype)?));
        }
        // Allocate on the input's candle device (same GPU, maybe another candle handle), so the
        // result mixes with the caller's tensors.
        let dev = match send.device() {
            Device::Cuda(d) => d.clone(),
            _ => return Err(comm_err(rank, "NCCL: tensor is not on a CUDA device")),
        };
        let out = alloc_flat(&dev, out_len, dt, rank)?;
        let compute = dev.cuda_stream();
        let done = {
            let _g = inner
                .issue
                .lock()
                .map_err(|_| comm_err(rank, "communicator issue lock poisoned"))?;
            inner
                .ctx
                .bind_to_thread()
                .map_err(|e| cuda_err(rank, "bind context", e))?;
            // The communication stream starts after everything enqueued so far on the compute
            // stream (the send buffer's producers and the output's allocation).
            let ready = compute
                .record_event(None)
                .map_err(|e| cuda_err(rank, "event record", e))?;
            inner
                .stream
                .wait(&ready)
                .map_err(|e| cuda_err(rank, "stream wait", e))?;
            let sp = device_ptr(&send, &compute, rank)?;
            let rp = device_ptr(&out, &compute, rank)?;
            let s = inner.raw_stream as nccl_sys::cudaStream_t;
            let esz = dt.size_in_bytes() as u64;
            // SAFETY: `sp` / `rp` point to live device buffers of `n` / `out_len` elements of
            // `dt` (held by the pending op until the compute stream has waited for completion);
            // the communicator and stream are live (`Inner`).
            unsafe {
                match coll {
                    Coll::AllReduce { avg } => {
                        let op = if avg {
                            nccl_sys::ncclRedOp_t::ncclAvg
                        } else {
                            nccl_sys::ncclRedOp_t::ncclSum
                        };
                        nccl::all_reduce(sp as _, rp as _, n, ndt, op, inner.comm, s)
                            .map_err(|e| nccl_err(rank, "ncclAllReduce", e))?;
                    }
                    Coll::AllGather => {
                        nccl::all_gather(sp as _, rp as _, n, ndt, inner.comm, s)
                            .map_err(|e| nccl_err(rank, "ncclAllGather", e))?;
                    }
                    Coll::Broadcast { root } => {
                        nccl::broadcast(sp as _, rp as _, n, ndt, root as i32, inner.comm, s)
                            .map_err(|e| nccl_err(rank, "ncclBroadcast", e))?;
                    }
                    Coll::AllToAll => {
                        // NCCL has no all-to-all: one grouped send/recv pair per peer.
                        let c = n / inner.size;
                        nccl::group_start().map_err(|e| nccl_err(rank, "ncclGroupStart", e))?;
                        let mut res = Ok(());
                        for p in 0..inner.size {
                            let off = (p * c) as u64 * esz;
                            let r1 = nccl::send((sp + off) as _, c, ndt, p as i32, inner.comm, s);
                            let r2 = nccl::recv((rp + off) as _, c, ndt, p as i32, inner.comm, s);
                            if let Err(e) = r1.and(r2) {
                                res = Err(nccl_err(rank, "ncclSend/ncclRecv", e));
                                break;
                            }
                        }
                        // Always close the group, even after an error.
                        let end = nccl::group_end().map_err(|e| nccl_err(rank, "ncclGroupEnd", e));
                        res?;
                        end?;
                    }
                }
            }
            inner
                .stream
                .record_event(None)
                .map_err(|e| cuda_err(rank, "event record", e))?
        };
        Ok(CommHandle::pending(Box::new(NcclPending {
            inner: inner.clone(),
            compute,
            done: Some(done),
            keep: Some(send),
            out: Some(out),
            finish,
            out_dtype,
        })))
    }

    fn check_root(&self, root: usize) -> Result<()> {
        if root >= self.inner.size {
            return Err(comm_err(
                self.inner.rank,
                format!(
                    "broadcast root {root} out of range for group size {}",
                    self.inner.size
                ),
            ));
        }
        Ok(())
    }

    fn do_all_reduce(&self, x: &Tensor, op: ReduceOp) -> Result<CommHandle> {
        // Reductions of 16-bit floats run in f32 (rounded back once in `wait`).
        let wire = match x.dtype() {
            DType::BF16 | DType::F16 => x.to_dtype(DType::F32)?,
            _ => x.clone(),
        };
        self.start(
            wire,
            Coll::AllReduce {
                avg: op == ReduceOp::Avg,
            },
            Finish::Plain {
                dims: x.dims().to_vec(),
            },
            x.dtype(),
        )
    }

    fn do_all_gather(&self, x: &Tensor, dim: usize) -> Result<CommHandle> {
        check_dim(x, dim, "all_gather", self.inner.rank)?;
        self.start(
            x.clone(),
            Coll::AllGather,
            Finish::Gather {
                per_rank: x.dims().to_vec(),
                dim,
            },
            x.dtype(),
        )
    }

    fn do_all_to_all(&self, x: &Tensor, split_dim: usize, concat_dim: usize) -> Result<CommHandle> {
        check_all_to_all(x, split_dim, concat_dim, self.inner.size, self.inner.rank)?;
        let (packed, chunk) = pack_all_to_all(x, split_dim, self.inner.size)?;
        self.start(
            packed,
            Coll::AllToAll,
            Finish::AllToAll { chunk, concat_dim },
            x.dtype(),
        )
    }

    fn do_broadcast(&self, x: &Tensor, root: usize) -> Result<CommHandle> {
        self.check_root(root)?;
        self.start(
            x.clone(),
            Coll::Broadcast { root },
            Finish::Plain {
                dims: x.dims().to_vec(),
            },
            x.dtype(),
        )
    }
}

/// An enqueued NCCL collective (module docs: streams and events).
struct NcclPending {
    inner: Arc<Inner>,
    /// candle's stream at issue time (the stream that must wait).
    compute: Arc<CudaStream>,
    done: Option<CudaEvent>,
    /// The send buffer, kept alive until the compute stream is ordered after the collective.
    keep: Option<Tensor>,
    out: Option<Tensor>,
    finish: Finish,
    out_dtype: DType,
}

impl NcclPending {
    /// Make the compute stream wait for the collective (once).
    fn order(&mut self) -> Result<()> {
        let Some(done) = self.done.take() else {
            return Ok(());
        };
        let rank = self.inner.rank;
        let timing = |s: &CudaStream| {
            s.record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(|e| cuda_err(rank, "timing event", e))
        };
        let before = match &self.inner.stalls {
            Some(_) => Some(timing(&self.compute)?),
            None => None,
        };
        self.compute
            .wait(&done)
            .map_err(|e| cuda_err(rank, "stream wait", e))?;
        if let (Some(st), Some(a)) = (&self.inner.stalls, before) {
            let b = timing(&self.compute)?;
            st.lock()
                .map_err(|_| comm_err(rank, "stall timer lock poisoned"))?
                .push((a, b));
        }
        Ok(())
    }
}

impl PendingOp for NcclPending {
    fn wait(mut self: Box<Self>) -> Result<Tensor> {
        self.order()?;
        let out = self
            .out
            .take()
            .ok_or_else(|| comm_err(self.inner.rank, "NCCL: result already taken"))?;
        let t = self.finish.apply(out, self.inner.size, self.out_dtype)?;
        drop(self.keep.take());
        Ok(t)
    }
}

impl Drop for NcclPending {
    fn drop(&mut self) {
        // A handle dropped without `wait`: order the compute stream after the collective before
        // the buffers are released (their frees are enqueued on the compute stream).
        if self.order().is_err() {
            // Could not order the streams: block the host until the collective is done instead.
            let _ = self.inner.stream.synchronize();
        }
    }
}

impl Communicator for NcclComm {
    fn rank(&self) -> usize {
        self.inner.rank
    }

    fn size(&self) -> usize {
        self.inner.size
    }

    fn backend_name(&self) -> &'static str {
        "nccl"
    }

    fn all_reduce(&self, x: &Tensor, op: ReduceOp) -> Result<Tensor> {
        if self.is_cpu(x)? {
            return self.mpi.all_reduce(x, op);
        }
        self.do_all_reduce(x, op)?.wait()
    }

    fn all_gather(&self, x: &Tensor, dim: usize) -> Result<Tensor> {
        if self.is_cpu(x)? {
            return self.mpi.all_gather(x, dim);
        }
        self.do_all_gather(x, dim)?.wait()
    }

    fn all_to_all(&self, x: &Tensor, split_dim: usize, concat_dim: usize) -> Result<Tensor> {
        if self.is_cpu(x)? {
            return self.mpi.all_to_all(x, split_dim, concat_dim);
        }
        self.do_all_to_all(x, split_dim, concat_dim)?.wait()
    }

    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor> {
        if self.is_cpu(x)? {
            return self.mpi.broadcast(x, root);
        }
        self.do_broadcast(x, root)?.wait()
    }

    /// Every rank arrives, with its queued GPU work (compute and communication streams) done.
    fn barrier(&self) -> Result<()> {
        let rank = self.inner.rank;
        self.inner
            .device
            .cuda_stream()
            .synchronize()
            .map_err(|e| cuda_err(rank, "synchronize", e))?;
        self.inner
            .stream
            .synchronize()
            .map_err(|e| cuda_err(rank, "synchronize", e))?;
        self.mpi.barrier()
    }

    fn start_all_reduce(&self, x: &Tensor, op: ReduceOp) -> Result<CommHandle> {
        if self.is_cpu(x)? {
            return self.mpi.start_all_reduce(x, op);
        }
        self.do_all_reduce(x, op)
    }

    fn start_all_gather(&self, x: &Tensor, dim: usize) -> Result<CommHandle> {
        if self.is_cpu(x)? {
            return self.mpi.start_all_gather(x, dim);
        }
        self.do_all_gather(x, dim)
    }

    fn start_all_to_all(
        &self,
        x: &Tensor,
        split_dim: usize,
        concat_dim: usize,
    ) -> Result<CommHandle> {
        if self.is_cpu(x)? {
            return self.mpi.start_all_to_all(x, split_dim, concat_dim);
        }
        self.do_all_to_all(x, split_dim, concat_dim)
    }

    fn start_broadcast(&self, x: &Tensor, root: usize) -> Result<CommHandle> {
        if self.is_cpu(x)? {
            return self.mpi.start_broadcast(x, root);
        }
        self.do_broadcast(x, root)
    }

    fn all_reduce_host_f64(&self, values: &[f64], op: ReduceOp) -> Result<Vec<f64>> {
        self.mpi.all_reduce_host_f64(values, op)
    }

    fn reduce_host_f64_to_root(
        &self,
        values: &[f64],
        op: ReduceOp,
        root: usize,
    ) -> Result<Option<Vec<f64>>> {
        self.mpi.reduce_host_f64_to_root(values, op, root)
    }

    fn split(&self, color: usize, key: usize) -> Result<Arc<dyn Communicator>> {
        let sub = self.mpi.split(color, key)?;
        let label = format!("{}/split{color}", self.inner.label);
        let dev = Device::Cuda(self.inner.device.clone());
        Ok(NcclComm::new(sub, &dev, label)?)
    }
}
