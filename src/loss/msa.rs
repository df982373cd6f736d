//! Masked MSA loss (AF2 supplement section 1.9.9; OpenFold `masked_msa_loss`).

use candle_core::{Tensor, D};

use super::{check_trailing, one_hot, softmax_cross_entropy};
use crate::error::Result;

/// `logits` `[*, S, N, num_classes]`, `true_msa` `[*, S, N]` (integers), `bert_mask` `[*, S, N]`.
/// `0.5 · Σ_s [Σ_r err·mask / (eps + Σ 0.5·mask)]` (OpenFold's FP16-friendly form of
/// `Σ err·mask / (eps + Σ mask)`), mean over batch → scalar.
pub fn masked_msa_loss(
    logits: &Tensor,
    true_msa: &Tensor,
    bert_mask: &Tensor,
    num_classes: usize,
    eps: f64,
) -> Result<Tensor> {
    check_trailing(logits, &[num_classes], "masked MSA logits")?;
    let labels = one_hot(true_msa, num_classes, logits.dtype())?;
    let errors = softmax_cross_entropy(logits, &labels)?; // [*, S, N]
    let loss = (errors * bert_mask)?.sum(D::Minus1)?; // [*, S]
    let denom = ((bert_mask * 0.5)?.sum((D::Minus2, D::Minus1))? + eps)?.unsqueeze(D::Minus1)?;
    let loss = (loss.broadcast_div(&denom)?.sum(D::Minus1)? * 0.5)?;
    Ok(loss.mean_all()?)
}
