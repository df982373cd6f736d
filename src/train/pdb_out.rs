//! Predicted structures as PDB files (ATOM records, pLDDT in the B-factor column) for viewing in
//! PyMOL/ChimeraX. Column layout from the wwPDB format description (v3.3, ATOM record).

use std::fmt::Write as _;
use std::path::Path;

use crate::error::{Error, Result};
use crate::model::residue_constants::{ATOM_TYPES, RESNAMES};

/// One chain's atom37 prediction.
pub struct PdbChain<'a> {
    /// Residue types (aatype, 0..=20) per residue.
    pub aatype: &'a [usize],
    /// Residue numbers as written (author numbering or 1-based index).
    pub residue_index: &'a [i64],
    /// `[n_res][37][3]` positions in Å.
    pub positions: &'a [[[f32; 3]; 37]],
    /// `[n_res][37]` 1 where the atom exists.
    pub mask: &'a [[f32; 37]],
    /// Per-residue pLDDT in [0, 100] (B-factor column); `None` writes 0.
    pub plddt: Option<&'a [f32]>,
    pub chain_id: char,
}

/// Render a chain as PDB text (ATOM records, TER, END).
pub fn to_pdb(chain: &PdbChain) -> Result<String> {
    let n = chain.aatype.len();
    if chain.residue_index.len() != n || chain.positions.len() != n || chain.mask.len() != n {
        return Err(Error::Msg(format!(
            "pdb writer: inconsistent lengths (aatype {n}, residue_index {}, positions {}, mask {})",
            chain.residue_index.len(),
            chain.positions.len(),
            chain.mask.len()
        )));
    }
    if let Some(p) = chain.plddt {
        if p.len() != n {
            return Err(Error::Msg(format!(
                "pdb writer: plddt has {} values for {n} residues",
                p.len()
            )));
        }
    }
    let mut out = String::new();
    let mut serial = 1usize;
    let mut last_res = None;
    for i in 0..n {
        let resname = RESNAMES.get(chain.aatype[i]).copied().unwrap_or("UNK");
        let b = chain.plddt.map_or(0.0, |p| p[i]);
        for (a, name) in ATOM_TYPES.iter().enumerate() {
            if chain.mask[i][a] < 0.5 {
                continue;
            }
            let [x, y, z] = chain.positions[i][a];
            if !(x.is_finite() && y.is_finite() && z.is_finite()) {
                return Err(Error::Msg(format!(
                    "pdb writer: non-finite coordinate at residue {i} atom {name}"
                )));
            }
            // Atom names of length < 4 start in column 14 (element symbol right-aligned in 13-14).
            let atom_field = if name.len() < 4 {
                format!(" {name:<3}")
            } else {
                (*name).to_string()
            };
            let element = &name[..1];
            let _ = writeln!(
                out,
                "ATOM  {serial:>5} {atom_field:<4} {resname:>3} {chain_id}{resseq:>4}    {x:>8.3}{y:>8.3}{z:>8.3}{occ:>6.2}{b:>6.2}          {element:>2}",
                chain_id = chain.chain_id,
                resseq = chain.residue_index[i],
                occ = 1.0,
            );
            serial += 1;
            last_res = Some((resname, chain.residue_index[i]));
        }
    }
    if let Some((resname, resseq)) = last_res {
        let _ = writeln!(
            out,
            "TER   {serial:>5}      {resname:>3} {}{resseq:>4}",
            chain.chain_id
        );
    }
    out.push_str("END\n");
    Ok(out)
}

/// Write a chain to `path` (atomically: temp file + rename).
pub fn write_pdb(path: &Path, chain: &PdbChain) -> Result<()> {
    let text = to_pdb(chain)?;
    let tmp = path.with_extension("pdb.tmp");
    std::fs::write(&tmp, text).map_err(|e| Error::io(&tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_follow_the_pdb_format() {
        let mut pos = [[[0.0f32; 3]; 37]; 2];
        let mut mask = [[0.0f32; 37]; 2];
        for (r, p) in pos.iter_mut().enumerate() {
            p[0] = [1.0 + r as f32, -2.5, 10.125]; // N
            p[1] = [2.0 + r as f32, -12.25, 3.0]; // CA
            mask[r][0] = 1.0;
            mask[r][1] = 1.0;
        }
        let chain = PdbChain {
            aatype: &[0, 7],
            residue_index: &[5, 6],
            positions: &pos,
            mask: &mask,
            plddt: Some(&[91.5, 42.25]),
            chain_id: 'A',
        };
        let text = to_pdb(&chain).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 6); // 4 atoms + TER + END
        let l = lines[1]; // CA of residue 5
        assert_eq!(&l[0..6], "ATOM  ");
        assert_eq!(l[6..11].trim(), "2");
        assert_eq!(&l[12..16], " CA ");
        assert_eq!(&l[17..20], "ALA");
        assert_eq!(&l[21..22], "A");
        assert_eq!(l[22..26].trim(), "5");
        assert_eq!(l[30..38].trim().parse::<f32>().unwrap(), 2.0);
        assert_eq!(l[38..46].trim().parse::<f32>().unwrap(), -12.25);
        assert_eq!(l[46..54].trim().parse::<f32>().unwrap(), 3.0);
        assert_eq!(l[60..66].trim().parse::<f32>().unwrap(), 91.5);
        assert_eq!(l[76..78].trim(), "C");
        assert_eq!(&lines[2][17..20], "GLY");
        assert_eq!(lines[2][60..66].trim().parse::<f32>().unwrap(), 42.25);
        assert!(lines[4].starts_with("TER"));
        assert_eq!(lines[5], "END");
    }

    #[test]
    fn rejects_bad_input() {
        let pos = [[[f32::NAN; 3]; 37]; 1];
        let mut mask = [[0.0f32; 37]; 1];
        mask[0][1] = 1.0;
        let chain = PdbChain {
            aatype: &[0],
            residue_index: &[1],
            positions: &pos,
            mask: &mask,
            plddt: None,
            chain_id: 'A',
        };
        assert!(to_pdb(&chain).is_err());
        let chain = PdbChain {
            aatype: &[0, 1],
            ..chain
        };
        assert!(to_pdb(&chain).is_err());
    }
}
