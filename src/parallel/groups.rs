//! Process groups: the world as a grid of data-parallel (DP) × DAP groups.
//!
//! With `parallel.dap_size = d` and world size `W` (`d` must divide `W`):
//! - DAP groups are `d` consecutive ranks: group `g = rank / d`, rank in it `rank % d`.
//! - DP groups stride by `d`: ranks with the same `rank % d`; DP rank `rank / d`, `W / d` of them.
//!
//! Example, `W = 4, d = 2`: DAP groups {0,1} {2,3}; DP groups {0,2} {1,3}.

use std::sync::Arc;

use candle_core::Device;

use super::comm::Communicator;
use super::ctx::ParallelCtx;
use super::mpi_backend::MpiComm;
use crate::config::{CommBackend, ParallelConfig};
use crate::error::{Error, Result};

/// Position of one rank in the DP × DAP grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GridCoords {
    pub rank: usize,
    pub world_size: usize,
    /// Ranks per DAP group.
    pub dap_size: usize,
    /// Rank inside its DAP group (`rank % dap_size`).
    pub dap_rank: usize,
    /// Number of DP replicas (`world_size / dap_size`) = size of each DP group.
    pub dp_size: usize,
    /// Rank inside its DP group = index of its DAP group (`rank / dap_size`).
    pub dp_rank: usize,
}

impl GridCoords {
    /// Lay out `world_size` ranks as `dp_size × dap_size`; error if `dap_size` does not divide it.
    pub fn new(rank: usize, world_size: usize, dap_size: usize) -> Result<Self> {
        if dap_size == 0 || !world_size.is_multiple_of(dap_size) {
            return Err(Error::config(
                "resolved",
                "parallel.dap_size",
                format!(
                    "dap_size {dap_size} must be >= 1 and divide the world size {world_size} \
                     (world = data-parallel groups × DAP groups)"
                ),
            ));
        }
        if rank >= world_size {
            return Err(Error::Comm {
                rank,
                msg: format!("rank {rank} out of range for world size {world_size}"),
            });
        }
        Ok(Self {
            rank,
            world_size,
            dap_size,
            dap_rank: rank % dap_size,
            dp_size: world_size / dap_size,
            dp_rank: rank / dap_size,
        })
    }

    /// World ranks of this rank's DAP group, in DAP-rank order.
    pub fn dap_members(&self) -> Vec<usize> {
        let base = self.dp_rank * self.dap_size;
        (base..base + self.dap_size).collect()
    }

    /// World ranks of this rank's DP group, in DP-rank order.
    pub fn dp_members(&self) -> Vec<usize> {
        (0..self.dp_size)
            .map(|i| i * self.dap_size + self.dap_rank)
            .collect()
    }
}

/// Communicators for the world, this rank's DAP group and its DP group.
#[derive(Debug, Clone)]
pub struct ProcessGroups {
    pub coords: GridCoords,
    pub world: Arc<dyn Communicator>,
    /// The `dap_size` ranks that shard one sample's activations.
    pub dap: Arc<dyn Communicator>,
    /// The `dp_size` ranks holding the same DAP shard of different samples (gradient averaging).
    pub dp: Arc<dyn Communicator>,
}

impl ProcessGroups {
    /// Build the grid over the MPI world from `cfg.dap_size` (collective over the world) for
    /// CPU tensors: [`ProcessGroups::with_device`] on the CPU.
    pub fn new(ctx: &ParallelCtx, cfg: &ParallelConfig) -> Result<Self> {
        Self::with_device(ctx, cfg, &Device::Cpu)
    }

