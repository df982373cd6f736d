//! Rigid-body transforms on candle tensors (AF2 supplement section 1.8, OpenFold `rigid_utils`).
//!
//! Conventions (those of the OpenFold goldens):
//! * rotation matrices are `[*, 3, 3]`, acting on column vectors: `x_global = R · x_local + t`;
//! * quaternions are `[*, 4]` as `(w, x, y, z)` with the Hamilton product, `R(q)` the standard matrix;
//! * a [`Rigid`] is `(rots [*, 3, 3], trans [*, 3])`; batch dims broadcast in [`Rigid::compose`] and
//!   [`Rigid::apply`], so a `[N, 1, 1]`-shaped rigid can be applied to `[N, H, P, 3]` points;
//! * `to_tensor_7` is `(q, t)` (`[*, 7]`), `to_tensor_4x4` is `[[R, t], [0, 0, 0, 1]]`.
//!
//! All operations are written with elementwise products and sums (no matmul), so they work at any
//! rank and every op has a correct candle backward.

use candle_core::{DType, Device, Tensor, D};

use crate::error::{Error, Result};

/// Entry `[..., i]` of the last dimension, keeping it as size 1.
fn comp(x: &Tensor, i: usize) -> Result<Tensor> {
    Ok(x.narrow(D::Minus1, i, 1)?)
}

/// Entry `[..., i, j]` of a `[*, 3, 3]` (or `[*, 4, 4]`) tensor, shape `[*, 1]`.
fn entry(m: &Tensor, i: usize, j: usize) -> Result<Tensor> {
    Ok(m.narrow(D::Minus2, i, 1)?
        .narrow(D::Minus1, j, 1)?
        .squeeze(D::Minus1)?)
}

/// Build `[*, 3, 3]` from nine `[*, 1]` entries in row-major order.
fn mat3_from_entries(e: &[Tensor]) -> Result<Tensor> {
    let flat = Tensor::cat(e, D::Minus1)?; // [*, 9]
    let mut shape = flat.dims().to_vec();
    shape.pop();
    shape.push(3);
    shape.push(3);
    Ok(flat.reshape(shape)?)
}

/// `R(q)` for (not necessarily unit) quaternions `q` `[*, 4]` = (w, x, y, z) → `[*, 3, 3]`.
///
/// Written in the homogeneous form (`w²+x²−y²−z²` on the diagonal), as OpenFold's `quat_to_rot`.
pub fn quat_to_rot(q: &Tensor) -> Result<Tensor> {
    let (w, x, y, z) = (comp(q, 0)?, comp(q, 1)?, comp(q, 2)?, comp(q, 3)?);
    let (ww, xx, yy, zz) = (w.sqr()?, x.sqr()?, y.sqr()?, z.sqr()?);
    let two = |t: Tensor| -> Result<Tensor> { Ok((t * 2.0)?) };
    let (xy, xz, yz) = ((&x * &y)?, (&x * &z)?, (&y * &z)?);
    let (wx, wy, wz) = ((&w * &x)?, (&w * &y)?, (&w * &z)?);
    let e = [
        (((&ww + &xx)? - &yy)? - &zz)?,
        two((&xy - &wz)?)?,
        two((&xz + &wy)?)?,
        two((&xy + &wz)?)?,
        (((&ww - &xx)? + &yy)? - &zz)?,
        two((&yz - &wx)?)?,
        two((&xz - &wy)?)?,
        two((&yz + &wx)?)?,
        (((&ww - &xx)? - &yy)? + &zz)?,
    ];
    mat3_from_entries(&e)
}

