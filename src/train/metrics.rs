//! Logging for people: the per-step metrics file `run_dir/metrics.jsonl` (one JSON object per line)
//! and the progress bar.
//!
//! Each line has a `kind`: `"train"` ([`StepRecord`]) or `"eval"` ([`EvalRecord`]); `step` is the
//! number of steps completed after that step. Non-finite numbers are written as `null`. On resume,
//! lines with `step` greater than the checkpoint's step (written after the checkpoint by the run that
//! died) are dropped, so the file describes exactly one trajectory.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::config::Progress;
use crate::error::{Error, Result};
use crate::train::checkpoint::atomic_write;

/// File name of the metrics log inside the run directory.
pub const METRICS_FILE: &str = "metrics.jsonl";

/// One training step.
#[derive(Debug, Clone, Serialize)]
pub struct StepRecord {
    pub kind: &'static str,
    pub step: u64,
    /// Total loss of this rank's batch.
    pub loss: f64,
    /// Loss terms and other task metrics.
    pub terms: BTreeMap<String, f64>,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Clipping coefficient applied (1 = not clipped).
    pub clip_coef: f64,
    pub lr: f64,
    pub recycles: usize,
    pub step_time_s: f64,
    /// Global samples per second over this step.
    pub samples_per_s: f64,
    /// Whether this step was skipped (non-finite loss or gradient norm).
    pub skipped: bool,
    /// Skipped steps so far in the run.
    pub skipped_steps: u64,
}

/// One evaluation (with the EMA weights).
#[derive(Debug, Clone, Serialize)]
pub struct EvalRecord {
    pub kind: &'static str,
    pub step: u64,
    pub metrics: BTreeMap<String, f64>,
    pub eval_time_s: f64,
}

/// Appends JSON lines to `run_dir/metrics.jsonl` (a disabled log, on ranks other than 0, writes
/// nothing).
#[derive(Debug)]
pub struct MetricsLog {
    path: PathBuf,
    file: Option<std::fs::File>,
}

impl MetricsLog {
    /// Open for appending after dropping lines with `step > start_step` (a fresh run has
    /// `start_step = 0`).
    pub fn open(run_dir: &Path, start_step: u64, enabled: bool) -> Result<Self> {
        let path = run_dir.join(METRICS_FILE);
        if !enabled {
            return Ok(Self { path, file: None });
        }
        std::fs::create_dir_all(run_dir).map_err(|e| Error::io(run_dir, e))?;
        if path.exists() {
            truncate_after(&path, start_step)?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        Ok(Self {
            path,
            file: Some(file),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Append one record as a line.
    pub fn write<T: Serialize>(&mut self, record: &T) -> Result<()> {
        let Some(f) = &mut self.file else {
            return Ok(());
        };
        let mut line = serde_json::to_string(record)
            .map_err(|e| Error::Train(format!("cannot serialise a metrics record: {e}")))?;
        line.push('\n');
        f.write_all(line.as_bytes())
            .map_err(|e| Error::io(&self.path, e))
    }
}

/// Keep only the lines whose `step` is `<= max_step` (lines that do not parse are dropped too: a
/// torn last line of a killed run).
fn truncate_after(path: &Path, max_step: u64) -> Result<()> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut kept = String::new();
    let mut dropped = false;
    for line in std::io::BufReader::new(f).lines() {
        let line = line.map_err(|e| Error::io(path, e))?;
        let step = serde_json::from_str::<serde_json::Value>(&line)
            .ok()
            .and_then(|v| v.get("step").and_then(|s| s.as_u64()));
        match step {
            Some(s) if s <= max_step => {
                kept.push_str(&line);
                kept.push('\n');
            }
            _ => dropped = true,
        }
    }
    if dropped {
        atomic_write(path, kept.as_bytes())?;
    }
    Ok(())
}

/// Progress bar with ETA on stderr, rank 0 only.
#[derive(Debug)]
pub struct ProgressBar {
    bar: Option<indicatif::ProgressBar>,
}

impl ProgressBar {
    /// `policy` Auto shows the bar only when stderr is a terminal.
    pub fn new(policy: Progress, is_root: bool, start: u64, total: u64) -> Self {
        use std::io::IsTerminal;
        let show = is_root
            && match policy {
                Progress::Always => true,
                Progress::Never => false,
                Progress::Auto => std::io::stderr().is_terminal(),
            };
        if !show {
            return Self { bar: None };
        }
        let bar = indicatif::ProgressBar::new(total);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{wide_bar}] {pos}/{len} steps  {per_sec}  ETA {eta_precise}  {msg}",
        ) {
            bar.set_style(style);
        }
        bar.set_position(start);
        bar.reset_eta();
        Self { bar: Some(bar) }
    }

    pub fn update(&self, step: u64, loss: f64, lr: f64) {
        if let Some(b) = &self.bar {
            b.set_position(step);
            b.set_message(format!("loss {loss:.4} lr {lr:.2e}"));
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_bar_only_on_root_and_when_asked() {
        assert!(ProgressBar::new(Progress::Never, true, 0, 10).bar.is_none());
        assert!(ProgressBar::new(Progress::Always, false, 0, 10)
            .bar
            .is_none());
        assert!(ProgressBar::new(Progress::Auto, false, 0, 10).bar.is_none());
        let b = ProgressBar::new(Progress::Always, true, 3, 10);
        assert_eq!(b.bar.as_ref().map(|b| b.position()), Some(3));
        b.update(5, 0.25, 1e-3);
        assert_eq!(b.bar.as_ref().map(|b| b.position()), Some(5));
        assert_eq!(b.bar.as_ref().map(|b| b.length()), Some(Some(10)));
        b.finish();
    }

    #[test]
    fn truncates_lines_after_resume_step() {
        let dir = std::env::temp_dir().join(format!("ferrofold-metrics-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut log = MetricsLog::open(&dir, 0, true).unwrap();
        for step in 1..=5 {
            log.write(&EvalRecord {
                kind: "eval",
                step,
                metrics: BTreeMap::new(),
                eval_time_s: f64::NAN,
            })
            .unwrap();
        }
        drop(log);
        // A torn line from a killed writer.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(dir.join(METRICS_FILE))
            .unwrap();
        f.write_all(b"{\"kind\":\"tr").unwrap();
        drop(f);
        let log = MetricsLog::open(&dir, 3, true).unwrap();
        let text = std::fs::read_to_string(log.path()).unwrap();
        let steps: Vec<u64> = text
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["step"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(steps, vec![1, 2, 3]);
        // NaN is written as null.
        assert!(text.contains("\"eval_time_s\":null"), "{text}");
        // Disabled: nothing created.
        let other = dir.join("sub");
        let mut off = MetricsLog::open(&other, 0, false).unwrap();
        off.write(&1u32).unwrap();
        assert!(!other.exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
