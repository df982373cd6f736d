//! The AlphaFold2 training task: the trainer's [`Task`] over the real model, loss and data
//! pipeline.
//!
//! - Training samples come from the prefetching [`Loader`] (sharded over data-parallel replicas:
//!   replica `r` of `R` reads global stream indices `k·R + r`); its position is the task's data
//!   state, so a resumed run continues the same stream.
//! - One step = forward over the step's recycles (earlier cycles without gradient), the AF2 loss on
//!   the last cycle's labels, backward (through remat tapes when `model.remat = block`).
//! - Evaluation runs the full-length (uncropped) validation chains with the weights the trainer
//!   swapped in (EMA), computes lDDT-Cα, dRMSD, RMSD, GDT-TS/HA per protein and their mean, and
//!   writes the predictions as PDB files with pLDDT in the B-factor column. Validation features are
//!   built once and cached in memory.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;

use crate::config::Config;
use crate::data::loader::{Dataset, Loader, LoaderState};
use crate::data::transforms::{build_sample_at, FeatureConfig};
use crate::error::{Error, Result};
use crate::loss::lddt::lddt_ca;
use crate::loss::metrics::structure_metrics;
use crate::loss::{alphafold_loss, LossBatch, LossTables};
use crate::model::alphafold::{AfBatch, AlphaFold};
use crate::model::dropout::DropoutCtx;
use crate::model::init::SeededVarMap;
use crate::train::optim::{params_from_varmap, Params};
use crate::train::pdb_out::{write_pdb, PdbChain};
use crate::train::seed::seed_for;
use crate::train::task::{StepCtx, StepOutput, Task};

/// Where the task reads and writes, and which data-parallel replica it is.
#[derive(Debug, Clone)]
pub struct Af2Options {
    /// `(replica, replicas)` of data parallelism (`(0, 1)` on one process).
    pub shard: (usize, usize),
    /// Predicted structures of evaluations go to `<dir>/step-<N>/<id>.pdb` (`None`: not written).
    pub pdb_dir: Option<PathBuf>,
    /// Evaluate the validation split (`false`: `evaluate` returns nothing).
    pub eval: bool,
    /// Stop building eval inputs after this many validation chains (`None`: all).
    pub max_eval_chains: Option<usize>,
}

impl Default for Af2Options {
    fn default() -> Self {
        Self {
            shard: (0, 1),
            pdb_dir: None,
            eval: true,
            max_eval_chains: None,
        }
    }
}

/// One cached validation chain: its full-length features (recycling dim last).
struct EvalChain {
    id: String,
    feats: BTreeMap<String, Tensor>,
}

/// The AF2 [`Task`].
pub struct Af2Task {
    cfg: Config,
    opts: Af2Options,
    device: Device,
    _varmap: VarMap,
    params: Params,
    model: AlphaFold,
    tables: LossTables,
    train_set: Arc<Dataset>,
    features: FeatureConfig,
    /// Started on the first step (after a possible restore).
    loader: Option<Loader>,
    loader_state: LoaderState,
    eval_set: Option<Vec<EvalChain>>,
    /// `train.cuda_graphs = on` on CUDA: the captured training steps (made on the first step;
    /// `None` after a failure, which falls back to the eager step for the rest of the run).
    #[cfg(feature = "cuda")]
    graph: GraphState,
}

/// State of the CUDA-graph training step.
#[cfg(feature = "cuda")]
enum GraphState {
    /// Not configured, or given up (eager steps).
    Off,
    /// Configured; made on the first step.
    Pending,
    On(Box<crate::train::graph::StepGraph>),
}

/// `stereo_chemical_props.txt` for the violation tables: `loss.violation.stereo_props`, else env
/// `FERROFOLD_STEREO_PROPS`, else beside the data root (`<root>/../stereo_chemical_props.txt`,
/// then `<root>/stereo_chemical_props.txt`).
pub fn stereo_props_path(cfg: &Config) -> Result<PathBuf> {
    if let Some(p) = &cfg.loss.violation.stereo_props {
        return Ok(p.clone());
    }
    if let Some(p) = std::env::var_os("FERROFOLD_STEREO_PROPS") {
        return Ok(PathBuf::from(p));
    }
    let root = cfg.data.resolved_data_root();
    let candidates = [
        root.join("../stereo_chemical_props.txt"),
        root.join("stereo_chemical_props.txt"),
    ];
    candidates
        .iter()
        .find(|p| p.exists())
        .cloned()
        .ok_or_else(|| {
            Error::config(
                "resolved",
                "loss.violation.stereo_props",
                format!(
                    "stereo_chemical_props.txt not found (looked in {} and {}); set the key or \
                 FERROFOLD_STEREO_PROPS",
                    candidates[0].display(),
                    candidates[1].display()
                ),
            )
        })
}

