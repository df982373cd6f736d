//! MSA attention modules: row attention with pair bias (Algorithm 7), column attention
//! (Algorithm 8) and global column attention (Algorithm 19).

use candle_core::backprop::GradStore;
use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::attention::{Attention, GlobalAttention};
use super::attention_bwd::{AttentionSaved, GlobalAttentionSaved};
use super::attention_fused::FusedAttentionSaved;
use super::primitives::{cast, LayerNorm, Linear, LinearInit};
use crate::error::Result;
use crate::kernels::permute::Contig;

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
        let zb = bias.permute((2, 0, 1))?.contig()?.unsqueeze(0)?;
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
        let mt = m.transpose(0, 1)?.contig()?; // [R, S, c_m]
        let maskt = mask.t()?.contig()?; // [R, S]
        let out = self.msa_att.forward(&mt, &maskt)?;
        Ok(out.transpose(0, 1)?.contig()?)
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
        let mt = m.transpose(0, 1)?.contig()?; // [R, S, c]
        let maskt = mask.t()?.contig()?; // [R, S]
        let mt = self.layer_norm_m.forward(&mt)?;
        let out = self.global_attention.forward(&mt, &maskt)?;
        Ok(out.transpose(0, 1)?.contig()?)
    }
}

/// What [`MsaAttention::backward`] keeps from [`MsaAttention::forward_saved`].
pub struct MsaAttSaved {
    /// Input `[B, N, c]`.
    m: Tensor,
    mha: AttentionSaved,
}

impl MsaAttention {
    /// [`Self::forward`] without a graph, keeping what [`Self::backward`] needs (see
    /// [`super::vjp`]).
    pub fn forward_saved(&self, m: &Tensor, mask: &Tensor) -> Result<(Tensor, MsaAttSaved)> {
        let m = m.detach();
        let m_ln = self.layer_norm_m.forward_nograd(&m)?;
        let (y, mha) = self.mha.forward_masked_saved(&m_ln, mask, self.inf, &[])?;
        Ok((y, MsaAttSaved { m, mha }))
    }

    /// Backward of [`Self::forward_saved`]: parameter gradients into `grads`, returns `dm`.
    pub fn backward(&self, s: MsaAttSaved, dy: &Tensor, grads: &mut GradStore) -> Result<Tensor> {
        let d_ln = self.mha.backward(s.mha, dy, grads)?.dx;
        self.layer_norm_m.backward(&s.m, &d_ln, grads)
    }
}

/// What [`MsaColumnAttention::backward`] keeps from [`MsaColumnAttention::forward_saved`].
pub struct MsaColSaved(MsaAttSaved);

impl MsaColumnAttention {
    /// [`Self::forward`] without a graph, keeping what [`Self::backward`] needs (see
    /// [`super::vjp`]).
    pub fn forward_saved(&self, m: &Tensor, mask: &Tensor) -> Result<(Tensor, MsaColSaved)> {
        let mt = m.detach().transpose(0, 1)?.contig()?; // [R, S, c_m]
        let maskt = mask.detach().t()?.contig()?; // [R, S]
        let (out, s) = self.msa_att.forward_saved(&mt, &maskt)?;
        Ok((out.transpose(0, 1)?.contig()?, MsaColSaved(s)))
    }

    /// Backward of [`Self::forward_saved`]: parameter gradients into `grads`, returns the input
    /// gradient.
    pub fn backward(&self, s: MsaColSaved, dy: &Tensor, grads: &mut GradStore) -> Result<Tensor> {
        let dyt = dy.detach().transpose(0, 1)?.contig()?; // [R, S, c_m]
        let dmt = self.msa_att.backward(s.0, &dyt, grads)?;
        Ok(dmt.transpose(0, 1)?.contig()?)
    }
}

/// What [`MsaColumnGlobalAttention::backward`] keeps from [`MsaColumnGlobalAttention::forward_saved`].
pub struct MsaGlobalColSaved {
    /// Transposed input `[R, S, c]`.
    mt: Tensor,
    att: GlobalAttentionSaved,
}

