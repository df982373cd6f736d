//! Shared setup for the full-model tests: the `model/alphafold_model` fixture as an `AlphaFold`
//! (config from the fixture's `config_resolved`), its batch and the loss inputs.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use ferrofold::config::{
    HeadsConfig, LossConfig, ModelConfig, RecyclingConfig, Remat, StackConfig, StructureConfig,
    TrunkBackward, ViolationConfig,
};
use ferrofold::loss::{alphafold_loss, LossBatch, LossBreakdown, LossTables};
use ferrofold::model::alphafold::{AfBatch, AlphaFold, AlphaFoldOutput};
use ferrofold::model::params::varmap_from_tensors;

use crate::common::golden::{golden_dir, Fixture};

fn model_json(fx: &Fixture) -> &serde_json::Value {
    &fx.meta["config_resolved"]["model"]
}

fn stack(j: &serde_json::Value) -> StackConfig {
    let u = |k: &str| j[k].as_u64().unwrap_or_else(|| panic!("{k}")) as usize;
    let f = |k: &str| j[k].as_f64().unwrap_or_else(|| panic!("{k}"));
    StackConfig {
        num_blocks: u("no_blocks"),
        c_hidden_msa_att: u("c_hidden_msa_att"),
        no_heads_msa: u("no_heads_msa"),
        c_hidden_opm: u("c_hidden_opm"),
        c_hidden_mul: u("c_hidden_mul"),
        c_hidden_pair_att: u("c_hidden_pair_att"),
        no_heads_pair: u("no_heads_pair"),
        transition_n: u("transition_n"),
        msa_dropout: f("msa_dropout"),
        pair_dropout: f("pair_dropout"),
    }
}

/// `ModelConfig` of the fixture (from `config_resolved.model`).
pub fn model_config(fx: &Fixture, remat: Remat) -> ModelConfig {
    let m = model_json(fx);
    let u = |v: &serde_json::Value| v.as_u64().unwrap() as usize;
    let f = |v: &serde_json::Value| v.as_f64().unwrap();
    let ie = &m["input_embedder"];
    let re = &m["recycling_embedder"];
    let sm = &m["structure_module"];
    let h = &m["heads"];
    let evo = &m["evoformer_stack"];
    ModelConfig {
        c_m: u(&evo["c_m"]),
        c_z: u(&evo["c_z"]),
        c_s: u(&evo["c_s"]),
        c_e: u(&m["extra_msa"]["extra_msa_embedder"]["c_out"]),
        tf_dim: u(&ie["tf_dim"]),
        msa_dim: u(&ie["msa_dim"]),
        extra_msa_dim: u(&m["extra_msa"]["extra_msa_embedder"]["c_in"]),
        relpos_k: u(&ie["relpos_k"]),
        recycling: RecyclingConfig {
            min_bin: f(&re["min_bin"]),
            max_bin: f(&re["max_bin"]),
            no_bins: u(&re["no_bins"]),
            max_iters: 1,
            inf: f(&re["inf"]),
        },
        evoformer: stack(evo),
        extra_msa: stack(&m["extra_msa"]["extra_msa_stack"]),
        structure: StructureConfig {
            c_ipa: u(&sm["c_ipa"]),
            c_resnet: u(&sm["c_resnet"]),
            no_heads_ipa: u(&sm["no_heads_ipa"]),
            no_qk_points: u(&sm["no_qk_points"]),
            no_v_points: u(&sm["no_v_points"]),
            dropout_rate: f(&sm["dropout_rate"]),
            no_blocks: u(&sm["no_blocks"]),
            no_transition_layers: u(&sm["no_transition_layers"]),
            no_resnet_blocks: u(&sm["no_resnet_blocks"]),
            no_angles: u(&sm["no_angles"]),
            trans_scale_factor: f(&sm["trans_scale_factor"]),
            epsilon: f(&sm["epsilon"]),
            inf: f(&sm["inf"]),
        },
        heads: HeadsConfig {
            plddt_no_bins: u(&h["lddt"]["no_bins"]),
            plddt_c_hidden: u(&h["lddt"]["c_hidden"]),
            distogram_no_bins: u(&h["distogram"]["no_bins"]),
            masked_msa_c_out: u(&h["masked_msa"]["c_out"]),
            experimentally_resolved_c_out: u(&h["experimentally_resolved"]["c_out"]),
            ..HeadsConfig::default()
        },
        remat,
        extra_msa_remat: None,
        backward: TrunkBackward::Manual,
        inf: f(&evo["inf"]),
        eps_opm: 1e-3,
    }
}

