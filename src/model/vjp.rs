//! Hand-written backward passes ("manual VJPs") for the trunk.
//!
//! candle's `Tensor::backward` gives every edge of the graph its own zero tensor and then adds the
//! incoming gradient into it (`GradStore::or_insert` + `add`): one full-size memset and one
//! full-size add per edge, on top of the op's own backward. For the Evoformer block that is most of
//! the backward pass (measured with `ncu` on H100, one block at 128×256 in bf16, forward and
//! backward: 549 `badd` launches taking 35.8 of 55.7 ms of kernel time).
//!
//! Modules with a hand-written backward therefore expose, next to `forward`:
//! - `forward_saved(..) -> (output, Saved)`: the forward on detached inputs and parameters (no
//!   graph is built), keeping only what the backward needs;
//! - `backward(Saved, d_out, &mut GradStore) -> d_inputs`: explicit formulas for the input
//!   gradients; parameter gradients are added into the [`GradStore`] keyed by the parameters'
//!   `Var` tensors (the store the optimiser reads).
//!
//! This file holds the shared pieces: the backward of [`Linear`], [`LayerNorm`], softmax, the gate
//! and residual dropout (fused CUDA kernels where they apply, the same formulas as candle ops
//! elsewhere), and [`autograd_vjp`], which runs a closure under candle's autograd for the paths
//! that have no hand-written backward (the twins with fused kernels off, f64 LayerNorm on CUDA).

use candle_core::backprop::GradStore;
use candle_core::{CustomOp3, DType, Tensor, Var, D};

use super::fused::LayerNormOp;
use super::primitives::{cast, LayerNorm, Linear};
use super::remat::{backward_vars, vjp_loss};
use crate::error::{Error, Result};
use crate::kernels::bias_act::bias_add;
use crate::kernels::permute::Contig;
use crate::kernels::wgrad::matmul_tn_f32;

/// The first tensor of `v` (a closure's single output or input gradient).
pub fn first(v: Vec<Tensor>) -> Result<Tensor> {
    v.into_iter()
        .next()
        .ok_or_else(|| Error::Model("vjp: no tensor".into()))
}

/// Add `g` to the gradient of `param` in `grads` (cast to the parameter's dtype, reshaped to its
/// shape).
pub fn add_param_grad(grads: &mut GradStore, param: &Tensor, g: &Tensor) -> Result<()> {
    if g.elem_count() != param.elem_count() {
        return Err(Error::Model(format!(
            "parameter gradient of shape {:?} for a parameter of shape {:?}",
            g.dims(),
            param.dims()
        )));
    }
    let g = cast(&g.detach(), param.dtype())?.reshape(param.shape())?;
    let total = match grads.remove(param) {
        Some(old) => (old + g)?,
        None => g,
    };
    grads.insert(param, total);
    Ok(())
}

/// `Σ_rows x` of a 2-D `[n, c]` tensor → `[c]`. On CUDA a `[1, n] × [n, c]` matmul (f32
/// accumulation in cuBLAS, deterministic); elsewhere candle's sum.
/// `in_f32`: a 16-bit `x2`'s sum returned in f32 (on CUDA from the GEMM's f32 accumulator, see
/// [`crate::kernels::wgrad`]).
fn column_sum(x2: &Tensor, in_f32: bool) -> Result<Tensor> {
    let (n, c) = x2.dims2()?;
    if x2.device().is_cuda() {
        if in_f32 && matches!(x2.dtype(), DType::BF16 | DType::F16) {
            let ones = Tensor::ones((n, 1), x2.dtype(), x2.device())?;
            return Ok(matmul_tn_f32(&ones, x2)?.reshape(c)?);
        }
        let ones = Tensor::ones((1, n), x2.dtype(), x2.device())?;
        return Ok(ones.matmul(&x2.contig()?)?.reshape(c)?);
    }
    Ok(x2.sum(0)?)
}

impl Linear {
    /// [`Linear::forward`] without a graph: the input and the parameters are read detached (see
    /// [`LinearCat::forward_nograd`]: one fused bias pass on CUDA).
    pub fn forward_nograd(&self, x: &Tensor) -> Result<Tensor> {
        LinearCat::new(&[self]).forward_nograd(x)
    }

