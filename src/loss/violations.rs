//! Structural violations (AF2 supplement section 1.9.11; OpenFold `find_structural_violations`,
//! `violation_loss`, `compute_violation_metrics`): between-residue bond lengths and angles, between-
//! residue clashes and within-residue distance bounds, all on atom14 coordinates.
//!
//! The bound tables come from residue constants (`stereo_chemical_props.txt`) through
//! [`ViolationTables`]; nothing here re-derives them.

use candle_core::{DType, Device, Tensor, D};

use super::{check_trailing, masked_mean, MASKED_MEAN_EPS};
use crate::error::{Error, Result};
use crate::model::residue_constants as rc;

/// Restype index of proline in the `ARNDCQEGHILKMFPSTWYV` order.
pub const PRO: i64 = 14;
const _: () = assert!(rc::RESTYPES[PRO as usize] == 'P');
/// atom14 slots of the backbone atoms.
const N_SLOT: usize = 0;
const CA_SLOT: usize = 1;
const C_SLOT: usize = 2;
/// atom14 slot of CYS SG, exempted from clashes against slot 5 of ANY residue (OpenFold behaviour).
const DISULFIDE_SLOT: usize = 5;

pub use crate::model::residue_constants::{
    BETWEEN_RES_BOND_LENGTH_C_N as C_N_LENGTH, BETWEEN_RES_BOND_LENGTH_STDDEV_C_N as C_N_STDDEV,
    BETWEEN_RES_COS_ANGLES_CA_C_N as COS_CA_C_N, BETWEEN_RES_COS_ANGLES_C_N_CA as COS_C_N_CA,
    CA_CA,
};

/// Per-restype tables the violation terms need (see `data/violation_bounds` of the goldens).
#[derive(Debug, Clone)]
pub struct ViolationTables {
    /// `[21, 14, 14]` `make_atom14_dists_bounds(overlap_tolerance, bond_length_tolerance_factor)` lower
    /// bounds (float32 values, as OpenFold).
    pub lower_bound: Tensor,
    /// `[21, 14, 14]` upper bounds.
    pub upper_bound: Tensor,
    /// `[37]` van der Waals radius of each atom37 type (by the element, the name's first letter).
    pub atomtype_radius: Tensor,
}

impl ViolationTables {
    /// Build from parsed `stereo_chemical_props.txt` with the loss's tolerances (OpenFold:
    /// `clash_overlap_tolerance` 1.5, `violation_tolerance_factor` 12).
    pub fn from_props(
        props: &rc::StereoChemicalProps,
        clash_overlap_tolerance: f64,
        violation_tolerance_factor: f64,
        device: &Device,
    ) -> Result<Self> {
        let b = rc::make_atom14_dists_bounds(
            props,
            clash_overlap_tolerance,
            violation_tolerance_factor,
        )?;
        let flat =
            |t: &rc::PairTable| -> Vec<f32> { t.iter().flatten().flatten().copied().collect() };
        let shape = (rc::RESTYPE_NUM_WITH_X, rc::ATOM14_NUM, rc::ATOM14_NUM);
        Ok(Self {
            lower_bound: Tensor::from_vec(flat(&b.lower), shape, device)?,
            upper_bound: Tensor::from_vec(flat(&b.upper), shape, device)?,
            atomtype_radius: Tensor::new(&rc::atomtype_radius()[..], device)?,
        })
    }

    /// [`Self::from_props`] reading `stereo_chemical_props.txt` at `path`.
    pub fn load(
        path: &std::path::Path,
        clash_overlap_tolerance: f64,
        violation_tolerance_factor: f64,
        device: &Device,
    ) -> Result<Self> {
        let props = rc::load_stereo_chemical_props(path)?;
        Self::from_props(
            &props,
            clash_overlap_tolerance,
            violation_tolerance_factor,
            device,
        )
    }
}

