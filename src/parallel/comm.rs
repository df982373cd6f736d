//! The `Communicator` trait: collectives over candle tensors, blocking and asynchronous.
//!
//! # Semantics
//! Every rank of a communicator passes a tensor of the same shape and dtype (f32, f64; bf16/f16 are
//! widened to f32 on the wire, exactly, and results are rounded back once, so gathers, all-to-alls
//! and broadcasts are exact and reductions are summed in f32). Results:
//! - `all_reduce(x, Sum|Avg)`: element-wise sum (or sum / size) over ranks, same shape.
//! - `all_gather(x, dim)`: the ranks' tensors concatenated along `dim` in rank order
//!   (`dim` grows by `size`).
//! - `all_to_all(x, split_dim, concat_dim)`: `x` is cut into `size` equal chunks along `split_dim`;
//!   chunk `j` goes to rank `j`; the chunks received from ranks `0..size` are concatenated along
//!   `concat_dim`. `split_dim` must be divisible by `size`. Its inverse is
//!   `all_to_all(y, concat_dim, split_dim)`.
//! - `broadcast(x, root)`: every rank gets root's `x` (non-root contents are ignored; the shape must
//!   match).
//!
//! # Order guarantee (the one rule)
//! Collectives on one communicator must be *issued* (blocking call, or `start_*`) in the same order
//! on every rank of it. MPI (and NCCL) match collectives by issue order per communicator, not by
//! name. An asynchronous collective is issued by `start_*`, not by `wait`: handles may be waited in
//! any order, later or from another thread, and a handle dropped without `wait` completes the
//! operation in its destructor (MPI backend), so a forgotten handle can never shift the matching of
//! later collectives. Each backend serialises issuing with a per-communicator lock so that issuing
//! from several threads is memory-safe; the *order* across threads is then whatever the lock gives,
//! which is not deterministic across ranks: issue all collectives of one communicator from one
//! thread (the training thread). Distinct communicators (DAP group, DP group) are independent.
//!
//! # Backends
//! - MPI (`super::mpi_backend::MpiComm`): CPU tensors; blocking MPI collectives and MPI-3 immediate
//!   collectives (owned buffers) for the async forms.
//! - NCCL (`super::nccl_backend::NcclComm`, `cuda` builds): CUDA tensors. `start_*` enqueues the
//!   NCCL call on a dedicated communication stream after an event recorded on the compute stream,
//!   and returns a `PendingOp` holding the inputs, the output and a completion event;
//!   `PendingOp::wait` makes the *compute stream* wait on that event (no host synchronisation) and
//!   returns the tensor, so the blocking forms are just `start_*(..)?.wait()` and stay
//!   stream-ordered. bf16/f16 travel natively except in reductions (f32, as above). CPU tensors
//!   and host values go through an MPI companion communicator. The shape helpers below
//!   (`assemble_gathered`, `pack_all_to_all`, `unpack_all_to_all`) are shared by both backends.

use std::sync::Arc;

use candle_core::{DType, Shape, Tensor};

use crate::error::{Error, Result};

/// Reduction for `all_reduce`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    Sum,
    /// Sum divided by the communicator size.
    Avg,
}

/// An in-flight collective. Backends implement it; users hold a [`CommHandle`].
pub trait PendingOp: Send {
    /// Complete the operation (MPI: block until done; NCCL: order the compute stream after it) and
    /// return its result.
    fn wait(self: Box<Self>) -> Result<Tensor>;
}

/// Handle of an asynchronous collective started by a `start_*` method. Call [`CommHandle::wait`]
/// to get the result. Dropping it without waiting completes the operation (and discards the
/// result) so the collective order stays consistent.
#[must_use = "a started collective must be waited on to get its result"]
pub struct CommHandle {
    inner: HandleInner,
}

enum HandleInner {
    Ready(Tensor),
    Pending(Box<dyn PendingOp>),
}

impl CommHandle {
    /// A handle whose result is already known (e.g. a collective over a single rank).
    pub fn ready(t: Tensor) -> Self {
        Self {
            inner: HandleInner::Ready(t),
        }
    }

    /// Wrap a backend's pending operation.
    pub fn pending(op: Box<dyn PendingOp>) -> Self {
        Self {
            inner: HandleInner::Pending(op),
        }
    }

    /// Complete the collective and return its result.
    pub fn wait(self) -> Result<Tensor> {
        match self.inner {
            HandleInner::Ready(t) => Ok(t),
            HandleInner::Pending(p) => p.wait(),
        }
    }
}

