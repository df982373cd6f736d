//! Golden parity (OpenFold) for IPA, the structure module and the heads: outputs, parameter
//! gradients and input gradients, in f64 (tight) and f32 (valid region where rows are fully masked).
//!
//! Each `golden_<fixture>` function takes the loaded fixture and a dtype and returns a `Report`;
//! the `#[test]`s call them. Run from a worktree with
//! `FERROFOLD_GOLDEN_DIR=/work/shared/golden/openfold cargo test --release --test sm_golden`.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use candle_core::{DType, Device, IndexOp, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use common::golden::{Fixture, Report};
use ferrofold::geometry::rigid::Rigid;
use ferrofold::model::heads::{
    DistogramHead, ExperimentallyResolvedHead, MaskedMsaHead, PerResidueLddtCaPredictor,
};
use ferrofold::model::ipa::{InvariantPointAttention, IpaConfig};
use ferrofold::model::structure_module::{AtomTables, StructureModule, StructureModuleOutput};

const F64_REL: f64 = 1e-10;
const F64_ABS_ZERO: f64 = 1e-12;

/// Tolerances for one precision.
#[derive(Clone, Copy)]
struct Tol {
    rel: f64,
    /// Absolute tolerance for structurally-zero gradients.
    abs_zero: f64,
}

fn tol(dtype: DType, rel32: f64) -> Tol {
    if dtype == DType::F64 {
        Tol {
            rel: F64_REL,
            abs_zero: F64_ABS_ZERO,
        }
    } else {
        Tol {
            rel: rel32,
            abs_zero: 1e-4,
        }
    }
}

/// `Report::check`, printing the measured error (visible with `--nocapture`).
fn chk(report: &mut Report, what: &str, got: &Tensor, want: &Tensor, rel: f64, abs: f64) {
    if got.dims() == want.dims() {
        let (r, a) = common::golden::errors(got, want);
        eprintln!("{what:60} rel {r:.2e} abs {a:.2e}");
    }
    report.check(what, got, want, rel, abs);
}

/// A VarMap filled with the fixture's parameters (names must match exactly, both ways).
fn load_params(vm: &VarMap, fx: &Fixture, dtype: DType, report: &mut Report) {
    let want = fx.params(dtype);
    let data = vm.data().lock().unwrap();
    let have: BTreeSet<String> = data.keys().cloned().collect();
    let want_names: BTreeSet<String> = want.keys().cloned().collect();
    if have != want_names {
        report.fail(format!(
            "parameter names differ: missing {:?}, extra {:?}",
            want_names.difference(&have).collect::<Vec<_>>(),
            have.difference(&want_names).collect::<Vec<_>>()
        ));
    }
    for (name, t) in &want {
        if let Some(v) = data.get(name) {
            v.set(t).unwrap_or_else(|e| panic!("set {name}: {e}"));
        }
    }
}

/// The fixture's float input as a differentiable `Var` in `dtype`.
fn input_var(fx: &Fixture, name: &str, dtype: DType) -> Var {
    Var::from_tensor(&fx.get_as(&format!("input.{name}"), dtype)).unwrap()
}

/// `Σ_k sum(out_k · cot_k)`.
fn vjp_loss(outs: &[(&str, Tensor)], cots: &BTreeMap<String, Tensor>) -> Tensor {
    let mut total: Option<Tensor> = None;
    for (name, o) in outs {
        if let Some(c) = cots.get(*name) {
            let term = (o * c.to_dtype(o.dtype()).unwrap())
                .unwrap()
                .sum_all()
                .unwrap();
            total = Some(match total {
                Some(t) => (t + term).unwrap(),
                None => term,
            });
        }
    }
    total.expect("no cotangent matched an output")
}

