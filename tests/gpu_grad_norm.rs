//! The fused global gradient norm (`kernels::grad_norm`) and the fused optimiser update on the
//! GPU: against the candle-op norm and an exact host f64 sum at the full AF2 parameter set (4915
//! tensors), f32 and bf16; run-to-run bitwise equality; NaN / inf gradients give a non-finite
//! norm; the trainer's update (`StepUpdate::apply`) fused vs candle ops bitwise at AF2 shapes.
//!
//! Needs the `cuda` feature and a GPU; skips (with a message) when no CUDA device opens. Tests
//! that flip the process-wide switch (`kernels::set_fused`) assume `--test-threads=1` (or
//! nextest's process per test).
#![cfg(feature = "cuda")]

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use ferrofold::kernels::{self, grad_norm};
use ferrofold::train::optim::{global_grad_norm, Grads, Params, StepUpdate};

fn cuda() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("skipped: no CUDA device ({e})");
            None
        }
    }
}

/// Random gradients of the AF2 parameter shapes, named like parameters (sorted), `dtype`.
fn af2_grads(dev: &Device, dtype: DType, seed: u64) -> Grads {
    let shapes = kernels::adam::af2_param_shapes(dev).unwrap();
    assert!(shapes.len() > 4000, "{} AF2 parameters", shapes.len());
    shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            // Scales spread over orders of magnitude, as real gradients are.
            let scale = 10f32.powi((i % 7) as i32 - 4);
            let t = kernels::uniform_tensor(s, scale, seed ^ (i as u64) << 20, dtype, dev).unwrap();
            (format!("p{i:05}"), t)
        })
        .collect()
}

/// Exact-as-possible reference: every element squared and summed in f64 on the host.
fn host_norm(grads: &Grads) -> f64 {
    let mut sum = 0f64;
    for g in grads.values() {
        let v = g
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        sum += v.iter().map(|x| f64::from(*x) * f64::from(*x)).sum::<f64>();
    }
    sum.sqrt()
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs()
}

#[test]
fn grad_norm_self_check_passes() {
    let Some(dev) = cuda() else { return };
    kernels::set_fused(true);
    let checks = grad_norm::self_check(&dev).unwrap();
    for c in &checks {
        eprintln!(
            "{:<22} {:<22} err {:.3e} tol {:.0e}",
            c.op, c.case, c.max_err, c.tol
        );
    }
    assert!(checks.len() >= 11);
    assert!(checks.iter().all(|c| c.ok()), "{checks:?}");
}

/// AF2 shapes, f32 and bf16: fused vs candle ops (1e-5 relative), vs the host f64 sum (1e-11),
/// bitwise equal run to run, and `global_grad_norm` (optim and ddp) dispatches to it.
#[test]
fn fused_norm_matches_candle_at_af2_shapes() {
    let Some(dev) = cuda() else { return };
    kernels::set_fused(true);
    for dt in [DType::F32, DType::BF16] {
        let grads = af2_grads(&dev, dt, 0x5eed);
        let refs: Vec<&Tensor> = grads.values().collect();
        let fused = grad_norm::sum_sq_fused(&refs).unwrap().sqrt();
        let again = grad_norm::sum_sq_fused(&refs).unwrap().sqrt();
        let candle = grad_norm::sum_sq_candle(&refs).unwrap().sqrt();
        let exact = host_norm(&grads);
        eprintln!(
            "{dt:?}: fused {fused:.12e} candle {candle:.12e} host {exact:.12e} \
             (fused-candle {:.2e}, fused-host {:.2e})",
            rel(fused, candle),
            rel(fused, exact)
        );
        assert!(fused.is_finite() && fused > 0.0);
        assert_eq!(fused.to_bits(), again.to_bits(), "not reproducible");
        // The candle ops sum f32 squares in f32 (per-thread runs of ~n/1024 terms); the fused
        // kernel sums in f64: the host f64 sum is the reference.
        assert!(rel(fused, candle) <= 1e-5, "{fused} vs candle {candle}");
        assert!(rel(fused, exact) <= 1e-11, "{fused} vs host {exact}");
        // The public entry points take the fused path on CUDA.
        let via_optim = global_grad_norm(&grads).unwrap();
        assert_eq!(via_optim.to_bits(), fused.to_bits());
        let list: Vec<(String, Tensor)> =
            grads.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        let via_ddp = ferrofold::parallel::global_grad_norm(&list).unwrap();
        assert_eq!(via_ddp.to_bits(), fused.to_bits());
        // Fused kernels off: the candle ops, bitwise.
        kernels::set_fused(false);
        let off = global_grad_norm(&grads).unwrap();
        kernels::set_fused(true);
        assert_eq!(off.to_bits(), candle.to_bits());
    }
}

