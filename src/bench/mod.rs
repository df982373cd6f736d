//! `ferrofold bench`: micro-benchmarks of the trunk on CPU or CUDA.
//!
//! - `bench evoformer`: times one Evoformer block (Algorithm 6) or a stack of blocks, forward and
//!   forward+backward (through [`crate::model::remat::forward_blocks`], the training code path),
//!   and prints the median wall time, the achieved TFLOP/s (matmul FLOPs counted analytically by
//!   [`evoformer_block_flops`]; forward+backward counted as 3× forward, recomputation not counted)
//!   and, on CUDA, the peak memory in use.
//! - `bench parity`: the same randomly initialised block on two devices (default: f32 CPU vs f32
//!   CUDA), comparing outputs and gradients.
//! - `bench kernels`: each fused CUDA kernel against its composite twin ([`kernels`]).
//! - `bench ops`: the candle primitives the block is made of (softmax, layer norm, matmul, casts,
//!   broadcasts), timed alone at MSA-row-attention shapes.
//! - `bench step`: the whole AF2 training step (forward over the recycles, loss, remat backward,
//!   Adam) on a synthetic sample at the AF2 initial-training shape, eager and replayed from a CUDA
//!   graph ([`crate::train::graph`]); `--stack` adds the Evoformer stack alone.
//!
//! Timing: `warmup` untimed iterations, then `iters` timed ones; each iteration ends with
//! `Device::synchronize` before the clock is read, so the median is the true device time of the
//! whole pass (kernel launches included).
//!
//! Memory (CUDA only): candle allocates through cudarc's stream-ordered allocator
//! (`cuMemAllocAsync`, the device's current memory pool). The pool's `USED_MEM_HIGH` high-water
//! mark is reset before the timed passes and read after them: it is the peak of bytes held by live
//! tensors (parameters, inputs, activations, gradients), like PyTorch's `max_memory_allocated`.
//! cuBLAS workspaces and the CUDA context are outside the pool.

mod elem_kernels;
mod evoformer;
pub mod gpu_mem;
mod kernels;
mod ops;
mod parity;
mod step;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use clap::{Args, Subcommand, ValueEnum};

use crate::config::{Remat, StackConfig};
pub(crate) use crate::data::rng::splitmix64;
use crate::error::{Error, Result};
use crate::model::evoformer::{BlockConfig, EvoformerBlock};

pub use elem_kernels::{format_checks, format_rows, run_elem_kernels, ElemKernelsArgs};
pub use evoformer::{
    bench_block_config, bench_evoformer, evoformer_block_flops, evoformer_op_flops,
    extra_block_flops, extra_op_flops, format_evoformer, EvoformerBench, PassTiming, BLOCK_OPS,
};
pub use kernels::{bench_kernels, format_kernels, KernelCase, KernelTiming, KernelsArgs};
pub use ops::{bench_ops, format_ops, OpTiming};
pub use parity::{format_parity, parity, ParityRow};
pub use step::{
    bench_step, format_step, step_config, synthetic_features, synthetic_protein, GraphMode,
    StepBench, StepBenchArgs, StepPrecision, StepRow,
};

/// `ferrofold bench ...`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub what: BenchCommand,
}

/// What to benchmark.
#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Time an Evoformer block (or a stack of blocks): forward and forward+backward.
    Evoformer(EvoformerBenchArgs),
    /// Run the same random block on two devices and compare outputs and gradients.
    Parity(ParityArgs),
    /// Time the candle primitives the block is made of, at MSA-row-attention shapes.
    Ops(OpsArgs),
    /// Time each fused CUDA kernel against its composite twin (fwd, fwd+bwd, max error).
    Kernels(KernelsArgs),
    /// Fused element-wise CUDA kernels (gate, dropout+residual, Adam+EMA) vs their candle twins.
    ElemKernels(ElemKernelsArgs),
    /// Time the whole AF2 training step (forward, loss, backward, Adam), eager and CUDA graph.
    Step(StepBenchArgs),
}

/// `ferrofold bench ops`: primitives at the shapes of MSA row attention (`[S, H, R, R]` logits,
/// `[S, R, c_m]` activations).
#[derive(Debug, Clone, Args)]
pub struct OpsArgs {
    #[arg(long, default_value_t = 128)]
    pub n_seq: usize,
    #[arg(long, default_value_t = 256)]
    pub n_res: usize,
    #[arg(long, default_value_t = 256)]
    pub c_m: usize,
    #[arg(long, default_value_t = 8)]
    pub heads: usize,
    #[arg(long, default_value_t = 32)]
    pub c_hidden: usize,
    #[arg(long, value_enum, default_value_t = BenchDtype::Bf16)]
    pub dtype: BenchDtype,
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    #[arg(long, value_enum, default_value_t = BenchDevice::Cuda)]
    pub device: BenchDevice,
}

