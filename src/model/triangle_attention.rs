//! Algorithms 13 and 14: triangle self-attention around the starting / ending node.

use candle_core::backprop::GradStore;
use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::attention::Attention;
use super::attention_bwd::AttentionSaved;
use super::primitives::{LayerNorm, Linear, LinearInit};
use crate::error::Result;
use crate::kernels::permute::Contig;

/// Triangle attention (OpenFold `TriangleAttention`). `starting = true` is Algorithm 13; `false` is
/// Algorithm 14, computed as the starting-node math on the transposed pair (and mask), transposed
/// back.
#[derive(Debug, Clone)]
pub struct TriangleAttention {
    pub layer_norm: LayerNorm,
    /// Triangle bias projection c_z → H (no bias).
    pub linear: Linear,
    pub mha: Attention,
    pub inf: f64,
    pub starting: bool,
}

impl TriangleAttention {
    pub fn new(
        vb: VarBuilder,
        c_in: usize,
        c_hidden: usize,
        no_heads: usize,
        starting: bool,
        inf: f64,
    ) -> Result<Self> {
        Ok(Self {
            layer_norm: LayerNorm::new(vb.pp("layer_norm"), c_in)?,
            linear: Linear::new(vb.pp("linear"), c_in, no_heads, false, LinearInit::Default)?,
            mha: Attention::new(vb.pp("mha"), c_in, c_in, c_hidden, no_heads)?,
            inf,
            starting,
        })
    }

    /// `x` `[R, R, c]`, `mask` `[R, R]` → update `[R, R, c]`.
    pub fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let mask = &super::primitives::cast(mask, x.dtype())?;
        if self.starting {
            self.forward_starting(x, mask)
        } else {
            let xt = x.transpose(0, 1)?.contig()?;
            let mt = mask.t()?.contig()?;
            Ok(self.forward_starting(&xt, &mt)?.transpose(0, 1)?.contig()?)
        }
    }

    fn forward_starting(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let x = self.layer_norm.forward(x)?;
        let tb = self.triangle_bias(&x)?;
        self.attend_starting(&x, mask, &tb)
    }

    /// The triangle bias `linear(x)` `[J, K, H]` of layer-normed pair rows `x` `[J, K, c]` (in the
    /// starting-node frame; DAP computes it from its own rows and all-gathers the rows).
    pub fn triangle_bias(&self, x: &Tensor) -> Result<Tensor> {
        self.linear.forward(x)
    }

    /// Starting-node attention of layer-normed rows `x` `[I, J, c]` with key mask `mask` `[I, J]`
    /// and the full triangle bias `bias` `[J, J, H]` (queries × keys).
    pub fn attend_starting(&self, x: &Tensor, mask: &Tensor, bias: &Tensor) -> Result<Tensor> {
        let mask = &super::primitives::cast(mask, x.dtype())?;
        let tb = bias.permute((2, 0, 1))?.contig()?.unsqueeze(0)?; // [1, H, Q, K]
                                                                   // Mask bias [I, 1, 1, K] first, then the triangle bias.
        self.mha.forward_masked(x, mask, self.inf, &[&tb])
    }
}

/// What [`TriangleAttention::backward`] keeps from [`TriangleAttention::forward_saved`].
pub struct TriAttSaved {
    /// Input in the starting-node frame (transposed for the ending node) `[I, J, c]`.
    x: Tensor,
    /// `LN(x)` `[I, J, c]`.
    x_ln: Tensor,
    mha: AttentionSaved,
}

impl TriangleAttention {
    /// [`Self::forward`] without a graph, keeping what [`Self::backward`] needs (see
    /// [`super::vjp`]).
    pub fn forward_saved(&self, x: &Tensor, mask: &Tensor) -> Result<(Tensor, TriAttSaved)> {
        let (x, mask) = (x.detach(), mask.detach());
        let (x, mask) = if self.starting {
            (x, mask)
        } else {
            (x.transpose(0, 1)?.contig()?, mask.t()?.contig()?)
        };
        let x_ln = self.layer_norm.forward_nograd(&x)?;
        let tb = self.linear.forward_nograd(&x_ln)?; // [Q, K, H]
        let tb = tb.permute((2, 0, 1))?.contig()?.unsqueeze(0)?; // [1, H, Q, K]
        let (y, mha) = self
            .mha
            .forward_masked_saved(&x_ln, &mask, self.inf, &[(&tb, true)])?;
        let y = if self.starting {
            y
        } else {
            y.transpose(0, 1)?.contig()?
        };
        Ok((y, TriAttSaved { x, x_ln, mha }))
    }

