//! Validation metrics on Cα coordinates: lDDT-Cα (global and per residue), dRMSD, RMSD after
//! optimal superposition, GDT-TS and GDT-HA (OpenFold `validation_metrics` / `lddt_ca`).

use candle_core::{DType, Tensor, D};

pub use super::lddt::{lddt, lddt_ca};
use crate::error::Result;
pub use crate::geometry::superimpose::superimpose;

/// OpenFold `drmsd`: `sqrt(Σ mask_ij (d1_ij − d2_ij)² / (n(n−1)))` with `n = min(Σ mask)` and
/// distances without eps (no gradient: the metric is validation-only). `s1`, `s2` `[*, N, 3]`,
/// `mask` `[*, N]`. Returns `[*]`; 0 when n ≤ 1.
pub fn drmsd(s1: &Tensor, s2: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let prep = |s: &Tensor| -> Result<Tensor> {
        let s = s.detach();
        Ok(s.unsqueeze(D::Minus2)?
            .broadcast_sub(&s.unsqueeze(D::Minus(3))?)?
            .sqr()?
            .sum(D::Minus1)?
            .sqrt()?)
    };
    let d1 = prep(s1)?;
    let d2 = prep(s2)?;
    let mut e = (d1 - d2)?.sqr()?;
    let n = match mask {
        Some(m) => {
            let m = m.to_dtype(e.dtype())?;
            e = e.broadcast_mul(
                &m.unsqueeze(D::Minus1)?
                    .broadcast_mul(&m.unsqueeze(D::Minus2)?)?,
            )?;
            let counts: Vec<f64> = m
                .sum(D::Minus1)?
                .flatten_all()?
                .to_dtype(DType::F64)?
                .to_vec1()?;
            counts.into_iter().fold(f64::INFINITY, f64::min)
        }
        None => s1.dim(D::Minus2)? as f64,
    };
    let e = e.sum((D::Minus2, D::Minus1))?;
    let e = if n > 1.0 {
        (e * (1.0 / (n * (n - 1.0))))?
    } else {
        (e * 0.0)?
    };
    Ok(e.sqrt()?)
}

/// OpenFold `gdt`: mean over cutoffs of `Σ (|p1 − p2| ≤ c)·mask / Σ mask` (averaged over batch);
/// no superposition is done here.
// F32 QUIRK: OpenFold casts the coordinates to float32 before taking distances.
pub fn gdt(p1: &Tensor, p2: &Tensor, mask: &Tensor, cutoffs: &[f64]) -> Result<Tensor> {
    let dtype = mask.dtype();
    let n = mask.sum(D::Minus1)?;
    let dist = (p1.detach().to_dtype(DType::F32)? - p2.detach().to_dtype(DType::F32)?)?
        .sqr()?
        .sum(D::Minus1)?
        .sqrt()?
        .to_dtype(dtype)?;
    let mut total: Option<Tensor> = None;
    for &c in cutoffs {
        let s = (dist.le(c)?.to_dtype(dtype)? * mask)?.sum(D::Minus1)?;
        let s = (s / &n)?.mean_all()?;
        total = Some(match total {
            Some(t) => (t + s)?,
            None => s,
        });
    }
    match total {
        Some(t) => Ok((t / cutoffs.len() as f64)?),
        None => Ok(Tensor::new(0.0, mask.device())?.to_dtype(dtype)?),
    }
}

/// GDT-TS: cutoffs 1, 2, 4, 8 Å.
pub fn gdt_ts(p1: &Tensor, p2: &Tensor, mask: &Tensor) -> Result<Tensor> {
    gdt(p1, p2, mask, &[1.0, 2.0, 4.0, 8.0])
}

/// GDT-HA: cutoffs 0.5, 1, 2, 4 Å.
pub fn gdt_ha(p1: &Tensor, p2: &Tensor, mask: &Tensor) -> Result<Tensor> {
    gdt(p1, p2, mask, &[0.5, 1.0, 2.0, 4.0])
}

/// The validation metrics OpenFold's training script reports, computed on atom37 coordinates
/// (`[N, 37, 3]` each, mask `[N, 37]`). Plain f64 values.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StructureMetrics {
    /// Global lDDT-Cα (cutoff 15 Å), in `[0, 1]`.
    pub lddt_ca: f64,
    /// dRMSD over Cα.
    pub drmsd_ca: f64,
    /// Cα RMSD after optimal superposition of the prediction onto the ground truth.
    pub rmsd_ca: f64,
    /// GDT-TS / GDT-HA of the superposed prediction.
    pub gdt_ts: f64,
    pub gdt_ha: f64,
}

impl StructureMetrics {
    /// `<prefix>lddt_ca`, `<prefix>drmsd_ca`, … for the trainer's evaluation / metrics logs.
    pub fn to_map(&self, prefix: &str) -> std::collections::BTreeMap<String, f64> {
        [
            ("lddt_ca", self.lddt_ca),
            ("drmsd_ca", self.drmsd_ca),
            ("rmsd_ca", self.rmsd_ca),
            ("gdt_ts", self.gdt_ts),
            ("gdt_ha", self.gdt_ha),
        ]
        .into_iter()
        .map(|(k, v)| (format!("{prefix}{k}"), v))
        .collect()
    }
}

/// Cα metrics as in OpenFold `_compute_validation_metrics`: lDDT-Cα on the raw prediction; Cα
/// coordinates masked by the Cα mask; superpose the prediction onto the truth; RMSD, GDT on the
/// superposed prediction; dRMSD on the raw masked Cα.
pub fn structure_metrics(
    pred37: &Tensor,
    true37: &Tensor,
    mask37: &Tensor,
) -> Result<StructureMetrics> {
    let ca = super::lddt::CA_ATOM37;
    let scalar = |t: &Tensor| -> Result<f64> {
        Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?[0])
    };
    let l = lddt_ca(pred37, true37, mask37, 15.0, 1e-10, false)?;
    let m = mask37.narrow(D::Minus1, ca, 1)?; // [N, 1]
    let p = pred37
        .narrow(D::Minus2, ca, 1)?
        .squeeze(D::Minus2)?
        .broadcast_mul(&m)?;
    let t = true37
        .narrow(D::Minus2, ca, 1)?
        .squeeze(D::Minus2)?
        .broadcast_mul(&m)?;
    let m = m.squeeze(D::Minus1)?;
    let (sup, rmsd) = superimpose(&t, &p, &m)?;
    Ok(StructureMetrics {
        lddt_ca: scalar(&l)?,
        drmsd_ca: scalar(&drmsd(&p, &t, Some(&m))?)?,
        rmsd_ca: scalar(&rmsd)?,
        gdt_ts: scalar(&gdt_ts(&sup, &t, &m)?)?,
        gdt_ha: scalar(&gdt_ha(&sup, &t, &m)?)?,
    })
}
