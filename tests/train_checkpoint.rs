//! Checkpoint files: layout, checksums, clear errors naming the file, nothing overwritten, stale temp
//! directories, retention in a run.

mod train_support;

use std::path::{Path, PathBuf};

use candle_core::Device;
use ferrofold::train::checkpoint::{self, ADAM_FILE, EMA_FILE, META_FILE, MODEL_FILE};
use ferrofold::train::toy::{ToyConfig, ToyTask};
use ferrofold::train::{Resume, SingleProcess, Trainer};
use train_support::*;

/// A run dir holding checkpoints at steps 4 and 6 of the toy task.
fn make_run() -> (RunDir, ferrofold::config::Config, ToyConfig) {
    let mut cfg = toy_config();
    cfg.train.max_steps = 6;
    let toy = ToyConfig::default();
    let dir = run_dir("ckpt");
    let mut t = trainer(&cfg, &toy, options(&dir));
    t.run().unwrap();
    (dir, cfg, toy)
}

fn try_resume(
    dir: &Path,
    cfg: &ferrofold::config::Config,
    toy: &ToyConfig,
) -> ferrofold::Result<Trainer<ToyTask, SingleProcess>> {
    Trainer::new(ToyTask::new(toy.clone())?, SingleProcess, cfg, options(dir))
}

/// All files of a directory tree with their bytes (to prove nothing was modified).
fn tree(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push((p.clone(), std::fs::read(&p).unwrap()));
            }
        }
    }
    out.sort();
    out
}

#[test]
fn layout_and_roundtrip() {
    let (dir, cfg, _toy) = make_run();
    let steps: Vec<u64> = checkpoint::list(&dir)
        .unwrap()
        .iter()
        .map(|x| x.0)
        .collect();
    assert_eq!(steps, vec![4, 6]);
    let ck = dir.join(checkpoint::dir_name(6));
    for f in [MODEL_FILE, EMA_FILE, ADAM_FILE, META_FILE] {
        assert!(ck.join(f).is_file(), "{f} missing");
    }
    let meta = checkpoint::read_meta(&ck).unwrap();
    assert_eq!(meta.step, 6);
    assert_eq!(meta.seed, cfg.train.seed);
    assert_eq!(meta.ferrofold_version, ferrofold::VERSION);
    assert_eq!(
        meta.config_hash,
        ferrofold::train::trainer::resume_hash(&cfg).unwrap()
    );
    assert_eq!(meta.data_state["samples_consumed"], 6 * 16);
    assert!(meta.eval.contains_key("lddt_ca")); // eval_every = 3
    assert_eq!(meta.lr, ferrofold::train::schedule::lr_at(6, &cfg.optim));
    let data = checkpoint::load(&ck, &Device::Cpu).unwrap();
    assert_eq!(data.model.len(), 4);
    assert_eq!(data.adam_m.len(), 4);
    assert_eq!(data.adam_v.len(), 4);
    assert!(data.adam_steps_all(6));
    // The config hash ignores run length / cadence / logging, not the optimizer.
    let mut longer = cfg.clone();
    longer.train.max_steps = 1000;
    longer.train.checkpoint_every = 7;
    longer.log.every = 5;
    assert_eq!(
        ferrofold::train::trainer::resume_hash(&longer).unwrap(),
        meta.config_hash
    );
    let mut other = cfg.clone();
    other.optim.lr = 3e-3;
    assert_ne!(
        ferrofold::train::trainer::resume_hash(&other).unwrap(),
        meta.config_hash
    );
}

trait AdamStepsAll {
    fn adam_steps_all(&self, n: u64) -> bool;
}
impl AdamStepsAll for checkpoint::CheckpointData {
    fn adam_steps_all(&self, n: u64) -> bool {
        self.meta.adam_steps.len() == 4 && self.meta.adam_steps.values().all(|s| *s == n)
    }
}

/// Each kind of damage gives one error naming the damaged file; the run dir is left untouched.
#[test]
fn damaged_checkpoints_name_the_file() {
    type Damage = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Damage, &str)> = vec![
        (
            MODEL_FILE,
            Box::new(|ck: &Path| {
                let p = ck.join(MODEL_FILE);
                let mut b = std::fs::read(&p).unwrap();
                let n = b.len();
                b[n - 3] ^= 0x40; // flip one bit in the tensor data
                std::fs::write(&p, b).unwrap();
            }),
            "sha256",
        ),
        (
            ADAM_FILE,
            Box::new(|ck: &Path| {
                let p = ck.join(ADAM_FILE);
                let b = std::fs::read(&p).unwrap();
                std::fs::write(&p, &b[..b.len() / 2]).unwrap();
            }),
            "truncated",
        ),
        (
            EMA_FILE,
            Box::new(|ck: &Path| std::fs::remove_file(ck.join(EMA_FILE)).unwrap()),
            "cannot read",
        ),
        (
            META_FILE,
            Box::new(|ck: &Path| std::fs::write(ck.join(META_FILE), "{\"step\": ").unwrap()),
            "corrupt metadata",
        ),
    ];
    for (file, damage, what) in cases {
        let (dir, cfg, toy) = make_run();
        let ck = dir.join(checkpoint::dir_name(6));
        damage(&ck);
        let before = tree(&dir);
        let err = try_resume(&dir, &cfg, &toy).unwrap_err().to_string();
        assert!(
            err.contains(&ck.join(file).display().to_string()) && err.contains(what),
            "{file}: {err}"
        );
        assert_eq!(before, tree(&dir), "{file}: the run dir was modified");
    }
}

