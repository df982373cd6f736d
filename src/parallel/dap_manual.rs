//! The hand-written backward of the DAP-sharded trunk (`model.backward = "manual"`): the DAP
//! counterpart of [`crate::model::evoformer::MsaBlockParts::forward_saved`] /
//! [`crate::model::evoformer::MsaBlockParts::backward`].
//!
//! [`DapTrunk::block_saved`] runs one sharded block (the layout and collectives of
//! [`DapTrunk::block`], [`super::dap_evoformer`] docs) without any autograd graph, through the
//! modules' `forward_saved` and the graph-free DAP hooks (`pair_bias_saved` /
//! `forward_with_bias_saved`, `project_saved` / `combine_saved`, `triangle_bias_saved` /
//! `attend_starting_saved`), with the graph-free collectives of [`super::dap::Dap`]
//! (`*_raw`). It keeps each module's saved state. [`DapTrunk::block_backward`] walks the block
//! in reverse; every forward collective gets its adjoint (gradient convention of
//! [`super::dap`]):
//! - all-gather of an operand that feeds this rank's shard (pair bias, triangle bias, the
//!   triangle-multiplication / outer-product operand) ↔ sum over the group, own chunk
//!   ([`super::dap::Dap::reduce_own_chunk`]: the value of `gather_sharded`'s backward, done as a
//!   reduce-scatter through one all-to-all);
//! - `row_to_col` (all-to-all split cols, concat rows) ↔ `col_to_row` and vice versa.
//!
//! The triangle multiplications keep `forward_saved`'s channel-first operands (gating and
//! transpose kernels on CUDA): outgoing all-gathers `b` `[C, K, J]` along `J`, incoming `a`
//! `[C, I, K]` along `I`.
//!
//! Every rank issues the same collectives in the same order (they depend on shapes only).
//!
//! # Overlap (duality async)
//! - Forward: m's `col_to_row` at the end of the MSA stack is started before the outer product
//!   mean and the pair stack and waited after them (as in [`DapTrunk::block`]).
//! - Backward: its adjoint, the `row_to_col` of the block's m cotangent, is started first and
//!   waited only when the MSA stack's backward needs it, so it overlaps the whole pair-stack
//!   backward and the outer-product-mean combine backward. The other collectives are on the
//!   critical path (their results are needed by the next op).
//!
//! # Dropout
//! Each mask is the single-rank stack's (same [`DropoutCtx`] forks), drawn for the unpadded,
//! unsharded logical shape. Where this rank's part of it is the whole mask (the sharded dim is
//! the shared one and no residue is padded) the fused residual-dropout kernel runs on the local
//! tensors as in the single-rank stack; otherwise the mask is zero-padded and sliced to this
//! rank's part (as `dap_dropout`). Either way DAP-n applies exactly the masks of DAP-1 and of
//! the single-rank stack; the backward applies the same mask to the cotangent.

use std::sync::atomic::Ordering;
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor};

use super::dap_evoformer::{pad_to, BlockParts, ColumnAttention, DapLayout, DapTrunk, Masks};
use crate::error::Result;
use crate::kernels::dropout_residual::dropout_grad;
use crate::model::dropout::DropoutCtx;
use crate::model::evoformer::PairStack;
use crate::model::msa::{MsaColSaved, MsaGlobalColSaved, MsaRowBiasSaved, PairBiasSaved};
use crate::model::outer_product_mean::{OpmCombSaved, OpmProjSaved};
use crate::model::transition::TransitionSaved;
use crate::model::triangle_attention::{TriAttendSaved, TriBiasSaved};
use crate::model::triangle_multiplication::{TriMulCombSaved, TriMulProjSaved};
use crate::model::vjp::residual_dropout_nograd;

/// Device-synchronised phase timers of the DAP trunk, on when `FERROFOLD_DAP_PROFILE=1`
/// (diagnostics only: the synchronisations serialise the duality-async overlap and the host's
/// run-ahead). Phases: whole stack forward / backward per stack, the recompute inside the remat
/// backward, and the collectives (forward incl. recompute, backward), each including the wait for
/// the slower rank.
pub mod profile {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;
    use std::time::Instant;

    use candle_core::Device;

    use crate::error::Result;

