//! Deterministic per-protein features from atom37 coordinates (OpenFold `data_transforms`):
//! atom14 masks and positions with ambiguous-atom alternatives, rigid-group ground-truth frames
//! (AF2 suppl. Algorithm 21 / 24 inputs), backbone frames, torsion and chi angles, pseudo-β.
//!
//! Everything is computed in f64 from the (f32) atom37 coordinates, in OpenFold's operation order,
//! so results match OpenFold's float64 run to ~1e-15. Arrays are flat row-major `Vec`s.

use crate::model::residue_constants as rc;

/// atom14 tables gathered per residue (`make_atom14_masks`).
#[derive(Debug, Clone, PartialEq)]
pub struct Atom14Masks {
    /// `[L,14]` 1.0 where the residue type has the atom.
    pub atom14_atom_exists: Vec<f32>,
    /// `[L,14]` atom37 index of each atom14 slot.
    pub residx_atom14_to_atom37: Vec<i64>,
    /// `[L,37]` atom14 slot of each atom37 atom.
    pub residx_atom37_to_atom14: Vec<i64>,
    /// `[L,37]` 1.0 where the residue type has the atom.
    pub atom37_atom_exists: Vec<f32>,
}

/// `make_atom14_masks`.
pub fn atom14_masks(aatype: &[u8]) -> Atom14Masks {
    let (m14, m37) = (rc::restype_atom14_mask(), rc::restype_atom37_mask());
    let (to37, to14) = (
        rc::restype_atom14_to_atom37(),
        rc::restype_atom37_to_atom14(),
    );
    let mut out = Atom14Masks {
        atom14_atom_exists: Vec::with_capacity(aatype.len() * 14),
        residx_atom14_to_atom37: Vec::with_capacity(aatype.len() * 14),
        residx_atom37_to_atom14: Vec::with_capacity(aatype.len() * 37),
        atom37_atom_exists: Vec::with_capacity(aatype.len() * 37),
    };
    for &a in aatype {
        let r = (a as usize).min(20);
        out.atom14_atom_exists.extend_from_slice(&m14[r]);
        out.residx_atom14_to_atom37
            .extend(to37[r].iter().map(|&v| v as i64));
        out.residx_atom37_to_atom14
            .extend(to14[r].iter().map(|&v| v as i64));
        out.atom37_atom_exists.extend_from_slice(&m37[r]);
    }
    out
}

/// Ground-truth atom14 positions (`make_atom14_positions`).
#[derive(Debug, Clone, PartialEq)]
pub struct Atom14Positions {
    pub atom14_gt_exists: Vec<f64>,
    pub atom14_gt_positions: Vec<f64>,
    pub atom14_alt_gt_positions: Vec<f64>,
    pub atom14_alt_gt_exists: Vec<f64>,
    pub atom14_atom_is_ambiguous: Vec<f64>,
}

/// `make_atom14_positions`: gather atom37 → atom14 and build the renamed (ambiguous-swap)
/// alternative. `pos37` is `[L,37,3]`, `mask37` `[L,37]`.
pub fn atom14_positions(aatype: &[u8], pos37: &[f64], mask37: &[f64]) -> Atom14Positions {
    let l = aatype.len();
    let (m14, to37) = (rc::restype_atom14_mask(), rc::restype_atom14_to_atom37());
    let (swap, amb) = (
        rc::restype_atom14_ambiguous_swap(),
        rc::restype_atom14_is_ambiguous(),
    );
    let mut o = Atom14Positions {
        atom14_gt_exists: vec![0.0; l * 14],
        atom14_gt_positions: vec![0.0; l * 42],
        atom14_alt_gt_positions: vec![0.0; l * 42],
        atom14_alt_gt_exists: vec![0.0; l * 14],
        atom14_atom_is_ambiguous: vec![0.0; l * 14],
    };
    for (i, &a) in aatype.iter().enumerate() {
        let r = (a as usize).min(20);
        for s in 0..14 {
            let a37 = to37[r][s];
            let m = m14[r][s] as f64 * mask37[i * 37 + a37];
            o.atom14_gt_exists[i * 14 + s] = m;
            for c in 0..3 {
                o.atom14_gt_positions[(i * 14 + s) * 3 + c] = m * pos37[(i * 37 + a37) * 3 + c];
            }
            o.atom14_atom_is_ambiguous[i * 14 + s] = amb[r][s] as f64;
        }
        for (s, &t) in swap[r].iter().enumerate() {
            o.atom14_alt_gt_exists[i * 14 + s] = o.atom14_gt_exists[i * 14 + t];
            for c in 0..3 {
                o.atom14_alt_gt_positions[(i * 14 + s) * 3 + c] =
                    o.atom14_gt_positions[(i * 14 + t) * 3 + c];
            }
        }
    }
    o
}