/// Activation dtype of a benchmark (parameters stay f32 masters, cast per use as in training).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchDtype {
    Bf16,
    F32,
}

impl BenchDtype {
    pub fn dtype(self) -> DType {
        match self {
            Self::Bf16 => DType::BF16,
            Self::F32 => DType::F32,
        }
    }
}

/// Activation recomputation policy (see [`Remat`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchRemat {
    None,
    Block,
}

impl From<BenchRemat> for Remat {
    fn from(r: BenchRemat) -> Self {
        match r {
            BenchRemat::None => Remat::None,
            BenchRemat::Block => Remat::Block,
        }
    }
}

/// How the trunk blocks are differentiated (see [`crate::config::TrunkBackward`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchBackward {
    Manual,
    Autograd,
}

impl From<BenchBackward> for crate::config::TrunkBackward {
    fn from(b: BenchBackward) -> Self {
        match b {
            BenchBackward::Manual => Self::Manual,
            BenchBackward::Autograd => Self::Autograd,
        }
    }
}

/// Device to run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchDevice {
    Cpu,
    Cuda,
}

impl BenchDevice {
    fn device(self) -> Result<Device> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda => {
                // (`device::select` applies the memory-pool policy.)
                crate::device::select(crate::config::DeviceKind::Cuda, 0)
            }
        }
    }
}

/// Which passes to time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchPasses {
    Fwd,
    FwdBwd,
    Both,
}

/// Block dimensions (AF2 Evoformer defaults).
#[derive(Debug, Clone, Args)]
pub struct BlockDims {
    /// MSA channels.
    #[arg(long, default_value_t = 256)]
    pub c_m: usize,
    /// Pair channels.
    #[arg(long, default_value_t = 128)]
    pub c_z: usize,
    /// MSA attention heads.
    #[arg(long, default_value_t = 8)]
    pub heads_msa: usize,
    /// MSA attention channels per head.
    #[arg(long, default_value_t = 32)]
    pub c_hidden_msa: usize,
    /// Triangle attention heads.
    #[arg(long, default_value_t = 4)]
    pub heads_pair: usize,
    /// Triangle attention channels per head.
    #[arg(long, default_value_t = 32)]
    pub c_hidden_pair: usize,
    /// Outer product mean hidden channels.
    #[arg(long, default_value_t = 32)]
    pub c_opm: usize,
    /// Triangle multiplication hidden channels.
    #[arg(long, default_value_t = 128)]
    pub c_mul: usize,
    /// Transition expansion factor.
    #[arg(long, default_value_t = 4)]
    pub transition_n: usize,
}

impl BlockDims {
    /// The block configuration (dropout off: benchmarks and parity runs are deterministic).
    pub fn block_config(&self, blocks: usize) -> BlockConfig {
        BlockConfig {
            c_m: self.c_m,
            c_z: self.c_z,
            stack: StackConfig {
                num_blocks: blocks,
                c_hidden_msa_att: self.c_hidden_msa,
                no_heads_msa: self.heads_msa,
                c_hidden_opm: self.c_opm,
                c_hidden_mul: self.c_mul,
                c_hidden_pair_att: self.c_hidden_pair,
                no_heads_pair: self.heads_pair,
                transition_n: self.transition_n,
                msa_dropout: 0.0,
                pair_dropout: 0.0,
            },
            inf: 1e9,
            eps_opm: 1e-3,
            eps_global: 1e-8,
            backward: crate::config::TrunkBackward::Manual,
        }
    }
}