    /// Phase names, indexed by the constants below.
    pub const PHASES: [&str; 8] = [
        "evo_fwd",
        "evo_bwd",
        "extra_fwd",
        "extra_bwd",
        "recompute",
        "coll_fwd",
        "coll_bwd",
        "msa_wait",
    ];
    pub const EVO_FWD: usize = 0;
    pub const EVO_BWD: usize = 1;
    pub const RECOMPUTE: usize = 4;
    pub const COLL_FWD: usize = 5;
    pub const COLL_BWD: usize = 6;
    pub const MSA_WAIT: usize = 7;

    static NS: [AtomicU64; 8] = [const { AtomicU64::new(0) }; 8];
    static CALLS: [AtomicU64; 8] = [const { AtomicU64::new(0) }; 8];
    static ON: OnceLock<bool> = OnceLock::new();

    /// Whether `FERROFOLD_DAP_PROFILE=1`.
    pub fn enabled() -> bool {
        *ON.get_or_init(|| std::env::var("FERROFOLD_DAP_PROFILE").as_deref() == Ok("1"))
    }

    /// Run `f`; when enabled, synchronise `dev` before and after and add the time to `phase`.
    pub fn timed<T>(dev: &Device, phase: usize, f: impl FnOnce() -> Result<T>) -> Result<T> {
        if !enabled() {
            return f();
        }
        dev.synchronize()?;
        let t = Instant::now();
        let r = f()?;
        dev.synchronize()?;
        NS[phase].fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        CALLS[phase].fetch_add(1, Ordering::Relaxed);
        Ok(r)
    }

    /// `(phase, milliseconds, calls)` since the last call, and reset.
    pub fn take() -> Vec<(&'static str, f64, u64)> {
        PHASES
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let ns = NS[i].swap(0, Ordering::Relaxed);
                let c = CALLS[i].swap(0, Ordering::Relaxed);
                (*n, ns as f64 * 1e-6, c)
            })
            .collect()
    }
}

/// This rank's part of a shared dropout mask: drawn for `logical` (the unpadded full shape, the
/// shared dim already 1), zero-padded to `padded`, narrowed to `slice = (dim, start, len)`.
/// `None` in eval mode or at rate 0.
#[allow(clippy::too_many_arguments)]
fn drop_mask(
    rate: f64,
    ctx: Option<&DropoutCtx>,
    shared_dim: usize,
    logical: &[usize],
    padded: &[usize],
    slice: Option<(usize, usize, usize)>,
    dtype: DType,
    dev: &Device,
) -> Result<Option<Tensor>> {
    let Some(ctx) = ctx else {
        return Ok(None);
    };
    if rate <= 0.0 {
        return Ok(None);
    }
    // The mask as the dropout of ones: on CUDA the fused kernel draws it on the device (the
    // same keep decisions as `dropout_mask`'s host draw, `kernels::dropout_residual`), so no
    // host draw and upload per site; elsewhere `dropout_shared` (the host mask).
    let ones = Tensor::ones(logical, dtype, dev)?;
    let mut mask = pad_to(&dropout_grad(&ones, rate, shared_dim, Some(ctx))?, padded)?;
    if let Some((d, start, len)) = slice {
        mask = mask.narrow(d, start, len)?;
    }
    Ok(Some(mask.contiguous()?))
}

/// `residual + update · mask` (the mask broadcast; `None` = no dropout).
fn add_masked(residual: &Tensor, update: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    Ok(match mask {
        Some(m) => (residual + update.broadcast_mul(m)?)?,
        None => (residual + update)?,
    })
}

/// The update's cotangent of [`add_masked`]: `d · mask`.
fn masked(d: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    Ok(match mask {
        Some(m) => d.broadcast_mul(m)?,
        None => d.clone(),
    })
}

/// One dropout site of the sharded block (module docs: the masks of DAP-1).
enum SiteDrop {
    /// Eval mode or rate 0.
    Off,
    /// This rank's part of the site's mask is the whole logical mask (the sharded dim is the
    /// shared one and nothing is padded): the fused residual-dropout kernel and its gradient on
    /// the local tensors, exactly as the single-rank stack (no mask tensor).
    Fused {
        rate: f64,
        shared_dim: usize,
        ctx: DropoutCtx,
    },
    /// An explicit mask (padding, or a non-shared dim held only in part).
    Mask(Tensor),
}

