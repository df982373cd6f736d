//! Loader for the OpenFold golden fixtures (`$FERROFOLD_GOLDEN_DIR`, default `../shared/golden/openfold`).
//!
//! Each fixture is `<name>.safetensors` (tensors `param.*`, `input.*`, `output.*`, `cotangent.*`,
//! `grad.param.*`, `grad.input.*`) plus `<name>.json` (class/function, constructor args, dims,
//! tolerances). See the fixtures' README for the format.
#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

/// Root of the golden fixtures.
pub fn golden_dir() -> PathBuf {
    match std::env::var_os("FERROFOLD_GOLDEN_DIR") {
        Some(d) => PathBuf::from(d),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/golden/openfold"),
    }
}

/// Every fixture JSON in `subdir` (`modules`, `losses`, `data`, `model`), sorted by name.
pub fn fixtures_in(subdir: &str) -> Vec<PathBuf> {
    let dir = golden_dir().join(subdir);
    let mut out: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("golden dir {}: {e}", dir.display()))
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .filter(|p| p.with_extension("safetensors").exists())
        .collect();
    out.sort();
    out
}

/// One loaded fixture.
pub struct Fixture {
    pub name: String,
    pub json_path: PathBuf,
    pub meta: serde_json::Value,
    pub tensors: HashMap<String, Tensor>,
}

impl Fixture {
    /// Load `<path>.json` + `<path>.safetensors` (path may name either, or have no extension).
    pub fn load(path: &Path) -> Fixture {
        let json_path = path.with_extension("json");
        let st_path = path.with_extension("safetensors");
        let meta: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&json_path)
                .unwrap_or_else(|e| panic!("{}: {e}", json_path.display())),
        )
        .unwrap_or_else(|e| panic!("{}: {e}", json_path.display()));
        let tensors = candle_core::safetensors::load(&st_path, &Device::Cpu)
            .unwrap_or_else(|e| panic!("{}: {e}", st_path.display()));
        let name = json_path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        Fixture {
            name,
            json_path,
            meta,
            tensors,
        }
    }

    /// Load `<golden_dir>/<subdir>/<name>`.
    pub fn named(subdir: &str, name: &str) -> Fixture {
        Fixture::load(&golden_dir().join(subdir).join(name))
    }

    /// The OpenFold class (`openfold_class`) or function (`openfold_function`) this fixture ran,
    /// last path segment only (e.g. `MSATransition`, `backbone_loss`).
    pub fn target(&self) -> String {
        let full = self.meta["openfold_class"]
            .as_str()
            .or_else(|| self.meta["openfold_function"].as_str())
            .unwrap_or("");
        full.rsplit('.').next().unwrap_or("").to_string()
    }

    /// `constructor_args` (modules) or `args` (functions).
    pub fn args(&self) -> &serde_json::Value {
        if self.meta["constructor_args"].is_object() {
            &self.meta["constructor_args"]
        } else {
            &self.meta["args"]
        }
    }

    pub fn arg_usize(&self, key: &str) -> usize {
        self.args()[key].as_u64().unwrap_or_else(|| {
            panic!(
                "{}: constructor arg `{key}` missing or not an integer",
                self.name
            )
        }) as usize
    }

    pub fn arg_f64(&self, key: &str) -> f64 {
        self.args()[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{}: arg `{key}` missing or not a number", self.name))
    }

    pub fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// A tensor as stored (f64 floats, i64 integers).
    pub fn get(&self, name: &str) -> Tensor {
        self.tensors
            .get(name)
            .unwrap_or_else(|| panic!("{}: no tensor `{name}`", self.name))
            .clone()
    }

    /// A float tensor converted to `dtype`.
    pub fn get_as(&self, name: &str, dtype: DType) -> Tensor {
        self.get(name).to_dtype(dtype).expect("dtype conversion")
    }

    /// Names with a prefix, the prefix stripped, sorted.
    pub fn names_with_prefix(&self, prefix: &str) -> Vec<String> {
        let mut v: Vec<String> = self
            .tensors
            .keys()
            .filter_map(|k| k.strip_prefix(prefix).map(str::to_string))
            .collect();
        v.sort();
        v
    }

    /// Parameters by OpenFold state-dict name, converted to `dtype`.
    pub fn params(&self, dtype: DType) -> BTreeMap<String, Tensor> {
        self.names_with_prefix("param.")
            .into_iter()
            .map(|n| {
                let t = self.get_as(&format!("param.{n}"), dtype);
                (n, t)
            })
            .collect()
    }

    /// Gradient names listed as structurally zero (compare with an absolute tolerance).
    pub fn structurally_zero(&self) -> BTreeSet<String> {
        let mut out = BTreeSet::new();
        let sz = &self.meta["float32_vs_float64"]["summary"]["structurally_zero"];
        if let Some(obj) = sz.as_object() {
            out.extend(obj.keys().cloned());
        } else if let Some(arr) = sz.as_array() {
            out.extend(arr.iter().filter_map(|v| v.as_str().map(str::to_string)));
        }
        out
    }

    /// `grad_inputs` from the sidecar.
    pub fn grad_inputs(&self) -> Vec<String> {
        json_str_list(&self.meta["grad_inputs"])
    }

    /// `cotangent_outputs` from the sidecar.
    pub fn cotangent_outputs(&self) -> Vec<String> {
        json_str_list(&self.meta["cotangent_outputs"])
    }
}

