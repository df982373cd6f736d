//! `mpirun --allow-run-as-root --oversubscribe -np N ferrofold-selftest <args>` with a timeout: the
//! job is stopped (SIGTERM lets mpirun take its ranks down, then SIGKILL) and reported as hung if it
//! does not finish. Shared by the multi-rank test files.

use std::io::Read;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub struct Outcome {
    /// `None` when the job had to be killed (timeout).
    pub status: Option<ExitStatus>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
    what: String,
}

impl Outcome {
    /// Exited, with status 0.
    pub fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }

    /// Everything a failing assertion should show.
    pub fn report(&self) -> String {
        format!(
            "{}: status {:?} after {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.what, self.status, self.elapsed, self.stdout, self.stderr
        )
    }
}

fn reader(mut r: impl Read + Send + 'static) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = r.read_to_string(&mut s);
        s
    })
}

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
}

/// Run the selftest binary with `args` on `np` ranks, `env` added to the environment (the golden
/// directory is always passed on).
pub fn mpirun(np: usize, args: &[&str], env: &[(&str, &str)], timeout: Duration) -> Outcome {
    let start = Instant::now();
    let mut cmd = super::mpi::mpirun(np, env!("CARGO_BIN_EXE_ferrofold-selftest"));
    cmd.args(args)
        .env("FERROFOLD_GOLDEN_DIR", super::golden::golden_dir())
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
        stop(&mut child);
    }
    let _ = child.wait();
    Outcome {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
        elapsed: start.elapsed(),
        what: format!("{args:?} np {np} {env:?}"),
    }
}

/// [`mpirun`], which must finish in time (a hang fails the test).
pub fn mpirun_finished(
    np: usize,
    args: &[&str],
    env: &[(&str, &str)],
    timeout: Duration,
) -> Outcome {
    let o = mpirun(np, args, env, timeout);
    assert!(o.status.is_some(), "timed out (hang?)\n{}", o.report());
    o
}

/// Require success, a `PASS <case> rank r/np` line from every rank and no FAIL line.
pub fn expect_pass(np: usize, args: &[&str], env: &[(&str, &str)], timeout: Duration) -> Outcome {
    let o = mpirun_finished(np, args, env, timeout);
    let report = o.report();
    assert!(o.success(), "job failed\n{report}");
    for r in 0..np {
        let line = format!("PASS {} rank {r}/{np}", args[0]);
        assert!(
            o.stdout.lines().any(|l| l.trim() == line),
            "missing `{line}`\n{report}"
        );
    }
    assert!(!o.stdout.contains("FAIL"), "{report}");
    println!("{}", o.stdout);
    o
}
