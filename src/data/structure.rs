//! One protein chain parsed from an mmCIF or legacy PDB file: sequence, numbering, atom37
//! coordinates and masks, and entry metadata.
//!
//! Conventions follow OpenFold's `mmcif_parsing` + `make_mmcif_features` (the golden fixtures):
//! the sequence is the full construct (unresolved residues are kept with a zero mask), the first
//! model only, hydrogens dropped, for alternate locations the highest-occupancy atom (first on ties,
//! as Biopython), `MSE` read as MET with its `SE` stored in the `SD` slot, and ARG `NH1`/`NH2` swapped
//! when `NH2` is the one closer to `CD`. Coordinates are parsed as f64 then rounded to f32 (as
//! Biopython/numpy do).

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use super::alphabet::{aatype_of_name, atom37_index, is_amino_acid_name, letter_of_aatype};
use super::cif::{self, is_null, Block};
use crate::error::{Error, Result};

/// A parsed protein chain.
#[derive(Debug, Clone, PartialEq)]
pub struct Chain {
    /// Entry id (lower-case PDB id or file stem).
    pub id: String,
    /// Author chain id (`auth_asym_id`, PDB column 22).
    pub chain_id: String,
    /// mmCIF label chain id (`label_asym_id`), None for PDB-format files.
    pub label_chain_id: Option<String>,
    /// Full construct sequence, one letter per residue (`X` for unknown).
    pub sequence: String,
    /// aatype (restype order, 20 = X) per residue.
    pub aatype: Vec<u8>,
    /// Author residue number of resolved residues (None where the residue has no atoms).
    pub author_residue_number: Vec<Option<i32>>,
    /// atom37 positions, `[L, 37, 3]` row-major (zeros where missing).
    pub positions: Vec<f32>,
    /// atom37 mask, `[L, 37]`.
    pub mask: Vec<f32>,
    /// Resolution in Å (None for NMR and when absent).
    pub resolution: Option<f32>,
    /// Earliest release date, `YYYY-MM-DD`.
    pub release_date: Option<String>,
    /// Experimental method(s), upper case, comma-separated.
    pub method: String,
}

impl Chain {
    /// Number of residues.
    pub fn len(&self) -> usize {
        self.aatype.len()
    }

    /// True when the chain has no residues.
    pub fn is_empty(&self) -> bool {
        self.aatype.is_empty()
    }

    /// Residues with a CA atom.
    pub fn resolved_residues(&self) -> usize {
        (0..self.len())
            .filter(|&i| self.mask[i * 37 + 1] > 0.0)
            .count()
    }

    /// OpenFold residue index (0..L, whatever the author numbering).
    pub fn residue_index(&self) -> Vec<i32> {
        (0..self.len() as i32).collect()
    }
}

/// Per-residue atom accumulator (best occupancy per atom37 slot).
#[derive(Clone)]
struct ResidueAtoms {
    name: String,
    author_number: Option<i32>,
    pos: [[f32; 3]; 37],
    occ: [f32; 37],
    present: [bool; 37],
}

impl ResidueAtoms {
    fn new(name: &str) -> Self {
        ResidueAtoms {
            name: name.to_string(),
            author_number: None,
            pos: [[0.0; 3]; 37],
            occ: [0.0; 37],
            present: [false; 37],
        }
    }

    /// Add one atom; returns nothing. Hydrogens and names outside atom37 are ignored.
    fn add(&mut self, atom_name: &str, element: &str, xyz: [f64; 3], occupancy: f32) {
        if element.eq_ignore_ascii_case("H") || element.eq_ignore_ascii_case("D") {
            return;
        }
        let name = if self.name == "MSE" && atom_name.eq_ignore_ascii_case("SE") {
            "SD"
        } else {
            atom_name
        };
        let Some(slot) = atom37_index(name) else {
            return;
        };
        // Highest occupancy wins; the first one seen wins ties (Biopython's DisorderedAtom).
        if self.present[slot] && occupancy <= self.occ[slot] {
            return;
        }
        self.present[slot] = true;
        self.occ[slot] = occupancy;
        self.pos[slot] = [xyz[0] as f32, xyz[1] as f32, xyz[2] as f32];
    }
}

