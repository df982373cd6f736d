//! `step-bench`: the full AF2 training step (forward over the recycles, the AF2 loss, backward,
//! the gradient all-reduce over the world with [`GradSync`], the Adam update) timed on every rank
//! at the `ferrofold bench step` shape ([`step_config`] / [`synthetic_features`]), in several
//! layouts of the same world:
//! - `check`: correctness first (tiny widths, fp32, one recycle, dropout on): on every rank the
//!   single-rank step (no DAP) and the DAP-n step (world = one DAP group) on the same sample and
//!   dropout seed; the losses must agree to 1e-5 relative and the DAP gradients, all-reduced with
//!   [`dap_grad_scale`], must equal the single-rank ones (1e-4 of each tensor's scale).
//! - `dap`: DAP-n, world = one DAP group: every rank holds the same sample and the same dropout
//!   seed; the stacks run sharded. Gradients of DAP-sharded parameters (partial sums) are summed,
//!   the rest averaged ([`dap_grad_scale`]).
//! - `dp`: DP-n (`dap_size = 1`): each rank its own sample (seed + rank) and dropout; gradients
//!   averaged over the world.
//! - `single`: rank 0 alone (1 GPU, the other ranks wait on an MPI barrier): the reference for the
//!   DAP speedup and the DP scaling (same sample as `dap`).
//!
//! A mode may carry a remat policy, `mode:none` or `mode:block` (default `STEP_REMAT`). Every mode
//! builds a fresh model from the same seed (identical parameters on every rank) and a fresh Adam.
//! Shape from the environment (defaults = AF2 initial training): `STEP_N_RES` 256, `STEP_N_SEQ`
//! 128, `STEP_N_EXTRA` 1024, `STEP_BLOCKS` 48, `STEP_EXTRA_BLOCKS` 4, `STEP_SM_LAYERS` 8,
//! `STEP_RECYCLES` 0, `STEP_PRECISION` bf16|fp32, `STEP_REMAT` block|none, `STEP_DROPOUT` 1|0,
//! `STEP_TINY` 0|1, `STEP_ITERS` 2, `STEP_WARMUP` 1, `STEP_SEED` 0, `STEP_MODES`
//! (default `check,dap,dp,single`). The stereo-chemistry table: `$FERROFOLD_STEREO_PROPS`.
//!
//! Each mode: median over `STEP_ITERS` steps after `STEP_WARMUP` (ranks start each step together
//! after an MPI barrier); rank 0 prints a `STEP` line with the step time, the split
//! fwd+loss+bwd / all-reduce / optimiser, samples/s, peak pool memory (max over ranks), and with
//! `FERROFOLD_NCCL_TIMING=1` the time the compute stream stalled on collectives (share of the
//! step), then a `STEPSUM` line per distributed mode: DAP speedup / DP throughput scaling over the
//! `single` mode with the same remat policy, else over any `single` mode.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use ferrofold::bench::gpu_mem::PoolWatch;
use ferrofold::bench::{
    step_config, synthetic_features, BenchDevice, BenchRemat, GraphMode, StepBenchArgs,
    StepPrecision,
};
use ferrofold::config::Config;
use ferrofold::loss::total::alphafold_loss_on_device;
use ferrofold::loss::{LossBatch, LossTables};
use ferrofold::model::alphafold::{AfBatch, AlphaFold};
use ferrofold::model::dropout::DropoutCtx;
use ferrofold::model::init::SeededVarMap;
use ferrofold::parallel::{dap_grad_scale, Communicator, Dap, GradSync, ParallelCtx};
use ferrofold::train::optim::{params_from_varmap, Grads, Params, StepUpdate};
use ferrofold::train::run::is_dap_sharded;

use crate::{dev, env_usize, sync_dev};

fn env_str(k: &str, d: &str) -> String {
    std::env::var(k).unwrap_or_else(|_| d.to_string())
}