    /// `x Wᵀ` without the bias and without a graph: `x` `[*, c_in]` → `[*, c_out]` (the weight
    /// cast to `x`'s dtype).
    pub fn matmul_nograd(&self, x: &Tensor) -> Result<Tensor> {
        let mut dims = x.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = self.out_dim();
        }
        Ok(LinearCat::new(&[self]).matmul_nograd(x)?.reshape(dims)?)
    }

    /// Backward of [`Linear::forward`] at input `x` with output cotangent `dy`: adds `dW = dyᵀ x`
    /// and `db = Σ dy` to `grads` and returns `dx = dy W` when `need_dx`.
    pub fn backward(
        &self,
        x: &Tensor,
        dy: &Tensor,
        grads: &mut GradStore,
        need_dx: bool,
    ) -> Result<Option<Tensor>> {
        LinearCat::new(&[self]).backward(x, dy, grads, need_dx)
    }
}

impl LayerNorm {
    /// [`LayerNorm::forward`] without a graph.
    pub fn forward_nograd(&self, x: &Tensor) -> Result<Tensor> {
        LayerNorm {
            weight: self.weight.detach(),
            bias: self.bias.detach(),
            eps: self.eps,
        }
        .forward(&x.detach())
    }

    /// Backward of [`LayerNorm::forward`] at input `x` with output cotangent `dy`: adds the weight
    /// and bias gradients to `grads`, returns `dx` (in `x`'s dtype).
    pub fn backward(&self, x: &Tensor, dy: &Tensor, grads: &mut GradStore) -> Result<Tensor> {
        let x = x.detach();
        if x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64) {
            // Same analytic formulas as the CPU op's own backward.
            let sd = x.dtype();
            let xs = x.contig()?;
            let w = cast(&self.weight.detach(), sd)?.contig()?;
            let b = cast(&self.bias.detach(), sd)?.contig()?;
            let g = cast(&dy.detach(), sd)?.contig()?;
            let (dx, dw, db) = LayerNormOp { eps: self.eps }.bwd(&xs, &w, &b, &xs, &g)?;
            let missing = || Error::Model("layer norm backward: missing gradient".into());
            add_param_grad(grads, &self.weight, &dw.ok_or_else(missing)?)?;
            add_param_grad(grads, &self.bias, &db.ok_or_else(missing)?)?;
            return dx.ok_or_else(missing);
        }
        if let Some((dx, wb)) =
            crate::kernels::layer_norm::layer_norm_bwd(&x, &self.weight, dy, self.eps, true)?
        {
            if let Some((dw, db)) = wb {
                add_param_grad(grads, &self.weight, &dw)?;
                add_param_grad(grads, &self.bias, &db)?;
            }
            return Ok(dx);
        }
        // Twin path (fused kernels off, or a dtype/size the kernel does not take).
        autograd_vjp(&x, dy, grads, |x| self.forward(x))
    }
}

/// Softmax backward `dx = y · (g − Σ_j g_j y_j)` over the last dimension from the output `y` and
/// its cotangent `g` (fused kernel on CUDA; f32 accumulation on CPU for bf16).
pub fn softmax_bwd(y: &Tensor, g: &Tensor) -> Result<Tensor> {
    if let Some(dx) = crate::kernels::softmax::softmax_bwd(y, g)? {
        return Ok(dx);
    }
    let dt = y.dtype();
    let acc = if dt == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let (y, g) = (cast(&y.detach(), acc)?, cast(&g.detach(), acc)?);
    let s = (&g * &y)?.sum_keepdim(D::Minus1)?;
    cast(&(y * g.broadcast_sub(&s)?)?, dt)
}

/// The gradient of a tensor of shape `dims` that was broadcast (right-aligned) to `dx`'s shape:
/// `dx` summed over the broadcast dimensions (deterministic; f32 accumulation for bf16).
pub fn sum_to(dx: &Tensor, dims: &[usize]) -> Result<Tensor> {
    if dx.dims() == dims {
        return Ok(dx.clone());
    }
    if let Some(r) = crate::kernels::softmax::reduce_bias_grad(dx, dims)? {
        return Ok(r);
    }
    sum_to_composite(dx, dims, dx.dtype())
}