/// Compare every parameter gradient with `want(name)`.
fn check_param_grads(
    report: &mut Report,
    vm: &VarMap,
    grads: &candle_core::backprop::GradStore,
    want: impl Fn(&str) -> Tensor,
    zero: &BTreeSet<String>,
    t: Tol,
) {
    let data = vm.data().lock().unwrap();
    let mut names: Vec<&String> = data.keys().collect();
    names.sort();
    for name in names {
        let v = &data[name];
        let g = match grads.get(v.as_tensor()) {
            Some(g) => g.clone(),
            None => v.as_tensor().zeros_like().unwrap(),
        };
        let key = format!("grad.param.{name}");
        if zero.contains(&key) {
            chk(report, &key, &g, &want(name), 0.0, t.abs_zero);
        } else {
            chk(report, &key, &g, &want(name), t.rel, 0.0);
        }
    }
}

/// Rows of `x` along `dim` where `mask` `[N]` is 1.
fn valid_rows(x: &Tensor, dim: usize, mask: &Tensor) -> Tensor {
    let m: Vec<f64> = mask.to_dtype(DType::F64).unwrap().to_vec1().unwrap();
    let idx: Vec<u32> = m
        .iter()
        .enumerate()
        .filter(|(_, v)| **v > 0.5)
        .map(|(i, _)| i as u32)
        .collect();
    let idx = Tensor::new(idx.as_slice(), x.device()).unwrap();
    x.index_select(&idx, dim).unwrap()
}

/// Zero `x` along `dim` where `mask` `[N]` is 0.
fn zero_invalid(x: &Tensor, dim: usize, mask: &Tensor) -> Tensor {
    let mut shape = vec![1usize; x.rank()];
    shape[dim] = mask.dims()[0];
    let m = mask.to_dtype(x.dtype()).unwrap().reshape(shape).unwrap();
    x.broadcast_mul(&m).unwrap()
}

// ---------------------------------------------------------------------------------------------
// Simple modules (heads): one input, one output, no masking.
// ---------------------------------------------------------------------------------------------

fn golden_simple(
    fx: &Fixture,
    dtype: DType,
    rel32: f64,
    input: &str,
    output: &str,
    build: impl Fn(VarBuilder) -> Box<dyn Fn(&Tensor) -> Tensor>,
) -> Report {
    let t = tol(dtype, rel32);
    let mut report = Report::default();
    let vm = VarMap::new();
    let f = build(VarBuilder::from_varmap(&vm, dtype, &Device::Cpu));
    load_params(&vm, fx, dtype, &mut report);
    let x = input_var(fx, input, dtype);
    let y = f(x.as_tensor());
    chk(
        &mut report,
        &format!("output.{output}"),
        &y,
        &fx.get(&format!("output.{output}")),
        t.rel,
        0.0,
    );
    let mut cots = BTreeMap::new();
    cots.insert(
        output.to_string(),
        fx.get_as(&format!("cotangent.{output}"), dtype),
    );
    let grads = vjp_loss(&[(output, y)], &cots).backward().unwrap();
    check_param_grads(
        &mut report,
        &vm,
        &grads,
        |n| fx.get(&format!("grad.param.{n}")),
        &fx.structurally_zero(),
        t,
    );
    chk(
        &mut report,
        &format!("grad.input.{input}"),
        grads.get(x.as_tensor()).unwrap(),
        &fx.get(&format!("grad.input.{input}")),
        t.rel,
        0.0,
    );
    report
}

fn golden_distogram_head(fx: &Fixture, dtype: DType) -> Report {
    golden_simple(fx, dtype, 1e-5, "z", "logits", |vb| {
        let h = DistogramHead::from_constructor_args(vb, fx.args()).unwrap();
        Box::new(move |x| h.forward(x).unwrap())
    })
}

fn golden_masked_msa_head(fx: &Fixture, dtype: DType) -> Report {
    golden_simple(fx, dtype, 1e-5, "m", "logits", |vb| {
        let h = MaskedMsaHead::from_constructor_args(vb, fx.args()).unwrap();
        Box::new(move |x| h.forward(x).unwrap())
    })
}

fn golden_plddt_head(fx: &Fixture, dtype: DType) -> Report {
    golden_simple(fx, dtype, 1e-5, "s", "logits", |vb| {
        let h = PerResidueLddtCaPredictor::from_constructor_args(vb, fx.args()).unwrap();
        Box::new(move |x| h.forward(x).unwrap())
    })
}

