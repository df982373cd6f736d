//! AlphaFold2 residue constants as typed tables (Jumper et al. 2021, Supplementary Information
//! 1.2.x, 1.8, 1.9.11 and Table 2), used by the data pipeline (atom14/atom37 features, torsions,
//! frames), the structure module (torsions → frames → atom positions) and the losses (violations,
//! ambiguous-atom renaming). Restype index order is `ARNDCQEGHILKMFPSTWYV`, `X`/`UNK` = 20.
//!
//! Data (literals): alphabets, atom names, chi atoms, π-periodicity, renaming swaps, literature
//! rigid-group positions, vdW radii, peptide-bond constants. Everything else is derived from them
//! once (`OnceLock`) and returned as `&'static` arrays; float tables are `f32` exactly like AF2's
//! numpy tables (upcast them for f64 work), radii are `f64`.
//!
//! API overview (all re-exported here):
//! * [`alphabet`]: [`RESTYPES`], [`RESTYPES_WITH_X`], [`RESNAMES`], [`RESTYPE_NUM`] (20),
//!   [`RESTYPE_NUM_WITH_X`] (21), [`UNK_RESTYPE`] (20), [`restype_order`],
//!   [`restype_order_with_x`], [`restype_1to3`], [`restype_3to1`], [`resname_order`],
//!   [`resname_to_one_letter`] (+ [`NONSTANDARD_RESIDUE_PARENTS`], MSE→M …),
//!   [`ID_TO_HHBLITS_AA`], [`hhblits_aa_to_id`], [`HHBLITS_X`], [`HHBLITS_GAP`],
//!   [`MAP_HHBLITS_AATYPE_TO_OUR_AATYPE`].
//! * [`atoms`]: [`ATOM_TYPES`] (37), [`ATOM_TYPE_NUM`], [`ATOM14_NUM`], [`atom_order`],
//!   [`RESTYPE_ATOM14_NAMES`] `[21][14]`, [`atom14_index`], [`restype_atom14_to_atom37`]
//!   `[21][14]`, [`restype_atom37_to_atom14`] `[21][37]`, [`restype_atom14_mask`],
//!   [`restype_atom37_mask`], [`CHI_ANGLES_ATOMS`], [`chi_angles_mask`] `[21][4]`,
//!   [`CHI_PI_PERIODIC`] `[21][4]`, [`chi_atom_indices`] `[21][4][4]` (atom37),
//!   [`RESIDUE_ATOM_RENAMING_SWAPS`], [`restype_atom14_is_ambiguous`],
//!   [`restype_atom14_ambiguous_swap`].
//! * [`rigid_groups`]: [`RIGID_GROUP_NUM`] (8), [`RIGID_GROUP_ATOM_POSITIONS`],
//!   [`literature_position`], [`restype_atom14_to_rigid_group`], [`restype_atom37_to_rigid_group`],
//!   [`restype_atom14_rigid_group_positions`] `[21][14][3]`,
//!   [`restype_atom37_rigid_group_positions`], [`restype_rigid_group_default_frame`]
//!   `[21][8][4][4]`, [`frame_from_axes`], [`restype_rigidgroup_base`] (base atom names/indices,
//!   group mask, ambiguity flags and rotations).
//! * [`stereo`]: [`VAN_DER_WAALS_RADIUS`], [`van_der_waals_radius`], `BETWEEN_RES_*`, [`CA_CA`],
//!   float32 peptide-bond helpers ([`c_n_bond_target_f32`], [`c_n_bond_stddev_f32`],
//!   [`c_n_bond_tolerance_f32`]), [`parse_stereo_chemical_props`],
//!   [`load_stereo_chemical_props`], [`make_atom14_dists_bounds`], [`atomtype_radius`],
//!   [`restype_atom14_radius`].

pub mod alphabet;
pub mod atoms;
pub mod rigid_groups;
pub mod stereo;

pub use alphabet::*;
pub use atoms::*;
pub use rigid_groups::*;
pub use stereo::*;
