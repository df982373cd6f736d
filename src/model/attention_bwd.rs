//! Hand-written backward passes of the attention cores ([`Attention`], Algorithms 7, 8, 13, 14;
//! [`GlobalAttention`], Algorithm 19). See [`super::vjp`] for the `forward_saved` / `backward`
//! protocol.
//!
//! Self-attention only (every trunk use has `q_x == kv_x`): the projections that read the same
//! input run as one GEMM on the row-concatenated weights ([`LinearCat`]), in the forward and in
//! both GEMMs of the backward (`dW = dYᵀ X`, `dX = dY W`); the weight gradient is split back per
//! parameter (OpenFold names are unchanged).
//!
//! Attention backward (per batch·head, `a = softmax(S)`, `S = q kᵀ + Σ biases`, `o = a v`):
//! `dv = aᵀ do`, `da = do vᵀ`, `dS = a · (da − Σ_k da·a)`, `dq = dS k`, `dk = dSᵀ q`, and each
//! bias gets `dS` summed over its broadcast dimensions. The big `[B·H, Q, K]` tensors stay
//! contiguous; transposed operands are strided views passed straight to the batched GEMM.

use candle_core::backprop::GradStore;
use candle_core::Tensor;

use super::attention::{Attention, GlobalAttention};
use super::primitives::{cast, mask_bias, sigmoid, softmax_with_biases, Linear};
use super::vjp::{gate_bwd, gate_nograd, sigmoid_bwd_from_output, softmax_bwd, sum_to, LinearCat};
use crate::error::{Error, Result};
use crate::kernels::batch_col_scale::batch_col_scale;
use crate::kernels::bias_act::bias_add;
use crate::kernels::permute::Contig;

/// `[B, N, H·C]`-layout rows `[B·N, H·C]` → heads `[B·H, N, C]` (contiguous).
fn split_heads(t: &Tensor, b: usize, n: usize, h: usize, c: usize) -> Result<Tensor> {
    Ok(t.reshape((b, n, h, c))?
        .transpose(1, 2)?
        .contig()?
        .reshape((b * h, n, c))?)
}

/// Heads `[B·H, N, C]` → rows `[B·N, H·C]` (contiguous).
fn merge_heads(t: &Tensor, b: usize, n: usize, h: usize, c: usize) -> Result<Tensor> {
    Ok(t.reshape((b, h, n, c))?
        .transpose(1, 2)?
        .contig()?
        .reshape((b * n, h * c))?)
}

/// Heads `[B·H, N, C]` as a `[B, N, H, C]` view (rows `[B·N, H·C]` in row-major order, not
/// copied: [`LinearCat::backward_parts`] merges and concatenates in one pass).
fn merged_view(t: &Tensor, b: usize, n: usize, h: usize, c: usize) -> Result<Tensor> {
    Ok(t.reshape((b, h, n, c))?.transpose(1, 2)?)
}

/// The bias of `lin` (or zeros) reshaped to `dims`, in `dtype`, detached.
fn bias_as(lin: &Linear, dims: &[usize], x: &Tensor) -> Result<Option<Tensor>> {
    match &lin.bias {
        Some(b) => Ok(Some(cast(&b.detach(), x.dtype())?.reshape(dims)?)),
        None => Ok(None),
    }
}

fn missing(what: &str) -> Error {
    Error::Model(format!("attention backward: missing {what}"))
}

/// What [`Attention::backward`] keeps from [`Attention::forward_saved`].
pub struct AttentionSaved {
    /// Input `[B, N, c]`.
    x: Tensor,
    /// Scaled queries, keys, values `[B·H, N, C]`.
    q: Tensor,
    k: Tensor,
    v: Tensor,
    /// Softmax output `[B·H, Q, K]`.
    a: Tensor,
    /// `a v` with heads merged `[B·N, H·C]`.
    o: Tensor,
    /// Gate logits `linear_g(x)` `[B·N, H·C]`.
    g: Tensor,
    /// `o · sigmoid(g)` `[B·N, H·C]` (input of `linear_o`).
    gated: Tensor,
    /// Shapes of the biases that need a gradient, in order.
    bias_dims: Vec<Vec<usize>>,
    /// `(B, N, H, C)`.
    dims: (usize, usize, usize, usize),
}

