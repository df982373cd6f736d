//! Frames from three points against OpenFold's own frames on real proteins (golden
//! `data/protein_*`): `Rigid::from_3_points` (OpenFold semantics) against
//! `feat.bb_from_3_points_N_CA_C`, and the AF2 backbone frame (Algorithm 21) against
//! `feat.backbone_rigid_tensor` where `backbone_rigid_mask` is 1.

mod common;

use candle_core::{DType, IndexOp, Tensor};
use common::golden::{Fixture, Report};
use ferrofold::geometry::rigid::Rigid;

fn atoms(fx: &Fixture) -> (Tensor, Tensor, Tensor) {
    // atom37 order: N = 0, CA = 1, C = 2.
    let pos = fx.get_as("mmcif.all_atom_positions", DType::F64);
    (
        pos.i((.., 0, ..)).unwrap(),
        pos.i((.., 1, ..)).unwrap(),
        pos.i((.., 2, ..)).unwrap(),
    )
}

fn rows_where(x: &Tensor, mask: &Tensor) -> Tensor {
    let m: Vec<f64> = mask.to_dtype(DType::F64).unwrap().to_vec1().unwrap();
    let idx: Vec<u32> = m
        .iter()
        .enumerate()
        .filter(|(_, v)| **v > 0.5)
        .map(|(i, _)| i as u32)
        .collect();
    x.contiguous()
        .unwrap()
        .index_select(&Tensor::new(idx.as_slice(), x.device()).unwrap(), 0)
        .unwrap()
}

#[test]
fn sm_frames_from_three_points_match_openfold() {
    let mut report = Report::default();
    for id in ["3u8v", "2q2k", "4zey"] {
        let fx = Fixture::named("data", &format!("protein_{id}"));
        let (n, ca, c) = atoms(&fx);
        // OpenFold `Rigid.from_3_points(p_neg_x_axis=N, origin=CA, p_xy_plane=C, eps=1e-8)`.
        let got = Rigid::from_3_points(&n, &ca, &c, 1e-8)
            .unwrap()
            .to_tensor_4x4()
            .unwrap();
        report.check(
            &format!("{id} bb_from_3_points_N_CA_C"),
            &got,
            &fx.get("feat.bb_from_3_points_N_CA_C"),
            1e-12,
            0.0,
        );
        // AF2 backbone frame, Algorithm 21 (OpenFold's atom37_to_frames uses eps 1e-8).
        let got = Rigid::from_3_points_af2(&n, &ca, &c, 1e-8)
            .unwrap()
            .to_tensor_4x4()
            .unwrap();
        let mask = fx.get("feat.backbone_rigid_mask");
        report.check(
            &format!("{id} backbone_rigid_tensor (resolved)"),
            &rows_where(&got, &mask),
            &rows_where(&fx.get("feat.backbone_rigid_tensor"), &mask),
            1e-12,
            0.0,
        );
    }
    report.assert_ok("frames from 3 points");
}

/// Quaternion ↔ matrix conversions against the structure-module golden: the backbone group of
/// `sidechain_frames` (default frame = identity) is the frame stored in `frames` (q, 10·t).
#[test]
fn sm_tensor_7_and_4x4_agree_with_structure_module_golden() {
    let fx = Fixture::named("modules", "structure_module");
    let frames = fx.get("output.frames"); // [L, N, 7]
    let sc = fx.get("output.sidechain_frames"); // [L, N, 8, 4, 4]
    let bb = sc.i((.., .., 0)).unwrap(); // [L, N, 4, 4]
    let mut report = Report::default();
    let from7 = Rigid::from_tensor_7(&frames, false).unwrap();
    report.check(
        "from_tensor_7 → 4x4",
        &from7.to_tensor_4x4().unwrap(),
        &bb,
        1e-13,
        0.0,
    );
    // Matrix → quaternion recovers the stored quaternion up to its sign.
    let q = Rigid::from_tensor_4x4(&bb).unwrap().to_tensor_7().unwrap();
    let want = frames.narrow(2, 0, 4).unwrap();
    let w = want.narrow(2, 0, 1).unwrap();
    let sign = ((w.ge(0.0).unwrap().to_dtype(DType::F64).unwrap() * 2.0).unwrap() - 1.0).unwrap();
    report.check(
        "rot_to_quat",
        &q.narrow(2, 0, 4).unwrap(),
        &want.broadcast_mul(&sign).unwrap(),
        1e-12,
        0.0,
    );
    report.check(
        "to_tensor_7 translation",
        &q.narrow(2, 4, 3).unwrap(),
        &frames.narrow(2, 4, 3).unwrap(),
        0.0,
        0.0,
    );
    report.assert_ok("tensor_7 / 4x4");
}

/// `atom14_to_atom37` against the full-model golden: `final_atom_positions` is the last SM layer's
/// atom14 positions mapped to atom37 (features of the last recycle), and the tables derived from
/// `aatype` equal the batch features.
#[test]
fn sm_atom14_to_atom37_matches_model_golden() {
    use ferrofold::geometry::all_atom::{atom14_to_atom37, atom37_tables_for};
    let fx = Fixture::named("model", "alphafold_model");
    let last = |name: &str| {
        let t = fx.get(name);
        let r = t.rank();
        t.narrow(r - 1, t.dims()[r - 1] - 1, 1)
            .unwrap()
            .squeeze(r - 1)
            .unwrap()
    };
    let pos = fx.get("output.sm.positions");
    let pos14 = pos.i(pos.dims()[0] - 1).unwrap();
    let idx = last("input.residx_atom37_to_atom14");
    let exists = last("input.atom37_atom_exists");
    let mut report = Report::default();
    let got = atom14_to_atom37(&pos14, &idx, &exists).unwrap();
    report.check(
        "final_atom_positions",
        &got,
        &fx.get("output.final_atom_positions"),
        0.0,
        0.0,
    );
    let (idx2, exists2) =
        atom37_tables_for(&last("input.aatype"), &pos14.device().clone()).unwrap();
    let got2 = atom14_to_atom37(&pos14, &idx2, &exists2).unwrap();
    report.check(
        "final_atom_positions (aatype tables)",
        &got2,
        &fx.get("output.final_atom_positions"),
        0.0,
        0.0,
    );
    report.check("atom37_atom_exists", &exists2, &exists, 0.0, 0.0);
    report.assert_ok("atom14_to_atom37");
}
