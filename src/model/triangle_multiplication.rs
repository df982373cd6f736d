//! Algorithms 11 and 12: triangular multiplicative update using outgoing / incoming edges.

use candle_core::backprop::GradStore;
use candle_core::Tensor;
use candle_nn::VarBuilder;

use super::primitives::{cast, mul_const, sigmoid, LayerNorm, Linear, LinearInit};
use super::vjp::{
    gate_bwd, gate_nograd, linear_cat_backward, linear_cat_nograd, sigmoid_bwd_from_output,
};
use crate::error::{Error, Result};
use crate::kernels::permute::Contig;
use crate::kernels::tri_gate::{
    transpose12, tri_gate_bwd, tri_gate_fwd, GatedPart, PairPerm, PartGrad,
};

/// Triangle multiplicative update (OpenFold `TriangleMultiplicativeUpdate`); `outgoing` selects
/// Algorithm 11 (`x[i,j] = Σ_k a[i,k] b[j,k]`) or Algorithm 12 (`x[i,j] = Σ_k a[k,i] b[k,j]`).
#[derive(Debug, Clone)]
pub struct TriangleMultiplication {
    pub layer_norm_in: LayerNorm,
    pub layer_norm_out: LayerNorm,
    pub linear_a_p: Linear,
    pub linear_a_g: Linear,
    pub linear_b_p: Linear,
    pub linear_b_g: Linear,
    pub linear_g: Linear,
    pub linear_z: Linear,
    pub outgoing: bool,
}

impl TriangleMultiplication {
    pub fn new(vb: VarBuilder, c_z: usize, c_hidden: usize, outgoing: bool) -> Result<Self> {
        use LinearInit::*;
        Ok(Self {
            layer_norm_in: LayerNorm::new(vb.pp("layer_norm_in"), c_z)?,
            layer_norm_out: LayerNorm::new(vb.pp("layer_norm_out"), c_hidden)?,
            linear_a_p: Linear::new(vb.pp("linear_a_p"), c_z, c_hidden, true, Default)?,
            linear_a_g: Linear::new(vb.pp("linear_a_g"), c_z, c_hidden, true, Gating)?,
            linear_b_p: Linear::new(vb.pp("linear_b_p"), c_z, c_hidden, true, Default)?,
            linear_b_g: Linear::new(vb.pp("linear_b_g"), c_z, c_hidden, true, Gating)?,
            linear_g: Linear::new(vb.pp("linear_g"), c_z, c_z, true, Gating)?,
            linear_z: Linear::new(vb.pp("linear_z"), c_hidden, c_z, true, Final)?,
            outgoing,
        })
    }

    /// Algorithm 11 (outgoing edges).
    pub fn outgoing(vb: VarBuilder, c_z: usize, c_hidden: usize) -> Result<Self> {
        Self::new(vb, c_z, c_hidden, true)
    }

    /// Algorithm 12 (incoming edges).
    pub fn incoming(vb: VarBuilder, c_z: usize, c_hidden: usize) -> Result<Self> {
        Self::new(vb, c_z, c_hidden, false)
    }

    /// `z` `[R, R, c_z]`, `mask` `[R, R]` → update `[R, R, c_z]`.
    pub fn forward(&self, z: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let (zln, a, b) = self.project(z, mask)?;
        self.combine(&zln, &a, &b)
    }

    /// `(LN_in(z), a, b)` for the pair entries `z` `[I, J, c_z]` (`mask` `[I, J]`); `a`, `b` are
    /// `[I, J, C]`.
    pub fn project(&self, z: &Tensor, mask: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let mask = &super::primitives::cast(mask, z.dtype())?;
        let z = self.layer_norm_in.forward(z)?;
        let mask3 = mask.unsqueeze(2)?; // [I, J, 1]
        let a = mul_const(&sigmoid(&self.linear_a_g.forward(&z)?)?, &mask3)?
            .mul(&self.linear_a_p.forward(&z)?)?; // [I, J, C]
        let b = mul_const(&sigmoid(&self.linear_b_g.forward(&z)?)?, &mask3)?
            .mul(&self.linear_b_p.forward(&z)?)?; // [I, J, C]
        Ok((z, a, b))
    }