/// Input gradients of [`Attention::backward`].
pub struct AttentionGrads {
    /// Gradient of the input `x` `[B, N, c]`.
    pub dx: Tensor,
    /// One gradient per bias passed with `needs_grad = true`, in order, each of the bias's shape.
    pub d_biases: Vec<Tensor>,
}

impl Attention {
    /// [`Attention::forward`]`(x, x, biases)` (self-attention) without a graph, keeping what
    /// [`Self::backward`] needs. `biases`: `(bias, needs_grad)`, each broadcastable to
    /// `[B, H, N, N]`, added in order.
    pub fn forward_saved(
        &self,
        x: &Tensor,
        biases: &[(&Tensor, bool)],
    ) -> Result<(Tensor, AttentionSaved)> {
        let x = x.detach();
        let (b, n, _) = x.dims3()?;
        let (h, c) = (self.no_heads, self.c_hidden);
        // [B·N, 4·H·C] = [B, N, {q, k, v, g}, H, C]; q carries the 1/√c scale.
        let y = self.qkvg().matmul_nograd(&x)?.reshape((b, n, 4, h, c))?;
        let heads = |i: usize| -> Result<Tensor> {
            Ok(y.narrow(2, i, 1)?
                .squeeze(2)?
                .transpose(1, 2)?
                .contig()?
                .reshape((b * h, n, c))?)
        };
        let (q, k, v) = (heads(0)?, heads(1)?, heads(2)?); // [B·H, N, C]
        let g = match (&self.linear_g.bias, crate::kernels::fused_for(&y)) {
            // Fused: bias added to the gate columns of the joint projection in one pass.
            (Some(bg), true) => bias_add(
                &y.reshape((b * n, 4 * h * c))?.narrow(1, 3 * h * c, h * c)?,
                bg,
            )?,
            _ => {
                let g = y.narrow(2, 3, 1)?; // [B, N, 1, H, C]
                match bias_as(&self.linear_g, &[1, 1, 1, h, c], &x)? {
                    Some(bg) => g.broadcast_add(&bg)?,
                    None => g.contig()?,
                }
                .reshape((b * n, h * c))?
            }
        };
        drop(y);
        let bs: Vec<Tensor> = biases.iter().map(|(t, _)| t.detach()).collect();
        let brefs: Vec<&Tensor> = bs.iter().collect();
        let logits = q.matmul(&k.t()?)?.reshape((b, h, n, n))?; // [B, H, Q, K]
        let a = softmax_with_biases(&logits, &brefs)?.reshape((b * h, n, n))?;
        drop(logits);
        let o = merge_heads(&a.matmul(&v)?, b, n, h, c)?; // [B·N, H·C]
        let gated = gate_nograd(&o, &g)?;
        let out = self
            .linear_o
            .forward_nograd(&gated)?
            .reshape((b, n, self.linear_o.out_dim()))?;
        let bias_dims = biases
            .iter()
            .filter(|(_, need)| *need)
            .map(|(t, _)| t.dims().to_vec())
            .collect();
        let saved = AttentionSaved {
            x,
            q,
            k,
            v,
            a,
            o,
            g,
            gated,
            bias_dims,
            dims: (b, n, h, c),
        };
        Ok((out, saved))
    }

