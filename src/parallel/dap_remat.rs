//! Training forward / backward of the DAP-sharded stacks ([`DapEvoformer`], [`DapExtraMsa`]) with
//! activation recomputation ("remat", `model.remat`), the DAP counterpart of
//! [`crate::model::remat`].
//!
//! # What is kept
//! The replicated inputs are padded and this rank's rows are kept (no communication); the block
//! loop runs on the row-sharded `m_row` `[Sp/n, Rp, c_m]`, `z_row` `[Rp/n, Rp, c_z]`
//! ([`super::dap_evoformer`] layout); the final shards are all-gathered and unpadded into the
//! (detached, replicated) outputs.
//! - [`Remat::None`]: one graph from the (fresh `Var`) input shards to the output shards.
//! - [`Remat::Block`]: every block runs on detached inputs and its graph is dropped at once; only
//!   the block inputs (this rank's shards of m and z) are kept.
//!
//! With `model.backward = "manual"` (every block) the forward is the graph-free sharded block of
//! `super::dap_manual` instead: `remat = none` keeps each block's saved state, `block` keeps the
//! block inputs and the backward recomputes block `i` with the saved state, then runs its
//! hand-written backward (explicit adjoint collectives; same collective order on every rank).
//! The no-gradient forward (recycles) then runs graph-free too.
//!
//! # Backward (gradient convention of [`super::dap`])
//! The upstream gradients of the replicated outputs are complete on every rank; the gather's
//! backward keeps this rank's rows of them (padded, no communication). Walking the blocks in
//! reverse, block `i` is rebuilt from its saved input shards wrapped as fresh `Var`s, *with its
//! collectives* (row-attention bias and outer-product/triangle operands all-gathered, the
//! all-to-alls between layouts, m's duality-async `col_to_row` with its overlap), and
//! `Σ out · upstream` is backpropagated through it: its DAP ops issue their backward collectives
//! there. The rank's partial parameter gradients are accumulated (summed over the DAP group later,
//! [`DapEvoformer::is_sharded_param`]), the input shards' gradients feed block `i - 1`. Finally the
//! scatter's backward all-gathers the first block's input gradients into the replicated input
//! gradients.
//!
//! # Collective order
//! Every rank runs the same blocks in the same order on the same shapes, so the recompute issues
//! the same forward collectives in the same order everywhere, and the backward of the identical
//! per-block graph (candle orders it by structure only) issues the same backward collectives in
//! the same order: every rank recomputes block `i` at the same time. Nothing else may issue
//! collectives on the DAP communicator between `forward_train` and `backward` on one rank but not
//! on the others.
//!
//! # Dropout
//! Block `i` draws from `dropout.fork(i)` and each site from a fixed fork of that (pure functions
//! of the seed, [`DropoutCtx`]), so the recompute applies exactly the masks of the forward pass.
//!
//! # Exactness
//! The recomputed block is the same computation as in the forward pass (same inputs, masks and
//! collectives; the MPI backend's all-gathers/all-to-alls are exact copies), so the rebuilt
//! outputs equal the forward outputs bitwise. With `n > 1` ranks the gradients equal
//! `Remat::None`'s bitwise too: a block's output shards come from its final all-to-alls (m's
//! `col_to_row`, z's `col_to_row`) and are consumed only by the next block, so no contribution is
//! summed in a different order at block boundaries (tested in `ferrofold-selftest dap-remat`).
//! With one rank the collectives are identities and, as in [`crate::model::remat`], the results
//! agree up to summation order.

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

use super::dap::Dap;
use super::dap_evoformer::{BlockParts, DapEvoformer, DapExtraMsa, DapLayout, DapTrunk, Masks};
use super::dap_manual::{profile, DapBlockSaved};
use crate::config::Remat;
use crate::error::Result;
use crate::model::dropout::DropoutCtx;
use crate::model::evoformer::{EvoformerOutput, EvoformerStack, TrunkGrads};
use crate::model::remat::{accumulate, backward_vars, block_dropout, vjp_loss};

