//! The AlphaFold2 monomer model (Jumper et al. 2021, Supplementary Information section 1.5-1.9), one
//! file per supplement algorithm, parameter names = OpenFold `state_dict` names.
//!
//! Trunk activations are unbatched: MSA `[S, R, c_m]`, pair `[R, R, c_z]`, masks `[S, R]` /
//! `[R, R]` (one sample per rank; data parallelism happens across ranks).

pub mod alphafold;
pub mod attention;
pub mod attention_bwd;
pub mod attention_fused;
pub mod dropout;
pub mod dropout_pool;
pub mod embedders;
pub mod evoformer;
pub mod extra_msa;
mod fused;
pub mod heads;
pub mod init;
pub mod ipa;
pub mod msa;
pub mod outer_product_mean;
pub mod params;
pub mod primitives;
pub mod remat;
pub mod residue_constants;
pub mod structure_module;
pub mod transition;
pub mod triangle_attention;
pub mod triangle_multiplication;
pub mod vjp;