/// Unit quaternion (w ≥ 0) of a rotation matrix `[*, 3, 3]` → `[*, 4]`.
///
/// Shepperd's method, branch-free: the four candidate formulas are all evaluated (with clamped
/// square-root arguments) and the numerically best one is selected per element with `where_cond`,
/// so the result is differentiable almost everywhere.
pub fn rot_to_quat(r: &Tensor) -> Result<Tensor> {
    let m = |i, j| entry(r, i, j);
    let (r00, r11, r22) = (m(0, 0)?, m(1, 1)?, m(2, 2)?);
    let (r01, r10, r02, r20, r12, r21) =
        (m(0, 1)?, m(1, 0)?, m(0, 2)?, m(2, 0)?, m(1, 2)?, m(2, 1)?);
    // 4·w², 4·x², 4·y², 4·z² (up to rounding)
    let tw = (((&r00 + &r11)? + &r22)? + 1.0)?;
    let tx = (((&r00 - &r11)? - &r22)? + 1.0)?;
    let ty = (((&r11 - &r00)? - &r22)? + 1.0)?;
    let tz = (((&r22 - &r00)? - &r11)? + 1.0)?;
    let s_w = (&r21 - &r12)?; // 4wx
    let s_wy = (&r02 - &r20)?; // 4wy
    let s_wz = (&r10 - &r01)?; // 4wz
    let s_xy = (&r01 + &r10)?; // 4xy
    let s_xz = (&r02 + &r20)?; // 4xz
    let s_yz = (&r21 + &r12)?; // 4yz
    let cand = |t: &Tensor, own: usize, others: [(usize, &Tensor); 3]| -> Result<Tensor> {
        // own component = sqrt(t)/2, the others = s / (2 sqrt(t))
        let st = t.clamp(1e-12, f64::INFINITY)?.sqrt()?;
        let mut parts: Vec<Option<Tensor>> = vec![None, None, None, None];
        parts[own] = Some((&st * 0.5)?);
        for (k, s) in others {
            parts[k] = Some(s.broadcast_div(&(&st * 2.0)?)?);
        }
        let parts: Vec<Tensor> = parts.into_iter().flatten().collect();
        Ok(Tensor::cat(&parts, D::Minus1)?)
    };
    let qw = cand(&tw, 0, [(1, &s_w), (2, &s_wy), (3, &s_wz)])?;
    let qx = cand(&tx, 1, [(0, &s_w), (2, &s_xy), (3, &s_xz)])?;
    let qy = cand(&ty, 2, [(0, &s_wy), (1, &s_xy), (3, &s_yz)])?;
    let qz = cand(&tz, 3, [(0, &s_wz), (1, &s_xz), (2, &s_yz)])?;
    // Pick the candidate with the largest t.
    let ts = Tensor::cat(&[&tw, &tx, &ty, &tz], D::Minus1)?; // [*, 4]
    let best = ts.argmax_keepdim(D::Minus1)?; // [*, 1] u32
    let shape4 = qw.dims().to_vec();
    let sel = |k: u32| -> Result<Tensor> {
        Ok(best
            .eq(&Tensor::full(k, best.dims(), best.device())?)?
            .broadcast_as(shape4.as_slice())?
            .contiguous()?)
    };
    let q = sel(0)?.where_cond(
        &qw,
        &sel(1)?.where_cond(&qx, &sel(2)?.where_cond(&qy, &qz)?)?,
    )?;
    // Canonical sign: w >= 0.
    let w = comp(&q, 0)?;
    let sign = w
        .ge(&w.zeros_like()?)?
        .where_cond(&w.ones_like()?, &w.ones_like()?.neg()?)?;
    Ok(q.broadcast_mul(&sign)?)
}

/// Hamilton product `a ⊗ b` of `[*, 4]` quaternions (batch dims broadcast).
pub fn quat_multiply(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (aw, ax, ay, az) = (comp(a, 0)?, comp(a, 1)?, comp(a, 2)?, comp(a, 3)?);
    let (bw, bx, by, bz) = (comp(b, 0)?, comp(b, 1)?, comp(b, 2)?, comp(b, 3)?);
    let p = |u: &Tensor, v: &Tensor| -> Result<Tensor> { Ok(u.broadcast_mul(v)?) };
    let w = (((p(&aw, &bw)? - p(&ax, &bx)?)? - p(&ay, &by)?)? - p(&az, &bz)?)?;
    let x = (((p(&aw, &bx)? + p(&ax, &bw)?)? + p(&ay, &bz)?)? - p(&az, &by)?)?;
    let y = (((p(&aw, &by)? - p(&ax, &bz)?)? + p(&ay, &bw)?)? + p(&az, &bx)?)?;
    let z = (((p(&aw, &bz)? + p(&ax, &by)?)? - p(&ay, &bx)?)? + p(&az, &bw)?)?;
    Ok(Tensor::cat(&[w, x, y, z], D::Minus1)?)
}

/// `q ⊗ (0, v)` for a pure-vector quaternion `v` `[*, 3]`.
pub fn quat_multiply_by_vec(q: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (w, x, y, z) = (comp(q, 0)?, comp(q, 1)?, comp(q, 2)?, comp(q, 3)?);
    let (b, c, d) = (comp(v, 0)?, comp(v, 1)?, comp(v, 2)?);
    let p = |u: &Tensor, v: &Tensor| -> Result<Tensor> { Ok(u.broadcast_mul(v)?) };
    let nw = ((p(&x, &b)?.neg()? - p(&y, &c)?)? - p(&z, &d)?)?;
    let nx = ((p(&w, &b)? + p(&y, &d)?)? - p(&z, &c)?)?;
    let ny = ((p(&w, &c)? - p(&x, &d)?)? + p(&z, &b)?)?;
    let nz = ((p(&w, &d)? + p(&x, &c)?)? - p(&y, &b)?)?;
    Ok(Tensor::cat(&[nw, nx, ny, nz], D::Minus1)?)
}