/// What a DAP training forward keeps for its backward pass (row-sharded tensors of this rank).
enum Saved {
    /// Every block's hand-written-backward state (`model.backward = manual`, no remat).
    Manual(Vec<DapBlockSaved>),
    /// One graph from the input shards (`Var`s) to the output shards.
    Graph {
        m_in: Var,
        z_in: Var,
        m_out: Tensor,
        z_out: Tensor,
    },
    /// The detached input shards of every block (`blocks.len() + 1` entries: the last is the
    /// output of the last block).
    Inputs(Vec<(Tensor, Tensor)>),
}

/// The backward handle of a sharded block loop (shared by both stacks' tapes).
struct DapTape<'a> {
    trunk: DapTrunk,
    blocks: Vec<BlockParts<'a>>,
    masks: Masks,
    layout: DapLayout,
    dropout: Option<DropoutCtx>,
    saved: Saved,
}

fn grad_or_zeros(grads: &mut GradStore, t: &Tensor) -> Result<Tensor> {
    match grads.remove(t) {
        Some(g) => Ok(g),
        None => Ok(t.zeros_like()?),
    }
}

/// This rank's padded rows `[rows_p / n, cols_p, c]` of a replicated `[rows, cols, c]` tensor (the
/// backward of [`DapTrunk::unshard`]: keep the own chunk).
fn own_rows(x: &Tensor, rows_p: usize, cols_p: usize, dap: &Dap) -> Result<Tensor> {
    let (rows, cols, _) = x.dims3()?;
    let n = dap.size().max(1);
    let chunk = rows_p / n;
    Ok(x.detach()
        .pad_with_zeros(0, 0, rows_p - rows)?
        .pad_with_zeros(1, 0, cols_p - cols)?
        .narrow(0, dap.rank() * chunk, chunk)?
        .contiguous()?)
}

/// The replicated `[rows, cols, c]` gradient from every rank's row shard (the backward of
/// [`DapTrunk::shard`]: all-gather, drop the padding).
fn gather_rows(x: &Tensor, rows: usize, cols: usize, dap: &Dap) -> Result<Tensor> {
    Ok(dap
        .gather(&x.detach(), 0)?
        .narrow(0, 0, rows)?
        .narrow(1, 0, cols)?
        .contiguous()?)
}