    /// [`Attention::forward_masked`] (key mask `mask` `[B, N]` as the first, constant bias) via
    /// [`Self::forward_saved`]; the backward's `d_biases` are those of `extra_biases` that need
    /// a gradient.
    pub fn forward_masked_saved(
        &self,
        x: &Tensor,
        mask: &Tensor,
        inf: f64,
        extra_biases: &[(&Tensor, bool)],
    ) -> Result<(Tensor, AttentionSaved)> {
        let (b, n) = mask.dims2()?;
        let mask = cast(&mask.detach(), x.dtype())?;
        let mb = mask_bias(&mask, inf)?.reshape((b, 1, 1, n))?; // [B, 1, 1, N]
        let mut biases: Vec<(&Tensor, bool)> = Vec::with_capacity(1 + extra_biases.len());
        biases.push((&mb, false));
        biases.extend_from_slice(extra_biases);
        self.forward_saved(x, &biases)
    }

    /// Backward of [`Self::forward_saved`] for the output cotangent `d_out` `[B, N, c]`:
    /// parameter gradients into `grads`; returns the input and bias gradients (activation dtype).
    pub fn backward(
        &self,
        s: AttentionSaved,
        d_out: &Tensor,
        grads: &mut GradStore,
    ) -> Result<AttentionGrads> {
        let (b, n, h, c) = s.dims;
        let dt = s.x.dtype();
        let d_out = cast(&d_out.detach(), dt)?.reshape((b * n, self.linear_o.out_dim()))?;
        let d_gated = self
            .linear_o
            .backward(&s.gated, &d_out, grads, true)?
            .ok_or_else(|| missing("d_gated"))?;
        drop(s.gated);
        let (d_o, d_g) = gate_bwd(&s.o, &s.g, &d_gated)?; // [B·N, H·C]
        drop((d_gated, s.o, s.g));
        let d_o = split_heads(&d_o, b, n, h, c)?; // [B·H, Q, C]
        let dv = s.a.t()?.matmul(&d_o)?; // [B·H, K, C]
        let da = d_o.matmul(&s.v.t()?)?; // [B·H, Q, K]
        drop((d_o, s.v));
        let ds = softmax_bwd(&s.a, &da)?; // [B·H, Q, K]
        drop((da, s.a));
        let dq = ds.matmul(&s.k)?; // [B·H, Q, C]
        let dk = ds.t()?.matmul(&s.q)?; // [B·H, K, C]
        let ds4 = ds.reshape((b, h, n, n))?;
        let d_biases = s
            .bias_dims
            .iter()
            .map(|dims| sum_to(&ds4, dims))
            .collect::<Result<Vec<_>>>()?;
        drop((ds, ds4));
        let dys = [
            merged_view(&dq, b, n, h, c)?,
            merged_view(&dk, b, n, h, c)?,
            merged_view(&dv, b, n, h, c)?,
            d_g,
        ];
        drop((dq, dk, dv));
        let dx = self.qkvg().backward_parts(&s.x, &dys, grads)?;
        Ok(AttentionGrads { dx, d_biases })
    }

    /// `linear_q` (scaled by `c_hidden^-1/2`), `linear_k`, `linear_v`, `linear_g` as one GEMM.
    fn qkvg(&self) -> LinearCat<'_> {
        LinearCat {
            parts: vec![
                (&self.linear_q, 1.0 / (self.c_hidden as f64).sqrt()),
                (&self.linear_k, 1.0),
                (&self.linear_v, 1.0),
                (&self.linear_g, 1.0),
            ],
        }
    }
}

/// What [`GlobalAttention::backward`] keeps from [`GlobalAttention::forward_saved`].
pub struct GlobalAttentionSaved {
    /// Input `[B, N, c_in]`.
    m: Tensor,
    /// Mask `[B, N, 1]` in the activation dtype.
    mask3: Tensor,
    /// `Σ_n mask + eps` `[B, 1]`.
    den: Tensor,
    /// Masked mean `[B, c_in]`.
    q_avg: Tensor,
    /// Scaled query `[B, H, C]`.
    q: Tensor,
    /// Keys and values `[B, N, C]`.
    k: Tensor,
    v: Tensor,
    /// Softmax output `[B, H, N]`.
    a: Tensor,
    /// `a v` `[B, H, C]`.
    o: Tensor,
    /// `sigmoid(linear_g(m))` `[B, N, H, C]`.
    s_g: Tensor,
    /// Input of `linear_o` `[B, N, H·C]`.
    o2: Tensor,
}