fn remat_of(s: &str) -> Result<BenchRemat> {
    match s {
        "block" => Ok(BenchRemat::Block),
        "none" => Ok(BenchRemat::None),
        o => bail!("remat {o}: expected block or none"),
    }
}

/// The benchmark shape from `STEP_*` (see the module docs).
fn bench_args() -> Result<StepBenchArgs> {
    let precision = match env_str("STEP_PRECISION", "bf16").as_str() {
        "bf16" => StepPrecision::Bf16,
        "fp32" => StepPrecision::Fp32,
        o => bail!("STEP_PRECISION {o}: expected bf16 or fp32"),
    };
    Ok(StepBenchArgs {
        n_res: env_usize("STEP_N_RES", 256),
        n_seq: env_usize("STEP_N_SEQ", 128),
        n_extra: env_usize("STEP_N_EXTRA", 1024),
        blocks: env_usize("STEP_BLOCKS", 48),
        extra_blocks: env_usize("STEP_EXTRA_BLOCKS", 4),
        sm_layers: env_usize("STEP_SM_LAYERS", 8),
        recycles: env_usize("STEP_RECYCLES", 0),
        precision,
        remat: remat_of(&env_str("STEP_REMAT", "block"))?,
        extra_remat: None,
        backward: match env_str("STEP_BACKWARD", "manual").as_str() {
            "manual" => ferrofold::bench::BenchBackward::Manual,
            "autograd" => ferrofold::bench::BenchBackward::Autograd,
            o => bail!("STEP_BACKWARD {o}: expected manual or autograd"),
        },
        no_dropout: env_str("STEP_DROPOUT", "1") == "0",
        tiny: env_str("STEP_TINY", "0") == "1",
        graphs: GraphMode::Off,
        check: false,
        iters: env_usize("STEP_ITERS", 2).max(1),
        warmup: env_usize("STEP_WARMUP", 1),
        device: BenchDevice::Cuda,
        stereo_props: None,
        seed: env_usize("STEP_SEED", 0) as u64,
        stack: false,
        only_stack: false,
    })
}

/// The correctness check's shape: tiny widths, fp32, one recycle, dropout on, padded residues
/// (`CHECK_N_RES`, default 21).
fn check_args(base: &StepBenchArgs) -> StepBenchArgs {
    StepBenchArgs {
        n_res: env_usize("CHECK_N_RES", 21),
        n_seq: 8,
        n_extra: 16,
        blocks: 2,
        extra_blocks: 1,
        sm_layers: 2,
        recycles: 1,
        // `CHECK_PRECISION=bf16`: the bf16 trunk (looser tolerances, see `check`).
        precision: match std::env::var("CHECK_PRECISION").as_deref() {
            Ok("bf16") => StepPrecision::Bf16,
            _ => StepPrecision::Fp32,
        },
        remat: BenchRemat::Block,
        no_dropout: false,
        tiny: true,
        ..base.clone()
    }
}

fn stereo_path() -> std::path::PathBuf {
    match std::env::var_os("FERROFOLD_STEREO_PROPS") {
        Some(p) => p.into(),
        None => std::path::PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/data/stereo_chemical_props.txt"
        )),
    }
}

/// The world communicator, with the NCCL handle for stall timing on a GPU.
struct World {
    comm: Arc<dyn Communicator>,
    #[cfg(feature = "cuda")]
    nccl: Option<Arc<ferrofold::parallel::NcclComm>>,
}

impl World {
    fn new(ctx: &ParallelCtx) -> Result<Self> {
        #[cfg(feature = "cuda")]
        if crate::on_gpu() {
            let c = ferrofold::parallel::NcclComm::world(ctx, &dev())?;
            return Ok(Self {
                comm: c.clone(),
                nccl: Some(c),
            });
        }
        Ok(Self {
            comm: crate::world_comm(ctx)?,
            #[cfg(feature = "cuda")]
            nccl: None,
        })
    }

