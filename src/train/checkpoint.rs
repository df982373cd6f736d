//! Checkpoints: one directory per step, `run_dir/ckpt-000000100/`, holding
//! - `model.safetensors`: the fp32 master parameters,
//! - `ema.safetensors`: the EMA weights (used for evaluation),
//! - `adam.safetensors`: Adam moments, keys `exp_avg.<param>` and `exp_avg_sq.<param>`,
//! - `meta.json`: [`CheckpointMeta`] (step, LR, data-loader position, seed, config hash, version,
//!   Adam step counts, eval metrics, and the sha256 of every safetensors file).
//!
//! Atomicity: everything is written into `ckpt-000000100.tmp/` (each file written and fsynced,
//! `meta.json` last), the directory is fsynced, renamed to `ckpt-000000100/`, and the run directory
//! is fsynced. A directory named `ckpt-<digits>` is therefore always complete; `*.tmp` leftovers of a
//! killed writer are ignored and removed by the next writer. An existing checkpoint is never
//! overwritten.
//!
//! Loading verifies every checksum; any problem is one [`Error::Checkpoint`] naming the file.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

pub const MODEL_FILE: &str = "model.safetensors";
pub const EMA_FILE: &str = "ema.safetensors";
pub const ADAM_FILE: &str = "adam.safetensors";
pub const META_FILE: &str = "meta.json";
/// Version of the on-disk layout.
pub const FORMAT_VERSION: u32 = 1;

const PREFIX: &str = "ckpt-";
const M_PREFIX: &str = "exp_avg.";
const V_PREFIX: &str = "exp_avg_sq.";

/// Size and sha256 (hex) of one file of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileDigest {
    pub sha256: String,
    pub bytes: u64,
}

/// Contents of `meta.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointMeta {
    pub format: u32,
    pub ferrofold_version: String,
    /// Optimizer steps completed (skipped steps included).
    pub step: u64,
    /// Steps skipped because the loss or gradient norm was not finite.
    pub skipped_steps: u64,
    /// Learning rate of the next step (informational: the schedule is a pure function of `step`).
    pub lr: f64,
    /// [`crate::train::trainer::resume_hash`] of the run's configuration.
    pub config_hash: String,
    /// Base seed. RNG state: every random stream is `seed_for(seed, purpose, rank, step)`, so the seed
    /// and the step are the complete RNG state.
    pub seed: u64,
    /// Version of the seed derivation ([`crate::train::seed::RNG_SCHEME`]); must match on resume.
    pub rng_scheme: String,
    /// Opaque position of the sample source ([`crate::train::task::Task::data_state`]).
    pub data_state: serde_json::Value,
    /// Adam update count per parameter.
    pub adam_steps: BTreeMap<String, u64>,
    /// Evaluation metrics at this step (empty when no evaluation ran at this step).
    pub eval: BTreeMap<String, f64>,
    /// Files of this checkpoint and their digests (filled by [`write`]).
    pub files: BTreeMap<String, FileDigest>,
}

impl CheckpointMeta {
    /// lDDT-Cα of the evaluation at this step, if any.
    pub fn lddt_ca(&self) -> Option<f64> {
        self.eval.get("lddt_ca").copied().filter(|x| x.is_finite())
    }
}

/// Everything a checkpoint holds.
#[derive(Debug, Clone)]
pub struct CheckpointData {
    pub meta: CheckpointMeta,
    pub model: BTreeMap<String, Tensor>,
    pub ema: BTreeMap<String, Tensor>,
    pub adam_m: BTreeMap<String, Tensor>,
    pub adam_v: BTreeMap<String, Tensor>,
}

/// Directory name of the checkpoint at `step`.
pub fn dir_name(step: u64) -> String {
    format!("{PREFIX}{step:09}")
}

