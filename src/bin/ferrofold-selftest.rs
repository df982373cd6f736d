//! Multi-rank self-test driver for the parallel runtime. Run under MPI:
//! `mpirun --allow-run-as-root --oversubscribe -np 2 ferrofold-selftest <case>`.
//!
//! Every rank prints `PASS <case> rank <r>/<n>` on success, or `FAIL <case> rank <r>/<n>: <why>`
//! and takes the job down (exit status non-zero). Expected values are computed locally from the
//! definition (each rank can rebuild every other rank's input), never hard-coded.
//!
//! Cases: `collectives`, `groups` (needs 4 ranks), `ddp`, `dap`, `dap-dp` (even rank count),
//! `panic-rank1`, `dp-toy` (data-parallel training of the toy task), `dap-evo` (the DAP Evoformer
//! stack vs the golden fixture and vs one rank), `dap-evo-dp` (DP-2 x DAP-2, 4 ranks; see
//! `selftest/dap_evo.rs`), `step-bench` (the full AF2 training step: DAP-n / DP-n vs one
//! rank, with a DAP-vs-single loss/gradient check; `selftest/step_bench.rs`), and `bench` /
//! `dap-evo-bench` (timings printed by rank 0 as `BENCH` lines; not tests).
//!
//! `--device cuda` (or `FERROFOLD_SELFTEST_DEVICE=cuda`; `cuda` builds) runs the same cases on
//! this rank's GPU (local rank modulo the visible GPUs) with the NCCL backend
//! (`ParallelConfig::backend = auto`); the assertions are the same (tolerances noted per case).
//! `--device cpu` (the default) is the MPI path.

#[path = "selftest/dap_evo.rs"]
mod dap_evo;
#[path = "selftest/dap_remat.rs"]
mod dap_remat;
#[path = "selftest/step_bench.rs"]
mod step_bench;

use std::io::Write;
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor, Var, D};
use ferrofold::config::{CommBackend, Overlap, ParallelConfig};
use ferrofold::parallel::{
    dap_grad_scale, global_grad_norm, mean_to_root, pad_mask, pad_to_multiple, unpad, Communicator,
    Dap, GradSync, GridCoords, MpiComm, ParallelCtx, ProcessGroups, ReduceOp,
};

/// The device of this run (set once in `main`).
static DEVICE: std::sync::OnceLock<Device> = std::sync::OnceLock::new();

/// This rank's device: CPU, or its GPU with `--device cuda`.
pub(crate) fn dev() -> Device {
    DEVICE.get().cloned().unwrap_or(Device::Cpu)
}

/// True when running on a GPU.
pub(crate) fn on_gpu() -> bool {
    !dev().is_cpu()
}

/// The world communicator for this run's device: MPI on the CPU, NCCL on a GPU.
pub(crate) fn world_comm(ctx: &ParallelCtx) -> Result<Arc<dyn Communicator>> {
    #[cfg(feature = "cuda")]
    if on_gpu() {
        return Ok(ferrofold::parallel::NcclComm::world(ctx, &dev())?);
    }
    Ok(MpiComm::world(ctx)?)
}

/// Process groups on this run's device (NCCL on a GPU with `backend = auto`).
pub(crate) fn process_groups(ctx: &ParallelCtx, cfg: &ParallelConfig) -> Result<ProcessGroups> {
    Ok(ProcessGroups::with_device(ctx, cfg, &dev())?)
}

/// Wait for the device's queued work (timings).
pub(crate) fn sync_dev() -> Result<()> {
    dev().synchronize()?;
    Ok(())
}

/// `--device cpu|cuda` from the arguments after the case, else `FERROFOLD_SELFTEST_DEVICE`.
fn device_arg() -> String {
    let args: Vec<String> = std::env::args().skip(2).collect();
    for (i, a) in args.iter().enumerate() {
        if let Some(v) = a.strip_prefix("--device=") {
            return v.to_string();
        }
        if a == "--device" {
            if let Some(v) = args.get(i + 1) {
                return v.clone();
            }
        }
    }
    std::env::var("FERROFOLD_SELFTEST_DEVICE").unwrap_or_else(|_| "cpu".into())
}

const CASES: &[&str] = &[
    "collectives",
    "groups",
    "ddp",
    "dap-dp",
    "dap",
    "panic-rank1",
    "dp-toy",
    "bench",
    "dap-evo",
    "dap-evo-bench",
    "dap-evo-dp",
    "dp-evo-bench",
    "dap-remat",
    "dap-remat-mem",
    "step-bench",
];

fn main() {
    let case = std::env::args().nth(1).unwrap_or_default();
    if !CASES.contains(&case.as_str()) {
        eprintln!(
            "usage: ferrofold-selftest <case>; cases: {}",
            CASES.join(", ")
        );
        std::process::exit(2);
    }
    let ctx = match ParallelCtx::init() {
        Ok(c) => c,
        Err(e) => {
            println!("FAIL {case}: MPI init: {e}");
            std::process::exit(1);
        }
    };
    let (rank, n) = (ctx.rank, ctx.world_size);
    let device = match device_arg().as_str() {
        "cpu" => Ok(Device::Cpu),
        "cuda" => ferrofold::device::select(ferrofold::config::DeviceKind::Cuda, ctx.local_rank)
            .map_err(anyhow::Error::from),
        other => Err(anyhow::anyhow!("--device {other}: expected cpu or cuda")),
    };
    let result = match device {
        Ok(d) => {
            // (`device::select` keeps freed GPU memory in the pool; `FERROFOLD_POOL_KEEP=0` not.)
            let _ = DEVICE.set(d);
            run(&case, &ctx)
        }
        Err(e) => Err(e),
    };
    let mut out = std::io::stdout();
    match result {
        Ok(()) => {
            let _ = writeln!(out, "PASS {case} rank {rank}/{n}");
            let _ = out.flush();
        }
        Err(e) => {
            let _ = writeln!(out, "FAIL {case} rank {rank}/{n}: {e:#}");
            let _ = out.flush();
            if n > 1 {
                ctx.abort(1);
            }
            std::process::exit(1);
        }
    }
}

