//! Algorithm 10: outer product mean (MSA → pair update).

use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::primitives::{LayerNorm, Linear, LinearInit};
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
        let mask = &super::primitives::cast(mask, m.dtype())?;
        let (s, r, _) = m.dims3()?;
        let c = self.c_hidden;
        let ln = self.layer_norm.forward(m)?;
        let mask3 = mask.unsqueeze(2)?; // [S, R, 1]
        let a = self.linear_1.forward(&ln)?.broadcast_mul(&mask3)?; // [S, R, C]
        let b = self.linear_2.forward(&ln)?.broadcast_mul(&mask3)?; // [S, R, C]
                                                                    // outer[i, j, c1, c2] = Σ_s a[s, i, c1] b[s, j, c2] as one (R·C, S) x (S, R·C) matmul.
        let a2 = a.reshape((s, r * c))?.t()?; // [R*C, S] (transposed view)
        let b2 = b.reshape((s, r * c))?; // [S, R*C]
        let outer = a2
            .matmul(&b2)? // [R*C (i,c1), R*C (j,c2)]
            .reshape((r, c, r, c))?
            .transpose(1, 2)? // [R_i, R_j, c1, c2]
            .contiguous()?
            .reshape((r, r, c * c))?; // index c1*C + c2
        let outer = self.linear_out.forward(&outer)?; // bias included before normalisation
                                                      // norm[i, j] = Σ_s mask[s, i] mask[s, j] + eps
        let norm = (mask.t()?.matmul(mask)? + self.eps)?.unsqueeze(2)?; // [R, R, 1]
        Ok(outer.broadcast_div(&norm)?)
    }
}
