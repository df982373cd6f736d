//! The `train`, `eval` and `plot` subcommands: build the process groups, the AF2 task and the
//! trainer from the resolved configuration, and report.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

use crate::cli::{ConvertArgs, EvalArgs, PlotArgs, TrainArgs};
use crate::error::{Error, Result};
use crate::parallel::{Communicator, GroupCollective, MpiComm, ParallelCtx, ProcessGroups};
use crate::train::af2::{Af2Options, Af2Task};
use crate::train::eval_af2::merge_shards;
use crate::train::eval_ranks::{eval_rank_loop, EvalLink, RemoteEval};
use crate::train::weights::{
    load_into, read_openfold, read_weights, write_safetensors, NameReport, WeightsKind,
};
use crate::train::{Outcome, Resume, Task, Trainer, TrainerOptions};

/// `parallel.eval_ranks = N`: split the world into the training ranks (`0..W-N`, their DP × DAP
/// grid) and the evaluation ranks (`W-N..`), and link training rank 0 with the evaluation ranks.
/// Collective over the world. Returns `(Some(groups), link)` on training ranks (`link` on training
/// rank 0 only), `(None, Some(link))` on evaluation ranks.
fn split_eval_ranks(
    ctx: &ParallelCtx,
    cfg: &crate::config::Config,
    device: &candle_core::Device,
) -> Result<(Option<ProcessGroups>, Option<EvalLink>)> {
    let n_eval = cfg.parallel.eval_ranks;
    let world_size = ctx.world_size;
    // Checks first, identical on every rank, so that every rank fails the same way.
    if n_eval >= world_size {
        return Err(Error::config(
            "resolved",
            "parallel.eval_ranks",
            format!(
                "{n_eval} evaluation ranks leave no training rank in a world of {world_size} \
                 (need eval_ranks < world size)"
            ),
        ));
    }
    let train_ranks = world_size - n_eval;
    let dap = cfg.parallel.dap_size;
    if dap == 0 || !train_ranks.is_multiple_of(dap) {
        return Err(Error::config(
            "resolved",
            "parallel.dap_size",
            format!(
                "dap_size {dap} must divide the number of training ranks {train_ranks} \
                 (world {world_size} - parallel.eval_ranks {n_eval})"
            ),
        ));
    }
    if !device.is_cpu() || cfg.parallel.backend == crate::config::CommBackend::Nccl {
        return Err(Error::config(
            "resolved",
            "parallel.eval_ranks",
            "dedicated evaluation ranks are supported on the CPU (MPI backend) only",
        ));
    }
    ctx.require_collectives()?;
    let world = MpiComm::world(ctx)?;
    let is_eval = ctx.rank >= train_ranks;
    let sub = world.split(usize::from(is_eval), ctx.rank)?;
    let link = EvalLink::new(ctx, train_ranks)?;
    if is_eval {
        return Ok((None, link));
    }
    Ok((Some(ProcessGroups::from_world(sub, dap)?), link))
}

/// An evaluation rank (`parallel.eval_ranks`): the DAP-free model of the background evaluator,
/// this rank's shard of the validation chains, evaluating the weights training rank 0 sends until
/// it says stop. Returns exit status 0.
fn eval_rank(
    ctx: &ParallelCtx,
    cfg: &crate::config::Config,
    run_dir: &std::path::Path,
    device: candle_core::Device,
    link: &EvalLink,
) -> Result<i32> {
    // SIGTERM/SIGUSR1 reach every rank (mpirun, scancel): here they only set the stop flag, which
    // this rank ignores; training rank 0 stops it after its checkpoint.
    crate::train::signals::install()?;
    let (index, n) = (link.rank().saturating_sub(1), link.eval_ranks());
    let opts = Af2Options {
        pdb_dir: Some(run_dir.join("eval")),
        async_eval_shard: (index, n),
        ..Af2Options::default()
    };
    let task = Af2Task::new(cfg, device, opts)?;
    let shapes: Vec<(String, Vec<usize>)> = task
        .params()
        .iter()
        .map(|(k, v)| (k.clone(), v.dims().to_vec()))
        .collect();
    let factory = task
        .evaluator()?
        .ok_or_else(|| Error::Train("the task offers no evaluator".into()))?;
    drop(task);
    let mut evaluator = factory()?;
    tracing::debug!("rank {}: evaluation rank {index} of {n}", ctx.rank);
    eval_rank_loop(link, &shapes, evaluator.as_mut())?;
    Ok(0)
}

