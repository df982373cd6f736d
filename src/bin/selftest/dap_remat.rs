//! Self-test cases of the DAP stacks' training tapes with activation recomputation
//! (`ferrofold::parallel::dap_remat`):
//! - `dap-remat`: on every world size `n` (world = one DAP group), for the Evoformer stack and the
//!   extra-MSA stack (2 blocks each, small random parameters, `n_seq`/`n_res` not multiples of 2
//!   so they are padded, sparse MSA/pair masks, seeded dropout), f32 and f64:
//!   `DapEvoformer::forward_train` + tape backward with `model.remat` = `block` and `none`, with
//!   `parallel.overlap` = `duality_async` and `off`, with `model.backward` = `manual` (the
//!   hand-written sharded backward, `ferrofold::parallel::dap_manual`) and `autograd`, against
//!   the single-rank stack (DAP-1: one plain graph, computed locally): outputs, every parameter
//!   gradient (DAP partial sums summed over the group) and the input gradients, rel <= 1e-5
//!   (f32) / 1e-10 (f64). The manual runs are also compared with the single-rank hand-written
//!   trunk and with DAP-1 manual (a one-rank communicator in the same process), and every
//!   sharded parameter must get a finite, non-zero gradient (gradient flow). `block` and `none`
//!   must give bitwise equal outputs and gradients for `n > 1` ([`same_bits`]; within the
//!   tolerance for `n = 1`), and `forward_no_grad` the same outputs.
//! - `dap-remat-mem`: peak resident memory (Linux `VmHWM`, reset through `/proc/self/clear_refs`)
//!   of one DAP training forward + backward of a larger random Evoformer stack, with
//!   `DAP_REMAT_MEM=none|block` (rank 0 prints a `MEM` line; a measurement, not a test).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use ferrofold::config::{Overlap, Remat, StackConfig, TrunkBackward};
use ferrofold::model::dropout::DropoutCtx;
use ferrofold::model::evoformer::{BlockConfig, EvoformerStack, TrunkGrads};
use ferrofold::model::extra_msa::ExtraMsaStack;
use ferrofold::model::params::sorted_vars;
use ferrofold::model::remat::{forward_blocks, vjp_loss};
use ferrofold::parallel::{
    Communicator, Dap, DapEvoformer, DapExtraMsa, MpiComm, ParallelCtx, ReduceOp,
};

/// Deterministic pseudo-random values in `(-scale, scale)` (identical on every rank).
fn det(dims: &[usize], seed: f64, scale: f64, dt: DType) -> Result<Tensor> {
    let n: usize = dims.iter().product();
    let v: Vec<f64> = (0..n)
        .map(|i| ((i as f64 * 0.754_877_666_2 + seed).sin() * 43_758.545_3).fract() * scale)
        .collect();
    Ok(Tensor::from_vec(v, dims, &Device::Cpu)?.to_dtype(dt)?)
}

/// Sparse deterministic 0/1 mask `[a, b]`; row 0 stays unmasked so no attention row (column
/// attention over sequences, triangle attention over residues) has all its keys masked.
fn mask(a: usize, b: usize, salt: usize, dt: DType) -> Result<Tensor> {
    let v: Vec<f64> = (0..a * b)
        .map(|k| {
            let (i, j) = (k / b, k % b);
            if i > 0 && (i * 7 + j * 3 + salt).is_multiple_of(6) {
                0.0
            } else {
                1.0
            }
        })
        .collect();
    Ok(Tensor::from_vec(v, (a, b), &Device::Cpu)?.to_dtype(dt)?)
}

fn block_config(c_m: usize, c_z: usize, blocks: usize) -> BlockConfig {
    BlockConfig {
        c_m,
        c_z,
        stack: StackConfig {
            num_blocks: blocks,
            c_hidden_msa_att: 4,
            no_heads_msa: 2,
            c_hidden_opm: 3,
            c_hidden_mul: 6,
            c_hidden_pair_att: 4,
            no_heads_pair: 2,
            transition_n: 2,
            msa_dropout: 0.15,
            pair_dropout: 0.25,
        },
        inf: 1e9,
        eps_opm: 1e-3,
        eps_global: 1e-8,
        backward: ferrofold::config::TrunkBackward::Manual,
    }
}