    /// The triangle product of `a` and `b`, `LN_out`, `linear_z` and the gate from `zln`
    /// `[I, J, c_z]`. Outgoing: `a` `[I, K, C]`, `b` `[J, K, C]`; incoming: `a` `[K, I, C]`,
    /// `b` `[K, J, C]` (under DAP one of them is all-gathered, the other is this rank's part).
    pub fn combine(&self, zln: &Tensor, a: &Tensor, b: &Tensor) -> Result<Tensor> {
        let (a_cik, b_ckj) = self.channel_first(a, b)?;
        let x = triangle_product(&a_cik, &b_ckj)?; // [I, J, C]
        let x = self.linear_z.forward(&self.layer_norm_out.forward(&x)?)?;
        // x * sigmoid(linear_g(zln)): one fused kernel on CUDA.
        crate::kernels::gate::gate(&x, &self.linear_g.forward(zln)?)
    }
}

impl TriangleMultiplication {
    /// The einsum operands channel-first and contiguous: `(a_cik [C, I, K], b_ckj [C, K, J])`.
    /// Outgoing: `x[i,j,c] = Σ_k a[i,k,c] b[j,k,c]`; incoming: `x[i,j,c] = Σ_k a[k,i,c] b[k,j,c]`.
    fn channel_first(&self, a: &Tensor, b: &Tensor) -> Result<(Tensor, Tensor)> {
        let (a_cik, b_ckj) = if self.outgoing {
            (a.permute((2, 0, 1))?, b.permute((2, 1, 0))?)
        } else {
            (a.permute((2, 1, 0))?, b.permute((2, 0, 1))?)
        };
        Ok((a_cik.contig()?, b_ckj.contig()?))
    }

    /// The joint projection as `[n, 4C + c_z]` rows (`n = I·J`), the mask as `[n]`, and the
    /// gated parts `a`, `b` of [`tri_gate_fwd`] (columns and channel-first permutations).
    fn gated_parts(
        &self,
        proj: &Tensor,
        mask3: &Tensor,
        c: usize,
    ) -> Result<(Tensor, Tensor, [GatedPart; 2])> {
        let (i, j, ld) = proj.dims3()?;
        let proj2 = proj.reshape((i * j, ld))?;
        let m1 = mask3.flatten_all()?;
        // Outgoing: a[i,k] → [C, I, K], b[j,k] → [C, K, J]; incoming: a[k,i] → [C, I, K],
        // b[k,j] → [C, K, J] (pair rows are z's [I, J]).
        let pa = PairPerm {
            a: i,
            b: j,
            swap: !self.outgoing,
        };
        let pb = PairPerm {
            a: i,
            b: j,
            swap: self.outgoing,
        };
        let parts = [
            GatedPart {
                off_p: 0,
                off_g: c,
                c,
                perm: pa,
            },
            GatedPart {
                off_p: 2 * c,
                off_g: 3 * c,
                c,
                perm: pb,
            },
        ];
        Ok((proj2, m1, parts))
    }

    /// The five projections of `LN_in(z)`, in the order of the joint GEMM of
    /// [`Self::forward_saved`]: `a_p, a_g, b_p, b_g` (`c_hidden` each) and the gate `g` (`c_z`).
    fn projections(&self) -> [&Linear; 5] {
        [
            &self.linear_a_p,
            &self.linear_a_g,
            &self.linear_b_p,
            &self.linear_b_g,
            &self.linear_g,
        ]
    }
}

/// Channel-first batched matmul `[C, I, K] × [C, K, J] → [C, I, J]`, returned as `[I, J, C]`.
fn triangle_product(a_cik: &Tensor, b_ckj: &Tensor) -> Result<Tensor> {
    Ok(a_cik.matmul(b_ckj)?.permute((1, 2, 0))?.contig()?)
}

