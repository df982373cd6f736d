//! The Evoformer stack under Dynamic Axial Parallelism (FastFold, Cheng et al. 2022; ScaleFold):
//! one sample's MSA and pair activations are sharded over the ranks of a DAP group.
//!
//! This runs the *same* modules (same parameters, same math) as
//! [`crate::model::evoformer::EvoformerStack`]; only the layout changes, through the hooks the
//! modules expose (`pair_bias`/`forward_with_bias`, `project`/`combine`, `triangle_bias`/
//! `attend_starting`).
//!
//! # Layout (n = DAP size, r = this rank)
//! `S`, `R` are padded to `Sp`, `Rp` (multiples of n; padded positions are masked, module docs of
//! [`super::dap`]). "Row-sharded" m is `m[S-chunk r]` `[Sp/n, Rp, c_m]`; "column-sharded" m is
//! `m[:, R-chunk r]` `[Sp, Rp/n, c_m]`; row-sharded z is `z[R-chunk r]` `[Rp/n, Rp, c_z]`,
//! column-sharded z is `z[:, R-chunk r]` `[Rp, Rp/n, c_z]`. Per block (OpenFold order,
//! `opm_first = False`):
//! 1. MSA row attention on row-sharded m; the pair bias is computed from the local z rows and
//!    all-gathered ([`Dap::gather_sharded`]).
//! 2. `row_to_col(m)`; MSA column attention; MSA transition.
//! 3. Start `col_to_row(m)` (duality async: it completes after the pair stack).
//! 4. Outer product mean: local `a` rows × all-gathered `b` → this rank's z rows.
//! 5. Triangle mult. outgoing (rows; `b` gathered) → `row_to_col(z)` → incoming (columns; `a`
//!    gathered) → `col_to_row(z)` → triangle attention starting (rows; triangle bias gathered) →
//!    `row_to_col(z)` → ending (columns = rows of zᵀ; bias gathered) → pair transition →
//!    `col_to_row(z)`.
//! 6. Wait for m's `col_to_row`.
//!
//! Gradients: parameters of the blocks are used only in sharded compute, so after backward each
//! rank holds its shard's partial gradient; sum them over the DAP group ([`super::ddp`],
//! [`super::dap_grad_scale`] with `sharded = true`, see [`DapEvoformer::is_sharded_param`]).
//! The final projection `linear` runs replicated (after the gather) and holds the full gradient.
//!
//! Padding: a padded key is masked, so every attention row with at least one real unmasked key is
//! unchanged. // DISCREPANCY: a row whose real keys are *all* masked (e.g. a fully masked
//! sequence) also sees the masked padded keys, so its (meaningless) output differs from the
//! unpadded stack; such rows feed only masked positions (tested with a masked sequence, outputs
//! and cotangents compared where valid).
//!
//! Training: [`DapEvoformer::forward`] builds one graph through the differentiable collectives;
//! `forward_train` (in [`super::dap_remat`]) returns a tape with per-block recomputation
//! (`model.remat`), which [`crate::model::alphafold::AlphaFold::loss_and_grads`] uses. With
//! `model.backward = "manual"` the tape runs the blocks graph-free and differentiates them by
//! hand (`super::dap_manual`: same layout, same collectives, their adjoints issued explicitly).
//!
//! Dropout: each shared mask is drawn for the *unpadded, unsharded* logical shape from the same
//! [`DropoutCtx`] as the single-rank stack (every rank of the group must pass the same seed),
//! then padded and sliced to this rank's part, so DAP-n applies exactly the masks of DAP-1.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Tensor};

use super::dap::{padded_len, Dap};
use super::groups::ProcessGroups;
use crate::config::{ParallelConfig, TrunkBackward};
use crate::error::Result;
use crate::model::dropout::{dropout_shared, DropoutCtx};
use crate::model::evoformer::{EvoformerBlock, EvoformerOutput, EvoformerStack, PairStack};
use crate::model::extra_msa::{ExtraMsaBlock, ExtraMsaStack};
use crate::model::msa::{
    MsaColumnAttention, MsaColumnGlobalAttention, MsaRowAttentionWithPairBias,
};
use crate::model::outer_product_mean::OuterProductMean;
use crate::model::primitives::mul_const;
use crate::model::transition::MsaTransition;