/// Assemble a chain from the sequence (component names) and the resolved residues by sequence index.
#[allow(clippy::too_many_arguments)]
fn assemble(
    id: &str,
    chain_id: &str,
    label: Option<String>,
    seq_names: &[String],
    residues: &HashMap<usize, ResidueAtoms>,
    resolution: Option<f32>,
    release_date: Option<String>,
    method: String,
) -> Chain {
    let l = seq_names.len();
    let mut positions = vec![0f32; l * 37 * 3];
    let mut mask = vec![0f32; l * 37];
    let mut aatype = Vec::with_capacity(l);
    let mut numbers = Vec::with_capacity(l);
    let (cd, nh1, nh2) = (11, 29, 30);
    for (i, name) in seq_names.iter().enumerate() {
        aatype.push(aatype_of_name(name));
        let Some(r) = residues.get(&i) else {
            numbers.push(None);
            continue;
        };
        numbers.push(r.author_number);
        let mut pos = r.pos;
        let mut present = r.present;
        // ARG naming fix (OpenFold get_atom_coords): NH1 must be the one closer to CD.
        if r.name == "ARG" && present[cd] && present[nh1] && present[nh2] {
            let d = |a: [f32; 3], b: [f32; 3]| {
                ((a[0] - b[0]).powi(2) + (a[1] - b[1]).powi(2) + (a[2] - b[2]).powi(2)).sqrt()
            };
            if d(pos[nh1], pos[cd]) > d(pos[nh2], pos[cd]) {
                pos.swap(nh1, nh2);
                present.swap(nh1, nh2);
            }
        }
        for a in 0..37 {
            if present[a] {
                mask[i * 37 + a] = 1.0;
                positions[(i * 37 + a) * 3..(i * 37 + a) * 3 + 3].copy_from_slice(&pos[a]);
            }
        }
    }
    let sequence = aatype.iter().map(|&a| letter_of_aatype(a)).collect();
    Chain {
        id: id.to_string(),
        chain_id: chain_id.to_string(),
        label_chain_id: label,
        sequence,
        aatype,
        author_residue_number: numbers,
        positions,
        mask,
        resolution,
        release_date,
        method,
    }
}

