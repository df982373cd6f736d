//! Dynamic Axial Parallelism (DAP, FastFold, Cheng et al. 2022): collectives as differentiable ops.
//!
//! Inside a DAP group of `n` ranks the activations of one sample are sharded along one axis.
//! Parameters are replicated. Compute outside the sharded region (input embedding before
//! [`Dap::scatter`], structure module and losses after [`Dap::gather`]) is replicated: every rank
//! computes the same values and the same loss `L`.
//!
//! # Gradient convention (the invariant the backward passes keep)
//! After backward, each rank holds, for every tensor `T` of the graph:
//! - if `T` is replicated: the full true gradient `∂L/∂T` (identical on all ranks);
//! - if `T` is a shard `T_r` of a sharded tensor: the true gradient of its own shard, `∂L/∂T_r`.
//!
//! With that invariant the backward rules follow from the chain rule:
//! - `scatter(X, dim)`: `X_r = chunk_r(X)`. `∂L/∂X = concat_r(∂L/∂X_r)` (the chunks are disjoint
//!   slices of `X`): each rank has one chunk, so **bwd = all_gather along `dim`**.
//! - `gather(X_r, dim)`: `Y = concat_r(X_r)` on every rank, then replicated compute of the *same*
//!   `L` on every rank. `∂L/∂X_r = chunk_r(∂L/∂Y)`, and `∂L/∂Y` is already complete on every rank,
//!   so **bwd = keep the own chunk** (no communication). A reduce-scatter here would be wrong:
//!   it would sum `n` identical copies and give `n · ∂L/∂X_r`. (Reduce-scatter is the right
//!   backward only when each rank computes a *different* loss term `L_r` with `L = Σ_r L_r`,
//!   which this framework does not do.)
//! - `gather_sharded(X_r, dim)` ([`Dap::gather_sharded`]): the same all-gather, but the full `Y`
//!   feeds *sharded* compute (rank `q` uses it to produce its own shard, e.g. the pair bias of MSA
//!   row attention in the DAP Evoformer), so rank `q` holds only its term `G_q` of
//!   `∂L/∂Y = Σ_q G_q`: **bwd = reduce-scatter** (all-reduce sum, keep the own chunk).
//! - `row_to_col` / `col_to_row`: an all-to-all is a permutation of the elements across ranks, so
//!   its adjoint is the inverse permutation: **bwd = the inverse all-to-all** (split and concat
//!   dims swapped).
//! - A replicated parameter `θ` used on shards: `∂L/∂θ = Σ_r (∂L/∂θ through shard r)`; each rank's
//!   autograd sees only its own term, so such gradients must be **summed over the DAP group**
//!   (done once per step together with the DP average: [`super::ddp::dap_grad_scale`]).
//!   Parameters used only in replicated compute already hold the full gradient.
//!
//! # Collective order
//! Forward ops issue their collective when applied; backward ops issue theirs when candle's
//! backward reaches them. candle walks the graph in an order determined by the graph's structure
//! only, so identical graphs on all ranks of the group (same model, same shapes) issue the same
//! collectives in the same order. Every rank must therefore build the same graph, and a tensor that
//! needs a gradient on one rank must need it on all.
//!
//! # Duality async
//! `start_row_to_col` / `start_col_to_row` / `start_gather` issue the all-to-all (all-gather) now
//! and return a [`DapPending`]; compute that does not depend on the result can run before
//! [`DapPending::wait`], which completes the transfer and returns a tensor that autograd sees as
//! the op's output (its backward is the same synchronous inverse collective).
//!
//! # Uneven sizes
//! All sharded dims must be divisible by `n`: pad with [`pad_to_multiple`] (zeros), mask padded
//! positions where they would change results (softmax keys, means) with [`pad_mask`], and drop them
//! with [`unpad`] after the final `gather`.

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

use super::comm::{check_all_to_all, check_dim, comm_err, CommHandle, Communicator, ReduceOp};
use crate::config::Overlap;
use crate::error::Result;