/// Overwrite every parameter (sorted by name) with deterministic values: the default init zeroes
/// the final projections, which would leave many gradients trivially zero.
fn set_params(vm: &VarMap) -> Result<()> {
    for (k, (_, v)) in sorted_vars(vm).into_iter().enumerate() {
        let t = v.as_tensor();
        v.set(&det(t.dims(), 1.0 + k as f64, 0.4, t.dtype())?)?;
    }
    Ok(())
}

/// `(max|got - want| / max|want|, max|got - want|, max|want|)`.
fn errors(got: &Tensor, want: &Tensor) -> Result<(f64, f64, f64)> {
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
    Ok((d / s.max(1e-300), d, s))
}

/// `max|got - want| / max|want|`; the reference must not be all zeros.
fn rel_err(got: &Tensor, want: &Tensor) -> Result<f64> {
    let (rel, _, s) = errors(got, want)?;
    ensure!(
        s > 0.0,
        "reference is all zeros (the check would be vacuous)"
    );
    Ok(rel)
}

fn bitwise_eq(a: &Tensor, b: &Tensor) -> Result<bool> {
    let f =
        |t: &Tensor| -> Result<Vec<f64>> { Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?) };
    Ok(a.dims() == b.dims() && f(a)? == f(b)?)
}

/// Outputs and gradients of one run (parameter gradients complete: summed over the group).
struct Run {
    outs: Vec<Tensor>,
    grads: BTreeMap<String, Tensor>,
    dm: Tensor,
    dz: Tensor,
}

/// Worst relative error of `got` vs `want` over outputs, input and parameter gradients; fails
/// above `tol`. A parameter gradient that is structurally ~0 in exact arithmetic (e.g. the bias of
/// the LayerNorm before a softmax bias: a shift along the keys) is compared relative to the
/// largest parameter gradient instead (and does not count towards the returned worst error).
fn compare(tag: &str, got: &Run, want: &Run, tol: f64) -> Result<f64> {
    let mut worst = 0.0f64;
    let mut c = |what: &str, a: &Tensor, b: &Tensor| -> Result<()> {
        let r = rel_err(a, b).with_context(|| format!("{tag}: {what}"))?;
        ensure!(r <= tol, "{tag}: {what}: rel {r:e} > {tol:e}");
        worst = worst.max(r);
        Ok(())
    };
    ensure!(got.outs.len() == want.outs.len(), "{tag}: output count");
    for (i, (a, b)) in got.outs.iter().zip(&want.outs).enumerate() {
        c(&format!("output {i}"), a, b)?;
    }
    c("grad m", &got.dm, &want.dm)?;
    c("grad z", &got.dz, &want.dz)?;
    ensure!(got.grads.len() == want.grads.len(), "{tag}: param count");
    let mut scale = 0.0f64;
    for w in want.grads.values() {
        let m = w.abs()?.flatten_all()?.max(0)?.to_dtype(DType::F64)?;
        scale = scale.max(m.to_scalar::<f64>()?);
    }
    ensure!(scale > 0.0, "{tag}: all parameter gradients are zero");
    let mut small = 0;
    for (k, g) in &got.grads {
        let w = want
            .grads
            .get(k)
            .with_context(|| format!("{tag}: no {k}"))?;
        let (rel, abs, _) = errors(g, w).with_context(|| format!("{tag}: grad {k}"))?;
        if rel <= tol {
            worst = worst.max(rel);
        } else {
            ensure!(
                abs <= tol * scale,
                "{tag}: grad {k}: rel {rel:e} > {tol:e}, abs {abs:e} > {tol:e} x {scale:e}"
            );
            small += 1;
        }
    }
    // Only a few tensors may pass on the global scale.
    ensure!(
        small * 8 <= got.grads.len(),
        "{tag}: {small} of {} gradients only pass on the global scale",
        got.grads.len()
    );
    Ok(worst)
}

