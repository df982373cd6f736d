//! Experimentally-resolved loss (AF2 supplement section 1.9.10; OpenFold
//! `experimentally_resolved_loss`).

use candle_core::{DType, Tensor, D};

use super::{check_trailing, in_range};
use crate::error::Result;

/// Sigmoid cross entropy `−y·log σ(x) − (1−y)·log σ(−x)`, evaluated in float64 and cast back to
/// the logits' dtype (as OpenFold). Uses the stable form
/// `log σ(x) = min(x, 0) − log(1 + e^{−|x|})`.
pub fn sigmoid_cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let dtype = logits.dtype();
    let x = logits.to_dtype(DType::F64)?;
    let y = labels.to_dtype(DType::F64)?;
    let log1p_exp = (x.abs()?.neg()?.exp()? + 1.0)?.log()?;
    let log_p = (x.minimum(0.0)? - &log1p_exp)?;
    let log_not_p = (x.neg()?.minimum(0.0)? - &log1p_exp)?;
    let err = ((y.neg()? * log_p)? - ((y.neg()? + 1.0)? * log_not_p)?)?;
    Ok(err.to_dtype(dtype)?)
}

/// `logits` `[*, N, 37]`, `atom37_atom_exists` `[*, N, 37]`, `all_atom_mask` `[*, N, 37]` (labels),
/// `resolution` `[*]`. `Σ_atoms err·exists / (eps + Σ exists)` summed over residues, times the
/// resolution filter, mean over batch → scalar.
#[allow(clippy::too_many_arguments)]
pub fn experimentally_resolved_loss(
    logits: &Tensor,
    atom37_atom_exists: &Tensor,
    all_atom_mask: &Tensor,
    resolution: &Tensor,
    min_resolution: f64,
    max_resolution: f64,
    eps: f64,
) -> Result<Tensor> {
    check_trailing(logits, &[37], "experimentally resolved logits")?;
    let errors = sigmoid_cross_entropy(logits, all_atom_mask)?;
    let loss = (errors * atom37_atom_exists)?.sum(D::Minus1)?; // [*, N]
    let den = (atom37_atom_exists.sum((D::Minus2, D::Minus1))? + eps)?.unsqueeze(D::Minus1)?;
    let loss = loss.broadcast_div(&den)?.sum(D::Minus1)?;
    let loss = loss.broadcast_mul(&in_range(resolution, min_resolution, max_resolution)?)?;
    Ok(loss.mean_all()?)
}