impl SiteDrop {
    /// The site's dropout: [`drop_mask`]'s arguments.
    #[allow(clippy::too_many_arguments)]
    fn new(
        rate: f64,
        ctx: Option<&DropoutCtx>,
        shared_dim: usize,
        logical: &[usize],
        padded: &[usize],
        slice: Option<(usize, usize, usize)>,
        dtype: DType,
        dev: &Device,
    ) -> Result<Self> {
        let Some(c) = ctx.filter(|_| rate > 0.0) else {
            return Ok(Self::Off);
        };
        if logical == padded && slice.is_none() {
            return Ok(Self::Fused {
                rate,
                shared_dim,
                ctx: *c,
            });
        }
        match drop_mask(rate, ctx, shared_dim, logical, padded, slice, dtype, dev)? {
            Some(m) => Ok(Self::Mask(m)),
            None => Ok(Self::Off),
        }
    }

    /// `residual + dropout(update)`.
    fn add(&self, residual: &Tensor, update: &Tensor) -> Result<Tensor> {
        match self {
            Self::Off => add_masked(residual, update, None),
            Self::Fused {
                rate,
                shared_dim,
                ctx,
            } => residual_dropout_nograd(residual, update, *rate, *shared_dim, Some(ctx)),
            Self::Mask(m) => add_masked(residual, update, Some(m)),
        }
    }

    /// The update's cotangent of [`SiteDrop::add`] for the output cotangent `d`.
    fn grad(&self, d: &Tensor) -> Result<Tensor> {
        match self {
            Self::Off => Ok(d.clone()),
            Self::Fused {
                rate,
                shared_dim,
                ctx,
            } => dropout_grad(d, *rate, *shared_dim, Some(ctx)),
            Self::Mask(m) => masked(d, Some(m)),
        }
    }
}

/// Saved state of the column attention (Algorithm 8 or 19).
enum ColSaved {
    Local(MsaColSaved),
    Global(MsaGlobalColSaved),
}

impl ColumnAttention<'_> {
    fn forward_saved(&self, m: &Tensor, mask: &Tensor) -> Result<(Tensor, ColSaved)> {
        Ok(match self {
            Self::Local(a) => {
                let (y, s) = a.forward_saved(m, mask)?;
                (y, ColSaved::Local(s))
            }
            Self::Global(a) => {
                let (y, s) = a.forward_saved(m, mask)?;
                (y, ColSaved::Global(s))
            }
        })
    }

    fn backward(&self, s: ColSaved, dy: &Tensor, grads: &mut GradStore) -> Result<Tensor> {
        match (self, s) {
            (Self::Local(a), ColSaved::Local(s)) => a.backward(s, dy, grads),
            (Self::Global(a), ColSaved::Global(s)) => a.backward(s, dy, grads),
            _ => Err(crate::error::Error::Model(
                "dap manual backward: column attention state of the other kind".into(),
            )),
        }
    }
}

/// What [`DapTrunk::pair_stack_backward`] keeps from [`DapTrunk::pair_stack_saved`].
struct PairSaved {
    tmo_p: TriMulProjSaved,
    tmo_c: TriMulCombSaved,
    mask1: SiteDrop,
    tmi_p: TriMulProjSaved,
    tmi_c: TriMulCombSaved,
    mask2: SiteDrop,
    tas_b: TriBiasSaved,
    tas_a: TriAttendSaved,
    mask3: SiteDrop,
    tae_b: TriBiasSaved,
    tae_a: TriAttendSaved,
    mask4: SiteDrop,
    transition: TransitionSaved,
}

/// What [`DapTrunk::block_backward`] keeps from [`DapTrunk::block_saved`] (this rank's shards).
pub(super) struct DapBlockSaved {
    /// Activation dtype (the cotangents are cast to it).
    dtype: DType,
    row_bias: PairBiasSaved,
    row_att: MsaRowBiasSaved,
    mask0: SiteDrop,
    col: ColSaved,
    msa_transition: TransitionSaved,
    opm_proj: OpmProjSaved,
    opm_comb: OpmCombSaved,
    pair: PairSaved,
}

impl DapTrunk {
    fn add_ns(counter: &std::sync::atomic::AtomicU64, t: Instant) {
        counter.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
    }

