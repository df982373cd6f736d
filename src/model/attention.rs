//! Attention cores shared by the trunk modules.
//!
//! * [`Attention`]: gated multi-head attention with an ordered list of additive biases (the core of
//!   AF2 supplement Algorithms 7, 8, 13 and 14; OpenFold `Attention`).
//! * [`GlobalAttention`]: the global (averaged-query) gated attention of Algorithm 19.
//!
//! Their hand-written backward passes (`forward_saved` / `backward`, used by the trunk's manual
//! backward) are in [`super::attention_bwd`].
//!
//! Shapes are unbatched: the trunk processes one sample at a time; attention runs over a flat batch
//! dimension `B` (MSA rows, MSA columns or pair rows) so that every matmul is a 3-D batched matmul.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::primitives::{sigmoid, softmax_with_biases, Linear, LinearInit};
use crate::error::{Error, Result};
use crate::kernels::permute::Contig;

/// Gated multi-head attention (OpenFold `Attention`; used by Algorithms 7, 8, 13, 14).
///
/// `q = linear_q(x) / sqrt(c_hidden)`, `a = softmax(q kᵀ + Σ biases)`, `o = (a v) * sigmoid(linear_g(x))`,
/// `out = linear_o(o)`. `linear_q/k/v` have no bias; `linear_g`, `linear_o` have a bias.
#[derive(Debug, Clone)]
pub struct Attention {
    pub linear_q: Linear,
    pub linear_k: Linear,
    pub linear_v: Linear,
    pub linear_g: Linear,
    pub linear_o: Linear,
    pub c_hidden: usize,
    pub no_heads: usize,
}

impl Attention {
    /// `c_hidden` is the per-head size (channel index `h * c_hidden + c`).
    pub fn new(
        vb: VarBuilder,
        c_q: usize,
        c_kv: usize,
        c_hidden: usize,
        no_heads: usize,
    ) -> Result<Self> {
        let hc = c_hidden * no_heads;
        Ok(Self {
            linear_q: Linear::new(vb.pp("linear_q"), c_q, hc, false, LinearInit::Glorot)?,
            linear_k: Linear::new(vb.pp("linear_k"), c_kv, hc, false, LinearInit::Glorot)?,
            linear_v: Linear::new(vb.pp("linear_v"), c_kv, hc, false, LinearInit::Glorot)?,
            linear_g: Linear::new(vb.pp("linear_g"), c_q, hc, true, LinearInit::Gating)?,
            linear_o: Linear::new(vb.pp("linear_o"), hc, c_q, true, LinearInit::Final)?,
            c_hidden,
            no_heads,
        })
    }

    /// Split `[B, N, H*C]` into heads `[B*H, N, C]` (contiguous, ready for a 3-D matmul).
    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, _) = x.dims3()?;
        Ok(x.reshape((b, n, self.no_heads, self.c_hidden))?
            .transpose(1, 2)?
            .contig()?
            .reshape((b * self.no_heads, n, self.c_hidden))?)
    }

    /// `q_x` `[B, Q, c_q]`, `kv_x` `[B, K, c_kv]`; each bias broadcastable to `[B, H, Q, K]`,
    /// added to the logits in the given order (OpenFold adds the mask bias first, then the pair
    /// bias; the order matters for fully-masked rows). Returns `[B, Q, c_q]`.
    pub fn forward(&self, q_x: &Tensor, kv_x: &Tensor, biases: &[&Tensor]) -> Result<Tensor> {
        let (b, nq, _) = q_x.dims3()?;
        let (bk, nk, _) = kv_x.dims3()?;
        if b != bk {
            return Err(Error::Model(format!(
                "attention: query batch {b} != key batch {bk}"
            )));
        }
        let h = self.no_heads;
        let c = self.c_hidden;
        // q is scaled before the dot product (OpenFold divides q, not the logits); the scale is
        // folded into the (small) weight, which saves one activation-sized tensor.
        let scaled_q = Linear {
            weight: (&self.linear_q.weight / (c as f64).sqrt())?,
            bias: None,
        };
        let q = self.split_heads(&scaled_q.forward(q_x)?)?; // [B*H, Q, C]
        let k = self.split_heads(&self.linear_k.forward(kv_x)?)?; // [B*H, K, C]
        let v = self.split_heads(&self.linear_v.forward(kv_x)?)?; // [B*H, K, C]
        let a = q.matmul(&k.t()?)?.reshape((b, h, nq, nk))?; // [B, H, Q, K]
        let a = softmax_with_biases(&a, biases)?.reshape((b * h, nq, nk))?;
        let o = a.matmul(&v)?; // [B*H, Q, C]
        let o = o
            .reshape((b, h, nq, c))?
            .transpose(1, 2)?
            .contig()?
            .reshape((b, nq, h * c))?; // [B, Q, H*C]
                                       // o * sigmoid(linear_g(q_x)): one fused kernel on CUDA.
        let g = self.linear_g.forward(q_x)?;
        self.linear_o.forward(&crate::kernels::gate::gate(&o, &g)?)
    }

    /// Self-attention of `x` `[B, N, c]` over `N` with key mask `mask` `[B, N]` (converted to the
    /// bias `inf·(mask − 1)`, added first) followed by `extra_biases` (e.g. the pair bias
    /// `[1, H, N, N]`).
    pub fn forward_masked(
        &self,
        x: &Tensor,
        mask: &Tensor,
        inf: f64,
        extra_biases: &[&Tensor],
    ) -> Result<Tensor> {
        let (b, n) = mask.dims2()?;
        let mask = super::primitives::cast(mask, x.dtype())?;
        let mb = super::primitives::mask_bias(&mask, inf)?.reshape((b, 1, 1, n))?; // [B, 1, 1, N]
        let mut biases: Vec<&Tensor> = Vec::with_capacity(1 + extra_biases.len());
        biases.push(&mb);
        biases.extend_from_slice(extra_biases);
        self.forward(x, x, &biases)
    }
}

