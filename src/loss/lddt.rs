//! lDDT-Cα (Mariani et al. 2013, as simplified in AF2), the pLDDT loss (AF2 supplement Algorithm 29,
//! section 1.9.6; OpenFold `lddt_loss`) and `compute_plddt`.

use candle_core::{Tensor, D};

use super::{check_trailing, in_range, softmax_cross_entropy};
use crate::error::Result;

/// Atom37 index of Cα.
pub const CA_ATOM37: usize = 1;

/// Pairwise distances `sqrt(eps + |x_i − x_j|²)`: `[*, N, 3]` → `[*, N, N]`.
pub(crate) fn dmat(x: &Tensor, eps: f64) -> Result<Tensor> {
    Ok((x
        .unsqueeze(D::Minus2)?
        .broadcast_sub(&x.unsqueeze(D::Minus(3))?)?
        .sqr()?
        .sum(D::Minus1)?
        + eps)?
        .sqrt()?)
}

/// OpenFold `lddt` (no gradient: the score is piecewise constant). `pred`, `true_pos` `[*, N, 3]`,
/// `mask` `[*, N, 1]`. Pairs scored where `d_true < cutoff`, both masked in, `i ≠ j`;
/// score = 0.25·Σ_{t∈{.5,1,2,4}} [|d_true − d_pred| < t];
/// result = `(1/(eps + Σ w)) · (eps + Σ w·score)` per residue (`[*, N]`) or global (`[*]`).
pub fn lddt(
    pred: &Tensor,
    true_pos: &Tensor,
    mask: &Tensor,
    cutoff: f64,
    eps: f64,
    per_residue: bool,
) -> Result<Tensor> {
    check_trailing(pred, &[3], "lddt predicted positions")?;
    check_trailing(mask, &[1], "lddt mask")?;
    let (pred, true_pos, mask) = (pred.detach(), true_pos.detach(), mask.detach());
    let dtype = pred.dtype();
    let n = pred.dim(D::Minus2)?;
    let d_true = dmat(&true_pos, eps)?;
    let d_pred = dmat(&pred, eps)?;
    let off_diag = (Tensor::eye(n, dtype, pred.device())?.neg()? + 1.0)?;
    let to_score = d_true
        .lt(cutoff)?
        .to_dtype(dtype)?
        .broadcast_mul(&mask)?
        .broadcast_mul(&mask.transpose(D::Minus2, D::Minus1)?)?
        .broadcast_mul(&off_diag)?;
    let l1 = (d_true - d_pred)?.abs()?;
    let mut score = l1.lt(0.5)?.to_dtype(dtype)?;
    for t in [1.0, 2.0, 4.0] {
        score = (score + l1.lt(t)?.to_dtype(dtype)?)?;
    }
    let score = (score * 0.25)?;
    let dims: &[usize] = if per_residue {
        &[to_score.rank() - 1]
    } else {
        &[to_score.rank() - 2, to_score.rank() - 1]
    };
    let norm = (to_score.sum(dims)? + eps)?.recip()?;
    Ok((norm * ((to_score * score)?.sum(dims)? + eps)?)?)
}

/// OpenFold `lddt_ca`: lDDT over the Cα atoms of atom37 inputs (`[*, N, 37, 3]`, mask `[*, N, 37]`).
pub fn lddt_ca(
    all_atom_pred_pos: &Tensor,
    all_atom_positions: &Tensor,
    all_atom_mask: &Tensor,
    cutoff: f64,
    eps: f64,
    per_residue: bool,
) -> Result<Tensor> {
    let (p, t, m) = ca_only(all_atom_pred_pos, all_atom_positions, all_atom_mask)?;
    lddt(&p, &t, &m, cutoff, eps, per_residue)
}

fn ca_only(pred: &Tensor, true_pos: &Tensor, mask: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
    check_trailing(pred, &[37, 3], "atom37 predicted positions")?;
    check_trailing(true_pos, &[37, 3], "atom37 positions")?;
    check_trailing(mask, &[37], "atom37 mask")?;
    let p = pred.narrow(D::Minus2, CA_ATOM37, 1)?.squeeze(D::Minus2)?;
    let t = true_pos
        .narrow(D::Minus2, CA_ATOM37, 1)?
        .squeeze(D::Minus2)?;
    let m = mask.narrow(D::Minus1, CA_ATOM37, 1)?; // keep dim: [*, N, 1]
    Ok((p, t, m))
}

