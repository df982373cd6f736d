//! Parameter bookkeeping: deterministic (sorted) enumeration and loading from safetensors.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};

use crate::error::{Error, Result};

/// Every variable of `vm` in sorted name order (`VarMap` is a `HashMap`).
pub fn sorted_vars(vm: &VarMap) -> Vec<(String, Var)> {
    let data = vm.data().lock();
    let mut v: Vec<(String, Var)> = match data {
        Ok(d) => d.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        Err(p) => p
            .into_inner()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    };
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

/// Build a `VarMap` holding `tensors` (converted to `dtype`) under their names. A `VarBuilder` on
/// it then returns these values for matching names (shapes are checked on use).
pub fn varmap_from_tensors<I>(tensors: I, dtype: DType) -> Result<VarMap>
where
    I: IntoIterator<Item = (String, Tensor)>,
{
    let vm = VarMap::new();
    {
        let mut data = vm
            .data()
            .lock()
            .map_err(|_| Error::Model("varmap lock poisoned".into()))?;
        for (name, t) in tensors {
            data.insert(name, Var::from_tensor(&t.to_dtype(dtype)?)?);
        }
    }
    Ok(vm)
}

/// Load every tensor of a safetensors file into a fresh `VarMap` (names as stored, optionally
/// keeping only those starting with `prefix`, which is stripped).
pub fn varmap_from_safetensors(
    path: &Path,
    prefix: Option<&str>,
    dtype: DType,
    device: &Device,
) -> Result<VarMap> {
    let all = candle_core::safetensors::load(path, device).map_err(|e| Error::Checkpoint {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    let selected: BTreeMap<String, Tensor> = all
        .into_iter()
        .filter_map(|(k, t)| match prefix {
            None => Some((k, t)),
            Some(p) => k.strip_prefix(p).map(|s| (s.to_string(), t)),
        })
        .collect();
    varmap_from_tensors(selected, dtype)
}

/// A `VarBuilder` over `vm` with `dtype` on `device`.
pub fn builder(vm: &VarMap, dtype: DType, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_varmap(vm, dtype, device)
}

/// Names present in `vm` but not in `expected` and vice versa (used to verify that a module
/// consumed exactly the parameters of a checkpoint).
pub fn name_mismatch(vm: &VarMap, expected: &[String]) -> (Vec<String>, Vec<String>) {
    let have: Vec<String> = sorted_vars(vm).into_iter().map(|(k, _)| k).collect();
    let extra = have
        .iter()
        .filter(|k| !expected.contains(k))
        .cloned()
        .collect();
    let missing = expected
        .iter()
        .filter(|k| !have.contains(k))
        .cloned()
        .collect();
    (extra, missing)
}
