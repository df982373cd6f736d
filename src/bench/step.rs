//! `ferrofold bench step`: the whole AF2 training step — forward over the recycles (earlier cycles
//! without gradient), the AF2 loss, backward through the remat tapes, the Adam update — on a
//! synthetic but valid sample, eagerly and (CUDA) replayed from a CUDA graph
//! ([`crate::train::graph`]).
//!
//! The sample: a random chain (amino acids uniform over the 20 standard types) whose Cα trace is
//! a 3.8 Å random walk, each residue's atoms placed around its Cα in a random frame (backbone at
//! ideal offsets, side-chain atoms at random offsets), and a random MSA of
//! `n_seq + n_extra` rows; it goes through the real data pipeline
//! ([`build_sample_at`]: MSA clustering, masking, extra MSA, crop, recycling copies), so every
//! feature has the training shape, dtype and value range.
//!
//! Reported per mode (median over `iters` timed steps after `warmup`): step time, samples/s,
//! the split forward (all cycles) / loss / backward / optimiser (eager: device synchronised at
//! each boundary inside the step; graph: input copy / replay / optimiser), and peak device
//! memory (eager: stream-ordered pool high-water mark; graph: pool + graph-memory high-water).
//! `--check` (graph mode) compares a replay with the eager step on the same inputs and dropout
//! pool for two different samples.

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use clap::{Args, ValueEnum};

use super::gpu_mem::PoolWatch;
use super::{median, splitmix64, BenchDevice};
use crate::config::{Config, Precision, Remat};
use crate::data::msa::Msa;
use crate::data::transforms::{build_sample_at, FeatureConfig, ProteinInput};
use crate::error::{Error, Result};
use crate::loss::total::alphafold_loss_on_device;
use crate::loss::LossTables;
use crate::model::alphafold::{AfBatch, AlphaFold};
use crate::model::dropout::DropoutCtx;
use crate::model::init::SeededVarMap;
use crate::model::residue_constants as rc;
use crate::train::optim::{params_from_varmap, Params, StepUpdate};

/// Which step implementations to time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GraphMode {
    /// Eager only.
    Off,
    /// CUDA graph only.
    On,
    /// Eager, then CUDA graph.
    Both,
}

/// `ferrofold bench step`.
#[derive(Debug, Clone, Args)]
pub struct StepBenchArgs {
    /// Residues (crop size).
    #[arg(long, default_value_t = 256)]
    pub n_res: usize,
    /// MSA clusters.
    #[arg(long, default_value_t = 128)]
    pub n_seq: usize,
    /// Extra-MSA sequences.
    #[arg(long, default_value_t = 1024)]
    pub n_extra: usize,
    /// Evoformer blocks.
    #[arg(long, default_value_t = 48)]
    pub blocks: usize,
    /// Extra-MSA blocks.
    #[arg(long, default_value_t = 4)]
    pub extra_blocks: usize,
    /// Structure-module layers.
    #[arg(long, default_value_t = 8)]
    pub sm_layers: usize,
    /// Recycling iterations before the last cycle (the step runs `recycles + 1` cycles).
    #[arg(long, default_value_t = 0)]
    pub recycles: usize,
    #[arg(long, value_enum, default_value_t = StepPrecision::Bf16)]
    pub precision: StepPrecision,
    #[arg(long, value_enum, default_value_t = super::BenchRemat::Block)]
    pub remat: super::BenchRemat,
    /// Recomputation policy of the extra-MSA stack alone (default: as `--remat`).
    #[arg(long, value_enum)]
    pub extra_remat: Option<super::BenchRemat>,
    /// Hand-written trunk backward (`manual`) or candle's autograd.
    #[arg(long, value_enum, default_value_t = super::BenchBackward::Manual)]
    pub backward: super::BenchBackward,
    /// Dropout as in training (`--no-dropout`: eval-like, no masks).
    #[arg(long)]
    pub no_dropout: bool,
    /// Tiny channel sizes (all widths 4-16): for CPU tests.
    #[arg(long)]
    pub tiny: bool,
    #[arg(long, value_enum, default_value_t = GraphMode::Off)]
    pub graphs: GraphMode,
    /// Graph mode: check replay == eager on two different samples first.
    #[arg(long)]
    pub check: bool,
    /// Timed steps (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    #[arg(long, value_enum, default_value_t = BenchDevice::Cuda)]
    pub device: BenchDevice,
    /// `stereo_chemical_props.txt` (default: `$FERROFOLD_STEREO_PROPS`, else
    /// `../shared/data/stereo_chemical_props.txt`).
    #[arg(long)]
    pub stereo_props: Option<std::path::PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Also time the Evoformer stack alone (`--blocks` blocks, AF2 widths unless `--tiny`, remat
    /// as `--remat`, no dropout) forward+backward at `n_seq × n_res`: eager, and replayed from a
    /// CUDA graph when `--graphs` is not off.
    #[arg(long)]
    pub stack: bool,
    /// With `--stack`: time only the stack (skip the full step).
    #[arg(long)]
    pub only_stack: bool,
}

/// Trunk precision of the benchmarked step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StepPrecision {
    Bf16,
    Fp32,
}

