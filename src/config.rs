//! Layered configuration.
//!
//! One serde struct per concern (model, data, loss, optim, parallel, train, log), every struct with
//! `deny_unknown_fields` and a `Default` holding the AlphaFold2 supplement values (Jumper et al. 2021,
//! Supplementary Information, sections 1.4-1.11 and Table 4).
//!
//! Layering: base file → stage file → overlay files → `--set a.b=v`, in the order given. Each layer is
//! first checked on its own (so an unknown key is reported with the file it came from), then the
//! layers are deep-merged as TOML tables and deserialised once, then [`Config::validate`] runs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The whole resolved configuration of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub model: ModelConfig,
    pub data: DataConfig,
    pub loss: LossConfig,
    pub optim: OptimConfig,
    pub parallel: ParallelConfig,
    pub train: TrainConfig,
    pub log: LogConfig,
}

// ---------------------------------------------------------------------------------------------
// Model
// ---------------------------------------------------------------------------------------------

/// Model dimensions (AF2 supplement Table / section 1.5-1.9 values as defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// MSA representation channels.
    pub c_m: usize,
    /// Pair representation channels.
    pub c_z: usize,
    /// Single representation channels.
    pub c_s: usize,
    /// Extra-MSA representation channels.
    pub c_e: usize,
    /// `target_feat` channels (has_break + one-hot aatype).
    pub tf_dim: usize,
    /// `msa_feat` channels.
    pub msa_dim: usize,
    /// Extra-MSA feature channels (one-hot 23 + has_deletion + deletion_value).
    pub extra_msa_dim: usize,
    /// Relative position clipping (Algorithm 4): 2*relpos_k+1 bins.
    pub relpos_k: usize,
    pub recycling: RecyclingConfig,
    pub evoformer: StackConfig,
    pub extra_msa: StackConfig,
    pub structure: StructureConfig,
    pub heads: HeadsConfig,
    /// Activation recomputation policy for the Evoformer and extra-MSA stacks.
    pub remat: Remat,
    /// Override of `remat` for the extra-MSA stack alone (`None`: as `remat`). The extra-MSA
    /// blocks' saved state is small once the row attention runs fused (no `[S, H, R, R]`
    /// probabilities), so `none` here trades ~1.5 GB per block for skipping their recompute.
    pub extra_msa_remat: Option<Remat>,
    /// How the Evoformer and extra-MSA blocks are differentiated.
    pub backward: TrunkBackward,
    /// Large value used for attention mask biases in the trunk (`inf * (mask - 1)`).
    pub inf: f64,
    /// Small epsilon for the outer product mean normalisation.
    pub eps_opm: f64,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            c_m: 256,
            c_z: 128,
            c_s: 384,
            c_e: 64,
            tf_dim: 22,
            msa_dim: 49,
            extra_msa_dim: 25,
            relpos_k: 32,
            recycling: RecyclingConfig::default(),
            evoformer: StackConfig::evoformer(),
            extra_msa: StackConfig::extra_msa(),
            structure: StructureConfig::default(),
            heads: HeadsConfig::default(),
            remat: Remat::Block,
            extra_msa_remat: None,
            backward: TrunkBackward::Manual,
            inf: 1e9,
            eps_opm: 1e-3,
        }
    }
}

/// Activation recomputation ("remat") policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Remat {
    /// Keep every activation (fastest, most memory).
    None,
    /// Keep only block inputs; recompute each block in backward.
    Block,
}

/// How the trunk blocks' backward pass is computed. Both give the same gradients up to
/// floating-point summation order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TrunkBackward {
    /// candle's autograd over each block's graph.
    Autograd,
    /// Hand-written per-module backward passes (`model::vjp`): far fewer kernels and no
    /// per-edge gradient buffers.
    Manual,
}

/// Recycling embedder and iteration count (Algorithm 32).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecyclingConfig {
    pub min_bin: f64,
    pub max_bin: f64,
    pub no_bins: usize,
    /// Maximum number of recycling iterations (the number of forward passes is this + 1).
    pub max_iters: usize,
    /// Upper edge of the last distance bin.
    pub inf: f64,
}

impl Default for RecyclingConfig {
    fn default() -> Self {
        Self {
            min_bin: 3.25,
            max_bin: 20.75,
            no_bins: 15,
            max_iters: 3,
            inf: 1e8,
        }
    }
}