/// `q / |q|` over the last dim.
pub fn quat_normalize(q: &Tensor) -> Result<Tensor> {
    let n = q.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
    Ok(q.broadcast_div(&n)?)
}

/// `A · B` for `[*, 3, 3]` matrices (batch dims broadcast).
pub fn rot_matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    // out[.., i, j] = Σ_k a[.., i, k] b[.., k, j]:  a[.., i, k, 1] * b[.., 1, k, j], summed over k.
    let prod = a
        .unsqueeze(D::Minus1)?
        .broadcast_mul(&b.unsqueeze(b.rank() - 2)?)?;
    Ok(prod.sum(prod.rank() - 2)?)
}

/// `R · v` for `R` `[*, 3, 3]` and `v` `[*, 3]` (batch dims broadcast).
pub fn rot_vec_mul(r: &Tensor, v: &Tensor) -> Result<Tensor> {
    let prod = r.broadcast_mul(&v.unsqueeze(v.rank() - 1)?)?; // [*, 3, 3]
    Ok(prod.sum(D::Minus1)?)
}

/// `Rᵀ` of `[*, 3, 3]`.
pub fn rot_transpose(r: &Tensor) -> Result<Tensor> {
    Ok(r.transpose(r.rank() - 2, r.rank() - 1)?)
}

/// Cross product of `[*, 3]` vectors (batch dims broadcast).
pub fn cross(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (a0, a1, a2) = (comp(a, 0)?, comp(a, 1)?, comp(a, 2)?);
    let (b0, b1, b2) = (comp(b, 0)?, comp(b, 1)?, comp(b, 2)?);
    let p = |u: &Tensor, v: &Tensor| -> Result<Tensor> { Ok(u.broadcast_mul(v)?) };
    let c0 = (p(&a1, &b2)? - p(&a2, &b1)?)?;
    let c1 = (p(&a2, &b0)? - p(&a0, &b2)?)?;
    let c2 = (p(&a0, &b1)? - p(&a1, &b0)?)?;
    Ok(Tensor::cat(&[c0, c1, c2], D::Minus1)?)
}

/// Identity rotations `[*shape, 3, 3]`.
pub fn identity_rots(shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
    let eye = Tensor::eye(3, dtype, device)?;
    let mut full = shape.to_vec();
    full.extend([3, 3]);
    Ok(eye.broadcast_as(full)?.contiguous()?)
}

/// A rigid transform `x ↦ R·x + t`.
#[derive(Debug, Clone)]
pub struct Rigid {
    /// `[*, 3, 3]`
    pub rots: Tensor,
    /// `[*, 3]`
    pub trans: Tensor,
}

impl Rigid {
    pub fn new(rots: Tensor, trans: Tensor) -> Result<Self> {
        let (rd, td) = (rots.dims(), trans.dims());
        if rd.len() < 2 || rd[rd.len() - 2..] != [3, 3] || td.last() != Some(&3) {
            return Err(Error::Model(format!(
                "Rigid::new: rots {rd:?} must be [*,3,3] and trans {td:?} must be [*,3]"
            )));
        }
        Ok(Self { rots, trans })
    }

    /// The identity transform with batch shape `shape`.
    pub fn identity(shape: &[usize], dtype: DType, device: &Device) -> Result<Self> {
        let mut ts = shape.to_vec();
        ts.push(3);
        Ok(Self {
            rots: identity_rots(shape, dtype, device)?,
            trans: Tensor::zeros(ts, dtype, device)?,
        })
    }

    /// Batch shape (`trans` without its last dim).
    pub fn batch_shape(&self) -> Vec<usize> {
        let d = self.trans.dims();
        d[..d.len() - 1].to_vec()
    }

    /// From quaternions `[*, 4]` (normalised first if `normalize`) and translations `[*, 3]`.
    pub fn from_quat(q: &Tensor, trans: &Tensor, normalize: bool) -> Result<Self> {
        let q = if normalize {
            quat_normalize(q)?
        } else {
            q.clone()
        };
        Self::new(quat_to_rot(&q)?, trans.clone())
    }

