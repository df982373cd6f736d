//! The full AlphaFold2 monomer model: Algorithm 2 (inference loop over recycles) with the
//! recycling embedder (Algorithm 32), the extra-MSA embedding/stack, the Evoformer, the structure
//! module and the auxiliary heads, as OpenFold's `AlphaFold` (parameter names = its `state_dict`).
//!
//! Recycling follows OpenFold (Algorithm 30-31 training variant): cycle 0 starts from zeros, every
//! cycle but the last runs without gradient (its carried state is detached), the heads run once on
//! the last cycle.
//!
//! Two ways to differentiate:
//! * [`AlphaFold::forward`] builds one graph for the last cycle: `loss.backward()` works.
//! * [`AlphaFold::loss_and_grads`] runs the Evoformer / extra-MSA stacks of the last cycle with
//!   remat tapes (`ModelConfig::remat`; DAP-sharded tapes under DAP), backpropagates the loss
//!   through the structure module and heads, then the trunk through its tapes, then the embedders.
//!   Same gradients as the plain path.
//!
//! Precision: with [`Precision::Bf16`] the Evoformer and extra-MSA stacks run on bf16 activations
//! (the master weights stay f32 `Var`s; `Linear` casts its weight to the activation dtype); the
//! embedders, structure module, heads and losses run in the parameters' dtype (f32).

use std::collections::BTreeMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, IndexOp, Tensor, Var, D};
use candle_nn::{VarBuilder, VarMap};

use super::dropout::DropoutCtx;
use super::embedders::{InputEmbedder, RecyclingEmbedder};
use super::evoformer::{BlockConfig, EvoformerOutput, EvoformerStack, EvoformerTape, TrunkGrads};
use super::extra_msa::{ExtraMsaStack, ExtraMsaTape};
use super::heads::AuxiliaryHeads;
use super::params::sorted_vars;
use super::primitives::{Linear, LinearInit};
use super::remat::{backward_vars, vjp_loss};
use super::structure_module::{StructureModule, StructureModuleOutput};
use crate::config::{ModelConfig, Precision, Remat};
use crate::error::{Error, Result};
use crate::geometry::all_atom::atom14_to_atom37;
use crate::loss::{compute_plddt, LossOutputs};

/// Index of glycine in the restype order `ARNDCQEGHILKMFPSTWYV(X)`.
const GLY: i64 = 7;
/// atom37 indices of CA and CB.
const CA: usize = 1;
const CB: usize = 3;
/// Extra-MSA one-hot classes (20 amino acids + X + gap + mask).
const EXTRA_MSA_CLASSES: usize = 23;

/// The features of ONE recycling cycle that the model reads (OpenFold batch keys, no batch dim,
/// recycling dim removed).
#[derive(Debug, Clone)]
pub struct AfFeatures {
    /// `[N, tf_dim]` has_break | one-hot aatype (21).
    pub target_feat: Tensor,
    /// `[N]` integer.
    pub residue_index: Tensor,
    /// `[S, N, msa_dim]`
    pub msa_feat: Tensor,
    /// `[S, N]`
    pub msa_mask: Tensor,
    /// `[N]`
    pub seq_mask: Tensor,
    /// `[N]` integer.
    pub aatype: Tensor,
    /// `[S_e, N]` integer (0..23).
    pub extra_msa: Tensor,
    /// `[S_e, N]`
    pub extra_has_deletion: Tensor,
    /// `[S_e, N]`
    pub extra_deletion_value: Tensor,
    /// `[S_e, N]`
    pub extra_msa_mask: Tensor,
    /// `[N, 37]` integer.
    pub residx_atom37_to_atom14: Tensor,
    /// `[N, 37]`
    pub atom37_atom_exists: Tensor,
    // templates: template features would go here (templates are disabled in this model).
}

/// Names of the [`AfFeatures`] keys (OpenFold batch keys).
pub const FEATURE_KEYS: [&str; 12] = [
    "target_feat",
    "residue_index",
    "msa_feat",
    "msa_mask",
    "seq_mask",
    "aatype",
    "extra_msa",
    "extra_has_deletion",
    "extra_deletion_value",
    "extra_msa_mask",
    "residx_atom37_to_atom14",
    "atom37_atom_exists",
];

impl AfFeatures {
    /// From a key → tensor lookup (the keys of [`FEATURE_KEYS`]).
    pub fn from_fn(mut get: impl FnMut(&str) -> Result<Tensor>) -> Result<Self> {
        Ok(Self {
            target_feat: get("target_feat")?,
            residue_index: get("residue_index")?,
            msa_feat: get("msa_feat")?,
            msa_mask: get("msa_mask")?,
            seq_mask: get("seq_mask")?,
            aatype: get("aatype")?,
            extra_msa: get("extra_msa")?,
            extra_has_deletion: get("extra_has_deletion")?,
            extra_deletion_value: get("extra_deletion_value")?,
            extra_msa_mask: get("extra_msa_mask")?,
            residx_atom37_to_atom14: get("residx_atom37_to_atom14")?,
            atom37_atom_exists: get("atom37_atom_exists")?,
        })
    }

