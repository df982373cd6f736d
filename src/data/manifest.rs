//! Dataset manifests (`datasets/*.toml`): which chains a run uses and where their files are,
//! relative to the data root (`--data-root`, else `$FERROFOLD_DATA`, else `../shared/data/proteins`,
//! see [`crate::config::DataConfig::resolved_data_root`]).
//!
//! Two kinds:
//! * `kind = "sample"`: an explicit `[[entries]]` list (structure file + sha256, alignment files).
//! * `kind = "openfold"`: OpenFold's training layout, `[openfold]` with `mmcif_dir` (`<pdb>.cif`),
//!   and `alignment_dir` (`<pdb>_<chain>/*.a3m|*.sto`) or `alignment_db_index` (alignment_db); the
//!   chains are `chains = [...]` or every `<pdb>_<chain>` directory / index key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// Manifest kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ManifestKind {
    Sample,
    Openfold,
}

/// A file relative to the data root, with an optional sha256 (hex).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRef {
    pub path: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// Where a chain's alignments are.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DbRef {
    /// alignment_db index JSON, relative to the data root.
    pub index: PathBuf,
    /// Key in the index (`<pdb>_<chain>`).
    pub key: String,
}

/// One chain of a dataset.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// `<pdb>_<chain>`, e.g. `4zey_A`.
    pub id: String,
    /// Author chain id.
    pub chain: String,
    /// `train` / `val` / …
    pub split: String,
    pub structure: FileRef,
    /// Alignment files (merged in name order). Empty = single-sequence MSA.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alignments: Vec<FileRef>,
    /// Or: every `.a3m`/`.sto` in this directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alignment_dir: Option<PathBuf>,
    /// Or: an alignment_db entry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alignment_db: Option<DbRef>,
    /// Sequence-cluster size (sampling weight 1/size); None = 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<u32>,
    /// Metadata used by the training filters (filled when known).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resolution: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq_len: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sequence: Option<String>,
}

/// OpenFold directory layout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OpenFoldLayout {
    pub mmcif_dir: PathBuf,
    #[serde(default)]
    pub alignment_dir: Option<PathBuf>,
    #[serde(default)]
    pub alignment_db_index: Option<PathBuf>,
    /// Chains to use (`<pdb>_<chain>`); empty = all found.
    #[serde(default)]
    pub chains: Vec<String>,
    #[serde(default = "default_split")]
    pub split: String,
}

fn default_split() -> String {
    "train".into()
}

/// A dataset manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub kind: ManifestKind,
    #[serde(default)]
    pub description: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub openfold: Option<OpenFoldLayout>,
    #[serde(default)]
    pub entries: Vec<Entry>,
}

/// sha256 of a file, lower-case hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    Ok(sha256_hex(&bytes))
}

/// sha256 of bytes, lower-case hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let d = Sha256::digest(bytes);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

impl Manifest {
    /// Read a manifest TOML file.
    pub fn load(path: &Path) -> Result<Manifest> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        toml::from_str(&text).map_err(|e| {
            let line = e.span().map_or(0, |s| {
                text[..s.start.min(text.len())].lines().count().max(1)
            });
            Error::parse(path, line, e.message().to_string())
        })
    }

    /// Write as TOML.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text =
            toml::to_string(self).map_err(|e| Error::Msg(format!("manifest to TOML: {e}")))?;
        std::fs::write(path, text).map_err(|e| Error::io(path, e))
    }

    /// The chains of the dataset (for `openfold` manifests, expanded from the layout).
    pub fn resolve_entries(&self, root: &Path) -> Result<Vec<Entry>> {
        match self.kind {
            ManifestKind::Sample => Ok(self.entries.clone()),
            ManifestKind::Openfold => {
                let of = self.openfold.as_ref().ok_or_else(|| Error::Data {
                    what: "manifest".into(),
                    msg: "kind = \"openfold\" needs an [openfold] table".into(),
                })?;
                openfold_entries(of, root)
            }
        }
    }

    /// Check that every referenced file exists under `root` (and matches its sha256 when
    /// `verify_checksums`). The error lists everything that is missing or wrong, not just the first.
    pub fn check(&self, root: &Path, verify_checksums: bool) -> Result<Vec<Entry>> {
        if !root.is_dir() {
            return Err(Error::Data {
                what: root.display().to_string(),
                msg: "data root is not a directory (set --data-root or FERROFOLD_DATA)".into(),
            });
        }
        let entries = self.resolve_entries(root)?;
        let mut problems = Vec::new();
        for e in &entries {
            let mut files: Vec<&FileRef> = vec![&e.structure];
            files.extend(&e.alignments);
            for f in files {
                let p = root.join(&f.path);
                if !p.is_file() {
                    problems.push(format!("{}: missing {}", e.id, p.display()));
                } else if let (true, Some(want)) = (verify_checksums, &f.sha256) {
                    let got = sha256_file(&p)?;
                    if &got != want {
                        problems.push(format!(
                            "{}: sha256 mismatch for {} ({got} != {want})",
                            e.id,
                            p.display()
                        ));
                    }
                }
            }
            if let Some(d) = &e.alignment_dir {
                if !root.join(d).is_dir() {
                    problems.push(format!(
                        "{}: missing alignment directory {}",
                        e.id,
                        root.join(d).display()
                    ));
                }
            }
            if let Some(db) = &e.alignment_db {
                if !root.join(&db.index).is_file() {
                    problems.push(format!(
                        "{}: missing alignment_db index {}",
                        e.id,
                        root.join(&db.index).display()
                    ));
                }
            }
        }
        if problems.is_empty() {
            Ok(entries)
        } else {
            Err(Error::Data {
                what: format!("dataset under {}", root.display()),
                msg: format!(
                    "{} problem(s):\n  {}",
                    problems.len(),
                    problems.join("\n  ")
                ),
            })
        }
    }
}