/// Tensors the kernel cannot take (non-contiguous, f64, empty) go to the candle ops; the sum is
/// still right.
#[test]
fn mixed_eligibility_split() {
    let Some(dev) = cuda() else { return };
    kernels::set_fused(true);
    let a = kernels::uniform_tensor(&[300, 70], 1.0, 1, DType::F32, &dev).unwrap();
    let b = kernels::uniform_tensor(&[64, 48], 2.0, 2, DType::F32, &dev)
        .unwrap()
        .t()
        .unwrap(); // non-contiguous
    let c = kernels::uniform_tensor(&[1000], 3.0, 3, DType::F32, &dev)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let d = kernels::uniform_tensor(&[9001], 0.5, 4, DType::BF16, &dev).unwrap();
    let e = Tensor::zeros((0, 5), DType::F32, &dev).unwrap();
    assert!(!grad_norm::eligible(&b) && !grad_norm::eligible(&c) && !grad_norm::eligible(&e));
    let grads: Grads = [("a", a), ("b", b), ("c", c), ("d", d), ("e", e)]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    let refs: Vec<&Tensor> = grads.values().collect();
    assert_eq!(grad_norm::fused_selection(&refs), vec![0, 3]);
    let got = global_grad_norm(&grads).unwrap();
    let mut sum = 0f64;
    for g in grads.values().filter(|g| g.elem_count() > 0) {
        let v = g.flatten_all().unwrap().to_dtype(DType::F64).unwrap();
        sum += v
            .to_vec1::<f64>()
            .unwrap()
            .iter()
            .map(|x| x * x)
            .sum::<f64>();
    }
    let want = sum.sqrt();
    assert!(rel(got, want) <= 1e-6, "{got} vs {want}");
}

/// A NaN or infinite gradient anywhere (f32 or bf16, small or large tensor, first or last
/// chunk) makes the norm non-finite: the trainer skips such steps.
#[test]
fn non_finite_gradient_gives_non_finite_norm() {
    let Some(dev) = cuda() else { return };
    kernels::set_fused(true);
    for dt in [DType::F32, DType::BF16] {
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            for (len, pos) in [(5usize, 0usize), (100_000, 99_999), (100_000, 8192)] {
                let mut v = vec![0.25f32; len];
                v[pos] = bad;
                let t = Tensor::from_vec(v, len, &Device::Cpu)
                    .unwrap()
                    .to_dtype(dt)
                    .unwrap()
                    .to_device(&dev)
                    .unwrap();
                let ok = kernels::uniform_tensor(&[4096], 1.0, 9, dt, &dev).unwrap();
                let grads: Grads = [("a".to_string(), ok.clone()), ("b".to_string(), t)]
                    .into_iter()
                    .collect();
                let n = global_grad_norm(&grads).unwrap();
                assert!(!n.is_finite(), "{dt:?} {bad} at {pos}/{len}: norm {n}");
                assert!(
                    global_grad_norm(&[("a".to_string(), ok)].into_iter().collect())
                        .unwrap()
                        .is_finite()
                );
            }
        }
    }
    // A huge but finite value: its f32 square would overflow, the f64 one does not (the fused
    // norm is finite and right; the candle ops' f32 squares give inf).
    let big = Tensor::new(&[1e30f32, 0.0], &dev).unwrap();
    let grads: Grads = [("a".to_string(), big)].into_iter().collect();
    let n = global_grad_norm(&grads).unwrap();
    assert!(rel(n, 1e30) < 1e-6, "{n}");
}

