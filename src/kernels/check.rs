//! Self-check of the fused LayerNorm / softmax kernels against their composite twins.
//!
//! For each case the fused op and the twin run on the same (dtype-rounded) random inputs; both are
//! compared with a reference: the twin in f32 on the same values (for f32 cases it is the twin
//! itself). Checked: the forward output and the gradient of every differentiable input for a
//! random cotangent, plus run-to-run bitwise reproducibility of the fused gradients. An error is
//! `max |a − ref| / max(max |ref|, 1e-6)`.

use candle_core::{DType, Device, Tensor, Var};

use crate::error::{Error, Result};
use crate::model::primitives::{layer_norm_twin, softmax_with_biases_twin};

/// One compared quantity of [`self_check`].
#[derive(Debug, Clone)]
pub struct CheckRow {
    /// Case name (kernel and shape).
    pub case: String,
    pub dtype: DType,
    /// `y`, `dx`, `dw`, `db`, `db2`, ... or `repro`.
    pub what: String,
    /// Fused vs reference.
    pub err: f64,
    /// Twin (same dtype) vs reference, for scale.
    pub err_twin: f64,
    pub tol: f64,
    pub pass: bool,
    /// `false` when the fused path declined the case (composite fallback); then `pass` says
    /// whether that was expected.
    pub fused: bool,
}

/// Relative tolerance of a dtype (bf16 outputs are rounded to 8 mantissa bits).
pub fn tolerance(dt: DType) -> f64 {
    match dt {
        DType::BF16 | DType::F16 => 2e-2,
        _ => 1e-4,
    }
}

/// `max |a − r| / max |r|` (both read as f32).
pub fn rel_err(a: &Tensor, r: &Tensor) -> Result<f64> {
    let a = a.to_dtype(DType::F32)?;
    let r = r.to_dtype(DType::F32)?;
    let d = (a - &r)?.abs()?.max_all()?.to_scalar::<f32>()? as f64;
    let m = r.abs()?.max_all()?.to_scalar::<f32>()? as f64;
    if d.is_nan() {
        return Ok(f64::INFINITY);
    }
    Ok(d / m.max(1e-6))
}

/// Max |a − b| (f32); 0 iff equal (used for bitwise reproducibility).
fn abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    let a = a.to_dtype(DType::F32)?;
    let b = b.to_dtype(DType::F32)?;
    Ok((a - b)?.abs()?.max_all()?.to_scalar::<f32>()? as f64)
}

/// Deterministic uniform tensor in `[-scale, scale)`, built on the CPU, moved to `dev` in `dt`.
fn rand(shape: &[usize], scale: f32, seed: u64, dt: DType, dev: &Device) -> Result<Tensor> {
    crate::bench::random_tensor(shape, scale, seed, dt, dev)
}

type Op<'a> = dyn Fn(&[Tensor]) -> Result<Option<Tensor>> + 'a;

/// Output and gradients (of the inputs flagged in `diff`) of `f` for cotangent `g`.
fn run(
    f: &Op<'_>,
    inputs: &[Tensor],
    diff: &[bool],
    g: &Tensor,
) -> Result<Option<(Tensor, Vec<Tensor>)>> {
    let vars = inputs
        .iter()
        .zip(diff)
        .map(|(t, &d)| Ok(if d { Some(Var::from_tensor(t)?) } else { None }))
        .collect::<Result<Vec<_>>>()?;
    let ins: Vec<Tensor> = inputs
        .iter()
        .zip(&vars)
        .map(|(t, v)| {
            v.as_ref()
                .map_or_else(|| t.clone(), |v| v.as_tensor().clone())
        })
        .collect();
    let Some(y) = f(&ins)? else {
        return Ok(None);
    };
    let loss = (y.to_dtype(DType::F32)? * g.to_dtype(DType::F32)?)?.sum_all()?;
    let grads = loss.backward()?;
    let mut gs = Vec::new();
    for v in vars.iter().flatten() {
        let gv = grads
            .get(v.as_tensor())
            .ok_or_else(|| Error::Msg("self-check: missing gradient".into()))?;
        gs.push(gv.clone());
    }
    Ok(Some((y, gs)))
}

