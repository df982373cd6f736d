//! Golden parity of every loss/metric fixture in `$FERROFOLD_GOLDEN_DIR/losses/` (OpenFold float64
//! reference): outputs and input gradients (L = Σ sum(output·cotangent)), in f64 and f32.

mod common;

use std::collections::BTreeMap;

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor, Var};
use common::golden::{errors, fixtures_in, golden_dir, Fixture, Report};
use ferrofold::config::{LossConfig, ViolationConfig};
use ferrofold::geometry::superimpose::superimpose;
use ferrofold::loss::{self, metrics, LossBatch, LossOutputs, LossTables, ViolationTables};

/// Inputs of one fixture in the test dtype; float inputs listed in `grad_inputs` are `Var`s.
struct Inputs {
    t: BTreeMap<String, Tensor>,
    vars: BTreeMap<String, Var>,
}

impl Inputs {
    fn new(fx: &Fixture, dtype: DType) -> Inputs {
        let grad: Vec<String> = fx.grad_inputs();
        let mut t = BTreeMap::new();
        let mut vars = BTreeMap::new();
        for name in fx.names_with_prefix("input.") {
            let raw = fx.get(&format!("input.{name}"));
            let x = if raw.dtype().is_float() {
                raw.to_dtype(dtype).unwrap()
            } else {
                raw
            };
            if grad.contains(&name) {
                let v = Var::from_tensor(&x).unwrap();
                t.insert(name.clone(), v.as_tensor().clone());
                vars.insert(name, v);
            } else {
                t.insert(name, x);
            }
        }
        Inputs { t, vars }
    }
    fn g(&self, name: &str) -> &Tensor {
        self.t
            .get(name)
            .unwrap_or_else(|| panic!("no input `{name}`"))
    }
}

fn opt_f64(fx: &Fixture, key: &str) -> Option<f64> {
    fx.args()[key].as_f64()
}

