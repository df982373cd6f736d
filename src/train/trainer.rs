//! The training loop: LR schedule, gradient clipping, Adam, EMA, skipping non-finite steps,
//! evaluation with the EMA weights, periodic atomic checkpoints, resume, stop on signal, and the
//! metrics/MLPerf logs.
//!
//! Resume exactness: every piece of state that influences the trajectory is either in the checkpoint
//! (weights, EMA, Adam moments and step counts, step and skipped-step counters, the task's data
//! position) or a pure function of `(config, step)` (LR, number of recycles, the per-step RNG
//! `seed_for(seed, "step", rank, step)`). Hence `N` steps straight and `k` steps + resume + `N - k`
//! steps give bitwise-identical weights on a deterministic backend.
//!
//! Step accounting: `step` counts every step taken, skipped ones included; the LR schedule, the
//! recycles and the per-step RNG are indexed by it, so a skipped step still consumes its LR slot and
//! its samples.
//!
//! MLPerf logging: AF2 has no epochs; an MLPerf "epoch" is one evaluation interval
//! (`train.eval_every` steps): `epoch_start` before its first step, `epoch_stop`, `eval_start`,
//! `eval_accuracy` (EMA lDDT-Cα), `eval_stop` after its last.
//!
//! Evaluation (`train.eval_mode`): `sync` evaluates in place (EMA weights swapped into the task's
//! parameters) and training waits. `async` (when the task offers an
//! [`crate::train::eval::Evaluator`]) copies the EMA weights (to host memory) and evaluates them on
//! a background thread with a model instance of its own ([`crate::train::eval`]); `eval_start` is logged at the evaluation step, `eval_accuracy` and
//! `eval_stop` (with the evaluation step's epoch and step) when the result is taken. Results are
//! taken at a step boundary agreed by all ranks (every rank polls; they take it once every rank has
//! it), so every rank logs it and stops for the lDDT target at the same step. At most one evaluation
//! is in flight (the next evaluation step waits for the previous one); the run end, a stop request
//! and a checkpoint wait for it too. The checkpoint of an evaluation step is written before its
//! evaluation starts; the metrics are added to its `meta.json` when they arrive (then the retention
//! policy runs again), so the best-by-lDDT checkpoint is the evaluated step's. Evaluation never
//! touches the training state: trajectories do not depend on the evaluation mode or timing.
//! With dedicated evaluation ranks ([`TrainerOptions::remote_eval`], `parallel.eval_ranks`) the
//! same protocol runs over MPI instead of a thread ([`crate::train::eval_ranks`]): training rank 0
//! sends the weights and receives the merged metrics; the other training ranks follow it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use crate::config::{Config, EvalMode};
use crate::error::{Error, Result};
use crate::train::checkpoint::{self, CheckpointData, CheckpointMeta, FORMAT_VERSION};
use crate::train::eval::{snapshot, AsyncEval};
use crate::train::eval_ranks::{EvalBackend, RemoteEval};
use crate::train::metrics::{EvalRecord, MetricsLog, ProgressBar, StepRecord};
use crate::train::mllog::{keys, MlLogger};
use crate::train::optim::{clip_adam_ema, global_grad_norm, Adam, Ema, Grads, Params};
use crate::train::schedule::lr_at;
use crate::train::seed::{recycles_for_step, seed_for, Rng, RNG_SCHEME};
use crate::train::signals;
use crate::train::task::{Collective, SingleProcess, StepCtx, Task};

/// Exit status of a run stopped by SIGTERM/SIGUSR1 after writing its checkpoint (EX_TEMPFAIL: "try
/// again"); the SLURM launcher requeues on it.
pub const EXIT_STOPPED: i32 = 75;

/// Where a run starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// From the newest complete checkpoint in the run directory, fresh if there is none.
    Auto,
    /// Fresh; an error if the run directory already holds checkpoints (nothing is overwritten).
    Never,
    /// From this checkpoint directory.
    From(PathBuf),
}

/// MLPerf submission information.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submission {
    pub benchmark: String,
    pub org: String,
    pub division: String,
    pub status: String,
    pub platform: String,
}

impl Default for Submission {
    fn default() -> Self {
        Self {
            benchmark: "openfold".into(),
            org: "ferrofold".into(),
            division: "closed".into(),
            status: "onprem".into(),
            platform: "unknown".into(),
        }
    }
}

/// Run-level options that are not part of the (hashed) configuration.
#[derive(Debug)]
pub struct TrainerOptions {
    pub run_dir: PathBuf,
    pub resume: Resume,
    /// Stop after this many completed steps (at most `train.max_steps`), writing a checkpoint.
    pub stop_at: Option<u64>,
    /// Install the SIGTERM/SIGUSR1 handlers in [`Trainer::run`].
    pub handle_signals: bool,
    /// MLPerf logger; `None` = stdout on rank 0 when `log.mllog = "on"`.
    pub mllog: Option<MlLogger>,
    pub submission: Submission,
    /// Evaluate on dedicated evaluation ranks (`parallel.eval_ranks`) instead of a thread.
    pub remote_eval: Option<RemoteEval>,
}

