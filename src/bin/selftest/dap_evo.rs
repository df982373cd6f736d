//! Self-test cases of the DAP Evoformer stack (`ferrofold::parallel::DapEvoformer`):
//! - `dap-evo`: on every world size `n`, the DAP-n stack (world = one DAP group) against
//!   (a) the OpenFold golden fixture `evoformer_stack_2blocks` (eval mode: outputs, every parameter
//!   gradient summed over the group, input gradients), with `parallel.overlap` = `duality_async`
//!   and `off`; (b) the single-rank stack (DAP-1) computed locally on every rank, in training mode
//!   (seeded shared dropout) with a fully masked sequence, in f64 and f32. `n_res = 11` and
//!   `n_seq = 5` are padded for every `n > 1`.
//! - `dap-evo-bench`: time of forward + backward of a larger random stack, overlap off vs
//!   duality async, and the time spent waiting for the asynchronous MSA all-to-all (rank 0 prints
//!   `BENCH` lines; not a test).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::{VarBuilder, VarMap};
use ferrofold::config::{Overlap, Remat, StackConfig};
use ferrofold::model::dropout::DropoutCtx;
use ferrofold::model::evoformer::{BlockConfig, EvoformerOutput, EvoformerStack};
use ferrofold::model::extra_msa::ExtraMsaStack;
use ferrofold::model::params::{sorted_vars, varmap_from_tensors};
use ferrofold::model::remat::vjp_loss;
use ferrofold::parallel::{Communicator, Dap, DapEvoformer, DapExtraMsa, ParallelCtx, ReduceOp};

use crate::{dev, process_groups, world_comm};

fn golden_dir() -> PathBuf {
    match std::env::var_os("FERROFOLD_GOLDEN_DIR") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../shared/golden/openfold"
        )),
    }
}

struct Fixture {
    meta: serde_json::Value,
    t: std::collections::HashMap<String, Tensor>,
}

impl Fixture {
    fn load(name: &str) -> Result<Self> {
        let base = golden_dir().join("modules").join(name);
        let json = base.with_extension("json");
        let meta: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&json).with_context(|| json.display().to_string())?,
        )?;
        let st = base.with_extension("safetensors");
        let t = candle_core::safetensors::load(&st, &Device::Cpu)
            .with_context(|| st.display().to_string())?;
        Ok(Self { meta, t })
    }
    /// Tensor `name` on this run's device.
    fn get(&self, name: &str) -> Result<Tensor> {
        Ok(self
            .t
            .get(name)
            .with_context(|| format!("fixture has no {name}"))?
            .to_device(&dev())?)
    }
    fn arg(&self, key: &str) -> Result<usize> {
        self.meta["constructor_args"][key]
            .as_u64()
            .map(|v| v as usize)
            .with_context(|| format!("constructor_args.{key}"))
    }
    /// Parameters on this run's device.
    fn params(&self) -> Result<BTreeMap<String, Tensor>> {
        self.t
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("param.").map(|n| (n.to_string(), v)))
            .map(|(n, v)| Ok((n, v.to_device(&dev())?)))
            .collect()
    }
}

fn block_config(fx: &Fixture) -> Result<BlockConfig> {
    Ok(BlockConfig {
        c_m: fx.arg("c_m")?,
        c_z: fx.arg("c_z")?,
        stack: StackConfig {
            num_blocks: fx.arg("no_blocks")?,
            c_hidden_msa_att: fx.arg("c_hidden_msa_att")?,
            no_heads_msa: fx.arg("no_heads_msa")?,
            c_hidden_opm: fx.arg("c_hidden_opm")?,
            c_hidden_mul: fx.arg("c_hidden_mul")?,
            c_hidden_pair_att: fx.arg("c_hidden_pair_att")?,
            no_heads_pair: fx.arg("no_heads_pair")?,
            transition_n: fx.arg("transition_n")?,
            msa_dropout: 0.15,
            pair_dropout: 0.25,
        },
        inf: 1e9,
        eps_opm: 1e-3,
        eps_global: 1e-8,
        backward: ferrofold::config::TrunkBackward::Manual,
    })
}

/// `max|got - want| / max|want|` (infinity-norm relative error) and the max abs diff.
fn rel_err(got: &Tensor, want: &Tensor) -> Result<(f64, f64)> {
    ensure!(
        got.dims() == want.dims(),
        "shape {:?} != {:?}",
        got.dims(),
        want.dims()
    );
    let g = got.to_dtype(DType::F64)?;
    let w = want.to_dtype(DType::F64)?;
    let d = (g - &w)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
    let s = w.abs()?.flatten_all()?.max(0)?.to_scalar::<f64>()?;
    Ok((d / s.max(1e-300), d))
}

/// Require `rel <= tol` or (structurally-zero gradients) `abs <= abs_tol`.
fn check(what: &str, got: &Tensor, want: &Tensor, tol: f64, abs_tol: f64) -> Result<f64> {
    let (rel, abs) = rel_err(got, want).with_context(|| what.to_string())?;
    ensure!(
        rel <= tol || abs <= abs_tol,
        "{what}: rel {rel:e} > {tol:e} (abs {abs:e})"
    );
    // A tensor that passes on the absolute tolerance (structurally zero) does not count.
    Ok(if rel <= tol { rel } else { 0.0 })
}