/// One Evoformer-like stack (main Evoformer or extra-MSA stack), Algorithms 6 and 18.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StackConfig {
    pub num_blocks: usize,
    /// Per-head hidden size of MSA row/column attention.
    pub c_hidden_msa_att: usize,
    pub no_heads_msa: usize,
    pub c_hidden_opm: usize,
    pub c_hidden_mul: usize,
    /// Per-head hidden size of triangle attention.
    pub c_hidden_pair_att: usize,
    pub no_heads_pair: usize,
    pub transition_n: usize,
    pub msa_dropout: f64,
    pub pair_dropout: f64,
}

impl StackConfig {
    /// Main Evoformer stack (48 blocks).
    pub fn evoformer() -> Self {
        Self {
            num_blocks: 48,
            c_hidden_msa_att: 32,
            no_heads_msa: 8,
            c_hidden_opm: 32,
            c_hidden_mul: 128,
            c_hidden_pair_att: 32,
            no_heads_pair: 4,
            transition_n: 4,
            msa_dropout: 0.15,
            pair_dropout: 0.25,
        }
    }
    /// Extra-MSA stack (4 blocks, global column attention).
    pub fn extra_msa() -> Self {
        Self {
            num_blocks: 4,
            c_hidden_msa_att: 8,
            ..Self::evoformer()
        }
    }
}

impl Default for StackConfig {
    fn default() -> Self {
        Self::evoformer()
    }
}

/// Structure module (Algorithm 20) and IPA (Algorithm 22).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StructureConfig {
    pub c_ipa: usize,
    pub c_resnet: usize,
    pub no_heads_ipa: usize,
    pub no_qk_points: usize,
    pub no_v_points: usize,
    pub dropout_rate: f64,
    pub no_blocks: usize,
    pub no_transition_layers: usize,
    pub no_resnet_blocks: usize,
    pub no_angles: usize,
    /// Translations are predicted in nm and scaled by this to Å.
    pub trans_scale_factor: f64,
    pub epsilon: f64,
    pub inf: f64,
}

impl Default for StructureConfig {
    fn default() -> Self {
        Self {
            c_ipa: 16,
            c_resnet: 128,
            no_heads_ipa: 12,
            no_qk_points: 4,
            no_v_points: 8,
            dropout_rate: 0.1,
            no_blocks: 8,
            no_transition_layers: 1,
            no_resnet_blocks: 2,
            no_angles: 7,
            trans_scale_factor: 10.0,
            epsilon: 1e-8,
            inf: 1e5,
        }
    }
}

/// Output heads (section 1.9).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeadsConfig {
    pub plddt_no_bins: usize,
    pub plddt_c_hidden: usize,
    pub distogram_no_bins: usize,
    pub masked_msa_c_out: usize,
    pub experimentally_resolved_c_out: usize,
    /// Predicted-TM / PAE head (off in the monomer initial-training model).
    pub tm: TmHead,
    pub tm_no_bins: usize,
}

impl Default for HeadsConfig {
    fn default() -> Self {
        Self {
            plddt_no_bins: 50,
            plddt_c_hidden: 128,
            distogram_no_bins: 64,
            masked_msa_c_out: 23,
            experimentally_resolved_c_out: 37,
            tm: TmHead::Off,
            tm_no_bins: 64,
        }
    }
}

/// Whether the TM/PAE head exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TmHead {
    Off,
    On,
}

// ---------------------------------------------------------------------------------------------
// Data
// ---------------------------------------------------------------------------------------------

/// Data pipeline settings (section 1.2, Table 4 for crop/MSA sizes).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Data root; `None` = env `FERROFOLD_DATA`, else `../shared/data/proteins`.
    pub data_root: Option<PathBuf>,
    /// Dataset manifest (TOML, see `datasets/`).
    pub manifest: PathBuf,
    /// HDF5 feature cache to read instead of text files, if given.
    pub cache: Option<PathBuf>,
    pub crop_size: usize,
    pub max_msa_clusters: usize,
    pub max_extra_msa: usize,
    /// Maximum number of MSA sequences read from alignment files before clustering.
    pub max_msa_seqs: usize,
    pub masked_msa: MaskedMsaConfig,
    pub block_delete: BlockDeleteConfig,
    /// Training filters (OpenFold-style sampling).
    pub max_resolution: f64,
    pub max_single_residue_fraction: f64,
    pub min_length: usize,
    pub loader: LoaderConfig,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            data_root: None,
            manifest: PathBuf::from("datasets/sample.toml"),
            cache: None,
            crop_size: 256,
            max_msa_clusters: 128,
            max_extra_msa: 1024,
            max_msa_seqs: 16384,
            masked_msa: MaskedMsaConfig::default(),
            block_delete: BlockDeleteConfig::default(),
            max_resolution: 9.0,
            max_single_residue_fraction: 0.8,
            min_length: 16,
            loader: LoaderConfig::default(),
        }
    }
}

