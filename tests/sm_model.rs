//! Structure module and heads inside the full-model golden (`model/alphafold_model`, real 3u8v
//! crop, 32 residues, 2 SM layers): fed the stored final Evoformer outputs (`single`, `pair`,
//! `msa`), they must reproduce the stored `sm.*` outputs and head logits (forward only: the
//! model's gradients are of the whole loss).

mod common;

use candle_core::{DType, Device, IndexOp, Tensor};
use candle_nn::{VarBuilder, VarMap};
use common::golden::{Fixture, Report};
use ferrofold::config::HeadsConfig;
use ferrofold::model::heads::AuxiliaryHeads;
use ferrofold::model::structure_module::StructureModule;

/// Set every var of `vm` from the fixture's `param.<prefix><name>`.
fn load(vm: &VarMap, fx: &Fixture, prefix: &str) {
    let data = vm.data().lock().unwrap();
    for (name, v) in data.iter() {
        v.set(&fx.get(&format!("param.{prefix}{name}"))).unwrap();
    }
    let stored = fx.names_with_prefix(&format!("param.{prefix}")).len();
    assert_eq!(stored, data.len(), "{prefix}: parameter count differs");
}

/// `input.<name>` at the last recycle (the recycling dim is last).
fn last(fx: &Fixture, name: &str) -> Tensor {
    let t = fx.get(&format!("input.{name}"));
    let r = t.rank();
    t.narrow(r - 1, t.dims()[r - 1] - 1, 1)
        .unwrap()
        .squeeze(r - 1)
        .unwrap()
}

fn value<'a>(fx: &'a Fixture, path: &[&str]) -> &'a serde_json::Value {
    let mut v = &fx.meta["config_resolved"]["model"];
    for p in path {
        v = &v[*p];
    }
    v
}

#[test]
fn sm_model_golden_structure_module_and_heads() {
    let fx = Fixture::named("model", "alphafold_model");
    let dev = Device::Cpu;
    let mut report = Report::default();

    // Structure module.
    let vm = VarMap::new();
    let sm = StructureModule::from_constructor_args(
        VarBuilder::from_varmap(&vm, DType::F64, &dev),
        value(&fx, &["structure_module"]),
    )
    .unwrap();
    load(&vm, &fx, "structure_module.");
    let (single, pair, msa) = (
        fx.get("output.single"),
        fx.get("output.pair"),
        fx.get("output.msa"),
    );
    let out = sm
        .forward(
            &single,
            &pair,
            &last(&fx, "aatype"),
            &last(&fx, "seq_mask"),
            None,
        )
        .unwrap();
    let tol = 1e-10;
    for (name, got) in [
        ("frames", &out.frames),
        ("sidechain_frames", &out.sidechain_frames),
        ("unnormalized_angles", &out.unnormalized_angles),
        ("angles", &out.angles),
        ("positions", &out.positions),
        ("states", &out.states),
        ("single", &out.single),
    ] {
        report.check(
            &format!("sm.{name}"),
            got,
            &fx.get(&format!("output.sm.{name}")),
            tol,
            0.0,
        );
    }
    let l = out.frames.dims()[0];
    report.check(
        "final_affine_tensor",
        &out.frames.i(l - 1).unwrap(),
        &fx.get("output.final_affine_tensor"),
        tol,
        0.0,
    );

    // Heads (pLDDT reads the SM single, experimentally-resolved the Evoformer single).
    let h = |k: &str, f: &str| value(&fx, &["heads", k, f]).as_u64().unwrap() as usize;
    let cfg = HeadsConfig {
        plddt_no_bins: h("lddt", "no_bins"),
        plddt_c_hidden: h("lddt", "c_hidden"),
        distogram_no_bins: h("distogram", "no_bins"),
        masked_msa_c_out: h("masked_msa", "c_out"),
        experimentally_resolved_c_out: h("experimentally_resolved", "c_out"),
        ..HeadsConfig::default()
    };
    let vm = VarMap::new();
    let heads = AuxiliaryHeads::new(
        VarBuilder::from_varmap(&vm, DType::F64, &dev),
        h("masked_msa", "c_m"),
        h("distogram", "c_z"),
        h("lddt", "c_in"),
        &cfg,
    )
    .unwrap();
    load(&vm, &fx, "aux_heads.");
    let ho = heads.forward(&out.single, &single, &msa, &pair).unwrap();
    for (name, got) in [
        ("lddt_logits", &ho.lddt_logits),
        ("distogram_logits", &ho.distogram_logits),
        ("masked_msa_logits", &ho.masked_msa_logits),
        (
            "experimentally_resolved_logits",
            &ho.experimentally_resolved_logits,
        ),
    ] {
        report.check(name, got, &fx.get(&format!("output.{name}")), tol, 0.0);
    }
    assert!(ho.tm_logits.is_none());
    report.assert_ok("model golden: SM + heads");
}