/// `ferrofold train`: returns the process exit status (0, or [`crate::train::EXIT_STOPPED`] after a
/// signal-triggered checkpoint, which the launcher requeues).
pub fn train(ctx: &ParallelCtx, args: &TrainArgs) -> Result<i32> {
    let cfg = args.common.resolve()?;
    let run_dir = args.common.run_dir.clone().ok_or_else(|| {
        Error::Msg("train needs --run-dir DIR (checkpoints, logs, metrics)".into())
    })?;
    // (`train.cuda_graphs = on`: a capture-ready device, see `train::graph`.)
    let device = crate::train::graph::select_device(&cfg, ctx.local_rank)?;
    // NCCL communicators on a GPU (`parallel.backend = auto | nccl`), MPI on the CPU.
    let n_eval = cfg.parallel.eval_ranks;
    let (groups, remote_eval) = if n_eval > 0 {
        let (groups, link) = split_eval_ranks(ctx, &cfg, &device)?;
        match groups {
            Some(g) => (Arc::new(g), link),
            // An evaluation rank: evaluate until training rank 0 says stop.
            None => {
                let link = link.ok_or_else(|| Error::Comm {
                    rank: ctx.rank,
                    msg: "evaluation rank without a link".into(),
                })?;
                return eval_rank(ctx, &cfg, &run_dir, device, &link);
            }
        }
    } else {
        (
            Arc::new(ProcessGroups::with_device(ctx, &cfg.parallel, &device)?),
            None,
        )
    };
    if ctx.is_root() {
        cfg.write_resolved(&run_dir)?;
    }
    // Validation chains are sharded over the ranks (merged on rank 0). The background evaluator
    // (`train.eval_mode = "async"`) runs a DAP-free model on a thread of every rank: one shard
    // per rank. In-place evaluation (sync mode, and the final summary) uses the task's model,
    // DAP-sharded in DAP runs: one shard per DAP group, whose first rank writes the PDB files.
    let c = &groups.coords;
    let opts = Af2Options {
        shard: (c.dp_rank, c.dp_size),
        pdb_dir: Some(run_dir.join("eval")),
        eval_shard: (c.dp_rank, c.dp_size),
        async_eval_shard: (c.rank, c.world_size),
        in_place_pdb: c.dap_rank == 0,
        ..Af2Options::default()
    };
    let mut task = Af2Task::new(&cfg, device, opts)?;
    // DAP: the stacks run sharded over the DAP group; their block parameters then receive
    // per-shard partial gradients, summed over the group by the gradient all-reduce.
    let mut sharded = BTreeSet::new();
    if groups.coords.dap_size > 1 {
        task.set_dap(crate::parallel::dap_evoformer::dap_from_config(
            &groups,
            &cfg.parallel,
        ));
        sharded = task
            .params()
            .keys()
            .filter(|k| is_dap_sharded(k))
            .cloned()
            .collect();
        if ctx.is_root() {
            tracing::info!(
                "DAP-{} × DP-{}: {} of {} parameter tensors sharded",
                groups.coords.dap_size,
                groups.coords.dp_size,
                sharded.len(),
                task.params().len()
            );
        }
    }
    let resume = match args.resume.as_str() {
        "auto" => Resume::Auto,
        "never" => Resume::Never,
        dir => Resume::From(PathBuf::from(dir)),
    };
    let has_checkpoint = crate::train::checkpoint::find_latest(&run_dir)?.is_some();
    if let Some(init) = &args.init_from {
        if has_checkpoint && resume == Resume::Auto {
            tracing::info!(
                "run dir already holds checkpoints: resuming from them, ignoring --init-from {}",
                init.display()
            );
        } else {
            let kind = if args.init_weights == "model" {
                WeightsKind::Model
            } else {
                WeightsKind::Ema
            };
            let w = read_weights(init, kind)?;
            load_into(init, &w, task.params())?;
            tracing::info!("initialised {} parameters from {}", w.len(), init.display());
        }
    }
    let coll = GroupCollective::new(groups.clone(), cfg.parallel.bucket_mib, sharded);
    let mut topts = TrainerOptions::new(&run_dir);
    topts.resume = resume;
    topts.stop_at = args.stop_at;
    if n_eval > 0 {
        topts.remote_eval = Some(RemoteEval::new(remote_eval, Box::new(merge_shards)));
    }
    let mut trainer = Trainer::new(task, coll, &cfg, topts)?;
    let outcome = trainer.run();
    // Stop the evaluation ranks (after the evaluation in flight) whatever the outcome.
    let stopped = trainer.shutdown_eval();
    let outcome = outcome?;
    stopped?;
    if ctx.is_root() {
        tracing::info!("training ended: {outcome:?}");
    }
    if !matches!(outcome, Outcome::Stopped { .. }) && cfg.train.eval_every > 0 {
        let metrics = match trainer.last_eval() {
            Some((s, m)) if *s == outcome.step() => m.clone(),
            _ => trainer.evaluate()?,
        };
        if ctx.is_root() {
            print_eval_summary(outcome.step(), &metrics);
        }
    }
    Ok(outcome.exit_code())
}