impl TrainerOptions {
    pub fn new(run_dir: impl Into<PathBuf>) -> Self {
        Self {
            run_dir: run_dir.into(),
            resume: Resume::Auto,
            stop_at: None,
            handle_signals: true,
            mllog: None,
            submission: Submission::default(),
            remote_eval: None,
        }
    }
}

/// Key of the per-rank list of data positions in a multi-rank checkpoint's `data_state`.
pub const PER_RANK_KEY: &str = "per_rank";

/// This rank's data position from a checkpoint's `data_state` (a per-rank list in multi-rank runs).
fn rank_data_state<C: Collective>(
    state: &serde_json::Value,
    coll: &C,
) -> Result<serde_json::Value> {
    match state.get(PER_RANK_KEY).and_then(|v| v.as_array()) {
        None if coll.world_size() == 1 => Ok(state.clone()),
        None => Err(Error::Train(format!(
            "the checkpoint holds one data position, this run has {} ranks (resume with the world \
             size it was written with)",
            coll.world_size()
        ))),
        Some(list) if list.len() == coll.world_size() => Ok(list[coll.rank()].clone()),
        Some(list) => Err(Error::Train(format!(
            "the checkpoint holds data positions for {} ranks, this run has {} (resume with the \
             world size it was written with)",
            list.len(),
            coll.world_size()
        ))),
    }
}

/// How [`Trainer::run`] ended. A checkpoint of the final step exists in every case.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Reached `train.max_steps` (or `stop_at`).
    Finished { step: u64 },
    /// A stop was requested (signal on some rank); `signal` is this rank's (0 if none here).
    Stopped { step: u64, signal: i32 },
    /// The evaluation reached `train.target_lddt_ca`.
    TargetReached { step: u64, lddt_ca: f64 },
}

impl Outcome {
    /// Process exit status for this outcome.
    pub fn exit_code(&self) -> i32 {
        match self {
            Outcome::Stopped { .. } => EXIT_STOPPED,
            _ => 0,
        }
    }
    pub fn step(&self) -> u64 {
        match self {
            Outcome::Finished { step }
            | Outcome::Stopped { step, .. }
            | Outcome::TargetReached { step, .. } => *step,
        }
    }
}

/// Hash of the configuration that must match on resume: the resolved config with the fields that do
/// not change the training trajectory reset to defaults: run length and cadence
/// (`train.max_steps`, `checkpoint_every`, `keep_last`, `eval_every`, `target_lddt_ca`), the device
/// and CUDA graphs, `log.*`, `parallel.*` and the loader's `num_workers`/`prefetch`.
pub fn resume_hash(cfg: &Config) -> Result<String> {
    let mut c = cfg.clone();
    let d = Config::default();
    c.train.max_steps = d.train.max_steps;
    c.train.checkpoint_every = d.train.checkpoint_every;
    c.train.keep_last = d.train.keep_last;
    c.train.eval_every = d.train.eval_every;
    c.train.target_lddt_ca = d.train.target_lddt_ca;
    c.train.eval_mode = d.train.eval_mode;
    c.train.device = d.train.device;
    c.train.cuda_graphs = d.train.cuda_graphs;
    c.log = d.log;
    c.parallel = d.parallel;
    c.data.loader.num_workers = d.data.loader.num_workers;
    c.data.loader.prefetch = d.data.loader.prefetch;
    c.hash()
}

/// The trainer. Generic over the task and the collective layer.
pub struct Trainer<T: Task, C: Collective = SingleProcess> {
    task: T,
    coll: C,
    cfg: Config,
    opts: TrainerOptions,
    adam: Adam,
    ema: Ema,
    step: u64,
    skipped: u64,
    config_hash: String,
    last_ckpt_step: Option<u64>,
    last_eval: Option<(u64, BTreeMap<String, f64>)>,
    metrics: MetricsLog,
    mllog: MlLogger,
    /// The background evaluation: a thread (`train.eval_mode = "async"` and the task offers
    /// one) or the dedicated evaluation ranks ([`TrainerOptions::remote_eval`]).
    async_eval: Option<EvalBackend>,
    /// lDDT-Cα of an evaluation that reached `train.target_lddt_ca` (agreed by all ranks).
    reached: Option<f64>,
}

impl<T: Task, C: Collective> std::fmt::Debug for Trainer<T, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trainer")
            .field("run_dir", &self.opts.run_dir)
            .field("step", &self.step)
            .field("skipped", &self.skipped)
            .finish()
    }
}

fn param_shapes(params: &Params) -> BTreeMap<String, Vec<usize>> {
    params
        .iter()
        .map(|(k, v)| (k.clone(), v.dims().to_vec()))
        .collect()
}

