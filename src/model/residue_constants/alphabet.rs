//! Residue alphabets: the AF2 20+1 amino-acid order, 1↔3-letter names, the HHblits MSA alphabet and
//! the mapping of common modified residues to their parent amino acid (AF2 supplement 1.2.x).

/// Number of standard residue types.
pub const RESTYPE_NUM: usize = 20;
/// Index of the unknown residue type `X` / `UNK`.
pub const UNK_RESTYPE: usize = 20;
/// Number of residue types including unknown (`X`).
pub const RESTYPE_NUM_WITH_X: usize = 21;

/// The 20 standard amino acids in AF2 order (alphabetical by 3-letter name).
pub const RESTYPES: [char; RESTYPE_NUM] = [
    'A', 'R', 'N', 'D', 'C', 'Q', 'E', 'G', 'H', 'I', 'L', 'K', 'M', 'F', 'P', 'S', 'T', 'W', 'Y',
    'V',
];

/// [`RESTYPES`] followed by `X` (index 20).
pub const RESTYPES_WITH_X: [char; RESTYPE_NUM_WITH_X] = [
    'A', 'R', 'N', 'D', 'C', 'Q', 'E', 'G', 'H', 'I', 'L', 'K', 'M', 'F', 'P', 'S', 'T', 'W', 'Y',
    'V', 'X',
];

/// 3-letter names in restype order, `UNK` last (index 20).
pub const RESNAMES: [&str; RESTYPE_NUM_WITH_X] = [
    "ALA", "ARG", "ASN", "ASP", "CYS", "GLN", "GLU", "GLY", "HIS", "ILE", "LEU", "LYS", "MET",
    "PHE", "PRO", "SER", "THR", "TRP", "TYR", "VAL", "UNK",
];

/// Index of a standard one-letter code (0..20); `None` for anything else (including `X`).
pub fn restype_order(c: char) -> Option<usize> {
    RESTYPES.iter().position(|&r| r == c)
}

/// Index of a one-letter code with unknowns mapped to `X` = 20 (`map_unknown_to_x=True` in AF2).
pub fn restype_order_with_x(c: char) -> usize {
    restype_order(c).unwrap_or(UNK_RESTYPE)
}

/// One-letter → three-letter name for the 20 standard residues and `X` → `UNK`.
pub fn restype_1to3(c: char) -> Option<&'static str> {
    RESTYPES_WITH_X
        .iter()
        .position(|&r| r == c)
        .map(|i| RESNAMES[i])
}

/// Three-letter → one-letter for the 20 standard residues and `UNK` → `X`.
pub fn restype_3to1(name: &str) -> Option<char> {
    resname_order(name).map(|i| RESTYPES_WITH_X[i])
}

/// Index (0..=20) of a three-letter name (standard residues and `UNK`).
pub fn resname_order(name: &str) -> Option<usize> {
    RESNAMES.iter().position(|&r| r == name)
}

/// Modified residues mapped to the one-letter code of their parent amino acid, for building the
/// sequence from a structure file (as the PDB chemical-component "parent" relation does; AF2 uses
/// Biopython's `SCOPData.protein_letters_3to1` for this). Only the sequence letter is mapped: atom
/// coordinates are still taken by atom name, with the special case of MSE's `SE` → `SD`.
pub const NONSTANDARD_RESIDUE_PARENTS: [(&str, char); 24] = [
    ("MSE", 'M'), // selenomethionine
    ("FME", 'M'), // N-formylmethionine
    ("SEP", 'S'), // phosphoserine
    ("TPO", 'T'), // phosphothreonine
    ("PTR", 'Y'), // phosphotyrosine
    ("HYP", 'P'), // 4-hydroxyproline
    ("MLY", 'K'), // N-dimethyl-lysine
    ("M3L", 'K'), // N-trimethyl-lysine
    ("MLZ", 'K'), // N-methyl-lysine
    ("ALY", 'K'), // N-acetyl-lysine
    ("KCX", 'K'), // lysine NZ-carboxylic acid
    ("LLP", 'K'), // lysine-pyridoxal-5'-phosphate
    ("CSO", 'C'), // S-hydroxycysteine
    ("CSD", 'C'), // 3-sulfinoalanine
    ("CME", 'C'), // S,S-(2-hydroxyethyl)thiocysteine
    ("CSS", 'C'), // S-mercaptocysteine
    ("OCS", 'C'), // cysteinesulfonic acid
    ("CAS", 'C'), // S-(dimethylarsenic)cysteine
    ("SMC", 'C'), // S-methylcysteine
    ("CSX", 'C'), // S-oxy cysteine
    ("NLE", 'L'), // norleucine
    ("MEN", 'N'), // N-methyl asparagine
    ("HIC", 'H'), // 4-methyl-histidine
    ("DAL", 'A'), // D-alanine
];

