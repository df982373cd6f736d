//! Frame aligned point error (AF2 supplement Algorithm 28) and the backbone / side-chain FAPE terms
//! of section 1.9.2 (OpenFold `compute_fape`, `backbone_loss`, `sidechain_loss`).
//!
//! Frames are passed as rotation matrices `[*, F, 3, 3]` and translations `[*, F, 3]`; the inverse
//! transform `x_local = Rᵀ(x − t)` is written here in tensor ops (no dependency on a `Rigid` type).

use candle_core::{Tensor, D};

use super::check_trailing;
use crate::error::{Error, Result};

/// Every point in every frame, coordinate-major: `out[*, f, i, p] = (R_fᵀ x_p − R_fᵀ t_f)_i`
/// (OpenFold's `invert().apply()` order). `rots` `[*, F, 3, 3]`, `trans` `[*, F, 3]`, `points` `[*, P, 3]`
/// → `[*, F, 3, P]`. One GEMM `[F·3, 3] x [3, P]` per batch element (no `[F, P, 3]` difference tensor).
fn local_coords(rots: &Tensor, trans: &Tensor, points: &Tensor) -> Result<Tensor> {
    check_trailing(rots, &[3, 3], "frame rotations")?;
    check_trailing(trans, &[3], "frame translations")?;
    check_trailing(points, &[3], "points")?;
    let rd = rots.dims();
    let nd = rd.len();
    let batch = rd[..nd - 3].to_vec();
    let f = rd[nd - 3];
    let p = points.dim(D::Minus2)?;
    let b: usize = batch.iter().product();
    if trans.dims()[..trans.rank() - 1] != rd[..nd - 2]
        || points.dims()[..points.rank() - 2] != batch[..]
    {
        return Err(Error::Loss(format!(
            "frames/points shapes disagree: rots {:?}, trans {:?}, points {:?}",
            rd,
            trans.dims(),
            points.dims()
        )));
    }
    // Rᵀ rows: rt[f·3 + i, j] = R[f, j, i]
    let rt = rots
        .transpose(D::Minus2, D::Minus1)?
        .contiguous()?
        .reshape((b, f * 3, 3))?;
    let xt = points.reshape((b, p, 3))?.transpose(1, 2)?.contiguous()?; // [b, 3, P]
    let rx = rt.matmul(&xt)?.reshape((b, f, 3, p))?; // Rᵀx
                                                     // Rᵀt: (Rᵀt)_i = Σ_j R_ji t_j
    let rtt = rots
        .reshape((b, f, 3, 3))?
        .broadcast_mul(&trans.reshape((b, f, 3, 1))?)?
        .sum(2)?; // [b, F, 3]
    let local = rx.broadcast_sub(&rtt.unsqueeze(3)?)?;
    let mut shape = batch;
    shape.extend([f, 3, p]);
    Ok(local.reshape(shape)?)
}

/// Express every point in every frame: `out[*, f, p] = R_fᵀ (x_p − t_f)`.
/// `rots` `[*, F, 3, 3]`, `trans` `[*, F, 3]`, `points` `[*, P, 3]` → `[*, F, P, 3]`.
pub fn invert_apply_all(rots: &Tensor, trans: &Tensor, points: &Tensor) -> Result<Tensor> {
    let local = local_coords(rots, trans, points)?;
    let r = local.rank();
    Ok(local.transpose(r - 2, r - 1)?.contiguous()?)
}