/// Parse a structure file (`.cif` mmCIF or `.pdb` legacy PDB, by extension; `.ent` is PDB) and
/// extract one chain by author chain id (falling back to the label chain id for mmCIF).
pub fn parse_structure_file(path: &Path, chain: &str) -> Result<Chain> {
    let text = cif::read_text(path)?;
    let id = path
        .file_stem()
        .map(|s| s.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    let ext = path
        .extension()
        .map(|e| e.to_string_lossy().to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "pdb" | "ent" => parse_pdb(&text, path, &id, chain),
        _ => parse_mmcif(&text, path, &id, chain),
    }
}

fn num<T: std::str::FromStr>(v: &str, path: &Path, line: u32, what: &str) -> Result<T> {
    v.trim().parse::<T>().map_err(|_| {
        Error::parse(
            path,
            line as usize,
            format!("{what}: cannot parse `{v}` as a number"),
        )
    })
}

/// mmCIF header: resolution, release date, method.
fn mmcif_header(b: &Block) -> (Option<f32>, Option<String>, String) {
    let resolution = [
        "_refine.ls_d_res_high",
        "_em_3d_reconstruction.resolution",
        "_reflns.d_resolution_high",
    ]
    .iter()
    .find_map(|t| b.first(t).and_then(|v| v.parse::<f64>().ok()))
    .map(|r| r as f32);
    let date = [
        "_pdbx_audit_revision_history.revision_date",
        "_database_pdb_rev.date",
        "_pdbx_database_status.recvd_initial_deposition_date",
    ]
    .iter()
    .find_map(|t| {
        b.values(t)?
            .into_iter()
            .filter(|v| !is_null(v))
            .map(str::to_string)
            .min()
    });
    let method = b
        .values("_exptl.method")
        .map(|v| {
            v.iter()
                .map(|m| m.trim().to_ascii_uppercase())
                .collect::<Vec<_>>()
                .join(",")
        })
        .unwrap_or_default();
    (resolution, date, method)
}

/// Parse mmCIF text and extract one chain.
pub fn parse_mmcif(text: &str, path: &Path, id: &str, chain: &str) -> Result<Chain> {
    let blocks = cif::parse(text, path)?;
    let b = &blocks[0];
    let (resolution, date, method) = mmcif_header(b);
    let atoms = b
        .category("atom_site")
        .ok_or_else(|| Error::parse(path, 0, "no _atom_site category"))?;
    let col = |name: &str| {
        atoms
            .col(name)
            .ok_or_else(|| Error::parse(path, 0, format!("_atom_site.{name} column missing")))
    };
    let c_type = atoms.col("type_symbol");
    let c_atom = col("label_atom_id")?;
    let c_comp = col("label_comp_id")?;
    let c_asym = col("label_asym_id")?;
    let c_entity = atoms.col("label_entity_id");
    let c_seq = col("label_seq_id")?;
    let c_x = col("Cartn_x")?;
    let c_y = col("Cartn_y")?;
    let c_z = col("Cartn_z")?;
    let c_occ = atoms.col("occupancy");
    let c_auth_seq = atoms.col("auth_seq_id");
    let c_auth_asym = atoms.col("auth_asym_id");
    let c_model = atoms.col("pdbx_PDB_model_num");
    let n = atoms.rows();
    if n == 0 {
        return Err(Error::parse(path, 0, "_atom_site has no rows"));
    }
    let first_model = c_model.map(|c| atoms.get(0, c));
    let in_model = |r: usize| match (c_model, first_model) {
        (Some(c), Some(m)) => atoms.get(r, c) == m,
        _ => true,
    };

    // Polymer (polypeptide) entities.
    let mut poly_entities: BTreeSet<&str> = BTreeSet::new();
    if let (Some(ids), Some(types)) = (
        b.values("_entity_poly.entity_id"),
        b.values("_entity_poly.type"),
    ) {
        for (e, t) in ids.iter().zip(types) {
            if t.to_ascii_lowercase().contains("polypeptide") {
                poly_entities.insert(e);
            }
        }
    }
    let entity_of_asym: HashMap<&str, &str> = match (
        b.values("_struct_asym.id"),
        b.values("_struct_asym.entity_id"),
    ) {
        (Some(a), Some(e)) => a.into_iter().zip(e).collect(),
        _ => HashMap::new(),
    };
    let row_entity = |r: usize| -> Option<&str> {
        c_entity
            .map(|c| atoms.get(r, c))
            .or_else(|| entity_of_asym.get(atoms.get(r, c_asym)).copied())
    };
    let is_polymer_row = |r: usize| -> bool {
        !is_null(atoms.get(r, c_seq))
            && (poly_entities.is_empty()
                || row_entity(r).is_some_and(|e| poly_entities.contains(e)))
    };

    // Find the label chain: author id first, then label id.
    let find = |by_auth: bool| -> Option<String> {
        let c = if by_auth { c_auth_asym? } else { c_asym };
        (0..n)
            .find(|&r| in_model(r) && atoms.get(r, c) == chain && is_polymer_row(r))
            .map(|r| atoms.get(r, c_asym).to_string())
    };
    let label = find(true).or_else(|| find(false)).ok_or_else(|| {
        let mut present: Vec<&str> = (0..n)
            .filter(|&r| is_polymer_row(r))
            .map(|r| atoms.get(r, c_auth_asym.unwrap_or(c_asym)))
            .collect();
        present.sort();
        present.dedup();
        Error::Data {
            what: path.display().to_string(),
            msg: format!(
                "chain `{chain}` not found among protein chains [{}]",
                present.join(", ")
            ),
        }
    })?;
    let entity = (0..n)
        .find(|&r| atoms.get(r, c_asym) == label)
        .and_then(row_entity)
        .map(str::to_string);
    let auth_chain = match c_auth_asym {
        Some(c) => (0..n)
            .find(|&r| atoms.get(r, c_asym) == label)
            .map_or(chain.to_string(), |r| atoms.get(r, c).to_string()),
        None => chain.to_string(),
    };

    // Sequence: _entity_poly_seq, else _pdbx_poly_seq_scheme, else the model's residues.
    let mut seq: Vec<(i64, String)> = Vec::new();
    if let (Some(ents), Some(nums), Some(mons), Some(e)) = (
        b.values("_entity_poly_seq.entity_id"),
        b.values("_entity_poly_seq.num"),
        b.values("_entity_poly_seq.mon_id"),
        entity.as_deref(),
    ) {
        for ((en, nu), mo) in ents.iter().zip(nums).zip(mons) {
            if *en == e {
                seq.push((num(nu, path, 0, "_entity_poly_seq.num")?, mo.to_string()));
            }
        }
    }
    if seq.is_empty() {
        if let (Some(asyms), Some(nums), Some(mons)) = (
            b.values("_pdbx_poly_seq_scheme.asym_id"),
            b.values("_pdbx_poly_seq_scheme.seq_id"),
            b.values("_pdbx_poly_seq_scheme.mon_id"),
        ) {
            for ((a, nu), mo) in asyms.iter().zip(nums).zip(mons) {
                if *a == label {
                    seq.push((
                        num(nu, path, 0, "_pdbx_poly_seq_scheme.seq_id")?,
                        mo.to_string(),
                    ));
                }
            }
        }
    }
    if seq.is_empty() {
        for r in 0..n {
            if in_model(r) && atoms.get(r, c_asym) == label && !is_null(atoms.get(r, c_seq)) {
                let s: i64 = num(
                    atoms.get(r, c_seq),
                    path,
                    atoms.row_lines[r],
                    "label_seq_id",
                )?;
                if seq.last().is_none_or(|(last, _)| *last != s) {
                    seq.push((s, atoms.get(r, c_comp).to_string()));
                }
            }
        }
    }
    // Micro-heterogeneity: keep the first monomer listed for each position.
    // DISCREPANCY: OpenFold appends every `_entity_poly_seq` row, so a heterogeneous position
    // lengthens its sequence; we keep one residue per position (none of the sample files has one).
    seq.sort_by_key(|(s, _)| *s);
    seq.dedup_by_key(|(s, _)| *s);
    let index_of: HashMap<i64, usize> = seq.iter().enumerate().map(|(i, (s, _))| (*s, i)).collect();
    let seq_names: Vec<String> = seq.into_iter().map(|(_, m)| m).collect();

    let mut residues: HashMap<usize, ResidueAtoms> = HashMap::new();
    for r in 0..n {
        if !in_model(r) || atoms.get(r, c_asym) != label {
            continue;
        }
        let sv = atoms.get(r, c_seq);
        if is_null(sv) {
            continue; // ligand or water sharing the label chain
        }
        let line = atoms.row_lines[r];
        let s: i64 = num(sv, path, line, "_atom_site.label_seq_id")?;
        let Some(&idx) = index_of.get(&s) else {
            continue; // e.g. a ligand numbered after the polymer (assembly files)
        };
        let comp = atoms.get(r, c_comp);
        if comp != seq_names[idx] {
            continue; // an alternative monomer at a heterogeneous position
        }
        let res = residues
            .entry(idx)
            .or_insert_with(|| ResidueAtoms::new(comp));
        if res.author_number.is_none() {
            res.author_number = c_auth_seq.and_then(|c| atoms.get(r, c).parse().ok());
        }
        let occ = match c_occ {
            Some(c) if !is_null(atoms.get(r, c)) => {
                num::<f64>(atoms.get(r, c), path, line, "_atom_site.occupancy")? as f32
            }
            _ => 1.0,
        };
        let xyz = [
            num::<f64>(atoms.get(r, c_x), path, line, "_atom_site.Cartn_x")?,
            num::<f64>(atoms.get(r, c_y), path, line, "_atom_site.Cartn_y")?,
            num::<f64>(atoms.get(r, c_z), path, line, "_atom_site.Cartn_z")?,
        ];
        let element = c_type.map_or("", |c| atoms.get(r, c));
        res.add(atoms.get(r, c_atom), element, xyz, occ);
    }
    Ok(assemble(
        id,
        &auth_chain,
        Some(label),
        &seq_names,
        &residues,
        resolution,
        date,
        method,
    ))
}

/// Convert a PDB date `DD-MMM-YY` to `YYYY-MM-DD`.
pub fn pdb_date_to_iso(d: &str) -> Option<String> {
    let mut it = d.trim().split('-');
    let (dd, mmm, yy) = (it.next()?, it.next()?, it.next()?);
    let months = [
        "JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC",
    ];
    let m = months.iter().position(|&x| x.eq_ignore_ascii_case(mmm))? + 1;
    let day: u32 = dd.parse().ok()?;
    let y: u32 = yy.parse().ok()?;
    let year = if y >= 70 { 1900 + y } else { 2000 + y };
    Some(format!("{year:04}-{m:02}-{day:02}"))
}

fn field(line: &str, a: usize, b: usize) -> &str {
    let end = b.min(line.len());
    if a >= end {
        return "";
    }
    line.get(a..end).unwrap_or("")
}

/// Parse legacy PDB-format text and extract one chain. The sequence comes from `SEQRES` (else the
/// resolved residues); resolved residues are placed on it by an alignment that follows the author
/// numbering (gaps in numbering = unresolved residues).
pub fn parse_pdb(text: &str, path: &Path, id: &str, chain: &str) -> Result<Chain> {
    let mut seqres: Vec<String> = Vec::new();
    let mut method = String::new();
    let mut resolution = None;
    let mut dates: Vec<String> = Vec::new();
    // Resolved residues in file order: (resSeq, iCode) → atoms.
    let mut order: Vec<(i32, char)> = Vec::new();
    let mut res_map: HashMap<(i32, char), ResidueAtoms> = HashMap::new();
    let mut chains_seen: BTreeSet<String> = BTreeSet::new();
    let mut model_done = false;
    for (ln, line) in text.lines().enumerate() {
        let rec = field(line, 0, 6).trim_end();
        match rec {
            "SEQRES" if field(line, 11, 12) == chain => {
                seqres.extend(field(line, 19, 80).split_whitespace().map(str::to_string));
            }
            "EXPDTA" => method = field(line, 10, 80).trim().to_string(),
            "REVDAT" => {
                if let Some(d) = pdb_date_to_iso(field(line, 13, 22)) {
                    dates.push(d);
                }
            }
            "REMARK" if field(line, 7, 10).trim() == "2" && line.contains("RESOLUTION.") => {
                resolution = line
                    .split("RESOLUTION.")
                    .nth(1)
                    .and_then(|r| r.split_whitespace().next())
                    .and_then(|r| r.parse::<f64>().ok())
                    .map(|r| r as f32);
            }
            "ENDMDL" => model_done = true,
            "ATOM" | "HETATM" if !model_done => {
                let lno = ln + 1;
                let ch = field(line, 21, 22);
                let resname = field(line, 17, 20).trim();
                if rec == "ATOM" || is_amino_acid_name(resname) {
                    chains_seen.insert(ch.to_string());
                }
                if ch != chain || (rec == "HETATM" && !is_amino_acid_name(resname)) {
                    continue;
                }
                if line.len() < 54 {
                    return Err(Error::parse(
                        path,
                        lno,
                        "ATOM record shorter than 54 columns (truncated?)",
                    ));
                }
                let resseq: i32 = num(field(line, 22, 26), path, lno as u32, "residue number")?;
                let icode = field(line, 26, 27).chars().next().unwrap_or(' ');
                let key = (resseq, icode);
                let res = res_map.entry(key).or_insert_with(|| {
                    order.push(key);
                    let mut r = ResidueAtoms::new(resname);
                    r.author_number = Some(resseq);
                    r
                });
                if res.name != resname {
                    continue; // alternate residue type at the same position
                }
                let xyz = [
                    num::<f64>(field(line, 30, 38), path, lno as u32, "x")?,
                    num::<f64>(field(line, 38, 46), path, lno as u32, "y")?,
                    num::<f64>(field(line, 46, 54), path, lno as u32, "z")?,
                ];
                let occ = field(line, 54, 60).trim().parse::<f64>().unwrap_or(1.0) as f32;
                let name = field(line, 12, 16).trim();
                let mut element = field(line, 76, 78).trim().to_string();
                if element.is_empty() {
                    element = name
                        .trim_start_matches(|c: char| c.is_ascii_digit())
                        .chars()
                        .take(1)
                        .collect();
                }
                res.add(name, &element, xyz, occ);
            }
            _ => {}
        }
    }
    if order.is_empty() {
        return Err(Error::Data {
            what: path.display().to_string(),
            msg: format!(
                "chain `{chain}` not found among protein chains [{}]",
                chains_seen.into_iter().collect::<Vec<_>>().join(", ")
            ),
        });
    }
    let observed: Vec<&ResidueAtoms> = order.iter().filter_map(|k| res_map.get(k)).collect();
    let seq_names: Vec<String> = if seqres.is_empty() {
        observed.iter().map(|r| r.name.clone()).collect()
    } else {
        seqres
    };
    let placement = align_observed(&seq_names, &observed).ok_or_else(|| Error::Data {
        what: path.display().to_string(),
        msg: format!(
            "chain `{chain}`: {} resolved residues do not fit the {}-residue SEQRES",
            observed.len(),
            seq_names.len()
        ),
    })?;
    let residues: HashMap<usize, ResidueAtoms> = placement
        .into_iter()
        .zip(observed)
        .map(|(j, r)| (j, r.clone()))
        .collect();
    let date = dates.into_iter().min();
    Ok(assemble(
        id, chain, None, &seq_names, &residues, resolution, date, method,
    ))
}

/// Place observed residues (in order) on the sequence: an increasing map `i → j` that prefers
/// identical residue types (cost 100 per mismatch) and steps that follow the author numbering
/// (cost 1 per step whose sequence gap differs from the numbering gap). O(n·m) dynamic programme.
fn align_observed(seq: &[String], obs: &[&ResidueAtoms]) -> Option<Vec<usize>> {
    let (n, m) = (obs.len(), seq.len());
    if n > m || n == 0 {
        return None;
    }
    let same = |i: usize, j: usize| aatype_of_name(&obs[i].name) == aatype_of_name(&seq[j]);
    let inf = u64::MAX / 4;
    let mut cost = vec![inf; n * m];
    let mut back = vec![usize::MAX; n * m];
    for (j, c) in cost.iter_mut().enumerate().take(m) {
        *c = if same(0, j) { 0 } else { 100 };
    }
    for i in 1..n {
        let dnum = i64::from(obs[i].author_number.unwrap_or(0))
            - i64::from(obs[i - 1].author_number.unwrap_or(0));
        // prefix minimum of the previous row.
        let mut best = inf;
        let mut best_j = usize::MAX;
        for j in i..m {
            let pj = j - 1;
            if cost[(i - 1) * m + pj] < best {
                best = cost[(i - 1) * m + pj];
                best_j = pj;
            }
            let mut c = best.saturating_add(1);
            let mut b = best_j;
            let follow = j as i64 - dnum;
            if follow >= 0 && (follow as usize) < j {
                let fc = cost[(i - 1) * m + follow as usize];
                if fc < c {
                    c = fc;
                    b = follow as usize;
                }
            }
            let mis = if same(i, j) { 0 } else { 100 };
            cost[i * m + j] = c.saturating_add(mis);
            back[i * m + j] = b;
        }
    }
    let (mut j, _) = (0..m)
        .map(|j| (j, cost[(n - 1) * m + j]))
        .min_by_key(|&(_, c)| c)?;
    let mut out = vec![0; n];
    for i in (0..n).rev() {
        out[i] = j;
        if i > 0 {
            j = back[i * m + j];
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CIF: &str = "data_T
loop_
_entity_poly.entity_id
_entity_poly.type
1 'polypeptide(L)'
loop_
_atom_site.group_PDB
_atom_site.type_symbol
_atom_site.label_atom_id
_atom_site.label_alt_id
_atom_site.label_comp_id
_atom_site.label_asym_id
_atom_site.label_entity_id
_atom_site.label_seq_id
_atom_site.Cartn_x
_atom_site.Cartn_y
_atom_site.Cartn_z
_atom_site.occupancy
_atom_site.auth_seq_id
_atom_site.auth_asym_id
_atom_site.pdbx_PDB_model_num
ATOM N N . GLY A 1 1 1.0 0.0 0.0 1.0 10 X 1
ATOM C CA A GLY A 1 1 2.0 0.0 0.0 0.4 10 X 1
ATOM C CA B GLY A 1 1 3.0 0.0 0.0 0.6 10 X 1
ATOM H H . GLY A 1 1 9.0 9.0 9.0 1.0 10 X 1
HETATM SE SE . MSE A 1 2 4.0 0.0 0.0 1.0 11 X 1
HETATM C CA . MSE A 1 2 5.0 0.0 0.0 1.0 11 X 1
HETATM O O . HOH B 2 . 7.0 0.0 0.0 1.0 99 X 1
ATOM N N . GLY A 1 1 8.0 0.0 0.0 1.0 10 X 2
";

    #[test]
    fn altloc_hydrogen_mse_models_and_label_fallback() {
        let c = parse_mmcif(CIF, Path::new("t.cif"), "t", "X").unwrap();
        assert_eq!(c.sequence, "GM"); // no _entity_poly_seq: from the model's residues
        assert_eq!(c.author_residue_number, vec![Some(10), Some(11)]);
        assert_eq!(c.positions[0], 1.0); // model 1 only
        assert_eq!(c.positions[3], 3.0); // CA altloc B (occupancy 0.6)
        let sd = atom37_index("SD").unwrap();
        assert_eq!(c.mask[37 + sd], 1.0);
        assert_eq!(c.positions[(37 + sd) * 3], 4.0);
        let n_atoms: f32 = c.mask.iter().sum();
        assert_eq!(n_atoms, 4.0); // N, CA | SD, CA: hydrogen and water dropped
                                  // The label chain id works when no author chain matches.
        let by_label = parse_mmcif(CIF, Path::new("t.cif"), "t", "A").unwrap();
        assert_eq!(by_label.sequence, "GM");
        let e = parse_mmcif(CIF, Path::new("t.cif"), "t", "Q")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("t.cif") && e.contains("`Q`") && e.contains("[X]"),
            "{e}"
        );
    }

    #[test]
    fn pdb_dates() {
        assert_eq!(pdb_date_to_iso("23-DEC-96").as_deref(), Some("1996-12-23"));
        assert_eq!(pdb_date_to_iso("02-NOV-22").as_deref(), Some("2022-11-02"));
        assert_eq!(pdb_date_to_iso("garbage"), None);
    }

    #[test]
    fn alignment_follows_numbering() {
        let seq: Vec<String> = ["GLY", "ALA", "ALA", "ALA", "GLY"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let mk = |n: &str, k: i32| {
            let mut r = ResidueAtoms::new(n);
            r.author_number = Some(k);
            r
        };
        // Residues 1 (G), 3 (A), 4 (A): the middle A must land on index 2, not 1.
        let obs = [mk("GLY", 1), mk("ALA", 3), mk("ALA", 4)];
        let refs: Vec<&ResidueAtoms> = obs.iter().collect();
        assert_eq!(align_observed(&seq, &refs).unwrap(), vec![0, 2, 3]);
    }
}