    /// [`DapTrunk::block`] without a graph, keeping what [`DapTrunk::block_backward`] needs:
    /// row-sharded `m` `[Sp/n, Rp, c_m]`, `z` `[Rp/n, Rp, c_z]` → the block's row-sharded outputs
    /// (equal to [`DapTrunk::block`]'s values) and the saved state.
    pub(super) fn block_saved(
        &self,
        b: &BlockParts,
        m_row: &Tensor,
        z_row: &Tensor,
        k: &Masks,
        l: &DapLayout,
        dropout: Option<&DropoutCtx>,
    ) -> Result<(Tensor, Tensor, DapBlockSaved)> {
        let dap = &self.dap;
        let (m_row, z_row) = (m_row.detach(), z_row.detach());
        let (dt, dev) = (m_row.dtype(), m_row.device().clone());
        let c_m = m_row.dim(2)?;
        // --- MSA row attention with the all-gathered pair bias ------------------------------
        let d0 = dropout.map(|c| c.fork(0));
        let (bias, row_bias) = b.msa_att_row.pair_bias_saved(&z_row)?; // [Rp/n, Rp, H]
        let bias = profile::timed(&dev, profile::COLL_FWD, || dap.all_gather_raw(&bias, 0))?; // [Rp, Rp, H]
        let (row, row_att) = b
            .msa_att_row
            .forward_with_bias_saved(&m_row, &bias, &k.msa_row)?;
        drop(bias);
        let mask0 = SiteDrop::new(
            b.msa_dropout,
            d0.as_ref(),
            0,
            &[1, l.r, c_m],
            &[1, l.rp, c_m],
            None,
            dt,
            &dev,
        )?;
        let m_row = mask0.add(&m_row, &row)?;
        drop(row);
        // --- column attention and transition on column-sharded m ----------------------------
        let m_col = profile::timed(&dev, profile::COLL_FWD, || dap.all_to_all_raw(&m_row, 1, 0))?; // row_to_col: [Sp, Rp/n, c_m]
        drop(m_row);
        let (u, col) = b.msa_att_col.forward_saved(&m_col, &k.msa_col)?;
        let m_col = (m_col + u)?;
        let tmask = b.mask_msa_transition.then_some(&k.msa_col);
        let (u, msa_transition) = b.msa_transition.forward_saved(&m_col, tmask)?;
        let m_col = (m_col + u)?;
        // Duality async: m's col_to_row overlaps the outer product mean and the pair stack.
        let t = Instant::now();
        let pending = dap.start_all_to_all_raw(&m_col, 0, 1)?;
        Self::add_ns(&self.timers.start_ns, t);
        // --- outer product mean: this rank's rows i × all columns j -------------------------
        let opm = b.outer_product_mean;
        let (a, bb, opm_proj) = opm.project_saved(&m_col, &k.msa_col)?; // [Sp, Rp/n, C]
        drop(m_col);
        let bb = profile::timed(&dev, profile::COLL_FWD, || dap.all_gather_raw(&bb, 1))?; // [Sp, Rp, C]
        let (u, opm_comb) = opm.combine_saved(&a, &bb, &k.msa_col, &k.msa_full)?;
        drop((a, bb));
        let z_row = (z_row + u)?;
        // --- pair stack ----------------------------------------------------------------------
        let (z_row, pair) = self.pair_stack_saved(b.pair_stack, &z_row, k, l, dropout)?;
        let t = Instant::now();
        let m_row = profile::timed(&dev, profile::MSA_WAIT, || pending.wait())?;
        Self::add_ns(&self.timers.wait_ns, t);
        let saved = DapBlockSaved {
            dtype: dt,
            row_bias,
            row_att,
            mask0,
            col,
            msa_transition,
            opm_proj,
            opm_comb,
            pair,
        };
        Ok((m_row, z_row, saved))
    }

