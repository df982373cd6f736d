//! `bench kernels`: each fused CUDA kernel against its composite (plain candle) twin at Evoformer
//! shapes: forward time and backward time (`loss.backward()` alone, for the loss `Σ y·g`; it
//! includes candle's gradient bookkeeping and the `y·g` product's backward, the same for both),
//! medians after a global warm-up, the speedups, and the max difference of the output and of the
//! input gradients.
//!
//! Table-driven: a row is a [`KernelCase`] (inputs, which inputs get gradients, the fused op and
//! the twin). Add rows by extending [`cases`] (or pushing more cases in [`bench_kernels`]).

use std::time::Instant;

use candle_core::{DType, Device, Tensor, Var};
use clap::Args;

use super::{median, random_tensor, BenchDevice, BenchDtype};
use crate::error::{Error, Result};
use crate::model::primitives::{layer_norm_twin, softmax_twin, softmax_with_biases_twin};

/// `ferrofold bench kernels`.
#[derive(Debug, Clone, Args)]
pub struct KernelsArgs {
    #[arg(long, default_value_t = 128)]
    pub n_seq: usize,
    #[arg(long, default_value_t = 256)]
    pub n_res: usize,
    #[arg(long, default_value_t = 256)]
    pub c_m: usize,
    #[arg(long, default_value_t = 128)]
    pub c_z: usize,
    /// MSA attention heads.
    #[arg(long, default_value_t = 8)]
    pub heads_msa: usize,
    /// Triangle attention heads.
    #[arg(long, default_value_t = 4)]
    pub heads_pair: usize,
    #[arg(long, value_enum, default_value_t = BenchDtype::Bf16)]
    pub dtype: BenchDtype,
    #[arg(long, default_value_t = 20)]
    pub iters: usize,
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    #[arg(long, value_enum, default_value_t = BenchDevice::Cuda)]
    pub device: BenchDevice,
    /// Only rows whose name contains this string.
    #[arg(long)]
    pub filter: Option<String>,
}

/// An op of a benchmark row: inputs → output; `Ok(None)` if the fused path declines them.
pub type KernelFn = Box<dyn Fn(&[Tensor]) -> Result<Option<Tensor>>>;

/// One row of `bench kernels`.
pub struct KernelCase {
    pub name: String,
    pub inputs: Vec<Tensor>,
    /// Inputs that get gradients in the forward+backward timing.
    pub grads: Vec<bool>,
    pub fused: KernelFn,
    pub twin: KernelFn,
}

/// Measured row of `bench kernels` (median ms).
#[derive(Debug, Clone)]
pub struct KernelTiming {
    pub name: String,
    pub fused_fwd_ms: f64,
    pub twin_fwd_ms: f64,
    /// `loss.backward()` alone (the loss `Σ y·g` is built outside the timed region).
    pub fused_bwd_ms: f64,
    pub twin_bwd_ms: f64,
    /// Max |fused − twin| of the output.
    pub err_y: f64,
    /// Max |fused − twin| over the input gradients.
    pub err_grad: f64,
}

fn some(t: Tensor) -> Result<Option<Tensor>> {
    Ok(Some(t))
}

/// Key-mask bias `[B, 1, 1, K]`: every 7th key masked (`-1e9`).
fn mask_bias(b: usize, k: usize, dt: DType, dev: &Device) -> Result<Tensor> {
    let m: Vec<f32> = (0..b * k)
        .map(|i| if i % 7 == 3 { 0.0 } else { 1.0 })
        .collect();
    let m = Tensor::from_vec(m, (b, 1, 1, k), &Device::Cpu)?
        .to_dtype(dt)?
        .to_device(dev)?;
    crate::model::primitives::mask_bias(&m, 1e9)
}