impl DataConfig {
    /// The data root after applying the documented fallbacks.
    pub fn resolved_data_root(&self) -> PathBuf {
        if let Some(root) = &self.data_root {
            return root.clone();
        }
        if let Some(env) = std::env::var_os("FERROFOLD_DATA") {
            return PathBuf::from(env);
        }
        PathBuf::from("../shared/data/proteins")
    }
}

/// BERT-style MSA masking (section 1.2.7).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MaskedMsaConfig {
    pub replace_fraction: f64,
    pub uniform_prob: f64,
    pub profile_prob: f64,
    pub same_prob: f64,
}

impl Default for MaskedMsaConfig {
    fn default() -> Self {
        Self {
            replace_fraction: 0.15,
            uniform_prob: 0.1,
            profile_prob: 0.1,
            same_prob: 0.1,
        }
    }
}

/// MSA block deletion (Algorithm 1).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BlockDeleteConfig {
    pub msa_fraction_per_block: f64,
    pub num_blocks: usize,
    /// Off (no block deletion) or on.
    pub mode: BlockDeleteMode,
}

impl Default for BlockDeleteConfig {
    fn default() -> Self {
        Self {
            msa_fraction_per_block: 0.3,
            num_blocks: 5,
            mode: BlockDeleteMode::On,
        }
    }
}

/// Whether block deletion runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BlockDeleteMode {
    Off,
    On,
}

/// The prefetching loader.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoaderConfig {
    pub num_workers: usize,
    /// Samples built ahead (bounded buffer size).
    pub prefetch: usize,
    pub order: LoaderOrder,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        Self {
            num_workers: 2,
            prefetch: 4,
            order: LoaderOrder::NonBlocking,
        }
    }
}

/// How ready samples are handed to the trainer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoaderOrder {
    /// Take the lowest-index sample that is ready (a slow sample never stalls a step).
    NonBlocking,
    /// Strict index order (tests, bitwise reproducibility).
    Deterministic,
}

// ---------------------------------------------------------------------------------------------
// Loss
// ---------------------------------------------------------------------------------------------

/// Loss weights and settings (section 1.9, Table 4 / Eq. 7).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LossConfig {
    pub distogram_weight: f64,
    pub experimentally_resolved_weight: f64,
    pub fape_weight: f64,
    pub plddt_weight: f64,
    pub masked_msa_weight: f64,
    pub supervised_chi_weight: f64,
    pub violation_weight: f64,
    pub tm_weight: f64,
    pub fape: FapeConfig,
    pub chi: ChiConfig,
    pub violation: ViolationConfig,
    /// Distogram bin range (Å).
    pub distogram_min_bin: f64,
    pub distogram_max_bin: f64,
    /// lDDT loss cutoff and resolution filter.
    pub plddt_cutoff: f64,
    pub plddt_min_resolution: f64,
    pub plddt_max_resolution: f64,
    /// Global loss eps (OpenFold `config.loss.eps`): distogram, masked MSA, chi, exp. resolved, lDDT.
    pub eps: f64,
    /// Distogram bins (head output size).
    pub distogram_no_bins: usize,
    /// pLDDT bins (head output size).
    pub plddt_no_bins: usize,
    /// Masked-MSA classes (head output size).
    pub masked_msa_num_classes: usize,
    /// Resolution filter of the experimentally-resolved loss.
    pub experimentally_resolved_min_resolution: f64,
    pub experimentally_resolved_max_resolution: f64,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            distogram_weight: 0.3,
            experimentally_resolved_weight: 0.0,
            fape_weight: 1.0,
            plddt_weight: 0.01,
            masked_msa_weight: 2.0,
            supervised_chi_weight: 1.0,
            violation_weight: 0.0,
            tm_weight: 0.0,
            fape: FapeConfig::default(),
            chi: ChiConfig::default(),
            violation: ViolationConfig::default(),
            distogram_min_bin: 2.3125,
            distogram_max_bin: 21.6875,
            plddt_cutoff: 15.0,
            plddt_min_resolution: 0.1,
            plddt_max_resolution: 3.0,
            eps: 1e-8,
            distogram_no_bins: 64,
            plddt_no_bins: 50,
            masked_msa_num_classes: 23,
            experimentally_resolved_min_resolution: 0.1,
            experimentally_resolved_max_resolution: 3.0,
        }
    }
}