impl DapTrunk {
    /// The block loop for training: replicated `m` `[S, R, c_m]`, `z` `[R, R, c_z]` → detached
    /// replicated outputs and the tape (module docs). `remat` picks what is kept.
    #[allow(clippy::too_many_arguments)]
    fn forward_train<'a>(
        &self,
        blocks: Vec<BlockParts<'a>>,
        m: &Tensor,
        z: &Tensor,
        msa_mask: &Tensor,
        pair_mask: &Tensor,
        dropout: Option<DropoutCtx>,
        remat: Remat,
    ) -> Result<(Tensor, Tensor, DapTape<'a>)> {
        let (s, r, _) = m.dims3()?;
        let l = DapLayout::new(s, r, &self.dap);
        let masks = Masks::new(msa_mask, pair_mask, &l, m.dtype())?;
        // Detached inputs: the scatter is then a local slice, no graph.
        let (m_row, z_row) = self.shard(&m.detach(), &z.detach(), &l)?;
        let manual = blocks.iter().all(|b| b.manual);
        let mut last = None;
        let saved = match remat {
            Remat::None if manual => {
                let mut v = Vec::with_capacity(blocks.len());
                let (mut mc, mut zc) = (m_row, z_row);
                for (i, b) in blocks.iter().enumerate() {
                    let d = block_dropout(dropout.as_ref(), i);
                    let (mn, zn, s) = self.block_saved(b, &mc, &zc, &masks, &l, d.as_ref())?;
                    v.push(s);
                    (mc, zc) = (mn, zn);
                }
                last = Some((mc, zc));
                Saved::Manual(v)
            }
            Remat::None => {
                let m_in = Var::from_tensor(&m_row)?;
                let z_in = Var::from_tensor(&z_row)?;
                let (mut mc, mut zc) = (m_in.as_tensor().clone(), z_in.as_tensor().clone());
                for (i, b) in blocks.iter().enumerate() {
                    let d = block_dropout(dropout.as_ref(), i);
                    (mc, zc) = self.block(b, &mc, &zc, &masks, &l, d.as_ref())?;
                }
                Saved::Graph {
                    m_in,
                    z_in,
                    m_out: mc,
                    z_out: zc,
                }
            }
            Remat::Block => {
                let mut inputs = Vec::with_capacity(blocks.len() + 1);
                let (mut mc, mut zc) = (m_row, z_row);
                for (i, b) in blocks.iter().enumerate() {
                    let d = block_dropout(dropout.as_ref(), i);
                    // Manual: the graph-free forward (its saved state is dropped at once; the
                    // backward's recompute repeats it bitwise).
                    let (mn, zn) = if manual {
                        let (mn, zn, _) = self.block_saved(b, &mc, &zc, &masks, &l, d.as_ref())?;
                        (mn, zn)
                    } else {
                        self.block(b, &mc, &zc, &masks, &l, d.as_ref())?
                    };
                    inputs.push((mc, zc));
                    // Detaching drops this block's graph as soon as `mn`/`zn` go out of scope.
                    (mc, zc) = (mn.detach(), zn.detach());
                }
                inputs.push((mc, zc));
                Saved::Inputs(inputs)
            }
        };
        let (m_last, z_last) = match &saved {
            Saved::Manual(_) => match last {
                Some(mz) => mz,
                None => return Err(crate::error::Error::Model("dap remat: no outputs".into())),
            },
            Saved::Graph { m_out, z_out, .. } => (m_out.detach(), z_out.detach()),
            Saved::Inputs(v) => match v.last() {
                Some((m, z)) => (m.clone(), z.clone()),
                None => return Err(crate::error::Error::Model("dap remat: no inputs".into())),
            },
        };
        let (m_out, z_out) = self.unshard(&m_last, &z_last, &l)?;
        let tape = DapTape {
            trunk: self.clone(),
            blocks,
            masks,
            layout: l,
            dropout,
            saved,
        };
        Ok((m_out, z_out, tape))
    }

    /// The block loop without gradient (e.g. recycling cycles): every block runs on detached
    /// inputs, nothing is kept → detached replicated `(m, z)`.
    fn forward_no_grad(
        &self,
        blocks: &[BlockParts<'_>],
        m: &Tensor,
        z: &Tensor,
        msa_mask: &Tensor,
        pair_mask: &Tensor,
        dropout: Option<&DropoutCtx>,
    ) -> Result<(Tensor, Tensor)> {
        let (s, r, _) = m.dims3()?;
        let l = DapLayout::new(s, r, &self.dap);
        let masks = Masks::new(msa_mask, pair_mask, &l, m.dtype())?;
        let (mut mc, mut zc) = self.shard(&m.detach(), &z.detach(), &l)?;
        for (i, b) in blocks.iter().enumerate() {
            let d = dropout.map(|c| c.fork(i as u64));
            let (mn, zn) = if b.manual {
                // Graph-free (the saved state is dropped at once).
                let (mn, zn, _) = self.block_saved(b, &mc, &zc, &masks, &l, d.as_ref())?;
                (mn, zn)
            } else {
                self.block(b, &mc, &zc, &masks, &l, d.as_ref())?
            };
            (mc, zc) = (mn.detach(), zn.detach());
        }
        self.unshard(&mc, &zc, &l)
    }
}