/// The LayerNorm and softmax rows (this module's kernels) at Evoformer shapes.
pub fn cases(a: &KernelsArgs, dev: &Device) -> Result<Vec<KernelCase>> {
    use crate::kernels::{layer_norm, softmax};
    let dt = a.dtype.dtype();
    let (s, r, cm, cz, hm, hp) = (a.n_seq, a.n_res, a.c_m, a.c_z, a.heads_msa, a.heads_pair);
    let rt = |shape: &[usize], scale: f32, seed: u64, dt: DType| {
        random_tensor(shape, scale, seed, dt, dev)
    };
    let ln = |name: &str, dims: &[usize], seed: u64| -> Result<KernelCase> {
        let c = *dims.last().unwrap_or(&1);
        Ok(KernelCase {
            name: name.to_string(),
            inputs: vec![
                rt(dims, 2.0, seed, dt)?,
                (rt(&[c], 0.2, seed + 1, DType::F32)? + 1.0)?,
                rt(&[c], 0.2, seed + 2, DType::F32)?,
            ],
            grads: vec![true, true, true],
            fused: Box::new(|t: &[Tensor]| layer_norm::layer_norm(&t[0], &t[1], &t[2], 1e-5)),
            twin: Box::new(|t: &[Tensor]| some(layer_norm_twin(&t[0], &t[1], &t[2], 1e-5)?)),
        })
    };
    let attn = |name: &str, (b, h, q, k): (usize, usize, usize, usize), pair: bool, seed: u64| {
        let mut inputs = vec![rt(&[b, h, q, k], 3.0, seed, dt)?, mask_bias(b, k, dt, dev)?];
        let mut grads = vec![true, false];
        if pair {
            inputs.push(rt(&[1, h, q, k], 2.0, seed + 1, dt)?);
            grads.push(true);
        }
        Ok::<_, Error>(KernelCase {
            name: name.to_string(),
            inputs,
            grads,
            fused: Box::new(|t: &[Tensor]| {
                let b: Vec<&Tensor> = t[1..].iter().collect();
                softmax::softmax_with_biases(&t[0], &b)
            }),
            twin: Box::new(|t: &[Tensor]| {
                let b: Vec<&Tensor> = t[1..].iter().collect();
                some(softmax_with_biases_twin(&t[0], &b)?)
            }),
        })
    };
    Ok(vec![
        ln("layer_norm m [S,R,c_m]", &[s, r, cm], 1)?,
        ln("layer_norm z [R,R,c_z]", &[r, r, cz], 4)?,
        attn(
            "softmax msa-row [S,H,R,R]+mask+pair",
            (s, hm, r, r),
            true,
            10,
        )?,
        attn("softmax msa-col [R,H,S,S]+mask", (r, hm, s, s), false, 12)?,
        attn("softmax tri [R,H,R,R]+mask+tri", (r, hp, r, r), true, 14)?,
        KernelCase {
            name: "softmax plain [S,H,R,R]".into(),
            inputs: vec![rt(&[s, hm, r, r], 3.0, 16, dt)?],
            grads: vec![true],
            fused: Box::new(|t: &[Tensor]| softmax::softmax(&t[0])),
            twin: Box::new(|t: &[Tensor]| some(softmax_twin(&t[0])?)),
        },
        // Not a kernel: how much a loss `Σ y·g` costs with candle's one-block `sum_all` versus a
        // two-stage sum (rows first), at the size of an Evoformer output.
        KernelCase {
            name: "sum_all [S,R,c_m]: 2-stage vs candle".into(),
            inputs: vec![rt(&[s, r, cm], 1.0, 18, dt)?],
            grads: vec![true],
            fused: Box::new(|t: &[Tensor]| {
                let c = t[0].dims().last().copied().unwrap_or(1).max(1);
                let rows = t[0].elem_count() / c;
                some(t[0].reshape((rows, c))?.sum(1)?.sum_all()?)
            }),
            twin: Box::new(|t: &[Tensor]| some(t[0].sum_all()?)),
        },
    ])
}

/// The loss `Σ y·g` (cotangent `g` constant) whose backward seeds `y`'s gradient with `g`.
fn vjp(y: &Tensor, g: &Tensor) -> Result<Tensor> {
    Ok(y.broadcast_mul(&g.detach())?.sum_all()?)
}

/// Input gradients (of the inputs flagged in `grads`) from `loss`.
fn grads_of(loss: &Tensor, vars: &[Tensor], grads: &[bool]) -> Result<Vec<Tensor>> {
    let gs = loss.backward()?;
    let mut out = Vec::new();
    for (v, &want) in vars.iter().zip(grads) {
        if want {
            out.push(
                gs.get(v)
                    .ok_or_else(|| Error::Msg("bench kernels: missing gradient".into()))?
                    .clone(),
            );
        }
    }
    Ok(out)
}