    /// The pair stack of [`DapTrunk::block_saved`] on row-sharded `z` `[Rp/n, Rp, c_z]` (the
    /// layout changes of [`DapTrunk::block`]'s pair stack).
    fn pair_stack_saved(
        &self,
        ps: &PairStack,
        z_row: &Tensor,
        k: &Masks,
        l: &DapLayout,
        dropout: Option<&DropoutCtx>,
    ) -> Result<(Tensor, PairSaved)> {
        let dap = &self.dap;
        let p = ps.pair_dropout;
        let (dt, dev) = (z_row.dtype(), z_row.device().clone());
        let c_z = z_row.dim(2)?;
        let d = |i: u64| dropout.map(|c| c.fork(i));
        let (row_logical, row_padded) = ([1, l.r, c_z], [1, l.rp, c_z]);
        // Triangle multiplication, outgoing: own rows i, all j (b gathered).
        let tmo = &ps.tri_mul_out;
        let (a, bb, tmo_p) = tmo.project_saved(z_row, &k.pair_row)?; // [C, Rp/n, Rp], [C, Rp, Rp/n]
        let bb = profile::timed(&dev, profile::COLL_FWD, || dap.all_gather_raw(&bb, 2))?; // [C, Rp, Rp]
        let (u, tmo_c) = tmo.combine_saved(&tmo_p, &a, &bb)?;
        drop((a, bb));
        let mask1 = SiteDrop::new(
            p,
            d(1).as_ref(),
            0,
            &row_logical,
            &row_padded,
            None,
            dt,
            &dev,
        )?;
        let z_row = mask1.add(z_row, &u)?;
        // Triangle multiplication, incoming: own columns j, all i (a gathered).
        let z_col = profile::timed(&dev, profile::COLL_FWD, || dap.all_to_all_raw(&z_row, 1, 0))?; // [Rp, Rp/n, c_z]
        drop(z_row);
        let tmi = &ps.tri_mul_in;
        let (a, bb, tmi_p) = tmi.project_saved(&z_col, &k.pair_col)?; // [C, Rp/n, Rp], [C, Rp, Rp/n]
        let a = profile::timed(&dev, profile::COLL_FWD, || dap.all_gather_raw(&a, 1))?; // [C, Rp, Rp]
        let (u, tmi_c) = tmi.combine_saved(&tmi_p, &a, &bb)?; // [Rp, Rp/n, c_z]
        drop((a, bb));
        let slice = Some((1, l.rank * l.rl, l.rl));
        let mask2 = SiteDrop::new(
            p,
            d(2).as_ref(),
            0,
            &row_logical,
            &row_padded,
            slice,
            dt,
            &dev,
        )?;
        let z_col = mask2.add(&z_col, &u)?;
        // Triangle attention, starting node: rows i, bias over all (j, k).
        let z_row = profile::timed(&dev, profile::COLL_FWD, || dap.all_to_all_raw(&z_col, 0, 1))?; // [Rp/n, Rp, c_z]
        drop(z_col);
        let tas = &ps.tri_att_start;
        let (x, tb, tas_b) = tas.triangle_bias_saved(&z_row)?;
        let tb = profile::timed(&dev, profile::COLL_FWD, || dap.all_gather_raw(&tb, 0))?; // [Rp, Rp, H]
        let (u, tas_a) = tas.attend_starting_saved(&x, &k.pair_row, &tb)?;
        drop((x, tb));
        let mask3 = SiteDrop::new(
            p,
            d(3).as_ref(),
            0,
            &row_logical,
            &row_padded,
            None,
            dt,
            &dev,
        )?;
        let z_row = mask3.add(&z_row, &u)?;
        // Triangle attention, ending node: the starting-node math on zᵀ (rows = our columns).
        let z_col = profile::timed(&dev, profile::COLL_FWD, || dap.all_to_all_raw(&z_row, 1, 0))?; // [Rp, Rp/n, c_z]
        drop(z_row);
        let tae = &ps.tri_att_end;
        let zt = z_col.transpose(0, 1)?.contiguous()?; // [Rp/n, Rp, c_z]
        let (x, tb, tae_b) = tae.triangle_bias_saved(&zt)?;
        drop(zt);
        let tb = profile::timed(&dev, profile::COLL_FWD, || dap.all_gather_raw(&tb, 0))?;
        let (u, tae_a) = tae.attend_starting_saved(&x, &k.pair_col_t, &tb)?;
        drop((x, tb));
        let u = u.transpose(0, 1)?.contiguous()?; // [Rp, Rp/n, c_z]
        let mask4 = SiteDrop::new(
            p,
            d(4).as_ref(),
            1,
            &[l.r, 1, c_z],
            &[l.rp, 1, c_z],
            None,
            dt,
            &dev,
        )?;
        let z_col = mask4.add(&z_col, &u)?;
        // `_mask_trans = False`: the pair transition is unmasked.
        let (u, transition) = ps.pair_transition.forward_saved(&z_col, None)?;
        let z_col = (z_col + u)?;
        let z_row = profile::timed(&dev, profile::COLL_FWD, || dap.all_to_all_raw(&z_col, 0, 1))?;
        let saved = PairSaved {
            tmo_p,
            tmo_c,
            mask1,
            tmi_p,
            tmi_c,
            mask2,
            tas_b,
            tas_a,
            mask3,
            tae_b,
            tae_a,
            mask4,
            transition,
        };
        Ok((z_row, saved))
    }

