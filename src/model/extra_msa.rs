//! Algorithm 18: the extra-MSA block and stack (global column attention, masked MSA transition).

use candle_core::backprop::GradStore;
use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::dropout::{add_dropout_rowwise, DropoutCtx};
use super::evoformer::{
    BlockConfig, MsaBlock, MsaBlockParts, MsaColumnModule, PairStack, TrunkGrads,
};
use super::msa::{MsaColumnGlobalAttention, MsaGlobalColSaved, MsaRowAttentionWithPairBias};
use super::outer_product_mean::OuterProductMean;
use super::remat::{forward_blocks, BlocksTape};
use super::transition::MsaTransition;
use crate::config::{Remat, TrunkBackward};
use crate::error::Result;

/// One extra-MSA block (OpenFold `ExtraMSABlock`).
#[derive(Debug, Clone)]
pub struct ExtraMsaBlock {
    pub msa_att_row: MsaRowAttentionWithPairBias,
    pub msa_att_col: MsaColumnGlobalAttention,
    pub msa_transition: MsaTransition,
    pub outer_product_mean: OuterProductMean,
    pub pair_stack: PairStack,
    pub msa_dropout: f64,
    pub backward: TrunkBackward,
}

impl ExtraMsaBlock {
    /// `cfg.c_m` is the extra-MSA channel count `c_e`.
    pub fn new(vb: VarBuilder, cfg: &BlockConfig) -> Result<Self> {
        let s = &cfg.stack;
        Ok(Self {
            msa_att_row: MsaRowAttentionWithPairBias::new(
                vb.pp("msa_att_row"),
                cfg.c_m,
                cfg.c_z,
                s.c_hidden_msa_att,
                s.no_heads_msa,
                cfg.inf,
            )?,
            msa_att_col: MsaColumnGlobalAttention::new(
                vb.pp("msa_att_col"),
                cfg.c_m,
                s.c_hidden_msa_att,
                s.no_heads_msa,
                cfg.inf,
                cfg.eps_global,
            )?,
            msa_transition: MsaTransition::new(vb.pp("msa_transition"), cfg.c_m, s.transition_n)?,
            outer_product_mean: OuterProductMean::new(
                vb.pp("outer_product_mean"),
                cfg.c_m,
                cfg.c_z,
                s.c_hidden_opm,
                cfg.eps_opm,
            )?,
            pair_stack: PairStack::new(vb.pp("pair_stack"), cfg)?,
            msa_dropout: s.msa_dropout,
            backward: cfg.backward,
        })
    }

    /// `m` `[S_e, R, c_e]`, `z` `[R, R, c_z]`, masks `[S_e, R]`, `[R, R]` → `(m, z)`.
    pub fn forward(
        &self,
        m: &Tensor,
        z: &Tensor,
        msa_mask: &Tensor,
        pair_mask: &Tensor,
        dropout: Option<&DropoutCtx>,
    ) -> Result<(Tensor, Tensor)> {
        let d0 = dropout.map(|c| c.fork(0));
        let row = self.msa_att_row.forward(m, z, msa_mask)?;
        let m = add_dropout_rowwise(m, &row, self.msa_dropout, d0.as_ref())?;
        let m = (&m + self.msa_att_col.forward(&m, msa_mask)?)?;
        // The extra-MSA transition always receives the MSA mask (OpenFold).
        let m = (&m + self.msa_transition.forward(&m, Some(msa_mask))?)?;
        let z = (z + self.outer_product_mean.forward(&m, msa_mask)?)?;
        let z = self.pair_stack.forward(&z, pair_mask, dropout)?;
        Ok((m, z))
    }
}