#[test]
fn other_model_shape_is_rejected() {
    let (dir, cfg, _toy) = make_run();
    let other = ToyConfig {
        hidden: 12,
        ..ToyConfig::default()
    };
    let before = tree(&dir);
    let err = try_resume(&dir, &cfg, &other).unwrap_err().to_string();
    let model = dir.join(checkpoint::dir_name(6)).join(MODEL_FILE);
    assert!(
        err.contains(&model.display().to_string())
            && err.contains("mlp.fc1.weight: checkpoint [16, 8], model [12, 8]"),
        "{err}"
    );
    assert_eq!(before, tree(&dir));
}

#[test]
fn config_hash_mismatch_is_rejected() {
    let (dir, cfg, toy) = make_run();
    let mut changed = cfg.clone();
    changed.optim.beta2 = 0.99;
    let before = tree(&dir);
    let err = try_resume(&dir, &changed, &toy).unwrap_err().to_string();
    let meta = dir.join(checkpoint::dir_name(6)).join(META_FILE);
    assert!(
        err.contains(&meta.display().to_string()) && err.contains("config hash"),
        "{err}"
    );
    assert_eq!(before, tree(&dir));
    // Resume::From a missing directory names it.
    let mut o = options(&dir);
    let missing = dir.join("ckpt-000000999");
    o.resume = Resume::From(missing.clone());
    let err = Trainer::new(ToyTask::new(toy.clone()).unwrap(), SingleProcess, &cfg, o)
        .unwrap_err()
        .to_string();
    assert!(err.contains(&missing.display().to_string()), "{err}");
}

#[test]
fn fresh_run_never_overwrites() {
    let (dir, cfg, toy) = make_run();
    let before = tree(&dir);
    let mut o = options(&dir);
    o.resume = Resume::Never;
    let err = Trainer::new(ToyTask::new(toy.clone()).unwrap(), SingleProcess, &cfg, o)
        .unwrap_err()
        .to_string();
    assert!(err.contains("refusing"), "{err}");
    assert_eq!(before, tree(&dir));
    // Writing a checkpoint whose directory exists fails and leaves it alone.
    let ck = dir.join(checkpoint::dir_name(6));
    let mut data = checkpoint::load(&ck, &Device::Cpu).unwrap();
    let err = checkpoint::write(&dir, &mut data).unwrap_err().to_string();
    assert!(err.contains("refusing to overwrite"), "{err}");
    assert_eq!(before, tree(&dir));
}

/// A half-written `*.tmp` directory (killed writer) is never picked for resume and is cleaned up.
#[test]
fn stale_temp_dirs_are_ignored_and_removed() {
    let (dir, cfg, toy) = make_run();
    let tmp = dir.join(format!("{}.tmp", checkpoint::dir_name(8)));
    std::fs::create_dir_all(&tmp).unwrap();
    std::fs::write(tmp.join(MODEL_FILE), b"partial").unwrap();
    let doomed = dir.join(format!("{}.deleting", checkpoint::dir_name(2)));
    std::fs::create_dir_all(&doomed).unwrap();
    assert_eq!(
        checkpoint::find_latest(&dir).unwrap(),
        Some(dir.join(checkpoint::dir_name(6)))
    );
    let t = try_resume(&dir, &cfg, &toy).unwrap();
    assert_eq!(t.step(), 6);
    assert!(!tmp.exists() && !doomed.exists());
}

/// Retention in a run: keep the 2 newest plus the best-lDDT checkpoint.
#[test]
fn retention_during_a_run() {
    let mut cfg = toy_config();
    cfg.train.max_steps = 20;
    cfg.train.checkpoint_every = 2;
    cfg.train.eval_every = 2;
    cfg.train.keep_last = 2;
    let toy = ToyConfig::default();
    let dir = run_dir("retain");
    trainer(&cfg, &toy, options(&dir)).run().unwrap();
    let metas: Vec<_> = (1..=10)
        .map(|i| {
            let lines = metrics_lines(&dir);
            let l = lines
                .iter()
                .find(|v| v["kind"] == "eval" && v["step"] == 2 * i)
                .unwrap()["metrics"]["lddt_ca"]
                .as_f64()
                .unwrap();
            (2 * i, Some(l))
        })
        .collect();
    let want = checkpoint::retained_steps(&metas, 2);
    let got: std::collections::BTreeSet<u64> = checkpoint::list(&dir)
        .unwrap()
        .iter()
        .map(|x| x.0)
        .collect();
    assert_eq!(got, want);
    assert!(got.contains(&18) && got.contains(&20));
}
