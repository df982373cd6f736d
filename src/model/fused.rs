//! Fused CPU kernels (f32/f64) with analytic backward passes, used through the public functions
//! of `primitives` (`LayerNorm`, `softmax`, `softmax_with_biases`, `mul_const`). They keep far
//! fewer activations alive than the equivalent chains of candle ops and compute no gradients for
//! constant operands. Other devices use the composite candle ops instead.

use candle_core::{Tensor, D};

/// `y = (x − mean) / sqrt(var + eps) · w + b` over the last dimension (biased variance), fused on
/// CPU, with an analytic backward for `x`, `w` and `b`.
pub(crate) struct LayerNormOp {
    pub(crate) eps: f64,
}

fn layer_norm_rows<T: num_traits_lite::Float>(src: &[T], w: &[T], b: &[T], eps: f64) -> Vec<T> {
    let dim = w.len().max(1);
    let mut out = vec![T::zero(); src.len()];
    let n = T::from_f64(dim as f64);
    let eps = T::from_f64(eps);
    let work = |(x, y): (&[T], &mut [T])| {
        let mut sum = T::zero();
        for &v in x {
            sum = sum + v;
        }
        let mean = sum / n;
        let mut sq = T::zero();
        for &v in x {
            let d = v - mean;
            sq = sq + d * d;
        }
        let rstd = T::one() / (sq / n + eps).sqrt();
        for (((o, &v), &wi), &bi) in y.iter_mut().zip(x).zip(w).zip(b) {
            *o = (v - mean) * rstd * wi + bi;
        }
    };
    if src.len() >= 1 << 15 {
        use rayon::prelude::*;
        src.par_chunks(dim)
            .zip(out.par_chunks_mut(dim))
            .for_each(work);
    } else {
        src.chunks(dim).zip(out.chunks_mut(dim)).for_each(work);
    }
    out
}

impl candle_core::CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "ferrofold-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CpuStorage,
        l3: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage;
        let off = |l: &candle_core::Layout| {
            l.contiguous_offsets()
                .ok_or_else(|| candle_core::Error::Msg("layer norm: input not contiguous".into()))
        };
        let ((a1, e1), (a2, e2), (a3, e3)) = (off(l1)?, off(l2)?, off(l3)?);
        let dim = l1.dims().last().copied().unwrap_or(1);
        if e2 - a2 != dim || e3 - a3 != dim {
            candle_core::bail!("layer norm: weight/bias size != last dim {dim}");
        }
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(w), CpuStorage::F32(b)) => CpuStorage::F32(
                layer_norm_rows(&x[a1..e1], &w[a2..e2], &b[a3..e3], self.eps),
            ),
            (CpuStorage::F64(x), CpuStorage::F64(w), CpuStorage::F64(b)) => CpuStorage::F64(
                layer_norm_rows(&x[a1..e1], &w[a2..e2], &b[a3..e3], self.eps),
            ),
            _ => candle_core::bail!("layer norm: unsupported or mixed dtypes"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // x̂ and rstd recomputed from x; with gw = g·w:
        // dx = rstd · (gw − mean(gw) − x̂ · mean(gw · x̂)), dw = Σ_rows g·x̂, db = Σ_rows g.
        let c = w.elem_count();
        let mean = x.mean_keepdim(D::Minus1)?;
        let xc = x.broadcast_sub(&mean)?;
        let rstd = (xc.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?
            .sqrt()?
            .recip()?;
        let xhat = xc.broadcast_mul(&rstd)?;
        let gw = g.broadcast_mul(w)?;
        let gw_mean = gw.mean_keepdim(D::Minus1)?;
        let gwx_mean = (&gw * &xhat)?.mean_keepdim(D::Minus1)?;
        let dx = gw
            .broadcast_sub(&gw_mean)?
            .sub(&xhat.broadcast_mul(&gwx_mean)?)?
            .broadcast_mul(&rstd)?;
        let rows = g.elem_count() / c.max(1);
        let g2 = g.reshape((rows, c))?;
        let dw = (&g2 * xhat.reshape((rows, c))?)?.sum(0)?;
        let db = g2.sum(0)?;
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// `x * c` with `c` a strided (possibly zero-stride broadcast) view of `x`'s shape.
pub(crate) struct MulConst;

fn mul_const_rows<T: num_traits_lite::Float>(
    x: &[T],
    dims: &[usize],
    c: (&[T], &candle_core::Layout),
) -> Vec<T> {
    let k = dims.last().copied().unwrap_or(1).max(1);
    let mut out = vec![T::zero(); x.len()];
    let st = c.1.stride();
    let kc = st.last().copied().unwrap_or(0);
    let work = |(row, y): (usize, &mut [T])| {
        let xr = &x[row * k..(row + 1) * k];
        let o = row_offset(dims, st, c.1.start_offset(), row);
        for j in 0..k {
            y[j] = xr[j] * c.0[o + j * kc];
        }
    };
    if x.len() >= 1 << 16 {
        use rayon::prelude::*;
        out.par_chunks_mut(k).enumerate().for_each(work);
    } else {
        out.chunks_mut(k).enumerate().for_each(work);
    }
    out
}

impl candle_core::CustomOp2 for MulConst {
    fn name(&self) -> &'static str {
        "ferrofold-mul-const"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage;
        let (a, e) = l1
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("mul_const: input not contiguous".into()))?;
        if l2.dims() != l1.dims() {
            candle_core::bail!("mul_const: constant shape differs from the input");
        }
        let dims = l1.dims();
        let out = match (s1, s2) {
            (CpuStorage::F32(x), CpuStorage::F32(c)) => {
                CpuStorage::F32(mul_const_rows(&x[a..e], dims, (c, l2)))
            }
            (CpuStorage::F64(x), CpuStorage::F64(c)) => {
                CpuStorage::F64(mul_const_rows(&x[a..e], dims, (c, l2)))
            }
            _ => candle_core::bail!("mul_const: unsupported or mixed dtypes"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        c: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(g.mul(c)?), None))
    }
}