fn openfold_entries(of: &OpenFoldLayout, root: &Path) -> Result<Vec<Entry>> {
    let mut chains: Vec<String> = of.chains.clone();
    if chains.is_empty() {
        if let Some(d) = &of.alignment_dir {
            let dir = root.join(d);
            for ent in std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
                let ent = ent.map_err(|e| Error::io(&dir, e))?;
                if ent.path().is_dir() {
                    chains.push(ent.file_name().to_string_lossy().into_owned());
                }
            }
        } else if let Some(idx) = &of.alignment_db_index {
            let db = super::alignment_db::AlignmentDb::open(&root.join(idx))?;
            chains.extend(db.index.keys().cloned());
        }
        chains.sort();
    }
    chains
        .iter()
        .map(|c| {
            let (pdb, chain) = c.rsplit_once('_').ok_or_else(|| Error::Data {
                what: c.clone(),
                msg: "OpenFold chain names are `<pdb>_<chain>`".into(),
            })?;
            Ok(Entry {
                id: c.clone(),
                chain: chain.to_string(),
                split: of.split.clone(),
                structure: FileRef {
                    path: of
                        .mmcif_dir
                        .join(format!("{}.cif", pdb.to_ascii_lowercase())),
                    sha256: None,
                },
                alignments: Vec::new(),
                alignment_dir: of.alignment_dir.as_ref().map(|d| d.join(c)),
                alignment_db: of.alignment_db_index.as_ref().map(|i| DbRef {
                    index: i.clone(),
                    key: c.clone(),
                }),
                cluster_size: None,
                resolution: None,
                seq_len: None,
                sequence: None,
            })
        })
        .collect()
}

/// Build the sample manifest from the data root's `index.json` (36 proteins): ids, chains, splits,
/// files with sha256, cluster sizes from identical sequences.
pub fn manifest_from_index(root: &Path) -> Result<Manifest> {
    let path = root.join("index.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let v: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::parse(&path, e.line(), e.to_string()))?;
    let items = v["entries"]
        .as_array()
        .ok_or_else(|| Error::parse(&path, 0, "no `entries` array"))?;
    let field = |e: &serde_json::Value, k: &str| -> Result<String> {
        e[k].as_str()
            .map(str::to_string)
            .ok_or_else(|| Error::parse(&path, 0, format!("entry without string `{k}`")))
    };
    let mut by_seq: BTreeMap<String, u32> = BTreeMap::new();
    for e in items {
        *by_seq.entry(field(e, "sequence")?).or_default() += 1;
    }
    let mut entries = Vec::new();
    for e in items {
        let id = field(e, "id")?;
        let chain = field(e, "chain_auth")?;
        let seq = field(e, "sequence")?;
        let mut alignments: Vec<FileRef> = e["msas"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|m| {
                        Some(FileRef {
                            path: PathBuf::from(m["file"].as_str()?),
                            sha256: m["sha256"].as_str().map(str::to_string),
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
        alignments.sort_by(|a, b| a.path.cmp(&b.path));
        entries.push(Entry {
            id: format!("{id}_{chain}"),
            chain,
            split: field(e, "split")?,
            structure: FileRef {
                path: PathBuf::from(field(e, "file")?),
                sha256: e["sha256"].as_str().map(str::to_string),
            },
            alignments,
            alignment_dir: None,
            alignment_db: None,
            cluster_size: by_seq.get(&seq).copied().filter(|&n| n > 1),
            resolution: e["resolution"].as_f64(),
            seq_len: Some(seq.len()),
            sequence: Some(seq),
        });
    }
    Ok(Manifest {
        kind: ManifestKind::Sample,
        description:
            "36-protein real-data sample (train/val) with MSAs; see SOURCES.md in the data root. \
                      Generated by `ferrofold data manifest` from index.json."
                .into(),
        openfold: None,
        entries,
    })
}