/// The DAP collectives of `groups` (its DAP group) with `parallel.overlap` from `cfg`.
pub fn dap_from_config(groups: &ProcessGroups, cfg: &ParallelConfig) -> Dap {
    Dap::with_overlap(groups.dap.clone(), cfg.overlap)
}

/// Dimensions of one sharded sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DapLayout {
    /// Unpadded sequences / residues.
    pub s: usize,
    pub r: usize,
    /// Padded to a multiple of the DAP size.
    pub sp: usize,
    pub rp: usize,
    /// Local chunk sizes `sp / n`, `rp / n`.
    pub sl: usize,
    pub rl: usize,
    pub rank: usize,
}

impl DapLayout {
    pub fn new(s: usize, r: usize, dap: &Dap) -> Self {
        let n = dap.size().max(1);
        let (sp, rp) = (padded_len(s, n), padded_len(r, n));
        Self {
            s,
            r,
            sp,
            rp,
            sl: sp / n,
            rl: rp / n,
            rank: dap.rank(),
        }
    }
}

/// The masks of one sample in every layout the block needs (padded, this rank's slices).
pub(super) struct Masks {
    /// `[Sp, Rp]`
    pub(super) msa_full: Tensor,
    /// `[Sp/n, Rp]`
    pub(super) msa_row: Tensor,
    /// `[Sp, Rp/n]`
    pub(super) msa_col: Tensor,
    /// `[Rp/n, Rp]`
    pub(super) pair_row: Tensor,
    /// `[Rp, Rp/n]`
    pub(super) pair_col: Tensor,
    /// `pair_col` transposed `[Rp/n, Rp]` (rows of the transposed pair mask).
    pub(super) pair_col_t: Tensor,
}

impl Masks {
    pub(super) fn new(
        msa_mask: &Tensor,
        pair_mask: &Tensor,
        l: &DapLayout,
        dtype: DType,
    ) -> Result<Self> {
        let msa_full = pad2(&msa_mask.to_dtype(dtype)?, l.sp, l.rp)?;
        let pair_full = pad2(&pair_mask.to_dtype(dtype)?, l.rp, l.rp)?;
        let pair_col = pair_full.narrow(1, l.rank * l.rl, l.rl)?.contiguous()?;
        Ok(Self {
            msa_row: msa_full.narrow(0, l.rank * l.sl, l.sl)?.contiguous()?,
            msa_col: msa_full.narrow(1, l.rank * l.rl, l.rl)?.contiguous()?,
            pair_row: pair_full.narrow(0, l.rank * l.rl, l.rl)?.contiguous()?,
            pair_col_t: pair_col.t()?.contiguous()?,
            pair_col,
            msa_full,
        })
    }
}

/// Zero-pad a 2-D tensor at the end to `[a, b]`.
fn pad2(x: &Tensor, a: usize, b: usize) -> Result<Tensor> {
    let (x0, x1) = x.dims2()?;
    Ok(x.pad_with_zeros(0, 0, a - x0)?
        .pad_with_zeros(1, 0, b - x1)?)
}

/// Zero-pad every dim of `x` at the end to `dims`.
pub(super) fn pad_to(x: &Tensor, dims: &[usize]) -> Result<Tensor> {
    let mut x = x.clone();
    for (d, &n) in dims.iter().enumerate() {
        let have = x.dims()[d];
        if n > have {
            x = x.pad_with_zeros(d, 0, n - have)?;
        }
    }
    Ok(x)
}

/// Shared dropout under DAP: the mask of the single-rank stack (drawn for `logical`, the
/// unpadded full shape with the shared dim already 1), zero-padded to `padded` and narrowed to
/// `slice = (dim, start, len)` when this rank holds only part of a non-shared axis.
fn dap_dropout(
    x: &Tensor,
    rate: f64,
    ctx: Option<&DropoutCtx>,
    shared_dim: usize,
    logical: &[usize],
    padded: &[usize],
    slice: Option<(usize, usize, usize)>,
) -> Result<Tensor> {
    let Some(ctx) = ctx else {
        return Ok(x.clone());
    };
    if rate <= 0.0 {
        return Ok(x.clone());
    }
    let ones = Tensor::ones(logical, x.dtype(), x.device())?;
    let mask = dropout_shared(&ones, rate, shared_dim, Some(ctx))?;
    let mut mask = pad_to(&mask, padded)?;
    if let Some((d, start, len)) = slice {
        mask = mask.narrow(d, start, len)?;
    }
    mul_const(x, &mask)
}

