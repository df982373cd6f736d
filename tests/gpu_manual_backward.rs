//! The hand-written backward of one Evoformer block (`EvoformerBlock::forward_saved` +
//! `backward_saved`, see `ferrofold::model::vjp`) against candle's autograd (`forward` +
//! `remat::backward_vars(&remat::vjp_loss(..))`) on CUDA, in f32 and in bf16 (f32 master
//! weights), with dropout on and scattered mask zeros: outputs, input gradients and every
//! parameter gradient (relative 2-norm error), and two manual runs bitwise equal. Needs a CUDA
//! device: skips with a message when none is visible.
#![cfg(feature = "cuda")]

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use ferrofold::config::{StackConfig, TrunkBackward};
use ferrofold::model::dropout::DropoutCtx;
use ferrofold::model::evoformer::{BlockConfig, EvoformerBlock, MsaBlock};
use ferrofold::model::params::sorted_vars;
use ferrofold::model::remat::{backward_vars, vjp_loss};

fn cuda() -> Option<Device> {
    if ferrofold::device::cuda_device_count() == 0 {
        eprintln!("skipped: no CUDA device visible");
        return None;
    }
    Some(Device::new_cuda(0).expect("cuda device 0"))
}

const S: usize = 32;
const R: usize = 48;

fn block_config() -> BlockConfig {
    BlockConfig {
        c_m: 64,
        c_z: 32,
        stack: StackConfig {
            num_blocks: 1,
            c_hidden_msa_att: 16,
            no_heads_msa: 4,
            c_hidden_opm: 16,
            c_hidden_mul: 32,
            c_hidden_pair_att: 8,
            no_heads_pair: 4,
            transition_n: 2,
            msa_dropout: 0.15,
            pair_dropout: 0.25,
        },
        inf: 1e9,
        eps_opm: 1e-3,
        eps_global: 1e-8,
        backward: TrunkBackward::Manual,
    }
}