/// Outputs and gradients of one run.
struct Run {
    m: Tensor,
    z: Tensor,
    s: Tensor,
    /// Parameter gradients by name; DAP partial sums already summed over the group.
    grads: BTreeMap<String, Tensor>,
    dm: Tensor,
    dz: Tensor,
}

struct Inputs {
    m: Tensor,
    z: Tensor,
    msa_mask: Tensor,
    pair_mask: Tensor,
    cm: Tensor,
    cz: Tensor,
    cs: Tensor,
}

impl Inputs {
    fn to_dtype(&self, dt: DType) -> Result<Self> {
        let c = |t: &Tensor| t.to_dtype(dt);
        Ok(Self {
            m: c(&self.m)?,
            z: c(&self.z)?,
            msa_mask: c(&self.msa_mask)?,
            pair_mask: c(&self.pair_mask)?,
            cm: c(&self.cm)?,
            cz: c(&self.cz)?,
            cs: c(&self.cs)?,
        })
    }

    /// f64 copy with the last of `s_seq` MSA rows masked (its mask and its cotangent zeroed).
    fn last_sequence_masked(&self, s_seq: usize) -> Result<Self> {
        let keep = Tensor::from_vec(
            (0..s_seq)
                .map(|i| if i + 1 == s_seq { 0.0 } else { 1.0 })
                .collect::<Vec<f64>>(),
            (s_seq, 1),
            &dev(),
        )?;
        Ok(Self {
            msa_mask: self.msa_mask.broadcast_mul(&keep)?,
            cm: self.cm.broadcast_mul(&keep.unsqueeze(2)?)?,
            ..self.to_dtype(DType::F64)?
        })
    }
}

/// Forward + backward of `L = Σ out·cotangent`; `dap = None` is the single-rank stack.
fn run_once(
    vm: &VarMap,
    stack: &EvoformerStack,
    dap: Option<&DapEvoformer>,
    x: &Inputs,
    dropout: Option<&DropoutCtx>,
) -> Result<Run> {
    let fwd = |m: &Tensor, z: &Tensor| -> Result<Vec<Tensor>> {
        let out: EvoformerOutput = match dap {
            Some(d) => d.forward(m, z, &x.msa_mask, &x.pair_mask, dropout)?,
            None => stack.forward(m, z, &x.msa_mask, &x.pair_mask, dropout)?,
        };
        Ok(vec![out.m, out.z, out.s])
    };
    run_generic(vm, dap.map(|d| d.dap()), x, &fwd)
}

/// Forward `fwd(m, z)` → `[m, z, (s)]` and backward; with `dap`, every gradient of a `blocks.*`
/// parameter (sharded compute) is summed over the group.
fn run_generic(
    vm: &VarMap,
    dap: Option<&Dap>,
    x: &Inputs,
    fwd: &dyn Fn(&Tensor, &Tensor) -> Result<Vec<Tensor>>,
) -> Result<Run> {
    let mv = candle_core::Var::from_tensor(&x.m)?;
    let zv = candle_core::Var::from_tensor(&x.z)?;
    let (m, z) = (mv.as_tensor(), zv.as_tensor());
    let outs = fwd(m, z)?;
    let cots = [&x.cm, &x.cz, &x.cs];
    let pairs: Vec<(&Tensor, &Tensor)> = outs.iter().zip(cots).collect();
    let store = vjp_loss(&pairs)?.backward()?;
    let mut grads = BTreeMap::new();
    // Sorted names: the same collective order on every rank.
    for (name, v) in sorted_vars(vm) {
        let g = match store.get(v.as_tensor()) {
            Some(g) => g.clone(),
            None => v.as_tensor().zeros_like()?,
        };
        let g = match dap {
            Some(d) if DapEvoformer::is_sharded_param(&name) => {
                d.comm().all_reduce(&g, ReduceOp::Sum)?
            }
            _ => g,
        };
        grads.insert(name, g);
    }
    let dm = store.get(m).context("no input grad m")?.clone();
    let dz = store.get(z).context("no input grad z")?.clone();
    let mut it = outs.into_iter();
    let (om, oz) = (it.next().context("m")?, it.next().context("z")?);
    let os = match it.next() {
        Some(s) => s,
        None => Tensor::zeros(1, om.dtype(), om.device())?,
    };
    Ok(Run {
        m: om,
        z: oz,
        s: os,
        grads,
        dm,
        dz,
    })
}

/// Compare two runs (outputs restricted to MSA rows `..m_rows`). Returns the worst relative error.
fn compare(tag: &str, got: &Run, want: &Run, m_rows: usize, tol: f64, abs_tol: f64) -> Result<f64> {
    let mut worst = 0.0f64;
    let mut c = |what: &str, a: &Tensor, b: &Tensor| -> Result<()> {
        worst = worst.max(check(&format!("{tag}: {what}"), a, b, tol, abs_tol)?);
        Ok(())
    };
    c("m", &got.m.i(..m_rows)?, &want.m.i(..m_rows)?)?;
    c("z", &got.z, &want.z)?;
    c("s", &got.s, &want.s)?;
    c("grad m", &got.dm, &want.dm)?;
    c("grad z", &got.dz, &want.dz)?;
    ensure!(got.grads.len() == want.grads.len(), "{tag}: param count");
    for (k, g) in &got.grads {
        let w = want
            .grads
            .get(k)
            .with_context(|| format!("{tag}: no {k}"))?;
        c(&format!("grad {k}"), g, w)?;
    }
    Ok(worst)
}