/// Median forward and backward ms of `f` (`NaN` if `f` declines).
fn time_op(
    f: &KernelFn,
    vars: &[Tensor],
    g: &Tensor,
    dev: &Device,
    warmup: usize,
    iters: usize,
) -> Result<(f64, f64)> {
    let (mut tf, mut tb) = (Vec::with_capacity(iters), Vec::with_capacity(iters));
    for it in 0..warmup + iters {
        dev.synchronize()?;
        let t0 = Instant::now();
        let Some(y) = f(vars)? else {
            return Ok((f64::NAN, f64::NAN));
        };
        dev.synchronize()?;
        let t1 = Instant::now();
        let loss = vjp(&y, g)?;
        drop(y);
        dev.synchronize()?;
        let t2 = Instant::now();
        let gs = loss.backward()?;
        dev.synchronize()?;
        let t3 = Instant::now();
        drop(gs);
        if it >= warmup {
            tf.push((t1 - t0).as_secs_f64() * 1e3);
            tb.push((t3 - t2).as_secs_f64() * 1e3);
        }
    }
    Ok((median(&mut tf), median(&mut tb)))
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    let d = (a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?;
    Ok(d.abs()?.max_all()?.to_scalar::<f32>()? as f64)
}

/// Time every case (fused and twin, forward and backward).
pub fn bench_kernels(a: &KernelsArgs) -> Result<Vec<KernelTiming>> {
    let dev = a.device.device()?;
    let mut all = cases(a, &dev)?;
    // Further rows (other kernel families) are appended here.
    if let Some(f) = &a.filter {
        all.retain(|c| c.name.contains(f.as_str()));
    }
    let mut prepared = Vec::new();
    for case in all {
        let vars = case
            .inputs
            .iter()
            .zip(&case.grads)
            .map(|(t, &g)| {
                Ok(if g {
                    Var::from_tensor(t)?.as_tensor().clone()
                } else {
                    t.clone()
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let probe = (case.twin)(&vars)?
            .ok_or_else(|| Error::Msg(format!("bench kernels: twin of {} declined", case.name)))?;
        let g = random_tensor(probe.dims(), 1.0, 99, probe.dtype(), &dev)?;
        drop(probe);
        prepared.push((case, vars, g));
    }
    // Global warm-up (kernel compilation, GPU clocks) before any timing.
    for (case, vars, g) in &prepared {
        for f in [&case.fused, &case.twin] {
            time_op(f, vars, g, &dev, 1, 0)?;
        }
    }
    let mut out = Vec::new();
    for (case, vars, g) in prepared {
        let (ff, fb) = time_op(&case.fused, &vars, &g, &dev, a.warmup, a.iters)?;
        let (tf, tb) = time_op(&case.twin, &vars, &g, &dev, a.warmup, a.iters)?;
        let (mut err_y, mut err_grad) = (f64::NAN, f64::NAN);
        if let (Some(yf), Some(yt)) = ((case.fused)(&vars)?, (case.twin)(&vars)?) {
            err_y = max_abs_diff(&yf, &yt)?;
            let gf = grads_of(&vjp(&yf, &g)?, &vars, &case.grads)?;
            let gt = grads_of(&vjp(&yt, &g)?, &vars, &case.grads)?;
            err_grad = 0.0;
            for (a, b) in gf.iter().zip(&gt) {
                err_grad = err_grad.max(max_abs_diff(a, b)?);
            }
        }
        out.push(KernelTiming {
            name: case.name,
            fused_fwd_ms: ff,
            twin_fwd_ms: tf,
            fused_bwd_ms: fb,
            twin_bwd_ms: tb,
            err_y,
            err_grad,
        });
    }
    Ok(out)
}

/// The printed report of `bench kernels`.
pub fn format_kernels(a: &KernelsArgs, rows: &[KernelTiming]) -> String {
    let mut s = format!(
        "bench kernels: device={:?} dtype={:?} S={} R={} c_m={} c_z={} iters={} (median ms)\n",
        a.device, a.dtype, a.n_seq, a.n_res, a.c_m, a.c_z, a.iters
    )
    .to_lowercase();
    s +=
        "| kernel | fwd fused | fwd twin | x | bwd fused | bwd twin | x | max|dy| | max|dgrad| |\n";
    s += "|---|---|---|---|---|---|---|---|---|\n";
    for r in rows {
        s += &format!(
            "| {} | {:.3} | {:.3} | {:.1} | {:.3} | {:.3} | {:.1} | {:.1e} | {:.1e} |\n",
            r.name,
            r.fused_fwd_ms,
            r.twin_fwd_ms,
            r.twin_fwd_ms / r.fused_fwd_ms,
            r.fused_bwd_ms,
            r.twin_bwd_ms,
            r.twin_bwd_ms / r.fused_bwd_ms,
            r.err_y,
            r.err_grad
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On the CPU the fused kernels decline (NaN timings) and the twins still run: one row per
    /// case, table printed.
    #[test]
    fn cpu_rows_and_table() {
        let a = KernelsArgs {
            n_seq: 4,
            n_res: 8,
            c_m: 16,
            c_z: 8,
            heads_msa: 2,
            heads_pair: 2,
            dtype: BenchDtype::F32,
            iters: 2,
            warmup: 1,
            device: BenchDevice::Cpu,
            filter: None,
        };
        let rows = bench_kernels(&a).unwrap();
        assert_eq!(rows.len(), cases(&a, &Device::Cpu).unwrap().len());
        for r in &rows {
            assert!(
                r.twin_fwd_ms.is_finite() && r.twin_bwd_ms.is_finite(),
                "{r:?}"
            );
            if r.name.starts_with("sum_all") {
                assert!(r.fused_fwd_ms.is_finite() && r.err_y < 1e-3, "{r:?}");
            } else {
                assert!(r.fused_fwd_ms.is_nan(), "{r:?}");
            }
        }
        let table = format_kernels(&a, &rows);
        assert_eq!(table.lines().count(), 3 + rows.len());
        assert!(table.contains("| layer_norm m [S,R,c_m] |"));
    }
}
