//! Distogram loss (AF2 supplement section 1.9.8; OpenFold `distogram_loss`).

use candle_core::{DType, Tensor, D};

use super::{check_trailing, one_hot, softmax_cross_entropy};
use crate::error::{Error, Result};

/// `torch.linspace(start, end, steps)` in float32 as torch's CPU kernel (AVX2 build) computes it:
/// `step = (end − start)/(steps − 1)` in f32; blocks of 2x8 lanes whose 8-lane vectors start at
/// `start + step·i0` (if `i0 < steps/2`) or `end − step·(steps − 1 − i0)` and add `lane·step`; the
/// tail that does not fill 16 values uses the scalar rule (`start + step·i` below half, else
/// `end − step·(steps − 1 − i)`). All arithmetic in f32.
// F32 QUIRK: OpenFold builds the distogram boundaries in torch's default dtype (float32) even in a
// float64 run. The lane structure mirrors the pLDDT `arange` case, which the fixture pins down
// bitwise; here it only matters for squared distances within an f32 ulp of a boundary.
pub fn linspace_f32(start: f64, end: f64, steps: usize) -> Vec<f32> {
    const LANES: usize = 8;
    let (s, e) = (start as f32, end as f32);
    if steps < 2 {
        return vec![s; steps];
    }
    let step = (e - s) / (steps - 1) as f32;
    let half = steps / 2;
    let scalar = |i: usize| {
        if i < half {
            s + step * i as f32
        } else {
            e - step * (steps - 1 - i) as f32
        }
    };
    let mut v: Vec<f32> = (0..steps).map(scalar).collect();
    let mut i = 0;
    while i + 2 * LANES <= steps {
        for block in [i, i + LANES] {
            let base = scalar(block);
            for lane in 0..LANES {
                v[block + lane] = base + lane as f32 * step;
            }
        }
        i += 2 * LANES;
    }
    v
}

/// Distogram loss: `logits` `[*, N, N, no_bins]`, `pseudo_beta` `[*, N, 3]`, `pseudo_beta_mask` `[*, N]`.
///
/// True bin = number of squared float32 boundaries (`linspace(min_bin, max_bin, no_bins − 1)²`,
/// squared in f32) strictly below the squared Cβ distance; cross entropy against the logits;
/// `Σ_j (err·mask) / (eps + Σ mask)` then `Σ_i` (FP16-friendly order); mean over batch → scalar.
/// No gradient flows to `pseudo_beta` (the bin assignment is piecewise constant).
pub fn distogram_loss(
    logits: &Tensor,
    pseudo_beta: &Tensor,
    pseudo_beta_mask: &Tensor,
    min_bin: f64,
    max_bin: f64,
    no_bins: usize,
    eps: f64,
) -> Result<Tensor> {
    check_trailing(logits, &[no_bins], "distogram logits")?;
    check_trailing(pseudo_beta, &[3], "pseudo_beta")?;
    if no_bins < 2 {
        return Err(Error::Loss(format!("distogram no_bins {no_bins} < 2")));
    }
    let dtype = logits.dtype();
    let dev = logits.device();
    let bounds: Vec<f64> = linspace_f32(min_bin, max_bin, no_bins - 1)
        .into_iter()
        .map(|b| (b * b) as f64)
        .collect();
    let bounds = Tensor::new(bounds, dev)?.to_dtype(dtype)?; // exact: f32 values
    let pb = pseudo_beta.detach();
    let d2 = pb
        .unsqueeze(D::Minus2)?
        .broadcast_sub(&pb.unsqueeze(D::Minus(3))?)?
        .sqr()?
        .sum_keepdim(D::Minus1)?; // [*, N, N, 1]
    let true_bins = d2
        .broadcast_gt(&bounds)?
        .to_dtype(DType::I64)?
        .sum(D::Minus1)?; // [*, N, N]
    let labels = one_hot(&true_bins, no_bins, dtype)?;
    let errors = softmax_cross_entropy(logits, &labels)?; // [*, N, N]
    let square = pseudo_beta_mask
        .unsqueeze(D::Minus1)?
        .broadcast_mul(&pseudo_beta_mask.unsqueeze(D::Minus2)?)?;
    let denom = (square.sum((D::Minus2, D::Minus1))? + eps)?.unsqueeze(D::Minus1)?; // [*, 1]
    let mean = (errors * square)?
        .sum(D::Minus1)?
        .broadcast_div(&denom)?
        .sum(D::Minus1)?;
    Ok(mean.mean_all()?)
}