/// FAPE (Algorithm 28) settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FapeConfig {
    pub backbone_weight: f64,
    pub sidechain_weight: f64,
    pub clamp_distance: f64,
    pub loss_unit_distance: f64,
    /// Probability that a training sample uses clamped backbone FAPE (AF2: 0.9).
    pub clamp_prob: f64,
    /// FAPE eps (OpenFold function default 1e-4; the config value is never passed).
    pub eps: f64,
}

impl Default for FapeConfig {
    fn default() -> Self {
        Self {
            backbone_weight: 0.5,
            sidechain_weight: 0.5,
            clamp_distance: 10.0,
            loss_unit_distance: 10.0,
            clamp_prob: 0.9,
            eps: 1e-4,
        }
    }
}

/// Supervised chi loss (Algorithm 27).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ChiConfig {
    pub chi_weight: f64,
    pub angle_norm_weight: f64,
}

impl Default for ChiConfig {
    fn default() -> Self {
        Self {
            chi_weight: 0.5,
            angle_norm_weight: 0.01,
        }
    }
}

/// Structural violation loss (section 1.9.11).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ViolationConfig {
    pub tolerance_factor: f64,
    pub clash_overlap_tolerance: f64,
    pub average_clashes: ClashAveraging,
    /// eps of `violation_loss` only (OpenFold `config.loss.violation.eps`).
    pub eps: f64,
    /// `stereo_chemical_props.txt` (bond/angle tables); `None` = env `FERROFOLD_STEREO_PROPS`,
    /// else beside the data root.
    pub stereo_props: Option<PathBuf>,
}

impl Default for ViolationConfig {
    fn default() -> Self {
        Self {
            tolerance_factor: 12.0,
            clash_overlap_tolerance: 1.5,
            average_clashes: ClashAveraging::Off,
            eps: 1e-8,
            stereo_props: None,
        }
    }
}

/// Whether per-atom clash losses are averaged over the number of clashes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClashAveraging {
    Off,
    On,
}

// ---------------------------------------------------------------------------------------------
// Optimiser
// ---------------------------------------------------------------------------------------------

/// Adam + AF2 LR schedule (section 1.11.3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Linear warmup from 0 to `lr` over this many steps.
    pub warmup_steps: u64,
    /// After this step, multiply by `decay_factor` every `decay_every` steps.
    pub decay_start: u64,
    pub decay_every: u64,
    pub decay_factor: f64,
    /// Clip gradients to this global L2 norm.
    pub grad_clip_norm: f64,
    /// EMA decay of the weights used for evaluation.
    pub ema_decay: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-6,
            warmup_steps: 1000,
            decay_start: 50_000,
            decay_every: 50_000,
            decay_factor: 0.95,
            grad_clip_norm: 0.1,
            ema_decay: 0.999,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Parallel
// ---------------------------------------------------------------------------------------------

/// Distributed layout: world = data-parallel groups × DAP groups.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ParallelConfig {
    /// Ranks per DAP group (1 = no DAP).
    pub dap_size: usize,
    /// Communication backend.
    pub backend: CommBackend,
    /// Overlap of DAP communication with computation.
    pub overlap: Overlap,
    /// Dedicated evaluation ranks: the last `eval_ranks` world ranks do not train, they evaluate
    /// the EMA weights handed over by training rank 0 (MPI on the CPU; needs
    /// `train.eval_mode = "async"`). 0 = evaluate on a background thread of every rank.
    pub eval_ranks: usize,
    /// Gradient all-reduce bucket size in MiB.
    pub bucket_mib: usize,
}

