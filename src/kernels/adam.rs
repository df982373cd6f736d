//! Fused optimiser update: gradient clipping, Adam (Kingma & Ba 2015, PyTorch form, as
//! [`crate::train::optim::Adam`]) and the EMA of the weights (AF2 supplement 1.11.3, 1.11.7) in
//! ONE kernel launch for all parameters ("multi-tensor apply").
//!
//! Per element, with `c` the clipping coefficient (when clipping applies) and `aff(x, a, b)` the
//! exact arithmetic of candle's `affine` kernel:
//! ```text
//! g  = aff(g, c, 0)                                   (clip_grads)
//! m' = aff(m, b1, 0) + aff(g, 1-b1, 0)
//! v' = aff(v, b2, 0) + aff(g·g, 1-b2, 0)
//! p' = p − aff(m' / aff(sqrt(v'), 1/sqrt(bc2), eps), lr/bc1, 0)
//! w' = w − aff(w − p', 1-decay, 0)                    (Ema::update)
//! ```
//! Every constant is the twin's f64 value cast to f32 (what candle passes to its kernels), every
//! operation is one correctly rounded f32 operation in the twin's order (`__fadd_rn` & co., no
//! contraction), and `aff` is an FMA exactly when candle's compiled affine kernel is one (probed
//! once per process on the device, [`affine_is_fma`]). The fused update is therefore bitwise
//! equal to the candle-op twin (moments, weights and EMA), which the GPU test checks.
//!
//! Everything is updated in place: the parameters (`Var`s, fp32 masters, as `Var::set` does),
//! the moments and the EMA weights (the tensors in `Adam::m`/`v` and `Ema::weights` keep their
//! identity; a clone taken before the step sees the new values, take `.copy()` to snapshot). No
//! allocation: a first version that wrote fresh moment/EMA buffers (3 × 372 MB at AF2's 93M
//! parameters) took 24.5 ms per step on an H200, this one 12.3 ms.
//! Written buffers must not overlap; [`adam_ema_fused`] checks it ([`Error::Train`] otherwise).
//! The model keeps no bf16 working copy (bf16 runs cast the masters in the forward), so there is
//! none to write.

use candle_core::{DType, Device, Tensor, Var};

use super::{ElemBenchRow, ElemCheck};

use crate::error::{Error, Result};

/// NVRTC module name.
pub const MODULE: &str = "ferrofold_adam";

/// Elements handled by one thread block (a multiple of the block size).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
const CHUNK: usize = 4096;

/// CUDA C source (`adam_ema_multi_f32`). One table `tab` (u64, `T` tensors): `tab[5t..5t+5]`
/// tensor `t`'s `p, g, m, v, w` device pointers, `tab[5T..6T+1]` the offsets in the flat
/// concatenation (`offs[T]` the total), then `2T` f32 (two per u64, little-endian): `hp[2t]` its
/// step size `lr/bc1` and `hp[2t+1]` its `1/sqrt(bc2)`. `p, m, v, w` are written in place.
///
/// Block `b` updates flat elements `[b·CHUNK, (b+1)·CHUNK)`, walking the tensor segments it
/// crosses (block-uniform); in a segment each thread loads `BATCH` elements (stride = block
/// size), then computes and stores them.
#[cfg(feature = "cuda")]
pub const SOURCE: &str = r#"
#define CHUNK 4096ULL
#define BATCH 4
__device__ __forceinline__ float aff(float x, float a, float b, int fma) {
    return fma ? __fmaf_rn(x, a, b) : __fadd_rn(__fmul_rn(x, a), b);
}

