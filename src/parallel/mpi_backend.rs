//! MPI backend of [`Communicator`] (rsmpi 0.8 over Open MPI) for CPU tensors.
//!
//! Tensors travel as flat host vectors (f32 or f64; bf16/f16 are widened to f32 and the result
//! rounded back). Blocking forms use MPI's blocking collectives; the `start_*` forms use MPI-3 immediate
//! collectives (`MPI_Iallreduce`, `MPI_Iallgather`, `MPI_Ialltoall`, `MPI_Ibcast`).
//!
//! # Why the immediate collectives are sound
//! An immediate collective needs its buffers to stay valid and unaliased until it completes, which
//! a borrow cannot express across an arbitrary `wait` point. Here the in-flight operation *owns*
//! its buffers: they are moved into heap boxes and turned into raw pointers (`Box::into_raw`)
//! before the operation starts; MPI receives `'static` references derived from those pointers
//! (rsmpi's `StaticScope`), and nothing else touches the allocations while the request is live.
//! [`MpiPending`] reclaims them (`Box::from_raw`, exactly once) only *after* `MPI_Wait` returned:
//! either in `wait()` or, if the handle is dropped, in its destructor, which waits first. If a
//! handle is leaked (`mem::forget`), the request never completes on our side and the boxes are
//! never freed, so MPI can only ever write into live memory: a leak, never a use-after-free.
//! (The `Request` itself keeps rsmpi's usual `&'static` view of the receive buffer; Rust code never
//! reads it while MPI writes, only after `MPI_Wait`, through the reclaimed box.)
//!
//! # Threads
//! rsmpi communicators and requests are raw MPI handles and not `Send`/`Sync`. `MpiComm` and
//! `MpiPending` are declared `Send + Sync`/`Send` because (a) construction requires the MPI library
//! to provide `MPI_THREAD_MULTIPLE` (ParallelCtx asks for it), so any thread may call MPI on any
//! handle, and (b) issuing collectives is serialised by a per-communicator mutex. See the ordering
//! rule in [`super::comm`].

use std::sync::{Arc, Mutex, MutexGuard};

use candle_core::{DType, Device, Tensor, WithDType};
use mpi::collective::SystemOperation;
use mpi::datatype::Equivalence;
use mpi::request::{Request, StaticScope};
use mpi::topology::{Color, SimpleCommunicator};
use mpi::traits::Communicator as _;
use mpi::traits::*;

use super::comm::{
    assemble_gathered, check_all_to_all, check_dim, comm_err, pack_all_to_all, unpack_all_to_all,
    wire_dtype, CommHandle, Communicator, PendingOp, ReduceOp,
};
use super::ctx::ParallelCtx;
use crate::error::Result;

/// Element types carried over MPI.
trait Wire: Equivalence + WithDType + Copy + Default + Send + 'static {
    fn div_by(self, n: usize) -> Self;
}

impl Wire for f32 {
    fn div_by(self, n: usize) -> Self {
        self / n as f32
    }
}

impl Wire for f64 {
    fn div_by(self, n: usize) -> Self {
        self / n as f64
    }
}

/// A tensor's data as a flat host vector in its wire type.
enum Host {
    F32(Vec<f32>),
    F64(Vec<f64>),
}

/// Run `$body` with `$v` bound to the vector inside a `Host`, whichever its type.
macro_rules! with_host {
    ($host:expr, $v:ident => $body:expr) => {
        match $host {
            Host::F32($v) => $body,
            Host::F64($v) => $body,
        }
    };
}

/// How an in-flight operation's receive buffer becomes the result tensor.
#[derive(Debug, Clone)]
enum Finish {
    /// Same shape as the input; `avg` divides by the group size.
    Reduce { dims: Vec<usize>, avg: bool },
    /// Rank-major `[size, *per_rank]`, reassembled along `dim`.
    Gather { per_rank: Vec<usize>, dim: usize },
    /// Rank-major `[size, *chunk]`, concatenated along `concat_dim`.
    AllToAll {
        chunk: Vec<usize>,
        concat_dim: usize,
    },
    /// Same shape as the input (broadcast).
    Plain { dims: Vec<usize> },
}

