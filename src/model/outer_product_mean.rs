//! Algorithm 10: outer product mean (MSA → pair update).

use candle_core::backprop::GradStore;
use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::primitives::{cast, mul_const, LayerNorm, Linear, LinearInit};
use super::vjp::{linear_cat_backward, linear_cat_nograd};
use crate::error::{Error, Result};
use crate::kernels::bias_act::row_scale;
use crate::kernels::permute::Contig;

/// Algorithm 10 (OpenFold `OuterProductMean`).
#[derive(Debug, Clone)]
pub struct OuterProductMean {
    pub layer_norm: LayerNorm,
    pub linear_1: Linear,
    pub linear_2: Linear,
    pub linear_out: Linear,
    pub c_hidden: usize,
    pub eps: f64,
}

impl OuterProductMean {
    /// `eps` is added to the pairwise sequence count (OpenFold: 1e-3).
    pub fn new(vb: VarBuilder, c_m: usize, c_z: usize, c_hidden: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            layer_norm: LayerNorm::new(vb.pp("layer_norm"), c_m)?,
            linear_1: Linear::new(vb.pp("linear_1"), c_m, c_hidden, true, LinearInit::Default)?,
            linear_2: Linear::new(vb.pp("linear_2"), c_m, c_hidden, true, LinearInit::Default)?,
            linear_out: Linear::new(
                vb.pp("linear_out"),
                c_hidden * c_hidden,
                c_z,
                true,
                LinearInit::Final,
            )?,
            c_hidden,
            eps,
        })
    }

    /// `m` `[S, R, c_m]`, `mask` `[S, R]` → pair update `[R, R, c_z]`.
    pub fn forward(&self, m: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (a, b) = self.project(m, mask)?;
        self.combine(&a, &b, mask, mask)
    }

    /// The masked projections `(a, b)`, each `[S, R, C]`, of `m` `[S, R, c_m]` (`mask` `[S, R]`).
    pub fn project(&self, m: &Tensor, mask: &Tensor) -> Result<(Tensor, Tensor)> {
        let mask = &super::primitives::cast(mask, m.dtype())?;
        let ln = self.layer_norm.forward(m)?;
        let mask3 = mask.unsqueeze(2)?; // [S, R, 1]
        let a = mul_const(&self.linear_1.forward(&ln)?, &mask3)?; // [S, R, C]
        let b = mul_const(&self.linear_2.forward(&ln)?, &mask3)?; // [S, R, C]
        Ok((a, b))
    }

    /// Outer product of `a` `[S, Ri, C]` (rows `i`) and `b` `[S, Rj, C]` (columns `j`), then
    /// `linear_out` and the mean over sequences (`mask_a` `[S, Ri]`, `mask_b` `[S, Rj]`) →
    /// `[Ri, Rj, c_z]`. `Ri != Rj` when DAP gives this rank only some rows `i`.
    pub fn combine(
        &self,
        a: &Tensor,
        b: &Tensor,
        mask_a: &Tensor,
        mask_b: &Tensor,
    ) -> Result<Tensor> {
        let mask_a = &super::primitives::cast(mask_a, a.dtype())?;
        let mask_b = &super::primitives::cast(mask_b, a.dtype())?;
        let outer = outer_flat(a, b)?; // [Ri, Rj, C*C]
        let outer = self.linear_out.forward(&outer)?; // bias included before normalisation
                                                      // norm[i, j] = Σ_s mask[s, i] mask[s, j] + eps
        let norm = (mask_a.t()?.matmul(mask_b)? + self.eps)?.unsqueeze(2)?; // [Ri, Rj, 1]
        mul_const(&outer, &norm.recip()?)
    }
}