/// One timed mode.
#[derive(Debug, Clone)]
pub struct StepRow {
    pub mode: String,
    pub step_ms: f64,
    /// Named parts of the step (median ms each).
    pub parts: Vec<(String, f64)>,
    pub peak_mib: Option<f64>,
    pub loss: f64,
    /// One-off cost (graph capture incl. its eager pass), ms.
    pub setup_ms: Option<f64>,
}

/// Everything `bench step` measured.
#[derive(Debug, Clone, Default)]
pub struct StepBench {
    pub rows: Vec<StepRow>,
    /// `(sample, max rel diff, bitwise, tensors compared)` of `--check`.
    pub checks: Vec<(String, f64, bool, usize)>,
    /// Why a graph mode did not run (capture error), if it did not.
    pub graph_error: Option<String>,
    pub params: usize,
}

impl StepBench {
    /// Record a row and print its `RESULT` line at once (a later timeout keeps it).
    fn push(&mut self, row: StepRow) {
        println!("{}", result_line(&row));
        self.rows.push(row);
    }
}

fn result_line(r: &StepRow) -> String {
    format!(
        "RESULT step mode={} step_ms={:.3} samples_per_s={:.4} peak_mib={} loss={:.6}",
        r.mode.replace(' ', "_"),
        r.step_ms,
        1e3 / r.step_ms,
        r.peak_mib
            .map(|p| format!("{p:.1}"))
            .unwrap_or_else(|| "na".into()),
        r.loss
    )
}

/// The run configuration of the benchmark.
pub fn step_config(a: &StepBenchArgs) -> Config {
    let mut cfg = Config::default();
    let m = &mut cfg.model;
    m.evoformer.num_blocks = a.blocks;
    m.extra_msa.num_blocks = a.extra_blocks;
    m.structure.no_blocks = a.sm_layers;
    m.recycling.max_iters = a.recycles;
    m.remat = Remat::from(a.remat);
    m.extra_msa_remat = a.extra_remat.map(Remat::from);
    m.backward = a.backward.into();
    if a.tiny {
        m.c_m = 16;
        m.c_z = 8;
        m.c_s = 16;
        m.c_e = 8;
        for s in [&mut m.evoformer, &mut m.extra_msa] {
            s.c_hidden_msa_att = 4;
            s.no_heads_msa = 2;
            s.c_hidden_opm = 4;
            s.c_hidden_mul = 8;
            s.c_hidden_pair_att = 4;
            s.no_heads_pair = 2;
            s.transition_n = 2;
        }
        let sm = &mut m.structure;
        sm.c_ipa = 8;
        sm.c_resnet = 8;
        sm.no_heads_ipa = 2;
        sm.no_qk_points = 2;
        sm.no_v_points = 2;
        m.heads.plddt_c_hidden = 8;
    }
    cfg.data.crop_size = a.n_res;
    cfg.data.max_msa_clusters = a.n_seq;
    cfg.data.max_extra_msa = a.n_extra;
    cfg.train.precision = match a.precision {
        StepPrecision::Bf16 => Precision::Bf16,
        StepPrecision::Fp32 => Precision::Fp32,
    };
    cfg
}