impl<T: Task, C: Collective> Trainer<T, C> {
    /// Set up a run: fresh, or resumed from a checkpoint per `opts.resume`. Every check (checksums,
    /// parameter names/shapes, config hash) happens before any state is changed.
    pub fn new(mut task: T, coll: C, cfg: &Config, mut opts: TrainerOptions) -> Result<Self> {
        let rank = coll.rank();
        let mllog = opts.mllog.take().unwrap_or_else(|| {
            MlLogger::stdout(rank == 0 && cfg.log.mllog == crate::config::MlLog::On)
        });
        mllog.start(keys::INIT_START, Value::Null, Value::Null);
        let params = task.params().clone();
        if params.is_empty() {
            return Err(Error::Train("the task has no parameters".into()));
        }
        for (name, p) in &params {
            if p.dtype() != DType::F32 {
                return Err(Error::Train(format!(
                    "master parameter `{name}` is {:?}; master weights must be f32 (lower precision \
                     belongs in the forward pass)",
                    p.dtype()
                )));
            }
        }
        let device = params
            .values()
            .next()
            .map(|v| v.device().clone())
            .unwrap_or(Device::Cpu);
        let config_hash = resume_hash(cfg)?;
        let run_dir = opts.run_dir.clone();
        let source = match &opts.resume {
            Resume::Auto => checkpoint::find_latest(&run_dir)?,
            Resume::From(dir) => Some(dir.clone()),
            Resume::Never => {
                if let Some(latest) = checkpoint::find_latest(&run_dir)? {
                    return Err(Error::Checkpoint {
                        path: latest,
                        msg: "the run directory already holds checkpoints; refusing to start a fresh \
                              run over them (resume, or use another run directory)"
                            .into(),
                    });
                }
                None
            }
        };

        let mut adam = Adam::new(&params, &cfg.optim)?;
        let mut ema = Ema::new(&params, cfg.optim.ema_decay)?;
        let mut step = 0;
        let mut skipped = 0;
        let mut last_ckpt_step = None;
        let mut last_eval = None;
        if let Some(dir) = source {
            let data = checkpoint::load(&dir, &device)?;
            data.check_against(&dir, &param_shapes(&params))?;
            for (file, part) in [
                (checkpoint::MODEL_FILE, &data.model),
                (checkpoint::EMA_FILE, &data.ema),
                (checkpoint::ADAM_FILE, &data.adam_m),
                (checkpoint::ADAM_FILE, &data.adam_v),
            ] {
                if let Some((name, t)) = part.iter().find(|(_, t)| t.dtype() != DType::F32) {
                    return Err(Error::Checkpoint {
                        path: dir.join(file),
                        msg: format!("`{name}` is {:?}, expected f32", t.dtype()),
                    });
                }
            }
            if data.meta.rng_scheme != RNG_SCHEME {
                return Err(Error::Checkpoint {
                    path: dir.join(checkpoint::META_FILE),
                    msg: format!(
                        "RNG scheme `{}` differs from this build's `{RNG_SCHEME}`: the run's random \
                         streams cannot be reproduced",
                        data.meta.rng_scheme
                    ),
                });
            }
            if data.meta.config_hash != config_hash {
                return Err(Error::Checkpoint {
                    path: dir.join(checkpoint::META_FILE),
                    msg: format!(
                        "config hash {} differs from this run's {} (the checkpoint was trained with \
                         another configuration)",
                        data.meta.config_hash, config_hash
                    ),
                });
            }
            // All checks passed: apply.
            task.restore_data_state(&rank_data_state(&data.meta.data_state, &coll)?)
                .map_err(|e| Error::Checkpoint {
                    path: dir.join(checkpoint::META_FILE),
                    msg: format!("cannot restore the data position: {e}"),
                })?;
            for (name, p) in &params {
                if let Some(t) = data.model.get(name) {
                    p.set(t)?;
                }
            }
            adam.m = data.adam_m;
            adam.v = data.adam_v;
            adam.steps = data.meta.adam_steps.clone();
            ema.weights = data.ema;
            step = data.meta.step;
            skipped = data.meta.skipped_steps;
            if !data.meta.eval.is_empty() {
                last_eval = Some((step, data.meta.eval.clone()));
            }
            if run_dir.join(checkpoint::dir_name(step)).is_dir() {
                last_ckpt_step = Some(step);
            }
            if rank == 0 {
                tracing::info!("resumed from {} at step {step}", dir.display());
            }
        }
        if rank == 0 {
            // Leftovers of a writer killed mid-checkpoint (never read, see `checkpoint::list`).
            checkpoint::remove_stale_tmp(&run_dir)?;
        }
        let metrics = MetricsLog::open(&run_dir, step, rank == 0)?;
        let async_eval = if let Some(r) = opts.remote_eval.take() {
            Some(EvalBackend::Ranks(r))
        } else if cfg.train.eval_mode == EvalMode::Async && cfg.train.eval_every > 0 {
            task.evaluator()?
                .map(AsyncEval::spawn)
                .transpose()?
                .map(EvalBackend::Thread)
        } else {
            None
        };
        Ok(Self {
            task,
            coll,
            cfg: cfg.clone(),
            opts,
            adam,
            ema,
            step,
            skipped,
            config_hash,
            last_ckpt_step,
            last_eval,
            metrics,
            mllog,
            async_eval,
            reached: None,
        })
    }