/// Step of a complete checkpoint directory name (`ckpt-<digits>`), `None` for anything else.
pub fn parse_dir_name(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(PREFIX)?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Complete checkpoints of a run, sorted by step. A missing run directory has none.
pub fn list(run_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let entries = match std::fs::read_dir(run_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(run_dir, e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(run_dir, e))?;
        let name = entry.file_name();
        let Some(step) = name.to_str().and_then(parse_dir_name) else {
            continue;
        };
        if entry.path().is_dir() {
            out.push((step, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// The newest complete checkpoint of a run (for resume), `None` when there is none.
pub fn find_latest(run_dir: &Path) -> Result<Option<PathBuf>> {
    Ok(list(run_dir)?.pop().map(|(_, p)| p))
}

/// Remove `ckpt-*.tmp` directories left by a killed writer.
pub fn remove_stale_tmp(run_dir: &Path) -> Result<()> {
    let entries = match std::fs::read_dir(run_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(run_dir, e)),
    };
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(run_dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let stale = name
            .strip_suffix(".tmp")
            .or_else(|| name.strip_suffix(".deleting"))
            .is_some_and(|base| parse_dir_name(base).is_some());
        if stale {
            std::fs::remove_dir_all(entry.path()).map_err(|e| Error::io(entry.path(), e))?;
        }
    }
    Ok(())
}

fn ckpt_err(path: impl Into<PathBuf>, msg: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.into(),
        msg: msg.into(),
    }
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// fsync a directory (makes renames and new entries durable).
pub fn fsync_dir(dir: &Path) -> Result<()> {
    std::fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(dir, e))
}

/// Create `path` with `bytes`, flushed to disk.
fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    f.write_all(bytes).map_err(|e| Error::io(path, e))?;
    f.sync_all().map_err(|e| Error::io(path, e))
}

/// Replace `path` atomically: write `path.tmp` in the same directory, fsync it, rename it over
/// `path`, fsync the directory. Readers see the old or the new content, never a mix.
pub fn atomic_write(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = dir.join(tmp_name);
    write_synced(&tmp, bytes)?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
    fsync_dir(dir)
}

/// Serialise named tensors (sorted) as safetensors bytes. Tensors are copied to the host.
fn to_safetensors(tensors: &BTreeMap<String, Tensor>, path: &Path) -> Result<Vec<u8>> {
    let host = tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.to_device(&Device::Cpu)?.contiguous()?)))
        .collect::<Result<Vec<(String, Tensor)>>>()?;
    safetensors::serialize(host, None)
        .map_err(|e| ckpt_err(path, format!("cannot serialise tensors: {e}")))
}

/// Write a checkpoint for `data.meta.step` into `run_dir`; fills `data.meta.files`. Returns the
/// checkpoint directory. Fails (writing nothing final) if that checkpoint already exists.
pub fn write(run_dir: &Path, data: &mut CheckpointData) -> Result<PathBuf> {
    std::fs::create_dir_all(run_dir).map_err(|e| Error::io(run_dir, e))?;
    let name = dir_name(data.meta.step);
    let final_dir = run_dir.join(&name);
    if final_dir.exists() {
        return Err(ckpt_err(
            &final_dir,
            "already exists; refusing to overwrite a checkpoint",
        ));
    }
    let tmp_dir = run_dir.join(format!("{name}.tmp"));
    if tmp_dir.exists() {
        std::fs::remove_dir_all(&tmp_dir).map_err(|e| Error::io(&tmp_dir, e))?;
    }
    std::fs::create_dir_all(&tmp_dir).map_err(|e| Error::io(&tmp_dir, e))?;

    let mut adam = BTreeMap::new();
    for (k, t) in &data.adam_m {
        adam.insert(format!("{M_PREFIX}{k}"), t.clone());
    }
    for (k, t) in &data.adam_v {
        adam.insert(format!("{V_PREFIX}{k}"), t.clone());
    }
    data.meta.files.clear();
    for (file, tensors) in [
        (MODEL_FILE, &data.model),
        (EMA_FILE, &data.ema),
        (ADAM_FILE, &adam),
    ] {
        let path = tmp_dir.join(file);
        let bytes = to_safetensors(tensors, &path)?;
        write_synced(&path, &bytes)?;
        data.meta.files.insert(
            file.to_string(),
            FileDigest {
                sha256: sha256_hex(&bytes),
                bytes: bytes.len() as u64,
            },
        );
    }
    // Metadata last: its presence marks a complete set of files even inside the temp directory.
    let meta_path = tmp_dir.join(META_FILE);
    let text = serde_json::to_vec_pretty(&data.meta)
        .map_err(|e| ckpt_err(&meta_path, format!("cannot serialise metadata: {e}")))?;
    write_synced(&meta_path, &text)?;
    fsync_dir(&tmp_dir)?;
    std::fs::rename(&tmp_dir, &final_dir).map_err(|e| Error::io(&final_dir, e))?;
    fsync_dir(run_dir)?;
    Ok(final_dir)
}

/// Read and parse `meta.json` of a checkpoint directory (no tensor is read).
pub fn read_meta(dir: &Path) -> Result<CheckpointMeta> {
    if !dir.is_dir() {
        return Err(ckpt_err(dir, "checkpoint directory does not exist"));
    }
    let path = dir.join(META_FILE);
    let text = std::fs::read(&path).map_err(|e| ckpt_err(&path, format!("cannot read: {e}")))?;
    let meta: CheckpointMeta = serde_json::from_slice(&text)
        .map_err(|e| ckpt_err(&path, format!("corrupt metadata: {e}")))?;
    if meta.format != FORMAT_VERSION {
        return Err(ckpt_err(
            &path,
            format!(
                "checkpoint format {} is not supported (this build reads format {FORMAT_VERSION})",
                meta.format
            ),
        ));
    }
    Ok(meta)
}