/// Outputs of [`find_structural_violations`] (names = OpenFold dict keys).
#[derive(Debug, Clone)]
pub struct Violations {
    pub bonds_c_n_loss_mean: Tensor,
    pub angles_ca_c_n_loss_mean: Tensor,
    pub angles_c_n_ca_loss_mean: Tensor,
    /// `[*, N]`
    pub connections_per_residue_loss_sum: Tensor,
    /// `[*, N]`
    pub connections_per_residue_violation_mask: Tensor,
    pub clashes_mean_loss: Tensor,
    /// `[*, N, 14]`
    pub clashes_per_atom_loss_sum: Tensor,
    /// `[*, N, 14]`
    pub clashes_per_atom_clash_mask: Tensor,
    /// `[*, N, 14]`
    pub clashes_per_atom_num_clash: Tensor,
    /// `[*, N, 14]`
    pub within_per_atom_loss_sum: Tensor,
    /// `[*, N, 14]`
    pub within_per_atom_violations: Tensor,
    /// `[*, N, 14]`
    pub within_per_atom_num_clash: Tensor,
    /// `[*, N]`
    pub total_per_residue_violations_mask: Tensor,
}

impl Violations {
    /// (OpenFold dict key, tensor) pairs, e.g. `between_residues.clashes_mean_loss`.
    pub fn named(&self) -> Vec<(&'static str, &Tensor)> {
        vec![
            (
                "between_residues.bonds_c_n_loss_mean",
                &self.bonds_c_n_loss_mean,
            ),
            (
                "between_residues.angles_ca_c_n_loss_mean",
                &self.angles_ca_c_n_loss_mean,
            ),
            (
                "between_residues.angles_c_n_ca_loss_mean",
                &self.angles_c_n_ca_loss_mean,
            ),
            (
                "between_residues.connections_per_residue_loss_sum",
                &self.connections_per_residue_loss_sum,
            ),
            (
                "between_residues.connections_per_residue_violation_mask",
                &self.connections_per_residue_violation_mask,
            ),
            (
                "between_residues.clashes_mean_loss",
                &self.clashes_mean_loss,
            ),
            (
                "between_residues.clashes_per_atom_loss_sum",
                &self.clashes_per_atom_loss_sum,
            ),
            (
                "between_residues.clashes_per_atom_clash_mask",
                &self.clashes_per_atom_clash_mask,
            ),
            (
                "between_residues.clashes_per_atom_num_clash",
                &self.clashes_per_atom_num_clash,
            ),
            (
                "within_residues.per_atom_loss_sum",
                &self.within_per_atom_loss_sum,
            ),
            (
                "within_residues.per_atom_violations",
                &self.within_per_atom_violations,
            ),
            (
                "within_residues.per_atom_num_clash",
                &self.within_per_atom_num_clash,
            ),
            (
                "total_per_residue_violations_mask",
                &self.total_per_residue_violations_mask,
            ),
        ]
    }
}

/// Outputs of [`compute_violation_metrics`] (names = OpenFold keys).
#[derive(Debug, Clone)]
pub struct ViolationMetrics {
    pub violations_extreme_ca_ca_distance: Tensor,
    pub violations_between_residue_bond: Tensor,
    pub violations_between_residue_clash: Tensor,
    pub violations_within_residue: Tensor,
    pub violations_per_residue: Tensor,
}

impl ViolationMetrics {
    pub fn named(&self) -> Vec<(&'static str, &Tensor)> {
        vec![
            (
                "violations_extreme_ca_ca_distance",
                &self.violations_extreme_ca_ca_distance,
            ),
            (
                "violations_between_residue_bond",
                &self.violations_between_residue_bond,
            ),
            (
                "violations_between_residue_clash",
                &self.violations_between_residue_clash,
            ),
            ("violations_within_residue", &self.violations_within_residue),
            ("violations_per_residue", &self.violations_per_residue),
        ]
    }
}

/// `x[..., lo:lo+len, slot, :]` for atom14 positions `[*, N, 14, 3]` → `[*, len, 3]`.
fn atom(x: &Tensor, lo: usize, len: usize, slot: usize) -> Result<Tensor> {
    Ok(x.narrow(D::Minus(3), lo, len)?
        .narrow(D::Minus2, slot, 1)?
        .squeeze(D::Minus2)?)
}