type V3 = [f64; 3];
/// Rotation (row-major 3×3) and translation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rigid {
    pub rot: [[f64; 3]; 3],
    pub trans: V3,
}

impl Rigid {
    /// OpenFold `Rigid.from_3_points(p_neg_x_axis, origin, p_xy_plane, eps)` (Gram–Schmidt, AF2
    /// suppl. Algorithm 21 with the x axis pointing from `p_neg_x_axis` to `origin`).
    pub fn from_3_points(p_neg_x: V3, origin: V3, p_xy: V3, eps: f64) -> Rigid {
        let mut e0 = [
            origin[0] - p_neg_x[0],
            origin[1] - p_neg_x[1],
            origin[2] - p_neg_x[2],
        ];
        let mut e1 = [
            p_xy[0] - origin[0],
            p_xy[1] - origin[1],
            p_xy[2] - origin[2],
        ];
        let d0 = (e0[0] * e0[0] + e0[1] * e0[1] + e0[2] * e0[2] + eps).sqrt();
        e0 = [e0[0] / d0, e0[1] / d0, e0[2] / d0];
        let dot = e0[0] * e1[0] + e0[1] * e1[1] + e0[2] * e1[2];
        e1 = [
            e1[0] - e0[0] * dot,
            e1[1] - e0[1] * dot,
            e1[2] - e0[2] * dot,
        ];
        let d1 = (e1[0] * e1[0] + e1[1] * e1[1] + e1[2] * e1[2] + eps).sqrt();
        e1 = [e1[0] / d1, e1[1] / d1, e1[2] / d1];
        let e2 = [
            e0[1] * e1[2] - e0[2] * e1[1],
            e0[2] * e1[0] - e0[0] * e1[2],
            e0[0] * e1[1] - e0[1] * e1[0],
        ];
        // Columns are e0, e1, e2.
        let rot = [
            [e0[0], e1[0], e2[0]],
            [e0[1], e1[1], e2[1]],
            [e0[2], e1[2], e2[2]],
        ];
        Rigid { rot, trans: origin }
    }

    /// `R · diag-like m` (right-multiply the rotation; translation unchanged), OpenFold
    /// `compose(Rigid(rots, None))`.
    pub fn compose_rot(&self, m: &[[f64; 3]; 3]) -> Rigid {
        let a = &self.rot;
        let mut rot = [[0.0; 3]; 3];
        for (i, row) in rot.iter_mut().enumerate() {
            for (j, v) in row.iter_mut().enumerate() {
                *v = a[i][0] * m[0][j] + a[i][1] * m[1][j] + a[i][2] * m[2][j];
            }
        }
        Rigid {
            rot,
            trans: self.trans,
        }
    }

    /// `invert().apply(p)` in OpenFold's order: `Rᵀp + (−Rᵀt)`.
    pub fn invert_apply(&self, p: V3) -> V3 {
        let r = &self.rot;
        let rt = |v: V3| -> V3 {
            [
                r[0][0] * v[0] + r[1][0] * v[1] + r[2][0] * v[2],
                r[0][1] * v[0] + r[1][1] * v[1] + r[2][1] * v[2],
                r[0][2] * v[0] + r[1][2] * v[1] + r[2][2] * v[2],
            ]
        };
        let a = rt(p);
        let b = rt(self.trans);
        [a[0] + -b[0], a[1] + -b[1], a[2] + -b[2]]
    }

    /// 4×4 homogeneous matrix, row-major 16 values.
    pub fn to_4x4(&self) -> [f64; 16] {
        let r = &self.rot;
        let t = &self.trans;
        [
            r[0][0], r[0][1], r[0][2], t[0], r[1][0], r[1][1], r[1][2], t[1], r[2][0], r[2][1],
            r[2][2], t[2], 0.0, 0.0, 0.0, 1.0,
        ]
    }
}

fn p3(pos37: &[f64], i: usize, a: usize) -> V3 {
    let k = (i * 37 + a) * 3;
    [pos37[k], pos37[k + 1], pos37[k + 2]]
}

