//! Atom-layout conversions on coordinate tensors (differentiable): atom14 → atom37, as OpenFold's
//! `feats.atom14_to_atom37` (used for `final_atom_positions`).

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::model::residue_constants as rc;

/// atom14 positions `[*, N, 14, 3]` → atom37 positions `[*, N, 37, 3]`.
///
/// `residx_atom37_to_atom14` `[*, N, 37]` (integer) gives the atom14 slot of each atom37 atom and
/// `atom37_atom_exists` `[*, N, 37]` zeroes atoms the residue does not have (the data-pipeline
/// features of the same names).
pub fn atom14_to_atom37(
    pos14: &Tensor,
    residx_atom37_to_atom14: &Tensor,
    atom37_atom_exists: &Tensor,
) -> Result<Tensor> {
    let idx = residx_atom37_to_atom14.to_dtype(DType::U32)?;
    let r = pos14.rank();
    if r < 3 || idx.rank() != r - 1 || idx.dims()[..r - 2] != pos14.dims()[..r - 2] {
        return Err(Error::Model(format!(
            "atom14_to_atom37: positions {:?} vs index {:?}",
            pos14.dims(),
            idx.dims()
        )));
    }
    let mut shape = idx.dims().to_vec();
    shape.push(3);
    let idx = idx.unsqueeze(r - 1)?.broadcast_as(shape)?.contiguous()?; // [*, N, 37, 3]
    let pos37 = pos14.contiguous()?.gather(&idx, r - 2)?;
    let mask = atom37_atom_exists
        .to_dtype(pos14.dtype())?
        .unsqueeze(r - 1)?;
    Ok(pos37.broadcast_mul(&mask)?)
}

/// The per-residue gather tables for [`atom14_to_atom37`] from `aatype` `[*, N]`:
/// `(residx_atom37_to_atom14 [*, N, 37] u32, atom37_atom_exists [*, N, 37] f32)`.
pub fn atom37_tables_for(aatype: &Tensor, device: &Device) -> Result<(Tensor, Tensor)> {
    let n = rc::RESTYPE_NUM_WITH_X;
    let to14: Vec<u32> = rc::restype_atom37_to_atom14()
        .iter()
        .flatten()
        .map(|&i| i as u32)
        .collect();
    let exists: Vec<f32> = rc::restype_atom37_mask()
        .iter()
        .flatten()
        .copied()
        .collect();
    let to14 = Tensor::from_vec(to14, (n, rc::ATOM_TYPE_NUM), device)?;
    let exists = Tensor::from_vec(exists, (n, rc::ATOM_TYPE_NUM), device)?;
    let idx = aatype
        .flatten_all()?
        .to_dtype(DType::U32)?
        .to_device(device)?;
    let mut shape = aatype.dims().to_vec();
    shape.push(rc::ATOM_TYPE_NUM);
    Ok((
        to14.index_select(&idx, 0)?.reshape(shape.as_slice())?,
        exists.index_select(&idx, 0)?.reshape(shape.as_slice())?,
    ))
}