/// DAP collectives over one DAP group.
#[derive(Debug, Clone)]
pub struct Dap {
    comm: Arc<dyn Communicator>,
    overlap: Overlap,
}

#[derive(Debug, Clone, Copy)]
enum Kind {
    Scatter { dim: usize },
    Gather { dim: usize },
    GatherSharded { dim: usize },
    AllToAll { split_dim: usize, concat_dim: usize },
}

impl Dap {
    /// DAP over `comm` with duality-async overlap.
    pub fn new(comm: Arc<dyn Communicator>) -> Self {
        Self::with_overlap(comm, Overlap::DualityAsync)
    }

    /// DAP over `comm`; with `Overlap::Off` (`parallel.overlap = "off"`) the `start_*` methods run
    /// the collective to completion at once (same results, no overlap: for debugging/timing).
    pub fn with_overlap(comm: Arc<dyn Communicator>, overlap: Overlap) -> Self {
        Self { comm, overlap }
    }

    /// Ranks in the DAP group.
    pub fn size(&self) -> usize {
        self.comm.size()
    }

    /// This rank's index in the DAP group (= which shard it holds).
    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    pub fn comm(&self) -> &Arc<dyn Communicator> {
        &self.comm
    }

    /// Replicated → sharded: keep this rank's chunk of `dim` (bwd: all_gather).
    pub fn scatter(&self, x: &Tensor, dim: usize) -> Result<Tensor> {
        self.check_divisible(x, dim, "scatter")?;
        self.apply(x, Kind::Scatter { dim }, None)
    }

    /// Sharded → replicated: all_gather along `dim` (bwd: keep the own chunk; module docs).
    pub fn gather(&self, x: &Tensor, dim: usize) -> Result<Tensor> {
        check_dim(x, dim, "gather", self.rank())?;
        self.apply(x, Kind::Gather { dim }, None)
    }

    /// Sharded → full copy that feeds *sharded* compute (rank-local work producing this rank's
    /// shard, e.g. the pair bias of MSA row attention or the triangle-multiplication operand
    /// inside the DAP Evoformer): all_gather along `dim`; bwd = reduce-scatter (all-reduce sum, keep
    /// the own chunk), since each rank's gradient of the full copy is only its own shard's
    /// contribution (module docs: unlike [`Dap::gather`], whose output feeds replicated compute).
    pub fn gather_sharded(&self, x: &Tensor, dim: usize) -> Result<Tensor> {
        check_dim(x, dim, "gather_sharded", self.rank())?;
        self.apply(x, Kind::GatherSharded { dim }, None)
    }

    /// Sharded along `row_dim` → sharded along `col_dim` (all_to_all split `col_dim`, concat
    /// `row_dim`); bwd: [`Dap::col_to_row`].
    pub fn row_to_col(&self, x: &Tensor, row_dim: usize, col_dim: usize) -> Result<Tensor> {
        self.all_to_all(x, col_dim, row_dim, None)
    }

    /// Sharded along `col_dim` → sharded along `row_dim`; bwd: [`Dap::row_to_col`].
    pub fn col_to_row(&self, x: &Tensor, row_dim: usize, col_dim: usize) -> Result<Tensor> {
        self.all_to_all(x, row_dim, col_dim, None)
    }

    /// Asynchronous [`Dap::row_to_col`]: issue now, [`DapPending::wait`] later.
    pub fn start_row_to_col(
        &self,
        x: &Tensor,
        row_dim: usize,
        col_dim: usize,
    ) -> Result<DapPending> {
        self.start_all_to_all(x, col_dim, row_dim)
    }

    /// Asynchronous [`Dap::col_to_row`].
    pub fn start_col_to_row(
        &self,
        x: &Tensor,
        row_dim: usize,
        col_dim: usize,
    ) -> Result<DapPending> {
        self.start_all_to_all(x, row_dim, col_dim)
    }