fn unit(st: &mut u64) -> f64 {
    (splitmix64(st) >> 11) as f64 / (1u64 << 53) as f64
}

fn gauss3(st: &mut u64) -> [f64; 3] {
    // Box-Muller, three normals.
    let mut out = [0.0; 3];
    for o in &mut out {
        let (u1, u2) = (unit(st).max(1e-12), unit(st));
        *o = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
    }
    out
}

/// Random rotation matrix (normalised random quaternion).
fn rotation(st: &mut u64) -> [[f64; 3]; 3] {
    let g = gauss3(st);
    let w = gauss3(st)[0];
    let n = (g[0] * g[0] + g[1] * g[1] + g[2] * g[2] + w * w)
        .sqrt()
        .max(1e-12);
    let (a, b, c, d) = (w / n, g[0] / n, g[1] / n, g[2] / n);
    [
        [
            a * a + b * b - c * c - d * d,
            2.0 * (b * c - a * d),
            2.0 * (b * d + a * c),
        ],
        [
            2.0 * (b * c + a * d),
            a * a - b * b + c * c - d * d,
            2.0 * (c * d - a * b),
        ],
        [
            2.0 * (b * d - a * c),
            2.0 * (c * d + a * b),
            a * a - b * b - c * c + d * d,
        ],
    ]
}

/// A random chain of `len` residues with an MSA of `rows` sequences (see the module docs).
pub fn synthetic_protein(len: usize, rows: usize, seed: u64) -> ProteinInput {
    let mut st = seed ^ 0x005E_ED0F_A1FA;
    let aatype: Vec<u8> = (0..len).map(|_| (splitmix64(&mut st) % 20) as u8).collect();
    let exists = rc::restype_atom37_mask();
    // Backbone offsets in the residue frame (Å): N, CA, C, CB, O.
    let fixed: [(usize, [f64; 3]); 5] = [
        (0, [-0.525, 1.363, 0.0]),
        (1, [0.0, 0.0, 0.0]),
        (2, [1.526, 0.0, 0.0]),
        (3, [-0.529, -0.774, -1.205]),
        (4, [2.153, 1.062, 0.0]),
    ];
    let mut positions = vec![0f32; len * 37 * 3];
    let mut mask = vec![0f32; len * 37];
    let mut ca = [0.0f64; 3];
    for (i, &aa) in aatype.iter().enumerate() {
        if i > 0 {
            let d = gauss3(&mut st);
            let n = (d[0] * d[0] + d[1] * d[1] + d[2] * d[2]).sqrt().max(1e-9);
            for k in 0..3 {
                ca[k] += 3.8 * d[k] / n;
            }
        }
        let rot = rotation(&mut st);
        for (a, &e) in exists[aa as usize].iter().enumerate() {
            if e < 0.5 {
                continue;
            }
            let local = match fixed.iter().find(|(j, _)| *j == a) {
                Some((_, v)) => *v,
                None => {
                    let g = gauss3(&mut st);
                    [g[0] * 1.5 - 1.0, g[1] * 1.5 - 1.5, g[2] * 1.5 - 1.5]
                }
            };
            for k in 0..3 {
                let v: f64 = (0..3).map(|j| rot[k][j] * local[j]).sum::<f64>() + ca[k];
                positions[(i * 37 + a) * 3 + k] = v as f32;
            }
            mask[i * 37 + a] = 1.0;
        }
    }
    let rows = rows.max(1);
    let mut tokens = Vec::with_capacity(rows * len);
    let mut deletions = Vec::with_capacity(rows * len);
    for r in 0..rows {
        for &aa in &aatype {
            let t = if r == 0 || unit(&mut st) < 0.6 {
                aa
            } else {
                (splitmix64(&mut st) % 22) as u8
            };
            tokens.push(t);
            deletions.push(if r > 0 && unit(&mut st) < 0.05 {
                1 + (splitmix64(&mut st) % 3) as u32
            } else {
                0
            });
        }
    }
    ProteinInput {
        id: format!("synthetic_{seed}"),
        aatype,
        positions,
        mask,
        resolution: 2.0,
        msa: Msa {
            rows,
            width: len,
            tokens,
            deletions,
        },
    }
}