impl Default for ParallelConfig {
    fn default() -> Self {
        Self {
            dap_size: 1,
            backend: CommBackend::Auto,
            overlap: Overlap::DualityAsync,
            eval_ranks: 0,
            bucket_mib: 25,
        }
    }
}

/// Which collective library carries tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CommBackend {
    /// NCCL for GPU tensors, MPI for CPU tensors.
    Auto,
    Mpi,
    Nccl,
}

/// DAP communication overlap strategy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Overlap {
    /// Blocking collectives.
    Off,
    /// Launch collectives early, wait late (FastFold's duality async).
    DualityAsync,
}

// ---------------------------------------------------------------------------------------------
// Train
// ---------------------------------------------------------------------------------------------

/// Training loop settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    pub seed: u64,
    pub max_steps: u64,
    /// Samples per rank per step.
    pub batch_size: usize,
    pub device: DeviceKind,
    pub precision: Precision,
    pub checkpoint_every: u64,
    pub keep_last: usize,
    pub eval_every: u64,
    /// Stop when the validation avg lDDT-Cα reaches this (MLPerf-style timed convergence).
    pub target_lddt_ca: Option<f64>,
    /// How evaluations run: `async` (default) on a background thread with its own model instance
    /// while training continues, or `sync` (training waits).
    pub eval_mode: EvalMode,
    /// Use CUDA graph capture of the step (GPU only).
    pub cuda_graphs: CudaGraphs,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            seed: 42,
            max_steps: 10_000_000,
            batch_size: 1,
            device: DeviceKind::Auto,
            precision: Precision::Bf16,
            checkpoint_every: 1000,
            keep_last: 3,
            eval_every: 1000,
            target_lddt_ca: None,
            eval_mode: EvalMode::Async,
            cuda_graphs: CudaGraphs::Off,
        }
    }
}

/// Evaluation scheduling (`train.eval_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EvalMode {
    /// Training waits for each evaluation.
    Sync,
    /// Evaluation of an EMA snapshot runs on a background thread; its result is taken at a step
    /// boundary agreed by all ranks.
    Async,
}

/// Device selection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    /// CUDA (GPU = local rank) when built with `cuda` and a GPU is present, else CPU.
    Auto,
    Cpu,
    Cuda,
}

/// Numeric precision of the trunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    Fp32,
    /// bf16 Evoformer trunk, fp32 master weights, structure module/losses in fp32.
    Bf16,
}

/// CUDA graph capture mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CudaGraphs {
    Off,
    On,
}

// ---------------------------------------------------------------------------------------------
// Log
// ---------------------------------------------------------------------------------------------

/// Logging settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Write a metrics line every this many steps.
    pub every: u64,
    pub progress: Progress,
    /// Emit `:::MLLOG` lines.
    pub mllog: MlLog,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            every: 1,
            progress: Progress::Auto,
            mllog: MlLog::Off,
        }
    }
}

/// Progress bar policy (rank 0 only in every case).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Progress {
    /// Only when stderr is a terminal.
    Auto,
    Always,
    Never,
}

/// MLPerf logging.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MlLog {
    Off,
    On,
}

// ---------------------------------------------------------------------------------------------
// Layering
// ---------------------------------------------------------------------------------------------

/// Name used in errors for values given with `--set`.
pub const SET_SOURCE: &str = "--set";

