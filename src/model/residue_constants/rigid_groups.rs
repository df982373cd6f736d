//! Rigid groups (AF2 supplement 1.8, Table 2): the idealised literature atom positions of every
//! residue, each atom's rigid group (0 backbone, 1 pre-omega, 2 phi, 3 psi, 4..7 chi1..chi4), and the
//! default frames of each group relative to its parent (backbone for 0..4, chi(k-1) for chi k),
//! built from those positions as AF2 does (`_make_rigid_group_constants`).

use std::sync::OnceLock;

use super::alphabet::{RESNAMES, RESTYPE_NUM, RESTYPE_NUM_WITH_X};
use super::atoms::{
    atom14_index, atom_order, chi_angles_mask, ATOM14_NUM, ATOM_TYPE_NUM, CHI_ANGLES_ATOMS,
    RESIDUE_ATOM_RENAMING_SWAPS,
};

/// Number of rigid groups per residue.
pub const RIGID_GROUP_NUM: usize = 8;

/// Idealised atom positions per restype (AF2 order, UNK has none): `(atom name, rigid group, xyz)`,
/// xyz in Å in the coordinate frame of the atom's rigid group (backbone group: CA at the origin, C
/// on +x, N in the xy plane; group 3: psi frame; groups 4..7: chi frames). Values are the
/// Engh & Huber (1991) idealised geometry as tabulated in AlphaFold2's `residue_constants.py`
/// (`rigid_group_atom_positions`, Jumper et al. 2021, suppl. Table 2 / section 1.8).
pub const RIGID_GROUP_ATOM_POSITIONS: [&[(&str, usize, [f64; 3])]; RESTYPE_NUM] = [
    // ALA
    &[
        ("N", 0, [-0.525, 1.363, 0.0]),
        ("CA", 0, [0.0, 0.0, 0.0]),
        ("C", 0, [1.526, 0.0, 0.0]),
        ("CB", 0, [-0.529, -0.774, -1.205]),
        ("O", 3, [0.627, 1.062, 0.0]),
    ],
    // ARG
    &[
        ("N", 0, [-0.524, 1.362, 0.0]),
        ("CA", 0, [0.0, 0.0, 0.0]),
        ("C", 0, [1.525, 0.0, 0.0]),
        ("CB", 0, [-0.524, -0.778, -1.209]),
        ("O", 3, [0.626, 1.062, 0.0]),
        ("CG", 4, [0.616, 1.390, 0.0]),
        ("CD", 5, [0.564, 1.414, 0.0]),
        ("NE", 6, [0.539, 1.357, 0.0]),
        ("NH1", 7, [0.206, 2.301, 0.0]),
        ("NH2", 7, [2.078, 0.978, 0.0]),
        ("CZ", 7, [0.758, 1.093, 0.0]),
    ],
    // ASN
    &[
        ("N", 0, [-0.536, 1.357, 0.0]),
        ("CA", 0, [0.0, 0.0, 0.0]),
        ("C", 0, [1.526, 0.0, 0.0]),
        ("CB", 0, [-0.531, -0.787, -1.200]),
        ("O", 3, [0.625, 1.062, 0.0]),
        ("CG", 4, [0.584, 1.399, 0.0]),
        ("ND2", 5, [0.593, -1.188, 0.001]),
        ("OD1", 5, [0.633, 1.059, 0.0]),
    ],
    // ASP
    &[
        ("N", 0, [-0.525, 1.362, 0.0]),
        ("CA", 0, [0.0, 0.0, 0.0]),
        ("C", 0, [1.527, 0.0, 0.0]),
        ("CB", 0, [-0.526, -0.778, -1.208]),
        ("O", 3, [0.626, 1.062, 0.0]),
        ("CG", 4, [0.593, 1.398, 0.0]),
        ("OD1", 5, [0.610, 1.091, 0.0]),
        ("OD2", 5, [0.592, -1.101, -0.003]),
    ],
    // CYS
    &[
        ("N", 0, [-0.522, 1.362, 0.0]),
        ("CA", 0, [0.0, 0.0, 0.0]),
        ("C", 0, [1.524, 0.0, 0.0]),
        ("CB", 0, [-0.519, -0.773, -1.212]),
        ("O", 3, [0.625, 1.062, 0.0]),
        ("SG", 4, [0.728, 1.653, 0.0]),
    ],
    // GLN
    &[
        ("N", 0, [-0.526, 1.361, 0.0]),
        ("CA", 0, [0.0, 0.0, 0.0]),
        ("C", 0, [1.526, 0.0, 0.0]),
        ("CB", 0, [-0.525, -0.779, -1.207]),
        ("O", 3, [0.626, 1.062, 0.0]),
        ("CG", 4, [0.615, 1.393, 0.0]),
        ("CD", 5, [0.587, 1.399, 0.0]),
        ("NE2", 6, [0.593, -1.189, -0.001]),
        ("OE1", 6, [0.634, 1.060, 0.0]),
    ],
    // GLU
    &[
        ("N", 0, [-0.528, 1.361, 0.0]),
        ("CA", 0, [0.0, 0.0, 0.0]),
        ("C", 0, [1.526, 0.0, 0.0]),
        ("CB", 0, [-0.526, -0.781, -1.207]),
        ("O", 3, [0.626, 1.062, 0.0]),
        ("CG", 4, [0.615, 1.392, 0.0]),
        ("CD", 5, [0.600, 1.397, 0.0]),
        ("OE1", 6, [0.607, 1.095, 0.0]),
        ("OE2", 6, [0.589, -1.104, -0.001]),
    ],
    // GLY
    &[
        ("N", 0, [-0.572, 1.337, 0.0]),
        ("CA", 0, [0.0, 0.0, 0.0]),
        ("C", 0, [1.517, 0.0, 0.0]),
        ("O", 3, [0.626, 1.062, 0.0]),
    ],
    // HIS
    &[
        ("N", 0, [-0.527, 1.360, 0.0]),
        ("CA", 0, [0.0, 0.0, 0.0]),
        ("C", 0, [1.525, 0.0, 0.0]),
        ("CB", 0, [-0.525, -0.778, -1.208]),
        ("O", 3, [0.625, 1.063, 0.0]),
        ("CG", 4, [0.600, 1.370, 0.0]),
        ("CD2", 5, [0.889, -1.021, 0.003]),
        ("ND1", 5, [0.744, 1.160, 0.0]),
        ("CE1", 5, [2.030, 0.851, 0.002]),
        ("NE2", 5, [2.145, -0.466, 0.004]),
    ],
    // ILE
    &[
        ("N", 0, [-0.493, 1.373, 0.0]),
        ("CA", 0, [0.0, 0.0, 0.0]),
        ("C", 0, [1.527, 0.0, 0.0]),
        ("CB", 0, [-0.536, -0.793, -1.213]),
        ("O", 3, [0.627, 1.062, 0.0]),
        ("CG1", 4, [0.534, 1.437, 0.0]),
        ("CG2", 4, [0.540, -0.785, -1.199]),
        ("CD1", 5, [0.619, 1.391, 0.0]),
    ],
    // LEU
    &[
        ("N", 0, [-0.520, 1.363, 0.0]),
        ("CA", 0, [0.0, 0.0, 0.0]),
        ("C", 0, [1.525, 0.0, 0.0]),
        ("CB", 0, [-0.522, -0.773, -1.214]),
        ("O", 3, [0.625, 1.063, 0.0]),
        ("CG", 4, [0.678, 1.371, 0.0]),
        ("CD1", 5, [0.530, 1.430, 0.0]),
        ("CD2", 5, [0.535, -0.774, 1.200]),
    ],
    // LYS
    &[
        ("N", 0, [-0.526, 1.362, 0.0]),
        ("CA", 0, [0.0, 0.0, 0.0]),
        ("C", 0, [1.526, 0.0, 0.0]),
        ("CB", 0, [-0.524, -0.778, -1.208]),
        ("O", 3, [0.626, 1.062, 0.0]),
        ("CG", 4, [0.619, 1.390, 0.0]),
        ("CD", 5, [0.559, 1.417, 0.0]),
        ("CE", 6, [0.560, 1.416, 0.0]),
        ("NZ", 7, [0.554, 1.387, 0.0]),
    ],
    // MET
    &[
        ("N", 0, [-0.521, 1.364, 0.0]),
        ("CA", 0, [0.0, 0.0, 0.0]),
        ("C", 0, [1.525, 0.0, 0.0]),
        ("CB", 0, [-0.523, -0.776, -1.210]),
        ("O", 3, [0.625, 1.062, 0.0]),
        ("CG", 4, [0.613, 1.391, 0.0]),
        ("SD", 5, [0.703, 1.695, 0.0]),
        ("CE", 6, [0.320, 1.786, 0.0]),
    ],
    // PHE
    &[
        ("N", 0, [-0.518, 1.363, 0.0]),
        ("CA", 0, [0.0, 0.0, 0.0]),
        ("C", 0, [1.524, 0.0, 0.0]),
        ("CB", 0, [-0.525, -0.776, -1.212]),
        ("O", 3, [0.626, 1.062, 0.0]),
        ("CG", 4, [0.607, 1.377, 0.0]),
        ("CD1", 5, [0.709, 1.195, 0.0]),
        ("CD2", 5, [0.706, -1.196, 0.0]),
        ("CE1", 5, [2.102, 1.198, 0.0]),
        ("CE2", 5, [2.098, -1.201, 0.0]),
        ("CZ", 5, [2.794, -0.003, -0.001]),
    ],
    // PRO
    &[
        ("N", 0, [-0.566, 1.351, 0.0]),
        ("CA", 0, [0.0, 0.0, 0.0]),
        ("C", 0, [1.527, 0.0, 0.0]),
        ("CB", 0, [-0.546, -0.611, -1.293]),
        ("O", 3, [0.621, 1.066, 0.0]),
        ("CG", 4, [0.382, 1.445, 0.0]),
        ("CD", 5, [0.477, 1.424, 0.0]),
    ],
    // SER
    &[
        ("N", 0, [-0.529, 1.360, 0.0]),
        ("CA", 0, [0.0, 0.0, 0.0]),
        ("C", 0, [1.525, 0.0, 0.0]),
        ("CB", 0, [-0.518, -0.777, -1.211]),
        ("O", 3, [0.626, 1.062, 0.0]),
        ("OG", 4, [0.503, 1.325, 0.0]),
    ],
    // THR
    &[
        ("N", 0, [-0.517, 1.364, 0.0]),
        ("CA", 0, [0.0, 0.0, 0.0]),
        ("C", 0, [1.526, 0.0, 0.0]),
        ("CB", 0, [-0.516, -0.793, -1.215]),
        ("O", 3, [0.626, 1.062, 0.0]),
        ("CG2", 4, [0.550, -0.718, -1.228]),
        ("OG1", 4, [0.472, 1.353, 0.0]),
    ],
    // TRP
    &[
        ("N", 0, [-0.521, 1.363, 0.0]),
        ("CA", 0, [0.0, 0.0, 0.0]),
        ("C", 0, [1.525, 0.0, 0.0]),
        ("CB", 0, [-0.523, -0.776, -1.212]),
        ("O", 3, [0.627, 1.062, 0.0]),
        ("CG", 4, [0.609, 1.370, 0.0]),
        ("CD1", 5, [0.824, 1.091, 0.0]),
        ("CD2", 5, [0.854, -1.148, -0.005]),
        ("CE2", 5, [2.186, -0.678, -0.007]),
        ("CE3", 5, [0.622, -2.530, -0.007]),
        ("NE1", 5, [2.140, 0.690, -0.004]),
        ("CH2", 5, [3.028, -2.890, -0.013]),
        ("CZ2", 5, [3.283, -1.543, -0.011]),
        ("CZ3", 5, [1.715, -3.389, -0.011]),
    ],
    // TYR
    &[
        ("N", 0, [-0.522, 1.362, 0.0]),
        ("CA", 0, [0.0, 0.0, 0.0]),
        ("C", 0, [1.524, 0.0, 0.0]),
        ("CB", 0, [-0.522, -0.776, -1.213]),
        ("O", 3, [0.627, 1.062, 0.0]),
        ("CG", 4, [0.607, 1.382, 0.0]),
        ("CD1", 5, [0.716, 1.195, 0.0]),
        ("CD2", 5, [0.713, -1.194, -0.001]),
        ("CE1", 5, [2.107, 1.200, -0.002]),
        ("CE2", 5, [2.104, -1.201, -0.003]),
        ("OH", 5, [4.168, -0.002, -0.005]),
        ("CZ", 5, [2.791, -0.001, -0.003]),
    ],
    // VAL
    &[
        ("N", 0, [-0.494, 1.373, 0.0]),
        ("CA", 0, [0.0, 0.0, 0.0]),
        ("C", 0, [1.527, 0.0, 0.0]),
        ("CB", 0, [-0.533, -0.795, -1.213]),
        ("O", 3, [0.627, 1.062, 0.0]),
        ("CG1", 4, [0.540, 1.429, 0.0]),
        ("CG2", 4, [0.533, -0.776, 1.203]),
    ],
];

