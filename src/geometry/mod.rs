//! Rigid-body geometry: rotations, quaternions, rigid transforms, frames, superposition.

pub mod rigid;
pub mod superimpose;
