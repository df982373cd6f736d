//! Hand-written forward/backward of gated self-attention with a key mask and one pair bias
//! through the fused small-head attention core ([`crate::kernels::row_attention`]): the MSA row
//! attention of the extra-MSA stack (Algorithm 7 inside Algorithm 18, 8 heads × c 8).
//!
//! Same math as [`Attention::forward_masked_saved`] + [`Attention::backward`] with one pair bias
//! `[1, H, N, N]` that needs a gradient, but the `[B, H, N, N]` logits and probabilities are never
//! stored (the core keeps the per-query log-sum-exp and recomputes them in the backward), and the
//! queries, keys and values are read straight from the joint projection (no head split/merge
//! copies). Taken only where the fused core applies (CUDA, f32/bf16, head width 8 or 16) and
//! only when switched on (`FERROFOLD_FUSED_ROW_ATTN=1`: OFF by default, it is slower than the
//! composite path on H100, see [`crate::kernels::row_attention::enabled`]); everywhere else the
//! caller uses the composite path.

use candle_core::backprop::GradStore;
use candle_core::Tensor;

use super::attention::Attention;
use super::primitives::cast;
use super::vjp::{gate_bwd, gate_nograd, LinearCat};
use crate::error::{Error, Result};
use crate::kernels::bias_act::bias_add;
use crate::kernels::row_attention::{applies, row_attention_bwd, row_attention_fwd};

/// What [`FusedAttentionSaved::backward`] keeps from [`Attention::forward_pair_fused_saved`].
pub struct FusedAttentionSaved {
    /// Input `[B, N, c]`.
    x: Tensor,
    /// Joint projection `[B·N, 4·H·C]` (`[q·c^-1/2 | k | v | g]`, gate without its bias).
    y: Tensor,
    /// Mask `[B, N]` (activation dtype) and pair bias `[1, H, N, N]`.
    mask: Tensor,
    pb: Tensor,
    /// Attention output (merged heads) `[B·N, H·C]` and softmax statistics `[B·H·N, 2]` (f32).
    o: Tensor,
    lse: Tensor,
    /// Gate logits with bias `[B·N, H·C]` and the gated output (input of `linear_o`).
    g: Tensor,
    gated: Tensor,
    inf: f64,
    /// `(B, N, H, C)`.
    dims: (usize, usize, usize, usize),
}

impl Attention {
    /// `linear_q` (scaled by `c_hidden^-1/2`), `linear_k`, `linear_v`, `linear_g` as one GEMM
    /// (same column order as the composite path).
    fn qkvg_fused(&self) -> LinearCat<'_> {
        LinearCat {
            parts: vec![
                (&self.linear_q, 1.0 / (self.c_hidden as f64).sqrt()),
                (&self.linear_k, 1.0),
                (&self.linear_v, 1.0),
                (&self.linear_g, 1.0),
            ],
        }
    }

    /// [`Attention::forward_masked_saved`]`(x, mask, inf, &[(pb, true)])` through the fused core;
    /// `Ok(None)` where the fused core does not apply (the caller then takes the composite path).
    /// `x` `[B, N, c]`, `mask` `[B, N]`, `pb` `[1, H, N, N]`.
    pub fn forward_pair_fused_saved(
        &self,
        x: &Tensor,
        mask: &Tensor,
        inf: f64,
        pb: &Tensor,
    ) -> Result<Option<(Tensor, FusedAttentionSaved)>> {
        let (b, n, _) = x.dims3()?;
        let (h, c) = (self.no_heads, self.c_hidden);
        if !applies(x, n, c) || pb.dims() != [1, h, n, n] || mask.dims() != [b, n] {
            return Ok(None);
        }
        let x = x.detach();
        let mask = cast(&mask.detach(), x.dtype())?;
        let pb = cast(&pb.detach(), x.dtype())?;
        let y = self.qkvg_fused().matmul_nograd(&x)?; // [B·N, 4·H·C]
        let Some((o, lse)) = row_attention_fwd(&y, &mask, &pb, h, c, inf)? else {
            return Ok(None);
        };
        let g = y.narrow(1, 3 * h * c, h * c)?;
        let g = match &self.linear_g.bias {
            Some(bg) => bias_add(&g, bg)?,
            None => g.contiguous()?,
        };
        let gated = gate_nograd(&o, &g)?;
        let out = self
            .linear_o
            .forward_nograd(&gated)?
            .reshape((b, n, self.linear_o.out_dim()))?;
        let saved = FusedAttentionSaved {
            x,
            y,
            mask,
            pb,
            o,
            lse,
            g,
            gated,
            inf,
            dims: (b, n, h, c),
        };
        Ok(Some((out, saved)))
    }
}

impl FusedAttentionSaved {
    /// Backward for the output cotangent `d_out` `[B, N, c]`: parameter gradients of `att` into
    /// `grads`; returns `(dx [B, N, c], d_pb [1, H, N, N])` in the activation dtype.
    pub fn backward(
        self,
        att: &Attention,
        d_out: &Tensor,
        grads: &mut GradStore,
    ) -> Result<(Tensor, Tensor)> {
        let (b, n, h, c) = self.dims;
        let dt = self.x.dtype();
        let d_out = cast(&d_out.detach(), dt)?.reshape((b * n, att.linear_o.out_dim()))?;
        let d_gated = att
            .linear_o
            .backward(&self.gated, &d_out, grads, true)?
            .ok_or_else(|| Error::Model("fused attention backward: no d_gated".into()))?;
        drop(self.gated);
        let (d_o, d_g) = gate_bwd(&self.o, &self.g, &d_gated)?; // [B·N, H·C]
        drop(d_gated);
        let [dq, dk, dv, dpb] = row_attention_bwd(
            &self.y, &self.mask, &self.pb, &self.o, &self.lse, &d_o, h, c, self.inf,
        )?
        .ok_or_else(|| Error::Model("fused attention backward: fused core unavailable".into()))?;
        drop((self.y, self.o, self.lse, d_o));
        let dx = att
            .qkvg_fused()
            .backward_parts(&self.x, &[dq, dk, dv, d_g], grads)?;
        Ok((dx, dpb.reshape((1, h, n, n))?))
    }
}
