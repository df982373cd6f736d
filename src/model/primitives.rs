//! Primitives shared by every AF2 module: `Linear` with the AF2 initialisation schemes, a
//! differentiable `LayerNorm`, and a softmax with a correct backward.
//!
//! Parameter layout follows OpenFold/PyTorch: a linear weight is `[out, in]` and `y = x Wᵀ + b`, so
//! OpenFold state dicts load unchanged.

use candle_core::{DType, Tensor, D};
use candle_nn::{Init, VarBuilder};

use crate::error::Result;

/// AF2 initialisation schemes (supplement section 1.11.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinearInit {
    /// LeCun normal: N(0, 1/fan_in).
    Default,
    /// He normal: N(0, 2/fan_in), for layers followed by ReLU.
    Relu,
    /// Glorot uniform (used for attention q/k/v projections in OpenFold).
    Glorot,
    /// Weight 0, bias 1 (gating layers: start fully open).
    Gating,
    /// Weight 0, bias 0 (last layer of each residual branch: blocks start as identity).
    Final,
}

// DISCREPANCY: AF2 uses *truncated* normal initialisers; candle's `Init::Randn` is untruncated. Only
// the fresh-init distribution differs; loaded weights and all numerics are unaffected.
fn weight_init(init: LinearInit, fan_in: usize, fan_out: usize) -> Init {
    let fan_in = fan_in.max(1) as f64;
    match init {
        LinearInit::Default => Init::Randn {
            mean: 0.0,
            stdev: (1.0 / fan_in).sqrt(),
        },
        LinearInit::Relu => Init::Randn {
            mean: 0.0,
            stdev: (2.0 / fan_in).sqrt(),
        },
        LinearInit::Glorot => {
            let limit = (6.0 / (fan_in + fan_out as f64)).sqrt();
            Init::Uniform {
                lo: -limit,
                up: limit,
            }
        }
        LinearInit::Gating | LinearInit::Final => Init::Const(0.0),
    }
}

/// `y = x Wᵀ + b` over the last dimension of any-rank input.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`
    pub weight: Tensor,
    /// `[out]`
    pub bias: Option<Tensor>,
}

impl Linear {
    /// Build (or load) `vb.weight` `[c_out, c_in]` and, if `bias`, `vb.bias` `[c_out]`.
    pub fn new(
        vb: VarBuilder,
        c_in: usize,
        c_out: usize,
        bias: bool,
        init: LinearInit,
    ) -> Result<Self> {
        let weight = vb.get_with_hints((c_out, c_in), "weight", weight_init(init, c_in, c_out))?;
        let bias = if bias {
            let b0 = if init == LinearInit::Gating { 1.0 } else { 0.0 };
            Some(vb.get_with_hints(c_out, "bias", Init::Const(b0))?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    /// Output channels.
    pub fn out_dim(&self) -> usize {
        self.weight.dims()[0]
    }

    /// Apply to `x` `[*, c_in]` → `[*, c_out]`. Parameters are cast to `x`'s dtype (bf16 compute with
    /// f32 master weights: the gradient flows back to the f32 parameter through the cast).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let c_in = *dims.last().unwrap_or(&0);
        let c_out = self.out_dim();
        let n: usize = dims[..dims.len().saturating_sub(1)].iter().product();
        let w = cast(&self.weight, x.dtype())?;
        // Flatten to 2-D: matmul of rank >= 5 is not supported, and 2-D is the fastest path.
        let x2 = x.reshape((n, c_in))?;
        let mut y = x2.matmul(&w.t()?)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(&cast(b, x.dtype())?)?;
        }
        let mut out_dims = dims;
        if let Some(last) = out_dims.last_mut() {
            *last = c_out;
        }
        Ok(y.reshape(out_dims)?)
    }
}

/// Layer normalisation over the last dimension with a correct backward (candle's fused `LayerNorm`
/// cuts gradients). Biased variance, eps = 1e-5 as in OpenFold. Statistics are computed in f32 (or
/// f64 for f64 input) even for bf16 input.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    /// `vb.weight` (init 1) and `vb.bias` (init 0), both `[c]`.
    pub fn new(vb: VarBuilder, c: usize) -> Result<Self> {
        Self::with_eps(vb, c, 1e-5)
    }

