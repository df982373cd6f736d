//! Dropout masks from fixed device buffers of uniform numbers, for CUDA-graph capture.
//!
//! The eager dropout ([`super::dropout`], [`super::structure_module::dropout`]) draws its masks on
//! the host from the site's seed and uploads them: a host→device copy of data that changes every
//! step, which cannot be part of a captured CUDA graph. While a [`MaskPool`] is installed on the
//! current thread, every dropout site instead thresholds its own fixed device buffer `U` of
//! uniforms in `[0, 1)` (refilled before each step): `mask = (U >= rate) / (1 - rate)`, shaped
//! like the site's mask (the shared dimension stays 1).
//!
//! Sites are identified by their seed *within a step*: the k-th distinct seed a step draws gets
//! buffer k. The model's control flow is the same every step, so buffer k always belongs to the
//! same site; a site drawn again in the same step (remat recomputation of a block) repeats its
//! seed and gets the same buffer, hence the same mask. Seeds are 64-bit hashes, so two sites of
//! one step never share one in practice (a collision would only make two sites share a mask; a
//! size mismatch is an error).
//!
//! Lifecycle: [`MaskPool::new`]; one eager step with the pool installed creates (and fills) a
//! buffer per site; [`MaskPool::freeze`] (no new sites after that: their buffers must exist
//! before a capture); before every later step [`MaskPool::refill`] (outside any capture) and
//! [`MaskPool::begin_step`]. Statistically this is the same dropout (keep probability
//! `1 - rate`, the same shared dimensions); the masks are not the host path's masks.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};

struct PoolState {
    dev: Device,
    /// One `[len]` f32 uniform buffer per site, in first-seen order.
    sites: Vec<Tensor>,
    /// This step's seed → site index.
    seen: HashMap<u64, usize>,
    used: usize,
    frozen: bool,
    /// CPU stream state (the CPU RNG cannot be seeded).
    cpu_state: u64,
}

impl PoolState {
    /// `n` fresh uniforms in `[0, 1)`: the device RNG on CUDA, SplitMix64 (24-bit) on the CPU.
    fn uniforms(&mut self, n: usize) -> Result<Tensor> {
        if self.dev.is_cpu() {
            let st = &mut self.cpu_state;
            let v: Vec<f32> = (0..n)
                .map(|_| (crate::data::rng::splitmix64(st) >> 40) as f32 / (1u64 << 24) as f32)
                .collect();
            Ok(Tensor::from_vec(v, n, &self.dev)?)
        } else {
            Ok(Tensor::rand(0f32, 1f32, n, &self.dev)?)
        }
    }

    fn reseed(&mut self, seed: u64) -> Result<()> {
        self.cpu_state = seed;
        if !self.dev.is_cpu() {
            self.dev.set_seed(seed)?;
        }
        Ok(())
    }
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
    /// An empty, growing pool on `dev`; new sites are filled from `seed`'s stream.
    pub fn new(dev: &Device, seed: u64) -> Result<Self> {
        let mut st = PoolState {
            dev: dev.clone(),
            sites: Vec::new(),
            seen: HashMap::new(),
            used: 0,
            frozen: false,
            cpu_state: 0,
        };
        st.reseed(seed)?;
        Ok(Self(Rc::new(RefCell::new(st))))
    }

    /// Install on this thread until the guard drops.
    pub fn install(&self) -> PoolGuard {
        let prev = ACTIVE.with(|a| a.borrow_mut().replace(self.clone()));
        PoolGuard(prev)
    }

    /// Number of sites and their total number of uniforms.
    pub fn size(&self) -> (usize, usize) {
        let s = self.0.borrow();
        (s.sites.len(), s.sites.iter().map(|t| t.elem_count()).sum())
    }

    /// No new sites from now on (their buffers would not exist in a captured graph).
    pub fn freeze(&self) {
        self.0.borrow_mut().frozen = true;
    }

    /// New uniforms for the next step in every site buffer (in place), from `seed`. Must run
    /// outside a graph capture.
    pub fn refill(&self, seed: u64) -> Result<()> {
        let mut s = self.0.borrow_mut();
        s.reseed(seed)?;
        for i in 0..s.sites.len() {
            let n = s.sites[i].elem_count();
            let fresh = s.uniforms(n)?;
            s.sites[i].slice_set(&fresh, 0, 0)?;
        }
        Ok(())
    }

