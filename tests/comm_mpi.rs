//! Multi-rank tests of the communication layer: each spawns
//! `mpirun --allow-run-as-root --oversubscribe -np N ferrofold-selftest <case>` with a timeout
//! (the job is killed and the test fails if it hangs) and checks the exit status and one PASS line
//! per rank. The checks themselves (expected values from the definitions) live in
//! `src/bin/ferrofold-selftest.rs`.

mod common;

use std::time::Duration;

use common::selftest::mpirun;

/// Run `case` on `np` ranks and require success with a PASS line from every rank.
fn expect_pass(np: usize, case: &str) {
    common::selftest::expect_pass(np, &[case], &[], Duration::from_secs(15));
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
    let o = mpirun(2, &["panic-rank1"], &[], Duration::from_secs(15));
    let report = o.report();
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
