//! Atom naming: the 37 atom types (atom37), the dense per-residue 14-slot layout (atom14), the maps
//! and masks between them, chi-angle atoms and the ambiguous (symmetric) side-chain atoms
//! (AF2 supplement 1.2.1, 1.8.2, 1.9.3, Table 2, Alg. 26).

use std::sync::OnceLock;

use super::alphabet::{RESNAMES, RESTYPE_NUM, RESTYPE_NUM_WITH_X};

/// Number of atom types in the atom37 representation.
pub const ATOM_TYPE_NUM: usize = 37;
/// Number of slots in the dense atom14 representation.
pub const ATOM14_NUM: usize = 14;

/// The 37 heavy-atom types in AF2 order (atom37 layout).
pub const ATOM_TYPES: [&str; ATOM_TYPE_NUM] = [
    "N", "CA", "C", "CB", "O", "CG", "CG1", "CG2", "OG", "OG1", "SG", "CD", "CD1", "CD2", "ND1",
    "ND2", "OD1", "OD2", "SD", "CE", "CE1", "CE2", "CE3", "NE", "NE1", "NE2", "OE1", "OE2", "CH2",
    "NH1", "NH2", "OH", "CZ", "CZ2", "CZ3", "NZ", "OXT",
];

/// atom37 index of an atom name (`None` for names outside [`ATOM_TYPES`]).
pub fn atom_order(name: &str) -> Option<usize> {
    ATOM_TYPES.iter().position(|&a| a == name)
}

/// Per restype (UNK last, all empty) the atom names of the 14 atom14 slots; `""` = empty slot.
#[rustfmt::skip]
pub const RESTYPE_ATOM14_NAMES: [[&str; ATOM14_NUM]; RESTYPE_NUM_WITH_X] = [
    // ALA
    ["N", "CA", "C", "O", "CB", "", "", "", "", "", "", "", "", ""],
    // ARG
    ["N", "CA", "C", "O", "CB", "CG", "CD", "NE", "CZ", "NH1", "NH2", "", "", ""],
    // ASN
    ["N", "CA", "C", "O", "CB", "CG", "OD1", "ND2", "", "", "", "", "", ""],
    // ASP
    ["N", "CA", "C", "O", "CB", "CG", "OD1", "OD2", "", "", "", "", "", ""],
    // CYS
    ["N", "CA", "C", "O", "CB", "SG", "", "", "", "", "", "", "", ""],
    // GLN
    ["N", "CA", "C", "O", "CB", "CG", "CD", "OE1", "NE2", "", "", "", "", ""],
    // GLU
    ["N", "CA", "C", "O", "CB", "CG", "CD", "OE1", "OE2", "", "", "", "", ""],
    // GLY
    ["N", "CA", "C", "O", "", "", "", "", "", "", "", "", "", ""],
    // HIS
    ["N", "CA", "C", "O", "CB", "CG", "ND1", "CD2", "CE1", "NE2", "", "", "", ""],
    // ILE
    ["N", "CA", "C", "O", "CB", "CG1", "CG2", "CD1", "", "", "", "", "", ""],
    // LEU
    ["N", "CA", "C", "O", "CB", "CG", "CD1", "CD2", "", "", "", "", "", ""],
    // LYS
    ["N", "CA", "C", "O", "CB", "CG", "CD", "CE", "NZ", "", "", "", "", ""],
    // MET
    ["N", "CA", "C", "O", "CB", "CG", "SD", "CE", "", "", "", "", "", ""],
    // PHE
    ["N", "CA", "C", "O", "CB", "CG", "CD1", "CD2", "CE1", "CE2", "CZ", "", "", ""],
    // PRO
    ["N", "CA", "C", "O", "CB", "CG", "CD", "", "", "", "", "", "", ""],
    // SER
    ["N", "CA", "C", "O", "CB", "OG", "", "", "", "", "", "", "", ""],
    // THR
    ["N", "CA", "C", "O", "CB", "OG1", "CG2", "", "", "", "", "", "", ""],
    // TRP
    ["N", "CA", "C", "O", "CB", "CG", "CD1", "CD2", "NE1", "CE2", "CE3", "CZ2", "CZ3", "CH2"],
    // TYR
    ["N", "CA", "C", "O", "CB", "CG", "CD1", "CD2", "CE1", "CE2", "CZ", "OH", "", ""],
    // VAL
    ["N", "CA", "C", "O", "CB", "CG1", "CG2", "", "", "", "", "", "", ""],
    // UNK
    ["", "", "", "", "", "", "", "", "", "", "", "", "", ""],
];

