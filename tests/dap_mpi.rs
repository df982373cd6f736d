//! Multi-rank tests of the DAP Evoformer stack (`ferrofold::parallel::DapEvoformer`): each spawns
//! `mpirun --allow-run-as-root --oversubscribe -np N ferrofold-selftest dap-evo` with a timeout and
//! requires one PASS line per rank. The case (`src/bin/selftest/dap_evo.rs`) checks the DAP-N
//! stack's outputs, every parameter gradient (summed over the DAP group) and the input gradients
//! against the OpenFold golden fixture `evoformer_stack_2blocks` (f64, rel <= 1e-10) with
//! `parallel.overlap` = duality_async and off, and against the single-rank stack with seeded
//! dropout and a fully masked sequence (f64 rel <= 1e-10, f32 rel <= 1e-5). The fixture's
//! `n_res = 11`, `n_seq = 5` are padded for N = 2 and 4.

mod common;

use std::time::Duration;

fn expect_pass(np: usize, case: &str) {
    common::selftest::expect_pass(np, &[case], &[], Duration::from_secs(20));
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