/// `m[..., lo:lo+len, slot]` for atom14 masks `[*, N, 14]` → `[*, len]`.
fn atom_mask(m: &Tensor, lo: usize, len: usize, slot: usize) -> Result<Tensor> {
    Ok(m.narrow(D::Minus2, lo, len)?
        .narrow(D::Minus1, slot, 1)?
        .squeeze(D::Minus1)?)
}

fn norm_eps(v: &Tensor, eps: f64) -> Result<Tensor> {
    Ok((v.sqr()?.sum(D::Minus1)? + eps)?.sqrt()?)
}

/// `(residue_index[i+1] − residue_index[i] == 1)` as 0/1 of `dtype`: `[*, N]` → `[*, N−1]`.
fn no_gap_mask(residue_index: &Tensor, dtype: DType) -> Result<Tensor> {
    let ri = residue_index.to_dtype(DType::F64)?;
    let n = ri.dim(D::Minus1)?;
    let d = (ri.narrow(D::Minus1, 1, n - 1)? - ri.narrow(D::Minus1, 0, n - 1)?)?;
    Ok(d.eq(1.0)?.to_dtype(dtype)?)
}

fn masked_ratio(mask: &Tensor, v: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(((mask * v)?.sum(D::Minus1)? / (mask.sum(D::Minus1)? + eps)?)?)
}