/// `outer[i, j, c1·C + c2] = Σ_s a[s, i, c1] b[s, j, c2]` for `a` `[S, Ri, C]`, `b` `[S, Rj, C]`
/// → `[Ri, Rj, C·C]`, as one `(Ri·C, S) × (S, Rj·C)` matmul.
fn outer_flat(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (s, ri, c) = a.dims3()?;
    let (_, rj, _) = b.dims3()?;
    let a2 = a.reshape((s, ri * c))?.t()?; // [Ri*C, S] (transposed view)
    let b2 = b.reshape((s, rj * c))?; // [S, Rj*C]
    Ok(a2
        .matmul(&b2)? // [Ri*C (i,c1), Rj*C (j,c2)]
        .reshape((ri, c, rj, c))?
        .transpose(1, 2)? // [Ri, Rj, c1, c2]
        .contig()?
        .reshape((ri, rj, c * c))?) // index c1*C + c2
}

/// What [`OuterProductMean::backward`] keeps from [`OuterProductMean::forward_saved`].
pub struct OpmSaved {
    /// Input `[S, R, c_m]`.
    m: Tensor,
    /// `LN(m)` `[S, R, c_m]`.
    ln: Tensor,
    /// Masked projections `a = linear_1(ln)·mask`, `b = linear_2(ln)·mask`, each `[S, R, C]`.
    a: Tensor,
    b: Tensor,
    /// Outer products (input of `linear_out`) `[R, R, C·C]`.
    outer: Tensor,
    /// `mask[..., None]` `[S, R, 1]` in the activation dtype.
    mask3: Tensor,
    /// `1 / (Σ_s mask[s, i] mask[s, j] + eps)` `[R, R, 1]`.
    inv_norm: Tensor,
}

impl OuterProductMean {
    /// [`Self::forward`] without a graph, keeping what [`Self::backward`] needs (see
    /// [`super::vjp`]). `linear_1` and `linear_2` run as one GEMM.
    pub fn forward_saved(&self, m: &Tensor, mask: &Tensor) -> Result<(Tensor, OpmSaved)> {
        let m = m.detach();
        let mask = cast(&mask.detach(), m.dtype())?; // [S, R]
        let c = self.c_hidden;
        let ln = self.layer_norm.forward_nograd(&m)?; // [S, R, c_m]
        let mask3 = mask.unsqueeze(2)?; // [S, R, 1]
        let ab = linear_cat_nograd(&[&self.linear_1, &self.linear_2], &ln)?; // [S, R, 2C]
        let a = row_scale(&ab.narrow(2, 0, c)?, &mask)?; // [S, R, C] (· mask3)
        let b = row_scale(&ab.narrow(2, c, c)?, &mask)?; // [S, R, C] (· mask3)
        drop(ab);
        let outer = outer_flat(&a, &b)?; // [R, R, C*C]
        let y0 = self.linear_out.forward_nograd(&outer)?; // [R, R, c_z]
        let inv_norm = (mask.t()?.matmul(&mask)? + self.eps)?
            .recip()?
            .unsqueeze(2)?; // [R, R, 1]
        let y = row_scale(&y0, &inv_norm)?; // y0 · inv_norm
        let saved = OpmSaved {
            m,
            ln,
            a,
            b,
            outer,
            mask3,
            inv_norm,
        };
        Ok((y, saved))
    }