fn build(
    params: &BTreeMap<String, Tensor>,
    cfg: &BlockConfig,
    c_s: usize,
    dt: DType,
) -> Result<(VarMap, EvoformerStack)> {
    let vm = varmap_from_tensors(params.clone(), dt)?;
    let vb = VarBuilder::from_varmap(&vm, dt, &dev());
    let stack = EvoformerStack::new(vb, cfg, c_s)?;
    Ok((vm, stack))
}

pub fn dap_evo(ctx: &ParallelCtx) -> Result<()> {
    let world: Arc<dyn Communicator> = world_comm(ctx)?;
    let (rank, n) = (world.rank(), world.size());
    let fx = Fixture::load("evoformer_stack_2blocks")?;
    let cfg = block_config(&fx)?;
    let c_s = fx.arg("c_s")?;
    let params = fx.params()?;
    let x = Inputs {
        m: fx.get("input.m")?,
        z: fx.get("input.z")?,
        msa_mask: fx.get("input.msa_mask")?,
        pair_mask: fx.get("input.pair_mask")?,
        cm: fx.get("cotangent.m")?,
        cz: fx.get("cotangent.z")?,
        cs: fx.get("cotangent.s")?,
    };
    let (s_seq, _, _) = x.m.dims3()?;
    let (vm, stack) = build(&params, &cfg, c_s, DType::F64)?;

    // (a) eval mode against the golden fixture, overlap on and off.
    let golden_grads: BTreeMap<String, Tensor> = params
        .keys()
        .map(|k| Ok((k.clone(), fx.get(&format!("grad.param.{k}"))?)))
        .collect::<Result<_>>()?;
    let golden = Run {
        m: fx.get("output.m")?,
        z: fx.get("output.z")?,
        s: fx.get("output.s")?,
        grads: golden_grads,
        dm: fx.get("grad.input.m")?,
        dz: fx.get("grad.input.z")?,
    };
    for overlap in [Overlap::DualityAsync, Overlap::Off] {
        let de = DapEvoformer::new(&stack, Dap::with_overlap(world.clone(), overlap));
        let got = run_once(&vm, &stack, Some(&de), &x, None)?;
        let w = compare(
            &format!("golden {overlap:?}"),
            &got,
            &golden,
            s_seq,
            1e-10,
            1e-12,
        )?;
        if rank == 0 {
            println!("dap-evo n={n} golden overlap={overlap:?}: worst rel {w:e}");
        }
    }

    // (b) training mode (seeded dropout), last sequence fully masked: DAP-n vs DAP-1, f64 + f32.
    // The masked row's own outputs depend on the padding (its softmax sees only masked keys), so
    // its m outputs and cotangent are left out.
    let last = s_seq - 1;
    let xm = x.last_sequence_masked(s_seq)?;
    let drop = DropoutCtx::new(20261123);
    for (dt, tol, abs_tol) in [(DType::F64, 1e-10, 1e-12), (DType::F32, 1e-5, 5e-5)] {
        let (vm, stack) = build(&params, &cfg, c_s, dt)?;
        let xd = xm.to_dtype(dt)?;
        let want = run_once(&vm, &stack, None, &xd, Some(&drop))?;
        for overlap in [Overlap::DualityAsync, Overlap::Off] {
            let de = DapEvoformer::new(&stack, Dap::with_overlap(world.clone(), overlap));
            let got = run_once(&vm, &stack, Some(&de), &xd, Some(&drop))?;
            let w = compare(
                &format!("dropout+masked {dt:?} {overlap:?}"),
                &got,
                &want,
                last,
                tol,
                abs_tol,
            )?;
            if rank == 0 {
                println!("dap-evo n={n} dropout+masked {dt:?} overlap={overlap:?}: worst rel vs DAP-1 {w:e}");
            }
        }
        // Dropout is really on: the eval-mode output differs.
        let eval = stack.forward(&xd.m, &xd.z, &xd.msa_mask, &xd.pair_mask, None)?;
        let (r, _) = rel_err(&eval.z, &want.z)?;
        ensure!(r > 1e-3, "dropout had no effect ({r:e})");
    }
    dap_extra_msa(&world)
}

