//! `ferrofold bench elem-kernels`: the fused element-wise CUDA kernels (gated output, dropout +
//! residual, clip + Adam + EMA, the global gradient norm, bias + activation epilogues,
//! triangle-multiplication gating) against their plain-candle twins: correctness self-checks, then
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
}

/// Run every self-check and bench on CUDA device 0.
pub fn run_elem_kernels(a: &ElemKernelsArgs) -> Result<(Vec<ElemCheck>, Vec<ElemBenchRow>)> {
    let dev = crate::device::select(crate::config::DeviceKind::Cuda, 0)?;
    if !dev.is_cuda() {
        return Err(Error::Msg("bench elem-kernels needs a CUDA device".into()));
    }
    let mut checks = crate::kernels::gate::self_check(&dev)?;
    checks.extend(crate::kernels::dropout_residual::self_check(&dev)?);
    checks.extend(crate::kernels::adam::self_check(&dev)?);
    checks.extend(crate::kernels::grad_norm::self_check(&dev)?);
    checks.extend(crate::kernels::bias_act::self_check(&dev)?);
    checks.extend(crate::kernels::tri_gate::self_check(&dev)?);
    let mut rows = Vec::new();
    if !a.check_only {
        rows.extend(crate::kernels::gate::bench_rows(&dev, a.iters)?);
        rows.extend(crate::kernels::dropout_residual::bench_rows(&dev, a.iters)?);
        rows.extend(crate::kernels::grad_norm::bench_rows(
            &dev,
            a.adam_iters.max(5),
        )?);
        rows.extend(crate::kernels::bias_act::bench_rows(&dev, a.iters)?);
        rows.extend(crate::kernels::tri_gate::bench_rows(&dev, a.iters)?);
        rows.extend(crate::kernels::adam::bench_rows(&dev, a.adam_iters)?);
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
