//! Rigid-body geometry: rotations, quaternions, rigid transforms, frames, superposition, atom
//! layout conversions.

pub mod all_atom;
pub mod rigid;
pub mod superimpose;