fn json_str_list(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Infinity-norm relative error `max|got - want| / max|want|` and the absolute error, in f64.
pub fn errors(got: &Tensor, want: &Tensor) -> (f64, f64) {
    let g = got
        .to_dtype(DType::F64)
        .expect("f64")
        .flatten_all()
        .expect("flat");
    let w = want
        .to_dtype(DType::F64)
        .expect("f64")
        .flatten_all()
        .expect("flat");
    let g: Vec<f64> = g.to_vec1().expect("vec");
    let w: Vec<f64> = w.to_vec1().expect("vec");
    assert_eq!(g.len(), w.len(), "element count differs");
    let mut max_abs = 0.0f64;
    let mut max_ref = 0.0f64;
    for (a, b) in g.iter().zip(&w) {
        let d = (a - b).abs();
        if d.is_nan() || !a.is_finite() && b.is_finite() {
            return (f64::INFINITY, f64::INFINITY);
        }
        max_abs = max_abs.max(d);
        max_ref = max_ref.max(b.abs());
    }
    let rel = if max_ref > 0.0 {
        max_abs / max_ref
    } else {
        max_abs
    };
    (rel, max_abs)
}

/// Collects comparison failures so one test reports all of them.
#[derive(Default)]
pub struct Report {
    pub checked: usize,
    pub failures: Vec<String>,
}

impl Report {
    /// Compare shapes and values: pass if `rel <= rel_tol` or `abs <= abs_tol`.
    pub fn check(&mut self, what: &str, got: &Tensor, want: &Tensor, rel_tol: f64, abs_tol: f64) {
        self.checked += 1;
        if got.dims() != want.dims() {
            self.failures.push(format!(
                "{what}: shape {:?} != expected {:?}",
                got.dims(),
                want.dims()
            ));
            return;
        }
        let (rel, abs) = errors(got, want);
        if !(rel <= rel_tol || abs <= abs_tol) {
            self.failures.push(format!(
                "{what}: rel {rel:.3e} abs {abs:.3e} (tol rel {rel_tol:e})"
            ));
        }
    }

    pub fn fail(&mut self, msg: impl Into<String>) {
        self.failures.push(msg.into());
    }

    /// Panic with every failure if any.
    pub fn assert_ok(&self, ctx: &str) {
        assert!(self.checked > 0, "{ctx}: nothing was compared");
        assert!(
            self.failures.is_empty(),
            "{ctx}: {} failure(s):\n  {}",
            self.failures.len(),
            self.failures.join("\n  ")
        );
    }
}