impl Af2Task {
    /// Build the model (fresh AF2 initialisation from `train.seed`), loss tables and datasets.
    pub fn new(cfg: &Config, device: Device, opts: Af2Options) -> Result<Self> {
        // Seeded per-parameter initialisation: every rank builds identical weights.
        let init = SeededVarMap::new(seed_for(cfg.train.seed, "init", 0, 0));
        let mut model = AlphaFold::new(init.builder(DType::F32, &device), &cfg.model)?;
        let varmap = init.varmap;
        model.set_precision(cfg.train.precision);
        let params = params_from_varmap(&varmap)?;
        let tables = LossTables::load(&stereo_props_path(cfg)?, &cfg.loss.violation, &device)?;
        let train_set = Arc::new(Dataset::from_config(&cfg.data, Some("train"))?);
        if train_set.is_empty() {
            return Err(Error::Data {
                what: cfg.data.manifest.display().to_string(),
                msg: "no training chains left after filtering".into(),
            });
        }
        Ok(Self {
            features: FeatureConfig::from_config(cfg),
            cfg: cfg.clone(),
            opts,
            device,
            _varmap: varmap,
            params,
            model,
            tables,
            train_set,
            loader: None,
            loader_state: LoaderState::default(),
            eval_set: None,
            #[cfg(feature = "cuda")]
            graph: if cfg.train.cuda_graphs == crate::config::CudaGraphs::On {
                GraphState::Pending
            } else {
                GraphState::Off
            },
        })
    }

    /// Shard the Evoformer/extra-MSA stacks over a DAP group (see [`AlphaFold::set_dap`]).
    pub fn set_dap(&mut self, dap: crate::parallel::Dap) {
        self.model.set_dap(Some(dap));
    }

    /// The model (for inference tools).
    pub fn model(&self) -> &AlphaFold {
        &self.model
    }

    fn loader(&mut self) -> &mut Loader {
        let (rank, world) = self.opts.shard;
        let cfg = &self.cfg;
        let set = &self.train_set;
        let features = &self.features;
        let state = &self.loader_state;
        self.loader.get_or_insert_with(|| {
            Loader::for_dataset_sharded(
                Arc::clone(set),
                &cfg.data,
                features.clone(),
                &cfg.data.loader,
                state,
                rank,
                world,
            )
        })
    }

