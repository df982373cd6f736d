//! The trainer's [`Collective`] over MPI process groups: gradient averaging for data parallelism
//! (with the DAP scale rule of [`super::ddp`]) and agreement on flags.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::comm::ReduceOp;
use super::ddp::{dap_grad_scale, GradSync};
use super::groups::ProcessGroups;
use crate::error::Result;
use crate::train::optim::Grads;
use crate::train::task::Collective;

/// Gradients are reduced once per step over the world: parameters used inside DAP-sharded compute
/// (named in `sharded`) are summed over their DAP group and averaged over DP replicas; all others
/// are averaged over the world. Without DAP this is a plain world average.
pub struct GroupCollective {
    groups: Arc<ProcessGroups>,
    sync: GradSync,
    sharded: BTreeSet<String>,
}

impl GroupCollective {
    /// `bucket_mib`: all-reduce bucket size (`parallel.bucket_mib`). `sharded`: names of parameters
    /// whose gradient is a per-DAP-shard partial sum (empty without DAP).
    pub fn new(groups: Arc<ProcessGroups>, bucket_mib: usize, sharded: BTreeSet<String>) -> Self {
        let sync = GradSync::new(groups.world.clone(), bucket_mib);
        Self {
            groups,
            sync,
            sharded,
        }
    }

    pub fn groups(&self) -> &Arc<ProcessGroups> {
        &self.groups
    }
}

impl Collective for GroupCollective {
    fn rank(&self) -> usize {
        self.groups.world.rank()
    }

    fn world_size(&self) -> usize {
        self.groups.world.size()
    }

    fn all_reduce_grads(&self, grads: &mut Grads) -> Result<()> {
        let world = self.world_size();
        if world == 1 {
            return Ok(());
        }
        let dap = self.groups.coords.dap_size;
        // BTreeMap iteration = sorted names: the same order on every rank.
        let list: Vec<(String, candle_core::Tensor)> =
            grads.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let reduced = self.sync.all_reduce_scaled(&list, &|name| {
            dap_grad_scale(self.sharded.contains(name), dap, world)
        })?;
        for (name, g) in reduced {
            grads.insert(name, g);
        }
        Ok(())
    }

    fn any(&self, flag: bool) -> Result<bool> {
        let v = self
            .groups
            .world
            .all_reduce_host_f64(&[f64::from(u8::from(flag))], ReduceOp::Sum)?;
        Ok(v.first().copied().unwrap_or(0.0) > 0.0)
    }
}
