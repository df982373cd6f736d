//! Multi-rank tests of the communication layer: each spawns
//! `mpirun --allow-run-as-root --oversubscribe -np N ferrofold-selftest <case>` with a timeout
//! (the job is killed and the test fails if it hangs) and checks the exit status and one PASS line
//! per rank. The checks themselves (expected values from the definitions) live in
//! `src/bin/ferrofold-selftest.rs`.

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

struct Outcome {
    /// `None` when the job had to be killed (timeout).
    status: Option<ExitStatus>,
    stdout: String,
    stderr: String,
    elapsed: Duration,
}

fn reader(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = r.read_to_string(&mut s);
        s
    })
}

/// Stop a hung job: SIGTERM lets mpirun take its ranks down; SIGKILL if it does not exit.
fn stop(child: &mut Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(3) {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn mpirun(np: usize, case: &str, timeout: Duration) -> Outcome {
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
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mpirun (is Open MPI installed?)");
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
        stop(&mut child);
    }
    // Reaped already (try_wait/stop); this only returns the cached status.
    let _ = child.wait();
    Outcome {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
        elapsed: start.elapsed(),
    }
}

/// Run `case` on `np` ranks and require success with a PASS line from every rank.
fn expect_pass(np: usize, case: &str) {
    let o = mpirun(np, case, Duration::from_secs(15));
    let report = format!(
        "case {case} np {np}: status {:?} after {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status, o.elapsed, o.stdout, o.stderr
    );
    let status = o
        .status
        .unwrap_or_else(|| panic!("timed out (hang?)\n{report}"));
    assert!(status.success(), "job failed\n{report}");
    for r in 0..np {
        let line = format!("PASS {case} rank {r}/{np}");
        assert!(
            o.stdout.lines().any(|l| l.trim() == line),
            "missing `{line}`\n{report}"
        );
    }
    assert!(!o.stdout.contains("FAIL"), "{report}");
}

#[test]
fn comm_collectives_np2() {
    expect_pass(2, "collectives");
}

#[test]
fn comm_collectives_np4() {
    expect_pass(4, "collectives");
}

#[test]
fn comm_groups_np4_dap2() {
    expect_pass(4, "groups");
}

#[test]
fn comm_ddp_np2() {
    expect_pass(2, "ddp");
}

#[test]
fn comm_dap_np2() {
    expect_pass(2, "dap");
}

#[test]
fn comm_dap_np4() {
    expect_pass(4, "dap");
}

#[test]
fn comm_dap_np1_identity() {
    expect_pass(1, "dap");
}

/// DAP (size 2) inside data parallelism (2 replicas): world gradient reduction with the DAP scale.
#[test]
fn comm_dap_dp_grid_np4() {
    expect_pass(4, "dap-dp");
}

/// A panic on rank 1 must take the whole job down quickly with a message naming the rank, while
/// rank 0 sits in a collective that rank 1 never joins.
#[test]
fn comm_panic_rank1_aborts_job() {
    let o = mpirun(2, "panic-rank1", Duration::from_secs(15));
    let report = format!(
        "status {:?} after {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status, o.elapsed, o.stdout, o.stderr
    );
    let status = o
        .status
        .unwrap_or_else(|| panic!("job hung after a rank panicked\n{report}"));
    assert!(!status.success(), "job must fail\n{report}");
    assert!(
        o.elapsed < Duration::from_secs(10),
        "took too long to abort\n{report}"
    );
    assert!(
        o.stderr.contains("[rank 1] fatal: panic"),
        "message must name the rank\n{report}"
    );
    assert!(
        o.stderr.contains("deliberate panic on rank 1"),
        "panic message\n{report}"
    );
    assert!(!o.stdout.contains("PASS"), "no rank may pass\n{report}");
    assert!(
        !o.stdout.contains("returned from a collective"),
        "rank 0 must not complete\n{report}"
    );
}

/// Data-parallel training (toy task, real trainer): DP-2 equals one process on both samples, and a
/// DP-2 run resumes bitwise exactly.
#[test]
fn train_dp_toy_np2() {
    expect_pass(2, "dp-toy");
}