/// Parameter gradients by sorted name; with `dap`, the `blocks.*` partial sums are all-reduced.
fn named(vm: &VarMap, store: &GradStore, dap: Option<&Dap>) -> Result<BTreeMap<String, Tensor>> {
    let mut out = BTreeMap::new();
    for (name, v) in sorted_vars(vm) {
        let g = match store.get(v.as_tensor()) {
            Some(g) => g.clone(),
            None => v.as_tensor().zeros_like()?,
        };
        let g = match dap {
            Some(d) if DapEvoformer::is_sharded_param(&name) => {
                d.comm().all_reduce(&g.contiguous()?, ReduceOp::Sum)?
            }
            _ => g,
        };
        out.insert(name, g);
    }
    Ok(out)
}

/// The inputs and output cotangents of one case.
struct Case {
    m: Tensor,
    z: Tensor,
    msa_mask: Tensor,
    pair_mask: Tensor,
    cm: Tensor,
    cz: Tensor,
    cs: Tensor,
}

impl Case {
    fn new(s: usize, r: usize, c_m: usize, c_z: usize, c_s: usize, dt: DType) -> Result<Self> {
        Ok(Self {
            m: det(&[s, r, c_m], 11.0, 1.0, dt)?,
            z: det(&[r, r, c_z], 12.0, 1.0, dt)?,
            msa_mask: mask(s, r, 0, dt)?,
            pair_mask: mask(r, r, 1, dt)?,
            cm: det(&[s, r, c_m], 13.0, 1.0, dt)?,
            cz: det(&[r, r, c_z], 14.0, 1.0, dt)?,
            cs: det(&[r, c_s], 15.0, 1.0, dt)?,
        })
    }
}

/// The single-rank reference: one plain graph, `L = Σ out · cotangent`.
fn reference(
    vm: &VarMap,
    x: &Case,
    fwd: &dyn Fn(&Tensor, &Tensor) -> Result<Vec<Tensor>>,
    cots: &[&Tensor],
) -> Result<Run> {
    let mv = Var::from_tensor(&x.m)?;
    let zv = Var::from_tensor(&x.z)?;
    let outs = fwd(mv.as_tensor(), zv.as_tensor())?;
    let pairs: Vec<(&Tensor, &Tensor)> = outs.iter().zip(cots.iter().copied()).collect();
    let store = vjp_loss(&pairs)?.backward()?;
    Ok(Run {
        grads: named(vm, &store, None)?,
        dm: store.get(mv.as_tensor()).context("no grad m")?.clone(),
        dz: store.get(zv.as_tensor()).context("no grad z")?.clone(),
        outs: outs.iter().map(Tensor::detach).collect(),
    })
}

fn from_tape(vm: &VarMap, dap: &Dap, outs: Vec<Tensor>, g: TrunkGrads) -> Result<Run> {
    Ok(Run {
        grads: named(vm, &g.params, Some(dap))?,
        dm: g.dm,
        dz: g.dz,
        outs,
    })
}

/// The sharded parameters (`blocks.*`) without a gradient in this rank's `store`.
fn absent_sharded(vm: &VarMap, store: &GradStore) -> Vec<String> {
    sorted_vars(vm)
        .into_iter()
        .filter(|(name, v)| {
            DapEvoformer::is_sharded_param(name) && store.get(v.as_tensor()).is_none()
        })
        .map(|(name, _)| name)
        .collect()
}

/// Gradient flow of a DAP tape: every sharded parameter (`blocks.*`) had a gradient in this
/// rank's store (`absent` empty), and its group sum in `run.grads` is finite and not
/// identically zero.
fn grad_flow(tag: &str, vm: &VarMap, absent: &[String], run: &Run) -> Result<()> {
    ensure!(
        absent.is_empty(),
        "{tag}: no gradient on this rank for sharded parameters {absent:?}"
    );
    for (name, _) in sorted_vars(vm) {
        if !DapEvoformer::is_sharded_param(&name) {
            continue;
        }
        let g = run.grads.get(&name).context("missing")?;
        let m = g
            .to_dtype(DType::F64)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f64>()?;
        ensure!(
            m.is_finite() && m > 0.0,
            "{tag}: gradient of {name} is {m} (no flow)"
        );
    }
    Ok(())
}