/// Read one safetensors file of a checkpoint, verifying its checksum against the metadata.
fn read_verified(
    dir: &Path,
    meta: &CheckpointMeta,
    file: &str,
    device: &Device,
) -> Result<BTreeMap<String, Tensor>> {
    let path = dir.join(file);
    let digest = meta.files.get(file).ok_or_else(|| {
        ckpt_err(
            dir.join(META_FILE),
            format!("metadata lists no checksum for {file}"),
        )
    })?;
    let bytes = std::fs::read(&path).map_err(|e| ckpt_err(&path, format!("cannot read: {e}")))?;
    if bytes.len() as u64 != digest.bytes {
        return Err(ckpt_err(
            &path,
            format!(
                "corrupt: {} bytes, metadata says {} (truncated or modified)",
                bytes.len(),
                digest.bytes
            ),
        ));
    }
    let sha = sha256_hex(&bytes);
    if sha != digest.sha256 {
        return Err(ckpt_err(
            &path,
            format!(
                "corrupt: sha256 {sha} does not match the metadata ({})",
                digest.sha256
            ),
        ));
    }
    let map = candle_core::safetensors::load_buffer(&bytes, device)
        .map_err(|e| ckpt_err(&path, format!("cannot parse safetensors: {e}")))?;
    Ok(map.into_iter().collect())
}

/// Load and verify a checkpoint directory.
pub fn load(dir: &Path, device: &Device) -> Result<CheckpointData> {
    let meta = read_meta(dir)?;
    let model = read_verified(dir, &meta, MODEL_FILE, device)?;
    let ema = read_verified(dir, &meta, EMA_FILE, device)?;
    let adam = read_verified(dir, &meta, ADAM_FILE, device)?;
    let mut adam_m = BTreeMap::new();
    let mut adam_v = BTreeMap::new();
    let adam_path = dir.join(ADAM_FILE);
    for (k, t) in adam {
        // `exp_avg_sq.` starts with `exp_avg`, so test the longer prefix first.
        if let Some(n) = k.strip_prefix(V_PREFIX) {
            adam_v.insert(n.to_string(), t);
        } else if let Some(n) = k.strip_prefix(M_PREFIX) {
            adam_m.insert(n.to_string(), t);
        } else {
            return Err(ckpt_err(&adam_path, format!("unexpected tensor `{k}`")));
        }
    }
    Ok(CheckpointData {
        meta,
        model,
        ema,
        adam_m,
        adam_v,
    })
}

/// Compare named tensor shapes with the expected ones; the error names `path` and lists the
/// differences (up to 5 of each kind).
pub fn check_shapes(
    path: &Path,
    what: &str,
    got: &BTreeMap<String, Tensor>,
    expected: &BTreeMap<String, Vec<usize>>,
) -> Result<()> {
    let missing: Vec<&String> = expected.keys().filter(|k| !got.contains_key(*k)).collect();
    let extra: Vec<&String> = got.keys().filter(|k| !expected.contains_key(*k)).collect();
    let wrong: Vec<String> = expected
        .iter()
        .filter_map(|(k, shape)| {
            let t = got.get(k)?;
            (t.dims() != shape.as_slice())
                .then(|| format!("{k}: checkpoint {:?}, model {:?}", t.dims(), shape))
        })
        .collect();
    if missing.is_empty() && extra.is_empty() && wrong.is_empty() {
        return Ok(());
    }
    let show = |v: Vec<String>| {
        let n = v.len();
        let mut s: Vec<String> = v.into_iter().take(5).collect();
        if n > 5 {
            s.push(format!("... ({n} in all)"));
        }
        s.join(", ")
    };
    let mut parts = Vec::new();
    if !missing.is_empty() {
        parts.push(format!(
            "missing {}",
            show(missing.into_iter().cloned().collect())
        ));
    }
    if !extra.is_empty() {
        parts.push(format!(
            "not in the model {}",
            show(extra.into_iter().cloned().collect())
        ));
    }
    if !wrong.is_empty() {
        parts.push(format!("shape mismatch {}", show(wrong)));
    }
    Err(ckpt_err(
        path,
        format!(
            "{what} does not match this model (checkpoint from another model shape?): {}",
            parts.join("; ")
        ),
    ))
}

impl CheckpointData {
    /// Check that every part of the checkpoint has exactly the model's parameter names and shapes.
    pub fn check_against(&self, dir: &Path, expected: &BTreeMap<String, Vec<usize>>) -> Result<()> {
        check_shapes(
            &dir.join(MODEL_FILE),
            "model weights",
            &self.model,
            expected,
        )?;
        check_shapes(&dir.join(EMA_FILE), "EMA weights", &self.ema, expected)?;
        check_shapes(&dir.join(ADAM_FILE), "Adam exp_avg", &self.adam_m, expected)?;
        check_shapes(
            &dir.join(ADAM_FILE),
            "Adam exp_avg_sq",
            &self.adam_v,
            expected,
        )?;
        let names: BTreeSet<&String> = self.meta.adam_steps.keys().collect();
        if names != expected.keys().collect() {
            return Err(ckpt_err(
                dir.join(META_FILE),
                "adam_steps does not list exactly the model's parameters",
            ));
        }
        Ok(())
    }
}

