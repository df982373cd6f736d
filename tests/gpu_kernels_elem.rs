//! Fused element-wise CUDA kernels against their plain-candle twins (forward and backward), at
//! small and AF2 shapes, f32 and bf16: gated output, dropout + residual, clip + Adam + EMA, bias +
//! activation epilogues and relu backward, triangle-multiplication gating, and
//! one Evoformer block with the fused kernels switched on vs off.
//!
//! Needs the `cuda` feature and a GPU; skips (with a message) when no CUDA device opens. Tests
//! that flip the process-wide switch (`kernels::set_fused`) assume `--test-threads=1`.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, IndexOp, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use ferrofold::kernels::{self, ElemCheck};
use ferrofold::model::dropout::{dropout_shared, DropoutCtx};

fn cuda() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("skipped: no CUDA device ({e})");
            None
        }
    }
}

fn assert_all_ok(what: &str, checks: &[ElemCheck]) {
    for c in checks {
        eprintln!(
            "{what}: {:<26} {:<40} err {:.3e} tol {:.0e} {}",
            c.op,
            c.case,
            c.max_err,
            c.tol,
            if c.ok() { "ok" } else { "FAIL" }
        );
    }
    assert!(!checks.is_empty());
    let bad: Vec<_> = checks.iter().filter(|c| !c.ok()).collect();
    assert!(
        bad.is_empty(),
        "{what}: {} checks failed: {bad:?}",
        bad.len()
    );
}

#[test]
fn gate_fused_matches_twin_fwd_bwd() {
    let Some(dev) = cuda() else { return };
    assert_all_ok("gate", &kernels::gate::self_check(&dev).unwrap());
}

#[test]
fn dropout_residual_fused_matches_twin_fwd_bwd() {
    let Some(dev) = cuda() else { return };
    assert_all_ok(
        "dropres",
        &kernels::dropout_residual::self_check(&dev).unwrap(),
    );
}

#[test]
fn adam_ema_fused_is_bitwise_twin() {
    let Some(dev) = cuda() else { return };
    assert_all_ok("adam", &kernels::adam::self_check(&dev).unwrap());
}

#[test]
fn bias_act_relu_bwd_fused_matches_twin() {
    let Some(dev) = cuda() else { return };
    assert_all_ok("bias_act", &kernels::bias_act::self_check(&dev).unwrap());
}

#[test]
fn tri_gate_fused_matches_twin_fwd_bwd() {
    let Some(dev) = cuda() else { return };
    assert_all_ok("tri_gate", &kernels::tri_gate::self_check(&dev).unwrap());
}

/// The fused residual dropout on the GPU draws the same masks as the CPU twin: f32 results are
/// bitwise equal to the CPU computation, row- and column-wise.
#[test]
fn dropout_residual_on_gpu_equals_cpu_twin() {
    let Some(dev) = cuda() else { return };
    for (shape, rate, sd) in [([6usize, 10, 8], 0.25, 0usize), ([6, 10, 8], 0.15, 1)] {
        let r = kernels::uniform_tensor(&shape, 2.0, 5, DType::F32, &Device::Cpu).unwrap();
        let u = kernels::uniform_tensor(&shape, 1.0, 6, DType::F32, &Device::Cpu).unwrap();
        let ctx = DropoutCtx::new(99);
        let want = (&r + dropout_shared(&u, rate, sd, Some(&ctx)).unwrap()).unwrap();
        let got = kernels::dropout_residual::residual_dropout(
            &r.to_device(&dev).unwrap(),
            &u.to_device(&dev).unwrap(),
            rate,
            sd,
            Some(&ctx),
        )
        .unwrap();
        let a = got.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a, b, "shape {shape:?} shared {sd}");
        // Dropped entries really are dropped: where the mask is 0 the output is the residual.
        let rv = r.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(a.iter().zip(&rv).any(|(x, y)| x == y));
    }
}

