//! The weighted AF2 training loss (supplement section 1.9, Eq. 7; OpenFold `AlphaFoldLoss`) and the
//! per-term breakdown the trainer logs.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, D};

use super::renaming::{compute_renamed_ground_truth, RenamedGroundTruth};
use super::violations::{find_structural_violations, violation_loss, ViolationTables, Violations};
use super::{
    backbone_loss, distogram_loss, experimentally_resolved_loss, lddt_loss, masked_msa_loss,
    sidechain_loss, supervised_chi_loss,
};
use crate::config::{ClashAveraging, LossConfig, ViolationConfig};
use crate::error::{Error, Result};
use crate::model::residue_constants as rc;

/// The model outputs the loss reads (no batch dim: one sample; `L` = structure-module layers).
#[derive(Debug, Clone)]
pub struct LossOutputs {
    /// `[L, N, 7]`: (quaternion, translation in Å) per SM layer.
    pub sm_frames: Tensor,
    /// `[L, N, 8, 4, 4]`
    pub sm_sidechain_frames: Tensor,
    /// `[L, N, 14, 3]`
    pub sm_positions: Tensor,
    /// `[L, N, 7, 2]`
    pub sm_angles: Tensor,
    /// `[L, N, 7, 2]`
    pub sm_unnormalized_angles: Tensor,
    /// `[N, 37, 3]`
    pub final_atom_positions: Tensor,
    /// [N, N, distogram bins]
    pub distogram_logits: Tensor,
    /// `[S, N, 23]`
    pub masked_msa_logits: Tensor,
    /// [N, pLDDT bins]
    pub lddt_logits: Tensor,
    /// `[N, 37]`
    pub experimentally_resolved_logits: Tensor,
}

impl LossOutputs {
    /// From the structure module's stacked outputs plus the heads' logits.
    pub fn from_structure_module(
        sm: &crate::model::structure_module::StructureModuleOutput,
        final_atom_positions: Tensor,
        distogram_logits: Tensor,
        masked_msa_logits: Tensor,
        lddt_logits: Tensor,
        experimentally_resolved_logits: Tensor,
    ) -> Self {
        Self {
            sm_frames: sm.frames.clone(),
            sm_sidechain_frames: sm.sidechain_frames.clone(),
            sm_positions: sm.positions.clone(),
            sm_angles: sm.angles.clone(),
            sm_unnormalized_angles: sm.unnormalized_angles.clone(),
            final_atom_positions,
            distogram_logits,
            masked_msa_logits,
            lddt_logits,
            experimentally_resolved_logits,
        }
    }

    /// Every tensor converted to `dtype` (differentiable).
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        let c = |t: &Tensor| t.to_dtype(dtype);
        Ok(Self {
            sm_frames: c(&self.sm_frames)?,
            sm_sidechain_frames: c(&self.sm_sidechain_frames)?,
            sm_positions: c(&self.sm_positions)?,
            sm_angles: c(&self.sm_angles)?,
            sm_unnormalized_angles: c(&self.sm_unnormalized_angles)?,
            final_atom_positions: c(&self.final_atom_positions)?,
            distogram_logits: c(&self.distogram_logits)?,
            masked_msa_logits: c(&self.masked_msa_logits)?,
            lddt_logits: c(&self.lddt_logits)?,
            experimentally_resolved_logits: c(&self.experimentally_resolved_logits)?,
        })
    }
}

/// The label features the loss reads (OpenFold batch keys; the last recycling iteration).
#[derive(Debug, Clone)]
pub struct LossBatch {
    pub aatype: Tensor,
    pub residue_index: Tensor,
    pub seq_mask: Tensor,
    /// Number of residues of the uncropped chain (integer, any shape; its mean is used).
    pub seq_length: Tensor,
    pub pseudo_beta: Tensor,
    pub pseudo_beta_mask: Tensor,
    pub true_msa: Tensor,
    pub bert_mask: Tensor,
    pub backbone_rigid_tensor: Tensor,
    pub backbone_rigid_mask: Tensor,
    /// 0-dim 1.0/0.0 (sampled with `fape.clamp_prob` by the data pipeline); `None` = clamped.
    pub use_clamped_fape: Option<Tensor>,
    pub rigidgroups_gt_frames: Tensor,
    pub rigidgroups_alt_gt_frames: Tensor,
    pub rigidgroups_gt_exists: Tensor,
    pub atom14_gt_positions: Tensor,
    pub atom14_alt_gt_positions: Tensor,
    pub atom14_gt_exists: Tensor,
    pub atom14_alt_gt_exists: Tensor,
    pub atom14_atom_is_ambiguous: Tensor,
    pub atom14_atom_exists: Tensor,
    pub residx_atom14_to_atom37: Tensor,
    pub all_atom_positions: Tensor,
    pub all_atom_mask: Tensor,
    pub atom37_atom_exists: Tensor,
    /// 0-dim or `[1]` resolution in Å.
    pub resolution: Tensor,
    pub chi_mask: Tensor,
    pub chi_angles_sin_cos: Tensor,
}

