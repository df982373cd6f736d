//! Adam (Kingma & Ba 2015) with state that can be checkpointed, global-norm gradient clipping, and
//! the exponential moving average of the weights (AF2 supplement 1.11.3 and 1.11.7).
//!
//! Parameters, gradients, moments and EMA weights are all keyed by parameter name in `BTreeMap`s, so
//! every loop visits them in sorted name order (deterministic across processes).

use std::collections::BTreeMap;

use candle_core::{Tensor, Var};

use crate::config::OptimConfig;
use crate::error::{Error, Result};

/// Named trainable parameters (fp32 master weights).
pub type Params = BTreeMap<String, Var>;
/// Named gradients (same names as [`Params`]; a parameter without gradient is absent).
pub type Grads = BTreeMap<String, Tensor>;

/// The variables of a candle `VarMap` (what `VarBuilder::from_varmap` creates), sorted by name. The
/// `Var`s are shared, not copied: updating them updates the model.
pub fn params_from_varmap(vm: &candle_nn::VarMap) -> Result<Params> {
    let data = vm
        .data()
        .lock()
        .map_err(|_| Error::Train("the VarMap lock is poisoned".into()))?;
    Ok(data.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
}

/// Adam without weight decay, as in AF2 (beta1 0.9, beta2 0.999, eps 1e-6).
///
/// Update for a parameter with gradient `g` at its `t`-th update (PyTorch `torch.optim.Adam` form):
/// `m = b1 m + (1-b1) g`, `v = b2 v + (1-b2) g^2`,
/// `p -= (lr / (1-b1^t)) * m / (sqrt(v) / sqrt(1-b2^t) + eps)`.
/// A parameter without gradient in a step is left alone (moments and its step count unchanged), as
/// PyTorch does for `grad is None`.
#[derive(Debug, Clone)]
pub struct Adam {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// First moments (`exp_avg`), same dtype/shape as the parameters.
    pub m: BTreeMap<String, Tensor>,
    /// Second moments (`exp_avg_sq`).
    pub v: BTreeMap<String, Tensor>,
    /// Number of updates applied to each parameter (bias correction).
    pub steps: BTreeMap<String, u64>,
}

impl Adam {
    /// Zero moments for every parameter.
    pub fn new(params: &Params, cfg: &OptimConfig) -> Result<Self> {
        let mut m = BTreeMap::new();
        let mut v = BTreeMap::new();
        let mut steps = BTreeMap::new();
        for (name, p) in params {
            m.insert(name.clone(), p.as_tensor().zeros_like()?);
            v.insert(name.clone(), p.as_tensor().zeros_like()?);
            steps.insert(name.clone(), 0);
        }
        Ok(Self {
            beta1: cfg.beta1,
            beta2: cfg.beta2,
            eps: cfg.eps,
            m,
            v,
            steps,
        })
    }

    /// Apply one update with learning rate `lr` to every parameter that has a gradient.
    pub fn step(&mut self, params: &Params, grads: &Grads, lr: f64) -> Result<()> {
        for (name, p) in params {
            let Some(g) = grads.get(name) else { continue };
            self.step_one(name, p, g, lr)?;
        }
        Ok(())
    }

    /// The update of one parameter `name` (candle ops; the twin of the fused kernel).
    fn step_one(&mut self, name: &str, p: &Var, g: &Tensor, lr: f64) -> Result<()> {
        let (Some(m), Some(v), Some(t)) = (
            self.m.get_mut(name),
            self.v.get_mut(name),
            self.steps.get_mut(name),
        ) else {
            return Err(Error::Train(format!(
                "Adam has no state for parameter `{name}`"
            )));
        };
        let g = if g.dtype() == p.dtype() {
            g.clone()
        } else {
            g.to_dtype(p.dtype())?
        };
        *t += 1;
        let tt = i32::try_from(*t).unwrap_or(i32::MAX);
        let bc1 = 1.0 - self.beta1.powi(tt);
        let bc2 = 1.0 - self.beta2.powi(tt);
        let new_m = (m.affine(self.beta1, 0.0)? + g.affine(1.0 - self.beta1, 0.0)?)?;
        let new_v = (v.affine(self.beta2, 0.0)? + g.sqr()?.affine(1.0 - self.beta2, 0.0)?)?;
        let denom = new_v.sqrt()?.affine(1.0 / bc2.sqrt(), self.eps)?;
        let update = (new_m.div(&denom)?).affine(lr / bc1, 0.0)?;
        let new_p = p.as_tensor().sub(&update)?;
        p.set(&new_p)?;
        *m = new_m;
        *v = new_v;
        Ok(())
    }
}

/// Global L2 norm of all gradients. On a CUDA device with fused kernels enabled
/// ([`crate::kernels::fused_enabled`]) one fused multi-tensor kernel computes it
/// ([`crate::kernels::grad_norm`]: f64 squares and sums, deterministic, one device-to-host copy);
/// tensors it cannot take (and every tensor on the CPU) get candle ops: f32 squares summed per
/// tensor, the sums accumulated in f64 in sorted name order, one device-to-host transfer.
/// A NaN or infinite gradient gives a non-finite norm.
pub fn global_grad_norm(grads: &Grads) -> Result<f64> {
    if grads.is_empty() {
        return Ok(0.0);
    }
    let all: Vec<&Tensor> = grads.values().collect();
    let (fused, rest) = crate::kernels::grad_norm::fused_sum_sq(&all)?;
    let candle = crate::kernels::grad_norm::sum_sq_candle(&rest)?;
    Ok((fused + candle).sqrt())
}

/// Scale the gradients so that their global L2 norm is at most `max_norm` (PyTorch
/// `clip_grad_norm_` rule: coefficient `max_norm / (norm + 1e-6)`, applied only when below 1).
/// `norm` is the pre-clipping global norm from [`global_grad_norm`]. Returns the coefficient used.
pub fn clip_grads(grads: &mut Grads, norm: f64, max_norm: f64) -> Result<f64> {
    let Some(coef) = clip_scale(norm, max_norm) else {
        return Ok(1.0);
    };
    for g in grads.values_mut() {
        *g = g.affine(coef, 0.0)?;
    }
    Ok(coef)
}

/// The coefficient [`clip_grads`] scales the gradients by, `None` when it leaves them alone.
pub fn clip_scale(norm: f64, max_norm: f64) -> Option<f64> {
    let coef = max_norm / (norm + 1e-6);
    if coef >= 1.0 {
        None
    } else {
        Some(coef)
    }
}

/// The optimiser step of the trainer: clip the gradients to global norm `max_norm` (`norm` is
/// their pre-clipping global norm), apply one Adam update with learning rate `lr`, then move the
/// EMA. Returns the clipping coefficient (1 when not clipping). `grads` is left unscaled.
///
/// On CUDA parameters with fused kernels enabled ([`crate::kernels::fused_enabled`]) this is one
/// fused kernel for all parameters ([`crate::kernels::adam`], bitwise equal to the candle ops;
/// it updates the moment and EMA tensors in place instead of replacing them); everywhere else it
/// is exactly [`clip_adam_ema_twin`].
pub fn clip_adam_ema(
    adam: &mut Adam,
    ema: &mut Ema,
    params: &Params,
    grads: &Grads,
    norm: f64,
    max_norm: f64,
    lr: f64,
) -> Result<f64> {
    let on_cuda = params.values().next().is_some_and(|p| p.device().is_cuda());
    if on_cuda && crate::kernels::fused_enabled() {
        clip_adam_ema_fused(adam, ema, params, grads, norm, max_norm, lr)
    } else {
        clip_adam_ema_twin(adam, ema, params, grads, norm, max_norm, lr)
    }
}

/// The trainer's whole parameter update (global gradient norm, clip, Adam, EMA) as one object,
/// for benchmarks that must time exactly what a training step does.
pub struct StepUpdate {
    pub adam: Adam,
    pub ema: Ema,
    max_norm: f64,
}

impl StepUpdate {
    pub fn new(params: &Params, cfg: &OptimConfig) -> Result<Self> {
        Ok(Self {
            adam: Adam::new(params, cfg)?,
            ema: Ema::new(params, cfg.ema_decay)?,
            max_norm: cfg.grad_clip_norm,
        })
    }

    /// One update at learning rate `lr`; returns the clip coefficient.
    pub fn apply(&mut self, params: &Params, grads: &Grads, lr: f64) -> Result<f64> {
        let norm = global_grad_norm(grads)?;
        clip_adam_ema(
            &mut self.adam,
            &mut self.ema,
            params,
            grads,
            norm,
            self.max_norm,
            lr,
        )
    }
}

/// [`clip_adam_ema`] with candle ops: [`clip_grads`] (on a copy of the map), [`Adam::step`],
/// [`Ema::update`].
pub fn clip_adam_ema_twin(
    adam: &mut Adam,
    ema: &mut Ema,
    params: &Params,
    grads: &Grads,
    norm: f64,
    max_norm: f64,
    lr: f64,
) -> Result<f64> {
    let mut grads = grads.clone();
    let coef = clip_grads(&mut grads, norm, max_norm)?;
    adam.step(params, &grads, lr)?;
    ema.update(params)?;
    Ok(coef)
}

/// The values of `map` for the names of `params`, in `params`' (sorted) order: one merge walk
/// over the two sorted maps (one key comparison per entry instead of a tree lookup per name).
fn aligned<'a, V>(params: &Params, map: &'a BTreeMap<String, V>) -> Vec<Option<&'a V>> {
    let mut out = Vec::with_capacity(params.len());
    let mut it = map.iter().peekable();
    for name in params.keys() {
        let mut found = None;
        while let Some((k, v)) = it.peek() {
            match k.as_str().cmp(name.as_str()) {
                std::cmp::Ordering::Less => {
                    it.next();
                }
                std::cmp::Ordering::Equal => {
                    found = Some(*v);
                    it.next();
                    break;
                }
                std::cmp::Ordering::Greater => break,
            }
        }
        out.push(found);
    }
    out
}

