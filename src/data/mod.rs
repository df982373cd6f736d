//! Data pipeline: structure and MSA parsing, features, transforms, crops, HDF5 cache, prefetching
//! loader (AF2 supplement section 1.2; OpenFold `data/` semantics, checked against its goldens).
//!
//! Layout:
//! * parsing: [`cif`] (CIF tokenizer), [`structure`] (mmCIF / PDB → one [`Chain`]), [`msa`]
//!   (a3m, Stockholm, hhr, merge + de-duplication), [`alignment_db`] (OpenFold shards + index),
//!   [`alphabet`] (letters and the HHblits alphabet over `model::residue_constants`);
//! * features: [`features`] (atom14, rigid-group frames, torsions, pseudo-β), [`transforms`]
//!   (seeded MSA transforms, crop, padding → [`Sample`]), [`rng`] (xoshiro256** streams),
//!   [`sample`] ([`Sample`] / [`Batch`] → candle tensors with OpenFold's batch keys);
//! * datasets: [`manifest`] (`datasets/*.toml`), [`dataset`] (entry → inputs, filters, weights),
//!   [`cache`] (HDF5 feature cache), [`loader`] (non-blocking prefetching [`Loader`]),
//!   [`command`] (`ferrofold data …`).

pub mod alignment_db;
pub mod alphabet;
pub mod cache;
pub mod cif;
pub mod command;
pub mod dataset;
pub mod features;
pub mod loader;
pub mod manifest;
pub mod msa;
pub mod rng;
pub mod sample;
pub mod structure;
pub mod transforms;

pub use loader::{Dataset, Loader, LoaderState};
pub use sample::{Batch, Sample};
pub use structure::{parse_structure_file, Chain};
pub use transforms::{build_sample, FeatureConfig, ProteinInput};