fn copy_params(p: &Params) -> Params {
    p.iter()
        .map(|(n, v)| {
            (
                n.clone(),
                Var::from_tensor(&v.as_tensor().copy().unwrap()).unwrap(),
            )
        })
        .collect()
}

fn max_abs_diff(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>) -> f32 {
    let mut worst = 0f32;
    for (k, x) in a {
        let d = (x - &b[k])
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        worst = if d.is_nan() { f32::NAN } else { worst.max(d) };
    }
    worst
}

/// The trainer's whole update (`StepUpdate::apply`: norm, clip, Adam, EMA) at AF2 shapes with
/// fused kernels on vs off: the same clip coefficient path, weights, moments and EMA bitwise
/// equal after three steps (clipped, unclipped, clipped).
#[test]
fn step_update_fused_is_bitwise_twin_at_af2_shapes() {
    let Some(dev) = cuda() else { return };
    let grads = af2_grads(&dev, DType::F32, 0xabc);
    let small: Grads = grads
        .iter()
        .map(|(k, v)| (k.clone(), v.affine(1e-4, 0.0).unwrap()))
        .collect();
    let params: Params = grads
        .iter()
        .enumerate()
        .map(|(i, (k, g))| {
            let t =
                kernels::uniform_tensor(g.dims(), 0.5, 77 + i as u64, DType::F32, &dev).unwrap();
            (k.clone(), Var::from_tensor(&t).unwrap())
        })
        .collect();
    let p_twin = copy_params(&params);
    let cfg = ferrofold::config::OptimConfig::default();
    let mut up_f = StepUpdate::new(&params, &cfg).unwrap();
    let mut up_t = StepUpdate::new(&p_twin, &cfg).unwrap();
    for (g, lr) in [(&grads, 1e-3), (&small, 5e-4), (&grads, 2e-3)] {
        kernels::set_fused(true);
        let cf = up_f.apply(&params, g, lr).unwrap();
        kernels::set_fused(false);
        let ct = up_t.apply(&p_twin, g, lr).unwrap();
        kernels::set_fused(true);
        // The norms differ in the last bits (f64 vs f32 sums): so may the clip coefficients.
        assert!((cf - ct).abs() <= 1e-6 * ct, "clip {cf} vs {ct}");
        eprintln!("clip fused {cf:.9e} twin {ct:.9e}");
    }
    assert_eq!(up_f.adam.steps, up_t.adam.steps);
    let pf: BTreeMap<String, Tensor> = params
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    let pt: BTreeMap<String, Tensor> = p_twin
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    let dw = max_abs_diff(&pf, &pt);
    let dm = max_abs_diff(&up_f.adam.m, &up_t.adam.m);
    let dv = max_abs_diff(&up_f.adam.v, &up_t.adam.v);
    let de = max_abs_diff(&up_f.ema.weights, &up_t.ema.weights);
    eprintln!("max |fused - twin|: weights {dw:e} m {dm:e} v {dv:e} ema {de:e}");
    // Different norms → different clip coefficients → tiny differences (not bitwise); with the
    // same coefficient the Adam kernel is bitwise (kernels::adam::self_check, below).
    assert!(dw <= 1e-6 && dm <= 1e-6 && dv <= 1e-9 && de <= 1e-6);
    let checks = kernels::adam::self_check(&dev).unwrap();
    assert!(checks.iter().all(|c| c.ok()), "{checks:?}");
}