type Table14<T> = [[T; ATOM14_NUM]; RESTYPE_NUM_WITH_X];
type Table37<T> = [[T; ATOM_TYPE_NUM]; RESTYPE_NUM_WITH_X];
/// `[restype][group]` 4×4 homogeneous transforms (row-major, last row `0 0 0 1`).
pub type DefaultFrames = [[[[f32; 4]; 4]; RIGID_GROUP_NUM]; RESTYPE_NUM_WITH_X];

/// Literature position of `name` in restype `r` (f64, as written in the table).
pub fn literature_position(r: usize, name: &str) -> Option<[f64; 3]> {
    RIGID_GROUP_ATOM_POSITIONS
        .get(r)?
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|&(_, _, p)| p)
}

struct AtomTables {
    to_group14: Table14<usize>,
    to_group37: Table37<usize>,
    pos14: Table14<[f32; 3]>,
    pos37: Table37<[f32; 3]>,
}

fn atom_tables() -> &'static AtomTables {
    static CELL: OnceLock<AtomTables> = OnceLock::new();
    CELL.get_or_init(|| {
        let mut t = AtomTables {
            to_group14: [[0; ATOM14_NUM]; RESTYPE_NUM_WITH_X],
            to_group37: [[0; ATOM_TYPE_NUM]; RESTYPE_NUM_WITH_X],
            pos14: [[[0.0; 3]; ATOM14_NUM]; RESTYPE_NUM_WITH_X],
            pos37: [[[0.0; 3]; ATOM_TYPE_NUM]; RESTYPE_NUM_WITH_X],
        };
        for (r, atoms) in RIGID_GROUP_ATOM_POSITIONS.iter().enumerate() {
            for &(name, group, p) in atoms.iter() {
                let p32 = [p[0] as f32, p[1] as f32, p[2] as f32];
                // Every name in the table is an atom37 type and an atom14 slot of its residue
                // (checked by the unit tests); anything else is skipped.
                if let Some(a) = atom_order(name) {
                    t.to_group37[r][a] = group;
                    t.pos37[r][a] = p32;
                }
                if let Some(i) = atom14_index(r, name) {
                    t.to_group14[r][i] = group;
                    t.pos14[r][i] = p32;
                }
            }
        }
        t
    })
}