    /// True when evaluations run on the background thread.
    pub fn eval_is_async(&self) -> bool {
        self.async_eval.is_some()
    }

    /// Dedicated evaluation ranks: wait for the evaluation in flight (its result is dropped) and
    /// stop them (training rank 0 sends the stop message). Nothing otherwise. Call after the run.
    pub fn shutdown_eval(&mut self) -> Result<()> {
        match self.async_eval.as_mut() {
            Some(b) => b.shutdown(),
            None => Ok(()),
        }
    }

    /// Steps completed.
    pub fn step(&self) -> u64 {
        self.step
    }

    /// The latest evaluation `(step, metrics)` of this run, if any.
    pub fn last_eval(&self) -> Option<&(u64, BTreeMap<String, f64>)> {
        self.last_eval.as_ref()
    }
    /// Steps skipped (non-finite loss or gradient norm).
    pub fn skipped_steps(&self) -> u64 {
        self.skipped
    }
    pub fn task(&self) -> &T {
        &self.task
    }
    pub fn task_mut(&mut self) -> &mut T {
        &mut self.task
    }
    pub fn adam(&self) -> &Adam {
        &self.adam
    }
    pub fn ema(&self) -> &Ema {
        &self.ema
    }
    pub fn run_dir(&self) -> &Path {
        &self.opts.run_dir
    }
    pub fn mllog(&self) -> &MlLogger {
        &self.mllog
    }
    pub fn config_hash(&self) -> &str {
        &self.config_hash
    }

    fn log_hyperparameters(&self) {
        let l = &self.mllog;
        if !l.enabled() {
            return;
        }
        let s = &self.opts.submission;
        let o = &self.cfg.optim;
        let n_params: usize = self.task.params().values().map(|v| v.elem_count()).sum();
        let gbs = self.task.samples_per_step() * self.coll.world_size();
        let none = Value::Null;
        l.event(keys::SUBMISSION_BENCHMARK, json!(s.benchmark), none.clone());
        l.event(keys::SUBMISSION_ORG, json!(s.org), none.clone());
        l.event(keys::SUBMISSION_DIVISION, json!(s.division), none.clone());
        l.event(keys::SUBMISSION_STATUS, json!(s.status), none.clone());
        l.event(keys::SUBMISSION_PLATFORM, json!(s.platform), none.clone());
        l.event(
            keys::NUMBER_OF_RANKS,
            json!(self.coll.world_size()),
            none.clone(),
        );
        l.event(keys::SEED, json!(self.cfg.train.seed), none.clone());
        l.event(keys::GLOBAL_BATCH_SIZE, json!(gbs), none.clone());
        l.event(keys::OPT_NAME, json!("adam"), none.clone());
        l.event(keys::OPT_BASE_LR, json!(o.lr), none.clone());
        l.event(
            keys::OPT_LR_WARMUP_STEPS,
            json!(o.warmup_steps),
            none.clone(),
        );
        l.event(
            keys::OPT_LR_DECAY_START_STEP,
            json!(o.decay_start),
            none.clone(),
        );
        l.event(keys::OPT_LR_DECAY_STEPS, json!(o.decay_every), none.clone());
        l.event(
            keys::OPT_LR_DECAY_FACTOR,
            json!(o.decay_factor),
            none.clone(),
        );
        l.event(keys::OPT_ADAM_BETA_1, json!(o.beta1), none.clone());
        l.event(keys::OPT_ADAM_BETA_2, json!(o.beta2), none.clone());
        l.event(keys::OPT_ADAM_EPSILON, json!(o.eps), none.clone());
        l.event(keys::GRADIENT_CLIPPING, json!(true), none.clone());
        l.event(
            keys::OPT_GRADIENT_CLIP_NORM,
            json!(o.grad_clip_norm),
            none.clone(),
        );
        l.event(keys::GRADIENT_ACCUMULATION_STEPS, json!(1), none.clone());
        l.event(keys::MODEL_PARAMETERS_COUNT, json!(n_params), none);
    }