    /// From `[*, 7]` = `(q, t)`.
    pub fn from_tensor_7(t7: &Tensor, normalize: bool) -> Result<Self> {
        let q = t7.narrow(D::Minus1, 0, 4)?;
        let t = t7.narrow(D::Minus1, 4, 3)?;
        Self::from_quat(&q, &t, normalize)
    }

    /// `[*, 7]` = `(q, t)`, the quaternion recovered from the matrix ([`rot_to_quat`], w ≥ 0).
    pub fn to_tensor_7(&self) -> Result<Tensor> {
        Ok(Tensor::cat(
            &[rot_to_quat(&self.rots)?, self.trans.clone()],
            D::Minus1,
        )?)
    }

    /// From homogeneous `[*, 4, 4]` matrices.
    pub fn from_tensor_4x4(m: &Tensor) -> Result<Self> {
        let rots = m.narrow(D::Minus2, 0, 3)?.narrow(D::Minus1, 0, 3)?;
        let trans = m
            .narrow(D::Minus2, 0, 3)?
            .narrow(D::Minus1, 3, 1)?
            .squeeze(D::Minus1)?;
        Self::new(rots, trans)
    }

    /// Homogeneous `[*, 4, 4]` matrices `[[R, t], [0, 0, 0, 1]]`.
    pub fn to_tensor_4x4(&self) -> Result<Tensor> {
        let top = Tensor::cat(&[&self.rots, &self.trans.unsqueeze(D::Minus1)?], D::Minus1)?; // [*, 3, 4]
        let mut bshape = self.batch_shape();
        bshape.extend([1, 4]);
        let (dt, dev) = (self.trans.dtype(), self.trans.device());
        let last = Tensor::new(&[0f64, 0.0, 0.0, 1.0], dev)?
            .to_dtype(dt)?
            .broadcast_as(bshape)?;
        Ok(Tensor::cat(&[top, last.contiguous()?], D::Minus2)?)
    }

    /// `self ∘ other`: `x ↦ R₁(R₂x + t₂) + t₁` (batch dims broadcast).
    pub fn compose(&self, other: &Rigid) -> Result<Rigid> {
        let rots = rot_matmul(&self.rots, &other.rots)?;
        let trans = rot_vec_mul(&self.rots, &other.trans)?.broadcast_add(&self.trans)?;
        Ok(Rigid { rots, trans })
    }

    /// `self ∘ (R, 0)`: compose with a pure rotation.
    pub fn compose_rot(&self, rots: &Tensor) -> Result<Rigid> {
        let rots = rot_matmul(&self.rots, rots)?;
        let shape = rots.dims()[..rots.rank() - 1].to_vec();
        Ok(Rigid {
            trans: self.trans.broadcast_as(shape)?,
            rots,
        })
    }

    /// The inverse `x ↦ Rᵀ(x − t)`.
    pub fn invert(&self) -> Result<Rigid> {
        let rt = rot_transpose(&self.rots)?;
        let trans = rot_vec_mul(&rt, &self.trans)?.neg()?;
        Ok(Rigid { rots: rt, trans })
    }

