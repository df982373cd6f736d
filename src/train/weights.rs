//! Weights in and out of ferrofold: `--init-from` (fine-tuning: weights only, fresh optimiser and
//! step) and conversion of OpenFold PyTorch weights to a ferrofold safetensors file.
//!
//! OpenFold's `state_dict` names are ferrofold's parameter names, so conversion is a format change:
//! read the pickle (candle's PyTorch reader), drop wrapper prefixes (`model.`, `module.`), keep float
//! tensors as f32, and check names/shapes against the configured model (`ferrofold convert-weights`,
//! `scripts/convert_openfold_weights.sh`). AF2 JAX `.npz` archives are refused (their names and
//! layouts differ; OpenFold's own importer maps them).

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

/// Read the tensors of an OpenFold PyTorch checkpoint (`.pt`: a state dict, or a Lightning
/// checkpoint whose weights sit under `key`, e.g. `state_dict`), with wrapper prefixes removed and
/// float tensors as f32. AF2 JAX parameter archives (`.npz`) are refused with an explanation.
pub fn read_openfold(src: &Path, key: Option<&str>) -> Result<BTreeMap<String, Tensor>> {
    if src
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("npz"))
    {
        return Err(Error::Checkpoint {
            path: src.to_path_buf(),
            msg: "AlphaFold2 JAX parameters (.npz) are not supported: their names and layouts \
                  differ from OpenFold's (convert them to an OpenFold PyTorch state dict first, \
                  e.g. with OpenFold's `import_jax_weights_`, save it with `torch.save`, then \
                  convert that .pt file)"
                .into(),
        });
    }
    if !src.is_file() {
        return Err(Error::Checkpoint {
            path: src.to_path_buf(),
            msg: "not found".into(),
        });
    }
    let tensors =
        candle_core::pickle::read_all_with_key(src, key).map_err(|e| Error::Checkpoint {
            path: src.to_path_buf(),
            msg: format!("cannot read PyTorch weights (a torch.save zip archive): {e}"),
        })?;
    if tensors.is_empty() {
        return Err(Error::Checkpoint {
            path: src.to_path_buf(),
            msg: match key {
                Some(k) => format!("no tensors found under key `{k}`"),
                None => "no tensors found at the top level (a Lightning checkpoint needs \
                         --key state_dict)"
                    .into(),
            },
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
    Ok(out_map)
}

/// Differences between named weights and a model's parameter shapes.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct NameReport {
    /// In the model, not in the weights.
    pub missing: Vec<String>,
    /// In the weights, not in the model.
    pub unknown: Vec<String>,
    /// `name: weights [..], model [..]`.
    pub wrong_shape: Vec<String>,
}

impl NameReport {
    pub fn compare(
        weights: &BTreeMap<String, Tensor>,
        expected: &BTreeMap<String, Vec<usize>>,
    ) -> Self {
        Self {
            missing: expected
                .keys()
                .filter(|k| !weights.contains_key(*k))
                .cloned()
                .collect(),
            unknown: weights
                .keys()
                .filter(|k| !expected.contains_key(*k))
                .cloned()
                .collect(),
            wrong_shape: expected
                .iter()
                .filter_map(|(k, shape)| {
                    let t = weights.get(k)?;
                    (t.dims() != shape.as_slice())
                        .then(|| format!("{k}: weights {:?}, model {:?}", t.dims(), shape))
                })
                .collect(),
        }
    }

    pub fn is_ok(&self) -> bool {
        self.missing.is_empty() && self.unknown.is_empty() && self.wrong_shape.is_empty()
    }

    /// Every difference, one per line.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        for (what, list) in [
            ("missing (in the model, not in the weights)", &self.missing),
            ("unknown (in the weights, not in the model)", &self.unknown),
            ("shape mismatch", &self.wrong_shape),
        ] {
            if !list.is_empty() {
                out.push_str(&format!("{what}: {}\n", list.len()));
                for n in list {
                    out.push_str(&format!("  {n}\n"));
                }
            }
        }
        out
    }
}

/// Write named tensors as one safetensors file (atomically).
pub fn write_safetensors(out: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    let bytes = safetensors::serialize(
        tensors
            .iter()
            .map(|(k, t)| Ok((k.clone(), t.contiguous()?)))
            .collect::<Result<Vec<(String, Tensor)>>>()?,
        None,
    )
    .map_err(|e| Error::Checkpoint {
        path: out.to_path_buf(),
        msg: format!("cannot serialise: {e}"),
    })?;
    checkpoint::atomic_write(out, &bytes)
}

/// Convert an OpenFold PyTorch checkpoint to a ferrofold `.safetensors` file. With `expected`
/// (the parameter shapes of the model the weights are for), names and shapes must match exactly
/// (the error lists every difference) and nothing is written otherwise. Returns the number of
/// tensors written.
pub fn convert_openfold(
    src: &Path,
    key: Option<&str>,
    out: &Path,
    expected: Option<&BTreeMap<String, Vec<usize>>>,
) -> Result<usize> {
    let map = read_openfold(src, key)?;
    if let Some(expected) = expected {
        let report = NameReport::compare(&map, expected);
        if !report.is_ok() {
            return Err(Error::Checkpoint {
                path: src.to_path_buf(),
                msg: format!(
                    "the weights do not fit the model of this configuration ({} tensors, model \
                     has {} parameters):\n{}",
                    map.len(),
                    expected.len(),
                    report.describe().trim_end()
                ),
            });
        }
    }
    write_safetensors(out, &map)?;
    Ok(map.len())
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
    fn name_report_lists_every_difference() {
        let dev = Device::Cpu;
        let mut w = BTreeMap::new();
        w.insert(
            "a".to_string(),
            Tensor::zeros((2, 3), DType::F32, &dev).unwrap(),
        );
        w.insert("b".to_string(), Tensor::zeros(5, DType::F32, &dev).unwrap());
        w.insert("x".to_string(), Tensor::zeros(1, DType::F32, &dev).unwrap());
        let mut e = BTreeMap::new();
        e.insert("a".to_string(), vec![2, 3]);
        e.insert("b".to_string(), vec![4]);
        e.insert("c".to_string(), vec![1]);
        let r = NameReport::compare(&w, &e);
        assert_eq!(r.missing, vec!["c".to_string()]);
        assert_eq!(r.unknown, vec!["x".to_string()]);
        assert_eq!(r.wrong_shape, vec!["b: weights [5], model [4]".to_string()]);
        assert!(!r.is_ok());
        let d = r.describe();
        assert!(
            d.contains("missing (in the model, not in the weights): 1\n  c"),
            "{d}"
        );
        w.remove("x");
        w.insert("b".to_string(), Tensor::zeros(4, DType::F32, &dev).unwrap());
        w.insert("c".to_string(), Tensor::zeros(1, DType::F32, &dev).unwrap());
        assert!(NameReport::compare(&w, &e).is_ok());
    }

    #[test]
    fn npz_is_refused_clearly() {
        let err = read_openfold(Path::new("params_model_1.npz"), None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("JAX") && err.contains("not supported"),
            "{err}"
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
