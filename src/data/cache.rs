//! HDF5 feature cache: parsed chains and merged MSAs, so training never re-parses text files.
//!
//! Layout (format version [`CACHE_FORMAT_VERSION`], root attribute `format_version`):
//! ```text
//! /chains/<id>/aatype                 u8  [L]
//! /chains/<id>/positions              f32 [L,37,3]
//! /chains/<id>/mask                   f32 [L,37]
//! /chains/<id>/author_residue_number  i32 [L]   (i32::MIN = unresolved)
//! /chains/<id>/msa                    u8  [rows,L]  HHblits tokens, query first
//! /chains/<id>/deletions              u32 [rows,L]
//! /chains/<id>/meta                   u8  [n]   UTF-8 JSON (ChainMeta: sequence, resolution,
//!                                               release date, method, split, source files + sha256)
//! ```
//! Reading a cache written with another format version is a clear error.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::msa::Msa;
use super::transforms::ProteinInput;
use crate::error::{Error, Result};

/// Version of the cache layout; bump on any change.
pub const CACHE_FORMAT_VERSION: u32 = 1;

/// Per-chain metadata stored as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChainMeta {
    pub id: String,
    pub chain: String,
    pub split: String,
    pub sequence: String,
    pub resolution: Option<f32>,
    pub release_date: Option<String>,
    pub method: String,
    pub cluster_size: Option<u32>,
    pub resolved_residues: usize,
    /// `(path relative to the data root, sha256)` of every source file.
    pub sources: Vec<(String, String)>,
}

/// One cached chain.
#[derive(Debug, Clone, PartialEq)]
pub struct CachedChain {
    pub meta: ChainMeta,
    pub input: ProteinInput,
    pub author_residue_number: Vec<Option<i32>>,
}

fn h5err(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Hdf5 {
        path: path.to_path_buf(),
        msg: e.to_string(),
    }
}

/// Writes a cache file.
pub struct CacheWriter {
    path: PathBuf,
    chains: hdf5_metno::Group,
    _file: hdf5_metno::File,
}

impl CacheWriter {
    /// Create (truncate) `path`.
    pub fn create(path: &Path) -> Result<CacheWriter> {
        let file = hdf5_metno::File::create(path).map_err(|e| h5err(path, e))?;
        file.new_attr::<u32>()
            .create("format_version")
            .and_then(|a| a.write_scalar(&CACHE_FORMAT_VERSION))
            .map_err(|e| h5err(path, e))?;
        let chains = file.create_group("chains").map_err(|e| h5err(path, e))?;
        Ok(CacheWriter {
            path: path.to_path_buf(),
            chains,
            _file: file,
        })
    }

    /// Add one chain.
    pub fn add(&mut self, c: &CachedChain) -> Result<()> {
        let p = &self.path;
        let id = &c.input.id;
        let g = self
            .chains
            .create_group(id)
            .map_err(|e| h5err(p, format!("{id}: {e}")))?;
        let l = c.input.len();
        let m = &c.input.msa;
        let err = |e: hdf5_metno::Error| h5err(p, format!("{id}: {e}"));
        g.new_dataset::<u8>()
            .shape([l])
            .create("aatype")
            .and_then(|d| d.write_raw(&c.input.aatype[..]))
            .map_err(err)?;
        g.new_dataset::<f32>()
            .shape([l, 37, 3])
            .create("positions")
            .and_then(|d| d.write_raw(&c.input.positions[..]))
            .map_err(err)?;
        g.new_dataset::<f32>()
            .shape([l, 37])
            .create("mask")
            .and_then(|d| d.write_raw(&c.input.mask[..]))
            .map_err(err)?;
        let arn: Vec<i32> = c
            .author_residue_number
            .iter()
            .map(|v| v.unwrap_or(i32::MIN))
            .collect();
        g.new_dataset::<i32>()
            .shape([l])
            .create("author_residue_number")
            .and_then(|d| d.write_raw(&arn[..]))
            .map_err(err)?;
        g.new_dataset::<u8>()
            .shape([m.rows, m.width])
            .create("msa")
            .and_then(|d| d.write_raw(&m.tokens[..]))
            .map_err(err)?;
        g.new_dataset::<u32>()
            .shape([m.rows, m.width])
            .create("deletions")
            .and_then(|d| d.write_raw(&m.deletions[..]))
            .map_err(err)?;
        let json = serde_json::to_vec(&c.meta).map_err(|e| Error::Msg(e.to_string()))?;
        g.new_dataset::<u8>()
            .shape([json.len()])
            .create("meta")
            .and_then(|d| d.write_raw(&json[..]))
            .map_err(err)?;
        Ok(())
    }
}