impl LossBatch {
    /// Build from named features (OpenFold batch keys) of one recycling iteration, e.g. the last
    /// cycle of an OpenFold-layout batch. `get` returns the tensor of a key or an error naming it.
    pub fn from_features(get: impl Fn(&str) -> Result<Tensor>) -> Result<Self> {
        Ok(Self {
            aatype: get("aatype")?,
            residue_index: get("residue_index")?,
            seq_mask: get("seq_mask")?,
            seq_length: get("seq_length")?,
            pseudo_beta: get("pseudo_beta")?,
            pseudo_beta_mask: get("pseudo_beta_mask")?,
            true_msa: get("true_msa")?,
            bert_mask: get("bert_mask")?,
            backbone_rigid_tensor: get("backbone_rigid_tensor")?,
            backbone_rigid_mask: get("backbone_rigid_mask")?,
            use_clamped_fape: Some(get("use_clamped_fape")?),
            rigidgroups_gt_frames: get("rigidgroups_gt_frames")?,
            rigidgroups_alt_gt_frames: get("rigidgroups_alt_gt_frames")?,
            rigidgroups_gt_exists: get("rigidgroups_gt_exists")?,
            atom14_gt_positions: get("atom14_gt_positions")?,
            atom14_alt_gt_positions: get("atom14_alt_gt_positions")?,
            atom14_gt_exists: get("atom14_gt_exists")?,
            atom14_alt_gt_exists: get("atom14_alt_gt_exists")?,
            atom14_atom_is_ambiguous: get("atom14_atom_is_ambiguous")?,
            atom14_atom_exists: get("atom14_atom_exists")?,
            residx_atom14_to_atom37: get("residx_atom14_to_atom37")?,
            all_atom_positions: get("all_atom_positions")?,
            all_atom_mask: get("all_atom_mask")?,
            atom37_atom_exists: get("atom37_atom_exists")?,
            resolution: get("resolution")?,
            chi_mask: get("chi_mask")?,
            chi_angles_sin_cos: get("chi_angles_sin_cos")?,
        })
    }

    /// The features of recycling iteration `cycle` of an OpenFold-layout batch (every tensor has
    /// the recycling dimension last), as `train_openfold.py`'s `batch_last` for the last cycle.
    pub fn from_last_dim(
        feats: &std::collections::BTreeMap<String, Tensor>,
        cycle: usize,
    ) -> Result<Self> {
        Self::from_features(|k| {
            let t = feats
                .get(k)
                .ok_or_else(|| crate::error::Error::Loss(format!("batch has no `{k}`")))?;
            let last = t.rank().saturating_sub(1);
            Ok(t.narrow(last, cycle, 1)?.squeeze(last)?)
        })
    }

    /// Float features converted to `dtype`; integer features unchanged.
    pub fn to_dtype(&self, dtype: DType) -> Result<Self> {
        let c = |t: &Tensor| -> Result<Tensor> {
            Ok(if t.dtype().is_float() {
                t.to_dtype(dtype)?
            } else {
                t.clone()
            })
        };
        Ok(Self {
            aatype: c(&self.aatype)?,
            residue_index: c(&self.residue_index)?,
            seq_mask: c(&self.seq_mask)?,
            seq_length: self.seq_length.clone(),
            pseudo_beta: c(&self.pseudo_beta)?,
            pseudo_beta_mask: c(&self.pseudo_beta_mask)?,
            true_msa: c(&self.true_msa)?,
            bert_mask: c(&self.bert_mask)?,
            backbone_rigid_tensor: c(&self.backbone_rigid_tensor)?,
            backbone_rigid_mask: c(&self.backbone_rigid_mask)?,
            use_clamped_fape: self.use_clamped_fape.as_ref().map(c).transpose()?,
            rigidgroups_gt_frames: c(&self.rigidgroups_gt_frames)?,
            rigidgroups_alt_gt_frames: c(&self.rigidgroups_alt_gt_frames)?,
            rigidgroups_gt_exists: c(&self.rigidgroups_gt_exists)?,
            atom14_gt_positions: c(&self.atom14_gt_positions)?,
            atom14_alt_gt_positions: c(&self.atom14_alt_gt_positions)?,
            atom14_gt_exists: c(&self.atom14_gt_exists)?,
            atom14_alt_gt_exists: c(&self.atom14_alt_gt_exists)?,
            atom14_atom_is_ambiguous: c(&self.atom14_atom_is_ambiguous)?,
            atom14_atom_exists: c(&self.atom14_atom_exists)?,
            residx_atom14_to_atom37: c(&self.residx_atom14_to_atom37)?,
            all_atom_positions: c(&self.all_atom_positions)?,
            all_atom_mask: c(&self.all_atom_mask)?,
            atom37_atom_exists: c(&self.atom37_atom_exists)?,
            resolution: c(&self.resolution)?,
            chi_mask: c(&self.chi_mask)?,
            chi_angles_sin_cos: c(&self.chi_angles_sin_cos)?,
        })
    }
}