/// `ferrofold bench evoformer`.
#[derive(Debug, Clone, Args)]
pub struct EvoformerBenchArgs {
    /// MSA sequences (S).
    #[arg(long, default_value_t = 128)]
    pub n_seq: usize,
    /// Residues (R).
    #[arg(long, default_value_t = 256)]
    pub n_res: usize,
    /// Number of blocks in the stack.
    #[arg(long, default_value_t = 1)]
    pub blocks: usize,
    #[arg(long, value_enum, default_value_t = BenchDtype::Bf16)]
    pub dtype: BenchDtype,
    #[arg(long, value_enum, default_value_t = BenchRemat::None)]
    pub remat: BenchRemat,
    /// Hand-written trunk backward (`manual`) or candle's autograd.
    #[arg(long, value_enum, default_value_t = BenchBackward::Manual)]
    pub backward: BenchBackward,
    /// Before timing, compare the hand-written backward with candle's autograd on these blocks
    /// (dropout on, the first sequence and last residue masked): outputs, input gradients and
    /// every parameter gradient (relative L2 error).
    #[arg(long)]
    pub check_backward: bool,
    /// Timed iterations (the median is reported).
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// Untimed warm-up iterations.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    #[arg(long, value_enum, default_value_t = BenchDevice::Cuda)]
    pub device: BenchDevice,
    #[arg(long, value_enum, default_value_t = BenchPasses::Both)]
    pub passes: BenchPasses,
    /// Allow TF32 tensor cores for f32 matmuls (CUDA only).
    #[arg(long)]
    pub tf32: bool,
    /// Seed of the random parameters and inputs.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also time each sub-module of the first block alone (forward and forward+backward).
    #[arg(long)]
    pub breakdown: bool,
    /// Which block: the Evoformer block (Algorithm 6) or the extra-MSA block (Algorithm 18).
    /// `extra` uses AF2's extra-MSA widths `c_m = 64`, `c_hidden_msa = 8` (overriding `--c-m` and
    /// `--c-hidden-msa`) and global column attention.
    #[arg(long, value_enum, default_value_t = BenchBlockKind::Evoformer)]
    pub block: BenchBlockKind,
    #[command(flatten)]
    pub dims: BlockDims,
}

/// Which block `bench evoformer` times.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BenchBlockKind {
    Evoformer,
    Extra,
}

/// `ferrofold bench parity`.
#[derive(Debug, Clone, Args)]
pub struct ParityArgs {
    #[arg(long, default_value_t = 8)]
    pub n_seq: usize,
    #[arg(long, default_value_t = 16)]
    pub n_res: usize,
    /// Reference device (always f32).
    #[arg(long, value_enum, default_value_t = BenchDevice::Cpu)]
    pub device_a: BenchDevice,
    /// Device under test.
    #[arg(long, value_enum, default_value_t = BenchDevice::Cuda)]
    pub device_b: BenchDevice,
    /// Activation dtype on the device under test.
    #[arg(long, value_enum, default_value_t = BenchDtype::F32)]
    pub dtype_b: BenchDtype,
    /// Pass if max |a − b| ≤ tol · max(1, max |a|) for every compared tensor.
    #[arg(long, default_value_t = 1e-4)]
    pub tol: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub dims: BlockDims,
}

pub(crate) fn fnv1a(s: &str) -> u64 {
    crate::train::seed::fnv1a64(s.as_bytes())
}

/// `n` uniform values in `[-1, 1)` from `seed`.
pub(crate) fn uniform(n: usize, seed: u64) -> Vec<f32> {
    let mut st = seed;
    (0..n)
        .map(|_| ((splitmix64(&mut st) >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0)
        .collect()
}

/// A random tensor (uniform in `[-scale, scale)`), generated on the CPU so every device gets the
/// same values, then moved to `dev` in `dtype`.
pub(crate) fn random_tensor(
    shape: &[usize],
    scale: f32,
    seed: u64,
    dtype: DType,
    dev: &Device,
) -> Result<Tensor> {
    let n = shape.iter().product();
    let v: Vec<f32> = uniform(n, seed).into_iter().map(|x| x * scale).collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(dev)?)
}

/// Overwrite every parameter with deterministic random values, in sorted name order: matrices
/// uniform with variance 1/fan_in, 1-D `weight`s (layer norms) `1 ± 0.1`, other vectors `± 0.1`.
/// (AF2's init zeroes the output projections, which would make every update vanish.)
pub(crate) fn randomize(vm: &VarMap, seed: u64) -> Result<()> {
    let data = vm
        .data()
        .lock()
        .map_err(|_| Error::Msg("bench: VarMap lock poisoned".into()))?;
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let var = &data[name];
        let dims = var.dims().to_vec();
        let s = seed ^ fnv1a(name);
        let t = if dims.len() >= 2 {
            let fan_in = dims[dims.len() - 1] as f32;
            random_tensor(&dims, (3.0 / fan_in).sqrt(), s, DType::F32, &Device::Cpu)?
        } else if name.ends_with("weight") {
            (random_tensor(&dims, 0.1, s, DType::F32, &Device::Cpu)? + 1.0)?
        } else {
            random_tensor(&dims, 0.1, s, DType::F32, &Device::Cpu)?
        };
        var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
    }
    Ok(())
}