/// Algorithm 28 (computeFAPE), OpenFold `compute_fape`.
///
/// `pred_rots`/`target_rots` `[*, F, 3, 3]`, `pred_trans`/`target_trans` `[*, F, 3]`, `frames_mask` `[*, F]`,
/// `pred_pos`/`target_pos` `[*, P, 3]`, `pos_mask` `[*, P]`, `pair_mask` `[*, F, P]`. Returns `[*]`.
///
/// `d = sqrt(|T_pred⁻¹x_pred − T_true⁻¹x_true|² + eps)`, clamped to `[0, clamp]` if given, divided by
/// `length_scale` and masked. Without a pair mask: sum over points, `/ (eps + Σ frames_mask)`, sum
/// over frames, `/ (eps + Σ pos_mask)` (OpenFold's FP16-friendly order); with one:
/// `Σ / (eps + Σ frames_mask·pos_mask·pair_mask)`.
#[allow(clippy::too_many_arguments)]
pub fn compute_fape(
    pred_rots: &Tensor,
    pred_trans: &Tensor,
    target_rots: &Tensor,
    target_trans: &Tensor,
    frames_mask: &Tensor,
    pred_pos: &Tensor,
    target_pos: &Tensor,
    pos_mask: &Tensor,
    length_scale: f64,
    clamp: Option<f64>,
    pair_mask: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    let local_pred = local_coords(pred_rots, pred_trans, pred_pos)?; // [*, F, 3, P]
    let local_target = local_coords(target_rots, target_trans, target_pos)?;
    let err = ((local_pred - local_target)?.sqr()?.sum(D::Minus2)? + eps)?.sqrt()?; // [*, F, P]
    let err = match clamp {
        Some(c) => err.clamp(0.0, c)?,
        None => err,
    };
    let normed = (err / length_scale)?;
    let fm = frames_mask.unsqueeze(D::Minus1)?; // [*, F, 1]
    let pm = pos_mask.unsqueeze(D::Minus2)?; // [*, 1, P]
    let normed = normed.broadcast_mul(&fm)?.broadcast_mul(&pm)?;
    match pair_mask {
        Some(pair) => {
            let normed = normed.broadcast_mul(pair)?;
            let num = normed.sum((D::Minus2, D::Minus1))?;
            let mask = fm.broadcast_mul(&pm)?.broadcast_mul(pair)?;
            let den = (mask.sum((D::Minus2, D::Minus1))? + eps)?;
            Ok((num / den)?)
        }
        None => {
            let per_frame = normed.sum(D::Minus1)?; // [*, F]
            let fden = (frames_mask.sum_keepdim(D::Minus1)? + eps)?; // [*, 1]
            let s = per_frame.broadcast_div(&fden)?.sum(D::Minus1)?; // [*]
            let pden = (pos_mask.sum(D::Minus1)? + eps)?;
            Ok((s / pden)?)
        }
    }
}

/// Rotation matrix of a quaternion `(w, x, y, z)` (Hamilton convention, NOT re-normalised):
/// `[*, 4]` → `[*, 3, 3]` (OpenFold `quat_to_rot`).
pub fn quat_to_rot(q: &Tensor) -> Result<Tensor> {
    check_trailing(q, &[4], "quaternion")?;
    let c = |i: usize| q.narrow(D::Minus1, i, 1);
    let (w, x, y, z) = (c(0)?, c(1)?, c(2)?, c(3)?);
    let (ww, xx, yy, zz) = (w.sqr()?, x.sqr()?, y.sqr()?, z.sqr()?);
    let (wx, wy, wz) = ((&w * &x)?, (&w * &y)?, (&w * &z)?);
    let (xy, xz, yz) = ((&x * &y)?, (&x * &z)?, (&y * &z)?);
    let r00 = (((&ww + &xx)? - &yy)? - &zz)?;
    let r01 = ((&xy - &wz)? * 2.0)?;
    let r02 = ((&xz + &wy)? * 2.0)?;
    let r10 = ((&xy + &wz)? * 2.0)?;
    let r11 = (((&ww - &xx)? + &yy)? - &zz)?;
    let r12 = ((&yz - &wx)? * 2.0)?;
    let r20 = ((&xz - &wy)? * 2.0)?;
    let r21 = ((&yz + &wx)? * 2.0)?;
    let r22 = (((&ww - &xx)? - &yy)? + &zz)?;
    let flat = Tensor::cat(&[r00, r01, r02, r10, r11, r12, r20, r21, r22], D::Minus1)?; // [*, 9]
    let mut shape = q.dims()[..q.rank() - 1].to_vec();
    shape.extend([3, 3]);
    Ok(flat.reshape(shape)?)
}