    /// Backward of [`DapTrunk::block_saved`] for the cotangents of its row-sharded outputs:
    /// this rank's partial parameter gradients into `grads`; returns the cotangents of the
    /// block's row-sharded inputs `(dm_row, dz_row)`. Every rank of the group must call it.
    pub(super) fn block_backward(
        &self,
        b: &BlockParts,
        s: DapBlockSaved,
        dm_row: &Tensor,
        dz_row: &Tensor,
        grads: &mut GradStore,
    ) -> Result<(Tensor, Tensor)> {
        let dap = &self.dap;
        let DapBlockSaved {
            dtype: dt,
            row_bias,
            row_att,
            mask0,
            col,
            msa_transition,
            opm_proj,
            opm_comb,
            pair,
        } = s;
        let cast = crate::model::primitives::cast;
        let (dm_row, dz_row) = (cast(&dm_row.detach(), dt)?, cast(&dz_row.detach(), dt)?);
        let dev = dz_row.device().clone();
        // The adjoint of m's final col_to_row (row_to_col), overlapping the pair-stack backward.
        let t = Instant::now();
        let pending = dap.start_all_to_all_raw(&dm_row, 1, 0)?;
        Self::add_ns(&self.timers.start_ns, t);
        let dz_row = self.pair_stack_backward(b.pair_stack, pair, &dz_row, grads)?;
        // Outer product mean: z_out = z_in + opm(m_col); b was gathered along residues.
        let opm = b.outer_product_mean;
        let (da, db) = opm.combine_backward(opm_comb, &dz_row, grads)?;
        let db = profile::timed(&dev, profile::COLL_BWD, || dap.reduce_own_chunk(&db, 1))?; // [Sp, Rp/n, C]
        let dm_opm = opm.project_backward(opm_proj, &da, &db, grads)?;
        drop((da, db));
        let t = Instant::now();
        let dm_col = profile::timed(&dev, profile::MSA_WAIT, || pending.wait())?; // [Sp, Rp/n, c_m]
        Self::add_ns(&self.timers.wait_ns, t);
        let dm_col = (dm_col + dm_opm)?;
        // MSA transition and column attention (residuals).
        let dm_col = (&dm_col + b.msa_transition.backward(msa_transition, &dm_col, grads)?)?;
        let dm_col = (&dm_col + b.msa_att_col.backward(col, &dm_col, grads)?)?;
        // m_col = row_to_col(m_row) → dm_row = col_to_row(dm_col).
        let dm_row = profile::timed(&dev, profile::COLL_BWD, || {
            dap.all_to_all_raw(&dm_col, 0, 1)
        })?; // [Sp/n, Rp, c_m]
        drop(dm_col);
        // Row attention: m_out = m_in + drop(row(m_in, gather(bias(z_in)))).
        let du = mask0.grad(&dm_row)?;
        let (dm_att, d_bias) = b.msa_att_row.backward_with_bias(row_att, &du, grads)?;
        drop(du);
        let dm_row = (dm_row + dm_att)?;
        let d_bias = profile::timed(&dev, profile::COLL_BWD, || dap.reduce_own_chunk(&d_bias, 0))?; // [Rp/n, Rp, H]
        let dz_bias = b.msa_att_row.pair_bias_backward(row_bias, &d_bias, grads)?;
        let dz_row = (dz_row + dz_bias)?;
        Ok((dm_row, dz_row))
    }

