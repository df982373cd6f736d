//! `ferrofold bench` on the CPU with tiny dimensions: output format, FLOP accounting, parity
//! pass/fail. (On the GPU machine the same commands run with `--device cuda`.)

use std::process::{Command, Output};

use ferrofold::bench::{evoformer_block_flops, BlockDims};

const TINY: &[&str] = &[
    "--c-m",
    "16",
    "--c-z",
    "8",
    "--heads-msa",
    "2",
    "--c-hidden-msa",
    "4",
    "--heads-pair",
    "2",
    "--c-hidden-pair",
    "4",
    "--c-opm",
    "4",
    "--c-mul",
    "8",
    "--transition-n",
    "2",
];

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferrofold"))
        .args(args)
        .args(TINY)
        .output()
        .expect("spawn ferrofold")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `key=value` of a RESULT line.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key} in {line}"))
}

#[test]
fn bench_evoformer_cpu_prints_table_and_results() {
    let o = run(&[
        "bench",
        "evoformer",
        "--device",
        "cpu",
        "--n-seq",
        "4",
        "--n-res",
        "8",
        "--blocks",
        "2",
        "--remat",
        "block",
        "--dtype",
        "f32",
        "--iters",
        "3",
        "--warmup",
        "1",
    ]);
    let out = stdout(&o);
    assert!(
        o.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        out.contains("| pass | median ms | min ms | max ms | TFLOP/s | peak MiB |"),
        "{out}"
    );
    let results: Vec<&str> = out.lines().filter(|l| l.starts_with("RESULT ")).collect();
    assert_eq!(results.len(), 2, "{out}");
    assert_eq!(field(results[0], "pass"), "fwd");
    assert_eq!(field(results[1], "pass"), "fwd+bwd");
    for r in &results {
        assert_eq!(field(r, "device"), "cpu");
        assert_eq!(field(r, "blocks"), "2");
        assert_eq!(field(r, "remat"), "block");
        assert_eq!(field(r, "peak_mib"), "n/a");
        let ms: f64 = field(r, "median_ms").parse().unwrap();
        assert!(ms > 0.0 && ms.is_finite(), "{r}");
    }
    // The printed FLOP count is the library's analytic count for these dimensions.
    let dims = BlockDims {
        c_m: 16,
        c_z: 8,
        heads_msa: 2,
        c_hidden_msa: 4,
        heads_pair: 2,
        c_hidden_pair: 4,
        c_opm: 4,
        c_mul: 8,
        transition_n: 2,
    };
    let gf = evoformer_block_flops(4, 8, &dims.block_config(1)) / 1e9;
    assert!(
        out.contains(&format!("counted forward FLOPs: {gf:.4} GFLOP")),
        "{out}"
    );
}

#[test]
fn bench_parity_cpu_passes_f32_and_fails_bf16_at_tight_tolerance() {
    let base = [
        "bench",
        "parity",
        "--device-a",
        "cpu",
        "--device-b",
        "cpu",
        "--n-seq",
        "3",
        "--n-res",
        "5",
    ];
    let o = run(&base);
    let out = stdout(&o);
    assert!(
        o.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("PARITY PASS"), "{out}");
    // bf16 against the f32 reference is ~1e-2 off: a 1e-4 tolerance must fail (the check can fail).
    let mut args = base.to_vec();
    args.extend(["--dtype-b", "bf16"]);
    let o = run(&args);
    let out = stdout(&o);
    assert!(!o.status.success(), "{out}");
    assert!(out.contains("PARITY FAIL"), "{out}");
}

#[test]
fn bench_ops_cpu_prints_one_row_per_primitive() {
    let o = Command::new(env!("CARGO_BIN_EXE_ferrofold"))
        .args([
            "bench",
            "ops",
            "--device",
            "cpu",
            "--n-seq",
            "2",
            "--n-res",
            "4",
            "--c-m",
            "8",
            "--heads",
            "2",
            "--c-hidden",
            "4",
            "--iters",
            "2",
            "--warmup",
            "1",
        ])
        .output()
        .expect("spawn ferrofold");
    let out = stdout(&o);
    assert!(
        o.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.contains("| op | fwd ms |"), "{out}");
    let rows = out
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| op"))
        .count();
    assert_eq!(rows, 11, "{out}");
    assert!(out.contains("| softmax [S,H,R,R] |"), "{out}");
}

#[cfg(not(feature = "cuda"))]
#[test]
fn bench_cuda_device_errors_cleanly_without_the_feature() {
    let o = run(&[
        "bench",
        "evoformer",
        "--device",
        "cuda",
        "--n-seq",
        "2",
        "--n-res",
        "4",
    ]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("without the `cuda` feature"), "{err}");
}

/// `--breakdown`: one row per sub-module with a forward and a forward+backward time, for the
/// hand-written path (whose forward column times `forward_saved`) and for autograd.
#[test]
fn bench_evoformer_breakdown_times_every_module_both_backwards() {
    for backward in ["manual", "autograd"] {
        let o = run(&[
            "bench",
            "evoformer",
            "--device",
            "cpu",
            "--n-seq",
            "4",
            "--n-res",
            "8",
            "--dtype",
            "f32",
            "--iters",
            "1",
            "--warmup",
            "0",
            "--backward",
            backward,
            "--breakdown",
        ]);
        let out = stdout(&o);
        assert!(
            o.status.success(),
            "{backward}: {out}\n{}",
            String::from_utf8_lossy(&o.stderr)
        );
        for op in [
            "msa_att_row",
            "msa_att_col",
            "msa_transition",
            "outer_product_mean",
            "tri_mul_out",
            "tri_mul_in",
            "tri_att_start",
            "tri_att_end",
            "pair_transition",
        ] {
            let row = out
                .lines()
                .find(|l| l.starts_with(&format!("| {op} |")))
                .unwrap_or_else(|| panic!("{backward}: no row for {op}\n{out}"));
            let cells: Vec<&str> = row.split('|').map(str::trim).collect();
            // | op | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | GFLOP fwd |
            for i in [2, 4] {
                let ms: f64 = cells[i].parse().unwrap_or_else(|_| panic!("{row}"));
                assert!(ms > 0.0 && ms.is_finite(), "{backward}: {row}");
            }
        }
    }
}
