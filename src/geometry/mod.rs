//! Rigid-body geometry: rotations, quaternions, rigid transforms, frames, superposition.