impl MsaColumnModule for MsaColumnGlobalAttention {
    type Saved = MsaGlobalColSaved;
    fn forward_saved(&self, m: &Tensor, mask: &Tensor) -> Result<(Tensor, MsaGlobalColSaved)> {
        MsaColumnGlobalAttention::forward_saved(self, m, mask)
    }
    fn backward(&self, s: MsaGlobalColSaved, dy: &Tensor, grads: &mut GradStore) -> Result<Tensor> {
        MsaColumnGlobalAttention::backward(self, s, dy, grads)
    }
}

impl MsaBlock for ExtraMsaBlock {
    type Col = MsaColumnGlobalAttention;

    /// The MSA transition of the extra-MSA block is masked.
    fn parts(&self) -> MsaBlockParts<'_, MsaColumnGlobalAttention> {
        MsaBlockParts {
            msa_att_row: &self.msa_att_row,
            msa_att_col: &self.msa_att_col,
            msa_transition: &self.msa_transition,
            mask_msa_transition: true,
            outer_product_mean: &self.outer_product_mean,
            pair_stack: &self.pair_stack,
            msa_dropout: self.msa_dropout,
        }
    }

    fn backward_mode(&self) -> TrunkBackward {
        self.backward
    }

    fn forward_graph(
        &self,
        m: &Tensor,
        z: &Tensor,
        msa_mask: &Tensor,
        pair_mask: &Tensor,
        dropout: Option<&DropoutCtx>,
    ) -> Result<(Tensor, Tensor)> {
        self.forward(m, z, msa_mask, pair_mask, dropout)
    }
}

/// The extra-MSA stack (Algorithm 2 line 16): blocks in sequence; only the pair output is used.
#[derive(Debug, Clone)]
pub struct ExtraMsaStack {
    pub blocks: Vec<ExtraMsaBlock>,
}

impl ExtraMsaStack {
    pub fn new(vb: VarBuilder, cfg: &BlockConfig) -> Result<Self> {
        let blocks = (0..cfg.stack.num_blocks)
            .map(|i| ExtraMsaBlock::new(vb.pp("blocks").pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { blocks })
    }

    /// Plain forward → updated pair `[R, R, c_z]`. Block `i` uses `dropout.fork(i)`.
    pub fn forward(
        &self,
        m: &Tensor,
        z: &Tensor,
        msa_mask: &Tensor,
        pair_mask: &Tensor,
        dropout: Option<&DropoutCtx>,
    ) -> Result<Tensor> {
        let (mut m, mut z) = (m.clone(), z.clone());
        for (i, b) in self.blocks.iter().enumerate() {
            let d = dropout.map(|c| c.fork(i as u64));
            (m, z) = b.forward(&m, &z, msa_mask, pair_mask, d.as_ref())?;
        }
        Ok(z)
    }

    /// Training forward with recomputation policy `remat`; returns the detached pair output and
    /// the backward handle.
    pub fn forward_train(
        &self,
        m: &Tensor,
        z: &Tensor,
        msa_mask: &Tensor,
        pair_mask: &Tensor,
        dropout: Option<DropoutCtx>,
        remat: Remat,
    ) -> Result<(Tensor, ExtraMsaTape<'_>)> {
        let (m_out, z_out, blocks) =
            forward_blocks(&self.blocks, m, z, msa_mask, pair_mask, dropout, remat)?;
        Ok((z_out, ExtraMsaTape { m_out, blocks }))
    }
}

/// Backward handle of [`ExtraMsaStack::forward_train`].
pub struct ExtraMsaTape<'a> {
    m_out: Tensor,
    blocks: BlocksTape<'a, ExtraMsaBlock>,
}

impl ExtraMsaTape<'_> {
    /// Upstream gradient of the pair output → parameter and input gradients.
    pub fn backward(self, dz: &Tensor) -> Result<TrunkGrads> {
        let mut params = candle_core::backprop::GradStore::default();
        let dm = self.m_out.zeros_like()?;
        let (dm, dz) = self.blocks.backward(&dm, dz, &mut params)?;
        Ok(TrunkGrads { params, dm, dz })
    }
}
