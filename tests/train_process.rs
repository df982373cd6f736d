//! The toy trainer in a child process (this test binary re-executed with `FERROFOLD_TRAIN_CHILD`
//! set): SIGTERM/SIGUSR1 give a checkpoint and exit status 75; SIGKILL mid-run leaves only complete
//! checkpoints, and resuming from the last one reproduces the straight run bitwise.

mod train_support;

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use candle_core::Device;
use ferrofold::train::checkpoint;
use ferrofold::train::toy::ToyConfig;
use ferrofold::train::{Outcome, EXIT_STOPPED};
use train_support::*;

const CHILD_ENV: &str = "FERROFOLD_TRAIN_CHILD";

/// Child-process settings, passed through the environment as `dir|delay_ms|ckpt_every|hidden`.
struct ChildSpec {
    dir: PathBuf,
    delay_ms: u64,
    ckpt_every: u64,
    hidden: usize,
}

fn child_config(spec: &ChildSpec) -> (ferrofold::config::Config, ToyConfig) {
    let mut cfg = toy_config();
    cfg.train.max_steps = 100_000;
    cfg.train.checkpoint_every = spec.ckpt_every;
    cfg.train.eval_every = 5;
    cfg.train.keep_last = 2;
    let toy = ToyConfig {
        hidden: spec.hidden,
        in_dim: 32,
        step_delay_ms: spec.delay_ms,
        nan_steps: vec![6],
        ..ToyConfig::default()
    };
    (cfg, toy)
}

/// Entry point of the child: a no-op test unless `FERROFOLD_TRAIN_CHILD` is set.
#[test]
fn child_entry() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let parts: Vec<&str> = spec.split('|').collect();
    let spec = ChildSpec {
        dir: PathBuf::from(parts[0]),
        delay_ms: parts[1].parse().unwrap(),
        ckpt_every: parts[2].parse().unwrap(),
        hidden: parts[3].parse().unwrap(),
    };
    let (cfg, toy) = child_config(&spec);
    let mut o = options(&spec.dir);
    o.handle_signals = true;
    let mut t = trainer(&cfg, &toy, o);
    let outcome = t.run().unwrap();
    std::process::exit(outcome.exit_code());
}

fn spawn(spec: &ChildSpec) -> Child {
    let exe = std::env::current_exe().unwrap();
    Command::new(exe)
        .args(["child_entry", "--exact", "--nocapture", "--test-threads=1"])
        .env(
            CHILD_ENV,
            format!(
                "{}|{}|{}|{}",
                spec.dir.display(),
                spec.delay_ms,
                spec.ckpt_every,
                spec.hidden
            ),
        )
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap()
}

/// Wait until the child has logged at least `n` train steps.
fn wait_for_steps(child: &mut Child, dir: &Path, n: usize) {
    let t0 = Instant::now();
    loop {
        let steps = std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("\"kind\":\"train\""))
            .count();
        if steps >= n {
            return;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("child exited early: {status}");
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "child too slow");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if t0.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            panic!("child did not exit");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Resume in this process from the run dir to `target` steps and compare bitwise with a straight
/// in-process run to `target`.
fn assert_resume_matches_straight(spec: &ChildSpec, target: u64) {
    let (cfg, mut toy) = child_config(spec);
    toy.step_delay_ms = 0;
    let mut o = options(&spec.dir);
    o.stop_at = Some(target);
    let mut resumed = trainer(&cfg, &toy, o);
    let from = resumed.step();
    assert!(from < target);
    assert_eq!(resumed.run().unwrap(), Outcome::Finished { step: target });
    let straight_dir = run_dir("proc-straight");
    let mut o = options(&straight_dir);
    o.stop_at = Some(target);
    let mut straight = trainer(&cfg, &toy, o);
    straight.run().unwrap();
    assert_eq!(
        snapshot(&straight),
        snapshot(&resumed),
        "resumed at {from} differs from the straight run"
    );
}

fn stop_by_signal(sig: i32) {
    let guard = run_dir("sig");
    let spec = ChildSpec {
        dir: guard.to_path_buf(),
        delay_ms: 20,
        ckpt_every: 1000,
        hidden: 16,
    };
    let mut child = spawn(&spec);
    wait_for_steps(&mut child, &spec.dir, 8);
    // SAFETY: plain kill(2) on our own child's pid.
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, sig) };
    assert_eq!(rc, 0);
    let status = wait_exit(&mut child);
    assert_eq!(status.code(), Some(EXIT_STOPPED), "{status}");
    // The checkpoint is at the step where the child stopped: every logged step is in it.
    let latest = checkpoint::find_latest(&spec.dir).unwrap().unwrap();
    let meta = checkpoint::read_meta(&latest).unwrap();
    let logged = metrics_lines(&spec.dir)
        .iter()
        .filter(|v| v["kind"] == "train")
        .count() as u64;
    assert_eq!(meta.step, logged);
    assert!(meta.step >= 8);
    assert_eq!(meta.skipped_steps, 1); // the NaN step 6
    checkpoint::load(&latest, &Device::Cpu).unwrap();
    assert_resume_matches_straight(&spec, meta.step + 3);
}

#[test]
fn sigterm_checkpoints_and_exits_75() {
    stop_by_signal(libc::SIGTERM);
}

#[test]
fn sigusr1_checkpoints_and_exits_75() {
    stop_by_signal(libc::SIGUSR1);
}

/// SIGKILL at an arbitrary moment (a larger model checkpointed every step, so the kill usually lands
/// inside a checkpoint write): every `ckpt-*` directory is complete and verifies; resuming from the
/// newest reproduces the straight run.
#[test]
fn sigkill_leaves_only_complete_checkpoints() {
    let guard = run_dir("kill");
    let spec = ChildSpec {
        dir: guard.to_path_buf(),
        delay_ms: 0,
        ckpt_every: 1,
        hidden: 2048,
    };
    let mut child = spawn(&spec);
    wait_for_steps(&mut child, &spec.dir, 10);
    child.kill().unwrap(); // SIGKILL
    let status = wait_exit(&mut child);
    assert_eq!(status.code(), None, "expected death by signal: {status}");
    let all = checkpoint::list(&spec.dir).unwrap();
    assert!(!all.is_empty());
    for (_, ck) in &all {
        checkpoint::load(ck, &Device::Cpu)
            .unwrap_or_else(|e| panic!("incomplete checkpoint left behind: {e}"));
    }
    let tmp_left = std::fs::read_dir(&spec.dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(".tmp")
        })
        .count();
    eprintln!(
        "killed with {} complete checkpoint(s), {tmp_left} temp dir(s) left",
        all.len()
    );
    let latest = all.last().unwrap().0;
    assert_resume_matches_straight(&spec, latest + 2);
}