/// A copy of the blocks (parameters shared) differentiated with `mode`.
fn with_mode<B: Clone>(blocks: &[B], set: impl Fn(&mut B)) -> Vec<B> {
    let mut v = blocks.to_vec();
    v.iter_mut().for_each(set);
    v
}

const MODES: [TrunkBackward; 2] = [TrunkBackward::Manual, TrunkBackward::Autograd];

/// `remat = block` and `none` give bitwise equal outputs and gradients: the forward pass is the
/// same computation, and a DAP block's outputs come from its final all-to-alls, consumed only by
/// the next block, so no gradient contribution is summed in a different order at block
/// boundaries (unlike the single-rank stack, `crate::model::remat` docs). With one rank the
/// collectives are identities, the single-rank situation again: there `tol` applies.
fn same_bits(tag: &str, block: &Run, none: &Run, n: usize, tol: f64) -> Result<()> {
    if n == 1 {
        compare(&format!("{tag} remat=block vs none"), block, none, tol)?;
        return Ok(());
    }
    for (i, (a, c)) in block.outs.iter().zip(&none.outs).enumerate() {
        ensure!(
            bitwise_eq(a, c)?,
            "{tag}: output {i} of remat=block differs from remat=none"
        );
    }
    ensure!(
        bitwise_eq(&block.dm, &none.dm)? && bitwise_eq(&block.dz, &none.dz)?,
        "{tag}: input gradients of remat=block differ from remat=none"
    );
    ensure!(block.grads.len() == none.grads.len(), "{tag}: param count");
    for (k, g) in &block.grads {
        let w = none
            .grads
            .get(k)
            .with_context(|| format!("{tag}: no {k}"))?;
        ensure!(
            bitwise_eq(g, w)?,
            "{tag}: grad {k} of remat=block differs from remat=none (rel {:e})",
            errors(g, w)?.0
        );
    }
    Ok(())
}

const OVERLAPS: [Overlap; 2] = [Overlap::DualityAsync, Overlap::Off];

