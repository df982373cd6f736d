//! `ParallelCtx`: the process topology, created once per process from MPI (rsmpi over Open MPI) and
//! passed down explicitly. Works as a singleton (plain `ferrofold ...`, world size 1) and under
//! `mpirun -np N` / `srun --mpi=pmix`.
//!
//! Failure policy: in a multi-rank job a panic on any rank prints its message (with the rank) and calls
//! `MPI_Abort`, so the whole job goes down instead of the other ranks hanging in a collective. MPI's
//! default error handler (`MPI_ERRORS_ARE_FATAL`) does the same for a failed collective.
//!
//! Slurm fallback: when MPI reports a world of 1 but this process is one task of a multi-task srun
//! step (`SLURM_STEP_ID` set, `SLURM_STEP_NUM_TASKS`/`SLURM_NTASKS` > 1), srun started the tasks
//! without a PMI the MPI library understands (e.g. `srun --mpi=none` with an MPI that then falls
//! back to a singleton). The topology is then read from Slurm's variables ([`slurm_topology`],
//! [`TopologySource::Slurm`]) so logs and GPU selection are right, but no collective can work:
//! [`ParallelCtx::require_collectives`] fails, and with it `ferrofold info --check`. (The batch shell
//! itself also sees `SLURM_NTASKS` > 1 but has no `SLURM_STEP_ID`: a plain `ferrofold` there is a
//! genuine singleton.)

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
    /// Slurm's task variables, because MPI saw a world of 1 inside a multi-task srun step: every rank
    /// is an MPI singleton and no collective is possible.
    Slurm,
}

impl std::fmt::Display for TopologySource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TopologySource::Mpi => write!(f, "mpi"),
            TopologySource::Slurm => write!(f, "slurm env"),
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
        let mut ctx = ParallelCtx {
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
        if world_size == 1 {
            if let Some(t) = slurm_topology(|k| std::env::var(k).ok())? {
                ctx.rank = t.rank;
                ctx.world_size = t.world_size;
                ctx.local_rank = t.local_rank;
                ctx.local_size = t.local_size;
                ctx.node_index = t.node_index;
                ctx.num_nodes = t.num_nodes;
                ctx.source = TopologySource::Slurm;
                // Logging is not set up yet (it needs the rank): say it on stderr, on every rank.
                eprintln!(
                    "[rank {}/{}] warning: topology from {}: {}",
                    ctx.rank,
                    ctx.world_size,
                    ctx.source,
                    ctx.describe()
                );
            }
        }
        if ctx.world_size > 1 {
            install_abort_on_panic(ctx.rank);
        }
        Ok(ctx)
    }

    /// True on global rank 0.
    pub fn is_root(&self) -> bool {
        self.rank == 0
    }

    /// Ok when the ranks are connected by MPI. Err (a clear message) under the Slurm fallback, where
    /// `world_size` > 1 but every process is an MPI singleton: any collective would silently reduce
    /// over one rank. Communicator backends and the preflight call this first.
    pub fn require_collectives(&self) -> Result<()> {
        match self.source {
            TopologySource::Mpi => Ok(()),
            TopologySource::Slurm => Err(Error::Comm {
                rank: self.rank,
                msg: format!(
                    "topology from slurm env ({} tasks) but the MPI world is 1: no collectives \
                     possible; launch with `srun --mpi=pmix` (Open MPI is PMIx-only) or `mpirun`",
                    self.world_size
                ),
            }),
        }
    }

    /// The MPI world communicator (for the communicator backends). Under the Slurm fallback it has
    /// size 1, unlike `world_size`: check [`ParallelCtx::require_collectives`] first.
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
        let note = match self.source {
            TopologySource::Mpi => "",
            TopologySource::Slurm => {
                "; MPI world is 1: no collectives possible; launch with srun --mpi=pmix or mpirun"
            }
        };
        format!(
            "rank {}/{} local_rank {}/{} node {}/{} host {} (topology: {}{note})",
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

/// A rank layout read from Slurm's task variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlurmTopology {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub local_size: usize,
    pub node_index: usize,
    pub num_nodes: usize,
}