    /// Train until `train.max_steps` (or `stop_at`), a stop request, or the lDDT target. Writes a
    /// checkpoint of the final step in every case.
    pub fn run(&mut self) -> Result<Outcome> {
        if self.opts.handle_signals {
            signals::install()?;
        }
        let rank = self.coll.rank();
        let max_steps = self.opts.stop_at.map_or(self.cfg.train.max_steps, |s| {
            s.min(self.cfg.train.max_steps)
        });
        self.log_hyperparameters();
        self.mllog.end(keys::INIT_STOP, Value::Null, Value::Null);
        self.mllog.start(keys::RUN_START, Value::Null, Value::Null);
        let progress = ProgressBar::new(self.cfg.log.progress, rank == 0, self.step, max_steps);
        let eval_every = self.cfg.train.eval_every;
        let ckpt_every = self.cfg.train.checkpoint_every;
        let result = (|| -> Result<Outcome> {
            // Resumed from the checkpoint of an evaluation step without its metrics: the run died
            // while that evaluation was in flight. Its weights are the checkpoint's: redo it.
            if self.async_eval.is_some()
                && eval_every > 0
                && self.step > 0
                && self.step.is_multiple_of(eval_every)
                && self.last_eval.as_ref().map(|e| e.0) != Some(self.step)
            {
                if rank == 0 {
                    tracing::info!(
                        "step {}: the checkpoint has no evaluation; evaluating it now",
                        self.step
                    );
                }
                self.start_async_eval()?;
            }
            loop {
                if self.step >= max_steps {
                    return Ok(Outcome::Finished { step: self.step });
                }
                let local = signals::stop_requested();
                if self.coll.any(local.is_some())? {
                    if rank == 0 {
                        tracing::warn!(
                            "stop requested (signal {}) at step {}: checkpointing and exiting",
                            local.unwrap_or(0),
                            self.step
                        );
                    }
                    return Ok(Outcome::Stopped {
                        step: self.step,
                        signal: local.unwrap_or(0),
                    });
                }
                // A finished background evaluation is taken here (once every rank has it).
                self.finish_async_eval(false)?;
                if let Some(lddt_ca) = self.reached {
                    return Ok(Outcome::TargetReached {
                        step: self.step,
                        lddt_ca,
                    });
                }
                if eval_every > 0 && self.step.is_multiple_of(eval_every) {
                    self.mllog.start(
                        keys::EPOCH_START,
                        Value::Null,
                        json!({"epoch_num": self.step / eval_every + 1, "step": self.step}),
                    );
                }
                let rec = self.train_step()?;
                progress.update(self.step, rec.loss, rec.lr);
                if eval_every > 0 && self.step.is_multiple_of(eval_every) {
                    let epoch = self.step / eval_every;
                    self.mllog.end(
                        keys::EPOCH_STOP,
                        Value::Null,
                        json!({"epoch_num": epoch, "step": self.step}),
                    );
                    if self.async_eval.is_some() {
                        // At most one evaluation in flight: wait for the previous one.
                        self.finish_async_eval(true)?;
                        if let Some(lddt_ca) = self.reached {
                            return Ok(Outcome::TargetReached {
                                step: self.step,
                                lddt_ca,
                            });
                        }
                        // This step's checkpoint first (it must not wait for this step's
                        // evaluation; the metrics are added to it when they arrive).
                        if ckpt_every > 0 && self.step.is_multiple_of(ckpt_every) {
                            self.save_checkpoint()?;
                        }
                        self.start_async_eval()?;
                    } else {
                        let metrics = self.evaluate()?;
                        let lddt = metrics.get("lddt_ca").copied();
                        // Ranks that evaluated nothing follow the ones that reached the target.
                        if self.coll.any(self.target_reached(&metrics))? {
                            return Ok(Outcome::TargetReached {
                                step: self.step,
                                lddt_ca: lddt.unwrap_or(f64::NAN),
                            });
                        }
                    }
                }
                if ckpt_every > 0
                    && self.step.is_multiple_of(ckpt_every)
                    && self.last_ckpt_step != Some(self.step)
                {
                    self.save_checkpoint()?;
                    if let Some(lddt_ca) = self.reached {
                        return Ok(Outcome::TargetReached {
                            step: self.step,
                            lddt_ca,
                        });
                    }
                }
            }
        })();
        progress.finish();
        // The run end and a stop request wait for the evaluation in flight (it is logged, and
        // the final checkpoint / best-by-lDDT policy see it); reaching the target with it is a
        // success.
        let result = result.and_then(|o| {
            self.finish_async_eval(true)?;
            Ok(match (o, self.reached) {
                (Outcome::Finished { step }, Some(lddt_ca)) => {
                    Outcome::TargetReached { step, lddt_ca }
                }
                (o, _) => o,
            })
        });
        let outcome = match result {
            Ok(o) => o,
            Err(e) => {
                self.mllog.end(
                    keys::RUN_STOP,
                    Value::Null,
                    json!({"status": keys::ABORTED, "step": self.step}),
                );
                return Err(e);
            }
        };
        if self.last_ckpt_step != Some(self.step) {
            self.save_checkpoint()?;
        }
        let status = match outcome {
            Outcome::TargetReached { .. } => keys::SUCCESS,
            _ => keys::ABORTED,
        };
        self.mllog.end(
            keys::RUN_STOP,
            Value::Null,
            json!({"status": status, "step": self.step}),
        );
        Ok(outcome)
    }

