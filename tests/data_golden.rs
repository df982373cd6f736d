//! Parity with OpenFold's data pipeline on three real proteins (`golden/openfold/data/protein_*`).

mod common;

use candle_core::{DType, Device, Tensor};
use common::golden::{Fixture, Report};
use ferrofold::data::structure::parse_structure_file;

fn data_root() -> std::path::PathBuf {
    match std::env::var_os("FERROFOLD_DATA") {
        Some(d) => d.into(),
        None => std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data/proteins"),
    }
}

fn t_f32(v: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
}

fn check_mmcif(name: &str) {
    let fx = Fixture::named("data", name);
    let file = data_root().join(fx.meta["source_file"].as_str().unwrap());
    let chain = fx.meta["chain_auth"].as_str().unwrap();
    let c = parse_structure_file(&file, chain).unwrap();
    let l = c.len();
    let mut r = Report::default();
    let aatype: Vec<i64> = c.aatype.iter().map(|&a| a as i64).collect();
    let want: Vec<i64> = fx.get("mmcif.aatype").to_vec1().unwrap();
    r.checked += 1;
    if aatype != want {
        r.fail(format!("aatype differs:\n{aatype:?}\n{want:?}"));
    }
    // Exact (bitwise) comparison of the f32 coordinates and masks.
    r.check("all_atom_positions", &t_f32(&c.positions, &[l, 37, 3]), &fx.get("mmcif.all_atom_positions"), 0.0, 0.0);
    r.check("all_atom_mask", &t_f32(&c.mask, &[l, 37]), &fx.get("mmcif.all_atom_mask"), 0.0, 0.0);
    let res = fx.get("mmcif.resolution").to_dtype(DType::F32).unwrap().to_vec1::<f32>().unwrap()[0];
    r.checked += 1;
    if c.resolution.unwrap_or(0.0) != res {
        r.fail(format!("resolution {:?} vs {res}", c.resolution));
    }
    r.checked += 1;
    if c.release_date.as_deref() != fx.meta["release_date"].as_str() {
        r.fail(format!("release date {:?}", c.release_date));
    }
    r.assert_ok(name);
}

#[test]
fn golden_data_mmcif_4zey() {
    check_mmcif("protein_4zey");
}

#[test]
fn golden_data_mmcif_3u8v() {
    check_mmcif("protein_3u8v");
}

#[test]
fn golden_data_mmcif_2q2k() {
    check_mmcif("protein_2q2k");
}

fn check_msa(name: &str) {
    use ferrofold::data::msa::{build_msa, merge, parse_msa_text, read_alignment_dir, MsaFormat};
    let fx = Fixture::named("data", name);
    let seq = fx.meta["sequence"].as_str().unwrap();
    let mut r = Report::default();
    let mut cmp = |what: &str, got_tok: &[u8], got_del: &[u32], rows: usize, width: usize, key: &str| {
        let wt: Vec<Vec<i32>> = fx.get(&format!("{key}.msa")).to_vec2().unwrap();
        let wd: Vec<Vec<i32>> = fx.get(&format!("{key}.deletion_matrix")).to_vec2().unwrap();
        r.checked += 1;
        if wt.len() != rows || wt.first().map_or(0, Vec::len) != width {
            r.fail(format!("{what}: shape [{rows},{width}] vs [{},{}]", wt.len(), wt[0].len()));
            return;
        }
        let ft: Vec<i32> = wt.concat();
        let fd: Vec<i32> = wd.concat();
        let gt: Vec<i32> = got_tok.iter().map(|&v| v as i32).collect();
        let gd: Vec<i32> = got_del.iter().map(|&v| v as i32).collect();
        if gt != ft {
            r.fail(format!("{what}: tokens differ"));
        }
        if gd != fd {
            r.fail(format!("{what}: deletions differ"));
        }
    };
    for m in fx.meta["msas"].as_array().unwrap() {
        let file = data_root().join(m["file"].as_str().unwrap());
        let text = std::fs::read_to_string(&file).unwrap();
        let p = parse_msa_text(&text, &file, MsaFormat::of(file.to_str().unwrap()).unwrap()).unwrap();
        let msa = merge(&[p]);
        let key = format!("msa.{}", m["key"].as_str().unwrap());
        cmp(&key, &msa.tokens, &msa.deletions, msa.rows, msa.width, &key);
    }
    let first = fx.meta["msas"][0]["file"].as_str().unwrap();
    let dir = data_root().join(first).parent().unwrap().to_path_buf();
    let msa = build_msa(&read_alignment_dir(&dir).unwrap(), seq).unwrap();
    cmp("msa_combined", &msa.tokens, &msa.deletions, msa.rows, msa.width, "msa_combined");
    r.assert_ok(name);
}