/// Rigid group (0..8) of each atom14 slot (empty slots and UNK: 0).
pub fn restype_atom14_to_rigid_group() -> &'static Table14<usize> {
    &atom_tables().to_group14
}

/// Rigid group (0..8) of each atom37 atom (absent atoms and UNK: 0).
pub fn restype_atom37_to_rigid_group() -> &'static Table37<usize> {
    &atom_tables().to_group37
}

/// Literature positions per atom14 slot in its group's frame, float32 as in AF2 (empty: 0).
pub fn restype_atom14_rigid_group_positions() -> &'static Table14<[f32; 3]> {
    &atom_tables().pos14
}

/// Literature positions per atom37 atom in its group's frame, float32 as in AF2 (absent: 0).
pub fn restype_atom37_rigid_group_positions() -> &'static Table37<[f32; 3]> {
    &atom_tables().pos37
}

fn sub(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [a[0] - b[0], a[1] - b[1], a[2] - b[2]]
}

fn dot(a: [f64; 3], b: [f64; 3]) -> f64 {
    a[0] * b[0] + a[1] * b[1] + a[2] * b[2]
}

fn scale(a: [f64; 3], s: f64) -> [f64; 3] {
    [a[0] * s, a[1] * s, a[2] * s]
}

fn cross(a: [f64; 3], b: [f64; 3]) -> [f64; 3] {
    [
        a[1] * b[2] - a[2] * b[1],
        a[2] * b[0] - a[0] * b[2],
        a[0] * b[1] - a[1] * b[0],
    ]
}