    /// Every feature on `device` (no copy where it is already there).
    pub fn to_device(&self, device: &Device) -> Result<Self> {
        let d = |t: &Tensor| -> Result<Tensor> { Ok(t.to_device(device)?) };
        Ok(Self {
            target_feat: d(&self.target_feat)?,
            residue_index: d(&self.residue_index)?,
            msa_feat: d(&self.msa_feat)?,
            msa_mask: d(&self.msa_mask)?,
            seq_mask: d(&self.seq_mask)?,
            aatype: d(&self.aatype)?,
            extra_msa: d(&self.extra_msa)?,
            extra_has_deletion: d(&self.extra_has_deletion)?,
            extra_deletion_value: d(&self.extra_deletion_value)?,
            extra_msa_mask: d(&self.extra_msa_mask)?,
            residx_atom37_to_atom14: d(&self.residx_atom37_to_atom14)?,
            atom37_atom_exists: d(&self.atom37_atom_exists)?,
        })
    }
}

/// A training/inference example: one feature set per recycling cycle (`cycles[c]` feeds cycle
/// `c`; MSA sampling and masking differ between cycles, the crop does not).
///
/// OpenFold stacks the cycles on the LAST dim of every batch tensor; [`AfBatch::from_last_dim`]
/// splits such a map.
#[derive(Debug, Clone)]
pub struct AfBatch {
    pub cycles: Vec<AfFeatures>,
}

