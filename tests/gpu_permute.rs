//! The strided-copy kernel (`kernels::permute`) against candle's `Tensor::contiguous` on CUDA:
//! bitwise-equal results for every permutation of rank-3/4/5 tensors (odd sizes, size-1 dims,
//! narrowed views with odd offsets), f32/bf16/f16/f64; both kernels (word gather, tiled
//! transpose) and both index widths; gradients through the op inside an autograd graph.
//!
//! Needs the `cuda` feature and a GPU; skips (with a message) when no CUDA device opens.
#![cfg(feature = "cuda")]

use candle_core::{DType, Device, Tensor, Var};
use ferrofold::kernels::permute::{
    self, cat_cols, cat_cols_twin, contiguous, kernel_applies, Kernel,
};

fn cuda() -> Option<Device> {
    if ferrofold::device::cuda_device_count() == 0 {
        eprintln!("skipped: no CUDA device visible");
        return None;
    }
    match Device::new_cuda(0) {
        Ok(d) => Some(d),
        Err(e) => {
            eprintln!("skipped: no CUDA device ({e})");
            None
        }
    }
}

/// Raw bits of every element (row-major), on the CPU.
fn bits(t: &Tensor) -> Vec<u64> {
    let t = t.flatten_all().unwrap().to_device(&Device::Cpu).unwrap();
    match t.dtype() {
        DType::F32 => t
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits() as u64)
            .collect(),
        DType::F64 => t
            .to_vec1::<f64>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits())
            .collect(),
        DType::BF16 => t
            .to_vec1::<half::bf16>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits() as u64)
            .collect(),
        DType::F16 => t
            .to_vec1::<half::f16>()
            .unwrap()
            .iter()
            .map(|x| x.to_bits() as u64)
            .collect(),
        other => panic!("dtype {other:?}"),
    }
}

fn permutations(n: usize) -> Vec<Vec<usize>> {
    if n == 0 {
        return vec![vec![]];
    }
    let mut out = Vec::new();
    for p in permutations(n - 1) {
        for k in 0..n {
            let mut q = p.clone();
            q.insert(k, n - 1);
            out.push(q);
        }
    }
    out
}

/// Kernel vs candle on `v`: same dims, contiguous, identical bits; the kernel must apply.
fn check(v: &Tensor, what: &str) -> Option<Kernel> {
    assert!(
        kernel_applies(v) || v.is_contiguous(),
        "{what}: kernel does not apply"
    );
    let got = contiguous(v).unwrap();
    let want = v.contiguous().unwrap();
    assert!(got.is_contiguous(), "{what}");
    assert_eq!(got.dims(), want.dims(), "{what}");
    assert_eq!(got.dtype(), want.dtype(), "{what}");
    assert!(bits(&got) == bits(&want), "{what}: values differ");
    permute::plan(
        v.dims(),
        v.layout().stride(),
        v.layout().start_offset(),
        v.dtype().size_in_bytes(),
    )
    .map(|p| p.kernel)
}

const DTYPES: [DType; 4] = [DType::BF16, DType::F32, DType::F16, DType::F64];

/// All permutations of rank-3/4/5 tensors with odd sizes, size-1 dims and multiples of 8, plain
/// and narrowed (odd offsets along the last and the first dim), every dtype.
#[test]
fn all_permutations_match_candle_bitwise() {
    let Some(dev) = cuda() else { return };
    let shapes: [&[usize]; 7] = [
        &[5, 7, 9],
        &[4, 1, 16],
        &[33, 8, 40],
        &[2, 3, 4, 8],
        &[5, 1, 3, 6],
        &[3, 5, 2, 17],
        &[2, 3, 2, 5, 8],
    ];
    let mut kinds = (0usize, 0usize);
    let mut seed = 1u64;
    for dims in shapes {
        for dt in DTYPES {
            seed += 1;
            let base = ferrofold::kernels::uniform_tensor(dims, 2.0, seed, dt, &dev).unwrap();
            for perm in permutations(dims.len()) {
                let mut views = vec![(base.permute(perm.as_slice()).unwrap(), "plain")];
                let last = dims.len() - 1;
                if dims[last] > 2 {
                    let n = base.narrow(last, 1, dims[last] - 2).unwrap();
                    views.push((n.permute(perm.as_slice()).unwrap(), "narrow last +1"));
                }
                if dims[0] > 1 {
                    let n = base.narrow(0, 1, dims[0] - 1).unwrap();
                    views.push((n.permute(perm.as_slice()).unwrap(), "narrow first +1"));
                }
                for (v, how) in views {
                    if v.is_contiguous() {
                        continue;
                    }
                    match check(&v, &format!("{dims:?} perm {perm:?} {how} {dt:?}")) {
                        Some(Kernel::Gather) => kinds.0 += 1,
                        Some(Kernel::Tile { .. }) => kinds.1 += 1,
                        Some(Kernel::GatherInto) => panic!("contiguous output planned as strided"),
                        None => {}
                    }
                }
            }
        }
    }
    eprintln!("checked: {} gather, {} tile", kinds.0, kinds.1);
    assert!(kinds.0 > 100 && kinds.1 > 100, "{kinds:?}");
}