/// The column attention of a block: Algorithm 8 (Evoformer) or 19 (extra MSA).
#[derive(Clone, Copy)]
pub(super) enum ColumnAttention<'b> {
    Local(&'b MsaColumnAttention),
    Global(&'b MsaColumnGlobalAttention),
}

impl ColumnAttention<'_> {
    fn forward(&self, m: &Tensor, mask: &Tensor) -> Result<Tensor> {
        match self {
            Self::Local(a) => a.forward(m, mask),
            Self::Global(a) => a.forward(m, mask),
        }
    }
}

/// The parts of one Evoformer-like block (main Evoformer block or extra-MSA block).
#[derive(Clone, Copy)]
pub(super) struct BlockParts<'b> {
    pub(super) msa_att_row: &'b MsaRowAttentionWithPairBias,
    /// MSA column attention (Algorithm 8) or global column attention (Algorithm 19) on
    /// column-sharded m `[Sp, Rp/n, c]` with its mask `[Sp, Rp/n]`.
    pub(super) msa_att_col: ColumnAttention<'b>,
    pub(super) msa_transition: &'b MsaTransition,
    /// The extra-MSA block masks its MSA transition; the Evoformer block does not.
    pub(super) mask_msa_transition: bool,
    pub(super) outer_product_mean: &'b OuterProductMean,
    pub(super) pair_stack: &'b PairStack,
    pub(super) msa_dropout: f64,
    /// `model.backward = manual`: graph-free forward + hand-written backward
    /// ([`super::dap_manual`]) instead of autograd through the differentiable collectives.
    pub(super) manual: bool,
}

impl<'b> From<&'b EvoformerBlock> for BlockParts<'b> {
    fn from(b: &'b EvoformerBlock) -> Self {
        Self {
            msa_att_row: &b.msa_att_row,
            msa_att_col: ColumnAttention::Local(&b.msa_att_col),
            msa_transition: &b.msa_transition,
            // `_mask_trans = False`: the Evoformer MSA transition is unmasked.
            mask_msa_transition: false,
            outer_product_mean: &b.outer_product_mean,
            pair_stack: &b.pair_stack,
            msa_dropout: b.msa_dropout,
            manual: b.backward == TrunkBackward::Manual,
        }
    }
}

impl<'b> From<&'b ExtraMsaBlock> for BlockParts<'b> {
    fn from(b: &'b ExtraMsaBlock) -> Self {
        Self {
            msa_att_row: &b.msa_att_row,
            msa_att_col: ColumnAttention::Global(&b.msa_att_col),
            msa_transition: &b.msa_transition,
            // The extra-MSA transition always receives the MSA mask (OpenFold).
            mask_msa_transition: true,
            outer_product_mean: &b.outer_product_mean,
            pair_stack: &b.pair_stack,
            msa_dropout: b.msa_dropout,
            manual: b.backward == TrunkBackward::Manual,
        }
    }
}

/// Overlap timers of a [`DapTrunk`], shared with its training tapes (the recompute of a
/// remat backward adds to them too).
#[derive(Debug, Default)]
pub(super) struct Timers {
    /// Nanoseconds spent waiting for m's asynchronous `col_to_row` (after the pair stack; with
    /// the manual backward also for its adjoint, the `row_to_col` of m's cotangent).
    pub(super) wait_ns: AtomicU64,
    /// Nanoseconds spent issuing it (the whole transfer when `parallel.overlap = off`).
    pub(super) start_ns: AtomicU64,
}

/// The sharded block loop shared by [`DapEvoformer`] and [`DapExtraMsa`], with the overlap timers.
#[derive(Debug, Clone)]
pub(super) struct DapTrunk {
    pub(super) dap: Dap,
    pub(super) timers: Arc<Timers>,
}

impl DapTrunk {
    fn new(dap: Dap) -> Self {
        Self {
            dap,
            timers: Arc::new(Timers::default()),
        }
    }

    /// Pad replicated `m` `[S, R, c_m]`, `z` `[R, R, c_z]` and keep this rank's rows
    /// (differentiable: bwd of the scatter = all-gather) → `(m_row, z_row)`.
    pub(super) fn shard(&self, m: &Tensor, z: &Tensor, l: &DapLayout) -> Result<(Tensor, Tensor)> {
        let (s, r) = (l.s, l.r);
        // Pad and shard: m along S, z along its first residue axis.
        let mp = m
            .pad_with_zeros(0, 0, l.sp - s)?
            .pad_with_zeros(1, 0, l.rp - r)?;
        let zp = z
            .pad_with_zeros(0, 0, l.rp - r)?
            .pad_with_zeros(1, 0, l.rp - r)?;
        let m_row = self.dap.scatter(&mp, 0)?; // [Sp/n, Rp, c_m]
        let z_row = self.dap.scatter(&zp, 0)?; // [Rp/n, Rp, c_z]
        Ok((m_row, z_row))
    }

