//! Data pipeline: structure and MSA parsing, features, transforms, crops, HDF5 cache, prefetching loader.
//!
//! Layout: [`cif`] (CIF tokenizer/parser), [`structure`] (mmCIF/PDB → one [`structure::Chain`]),
//! [`alphabet`] (residue letters, HHblits alphabet).

pub mod alphabet;
pub mod cif;
pub mod structure;

pub use structure::{parse_structure_file, Chain};
pub mod alignment_db;
pub mod msa;
pub mod features;
pub mod rng;
pub mod sample;
pub mod transforms;
pub mod cache;
pub mod command;
pub mod dataset;
pub mod manifest;
pub mod loader;