/// OpenFold `between_residue_bond_loss` (internal eps 1e-6). Returns
/// (c_n mean, ca_c_n mean, c_n_ca mean, per-residue loss sum, per-residue violation mask).
fn between_residue_bond_loss(
    pos: &Tensor,
    mask: &Tensor,
    residue_index: &Tensor,
    aatype: &Tensor,
    tolerance: f64,
) -> Result<[Tensor; 5]> {
    let eps = 1e-6;
    let dtype = pos.dtype();
    let n = pos.dim(D::Minus(3))?;
    if n < 2 {
        // no residue pairs: OpenFold's empty sums give 0 / (0 + eps) = 0 everywhere
        let mut per_res_shape = pos.dims().to_vec();
        per_res_shape.truncate(per_res_shape.len() - 2);
        let zero_mean = Tensor::zeros(
            &per_res_shape[..per_res_shape.len() - 1],
            dtype,
            pos.device(),
        )?;
        let zero_res = Tensor::zeros(per_res_shape, dtype, pos.device())?;
        return Ok([
            zero_mean.clone(),
            zero_mean.clone(),
            zero_mean,
            zero_res.clone(),
            zero_res,
        ]);
    }
    let m = n - 1;
    let this_ca = atom(pos, 0, m, CA_SLOT)?;
    let this_c = atom(pos, 0, m, C_SLOT)?;
    let next_n = atom(pos, 1, m, N_SLOT)?;
    let next_ca = atom(pos, 1, m, CA_SLOT)?;
    let this_ca_m = atom_mask(mask, 0, m, CA_SLOT)?;
    let this_c_m = atom_mask(mask, 0, m, C_SLOT)?;
    let next_n_m = atom_mask(mask, 1, m, N_SLOT)?;
    let next_ca_m = atom_mask(mask, 1, m, CA_SLOT)?;
    let no_gap = no_gap_mask(residue_index, dtype)?;

    // C(i)–N(i+1) bond length.
    let c_n_vec = (&next_n - &this_c)?;
    let c_n_len = norm_eps(&c_n_vec, eps)?;
    let next_pro = aatype
        .to_dtype(DType::I64)?
        .narrow(D::Minus1, 1, m)?
        .eq(PRO)?
        .to_dtype(dtype)?;
    let not_pro = (next_pro.neg()? + 1.0)?;
    // F32 QUIRK: OpenFold builds targets as bool_tensor * python_float (float32 tensors) and the
    // tolerance·stddev product in float32.
    let pick = |a: f64, b: f64| -> Result<Tensor> { Ok(((&not_pro * a)? + (&next_pro * b)?)?) };
    let gt_len = pick(
        f64::from(rc::c_n_bond_target_f32(false)),
        f64::from(rc::c_n_bond_target_f32(true)),
    )?;
    let gt_tol = pick(
        f64::from(rc::c_n_bond_tolerance_f32(false, tolerance)),
        f64::from(rc::c_n_bond_tolerance_f32(true, tolerance)),
    )?;
    let c_n_err = (((&c_n_len - &gt_len)?.sqr()? + eps)?).sqrt()?;
    let c_n_loss = (&c_n_err - &gt_tol)?.relu()?;
    let c_n_mask = ((&this_c_m * &next_n_m)? * &no_gap)?;
    let c_n_mean = masked_ratio(&c_n_mask, &c_n_loss, eps)?;
    let c_n_viol = (&c_n_mask * c_n_err.gt(&gt_tol)?.to_dtype(dtype)?)?;

    // Angles via cosines of eps-regularised unit vectors.
    let ca_c_vec = (&this_ca - &this_c)?;
    let n_ca_vec = (&next_ca - &next_n)?;
    let ca_c_len = norm_eps(&ca_c_vec, eps)?;
    let n_ca_len = norm_eps(&n_ca_vec, eps)?;
    let c_ca_unit = ca_c_vec.broadcast_div(&ca_c_len.unsqueeze(D::Minus1)?)?;
    let c_n_unit = c_n_vec.broadcast_div(&c_n_len.unsqueeze(D::Minus1)?)?;
    let n_ca_unit = n_ca_vec.broadcast_div(&n_ca_len.unsqueeze(D::Minus1)?)?;

    let angle_term =
        |cos: &Tensor, target: f64, std: f64, mask: &Tensor| -> Result<(Tensor, Tensor, Tensor)> {
            let err = (((cos - target)?.sqr()? + eps)?).sqrt()?;
            let tol = tolerance * std;
            let loss = (&err - tol)?.relu()?;
            let mean = masked_ratio(mask, &loss, eps)?;
            let viol = (mask * err.gt(tol)?.to_dtype(dtype)?)?;
            Ok((loss, mean, viol))
        };
    let cos1 = (&c_ca_unit * &c_n_unit)?.sum(D::Minus1)?;
    let mask1 = (((&this_ca_m * &this_c_m)? * &next_n_m)? * &no_gap)?;
    // OpenFold uses the C–N bond-length stddev (0.014) for this angle.
    let (l1, mean1, v1) = angle_term(&cos1, COS_CA_C_N[0], C_N_STDDEV[0], &mask1)?;
    let cos2 = (c_n_unit.neg()? * &n_ca_unit)?.sum(D::Minus1)?;
    let mask2 = (((&this_c_m * &next_n_m)? * &next_ca_m)? * &no_gap)?;
    let (l2, mean2, v2) = angle_term(&cos2, COS_C_N_CA[0], COS_C_N_CA[1], &mask2)?;

    let l = ((c_n_loss + l1)? + l2)?;
    let per_res =
        ((l.pad_with_zeros(D::Minus1, 0, 1)? + l.pad_with_zeros(D::Minus1, 1, 0)?)? * 0.5)?;
    let v = c_n_viol.maximum(&v1)?.maximum(&v2)?;
    let viol = v
        .pad_with_zeros(D::Minus1, 0, 1)?
        .maximum(&v.pad_with_zeros(D::Minus1, 1, 0)?)?;
    Ok([c_n_mean, mean1, mean2, per_res, viol])
}

/// Sum of a flattened `[*, M, M]` pair tensor over rows and over columns (`[*, M]` each), added:
/// the per-atom totals of OpenFold's `sum(dim=(-4,-2)) + sum(dim=(-3,-1))`.
fn row_plus_col(t: &Tensor) -> Result<Tensor> {
    Ok((t.sum(D::Minus2)? + t.sum(D::Minus1)?)?)
}

fn row_col_max(t: &Tensor) -> Result<Tensor> {
    Ok(t.max(D::Minus2)?.maximum(&t.max(D::Minus1)?)?)
}