    /// Build the grid for tensors on `device` (collective over the world). `cfg.backend`:
    /// `auto` = NCCL on a CUDA device (`cuda` builds), MPI on the CPU; `nccl` requires a CUDA
    /// device; `mpi` requires the CPU (the MPI backend carries CPU tensors only). With NCCL every
    /// group (world, DAP, DP) gets its own NCCL communicator; CPU tensors and host values still
    /// travel over MPI.
    pub fn with_device(ctx: &ParallelCtx, cfg: &ParallelConfig, device: &Device) -> Result<Self> {
        // Validate before any collective so that every rank fails the same way.
        GridCoords::new(ctx.rank, ctx.world_size, cfg.dap_size)?;
        let world: Arc<dyn Communicator> = match (cfg.backend, device.is_cpu()) {
            (CommBackend::Auto | CommBackend::Mpi, true) => MpiComm::world(ctx)?,
            (CommBackend::Nccl, true) => {
                return Err(Error::config(
                    "resolved",
                    "parallel.backend",
                    "the NCCL backend needs a CUDA device (train.device); use `mpi` or `auto` on the CPU",
                ))
            }
            (CommBackend::Mpi, false) => {
                return Err(Error::config(
                    "resolved",
                    "parallel.backend",
                    "the MPI backend carries CPU tensors only; use `nccl` or `auto` on a GPU",
                ))
            }
            (CommBackend::Auto | CommBackend::Nccl, false) => nccl_world(ctx, device)?,
        };
        Self::from_world(world, cfg.dap_size)
    }

    /// Build the grid over any world communicator (collective over it).
    pub fn from_world(world: Arc<dyn Communicator>, dap_size: usize) -> Result<Self> {
        let coords = GridCoords::new(world.rank(), world.size(), dap_size)?;
        // Both splits are issued on every rank in the same order (ordering rule).
        let dap = world.split(coords.dp_rank, coords.dap_rank)?;
        let dp = world.split(coords.dap_rank, coords.dp_rank)?;
        if dap.size() != coords.dap_size
            || dap.rank() != coords.dap_rank
            || dp.size() != coords.dp_size
            || dp.rank() != coords.dp_rank
        {
            return Err(Error::Comm {
                rank: coords.rank,
                msg: format!(
                    "group split mismatch: dap {}/{} dp {}/{} vs expected {coords:?}",
                    dap.rank(),
                    dap.size(),
                    dp.rank(),
                    dp.size()
                ),
            });
        }
        Ok(Self {
            coords,
            world,
            dap,
            dp,
        })
    }
}

/// The NCCL world communicator on `device`.
#[cfg(feature = "cuda")]
fn nccl_world(ctx: &ParallelCtx, device: &Device) -> Result<Arc<dyn Communicator>> {
    Ok(super::nccl_backend::NcclComm::world(ctx, device)?)
}

#[cfg(not(feature = "cuda"))]
fn nccl_world(_ctx: &ParallelCtx, _device: &Device) -> Result<Arc<dyn Communicator>> {
    Err(Error::config(
        "resolved",
        "parallel.backend",
        "this binary was built without the `cuda` feature: no NCCL backend",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grid_4x2() {
        let c: Vec<GridCoords> = (0..4).map(|r| GridCoords::new(r, 4, 2).unwrap()).collect();
        assert_eq!(c[0].dap_members(), vec![0, 1]);
        assert_eq!(c[3].dap_members(), vec![2, 3]);
        assert_eq!(c[0].dp_members(), vec![0, 2]);
        assert_eq!(c[3].dp_members(), vec![1, 3]);
        assert_eq!((c[2].dap_rank, c[2].dp_rank, c[2].dp_size), (0, 1, 2));
        // every rank appears in exactly one DAP and one DP group, at its own index
        for x in &c {
            assert_eq!(x.dap_members()[x.dap_rank], x.rank);
            assert_eq!(x.dp_members()[x.dp_rank], x.rank);
        }
    }

    #[test]
    fn dap_must_divide_world() {
        let e = GridCoords::new(0, 4, 3).unwrap_err().to_string();
        assert!(e.contains("parallel.dap_size"), "{e}");
        assert!(GridCoords::new(0, 4, 0).is_err());
        let one = GridCoords::new(0, 1, 1).unwrap();
        assert_eq!((one.dp_size, one.dap_size), (1, 1));
    }
}