    /// GPU stall (ms) in collective waits since the last call (`FERROFOLD_NCCL_TIMING=1`).
    fn stall(&self) -> Result<Option<f64>> {
        #[cfg(feature = "cuda")]
        if let Some(c) = &self.nccl {
            return Ok(c.take_stall_ms()?.map(|(ms, _)| ms));
        }
        Ok(None)
    }
}

/// One rank's model, parameters, optimiser and loss tables for one shape.
struct Rig {
    cfg: Config,
    model: AlphaFold,
    params: Params,
    /// The trainer's update: global norm, clip, Adam, EMA (fused on CUDA).
    adam: StepUpdate,
    tables: LossTables,
    recycles: usize,
    dropout: bool,
    seed: u64,
}

impl Rig {
    /// Same seed on every rank: identical parameters.
    fn new(a: &StepBenchArgs, dev: &Device) -> Result<Self> {
        let cfg = step_config(a);
        let init = SeededVarMap::new(a.seed ^ 0x1417);
        let mut model = AlphaFold::new(init.builder(DType::F32, dev), &cfg.model)?;
        model.set_precision(cfg.train.precision);
        let params = params_from_varmap(&init.varmap)?;
        let adam = StepUpdate::new(&params, &cfg.optim)?;
        let tables = LossTables::load(&stereo_path(), &cfg.loss.violation, dev)?;
        Ok(Self {
            cfg,
            model,
            params,
            adam,
            tables,
            recycles: a.recycles,
            dropout: !a.no_dropout,
            seed: a.seed,
        })
    }

    /// The device features of sample `seed`.
    fn sample(&self, seed: u64, dev: &Device) -> Result<BTreeMap<String, Tensor>> {
        synthetic_features(&self.cfg, seed)?
            .into_iter()
            .map(|(k, t)| Ok((k, t.to_device(dev)?)))
            .collect()
    }

    /// Forward over the recycles + loss + backward: (loss, gradients).
    fn loss_and_grads(
        &self,
        feats: &BTreeMap<String, Tensor>,
        dropout_stream: u64,
        step: u64,
    ) -> Result<(f64, Grads)> {
        let batch = AfBatch::from_last_dim(feats)?;
        let lb = LossBatch::from_last_dim(feats, self.recycles)?;
        let dropout = self.dropout.then(|| {
            DropoutCtx::new(ferrofold::train::seed::seed_for(
                self.seed,
                "dropout",
                dropout_stream,
                step,
            ))
        });
        let res = self.model.loss_and_grads_on_device(
            &self.params,
            &batch,
            self.recycles,
            dropout,
            |out| {
                let l = alphafold_loss_on_device(
                    &out.loss_outputs(),
                    &lb,
                    &self.tables,
                    &self.cfg.loss,
                )?;
                Ok((l.loss, ()))
            },
        )?;
        let loss = res
            .loss
            .to_dtype(DType::F64)?
            .to_device(&Device::Cpu)?
            .to_scalar::<f64>()?;
        Ok((loss, res.grads))
    }
}

/// All-reduce `grads` over the world: DAP-sharded parameters summed over the DAP group, all
/// averaged over the replicas (`dap_size` = 1: a plain world average).
fn reduce(sync: &GradSync, grads: Grads, dap_size: usize) -> Result<Grads> {
    let world = sync.comm().size();
    if world == 1 {
        return Ok(grads);
    }
    let list: Vec<(String, Tensor)> = grads.into_iter().collect();
    let out = sync.all_reduce_scaled(&list, &|name| {
        dap_grad_scale(dap_size > 1 && is_dap_sharded(name), dap_size, world)
    })?;
    Ok(out.into_iter().collect())
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        0.5 * (v[n / 2 - 1] + v[n / 2])
    }
}

/// Largest |a - b| relative to max(max |b|, `floor`).
fn rel_diff(a: &Tensor, b: &Tensor, floor: f64) -> Result<f64> {
    let a = a.to_dtype(DType::F64)?;
    let b = b.to_dtype(DType::F64)?;
    let d = (&a - &b)?.abs()?.max_all()?.to_scalar::<f64>()?;
    let m = b.abs()?.max_all()?.to_scalar::<f64>()?;
    Ok(d / m.max(floor))
}