impl std::fmt::Debug for CommHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.inner {
            HandleInner::Ready(t) => write!(f, "CommHandle::Ready({:?})", t.shape()),
            HandleInner::Pending(_) => write!(f, "CommHandle::Pending"),
        }
    }
}

/// Collectives over a fixed group of ranks. See the module docs for semantics and the ordering
/// rule. Implementations are `Send + Sync` so they can be shared (`Arc`) with autograd ops.
pub trait Communicator: Send + Sync + std::fmt::Debug {
    /// This process's rank in the communicator.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn size(&self) -> usize;
    /// Backend name for logs ("mpi", "nccl").
    fn backend_name(&self) -> &'static str;

    fn all_reduce(&self, x: &Tensor, op: ReduceOp) -> Result<Tensor>;
    fn all_gather(&self, x: &Tensor, dim: usize) -> Result<Tensor>;
    fn all_to_all(&self, x: &Tensor, split_dim: usize, concat_dim: usize) -> Result<Tensor>;
    fn broadcast(&self, x: &Tensor, root: usize) -> Result<Tensor>;
    fn barrier(&self) -> Result<()>;

    /// Asynchronous forms: issue now, complete with [`CommHandle::wait`].
    fn start_all_reduce(&self, x: &Tensor, op: ReduceOp) -> Result<CommHandle>;
    fn start_all_gather(&self, x: &Tensor, dim: usize) -> Result<CommHandle>;
    fn start_all_to_all(
        &self,
        x: &Tensor,
        split_dim: usize,
        concat_dim: usize,
    ) -> Result<CommHandle>;
    fn start_broadcast(&self, x: &Tensor, root: usize) -> Result<CommHandle>;

    /// Element-wise reduction of a small host vector over all ranks (metrics, agreement checks).
    fn all_reduce_host_f64(&self, values: &[f64], op: ReduceOp) -> Result<Vec<f64>>;
    /// Element-wise reduction of a small host vector onto `root`: `Some` on root, `None` elsewhere.
    fn reduce_host_f64_to_root(
        &self,
        values: &[f64],
        op: ReduceOp,
        root: usize,
    ) -> Result<Option<Vec<f64>>>;

    /// Collective over this communicator: ranks passing the same `color` form a new communicator,
    /// ordered by `key` (ties by rank).
    fn split(&self, color: usize, key: usize) -> Result<Arc<dyn Communicator>>;
}

/// A communication error tagged with a rank.
pub(crate) fn comm_err(rank: usize, msg: impl Into<String>) -> Error {
    Error::Comm {
        rank,
        msg: msg.into(),
    }
}

/// Check that `dim` is a valid dimension of `x`.
pub(crate) fn check_dim(x: &Tensor, dim: usize, what: &str, rank: usize) -> Result<()> {
    if dim >= x.rank() {
        return Err(comm_err(
            rank,
            format!("{what}: dim {dim} out of range for shape {:?}", x.dims()),
        ));
    }
    Ok(())
}

/// Check the preconditions of `all_to_all` (dims in range, `split_dim` divisible by `size`).
pub(crate) fn check_all_to_all(
    x: &Tensor,
    split_dim: usize,
    concat_dim: usize,
    size: usize,
    rank: usize,
) -> Result<()> {
    check_dim(x, split_dim, "all_to_all split_dim", rank)?;
    check_dim(x, concat_dim, "all_to_all concat_dim", rank)?;
    if size == 0 || !x.dims()[split_dim].is_multiple_of(size) {
        return Err(comm_err(
            rank,
            format!(
                "all_to_all: split dim {split_dim} of shape {:?} is not divisible by the group size {size} \
                 (pad it with parallel::dap::pad_to_multiple)",
                x.dims()
            ),
        ));
    }
    Ok(())
}

/// Product of `dims[range]` (1 for an empty range).
fn prod(dims: &[usize]) -> usize {
    dims.iter().product()
}

/// The output dtype a backend computes in for `dt`: f32/f64 as is; bf16/f16 are carried as f32.
pub(crate) fn wire_dtype(dt: DType, rank: usize) -> Result<DType> {
    match dt {
        DType::F32 | DType::F64 => Ok(dt),
        DType::BF16 | DType::F16 => Ok(DType::F32),
        other => Err(comm_err(
            rank,
            format!("collectives support f32/f64/bf16/f16 tensors, got {other:?}"),
        )),
    }
}

