//! Data parallelism: bucketed gradient all-reduce, global gradient norm, metric averaging.
//!
//! Gradients are a list of `(name, grad)` sorted by name (the same order on every rank, since
//! `VarMap` iteration order differs between processes). They are flattened, concatenated in that
//! order and cut into buckets of `bucket_bytes` (a bucket may end inside a tensor, and may hold many
//! small tensors). Buckets are started as asynchronous all-reduces in order (at most
//! `MAX_IN_FLIGHT` at once) and waited in order, so packing of bucket `k+1` overlaps the transfer
//! of bucket `k`; the results are concatenated and unflattened into the original shapes.
//!
//! With DAP, parameters used inside the DAP-sharded region receive only this shard's part of their
//! gradient (the DAP ops' backward passes keep each rank's *own* contribution, see [`super::dap`]);
//! their true gradient is the sum over the DAP group. Parameters used only in replicated compute
//! (before `scatter` / after `gather`) already hold the full gradient on every DAP rank. One world
//! all-reduce (sum) then handles both with a per-parameter scale:
//! replicated: `1 / world_size` (mean over the `dap_size` identical copies and the DP replicas);
//! DAP-sharded: `1 / dp_size` (sum over the DAP shards, mean over the DP replicas).
//! See [`GradSync::all_reduce_scaled`] and [`dap_grad_scale`]. Without DAP both are `1 / world`.

use std::sync::Arc;

use candle_core::{DType, Tensor, Var};

use super::comm::{Communicator, ReduceOp};
use crate::error::{Error, Result};

/// Buckets in flight at once in [`GradSync`].
const MAX_IN_FLIGHT: usize = 4;

/// Bucketed gradient all-reduce over one communicator (the DP group, or the world with DAP).
#[derive(Debug, Clone)]
pub struct GradSync {
    comm: Arc<dyn Communicator>,
    bucket_bytes: usize,
}

impl GradSync {
    /// Buckets of `bucket_mib` MiB (`parallel.bucket_mib`).
    pub fn new(comm: Arc<dyn Communicator>, bucket_mib: usize) -> Self {
        Self::with_bucket_bytes(comm, bucket_mib.max(1) << 20)
    }

    /// Buckets of `bucket_bytes` bytes (at least one element).
    pub fn with_bucket_bytes(comm: Arc<dyn Communicator>, bucket_bytes: usize) -> Self {
        Self { comm, bucket_bytes }
    }

    pub fn comm(&self) -> &Arc<dyn Communicator> {
        &self.comm
    }

    /// Average the gradients over the communicator (data parallelism without DAP).
    pub fn all_reduce_mean(&self, grads: &[(String, Tensor)]) -> Result<Vec<(String, Tensor)>> {
        self.reduce(grads, ReduceOp::Avg, &|_| 1.0)
    }

    /// Sum the gradients over the communicator, then multiply each by `scale(name)`
    /// (for DAP: [`dap_grad_scale`]).
    pub fn all_reduce_scaled(
        &self,
        grads: &[(String, Tensor)],
        scale: &dyn Fn(&str) -> f64,
    ) -> Result<Vec<(String, Tensor)>> {
        self.reduce(grads, ReduceOp::Sum, scale)
    }

    fn reduce(
        &self,
        grads: &[(String, Tensor)],
        op: ReduceOp,
        scale: &dyn Fn(&str) -> f64,
    ) -> Result<Vec<(String, Tensor)>> {
        if grads.is_empty() {
            return Ok(Vec::new());
        }
        check_sorted(grads)?;
        let dtype = grads[0].1.dtype();
        if let Some((name, g)) = grads.iter().find(|(_, g)| g.dtype() != dtype) {
            return Err(Error::Train(format!(
                "gradient all-reduce needs one dtype: {name} is {:?}, {} is {dtype:?}",
                g.dtype(),
                grads[0].0
            )));
        }
        let flats: Vec<Tensor> = grads
            .iter()
            .map(|(_, g)| g.flatten_all())
            .collect::<candle_core::Result<_>>()?;
        let flat = Tensor::cat(&flats, 0)?;
        drop(flats);
        let total = flat.dims1()?;
        let per_bucket = (self.bucket_bytes / dtype.size_in_bytes()).max(1);
        // Issue buckets in order, keeping at most MAX_IN_FLIGHT in flight (bounded extra memory),
        // and complete them in order.
        let mut pending = std::collections::VecDeque::with_capacity(MAX_IN_FLIGHT + 1);
        let mut reduced = Vec::with_capacity(total.div_ceil(per_bucket));
        let mut off = 0;
        while off < total {
            let len = per_bucket.min(total - off);
            pending.push_back(self.comm.start_all_reduce(&flat.narrow(0, off, len)?, op)?);
            off += len;
            if pending.len() > MAX_IN_FLIGHT {
                if let Some(h) = pending.pop_front() {
                    reduced.push(h.wait()?);
                }
            }
        }
        while let Some(h) = pending.pop_front() {
            reduced.push(h.wait()?);
        }
        let reduced = Tensor::cat(&reduced, 0)?;
        let mut out = Vec::with_capacity(grads.len());
        let mut off = 0;
        for (name, g) in grads {
            let n = g.elem_count();
            let mut t = reduced.narrow(0, off, n)?.reshape(g.shape())?;
            let s = scale(name);
            if s != 1.0 {
                t = t.affine(s, 0.0)?;
            }
            out.push((name.clone(), t));
            off += n;
        }
        Ok(out)
    }
}

