//! `ferrofold bench`: micro-benchmarks of the trunk on CPU or CUDA.
//!
//! - `bench evoformer`: times one Evoformer block (Algorithm 6) or a stack of blocks, forward and
//!   forward+backward (through [`crate::model::remat::forward_blocks`], the training code path),
//!   and prints the median wall time, the achieved TFLOP/s (matmul FLOPs counted analytically by
//!   [`evoformer_block_flops`]; forward+backward counted as 3× forward, recomputation not counted)
//!   and, on CUDA, the peak memory in use.
//! - `bench parity`: the same randomly initialised block on two devices (default: f32 CPU vs f32
//!   CUDA), comparing outputs and gradients.
//!
//! Timing: `warmup` untimed iterations, then `iters` timed ones; each iteration ends with
//! `Device::synchronize` before the clock is read, so the median is the true device time of the
//! whole pass (kernel launches included).
//!
//! Memory (CUDA only): candle allocates through cudarc's stream-ordered allocator
//! (`cuMemAllocAsync`, the device's current memory pool). The pool's `USED_MEM_HIGH` high-water
//! mark is reset before the timed passes and read after them: it is the peak of bytes held by live
//! tensors (parameters, inputs, activations, gradients), like PyTorch's `max_memory_allocated`.
//! cuBLAS workspaces and the CUDA context are outside the pool; `cuMemGetInfo` before/after is
//! printed as a cross-check.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use clap::{Args, Subcommand, ValueEnum};

use crate::config::{Remat, StackConfig};
use crate::error::{Error, Result};
use crate::model::evoformer::{BlockConfig, EvoformerBlock};
use crate::model::remat::forward_blocks;

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
            Self::Cuda => crate::device::select(crate::config::DeviceKind::Cuda, 0),
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
    #[command(flatten)]
    pub dims: BlockDims,
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

/// Timing of one pass kind.
#[derive(Debug, Clone, PartialEq)]
pub struct PassTiming {
    /// `"fwd"` or `"fwd+bwd"`.
    pub pass: &'static str,
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    /// Counted FLOPs of the pass (3× forward for forward+backward).
    pub flops: f64,
    /// Peak bytes in use (CUDA memory pool high-water mark) during the timed passes.
    pub peak_bytes: Option<u64>,
}

impl PassTiming {
    pub fn tflops(&self) -> f64 {
        self.flops / (self.median_ms * 1e-3) / 1e12
    }
}