impl Finish {
    fn apply<T: Wire>(&self, mut v: Vec<T>, size: usize, out: DType) -> Result<Tensor> {
        let t = match self {
            Finish::Reduce { dims, avg } => {
                if *avg {
                    v.iter_mut().for_each(|x| *x = x.div_by(size));
                }
                Tensor::from_vec(v, dims.as_slice(), &Device::Cpu)?
            }
            Finish::Plain { dims } => Tensor::from_vec(v, dims.as_slice(), &Device::Cpu)?,
            Finish::Gather { per_rank, dim } => {
                let mut sd = vec![size];
                sd.extend_from_slice(per_rank);
                let stacked = Tensor::from_vec(v, sd, &Device::Cpu)?;
                assemble_gathered(&stacked, per_rank, *dim)?
            }
            Finish::AllToAll { chunk, concat_dim } => {
                let mut sd = vec![size];
                sd.extend_from_slice(chunk);
                let stacked = Tensor::from_vec(v, sd, &Device::Cpu)?;
                unpack_all_to_all(&stacked, chunk, *concat_dim)?
            }
        };
        Ok(if t.dtype() == out {
            t
        } else {
            t.to_dtype(out)?
        })
    }
}

/// A communicator backed by an MPI communicator. Cheap to share as `Arc<dyn Communicator>`.
pub struct MpiComm {
    // `Some` until drop; see `Drop`.
    comm: Option<SimpleCommunicator>,
    rank: usize,
    size: usize,
    label: String,
    issue: Mutex<()>,
}

// SAFETY: see the module docs ("Threads"): MPI_THREAD_MULTIPLE is checked in `from_comm`, and the
// handle is only used through MPI calls, which are thread-safe at that level.
unsafe impl Send for MpiComm {}
// SAFETY: as above; `&MpiComm` only issues MPI calls (serialised per communicator by `issue`).
unsafe impl Sync for MpiComm {}

impl std::fmt::Debug for MpiComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "MpiComm({} rank {}/{})",
            self.label, self.rank, self.size
        )
    }
}

impl Drop for MpiComm {
    fn drop(&mut self) {
        if let Some(c) = self.comm.take() {
            if mpi::environment::is_finalized() {
                // MPI_Comm_free after MPI_Finalize is an error; the handle dies with the process.
                std::mem::forget(c);
            }
        }
    }
}

impl MpiComm {
    /// A private duplicate of the world communicator (its own matching context, so these
    /// collectives never interleave with ParallelCtx's own). Collective over the world.
    /// Must not outlive `ctx` (MPI is finalised when `ctx` drops).
    pub fn world(ctx: &ParallelCtx) -> Result<Arc<MpiComm>> {
        let dup = ctx.world().duplicate();
        Ok(Arc::new(MpiComm::from_comm(dup, "world".into())?))
    }

    fn from_comm(comm: SimpleCommunicator, label: String) -> Result<Self> {
        let rank = usize::try_from(comm.rank()).unwrap_or(0);
        let size = usize::try_from(comm.size()).unwrap_or(0);
        let level = mpi::environment::threading_support();
        if level != mpi::Threading::Multiple {
            return Err(comm_err(
                rank,
                format!(
                    "the MPI library provides thread level {level:?}; the MPI communicator needs \
                     Multiple (initialise through ParallelCtx::init with an MPI built with thread support)"
                ),
            ));
        }
        Ok(Self {
            comm: Some(comm),
            rank,
            size,
            label,
            issue: Mutex::new(()),
        })
    }

    /// The communicator's label ("world", "world/split3", ...).
    pub fn label(&self) -> &str {
        &self.label
    }

    fn comm(&self) -> Result<&SimpleCommunicator> {
        self.comm
            .as_ref()
            .ok_or_else(|| comm_err(self.rank, "MPI communicator already released"))
    }