    pub fn with_eps(vb: VarBuilder, c: usize, eps: f64) -> Result<Self> {
        let weight = vb.get_with_hints(c, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(c, "bias", Init::Const(0.0))?;
        Ok(Self { weight, bias, eps })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let stat_dtype = if dtype == DType::F64 {
            DType::F64
        } else {
            DType::F32
        };
        let xs = cast(x, stat_dtype)?;
        let w = cast(&self.weight, stat_dtype)?;
        let b = cast(&self.bias, stat_dtype)?;
        let y = if xs.device().is_cpu() {
            // One fused op with an analytic backward: the graph keeps only x (and the output).
            xs.contiguous()?.apply_op3(
                &w.contiguous()?,
                &b.contiguous()?,
                LayerNormOp { eps: self.eps },
            )?
        } else {
            let mean = xs.mean_keepdim(D::Minus1)?;
            let xc = xs.broadcast_sub(&mean)?;
            let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
            xc.broadcast_div(&(var + self.eps)?.sqrt()?)?
                .broadcast_mul(&w)?
                .broadcast_add(&b)?
        };
        cast(&y, dtype)
    }
}

/// Softmax over the last dimension, differentiable (never use `softmax_last_dim` in training).
///
/// On CPU for f32/f64 this is one fused op with an analytic backward (`dx = y·(g − Σ g·y)`), which
/// keeps only its output for the backward pass; elsewhere it is candle's composite softmax.
/// Computed in the activation dtype, as OpenFold does.
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) && x.rank() > 0 {
        Ok(x.contiguous()?.apply_op1(SoftmaxLastDim)?)
    } else {
        Ok(candle_nn::ops::softmax(x, D::Minus1)?)
    }
}

/// `y = (x − mean) / sqrt(var + eps) · w + b` over the last dimension (biased variance), fused on
/// CPU, with an analytic backward for `x`, `w` and `b`.
struct LayerNormOp {
    eps: f64,
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

/// `softmax(x + b_1 + b_2 + ...)` over the last dimension, the biases added in the given order
/// (each broadcastable to `x`). On CPU (f32/f64, at most two biases) one fused op: no broadcast
/// bias is materialised and neither are the biased logits; the backward gives `x` and every
/// tracked bias the same `dx = y·(g − Σ g·y)` (candle reduces it to each bias's shape).
pub fn softmax_with_biases(x: &Tensor, biases: &[&Tensor]) -> Result<Tensor> {
    let fused = x.device().is_cpu()
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && x.rank() > 0
        && biases.len() <= 2;
    if !fused {
        let mut a = x.clone();
        for b in biases {
            a = a.broadcast_add(b)?;
        }
        return softmax(&a);
    }
    let shape = x.shape().clone();
    let bias = |i: usize| -> Result<Tensor> {
        match biases.get(i) {
            Some(b) => Ok(cast(b, x.dtype())?.broadcast_as(shape.clone())?),
            None => Ok(Tensor::zeros((), x.dtype(), x.device())?.broadcast_as(shape.clone())?),
        }
    };
    Ok(x.contiguous()?
        .apply_op3(&bias(0)?, &bias(1)?, BiasedSoftmax)?)
}

/// Fused `softmax(x + b1 + b2)` (CPU); `b1`, `b2` are strided (possibly zero-stride broadcast)
/// views of `x`'s shape.
struct BiasedSoftmax;

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
struct SoftmaxLastDim;

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

/// Logistic sigmoid with a correct backward (`candle_nn::ops::sigmoid` is a CustomOp with `bwd`).
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::sigmoid(x)?)
}

/// Additive attention mask bias `inf * (mask - 1)`: 0 where `mask == 1`, `-inf` where `mask == 0`.
/// Computed as one affine op `mask * inf - inf`, which is exact for 0/1 masks.
pub fn mask_bias(mask: &Tensor, inf: f64) -> Result<Tensor> {
    Ok(mask.affine(inf, -inf)?)
}

