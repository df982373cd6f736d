//! MSA attention modules: row attention with pair bias (Algorithm 7), column attention
//! (Algorithm 8) and global column attention (Algorithm 19).

use candle_core::backprop::GradStore;
use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::attention::{Attention, GlobalAttention};
use super::primitives::{LayerNorm, Linear, LinearInit};
use crate::error::Result;

/// Algorithm 7: MSA row-wise gated self-attention with pair bias.
#[derive(Debug, Clone)]
pub struct MsaRowAttentionWithPairBias {
    pub layer_norm_m: LayerNorm,
    pub layer_norm_z: LayerNorm,
    /// Pair bias projection c_z → H (no bias).
    pub linear_z: Linear,
    pub mha: Attention,
    pub inf: f64,
}

impl MsaRowAttentionWithPairBias {
    pub fn new(
        vb: VarBuilder,
        c_m: usize,
        c_z: usize,
        c_hidden: usize,
        no_heads: usize,
        inf: f64,
    ) -> Result<Self> {
        Ok(Self {
            layer_norm_m: LayerNorm::new(vb.pp("layer_norm_m"), c_m)?,
            layer_norm_z: LayerNorm::new(vb.pp("layer_norm_z"), c_z)?,
            linear_z: Linear::new(vb.pp("linear_z"), c_z, no_heads, false, LinearInit::Default)?,
            mha: Attention::new(vb.pp("mha"), c_m, c_m, c_hidden, no_heads)?,
            inf,
        })
    }

    /// `m` `[S, R, c_m]`, `z` `[R, R, c_z]`, `mask` `[S, R]` → update `[S, R, c_m]`.
    pub fn forward(&self, m: &Tensor, z: &Tensor, mask: &Tensor) -> Result<Tensor> {
        self.forward_with_bias(m, &self.pair_bias(z)?, mask)
    }

    /// The pair bias `linear_z(LN_z(z))` `[Rq, Rk, H]` of the pair rows `z` `[Rq, Rk, c_z]` (DAP
    /// computes it from its own pair rows and all-gathers the rows).
    pub fn pair_bias(&self, z: &Tensor) -> Result<Tensor> {
        self.linear_z.forward(&self.layer_norm_z.forward(z)?)
    }

    /// [`Self::forward`] with a precomputed (full) pair bias `bias` `[R, R, H]` (from
    /// [`Self::pair_bias`]).
    pub fn forward_with_bias(&self, m: &Tensor, bias: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let m = self.layer_norm_m.forward(m)?;
        // [R, R, H] → [1, H, R, R]: bias[h, i, j] shared over sequences.
        let zb = bias.permute((2, 0, 1))?.contiguous()?.unsqueeze(0)?;
        // Mask bias [S, 1, 1, R] first, then the pair bias.
        self.mha.forward_masked(&m, mask, self.inf, &[&zb])
    }
}

/// Row-style gated self-attention over the middle axis without pair bias: the body of MSA column
/// attention (OpenFold `MSAAttention` with `pair_bias=False`, stored as `_msa_att`).
#[derive(Debug, Clone)]
pub struct MsaAttention {
    pub layer_norm_m: LayerNorm,
    pub mha: Attention,
    pub inf: f64,
}

impl MsaAttention {
    pub fn new(
        vb: VarBuilder,
        c_m: usize,
        c_hidden: usize,
        no_heads: usize,
        inf: f64,
    ) -> Result<Self> {
        Ok(Self {
            layer_norm_m: LayerNorm::new(vb.pp("layer_norm_m"), c_m)?,
            mha: Attention::new(vb.pp("mha"), c_m, c_m, c_hidden, no_heads)?,
            inf,
        })
    }

    /// `m` `[B, N, c]`, `mask` `[B, N]`: attention over `N` within each `B`.
    pub fn forward(&self, m: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let m = self.layer_norm_m.forward(m)?;
        self.mha.forward_masked(&m, mask, self.inf, &[])
    }
}

/// Algorithm 8: MSA column-wise gated self-attention.
#[derive(Debug, Clone)]
pub struct MsaColumnAttention {
    pub msa_att: MsaAttention,
}

impl MsaColumnAttention {
    pub fn new(
        vb: VarBuilder,
        c_m: usize,
        c_hidden: usize,
        no_heads: usize,
        inf: f64,
    ) -> Result<Self> {
        Ok(Self {
            msa_att: MsaAttention::new(vb.pp("_msa_att"), c_m, c_hidden, no_heads, inf)?,
        })
    }

    /// `m` `[S, R, c_m]`, `mask` `[S, R]` → update `[S, R, c_m]`.
    pub fn forward(&self, m: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let mt = m.transpose(0, 1)?.contiguous()?; // [R, S, c_m]
        let maskt = mask.t()?.contiguous()?; // [R, S]
        let out = self.msa_att.forward(&mt, &maskt)?;
        Ok(out.transpose(0, 1)?.contiguous()?)
    }
}

/// Algorithm 19: MSA global column-wise gated self-attention (extra-MSA stack).
#[derive(Debug, Clone)]
pub struct MsaColumnGlobalAttention {
    pub layer_norm_m: LayerNorm,
    pub global_attention: GlobalAttention,
}