/// atom14 slot of `name` in residue type `restype` (`None` if absent or empty name).
pub fn atom14_index(restype: usize, name: &str) -> Option<usize> {
    if name.is_empty() {
        return None;
    }
    RESTYPE_ATOM14_NAMES
        .get(restype)?
        .iter()
        .position(|&a| a == name)
}

/// Chi-angle defining atoms (4 names per chi) for each restype; UNK has none.
#[rustfmt::skip]
pub const CHI_ANGLES_ATOMS: [&[[&str; 4]]; RESTYPE_NUM_WITH_X] = [
    // ALA
    &[],
    // ARG
    &[["N", "CA", "CB", "CG"], ["CA", "CB", "CG", "CD"], ["CB", "CG", "CD", "NE"], ["CG", "CD", "NE", "CZ"]],
    // ASN
    &[["N", "CA", "CB", "CG"], ["CA", "CB", "CG", "OD1"]],
    // ASP
    &[["N", "CA", "CB", "CG"], ["CA", "CB", "CG", "OD1"]],
    // CYS
    &[["N", "CA", "CB", "SG"]],
    // GLN
    &[["N", "CA", "CB", "CG"], ["CA", "CB", "CG", "CD"], ["CB", "CG", "CD", "OE1"]],
    // GLU
    &[["N", "CA", "CB", "CG"], ["CA", "CB", "CG", "CD"], ["CB", "CG", "CD", "OE1"]],
    // GLY
    &[],
    // HIS
    &[["N", "CA", "CB", "CG"], ["CA", "CB", "CG", "ND1"]],
    // ILE
    &[["N", "CA", "CB", "CG1"], ["CA", "CB", "CG1", "CD1"]],
    // LEU
    &[["N", "CA", "CB", "CG"], ["CA", "CB", "CG", "CD1"]],
    // LYS
    &[["N", "CA", "CB", "CG"], ["CA", "CB", "CG", "CD"], ["CB", "CG", "CD", "CE"], ["CG", "CD", "CE", "NZ"]],
    // MET
    &[["N", "CA", "CB", "CG"], ["CA", "CB", "CG", "SD"], ["CB", "CG", "SD", "CE"]],
    // PHE
    &[["N", "CA", "CB", "CG"], ["CA", "CB", "CG", "CD1"]],
    // PRO
    &[["N", "CA", "CB", "CG"], ["CA", "CB", "CG", "CD"]],
    // SER
    &[["N", "CA", "CB", "OG"]],
    // THR
    &[["N", "CA", "CB", "OG1"]],
    // TRP
    &[["N", "CA", "CB", "CG"], ["CA", "CB", "CG", "CD1"]],
    // TYR
    &[["N", "CA", "CB", "CG"], ["CA", "CB", "CG", "CD1"]],
    // VAL
    &[["N", "CA", "CB", "CG1"]],
    // UNK
    &[],
];

/// Whether a chi angle is π-periodic (symmetric side chains: ASP chi2, GLU chi3, PHE/TYR chi2).
pub const CHI_PI_PERIODIC: [[f32; 4]; RESTYPE_NUM_WITH_X] = {
    let mut t = [[0.0f32; 4]; RESTYPE_NUM_WITH_X];
    t[3][1] = 1.0; // ASP chi2
    t[6][2] = 1.0; // GLU chi3
    t[13][1] = 1.0; // PHE chi2
    t[18][1] = 1.0; // TYR chi2
    t
};

/// Pairs of atoms whose names swap under a 180° flip of the last chi (AF2 supplement 1.8.5).
pub const RESIDUE_ATOM_RENAMING_SWAPS: [(&str, &[(&str, &str)]); 4] = [
    ("ASP", &[("OD1", "OD2")]),
    ("GLU", &[("OE1", "OE2")]),
    ("PHE", &[("CD1", "CD2"), ("CE1", "CE2")]),
    ("TYR", &[("CD1", "CD2"), ("CE1", "CE2")]),
];

fn build<T>(cell: &'static OnceLock<T>, f: impl FnOnce() -> T) -> &'static T {
    cell.get_or_init(f)
}

/// atom14 slot → atom37 index per restype (empty slots and UNK map to 0; use the mask).
pub fn restype_atom14_to_atom37() -> &'static [[usize; ATOM14_NUM]; RESTYPE_NUM_WITH_X] {
    static CELL: OnceLock<[[usize; ATOM14_NUM]; RESTYPE_NUM_WITH_X]> = OnceLock::new();
    build(&CELL, || {
        let mut t = [[0usize; ATOM14_NUM]; RESTYPE_NUM_WITH_X];
        for (row, names) in t.iter_mut().zip(RESTYPE_ATOM14_NAMES.iter()) {
            for (slot, name) in row.iter_mut().zip(names.iter()) {
                *slot = atom_order(name).unwrap_or(0);
            }
        }
        t
    })
}