/// The extra-MSA stack (one block, fixture `extra_msa_block`, `n_extra = 9`, `n_res = 11`):
/// golden (eval, overlap on/off) and DAP-1 (dropout, last sequence masked).
fn dap_extra_msa(world: &Arc<dyn Communicator>) -> Result<()> {
    let (rank, n) = (world.rank(), world.size());
    let fx = Fixture::load("extra_msa_block")?;
    let mut cfg = BlockConfig {
        c_m: fx.arg("c_m")?,
        c_z: fx.arg("c_z")?,
        stack: StackConfig {
            num_blocks: 1,
            c_hidden_msa_att: fx.arg("c_hidden_msa_att")?,
            no_heads_msa: fx.arg("no_heads_msa")?,
            c_hidden_opm: fx.arg("c_hidden_opm")?,
            c_hidden_mul: fx.arg("c_hidden_mul")?,
            c_hidden_pair_att: fx.arg("c_hidden_pair_att")?,
            no_heads_pair: fx.arg("no_heads_pair")?,
            transition_n: fx.arg("transition_n")?,
            msa_dropout: 0.15,
            pair_dropout: 0.25,
        },
        inf: 1e9,
        eps_opm: 1e-3,
        eps_global: 1e-8,
        backward: ferrofold::config::TrunkBackward::Manual,
    };
    cfg.stack.num_blocks = 1;
    let params: BTreeMap<String, Tensor> = fx
        .params()?
        .into_iter()
        .map(|(k, v)| (format!("blocks.0.{k}"), v))
        .collect();
    let x = Inputs {
        m: fx.get("input.m")?,
        z: fx.get("input.z")?,
        msa_mask: fx.get("input.msa_mask")?,
        pair_mask: fx.get("input.pair_mask")?,
        cm: fx.get("cotangent.m")?,
        cz: fx.get("cotangent.z")?,
        cs: Tensor::zeros(1, DType::F64, &dev())?,
    };
    let s_seq = x.m.dim(0)?;
    let golden = Run {
        m: fx.get("output.m")?,
        z: fx.get("output.z")?,
        s: x.cs.clone(),
        grads: fx
            .params()?
            .keys()
            .map(|k| Ok((format!("blocks.0.{k}"), fx.get(&format!("grad.param.{k}"))?)))
            .collect::<Result<_>>()?,
        dm: fx.get("grad.input.m")?,
        dz: fx.get("grad.input.z")?,
    };
    let build_extra = |dt: DType| -> Result<(VarMap, ExtraMsaStack)> {
        let vm = varmap_from_tensors(params.clone(), dt)?;
        let stack = ExtraMsaStack::new(VarBuilder::from_varmap(&vm, dt, &dev()), &cfg)?;
        Ok((vm, stack))
    };
    let (vm, stack) = build_extra(DType::F64)?;
    let run = |stack: &ExtraMsaStack,
               vm: &VarMap,
               overlap: Option<Overlap>,
               x: &Inputs,
               drop: Option<&DropoutCtx>|
     -> Result<Run> {
        let de = overlap.map(|o| DapExtraMsa::new(stack, Dap::with_overlap(world.clone(), o)));
        let fwd = |m: &Tensor, z: &Tensor| -> Result<Vec<Tensor>> {
            match &de {
                Some(d) => {
                    let (m, z) = d.forward_msa_pair(m, z, &x.msa_mask, &x.pair_mask, drop)?;
                    Ok(vec![m, z])
                }
                None => {
                    let b = &stack.blocks[0];
                    let (m, z) = b.forward(m, z, &x.msa_mask, &x.pair_mask, drop)?;
                    Ok(vec![m, z])
                }
            }
        };
        run_generic(vm, de.as_ref().map(|d| d.dap()), x, &fwd)
    };
    for overlap in [Overlap::DualityAsync, Overlap::Off] {
        let got = run(&stack, &vm, Some(overlap), &x, None)?;
        let w = compare(
            &format!("extra golden {overlap:?}"),
            &got,
            &golden,
            s_seq,
            1e-10,
            1e-12,
        )?;
        if rank == 0 {
            println!("dap-evo n={n} extra-msa golden overlap={overlap:?}: worst rel {w:e}");
        }
    }
    let last = s_seq - 1;
    let xm = x.last_sequence_masked(s_seq)?;
    // Block 0 of a stack uses `dropout.fork(0)`.
    let drop = DropoutCtx::new(99);
    let want = run(&stack, &vm, None, &xm, Some(&drop.fork(0)))?;
    for overlap in [Overlap::DualityAsync, Overlap::Off] {
        let got = run(&stack, &vm, Some(overlap), &xm, Some(&drop))?;
        let w = compare(
            &format!("extra dropout+masked {overlap:?}"),
            &got,
            &want,
            last,
            1e-10,
            1e-12,
        )?;
        if rank == 0 {
            println!("dap-evo n={n} extra-msa dropout+masked overlap={overlap:?}: worst rel vs DAP-1 {w:e}");
        }
    }
    Ok(())
}

/// Deterministic pseudo-random tensor (no RNG state shared between ranks needed).
fn det(dims: &[usize], seed: f64, scale: f64) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| {
            ((i as f64 * 0.7548776662 + seed).sin() * 43758.5453).fract() as f32 * scale as f32
        })
        .collect();
    Ok(Tensor::from_vec(v, dims, &dev())?)
}

/// The world for the benches, with the concrete NCCL communicator (stall timers) on a GPU.
struct BenchWorld {
    world: Arc<dyn Communicator>,
    #[cfg(feature = "cuda")]
    nccl: Option<Arc<ferrofold::parallel::NcclComm>>,
}

impl BenchWorld {
    fn new(ctx: &ParallelCtx) -> Result<Self> {
        #[cfg(feature = "cuda")]
        if crate::on_gpu() {
            let c = ferrofold::parallel::NcclComm::world(ctx, &dev())?;
            return Ok(Self {
                world: c.clone(),
                nccl: Some(c),
            });
        }
        Ok(Self {
            world: world_comm(ctx)?,
            #[cfg(feature = "cuda")]
            nccl: None,
        })
    }

    /// GPU stall (ms, waits) in collective waits since the last call (`FERROFOLD_NCCL_TIMING=1`).
    fn stall(&self) -> Result<Option<(f64, usize)>> {
        #[cfg(feature = "cuda")]
        if let Some(c) = &self.nccl {
            return Ok(c.take_stall_ms()?);
        }
        Ok(None)
    }
}