/// The Evoformer stack: DAP-n (remat block/none, overlap on/off) vs DAP-1.
/// `(s, r)`: padded to multiples of the group size; with `r` a multiple already, the manual
/// path's dropout runs through the fused residual-dropout sites (no explicit masks).
fn evoformer(
    world: &Arc<dyn Communicator>,
    dt: DType,
    tol: f64,
    (s, r): (usize, usize),
) -> Result<f64> {
    let (c_m, c_z, c_s) = (8, 6, 7);
    let cfg = block_config(c_m, c_z, 2);
    let vm = VarMap::new();
    let stack = EvoformerStack::new(VarBuilder::from_varmap(&vm, dt, &Device::Cpu), &cfg, c_s)?;
    set_params(&vm)?;
    let x = Case::new(s, r, c_m, c_z, c_s, dt)?;
    let drop = DropoutCtx::new(20261123);
    let fwd = |m: &Tensor, z: &Tensor| -> Result<Vec<Tensor>> {
        let o = stack.forward(m, z, &x.msa_mask, &x.pair_mask, Some(&drop))?;
        Ok(vec![o.m, o.z, o.s])
    };
    let want = reference(&vm, &x, &fwd, &[&x.cm, &x.cz, &x.cs])?;
    // Dropout is really on.
    let eval = stack.forward(&x.m, &x.z, &x.msa_mask, &x.pair_mask, None)?;
    ensure!(
        rel_err(&eval.z, &want.outs[1])? > 1e-3,
        "dropout had no effect"
    );
    let mut worst = 0.0f64;
    // The single-rank hand-written trunk (stack blocks are `manual`) and DAP-1 manual on a
    // one-rank communicator of this process: the references of the DAP-n manual runs.
    let single = {
        let (o, tape) = stack.forward_train(
            &x.m,
            &x.z,
            &x.msa_mask,
            &x.pair_mask,
            Some(drop),
            Remat::None,
        )?;
        let g = tape.backward(&x.cm, &x.cz, &x.cs)?;
        Run {
            grads: named(&vm, &g.params, None)?,
            dm: g.dm,
            dz: g.dz,
            outs: vec![o.m, o.z, o.s],
        }
    };
    worst = worst.max(compare(
        &format!("evoformer {dt:?} single-rank manual vs autograd"),
        &single,
        &want,
        tol,
    )?);
    let solo = Dap::new(world.split(world.rank(), 0)?);
    let dap1 = {
        let de = DapEvoformer::new(&stack, solo.clone());
        let (o, tape) = de.forward_train(
            &x.m,
            &x.z,
            &x.msa_mask,
            &x.pair_mask,
            Some(drop),
            Remat::None,
        )?;
        let g = tape.backward(&x.cm, &x.cz, &x.cs)?;
        from_tape(&vm, &solo, vec![o.m, o.z, o.s], g)?
    };
    for mode in MODES {
        let mstack = EvoformerStack {
            blocks: with_mode(&stack.blocks, |b| b.backward = mode),
            linear: stack.linear.clone(),
        };
        for overlap in OVERLAPS {
            let dap = Dap::with_overlap(world.clone(), overlap);
            let de = DapEvoformer::new(&mstack, dap.clone());
            let mut runs = Vec::new();
            for remat in [Remat::Block, Remat::None] {
                let (o, tape) =
                    de.forward_train(&x.m, &x.z, &x.msa_mask, &x.pair_mask, Some(drop), remat)?;
                let outs = vec![o.m, o.z, o.s];
                let g = tape.backward(&x.cm, &x.cz, &x.cs)?;
                let absent = absent_sharded(&vm, &g.params);
                let run = from_tape(&vm, &dap, outs, g)?;
                let tag = format!("evoformer {dt:?} {mode:?} {overlap:?} remat={remat:?}");
                worst = worst.max(compare(
                    &format!("{tag} vs DAP-1 autograd graph"),
                    &run,
                    &want,
                    tol,
                )?);
                if mode == TrunkBackward::Manual {
                    grad_flow(&tag, &vm, &absent, &run)?;
                    worst = worst.max(compare(
                        &format!("{tag} vs single-rank manual"),
                        &run,
                        &single,
                        tol,
                    )?);
                    worst = worst.max(compare(
                        &format!("{tag} vs DAP-1 manual"),
                        &run,
                        &dap1,
                        tol,
                    )?);
                }
                runs.push(run);
            }
            let (b, n) = (&runs[0], &runs[1]);
            same_bits(
                &format!("evoformer {dt:?} {mode:?} {overlap:?}"),
                b,
                n,
                world.size(),
                tol,
            )?;
            let ng = de.forward_no_grad(&x.m, &x.z, &x.msa_mask, &x.pair_mask, Some(&drop))?;
            for (i, (a, c)) in [ng.m, ng.z, ng.s].iter().zip(&b.outs).enumerate() {
                ensure!(
                    bitwise_eq(a, c)?,
                    "evoformer {mode:?} {overlap:?}: forward_no_grad output {i} differs"
                );
            }
        }
    }
    Ok(worst)
}