extern "C" __global__ void adam_ema_multi_f32(
    const unsigned long long* tab, int n_tensors,
    float clip, int do_clip, float b1, float omb1, float b2, float omb2, float eps, float omd, int fma)
{
    __shared__ int t_first;
    const unsigned long long* ptrs = tab;
    const unsigned long long* offs = tab + 5 * n_tensors;
    const float* hp = (const float*)(tab + 6 * n_tensors + 1);
    const unsigned long long total = offs[n_tensors];
    const unsigned long long start = (unsigned long long)blockIdx.x * CHUNK;
    if (start >= total) return;
    const unsigned long long end = min(start + CHUNK, total);
    if (threadIdx.x == 0) {
        // Last tensor whose offset is <= start.
        int lo = 0, hi = n_tensors - 1;
        while (lo < hi) {
            int mid = (lo + hi + 1) / 2;
            if (offs[mid] <= start) lo = mid; else hi = mid - 1;
        }
        t_first = lo;
    }
    __syncthreads();
    const unsigned long long nthr = blockDim.x;
    int t = t_first;
    unsigned long long s = start;
    while (s < end) {
        while (offs[t + 1] <= s) t++;
        const unsigned long long base = offs[t];
        const unsigned long long seg_end = min(offs[t + 1], end);
        float* p = (float*)ptrs[5 * t];
        const float* g = (const float*)ptrs[5 * t + 1];
        float* m = (float*)ptrs[5 * t + 2];
        float* v = (float*)ptrs[5 * t + 3];
        float* w = (float*)ptrs[5 * t + 4];
        const float step_size = hp[2 * t];
        const float inv_sqrt_bc2 = hp[2 * t + 1];
        for (unsigned long long i0 = s + threadIdx.x; i0 < seg_end; i0 += BATCH * nthr) {
            float pr[BATCH], gr[BATCH], mr[BATCH], vr[BATCH], wr[BATCH];
#pragma unroll
            for (int k = 0; k < BATCH; k++) {
                const unsigned long long i = i0 + k * nthr;
                if (i < seg_end) {
                    const unsigned long long li = i - base;
                    pr[k] = p[li]; gr[k] = g[li]; mr[k] = m[li]; vr[k] = v[li]; wr[k] = w[li];
                }
            }
#pragma unroll
            for (int k = 0; k < BATCH; k++) {
                const unsigned long long i = i0 + k * nthr;
                if (i < seg_end) {
                    const unsigned long long li = i - base;
                    float gv = gr[k];
                    if (do_clip) gv = aff(gv, clip, 0.0f, fma);
                    float mv = __fadd_rn(aff(mr[k], b1, 0.0f, fma), aff(gv, omb1, 0.0f, fma));
                    float vv = __fadd_rn(aff(vr[k], b2, 0.0f, fma), aff(__fmul_rn(gv, gv), omb2, 0.0f, fma));
                    float den = aff(__fsqrt_rn(vv), inv_sqrt_bc2, eps, fma);
                    float upd = aff(__fdiv_rn(mv, den), step_size, 0.0f, fma);
                    float pv = __fsub_rn(pr[k], upd);
                    float wv = wr[k];
                    float d = aff(__fsub_rn(wv, pv), omd, 0.0f, fma);
                    p[li] = pv;
                    m[li] = mv;
                    v[li] = vv;
                    w[li] = __fsub_rn(wv, d);
                }
            }
        }
        s = seg_end;
    }
}
"#;

/// Optimiser hyper-parameters of one fused update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamEmaHyper {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub lr: f64,
    pub ema_decay: f64,
    /// The clipping coefficient when clipping applies (`clip_grads` returned < 1), else `None`.
    pub clip: Option<f64>,
}

/// One parameter's operands: master weight (updated in place), gradient, moments, EMA weight,
/// and its update count `step` AFTER this update (`t` of the bias correction, >= 1).
#[derive(Debug, Clone, Copy)]
pub struct AdamEmaItem<'a> {
    pub p: &'a Var,
    pub g: &'a Tensor,
    pub m: &'a Tensor,
    pub v: &'a Tensor,
    pub w: &'a Tensor,
    pub step: u64,
}

/// Whether the fused update can take this parameter: all operands f32 on the same CUDA device,
/// same shape, non-empty, contiguous.
pub fn eligible(it: &AdamEmaItem) -> bool {
    let p = it.p.as_tensor();
    if !(cfg!(feature = "cuda") && p.device().is_cuda() && p.elem_count() > 0) {
        return false;
    }
    [it.g, it.m, it.v, it.w, p].iter().all(|t| {
        t.dtype() == DType::F32
            && t.shape() == p.shape()
            && t.is_contiguous()
            && t.device().same_device(p.device())
    })
}

