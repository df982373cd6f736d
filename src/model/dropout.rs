//! Shared (row-/column-wise) dropout, AF2 supplement Algorithm 6 lines 2-10 ("DropoutRowwise",
//! "DropoutColumnwise"), seeded deterministically from an explicit value. There is no global RNG:
//! the same [`DropoutCtx`] always draws the same masks, which activation recomputation relies on.

use candle_core::Tensor;

use crate::data::rng::splitmix64;
use crate::error::Result;

/// Training-mode dropout context. `None` where a forward takes `Option<&DropoutCtx>` means eval
/// mode (dropout is the identity).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DropoutCtx {
    pub seed: u64,
}

impl DropoutCtx {
    pub fn new(seed: u64) -> Self {
        Self { seed }
    }

    /// A child context for sub-module `tag` (e.g. a block index or a dropout site), independent of
    /// its siblings and deterministic.
    pub fn fork(&self, tag: u64) -> Self {
        let mut s = self.seed ^ tag.wrapping_mul(0xD6E8_FEB8_6659_FD93);
        let _ = splitmix64(&mut s);
        Self {
            seed: splitmix64(&mut s),
        }
    }

    /// Draw a keep mask of `shape`, entries `0` or `1/(1-rate)`.
    fn mask_values(&self, n: usize, rate: f64) -> Vec<f64> {
        let mut state = self.seed;
        let scale = 1.0 / (1.0 - rate);
        (0..n)
            .map(|_| {
                // 53-bit uniform in [0, 1).
                let u = (splitmix64(&mut state) >> 11) as f64 * (1.0 / (1u64 << 53) as f64);
                if u < rate {
                    0.0
                } else {
                    scale
                }
            })
            .collect()
    }
}

/// Dropout with the mask shared along dimension `shared_dim` of `x` (OpenFold `Dropout(r,
/// batch_dim)`): kept entries are scaled by `1/(1-rate)`. Identity when `ctx` is `None` or
/// `rate == 0`.
pub fn dropout_shared(
    x: &Tensor,
    rate: f64,
    shared_dim: usize,
    ctx: Option<&DropoutCtx>,
) -> Result<Tensor> {
    let Some(ctx) = ctx else {
        return Ok(x.clone());
    };
    if rate <= 0.0 {
        return Ok(x.clone());
    }
    let mut shape = x.dims().to_vec();
    if shared_dim < shape.len() {
        shape[shared_dim] = 1;
    }
    // CUDA-graph mode: the mask comes from the installed device pool (no host upload).
    if let Some(mask) = super::dropout_pool::pool_mask(ctx.seed, &shape, rate, x.dtype())? {
        return super::primitives::mul_const(x, &mask);
    }
    let n: usize = shape.iter().product();
    let mask =
        Tensor::from_vec(ctx.mask_values(n, rate), shape, x.device())?.to_dtype(x.dtype())?;
    super::primitives::mul_const(x, &mask)
}

/// Row-wise dropout on `[*, A, B, C]`-style activations: mask shared along the first axis
/// (OpenFold `DropoutRowwise`, `batch_dim = -3`; our activations are unbatched, so axis 0).
pub fn dropout_rowwise(x: &Tensor, rate: f64, ctx: Option<&DropoutCtx>) -> Result<Tensor> {
    dropout_shared(x, rate, 0, ctx)
}

/// Column-wise dropout: mask shared along the second axis (OpenFold `DropoutColumnwise`).
pub fn dropout_columnwise(x: &Tensor, rate: f64, ctx: Option<&DropoutCtx>) -> Result<Tensor> {
    dropout_shared(x, rate, 1, ctx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn dropout_is_deterministic_shared_and_scaled() {
        let x = Tensor::ones((6, 40, 8), DType::F64, &Device::Cpu).unwrap();
        let ctx = DropoutCtx::new(7);
        let a = dropout_rowwise(&x, 0.25, Some(&ctx)).unwrap();
        let b = dropout_rowwise(&x, 0.25, Some(&ctx)).unwrap();
        let av: Vec<f64> = a.flatten_all().unwrap().to_vec1().unwrap();
        let bv: Vec<f64> = b.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(av, bv);
        // shared along axis 0
        let a3: Vec<Vec<Vec<f64>>> = a.to_vec3().unwrap();
        for row in &a3 {
            assert_eq!(row, &a3[0]);
        }
        let zeros = av.iter().filter(|v| **v == 0.0).count() as f64 / av.len() as f64;
        assert!((zeros - 0.25).abs() < 0.1, "drop fraction {zeros}");
        assert!(av
            .iter()
            .all(|v| *v == 0.0 || (*v - 1.0 / 0.75).abs() < 1e-15));
        // a different fork draws a different mask; columnwise shares along axis 1
        let c = dropout_columnwise(&x, 0.25, Some(&ctx.fork(1))).unwrap();
        let c3: Vec<Vec<Vec<f64>>> = c.to_vec3().unwrap();
        for plane in &c3 {
            for row in plane {
                assert_eq!(row, &plane[0]);
            }
        }
        assert_ne!(ctx.fork(1), ctx.fork(2));
        // eval mode is the identity
        let e = dropout_rowwise(&x, 0.25, None).unwrap();
        assert_eq!(
            e.sum_all().unwrap().to_scalar::<f64>().unwrap(),
            6.0 * 40.0 * 8.0
        );
    }
}