/// Fused `softmax(x + b1 + b2)` (CPU); `b1`, `b2` are strided (possibly zero-stride broadcast)
/// views of `x`'s shape.
pub(crate) struct BiasedSoftmax;

/// Offset of row `row` (all dims but the last) in a strided layout.
fn row_offset(dims: &[usize], strides: &[usize], start: usize, mut row: usize) -> usize {
    let mut off = start;
    for d in (0..dims.len().saturating_sub(1)).rev() {
        let i = row % dims[d];
        row /= dims[d];
        off += i * strides[d];
    }
    off
}

fn biased_softmax_rows<T: num_traits_lite::Float>(
    x: &[T],
    dims: &[usize],
    b1: (&[T], &candle_core::Layout),
    b2: (&[T], &candle_core::Layout),
) -> Vec<T> {
    let k = dims.last().copied().unwrap_or(1).max(1);
    let mut out = vec![T::zero(); x.len()];
    let (s1, s2) = (b1.1.stride(), b2.1.stride());
    let (k1, k2) = (s1[s1.len() - 1], s2[s2.len() - 1]);
    let work = |(row, y): (usize, &mut [T])| {
        let xr = &x[row * k..(row + 1) * k];
        let o1 = row_offset(dims, s1, b1.1.start_offset(), row);
        let o2 = row_offset(dims, s2, b2.1.start_offset(), row);
        let mut max = T::neg_infinity();
        for j in 0..k {
            // (x + b1) + b2: the order OpenFold adds mask bias then pair bias.
            let v = xr[j] + b1.0[o1 + j * k1] + b2.0[o2 + j * k2];
            y[j] = v;
            max = max.max(v);
        }
        let mut sum = T::zero();
        for v in y.iter_mut() {
            let e = (*v - max).exp();
            *v = e;
            sum = sum + e;
        }
        for v in y.iter_mut() {
            *v = *v / sum;
        }
    };
    if x.len() >= 1 << 15 {
        use rayon::prelude::*;
        out.par_chunks_mut(k).enumerate().for_each(work);
    } else {
        out.chunks_mut(k).enumerate().for_each(work);
    }
    out
}

