//! Asynchronous evaluation of the AF2 task (tiny model, one training and one validation chain of
//! the sample data): the background evaluator (own model instance, cached validation features)
//! gives bitwise the same metrics and PDB files as the in-place synchronous evaluation at the same
//! steps, and training losses do not depend on the evaluation mode.

mod common;
mod train_support;

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Device;
use common::data::manifest_subset;
use ferrofold::config::{Config, EvalMode};
use ferrofold::train::af2::{Af2Options, Af2Task};
use ferrofold::train::{Outcome, SingleProcess, Trainer};
use train_support::{metrics_lines, options, run_dir};

fn config(manifest: &Path, mode: EvalMode) -> Config {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let sets: Vec<String> = [
        format!("data.manifest=\"{}\"", manifest.display()),
        "data.crop_size=72".into(),
        "data.loader.order=\"deterministic\"".into(),
        "train.max_steps=2".into(),
        "train.eval_every=1".into(),
        "train.checkpoint_every=1000".into(),
        "log.progress=\"never\"".into(),
    ]
    .to_vec();
    let mut cfg = Config::load(
        &[
            repo.join("configs/base.toml"),
            repo.join("configs/tiny.toml"),
        ],
        &sets,
    )
    .unwrap();
    cfg.train.eval_mode = mode;
    cfg
}

type Evals = BTreeMap<u64, BTreeMap<String, f64>>;

fn run(cfg: &Config, dir: &Path) -> (Vec<u64>, Evals) {
    let opts = Af2Options {
        pdb_dir: Some(dir.join("eval")),
        ..Af2Options::default()
    };
    let task = Af2Task::new(cfg, Device::Cpu, opts).unwrap();
    let mut t = Trainer::new(task, SingleProcess, cfg, options(dir)).unwrap();
    assert_eq!(t.eval_is_async(), cfg.train.eval_mode == EvalMode::Async);
    assert_eq!(t.run().unwrap(), Outcome::Finished { step: 2 });
    let lines = metrics_lines(dir);
    let losses = lines
        .iter()
        .filter(|v| v["kind"] == "train")
        .map(|v| v["loss"].as_f64().unwrap().to_bits())
        .collect();
    let evals = lines
        .iter()
        .filter(|v| v["kind"] == "eval")
        .map(|v| {
            (
                v["step"].as_u64().unwrap(),
                serde_json::from_value(v["metrics"].clone()).unwrap(),
            )
        })
        .collect();
    (losses, evals)
}

#[test]
fn eval_async_af2_matches_sync_bitwise() {
    let d = run_dir("af2");
    let manifest = manifest_subset(&d, &["2q2k_A", "3u8v_A"]);
    let (sync_dir, async_dir) = (d.join("sync"), d.join("async"));
    let t0 = std::time::Instant::now();
    let (l_sync, e_sync) = run(&config(&manifest, EvalMode::Sync), &sync_dir);
    let (l_async, e_async) = run(&config(&manifest, EvalMode::Async), &async_dir);
    println!("two runs: {:.1} s", t0.elapsed().as_secs_f64());
    assert_eq!(l_sync.len(), 2);
    assert_eq!(l_sync, l_async, "training losses depend on the eval mode");
    assert_eq!(e_sync.keys().copied().collect::<Vec<_>>(), vec![1, 2]);
    for m in e_sync.values() {
        assert_eq!(m["eval_chains"], 1.0);
        assert!(m["3u8v_A/lddt_ca"] > 0.0 && m["3u8v_A/lddt_ca"] <= 1.0);
    }
    // Bitwise: f64 JSON round trip is exact.
    assert_eq!(e_sync, e_async, "async eval metrics differ from sync");
    for step in [1u64, 2] {
        let pdb = |dir: &Path| {
            std::fs::read(dir.join(format!("eval/step-{step:09}/3u8v_A.pdb"))).unwrap()
        };
        assert_eq!(
            pdb(&sync_dir),
            pdb(&async_dir),
            "PDB of step {step} differs"
        );
    }
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_ferrofold")
}

fn check(o: &std::process::Output) {
    assert!(
        o.status.success(),
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// Two ranks (`mpirun -np 2`, `extra` settings), asynchronous evaluation: each rank evaluates its share of the two
/// validation chains on its thread; rank 0 merges them. The merged metrics cover both chains with
/// the means over both, and the predictions equal a single-process `ferrofold eval` of the
/// checkpointed EMA weights of that step, byte for byte.
fn np2_sharded_equals_single_process_eval(tag: &str, extra: &[&str]) {
    let d = run_dir(tag);
    let manifest = manifest_subset(&d, &["2q2k_A", "3o5r_A", "3u8v_A"]);
    let run = d.join("run");
    let common: Vec<String> = [
        "--config",
        "configs/base.toml",
        "--config",
        "configs/tiny.toml",
        "--set",
        &format!("data.manifest=\"{}\"", manifest.display()),
        "--set",
        "data.crop_size=72",
        "--set",
        "log.progress=\"never\"",
        "--run-dir",
        run.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let o = common::mpi::mpirun(2, bin())
        .arg("train")
        .args(&common)
        .args([
            "--set",
            "train.max_steps=1",
            "--set",
            "train.eval_every=1",
            "--set",
            "train.eval_mode=\"async\"",
        ])
        .args(extra)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    check(&o);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("3o5r_A") && out.contains("3u8v_A"), "{out}");
    let evals: Vec<BTreeMap<String, f64>> = metrics_lines(&run)
        .iter()
        .filter(|v| v["kind"] == "eval")
        .map(|v| {
            assert_eq!(v["step"], 1);
            serde_json::from_value(v["metrics"].clone()).unwrap()
        })
        .collect();
    assert_eq!(evals.len(), 1, "one merged evaluation record");
    let m = &evals[0];
    assert_eq!(m["eval_chains"], 2.0);
    for k in ["lddt_ca", "gdt_ts", "rmsd_ca"] {
        let mean = (m[&format!("3o5r_A/{k}")] + m[&format!("3u8v_A/{k}")]) / 2.0;
        assert_eq!(m[k], mean, "{k}");
    }
    let ev = d.join("ev");
    let o = std::process::Command::new(bin())
        .arg("eval")
        .args(&common)
        .args([
            "--checkpoint",
            run.join("ckpt-000000001").to_str().unwrap(),
            "--out",
            ev.to_str().unwrap(),
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    check(&o);
    for id in ["3o5r_A", "3u8v_A"] {
        let pdb = |dir: &Path| std::fs::read(dir.join(format!("step-000000001/{id}.pdb"))).unwrap();
        assert_eq!(pdb(&run.join("eval")), pdb(&ev), "{id}: prediction differs");
    }
}

#[test]
fn eval_async_af2_np2_sharded_equals_single_process_eval() {
    np2_sharded_equals_single_process_eval("af2np2", &[]);
}

/// DAP-2: the background evaluators run the DAP-free model, one validation shard per rank.
#[test]
fn eval_async_af2_dap2_thread_eval_equals_single_process_eval() {
    np2_sharded_equals_single_process_eval(
        "af2dap2",
        &[
            "--set",
            "parallel.dap_size=2",
            "--set",
            "model.remat=\"none\"",
        ],
    );
}