/// The OpenFold-layout features (recycling dim last) of a synthetic sample, on the CPU.
pub fn synthetic_features(cfg: &Config, seed: u64) -> Result<BTreeMap<String, Tensor>> {
    let d = &cfg.data;
    let input = synthetic_protein(d.crop_size, d.max_msa_clusters + d.max_extra_msa, seed);
    let fc = FeatureConfig {
        num_recycles: cfg.model.recycling.max_iters + 1,
        seed,
        ..FeatureConfig::from_config(cfg)
    };
    let sample = build_sample_at(&input, &fc, seed, Some(0))?;
    Ok(sample
        .to_tensors(&Device::Cpu, DType::F32)?
        .into_iter()
        .collect())
}

fn stereo_path(a: &StepBenchArgs) -> std::path::PathBuf {
    if let Some(p) = &a.stereo_props {
        return p.clone();
    }
    if let Some(p) = std::env::var_os("FERROFOLD_STEREO_PROPS") {
        return p.into();
    }
    std::path::PathBuf::from("../shared/data/stereo_chemical_props.txt")
}

fn device_for(a: &StepBenchArgs) -> Result<Device> {
    #[cfg(feature = "cuda")]
    if a.device == BenchDevice::Cuda && a.graphs != GraphMode::Off {
        return crate::train::graph::graph_device(0);
    }
    a.device.device()
}

fn on_device(feats: &BTreeMap<String, Tensor>, dev: &Device) -> Result<BTreeMap<String, Tensor>> {
    feats
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.to_device(dev)?)))
        .collect()
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

struct Setup {
    cfg: Config,
    dev: Device,
    model: AlphaFold,
    params: Params,
    tables: LossTables,
    feats: [BTreeMap<String, Tensor>; 2],
}

fn setup(a: &StepBenchArgs) -> Result<Setup> {
    let cfg = step_config(a);
    let dev = device_for(a)?;
    let init = SeededVarMap::new(a.seed ^ 0x1417);
    let mut model = AlphaFold::new(init.builder(DType::F32, &dev), &cfg.model)?;
    model.set_precision(cfg.train.precision);
    let params = params_from_varmap(&init.varmap)?;
    let tables = LossTables::load(&stereo_path(a), &cfg.loss.violation, &dev)?;
    let feats = [
        synthetic_features(&cfg, a.seed)?,
        synthetic_features(&cfg, a.seed + 1)?,
    ];
    Ok(Setup {
        cfg,
        dev,
        model,
        params,
        tables,
        feats,
    })
}

fn dropout_for(a: &StepBenchArgs, step: u64) -> Option<DropoutCtx> {
    (!a.no_dropout)
        .then(|| DropoutCtx::new(crate::train::seed::seed_for(a.seed, "dropout", 0, step)))
}

/// The eager step, timed with device synchronisation at the part boundaries.
fn eager_row(a: &StepBenchArgs, s: &Setup, adam: &mut StepUpdate) -> Result<StepRow> {
    let watch = PoolWatch::new(&s.dev)?;
    let r = a.recycles;
    let feats = on_device(&s.feats[0], &s.dev)?;
    let batch = AfBatch::from_last_dim(&feats)?;
    let lb = crate::loss::LossBatch::from_last_dim(&feats, r)?;
    let mut parts: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut totals = Vec::new();
    let mut loss = f64::NAN;
    for it in 0..a.warmup + a.iters {
        if it == a.warmup {
            if let Some(w) = &watch {
                w.reset_peak()?;
            }
        }
        s.dev.synchronize()?;
        let t0 = Instant::now();
        let mut t_fwd = 0.0;
        let mut t_loss = 0.0;
        let res = s.model.loss_and_grads_on_device(
            &s.params,
            &batch,
            r,
            dropout_for(a, it as u64),
            |out| {
                s.dev.synchronize()?;
                t_fwd = ms(t0);
                let l = alphafold_loss_on_device(&out.loss_outputs(), &lb, &s.tables, &s.cfg.loss)?;
                s.dev.synchronize()?;
                t_loss = ms(t0);
                Ok((l.loss, l.terms))
            },
        )?;
        s.dev.synchronize()?;
        let t_bwd = ms(t0);
        adam.apply(&s.params, &res.grads, 1e-4)?;
        s.dev.synchronize()?;
        let t_opt = ms(t0);
        loss = res
            .loss
            .to_dtype(DType::F64)?
            .to_device(&Device::Cpu)?
            .to_scalar::<f64>()?;
        if it >= a.warmup {
            totals.push(t_opt);
            parts.entry("forward").or_default().push(t_fwd);
            parts.entry("loss").or_default().push(t_loss - t_fwd);
            parts.entry("backward").or_default().push(t_bwd - t_loss);
            parts.entry("optimizer").or_default().push(t_opt - t_bwd);
        }
    }
    let peak = match &watch {
        Some(w) => Some(w.peak()? as f64 / (1u64 << 20) as f64),
        None => None,
    };
    let order = ["forward", "loss", "backward", "optimizer"];
    Ok(StepRow {
        mode: "eager".into(),
        step_ms: median(&mut totals),
        parts: order
            .iter()
            .map(|k| {
                (
                    k.to_string(),
                    median(
                        parts
                            .get_mut(k)
                            .map(|v| v.as_mut_slice())
                            .unwrap_or(&mut []),
                    ),
                )
            })
            .collect(),
        peak_mib: peak,
        loss,
        setup_ms: None,
    })
}

