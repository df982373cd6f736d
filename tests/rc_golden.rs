//! Golden parity of `model::residue_constants` against OpenFold's tables
//! (`data/residue_constants` and `data/violation_bounds` fixtures), and of the tensor tables the
//! structure module uses (`AtomTables`). Module fixtures are checked by `golden_modules.rs`.

mod common;

use std::path::PathBuf;

use candle_core::{DType, Device};
use common::golden::{golden_dir, Fixture, Report};
use ferrofold::model::residue_constants as rc;
use ferrofold::model::structure_module::AtomTables;

/// A golden tensor as (dims, values in f64).
fn flat(fx: &Fixture, name: &str) -> (Vec<usize>, Vec<f64>) {
    let t = fx.get(name);
    let dims = t.dims().to_vec();
    let v = t
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    (dims, v)
}

/// Compare `got` (flattened, with `dims`) to golden `name`; returns the max abs difference.
fn compare(fx: &Fixture, name: &str, dims: &[usize], got: &[f64], tol: f64) -> f64 {
    let (wd, want) = flat(fx, name);
    assert_eq!(wd, dims, "{name}: shape");
    assert_eq!(want.len(), got.len(), "{name}: length");
    let mut max = 0.0f64;
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        let d = (g - w).abs();
        assert!(d <= tol, "{name}[{i}] (flat): got {g} want {w}");
        max = max.max(d);
    }
    println!("{name}: max abs diff {max:.3e}");
    max
}

fn f<const N: usize, T: Copy + Into<f64>>(rows: &[[T; N]]) -> Vec<f64> {
    rows.iter()
        .flat_map(|r| r.iter().map(|&x| x.into()))
        .collect()
}

fn u<const N: usize>(rows: &[[usize; N]]) -> Vec<f64> {
    rows.iter()
        .flat_map(|r| r.iter().map(|&x| x as f64))
        .collect()
}

#[test]
fn rc_golden_alphabets_and_names() {
    let fx = Fixture::named("data", "residue_constants");
    let m = &fx.meta;
    let strs = |k: &str| -> Vec<String> {
        m[k].as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    };
    let restypes: Vec<String> = rc::RESTYPES.iter().map(|c| c.to_string()).collect();
    assert_eq!(strs("restypes"), restypes);
    let with_x: Vec<String> = rc::RESTYPES_WITH_X.iter().map(|c| c.to_string()).collect();
    assert_eq!(strs("restypes_with_x"), with_x);
    for (k, v) in m["restype_1to3"].as_object().unwrap() {
        let c = k.chars().next().unwrap();
        assert_eq!(rc::restype_1to3(c), v.as_str(), "{k}");
    }
    assert_eq!(strs("atom_types"), rc::ATOM_TYPES.to_vec());
    let a14 = m["restype_name_to_atom14_names"].as_object().unwrap();
    assert_eq!(a14.len(), 21);
    for (r, name) in rc::RESNAMES.iter().enumerate() {
        let want: Vec<&str> = a14[*name]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap())
            .collect();
        assert_eq!(want, rc::RESTYPE_ATOM14_NAMES[r].to_vec(), "{name}");
    }
    let chi = m["chi_angles_atoms"].as_object().unwrap();
    for (r, name) in rc::RESNAMES[..20].iter().enumerate() {
        let want: Vec<Vec<&str>> = chi[*name]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                c.as_array()
                    .unwrap()
                    .iter()
                    .map(|v| v.as_str().unwrap())
                    .collect()
            })
            .collect();
        let got: Vec<Vec<&str>> = rc::CHI_ANGLES_ATOMS[r].iter().map(|c| c.to_vec()).collect();
        assert_eq!(want, got, "{name}");
    }
    let swaps = m["residue_atom_renaming_swaps"].as_object().unwrap();
    assert_eq!(swaps.len(), rc::RESIDUE_ATOM_RENAMING_SWAPS.len());
    for (res, pairs) in rc::RESIDUE_ATOM_RENAMING_SWAPS.iter() {
        let want = swaps[*res].as_object().unwrap();
        assert_eq!(want.len(), pairs.len());
        for (a, b) in pairs.iter() {
            assert_eq!(want[*a].as_str(), Some(*b), "{res} {a}");
        }
    }
    for (k, v) in m["HHBLITS_AA_TO_ID"].as_object().unwrap() {
        let c = k.chars().next().unwrap();
        assert_eq!(
            rc::hhblits_aa_to_id(c),
            Some(v.as_u64().unwrap() as usize),
            "{k}"
        );
    }
    for (k, v) in m["ID_TO_HHBLITS_AA"].as_object().unwrap() {
        let i: usize = k.parse().unwrap();
        assert_eq!(rc::ID_TO_HHBLITS_AA[i].to_string(), v.as_str().unwrap());
    }
    let map: Vec<usize> = m["MAP_HHBLITS_AATYPE_TO_OUR_AATYPE"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_u64().unwrap() as usize)
        .collect();
    assert_eq!(map, rc::MAP_HHBLITS_AATYPE_TO_OUR_AATYPE.to_vec());
}

