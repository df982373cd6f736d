//! Thin `u8` wrappers over [`crate::model::residue_constants`] for the text parsers (residue
//! letters and names, the atom37 order, the HHblits MSA alphabet).

use crate::model::residue_constants as rc;

/// aatype index of unknown residues.
pub const UNK: u8 = rc::UNK_RESTYPE as u8;

/// aatype (0..=20) of a one-letter code; unknown letters give 20.
pub fn aatype_of_letter(c: u8) -> u8 {
    rc::restype_order_with_x((c as char).to_ascii_uppercase()) as u8
}

/// One-letter code of an aatype (X for 20 or out of range).
pub fn letter_of_aatype(a: u8) -> char {
    rc::RESTYPES_WITH_X.get(a as usize).copied().unwrap_or('X')
}

/// aatype of a residue (chemical component) name: standard names, modified residues through their
/// parent (MSE → MET, …), anything else 20.
pub fn aatype_of_name(name: &str) -> u8 {
    aatype_of_letter(rc::resname_to_one_letter(name) as u8)
}

/// True for component names the PDB-format parser accepts as amino-acid residues of a chain
/// (standard, `UNK`, and the modified residues with a known parent).
pub fn is_amino_acid_name(name: &str) -> bool {
    rc::resname_order(name).is_some()
        || rc::NONSTANDARD_RESIDUE_PARENTS
            .iter()
            .any(|(n, _)| *n == name)
}

/// atom37 index of an atom name.
pub fn atom37_index(name: &str) -> Option<usize> {
    rc::atom_order(name)
}

/// HHblits alphabet id of an MSA character (`A=0, C=1, D=2, … Y=19, X=20, gap=21`; `B→D`, `Z→E`,
/// `U→C`, `J/O→X`). Other upper-case letters are unknown (20); None for anything else.
pub fn hhblits_id(c: u8) -> Option<u8> {
    match rc::hhblits_aa_to_id(c as char) {
        Some(i) => Some(i as u8),
        None if c.is_ascii_uppercase() => Some(rc::HHBLITS_X as u8),
        None => None,
    }
}

/// HHblits id → aatype order; 20 = X, 21 = gap.
pub fn hhblits_to_aatype(h: u8) -> u8 {
    rc::MAP_HHBLITS_AATYPE_TO_OUR_AATYPE
        .get(h as usize)
        .map_or(UNK, |&a| a as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hhblits_map_is_consistent_with_letters() {
        for &c in rc::RESTYPES.iter() {
            let h = hhblits_id(c as u8).unwrap();
            assert_eq!(hhblits_to_aatype(h), aatype_of_letter(c as u8), "{c}");
        }
        assert_eq!(hhblits_to_aatype(hhblits_id(b'-').unwrap()), 21);
        assert_eq!(hhblits_id(b'a'), None);
        assert_eq!(aatype_of_name("MSE"), aatype_of_letter(b'M'));
        assert_eq!(atom37_index("SD"), Some(18));
    }
}