    /// `R·x + t` for points `[*, 3]` (batch dims broadcast).
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        Ok(rot_vec_mul(&self.rots, x)?.broadcast_add(&self.trans)?)
    }

    /// `Rᵀ(x − t)` for points `[*, 3]` (batch dims broadcast).
    pub fn invert_apply(&self, x: &Tensor) -> Result<Tensor> {
        let d = x.broadcast_sub(&self.trans)?;
        rot_vec_mul(&rot_transpose(&self.rots)?, &d)
    }

    /// Translation multiplied by `factor` (e.g. `trans_scale_factor`).
    pub fn scale_translation(&self, factor: f64) -> Result<Rigid> {
        Ok(Rigid {
            rots: self.rots.clone(),
            trans: (&self.trans * factor)?,
        })
    }

    /// Rotation detached from the graph (`stop_rot_gradient`), translation kept.
    pub fn stop_rot_gradient(&self) -> Rigid {
        Rigid {
            rots: self.rots.detach(),
            trans: self.trans.clone(),
        }
    }

    /// Insert a batch dim at `dim` (counted in the batch shape).
    pub fn unsqueeze(&self, dim: usize) -> Result<Rigid> {
        Ok(Rigid {
            rots: self.rots.unsqueeze(dim)?,
            trans: self.trans.unsqueeze(dim)?,
        })
    }

    /// Narrow batch dim `dim` (batch dims lead in both parts, so the index is shared).
    pub fn narrow(&self, dim: usize, start: usize, len: usize) -> Result<Rigid> {
        Ok(Rigid {
            rots: self.rots.narrow(dim, start, len)?,
            trans: self.trans.narrow(dim, start, len)?,
        })
    }

    /// Concatenate along batch dim `dim`.
    pub fn cat(rs: &[Rigid], dim: usize) -> Result<Rigid> {
        let rots: Vec<&Tensor> = rs.iter().map(|r| &r.rots).collect();
        let trans: Vec<&Tensor> = rs.iter().map(|r| &r.trans).collect();
        Ok(Rigid {
            rots: Tensor::cat(&rots, dim)?,
            trans: Tensor::cat(&trans, dim)?,
        })
    }

    /// Cast both parts.
    pub fn to_dtype(&self, dtype: DType) -> Result<Rigid> {
        Ok(Rigid {
            rots: self.rots.to_dtype(dtype)?,
            trans: self.trans.to_dtype(dtype)?,
        })
    }

    /// OpenFold's `Rigid.from_3_points(p_neg_x_axis, origin, p_xy_plane, eps)` (Gram–Schmidt):
    /// origin at `origin`, x axis along `origin − p_neg_x_axis`, `p_xy_plane` in the xy plane with
    /// y > 0. Norms are `sqrt(|v|² + eps)`.
    pub fn from_3_points(
        p_neg_x_axis: &Tensor,
        origin: &Tensor,
        p_xy_plane: &Tensor,
        eps: f64,
    ) -> Result<Rigid> {
        let e0 = (origin - p_neg_x_axis)?;
        let e1 = (p_xy_plane - origin)?;
        let e0 = e0.broadcast_div(&(e0.sqr()?.sum_keepdim(D::Minus1)? + eps)?.sqrt()?)?;
        let dot = (&e0 * &e1)?.sum_keepdim(D::Minus1)?;
        let e1 = (e1 - e0.broadcast_mul(&dot)?)?;
        let e1 = e1.broadcast_div(&(e1.sqr()?.sum_keepdim(D::Minus1)? + eps)?.sqrt()?)?;
        let e2 = cross(&e0, &e1)?;
        // Columns are the basis vectors.
        let rots = Tensor::stack(&[e0, e1, e2], D::Minus1)?;
        Rigid::new(rots, origin.clone())
    }

    /// Algorithm 21 `rigidFrom3Points(x1 = N, x2 = CA, x3 = C)`: origin CA, x axis CA→C, N in the
    /// xy plane with y > 0 (the AF2 backbone frame). Computed as OpenFold's `atom37_to_frames` does:
    /// `from_3_points(C, CA, N)` followed by a rotation of π about y (`diag(−1, 1, −1)`).
    pub fn from_3_points_af2(n: &Tensor, ca: &Tensor, c: &Tensor, eps: f64) -> Result<Rigid> {
        let r = Self::from_3_points(c, ca, n, eps)?;
        let cols = [
            r.rots.narrow(D::Minus1, 0, 1)?.neg()?,
            r.rots.narrow(D::Minus1, 1, 1)?,
            r.rots.narrow(D::Minus1, 2, 1)?.neg()?,
        ];
        Rigid::new(Tensor::cat(&cols, D::Minus1)?, r.trans)
    }
}

/// A rigid transform that keeps its rotation as a quaternion (the StructureModule's state):
/// Algorithm 23 updates compose in quaternion space and renormalise.
#[derive(Debug, Clone)]
pub struct QuatRigid {
    /// Unit quaternions `[*, 4]` (w, x, y, z).
    pub quats: Tensor,
    /// `[*, 3]`
    pub trans: Tensor,
}

impl QuatRigid {
    /// Identity (q = (1,0,0,0), t = 0) with batch shape `shape`.
    pub fn identity(shape: &[usize], dtype: DType, device: &Device) -> Result<Self> {
        let mut qs = shape.to_vec();
        qs.push(4);
        let mut ts = shape.to_vec();
        ts.push(3);
        let one = Tensor::new(&[1f64, 0.0, 0.0, 0.0], device)?.to_dtype(dtype)?;
        Ok(Self {
            quats: one.broadcast_as(qs)?.contiguous()?,
            trans: Tensor::zeros(ts, dtype, device)?,
        })
    }

    /// Rotation matrices `[*, 3, 3]`.
    pub fn rots(&self) -> Result<Tensor> {
        quat_to_rot(&self.quats)
    }