impl AfBatch {
    /// Split OpenFold-layout features (`key → [..., n_cycles]`) into per-cycle feature sets.
    pub fn from_last_dim(feats: &BTreeMap<String, Tensor>) -> Result<Self> {
        let first = feats
            .get("aatype")
            .ok_or_else(|| Error::Model("batch has no `aatype`".into()))?;
        let n = first.dim(D::Minus1)?;
        let cycles = (0..n)
            .map(|c| {
                AfFeatures::from_fn(|k| {
                    let t = feats
                        .get(k)
                        .ok_or_else(|| Error::Model(format!("batch has no `{k}`")))?;
                    let last = t.rank() - 1;
                    Ok(t.narrow(last, c, 1)?.squeeze(last)?.contiguous()?)
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { cycles })
    }
}

/// The state one cycle hands to the next (detached).
#[derive(Debug, Clone)]
pub struct RecycleState {
    /// `[N, c_m]` first MSA row after the Evoformer.
    pub m_1_prev: Tensor,
    /// `[N, N, c_z]` pair representation.
    pub z_prev: Tensor,
    /// `[N, 37, 3]` final atom positions (Å).
    pub x_prev: Tensor,
}

/// Outputs of the final cycle (OpenFold output names), plus the carried state of earlier cycles.
#[derive(Debug, Clone)]
pub struct AlphaFoldOutput {
    /// `[S, N, c_m]`
    pub msa: Tensor,
    /// `[N, N, c_z]`
    pub pair: Tensor,
    /// `[N, c_s]` Evoformer single representation.
    pub single: Tensor,
    /// Structure module outputs (`sm.*`).
    pub sm: StructureModuleOutput,
    /// `[N, 37, 3]`
    pub final_atom_positions: Tensor,
    /// `[N, 37]`
    pub final_atom_mask: Tensor,
    /// `[N, 7]` = `sm.frames[-1]`.
    pub final_affine_tensor: Tensor,
    pub distogram_logits: Tensor,
    pub masked_msa_logits: Tensor,
    pub lddt_logits: Tensor,
    /// `[N]` in 0..100.
    pub plddt: Tensor,
    pub experimentally_resolved_logits: Tensor,
    /// `recycled[c]` = what cycle `c` handed on (`c = 0..num_recycles-1`).
    pub recycled: Vec<RecycleState>,
    pub num_recycles: usize,
}

impl AlphaFoldOutput {
    /// Every tensor detached from the graph.
    pub fn detach(&self) -> Self {
        let sm = &self.sm;
        Self {
            msa: self.msa.detach(),
            pair: self.pair.detach(),
            single: self.single.detach(),
            sm: StructureModuleOutput {
                frames: sm.frames.detach(),
                sidechain_frames: sm.sidechain_frames.detach(),
                unnormalized_angles: sm.unnormalized_angles.detach(),
                angles: sm.angles.detach(),
                positions: sm.positions.detach(),
                states: sm.states.detach(),
                single: sm.single.detach(),
            },
            final_atom_positions: self.final_atom_positions.detach(),
            final_atom_mask: self.final_atom_mask.detach(),
            final_affine_tensor: self.final_affine_tensor.detach(),
            distogram_logits: self.distogram_logits.detach(),
            masked_msa_logits: self.masked_msa_logits.detach(),
            lddt_logits: self.lddt_logits.detach(),
            plddt: self.plddt.detach(),
            experimentally_resolved_logits: self.experimentally_resolved_logits.detach(),
            recycled: self.recycled.clone(),
            num_recycles: self.num_recycles,
        }
    }

    /// The tensors the loss reads.
    pub fn loss_outputs(&self) -> LossOutputs {
        LossOutputs::from_structure_module(
            &self.sm,
            self.final_atom_positions.clone(),
            self.distogram_logits.clone(),
            self.masked_msa_logits.clone(),
            self.lddt_logits.clone(),
            self.experimentally_resolved_logits.clone(),
        )
    }
}

/// Result of [`AlphaFold::loss_and_grads`].
pub struct LossAndGrads<T> {
    pub loss: f64,
    /// Whatever the loss function returned besides the loss tensor (e.g. the breakdown).
    pub aux: T,
    /// d loss / d parameter for EVERY variable of the model's `VarMap`, sorted by name (zeros where
    /// no gradient path exists).
    pub grads: BTreeMap<String, Tensor>,
    pub output: AlphaFoldOutput,
}

/// Result of [`AlphaFold::loss_and_grads_on_device`]: as [`LossAndGrads`], the loss a 0-dim
/// device tensor.
pub struct LossAndGradsOnDevice<T> {
    pub loss: Tensor,
    pub aux: T,
    pub grads: BTreeMap<String, Tensor>,
    pub output: AlphaFoldOutput,
}

/// Trunk inputs of one cycle before the stacks (graph kept to the embedders' parameters).
struct Embedded {
    /// `[S, N, c_m]` MSA embedding incl. recycled first row (trunk dtype).
    m: Tensor,
    /// `[N, N, c_z]` pair embedding incl. recycling (trunk dtype).
    z: Tensor,
    /// `[S_e, N, c_e]` extra-MSA embedding (trunk dtype).
    a: Tensor,
    msa_mask: Tensor,
    pair_mask: Tensor,
    extra_mask: Tensor,
}

/// Algorithm 2: the AlphaFold2 model.
#[derive(Debug, Clone)]
pub struct AlphaFold {
    pub cfg: ModelConfig,
    pub input_embedder: InputEmbedder,
    pub recycling_embedder: RecyclingEmbedder,
    /// `extra_msa_embedder.linear`: extra_msa_dim (25) → c_e (Algorithm 2 line 14).
    pub extra_msa_embedder: Linear,
    // templates: `template_embedder` would be built here (templates are disabled).
    pub extra_msa_stack: ExtraMsaStack,
    pub evoformer: EvoformerStack,
    pub structure_module: StructureModule,
    pub aux_heads: AuxiliaryHeads,
    /// Activation dtype of the Evoformer/extra-MSA stacks; `None` = the parameters' dtype.
    trunk_dtype: Option<DType>,
    /// Dynamic Axial Parallelism over a DAP group: the two stacks run sharded
    /// ([`crate::parallel::DapEvoformer`]); `None` = single-rank stacks.
    dap: Option<crate::parallel::Dap>,
}

fn cast(t: &Tensor, dt: DType) -> Result<Tensor> {
    Ok(if t.dtype() == dt {
        t.clone()
    } else {
        t.to_dtype(dt)?
    })
}

impl AlphaFold {
    pub fn new(vb: VarBuilder, cfg: &ModelConfig) -> Result<Self> {
        let evo_cfg = BlockConfig::evoformer(cfg);
        let extra_cfg = BlockConfig::extra_msa(cfg);
        Ok(Self {
            cfg: cfg.clone(),
            input_embedder: InputEmbedder::from_config(vb.pp("input_embedder"), cfg)?,
            recycling_embedder: RecyclingEmbedder::from_config(vb.pp("recycling_embedder"), cfg)?,
            extra_msa_embedder: Linear::new(
                vb.pp("extra_msa_embedder").pp("linear"),
                cfg.extra_msa_dim,
                cfg.c_e,
                true,
                LinearInit::Default,
            )?,
            extra_msa_stack: ExtraMsaStack::new(vb.pp("extra_msa_stack"), &extra_cfg)?,
            evoformer: EvoformerStack::new(vb.pp("evoformer"), &evo_cfg, cfg.c_s)?,
            structure_module: StructureModule::new(
                vb.pp("structure_module"),
                cfg.c_s,
                cfg.c_z,
                &cfg.structure,
            )?,
            aux_heads: AuxiliaryHeads::new(
                vb.pp("aux_heads"),
                cfg.c_m,
                cfg.c_z,
                cfg.c_s,
                &cfg.heads,
            )?,
            trunk_dtype: None,
            dap: None,
        })
    }

    /// Run the Evoformer and extra-MSA stacks with DAP over `dap`'s group (every rank of the group
    /// passes the same batch and dropout seed). [`AlphaFold::loss_and_grads`] then runs them
    /// through the DAP tapes ([`crate::parallel::dap_remat`]) with `model.remat`, and the
    /// recycling cycles without gradient block by block.
    ///
    /// With `model.backward = "manual"` the DAP tapes run the sharded blocks graph-free and
    /// differentiate them with the hand-written backward (the collectives' adjoints issued
    /// explicitly); with `"autograd"`, through candle's autograd and the differentiable DAP ops.
    pub fn set_dap(&mut self, dap: Option<crate::parallel::Dap>) {
        self.dap = dap;
    }

    /// The DAP group this model's stacks are sharded over, if any.
    pub fn dap(&self) -> Option<&crate::parallel::Dap> {
        self.dap.as_ref()
    }

    /// Extra-MSA stack then Evoformer on one cycle's embedding (DAP-sharded when configured).
    fn stacks(&self, e: &Embedded, dropout: Option<DropoutCtx>) -> Result<EvoformerOutput> {
        let d1 = dropout.map(|d| d.fork(1));
        let d2 = dropout.map(|d| d.fork(2));
        match &self.dap {
            Some(dap) => {
                let z = crate::parallel::DapExtraMsa::new(&self.extra_msa_stack, dap.clone())
                    .forward(&e.a, &e.z, &e.extra_mask, &e.pair_mask, d1.as_ref())?;
                crate::parallel::DapEvoformer::new(&self.evoformer, dap.clone()).forward(
                    &e.m,
                    &z,
                    &e.msa_mask,
                    &e.pair_mask,
                    d2.as_ref(),
                )
            }
            None => {
                let z = self.extra_msa_stack.forward(
                    &e.a,
                    &e.z,
                    &e.extra_mask,
                    &e.pair_mask,
                    d1.as_ref(),
                )?;
                self.evoformer
                    .forward(&e.m, &z, &e.msa_mask, &e.pair_mask, d2.as_ref())
            }
        }
    }

    /// Trunk precision (`train.precision`): bf16 runs the Evoformer and extra-MSA stacks on bf16
    /// activations; fp32 keeps the parameters' dtype.
    pub fn set_precision(&mut self, p: Precision) {
        self.trunk_dtype = match p {
            Precision::Fp32 => None,
            Precision::Bf16 => Some(DType::BF16),
        };
    }

    /// The parameters' (master) dtype.
    pub fn param_dtype(&self) -> DType {
        self.input_embedder.linear_tf_m.weight.dtype()
    }

    /// The parameters' device (features are moved there).
    pub fn device(&self) -> Device {
        self.input_embedder.linear_tf_m.weight.device().clone()
    }

    fn trunk_dtype(&self) -> DType {
        self.trunk_dtype.unwrap_or_else(|| self.param_dtype())
    }

    /// Zero carried state for cycle 0: `m_1_prev [N, c_m]`, `z_prev [N, N, c_z]`,
    /// `x_prev [N, 37, 3]`.
    fn zero_state(&self, n: usize) -> Result<RecycleState> {
        let (dt, dev) = (
            self.param_dtype(),
            self.input_embedder.linear_tf_m.weight.device(),
        );
        Ok(RecycleState {
            m_1_prev: Tensor::zeros((n, self.cfg.c_m), dt, dev)?,
            z_prev: Tensor::zeros((n, n, self.cfg.c_z), dt, dev)?,
            x_prev: Tensor::zeros((n, 37, 3), dt, dev)?,
        })
    }

    /// OpenFold `pseudo_beta_fn`: CB position, CA for glycine. `x` `[N, 37, 3]` → `[N, 3]`.
    pub fn pseudo_beta(aatype: &Tensor, x: &Tensor) -> Result<Tensor> {
        let is_gly = aatype
            .to_dtype(DType::I64)?
            .eq(GLY)?
            .unsqueeze(1)?
            .broadcast_as((x.dim(0)?, 3))?;
        let ca = x.i((.., CA, ..))?;
        let cb = x.i((.., CB, ..))?;
        Ok(is_gly.where_cond(&ca, &cb)?)
    }

    /// `[S_e, N, 25]` extra-MSA features: one-hot(extra_msa, 23) | has_deletion | deletion_value.
    fn extra_msa_feat(f: &AfFeatures, dt: DType) -> Result<Tensor> {
        let dev = f.extra_has_deletion.device();
        let classes = Tensor::arange(0i64, EXTRA_MSA_CLASSES as i64, dev)?;
        let onehot = f
            .extra_msa
            .to_dtype(DType::I64)?
            .unsqueeze(2)?
            .broadcast_eq(&classes.reshape((1, 1, EXTRA_MSA_CLASSES))?)?
            .to_dtype(dt)?;
        Ok(Tensor::cat(
            &[
                &onehot,
                &cast(&f.extra_has_deletion, dt)?.unsqueeze(2)?,
                &cast(&f.extra_deletion_value, dt)?.unsqueeze(2)?,
            ],
            2,
        )?)
    }

    /// Algorithm 2 lines 5-15: input embedding, recycling (Algorithm 32) and extra-MSA embedding.
    fn embed(&self, f: &AfFeatures, prev: &RecycleState) -> Result<Embedded> {
        let pdt = self.param_dtype();
        let tdt = self.trunk_dtype();
        let (m, z) = self.input_embedder.forward(
            &cast(&f.target_feat, pdt)?,
            &f.residue_index,
            &cast(&f.msa_feat, pdt)?,
        )?; // [S, N, c_m], [N, N, c_z]
        let re = &self.recycling_embedder;
        let m_upd = re.layer_norm_m.forward(&cast(&prev.m_1_prev, pdt)?)?; // [N, c_m]
        let z_ln = re.layer_norm_z.forward(&cast(&prev.z_prev, pdt)?)?; // [N, N, c_z]
        let x = Self::pseudo_beta(&f.aatype, &prev.x_prev.detach())?; // [N, 3]
        let d = re.linear.forward(&cast(&re.distance_one_hot(&x)?, pdt)?)?;
        let s = m.dim(0)?;
        let m0 = (m.i(0)? + m_upd)?.unsqueeze(0)?;
        let m = if s > 1 {
            Tensor::cat(&[&m0, &m.i(1..s)?], 0)?
        } else {
            m0
        };
        let z = ((z + z_ln)? + d)?;
        // templates: the template pair/angle embeddings would be added to z and m here.
        let a = self
            .extra_msa_embedder
            .forward(&Self::extra_msa_feat(f, pdt)?)?; // [S_e, N, c_e]
        let seq_mask = cast(&f.seq_mask, pdt)?;
        let pair_mask = seq_mask
            .unsqueeze(1)?
            .broadcast_mul(&seq_mask.unsqueeze(0)?)?;
        Ok(Embedded {
            m: cast(&m, tdt)?,
            z: cast(&z, tdt)?,
            a: cast(&a, tdt)?,
            msa_mask: cast(&f.msa_mask, tdt)?,
            pair_mask: cast(&pair_mask, tdt)?,
            extra_mask: cast(&f.extra_msa_mask, tdt)?,
        })
    }

    /// Structure module + atom37 positions for one cycle's trunk outputs (param dtype).
    fn structure(
        &self,
        f: &AfFeatures,
        single: &Tensor,
        pair: &Tensor,
        dropout: Option<&DropoutCtx>,
    ) -> Result<(StructureModuleOutput, Tensor)> {
        let pdt = self.param_dtype();
        let sm = self.structure_module.forward(
            single,
            pair,
            &f.aatype,
            &cast(&f.seq_mask, pdt)?,
            dropout.map(|d| d.fork(3).seed),
        )?;
        let l = sm.positions.dim(0)?;
        let x = atom14_to_atom37(
            &sm.positions.i(l - 1)?,
            &f.residx_atom37_to_atom14,
            &f.atom37_atom_exists,
        )?;
        Ok((sm, x))
    }

    /// A cycle that carries no gradient: runs the stacks block by block with detached block
    /// boundaries (only one block's graph alive at a time) and returns the detached carried state.
    fn no_grad_cycle(
        &self,
        f: &AfFeatures,
        prev: &RecycleState,
        dropout: Option<DropoutCtx>,
    ) -> Result<RecycleState> {
        let pdt = self.param_dtype();
        let e = self.embed(f, &prev_detached(prev))?;
        let out = if let Some(dap) = &self.dap {
            // Block by block, detached block boundaries (as the single-rank branch below).
            let (_, z) = crate::parallel::DapExtraMsa::new(&self.extra_msa_stack, dap.clone())
                .forward_no_grad(
                    &e.a,
                    &e.z,
                    &e.extra_mask,
                    &e.pair_mask,
                    dropout.map(|d| d.fork(1)).as_ref(),
                )?;
            crate::parallel::DapEvoformer::new(&self.evoformer, dap.clone()).forward_no_grad(
                &e.m,
                &z,
                &e.msa_mask,
                &e.pair_mask,
                dropout.map(|d| d.fork(2)).as_ref(),
            )?
        } else {
            let (z, _) = self.extra_msa_stack.forward_train(
                &e.a.detach(),
                &e.z.detach(),
                &e.extra_mask,
                &e.pair_mask,
                dropout.map(|d| d.fork(1)),
                Remat::Block,
            )?;
            self.evoformer
                .forward_train(
                    &e.m.detach(),
                    &z,
                    &e.msa_mask,
                    &e.pair_mask,
                    dropout.map(|d| d.fork(2)),
                    Remat::Block,
                )?
                .0
        };
        let single = cast(&out.s, pdt)?.detach();
        let pair = cast(&out.z, pdt)?.detach();
        let (_, x) = self.structure(f, &single, &pair, dropout.as_ref())?;
        Ok(RecycleState {
            m_1_prev: cast(&out.m.i(0)?, pdt)?.detach(),
            z_prev: pair,
            x_prev: x.detach(),
        })
    }

    /// The cycles before the last one; returns the carried state of each.
    fn recycle(
        &self,
        batch: &AfBatch,
        num_recycles: usize,
        dropout: Option<DropoutCtx>,
    ) -> Result<Vec<RecycleState>> {
        if batch.cycles.len() <= num_recycles {
            return Err(Error::Model(format!(
                "{num_recycles} recycles need {} feature cycles, batch has {}",
                num_recycles + 1,
                batch.cycles.len()
            )));
        }
        let n = batch.cycles[0].aatype.dim(0)?;
        let mut states = Vec::with_capacity(num_recycles);
        let mut prev = self.zero_state(n)?;
        for (c, f) in batch.cycles.iter().take(num_recycles).enumerate() {
            let f = &f.to_device(&self.device())?;
            prev = self.no_grad_cycle(f, &prev, dropout.map(|d| d.fork(100 + c as u64)))?;
            states.push(prev.clone());
        }
        Ok(states)
    }

    /// Heads + output assembly of the final cycle.
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &self,
        f: &AfFeatures,
        msa: Tensor,
        pair: Tensor,
        single: Tensor,
        sm: StructureModuleOutput,
        final_atom_positions: Tensor,
        recycled: Vec<RecycleState>,
    ) -> Result<AlphaFoldOutput> {
        let heads = self.aux_heads.forward(&sm.single, &single, &msa, &pair)?;
        let l = sm.frames.dim(0)?;
        let final_affine_tensor = sm.frames.i(l - 1)?;
        let plddt = compute_plddt(&heads.lddt_logits)?;
        Ok(AlphaFoldOutput {
            final_atom_mask: f.atom37_atom_exists.clone(),
            num_recycles: recycled.len(),
            msa,
            pair,
            single,
            sm,
            final_atom_positions,
            final_affine_tensor,
            distogram_logits: heads.distogram_logits,
            masked_msa_logits: heads.masked_msa_logits,
            lddt_logits: heads.lddt_logits,
            plddt,
            experimentally_resolved_logits: heads.experimentally_resolved_logits,
            recycled,
        })
    }

    /// Forward over `num_recycles + 1` cycles (`batch.cycles[0..=num_recycles]`); the last cycle's
    /// graph is kept whole, so `loss.backward()` gives every parameter gradient. `dropout`:
    /// `None` = eval (no dropout).
    ///
    /// The loss must read the label features of the cycle that ran last
    /// (`batch.cycles[num_recycles]`, OpenFold's `batch_last`): `true_msa`/`bert_mask` differ
    /// between cycles.
    pub fn forward(
        &self,
        batch: &AfBatch,
        num_recycles: usize,
        dropout: Option<DropoutCtx>,
    ) -> Result<AlphaFoldOutput> {
        let recycled = self.recycle(batch, num_recycles, dropout)?;
        let f = &batch.cycles[num_recycles].to_device(&self.device())?;
        let prev = match recycled.last() {
            Some(p) => p.clone(),
            None => self.zero_state(f.aatype.dim(0)?)?,
        };
        let d = dropout.map(|d| d.fork(100 + num_recycles as u64));
        let pdt = self.param_dtype();
        let e = self.embed(f, &prev)?;
        let out = self.stacks(&e, d)?;
        let (msa, pair, single) = (cast(&out.m, pdt)?, cast(&out.z, pdt)?, cast(&out.s, pdt)?);
        let (sm, x) = self.structure(f, &single, &pair, d.as_ref())?;
        self.finish(f, msa, pair, single, sm, x, recycled)
    }

    /// Forward + loss + backward with the stacks of the last cycle run through remat tapes
    /// (`self.cfg.remat`). `loss_fn` maps the outputs to a scalar loss tensor (f32/f64) plus any
    /// auxiliary value. `params` are the model's variables by name (e.g.
    /// [`crate::train::optim::params_from_varmap`] of the `VarMap` it was built from, what
    /// `Task::params` returns): the gradients of all of them are returned by name.
    pub fn loss_and_grads<T>(
        &self,
        params: &BTreeMap<String, Var>,
        batch: &AfBatch,
        num_recycles: usize,
        dropout: Option<DropoutCtx>,
        loss_fn: impl FnOnce(&AlphaFoldOutput) -> Result<(Tensor, T)>,
    ) -> Result<LossAndGrads<T>> {
        let r = self.loss_and_grads_on_device(params, batch, num_recycles, dropout, loss_fn)?;
        Ok(LossAndGrads {
            loss: r.loss.to_dtype(DType::F64)?.to_scalar::<f64>()?,
            aux: r.aux,
            grads: r.grads,
            output: r.output,
        })
    }

    /// [`AlphaFold::loss_and_grads`] without reading anything back to the host: the loss stays a
    /// (detached, 0-dim) device tensor. On the single-rank path no host synchronisation happens
    /// if `loss_fn` has none, so the whole step can be captured in a CUDA graph.
    pub fn loss_and_grads_on_device<T>(
        &self,
        params: &BTreeMap<String, Var>,
        batch: &AfBatch,
        num_recycles: usize,
        dropout: Option<DropoutCtx>,
        loss_fn: impl FnOnce(&AlphaFoldOutput) -> Result<(Tensor, T)>,
    ) -> Result<LossAndGradsOnDevice<T>> {
        let remat = self.cfg.remat;
        let extra_remat = self.cfg.extra_msa_remat.unwrap_or(remat);
        let recycled = self.recycle(batch, num_recycles, dropout)?;
        let f = &batch.cycles[num_recycles].to_device(&self.device())?;
        let prev = match recycled.last() {
            Some(p) => p.clone(),
            None => self.zero_state(f.aatype.dim(0)?)?,
        };
        let d = dropout.map(|d| d.fork(100 + num_recycles as u64));
        let pdt = self.param_dtype();
        let e = self.embed(f, &prev)?;
        let (d1, d2) = (d.map(|d| d.fork(1)), d.map(|d| d.fork(2)));
        let (out, evo_tape, extra_tape) = match &self.dap {
            // DAP: the sharded stacks' tapes (every rank of the group runs the same steps).
            Some(dap) => {
                let extra = crate::parallel::DapExtraMsa::new(&self.extra_msa_stack, dap.clone());
                let (z1, extra_tape) = extra.forward_train(
                    &e.a,
                    &e.z,
                    &e.extra_mask,
                    &e.pair_mask,
                    d1,
                    extra_remat,
                )?;
                let evo = crate::parallel::DapEvoformer::new(&self.evoformer, dap.clone());
                let (out, evo_tape) =
                    evo.forward_train(&e.m, &z1, &e.msa_mask, &e.pair_mask, d2, remat)?;
                (out, EvoTape::Dap(evo_tape), ExtraTape::Dap(extra_tape))
            }
            None => {
                let (z1, extra_tape) = self.extra_msa_stack.forward_train(
                    &e.a,
                    &e.z,
                    &e.extra_mask,
                    &e.pair_mask,
                    d1,
                    extra_remat,
                )?;
                let (out, evo_tape) = self.evoformer.forward_train(
                    &e.m,
                    &z1,
                    &e.msa_mask,
                    &e.pair_mask,
                    d2,
                    remat,
                )?;
                (
                    out,
                    EvoTape::Single(evo_tape),
                    ExtraTape::Single(extra_tape),
                )
            }
        };
        // Trunk outputs as leaves of the downstream graph.
        let mv = Var::from_tensor(&out.m)?;
        let zv = Var::from_tensor(&out.z)?;
        let sv = Var::from_tensor(&out.s)?;
        let (msa, pair, single) = (
            cast(mv.as_tensor(), pdt)?,
            cast(zv.as_tensor(), pdt)?,
            cast(sv.as_tensor(), pdt)?,
        );
        let (sm, x) = self.structure(f, &single, &pair, d.as_ref())?;
        let output = self.finish(f, msa, pair, single, sm, x, recycled)?;
        let (loss, aux) = loss_fn(&output)?;
        let loss_value = loss.detach();

        // Structure module, heads, loss.
        let mut grads = backward_vars(&loss)?;
        let mut take = |t: &Tensor| -> Result<Tensor> {
            match grads.remove(t) {
                Some(g) => Ok(g),
                None => Ok(t.zeros_like()?),
            }
        };
        let (dm, dz, ds) = (
            take(mv.as_tensor())?,
            take(zv.as_tensor())?,
            take(sv.as_tensor())?,
        );
        drop(loss);
        let output = output.detach();
        // Evoformer, then extra-MSA stack, through their tapes.
        let evo = evo_tape.backward(&dm, &dz, &ds)?;
        grads.extend(evo.params)?;
        let extra = extra_tape.backward(&evo.dz)?;
        grads.extend(extra.params)?;
        // Embedders.
        let emb = backward_vars(&vjp_loss(&[
            (&e.m, &evo.dm),
            (&e.z, &extra.dz),
            (&e.a, &extra.dm),
        ])?)?;
        grads.extend(emb)?;
        Ok(LossAndGradsOnDevice {
            loss: loss_value,
            aux,
            grads: named_grads(params, &grads)?,
            output,
        })
    }
}

/// The Evoformer's backward handle: single-rank or DAP-sharded.
enum EvoTape<'a> {
    Single(EvoformerTape<'a>),
    Dap(crate::parallel::DapEvoformerTape<'a>),
}

impl EvoTape<'_> {
    fn backward(self, dm: &Tensor, dz: &Tensor, ds: &Tensor) -> Result<TrunkGrads> {
        match self {
            Self::Single(t) => t.backward(dm, dz, ds),
            Self::Dap(t) => t.backward(dm, dz, ds),
        }
    }
}

/// The extra-MSA stack's backward handle: single-rank or DAP-sharded.
enum ExtraTape<'a> {
    Single(ExtraMsaTape<'a>),
    Dap(crate::parallel::DapExtraMsaTape<'a>),
}

impl ExtraTape<'_> {
    fn backward(self, dz: &Tensor) -> Result<TrunkGrads> {
        match self {
            Self::Single(t) => t.backward(dz),
            Self::Dap(t) => t.backward(dz),
        }
    }
}

fn prev_detached(p: &RecycleState) -> RecycleState {
    RecycleState {
        m_1_prev: p.m_1_prev.detach(),
        z_prev: p.z_prev.detach(),
        x_prev: p.x_prev.detach(),
    }
}

/// Gradients of every variable of `vm` by name (sorted), zeros where `store` has none.
pub fn grads_by_name(vm: &VarMap, store: &GradStore) -> Result<BTreeMap<String, Tensor>> {
    named_grads(&sorted_vars(vm).into_iter().collect(), store)
}

/// Gradients of every variable of `params` by name, zeros where `store` has none.
pub fn named_grads(
    params: &BTreeMap<String, Var>,
    store: &GradStore,
) -> Result<BTreeMap<String, Tensor>> {
    params
        .iter()
        .map(|(k, v)| {
            let g = match store.get(v.as_tensor()) {
                Some(g) => g.clone(),
                None => v.as_tensor().zeros_like()?,
            };
            Ok((k.clone(), g))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pseudo_beta_is_cb_or_ca_for_glycine() {
        let dev = Device::Cpu;
        // 3 residues: ALA (0), GLY (7), TRP (17); atom37 coordinates = atom index + residue offset.
        let x: Vec<f64> = (0..3)
            .flat_map(|r| (0..37).flat_map(move |a| [a as f64, 10.0 * r as f64, -1.0]))
            .collect();
        let x = Tensor::from_vec(x, (3, 37, 3), &dev).unwrap();
        let aatype = Tensor::new(&[0i64, 7, 17], &dev).unwrap();
        let pb: Vec<Vec<f64>> = AlphaFold::pseudo_beta(&aatype, &x)
            .unwrap()
            .to_vec2()
            .unwrap();
        assert_eq!(pb[0], vec![3.0, 0.0, -1.0]);
        assert_eq!(pb[1], vec![1.0, 10.0, -1.0]);
        assert_eq!(pb[2], vec![3.0, 20.0, -1.0]);
    }

    #[test]
    fn extra_msa_features_one_hot_and_deletions() {
        let dev = Device::Cpu;
        let z = |v: &[f64]| Tensor::from_vec(v.to_vec(), (1, v.len()), &dev).unwrap();
        let f = AfFeatures {
            target_feat: z(&[0.0]),
            residue_index: z(&[0.0]),
            msa_feat: z(&[0.0]),
            msa_mask: z(&[0.0]),
            seq_mask: z(&[0.0]),
            aatype: z(&[0.0]),
            extra_msa: Tensor::new(&[[0i64, 22]], &dev).unwrap(),
            extra_has_deletion: z(&[1.0, 0.0]),
            extra_deletion_value: z(&[0.5, 0.25]),
            extra_msa_mask: z(&[1.0, 1.0]),
            residx_atom37_to_atom14: z(&[0.0]),
            atom37_atom_exists: z(&[0.0]),
        };
        let t: Vec<Vec<Vec<f64>>> = AlphaFold::extra_msa_feat(&f, DType::F64)
            .unwrap()
            .to_vec3()
            .unwrap();
        let mut want0 = vec![0.0; 25];
        want0[0] = 1.0;
        want0[23] = 1.0;
        want0[24] = 0.5;
        let mut want1 = vec![0.0; 25];
        want1[22] = 1.0;
        want1[24] = 0.25;
        assert_eq!(t[0], vec![want0, want1]);
    }
}
