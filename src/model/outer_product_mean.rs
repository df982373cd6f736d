//! Algorithm 10: outer product mean (MSA → pair update).

use candle_core::backprop::GradStore;
use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::primitives::{mul_const, LayerNorm, Linear, LinearInit};
use crate::error::Result;

/// Algorithm 10 (OpenFold `OuterProductMean`).
#[derive(Debug, Clone)]
pub struct OuterProductMean {
    pub layer_norm: LayerNorm,
    pub linear_1: Linear,
    pub linear_2: Linear,
    pub linear_out: Linear,
    pub c_hidden: usize,
    pub eps: f64,
}

impl OuterProductMean {
    /// `eps` is added to the pairwise sequence count (OpenFold: 1e-3).
    pub fn new(vb: VarBuilder, c_m: usize, c_z: usize, c_hidden: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            layer_norm: LayerNorm::new(vb.pp("layer_norm"), c_m)?,
            linear_1: Linear::new(vb.pp("linear_1"), c_m, c_hidden, true, LinearInit::Default)?,
            linear_2: Linear::new(vb.pp("linear_2"), c_m, c_hidden, true, LinearInit::Default)?,
            linear_out: Linear::new(
                vb.pp("linear_out"),
                c_hidden * c_hidden,
                c_z,
                true,
                LinearInit::Final,
            )?,
            c_hidden,
            eps,
        })
    }

    /// `m` `[S, R, c_m]`, `mask` `[S, R]` → pair update `[R, R, c_z]`.
    pub fn forward(&self, m: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (a, b) = self.project(m, mask)?;
        self.combine(&a, &b, mask, mask)
    }

    /// The masked projections `(a, b)`, each `[S, R, C]`, of `m` `[S, R, c_m]` (`mask` `[S, R]`).
    pub fn project(&self, m: &Tensor, mask: &Tensor) -> Result<(Tensor, Tensor)> {
        let mask = &super::primitives::cast(mask, m.dtype())?;
        let ln = self.layer_norm.forward(m)?;
        let mask3 = mask.unsqueeze(2)?; // [S, R, 1]
        let a = mul_const(&self.linear_1.forward(&ln)?, &mask3)?; // [S, R, C]
        let b = mul_const(&self.linear_2.forward(&ln)?, &mask3)?; // [S, R, C]
        Ok((a, b))
    }

    /// Outer product of `a` `[S, Ri, C]` (rows `i`) and `b` `[S, Rj, C]` (columns `j`), then
    /// `linear_out` and the mean over sequences (`mask_a` `[S, Ri]`, `mask_b` `[S, Rj]`) →
    /// `[Ri, Rj, c_z]`. `Ri != Rj` when DAP gives this rank only some rows `i`.
    pub fn combine(
        &self,
        a: &Tensor,
        b: &Tensor,
        mask_a: &Tensor,
        mask_b: &Tensor,
    ) -> Result<Tensor> {
        let mask_a = &super::primitives::cast(mask_a, a.dtype())?;
        let mask_b = &super::primitives::cast(mask_b, a.dtype())?;
        let (s, ri, c) = a.dims3()?;
        let (_, rj, _) = b.dims3()?;
        // outer[i, j, c1, c2] = Σ_s a[s, i, c1] b[s, j, c2] as one (Ri·C, S) x (S, Rj·C) matmul.
        let a2 = a.reshape((s, ri * c))?.t()?; // [Ri*C, S] (transposed view)
        let b2 = b.reshape((s, rj * c))?; // [S, Rj*C]
        let outer = a2
            .matmul(&b2)? // [Ri*C (i,c1), Rj*C (j,c2)]
            .reshape((ri, c, rj, c))?
            .transpose(1, 2)? // [Ri, Rj, c1, c2]
            .contiguous()?
            .reshape((ri, rj, c * c))?; // index c1*C + c2
        let outer = self.linear_out.forward(&outer)?; // bias included before normalisation
                                                      // norm[i, j] = Σ_s mask[s, i] mask[s, j] + eps
        let norm = (mask_a.t()?.matmul(mask_b)? + self.eps)?.unsqueeze(2)?; // [Ri, Rj, 1]
        mul_const(&outer, &norm.recip()?)
    }
}

/// What [`OuterProductMean::backward`] keeps from [`OuterProductMean::forward_saved`].
pub struct OpmSaved(super::vjp::AutogradVjp);

impl OuterProductMean {
    /// [`Self::forward`] without a graph, keeping what [`Self::backward`] needs (see
    /// [`super::vjp`]). (Generic version: the module's candle graph is kept.)
    pub fn forward_saved(&self, m: &Tensor, mask: &Tensor) -> Result<(Tensor, OpmSaved)> {
        let mask = mask.detach();
        let v = super::vjp::AutogradVjp::run(&[m], |i| Ok(vec![self.forward(&i[0], &mask)?]))?;
        let y = super::vjp::first(v.outputs())?;
        Ok((y, OpmSaved(v)))
    }

    /// Backward of [`Self::forward_saved`]: parameter gradients into `grads`, returns the input
    /// gradient.
    pub fn backward(&self, s: OpmSaved, dy: &Tensor, grads: &mut GradStore) -> Result<Tensor> {
        super::vjp::first(s.0.backward(&[dy], grads)?)
    }
}