/// The extra-MSA stack (global column attention, masked transition): same checks, on `(m, z)`.
fn extra_msa(world: &Arc<dyn Communicator>, dt: DType, tol: f64) -> Result<f64> {
    let (s, r, c_e, c_z) = (7, 9, 6, 6);
    let cfg = block_config(c_e, c_z, 2);
    let vm = VarMap::new();
    let stack = ExtraMsaStack::new(VarBuilder::from_varmap(&vm, dt, &Device::Cpu), &cfg)?;
    set_params(&vm)?;
    let x = Case::new(s, r, c_e, c_z, 1, dt)?;
    let drop = DropoutCtx::new(99);
    let fwd = |m: &Tensor, z: &Tensor| -> Result<Vec<Tensor>> {
        let (mut m, mut z) = (m.clone(), z.clone());
        for (i, b) in stack.blocks.iter().enumerate() {
            let d = drop.fork(i as u64);
            (m, z) = b.forward(&m, &z, &x.msa_mask, &x.pair_mask, Some(&d))?;
        }
        Ok(vec![m, z])
    };
    let want = reference(&vm, &x, &fwd, &[&x.cm, &x.cz])?;
    let mut worst = 0.0f64;
    let single = {
        let (m, z, tape) = forward_blocks(
            &stack.blocks,
            &x.m,
            &x.z,
            &x.msa_mask,
            &x.pair_mask,
            Some(drop),
            Remat::None,
        )?;
        let mut store = GradStore::default();
        let (dm, dz) = tape.backward(&x.cm, &x.cz, &mut store)?;
        Run {
            grads: named(&vm, &store, None)?,
            dm,
            dz,
            outs: vec![m, z],
        }
    };
    worst = worst.max(compare(
        &format!("extra-msa {dt:?} single-rank manual vs autograd"),
        &single,
        &want,
        tol,
    )?);
    let solo = Dap::new(world.split(world.rank(), 0)?);
    let dap1 = {
        let de = DapExtraMsa::new(&stack, solo.clone());
        let (z, tape) = de.forward_train(
            &x.m,
            &x.z,
            &x.msa_mask,
            &x.pair_mask,
            Some(drop),
            Remat::None,
        )?;
        let outs = vec![tape.msa().clone(), z];
        let g = tape.backward_msa_pair(&x.cm, &x.cz)?;
        from_tape(&vm, &solo, outs, g)?
    };
    for mode in MODES {
        let mstack = ExtraMsaStack {
            blocks: with_mode(&stack.blocks, |b| b.backward = mode),
        };
        for overlap in OVERLAPS {
            let dap = Dap::with_overlap(world.clone(), overlap);
            let de = DapExtraMsa::new(&mstack, dap.clone());
            let mut runs = Vec::new();
            for remat in [Remat::Block, Remat::None] {
                let (z, tape) =
                    de.forward_train(&x.m, &x.z, &x.msa_mask, &x.pair_mask, Some(drop), remat)?;
                let outs = vec![tape.msa().clone(), z];
                let g = tape.backward_msa_pair(&x.cm, &x.cz)?;
                let absent = absent_sharded(&vm, &g.params);
                let run = from_tape(&vm, &dap, outs, g)?;
                let tag = format!("extra-msa {dt:?} {mode:?} {overlap:?} remat={remat:?}");
                worst = worst.max(compare(
                    &format!("{tag} vs DAP-1 autograd graph"),
                    &run,
                    &want,
                    tol,
                )?);
                if mode == TrunkBackward::Manual {
                    grad_flow(&tag, &vm, &absent, &run)?;
                    worst = worst.max(compare(
                        &format!("{tag} vs single-rank manual"),
                        &run,
                        &single,
                        tol,
                    )?);
                    worst = worst.max(compare(
                        &format!("{tag} vs DAP-1 manual"),
                        &run,
                        &dap1,
                        tol,
                    )?);
                }
                runs.push(run);
            }
            let (b, n) = (&runs[0], &runs[1]);
            same_bits(
                &format!("extra-msa {dt:?} {mode:?} {overlap:?}"),
                b,
                n,
                world.size(),
                tol,
            )?;
            let (m, z) = de.forward_no_grad(&x.m, &x.z, &x.msa_mask, &x.pair_mask, Some(&drop))?;
            ensure!(
                bitwise_eq(&m, &b.outs[0])? && bitwise_eq(&z, &b.outs[1])?,
                "extra-msa {mode:?} {overlap:?}: forward_no_grad differs"
            );
        }
    }
    Ok(worst)
}

/// Dispatch of this file's cases (`dap-remat`, `dap-remat-mem`).
pub fn run(case: &str, ctx: &ParallelCtx) -> Result<()> {
    match case {
        "dap-remat-mem" => dap_remat_mem(ctx),
        _ => dap_remat(ctx),
    }
}

