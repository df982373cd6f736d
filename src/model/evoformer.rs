//! Algorithm 6: the Evoformer block and stack, plus the pair stack shared with the extra-MSA
//! block (Algorithm 18, see `extra_msa.rs`).

use candle_core::backprop::GradStore;
use candle_core::{IndexOp, Tensor, Var};
use candle_nn::VarBuilder;

use super::dropout::{add_dropout_columnwise, add_dropout_rowwise, DropoutCtx};
use super::msa::{MsaColSaved, MsaColumnAttention, MsaRowAttentionWithPairBias, MsaRowSaved};
use super::outer_product_mean::{OpmSaved, OuterProductMean};
use super::primitives::{cast, Linear, LinearInit};
use super::remat::{backward_vars, forward_blocks, vjp_loss, BlocksTape, TrunkBlock};
use super::transition::{MsaTransition, PairTransition, TransitionSaved};
use super::triangle_attention::{TriAttSaved, TriangleAttention};
use super::triangle_multiplication::{TriMulSaved, TriangleMultiplication};
use super::vjp::residual_dropout_nograd;
use crate::config::{ModelConfig, Remat, StackConfig, TrunkBackward};
use crate::error::Result;
use crate::kernels::add::add;
use crate::kernels::dropout_residual::dropout_grad;

/// Dimensions of one Evoformer-like block (main Evoformer or extra-MSA stack).
#[derive(Debug, Clone, PartialEq)]
pub struct BlockConfig {
    /// MSA channels (`c_m`, or `c_e` in the extra-MSA stack).
    pub c_m: usize,
    pub c_z: usize,
    pub stack: StackConfig,
    /// Mask bias magnitude (`inf * (mask - 1)`), 1e9 in AF2/OpenFold.
    pub inf: f64,
    /// Outer-product-mean normaliser epsilon (1e-3).
    pub eps_opm: f64,
    /// Global column attention masked-mean epsilon (OpenFold config `eps`, 1e-8).
    pub eps_global: f64,
    /// How the blocks are differentiated in training.
    pub backward: TrunkBackward,
}

impl BlockConfig {
    /// The main Evoformer stack of `cfg`.
    pub fn evoformer(cfg: &ModelConfig) -> Self {
        Self {
            c_m: cfg.c_m,
            c_z: cfg.c_z,
            stack: cfg.evoformer.clone(),
            inf: cfg.inf,
            eps_opm: cfg.eps_opm,
            eps_global: 1e-8,
            backward: cfg.backward,
        }
    }

    /// The extra-MSA stack of `cfg` (MSA channels `c_e`).
    pub fn extra_msa(cfg: &ModelConfig) -> Self {
        Self {
            c_m: cfg.c_e,
            stack: cfg.extra_msa.clone(),
            ..Self::evoformer(cfg)
        }
    }
}

/// The pair half of Algorithm 6 (lines 6-10), OpenFold `PairStack` (`pair_stack.*`).
#[derive(Debug, Clone)]
pub struct PairStack {
    pub tri_mul_out: TriangleMultiplication,
    pub tri_mul_in: TriangleMultiplication,
    pub tri_att_start: TriangleAttention,
    pub tri_att_end: TriangleAttention,
    pub pair_transition: PairTransition,
    pub pair_dropout: f64,
}

impl PairStack {
    pub fn new(vb: VarBuilder, cfg: &BlockConfig) -> Result<Self> {
        let s = &cfg.stack;
        let (c_z, inf) = (cfg.c_z, cfg.inf);
        Ok(Self {
            tri_mul_out: TriangleMultiplication::outgoing(
                vb.pp("tri_mul_out"),
                c_z,
                s.c_hidden_mul,
            )?,
            tri_mul_in: TriangleMultiplication::incoming(vb.pp("tri_mul_in"), c_z, s.c_hidden_mul)?,
            tri_att_start: TriangleAttention::new(
                vb.pp("tri_att_start"),
                c_z,
                s.c_hidden_pair_att,
                s.no_heads_pair,
                true,
                inf,
            )?,
            tri_att_end: TriangleAttention::new(
                vb.pp("tri_att_end"),
                c_z,
                s.c_hidden_pair_att,
                s.no_heads_pair,
                false,
                inf,
            )?,
            pair_transition: PairTransition::new(vb.pp("pair_transition"), c_z, s.transition_n)?,
            pair_dropout: s.pair_dropout,
        })
    }