/// `(lr / bc1, 1 / sqrt(bc2))` as the twin computes them (f64, cast to f32 by candle).
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn step_consts(h: &AdamEmaHyper, step: u64) -> (f32, f32) {
    let tt = i32::try_from(step).unwrap_or(i32::MAX);
    let bc1 = 1.0 - h.beta1.powi(tt);
    let bc2 = 1.0 - h.beta2.powi(tt);
    ((h.lr / bc1) as f32, (1.0 / bc2.sqrt()) as f32)
}

/// Apply clip + Adam + EMA to every item in one launch (all items [`eligible`], on one device),
/// updating `p`, `m`, `v` and `w` in place. Errors (before any write) when two written buffers
/// overlap.
pub fn adam_ema_fused(items: &[AdamEmaItem], h: &AdamEmaHyper) -> Result<()> {
    if items.is_empty() {
        return Ok(());
    }
    if let Some(bad) = items.iter().position(|it| !eligible(it)) {
        return Err(Error::Train(format!(
            "fused Adam: operand {bad} is not f32/contiguous/CUDA/same-shape"
        )));
    }
    adam_ema_fused_unchecked(items, h)
}

/// [`adam_ema_fused`] for items the caller already filtered with [`eligible`] (no second pass
/// over the 5 operands of every parameter). The overlap check still runs.
pub(crate) fn adam_ema_fused_unchecked(items: &[AdamEmaItem], h: &AdamEmaHyper) -> Result<()> {
    if items.is_empty() {
        return Ok(());
    }
    #[cfg(feature = "cuda")]
    {
        cuda::launch(items, h, 0).map(|_| ())
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = h;
        Err(Error::Msg("fused Adam needs the `cuda` feature".into()))
    }
}

/// For benchmarks: the GPU time (ms, CUDA events) of one launch of the fused kernel, averaged
/// over `reps` back-to-back launches from one table (each launch applies another update).
pub fn adam_ema_kernel_ms(items: &[AdamEmaItem], h: &AdamEmaHyper, reps: usize) -> Result<f64> {
    if items.is_empty() || reps == 0 {
        return Ok(0.0);
    }
    if let Some(bad) = items.iter().position(|it| !eligible(it)) {
        return Err(Error::Train(format!(
            "fused Adam: operand {bad} is not f32/contiguous/CUDA/same-shape"
        )));
    }
    #[cfg(feature = "cuda")]
    {
        cuda::launch(items, h, reps)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = h;
        Err(Error::Msg("fused Adam needs the `cuda` feature".into()))
    }
}

