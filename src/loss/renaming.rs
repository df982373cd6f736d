//! Renaming of symmetric ground-truth atoms (AF2 supplement Algorithm 26, section 1.8.5; OpenFold
//! `compute_renamed_ground_truth`).

use candle_core::{Tensor, D};

use super::check_trailing;
use crate::error::Result;

/// Result of Algorithm 26.
#[derive(Debug, Clone)]
pub struct RenamedGroundTruth {
    /// [*, N]: 1 where the alternative (swapped) naming fits the prediction strictly better.
    pub alt_naming_is_better: Tensor,
    /// [*, N, 14, 3]
    pub renamed_atom14_gt_positions: Tensor,
    /// [*, N, 14]
    pub renamed_atom14_gt_exists: Tensor,
}

/// Algorithm 26. For each residue i the score `Σ mask·sqrt(eps + (d_pred − d_gt)²)` runs over
/// (ambiguous existing atom a of i, non-ambiguous existing atom b of any residue j), with distances
/// `sqrt(eps + |Δ|²)`; the alternative naming is chosen where its score is strictly lower.
/// Inputs are atom14: positions [*, N, 14, 3], masks [*, N, 14]. Piecewise constant: no gradient.
#[allow(clippy::too_many_arguments)]
pub fn compute_renamed_ground_truth(
    atom14_gt_positions: &Tensor,
    atom14_alt_gt_positions: &Tensor,
    atom14_atom_is_ambiguous: &Tensor,
    atom14_gt_exists: &Tensor,
    atom14_alt_gt_exists: &Tensor,
    atom14_pred_positions: &Tensor,
    eps: f64,
) -> Result<RenamedGroundTruth> {
    check_trailing(
        atom14_pred_positions,
        &[14, 3],
        "atom14 predicted positions",
    )?;
    let dtype = atom14_pred_positions.dtype();
    let dims = atom14_pred_positions.dims().to_vec();
    let nd = dims.len();
    let n = dims[nd - 3];
    let mut flat = dims[..nd - 3].to_vec();
    flat.extend([n * 14, 3]);
    let mut flat_mask = dims[..nd - 3].to_vec();
    flat_mask.push(n * 14);
    let gt = atom14_gt_positions.to_dtype(dtype)?;
    let alt_gt = atom14_alt_gt_positions.to_dtype(dtype)?;
    let exists = atom14_gt_exists.to_dtype(dtype)?;
    let alt_exists = atom14_alt_gt_exists.to_dtype(dtype)?;
    let amb = atom14_atom_is_ambiguous.to_dtype(dtype)?;

    let d = |x: &Tensor| -> Result<Tensor> {
        super::lddt::dmat(&x.detach().reshape(flat.clone())?, eps)
    };
    let d_pred = d(atom14_pred_positions)?; // [*, M, M]
    let d_gt = d(&gt)?;
    let d_alt = d(&alt_gt)?;
    let err = |dd: &Tensor| -> Result<Tensor> { Ok(((&d_pred - dd)?.sqr()? + eps)?.sqrt()?) };
    let l_gt = err(&d_gt)?;
    let l_alt = err(&d_alt)?;
    let row = (&exists * &amb)?
        .reshape(flat_mask.clone())?
        .unsqueeze(D::Minus1)?; // [*, M, 1]
    let col = (&exists * (amb.neg()? + 1.0)?)?
        .reshape(flat_mask.clone())?
        .unsqueeze(D::Minus2)?; // [*, 1, M]
    let mask = row.broadcast_mul(&col)?;
    let mut per_atom = dims[..nd - 3].to_vec();
    per_atom.extend([n, 14]);
    let per_res = |l: &Tensor| -> Result<Tensor> {
        Ok((l * &mask)?
            .sum(D::Minus1)?
            .reshape(per_atom.clone())?
            .sum(D::Minus1)?)
    };
    let s_gt = per_res(&l_gt)?;
    let s_alt = per_res(&l_alt)?;
    let better = s_alt.lt(&s_gt)?.to_dtype(dtype)?; // [*, N]
    let b3 = better.unsqueeze(D::Minus1)?.unsqueeze(D::Minus1)?;
    let nb3 = (b3.neg()? + 1.0)?;
    let positions = (gt.broadcast_mul(&nb3)? + alt_gt.broadcast_mul(&b3)?)?;
    let b2 = better.unsqueeze(D::Minus1)?;
    let nb2 = (b2.neg()? + 1.0)?;
    let exists_out = (exists.broadcast_mul(&nb2)? + alt_exists.broadcast_mul(&b2)?)?;
    Ok(RenamedGroundTruth {
        alt_naming_is_better: better,
        renamed_atom14_gt_positions: positions,
        renamed_atom14_gt_exists: exists_out,
    })
}
