//! Residue constants (in progress).