#[cfg(feature = "cuda")]
fn graph_row(
    a: &StepBenchArgs,
    s: &Setup,
    adam: &mut StepUpdate,
    out: &mut StepBench,
) -> Result<StepRow> {
    use crate::train::graph::{compare_steps, graph_mem_high, StepGraph};
    let watch = PoolWatch::new(&s.dev)?;
    let r = a.recycles;
    let seed = |step: u64| crate::train::seed::seed_for(a.seed, "dropout", 0, step);
    let mut g = StepGraph::new(&s.dev, &s.feats[0], !a.no_dropout)?;
    // First run: one eager pass + capture + first replay.
    g.prepare(&s.feats[0], r, seed(0))?;
    let t0 = Instant::now();
    g.run(&s.model, &s.params, &s.tables, &s.cfg.loss)?;
    s.dev.synchronize()?;
    let setup_ms = ms(t0);
    if a.check {
        for (i, f) in s.feats.iter().enumerate() {
            g.prepare(f, r, seed(100 + i as u64))?;
            let replay = g.run(&s.model, &s.params, &s.tables, &s.cfg.loss)?.clone();
            let eager = g.eager(&s.model, &s.params, &s.tables, &s.cfg.loss)?;
            let d = compare_steps(&eager, &replay)?;
            out.checks
                .push((format!("sample{i}"), d.max_rel, d.bitwise, d.compared));
            tracing::info!(
                "graph check sample{i}: max rel {:.3e} at {}",
                d.max_rel,
                d.worst
            );
        }
    }
    if let Some(w) = &watch {
        w.reset_peak()?;
    }
    let mut totals = Vec::new();
    let (mut copy, mut replay, mut opt) = (Vec::new(), Vec::new(), Vec::new());
    let mut loss = f64::NAN;
    for it in 0..a.warmup + a.iters {
        let f = &s.feats[it % 2];
        s.dev.synchronize()?;
        let t0 = Instant::now();
        g.prepare(f, r, seed(it as u64))?;
        s.dev.synchronize()?;
        let t_copy = ms(t0);
        let o = g.run(&s.model, &s.params, &s.tables, &s.cfg.loss)?;
        s.dev.synchronize()?;
        let t_replay = ms(t0);
        adam.apply(&s.params, &o.grads, 1e-4)?;
        s.dev.synchronize()?;
        let t_opt = ms(t0);
        loss = o.loss_value()?;
        if it >= a.warmup {
            totals.push(t_opt);
            copy.push(t_copy);
            replay.push(t_replay - t_copy);
            opt.push(t_opt - t_replay);
        }
    }
    let peak = match &watch {
        Some(w) => Some((w.peak()? + graph_mem_high(&s.dev)?) as f64 / (1u64 << 20) as f64),
        None => None,
    };
    Ok(StepRow {
        mode: "graph".into(),
        step_ms: median(&mut totals),
        parts: vec![
            ("input copy".into(), median(&mut copy)),
            ("replay fwd+loss+bwd".into(), median(&mut replay)),
            ("optimizer".into(), median(&mut opt)),
        ],
        peak_mib: peak,
        loss,
        setup_ms: Some(setup_ms),
    })
}

