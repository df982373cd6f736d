//! Side-chain torsion losses: the supervised chi loss (AF2 supplement Algorithm 27, section 1.9.1;
//! OpenFold `supervised_chi_loss`) and OpenFold's stand-alone `torsion_angle_loss`.

use candle_core::{Tensor, D};

use super::{check_trailing, masked_mean, MASKED_MEAN_EPS};
use crate::error::{Error, Result};

/// Algorithm 27 (torsionAngleLoss) as OpenFold's `supervised_chi_loss`.
///
/// `angles_sin_cos` / `unnormalized_angles_sin_cos` `[L, *, N, 7, 2]` (all SM layers; only the chi
/// part `[..., 3:, :]` of the normalised angles is supervised), `aatype` `[*, N]` (integers 0..=20),
/// `seq_mask` `[*, N]`, `chi_mask` `[*, N, 4]`, `chi_angles_sin_cos` `[*, N, 4, 2]`,
/// `chi_pi_periodic` `[21, 4]` (0/1 table from residue constants).
///
/// `chi_weight · masked_mean(chi_mask, min(|true − pred|², |shifted true − pred|²))` over
/// (layers, residues, chis), where π-periodic chis compare with `−true` too, plus
/// `angle_norm_weight · masked_mean(seq_mask, |sqrt(Σ un² + eps) − 1|)` over (layers, residues, 7
/// angles). `masked_mean` uses eps 1e-4. Mean over batch dims → scalar.
#[allow(clippy::too_many_arguments)]
pub fn supervised_chi_loss(
    angles_sin_cos: &Tensor,
    unnormalized_angles_sin_cos: &Tensor,
    aatype: &Tensor,
    seq_mask: &Tensor,
    chi_mask: &Tensor,
    chi_angles_sin_cos: &Tensor,
    chi_pi_periodic: &Tensor,
    chi_weight: f64,
    angle_norm_weight: f64,
    eps: f64,
) -> Result<Tensor> {
    check_trailing(angles_sin_cos, &[7, 2], "angles_sin_cos")?;
    check_trailing(chi_pi_periodic, &[4], "chi_pi_periodic")?;
    let dtype = angles_sin_cos.dtype();
    let nd = angles_sin_cos.rank();
    let pred = angles_sin_cos.narrow(nd - 2, 3, 4)?; // [L, *, N, 4, 2]
    let aa_flat = aatype.flatten_all()?.to_dtype(candle_core::DType::I64)?;
    let periodic = chi_pi_periodic
        .to_dtype(dtype)?
        .index_select(&aa_flat, 0)?
        .reshape(chi_mask.shape())?; // [*, N, 4]
    let true_chi = chi_angles_sin_cos.unsqueeze(0)?; // [1, *, N, 4, 2]
                                                     // shift = 1 − 2·periodic ∈ {1, −1}
    let shift = ((periodic * -2.0)? + 1.0)?.unsqueeze(D::Minus1)?; // [*, N, 4, 1]
    let true_shifted = true_chi.broadcast_mul(&shift)?;
    let sq = true_chi.broadcast_sub(&pred)?.sqr()?.sum(D::Minus1)?; // [L, *, N, 4]
    let sq_shifted = true_shifted.broadcast_sub(&pred)?.sqr()?.sum(D::Minus1)?;
    let sq = sq.minimum(&sq_shifted)?;
    let r = sq.rank();
    // masked mean over (layers, residues, chis), keeping batch dims
    let dims = [0, r - 2, r - 1];
    let chi_loss = masked_mean(&chi_mask.unsqueeze(0)?, &sq, &dims, MASKED_MEAN_EPS)?;
    let loss = (chi_loss * chi_weight)?;

    let angle_norm = (unnormalized_angles_sin_cos.sqr()?.sum(D::Minus1)? + eps)?.sqrt()?; // [L,*,N,7]
    let norm_error = (angle_norm - 1.0)?.abs()?;
    let sm = seq_mask.unsqueeze(0)?.unsqueeze(D::Minus1)?; // [1, *, N, 1]
    let norm_loss = masked_mean(&sm, &norm_error, &dims, MASKED_MEAN_EPS)?;
    let loss = (loss + (norm_loss * angle_norm_weight)?)?;
    Ok(loss.mean_all()?)
}

/// OpenFold `torsion_angle_loss(a, a_gt, a_alt_gt)` (Algorithm 27 lines 2–3, 5 with a fixed
/// angle-norm weight 0.02): `a` `[*, N, 7, 2]` unnormalised predictions, `a_gt`, `a_alt_gt` `[*, N, 7, 2]`.
/// `mean(min(|â − a_gt|², |â − a_alt|²)) + 0.02·mean(| |a| − 1 |)` over (N, 7) → `[*]`.
pub fn torsion_angle_loss(a: &Tensor, a_gt: &Tensor, a_alt_gt: &Tensor) -> Result<Tensor> {
    check_trailing(a, &[7, 2], "torsion angles")?;
    if a.dims() != a_gt.dims() || a.dims() != a_alt_gt.dims() {
        return Err(Error::Loss(format!(
            "torsion_angle_loss: shapes differ: {:?} {:?} {:?}",
            a.dims(),
            a_gt.dims(),
            a_alt_gt.dims()
        )));
    }
    let norm = a.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?; // [*, N, 7, 1]
    let a_hat = a.broadcast_div(&norm)?;
    // |â − a_gt|² directly (torch squares the norm; equal up to rounding, and no NaN grad at 0)
    let d_gt = (&a_hat - a_gt)?.sqr()?.sum(D::Minus1)?;
    let d_alt = (&a_hat - a_alt_gt)?.sqr()?.sum(D::Minus1)?;
    let min_diff = d_gt.minimum(&d_alt)?; // [*, N, 7]
    let l_torsion = min_diff.mean((D::Minus2, D::Minus1))?;
    let l_norm = (norm.squeeze(D::Minus1)? - 1.0)?
        .abs()?
        .mean((D::Minus2, D::Minus1))?;
    Ok((l_torsion + (l_norm * 0.02)?)?)
}
