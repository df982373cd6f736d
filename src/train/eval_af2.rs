//! AF2 evaluation: the full-length (uncropped) validation chains, their metrics (lDDT-Cα, dRMSD,
//! RMSD, GDT-TS/HA, pLDDT per protein and the mean) and PDB outputs; used by
//! [`crate::train::af2::Af2Task::evaluate`] (in place, with the EMA weights swapped in) and by
//! [`Af2Evaluator`] (a model instance of its own, on the asynchronous evaluation thread).
//!
//! Validation features are deterministic (seed `seed_for(seed, "eval", 0, 0)`, chain index) and
//! built once, on first use, then cached in memory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;

use crate::config::Config;
use crate::data::loader::Dataset;
use crate::data::transforms::{build_sample_at, FeatureConfig};
use crate::error::{Error, Result};
use crate::loss::metrics::structure_metrics;
use crate::loss::LossBatch;
use crate::model::alphafold::{AfBatch, AlphaFold};
use crate::model::init::SeededVarMap;
use crate::train::eval::Evaluator;
use crate::train::optim::{params_from_varmap, Params};
use crate::train::pdb_out::{write_pdb, PdbChain};
use crate::train::seed::seed_for;

/// One cached validation chain: its full-length features (recycling dim last).
pub struct EvalChain {
    pub id: String,
    pub feats: BTreeMap<String, Tensor>,
}

/// Build the validation chains of `cfg.data` (split `val`), at most `limit`, of which this
/// evaluation shard `(r, n)` takes chains `i` with `i % n == r`: full length, deterministic
/// features on the CPU. A chain that fails to load is skipped with a warning.
pub fn build_eval_chains(
    cfg: &Config,
    features: &FeatureConfig,
    limit: Option<usize>,
    shard: (usize, usize),
) -> Result<Vec<EvalChain>> {
    let set = Dataset::from_config(&cfg.data, Some("val"))?;
    let (r, n) = (shard.0, shard.1.max(1));
    let mut chains = Vec::new();
    for (i, item) in set
        .items()
        .iter()
        .enumerate()
        .take(limit.unwrap_or(usize::MAX))
        .filter(|(i, _)| i % n == r)
    {
        let built = set.load(i, &cfg.data).and_then(|input| {
            let fc = FeatureConfig {
                crop_size: input.len().max(1),
                block_delete: false,
                num_recycles: cfg.model.recycling.max_iters + 1,
                seed: seed_for(cfg.train.seed, "eval", 0, 0),
                ..features.clone()
            };
            let sample = build_sample_at(&input, &fc, i as u64, Some(0))?;
            let feats = sample.to_tensors(&Device::Cpu, DType::F32)?;
            Ok(feats.into_iter().collect::<BTreeMap<_, _>>())
        });
        match built {
            Ok(feats) => chains.push(EvalChain {
                id: item.id.clone(),
                feats,
            }),
            Err(e) => tracing::warn!("eval: skipping {}: {e}", item.id),
        }
    }
    Ok(chains)
}

/// Run `model` on every chain (`recycles` recycling iterations at most): per-protein metrics
/// (`<id>/lddt_ca`, ...) and their means (`lddt_ca`, `drmsd_ca`, `rmsd_ca`, `gdt_ts`, `gdt_ha`,
/// `plddt`, plus `eval_chains`). Predictions go to `<pdb_dir>/step-<N>/<id>.pdb` when given.
pub fn evaluate_model(
    model: &AlphaFold,
    chains: &[EvalChain],
    recycles: usize,
    step: u64,
    pdb_dir: Option<&Path>,
) -> Result<BTreeMap<String, f64>> {
    let pdb_dir = pdb_dir.map(|d| d.join(format!("step-{step:09}")));
    if let Some(d) = &pdb_dir {
        std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
    }
    let mut out = BTreeMap::new();
    for chain in chains {
        let batch = AfBatch::from_last_dim(&chain.feats)?;
        let r = recycles.min(batch.cycles.len().saturating_sub(1));
        let o = model.forward(&batch, r, None)?.detach();
        let last = LossBatch::from_last_dim(&chain.feats, r)?;
        let pred = o
            .final_atom_positions
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?;
        let truth = last.all_atom_positions.to_dtype(DType::F32)?;
        let mask = last.all_atom_mask.to_dtype(DType::F32)?;
        let m = structure_metrics(&pred, &truth, &mask)?;
        let plddt = o.plddt.to_device(&Device::Cpu)?.to_dtype(DType::F32)?;
        let mut per = m.to_map("");
        per.insert(
            "plddt".into(),
            f64::from(plddt.mean_all()?.to_scalar::<f32>()?),
        );
        for (k, v) in &per {
            out.insert(format!("{}/{k}", chain.id), *v);
        }
        if let Some(d) = &pdb_dir {
            write_prediction(&d.join(format!("{}.pdb", chain.id)), &last, &pred, &plddt)?;
        }
    }
    Ok(with_means(out))
}

