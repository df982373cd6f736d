//! OpenFold's `alignment_db` format: alignment files of many chains concatenated into shard files,
//! plus a JSON index `{ "<pdb>_<chain>": { "db": "<shard file>", "files": [[name, offset, length], …] } }`.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::msa::AlignmentText;
use crate::error::{Error, Result};

/// `(key, [(file name, bytes)])` of one chain, for [`AlignmentDb::write`].
pub type ChainFiles = (String, Vec<(String, Vec<u8>)>);

/// One chain's entry in the index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DbEntry {
    /// Shard file name (relative to the index's directory).
    pub db: String,
    /// `(file name, byte offset, byte length)` in the shard.
    pub files: Vec<(String, u64, u64)>,
}

/// An opened alignment database (the index; shards are read on demand).
#[derive(Debug, Clone)]
pub struct AlignmentDb {
    pub dir: PathBuf,
    pub index_path: PathBuf,
    pub index: BTreeMap<String, DbEntry>,
}

impl AlignmentDb {
    /// Open `index.json`; shards are looked up next to it.
    pub fn open(index_path: &Path) -> Result<AlignmentDb> {
        let text = std::fs::read_to_string(index_path).map_err(|e| Error::io(index_path, e))?;
        let index: BTreeMap<String, DbEntry> = serde_json::from_str(&text)
            .map_err(|e| Error::parse(index_path, e.line(), format!("alignment_db index: {e}")))?;
        Ok(AlignmentDb {
            dir: index_path.parent().unwrap_or(Path::new(".")).to_path_buf(),
            index_path: index_path.to_path_buf(),
            index,
        })
    }

    /// The alignment files of one chain (`<pdb>_<chain>`), sorted by name.
    pub fn read(&self, key: &str) -> Result<Vec<AlignmentText>> {
        let entry = self.index.get(key).ok_or_else(|| Error::Data {
            what: self.index_path.display().to_string(),
            msg: format!("no alignments for `{key}` in the alignment_db index"),
        })?;
        let shard = self.dir.join(&entry.db);
        let mut f = std::fs::File::open(&shard).map_err(|e| Error::io(&shard, e))?;
        let mut out = Vec::with_capacity(entry.files.len());
        for (name, off, len) in &entry.files {
            let mut buf = vec![0u8; *len as usize];
            f.seek(SeekFrom::Start(*off))
                .and_then(|_| f.read_exact(&mut buf))
                .map_err(|e| Error::io(&shard, e))?;
            let path = PathBuf::from(format!("{}:{key}/{name}", shard.display()));
            let text = super::cif::bytes_to_text(buf, &path)?;
            out.push(AlignmentText {
                path,
                name: name.clone(),
                text,
            });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Write a one-shard database: `<dir>/<shard>` and `<dir>/<index_name>` from
    /// `(key, [(file name, bytes)])` pairs.
    pub fn write(
        dir: &Path,
        shard: &str,
        index_name: &str,
        chains: &[ChainFiles],
    ) -> Result<PathBuf> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let shard_path = dir.join(shard);
        let mut f = std::fs::File::create(&shard_path).map_err(|e| Error::io(&shard_path, e))?;
        let mut index = BTreeMap::new();
        let mut off = 0u64;
        for (key, files) in chains {
            let mut entry = DbEntry {
                db: shard.to_string(),
                files: Vec::new(),
            };
            for (name, bytes) in files {
                f.write_all(bytes).map_err(|e| Error::io(&shard_path, e))?;
                entry.files.push((name.clone(), off, bytes.len() as u64));
                off += bytes.len() as u64;
            }
            index.insert(key.clone(), entry);
        }
        let index_path = dir.join(index_name);
        let json = serde_json::to_string(&index).map_err(|e| Error::Msg(e.to_string()))?;
        std::fs::write(&index_path, json).map_err(|e| Error::io(&index_path, e))?;
        Ok(index_path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let dir = std::env::temp_dir().join(format!("ff-aldb-{}", std::process::id()));
        let chains = vec![
            (
                "1abc_A".to_string(),
                vec![
                    (
                        "b.sto".to_string(),
                        b"# STOCKHOLM 1.0\nquery AC\n//\n".to_vec(),
                    ),
                    ("a.a3m".to_string(), b">q\nAC\n".to_vec()),
                ],
            ),
            (
                "2xyz_B".to_string(),
                vec![("a.a3m".to_string(), b">q\nDD\n".to_vec())],
            ),
        ];
        let idx = AlignmentDb::write(&dir, "shard0.db", "index.json", &chains).unwrap();
        let db = AlignmentDb::open(&idx).unwrap();
        let files = db.read("1abc_A").unwrap();
        assert_eq!(files[0].name, "a.a3m");
        assert_eq!(files[0].text, ">q\nAC\n");
        assert_eq!(db.read("2xyz_B").unwrap()[0].text, ">q\nDD\n");
        let e = db.read("nope_A").unwrap_err().to_string();
        assert!(e.contains("nope_A"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