/// The trunk's copies at small scale: head split out of a joint projection (narrow + transpose),
/// head merge, column transposes, the outer product's transpose, the pair-bias permute, a
/// broadcast view and a stepped view.
#[test]
fn trunk_layouts_match_candle_bitwise() {
    let Some(dev) = cuda() else { return };
    for dt in [DType::BF16, DType::F32] {
        // [B, N, 4, H, C] joint projection → q heads [B, H, N, C].
        let y = ferrofold::kernels::uniform_tensor(&[6, 20, 4, 4, 32], 1.0, 7, dt, &dev).unwrap();
        for i in 0..4 {
            let v = y.narrow(2, i, 1).unwrap().squeeze(2).unwrap();
            check(&v.transpose(1, 2).unwrap(), "head split");
        }
        let o = ferrofold::kernels::uniform_tensor(&[6, 4, 20, 32], 1.0, 8, dt, &dev).unwrap();
        check(&o.transpose(1, 2).unwrap(), "head merge");
        let m = ferrofold::kernels::uniform_tensor(&[24, 40, 64], 1.0, 9, dt, &dev).unwrap();
        check(&m.transpose(0, 1).unwrap(), "column transpose");
        let opm = ferrofold::kernels::uniform_tensor(&[12, 16, 10, 16], 1.0, 10, dt, &dev).unwrap();
        check(&opm.transpose(1, 2).unwrap(), "outer product");
        let b = ferrofold::kernels::uniform_tensor(&[40, 40, 8], 1.0, 11, dt, &dev).unwrap();
        let k = check(&b.permute((2, 0, 1)).unwrap(), "pair bias");
        assert!(matches!(k, Some(Kernel::Tile { .. })), "{k:?}");
        let mask = ferrofold::kernels::uniform_tensor(&[24, 40], 1.0, 12, dt, &dev).unwrap();
        check(&mask.t().unwrap(), "mask transpose");
        let row = ferrofold::kernels::uniform_tensor(&[1, 9, 1], 1.0, 13, dt, &dev).unwrap();
        check(&row.broadcast_as((5, 9, 3)).unwrap(), "broadcast");
        let wide = ferrofold::kernels::uniform_tensor(&[7, 30], 1.0, 14, dt, &dev).unwrap();
        check(
            &wide.t().unwrap().narrow(0, 1, 29).unwrap(),
            "transposed narrow",
        );
        // A column broadcast along rows: no unit-stride dim at all (scalar gather).
        let col = wide.narrow(1, 3, 1).unwrap().broadcast_as((7, 4)).unwrap();
        let k = check(&col, "broadcast column");
        assert_eq!(k, Some(Kernel::Gather));
    }
}

/// 64-bit index arithmetic: a view of more than 2^31 words (odd rows: 2-byte words, gather).
#[test]
fn wide_index_gather_matches_candle() {
    let Some(dev) = cuda() else { return };
    // [2, 32768, 32771] bf16 (4.3 GB), swap of the two outer dims.
    let base = Tensor::rand(0f32, 1.0, (2, 32768, 32771), &dev)
        .unwrap()
        .to_dtype(DType::BF16)
        .unwrap();
    let v = base.transpose(0, 1).unwrap();
    let pl = permute::plan(v.dims(), v.layout().stride(), v.layout().start_offset(), 2).unwrap();
    assert!(pl.wide && pl.kernel == Kernel::Gather, "{pl:?}");
    let got = contiguous(&v).unwrap();
    let want = v.contiguous().unwrap();
    let bad = got
        .ne(&want)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert_eq!(bad, 0.0);
}