    /// `z` `[R, R, c_z]`, `pair_mask` `[R, R]`. Dropout sites use `dropout.fork(1..=4)`.
    pub fn forward(
        &self,
        z: &Tensor,
        pair_mask: &Tensor,
        dropout: Option<&DropoutCtx>,
    ) -> Result<Tensor> {
        let d = |k: u64| dropout.map(|c| c.fork(k));
        let p = self.pair_dropout;
        // Residual adds of the dropped-out updates: one fused kernel each on CUDA.
        let z = add_dropout_rowwise(
            z,
            &self.tri_mul_out.forward(z, pair_mask)?,
            p,
            d(1).as_ref(),
        )?;
        let z = add_dropout_rowwise(
            &z,
            &self.tri_mul_in.forward(&z, pair_mask)?,
            p,
            d(2).as_ref(),
        )?;
        let z = add_dropout_rowwise(
            &z,
            &self.tri_att_start.forward(&z, pair_mask)?,
            p,
            d(3).as_ref(),
        )?;
        // Ending node: row-wise dropout in the transposed frame = column-wise here.
        let z = add_dropout_columnwise(
            &z,
            &self.tri_att_end.forward(&z, pair_mask)?,
            p,
            d(4).as_ref(),
        )?;
        // `_mask_trans = False` (OpenFold model default): the pair transition is unmasked.
        Ok((&z + self.pair_transition.forward(&z, None)?)?)
    }
}

/// What [`PairStack::backward`] keeps from [`PairStack::forward_saved`].
pub struct PairStackSaved {
    /// Activation dtype.
    dtype: candle_core::DType,
    tri_mul_out: TriMulSaved,
    tri_mul_in: TriMulSaved,
    tri_att_start: TriAttSaved,
    tri_att_end: TriAttSaved,
    pair_transition: TransitionSaved,
}

impl PairStack {
    /// [`Self::forward`] without a graph, keeping what [`Self::backward`] needs (hand-written
    /// backward, see [`super::vjp`]). Same dropout masks as [`Self::forward`].
    pub fn forward_saved(
        &self,
        z: &Tensor,
        pair_mask: &Tensor,
        dropout: Option<&DropoutCtx>,
    ) -> Result<(Tensor, PairStackSaved)> {
        let d = |k: u64| dropout.map(|c| c.fork(k));
        let p = self.pair_dropout;
        let (u, tri_mul_out) = self.tri_mul_out.forward_saved(z, pair_mask)?;
        let z = residual_dropout_nograd(z, &u, p, 0, d(1).as_ref())?;
        let (u, tri_mul_in) = self.tri_mul_in.forward_saved(&z, pair_mask)?;
        let z = residual_dropout_nograd(&z, &u, p, 0, d(2).as_ref())?;
        let (u, tri_att_start) = self.tri_att_start.forward_saved(&z, pair_mask)?;
        let z = residual_dropout_nograd(&z, &u, p, 0, d(3).as_ref())?;
        let (u, tri_att_end) = self.tri_att_end.forward_saved(&z, pair_mask)?;
        let z = residual_dropout_nograd(&z, &u, p, 1, d(4).as_ref())?;
        let (u, pair_transition) = self.pair_transition.forward_saved(&z, None)?;
        let z = add(&z, &u)?;
        let saved = PairStackSaved {
            dtype: z.dtype(),
            tri_mul_out,
            tri_mul_in,
            tri_att_start,
            tri_att_end,
            pair_transition,
        };
        Ok((z, saved))
    }

    /// Backward of [`Self::forward_saved`] for the output cotangent `dz` (in the activation
    /// dtype): parameter gradients into `grads`, returns the input's gradient.
    pub fn backward(
        &self,
        s: PairStackSaved,
        dz: &Tensor,
        dropout: Option<&DropoutCtx>,
        grads: &mut GradStore,
    ) -> Result<Tensor> {
        let d = |k: u64| dropout.map(|c| c.fork(k));
        let p = self.pair_dropout;
        let dz = &cast(&dz.detach(), s.dtype)?;
        // Each step is `z_out = z_in + drop(f(z_in))`: dz_in = dz_out + f'(drop'(dz_out)).
        let dz = add(
            dz,
            &self
                .pair_transition
                .backward(s.pair_transition, dz, grads)?,
        )?;
        let du = dropout_grad(&dz, p, 1, d(4).as_ref())?;
        let dz = add(&dz, &self.tri_att_end.backward(s.tri_att_end, &du, grads)?)?;
        let du = dropout_grad(&dz, p, 0, d(3).as_ref())?;
        let dz = add(
            &dz,
            &self.tri_att_start.backward(s.tri_att_start, &du, grads)?,
        )?;
        let du = dropout_grad(&dz, p, 0, d(2).as_ref())?;
        let dz = add(&dz, &self.tri_mul_in.backward(s.tri_mul_in, &du, grads)?)?;
        let du = dropout_grad(&dz, p, 0, d(1).as_ref())?;
        add(&dz, &self.tri_mul_out.backward(s.tri_mul_out, &du, grads)?)
    }
}