/// Per parameter (in `params`' order) its fused-kernel operands when it has a gradient and
/// complete optimiser state, else `None`.
fn state_items<'a>(
    params: &'a Params,
    grads: &'a Grads,
    adam: &'a Adam,
    ema: &'a Ema,
) -> Vec<Option<crate::kernels::adam::AdamEmaItem<'a>>> {
    let (g, m, v) = (
        aligned(params, grads),
        aligned(params, &adam.m),
        aligned(params, &adam.v),
    );
    let (t, w) = (aligned(params, &adam.steps), aligned(params, &ema.weights));
    params
        .values()
        .enumerate()
        .map(|(i, p)| match (g[i], m[i], v[i], t[i], w[i]) {
            (Some(g), Some(m), Some(v), Some(t), Some(w)) => {
                Some(crate::kernels::adam::AdamEmaItem {
                    p,
                    g,
                    m,
                    v,
                    w,
                    step: t + 1,
                })
            }
            _ => None,
        })
        .collect()
}

/// [`clip_adam_ema`] through the fused kernel for every parameter it can take (f32, contiguous,
/// CUDA); the others get the twin's candle ops. Same results as [`clip_adam_ema_twin`].
///
/// Host work per step is linear in the number of parameters: the name-keyed maps are walked in
/// lockstep ([`aligned`]) rather than looked up name by name.
pub fn clip_adam_ema_fused(
    adam: &mut Adam,
    ema: &mut Ema,
    params: &Params,
    grads: &Grads,
    norm: f64,
    max_norm: f64,
    lr: f64,
) -> Result<f64> {
    use crate::kernels::adam::{adam_ema_fused_unchecked, eligible, AdamEmaHyper, AdamEmaItem};
    let clip = clip_scale(norm, max_norm);
    let hyper = AdamEmaHyper {
        beta1: adam.beta1,
        beta2: adam.beta2,
        eps: adam.eps,
        lr,
        ema_decay: ema.decay,
        clip,
    };
    // Which parameters the kernel takes (all operands f32/contiguous/CUDA/same shape); the
    // others with a gradient go to the twin (which also reports missing state).
    let has_grad: Vec<bool> = aligned(params, grads).iter().map(Option::is_some).collect();
    let mut fused = vec![false; params.len()];
    let first = {
        let mut items = Vec::with_capacity(params.len());
        for (i, item) in state_items(params, grads, adam, ema)
            .into_iter()
            .enumerate()
        {
            if let Some(item) = item.filter(eligible) {
                fused[i] = true;
                items.push(item);
            }
        }
        adam_ema_fused_unchecked(&items, &hyper)
    };
    // The kernel writes the moments and EMA weights in place and refuses overlapping buffers
    // (checked before any write): then give every state tensor its own storage and retry.
    if first.is_err() {
        let names: Vec<&String> = params
            .keys()
            .zip(&fused)
            .filter(|(_, f)| **f)
            .map(|(n, _)| n)
            .collect();
        for name in names {
            for map in [&mut adam.m, &mut adam.v, &mut ema.weights] {
                if let Some(t) = map.get_mut(name) {
                    *t = t.copy()?;
                }
            }
        }
        let items: Vec<AdamEmaItem> = state_items(params, grads, adam, ema)
            .into_iter()
            .zip(&fused)
            .filter_map(|(it, f)| it.filter(|_| *f))
            .collect();
        if items.len() != fused.iter().filter(|f| **f).count() {
            return Err(Error::Train("fused Adam: state lost on retry".into()));
        }
        adam_ema_fused_unchecked(&items, &hyper)?;
    }
    // Step counts of the fused parameters (lockstep walk of `adam.steps`).
    let mut steps = adam.steps.iter_mut().peekable();
    for (name, f) in params.keys().zip(&fused) {
        if !*f {
            continue;
        }
        while let Some((k, t)) = steps.peek_mut() {
            match k.as_str().cmp(name.as_str()) {
                std::cmp::Ordering::Less => {
                    steps.next();
                }
                std::cmp::Ordering::Equal => {
                    **t += 1;
                    steps.next();
                    break;
                }
                std::cmp::Ordering::Greater => break,
            }
        }
    }
    let n_twin = has_grad
        .iter()
        .zip(&fused)
        .filter(|(g, f)| **g && !**f)
        .count();
    if n_twin > 0 {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            tracing::warn!(
                "fused Adam: {n_twin} of {} parameters are not f32/contiguous/same-shape on \
                 CUDA; they take per-tensor candle ops (slow)",
                params.len()
            )
        });
    }
    for (i, (name, p)) in params.iter().enumerate() {
        if fused[i] {
            continue;
        }
        if has_grad[i] {
            let Some(g) = grads.get(name) else { continue };
            let g = match clip {
                Some(c) => g.affine(c, 0.0)?,
                None => g.clone(),
            };
            adam.step_one(name, p, &g, lr)?;
            ema.update_one(name, p)?;
        }
    }
    // Parameters without gradient: EMA only (as the twin).
    for (i, (name, p)) in params.iter().enumerate() {
        if !has_grad[i] {
            ema.update_one(name, p)?;
        }
    }
    Ok(clip.unwrap_or(1.0))
}