/// `stereo_chemical_props.txt`: `$FERROFOLD_STEREO_PROPS`, else `<golden>/../../data/`, else
/// `../shared/data/` from the crate.
fn stereo_props_path() -> PathBuf {
    if let Some(p) = std::env::var_os("FERROFOLD_STEREO_PROPS") {
        return PathBuf::from(p);
    }
    let beside = golden_dir().join("../../data/stereo_chemical_props.txt");
    if beside.exists() {
        return beside;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/stereo_chemical_props.txt")
}

/// Loss tables built from our residue constants (NOT the golden tables), with the stock
/// tolerances (overlap 1.5, factor 12) that every violation fixture uses.
fn tables() -> LossTables {
    LossTables::load(
        &stereo_props_path(),
        &ViolationConfig::default(),
        &Device::Cpu,
    )
    .unwrap()
}

fn violation_tables() -> ViolationTables {
    tables().violation
}

fn chi_pi_periodic() -> Tensor {
    tables().chi_pi_periodic
}

/// Runs the fixture's function. Returns output name → tensor, or Err(unknown function).
fn run(fx: &Fixture, x: &Inputs) -> Result<BTreeMap<String, Tensor>, String> {
    let func = fx.meta["openfold_function"]
        .as_str()
        .unwrap_or("")
        .to_string();
    let short = func.rsplit('.').next().unwrap_or("").to_string();
    let mut out = BTreeMap::new();
    let mut put = |k: &str, v: Tensor| {
        out.insert(k.to_string(), v);
    };
    let a = |k: &str| fx.arg_f64(k);
    if func.contains("find_structural_violations") {
        let avg = fx.meta["average_clashes"].as_bool().unwrap_or_else(|| {
            fx.meta["call"]
                .as_str()
                .unwrap_or("")
                .contains("average_clashes=True")
        });
        let v = loss::find_structural_violations(
            x.g("atom14_pred_positions"),
            x.g("atom14_atom_exists"),
            x.g("residue_index"),
            x.g("aatype"),
            x.g("residx_atom14_to_atom37"),
            &violation_tables(),
            a("violation_tolerance_factor"),
            a("clash_overlap_tolerance"),
        )
        .unwrap();
        let l = loss::violation_loss(&v, x.g("atom14_atom_exists"), avg, a("eps")).unwrap();
        let m = loss::compute_violation_metrics(
            x.g("atom14_pred_positions"),
            x.g("atom14_atom_exists"),
            x.g("residue_index"),
            x.g("seq_mask"),
            &v,
        )
        .unwrap();
        for (k, t) in v.named() {
            put(k, t.clone());
        }
        for (k, t) in m.named() {
            put(&format!("metrics.{k}"), t.clone());
        }
        put("violation_loss", l);
        return Ok(out);
    }
    match short.as_str() {
        "compute_fape" => {
            let pair = if fx.args()["pair_mask"].as_bool().unwrap_or(false) {
                Some(x.g("pair_mask"))
            } else {
                None
            };
            let l = loss::compute_fape(
                x.g("pred_rots"),
                x.g("pred_trans"),
                x.g("target_rots"),
                x.g("target_trans"),
                x.g("frames_mask"),
                x.g("pred_positions"),
                x.g("target_positions"),
                x.g("positions_mask"),
                a("length_scale"),
                opt_f64(fx, "l1_clamp_distance"),
                pair,
                a("eps"),
            )
            .unwrap();
            put("loss", l);
        }
        "backbone_loss" => {
            let traj = x.g("traj");
            let u = opt_f64(fx, "use_clamped_fape").map(|u| {
                Tensor::new(u, traj.device())
                    .unwrap()
                    .to_dtype(traj.dtype())
                    .unwrap()
            });
            let l = loss::backbone_loss(
                x.g("backbone_rigid_tensor"),
                x.g("backbone_rigid_mask"),
                traj,
                u.as_ref(),
                a("clamp_distance"),
                a("loss_unit_distance"),
                a("eps"),
                None,
            )
            .unwrap();
            put("loss", l);
        }
        "sidechain_loss" => {
            let l = loss::sidechain_loss(
                x.g("sidechain_frames"),
                x.g("sidechain_atom_pos"),
                x.g("rigidgroups_gt_frames"),
                x.g("rigidgroups_alt_gt_frames"),
                x.g("rigidgroups_gt_exists"),
                x.g("renamed_atom14_gt_positions"),
                x.g("renamed_atom14_gt_exists"),
                x.g("alt_naming_is_better"),
                a("clamp_distance"),
                a("length_scale"),
                a("eps"),
            )
            .unwrap();
            put("loss", l);
        }
        "distogram_loss" => {
            let l = loss::distogram_loss(
                x.g("logits"),
                x.g("pseudo_beta"),
                x.g("pseudo_beta_mask"),
                a("min_bin"),
                a("max_bin"),
                fx.arg_usize("no_bins"),
                a("eps"),
            )
            .unwrap();
            put("loss", l);
        }
        "masked_msa_loss" => {
            let l = loss::masked_msa_loss(
                x.g("logits"),
                x.g("true_msa"),
                x.g("bert_mask"),
                fx.arg_usize("num_classes"),
                a("eps"),
            )
            .unwrap();
            put("loss", l);
        }
        "lddt_ca" => {
            let l = loss::lddt_ca(
                x.g("all_atom_pred_pos"),
                x.g("all_atom_positions"),
                x.g("all_atom_mask"),
                a("cutoff"),
                a("eps"),
                fx.args()["per_residue"].as_bool().expect("per_residue"),
            )
            .unwrap();
            put("lddt", l);
        }
        "lddt_loss" => {
            let l = loss::lddt_loss(
                x.g("logits"),
                x.g("all_atom_pred_pos"),
                x.g("all_atom_positions"),
                x.g("all_atom_mask"),
                x.g("resolution"),
                a("cutoff"),
                fx.arg_usize("no_bins"),
                a("min_resolution"),
                a("max_resolution"),
                a("eps"),
            )
            .unwrap();
            put("loss", l);
        }
        "supervised_chi_loss" => {
            let l = loss::supervised_chi_loss(
                x.g("angles_sin_cos"),
                x.g("unnormalized_angles_sin_cos"),
                x.g("aatype"),
                x.g("seq_mask"),
                x.g("chi_mask"),
                x.g("chi_angles_sin_cos"),
                &chi_pi_periodic(),
                a("chi_weight"),
                a("angle_norm_weight"),
                a("eps"),
            )
            .unwrap();
            put("loss", l);
        }
        "torsion_angle_loss" => {
            let l = loss::torsion_angle_loss(x.g("a"), x.g("a_gt"), x.g("a_alt_gt")).unwrap();
            put("loss", l);
        }
        "experimentally_resolved_loss" => {
            let l = loss::experimentally_resolved_loss(
                x.g("logits"),
                x.g("atom37_atom_exists"),
                x.g("all_atom_mask"),
                x.g("resolution"),
                a("min_resolution"),
                a("max_resolution"),
                a("eps"),
            )
            .unwrap();
            put("loss", l);
        }
        "compute_plddt" => put("plddt", loss::compute_plddt(x.g("logits")).unwrap()),
        "drmsd" => put(
            "drmsd",
            metrics::drmsd(x.g("structure_1"), x.g("structure_2"), Some(x.g("mask"))).unwrap(),
        ),
        "gdt_ts" => put(
            "gdt",
            metrics::gdt_ts(x.g("p1"), x.g("p2"), x.g("mask")).unwrap(),
        ),
        "gdt_ha" => put(
            "gdt",
            metrics::gdt_ha(x.g("p1"), x.g("p2"), x.g("mask")).unwrap(),
        ),
        "superimpose" => {
            let (s, r) = superimpose(x.g("reference"), x.g("coords"), x.g("mask")).unwrap();
            put("superimposed", s);
            put("rmsd", r);
        }
        "compute_renamed_ground_truth" => {
            let r = loss::compute_renamed_ground_truth(
                x.g("atom14_gt_positions"),
                x.g("atom14_alt_gt_positions"),
                x.g("atom14_atom_is_ambiguous"),
                x.g("atom14_gt_exists"),
                x.g("atom14_alt_gt_exists"),
                x.g("atom14_pred_positions"),
                a("eps"),
            )
            .unwrap();
            put("alt_naming_is_better", r.alt_naming_is_better);
            put("renamed_atom14_gt_positions", r.renamed_atom14_gt_positions);
            put("renamed_atom14_gt_exists", r.renamed_atom14_gt_exists);
        }
        _ => return Err(format!("{}: unknown openfold_function `{func}`", fx.name)),
    }
    Ok(out)
}

fn check_fixture(fx: &Fixture, dtype: DType, report: &mut Report) {
    let x = Inputs::new(fx, dtype);
    let out = match run(fx, &x) {
        Ok(o) => o,
        Err(e) => {
            report.fail(e);
            return;
        }
    };
    let f64_run = dtype == DType::F64;
    let short = fx.target();
    // Bio.SVDSuperimposer ran in float32: ~1e-5 agreement only.
    let (rel, abs) = if short == "superimpose" {
        (1e-5, 1e-5)
    } else if f64_run {
        (1e-10, 1e-12)
    } else {
        (1e-5, 1e-7)
    };
    let tag = format!("{} [{dtype:?}]", fx.name);
    for name in fx.names_with_prefix("output.") {
        match out.get(&name) {
            Some(t) => {
                let want = fx.get(&format!("output.{name}"));
                if t.dims() == want.dims() {
                    let (r, a) = errors(t, &want);
                    eprintln!("{tag} output.{name}: rel {r:.2e} abs {a:.2e}");
                }
                report.check(&format!("{tag} output.{name}"), t, &want, rel, abs)
            }
            None => report.fail(format!("{tag}: output.{name} not produced")),
        }
    }
    let cots = fx.cotangent_outputs();
    if cots.is_empty() {
        return;
    }
    let mut total: Option<Tensor> = None;
    for c in &cots {
        let o = out.get(c).unwrap_or_else(|| panic!("{tag}: no output {c}"));
        let cot = fx.get_as(&format!("cotangent.{c}"), dtype);
        let term = (o * cot).unwrap().sum_all().unwrap();
        total = Some(match total {
            Some(t) => (t + term).unwrap(),
            None => term,
        });
    }
    let grads = total.expect("cotangent").backward().unwrap();
    let sz = fx.structurally_zero();
    for name in fx.grad_inputs() {
        let want = fx.get(&format!("grad.input.{name}"));
        let var = x
            .vars
            .get(&name)
            .unwrap_or_else(|| panic!("{tag}: grad input {name} not a var"));
        let got = match grads.get(var.as_tensor()) {
            Some(g) => g.clone(),
            None => var.as_tensor().zeros_like().unwrap(),
        };
        let abs_tol = if sz.contains(&format!("grad.input.{name}")) {
            1e-7
        } else {
            abs
        };
        let (r, a) = errors(&got, &want);
        eprintln!("{tag} grad.input.{name}: rel {r:.2e} abs {a:.2e}");
        report.check(
            &format!("{tag} grad.input.{name}"),
            &got,
            &want,
            rel,
            abs_tol,
        );
    }
}

fn run_all(dtype: DType) {
    let mut report = Report::default();
    let fixtures = fixtures_in("losses");
    assert!(!fixtures.is_empty(), "no loss fixtures found");
    for p in fixtures {
        let fx = Fixture::load(&p);
        let before = report.checked;
        check_fixture(&fx, dtype, &mut report);
        if report.checked == before && report.failures.is_empty() {
            report.fail(format!("{}: nothing compared", fx.name));
        }
    }
    report.assert_ok(&format!("loss goldens {dtype:?}"));
}

#[test]
fn golden_losses_f64() {
    run_all(DType::F64);
}

#[test]
fn golden_losses_f32() {
    run_all(DType::F32);
}

/// Our residue-constant tables equal OpenFold's (golden `data/violation_bounds`, `chi_pi_periodic`)
/// bitwise, so the violation goldens above really test our constants.
#[test]
fn golden_loss_tables_match_openfold() {
    let t = tables();
    let vb = Fixture::named("data", "violation_bounds");
    let rcf = Fixture::named("data", "residue_constants");
    let mut report = Report::default();
    report.check(
        "lower_bound",
        &t.violation.lower_bound,
        &vb.get("atom14_dists_lower_bound"),
        0.0,
        0.0,
    );
    report.check(
        "upper_bound",
        &t.violation.upper_bound,
        &vb.get("atom14_dists_upper_bound"),
        0.0,
        0.0,
    );
    report.check(
        "atomtype_radius",
        &t.violation.atomtype_radius,
        &vb.get("atomtype_radius"),
        0.0,
        0.0,
    );
    report.check(
        "chi_pi_periodic",
        &t.chi_pi_periodic,
        &rcf.get("chi_pi_periodic"),
        0.0,
        0.0,
    );
    report.assert_ok("loss tables");
}

/// The full `AlphaFoldLoss` of the model fixture, fed with the model's stored outputs and the last
/// recycling iteration of the batch: total, breakdown, FAPE parts, violations and renaming.
/// Model outputs in `dtype`; batch floats always f64 (the loss converts them to the outputs' dtype).
fn model_fixture_inputs(fx: &Fixture, dtype: DType) -> (LossOutputs, LossBatch) {
    let o = |k: &str| fx.get_as(&format!("output.{k}"), dtype);
    let b = |k: &str| {
        let t = fx.get(&format!("input.{k}"));
        let last = t.rank() - 1;
        t.narrow(last, t.dim(last).unwrap() - 1, 1)
            .unwrap()
            .squeeze(last)
            .unwrap()
    };
    let out = LossOutputs {
        sm_frames: o("sm.frames"),
        sm_sidechain_frames: o("sm.sidechain_frames"),
        sm_positions: o("sm.positions"),
        sm_angles: o("sm.angles"),
        sm_unnormalized_angles: o("sm.unnormalized_angles"),
        final_atom_positions: o("final_atom_positions"),
        distogram_logits: o("distogram_logits"),
        masked_msa_logits: o("masked_msa_logits"),
        lddt_logits: o("lddt_logits"),
        experimentally_resolved_logits: o("experimentally_resolved_logits"),
    };
    let batch = LossBatch {
        aatype: b("aatype"),
        residue_index: b("residue_index"),
        seq_mask: b("seq_mask"),
        seq_length: b("seq_length"),
        pseudo_beta: b("pseudo_beta"),
        pseudo_beta_mask: b("pseudo_beta_mask"),
        true_msa: b("true_msa"),
        bert_mask: b("bert_mask"),
        backbone_rigid_tensor: b("backbone_rigid_tensor"),
        backbone_rigid_mask: b("backbone_rigid_mask"),
        use_clamped_fape: Some(b("use_clamped_fape")),
        rigidgroups_gt_frames: b("rigidgroups_gt_frames"),
        rigidgroups_alt_gt_frames: b("rigidgroups_alt_gt_frames"),
        rigidgroups_gt_exists: b("rigidgroups_gt_exists"),
        atom14_gt_positions: b("atom14_gt_positions"),
        atom14_alt_gt_positions: b("atom14_alt_gt_positions"),
        atom14_gt_exists: b("atom14_gt_exists"),
        atom14_alt_gt_exists: b("atom14_alt_gt_exists"),
        atom14_atom_is_ambiguous: b("atom14_atom_is_ambiguous"),
        atom14_atom_exists: b("atom14_atom_exists"),
        residx_atom14_to_atom37: b("residx_atom14_to_atom37"),
        all_atom_positions: b("all_atom_positions"),
        all_atom_mask: b("all_atom_mask"),
        atom37_atom_exists: b("atom37_atom_exists"),
        resolution: b("resolution"),
        chi_mask: b("chi_mask"),
        chi_angles_sin_cos: b("chi_angles_sin_cos"),
    };
    (out, batch)
}

fn model_fixture_loss(dtype: DType, rel: f64) {
    let fx = Fixture::named("model", "alphafold_model");
    let (out, batch) = model_fixture_inputs(&fx, dtype);
    // the fixture's config is `initial_training` = our LossConfig defaults
    let cfg = LossConfig::default();
    let res = loss::alphafold_loss(&out, &batch, &tables(), &cfg).unwrap();
    let mut report = Report::default();
    let tag = format!("model loss [{dtype:?}]");
    let scalar = |v: f64| Tensor::new(v, &Device::Cpu).unwrap();
    report.check(
        &format!("{tag} loss"),
        &res.loss.to_dtype(DType::F64).unwrap(),
        &fx.get("output.loss"),
        rel,
        0.0,
    );
    for name in fx.names_with_prefix("output.loss_breakdown.") {
        match res.breakdown.get(&name) {
            Some(v) => report.check(
                &format!("{tag} breakdown.{name}"),
                &scalar(v),
                &fx.get(&format!("output.loss_breakdown.{name}")),
                rel,
                1e-12,
            ),
            None => report.fail(format!("{tag}: breakdown has no `{name}`")),
        }
    }
    for name in fx.names_with_prefix("output.loss_extra.") {
        match res.breakdown.get(&name) {
            Some(v) => report.check(
                &format!("{tag} extra.{name}"),
                &scalar(v),
                &fx.get(&format!("output.loss_extra.{name}")),
                rel,
                0.0,
            ),
            None => report.fail(format!("{tag}: breakdown has no `{name}`")),
        }
    }
    for (name, t) in res.violations.named() {
        report.check(
            &format!("{tag} violation.{name}"),
            t,
            &fx.get(&format!("output.violation.{name}")),
            rel,
            1e-12,
        );
    }
    let r = &res.renamed;
    for (name, t) in [
        ("alt_naming_is_better", &r.alt_naming_is_better),
        (
            "renamed_atom14_gt_positions",
            &r.renamed_atom14_gt_positions,
        ),
        ("renamed_atom14_gt_exists", &r.renamed_atom14_gt_exists),
    ] {
        report.check(
            &format!("{tag} renamed.{name}"),
            t,
            &fx.get(&format!("output.renamed.{name}")),
            rel,
            1e-12,
        );
    }
    assert!(!res.breakdown.had_non_finite());
    report.assert_ok(&tag);
}

#[test]
fn golden_alphafold_loss_model_fixture_f64() {
    model_fixture_loss(DType::F64, 1e-10);
}

#[test]
fn golden_alphafold_loss_model_fixture_f32() {
    model_fixture_loss(DType::F32, 1e-5);
}

/// A NaN term is reported by name and zeroed; the total stays finite and differentiable, and the
/// other terms keep their golden values.
#[test]
fn alphafold_loss_zeroes_and_reports_non_finite_terms() {
    let fx = Fixture::named("model", "alphafold_model");
    let (mut out, batch) = model_fixture_inputs(&fx, DType::F64);
    let logits = out.masked_msa_logits.clone();
    let nan = logits.ones_like().unwrap().affine(f64::NAN, 0.0).unwrap();
    out.masked_msa_logits = nan.narrow(0, 0, 1).unwrap().contiguous().unwrap();
    out.masked_msa_logits = Tensor::cat(
        &[
            &out.masked_msa_logits,
            &logits.narrow(0, 1, logits.dim(0).unwrap() - 1).unwrap(),
        ],
        0,
    )
    .unwrap();
    let positions = Var::from_tensor(&out.sm_positions).unwrap();
    out.sm_positions = positions.as_tensor().clone();
    let cfg = LossConfig {
        violation_weight: 1.0,
        ..Default::default()
    };
    let res = loss::alphafold_loss(&out, &batch, &tables(), &cfg).unwrap();
    assert_eq!(res.breakdown.non_finite, vec!["masked_msa".to_string()]);
    assert_eq!(res.breakdown.get("masked_msa"), Some(0.0));
    let total = res.loss.to_scalar::<f64>().unwrap();
    assert!(total.is_finite());
    let want = fx
        .get("output.loss_breakdown.fape")
        .to_scalar::<f64>()
        .unwrap();
    assert!((res.breakdown.get("fape").unwrap() - want).abs() <= 1e-12 * want.abs());
    // unscaled = Σ w·term without the masked-MSA term
    let w = [
        ("distogram", cfg.distogram_weight),
        (
            "experimentally_resolved",
            cfg.experimentally_resolved_weight,
        ),
        ("fape", cfg.fape_weight),
        ("plddt_loss", cfg.plddt_weight),
        ("supervised_chi", cfg.supervised_chi_weight),
        ("violation", cfg.violation_weight),
    ];
    let sum: f64 = w
        .iter()
        .map(|(k, wk)| wk * res.breakdown.get(k).unwrap())
        .sum();
    let unscaled = res.breakdown.get("unscaled_loss").unwrap();
    assert!(
        (sum - unscaled).abs() <= 1e-12 * unscaled.abs(),
        "{sum} vs {unscaled}"
    );
    // gradients reach the SM positions (side-chain FAPE + violation), finite
    let grads = res.loss.backward().unwrap();
    let g = grads
        .get(positions.as_tensor())
        .expect("grad to sm positions");
    let gv: Vec<f64> = g.flatten_all().unwrap().to_vec1().unwrap();
    assert!(gv.iter().all(|v| v.is_finite()) && gv.iter().any(|v| *v != 0.0));
    // JSONL-ready
    let json = serde_json::to_string(&res.breakdown).unwrap();
    assert!(json.contains("\"non_finite\":[\"masked_msa\"]"), "{json}");
}

/// A fixture whose `openfold_function` we do not implement is a failure, reported by name.
#[test]
fn golden_dispatch_rejects_unknown_function() {
    let mut fx = Fixture::named("losses", "torsion_angle_loss");
    fx.meta["openfold_function"] = serde_json::json!("openfold.utils.loss.tm_loss");
    fx.name = "tm_loss_fake".into();
    let mut report = Report::default();
    check_fixture(&fx, DType::F64, &mut report);
    assert_eq!(report.failures.len(), 1, "{:?}", report.failures);
    assert!(
        report.failures[0].contains("openfold.utils.loss.tm_loss"),
        "{:?}",
        report.failures
    );
}

/// The unbatched renaming (ambiguous rows only) and the batched dense evaluation agree with the
/// fixture; the fixture has both namings chosen.
#[test]
fn golden_renaming_batched_matches_unbatched() {
    let fx = Fixture::named("losses", "compute_renamed_ground_truth");
    let g = |k: &str| fx.get(&format!("input.{k}")).unsqueeze(0).unwrap();
    let r = loss::compute_renamed_ground_truth(
        &g("atom14_gt_positions"),
        &g("atom14_alt_gt_positions"),
        &g("atom14_atom_is_ambiguous"),
        &g("atom14_gt_exists"),
        &g("atom14_alt_gt_exists"),
        &g("atom14_pred_positions"),
        1e-10,
    )
    .unwrap();
    let want = fx.get("output.alt_naming_is_better");
    let got = r.alt_naming_is_better.squeeze(0).unwrap();
    let mut report = Report::default();
    report.check("batched alt_naming_is_better", &got, &want, 0.0, 0.0);
    report.assert_ok("renaming batched");
    let flags: Vec<f64> = want.to_vec1().unwrap();
    assert!(flags.contains(&0.0) && flags.contains(&1.0));
}