/// OpenFold `between_residue_clash_loss` (eps 1e-10) on flattened atoms. Returns
/// (mean loss, per-atom loss sum, per-atom clash mask, per-atom num clash), the last three `[*, N, 14]`.
fn between_residue_clash_loss(
    pos: &Tensor,
    exists: &Tensor,
    radius: &Tensor,
    residue_index: &Tensor,
    overlap_tolerance: f64,
) -> Result<[Tensor; 4]> {
    let eps = 1e-10;
    let dtype = pos.dtype();
    let dev = pos.device();
    let dims = pos.dims().to_vec();
    let nd = dims.len();
    let n = dims[nd - 3];
    let mm = n * 14;
    let lead = dims[..nd - 3].to_vec();
    let with = |tail: &[usize]| {
        let mut s = lead.clone();
        s.extend_from_slice(tail);
        s
    };
    let x = pos.reshape(with(&[mm, 3]))?;
    let d = super::lddt::dmat(&x, eps)?; // [*, M, M]
    let e = exists.reshape(with(&[mm]))?;
    let r = radius.reshape(with(&[mm]))?;
    let ri = residue_index
        .to_dtype(DType::F64)?
        .unsqueeze(D::Minus1)?
        .broadcast_as(with(&[n, 14]))?
        .reshape(with(&[mm]))?;
    let ri_row = ri.unsqueeze(D::Minus1)?;
    let ri_col = ri.unsqueeze(D::Minus2)?;
    let mut mask = e
        .unsqueeze(D::Minus1)?
        .broadcast_mul(&e.unsqueeze(D::Minus2)?)?
        .broadcast_mul(&ri_row.broadcast_lt(&ri_col)?.to_dtype(dtype)?)?;
    // atom14 slot of every flattened atom
    // (built on the device from a 14-entry arange: no large host upload, CUDA-graph safe)
    let slots = Tensor::arange(0u32, 14, dev)?
        .unsqueeze(0)?
        .broadcast_as((mm / 14, 14))?
        .contiguous()?
        .reshape(mm)?;
    let slot_is = |s: u32| -> Result<Tensor> { Ok(slots.eq(s)?.to_dtype(dtype)?) };
    // backbone C(i)–N(i+1) is a bond, not a clash
    let neighbour = (ri_row + 1.0)?.broadcast_eq(&ri_col)?.to_dtype(dtype)?;
    let c_n = neighbour
        .broadcast_mul(&slot_is(C_SLOT as u32)?.unsqueeze(1)?)?
        .broadcast_mul(&slot_is(N_SLOT as u32)?.unsqueeze(0)?)?;
    mask = (&mask * (c_n.neg()? + 1.0)?)?;
    // DISCREPANCY (kept on purpose, as OpenFold/AF2): the "disulfide" exemption masks atom14 slot 5
    // vs slot 5 of ANY two residues, not only CYS SG pairs.
    let s5 = slot_is(DISULFIDE_SLOT as u32)?;
    let ss = s5.unsqueeze(1)?.broadcast_mul(&s5.unsqueeze(0)?)?;
    mask = mask.broadcast_mul(&(ss.neg()? + 1.0)?)?;
    let lower = (&mask
        * r.unsqueeze(D::Minus1)?
            .broadcast_add(&r.unsqueeze(D::Minus2)?)?)?;
    let err = (&mask * ((&lower - overlap_tolerance)? - &d)?.relu()?)?;
    let mean = (err.sum_all()? / (mask.sum_all()? + 1e-6)?)?;
    let per_atom_loss = row_plus_col(&err)?.reshape(with(&[n, 14]))?;
    let clash = (&mask * d.lt(&(&lower - overlap_tolerance)?)?.to_dtype(dtype)?)?;
    let num = row_plus_col(&clash)?.reshape(with(&[n, 14]))?;
    let cmask = row_col_max(&clash)?.reshape(with(&[n, 14]))?;
    Ok([mean, per_atom_loss, cmask, num])
}

