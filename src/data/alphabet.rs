//! Alphabets used by the parsers: residue names and letters, the HHblits MSA alphabet.
//!
//! Geometry tables (atom14 layout, rigid groups, chi atoms, ambiguity) live in
//! `crate::model::residue_constants`; this file only holds the letter/name alphabets the text parsers
//! need (AF2 supplement section 1.2.9 / OpenFold `residue_constants` ordering).

/// One-letter codes in aatype order (`ARNDCQEGHILKMFPSTWYV`), index 20 = `X` (unknown).
pub const RESTYPES: &[u8; 20] = b"ARNDCQEGHILKMFPSTWYV";

/// Three-letter names in aatype order.
pub const RESTYPE_3: [&str; 20] = [
    "ALA", "ARG", "ASN", "ASP", "CYS", "GLN", "GLU", "GLY", "HIS", "ILE", "LEU", "LYS", "MET", "PHE",
    "PRO", "SER", "THR", "TRP", "TYR", "VAL",
];

/// aatype index of unknown residues.
pub const UNK: u8 = 20;

/// aatype (0..=20) of a one-letter code; unknown letters give 20.
pub fn aatype_of_letter(c: u8) -> u8 {
    RESTYPES
        .iter()
        .position(|&r| r == c.to_ascii_uppercase())
        .map_or(UNK, |i| i as u8)
}

/// One-letter code of an aatype (X for 20 or out of range).
pub fn letter_of_aatype(a: u8) -> char {
    RESTYPES.get(a as usize).map_or('X', |&c| c as char)
}

/// aatype of a residue (chemical component) name. Selenomethionine `MSE` is MET; everything else
/// that is not one of the 20 standard amino acids is unknown (20).
pub fn aatype_of_name(name: &str) -> u8 {
    if name == "MSE" {
        return 12;
    }
    RESTYPE_3
        .iter()
        .position(|&r| r == name)
        .map_or(UNK, |i| i as u8)
}

/// True for component names the structure parsers accept as amino-acid residues of a chain.
pub fn is_amino_acid_name(name: &str) -> bool {
    name == "MSE" || name == "UNK" || RESTYPE_3.contains(&name)
}

/// The 37 heavy-atom names of the atom37 representation, in OpenFold order.
// TODO(rc): switch to `model::residue_constants` once it exports the atom37 order.
pub const ATOM37: [&str; 37] = [
    "N", "CA", "C", "CB", "O", "CG", "CG1", "CG2", "OG", "OG1", "SG", "CD", "CD1", "CD2", "ND1", "ND2",
    "OD1", "OD2", "SD", "CE", "CE1", "CE2", "CE3", "NE", "NE1", "NE2", "OE1", "OE2", "CH2", "NH1",
    "NH2", "OH", "CZ", "CZ2", "CZ3", "NZ", "OXT",
];

/// atom37 index of an atom name.
pub fn atom37_index(name: &str) -> Option<usize> {
    ATOM37.iter().position(|&a| a == name)
}

/// HHblits alphabet id of an MSA character (`A=0, C=1, D=2, … Y=19, X=20, gap=21`; `B→D`, `Z→E`,
/// `U→C`, `J/O→X`). Other upper-case letters are unknown (20); None for anything else.
pub fn hhblits_id(c: u8) -> Option<u8> {
    Some(match c {
        b'A' => 0,
        b'C' | b'U' => 1,
        b'D' | b'B' => 2,
        b'E' | b'Z' => 3,
        b'F' => 4,
        b'G' => 5,
        b'H' => 6,
        b'I' => 7,
        b'K' => 8,
        b'L' => 9,
        b'M' => 10,
        b'N' => 11,
        b'P' => 12,
        b'Q' => 13,
        b'R' => 14,
        b'S' => 15,
        b'T' => 16,
        b'V' => 17,
        b'W' => 18,
        b'Y' => 19,
        b'-' => 21,
        c if c.is_ascii_uppercase() => 20,
        _ => return None,
    })
}

/// HHblits id → aatype order (`MAP_HHBLITS_AATYPE_TO_OUR_AATYPE`); 20 = X, 21 = gap.
pub const HHBLITS_TO_AATYPE: [u8; 22] = [
    0, 4, 3, 6, 13, 7, 8, 9, 11, 10, 12, 2, 14, 5, 1, 15, 16, 19, 17, 18, 20, 21,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hhblits_map_is_consistent_with_letters() {
        // The HHblits id of each letter, remapped, must be the aatype of that letter.
        for &c in RESTYPES.iter() {
            let h = hhblits_id(c).unwrap();
            assert_eq!(HHBLITS_TO_AATYPE[h as usize], aatype_of_letter(c), "{}", c as char);
        }
        assert_eq!(HHBLITS_TO_AATYPE[hhblits_id(b'-').unwrap() as usize], 21);
        assert_eq!(hhblits_id(b'a'), None);
        assert_eq!(aatype_of_name("MSE"), aatype_of_letter(b'M'));
        assert_eq!(atom37_index("SD"), Some(18));
    }
}