/// The topology of this process from Slurm's environment (`get` looks a variable up; pass
/// `|k| std::env::var(k).ok()`), or `None` when this is not one task of a multi-task srun step.
///
/// A task of an srun step has `SLURM_STEP_ID`; the batch shell has `SLURM_NTASKS` (the job's)
/// but no step id, and is not one of the job's tasks. Step values win over job values:
/// tasks `SLURM_STEP_NUM_TASKS` (else `SLURM_NTASKS`), nodes `SLURM_STEP_NUM_NODES` (else
/// `SLURM_NNODES`), rank `SLURM_PROCID`, local rank `SLURM_LOCALID`, node `SLURM_NODEID`; tasks on
/// this node from `SLURM_STEP_TASKS_PER_NODE` (`2(x3),1` = 2,2,2,1), else an even split.
/// Malformed or inconsistent values are an error naming the variable.
pub fn slurm_topology(get: impl Fn(&str) -> Option<String>) -> Result<Option<SlurmTopology>> {
    if get("SLURM_STEP_ID").is_none() {
        return Ok(None);
    }
    let num =
        |names: &[&str]| -> Result<Option<usize>> {
            for name in names {
                if let Some(v) = get(name) {
                    return v.trim().parse::<usize>().map(Some).map_err(|_| {
                        Error::Msg(format!("slurm env: {name}={v:?} is not a number"))
                    });
                }
            }
            Ok(None)
        };
    let world_size = match num(&["SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"])? {
        Some(n) if n > 1 => n,
        _ => return Ok(None),
    };
    let need = |name: &str| -> Result<usize> {
        num(&[name])?.ok_or_else(|| Error::Msg(format!("slurm env: {name} is not set")))
    };
    let rank = need("SLURM_PROCID")?;
    let local_rank = need("SLURM_LOCALID")?;
    let node_index = need("SLURM_NODEID")?;
    let num_nodes = num(&["SLURM_STEP_NUM_NODES", "SLURM_NNODES"])?
        .unwrap_or(1)
        .max(1);
    if rank >= world_size {
        return Err(Error::Msg(format!(
            "slurm env: SLURM_PROCID={rank} is not below the task count {world_size}"
        )));
    }
    if node_index >= num_nodes {
        return Err(Error::Msg(format!(
            "slurm env: SLURM_NODEID={node_index} is not below the node count {num_nodes}"
        )));
    }
    let local_size = match get("SLURM_STEP_TASKS_PER_NODE") {
        Some(spec) => {
            let per_node = parse_tasks_per_node(&spec)?;
            *per_node.get(node_index).ok_or_else(|| {
                Error::Msg(format!(
                    "slurm env: SLURM_STEP_TASKS_PER_NODE={spec:?} has no entry for node {node_index}"
                ))
            })?
        }
        None => world_size.div_ceil(num_nodes),
    };
    if local_rank >= local_size {
        return Err(Error::Msg(format!(
            "slurm env: SLURM_LOCALID={local_rank} is not below the tasks on this node ({local_size})"
        )));
    }
    Ok(Some(SlurmTopology {
        rank,
        world_size,
        local_rank,
        local_size,
        node_index,
        num_nodes,
    }))
}