/// OpenFold `within_residue_violations` (eps 1e-10, no bound tightening). Returns
/// (per-atom loss sum, per-atom violations, per-atom num clash), each `[*, N, 14]`.
fn within_residue_violations(
    pos: &Tensor,
    exists: &Tensor,
    lower: &Tensor,
    upper: &Tensor,
) -> Result<[Tensor; 3]> {
    let eps = 1e-10;
    let dtype = pos.dtype();
    let off = (Tensor::eye(14, dtype, pos.device())?.neg()? + 1.0)?;
    let mask = exists
        .unsqueeze(D::Minus1)?
        .broadcast_mul(&exists.unsqueeze(D::Minus2)?)?
        .broadcast_mul(&off)?; // [*, N, 14, 14]
    let d = (pos
        .unsqueeze(D::Minus2)?
        .broadcast_sub(&pos.unsqueeze(D::Minus(3))?)?
        .sqr()?
        .sum(D::Minus1)?
        + eps)?
        .sqrt()?;
    let low = (lower - &d)?.relu()?;
    let high = (&d - upper)?.relu()?;
    let loss = (&mask * (low + high)?)?;
    let per_atom_loss = (loss.sum(D::Minus2)? + loss.sum(D::Minus1)?)?;
    let viol = d.lt(lower)?.maximum(&d.gt(upper)?)?.to_dtype(dtype)?;
    let viol = (&mask * viol)?;
    let per_atom_viol = viol.max(D::Minus2)?.maximum(&viol.max(D::Minus1)?)?;
    let num = (viol.sum(D::Minus2)? + viol.sum(D::Minus1)?)?;
    Ok([per_atom_loss, per_atom_viol, num])
}

/// OpenFold `find_structural_violations`. `atom14_pred_positions` `[*, N, 14, 3]`,
/// `atom14_atom_exists` `[*, N, 14]` (from the aatype table), `residue_index` `[*, N]`,
/// `aatype` `[*, N]`, `residx_atom14_to_atom37` `[*, N, 14]`. The bound tables in `tables` must have
/// been built with `clash_overlap_tolerance` and `violation_tolerance_factor`.
#[allow(clippy::too_many_arguments)]
pub fn find_structural_violations(
    atom14_pred_positions: &Tensor,
    atom14_atom_exists: &Tensor,
    residue_index: &Tensor,
    aatype: &Tensor,
    residx_atom14_to_atom37: &Tensor,
    tables: &ViolationTables,
    violation_tolerance_factor: f64,
    clash_overlap_tolerance: f64,
) -> Result<Violations> {
    check_trailing(
        atom14_pred_positions,
        &[14, 3],
        "atom14 predicted positions",
    )?;
    check_trailing(atom14_atom_exists, &[14], "atom14_atom_exists")?;
    let pos = atom14_pred_positions;
    let dtype = pos.dtype();
    let exists = atom14_atom_exists.to_dtype(dtype)?;
    let [c_n_mean, ca_c_n_mean, c_n_ca_mean, conn_loss, conn_viol] = between_residue_bond_loss(
        pos,
        &exists,
        residue_index,
        aatype,
        violation_tolerance_factor,
    )?;

    let idx37 = residx_atom14_to_atom37
        .flatten_all()?
        .to_dtype(DType::I64)?;
    let radius = tables
        .atomtype_radius
        .to_dtype(dtype)?
        .index_select(&idx37, 0)?
        .reshape(exists.shape())?;
    let radius = (&exists * radius)?;
    let [clash_mean, clash_loss, clash_mask, clash_num] = between_residue_clash_loss(
        pos,
        &exists,
        &radius,
        residue_index,
        clash_overlap_tolerance,
    )?;

    let aa = aatype.flatten_all()?.to_dtype(DType::I64)?;
    let mut bshape = exists.dims().to_vec();
    bshape.push(14);
    let lower = tables
        .lower_bound
        .to_dtype(dtype)?
        .index_select(&aa, 0)?
        .reshape(bshape.clone())?;
    let upper = tables
        .upper_bound
        .to_dtype(dtype)?
        .index_select(&aa, 0)?
        .reshape(bshape)?;
    let [within_loss, within_viol, within_num] =
        within_residue_violations(pos, &exists, &lower, &upper)?;

    let total = conn_viol
        .maximum(&clash_mask.max(D::Minus1)?)?
        .maximum(&within_viol.max(D::Minus1)?)?;
    Ok(Violations {
        bonds_c_n_loss_mean: c_n_mean,
        angles_ca_c_n_loss_mean: ca_c_n_mean,
        angles_c_n_ca_loss_mean: c_n_ca_mean,
        connections_per_residue_loss_sum: conn_loss,
        connections_per_residue_violation_mask: conn_viol,
        clashes_mean_loss: clash_mean,
        clashes_per_atom_loss_sum: clash_loss,
        clashes_per_atom_clash_mask: clash_mask,
        clashes_per_atom_num_clash: clash_num,
        within_per_atom_loss_sum: within_loss,
        within_per_atom_violations: within_viol,
        within_per_atom_num_clash: within_num,
        total_per_residue_violations_mask: total,
    })
}

