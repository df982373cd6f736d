//! The AlphaFold2 monomer model (Jumper et al. 2021, Supplementary Information section 1.5-1.9), one
//! file per supplement algorithm, parameter names = OpenFold `state_dict` names.

pub mod heads;
pub mod ipa;
pub mod primitives;
pub mod residue_constants;
pub mod structure_module;
