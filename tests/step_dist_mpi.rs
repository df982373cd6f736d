//! CPU coverage of the multi-rank full-step benchmark (`ferrofold-selftest step-bench`; the GPU
//! numbers come from `--device cuda` runs on a GPU machine). Spawns
//! `mpirun --allow-run-as-root --oversubscribe -np 2 ferrofold-selftest step-bench --device cpu`
//! at tiny widths:
//! - `check`: on every rank the DAP-2 step (world = one DAP group) and the single-rank step on
//!   the same sample and dropout seed give the same loss (1e-5 rel) and the same gradients after
//!   the DAP-scaled all-reduce (1e-4 of each tensor's scale);
//! - the timed modes (`dap`, `dp`, `single`, `single:none`) run to completion and report
//!   `STEP`/`STEPSUM` lines with a finite loss.

mod common;

use std::time::Duration;

/// `$FERROFOLD_STEREO_PROPS`, else beside the golden dir, else `../shared/data/` from the crate.
fn stereo() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("FERROFOLD_STEREO_PROPS") {
        return p.into();
    }
    let g = common::golden::golden_dir();
    let p = g.join("../../data/stereo_chemical_props.txt");
    if p.exists() {
        return p;
    }
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../shared/data/stereo_chemical_props.txt")
}

/// Run `step-bench` on `np` ranks with `env`; (success, stdout, report). Kills it after `timeout`.
fn run(np: usize, env: &[(&str, &str)], timeout: Duration) -> (bool, String, String) {
    let stereo = stereo();
    let mut env = env.to_vec();
    let stereo = stereo.to_string_lossy();
    env.push(("FERROFOLD_STEREO_PROPS", &stereo));
    let o =
        common::selftest::mpirun_finished(np, &["step-bench", "--device", "cpu"], &env, timeout);
    (o.success(), o.stdout.clone(), o.report())
}

const TINY: &[(&str, &str)] = &[
    ("STEP_TINY", "1"),
    ("STEP_PRECISION", "fp32"),
    ("STEP_N_RES", "13"),
    ("STEP_N_SEQ", "6"),
    ("STEP_N_EXTRA", "8"),
    ("STEP_BLOCKS", "2"),
    ("STEP_EXTRA_BLOCKS", "1"),
    ("STEP_SM_LAYERS", "2"),
    ("STEP_RECYCLES", "1"),
    ("STEP_ITERS", "1"),
    ("STEP_WARMUP", "0"),
];

#[test]
fn step_dist_dap2_matches_single_and_modes_run() {
    let mut env = TINY.to_vec();
    env.push(("STEP_MODES", "check,dap,dp,single,single:none"));
    let (ok, stdout, report) = run(2, &env, Duration::from_secs(60));
    assert!(ok, "job failed\n{report}");
    for r in 0..2 {
        let line = format!("PASS step-bench rank {r}/2");
        assert!(
            stdout.lines().any(|l| l.trim() == line),
            "missing `{line}`\n{report}"
        );
    }
    let check = stdout
        .lines()
        .find(|l| l.starts_with("STEPCHECK"))
        .unwrap_or_else(|| panic!("no STEPCHECK line\n{report}"));
    assert!(check.ends_with("PASS"), "{check}");
    for mode in ["dap", "dp", "single", "single:none"] {
        let l = stdout
            .lines()
            .find(|l| l.starts_with(&format!("STEP mode={mode} ")))
            .unwrap_or_else(|| panic!("no STEP line for {mode}\n{report}"));
        let loss: f64 = l
            .split_whitespace()
            .find_map(|f| f.strip_prefix("loss="))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no loss in {l}"));
        assert!(loss.is_finite() && loss > 0.0, "{l}");
    }
    // DAP speedup and DP scaling are reported against the single-rank step.
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("STEPSUM") && l.contains("DAP-2 speedup")),
        "{report}"
    );
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("STEPSUM") && l.contains("DP-2 throughput")),
        "{report}"
    );
    assert!(!stdout.contains("FAIL"), "{report}");
}

#[test]
fn step_dist_rejects_unknown_mode() {
    let mut env = TINY.to_vec();
    env.push(("STEP_MODES", "bogus"));
    let (ok, stdout, report) = run(2, &env, Duration::from_secs(20));
    assert!(!ok, "an unknown mode must fail\n{report}");
    assert!(stdout.contains("unknown mode bogus"), "{report}");
}