impl MsaColumnGlobalAttention {
    /// [`Self::forward`] without a graph, keeping what [`Self::backward`] needs (see
    /// [`super::vjp`]).
    pub fn forward_saved(&self, m: &Tensor, mask: &Tensor) -> Result<(Tensor, MsaGlobalColSaved)> {
        let mt = m.detach().transpose(0, 1)?.contig()?; // [R, S, c]
        let maskt = mask.detach().t()?.contig()?; // [R, S]
        let m_ln = self.layer_norm_m.forward_nograd(&mt)?;
        let (out, att) = self.global_attention.forward_saved(&m_ln, &maskt)?;
        Ok((
            out.transpose(0, 1)?.contig()?,
            MsaGlobalColSaved { mt, att },
        ))
    }

    /// Backward of [`Self::forward_saved`]: parameter gradients into `grads`, returns the input
    /// gradient.
    pub fn backward(
        &self,
        s: MsaGlobalColSaved,
        dy: &Tensor,
        grads: &mut GradStore,
    ) -> Result<Tensor> {
        let dt = s.mt.dtype();
        let dyt = cast(&dy.detach(), dt)?.transpose(0, 1)?.contig()?; // [R, S, c]
        let d_ln = self.global_attention.backward(s.att, &dyt, grads)?;
        let dmt = self.layer_norm_m.backward(&s.mt, &d_ln, grads)?;
        Ok(dmt.transpose(0, 1)?.contig()?)
    }
}

/// What [`MsaRowAttentionWithPairBias::backward`] keeps from
/// [`MsaRowAttentionWithPairBias::forward_saved`].
pub struct MsaRowSaved {
    /// Inputs `[S, R, c_m]`, `[R, R, c_z]`.
    m: Tensor,
    z: Tensor,
    /// `LN_z(z)` `[R, R, c_z]`.
    z_ln: Tensor,
    mha: RowMhaSaved,
}

/// The attention state of [`MsaRowSaved`]: composite, or the fused small-head core
/// ([`super::attention_fused`], extra-MSA stack on CUDA).
enum RowMhaSaved {
    Composite(AttentionSaved),
    Fused(FusedAttentionSaved),
}

impl MsaRowAttentionWithPairBias {
    /// [`Self::forward`] without a graph, keeping what [`Self::backward`] needs (see
    /// [`super::vjp`]).
    pub fn forward_saved(
        &self,
        m: &Tensor,
        z: &Tensor,
        mask: &Tensor,
    ) -> Result<(Tensor, MsaRowSaved)> {
        let (m, z) = (m.detach(), z.detach());
        let z_ln = self.layer_norm_z.forward_nograd(&z)?;
        let bias = self.linear_z.forward_nograd(&z_ln)?; // [R, R, H]
        let zb = bias.permute((2, 0, 1))?.contig()?.unsqueeze(0)?; // [1, H, R, R]
        drop(bias);
        let m_ln = self.layer_norm_m.forward_nograd(&m)?;
        let (y, mha) = match self
            .mha
            .forward_pair_fused_saved(&m_ln, mask, self.inf, &zb)?
        {
            Some((y, f)) => (y, RowMhaSaved::Fused(f)),
            None => {
                let (y, a) =
                    self.mha
                        .forward_masked_saved(&m_ln, mask, self.inf, &[(&zb, true)])?;
                (y, RowMhaSaved::Composite(a))
            }
        };
        Ok((y, MsaRowSaved { m, z, z_ln, mha }))
    }

    /// Backward of [`Self::forward_saved`]: parameter gradients into `grads`, returns `(dm, dz)`.
    pub fn backward(
        &self,
        s: MsaRowSaved,
        dy: &Tensor,
        grads: &mut GradStore,
    ) -> Result<(Tensor, Tensor)> {
        let (dx, d_zb) = match s.mha {
            RowMhaSaved::Fused(f) => f.backward(&self.mha, dy, grads)?,
            RowMhaSaved::Composite(a) => {
                let g = self.mha.backward(a, dy, grads)?;
                let d = g.d_biases.into_iter().next().ok_or_else(|| {
                    crate::error::Error::Model(
                        "msa row attention backward: no pair-bias gradient".into(),
                    )
                })?;
                (g.dx, d)
            }
        };
        let dm = self.layer_norm_m.backward(&s.m, &dx, grads)?;
        // d_zb: [1, H, R, R]
        let d_bias = d_zb.squeeze(0)?.permute((1, 2, 0))?; // [R, R, H]
        let d_zln = self
            .linear_z
            .backward(&s.z_ln, &d_bias, grads, true)?
            .ok_or_else(|| {
                crate::error::Error::Model("msa row attention backward: no dz".into())
            })?;
        let dz = self.layer_norm_z.backward(&s.z, &d_zln, grads)?;
        Ok((dm, dz))
    }
}