    /// Backward of [`Self::forward_saved`]: parameter gradients into `grads`, returns the input
    /// gradient.
    pub fn backward(&self, s: TriAttSaved, dy: &Tensor, grads: &mut GradStore) -> Result<Tensor> {
        let dy = super::primitives::cast(&dy.detach(), s.x.dtype())?;
        let dy = if self.starting {
            dy
        } else {
            dy.transpose(0, 1)?.contig()?
        };
        let g = self.mha.backward(s.mha, &dy, grads)?;
        let d_tb = g.d_biases.into_iter().next().ok_or_else(|| {
            crate::error::Error::Model("triangle attention backward: no bias gradient".into())
        })?; // [1, H, Q, K]
        let d_tb = d_tb.squeeze(0)?.permute((1, 2, 0))?; // [Q, K, H]
        let d_ln = self
            .linear
            .backward(&s.x_ln, &d_tb, grads, true)?
            .ok_or_else(|| {
                crate::error::Error::Model("triangle attention backward: no dx".into())
            })?;
        let d_ln = crate::kernels::add::add(&g.dx, &d_ln)?;
        let dx = self.layer_norm.backward(&s.x, &d_ln, grads)?;
        if self.starting {
            Ok(dx)
        } else {
            Ok(dx.transpose(0, 1)?.contig()?)
        }
    }
}

/// What [`TriangleAttention::triangle_bias_backward`] keeps from
/// [`TriangleAttention::triangle_bias_saved`] (the DAP hooks with a hand-written backward).
pub struct TriBiasSaved {
    /// Rows in the starting-node frame `[I, J, c]` and `LN` of them.
    x: Tensor,
    x_ln: Tensor,
}

/// What [`TriangleAttention::attend_starting_backward`] keeps from
/// [`TriangleAttention::attend_starting_saved`].
pub struct TriAttendSaved {
    mha: AttentionSaved,
}

impl TriangleAttention {
    /// `LN(x)` and [`Self::triangle_bias`] of rows `x` `[I, J, c]` (starting-node frame) without
    /// a graph → `(LN(x), bias [I, J, H], saved)` (same math as [`Self::forward_saved`]).
    pub fn triangle_bias_saved(&self, x: &Tensor) -> Result<(Tensor, Tensor, TriBiasSaved)> {
        let x = x.detach();
        let x_ln = self.layer_norm.forward_nograd(&x)?;
        let tb = self.linear.forward_nograd(&x_ln)?; // [I, J, H]
        Ok((x_ln.clone(), tb, TriBiasSaved { x, x_ln }))
    }

    /// [`Self::attend_starting`] without a graph, keeping what
    /// [`Self::attend_starting_backward`] needs.
    pub fn attend_starting_saved(
        &self,
        x_ln: &Tensor,
        mask: &Tensor,
        bias: &Tensor,
    ) -> Result<(Tensor, TriAttendSaved)> {
        let tb = bias
            .detach()
            .permute((2, 0, 1))?
            .contiguous()?
            .unsqueeze(0)?; // [1, H, Q, K]
        let (y, mha) = self.mha.forward_masked_saved(
            &x_ln.detach(),
            &mask.detach(),
            self.inf,
            &[(&tb, true)],
        )?;
        Ok((y, TriAttendSaved { mha }))
    }

    /// Backward of [`Self::attend_starting_saved`]: parameter gradients into `grads`, returns
    /// `(d LN(x), d_bias [Q, K, H])` (contiguous).
    pub fn attend_starting_backward(
        &self,
        s: TriAttendSaved,
        dy: &Tensor,
        grads: &mut GradStore,
    ) -> Result<(Tensor, Tensor)> {
        let g = self.mha.backward(s.mha, dy, grads)?;
        let d_tb = g.d_biases.into_iter().next().ok_or_else(|| {
            crate::error::Error::Model("triangle attention backward: no bias gradient".into())
        })?; // [1, H, Q, K]
        let d_tb = d_tb.squeeze(0)?.permute((1, 2, 0))?.contiguous()?; // [Q, K, H]
        Ok((g.dx, d_tb))
    }

    /// Backward of [`Self::triangle_bias_saved`] given the cotangents of `LN(x)` (from the
    /// attention) and of this rank's bias rows `d_bias` `[I, J, H]`: returns `dx`.
    pub fn triangle_bias_backward(
        &self,
        s: TriBiasSaved,
        d_ln: &Tensor,
        d_bias: &Tensor,
        grads: &mut GradStore,
    ) -> Result<Tensor> {
        let d_ln2 = self
            .linear
            .backward(&s.x_ln, d_bias, grads, true)?
            .ok_or_else(|| {
                crate::error::Error::Model("triangle attention backward: no dx".into())
            })?;
        let d_ln = (d_ln + d_ln2)?;
        self.layer_norm.backward(&s.x, &d_ln, grads)
    }
}