/// Algorithm 6: one Evoformer block.
#[derive(Debug, Clone)]
pub struct EvoformerBlock {
    pub msa_att_row: MsaRowAttentionWithPairBias,
    pub msa_att_col: MsaColumnAttention,
    pub msa_transition: MsaTransition,
    pub outer_product_mean: OuterProductMean,
    pub pair_stack: PairStack,
    pub msa_dropout: f64,
    pub backward: TrunkBackward,
}

impl EvoformerBlock {
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
            msa_att_col: MsaColumnAttention::new(
                vb.pp("msa_att_col"),
                cfg.c_m,
                s.c_hidden_msa_att,
                s.no_heads_msa,
                cfg.inf,
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

    /// `m` `[S, R, c_m]`, `z` `[R, R, c_z]`, `msa_mask` `[S, R]`, `pair_mask` `[R, R]` → updated
    /// `(m, z)` (full activations, residuals included).
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
        // `_mask_trans = False`: the MSA transition is unmasked.
        let m = (&m + self.msa_transition.forward(&m, None)?)?;
        let z = (z + self.outer_product_mean.forward(&m, msa_mask)?)?;
        let z = self.pair_stack.forward(&z, pair_mask, dropout)?;
        Ok((m, z))
    }
}

/// The column-wise MSA module of a block with a hand-written backward: Algorithm 8 (Evoformer)
/// or Algorithm 19 (extra MSA).
pub trait MsaColumnModule {
    type Saved;
    fn forward_saved(&self, m: &Tensor, mask: &Tensor) -> Result<(Tensor, Self::Saved)>;
    fn backward(&self, s: Self::Saved, dy: &Tensor, grads: &mut GradStore) -> Result<Tensor>;
}

impl MsaColumnModule for MsaColumnAttention {
    type Saved = MsaColSaved;
    fn forward_saved(&self, m: &Tensor, mask: &Tensor) -> Result<(Tensor, MsaColSaved)> {
        MsaColumnAttention::forward_saved(self, m, mask)
    }
    fn backward(&self, s: MsaColSaved, dy: &Tensor, grads: &mut GradStore) -> Result<Tensor> {
        MsaColumnAttention::backward(self, s, dy, grads)
    }
}

/// The sub-modules of Algorithm 6 / Algorithm 18 in order, for the hand-written forward and
/// backward both blocks share.
pub struct MsaBlockParts<'a, C> {
    pub msa_att_row: &'a MsaRowAttentionWithPairBias,
    pub msa_att_col: &'a C,
    pub msa_transition: &'a MsaTransition,
    /// The extra-MSA block masks its MSA transition; the Evoformer block does not.
    pub mask_msa_transition: bool,
    pub outer_product_mean: &'a OuterProductMean,
    pub pair_stack: &'a PairStack,
    pub msa_dropout: f64,
}

/// What [`MsaBlockParts::backward`] keeps from [`MsaBlockParts::forward_saved`].
pub struct MsaBlockSaved<S> {
    msa_att_row: MsaRowSaved,
    msa_att_col: S,
    msa_transition: TransitionSaved,
    outer_product_mean: OpmSaved,
    pair_stack: PairStackSaved,
}