fn run(case: &str, ctx: &ParallelCtx) -> Result<()> {
    match case {
        "collectives" => collectives(ctx),
        "groups" => groups(ctx),
        "ddp" => ddp(ctx),
        "dap" => dap(ctx),
        "dap-dp" => dap_dp(ctx),
        "panic-rank1" => panic_rank1(ctx),
        "dp-toy" => dp_toy(ctx),
        "bench" => bench(ctx),
        "dap-evo" => dap_evo::dap_evo(ctx),
        "dap-evo-bench" => dap_evo::dap_evo_bench(ctx),
        "dap-evo-dp" => dap_evo::dap_evo_dp(ctx),
        "dp-evo-bench" => dap_evo::dp_evo_bench(ctx),
        "dap-remat" | "dap-remat-mem" => dap_remat::run(case, ctx),
        "step-bench" => step_bench::step_bench(ctx),
        other => bail!("unknown case {other}"),
    }
}

/// Max |got - want| after checking shape and dtype.
fn max_diff(got: &Tensor, want: &Tensor) -> Result<f64> {
    ensure!(
        got.dims() == want.dims(),
        "shape {:?} != expected {:?}",
        got.dims(),
        want.dims()
    );
    ensure!(
        got.dtype() == want.dtype(),
        "dtype {:?} != expected {:?}",
        got.dtype(),
        want.dtype()
    );
    let d = (got.to_dtype(DType::F64)? - want.to_dtype(DType::F64)?)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f64>()?;
    Ok(d)
}

