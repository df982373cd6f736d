//! The launch/ scripts against a real Slurm (22.05 + munge) on this machine.
//!
//! Each test starts its own one-node cluster in a temp dir (`scripts/slurm-cluster.sh`, own ports
//! and munged, ~0.3 s) and stops it by pid in `Drop`, also when the test fails; the cluster's owner
//! watcher stops it if the test process is killed outright. A failing test keeps its directory
//! (cluster logs, run dir) and prints its path.
//!
//! Slurm must be installed (`FERROFOLD_WITH_SLURM=1 scripts/setup.sh`); without `sbatch` these
//! tests fail, they never skip. The launcher runs `info` as its job command until `ferrofold train`
//! exists (`FERROFOLD_CMD=info`), and a stand-in binary for the requeue path.

mod common;

use std::path::{Path, PathBuf};

use common::data::manifest_subset;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_ferrofold")
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A private Slurm cluster in a temp dir, stopped (by pid) on drop.
struct Cluster {
    dir: PathBuf,
}

impl Cluster {
    fn start(name: &str) -> Cluster {
        let on_path = |exe: &str| {
            std::env::var_os("PATH")
                .map(|p| std::env::split_paths(&p).any(|d| d.join(exe).is_file()))
                .unwrap_or(false)
        };
        assert!(
            on_path("sbatch") && on_path("slurmctld"),
            "Slurm is not installed (no sbatch/slurmctld on PATH): run \
             `FERROFOLD_WITH_SLURM=1 scripts/setup.sh` (installs slurmd, slurmctld, slurm-client, munge)"
        );
        let dir = std::env::temp_dir().join(format!("ff-slurm-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("run")).unwrap();
        let cluster = Cluster { dir };
        let o = cluster
            .script("start")
            .env("FERROFOLD_SLURM_OWNER", std::process::id().to_string())
            .output()
            .unwrap();
        assert!(o.status.success(), "cluster start failed: {}", text(&o));
        cluster
    }

    fn script(&self, action: &str) -> Command {
        let mut c = Command::new(repo().join("scripts/slurm-cluster.sh"));
        c.arg(action).arg(&self.dir);
        scrub(&mut c);
        c
    }

    fn conf(&self) -> PathBuf {
        self.dir.join("slurm.conf")
    }

    fn run_dir(&self) -> PathBuf {
        self.dir.join("run")
    }

    /// A Slurm client command talking to this cluster.
    fn client(&self, exe: &str) -> Command {
        let mut c = Command::new(exe);
        scrub(&mut c);
        c.env("SLURM_CONF", self.conf()).current_dir(repo());
        c
    }

    /// `sbatch` of a launch/ script on 2 tasks of this 2-CPU node, no GPUs, from the checkout.
    fn sbatch(&self, script: &str, env: &[(&str, &str)], extra: &[&str]) -> Command {
        let mut c = self.client("sbatch");
        c.args([
            "--ntasks-per-node=2",
            "--gpus-per-node=0",
            "--cpus-per-task=1",
            "--time=5",
            "--signal=B:USR1@10",
        ])
        .arg(format!(
            "--output={}/slurm-%j.out",
            self.run_dir().display()
        ))
        .args(extra)
        .arg(script)
        .env("FERROFOLD_RUN_DIR", self.run_dir())
        .env("FERROFOLD_HOME", repo())
        .env("FERROFOLD_BIN", bin())
        .env("FERROFOLD_CONFIGS", "configs/base.toml configs/tiny.toml")
        .env("FERROFOLD_CMD", "info");
        for (k, v) in env {
            c.env(k, v);
        }
        c
    }

    fn submit(&self, script: &str, env: &[(&str, &str)]) -> String {
        let o = self.sbatch(script, env, &["--parsable"]).output().unwrap();
        assert!(o.status.success(), "sbatch: {}", text(&o));
        String::from_utf8_lossy(&o.stdout).trim().to_string()
    }

    /// `scontrol show job -o ID` as key=value pairs.
    fn job(&self, id: &str) -> Vec<(String, String)> {
        let o = self
            .client("scontrol")
            .args(["show", "job", "-o", id])
            .output()
            .unwrap();
        assert!(o.status.success(), "scontrol show job: {}", text(&o));
        String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn field(&self, id: &str, key: &str) -> String {
        self.job(id)
            .into_iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
            .unwrap_or_default()
    }

    /// Poll (every 0.2 s) until the job reaches a final state; returns it. (`sbatch --wait` polls
    /// with up to 10 s between looks.)
    fn wait_done(&self, id: &str, limit: Duration) -> String {
        let t0 = Instant::now();
        loop {
            let state = self.field(id, "JobState");
            if [
                "COMPLETED",
                "FAILED",
                "CANCELLED",
                "TIMEOUT",
                "NODE_FAIL",
                "OUT_OF_MEMORY",
                "BOOT_FAIL",
                "DEADLINE",
            ]
            .contains(&state.as_str())
            {
                return state;
            }
            assert!(
                t0.elapsed() < limit,
                "job {id} still {state} after {limit:?}: {:?}",
                self.job(id)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// No step daemon of any job is left on the node (no step sockets in the spool).
    fn steps_gone(&self) -> bool {
        std::fs::read_dir(self.dir.join("spool"))
            .map(|d| {
                d.filter_map(|e| e.ok()).all(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    n.starts_with("cred_state") || n.starts_with("hwloc")
                })
            })
            .unwrap_or(true)
    }

    fn logs(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.run_dir().join("logs"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    fn log(&self, name: &str) -> String {
        read(&self.run_dir().join("logs").join(name))
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        match self.script("stop").output() {
            Ok(o) if o.status.success() => {}
            Ok(o) => eprintln!("cluster stop failed: {}", text(&o)),
            Err(e) => eprintln!("cluster stop failed: {e}"),
        }
        if std::thread::panicking() {
            eprintln!("kept {} (cluster logs, run dir)", self.dir.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Remove Slurm variables inherited from an outer job (CI running inside Slurm), so the commands
/// talk only to the test cluster.
fn scrub(c: &mut Command) {
    for (k, _) in std::env::vars_os() {
        let k = k.to_string_lossy();
        if ["SLURM_", "SBATCH_", "SRUN_", "SALLOC_"]
            .iter()
            .any(|p| k.starts_with(p))
        {
            c.env_remove(k.as_ref());
        }
    }
}

/// The text between the line containing `from` and the next line containing `to`.
fn section<'a>(log: &'a str, from: &str, to: &str) -> &'a str {
    let start = log
        .find(from)
        .unwrap_or_else(|| panic!("no {from:?} in log:\n{log}"));
    let rest = &log[start..];
    let end = rest
        .find(to)
        .unwrap_or_else(|| panic!("no {to:?} after {from:?} in log:\n{log}"));
    &rest[..end]
}

#[test]
fn slurm_sbatch_train_runs_preflight_and_job_on_two_ranks() {
    let c = Cluster::start("train");
    let m = manifest_subset(c.run_dir().parent().unwrap(), &["2q2k_A", "3u8v_A"]);
    let extra = format!(
        "--set data.manifest={} --set data.crop_size=48 --set train.max_steps=4 \
         --set train.checkpoint_every=2 --set train.eval_every=1000 --set log.progress=never",
        m.display()
    );
    let env = [
        ("FERROFOLD_CMD", "train"),
        ("FERROFOLD_EXTRA_ARGS", extra.as_str()),
    ];
    let o = c
        .sbatch("launch/train.sbatch", &env, &["--wait"])
        .output()
        .unwrap();
    assert!(o.status.success(), "sbatch --wait: {}", text(&o));
    let logs = c.logs();
    let id = String::from_utf8_lossy(&o.stdout)
        .trim()
        .rsplit(' ')
        .next()
        .unwrap()
        .to_string();
    assert_eq!(logs, vec![format!("job{id}.attempt0.log")], "{logs:?}");
    let log = c.log(&logs[0]);
    // Preflight on both ranks with the same config, then the job command on both ranks.
    let pre = section(&log, "preflight: srun --mpi=pmix", "preflight passed");
    assert!(pre.contains("info --check --config configs/base.toml --config configs/tiny.toml"));
    for r in ["rank 0/2 local_rank 0/2", "rank 1/2 local_rank 1/2"] {
        assert!(pre.contains(r), "preflight lacks {r}:\n{log}");
    }
    assert!(
        pre.contains("preflight ok: 2 ranks, all-reduce correct"),
        "{log}"
    );
    let job = section(
        &log,
        "job step: srun --mpi=pmix",
        "job step exited with status 0",
    );
    assert!(job.contains(&format!("{} train --config", bin())), "{log}");
    // Both ranks train (rank 0 logs at info, others at warn): a 2-rank DP run to the end, then the
    // evaluation summary; the checkpoint holds both ranks' data-loader positions.
    assert!(
        job.contains("[rank 0/2]") && job.contains("training ended: Finished { step: 4 }"),
        "{log}"
    );
    assert!(job.contains("evaluation at step 4"), "{log}");
    let meta = read(&c.run_dir().join("ckpt-000000004/meta.json"));
    let meta: serde_json::Value = serde_json::from_str(&meta).unwrap();
    assert_eq!(
        meta["data_state"]["per_rank"].as_array().map(Vec::len),
        Some(2),
        "{meta}"
    );
    assert!(
        log.contains("OMP_NUM_THREADS=1 NCCL_NVLS_ENABLE=0"),
        "{log}"
    );
    // The run dir got the resolved config and the attempt record; Slurm's output the summary.
    assert!(read(&c.run_dir().join("config.toml")).contains("c_m = 16"));
    let attempts = read(&c.run_dir().join("attempts.tsv"));
    assert!(attempts.starts_with(&format!("{id}\t0\t")), "{attempts}");
    assert!(
        attempts.trim_end().ends_with("\t0\tcompleted"),
        "{attempts}"
    );
    let out = read(&c.run_dir().join(format!("slurm-{id}.out")));
    assert!(out.contains("attempt 0: completed (status 0)"), "{out}");
}

#[test]
fn slurm_bad_config_or_missing_input_fails_fast_with_the_error_in_the_log() {
    let c = Cluster::start("badcfg");
    let bad = c.submit(
        "launch/train.sbatch",
        &[("FERROFOLD_EXTRA_ARGS", "--set model.no_such_key=1")],
    );
    // A missing required variable: refused before anything runs, message in Slurm's output file.
    let mut norun = c.sbatch("launch/finetune.sbatch", &[], &["--parsable"]);
    norun.env_remove("FERROFOLD_RUN_DIR");
    let o = norun.output().unwrap();
    assert!(o.status.success(), "sbatch: {}", text(&o));
    let norun = String::from_utf8_lossy(&o.stdout).trim().to_string();

    assert_eq!(c.wait_done(&bad, Duration::from_secs(40)), "FAILED");
    let logs = c.logs();
    assert_eq!(logs, vec![format!("job{bad}.attempt0.log")], "{logs:?}");
    let log = c.log(&logs[0]);
    assert!(
        log.contains("config error in --set: model.no_such_key"),
        "config error missing:\n{log}"
    );
    assert!(log.contains("preflight FAILED"), "{log}");
    assert!(!log.contains("job step:"), "job step started:\n{log}");
    let attempts = read(&c.run_dir().join("attempts.tsv"));
    assert!(attempts.contains("\tpreflight failed"), "{attempts}");
    assert_ne!(c.field(&bad, "ExitCode"), "0:0");

    assert_eq!(c.wait_done(&norun, Duration::from_secs(40)), "FAILED");
    let out = read(&c.dir.join(format!("run/slurm-{norun}.out")));
    assert!(
        out.contains("FERROFOLD_RUN_DIR: set FERROFOLD_RUN_DIR"),
        "{out}"
    );
}

/// A stand-in for `ferrofold`: the preflight passes; in attempt 0 the job step waits for SIGUSR1
/// (or SIGTERM), then "checkpoints" and exits 75 (the requeue status); in attempt 1 it finishes.
const FAKE_TRAINER: &str = r#"#!/usr/bin/env bash
r=${OMPI_COMM_WORLD_RANK:-${SLURM_PROCID:-?}}
if [ "$1" = info ]; then
  echo "fake preflight rank $r"
  if [ "$r" = 0 ]; then echo "preflight ok: 2 ranks, all-reduce correct, same version and config"; fi
  exit 0
fi
a=${SLURM_RESTART_COUNT:-0}
echo "fake $1 rank $r attempt $a"
if [ "$a" = 0 ]; then
  # Like the trainer: every rank checkpoints (a collective), then all exit 75 together; without
  # this barrier the launcher may kill a rank before it reports, once another exited non-zero.
  ckpt() {
    echo "fake rank $r: $1, checkpointed"
    touch "$FAKE_DIR/ckpt.$r"
    for _ in $(seq 100); do [ -e "$FAKE_DIR/ckpt.0" ] && [ -e "$FAKE_DIR/ckpt.1" ] && break; sleep 0.05; done
    exit 75
  }
  trap 'ckpt USR1' USR1
  trap 'ckpt TERM' TERM
  touch "$FAKE_DIR/ready.$r"
  for _ in $(seq 400); do sleep 0.1; done
  echo "fake rank $r: no signal"; exit 1
fi
echo "fake rank $r: resumed, done"
"#;

/// Submit `launch/train.sbatch` with the stand-in trainer; returns the job id once both ranks wait
/// for the signal in the job step.
fn submit_fake(c: &Cluster, launcher: &str) -> String {
    let fake = c.dir.join("fake-ferrofold");
    std::fs::write(&fake, FAKE_TRAINER).unwrap();
    let mut perm = std::fs::metadata(&fake).unwrap().permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut perm, 0o755);
    std::fs::set_permissions(&fake, perm).unwrap();
    let id = c.submit(
        "launch/train.sbatch",
        &[
            ("FERROFOLD_BIN", fake.to_str().unwrap()),
            ("FERROFOLD_CMD", "train"),
            ("FERROFOLD_LAUNCHER", launcher),
            ("FAKE_DIR", c.dir.to_str().unwrap()),
        ],
    );
    let t0 = Instant::now();
    while !(c.dir.join("ready.0").exists() && c.dir.join("ready.1").exists()) {
        assert!(
            t0.elapsed() < Duration::from_secs(40),
            "ranks not ready: {:?} {:?}",
            c.job(&id),
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    id
}

/// Wait until job `id` is requeued (pending, 1 restart), then release it early from Slurm's requeue
/// delay (BeginTime = now + 120 s), but only once the last attempt's step daemons are gone (their
/// PMIx sockets in the spool carry the step id, which the next attempt reuses) and 2 s after the
/// requeue (slurmd refuses a launch whose credential dates from the same second as the requeue's
/// kill). Slurm's own delay covers both on a real cluster.
fn release_requeued(c: &Cluster, id: &str) {
    let t0 = Instant::now();
    let mut requeued_at = None;
    loop {
        if c.field(id, "Restarts") == "1" && c.field(id, "JobState") == "PENDING" {
            requeued_at.get_or_insert_with(Instant::now);
        }
        if requeued_at.is_some_and(|t| t.elapsed() >= Duration::from_secs(2)) && c.steps_gone() {
            let o = c
                .client("scontrol")
                .args(["update", &format!("JobId={id}"), "StartTime=now"])
                .output()
                .unwrap();
            if o.status.success() {
                break;
            }
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "not requeued: {:?}\n{}",
            c.job(id),
            c.logs().iter().map(|l| c.log(l)).collect::<String>()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// USR1 to the batch shell (what `--signal=B:USR1@S` does) → forwarded to every rank → exit 75 →
/// `scontrol requeue` → attempt 1 completes; one log per attempt in the run dir.
fn requeue_once(launcher: &str) {
    let c = Cluster::start(&format!("requeue-{launcher}"));
    let id = submit_fake(&c, launcher);
    let o = c
        .client("scancel")
        .args(["--batch", "--signal=USR1", &id])
        .output()
        .unwrap();
    assert!(o.status.success(), "scancel: {}", text(&o));
    release_requeued(&c, &id);
    assert_eq!(c.wait_done(&id, Duration::from_secs(40)), "COMPLETED");
    assert_eq!(c.field(&id, "Restarts"), "1");
    let logs = c.logs();
    assert_eq!(
        logs,
        vec![
            format!("job{id}.attempt0.log"),
            format!("job{id}.attempt1.log")
        ]
    );
    let first = c.log(&logs[0]);
    assert!(
        first.contains("SIGUSR1 (time limit near): forwarding to the job step"),
        "{first}"
    );
    for r in 0..2 {
        assert!(
            first.contains(&format!("fake preflight rank {r}")),
            "{first}"
        );
        assert!(
            first.contains(&format!("fake rank {r}: USR1, checkpointed")),
            "{first}"
        );
    }
    assert!(first.contains("job step exited with status 75"), "{first}");
    assert!(first.contains("requeueing job"), "{first}");
    let second = c.log(&logs[1]);
    for r in 0..2 {
        assert!(
            second.contains(&format!("fake rank {r}: resumed, done")),
            "{second}"
        );
    }
    assert!(second.contains("job step exited with status 0"), "{second}");
    let attempts = read(&c.run_dir().join("attempts.tsv"));
    let outcomes: Vec<&str> = attempts
        .lines()
        .map(|l| l.rsplit('\t').next().unwrap())
        .collect();
    assert_eq!(outcomes, ["requeued", "completed"], "{attempts}");
}

#[test]
fn slurm_requeue_after_signal_srun() {
    requeue_once("srun");
}

#[test]
fn slurm_requeue_after_signal_mpirun() {
    requeue_once("mpirun");
}

/// srun tasks whose MPI came up as singletons: topology from Slurm's variables, and the preflight
/// refuses (no Slurm daemons needed: the environment of task 1 of `srun -n2` is enough).
#[test]
fn slurm_env_fallback_topology_fails_preflight() {
    let run = |args: &[&str]| {
        let mut c = Command::new(bin());
        scrub(&mut c);
        c.args(args)
            .current_dir(repo())
            .envs([
                ("SLURM_STEP_ID", "0"),
                ("SLURM_STEP_NUM_TASKS", "2"),
                ("SLURM_STEP_NUM_NODES", "1"),
                ("SLURM_STEP_TASKS_PER_NODE", "2"),
                ("SLURM_NTASKS", "2"),
                ("SLURM_NNODES", "1"),
                ("SLURM_PROCID", "1"),
                ("SLURM_LOCALID", "1"),
                ("SLURM_NODEID", "0"),
            ])
            .output()
            .unwrap()
    };
    let o = run(&["info"]);
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(
        t.contains("rank 1/2 local_rank 1/2 node 0/1 host")
            && t.contains("(topology: slurm env; MPI world is 1: no collectives possible"),
        "{t}"
    );
    assert!(
        t.contains("warning: topology from slurm env: rank 1/2"),
        "{t}"
    );
    let o = run(&["info", "--check"]);
    let t = text(&o);
    assert!(!o.status.success(), "preflight passed:\n{t}");
    assert!(
        t.contains("preflight: communication error (rank 1): topology from slurm env (2 tasks) but the MPI world is 1"),
        "{t}"
    );
}

/// `scancel` (SIGTERM everywhere): the trainer checkpoints and exits 75, but a cancel stays a
/// cancel: no requeue.
#[test]
fn slurm_cancelled_job_is_not_requeued() {
    let c = Cluster::start("cancel");
    let id = submit_fake(&c, "srun");
    let o = c.client("scancel").arg(&id).output().unwrap();
    assert!(o.status.success(), "scancel: {}", text(&o));
    assert_eq!(c.wait_done(&id, Duration::from_secs(40)), "CANCELLED");
    // The batch shell finishes its bookkeeping within Slurm's KillWait (5 s).
    let t0 = Instant::now();
    while !c.run_dir().join("attempts.tsv").exists() && t0.elapsed() < Duration::from_secs(8) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let logs = c.logs();
    assert_eq!(logs, vec![format!("job{id}.attempt0.log")], "{logs:?}");
    let log = c.log(&logs[0]);
    assert!(log.contains("SIGTERM (cancelled"), "{log}");
    assert!(!log.contains("requeueing job"), "{log}");
    assert!(
        log.contains("checkpointed, but the job was terminated by Slurm"),
        "{log}"
    );
    let attempts = read(&c.run_dir().join("attempts.tsv"));
    assert_eq!(attempts.lines().count(), 1, "{attempts}");
    assert!(
        attempts.contains("\tcheckpointed on SIGTERM; not requeued"),
        "{attempts}"
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(c.field(&id, "Restarts"), "0");
    assert_eq!(c.field(&id, "JobState"), "CANCELLED");
}

/// The real trainer under `sbatch`: preempted mid-run with SIGUSR1 (what `--signal=B:USR1@S` sends
/// before the time limit), it checkpoints at the next step boundary on both ranks, exits 75, the job
/// requeues itself, resumes from the checkpoint and finishes; the final weights equal those of an
/// uninterrupted 2-rank run of the same configuration (bitwise: same checkpoint digests).
#[test]
fn slurm_preempted_training_requeues_and_matches_uninterrupted_run() {
    let c = Cluster::start("preempt");
    let m = manifest_subset(c.run_dir().parent().unwrap(), &["2q2k_A", "3u8v_A"]);
    let extra = format!(
        "--set data.manifest={} --set data.crop_size=72 --set data.loader.order=deterministic \
         --set train.max_steps=10 --set train.checkpoint_every=4 --set train.eval_every=1000 \
         --set log.progress=never",
        m.display()
    );
    let env = [
        ("FERROFOLD_CMD", "train"),
        ("FERROFOLD_EXTRA_ARGS", extra.as_str()),
    ];
    let id = c.submit("launch/train.sbatch", &env);
    // Preempt once a few steps are logged.
    let metrics = c.run_dir().join("metrics.jsonl");
    let t0 = Instant::now();
    while std::fs::read_to_string(&metrics)
        .map(|t| t.lines().count())
        .unwrap_or(0)
        < 3
    {
        assert!(
            t0.elapsed() < Duration::from_secs(90),
            "training did not start: {:?}\n{}",
            c.job(&id),
            c.logs().iter().map(|l| c.log(l)).collect::<String>()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let o = c
        .client("scancel")
        .args(["--batch", "--signal=USR1", &id])
        .output()
        .unwrap();
    assert!(o.status.success(), "scancel: {}", text(&o));
    release_requeued(&c, &id);
    assert_eq!(
        c.wait_done(&id, Duration::from_secs(120)),
        "COMPLETED",
        "{}",
        c.logs().iter().map(|l| c.log(l)).collect::<String>()
    );
    let logs = c.logs();
    assert_eq!(logs.len(), 2, "{logs:?}");
    let first = c.log(&logs[0]);
    assert!(first.contains("job step exited with status 75"), "{first}");
    let second = c.log(&logs[1]);
    assert!(second.contains("job step exited with status 0"), "{second}");
    // Uninterrupted reference with the same configuration (2 ranks, mpirun outside Slurm).
    let reference = c.run_dir().parent().unwrap().join("reference");
    let mut args: Vec<String> = vec![
        "train".into(),
        "--config".into(),
        "configs/base.toml".into(),
        "--config".into(),
        "configs/tiny.toml".into(),
    ];
    args.extend(extra.split_whitespace().map(str::to_string));
    args.extend(["--run-dir".into(), reference.to_str().unwrap().into()]);
    let o = common::mpi::mpirun(2, bin())
        .args(&args)
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(o.status.success(), "reference run: {}", text(&o));
    let files = |d: &Path| -> serde_json::Value {
        let meta: serde_json::Value =
            serde_json::from_str(&read(&d.join("ckpt-000000010/meta.json"))).unwrap();
        meta["files"].clone()
    };
    assert_eq!(
        files(&c.run_dir()),
        files(&reference),
        "preempted+requeued run differs from the uninterrupted run"
    );
}