impl MsaColumnGlobalAttention {
    /// `eps` is the masked-mean epsilon (OpenFold default 1e-10; 1e-8 inside `ExtraMSABlock`).
    pub fn new(
        vb: VarBuilder,
        c_in: usize,
        c_hidden: usize,
        no_heads: usize,
        inf: f64,
        eps: f64,
    ) -> Result<Self> {
        Ok(Self {
            layer_norm_m: LayerNorm::new(vb.pp("layer_norm_m"), c_in)?,
            global_attention: GlobalAttention::new(
                vb.pp("global_attention"),
                c_in,
                c_hidden,
                no_heads,
                inf,
                eps,
            )?,
        })
    }

    /// `m` `[S, R, c]`, `mask` `[S, R]` → update `[S, R, c]`.
    pub fn forward(&self, m: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let mt = m.transpose(0, 1)?.contiguous()?; // [R, S, c]
        let maskt = mask.t()?.contiguous()?; // [R, S]
        let mt = self.layer_norm_m.forward(&mt)?;
        let out = self.global_attention.forward(&mt, &maskt)?;
        Ok(out.transpose(0, 1)?.contiguous()?)
    }
}

/// What [`MsaColumnAttention::backward`] keeps from [`MsaColumnAttention::forward_saved`].
pub struct MsaColSaved(super::vjp::AutogradVjp);

impl MsaColumnAttention {
    /// [`Self::forward`] without a graph, keeping what [`Self::backward`] needs (see
    /// [`super::vjp`]). (Generic version: the module's candle graph is kept.)
    pub fn forward_saved(&self, m: &Tensor, mask: &Tensor) -> Result<(Tensor, MsaColSaved)> {
        let mask = mask.detach();
        let v = super::vjp::AutogradVjp::run(&[m], |i| Ok(vec![self.forward(&i[0], &mask)?]))?;
        let y = super::vjp::first(v.outputs())?;
        Ok((y, MsaColSaved(v)))
    }

    /// Backward of [`Self::forward_saved`]: parameter gradients into `grads`, returns the input
    /// gradient.
    pub fn backward(&self, s: MsaColSaved, dy: &Tensor, grads: &mut GradStore) -> Result<Tensor> {
        super::vjp::first(s.0.backward(&[dy], grads)?)
    }
}

/// What [`MsaColumnGlobalAttention::backward`] keeps from [`MsaColumnGlobalAttention::forward_saved`].
pub struct MsaGlobalColSaved(super::vjp::AutogradVjp);

impl MsaColumnGlobalAttention {
    /// [`Self::forward`] without a graph, keeping what [`Self::backward`] needs (see
    /// [`super::vjp`]). (Generic version: the module's candle graph is kept.)
    pub fn forward_saved(&self, m: &Tensor, mask: &Tensor) -> Result<(Tensor, MsaGlobalColSaved)> {
        let mask = mask.detach();
        let v = super::vjp::AutogradVjp::run(&[m], |i| Ok(vec![self.forward(&i[0], &mask)?]))?;
        let y = super::vjp::first(v.outputs())?;
        Ok((y, MsaGlobalColSaved(v)))
    }

    /// Backward of [`Self::forward_saved`]: parameter gradients into `grads`, returns the input
    /// gradient.
    pub fn backward(
        &self,
        s: MsaGlobalColSaved,
        dy: &Tensor,
        grads: &mut GradStore,
    ) -> Result<Tensor> {
        super::vjp::first(s.0.backward(&[dy], grads)?)
    }
}

/// What [`MsaRowAttentionWithPairBias::backward`] keeps from
/// [`MsaRowAttentionWithPairBias::forward_saved`].
pub struct MsaRowSaved(super::vjp::AutogradVjp);

impl MsaRowAttentionWithPairBias {
    /// [`Self::forward`] without a graph, keeping what [`Self::backward`] needs (see
    /// [`super::vjp`]). (Generic version: the module's candle graph is kept.)
    pub fn forward_saved(
        &self,
        m: &Tensor,
        z: &Tensor,
        mask: &Tensor,
    ) -> Result<(Tensor, MsaRowSaved)> {
        let mask = mask.detach();
        let v = super::vjp::AutogradVjp::run(&[m, z], |i| {
            Ok(vec![self.forward(&i[0], &i[1], &mask)?])
        })?;
        let y = super::vjp::first(v.outputs())?;
        Ok((y, MsaRowSaved(v)))
    }

    /// Backward of [`Self::forward_saved`]: parameter gradients into `grads`, returns `(dm, dz)`.
    pub fn backward(
        &self,
        s: MsaRowSaved,
        dy: &Tensor,
        grads: &mut GradStore,
    ) -> Result<(Tensor, Tensor)> {
        let mut d = s.0.backward(&[dy], grads)?.into_iter();
        match (d.next(), d.next()) {
            (Some(dm), Some(dz)) => Ok((dm, dz)),
            _ => Err(crate::error::Error::Model(
                "msa row attention backward: missing gradient".into(),
            )),
        }
    }
}