pub fn dap_remat(ctx: &ParallelCtx) -> Result<()> {
    let world: Arc<dyn Communicator> = MpiComm::world(ctx)?;
    let (rank, n) = (world.rank(), world.size());
    for (dt, tol) in [(DType::F32, 1e-5), (DType::F64, 1e-10)] {
        let w = evoformer(&world, dt, tol, (5, 11))?;
        if rank == 0 {
            println!("dap-remat n={n} evoformer {dt:?}: worst rel {w:e}");
        }
        // Residues a multiple of the group size (no residue padding).
        let w = evoformer(&world, dt, tol, (5, 4 * n.max(1)))?;
        if rank == 0 {
            println!("dap-remat n={n} evoformer {dt:?} unpadded residues: worst rel {w:e}");
        }
        let w = extra_msa(&world, dt, tol)?;
        if rank == 0 {
            println!("dap-remat n={n} extra-msa {dt:?}: worst rel {w:e}");
        }
    }
    Ok(())
}

/// A field of `/proc/self/status` in KiB (`VmRSS`, `VmHWM`).
fn status_kib(field: &str) -> Result<u64> {
    let s = std::fs::read_to_string("/proc/self/status")?;
    let line = s
        .lines()
        .find(|l| l.starts_with(field))
        .with_context(|| format!("no {field} in /proc/self/status"))?;
    line.split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("bad line {line}"))
}

pub fn dap_remat_mem(ctx: &ParallelCtx) -> Result<()> {
    let world: Arc<dyn Communicator> = MpiComm::world(ctx)?;
    let (rank, n) = (world.rank(), world.size());
    let get = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let remat = match std::env::var("DAP_REMAT_MEM").as_deref() {
        Ok("none") => Remat::None,
        _ => Remat::Block,
    };
    let (s, r, c_m, c_z, blocks) = (
        get("MEM_S", 32),
        get("MEM_R", 64),
        get("MEM_CM", 32),
        get("MEM_CZ", 32),
        get("MEM_BLOCKS", 8),
    );
    let mut cfg = block_config(c_m, c_z, blocks);
    cfg.stack = StackConfig {
        num_blocks: blocks,
        c_hidden_msa_att: 8,
        no_heads_msa: 4,
        c_hidden_opm: 8,
        c_hidden_mul: 32,
        c_hidden_pair_att: 8,
        no_heads_pair: 4,
        transition_n: 4,
        msa_dropout: 0.15,
        pair_dropout: 0.25,
    };
    let dt = DType::F32;
    let vm = VarMap::new();
    let stack = EvoformerStack::new(VarBuilder::from_varmap(&vm, dt, &Device::Cpu), &cfg, 16)?;
    set_params(&vm)?;
    let x = Case::new(s, r, c_m, c_z, 16, dt)?;
    let de = DapEvoformer::new(&stack, Dap::new(world.clone()));
    let dctx = DropoutCtx::new(7);
    world.barrier()?;
    // Reset the high-water mark to the current RSS (Linux >= 4.0).
    std::fs::write("/proc/self/clear_refs", "5").context("reset VmHWM")?;
    let base = status_kib("VmRSS:")?;
    let t0 = Instant::now();
    let (o, tape) = de.forward_train(&x.m, &x.z, &x.msa_mask, &x.pair_mask, Some(dctx), remat)?;
    let after_fwd = status_kib("VmRSS:")?;
    let peak_fwd = status_kib("VmHWM:")?;
    let g = tape.backward(&x.cm, &x.cz, &x.cs)?;
    let secs = t0.elapsed().as_secs_f64();
    let peak = status_kib("VmHWM:")?;
    drop((o, g));
    let mib = |k: u64| k as f64 / 1024.0;
    let line = format!(
        "MEM dap-remat n={n} rank={rank} S={s} R={r} c_m={c_m} c_z={c_z} blocks={blocks} remat={remat:?}: \
         base {:.1} MiB, kept after fwd +{:.1} MiB, peak fwd +{:.1} MiB, peak fwd+bwd +{:.1} MiB, {:.2} s",
        mib(base),
        mib(after_fwd.saturating_sub(base)),
        mib(peak_fwd.saturating_sub(base)),
        mib(peak.saturating_sub(base)),
        secs
    );
    // Every rank's line, in rank order.
    for q in 0..n {
        world.barrier()?;
        if q == rank {
            println!("{line}");
        }
    }
    Ok(())
}