/// Parameters (f32 masters on `dev`) and the blocks built on them.
pub(crate) fn build_blocks(
    cfg: &BlockConfig,
    dev: &Device,
    seed: u64,
) -> Result<(VarMap, Vec<EvoformerBlock>)> {
    build_blocks_with(cfg, dev, seed, EvoformerBlock::new)
}

/// [`build_blocks`] for any block constructor (e.g. `ExtraMsaBlock::new`).
pub(crate) fn build_blocks_with<B>(
    cfg: &BlockConfig,
    dev: &Device,
    seed: u64,
    new: impl Fn(VarBuilder, &BlockConfig) -> Result<B>,
) -> Result<(VarMap, Vec<B>)> {
    // Initial values from the seeded CPU generator (candle's `VarMap` would draw them with cuRAND
    // on a CUDA device, whose seeding kernel then shows in kernel profiles); all are overwritten
    // by `randomize` anyway.
    let svm = crate::model::init::SeededVarMap::new(seed);
    let vb = svm.builder(DType::F32, dev);
    let blocks = (0..cfg.stack.num_blocks)
        .map(|i| new(vb.pp("blocks").pp(i), cfg))
        .collect::<Result<Vec<_>>>()?;
    let vm = svm.varmap.clone();
    randomize(&vm, seed)?;
    Ok((vm, blocks))
}

/// Random `m` `[S, R, c_m]`, `z` `[R, R, c_z]`, all-ones masks, and random cotangents for both.
pub(crate) struct Inputs {
    pub(crate) m: Tensor,
    pub(crate) z: Tensor,
    pub(crate) msa_mask: Tensor,
    pub(crate) pair_mask: Tensor,
    pub(crate) dm: Tensor,
    pub(crate) dz: Tensor,
}

pub(crate) fn make_inputs(
    s: usize,
    r: usize,
    cfg: &BlockConfig,
    dtype: DType,
    dev: &Device,
    seed: u64,
) -> Result<Inputs> {
    let rt = |shape: &[usize], k: u64| random_tensor(shape, 1.0, seed ^ (k << 56), dtype, dev);
    Ok(Inputs {
        m: rt(&[s, r, cfg.c_m], 1)?,
        z: rt(&[r, r, cfg.c_z], 2)?,
        msa_mask: Tensor::ones((s, r), dtype, dev)?,
        pair_mask: Tensor::ones((r, r), dtype, dev)?,
        dm: rt(&[s, r, cfg.c_m], 3)?,
        dz: rt(&[r, r, cfg.c_z], 4)?,
    })
}

pub(crate) fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Entry point of `ferrofold bench`.
pub fn run(args: &BenchArgs) -> Result<()> {
    match &args.what {
        BenchCommand::Evoformer(a) => {
            let b = bench_evoformer(a)?;
            print!("{}", format_evoformer(a, &b));
            Ok(())
        }
        BenchCommand::Ops(a) => {
            let rows = bench_ops(a)?;
            print!("{}", format_ops(a, &rows));
            Ok(())
        }
        BenchCommand::Kernels(a) => {
            let rows = bench_kernels(a)?;
            print!("{}", format_kernels(a, &rows));
            Ok(())
        }
        BenchCommand::ElemKernels(a) => {
            let (checks, rows) = run_elem_kernels(a)?;
            let (table, ok) = format_checks(&checks);
            print!("{table}");
            print!("{}", format_rows(&rows));
            if ok {
                Ok(())
            } else {
                Err(Error::Msg("bench elem-kernels: self-check failed".into()))
            }
        }
        BenchCommand::Step(a) => {
            let b = bench_step(a)?;
            print!("{}", format_step(a, &b));
            let failed = b.checks.iter().any(|c| c.1 > 1e-6);
            if failed {
                Err(Error::Msg(
                    "bench step: graph replay differs from eager".into(),
                ))
            } else {
                Ok(())
            }
        }
        BenchCommand::Parity(a) => {
            let rows = parity(a)?;
            let (s, ok) = format_parity(a, &rows);
            print!("{s}");
            if ok {
                Ok(())
            } else {
                Err(Error::Msg("bench parity: tolerance exceeded".into()))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_even_and_odd() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
    }
}
