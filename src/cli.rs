//! Command-line interface (clap derive). Doc comments are the help text.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::Config;
use crate::error::Result;

/// ferrofold: train AlphaFold2-style protein structure models at scale.
#[derive(Debug, Parser)]
#[command(name = "ferrofold", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print version, features, MPI topology, devices and (with --config/--set) the resolved config.
    Info(InfoArgs),
    /// Data pipeline: build dataset manifests, prepare and inspect the HDF5 feature cache.
    Data(crate::data::command::DataArgs),
    /// Micro-benchmarks: time an Evoformer block/stack, or check CPU-vs-CUDA parity.
    Bench(crate::bench::BenchArgs),
}

/// Flags shared by every subcommand that reads a configuration.
#[derive(Debug, Clone, Args, Default)]
pub struct CommonArgs {
    /// Config file; repeat to layer (base, then stage, then overlays; later files win).
    #[arg(long = "config", value_name = "FILE")]
    pub config: Vec<PathBuf>,
    /// Override one key after all files, e.g. `--set optim.lr=5e-4` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Run directory (resolved config, logs, checkpoints, metrics).
    #[arg(long = "run-dir", value_name = "DIR")]
    pub run_dir: Option<PathBuf>,
}

impl CommonArgs {
    /// Resolve the layered configuration.
    pub fn resolve(&self) -> Result<Config> {
        Config::load(&self.config, &self.set)
    }

    /// True when the user gave any configuration input.
    pub fn has_config(&self) -> bool {
        !self.config.is_empty() || !self.set.is_empty()
    }
}

/// `ferrofold info`.
#[derive(Debug, Args)]
pub struct InfoArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Preflight: check that every rank agrees (version, config hash) and that an all-reduce of known
    /// values is right; exit non-zero otherwise.
    #[arg(long)]
    pub check: bool,
}