/// What [`TriangleMultiplication::backward`] keeps from [`TriangleMultiplication::forward_saved`].
pub struct TriMulSaved {
    /// Input `[I, J, c_z]`.
    z: Tensor,
    /// `LN_in(z)` `[I, J, c_z]`.
    zln: Tensor,
    /// The joint projection of `zln` `[I, J, 4C + c_z]`: `a_p, a_g, b_p, b_g` (pre-sigmoid) and
    /// the gate logits (see [`TriangleMultiplication::projections`]).
    proj: Tensor,
    /// Gate logits `[I, J, c_z]` (contiguous copy of the last part of `proj`).
    g: Tensor,
    /// `mask[..., None]` `[I, J, 1]` in the activation dtype.
    mask3: Tensor,
    /// Einsum operands, channel-first: `[C, I, K]` and `[C, K, J]`.
    a_cik: Tensor,
    b_ckj: Tensor,
    /// Triangle product `x` `[I, J, C]`, `LN_out(x)`, and `linear_z(LN_out(x))` `[I, J, c_z]`.
    x: Tensor,
    xo: Tensor,
    y0: Tensor,
}

impl TriangleMultiplication {
    /// [`Self::forward`] without a graph, keeping what [`Self::backward`] needs (see
    /// [`super::vjp`]). The five projections of `LN_in(z)` run as one GEMM.
    pub fn forward_saved(&self, z: &Tensor, mask: &Tensor) -> Result<(Tensor, TriMulSaved)> {
        let z = z.detach();
        let c = self.layer_norm_out.weight.dims1()?;
        let c_z = self.linear_g.out_dim();
        let mask3 = cast(&mask.detach(), z.dtype())?.unsqueeze(2)?; // [I, J, 1]
        let zln = self.layer_norm_in.forward_nograd(&z)?; // [I, J, c_z]
        let proj = linear_cat_nograd(&self.projections(), &zln)?; // [I, J, 4C + c_z]
        let fused = crate::kernels::fused_for(&proj);
        let (a_cik, b_ckj) = if fused {
            // Fused: gating, mask and the channel-first transpose in one kernel per operand.
            let (proj2, m1, [pa, pb]) = self.gated_parts(&proj, &mask3, c)?;
            (
                tri_gate_fwd(&proj2, &m1, &pa)?,
                tri_gate_fwd(&proj2, &m1, &pb)?,
            )
        } else {
            let part = |k: usize| proj.narrow(2, k * c, c);
            // a = sigmoid(a_g) · mask · a_p, b likewise: [I, J, C].
            let a = sigmoid(&part(1)?)?.broadcast_mul(&mask3)?.mul(&part(0)?)?;
            let b = sigmoid(&part(3)?)?.broadcast_mul(&mask3)?.mul(&part(2)?)?;
            self.channel_first(&a, &b)?
        };
        let x = if fused {
            // [C, I, J] → [I, J, C] by the tiled transpose kernel.
            let (ci, i, j) = (a_cik.dim(0)?, a_cik.dim(1)?, b_ckj.dim(2)?);
            let x = a_cik.matmul(&b_ckj)?.reshape((1, ci, i * j))?;
            transpose12(&x)?.reshape((i, j, ci))?
        } else {
            triangle_product(&a_cik, &b_ckj)? // [I, J, C]
        };
        let xo = self.layer_norm_out.forward_nograd(&x)?;
        let y0 = self.linear_z.forward_nograd(&xo)?; // [I, J, c_z]
        let g = proj.narrow(2, 4 * c, c_z)?.contig()?;
        let y = gate_nograd(&y0, &g)?;
        let saved = TriMulSaved {
            z,
            zln,
            proj,
            g,
            mask3,
            a_cik,
            b_ckj,
            x,
            xo,
            y0,
        };
        Ok((y, saved))
    }

