//! MSA transition (Algorithm 9) and pair transition (Algorithm 15): a two-layer per-position MLP.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::primitives::{LayerNorm, Linear, LinearInit};
use crate::error::Result;

/// `linear_2(relu(linear_1(LN(x)))) * mask[..., None]`, hidden size `n * c`. Shared body of
/// Algorithms 9 and 15 (identical OpenFold parameter names).
#[derive(Debug, Clone)]
pub struct Transition {
    pub layer_norm: LayerNorm,
    pub linear_1: Linear,
    pub linear_2: Linear,
}

impl Transition {
    pub fn new(vb: VarBuilder, c: usize, n: usize) -> Result<Self> {
        Ok(Self {
            layer_norm: LayerNorm::new(vb.pp("layer_norm"), c)?,
            linear_1: Linear::new(vb.pp("linear_1"), c, n * c, true, LinearInit::Relu)?,
            linear_2: Linear::new(vb.pp("linear_2"), n * c, c, true, LinearInit::Final)?,
        })
    }

    /// `x` `[*, c]`, `mask` `[*]` (None = all ones, i.e. no masking) → update `[*, c]`.
    pub fn forward(&self, x: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let x = self.layer_norm.forward(x)?;
        let x = self.linear_2.forward(&self.linear_1.forward(&x)?.relu()?)?;
        match mask {
            Some(mask) => {
                let mask = super::primitives::cast(mask, x.dtype())?;
                Ok(x.broadcast_mul(&mask.unsqueeze(mask.rank())?)?)
            }
            None => Ok(x),
        }
    }
}

/// Algorithm 9: MSA transition, `m` `[S, R, c_m]`, mask `[S, R]`.
pub type MsaTransition = Transition;

/// Algorithm 15: pair transition, `z` `[R, R, c_z]`, mask `[R, R]`.
pub type PairTransition = Transition;