/// Retention policy (pure): given the checkpoints `(step, lddt_ca at that step if evaluated)`, the
/// steps to keep: the `keep_last` newest plus the one with the best lDDT-Cα (highest; ties go to the
/// newest; non-finite values are ignored).
pub fn retained_steps(ckpts: &[(u64, Option<f64>)], keep_last: usize) -> BTreeSet<u64> {
    let mut steps: Vec<u64> = ckpts.iter().map(|(s, _)| *s).collect();
    steps.sort_unstable();
    steps.dedup();
    let mut keep: BTreeSet<u64> = steps.iter().rev().take(keep_last).copied().collect();
    let best = ckpts
        .iter()
        .filter_map(|(s, l)| l.filter(|x| x.is_finite()).map(|l| (l, *s)))
        .max_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    if let Some((_, s)) = best {
        keep.insert(s);
    }
    keep
}

/// Apply [`retained_steps`] to a run directory: delete the other checkpoints (each is first renamed
/// to `*.deleting`, so a half-deleted directory never looks like a checkpoint). Returns the deleted
/// steps.
pub fn apply_retention(run_dir: &Path, keep_last: usize) -> Result<Vec<u64>> {
    let all = list(run_dir)?;
    let mut scored = Vec::with_capacity(all.len());
    for (step, dir) in &all {
        // An unreadable metadata file must not make the policy delete the wrong checkpoint: treat
        // its lDDT as unknown (it can still be among the newest).
        let lddt = read_meta(dir).ok().and_then(|m| m.lddt_ca());
        scored.push((*step, lddt));
    }
    let keep = retained_steps(&scored, keep_last);
    let mut removed = Vec::new();
    for (step, dir) in all {
        if keep.contains(&step) {
            continue;
        }
        let doomed = run_dir.join(format!("{}.deleting", dir_name(step)));
        std::fs::rename(&dir, &doomed).map_err(|e| Error::io(&dir, e))?;
        std::fs::remove_dir_all(&doomed).map_err(|e| Error::io(&doomed, e))?;
        removed.push(step);
    }
    if !removed.is_empty() {
        fsync_dir(run_dir)?;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_whole_file() {
        let dir = std::env::temp_dir().join(format!("ferrofold-atomic-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("f.txt");
        atomic_write(&p, b"first version").unwrap();
        atomic_write(&p, b"2nd").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"2nd");
        let names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["f.txt".to_string()]); // no temp file left
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn names_roundtrip() {
        assert_eq!(dir_name(100), "ckpt-000000100");
        assert_eq!(parse_dir_name("ckpt-000000100"), Some(100));
        assert_eq!(parse_dir_name("ckpt-000000100.tmp"), None);
        assert_eq!(parse_dir_name("ckpt-"), None);
        assert_eq!(parse_dir_name("ckpt-12a"), None);
        assert_eq!(parse_dir_name("other-1"), None);
    }

    #[test]
    fn retention_keep_last_plus_best() {
        let c = [
            (100, Some(0.5)),
            (200, Some(0.8)),
            (300, None),
            (400, Some(0.6)),
            (500, None),
        ];
        assert_eq!(
            retained_steps(&c, 2),
            [200, 400, 500].into_iter().collect::<BTreeSet<_>>()
        );
        // Best is already among the newest: nothing extra.
        let c2 = [(100, Some(0.1)), (200, Some(0.9)), (300, Some(0.2))];
        assert_eq!(
            retained_steps(&c2, 2),
            [200, 300].into_iter().collect::<BTreeSet<_>>()
        );
        // Ties go to the newest; NaN ignored; unsorted input.
        let c3 = [
            (300, Some(f64::NAN)),
            (100, Some(0.7)),
            (200, Some(0.7)),
            (400, None),
        ];
        assert_eq!(
            retained_steps(&c3, 1),
            [200, 400].into_iter().collect::<BTreeSet<_>>()
        );
        // Fewer checkpoints than keep_last: keep all.
        assert_eq!(retained_steps(&c3, 10).len(), 4);
        assert!(retained_steps(&[], 3).is_empty());
        // No evaluations: just the newest.
        let c4 = [(1, None), (2, None), (3, None)];
        assert_eq!(
            retained_steps(&c4, 1),
            [3].into_iter().collect::<BTreeSet<_>>()
        );
    }
}