impl DapTape<'_> {
    /// Upstream gradients of the replicated outputs `dm` `[S, R, c_m]`, `dz` `[R, R, c_z]` →
    /// this rank's partial parameter gradients added to `grads`; returns the replicated input
    /// gradients `(dm, dz)`.
    fn backward(self, dm: &Tensor, dz: &Tensor, grads: &mut GradStore) -> Result<(Tensor, Tensor)> {
        let l = self.layout;
        let dap = &self.trunk.dap;
        let mut dm_row = own_rows(dm, l.sp, l.rp, dap)?; // [Sp/n, Rp, c_m]
        let mut dz_row = own_rows(dz, l.rp, l.rp, dap)?; // [Rp/n, Rp, c_z]
        match self.saved {
            Saved::Manual(saved) => {
                for (b, s) in self.blocks.iter().zip(saved).rev() {
                    (dm_row, dz_row) = self.trunk.block_backward(b, s, &dm_row, &dz_row, grads)?;
                }
            }
            Saved::Graph {
                m_in,
                z_in,
                m_out,
                z_out,
            } => {
                let mut g = backward_vars(&vjp_loss(&[(&m_out, &dm_row), (&z_out, &dz_row)])?)?;
                dm_row = grad_or_zeros(&mut g, m_in.as_tensor())?;
                dz_row = grad_or_zeros(&mut g, z_in.as_tensor())?;
                accumulate(grads, g)?;
            }
            Saved::Inputs(inputs) => {
                for (i, b) in self.blocks.iter().enumerate().rev() {
                    let (m0, z0) = &inputs[i];
                    if b.manual {
                        // Recompute with saved state, then the hand-written backward (the
                        // recompute re-issues the block's forward collectives on every rank).
                        let d = block_dropout(self.dropout.as_ref(), i);
                        let (_, _, s) = profile::timed(m0.device(), profile::RECOMPUTE, || {
                            self.trunk
                                .block_saved(b, m0, z0, &self.masks, &l, d.as_ref())
                        })?;
                        (dm_row, dz_row) =
                            self.trunk.block_backward(b, s, &dm_row, &dz_row, grads)?;
                        continue;
                    }
                    let m_in = Var::from_tensor(m0)?;
                    let z_in = Var::from_tensor(z0)?;
                    let d = block_dropout(self.dropout.as_ref(), i);
                    // The recompute re-issues the block's collectives (every rank is here now).
                    let (mo, zo) = self.trunk.block(
                        b,
                        m_in.as_tensor(),
                        z_in.as_tensor(),
                        &self.masks,
                        &l,
                        d.as_ref(),
                    )?;
                    let mut g = backward_vars(&vjp_loss(&[(&mo, &dm_row), (&zo, &dz_row)])?)?;
                    dm_row = grad_or_zeros(&mut g, m_in.as_tensor())?;
                    dz_row = grad_or_zeros(&mut g, z_in.as_tensor())?;
                    accumulate(grads, g)?;
                }
            }
        }
        Ok((
            gather_rows(&dm_row, l.s, l.r, dap)?,
            gather_rows(&dz_row, l.r, l.r, dap)?,
        ))
    }
}

/// Backward handle of [`DapEvoformer::forward_train`].
pub struct DapEvoformerTape<'a> {
    stack: &'a EvoformerStack,
    m_out: Tensor,
    blocks: DapTape<'a>,
}

impl<'a> DapEvoformer<'a> {
    /// Training forward with recomputation policy `remat` (module docs). Replicated inputs (the
    /// same on every rank of the group, as for [`DapEvoformer::forward`]) → detached replicated
    /// outputs, equal to [`EvoformerStack::forward_train`]'s, and the backward handle.
    pub fn forward_train(
        &self,
        m: &Tensor,
        z: &Tensor,
        msa_mask: &Tensor,
        pair_mask: &Tensor,
        dropout: Option<DropoutCtx>,
        remat: Remat,
    ) -> Result<(EvoformerOutput, DapEvoformerTape<'a>)> {
        let stack: &'a EvoformerStack = self.stack;
        let blocks = stack.blocks.iter().map(BlockParts::from).collect();
        let (m_out, z_out, tape) = profile::timed(m.device(), profile::EVO_FWD, || {
            self.trunk
                .forward_train(blocks, m, z, msa_mask, pair_mask, dropout, remat)
        })?;
        let s = stack.single(&m_out)?.detach();
        let out = EvoformerOutput {
            m: m_out.clone(),
            z: z_out,
            s,
        };
        Ok((
            out,
            DapEvoformerTape {
                stack,
                m_out,
                blocks: tape,
            },
        ))
    }

    /// Forward without gradient (detached outputs; one block's graph alive at a time), equal to
    /// [`DapEvoformer::forward`]'s values.
    pub fn forward_no_grad(
        &self,
        m: &Tensor,
        z: &Tensor,
        msa_mask: &Tensor,
        pair_mask: &Tensor,
        dropout: Option<&DropoutCtx>,
    ) -> Result<EvoformerOutput> {
        let blocks: Vec<BlockParts> = self.stack.blocks.iter().map(BlockParts::from).collect();
        let (m, z) = self
            .trunk
            .forward_no_grad(&blocks, m, z, msa_mask, pair_mask, dropout)?;
        let s = self.stack.single(&m)?.detach();
        Ok(EvoformerOutput { m, z, s })
    }
}