/// Bench block configuration: AF2's Evoformer dimensions on a GPU, small ones on the CPU
/// (`BENCH_*` overrides).
fn bench_config(gpu: bool, c_m: usize, c_z: usize, blocks: usize) -> BlockConfig {
    let e = crate::env_usize;
    let d = |cpu: usize, g: usize| if gpu { g } else { cpu };
    BlockConfig {
        c_m,
        c_z,
        stack: StackConfig {
            num_blocks: blocks,
            c_hidden_msa_att: e("BENCH_C_HIDDEN_MSA", d(8, 32)),
            no_heads_msa: e("BENCH_HEADS_MSA", d(4, 8)),
            c_hidden_opm: e("BENCH_C_OPM", d(8, 32)),
            c_hidden_mul: e("BENCH_C_MUL", d(32, 128)),
            c_hidden_pair_att: e("BENCH_C_HIDDEN_PAIR", d(8, 32)),
            no_heads_pair: e("BENCH_HEADS_PAIR", d(4, 4)),
            transition_n: 4,
            msa_dropout: 0.15,
            pair_dropout: 0.25,
        },
        inf: 1e9,
        eps_opm: 1e-3,
        eps_global: 1e-8,
        backward: ferrofold::config::TrunkBackward::Manual,
    }
}

fn bench_dtype() -> Result<DType> {
    match std::env::var("BENCH_DTYPE").as_deref() {
        Ok("bf16") => Ok(DType::BF16),
        Ok("f32") => Ok(DType::F32),
        Ok(other) => bail!("BENCH_DTYPE={other}: expected bf16 or f32"),
        Err(_) => Ok(if crate::on_gpu() {
            DType::BF16
        } else {
            DType::F32
        }),
    }
}

fn bench_remat() -> Result<Remat> {
    match std::env::var("BENCH_REMAT").as_deref() {
        Ok("block") => Ok(Remat::Block),
        Ok("none") | Err(_) => Ok(Remat::None),
        Ok(other) => bail!("BENCH_REMAT={other}: expected none or block"),
    }
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        f64::NAN
    } else {
        v[v.len() / 2]
    }
}

/// Bench stack and inputs: parameters from the seeded init, identical on every rank.
struct BenchSetup {
    _vm: VarMap,
    stack: EvoformerStack,
    m: Tensor,
    z: Tensor,
    mm: Tensor,
    pm: Tensor,
    cm: Tensor,
    cz: Tensor,
    desc: String,
}

fn bench_setup(world: &Arc<dyn Communicator>, blocks_default: usize) -> Result<BenchSetup> {
    let gpu = crate::on_gpu();
    let e = crate::env_usize;
    let d = |cpu: usize, g: usize| if gpu { g } else { cpu };
    let (s, r, c_m, c_z, blocks) = (
        e("BENCH_S", d(32, 128)),
        e("BENCH_R", d(64, 256)),
        e("BENCH_CM", d(32, 256)),
        e("BENCH_CZ", d(32, 128)),
        e("BENCH_BLOCKS", blocks_default),
    );
    let dt = bench_dtype()?;
    let cfg = bench_config(gpu, c_m, c_z, blocks);
    // Seeded per-name init: bit-identical on every rank (and it works for bf16 on a GPU, where
    // candle's own random init does not).
    let svm = ferrofold::model::init::SeededVarMap::new(5);
    let stack = EvoformerStack::new(svm.builder(dt, &dev()), &cfg, 384)?;
    let vm = svm.varmap.clone();
    ensure!(world.size() >= 1, "empty world");
    let c = |t: Tensor| t.to_dtype(dt);
    Ok(BenchSetup {
        _vm: vm,
        stack,
        m: c(det(&[s, r, c_m], 1.0, 1.0)?)?,
        z: c(det(&[r, r, c_z], 2.0, 1.0)?)?,
        mm: Tensor::ones((s, r), dt, &dev())?,
        pm: Tensor::ones((r, r), dt, &dev())?,
        cm: c(det(&[s, r, c_m], 3.0, 1.0)?)?,
        cz: c(det(&[r, r, c_z], 4.0, 1.0)?)?,
        desc: format!("S={s} R={r} c_m={c_m} c_z={c_z} blocks={blocks} {dt:?}"),
    })
}

/// High-water mark of the CUDA memory pool candle allocates from (`None` on the CPU).
struct PoolPeak {
    #[cfg(feature = "cuda")]
    pool: Option<cudarc::driver::sys::CUmemoryPool>,
}

impl PoolPeak {
    fn new() -> Result<Self> {
        #[cfg(feature = "cuda")]
        {
            use cudarc::driver::sys;
            let Device::Cuda(cd) = dev() else {
                return Ok(Self { pool: None });
            };
            let stream = cd.cuda_stream();
            let ctx = stream.context();
            ctx.bind_to_thread()
                .map_err(|e| anyhow::anyhow!("bind context: {e:?}"))?;
            if !ctx.has_async_alloc() {
                return Ok(Self { pool: None });
            }
            let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
            // SAFETY: valid out-pointer and the device handle of a live context.
            unsafe { sys::cuDeviceGetMemPool(&mut pool, ctx.cu_device()) }
                .result()
                .map_err(|e| anyhow::anyhow!("cuDeviceGetMemPool: {e:?}"))?;
            Ok(Self { pool: Some(pool) })
        }
        #[cfg(not(feature = "cuda"))]
        Ok(Self {})
    }

