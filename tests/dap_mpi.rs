//! Multi-rank tests of the DAP Evoformer stack (`ferrofold::parallel::DapEvoformer`): each spawns
//! `mpirun --allow-run-as-root --oversubscribe -np N ferrofold-selftest dap-evo` with a timeout and
//! requires one PASS line per rank. The case (`src/bin/selftest/dap_evo.rs`) checks the DAP-N
//! stack's outputs, every parameter gradient (summed over the DAP group) and the input gradients
//! against the OpenFold golden fixture `evoformer_stack_2blocks` (f64, rel <= 1e-10) with
//! `parallel.overlap` = duality_async and off, and against the single-rank stack with seeded
//! dropout and a fully masked sequence (f64 rel <= 1e-10, f32 rel <= 1e-5). The fixture's
//! `n_res = 11`, `n_seq = 5` are padded for N = 2 and 4.

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

fn expect_pass(np: usize, case: &str) {
    let start = Instant::now();
    let mut child = Command::new("mpirun")
        .args([
            "--allow-run-as-root",
            "--oversubscribe",
            "-np",
            &np.to_string(),
        ])
        .arg(env!("CARGO_BIN_EXE_ferrofold-selftest"))
        .arg(case)
        .env("FERROFOLD_GOLDEN_DIR", common::golden::golden_dir())
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mpirun (is Open MPI installed?)");
    let out = reader(child.stdout.take().expect("stdout"));
    let err = reader(child.stderr.take().expect("stderr"));
    let mut status = None;
    while start.elapsed() < Duration::from_secs(20) {
        if let Some(s) = child.try_wait().expect("try_wait") {
            status = Some(s);
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if status.is_none() {
        // SIGTERM lets mpirun take its ranks down; then make sure.
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        std::thread::sleep(Duration::from_secs(2));
        let _ = child.kill();
    }
    let _ = child.wait();
    let (stdout, stderr) = (
        out.join().unwrap_or_default(),
        err.join().unwrap_or_default(),
    );
    let report = format!(
        "case {case} np {np}: status {status:?} after {:?}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        start.elapsed()
    );
    let status = status.unwrap_or_else(|| panic!("timed out (hang?)\n{report}"));
    assert!(status.success(), "job failed\n{report}");
    for r in 0..np {
        let line = format!("PASS {case} rank {r}/{np}");
        assert!(
            stdout.lines().any(|l| l.trim() == line),
            "missing `{line}`\n{report}"
        );
    }
    assert!(!stdout.contains("FAIL"), "{report}");
    println!("{stdout}");
}

/// DAP-1 (the single-rank path through `DapEvoformer`) equals the fixture.
#[test]
fn dap_evoformer_np1_golden() {
    expect_pass(1, "dap-evo");
}

/// DAP-2: padded residues and sequences, overlap on/off, dropout, f64 and f32.
#[test]
fn dap_evoformer_np2_golden_and_dap1() {
    expect_pass(2, "dap-evo");
}

/// DAP-4 (S 5 -> 8, R 11 -> 12).
#[test]
fn dap_evoformer_np4_golden_and_dap1() {
    expect_pass(4, "dap-evo");
}

/// DP-2 × DAP-2 (4 ranks): different samples per replica, dropout, one world gradient all-reduce
/// with the DAP scale = mean over samples of single-rank gradients (rel <= 1e-10).
#[test]
fn dap_evoformer_dp2_dap2_np4() {
    expect_pass(4, "dap-evo-dp");
}