fn golden_experimentally_resolved_head(fx: &Fixture, dtype: DType) -> Report {
    golden_simple(fx, dtype, 1e-5, "s", "logits", |vb| {
        let h = ExperimentallyResolvedHead::from_constructor_args(vb, fx.args()).unwrap();
        Box::new(move |x| h.forward(x).unwrap())
    })
}

// ---------------------------------------------------------------------------------------------
// IPA
// ---------------------------------------------------------------------------------------------

/// One IPA forward + VJP in `dtype` with the fixture's params/inputs and the given cotangent.
/// Returns (output, param grads by name, input grads by name).
#[allow(clippy::type_complexity)]
fn run_ipa(
    fx: &Fixture,
    dtype: DType,
    cot: &Tensor,
    report: &mut Report,
) -> (Tensor, BTreeMap<String, Tensor>, BTreeMap<String, Tensor>) {
    let vm = VarMap::new();
    let ipa = InvariantPointAttention::new(
        VarBuilder::from_varmap(&vm, dtype, &Device::Cpu),
        &IpaConfig::from_constructor_args(fx.args()).unwrap(),
    )
    .unwrap();
    load_params(&vm, fx, dtype, report);
    let inputs: BTreeMap<String, Var> = fx
        .grad_inputs()
        .iter()
        .map(|n| (n.clone(), input_var(fx, n, dtype)))
        .collect();
    let r = Rigid::new(
        inputs["rots"].as_tensor().clone(),
        inputs["trans"].as_tensor().clone(),
    )
    .unwrap();
    let mask = fx.get_as("input.mask", dtype);
    let out = ipa
        .forward(inputs["s"].as_tensor(), inputs["z"].as_tensor(), &r, &mask)
        .unwrap();
    let loss = (&out * cot.to_dtype(dtype).unwrap())
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let data = vm.data().lock().unwrap();
    let pg = data
        .iter()
        .map(|(n, v)| {
            let g = grads
                .get(v.as_tensor())
                .cloned()
                .unwrap_or_else(|| v.as_tensor().zeros_like().unwrap());
            (n.clone(), g)
        })
        .collect();
    let ig = inputs
        .iter()
        .map(|(n, v)| (n.clone(), grads.get(v.as_tensor()).unwrap().clone()))
        .collect();
    (out, pg, ig)
}

fn golden_invariant_point_attention(fx: &Fixture, dtype: DType) -> Report {
    let mut report = Report::default();
    let zero = fx.structurally_zero();
    let cot = fx.get("cotangent.s_update");
    if dtype == DType::F64 {
        let t = tol(dtype, 0.0);
        let (out, pg, ig) = run_ipa(fx, dtype, &cot, &mut report);
        chk(
            &mut report,
            "output.s_update",
            &out,
            &fx.get("output.s_update"),
            t.rel,
            0.0,
        );
        for (n, g) in &pg {
            let key = format!("grad.param.{n}");
            let (r, a) = if zero.contains(&key) {
                (0.0, t.abs_zero)
            } else {
                (t.rel, 0.0)
            };
            chk(&mut report, &key, g, &fx.get(&key), r, a);
        }
        for (n, g) in &ig {
            chk(
                &mut report,
                &format!("grad.input.{n}"),
                g,
                &fx.get(&format!("grad.input.{n}")),
                t.rel,
                0.0,
            );
        }
    } else {
        // Valid region: outputs where mask = 1; gradients with the cotangent zeroed on masked rows,
        // against our f64 run with the same cotangent (the f64 run is checked against the goldens).
        let t = tol(dtype, 1e-5);
        let mask = fx.get("input.mask");
        let cot_v = zero_invalid(&cot, 0, &mask);
        let (out, pg, ig) = run_ipa(fx, dtype, &cot_v, &mut report);
        let (_, pg64, ig64) = run_ipa(fx, DType::F64, &cot_v, &mut report);
        chk(
            &mut report,
            "output.s_update (valid)",
            &valid_rows(&out, 0, &mask),
            &valid_rows(&fx.get("output.s_update"), 0, &mask),
            t.rel,
            0.0,
        );
        for (n, g) in &pg {
            let key = format!("grad.param.{n}");
            let (r, a) = if zero.contains(&key) {
                (0.0, t.abs_zero)
            } else {
                (t.rel, 0.0)
            };
            chk(&mut report, &format!("{key} (valid)"), g, &pg64[n], r, a);
        }
        for (n, g) in &ig {
            chk(
                &mut report,
                &format!("grad.input.{n} (valid)"),
                g,
                &ig64[n],
                t.rel,
                0.0,
            );
        }
    }
    report
}

