//! Tuned kernels against their twins on the GPU: the same-shape add (bitwise candle's add), the
//! vectorised multi-row softmax forward (vs the scalar kernel and the composite twin, bitwise
//! reruns), the column-parallel LayerNorm dw/db final reduction (bitwise the serial kernel),
//! and `row_scale` in the outer product mean (bitwise the broadcast multiply it replaced). The
//! hand-written Evoformer block (which uses all of them) is checked against autograd and for
//! bitwise reruns in `gpu_manual_backward.rs`.
//!
//! Needs the `cuda` feature and a GPU; skips (with a message) when no CUDA device opens.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device};
use ferrofold::kernels::{self, ElemCheck};

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
            "{what}: {:<28} {:<44} err {:.3e} tol {:.0e} {}",
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
fn add_fused_is_bitwise_candle_add() {
    let Some(dev) = cuda() else { return };
    assert_all_ok("add", &kernels::add::self_check(&dev).unwrap());
}

#[test]
fn softmax_vectorised_forward_matches_scalar_and_twin() {
    let Some(dev) = cuda() else { return };
    assert_all_ok(
        "softmax vec",
        &kernels::softmax::vec_self_check(&dev).unwrap(),
    );
}

#[test]
fn layer_norm_wb_final_cols_is_bitwise_serial() {
    let Some(dev) = cuda() else { return };
    assert_all_ok(
        "ln wb final",
        &kernels::layer_norm::wb_final_self_check(&dev).unwrap(),
    );
}

/// `row_scale` (the OPM's `· 1/norm` and mask multiplies) is bitwise candle's broadcast multiply
/// by a `[*, 1]` tensor, on the OPM's shapes, bf16 and f32.
#[test]
fn row_scale_is_bitwise_broadcast_mul() {
    let Some(dev) = cuda() else { return };
    for dt in [DType::BF16, DType::F32] {
        for (rows, c) in [(65536usize, 128usize), (32768, 32), (37, 5)] {
            let x = kernels::uniform_tensor(&[rows, c], 3.0, 7, dt, &dev).unwrap();
            let s = kernels::uniform_tensor(&[rows, 1], 1.0, 8, dt, &dev).unwrap();
            let want = x.broadcast_mul(&s).unwrap();
            let got = kernels::bias_act::row_scale(&x, &s).unwrap();
            let d = kernels::rel_err(&got, &want).unwrap();
            assert_eq!(d, 0.0, "row_scale [{rows}, {c}] {dt:?}: rel err {d:e}");
        }
    }
}

/// `kernels::wgrad::matmul_tn_f32` (cuBLAS GemmEx, 16-bit in, f32 out) against an f64 host
/// reference: at the trunk's weight-gradient shapes (long `n`), odd widths, a non-zero start
/// offset, bf16 and f16. The f32 output keeps what the twin's bf16 output rounds away: its error
/// must be far below the twin's.
#[test]
fn weight_gradient_gemm_writes_f32_accumulator() {
    use ferrofold::kernels::wgrad::{matmul_tn_f32, matmul_tn_f32_twin};
    let Some(dev) = cuda() else { return };
    for (k, &(n, p, q)) in [
        (32768usize, 256usize, 128usize),
        (4096, 1, 1024),
        (777, 33, 5),
    ]
    .iter()
    .enumerate()
    {
        for dt in [DType::BF16, DType::F16] {
            let seed = 0x9e00 + k as u64;
            // A narrowed view of a longer tensor: the operands start at an offset.
            let a = kernels::uniform_tensor(&[n + 3, p], 1.0, seed, dt, &dev)
                .unwrap()
                .narrow(0, 3, n)
                .unwrap();
            let b = kernels::uniform_tensor(&[n, q], 1.0, seed + 1, dt, &dev).unwrap();
            let want = a
                .to_dtype(DType::F64)
                .unwrap()
                .t()
                .unwrap()
                .matmul(&b.to_dtype(DType::F64).unwrap())
                .unwrap();
            let got = matmul_tn_f32(&a, &b).unwrap();
            assert_eq!(got.dtype(), DType::F32);
            assert_eq!(got.dims(), &[p, q]);
            let twin = matmul_tn_f32_twin(&a, &b).unwrap();
            let e_got = kernels::rel_err(&got, &want).unwrap();
            let e_twin = kernels::rel_err(&twin, &want).unwrap();
            eprintln!("wgrad {dt:?} {n}x{p}x{q}: f32-out err {e_got:.3e}, twin err {e_twin:.3e}");
            assert!(e_got < 1e-5, "{dt:?} {n}x{p}x{q}: {e_got:e}");
            assert!(
                e_got <= e_twin,
                "{dt:?} {n}x{p}x{q}: {e_got:e} > twin {e_twin:e}"
            );
            // Deterministic.
            let again = matmul_tn_f32(&a, &b).unwrap();
            let bits = |t: &candle_core::Tensor| {
                t.flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect::<Vec<_>>()
            };
            assert!(bits(&got) == bits(&again));
        }
    }
}