    fn lock(&self) -> Result<MutexGuard<'_, ()>> {
        self.issue
            .lock()
            .map_err(|_| comm_err(self.rank, "communicator issue lock poisoned"))
    }

    fn to_host(&self, x: &Tensor) -> Result<(Host, DType)> {
        if !x.device().is_cpu() {
            return Err(comm_err(
                self.rank,
                "the MPI backend carries CPU tensors; CUDA tensors need the NCCL backend",
            ));
        }
        let flat = x.flatten_all()?;
        let host = match wire_dtype(x.dtype(), self.rank)? {
            DType::F64 => Host::F64(flat.to_dtype(DType::F64)?.to_vec1::<f64>()?),
            _ => Host::F32(flat.to_dtype(DType::F32)?.to_vec1::<f32>()?),
        };
        Ok((host, x.dtype()))
    }

    fn check_root(&self, root: usize) -> Result<i32> {
        if root >= self.size {
            return Err(comm_err(
                self.rank,
                format!(
                    "broadcast root {root} out of range for group size {}",
                    self.size
                ),
            ));
        }
        i32::try_from(root).map_err(|_| comm_err(self.rank, "root rank overflows i32"))
    }

    // ---- blocking primitives on host vectors ----

    fn host_all_reduce<T: Wire>(&self, v: &[T]) -> Result<Vec<T>> {
        let mut out = vec![T::default(); v.len()];
        let _g = self.lock()?;
        self.comm()?
            .all_reduce_into(v, &mut out[..], SystemOperation::sum());
        Ok(out)
    }

    fn host_all_gather<T: Wire>(&self, v: &[T]) -> Result<Vec<T>> {
        let mut out = vec![T::default(); v.len() * self.size];
        let _g = self.lock()?;
        self.comm()?.all_gather_into(v, &mut out[..]);
        Ok(out)
    }

    fn host_all_to_all<T: Wire>(&self, v: &[T]) -> Result<Vec<T>> {
        let mut out = vec![T::default(); v.len()];
        let _g = self.lock()?;
        self.comm()?.all_to_all_into(v, &mut out[..]);
        Ok(out)
    }

    fn host_broadcast<T: Wire>(&self, mut v: Vec<T>, root: i32) -> Result<Vec<T>> {
        let _g = self.lock()?;
        self.comm()?
            .process_at_rank(root)
            .broadcast_into(&mut v[..]);
        Ok(v)
    }

    // ---- immediate primitives (owned buffers; see module docs) ----

    fn start<T: Wire>(
        &self,
        data: Vec<T>,
        kind: Immediate,
        finish: Finish,
        out: DType,
    ) -> Result<CommHandle>
    where
        MpiPending<T>: PendingOp,
    {
        let recv_len = match kind {
            Immediate::AllGather => data.len() * self.size,
            _ => data.len(),
        };
        let guard = self.lock()?;
        let comm = self.comm()?;
        let (send, recv) = match kind {
            // Broadcast works in place on one buffer.
            Immediate::Broadcast(_) => (None, Box::into_raw(data.into_boxed_slice())),
            _ => (
                Some(Box::into_raw(data.into_boxed_slice())),
                Box::into_raw(vec![T::default(); recv_len].into_boxed_slice()),
            ),
        };
        // SAFETY: `send`/`recv` were just produced by `Box::into_raw`, so they are valid, aligned
        // and not aliased. The references handed to MPI are the only accesses until the request
        // completes; `MpiPending` frees the boxes only after `MPI_Wait` (module docs).
        let r: &'static mut [T] = unsafe { &mut *recv };
        let s: Option<&'static [T]> = send.map(|p| unsafe { &*p });
        let empty: &'static [T] = &[];
        let req: Request<'static, [T]> = match kind {
            Immediate::AllReduce => comm.immediate_all_reduce_into(
                StaticScope,
                s.unwrap_or(empty),
                r,
                SystemOperation::sum(),
            ),
            Immediate::AllGather => {
                comm.immediate_all_gather_into(StaticScope, s.unwrap_or(empty), r)
            }
            Immediate::AllToAll => {
                comm.immediate_all_to_all_into(StaticScope, s.unwrap_or(empty), r)
            }
            Immediate::Broadcast(root) => comm
                .process_at_rank(root)
                .immediate_broadcast_into(StaticScope, r),
        };
        drop(guard);
        Ok(CommHandle::pending(Box::new(MpiPending {
            req: Some(req),
            send,
            recv: Some(recv),
            finish,
            out,
            size: self.size,
        })))
    }

    fn start_host(
        &self,
        host: Host,
        kind: Immediate,
        finish: Finish,
        out: DType,
    ) -> Result<CommHandle> {
        with_host!(host, v => self.start(v, kind, finish, out))
    }
}