    /// Asynchronous [`Dap::gather`].
    pub fn start_gather(&self, x: &Tensor, dim: usize) -> Result<DapPending> {
        check_dim(x, dim, "gather", self.rank())?;
        let x = x.contiguous()?;
        let handle = if self.size() == 1 {
            CommHandle::ready(x.clone())
        } else if self.overlap == Overlap::Off {
            CommHandle::ready(self.comm.all_gather(&x, dim)?)
        } else {
            self.comm.start_all_gather(&x, dim)?
        };
        Ok(DapPending {
            dap: self.clone(),
            x,
            kind: Kind::Gather { dim },
            handle,
        })
    }

    fn start_all_to_all(
        &self,
        x: &Tensor,
        split_dim: usize,
        concat_dim: usize,
    ) -> Result<DapPending> {
        check_all_to_all(x, split_dim, concat_dim, self.size(), self.rank())?;
        let x = x.contiguous()?;
        let handle = if self.size() == 1 {
            CommHandle::ready(x.clone())
        } else if self.overlap == Overlap::Off {
            CommHandle::ready(self.comm.all_to_all(&x, split_dim, concat_dim)?)
        } else {
            self.comm.start_all_to_all(&x, split_dim, concat_dim)?
        };
        Ok(DapPending {
            dap: self.clone(),
            x,
            kind: Kind::AllToAll {
                split_dim,
                concat_dim,
            },
            handle,
        })
    }

    fn all_to_all(
        &self,
        x: &Tensor,
        split_dim: usize,
        concat_dim: usize,
        ready: Option<Tensor>,
    ) -> Result<Tensor> {
        check_all_to_all(x, split_dim, concat_dim, self.size(), self.rank())?;
        self.apply(
            x,
            Kind::AllToAll {
                split_dim,
                concat_dim,
            },
            ready,
        )
    }

    fn check_divisible(&self, x: &Tensor, dim: usize, what: &str) -> Result<()> {
        check_dim(x, dim, what, self.rank())?;
        if self.size() == 0 || !x.dims()[dim].is_multiple_of(self.size()) {
            return Err(comm_err(
                self.rank(),
                format!(
                    "dap {what}: dim {dim} of shape {:?} is not divisible by dap_size {} (use pad_to_multiple)",
                    x.dims(),
                    self.size()
                ),
            ));
        }
        Ok(())
    }

    /// Apply the op as a candle `CustomOp1` (so autograd records it). A group of one rank is the
    /// identity. `ready` is the already-computed forward result (async path).
    fn apply(&self, x: &Tensor, kind: Kind, ready: Option<Tensor>) -> Result<Tensor> {
        if self.size() == 1 {
            return Ok(x.clone());
        }
        let x = x.contiguous()?;
        let mut op = DapOp {
            comm: self.comm.clone(),
            kind,
            ready: Mutex::new(ready),
        };
        // Off the CPU the collective runs here, on tensors (the NCCL backend is stream-ordered);
        // the op's `cuda_fwd` then only hands the result to autograd.
        if !x.device().is_cpu() && matches!(op.ready.get_mut(), Ok(r) if r.is_none()) {
            let out = op.forward(&x)?;
            op.ready = Mutex::new(Some(out));
        }
        Ok(x.apply_op1(op)?)
    }
}

/// Graph-free forms of the collectives (no autograd node), for the hand-written DAP backward
/// (`super::dap_manual`): the caller applies each forward collective's adjoint itself, with the
/// values of the differentiable ops' `bwd` (gather ↔ own chunk, gather_sharded ↔ group sum + own
/// chunk as a reduce-scatter, all-to-all ↔ the inverse all-to-all). A group of one rank:
/// identities.
impl Dap {
    /// All-gather along `dim` (the forward of [`Dap::gather`] / [`Dap::gather_sharded`]).
    pub fn all_gather_raw(&self, x: &Tensor, dim: usize) -> Result<Tensor> {
        check_dim(x, dim, "all_gather_raw", self.rank())?;
        if self.size() == 1 {
            return Ok(x.clone());
        }
        self.comm.all_gather(&x.contiguous()?, dim)
    }

