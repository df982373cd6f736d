//! AF2 losses (supplement section 1.9) as free functions on candle tensors, and structure metrics.
//!
//! Every function follows the OpenFold reference (`openfold/utils/loss.py`, commit ce0029e) in its
//! reduction order and eps placement, so float64 results agree with the golden fixtures to ~1e-15;
//! the places where OpenFold computes in float32 even in a float64 run are reproduced and marked
//! `// F32 QUIRK:`. Functions are differentiable (candle autograd) exactly where OpenFold is; the
//! piecewise-constant parts (bins, lDDT scores, renaming, metrics) are detached.
//!
//! API (all re-exported here):
//! * [`fape`] — [`compute_fape`] (Alg. 28, frames as `[*,F,3,3]` rotations + `[*,F,3]` translations),
//!   [`backbone_loss`] (all SM layers, `traj [L,N,7]` = quaternion + translation in Å,
//!   `use_clamped_fape` mixing), [`sidechain_loss`] (last layer, renamed GT), [`quat_to_rot`].
//! * [`chi`] — [`supervised_chi_loss`] (Alg. 27 + angle-norm term), [`torsion_angle_loss`].
//! * [`distogram`] — [`distogram_loss`]; [`msa`]: [`masked_msa_loss`].
//! * [`mod@lddt`] — [`fn@lddt`], [`lddt_ca`], [`lddt_loss`] (Alg. 29), [`compute_plddt`].
//! * [`resolved`] — [`experimentally_resolved_loss`].
//! * [`violations`] — [`find_structural_violations`], [`violation_loss`],
//!   [`compute_violation_metrics`], tables in [`ViolationTables`] (built from
//!   `model::residue_constants` + `stereo_chemical_props.txt`).
//! * [`renaming`] — [`compute_renamed_ground_truth`] (Alg. 26).
//! * [`metrics`] — lDDT-Cα, [`metrics::drmsd`], [`metrics::gdt_ts`], [`metrics::gdt_ha`],
//!   [`metrics::superimpose`] (RMSD after Kabsch/Horn superposition, see
//!   `geometry::superimpose`), [`metrics::structure_metrics`].
//! * [`total`] — [`alphafold_loss`] (weighted sum of every term per [`crate::config::LossConfig`],
//!   non-finite terms reported in [`LossBreakdown::non_finite`] and zeroed, `sqrt(min(seq_len,
//!   crop))` scale) over [`LossOutputs`] + [`LossBatch`] with [`LossTables`].

pub mod chi;
pub mod distogram;
pub mod fape;
pub mod lddt;
pub mod metrics;
pub mod msa;
pub mod renaming;
pub mod resolved;
pub mod total;
pub mod violations;

pub use chi::{supervised_chi_loss, torsion_angle_loss};
pub use distogram::distogram_loss;
pub use fape::{backbone_loss, compute_fape, quat_to_rot, sidechain_loss};
pub use lddt::{compute_plddt, lddt, lddt_ca, lddt_loss};
pub use msa::masked_msa_loss;
pub use renaming::{compute_renamed_ground_truth, RenamedGroundTruth};
pub use resolved::experimentally_resolved_loss;
pub use total::{alphafold_loss, LossBatch, LossBreakdown, LossOutputs, LossResult, LossTables};
pub use violations::{
    compute_violation_metrics, find_structural_violations, violation_loss, ViolationMetrics,
    ViolationTables, Violations,
};

use candle_core::{DType, Tensor, D};

use crate::error::{Error, Result};

/// OpenFold `tensor_utils.masked_mean` default eps.
pub const MASKED_MEAN_EPS: f64 = 1e-4;

/// `Σ mask·value / (eps + Σ mask)` over `dims`; `mask` is broadcast to `value`'s shape first
/// (OpenFold `masked_mean`).
pub fn masked_mean(mask: &Tensor, value: &Tensor, dims: &[usize], eps: f64) -> Result<Tensor> {
    let mask = mask.broadcast_as(value.shape())?;
    let num = (&mask * value)?.sum(dims)?;
    let den = (mask.sum(dims)? + eps)?;
    Ok((num / den)?)
}

/// One-hot encoding of integer `labels` `[*]` into `[*, depth]` in `dtype` (no gradient).
pub fn one_hot(labels: &Tensor, depth: usize, dtype: DType) -> Result<Tensor> {
    let labels = labels.to_dtype(DType::I64)?.unsqueeze(D::Minus1)?;
    let classes = Tensor::arange(0i64, depth as i64, labels.device())?;
    Ok(labels.broadcast_eq(&classes)?.to_dtype(dtype)?)
}

/// `−Σ labels·log_softmax(logits)` over the last dim (OpenFold `softmax_cross_entropy`).
pub fn softmax_cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let logp = candle_nn::ops::log_softmax(logits, D::Minus1)?;
    Ok((labels * logp)?.sum(D::Minus1)?.neg()?)
}

/// `(lo <= x) & (x <= hi)` as 0/1 in `x`'s dtype: the resolution filter of the pLDDT and
/// experimentally-resolved losses.
pub(crate) fn in_range(x: &Tensor, lo: f64, hi: f64) -> Result<Tensor> {
    let a = x.ge(lo)?;
    let b = x.le(hi)?;
    Ok((a * b)?.to_dtype(x.dtype())?)
}

/// Checks that `t` has rank >= `min_rank` and the given trailing dims; `what` names it in errors.
pub(crate) fn check_trailing(t: &Tensor, trailing: &[usize], what: &str) -> Result<()> {
    let d = t.dims();
    if d.len() < trailing.len() || &d[d.len() - trailing.len()..] != trailing {
        return Err(Error::Loss(format!(
            "{what}: shape {:?} must end with {:?}",
            d, trailing
        )));
    }
    Ok(())
}