/// Which immediate collective to start.
#[derive(Debug, Clone, Copy)]
enum Immediate {
    AllReduce,
    AllGather,
    AllToAll,
    Broadcast(i32),
}

/// An in-flight immediate collective that owns its buffers (module docs).
struct MpiPending<T: Wire> {
    req: Option<Request<'static, [T]>>,
    send: Option<*mut [T]>,
    recv: Option<*mut [T]>,
    finish: Finish,
    out: DType,
    size: usize,
}

// SAFETY: the raw pointers are owned, heap-allocated buffers touched only by MPI (until completion)
// and by `complete` (after it); the request may be completed from any thread at
// MPI_THREAD_MULTIPLE, which `MpiComm::from_comm` checked.
unsafe impl<T: Wire> Send for MpiPending<T> {}

impl<T: Wire> MpiPending<T> {
    /// Wait for the request (if still live), free the send buffer and return the receive buffer.
    fn complete(&mut self) -> Vec<T> {
        if let Some(req) = self.req.take() {
            req.wait();
        }
        // SAFETY: the request has completed, so MPI no longer accesses the buffers, and the
        // references derived from these pointers died with the request. Each pointer came from
        // `Box::into_raw` and is taken out of its `Option` here, so it is reclaimed exactly once.
        if let Some(p) = self.send.take() {
            drop(unsafe { Box::from_raw(p) });
        }
        match self.recv.take() {
            Some(p) => unsafe { Box::from_raw(p) }.into_vec(),
            None => Vec::new(),
        }
    }
}

impl<T: Wire> PendingOp for MpiPending<T> {
    fn wait(mut self: Box<Self>) -> Result<Tensor> {
        let v = self.complete();
        self.finish.apply(v, self.size, self.out)
    }
}

impl<T: Wire> Drop for MpiPending<T> {
    fn drop(&mut self) {
        // A handle dropped without `wait`: complete the collective before freeing its buffers.
        drop(self.complete());
    }
}