/// Rigid-group ground-truth frames (`atom37_to_frames`).
#[derive(Debug, Clone, PartialEq)]
pub struct GroupFrames {
    /// `[L,8,4,4]`
    pub rigidgroups_gt_frames: Vec<f64>,
    /// `[L,8]`
    pub rigidgroups_gt_exists: Vec<f64>,
    pub rigidgroups_group_exists: Vec<f64>,
    pub rigidgroups_group_is_ambiguous: Vec<f64>,
    /// `[L,8,4,4]`
    pub rigidgroups_alt_gt_frames: Vec<f64>,
}

impl GroupFrames {
    /// `get_backbone_frames`: group 0 frames `[L,4,4]` and mask `[L]`.
    pub fn backbone(&self) -> (Vec<f64>, Vec<f64>) {
        let l = self.rigidgroups_gt_exists.len() / 8;
        let mut t = Vec::with_capacity(l * 16);
        let mut m = Vec::with_capacity(l);
        for i in 0..l {
            t.extend_from_slice(&self.rigidgroups_gt_frames[i * 128..i * 128 + 16]);
            m.push(self.rigidgroups_gt_exists[i * 8]);
        }
        (t, m)
    }
}

/// `atom37_to_frames`: each group's frame from its 3 base atoms (`from_3_points(p_neg_x=a0,
/// origin=a1, p_xy=a2)`; the backbone group is composed with diag(−1, 1, −1) so x points CA→C), the group mask and the alternative frames
/// of ambiguous groups (rotated 180° about x).
pub fn atom37_to_frames(aatype: &[u8], pos37: &[f64], mask37: &[f64]) -> GroupFrames {
    let l = aatype.len();
    let base = rc::restype_rigidgroup_base();
    let flip = [[-1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, -1.0]];
    let mut o = GroupFrames {
        rigidgroups_gt_frames: vec![0.0; l * 128],
        rigidgroups_gt_exists: vec![0.0; l * 8],
        rigidgroups_group_exists: vec![0.0; l * 8],
        rigidgroups_group_is_ambiguous: vec![0.0; l * 8],
        rigidgroups_alt_gt_frames: vec![0.0; l * 128],
    };
    for (i, &a) in aatype.iter().enumerate() {
        let r = (a as usize).min(20);
        for g in 0..8 {
            let idx = base.atom37_idx[r][g];
            let mut f = Rigid::from_3_points(
                p3(pos37, i, idx[0]),
                p3(pos37, i, idx[1]),
                p3(pos37, i, idx[2]),
                1e-8,
            );
            if g == 0 {
                f = f.compose_rot(&flip);
            }
            let amb = base.ambiguity_rots[r][g].map(|row| row.map(f64::from));
            let alt = f.compose_rot(&amb);
            let k = (i * 8 + g) * 16;
            o.rigidgroups_gt_frames[k..k + 16].copy_from_slice(&f.to_4x4());
            o.rigidgroups_alt_gt_frames[k..k + 16].copy_from_slice(&alt.to_4x4());
            let gm = base.mask[r][g] as f64;
            let atoms = idx
                .iter()
                .map(|&x| mask37[i * 37 + x])
                .fold(f64::INFINITY, f64::min);
            o.rigidgroups_gt_exists[i * 8 + g] = atoms * gm;
            o.rigidgroups_group_exists[i * 8 + g] = gm;
            o.rigidgroups_group_is_ambiguous[i * 8 + g] = base.is_ambiguous[r][g] as f64;
        }
    }
    o
}

/// Torsion angles (`atom37_to_torsion_angles`): pre-ω, φ, ψ, χ1..χ4 as (sin, cos).
#[derive(Debug, Clone, PartialEq)]
pub struct Torsions {
    /// `[L,7,2]`
    pub torsion_angles_sin_cos: Vec<f64>,
    /// `[L,7,2]` with π-periodic chis mirrored.
    pub alt_torsion_angles_sin_cos: Vec<f64>,
    /// `[L,7]`
    pub torsion_angles_mask: Vec<f64>,
}

impl Torsions {
    /// `get_chi_angles`: `[L,4,2]` sin/cos and `[L,4]` mask.
    pub fn chi(&self) -> (Vec<f64>, Vec<f64>) {
        let l = self.torsion_angles_mask.len() / 7;
        let mut sc = Vec::with_capacity(l * 8);
        let mut m = Vec::with_capacity(l * 4);
        for i in 0..l {
            sc.extend_from_slice(&self.torsion_angles_sin_cos[i * 14 + 6..i * 14 + 14]);
            m.extend_from_slice(&self.torsion_angles_mask[i * 7 + 3..i * 7 + 7]);
        }
        (sc, m)
    }
}