    /// Peak GiB since the last call (and reset the mark).
    fn take(&self) -> Result<Option<f64>> {
        #[cfg(feature = "cuda")]
        if let Some(pool) = self.pool {
            use cudarc::driver::sys;
            let attr = sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH;
            let mut v: u64 = 0;
            // SAFETY: the attribute is a cuuint64_t; `v` outlives the call.
            unsafe { sys::cuMemPoolGetAttribute(pool, attr, (&mut v as *mut u64).cast()) }
                .result()
                .map_err(|e| anyhow::anyhow!("cuMemPoolGetAttribute: {e:?}"))?;
            let mut zero: u64 = 0;
            // SAFETY: as above; setting USED_MEM_HIGH to 0 resets it to the current use.
            unsafe { sys::cuMemPoolSetAttribute(pool, attr, (&mut zero as *mut u64).cast()) }
                .result()
                .map_err(|e| anyhow::anyhow!("cuMemPoolSetAttribute: {e:?}"))?;
            return Ok(Some(v as f64 / (1u64 << 30) as f64));
        }
        Ok(None)
    }
}

fn gib(p: Option<f64>) -> String {
    p.map(|g| format!(", peak {g:.1} GiB")).unwrap_or_default()
}

/// `dap-evo-bench`: the Evoformer stack, DAP-1 vs DAP-n over the world (`parallel.overlap` off
/// and duality async). `BENCH_PASSES=fwdbwd` (default): forward and forward+backward with
/// gradients; `fwd`: forward only on detached parameters (no autograd graph kept, so long stacks
/// fit). DAP-1 is timed as `BENCH_DAP1` = `stack` (the single-rank stack,
/// `EvoformerStack::forward_train`, `BENCH_REMAT` = none|block), `dap` (the DAP stack over a
/// one-rank group: the same code path as DAP-n), `both` (default) or `none`. Median over
/// `BENCH_ITERS` after one warm-up. On a GPU with `FERROFOLD_NCCL_TIMING=1` it also reports how
/// long the compute stream stalled waiting on collectives. Rank 0 prints `BENCH` lines; not a
/// test.
pub fn dap_evo_bench(ctx: &ParallelCtx) -> Result<()> {
    let bw = BenchWorld::new(ctx)?;
    let world = bw.world.clone();
    let (rank, n) = (world.rank(), world.size());
    let b = bench_setup(&world, 2)?;
    let dctx = DropoutCtx::new(7);
    let iters = crate::env_usize("BENCH_ITERS", 3).max(1);
    let fwd_only = std::env::var("BENCH_PASSES").is_ok_and(|v| v == "fwd");
    let dap1 = std::env::var("BENCH_DAP1").unwrap_or_else(|_| "both".into());
    let mem = PoolPeak::new()?;
    // Forward-only: the same parameters as plain tensors (no graph is recorded).
    let plain;
    let stack = if fwd_only {
        let map: std::collections::HashMap<String, Tensor> = sorted_vars(&b._vm)
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().detach()))
            .collect();
        let cfg = bench_config(
            crate::on_gpu(),
            b.m.dim(2)?,
            b.z.dim(2)?,
            crate::env_usize("BENCH_BLOCKS", 2),
        );
        plain = EvoformerStack::new(
            VarBuilder::from_tensors(map, b.m.dtype(), &dev()),
            &cfg,
            384,
        )?;
        &plain
    } else {
        &b.stack
    };
    let pass = if fwd_only { "fwd-only" } else { "fwd+bwd" };
    let mut lines = Vec::new();
    let mut dap1_tot = None;
    let mut dap1_dap = None;
    mem.take()?;
    if dap1 == "stack" || dap1 == "both" {
        let remat = bench_remat()?;
        let (mut fwd, mut tot) = (Vec::new(), Vec::new());
        for it in 0..=iters {
            world.barrier()?;
            let t0 = Instant::now();
            if fwd_only {
                let out = stack.forward(&b.m, &b.z, &b.mm, &b.pm, Some(&dctx))?;
                crate::sync_dev()?;
                drop(out);
            } else {
                let (out, tape) =
                    stack.forward_train(&b.m, &b.z, &b.mm, &b.pm, Some(dctx), remat)?;
                crate::sync_dev()?;
                let t1 = t0.elapsed().as_secs_f64() * 1e3;
                let ds = out.s.zeros_like()?;
                let g = tape.backward(&b.cm, &b.cz, &ds)?;
                drop_all(g)?;
                crate::sync_dev()?;
                if it > 0 {
                    fwd.push(t1);
                }
            }
            if it > 0 {
                tot.push(t0.elapsed().as_secs_f64() * 1e3);
            }
        }
        let t = median(&mut tot);
        dap1_tot = Some(t);
        let what = if fwd_only {
            format!("fwd {t:.1} ms")
        } else {
            format!("fwd {:.1} ms, fwd+bwd {t:.1} ms", median(&mut fwd))
        };
        lines.push(format!(
            "DAP-1 (single-rank stack) {} {pass} remat={remat:?}: {what}{}",
            b.desc,
            gib(mem.take()?)
        ));
    }
    let solo = if dap1 == "dap" || dap1 == "both" {
        // A one-rank group per rank: the DAP stack with identity collectives.
        Some(world.split(rank, 0)?)
    } else {
        None
    };
    let mut modes: Vec<(String, Dap)> = Vec::new();
    if let Some(c) = &solo {
        modes.push((
            "DAP-1 (DAP stack, 1-rank group)".into(),
            Dap::new(c.clone()),
        ));
    }
    // `BENCH_DAPN=0`: DAP-1 only (e.g. a stack too long for DAP-n without remat).
    let dapn = if crate::env_usize("BENCH_DAPN", 1) == 1 {
        vec![Overlap::Off, Overlap::DualityAsync]
    } else {
        Vec::new()
    };
    for overlap in dapn {
        modes.push((
            format!("DAP-{n} overlap={overlap:?}"),
            Dap::with_overlap(world.clone(), overlap),
        ));
    }
    for (label, dap) in modes {
        let de = DapEvoformer::new(stack, dap);
        let (mut fwd, mut tot, mut waits, mut starts, mut stall_f, mut stall_t) = (
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
            Vec::new(),
        );
        let mut nwaits = 0usize;
        for it in 0..=iters {
            world.barrier()?;
            bw.stall()?;
            de.reset_timers();
            let t0 = Instant::now();
            // fwd+bwd: the training tape (`model.remat` = `BENCH_REMAT`; the blocks' `manual`
            // backward = the hand-written sharded backward), as the trainer runs it.
            let (out, tape) = if fwd_only {
                (de.forward(&b.m, &b.z, &b.mm, &b.pm, Some(&dctx))?, None)
            } else {
                let (o, t) =
                    de.forward_train(&b.m, &b.z, &b.mm, &b.pm, Some(dctx), bench_remat()?)?;
                (o, Some(t))
            };
            crate::sync_dev()?;
            let t1 = t0.elapsed().as_secs_f64() * 1e3;
            let sf = bw.stall()?;
            if let Some(tape) = tape {
                let ds = out.s.zeros_like()?;
                let g = tape.backward(&b.cm, &b.cz, &ds)?;
                drop_all(g)?;
                crate::sync_dev()?;
            }
            drop(out);
            let t2 = t0.elapsed().as_secs_f64() * 1e3;
            let sb = bw.stall()?;
            if it > 0 {
                fwd.push(t1);
                tot.push(t2);
                waits.push(de.wait_seconds() * 1e3);
                starts.push(de.start_seconds() * 1e3);
                if let (Some((f, k)), Some((g, _))) = (sf, sb) {
                    stall_f.push(f);
                    stall_t.push(f + g);
                    nwaits = k;
                }
            }
        }
        let t = median(&mut tot);
        let mut l = if fwd_only {
            format!("{label} {} {pass}: fwd {t:.1} ms", b.desc)
        } else {
            format!(
                "{label} {} {pass}: fwd {:.1} ms, fwd+bwd {t:.1} ms",
                b.desc,
                median(&mut fwd)
            )
        };
        l.push_str(&format!(
            "; host: m col_to_row issue {:.2} + wait {:.2} ms",
            median(&mut starts),
            median(&mut waits)
        ));
        if !stall_f.is_empty() && !label.starts_with("DAP-1") {
            l.push_str(&format!(
                "; GPU stalled on collectives: fwd {:.1} ms ({nwaits} waits){}",
                median(&mut stall_f),
                if fwd_only {
                    String::new()
                } else {
                    format!(", fwd+bwd {:.1} ms", median(&mut stall_t))
                }
            ));
        }
        l.push_str(&gib(mem.take()?));
        if label.starts_with("DAP-1") {
            dap1_dap = Some(t);
        } else {
            if let Some(t1) = dap1_tot {
                l.push_str(&format!("; speedup vs single-rank stack {:.2}x", t1 / t));
            }
            if let Some(t1) = dap1_dap {
                l.push_str(&format!(", vs DAP stack on 1 rank {:.2}x", t1 / t));
            }
        }
        lines.push(l);
    }
    if rank == 0 {
        for l in lines {
            println!("BENCH dap-evo {} n={n} {l}", world.backend_name());
        }
    }
    Ok(())
}