impl Communicator for MpiComm {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn backend_name(&self) -> &'static str {
        "mpi"
    }

    fn all_reduce(&self, x: &Tensor, op: ReduceOp) -> Result<Tensor> {
        let (host, out) = self.to_host(x)?;
        let finish = Finish::Reduce {
            dims: x.dims().to_vec(),
            avg: op == ReduceOp::Avg,
        };
        with_host!(host, v => finish.apply(self.host_all_reduce(&v)?, self.size, out))
    }

    fn all_gather(&self, x: &Tensor, dim: usize) -> Result<Tensor> {
        check_dim(x, dim, "all_gather", self.rank)?;
        let (host, out) = self.to_host(x)?;
        let finish = Finish::Gather {
            per_rank: x.dims().to_vec(),
            dim,
        };
        with_host!(host, v => finish.apply(self.host_all_gather(&v)?, self.size, out))
    }

    fn all_to_all(&self, x: &Tensor, split_dim: usize, concat_dim: usize) -> Result<Tensor> {
        check_all_to_all(x, split_dim, concat_dim, self.size, self.rank)?;
        let (packed, chunk) = pack_all_to_all(x, split_dim, self.size)?;
        let (host, out) = self.to_host(&packed)?;
        let finish = Finish::AllToAll { chunk, concat_dim };
        with_host!(host, v => finish.apply(self.host_all_to_all(&v)?, self.size, out))
    }

    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor> {
        let root = self.check_root(root)?;
        let (host, out) = self.to_host(x)?;
        let finish = Finish::Plain {
            dims: x.dims().to_vec(),
        };
        with_host!(host, v => finish.apply(self.host_broadcast(v, root)?, self.size, out))
    }

    fn barrier(&self) -> Result<()> {
        let _g = self.lock()?;
        self.comm()?.barrier();
        Ok(())
    }

    fn start_all_reduce(&self, x: &Tensor, op: ReduceOp) -> Result<CommHandle> {
        let (host, out) = self.to_host(x)?;
        let finish = Finish::Reduce {
            dims: x.dims().to_vec(),
            avg: op == ReduceOp::Avg,
        };
        self.start_host(host, Immediate::AllReduce, finish, out)
    }

    fn start_all_gather(&self, x: &Tensor, dim: usize) -> Result<CommHandle> {
        check_dim(x, dim, "all_gather", self.rank)?;
        let (host, out) = self.to_host(x)?;
        let finish = Finish::Gather {
            per_rank: x.dims().to_vec(),
            dim,
        };
        self.start_host(host, Immediate::AllGather, finish, out)
    }

    fn start_all_to_all(
        &self,
        x: &Tensor,
        split_dim: usize,
        concat_dim: usize,
    ) -> Result<CommHandle> {
        check_all_to_all(x, split_dim, concat_dim, self.size, self.rank)?;
        let (packed, chunk) = pack_all_to_all(x, split_dim, self.size)?;
        let (host, out) = self.to_host(&packed)?;
        let finish = Finish::AllToAll { chunk, concat_dim };
        self.start_host(host, Immediate::AllToAll, finish, out)
    }

    fn start_broadcast(&self, x: &Tensor, root: usize) -> Result<CommHandle> {
        let root = self.check_root(root)?;
        let (host, out) = self.to_host(x)?;
        let finish = Finish::Plain {
            dims: x.dims().to_vec(),
        };
        self.start_host(host, Immediate::Broadcast(root), finish, out)
    }

    fn all_reduce_host_f64(&self, values: &[f64], op: ReduceOp) -> Result<Vec<f64>> {
        let mut out = self.host_all_reduce(values)?;
        if op == ReduceOp::Avg {
            out.iter_mut().for_each(|x| *x = x.div_by(self.size));
        }
        Ok(out)
    }

    fn reduce_host_f64_to_root(
        &self,
        values: &[f64],
        op: ReduceOp,
        root: usize,
    ) -> Result<Option<Vec<f64>>> {
        let root_i = self.check_root(root)?;
        let _g = self.lock()?;
        let proc = self.comm()?.process_at_rank(root_i);
        if self.rank == root {
            let mut out = vec![0.0f64; values.len()];
            proc.reduce_into_root(values, &mut out[..], SystemOperation::sum());
            if op == ReduceOp::Avg {
                out.iter_mut().for_each(|x| *x = x.div_by(self.size));
            }
            Ok(Some(out))
        } else {
            proc.reduce_into(values, SystemOperation::sum());
            Ok(None)
        }
    }

    fn split(&self, color: usize, key: usize) -> Result<Arc<dyn Communicator>> {
        let c =
            i32::try_from(color).map_err(|_| comm_err(self.rank, "split color overflows i32"))?;
        let k = i32::try_from(key).map_err(|_| comm_err(self.rank, "split key overflows i32"))?;
        let sub = {
            let _g = self.lock()?;
            self.comm()?
                .split_by_color_with_key(Color::with_value(c), k)
                .ok_or_else(|| comm_err(self.rank, "MPI_Comm_split returned no communicator"))?
        };
        let label = format!("{}/split{color}", self.label);
        Ok(Arc::new(MpiComm::from_comm(sub, label)?))
    }
}