/// OpenFold `violation_loss`: the three between-residue means plus
/// `Σ(clash + within per-atom sums) / (eps + Σ atom14_atom_exists)`; with `average_clashes` each
/// per-atom sum is first divided by `(num clashes between + within + eps)`. Scalar.
pub fn violation_loss(
    v: &Violations,
    atom14_atom_exists: &Tensor,
    average_clashes: bool,
    eps: f64,
) -> Result<Tensor> {
    let dtype = v.clashes_per_atom_loss_sum.dtype();
    let num_atoms = atom14_atom_exists.to_dtype(dtype)?.sum_all()?;
    let mut per_atom = (&v.clashes_per_atom_loss_sum + &v.within_per_atom_loss_sum)?;
    if average_clashes {
        let num = ((&v.clashes_per_atom_num_clash + &v.within_per_atom_num_clash)? + eps)?;
        per_atom = (per_atom / num)?;
    }
    let l_clash = (per_atom.sum_all()? / (num_atoms + eps)?)?;
    let loss = (((&v.bonds_c_n_loss_mean + &v.angles_ca_c_n_loss_mean)?
        + &v.angles_c_n_ca_loss_mean)?
        .broadcast_add(&l_clash))?;
    Ok(loss.mean_all()?)
}

/// OpenFold `compute_violation_metrics` (forward only).
pub fn compute_violation_metrics(
    atom14_pred_positions: &Tensor,
    atom14_atom_exists: &Tensor,
    residue_index: &Tensor,
    seq_mask: &Tensor,
    v: &Violations,
) -> Result<ViolationMetrics> {
    let pos = atom14_pred_positions.detach();
    let dtype = pos.dtype();
    let exists = atom14_atom_exists.to_dtype(dtype)?;
    let n = pos.dim(D::Minus(3))?;
    if n < 2 {
        return Err(Error::Loss(
            "violation metrics need at least 2 residues".into(),
        ));
    }
    let m = n - 1;
    let this_ca = atom(&pos, 0, m, CA_SLOT)?;
    let next_ca = atom(&pos, 1, m, CA_SLOT)?;
    let dist = norm_eps(&(&this_ca - &next_ca)?, 1e-6)?;
    let viol = (dist - CA_CA)?.gt(1.5)?.to_dtype(dtype)?;
    let mask = ((atom_mask(&exists, 0, m, CA_SLOT)? * atom_mask(&exists, 1, m, CA_SLOT)?)?
        * no_gap_mask(residue_index, dtype)?)?;
    let last = |t: &Tensor| vec![t.rank() - 1];
    let extreme = masked_mean(&mask, &viol, &last(&viol), MASKED_MEAN_EPS)?;
    let sm = seq_mask.to_dtype(dtype)?;
    let mm = |val: &Tensor| masked_mean(&sm, &val.detach(), &last(val), MASKED_MEAN_EPS);
    Ok(ViolationMetrics {
        violations_extreme_ca_ca_distance: extreme,
        violations_between_residue_bond: mm(&v.connections_per_residue_violation_mask)?,
        violations_between_residue_clash: mm(&v.clashes_per_atom_clash_mask.max(D::Minus1)?)?,
        violations_within_residue: mm(&v.within_per_atom_violations.max(D::Minus1)?)?,
        violations_per_residue: mm(&v.total_per_residue_violations_mask)?,
    })
}