/// Drop the gradients (after making sure they were computed).
fn drop_all(g: ferrofold::model::evoformer::TrunkGrads) -> Result<()> {
    drop(g);
    Ok(())
}

/// `dp-evo-bench`: data-parallel throughput of a synthetic training step (Evoformer stack
/// forward + backward on this rank's sample, parameter gradients to f32, bucketed all-reduce over
/// the world with `GradSync`, 25 MiB buckets) vs the same step without the all-reduce (one GPU).
/// Samples/s = world size / step time. Rank 0 prints `BENCH` lines; not a test.
pub fn dp_evo_bench(ctx: &ParallelCtx) -> Result<()> {
    let bw = BenchWorld::new(ctx)?;
    let world = bw.world.clone();
    let (rank, n) = (world.rank(), world.size());
    let b = bench_setup(&world, 2)?;
    let remat = bench_remat()?;
    let iters = crate::env_usize("BENCH_ITERS", 3).max(1);
    let sync = ferrofold::parallel::GradSync::new(world.clone(), 25);
    let vars = sorted_vars(&b._vm);
    let nparams: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    let mut res = Vec::new();
    for reduce in [false, true] {
        let (mut tot, mut ar) = (Vec::new(), Vec::new());
        for it in 0..=iters {
            world.barrier()?;
            let t0 = Instant::now();
            // Each replica draws its own dropout (a per-rank seed).
            let dctx = DropoutCtx::new(11).fork(rank as u64);
            let (out, tape) = b
                .stack
                .forward_train(&b.m, &b.z, &b.mm, &b.pm, Some(dctx), remat)?;
            let ds = out.s.zeros_like()?;
            let g = tape.backward(&b.cm, &b.cz, &ds)?;
            let grads = ferrofold::parallel::sorted_grads(&vars, &g.params)?
                .into_iter()
                .map(|(k, v)| Ok((k, v.to_dtype(DType::F32)?)))
                .collect::<Result<Vec<_>>>()?;
            crate::sync_dev()?;
            let t1 = t0.elapsed().as_secs_f64() * 1e3;
            if reduce {
                let r = sync.all_reduce_mean(&grads)?;
                drop(r);
                crate::sync_dev()?;
            }
            if it > 0 {
                tot.push(t0.elapsed().as_secs_f64() * 1e3);
                ar.push(t0.elapsed().as_secs_f64() * 1e3 - t1);
            }
        }
        res.push((median(&mut tot), median(&mut ar)));
    }
    let (t1, _) = res[0];
    let (tn, tar) = res[1];
    if rank == 0 {
        println!(
            "BENCH dp-evo {} n={n} {} remat={remat:?} params={nparams}: 1 GPU step {t1:.1} ms = {:.2} samples/s; \
             DP-{n} step {tn:.1} ms (all-reduce {tar:.1} ms) = {:.2} samples/s; scaling {:.2}x",
            world.backend_name(),
            b.desc,
            1e3 / t1,
            n as f64 * 1e3 / tn,
            (n as f64 / tn) / (1.0 / t1)
        );
    }
    Ok(())
}