/// Overwrite every parameter with deterministic random values (AF2's init zeroes output
/// projections and gates, which would hide the kernels).
fn randomize(vm: &VarMap) {
    let data = vm.data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for (i, name) in names.into_iter().enumerate() {
        let v = &data[name];
        let dims = v.dims().to_vec();
        let fan_in = *dims.last().unwrap_or(&1) as f32;
        let scale = if dims.len() >= 2 {
            (3.0 / fan_in).sqrt()
        } else {
            0.3
        };
        let mut t =
            kernels::uniform_tensor(&dims, scale, 1000 + i as u64, DType::F32, v.device()).unwrap();
        if dims.len() == 1 && name.ends_with("weight") {
            t = (t + 1.0).unwrap();
        }
        v.set(&t).unwrap();
    }
}

/// Outputs `(m, z)`, `dL/dm` and the parameter gradients (sorted by name) of one block forward
/// in training mode (dropout on) with the fused kernels on or off; `L = mean(m²) + mean(z²)`.
struct BlockRun {
    m: Tensor,
    z: Tensor,
    dm: Tensor,
    grads: Vec<(String, Tensor)>,
}

fn run_block(
    block: &ferrofold::model::evoformer::EvoformerBlock,
    vm: &VarMap,
    m: &Tensor,
    z: &Tensor,
    fused: bool,
) -> BlockRun {
    kernels::set_fused(fused);
    let dev = m.device();
    let (s, r, _) = m.dims3().unwrap();
    let msa_mask = Tensor::ones((s, r), m.dtype(), dev).unwrap();
    let pair_mask = Tensor::ones((r, r), m.dtype(), dev).unwrap();
    let ctx = DropoutCtx::new(4242);
    let mv = Var::from_tensor(m).unwrap();
    let zv = Var::from_tensor(z).unwrap();
    let (mo, zo) = block
        .forward(
            mv.as_tensor(),
            zv.as_tensor(),
            &msa_mask,
            &pair_mask,
            Some(&ctx),
        )
        .unwrap();
    let msq = |t: &Tensor| {
        t.to_dtype(DType::F32)
            .unwrap()
            .sqr()
            .unwrap()
            .mean_all()
            .unwrap()
    };
    let loss = (msq(&mo) + msq(&zo)).unwrap();
    let g = loss.backward().unwrap();
    kernels::set_fused(true);
    let data = vm.data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    let grads = names
        .iter()
        .map(|n| ((*n).clone(), g.get(data[*n].as_tensor()).unwrap().clone()))
        .collect();
    BlockRun {
        m: mo,
        z: zo,
        dm: g.get(mv.as_tensor()).unwrap().clone(),
        grads,
    }
}

fn abs_max(t: &Tensor) -> f64 {
    t.to_dtype(DType::F32)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64
}

/// `(activation error, (parameter-gradient error, worst parameter))` of `a` against `b`:
/// activations (`m`, `z`, `dL/dm`) by [`kernels::rel_err`]; parameter gradients per tensor as
/// `max |a − b| / max(max |b|, floor × largest gradient)` (some gradients are zero in exact
/// arithmetic, e.g. the bias of a layer norm that only feeds attention logits: pure rounding
/// noise on both sides).
fn block_err(a: &BlockRun, b: &BlockRun, floor: f64) -> (f64, (f64, String)) {
    let mut act = 0f64;
    for (x, y) in [(&a.m, &b.m), (&a.z, &b.z), (&a.dm, &b.dm)] {
        act = act.max(kernels::rel_err(x, y).unwrap());
    }
    let global = b.grads.iter().map(|(_, t)| abs_max(t)).fold(0f64, f64::max);
    let mut worst = (0f64, String::new());
    for ((name, x), (_, y)) in a.grads.iter().zip(&b.grads) {
        let x = x.to_dtype(DType::F32).unwrap();
        let y = y.to_dtype(DType::F32).unwrap();
        let e =
            abs_max(&(&x - &y).unwrap()) / abs_max(&y).max(floor * global).max(f64::MIN_POSITIVE);
        if e > worst.0 {
            worst = (e, name.clone());
        }
    }
    (act, worst)
}