/// `n` deterministic uniform values in `[-1, 1)` (splitmix64).
fn uniform(n: usize, seed: u64) -> Vec<f32> {
    let mut st = seed;
    (0..n)
        .map(|_| {
            st = st.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut x = st;
            x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            x ^= x >> 31;
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn random(shape: &[usize], scale: f32, seed: u64, dtype: DType, dev: &Device) -> Tensor {
    let v: Vec<f32> = uniform(shape.iter().product(), seed)
        .into_iter()
        .map(|x| x * scale)
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
        .to_device(dev)
        .unwrap()
}

/// A 0/1 mask with about 10% zeros and no row or column all zero.
fn mask(rows: usize, cols: usize, seed: u64, dev: &Device) -> Tensor {
    let mut v: Vec<f32> = uniform(rows * cols, seed)
        .into_iter()
        .map(|x| if x < -0.8 { 0.0 } else { 1.0 })
        .collect();
    for i in 0..rows.min(cols) {
        v[i * cols + i] = 1.0; // at least one key per row and column
    }
    Tensor::from_vec(v, (rows, cols), dev).unwrap()
}

/// f32 master parameters on `dev` with random values (AF2's zero-initialised output projections
/// would make every update vanish), and the block built on them.
fn build(dev: &Device) -> (VarMap, EvoformerBlock) {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, dev);
    let block = EvoformerBlock::new(vb.pp("block"), &block_config()).unwrap();
    for (i, (name, var)) in sorted_vars(&vm).into_iter().enumerate() {
        let dims = var.dims().to_vec();
        let seed = 1000 + i as u64;
        let t = if dims.len() >= 2 {
            let fan_in = dims[dims.len() - 1] as f32;
            random(&dims, (3.0 / fan_in).sqrt(), seed, DType::F32, dev)
        } else if name.ends_with("weight") {
            (random(&dims, 0.1, seed, DType::F32, dev) + 1.0).unwrap()
        } else {
            random(&dims, 0.1, seed, DType::F32, dev)
        };
        var.set(&t).unwrap();
    }
    (vm, block)
}

struct Inputs {
    m: Tensor,
    z: Tensor,
    msa_mask: Tensor,
    pair_mask: Tensor,
    dm: Tensor,
    dz: Tensor,
}

fn inputs(dtype: DType, dev: &Device) -> Inputs {
    let (c_m, c_z) = (block_config().c_m, block_config().c_z);
    Inputs {
        m: random(&[S, R, c_m], 1.0, 1, dtype, dev),
        z: random(&[R, R, c_z], 1.0, 2, dtype, dev),
        msa_mask: mask(S, R, 3, dev),
        pair_mask: mask(R, R, 4, dev),
        dm: random(&[S, R, c_m], 1.0, 5, dtype, dev),
        dz: random(&[R, R, c_z], 1.0, 6, dtype, dev),
    }
}

/// Every compared tensor by name: `out.m`, `out.z`, `grad.m`, `grad.z`, `param.<name>`.
type Results = BTreeMap<String, Tensor>;

fn collect(vm: &VarMap, store: &GradStore, out: [(&str, Tensor); 4]) -> Results {
    let mut r: Results = out.into_iter().map(|(k, t)| (k.to_string(), t)).collect();
    for (name, var) in sorted_vars(vm) {
        let g = store
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {name}"));
        r.insert(format!("param.{name}"), g.clone());
    }
    r
}

fn manual(vm: &VarMap, block: &EvoformerBlock, x: &Inputs, ctx: &DropoutCtx) -> Results {
    let (m, z, saved) = block
        .parts()
        .forward_saved(&x.m, &x.z, &x.msa_mask, &x.pair_mask, Some(ctx))
        .unwrap();
    let mut store = GradStore::default();
    let (dm, dz) = block
        .parts()
        .backward(saved, &x.dm, &x.dz, Some(ctx), &mut store)
        .unwrap();
    let out = [("out.m", m), ("out.z", z), ("grad.m", dm), ("grad.z", dz)];
    collect(vm, &store, out)
}

fn autograd(vm: &VarMap, block: &EvoformerBlock, x: &Inputs, ctx: &DropoutCtx) -> Results {
    let (mv, zv) = (
        Var::from_tensor(&x.m).unwrap(),
        Var::from_tensor(&x.z).unwrap(),
    );
    let (m, z) = block
        .forward(
            mv.as_tensor(),
            zv.as_tensor(),
            &x.msa_mask,
            &x.pair_mask,
            Some(ctx),
        )
        .unwrap();
    let store = backward_vars(&vjp_loss(&[(&m, &x.dm), (&z, &x.dz)]).unwrap()).unwrap();
    let dm = store.get(mv.as_tensor()).expect("no dm").clone();
    let dz = store.get(zv.as_tensor()).expect("no dz").clone();
    let out = [
        ("out.m", m.detach()),
        ("out.z", z.detach()),
        ("grad.m", dm),
        ("grad.z", dz),
    ];
    collect(vm, &store, out)
}

fn to_f32(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn norm(v: &[f32]) -> f64 {
    v.iter()
        .map(|&x| (x as f64) * (x as f64))
        .sum::<f64>()
        .sqrt()
}

/// `‖a − b‖₂ / max(‖b‖₂, floor)`.
fn rel(a: &Tensor, b: &Tensor, floor: f64) -> f64 {
    let (av, bv) = (to_f32(a), to_f32(b));
    let diff: Vec<f32> = av.iter().zip(&bv).map(|(p, q)| p - q).collect();
    norm(&diff) / norm(&bv).max(floor).max(1e-30)
}

/// Manual vs autograd per tensor: `‖a − b‖₂ / max(‖b‖₂, 1e-3 · largest parameter-gradient
/// norm)` (the floor covers structurally-zero gradients, rounding noise in both) must be ≤ `tol`.
/// In bf16 a parameter gradient over `tol` still passes when the manual one is no further from
/// the f32 autograd result on the same (bf16-valued) inputs than autograd-bf16 is
/// (`e_manual ≤ 1.5·e_autograd + tol/4`): bias gradients are sums of many bf16 terms that
/// largely cancel, so both bf16 paths are far from each other and from f32 there. Then two
/// manual runs must be bitwise equal.
fn check(dtype: DType, tol: f64) {
    let Some(dev) = cuda() else { return };
    let (vm, block) = build(&dev);
    let x = inputs(dtype, &dev);
    let ctx = DropoutCtx::new(42);
    let got = manual(&vm, &block, &x, &ctx);
    let want = autograd(&vm, &block, &x, &ctx);
    let truth = (dtype != DType::F32).then(|| {
        let up = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let x32 = Inputs {
            m: up(&x.m),
            z: up(&x.z),
            msa_mask: x.msa_mask.clone(),
            pair_mask: x.pair_mask.clone(),
            dm: up(&x.dm),
            dz: up(&x.dz),
        };
        autograd(&vm, &block, &x32, &ctx)
    });
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>()
    );
    let scale = want
        .iter()
        .filter(|(k, _)| k.starts_with("param."))
        .map(|(_, t)| norm(&to_f32(t)))
        .fold(0.0f64, f64::max);
    // (manual vs autograd, manual vs f32, autograd vs f32, pass, name)
    let mut rows: Vec<(f64, f64, f64, bool, String)> = Vec::new();
    for (name, w) in &want {
        let g = &got[name];
        assert_eq!(g.dims(), w.dims(), "{name}");
        let param = name.starts_with("param.");
        let floor = if param { 1e-3 * scale } else { 0.0 };
        let r = rel(g, w, floor);
        let (em, ea) = match &truth {
            Some(t) => (rel(g, &t[name], floor), rel(w, &t[name], floor)),
            None => (f64::NAN, f64::NAN),
        };
        let pass = r.is_finite() && (r <= tol || (param && em <= 1.5 * ea + tol / 4.0));
        rows.push((r, em, ea, pass, name.clone()));
    }
    rows.sort_by(|a, b| b.0.total_cmp(&a.0));
    println!(
        "{dtype:?}: {} tensors; worst manual-vs-autograd (then vs f32 autograd: manual, autograd):",
        rows.len()
    );
    for (r, em, ea, pass, name) in rows.iter().take(6) {
        let flag = if *pass { "" } else { "  FAIL" };
        println!("  {r:10.3e}  ({em:9.2e}, {ea:9.2e})  {name}{flag}");
    }
    let bad: Vec<_> = rows.iter().filter(|r| !r.3).collect();
    assert!(bad.is_empty(), "{dtype:?}: over {tol:e}: {bad:?}");

    let again = manual(&vm, &block, &x, &ctx);
    for (name, a) in &got {
        let (av, bv) = (to_f32(a), to_f32(&again[name]));
        let same = av.iter().zip(&bv).all(|(p, q)| p.to_bits() == q.to_bits());
        assert!(same, "{dtype:?}: {name} differs between two manual runs");
    }
}

#[test]
fn manual_block_backward_matches_autograd_f32() {
    check(DType::F32, 1e-5);
}

#[test]
fn manual_block_backward_matches_autograd_bf16() {
    check(DType::BF16, 2e-2);
}
