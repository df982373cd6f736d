//! The fused small-head attention core (`kernels::row_attention`, extra-MSA row attention) against
//! its plain-candle twin on the GPU: forward (`o`, log-sum-exp), backward (`dq`, `dk`, `dv`, pair
//! bias gradient vs autograd through the twin), bitwise determinism, and the whole MSA row
//! attention module (`forward_saved` + `backward`) with the fused kernels on vs off.
//!
//! Needs the `cuda` feature and a GPU; skips (with a message) when no CUDA device opens. The
//! fused row attention is opt-in (`row_attention::set_enabled(true)` here). The module test flips
//! the process-wide switch (`kernels::set_fused`): run with `--test-threads=1`.
#![cfg(feature = "cuda")]

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use ferrofold::kernels::row_attention::{row_attention_bwd, row_attention_fwd, row_attention_twin};
use ferrofold::model::msa::MsaRowAttentionWithPairBias;

fn cuda() -> Option<Device> {
    // The fused row attention is opt-in; these tests exercise it.
    ferrofold::kernels::row_attention::set_enabled(true);
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("skipped: no CUDA device ({e})");
            None
        }
    }
}

/// max |a − b| / max(1e-6, max |b|).
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let a = a
        .to_dtype(DType::F64)
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap();
    let b = b
        .to_dtype(DType::F64)
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap();
    assert_eq!(a.dims(), b.dims());
    let d = (&a - &b).unwrap().abs().unwrap().max_all().unwrap();
    let m = b.abs().unwrap().max_all().unwrap();
    d.to_scalar::<f64>().unwrap() / m.to_scalar::<f64>().unwrap().max(1e-6)
}

fn randn(dims: &[usize], scale: f64, dt: DType, dev: &Device) -> Tensor {
    Tensor::randn(0f32, 1.0, dims, &Device::Cpu)
        .unwrap()
        .affine(scale, 0.0)
        .unwrap()
        .to_dtype(dt)
        .unwrap()
        .to_device(dev)
        .unwrap()
}

/// `[B, N]` mask: batch 0 fully masked, some scattered zeros elsewhere.
fn mask(b: usize, n: usize, dt: DType, dev: &Device) -> Tensor {
    let v: Vec<f32> = (0..b * n)
        .map(|i| if i < n || i % 7 == 3 { 0.0 } else { 1.0 })
        .collect();
    Tensor::from_vec(v, (b, n), &Device::Cpu)
        .unwrap()
        .to_dtype(dt)
        .unwrap()
        .to_device(dev)
        .unwrap()
}

