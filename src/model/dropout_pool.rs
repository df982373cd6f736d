//! Dropout masks from a fixed device buffer of uniform numbers, for CUDA-graph capture.
//!
//! The eager dropout ([`super::dropout`], [`super::structure_module::dropout`]) draws its masks on
//! the host from the site's seed and uploads them: a host→device copy of data that changes every
//! step, which cannot be part of a captured CUDA graph. While a [`MaskPool`] is installed on the
//! current thread, every dropout site instead thresholds a slice of the pool's uniform buffer
//! `U` (one fixed device tensor, refilled before each step):
//! `mask = (U[off .. off + n] >= rate) / (1 - rate)`, reshaped to the site's mask shape.
//!
//! Sites are identified by their seed *within a step*: the k-th distinct seed a step draws gets
//! slice k. The model's control flow is the same every step, so slice k always belongs to the
//! same site; a site that is drawn again in the same step (remat recomputation of a block)
//! repeats its seed and gets the same slice, hence the same mask. Seeds are 64-bit hashes, so two
//! sites of one step never share one in practice (a collision would only make two sites share a
//! mask; the shape check below catches a mismatch).
//!
//! Lifecycle: [`MaskPool::sizing`] + one step records the sites' sizes; [`MaskPool::allocate`]
//! makes `U`; before every step [`MaskPool::refill`] (new uniforms, outside any capture) then
//! [`MaskPool::begin_step`]. Statistically this is the same dropout (keep probability
//! `1 - rate`, the same shared dimensions); the masks are not the host path's masks.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

struct Site {
    offset: usize,
    len: usize,
}

struct PoolState {
    /// `[P]` f32 uniforms in `[0, 1)`; `None` while sizing.
    uniform: Option<Tensor>,
    sites: Vec<Site>,
    /// This step's seed → site index.
    seen: HashMap<u64, usize>,
    used: usize,
}

/// A pool of dropout randomness (see the module docs). Cheap to clone (shared state).
#[derive(Clone)]
pub struct MaskPool(Rc<RefCell<PoolState>>);

thread_local! {
    static ACTIVE: RefCell<Option<MaskPool>> = const { RefCell::new(None) };
}

/// Uninstalls the pool when dropped.
#[must_use]
pub struct PoolGuard(Option<MaskPool>);

impl Drop for PoolGuard {
    fn drop(&mut self) {
        let prev = self.0.take();
        ACTIVE.with(|a| *a.borrow_mut() = prev);
    }
}

impl MaskPool {
    /// An empty pool in sizing mode: sites are recorded, masks come from the host path.
    pub fn sizing() -> Self {
        Self(Rc::new(RefCell::new(PoolState {
            uniform: None,
            sites: Vec::new(),
            seen: HashMap::new(),
            used: 0,
        })))
    }

    /// Install on this thread until the guard drops.
    pub fn install(&self) -> PoolGuard {
        let prev = ACTIVE.with(|a| a.borrow_mut().replace(self.clone()));
        PoolGuard(prev)
    }

    /// Number of distinct sites recorded and their total size.
    pub fn size(&self) -> (usize, usize) {
        let s = self.0.borrow();
        (s.sites.len(), s.sites.iter().map(|x| x.len).sum())
    }

    /// Allocate the uniform buffer on `dev` (after a sizing step); zero-filled until refilled.
    pub fn allocate(&self, dev: &Device) -> Result<()> {
        let (_, n) = self.size();
        self.0.borrow_mut().uniform = Some(Tensor::zeros(n.max(1), DType::F32, dev)?);
        Ok(())
    }

    /// The uniform buffer (fixed address once allocated).
    pub fn uniform(&self) -> Option<Tensor> {
        self.0.borrow().uniform.clone()
    }

    /// New uniforms in `[0, 1)` for the next step, drawn on the device from `seed` and copied
    /// into the buffer in place. Must run outside a graph capture.
    pub fn refill(&self, seed: u64) -> Result<()> {
        let u = self
            .uniform()
            .ok_or_else(|| Error::Model("dropout pool: refill before allocate".into()))?;
        let dev = u.device();
        let n = u.elem_count();
        let fresh = if dev.is_cpu() {
            // The CPU RNG cannot be seeded: SplitMix64, 24-bit uniforms.
            let mut st = seed;
            let v: Vec<f32> = (0..n)
                .map(|_| (crate::data::rng::splitmix64(&mut st) >> 40) as f32 / (1u64 << 24) as f32)
                .collect();
            Tensor::from_vec(v, n, dev)?
        } else {
            dev.set_seed(seed)?;
            Tensor::rand(0f32, 1f32, n, dev)?
        };
        u.slice_set(&fresh, 0, 0)?;
        Ok(())
    }