    /// All-gather row-sharded `m_row`, `z_row` and drop the padding → replicated `(m, z)`
    /// (differentiable: bwd of the gather = own chunk).
    pub(super) fn unshard(
        &self,
        m_row: &Tensor,
        z_row: &Tensor,
        l: &DapLayout,
    ) -> Result<(Tensor, Tensor)> {
        let m = self
            .dap
            .gather(m_row, 0)?
            .narrow(0, 0, l.s)?
            .narrow(1, 0, l.r)?;
        let z = self
            .dap
            .gather(z_row, 0)?
            .narrow(0, 0, l.r)?
            .narrow(1, 0, l.r)?;
        Ok((m, z))
    }

    /// Pad, shard, run `blocks` (block `i` with `dropout.fork(i)`), gather, unpad → `(m, z)`.
    fn forward<'b>(
        &self,
        blocks: impl Iterator<Item = BlockParts<'b>>,
        m: &Tensor,
        z: &Tensor,
        msa_mask: &Tensor,
        pair_mask: &Tensor,
        dropout: Option<&DropoutCtx>,
    ) -> Result<(Tensor, Tensor)> {
        let (s, r, _) = m.dims3()?;
        let l = DapLayout::new(s, r, &self.dap);
        let masks = Masks::new(msa_mask, pair_mask, &l, m.dtype())?;
        let (mut m_row, mut z_row) = self.shard(m, z, &l)?;
        for (i, b) in blocks.enumerate() {
            let d = dropout.map(|c| c.fork(i as u64));
            (m_row, z_row) = self.block(&b, &m_row, &z_row, &masks, &l, d.as_ref())?;
        }
        self.unshard(&m_row, &z_row, &l)
    }

    fn wait_seconds(&self) -> f64 {
        self.timers.wait_ns.load(Ordering::Relaxed) as f64 * 1e-9
    }

    fn start_seconds(&self) -> f64 {
        self.timers.start_ns.load(Ordering::Relaxed) as f64 * 1e-9
    }

    fn reset_timers(&self) {
        self.timers.wait_ns.store(0, Ordering::Relaxed);
        self.timers.start_ns.store(0, Ordering::Relaxed);
    }

    /// One Evoformer block on row-sharded `m` `[Sp/n, Rp, c_m]` and `z` `[Rp/n, Rp, c_z]`.
    /// Issues the same collectives in the same order on every rank (whatever the values), so a
    /// remat backward may re-run it ([`super::dap_remat`]).
    pub(super) fn block(
        &self,
        b: &BlockParts,
        m_row: &Tensor,
        z_row: &Tensor,
        k: &Masks,
        l: &DapLayout,
        dropout: Option<&DropoutCtx>,
    ) -> Result<(Tensor, Tensor)> {
        let dap = &self.dap;
        let c_m = m_row.dim(2)?;
        // --- MSA stack ---------------------------------------------------------------------
        let d0 = dropout.map(|c| c.fork(0));
        let zb = dap.gather_sharded(&b.msa_att_row.pair_bias(z_row)?, 0)?; // [Rp, Rp, H]
        let row = b.msa_att_row.forward_with_bias(m_row, &zb, &k.msa_row)?;
        let row = dap_dropout(
            &row,
            b.msa_dropout,
            d0.as_ref(),
            0,
            &[1, l.r, c_m],
            &[1, l.rp, c_m],
            None,
        )?;
        let m_row = (m_row + row)?;
        let m_col = dap.row_to_col(&m_row, 0, 1)?; // [Sp, Rp/n, c_m]
        let m_col = (&m_col + b.msa_att_col.forward(&m_col, &k.msa_col)?)?;
        let tmask = b.mask_msa_transition.then_some(&k.msa_col);
        let m_col = (&m_col + b.msa_transition.forward(&m_col, tmask)?)?;
        // Duality async: m's transfer to the next block's layout overlaps the pair stack.
        let t = Instant::now();
        let pending = dap.start_col_to_row(&m_col, 0, 1)?;
        self.timers
            .start_ns
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        // --- outer product mean: this rank's rows i × all columns j ------------------------
        let opm = b.outer_product_mean;
        let (a, bb) = opm.project(&m_col, &k.msa_col)?; // [Sp, Rp/n, C]
        let bb = dap.gather_sharded(&bb, 1)?; // [Sp, Rp, C]
        let z_row = (z_row + opm.combine(&a, &bb, &k.msa_col, &k.msa_full)?)?;
        // --- pair stack ----------------------------------------------------------------------
        let z_row = self.pair_stack(b.pair_stack, &z_row, k, l, dropout)?;
        let t = Instant::now();
        let m_row = pending.wait()?;
        self.timers
            .wait_ns
            .fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        Ok((m_row, z_row))
    }

    /// Algorithm 6 lines 6-10 on row-sharded `z` `[Rp/n, Rp, c_z]`; returns row-sharded z.
    fn pair_stack(
        &self,
        ps: &PairStack,
        z_row: &Tensor,
        k: &Masks,
        l: &DapLayout,
        dropout: Option<&DropoutCtx>,
    ) -> Result<Tensor> {
        let dap = &self.dap;
        let p = ps.pair_dropout;
        let c_z = z_row.dim(2)?;
        let d = |i: u64| dropout.map(|c| c.fork(i));
        let (row_logical, row_padded) = ([1, l.r, c_z], [1, l.rp, c_z]);
        // Triangle multiplication, outgoing: x[i,j] = Σ_k a[i,k] b[j,k]; own rows i, all j.
        let (zln, a, bb) = ps.tri_mul_out.project(z_row, &k.pair_row)?; // [Rp/n, Rp, C]
        let bb = dap.gather_sharded(&bb, 0)?; // [Rp, Rp, C]
        let u = ps.tri_mul_out.combine(&zln, &a, &bb)?;
        let u = dap_dropout(&u, p, d(1).as_ref(), 0, &row_logical, &row_padded, None)?;
        let z_row = (z_row + u)?;
        // Triangle multiplication, incoming: x[i,j] = Σ_k a[k,i] b[k,j]; own columns j, all i.
        let z_col = dap.row_to_col(&z_row, 0, 1)?; // [Rp, Rp/n, c_z]
        let (zln, a, bb) = ps.tri_mul_in.project(&z_col, &k.pair_col)?; // [Rp, Rp/n, C]
        let a = dap.gather_sharded(&a, 1)?; // [Rp, Rp, C]
        let u = ps.tri_mul_in.combine(&zln, &a, &bb)?; // [Rp, Rp/n, c_z]
        let u = dap_dropout(
            &u,
            p,
            d(2).as_ref(),
            0,
            &row_logical,
            &row_padded,
            Some((1, l.rank * l.rl, l.rl)),
        )?;
        let z_col = (z_col + u)?;
        // Triangle attention, starting node: rows i, bias over all (j, k).
        let z_row = dap.col_to_row(&z_col, 0, 1)?; // [Rp/n, Rp, c_z]
        let tas = &ps.tri_att_start;
        let x = tas.layer_norm.forward(&z_row)?;
        let tb = dap.gather_sharded(&tas.triangle_bias(&x)?, 0)?; // [Rp, Rp, H]
        let u = tas.attend_starting(&x, &k.pair_row, &tb)?;
        let u = dap_dropout(&u, p, d(3).as_ref(), 0, &row_logical, &row_padded, None)?;
        let z_row = (z_row + u)?;
        // Triangle attention, ending node: the starting-node math on zᵀ, whose rows are our
        // columns.
        let z_col = dap.row_to_col(&z_row, 0, 1)?; // [Rp, Rp/n, c_z]
        let tae = &ps.tri_att_end;
        let x = tae
            .layer_norm
            .forward(&z_col.transpose(0, 1)?.contiguous()?)?; // [Rp/n, Rp, c_z]
        let tb = dap.gather_sharded(&tae.triangle_bias(&x)?, 0)?;
        let u = tae
            .attend_starting(&x, &k.pair_col_t, &tb)?
            .transpose(0, 1)?
            .contiguous()?; // [Rp, Rp/n, c_z]
        let u = dap_dropout(
            &u,
            p,
            d(4).as_ref(),
            1,
            &[l.r, 1, c_z],
            &[l.rp, 1, c_z],
            None,
        )?;
        let z_col = (z_col + u)?;
        // `_mask_trans = False`: the pair transition is unmasked.
        let z_col = (&z_col + ps.pair_transition.forward(&z_col, None)?)?;
        dap.col_to_row(&z_col, 0, 1)
    }
}