/// Result of `bench evoformer`.
#[derive(Debug, Clone)]
pub struct EvoformerBench {
    pub device: String,
    pub passes: Vec<PassTiming>,
    /// Bytes in use after parameters and inputs were created (CUDA pool), before timing.
    pub resident_bytes: Option<u64>,
    /// Forward FLOPs of one block.
    pub block_flops: f64,
    /// Per sub-module timings of the first block (`--breakdown`): (name, fwd, fwd+bwd).
    pub breakdown: Vec<(&'static str, PassTiming, PassTiming)>,
}

/// Forward matmul FLOPs (2·m·n·k per product) of one Evoformer block at `n_seq × n_res`.
/// Elementwise ops, softmax and layer norms are not counted. At AF2 sizes and 128 × 256 this is
/// ≈ 216 GFLOP.
pub fn evoformer_block_flops(n_seq: usize, n_res: usize, cfg: &BlockConfig) -> f64 {
    evoformer_op_flops(n_seq, n_res, cfg)
        .iter()
        .map(|(_, f)| f)
        .sum()
}

/// Names of the block's sub-modules, in execution order.
pub const BLOCK_OPS: [&str; 9] = [
    "msa_att_row",
    "msa_att_col",
    "msa_transition",
    "outer_product_mean",
    "tri_mul_out",
    "tri_mul_in",
    "tri_att_start",
    "tri_att_end",
    "pair_transition",
];

/// Forward matmul FLOPs of each sub-module of one block (names as [`BLOCK_OPS`]).
pub fn evoformer_op_flops(
    n_seq: usize,
    n_res: usize,
    cfg: &BlockConfig,
) -> Vec<(&'static str, f64)> {
    let (s, r) = (n_seq as f64, n_res as f64);
    let (cm, cz) = (cfg.c_m as f64, cfg.c_z as f64);
    let st = &cfg.stack;
    let hm = (st.no_heads_msa * st.c_hidden_msa_att) as f64;
    let hp = (st.no_heads_pair * st.c_hidden_pair_att) as f64;
    let (nh_m, nh_p) = (st.no_heads_msa as f64, st.no_heads_pair as f64);
    let (copm, cmul, tn) = (
        st.c_hidden_opm as f64,
        st.c_hidden_mul as f64,
        st.transition_n as f64,
    );
    let mm = |m: f64, n: f64, k: f64| 2.0 * m * n * k;
    // MSA row attention with pair bias: q,k,v,g + out projections, pair bias, logits, values.
    let row =
        4.0 * mm(s * r, hm, cm) + mm(s * r, cm, hm) + mm(r * r, nh_m, cz) + 2.0 * s * mm(r, r, hm);
    // MSA column attention: attention over S within each residue.
    let col = 4.0 * mm(s * r, hm, cm) + mm(s * r, cm, hm) + 2.0 * r * mm(s, s, hm);
    let msa_trans = mm(s * r, tn * cm, cm) + mm(s * r, cm, tn * cm);
    let opm = 2.0 * mm(s * r, copm, cm) + mm(r * copm, r * copm, s) + mm(r * r, cz, copm * copm);
    // Triangle multiplication: a/b projections and gates, output gate, the triangle product,
    // output projection.
    let tri_mul =
        4.0 * mm(r * r, cmul, cz) + mm(r * r, cz, cz) + cmul * mm(r, r, r) + mm(r * r, cz, cmul);
    // Triangle attention: q,k,v,g, triangle bias, logits, values, output projection.
    let tri_att =
        4.0 * mm(r * r, hp, cz) + mm(r * r, nh_p, cz) + 2.0 * r * mm(r, r, hp) + mm(r * r, cz, hp);
    let pair_trans = mm(r * r, tn * cz, cz) + mm(r * r, cz, tn * cz);
    let f = [
        row, col, msa_trans, opm, tri_mul, tri_mul, tri_att, tri_att, pair_trans,
    ];
    BLOCK_OPS.iter().copied().zip(f).collect()
}

/// SplitMix64: a tiny deterministic generator (identical values on every device and platform).
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `n` uniform values in `[-1, 1)` from `seed`.
fn uniform(n: usize, seed: u64) -> Vec<f32> {
    let mut st = seed;
    (0..n)
        .map(|_| ((splitmix64(&mut st) >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0)
        .collect()
}

/// A random tensor (uniform in `[-scale, scale)`), generated on the CPU so every device gets the
/// same values, then moved to `dev` in `dtype`.
fn random_tensor(
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
fn randomize(vm: &VarMap, seed: u64) -> Result<()> {
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
fn build_blocks(
    cfg: &BlockConfig,
    dev: &Device,
    seed: u64,
) -> Result<(VarMap, Vec<EvoformerBlock>)> {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, dev);
    let blocks = (0..cfg.stack.num_blocks)
        .map(|i| EvoformerBlock::new(vb.pp("blocks").pp(i), cfg))
        .collect::<Result<Vec<_>>>()?;
    randomize(&vm, seed)?;
    Ok((vm, blocks))
}

/// Random `m` `[S, R, c_m]`, `z` `[R, R, c_z]`, all-ones masks, and random cotangents for both.
struct Inputs {
    m: Tensor,
    z: Tensor,
    msa_mask: Tensor,
    pair_mask: Tensor,
    dm: Tensor,
    dz: Tensor,
}

fn make_inputs(
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

/// One pass over the stack; returns the outputs (and the input gradients for forward+backward).
fn run_pass(
    blocks: &[EvoformerBlock],
    x: &Inputs,
    remat: Remat,
    backward: bool,
) -> Result<Vec<Tensor>> {
    let (m, z, tape) = forward_blocks(blocks, &x.m, &x.z, &x.msa_mask, &x.pair_mask, None, remat)?;
    if !backward {
        return Ok(vec![m, z]);
    }
    let mut grads = candle_core::backprop::GradStore::default();
    let (dm, dz) = tape.backward(&x.dm, &x.dz, &mut grads)?;
    Ok(vec![m, z, dm, dz])
}

fn median(v: &mut [f64]) -> f64 {
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

/// Run `bench evoformer` and return the measurements.
pub fn bench_evoformer(a: &EvoformerBenchArgs) -> Result<EvoformerBench> {
    if a.iters == 0 || a.blocks == 0 {
        return Err(Error::Msg(
            "bench: --iters and --blocks must be positive".into(),
        ));
    }
    let dev = a.device.device()?;
    #[cfg(feature = "cuda")]
    if a.tf32 {
        candle_core::cuda::set_gemm_reduced_precision_f32(true);
    }
    let cfg = a.dims.block_config(a.blocks);
    let (_vm, blocks) = build_blocks(&cfg, &dev, a.seed)?;
    let x = make_inputs(a.n_seq, a.n_res, &cfg, a.dtype.dtype(), &dev, a.seed)?;
    dev.synchronize()?;
    let mem = gpu_mem::PoolWatch::new(&dev)?;
    let resident_bytes = mem.as_ref().map(|w| w.used_now()).transpose()?;
    let block_flops = evoformer_block_flops(a.n_seq, a.n_res, &cfg);
    let remat: Remat = a.remat.into();
    let kinds: &[bool] = match a.passes {
        BenchPasses::Fwd => &[false],
        BenchPasses::FwdBwd => &[true],
        BenchPasses::Both => &[false, true],
    };
    let mut passes = Vec::new();
    for &backward in kinds {
        for _ in 0..a.warmup {
            drop(run_pass(&blocks, &x, remat, backward)?);
            dev.synchronize()?;
        }
        if let Some(w) = &mem {
            w.reset_peak()?;
        }
        let mut ms = Vec::with_capacity(a.iters);
        for _ in 0..a.iters {
            let t0 = Instant::now();
            let out = run_pass(&blocks, &x, remat, backward)?;
            dev.synchronize()?;
            ms.push(t0.elapsed().as_secs_f64() * 1e3);
            drop(out);
        }
        let peak_bytes = mem.as_ref().map(|w| w.peak()).transpose()?;
        let mult = if backward { 3.0 } else { 1.0 };
        passes.push(timing(
            if backward { "fwd+bwd" } else { "fwd" },
            ms,
            mult * block_flops * a.blocks as f64,
            peak_bytes,
        ));
    }
    let mut breakdown = Vec::new();
    if a.breakdown {
        let flops = evoformer_op_flops(a.n_seq, a.n_res, &cfg);
        for (i, &(name, f)) in flops.iter().enumerate() {
            let mut t = [None, None];
            for (k, backward) in [false, true].into_iter().enumerate() {
                for _ in 0..a.warmup {
                    drop(run_op(&blocks[0], i, &x, backward)?);
                    dev.synchronize()?;
                }
                let mut ms = Vec::with_capacity(a.iters);
                for _ in 0..a.iters {
                    let t0 = Instant::now();
                    let out = run_op(&blocks[0], i, &x, backward)?;
                    dev.synchronize()?;
                    ms.push(t0.elapsed().as_secs_f64() * 1e3);
                    drop(out);
                }
                t[k] = Some(timing(
                    if backward { "fwd+bwd" } else { "fwd" },
                    ms,
                    if backward { 3.0 * f } else { f },
                    None,
                ));
            }
            if let [Some(fw), Some(fb)] = t {
                breakdown.push((name, fw, fb));
            }
        }
    }
    Ok(EvoformerBench {
        device: describe_device(&dev),
        passes,
        resident_bytes,
        block_flops,
        breakdown,
    })
}

fn timing(pass: &'static str, mut ms: Vec<f64>, flops: f64, peak_bytes: Option<u64>) -> PassTiming {
    let min_ms = ms.iter().copied().fold(f64::INFINITY, f64::min);
    let max_ms = ms.iter().copied().fold(0.0, f64::max);
    PassTiming {
        pass,
        median_ms: median(&mut ms),
        min_ms,
        max_ms,
        flops,
        peak_bytes,
    }
}

/// Sub-module `op` (index into [`BLOCK_OPS`]) of `b` alone on the bench inputs (its update only,
/// no residual); with `backward`, also the gradients of its inputs and parameters.
fn run_op(b: &EvoformerBlock, op: usize, x: &Inputs, backward: bool) -> Result<Vec<Tensor>> {
    let m = candle_core::Var::from_tensor(&x.m)?;
    let z = candle_core::Var::from_tensor(&x.z)?;
    let (m, z) = (m.as_tensor(), z.as_tensor());
    let ps = &b.pair_stack;
    let out = match op {
        0 => b.msa_att_row.forward(m, z, &x.msa_mask)?,
        1 => b.msa_att_col.forward(m, &x.msa_mask)?,
        2 => b.msa_transition.forward(m, None)?,
        3 => b.outer_product_mean.forward(m, &x.msa_mask)?,
        4 => ps.tri_mul_out.forward(z, &x.pair_mask)?,
        5 => ps.tri_mul_in.forward(z, &x.pair_mask)?,
        6 => ps.tri_att_start.forward(z, &x.pair_mask)?,
        7 => ps.tri_att_end.forward(z, &x.pair_mask)?,
        _ => ps.pair_transition.forward(z, None)?,
    };
    if !backward {
        return Ok(vec![out]);
    }
    let g = if op <= 2 { &x.dm } else { &x.dz };
    let grads = crate::model::remat::backward_vars(&crate::model::remat::vjp_loss(&[(&out, g)])?)?;
    drop(grads);
    Ok(vec![out])
}

fn describe_device(dev: &Device) -> String {
    match dev {
        Device::Cpu => "cpu".into(),
        Device::Cuda(_) => "cuda:0".into(),
        _ => format!("{dev:?}"),
    }
}

fn mib(b: Option<u64>) -> String {
    b.map(|b| format!("{:.0}", b as f64 / (1024.0 * 1024.0)))
        .unwrap_or_else(|| "n/a".into())
}

/// The printed report of `bench evoformer` (a table plus one `RESULT` line per pass).
pub fn format_evoformer(a: &EvoformerBenchArgs, b: &EvoformerBench) -> String {
    let mut s = format!(
        "bench evoformer: device={} dtype={:?} n_seq={} n_res={} blocks={} remat={:?} iters={} warmup={} tf32={}\n",
        b.device, a.dtype, a.n_seq, a.n_res, a.blocks, a.remat, a.iters, a.warmup, a.tf32
    )
    .to_lowercase();
    s += &format!(
        "counted forward FLOPs: {:.4} GFLOP per block (fwd+bwd counted as 3x; remat recompute not counted)\n",
        b.block_flops / 1e9
    );
    s += "| pass | median ms | min ms | max ms | TFLOP/s | peak MiB |\n|---|---|---|---|---|---|\n";
    for p in &b.passes {
        s += &format!(
            "| {} | {:.3} | {:.3} | {:.3} | {:.2} | {} |\n",
            p.pass,
            p.median_ms,
            p.min_ms,
            p.max_ms,
            p.tflops(),
            mib(p.peak_bytes)
        );
    }
    s += &format!(
        "memory: resident before timing {} MiB; peak = CUDA memory-pool USED_MEM_HIGH during the timed passes (live tensors incl. params/inputs; cuBLAS workspace and context excluded)\n",
        mib(b.resident_bytes)
    );
    if !b.breakdown.is_empty() {
        s += "breakdown (first block, each sub-module alone, update only):\n| op | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | GFLOP fwd |\n|---|---|---|---|---|---|\n";
        let (mut sf, mut sb) = (0.0, 0.0);
        for (name, f, fb) in &b.breakdown {
            sf += f.median_ms;
            sb += fb.median_ms;
            s += &format!(
                "| {name} | {:.3} | {:.1} | {:.3} | {:.1} | {:.2} |\n",
                f.median_ms,
                f.tflops(),
                fb.median_ms,
                fb.tflops(),
                f.flops / 1e9
            );
        }
        s += &format!("| sum | {sf:.3} | | {sb:.3} | | |\n");
    }
    for p in &b.passes {
        s += &format!(
            "RESULT bench=evoformer device={} dtype={:?} n_seq={} n_res={} blocks={} remat={:?} pass={} median_ms={:.3} tflops={:.2} peak_mib={}\n",
            b.device, a.dtype, a.n_seq, a.n_res, a.blocks, a.remat, p.pass, p.median_ms, p.tflops(), mib(p.peak_bytes)
        )
        .to_lowercase()
        .replace("result bench", "RESULT bench");
    }
    s
}

/// One compared tensor of a parity run.
#[derive(Debug, Clone)]
pub struct ParityRow {
    pub name: String,
    pub max_abs_err: f64,
    pub max_abs_ref: f64,
}

impl ParityRow {
    pub fn rel(&self) -> f64 {
        self.max_abs_err / self.max_abs_ref.max(1.0)
    }
}

fn max_abs(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?
        .abs()?
        .max_all()?
        .to_scalar::<f64>()?)
}

/// Outputs/input gradients and named parameter gradients of one parity run (on the CPU).
type ParityRun = (Vec<Tensor>, Vec<(String, Tensor)>);

/// Run one block forward+backward (remat none) on two devices with identical parameters and
/// inputs; compare `m`, `z`, `dm`, `dz` and every parameter gradient.
pub fn parity(a: &ParityArgs) -> Result<Vec<ParityRow>> {
    let cfg = a.dims.block_config(1);
    let run = |dev: &Device, dtype: DType| -> Result<ParityRun> {
        let (vm, blocks) = build_blocks(&cfg, dev, a.seed)?;
        let x = make_inputs(a.n_seq, a.n_res, &cfg, dtype, dev, a.seed)?;
        let (m, z, tape) = forward_blocks(
            &blocks,
            &x.m,
            &x.z,
            &x.msa_mask,
            &x.pair_mask,
            None,
            Remat::None,
        )?;
        let mut grads = candle_core::backprop::GradStore::default();
        let (dm, dz) = tape.backward(&x.dm, &x.dz, &mut grads)?;
        let data = vm
            .data()
            .lock()
            .map_err(|_| Error::Msg("bench: VarMap lock poisoned".into()))?;
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        let mut pg = Vec::new();
        for n in names {
            if let Some(g) = grads.get(data[n].as_tensor()) {
                pg.push((n.clone(), g.to_device(&Device::Cpu)?));
            }
        }
        let outs = [m, z, dm, dz]
            .iter()
            .map(|t| Ok(t.to_device(&Device::Cpu)?))
            .collect::<Result<Vec<_>>>()?;
        Ok((outs, pg))
    };
    let (ra, ga) = run(&a.device_a.device()?, DType::F32)?;
    let (rb, gb) = run(&a.device_b.device()?, a.dtype_b.dtype())?;
    if ga.len() != gb.len() {
        return Err(Error::Msg(format!(
            "parity: {} parameter gradients on device A, {} on device B",
            ga.len(),
            gb.len()
        )));
    }
    let mut rows = Vec::new();
    let names = ["m", "z", "d_m_in", "d_z_in"];
    let pairs = names
        .iter()
        .map(|n| n.to_string())
        .zip(ra.iter().zip(rb.iter()))
        .chain(
            ga.iter()
                .zip(gb.iter())
                .map(|((n, x), (_, y))| (format!("grad {n}"), (x, y))),
        );
    for (name, (x, y)) in pairs {
        let x = x.to_dtype(DType::F64)?;
        let y = y.to_dtype(DType::F64)?;
        rows.push(ParityRow {
            name,
            max_abs_err: max_abs(&(&x - &y)?)?,
            max_abs_ref: max_abs(&x)?,
        });
    }
    Ok(rows)
}

/// The printed report of `bench parity`; the `bool` is true when every row passes.
pub fn format_parity(a: &ParityArgs, rows: &[ParityRow]) -> (String, bool) {
    let mut s = format!(
        "bench parity: a={:?}/f32 b={:?}/{:?} n_seq={} n_res={} tol={:e}\n",
        a.device_a, a.device_b, a.dtype_b, a.n_seq, a.n_res, a.tol
    )
    .to_lowercase();
    let worst = rows.iter().max_by(|x, y| x.rel().total_cmp(&y.rel()));
    for r in rows.iter().take(4) {
        s += &format!(
            "{:<8} max|a-b| {:.3e}  max|a| {:.3e}  rel {:.3e}\n",
            r.name,
            r.max_abs_err,
            r.max_abs_ref,
            r.rel()
        );
    }
    let ok = rows.iter().all(|r| r.rel() <= a.tol && r.rel().is_finite());
    if let Some(w) = worst {
        s += &format!(
            "worst of {} tensors ({} parameter gradients): {} rel {:.3e}\n",
            rows.len(),
            rows.len().saturating_sub(4),
            w.name,
            w.rel()
        );
    }
    s += if ok { "PARITY PASS\n" } else { "PARITY FAIL\n" };
    (s, ok)
}

/// One timed primitive of `bench ops`.
#[derive(Debug, Clone)]
pub struct OpTiming {
    pub name: String,
    pub fwd_ms: f64,
    pub fwd_bwd_ms: f64,
    /// Minimal bytes moved by the forward (inputs read once, output written once).
    pub bytes: f64,
    /// Matmul FLOPs of the forward (0 for elementwise/reduction ops).
    pub flops: f64,
}

type OpFn<'a> = Box<dyn Fn(&[Tensor]) -> Result<Tensor> + 'a>;

/// Time the candle primitives of the trunk at MSA row attention shapes.
pub fn bench_ops(a: &OpsArgs) -> Result<Vec<OpTiming>> {
    use crate::model::primitives::{softmax, softmax_with_biases, LayerNorm, Linear};
    let dev = a.device.device()?;
    let dt = a.dtype.dtype();
    let (s, r, h, c, cm) = (a.n_seq, a.n_res, a.heads, a.c_hidden, a.c_m);
    let esz = dt.size_in_bytes() as f64;
    let rt = |shape: &[usize], k: u64| random_tensor(shape, 1.0, k, dt, &dev);
    let w_lin = random_tensor(&[cm, cm], (3.0 / cm as f32).sqrt(), 11, DType::F32, &dev)?;
    let ln = LayerNorm {
        weight: (random_tensor(&[cm], 0.1, 12, DType::F32, &dev)? + 1.0)?,
        bias: random_tensor(&[cm], 0.1, 13, DType::F32, &dev)?,
        eps: 1e-5,
    };
    let lin = Linear {
        weight: w_lin,
        bias: None,
    };
    let logits = s * h * r * r;
    let act = s * r * cm;
    // (name, inputs, op, bytes, flops)
    let cases: Vec<(&str, Vec<Tensor>, OpFn, f64, f64)> = vec![
        (
            "softmax_with_biases [S,H,R,R]+[S,1,1,R]+[1,H,R,R]",
            vec![
                rt(&[s, h, r, r], 1)?,
                rt(&[s, 1, 1, r], 2)?,
                rt(&[1, h, r, r], 3)?,
            ],
            Box::new(|x: &[Tensor]| softmax_with_biases(&x[0], &[&x[1], &x[2]])),
            esz * 2.0 * logits as f64,
            0.0,
        ),
        (
            "softmax [S,H,R,R]",
            vec![rt(&[s, h, r, r], 1)?],
            Box::new(|x: &[Tensor]| softmax(&x[0])),
            esz * 2.0 * logits as f64,
            0.0,
        ),
        (
            "broadcast_add [S,H,R,R]+[1,H,R,R]",
            vec![rt(&[s, h, r, r], 1)?, rt(&[1, h, r, r], 3)?],
            Box::new(|x: &[Tensor]| Ok(x[0].broadcast_add(&x[1])?)),
            esz * 2.0 * logits as f64,
            0.0,
        ),
        (
            "to_dtype(f32) [S,H,R,R]",
            vec![rt(&[s, h, r, r], 1)?],
            Box::new(|x: &[Tensor]| Ok(x[0].to_dtype(DType::F32)?)),
            (esz + 4.0) * logits as f64,
            0.0,
        ),
        (
            "matmul q.kT [S*H,R,C]x[S*H,C,R]",
            vec![rt(&[s * h, r, c], 4)?, rt(&[s * h, r, c], 5)?],
            Box::new(|x: &[Tensor]| Ok(x[0].matmul(&x[1].t()?)?)),
            esz * (2 * s * h * r * c + logits) as f64,
            2.0 * (s * h * r * r * c) as f64,
        ),
        (
            "matmul a.v [S*H,R,R]x[S*H,R,C]",
            vec![rt(&[s * h, r, r], 6)?, rt(&[s * h, r, c], 7)?],
            Box::new(|x: &[Tensor]| Ok(x[0].matmul(&x[1])?)),
            esz * (2 * s * h * r * c + logits) as f64,
            2.0 * (s * h * r * r * c) as f64,
        ),
        (
            "split_heads copy [S,R,H,C]->[S,H,R,C]",
            vec![rt(&[s, r, h, c], 8)?],
            Box::new(|x: &[Tensor]| Ok(x[0].transpose(1, 2)?.contiguous()?)),
            esz * 2.0 * (s * r * h * c) as f64,
            0.0,
        ),
        (
            "LayerNorm [S,R,c_m] (f32 stats)",
            vec![rt(&[s, r, cm], 9)?],
            Box::new(|x: &[Tensor]| ln.forward(&x[0])),
            esz * 2.0 * act as f64,
            0.0,
        ),
        (
            "Linear c_m->c_m [S,R,c_m] (+weight cast)",
            vec![rt(&[s, r, cm], 10)?],
            Box::new(|x: &[Tensor]| lin.forward(&x[0])),
            esz * 2.0 * act as f64,
            2.0 * (s * r * cm * cm) as f64,
        ),
        (
            "sigmoid [S,R,c_m]",
            vec![rt(&[s, r, cm], 14)?],
            Box::new(|x: &[Tensor]| crate::model::primitives::sigmoid(&x[0])),
            esz * 2.0 * act as f64,
            0.0,
        ),
        (
            "mul [S,R,c_m]*[S,R,c_m]",
            vec![rt(&[s, r, cm], 15)?, rt(&[s, r, cm], 16)?],
            Box::new(|x: &[Tensor]| Ok((&x[0] * &x[1])?)),
            esz * 3.0 * act as f64,
            0.0,
        ),
    ];
    let mut out = Vec::new();
    for (name, inputs, f, bytes, flops) in cases {
        let vars = inputs
            .iter()
            .map(|t| Ok(candle_core::Var::from_tensor(t)?.as_tensor().clone()))
            .collect::<Result<Vec<_>>>()?;
        let probe = f(&vars)?;
        let g = random_tensor(probe.dims(), 1.0, 99, probe.dtype(), &dev)?;
        drop(probe);
        let mut med = [0.0; 2];
        for (k, backward) in [false, true].into_iter().enumerate() {
            let mut ms = Vec::with_capacity(a.iters);
            for it in 0..a.warmup + a.iters {
                let t0 = Instant::now();
                let y = f(&vars)?;
                let keep = if backward {
                    Some(crate::model::remat::backward_vars(
                        &crate::model::remat::vjp_loss(&[(&y, &g)])?,
                    )?)
                } else {
                    None
                };
                dev.synchronize()?;
                if it >= a.warmup {
                    ms.push(t0.elapsed().as_secs_f64() * 1e3);
                }
                drop((y, keep));
            }
            med[k] = median(&mut ms);
        }
        out.push(OpTiming {
            name: name.to_string(),
            fwd_ms: med[0],
            fwd_bwd_ms: med[1],
            bytes,
            flops,
        });
    }
    Ok(out)
}

/// The printed report of `bench ops`.
pub fn format_ops(a: &OpsArgs, rows: &[OpTiming]) -> String {
    let mut s = format!(
        "bench ops: device={:?} dtype={:?} S={} R={} H={} C={} c_m={} iters={}\n",
        a.device, a.dtype, a.n_seq, a.n_res, a.heads, a.c_hidden, a.c_m, a.iters
    )
    .to_lowercase();
    s += "| op | fwd ms | fwd GB/s (min bytes) | fwd TFLOP/s | fwd+bwd ms |\n|---|---|---|---|---|\n";
    for o in rows {
        let sec = o.fwd_ms * 1e-3;
        s += &format!(
            "| {} | {:.3} | {:.0} | {} | {:.3} |\n",
            o.name,
            o.fwd_ms,
            o.bytes / sec / 1e9,
            if o.flops > 0.0 {
                format!("{:.1}", o.flops / sec / 1e12)
            } else {
                "-".into()
            },
            o.fwd_bwd_ms
        );
    }
    s
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

#[cfg(feature = "cuda")]
mod gpu_mem {
    //! Peak memory through the CUDA memory pool that candle's `cuMemAllocAsync` allocates from.
    use candle_core::Device;
    use cudarc::driver::sys;

    use crate::error::{Error, Result};

    fn drv(r: sys::CUresult, what: &str) -> Result<()> {
        r.result()
            .map_err(|e| Error::Msg(format!("bench: {what}: {e:?}")))
    }

    pub struct PoolWatch {
        pool: sys::CUmemoryPool,
    }

    impl PoolWatch {
        /// `None` on CPU or when the context has no stream-ordered allocator.
        pub fn new(dev: &Device) -> Result<Option<Self>> {
            let Device::Cuda(cd) = dev else {
                return Ok(None);
            };
            let stream = cd.cuda_stream();
            let ctx = stream.context();
            ctx.bind_to_thread()
                .map_err(|e| Error::Msg(format!("bench: bind context: {e:?}")))?;
            if !ctx.has_async_alloc() {
                return Ok(None);
            }
            let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
            // SAFETY: valid out-pointer and device handle of a live context.
            drv(
                unsafe { sys::cuDeviceGetMemPool(&mut pool, ctx.cu_device()) },
                "cuDeviceGetMemPool",
            )?;
            Ok(Some(Self { pool }))
        }

        fn get(&self, attr: sys::CUmemPool_attribute) -> Result<u64> {
            let mut v: u64 = 0;
            // SAFETY: the attribute is a cuuint64_t; `v` outlives the call.
            drv(
                unsafe { sys::cuMemPoolGetAttribute(self.pool, attr, (&mut v as *mut u64).cast()) },
                "cuMemPoolGetAttribute",
            )?;
            Ok(v)
        }

        pub fn used_now(&self) -> Result<u64> {
            self.get(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)
        }

        pub fn peak(&self) -> Result<u64> {
            self.get(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)
        }

        /// Reset the high-water mark to the current use.
        pub fn reset_peak(&self) -> Result<()> {
            let mut zero: u64 = 0;
            // SAFETY: setting USED_MEM_HIGH to 0 resets it (CUDA driver API); `zero` outlives the call.
            drv(
                unsafe {
                    sys::cuMemPoolSetAttribute(
                        self.pool,
                        sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                        (&mut zero as *mut u64).cast(),
                    )
                },
                "cuMemPoolSetAttribute",
            )
        }
    }
}

#[cfg(not(feature = "cuda"))]
mod gpu_mem {
    //! CPU builds: no device memory to watch.
    use candle_core::Device;

    use crate::error::Result;

    pub struct PoolWatch;

    impl PoolWatch {
        pub fn new(_dev: &Device) -> Result<Option<Self>> {
            Ok(None)
        }
        pub fn used_now(&self) -> Result<u64> {
            Ok(0)
        }
        pub fn peak(&self) -> Result<u64> {
            Ok(0)
        }
        pub fn reset_peak(&self) -> Result<()> {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn af2_block_flops_match_the_issue_figure() {
        let dims = BlockDims {
            c_m: 256,
            c_z: 128,
            heads_msa: 8,
            c_hidden_msa: 32,
            heads_pair: 4,
            c_hidden_pair: 32,
            c_opm: 32,
            c_mul: 128,
            transition_n: 4,
        };
        let f = evoformer_block_flops(128, 256, &dims.block_config(1));
        // The issue quotes ~216 GFLOP for one AF2 block at 128 × 256.
        assert!((f / 1e9 - 216.0).abs() < 2.0, "{}", f / 1e9);
    }

    #[test]
    fn median_of_even_and_odd() {
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&mut [4.0, 1.0, 3.0, 2.0]), 2.5);
    }
}
