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
    r.check(
        "all_atom_positions",
        &t_f32(&c.positions, &[l, 37, 3]),
        &fx.get("mmcif.all_atom_positions"),
        0.0,
        0.0,
    );
    r.check(
        "all_atom_mask",
        &t_f32(&c.mask, &[l, 37]),
        &fx.get("mmcif.all_atom_mask"),
        0.0,
        0.0,
    );
    let res = fx
        .get("mmcif.resolution")
        .to_dtype(DType::F32)
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0];
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
    let mut cmp =
        |what: &str, got_tok: &[u8], got_del: &[u32], rows: usize, width: usize, key: &str| {
            let wt: Vec<Vec<i32>> = fx.get(&format!("{key}.msa")).to_vec2().unwrap();
            let wd: Vec<Vec<i32>> = fx.get(&format!("{key}.deletion_matrix")).to_vec2().unwrap();
            r.checked += 1;
            if wt.len() != rows || wt.first().map_or(0, Vec::len) != width {
                r.fail(format!(
                    "{what}: shape [{rows},{width}] vs [{},{}]",
                    wt.len(),
                    wt[0].len()
                ));
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
        let p =
            parse_msa_text(&text, &file, MsaFormat::of(file.to_str().unwrap()).unwrap()).unwrap();
        let msa = merge(&[p]);
        let key = format!("msa.{}", m["key"].as_str().unwrap());
        cmp(&key, &msa.tokens, &msa.deletions, msa.rows, msa.width, &key);
    }
    let first = fx.meta["msas"][0]["file"].as_str().unwrap();
    let dir = data_root().join(first).parent().unwrap().to_path_buf();
    let msa = build_msa(&read_alignment_dir(&dir).unwrap(), seq).unwrap();
    cmp(
        "msa_combined",
        &msa.tokens,
        &msa.deletions,
        msa.rows,
        msa.width,
        "msa_combined",
    );
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
    v.iter()
        .enumerate()
        .map(|(k, &x)| if mask[k / per] > 0.0 { x } else { 0.0 })
        .collect()
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
    r.check(
        "atom14_atom_exists",
        &t_f32(&m.atom14_atom_exists, &[l, 14]),
        &fx.get("feat.atom14_atom_exists"),
        0.0,
        0.0,
    );
    r.check(
        "atom37_atom_exists",
        &t_f32(&m.atom37_atom_exists, &[l, 37]),
        &fx.get("feat.atom37_atom_exists"),
        0.0,
        0.0,
    );
    let i64t = |v: &[i64], s: &[usize]| Tensor::from_vec(v.to_vec(), s, &Device::Cpu).unwrap();
    r.check(
        "residx_atom14_to_atom37",
        &i64t(&m.residx_atom14_to_atom37, &[l, 14]),
        &fx.get("feat.residx_atom14_to_atom37"),
        0.0,
        0.0,
    );
    r.check(
        "residx_atom37_to_atom14",
        &i64t(&m.residx_atom37_to_atom14, &[l, 37]),
        &fx.get("feat.residx_atom37_to_atom14"),
        0.0,
        0.0,
    );
    let p = atom14_positions(aa, &pos, &mask);
    r.check(
        "atom14_gt_exists",
        &t64(&p.atom14_gt_exists, &[l, 14]),
        &fx.get("feat.atom14_gt_exists"),
        0.0,
        0.0,
    );
    r.check(
        "atom14_gt_positions",
        &t64(&p.atom14_gt_positions, &[l, 14, 3]),
        &fx.get("feat.atom14_gt_positions"),
        0.0,
        0.0,
    );
    r.check(
        "atom14_alt_gt_positions",
        &t64(&p.atom14_alt_gt_positions, &[l, 14, 3]),
        &fx.get("feat.atom14_alt_gt_positions"),
        0.0,
        0.0,
    );
    r.check(
        "atom14_alt_gt_exists",
        &t64(&p.atom14_alt_gt_exists, &[l, 14]),
        &fx.get("feat.atom14_alt_gt_exists"),
        0.0,
        0.0,
    );
    r.check(
        "atom14_atom_is_ambiguous",
        &t64(&p.atom14_atom_is_ambiguous, &[l, 14]),
        &fx.get("feat.atom14_atom_is_ambiguous"),
        0.0,
        0.0,
    );
    let f = atom37_to_frames(aa, &pos, &mask);
    r.check(
        "rigidgroups_gt_frames",
        &t64(&f.rigidgroups_gt_frames, &[l, 8, 4, 4]),
        &fx.get("feat.rigidgroups_gt_frames"),
        rel,
        abs,
    );
    r.check(
        "rigidgroups_alt_gt_frames",
        &t64(&f.rigidgroups_alt_gt_frames, &[l, 8, 4, 4]),
        &fx.get("feat.rigidgroups_alt_gt_frames"),
        rel,
        abs,
    );
    r.check(
        "rigidgroups_gt_exists",
        &t64(&f.rigidgroups_gt_exists, &[l, 8]),
        &fx.get("feat.rigidgroups_gt_exists"),
        0.0,
        0.0,
    );
    r.check(
        "rigidgroups_group_exists",
        &t64(&f.rigidgroups_group_exists, &[l, 8]),
        &fx.get("feat.rigidgroups_group_exists"),
        0.0,
        0.0,
    );
    r.check(
        "rigidgroups_group_is_ambiguous",
        &t64(&f.rigidgroups_group_is_ambiguous, &[l, 8]),
        &fx.get("feat.rigidgroups_group_is_ambiguous"),
        0.0,
        0.0,
    );
    let (bb, bbm) = f.backbone();
    r.check(
        "backbone_rigid_tensor",
        &t64(&bb, &[l, 4, 4]),
        &fx.get("feat.backbone_rigid_tensor"),
        rel,
        abs,
    );
    r.check(
        "backbone_rigid_mask",
        &t64(&bbm, &[l]),
        &fx.get("feat.backbone_rigid_mask"),
        0.0,
        0.0,
    );
    let t = atom37_to_torsion_angles(aa, &pos, &mask);
    let tm = &t.torsion_angles_mask;
    r.check(
        "torsion_angles_mask",
        &t64(tm, &[l, 7]),
        &fx.get("feat.torsion_angles_mask"),
        0.0,
        0.0,
    );
    let want: Vec<f64> = fx
        .get("feat.torsion_angles_sin_cos")
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    r.check(
        "torsion_angles_sin_cos (masked)",
        &t64(&masked(&t.torsion_angles_sin_cos, tm), &[l, 7, 2]),
        &t64(&masked(&want, tm), &[l, 7, 2]),
        rel,
        abs,
    );
    let want: Vec<f64> = fx
        .get("feat.alt_torsion_angles_sin_cos")
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    r.check(
        "alt_torsion_angles_sin_cos (masked)",
        &t64(&masked(&t.alt_torsion_angles_sin_cos, tm), &[l, 7, 2]),
        &t64(&masked(&want, tm), &[l, 7, 2]),
        rel,
        abs,
    );
    // Unmasked entries are built from zero coordinates: still deterministic in f64.
    r.check(
        "torsion_angles_sin_cos (all)",
        &t64(&t.torsion_angles_sin_cos, &[l, 7, 2]),
        &fx.get("feat.torsion_angles_sin_cos"),
        1e-9,
        1e-9,
    );
    let (chi, chim) = t.chi();
    r.check(
        "chi_mask",
        &t64(&chim, &[l, 4]),
        &fx.get("feat.chi_mask"),
        0.0,
        0.0,
    );
    let want: Vec<f64> = fx
        .get("feat.chi_angles_sin_cos")
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    r.check(
        "chi_angles_sin_cos (masked)",
        &t64(&masked(&chi, &chim), &[l, 4, 2]),
        &t64(&masked(&want, &chim), &[l, 4, 2]),
        rel,
        abs,
    );
    let (pb, pbm) = pseudo_beta(aa, &pos, &mask);
    r.check(
        "pseudo_beta",
        &t64(&pb, &[l, 3]),
        &fx.get("feat.pseudo_beta"),
        0.0,
        0.0,
    );
    r.check(
        "pseudo_beta_mask",
        &t64(&pbm, &[l]),
        &fx.get("feat.pseudo_beta_mask"),
        0.0,
        0.0,
    );
    let back = atom14_to_atom37(aa, &p.atom14_gt_positions);
    r.check(
        "atom37_from_atom14_gt_positions",
        &t64(&back, &[l, 37, 3]),
        &fx.get("feat.atom37_from_atom14_gt_positions"),
        0.0,
        0.0,
    );
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

/// Our batch for the model fixture's protein (3u8v, crop 32 at residue 22, 8 clusters, 8 extra,
/// 2 recycles): same 40 keys, shapes and dtypes; deterministic features equal OpenFold's.
#[test]
fn golden_data_batch_3u8v() {
    use ferrofold::data::msa::{build_msa, read_alignment_dir};
    use ferrofold::data::sample::BATCH_KEYS;
    use ferrofold::data::transforms::{build_sample_at, FeatureConfig, ProteinInput};
    let fx = Fixture::named("model", "alphafold_model");
    let file = data_root().join("val/3u8v.cif");
    let c = parse_structure_file(&file, "A").unwrap();
    let msa = build_msa(
        &read_alignment_dir(&data_root().join("val/alignments/3u8v")).unwrap(),
        &c.sequence,
    )
    .unwrap();
    let input = ProteinInput {
        id: "3u8v_A".into(),
        aatype: c.aatype.clone(),
        positions: c.positions.clone(),
        mask: c.mask.clone(),
        resolution: c.resolution.unwrap_or(0.0),
        msa,
    };
    let cfg = FeatureConfig {
        crop_size: 32,
        max_msa_clusters: 8,
        max_extra_msa: 8,
        replace_fraction: 0.15,
        uniform_prob: 0.1,
        profile_prob: 0.1,
        same_prob: 0.1,
        block_delete: true,
        msa_fraction_per_block: 0.3,
        num_blocks: 5,
        num_recycles: 2,
        clamp_prob: 1.0,
        seed: 3,
    };
    let s = build_sample_at(&input, &cfg, 0, Some(22)).unwrap();
    let tensors = s.to_tensors(&Device::Cpu, DType::F64).unwrap();
    let mut r = Report::default();
    let mut keys: Vec<&String> = tensors.keys().collect();
    keys.sort();
    assert_eq!(keys, BATCH_KEYS.to_vec(), "keys");
    for k in BATCH_KEYS {
        let want = fx.get(&format!("input.{k}"));
        let got = &tensors[k];
        r.checked += 1;
        if got.dims() != want.dims() || got.dtype() != want.dtype() {
            r.fail(format!(
                "{k}: {:?} {:?} vs {:?} {:?}",
                got.dims(),
                got.dtype(),
                want.dims(),
                want.dtype()
            ));
        }
    }
    // Deterministic (non-MSA) features: OpenFold's float32 pipeline vs our f64-then-f32.
    for k in [
        "aatype",
        "residue_index",
        "seq_length",
        "all_atom_positions",
        "all_atom_mask",
        "resolution",
        "seq_mask",
        "atom14_atom_exists",
        "residx_atom14_to_atom37",
        "residx_atom37_to_atom14",
        "atom37_atom_exists",
        "atom14_gt_exists",
        "atom14_gt_positions",
        "atom14_alt_gt_positions",
        "atom14_alt_gt_exists",
        "atom14_atom_is_ambiguous",
        "rigidgroups_gt_exists",
        "rigidgroups_group_exists",
        "rigidgroups_group_is_ambiguous",
        "pseudo_beta",
        "pseudo_beta_mask",
        "backbone_rigid_mask",
        "chi_mask",
        "target_feat",
        "is_distillation",
        "use_clamped_fape",
        "msa_mask",
        "msa_row_mask",
        "extra_msa_mask",
        "extra_msa_row_mask",
    ] {
        r.check(k, &tensors[k], &fx.get(&format!("input.{k}")), 0.0, 0.0);
    }
    for k in [
        "rigidgroups_gt_frames",
        "rigidgroups_alt_gt_frames",
        "backbone_rigid_tensor",
    ] {
        let gm: Vec<f64> = fx
            .get(&format!(
                "input.{}",
                if k == "backbone_rigid_tensor" {
                    "backbone_rigid_mask"
                } else {
                    "rigidgroups_gt_exists"
                }
            ))
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let g: Vec<f64> = tensors[k].flatten_all().unwrap().to_vec1().unwrap();
        let w: Vec<f64> = fx
            .get(&format!("input.{k}"))
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let shape = tensors[k].dims().to_vec();
        // mask is [..., recycle]; frames are [..., 4, 4, recycle]: expand per 16 entries.
        let per = g.len() / gm.len();
        let mexp: Vec<f64> = (0..g.len())
            .map(|i| gm[(i / (per * 2)) * 2 + i % 2])
            .collect();
        let mk = |v: &[f64]| -> Vec<f64> {
            v.iter()
                .zip(&mexp)
                .map(|(&x, &m)| if m > 0.0 { x } else { 0.0 })
                .collect()
        };
        r.check(k, &t64(&mk(&g), &shape), &t64(&mk(&w), &shape), 1e-6, 1e-6);
    }
    let cm: Vec<f64> = fx
        .get("input.chi_mask")
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let g: Vec<f64> = tensors["chi_angles_sin_cos"]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let w: Vec<f64> = fx
        .get("input.chi_angles_sin_cos")
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    // chi_angles_sin_cos is [N,4,2,R]; chi_mask [N,4,R].
    let idx = |i: usize| {
        let rr = i % 2;
        let rest = i / 2;
        let chi = rest / 2;
        chi * 2 + rr
    };
    let mk = |v: &[f64]| -> Vec<f64> {
        v.iter()
            .enumerate()
            .map(|(i, &x)| if cm[idx(i)] > 0.0 { x } else { 0.0 })
            .collect()
    };
    r.check(
        "chi_angles_sin_cos (masked)",
        &t64(&mk(&g), &[32, 4, 2, 2]),
        &t64(&mk(&w), &[32, 4, 2, 2]),
        1e-5,
        1e-5,
    );
    // MSA invariants: query row of true_msa is the cropped sequence; one-hots and profiles sum to 1.
    let tm: Vec<i64> = tensors["true_msa"]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    let aat: Vec<i64> = tensors["aatype"].flatten_all().unwrap().to_vec1().unwrap();
    r.checked += 1;
    if (0..64).any(|i| tm[i] != aat[i]) {
        r.fail("true_msa row 0 != aatype");
    }
    let mf: Vec<f64> = tensors["msa_feat"]
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    r.checked += 1;
    for pos in 0..8 * 32 {
        for rc in 0..2 {
            let ch = |c: usize| mf[(pos * 49 + c) * 2 + rc];
            let oh: f64 = (0..23).map(ch).sum();
            let pr: f64 = (25..48).map(ch).sum();
            if (oh - 1.0).abs() > 1e-6 || (pr - 1.0).abs() > 1e-5 {
                r.fail(format!("msa_feat at {pos}/{rc}: one-hot {oh} profile {pr}"));
                break;
            }
        }
    }
    r.assert_ok("batch_3u8v");
}
