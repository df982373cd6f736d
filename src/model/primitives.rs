//! Primitives shared by every AF2 module: `Linear` with the AF2 initialisation schemes, a
//! differentiable `LayerNorm`, and a softmax with a correct backward.
//!
//! Parameter layout follows OpenFold/PyTorch: a linear weight is `[out, in]` and `y = x Wᵀ + b`, so
//! OpenFold state dicts load unchanged.

use candle_core::{DType, Tensor, D};
use candle_nn::{Init, VarBuilder};

use super::fused::{BiasedSoftmax, LayerNormOp, MulConst, SoftmaxLastDim};
use crate::error::Result;
use crate::kernels::permute::Contig;

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
        let x2 = x.contig()?.reshape((n, c_in))?;
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
///
/// CPU: one fused op with an analytic backward. CUDA (f32/bf16, `c ≤ 1024`): the fused NVRTC
/// kernel of [`crate::kernels::layer_norm`] (x in its own dtype, f32 parameters), unless
/// [`crate::kernels::set_fused`]`(false)` / `FERROFOLD_FUSED_KERNELS=0`; otherwise the composite
/// [`layer_norm_twin`].
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
        if x.device().is_cpu() {
            let dtype = x.dtype();
            let stat_dtype = if dtype == DType::F64 {
                DType::F64
            } else {
                DType::F32
            };
            let xs = cast(x, stat_dtype)?;
            let w = cast(&self.weight, stat_dtype)?;
            let b = cast(&self.bias, stat_dtype)?;
            // One fused op with an analytic backward: the graph keeps only x (and the output).
            let y = xs.contig()?.apply_op3(
                &w.contig()?,
                &b.contig()?,
                LayerNormOp { eps: self.eps },
            )?;
            return cast(&y, dtype);
        }
        if crate::kernels::fused_enabled() {
            // CUDA: one fused kernel (x in its own dtype, f32 parameters and statistics).
            if let Some(y) =
                crate::kernels::layer_norm::layer_norm(x, &self.weight, &self.bias, self.eps)?
            {
                return Ok(y);
            }
        }
        layer_norm_twin(x, &self.weight, &self.bias, self.eps)
    }
}

/// Composite (plain candle ops) LayerNorm over the last dim: the twin of the fused kernels.
/// Statistics in f32 (f64 for f64 input); output in `x`'s dtype.
pub fn layer_norm_twin(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let stat_dtype = if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let xs = cast(x, stat_dtype)?;
    let w = cast(weight, stat_dtype)?;
    let b = cast(bias, stat_dtype)?;
    let mean = xs.mean_keepdim(D::Minus1)?;
    let xc = xs.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xc
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .broadcast_mul(&w)?
        .broadcast_add(&b)?;
    cast(&y, dtype)
}

/// Softmax over the last dimension, differentiable (never use `softmax_last_dim` in training).
///
/// On CPU for f32/f64 this is one fused op with an analytic backward (`dx = y·(g − Σ g·y)`), which
/// keeps only its output for the backward pass. On CUDA (f32/bf16) the fused kernel of
/// [`crate::kernels::softmax`] (f32 math, output in `x`'s dtype) unless the fused kernels are
/// switched off; otherwise candle's composite softmax ([`softmax_twin`]).
pub fn softmax(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) && x.rank() > 0 {
        return Ok(x.contig()?.apply_op1(SoftmaxLastDim)?);
    }
    if !x.device().is_cpu() && crate::kernels::fused_enabled() {
        if let Some(y) = crate::kernels::softmax::softmax(x)? {
            return Ok(y);
        }
    }
    softmax_twin(x)
}

/// Composite last-dim softmax (candle's `softmax`, correct gradients): the twin of the fused
/// kernels.
pub fn softmax_twin(x: &Tensor) -> Result<Tensor> {
    Ok(candle_nn::ops::softmax(x, D::Minus1)?)
}

