//! Algorithms 11 and 12: triangular multiplicative update using outgoing / incoming edges.

use candle_core::backprop::GradStore;
use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::primitives::{mul_const, sigmoid, LayerNorm, Linear, LinearInit};
use crate::error::Result;

/// Triangle multiplicative update (OpenFold `TriangleMultiplicativeUpdate`); `outgoing` selects
/// Algorithm 11 (`x[i,j] = Σ_k a[i,k] b[j,k]`) or Algorithm 12 (`x[i,j] = Σ_k a[k,i] b[k,j]`).
#[derive(Debug, Clone)]
pub struct TriangleMultiplication {
    pub layer_norm_in: LayerNorm,
    pub layer_norm_out: LayerNorm,
    pub linear_a_p: Linear,
    pub linear_a_g: Linear,
    pub linear_b_p: Linear,
    pub linear_b_g: Linear,
    pub linear_g: Linear,
    pub linear_z: Linear,
    pub outgoing: bool,
}

impl TriangleMultiplication {
    pub fn new(vb: VarBuilder, c_z: usize, c_hidden: usize, outgoing: bool) -> Result<Self> {
        use LinearInit::*;
        Ok(Self {
            layer_norm_in: LayerNorm::new(vb.pp("layer_norm_in"), c_z)?,
            layer_norm_out: LayerNorm::new(vb.pp("layer_norm_out"), c_hidden)?,
            linear_a_p: Linear::new(vb.pp("linear_a_p"), c_z, c_hidden, true, Default)?,
            linear_a_g: Linear::new(vb.pp("linear_a_g"), c_z, c_hidden, true, Gating)?,
            linear_b_p: Linear::new(vb.pp("linear_b_p"), c_z, c_hidden, true, Default)?,
            linear_b_g: Linear::new(vb.pp("linear_b_g"), c_z, c_hidden, true, Gating)?,
            linear_g: Linear::new(vb.pp("linear_g"), c_z, c_z, true, Gating)?,
            linear_z: Linear::new(vb.pp("linear_z"), c_hidden, c_z, true, Final)?,
            outgoing,
        })
    }

    /// Algorithm 11 (outgoing edges).
    pub fn outgoing(vb: VarBuilder, c_z: usize, c_hidden: usize) -> Result<Self> {
        Self::new(vb, c_z, c_hidden, true)
    }

    /// Algorithm 12 (incoming edges).
    pub fn incoming(vb: VarBuilder, c_z: usize, c_hidden: usize) -> Result<Self> {
        Self::new(vb, c_z, c_hidden, false)
    }

    /// `z` `[R, R, c_z]`, `mask` `[R, R]` → update `[R, R, c_z]`.
    pub fn forward(&self, z: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (zln, a, b) = self.project(z, mask)?;
        self.combine(&zln, &a, &b)
    }

    /// `(LN_in(z), a, b)` for the pair entries `z` `[I, J, c_z]` (`mask` `[I, J]`); `a`, `b` are
    /// `[I, J, C]`.
    pub fn project(&self, z: &Tensor, mask: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let mask = &super::primitives::cast(mask, z.dtype())?;
        let z = self.layer_norm_in.forward(z)?;
        let mask3 = mask.unsqueeze(2)?; // [I, J, 1]
        let a = mul_const(&sigmoid(&self.linear_a_g.forward(&z)?)?, &mask3)?
            .mul(&self.linear_a_p.forward(&z)?)?; // [I, J, C]
        let b = mul_const(&sigmoid(&self.linear_b_g.forward(&z)?)?, &mask3)?
            .mul(&self.linear_b_p.forward(&z)?)?; // [I, J, C]
        Ok((z, a, b))
    }

    /// The triangle product of `a` and `b`, `LN_out`, `linear_z` and the gate from `zln`
    /// `[I, J, c_z]`. Outgoing: `a` `[I, K, C]`, `b` `[J, K, C]`; incoming: `a` `[K, I, C]`,
    /// `b` `[K, J, C]` (under DAP one of them is all-gathered, the other is this rank's part).
    pub fn combine(&self, zln: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        // Channel-first batched matmul: [C, I, K] x [C, K, J] → [C, I, J].
        let (a_cik, b_ckj) = if self.outgoing {
            // x[i,j,c] = Σ_k a[i,k,c] b[j,k,c]
            (a.permute((2, 0, 1))?, b.permute((2, 1, 0))?)
        } else {
            // x[i,j,c] = Σ_k a[k,i,c] b[k,j,c]
            (a.permute((2, 1, 0))?, b.permute((2, 0, 1))?)
        };
        let x = a_cik
            .contiguous()?
            .matmul(&b_ckj.contiguous()?)?
            .permute((1, 2, 0))?
            .contiguous()?; // [I, J, C]
        let x = self.linear_z.forward(&self.layer_norm_out.forward(&x)?)?;
        // x * sigmoid(linear_g(zln)): one fused kernel on CUDA.
        crate::kernels::gate::gate(&x, &self.linear_g.forward(zln)?)
    }
}

/// What [`TriangleMultiplication::backward`] keeps from [`TriangleMultiplication::forward_saved`].
pub struct TriMulSaved(super::vjp::AutogradVjp);

impl TriangleMultiplication {
    /// [`Self::forward`] without a graph, keeping what [`Self::backward`] needs (see
    /// [`super::vjp`]). (Generic version: the module's candle graph is kept.)
    pub fn forward_saved(&self, z: &Tensor, mask: &Tensor) -> Result<(Tensor, TriMulSaved)> {
        let mask = mask.detach();
        let v = super::vjp::AutogradVjp::run(&[z], |i| Ok(vec![self.forward(&i[0], &mask)?]))?;
        let y = super::vjp::first(v.outputs())?;
        Ok((y, TriMulSaved(v)))
    }

    /// Backward of [`Self::forward_saved`]: parameter gradients into `grads`, returns the input
    /// gradient.
    pub fn backward(&self, s: TriMulSaved, dy: &Tensor, grads: &mut GradStore) -> Result<Tensor> {
        super::vjp::first(s.0.backward(&[dy], grads)?)
    }
}
