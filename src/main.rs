//! The `ferrofold` binary: parse the CLI, bootstrap MPI, dispatch.

use anyhow::{bail, Context};
use clap::Parser;

use ferrofold::cli::{Cli, Command, InfoArgs};
use ferrofold::parallel::ParallelCtx;

fn main() {
    let cli = Cli::parse();
    let ctx = match ParallelCtx::init() {
        Ok(ctx) => ctx,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    ferrofold::logging::init(ctx.rank, ctx.world_size);
    tracing::info!("topology from {}: {}", ctx.source, ctx.describe());
    let result = match cli.command {
        Command::Info(args) => info(&ctx, &args),
        Command::Data(args) => ferrofold::data::command::run(&args).map_err(anyhow::Error::from),
        Command::Train(args) => match ferrofold::train::run::train(&ctx, &args) {
            Ok(0) => Ok(()),
            Ok(code) => {
                drop(ctx);
                std::process::exit(code);
            }
            Err(e) => Err(anyhow::Error::from(e)),
        },
        Command::Eval(args) => {
            ferrofold::train::run::eval(&ctx, &args).map_err(anyhow::Error::from)
        }
        Command::Plot(args) => ferrofold::train::run::plot(&args).map_err(anyhow::Error::from),
        Command::ConvertWeights(args) => {
            ferrofold::train::run::convert_weights(&args).map_err(anyhow::Error::from)
        }
        Command::Bench(args) => ferrofold::bench::run(&args).map_err(anyhow::Error::from),
    };
    if let Err(e) = result {
        eprintln!("[rank {}] error: {e:#}", ctx.rank);
        if ctx.world_size > 1 {
            // Other ranks may be waiting in a collective: take the whole job down.
            ctx.abort(1);
        }
        drop(ctx);
        std::process::exit(1);
    }
}

fn info(ctx: &ParallelCtx, args: &InfoArgs) -> anyhow::Result<()> {
    let cfg = args
        .common
        .resolve()
        .context("resolving the configuration")?;
    let device = ferrofold::device::describe(cfg.train.device, ctx.local_rank);
    if ctx.is_root() {
        println!("ferrofold {}", ferrofold::VERSION);
        println!("features: {}", ferrofold::enabled_features().join(", "));
        println!(
            "world: {} ranks on {} node(s)",
            ctx.world_size, ctx.num_nodes
        );
    }
    // Every rank reports itself, in rank order.
    for r in 0..ctx.world_size {
        if r == ctx.rank {
            println!("{} device {}", ctx.describe(), device);
            use std::io::Write;
            std::io::stdout().flush().ok();
        }
        ctx.barrier();
    }
    if ctx.is_root() && args.common.has_config() {
        println!("config hash: {}", cfg.hash()?);
        println!("--- resolved config ---\n{}", cfg.to_toml()?);
    }
    if let Some(dir) = &args.common.run_dir {
        if ctx.is_root() {
            let p = cfg.write_resolved(dir)?;
            println!("resolved config written to {}", p.display());
        }
    }
    if args.check {
        preflight(ctx, &cfg)?;
    }
    Ok(())
}

/// Every rank must run the same binary version with the same config, and an all-reduce of known
/// values must give the known sum.
fn preflight(ctx: &ParallelCtx, cfg: &ferrofold::config::Config) -> anyhow::Result<()> {
    ctx.require_collectives().context("preflight")?;
    let n = ctx.world_size as f64;
    // Each rank contributes [1, rank]: sums are n and n(n-1)/2.
    let sums = ctx.all_reduce_sum_f64(&[1.0, ctx.rank as f64]);
    let want = [n, n * (n - 1.0) / 2.0];
    if sums != want {
        bail!("preflight: all-reduce gave {sums:?}, expected {want:?}");
    }
    let fingerprint = fingerprint(&format!("{} {}", ferrofold::VERSION, cfg.hash()?));
    let lo = ctx.all_reduce_min_u64(fingerprint);
    let hi = ctx.all_reduce_max_u64(fingerprint);
    if lo != hi {
        bail!(
            "preflight: ranks disagree on binary version or config (rank {} has {})",
            ctx.rank,
            ferrofold::VERSION
        );
    }
    if ctx.is_root() {
        println!(
            "preflight ok: {} ranks, all-reduce correct, same version and config",
            ctx.world_size
        );
    }
    Ok(())
}

fn fingerprint(s: &str) -> u64 {
    // FNV-1a: stable across builds (std's hasher is not).
    ferrofold::train::seed::fnv1a64(s.as_bytes())
}
