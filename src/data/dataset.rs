//! From manifest entries to model inputs: parse the structure and alignments of one chain, apply
//! OpenFold's training filters, and compute sampling weights.

use std::path::Path;

use super::alignment_db::AlignmentDb;
use super::manifest::Entry;
use super::msa::{build_msa, read_alignment_dir, AlignmentText};
use super::structure::{parse_structure_file, Chain};
use super::transforms::ProteinInput;
use crate::config::DataConfig;
use crate::error::{Error, Result};

/// The alignment files of an entry (sorted by name).
pub fn entry_alignments(root: &Path, e: &Entry) -> Result<Vec<AlignmentText>> {
    if let Some(db) = &e.alignment_db {
        return AlignmentDb::open(&root.join(&db.index))?.read(&db.key);
    }
    if let Some(d) = &e.alignment_dir {
        return read_alignment_dir(&root.join(d));
    }
    let mut out = Vec::with_capacity(e.alignments.len());
    for f in &e.alignments {
        let path = root.join(&f.path);
        let text = super::cif::read_text(&path)?;
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        out.push(AlignmentText { path, name, text });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Parse one entry: its chain and merged MSA (query = chain sequence, checked).
pub fn load_entry(root: &Path, e: &Entry) -> Result<(Chain, ProteinInput)> {
    let chain = parse_structure_file(&root.join(&e.structure.path), &e.chain)?;
    let files = entry_alignments(root, e)?;
    let msa = build_msa(&files, &chain.sequence)?;
    let input = ProteinInput {
        id: e.id.clone(),
        aatype: chain.aatype.clone(),
        positions: chain.positions.clone(),
        mask: chain.mask.clone(),
        resolution: chain.resolution.unwrap_or(0.0),
        msa,
    };
    input.validate()?;
    Ok((chain, input))
}

/// Why a chain is excluded from training (OpenFold's deterministic filters), None if it passes.
pub fn filter_reason(cfg: &DataConfig, seq: &[u8], resolution: f32) -> Option<String> {
    if seq.len() < cfg.min_length {
        return Some(format!(
            "length {} < min_length {}",
            seq.len(),
            cfg.min_length
        ));
    }
    if resolution > 0.0 && resolution as f64 > cfg.max_resolution {
        return Some(format!("resolution {resolution} > {}", cfg.max_resolution));
    }
    let mut counts = [0usize; 21];
    for &a in seq {
        counts[(a as usize).min(20)] += 1;
    }
    let frac = counts.iter().max().copied().unwrap_or(0) as f64 / seq.len().max(1) as f64;
    if frac > cfg.max_single_residue_fraction {
        return Some(format!(
            "single-residue fraction {frac:.2} > {}",
            cfg.max_single_residue_fraction
        ));
    }
    None
}

/// OpenFold's stochastic training weight: `1/cluster_size · clamp(len, 256, 512)/512`.
pub fn sample_weight(seq_len: usize, cluster_size: Option<u32>) -> f64 {
    let mut w = seq_len.clamp(256, 512) as f64 / 512.0;
    if let Some(c) = cluster_size.filter(|&c| c > 0) {
        w /= c as f64;
    }
    w
}

/// A clear error for an entry that cannot be used.
pub fn entry_error(e: &Entry, msg: impl Into<String>) -> Error {
    Error::Data {
        what: e.id.clone(),
        msg: msg.into(),
    }
}