/// One-letter code of a residue name as it appears in a structure file: standard names and `UNK`
/// directly, modified residues via [`NONSTANDARD_RESIDUE_PARENTS`], anything else `X`.
pub fn resname_to_one_letter(name: &str) -> char {
    if let Some(c) = restype_3to1(name) {
        return c;
    }
    NONSTANDARD_RESIDUE_PARENTS
        .iter()
        .find(|(n, _)| *n == name)
        .map_or('X', |&(_, c)| c)
}

/// HHblits alphabet (index → letter): A=0, C=1, D=2, …, Y=19, X=20, gap `-`=21.
pub const ID_TO_HHBLITS_AA: [char; 22] = [
    'A', 'C', 'D', 'E', 'F', 'G', 'H', 'I', 'K', 'L', 'M', 'N', 'P', 'Q', 'R', 'S', 'T', 'V', 'W',
    'Y', 'X', '-',
];

/// Gap token in the HHblits alphabet.
pub const HHBLITS_GAP: usize = 21;
/// Unknown token in the HHblits alphabet.
pub const HHBLITS_X: usize = 20;

/// Letter → HHblits index (MSA tokens). Ambiguity codes: B→D, Z→E, U (selenocysteine)→C,
/// J and O → X. Anything else is `None` (callers map it to X or reject it).
pub fn hhblits_aa_to_id(c: char) -> Option<usize> {
    match c {
        'B' => Some(2),
        'Z' => Some(3),
        'U' => Some(1),
        'J' | 'O' => Some(HHBLITS_X),
        _ => ID_TO_HHBLITS_AA.iter().position(|&a| a == c),
    }
}

/// HHblits index → AF2 aatype index (gap stays 21, X stays 20).
pub const MAP_HHBLITS_AATYPE_TO_OUR_AATYPE: [usize; 22] = {
    let mut out = [0usize; 22];
    let mut i = 0;
    while i < 22 {
        let c = ID_TO_HHBLITS_AA[i];
        let mut j = 0;
        // X (20) and gap (21) keep their index.
        out[i] = i;
        while j < RESTYPE_NUM {
            if RESTYPES[j] == c {
                out[i] = j;
            }
            j += 1;
        }
        i += 1;
    }
    out
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alphabets_round_trip() {
        for (i, &c) in RESTYPES_WITH_X.iter().enumerate() {
            assert_eq!(restype_order_with_x(c), i);
            let three = restype_1to3(c).unwrap();
            assert_eq!(three, RESNAMES[i]);
            assert_eq!(restype_3to1(three), Some(c));
            assert_eq!(resname_to_one_letter(three), c);
        }
        assert_eq!(restype_order('X'), None);
        assert_eq!(restype_order_with_x('B'), UNK_RESTYPE);
        assert_eq!(resname_to_one_letter("MSE"), 'M');
        assert_eq!(resname_to_one_letter("HOH"), 'X');
        // Each HHblits letter maps back onto the same aatype letter.
        for (i, &c) in ID_TO_HHBLITS_AA.iter().enumerate() {
            assert_eq!(hhblits_aa_to_id(c), Some(i));
            let ours = MAP_HHBLITS_AATYPE_TO_OUR_AATYPE[i];
            if i < 20 {
                assert_eq!(RESTYPES[ours], c);
            } else {
                assert_eq!(ours, i);
            }
        }
        assert_eq!(hhblits_aa_to_id('B'), hhblits_aa_to_id('D'));
        assert_eq!(hhblits_aa_to_id('Z'), hhblits_aa_to_id('E'));
        assert_eq!(hhblits_aa_to_id('U'), hhblits_aa_to_id('C'));
        assert_eq!(hhblits_aa_to_id('*'), None);
    }
}
