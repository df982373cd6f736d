//! Renaming of symmetric ground-truth atoms (AF2 supplement Algorithm 26, section 1.8.5; OpenFold
//! `compute_renamed_ground_truth`).

use candle_core::{DType, Tensor, D};

use super::check_trailing;
use crate::error::Result;

/// Result of Algorithm 26.
#[derive(Debug, Clone)]
pub struct RenamedGroundTruth {
    /// `[*, N]`: 1 where the alternative (swapped) naming fits the prediction strictly better.
    pub alt_naming_is_better: Tensor,
    /// `[*, N, 14, 3]`
    pub renamed_atom14_gt_positions: Tensor,
    /// `[*, N, 14]`
    pub renamed_atom14_gt_exists: Tensor,
}

/// Algorithm 26. For each residue i the score `Σ mask·sqrt(eps + (d_pred − d_gt)²)` runs over
/// (ambiguous existing atom a of i, non-ambiguous existing atom b of any residue j), with distances
/// `sqrt(eps + |Δ|²)`; the alternative naming is chosen where its score is strictly lower.
/// Inputs are atom14: positions `[*, N, 14, 3]`, masks `[*, N, 14]`. Piecewise constant: no gradient.
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

    let row_mask = (&exists * &amb)?.reshape(flat_mask.clone())?; // [*, M]
    let col_mask = (&exists * (amb.neg()? + 1.0)?)?.reshape(flat_mask.clone())?; // [*, M]
    let flat_pos = |x: &Tensor| -> Result<Tensor> { Ok(x.detach().reshape(flat.clone())?) };
    let (pred_f, gt_f, alt_f) = (
        flat_pos(atom14_pred_positions)?,
        flat_pos(&gt)?,
        flat_pos(&alt_gt)?,
    );
    let mut per_atom = dims[..nd - 3].to_vec();
    per_atom.extend([n, 14]);
    // The sparse form reads the mask back to the host (data-dependent shapes): CPU only. On a GPU
    // the dense form is cheap and needs no host synchronisation (CUDA-graph capture).
    let (s_gt, s_alt) = if nd == 3 && atom14_pred_positions.device().is_cpu() {
        // Only rows of ambiguous existing atoms contribute: evaluate those rows only
        // ([A, M] instead of [M, M]); rows are summed in the same order, and the skipped rows
        // are exact zeros, so the scores equal the dense evaluation bitwise.
        let rows: Vec<f64> = row_mask.to_dtype(DType::F64)?.to_vec1()?;
        let idx: Vec<u32> = rows
            .iter()
            .enumerate()
            .filter(|(_, v)| **v != 0.0)
            .map(|(i, _)| i as u32)
            .collect();
        let zeros = Tensor::zeros(n, dtype, atom14_pred_positions.device())?;
        if idx.is_empty() {
            (zeros.clone(), zeros)
        } else {
            let idx = Tensor::new(idx, atom14_pred_positions.device())?;
            let d = |x: &Tensor| -> Result<Tensor> {
                let sel = x.index_select(&idx, 0)?; // [A, 3]
                Ok((sel
                    .unsqueeze(1)?
                    .broadcast_sub(&x.unsqueeze(0)?)?
                    .sqr()?
                    .sum(D::Minus1)?
                    + eps)?
                    .sqrt()?) // [A, M]
            };
            let d_pred = d(&pred_f)?;
            let mask = row_mask
                .index_select(&idx, 0)?
                .unsqueeze(1)?
                .broadcast_mul(&col_mask.unsqueeze(0)?)?; // [A, M]
            let score = |x: &Tensor| -> Result<Tensor> {
                let l = ((&d_pred - d(x)?)?.sqr()? + eps)?.sqrt()?;
                let per_row = (l * &mask)?.sum(D::Minus1)?; // [A]
                let per_atom_sum =
                    Tensor::zeros(n * 14, dtype, x.device())?.index_add(&idx, &per_row, 0)?;
                Ok(per_atom_sum.reshape((n, 14))?.sum(D::Minus1)?)
            };
            (score(&gt_f)?, score(&alt_f)?)
        }
    } else {
        let d = |x: &Tensor| super::lddt::dmat(x, eps);
        let d_pred = d(&pred_f)?; // [*, M, M]
        let mask = row_mask
            .unsqueeze(D::Minus1)?
            .broadcast_mul(&col_mask.unsqueeze(D::Minus2)?)?;
        let score = |x: &Tensor| -> Result<Tensor> {
            let l = ((&d_pred - d(x)?)?.sqr()? + eps)?.sqrt()?;
            Ok((l * &mask)?
                .sum(D::Minus1)?
                .reshape(per_atom.clone())?
                .sum(D::Minus1)?)
        };
        (score(&gt_f)?, score(&alt_f)?)
    };
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
