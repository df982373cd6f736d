//! `bench parity`: one random block on two devices, outputs and gradients compared.

use candle_core::{DType, Device, Tensor};

use super::{build_blocks, make_inputs, ParityArgs};
use crate::config::Remat;
use crate::error::{Error, Result};
use crate::model::remat::forward_blocks;

/// One compared tensor of a parity run.
#[derive(Debug, Clone)]
pub struct ParityRow {
    pub name: String,
    pub max_abs_err: f64,
    pub max_abs_ref: f64,
}

impl ParityRow {
    pub fn rel(&self) -> f64 {
        self.max_abs_err / self.max_abs_ref.max(1.0)
    }
}

fn max_abs(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?
        .abs()?
        .max_all()?
        .to_scalar::<f64>()?)
}

/// Outputs/input gradients and named parameter gradients of one parity run (on the CPU).
type ParityRun = (Vec<Tensor>, Vec<(String, Tensor)>);

/// Run one block forward+backward (remat none) on two devices with identical parameters and
/// inputs; compare `m`, `z`, `dm`, `dz` and every parameter gradient.
pub fn parity(a: &ParityArgs) -> Result<Vec<ParityRow>> {
    let cfg = a.dims.block_config(1);
    let run = |dev: &Device, dtype: DType| -> Result<ParityRun> {
        let (vm, blocks) = build_blocks(&cfg, dev, a.seed)?;
        let x = make_inputs(a.n_seq, a.n_res, &cfg, dtype, dev, a.seed)?;
        let (m, z, tape) = forward_blocks(
            &blocks,
            &x.m,
            &x.z,
            &x.msa_mask,
            &x.pair_mask,
            None,
            Remat::None,
        )?;
        let mut grads = candle_core::backprop::GradStore::default();
        let (dm, dz) = tape.backward(&x.dm, &x.dz, &mut grads)?;
        let data = vm
            .data()
            .lock()
            .map_err(|_| Error::Msg("bench: VarMap lock poisoned".into()))?;
        let mut names: Vec<&String> = data.keys().collect();
        names.sort();
        let mut pg = Vec::new();
        for n in names {
            if let Some(g) = grads.get(data[n].as_tensor()) {
                pg.push((n.clone(), g.to_device(&Device::Cpu)?));
            }
        }
        let outs = [m, z, dm, dz]
            .iter()
            .map(|t| Ok(t.to_device(&Device::Cpu)?))
            .collect::<Result<Vec<_>>>()?;
        Ok((outs, pg))
    };
    let (ra, ga) = run(&a.device_a.device()?, DType::F32)?;
    let (rb, gb) = run(&a.device_b.device()?, a.dtype_b.dtype())?;
    if ga.len() != gb.len() {
        return Err(Error::Msg(format!(
            "parity: {} parameter gradients on device A, {} on device B",
            ga.len(),
            gb.len()
        )));
    }
    let mut rows = Vec::new();
    let names = ["m", "z", "d_m_in", "d_z_in"];
    let pairs = names
        .iter()
        .map(|n| n.to_string())
        .zip(ra.iter().zip(rb.iter()))
        .chain(
            ga.iter()
                .zip(gb.iter())
                .map(|((n, x), (_, y))| (format!("grad {n}"), (x, y))),
        );
    for (name, (x, y)) in pairs {
        let x = x.to_dtype(DType::F64)?;
        let y = y.to_dtype(DType::F64)?;
        rows.push(ParityRow {
            name,
            max_abs_err: max_abs(&(&x - &y)?)?,
            max_abs_ref: max_abs(&x)?,
        });
    }
    Ok(rows)
}

/// The printed report of `bench parity`; the `bool` is true when every row passes.
pub fn format_parity(a: &ParityArgs, rows: &[ParityRow]) -> (String, bool) {
    let mut s = format!(
        "bench parity: a={:?}/f32 b={:?}/{:?} n_seq={} n_res={} tol={:e}\n",
        a.device_a, a.device_b, a.dtype_b, a.n_seq, a.n_res, a.tol
    )
    .to_lowercase();
    let worst = rows.iter().max_by(|x, y| x.rel().total_cmp(&y.rel()));
    for r in rows.iter().take(4) {
        s += &format!(
            "{:<8} max|a-b| {:.3e}  max|a| {:.3e}  rel {:.3e}\n",
            r.name,
            r.max_abs_err,
            r.max_abs_ref,
            r.rel()
        );
    }
    let ok = rows.iter().all(|r| r.rel() <= a.tol && r.rel().is_finite());
    if let Some(w) = worst {
        s += &format!(
            "worst of {} tensors ({} parameter gradients): {} rel {:.3e}\n",
            rows.len(),
            rows.len().saturating_sub(4),
            w.name,
            w.rel()
        );
    }
    s += if ok { "PARITY PASS\n" } else { "PARITY FAIL\n" };
    (s, ok)
}