// ---------------------------------------------------------------------------------------------
// Structure module
// ---------------------------------------------------------------------------------------------

/// The library's residue-constant tables must equal OpenFold's (golden `data/residue_constants`); the structure-module parity test then uses the library's tables.
#[test]
fn sm_atom_tables_match_golden_residue_constants() {
    let rc = Fixture::named("data", "residue_constants");
    let t = AtomTables::new(&Device::Cpu).unwrap();
    let mut report = Report::default();
    let pairs = [
        ("restype_rigid_group_default_frame", &t.default_frames),
        ("restype_atom14_to_rigid_group", &t.group_idx),
        ("restype_atom14_mask", &t.atom_mask),
        ("restype_atom14_rigid_group_positions", &t.lit_positions),
    ];
    for (name, got) in pairs {
        // The default frames are derived (Gram–Schmidt in f64, then rounded to f32); entries that
        // are zero in exact arithmetic may differ by ~1e-16. Everything else is bitwise.
        let abs = if name.contains("default_frame") {
            1e-12
        } else {
            0.0
        };
        chk(&mut report, name, got, &rc.get(name), 0.0, abs);
    }
    report.assert_ok("AtomTables vs residue_constants");
}

/// Named SM outputs (fixture names) from one forward.
fn sm_outputs(o: &StructureModuleOutput) -> Vec<(&'static str, Tensor)> {
    let last = |t: &Tensor| t.i(t.dims()[0] - 1).unwrap();
    vec![
        ("frames", o.frames.clone()),
        ("sidechain_frames", o.sidechain_frames.clone()),
        ("unnormalized_angles", o.unnormalized_angles.clone()),
        ("angles", o.angles.clone()),
        ("positions", o.positions.clone()),
        ("states", o.states.clone()),
        ("single", o.single.clone()),
        ("final_atom14_positions", last(&o.positions)),
        ("final_frames", last(&o.frames)),
        ("final_angles", last(&o.angles)),
    ]
}

/// Residue dim of each SM output.
fn sm_res_dim(name: &str) -> usize {
    if name == "single" || name.starts_with("final_") {
        0
    } else {
        1
    }
}