/// Whether candle's CUDA `affine` kernel (`x * mul + add`) is compiled to one FMA on `dev`
/// (probed once per process: `x = mul = 1 + 2⁻¹², add = −1` gives `2⁻¹¹ + 2⁻²⁴` with an FMA,
/// `2⁻¹¹` without).
pub fn affine_is_fma(dev: &Device) -> Result<bool> {
    use std::sync::OnceLock;
    static FMA: OnceLock<bool> = OnceLock::new();
    if let Some(v) = FMA.get() {
        return Ok(*v);
    }
    let x = 1.0f32 + 2f32.powi(-12);
    let t = Tensor::new(&[x], dev)?.affine(f64::from(x), -1.0)?;
    let got = t.to_vec1::<f32>()?[0];
    let fma = got != 2f32.powi(-11);
    Ok(*FMA.get_or_init(|| fma))
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::Mutex;

    use candle_core::cuda_backend::WrapErr;
    use candle_core::Device;
    use cudarc::driver::{DevicePtr, LaunchConfig, PushKernelArg};

    use super::super::launch::{cuda_storage, range};
    use super::super::nvrtc;
    use super::{affine_is_fma, step_consts, AdamEmaHyper, AdamEmaItem, CHUNK, MODULE, SOURCE};
    use crate::error::{Error, Result};

    /// The written `(pointer, bytes)` list last found pairwise disjoint (the parameters,
    /// moments and EMA weights keep their buffers from step to step: checked once).
    static DISJOINT: Mutex<Vec<(u64, u64)>> = Mutex::new(Vec::new());

    /// Error unless the `(pointer, bytes)` ranges are pairwise disjoint.
    fn check_disjoint(written: &[(u64, u64)]) -> Result<()> {
        let mut last = DISJOINT
            .lock()
            .map_err(|_| Error::Train("fused Adam: overlap cache poisoned".into()))?;
        if last.as_slice() == written {
            return Ok(());
        }
        let mut sorted = written.to_vec();
        sorted.sort_unstable();
        if sorted.windows(2).any(|w| w[0].0 + w[0].1 > w[1].0) {
            return Err(Error::Train(
                "fused Adam: parameters, moments or EMA weights share memory".into(),
            ));
        }
        *last = written.to_vec();
        Ok(())
    }

    /// One launch (`reps == 0`, returns 0), or `reps` launches timed by CUDA events (returns the
    /// mean GPU ms per launch; synchronises).
    pub(super) fn launch(items: &[AdamEmaItem], h: &AdamEmaHyper, reps: usize) -> Result<f64> {
        let device = items[0].p.as_tensor().device().clone();
        let Device::Cuda(dev) = &device else {
            return Err(Error::Train("fused Adam: not a CUDA device".into()));
        };
        let fma = i32::from(affine_is_fma(&device)?);
        let f = nvrtc::func(dev, MODULE, SOURCE, "adam_ema_multi_f32")?;
        let stream = dev.cuda_stream();
        let n = items.len();

        // One table: 5 pointers per tensor, the offsets, the per-tensor constants.
        let mut tab: Vec<u64> = Vec::with_capacity(7 * n + 1);
        let mut offs: Vec<u64> = Vec::with_capacity(n + 1);
        let mut hp: Vec<u64> = Vec::with_capacity(n);
        let mut total = 0usize;
        // Parameters usually share one step count: compute its constants once.
        let mut last: Option<(u64, (f32, f32))> = None;
        for it in items {
            offs.push(total as u64);
            total += it.p.as_tensor().elem_count();
            let (step_size, inv_sqrt_bc2) = match last {
                Some((s, c)) if s == it.step => c,
                _ => {
                    let c = step_consts(h, it.step);
                    last = Some((it.step, c));
                    c
                }
            };
            // Little-endian: `step_size` is the f32 at the lower address.
            hp.push(u64::from(step_size.to_bits()) | (u64::from(inv_sqrt_bc2.to_bits()) << 32));
        }
        offs.push(total as u64);

        // Device pointers of every operand (read guards held until after the launch).
        let guards: Vec<_> = items
            .iter()
            .flat_map(|it| [it.p.as_tensor(), it.g, it.m, it.v, it.w])
            .map(|t| t.storage_and_layout())
            .collect();
        let mut syncs = Vec::with_capacity(guards.len());
        for (s, l) in &guards {
            let r = range(l)?;
            let (ptr, sync) = cuda_storage(s)?.as_cuda_slice::<f32>()?.device_ptr(&stream);
            tab.push(ptr + 4 * r.start as u64);
            syncs.push(sync);
        }
        // The written buffers (p, m, v, w of every tensor) must be pairwise disjoint.
        let mut written: Vec<(u64, u64)> = Vec::with_capacity(4 * n);
        for t in 0..n {
            let bytes = 4 * (offs[t + 1] - offs[t]);
            for k in [0, 2, 3, 4] {
                written.push((tab[5 * t + k], bytes));
            }
        }
        check_disjoint(&written)?;
        tab.extend_from_slice(&offs);
        tab.extend_from_slice(&hp);
        let d_tab = stream.clone_htod(&tab).w()?;
        let n_tensors =
            i32::try_from(n).map_err(|_| Error::Train("fused Adam: too many tensors".into()))?;
        let (clip, do_clip) = match h.clip {
            Some(c) => (c as f32, 1i32),
            None => (1.0f32, 0i32),
        };
        let b1 = h.beta1 as f32;
        let omb1 = (1.0 - h.beta1) as f32;
        let b2 = h.beta2 as f32;
        let omb2 = (1.0 - h.beta2) as f32;
        let eps = h.eps as f32;
        let omd = (1.0 - h.ema_decay) as f32;
        let blocks = u32::try_from(total.div_ceil(CHUNK))
            .map_err(|_| Error::Train("fused Adam: too many elements".into()))?;
        let cfg = LaunchConfig {
            grid_dim: (blocks.max(1), 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let timing = if reps > 0 {
            let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
            Some((stream.record_event(flags).w()?, flags))
        } else {
            None
        };
        for _ in 0..reps.max(1) {
            let mut b = stream.launch_builder(&f);
            b.arg(&d_tab)
                .arg(&n_tensors)
                .arg(&clip)
                .arg(&do_clip)
                .arg(&b1)
                .arg(&omb1)
                .arg(&b2)
                .arg(&omb2)
                .arg(&eps)
                .arg(&omd)
                .arg(&fma);
            // SAFETY: the table describes live, contiguous, pairwise disjoint f32 buffers of the
            // given sizes (read guards held). They are written in place through those pointers
            // (as `Var::set` writes a variable), on candle's stream, after every earlier use on it.
            unsafe { b.launch(cfg) }.w()?;
        }
        let ms = match timing {
            Some((e0, flags)) => {
                let e1 = stream.record_event(flags).w()?;
                e1.synchronize().w()?;
                f64::from(e0.elapsed_ms(&e1).w()?) / reps as f64
            }
            None => 0.0,
        };
        drop(syncs);
        drop(guards);
        Ok(ms)
    }
}

/// Deep copies of a parameter set (fresh `Var`s with the same values).
fn copy_params(p: &crate::train::optim::Params) -> Result<crate::train::optim::Params> {
    p.iter()
        .map(|(n, v)| Ok((n.clone(), Var::from_tensor(&v.as_tensor().copy()?)?)))
        .collect()
}

/// Max of [`super::rel_err`] over the tensors of two maps with the same keys.
fn max_err_maps<'a>(
    a: impl Iterator<Item = (&'a String, &'a Tensor)>,
    b: &std::collections::BTreeMap<String, Tensor>,
) -> Result<f64> {
    let mut worst = 0f64;
    for (n, t) in a {
        let u = b
            .get(n)
            .ok_or_else(|| Error::Msg(format!("adam check: `{n}` missing")))?;
        let e = super::rel_err(t, u)?;
        worst = if e.is_nan() { e } else { worst.max(e) };
    }
    Ok(worst)
}

/// Random parameters of `shapes` (named `p00`, `p01`, ...) and gradients on `dev`.
fn random_set(
    shapes: &[Vec<usize>],
    seed: u64,
    grad_scales: &[f32],
    dev: &Device,
) -> Result<(crate::train::optim::Params, Vec<crate::train::optim::Grads>)> {
    let mut params = crate::train::optim::Params::new();
    let mut grads = vec![crate::train::optim::Grads::new(); grad_scales.len()];
    for (i, s) in shapes.iter().enumerate() {
        let name = format!("p{i:02}");
        let t = super::uniform_tensor(s, 0.5, seed ^ (i as u64) << 20, DType::F32, dev)?;
        params.insert(name.clone(), Var::from_tensor(&t)?);
        for (k, g) in grads.iter_mut().enumerate() {
            let sc = grad_scales[k];
            let gt = super::uniform_tensor(
                s,
                sc,
                seed ^ ((i as u64) << 20) ^ (k as u64 + 7),
                DType::F32,
                dev,
            )?;
            g.insert(name.clone(), gt);
        }
    }
    Ok((params, grads))
}

/// Fused (`clip_adam_ema_fused`) vs twin (`clip_adam_ema_twin`): three steps from the same state
/// (one without clipping, one where a parameter has no gradient, one clipped), comparing weights,
/// both moments, the EMA and the step counts. The tolerance is 0: bitwise.
pub fn self_check(dev: &Device) -> Result<Vec<ElemCheck>> {
    use crate::train::optim::{
        clip_adam_ema_fused, clip_adam_ema_twin, global_grad_norm, Adam, Ema,
    };
    let shapes: Vec<Vec<usize>> = vec![
        vec![1],
        vec![7],
        vec![3, 5],
        vec![64, 33],
        vec![256, 256],
        vec![4097],
        vec![128, 3, 11],
    ];
    let (p_twin, grads) = random_set(&shapes, 0xada0, &[1.0, 1e-3, 30.0], dev)?;
    let p_fused = copy_params(&p_twin)?;
    let cfg = crate::config::OptimConfig::default();
    let mut a_t = Adam::new(&p_twin, &cfg)?;
    let mut e_t = Ema::new(&p_twin, 0.999)?;
    let mut a_f = Adam::new(&p_fused, &cfg)?;
    let mut e_f = Ema::new(&p_fused, 0.999)?;
    let mut g1 = grads[1].clone();
    g1.remove("p02");
    let steps = [(&grads[0], 1e-3), (&g1, 5e-4), (&grads[2], 2e-3)];
    for (g, lr) in steps {
        // max_norm 1: steps 1 and 3 are clipped, step 2 (gradients ~1e-3) is not.
        let norm = global_grad_norm(g)?;
        let ct = clip_adam_ema_twin(&mut a_t, &mut e_t, &p_twin, g, norm, 1.0, lr)?;
        let cf = clip_adam_ema_fused(&mut a_f, &mut e_f, &p_fused, g, norm, 1.0, lr)?;
        if ct != cf {
            return Err(Error::Msg(format!(
                "adam check: clip coefficient {cf} vs {ct}"
            )));
        }
    }
    let fma = affine_is_fma(dev)?;
    let case = format!("{} tensors, 3 steps, affine fma={fma}", shapes.len());
    let pt: std::collections::BTreeMap<String, Tensor> = p_twin
        .iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
        .collect();
    let pf = p_fused.iter().map(|(n, v)| (n, v.as_tensor()));
    let steps_ok = if a_t.steps == a_f.steps {
        0.0
    } else {
        f64::INFINITY
    };
    Ok(vec![
        ElemCheck {
            op: "adam weights".into(),
            case: case.clone(),
            max_err: max_err_maps(pf, &pt)?,
            tol: 0.0,
        },
        ElemCheck {
            op: "adam m".into(),
            case: case.clone(),
            max_err: max_err_maps(a_f.m.iter(), &a_t.m)?,
            tol: 0.0,
        },
        ElemCheck {
            op: "adam v".into(),
            case: case.clone(),
            max_err: max_err_maps(a_f.v.iter(), &a_t.v)?,
            tol: 0.0,
        },
        ElemCheck {
            op: "ema".into(),
            case: case.clone(),
            max_err: max_err_maps(e_f.weights.iter(), &e_t.weights)?,
            tol: 0.0,
        },
        ElemCheck {
            op: "adam steps".into(),
            case,
            max_err: steps_ok,
            tol: 0.0,
        },
    ])
}

/// The parameter shapes of the full AF2 model (`ModelConfig::default()`), sorted by name.
pub fn af2_param_shapes(dev: &Device) -> Result<Vec<Vec<usize>>> {
    let vm = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&vm, DType::F32, dev);
    let _model =
        crate::model::alphafold::AlphaFold::new(vb, &crate::config::ModelConfig::default())?;
    let params = crate::train::optim::params_from_varmap(&vm)?;
    Ok(params.values().map(|v| v.dims().to_vec()).collect())
}