/// Residue-constant tables the loss needs.
#[derive(Debug, Clone)]
pub struct LossTables {
    /// `[21, 4]` 0/1: which chis are π-periodic.
    pub chi_pi_periodic: Tensor,
    /// Bound tables built with the config's violation tolerances.
    pub violation: ViolationTables,
}

impl LossTables {
    /// Tables from the residue constants plus `stereo_chemical_props.txt` at `stereo_props`, with
    /// the tolerances of `cfg`.
    pub fn load(
        stereo_props: &std::path::Path,
        cfg: &ViolationConfig,
        device: &Device,
    ) -> Result<Self> {
        let props = rc::load_stereo_chemical_props(stereo_props)?;
        Self::from_props(&props, cfg, device)
    }

    /// As [`Self::load`] from already parsed stereochemistry.
    pub fn from_props(
        props: &rc::StereoChemicalProps,
        cfg: &ViolationConfig,
        device: &Device,
    ) -> Result<Self> {
        let chi: Vec<f32> = rc::CHI_PI_PERIODIC.iter().flatten().copied().collect();
        Ok(Self {
            chi_pi_periodic: Tensor::from_vec(chi, (rc::RESTYPE_NUM_WITH_X, 4), device)?,
            violation: ViolationTables::from_props(
                props,
                cfg.clash_overlap_tolerance,
                cfg.tolerance_factor,
                device,
            )?,
        })
    }
}

/// Term name → value (unweighted terms, the FAPE parts, `unscaled_loss`, `loss`), plus the names of
/// terms that were NaN/inf and were zeroed. Serialises as a flat JSON object for JSONL logs.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct LossBreakdown {
    pub terms: BTreeMap<String, f64>,
    /// Terms that came out NaN/inf; each was logged and replaced by 0 in the total.
    pub non_finite: Vec<String>,
}

impl LossBreakdown {
    pub fn get(&self, name: &str) -> Option<f64> {
        self.terms.get(name).copied()
    }
    /// True if any term was non-finite (and zeroed).
    pub fn had_non_finite(&self) -> bool {
        !self.non_finite.is_empty()
    }

    /// Flat `loss/<term>` → value map for JSONL records, plus `loss/non_finite_terms` (count).
    pub fn flat(&self, prefix: &str) -> BTreeMap<String, f64> {
        let mut m: BTreeMap<String, f64> = self
            .terms
            .iter()
            .map(|(k, v)| (format!("{prefix}{k}"), *v))
            .collect();
        m.insert(
            format!("{prefix}non_finite_terms"),
            self.non_finite.len() as f64,
        );
        m
    }
}

/// Everything [`alphafold_loss`] computes.
#[derive(Debug, Clone)]
pub struct LossResult {
    /// Differentiable scaled total.
    pub loss: Tensor,
    pub breakdown: LossBreakdown,
    /// Every breakdown value as a detached device tensor (term name → value), in breakdown order.
    pub terms: Vec<(String, Tensor)>,
    pub violations: Violations,
    pub renamed: RenamedGroundTruth,
}

/// The term names, in OpenFold's summation order.
pub const TERMS: [&str; 7] = [
    "distogram",
    "experimentally_resolved",
    "fape",
    "plddt_loss",
    "masked_msa",
    "supervised_chi",
    "violation",
];

fn last_layer(t: &Tensor) -> Result<Tensor> {
    Ok(t.get(t.dim(0)? - 1)?)
}