    /// Sum over the group, keep this rank's chunk of `dim` (a reduce-scatter): the adjoint of
    /// [`Dap::all_gather_raw`] when the gathered copy fed sharded compute (the value of
    /// [`Dap::gather_sharded`]'s backward, all-reduce + own chunk). Done as one all-to-all that
    /// brings every rank's chunk `r` to rank `r` (in the activation dtype: a quarter of the bytes
    /// of a bf16 all-reduce, which runs in f32 on the wire), then summed locally in rank order
    /// (f32 accumulation for 16-bit floats, rounded once, as the all-reduce; for two ranks the
    /// result is bitwise the all-reduce's).
    pub fn reduce_own_chunk(&self, x: &Tensor, dim: usize) -> Result<Tensor> {
        check_dim(x, dim, "reduce_own_chunk", self.rank())?;
        let n = self.size();
        if n == 1 {
            return Ok(x.clone());
        }
        // [1, .., D, ..] → all-to-all (split D, concat the new axis) → [n, .., D/n, ..]: entry q
        // is rank q's chunk `rank`.
        let parts = self
            .comm
            .all_to_all(&x.unsqueeze(0)?.contiguous()?, dim + 1, 0)?;
        let dt = x.dtype();
        let acc = match dt {
            DType::BF16 | DType::F16 => parts.to_dtype(DType::F32)?,
            _ => parts,
        };
        let mut sum = acc.get(0)?;
        for q in 1..n {
            sum = (sum + acc.get(q)?)?;
        }
        Ok(sum.to_dtype(dt)?.contiguous()?)
    }

    /// This rank's chunk of `dim` (the adjoint of [`Dap::gather`]; no communication).
    pub fn own_chunk(&self, x: &Tensor, dim: usize) -> Result<Tensor> {
        own_chunk(x, dim, self.rank(), self.size().max(1))
    }

    /// All-to-all (split `split_dim`, concat `concat_dim`); its adjoint is the same call with the
    /// dims swapped.
    pub fn all_to_all_raw(
        &self,
        x: &Tensor,
        split_dim: usize,
        concat_dim: usize,
    ) -> Result<Tensor> {
        check_all_to_all(x, split_dim, concat_dim, self.size(), self.rank())?;
        if self.size() == 1 {
            return Ok(x.clone());
        }
        self.comm
            .all_to_all(&x.contiguous()?, split_dim, concat_dim)
    }

    /// Asynchronous [`Dap::all_to_all_raw`] (duality async; completes at once with
    /// `parallel.overlap = off`).
    pub fn start_all_to_all_raw(
        &self,
        x: &Tensor,
        split_dim: usize,
        concat_dim: usize,
    ) -> Result<CommHandle> {
        check_all_to_all(x, split_dim, concat_dim, self.size(), self.rank())?;
        let x = x.contiguous()?;
        if self.size() == 1 {
            Ok(CommHandle::ready(x))
        } else if self.overlap == Overlap::Off {
            Ok(CommHandle::ready(
                self.comm.all_to_all(&x, split_dim, concat_dim)?,
            ))
        } else {
            self.comm.start_all_to_all(&x, split_dim, concat_dim)
        }
    }
}

/// A DAP collective in flight (duality async). Dropping it completes the transfer.
#[must_use = "call wait() to get the result"]
pub struct DapPending {
    dap: Dap,
    x: Tensor,
    kind: Kind,
    handle: CommHandle,
}

impl DapPending {
    /// Complete the collective; the result is differentiable with respect to the input.
    pub fn wait(self) -> Result<Tensor> {
        let out = self.handle.wait()?;
        self.dap.apply(&self.x, self.kind, Some(out))
    }
}

/// This rank's chunk of `dim` (size must divide it).
fn own_chunk(x: &Tensor, dim: usize, rank: usize, size: usize) -> Result<Tensor> {
    let c = x.dims()[dim] / size;
    Ok(x.narrow(dim, rank * c, c)?)
}