/// All-gather reassembly: `stacked` is `[size, *per_rank]` (rank-major, as an all-gather of flat
/// buffers delivers it); returns the per-rank tensors concatenated along `dim`.
pub fn assemble_gathered(stacked: &Tensor, per_rank: &[usize], dim: usize) -> Result<Tensor> {
    let w = stacked.dims()[0];
    let pre = prod(&per_rank[..dim]);
    let d = per_rank[dim];
    let post = prod(&per_rank[dim + 1..]);
    let mut out_dims = per_rank.to_vec();
    out_dims[dim] *= w;
    // [w, pre, d, post] -> [pre, w, d, post] -> [pre, w*d, post]
    let t = stacked
        .reshape((w, pre, d, post))?
        .transpose(0, 1)?
        .contiguous()?
        .reshape(out_dims)?;
    Ok(t)
}

/// All-to-all send layout: cut `x` into `size` chunks along `split_dim` and stack them rank-major,
/// `[size, *chunk]`, contiguous. Returns the packed tensor and the chunk shape.
pub fn pack_all_to_all(x: &Tensor, split_dim: usize, size: usize) -> Result<(Tensor, Vec<usize>)> {
    let dims = x.dims();
    let pre = prod(&dims[..split_dim]);
    let c = dims[split_dim] / size;
    let post = prod(&dims[split_dim + 1..]);
    let mut chunk = dims.to_vec();
    chunk[split_dim] = c;
    // [pre, size, c, post] -> [size, pre, c, post]
    let packed = x
        .reshape((pre, size, c, post))?
        .transpose(0, 1)?
        .contiguous()?;
    Ok((packed, chunk))
}

/// All-to-all receive layout: `recv` holds `[size, *chunk]` (chunk `i` from rank `i`); returns the
/// chunks concatenated along `concat_dim`.
pub fn unpack_all_to_all(recv: &Tensor, chunk: &[usize], concat_dim: usize) -> Result<Tensor> {
    assemble_gathered(recv, chunk, concat_dim)
}

/// Shape of an `all_to_all` result.
pub fn all_to_all_shape(dims: &[usize], split_dim: usize, concat_dim: usize, size: usize) -> Shape {
    let mut out = dims.to_vec();
    out[split_dim] /= size;
    out[concat_dim] *= size;
    Shape::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn t(dims: &[usize], offset: f64) -> Tensor {
        let n: usize = dims.iter().product();
        let v: Vec<f64> = (0..n).map(|i| offset + i as f64).collect();
        Tensor::from_vec(v, dims, &Device::Cpu).unwrap()
    }

    #[test]
    fn assemble_matches_cat() {
        for dim in 0..3 {
            let parts: Vec<Tensor> = (0..3).map(|r| t(&[2, 3, 4], 100.0 * r as f64)).collect();
            let stacked = Tensor::stack(&parts, 0).unwrap();
            let got = assemble_gathered(&stacked, &[2, 3, 4], dim).unwrap();
            let want = Tensor::cat(&parts, dim).unwrap();
            let d = (got - want).unwrap().abs().unwrap().sum_all().unwrap();
            assert_eq!(d.to_scalar::<f64>().unwrap(), 0.0, "dim {dim}");
        }
    }

    /// Simulate an all-to-all over `w` ranks with pack/unpack and compare with the definition.
    #[test]
    fn all_to_all_layout_matches_definition() {
        let w = 2;
        for (split, concat) in [(0, 1), (1, 0), (2, 1), (1, 1), (0, 2)] {
            let dims = [4, 6, 2];
            let inputs: Vec<Tensor> = (0..w).map(|r| t(&dims, 1000.0 * r as f64)).collect();
            let packed: Vec<(Tensor, Vec<usize>)> = inputs
                .iter()
                .map(|x| pack_all_to_all(x, split, w).unwrap())
                .collect();
            for dst in 0..w {
                // rank dst receives chunk dst of every source, rank-major
                let recv: Vec<Tensor> = packed.iter().map(|(p, _)| p.get(dst).unwrap()).collect();
                let recv = Tensor::stack(&recv, 0).unwrap();
                let got = unpack_all_to_all(&recv, &packed[0].1, concat).unwrap();
                let c = dims[split] / w;
                let want: Vec<Tensor> = inputs
                    .iter()
                    .map(|x| x.narrow(split, dst * c, c).unwrap())
                    .collect();
                let want = Tensor::cat(&want, concat).unwrap();
                assert_eq!(got.dims(), want.dims());
                assert_eq!(got.dims(), all_to_all_shape(&dims, split, concat, w).dims());
                let d = (got - want).unwrap().abs().unwrap().sum_all().unwrap();
                assert_eq!(d.to_scalar::<f64>().unwrap(), 0.0);
            }
        }
    }
}