/// Expand Slurm's compressed per-node counts: `2(x3),1` → `[2, 2, 2, 1]`.
fn parse_tasks_per_node(spec: &str) -> Result<Vec<usize>> {
    let bad = || Error::Msg(format!("slurm env: bad SLURM_STEP_TASKS_PER_NODE {spec:?}"));
    let mut out = Vec::new();
    for part in spec.split(',') {
        let part = part.trim();
        let (count, repeat) = match part.split_once("(x") {
            Some((c, r)) => (c, r.strip_suffix(')').ok_or_else(bad)?),
            None => (part, "1"),
        };
        let count: usize = count.parse().map_err(|_| bad())?;
        let repeat: usize = repeat.parse().map_err(|_| bad())?;
        out.extend(std::iter::repeat_n(count, repeat));
    }
    Ok(out)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let m: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| m.get(k).cloned()
    }

    /// What srun sets for task 1 of `srun -n2` on one node (captured from Slurm 22.05).
    const STEP_TASK1: &[(&str, &str)] = &[
        ("SLURM_LOCALID", "1"),
        ("SLURM_NNODES", "1"),
        ("SLURM_NODEID", "0"),
        ("SLURM_NTASKS", "2"),
        ("SLURM_PROCID", "1"),
        ("SLURM_STEPID", "0"),
        ("SLURM_STEP_ID", "0"),
        ("SLURM_STEP_NUM_NODES", "1"),
        ("SLURM_STEP_NUM_TASKS", "2"),
        ("SLURM_STEP_TASKS_PER_NODE", "2"),
    ];

    #[test]
    fn srun_step_task_gives_its_topology() {
        let t = slurm_topology(env(STEP_TASK1)).unwrap().unwrap();
        assert_eq!(
            t,
            SlurmTopology {
                rank: 1,
                world_size: 2,
                local_rank: 1,
                local_size: 2,
                node_index: 0,
                num_nodes: 1
            }
        );
    }

    #[test]
    fn batch_shell_and_plain_processes_are_not_slurm_tasks() {
        // The batch shell of `sbatch -n2` (captured): job-wide counts, no step id.
        let batch = env(&[
            ("SLURM_LOCALID", "0"),
            ("SLURM_NNODES", "1"),
            ("SLURM_NODEID", "0"),
            ("SLURM_NTASKS", "2"),
            ("SLURM_PROCID", "0"),
        ]);
        assert_eq!(slurm_topology(batch).unwrap(), None);
        assert_eq!(slurm_topology(env(&[])).unwrap(), None);
        // A one-task step is a genuine singleton.
        let one = env(&[
            ("SLURM_STEP_ID", "3"),
            ("SLURM_STEP_NUM_TASKS", "1"),
            ("SLURM_NTASKS", "4"),
            ("SLURM_PROCID", "0"),
            ("SLURM_LOCALID", "0"),
            ("SLURM_NODEID", "0"),
        ]);
        assert_eq!(slurm_topology(one).unwrap(), None);
    }

    #[test]
    fn multi_node_step_reads_tasks_on_its_node() {
        // 7 tasks on 3 nodes laid out 3,3,1; this is task 6 on node 2.
        let t = slurm_topology(env(&[
            ("SLURM_STEP_ID", "0"),
            ("SLURM_STEP_NUM_TASKS", "7"),
            ("SLURM_STEP_NUM_NODES", "3"),
            ("SLURM_STEP_TASKS_PER_NODE", "3(x2),1"),
            ("SLURM_PROCID", "6"),
            ("SLURM_LOCALID", "0"),
            ("SLURM_NODEID", "2"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((t.rank, t.world_size), (6, 7));
        assert_eq!((t.local_rank, t.local_size), (0, 1));
        assert_eq!((t.node_index, t.num_nodes), (2, 3));
        // Without the per-node layout: an even split (job-level variables as the fallback).
        let t = slurm_topology(env(&[
            ("SLURM_STEP_ID", "0"),
            ("SLURM_NTASKS", "8"),
            ("SLURM_NNODES", "2"),
            ("SLURM_PROCID", "5"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NODEID", "1"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!((t.local_size, t.num_nodes, t.world_size), (4, 2, 8));
    }

    #[test]
    fn tasks_per_node_expansion() {
        assert_eq!(parse_tasks_per_node("2").unwrap(), vec![2]);
        assert_eq!(
            parse_tasks_per_node("4(x2),2,1(x3)").unwrap(),
            vec![4, 4, 2, 1, 1, 1]
        );
        for bad in ["", "x", "2(x", "2(xa)", "2(x2", "-1"] {
            assert!(parse_tasks_per_node(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn malformed_or_inconsistent_values_name_the_variable() {
        let with = |k: &str, v: &str| {
            let mut pairs: Vec<(&str, &str)> = STEP_TASK1
                .iter()
                .filter(|(n, _)| *n != k)
                .copied()
                .collect();
            pairs.push((k, v));
            slurm_topology(env(&pairs)).unwrap_err().to_string()
        };
        assert!(with("SLURM_PROCID", "one").contains("SLURM_PROCID"));
        assert!(with("SLURM_PROCID", "2").contains("SLURM_PROCID=2"));
        assert!(with("SLURM_NODEID", "1").contains("SLURM_NODEID=1"));
        assert!(with("SLURM_LOCALID", "2").contains("SLURM_LOCALID=2"));
        assert!(with("SLURM_STEP_TASKS_PER_NODE", "2(x").contains("SLURM_STEP_TASKS_PER_NODE"));
        let missing: Vec<(&str, &str)> = STEP_TASK1
            .iter()
            .filter(|(n, _)| *n != "SLURM_LOCALID")
            .copied()
            .collect();
        let e = slurm_topology(env(&missing)).unwrap_err().to_string();
        assert!(e.contains("SLURM_LOCALID is not set"), "{e}");
    }
}
