//! `ferrofold bench elem-kernels`: the fused element-wise CUDA kernels (gated output, dropout +
//! residual, clip + Adam + EMA, the global gradient norm, bias + activation epilogues,
//! triangle-multiplication gating, strided copies) against their plain-candle twins: correctness self-checks, then
//! median times, speedups and max relative errors at AF2 shapes.

use clap::Args;

use crate::error::{Error, Result};
use crate::kernels::{ElemBenchRow, ElemCheck};

/// `ferrofold bench elem-kernels`.
#[derive(Debug, Clone, Args)]
pub struct ElemKernelsArgs {
    /// Timed iterations per op (median reported).
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    /// Timed iterations of the full-model optimiser step.
    #[arg(long, default_value_t = 5)]
    pub adam_iters: usize,
    /// Skip the timings (self-checks only).
    #[arg(long)]
    pub check_only: bool,
    /// Only the kernel families whose name contains this (gate, dropout_residual, adam,
    /// grad_norm, bias_act, tri_gate, permute).
    #[arg(long)]
    pub only: Option<String>,
}

/// Run every self-check and bench on CUDA device 0.
pub fn run_elem_kernels(a: &ElemKernelsArgs) -> Result<(Vec<ElemCheck>, Vec<ElemBenchRow>)> {
    let dev = crate::device::select(crate::config::DeviceKind::Cuda, 0)?;
    if !dev.is_cuda() {
        return Err(Error::Msg("bench elem-kernels needs a CUDA device".into()));
    }
    let want = |name: &str| a.only.as_deref().is_none_or(|o| name.contains(o));
    let mut checks = Vec::new();
    type Check = fn(&candle_core::Device) -> Result<Vec<ElemCheck>>;
    let all_checks: [(&str, Check); 10] = [
        ("gate", crate::kernels::gate::self_check),
        (
            "dropout_residual",
            crate::kernels::dropout_residual::self_check,
        ),
        ("adam", crate::kernels::adam::self_check),
        ("grad_norm", crate::kernels::grad_norm::self_check),
        ("bias_act", crate::kernels::bias_act::self_check),
        ("tri_gate", crate::kernels::tri_gate::self_check),
        ("permute", crate::kernels::permute::self_check),
        ("add", crate::kernels::add::self_check),
        ("softmax", crate::kernels::softmax::vec_self_check),
        (
            "layer_norm",
            crate::kernels::layer_norm::wb_final_self_check,
        ),
    ];
    for (name, f) in all_checks {
        if want(name) {
            checks.extend(f(&dev)?);
        }
    }
    let mut rows = Vec::new();
    if !a.check_only {
        if want("gate") {
            rows.extend(crate::kernels::gate::bench_rows(&dev, a.iters)?);
        }
        if want("dropout_residual") {
            rows.extend(crate::kernels::dropout_residual::bench_rows(&dev, a.iters)?);
        }
        if want("grad_norm") {
            rows.extend(crate::kernels::grad_norm::bench_rows(
                &dev,
                a.adam_iters.max(5),
            )?);
        }
        if want("bias_act") {
            rows.extend(crate::kernels::bias_act::bench_rows(&dev, a.iters)?);
        }
        if want("tri_gate") {
            rows.extend(crate::kernels::tri_gate::bench_rows(&dev, a.iters)?);
        }
        if want("permute") {
            rows.extend(crate::kernels::permute::bench_rows(&dev, a.iters)?);
        }
        if want("add") {
            rows.extend(crate::kernels::add::bench_rows(&dev, a.iters)?);
        }
        if want("softmax") {
            rows.extend(crate::kernels::softmax::bench_rows(&dev, a.iters)?);
        }
        if want("layer_norm") {
            rows.extend(crate::kernels::layer_norm::wb_final_bench_rows(
                &dev, a.iters,
            )?);
        }
        if want("adam") {
            rows.extend(crate::kernels::adam::bench_rows(&dev, a.adam_iters)?);
        }
    }
    Ok((checks, rows))
}

/// The self-check table (failures marked) and whether all passed.
pub fn format_checks(checks: &[ElemCheck]) -> (String, bool) {
    let mut s = format!(
        "{:<32} {:<40} {:>10} {:>8}  ok\n",
        "check", "case", "max_err", "tol"
    );
    let mut all = true;
    for c in checks {
        all &= c.ok();
        s += &format!(
            "{:<32} {:<40} {:>10.2e} {:>8.0e}  {}\n",
            c.op,
            c.case,
            c.max_err,
            c.tol,
            if c.ok() { "ok" } else { "FAIL" }
        );
    }
    (s, all)
}

/// The timing table: fused and twin median (ms), speedup, max relative error.
pub fn format_rows(rows: &[ElemBenchRow]) -> String {
    let mut s = format!(
        "{:<26} {:<36} {:>10} {:>10} {:>8} {:>10}\n",
        "op", "case", "fused_ms", "twin_ms", "speedup", "max_err"
    );
    for r in rows {
        s += &format!(
            "{:<26} {:<36} {:>10.3} {:>10.3} {:>7.2}x {:>10.2e}\n",
            r.op,
            r.case,
            r.fused_ms,
            r.twin_ms,
            r.twin_ms / r.fused_ms,
            r.max_err
        );
    }
    s
}