    /// Build (once) and return the validation chains: full length, deterministic features.
    fn eval_chains(&mut self) -> Result<&[EvalChain]> {
        if self.eval_set.is_none() {
            let set = Dataset::from_config(&self.cfg.data, Some("val"))?;
            let limit = self.opts.max_eval_chains.unwrap_or(usize::MAX);
            let mut chains = Vec::new();
            for (i, item) in set.items().iter().enumerate().take(limit) {
                let built = set.load(i, &self.cfg.data).and_then(|input| {
                    let fc = FeatureConfig {
                        crop_size: input.len().max(1),
                        block_delete: false,
                        num_recycles: self.cfg.model.recycling.max_iters + 1,
                        seed: seed_for(self.cfg.train.seed, "eval", 0, 0),
                        ..self.features.clone()
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
            self.eval_set = Some(chains);
        }
        Ok(self.eval_set.as_deref().unwrap_or(&[]))
    }

    /// One training step replayed from a CUDA graph (captured for this recycle count on first
    /// use): same loss, dropout seed and metrics as the eager step; dropout masks come from the
    /// graph's device pool (see [`crate::model::dropout_pool`]).
    #[cfg(feature = "cuda")]
    fn graph_step(
        &mut self,
        ctx: &StepCtx,
        feats: &BTreeMap<String, Tensor>,
    ) -> Result<StepOutput> {
        use crate::train::graph::StepGraph;
        if self.model.dap().is_some() {
            return Err(Error::Train("cuda graphs do not support DAP".into()));
        }
        if matches!(self.graph, GraphState::Pending) {
            self.graph = GraphState::On(Box::new(StepGraph::new(&self.device, feats, true)?));
        }
        let GraphState::On(g) = &mut self.graph else {
            return Err(Error::Train("cuda graphs are off".into()));
        };
        let cycles = feats
            .get("aatype")
            .ok_or_else(|| Error::Data {
                what: "sample".into(),
                msg: "no aatype".into(),
            })?
            .dims()
            .last()
            .copied()
            .unwrap_or(1);
        let r = ctx.num_recycles.min(cycles.saturating_sub(1));
        let seed = seed_for(
            self.cfg.train.seed,
            "dropout",
            self.opts.shard.0 as u64,
            ctx.step,
        );
        g.prepare(feats, r, seed)?;
        let out = g
            .run(&self.model, &self.params, &self.tables, &self.cfg.loss)?
            .clone();
        let mut metrics = out.breakdown()?.flat("loss/");
        let lb = LossBatch::from_last_dim(feats, r)?;
        let pred = out
            .final_atom_positions
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?;
        let l = lddt_ca(
            &pred,
            &lb.all_atom_positions,
            &lb.all_atom_mask,
            15.0,
            1e-10,
            false,
        )?;
        metrics.insert(
            "train_lddt_ca".into(),
            f64::from(l.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?),
        );
        metrics.insert("recycles".into(), r as f64);
        metrics.insert("cuda_graph".into(), 1.0);
        let loss = Tensor::new(out.loss_value()? as f32, &Device::Cpu)?;
        Ok(StepOutput {
            loss,
            metrics,
            grads: Some(out.grads),
        })
    }

    /// Evaluate every validation chain: per-protein metrics (`<id>/lddt_ca`, ...) and their means
    /// (`lddt_ca`, `drmsd_ca`, `rmsd_ca`, `gdt_ts`, `gdt_ha`, `plddt`).
    pub fn evaluate_chains(&mut self, step: u64) -> Result<BTreeMap<String, f64>> {
        let recycles = self.cfg.model.recycling.max_iters;
        let pdb_dir = self
            .opts
            .pdb_dir
            .as_ref()
            .map(|d| d.join(format!("step-{step:09}")));
        if let Some(d) = &pdb_dir {
            std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
        }
        let model = self.model.clone();
        let chains = self.eval_chains()?;
        let mut out = BTreeMap::new();
        let mut sums: BTreeMap<String, f64> = BTreeMap::new();
        let mut n = 0usize;
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
                *sums.entry(k.clone()).or_default() += v;
            }
            n += 1;
            if let Some(d) = &pdb_dir {
                write_prediction(&d.join(format!("{}.pdb", chain.id)), &last, &pred, &plddt)?;
            }
        }
        if n > 0 {
            for (k, v) in sums {
                out.insert(k, v / n as f64);
            }
            out.insert("eval_chains".into(), n as f64);
        }
        Ok(out)
    }
}

/// Write one predicted chain as PDB (atoms that exist for each residue type).
fn write_prediction(
    path: &std::path::Path,
    b: &LossBatch,
    pred: &Tensor,
    plddt: &Tensor,
) -> Result<()> {
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

impl Task for Af2Task {
    fn params(&self) -> &Params {
        &self.params
    }

    fn step_loss(&mut self, ctx: &StepCtx) -> Result<StepOutput> {
        let sample = self.loader().next_sample()?;
        #[cfg(feature = "cuda")]
        if !matches!(self.graph, GraphState::Off) {
            let feats: BTreeMap<String, Tensor> = sample
                .to_tensors(&Device::Cpu, DType::F32)?
                .into_iter()
                .collect();
            match self.graph_step(ctx, &feats) {
                Ok(out) => return Ok(out),
                Err(e) => {
                    // Capture failed or the sample's shapes differ from the captured ones.
                    tracing::warn!("cuda graphs off for the rest of the run: {e}");
                    self.graph = GraphState::Off;
                }
            }
        }
        let id = sample.id.clone();
        let feats: BTreeMap<String, Tensor> = sample
            .to_tensors(&self.device, DType::F32)?
            .into_iter()
            .collect();
        let batch = AfBatch::from_last_dim(&feats)?;
        let r = ctx.num_recycles.min(batch.cycles.len().saturating_sub(1));
        let lb = LossBatch::from_last_dim(&feats, r)?;
        // Dropout masks: one seed per (step, data-parallel replica); DAP ranks of one replica
        // share it so they draw the same masks.
        let dropout = DropoutCtx::new(seed_for(
            self.cfg.train.seed,
            "dropout",
            self.opts.shard.0 as u64,
            ctx.step,
        ));
        let tables = &self.tables;
        let loss_cfg = &self.cfg.loss;
        let res = self
            .model
            .loss_and_grads(&self.params, &batch, r, Some(dropout), |out| {
                let l = alphafold_loss(&out.loss_outputs(), &lb, tables, loss_cfg)?;
                Ok((l.loss, l.breakdown))
            })?;
        let mut metrics = res.aux.flat("loss/");
        // lDDT-Cα of this training crop (no gradient): the training-set accuracy curve.
        let pred = res.output.final_atom_positions.to_dtype(DType::F32)?;
        let l = lddt_ca(
            &pred,
            &lb.all_atom_positions,
            &lb.all_atom_mask,
            15.0,
            1e-10,
            false,
        )?;
        metrics.insert(
            "train_lddt_ca".into(),
            f64::from(l.to_dtype(DType::F32)?.sum_all()?.to_scalar::<f32>()?),
        );
        metrics.insert("recycles".into(), r as f64);
        tracing::debug!(
            "step {}: sample {id} ({} recycles) loss {:.4}",
            ctx.step,
            r,
            res.loss
        );
        let loss = Tensor::new(res.loss as f32, &Device::Cpu)?;
        Ok(StepOutput {
            loss,
            metrics,
            grads: Some(res.grads),
        })
    }

    fn data_state(&self) -> Result<serde_json::Value> {
        match &self.loader {
            Some(l) => l.state().to_value(),
            None => self.loader_state.to_value(),
        }
    }

    fn restore_data_state(&mut self, state: &serde_json::Value) -> Result<()> {
        self.loader_state = LoaderState::from_value(state)?;
        // A running loader was started from the old position: restart it lazily.
        self.loader = None;
        Ok(())
    }

    fn evaluate(&mut self, step: u64) -> Result<BTreeMap<String, f64>> {
        if !self.opts.eval {
            return Ok(BTreeMap::new());
        }
        self.evaluate_chains(step)
    }
}