/// Rigid transform whose x axis points along `ex`, whose y axis lies in the plane of `ex` and `ey`
/// (on `ey`'s side), z = x × y, translated by `translation`; Gram–Schmidt as in AF2 suppl. Alg. 21
/// (rigidFrom3Points) and the default-frame construction of section 1.8.
pub fn frame_from_axes(ex: [f64; 3], ey: [f64; 3], translation: [f64; 3]) -> [[f64; 4]; 4] {
    let x = scale(ex, 1.0 / dot(ex, ex).sqrt());
    let y = sub(ey, scale(x, dot(ey, x)));
    let y = scale(y, 1.0 / dot(y, y).sqrt());
    let z = cross(x, y);
    let mut m = [[0.0; 4]; 4];
    for i in 0..3 {
        // Columns are the basis vectors and the translation.
        m[i] = [x[i], y[i], z[i], translation[i]];
    }
    m[3] = [0.0, 0.0, 0.0, 1.0];
    m
}

fn identity4() -> [[f64; 4]; 4] {
    let mut m = [[0.0; 4]; 4];
    for (i, row) in m.iter_mut().enumerate() {
        row[i] = 1.0;
    }
    m
}

/// Default frame of each rigid group relative to its parent group, float32 as in AF2:
/// group 0 (backbone) and 1 (pre-omega) identity; 2 (phi) x along CA→N at N with the xy plane
/// spanned with +x of the backbone; 3 (psi) x along CA→C at C with N→CA in the xy plane; 4 (chi1) x
/// along CA→CB at CB with N in the xy plane; chi2..4 relative to the previous chi frame, x along
/// the axis-end atom (that frame's origin is the previous axis end) with −x of the parent in the
/// xy plane. Groups a residue lacks, and all of UNK, are zero matrices (as in OpenFold).
pub fn restype_rigid_group_default_frame() -> &'static DefaultFrames {
    static CELL: OnceLock<DefaultFrames> = OnceLock::new();
    CELL.get_or_init(|| {
        let mut out = [[[[0.0f32; 4]; 4]; RIGID_GROUP_NUM]; RESTYPE_NUM_WITH_X];
        let chi_mask = chi_angles_mask();
        for r in 0..RESTYPE_NUM {
            let pos = |name: &str| literature_position(r, name).unwrap_or([0.0; 3]);
            let mut frames = [[[0.0f64; 4]; 4]; RIGID_GROUP_NUM];
            frames[0] = identity4();
            frames[1] = identity4();
            frames[2] = frame_from_axes(sub(pos("N"), pos("CA")), [1.0, 0.0, 0.0], pos("N"));
            frames[3] =
                frame_from_axes(sub(pos("C"), pos("CA")), sub(pos("CA"), pos("N")), pos("C"));
            let chis = CHI_ANGLES_ATOMS[r];
            if chi_mask[r][0] > 0.0 {
                let [a0, a1, a2, _] = chis[0].map(pos);
                frames[4] = frame_from_axes(sub(a2, a1), sub(a0, a1), a2);
            }
            for k in 1..4 {
                if chi_mask[r][k] > 0.0 {
                    let end = pos(chis[k][2]);
                    frames[4 + k] = frame_from_axes(end, [-1.0, 0.0, 0.0], end);
                }
            }
            for (o, f) in out[r].iter_mut().zip(frames.iter()) {
                for (orow, frow) in o.iter_mut().zip(f.iter()) {
                    for (ov, fv) in orow.iter_mut().zip(frow.iter()) {
                        *ov = *fv as f32;
                    }
                }
            }
        }
        out
    })
}