impl Config {
    /// Resolve a configuration from files (in layer order) and `--set key=value` overrides.
    pub fn load(files: &[PathBuf], sets: &[String]) -> Result<Config> {
        let mut merged = toml::Table::new();
        for file in files {
            let layer = read_layer(file)?;
            deep_merge(&mut merged, layer);
        }
        for set in sets {
            let layer = parse_set(set)?;
            deep_merge(&mut merged, layer);
        }
        let cfg: Config = toml::Value::Table(merged)
            .try_into()
            .map_err(|e: toml::de::Error| Error::config("resolved", "", e.message().to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Check cross-field constraints. Errors name the key.
    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, msg: String| Err(Error::config("resolved", key, msg));
        let m = &self.model;
        for (key, v) in [
            ("model.c_m", m.c_m),
            ("model.c_z", m.c_z),
            ("model.c_s", m.c_s),
            ("model.c_e", m.c_e),
            ("model.evoformer.no_heads_msa", m.evoformer.no_heads_msa),
            ("model.evoformer.no_heads_pair", m.evoformer.no_heads_pair),
            ("model.extra_msa.no_heads_msa", m.extra_msa.no_heads_msa),
            ("model.extra_msa.no_heads_pair", m.extra_msa.no_heads_pair),
            ("model.structure.no_blocks", m.structure.no_blocks),
            ("model.structure.no_heads_ipa", m.structure.no_heads_ipa),
            ("data.crop_size", self.data.crop_size),
            ("data.max_msa_clusters", self.data.max_msa_clusters),
            ("train.batch_size", self.train.batch_size),
            ("train.keep_last", self.train.keep_last),
            ("parallel.dap_size", self.parallel.dap_size),
        ] {
            if v == 0 {
                return bad(key, "must be > 0".into());
            }
        }
        if m.recycling.no_bins < 2 || m.recycling.min_bin >= m.recycling.max_bin {
            return bad(
                "model.recycling",
                format!(
                    "need no_bins >= 2 and min_bin < max_bin (got {} bins over [{}, {}])",
                    m.recycling.no_bins, m.recycling.min_bin, m.recycling.max_bin
                ),
            );
        }
        for (key, p) in [
            ("model.evoformer.msa_dropout", m.evoformer.msa_dropout),
            ("model.evoformer.pair_dropout", m.evoformer.pair_dropout),
            ("model.extra_msa.msa_dropout", m.extra_msa.msa_dropout),
            ("model.extra_msa.pair_dropout", m.extra_msa.pair_dropout),
            ("model.structure.dropout_rate", m.structure.dropout_rate),
            (
                "data.masked_msa.replace_fraction",
                self.data.masked_msa.replace_fraction,
            ),
            ("loss.fape.clamp_prob", self.loss.fape.clamp_prob),
            ("optim.ema_decay", self.optim.ema_decay),
            ("optim.beta1", self.optim.beta1),
            ("optim.beta2", self.optim.beta2),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return bad(key, format!("must be in [0, 1], got {p}"));
            }
        }
        let mm = &self.data.masked_msa;
        if mm.uniform_prob + mm.profile_prob + mm.same_prob > 1.0 {
            return bad(
                "data.masked_msa",
                "uniform_prob + profile_prob + same_prob must be <= 1".into(),
            );
        }
        if !(self.optim.lr > 0.0 && self.optim.lr.is_finite()) {
            return bad(
                "optim.lr",
                format!("must be a positive number, got {}", self.optim.lr),
            );
        }
        if self.optim.grad_clip_norm <= 0.0 {
            return bad("optim.grad_clip_norm", "must be > 0".into());
        }
        if self.optim.decay_every == 0 {
            return bad("optim.decay_every", "must be > 0".into());
        }
        if self.parallel.eval_ranks > 0 && self.train.eval_mode != EvalMode::Async {
            return bad(
                "parallel.eval_ranks",
                format!(
                    "dedicated evaluation ranks ({}) evaluate beside training: they need \
                     train.eval_mode = \"async\"",
                    self.parallel.eval_ranks
                ),
            );
        }
        if let Some(t) = self.train.target_lddt_ca {
            if !(0.0..=1.0).contains(&t) {
                return bad(
                    "train.target_lddt_ca",
                    format!("must be in [0, 1], got {t}"),
                );
            }
        }
        Ok(())
    }

    /// Canonical TOML text of the resolved config.
    pub fn to_toml(&self) -> Result<String> {
        toml::to_string_pretty(self).map_err(|e| Error::config("resolved", "", e.to_string()))
    }

    /// Short content hash of the resolved config (hex, 16 chars): stored in checkpoints and logs.
    pub fn hash(&self) -> Result<String> {
        let text = self.to_toml()?;
        let digest = Sha256::digest(text.as_bytes());
        Ok(digest.iter().take(8).map(|b| format!("{b:02x}")).collect())
    }

    /// Write the resolved config to `run_dir/config.toml` (atomically) and return its path.
    pub fn write_resolved(&self, run_dir: &Path) -> Result<PathBuf> {
        std::fs::create_dir_all(run_dir).map_err(|e| Error::io(run_dir, e))?;
        let path = run_dir.join("config.toml");
        let tmp = run_dir.join(".config.toml.tmp");
        let text = format!(
            "# resolved ferrofold config, hash {}\n{}",
            self.hash()?,
            self.to_toml()?
        );
        std::fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| Error::io(&path, e))?;
        Ok(path)
    }
}