/// Exponential moving average of the weights, used for evaluation:
/// `ema -= (1 - decay) * (ema - p)` after every applied update (OpenFold's form).
#[derive(Debug, Clone)]
pub struct Ema {
    pub decay: f64,
    pub weights: BTreeMap<String, Tensor>,
}

impl Ema {
    /// Start from a copy of the current parameters.
    pub fn new(params: &Params, decay: f64) -> Result<Self> {
        let weights = params
            .iter()
            .map(|(n, p)| Ok((n.clone(), p.as_tensor().copy()?)))
            .collect::<Result<BTreeMap<_, _>>>()?;
        Ok(Self { decay, weights })
    }

    /// Move the average towards the current parameters.
    pub fn update(&mut self, params: &Params) -> Result<()> {
        for (name, p) in params {
            self.update_one(name, p)?;
        }
        Ok(())
    }

    /// The update of one weight (candle ops; the twin of the fused kernel).
    fn update_one(&mut self, name: &str, p: &Var) -> Result<()> {
        let Some(w) = self.weights.get_mut(name) else {
            return Err(Error::Train(format!(
                "EMA has no weight for parameter `{name}`"
            )));
        };
        let diff = w
            .sub(&p.as_detached_tensor())?
            .affine(1.0 - self.decay, 0.0)?;
        *w = w.sub(&diff)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn params(vals: &[(&str, Vec<f32>)]) -> Params {
        vals.iter()
            .map(|(n, v)| {
                let t = Tensor::from_vec(v.clone(), v.len(), &Device::Cpu).unwrap();
                (n.to_string(), Var::from_tensor(&t).unwrap())
            })
            .collect()
    }

    fn grads(vals: &[(&str, Vec<f32>)]) -> Grads {
        vals.iter()
            .map(|(n, v)| {
                (
                    n.to_string(),
                    Tensor::from_vec(v.clone(), v.len(), &Device::Cpu).unwrap(),
                )
            })
            .collect()
    }

    fn vals(p: &Params, n: &str) -> Vec<f32> {
        p[n].as_tensor().to_vec1::<f32>().unwrap()
    }

    /// Adam against a scalar f64 re-implementation of the published update rule.
    #[test]
    fn adam_matches_reference_rule() {
        let cfg = OptimConfig::default();
        let p = params(&[("a", vec![0.5, -1.0, 2.0]), ("b", vec![3.0])]);
        let mut adam = Adam::new(&p, &cfg).unwrap();
        let gs = [
            vec![0.1f32, -0.2, 0.3],
            vec![-0.05, 0.4, 0.0],
            vec![1.0, 1.0, -2.0],
        ];
        let lrs = [1e-2, 5e-3, 2e-2];
        // Reference, f64 scalars.
        let mut rp = [0.5f64, -1.0, 2.0];
        let mut rm = [0.0f64; 3];
        let mut rv = [0.0f64; 3];
        for (t, (g, lr)) in gs.iter().zip(lrs).enumerate() {
            // "b" gets no gradient: must stay untouched.
            adam.step(&p, &grads(&[("a", g.clone())]), lr).unwrap();
            let t = t as i32 + 1;
            for i in 0..3 {
                let gi = f64::from(g[i]);
                rm[i] = 0.9 * rm[i] + 0.1 * gi;
                rv[i] = 0.999 * rv[i] + 0.001 * gi * gi;
                let bc1 = 1.0 - 0.9f64.powi(t);
                let bc2 = 1.0 - 0.999f64.powi(t);
                rp[i] -= lr / bc1 * rm[i] / (rv[i].sqrt() / bc2.sqrt() + 1e-6);
            }
        }
        let got = vals(&p, "a");
        for i in 0..3 {
            assert!(
                (f64::from(got[i]) - rp[i]).abs() < 1e-6,
                "{i}: {} vs {}",
                got[i],
                rp[i]
            );
        }
        assert_eq!(vals(&p, "b"), vec![3.0]);
        assert_eq!(adam.steps["a"], 3);
        assert_eq!(adam.steps["b"], 0);
        // First Adam step moves each coordinate by ~lr * sign(g) (bias-corrected).
        let p2 = params(&[("a", vec![0.0, 0.0])]);
        let mut a2 = Adam::new(&p2, &cfg).unwrap();
        a2.step(&p2, &grads(&[("a", vec![0.3, -7.0])]), 0.01)
            .unwrap();
        let got = vals(&p2, "a");
        assert!(
            (got[0] + 0.01).abs() < 1e-6 && (got[1] - 0.01).abs() < 1e-6,
            "{got:?}"
        );
    }

    /// bf16 forward from f32 master weights: gradients arrive in f32 and Adam updates the masters.
    #[test]
    fn bf16_forward_f32_master_update() {
        let vm = candle_nn::VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        let w = vb
            .get_with_hints((3, 2), "lin.weight", candle_nn::Init::Const(0.5))
            .unwrap();
        let _b = vb
            .get_with_hints(2, "lin.bias", candle_nn::Init::Const(0.0))
            .unwrap();
        let p = params_from_varmap(&vm).unwrap();
        assert_eq!(
            p.keys().cloned().collect::<Vec<_>>(),
            vec!["lin.bias".to_string(), "lin.weight".to_string()]
        );
        let x = Tensor::new(&[[1.0f32, 2.0, 3.0]], &Device::Cpu).unwrap();
        let y = x
            .to_dtype(DType::BF16)
            .unwrap()
            .matmul(&w.to_dtype(DType::BF16).unwrap())
            .unwrap();
        let loss = y.to_dtype(DType::F32).unwrap().sum_all().unwrap();
        let store = loss.backward().unwrap();
        let mut g = Grads::new();
        for (n, v) in &p {
            if let Some(t) = store.get(v.as_tensor()) {
                g.insert(n.clone(), t.clone());
            }
        }
        assert_eq!(g.len(), 1); // the bias is unused
        assert_eq!(g["lin.weight"].dtype(), DType::F32);
        let mut adam = Adam::new(&p, &OptimConfig::default()).unwrap();
        adam.step(&p, &g, 0.1).unwrap();
        let got = p["lin.weight"].as_tensor().flatten_all().unwrap();
        let got = got.to_vec1::<f32>().unwrap();
        // All gradients are positive (x > 0): each weight moves by -lr on the first step.
        assert!(got.iter().all(|v| (v - 0.4).abs() < 1e-5), "{got:?}");
        assert_eq!(p["lin.weight"].dtype(), DType::F32);
        assert_eq!(adam.m["lin.weight"].dtype(), DType::F32);
    }

    #[test]
    fn clipping_by_global_norm() {
        let mut g = grads(&[("a", vec![3.0, 0.0]), ("b", vec![0.0, 4.0])]);
        let n = global_grad_norm(&g).unwrap();
        assert!((n - 5.0).abs() < 1e-12);
        let coef = clip_grads(&mut g, n, 0.1).unwrap();
        assert!((coef - 0.1 / (5.0 + 1e-6)).abs() < 1e-12);
        let after = global_grad_norm(&g).unwrap();
        assert!((after - 0.1).abs() < 1e-6, "{after}");
        // Direction kept.
        let a = g["a"].to_vec1::<f32>().unwrap();
        let b = g["b"].to_vec1::<f32>().unwrap();
        assert!((a[0] / b[1] - 0.75).abs() < 1e-6);
        // Below the threshold: untouched.
        let mut g2 = grads(&[("a", vec![0.01, 0.02])]);
        let n2 = global_grad_norm(&g2).unwrap();
        assert_eq!(clip_grads(&mut g2, n2, 0.1).unwrap(), 1.0);
        assert_eq!(g2["a"].to_vec1::<f32>().unwrap(), vec![0.01, 0.02]);
        // Non-finite gradients give a non-finite norm (the trainer then skips the step).
        let g3 = grads(&[("a", vec![f32::NAN, 1.0])]);
        assert!(!global_grad_norm(&g3).unwrap().is_finite());
        let g4 = grads(&[("a", vec![f32::INFINITY, 1.0])]);
        assert!(!global_grad_norm(&g4).unwrap().is_finite());
    }

    #[test]
    fn aligned_walks_sorted_maps() {
        let p = params(&[("a", vec![1.0]), ("c", vec![2.0]), ("e", vec![3.0])]);
        let m: BTreeMap<String, u32> = [("0", 0u32), ("a", 1), ("b", 2), ("e", 5), ("f", 6)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        assert_eq!(aligned(&p, &m), vec![Some(&1), None, Some(&5)]);
        let empty: BTreeMap<String, u32> = BTreeMap::new();
        assert_eq!(aligned(&p, &empty), vec![None, None, None]);
    }

    /// On the CPU the "fused" entry point takes the candle ops for every parameter: bitwise
    /// the twin, including parameters without gradient (EMA only) and a gradient for an
    /// unknown name (ignored by both).
    #[test]
    fn fused_entry_on_cpu_is_twin() {
        let mk = || {
            params(&[
                ("a", vec![0.5, -1.0, 2.0]),
                ("b", vec![3.0]),
                ("c", vec![-0.25, 0.75]),
            ])
        };
        let (pf, pt) = (mk(), mk());
        let cfg = OptimConfig::default();
        let (mut af, mut ef) = (Adam::new(&pf, &cfg).unwrap(), Ema::new(&pf, 0.9).unwrap());
        let (mut at, mut et) = (Adam::new(&pt, &cfg).unwrap(), Ema::new(&pt, 0.9).unwrap());
        let g1 = grads(&[("a", vec![0.1, -0.2, 0.3]), ("c", vec![5.0, -4.0])]);
        let g2 = grads(&[
            ("a", vec![1.0, 1.0, -2.0]),
            ("b", vec![0.5]),
            ("zz", vec![1.0]),
        ]);
        for (g, lr) in [(&g1, 1e-2), (&g2, 5e-3)] {
            let n = global_grad_norm(g).unwrap();
            let cf = clip_adam_ema_fused(&mut af, &mut ef, &pf, g, n, 1.0, lr).unwrap();
            let ct = clip_adam_ema_twin(&mut at, &mut et, &pt, g, n, 1.0, lr).unwrap();
            assert_eq!(cf.to_bits(), ct.to_bits());
        }
        for n in ["a", "b", "c"] {
            assert_eq!(vals(&pf, n), vals(&pt, n), "{n}");
            for (x, y) in [(&af.m, &at.m), (&af.v, &at.v), (&ef.weights, &et.weights)] {
                assert_eq!(
                    x[n].to_vec1::<f32>().unwrap(),
                    y[n].to_vec1::<f32>().unwrap(),
                    "{n}"
                );
            }
        }
        assert_eq!(af.steps, at.steps);
        assert_eq!(af.steps["b"], 1);
    }

    #[test]
    fn ema_tracks_weights() {
        let p = params(&[("w", vec![0.0, 10.0])]);
        let mut ema = Ema::new(&p, 0.9).unwrap();
        p["w"]
            .set(&Tensor::new(&[1.0f32, 0.0], &Device::Cpu).unwrap())
            .unwrap();
        ema.update(&p).unwrap();
        let w = ema.weights["w"].to_vec1::<f32>().unwrap();
        assert!(
            (w[0] - 0.1).abs() < 1e-6 && (w[1] - 9.0).abs() < 1e-5,
            "{w:?}"
        );
        ema.update(&p).unwrap();
        let w = ema.weights["w"].to_vec1::<f32>().unwrap();
        // 0.1 + 0.1 * (1 - 0.1) = 0.19; 9 - 0.1 * 9 = 8.1
        assert!(
            (w[0] - 0.19).abs() < 1e-6 && (w[1] - 8.1).abs() < 1e-5,
            "{w:?}"
        );
        // The EMA holds copies, not views of the parameters.
        assert_eq!(p["w"].as_tensor().to_vec1::<f32>().unwrap(), vec![1.0, 0.0]);
    }
}