/// Per-group tables used to build ground-truth frames from atom37 positions (OpenFold
/// `atom37_to_frames`, AF2 suppl. Alg. 24 inputs).
pub struct RigidGroupBase {
    /// Names of the 3 atoms defining each group frame `[p_neg_x... ]`: group 0 `[C, CA, N]`,
    /// group 3 `[CA, C, O]`, chi k: atoms 1..4 of the chi; `""` where the group does not exist.
    pub atom_names: [[[&'static str; 3]; RIGID_GROUP_NUM]; RESTYPE_NUM_WITH_X],
    /// The same atoms as atom37 indices (0 where absent).
    pub atom37_idx: [[[usize; 3]; RIGID_GROUP_NUM]; RESTYPE_NUM_WITH_X],
    /// 1.0 where the group exists: groups 0 and 3 for all 21 restypes (OpenFold includes UNK),
    /// chi groups per [`chi_angles_mask`]; groups 1 and 2 are never built from atoms.
    pub mask: [[f32; RIGID_GROUP_NUM]; RESTYPE_NUM_WITH_X],
    /// 1.0 for the last chi group of residues with ambiguous atoms (ASP, GLU, PHE, TYR).
    pub is_ambiguous: [[f32; RIGID_GROUP_NUM]; RESTYPE_NUM_WITH_X],
    /// Rotation applied to get the alternative (renamed) frame: identity, or diag(1, −1, −1) for
    /// ambiguous groups (a 180° turn about x).
    pub ambiguity_rots: [[[[f32; 3]; 3]; RIGID_GROUP_NUM]; RESTYPE_NUM_WITH_X],
}

/// Rigid-group base atoms, masks and ambiguity (built once).
pub fn restype_rigidgroup_base() -> &'static RigidGroupBase {
    static CELL: OnceLock<RigidGroupBase> = OnceLock::new();
    CELL.get_or_init(|| {
        let mut b = RigidGroupBase {
            atom_names: [[[""; 3]; RIGID_GROUP_NUM]; RESTYPE_NUM_WITH_X],
            atom37_idx: [[[0; 3]; RIGID_GROUP_NUM]; RESTYPE_NUM_WITH_X],
            mask: [[0.0; RIGID_GROUP_NUM]; RESTYPE_NUM_WITH_X],
            is_ambiguous: [[0.0; RIGID_GROUP_NUM]; RESTYPE_NUM_WITH_X],
            ambiguity_rots: [[[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]; RIGID_GROUP_NUM];
                RESTYPE_NUM_WITH_X],
        };
        let chi_mask = chi_angles_mask();
        for r in 0..RESTYPE_NUM_WITH_X {
            b.atom_names[r][0] = ["C", "CA", "N"];
            b.atom_names[r][3] = ["CA", "C", "O"];
            b.mask[r][0] = 1.0;
            b.mask[r][3] = 1.0;
            for (k, chi) in CHI_ANGLES_ATOMS[r].iter().enumerate() {
                b.atom_names[r][4 + k] = [chi[1], chi[2], chi[3]];
                b.mask[r][4 + k] = chi_mask[r][k];
            }
            for g in 0..RIGID_GROUP_NUM {
                for j in 0..3 {
                    b.atom37_idx[r][g][j] = atom_order(b.atom_names[r][g][j]).unwrap_or(0);
                }
            }
        }
        for (resname, _) in RESIDUE_ATOM_RENAMING_SWAPS.iter() {
            if let Some(r) = RESNAMES.iter().position(|n| n == resname) {
                let n_chi = CHI_ANGLES_ATOMS[r].len();
                if n_chi > 0 {
                    let g = 3 + n_chi;
                    b.is_ambiguous[r][g] = 1.0;
                    b.ambiguity_rots[r][g][1][1] = -1.0;
                    b.ambiguity_rots[r][g][2][2] = -1.0;
                }
            }
        }
        b
    })
}

#[cfg(test)]
mod tests {
    use super::super::atoms::{restype_atom14_mask, restype_atom37_mask, RESTYPE_ATOM14_NAMES};
    use super::*;

    #[test]
    fn literature_atoms_match_atom14_names() {
        let m14 = restype_atom14_mask();
        let m37 = restype_atom37_mask();
        for (r, atoms) in RIGID_GROUP_ATOM_POSITIONS.iter().enumerate() {
            let n_names = RESTYPE_ATOM14_NAMES[r]
                .iter()
                .filter(|n| !n.is_empty())
                .count();
            assert_eq!(atoms.len(), n_names, "{}", RESNAMES[r]);
            for &(name, group, _) in atoms.iter() {
                let i = atom14_index(r, name).unwrap();
                assert_eq!(m14[r][i], 1.0);
                assert_eq!(m37[r][atom_order(name).unwrap()], 1.0);
                assert!(group < RIGID_GROUP_NUM);
                if group >= 4 {
                    assert_eq!(
                        chi_angles_mask()[r][group - 4],
                        1.0,
                        "{} {name}",
                        RESNAMES[r]
                    );
                }
            }
        }
    }

    #[test]
    fn default_frames_are_rigid() {
        let frames = restype_rigid_group_default_frame();
        let mask = &restype_rigidgroup_base().mask;
        for r in 0..RESTYPE_NUM {
            for g in 0..RIGID_GROUP_NUM {
                if g != 1 && g != 2 && mask[r][g] == 0.0 {
                    continue;
                }
                let m = frames[r][g];
                let rot = |i: usize, j: usize| m[i][j] as f64;
                for i in 0..3 {
                    for j in 0..3 {
                        let d: f64 = (0..3).map(|k| rot(k, i) * rot(k, j)).sum();
                        let want = if i == j { 1.0 } else { 0.0 };
                        assert!((d - want).abs() < 1e-6, "{r} {g}: RᵀR[{i}][{j}] = {d}");
                    }
                }
                let det = rot(0, 0) * (rot(1, 1) * rot(2, 2) - rot(1, 2) * rot(2, 1))
                    - rot(0, 1) * (rot(1, 0) * rot(2, 2) - rot(1, 2) * rot(2, 0))
                    + rot(0, 2) * (rot(1, 0) * rot(2, 1) - rot(1, 1) * rot(2, 0));
                assert!((det - 1.0).abs() < 1e-6, "{r} {g}: det {det}");
                assert_eq!(m[3], [0.0, 0.0, 0.0, 1.0]);
            }
        }
    }

    #[test]
    fn frames_place_literature_atoms_consistently() {
        // The chi1 frame maps its literature CG (e.g.) to a point at the right CB–CG distance from
        // CB in backbone coordinates, and the psi frame puts O 1.23 Å from C.
        let frames = restype_rigid_group_default_frame();
        let apply = |m: &[[f32; 4]; 4], p: [f64; 3]| -> [f64; 3] {
            let mut o = [0.0; 3];
            for (i, oi) in o.iter_mut().enumerate() {
                *oi = (0..3).map(|k| m[i][k] as f64 * p[k]).sum::<f64>() + m[i][3] as f64;
            }
            o
        };
        for r in 0..RESTYPE_NUM {
            let o = apply(&frames[r][3], literature_position(r, "O").unwrap());
            let c = literature_position(r, "C").unwrap();
            let d = dot(sub(o, c), sub(o, c)).sqrt();
            assert!((d - 1.23).abs() < 0.01, "{} C-O {d}", RESNAMES[r]);
            if let Some(chi) = CHI_ANGLES_ATOMS[r].first() {
                let x = apply(&frames[r][4], literature_position(r, chi[3]).unwrap());
                let cb = literature_position(r, "CB").unwrap();
                let d = dot(sub(x, cb), sub(x, cb)).sqrt();
                assert!(d > 1.3 && d < 1.9, "{} CB-{} {d}", RESNAMES[r], chi[3]);
            }
        }
    }
}