/// The autograd node of one DAP collective.
struct DapOp {
    comm: Arc<dyn Communicator>,
    kind: Kind,
    /// Forward result computed ahead of time (async path); taken by `cpu_fwd`.
    ready: Mutex<Option<Tensor>>,
}

fn to_candle(e: crate::error::Error) -> candle_core::Error {
    match e {
        crate::error::Error::Candle(c) => c,
        other => candle_core::Error::Msg(other.to_string()),
    }
}

impl DapOp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (rank, size) = (self.comm.rank(), self.comm.size());
        match self.kind {
            Kind::Scatter { dim } => own_chunk(x, dim, rank, size),
            Kind::Gather { dim } | Kind::GatherSharded { dim } => self.comm.all_gather(x, dim),
            Kind::AllToAll {
                split_dim,
                concat_dim,
            } => self.comm.all_to_all(x, split_dim, concat_dim),
        }
    }
}

impl CustomOp1 for DapOp {
    fn name(&self) -> &'static str {
        match self.kind {
            Kind::Scatter { .. } => "dap-scatter",
            Kind::Gather { .. } => "dap-gather",
            Kind::GatherSharded { .. } => "dap-gather-sharded",
            Kind::AllToAll { .. } => "dap-all-to-all",
        }
    }

    fn cpu_fwd(
        &self,
        storage: &CpuStorage,
        layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let ready = self
            .ready
            .lock()
            .map_err(|_| candle_core::Error::Msg("dap op: poisoned lock".into()))?
            .take();
        let out = match ready {
            Some(t) => t,
            None => {
                let x = cpu_tensor(storage, layout)?;
                self.forward(&x).map_err(to_candle)?
            }
        };
        into_cpu_storage(&out)
    }

    /// The forward result was computed by `Dap::apply` (or the async path) on the compute stream;
    /// return a copy of its storage (candle's custom ops must return owned storage).
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _storage: &candle_core::CudaStorage,
        _layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        use candle_core::backend::BackendStorage;
        let out = self
            .ready
            .lock()
            .map_err(|_| candle_core::Error::Msg("dap op: poisoned lock".into()))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("dap op: no precomputed CUDA result".into()))?
            .contiguous()?;
        // `try_clone` copies the whole underlying buffer: make sure it is exactly this tensor.
        let whole = {
            let (st, layout) = out.storage_and_layout();
            match &*st {
                candle_core::Storage::Cuda(cs) => {
                    layout.start_offset() == 0 && cuda_storage_len(cs) == out.elem_count()
                }
                _ => {
                    return Err(candle_core::Error::Msg(
                        "dap op: the communicator returned a non-CUDA tensor for a CUDA input"
                            .into(),
                    ))
                }
            }
        };
        let out = if whole { out } else { out.affine(1.0, 0.0)? };
        let (st, layout) = out.storage_and_layout();
        match &*st {
            candle_core::Storage::Cuda(cs) => Ok((cs.try_clone(layout)?, out.shape().clone())),
            _ => Err(candle_core::Error::Msg("dap op: non-CUDA result".into())),
        }
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (rank, size) = (self.comm.rank(), self.comm.size());
        let g = match self.kind {
            Kind::Scatter { dim } => self.comm.all_gather(&grad.contiguous()?, dim),
            Kind::Gather { dim } => own_chunk(grad, dim, rank, size),
            Kind::GatherSharded { dim } => self
                .comm
                .all_reduce(&grad.contiguous()?, ReduceOp::Sum)
                .and_then(|g| own_chunk(&g, dim, rank, size)),
            Kind::AllToAll {
                split_dim,
                concat_dim,
            } => self
                .comm
                .all_to_all(&grad.contiguous()?, concat_dim, split_dim),
        }
        .map_err(to_candle)?;
        Ok(Some(g))
    }
}

/// Elements in a CUDA storage buffer (`usize::MAX` for dtypes DAP does not carry).
#[cfg(feature = "cuda")]
fn cuda_storage_len(cs: &candle_core::CudaStorage) -> usize {
    use candle_core::cuda_backend::CudaStorageSlice as S;
    match &cs.slice {
        S::F32(s) => s.len(),
        S::F64(s) => s.len(),
        S::BF16(s) => s.len(),
        S::F16(s) => s.len(),
        _ => usize::MAX,
    }
}