/// Algorithm 29 (pLDDT head loss), OpenFold `lddt_loss`. `logits` `[*, N, no_bins]`,
/// `all_atom_pred_pos`/`all_atom_positions` `[*, N, 37, 3]`, `all_atom_mask` `[*, N, 37]`,
/// `resolution` `[*]`. The per-residue Cα lDDT of the (detached) prediction is binned
/// (`min(floor(score·no_bins), no_bins−1)`), cross-entropy against the logits, masked mean over the
/// Cα mask with `eps`, times the resolution filter, mean over batch → scalar.
/// `eps` serves both the lDDT and the mean (OpenFold passes the config eps, 1e-8, to both).
#[allow(clippy::too_many_arguments)]
pub fn lddt_loss(
    logits: &Tensor,
    all_atom_pred_pos: &Tensor,
    all_atom_positions: &Tensor,
    all_atom_mask: &Tensor,
    resolution: &Tensor,
    cutoff: f64,
    no_bins: usize,
    min_resolution: f64,
    max_resolution: f64,
    eps: f64,
) -> Result<Tensor> {
    check_trailing(logits, &[no_bins], "lddt logits")?;
    let dtype = logits.dtype();
    let (p, t, m) = ca_only(all_atom_pred_pos, all_atom_positions, all_atom_mask)?;
    // [*, N]
    let score = lddt(&p, &t, &m, cutoff, eps, true)?;
    // nan_to_num(nan = nanmean), clamp at 0, bin: on the device, no gradient (no host round
    // trip, so the step can be captured in a CUDA graph). `v == v` is false exactly for NaN.
    let score = score.detach();
    let not_nan = score.eq(&score)?; // [*, N] u8
    let zeros = score.zeros_like()?;
    let finite_sum = not_nan.where_cond(&score, &zeros)?.sum_all()?;
    let finite_count = not_nan.to_dtype(score.dtype())?.sum_all()?;
    let nanmean = (finite_sum / finite_count)?; // NaN when every score is NaN
    let scaled = (&score * no_bins as f64)?;
    let filled = not_nan.where_cond(
        &scaled,
        &(nanmean * no_bins as f64)?.broadcast_as(scaled.shape())?,
    )?;
    // clamp(v, 0, no_bins-1) then floor = min(floor(max(v, 0)), no_bins-1) for integer bounds.
    let bin = filled.clamp(0f64, (no_bins - 1) as f64)?.floor()?;
    let classes = Tensor::arange(0u32, no_bins as u32, logits.device())?.to_dtype(bin.dtype())?;
    let labels = bin
        .unsqueeze(D::Minus1)?
        .broadcast_eq(&classes)?
        .to_dtype(dtype)?; // [*, N, no_bins]
    let errors = softmax_cross_entropy(logits, &labels)?; // [*, N]
    let mask = m.squeeze(D::Minus1)?.to_dtype(dtype)?;
    let loss = ((errors * &mask)?.sum(D::Minus1)? / (mask.sum(D::Minus1)? + eps)?)?;
    let loss = loss.broadcast_mul(&in_range(resolution, min_resolution, max_resolution)?)?;
    Ok(loss.mean_all()?)
}

/// pLDDT bin centres `torch.arange(0.5/nb, 1.0, 1/nb)` as float32 values (widened to f64).
// F32 QUIRK: OpenFold builds them in torch's default dtype (float32) even in a float64 run. torch's
// CPU arange kernel (AVX2 build) fills blocks of 2x8 lanes: each 8-lane vector starts at
// `f32(start + step·i0)` (double arithmetic) and lane l is `f32(base + l·step)`; the tail that does
// not fill 16 values uses `f32(start + step·i)`. This reproduces the fixture bitwise (checked per bin
// against the golden gradient), where plain `f32(start + step·i)` differs by 1 ulp in 13 of 50 bins.
pub fn plddt_bin_centres(no_bins: usize) -> Vec<f64> {
    const LANES: usize = 8;
    let width = 1.0 / no_bins as f64;
    let start = 0.5 * width;
    let scalar = |i: usize| (start + width * i as f64) as f32 as f64;
    let mut v: Vec<f64> = (0..no_bins).map(scalar).collect();
    let mut i = 0;
    while i + 2 * LANES <= no_bins {
        for block in [i, i + LANES] {
            let base = scalar(block);
            for lane in 0..LANES {
                v[block + lane] = (base + lane as f64 * width) as f32 as f64;
            }
        }
        i += 2 * LANES;
    }
    v
}

/// OpenFold `compute_plddt`: `100 · Σ softmax(logits)·bin_centres` over the last dim: `[*, nb]` → `[*]`.
pub fn compute_plddt(logits: &Tensor) -> Result<Tensor> {
    let nb = logits.dim(D::Minus1)?;
    let centres = Tensor::new(plddt_bin_centres(nb), logits.device())?.to_dtype(logits.dtype())?;
    let probs = candle_nn::ops::softmax(logits, D::Minus1)?;
    Ok((probs.broadcast_mul(&centres)?.sum(D::Minus1)? * 100.0)?)
}
