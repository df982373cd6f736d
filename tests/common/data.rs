//! Small datasets for end-to-end tests, cut from the shipped sample manifest.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// Write `dir/manifest.toml` holding only the entries `ids` of `datasets/sample.toml` (paths stay
/// relative to the data root). One training chain overfits fast; one validation chain evaluates fast.
pub fn manifest_subset(dir: &Path, ids: &[&str]) -> PathBuf {
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("datasets/sample.toml");
    let text = std::fs::read_to_string(&sample).expect("datasets/sample.toml");
    let mut parts = text.split("[[entries]]\n");
    let mut out = parts.next().unwrap_or_default().to_string();
    for block in parts {
        if ids
            .iter()
            .any(|id| block.starts_with(&format!("id = \"{id}\"")))
        {
            out.push_str("[[entries]]\n");
            out.push_str(block);
        }
    }
    let p = dir.join("manifest.toml");
    std::fs::write(&p, out).expect("write manifest");
    p
}