    /// Backward of [`Self::forward_saved`]: parameter gradients into `grads`, returns `dz`.
    ///
    /// With `X = A B` per channel (`A = a_cik`, `B = b_ckj`): `dA = dX Bᵀ`, `dB = Aᵀ dX`, then
    /// back to the pair layout; `a = s·mask·a_p` with `s = sigmoid(a_g)` gives
    /// `da_p = da·mask·s`, `da_g = da·mask·a_p·s·(1 − s)` (and `b` likewise). The five
    /// projection cotangents go through one joint GEMM backward, then `LN_in`'s.
    pub fn backward(&self, s: TriMulSaved, dy: &Tensor, grads: &mut GradStore) -> Result<Tensor> {
        let TriMulSaved {
            z,
            zln,
            proj,
            g,
            mask3,
            a_cik,
            b_ckj,
            x,
            xo,
            y0,
        } = s;
        let missing = || Error::Model("triangle multiplication backward: no dx".into());
        let c = x.dims3()?.2;
        let dy = cast(&dy.detach(), x.dtype())?;
        let (dy0, dg) = gate_bwd(&y0, &g, &dy)?;
        drop((y0, g, dy));
        let dxo = self
            .linear_z
            .backward(&xo, &dy0, grads, true)?
            .ok_or_else(missing)?;
        drop((xo, dy0));
        let dx = self.layer_norm_out.backward(&x, &dxo, grads)?; // [I, J, C]
        drop((x, dxo));
        let dx_cij = if crate::kernels::fused_for(&dx) {
            let (i, j, ci) = dx.dims3()?;
            transpose12(&dx.reshape((1, i * j, ci))?)?.reshape((ci, i, j))?
        } else {
            dx.permute((2, 0, 1))?.contig()?
        }; // [C, I, J]
        drop(dx);
        let da_cik = dx_cij.matmul(&b_ckj.transpose(1, 2)?)?; // [C, I, K]
        drop(b_ckj);
        let db_ckj = a_cik.transpose(1, 2)?.matmul(&dx_cij)?; // [C, K, J]
        drop((a_cik, dx_cij));
        if crate::kernels::fused_for(&proj) {
            // Fused: the gated cotangents straight from the channel-first layout into the
            // joint projection's cotangent (the gate's columns copied in), no concatenation.
            let (proj2, m1, [pa, pb]) = self.gated_parts(&proj, &mask3, c)?;
            let (n, c_z) = (proj2.dims2()?.0, dg.dim(2)?);
            let dg2 = dg.reshape((n, c_z))?;
            let parts = [
                PartGrad {
                    part: pa,
                    d: &da_cik,
                },
                PartGrad {
                    part: pb,
                    d: &db_ckj,
                },
            ];
            let dproj = tri_gate_bwd(&proj2, &m1, &parts, &[(4 * c, &dg2)])?;
            drop((da_cik, db_ckj, dg, dg2, proj, proj2));
            let dzln = linear_cat_backward(&self.projections(), &zln, &dproj, grads, true)?
                .ok_or_else(missing)?;
            drop((zln, dproj));
            return self.layer_norm_in.backward(&z, &dzln, grads);
        }
        // Back to the pair layout (views): outgoing a[i,k,c], b[j,k,c]; incoming a[k,i,c], b[k,j,c].
        let (da, db) = if self.outgoing {
            (da_cik.permute((1, 2, 0))?, db_ckj.permute((2, 1, 0))?)
        } else {
            (da_cik.permute((2, 1, 0))?, db_ckj.permute((1, 2, 0))?)
        };
        let part = |k: usize| proj.narrow(2, k * c, c);
        // (d_p, d_g) of `sigmoid(gl)·mask·p` for the cotangent `d`.
        let gated_bwd = |d: &Tensor, p: &Tensor, gl: &Tensor| -> Result<(Tensor, Tensor)> {
            let dm = d.broadcast_mul(&mask3)?;
            let sg = sigmoid(gl)?;
            let d_p = (&dm * &sg)?;
            let d_g = sigmoid_bwd_from_output(&(dm * p)?, &sg)?;
            Ok((d_p, d_g))
        };
        let (d_ap, d_ag) = gated_bwd(&da, &part(0)?, &part(1)?)?;
        drop((da, da_cik));
        let (d_bp, d_bg) = gated_bwd(&db, &part(2)?, &part(3)?)?;
        drop((db, db_ckj, proj));
        let dproj = Tensor::cat(&[&d_ap, &d_ag, &d_bp, &d_bg, &dg], 2)?; // [I, J, 4C + c_z]
        drop((d_ap, d_ag, d_bp, d_bg, dg));
        let dzln = linear_cat_backward(&self.projections(), &zln, &dproj, grads, true)?
            .ok_or_else(missing)?;
        drop((zln, dproj));
        self.layer_norm_in.backward(&z, &dzln, grads)
    }
}

