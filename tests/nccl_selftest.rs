//! CPU checks of the device plumbing added for the NCCL backend (the GPU runs themselves happen on
//! a GPU machine: `ferrofold-selftest <case> --device cuda`). Each test spawns
//! `mpirun --allow-run-as-root --oversubscribe -np N ferrofold-selftest <case> [args]` with a
//! timeout:
//! - `--device cpu` selects the MPI path explicitly (and the collectives case checks that
//!   `parallel.backend = nccl` is rejected on the CPU with an error naming the setting, and that
//!   every group of `auto` is MPI);
//! - `--device cuda` without a usable GPU (CPU build or no device) fails cleanly on every rank
//!   instead of hanging;
//! - `dap-evo-dp` with `DAP_SIZE=1` on 2 ranks (the DP-2 layout the GPU run uses): the gradient
//!   all-reduce of two replicas equals the mean over both samples of single-process gradients.

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn reader(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = r.read_to_string(&mut s);
        s
    })
}

/// Run the selftest; returns (exit success, stdout, report). Kills the job after `timeout`.
fn run(
    np: usize,
    args: &[&str],
    env: &[(&str, &str)],
    timeout: Duration,
) -> (bool, String, String) {
    let start = Instant::now();
    let mut cmd = Command::new("mpirun");
    cmd.args([
        "--allow-run-as-root",
        "--oversubscribe",
        "-np",
        &np.to_string(),
    ])
    .arg(env!("CARGO_BIN_EXE_ferrofold-selftest"))
    .args(args)
    .env("FERROFOLD_GOLDEN_DIR", common::golden::golden_dir())
    .env("RUST_BACKTRACE", "0")
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("spawn mpirun (is Open MPI installed?)");
    let out = reader(child.stdout.take().expect("stdout"));
    let err = reader(child.stderr.take().expect("stderr"));
    let mut status = None;
    while start.elapsed() < timeout {
        if let Some(s) = child.try_wait().expect("try_wait") {
            status = Some(s);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if status.is_none() {
        let _ = child.kill();
    }
    let _ = child.wait();
    let stdout = out.join().unwrap_or_default();
    let report = format!(
        "{args:?} np {np}: status {status:?} after {:?}\n--- stdout\n{stdout}\n--- stderr\n{}",
        start.elapsed(),
        err.join().unwrap_or_default()
    );
    assert!(status.is_some(), "timed out (hang?)\n{report}");
    (status.is_some_and(|s| s.success()), stdout, report)
}

fn expect_pass(np: usize, args: &[&str], env: &[(&str, &str)]) {
    let (ok, stdout, report) = run(np, args, env, Duration::from_secs(20));
    assert!(ok, "job failed\n{report}");
    for r in 0..np {
        let line = format!("PASS {} rank {r}/{np}", args[0]);
        assert!(
            stdout.lines().any(|l| l.trim() == line),
            "missing `{line}`\n{report}"
        );
    }
    assert!(!stdout.contains("FAIL"), "{report}");
}

#[test]
fn comm_device_cpu_flag_selects_mpi() {
    expect_pass(2, &["collectives", "--device", "cpu"], &[]);
}

#[test]
fn comm_device_cuda_without_gpu_fails_cleanly() {
    if std::env::var_os("FERROFOLD_TEST_HAS_GPU").is_some() {
        return; // on a GPU machine the flag works: nothing to check here
    }
    let (ok, stdout, report) = run(
        1,
        &["collectives", "--device", "cuda"],
        &[],
        Duration::from_secs(20),
    );
    assert!(!ok, "--device cuda without a GPU must fail\n{report}");
    let fail = stdout
        .lines()
        .find(|l| l.starts_with("FAIL collectives"))
        .unwrap_or_else(|| panic!("no FAIL line\n{report}"));
    assert!(fail.contains("cuda"), "the error must say why: {fail}");
}

#[test]
fn dap_evo_dp2_dap1_gradients_match_two_sample_mean() {
    expect_pass(2, &["dap-evo-dp"], &[("DAP_SIZE", "1")]);
}
