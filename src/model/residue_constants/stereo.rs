//! Stereochemistry used by the structural-violation losses (AF2 supplement 1.9.11): van der Waals
//! radii, the between-residue peptide-bond constants, a parser for `stereo_chemical_props.txt`
//! (Engh & Huber 1991 bond lengths and angles) and the within-residue distance bounds.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

use crate::error::{Error, Result};

use super::alphabet::{RESNAMES, RESTYPE_NUM, RESTYPE_NUM_WITH_X};
use super::atoms::{
    restype_atom14_mask, restype_atom14_to_atom37, ATOM14_NUM, ATOM_TYPES, ATOM_TYPE_NUM,
    RESTYPE_ATOM14_NAMES,
};

/// Van der Waals radii (Å) by element (first letter of the atom name).
pub const VAN_DER_WAALS_RADIUS: [(char, f64); 4] =
    [('C', 1.7), ('N', 1.55), ('O', 1.52), ('S', 1.8)];

/// Van der Waals radius of an element letter (`None` for elements outside C/N/O/S).
pub fn van_der_waals_radius(element: char) -> Option<f64> {
    VAN_DER_WAALS_RADIUS
        .iter()
        .find(|(e, _)| *e == element)
        .map(|&(_, r)| r)
}

/// Peptide C–N bond length (Å): `[non-PRO, PRO]` (next residue PRO).
pub const BETWEEN_RES_BOND_LENGTH_C_N: [f64; 2] = [1.329, 1.341];
/// Stddev of the peptide C–N bond length: `[non-PRO, PRO]`.
pub const BETWEEN_RES_BOND_LENGTH_STDDEV_C_N: [f64; 2] = [0.014, 0.016];
/// Cosine of the CA–C–N angle and its stddev. NOTE: AF2/OpenFold's loss uses the C–N *bond*
/// stddev (0.014) for this angle, not the 0.0311 stored here.
pub const BETWEEN_RES_COS_ANGLES_CA_C_N: [f64; 2] = [-0.4473, 0.0311];
/// Cosine of the C–N–CA angle and its stddev.
pub const BETWEEN_RES_COS_ANGLES_C_N_CA: [f64; 2] = [-0.5203, 0.0353];
/// Ideal CA–CA distance (Å) of consecutive trans residues.
pub const CA_CA: f64 = 3.80209737096;

/// Float32 peptide C–N target as OpenFold builds it (`bool_tensor * python_float` → float32):
/// `f32(1.329)` or `f32(1.341)` when the next residue is PRO.
pub fn c_n_bond_target_f32(next_is_pro: bool) -> f32 {
    BETWEEN_RES_BOND_LENGTH_C_N[usize::from(next_is_pro)] as f32
}

/// Float32 peptide C–N stddev (`f32(0.014)` / `f32(0.016)`).
pub fn c_n_bond_stddev_f32(next_is_pro: bool) -> f32 {
    BETWEEN_RES_BOND_LENGTH_STDDEV_C_N[usize::from(next_is_pro)] as f32
}

/// Float32 `tolerance_factor · stddev` as OpenFold computes it (product in float32), e.g.
/// `12 · f32(0.014)` = 0.16800001.
pub fn c_n_bond_tolerance_f32(next_is_pro: bool, tolerance_factor: f64) -> f32 {
    tolerance_factor as f32 * c_n_bond_stddev_f32(next_is_pro)
}

/// A bond (or virtual 1–3 bond): atom names, ideal length and stddev in Å.
#[derive(Debug, Clone, PartialEq)]
pub struct Bond {
    pub atom1: String,
    pub atom2: String,
    pub length: f64,
    pub stddev: f64,
}

/// A bond angle atom1–atom2–atom3 (atom2 the vertex), ideal angle and stddev in radians.
#[derive(Debug, Clone, PartialEq)]
pub struct BondAngle {
    pub atom1: String,
    pub atom2: String,
    pub atom3: String,
    pub angle_rad: f64,
    pub stddev_rad: f64,
}