/// DAP inside data parallelism (`-np 4`: DP-2 × DAP-2, `parallel.dap_size = 2`): each DP replica
/// runs a different sample (the fixture input scaled per replica) through the DAP Evoformer with
/// seeded dropout; one world all-reduce with [`dap_grad_scale`] must give the mean over samples of
/// the single-rank gradients.
pub fn dap_evo_dp(ctx: &ParallelCtx) -> Result<()> {
    // `DAP_SIZE=1` on 2 ranks: DP-2 (one GPU per rank; NCCL allows one rank per GPU per group).
    let cfg_p = ferrofold::config::ParallelConfig {
        dap_size: crate::env_usize("DAP_SIZE", 2),
        ..Default::default()
    };
    let groups = process_groups(ctx, &cfg_p)?;
    let co = groups.coords;
    let fx = Fixture::load("evoformer_stack_2blocks")?;
    let cfg = block_config(&fx)?;
    let (vm, stack) = build(&fx.params()?, &cfg, fx.arg("c_s")?, DType::F64)?;
    let sample = |q: usize| -> Result<Inputs> {
        let f = 1.0 + 0.25 * q as f64;
        Ok(Inputs {
            m: (fx.get("input.m")? * f)?,
            z: (fx.get("input.z")? * (2.0 - f))?,
            msa_mask: fx.get("input.msa_mask")?,
            pair_mask: fx.get("input.pair_mask")?,
            cm: fx.get("cotangent.m")?,
            cz: fx.get("cotangent.z")?,
            cs: fx.get("cotangent.s")?,
        })
    };
    let drop = DropoutCtx::new(5);
    // Reference: mean over samples of the single-rank gradients (sorted by name).
    let mut want: BTreeMap<String, Tensor> = BTreeMap::new();
    for q in 0..co.dp_size {
        // Each replica draws its own dropout masks (a per-replica seed), as training does.
        let r = run_once(&vm, &stack, None, &sample(q)?, Some(&drop.fork(q as u64)))?;
        for (k, g) in r.grads {
            let g = (g / co.dp_size as f64)?;
            let e = match want.remove(&k) {
                Some(w) => (w + g)?,
                None => g,
            };
            want.insert(k, e);
        }
    }
    let de = DapEvoformer::new(
        &stack,
        ferrofold::parallel::dap_evoformer::dap_from_config(&groups, &cfg_p),
    );
    let x = sample(co.dp_rank)?;
    let mv = candle_core::Var::from_tensor(&x.m)?;
    let zv = candle_core::Var::from_tensor(&x.z)?;
    let out = de.forward(
        mv.as_tensor(),
        zv.as_tensor(),
        &x.msa_mask,
        &x.pair_mask,
        Some(&drop.fork(co.dp_rank as u64)),
    )?;
    let store = vjp_loss(&[(&out.m, &x.cm), (&out.z, &x.cz), (&out.s, &x.cs)])?.backward()?;
    let local = ferrofold::parallel::sorted_grads(&sorted_vars(&vm), &store)?;
    let sync = ferrofold::parallel::GradSync::new(groups.world.clone(), 1);
    let (dap_size, world_size) = (co.dap_size, co.world_size);
    let got = sync.all_reduce_scaled(&local, &|name| {
        ferrofold::parallel::dap_grad_scale(
            DapEvoformer::is_sharded_param(name),
            dap_size,
            world_size,
        )
    })?;
    ensure!(got.len() == want.len(), "param count");
    let mut worst = 0.0f64;
    for (name, g) in &got {
        let w = want.get(name).with_context(|| format!("no {name}"))?;
        worst = worst.max(check(&format!("dp x dap grad {name}"), g, w, 1e-10, 1e-12)?);
    }
    if co.world_size > 0 && groups.world.rank() == 0 {
        println!(
            "dap-evo-dp dp={} dap={}: worst rel {worst:e}",
            co.dp_size, co.dap_size
        );
    }
    Ok(())
}