/// What [`TriangleMultiplication::project_backward`] keeps from
/// [`TriangleMultiplication::project_saved`] (the DAP hooks with a hand-written backward).
pub struct TriMulProjSaved {
    /// Input `[I, J, c_z]`, `LN_in(z)`, the joint projection `[I, J, 4C + c_z]` and the mask
    /// `[I, J, 1]` (as in [`TriMulSaved`]).
    z: Tensor,
    zln: Tensor,
    proj: Tensor,
    mask3: Tensor,
}

/// What [`TriangleMultiplication::combine_backward`] keeps from
/// [`TriangleMultiplication::combine_saved`].
pub struct TriMulCombSaved {
    /// Gate logits `[I, J, c_z]`.
    g: Tensor,
    /// Einsum operands, channel-first: `[C, I, K]` and `[C, K, J]`.
    a_cik: Tensor,
    b_ckj: Tensor,
    /// Triangle product `[I, J, C]`, `LN_out` of it, `linear_z` of that `[I, J, c_z]`.
    x: Tensor,
    xo: Tensor,
    y0: Tensor,
}

impl TriangleMultiplication {
    /// [`Self::forward_saved`] up to the einsum operands, for the pair entries `z` `[I, J, c_z]`
    /// this rank holds: `(a_cik [C, I, K], b_ckj [C, K, J], saved)`, channel-first as there
    /// (outgoing: `a` `[C, I, J]`, `b` `[C, J, I]`; incoming: `a` `[C, J, I]`, `b` `[C, I, J]`;
    /// under DAP one of them is all-gathered along its local pair axis). The gating kernel
    /// ([`tri_gate_fwd`]) on CUDA, its twin elsewhere: the math of [`Self::forward_saved`].
    pub fn project_saved(
        &self,
        z: &Tensor,
        mask: &Tensor,
    ) -> Result<(Tensor, Tensor, TriMulProjSaved)> {
        let z = z.detach();
        let c = self.layer_norm_out.weight.dims1()?;
        let mask3 = cast(&mask.detach(), z.dtype())?.unsqueeze(2)?; // [I, J, 1]
        let zln = self.layer_norm_in.forward_nograd(&z)?; // [I, J, c_z]
        let proj = linear_cat_nograd(&self.projections(), &zln)?; // [I, J, 4C + c_z]
        let (proj2, m1, [pa, pb]) = self.gated_parts(&proj, &mask3, c)?;
        let a_cik = tri_gate_fwd(&proj2, &m1, &pa)?;
        let b_ckj = tri_gate_fwd(&proj2, &m1, &pb)?;
        let saved = TriMulProjSaved {
            z,
            zln,
            proj,
            mask3,
        };
        Ok((a_cik, b_ckj, saved))
    }

    /// The rest of [`Self::forward_saved`] from the (possibly gathered) channel-first operands:
    /// triangle product, `LN_out`, `linear_z`, the gate from `p`'s projection.
    pub fn combine_saved(
        &self,
        p: &TriMulProjSaved,
        a_cik: &Tensor,
        b_ckj: &Tensor,
    ) -> Result<(Tensor, TriMulCombSaved)> {
        let c = self.layer_norm_out.weight.dims1()?;
        let c_z = self.linear_g.out_dim();
        let (a_cik, b_ckj) = (a_cik.detach(), b_ckj.detach());
        // [C, I, J] → [I, J, C] (tiled transpose kernel on CUDA, a strided copy elsewhere).
        let (ci, i, j) = (a_cik.dim(0)?, a_cik.dim(1)?, b_ckj.dim(2)?);
        let x = a_cik.matmul(&b_ckj)?.reshape((1, ci, i * j))?;
        let x = transpose12(&x)?.reshape((i, j, ci))?;
        let xo = self.layer_norm_out.forward_nograd(&x)?;
        let y0 = self.linear_z.forward_nograd(&xo)?; // [I, J, c_z]
        let g = p.proj.narrow(2, 4 * c, c_z)?.contiguous()?;
        let y = gate_nograd(&y0, &g)?;
        let saved = TriMulCombSaved {
            g,
            a_cik,
            b_ckj,
            x,
            xo,
            y0,
        };
        Ok((y, saved))
    }