/// A tensor (copy) of a CPU storage region.
fn cpu_tensor(storage: &CpuStorage, layout: &Layout) -> candle_core::Result<Tensor> {
    let (a, b) = layout
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg("dap op: non-contiguous input".into()))?;
    let shape = layout.shape();
    let dev = &Device::Cpu;
    match storage {
        CpuStorage::F32(v) => Tensor::from_slice(&v[a..b], shape, dev),
        CpuStorage::F64(v) => Tensor::from_slice(&v[a..b], shape, dev),
        CpuStorage::BF16(v) => Tensor::from_slice(&v[a..b], shape, dev),
        CpuStorage::F16(v) => Tensor::from_slice(&v[a..b], shape, dev),
        _ => Err(candle_core::Error::Msg(
            "dap op: only f32/f64/bf16/f16 tensors".into(),
        )),
    }
}

fn into_cpu_storage(t: &Tensor) -> candle_core::Result<(CpuStorage, Shape)> {
    let flat = t.flatten_all()?;
    let s = match t.dtype() {
        DType::F32 => CpuStorage::F32(flat.to_vec1()?),
        DType::F64 => CpuStorage::F64(flat.to_vec1()?),
        DType::BF16 => CpuStorage::BF16(flat.to_vec1()?),
        DType::F16 => CpuStorage::F16(flat.to_vec1()?),
        other => {
            return Err(candle_core::Error::Msg(format!(
                "dap op: unsupported dtype {other:?}"
            )))
        }
    };
    Ok((s, t.shape().clone()))
}

/// `n` rounded up to a multiple of `multiple`.
pub fn padded_len(n: usize, multiple: usize) -> usize {
    n.div_ceil(multiple.max(1)) * multiple.max(1)
}

/// Zero-pad `dim` at the end up to a multiple of `multiple` (the DAP size).
pub fn pad_to_multiple(x: &Tensor, dim: usize, multiple: usize) -> Result<Tensor> {
    let n = x.dims()[dim];
    let extra = padded_len(n, multiple) - n;
    if extra == 0 {
        Ok(x.clone())
    } else {
        Ok(x.pad_with_zeros(dim, 0, extra)?)
    }
}

/// `[padded_len(n, multiple)]` mask: 1 for the `n` real positions, 0 for padding.
pub fn pad_mask(n: usize, multiple: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let p = padded_len(n, multiple);
    let v: Vec<f32> = (0..p).map(|i| if i < n { 1.0 } else { 0.0 }).collect();
    Ok(Tensor::from_vec(v, p, device)?.to_dtype(dtype)?)
}

/// Drop the padding of `dim` (keep the first `n`).
pub fn unpad(x: &Tensor, dim: usize, n: usize) -> Result<Tensor> {
    Ok(x.narrow(dim, 0, n)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_helpers() {
        assert_eq!(padded_len(5, 2), 6);
        assert_eq!(padded_len(6, 4), 8);
        assert_eq!(padded_len(8, 4), 8);
        let x = Tensor::ones((3, 5), DType::F64, &Device::Cpu).unwrap();
        let p = pad_to_multiple(&x, 1, 4).unwrap();
        assert_eq!(p.dims(), &[3, 8]);
        let m = pad_mask(5, 4, DType::F64, &Device::Cpu).unwrap();
        assert_eq!(
            m.to_vec1::<f64>().unwrap(),
            vec![1., 1., 1., 1., 1., 0., 0., 0.]
        );
        // padded entries are zero, real ones untouched
        let row = p.get(0).unwrap().to_vec1::<f64>().unwrap();
        assert_eq!(row, m.to_vec1::<f64>().unwrap());
        assert_eq!(unpad(&p, 1, 5).unwrap().dims(), &[3, 5]);
    }
}