/// The loss terms on the device (see [`alphafold_loss`]).
fn loss_terms(
    out: &LossOutputs,
    batch: &LossBatch,
    tables: &LossTables,
    cfg: &LossConfig,
) -> Result<LossResult> {
    // Work in the outputs' dtype, but at least f32 (bf16/f16 outputs are upcast, differentiably);
    // float batch features follow it. Integer features are left alone.
    let dtype = match out.sm_positions.dtype() {
        DType::F64 => DType::F64,
        _ => DType::F32,
    };
    let out = &out.to_dtype(dtype)?;
    let batch = &batch.to_dtype(dtype)?;
    let positions = last_layer(&out.sm_positions)?; // [N, 14, 3]
    let vcfg = &cfg.violation;
    let violations = find_structural_violations(
        &positions,
        &batch.atom14_atom_exists,
        &batch.residue_index,
        &batch.aatype,
        &batch.residx_atom14_to_atom37,
        &tables.violation,
        vcfg.tolerance_factor,
        vcfg.clash_overlap_tolerance,
    )?;
    let renamed = compute_renamed_ground_truth(
        &batch.atom14_gt_positions,
        &batch.atom14_alt_gt_positions,
        &batch.atom14_atom_is_ambiguous,
        &batch.atom14_gt_exists,
        &batch.atom14_alt_gt_exists,
        &positions,
        1e-10,
    )?;
    let f = &cfg.fape;
    let fape_bb = backbone_loss(
        &batch.backbone_rigid_tensor,
        &batch.backbone_rigid_mask,
        &out.sm_frames,
        batch.use_clamped_fape.as_ref(),
        f.clamp_distance,
        f.loss_unit_distance,
        f.eps,
        None,
    )?;
    let fape_sc = sidechain_loss(
        &out.sm_sidechain_frames,
        &out.sm_positions,
        &batch.rigidgroups_gt_frames,
        &batch.rigidgroups_alt_gt_frames,
        &batch.rigidgroups_gt_exists,
        &renamed.renamed_atom14_gt_positions,
        &renamed.renamed_atom14_gt_exists,
        &renamed.alt_naming_is_better,
        f.clamp_distance,
        f.loss_unit_distance,
        f.eps,
    )?;
    let fape = ((&fape_bb * f.backbone_weight)? + (&fape_sc * f.sidechain_weight)?)?.mean_all()?;

    let terms: [(&str, f64, Tensor); 7] = [
        (
            "distogram",
            cfg.distogram_weight,
            distogram_loss(
                &out.distogram_logits,
                &batch.pseudo_beta,
                &batch.pseudo_beta_mask,
                cfg.distogram_min_bin,
                cfg.distogram_max_bin,
                cfg.distogram_no_bins,
                cfg.eps,
            )?,
        ),
        (
            "experimentally_resolved",
            cfg.experimentally_resolved_weight,
            experimentally_resolved_loss(
                &out.experimentally_resolved_logits,
                &batch.atom37_atom_exists,
                &batch.all_atom_mask,
                &batch.resolution,
                cfg.experimentally_resolved_min_resolution,
                cfg.experimentally_resolved_max_resolution,
                cfg.eps,
            )?,
        ),
        ("fape", cfg.fape_weight, fape),
        (
            "plddt_loss",
            cfg.plddt_weight,
            lddt_loss(
                &out.lddt_logits,
                &out.final_atom_positions,
                &batch.all_atom_positions,
                &batch.all_atom_mask,
                &batch.resolution,
                cfg.plddt_cutoff,
                cfg.plddt_no_bins,
                cfg.plddt_min_resolution,
                cfg.plddt_max_resolution,
                cfg.eps,
            )?,
        ),
        (
            "masked_msa",
            cfg.masked_msa_weight,
            masked_msa_loss(
                &out.masked_msa_logits,
                &batch.true_msa,
                &batch.bert_mask,
                cfg.masked_msa_num_classes,
                cfg.eps,
            )?,
        ),
        (
            "supervised_chi",
            cfg.supervised_chi_weight,
            supervised_chi_loss(
                &out.sm_angles,
                &out.sm_unnormalized_angles,
                &batch.aatype,
                &batch.seq_mask,
                &batch.chi_mask,
                &batch.chi_angles_sin_cos,
                &tables.chi_pi_periodic,
                cfg.chi.chi_weight,
                cfg.chi.angle_norm_weight,
                cfg.eps,
            )?,
        ),
        (
            "violation",
            cfg.violation_weight,
            violation_loss(
                &violations,
                &batch.atom14_atom_exists,
                vcfg.average_clashes == ClashAveraging::On,
                vcfg.eps,
            )?,
        ),
    ];

    // Every term stays on the device: a NaN/inf term is replaced by 0 with `where_cond` (its
    // gradient is then 0), the breakdown is read back in one transfer afterwards (or, in
    // CUDA-graph mode, after the replay: see [`alphafold_loss_on_device`]).
    let mut named: Vec<(String, Tensor)> = Vec::with_capacity(TERMS.len() + 4);
    let mut cum: Option<Tensor> = None;
    for (name, weight, value) in terms {
        named.push((name.to_string(), value.detach()));
        // `v·0` is 0 for finite v, NaN for NaN/inf.
        let finite = (&value * 0.0)?.eq(0.0)?;
        let value = finite.where_cond(&value, &value.zeros_like()?)?;
        let w = (value * weight)?;
        cum = Some(match cum {
            Some(c) => (c + w)?,
            None => w,
        });
    }
    let cum = cum.ok_or_else(|| Error::Loss("no loss terms".into()))?;
    named.push(("fape_backbone".into(), fape_bb.detach()));
    named.push(("fape_sidechain".into(), fape_sc.detach()));
    named.push(("unscaled_loss".into(), cum.detach()));

    // F32 QUIRK: OpenFold takes `seq_len = mean(seq_length.float())` (float32) and, since
    // seq_len <= crop_len, `sqrt(min(seq_len, crop_len))` is computed in float32 (here on the
    // device, as a 0-dim f32 tensor).
    let crop_len = batch.aatype.dim(D::Minus1)? as f32;
    let scale = batch
        .seq_length
        .to_dtype(DType::F32)?
        .flatten_all()?
        .mean(D::Minus1)?
        .minimum(crop_len)?
        .sqrt()?
        .to_dtype(cum.dtype())?;
    let loss = cum.broadcast_mul(&scale)?;
    named.push(("loss".into(), loss.detach()));
    let breakdown = LossBreakdown::default();
    Ok(LossResult {
        loss,
        breakdown,
        terms: named,
        violations,
        renamed,
    })
}