/// One Evoformer block (AF2 channel sizes, small S and R) in training mode with dropout, on CUDA:
/// fused kernels on vs off (`kernels::set_fused`), outputs and all parameter gradients. f32: the
/// two agree to rounding. bf16: both are compared with an f32 reference (same parameters, the
/// bf16 inputs widened) and the fused block must be about as accurate as the twin (it rounds
/// fewer times; bf16 runs differ from each other by a few percent through a whole block).
#[test]
fn evoformer_block_fused_vs_twin() {
    let Some(dev) = cuda() else { return };
    use ferrofold::model::evoformer::{BlockConfig, EvoformerBlock};
    let cfg = BlockConfig::evoformer(&ferrofold::config::ModelConfig::default());
    let vm = VarMap::new();
    let block = EvoformerBlock::new(VarBuilder::from_varmap(&vm, DType::F32, &dev), &cfg).unwrap();
    randomize(&vm);
    let (s, r) = (8usize, 24usize);
    // f32: fused vs twin.
    let m = kernels::uniform_tensor(&[s, r, cfg.c_m], 1.0, 1, DType::F32, &dev).unwrap();
    let z = kernels::uniform_tensor(&[r, r, cfg.c_z], 1.0, 2, DType::F32, &dev).unwrap();
    let f = run_block(&block, &vm, &m, &z, true);
    let t = run_block(&block, &vm, &m, &z, false);
    let (act, (gerr, gname)) = block_err(&f, &t, 1e-3);
    eprintln!("evoformer block F32 fused vs twin: activations {act:.3e}, param grads {gerr:.3e} ({gname})");
    assert!(act <= 1e-4, "f32 activations differ by {act}");
    assert!(
        gerr <= 5e-4,
        "f32 parameter gradients differ by {gerr} ({gname})"
    );
    // bf16: fused and twin against the f32 reference.
    let mb = m.to_dtype(DType::BF16).unwrap();
    let zb = z.to_dtype(DType::BF16).unwrap();
    let reference = run_block(
        &block,
        &vm,
        &mb.to_dtype(DType::F32).unwrap(),
        &zb.to_dtype(DType::F32).unwrap(),
        false,
    );
    let f = run_block(&block, &vm, &mb, &zb, true);
    let t = run_block(&block, &vm, &mb, &zb, false);
    let (fa, (fg, fname)) = block_err(&f, &reference, 3e-2);
    let (ta, (tg, tname)) = block_err(&t, &reference, 3e-2);
    let (fta, (ftg, _)) = block_err(&f, &t, 3e-2);
    eprintln!(
        "evoformer block BF16 vs f32 reference: fused activations {fa:.3e} grads {fg:.3e} ({fname}); \
         twin activations {ta:.3e} grads {tg:.3e} ({tname}); fused vs twin {fta:.3e} / {ftg:.3e}"
    );
    assert!(
        fa <= (1.5 * ta).max(2e-2),
        "bf16 fused activations {fa} vs twin {ta}"
    );
    assert!(
        fg <= (1.5 * tg).max(5e-2),
        "bf16 fused grads {fg} vs twin {tg}"
    );
    // The outputs are not trivial.
    assert!(abs_max(&f.z.i(0).unwrap()) > 0.0);
}

/// With the switch off, the CUDA entry points are exactly the twins.
#[test]
fn switch_off_gives_twin() {
    let Some(dev) = cuda() else { return };
    let o = kernels::uniform_tensor(&[4, 8, 16], 1.0, 1, DType::F32, &dev).unwrap();
    let g = kernels::uniform_tensor(&[4, 8, 16], 3.0, 2, DType::F32, &dev).unwrap();
    kernels::set_fused(false);
    let a = kernels::gate::gate(&o, &g).unwrap();
    kernels::set_fused(true);
    let b = kernels::gate::gate_twin(&o, &g).unwrap();
    assert_eq!(kernels::rel_err(&a, &b).unwrap(), 0.0);
    assert!(kernels::fused_enabled());
}