/// `check`: DAP-n loss and reduced gradients == the single-rank ones on every rank.
fn check(ctx: &ParallelCtx, w: &World, base: &StepBenchArgs) -> Result<()> {
    let a = check_args(base);
    let dev = dev();
    let n = w.comm.size();
    let mut rig = Rig::new(&a, &dev)?;
    let feats = rig.sample(a.seed, &dev)?;
    rig.model.set_dap(None);
    let (l1, g1) = rig.loss_and_grads(&feats, 0, 7)?;
    rig.model.set_dap(Some(Dap::new(w.comm.clone())));
    let (ln, gn) = rig.loss_and_grads(&feats, 0, 7)?;
    let gn = reduce(&GradSync::new(w.comm.clone(), 1), gn, n)?;
    let loss_rel = (ln - l1).abs() / l1.abs().max(1e-30);
    ensure!(
        g1.len() == gn.len(),
        "gradient count {} vs {}",
        g1.len(),
        gn.len()
    );
    // Per-tensor scale, floored at 1e-3 of the largest gradient (tensors with ~zero gradient).
    let mut gmax = 0.0f64;
    for g in g1.values() {
        gmax = gmax.max(
            g.to_dtype(DType::F64)?
                .abs()?
                .max_all()?
                .to_scalar::<f64>()?,
        );
    }
    let (mut worst, mut at) = (0.0f64, String::new());
    for (k, want) in &g1 {
        let got = gn
            .get(k)
            .with_context(|| format!("DAP step has no gradient {k}"))?;
        let r = rel_diff(got, want, 1e-3 * gmax)?;
        if r > worst {
            worst = r;
            at = k.clone();
        }
    }
    // bf16 activations: DAP sums in another order, so only bf16-level agreement.
    let (tl, tg) = match a.precision {
        StepPrecision::Fp32 => (1e-5, 1e-4),
        _ => (2e-2, 1e-1),
    };
    let ok = loss_rel <= tl && worst <= tg;
    if ctx.is_root() || !ok {
        println!(
            "STEPCHECK dap-{n} vs single n_res={} {:?}: loss {l1:.8} vs {ln:.8} rel {loss_rel:.3e}; \
             grads {} tensors worst rel {worst:.3e} at {at} {}",
            a.n_res,
            a.precision,
            g1.len(),
            if ok { "PASS" } else { "FAIL" }
        );
    }
    ensure!(
        ok,
        "DAP-{n} step differs from the single-rank step: loss rel {loss_rel:.3e} (tol {tl:e}), \
         grad rel {worst:.3e} at {at} (tol {tg:e})"
    );
    Ok(())
}

/// One timed mode's numbers (rank 0's times; peak = max over ranks).
struct Row {
    mode: String,
    kind: &'static str,
    remat: BenchRemat,
    ranks: usize,
    step_ms: f64,
    fwdbwd_ms: f64,
    ar_ms: f64,
    opt_ms: f64,
    stall_ms: Option<f64>,
    /// Pool high-water mark, bytes (max over ranks).
    peak_bytes: Option<u64>,
    loss: f64,
}

/// Time one mode (`kind` = dap | dp | single).
fn timed(
    ctx: &ParallelCtx,
    w: &World,
    a: &StepBenchArgs,
    kind: &'static str,
    name: &str,
) -> Result<Option<Row>> {
    let active = kind != "single" || w.comm.rank() == 0;
    let mut row = None;
    if active {
        let r = run_mode(ctx, w, a, kind, name);
        match r {
            Ok(r) => row = Some(r),
            // Rank 0 alone: report (e.g. out of memory) and go on; the others wait at the barrier.
            Err(e) if kind == "single" => println!("STEP mode={name} error={e:#}"),
            Err(e) => return Err(e),
        }
    }
    // Peak over the ranks that ran (host collective: every rank takes part).
    let mine = row.as_ref().and_then(|r| r.peak_bytes).unwrap_or(0);
    let peak = ctx.all_reduce_max_u64(mine);
    ctx.barrier();
    Ok(row.map(|mut r| {
        r.peak_bytes = r.peak_bytes.map(|_| peak);
        r
    }))
}