impl GlobalAttention {
    /// [`GlobalAttention::forward`] without a graph, keeping what [`Self::backward`] needs.
    pub fn forward_saved(
        &self,
        m: &Tensor,
        mask: &Tensor,
    ) -> Result<(Tensor, GlobalAttentionSaved)> {
        let m = m.detach();
        let mask = cast(&mask.detach(), m.dtype())?;
        let (b, n, _) = m.dims3()?;
        let (h, c) = (self.no_heads, self.c_hidden);
        let mask3 = mask.unsqueeze(2)?; // [B, N, 1]
        let num = mask.unsqueeze(1)?.matmul(&m)?.squeeze(1)?; // [B, c_in]: Σ_n mask·m as a GEMM
        let den = (mask.sum_keepdim(1)? + self.eps)?; // [B, 1]
        let q_avg = num.broadcast_div(&den)?;
        let q = (self.linear_q.forward_nograd(&q_avg)? * (c as f64).powf(-0.5))?;
        let q = q.reshape((b, h, c))?; // [B, H, C]
        let y = self.kvg().matmul_nograd(&m)?; // [B·N, 2C + H·C]
        let k = y.narrow(1, 0, c)?.contig()?.reshape((b, n, c))?;
        let v = y.narrow(1, c, c)?.contig()?.reshape((b, n, c))?;
        let g = y.narrow(1, 2 * c, h * c)?;
        let g = match (&self.linear_g.bias, crate::kernels::fused_for(&g)) {
            (Some(bg), true) => bias_add(&g, bg)?,
            _ => match bias_as(&self.linear_g, &[1, h * c], &m)? {
                Some(bg) => g.broadcast_add(&bg)?,
                None => g.contig()?,
            },
        };
        drop(y);
        let s_g = sigmoid(&g)?.reshape((b, n, h, c))?;
        let bias = mask_bias(&mask, self.inf)?.unsqueeze(1)?; // [B, 1, N]
        let a = softmax_with_biases(&q.matmul(&k.t()?)?, &[&bias])?; // [B, H, N]
        let o = a.matmul(&v)?; // [B, H, C]
        let o2 = batch_col_scale(&s_g.reshape((b, n, h * c))?, &o.reshape((b, h * c))?)?;
        let out = self.linear_o.forward_nograd(&o2)?;
        let saved = GlobalAttentionSaved {
            m,
            mask3,
            den,
            q_avg,
            q,
            k,
            v,
            a,
            o,
            s_g,
            o2,
        };
        Ok((out, saved))
    }

    /// Backward of [`Self::forward_saved`]: parameter gradients into `grads`, returns `dm`.
    pub fn backward(
        &self,
        s: GlobalAttentionSaved,
        d_out: &Tensor,
        grads: &mut GradStore,
    ) -> Result<Tensor> {
        let (b, n, _) = s.m.dims3()?;
        let (h, c) = (self.no_heads, self.c_hidden);
        let d_o2 = self
            .linear_o
            .backward(&s.o2, d_out, grads, true)?
            .ok_or_else(|| missing("d_o2"))?
            .reshape((b, n, h, c))?;
        drop(s.o2);
        // o2 = s_g · o (o broadcast over N).
        let d_o2o = batch_col_scale(&d_o2.reshape((b, n, h * c))?, &s.o.reshape((b, h * c))?)?;
        let d_glin = sigmoid_bwd_from_output(&d_o2o.reshape((b, n, h, c))?, &s.s_g)?;
        let d_o = sum_to(&(&d_o2 * &s.s_g)?, &[b, 1, h, c])?.reshape((b, h, c))?;
        drop((d_o2, s.s_g));
        let dv = s.a.t()?.matmul(&d_o)?; // [B, N, C]
        let da = d_o.matmul(&s.v.t()?)?; // [B, H, N]
        let ds = softmax_bwd(&s.a, &da)?;
        let dq = ds.matmul(&s.k)?; // [B, H, C]
        let dk = ds.t()?.matmul(&s.q)?; // [B, N, C]
        let d_qlin = (dq.reshape((b, h * c))? * (c as f64).powf(-0.5))?;
        let d_qavg = self
            .linear_q
            .backward(&s.q_avg, &d_qlin, grads, true)?
            .ok_or_else(|| missing("d_q_avg"))?; // [B, c_in]
                                                 // q_avg = Σ_n m·mask / den (den depends on the mask only).
        let d_num = d_qavg.broadcast_div(&s.den)?.unsqueeze(1)?; // [B, 1, c_in]
        let dm_q = s.mask3.matmul(&d_num)?; // [B, N, c_in]: mask ⊗ d_num as a rank-1 GEMM
        let dys = [
            dk.reshape((b * n, c))?,
            dv.reshape((b * n, c))?,
            d_glin.reshape((b * n, h * c))?,
        ];
        let dm = self.kvg().backward_parts(&s.m, &dys, grads)?;
        crate::kernels::add::add(&dm, &dm_q)
    }