/// Parsed `stereo_chemical_props.txt`, keyed by 3-letter residue name (`UNK` present, empty).
#[derive(Debug, Clone, Default)]
pub struct StereoChemicalProps {
    pub residue_bonds: BTreeMap<String, Vec<Bond>>,
    /// 1–3 distances across each bond angle (law of cosines, first-order error propagation).
    pub residue_virtual_bonds: BTreeMap<String, Vec<Bond>>,
    pub residue_bond_angles: BTreeMap<String, Vec<BondAngle>>,
}

fn parse_err(path: &Path, line: usize, msg: impl Into<String>) -> Error {
    Error::Parse {
        path: path.to_path_buf(),
        line,
        msg: msg.into(),
    }
}

fn parse_f64(path: &Path, line: usize, s: &str) -> Result<f64> {
    s.parse::<f64>()
        .map_err(|e| parse_err(path, line, format!("bad number `{s}`: {e}")))
}

/// Parse the text of `stereo_chemical_props.txt`: a header line, `A-B RES mean stddev` bond rows
/// until a `-` line, a blank line and a header, `A-B-C RES mean_deg stddev_deg` angle rows until
/// `-`; the rest (non-bonded distances) is ignored. `path` is only used in error messages.
/// Virtual bonds are derived as in AF2: `l = sqrt(l1² + l2² − 2 l1 l2 cos γ)` with
/// `σ² = (∂l/∂γ σγ)² + (∂l/∂l1 σ1)² + (∂l/∂l2 σ2)²`.
pub fn parse_stereo_chemical_props(text: &str, path: &Path) -> Result<StereoChemicalProps> {
    let mut props = StereoChemicalProps::default();
    let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l));
    lines.next(); // header
    let mut closed = false;
    for (ln, line) in lines.by_ref() {
        if line.trim() == "-" {
            closed = true;
            break;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        let [bond, res, len, sd] = f[..] else {
            return Err(parse_err(path, ln, "expected `A-B RES length stddev`"));
        };
        let Some((a1, a2)) = bond.split_once('-') else {
            return Err(parse_err(path, ln, format!("bad bond `{bond}`")));
        };
        props
            .residue_bonds
            .entry(res.to_string())
            .or_default()
            .push(Bond {
                atom1: a1.to_string(),
                atom2: a2.to_string(),
                length: parse_f64(path, ln, len)?,
                stddev: parse_f64(path, ln, sd)?,
            });
    }
    if !closed {
        return Err(parse_err(path, 0, "bond section not terminated by `-`"));
    }
    props.residue_bonds.entry("UNK".into()).or_default();
    lines.next(); // blank line
    lines.next(); // header
    closed = false;
    for (ln, line) in lines.by_ref() {
        if line.trim() == "-" {
            closed = true;
            break;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        let [angle, res, deg, sd_deg] = f[..] else {
            return Err(parse_err(path, ln, "expected `A-B-C RES angle stddev`"));
        };
        let names: Vec<&str> = angle.split('-').collect();
        let [a1, a2, a3] = names[..] else {
            return Err(parse_err(path, ln, format!("bad angle `{angle}`")));
        };
        props
            .residue_bond_angles
            .entry(res.to_string())
            .or_default()
            .push(BondAngle {
                atom1: a1.to_string(),
                atom2: a2.to_string(),
                atom3: a3.to_string(),
                angle_rad: parse_f64(path, ln, deg)? / 180.0 * std::f64::consts::PI,
                stddev_rad: parse_f64(path, ln, sd_deg)? / 180.0 * std::f64::consts::PI,
            });
    }
    if !closed {
        return Err(parse_err(path, 0, "angle section not terminated by `-`"));
    }
    props.residue_bond_angles.entry("UNK".into()).or_default();

    let find = |bonds: &[Bond], x: &str, y: &str| -> Option<Bond> {
        bonds
            .iter()
            .find(|b| (b.atom1 == x && b.atom2 == y) || (b.atom1 == y && b.atom2 == x))
            .cloned()
    };
    for (res, angles) in &props.residue_bond_angles {
        let bonds = props
            .residue_bonds
            .get(res)
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        let mut virt = Vec::with_capacity(angles.len());
        for ba in angles {
            let (Some(b1), Some(b2)) = (
                find(bonds, &ba.atom1, &ba.atom2),
                find(bonds, &ba.atom2, &ba.atom3),
            ) else {
                return Err(parse_err(
                    path,
                    0,
                    format!(
                        "{res}: angle {}-{}-{} lacks a bond",
                        ba.atom1, ba.atom2, ba.atom3
                    ),
                ));
            };
            let gamma = ba.angle_rad;
            let (l1, l2) = (b1.length, b2.length);
            let length = (l1 * l1 + l2 * l2 - 2.0 * l1 * l2 * gamma.cos()).sqrt();
            let dl_outer = 0.5 / length;
            let dl_dgamma = (2.0 * l1 * l2 * gamma.sin()) * dl_outer;
            let dl_db1 = (2.0 * l1 - 2.0 * l2 * gamma.cos()) * dl_outer;
            let dl_db2 = (2.0 * l2 - 2.0 * l1 * gamma.cos()) * dl_outer;
            let stddev = ((dl_dgamma * ba.stddev_rad).powi(2)
                + (dl_db1 * b1.stddev).powi(2)
                + (dl_db2 * b2.stddev).powi(2))
            .sqrt();
            virt.push(Bond {
                atom1: ba.atom1.clone(),
                atom2: ba.atom3.clone(),
                length,
                stddev,
            });
        }
        props.residue_virtual_bonds.insert(res.clone(), virt);
    }
    Ok(props)
}

/// Read and parse `stereo_chemical_props.txt` from `path` (data-root relative paths are resolved
/// by the caller).
pub fn load_stereo_chemical_props(path: &Path) -> Result<StereoChemicalProps> {
    let text = std::fs::read_to_string(path).map_err(|err| Error::Io {
        path: path.to_path_buf(),
        err,
    })?;
    parse_stereo_chemical_props(&text, path)
}

/// `[restype][atom14 i][atom14 j]` float32 table.
pub type PairTable = [[[f32; ATOM14_NUM]; ATOM14_NUM]; RESTYPE_NUM_WITH_X];

/// Within-residue distance bounds (float32 exactly as AF2/OpenFold `make_atom14_dists_bounds`).
#[derive(Debug, Clone)]
pub struct Atom14DistsBounds {
    pub lower: Box<PairTable>,
    pub upper: Box<PairTable>,
    pub stddev: Box<PairTable>,
}

/// Within-residue distance bounds: for each ordered pair of distinct atoms of a restype,
/// `lower = r_a + r_b − overlap_tolerance`, `upper = 1e10`; then for every bond and virtual bond
/// `length ∓ bond_length_tolerance_factor · stddev` (both directions, stddev stored). Computed in
/// f64 and rounded to f32 at the end. Unused slots, the diagonal and UNK stay 0. The loss uses
/// `overlap_tolerance = 1.5`, `bond_length_tolerance_factor = 12`.
pub fn make_atom14_dists_bounds(
    props: &StereoChemicalProps,
    overlap_tolerance: f64,
    bond_length_tolerance_factor: f64,
) -> Result<Atom14DistsBounds> {
    let mut lower = Box::new([[[0.0f32; ATOM14_NUM]; ATOM14_NUM]; RESTYPE_NUM_WITH_X]);
    let mut upper = lower.clone();
    let mut stddev = lower.clone();
    let radius = |name: &str| -> Result<f64> {
        name.chars()
            .next()
            .and_then(van_der_waals_radius)
            .ok_or_else(|| Error::Data {
                what: "stereochemistry".into(),
                msg: format!("no radius for `{name}`"),
            })
    };
    for r in 0..RESTYPE_NUM {
        let names = &RESTYPE_ATOM14_NAMES[r];
        for (i, a) in names.iter().enumerate().filter(|(_, a)| !a.is_empty()) {
            let ra = radius(a)?;
            for (j, b) in names.iter().enumerate().filter(|(_, b)| !b.is_empty()) {
                if i == j {
                    continue;
                }
                let lo = ra + radius(b)? - overlap_tolerance;
                lower[r][i][j] = lo as f32;
                lower[r][j][i] = lo as f32;
                upper[r][i][j] = 1e10;
                upper[r][j][i] = 1e10;
            }
        }
        let resname = RESNAMES[r];
        let empty = Vec::new();
        let bonds = props.residue_bonds.get(resname).unwrap_or(&empty);
        let virt = props.residue_virtual_bonds.get(resname).unwrap_or(&empty);
        for b in bonds.iter().chain(virt.iter()) {
            let slot = |n: &str| {
                names
                    .iter()
                    .position(|x| *x == n)
                    .ok_or_else(|| Error::Data {
                        what: "stereochemistry".into(),
                        msg: format!("{resname}: bond atom `{n}` not in residue"),
                    })
            };
            let (i, j) = (slot(&b.atom1)?, slot(&b.atom2)?);
            let lo = (b.length - bond_length_tolerance_factor * b.stddev) as f32;
            let hi = (b.length + bond_length_tolerance_factor * b.stddev) as f32;
            lower[r][i][j] = lo;
            lower[r][j][i] = lo;
            upper[r][i][j] = hi;
            upper[r][j][i] = hi;
            stddev[r][i][j] = b.stddev as f32;
            stddev[r][j][i] = b.stddev as f32;
        }
    }
    Ok(Atom14DistsBounds {
        lower,
        upper,
        stddev,
    })
}

/// Van der Waals radius of each atom37 type (by its first letter), f64.
pub fn atomtype_radius() -> &'static [f64; ATOM_TYPE_NUM] {
    static CELL: OnceLock<[f64; ATOM_TYPE_NUM]> = OnceLock::new();
    CELL.get_or_init(|| {
        let mut t = [0.0; ATOM_TYPE_NUM];
        for (v, name) in t.iter_mut().zip(ATOM_TYPES.iter()) {
            *v = name
                .chars()
                .next()
                .and_then(van_der_waals_radius)
                .unwrap_or(0.0);
        }
        t
    })
}