/// [`sum_to`] with candle sums (f32 accumulation for bf16/f16), result in `dt`: every device and
/// broadcast pattern; the CUDA reduction falls back to it for patterns its kernel does not take.
pub(crate) fn sum_to_composite(dx: &Tensor, dims: &[usize], dt: DType) -> Result<Tensor> {
    let xd = dx.dims().to_vec();
    let n = xd.len();
    if dims.len() > n {
        return Err(Error::Model(format!(
            "sum_to: target {dims:?} has higher rank than {xd:?}"
        )));
    }
    let mut padded = vec![1usize; n - dims.len()];
    padded.extend_from_slice(dims);
    let mut acc = if matches!(dx.dtype(), DType::BF16 | DType::F16) {
        dx.to_dtype(DType::F32)?
    } else {
        dx.clone()
    };
    for (i, (&p, &x)) in padded.iter().zip(&xd).enumerate() {
        if p == 1 && x != 1 {
            acc = acc.sum_keepdim(i)?;
        } else if p != x {
            return Err(Error::Model(format!(
                "sum_to: {dims:?} does not broadcast to {xd:?}"
            )));
        }
    }
    cast(&acc.reshape(dims)?, dt)
}

/// `o * sigmoid(g)` without a graph (the fused kernel on CUDA).
pub fn gate_nograd(o: &Tensor, g: &Tensor) -> Result<Tensor> {
    crate::kernels::gate::gate(&o.detach(), &g.detach())
}

/// Backward of `o * sigmoid(g)`: `(d_o, d_g) = (dy·s, dy·o·s·(1−s))` with `s = sigmoid(g)`.
pub fn gate_bwd(o: &Tensor, g: &Tensor, dy: &Tensor) -> Result<(Tensor, Tensor)> {
    if let Some(r) = crate::kernels::gate::gate_bwd(o, g, dy)? {
        return Ok(r);
    }
    let s = super::primitives::sigmoid(&g.detach())?;
    let dy = cast(&dy.detach(), o.dtype())?;
    let d_o = (&dy * &s)?;
    let d_g = sigmoid_bwd_from_output(&(dy * o.detach())?, &s)?;
    Ok((d_o, d_g))
}

/// `dy · s · (1 − s)`: the backward of `s = sigmoid(x)` from its output.
pub fn sigmoid_bwd_from_output(dy: &Tensor, s: &Tensor) -> Result<Tensor> {
    Ok((dy * s)?.mul(&s.affine(-1.0, 1.0)?)?)
}

/// `dy · 1[y > 0]`: the backward of `y = relu(x)` from its output.
/// One fused pass on CUDA ([`crate::kernels::bias_act::relu_bwd`]), `gt` + cast + `mul` elsewhere.
pub fn relu_bwd_from_output(dy: &Tensor, y: &Tensor) -> Result<Tensor> {
    if crate::kernels::fused_for(y) && y.dtype() == dy.dtype() {
        return crate::kernels::bias_act::relu_bwd(&y.detach(), &dy.detach());
    }
    let keep = y.gt(0.0)?.to_dtype(dy.dtype())?;
    Ok((dy * keep)?)
}

/// `residual + dropout_shared(update)` without a graph (see [`super::dropout`]).
pub fn residual_dropout_nograd(
    residual: &Tensor,
    update: &Tensor,
    rate: f64,
    shared_dim: usize,
    ctx: Option<&super::dropout::DropoutCtx>,
) -> Result<Tensor> {
    crate::kernels::dropout_residual::residual_dropout(
        &residual.detach(),
        &update.detach(),
        rate,
        shared_dim,
        ctx,
    )
}