impl<C: MsaColumnModule> MsaBlockParts<'_, C> {
    /// The block's forward without a graph, keeping what [`Self::backward`] needs (hand-written
    /// backward, see [`super::vjp`]). Same dropout masks as the blocks' `forward`.
    pub fn forward_saved(
        &self,
        m: &Tensor,
        z: &Tensor,
        msa_mask: &Tensor,
        pair_mask: &Tensor,
        dropout: Option<&DropoutCtx>,
    ) -> Result<(Tensor, Tensor, MsaBlockSaved<C::Saved>)> {
        let (m, z) = (m.detach(), z.detach());
        let d0 = dropout.map(|c| c.fork(0));
        let (row, msa_att_row) = self.msa_att_row.forward_saved(&m, &z, msa_mask)?;
        let m = residual_dropout_nograd(&m, &row, self.msa_dropout, 0, d0.as_ref())?;
        let (col, msa_att_col) = self.msa_att_col.forward_saved(&m, msa_mask)?;
        let m = add(&m, &col)?;
        let tmask = self.mask_msa_transition.then_some(msa_mask);
        let (tr, msa_transition) = self.msa_transition.forward_saved(&m, tmask)?;
        let m = add(&m, &tr)?;
        let (opm, outer_product_mean) = self.outer_product_mean.forward_saved(&m, msa_mask)?;
        let z = add(&z, &opm)?;
        let (z, pair_stack) = self.pair_stack.forward_saved(&z, pair_mask, dropout)?;
        let saved = MsaBlockSaved {
            msa_att_row,
            msa_att_col,
            msa_transition,
            outer_product_mean,
            pair_stack,
        };
        Ok((m, z, saved))
    }

    /// Backward of [`Self::forward_saved`] (same `dropout`): parameter gradients into `grads`,
    /// returns the gradients of the block's inputs `(dm, dz)` in the activation dtype.
    pub fn backward(
        &self,
        s: MsaBlockSaved<C::Saved>,
        dm: &Tensor,
        dz: &Tensor,
        dropout: Option<&DropoutCtx>,
        grads: &mut GradStore,
    ) -> Result<(Tensor, Tensor)> {
        let d0 = dropout.map(|c| c.fork(0));
        let dz = self.pair_stack.backward(s.pair_stack, dz, dropout, grads)?;
        let dm = cast(&dm.detach(), dz.dtype())?;
        let dm = add(
            &dm,
            &self
                .outer_product_mean
                .backward(s.outer_product_mean, &dz, grads)?,
        )?;
        let dm = add(
            &dm,
            &self.msa_transition.backward(s.msa_transition, &dm, grads)?,
        )?;
        let dm = add(&dm, &self.msa_att_col.backward(s.msa_att_col, &dm, grads)?)?;
        let du = dropout_grad(&dm, self.msa_dropout, 0, d0.as_ref())?;
        let (dm_row, dz_row) = self.msa_att_row.backward(s.msa_att_row, &du, grads)?;
        Ok((add(&dm, &dm_row)?, add(&dz, &dz_row)?))
    }
}

/// An Evoformer-like block (Algorithm 6 or 18): its sub-modules in order and its autograd
/// forward. Every such block is a [`TrunkBlock`].
pub trait MsaBlock {
    type Col: MsaColumnModule;
    /// The sub-modules in order (see [`MsaBlockParts`]).
    fn parts(&self) -> MsaBlockParts<'_, Self::Col>;
    /// How training differentiates the block.
    fn backward_mode(&self) -> TrunkBackward;
    /// The block's forward through candle ops (differentiable by autograd).
    fn forward_graph(
        &self,
        m: &Tensor,
        z: &Tensor,
        msa_mask: &Tensor,
        pair_mask: &Tensor,
        dropout: Option<&DropoutCtx>,
    ) -> Result<(Tensor, Tensor)>;
}

impl<B: MsaBlock> TrunkBlock for B {
    type Saved = MsaBlockSaved<<B::Col as MsaColumnModule>::Saved>;

    fn manual_backward(&self) -> bool {
        self.backward_mode() == TrunkBackward::Manual
    }

    fn forward_block_saved(
        &self,
        m: &Tensor,
        z: &Tensor,
        msa_mask: &Tensor,
        pair_mask: &Tensor,
        dropout: Option<&DropoutCtx>,
    ) -> Result<(Tensor, Tensor, Self::Saved)> {
        self.parts()
            .forward_saved(m, z, msa_mask, pair_mask, dropout)
    }

    fn backward_block(
        &self,
        saved: Self::Saved,
        dm: &Tensor,
        dz: &Tensor,
        dropout: Option<&DropoutCtx>,
        grads: &mut GradStore,
    ) -> Result<(Tensor, Tensor)> {
        self.parts().backward(saved, dm, dz, dropout, grads)
    }

    fn forward_block(
        &self,
        m: &Tensor,
        z: &Tensor,
        msa_mask: &Tensor,
        pair_mask: &Tensor,
        dropout: Option<&DropoutCtx>,
    ) -> Result<(Tensor, Tensor)> {
        self.forward_graph(m, z, msa_mask, pair_mask, dropout)
    }
}

impl MsaBlock for EvoformerBlock {
    type Col = MsaColumnAttention;