    /// One optimizer step (or a skipped one). Returns its metrics record.
    pub fn train_step(&mut self) -> Result<StepRecord> {
        let t0 = Instant::now();
        let step = self.step;
        let rank = self.coll.rank();
        let seed = self.cfg.train.seed;
        let lr = lr_at(step, &self.cfg.optim);
        let recycles = recycles_for_step(seed, step, self.cfg.model.recycling.max_iters);
        let ctx = StepCtx {
            step,
            lr,
            num_recycles: recycles,
            rank,
            rng: Rng::new(seed_for(seed, "step", rank as u64, step)),
        };
        let out = self.task.step_loss(&ctx)?;
        if out.loss.rank() != 0 {
            return Err(Error::Train(format!(
                "step_loss must return a scalar loss, got shape {:?}",
                out.loss.dims()
            )));
        }
        let loss = out.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        // Backward even for a non-finite loss: in data-parallel runs every rank must take part in
        // the gradient all-reduce; the non-finite norm then makes every rank skip.
        // A task that ran its own backward (activation recomputation) hands the gradients over.
        let params = self.task.params().clone();
        let mut grads: Grads = match out.grads {
            Some(g) => g,
            None => {
                let store = out.loss.backward()?;
                let mut grads = BTreeMap::new();
                for (name, var) in &params {
                    if let Some(g) = store.get(var.as_tensor()) {
                        grads.insert(name.clone(), g.clone());
                    }
                }
                grads
            }
        };
        // Every rank must reduce the same list: a parameter this sample did not reach gets zeros.
        for (name, var) in &params {
            if !grads.contains_key(name) {
                grads.insert(name.clone(), var.as_tensor().zeros_like()?);
            }
        }
        self.coll.all_reduce_grads(&mut grads)?;
        let grad_norm = global_grad_norm(&grads)?;
        let skip = self.coll.any(!loss.is_finite() || !grad_norm.is_finite())?;
        let mut clip_coef = 1.0;
        if skip {
            self.skipped += 1;
            if rank == 0 {
                tracing::warn!(
                    "step {step}: non-finite loss ({loss}) or gradient norm ({grad_norm}); step \
                     skipped ({} skipped so far)",
                    self.skipped
                );
            }
        } else {
            // Clip + Adam + EMA (one fused kernel on CUDA, the candle ops elsewhere).
            clip_coef = clip_adam_ema(
                &mut self.adam,
                &mut self.ema,
                &params,
                &grads,
                grad_norm,
                self.cfg.optim.grad_clip_norm,
                lr,
            )?;
        }
        self.step += 1;
        let dt = t0.elapsed().as_secs_f64();
        let samples = (self.task.samples_per_step() * self.coll.world_size()) as f64;
        let rec = StepRecord {
            kind: "train",
            step: self.step,
            loss,
            terms: out.metrics,
            grad_norm,
            clip_coef,
            lr,
            recycles,
            step_time_s: dt,
            samples_per_s: if dt > 0.0 { samples / dt } else { 0.0 },
            skipped: skip,
            skipped_steps: self.skipped,
        };
        let every = self.cfg.log.every.max(1);
        if self.step.is_multiple_of(every) || skip {
            self.metrics.write(&rec)?;
        }
        Ok(rec)
    }

    /// MLPerf epoch number of the evaluation at `step`.
    fn eval_epoch(&self, step: u64) -> u64 {
        step / self.cfg.train.eval_every.max(1)
    }

    /// Whether `metrics` reach `train.target_lddt_ca`. Multi-rank: decided by rank 0, which
    /// holds the merged metrics (the others hold their own shard's); agree with `any`.
    fn target_reached(&self, metrics: &BTreeMap<String, f64>) -> bool {
        if self.coll.rank() != 0 {
            return false;
        }
        match (self.cfg.train.target_lddt_ca, metrics.get("lddt_ca")) {
            (Some(target), Some(l)) => *l >= target,
            _ => false,
        }
    }