    /// Forget this step's seeds (call before each step).
    pub fn begin_step(&self) {
        let mut s = self.0.borrow_mut();
        s.seen.clear();
        s.used = 0;
    }

    /// The buffer of `seed`'s site this step: existing, or (growing pool) a new one.
    fn site(&self, seed: u64, len: usize) -> Result<Tensor> {
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
        if idx == s.sites.len() {
            if s.frozen {
                return Err(Error::Model(format!(
                    "dropout pool: site {idx} is new but the pool is frozen ({} sites)",
                    s.sites.len()
                )));
            }
            let u = s.uniforms(len)?;
            s.sites.push(u);
        }
        let u = s.sites[idx].clone();
        if u.elem_count() != len {
            return Err(Error::Model(format!(
                "dropout pool: site {idx} has {} values, this draw needs {len}",
                u.elem_count()
            )));
        }
        Ok(u)
    }
}

/// Whether a mask pool is installed on this thread (CUDA-graph mode): masks must then come from
/// [`pool_mask`], never from a kernel whose seed is a launch argument (a captured graph would
/// replay that seed, i.e. the same mask, every step).
pub fn pool_active() -> bool {
    ACTIVE.with(|a| a.borrow().is_some())
}

/// The mask of a dropout site drawn from the installed pool (`Ok(None)`: no pool installed, the
/// caller draws its host mask): `[shape]` in `dtype`, entries `0` or `1/(1-rate)`.
pub fn pool_mask(seed: u64, shape: &[usize], rate: f64, dtype: DType) -> Result<Option<Tensor>> {
    let Some(pool) = ACTIVE.with(|a| a.borrow().clone()) else {
        return Ok(None);
    };
    let n: usize = shape.iter().product();
    let u = pool.site(seed, n)?;
    let keep = u
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
        let pool = MaskPool::new(&dev, 7).unwrap();
        {
            let _g = pool.install();
            pool.begin_step();
            dropout_rowwise(&x, 0.25, Some(&a)).unwrap();
            dropout_rowwise(&x, 0.25, Some(&b)).unwrap();
            dropout_rowwise(&x, 0.25, Some(&a)).unwrap();
        }
        assert_eq!(pool.size(), (2, 2 * 50 * 8));
        pool.freeze();
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
        // a third site is new, the pool frozen
        assert!(dropout_rowwise(&x, 0.25, Some(&DropoutCtx::new(3))).is_err());
        // a new step with new uniforms: site order restarts, masks change
        pool.refill(8).unwrap();
        pool.begin_step();
        let mb_new = v(dropout_rowwise(&x, 0.25, Some(&b)).unwrap());
        assert_ne!(mb_new, mb);
    }

    /// With a pool installed, dropout (plain and fused with a residual) scales `x` by the pool's
    /// mask exactly once.
    #[test]
    fn pool_dropout_applies_the_mask_once() {
        use crate::model::dropout::add_dropout_rowwise;
        let dev = Device::Cpu;
        let x = (Tensor::ones((3, 20, 4), DType::F32, &dev).unwrap() * 2.0).unwrap();
        let zero = x.zeros_like().unwrap();
        let ctx = DropoutCtx::new(5);
        let pool = MaskPool::new(&dev, 11).unwrap();
        let _g = pool.install();
        pool.begin_step();
        assert!(pool_active());
        let v = |t: Tensor| -> Vec<f32> { t.flatten_all().unwrap().to_vec1().unwrap() };
        let plain = v(dropout_rowwise(&x, 0.5, Some(&ctx)).unwrap());
        assert!(plain.iter().all(|&m| m == 0.0 || (m - 4.0).abs() < 1e-6));
        assert!(plain.contains(&0.0) && plain.contains(&4.0));
        let fused = v(add_dropout_rowwise(&zero, &x, 0.5, Some(&ctx)).unwrap());
        assert!(fused.iter().all(|&m| m == 0.0 || (m - 4.0).abs() < 1e-6));
    }
}
