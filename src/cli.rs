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
    /// Train (or resume, or fine-tune) the AF2 model; writes checkpoints, metrics and evaluations
    /// to --run-dir. Exits 75 after a signal-triggered checkpoint (SIGUSR1/SIGTERM) so launchers
    /// can requeue.
    Train(TrainArgs),
    /// Evaluate a checkpoint on the validation chains (lDDT-Cα, GDT, RMSD, dRMSD; PDB outputs).
    Eval(EvalArgs),
    /// Plot a run's metrics (loss terms, evaluation, LR, gradient norm) as PNG files.
    Plot(PlotArgs),
    /// Convert OpenFold PyTorch weights (.pt) to a ferrofold .safetensors file (for
    /// `train --init-from` / `eval --checkpoint`), checking names and shapes against the model of
    /// the given configuration.
    ConvertWeights(ConvertArgs),
    /// Micro-benchmarks: time an Evoformer block/stack, or check CPU-vs-CUDA parity.
    Bench(crate::bench::BenchArgs),
}

/// `ferrofold train`.
#[derive(Debug, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// `auto`: continue from the newest checkpoint in the run dir if any; `never`: fresh (error if
    /// checkpoints exist); or a checkpoint directory to resume from.
    #[arg(long, default_value = "auto", value_name = "auto|never|DIR")]
    pub resume: String,
    /// Fine-tuning: initialise the weights (only) from a checkpoint directory or a .safetensors
    /// file; fresh optimiser and step. Ignored when the run dir already holds checkpoints.
    #[arg(long, value_name = "PATH")]
    pub init_from: Option<PathBuf>,
    /// Which weights of an --init-from checkpoint: `ema` or `model`.
    #[arg(long, default_value = "ema", value_parser = ["ema", "model"])]
    pub init_weights: String,
    /// Stop (with a checkpoint) after this many completed steps.
    #[arg(long, value_name = "N")]
    pub stop_at: Option<u64>,
}

/// `ferrofold eval`.
#[derive(Debug, Args)]
pub struct EvalArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Checkpoint directory (or a .safetensors weights file).
    #[arg(long, value_name = "PATH")]
    pub checkpoint: PathBuf,
    /// `ema` (default, what AF2 evaluates) or `model`.
    #[arg(long, default_value = "ema", value_parser = ["ema", "model"])]
    pub weights: String,
    /// Directory for predicted PDB files (default: <run-dir>/eval or ./eval-out).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

/// `ferrofold convert-weights`.
#[derive(Debug, Args)]
pub struct ConvertArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// OpenFold PyTorch checkpoint (a `torch.save` archive of a state dict or of a dict holding one).
    #[arg(long = "from", value_name = "FILE.pt")]
    pub from: PathBuf,
    /// Key of the state dict inside the checkpoint (e.g. `state_dict` for Lightning checkpoints).
    #[arg(long, value_name = "KEY")]
    pub key: Option<String>,
    /// Output .safetensors file.
    #[arg(long, value_name = "FILE.safetensors")]
    pub out: PathBuf,
    /// Write the file even if names or shapes do not match the configured model (the differences
    /// are still printed).
    #[arg(long)]
    pub no_check: bool,
}

/// `ferrofold plot`.
#[derive(Debug, Args)]
pub struct PlotArgs {
    /// Run directory holding metrics.jsonl.
    pub run_dir: PathBuf,
    /// Output directory for the PNG files (default: the run directory).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
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
