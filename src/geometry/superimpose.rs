//! Optimal rigid superposition (Kabsch problem) by Horn's quaternion method:
//! B. K. P. Horn, "Closed-form solution of absolute orientation using unit quaternions",
//! J. Opt. Soc. Am. A 4(4), 629–642 (1987). The rotation is the unit quaternion that is the
//! eigenvector of the largest eigenvalue of a symmetric 4x4 matrix built from the 3x3 cross-
//! covariance; the eigenproblem is solved with cyclic Jacobi rotations (always a proper rotation,
//! so no reflection fix-up is needed, unlike SVD-based Kabsch).

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};

/// `y ≈ rot · x + trans` for the mobile points `x` onto the reference points `y`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Superposition {
    /// Row-major 3x3 rotation.
    pub rot: [[f64; 3]; 3],
    pub trans: [f64; 3],
    /// RMSD between the transformed mobile points and the reference.
    pub rmsd: f64,
}

impl Superposition {
    /// Apply to one point.
    pub fn apply(&self, p: [f64; 3]) -> [f64; 3] {
        let r = &self.rot;
        let mut out = [0.0; 3];
        for (i, o) in out.iter_mut().enumerate() {
            *o = r[i][0] * p[0] + r[i][1] * p[1] + r[i][2] * p[2] + self.trans[i];
        }
        out
    }
}

fn centroid(p: &[[f64; 3]]) -> [f64; 3] {
    let mut c = [0.0; 3];
    for q in p {
        for k in 0..3 {
            c[k] += q[k];
        }
    }
    let n = p.len().max(1) as f64;
    c.map(|v| v / n)
}

/// Eigen-decomposition of a symmetric 4x4 matrix by cyclic Jacobi rotations.
/// Returns (eigenvalues, eigenvectors as columns of `v`).
#[allow(clippy::needless_range_loop)]
fn jacobi4(mut a: [[f64; 4]; 4]) -> ([f64; 4], [[f64; 4]; 4]) {
    let mut v = [[0.0; 4]; 4];
    for (i, row) in v.iter_mut().enumerate() {
        row[i] = 1.0;
    }
    for _sweep in 0..100 {
        let off: f64 = (0..4)
            .flat_map(|i| (0..4).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i][j] * a[i][j])
            .sum();
        let scale: f64 = (0..4).map(|i| a[i][i] * a[i][i]).sum::<f64>() + off;
        if off <= 1e-30 * scale.max(1e-300) {
            break;
        }
        for p in 0..3 {
            for q in (p + 1)..4 {
                if a[p][q] == 0.0 {
                    continue;
                }
                let theta = (a[q][q] - a[p][p]) / (2.0 * a[p][q]);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                for k in 0..4 {
                    let akp = a[k][p];
                    let akq = a[k][q];
                    a[k][p] = c * akp - s * akq;
                    a[k][q] = s * akp + c * akq;
                }
                for k in 0..4 {
                    let apk = a[p][k];
                    let aqk = a[q][k];
                    a[p][k] = c * apk - s * aqk;
                    a[q][k] = s * apk + c * aqk;
                }
                for row in v.iter_mut() {
                    let vkp = row[p];
                    let vkq = row[q];
                    row[p] = c * vkp - s * vkq;
                    row[q] = s * vkp + c * vkq;
                }
            }
        }
    }
    ([a[0][0], a[1][1], a[2][2], a[3][3]], v)
}

/// Rotation matrix of a unit quaternion (w, x, y, z).
pub fn quat_to_matrix(q: [f64; 4]) -> [[f64; 3]; 3] {
    let [w, x, y, z] = q;
    [
        [
            w * w + x * x - y * y - z * z,
            2.0 * (x * y - w * z),
            2.0 * (x * z + w * y),
        ],
        [
            2.0 * (x * y + w * z),
            w * w - x * x + y * y - z * z,
            2.0 * (y * z - w * x),
        ],
        [
            2.0 * (x * z - w * y),
            2.0 * (y * z + w * x),
            w * w - x * x - y * y + z * z,
        ],
    ]
}

/// The rigid motion minimising `Σ |rot·mobile_i + trans − reference_i|²` (Horn 1987).
pub fn kabsch(reference: &[[f64; 3]], mobile: &[[f64; 3]]) -> Result<Superposition> {
    if reference.len() != mobile.len() {
        return Err(Error::Msg(format!(
            "superposition: {} reference vs {} mobile points",
            reference.len(),
            mobile.len()
        )));
    }
    if reference.is_empty() {
        return Err(Error::Msg("superposition of zero points".into()));
    }
    let cy = centroid(reference);
    let cx = centroid(mobile);
    // S[a][b] = Σ x_a y_b over centred coordinates
    let mut s = [[0.0; 3]; 3];
    for (x, y) in mobile.iter().zip(reference) {
        for a in 0..3 {
            for b in 0..3 {
                s[a][b] += (x[a] - cx[a]) * (y[b] - cy[b]);
            }
        }
    }
    let (sxx, sxy, sxz) = (s[0][0], s[0][1], s[0][2]);
    let (syx, syy, syz) = (s[1][0], s[1][1], s[1][2]);
    let (szx, szy, szz) = (s[2][0], s[2][1], s[2][2]);
    let n = [
        [sxx + syy + szz, syz - szy, szx - sxz, sxy - syx],
        [syz - szy, sxx - syy - szz, sxy + syx, szx + sxz],
        [szx - sxz, sxy + syx, -sxx + syy - szz, syz + szy],
        [sxy - syx, szx + sxz, syz + szy, -sxx - syy + szz],
    ];
    let (vals, vecs) = jacobi4(n);
    let mut best = 0;
    for i in 1..4 {
        if vals[i] > vals[best] {
            best = i;
        }
    }
    let mut q = [vecs[0][best], vecs[1][best], vecs[2][best], vecs[3][best]];
    let qn = q.iter().map(|v| v * v).sum::<f64>().sqrt();
    q = q.map(|v| v / qn);
    let rot = quat_to_matrix(q);
    let mut trans = [0.0; 3];
    for i in 0..3 {
        trans[i] = cy[i] - (rot[i][0] * cx[0] + rot[i][1] * cx[1] + rot[i][2] * cx[2]);
    }
    let mut sup = Superposition {
        rot,
        trans,
        rmsd: 0.0,
    };
    let ss: f64 = mobile
        .iter()
        .zip(reference)
        .map(|(x, y)| {
            let p = sup.apply(*x);
            (0..3).map(|k| (p[k] - y[k]).powi(2)).sum::<f64>()
        })
        .sum();
    sup.rmsd = (ss / mobile.len() as f64).sqrt();
    Ok(sup)
}

