//! Parallel runtime: process topology (MPI bootstrap), communicators, process groups, data
//! parallelism and DAP.
//!
//! - [`ctx`]: `ParallelCtx`, MPI initialisation and the abort-on-panic policy.
//! - [`comm`]: the [`Communicator`] trait (blocking + async collectives over candle tensors) and the
//!   collective ordering rule.
//! - [`mpi_backend`]: [`MpiComm`], the MPI implementation for CPU tensors.
//! - `nccl_backend` (`cuda` builds): `NcclComm`, the NCCL implementation for CUDA tensors (one NCCL
//!   communicator per group, unique ids broadcast over MPI, collectives on a communication stream
//!   ordered with CUDA events), selected by [`ProcessGroups::with_device`] on a GPU.
//! - [`groups`]: the DP × DAP grid ([`ProcessGroups`], [`GridCoords`]) from `parallel.dap_size`.
//! - [`ddp`]: bucketed gradient all-reduce ([`GradSync`]), global grad norm, metric averaging.
//! - [`dap`]: DAP collectives as differentiable ops ([`Dap`]), padding helpers.
//! - [`dap_evoformer`]: the Evoformer stack sharded over a DAP group ([`DapEvoformer`]).
//! - `dap_manual`: the graph-free sharded block forward and its hand-written backward
//!   (`model.backward = "manual"`).
//! - [`dap_remat`]: training forward/backward of the DAP stacks with activation recomputation
//!   (`model.remat`; [`DapEvoformerTape`], [`DapExtraMsaTape`]).

pub mod collective;
pub mod comm;
pub mod ctx;
pub mod dap;
pub mod dap_evoformer;
mod dap_manual;
pub mod dap_remat;
pub mod ddp;
pub mod groups;
pub mod mpi_backend;
#[cfg(feature = "cuda")]
pub mod nccl_backend;

pub use collective::GroupCollective;
pub use comm::{CommHandle, Communicator, PendingOp, ReduceOp};
pub use ctx::{ParallelCtx, TopologySource};
pub use dap::{pad_mask, pad_to_multiple, padded_len, unpad, Dap, DapPending};
pub use dap_evoformer::{DapEvoformer, DapExtraMsa, DapLayout};
pub use dap_manual::profile as dap_profile;
pub use dap_remat::{DapEvoformerTape, DapExtraMsaTape};
pub use ddp::{dap_grad_scale, global_grad_norm, mean_to_root, sorted_grads, GradSync};
pub use groups::{GridCoords, ProcessGroups};
pub use mpi_backend::MpiComm;
#[cfg(feature = "cuda")]
pub use nccl_backend::NcclComm;