impl DapEvoformerTape<'_> {
    /// Upstream gradients of the replicated `m`, `z`, `s` → parameter gradients (`blocks.*`:
    /// this rank's partial sums, to be summed over the DAP group; `linear.*`: full) and the
    /// replicated input gradients. Every rank of the group must call it (collectives).
    pub fn backward(self, dm: &Tensor, dz: &Tensor, ds: &Tensor) -> Result<TrunkGrads> {
        // The single projection (replicated) on a fresh graph from the final MSA.
        let m_fin = Var::from_tensor(&self.m_out)?;
        let s = self.stack.single(m_fin.as_tensor())?;
        let mut params = backward_vars(&vjp_loss(&[(&s, ds)])?)?;
        let dm_total = match params.remove(m_fin.as_tensor()) {
            Some(g) => (dm.detach() + g)?,
            None => dm.detach(),
        };
        let (dm, dz) = profile::timed(dz.device(), profile::EVO_BWD, || {
            self.blocks.backward(&dm_total, dz, &mut params)
        })?;
        Ok(TrunkGrads { params, dm, dz })
    }
}

/// Backward handle of [`DapExtraMsa::forward_train`].
pub struct DapExtraMsaTape<'a> {
    m_out: Tensor,
    blocks: DapTape<'a>,
}

impl<'a> DapExtraMsa<'a> {
    /// Training forward with recomputation policy `remat` → the detached replicated pair output
    /// (as [`crate::model::extra_msa::ExtraMsaStack::forward_train`]) and the backward handle
    /// (which also holds the MSA output, [`DapExtraMsaTape::msa`]).
    pub fn forward_train(
        &self,
        m: &Tensor,
        z: &Tensor,
        msa_mask: &Tensor,
        pair_mask: &Tensor,
        dropout: Option<DropoutCtx>,
        remat: Remat,
    ) -> Result<(Tensor, DapExtraMsaTape<'a>)> {
        let blocks = self.stack.blocks.iter().map(BlockParts::from).collect();
        let (m_out, z_out, tape) = profile::timed(m.device(), profile::EVO_FWD + 2, || {
            self.trunk
                .forward_train(blocks, m, z, msa_mask, pair_mask, dropout, remat)
        })?;
        Ok((
            z_out,
            DapExtraMsaTape {
                m_out,
                blocks: tape,
            },
        ))
    }

    /// Forward without gradient (detached `(m, z)`; one block's graph alive at a time).
    pub fn forward_no_grad(
        &self,
        m: &Tensor,
        z: &Tensor,
        msa_mask: &Tensor,
        pair_mask: &Tensor,
        dropout: Option<&DropoutCtx>,
    ) -> Result<(Tensor, Tensor)> {
        let blocks: Vec<BlockParts> = self.stack.blocks.iter().map(BlockParts::from).collect();
        self.trunk
            .forward_no_grad(&blocks, m, z, msa_mask, pair_mask, dropout)
    }
}

impl DapExtraMsaTape<'_> {
    /// The (detached, replicated) MSA output of the stack `[S_e, R, c_e]`.
    pub fn msa(&self) -> &Tensor {
        &self.m_out
    }

    /// Upstream gradient of the pair output → parameter gradients (this rank's partial sums) and
    /// replicated input gradients. Every rank of the group must call it.
    pub fn backward(self, dz: &Tensor) -> Result<TrunkGrads> {
        let dm = self.m_out.zeros_like()?;
        self.backward_msa_pair(&dm, dz)
    }

    /// Like [`DapExtraMsaTape::backward`] with an upstream gradient of the MSA output too.
    pub fn backward_msa_pair(self, dm: &Tensor, dz: &Tensor) -> Result<TrunkGrads> {
        let mut params = GradStore::default();
        let (dm, dz) = profile::timed(dz.device(), profile::EVO_BWD + 2, || {
            self.blocks.backward(dm, dz, &mut params)
        })?;
        Ok(TrunkGrads { params, dm, dz })
    }
}
