//! Multiple sequence alignments: a3m, Stockholm and hhr parsers, merging and de-duplication
//! (OpenFold `parsers.parse_a3m` / `parse_stockholm` / `make_msa_features` semantics).
//!
//! Tokens are stored in the HHblits alphabet (`A=0, C=1, … Y=19, X=20, gap=21`), exactly as
//! OpenFold's raw `msa` feature; [`super::alphabet::HHBLITS_TO_AATYPE`] maps them to aatype order.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use super::alphabet::hhblits_id;
use crate::error::{Error, Result};

/// One parsed alignment file: aligned rows (query columns only, upper case / `-`) and deletions.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ParsedMsa {
    /// Sequence names (header text without `>`).
    pub names: Vec<String>,
    /// Aligned sequences, each exactly as long as the query.
    pub aligned: Vec<Vec<u8>>,
    /// Deletions before each aligned column (lower-case a3m residues / query-gap Stockholm columns).
    pub deletions: Vec<Vec<u32>>,
    /// 1-based line where each sequence starts (for error messages).
    pub lines: Vec<usize>,
}

impl ParsedMsa {
    /// The query (first sequence) without gaps.
    pub fn query_ungapped(&self) -> String {
        self.aligned
            .first()
            .map(|q| {
                q.iter()
                    .filter(|&&c| c != b'-')
                    .map(|&c| c as char)
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// A merged MSA in HHblits tokens, row-major `[rows, width]`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Msa {
    pub rows: usize,
    pub width: usize,
    /// HHblits ids (0..=21).
    pub tokens: Vec<u8>,
    /// Deletion counts.
    pub deletions: Vec<u32>,
}

impl Msa {
    /// Row `r` of the tokens.
    pub fn row(&self, r: usize) -> &[u8] {
        &self.tokens[r * self.width..(r + 1) * self.width]
    }
}

fn check_width(p: &ParsedMsa, path: &Path) -> Result<()> {
    let Some(w) = p.aligned.first().map(Vec::len) else {
        return Err(Error::parse(
            path,
            0,
            "alignment has no sequences (empty MSA file)",
        ));
    };
    for (i, row) in p.aligned.iter().enumerate() {
        if row.len() != w {
            return Err(Error::parse(
                path,
                p.lines[i],
                format!(
                    "sequence `{}` has {} aligned columns, the query has {w}",
                    p.names[i],
                    row.len()
                ),
            ));
        }
    }
    Ok(())
}

/// Parse a3m text: `>` headers, lower-case letters are insertions (deletion counts), `#` lines and
/// blank lines are skipped.
pub fn parse_a3m(text: &str, path: &Path) -> Result<ParsedMsa> {
    let mut out = ParsedMsa::default();
    let mut cur: Option<(Vec<u8>, Vec<u32>, u32)> = None;
    let flush = |out: &mut ParsedMsa, cur: Option<(Vec<u8>, Vec<u32>, u32)>| {
        if let Some((a, d, _)) = cur {
            out.aligned.push(a);
            out.deletions.push(d);
        }
    };
    for (ln, line) in text.lines().enumerate() {
        let line = line.trim();
        if let Some(name) = line.strip_prefix('>') {
            flush(&mut out, cur.take());
            out.names.push(name.to_string());
            out.lines.push(ln + 1);
            cur = Some((Vec::new(), Vec::new(), 0));
            continue;
        }
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((aligned, dels, count)) = cur.as_mut() else {
            return Err(Error::parse(
                path,
                ln + 1,
                "sequence data before the first `>` header",
            ));
        };
        for &c in line.as_bytes() {
            if c.is_ascii_lowercase() {
                *count += 1;
            } else if c == b'.' {
                // Insert-state gap in some a3m writers: neither a column nor a deletion.
            } else {
                if hhblits_id(c).is_none() {
                    return Err(Error::parse(
                        path,
                        ln + 1,
                        format!("invalid character `{}` in sequence", c as char),
                    ));
                }
                aligned.push(c);
                dels.push(*count);
                *count = 0;
            }
        }
    }
    flush(&mut out, cur);
    check_width(&out, path)?;
    Ok(out)
}

/// Parse a Stockholm alignment (jackhmmer output): rows are concatenated across blocks by name;
/// columns where the query has a gap become deletion counts of the following column.
pub fn parse_stockholm(text: &str, path: &Path) -> Result<ParsedMsa> {
    let mut names: Vec<String> = Vec::new();
    let mut seqs: Vec<Vec<u8>> = Vec::new();
    let mut lines = Vec::new();
    let mut index: std::collections::HashMap<String, usize> = Default::default();
    for (ln, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with("//") {
            continue;
        }
        let mut it = line.split_whitespace();
        let (Some(name), Some(seq), None) = (it.next(), it.next(), it.next()) else {
            return Err(Error::parse(path, ln + 1, "expected `name sequence`"));
        };
        let i = *index.entry(name.to_string()).or_insert_with(|| {
            names.push(name.to_string());
            seqs.push(Vec::new());
            lines.push(ln + 1);
            seqs.len() - 1
        });
        seqs[i].extend_from_slice(seq.as_bytes());
    }
    let Some(query) = seqs.first().cloned() else {
        return Err(Error::parse(
            path,
            0,
            "alignment has no sequences (empty MSA file)",
        ));
    };
    let mut out = ParsedMsa {
        names,
        lines,
        ..Default::default()
    };
    for (i, s) in seqs.iter().enumerate() {
        if s.len() != query.len() {
            return Err(Error::parse(
                path,
                out.lines[i],
                format!(
                    "sequence `{}` has {} columns, the query has {}",
                    out.names[i],
                    s.len(),
                    query.len()
                ),
            ));
        }
        let mut aligned = Vec::with_capacity(query.len());
        let mut dels = Vec::with_capacity(query.len());
        let mut count = 0u32;
        for (&c, &q) in s.iter().zip(&query) {
            if c != b'-' || q != b'-' {
                if q == b'-' {
                    count += 1;
                } else {
                    let c = if c == b'.' {
                        b'-'
                    } else {
                        c.to_ascii_uppercase()
                    };
                    if hhblits_id(c).is_none() {
                        return Err(Error::parse(
                            path,
                            out.lines[i],
                            format!("invalid character `{}` in sequence", c as char),
                        ));
                    }
                    aligned.push(c);
                    dels.push(count);
                    count = 0;
                }
            }
        }
        out.aligned.push(aligned);
        out.deletions.push(dels);
    }
    check_width(&out, path)?;
    Ok(out)
}

/// Alignment formats by file extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MsaFormat {
    A3m,
    Stockholm,
}

impl MsaFormat {
    /// Format of a file name (`.a3m`, `.sto`), None for anything else (e.g. `.hhr`).
    pub fn of(name: &str) -> Option<MsaFormat> {
        let lower = name.to_ascii_lowercase();
        if lower.ends_with(".a3m") {
            Some(MsaFormat::A3m)
        } else if lower.ends_with(".sto") {
            Some(MsaFormat::Stockholm)
        } else {
            None
        }
    }
}

/// Parse one alignment file's text by format.
pub fn parse_msa_text(text: &str, path: &Path, fmt: MsaFormat) -> Result<ParsedMsa> {
    match fmt {
        MsaFormat::A3m => parse_a3m(text, path),
        MsaFormat::Stockholm => parse_stockholm(text, path),
    }
}

/// Merge parsed files in the order given, removing exact duplicate aligned sequences (first kept),
/// as OpenFold's `make_msa_features`. The query of the first file becomes row 0.
pub fn merge(parts: &[ParsedMsa]) -> Msa {
    let width = parts
        .iter()
        .find_map(|p| p.aligned.first().map(Vec::len))
        .unwrap_or(0);
    let mut seen: HashSet<&[u8]> = HashSet::new();
    let mut msa = Msa {
        width,
        ..Default::default()
    };
    for p in parts {
        for (a, d) in p.aligned.iter().zip(&p.deletions) {
            if a.len() != width || !seen.insert(a.as_slice()) {
                continue;
            }
            msa.tokens
                .extend(a.iter().map(|&c| hhblits_id(c).unwrap_or(20)));
            msa.deletions.extend_from_slice(d);
            msa.rows += 1;
        }
    }
    msa
}

/// One alignment file's content: a display path (file or `db:key/file`), its name and text.
#[derive(Debug, Clone)]
pub struct AlignmentText {
    pub path: PathBuf,
    pub name: String,
    pub text: String,
}

/// Every `.a3m` / `.sto` file in a directory (OpenFold `<pdb>_<chain>/` or the sample's
/// `<split>/alignments/<id>/`), sorted by name.
pub fn read_alignment_dir(dir: &Path) -> Result<Vec<AlignmentText>> {
    let rd = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut out = Vec::new();
    for ent in rd {
        let ent = ent.map_err(|e| Error::io(dir, e))?;
        let name = ent.file_name().to_string_lossy().into_owned();
        if MsaFormat::of(&name).is_none() {
            continue;
        }
        let path = ent.path();
        let text = super::cif::read_text(&path)?;
        out.push(AlignmentText { path, name, text });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Parse alignment files (sorted by name), check that each query equals `sequence`, and merge.
/// `sequence` uses one-letter codes; an `X` in it matches any query letter.
pub fn build_msa(files: &[AlignmentText], sequence: &str) -> Result<Msa> {
    let mut files: Vec<&AlignmentText> = files
        .iter()
        .filter(|f| MsaFormat::of(&f.name).is_some())
        .collect();
    files.sort_by(|a, b| a.name.cmp(&b.name));
    let mut parts = Vec::with_capacity(files.len());
    for f in files {
        let Some(fmt) = MsaFormat::of(&f.name) else {
            continue;
        };
        let p = parse_msa_text(&f.text, &f.path, fmt)?;
        let q = p.query_ungapped();
        let matches = q.len() == sequence.len()
            && q.bytes()
                .zip(sequence.bytes())
                .all(|(a, b)| a == b || b == b'X' || a == b'X');
        if !matches {
            return Err(Error::Data {
                what: f.path.display().to_string(),
                msg: format!(
                    "MSA query (line {}) differs from the chain sequence:\n  query {q}\n  chain {sequence}",
                    p.lines.first().copied().unwrap_or(0)
                ),
            });
        }
        parts.push(p);
    }
    if parts.is_empty() {
        // No alignments: the query alone (AF2 single-sequence mode).
        let tokens: Vec<u8> = sequence
            .bytes()
            .map(|c| hhblits_id(c).unwrap_or(20))
            .collect();
        return Ok(Msa {
            rows: 1,
            width: tokens.len(),
            deletions: vec![0; tokens.len()],
            tokens,
        });
    }
    Ok(merge(&parts))
}

/// One hit of an HHsearch `.hhr` file (for templates).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HhrHit {
    /// 1-based hit number (`No N`).
    pub index: usize,
    /// Hit name (first word of the `>` line, e.g. `1HF9_B`).
    pub name: String,
    pub description: String,
    pub probability: f64,
    pub e_value: f64,
    pub aligned_cols: usize,
    pub sum_probs: f64,
    /// Aligned query / template strings (same length, `-` gaps).
    pub query: String,
    pub hit_sequence: String,
    /// 0-based query / template residue index per alignment column (-1 at gaps).
    pub indices_query: Vec<i32>,
    pub indices_hit: Vec<i32>,
}

/// Parse the hit alignments of an `.hhr` file.
pub fn parse_hhr(text: &str, path: &Path) -> Result<Vec<HhrHit>> {
    let mut hits: Vec<HhrHit> = Vec::new();
    let mut q_start: Option<i32> = None;
    let mut t_start: Option<i32> = None;
    let finish = |h: &mut HhrHit, qs: Option<i32>, ts: Option<i32>| {
        let idx = |s: &str, start: Option<i32>| -> Vec<i32> {
            let mut k = start.unwrap_or(1) - 1;
            s.bytes()
                .map(|c| {
                    if c == b'-' {
                        -1
                    } else {
                        k += 1;
                        k - 1
                    }
                })
                .collect()
        };
        h.indices_query = idx(&h.query, qs);
        h.indices_hit = idx(&h.hit_sequence, ts);
    };
    for (ln, line) in text.lines().enumerate() {
        if let Some(n) = line.strip_prefix("No ") {
            if let Some(h) = hits.last_mut() {
                finish(h, q_start, t_start);
            }
            let index = n
                .trim()
                .parse()
                .map_err(|_| Error::parse(path, ln + 1, "bad hit number"))?;
            hits.push(HhrHit {
                index,
                ..Default::default()
            });
            q_start = None;
            t_start = None;
            continue;
        }
        let Some(h) = hits.last_mut() else {
            continue;
        };
        if let Some(rest) = line.strip_prefix('>') {
            let mut it = rest.splitn(2, ' ');
            h.name = it.next().unwrap_or("").to_string();
            h.description = it.next().unwrap_or("").trim().to_string();
        } else if line.starts_with("Probab=") {
            for kv in line.split_whitespace() {
                let Some((k, v)) = kv.split_once('=') else {
                    continue;
                };
                let v = v.trim_end_matches('%');
                let bad = || Error::parse(path, ln + 1, format!("bad value in `{kv}`"));
                match k {
                    "Probab" => h.probability = v.parse().map_err(|_| bad())?,
                    "E-value" => h.e_value = v.parse().map_err(|_| bad())?,
                    "Aligned_cols" => h.aligned_cols = v.parse().map_err(|_| bad())?,
                    "Sum_probs" => h.sum_probs = v.parse().map_err(|_| bad())?,
                    _ => {}
                }
            }
        } else if line.starts_with("Q ") || line.starts_with("T ") {
            let f: Vec<&str> = line.split_whitespace().collect();
            // `Q name start SEQ end (len)`; skip `Q ss_pred`, `Q Consensus`, `T ss_dssp`, ...
            if f.len() < 5 || f[1].starts_with("ss_") || f[1] == "Consensus" {
                continue;
            }
            let start: i32 = f[2]
                .parse()
                .map_err(|_| Error::parse(path, ln + 1, "bad alignment start"))?;
            if line.starts_with("Q ") {
                q_start.get_or_insert(start);
                h.query.push_str(f[3]);
            } else {
                t_start.get_or_insert(start);
                h.hit_sequence.push_str(f[3]);
            }
        }
    }
    if let Some(h) = hits.last_mut() {
        finish(h, q_start, t_start);
    }
    Ok(hits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a3m_deletions_and_dedup() {
        let text = "#comment\n>query\nAC-D\n>s1\nAcC-D\n>s2 dup of query\nAC-D\n>s3\nA-ddCD\n";
        let p = parse_a3m(text, Path::new("t.a3m")).unwrap();
        assert_eq!(p.aligned[1], b"AC-D");
        assert_eq!(p.deletions[1], vec![0, 1, 0, 0]);
        assert_eq!(p.deletions[3], vec![0, 0, 2, 0]);
        let m = merge(&[p]);
        // s1 has the same aligned sequence as the query: removed.
        assert_eq!(m.rows, 2);
        assert_eq!(m.row(1), &[0, 21, 1, 2]);
    }

    #[test]
    fn stockholm_blocks_and_query_gaps() {
        let text =
            "# STOCKHOLM 1.0\n#=GS a DE x\nquery AC-D\nhit   ACED\n\nquery EE\nhit   -E\n//\n";
        let p = parse_stockholm(text, Path::new("t.sto")).unwrap();
        assert_eq!(p.aligned[0], b"ACDEE");
        assert_eq!(p.aligned[1], b"ACD-E");
        assert_eq!(p.deletions[1], vec![0, 0, 1, 0, 0]);
    }

    #[test]
    fn errors_name_file_and_line() {
        let e = parse_a3m("", Path::new("e.a3m")).unwrap_err().to_string();
        assert!(e.contains("e.a3m") && e.contains("empty"), "{e}");
        let e = parse_a3m(">q\nACD\n>s\nAC\n", Path::new("w.a3m"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("w.a3m:3"), "{e}");
        let e = parse_a3m(">q\nAC1\n", Path::new("c.a3m"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("c.a3m:2"), "{e}");
    }
}