/// With the same norm (so the same clip coefficient) the fused update is bitwise the twin at
/// AF2 shapes (chunk boundaries inside and across tensors, thousands of tiny tensors).
#[test]
fn clip_adam_ema_fused_bitwise_at_af2_shapes() {
    use ferrofold::train::optim::{clip_adam_ema_fused, clip_adam_ema_twin, Adam, Ema};
    let Some(dev) = cuda() else { return };
    kernels::set_fused(true);
    let grads = af2_grads(&dev, DType::F32, 0xdef);
    let params: Params = grads
        .iter()
        .enumerate()
        .map(|(i, (k, g))| {
            let t =
                kernels::uniform_tensor(g.dims(), 0.5, 99 + i as u64, DType::F32, &dev).unwrap();
            (k.clone(), Var::from_tensor(&t).unwrap())
        })
        .collect();
    let p_twin = copy_params(&params);
    let cfg = ferrofold::config::OptimConfig::default();
    let (mut a_f, mut e_f) = (
        Adam::new(&params, &cfg).unwrap(),
        Ema::new(&params, 0.999).unwrap(),
    );
    let (mut a_t, mut e_t) = (
        Adam::new(&p_twin, &cfg).unwrap(),
        Ema::new(&p_twin, 0.999).unwrap(),
    );
    for (norm, lr) in [(50.0, 1e-3), (0.05, 1e-3)] {
        let cf = clip_adam_ema_fused(&mut a_f, &mut e_f, &params, &grads, norm, 1.0, lr).unwrap();
        let ct = clip_adam_ema_twin(&mut a_t, &mut e_t, &p_twin, &grads, norm, 1.0, lr).unwrap();
        assert_eq!(cf, ct);
    }
    let pf: BTreeMap<String, Tensor> = params
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    let pt: BTreeMap<String, Tensor> = p_twin
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    assert_eq!(max_abs_diff(&pf, &pt), 0.0);
    assert_eq!(max_abs_diff(&a_f.m, &a_t.m), 0.0);
    assert_eq!(max_abs_diff(&a_f.v, &a_t.v), 0.0);
    assert_eq!(max_abs_diff(&e_f.weights, &e_t.weights), 0.0);
    assert_eq!(a_f.steps, a_t.steps);
}

/// Moment / EMA tensors that share one buffer make the kernel refuse the launch (before any
/// write); `clip_adam_ema_fused` then gives each its own copy and retries: still bitwise the
/// twin, and the shared buffer is no longer shared.
#[test]
fn shared_state_buffers_are_split_and_retried() {
    use ferrofold::train::optim::{clip_adam_ema_fused, clip_adam_ema_twin, Adam, Ema};
    let Some(dev) = cuda() else { return };
    kernels::set_fused(true);
    let shapes = [vec![33usize, 7], vec![5000], vec![1]];
    let mk = |seed: u64| -> Params {
        shapes
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let t = kernels::uniform_tensor(s, 0.5, seed + i as u64, DType::F32, &dev).unwrap();
                (format!("w{i}"), Var::from_tensor(&t).unwrap())
            })
            .collect()
    };
    let (pf, pt) = (mk(10), mk(10));
    let grads: Grads = shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let t = kernels::uniform_tensor(s, 2.0, 50 + i as u64, DType::F32, &dev).unwrap();
            (format!("w{i}"), t)
        })
        .collect();
    let cfg = ferrofold::config::OptimConfig::default();
    let (mut af, mut ef) = (Adam::new(&pf, &cfg).unwrap(), Ema::new(&pf, 0.99).unwrap());
    let (mut at, mut et) = (Adam::new(&pt, &cfg).unwrap(), Ema::new(&pt, 0.99).unwrap());
    // m and v of `w1` are one buffer (both zero).
    let shared = af.m["w1"].clone();
    af.v.insert("w1".into(), shared);
    for _ in 0..2 {
        let n = global_grad_norm(&grads).unwrap();
        let cf = clip_adam_ema_fused(&mut af, &mut ef, &pf, &grads, n, 1.0, 1e-3).unwrap();
        let ct = clip_adam_ema_twin(&mut at, &mut et, &pt, &grads, n, 1.0, 1e-3).unwrap();
        assert_eq!(cf, ct);
    }
    for k in ["w0", "w1", "w2"] {
        let a = pf[k]
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let b = pt[k]
            .as_tensor()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(a, b, "{k}");
        for (x, y) in [(&af.m, &at.m), (&af.v, &at.v), (&ef.weights, &et.weights)] {
            let a = x[k].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let b = y[k].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(a, b, "{k}");
        }
    }
    assert_ne!(
        af.m["w1"].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        af.v["w1"].flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
}