/// Parameters used inside the DAP-sharded stacks (their gradients are per-shard partial sums).
pub fn is_dap_sharded(name: &str) -> bool {
    name.strip_prefix("evoformer.")
        .or_else(|| name.strip_prefix("extra_msa_stack."))
        .is_some_and(crate::parallel::DapEvoformer::is_sharded_param)
}

/// `ferrofold eval`: evaluate a checkpoint (EMA weights by default) on the validation split.
pub fn eval(ctx: &ParallelCtx, args: &EvalArgs) -> Result<()> {
    let cfg = args.common.resolve()?;
    let device = crate::device::select(cfg.train.device, ctx.local_rank)?;
    let out = args
        .out
        .clone()
        .or_else(|| args.common.run_dir.as_ref().map(|d| d.join("eval")))
        .unwrap_or_else(|| PathBuf::from("eval-out"));
    let opts = Af2Options {
        pdb_dir: Some(out.clone()),
        ..Af2Options::default()
    };
    let mut task = Af2Task::new(&cfg, device, opts)?;
    let kind = if args.weights == "model" {
        WeightsKind::Model
    } else {
        WeightsKind::Ema
    };
    let w = read_weights(&args.checkpoint, kind)?;
    load_into(&args.checkpoint, &w, task.params())?;
    let step = crate::train::checkpoint::read_meta(&args.checkpoint)
        .map(|m| m.step)
        .unwrap_or(0);
    let metrics = task.evaluate(step)?;
    if ctx.is_root() {
        print_eval_summary(step, &metrics);
        println!(
            "predicted structures: {}",
            out.join(format!("step-{step:09}")).display()
        );
    }
    Ok(())
}

/// `ferrofold convert-weights`: OpenFold `.pt` → `.safetensors`, names and shapes checked against
/// the model built from the resolved configuration (on the CPU).
pub fn convert_weights(args: &ConvertArgs) -> Result<()> {
    let cfg = args.common.resolve()?;
    let weights = read_openfold(&args.from, args.key.as_deref())?;
    let (_vm, params, _model) =
        crate::train::eval_af2::build_model(&cfg, &candle_core::Device::Cpu)?;
    let expected: BTreeMap<String, Vec<usize>> = params
        .iter()
        .map(|(k, v)| (k.clone(), v.dims().to_vec()))
        .collect();
    let report = NameReport::compare(&weights, &expected);
    if !report.is_ok() {
        eprintln!(
            "{}: {} tensors; the model of this configuration has {} parameters\n{}",
            args.from.display(),
            weights.len(),
            expected.len(),
            report.describe().trim_end()
        );
        if !args.no_check {
            return Err(Error::Checkpoint {
                path: args.from.clone(),
                msg: format!(
                    "the weights do not fit the configured model ({} missing, {} unknown, {} \
                     with another shape; listed above); nothing written (check --config/--set, \
                     or --no-check to write anyway)",
                    report.missing.len(),
                    report.unknown.len(),
                    report.wrong_shape.len()
                ),
            });
        }
    }
    write_safetensors(&args.out, &weights)?;
    println!(
        "wrote {} tensors ({} parameters checked against the model) to {}",
        weights.len(),
        if report.is_ok() { expected.len() } else { 0 },
        args.out.display()
    );
    Ok(())
}

/// `ferrofold plot RUN_DIR`.
pub fn plot(args: &PlotArgs) -> Result<()> {
    let files = crate::train::plot::plot_run(&args.run_dir, args.out.as_deref())?;
    for f in files {
        println!("wrote {}", f.display());
    }
    Ok(())
}

/// A table of per-protein metrics and the mean.
pub fn print_eval_summary(step: u64, metrics: &BTreeMap<String, f64>) {
    let cols = [
        "lddt_ca", "gdt_ts", "gdt_ha", "rmsd_ca", "drmsd_ca", "plddt",
    ];
    let mut ids: Vec<&str> = metrics
        .keys()
        .filter_map(|k| k.split_once('/').map(|(id, _)| id))
        .collect();
    ids.dedup();
    println!("evaluation at step {step} (EMA weights, full-length validation chains):");
    println!(
        "{:<10} {}",
        "chain",
        cols.map(|c| format!("{c:>9}")).join("")
    );
    let row = |prefix: &str| {
        cols.map(|c| match metrics.get(&format!("{prefix}{c}")) {
            Some(v) => format!("{v:>9.3}"),
            None => format!("{:>9}", "-"),
        })
        .join("")
    };
    for id in ids {
        println!("{id:<10} {}", row(&format!("{id}/")));
    }
    println!("{:<10} {}", "mean", row(""));
}