/// The timed loop of one mode on this rank.
fn run_mode(
    ctx: &ParallelCtx,
    w: &World,
    a: &StepBenchArgs,
    kind: &'static str,
    name: &str,
) -> Result<Row> {
    let dev = dev();
    let n = w.comm.size();
    let rank = w.comm.rank();
    {
        let mut rig = Rig::new(a, &dev)?;
        let (dap_size, sample_seed, stream) = match kind {
            "dap" => {
                rig.model.set_dap(Some(Dap::new(w.comm.clone())));
                (n, a.seed, 0)
            }
            "dp" => (1, a.seed + 1000 * rank as u64, rank as u64),
            _ => (1, a.seed, 0),
        };
        let world_ranks = if kind == "single" { 1 } else { n };
        let feats = rig.sample(sample_seed, &dev)?;
        let sync = GradSync::new(w.comm.clone(), 25);
        let watch = PoolWatch::new(&dev)?;
        if let Some(p) = &watch {
            p.reset_peak()?;
        }
        let (mut tot, mut fb, mut ar, mut op, mut st) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut loss = f64::NAN;
        for it in 0..a.warmup + a.iters {
            if world_ranks > 1 {
                ctx.barrier();
            }
            sync_dev()?;
            w.stall()?;
            let t0 = Instant::now();
            let _ = ferrofold::parallel::dap_profile::take();
            let (l, grads) = rig.loss_and_grads(&feats, stream, it as u64)?;
            sync_dev()?;
            let t1 = t0.elapsed().as_secs_f64() * 1e3;
            // `FERROFOLD_DAP_PROFILE=1`: the DAP trunk's synchronised phase times of this step.
            if kind == "dap"
                && ferrofold::parallel::dap_profile::enabled()
                && it + 1 == a.warmup + a.iters
            {
                let ph: Vec<String> = ferrofold::parallel::dap_profile::take()
                    .into_iter()
                    .map(|(n, ms, c)| format!("{n}={ms:.1}/{c}"))
                    .collect();
                println!("DAPPROF rank={rank} fwdbwd_ms={t1:.1} {}", ph.join(" "));
            }
            let grads = if world_ranks > 1 {
                reduce(&sync, grads, dap_size)?
            } else {
                grads
            };
            sync_dev()?;
            let t2 = t0.elapsed().as_secs_f64() * 1e3;
            rig.adam.apply(&rig.params, &grads, 1e-4)?;
            drop(grads);
            sync_dev()?;
            let t3 = t0.elapsed().as_secs_f64() * 1e3;
            let stall = w.stall()?;
            loss = l;
            if it >= a.warmup {
                tot.push(t3);
                fb.push(t1);
                ar.push(t2 - t1);
                op.push(t3 - t2);
                if let Some(s) = stall {
                    st.push(s);
                }
            }
        }
        let peak = match &watch {
            Some(p) => Some(p.peak()?),
            None => None,
        };
        Ok(Row {
            mode: name.to_string(),
            kind,
            remat: a.remat,
            ranks: world_ranks,
            step_ms: median(&mut tot),
            fwdbwd_ms: median(&mut fb),
            ar_ms: median(&mut ar),
            opt_ms: median(&mut op),
            stall_ms: (!st.is_empty()).then(|| median(&mut st)),
            peak_bytes: peak,
            loss,
        })
    }
}