/// A DAP view of an [`EvoformerStack`] (parameters shared with it, not copied).
#[derive(Debug)]
pub struct DapEvoformer<'a> {
    pub stack: &'a EvoformerStack,
    pub(super) trunk: DapTrunk,
}

impl<'a> DapEvoformer<'a> {
    /// Overlap follows `dap` ([`Dap::with_overlap`], `parallel.overlap`).
    pub fn new(stack: &'a EvoformerStack, dap: Dap) -> Self {
        Self {
            stack,
            trunk: DapTrunk::new(dap),
        }
    }

    pub fn dap(&self) -> &Dap {
        &self.trunk.dap
    }

    /// Whether the gradient of parameter `name` (a stack `vb` name, e.g. `blocks.0.…`) is a
    /// per-shard partial sum (to be summed over the DAP group) or already full (`linear.*`).
    pub fn is_sharded_param(name: &str) -> bool {
        name.starts_with("blocks.")
    }

    /// Seconds spent in the wait for m's asynchronous all-to-all since the last reset.
    pub fn wait_seconds(&self) -> f64 {
        self.trunk.wait_seconds()
    }

    /// Seconds spent issuing m's `col_to_row` (blocking transfer when overlap is off).
    pub fn start_seconds(&self) -> f64 {
        self.trunk.start_seconds()
    }