    /// Backward of [`Self::combine_saved`]: parameter gradients into `grads`, returns the
    /// cotangents `(da_cik, db_ckj, dg)` of the channel-first operands and the gate logits.
    pub fn combine_backward(
        &self,
        s: TriMulCombSaved,
        dy: &Tensor,
        grads: &mut GradStore,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let missing = || Error::Model("triangle multiplication backward: no dx".into());
        let dy = cast(&dy.detach(), s.x.dtype())?;
        let (dy0, dg) = gate_bwd(&s.y0, &s.g, &dy)?;
        let dxo = self
            .linear_z
            .backward(&s.xo, &dy0, grads, true)?
            .ok_or_else(missing)?;
        let dx = self.layer_norm_out.backward(&s.x, &dxo, grads)?; // [I, J, C]
        let (i, j, ci) = dx.dims3()?;
        let dx_cij = transpose12(&dx.reshape((1, i * j, ci))?)?.reshape((ci, i, j))?;
        let da_cik = dx_cij.matmul(&s.b_ckj.transpose(1, 2)?)?; // [C, I, K]
        let db_ckj = s.a_cik.transpose(1, 2)?.matmul(&dx_cij)?; // [C, K, J]
        Ok((da_cik, db_ckj, dg))
    }

    /// Backward of [`Self::project_saved`] given the cotangents of this rank's channel-first
    /// operands and of the gate logits `dg` `[I, J, c_z]` (the gating backward kernel
    /// [`tri_gate_bwd`] on CUDA, its twin elsewhere): parameter gradients into `grads`, returns
    /// `dz`.
    pub fn project_backward(
        &self,
        p: TriMulProjSaved,
        da_cik: &Tensor,
        db_ckj: &Tensor,
        dg: &Tensor,
        grads: &mut GradStore,
    ) -> Result<Tensor> {
        let missing = || Error::Model("triangle multiplication backward: no dz".into());
        let c = self.layer_norm_out.weight.dims1()?;
        let (proj2, m1, [pa, pb]) = self.gated_parts(&p.proj, &p.mask3, c)?;
        let (n, c_z) = (proj2.dims2()?.0, dg.dim(2)?);
        let dg2 = dg.reshape((n, c_z))?;
        let parts = [
            PartGrad {
                part: pa,
                d: da_cik,
            },
            PartGrad {
                part: pb,
                d: db_ckj,
            },
        ];
        let dproj = tri_gate_bwd(&proj2, &m1, &parts, &[(4 * c, &dg2)])?;
        drop((proj2, dg2));
        let dzln = linear_cat_backward(&self.projections(), &p.zln, &dproj, grads, true)?
            .ok_or_else(missing)?;
        drop(dproj);
        self.layer_norm_in.backward(&p.z, &dzln, grads)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::{random_tensor, randomize};
    use candle_core::{DType, Device};
    use candle_nn::VarMap;

    /// Hand-written vs autograd gradients in f64, outgoing and incoming, with the last two
    /// residues padded (their pair rows and columns masked) plus scattered zeros.
    #[test]
    fn manual_backward_matches_autograd_with_padding() {
        let dev = Device::Cpu;
        let (r, c_z, c) = (7, 6, 5);
        let mut mask = random_tensor(&[r, r], 1.0, 21, DType::F64, &dev)
            .unwrap()
            .ge(-0.7)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_vec2::<f64>()
            .unwrap();
        for (i, row) in mask.iter_mut().enumerate() {
            for (j, v) in row.iter_mut().enumerate() {
                if i >= r - 2 || j >= r - 2 {
                    *v = 0.0;
                }
            }
        }
        let mask = Tensor::new(mask, &dev).unwrap();
        for outgoing in [true, false] {
            let vm = VarMap::new();
            let vb = VarBuilder::from_varmap(&vm, DType::F64, &dev);
            let tm = TriangleMultiplication::new(vb, c_z, c, outgoing).unwrap();
            randomize(&vm, 3).unwrap();
            let z = random_tensor(&[r, r, c_z], 2.0, 5, DType::F64, &dev).unwrap();
            crate::model::vjp::assert_manual_matches_autograd(
                &vm,
                &z,
                |x| tm.forward(x, &mask),
                |x, dy, g| {
                    let (y, saved) = tm.forward_saved(x, &mask)?;
                    Ok((y, tm.backward(saved, dy, g)?))
                },
                1e-12,
            );
        }
    }
}