fn stack_dims(a: &StepBenchArgs) -> super::BlockDims {
    let s = &step_config(a).model;
    let e = &s.evoformer;
    super::BlockDims {
        c_m: s.c_m,
        c_z: s.c_z,
        heads_msa: e.no_heads_msa,
        c_hidden_msa: e.c_hidden_msa_att,
        heads_pair: e.no_heads_pair,
        c_hidden_pair: e.c_hidden_pair_att,
        c_opm: e.c_hidden_opm,
        c_mul: e.c_hidden_mul,
        transition_n: e.transition_n,
    }
}

/// The Evoformer stack alone: forward + backward through the remat tape (eager, then graph).
fn stack_rows(a: &StepBenchArgs, dev: &Device, out: &mut StepBench) -> Result<()> {
    let cfg = stack_dims(a).block_config(a.blocks);
    let dtype = match a.precision {
        StepPrecision::Bf16 => DType::BF16,
        StepPrecision::Fp32 => DType::F32,
    };
    let (_vm, blocks) = super::build_blocks(&cfg, dev, a.seed)?;
    let x = super::make_inputs(a.n_seq, a.n_res, &cfg, dtype, dev, a.seed)?;
    let remat = Remat::from(a.remat);
    let pass = || -> Result<(Tensor, Tensor, candle_core::backprop::GradStore)> {
        let (_m, _z, tape) = crate::model::remat::forward_blocks(
            &blocks,
            &x.m,
            &x.z,
            &x.msa_mask,
            &x.pair_mask,
            None,
            remat,
        )?;
        let mut grads = candle_core::backprop::GradStore::default();
        let (dm, dz) = tape.backward(&x.dm, &x.dz, &mut grads)?;
        Ok((dm, dz, grads))
    };
    let watch = PoolWatch::new(dev)?;
    let mut times = Vec::new();
    for it in 0..a.warmup + a.iters {
        if it == a.warmup {
            if let Some(w) = &watch {
                w.reset_peak()?;
            }
        }
        dev.synchronize()?;
        let t0 = Instant::now();
        drop(pass()?);
        dev.synchronize()?;
        if it >= a.warmup {
            times.push(ms(t0));
        }
    }
    let peak = match &watch {
        Some(w) => Some(w.peak()? as f64 / (1u64 << 20) as f64),
        None => None,
    };
    out.push(StepRow {
        mode: format!("stack{} eager", a.blocks),
        step_ms: median(&mut times),
        parts: vec![],
        peak_mib: peak,
        loss: f64::NAN,
        setup_ms: None,
    });
    #[cfg(feature = "cuda")]
    if a.graphs != GraphMode::Off && dev.is_cuda() {
        let Device::Cuda(cd) = dev else {
            return Ok(());
        };
        let _htod = cd.enable_cuda_graph_htod_cache();
        let t0 = Instant::now();
        let captured = crate::train::graph::capture(dev, pass);
        let (graph, (dm, dz, _grads)) = match captured {
            Ok(c) => c,
            Err(e) => {
                out.graph_error = Some(format!("stack: {e}"));
                return Ok(());
            }
        };
        let setup_ms = ms(t0);
        let launch = |g: &cudarc::driver::CudaGraph| {
            g.launch()
                .map_err(|e| Error::Msg(format!("stack graph launch: {e:?}")))
        };
        launch(&graph)?;
        dev.synchronize()?;
        // Replay == eager on the input gradients.
        let (em, ez, _) = pass()?;
        let rel = |a: &Tensor, b: &Tensor| -> Result<f64> {
            let a = a.to_dtype(DType::F64)?;
            let b = b.to_dtype(DType::F64)?;
            let d = (&a - &b)?.abs()?.max_all()?.to_scalar::<f64>()?;
            let m = a.abs()?.max_all()?.to_scalar::<f64>()?;
            Ok(if d == 0.0 { 0.0 } else { d / m.max(1e-30) })
        };
        let r = rel(&em, &dm)?.max(rel(&ez, &dz)?);
        out.checks
            .push((format!("stack{}", a.blocks), r, r == 0.0, 2));
        drop((em, ez));
        let mut times = Vec::new();
        for it in 0..a.warmup + a.iters {
            dev.synchronize()?;
            let t0 = Instant::now();
            launch(&graph)?;
            dev.synchronize()?;
            if it >= a.warmup {
                times.push(ms(t0));
            }
        }
        out.push(StepRow {
            mode: format!("stack{} graph", a.blocks),
            step_ms: median(&mut times),
            parts: vec![],
            peak_mib: Some(crate::train::graph::graph_mem_high(dev)? as f64 / (1u64 << 20) as f64),
            loss: f64::NAN,
            setup_ms: Some(setup_ms),
        });
    }
    Ok(())
}