/// Per-protein metrics (`<id>/<metric>`) plus their means over proteins (`<metric>`, summed in
/// sorted id order) and `eval_chains`; any means already present are recomputed.
pub fn with_means(metrics: BTreeMap<String, f64>) -> BTreeMap<String, f64> {
    let per: BTreeMap<String, f64> = metrics
        .into_iter()
        .filter(|(k, _)| k.contains('/'))
        .collect();
    let mut sums: BTreeMap<String, (f64, usize)> = BTreeMap::new();
    let mut ids = std::collections::BTreeSet::new();
    for (k, v) in &per {
        if let Some((id, m)) = k.split_once('/') {
            ids.insert(id);
            let e = sums.entry(m.to_string()).or_default();
            e.0 += v;
            e.1 += 1;
        }
    }
    let n = ids.len();
    let mut out = per.clone();
    if n > 0 {
        for (k, (s, c)) in sums {
            out.insert(k, s / c as f64);
        }
        out.insert("eval_chains".into(), n as f64);
    }
    out
}

/// Merge the evaluations of several shards (each `<id>/<metric>` from the shard that evaluated
/// it) and recompute the means: the same numbers as one process evaluating every chain.
pub fn merge_shards(parts: Vec<BTreeMap<String, f64>>) -> BTreeMap<String, f64> {
    let mut all = BTreeMap::new();
    for p in parts {
        all.extend(p.into_iter().filter(|(k, _)| k.contains('/')));
    }
    with_means(all)
}

/// Write one predicted chain as PDB (atoms that exist for each residue type).
fn write_prediction(path: &Path, b: &LossBatch, pred: &Tensor, plddt: &Tensor) -> Result<()> {
    let aatype: Vec<usize> = b
        .aatype
        .to_dtype(DType::I64)?
        .to_vec1::<i64>()?
        .iter()
        .map(|a| *a as usize)
        .collect();
    let ri: Vec<i64> = b
        .residue_index
        .to_dtype(DType::I64)?
        .to_vec1::<i64>()?
        .iter()
        .map(|r| r + 1)
        .collect();
    let seq_mask: Vec<f32> = b.seq_mask.to_dtype(DType::F32)?.to_vec1()?;
    let exists: Vec<Vec<f32>> = b.atom37_atom_exists.to_dtype(DType::F32)?.to_vec2()?;
    let pos: Vec<Vec<Vec<f32>>> = pred.to_vec3()?;
    let n = seq_mask.iter().filter(|m| **m > 0.5).count();
    let positions: Vec<[[f32; 3]; 37]> = pos[..n]
        .iter()
        .map(|r| {
            let mut a = [[0.0f32; 3]; 37];
            for (i, p) in r.iter().enumerate().take(37) {
                a[i] = [p[0], p[1], p[2]];
            }
            a
        })
        .collect();
    let mask: Vec<[f32; 37]> = exists[..n]
        .iter()
        .map(|r| {
            let mut a = [0.0f32; 37];
            a.copy_from_slice(&r[..37]);
            a
        })
        .collect();
    let pl: Vec<f32> = plddt.to_vec1()?;
    write_pdb(
        path,
        &PdbChain {
            aatype: &aatype[..n],
            residue_index: &ri[..n],
            positions: &positions,
            mask: &mask,
            plddt: Some(&pl[..n]),
            chain_id: 'A',
        },
    )
}

