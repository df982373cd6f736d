//! What the trainer needs from a model: the [`Task`] trait (parameters, one step's loss, a sample
//! source with a checkpointable position, evaluation), and from the process layout: the
//! [`Collective`] trait (gradient averaging, agreement on flags).
//!
//! The AF2 model implements [`Task`]; tests use [`crate::train::toy::ToyTask`].

use std::collections::BTreeMap;

use candle_core::Tensor;

use crate::error::Result;
use crate::train::optim::{Grads, Params};
use crate::train::seed::Rng;

/// Per-step inputs handed to [`Task::step_loss`].
#[derive(Debug)]
pub struct StepCtx {
    /// 0-based index of this optimizer step (= number of steps completed before it).
    pub step: u64,
    /// Learning rate that this step's update will use.
    pub lr: f64,
    /// Number of recycling iterations for this step (identical on every rank,
    /// [`crate::train::seed::recycles_for_step`]).
    pub num_recycles: usize,
    /// This rank's global rank.
    pub rank: usize,
    /// RNG for this rank and step (dropout masks, masking...), seeded with
    /// `seed_for(seed, "step", rank, step)`: a resumed run draws the same numbers.
    pub rng: Rng,
}

/// What one step's forward pass returns.
#[derive(Debug)]
pub struct StepOutput {
    /// Scalar loss (any float dtype), connected to the parameters' graph.
    pub loss: Tensor,
    /// Named loss terms and other per-step metrics, for the metrics log.
    pub metrics: BTreeMap<String, f64>,
    /// Gradients, when the task ran the backward itself (e.g. with activation recomputation);
    /// `None` lets the trainer call `loss.backward()`.
    pub grads: Option<crate::train::optim::Grads>,
}

/// A trainable task: a model, its loss and its sample source.
///
/// Contract:
/// - [`Task::params`] returns the fp32 master parameters, keyed by name (sorted); the same `Var`s on
///   every call. The trainer updates them in place (`Var::set`). A model built through
///   `VarBuilder::from_varmap` gets them with [`crate::train::optim::params_from_varmap`]. The forward
///   pass must read the `Var`s each time (no cached copies): evaluation swaps the EMA weights in.
/// - [`Task::step_loss`] draws the next sample(s) from the task's sample source and returns the loss.
///   All randomness must come from `ctx` (or from the data state), never from unseeded RNGs,
///   otherwise resumed runs are not reproducible.
/// - [`Task::data_state`] / [`Task::restore_data_state`] save and restore the sample source's
///   position as an opaque JSON value. In data-parallel runs only rank 0's value is checkpointed, so
///   it must describe the *global* position (e.g. global batches consumed) from which every rank
///   derives its own shard.
pub trait Task {
    /// Trainable parameters by name.
    fn params(&self) -> &Params;

    /// Forward pass and loss for one step.
    fn step_loss(&mut self, ctx: &StepCtx) -> Result<StepOutput>;

    /// Samples processed per rank per step (for samples/s).
    fn samples_per_step(&self) -> usize {
        1
    }

    /// Position of the sample source, for checkpoints.
    fn data_state(&self) -> Result<serde_json::Value>;

    /// Restore the sample source position from a checkpoint.
    fn restore_data_state(&mut self, state: &serde_json::Value) -> Result<()>;

    /// Evaluate the current parameters (the trainer swaps in the EMA weights first). Returns named
    /// metrics; `"lddt_ca"` (in [0, 1]) is used for the best checkpoint and the convergence target.
    fn evaluate(&mut self, _step: u64) -> Result<BTreeMap<String, f64>> {
        Ok(BTreeMap::new())
    }

    /// For `train.eval_mode = "async"`: a factory of an evaluator with its own model instance,
    /// run on a background thread with snapshots of the EMA weights. It must compute exactly what
    /// [`Task::evaluate`] computes with those weights swapped in. `None` (default): the trainer
    /// evaluates synchronously.
    fn evaluator(&self) -> Result<Option<crate::train::eval::EvaluatorFactory>> {
        Ok(None)
    }

    /// Combine the evaluations of all ranks (rank order) into the run's metrics, on rank 0. The
    /// default suits tasks where every rank evaluates everything: rank 0's own.
    fn merge_eval(&self, parts: Vec<BTreeMap<String, f64>>) -> BTreeMap<String, f64> {
        parts.into_iter().next().unwrap_or_default()
    }
}

/// The collective operations the trainer needs. Implemented over MPI/NCCL by the parallel module;
/// [`SingleProcess`] is the world of one.
pub trait Collective {
    /// This rank and the world size.
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Average the gradients over data-parallel replicas, in place, visiting names in sorted order.
    fn all_reduce_grads(&self, grads: &mut Grads) -> Result<()>;
    /// True on every rank when `flag` is true on any rank (stop requests, non-finite losses).
    fn any(&self, flag: bool) -> Result<bool>;
    /// Collect one JSON value per rank on rank 0 (`Some`, in rank order; `None` elsewhere). Used
    /// for per-rank data-loader positions in checkpoints. Collective: every rank calls it.
    fn gather_to_root(&self, value: serde_json::Value) -> Result<Option<Vec<serde_json::Value>>>;
}

/// One process, no communication.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_grads(&self, _grads: &mut Grads) -> Result<()> {
        Ok(())
    }
    fn any(&self, flag: bool) -> Result<bool> {
        Ok(flag)
    }
    fn gather_to_root(&self, value: serde_json::Value) -> Result<Option<Vec<serde_json::Value>>> {
        Ok(Some(vec![value]))
    }
}