/// Run `bench step`.
pub fn bench_step(a: &StepBenchArgs) -> Result<StepBench> {
    if a.iters == 0 {
        return Err(Error::Msg("bench step: --iters must be at least 1".into()));
    }
    let s = setup(a)?;
    let mut out = StepBench {
        params: s.params.values().map(|p| p.elem_count()).sum(),
        ..StepBench::default()
    };
    // The trainer's update: global norm, clip, Adam, EMA (fused on CUDA).
    let mut adam = StepUpdate::new(&s.params, &s.cfg.optim)?;
    if a.stack || a.only_stack {
        stack_rows(a, &s.dev, &mut out)?;
        if a.only_stack {
            return Ok(out);
        }
    }
    if a.graphs != GraphMode::On {
        let row = eager_row(a, &s, &mut adam)?;
        out.push(row);
    }
    if a.graphs != GraphMode::Off {
        #[cfg(feature = "cuda")]
        {
            if s.dev.is_cuda() {
                match graph_row(a, &s, &mut adam, &mut out) {
                    Ok(row) => out.push(row),
                    Err(e) => out.graph_error = Some(e.to_string()),
                }
            } else {
                out.graph_error = Some("CUDA graphs need --device cuda".into());
            }
        }
        #[cfg(not(feature = "cuda"))]
        {
            out.graph_error = Some("CUDA graphs need a build with the `cuda` feature".into());
        }
    }
    Ok(out)
}

/// The table and `RESULT` lines of `bench step`.
pub fn format_step(a: &StepBenchArgs, b: &StepBench) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "bench step: crop {} n_seq {} extra {} blocks {}+{} sm {} recycles {} {:?} remat {:?} dropout {} tiny {} params {:.1}M",
        a.n_res,
        a.n_seq,
        a.n_extra,
        a.blocks,
        a.extra_blocks,
        a.sm_layers,
        a.recycles,
        a.precision,
        a.remat,
        !a.no_dropout,
        a.tiny,
        b.params as f64 / 1e6
    );
    let _ = writeln!(
        s,
        "| mode | step ms | samples/s | peak MiB | loss | parts (ms) |"
    );
    let _ = writeln!(s, "|---|---|---|---|---|---|");
    for r in &b.rows {
        let parts: Vec<String> = r.parts.iter().map(|(k, v)| format!("{k} {v:.1}")).collect();
        let peak = r
            .peak_mib
            .map(|p| format!("{p:.0}"))
            .unwrap_or_else(|| "-".into());
        let _ = writeln!(
            s,
            "| {} | {:.1} | {:.3} | {} | {:.4} | {}{} |",
            r.mode,
            r.step_ms,
            1e3 / r.step_ms,
            peak,
            r.loss,
            parts.join(", "),
            r.setup_ms
                .map(|m| format!(", capture {m:.0}"))
                .unwrap_or_default()
        );
    }
    for (name, rel, bitwise, n) in &b.checks {
        let _ = writeln!(
            s,
            "CHECK graph_vs_eager {name} max_rel={rel:.3e} bitwise={bitwise} tensors={n} {}",
            if *rel <= 1e-6 { "PASS" } else { "FAIL" }
        );
    }
    if let Some(e) = &b.graph_error {
        let _ = writeln!(s, "GRAPH_ERROR {e}");
    }
    s
}