/// Build the AF2 model exactly as the training task does (seeded init, precision), without DAP.
pub fn build_model(cfg: &Config, device: &Device) -> Result<(VarMap, Params, AlphaFold)> {
    let init = SeededVarMap::new(seed_for(cfg.train.seed, "init", 0, 0));
    let mut model = AlphaFold::new(init.builder(DType::F32, device), &cfg.model)?;
    model.set_precision(cfg.train.precision);
    let varmap = init.varmap;
    let params = params_from_varmap(&varmap)?;
    Ok((varmap, params, model))
}

/// The AF2 evaluator of the asynchronous evaluation thread: a single-rank (DAP-free) model
/// instance of its own, built on first use from the run's configuration, and the validation
/// chains, cached after their first use.
///
/// DAP runs: evaluation needs no collectives, so the thread evaluates with the unsharded model
/// (same math as the DAP-sharded one); `train.eval_mode = "sync"` evaluates in place with the
/// sharded model instead, which needs less memory per rank on long chains.
pub struct Af2Evaluator {
    cfg: Config,
    device: Device,
    features: FeatureConfig,
    pdb_dir: Option<PathBuf>,
    max_chains: Option<usize>,
    shard: (usize, usize),
    model: Option<(VarMap, Params, AlphaFold)>,
    chains: Option<Vec<EvalChain>>,
}

impl Af2Evaluator {
    /// `shard`: `(r, n)` evaluates validation chains `i % n == r` (see [`build_eval_chains`]).
    pub fn new(
        cfg: &Config,
        device: Device,
        pdb_dir: Option<PathBuf>,
        max_chains: Option<usize>,
        shard: (usize, usize),
    ) -> Self {
        Self {
            shard,
            features: FeatureConfig::from_config(cfg),
            cfg: cfg.clone(),
            device,
            pdb_dir,
            max_chains,
            model: None,
            chains: None,
        }
    }
}

impl Evaluator for Af2Evaluator {
    fn evaluate(
        &mut self,
        step: u64,
        weights: &BTreeMap<String, Tensor>,
    ) -> Result<BTreeMap<String, f64>> {
        if self.model.is_none() {
            let device = crate::train::eval::eval_device(&self.device)?;
            self.model = Some(build_model(&self.cfg, &device)?);
        }
        if self.chains.is_none() {
            self.chains = Some(build_eval_chains(
                &self.cfg,
                &self.features,
                self.max_chains,
                self.shard,
            )?);
        }
        let (Some((_, params, model)), Some(chains)) = (&self.model, &self.chains) else {
            return Err(Error::Train("evaluator not initialised".into()));
        };
        if let Some(name) = params.keys().find(|k| !weights.contains_key(*k)) {
            return Err(Error::Train(format!(
                "evaluation weights lack parameter `{name}`"
            )));
        }
        for (name, var) in params {
            if let Some(w) = weights.get(name) {
                var.set(&w.to_device(var.device())?.to_dtype(var.dtype())?)?;
            }
        }
        evaluate_model(
            model,
            chains,
            self.cfg.model.recycling.max_iters,
            step,
            self.pdb_dir.as_deref(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(pairs: &[(&str, f64)]) -> BTreeMap<String, f64> {
        pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn shards_merge_to_the_single_process_metrics() {
        let all = with_means(m(&[
            ("a/lddt_ca", 0.5),
            ("b/lddt_ca", 0.25),
            ("c/lddt_ca", 0.125),
            ("a/rmsd_ca", 3.0),
            ("b/rmsd_ca", 6.0),
            ("c/rmsd_ca", 9.0),
        ]));
        assert_eq!(all["lddt_ca"], 0.875 / 3.0);
        assert_eq!(all["rmsd_ca"], 6.0);
        assert_eq!(all["eval_chains"], 3.0);
        let s0 = with_means(m(&[
            ("a/lddt_ca", 0.5),
            ("c/lddt_ca", 0.125),
            ("a/rmsd_ca", 3.0),
            ("c/rmsd_ca", 9.0),
        ]));
        let s1 = with_means(m(&[("b/lddt_ca", 0.25), ("b/rmsd_ca", 6.0)]));
        assert_eq!(s1["eval_chains"], 1.0);
        assert_eq!(merge_shards(vec![s0, s1, BTreeMap::new()]), all);
        assert!(with_means(BTreeMap::new()).is_empty());
    }
}
