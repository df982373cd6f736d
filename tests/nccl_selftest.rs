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

use std::time::Duration;

fn expect_pass(np: usize, args: &[&str], env: &[(&str, &str)]) {
    common::selftest::expect_pass(np, args, env, Duration::from_secs(20));
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
    let o = common::selftest::mpirun_finished(
        1,
        &["collectives", "--device", "cuda"],
        &[],
        Duration::from_secs(20),
    );
    let report = o.report();
    assert!(
        !o.success(),
        "--device cuda without a GPU must fail\n{report}"
    );
    let fail = o
        .stdout
        .lines()
        .find(|l| l.starts_with("FAIL collectives"))
        .unwrap_or_else(|| panic!("no FAIL line\n{report}"));
    assert!(fail.contains("cuda"), "the error must say why: {fail}");
}

#[test]
fn dap_evo_dp2_dap1_gradients_match_two_sample_mean() {
    expect_pass(2, &["dap-evo-dp"], &[("DAP_SIZE", "1")]);
}
