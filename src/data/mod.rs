//! Data pipeline: structure and MSA parsing, features, transforms, crops, HDF5 cache, prefetching loader.
//!
//! Layout: [`cif`] (CIF tokenizer/parser), [`structure`] (mmCIF/PDB → one [`structure::Chain`]),
//! [`alphabet`] (residue letters, HHblits alphabet).

pub mod alphabet;
pub mod cif;
pub mod structure;

pub use structure::{parse_structure_file, Chain};
pub mod alignment_db;
pub mod cache;
pub mod command;
pub mod dataset;
pub mod features;
pub mod loader;
pub mod manifest;
pub mod msa;
pub mod rng;
pub mod sample;
pub mod transforms;