fn check(what: &str, got: &Tensor, want: &Tensor, tol: f64) -> Result<()> {
    let d = max_diff(got, want).with_context(|| what.to_string())?;
    ensure!(d <= tol, "{what}: max |diff| {d:e} > {tol:e}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// collectives
// ---------------------------------------------------------------------------------------------

/// Rank `q`'s input: `[2*n, 3]` with value `100*q + 10*i + j` (distinct everywhere).
fn input(q: usize, n: usize, dt: DType) -> Result<Tensor> {
    let rows = 2 * n;
    let v: Vec<f64> = (0..rows * 3)
        .map(|k| 100.0 * q as f64 + 10.0 * (k / 3) as f64 + (k % 3) as f64)
        .collect();
    Ok(Tensor::from_vec(v, (rows, 3), &dev())?.to_dtype(dt)?)
}

fn collectives(ctx: &ParallelCtx) -> Result<()> {
    let world = world_comm(ctx)?;
    let c: &dyn Communicator = world.as_ref();
    // Backend selection: the backend that cannot carry this device's tensors is rejected
    // (before any collective, so every rank fails alike) with an error naming the setting.
    let bad = ParallelConfig {
        backend: if on_gpu() {
            CommBackend::Mpi
        } else {
            CommBackend::Nccl
        },
        ..Default::default()
    };
    let e = ProcessGroups::with_device(ctx, &bad, &dev())
        .err()
        .context("a backend that cannot carry this device's tensors must be rejected")?;
    ensure!(
        e.to_string().contains("parallel.backend"),
        "error must name parallel.backend: {e}"
    );
    let auto = process_groups(ctx, &ParallelConfig::default())?;
    let want_backend = if on_gpu() { "nccl" } else { "mpi" };
    for (what, g) in [("world", &auto.world), ("dap", &auto.dap), ("dp", &auto.dp)] {
        ensure!(
            g.backend_name() == want_backend,
            "{what} group backend {} on {:?}",
            g.backend_name(),
            dev()
        );
    }
    drop(auto);
    ensure!(
        c.backend_name() == want_backend,
        "backend {} on {:?}",
        c.backend_name(),
        dev()
    );
    let (r, n) = (c.rank(), c.size());
    ensure!(
        (r, n) == (ctx.rank, ctx.world_size),
        "world communicator rank/size mismatch"
    );
    for dt in [DType::F32, DType::F64, DType::BF16] {
        // bf16 carries integers up to 256 exactly: scale inputs down for it.
        let scale = if dt == DType::BF16 { 0.01 } else { 1.0 };
        let x = (input(r, n, DType::F64)? * scale)?.to_dtype(dt)?;
        let all: Vec<Tensor> = (0..n)
            .map(|q| Ok((input(q, n, DType::F64)? * scale)?.to_dtype(dt)?))
            .collect::<Result<_>>()?;
        let tol = if dt == DType::BF16 { 0.05 } else { 1e-4 };
        let mut sum = all[0].to_dtype(DType::F64)?;
        for t in &all[1..] {
            sum = (sum + t.to_dtype(DType::F64)?)?;
        }
        let avg = (&sum / n as f64)?.to_dtype(dt)?;
        let sum = sum.to_dtype(dt)?;
        let tag = format!("{dt:?}");

        check(
            &format!("all_reduce sum {tag}"),
            &c.all_reduce(&x, ReduceOp::Sum)?,
            &sum,
            tol,
        )?;
        check(
            &format!("all_reduce avg {tag}"),
            &c.all_reduce(&x, ReduceOp::Avg)?,
            &avg,
            tol,
        )?;
        for dim in [0, 1] {
            let want = Tensor::cat(&all, dim)?;
            check(
                &format!("all_gather dim {dim} {tag}"),
                &c.all_gather(&x, dim)?,
                &want,
                0.0,
            )?;
            let h = c.start_all_gather(&x, dim)?;
            check(
                &format!("async all_gather dim {dim} {tag}"),
                &h.wait()?,
                &want,
                0.0,
            )?;
        }
        // all_to_all: split rows (dim 0) into n chunks, concat what arrives along dim 1.
        let chunk = 2;
        let want_a2a = Tensor::cat(
            &all.iter()
                .map(|t| t.narrow(0, r * chunk, chunk))
                .collect::<candle_core::Result<Vec<_>>>()?,
            1,
        )?;
        check(
            &format!("all_to_all {tag}"),
            &c.all_to_all(&x, 0, 1)?,
            &want_a2a,
            0.0,
        )?;
        // and back (the inverse all_to_all)
        let back = c.all_to_all(&want_a2a, 1, 0)?;
        check(&format!("all_to_all inverse {tag}"), &back, &x, 0.0)?;
        let root = n - 1;
        check(
            &format!("broadcast {tag}"),
            &c.broadcast(&x, root)?,
            &all[root],
            0.0,
        )?;

        // Async: several in flight, waited out of order, one dropped without wait.
        let h_sum = c.start_all_reduce(&x, ReduceOp::Sum)?;
        let h_a2a = c.start_all_to_all(&x, 0, 1)?;
        let h_dropped = c.start_all_reduce(&x, ReduceOp::Avg)?;
        let h_bc = c.start_broadcast(&x, 0)?;
        drop(h_dropped);
        check(
            &format!("async broadcast {tag}"),
            &h_bc.wait()?,
            &all[0],
            0.0,
        )?;
        check(
            &format!("async all_to_all {tag}"),
            &h_a2a.wait()?,
            &want_a2a,
            0.0,
        )?;
        check(
            &format!("async all_reduce sum {tag}"),
            &h_sum.wait()?,
            &sum,
            tol,
        )?;
        // A blocking collective after the dropped handle still matches correctly.
        check(
            &format!("all_reduce avg after drop {tag}"),
            &c.all_reduce(&x, ReduceOp::Avg)?,
            &avg,
            tol,
        )?;
    }
    // Host reductions.
    let v = c.all_reduce_host_f64(&[r as f64, 1.0], ReduceOp::Sum)?;
    ensure!(
        v == vec![(n * (n - 1) / 2) as f64, n as f64],
        "host all_reduce: {v:?}"
    );
    // Errors, not hangs, for bad arguments (checked locally before any communication).
    ensure!(
        c.all_to_all(&Tensor::zeros((2 * n + 1, 3), DType::F32, &dev())?, 0, 1)
            .is_err()
            || n == 1
    );
    ensure!(
        c.broadcast(&x_f32(r)?, n).is_err(),
        "broadcast to an out-of-range root must fail"
    );
    c.barrier()?;
    Ok(())
}

fn x_f32(r: usize) -> Result<Tensor> {
    Ok(Tensor::full(r as f32, (2, 2), &dev())?)
}

// ---------------------------------------------------------------------------------------------
// groups
// ---------------------------------------------------------------------------------------------

fn groups(ctx: &ParallelCtx) -> Result<()> {
    ensure!(ctx.world_size == 4, "the groups case needs 4 ranks");
    let bad = ParallelConfig {
        dap_size: 3,
        ..Default::default()
    };
    let e = process_groups(ctx, &bad)
        .err()
        .context("dap_size 3 on 4 ranks must be rejected")?;
    ensure!(
        e.to_string().contains("parallel.dap_size"),
        "error must name parallel.dap_size: {e}"
    );

    let cfg = ParallelConfig {
        dap_size: 2,
        ..Default::default()
    };
    let g = process_groups(ctx, &cfg)?;
    let want = GridCoords::new(ctx.rank, 4, 2)?;
    ensure!(g.coords == want, "coords {:?} != {want:?}", g.coords);
    ensure!(g.dap.size() == 2 && g.dp.size() == 2, "group sizes");
    ensure!(
        g.dap.rank() == want.dap_rank && g.dp.rank() == want.dp_rank,
        "group ranks"
    );

    let me = Tensor::new(&[ctx.rank as f64], &dev())?;
    let members = |m: Vec<usize>| -> Result<Tensor> {
        let v: Vec<f64> = m.into_iter().map(|x| x as f64).collect();
        Ok(Tensor::new(v.as_slice(), &dev())?)
    };
    let dap_m = members(want.dap_members())?;
    let dp_m = members(want.dp_members())?;
    check("dap all_gather", &g.dap.all_gather(&me, 0)?, &dap_m, 0.0)?;
    check("dp all_gather", &g.dp.all_gather(&me, 0)?, &dp_m, 0.0)?;
    check(
        "dap all_reduce",
        &g.dap.all_reduce(&me, ReduceOp::Sum)?,
        &dap_m.sum_keepdim(0)?,
        0.0,
    )?;
    check(
        "dp all_reduce",
        &g.dp.all_reduce(&me, ReduceOp::Sum)?,
        &dp_m.sum_keepdim(0)?,
        0.0,
    )?;
    // Async on two independent communicators at once.
    let h_dap = g.dap.start_all_gather(&me, 0)?;
    let h_dp = g.dp.start_all_reduce(&me, ReduceOp::Avg)?;
    check("async dp avg", &h_dp.wait()?, &dp_m.mean_keepdim(0)?, 0.0)?;
    check("async dap gather", &h_dap.wait()?, &dap_m, 0.0)?;
    check(
        "dp broadcast",
        &g.dp.broadcast(&me, 1)?,
        &dp_m.narrow(0, 1, 1)?,
        0.0,
    )?;
    check(
        "world all_reduce",
        &g.world.all_reduce(&me, ReduceOp::Sum)?,
        &Tensor::new(&[6.0f64], &dev())?,
        0.0,
    )?;
    g.world.barrier()?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// ddp
// ---------------------------------------------------------------------------------------------

/// Rank `q`'s gradients, sorted by name: a few normal tensors, many tiny ones, a scalar.
fn grads_for(q: usize, dt: DType) -> Result<Vec<(String, Tensor)>> {
    let mut shapes: Vec<(String, Vec<usize>)> = vec![
        ("a.bias".into(), vec![3]),
        ("a.weight".into(), vec![4, 5]),
        ("c.big".into(), vec![37, 3]),
        ("d.scalar".into(), vec![]),
    ];
    for i in 0..12 {
        shapes.push((format!("b.tiny{i:02}"), vec![1 + i % 2]));
    }
    shapes.sort_by(|a, b| a.0.cmp(&b.0));
    shapes
        .into_iter()
        .enumerate()
        .map(|(k, (name, dims))| {
            let cnt: usize = dims.iter().product();
            let v: Vec<f64> = (0..cnt)
                .map(|i| ((q as f64 + 1.0) * 0.37 + k as f64 * 0.11 + i as f64 * 0.7).sin())
                .collect();
            Ok((name, Tensor::from_vec(v, dims, &dev())?.to_dtype(dt)?))
        })
        .collect()
}

fn ddp(ctx: &ParallelCtx) -> Result<()> {
    let world: Arc<dyn Communicator> = world_comm(ctx)?;
    let (r, n) = (world.rank(), world.size());
    for dt in [DType::F32, DType::F64] {
        let mine = grads_for(r, dt)?;
        let all: Vec<Vec<(String, Tensor)>> =
            (0..n).map(|q| grads_for(q, dt)).collect::<Result<_>>()?;
        let want: Vec<Tensor> = (0..mine.len())
            .map(|k| {
                let mut s = all[0][k].1.to_dtype(DType::F64)?;
                for g in &all[1..] {
                    s = (s + g[k].1.to_dtype(DType::F64)?)?;
                }
                Ok((s / n as f64)?.to_dtype(dt)?)
            })
            .collect::<Result<_>>()?;
        let tol = if dt == DType::F32 { 1e-6 } else { 1e-14 };
        let esz = dt.size_in_bytes();
        // One element per bucket, buckets cutting tensors, a bucket per few tensors, one bucket.
        for bucket_bytes in [esz, 7 * esz, 25 * esz, 1 << 20] {
            let sync = GradSync::with_bucket_bytes(world.clone(), bucket_bytes);
            let got = sync.all_reduce_mean(&mine)?;
            ensure!(got.len() == mine.len(), "gradient count");
            for ((name, g), ((name0, _), w)) in got.iter().zip(mine.iter().zip(&want)) {
                ensure!(name == name0, "name order {name} vs {name0}");
                check(
                    &format!("ddp {dt:?} bucket {bucket_bytes}B {name}"),
                    g,
                    w,
                    tol,
                )?;
            }
            let norm = global_grad_norm(&got)?;
            let want_norm = global_grad_norm(
                &mine
                    .iter()
                    .zip(&want)
                    .map(|((nm, _), w)| (nm.clone(), w.clone()))
                    .collect::<Vec<_>>(),
            )?;
            ensure!(
                (norm - want_norm).abs() <= 1e-5 * want_norm,
                "grad norm {norm} vs {want_norm}"
            );
        }
        // Scaled sum (DAP convention): a "sharded" parameter gets sum * dap/world.
        let sync = GradSync::new(world.clone(), 25);
        let got =
            sync.all_reduce_scaled(&mine, &|name| dap_grad_scale(name.starts_with("c."), n, n))?;
        for ((name, g), w) in got.iter().zip(&want) {
            let w = if name.starts_with("c.") {
                (w.to_dtype(DType::F64)? * n as f64)?.to_dtype(dt)?
            } else {
                w.clone()
            };
            check(&format!("scaled {name}"), g, &w, tol * n as f64)?;
        }
        // Unsorted input is rejected on every rank (before any communication).
        let mut unsorted = mine.clone();
        unsorted.swap(0, 1);
        ensure!(
            sync.all_reduce_mean(&unsorted).is_err(),
            "unsorted gradients must be rejected"
        );
    }
    let m = mean_to_root(world.as_ref(), &[r as f64, 2.0 * r as f64], 0)?;
    let mean_r = (n - 1) as f64 / 2.0;
    match (r, m) {
        (0, Some(v)) => ensure!(v == vec![mean_r, 2.0 * mean_r], "metrics mean {v:?}"),
        (0, None) => bail!("root got no metrics"),
        (_, Some(_)) => bail!("non-root got metrics"),
        (_, None) => {}
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// dap
// ---------------------------------------------------------------------------------------------

const S: usize = 4;
const R: usize = 5;
const C: usize = 3;

fn det(dims: &[usize], seed: f64) -> Result<Tensor> {
    let cnt: usize = dims.iter().product();
    let v: Vec<f64> = (0..cnt).map(|i| (seed + 0.731 * i as f64).sin()).collect();
    Ok(Tensor::from_vec(v, dims, &dev())?)
}

/// `[a, b, C] x [C, C]`.
fn mm(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (a, b, c) = x.dims3()?;
    Ok(x.reshape((a * b, c))?.matmul(w)?.reshape((a, b, c))?)
}

/// Input `x` (one sample) and parameters: `w0`, `w3` act on replicated tensors (before `scatter`,
/// after `gather`), `w1`, `w2` on DAP shards.
struct Params {
    x: Var,
    w0: Var,
    w1: Var,
    w2: Var,
    w3: Var,
}

impl Params {
    fn new(sample: usize) -> Result<Self> {
        Ok(Self {
            x: Var::from_tensor(&det(&[S, R, C], 0.3 + sample as f64)?)?,
            w0: Var::from_tensor(&det(&[C], 0.7)?)?,
            w1: Var::from_tensor(&det(&[C, C], 1.1)?)?,
            w2: Var::from_tensor(&det(&[C, C], 2.3)?)?,
            w3: Var::from_tensor(&det(&[C], 3.9)?)?,
        })
    }

    /// Sorted `(name, grad)` of the parameters (not `x`).
    fn grads(&self, gs: &candle_core::backprop::GradStore) -> Result<Vec<(String, Tensor)>> {
        [
            ("w0", &self.w0),
            ("w1", &self.w1),
            ("w2", &self.w2),
            ("w3", &self.w3),
        ]
        .into_iter()
        .map(|(n, v)| {
            let g = gs.get(v.as_tensor()).cloned();
            Ok((
                n.to_string(),
                g.with_context(|| format!("missing gradient of {n}"))?,
            ))
        })
        .collect()
    }
}

/// DAP-sharded parameters (their per-rank gradients are partial).
fn is_sharded(name: &str) -> bool {
    name == "w1" || name == "w2"
}

/// The single-rank function: row-wise softmax over residues, column-wise softmax over sequences.
fn reference(p: &Params, g: &Tensor) -> Result<(Tensor, Tensor)> {
    let x = p.x.broadcast_mul(&p.w0)?;
    let h = mm(&x, &p.w1)?;
    let a = candle_nn::ops::softmax(&h, 1)?;
    let c = candle_nn::ops::softmax(&(a * 3.0)?, 0)?;
    let y = mm(&c, &p.w2)?.broadcast_mul(&p.w3)?;
    let loss = (&y * g)?.sum_all()?;
    Ok((y, loss))
}

/// The same function with the MSA-like tensor sharded over the DAP group: rows (dim 0) sharded for
/// the row op, columns (dim 1, padded to a multiple of the group size) for the column op.
fn distributed(dap: &Dap, p: &Params, g: &Tensor, asynchronous: bool) -> Result<(Tensor, Tensor)> {
    let n = dap.size();
    let x = p.x.broadcast_mul(&p.w0)?; // replicated compute
    let xp = pad_to_multiple(&x, 1, n)?; // [S, Rp, C]
    let mask = pad_mask(R, n, DType::F64, &dev())?;
    let rp = mask.dims1()?;
    let bias = ((mask - 1.0)? * 1e9)?.reshape((1, rp, 1))?;
    let xr = dap.scatter(&xp, 0)?; // [S/n, Rp, C]
    let h = mm(&xr, &p.w1)?;
    let a = candle_nn::ops::softmax(&h.broadcast_add(&bias)?, 1)?;
    let ac = if asynchronous {
        let pending = dap.start_row_to_col(&a, 0, 1)?;
        let _overlap = mm(&xr, &p.w2)?; // independent compute while the all-to-all is in flight
        pending.wait()?
    } else {
        dap.row_to_col(&a, 0, 1)? // [S, Rp/n, C]
    };
    let c = candle_nn::ops::softmax(&(ac * 3.0)?, 0)?;
    let y = mm(&c, &p.w2)?;
    let yr = if asynchronous {
        dap.start_col_to_row(&y, 0, 1)?.wait()?
    } else {
        dap.col_to_row(&y, 0, 1)? // [S/n, Rp, C]
    };
    let yf = if asynchronous {
        dap.start_gather(&yr, 0)?.wait()?
    } else {
        dap.gather(&yr, 0)? // [S, Rp, C]
    };
    let y = unpad(&yf, 1, R)?.broadcast_mul(&p.w3)?; // replicated compute
    let loss = (&y * g)?.sum_all()?;
    Ok((y, loss))
}

fn dap(ctx: &ParallelCtx) -> Result<()> {
    let world: Arc<dyn Communicator> = world_comm(ctx)?;
    ensure!(
        S.is_multiple_of(world.size()),
        "the dap case needs a group size dividing {S}"
    );
    let g = det(&[S, R, C], 4.7)?;

    // Single-rank reference, computed locally.
    let p = Params::new(0)?;
    let (y_ref, loss_ref) = reference(&p, &g)?;
    let gs = loss_ref.backward()?;
    let gx_ref = gs.get(p.x.as_tensor()).cloned().context("grad x")?;
    let grads_ref = p.grads(&gs)?;

    let modes = [
        ("sync", false, Overlap::DualityAsync),
        ("async", true, Overlap::DualityAsync),
        ("async-overlap-off", true, Overlap::Off),
    ];
    for (tag, asynchronous, overlap) in modes {
        let dap = Dap::with_overlap(world.clone(), overlap);
        let p = Params::new(0)?;
        let (y, loss) = distributed(&dap, &p, &g, asynchronous)?;
        check(&format!("{tag} forward y"), &y, &y_ref, 1e-12)?;
        check(&format!("{tag} loss"), &loss, &loss_ref, 1e-12)?;
        let gs = loss.backward()?;
        // x is replicated (enters through scatter): its gradient is complete on every rank.
        let gx = gs.get(p.x.as_tensor()).cloned().context("grad x")?;
        check(&format!("{tag} grad x"), &gx, &gx_ref, 1e-12)?;
        for ((name, gr), (_, want)) in p.grads(&gs)?.iter().zip(&grads_ref) {
            // Sharded parameters hold partial gradients: sum over the DAP group. Replicated ones
            // are complete already.
            let got = if is_sharded(name) {
                dap.comm().all_reduce(gr, ReduceOp::Sum)?
            } else {
                gr.clone()
            };
            check(&format!("{tag} grad {name}"), &got, want, 1e-12)?;
        }
    }
    // scatter/gather along the last dim: d/dv sum((2v)^2) = 8v, complete on every rank.
    let dap = Dap::new(world.clone());
    let v = Var::from_tensor(&det(&[2, 3 * world.size()], 9.1)?)?;
    let shard = dap.scatter(&v, 1)?;
    let full = dap.gather(&(&shard * 2.0)?, 1)?;
    let gs = full.sqr()?.sum(D::Minus1)?.sum_all()?.backward()?;
    let want = (v.as_tensor() * 8.0)?;
    let got = gs.get(v.as_tensor()).cloned().context("grad v")?;
    check("scatter/gather dim 1 grad", &got, &want, 1e-12)?;
    Ok(())
}

/// DAP inside data parallelism: a `dp × 2` grid, each DP replica a different sample, parameter
/// gradients reduced once over the world with the DAP convention; they must equal the mean over
/// samples of the single-rank gradients.
fn dap_dp(ctx: &ParallelCtx) -> Result<()> {
    let cfg = ParallelConfig {
        dap_size: 2,
        ..Default::default()
    };
    let groups = process_groups(ctx, &cfg)?;
    let co = groups.coords;
    let g = det(&[S, R, C], 4.7)?;
    // Reference: mean over the dp_size samples of single-rank gradients.
    let mut want: Vec<(String, Tensor)> = Vec::new();
    for sample in 0..co.dp_size {
        let p = Params::new(sample)?;
        let (_, loss) = reference(&p, &g)?;
        let gr = p.grads(&loss.backward()?)?;
        if want.is_empty() {
            want = gr;
        } else {
            for ((_, w), (_, x)) in want.iter_mut().zip(&gr) {
                *w = (&*w + x)?;
            }
        }
    }
    for (_, w) in want.iter_mut() {
        *w = (&*w / co.dp_size as f64)?;
    }
    let dap = Dap::new(groups.dap.clone());
    let p = Params::new(co.dp_rank)?;
    let (_, loss) = distributed(&dap, &p, &g, true)?;
    let local = p.grads(&loss.backward()?)?;
    let sync = GradSync::new(groups.world.clone(), 25);
    let (dap_size, world_size) = (co.dap_size, co.world_size);
    let got = sync.all_reduce_scaled(&local, &|name| {
        dap_grad_scale(is_sharded(name), dap_size, world_size)
    })?;
    for ((name, gr), (_, w)) in got.iter().zip(&want) {
        check(&format!("dap x dp grad {name}"), gr, w, 1e-12)?;
    }
    // Loss averaged to rank 0 over the DP replicas (one DAP rank per replica reports).
    let l = loss.to_scalar::<f64>()?;
    let m = mean_to_root(groups.world.as_ref(), &[l], 0)?;
    if let Some(m) = m {
        let mut want_l = 0.0;
        for sample in 0..co.dp_size {
            want_l += reference(&Params::new(sample)?, &g)?.1.to_scalar::<f64>()?;
        }
        want_l /= co.dp_size as f64;
        ensure!(
            (m[0] - want_l).abs() <= 1e-12,
            "mean loss {} vs {want_l}",
            m[0]
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// panic-rank1
// ---------------------------------------------------------------------------------------------

fn panic_rank1(ctx: &ParallelCtx) -> Result<()> {
    let world = world_comm(ctx)?;
    world.barrier()?;
    if ctx.rank == 1 {
        panic!("selftest: deliberate panic on rank 1");
    }
    // Without the abort-on-panic policy this would wait forever for rank 1.
    let x = Tensor::ones(4, DType::F32, &dev())?;
    world.all_reduce(&x, ReduceOp::Sum)?;
    bail!(
        "rank {} returned from a collective that rank 1 never joined",
        ctx.rank
    )
}

// ---------------------------------------------------------------------------------------------
// bench (timings, not a test)
// ---------------------------------------------------------------------------------------------

/// Median wall time (ms) of `f` over 5 runs after one warm-up, ranks aligned by a barrier; the
/// device's queued work is included (synchronised before the clock stops).
pub(crate) fn median_ms(comm: &dyn Communicator, f: &mut dyn FnMut() -> Result<()>) -> Result<f64> {
    f()?;
    sync_dev()?;
    let mut ts = Vec::new();
    for _ in 0..5 {
        comm.barrier()?;
        let t = std::time::Instant::now();
        f()?;
        sync_dev()?;
        ts.push(t.elapsed().as_secs_f64() * 1e3);
    }
    ts.sort_by(|a, b| a.total_cmp(b));
    Ok(ts[2])
}

/// Environment override of a size (bench knobs).
pub(crate) fn env_usize(k: &str, d: usize) -> usize {
    std::env::var(k)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(d)
}

/// Gradient-like tensors of `total` f32 elements in AF2-like sizes (sorted names): 1M, 256K, 64K
/// and 256-element tensors in turn, the remainder in the last one.
fn grad_tensors(total: usize) -> Result<Vec<(String, Tensor)>> {
    let sizes = [1 << 20, 1 << 18, 1 << 16, 256];
    let mut out = Vec::new();
    let mut left = total;
    let mut i = 0usize;
    while left > 0 {
        let n = sizes[i % sizes.len()].min(left);
        out.push((
            format!("p{i:06}"),
            Tensor::ones(n, DType::F32, &dev())?.affine(1.0 + (i % 7) as f64, 0.0)?,
        ));
        left -= n;
        i += 1;
    }
    Ok(out)
}

fn bench(ctx: &ParallelCtx) -> Result<()> {
    let world: Arc<dyn Communicator> = world_comm(ctx)?;
    let c = world.as_ref();
    let n = c.size();
    let gpu = on_gpu();
    let mut lines = Vec::new();
    let bus = |bytes: f64, ms: f64| bytes / (ms * 1e-3) / 1e9 * 2.0 * (n as f64 - 1.0) / n as f64;
    let x = Tensor::ones(10_000_000, DType::F32, &dev())?;
    let t = median_ms(c, &mut || {
        c.all_reduce(&x, ReduceOp::Sum)?;
        Ok(())
    })?;
    lines.push(format!(
        "all_reduce 10M f32 blocking: {t:.2} ms (bus {:.0} GB/s)",
        bus(4e7, t)
    ));
    if !gpu {
        let raw = vec![1.0f64; 5_000_000];
        let t = median_ms(c, &mut || {
            ctx.all_reduce_sum_f64(&raw);
            Ok(())
        })?;
        lines.push(format!(
            "raw MPI all_reduce 5M f64 (same 40 MB, no tensor copies): {t:.1} ms"
        ));
    }
    let t = median_ms(c, &mut || {
        c.start_all_reduce(&x, ReduceOp::Sum)?.wait()?;
        Ok(())
    })?;
    lines.push(format!("all_reduce 10M f32 start+wait: {t:.2} ms"));
    // Gradient buckets: ~93M parameters (AF2) on a GPU, 10M on the CPU.
    let total = env_usize(
        "BENCH_GRAD_PARAMS",
        if gpu { 93_000_000 } else { 10_000_000 },
    );
    let grads = grad_tensors(total)?;
    let bytes = 4.0 * total as f64;
    if gpu {
        let flat = Tensor::ones(total, DType::F32, &dev())?;
        let t = median_ms(c, &mut || {
            c.all_reduce(&flat, ReduceOp::Avg)?;
            Ok(())
        })?;
        lines.push(format!(
            "all_reduce one {total} f32 buffer ({:.0} MB): {t:.2} ms (alg {:.0} GB/s, bus {:.0} GB/s)",
            bytes / 1e6,
            bytes / (t * 1e-3) / 1e9,
            bus(bytes, t)
        ));
    }
    for mib in [25usize, 100] {
        let sync = GradSync::new(world.clone(), mib);
        let t = median_ms(c, &mut || {
            sync.all_reduce_mean(&grads)?;
            Ok(())
        })?;
        lines.push(format!(
            "GradSync {} tensors, {total} f32 params ({:.0} MB), {mib} MiB buckets: {t:.2} ms \
             (alg {:.0} GB/s, bus {:.0} GB/s incl. flatten/unflatten)",
            grads.len(),
            bytes / 1e6,
            bytes / (t * 1e-3) / 1e9,
            bus(bytes, t)
        ));
    }
    // DAP all-to-all of a pair-like activation [256/n, 256, 128] vs independent compute.
    let dt = if gpu { DType::BF16 } else { DType::F32 };
    let reps = if gpu { 20 } else { 1 };
    let dap = Dap::new(world.clone());
    let z = Tensor::ones((256 / n, 256, 128), dt, &dev())?;
    let w = Tensor::ones((128, 128), dt, &dev())?;
    let compute = || -> Result<Tensor> {
        let mut y = z.reshape((256 / n * 256, 128))?;
        for _ in 0..reps {
            y = y.matmul(&w)?.affine(1.0 / 128.0, 0.0)?;
        }
        Ok(y)
    };
    let t_comm = median_ms(c, &mut || {
        dap.row_to_col(&z, 0, 1)?;
        Ok(())
    })?;
    let t_comp = median_ms(c, &mut || {
        compute()?;
        Ok(())
    })?;
    let t_over = median_ms(c, &mut || {
        let p = dap.start_row_to_col(&z, 0, 1)?;
        compute()?;
        p.wait()?;
        Ok(())
    })?;
    lines.push(format!(
        "DAP row_to_col [256/{n},256,128] {dt:?}: {t_comm:.2} ms; {reps} matmul {t_comp:.2} ms; \
         started+matmul+wait {t_over:.2} ms (sequential sum {:.2} ms)",
        t_comm + t_comp
    ));
    if ctx.rank == 0 {
        for l in lines {
            println!("BENCH np{n} {} {l}", c.backend_name());
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// dp-toy: data-parallel training through the real trainer + GroupCollective
// ---------------------------------------------------------------------------------------------

fn toy_train_config(steps: u64) -> ferrofold::config::Config {
    let mut c = ferrofold::config::Config::default();
    c.train.seed = 99;
    c.train.max_steps = steps;
    c.train.checkpoint_every = 3;
    c.train.eval_every = 1000;
    c.optim.lr = 1e-2;
    c.optim.warmup_steps = 2;
    c.log.progress = ferrofold::config::Progress::Never;
    c.log.mllog = ferrofold::config::MlLog::Off;
    c
}

fn toy_weights<T: ferrofold::train::Task, C: ferrofold::train::Collective>(
    t: &ferrofold::train::Trainer<T, C>,
) -> Result<Vec<(String, Vec<f32>)>> {
    t.task()
        .params()
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.as_tensor().flatten_all()?.to_vec1::<f32>()?)))
        .collect()
}

/// A fresh directory shared by all ranks (rank 0 creates it, everyone agrees on the name).
fn shared_dir(ctx: &ParallelCtx, tag: &str) -> Result<std::path::PathBuf> {
    let id = ctx.all_reduce_max_u64(u64::from(std::process::id()));
    let d = std::env::temp_dir().join(format!("ff-selftest-{tag}-{id}"));
    if ctx.rank == 0 {
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d)?;
    }
    ctx.barrier();
    Ok(d)
}

/// DP-2 training of the toy task equals one process training on both replicas' samples (each step's
/// gradient = the mean over 2B samples), and a DP-2 run stopped after k steps and resumed equals
/// the straight DP-2 run bitwise.
fn dp_toy(ctx: &ParallelCtx) -> Result<()> {
    use ferrofold::parallel::GroupCollective;
    use ferrofold::train::toy::{ToyConfig, ToyTask};
    use ferrofold::train::{Outcome, Resume, SingleProcess, Trainer, TrainerOptions};
    use std::collections::BTreeSet;

    let n = ctx.world_size;
    let steps = 7u64;
    let cfg = toy_train_config(steps);
    // The toy task computes on the CPU; on a GPU run its CPU gradients go through the NCCL
    // communicator's MPI companion.
    let groups = Arc::new(process_groups(ctx, &cfg.parallel)?);
    let coll = || GroupCollective::new(groups.clone(), 1, BTreeSet::new());
    // No label noise: the single-process reference must see exactly the same samples.
    let toy = |shard: (usize, usize), batch: usize| ToyConfig {
        batch,
        noise_std: 0.0,
        shard,
        ..ToyConfig::default()
    };
    let opts = |dir: &std::path::Path| {
        let mut o = TrainerOptions::new(dir);
        o.handle_signals = false;
        o
    };

    // 1. straight DP-n run.
    let dir = shared_dir(ctx, "dp-straight")?;
    let mut dp = Trainer::new(
        ToyTask::new(toy((ctx.rank, n), 4))?,
        coll(),
        &cfg,
        opts(&dir),
    )?;
    ensure!(
        dp.run()? == Outcome::Finished { step: steps },
        "dp run did not finish"
    );
    let dp_w = toy_weights(&dp)?;

    // 2. one process, batch n*B, no sharding: the same gradients up to rounding.
    let single_dir =
        std::env::temp_dir().join(format!("ff-selftest-single-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&single_dir);
    let mut single = Trainer::new(
        ToyTask::new(toy((0, 1), 4 * n))?,
        SingleProcess,
        &cfg,
        opts(&single_dir),
    )?;
    ensure!(
        single.run()? == Outcome::Finished { step: steps },
        "single run did not finish"
    );
    for ((name, a), (_, b)) in dp_w.iter().zip(toy_weights(&single)?) {
        let d = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0f32, f32::max);
        ensure!(
            d <= 1e-6,
            "{name}: DP-{n} vs single process max |diff| {d:e} > 1e-6"
        );
    }
    let _ = std::fs::remove_dir_all(&single_dir);

    // 3. DP-n stopped at k, resumed by fresh trainers: bitwise equal to the straight run.
    let dir2 = shared_dir(ctx, "dp-resume")?;
    let mut o = opts(&dir2);
    o.stop_at = Some(4);
    let mut first = Trainer::new(ToyTask::new(toy((ctx.rank, n), 4))?, coll(), &cfg, o)?;
    ensure!(
        first.run()? == Outcome::Finished { step: 4 },
        "first half did not stop at 4"
    );
    drop(first);
    ctx.barrier();
    let mut o = opts(&dir2);
    o.resume = Resume::Auto;
    let mut resumed = Trainer::new(ToyTask::new(toy((ctx.rank, n), 4))?, coll(), &cfg, o)?;
    ensure!(
        resumed.step() == 4,
        "resumed at step {} instead of 4",
        resumed.step()
    );
    ensure!(
        resumed.run()? == Outcome::Finished { step: steps },
        "resumed run did not finish"
    );
    ensure!(
        toy_weights(&resumed)? == dp_w,
        "resumed DP run differs from the straight DP run"
    );
    // Every rank holds the same weights (the all-reduce kept replicas identical).
    let fp: f64 = dp_w
        .iter()
        .flat_map(|(_, v)| v.iter())
        .map(|x| f64::from(*x))
        .sum();
    let all = ctx.all_reduce_sum_f64(&[fp]);
    ensure!(
        (all[0] - fp * n as f64).abs() <= 1e-9 * fp.abs().max(1.0),
        "replicas diverged"
    );
    ctx.barrier();
    if ctx.rank == 0 {
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&dir2);
    }
    Ok(())
}