/// Error unless names are strictly increasing (sorted, no duplicates).
fn check_sorted(grads: &[(String, Tensor)]) -> Result<()> {
    for w in grads.windows(2) {
        if w[0].0 >= w[1].0 {
            return Err(Error::Train(format!(
                "gradients must be sorted by name without duplicates: {:?} before {:?}",
                w[0].0, w[1].0
            )));
        }
    }
    Ok(())
}

/// Per-parameter scale for [`GradSync::all_reduce_scaled`] over the *world* with DAP:
/// `dap_size / world_size` for parameters used in the DAP-sharded region (their per-rank gradients
/// are partial sums), `1 / world_size` for parameters used only in replicated compute.
pub fn dap_grad_scale(sharded: bool, dap_size: usize, world_size: usize) -> f64 {
    if sharded {
        dap_size as f64 / world_size as f64
    } else {
        1.0 / world_size as f64
    }
}

/// The sorted `(name, grad)` list of `vars` from a backward pass; a variable without a gradient
/// (unused this step) gets zeros so that every rank reduces the same buffers.
pub fn sorted_grads(
    vars: &[(String, Var)],
    store: &candle_core::backprop::GradStore,
) -> Result<Vec<(String, Tensor)>> {
    let mut out: Vec<(String, Tensor)> = vars
        .iter()
        .map(|(name, v)| {
            let g = match store.get(v.as_tensor()) {
                Some(g) => g.clone(),
                None => v.as_tensor().zeros_like()?,
            };
            Ok((name.clone(), g))
        })
        .collect::<Result<_>>()?;
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// L2 norm of all gradients together (call after the all-reduce: every rank then gets the same
/// value without further communication). Accumulated in f64: on a CUDA device with fused kernels
/// enabled by the fused multi-tensor kernel ([`crate::kernels::grad_norm`], f64 squares and
/// sums, one launch pair and one device-to-host copy), elsewhere (and for tensors the kernel
/// cannot take) with candle ops on f64 copies.
pub fn global_grad_norm(grads: &[(String, Tensor)]) -> Result<f64> {
    let all: Vec<&Tensor> = grads.iter().map(|(_, g)| g).collect();
    let (mut sum, rest) = crate::kernels::grad_norm::fused_sum_sq(&all)?;
    for g in rest {
        sum += g
            .to_dtype(DType::F64)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f64>()?;
    }
    Ok(sum.sqrt())
}

/// Average small host vectors (loss, metrics) over the communicator onto `root`:
/// `Some(mean)` on root, `None` elsewhere.
pub fn mean_to_root(
    comm: &dyn Communicator,
    values: &[f64],
    root: usize,
) -> Result<Option<Vec<f64>>> {
    comm.reduce_host_f64_to_root(values, ReduceOp::Avg, root)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn sorted_grads_orders_and_zero_fills() {
        let a = Var::new(&[1.0f64, 2.0], &Device::Cpu).unwrap();
        let b = Var::new(&[3.0f64], &Device::Cpu).unwrap();
        // only `a` takes part: d/da sum(a^2) = 2a
        let store = a
            .as_tensor()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let vars = vec![("z.b".to_string(), b), ("a.a".to_string(), a)];
        let g = sorted_grads(&vars, &store).unwrap();
        assert_eq!(g[0].0, "a.a");
        assert_eq!(g[1].0, "z.b");
        assert_eq!(g[0].1.to_vec1::<f64>().unwrap(), vec![2.0, 4.0]);
        assert_eq!(g[1].1.to_vec1::<f64>().unwrap(), vec![0.0]);
        let n = global_grad_norm(&g).unwrap();
        assert!((n - 20f64.sqrt()).abs() < 1e-15);
        assert!(check_sorted(&[g[1].clone(), g[0].clone()]).is_err());
        assert!(check_sorted(&[g[0].clone(), g[0].clone()]).is_err());
    }

    #[test]
    fn dap_scale() {
        // world 4 = 2 DP x 2 DAP: sharded sum over 2 DAP shards, mean over 2 replicas
        assert_eq!(dap_grad_scale(true, 2, 4), 0.5);
        assert_eq!(dap_grad_scale(false, 2, 4), 0.25);
    }
}