/// Reads a cache file (thread-safe: HDF5 calls are serialised by the library).
pub struct CacheReader {
    path: PathBuf,
    file: hdf5_metno::File,
    ids: Vec<String>,
}

impl CacheReader {
    /// Open and check the format version.
    pub fn open(path: &Path) -> Result<CacheReader> {
        let file = hdf5_metno::File::open(path)
            .map_err(|e| h5err(path, format!("cannot open as HDF5: {e}")))?;
        let version = file
            .attr("format_version")
            .and_then(|a| a.read_scalar::<u32>())
            .map_err(|_| {
                h5err(
                    path,
                    "no `format_version` attribute: not a ferrofold feature cache",
                )
            })?;
        if version != CACHE_FORMAT_VERSION {
            return Err(h5err(
                path,
                format!(
                    "cache format version {version}, this build reads version {CACHE_FORMAT_VERSION}: \
                     rebuild it with `ferrofold data prepare`"
                ),
            ));
        }
        let mut ids = file
            .group("chains")
            .and_then(|g| g.member_names())
            .map_err(|e| h5err(path, e))?;
        ids.sort();
        Ok(CacheReader {
            path: path.to_path_buf(),
            file,
            ids,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Chain ids, sorted.
    pub fn ids(&self) -> &[String] {
        &self.ids
    }

    /// Metadata of one chain.
    pub fn meta(&self, id: &str) -> Result<ChainMeta> {
        let g = self.group(id)?;
        let bytes: Vec<u8> = g
            .dataset("meta")
            .and_then(|d| d.read_raw())
            .map_err(|e| h5err(&self.path, format!("{id}: {e}")))?;
        serde_json::from_slice(&bytes).map_err(|e| h5err(&self.path, format!("{id}/meta: {e}")))
    }

    fn group(&self, id: &str) -> Result<hdf5_metno::Group> {
        self.file
            .group("chains")
            .and_then(|g| g.group(id))
            .map_err(|_| h5err(&self.path, format!("no chain `{id}` in the cache")))
    }

    /// Read one chain.
    pub fn read(&self, id: &str) -> Result<CachedChain> {
        let g = self.group(id)?;
        let p = &self.path;
        let err = |e: hdf5_metno::Error| h5err(p, format!("{id}: {e}"));
        let aatype: Vec<u8> = g
            .dataset("aatype")
            .and_then(|d| d.read_raw())
            .map_err(err)?;
        let positions: Vec<f32> = g
            .dataset("positions")
            .and_then(|d| d.read_raw())
            .map_err(err)?;
        let mask: Vec<f32> = g.dataset("mask").and_then(|d| d.read_raw()).map_err(err)?;
        let arn: Vec<i32> = g
            .dataset("author_residue_number")
            .and_then(|d| d.read_raw())
            .map_err(err)?;
        let msa_ds = g.dataset("msa").map_err(err)?;
        let shape = msa_ds.shape();
        let tokens: Vec<u8> = msa_ds.read_raw().map_err(err)?;
        let deletions: Vec<u32> = g
            .dataset("deletions")
            .and_then(|d| d.read_raw())
            .map_err(err)?;
        let meta = self.meta(id)?;
        let (rows, width) = (
            shape.first().copied().unwrap_or(0),
            shape.get(1).copied().unwrap_or(0),
        );
        let input = ProteinInput {
            id: id.to_string(),
            aatype,
            positions,
            mask,
            resolution: meta.resolution.unwrap_or(0.0),
            msa: Msa {
                rows,
                width,
                tokens,
                deletions,
            },
        };
        input.validate()?;
        Ok(CachedChain {
            meta,
            input,
            author_residue_number: arn
                .into_iter()
                .map(|v| (v != i32::MIN).then_some(v))
                .collect(),
        })
    }
}

/// Write a cache file with a different format version (for tests of the version check).
#[doc(hidden)]
pub fn write_versioned_stub(path: &Path, version: u32) -> Result<()> {
    let file = hdf5_metno::File::create(path).map_err(|e| h5err(path, e))?;
    file.new_attr::<u32>()
        .create("format_version")
        .and_then(|a| a.write_scalar(&version))
        .map_err(|e| h5err(path, e))?;
    file.create_group("chains").map_err(|e| h5err(path, e))?;
    Ok(())
}