    /// Backward of [`Self::forward_saved`]: parameter gradients into `grads`, returns `dm`.
    ///
    /// With `outer2 = a2ᵀ b2` (`a2` = `a` as `[S, Ri·C]`, `b2` = `b` as `[S, Rj·C]`) and `D` the
    /// cotangent of `outer2` (`[Ri·C, Rj·C]`, from `linear_out`'s backward of the 1/norm-scaled
    /// `dy`): `da2 = b2 Dᵀ`, `db2 = a2 D`; then the mask, the joint `linear_1`/`linear_2`
    /// backward and the LayerNorm's.
    pub fn backward(&self, s: OpmSaved, dy: &Tensor, grads: &mut GradStore) -> Result<Tensor> {
        let OpmSaved {
            m,
            ln,
            a,
            b,
            outer,
            mask3,
            inv_norm,
        } = s;
        let missing = || Error::Model("outer product mean backward: no dx".into());
        let dt = a.dtype();
        let (sn, ri, c) = a.dims3()?;
        let rj = b.dims()[1];
        let dy0 = row_scale(&cast(&dy.detach(), dt)?, &inv_norm)?; // [Ri, Rj, c_z]
        let d_outer = self
            .linear_out
            .backward(&outer, &dy0, grads, true)?
            .ok_or_else(missing)?; // [Ri, Rj, C*C]
        drop((outer, dy0));
        let d2 = d_outer
            .reshape((ri, rj, c, c))?
            .transpose(1, 2)? // [Ri, c1, Rj, c2]
            .contig()?
            .reshape((ri * c, rj * c))?;
        drop(d_outer);
        let a2 = a.reshape((sn, ri * c))?; // [S, Ri*C]
        let b2 = b.reshape((sn, rj * c))?; // [S, Rj*C]
        let da = b2.matmul(&d2.t()?)?.reshape((sn, ri, c))?; // [S, Ri, C]
        let db = a2.matmul(&d2)?.reshape((sn, rj, c))?; // [S, Rj, C]
        drop(d2);
        // Masked rows: the projections' cotangents vanish there.
        let dab = row_scale(&Tensor::cat(&[&da, &db], 2)?, &mask3)?; // [S, R, 2C] (· mask3)
        drop((da, db));
        let dln = linear_cat_backward(&[&self.linear_1, &self.linear_2], &ln, &dab, grads, true)?
            .ok_or_else(missing)?;
        drop(dab);
        self.layer_norm.backward(&m, &dln, grads)
    }
}

/// What [`OuterProductMean::project_backward`] keeps from [`OuterProductMean::project_saved`]
/// (the DAP hooks with a hand-written backward).
pub struct OpmProjSaved {
    /// Input `[S, R, c_m]`, `LN(m)` and `mask[..., None]` `[S, R, 1]`.
    m: Tensor,
    ln: Tensor,
    mask3: Tensor,
}

/// What [`OuterProductMean::combine_backward`] keeps from [`OuterProductMean::combine_saved`].
pub struct OpmCombSaved {
    /// Operands `[S, Ri, C]`, `[S, Rj, C]`, outer products `[Ri, Rj, C·C]`, `1 / norm`
    /// `[Ri, Rj, 1]`.
    a: Tensor,
    b: Tensor,
    outer: Tensor,
    inv_norm: Tensor,
}

impl OuterProductMean {
    /// [`Self::project`] without a graph → `(a, b, saved)`, each `[S, R, C]` contiguous (same
    /// math as [`Self::forward_saved`]).
    pub fn project_saved(
        &self,
        m: &Tensor,
        mask: &Tensor,
    ) -> Result<(Tensor, Tensor, OpmProjSaved)> {
        let m = m.detach();
        let mask = cast(&mask.detach(), m.dtype())?; // [S, R]
        let c = self.c_hidden;
        let ln = self.layer_norm.forward_nograd(&m)?; // [S, R, c_m]
        let mask3 = mask.unsqueeze(2)?; // [S, R, 1]
        let ab = linear_cat_nograd(&[&self.linear_1, &self.linear_2], &ln)?; // [S, R, 2C]
        let a = ab.narrow(2, 0, c)?.broadcast_mul(&mask3)?; // [S, R, C]
        let b = ab.narrow(2, c, c)?.broadcast_mul(&mask3)?; // [S, R, C]
        Ok((
            a.contiguous()?,
            b.contiguous()?,
            OpmProjSaved { m, ln, mask3 },
        ))
    }

    /// [`Self::combine`] without a graph (same math as [`Self::forward_saved`]).
    pub fn combine_saved(
        &self,
        a: &Tensor,
        b: &Tensor,
        mask_a: &Tensor,
        mask_b: &Tensor,
    ) -> Result<(Tensor, OpmCombSaved)> {
        let (a, b) = (a.detach(), b.detach());
        let mask_a = cast(&mask_a.detach(), a.dtype())?;
        let mask_b = cast(&mask_b.detach(), a.dtype())?;
        let outer = outer_flat(&a, &b)?; // [Ri, Rj, C*C]
        let y0 = self.linear_out.forward_nograd(&outer)?; // [Ri, Rj, c_z]
        let inv_norm = (mask_a.t()?.matmul(&mask_b)? + self.eps)?
            .recip()?
            .unsqueeze(2)?; // [Ri, Rj, 1]
        let y = y0.broadcast_mul(&inv_norm)?;
        Ok((
            y,
            OpmCombSaved {
                a,
                b,
                outer,
                inv_norm,
            },
        ))
    }