#[test]
fn rc_golden_atom_tables() {
    let fx = Fixture::named("data", "residue_constants");
    compare(
        &fx,
        "restype_atom14_to_atom37",
        &[21, 14],
        &u(rc::restype_atom14_to_atom37()),
        0.0,
    );
    compare(
        &fx,
        "restype_atom37_to_atom14",
        &[21, 37],
        &u(rc::restype_atom37_to_atom14()),
        0.0,
    );
    for name in ["restype_atom14_mask", "restype_atom14_atom_exists"] {
        compare(&fx, name, &[21, 14], &f(rc::restype_atom14_mask()), 0.0);
    }
    for name in ["restype_atom37_mask", "restype_atom37_atom_exists"] {
        compare(&fx, name, &[21, 37], &f(rc::restype_atom37_mask()), 0.0);
    }
    compare(
        &fx,
        "chi_angles_mask",
        &[20, 4],
        &f(&rc::chi_angles_mask()[..20]),
        0.0,
    );
    assert_eq!(rc::chi_angles_mask()[20], [0.0; 4]);
    compare(
        &fx,
        "chi_pi_periodic",
        &[21, 4],
        &f(&rc::CHI_PI_PERIODIC),
        0.0,
    );
    let chi_idx: Vec<f64> = rc::chi_atom_indices().iter().flat_map(|r| u(r)).collect();
    compare(&fx, "chi_atom_indices", &[21, 4, 4], &chi_idx, 0.0);
    compare(
        &fx,
        "restype_atom14_ambiguous_atoms",
        &[21, 14],
        &f(rc::restype_atom14_is_ambiguous()),
        0.0,
    );
    compare(
        &fx,
        "restype_atom14_ambiguous_atoms_swap_idx",
        &[21, 14],
        &u(rc::restype_atom14_ambiguous_swap()),
        0.0,
    );
}

#[test]
fn rc_golden_rigid_groups() {
    let fx = Fixture::named("data", "residue_constants");
    compare(
        &fx,
        "restype_atom14_to_rigid_group",
        &[21, 14],
        &u(rc::restype_atom14_to_rigid_group()),
        0.0,
    );
    compare(
        &fx,
        "restype_atom37_to_rigid_group",
        &[21, 37],
        &u(rc::restype_atom37_to_rigid_group()),
        0.0,
    );
    let p14: Vec<f64> = rc::restype_atom14_rigid_group_positions()
        .iter()
        .flat_map(|r| f(r))
        .collect();
    compare(
        &fx,
        "restype_atom14_rigid_group_positions",
        &[21, 14, 3],
        &p14,
        0.0,
    );
    let p37: Vec<f64> = rc::restype_atom37_rigid_group_positions()
        .iter()
        .flat_map(|r| f(r))
        .collect();
    compare(
        &fx,
        "restype_atom37_rigid_group_positions",
        &[21, 37, 3],
        &p37,
        0.0,
    );
    let frames: Vec<f64> = rc::restype_rigid_group_default_frame()
        .iter()
        .flat_map(|r| r.iter().flat_map(|g| f(g)))
        .collect();
    compare(
        &fx,
        "restype_rigid_group_default_frame",
        &[21, 8, 4, 4],
        &frames,
        1e-6,
    );
}

/// The structure module's tensor tables equal OpenFold's (the `structure_module` fixture parity in
/// `golden_modules.rs` runs with these tables).
#[test]
fn rc_golden_structure_module_atom_tables() {
    let fx = Fixture::named("data", "residue_constants");
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
        report.check(name, got, &fx.get(name), 0.0, abs);
    }
    report.assert_ok("AtomTables vs residue_constants");
}