    /// Forget this step's seeds (call before each step).
    pub fn begin_step(&self) {
        let mut s = self.0.borrow_mut();
        s.seen.clear();
        s.used = 0;
    }

    /// The site of `seed` this step: existing, or the next one in order (recorded while sizing).
    fn site(&self, seed: u64, len: usize) -> Result<(usize, Option<Tensor>)> {
        let mut s = self.0.borrow_mut();
        let idx = match s.seen.get(&seed) {
            Some(&i) => i,
            None => {
                let i = s.used;
                s.used += 1;
                s.seen.insert(seed, i);
                i
            }
        };
        if s.uniform.is_none() {
            if idx == s.sites.len() {
                let offset = s.sites.last().map(|x| x.offset + x.len).unwrap_or(0);
                s.sites.push(Site { offset, len });
            }
        } else if idx >= s.sites.len() {
            return Err(Error::Model(format!(
                "dropout pool: site {idx} was not seen while sizing ({} sites)",
                s.sites.len()
            )));
        }
        let site = &s.sites[idx];
        if site.len != len {
            return Err(Error::Model(format!(
                "dropout pool: site {idx} has {} values, this draw needs {len}",
                site.len
            )));
        }
        Ok((site.offset, s.uniform.clone()))
    }
}

/// The mask of a dropout site drawn from the installed pool: `Ok(None)` when no pool is
/// installed or it is still sizing (the caller draws its host mask), else `[shape]` in `dtype`
/// with entries `0` or `1/(1-rate)`.
pub fn pool_mask(seed: u64, shape: &[usize], rate: f64, dtype: DType) -> Result<Option<Tensor>> {
    let Some(pool) = ACTIVE.with(|a| a.borrow().clone()) else {
        return Ok(None);
    };
    let n: usize = shape.iter().product();
    let (offset, uniform) = pool.site(seed, n)?;
    let Some(u) = uniform else {
        return Ok(None);
    };
    let keep = u
        .narrow(0, offset, n)?
        .ge(rate as f32)?
        .to_dtype(DType::F32)?
        .affine(1.0 / (1.0 - rate), 0.0)?
        .reshape(shape)?
        .to_dtype(dtype)?;
    Ok(Some(keep))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::dropout::{dropout_rowwise, DropoutCtx};

    #[test]
    fn pool_masks_are_per_site_repeatable_and_refilled() {
        let dev = Device::Cpu;
        let x = Tensor::ones((4, 50, 8), DType::F32, &dev).unwrap();
        let (a, b) = (DropoutCtx::new(1), DropoutCtx::new(2));
        let pool = MaskPool::sizing();
        {
            let _g = pool.install();
            pool.begin_step();
            dropout_rowwise(&x, 0.25, Some(&a)).unwrap();
            dropout_rowwise(&x, 0.25, Some(&b)).unwrap();
            dropout_rowwise(&x, 0.25, Some(&a)).unwrap();
        }
        assert_eq!(pool.size(), (2, 2 * 50 * 8));
        pool.allocate(&dev).unwrap();
        pool.refill(7).unwrap();
        let _g = pool.install();
        pool.begin_step();
        let v = |t: Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
        let ma = v(dropout_rowwise(&x, 0.25, Some(&a)).unwrap());
        let mb = v(dropout_rowwise(&x, 0.25, Some(&b)).unwrap());
        let ma2 = v(dropout_rowwise(&x, 0.25, Some(&a)).unwrap());
        assert_eq!(ma, ma2, "same site, same mask");
        assert_ne!(ma, mb, "different sites");
        assert!(ma
            .iter()
            .all(|&m| m == 0.0 || (m - 1.0 / 0.75).abs() < 1e-6));
        let dropped = ma.iter().filter(|&&m| m == 0.0).count() as f64 / ma.len() as f64;
        assert!((dropped - 0.25).abs() < 0.1, "{dropped}");
        // a third site was never sized
        assert!(dropout_rowwise(&x, 0.25, Some(&DropoutCtx::new(3))).is_err());
        // a new step with new uniforms: site order restarts, masks change
        pool.refill(8).unwrap();
        pool.begin_step();
        let mb_new = v(dropout_rowwise(&x, 0.25, Some(&b)).unwrap());
        assert_ne!(mb_new, mb);
    }
}