struct Case<'a> {
    name: String,
    inputs: Vec<Tensor>,
    /// Which inputs are differentiated, and their gradient names.
    diff: Vec<bool>,
    names: Vec<&'static str>,
    fused: Box<Op<'a>>,
    twin: Box<Op<'a>>,
    /// The fused path must take this case (`false`: must decline it).
    expect_fused: bool,
}

fn compare(case: Case<'_>, dt: DType, dev: &Device, rows: &mut Vec<CheckRow>) -> Result<()> {
    let tol = tolerance(dt);
    let probe =
        (case.twin)(&case.inputs)?.ok_or_else(|| Error::Msg("self-check: twin declined".into()))?;
    let g = rand(probe.dims(), 1.0, 7, dt, dev)?;
    let ref_inputs = case
        .inputs
        .iter()
        .map(|t| {
            Ok(if t.dtype() == dt {
                t.to_dtype(DType::F32)?
            } else {
                t.clone()
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let (yr, gr) = run(
        &*case.twin,
        &ref_inputs,
        &case.diff,
        &g.to_dtype(DType::F32)?,
    )?
    .ok_or_else(|| Error::Msg("self-check: twin declined".into()))?;
    let (yt, gt) = run(&*case.twin, &case.inputs, &case.diff, &g)?
        .ok_or_else(|| Error::Msg("self-check: twin declined".into()))?;
    let fused = run(&*case.fused, &case.inputs, &case.diff, &g)?;
    let Some((yf, gf)) = fused else {
        rows.push(CheckRow {
            case: case.name,
            dtype: dt,
            what: "declined".into(),
            err: 0.0,
            err_twin: 0.0,
            tol,
            pass: !case.expect_fused,
            fused: false,
        });
        return Ok(());
    };
    let mut push = |what: &str, f: &Tensor, t: &Tensor, r: &Tensor| -> Result<()> {
        if f.dims() != r.dims() || f.dtype() != t.dtype() {
            return Err(Error::Msg(format!(
                "self-check {} {what}: fused {:?} {:?} vs twin {:?} {:?}",
                case.name,
                f.dims(),
                f.dtype(),
                t.dims(),
                t.dtype()
            )));
        }
        let err = rel_err(f, r)?;
        rows.push(CheckRow {
            case: case.name.clone(),
            dtype: dt,
            what: what.to_string(),
            err,
            err_twin: rel_err(t, r)?,
            tol,
            pass: err <= tol && case.expect_fused,
            fused: true,
        });
        Ok(())
    };
    push("y", &yf, &yt, &yr)?;
    for (i, name) in case.names.iter().enumerate() {
        push(name, &gf[i], &gt[i], &gr[i])?;
    }
    // Bitwise reproducibility of the fused forward and gradients.
    if let Some((yf2, gf2)) = run(&*case.fused, &case.inputs, &case.diff, &g)? {
        let mut d = abs_diff(&yf, &yf2)?;
        for (a, b) in gf.iter().zip(&gf2) {
            d = d.max(abs_diff(a, b)?);
        }
        rows.push(CheckRow {
            case: case.name.clone(),
            dtype: dt,
            what: "repro".into(),
            err: d,
            err_twin: 0.0,
            tol: 0.0,
            pass: d == 0.0,
            fused: true,
        });
    }
    Ok(())
}

fn ln_case<'a>(dims: &[usize], dt: DType, dev: &Device, seed: u64) -> Result<Case<'a>> {
    let c = *dims.last().unwrap_or(&1);
    let x = (rand(dims, 2.0, seed, dt, dev)? + 0.5)?;
    let w = (rand(&[c], 0.5, seed + 1, DType::F32, dev)? + 1.0)?;
    let b = rand(&[c], 0.5, seed + 2, DType::F32, dev)?;
    Ok(Case {
        name: format!("layer_norm {dims:?}"),
        inputs: vec![x, w, b],
        diff: vec![true, true, true],
        names: vec!["dx", "dw", "db"],
        fused: Box::new(|t: &[Tensor]| super::layer_norm::layer_norm(&t[0], &t[1], &t[2], 1e-5)),
        twin: Box::new(|t: &[Tensor]| Ok(Some(layer_norm_twin(&t[0], &t[1], &t[2], 1e-5)?))),
        expect_fused: c <= super::layer_norm::MAX_C,
    })
}

/// Key-mask bias `[B, 1, 1, K]` (`-1e9` where masked): every 5th key masked, batch 0 fully
/// masked (padded rows).
fn mask_bias(b: usize, k: usize, dt: DType, dev: &Device) -> Result<Tensor> {
    let mut m = vec![1f32; b * k];
    for (i, v) in m.iter_mut().enumerate() {
        if i < k || i % 5 == 3 {
            *v = 0.0;
        }
    }
    let m = Tensor::from_vec(m, (b, 1, 1, k), &Device::Cpu)?
        .to_dtype(dt)?
        .to_device(dev)?;
    crate::model::primitives::mask_bias(&m, 1e9)
}

/// Attention logits `[B, H, Q, K]` + mask bias (constant) + pair bias `[1, H, Q, K]` (grad).
/// `permuted`: the pair bias is a permuted (non-contiguous) view, as built from `[Q, K, H]`.
fn attn_case<'a>(
    (b, h, q, k): (usize, usize, usize, usize),
    permuted: bool,
    dt: DType,
    dev: &Device,
    seed: u64,
) -> Result<Case<'a>> {
    let x = rand(&[b, h, q, k], 3.0, seed, dt, dev)?;
    let mb = mask_bias(b, k, dt, dev)?;
    // The permuted pair bias is differentiated as its [Q, K, H] source, viewed inside the op.
    let pb = if permuted {
        rand(&[q, k, h], 2.0, seed + 1, dt, dev)?
    } else {
        rand(&[1, h, q, k], 2.0, seed + 1, dt, dev)?
    };
    let view = move |t: &Tensor| -> Result<Tensor> {
        Ok(if permuted {
            t.permute((2, 0, 1))?.unsqueeze(0)?
        } else {
            t.clone()
        })
    };
    let f = move |t: &[Tensor]| super::softmax::softmax_with_biases(&t[0], &[&t[1], &view(&t[2])?]);
    let tw = move |t: &[Tensor]| {
        Ok(Some(softmax_with_biases_twin(
            &t[0],
            &[&t[1], &view(&t[2])?],
        )?))
    };
    Ok(Case {
        name: format!(
            "softmax(x+mask+pair) x[{b},{h},{q},{k}]{}",
            if permuted { " pair permuted" } else { "" }
        ),
        inputs: vec![x, mb, pb],
        diff: vec![true, false, true],
        names: vec!["dx", "dpair"],
        fused: Box::new(f),
        twin: Box::new(tw),
        expect_fused: true,
    })
}

/// `softmax(x + b)` for a generic broadcast bias (gradient reduced by candle sums).
fn bias_case<'a>(
    xd: &[usize],
    bd: &[usize],
    dt: DType,
    dev: &Device,
    seed: u64,
) -> Result<Case<'a>> {
    let x = rand(xd, 3.0, seed, dt, dev)?;
    let bias = rand(bd, 2.0, seed + 1, dt, dev)?;
    Ok(Case {
        name: format!("softmax(x+b) x{xd:?} b{bd:?}"),
        inputs: vec![x, bias],
        diff: vec![true, true],
        names: vec!["dx", "db"],
        fused: Box::new(|t: &[Tensor]| super::softmax::softmax_with_biases(&t[0], &[&t[1]])),
        twin: Box::new(|t: &[Tensor]| Ok(Some(softmax_with_biases_twin(&t[0], &[&t[1]])?))),
        expect_fused: true,
    })
}

