//! Parallel runtime: process topology (MPI bootstrap), communicators, process groups, data
//! parallelism and DAP.
//!
//! - [`ctx`]: `ParallelCtx`, MPI initialisation and the abort-on-panic policy.
//! - [`comm`]: the [`Communicator`] trait (blocking + async collectives over candle tensors) and the
//!   collective ordering rule.
//! - [`mpi_backend`]: [`MpiComm`], the MPI implementation for CPU tensors.
//!   The NCCL backend for CUDA tensors is a `TODO(cuda)` (see [`comm`] for how it fits).
//! - [`groups`]: the DP × DAP grid ([`ProcessGroups`], [`GridCoords`]) from `parallel.dap_size`.
//! - [`ddp`]: bucketed gradient all-reduce ([`GradSync`]), global grad norm, metric averaging.
//! - [`dap`]: DAP collectives as differentiable ops ([`Dap`]), padding helpers.
//! - [`dap_evoformer`]: the Evoformer stack sharded over a DAP group ([`DapEvoformer`]).
//! - [`dap_remat`]: training forward/backward of the DAP stacks with activation recomputation
//!   (`model.remat`; [`DapEvoformerTape`], [`DapExtraMsaTape`]).

pub mod collective;
pub mod comm;
pub mod ctx;
pub mod dap;
pub mod dap_evoformer;
pub mod dap_remat;
pub mod ddp;
pub mod groups;
pub mod mpi_backend;
// TODO(cuda): `#[cfg(feature = "cuda")] pub mod nccl_backend;` with `NcclComm: Communicator` for
// CUDA tensors (one NCCL communicator per ProcessGroups group, unique ids broadcast over MPI,
// collectives on a communication stream, `PendingOp::wait` = compute stream waits on an event;
// see `comm` docs), selected in `ProcessGroups::new` for `parallel.backend = nccl | auto` on GPU.

pub use collective::GroupCollective;
pub use comm::{CommHandle, Communicator, PendingOp, ReduceOp};
pub use ctx::{ParallelCtx, TopologySource};
pub use dap::{pad_mask, pad_to_multiple, padded_len, unpad, Dap, DapPending};
pub use dap_evoformer::{DapEvoformer, DapExtraMsa, DapLayout};
pub use dap_remat::{DapEvoformerTape, DapExtraMsaTape};
pub use ddp::{dap_grad_scale, global_grad_norm, mean_to_root, sorted_grads, GradSync};
pub use groups::{GridCoords, ProcessGroups};
pub use mpi_backend::MpiComm;