/// Read one config file, check its keys against the schema (reporting the file and line on error),
/// and return it as a TOML table for merging.
fn read_layer(path: &Path) -> Result<toml::Table> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let name = path.display().to_string();
    // Check this layer alone: every struct has `#[serde(default)]`, so a partial file deserialises,
    // while an unknown key or wrong type fails with a span into *this* file.
    if let Err(e) = toml::from_str::<Config>(&text) {
        return Err(Error::config(
            name,
            describe_span(&text, &e),
            e.message().to_string(),
        ));
    }
    text.parse::<toml::Table>().map_err(|e| {
        Error::config(
            path.display().to_string(),
            describe_span(&text, &e),
            e.message().to_string(),
        )
    })
}

/// "line N" for a TOML error with a span.
fn describe_span(text: &str, e: &toml::de::Error) -> String {
    match e.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].lines().count().max(1);
            let line_text = text.lines().nth(line - 1).unwrap_or("").trim();
            format!("line {line} (`{line_text}`)")
        }
        None => String::new(),
    }
}

/// Parse `a.b.c=value` into a nested table. The value is parsed as a TOML value (numbers, booleans,
/// strings in quotes, arrays); a bare word that is not valid TOML is taken as a string.
pub fn parse_set(set: &str) -> Result<toml::Table> {
    let (key, raw) = set.split_once('=').ok_or_else(|| {
        Error::config(
            SET_SOURCE,
            set,
            "expected KEY=VALUE, e.g. --set optim.lr=5e-4",
        )
    })?;
    let key = key.trim();
    if key.is_empty() || key.split('.').any(|p| p.is_empty()) {
        return Err(Error::config(SET_SOURCE, key, "empty key segment"));
    }
    let raw = raw.trim();
    let value: toml::Value = match format!("v = {raw}").parse::<toml::Table>() {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or(toml::Value::String(raw.to_string())),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let mut table = toml::Table::new();
    let parts: Vec<&str> = key.split('.').collect();
    insert_path(&mut table, &parts, value);
    // Check the single override against the schema so the error names the key.
    let probe = toml::Value::Table(table.clone());
    if let Err(e) = probe.try_into::<Config>() {
        return Err(Error::config(
            SET_SOURCE,
            key,
            format!("{} (value `{raw}`)", e.message()),
        ));
    }
    Ok(table)
}

fn insert_path(table: &mut toml::Table, parts: &[&str], value: toml::Value) {
    match parts {
        [] => {}
        [last] => {
            table.insert((*last).to_string(), value);
        }
        [first, rest @ ..] => {
            let entry = table
                .entry((*first).to_string())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if !entry.is_table() {
                *entry = toml::Value::Table(toml::Table::new());
            }
            if let toml::Value::Table(sub) = entry {
                insert_path(sub, rest, value);
            }
        }
    }
}

/// Deep-merge `over` into `base`: tables merge recursively, everything else is replaced.
pub fn deep_merge(base: &mut toml::Table, over: toml::Table) {
    for (k, v) in over {
        match (base.get_mut(&k), v) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => deep_merge(b, o),
            (_, v) => {
                base.insert(k, v);
            }
        }
    }
}

