//! The AF2 training path end to end through the `ferrofold` binary, on real sample proteins
//! (`$FERROFOLD_DATA`, default `../shared/data/proteins`): the loss falls and training-set lDDT-Cα
//! rises; a run resumed from a checkpoint equals an uninterrupted run bitwise (1 process and
//! data-parallel over `mpirun -np 2`); `eval` and `plot` work on the result; bad inputs fail
//! with one clear error.

mod common;

use std::path::{Path, PathBuf};

use common::data::manifest_subset;
use std::process::{Command, Output};

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_ferrofold")
}

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tmp(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ff-af2-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Tiny model, whole 70-residue chain (deterministic crop), strict loader order.
fn train_args(manifest: &Path, run_dir: &Path, steps: u64) -> Vec<String> {
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
        "--run-dir",
        run_dir.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn run(args: &[String]) -> Output {
    Command::new(bin())
        .args(args)
        .current_dir(repo())
        .output()
        .expect("spawn ferrofold")
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

/// (loss, train lDDT-Cα) per training step from metrics.jsonl.
fn curve(run_dir: &Path) -> Vec<(f64, f64)> {
    std::fs::read_to_string(run_dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "train")
        .map(|v| {
            (
                v["loss"].as_f64().unwrap(),
                v["terms"]["train_lddt_ca"].as_f64().unwrap(),
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

#[test]
fn af2_training_loss_falls_and_lddt_rises() {
    let d = tmp("learn");
    let m = manifest_subset(&d, &["2q2k_A", "3u8v_A"]);
    let run_dir = d.join("run");
    let o = run(&train_args(&m, &run_dir, 20));
    ok(&o);
    let c = curve(&run_dir);
    assert_eq!(c.len(), 20);
    let mean =
        |s: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| s.iter().map(f).sum::<f64>() / s.len() as f64;
    let (first, last) = (&c[..5], &c[15..]);
    assert!(
        mean(last, |x| x.0) < mean(first, |x| x.0) - 1.0,
        "loss did not fall: {c:?}"
    );
    assert!(
        mean(last, |x| x.1) > 1.5 * mean(first, |x| x.1),
        "lDDT did not rise: {c:?}"
    );
    // The run ends with an evaluation summary on the validation chain and writes its prediction.
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("evaluation at step 20") && out.contains("3u8v_A"),
        "{out}"
    );
    assert!(run_dir.join("eval/step-000000020/3u8v_A.pdb").exists());
    // eval of the final checkpoint reproduces the summary's lDDT; plot writes PNGs.
    let ck = run_dir.join("ckpt-000000020");
    let mut eval_args: Vec<String> = train_args(&m, &run_dir, 20)[1..9].to_vec();
    eval_args.insert(0, "eval".into());
    eval_args.extend([
        "--checkpoint".into(),
        ck.to_str().unwrap().into(),
        "--out".into(),
        d.join("ev").to_str().unwrap().into(),
    ]);
    let e = run(&eval_args);
    ok(&e);
    let eout = String::from_utf8_lossy(&e.stdout);
    let line = |s: &str| {
        s.lines()
            .find(|l| l.starts_with("3u8v_A"))
            .map(str::to_string)
    };
    assert_eq!(
        line(&out),
        line(&eout),
        "eval differs from the in-training evaluation"
    );
    let p = run(&["plot".into(), run_dir.to_str().unwrap().into()]);
    ok(&p);
    assert!(run_dir.join("loss.png").exists());
}

#[test]
fn af2_resume_is_bitwise_exact() {
    let d = tmp("resume");
    let m = manifest_subset(&d, &["2q2k_A", "3u8v_A"]);
    let straight = d.join("straight");
    ok(&run(&train_args(&m, &straight, 4)));
    let split = d.join("split");
    let mut first = train_args(&m, &split, 4);
    first.extend(["--stop-at".into(), "2".into()]);
    ok(&run(&first));
    assert!(split.join("ckpt-000000002").exists());
    ok(&run(&train_args(&m, &split, 4)));
    assert_eq!(
        digests(&straight.join("ckpt-000000004")),
        digests(&split.join("ckpt-000000004"))
    );
}

#[test]
fn af2_data_parallel_np2_trains_and_resumes_exactly() {
    let d = tmp("dp");
    let m = manifest_subset(&d, &["2q2k_A", "3u8v_A"]);
    let straight = d.join("straight");
    let o = mpirun(&train_args(&m, &straight, 4));
    ok(&o);
    let split = d.join("split");
    let mut first = train_args(&m, &split, 4);
    first.extend(["--stop-at".into(), "2".into()]);
    ok(&mpirun(&first));
    ok(&mpirun(&train_args(&m, &split, 4)));
    let a = digests(&straight.join("ckpt-000000004"));
    assert_eq!(a, digests(&split.join("ckpt-000000004")));
    // Both replicas' loader positions are in the checkpoint.
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(straight.join("ckpt-000000004/meta.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        meta["data_state"]["per_rank"].as_array().map(Vec::len),
        Some(2)
    );
    // DP-2 differs from a single process (each replica reads its own samples).
    let single = d.join("single");
    ok(&run(&train_args(&m, &single, 4)));
    assert_ne!(a, digests(&single.join("ckpt-000000004")));
}

#[test]
fn af2_bad_inputs_give_one_clear_error() {
    let d = tmp("bad");
    let m = manifest_subset(&d, &["2q2k_A", "3u8v_A"]);
    // Missing checkpoint for --init-from.
    let mut a = train_args(&m, &d.join("r1"), 2);
    a.extend(["--init-from".into(), "/nonexistent/ckpt".into()]);
    let o = run(&a);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent/ckpt"));
    // A checkpoint from another model shape.
    let r2 = d.join("r2");
    ok(&run(&train_args(&m, &r2, 2)));
    let mut b = train_args(&m, &d.join("r3"), 2);
    b.extend([
        "--set".into(),
        "model.c_m=24".into(),
        "--init-from".into(),
        r2.join("ckpt-000000002").to_str().unwrap().into(),
    ]);
    let o = run(&b);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("ckpt-000000002") && err.contains("shape"),
        "{err}"
    );
    // Config mismatch on resume: nothing overwritten.
    let before = digests(&r2.join("ckpt-000000002"));
    let mut c = train_args(&m, &r2, 4);
    c.extend(["--set".into(), "optim.lr=0.5".into()]);
    let o = run(&c);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("config hash"), "{err}");
    assert_eq!(before, digests(&r2.join("ckpt-000000002")));
    assert!(!r2.join("ckpt-000000004").exists());
    // No --run-dir.
    let o = run(&[
        "train".into(),
        "--config".into(),
        "configs/tiny.toml".into(),
    ]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("--run-dir"));
}

/// DAP-2 (the Evoformer and extra-MSA stacks sharded over 2 ranks, one sample) follows the
/// single-rank trajectory (same losses up to float rounding) and resumes bitwise exactly.
#[test]
fn af2_dap2_np2_matches_single_rank_and_resumes_exactly() {
    let d = tmp("dap");
    let m = manifest_subset(&d, &["2q2k_A", "3u8v_A"]);
    let dap = |dir: &Path, steps: u64| {
        let mut a = train_args(&m, dir, steps);
        a.extend([
            "--set".into(),
            "parallel.dap_size=2".into(),
            "--set".into(),
            "model.remat=\"none\"".into(),
        ]);
        a
    };
    let single = d.join("single");
    let mut s = train_args(&m, &single, 4);
    s.extend(["--set".into(), "model.remat=\"none\"".into()]);
    ok(&run(&s));
    let straight = d.join("dap-straight");
    let o = mpirun(&dap(&straight, 4));
    ok(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("DAP-2 × DP-1:") && err.contains("parameter tensors sharded"),
        "{err}"
    );
    let (a, b) = (curve(&single), curve(&straight));
    assert_eq!(a.len(), 4);
    for (x, y) in a.iter().zip(&b) {
        assert!(
            (x.0 - y.0).abs() <= 1e-4 * x.0.abs(),
            "DAP-2 loss {} vs single {}",
            y.0,
            x.0
        );
    }
    let split = d.join("dap-split");
    let mut first = dap(&split, 4);
    first.extend(["--stop-at".into(), "2".into()]);
    ok(&mpirun(&first));
    ok(&mpirun(&dap(&split, 4)));
    assert_eq!(
        digests(&straight.join("ckpt-000000004")),
        digests(&split.join("ckpt-000000004"))
    );
}
