//! Shared helpers for the trainer integration tests (toy task, temp run dirs, bitwise snapshots).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::Tensor;
use ferrofold::config::{Config, EvalMode, MlLog, Progress};
use ferrofold::train::mllog::MlLogger;
use ferrofold::train::toy::{ToyConfig, ToyTask};
use ferrofold::train::{Resume, SingleProcess, Trainer, TrainerOptions};

/// A config for the toy task: short warmup and decay so that every schedule branch runs.
pub fn toy_config() -> Config {
    let mut c = Config::default();
    c.train.seed = 1234;
    c.train.max_steps = 12;
    c.train.checkpoint_every = 4;
    c.train.eval_every = 3;
    c.train.keep_last = 2;
    c.optim.lr = 1e-2;
    c.optim.warmup_steps = 3;
    c.optim.decay_start = 8;
    c.optim.decay_every = 2;
    c.optim.decay_factor = 0.5;
    c.optim.ema_decay = 0.9;
    c.model.recycling.max_iters = 3;
    c.log.progress = Progress::Never;
    c.log.mllog = MlLog::Off;
    // The existing trainer tests pin evaluation to the step it belongs to (async tests set it).
    c.train.eval_mode = EvalMode::Sync;
    c.validate().unwrap();
    c
}

/// A fresh, empty run directory, removed on drop unless the test is failing (kept for debugging).
pub struct RunDir(PathBuf);

impl std::ops::Deref for RunDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for RunDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A fresh, empty directory unique to this process and tag.
pub fn run_dir(tag: &str) -> RunDir {
    static N: AtomicUsize = AtomicUsize::new(0);
    let d = std::env::temp_dir().join(format!(
        "ferrofold-train-{tag}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    RunDir(d)
}

pub fn options(dir: &Path) -> TrainerOptions {
    let mut o = TrainerOptions::new(dir);
    o.handle_signals = false;
    o.mllog = Some(MlLogger::disabled());
    o.resume = Resume::Auto;
    o
}

pub type ToyTrainer = Trainer<ToyTask, SingleProcess>;

pub fn trainer(cfg: &Config, toy: &ToyConfig, opts: TrainerOptions) -> ToyTrainer {
    Trainer::new(ToyTask::new(toy.clone()).unwrap(), SingleProcess, cfg, opts).unwrap()
}

/// f32 tensor as raw bits (for bitwise comparison).
pub fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(f32::to_bits)
        .collect()
}

pub fn map_bits(m: &BTreeMap<String, Tensor>) -> BTreeMap<String, Vec<u32>> {
    m.iter().map(|(k, t)| (k.clone(), bits(t))).collect()
}

/// Everything that defines the training state, as bits.
#[derive(Debug, PartialEq)]
pub struct Snapshot {
    pub step: u64,
    pub skipped: u64,
    pub position: u64,
    pub params: BTreeMap<String, Vec<u32>>,
    pub ema: BTreeMap<String, Vec<u32>>,
    pub m: BTreeMap<String, Vec<u32>>,
    pub v: BTreeMap<String, Vec<u32>>,
    pub adam_steps: BTreeMap<String, u64>,
}

pub fn snapshot(t: &ToyTrainer) -> Snapshot {
    use ferrofold::train::Task;
    Snapshot {
        step: t.step(),
        skipped: t.skipped_steps(),
        position: t.task().position,
        params: t
            .task()
            .params()
            .iter()
            .map(|(k, v)| (k.clone(), bits(v.as_tensor())))
            .collect(),
        ema: map_bits(&t.ema().weights),
        m: map_bits(&t.adam().m),
        v: map_bits(&t.adam().v),
        adam_steps: t.adam().steps.clone(),
    }
}

/// Parsed lines of `metrics.jsonl`.
pub fn metrics_lines(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}