/// Flatten a config to `dotted.key = value` pairs (for logging hyper-parameters).
pub fn flatten(cfg: &Config) -> Result<BTreeMap<String, String>> {
    fn walk(prefix: &str, v: &toml::Value, out: &mut BTreeMap<String, String>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            other => {
                out.insert(prefix.to_string(), other.to_string());
            }
        }
    }
    let value =
        toml::Value::try_from(cfg).map_err(|e| Error::config("resolved", "", e.to_string()))?;
    let mut out = BTreeMap::new();
    walk("", &value, &mut out);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ferrofold-cfg-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn defaults_are_af2_values_and_valid() {
        let c = Config::default();
        assert_eq!(c.model.c_m, 256);
        assert_eq!(c.model.c_z, 128);
        assert_eq!(c.model.evoformer.num_blocks, 48);
        assert_eq!(c.model.extra_msa.num_blocks, 4);
        assert_eq!(c.data.crop_size, 256);
        assert_eq!(c.optim.grad_clip_norm, 0.1);
        c.validate().unwrap();
    }

    #[test]
    fn layers_merge_in_order_and_set_wins() {
        let d = tmpdir("layers");
        let a = write(
            &d,
            "a.toml",
            "[model]\nc_m = 32\nc_z = 16\n[optim]\nlr = 0.5\n",
        );
        let b = write(&d, "b.toml", "[model]\nc_z = 8\n");
        let cfg = Config::load(
            &[a, b],
            &["optim.lr=0.25".into(), "train.precision=fp32".into()],
        )
        .unwrap();
        assert_eq!(cfg.model.c_m, 32); // from a
        assert_eq!(cfg.model.c_z, 8); // b overrides a
        assert_eq!(cfg.optim.lr, 0.25); // --set overrides files
        assert_eq!(cfg.train.precision, Precision::Fp32);
        assert_eq!(cfg.model.c_s, 384); // untouched default
    }

    #[test]
    fn unknown_key_names_file_and_key() {
        let d = tmpdir("unknown");
        let a = write(&d, "bad.toml", "[model]\nc_m = 32\nc_mm = 3\n");
        let err = Config::load(&[a], &[]).unwrap_err().to_string();
        assert!(err.contains("bad.toml"), "{err}");
        assert!(err.contains("c_mm"), "{err}");
    }

    #[test]
    fn bad_set_value_names_key() {
        let err = Config::load(&[], &["optim.lr=fast".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--set") && err.contains("optim.lr"), "{err}");
        let err = Config::load(&[], &["optim.nope=1".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("optim.nope") && err.contains("nope"), "{err}");
        let err = Config::load(&[], &["novalue".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("KEY=VALUE"), "{err}");
        let err = Config::load(&[], &["train.precision=fp8".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("fp8"), "{err}");
    }

    #[test]
    fn missing_file_is_named() {
        let err = Config::load(&[PathBuf::from("/nonexistent/x.toml")], &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/x.toml"), "{err}");
    }

    #[test]
    fn validate_names_key() {
        let err = Config::load(&[], &["parallel.dap_size=0".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("parallel.dap_size"), "{err}");
        let err = Config::load(&[], &["optim.ema_decay=1.5".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("optim.ema_decay"), "{err}");
    }

    #[test]
    fn roundtrip_and_hash_is_stable() {
        let c = Config::default();
        let text = c.to_toml().unwrap();
        let back: Config = toml::from_str(&text).unwrap();
        assert_eq!(back, c);
        assert_eq!(c.hash().unwrap(), back.hash().unwrap());
        let mut d = c.clone();
        d.optim.lr = 2e-3;
        assert_ne!(c.hash().unwrap(), d.hash().unwrap());
    }

    #[test]
    fn write_resolved_is_readable() {
        let d = tmpdir("resolved");
        let c = Config::default();
        let p = c.write_resolved(&d).unwrap();
        let back = Config::load(&[p], &[]).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn shipped_configs_resolve() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("configs");
        let base = root.join("base.toml");
        for stack in [
            vec![base.clone()],
            vec![base.clone(), root.join("tiny.toml")],
            vec![base.clone(), root.join("stage/initial.toml")],
            vec![base.clone(), root.join("stage/finetune.toml")],
            vec![
                base.clone(),
                root.join("stage/initial.toml"),
                root.join("overlay/mlperf.toml"),
            ],
        ] {
            Config::load(&stack, &[]).unwrap_or_else(|e| panic!("{stack:?}: {e}"));
        }
        let ft = Config::load(&[base.clone(), root.join("stage/finetune.toml")], &[]).unwrap();
        assert_eq!(ft.data.crop_size, 384);
        assert_eq!(ft.data.max_msa_clusters, 512);
        assert_eq!(ft.data.max_extra_msa, 5120);
        assert_eq!(ft.loss.violation_weight, 1.0);
        assert_eq!(ft.loss.experimentally_resolved_weight, 0.01);
        let it = Config::load(&[base, root.join("stage/initial.toml")], &[]).unwrap();
        assert_eq!(it.data.crop_size, 256);
        assert_eq!(it.loss.violation_weight, 0.0);
    }
}