    /// Backward of [`DapTrunk::pair_stack_saved`]: `dz` of its row-sharded output → `dz` of its
    /// row-sharded input.
    fn pair_stack_backward(
        &self,
        ps: &PairStack,
        s: PairSaved,
        dz_row: &Tensor,
        grads: &mut GradStore,
    ) -> Result<Tensor> {
        let dap = &self.dap;
        let PairSaved {
            tmo_p,
            tmo_c,
            mask1,
            tmi_p,
            tmi_c,
            mask2,
            tas_b,
            tas_a,
            mask3,
            tae_b,
            tae_a,
            mask4,
            transition,
        } = s;
        let dev = dz_row.device().clone();
        // z_row = col_to_row(z_col) → dz_col = row_to_col(dz_row).
        let dz_col = profile::timed(&dev, profile::COLL_BWD, || dap.all_to_all_raw(dz_row, 1, 0))?; // [Rp, Rp/n, c_z]
        let dz_col = (&dz_col + ps.pair_transition.backward(transition, &dz_col, grads)?)?;
        // Ending node (transposed frame).
        let tae = &ps.tri_att_end;
        let dut = mask4.grad(&dz_col)?.transpose(0, 1)?.contiguous()?; // [Rp/n, Rp, c_z]
        let (dx, d_tb) = tae.attend_starting_backward(tae_a, &dut, grads)?;
        drop(dut);
        let d_tb = profile::timed(&dev, profile::COLL_BWD, || dap.reduce_own_chunk(&d_tb, 0))?; // [Rp/n, Rp, H]
        let dzt = tae.triangle_bias_backward(tae_b, &dx, &d_tb, grads)?;
        let dz_col = (dz_col + dzt.transpose(0, 1)?)?;
        // z_col = row_to_col(z_row) → dz_row = col_to_row(dz_col).
        let dz_row = profile::timed(&dev, profile::COLL_BWD, || {
            dap.all_to_all_raw(&dz_col, 0, 1)
        })?; // [Rp/n, Rp, c_z]
        drop(dz_col);
        // Starting node.
        let tas = &ps.tri_att_start;
        let du = mask3.grad(&dz_row)?;
        let (dx, d_tb) = tas.attend_starting_backward(tas_a, &du, grads)?;
        drop(du);
        let d_tb = profile::timed(&dev, profile::COLL_BWD, || dap.reduce_own_chunk(&d_tb, 0))?;
        let dz_row = (&dz_row + tas.triangle_bias_backward(tas_b, &dx, &d_tb, grads)?)?;
        // z_row = col_to_row(z_col) → dz_col = row_to_col(dz_row).
        let dz_col = profile::timed(&dev, profile::COLL_BWD, || {
            dap.all_to_all_raw(&dz_row, 1, 0)
        })?; // [Rp, Rp/n, c_z]
        drop(dz_row);
        // Incoming (columns; a gathered along dim 1).
        let tmi = &ps.tri_mul_in;
        let du = mask2.grad(&dz_col)?;
        let (da, db, dg) = tmi.combine_backward(tmi_c, &du, grads)?;
        drop(du);
        let da = profile::timed(&dev, profile::COLL_BWD, || dap.reduce_own_chunk(&da, 1))?; // [C, Rp/n, Rp]
        let dz_col = (&dz_col + tmi.project_backward(tmi_p, &da, &db, &dg, grads)?)?;
        drop((da, db, dg));
        // z_col = row_to_col(z_row) → dz_row = col_to_row(dz_col).
        let dz_row = profile::timed(&dev, profile::COLL_BWD, || {
            dap.all_to_all_raw(&dz_col, 0, 1)
        })?; // [Rp/n, Rp, c_z]
        drop(dz_col);
        // Outgoing (rows; b gathered along dim 0).
        let tmo = &ps.tri_mul_out;
        let du = mask1.grad(&dz_row)?;
        let (da, db, dg) = tmo.combine_backward(tmo_c, &du, grads)?;
        drop(du);
        let db = profile::timed(&dev, profile::COLL_BWD, || dap.reduce_own_chunk(&db, 2))?; // [C, Rp, Rp/n]
        Ok((&dz_row + tmo.project_backward(tmo_p, &da, &db, &dg, grads)?)?)
    }
}