impl candle_core::CustomOp3 for BiasedSoftmax {
    fn name(&self) -> &'static str {
        "ferrofold-biased-softmax"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
        s3: &candle_core::CpuStorage,
        l3: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage;
        let (a, e) = l1
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("softmax: input not contiguous".into()))?;
        if l2.dims() != l1.dims() || l3.dims() != l1.dims() {
            candle_core::bail!("biased softmax: bias shapes differ from the logits");
        }
        let dims = l1.dims();
        let out = match (s1, s2, s3) {
            (CpuStorage::F32(x), CpuStorage::F32(b1), CpuStorage::F32(b2)) => {
                CpuStorage::F32(biased_softmax_rows(&x[a..e], dims, (b1, l2), (b2, l3)))
            }
            (CpuStorage::F64(x), CpuStorage::F64(b1), CpuStorage::F64(b2)) => {
                CpuStorage::F64(biased_softmax_rows(&x[a..e], dims, (b1, l2), (b2, l3)))
            }
            _ => candle_core::bail!("biased softmax: unsupported or mixed dtypes"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        b1: &Tensor,
        b2: &Tensor,
        res: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let s = (g * res)?.sum_keepdim(D::Minus1)?;
        let dx = (res * g.broadcast_sub(&s)?)?;
        let d1 = b1.track_op().then(|| dx.clone());
        let d2 = b2.track_op().then(|| dx.clone());
        Ok((Some(dx), d1, d2))
    }
}

/// Fused last-dimension softmax (CPU) with an analytic backward.
pub(crate) struct SoftmaxLastDim;

fn softmax_rows<T: num_traits_lite::Float>(src: &[T], dim: usize) -> Vec<T> {
    let mut out = vec![T::zero(); src.len()];
    let work = |(x, y): (&[T], &mut [T])| {
        let mut max = T::neg_infinity();
        for &v in x {
            max = max.max(v);
        }
        let mut sum = T::zero();
        for (o, &v) in y.iter_mut().zip(x) {
            let e = (v - max).exp();
            *o = e;
            sum = sum + e;
        }
        for o in y.iter_mut() {
            *o = *o / sum;
        }
    };
    if src.len() >= 1 << 15 {
        use rayon::prelude::*;
        src.par_chunks(dim)
            .zip(out.par_chunks_mut(dim))
            .for_each(work);
    } else {
        src.chunks(dim).zip(out.chunks_mut(dim)).for_each(work);
    }
    out
}

impl candle_core::CustomOp1 for SoftmaxLastDim {
    fn name(&self) -> &'static str {
        "ferrofold-softmax-last-dim"
    }

    fn cpu_fwd(
        &self,
        storage: &candle_core::CpuStorage,
        layout: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage;
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("softmax: input not contiguous".into()))?;
        let dim = layout.dims().last().copied().unwrap_or(1).max(1);
        let out = match storage {
            CpuStorage::F32(v) => CpuStorage::F32(softmax_rows(&v[start..end], dim)),
            CpuStorage::F64(v) => CpuStorage::F64(softmax_rows(&v[start..end], dim)),
            _ => candle_core::bail!("softmax: unsupported dtype"),
        };
        Ok((out, layout.shape().clone()))
    }

    fn bwd(
        &self,
        _arg: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        // dx = y * (g - Σ_j g_j y_j)  (same formula as PyTorch's softmax backward).
        let s = (grad_res * res)?.sum_keepdim(D::Minus1)?;
        Ok(Some((res * grad_res.broadcast_sub(&s)?)?))
    }
}

/// The few float operations the fused CPU kernels need, for f32 and f64.
mod num_traits_lite {
    pub trait Float:
        Copy
        + Send
        + Sync
        + PartialOrd
        + std::ops::Add<Output = Self>
        + std::ops::Sub<Output = Self>
        + std::ops::Mul<Output = Self>
        + std::ops::Div<Output = Self>
    {
        fn zero() -> Self;
        fn one() -> Self;
        fn from_f64(v: f64) -> Self;
        fn sqrt(self) -> Self;
        fn neg_infinity() -> Self;
        fn exp(self) -> Self;
        fn max(self, other: Self) -> Self;
    }
    macro_rules! impl_float {
        ($t:ty) => {
            impl Float for $t {
                fn zero() -> Self {
                    0.0
                }
                fn one() -> Self {
                    1.0
                }
                fn from_f64(v: f64) -> Self {
                    v as $t
                }
                fn sqrt(self) -> Self {
                    <$t>::sqrt(self)
                }
                fn neg_infinity() -> Self {
                    <$t>::NEG_INFINITY
                }
                fn exp(self) -> Self {
                    <$t>::exp(self)
                }
                fn max(self, other: Self) -> Self {
                    <$t>::max(self, other)
                }
            }
        };
    }
    impl_float!(f32);
    impl_float!(f64);
}