/// The AF2 loss as [`alphafold_loss`] computes it, but nothing is read back: `breakdown` is
/// empty and [`LossResult::terms`] holds the device values (read them with
/// [`breakdown_from_terms`] once the step has run). No host synchronisation: usable inside a
/// CUDA-graph capture.
pub fn alphafold_loss_on_device(
    out: &LossOutputs,
    batch: &LossBatch,
    tables: &LossTables,
    cfg: &LossConfig,
) -> Result<LossResult> {
    loss_terms(out, batch, tables, cfg)
}

/// OpenFold `AlphaFoldLoss.loss`: every term is computed even at weight 0; a NaN/inf term is
/// logged, recorded in the breakdown and replaced by 0; `unscaled = Σ w_k·term_k`;
/// `loss = unscaled · sqrt(min(mean(seq_length), crop_len))`.
pub fn alphafold_loss(
    out: &LossOutputs,
    batch: &LossBatch,
    tables: &LossTables,
    cfg: &LossConfig,
) -> Result<LossResult> {
    let mut r = loss_terms(out, batch, tables, cfg)?;
    r.breakdown = breakdown_from_terms(&r.terms)?;
    Ok(r)
}

/// Read the device terms of [`LossResult::terms`] (one transfer) into a [`LossBreakdown`]; a
/// non-finite weighted term (one of [`TERMS`]) is logged, listed and recorded as 0.
pub fn breakdown_from_terms(terms: &[(String, Tensor)]) -> Result<LossBreakdown> {
    let mut breakdown = LossBreakdown::default();
    if terms.is_empty() {
        return Ok(breakdown);
    }
    let flat = terms
        .iter()
        .map(|(_, t)| t.to_dtype(DType::F64)?.flatten_all()?.narrow(0, 0, 1))
        .collect::<candle_core::Result<Vec<_>>>()?;
    let values: Vec<f64> = Tensor::cat(&flat, 0)?.to_device(&Device::Cpu)?.to_vec1()?;
    for ((name, _), v) in terms.iter().zip(values) {
        if TERMS.contains(&name.as_str()) && !v.is_finite() {
            tracing::warn!(
                term = name.as_str(),
                value = v,
                "loss term is not finite; replaced by 0"
            );
            breakdown.non_finite.push(name.clone());
            breakdown.terms.insert(name.clone(), 0.0);
        } else {
            breakdown.terms.insert(name.clone(), v);
        }
    }
    Ok(breakdown)
}