    pub fn reset_timers(&self) {
        self.trunk.reset_timers()
    }

    /// Replicated inputs (identical on every rank of the group): `m` `[S, R, c_m]`, `z`
    /// `[R, R, c_z]`, `msa_mask` `[S, R]`, `pair_mask` `[R, R]` → replicated outputs, equal to
    /// [`EvoformerStack::forward`] (block `i` uses `dropout.fork(i)`, as there).
    pub fn forward(
        &self,
        m: &Tensor,
        z: &Tensor,
        msa_mask: &Tensor,
        pair_mask: &Tensor,
        dropout: Option<&DropoutCtx>,
    ) -> Result<EvoformerOutput> {
        let blocks = self.stack.blocks.iter().map(BlockParts::from);
        let (m, z) = self
            .trunk
            .forward(blocks, m, z, msa_mask, pair_mask, dropout)?;
        let s = self.stack.single(&m)?;
        Ok(EvoformerOutput { m, z, s })
    }
}

/// A DAP view of an [`ExtraMsaStack`] (Algorithm 18 blocks: global column attention, masked MSA
/// transition; same layout and communication as [`DapEvoformer`]).
#[derive(Debug)]
pub struct DapExtraMsa<'a> {
    pub stack: &'a ExtraMsaStack,
    pub(super) trunk: DapTrunk,
}

impl<'a> DapExtraMsa<'a> {
    pub fn new(stack: &'a ExtraMsaStack, dap: Dap) -> Self {
        Self {
            stack,
            trunk: DapTrunk::new(dap),
        }
    }

    pub fn dap(&self) -> &Dap {
        &self.trunk.dap
    }

    /// Every extra-MSA stack parameter is used in sharded compute only.
    pub fn is_sharded_param(name: &str) -> bool {
        name.starts_with("blocks.")
    }

    /// Like [`ExtraMsaStack::forward`] (the updated pair `[R, R, c_z]`), replicated.
    pub fn forward(
        &self,
        m: &Tensor,
        z: &Tensor,
        msa_mask: &Tensor,
        pair_mask: &Tensor,
        dropout: Option<&DropoutCtx>,
    ) -> Result<Tensor> {
        Ok(self.forward_msa_pair(m, z, msa_mask, pair_mask, dropout)?.1)
    }

    /// The updated `(m, z)` (the MSA output too, for tests).
    pub fn forward_msa_pair(
        &self,
        m: &Tensor,
        z: &Tensor,
        msa_mask: &Tensor,
        pair_mask: &Tensor,
        dropout: Option<&DropoutCtx>,
    ) -> Result<(Tensor, Tensor)> {
        let blocks = self.stack.blocks.iter().map(BlockParts::from);
        self.trunk
            .forward(blocks, m, z, msa_mask, pair_mask, dropout)
    }
}