/// Fused forward and backward vs the twin (autograd for the backward) at one shape.
fn core_case(dev: &Device, (b, n, h, c): (usize, usize, usize, usize), dt: DType, tol: f64) {
    let what = format!("b={b} n={n} h={h} c={c} {dt:?}");
    let y = Var::from_tensor(&randn(&[b * n, 4 * h * c], 1.0, dt, dev)).unwrap();
    let pb = Var::from_tensor(&randn(&[1, h, n, n], 1.0, dt, dev)).unwrap();
    let m = mask(b, n, dt, dev);
    let d_o = randn(&[b * n, h * c], 1.0, dt, dev);
    let inf = 1e9;
    // Twin in f32 (reference), autograd.
    let (yf, pf) = (
        Var::from_tensor(&y.as_tensor().to_dtype(DType::F32).unwrap()).unwrap(),
        Var::from_tensor(&pb.as_tensor().to_dtype(DType::F32).unwrap()).unwrap(),
    );
    let mf = m.to_dtype(DType::F32).unwrap();
    let (o_t, lse_t) = row_attention_twin(yf.as_tensor(), &mf, pf.as_tensor(), h, c, inf).unwrap();
    let g: GradStore = (&o_t * d_o.to_dtype(DType::F32).unwrap())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    let dy_t = g.get(yf.as_tensor()).unwrap();
    let dpb_t = g.get(pf.as_tensor()).unwrap();

    let (o, lse) = row_attention_fwd(y.as_tensor(), &m, pb.as_tensor(), h, c, inf)
        .unwrap()
        .expect("fused core applies");
    assert_eq!(o.dtype(), dt);
    assert_eq!(lse.dims(), [b * h * n, 2]);
    let r = rel(&o, &o_t);
    eprintln!("{what}: o rel {r:.2e}");
    assert!(r < tol, "{what}: o rel {r:e}");
    let r = rel(&lse, &lse_t);
    assert!(r < tol, "{what}: lse rel {r:e}");

    let run = || {
        row_attention_bwd(y.as_tensor(), &m, pb.as_tensor(), &o, &lse, &d_o, h, c, inf)
            .unwrap()
            .expect("fused core applies")
    };
    let [dq, dk, dv, dpb] = run();
    for (i, (name, d)) in [("dq", &dq), ("dk", &dk), ("dv", &dv)]
        .into_iter()
        .enumerate()
    {
        let want = dy_t.narrow(1, i * h * c, h * c).unwrap();
        let r = rel(d, &want);
        eprintln!("{what}: {name} rel {r:.2e}");
        assert!(r < tol, "{what}: {name} rel {r:e}");
    }
    let r = rel(&dpb.reshape((1, h, n, n)).unwrap(), dpb_t);
    eprintln!("{what}: dpb rel {r:.2e}");
    assert!(r < tol, "{what}: dpb rel {r:e}");
    // Deterministic: a second run is bitwise equal.
    let again = run();
    for (a, b) in [&dq, &dk, &dv, &dpb].into_iter().zip(again.iter()) {
        let d = (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        assert_eq!(d, 0.0, "{what}: backward not deterministic");
    }
}

#[test]
fn row_attention_core_matches_twin_f32() {
    let Some(dev) = cuda() else { return };
    core_case(&dev, (3, 37, 2, 8), DType::F32, 1e-4);
    core_case(&dev, (5, 64, 3, 16), DType::F32, 1e-4);
    core_case(&dev, (20, 256, 8, 8), DType::F32, 1e-4);
}

#[test]
fn row_attention_core_matches_twin_bf16() {
    let Some(dev) = cuda() else { return };
    core_case(&dev, (3, 37, 2, 8), DType::BF16, 3e-2);
    core_case(&dev, (64, 256, 8, 8), DType::BF16, 3e-2);
}

/// The MSA row attention module (extra-MSA widths) with the fused kernels on vs off (composite
/// path), f32: output, input gradients and every parameter gradient.
#[test]
fn msa_row_attention_module_fused_matches_composite() {
    let Some(dev) = cuda() else { return };
    let (s, r, c_m, c_z, h, c) = (6, 40, 64, 16, 8, 8);
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
    let att = MsaRowAttentionWithPairBias::new(vb.pp("row"), c_m, c_z, c, h, 1e9).unwrap();
    let mut names: Vec<String> = vm.data().lock().unwrap().keys().cloned().collect();
    names.sort();
    for (k, name) in names.iter().enumerate() {
        let v = vm.data().lock().unwrap()[name].clone();
        let t = Tensor::randn(0f32, 0.3, v.shape(), &Device::Cpu)
            .unwrap()
            .affine(1.0, 0.01 * k as f64)
            .unwrap()
            .to_device(&dev)
            .unwrap();
        v.set(&t).unwrap();
    }
    let m = randn(&[s, r, c_m], 1.0, DType::F32, &dev);
    let z = randn(&[r, r, c_z], 1.0, DType::F32, &dev);
    let mk = mask(s, r, DType::F32, &dev);
    let dy = randn(&[s, r, c_m], 1.0, DType::F32, &dev);
    let run = |fused: bool| {
        ferrofold::kernels::set_fused(fused);
        let (y, saved) = att.forward_saved(&m, &z, &mk).unwrap();
        let mut g = GradStore::default();
        let (dm, dz) = att.backward(saved, &dy, &mut g).unwrap();
        (y, dm, dz, g)
    };
    let (y0, dm0, dz0, g0) = run(false);
    let (y1, dm1, dz1, g1) = run(true);
    ferrofold::kernels::set_fused(true);
    for (name, a, b) in [("y", &y1, &y0), ("dm", &dm1, &dm0), ("dz", &dz1, &dz0)] {
        let e = rel(a, b);
        eprintln!("module {name}: rel {e:.2e}");
        assert!(e < 1e-4, "{name}: rel {e:e}");
    }
    // Gradients that are structurally ~0 (layer_norm_z's bias: the pair bias gradient sums to
    // zero over the keys of every softmax row) are compared against 1e-3 of the largest
    // parameter gradient instead of their own (rounding-noise) size.
    let data = vm.data().lock().unwrap();
    let amax = |t: &Tensor| {
        t.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let floor = names
        .iter()
        .map(|n| 1e-3 * amax(g0.get(data[n].as_tensor()).unwrap()))
        .fold(0.0, f64::max);
    for name in &names {
        let v = data[name].as_tensor();
        let (a, b) = (g1.get(v).unwrap(), g0.get(v).unwrap());
        let e = rel(a, b) * amax(b).max(1e-6) / amax(b).max(floor);
        eprintln!("module {name}: rel {e:.2e}");
        assert!(e < 1e-4, "{name}: rel {e:e}");
    }
}

/// The per-batch column scale of global column attention vs its twin: bitwise equal (one fp32
/// product rounded once in both), f32 and bf16, vectorised and scalar widths.
#[test]
fn batch_col_scale_matches_twin_bitwise() {
    use ferrofold::kernels::batch_col_scale::{batch_col_scale, batch_col_scale_twin};
    let Some(dev) = cuda() else { return };
    for dt in [DType::F32, DType::BF16] {
        for (b, n, k) in [(3, 5, 7), (256, 1024, 64), (4, 9, 16)] {
            let x = randn(&[b, n, k], 1.0, dt, &dev);
            let s = randn(&[b, k], 1.0, dt, &dev);
            let y = batch_col_scale(&x, &s).unwrap();
            let t = batch_col_scale_twin(&x, &s).unwrap();
            assert_eq!(y.dims(), t.dims());
            let d = (y.to_dtype(DType::F64).unwrap() - t.to_dtype(DType::F64).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap();
            assert_eq!(d, 0.0, "{dt:?} {b}x{n}x{k}");
        }
    }
}