    /// `linear_k`, `linear_v`, `linear_g` as one GEMM.
    fn kvg(&self) -> LinearCat<'_> {
        LinearCat {
            parts: vec![
                (&self.linear_k, 1.0),
                (&self.linear_v, 1.0),
                (&self.linear_g, 1.0),
            ],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::params::sorted_vars;
    use candle_core::{DType, Device, Var};
    use candle_nn::{VarBuilder, VarMap};

    /// Every parameter random (the zero gating/final inits would hide bugs).
    fn randomise(vm: &VarMap) {
        for (_, v) in sorted_vars(vm) {
            let t = Tensor::randn(0f64, 0.5, v.shape(), &Device::Cpu)
                .unwrap()
                .to_dtype(v.dtype())
                .unwrap();
            v.set(&t).unwrap();
        }
    }

    fn rel(a: &Tensor, b: &Tensor) -> f64 {
        let (a, b) = (
            a.to_dtype(DType::F64).unwrap(),
            b.to_dtype(DType::F64).unwrap(),
        );
        let d = (&a - &b).unwrap().abs().unwrap().max_all().unwrap();
        let m = b.abs().unwrap().max_all().unwrap();
        d.to_scalar::<f64>().unwrap() / m.to_scalar::<f64>().unwrap().max(1e-300)
    }

    fn randn(dims: &[usize], dt: DType) -> Tensor {
        Tensor::randn(0f64, 1.0, dims, &Device::Cpu)
            .unwrap()
            .to_dtype(dt)
            .unwrap()
    }

    /// A `[B, N]` mask with batch 0 fully masked (fully-masked rows) and a few other zeros.
    fn mask(b: usize, n: usize, dt: DType) -> Tensor {
        let v: Vec<f64> = (0..b * n)
            .map(|i| if i < n || i % 5 == 3 { 0.0 } else { 1.0 })
            .collect();
        Tensor::from_vec(v, (b, n), &Device::Cpu)
            .unwrap()
            .to_dtype(dt)
            .unwrap()
    }

    /// Compare the manual parameter gradients with autograd's (same dtype as the parameter).
    fn check_params(vm: &VarMap, auto: &GradStore, manual: &GradStore, tol: f64) {
        for (name, v) in sorted_vars(vm) {
            let a = auto
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("auto {name}"));
            let m = manual
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("no manual gradient for {name}"));
            assert_eq!(a.dims(), m.dims(), "{name}");
            assert_eq!(m.dtype(), v.dtype(), "{name}");
            let r = rel(m, a);
            assert!(r < tol, "{name}: rel {r:e}");
        }
    }

    /// `Attention` with the mask bias (one fully-masked batch) and two gradient biases, manual vs
    /// autograd; parameters in `pdt`, activations in `adt`.
    fn attention_case(pdt: DType, adt: DType, tol: f64) {
        let dev = Device::Cpu;
        let (b, n, cin, c, h) = (3, 7, 6, 4, 2);
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, pdt, &dev);
        let att = Attention::new(vb.pp("mha"), cin, cin, c, h).unwrap();
        randomise(&vm);
        let x = Var::from_tensor(&randn(&[b, n, cin], adt)).unwrap();
        // A pair bias [1, H, N, N] and a per-batch [B, 1, 1, N], both differentiated.
        let pb = Var::from_tensor(&randn(&[1, h, n, n], adt)).unwrap();
        let kb = Var::from_tensor(&randn(&[b, 1, 1, n], adt)).unwrap();
        let mask = mask(b, n, adt);
        let cot = randn(&[b, n, cin], adt);

        let out = att
            .forward_masked(x.as_tensor(), &mask, 1e9, &[pb.as_tensor(), kb.as_tensor()])
            .unwrap();
        let auto = (&out * &cot)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();

        let (y, saved) = att
            .forward_masked_saved(
                x.as_tensor(),
                &mask,
                1e9,
                &[(pb.as_tensor(), true), (kb.as_tensor(), true)],
            )
            .unwrap();
        assert_eq!(y.dtype(), adt);
        assert!(rel(&y, &out) < tol, "forward {}", rel(&y, &out));
        let mut store = GradStore::default();
        let g = att.backward(saved, &cot, &mut store).unwrap();
        check_params(&vm, &auto, &store, tol);
        assert_eq!(g.dx.dtype(), adt);
        let r = rel(&g.dx, auto.get(x.as_tensor()).unwrap());
        assert!(r < tol, "dx rel {r:e}");
        assert_eq!(g.d_biases.len(), 2);
        for (d, v) in g.d_biases.iter().zip([&pb, &kb]) {
            assert_eq!(d.dims(), v.dims());
            let r = rel(d, auto.get(v.as_tensor()).unwrap());
            assert!(r < tol, "bias rel {r:e}");
        }
    }

    /// `GlobalAttention` with one fully-masked batch element, manual vs autograd.
    fn global_case(pdt: DType, adt: DType, tol: f64) {
        let dev = Device::Cpu;
        let (b, n, cin, c, h) = (4, 9, 6, 3, 2);
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, pdt, &dev);
        let att = GlobalAttention::new(vb.pp("ga"), cin, c, h, 1e9, 1e-10).unwrap();
        randomise(&vm);
        let m = Var::from_tensor(&randn(&[b, n, cin], adt)).unwrap();
        let mask = mask(b, n, adt);
        let cot = randn(&[b, n, cin], adt);
        let out = att.forward(m.as_tensor(), &mask).unwrap();
        let auto = (&out * &cot)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let (y, saved) = att.forward_saved(m.as_tensor(), &mask).unwrap();
        assert!(rel(&y, &out) < tol, "forward {}", rel(&y, &out));
        let mut store = GradStore::default();
        let dm = att.backward(saved, &cot, &mut store).unwrap();
        check_params(&vm, &auto, &store, tol);
        assert_eq!(dm.dtype(), adt);
        let r = rel(&dm, auto.get(m.as_tensor()).unwrap());
        assert!(r < tol, "dm rel {r:e}");
    }

    #[test]
    fn attention_manual_backward_matches_autograd() {
        attention_case(DType::F64, DType::F64, 1e-12);
    }

    #[test]
    fn global_attention_manual_backward_matches_autograd() {
        global_case(DType::F64, DType::F64, 1e-12);
    }

    /// f32 master parameters with bf16 activations (the GPU training setup; CPU twin paths): the
    /// dtypes flow through and the results agree with autograd to bf16 precision.
    #[test]
    fn attention_manual_backward_bf16_activations() {
        attention_case(DType::F32, DType::BF16, 5e-2);
        global_case(DType::F32, DType::BF16, 5e-2);
    }
}
