//! Training: optimiser, LR schedule, EMA, checkpoints, evaluation, MLPerf logging, the trainer loop.
//!
//! The trainer is model-independent: a model plugs in by implementing [`task::Task`] (parameters,
//! one step's loss, a checkpointable sample position, evaluation), and a process layout by
//! implementing [`task::Collective`]. [`toy::ToyTask`] is a small MLP regression used by the tests.
//!
//! - [`seed`]: stable per-purpose/rank/step seeds, the per-step number of recycles.
//! - [`schedule`]: the AF2 LR schedule (pure function of the step).
//! - [`optim`]: Adam with checkpointable moments, global-norm clipping, EMA.
//! - [`checkpoint`]: atomic checksummed checkpoints, resume lookup, retention policy.
//! - [`trainer`]: the loop (skipping non-finite steps, eval with EMA, checkpoints, signals).
//! - [`eval`]: asynchronous evaluation on a background thread; [`eval_af2`]: the AF2 evaluator.
//! - [`metrics`], [`mllog`]: per-step JSONL metrics, progress bar, `:::MLLOG` lines.
//! - [`signals`]: SIGTERM/SIGUSR1 → checkpoint and exit with [`trainer::EXIT_STOPPED`].

pub mod af2;
pub mod checkpoint;
pub mod graph;
pub mod metrics;
pub mod mllog;
pub mod optim;
pub mod pdb_out;
pub mod plot;
pub mod run;
pub mod schedule;
pub mod seed;
pub mod signals;
pub mod task;
pub mod toy;
pub mod trainer;
pub mod weights;

// Evaluation: the asynchronous evaluator and the AF2 evaluation.
pub mod eval;
pub mod eval_af2;
pub mod eval_ranks;

pub use optim::{Adam, Ema, Grads, Params};
pub use seed::{recycles_for_step, seed_for, Rng};
pub use task::{Collective, SingleProcess, StepCtx, StepOutput, Task};
pub use trainer::{Outcome, Resume, Trainer, TrainerOptions, EXIT_STOPPED};