/// Inside autograd: an f32 parameter, cast to bf16 (and f32 itself), permuted, copied by the
/// kernel, then used: the parameter gets the same gradient as through candle's copy, and the
/// forward values are equal.
#[test]
fn gradient_flows_through_the_op() {
    let Some(dev) = cuda() else { return };
    for dt in [DType::F32, DType::BF16] {
        let w = Var::from_tensor(
            &ferrofold::kernels::uniform_tensor(&[6, 10, 16], 1.0, 21, DType::F32, &dev).unwrap(),
        )
        .unwrap();
        let cot =
            ferrofold::kernels::uniform_tensor(&[10, 16, 6], 1.0, 22, DType::F32, &dev).unwrap();
        let run = |fast: bool| -> (Tensor, Tensor) {
            let x = w.as_tensor().to_dtype(dt).unwrap();
            let x = (x * 1.5).unwrap(); // an op upstream of the copy
            let v = x.permute((1, 2, 0)).unwrap();
            let y = if fast {
                assert!(kernel_applies(&v));
                contiguous(&v).unwrap()
            } else {
                v.contiguous().unwrap()
            };
            let y = y
                .to_dtype(DType::F32)
                .unwrap()
                .reshape((10, 16, 6))
                .unwrap();
            let loss = (&y * &cot).unwrap().sqr().unwrap().sum_all().unwrap();
            let g = loss.backward().unwrap();
            let gw = g
                .get(w.as_tensor())
                .expect("parameter has a gradient")
                .clone();
            (y, gw)
        };
        let (yf, gf) = run(true);
        let (yc, gc) = run(false);
        assert!(bits(&yf) == bits(&yc), "{dt:?} forward");
        assert!(bits(&gf) == bits(&gc), "{dt:?} gradient");
        let n = gf
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(n > 0.0);
    }
}

/// The module's own self-check (the cases `bench elem-kernels` runs).
#[test]
fn self_check_passes() {
    let Some(dev) = cuda() else { return };
    for c in permute::self_check(&dev).unwrap() {
        assert!(c.ok(), "{c:?}");
    }
}

/// `cat_cols`: attention head views, contiguous, transposed, narrowed (odd offset) and
/// non-splittable parts side by side, bitwise equal to candle's contiguous + cat; a part that
/// records a graph takes candle's path and keeps the gradient.
#[test]
fn cat_cols_matches_candle_bitwise() {
    let Some(dev) = cuda() else { return };
    let u = |d: &[usize], s: u64, dt: DType| {
        ferrofold::kernels::uniform_tensor(d, 1.0, s, dt, &dev).unwrap()
    };
    for dt in DTYPES {
        for (b, n, h, c) in [
            (2usize, 5usize, 4usize, 8usize),
            (3, 17, 3, 7),
            (1, 64, 8, 32),
        ] {
            let rows = b * n;
            let hv = |s| {
                u(&[b * h, n, c], s, dt)
                    .reshape((b, h, n, c))
                    .unwrap()
                    .transpose(1, 2)
                    .unwrap()
            };
            let parts = vec![
                hv(1),
                hv(2),
                u(&[rows, 5], 3, dt),
                u(&[3, rows], 4, dt).t().unwrap(),
                u(&[rows, 9], 5, dt).narrow(1, 1, 7).unwrap(),
                // [rows·2, 3] transposed: trailing dims do not split at the width 6.
                u(&[3, rows * 2], 6, dt).t().unwrap(),
                hv(7),
            ];
            let got = cat_cols(&parts, rows).unwrap();
            let want = cat_cols_twin(&parts, rows).unwrap();
            assert_eq!(got.dims(), want.dims());
            assert!(bits(&got) == bits(&want), "{dt:?} {b} {n} {h} {c}");
        }
    }
    // Autograd: a tracked part falls back to candle's cat (gradient kept).
    let w = Var::from_tensor(&u(&[4, 6], 9, DType::F32)).unwrap();
    let other = u(&[4, 6], 10, DType::F32);
    let y = cat_cols(&[w.as_tensor().t().unwrap(), other.t().unwrap()], 6).unwrap();
    assert_eq!(y.dims(), &[6, 8]);
    let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
    let gw = g.get(w.as_tensor()).expect("gradient");
    assert!(bits(gw) == bits(&(w.as_tensor() * 2.0).unwrap()));
}