    fn parts(&self) -> MsaBlockParts<'_, MsaColumnAttention> {
        MsaBlockParts {
            msa_att_row: &self.msa_att_row,
            msa_att_col: &self.msa_att_col,
            msa_transition: &self.msa_transition,
            mask_msa_transition: false,
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

/// Outputs of the Evoformer stack.
#[derive(Debug, Clone)]
pub struct EvoformerOutput {
    /// `[S, R, c_m]`
    pub m: Tensor,
    /// `[R, R, c_z]`
    pub z: Tensor,
    /// Single representation `[R, c_s]` = `linear(m[0])`.
    pub s: Tensor,
}

/// Gradients produced by a trunk tape's backward pass.
pub struct TrunkGrads {
    /// Parameter gradients, keyed by the parameters' `Var` tensors.
    pub params: GradStore,
    /// Gradient w.r.t. the MSA input of the stack.
    pub dm: Tensor,
    /// Gradient w.r.t. the pair input of the stack.
    pub dz: Tensor,
}

/// The Evoformer stack (Algorithm 2 lines 17-19): `no_blocks` blocks, then the single projection.
#[derive(Debug, Clone)]
pub struct EvoformerStack {
    pub blocks: Vec<EvoformerBlock>,
    /// c_m → c_s, applied to the first MSA row.
    pub linear: Linear,
}

impl EvoformerStack {
    pub fn new(vb: VarBuilder, cfg: &BlockConfig, c_s: usize) -> Result<Self> {
        let blocks = (0..cfg.stack.num_blocks)
            .map(|i| EvoformerBlock::new(vb.pp("blocks").pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        let linear = Linear::new(vb.pp("linear"), cfg.c_m, c_s, true, LinearInit::Default)?;
        Ok(Self { blocks, linear })
    }

    /// Plain forward (one graph; for inference or small models). Block `i` uses
    /// `dropout.fork(i)`.
    pub fn forward(
        &self,
        m: &Tensor,
        z: &Tensor,
        msa_mask: &Tensor,
        pair_mask: &Tensor,
        dropout: Option<&DropoutCtx>,
    ) -> Result<EvoformerOutput> {
        let (mut m, mut z) = (m.clone(), z.clone());
        for (i, b) in self.blocks.iter().enumerate() {
            let d = dropout.map(|c| c.fork(i as u64));
            (m, z) = b.forward(&m, &z, msa_mask, pair_mask, d.as_ref())?;
        }
        let s = self.single(&m)?;
        Ok(EvoformerOutput { m, z, s })
    }

    /// `s = linear(m[0])`.
    pub fn single(&self, m: &Tensor) -> Result<Tensor> {
        self.linear.forward(&m.i(0)?)
    }

    /// Training forward with activation recomputation policy `remat`. The returned outputs are
    /// detached; pass their upstream gradients to [`EvoformerTape::backward`].
    pub fn forward_train(
        &self,
        m: &Tensor,
        z: &Tensor,
        msa_mask: &Tensor,
        pair_mask: &Tensor,
        dropout: Option<DropoutCtx>,
        remat: Remat,
    ) -> Result<(EvoformerOutput, EvoformerTape<'_>)> {
        let (m_out, z_out, blocks) =
            forward_blocks(&self.blocks, m, z, msa_mask, pair_mask, dropout, remat)?;
        let s = self.single(&m_out)?.detach();
        let out = EvoformerOutput {
            m: m_out.clone(),
            z: z_out,
            s,
        };
        Ok((
            out,
            EvoformerTape {
                stack: self,
                m_out,
                blocks,
            },
        ))
    }
}

/// Backward handle of [`EvoformerStack::forward_train`].
pub struct EvoformerTape<'a> {
    stack: &'a EvoformerStack,
    m_out: Tensor,
    blocks: BlocksTape<'a, EvoformerBlock>,
}

impl EvoformerTape<'_> {
    /// Upstream gradients of `m`, `z`, `s` → parameter gradients and input gradients.
    pub fn backward(self, dm: &Tensor, dz: &Tensor, ds: &Tensor) -> Result<TrunkGrads> {
        // The single projection on a fresh graph from the final MSA.
        let m_fin = Var::from_tensor(&self.m_out)?;
        let s = self.stack.single(m_fin.as_tensor())?;
        let mut params = backward_vars(&vjp_loss(&[(&s, ds)])?)?;
        let dm_total = match params.remove(m_fin.as_tensor()) {
            Some(g) => (dm.detach() + g)?,
            None => dm.detach(),
        };
        let (dm, dz) = self.blocks.backward(&dm_total, dz, &mut params)?;
        Ok(TrunkGrads { params, dm, dz })
    }
}