/// `dx` of `f` at `x` for the output cotangent `dy` under candle's autograd, adding the gradients
/// of the parameters `f` uses to `grads`: the fallback where no hand-written rule applies.
pub fn autograd_vjp(
    x: &Tensor,
    dy: &Tensor,
    grads: &mut GradStore,
    f: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let xv = Var::from_tensor(&x.detach())?;
    let y = f(xv.as_tensor())?;
    let mut g = backward_vars(&vjp_loss(&[(&y, dy)])?)?;
    let dx = match g.remove(xv.as_tensor()) {
        Some(d) => d,
        None => x.zeros_like()?,
    };
    // What is left are parameter gradients: added to the store where it holds one.
    grads.extend(g)?;
    Ok(dx)
}

/// Several [`Linear`]s reading the same input, applied as one GEMM on their row-concatenated
/// weights, in the forward and in both backward GEMMs. Part `k` computes `s_k · x W_kᵀ (+ b_k)`
/// (the scale is for attention's `1/√c` on q; scaled parts have no bias) and occupies columns
/// `offset_k..offset_k + c_out_k` of the output; its weight (and bias) gradient is split back under
/// its own parameters, so the OpenFold names are unchanged.
pub struct LinearCat<'a> {
    /// `(layer, scale)`.
    pub parts: Vec<(&'a Linear, f64)>,
}

