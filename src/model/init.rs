//! Deterministic parameter initialisation. candle's CPU random generator cannot be seeded, so a
//! fresh model would differ between ranks and runs; [`SeededVarMap`] is a `VarBuilder` backend
//! that creates each parameter from `seed_for(seed, name)` with the requested initialiser (the AF2
//! schemes of [`super::primitives::LinearInit`] map to `Const`, `Randn` and `Uniform`). Every rank
//! builds bit-identical weights, and a run's initial weights depend only on `train.seed`.

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder, VarMap};

use crate::train::seed::{fnv1a64, seed_for, Rng};

/// A `VarMap` whose missing variables are created with a per-name seeded RNG.
#[derive(Clone)]
pub struct SeededVarMap {
    pub varmap: VarMap,
    seed: u64,
}

impl SeededVarMap {
    pub fn new(seed: u64) -> Self {
        Self {
            varmap: VarMap::new(),
            seed,
        }
    }

    /// A `VarBuilder` creating f32 (or `dtype`) variables on `device`, registered in `self.varmap`.
    pub fn builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(self.clone()), dtype, device.clone())
    }
}

fn init_values(shape: &Shape, init: Init, seed: u64) -> candle_core::Result<Vec<f32>> {
    let n = shape.elem_count();
    let mut rng = Rng::new(seed);
    Ok(match init {
        Init::Const(v) => vec![v as f32; n],
        Init::Randn { mean, stdev } => rng
            .normal_vec_f32(n, stdev)
            .into_iter()
            .map(|x| x + mean as f32)
            .collect(),
        Init::Uniform { lo, up } => (0..n)
            .map(|_| (lo + (up - lo) * rng.next_f64()) as f32)
            .collect(),
        Init::Kaiming { .. } => {
            candle_core::bail!("SeededVarMap: Kaiming init is not used by ferrofold")
        }
    })
}

impl SimpleBackend for SeededVarMap {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("SeededVarMap: poisoned lock".into()))?;
        if let Some(v) = data.get(name) {
            if v.shape() != &s {
                candle_core::bail!(
                    "{name}: shape {:?} requested, existing variable is {:?}",
                    s,
                    v.shape()
                );
            }
            return Ok(v.as_tensor().clone());
        }
        let values = init_values(
            &s,
            h,
            seed_for(self.seed, "param-init", fnv1a64(name.as_bytes()), 0),
        )?;
        let t = Tensor::from_vec(values, s, &Device::Cpu)?
            .to_dtype(dtype)?
            .to_device(dev)?;
        let var = Var::from_tensor(&t)?;
        let out = var.as_tensor().clone();
        data.insert(name.to_string(), var);
        Ok(out)
    }

    fn get_unchecked(
        &self,
        name: &str,
        _dtype: DType,
        _dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let data = self
            .varmap
            .data()
            .lock()
            .map_err(|_| candle_core::Error::Msg("SeededVarMap: poisoned lock".into()))?;
        match data.get(name) {
            Some(v) => Ok(v.as_tensor().clone()),
            None => candle_core::bail!("SeededVarMap: no variable `{name}`"),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap
            .data()
            .lock()
            .map(|d| d.contains_key(name))
            .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::primitives::{Linear, LinearInit};

    fn weights(seed: u64) -> Vec<f32> {
        let m = SeededVarMap::new(seed);
        let vb = m.builder(DType::F32, &Device::Cpu);
        let l = Linear::new(vb.pp("a"), 64, 32, true, LinearInit::Default).unwrap();
        l.weight.flatten_all().unwrap().to_vec1().unwrap()
    }

    #[test]
    fn same_seed_same_weights_and_right_scale() {
        let a = weights(1);
        assert_eq!(a, weights(1));
        assert_ne!(a, weights(2));
        // LeCun normal: variance 1/fan_in.
        let var: f32 = a.iter().map(|x| x * x).sum::<f32>() / a.len() as f32;
        assert!((var * 64.0 - 1.0).abs() < 0.15, "var {var}");
    }

    #[test]
    fn registered_in_the_varmap_and_reused() {
        let m = SeededVarMap::new(3);
        let vb = m.builder(DType::F32, &Device::Cpu);
        let l1 = Linear::new(vb.pp("a"), 4, 2, true, LinearInit::Gating).unwrap();
        let l2 = Linear::new(vb.pp("a"), 4, 2, true, LinearInit::Gating).unwrap();
        assert_eq!(m.varmap.all_vars().len(), 2);
        assert_eq!(l1.bias.unwrap().to_vec1::<f32>().unwrap(), vec![1.0, 1.0]);
        assert!(l2
            .weight
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .all(|x| *x == 0.0));
        assert!(Linear::new(vb.pp("a"), 5, 2, true, LinearInit::Default).is_err());
    }
}