/// Cast only when needed (keeps the graph small in the common case).
pub fn cast(x: &Tensor, dtype: DType) -> Result<Tensor> {
    if x.dtype() == dtype {
        Ok(x.clone())
    } else {
        Ok(x.to_dtype(dtype)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};
    use candle_nn::VarMap;

    #[test]
    fn linear_matches_manual_and_inits() {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F64, &dev);
        let lin = Linear::new(vb.pp("l"), 3, 2, true, LinearInit::Gating).unwrap();
        assert_eq!(
            lin.weight.sum_all().unwrap().to_scalar::<f64>().unwrap(),
            0.0
        );
        let b = lin.bias.as_ref().unwrap().to_vec1::<f64>().unwrap();
        assert_eq!(b, vec![1.0, 1.0]);
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F64, &dev);
        let lin = Linear::new(vb.pp("l"), 3, 2, true, LinearInit::Default).unwrap();
        let x = Tensor::arange(0.0f64, 24.0, &dev)
            .unwrap()
            .reshape((2, 2, 2, 3))
            .unwrap();
        let y = lin.forward(&x).unwrap();
        assert_eq!(y.dims(), &[2, 2, 2, 2]);
        let w = lin.weight.to_vec2::<f64>().unwrap();
        let xv = x.flatten_to(2).unwrap().to_vec2::<f64>().unwrap();
        let yv = y.flatten_to(2).unwrap().to_vec2::<f64>().unwrap();
        for (xr, yr) in xv.iter().zip(&yv) {
            for o in 0..2 {
                let want: f64 = (0..3).map(|i| xr[i] * w[o][i]).sum::<f64>();
                assert!((yr[o] - want).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn layer_norm_normalises_and_has_gradients() {
        let dev = Device::Cpu;
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F64, &dev);
        let ln = LayerNorm::new(vb.pp("ln"), 4).unwrap();
        let x = Var::from_tensor(
            &Tensor::new(&[[1.0f64, 2.0, 3.0, 10.0], [0.5, -1.0, 2.0, 0.0]], &dev).unwrap(),
        )
        .unwrap();
        let y = ln.forward(x.as_tensor()).unwrap();
        let m = y
            .mean_keepdim(D::Minus1)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap();
        assert!(m.to_scalar::<f64>().unwrap() < 1e-12);
        let g = Tensor::new(&[[0.3f64, -1.0, 2.0, 0.1], [1.0, 0.2, -0.5, 0.7]], &dev).unwrap();
        let loss = (&y * &g).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        for (name, v) in vm.data().lock().unwrap().iter() {
            let gv = grads
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("no grad for {name}"));
            assert!(
                gv.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap()
                    > 0.0
            );
        }
        // Finite differences on the input.
        let gx = grads.get(x.as_tensor()).unwrap().to_vec2::<f64>().unwrap();
        let base = x.as_tensor().to_vec2::<f64>().unwrap();
        let f = |v: &Vec<Vec<f64>>| -> f64 {
            let t = Tensor::new(v.clone(), &dev).unwrap();
            (ln.forward(&t).unwrap() * &g)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let h = 1e-6;
        for r in 0..2 {
            for c in 0..4 {
                let mut p = base.clone();
                p[r][c] += h;
                let mut m = base.clone();
                m[r][c] -= h;
                let fd = (f(&p) - f(&m)) / (2.0 * h);
                assert!((fd - gx[r][c]).abs() < 1e-6, "fd {fd} vs {}", gx[r][c]);
            }
        }
    }

    #[test]
    fn fused_softmax_matches_composite_forward_and_backward() {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f64, 3.0, (3, 4, 70), &dev).unwrap();
        // One fully-masked row (every logit offset by -1e9), as in padded attention.
        let x = x
            .slice_assign(
                &[0..1, 0..1, 0..70],
                &(x.narrow(0, 0, 1).unwrap().narrow(1, 0, 1).unwrap() - 1e9).unwrap(),
            )
            .unwrap();
        let g = Tensor::randn(0f64, 1.0, (3, 4, 70), &dev).unwrap();
        let xv = Var::from_tensor(&x).unwrap();
        let y1 = softmax(xv.as_tensor()).unwrap();
        let g1 = (&y1 * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let y2 = candle_nn::ops::softmax(xv.as_tensor(), D::Minus1).unwrap();
        let g2 = (&y2 * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let d = |a: &Tensor, b: &Tensor| {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        assert!(d(&y1, &y2) < 1e-15);
        let (a, b) = (
            g1.get(xv.as_tensor()).unwrap(),
            g2.get(xv.as_tensor()).unwrap(),
        );
        assert!(d(a, b) < 1e-14, "{}", d(a, b));
        // f32 path and a non-contiguous input.
        let xt = x.to_dtype(DType::F32).unwrap().transpose(1, 2).unwrap();
        let y = softmax(&xt).unwrap();
        let want = candle_nn::ops::softmax(&xt, D::Minus1).unwrap();
        assert!(
            d(
                &y.to_dtype(DType::F64).unwrap(),
                &want.to_dtype(DType::F64).unwrap()
            ) < 1e-6
        );
    }

    #[test]
    fn biased_softmax_matches_composite() {
        let dev = Device::Cpu;
        let (b, h, q, k) = (3, 2, 5, 40);
        let x = Var::from_tensor(&Tensor::randn(0f64, 2.0, (b, h, q, k), &dev).unwrap()).unwrap();
        // Mask bias [B, 1, 1, K] (constant) with one fully-masked batch, pair bias [1, H, Q, K].
        let mut mask = vec![1f64; b * k];
        for (i, m) in mask.iter_mut().enumerate() {
            if i < k || i % 7 == 3 {
                *m = 0.0;
            }
        }
        let mask = Tensor::from_vec(mask, (b, 1, 1, k), &dev).unwrap();
        let mb = mask_bias(&mask, 1e9).unwrap();
        let pb = Var::from_tensor(&Tensor::randn(0f64, 1.0, (1, h, q, k), &dev).unwrap()).unwrap();
        let g = Tensor::randn(0f64, 1.0, (b, h, q, k), &dev).unwrap();
        let y1 = softmax_with_biases(x.as_tensor(), &[&mb, pb.as_tensor()]).unwrap();
        let a = x
            .as_tensor()
            .broadcast_add(&mb)
            .unwrap()
            .broadcast_add(pb.as_tensor())
            .unwrap();
        let y2 = candle_nn::ops::softmax(&a, D::Minus1).unwrap();
        let d = |a: &Tensor, b: &Tensor| {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        assert!(d(&y1, &y2) < 1e-15, "{}", d(&y1, &y2));
        let g1 = (&y1 * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&y2 * &g).unwrap().sum_all().unwrap().backward().unwrap();
        for v in [&x, &pb] {
            let (a, b) = (
                g1.get(v.as_tensor()).unwrap(),
                g2.get(v.as_tensor()).unwrap(),
            );
            assert_eq!(a.dims(), v.dims());
            assert!(d(a, b) < 1e-14, "{}", d(a, b));
        }
        // No bias / one bias / f32.
        let y0 = softmax_with_biases(x.as_tensor(), &[]).unwrap();
        assert!(d(&y0, &softmax(x.as_tensor()).unwrap()) < 1e-15);
        let xf = x.as_tensor().to_dtype(DType::F32).unwrap();
        let yf =
            softmax_with_biases(&xf, &[&pb.as_tensor().to_dtype(DType::F32).unwrap()]).unwrap();
        let want = candle_nn::ops::softmax(
            &xf.broadcast_add(&pb.as_tensor().to_dtype(DType::F32).unwrap())
                .unwrap(),
            D::Minus1,
        )
        .unwrap();
        assert!(
            d(
                &yf.to_dtype(DType::F64).unwrap(),
                &want.to_dtype(DType::F64).unwrap()
            ) < 1e-6
        );
    }
}