    /// Multi-rank: gather every rank's evaluation on rank 0 and merge them
    /// ([`Task::merge_eval`]); other ranks keep their own. Collective.
    fn gather_eval(&self, local: BTreeMap<String, f64>) -> Result<BTreeMap<String, f64>> {
        if self.coll.world_size() == 1 {
            return Ok(local);
        }
        // Non-finite values travel as null.
        let wire: BTreeMap<&String, Option<f64>> = local
            .iter()
            .map(|(k, v)| (k, v.is_finite().then_some(*v)))
            .collect();
        let value = serde_json::to_value(&wire).map_err(|e| Error::Train(e.to_string()))?;
        let Some(parts) = self.coll.gather_to_root(value)? else {
            return Ok(local);
        };
        let parts = parts
            .into_iter()
            .map(|p| {
                let m: BTreeMap<String, Option<f64>> = serde_json::from_value(p)
                    .map_err(|e| Error::Train(format!("gathered evaluation: {e}")))?;
                Ok(m.into_iter()
                    .map(|(k, v)| (k, v.unwrap_or(f64::NAN)))
                    .collect())
            })
            .collect::<Result<Vec<BTreeMap<String, f64>>>>()?;
        Ok(self.task.merge_eval(parts))
    }

    /// Start the background evaluation of this step's EMA weights (a copy). Nothing may be in
    /// flight.
    fn start_async_eval(&mut self) -> Result<()> {
        let step = self.step;
        let Some(ae) = self.async_eval.as_mut() else {
            return Ok(());
        };
        let weights = snapshot(&self.ema.weights)?;
        let epoch = step / self.cfg.train.eval_every.max(1);
        self.mllog.start(
            keys::EVAL_START,
            Value::Null,
            json!({"epoch_num": epoch, "step": step}),
        );
        ae.submit(step, weights)
    }

    /// Take the in-flight background evaluation's result, if any: with `wait`, block until it is
    /// here; otherwise take it only when every rank has it (agreed with a collective, so every
    /// rank takes it at the same step). Logs it and sets `self.reached` when it reaches the
    /// target (agreed). Collective while an evaluation is in flight: every rank calls it at the
    /// same points.
    fn finish_async_eval(&mut self, wait: bool) -> Result<()> {
        let Some(ae) = self.async_eval.as_mut() else {
            return Ok(());
        };
        let Some(pending) = ae.pending_step() else {
            return Ok(());
        };
        let done = if wait {
            let t0 = Instant::now();
            let done = ae.wait()?;
            let waited = t0.elapsed().as_secs_f64();
            if self.coll.rank() == 0 && waited > 0.05 {
                tracing::info!(
                    "step {}: waited {waited:.2} s for the evaluation of step {pending}",
                    self.step
                );
            }
            done
        } else {
            let here = ae.poll()?;
            if self.coll.any(!here)? {
                return Ok(());
            }
            self.async_eval.as_mut().and_then(EvalBackend::take)
        };
        let done = done.ok_or_else(|| {
            Error::Train(format!(
                "the result of the evaluation of step {pending} is missing"
            ))
        })?;
        let metrics = done
            .metrics
            .map_err(|e| Error::Train(format!("evaluation of step {}: {e}", done.step)))?;
        // The dedicated evaluation ranks' results arrive merged on training rank 0.
        let metrics = if self.async_eval.as_ref().is_some_and(EvalBackend::is_ranks) {
            metrics
        } else {
            self.gather_eval(metrics)?
        };
        if self.coll.rank() == 0 {
            tracing::debug!(
                "evaluation of step {} taken at step {} ({:.2} s, {:.2} s after its start)",
                done.step,
                self.step,
                done.eval_time_s,
                done.latency_s
            );
        }
        let reached = self.target_reached(&metrics);
        self.record_eval(done.step, &metrics, done.eval_time_s)?;
        if self.coll.any(reached)? {
            self.reached = Some(metrics.get("lddt_ca").copied().unwrap_or(f64::NAN));
        }
        Ok(())
    }

    /// Log a finished evaluation of `step` (MLLOG `eval_accuracy`/`eval_stop`, metrics.jsonl),
    /// remember it as the latest, and add it to the checkpoint of `step` if that exists without
    /// metrics (then re-apply the retention policy).
    fn record_eval(
        &mut self,
        step: u64,
        metrics: &BTreeMap<String, f64>,
        eval_time_s: f64,
    ) -> Result<()> {
        let epoch = self.eval_epoch(step);
        if let Some(l) = metrics.get("lddt_ca") {
            self.mllog.event(
                keys::EVAL_ACCURACY,
                json!(l),
                json!({"epoch_num": epoch, "step": step}),
            );
        }
        self.mllog.end(
            keys::EVAL_STOP,
            Value::Null,
            json!({"epoch_num": epoch, "step": step}),
        );
        self.metrics.write(&EvalRecord {
            kind: "eval",
            step,
            metrics: metrics.clone(),
            eval_time_s,
        })?;
        if self.coll.rank() == 0 {
            // Means only (per-protein values, `<id>/<metric>`, are in metrics.jsonl).
            let means: BTreeMap<&String, f64> = metrics
                .iter()
                .filter(|(k, _)| !k.contains('/'))
                .map(|(k, v)| (k, *v))
                .collect();
            tracing::info!("step {step}: eval {means:?}");
            self.annotate_checkpoint(step, metrics)?;
        }
        self.last_eval = Some((step, metrics.clone()));
        Ok(())
    }