/// Global gated attention (Algorithm 19, OpenFold `GlobalAttention`): one averaged query per batch
/// element, single-head keys/values shared by all heads.
#[derive(Debug, Clone)]
pub struct GlobalAttention {
    pub linear_q: Linear,
    pub linear_k: Linear,
    pub linear_v: Linear,
    pub linear_g: Linear,
    pub linear_o: Linear,
    pub c_hidden: usize,
    pub no_heads: usize,
    pub inf: f64,
    pub eps: f64,
}

impl GlobalAttention {
    pub fn new(
        vb: VarBuilder,
        c_in: usize,
        c_hidden: usize,
        no_heads: usize,
        inf: f64,
        eps: f64,
    ) -> Result<Self> {
        let hc = c_hidden * no_heads;
        Ok(Self {
            linear_q: Linear::new(vb.pp("linear_q"), c_in, hc, false, LinearInit::Glorot)?,
            linear_k: Linear::new(vb.pp("linear_k"), c_in, c_hidden, false, LinearInit::Glorot)?,
            linear_v: Linear::new(vb.pp("linear_v"), c_in, c_hidden, false, LinearInit::Glorot)?,
            linear_g: Linear::new(vb.pp("linear_g"), c_in, hc, true, LinearInit::Gating)?,
            linear_o: Linear::new(vb.pp("linear_o"), hc, c_in, true, LinearInit::Final)?,
            c_hidden,
            no_heads,
            inf,
            eps,
        })
    }

    /// `m` `[B, N, c_in]` (already layer-normed), `mask` `[B, N]`; attention over `N`.
    /// Returns `[B, N, c_in]`.
    pub fn forward(&self, m: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let mask = &super::primitives::cast(mask, m.dtype())?;
        let (b, n, _) = m.dims3()?;
        let (h, c) = (self.no_heads, self.c_hidden);
        let mask3 = mask.unsqueeze(2)?; // [B, N, 1]
                                        // Masked mean over N: q = Σ m·mask / (Σ mask + eps).
        let num = super::primitives::mul_const(m, &mask3)?.sum(1)?; // [B, c_in]
        let den = (mask.sum_keepdim(1)? + self.eps)?; // [B, 1]
        let q_avg = num.broadcast_div(&den)?;
        // q is multiplied by c^-1/2 (as in OpenFold's GlobalAttention).
        let q = (self.linear_q.forward(&q_avg)? * (c as f64).powf(-0.5))?;
        let q = q.reshape((b, h, c))?; // [B, H, C]
        let k = self.linear_k.forward(m)?; // [B, N, C]
        let v = self.linear_v.forward(m)?; // [B, N, C]
        let bias = super::primitives::mask_bias(mask, self.inf)?.unsqueeze(1)?; // [B, 1, N]
        let a = softmax_with_biases(&q.matmul(&k.t()?)?, &[&bias])?; // [B, H, N]
        let o = a.matmul(&v)?; // [B, H, C]
        let g = sigmoid(&self.linear_g.forward(m)?)?.reshape((b, n, h, c))?; // [B, N, H, C]
        let o = g.broadcast_mul(&o.unsqueeze(1)?)?.reshape((b, n, h * c))?;
        self.linear_o.forward(&o)
    }
}