    /// As a matrix [`Rigid`].
    pub fn to_rigid(&self) -> Result<Rigid> {
        Rigid::new(self.rots()?, self.trans.clone())
    }

    /// Algorithm 23 (BackboneUpdate) composition with `update` `[*, 6]` = `(b, c, d, tx, ty, tz)`:
    /// `q' = normalise(q + q ⊗ (0, b, c, d))` (= `q ⊗ (1, b, c, d)` renormalised) and
    /// `t' = t + R(q)·(tx, ty, tz)`.
    pub fn compose_q_update_vec(&self, update: &Tensor) -> Result<QuatRigid> {
        let qv = update.narrow(D::Minus1, 0, 3)?;
        let tv = update.narrow(D::Minus1, 3, 3)?;
        let quats = quat_normalize(&(&self.quats + quat_multiply_by_vec(&self.quats, &qv)?)?)?;
        let trans = (&self.trans + rot_vec_mul(&self.rots()?, &tv)?)?;
        Ok(QuatRigid { quats, trans })
    }

    /// `[*, 7]` = `(q, t)`.
    pub fn to_tensor_7(&self) -> Result<Tensor> {
        Ok(Tensor::cat(&[&self.quats, &self.trans], D::Minus1)?)
    }

    pub fn scale_translation(&self, factor: f64) -> Result<QuatRigid> {
        Ok(QuatRigid {
            quats: self.quats.clone(),
            trans: (&self.trans * factor)?,
        })
    }

