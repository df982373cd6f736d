//! MSA transition (Algorithm 9) and pair transition (Algorithm 15): a two-layer per-position MLP.

use candle_core::backprop::GradStore;
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
                super::primitives::mul_const(&x, &mask.unsqueeze(mask.rank())?)
            }
            None => Ok(x),
        }
    }
}

/// What [`Transition::backward`] keeps from [`Transition::forward_saved`].
pub struct TransitionSaved {
    /// Input `[*, c]`.
    x: Tensor,
    /// `LN(x)` `[*, c]`.
    x_ln: Tensor,
    /// `relu(linear_1(LN(x)))` `[*, n·c]`.
    a: Tensor,
    /// Mask with a trailing unit dim, in the activation dtype.
    mask: Option<Tensor>,
}

impl Transition {
    /// [`Self::forward`] without a graph, keeping what [`Self::backward`] needs (see
    /// [`super::vjp`]).
    pub fn forward_saved(
        &self,
        x: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<(Tensor, TransitionSaved)> {
        let x = x.detach();
        let x_ln = self.layer_norm.forward_nograd(&x)?;
        if crate::kernels::fused_for(&x_ln) {
            if let (Some(b1), Some(b2)) = (&self.linear_1.bias, &self.linear_2.bias) {
                return self.forward_saved_fused(x, x_ln, b1, b2, mask);
            }
        }
        let a = self.linear_1.forward_nograd(&x_ln)?.relu()?;
        let mut y = self.linear_2.forward_nograd(&a)?;
        let mask = match mask {
            Some(m) => {
                let m = super::primitives::cast(&m.detach(), y.dtype())?;
                Some(m.unsqueeze(m.rank())?)
            }
            None => None,
        };
        if let Some(m) = &mask {
            y = y.broadcast_mul(m)?;
        }
        Ok((y, TransitionSaved { x, x_ln, a, mask }))
    }

    /// [`Self::forward_saved`] with the fused epilogues ([`crate::kernels::bias_act`]):
    /// `relu(x W₁ᵀ + b₁)` and `(a W₂ᵀ + b₂) · mask` each one pass after their GEMM.
    fn forward_saved_fused(
        &self,
        x: Tensor,
        x_ln: Tensor,
        b1: &Tensor,
        b2: &Tensor,
        mask: Option<&Tensor>,
    ) -> Result<(Tensor, TransitionSaved)> {
        use crate::kernels::bias_act::{bias_act, bias_relu};
        let a = bias_relu(&self.linear_1.matmul_nograd(&x_ln)?, b1)?; // [*, n·c]
        let y0 = self.linear_2.matmul_nograd(&a)?; // [*, c]
        let mask = match mask {
            Some(m) => {
                let m = super::primitives::cast(&m.detach(), y0.dtype())?;
                Some(m.unsqueeze(m.rank())?)
            }
            None => None,
        };
        let y = bias_act(&y0, Some(b2), mask.as_ref(), false)?;
        Ok((y, TransitionSaved { x, x_ln, a, mask }))
    }

    /// Backward of [`Self::forward_saved`]: parameter gradients into `grads`, returns `dx`.
    pub fn backward(
        &self,
        s: TransitionSaved,
        dy: &Tensor,
        grads: &mut GradStore,
    ) -> Result<Tensor> {
        let dy = super::primitives::cast(&dy.detach(), s.a.dtype())?;
        let dy = match &s.mask {
            // One pass over dy with fused kernels (a per-row scale).
            Some(m) if crate::kernels::fused_for(&dy) => {
                crate::kernels::bias_act::row_scale(&dy, m)?
            }
            Some(m) => dy.broadcast_mul(m)?,
            None => dy,
        };
        let missing = || crate::error::Error::Model("transition backward: no dx".into());
        let d_a = self
            .linear_2
            .backward(&s.a, &dy, grads, true)?
            .ok_or_else(missing)?;
        let d_h = super::vjp::relu_bwd_from_output(&d_a, &s.a)?;
        drop(d_a);
        let d_ln = self
            .linear_1
            .backward(&s.x_ln, &d_h, grads, true)?
            .ok_or_else(missing)?;
        self.layer_norm.backward(&s.x, &d_ln, grads)
    }
}

/// Algorithm 9: MSA transition, `m` `[S, R, c_m]`, mask `[S, R]`.
pub type MsaTransition = Transition;

/// Algorithm 15: pair transition, `z` `[R, R, c_z]`, mask `[R, R]`.
pub type PairTransition = Transition;
