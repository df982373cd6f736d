//! `ParallelCtx`: the process topology, created once per process from MPI (rsmpi over Open MPI) and
//! passed down explicitly. Works as a singleton (plain `ferrofold ...`, world size 1) and under
//! `mpirun -np N` / `srun --mpi=pmix`.
//!
//! Failure policy: in a multi-rank job a panic on any rank prints its message (with the rank) and calls
//! `MPI_Abort`, so the whole job goes down instead of the other ranks hanging in a collective. MPI's
//! default error handler (`MPI_ERRORS_ARE_FATAL`) does the same for a failed collective.

use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::*;

use crate::error::{Error, Result};

/// Where the topology came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopologySource {
    /// MPI world communicator (mpirun, srun --mpi=pmix, or a singleton).
    Mpi,
}

impl std::fmt::Display for TopologySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TopologySource::Mpi => write!(f, "mpi"),
        }
    }
}

/// Rank layout of this job. Create with [`ParallelCtx::init`] once per process.
pub struct ParallelCtx {
    // Field order matters for drop: communicators must be freed before the universe finalises MPI.
    world: SimpleCommunicator,
    node: SimpleCommunicator,
    /// Global rank in `0..world_size`.
    pub rank: usize,
    pub world_size: usize,
    /// Rank among the processes on this node (used to pick the GPU).
    pub local_rank: usize,
    pub local_size: usize,
    /// Index of this node among the job's nodes, and their number.
    pub node_index: usize,
    pub num_nodes: usize,
    pub hostname: String,
    pub source: TopologySource,
    _universe: Universe,
}

impl std::fmt::Debug for ParallelCtx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParallelCtx")
            .field("rank", &self.rank)
            .field("world_size", &self.world_size)
            .field("local_rank", &self.local_rank)
            .field("local_size", &self.local_size)
            .field("node_index", &self.node_index)
            .field("num_nodes", &self.num_nodes)
            .field("hostname", &self.hostname)
            .field("source", &self.source)
            .finish()
    }
}

impl ParallelCtx {
    /// Initialise MPI (thread level `Multiple`, so loader/eval threads may coexist) and read the
    /// topology. MPI can be initialised only once per process: a second call is an error.
    pub fn init() -> Result<Self> {
        let (universe, _level) = mpi::initialize_with_threading(mpi::Threading::Multiple)
            .ok_or_else(|| Error::Comm {
                rank: 0,
                msg: "MPI is already initialised in this process (ParallelCtx::init must be called once)"
                    .into(),
            })?;
        let world = universe.world();
        let rank = to_usize(world.rank());
        let world_size = to_usize(world.size());
        // Processes sharing memory = processes on one node.
        let node = world.split_shared(rank as i32);
        let local_rank = to_usize(node.rank());
        let local_size = to_usize(node.size());
        // Number the nodes: each node leader contributes 1; node index = leaders with lower rank.
        let is_leader: i64 = i64::from(local_rank == 0);
        let mut num_nodes = 0i64;
        world.all_reduce_into(&is_leader, &mut num_nodes, SystemOperation::sum());
        let mut leaders_upto = 0i64;
        world.scan_into(&is_leader, &mut leaders_upto, SystemOperation::sum());
        // Every rank of a node takes its leader's index (the leader has local rank 0).
        let mut node_index = leaders_upto - 1;
        node.process_at_rank(0).broadcast_into(&mut node_index);
        let hostname = mpi::environment::processor_name().unwrap_or_else(|_| "unknown".into());
        let ctx = ParallelCtx {
            world,
            node,
            rank,
            world_size,
            local_rank,
            local_size,
            node_index: to_usize(node_index as i32),
            num_nodes: to_usize(num_nodes as i32),
            hostname,
            source: TopologySource::Mpi,
            _universe: universe,
        };
        if world_size > 1 {
            install_abort_on_panic(rank);
        }
        Ok(ctx)
    }

    /// True on global rank 0.
    pub fn is_root(&self) -> bool {
        self.rank == 0
    }

    /// The MPI world communicator (for the communicator backends).
    pub fn world(&self) -> &SimpleCommunicator {
        &self.world
    }

    /// The node-local communicator.
    pub fn node_comm(&self) -> &SimpleCommunicator {
        &self.node
    }

    /// Element-wise sum over all ranks (small host buffers: preflight checks, metrics).
    pub fn all_reduce_sum_f64(&self, values: &[f64]) -> Vec<f64> {
        let mut out = vec![0.0; values.len()];
        self.world
            .all_reduce_into(values, &mut out[..], SystemOperation::sum());
        out
    }

    /// Maximum over all ranks of a u64 (e.g. agreement checks).
    pub fn all_reduce_max_u64(&self, value: u64) -> u64 {
        let mut out = 0u64;
        self.world
            .all_reduce_into(&value, &mut out, SystemOperation::max());
        out
    }

    /// Minimum over all ranks of a u64.
    pub fn all_reduce_min_u64(&self, value: u64) -> u64 {
        let mut out = 0u64;
        self.world
            .all_reduce_into(&value, &mut out, SystemOperation::min());
        out
    }

    /// Block until every rank arrives.
    pub fn barrier(&self) {
        self.world.barrier();
    }

    /// Abort the whole job (all ranks) with `code`. Never returns.
    pub fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }

    /// One line describing this rank.
    pub fn describe(&self) -> String {
        format!(
            "rank {}/{} local_rank {}/{} node {}/{} host {} (topology: {})",
            self.rank,
            self.world_size,
            self.local_rank,
            self.local_size,
            self.node_index,
            self.num_nodes,
            self.hostname,
            self.source
        )
    }
}

fn to_usize(v: i32) -> usize {
    usize::try_from(v).unwrap_or(0)
}

/// In a multi-rank job, a panic on one rank must take the whole job down: print the panic (with the
/// rank), then `MPI_Abort(MPI_COMM_WORLD)`.
fn install_abort_on_panic(rank: usize) {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        eprintln!("[rank {rank}] fatal: panic, aborting the MPI job");
        default_hook(info);
        // SAFETY: MPI is initialised (this hook is installed after init) and MPI_Abort may be called
        // from any thread at thread level Multiple. It does not return.
        unsafe {
            mpi::ffi::MPI_Abort(mpi::ffi::RSMPI_COMM_WORLD, 70);
        }
    }));
}