#[test]
fn golden_data_msa_4zey() {
    check_msa("protein_4zey");
}

#[test]
fn golden_data_msa_3u8v() {
    check_msa("protein_3u8v");
}

#[test]
fn golden_data_msa_2q2k() {
    check_msa("protein_2q2k");
}

fn t64(v: &[f64], shape: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape, &Device::Cpu).unwrap()
}

/// Zero entries where `mask` (broadcast over trailing dims) is 0.
fn masked(v: &[f64], mask: &[f64]) -> Vec<f64> {
    let per = v.len() / mask.len();
    v.iter().enumerate().map(|(k, &x)| if mask[k / per] > 0.0 { x } else { 0.0 }).collect()
}

fn check_features(name: &str) {
    use ferrofold::data::features::*;
    let fx = Fixture::named("data", name);
    let file = data_root().join(fx.meta["source_file"].as_str().unwrap());
    let c = parse_structure_file(&file, fx.meta["chain_auth"].as_str().unwrap()).unwrap();
    let l = c.len();
    let pos: Vec<f64> = c.positions.iter().map(|&v| v as f64).collect();
    let mask: Vec<f64> = c.mask.iter().map(|&v| v as f64).collect();
    let aa = &c.aatype;
    let mut r = Report::default();
    let (rel, abs) = (1e-12, 1e-12);
    let m = atom14_masks(aa);
    r.check("atom14_atom_exists", &t_f32(&m.atom14_atom_exists, &[l, 14]), &fx.get("feat.atom14_atom_exists"), 0.0, 0.0);
    r.check("atom37_atom_exists", &t_f32(&m.atom37_atom_exists, &[l, 37]), &fx.get("feat.atom37_atom_exists"), 0.0, 0.0);
    let i64t = |v: &[i64], s: &[usize]| Tensor::from_vec(v.to_vec(), s, &Device::Cpu).unwrap();
    r.check("residx_atom14_to_atom37", &i64t(&m.residx_atom14_to_atom37, &[l, 14]), &fx.get("feat.residx_atom14_to_atom37"), 0.0, 0.0);
    r.check("residx_atom37_to_atom14", &i64t(&m.residx_atom37_to_atom14, &[l, 37]), &fx.get("feat.residx_atom37_to_atom14"), 0.0, 0.0);
    let p = atom14_positions(aa, &pos, &mask);
    r.check("atom14_gt_exists", &t64(&p.atom14_gt_exists, &[l, 14]), &fx.get("feat.atom14_gt_exists"), 0.0, 0.0);
    r.check("atom14_gt_positions", &t64(&p.atom14_gt_positions, &[l, 14, 3]), &fx.get("feat.atom14_gt_positions"), 0.0, 0.0);
    r.check("atom14_alt_gt_positions", &t64(&p.atom14_alt_gt_positions, &[l, 14, 3]), &fx.get("feat.atom14_alt_gt_positions"), 0.0, 0.0);
    r.check("atom14_alt_gt_exists", &t64(&p.atom14_alt_gt_exists, &[l, 14]), &fx.get("feat.atom14_alt_gt_exists"), 0.0, 0.0);
    r.check("atom14_atom_is_ambiguous", &t64(&p.atom14_atom_is_ambiguous, &[l, 14]), &fx.get("feat.atom14_atom_is_ambiguous"), 0.0, 0.0);
    let f = atom37_to_frames(aa, &pos, &mask);
    r.check("rigidgroups_gt_frames", &t64(&f.rigidgroups_gt_frames, &[l, 8, 4, 4]), &fx.get("feat.rigidgroups_gt_frames"), rel, abs);
    r.check("rigidgroups_alt_gt_frames", &t64(&f.rigidgroups_alt_gt_frames, &[l, 8, 4, 4]), &fx.get("feat.rigidgroups_alt_gt_frames"), rel, abs);
    r.check("rigidgroups_gt_exists", &t64(&f.rigidgroups_gt_exists, &[l, 8]), &fx.get("feat.rigidgroups_gt_exists"), 0.0, 0.0);
    r.check("rigidgroups_group_exists", &t64(&f.rigidgroups_group_exists, &[l, 8]), &fx.get("feat.rigidgroups_group_exists"), 0.0, 0.0);
    r.check("rigidgroups_group_is_ambiguous", &t64(&f.rigidgroups_group_is_ambiguous, &[l, 8]), &fx.get("feat.rigidgroups_group_is_ambiguous"), 0.0, 0.0);
    let (bb, bbm) = f.backbone();
    r.check("backbone_rigid_tensor", &t64(&bb, &[l, 4, 4]), &fx.get("feat.backbone_rigid_tensor"), rel, abs);
    r.check("backbone_rigid_mask", &t64(&bbm, &[l]), &fx.get("feat.backbone_rigid_mask"), 0.0, 0.0);
    let t = atom37_to_torsion_angles(aa, &pos, &mask);
    let tm = &t.torsion_angles_mask;
    r.check("torsion_angles_mask", &t64(tm, &[l, 7]), &fx.get("feat.torsion_angles_mask"), 0.0, 0.0);
    let want: Vec<f64> = fx.get("feat.torsion_angles_sin_cos").flatten_all().unwrap().to_vec1().unwrap();
    r.check("torsion_angles_sin_cos (masked)", &t64(&masked(&t.torsion_angles_sin_cos, tm), &[l, 7, 2]), &t64(&masked(&want, tm), &[l, 7, 2]), rel, abs);
    let want: Vec<f64> = fx.get("feat.alt_torsion_angles_sin_cos").flatten_all().unwrap().to_vec1().unwrap();
    r.check("alt_torsion_angles_sin_cos (masked)", &t64(&masked(&t.alt_torsion_angles_sin_cos, tm), &[l, 7, 2]), &t64(&masked(&want, tm), &[l, 7, 2]), rel, abs);
    // Unmasked entries are built from zero coordinates: still deterministic in f64.
    r.check("torsion_angles_sin_cos (all)", &t64(&t.torsion_angles_sin_cos, &[l, 7, 2]), &fx.get("feat.torsion_angles_sin_cos"), 1e-9, 1e-9);
    let (chi, chim) = t.chi();
    r.check("chi_mask", &t64(&chim, &[l, 4]), &fx.get("feat.chi_mask"), 0.0, 0.0);
    let want: Vec<f64> = fx.get("feat.chi_angles_sin_cos").flatten_all().unwrap().to_vec1().unwrap();
    r.check("chi_angles_sin_cos (masked)", &t64(&masked(&chi, &chim), &[l, 4, 2]), &t64(&masked(&want, &chim), &[l, 4, 2]), rel, abs);
    let (pb, pbm) = pseudo_beta(aa, &pos, &mask);
    r.check("pseudo_beta", &t64(&pb, &[l, 3]), &fx.get("feat.pseudo_beta"), 0.0, 0.0);
    r.check("pseudo_beta_mask", &t64(&pbm, &[l]), &fx.get("feat.pseudo_beta_mask"), 0.0, 0.0);
    let back = atom14_to_atom37(aa, &p.atom14_gt_positions);
    r.check("atom37_from_atom14_gt_positions", &t64(&back, &[l, 37, 3]), &fx.get("feat.atom37_from_atom14_gt_positions"), 0.0, 0.0);
    r.assert_ok(name);
}

#[test]
fn golden_data_features_4zey() {
    check_features("protein_4zey");
}

#[test]
fn golden_data_features_3u8v() {
    check_features("protein_3u8v");
}

#[test]
fn golden_data_features_2q2k() {
    check_features("protein_2q2k");
}