/// atom37 index → atom14 slot per restype (absent atoms and UNK map to 0; use the mask).
pub fn restype_atom37_to_atom14() -> &'static [[usize; ATOM_TYPE_NUM]; RESTYPE_NUM_WITH_X] {
    static CELL: OnceLock<[[usize; ATOM_TYPE_NUM]; RESTYPE_NUM_WITH_X]> = OnceLock::new();
    build(&CELL, || {
        let mut t = [[0usize; ATOM_TYPE_NUM]; RESTYPE_NUM_WITH_X];
        for (r, row) in t.iter_mut().enumerate() {
            for (a, slot) in row.iter_mut().enumerate() {
                *slot = atom14_index(r, ATOM_TYPES[a]).unwrap_or(0);
            }
        }
        t
    })
}

/// 1.0 where the atom14 slot holds an atom of the restype (UNK: all 0). Equals AF2's
/// `restype_atom14_mask` and `atom14_atom_exists` per restype.
pub fn restype_atom14_mask() -> &'static [[f32; ATOM14_NUM]; RESTYPE_NUM_WITH_X] {
    static CELL: OnceLock<[[f32; ATOM14_NUM]; RESTYPE_NUM_WITH_X]> = OnceLock::new();
    build(&CELL, || {
        let mut t = [[0.0f32; ATOM14_NUM]; RESTYPE_NUM_WITH_X];
        for (row, names) in t.iter_mut().zip(RESTYPE_ATOM14_NAMES.iter()) {
            for (m, name) in row.iter_mut().zip(names.iter()) {
                *m = if name.is_empty() { 0.0 } else { 1.0 };
            }
        }
        t
    })
}

/// 1.0 where the restype has the atom37 atom (UNK: all 0; OXT never). Equals AF2's
/// `restype_atom37_mask` and `atom37_atom_exists` per restype.
pub fn restype_atom37_mask() -> &'static [[f32; ATOM_TYPE_NUM]; RESTYPE_NUM_WITH_X] {
    static CELL: OnceLock<[[f32; ATOM_TYPE_NUM]; RESTYPE_NUM_WITH_X]> = OnceLock::new();
    build(&CELL, || {
        let mut t = [[0.0f32; ATOM_TYPE_NUM]; RESTYPE_NUM_WITH_X];
        for (r, names) in RESTYPE_ATOM14_NAMES.iter().enumerate() {
            for name in names.iter() {
                if let Some(a) = atom_order(name) {
                    t[r][a] = 1.0;
                }
            }
        }
        t
    })
}

/// 1.0 for each chi angle the restype has (UNK row all 0; OpenFold's table has only the 20 rows).
pub fn chi_angles_mask() -> &'static [[f32; 4]; RESTYPE_NUM_WITH_X] {
    static CELL: OnceLock<[[f32; 4]; RESTYPE_NUM_WITH_X]> = OnceLock::new();
    build(&CELL, || {
        let mut t = [[0.0f32; 4]; RESTYPE_NUM_WITH_X];
        for (row, chis) in t.iter_mut().zip(CHI_ANGLES_ATOMS.iter()) {
            for m in row.iter_mut().take(chis.len()) {
                *m = 1.0;
            }
        }
        t
    })
}

/// atom37 indices of the 4 atoms of each chi angle per restype; absent chis (and UNK) are
/// `[0, 0, 0, 0]` (OpenFold `get_chi_atom_indices`).
pub fn chi_atom_indices() -> &'static [[[usize; 4]; 4]; RESTYPE_NUM_WITH_X] {
    static CELL: OnceLock<[[[usize; 4]; 4]; RESTYPE_NUM_WITH_X]> = OnceLock::new();
    build(&CELL, || {
        let mut t = [[[0usize; 4]; 4]; RESTYPE_NUM_WITH_X];
        for (row, chis) in t.iter_mut().zip(CHI_ANGLES_ATOMS.iter()) {
            for (slot, chi) in row.iter_mut().zip(chis.iter()) {
                for (idx, name) in slot.iter_mut().zip(chi.iter()) {
                    *idx = atom_order(name).unwrap_or(0);
                }
            }
        }
        t
    })
}

