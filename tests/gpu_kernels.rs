//! Fused CUDA kernels (LayerNorm, biased softmax) against their composite twins, forward and
//! backward, f32 and bf16 (see `ferrofold::kernels::check`). Needs a CUDA device: skips with a
//! message when none is visible.
#![cfg(feature = "cuda")]

use candle_core::Device;
use ferrofold::kernels::check::{format_check, self_check};

fn cuda() -> Option<Device> {
    if ferrofold::device::cuda_device_count() == 0 {
        eprintln!("skipped: no CUDA device visible");
        return None;
    }
    Some(Device::new_cuda(0).expect("cuda device 0"))
}

#[test]
fn fused_kernels_match_twins() {
    let Some(dev) = cuda() else { return };
    let rows = self_check(&dev).expect("self-check ran");
    println!("{}", format_check(&rows));
    let bad: Vec<_> = rows.iter().filter(|r| !r.pass).collect();
    assert!(bad.is_empty(), "{} failing rows: {bad:#?}", bad.len());
    // Every AF2-shaped case took the fused path.
    assert!(rows.iter().filter(|r| r.fused).count() > 60);
}

#[test]
fn fused_switch_routes_primitives() {
    use candle_core::{DType, Tensor};
    use ferrofold::model::primitives::{softmax, softmax_twin};
    let Some(dev) = cuda() else { return };
    let x = Tensor::randn(0f32, 2.0, (4, 8, 300), &dev)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    ferrofold::kernels::set_fused(false);
    let twin = softmax(&x).unwrap();
    let want = softmax_twin(&x).unwrap();
    let d = |a: &Tensor, b: &Tensor| {
        (a.to_dtype(DType::F32).unwrap() - b.to_dtype(DType::F32).unwrap())
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    assert_eq!(
        d(&twin, &want),
        0.0,
        "switch off must give the twin exactly"
    );
    ferrofold::kernels::set_fused(true);
    let fused = softmax(&x).unwrap();
    assert!(d(&fused, &want) < 1e-2);
}