/// Run `step-bench` (see the module docs).
pub fn step_bench(ctx: &ParallelCtx) -> Result<()> {
    let base = bench_args()?;
    let w = World::new(ctx)?;
    let n = w.comm.size();
    let modes = env_str("STEP_MODES", "check,dap,dp,single");
    if ctx.is_root() {
        println!(
            "STEPCFG {} n={n} crop {} n_seq {} extra {} blocks {}+{} sm {} recycles {} {:?} remat {:?} \
             dropout {} tiny {} iters {} warmup {} modes {modes}",
            w.comm.backend_name(),
            base.n_res,
            base.n_seq,
            base.n_extra,
            base.blocks,
            base.extra_blocks,
            base.sm_layers,
            base.recycles,
            base.precision,
            base.remat,
            !base.no_dropout,
            base.tiny,
            base.iters,
            base.warmup
        );
    }
    let mut rows: Vec<Row> = Vec::new();
    for m in modes.split(',').map(str::trim).filter(|m| !m.is_empty()) {
        let (kind, remat) = match m.split_once(':') {
            Some((k, r)) => (k, remat_of(r)?),
            None => (m, base.remat),
        };
        let kind: &'static str = match kind {
            "check" => {
                check(ctx, &w, &base)?;
                continue;
            }
            "dap" => "dap",
            "dp" => "dp",
            "single" => "single",
            o => bail!("STEP_MODES: unknown mode {o} (check, dap, dp, single[:remat])"),
        };
        let a = StepBenchArgs {
            remat,
            ..base.clone()
        };
        let t = Instant::now();
        if let Some(r) = timed(ctx, &w, &a, kind, m)? {
            if ctx.is_root() {
                let stall = r
                    .stall_ms
                    .map(|s| format!("{s:.1} stall_pct={:.1}", 100.0 * s / r.step_ms))
                    .unwrap_or_else(|| "na stall_pct=na".into());
                println!(
                    "STEP mode={} ranks={} remat={:?} blocks={} step_ms={:.1} samples_per_s={:.3} \
                     fwdbwd_ms={:.1} allreduce_ms={:.1} opt_ms={:.1} stall_ms={stall} peak_gib={} \
                     loss={:.4} wall_s={:.1}",
                    r.mode,
                    r.ranks,
                    r.remat,
                    a.blocks,
                    r.step_ms,
                    samples_per_s(&r, n),
                    r.fwdbwd_ms,
                    r.ar_ms,
                    r.opt_ms,
                    r.peak_bytes
                        .map(|p| format!("{:.1}", p as f64 / (1u64 << 30) as f64))
                        .unwrap_or_else(|| "na".into()),
                    r.loss,
                    t.elapsed().as_secs_f64()
                );
            }
            rows.push(r);
        }
    }
    if ctx.is_root() {
        for r in rows.iter().filter(|r| r.kind != "single") {
            let reference = rows
                .iter()
                .filter(|s| s.kind == "single")
                .min_by_key(|s| u8::from(s.remat != r.remat));
            let Some(s) = reference else {
                continue;
            };
            let what = if r.kind == "dap" {
                format!("DAP-{n} speedup {:.2}x", s.step_ms / r.step_ms)
            } else {
                format!(
                    "DP-{n} throughput {:.3} vs {:.3} samples/s: {:.2}x (efficiency {:.0}%)",
                    samples_per_s(r, n),
                    1e3 / s.step_ms,
                    samples_per_s(r, n) * s.step_ms / 1e3,
                    100.0 * samples_per_s(r, n) * s.step_ms / 1e3 / n as f64
                )
            };
            println!(
                "STEPSUM blocks={} {} ({} {:.1} ms) vs {} ({:.1} ms): {what}",
                base.blocks, r.mode, r.kind, r.step_ms, s.mode, s.step_ms
            );
        }
    }
    Ok(())
}

/// Samples per second of a mode: DP replicas each finish a sample per step; a DAP group one.
fn samples_per_s(r: &Row, n: usize) -> f64 {
    let per_step = if r.kind == "dp" { n } else { 1 };
    per_step as f64 * 1e3 / r.step_ms
}