    /// Add evaluation metrics to the existing checkpoint of `step` (rank 0), atomically
    /// (`meta.json` is replaced; the tensor files and their digests are untouched).
    fn annotate_checkpoint(&self, step: u64, metrics: &BTreeMap<String, f64>) -> Result<()> {
        let dir = self.opts.run_dir.join(checkpoint::dir_name(step));
        if metrics.is_empty() || !dir.is_dir() {
            return Ok(());
        }
        let mut meta = checkpoint::read_meta(&dir)?;
        if !meta.eval.is_empty() {
            return Ok(());
        }
        meta.eval = metrics.clone();
        let path = dir.join(checkpoint::META_FILE);
        let text = serde_json::to_vec_pretty(&meta).map_err(|e| Error::Checkpoint {
            path: path.clone(),
            msg: format!("cannot serialise metadata: {e}"),
        })?;
        checkpoint::atomic_write(&path, &text)?;
        checkpoint::apply_retention(&self.opts.run_dir, self.cfg.train.keep_last)?;
        Ok(())
    }

    /// Evaluate with the EMA weights (swapped into the parameters, then restored bit for bit),
    /// synchronously (a background evaluation in flight is finished first).
    pub fn evaluate(&mut self) -> Result<BTreeMap<String, f64>> {
        self.finish_async_eval(true)?;
        let t0 = Instant::now();
        let epoch = self.eval_epoch(self.step);
        self.mllog.start(
            keys::EVAL_START,
            Value::Null,
            json!({"epoch_num": epoch, "step": self.step}),
        );
        let params = self.task.params().clone();
        let master = params
            .iter()
            .map(|(k, v)| Ok((k.clone(), v.as_tensor().copy()?)))
            .collect::<Result<BTreeMap<String, Tensor>>>()?;
        let swap_in = || -> Result<()> {
            for (name, p) in &params {
                let w = self.ema.weights.get(name).ok_or_else(|| {
                    Error::Train(format!("EMA has no weight for parameter `{name}`"))
                })?;
                p.set(w)?;
            }
            Ok(())
        };
        let swapped = swap_in();
        let result = swapped.and_then(|()| self.task.evaluate(self.step));
        // Restore the master weights whatever happened.
        for (name, p) in &params {
            if let Some(m) = master.get(name) {
                p.set(m)?;
            }
        }
        let metrics = self.gather_eval(result?)?;
        let dt = t0.elapsed().as_secs_f64();
        self.record_eval(self.step, &metrics, dt)?;
        Ok(metrics)
    }

    /// Write a checkpoint of the current step (rank 0; other ranks only record it) and apply the
    /// retention policy. Returns the checkpoint directory on rank 0.
    pub fn save_checkpoint(&mut self) -> Result<Option<PathBuf>> {
        // The evaluation in flight first: its metrics belong to an earlier checkpoint, which the
        // retention policy below must see.
        self.finish_async_eval(true)?;
        // Every rank's sample-source position (data-parallel ranks read different streams).
        let states = self.coll.gather_to_root(self.task.data_state()?)?;
        let Some(mut states) = states.filter(|_| self.coll.rank() == 0) else {
            self.last_ckpt_step = Some(self.step);
            return Ok(None);
        };
        let data_state = if states.len() == 1 {
            states.pop().unwrap_or(serde_json::Value::Null)
        } else {
            json!({ PER_RANK_KEY: states })
        };
        let params = self.task.params();
        let model = params
            .iter()
            .map(|(k, v)| (k.clone(), v.as_detached_tensor()))
            .collect();
        let eval = match &self.last_eval {
            Some((s, m)) if *s == self.step => m.clone(),
            _ => BTreeMap::new(),
        };
        let mut data = CheckpointData {
            meta: CheckpointMeta {
                format: FORMAT_VERSION,
                ferrofold_version: crate::VERSION.to_string(),
                step: self.step,
                skipped_steps: self.skipped,
                lr: lr_at(self.step, &self.cfg.optim),
                config_hash: self.config_hash.clone(),
                seed: self.cfg.train.seed,
                rng_scheme: RNG_SCHEME.to_string(),
                data_state,
                adam_steps: self.adam.steps.clone(),
                eval,
                files: BTreeMap::new(),
            },
            model,
            ema: self.ema.weights.clone(),
            adam_m: self.adam.m.clone(),
            adam_v: self.adam.v.clone(),
        };
        let dir = checkpoint::write(&self.opts.run_dir, &mut data)?;
        self.last_ckpt_step = Some(self.step);
        let removed = checkpoint::apply_retention(&self.opts.run_dir, self.cfg.train.keep_last)?;
        tracing::info!(
            "checkpoint {} written{}",
            dir.display(),
            if removed.is_empty() {
                String::new()
            } else {
                format!(" (removed steps {removed:?})")
            }
        );
        Ok(Some(dir))
    }
}