    /// Quaternion detached from the graph, translation kept.
    pub fn stop_rot_gradient(&self) -> QuatRigid {
        QuatRigid {
            quats: self.quats.detach(),
            trans: self.trans.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn dev() -> Device {
        Device::Cpu
    }

    fn max_abs(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    }

    fn random_quats(n: usize, seed: u64) -> Tensor {
        // Deterministic pseudo-random quaternions (LCG), normalised.
        let mut s = seed;
        let mut v = Vec::with_capacity(n * 4);
        for _ in 0..n * 4 {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            v.push(((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0);
        }
        quat_normalize(&Tensor::from_vec(v, (n, 4), &dev()).unwrap()).unwrap()
    }

    fn random_vecs(n: usize, seed: u64) -> Tensor {
        let mut s = seed;
        let mut v = Vec::with_capacity(n * 3);
        for _ in 0..n * 3 {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            v.push(((s >> 11) as f64 / (1u64 << 53) as f64) * 10.0 - 5.0);
        }
        Tensor::from_vec(v, (n, 3), &dev()).unwrap()
    }

    fn det3(r: &Tensor) -> Tensor {
        let c = cross(
            &r.narrow(D::Minus1, 0, 1)
                .unwrap()
                .squeeze(D::Minus1)
                .unwrap(),
            &r.narrow(D::Minus1, 1, 1)
                .unwrap()
                .squeeze(D::Minus1)
                .unwrap(),
        )
        .unwrap();
        let c2 = r
            .narrow(D::Minus1, 2, 1)
            .unwrap()
            .squeeze(D::Minus1)
            .unwrap();
        (c * c2).unwrap().sum(D::Minus1).unwrap()
    }

    #[test]
    fn rotations_are_orthonormal_with_det_one() {
        let r = quat_to_rot(&random_quats(50, 1)).unwrap();
        let rrt = rot_matmul(&r, &rot_transpose(&r).unwrap()).unwrap();
        let eye = identity_rots(&[50], DType::F64, &dev()).unwrap();
        assert!(max_abs(&rrt, &eye) < 1e-14);
        let d = det3(&r);
        assert!(max_abs(&d, &d.ones_like().unwrap()) < 1e-14);
        // Known value: 90° about z maps x to y.
        let h = std::f64::consts::FRAC_1_SQRT_2;
        let q = Tensor::new(&[[h, 0.0, 0.0, h]], &dev()).unwrap();
        let v = rot_vec_mul(
            &quat_to_rot(&q).unwrap(),
            &Tensor::new(&[[1.0f64, 0.0, 0.0]], &dev()).unwrap(),
        )
        .unwrap();
        assert!(max_abs(&v, &Tensor::new(&[[0.0f64, 1.0, 0.0]], &dev()).unwrap()) < 1e-15);
    }

    #[test]
    fn quaternion_product_matches_matrix_product() {
        let a = random_quats(20, 2);
        let b = random_quats(20, 3);
        let lhs = quat_to_rot(&quat_multiply(&a, &b).unwrap()).unwrap();
        let rhs = rot_matmul(&quat_to_rot(&a).unwrap(), &quat_to_rot(&b).unwrap()).unwrap();
        assert!(max_abs(&lhs, &rhs) < 1e-14);
        // q ⊗ (0, v) equals the full product with a pure quaternion.
        let v = random_vecs(20, 4);
        let pure = Tensor::cat(
            &[v.zeros_like().unwrap().narrow(1, 0, 1).unwrap(), v.clone()],
            1,
        )
        .unwrap();
        assert!(
            max_abs(
                &quat_multiply_by_vec(&a, &v).unwrap(),
                &quat_multiply(&a, &pure).unwrap()
            ) < 1e-15
        );
    }

    #[test]
    fn quaternion_rotation_round_trip() {
        let q = random_quats(200, 5);
        let sign = comp(&q, 0)
            .unwrap()
            .ge(0.0)
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        let sign = ((sign * 2.0).unwrap() - 1.0).unwrap();
        let q = q.broadcast_mul(&sign).unwrap();
        let back = rot_to_quat(&quat_to_rot(&q).unwrap()).unwrap();
        assert!(max_abs(&back, &q) < 1e-12, "{}", max_abs(&back, &q));
        // Covers every Shepperd branch: 180° rotations about x, y, z and the identity.
        let special = Tensor::new(
            &[
                [1.0f64, 0.0, 0.0, 0.0],
                [0.0, 1.0, 0.0, 0.0],
                [0.0, 0.0, 1.0, 0.0],
                [0.0, 0.0, 0.0, 1.0],
            ],
            &dev(),
        )
        .unwrap();
        let r = quat_to_rot(&special).unwrap();
        let back = quat_to_rot(&rot_to_quat(&r).unwrap()).unwrap();
        assert!(max_abs(&back, &r) < 1e-12);
    }

    #[test]
    fn rot_to_quat_gradient_matches_finite_differences() {
        let r0 = quat_to_rot(&random_quats(6, 21)).unwrap();
        let c = random_vecs(8, 22).reshape((6, 4)).unwrap();
        let rv = Var::from_tensor(&r0).unwrap();
        let loss = (rot_to_quat(rv.as_tensor()).unwrap() * &c)
            .unwrap()
            .sum_all()
            .unwrap();
        let g = loss
            .backward()
            .unwrap()
            .get(rv.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap();
        let g: Vec<f64> = g.to_vec1().unwrap();
        let base: Vec<f64> = r0.flatten_all().unwrap().to_vec1().unwrap();
        let f = |v: &[f64]| -> f64 {
            let r = Tensor::from_vec(v.to_vec(), (6, 3, 3), &dev()).unwrap();
            (rot_to_quat(&r).unwrap() * &c)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let h = 1e-6;
        for k in 0..base.len() {
            let (mut p, mut m) = (base.clone(), base.clone());
            p[k] += h;
            m[k] -= h;
            let fd = (f(&p) - f(&m)) / (2.0 * h);
            assert!((fd - g[k]).abs() < 1e-6, "entry {k}: fd {fd} vs {}", g[k]);
        }
    }

    #[test]
    fn compose_invert_apply_identities() {
        let a = Rigid::from_quat(&random_quats(30, 6), &random_vecs(30, 7), false).unwrap();
        let b = Rigid::from_quat(&random_quats(30, 8), &random_vecs(30, 9), false).unwrap();
        let x = random_vecs(30, 10);
        // (a∘b)(x) = a(b(x))
        let lhs = a.compose(&b).unwrap().apply(&x).unwrap();
        let rhs = a.apply(&b.apply(&x).unwrap()).unwrap();
        assert!(max_abs(&lhs, &rhs) < 1e-12);
        // a∘a⁻¹ = id
        let id = a.compose(&a.invert().unwrap()).unwrap();
        let eye = Rigid::identity(&[30], DType::F64, &dev()).unwrap();
        assert!(max_abs(&id.rots, &eye.rots) < 1e-14);
        assert!(max_abs(&id.trans, &eye.trans) < 1e-13);
        // invert_apply ∘ apply = id and apply ∘ invert_apply = id
        assert!(max_abs(&a.invert_apply(&a.apply(&x).unwrap()).unwrap(), &x) < 1e-13);
        assert!(max_abs(&a.apply(&a.invert_apply(&x).unwrap()).unwrap(), &x) < 1e-13);
        assert!(
            max_abs(
                &a.invert().unwrap().apply(&x).unwrap(),
                &a.invert_apply(&x).unwrap()
            ) < 1e-13
        );
        // 4x4 and 7 round trips
        let m = a.to_tensor_4x4().unwrap();
        assert_eq!(m.dims(), &[30, 4, 4]);
        let a2 = Rigid::from_tensor_4x4(&m).unwrap();
        assert!(max_abs(&a2.rots, &a.rots) == 0.0 && max_abs(&a2.trans, &a.trans) == 0.0);
        let a3 = Rigid::from_tensor_7(&a.to_tensor_7().unwrap(), false).unwrap();
        assert!(max_abs(&a3.rots, &a.rots) < 1e-12 && max_abs(&a3.trans, &a.trans) == 0.0);
        // Broadcasting: a [30,1] rigid applied to [30,4,3] points.
        let pts = random_vecs(120, 11).reshape((30, 4, 3)).unwrap();
        let out = a.unsqueeze(1).unwrap().apply(&pts).unwrap();
        let one = a
            .apply(&pts.narrow(1, 2, 1).unwrap().squeeze(1).unwrap())
            .unwrap();
        assert!(max_abs(&out.narrow(1, 2, 1).unwrap().squeeze(1).unwrap(), &one) < 1e-15);
    }

    #[test]
    fn frames_from_three_points_recover_known_frame() {
        // Build a known AF2 frame T and local backbone atoms; check rigidFrom3Points recovers T.
        let t = Rigid::from_quat(&random_quats(10, 12), &random_vecs(10, 13), false).unwrap();
        let n_local = Tensor::new(&[[-0.525f64, 1.363, 0.0]], &dev())
            .unwrap()
            .broadcast_as((10, 3))
            .unwrap();
        let ca_local = Tensor::zeros((10, 3), DType::F64, &dev()).unwrap();
        let c_local = Tensor::new(&[[1.526f64, 0.0, 0.0]], &dev())
            .unwrap()
            .broadcast_as((10, 3))
            .unwrap();
        let (n, ca, c) = (
            t.apply(&n_local).unwrap(),
            t.apply(&ca_local).unwrap(),
            t.apply(&c_local).unwrap(),
        );
        let f = Rigid::from_3_points_af2(&n, &ca, &c, 1e-20).unwrap();
        assert!(max_abs(&f.rots, &t.rots) < 1e-12);
        assert!(max_abs(&f.trans, &t.trans) < 1e-12);
        // OpenFold variant: x axis from N to CA.
        let g = Rigid::from_3_points(&n, &ca, &c, 1e-20).unwrap();
        let x_local = g.invert_apply(&c).unwrap();
        let xv = x_local.to_vec2::<f64>().unwrap();
        for r in xv {
            assert!(r[2].abs() < 1e-12 && r[1] > 0.0);
        }
        let n_in_g = g.invert_apply(&n).unwrap().to_vec2::<f64>().unwrap();
        for r in n_in_g {
            assert!(r[0] < 0.0 && r[1].abs() < 1e-12 && r[2].abs() < 1e-12);
        }
    }

    #[test]
    fn backbone_update_and_stop_gradient() {
        let q0 = QuatRigid::identity(&[4], DType::F64, &dev()).unwrap();
        let upd = Var::from_tensor(
            &Tensor::new(&[[0.1f64, -0.2, 0.3, 1.0, 2.0, 3.0]; 4], &dev()).unwrap(),
        )
        .unwrap();
        let q1 = q0.compose_q_update_vec(upd.as_tensor()).unwrap();
        // (1, b, c, d) normalised.
        let want =
            quat_normalize(&Tensor::new(&[[1.0f64, 0.1, -0.2, 0.3]; 4], &dev()).unwrap()).unwrap();
        assert!(max_abs(&q1.quats, &want) < 1e-15);
        // Second update: the translation is rotated by the first rotation.
        let q2 = q1.compose_q_update_vec(upd.as_tensor()).unwrap();
        let want_t = (&q1.trans + rot_vec_mul(&q1.rots().unwrap(), &q1.trans).unwrap()).unwrap();
        assert!(max_abs(&q2.trans, &want_t) < 1e-14);
        // Stop-gradient: no gradient reaches the update through the rotation, only through trans.
        let stopped = q1.stop_rot_gradient();
        let loss = stopped.quats.sum_all().unwrap();
        let g = loss.backward().unwrap();
        assert!(g.get(upd.as_tensor()).is_none());
        let loss = stopped.trans.sum_all().unwrap();
        let g = loss.backward().unwrap();
        assert!(g.get(upd.as_tensor()).is_some());
    }
}