/// What [`MsaRowAttentionWithPairBias::pair_bias_backward`] keeps from
/// [`MsaRowAttentionWithPairBias::pair_bias_saved`] (the DAP hook with a hand-written backward).
pub struct PairBiasSaved {
    /// Pair rows `[Rq, Rk, c_z]` and `LN_z` of them.
    z: Tensor,
    z_ln: Tensor,
}

/// What [`MsaRowAttentionWithPairBias::backward_with_bias`] keeps from
/// [`MsaRowAttentionWithPairBias::forward_with_bias_saved`].
pub struct MsaRowBiasSaved {
    /// Input `[S, R, c_m]`.
    m: Tensor,
    mha: AttentionSaved,
}

impl MsaRowAttentionWithPairBias {
    /// [`Self::pair_bias`] without a graph, keeping what [`Self::pair_bias_backward`] needs
    /// (same math as [`Self::forward_saved`]'s bias).
    pub fn pair_bias_saved(&self, z: &Tensor) -> Result<(Tensor, PairBiasSaved)> {
        let z = z.detach();
        let z_ln = self.layer_norm_z.forward_nograd(&z)?;
        let bias = self.linear_z.forward_nograd(&z_ln)?; // [Rq, Rk, H]
        Ok((bias, PairBiasSaved { z, z_ln }))
    }

    /// Backward of [`Self::pair_bias_saved`] for the bias cotangent `d_bias` `[Rq, Rk, H]`:
    /// parameter gradients into `grads`, returns `dz`.
    pub fn pair_bias_backward(
        &self,
        s: PairBiasSaved,
        d_bias: &Tensor,
        grads: &mut GradStore,
    ) -> Result<Tensor> {
        let d_zln = self
            .linear_z
            .backward(&s.z_ln, d_bias, grads, true)?
            .ok_or_else(|| crate::error::Error::Model("pair bias backward: no dz".into()))?;
        self.layer_norm_z.backward(&s.z, &d_zln, grads)
    }

    /// [`Self::forward_with_bias`] without a graph, keeping what [`Self::backward_with_bias`]
    /// needs (same math as [`Self::forward_saved`]).
    pub fn forward_with_bias_saved(
        &self,
        m: &Tensor,
        bias: &Tensor,
        mask: &Tensor,
    ) -> Result<(Tensor, MsaRowBiasSaved)> {
        let m = m.detach();
        let zb = bias
            .detach()
            .permute((2, 0, 1))?
            .contiguous()?
            .unsqueeze(0)?; // [1, H, R, R]
        let m_ln = self.layer_norm_m.forward_nograd(&m)?;
        let (y, mha) = self
            .mha
            .forward_masked_saved(&m_ln, mask, self.inf, &[(&zb, true)])?;
        Ok((y, MsaRowBiasSaved { m, mha }))
    }

    /// Backward of [`Self::forward_with_bias_saved`]: parameter gradients into `grads`, returns
    /// `(dm, d_bias)` with `d_bias` `[R, R, H]` (contiguous).
    pub fn backward_with_bias(
        &self,
        s: MsaRowBiasSaved,
        dy: &Tensor,
        grads: &mut GradStore,
    ) -> Result<(Tensor, Tensor)> {
        let g = self.mha.backward(s.mha, dy, grads)?;
        let d_zb = g.d_biases.into_iter().next().ok_or_else(|| {
            crate::error::Error::Model("msa row attention backward: no pair-bias gradient".into())
        })?; // [1, H, R, R]
        let d_bias = d_zb.squeeze(0)?.permute((1, 2, 0))?.contiguous()?; // [R, R, H]
        let dm = self.layer_norm_m.backward(&s.m, &g.dx, grads)?;
        Ok((dm, d_bias))
    }
}