impl<'a> LinearCat<'a> {
    /// Unscaled parts.
    pub fn new(parts: &[&'a Linear]) -> Self {
        Self {
            parts: parts.iter().map(|l| (*l, 1.0)).collect(),
        }
    }

    /// `[Σ c_out, c_in]` in `dtype` (scaled in the parameters' dtype, then cast), detached.
    /// Parts of one dtype are concatenated first and cast once (one cast launch per call, not
    /// one per part; the same values).
    fn weight(&self, dtype: DType) -> Result<Tensor> {
        let one_dtype = self
            .parts
            .windows(2)
            .all(|p| p[0].0.weight.dtype() == p[1].0.weight.dtype());
        let ws = self
            .parts
            .iter()
            .map(|(l, s)| {
                let w = l.weight.detach();
                let w = if *s == 1.0 { w } else { (w * *s)? };
                if one_dtype {
                    Ok(w)
                } else {
                    cast(&w, dtype)
                }
            })
            .collect::<Result<Vec<_>>>()?;
        cast(&Tensor::cat(&ws, 0)?, dtype)
    }

    /// `x W_catᵀ` without biases, 2-D `[n, Σ c_out]` (`n` = rows of `x`). No graph is built.
    pub fn matmul_nograd(&self, x: &Tensor) -> Result<Tensor> {
        let c_in = *x.dims().last().unwrap_or(&0);
        let n = x.elem_count() / c_in.max(1);
        let w = self.weight(x.dtype())?;
        Ok(x.detach().contig()?.reshape((n, c_in))?.matmul(&w.t()?)?)
    }

    /// The parts' outputs with their biases, `[*, Σ c_out]` (a part without a bias gets zeros
    /// there; one fused bias pass on CUDA). No graph is built.
    pub fn forward_nograd(&self, x: &Tensor) -> Result<Tensor> {
        let mut out_dims = x.dims().to_vec();
        let c_out: usize = self.parts.iter().map(|(l, _)| l.out_dim()).sum();
        if let Some(last) = out_dims.last_mut() {
            *last = c_out;
        }
        let y = self.matmul_nograd(x)?;
        if !self.parts.iter().any(|(l, _)| l.bias.is_some()) {
            return Ok(y.reshape(out_dims)?);
        }
        let fused = crate::kernels::fused_for(x);
        // The fused kernel takes the f32 biases; the composite adds them in `x`'s dtype (as
        // `Linear::forward` does).
        let bdt = if fused {
            self.parts
                .iter()
                .find_map(|(l, _)| l.bias.as_ref().map(|b| b.dtype()))
                .unwrap_or(DType::F32)
        } else {
            x.dtype()
        };
        let bs = self
            .parts
            .iter()
            .map(|(l, s)| match &l.bias {
                Some(b) if *s == 1.0 => cast(&b.detach(), bdt),
                Some(_) => Err(Error::Model("LinearCat: a scaled part with a bias".into())),
                None => Ok(Tensor::zeros(l.out_dim(), bdt, x.device())?),
            })
            .collect::<Result<Vec<_>>>()?;
        let b = Tensor::cat(&bs, 0)?;
        let y = if fused {
            bias_add(&y, &b)?
        } else {
            y.broadcast_add(&b)?
        };
        Ok(y.reshape(out_dims)?)
    }

    /// Backward at input `x` with the output cotangent `dy` `[*, Σ c_out]`: one `dyᵀ x` GEMM split
    /// into each part's (scaled) weight gradient and one column sum for the biases, added to
    /// `grads`; returns `dx = dy W_cat` when `need_dx`.
    pub fn backward(
        &self,
        x: &Tensor,
        dy: &Tensor,
        grads: &mut GradStore,
        need_dx: bool,
    ) -> Result<Option<Tensor>> {
        let dims = x.dims();
        let c_in = *dims.last().unwrap_or(&0);
        let c_out: usize = self.parts.iter().map(|(l, _)| l.out_dim()).sum();
        let n = x.elem_count() / c_in.max(1);
        let dt = x.dtype();
        let x2 = x.detach().contig()?.reshape((n, c_in))?;
        let dy2 = cast(&dy.detach(), dt)?.contig()?.reshape((n, c_out))?;
        // f32 parameters of a 16-bit pass: the gradients straight from cuBLAS's f32 accumulator.
        let f32_grads = matches!(dt, DType::BF16 | DType::F16)
            && self.parts.iter().all(|(l, _)| {
                l.weight.dtype() == DType::F32
                    && l.bias.as_ref().is_none_or(|b| b.dtype() == DType::F32)
            });
        let dw = if f32_grads {
            matmul_tn_f32(&dy2, &x2)?
        } else {
            dy2.t()?.matmul(&x2)?
        }; // [Σ c_out, c_in]
        let db = if self.parts.iter().any(|(l, _)| l.bias.is_some()) {
            Some(column_sum(&dy2, f32_grads)?)
        } else {
            None
        };
        // One cast of the joint gradients to the parameters' dtype (not one per part).
        let dw = match self.parts.first() {
            Some((l0, _))
                if self
                    .parts
                    .iter()
                    .all(|(l, _)| l.weight.dtype() == l0.weight.dtype()) =>
            {
                cast(&dw, l0.weight.dtype())?
            }
            _ => dw,
        };
        let bdt = self
            .parts
            .iter()
            .find_map(|(l, _)| l.bias.as_ref().map(|b| b.dtype()));
        let db = match (db, bdt) {
            (Some(db), Some(bd))
                if self
                    .parts
                    .iter()
                    .all(|(l, _)| l.bias.as_ref().is_none_or(|b| b.dtype() == bd)) =>
            {
                Some(cast(&db, bd)?)
            }
            (db, _) => db,
        };
        let mut off = 0;
        for (l, s) in &self.parts {
            let k = l.out_dim();
            let dwk = cast(&dw.narrow(0, off, k)?, l.weight.dtype())?;
            let dwk = if *s == 1.0 { dwk } else { (dwk * *s)? };
            add_param_grad(grads, &l.weight, &dwk.contig()?)?;
            if let (Some(b), Some(db)) = (&l.bias, &db) {
                add_param_grad(grads, b, &db.narrow(0, off, k)?.contig()?)?;
            }
            off += k;
        }
        if !need_dx {
            return Ok(None);
        }
        Ok(Some(dy2.matmul(&self.weight(dt)?)?.reshape(dims)?))
    }

    /// [`Self::backward`] with one cotangent per part (each `[n, c_out_k]`, or any view of
    /// `n · c_out_k` elements in that row-major order, in order), returning `dx` in `x`'s shape.
    pub fn backward_parts(
        &self,
        x: &Tensor,
        dys: &[Tensor],
        grads: &mut GradStore,
    ) -> Result<Tensor> {
        let dt = x.dtype();
        let dys = dys
            .iter()
            .map(|d| cast(d, dt))
            .collect::<Result<Vec<_>>>()?;
        let n = x.elem_count() / x.dims().last().copied().unwrap_or(1).max(1);
        let dy = crate::kernels::permute::cat_cols(&dys, n)?; // [n, Σ c_out]
        self.backward(x, &dy, grads, true)?
            .ok_or_else(|| Error::Model("LinearCat: no input gradient".into()))
    }
}

/// [`LinearCat::forward_nograd`] of unscaled `parts`.
pub fn linear_cat_nograd(parts: &[&Linear], x: &Tensor) -> Result<Tensor> {
    LinearCat::new(parts).forward_nograd(x)
}

/// [`LinearCat::backward`] of unscaled `parts`.
pub fn linear_cat_backward(
    parts: &[&Linear],
    x: &Tensor,
    dy: &Tensor,
    grads: &mut GradStore,
    need_dx: bool,
) -> Result<Option<Tensor>> {
    LinearCat::new(parts).backward(x, dy, grads, need_dx)
}

/// Test helper: the hand-written backward of a module against candle's autograd on the same
/// parameters `vm` and input `x`. `autograd(x)` is the module's `forward` (a graph through `x`
/// and the parameters); `manual(x, dy, grads)` runs `forward_saved` + `backward` for the output
/// cotangent `dy` and returns `(y, dx)`. Asserts that outputs, input gradients and every
/// parameter gradient agree to relative max-norm error `tol`, and that every parameter gets a
/// gradient.
#[cfg(test)]
pub(crate) fn assert_manual_matches_autograd(
    vm: &candle_nn::VarMap,
    x: &Tensor,
    autograd: impl Fn(&Tensor) -> Result<Tensor>,
    manual: impl FnOnce(&Tensor, &Tensor, &mut GradStore) -> Result<(Tensor, Tensor)>,
    tol: f64,
) {
    use super::params::sorted_vars;
    fn rel(a: &Tensor, b: &Tensor) -> f64 {
        let scalar = |t: Tensor| -> f64 {
            t.to_dtype(DType::F64)
                .and_then(|t| t.to_scalar::<f64>())
                .unwrap_or(f64::NAN)
        };
        let diff = scalar(
            (a.to_dtype(DType::F64).unwrap() - b.to_dtype(DType::F64).unwrap())
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap(),
        );
        let norm = scalar(
            b.to_dtype(DType::F64)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap(),
        );
        diff / norm.max(1e-300)
    }
    let xv = Var::from_tensor(&x.detach()).unwrap();
    let y_ref = autograd(xv.as_tensor()).unwrap();
    let dy = Tensor::randn(0.0, 1.0, y_ref.shape(), y_ref.device())
        .unwrap()
        .to_dtype(y_ref.dtype())
        .unwrap();
    let g_ref = backward_vars(&vjp_loss(&[(&y_ref, &dy)]).unwrap()).unwrap();
    let mut g = GradStore::default();
    let (y, dx) = manual(x, &dy, &mut g).unwrap();
    let mut report = vec![("output".to_string(), rel(&y, &y_ref))];
    let dx_ref = g_ref
        .get(xv.as_tensor())
        .expect("autograd: no input gradient");
    report.push(("input".to_string(), rel(&dx, dx_ref)));
    for (name, v) in sorted_vars(vm) {
        let want = g_ref
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("autograd: no gradient for {name}"));
        let got = g
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("manual: no gradient for {name}"));
        assert_eq!(got.dims(), want.dims(), "{name}");
        report.push((name, rel(got, want)));
    }
    for (name, r) in &report {
        assert!(
            r.is_finite() && *r <= tol,
            "{name}: rel {r:e} > {tol:e}\n{report:?}"
        );
    }
}

/// The gradient of a bias added over the last dimension: `dy` `[*, c]` summed over all leading
/// dimensions → `[c]` (deterministic; a ones-vector matmul on CUDA, as in [`Linear::backward`];
/// f32 there for a 16-bit `dy`).
pub fn bias_grad(dy: &Tensor) -> Result<Tensor> {
    let c = *dy.dims().last().unwrap_or(&0);
    let n = dy.elem_count() / c.max(1);
    column_sum(&dy.detach().contig()?.reshape((n, c))?, true)
}