/// `stereo_chemical_props.txt`: `$FERROFOLD_STEREO_PROPS`, else next to the golden dir
/// (`<golden>/../../data`), else `../shared/data` from the crate root.
fn stereo_props_path() -> PathBuf {
    if let Some(p) = std::env::var_os("FERROFOLD_STEREO_PROPS") {
        return PathBuf::from(p);
    }
    let beside_golden = golden_dir().join("../../data/stereo_chemical_props.txt");
    if beside_golden.exists() {
        return beside_golden;
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data/stereo_chemical_props.txt")
}

fn json_bonds(v: &serde_json::Value) -> Vec<(String, String, f64, f64)> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|b| {
            let b = b.as_array().unwrap();
            (
                b[0].as_str().unwrap().to_string(),
                b[1].as_str().unwrap().to_string(),
                b[2].as_f64().unwrap(),
                b[3].as_f64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn rc_golden_stereo_chemistry() {
    let fx = Fixture::named("data", "violation_bounds");
    let m = &fx.meta;
    let props = rc::load_stereo_chemical_props(&stereo_props_path()).unwrap();
    for res in rc::RESNAMES[..20].iter() {
        for (key, got) in [
            ("residue_bonds", &props.residue_bonds),
            ("residue_virtual_bonds", &props.residue_virtual_bonds),
        ] {
            let want = json_bonds(&m[key][*res]);
            let got = &got[*res];
            assert_eq!(want.len(), got.len(), "{key} {res}");
            for (w, g) in want.iter().zip(got) {
                assert_eq!(
                    (w.0.as_str(), w.1.as_str()),
                    (g.atom1.as_str(), g.atom2.as_str())
                );
                assert!((w.2 - g.length).abs() <= 1e-12, "{key} {res} {w:?} {g:?}");
                assert!((w.3 - g.stddev).abs() <= 1e-12, "{key} {res} {w:?} {g:?}");
            }
        }
        let want = m["residue_bond_angles"][*res].as_array().unwrap();
        let got = &props.residue_bond_angles[*res];
        assert_eq!(want.len(), got.len(), "angles {res}");
        for (w, g) in want.iter().zip(got) {
            let w = w.as_array().unwrap();
            assert_eq!(w[1].as_str().unwrap(), g.atom2);
            assert!((w[3].as_f64().unwrap() - g.angle_rad).abs() <= 1e-12);
            assert!((w[4].as_f64().unwrap() - g.stddev_rad).abs() <= 1e-12);
        }
    }
    for (k, v) in m["van_der_waals_radius"].as_object().unwrap() {
        assert_eq!(
            rc::van_der_waals_radius(k.chars().next().unwrap()),
            v.as_f64(),
            "{k}"
        );
    }
    let pair = |k: &str| -> [f64; 2] {
        let a = m[k].as_array().unwrap();
        [a[0].as_f64().unwrap(), a[1].as_f64().unwrap()]
    };
    assert_eq!(
        pair("between_res_bond_length_c_n"),
        rc::BETWEEN_RES_BOND_LENGTH_C_N
    );
    assert_eq!(
        pair("between_res_bond_length_stddev_c_n"),
        rc::BETWEEN_RES_BOND_LENGTH_STDDEV_C_N
    );
    assert_eq!(
        pair("between_res_cos_angles_ca_c_n"),
        rc::BETWEEN_RES_COS_ANGLES_CA_C_N
    );
    assert_eq!(
        pair("between_res_cos_angles_c_n_ca"),
        rc::BETWEEN_RES_COS_ANGLES_C_N_CA
    );
    assert_eq!(m["ca_ca"].as_f64(), Some(rc::CA_CA));
}

#[test]
fn rc_golden_violation_bounds() {
    let fx = Fixture::named("data", "violation_bounds");
    let props = rc::load_stereo_chemical_props(&stereo_props_path()).unwrap();
    let b = rc::make_atom14_dists_bounds(&props, 1.5, 12.0).unwrap();
    let t = |x: &rc::PairTable| -> Vec<f64> { x.iter().flat_map(|r| f(r)).collect() };
    // float32 tables built from the same f64 arithmetic: expect exact equality.
    compare(
        &fx,
        "atom14_dists_lower_bound",
        &[21, 14, 14],
        &t(&b.lower),
        0.0,
    );
    compare(
        &fx,
        "atom14_dists_upper_bound",
        &[21, 14, 14],
        &t(&b.upper),
        0.0,
    );
    compare(&fx, "atom14_bond_stddev", &[21, 14, 14], &t(&b.stddev), 0.0);
    compare(&fx, "atomtype_radius", &[37], rc::atomtype_radius(), 0.0);
    compare(
        &fx,
        "restype_atom14_radius",
        &[21, 14],
        &f(rc::restype_atom14_radius()),
        0.0,
    );
}

/// Per-restype rigid-group mask/ambiguity and atom14 tables, gathered by each protein's aatype,
/// equal the per-residue features OpenFold's data transforms produced.
#[test]
fn rc_golden_gathered_by_aatype() {
    for id in ["2q2k", "3u8v", "4zey"] {
        let fx = Fixture::named("data", &format!("protein_{id}"));
        let (_, aatype) = flat(&fx, "mmcif.aatype");
        let aatype: Vec<usize> = aatype.iter().map(|&a| a as usize).collect();
        let base = rc::restype_rigidgroup_base();
        let gather = |rows: &[Vec<f64>]| -> Vec<f64> {
            aatype
                .iter()
                .flat_map(|&a| rows[a].iter().copied())
                .collect()
        };
        let rows = |t: &[[f32; 8]]| -> Vec<Vec<f64>> {
            t.iter()
                .map(|r| r.iter().map(|&x| x as f64).collect())
                .collect()
        };
        let n = aatype.len();
        compare(
            &fx,
            "feat.rigidgroups_group_exists",
            &[n, 8],
            &gather(&rows(&base.mask)),
            0.0,
        );
        compare(
            &fx,
            "feat.rigidgroups_group_is_ambiguous",
            &[n, 8],
            &gather(&rows(&base.is_ambiguous)),
            0.0,
        );
        let r14 = |t: &[[f32; 14]]| -> Vec<Vec<f64>> {
            t.iter()
                .map(|r| r.iter().map(|&x| x as f64).collect())
                .collect()
        };
        compare(
            &fx,
            "feat.atom14_atom_exists",
            &[n, 14],
            &gather(&r14(rc::restype_atom14_mask())),
            0.0,
        );
        compare(
            &fx,
            "feat.atom14_atom_is_ambiguous",
            &[n, 14],
            &gather(&r14(rc::restype_atom14_is_ambiguous())),
            0.0,
        );
    }
}