/// `x * c` where `c` is a constant (mask, dropout mask, normaliser, cotangent) broadcastable to
/// `x`: no gradient is computed for `c`.
///
/// candle's `Mul` backward always computes the gradient of both operands; for a constant operand
/// that is a wasted activation-sized product that, never being consumed, also stays alive (with
/// the graph it references) until the whole backward pass ends. On CPU (f32/f64) this is a custom
/// op whose backward is `g * c` only; elsewhere plain `broadcast_mul` on a detached `c`.
pub fn mul_const(x: &Tensor, c: &Tensor) -> Result<Tensor> {
    let c = cast(&c.detach(), x.dtype())?;
    if !(x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) && x.track_op()) {
        return Ok(x.broadcast_mul(&c)?);
    }
    let cb = c.broadcast_as(x.shape())?;
    Ok(x.contig()?.apply_op2(&cb, MulConst)?)
}

/// `softmax(x + b_1 + b_2 + ...)` over the last dimension, the biases added in the given order
/// (each broadcastable to `x`). On CPU (f32/f64, at most two biases) one fused op: no broadcast
/// bias is materialised and neither are the biased logits; the backward gives `x` and every
/// tracked bias the same `dx = y·(g − Σ g·y)` (candle reduces it to each bias's shape). On CUDA
/// (f32/bf16, at most two biases) the fused kernel of [`crate::kernels::softmax`] (biases read
/// through their strides, f32 math) unless the fused kernels are switched off; otherwise the
/// composite [`softmax_with_biases_twin`].
pub fn softmax_with_biases(x: &Tensor, biases: &[&Tensor]) -> Result<Tensor> {
    let fused = x.device().is_cpu()
        && matches!(x.dtype(), DType::F32 | DType::F64)
        && x.rank() > 0
        && biases.len() <= 2;
    if !fused {
        if !x.device().is_cpu() && crate::kernels::fused_enabled() {
            if let Some(y) = crate::kernels::softmax::softmax_with_biases(x, biases)? {
                return Ok(y);
            }
        }
        return softmax_with_biases_twin(x, biases);
    }
    let shape = x.shape().clone();
    let bias = |i: usize| -> Result<Tensor> {
        match biases.get(i) {
            Some(b) => Ok(cast(b, x.dtype())?.broadcast_as(shape.clone())?),
            None => Ok(Tensor::zeros((), x.dtype(), x.device())?.broadcast_as(shape.clone())?),
        }
    };
    Ok(x.contig()?.apply_op3(&bias(0)?, &bias(1)?, BiasedSoftmax)?)
}

/// Composite `softmax(x + b_1 + ...)` (broadcast adds in `x`'s dtype, then [`softmax`] on CPU or
/// [`softmax_twin`] elsewhere): the twin of the fused kernels.
pub fn softmax_with_biases_twin(x: &Tensor, biases: &[&Tensor]) -> Result<Tensor> {
    let mut a = x.clone();
    for b in biases {
        a = a.broadcast_add(b)?;
    }
    if a.device().is_cpu() {
        softmax(&a)
    } else {
        softmax_twin(&a)
    }
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

    #[test]
    fn mul_const_matches_broadcast_mul_and_skips_constant_grad() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f64, 1.0, (4, 3, 50), &dev).unwrap()).unwrap();
        let c = Tensor::randn(0f64, 1.0, (4, 1, 50), &dev).unwrap();
        let g = Tensor::randn(0f64, 1.0, (4, 3, 50), &dev).unwrap();
        let y = mul_const(x.as_tensor(), &c).unwrap();
        let want = x.as_tensor().broadcast_mul(&c).unwrap();
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
        assert_eq!(d(&y, &want), 0.0);
        let gs = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let gx = gs.get(x.as_tensor()).unwrap();
        assert_eq!(d(gx, &g.broadcast_mul(&c).unwrap()), 0.0);
        // A transposed (non-contiguous) constant.
        let ct = Tensor::randn(0f64, 1.0, (50, 3, 4), &dev)
            .unwrap()
            .permute((2, 1, 0))
            .unwrap();
        let y = mul_const(x.as_tensor(), &ct).unwrap();
        assert_eq!(d(&y, &(x.as_tensor() * &ct).unwrap()), 0.0);
    }
}
