//! Weights in and out of ferrofold: `--init-from` (fine-tuning: weights only, fresh optimiser and
//! step) and conversion of OpenFold PyTorch weights to a ferrofold safetensors file.
//!
//! OpenFold's `state_dict` names are ferrofold's parameter names, so conversion is a format change:
//! read the pickle (candle's PyTorch reader), drop wrapper prefixes (`model.`, `module.`), keep float
//! tensors as f32.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::train::checkpoint;
use crate::train::optim::Params;

/// Which weights of a ferrofold checkpoint to take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightsKind {
    /// The EMA weights (what evaluation uses; AF2 fine-tunes from these).
    Ema,
    /// The raw model weights.
    Model,
}

/// Load named weights from a ferrofold checkpoint directory (checksums verified) or from a bare
/// `.safetensors` file (e.g. converted OpenFold weights).
pub fn read_weights(path: &Path, kind: WeightsKind) -> Result<BTreeMap<String, Tensor>> {
    if path.is_dir() {
        let data = checkpoint::load(path, &Device::Cpu)?;
        return Ok(match kind {
            WeightsKind::Ema => data.ema,
            WeightsKind::Model => data.model,
        });
    }
    if !path.exists() {
        return Err(Error::Checkpoint {
            path: path.to_path_buf(),
            msg: "not found (expected a checkpoint directory or a .safetensors file)".into(),
        });
    }
    let map =
        candle_core::safetensors::load(path, &Device::Cpu).map_err(|e| Error::Checkpoint {
            path: path.to_path_buf(),
            msg: format!("cannot read safetensors: {e}"),
        })?;
    Ok(map.into_iter().collect())
}

/// Copy `weights` into the model's parameters. Names and shapes must match exactly (the error
/// names the file and lists the differences); nothing is changed unless everything matches.
pub fn load_into(path: &Path, weights: &BTreeMap<String, Tensor>, params: &Params) -> Result<()> {
    let expected: BTreeMap<String, Vec<usize>> = params
        .iter()
        .map(|(k, v)| (k.clone(), v.dims().to_vec()))
        .collect();
    checkpoint::check_shapes(path, "weights", weights, &expected)?;
    for (name, var) in params {
        if let Some(w) = weights.get(name) {
            let w = w.to_dtype(var.dtype())?.to_device(var.device())?;
            var.set(&w)?;
        }
    }
    Ok(())
}

/// Strip the wrapper prefixes training frameworks add to `state_dict` names.
pub fn strip_wrapper_prefix(name: &str) -> &str {
    let mut n = name;
    loop {
        let next = n
            .strip_prefix("module.")
            .or_else(|| n.strip_prefix("model."));
        match next {
            Some(rest) => n = rest,
            None => return n,
        }
    }
}

/// Convert an OpenFold PyTorch checkpoint (`.pt`: a state dict, or a Lightning checkpoint whose
/// weights sit under `key`, e.g. `state_dict` or `ema`) to a ferrofold `.safetensors` file.
/// Returns the number of tensors written.
pub fn convert_openfold(src: &Path, key: Option<&str>, out: &Path) -> Result<usize> {
    let tensors =
        candle_core::pickle::read_all_with_key(src, key).map_err(|e| Error::Checkpoint {
            path: src.to_path_buf(),
            msg: format!("cannot read PyTorch weights: {e}"),
        })?;
    if tensors.is_empty() {
        return Err(Error::Checkpoint {
            path: src.to_path_buf(),
            msg: "no tensors found (wrong --key?)".into(),
        });
    }
    let mut out_map: BTreeMap<String, Tensor> = BTreeMap::new();
    for (name, t) in tensors {
        let name = strip_wrapper_prefix(&name).to_string();
        let t = if t.dtype().is_float() {
            t.to_dtype(DType::F32)?
        } else {
            t
        };
        if out_map.insert(name.clone(), t).is_some() {
            return Err(Error::Checkpoint {
                path: src.to_path_buf(),
                msg: format!("duplicate parameter `{name}` after removing wrapper prefixes"),
            });
        }
    }
    let bytes = safetensors::serialize(
        out_map
            .iter()
            .map(|(k, t)| Ok((k.clone(), t.contiguous()?)))
            .collect::<Result<Vec<(String, Tensor)>>>()?,
        None,
    )
    .map_err(|e| Error::Checkpoint {
        path: out.to_path_buf(),
        msg: format!("cannot serialise: {e}"),
    })?;
    checkpoint::atomic_write(out, &bytes)?;
    Ok(out_map.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    #[test]
    fn prefixes_are_stripped() {
        assert_eq!(
            strip_wrapper_prefix("model.evoformer.linear.weight"),
            "evoformer.linear.weight"
        );
        assert_eq!(strip_wrapper_prefix("module.model.x"), "x");
        assert_eq!(
            strip_wrapper_prefix("structure_module.ipa.linear_q.bias"),
            "structure_module.ipa.linear_q.bias"
        );
    }

    #[test]
    fn load_into_checks_names_and_shapes_before_writing() {
        let dev = Device::Cpu;
        let mut params = Params::new();
        params.insert("a".into(), Var::zeros((2, 3), DType::F32, &dev).unwrap());
        params.insert("b".into(), Var::zeros(4, DType::F32, &dev).unwrap());
        let p = Path::new("w.safetensors");
        let mut w = BTreeMap::new();
        w.insert(
            "a".to_string(),
            Tensor::ones((2, 3), DType::F32, &dev).unwrap(),
        );
        w.insert("b".to_string(), Tensor::ones(5, DType::F32, &dev).unwrap());
        let err = load_into(p, &w, &params).unwrap_err().to_string();
        assert!(
            err.contains("w.safetensors") && err.contains("b: checkpoint [5], model [4]"),
            "{err}"
        );
        // Nothing was written.
        assert_eq!(
            params["a"]
                .as_tensor()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
        w.insert("b".to_string(), Tensor::ones(4, DType::F32, &dev).unwrap());
        load_into(p, &w, &params).unwrap();
        assert_eq!(
            params["a"]
                .as_tensor()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            6.0
        );
    }

    #[test]
    fn missing_file_is_named() {
        let err = read_weights(Path::new("/nonexistent/w.safetensors"), WeightsKind::Ema)
            .unwrap_err()
            .to_string();
        assert!(err.contains("/nonexistent/w.safetensors"), "{err}");
    }
}