fn plain_case<'a>(xd: &[usize], dt: DType, dev: &Device, seed: u64) -> Result<Case<'a>> {
    Ok(Case {
        name: format!("softmax x{xd:?}"),
        inputs: vec![rand(xd, 4.0, seed, dt, dev)?],
        diff: vec![true],
        names: vec!["dx"],
        fused: Box::new(|t: &[Tensor]| super::softmax::softmax(&t[0])),
        twin: Box::new(|t: &[Tensor]| Ok(Some(crate::model::primitives::softmax_twin(&t[0])?))),
        expect_fused: true,
    })
}

/// Fused vs twin on random inputs (AF2 shapes, odd sizes, masked and fully-masked rows), f32 and
/// bf16. Errors when `dev` is not a CUDA device or the fused ops are not compiled in.
pub fn self_check(dev: &Device) -> Result<Vec<CheckRow>> {
    if !dev.is_cuda() || !cfg!(feature = "cuda") {
        return Err(Error::Msg(
            "kernel self-check needs a CUDA device and a `cuda` build".into(),
        ));
    }
    let mut rows = Vec::new();
    for dt in [DType::F32, DType::BF16] {
        let cases = vec![
            ln_case(&[16, 64, 256], dt, dev, 1)?,
            ln_case(&[64, 32, 128], dt, dev, 2)?,
            ln_case(&[7, 13, 100], dt, dev, 3)?,
            ln_case(&[5, 384], dt, dev, 4)?,
            ln_case(&[3, 1000], dt, dev, 5)?,
            ln_case(&[9, 33], dt, dev, 6)?,
            ln_case(&[4, 1], dt, dev, 7)?,
            ln_case(&[2, 1500], dt, dev, 8)?,
            plain_case(&[4, 4, 64, 256], dt, dev, 10)?,
            plain_case(&[3, 5, 7, 77], dt, dev, 11)?,
            plain_case(&[6, 1], dt, dev, 12)?,
            plain_case(&[4, 3, 1500], dt, dev, 13)?,
            attn_case((16, 8, 64, 128), false, dt, dev, 20)?,
            attn_case((8, 4, 128, 128), true, dt, dev, 21)?,
            attn_case((3, 2, 5, 77), false, dt, dev, 22)?,
            attn_case((2, 2, 3, 1500), false, dt, dev, 23)?,
            bias_case(&[6, 4, 50], &[6, 1, 50], dt, dev, 30)?,
            bias_case(&[3, 2, 5, 9], &[3, 1, 1, 9], dt, dev, 31)?,
            bias_case(&[3, 2, 5, 9], &[1, 2, 1, 9], dt, dev, 33)?,
            bias_case(&[3, 2, 5, 9], &[5, 9], dt, dev, 32)?,
        ];
        for c in cases {
            compare(c, dt, dev, &mut rows)?;
        }
    }
    Ok(rows)
}

/// Markdown table of [`self_check`] rows (failures marked `FAIL`).
pub fn format_check(rows: &[CheckRow]) -> String {
    let mut s = String::from(
        "| case | dtype | what | err | twin err | tol | ok |\n|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        s += &format!(
            "| {} | {:?} | {} | {:.2e} | {:.2e} | {:.0e} | {} |\n",
            r.case,
            r.dtype,
            r.what,
            r.err,
            r.err_twin,
            r.tol,
            if r.pass { "ok" } else { "FAIL" }
        );
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn self_check_needs_cuda() {
        assert!(super::self_check(&candle_core::Device::Cpu).is_err());
    }

    #[test]
    fn relative_error_scales_by_reference() {
        let dev = candle_core::Device::Cpu;
        let r = candle_core::Tensor::new(&[2f32, -4.0, 1.0], &dev).unwrap();
        let a = candle_core::Tensor::new(&[2f32, -3.0, 1.0], &dev).unwrap();
        assert!((super::rel_err(&a, &r).unwrap() - 0.25).abs() < 1e-9);
        assert_eq!(super::rel_err(&r, &r).unwrap(), 0.0);
    }
}