/// Van der Waals radius per atom14 slot (0 for empty slots and UNK), f64.
pub fn restype_atom14_radius() -> &'static [[f64; ATOM14_NUM]; RESTYPE_NUM_WITH_X] {
    static CELL: OnceLock<[[f64; ATOM14_NUM]; RESTYPE_NUM_WITH_X]> = OnceLock::new();
    CELL.get_or_init(|| {
        let mut t = [[0.0; ATOM14_NUM]; RESTYPE_NUM_WITH_X];
        let (map, mask) = (restype_atom14_to_atom37(), restype_atom14_mask());
        for r in 0..RESTYPE_NUM_WITH_X {
            for i in 0..ATOM14_NUM {
                t[r][i] = f64::from(mask[r][i]) * atomtype_radius()[map[r][i]];
            }
        }
        t
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "Bond\tResidue\tMean\tStdDev\n\
        CA-CB\tALA\t1.520\t0.021\nN-CA\tALA\t1.459\t0.020\n-\n\n\
        Angle\tResidue\tMean\tStdDev\nN-CA-CB\tALA\t90.0\t0.0\n-\n";

    #[test]
    fn parses_and_builds_virtual_bond() {
        let p = parse_stereo_chemical_props(SAMPLE, Path::new("sample")).unwrap();
        assert_eq!(p.residue_bonds["ALA"].len(), 2);
        assert!(p.residue_bonds["UNK"].is_empty());
        let a = &p.residue_bond_angles["ALA"][0];
        assert!((a.angle_rad - std::f64::consts::FRAC_PI_2).abs() < 1e-15);
        let v = &p.residue_virtual_bonds["ALA"][0];
        assert_eq!((v.atom1.as_str(), v.atom2.as_str()), ("N", "CB"));
        // Right angle: Pythagoras.
        assert!((v.length - (1.52f64.powi(2) + 1.459f64.powi(2)).sqrt()).abs() < 1e-12);
        assert!(parse_stereo_chemical_props("h\nCA-CB ALA x 1\n-\n", Path::new("s")).is_err());
    }

    #[test]
    fn radii() {
        assert_eq!(van_der_waals_radius('S'), Some(1.8));
        assert_eq!(atomtype_radius()[0], 1.55);
        assert_eq!(restype_atom14_radius()[20], [0.0; ATOM14_NUM]);
        assert_eq!(c_n_bond_tolerance_f32(false, 12.0), 0.168_000_01_f32);
    }
}
