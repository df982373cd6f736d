//! The `ferrofold` binary: `info` as a singleton and under `mpirun -np 2`, and config errors.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_ferrofold")
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .current_dir(repo())
        .output()
        .expect("spawn ferrofold")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn mpirun(np: usize, args: &[&str]) -> Output {
    common::mpi::mpirun(np, bin())
        .args(args)
        .current_dir(repo())
        .output()
        .expect("spawn mpirun")
}

#[test]
fn info_singleton_reports_rank_zero_of_one() {
    let o = run(&["info"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        out.contains(&format!("ferrofold {}", env!("CARGO_PKG_VERSION"))),
        "{out}"
    );
    assert!(out.contains("features: cpu"), "{out}");
    assert!(out.contains("rank 0/1 local_rank 0/1 node 0/1"), "{out}");
    assert!(out.contains("device cpu"), "{out}");
}

#[test]
fn info_prints_resolved_config_and_writes_run_dir() {
    let dir = std::env::temp_dir().join(format!("ff-info-{}", std::process::id()));
    let o = run(&[
        "info",
        "--config",
        "configs/base.toml",
        "--config",
        "configs/tiny.toml",
        "--set",
        "optim.lr=0.002",
        "--run-dir",
        dir.to_str().unwrap(),
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{out}\n{err}");
    assert!(out.contains("config hash: "), "{out}");
    assert!(out.contains("lr = 0.002"), "{out}");
    let written = std::fs::read_to_string(dir.join("config.toml")).unwrap();
    assert!(
        written.contains("lr = 0.002") && written.contains("c_m = 16"),
        "{written}"
    );
}

fn assert_one_line_error(o: &Output, must: &[&str]) {
    let (out, err) = text(o);
    assert!(!o.status.success(), "expected failure\n{out}\n{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got:\n{err}");
    for m in must {
        assert!(lines[0].contains(m), "error line lacks `{m}`: {}", lines[0]);
    }
}

#[test]
fn bad_config_key_names_key_and_file() {
    let dir = std::env::temp_dir().join(format!("ff-badkey-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let f = dir.join("overlay.toml");
    std::fs::write(&f, "[optim]\nlr = 1e-3\nlearning_rate = 5\n").unwrap();
    let o = run(&[
        "info",
        "--config",
        "configs/base.toml",
        "--config",
        f.to_str().unwrap(),
    ]);
    assert_one_line_error(&o, &["overlay.toml", "learning_rate"]);
}

#[test]
fn bad_set_value_names_key() {
    let o = run(&["info", "--set", "train.max_steps=many"]);
    assert_one_line_error(&o, &["--set", "train.max_steps", "many"]);
    let o = run(&["info", "--set", "model.evoformer.num_heads=3"]);
    assert_one_line_error(&o, &["model.evoformer.num_heads"]);
}

#[test]
fn missing_config_file_is_named() {
    let o = run(&["info", "--config", "configs/does-not-exist.toml"]);
    assert_one_line_error(&o, &["configs/does-not-exist.toml"]);
}

#[test]
fn validation_error_names_key() {
    let o = run(&["info", "--set", "data.crop_size=0"]);
    assert_one_line_error(&o, &["data.crop_size"]);
}

#[test]
fn every_subcommand_has_help() {
    for args in [vec!["--help"], vec!["info", "--help"]] {
        let o = run(&args);
        let (out, _) = text(&o);
        assert!(
            o.status.success() && out.contains("Usage"),
            "{args:?}: {out}"
        );
    }
}

#[test]
fn mpirun_np2_info_check_both_ranks() {
    let o = mpirun(
        2,
        &[
            "info",
            "--check",
            "--config",
            "configs/base.toml",
            "--config",
            "configs/tiny.toml",
        ],
    );
    let (out, err) = text(&o);
    assert!(o.status.success(), "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("world: 2 ranks on 1 node(s)"), "{out}");
    assert!(out.contains("rank 0/2 local_rank 0/2"), "{out}");
    assert!(out.contains("rank 1/2 local_rank 1/2"), "{out}");
    assert!(
        out.contains("preflight ok: 2 ranks, all-reduce correct"),
        "{out}"
    );
}

#[test]
fn mpirun_np2_config_error_fails_fast() {
    let start = std::time::Instant::now();
    let o = mpirun(2, &["info", "--check", "--set", "parallel.dap_size=0"]);
    let (out, err) = text(&o);
    assert!(!o.status.success(), "{out}\n{err}");
    assert!(err.contains("parallel.dap_size"), "{err}");
    assert!(start.elapsed().as_secs() < 30, "took {:?}", start.elapsed());
}

#[test]
fn logging_lines_carry_the_rank() {
    let o = Command::new(bin())
        .args(["info"])
        .env("RUST_LOG", "info")
        .current_dir(repo())
        .output()
        .unwrap();
    assert!(o.status.success());
    let (_, err) = text(&o);
    let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "no log lines at RUST_LOG=info");
    for line in lines {
        assert!(
            line.starts_with("[rank 0/1]"),
            "log line without rank: {line}"
        );
    }
}