/// Split homogeneous 4x4 frames `[*, 4, 4]` into rotations `[*, 3, 3]` and translations `[*, 3]`
/// (OpenFold `Rigid.from_tensor_4x4`).
pub fn split_4x4(t: &Tensor) -> Result<(Tensor, Tensor)> {
    check_trailing(t, &[4, 4], "4x4 frames")?;
    let nd = t.rank();
    let top = t.narrow(nd - 2, 0, 3)?; // [*, 3, 4]
    let rots = top.narrow(nd - 1, 0, 3)?;
    let trans = top.narrow(nd - 1, 3, 1)?.squeeze(nd - 1)?;
    Ok((rots, trans))
}

/// Backbone FAPE over every structure-module layer (section 1.9.2; OpenFold `backbone_loss`).
///
/// `traj` `[L, *, N, 7]` = (quaternion w,x,y,z ; translation in Å, i.e. the SM's `frames` output whose
/// translation is already scaled by `trans_scale_factor`), used as stored (no re-normalisation).
/// `backbone_rigid_tensor` `[*, N, 4, 4]` GT frames, `backbone_rigid_mask` `[*, N]`. The FAPE points are
/// the frame origins (Cα). `use_clamped_fape` (scalar or `[*]`) mixes `u·clamped + (1−u)·unclamped`;
/// `None` means clamped only. Returns the mean over layers (and batch) as a scalar.
#[allow(clippy::too_many_arguments)]
pub fn backbone_loss(
    backbone_rigid_tensor: &Tensor,
    backbone_rigid_mask: &Tensor,
    traj: &Tensor,
    use_clamped_fape: Option<&Tensor>,
    clamp_distance: f64,
    loss_unit_distance: f64,
    eps: f64,
    pair_mask: Option<&Tensor>,
) -> Result<Tensor> {
    check_trailing(traj, &[7], "backbone traj")?;
    let nd = traj.rank();
    let pred_rots = quat_to_rot(&traj.narrow(nd - 1, 0, 4)?)?; // [L, *, N, 3, 3]
    let pred_trans = traj.narrow(nd - 1, 4, 3)?.contiguous()?; // [L, *, N, 3]
    let (gt_rots, gt_trans) = split_4x4(backbone_rigid_tensor)?;
    let gt_rots = gt_rots
        .unsqueeze(0)?
        .broadcast_as(pred_rots.shape())?
        .contiguous()?;
    let gt_trans = gt_trans
        .unsqueeze(0)?
        .broadcast_as(pred_trans.shape())?
        .contiguous()?;
    let mut mshape = pred_trans.dims().to_vec();
    mshape.pop();
    let mask = backbone_rigid_mask
        .unsqueeze(0)?
        .broadcast_as(mshape)?
        .contiguous()?;
    let pair_mask = match pair_mask {
        Some(p) => {
            let mut s = mask.dims().to_vec();
            s.push(*mask.dims().last().unwrap_or(&0));
            Some(p.broadcast_as(s)?.contiguous()?)
        }
        None => None,
    };
    let fape = |clamp: Option<f64>| {
        compute_fape(
            &pred_rots,
            &pred_trans,
            &gt_rots,
            &gt_trans,
            &mask,
            &pred_trans,
            &gt_trans,
            &mask,
            loss_unit_distance,
            clamp,
            pair_mask.as_ref(),
            eps,
        )
    };
    let clamped = fape(Some(clamp_distance))?; // [L, *]
    let loss = match use_clamped_fape {
        Some(u) => {
            let unclamped = fape(None)?;
            let one_minus = (u.neg()? + 1.0)?;
            (clamped.broadcast_mul(u)? + unclamped.broadcast_mul(&one_minus)?)?
        }
        None => clamped,
    };
    Ok(loss.mean_all()?)
}