/// The fixture's model with its parameters in `dtype` (hand-written trunk backward).
pub fn build(fx: &Fixture, dtype: DType, remat: Remat) -> (VarMap, AlphaFold) {
    build_with(fx, dtype, remat, TrunkBackward::Manual)
}

/// [`build`] with the trunk differentiated by `backward`.
pub fn build_with(
    fx: &Fixture,
    dtype: DType,
    remat: Remat,
    backward: TrunkBackward,
) -> (VarMap, AlphaFold) {
    let vm = varmap_from_tensors(fx.params(DType::F64), dtype).unwrap();
    let n_before = vm.all_vars().len();
    let mut cfg = model_config(fx, remat);
    cfg.backward = backward;
    let model = AlphaFold::new(VarBuilder::from_varmap(&vm, dtype, &Device::Cpu), &cfg).unwrap();
    // Every stored parameter is used and nothing new was created.
    assert_eq!(vm.all_vars().len(), n_before, "model created parameters");
    (vm, model)
}

/// All `input.*` tensors (recycling dim last), split per cycle.
pub fn batch(fx: &Fixture) -> AfBatch {
    let feats: BTreeMap<String, Tensor> = fx
        .names_with_prefix("input.")
        .into_iter()
        .map(|k| {
            let t = fx.get(&format!("input.{k}"));
            (k, t)
        })
        .collect();
    AfBatch::from_last_dim(&feats).unwrap()
}

/// Label features of the LAST cycle (`batch_last` in OpenFold's training script).
pub fn loss_batch(fx: &Fixture) -> LossBatch {
    let feats: BTreeMap<String, Tensor> = fx
        .names_with_prefix("input.")
        .into_iter()
        .map(|k| {
            let t = fx.get(&format!("input.{k}"));
            (k, t)
        })
        .collect();
    let last = feats["aatype"].dims().last().copied().unwrap() - 1;
    LossBatch::from_last_dim(&feats, last).unwrap()
}

/// `stereo_chemical_props.txt`: `$FERROFOLD_STEREO_PROPS`, else `<golden>/../../data/`, else
/// `../shared/data/` from the crate.
pub fn stereo_props_path() -> PathBuf {
    if let Some(p) = std::env::var_os("FERROFOLD_STEREO_PROPS") {
        return PathBuf::from(p);
    }
    let beside = golden_dir().join("../../data/stereo_chemical_props.txt");
    if beside.exists() {
        return beside;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/stereo_chemical_props.txt")
}

pub fn tables() -> LossTables {
    LossTables::load(
        &stereo_props_path(),
        &ViolationConfig::default(),
        &Device::Cpu,
    )
    .unwrap()
}

/// The training loss closure for `AlphaFold::loss_and_grads`.
pub fn loss_fn<'a>(
    lb: &'a LossBatch,
    tables: &'a LossTables,
) -> impl FnOnce(&AlphaFoldOutput) -> ferrofold::error::Result<(Tensor, LossBreakdown)> + 'a {
    move |out: &AlphaFoldOutput| {
        let r = alphafold_loss(&out.loss_outputs(), lb, tables, &LossConfig::default())?;
        Ok((r.loss, r.breakdown))
    }
}