/// `atom37_to_torsion_angles` (AF2 suppl. Algorithm 24 inputs, section 1.9.1).
pub fn atom37_to_torsion_angles(aatype: &[u8], pos37: &[f64], mask37: &[f64]) -> Torsions {
    let l = aatype.len();
    let chi_idx = rc::chi_atom_indices();
    let chi_mask = rc::chi_angles_mask();
    let mut o = Torsions {
        torsion_angles_sin_cos: vec![0.0; l * 14],
        alt_torsion_angles_sin_cos: vec![0.0; l * 14],
        torsion_angles_mask: vec![0.0; l * 7],
    };
    let zero = [0.0; 3];
    let m = |i: usize, a: usize| mask37[i * 37 + a];
    for (i, &a) in aatype.iter().enumerate() {
        let r = (a as usize).min(20);
        let prev = |at: usize| if i == 0 { zero } else { p3(pos37, i - 1, at) };
        let pm = |at: usize| if i == 0 { 0.0 } else { m(i - 1, at) };
        let cur = |at: usize| p3(pos37, i, at);
        let mut atoms: [[V3; 4]; 7] = [[zero; 4]; 7];
        let mut mask = [0.0f64; 7];
        atoms[0] = [prev(1), prev(2), cur(0), cur(1)];
        atoms[1] = [prev(2), cur(0), cur(1), cur(2)];
        atoms[2] = [cur(0), cur(1), cur(2), cur(4)];
        mask[0] = (pm(1) * pm(2)) * (m(i, 0) * m(i, 1));
        mask[1] = pm(2) * (m(i, 0) * m(i, 1) * m(i, 2));
        mask[2] = (m(i, 0) * m(i, 1) * m(i, 2)) * m(i, 4);
        for k in 0..4 {
            let ids = chi_idx[r][k];
            atoms[3 + k] = [cur(ids[0]), cur(ids[1]), cur(ids[2]), cur(ids[3])];
            let am = m(i, ids[0]) * m(i, ids[1]) * m(i, ids[2]) * m(i, ids[3]);
            mask[3 + k] = chi_mask[r][k] as f64 * am;
        }
        for t in 0..7 {
            let [p0, p1, p2, p3v] = atoms[t];
            let f = Rigid::from_3_points(p1, p2, p0, 1e-8);
            let rel = f.invert_apply(p3v);
            let (s, c) = (rel[2], rel[1]);
            let denom = (s * s + c * c + 1e-8).sqrt();
            let sign = if t == 2 { -1.0 } else { 1.0 };
            let (s, c) = (s / denom * sign, c / denom * sign);
            o.torsion_angles_sin_cos[i * 14 + t * 2] = s;
            o.torsion_angles_sin_cos[i * 14 + t * 2 + 1] = c;
            let mirror = if t >= 3 {
                1.0 - 2.0 * rc::CHI_PI_PERIODIC[r][t - 3] as f64
            } else {
                1.0
            };
            o.alt_torsion_angles_sin_cos[i * 14 + t * 2] = s * mirror;
            o.alt_torsion_angles_sin_cos[i * 14 + t * 2 + 1] = c * mirror;
            o.torsion_angles_mask[i * 7 + t] = mask[t];
        }
    }
    o
}

/// `make_pseudo_beta`: CB (CA for glycine) positions `[L,3]` and mask `[L]`.
pub fn pseudo_beta(aatype: &[u8], pos37: &[f64], mask37: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let gly = rc::restype_order('G').unwrap_or(7) as u8;
    let (ca, cb) = (1, 3);
    let mut p = Vec::with_capacity(aatype.len() * 3);
    let mut m = Vec::with_capacity(aatype.len());
    for (i, &a) in aatype.iter().enumerate() {
        let at = if a == gly { ca } else { cb };
        p.extend_from_slice(&p3(pos37, i, at));
        m.push(mask37[i * 37 + at]);
    }
    (p, m)
}

/// `atom14_to_atom37`: scatter atom14 positions `[L,14,3]` back to atom37 `[L,37,3]`, zero where
/// the residue type lacks the atom.
pub fn atom14_to_atom37(aatype: &[u8], pos14: &[f64]) -> Vec<f64> {
    let (to14, m37) = (rc::restype_atom37_to_atom14(), rc::restype_atom37_mask());
    let mut out = vec![0.0; aatype.len() * 111];
    for (i, &a) in aatype.iter().enumerate() {
        let r = (a as usize).min(20);
        for k in 0..37 {
            let m = m37[r][k] as f64;
            let s = to14[r][k];
            for c in 0..3 {
                out[(i * 37 + k) * 3 + c] = pos14[(i * 14 + s) * 3 + c] * m;
            }
        }
    }
    out
}