fn points(t: &Tensor) -> Result<Vec<[f64; 3]>> {
    let v: Vec<f64> = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    Ok(v.chunks_exact(3).map(|c| [c[0], c[1], c[2]]).collect())
}

/// OpenFold `superimpose(reference, coords, mask)` (no gradient): superpose `coords` `[*, N, 3]` onto
/// `reference` `[*, N, 3]` using only the atoms with `mask` `[*, N]` > 0. Returns the transformed
/// coordinates (0 where masked out) and the RMSD over the masked atoms `[*]` (NaN where no atom
/// is masked in).
pub fn superimpose(reference: &Tensor, coords: &Tensor, mask: &Tensor) -> Result<(Tensor, Tensor)> {
    let dims = reference.dims().to_vec();
    if dims.len() < 2 || dims[dims.len() - 1] != 3 || coords.dims() != dims.as_slice() {
        return Err(Error::Msg(format!(
            "superimpose: shapes {:?} and {:?} must agree and end with 3",
            dims,
            coords.dims()
        )));
    }
    let n = dims[dims.len() - 2];
    let r = points(reference)?;
    let c = points(coords)?;
    let m: Vec<f64> = mask.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    if m.len() != r.len() {
        return Err(Error::Msg("superimpose: mask shape does not match".into()));
    }
    let batches = r.len().checked_div(n).unwrap_or(0);
    let mut out = vec![0.0f64; r.len() * 3];
    let mut rmsds = Vec::with_capacity(batches);
    for b in 0..batches {
        let idx: Vec<usize> = (b * n..(b + 1) * n).filter(|&i| m[i] > 0.0).collect();
        let rr: Vec<[f64; 3]> = idx.iter().map(|&i| r[i]).collect();
        let cc: Vec<[f64; 3]> = idx.iter().map(|&i| c[i]).collect();
        if idx.is_empty() {
            // nothing to superpose: zeros and an undefined (NaN) RMSD rather than an error
            rmsds.push(f64::NAN);
            continue;
        }
        let sup = kabsch(&rr, &cc)?;
        for &i in &idx {
            let p = sup.apply(c[i]);
            out[i * 3..i * 3 + 3].copy_from_slice(&p);
        }
        rmsds.push(sup.rmsd);
    }
    let dev = reference.device();
    let dtype = reference.dtype();
    let sup = Tensor::from_vec(out, dims.clone(), dev)?.to_dtype(dtype)?;
    let rmsd = Tensor::from_vec(rmsds, &dims[..dims.len() - 2], dev)?.to_dtype(dtype)?;
    Ok((sup, rmsd))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rot_about(axis: [f64; 3], angle: f64) -> [[f64; 3]; 3] {
        let n = (axis.iter().map(|v| v * v).sum::<f64>()).sqrt();
        let h = angle / 2.0;
        let (s, c) = h.sin_cos();
        quat_to_matrix([c, s * axis[0] / n, s * axis[1] / n, s * axis[2] / n])
    }

    #[test]
    #[allow(clippy::needless_range_loop)]
    fn recovers_known_motion() {
        let pts: Vec<[f64; 3]> = (0..9)
            .map(|i| {
                let f = i as f64;
                [f.sin() * 3.0 + f, (f * 1.7).cos() * 2.0, f * f * 0.1 - 1.0]
            })
            .collect();
        for (axis, ang) in [
            ([1.0, 2.0, 3.0], 2.5),
            ([0.0, 0.0, 1.0], std::f64::consts::PI),
            ([1.0, -1.0, 0.5], 1e-3),
        ] {
            let r = rot_about(axis, ang);
            let t = [4.0, -2.0, 7.5];
            let moved: Vec<[f64; 3]> = pts
                .iter()
                .map(|p| {
                    let mut o = [0.0; 3];
                    for i in 0..3 {
                        o[i] = r[i][0] * p[0] + r[i][1] * p[1] + r[i][2] * p[2] + t[i];
                    }
                    o
                })
                .collect();
            let sup = kabsch(&moved, &pts).unwrap();
            for i in 0..3 {
                for j in 0..3 {
                    assert!((sup.rot[i][j] - r[i][j]).abs() < 1e-10, "rot {i}{j}");
                }
                assert!((sup.trans[i] - t[i]).abs() < 1e-9, "trans {i}");
            }
            assert!(sup.rmsd < 1e-9, "rmsd {}", sup.rmsd);
        }
    }
}
