//! Activation recomputation ("remat") of the DAP-sharded stacks (`ferrofold::parallel::dap_remat`):
//! - `ferrofold-selftest dap-remat` under `mpirun -np 1|2|4`: the DAP stacks' training tapes with
//!   `model.remat` = `block` and `none` and `model.backward` = `manual` (hand-written sharded
//!   backward) and `autograd` equal the single-rank stack (Evoformer and extra-MSA; outputs, every
//!   parameter gradient, input gradients; f32 rel <= 1e-5, f64 rel <= 1e-10; padded
//!   `n_seq`/`n_res`; `parallel.overlap` on and off; seeded dropout); the manual runs also equal
//!   the single-rank hand-written trunk and DAP-1 manual, and every sharded parameter gets a
//!   gradient;
//! - AF2 training with DAP-2 and `model.remat = "block"` through the `ferrofold` binary equals
//!   `remat = "none"` bitwise and resumes bitwise exactly.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::data::manifest_subset;

/// `mpirun -np <np> ferrofold-selftest <case>` with a timeout; one PASS line per rank.
fn expect_pass(np: usize, case: &str) {
    common::selftest::expect_pass(np, &[case], &[], Duration::from_secs(30));
}

/// DAP-1 through the DAP tapes (no communication) equals the plain stack.
#[test]
fn dap_remat_np1_matches_single_rank() {
    expect_pass(1, "dap-remat");
}

/// DAP-2: padded sequences and residues, overlap on/off, remat block/none vs DAP-1.
#[test]
fn dap_remat_np2_matches_single_rank() {
    expect_pass(2, "dap-remat");
}

/// DAP-4 (S 5 -> 8, R 11 -> 12; extra MSA S 7 -> 8, R 9 -> 12).
#[test]
fn dap_remat_np4_matches_single_rank() {
    expect_pass(4, "dap-remat");
}

// ---- AF2 training through the binary ------------------------------------------------------

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_ferrofold")
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ff-dap-remat-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Tiny model (2 Evoformer blocks, 1 extra-MSA block), whole 70-residue chain, DAP-2.
fn dap_args(manifest: &Path, run_dir: &Path, steps: u64, remat: &str) -> Vec<String> {
    [
        "train",
        "--config",
        "configs/base.toml",
        "--config",
        "configs/tiny.toml",
        "--set",
        &format!("data.manifest=\"{}\"", manifest.display()),
        "--set",
        "data.crop_size=72",
        "--set",
        "data.loader.order=deterministic",
        "--set",
        "optim.warmup_steps=5",
        "--set",
        &format!("train.max_steps={steps}"),
        "--set",
        "train.checkpoint_every=2",
        "--set",
        "train.eval_every=1000",
        "--set",
        "log.progress=\"never\"",
        "--set",
        "parallel.dap_size=2",
        "--set",
        &format!("model.remat=\"{remat}\""),
        "--run-dir",
        run_dir.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn mpirun(args: &[String]) -> Output {
    common::mpi::mpirun(2, bin())
        .args(args)
        .current_dir(repo())
        .output()
        .expect("spawn mpirun")
}

fn ok(o: &Output) {
    assert!(
        o.status.success(),
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `(loss, grad_norm)` per training step from metrics.jsonl.
fn curve(run_dir: &Path) -> Vec<(f64, f64)> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "train")
        .map(|v| {
            (
                v["loss"].as_f64().unwrap(),
                v["grad_norm"].as_f64().unwrap(),
            )
        })
        .collect()
}

/// sha256 of each file of a checkpoint (from its verified metadata).
fn digests(ckpt: &Path) -> serde_json::Value {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("meta.json")).unwrap()).unwrap();
    meta["files"].clone()
}

/// DAP-2 training with per-block remat computes exactly what DAP-2 without remat computes (with
/// more than one rank the DAP block boundaries are single-consumer all-to-alls, so even the
/// gradient summation order is the same): 2 steps (the second with one recycle, i.e. a
/// no-gradient DAP cycle first) give bitwise equal losses, gradient norms and checkpoints
/// (parameters, Adam moments, EMA).
#[test]
fn af2_dap2_remat_block_np2_matches_remat_none() {
    let d = tmp("match");
    let m = manifest_subset(&d, &["2q2k_A", "3u8v_A"]);
    let none = d.join("none");
    ok(&mpirun(&dap_args(&m, &none, 2, "none")));
    let block = d.join("block");
    let o = mpirun(&dap_args(&m, &block, 2, "block"));
    ok(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("DAP-2 × DP-1:"), "{err}");
    let (a, b) = (curve(&none), curve(&block));
    assert_eq!(a.len(), 2);
    let bits = |c: &[(f64, f64)]| {
        c.iter()
            .map(|x| (x.0.to_bits(), x.1.to_bits()))
            .collect::<Vec<_>>()
    };
    assert!(a.iter().all(|x| x.1 > 0.0), "{a:?}");
    assert_eq!(
        bits(&a),
        bits(&b),
        "(loss, grad norm): remat=none {a:?} vs block {b:?}"
    );
    assert_eq!(
        digests(&none.join("ckpt-000000002")),
        digests(&block.join("ckpt-000000002"))
    );
    let _ = std::fs::remove_dir_all(&d);
}

/// DAP-2 with `model.remat = "block"`: a run stopped at step 2 and resumed equals the
/// uninterrupted 3-step run bitwise (parameters, optimizer state, EMA, data state).
#[test]
fn af2_dap2_remat_block_np2_resumes_exactly() {
    let d = tmp("resume");
    let m = manifest_subset(&d, &["2q2k_A", "3u8v_A"]);
    let straight = d.join("straight");
    ok(&mpirun(&dap_args(&m, &straight, 3, "block")));
    let split = d.join("split");
    let mut first = dap_args(&m, &split, 3, "block");
    first.extend(["--stop-at".into(), "2".into()]);
    ok(&mpirun(&first));
    assert!(split.join("ckpt-000000002").exists());
    ok(&mpirun(&dap_args(&m, &split, 3, "block")));
    let (a, b) = (curve(&straight), curve(&split));
    assert_eq!(a.len(), 3);
    assert_eq!(
        a.iter().map(|x| x.0.to_bits()).collect::<Vec<_>>(),
        b.iter().map(|x| x.0.to_bits()).collect::<Vec<_>>()
    );
    assert_eq!(
        digests(&straight.join("ckpt-000000003")),
        digests(&split.join("ckpt-000000003"))
    );
    let _ = std::fs::remove_dir_all(&d);
}
