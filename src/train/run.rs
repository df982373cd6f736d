//! The `train`, `eval` and `plot` subcommands: build the process groups, the AF2 task and the
//! trainer from the resolved configuration, and report.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

use crate::cli::{EvalArgs, PlotArgs, TrainArgs};
use crate::error::{Error, Result};
use crate::parallel::{GroupCollective, ParallelCtx, ProcessGroups};
use crate::train::af2::{Af2Options, Af2Task};
use crate::train::weights::{load_into, read_weights, WeightsKind};
use crate::train::{Outcome, Resume, Task, Trainer, TrainerOptions};

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
    let groups = Arc::new(ProcessGroups::with_device(ctx, &cfg.parallel, &device)?);
    if ctx.is_root() {
        cfg.write_resolved(&run_dir)?;
    }
    let opts = Af2Options {
        shard: (groups.coords.dp_rank, groups.coords.dp_size),
        pdb_dir: ctx.is_root().then(|| run_dir.join("eval")),
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
    let mut trainer = Trainer::new(task, coll, &cfg, topts)?;
    let outcome = trainer.run()?;
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