/// Side-chain FAPE (section 1.9.2; OpenFold `sidechain_loss`): the LAST layer's 8 rigid-group frames
/// per residue against the renamed ground truth, all N·8 frames vs all N·14 atoms, clamped.
///
/// `sidechain_frames` `[L, *, N, 8, 4, 4]`, `sidechain_atom_pos` `[L, *, N, 14, 3]`,
/// `rigidgroups_gt_frames`/`rigidgroups_alt_gt_frames` `[*, N, 8, 4, 4]`, `rigidgroups_gt_exists`
/// `[*, N, 8]`, `renamed_atom14_gt_positions` `[*, N, 14, 3]`, `renamed_atom14_gt_exists` `[*, N, 14]`,
/// `alt_naming_is_better` `[*, N]`. GT frames are blended elementwise:
/// `(1 − alt)·gt + alt·alt_gt`. Returns `[*]`.
#[allow(clippy::too_many_arguments)]
pub fn sidechain_loss(
    sidechain_frames: &Tensor,
    sidechain_atom_pos: &Tensor,
    rigidgroups_gt_frames: &Tensor,
    rigidgroups_alt_gt_frames: &Tensor,
    rigidgroups_gt_exists: &Tensor,
    renamed_atom14_gt_positions: &Tensor,
    renamed_atom14_gt_exists: &Tensor,
    alt_naming_is_better: &Tensor,
    clamp_distance: f64,
    length_scale: f64,
    eps: f64,
) -> Result<Tensor> {
    check_trailing(sidechain_frames, &[8, 4, 4], "sidechain_frames")?;
    let alt = alt_naming_is_better
        .unsqueeze(D::Minus1)?
        .unsqueeze(D::Minus1)?
        .unsqueeze(D::Minus1)?;
    let one_minus = (alt.neg()? + 1.0)?;
    let gt_frames = (rigidgroups_gt_frames.broadcast_mul(&one_minus)?
        + rigidgroups_alt_gt_frames.broadcast_mul(&alt)?)?;
    let l = sidechain_frames.dim(0)?;
    let last_frames = sidechain_frames.get(l - 1)?; // [*, N, 8, 4, 4]
    let last_pos = sidechain_atom_pos.get(sidechain_atom_pos.dim(0)? - 1)?; // [*, N, 14, 3]
    let batch = last_frames.dims()[..last_frames.rank() - 4].to_vec();
    let with = |tail: &[usize]| {
        let mut s = batch.clone();
        s.extend_from_slice(tail);
        s
    };
    let n = last_frames.dims()[last_frames.rank() - 4];
    let pred = last_frames.reshape(with(&[n * 8, 4, 4]))?;
    let gt = gt_frames.reshape(with(&[n * 8, 4, 4]))?;
    let (pred_rots, pred_trans) = split_4x4(&pred)?;
    let (gt_rots, gt_trans) = split_4x4(&gt)?;
    let frames_mask = rigidgroups_gt_exists.reshape(with(&[n * 8]))?;
    let np = last_pos.dims()[last_pos.rank() - 3] * last_pos.dims()[last_pos.rank() - 2];
    let pred_pos = last_pos.reshape(with(&[np, 3]))?;
    let gt_pos = renamed_atom14_gt_positions.reshape(with(&[np, 3]))?;
    let pos_mask = renamed_atom14_gt_exists.reshape(with(&[np]))?;
    compute_fape(
        &pred_rots,
        &pred_trans,
        &gt_rots,
        &gt_trans,
        &frames_mask,
        &pred_pos,
        &gt_pos,
        &pos_mask,
        length_scale,
        Some(clamp_distance),
        None,
        eps,
    )
}
