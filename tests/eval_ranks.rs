//! Dedicated evaluation ranks (`parallel.eval_ranks`), with real `mpirun` runs of the binary (tiny
//! AF2 model, one training and one validation chain of the sample data): two training ranks
//! (DP-2) plus one evaluation rank train bitwise like the same DP-2 run without evaluation ranks, and the
//! evaluation ranks' metrics equal the in-place (sync) evaluation's at the same steps. Bad layouts
//! are refused with errors naming the key.

mod common;
mod train_support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

use common::data::manifest_subset;
use ferrofold::config::Config;
use train_support::{metrics_lines, run_dir};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_ferrofold")
}

fn describe(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `ferrofold train` on `np` ranks (`None`: no mpirun) with the tiny config plus `sets`.
fn train(np: Option<usize>, manifest: &Path, run: &Path, sets: &[&str]) -> Output {
    let mut cmd = match np {
        Some(n) => common::mpi::mpirun(n, bin()),
        None => Command::new(bin()),
    };
    cmd.arg("train")
        .args([
            "--config",
            "configs/base.toml",
            "--config",
            "configs/tiny.toml",
        ])
        .args([
            "--set",
            &format!("data.manifest=\"{}\"", manifest.display()),
        ])
        .args(["--set", "data.crop_size=72"])
        .args(["--set", "data.loader.order=\"deterministic\""])
        .args(["--set", "log.progress=\"never\""])
        .args(["--set", "train.checkpoint_every=1000"])
        .args(["--run-dir", run.to_str().unwrap()]);
    for s in sets {
        cmd.args(["--set", s]);
    }
    cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap()
}

type Evals = BTreeMap<u64, BTreeMap<String, f64>>;

/// Training losses (as bits) and evaluation records of a run directory.
fn read_run(run: &Path) -> (Vec<(u64, u64)>, Evals) {
    let lines = metrics_lines(run);
    let losses = lines
        .iter()
        .filter(|v| v["kind"] == "train")
        .map(|v| {
            (
                v["step"].as_u64().unwrap(),
                v["loss"].as_f64().unwrap().to_bits(),
            )
        })
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

/// `2 + n_eval` ranks (`parallel.eval_ranks = n_eval`) against the same DP-2 run evaluating in
/// place, on the validation chains of `ids` (`val_ids`).
fn ranks_equal_dp2_sync(tag: &str, n_eval: usize, ids: &[&str], val_ids: &[&str]) {
    let d = run_dir(tag);
    let manifest = manifest_subset(&d, ids);
    let steps = ["train.max_steps=2", "train.eval_every=1"];
    let t0 = std::time::Instant::now();
    let ranks = d.join("ranks");
    let n_eval_set = format!("parallel.eval_ranks={n_eval}");
    let mut sets = steps.to_vec();
    sets.extend([n_eval_set.as_str(), "train.eval_mode=\"async\""]);
    let o = train(Some(2 + n_eval), &manifest, &ranks, &sets);
    assert!(o.status.success(), "{}", describe(&o));
    // The same DP-2 run, evaluating in place.
    let sync = d.join("sync");
    let mut sets = steps.to_vec();
    sets.push("train.eval_mode=\"sync\"");
    let o = train(Some(2), &manifest, &sync, &sets);
    assert!(o.status.success(), "{}", describe(&o));
    println!("two runs: {:.1} s", t0.elapsed().as_secs_f64());

    let (l_ranks, e_ranks) = read_run(&ranks);
    let (l_sync, e_sync) = read_run(&sync);
    assert_eq!(l_sync.iter().map(|l| l.0).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(
        l_ranks, l_sync,
        "training losses depend on the evaluation ranks"
    );
    assert_eq!(e_sync.keys().copied().collect::<Vec<_>>(), vec![1, 2]);
    for m in e_sync.values() {
        assert_eq!(m["eval_chains"], val_ids.len() as f64);
        for id in val_ids {
            let l = m[&format!("{id}/lddt_ca")];
            assert!(l > 0.0 && l <= 1.0, "{id}: {l}");
        }
    }
    // Bitwise: the f64 JSON round trip is exact.
    assert_eq!(
        e_ranks, e_sync,
        "evaluation ranks' metrics differ from sync"
    );
    // The evaluation ranks wrote the predictions, equal to the in-place ones.
    for step in [1u64, 2] {
        for id in val_ids {
            let pdb = |run: &Path| {
                std::fs::read(run.join(format!("eval/step-{step:09}/{id}.pdb"))).unwrap()
            };
            assert_eq!(pdb(&ranks), pdb(&sync), "{id}: PDB of step {step} differs");
        }
    }
}

/// DP-2 + one evaluation rank (all validation chains on it).
#[test]
fn eval_ranks_np3_trains_like_dp2_and_evaluates_like_sync() {
    ranks_equal_dp2_sync("evalranks", 1, &["2q2k_A", "3u8v_A"], &["3u8v_A"]);
}

/// DP-2 + two evaluation ranks: the two validation chains are split over them and merged on
/// training rank 0 like the in-place shards.
#[test]
fn eval_ranks_np4_two_eval_ranks_share_the_chains() {
    ranks_equal_dp2_sync(
        "evalranks2",
        2,
        &["2q2k_A", "3o5r_A", "3u8v_A"],
        &["3o5r_A", "3u8v_A"],
    );
}

/// Layouts without training ranks, or whose training ranks DAP does not divide, are refused
/// (before any training) with errors naming the key; so is `eval_ranks` with in-place evaluation.
#[test]
fn eval_ranks_bad_layouts_are_refused() {
    let d = run_dir("evalranks-bad");
    let manifest = manifest_subset(&d, &["2q2k_A", "3u8v_A"]);
    let fails = |np: Option<usize>, sets: &[&str], key: &str| {
        let run = d.join(format!("run-{}", key.len() + sets.len() + np.unwrap_or(1)));
        let o = train(np, &manifest, &run, sets);
        assert!(!o.status.success(), "{}", describe(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains(key), "{key} not named:\n{}", describe(&o));
    };
    // A singleton with one evaluation rank: no training rank.
    fails(
        None,
        &["parallel.eval_ranks=1", "train.eval_mode=\"async\""],
        "parallel.eval_ranks",
    );
    // Two ranks, both evaluation ranks.
    fails(
        Some(2),
        &["parallel.eval_ranks=2", "train.eval_mode=\"async\""],
        "parallel.eval_ranks",
    );
    // One training rank cannot hold a DAP-2 group.
    fails(
        Some(2),
        &[
            "parallel.eval_ranks=1",
            "parallel.dap_size=2",
            "train.eval_mode=\"async\"",
        ],
        "parallel.dap_size",
    );
    // Evaluation ranks evaluate beside training: sync mode is a configuration error.
    let err = Config::load(
        &[],
        &[
            "parallel.eval_ranks=1".into(),
            "train.eval_mode=\"sync\"".into(),
        ],
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("parallel.eval_ranks") && err.contains("eval_mode"),
        "{err}"
    );
    assert!(Config::load(&[], &["parallel.eval_ranks=1".into()]).is_ok());
}

/// The lDDT target reached by an evaluation rank's result stops every training rank with success
/// (the evaluation rank exits 0 after the stop message), and the checkpoint of the evaluated step
/// carries the metrics in its `meta.json`.
#[test]
fn eval_ranks_target_reached_stops_all_ranks_and_annotates_checkpoint() {
    let d = run_dir("evalranks-target");
    let manifest = manifest_subset(&d, &["2q2k_A", "3u8v_A"]);
    let run = d.join("run");
    let o = train(
        Some(3),
        &manifest,
        &run,
        &[
            "train.max_steps=4",
            "train.eval_every=1",
            "train.checkpoint_every=1",
            "train.keep_last=10",
            "train.target_lddt_ca=0.0",
            "parallel.eval_ranks=1",
            "train.eval_mode=\"async\"",
        ],
    );
    assert!(o.status.success(), "{}", describe(&o));
    let (losses, evals) = read_run(&run);
    // The result of step 1 reaches the target: training stops when it is taken (before step 4
    // unless every step outran the evaluation; at the latest at the run end).
    let first = evals.keys().next().copied();
    assert_eq!(first, Some(1), "{evals:?}");
    assert!(evals[&1]["lddt_ca"] >= 0.0);
    assert!(!losses.is_empty() && losses.len() <= 4);
    let meta = ferrofold::train::checkpoint::read_meta(&run.join("ckpt-000000001")).unwrap();
    assert_eq!(meta.eval, evals[&1], "checkpoint meta of step 1");
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("TargetReached"), "{}", describe(&o));
}

/// SIGUSR1 to mpirun (forwarded to every rank): the training ranks checkpoint and stop with 75,
/// waiting for the evaluation in flight; the evaluation rank ignores the signal and exits 0 when
/// training rank 0 sends the stop message.
#[test]
fn eval_ranks_sigusr1_stops_with_checkpoint() {
    use std::time::{Duration, Instant};
    let d = run_dir("evalranks-sig");
    let manifest = manifest_subset(&d, &["2q2k_A", "3u8v_A"]);
    let run = d.join("run");
    let mut child = common::mpi::mpirun(3, bin())
        .arg("train")
        .args([
            "--config",
            "configs/base.toml",
            "--config",
            "configs/tiny.toml",
        ])
        .args([
            "--set",
            &format!("data.manifest=\"{}\"", manifest.display()),
        ])
        .args(["--set", "data.crop_size=72"])
        .args(["--set", "log.progress=\"never\""])
        .args(["--set", "train.max_steps=10000"])
        .args(["--set", "train.eval_every=1"])
        .args(["--set", "train.checkpoint_every=10000"])
        .args(["--set", "train.eval_mode=\"async\""])
        .args(["--set", "parallel.eval_ranks=1"])
        .args(["--run-dir", run.to_str().unwrap()])
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    // Wait for a taken evaluation, so that the evaluation rank is known to be running.
    while read_run(&run).1.is_empty() {
        if let Some(s) = child.try_wait().unwrap() {
            panic!("exited early: {s}");
        }
        if t0.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("no evaluation within 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: plain kill(2) on our own child's pid.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGUSR1) };
    assert_eq!(rc, 0);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(90) {
            let _ = child.kill();
            panic!("did not stop");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(75), "{status}");
    let (losses, evals) = read_run(&run);
    let last = losses.last().unwrap().0;
    assert!(last < 10000);
    assert!(
        run.join(format!("ckpt-{last:09}")).is_dir(),
        "checkpoint of the stop step {last}"
    );
    assert!(evals.keys().all(|s| *s <= last), "{evals:?}");
}
