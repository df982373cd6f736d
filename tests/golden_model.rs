//! The full AlphaFold2 model against OpenFold (`model/alphafold_model`: real 3u8v crop, 2 cycles):
//! every forward output incl. the recycled state, the loss and its breakdown, and d loss / d every
//! parameter, in f64 (rel ≤ 1e-10) and f32 (rel ≤ 1e-4), with remat `none` and `block`, the trunk
//! differentiated by the hand-written backward (`model.backward = "manual"`, the default) and by
//! candle's autograd.

mod common;
mod model_support;

use std::collections::BTreeSet;

use candle_core::{DType, Tensor};
use common::golden::{Fixture, Report};
use ferrofold::config::{Remat, TrunkBackward};
use ferrofold::train::optim::params_from_varmap;
use model_support::{batch, build_with, loss_batch, loss_fn, tables};

fn structurally_zero(fx: &Fixture) -> BTreeSet<String> {
    fx.meta["float32_vs_float64"]["summary"]["structurally_zero"]
        .as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

fn golden(dtype: DType, remat: Remat, backward: TrunkBackward, rel: f64, zero_abs: f64) {
    let fx = Fixture::named("model", "alphafold_model");
    let (vm, model) = build_with(&fx, dtype, remat, backward);
    let b = batch(&fx);
    let lb = loss_batch(&fx);
    let t = tables();
    let n_rec = b.cycles.len() - 1;
    let t0 = std::time::Instant::now();
    let res = model
        .loss_and_grads(
            &params_from_varmap(&vm).unwrap(),
            &b,
            n_rec,
            None,
            loss_fn(&lb, &t),
        )
        .unwrap();
    println!(
        "[{dtype:?} {remat:?}] forward+loss+backward: {:.3} s",
        t0.elapsed().as_secs_f64()
    );
    let tag = format!("[{dtype:?} remat={remat:?} backward={backward:?}]");
    let mut report = Report::default();
    let mut worst: Vec<(String, f64)> = Vec::new();
    let mut check = |report: &mut Report, name: &str, got: &Tensor, key: &str, abs: f64| {
        let want = fx.get(key);
        let (r, _) = common::golden::errors(got, &want);
        worst.push((name.to_string(), r));
        report.check(&format!("{tag} {name}"), got, &want, rel, abs);
    };
    let o = &res.output;
    assert_eq!(o.num_recycles, n_rec);
    for (name, got) in [
        ("msa", &o.msa),
        ("pair", &o.pair),
        ("single", &o.single),
        ("sm.frames", &o.sm.frames),
        ("sm.sidechain_frames", &o.sm.sidechain_frames),
        ("sm.unnormalized_angles", &o.sm.unnormalized_angles),
        ("sm.angles", &o.sm.angles),
        ("sm.positions", &o.sm.positions),
        ("sm.states", &o.sm.states),
        ("sm.single", &o.sm.single),
        ("final_atom_positions", &o.final_atom_positions),
        ("final_atom_mask", &o.final_atom_mask),
        ("final_affine_tensor", &o.final_affine_tensor),
        ("distogram_logits", &o.distogram_logits),
        ("masked_msa_logits", &o.masked_msa_logits),
        ("lddt_logits", &o.lddt_logits),
        ("plddt", &o.plddt),
        (
            "experimentally_resolved_logits",
            &o.experimentally_resolved_logits,
        ),
    ] {
        check(&mut report, name, got, &format!("output.{name}"), 0.0);
    }
    for (c, st) in o.recycled.iter().enumerate() {
        for (name, got) in [
            ("m_1_prev", &st.m_1_prev),
            ("z_prev", &st.z_prev),
            ("x_prev", &st.x_prev),
        ] {
            let key = format!("output.recycle.{c}.{name}");
            check(&mut report, &format!("recycle.{c}.{name}"), got, &key, 0.0);
        }
    }
    let scalar = |v: f64| Tensor::new(v, &candle_core::Device::Cpu).unwrap();
    check(&mut report, "loss", &scalar(res.loss), "output.loss", 0.0);
    for name in fx.names_with_prefix("output.loss_breakdown.") {
        match res.aux.get(&name) {
            Some(v) => check(
                &mut report,
                &format!("loss_breakdown.{name}"),
                &scalar(v),
                &format!("output.loss_breakdown.{name}"),
                1e-12,
            ),
            None => report.fail(format!("{tag}: breakdown has no `{name}`")),
        }
    }
    // Gradients: exactly the stored parameter set.
    let zero = structurally_zero(&fx);
    let stored: BTreeSet<String> = fx.names_with_prefix("grad.param.").into_iter().collect();
    let ours: BTreeSet<String> = res.grads.keys().cloned().collect();
    assert_eq!(stored, ours, "{tag}: gradient names differ");
    assert_eq!(ours.len(), 358);
    for (name, g) in &res.grads {
        let key = format!("grad.param.{name}");
        let abs = if zero.contains(&key) { zero_abs } else { 0.0 };
        check(&mut report, &format!("grad.{name}"), g, &key, abs);
    }
    worst.sort_by(|a, b| b.1.total_cmp(&a.1));
    let fwd = worst.iter().find(|(n, _)| !n.starts_with("grad."));
    let grad = worst.iter().find(|(n, _)| {
        n.starts_with("grad.") && !zero.contains(&format!("grad.param.{}", &n[5..]))
    });
    println!(
        "{tag} worst output: {fwd:?}; worst non-zero grad: {grad:?}; checked {}",
        report.checked
    );
    report.assert_ok(&tag);
}

#[test]
fn golden_model_f64_remat_none() {
    golden(DType::F64, Remat::None, TrunkBackward::Manual, 1e-10, 1e-12);
}

#[test]
fn golden_model_f64_remat_block() {
    golden(
        DType::F64,
        Remat::Block,
        TrunkBackward::Manual,
        1e-10,
        1e-12,
    );
}

#[test]
fn golden_model_f32_remat_block() {
    golden(DType::F32, Remat::Block, TrunkBackward::Manual, 1e-4, 1e-6);
}

#[test]
fn golden_model_f64_remat_none_autograd() {
    golden(
        DType::F64,
        Remat::None,
        TrunkBackward::Autograd,
        1e-10,
        1e-12,
    );
}

#[test]
fn golden_model_f64_remat_block_autograd() {
    golden(
        DType::F64,
        Remat::Block,
        TrunkBackward::Autograd,
        1e-10,
        1e-12,
    );
}