/// One SM forward + VJP with the given cotangents. Returns (outputs, param grads, input grads).
#[allow(clippy::type_complexity)]
fn run_sm(
    fx: &Fixture,
    dtype: DType,
    cots: &BTreeMap<String, Tensor>,
    report: &mut Report,
) -> (
    Vec<(&'static str, Tensor)>,
    BTreeMap<String, Tensor>,
    BTreeMap<String, Tensor>,
) {
    let vm = VarMap::new();
    let vb = VarBuilder::from_varmap(&vm, dtype, &Device::Cpu);
    let sm = StructureModule::from_constructor_args(vb, fx.args()).unwrap();
    load_params(&vm, fx, dtype, report);
    let inputs: BTreeMap<String, Var> = fx
        .grad_inputs()
        .iter()
        .map(|n| (n.clone(), input_var(fx, n, dtype)))
        .collect();
    let mask = fx.get_as("input.mask", dtype);
    let aatype = fx.get("input.aatype");
    let out = sm
        .forward(
            inputs["s"].as_tensor(),
            inputs["z"].as_tensor(),
            &aatype,
            &mask,
            None,
        )
        .unwrap();
    let outs = sm_outputs(&out);
    let grads = vjp_loss(
        &outs
            .iter()
            .map(|(n, t)| (*n, t.clone()))
            .collect::<Vec<_>>(),
        cots,
    )
    .backward()
    .unwrap();
    let data = vm.data().lock().unwrap();
    let pg = data
        .iter()
        .map(|(n, v)| {
            let g = grads
                .get(v.as_tensor())
                .cloned()
                .unwrap_or_else(|| v.as_tensor().zeros_like().unwrap());
            (n.clone(), g)
        })
        .collect();
    let ig = inputs
        .iter()
        .map(|(n, v)| (n.clone(), grads.get(v.as_tensor()).unwrap().clone()))
        .collect();
    (outs, pg, ig)
}

fn golden_structure_module(fx: &Fixture, dtype: DType) -> Report {
    let mut report = Report::default();
    let zero = fx.structurally_zero();
    let cot_names = fx.cotangent_outputs();
    let mut cots: BTreeMap<String, Tensor> = cot_names
        .iter()
        .map(|n| (n.clone(), fx.get(&format!("cotangent.{n}"))))
        .collect();
    if dtype == DType::F64 {
        let t = tol(dtype, 0.0);
        let (outs, pg, ig) = run_sm(fx, dtype, &cots, &mut report);
        for (n, o) in &outs {
            chk(
                &mut report,
                &format!("output.{n}"),
                o,
                &fx.get(&format!("output.{n}")),
                t.rel,
                0.0,
            );
        }
        for (n, g) in &pg {
            let key = format!("grad.param.{n}");
            let (r, a) = if zero.contains(&key) {
                (0.0, t.abs_zero)
            } else {
                (t.rel, 0.0)
            };
            chk(&mut report, &key, g, &fx.get(&key), r, a);
        }
        for (n, g) in &ig {
            chk(
                &mut report,
                &format!("grad.input.{n}"),
                g,
                &fx.get(&format!("grad.input.{n}")),
                t.rel,
                0.0,
            );
        }
    } else {
        let t = tol(dtype, 5e-5);
        let mask = fx.get("input.mask");
        for (n, c) in cots.iter_mut() {
            *c = zero_invalid(c, sm_res_dim(n), &mask);
        }
        let (outs, pg, ig) = run_sm(fx, dtype, &cots, &mut report);
        let (_, pg64, ig64) = run_sm(fx, DType::F64, &cots, &mut report);
        for (n, o) in &outs {
            let d = sm_res_dim(n);
            let want = valid_rows(&fx.get(&format!("output.{n}")), d, &mask);
            chk(
                &mut report,
                &format!("output.{n} (valid)"),
                &valid_rows(o, d, &mask),
                &want,
                t.rel,
                0.0,
            );
        }
        for (n, g) in &pg {
            let key = format!("grad.param.{n}");
            let (r, a) = if zero.contains(&key) {
                (0.0, t.abs_zero)
            } else {
                (t.rel, 0.0)
            };
            chk(&mut report, &format!("{key} (valid)"), g, &pg64[n], r, a);
        }
        for (n, g) in &ig {
            chk(
                &mut report,
                &format!("grad.input.{n} (valid)"),
                g,
                &ig64[n],
                t.rel,
                0.0,
            );
        }
    }
    report
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

fn run(name: &str, f: fn(&Fixture, DType) -> Report) {
    let fx = Fixture::named("modules", name);
    for dtype in [DType::F64, DType::F32] {
        f(&fx, dtype).assert_ok(&format!("{name} {dtype:?}"));
    }
}

#[test]
fn sm_golden_distogram_head() {
    run("distogram_head", golden_distogram_head);
}

#[test]
fn sm_golden_masked_msa_head() {
    run("masked_msa_head", golden_masked_msa_head);
}

#[test]
fn sm_golden_plddt_head() {
    run("plddt_head", golden_plddt_head);
}

#[test]
fn sm_golden_experimentally_resolved_head() {
    run(
        "experimentally_resolved_head",
        golden_experimentally_resolved_head,
    );
}

#[test]
fn sm_golden_invariant_point_attention() {
    run(
        "invariant_point_attention",
        golden_invariant_point_attention,
    );
}

#[test]
fn sm_golden_structure_module() {
    run("structure_module", golden_structure_module);
}