    /// Backward of [`Self::combine_saved`]: parameter gradients into `grads`, returns
    /// `(da, db)` (the operands' shapes).
    pub fn combine_backward(
        &self,
        s: OpmCombSaved,
        dy: &Tensor,
        grads: &mut GradStore,
    ) -> Result<(Tensor, Tensor)> {
        let missing = || Error::Model("outer product mean backward: no dx".into());
        let OpmCombSaved {
            a,
            b,
            outer,
            inv_norm,
        } = s;
        let (sn, ri, c) = a.dims3()?;
        let rj = b.dims()[1];
        let dy0 = cast(&dy.detach(), a.dtype())?.broadcast_mul(&inv_norm)?; // [Ri, Rj, c_z]
        let d_outer = self
            .linear_out
            .backward(&outer, &dy0, grads, true)?
            .ok_or_else(missing)?; // [Ri, Rj, C*C]
        drop((outer, dy0));
        let d2 = d_outer
            .reshape((ri, rj, c, c))?
            .transpose(1, 2)? // [Ri, c1, Rj, c2]
            .contiguous()?
            .reshape((ri * c, rj * c))?;
        let a2 = a.reshape((sn, ri * c))?; // [S, Ri*C]
        let b2 = b.reshape((sn, rj * c))?; // [S, Rj*C]
        let da = b2.matmul(&d2.t()?)?.reshape((sn, ri, c))?; // [S, Ri, C]
        let db = a2.matmul(&d2)?.reshape((sn, rj, c))?; // [S, Rj, C]
        Ok((da, db))
    }

    /// Backward of [`Self::project_saved`] given the cotangents of `a`, `b` `[S, R, C]`:
    /// parameter gradients into `grads`, returns `dm`.
    pub fn project_backward(
        &self,
        p: OpmProjSaved,
        da: &Tensor,
        db: &Tensor,
        grads: &mut GradStore,
    ) -> Result<Tensor> {
        let missing = || Error::Model("outer product mean backward: no dm".into());
        // Masked rows: the projections' cotangents vanish there.
        let dab = Tensor::cat(&[da, db], 2)?.broadcast_mul(&p.mask3)?; // [S, R, 2C]
        let dln = linear_cat_backward(&[&self.linear_1, &self.linear_2], &p.ln, &dab, grads, true)?
            .ok_or_else(missing)?;
        drop(dab);
        self.layer_norm.backward(&p.m, &dln, grads)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{random_tensor, randomize};
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    /// Hand-written vs autograd gradients in f64 with padding: the last MSA row and the last
    /// residue fully masked, plus scattered zeros (pairs whose mean has no sequence at all).
    #[test]
    fn manual_backward_matches_autograd_with_padding() {
        let dev = Device::Cpu;
        let (s, r, c_m, c_z, c) = (5, 7, 6, 4, 3);
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F64, &dev);
        let opm = OuterProductMean::new(vb, c_m, c_z, c, 1e-3).unwrap();
        randomize(&vm, 7).unwrap();
        let m = random_tensor(&[s, r, c_m], 2.0, 11, DType::F64, &dev).unwrap();
        let mut mask = random_tensor(&[s, r], 1.0, 12, DType::F64, &dev)
            .unwrap()
            .ge(-0.6)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec2::<f64>()
            .unwrap();
        for (si, row) in mask.iter_mut().enumerate() {
            row[r - 1] = 0.0;
            if si == s - 1 {
                row.iter_mut().for_each(|v| *v = 0.0);
            }
        }
        let mask = Tensor::new(mask, &dev).unwrap();
        crate::model::vjp::assert_manual_matches_autograd(
            &vm,
            &m,
            |x| opm.forward(x, &mask),
            |x, dy, g| {
                let (y, saved) = opm.forward_saved(x, &mask)?;
                Ok((y, opm.backward(saved, dy, g)?))
            },
            1e-12,
        );
    }
}