/// One optimiser step (clip + Adam + EMA) over the full AF2 parameter set (~93M parameters)
/// on `dev`: fused vs twin median time (clipping active), and the max error (0 = bitwise).
pub fn bench_rows(dev: &Device, iters: usize) -> Result<Vec<ElemBenchRow>> {
    use crate::train::optim::{clip_adam_ema_fused, clip_adam_ema_twin, Adam, Ema};
    let shapes = af2_param_shapes(dev)?;
    let n: usize = shapes.iter().map(|s| s.iter().product::<usize>()).sum();
    let (p_twin, grads) = random_set(&shapes, 0xbe7c, &[1.0], dev)?;
    let p_fused = copy_params(&p_twin)?;
    let cfg = crate::config::OptimConfig::default();
    let mut a_t = Adam::new(&p_twin, &cfg)?;
    let mut e_t = Ema::new(&p_twin, 0.999)?;
    let mut a_f = Adam::new(&p_fused, &cfg)?;
    let mut e_f = Ema::new(&p_fused, 0.999)?;
    let g = &grads[0];
    let norm = 10.0; // clipping active (max_norm 0.1)
    let fused_ms = super::median_ms(dev, 2, iters, || {
        clip_adam_ema_fused(&mut a_f, &mut e_f, &p_fused, g, norm, 0.1, 1e-3).map(|_| ())
    })?;
    let twin_ms = super::median_ms(dev, 2, iters, || {
        clip_adam_ema_twin(&mut a_t, &mut e_t, &p_twin, g, norm, 0.1, 1e-3).map(|_| ())
    })?;
    // Same number of steps on both sides: compare.
    let pt: std::collections::BTreeMap<String, Tensor> = p_twin
        .iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
        .collect();
    let err_p = max_err_maps(p_fused.iter().map(|(k, v)| (k, v.as_tensor())), &pt)?;
    let err_m = max_err_maps(a_f.m.iter(), &a_t.m)?;
    let err_w = max_err_maps(e_f.weights.iter(), &e_t.weights)?;
    let case = format!(
        "AF2: {} tensors, {:.1}M params f32",
        shapes.len(),
        n as f64 / 1e6
    );
    let mut rows = vec![ElemBenchRow {
        op: "clip+adam+ema step".into(),
        case: case.clone(),
        fused_ms,
        twin_ms,
        max_err: err_p.max(err_m).max(err_w),
    }];
    // GPU time of the kernel alone (CUDA events over back-to-back launches; twin column: the
    // whole fused call above, host work included).
    {
        let mut items = Vec::with_capacity(p_fused.len());
        for (name, p) in &p_fused {
            let state = (
                g.get(name),
                a_f.m.get(name),
                a_f.v.get(name),
                e_f.weights.get(name),
            );
            let (Some(g), Some(m), Some(v), Some(w)) = state else {
                return Err(Error::Msg(format!("adam bench: no state for `{name}`")));
            };
            items.push(AdamEmaItem {
                p,
                g,
                m,
                v,
                w,
                step: 100,
            });
        }
        let h = AdamEmaHyper {
            beta1: a_f.beta1,
            beta2: a_f.beta2,
            eps: a_f.eps,
            lr: 1e-3,
            ema_decay: e_f.decay,
            clip: Some(0.01),
        };
        adam_ema_kernel_ms(&items, &h, 1)?;
        let kernel_ms = adam_ema_kernel_ms(&items, &h, iters.max(1) * 2)?;
        rows.push(ElemBenchRow {
            op: "adam kernel only (GPU)".into(),
            case: case.clone(),
            fused_ms: kernel_ms,
            twin_ms: fused_ms,
            max_err: 0.0,
        });
    }
    drop((p_twin, a_t, e_t));
    // The trainer's whole update (`StepUpdate::apply`: fused global norm + clip + Adam + EMA)
    // vs the previous path (global norm by candle ops, then the fused clip + Adam + EMA).
    {
        use crate::kernels::grad_norm::sum_sq_candle;
        use crate::train::optim::StepUpdate;
        let mut up = StepUpdate::new(&p_fused, &cfg)?;
        let fused_ms = super::median_ms(dev, 2, iters, || up.apply(&p_fused, g, 1e-4).map(|_| ()))?;
        let refs: Vec<&Tensor> = g.values().collect();
        let twin_ms = super::median_ms(dev, 1, iters.min(3), || {
            let norm = sum_sq_candle(&refs)?.sqrt();
            clip_adam_ema_fused(&mut up.adam, &mut up.ema, &p_fused, g, norm, 0.1, 1e-4).map(|_| ())
        })?;
        rows.push(ElemBenchRow {
            op: "update (twin: candle norm)".into(),
            case: case.clone(),
            fused_ms,
            twin_ms,
            max_err: 0.0,
        });
        // Its parts: the global norm as the trainer calls it, and clip + Adam + EMA.
        let norm_ms = super::median_ms(dev, 2, iters, || {
            crate::train::optim::global_grad_norm(g).map(|_| ())
        })?;
        let opt_ms = super::median_ms(dev, 2, iters, || {
            crate::train::optim::clip_adam_ema(
                &mut up.adam,
                &mut up.ema,
                &p_fused,
                g,
                10.0,
                0.1,
                1e-4,
            )
            .map(|_| ())
        })?;
        rows.push(ElemBenchRow {
            op: "update parts: norm | adam".into(),
            case,
            fused_ms: norm_ms,
            twin_ms: opt_ms,
            max_err: 0.0,
        });
    }
    Ok(rows)
}