/// Restype index and atom14 slot pairs of every ambiguous swap in [`RESIDUE_ATOM_RENAMING_SWAPS`].
fn renaming_swap_slots() -> impl Iterator<Item = (usize, usize, usize)> {
    RESIDUE_ATOM_RENAMING_SWAPS
        .iter()
        .flat_map(|(resname, pairs)| {
            let r = RESNAMES
                .iter()
                .position(|n| n == resname)
                .unwrap_or(RESTYPE_NUM);
            pairs
                .iter()
                .filter_map(move |(a, b)| Some((r, atom14_index(r, a)?, atom14_index(r, b)?)))
        })
}

/// 1.0 for atom14 slots that are part of an ambiguous (swappable) pair.
pub fn restype_atom14_is_ambiguous() -> &'static [[f32; ATOM14_NUM]; RESTYPE_NUM_WITH_X] {
    static CELL: OnceLock<[[f32; ATOM14_NUM]; RESTYPE_NUM_WITH_X]> = OnceLock::new();
    build(&CELL, || {
        let mut t = [[0.0f32; ATOM14_NUM]; RESTYPE_NUM_WITH_X];
        for (r, a, b) in renaming_swap_slots() {
            t[r][a] = 1.0;
            t[r][b] = 1.0;
        }
        t
    })
}

/// atom14 permutation that renames ambiguous atoms to their alternative names (identity
/// elsewhere): `alt[r][i] = pos[r][swap[r][i]]` (OpenFold `restype_atom14_ambiguous_atoms_swap_idx`).
pub fn restype_atom14_ambiguous_swap() -> &'static [[usize; ATOM14_NUM]; RESTYPE_NUM_WITH_X] {
    static CELL: OnceLock<[[usize; ATOM14_NUM]; RESTYPE_NUM_WITH_X]> = OnceLock::new();
    build(&CELL, || {
        let mut t = [[0usize; ATOM14_NUM]; RESTYPE_NUM_WITH_X];
        for row in t.iter_mut() {
            for (i, v) in row.iter_mut().enumerate() {
                *v = i;
            }
        }
        for (r, a, b) in renaming_swap_slots() {
            t[r][a] = b;
            t[r][b] = a;
        }
        t
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chi_atoms_exist_in_residue() {
        for (r, chis) in CHI_ANGLES_ATOMS.iter().enumerate() {
            for chi in chis.iter() {
                for name in chi {
                    assert!(atom14_index(r, name).is_some(), "{} {name}", RESNAMES[r]);
                }
            }
        }
    }

    #[test]
    fn atom14_atom37_round_trip() {
        let a14 = restype_atom14_to_atom37();
        let a37 = restype_atom37_to_atom14();
        let m14 = restype_atom14_mask();
        let m37 = restype_atom37_mask();
        for r in 0..RESTYPE_NUM_WITH_X {
            for i in 0..ATOM14_NUM {
                if m14[r][i] > 0.0 {
                    assert_eq!(m37[r][a14[r][i]], 1.0);
                    assert_eq!(a37[r][a14[r][i]], i);
                    assert_eq!(ATOM_TYPES[a14[r][i]], RESTYPE_ATOM14_NAMES[r][i]);
                }
            }
            for a in 0..ATOM_TYPE_NUM {
                if m37[r][a] > 0.0 {
                    assert_eq!(a14[r][a37[r][a]], a);
                }
            }
            let n14: f32 = m14[r].iter().sum();
            let n37: f32 = m37[r].iter().sum();
            assert_eq!(n14, n37);
        }
        assert_eq!(m37[UNK_ROW].iter().sum::<f32>(), 0.0);
        assert_eq!(m37[0][atom_order("OXT").unwrap()], 0.0);
    }

    const UNK_ROW: usize = RESTYPE_NUM_WITH_X - 1;

    #[test]
    fn ambiguous_pairs_same_residue_and_involutive() {
        let swap = restype_atom14_ambiguous_swap();
        let amb = restype_atom14_is_ambiguous();
        let mut count = 0;
        for r in 0..RESTYPE_NUM_WITH_X {
            for i in 0..ATOM14_NUM {
                assert_eq!(swap[r][swap[r][i]], i);
                if amb[r][i] > 0.0 {
                    count += 1;
                    assert_ne!(swap[r][i], i);
                    assert!(!RESTYPE_ATOM14_NAMES[r][swap[r][i]].is_empty());
                } else {
                    assert_eq!(swap[r][i], i);
                }
            }
        }
        assert_eq!(count, 2 + 2 + 4 + 4);
    }
}
