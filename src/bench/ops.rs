//! `bench ops`: the candle primitives of the trunk, timed alone at MSA-row-attention shapes.

use std::time::Instant;

use candle_core::{DType, Tensor};

use super::{median, random_tensor, OpsArgs};
use crate::error::Result;

/// One timed primitive of `bench ops`.
#[derive(Debug, Clone)]
pub struct OpTiming {
    pub name: String,
    pub fwd_ms: f64,
    pub fwd_bwd_ms: f64,
    /// Minimal bytes moved by the forward (inputs read once, output written once).
    pub bytes: f64,
    /// Matmul FLOPs of the forward (0 for elementwise/reduction ops).
    pub flops: f64,
}

type OpFn<'a> = Box<dyn Fn(&[Tensor]) -> Result<Tensor> + 'a>;

/// Time the candle primitives of the trunk at MSA row attention shapes.
pub fn bench_ops(a: &OpsArgs) -> Result<Vec<OpTiming>> {
    use crate::model::primitives::{softmax, softmax_with_biases, LayerNorm, Linear};
    let dev = a.device.device()?;
    let dt = a.dtype.dtype();
    let (s, r, h, c, cm) = (a.n_seq, a.n_res, a.heads, a.c_hidden, a.c_m);
    let esz = dt.size_in_bytes() as f64;
    let rt = |shape: &[usize], k: u64| random_tensor(shape, 1.0, k, dt, &dev);
    let w_lin = random_tensor(&[cm, cm], (3.0 / cm as f32).sqrt(), 11, DType::F32, &dev)?;
    let ln = LayerNorm {
        weight: (random_tensor(&[cm], 0.1, 12, DType::F32, &dev)? + 1.0)?,
        bias: random_tensor(&[cm], 0.1, 13, DType::F32, &dev)?,
        eps: 1e-5,
    };
    let lin = Linear {
        weight: w_lin,
        bias: None,
    };
    let logits = s * h * r * r;
    let act = s * r * cm;
    // (name, inputs, op, bytes, flops)
    let cases: Vec<(&str, Vec<Tensor>, OpFn, f64, f64)> = vec![
        (
            "softmax_with_biases [S,H,R,R]+[S,1,1,R]+[1,H,R,R]",
            vec![
                rt(&[s, h, r, r], 1)?,
                rt(&[s, 1, 1, r], 2)?,
                rt(&[1, h, r, r], 3)?,
            ],
            Box::new(|x: &[Tensor]| softmax_with_biases(&x[0], &[&x[1], &x[2]])),
            esz * 2.0 * logits as f64,
            0.0,
        ),
        (
            "softmax [S,H,R,R]",
            vec![rt(&[s, h, r, r], 1)?],
            Box::new(|x: &[Tensor]| softmax(&x[0])),
            esz * 2.0 * logits as f64,
            0.0,
        ),
        (
            "broadcast_add [S,H,R,R]+[1,H,R,R]",
            vec![rt(&[s, h, r, r], 1)?, rt(&[1, h, r, r], 3)?],
            Box::new(|x: &[Tensor]| Ok(x[0].broadcast_add(&x[1])?)),
            esz * 2.0 * logits as f64,
            0.0,
        ),
        (
            "to_dtype(f32) [S,H,R,R]",
            vec![rt(&[s, h, r, r], 1)?],
            Box::new(|x: &[Tensor]| Ok(x[0].to_dtype(DType::F32)?)),
            (esz + 4.0) * logits as f64,
            0.0,
        ),
        (
            "matmul q.kT [S*H,R,C]x[S*H,C,R]",
            vec![rt(&[s * h, r, c], 4)?, rt(&[s * h, r, c], 5)?],
            Box::new(|x: &[Tensor]| Ok(x[0].matmul(&x[1].t()?)?)),
            esz * (2 * s * h * r * c + logits) as f64,
            2.0 * (s * h * r * r * c) as f64,
        ),
        (
            "matmul a.v [S*H,R,R]x[S*H,R,C]",
            vec![rt(&[s * h, r, r], 6)?, rt(&[s * h, r, c], 7)?],
            Box::new(|x: &[Tensor]| Ok(x[0].matmul(&x[1])?)),
            esz * (2 * s * h * r * c + logits) as f64,
            2.0 * (s * h * r * r * c) as f64,
        ),
        (
            "split_heads copy [S,R,H,C]->[S,H,R,C]",
            vec![rt(&[s, r, h, c], 8)?],
            Box::new(|x: &[Tensor]| Ok(x[0].transpose(1, 2)?.contiguous()?)),
            esz * 2.0 * (s * r * h * c) as f64,
            0.0,
        ),
        (
            "LayerNorm [S,R,c_m] (f32 stats)",
            vec![rt(&[s, r, cm], 9)?],
            Box::new(|x: &[Tensor]| ln.forward(&x[0])),
            esz * 2.0 * act as f64,
            0.0,
        ),
        (
            "Linear c_m->c_m [S,R,c_m] (+weight cast)",
            vec![rt(&[s, r, cm], 10)?],
            Box::new(|x: &[Tensor]| lin.forward(&x[0])),
            esz * 2.0 * act as f64,
            2.0 * (s * r * cm * cm) as f64,
        ),
        (
            "sigmoid [S,R,c_m]",
            vec![rt(&[s, r, cm], 14)?],
            Box::new(|x: &[Tensor]| crate::model::primitives::sigmoid(&x[0])),
            esz * 2.0 * act as f64,
            0.0,
        ),
        (
            "mul [S,R,c_m]*[S,R,c_m]",
            vec![rt(&[s, r, cm], 15)?, rt(&[s, r, cm], 16)?],
            Box::new(|x: &[Tensor]| Ok((&x[0] * &x[1])?)),
            esz * 3.0 * act as f64,
            0.0,
        ),
    ];
    let mut out = Vec::new();
    for (name, inputs, f, bytes, flops) in cases {
        let vars = inputs
            .iter()
            .map(|t| Ok(candle_core::Var::from_tensor(t)?.as_tensor().clone()))
            .collect::<Result<Vec<_>>>()?;
        let probe = f(&vars)?;
        let g = random_tensor(probe.dims(), 1.0, 99, probe.dtype(), &dev)?;
        drop(probe);
        let mut med = [0.0; 2];
        for (k, backward) in [false, true].into_iter().enumerate() {
            let mut ms = Vec::with_capacity(a.iters);
            for it in 0..a.warmup + a.iters {
                let t0 = Instant::now();
                let y = f(&vars)?;
                let keep = if backward {
                    Some(crate::model::remat::backward_vars(
                        &crate::model::remat::vjp_loss(&[(&y, &g)])?,
                    )?)
                } else {
                    None
                };
                dev.synchronize()?;
                if it >= a.warmup {
                    ms.push(t0.elapsed().as_secs_f64() * 1e3);
                }
                drop((y, keep));
            }
            med[k] = median(&mut ms);
        }
        out.push(OpTiming {
            name: name.to_string(),
            fwd_ms: med[0],
            fwd_bwd_ms: med[1],
            bytes,
            flops,
        });
    }
    Ok(out)
}

/// The printed report of `bench ops`.
pub fn format_ops(a: &OpsArgs, rows: &[OpTiming]) -> String {
    let mut s = format!(
        "bench ops: device={:?} dtype={:?} S={} R={} H={} C={} c_m={} iters={}\n",
        a.device, a.dtype, a.n_seq, a.n_res, a.heads, a.c_hidden, a.c_m, a.iters
    )
    .to_lowercase();
    s += "| op | fwd ms | fwd GB/s (min bytes) | fwd TFLOP/s | fwd+bwd ms |\n|---|---|---|---|---|\n";
    for o in rows {
        let sec = o.fwd_ms * 1e-3;
        s += &format!(
            "| {} | {:.3} | {:.0} | {} | {:.3} |\n",
            o.name,
            o.fwd_ms,
            o.bytes / sec / 1e9,
            if o.flops > 0.0 {
                format!("{:.1}", o.flops / sec / 1e12)
            } else {
                "-".into()
            },
            o.fwd_bwd_ms
        );
    }
    s
}
